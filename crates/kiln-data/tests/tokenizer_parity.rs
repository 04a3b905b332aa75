//! Tokenizer parity with HF: fixtures written by `scripts/make_tokenizer_fixtures.py` (Python
//! `tokenizers` / `transformers` on the same files) for all-MiniLM-L6-v2's `tokenizer.json`,
//! GPT-2's `encoder.json` + `vocab.bpe` and SmolLM2's GGUF vocabulary and chat template.
//! The model files come from `$KILN_MODEL_DIR` or `<repo>/.cache/models`; when missing,
//! `scripts/fetch_models.sh` is run to download them.

use kiln_data::{
    BpeVocab, ChatMessage, ChatTemplate, EncodeOptions, PadSide, Padding, PreTokenizerKind,
    TokenType, Tokenizer,
};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const FETCH: &str = "scripts/fetch_models.sh";

fn repo_root() -> PathBuf {
    kiln_data::datasets::repo_root().expect("repository root (scripts/fetch_data.sh) not found")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizers")
        .join(name)
}

fn read_json(path: &Path) -> Value {
    let mut text = String::new();
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .unwrap();
    } else {
        std::io::BufReader::new(file)
            .read_to_string(&mut text)
            .unwrap();
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `<model dir>/<name>`, running the fetch script when one of `files` is missing.
fn model(name: &str, script_arg: &str, files: &[&str]) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = repo_root();
    let models = match std::env::var_os("KILN_MODEL_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => root.join(".cache/models"),
    };
    let dir = models.join(name);
    if files.iter().all(|f| dir.join(f).is_file()) {
        return dir;
    }
    eprintln!("{} missing: running {FETCH} {script_arg}", dir.display());
    let status = std::process::Command::new("bash")
        .arg(root.join(FETCH))
        .arg(script_arg)
        .env("KILN_MODEL_DIR", &models)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {FETCH}: {e}"));
    assert!(status.success(), "{FETCH} {script_arg} failed ({status})");
    for f in files {
        assert!(
            dir.join(f).is_file(),
            "{FETCH} {script_arg} did not produce {}",
            dir.join(f).display()
        );
    }
    dir
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn i64_rows(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn offsets(v: &Value) -> Vec<(usize, usize)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn tensor_rows(t: &kiln_core::Tensor) -> Vec<Vec<i64>> {
    let d = t.shape().dims().to_vec();
    assert_eq!(d.len(), 2);
    let v = t.to_vec::<i64>();
    (0..d[0])
        .map(|r| v[r * d[1]..(r + 1) * d[1]].to_vec())
        .collect()
}

/// Checks every single-text and pair case of a fixture: ids, tokens, offsets, type ids,
/// attention mask, and both decodes.
fn check_cases(tok: &Tokenizer, fx: &Value) {
    let tricky = strings(&read_json(&fixture("tricky_strings.json")));
    assert!(tricky.len() >= 25, "only {} tricky strings", tricky.len());
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), tricky.len());
    let pairs = fx["pairs"].as_array().unwrap();
    assert!(!pairs.is_empty());
    for case in cases.iter().chain(pairs) {
        let text = case["text"].as_str().unwrap();
        let enc = match case["pair"].as_str() {
            Some(pair) => tok.encode_pair(text, pair, true).unwrap(),
            None => tok.encode(text, true).unwrap(),
        };
        let what = format!("{text:?} / {:?}", case["pair"]);
        assert_eq!(enc.ids, u32s(&case["ids"]), "ids of {what}");
        assert_eq!(enc.tokens, strings(&case["tokens"]), "tokens of {what}");
        assert_eq!(enc.offsets, offsets(&case["offsets"]), "offsets of {what}");
        assert_eq!(enc.type_ids, u32s(&case["type_ids"]), "type ids of {what}");
        assert_eq!(
            enc.attention_mask,
            u32s(&case["attention_mask"]),
            "mask of {what}"
        );
        assert_eq!(
            tok.decode(&enc.ids, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {what}"
        );
        assert_eq!(
            tok.decode(&enc.ids, true).unwrap(),
            case["decoded_skip"].as_str().unwrap(),
            "skip-decode of {what}"
        );
        for (&id, t) in enc.ids.iter().zip(&enc.tokens) {
            assert_eq!(tok.id_to_token(id).as_deref(), Some(t.as_str()));
            assert_eq!(tok.token_to_id(t), Some(id));
        }
    }
}

/// Checks the batch cases (padding, truncation, pad side) against transformers' outputs.
fn check_batches(tok: &Tokenizer, fx: &Value, pad_id: Option<u32>) {
    let batches = fx["batches"].as_array().unwrap();
    assert!(!batches.is_empty());
    for b in batches {
        let o = &b["options"];
        let max_length = o["max_length"].as_u64().map(|n| n as usize);
        let mut opts = EncodeOptions::default().padding(match o["padding"].as_str() {
            Some("longest") => Padding::Longest,
            Some("max_length") => Padding::Fixed(max_length.unwrap()),
            other => panic!("padding {other:?}"),
        });
        if !o["truncation"].is_null() && o["truncation"] != Value::Bool(false) {
            opts = opts.truncation(max_length.unwrap());
        }
        if b["padding_side"] == "left" {
            opts = opts.pad_side(PadSide::Left);
        }
        if let Some(id) = pad_id {
            opts = opts.pad_id(id);
        }
        let texts = strings(&b["texts"]);
        let out = match b["pairs"].as_array() {
            Some(_) => {
                let pairs: Vec<(String, String)> =
                    texts.into_iter().zip(strings(&b["pairs"])).collect();
                tok.encode_batch_pairs(&pairs, &opts).unwrap()
            }
            None => tok.encode_batch(&texts, &opts).unwrap(),
        };
        assert_eq!(
            tensor_rows(&out.input_ids),
            i64_rows(&b["input_ids"]),
            "input_ids of {b}"
        );
        assert_eq!(
            tensor_rows(&out.attention_mask),
            i64_rows(&b["attention_mask"]),
            "mask of {b}"
        );
        assert_eq!(
            tensor_rows(&out.token_type_ids),
            i64_rows(&b["token_type_ids"]),
            "type ids of {b}"
        );
        assert_eq!(out.offsets.len(), out.input_ids.shape().dims()[0]);
    }
}

#[test]
fn minilm_tokenizer_json_matches_tokenizers() {
    let dir = model("all-MiniLM-L6-v2", "minilm", &["tokenizer.json"]);
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let id = |t: &str| tok.token_to_id(t);
    assert_eq!(tok.cls_id(), id("[CLS]"));
    assert_eq!(tok.sep_id(), id("[SEP]"));
    assert_eq!(tok.pad_id(), id("[PAD]"));
    assert_eq!(tok.unk_id(), id("[UNK]"));
    assert!(tok.cls_id().is_some() && tok.pad_id().is_some());
    let fx = read_json(&fixture("minilm.json"));
    check_cases(&tok, &fx);
    check_batches(&tok, &fx, None);
}

#[test]
fn gpt2_files_match_transformers() {
    let dir = model("gpt2-vocab", "gpt2-vocab", &["encoder.json", "vocab.bpe"]);
    let tok = Tokenizer::from_gpt2_files(dir.join("encoder.json"), dir.join("vocab.bpe")).unwrap();
    assert_eq!(tok.vocab_size(), 50257);
    let eot = tok.token_to_id("<|endoftext|>");
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (eot, eot, None));
    let fx = read_json(&fixture("gpt2.json"));
    check_cases(&tok, &fx);
    check_batches(&tok, &fx, eot);
}

fn smollm2_vocab() -> (BpeVocab, Value) {
    let v = read_json(&fixture("smollm2_vocab.json.gz"));
    let id = |k: &str| v[k].as_u64().map(|n| n as u32);
    assert_eq!(v["model"], "gpt2");
    let vocab = BpeVocab {
        tokens: strings(&v["tokens"]),
        merges: strings(&v["merges"]),
        token_types: v["token_type"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| TokenType::from_gguf(t.as_i64().unwrap() as i32))
            .collect(),
        bos_id: id("bos_token_id"),
        eos_id: id("eos_token_id"),
        unk_id: id("unknown_token_id"),
        pad_id: id("padding_token_id"),
        add_bos: v["add_bos_token"].as_bool().unwrap_or(false),
        add_eos: false,
        pre: PreTokenizerKind::from_gguf_pre(v["pre"].as_str().unwrap()),
    };
    (vocab, v)
}

#[test]
fn smollm2_gguf_vocab_matches_transformers() {
    let (vocab, raw) = smollm2_vocab();
    assert_eq!(vocab.pre, PreTokenizerKind::Gpt2, "pre {:?}", raw["pre"]);
    let n = vocab.tokens.len();
    let tok = Tokenizer::from_bpe_vocab(vocab).unwrap();
    assert_eq!(tok.vocab_size(), n);
    let fx = read_json(&fixture("smollm2.json"));
    let s = &fx["special"];
    let id = |k: &str| s[k].as_u64().map(|n| n as u32);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.unk_id()),
        (id("bos"), id("eos"), id("pad"), id("unk"))
    );
    check_cases(&tok, &fx);
    check_batches(&tok, &fx, None);
}

#[test]
fn smollm2_chat_template_matches_transformers() {
    let (vocab, _) = smollm2_vocab();
    let tok = Tokenizer::from_bpe_vocab(vocab).unwrap();
    let fx = read_json(&fixture("smollm2_chat.json"));
    let messages = |v: &Value| -> Vec<ChatMessage> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect()
    };
    let template = ChatTemplate::new(fx["template"].as_str().unwrap())
        .unwrap()
        .with_tokenizer_tokens(&tok);
    let chats = fx["chats"].as_array().unwrap();
    assert_eq!(chats.len(), 4);
    for c in chats {
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(&messages(&c["messages"]), gen).unwrap();
        assert_eq!(text, c["rendered"].as_str().unwrap(), "chat {c}");
        assert_eq!(
            tok.encode(&text, true).unwrap().ids,
            u32s(&c["ids"]),
            "ids of chat {c}"
        );
    }
    for e in fx["extra"].as_array().unwrap() {
        let t = ChatTemplate::new(e["template"].as_str().unwrap())
            .unwrap()
            .with_tokenizer_tokens(&tok);
        let out = t.render(
            &messages(&e["messages"]),
            e["add_generation_prompt"].as_bool().unwrap(),
        );
        match e["error"].as_str() {
            None => assert_eq!(
                out.unwrap(),
                e["rendered"].as_str().unwrap(),
                "template {}",
                e["template"]
            ),
            Some(msg) => {
                let err = out.unwrap_err().to_string();
                assert!(err.contains(msg), "{err} should contain {msg}");
            }
        }
    }
}
