#!/usr/bin/env python3
"""Checks that transformers loads a GPT-2 directory written by kiln's
`GPT2LMHeadModel::save_pretrained` and computes the same logits as the reference.

DIR is what `cargo run -p kiln-models --example gpt2_save -- DIR` writes: the small fixture
model of scripts/make_gpt2_fixtures.py saved by kiln (config.json, model.safetensors in HF
layout, vocab.json + merges.txt). The script loads it with `GPT2LMHeadModel.from_pretrained` and
`AutoTokenizer.from_pretrained`, tokenizes the fixture prompts, and prints, per prompt, whether
the ids equal the fixture's `ids_{i}` and the max abs diff of the logits (at the last position
over the whole vocabulary, and at every position over `sampled_ids`) against
crates/kiln-models/tests/fixtures/gpt2/reference.safetensors; then the greedy continuation
against `greedy_{i}`. Exits 1 when a diff exceeds 1e-4 or ids / tokens differ.

Needs: torch, transformers, safetensors (PyPI).
Run:   /work/venvs/torch/bin/python scripts/check_gpt2_roundtrip.py DIR
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "crates" / "kiln-models" / "tests" / "fixtures" / "gpt2"
TOL = 1e-4


def main():
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} DIR  (a directory written by kiln's save_pretrained)")
    model_dir = Path(sys.argv[1])
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = load_file(FIXTURES / "reference.safetensors")
    meta = json.loads((FIXTURES / "prompts.json").read_text())
    sampled = ref["sampled_ids"]
    ok = True
    worst = 0.0
    for i, prompt in enumerate(meta["prompts"]):
        ids = tok(prompt, return_tensors="pt").input_ids
        same_ids = torch.equal(ids[0], ref[f"ids_{i}"])
        with torch.no_grad():
            logits = model(ids).logits[0]
            gen = model.generate(ids, max_new_tokens=meta["new_tokens"], do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        d_last = (logits[-1] - ref[f"last_logits_{i}"]).abs().max().item()
        d_sampled = (logits[:, sampled] - ref[f"logits_{i}"]).abs().max().item()
        same_gen = torch.equal(gen[0, ids.shape[1]:], ref[f"greedy_{i}"])
        worst = max(worst, d_last, d_sampled)
        print(f"prompt {i}: ids {'equal' if same_ids else 'DIFFER'}, max |logits diff| "
              f"last position {d_last:.3e}, sampled ids {d_sampled:.3e}, greedy tokens "
              f"{'equal' if same_gen else 'DIFFER'}")
        ok &= same_ids and same_gen and d_last <= TOL and d_sampled <= TOL
    print(f"max abs diff vs reference: {worst:.3e} ({'OK' if ok else 'FAILED'}, tolerance {TOL})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
