#!/usr/bin/env python3
"""Writes the tokenizer parity fixtures under crates/kiln-data/tests/fixtures/tokenizers/.

Needs the PyPI packages `tokenizers`, `transformers` and `gguf` (run it with
/work/venvs/torch/bin/python or any environment that has them), and the models that
`scripts/fetch_models.sh` downloads (found in $KILN_MODEL_DIR, else <repo>/.cache/models).

    python scripts/make_tokenizer_fixtures.py

Writes:
  tricky_strings.json       the committed list of hard inputs every reference is run on
  minilm.json               all-MiniLM-L6-v2 tokenizer.json through the Python `tokenizers` package
  gpt2.json                 GPT-2 encoder.json + vocab.bpe through transformers.GPT2TokenizerFast
  smollm2.json              SmolLM2-135M-Instruct GGUF through transformers.AutoTokenizer(gguf_file=...)
  smollm2_vocab.json.gz     the GGUF's tokenizer.ggml.* arrays and ids, so the Rust test needs no GGUF reader
  smollm2_chat.json         the GGUF's tokenizer.chat_template rendered by apply_chat_template
Every case records ids, tokens, char offsets, type ids, attention mask and decodes (with and
without special tokens); the batch cases record padded/truncated input_ids and attention masks.
"""

import gzip
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "kiln-data" / "tests" / "fixtures" / "tokenizers"
MODELS = Path(os.environ.get("KILN_MODEL_DIR") or ROOT / ".cache" / "models")

TRICKY = [
    "Hello world",
    "",
    " ",
    "   leading and trailing spaces   ",
    "whitespace\truns\t\tand   tabs\n\nnewlines\r\nCRLF",
    "Café naïve résumé façade Ångström",
    "combining: e\u0301 a\u0300 o\u0308 n\u0303 (NFD) vs é à ö ñ (NFC)",
    "emoji: 😀 🎉 👍🏽 🇫🇷",
    "ZWJ family 👨\u200d👩\u200d👧\u200d👦 and 🏳\ufe0f\u200d🌈",
    "CJK: 你好，世界！日本語のテキスト。한국어 문장.",
    "Arabic: مرحبا بالعالم، كيف حالك؟",
    "Hebrew and Thai: שלום עולם สวัสดีครับ",
    "numbers 1234567890 3.14159 -42 1e-10 1,000,000",
    "punctuation!?.,;:'\"()[]{}<>@#$%^&*-_=+/\\|~`",
    "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "contractions: don't won't it's we'll they've I'm she'd",
    "UPPER lower MiXeD CamelCaseWords snake_case_words",
    "text with <|endoftext|> inside and <|endoftext|>",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "url https://example.com/path?q=1&r=2#frag and email a.b@c.org",
    "code: fn main() { println!(\"{}\", x[0] + 1); }",
    "mixed 中文 English 日本 한글 العربية mix",
    "zero\u200bwidth\u200cjoiners\u200d and nbsp\u00a0here",
    "accents ÀÉÎÕÜ àéîõü ÇçÑñ ßẞ",
    "math ∑∫√∞ ≤≥≠ αβγδ Ωω",
    "repeated!!!!!!!! ???? .... ------",
    "tabs\tonly\t",
    "\n\n\n",
    "a",
    "Ä",
]
PAIRS = [
    ("How old are you?", "I am six years old and I live in a very small house."),
    ("Café", "naïve 😀"),
    ("", "second only"),
]
BATCH = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "A considerably longer sentence that will certainly be cut by truncation, with ünïcödé.",
    "",
]


# Templates exercising what transformers' Jinja environment offers (tojson, Python string
# methods, namespace, loop variables and controls, trim/lstrip blocks, raise_exception).
EXTRA_TEMPLATES = [
    "{%- for m in messages %}{{ m | tojson }}|{{ m.content.strip() | upper }}|"
    "{% if m['role'].startswith('us') %}U{% endif %}\n{%- endfor %}{{ messages | tojson(indent=2) }}",
    """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
{{ loop.index }}/{{ loop.length }}{% if loop.first %} first{% endif %}{% if loop.last %} last{% endif %}: {{ m.content }}
{% endfor %}
count={{ ns.n }}{% if add_generation_prompt %} GEN{% endif %}
""",
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] | trim }} [/INST]"
    "{% else %} {{ message['content'] | trim }}{{ eos_token }}{% endif %}{% endfor %}",
]


def model_dir(name):
    d = MODELS / name
    if not d.is_dir():
        sys.exit(f"{d} not found: run scripts/fetch_models.sh first")
    return d


def save(name, obj):
    path = OUT / name
    data = json.dumps(obj, ensure_ascii=False, indent=None, separators=(",", ":")).encode()
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data + b"\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def raw_case(enc, tok_decode, text):
    return {
        "text": text,
        "ids": enc.ids,
        "tokens": enc.tokens,
        "offsets": [list(o) for o in enc.offsets],
        "type_ids": enc.type_ids,
        "attention_mask": enc.attention_mask,
        "decoded": tok_decode(enc.ids, False),
        "decoded_skip": tok_decode(enc.ids, True),
    }


def hf_case(tok, text, pair=None):
    enc = tok(text, pair, return_offsets_mapping=True, return_token_type_ids=True)
    ids = enc["input_ids"]
    return {
        "text": text,
        "pair": pair,
        "ids": ids,
        "tokens": tok.convert_ids_to_tokens(ids),
        "offsets": [list(o) for o in enc["offset_mapping"]],
        "type_ids": enc["token_type_ids"],
        "attention_mask": enc["attention_mask"],
        "decoded": tok.decode(ids, skip_special_tokens=False),
        "decoded_skip": tok.decode(ids, skip_special_tokens=True),
    }


def hf_batch(tok, texts, pairs=None, **kw):
    enc = tok(texts, pairs, return_token_type_ids=True, **kw)
    options = {k: v for k, v in kw.items()}
    return {
        "texts": texts,
        "pairs": pairs,
        "options": options,
        "padding_side": tok.padding_side,
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_type_ids": enc["token_type_ids"],
    }


def minilm():
    from tokenizers import Tokenizer

    path = model_dir("all-MiniLM-L6-v2") / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    decode = lambda ids, skip: tok.decode(ids, skip_special_tokens=skip)
    cases = [raw_case(tok.encode(t), decode, t) for t in TRICKY]
    pairs = []
    for a, b in PAIRS:
        c = raw_case(tok.encode(a, b), decode, a)
        c["pair"] = b
        pairs.append(c)
    # Batches through transformers on the same tokenizer.json (padding/truncation semantics).
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(path), unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
        mask_token="[MASK]",
    )
    batches = [
        hf_batch(hf, BATCH, padding="longest", truncation=True, max_length=12),
        hf_batch(hf, [a for a, _ in PAIRS], [b for _, b in PAIRS], padding="max_length", truncation="longest_first",
                 max_length=10),
        hf_batch(hf, BATCH[:3], padding="longest"),
    ]
    hf.padding_side = "left"
    batches.append(hf_batch(hf, BATCH, padding="max_length", truncation=True, max_length=16))
    save("minilm.json", {"source": "tokenizers " + __import__("tokenizers").__version__, "cases": cases,
                         "pairs": pairs, "batches": batches})


def gpt2():
    import transformers
    from transformers import GPT2TokenizerFast

    d = model_dir("gpt2-vocab")
    # transformers 5 ignores vocab_file/merges_file in the constructor (they are only read by
    # from_pretrained under the names vocab.json/merges.txt); `vocab`/`merges` take the paths.
    tok = GPT2TokenizerFast(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"))
    assert len(tok) == 50257, len(tok)
    cases = [hf_case(tok, t) for t in TRICKY]
    pairs = [hf_case(tok, a, b) for a, b in PAIRS]
    tok.pad_token = "<|endoftext|>"
    batches = [hf_batch(tok, BATCH, padding="longest", truncation=True, max_length=8)]
    save("gpt2.json", {"source": "transformers " + transformers.__version__, "cases": cases, "pairs": pairs,
                       "batches": batches})


def smollm2():
    import gguf
    import transformers
    from transformers import AutoTokenizer

    d = model_dir("smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(str(d / name))

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    vocab = {
        "model": field("tokenizer.ggml.model"),
        "pre": field("tokenizer.ggml.pre"),
        "tokens": field("tokenizer.ggml.tokens"),
        "merges": field("tokenizer.ggml.merges"),
        "token_type": field("tokenizer.ggml.token_type"),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "unknown_token_id": field("tokenizer.ggml.unknown_token_id"),
        "padding_token_id": field("tokenizer.ggml.padding_token_id"),
        "add_bos_token": field("tokenizer.ggml.add_bos_token"),
        "chat_template": field("tokenizer.chat_template"),
    }
    save("smollm2_vocab.json.gz", vocab)

    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=name)
    cases = [hf_case(tok, t) for t in TRICKY]
    pairs = [hf_case(tok, a, b) for a, b in PAIRS]
    tok.padding_side = "left"
    batches = [hf_batch(tok, BATCH, padding="longest", truncation=True, max_length=10)]
    save("smollm2.json", {"source": "transformers " + transformers.__version__, "cases": cases, "pairs": pairs,
                          "batches": batches,
                          "special": {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
                                      "unk": tok.unk_token_id}})

    convs = [
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Japan? Answer in 日本語 🙂"},
        ],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hi\nin two lines"},
        ],
    ]
    chats = []
    for conv in convs:
        for gen in (False, True):
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            chats.append({"messages": conv, "add_generation_prompt": gen, "rendered": text,
                          "ids": tok(text)["input_ids"]})
    extra = []
    for src in EXTRA_TEMPLATES:
        for conv in convs:
            for gen in (False, True):
                try:
                    text, error = tok.apply_chat_template(conv, chat_template=src, tokenize=False,
                                                          add_generation_prompt=gen), None
                except Exception as e:  # raise_exception in the template
                    text, error = None, str(e)
                extra.append({"template": src, "messages": conv, "add_generation_prompt": gen, "rendered": text,
                              "error": error})
    save("smollm2_chat.json", {"template": vocab["chat_template"], "bos_token": tok.bos_token,
                               "eos_token": tok.eos_token, "chats": chats, "extra": extra})


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    save("tricky_strings.json", TRICKY)
    minilm()
    gpt2()
    smollm2()


if __name__ == "__main__":
    main()
