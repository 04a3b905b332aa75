"""Checks that Hugging Face PEFT loads a LoRA adapter saved by kiln and gets kiln's outputs.

Needs the PyPI packages: torch, transformers, peft, safetensors.

Arguments: the adapter directory (adapter_config.json + adapter_model.safetensors, written by
`kiln_tune::lora::save_adapter`), the base model directory (config.json + model.safetensors of a
BertForSequenceClassification, or any `AutoModelForSequenceClassification`), and a JSON file with
`input_ids`, `attention_mask`, `token_type_ids` and the `logits` kiln computed in eval mode.
The base is loaded with `from_pretrained`, the adapter with `peft.PeftModel.from_pretrained`;
the script prints the largest absolute difference between PEFT's logits and kiln's and exits
with status 1 when it exceeds `--tol` (default 1e-5).

kiln's test writes such a directory when asked to keep it:

    KILN_LORA_EXPORT_DIR=/tmp/kiln-adapter cargo test -p kiln-tune --test lora_peft
    /work/venvs/torch/bin/python scripts/check_peft_adapter.py /tmp/kiln-adapter \
        crates/kiln-tune/tests/fixtures/lora/base /tmp/kiln-adapter/check.json
"""

import argparse
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter_dir")
    ap.add_argument("base_dir")
    ap.add_argument("inputs_json")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()

    with open(args.inputs_json) as f:
        data = json.load(f)
    base = AutoModelForSequenceClassification.from_pretrained(args.base_dir)
    model = PeftModel.from_pretrained(base, args.adapter_dir).eval()
    kwargs = {
        k: torch.tensor(data[k])
        for k in ("input_ids", "attention_mask", "token_type_ids")
        if k in data
    }
    with torch.no_grad():
        logits = model(**kwargs).logits
    expected = torch.tensor(data["logits"], dtype=logits.dtype)
    diff = (logits - expected).abs().max().item()
    print(f"max |peft - kiln| logits: {diff:.3e}")
    sys.exit(0 if diff <= args.tol else 1)


if __name__ == "__main__":
    main()
