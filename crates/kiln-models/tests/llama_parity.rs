//! Parity of kiln's Llama with `transformers` on the real SmolLM2-135M-Instruct GGUF (Q4_1),
//! on fixtures written by `scripts/make_llama_fixtures.py` (transformers dequantises the file
//! and runs in f32). The GGUF's own tokenizer must give the reference ids; logits must agree
//! within 1e-3 with f32 activations; greedy decoding must continue "The capital of France is"
//! with " Paris".

use kiln_core::{DType, Tensor};
use kiln_io::{GgufFile, SafetensorsFile};
use kiln_models::checkpoint::fetch_model;
use kiln_models::{
    generate, tokenizer_from_gguf, GenerationConfig, KvCache, LlamaForCausalLM, QuantActivations,
};
use kiln_nn::ModuleExt;
use std::path::PathBuf;
use std::sync::OnceLock;

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn gguf_path() -> PathBuf {
    fetch_model("smollm2", "smollm2", &[GGUF])
        .expect("SmolLM2 GGUF")
        .join(GGUF)
}

fn reference() -> &'static SafetensorsFile {
    static REF: OnceLock<SafetensorsFile> = OnceLock::new();
    REF.get_or_init(|| {
        let p = format!(
            "{}/tests/fixtures/llama/reference.safetensors",
            env!("CARGO_MANIFEST_DIR")
        );
        SafetensorsFile::open(p).expect("reference fixture")
    })
}

fn ref_tensor(name: &str) -> Tensor {
    reference().tensor(name).expect(name)
}

fn prompts() -> Vec<String> {
    let p = format!(
        "{}/tests/fixtures/llama/prompts.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    a.to_dtype(DType::F64)
        .to_vec::<f64>()
        .iter()
        .zip(b.to_dtype(DType::F64).to_vec::<f64>())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The reference ids of prompt `i`.
fn ids(i: usize) -> Vec<u32> {
    ref_tensor(&format!("ids_{i}"))
        .to_vec::<i64>()
        .iter()
        .map(|&v| v as u32)
        .collect()
}

/// Logits of the full prompt `[len, vocab]`.
fn logits(model: &LlamaForCausalLM, ids: &[u32]) -> Tensor {
    let t = Tensor::from_vec(ids.iter().map(|&v| v as i64).collect(), [1, ids.len()]);
    let v = model.config.vocab_size;
    kiln_core::with_no_grad(|| model.forward_with_cache(&t, None)).reshape([ids.len(), v])
}

#[test]
fn gguf_tokenizer_gives_the_reference_ids() {
    let file = GgufFile::open(gguf_path()).unwrap();
    let (tok, template) = tokenizer_from_gguf(&file).unwrap();
    for (i, prompt) in prompts().iter().enumerate() {
        let enc = tok.encode(prompt, false).unwrap();
        assert_eq!(enc.ids, ids(i), "prompt {prompt:?}");
    }
    let template = template.expect("SmolLM2 carries a chat template");
    let text = template
        .render(&[kiln_data::ChatMessage::user("Hi")], true)
        .unwrap();
    assert!(
        text.contains("<|im_start|>user\nHi<|im_end|>")
            && text.ends_with("<|im_start|>assistant\n"),
        "{text:?}"
    );
}

#[test]
fn dequantised_model_matches_transformers_and_answers_paris() {
    let model = LlamaForCausalLM::from_gguf(gguf_path(), None).unwrap();
    assert_eq!(model.config.num_hidden_layers, 30);
    assert_eq!(model.config.num_key_value_heads, 3);
    // Every weight is a trainable parameter in the dense model (tied head: no lm_head).
    assert_eq!(model.num_parameters(), 134_515_008);
    let sampled = ref_tensor("sampled_ids");
    let mut worst = 0f64;
    for i in 0..prompts().len() {
        let ids = ids(i);
        let got = logits(&model, &ids);
        let last = got
            .narrow(0, ids.len() - 1, 1)
            .reshape([model.config.vocab_size]);
        worst = worst.max(max_abs_diff(
            &last,
            &ref_tensor(&format!("last_logits_{i}")),
        ));
        let at_sampled = got.index_select(1, &sampled);
        worst = worst.max(max_abs_diff(
            &at_sampled,
            &ref_tensor(&format!("logits_{i}")),
        ));
    }
    eprintln!("llama parity (f32 activations): max abs logit diff {worst:.3e}");
    assert!(worst <= 1e-3, "max abs logit diff {worst}");

    // Greedy decoding with the cache equals transformers' continuation.
    for i in 0..prompts().len() {
        let want: Vec<u32> = ref_tensor(&format!("greedy_{i}"))
            .to_vec::<i64>()
            .iter()
            .map(|&v| v as u32)
            .collect();
        let g = generate(
            &model,
            &ids(i),
            &GenerationConfig::greedy(want.len()),
            |_| true,
        )
        .unwrap();
        assert_eq!(g.tokens, want, "prompt {i}");
    }
    let file = GgufFile::open(gguf_path()).unwrap();
    let (tok, _) = tokenizer_from_gguf(&file).unwrap();
    let g = generate(&model, &ids(0), &GenerationConfig::greedy(2), |_| true).unwrap();
    let text = tok.decode(&g.tokens, true).unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    let model = LlamaForCausalLM::from_gguf(gguf_path(), Some(QuantActivations::F32)).unwrap();
    let ids = ids(1);
    let full = logits(&model, &ids);
    // Prefix in one chunk, then a chunk of 2 (masked), then one token at a time.
    let mut cache = KvCache::new();
    let run = |part: &[u32], cache: &mut KvCache| {
        let t = Tensor::from_vec(part.iter().map(|&v| v as i64).collect(), [1, part.len()]);
        kiln_core::with_no_grad(|| model.forward_with_cache(&t, Some(cache)))
            .reshape([part.len(), model.config.vocab_size])
    };
    let mut pieces = vec![run(&ids[..2], &mut cache), run(&ids[2..4], &mut cache)];
    for k in 4..ids.len() {
        pieces.push(run(&ids[k..k + 1], &mut cache));
    }
    assert_eq!(cache.len(), ids.len());
    let stepped = Tensor::cat(&pieces, 0);
    let d = max_abs_diff(&stepped, &full);
    assert!(d < 1e-3, "cache vs full forward: {d}");
}

#[test]
fn quantised_model_agrees_with_the_reference() {
    for act in [QuantActivations::F32, QuantActivations::Q8] {
        let model = LlamaForCausalLM::from_gguf(gguf_path(), Some(act)).unwrap();
        // Quantised matrices are frozen: only the norms are parameters.
        assert_eq!(model.num_parameters(), 576 * (2 * 30 + 1));
        let v = model.config.vocab_size;
        let top = |t: &Tensor| t.argmax(0, false).to_vec::<i64>()[0];
        let mut worst = 0f64;
        for i in 0..prompts().len() {
            let ids = ids(i);
            let got = logits(&model, &ids);
            let last = got.narrow(0, ids.len() - 1, 1).reshape([v]);
            let want = ref_tensor(&format!("last_logits_{i}"));
            worst = worst.max(max_abs_diff(&last, &want));
            assert_eq!(
                top(&last),
                top(&want),
                "{act:?}, prompt {i}: top-1 token differs"
            );
        }
        eprintln!(
            "llama {act:?}: max abs last-logit diff {worst:.3e}; top-1 equal on every prompt"
        );
        // f32 activations: rounding only. 8-bit activations: an approximation (logits span
        // about ±20); the bound catches a broken kernel, the top-1 check the behaviour.
        let bound = if act == QuantActivations::F32 {
            1e-3
        } else {
            2.0
        };
        assert!(worst <= bound, "{act:?}: max abs diff {worst}");
    }
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("kiln-llama-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("x.gguf");
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00").unwrap();
    let e = LlamaForCausalLM::from_gguf(&p, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.gguf"), "{e}");
    let e = LlamaForCausalLM::from_gguf(dir.join("missing.gguf"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.gguf"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
