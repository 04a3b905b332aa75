#!/usr/bin/env python3
"""The quickstart fine-tune in PyTorch + transformers, for comparison with `kiln finetune`.

Same data file, same 80/20 split (kiln's seeded shuffle, re-implemented below), same model
(all-MiniLM-L6-v2 + a fresh BertForSequenceClassification head), same optimizer (AdamW, weight
decay 0.01 except biases and LayerNorm weights), same schedule (10% linear warmup, linear decay),
batch size, epochs, max length, gradient clipping and dynamic padding. Prints validation accuracy,
wall time and peak RSS as one JSON line.

Needs: torch, transformers (PyPI).

Usage: scripts/finetune_torch.py --model DIR --data reviews.csv [--strategy full|linear_probe]
           [--epochs 1] [--batch-size 32] [--lr 5e-5] [--max-length 128] [--threads 2]
"""

import argparse
import csv
import json
import math
import resource
import time

MASK = (1 << 64) - 1


class KilnRng:
    """kiln_core::Rng: splitmix64 seeding, xoshiro256++ output."""

    def __init__(self, seed):
        sm = seed & MASK
        s = []
        for _ in range(4):
            sm = (sm + 0x9E3779B97F4A7C15) & MASK
            z = sm
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
            s.append(z ^ (z >> 31))
        self.s = s

    def next_u64(self):
        s = self.s
        rotl = lambda x, k: ((x << k) | (x >> (64 - k))) & MASK  # noqa: E731
        result = (rotl((s[0] + s[3]) & MASK, 23) + s[0]) & MASK
        t = (s[1] << 17) & MASK
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return result


def permutation(n, seed):
    rng = KilnRng(seed)
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.next_u64() % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def rust_round(x):
    return math.floor(x + 0.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--strategy", default="full", choices=["full", "linear_probe"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--valid-ratio", type=float, default=0.2)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rows = list(csv.DictReader(open(args.data, encoding="utf-8", newline="")))
    classes = sorted({r["label"] for r in rows})
    order = permutation(len(rows), args.split_seed)
    n_valid = min(max(rust_round(len(rows) * args.valid_ratio), 1), len(rows) - 1)
    valid = [rows[i] for i in order[:n_valid]]
    train = [rows[i] for i in order[n_valid:]]
    if args.limit:
        train = train[: args.limit]

    tok = AutoTokenizer.from_pretrained(args.model)
    model = BertForSequenceClassification.from_pretrained(
        args.model,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)},
    )
    if args.strategy == "linear_probe":
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith("classifier") or ".pooler." in n
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if n.endswith("bias") or "LayerNorm" in n else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = rust_round(0.1 * total)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1.0 - (step - warmup) / max(total - warmup, 1))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def batch(rs):
        enc = tok([r["text"] for r in rs], padding="longest", truncation=True,
                  max_length=args.max_length, return_tensors="pt")
        enc["labels"] = torch.tensor([classes.index(r["label"]) for r in rs])
        return enc

    start = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    for _epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g).tolist()
        for k in range(0, len(perm), args.batch_size):
            out = model(**batch([train[i] for i in perm[k:k + args.batch_size]]))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for k in range(0, len(valid), 64):
            b = batch(valid[k:k + 64])
            pred = model(**{k2: v for k2, v in b.items() if k2 != "labels"}).logits.argmax(-1)
            correct += int((pred == b["labels"]).sum())
    total_s = time.perf_counter() - start
    print(json.dumps({
        "framework": "pytorch", "torch": torch.__version__, "strategy": args.strategy,
        "train_rows": len(train), "valid_rows": len(valid), "epochs": args.epochs,
        "accuracy": correct / len(valid), "train_s": round(train_s, 1),
        "total_s": round(total_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
