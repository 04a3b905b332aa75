#!/usr/bin/env python3
"""Frozen-embedding baselines for the fine-tuning table: logistic regression on frozen features.

Two feature sets from the frozen all-MiniLM-L6-v2:
- `word`: the mean of the model's input word-embedding vectors over each snippet's tokens
  (no encoder layers: the classic bag-of-embeddings baseline);
- `sentence`: the full model's sentence embeddings (sentence-transformers: mean pooling of the
  last layer + L2 normalisation).
Fits scikit-learn's LogisticRegression on the training rows of kiln's seeded 80/20 split (the
split of scripts/finetune_torch.py, which equals kiln's `valid.csv`) and prints validation
accuracy, macro-F1 and wall time as one JSON line.

Needs: torch, sentence-transformers, safetensors, scikit-learn (PyPI).

Usage: scripts/baseline_logreg.py --model DIR --data reviews.csv [--features word|sentence]
           [--threads 2] [--c 1.0]
"""

import argparse
import csv
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_torch import permutation, rust_round  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--valid-ratio", type=float, default=0.2)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--features", default="word", choices=["word", "sentence"])
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--c", type=float, default=1.0, help="inverse L2 regularisation strength")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    start = time.time()
    torch.set_num_threads(args.threads)
    rows = list(csv.DictReader(open(args.data, encoding="utf-8", newline="")))
    order = permutation(len(rows), args.split_seed)
    n_valid = min(max(rust_round(len(rows) * args.valid_ratio), 1), len(rows) - 1)
    valid = [rows[i] for i in order[:n_valid]]
    train = [rows[i] for i in order[n_valid:]]

    if args.features == "sentence":
        model = SentenceTransformer(args.model, device="cpu")

        def embed(rs):
            texts = [r["text"] for r in rs]
            return model.encode(texts, batch_size=64, normalize_embeddings=True)

    else:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        table = load_file(f"{args.model}/model.safetensors")["embeddings.word_embeddings.weight"]

        def embed(rs):
            enc = tok([r["text"] for r in rs], truncation=True, max_length=args.max_length,
                      add_special_tokens=False)
            return torch.stack([table[ids].mean(0) for ids in enc["input_ids"]]).numpy()

    x_train, x_valid = embed(train), embed(valid)
    embedded = time.time()
    clf = LogisticRegression(C=args.c, max_iter=2000)
    clf.fit(x_train, [r["label"] for r in train])
    pred = clf.predict(x_valid)
    truth = [r["label"] for r in valid]
    print(
        json.dumps(
            {
                "method": f"logistic regression on frozen {args.features} embeddings",
                "train_rows": len(train),
                "valid_rows": len(valid),
                "accuracy": accuracy_score(truth, pred),
                "macro_f1": f1_score(truth, pred, average="macro"),
                "embed_s": round(embedded - start, 1),
                "wall_s": round(time.time() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
