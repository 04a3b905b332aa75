#!/usr/bin/env python3
"""Loads a token classifier saved by `kiln finetune --task token-classification` with
transformers' AutoModelForTokenClassification and compares its logits with kiln's.

kiln's side: `kiln predict --model DIR --data FILE --logits` (each word's first sub-token
logits). transformers' side: the same words through the saved fast tokenizer with
`is_split_into_words=True`, the logits at each word's first sub-token. Prints the max absolute
difference and exits non-zero above the tolerance.

    /work/venvs/torch/bin/python scripts/check_tokcls_roundtrip.py OUT_DIR \
        [--data OUT_DIR/valid.jsonl] [--kiln target/debug/kiln] [--max-length 128] [--tol 1e-4]
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--data", type=Path, help="JSONL with a tokens field (default: MODEL_DIR/valid.jsonl)")
    ap.add_argument("--kiln", default=os.environ.get("KILN_BIN", "target/debug/kiln"))
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--limit", type=int, default=50, help="sentences compared")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    data = args.data or args.model_dir / "valid.jsonl"
    rows = [json.loads(l) for l in data.read_text(encoding="utf-8").splitlines() if l.strip()]
    rows = rows[: args.limit]
    subset = args.model_dir / ".roundtrip.jsonl"
    subset.write_text("".join(json.dumps({"tokens": r["tokens"]}, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = subprocess.run(
        [args.kiln, "predict", "--model", str(args.model_dir), "--data", str(subset),
         "--logits", "--max-length", str(args.max_length)],
        check=True, capture_output=True, text=True,
    ).stdout
    subset.unlink()
    kiln_rows = [json.loads(l) for l in out.splitlines()]
    assert len(kiln_rows) == len(rows), (len(kiln_rows), len(rows))

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForTokenClassification.from_pretrained(args.model_dir).eval()
    assert type(model).__name__ == "BertForTokenClassification", type(model).__name__
    id2label = model.config.id2label
    worst, words, tags_equal = 0.0, 0, 0
    for r, k in zip(rows, kiln_rows):
        enc = tok(r["tokens"], is_split_into_words=True, truncation=True,
                  max_length=args.max_length, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        seen = set()
        for t, w in enumerate(enc.word_ids()):
            if w is None or w in seen:
                continue
            seen.add(w)
            theirs = logits[t]
            ours = torch.tensor(k["logits"][w])
            worst = max(worst, (theirs - ours).abs().max().item())
            words += 1
            tags_equal += id2label[int(theirs.argmax())] == k["tags"][w]
        # Words transformers dropped (truncated / no token) have no kiln tag either.
        for w in range(len(r["tokens"])):
            if w not in seen:
                assert k["tags"][w] is None, (r["tokens"], w)
    print(f"{len(rows)} sentences, {words} words: max |logit diff| = {worst:.3e}; "
          f"same tag on {tags_equal}/{words} words")
    if worst > args.tol:
        sys.exit(f"logits differ by {worst} > {args.tol}")


if __name__ == "__main__":
    main()
