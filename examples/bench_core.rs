//! Core-op timings as one JSON object on stdout, for `scripts/bench_vs_torch.py`.
//!
//! `cargo run --release --example bench_core -- [--reps N] [--threads 1,2] [--quick] [--only NAME]`
//!
//! `--only` keeps the workloads whose name contains NAME (e.g. `--only conv2d`).
//!
//! Workloads (the names the script matches against PyTorch):
//! - `matmul_f32_1024`, `matmul_f32_2048`: square f32 products (flops = 2·n³);
//! - `add_f32_4_recorded`: `a + b` on 4-element tensors with `a` requiring grad — the fixed cost
//!   of one op (kernel, allocation, graph node), timed per op over a loop;
//! - `add_f32_16M`, `exp_f32_16M`, `gelu_f32_16M`: elementwise add, exp and GELU (erf form) of
//!   2^24 f32;
//! - `mlp_adam_step_b64`: one training step of an MLP 784-256-256-10 (ReLU) on a batch of 64:
//!   forward, cross-entropy, backward, Adam update, zero_grad;
//! - `conv2d_1x32_28_b64`, `conv2d_32x64_14_b64`: the two convolutions of the Fashion-MNIST CNN
//!   (3×3, padding 1, with bias) on a batch of 64, forward and backward of the output's sum:
//!   1→32 channels at 28×28 (weight and bias grads), then 32→64 at 14×14 (input, weight and bias
//!   grads, as for a hidden layer).
//!
//! Each is warmed up, then timed `reps` times; the median is reported.

use kiln::core::parallel::{max_threads, set_num_threads};
use kiln::prelude::*;
use std::hint::black_box;
use std::time::Instant;

struct Result {
    name: String,
    threads: usize,
    median_s: f64,
    min_s: f64,
    reps: usize,
    flops: Option<f64>,
}

/// Median and minimum seconds of `reps` timed calls of `f` (after `warmup` untimed calls),
/// each call counting as `per_call` operations.
fn time(warmup: usize, reps: usize, per_call: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..warmup {
        f();
    }
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() / per_call as f64
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], times[0])
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut reps = 15usize;
    let mut threads: Vec<usize> = vec![1, 2];
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
            other => panic!("bench_core: unknown argument {other}"),
        }
        i += 1;
    }
    threads.retain(|&t| t >= 1 && t <= max_threads());
    let reps = reps.max(1);
    let mut results = Vec::new();

    let wanted = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));

    let sizes: &[usize] = if quick { &[256, 512] } else { &[1024, 2048] };
    for &n in sizes.iter().filter(|n| wanted(&format!("matmul_f32_{n}"))) {
        let a = Tensor::randn([n, n], 1);
        let b = Tensor::randn([n, n], 2);
        let flops = 2.0 * (n as f64).powi(3);
        // Fewer repetitions of the largest product: each takes a sizeable fraction of a second.
        let reps = if n >= 2048 {
            reps.div_ceil(3).max(3)
        } else {
            reps
        };
        for &t in &threads {
            set_num_threads(t);
            let (median_s, min_s) = time(2, reps, 1, || {
                black_box(a.matmul(&b));
            });
            results.push(Result {
                name: format!("matmul_f32_{n}"),
                threads: t,
                median_s,
                min_s,
                reps,
                flops: Some(flops),
            });
        }
    }

    set_num_threads(1);
    if wanted("add_f32_4_recorded") {
        let a = Tensor::randn([4], 1).requires_grad();
        let b = Tensor::randn([4], 2);
        let inner = if quick { 1_000 } else { 10_000 };
        let (median_s, min_s) = time(2, reps, inner, || {
            for _ in 0..inner {
                black_box(a.add(&b));
            }
        });
        results.push(Result {
            name: "add_f32_4_recorded".into(),
            threads: 1,
            median_s,
            min_s,
            reps,
            flops: None,
        });
    }

    let n = if quick { 1 << 20 } else { 1 << 24 };
    let a = Tensor::randn([n], 1);
    let b = Tensor::randn([n], 2);
    let elementwise: [(&str, &dyn Fn() -> Tensor); 3] = [
        ("add", &|| a.add(&b)),
        ("exp", &|| a.exp()),
        ("gelu", &|| a.gelu()),
    ];
    for (op, f) in elementwise
        .into_iter()
        .filter(|(op, _)| wanted(&format!("{op}_f32_{}M", n >> 20)))
    {
        for &t in &threads {
            set_num_threads(t);
            let (median_s, min_s) = time(2, reps, 1, || {
                black_box(f());
            });
            results.push(Result {
                name: format!("{op}_f32_{}M", n >> 20),
                threads: t,
                median_s,
                min_s,
                reps,
                flops: None,
            });
        }
    }
    if wanted("mlp_adam_step_b64") {
        let mut rng = Rng::new(0);
        let model = seq![
            Linear::new(784, 256, &mut rng),
            Relu,
            Linear::new(256, 256, &mut rng),
            Relu,
            Linear::new(256, 10, &mut rng)
        ];
        let mut opt = Adam::new(model.named_parameters(), 1e-3).expect("adam");
        let x = Tensor::randn([64, 784], 3);
        let y = Tensor::from_vec((0..64).map(|i| (i % 10) as i64).collect(), [64]);
        let inner = if quick { 5 } else { 50 };
        for &t in &threads {
            set_num_threads(t);
            let (median_s, min_s) = time(2, reps, inner, || {
                for _ in 0..inner {
                    let loss = loss::cross_entropy(
                        &model.forward(&x),
                        &y,
                        None,
                        -100,
                        Reduction::Mean,
                        0.0,
                    );
                    loss.backward();
                    opt.step();
                    opt.zero_grad();
                }
            });
            results.push(Result {
                name: "mlp_adam_step_b64".into(),
                threads: t,
                median_s,
                min_s,
                reps,
                flops: None,
            });
        }
    }
    {
        // (name, in channels, out channels, side, input needs a gradient)
        let convs = [
            ("conv2d_1x32_28_b64", 1, 32, 28, false),
            ("conv2d_32x64_14_b64", 32, 64, 14, true),
        ];
        for (name, cin, cout, side, input_grad) in convs.into_iter().filter(|c| wanted(c.0)) {
            let x = Tensor::randn([64, cin, side, side], 4);
            let x = if input_grad { x.requires_grad() } else { x };
            let w = (Tensor::randn([cout, cin, 3, 3], 5) * 0.1).requires_grad();
            let bias = Tensor::zeros([cout]).requires_grad();
            let flops = 3.0 * 2.0 * (64 * cout * side * side * cin * 9) as f64;
            let inner = if quick { 2 } else { 10 };
            for &t in &threads {
                set_num_threads(t);
                let (median_s, min_s) = time(2, reps, inner, || {
                    for _ in 0..inner {
                        let y = x.conv2d(&w, Some(&bias), Conv2dOptions::default().padding(1));
                        y.sum_all().backward();
                        for p in [&x, &w, &bias] {
                            p.zero_grad();
                        }
                    }
                });
                results.push(Result {
                    name: name.into(),
                    threads: t,
                    median_s,
                    min_s,
                    reps,
                    flops: Some(flops),
                });
            }
        }
    }
    set_num_threads(0);

    let entries: Vec<String> = results
        .iter()
        .map(|r| {
            let gflops = r
                .flops
                .map_or("null".to_string(), |f| format!("{:.3}", f / r.median_s / 1e9));
            format!(
                "{{\"name\": \"{}\", \"threads\": {}, \"median_s\": {:e}, \"min_s\": {:e}, \"reps\": {}, \"gflops\": {}}}",
                r.name, r.threads, r.median_s, r.min_s, r.reps, gflops
            )
        })
        .collect();
    println!(
        "{{\"framework\": \"kiln\", \"max_threads\": {}, \"results\": [{}]}}",
        max_threads(),
        entries.join(", ")
    );
}
