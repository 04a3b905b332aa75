#!/usr/bin/env python3
"""Writes crates/kiln-tune/tests/fixtures/tokcls/seqeval.json: tag sequences (hand-picked edge
cases plus seeded random ones over BIO, IOBES and malformed tags) and what seqeval computes for
them: the entities of each sequence, micro precision / recall / F1, accuracy and the per-type
classification report. A BMES (word segmentation) case is scored after kiln's documented
mapping (M -> I, untyped). Run with the torch venv after `pip install seqeval`:

    /work/venvs/torch/bin/python scripts/make_tokcls_fixtures.py
"""
import json
import os
import random
from pathlib import Path

from importlib.metadata import version

from seqeval.metrics import accuracy_score, classification_report, f1_score
from seqeval.metrics import precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/kiln-tune/tests/fixtures/tokcls/seqeval.json"
ALIGN = ROOT / "crates/kiln-tune/tests/fixtures/tokcls/alignment.json"
MODEL_DIR = Path(os.environ.get("KILN_MODEL_DIR", ROOT / ".cache/models")) / "all-MiniLM-L6-v2"


def score(true, pred, mapped_true=None, mapped_pred=None):
    t = mapped_true or true
    p = mapped_pred or pred
    report = classification_report(t, p, output_dict=True, zero_division=0)
    per_type = {
        k: [v["precision"], v["recall"], v["f1-score"], int(v["support"])]
        for k, v in report.items()
        if k not in ("micro avg", "macro avg", "weighted avg")
    }
    return {
        "true": true,
        "pred": pred,
        "entities_true": [[list(e) for e in get_entities(s)] for s in t],
        "entities_pred": [[list(e) for e in get_entities(s)] for s in p],
        "precision": precision_score(t, p, zero_division=0),
        "recall": recall_score(t, p, zero_division=0),
        "f1": f1_score(t, p, zero_division=0),
        "accuracy": accuracy_score(t, p),
        "per_type": per_type,
    }


def main():
    cases = []
    # Hand-picked: exact matches, a wrong type, a wrong span, I- after O, type switches inside
    # a chunk, IOBES tags, a sentence without entities.
    true = [
        ["B-PER", "I-PER", "O", "B-LOC", "O"],
        ["O", "B-ORG", "I-ORG", "I-ORG", "O", "B-MISC"],
        ["B-LOC", "I-LOC", "B-LOC", "O"],
        ["O", "O", "O"],
        ["S-PER", "O", "B-ORG", "E-ORG", "O"],
    ]
    pred = [
        ["B-PER", "I-PER", "O", "B-ORG", "O"],
        ["O", "I-ORG", "I-ORG", "I-LOC", "O", "B-MISC"],
        ["B-LOC", "I-LOC", "I-LOC", "O"],
        ["O", "B-PER", "O"],
        ["B-PER", "O", "B-ORG", "I-ORG", "E-ORG"],
    ]
    cases.append({"name": "edge cases", "scheme": "bio", **score(true, pred)})
    # Seeded random sequences over BIO and IOBES tags (including malformed orders).
    rng = random.Random(5)
    types = ["PER", "LOC", "ORG"]
    tags = ["O"] * 4 + [f"{p}-{t}" for p in "BIES" for t in types]
    for i in range(4):
        true, pred = [], []
        for _ in range(6):
            n = rng.randint(1, 12)
            t = [rng.choice(tags) for _ in range(n)]
            # Predictions: the truth with some tags changed, so there are matches and misses.
            p = [x if rng.random() < 0.7 else rng.choice(tags) for x in t]
            true.append(t)
            pred.append(p)
        cases.append({"name": f"random {i}", "scheme": "bio", **score(true, pred)})
    # BMES word segmentation as snownlp writes it (lowercase), scored after kiln's mapping.
    true = [list("bmesbes"), list("sbesbme")]
    pred = [list("bmessss"), list("sbesbme")]
    mapping = lambda s: [{"b": "B", "m": "I", "e": "E", "s": "S"}[x] for x in s]
    mt = [mapping(s) for s in true]
    mp = [mapping(s) for s in pred]
    cases.append({"name": "bmes", "scheme": "bmes", **score(true, pred, mt, mp)})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps({"seqeval_version": version("seqeval"), "cases": cases}, indent=1)
        + "\n"
    )
    print(f"wrote {OUT} ({len(cases)} cases)")
    alignment()


def alignment():
    """Hugging Face's word -> sub-token alignment on MiniLM's tokenizer, as `run_ner.py`'s
    `tokenize_and_align_labels` does it (with and without `label_all_tokens`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    labels = ["B-MISC", "B-PER", "I-MISC", "I-PER", "O"]
    b_to_i = [labels.index("I-" + l[2:]) if l.startswith("B-") else i for i, l in enumerate(labels)]
    rows = [
        (["Hugging", "Face", "tokenization", "\u00ad", "U.S.", "迈", "向", "中", "kilnworks"],
         ["B-MISC", "I-MISC", "O", "O", "B-MISC", "O", "O", "O", "B-PER"]),
        (["John", "Smithsonian-Pemberton", "visited", "Zürich", "."],
         ["B-PER", "I-PER", "O", "B-MISC", "O"]),
        (["中", "国", "人", "民", "银", "行"], ["B-MISC", "I-MISC", "I-MISC", "I-MISC", "I-MISC", "I-MISC"]),
    ]
    cases = []
    for max_length in (128, 8):
        for words, tags in rows:
            enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_length)
            word_ids = enc.word_ids()
            out = {"words": words, "tags": tags, "max_length": max_length,
                   "input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
                   "word_ids": word_ids}
            for all_tokens in (False, True):
                prev, lab = None, []
                for w in word_ids:
                    if w is None:
                        lab.append(-100)
                    elif w != prev:
                        lab.append(labels.index(tags[w]))
                    else:
                        lab.append(b_to_i[labels.index(tags[w])] if all_tokens else -100)
                    prev = w
                out["labels_all_tokens" if all_tokens else "labels"] = lab
            cases.append(out)
    ALIGN.write_text(json.dumps({"labels": labels, "cases": cases}, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {ALIGN} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
