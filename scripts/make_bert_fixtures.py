"""Writes reference fixtures for kiln-models' BERT (crates/kiln-models/tests/fixtures/minilm.json)
from all-MiniLM-L6-v2 (found in $KILN_MODEL_DIR or .cache/models; `scripts/fetch_models.sh minilm`).

Needs the PyPI packages: torch, transformers, sentence-transformers, tokenizers, safetensors.

The fixture holds, for a fixed list of sentences (short and long, non-ASCII, one near 128
tokens):
- the token ids, attention mask and token type ids the HF tokenizer gives for the padded batch
  (kiln's test feeds these ids; the tokenizer is tested elsewhere);
- the sentence embeddings of `SentenceTransformer(dir).encode(sentences)` (mean pooling +
  L2 normalisation, all 384 dims);
- `transformers.BertModel`'s last_hidden_state (first and last 8 positions, all dims) and
  pooler_output for a padded batch of 2 sentences;
- the logits of BertForSequenceClassification (3 labels) and BertForTokenClassification
  (5 labels) built from the MiniLM weights with seeded random classifiers (their weights are in
  the fixture), on the whole padded batch.

Run:  /work/venvs/torch/bin/python scripts/make_bert_fixtures.py
"""

import json
import os

import torch
from sentence_transformers import SentenceTransformer
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL_DIR = os.path.join(
    os.environ.get("KILN_MODEL_DIR") or os.path.join(ROOT, ".cache", "models"), "all-MiniLM-L6-v2"
)
OUT = os.path.join(ROOT, "crates", "kiln-models", "tests", "fixtures")

SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Rust is a systems programming language.",
    "Café crème, naïve façade and jalapeño — déjà vu!",
    "Москва — столица России.",
    "東京は日本の首都です。",
    "I love machine learning 🤖 and embeddings.",
    "Hello",
    (
        "Sentence embeddings map a piece of text to a single vector so that texts with similar "
        "meaning end up close to each other, which makes them useful for semantic search, "
        "clustering, deduplication and retrieval-augmented generation; the model behind this "
        "particular checkpoint is a six-layer MiniLM distilled from a larger BERT and then "
        "fine-tuned on more than a billion sentence pairs with a contrastive objective, and it "
        "truncates inputs at 256 word pieces, which this long sentence stays well below while "
        "still being long enough to exercise attention over roughly one hundred and twenty "
        "tokens in a padded batch."
    ),
    "The weather today is sunny with a light breeze.",
]

SEQ_LABELS = 3
TOK_LABELS = 5


def enc(t):
    t = t.detach()
    if t.dtype.is_floating_point:
        data = [float(v) for v in t.to(torch.float32).reshape(-1).tolist()]
    else:
        data = [int(v) for v in t.reshape(-1).tolist()]
    return {"shape": list(t.shape), "data": data}


def seeded_classifier(linear, seed):
    # N(0, 0.1²): 5x HF's initializer_range, so the logits are O(1) and not dominated by the
    # bias. (With std 0.5 token logits reach ~15 and f32 rounding alone gives ~1e-4 abs diffs.)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * 0.1)
        linear.bias.copy_(torch.randn(linear.bias.shape, generator=g) * 0.1)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    print("token counts:", lengths)
    assert max(lengths) >= 110, "the long sentence should be near 128 tokens"

    st = SentenceTransformer(MODEL_DIR, device="cpu")
    emb = st.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False)

    bert = BertModel.from_pretrained(MODEL_DIR).eval()
    two = tok([SENTENCES[0], SENTENCES[3]], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = bert(**two)
    hidden = out.last_hidden_state
    n = hidden.shape[1]
    assert n >= 16
    first, last = hidden[:, :8, :], hidden[:, n - 8 :, :]

    seq = BertForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=SEQ_LABELS).eval()
    seeded_classifier(seq.classifier, 11)
    tokc = BertForTokenClassification.from_pretrained(MODEL_DIR, num_labels=TOK_LABELS).eval()
    seeded_classifier(tokc.classifier, 12)
    with torch.no_grad():
        seq_logits = seq(**batch).logits
        tok_logits = tokc(**batch).logits

    fixture = {
        "sentences": SENTENCES,
        "input_ids": enc(batch["input_ids"]),
        "attention_mask": enc(batch["attention_mask"]),
        "token_type_ids": enc(batch["token_type_ids"]),
        "sentence_embeddings": enc(emb),
        "pair": {
            "input_ids": enc(two["input_ids"]),
            "attention_mask": enc(two["attention_mask"]),
            "hidden_first8": enc(first),
            "hidden_last8": enc(last),
            "pooler_output": enc(out.pooler_output),
        },
        "seq_cls": {
            "num_labels": SEQ_LABELS,
            "classifier": {k: enc(v) for k, v in seq.classifier.state_dict().items()},
            "logits": enc(seq_logits),
        },
        "tok_cls": {
            "num_labels": TOK_LABELS,
            "classifier": {k: enc(v) for k, v in tokc.classifier.state_dict().items()},
            "logits": enc(tok_logits),
        },
    }
    path = os.path.join(OUT, "minilm.json")
    with open(path, "w") as f:
        json.dump(fixture, f)
    print(f"wrote {path}: batch {list(batch['input_ids'].shape)}, pair {list(two['input_ids'].shape)}")


if __name__ == "__main__":
    main()
