//! kiln-serve end to end: real models (all-MiniLM-L6-v2 as a 2-label classifier saved by
//! `kiln_tune::save_classifier`, MiniLM as a sentence embedder, SmolLM2-135M GGUF) served on
//! 127.0.0.1:0, exercised over HTTP with a small blocking client. Answers are compared with
//! `kiln_tune::predict` / `kiln_models::generate` run directly. The model files come from
//! `$KILN_MODEL_DIR` or `<repo>/.cache/models`; `scripts/fetch_models.sh` runs when missing.

mod common;

use common::{get, post, request, Resp};
use kiln_core::{no_grad, DType};
use kiln_data::{ChatMessage, EncodeOptions, Padding, Tokenizer};
use kiln_models::checkpoint::{fetch_model, minilm_dir};
use kiln_models::{
    generate, BertForSequenceClassification, BertModel, Generated, GenerationConfig,
    LlamaForCausalLM, LoadOptions, QuantActivations, StopReason,
};
use kiln_nn::ModuleExt;
use kiln_serve::{
    load_model, Backend, BackgroundServer, LoadedModel, ModelInfo, ModelKind, SeqId, ServeConfig,
};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn smollm2_path() -> PathBuf {
    fetch_model("smollm2", "smollm2", &[SMOLLM2])
        .expect("SmolLM2 GGUF")
        .join(SMOLLM2)
}

fn base() -> ServeConfig {
    ServeConfig::default().port(0)
}

/// The classifier directory (MiniLM + a fresh 2-label head), its direct copy and its server.
struct Classifier {
    direct: Mutex<(BertForSequenceClassification, Tokenizer)>,
    dir: PathBuf,
    server: BackgroundServer,
}

fn classifier_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let minilm = minilm_dir().expect("all-MiniLM-L6-v2");
        let opts = LoadOptions::default()
            .labels(vec!["negative".into(), "positive".into()])
            .seed(7);
        let (model, _) = BertForSequenceClassification::from_pretrained_with(&minilm, &opts)
            .expect("MiniLM as a classifier");
        // A fixed place under the target directory: each run overwrites it, none piles up.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kiln-serve-classifier");
        kiln_tune::save_classifier(&model, &minilm.join("tokenizer.json"), &dir)
            .expect("save_classifier");
        dir
    })
}

fn classifier() -> &'static Classifier {
    static C: OnceLock<Classifier> = OnceLock::new();
    C.get_or_init(|| {
        let dir = classifier_dir().clone();
        let direct = kiln_tune::load_classifier(&dir).expect("load_classifier");
        let model = load_model(&dir, None).expect("serve the classifier");
        assert_eq!(model.info.kind, ModelKind::Classifier);
        let config = base()
            .max_texts(8)
            .max_text_tokens(32)
            .body_limit(64 * 1024)
            .max_wait_ms(10);
        let server = BackgroundServer::start(config, model).expect("start");
        Classifier {
            direct: Mutex::new(direct),
            dir,
            server,
        }
    })
}

fn clf() -> SocketAddr {
    classifier().server.local_addr()
}

fn embedder() -> SocketAddr {
    static S: OnceLock<BackgroundServer> = OnceLock::new();
    S.get_or_init(|| {
        let model = load_model(&minilm_dir().unwrap(), None).expect("serve MiniLM");
        assert_eq!(model.info.kind, ModelKind::Embedder);
        BackgroundServer::start(base(), model).expect("start")
    })
    .local_addr()
}

/// The direct SmolLM2 (for reference answers) and its server (max_tokens ≤ 8).
struct Lm {
    direct: Mutex<LlamaForCausalLM>,
    server: BackgroundServer,
}

fn lm() -> &'static Lm {
    static L: OnceLock<Lm> = OnceLock::new();
    L.get_or_init(|| {
        let path = smollm2_path();
        let model = load_model(&path, None).expect("serve SmolLM2");
        assert_eq!(model.info.kind, ModelKind::CausalLm);
        assert_eq!(model.info.name, "SmolLM2-135M-Instruct.Q4_1");
        let server =
            BackgroundServer::start(base().max_tokens(8).default_max_tokens(4), model).unwrap();
        let direct = LlamaForCausalLM::from_gguf(&path, Some(QuantActivations::Q8)).unwrap();
        Lm {
            direct: Mutex::new(direct),
            server,
        }
    })
}

fn lm_addr() -> SocketAddr {
    lm().server.local_addr()
}

fn predict_direct(texts: &[&str]) -> Vec<kiln_tune::Prediction> {
    let g = classifier().direct.lock().unwrap();
    kiln_tune::predict(&g.0, &g.1, texts, 16, 512).unwrap()
}

fn assert_classified(answer: &Value, texts: &[&str]) {
    let want = predict_direct(texts);
    let data = answer["data"].as_array().expect("data");
    assert_eq!(data.len(), texts.len(), "{answer}");
    for (i, (d, p)) in data.iter().zip(&want).enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["label"], p.label.as_str(), "{d}");
        assert!(
            (d["score"].as_f64().unwrap() - p.score).abs() < 1e-5,
            "{d} vs {p:?}"
        );
        for (label, prob) in &p.probabilities {
            let got = d["probabilities"][label].as_f64().unwrap();
            assert!((got - prob).abs() < 1e-5, "{label}: {got} vs {prob}");
        }
    }
}

fn assert_error(r: &Resp, status: u16, param: Option<&str>, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let e = &v["error"];
    let msg = e["message"].as_str().expect("error.message");
    assert!(e["type"].is_string(), "{v}");
    assert!(
        msg.to_lowercase().contains(&needle.to_lowercase()),
        "{msg:?} lacks {needle:?}"
    );
    match param {
        Some(p) => assert_eq!(e["param"], p, "{v}"),
        None => assert!(e["param"].is_null(), "{v}"),
    }
}

fn metric(addr: SocketAddr, line_start: &str) -> f64 {
    let text = get(addr, "/metrics").text();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(line_start)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no metric {line_start}\n{text}"))
}

// ------------------------------------------------------------------ classify and embeddings

#[test]
fn classify_answers_equal_predict() {
    let r = post(
        clf(),
        "/v1/classify",
        &json!({"input": "a wonderful, moving film"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_classified(&r.json(), &["a wonderful, moving film"]);
    let texts = ["terrible.", "I loved every minute of it", "meh"];
    let r = post(
        clf(),
        "/v1/classify",
        &json!({"input": texts, "model": classifier().dir.file_name().unwrap().to_str()}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_classified(&v, &texts);
    assert_eq!(v["object"], "list");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() >= 6);
}

#[test]
fn sixteen_concurrent_clients_get_their_own_answers() {
    let texts: Vec<Vec<String>> = (0..16)
        .map(|i| {
            (0..1 + i % 3)
                .map(|j| format!("review {i}.{j}: {}", "good ".repeat(1 + (i * 7 + j) % 9)))
                .collect()
        })
        .collect();
    let answers: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = texts
            .iter()
            .map(|t| s.spawn(move || post(clf(), "/v1/classify", &json!({"input": t}))))
            .collect();
        hs.into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()
            })
            .collect()
    });
    for (t, a) in texts.iter().zip(&answers) {
        let refs: Vec<&str> = t.iter().map(String::as_str).collect();
        assert_classified(a, &refs);
    }
}

/// A classifier server with a long batching window: 8 concurrent requests share model calls;
/// with batching off each is its own call.
#[test]
fn dynamic_batching_merges_concurrent_requests_and_can_be_switched_off() {
    for batching in [true, false] {
        let model = load_model(classifier_dir(), None).unwrap();
        let config = base().max_wait_ms(400).max_batch(64).batching(batching);
        let server = BackgroundServer::start(config, model).unwrap();
        let addr = server.local_addr();
        let texts: Vec<String> = (0..8).map(|i| format!("text number {i}")).collect();
        std::thread::scope(|s| {
            let hs: Vec<_> = texts
                .iter()
                .map(|t| s.spawn(move || post(addr, "/v1/classify", &json!({"input": t}))))
                .collect();
            for (h, t) in hs.into_iter().zip(&texts) {
                let r = h.join().unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                assert_classified(&r.json(), &[t.as_str()]);
            }
        });
        let calls = metric(addr, "kiln_batch_size_count ");
        let rows = metric(addr, "kiln_batch_size_sum ");
        assert_eq!(rows, 8.0);
        if batching {
            assert!(
                calls < 8.0,
                "batching on: {calls} model calls for 8 requests"
            );
        } else {
            assert_eq!(calls, 8.0, "batching off: one call per request");
        }
        server.stop().unwrap();
    }
}

fn embed_direct(texts: &[&str]) -> Vec<Vec<f32>> {
    let dir = minilm_dir().unwrap();
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let model = BertModel::from_pretrained(&dir).unwrap();
    model.eval();
    let _g = no_grad();
    let opts = EncodeOptions::default()
        .padding(Padding::Longest)
        .truncation(512);
    let b = tok.encode_batch(texts, &opts).unwrap();
    let e = model.sentence_embeddings(
        &b.input_ids,
        Some(&b.attention_mask.to_dtype(DType::F32)),
        Some(&b.token_type_ids),
    );
    let dim = e.dim(1);
    e.to_vec::<f32>().chunks(dim).map(<[f32]>::to_vec).collect()
}

fn decode_b64(s: &str) -> Vec<f32> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 {c}"),
    };
    let mut bytes = Vec::new();
    for q in s.as_bytes().chunks(4) {
        let n = q
            .iter()
            .take_while(|&&c| c != b'=')
            .fold((0u32, 0), |(n, k), &c| {
                (n | (val(c) as u32) << (18 - 6 * k), k + 1)
            });
        let got = q.iter().filter(|&&c| c != b'=').count() - 1;
        for k in 0..got {
            bytes.push((n.0 >> (16 - 8 * k)) as u8);
        }
    }
    bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn embeddings_have_the_openai_shape_and_equal_direct_ones() {
    let texts = ["A man is eating food.", "The new movie is awesome", "x"];
    let want = embed_direct(&texts);
    let r = post(
        embedder(),
        "/v1/embeddings",
        &json!({"input": texts, "model": "all-MiniLM-L6-v2"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["object"].as_str(), v["model"].as_str()),
        (Some("list"), Some("all-MiniLM-L6-v2"))
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    for (i, (d, w)) in v["data"].as_array().unwrap().iter().zip(&want).enumerate() {
        assert_eq!(
            (d["object"].as_str(), d["index"].as_u64()),
            (Some("embedding"), Some(i as u64))
        );
        let e: Vec<f32> = serde_json::from_value(d["embedding"].clone()).unwrap();
        assert_eq!(e.len(), 384);
        let diff = e
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "row {i}: max diff {diff}");
    }
    let r = post(
        embedder(),
        "/v1/embeddings",
        &json!({"input": texts[0], "encoding_format": "base64"}),
    );
    let v = r.json();
    let e = decode_b64(v["data"][0]["embedding"].as_str().unwrap());
    let diff = e
        .iter()
        .zip(&want[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(e.len() == 384 && diff < 1e-5, "base64: {diff}");
    // The classifier serves embeddings from its encoder (MiniLM's weights, unchanged).
    let r = post(clf(), "/v1/embeddings", &json!({"input": texts[1]}));
    assert_eq!(r.status, 200, "{}", r.text());
    let e: Vec<f32> = serde_json::from_value(r.json()["data"][0]["embedding"].clone()).unwrap();
    let diff = e
        .iter()
        .zip(&want[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "classifier embeddings: {diff}");
}

// ------------------------------------------------------------------ generation

fn generate_direct(prompt_text: &str, config: &GenerationConfig) -> (String, Generated) {
    let g = lm().direct.lock().unwrap();
    let tok = &g.tokenizer.as_ref().unwrap().tokenizer;
    let ids = tok.encode(prompt_text, true).unwrap().ids;
    let mut config = config.clone();
    config.stop_tokens = tok.eos_id().into_iter().collect();
    if let Some(id) = tok.token_to_id("<|im_end|>") {
        config.stop_tokens.push(id);
    }
    let out = generate(&*g, &ids, &config, |_| true).unwrap();
    (tok.decode(&out.tokens, true).unwrap(), out)
}

fn chat_prompt(messages: &[ChatMessage]) -> String {
    let g = lm().direct.lock().unwrap();
    let t = g.tokenizer.as_ref().unwrap().template().unwrap().unwrap();
    t.render(messages, true).unwrap()
}

fn finish_reason(g: &Generated) -> &'static str {
    match g.stop {
        StopReason::StopToken => "stop",
        _ => "length",
    }
}

#[test]
fn completions_equal_generate_greedy_and_seeded() {
    let prompt = "The capital of France is";
    let (want, g) = generate_direct(prompt, &GenerationConfig::greedy(6));
    let r = post(
        lm_addr(),
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], finish_reason(&g));
    assert_eq!(v["usage"]["completion_tokens"], g.tokens.len());
    assert_eq!(
        v["usage"]["total_tokens"].as_u64(),
        Some(v["usage"]["prompt_tokens"].as_u64().unwrap() + g.tokens.len() as u64)
    );
    let cfg = GenerationConfig::sampling(5, 0.9, 11)
        .top_k(40)
        .top_p(0.95)
        .repetition_penalty(1.1);
    let (want, _) = generate_direct("Once upon a time", &cfg);
    let body = json!({"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0.9,
        "seed": 11, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1});
    let r = post(lm_addr(), "/v1/completions", &body);
    assert_eq!(r.json()["choices"][0]["text"], want.as_str());
}

#[test]
fn chat_completions_and_streaming_equal_generate() {
    let msgs = [
        ChatMessage::system("Be brief."),
        ChatMessage::user("Name a colour."),
    ];
    let (want, g) = generate_direct(&chat_prompt(&msgs), &GenerationConfig::greedy(7));
    let body = json!({"messages": [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."}], "max_tokens": 7, "temperature": 0});
    let r = post(lm_addr(), "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], finish_reason(&g));

    let mut body = body;
    body["stream"] = json!(true);
    let r = post(lm_addr(), "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        finish_reason(&g)
    );

    // Plain completions stream too, one chunk per piece of text.
    let (want, g) = generate_direct("1, 2, 3,", &GenerationConfig::greedy(8));
    let r = post(
        lm_addr(),
        "/v1/completions",
        &json!({"prompt": "1, 2, 3,", "max_tokens": 8, "temperature": 0, "stream": true}),
    );
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "{data:?}");
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, want);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        finish_reason(&g)
    );
}

#[test]
fn stop_strings_cut_the_text() {
    let (full, _) = generate_direct("1, 2, 3,", &GenerationConfig::greedy(8));
    // Stop at the second character that is not a space of the greedy continuation.
    let cut = full
        .char_indices()
        .filter(|(_, c)| !c.is_whitespace())
        .nth(1)
        .unwrap()
        .0;
    let stop: String = full[cut..].chars().take(1).collect();
    let want = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let r = post(
            lm_addr(),
            "/v1/completions",
            &json!({"prompt": "1, 2, 3,", "max_tokens": 8, "temperature": 0,
                "stop": [stop], "stream": stream}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let (text, reason) = if stream {
            let data = r.sse_data();
            let chunks: Vec<Value> = data[..data.len() - 1]
                .iter()
                .map(|d| serde_json::from_str(d).unwrap())
                .collect();
            let t: String = chunks
                .iter()
                .map(|c| c["choices"][0]["text"].as_str().unwrap())
                .collect();
            (
                t,
                chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let v = r.json();
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, want, "full {full:?}, stop {stop:?}");
        assert_eq!(reason, "stop");
    }
}

#[test]
fn concurrent_generations_each_get_their_own_seeded_answer() {
    let jobs: Vec<(String, u64)> = (0..4).map(|i| (format!("Story {i}:"), i as u64)).collect();
    let answers: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> =
            jobs.iter()
                .map(|(p, seed)| {
                    s.spawn(move || {
                    post(lm_addr(), "/v1/completions",
                        &json!({"prompt": p, "max_tokens": 4, "temperature": 1.0, "seed": seed}))
                })
                })
                .collect();
        hs.into_iter().map(|h| h.join().unwrap().json()).collect()
    });
    for ((p, seed), a) in jobs.iter().zip(&answers) {
        let (want, _) = generate_direct(p, &GenerationConfig::sampling(4, 1.0, *seed));
        assert_eq!(a["choices"][0]["text"], want.as_str(), "{p}");
    }
}

/// Generations that overlap in time are decoded together (continuous batching), and each
/// still gets exactly its own seeded answer; with batching off every step carries one.
#[test]
fn overlapping_generations_are_decoded_together_and_get_their_own_answers() {
    let jobs: Vec<(String, u64)> = (0..6).map(|i| (format!("Tale {i}:"), 10 + i)).collect();
    let wants: Vec<String> = jobs
        .iter()
        .map(|(p, seed)| generate_direct(p, &GenerationConfig::sampling(6, 1.0, *seed)).0)
        .collect();
    for batching in [true, false] {
        let LoadedModel { info, backend } = load_model(&smollm2_path(), None).unwrap();
        // Slow steps, so that the requests certainly overlap.
        let backend = Box::new(Faulty {
            inner: backend,
            trigger: None,
            delay: Duration::from_millis(40),
        });
        let server =
            BackgroundServer::start(base().batching(batching), LoadedModel { info, backend })
                .unwrap();
        let addr = server.local_addr();
        let answers: Vec<Value> = std::thread::scope(|s| {
            let hs: Vec<_> = jobs
                .iter()
                .map(|(p, seed)| {
                    let body =
                        json!({"prompt": p, "max_tokens": 6, "temperature": 1.0, "seed": seed});
                    s.spawn(move || post(addr, "/v1/completions", &body))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().json()).collect()
        });
        let mut tokens = 0.0;
        for ((a, want), (p, _)) in answers.iter().zip(&wants).zip(&jobs) {
            assert_eq!(
                a["choices"][0]["text"],
                want.as_str(),
                "{p}, batching {batching}"
            );
            tokens += a["usage"]["completion_tokens"].as_f64().unwrap();
        }
        let steps = metric(addr, "kiln_decode_batch_size_count ");
        let alone = metric(addr, "kiln_decode_batch_size_bucket{le=\"1\"} ");
        assert_eq!(metric(addr, "kiln_decode_batch_size_sum "), tokens);
        assert_eq!(metric(addr, "kiln_generated_tokens_total "), tokens);
        if batching {
            assert!(
                alone < steps && steps < tokens,
                "batching on: {steps} steps ({alone} of one generation) for {tokens} tokens"
            );
        } else {
            assert_eq!((alone, steps), (tokens, tokens), "batching off");
        }
        server.stop().unwrap();
    }
}

// ------------------------------------------------------------------ info endpoints

#[test]
fn health_models_and_metrics() {
    for (addr, kind) in [
        (clf(), "classifier"),
        (embedder(), "embedder"),
        (lm_addr(), "causal-lm"),
    ] {
        let r = get(addr, "/health");
        assert_eq!(r.status, 200);
        assert_eq!(
            (r.json()["status"].as_str(), r.json()["kind"].as_str()),
            (Some("ok"), Some(kind))
        );
        let v = get(addr, "/v1/models").json();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["object"], "model");
        assert_eq!(v["data"][0]["id"], r.json()["model"]);
    }
    assert_eq!(
        get(clf(), "/v1/models").json()["data"][0]["labels"],
        json!(["negative", "positive"])
    );
    post(clf(), "/v1/classify", &json!({"input": "fine"}));
    post(clf(), "/v1/classify", &json!({"input": 1}));
    let r = get(clf(), "/metrics");
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert!(
        metric(
            clf(),
            "kiln_requests_total{endpoint=\"/v1/classify\",status=\"200\"} "
        ) >= 1.0
    );
    assert!(
        metric(
            clf(),
            "kiln_requests_total{endpoint=\"/v1/classify\",status=\"400\"} "
        ) >= 1.0
    );
    assert!(
        metric(
            clf(),
            "kiln_request_duration_seconds_count{endpoint=\"/v1/classify\"} "
        ) >= 2.0
    );
    assert!(metric(clf(), "kiln_batch_size_bucket{le=\"+Inf\"} ") >= 1.0);
    assert_eq!(metric(clf(), "kiln_queue_depth "), 0.0);
    assert_eq!(metric(clf(), "kiln_queue_capacity "), 256.0);
    post(
        lm_addr(),
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0}),
    );
    assert!(metric(lm_addr(), "kiln_generated_tokens_total ") >= 1.0);
    assert!(metric(lm_addr(), "kiln_generation_seconds_total ") > 0.0);
}

// ------------------------------------------------------------------ error paths

#[test]
fn every_bad_request_is_a_json_4xx_naming_the_field() {
    let c = clf();
    let raw = |addr, path, body: &[u8]| request(addr, "POST", path, body);
    assert_error(
        &raw(c, "/v1/classify", b"{\"input\": "),
        400,
        None,
        "malformed JSON",
    );
    assert_error(&raw(c, "/v1/classify", b""), 400, None, "empty");
    assert_error(
        &raw(c, "/v1/classify", b"[\"a\"]"),
        400,
        None,
        "JSON object",
    );
    assert_error(
        &raw(c, "/v1/classify", b"\xff\xfe"),
        400,
        None,
        "malformed JSON",
    );
    assert_error(
        &post(c, "/v1/classify", &json!({})),
        400,
        Some("input"),
        "missing field",
    );
    assert_error(
        &post(c, "/v1/classify", &json!({"input": 5})),
        400,
        Some("input"),
        "string or an array",
    );
    assert_error(
        &post(c, "/v1/classify", &json!({"input": ""})),
        400,
        Some("input"),
        "empty",
    );
    assert_error(
        &post(c, "/v1/classify", &json!({"input": []})),
        400,
        Some("input"),
        "empty",
    );
    assert_error(
        &post(c, "/v1/classify", &json!({"input": ["a", 3]})),
        400,
        Some("input[1]"),
        "must be a string",
    );
    assert_error(
        &post(c, "/v1/classify", &json!({"input": "a", "top_k": 1})),
        400,
        Some("top_k"),
        "unknown field",
    );
    assert_error(
        &post(c, "/v1/classify", &json!({"input": "a", "model": 3})),
        400,
        Some("model"),
        "invalid type",
    );
    assert_error(
        &post(c, "/v1/classify", &json!({"input": "a", "model": "gpt-4"})),
        404,
        Some("model"),
        "not served",
    );
    assert_error(
        &post(c, "/v1/classify", &json!({"input": vec!["a"; 9]})),
        413,
        Some("input"),
        "limit of 8",
    );
    let long = "word ".repeat(40);
    assert_error(
        &post(c, "/v1/classify", &json!({"input": ["ok", long]})),
        422,
        Some("input[1]"),
        "limit of 32",
    );
    let huge = format!("{{\"input\": \"{}\"}}", "a".repeat(70 * 1024));
    assert_error(
        &raw(c, "/v1/classify", huge.as_bytes()),
        413,
        None,
        "limit of 65536 bytes",
    );
    assert_error(
        &post(c, "/v1/completions", &json!({"prompt": "a"})),
        400,
        None,
        "causal language model",
    );
    assert_error(
        &post(c, "/v1/chat/completions", &json!({"messages": []})),
        400,
        None,
        "causal language model",
    );
    assert_error(&get(c, "/v1/nothing"), 404, None, "no route");
    assert_error(&get(c, "/v1/classify"), 405, None, "does not take GET");

    let e = embedder();
    assert_error(
        &post(e, "/v1/classify", &json!({"input": "a"})),
        400,
        None,
        "needs a classifier",
    );
    assert_error(
        &post(
            e,
            "/v1/embeddings",
            &json!({"input": "a", "encoding_format": "hex"}),
        ),
        400,
        Some("encoding_format"),
        "float",
    );
    assert_error(
        &post(e, "/v1/embeddings", &json!({"input": null})),
        400,
        Some("input"),
        "got null",
    );

    let l = lm_addr();
    assert_error(
        &post(l, "/v1/classify", &json!({"input": "a"})),
        400,
        None,
        "needs a classifier",
    );
    assert_error(
        &post(l, "/v1/embeddings", &json!({"input": "a"})),
        400,
        None,
        "BERT encoder",
    );
    let p = |extra: Value| {
        let mut b = json!({"prompt": "Hello"});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        post(l, "/v1/completions", &b)
    };
    assert_error(&p(json!({"top_p": 7})), 400, Some("top_p"), "(0, 1]");
    assert_error(&p(json!({"top_p": 0})), 400, Some("top_p"), "(0, 1]");
    assert_error(
        &p(json!({"temperature": -1})),
        400,
        Some("temperature"),
        "≥ 0",
    );
    assert_error(
        &p(json!({"max_tokens": -5})),
        400,
        Some("max_tokens"),
        "at least 1",
    );
    assert_error(
        &p(json!({"max_tokens": 0})),
        400,
        Some("max_tokens"),
        "at least 1",
    );
    assert_error(
        &p(json!({"max_tokens": 1000})),
        422,
        Some("max_tokens"),
        "limit of 8",
    );
    assert_error(
        &p(json!({"max_tokens": "many"})),
        400,
        Some("max_tokens"),
        "invalid type",
    );
    assert_error(&p(json!({"top_k": 0})), 400, Some("top_k"), "at least 1");
    assert_error(&p(json!({"seed": -1})), 400, Some("seed"), "invalid value");
    assert_error(
        &p(json!({"stream": "yes"})),
        400,
        Some("stream"),
        "invalid type",
    );
    assert_error(&p(json!({"stop": 5})), 400, Some("stop"), "string");
    assert_error(&p(json!({"n": 3})), 400, Some("n"), "must be 1");
    assert_error(
        &p(json!({"repetition_penalty": -1})),
        400,
        Some("repetition_penalty"),
        "> 0",
    );
    assert_error(
        &p(json!({"logit_bias": {}})),
        400,
        Some("logit_bias"),
        "unknown field",
    );
    assert_error(
        &post(l, "/v1/completions", &json!({"prompt": 3})),
        400,
        Some("prompt"),
        "must be a string",
    );
    assert_error(
        &post(l, "/v1/completions", &json!({"prompt": ""})),
        400,
        Some("prompt"),
        "empty",
    );
    let long = "hello ".repeat(9000);
    assert_error(
        &post(
            l,
            "/v1/completions",
            &json!({"prompt": long, "max_tokens": 1}),
        ),
        422,
        Some("prompt"),
        "positions",
    );
    let chat = |m: Value| post(l, "/v1/chat/completions", &json!({"messages": m}));
    assert_error(&chat(json!([])), 400, Some("messages"), "empty");
    assert_error(&chat(json!("hi")), 400, Some("messages"), "array");
    assert_error(
        &chat(json!([{"role": "robot", "content": "x"}])),
        400,
        Some("messages[0].role"),
        "system, user or assistant",
    );
    assert_error(
        &chat(json!([{"role": "user"}])),
        400,
        Some("messages[0].content"),
        "missing",
    );
    assert_error(
        &post(l, "/v1/chat/completions", &json!({"prompt": "x"})),
        400,
        Some("prompt"),
        "unknown field",
    );
}

// ------------------------------------------------------------------ failures inside compute

/// Wraps a real backend: classify panics when a row holds `trigger`; classify and every
/// generation step sleep `delay` first.
struct Faulty {
    inner: Box<dyn Backend>,
    trigger: Option<u32>,
    delay: Duration,
}

impl Backend for Faulty {
    fn classify(&mut self, rows: &[&[u32]]) -> Result<Vec<Vec<f64>>, String> {
        std::thread::sleep(self.delay);
        if let Some(t) = self.trigger {
            if rows.iter().any(|r| r.contains(&t)) {
                panic!("boom: token {t} in the batch");
            }
        }
        self.inner.classify(rows)
    }

    fn embed(&mut self, rows: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        self.inner.embed(rows)
    }

    fn start(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        config: &GenerationConfig,
    ) -> Result<(), String> {
        self.inner.start(id, prompt, config)
    }

    fn step(&mut self, ids: &[SeqId]) -> Result<Vec<(u32, Option<StopReason>)>, String> {
        std::thread::sleep(self.delay);
        self.inner.step(ids)
    }

    fn finish(&mut self, id: SeqId) {
        self.inner.finish(id)
    }
}

fn faulty_classifier(trigger: bool, delay: Duration) -> (LoadedModel, Option<u32>) {
    let LoadedModel { info, backend } = load_model(classifier_dir(), None).unwrap();
    let id = trigger.then(|| {
        info.tokenizer
            .token_to_id("explode")
            .expect("in the vocabulary")
    });
    let backend = Box::new(Faulty {
        inner: backend,
        trigger: id,
        delay,
    });
    (LoadedModel { info, backend }, id)
}

#[test]
fn a_panic_in_compute_is_a_500_and_the_server_keeps_serving() {
    let (model, _) = faulty_classifier(true, Duration::ZERO);
    let server = BackgroundServer::start(base().max_wait_ms(300), model).unwrap();
    let addr = server.local_addr();
    let r = post(addr, "/v1/classify", &json!({"input": "please explode"}));
    assert_error(&r, 500, None, "internal error while classifying: boom");
    let r = post(addr, "/v1/classify", &json!({"input": "calm"}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_classified(&r.json(), &["calm"]);
    // Batched with a panicking request, an innocent one still gets its answer.
    let (bad, good) = std::thread::scope(|s| {
        let b = s.spawn(|| post(addr, "/v1/classify", &json!({"input": ["explode now"]})));
        let g = s.spawn(|| post(addr, "/v1/classify", &json!({"input": ["quiet", "still"]})));
        (b.join().unwrap(), g.join().unwrap())
    });
    assert_eq!(bad.status, 500, "{}", bad.text());
    assert_eq!(good.status, 200, "{}", good.text());
    assert_classified(&good.json(), &["quiet", "still"]);
    assert!(metric(addr, "kiln_panics_total ") >= 2.0);
    server.stop().unwrap();
}

/// A toy language model on MiniLM's tokenizer: emits the ids of "one two three ..." slowly;
/// panics after two tokens when the prompt holds "explode".
struct ToyLm {
    words: Vec<u32>,
    trigger: u32,
    delay: Duration,
    /// Per generation: tokens so far, the budget, and whether it will explode.
    running: HashMap<SeqId, (usize, usize, bool)>,
}

impl Backend for ToyLm {
    fn classify(&mut self, _: &[&[u32]]) -> Result<Vec<Vec<f64>>, String> {
        Err("no".into())
    }

    fn embed(&mut self, _: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        Err("no".into())
    }

    fn start(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        config: &GenerationConfig,
    ) -> Result<(), String> {
        let explodes = prompt.contains(&self.trigger);
        self.running
            .insert(id, (0, config.max_new_tokens, explodes));
        Ok(())
    }

    fn step(&mut self, ids: &[SeqId]) -> Result<Vec<(u32, Option<StopReason>)>, String> {
        std::thread::sleep(self.delay);
        let mut out = Vec::new();
        for id in ids {
            let (done, _, explodes) = self.running.get_mut(id).ok_or("unknown id")?;
            if *done == 2 && *explodes {
                panic!("toy model exploded");
            }
            out.push(self.words[*done % self.words.len()]);
            *done += 1;
        }
        Ok(out
            .into_iter()
            .zip(ids)
            .map(|(w, id)| {
                let (done, budget, _) = self.running[id];
                (w, (done >= budget).then_some(StopReason::MaxTokens))
            })
            .collect())
    }

    fn finish(&mut self, id: SeqId) {
        self.running.remove(&id);
    }
}

fn toy_lm(delay: Duration) -> LoadedModel {
    let tokenizer = Tokenizer::from_file(minilm_dir().unwrap().join("tokenizer.json")).unwrap();
    let id = |w: &str| tokenizer.token_to_id(w).unwrap();
    let backend = ToyLm {
        words: ["one", "two", "three", "four"].map(id).to_vec(),
        trigger: id("explode"),
        delay,
        running: HashMap::new(),
    };
    let info = ModelInfo {
        name: "toy".into(),
        kind: ModelKind::CausalLm,
        tokenizer,
        labels: Vec::new(),
        max_positions: 512,
        chat_template: None,
        stop_tokens: Vec::new(),
    };
    LoadedModel {
        info,
        backend: Box::new(backend),
    }
}

#[test]
fn generation_panics_are_500_before_streaming_and_an_error_event_during_it() {
    let server = BackgroundServer::start(base(), toy_lm(Duration::ZERO)).unwrap();
    let addr = server.local_addr();
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "explode", "max_tokens": 4}),
    );
    assert_error(&r, 500, None, "toy model exploded");
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "explode", "max_tokens": 4, "stream": true}),
    );
    assert_eq!(r.status, 200);
    let data = r.sse_data();
    assert_eq!(data.len(), 4, "{data:?}"); // one, two, the error, [DONE]
    let err: Value = serde_json::from_str(&data[2]).unwrap();
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("toy model exploded"));
    assert_eq!(data[3], "[DONE]");
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 3}),
    );
    assert_eq!(r.json()["choices"][0]["text"], "one two three");
    assert_error(
        &post(
            addr,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}]}),
        ),
        400,
        None,
        "chat template",
    );
    server.stop().unwrap();
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let (model, _) = faulty_classifier(false, Duration::from_millis(400));
    let config = base().queue(1).max_batch(1).batching(false);
    let server = BackgroundServer::start(config, model).unwrap();
    let addr = server.local_addr();
    let answers: Vec<Resp> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                s.spawn(move || post(addr, "/v1/classify", &json!({"input": format!("t{i}")})))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&Resp> = answers.iter().filter(|r| r.status == 503).collect();
    assert_eq!(
        ok + busy.len(),
        8,
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(ok >= 1 && !busy.is_empty(), "{ok} ok, {} busy", busy.len());
    for r in busy {
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_error(r, 503, None, "queue is full");
    }
    assert_eq!(
        post(addr, "/v1/classify", &json!({"input": "later"})).status,
        200
    );
    server.stop().unwrap();
}

#[test]
fn graceful_shutdown_finishes_the_stream_in_flight() {
    let server = BackgroundServer::start(base(), toy_lm(Duration::from_millis(60))).unwrap();
    let addr = server.local_addr();
    let client = std::thread::spawn(move || {
        post(
            addr,
            "/v1/completions",
            &json!({"prompt": "hi", "max_tokens": 8, "stream": true}),
        )
    });
    std::thread::sleep(Duration::from_millis(150));
    server.stop().unwrap();
    let r = client.join().unwrap();
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    assert_eq!(
        data.len(),
        8 + 2,
        "8 tokens, the final chunk and [DONE]: {data:?}"
    );
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening after stop"
    );
}

#[test]
fn load_errors_name_the_path() {
    let e = load_model(std::path::Path::new("/no/such/model"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/no/such/model") && e.contains("no such file"),
        "{e}"
    );
    let dir = std::env::temp_dir().join(format!("kiln-serve-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "t5"}"#).unwrap();
    let e = load_model(&dir, None).unwrap_err().to_string();
    assert!(
        e.contains("cannot tell what to serve") && e.contains("t5"),
        "{e}"
    );
    std::fs::write(dir.join("weights.bin"), b"nope").unwrap();
    let e = load_model(&dir.join("weights.bin"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("GGUF magic"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

// ------------------------------------------------------------------ fuzzing

const ENDPOINTS: [&str; 4] = [
    "/v1/classify",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/chat/completions",
];
const KEYS: [&str; 12] = [
    "input",
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "encoding_format",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-10.0f64..10.0).prop_map(Value::from),
        "[a-z ]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec(("[a-z]{1,6}", inner), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let object = prop::collection::vec((prop::sample::select(KEYS.to_vec()), json_value()), 0..5)
        .prop_map(|kv| {
            let o: serde_json::Map<String, Value> =
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            Value::Object(o).to_string().into_bytes()
        });
    // Small generations only: max_tokens over 8 is refused by the LM server anyway.
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        object,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bodies_get_2xx_or_4xx_and_the_servers_live_on(
        server in 0usize..3,
        endpoint in prop::sample::select(ENDPOINTS.to_vec()),
        body in body(),
    ) {
        let addr = [clf(), embedder(), lm_addr()][server];
        let r = request(addr, "POST", endpoint, &body);
        prop_assert!((200..500).contains(&r.status), "{} {}: {}", r.status, endpoint, r.text());
        if r.status >= 400 {
            let v: Value = serde_json::from_slice(&r.body).expect("JSON error body");
            prop_assert!(v["error"]["message"].is_string());
        }
        prop_assert_eq!(get(addr, "/health").status, 200);
    }
}
