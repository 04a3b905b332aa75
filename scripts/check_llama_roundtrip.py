#!/usr/bin/env python3
"""Checks that transformers loads a Llama directory written by kiln's
`LlamaForCausalLM::save_pretrained` and computes the logits of the GGUF model it came from.

DIR is what `cargo run --release -p kiln-models --example llama_save -- DIR` writes:
SmolLM2-135M-Instruct loaded by kiln from its Q4_1 GGUF (scripts/fetch_models.sh smollm2)
and saved in HF layout (config.json, model.safetensors with the dequantised f32 weights and
the tied head left out, tokenizer.json, tokenizer_config.json with the chat template,
special_tokens_map.json, generation_config.json). The script loads DIR with
`AutoModelForCausalLM` + `AutoTokenizer`, and the GGUF file itself with transformers' GGUF
loader (`gguf_file=`), and for each prompt (plain ones and a chat rendered by each side's
`apply_chat_template`) prints whether the token ids are equal and the max abs diff of the
logits at every position. Also checks the special tokens, the rendered chat text and the
greedy continuation. Exits 1 when a diff exceeds 1e-4 or anything differs.

Needs: torch, transformers, gguf, safetensors (PyPI).
Run:   /work/venvs/torch/bin/python scripts/check_llama_roundtrip.py DIR
"""

import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("KILN_MODEL_DIR", ROOT / ".cache" / "models"))
GGUF_DIR = MODELS / "smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Ünïcödé — emoji 🦀 and <|im_end|> mid-text\n\ttabs"]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"}]
TOL = 1e-4
NEW_TOKENS = 8


def main():
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} DIR  (a directory written by kiln's save_pretrained)")
    if not (GGUF_DIR / GGUF).exists():
        raise SystemExit(f"{GGUF_DIR / GGUF} missing: run scripts/fetch_models.sh smollm2")
    kiln_dir = Path(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained(kiln_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(kiln_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF,
                                                     dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF)
    ok = True
    for attr in ["bos_token", "eos_token", "unk_token", "pad_token"]:
        a, b = getattr(tok, attr), getattr(ref_tok, attr)
        print(f"{attr}: kiln dir {a!r}, GGUF {b!r}")
        # transformers' GGUF loader may invent a pad token the file does not declare.
        if attr != "pad_token" or a is not None:
            ok &= a == b
    chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ref_chat = ref_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    same_chat = chat_text == ref_chat
    print(f"chat template render: {'equal' if same_chat else 'DIFFERS'}")
    ok &= same_chat
    worst = 0.0
    for i, prompt in enumerate(PROMPTS + [chat_text]):
        ids = tok(prompt, return_tensors="pt").input_ids
        ref_ids = ref_tok(prompt, return_tensors="pt").input_ids
        same_ids = torch.equal(ids, ref_ids)
        with torch.no_grad():
            d = (model(ref_ids).logits - ref_model(ref_ids).logits).abs().max().item()
            gen = model.generate(ref_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            ref_gen = ref_model.generate(ref_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        same_gen = torch.equal(gen, ref_gen)
        worst = max(worst, d)
        print(f"prompt {i} ({ids.shape[1]} tokens): ids {'equal' if same_ids else 'DIFFER'}, "
              f"max |logits diff| {d:.3e}, greedy {NEW_TOKENS} tokens "
              f"{'equal' if same_gen else 'DIFFER'}: {tok.decode(gen[0, ref_ids.shape[1]:])!r}")
        ok &= same_ids and same_gen and d <= TOL
    print(f"max abs logit diff kiln dir vs GGUF: {worst:.3e} "
          f"({'OK' if ok else 'FAILED'}, tolerance {TOL})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
