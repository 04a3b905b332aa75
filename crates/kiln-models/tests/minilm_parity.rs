//! Parity of kiln's BERT with sentence-transformers / transformers on the real
//! all-MiniLM-L6-v2 checkpoint, on fixtures written by `scripts/make_bert_fixtures.py`
//! (token ids come from the HF tokenizer and are fed as they are). Max abs diff ≤ 1e-4.

use kiln_core::Tensor;
use kiln_models::checkpoint::minilm_dir;
use kiln_models::{
    BertForSequenceClassification, BertForTokenClassification, BertModel, LoadOptions,
};
use kiln_nn::{LoadMode, ModuleExt, StateDict};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Arr {
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl Arr {
    fn f32(&self) -> Tensor {
        let v: Vec<f32> = self.data.iter().map(|&x| x as f32).collect();
        Tensor::from_vec(v, self.shape.clone())
    }
    fn i64(&self) -> Tensor {
        let v: Vec<i64> = self.data.iter().map(|&x| x as i64).collect();
        Tensor::from_vec(v, self.shape.clone())
    }
}

#[derive(Deserialize)]
struct Pair {
    input_ids: Arr,
    attention_mask: Arr,
    hidden_first8: Arr,
    hidden_last8: Arr,
    pooler_output: Arr,
}

#[derive(Deserialize)]
struct Head {
    num_labels: usize,
    classifier: BTreeMap<String, Arr>,
    logits: Arr,
}

#[derive(Deserialize)]
struct Fixture {
    sentences: Vec<String>,
    input_ids: Arr,
    attention_mask: Arr,
    token_type_ids: Arr,
    sentence_embeddings: Arr,
    pair: Pair,
    seq_cls: Head,
    tok_cls: Head,
}

fn fixture() -> Fixture {
    let path = format!("{}/tests/fixtures/minilm.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn max_diff(got: &Tensor, want: &Arr) -> f64 {
    assert_eq!(got.dims(), want.shape.as_slice(), "shape");
    got.contiguous()
        .to_f64_vec()
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

const TOL: f64 = 1e-4;

fn check(what: &str, got: &Tensor, want: &Arr) {
    let d = max_diff(got, want);
    eprintln!("{what}: max abs diff {d:.3e}");
    assert!(d <= TOL, "{what}: max abs diff {d} > {TOL}");
}

fn load_classifier<M: ModuleExt>(model: &M, head: &Head) {
    let sd: StateDict = head
        .classifier
        .iter()
        .map(|(k, v)| (format!("classifier.{k}"), v.f32()))
        .collect();
    let r = model.load_state_dict(&sd, LoadMode::NonStrict).unwrap();
    assert_eq!(r.loaded.len(), 2);
}

#[test]
fn minilm_matches_sentence_transformers_and_transformers() {
    let fx = fixture();
    let dir = minilm_dir().unwrap();
    let model = BertModel::from_pretrained(&dir).unwrap();
    model.eval();
    let ids = fx.input_ids.i64();
    let mask = fx.attention_mask.i64();
    let types = fx.token_type_ids.i64();
    assert!(fx.sentences.len() >= 8);
    // The batch is padded: at least one row has padding.
    assert!(fx.attention_mask.data.contains(&0.0));
    let emb = model.sentence_embeddings(&ids, Some(&mask), Some(&types));
    check(
        "sentence embeddings [10, 384]",
        &emb,
        &fx.sentence_embeddings,
    );

    let p = &fx.pair;
    let out = model.forward(&p.input_ids.i64(), Some(&p.attention_mask.i64()), None);
    let h = &out.last_hidden_state;
    let n = h.dims()[1];
    check(
        "last_hidden_state, first 8 tokens",
        &h.narrow(1, 0, 8),
        &p.hidden_first8,
    );
    check(
        "last_hidden_state, last 8 tokens",
        &h.narrow(1, n - 8, 8),
        &p.hidden_last8,
    );
    check(
        "pooler_output",
        out.pooler_output.as_ref().unwrap(),
        &p.pooler_output,
    );
}

#[test]
fn minilm_classification_heads_match_transformers() {
    let fx = fixture();
    let dir = minilm_dir().unwrap();
    let ids = fx.input_ids.i64();
    let mask = fx.attention_mask.i64();

    let opts = LoadOptions::default().num_labels(fx.seq_cls.num_labels);
    let (seq, report) = BertForSequenceClassification::from_pretrained_with(&dir, &opts).unwrap();
    assert_eq!(report.missing, ["classifier.weight", "classifier.bias"]);
    load_classifier(&seq, &fx.seq_cls);
    seq.eval();
    check(
        "sequence classification logits",
        &seq.forward(&ids, Some(&mask), None),
        &fx.seq_cls.logits,
    );

    let opts = LoadOptions::default().num_labels(fx.tok_cls.num_labels);
    let (tok, report) = BertForTokenClassification::from_pretrained_with(&dir, &opts).unwrap();
    assert_eq!(report.missing, ["classifier.weight", "classifier.bias"]);
    assert_eq!(
        report.unexpected,
        ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    );
    load_classifier(&tok, &fx.tok_cls);
    tok.eval();
    check(
        "token classification logits",
        &tok.forward(&ids, Some(&mask), None),
        &fx.tok_cls.logits,
    );
}
