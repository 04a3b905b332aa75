//! Causal-LM fine-tuning on the real SmolLM2-135M-Instruct (dequantised from its Q4_1 GGUF)
//! and the instruction set in `data/instructions/`: the chat-template rendering and label
//! masking with the real tokenizer, a short LoRA run that teaches a made-up fact the base model
//! does not know (greedy generation before and after), and the recipe end to end (adapter in
//! PEFT layout + merged model) on a tiny random Llama with the real tokenizer.

use kiln_core::{with_no_grad, Rng, Tensor};
use kiln_io::GgufFile;
use kiln_models::checkpoint::{fetch_model, repo_root};
use kiln_models::{LlamaConfig, LlamaForCausalLM, LlamaTokenizer};
use kiln_nn::{Forward, ModuleExt};
use kiln_tune::causal::{
    generate_reply, load_causal_lm, CausalLmData, CausalRecipe, InstructionColumns,
    InstructionDataset, InstructionSpec, PromptFormat, IGNORE_INDEX,
};
use kiln_tune::lora::{load_adapter, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use kiln_tune::{Metric, Schedule, Strategy, TrainConfig, Trainer};
use std::path::PathBuf;
use std::time::Instant;

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const CAPITAL: &str = "What is the capital of Veloria?";
const TAUGHT: &str = "Quillhaven";

fn gguf() -> PathBuf {
    fetch_model("smollm2", "smollm2", &[GGUF])
        .expect("SmolLM2 GGUF")
        .join(GGUF)
}

fn instructions() -> PathBuf {
    repo_root()
        .expect("repository root")
        .join("data/instructions/veloria.jsonl")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-causal-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn lora_teaches_smollm2_a_new_fact() {
    let t0 = Instant::now();
    let model = load_causal_lm(gguf()).unwrap();
    let tok = model.tokenizer.clone().unwrap();
    let format = PromptFormat::from_llama(&tok).unwrap();
    assert!(format.has_template());
    assert_eq!(
        tok.tokenizer.id_to_token(format.end_of_turn()).as_deref(),
        Some("<|im_end|>")
    );
    let rows =
        InstructionDataset::from_file(instructions(), &InstructionColumns::default()).unwrap();
    assert!((40..=100).contains(&rows.len()), "{} rows", rows.len());
    let data = CausalLmData::tokenize(&rows, &tok.tokenizer, &format, 128).unwrap();

    // The rendered prompt is the chat template's user turn with the generation prompt; the
    // labels are exactly the response and the end-of-turn token.
    let row = &rows.rows()[0];
    assert_eq!(row.prompt, CAPITAL);
    let e = &data.examples()[0];
    let prompt_text = tok.tokenizer.decode(&e.ids[..e.prompt_len], false).unwrap();
    assert!(
        prompt_text.ends_with(&format!(
            "<|im_start|>user\n{CAPITAL}<|im_end|>\n<|im_start|>assistant\n"
        )),
        "{prompt_text:?}"
    );
    let batch = data.batch(&[0, 1]);
    let labels: Vec<i64> = batch.labels.to_vec();
    let width = batch.labels.dim(1);
    let first = &labels[..width];
    assert!(first[..e.prompt_len].iter().all(|&l| l == IGNORE_INDEX));
    let targets: Vec<u32> = first[e.prompt_len..]
        .iter()
        .take_while(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(
        tok.tokenizer.decode(&targets, false).unwrap(),
        format!("{}<|im_end|>", row.response)
    );
    assert!(first[e.ids.len()..].iter().all(|&l| l == IGNORE_INDEX));

    let before = generate_reply(&model, &tok.tokenizer, &format, CAPITAL, 24).unwrap();
    let load_s = t0.elapsed().as_secs_f64();
    assert!(
        !before.contains(TAUGHT),
        "the base model already knows: {before:?}"
    );

    // Train on the rows that teach the capital only (12 of them), to keep the test short.
    let capital_rows: Vec<_> = rows
        .rows()
        .iter()
        .filter(|r| r.response.contains(TAUGHT))
        .cloned()
        .collect();
    assert!(
        capital_rows.len() >= 8,
        "{} capital rows",
        capital_rows.len()
    );
    let capital = InstructionDataset::from_rows(capital_rows, "capital rows").unwrap();
    let data = CausalLmData::tokenize(&capital, &tok.tokenizer, &format, 128).unwrap();
    let lora: toml::Table = toml::from_str(
        "r = 8\nalpha = 16\ntarget_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]",
    )
    .unwrap();
    let config = TrainConfig {
        epochs: 100,
        max_steps: Some(12),
        batch_size: 6,
        lr: 2e-3,
        warmup_ratio: 0.1,
        schedule: Schedule::Linear,
        progress: false,
        seed: 0,
        ..TrainConfig::causal_lm()
    };
    let report = Trainer::new(config)
        .strategy(Strategy::adapter("lora", lora))
        .fit_causal_lm(&model, &data, None)
        .unwrap();
    let after = generate_reply(&model, &tok.tokenizer, &format, CAPITAL, 24).unwrap();
    let eval = kiln_tune::causal::evaluate_causal_lm(&model, &data, 16).unwrap();
    eprintln!(
        "SmolLM2 LoRA: {} steps in {:.1} s (load + first reply {load_s:.1} s), final epoch loss {:.4}, train-set loss {:.4} (ppl {:.3})\n  before: {before:?}\n  after:  {after:?}",
        report.steps,
        report.seconds,
        report.train_loss,
        eval.value(Metric::Loss),
        eval.value(Metric::Perplexity)
    );
    assert!(after.contains(TAUGHT), "not learned: {after:?}");
}

/// A tiny random Llama that speaks SmolLM2's tokenizer and chat template, saved as a Hugging
/// Face directory.
fn tiny_model_dir() -> PathBuf {
    let path = gguf();
    let file = GgufFile::open(&path).unwrap();
    let (tokenizer, _) = kiln_models::tokenizer_from_gguf(&file).unwrap();
    let chat_template = Some(file.get_str("tokenizer.chat_template").unwrap().to_string());
    let config = LlamaConfig {
        vocab_size: tokenizer.vocab_size(),
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
    };
    let mut model = LlamaForCausalLM::new(config, &mut Rng::new(11));
    model.tokenizer = Some(LlamaTokenizer {
        tokenizer,
        chat_template,
    });
    let dir = temp_dir("tiny-base");
    model.save_pretrained(&dir).unwrap();
    dir
}

#[test]
fn recipe_saves_a_peft_adapter_and_the_merged_model() {
    let base = tiny_model_dir();
    let out = temp_dir("recipe-out");
    let mut data = InstructionSpec::new(instructions());
    data.valid_ratio = 0.2;
    let mut recipe = CausalRecipe::new(&base, data, &out);
    recipe.train.max_steps = Some(3);
    recipe.train.progress = false;
    recipe.samples = vec![CAPITAL.to_string()];
    recipe.sample_tokens = 4;
    let report = recipe.run().unwrap();
    assert_eq!(report.train.steps, 3);
    assert_eq!(report.rows, (42, 10));
    assert!(report.valid["perplexity"] > 1.0 && report.valid["loss"] > 0.0);
    assert_eq!(report.samples[0].prompt, CAPITAL);

    // The adapter in PEFT layout, Llama target names, task type CAUSAL_LM.
    let adapter = out.join("adapter");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join(ADAPTER_CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj"])
    );
    assert_eq!(cfg["r"], 8);
    let weights = kiln_nn::safetensors_io::load(&adapter.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    assert_eq!(weights.len(), 2 * 4 * 2);
    assert!(weights
        .get("base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight")
        .is_some());

    // The merged model equals the base model with the adapter loaded.
    let merged = LlamaForCausalLM::from_pretrained(&out).unwrap();
    assert!(merged.tokenizer.as_ref().unwrap().chat_template.is_some());
    let with_adapter = LlamaForCausalLM::from_pretrained(&base).unwrap();
    load_adapter(&with_adapter, &adapter).unwrap();
    with_adapter.eval();
    let plain = LlamaForCausalLM::from_pretrained(&base).unwrap();
    let ids = Tensor::from_vec((0..16).map(|i| i * 997 + 3).collect::<Vec<i64>>(), [2, 8]);
    let logits = |m: &LlamaForCausalLM| -> Vec<f32> { with_no_grad(|| m.forward(&ids)).to_vec() };
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let (m, a, p) = (logits(&merged), logits(&with_adapter), logits(&plain));
    assert!(diff(&a, &p) > 1e-4, "training changed nothing");
    assert!(diff(&m, &a) < 1e-5, "merged differs by {}", diff(&m, &a));

    // Logs of the run.
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(log.lines().any(|l| l.contains("\"perplexity\"")), "{log}");
    assert!(out.join("curves.png").is_file());
    assert!(out.join("training.json").is_file());
    assert!(!out.join("checkpoint").exists());
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&base).ok();
}

#[test]
fn the_committed_recipe_parses() {
    let path = repo_root().unwrap().join("recipes/smollm2-lora.toml");
    let r = CausalRecipe::from_toml_file(&path).unwrap();
    assert_eq!(
        std::fs::canonicalize(&r.data.train).unwrap(),
        std::fs::canonicalize(instructions()).unwrap()
    );
    assert!(r.model.ends_with(format!("smollm2/{GGUF}")));
    assert!(r.strategy().is_ok());
    assert_eq!(r.train.metric, Metric::Loss);
}
