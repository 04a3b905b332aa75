//! Loads the small GPT-2 fixture checkpoint (tests/fixtures/gpt2), attaches the real GPT-2
//! tokenizer files and writes it with `save_pretrained` to OUT (config.json, model.safetensors,
//! vocab.json, merges.txt), for `scripts/check_gpt2_roundtrip.py OUT` to load with transformers.
//!
//! Run: `cargo run -p kiln-models --example gpt2_save -- OUT`

use kiln_models::checkpoint::fetch_model;
use kiln_models::GPT2LMHeadModel;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .ok_or("usage: gpt2_save OUT (the directory to write)")?;
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2");
    let mut model = GPT2LMHeadModel::from_pretrained(&fixture)?;
    let vocab = fetch_model("gpt2-vocab", "gpt2-vocab", &["encoder.json", "vocab.bpe"])?;
    model.set_tokenizer_files(vocab.join("encoder.json"), vocab.join("vocab.bpe"));
    model.save_pretrained(&out)?;
    println!("wrote {out}");
    Ok(())
}
