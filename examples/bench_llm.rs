//! Prompt-processing and greedy-decode throughput of SmolLM2-135M-Instruct (Q4_1 GGUF) in
//! kiln, for `scripts/bench_vs_torch.py --suite llm`.
//!
//! `cargo run --release --example bench_llm -- [--gguf PATH] [--weights q8|quant|f32]
//!  [--threads N] [--ids 1,2,3 | --prompt-tokens N] [--new-tokens N] [--reps R]`
//!
//! `--weights q8`: quantised matrices with 8-bit activations (llama.cpp's scheme); `quant`:
//! quantised matrices with f32 activations; `f32`: everything dequantised. The prompt is the
//! given token ids (default: `--prompt-tokens` ids `(i * 7919 + 13) % 40000 + 100`). One
//! untimed warm-up, then `--reps` runs, each: the whole prompt through an empty KV cache
//! (logits of the last position), then `--new-tokens` greedy steps of one token each (every
//! step takes the argmax; the end-of-sequence token does not stop it). Prints one JSON object
//! with the medians: `prompt_tok_s`, `decode_tok_s`, and `load_s`.

use kiln::core::parallel::set_num_threads;
use kiln::models::checkpoint::fetch_model;
use kiln::models::{CausalLm, LlamaForCausalLM, QuantActivations};
use std::path::PathBuf;
use std::time::Instant;

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut gguf: Option<PathBuf> = None;
    let mut weights = "q8".to_string();
    let mut threads = 1usize;
    let mut ids: Option<Vec<u32>> = None;
    let mut prompt_tokens = 128usize;
    let mut new_tokens = 64usize;
    let mut reps = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--gguf" => gguf = Some(value()?.into()),
            "--weights" => weights = value()?,
            "--threads" => threads = value()?.parse()?,
            "--ids" => {
                ids = Some(
                    value()?
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()?,
                )
            }
            "--prompt-tokens" => prompt_tokens = value()?.parse()?,
            "--new-tokens" => new_tokens = value()?.parse()?,
            "--reps" => reps = value()?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let quant = match weights.as_str() {
        "q8" => Some(QuantActivations::Q8),
        "quant" => Some(QuantActivations::F32),
        "f32" => None,
        other => return Err(format!("--weights {other}: expected q8, quant or f32").into()),
    };
    let ids = ids.unwrap_or_else(|| {
        (0..prompt_tokens)
            .map(|i| ((i * 7919 + 13) % 40000 + 100) as u32)
            .collect()
    });
    if ids.is_empty() || reps == 0 {
        return Err("the prompt and --reps must not be empty".into());
    }
    set_num_threads(threads);
    let gguf = match gguf {
        Some(p) => p,
        None => fetch_model("smollm2", "smollm2", &[GGUF])?.join(GGUF),
    };
    let t0 = Instant::now();
    let model = LlamaForCausalLM::from_gguf(&gguf, quant)?;
    let load_s = t0.elapsed().as_secs_f64();

    let run = || {
        let mut cache = model.new_cache();
        let t = Instant::now();
        let mut next = argmax(&model.next_logits(&ids, &mut cache));
        let prompt_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut out = Vec::with_capacity(new_tokens);
        for _ in 0..new_tokens {
            out.push(next);
            next = argmax(&model.next_logits(&[next], &mut cache));
        }
        (prompt_s, t.elapsed().as_secs_f64(), out)
    };
    let (_, _, tokens) = run();
    let (mut prompt, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let (p, d, _) = run();
        prompt.push(ids.len() as f64 / p);
        decode.push(new_tokens as f64 / d.max(1e-12));
    }
    println!(
        "{}",
        serde_json::json!({
            "side": "kiln",
            "weights": weights,
            "threads": threads,
            "prompt_tokens": ids.len(),
            "new_tokens": new_tokens,
            "reps": reps,
            "load_s": load_s,
            "prompt_tok_s": median(prompt),
            "decode_tok_s": median(decode),
            "tokens": tokens,
        })
    );
    Ok(())
}
