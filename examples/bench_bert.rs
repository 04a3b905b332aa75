//! MiniLM (all-MiniLM-L6-v2) timings as one JSON object on stdout, for
//! `scripts/bench_vs_torch.py --suite bert`.
//!
//! `cargo run --release --example bench_bert -- [--reps N] [--threads 1,2] [--quick] [--only NAME]`
//!
//! The model is `BertForSequenceClassification` with 2 labels, loaded from
//! `kiln_models::checkpoint::minilm_dir()` (the classifier is freshly initialised, seed 0).
//! Inputs are deterministic token ids (`(7·i + 3·j) mod 30000 + 1000`), no attention mask.
//!
//! Workloads (the names the script matches against PyTorch):
//! - `minilm_fwd_b32_s128`: eval-mode forward of a `[32, 128]` batch with grad mode off
//!   (`sent_per_s` = 32 / median);
//! - `minilm_fwd_b1_s16`: the same for one sentence of 16 tokens (latency);
//! - `minilm_train_step_b16_s128`: one full fine-tuning step in train mode (dropout on):
//!   forward, cross-entropy, backward, AdamW step (lr 2e-5), zero_grad;
//! - `minilm_lora_step_b16_s128`: the same step with LoRA (r 8, alpha 16, on query and value;
//!   the classifier trains too, everything else is frozen), AdamW on the trainable parameters.
//!
//! Each is warmed up, then timed `reps` times; the median is reported, with `peak_live_mb`: the
//! most tensor memory in use at once during the workload (kiln's allocator, by size class).

use kiln::core::alloc::{cache_stats, reset_peak_live_bytes};
use kiln::core::parallel::{max_threads, set_num_threads};
use kiln::models::bert::{BertForSequenceClassification, LoadOptions};
use kiln::prelude::*;
use kiln::tune::lora::{apply_lora, LoraConfig};
use std::hint::black_box;
use std::time::Instant;

struct Result {
    name: String,
    threads: usize,
    median_s: f64,
    min_s: f64,
    reps: usize,
    sentences: usize,
    /// The most tensor memory in use at once (kiln's allocator, size classes) while timed.
    peak_live_bytes: usize,
}

/// Median and minimum seconds of `reps` timed calls of `f` (after `warmup` untimed calls).
fn time(warmup: usize, reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..warmup {
        f();
    }
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], times[0])
}

/// Deterministic `[b, l]` token ids inside MiniLM's vocabulary.
fn ids(b: usize, l: usize) -> Tensor {
    let v: Vec<i64> = (0..b * l)
        .map(|k| ((7 * (k / l) + 3 * (k % l)) % 30000 + 1000) as i64)
        .collect();
    Tensor::from_vec(v, [b, l])
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut reps = 5usize;
    let mut threads: Vec<usize> = vec![2];
    let mut quick = false;
    let mut only: Option<String> = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--reps" => {
                i += 1;
                reps = args[i].parse().expect("--reps takes a number");
            }
            "--threads" => {
                i += 1;
                threads = args[i]
                    .split(',')
                    .map(|t| t.trim().parse().expect("--threads takes e.g. 1,2"))
                    .collect();
            }
            "--quick" => quick = true,
            "--only" => {
                i += 1;
                only = Some(args.get(i).expect("--only takes a name").clone());
            }
            other => panic!("bench_bert: unknown argument {other}"),
        }
        i += 1;
    }
    threads.retain(|&t| t >= 1 && t <= max_threads());
    let reps = if quick { 1 } else { reps.max(1) };
    let warmup = if quick { 1 } else { 2 };
    let wanted = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));

    let dir = kiln::models::checkpoint::minilm_dir().expect("bench_bert: MiniLM checkpoint");
    let (model, _) = BertForSequenceClassification::from_pretrained_with(
        &dir,
        &LoadOptions::default().num_labels(2),
    )
    .expect("bench_bert: loading MiniLM");
    let mut results = Vec::new();

    for (name, b, l) in [
        ("minilm_fwd_b32_s128", 32, 128),
        ("minilm_fwd_b1_s16", 1, 16),
    ] {
        if !wanted(name) {
            continue;
        }
        model.eval();
        let x = ids(b, l);
        for &t in &threads {
            set_num_threads(t);
            reset_peak_live_bytes();
            let (median_s, min_s) = time(warmup, reps, || {
                let _g = no_grad();
                black_box(model.forward(&x, None, None));
            });
            results.push(Result {
                name: name.into(),
                threads: t,
                median_s,
                min_s,
                reps,
                sentences: b,
                peak_live_bytes: cache_stats().peak_live_bytes,
            });
        }
    }

    // Full fine-tuning, then LoRA (r 8, alpha 16 on query/value, the classifier trained too),
    // both with AdamW on the trainable parameters. LoRA comes last: it freezes the base model.
    for name in ["minilm_train_step_b16_s128", "minilm_lora_step_b16_s128"] {
        if !wanted(name) {
            continue;
        }
        if name.contains("lora") {
            let config = LoraConfig::default()
                .r(8)
                .alpha(16.0)
                .target_modules(["query", "value"])
                .modules_to_save(["classifier"]);
            apply_lora(&model, &config).expect("bench_bert: LoRA");
        }
        model.train();
        let (b, l) = (16, 128);
        let x = ids(b, l);
        let y = Tensor::from_vec((0..b).map(|i| (i % 2) as i64).collect(), [b]);
        let trainable: Vec<_> = model
            .named_parameters()
            .into_iter()
            .filter(|(_, p)| p.is_trainable())
            .collect();
        let mut opt = AdamW::new(trainable, 2e-5).expect("bench_bert: AdamW");
        for &t in &threads {
            set_num_threads(t);
            reset_peak_live_bytes();
            let (median_s, min_s) = time(warmup, reps, || {
                let logits = model.forward(&x, None, None);
                let loss = loss::cross_entropy(&logits, &y, None, -100, Reduction::Mean, 0.0);
                loss.backward();
                opt.step();
                opt.zero_grad();
            });
            results.push(Result {
                name: name.into(),
                threads: t,
                median_s,
                min_s,
                reps,
                sentences: b,
                peak_live_bytes: cache_stats().peak_live_bytes,
            });
        }
    }
    set_num_threads(0);

    let entries: Vec<String> = results
        .iter()
        .map(|r| {
            format!(
                "{{\"name\": \"{}\", \"threads\": {}, \"median_s\": {:e}, \"min_s\": {:e}, \"reps\": {}, \"sent_per_s\": {:.3}, \"peak_live_mb\": {:.1}}}",
                r.name,
                r.threads,
                r.median_s,
                r.min_s,
                r.reps,
                r.sentences as f64 / r.median_s,
                r.peak_live_bytes as f64 / 1048576.0
            )
        })
        .collect();
    println!(
        "{{\"framework\": \"kiln\", \"max_threads\": {}, \"results\": [{}]}}",
        max_threads(),
        entries.join(", ")
    );
}
