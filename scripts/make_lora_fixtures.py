"""Writes reference fixtures for kiln-tune's LoRA (crates/kiln-tune/tests/fixtures/lora/).

Needs the PyPI packages: torch, transformers, peft, safetensors.

A tiny random `transformers.BertForSequenceClassification` (seeded) is saved with
`save_pretrained` as the base model (`base/`). `peft.get_peft_model` then applies LoRA (r=4,
lora_alpha=8, target_modules query,value, modules_to_save classifier); every lora_B (zero at
init) and the trained copy of the classifier are set to seeded random values, and the adapter
is saved with `PeftModel.save_pretrained` (`adapter/`: adapter_config.json +
adapter_model.safetensors). `inputs.json` holds a padded batch (input_ids, attention_mask,
token_type_ids), the logits of the PEFT model in eval mode (`logits`) and those of the base model
alone (`base_logits`). `crates/kiln-tune/tests/lora_peft.rs` loads base + adapter with kiln and
compares.

Run:  /work/venvs/torch/bin/python scripts/make_lora_fixtures.py
"""

import json
import os
import shutil

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates", "kiln-tune", "tests", "fixtures", "lora")


def main():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    base = BertForSequenceClassification(config).eval()
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    base.save_pretrained(os.path.join(OUT, "base"), safe_serialization=True)

    input_ids = torch.tensor([[2, 15, 33, 7, 9, 41, 3], [2, 60, 5, 3, 0, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    token_type_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        base_logits = base(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    model = get_peft_model(base, lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.eval()
    with torch.no_grad():
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits
    assert (logits - base_logits).abs().max() > 1e-2
    model.save_pretrained(os.path.join(OUT, "adapter"))
    readme = os.path.join(OUT, "adapter", "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    with open(os.path.join(OUT, "inputs.json"), "w") as f:
        json.dump(
            {
                "input_ids": input_ids.tolist(),
                "attention_mask": attention_mask.tolist(),
                "token_type_ids": token_type_ids.tolist(),
                "logits": logits.tolist(),
                "base_logits": base_logits.tolist(),
            },
            f,
        )
    print("wrote", OUT)


if __name__ == "__main__":
    main()
