//! Conv2d benchmarks (criterion), f32: forward + backward (input, weight and bias gradients)
//! on the two convolutions of the Fashion-MNIST CNN, `[64, 1, 28, 28] → 32` and
//! `[64, 32, 14, 14] → 64` channels, 3×3 kernels with padding 1, at 1 and 2 threads.
//!
//! Run: `cargo bench -p kiln-core --bench conv`. These measure; they never assert times.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kiln_core::parallel::{max_threads, set_num_threads};
use kiln_core::{Conv2dOptions, Tensor};

fn conv2d_fwd_bwd(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv2d_f32_fwd_bwd");
    group.sample_size(20);
    for (name, x_shape, w_shape) in [
        (
            "64x1x28x28_to_32_k3p1",
            [64usize, 1, 28, 28],
            [32usize, 1, 3, 3],
        ),
        ("64x32x14x14_to_64_k3p1", [64, 32, 14, 14], [64, 32, 3, 3]),
    ] {
        let x = Tensor::randn(x_shape, 1).requires_grad();
        let w = Tensor::randn(w_shape, 2).mul_scalar(0.1).requires_grad();
        let b = Tensor::randn([w_shape[0]], 3).requires_grad();
        let opts = Conv2dOptions::default().padding(1);
        // Forward MACs ×3 (forward, grad input, grad weight), 2 FLOPs each: elem/s reads as FLOP/s.
        let macs = x_shape[0] * w_shape[0] * x_shape[2] * x_shape[3] * w_shape[1] * 9;
        group.throughput(Throughput::Elements(6 * macs as u64));
        for threads in [1usize, 2].into_iter().filter(|&t| t <= max_threads()) {
            set_num_threads(threads);
            group.bench_function(format!("{name}/threads={threads}"), |bench| {
                bench.iter(|| {
                    let y = x.conv2d(&w, Some(&b), opts);
                    y.sum_all().backward();
                    black_box(w.grad());
                    x.zero_grad();
                    w.zero_grad();
                    b.zero_grad();
                })
            });
        }
    }
    set_num_threads(0);
    group.finish();
}

criterion_group!(benches, conv2d_fwd_bwd);
criterion_main!(benches);
