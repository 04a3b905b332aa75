//! Core-op benchmarks (criterion): f32 matmul at 1 and 2 threads (throughput in FLOP/s: criterion
//! prints it as "elem/s"), small products around the matmul threading thresholds, the per-op
//! overhead of a tiny op that records a graph node, and elementwise add over 16M f32.
//!
//! Run: `cargo bench -p kiln-core --bench core_ops` (filter: `-- matmul`). These measure; they
//! never assert times. `examples/bench_core.rs` runs the same workloads for the comparison
//! with PyTorch (`scripts/bench_vs_torch.py`).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kiln_core::parallel::{max_threads, set_num_threads};
use kiln_core::Tensor;
use std::time::Duration;

/// Thread counts to measure (those the machine's pool allows).
fn thread_counts() -> Vec<usize> {
    [1, 2].into_iter().filter(|&t| t <= max_threads()).collect()
}

fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_f32");
    group.sample_size(10);
    for n in [1024usize, 2048] {
        let a = Tensor::randn([n, n], 1);
        let b = Tensor::randn([n, n], 2);
        // One "element" is one floating-point operation: elem/s reads as FLOP/s.
        group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        group.measurement_time(Duration::from_secs(if n >= 2048 { 12 } else { 4 }));
        for threads in thread_counts() {
            set_num_threads(threads);
            group.bench_function(format!("{n}x{n}x{n}/threads={threads}"), |bench| {
                bench.iter(|| black_box(a.matmul(&b)))
            });
        }
    }
    set_num_threads(0);
    group.finish();
}

/// Products around the threading thresholds of `ops/matmul.rs`: where a second thread starts
/// to pay off, for one product and for a batch of small ones.
fn matmul_small(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_f32_small");
    for (batch, n) in [
        (1usize, 64usize),
        (1, 80),
        (1, 96),
        (1, 128),
        (1, 192),
        (16, 32),
        (64, 32),
    ] {
        let (a, b) = if batch == 1 {
            (Tensor::randn([n, n], 1), Tensor::randn([n, n], 2))
        } else {
            (
                Tensor::randn([batch, n, n], 1),
                Tensor::randn([batch, n, n], 2),
            )
        };
        group.throughput(Throughput::Elements(2 * (batch * n * n * n) as u64));
        for threads in thread_counts() {
            set_num_threads(threads);
            group.bench_function(format!("{batch}x{n}x{n}x{n}/threads={threads}"), |bench| {
                bench.iter(|| black_box(a.matmul(&b)))
            });
        }
    }
    set_num_threads(0);
    group.finish();
}

fn dispatch_overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("tiny_op");
    let a = Tensor::randn([4], 1).requires_grad();
    let b = Tensor::randn([4], 2);
    // Kernel, output allocation and graph-node recording: the fixed cost of every op.
    group.bench_function("add_f32_4/recorded", |bench| {
        bench.iter(|| black_box(a.add(&b)))
    });
    let _guard = kiln_core::no_grad();
    group.bench_function("add_f32_4/no_grad", |bench| {
        bench.iter(|| black_box(a.add(&b)))
    });
    group.finish();
}

fn elementwise(c: &mut Criterion) {
    const N: usize = 1 << 24;
    let mut group = c.benchmark_group("elementwise_f32_16M");
    group.sample_size(20);
    let a = Tensor::randn([N], 1);
    let b = Tensor::randn([N], 2);
    // Two reads and one write of 4 bytes per element.
    group.throughput(Throughput::Bytes(12 * N as u64));
    for threads in thread_counts() {
        set_num_threads(threads);
        group.bench_function(format!("add/threads={threads}"), |bench| {
            bench.iter(|| black_box(a.add(&b)))
        });
        group.bench_function(format!("exp/threads={threads}"), |bench| {
            bench.iter(|| black_box(a.exp()))
        });
        group.bench_function(format!("gelu/threads={threads}"), |bench| {
            bench.iter(|| black_box(a.gelu()))
        });
    }
    set_num_threads(0);
    group.finish();
}

criterion_group!(
    benches,
    matmul,
    matmul_small,
    dispatch_overhead,
    elementwise
);
criterion_main!(benches);
