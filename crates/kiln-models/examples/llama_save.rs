//! Loads SmolLM2-135M-Instruct from its Q4_1 GGUF file (matrices kept quantised) and writes it
//! with `save_pretrained` to OUT (config.json, generation_config.json, model.safetensors with the
//! dequantised weights, tokenizer.json, tokenizer_config.json, special_tokens_map.json), for
//! `scripts/check_llama_roundtrip.py OUT` to load with transformers.
//!
//! Run: `cargo run --release -p kiln-models --example llama_save -- OUT`

use kiln_models::checkpoint::fetch_model;
use kiln_models::{LlamaForCausalLM, QuantActivations};

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .ok_or("usage: llama_save OUT (the directory to write)")?;
    let gguf = fetch_model("smollm2", "smollm2", &[GGUF])?.join(GGUF);
    let model = LlamaForCausalLM::from_gguf(&gguf, Some(QuantActivations::F32))?;
    model.save_pretrained(&out)?;
    println!("wrote {out}");
    Ok(())
}
