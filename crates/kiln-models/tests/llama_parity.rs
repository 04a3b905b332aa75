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

#[test]
fn saved_directory_reloads_with_the_same_logits_and_tokenizer() {
    // Save the quantised model (projections are dequantised on the way out), reload it dense
    // from the directory and compare with the dequantised GGUF model.
    let quant = LlamaForCausalLM::from_gguf(gguf_path(), Some(QuantActivations::F32)).unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-llama-save-{}", std::process::id()));
    quant.save_pretrained(&dir).unwrap();
    drop(quant);
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} not written");
    }
    let saved = SafetensorsFile::open(dir.join("model.safetensors")).unwrap();
    let names = saved.names();
    assert!(
        !names.contains(&"lm_head.weight"),
        "tied head must not be stored"
    );
    assert_eq!(names.len(), 2 + 9 * 30);
    let reloaded = LlamaForCausalLM::from_pretrained(&dir).unwrap();
    let dense = LlamaForCausalLM::from_gguf(gguf_path(), None).unwrap();
    assert_eq!(reloaded.config, dense.config);
    assert_eq!(reloaded.num_parameters(), dense.num_parameters());
    let mut worst = 0f64;
    for i in 0..prompts().len() {
        let ids = ids(i);
        worst = worst.max(max_abs_diff(
            &logits(&reloaded, &ids),
            &logits(&dense, &ids),
        ));
    }
    eprintln!("llama save/reload vs GGUF: max abs logit diff {worst:.3e}");
    assert!(worst <= 1e-4, "max abs logit diff {worst}");

    // The tokenizer comes back with the same ids, special tokens and chat template.
    let (orig, orig_template) = tokenizer_from_gguf(&GgufFile::open(gguf_path()).unwrap()).unwrap();
    let tok = reloaded.tokenizer.as_ref().expect("tokenizer saved");
    assert_eq!(tok.tokenizer.special_tokens(), orig.special_tokens());
    for (i, prompt) in prompts().iter().enumerate() {
        assert_eq!(tok.tokenizer.encode(prompt, false).unwrap().ids, ids(i));
        assert_eq!(
            tok.tokenizer.encode(prompt, true).unwrap().ids,
            orig.encode(prompt, true).unwrap().ids
        );
    }
    let chat = [
        kiln_data::ChatMessage::system("Be brief."),
        kiln_data::ChatMessage::user("Hi <|im_end|> there"),
    ];
    let rendered = tok
        .template()
        .unwrap()
        .unwrap()
        .render(&chat, true)
        .unwrap();
    assert_eq!(
        rendered,
        orig_template.unwrap().render(&chat, true).unwrap()
    );
    assert_eq!(
        tok.tokenizer.encode(&rendered, false).unwrap().ids,
        orig.encode(&rendered, false).unwrap().ids
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["torch_dtype"], "float32");
    assert_eq!(config["eos_token_id"], orig.eos_id().unwrap());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn pretrained_directory_errors_name_file_and_field() {
    let dir = std::env::temp_dir().join(format!("kiln-llama-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = LlamaForCausalLM::from_pretrained(&dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json") && e.contains("not found"), "{e}");
    let cfg = r#"{"model_type": "llama", "vocab_size": 16, "hidden_size": 8,
        "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}"#;
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let e = LlamaForCausalLM::from_pretrained(&dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json: field `rope_scaling`") && e.contains("\"yarn\""),
        "{e}"
    );
    std::fs::write(dir.join("config.json"), cfg.replace("yarn", "linear")).unwrap();
    let e = LlamaForCausalLM::from_pretrained(&dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );
    // A checkpoint missing a tensor, or with an extra one, names it.
    let config = kiln_models::LlamaConfig::from_hf(
        &kiln_models::HfConfig::from_file(dir.join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config.rope_scaling,
        Some(kiln_models::RopeScaling::Linear { factor: 2.0 })
    );
    let model = LlamaForCausalLM::new(config.clone(), &mut kiln_core::Rng::new(1));
    let full = model.hf_state_dict();
    let mut sd = kiln_nn::StateDict::new();
    for (k, t) in full.iter().filter(|(k, _)| *k != "model.norm.weight") {
        sd.insert(k, t.clone());
    }
    let p = dir.join("model.safetensors");
    let e = LlamaForCausalLM::from_hf_state_dict(config.clone(), &sd, &p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`model.norm.weight` is missing"), "{e}");
    let mut sd = full.clone();
    sd.insert("extra.weight", Tensor::zeros([2]));
    let e = LlamaForCausalLM::from_hf_state_dict(config, &sd, &p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 unexpected tensors: extra.weight"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn random_untied_model_round_trips_through_a_directory() {
    let config = kiln_models::LlamaConfig::from_hf(
        &kiln_models::HfConfig::from_json_str(
            r#"{"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "rope_theta": 500000.0, "tie_word_embeddings": false,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}"#,
            "<test>",
        )
        .unwrap(),
    )
    .unwrap();
    let model = LlamaForCausalLM::new(config, &mut kiln_core::Rng::new(7));
    let dir = std::env::temp_dir().join(format!("kiln-llama-untied-{}", std::process::id()));
    model.save_pretrained(&dir).unwrap();
    assert!(!dir.join("tokenizer.json").exists());
    let back = LlamaForCausalLM::from_pretrained(&dir).unwrap();
    assert_eq!(back.config, model.config);
    assert!(back.lm_head.is_some() && back.tokenizer.is_none());
    let ids = [3u32, 1, 4, 1, 5, 9, 2, 6];
    let d = max_abs_diff(&logits(&back, &ids), &logits(&model, &ids));
    assert_eq!(d, 0.0, "reloaded logits differ by {d}");
    std::fs::remove_dir_all(&dir).ok();
}
