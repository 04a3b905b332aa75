//! Threading policy: one rayon pool sized by `KILN_NUM_THREADS` (default: all cores), and a
//! work threshold below which kernels stay on the calling thread — a second thread makes small
//! ops slower, not faster.

use std::sync::OnceLock;

/// Elements below which an elementwise kernel runs on one thread.
pub const PARALLEL_THRESHOLD: usize = 1 << 16;

/// Number of threads kernels (and gemm) may use: `KILN_NUM_THREADS`, or the number of cores.
pub fn num_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        let n = std::env::var("KILN_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        // The global pool may already exist (another library built it); then we use it as is.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
        n
    })
}

/// Splits `out` into chunks and runs `f(chunk_start, chunk)` on each, in parallel when `out`
/// is at least `PARALLEL_THRESHOLD` long and more than one thread is allowed.
pub fn for_each_chunk<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    let n = out.len();
    let threads = num_threads();
    if n < PARALLEL_THRESHOLD || threads == 1 {
        return f(0, out);
    }
    use rayon::prelude::*;
    // A few chunks per thread for balance, each a multiple of 64 elements.
    let chunk = (n.div_ceil(threads * 4)).div_ceil(64) * 64;
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| f(i * chunk, c));
}
