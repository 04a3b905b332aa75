//! Threading policy: one global rayon pool built once with the most threads kiln may use, a
//! runtime thread count (`KILN_NUM_THREADS`, default: all cores, changeable with
//! [`set_num_threads`]) that kernels honour, and a work threshold below which kernels stay on the
//! calling thread — a second thread makes small ops slower, not faster.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Elements below which an elementwise kernel runs on one thread.
pub const PARALLEL_THRESHOLD: usize = 1 << 16;

/// Runtime override of the thread count (0: none).
static OVERRIDE: AtomicUsize = AtomicUsize::new(0);

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The thread count when none was set at runtime: `KILN_NUM_THREADS`, or the number of cores.
fn default_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("KILN_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(cores)
    })
}

/// Size of the global rayon pool, built on first use with the larger of `KILN_NUM_THREADS` and
/// the number of cores: the most threads [`set_num_threads`] can ask for.
pub fn max_threads() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        let n = default_threads().max(cores());
        // The global pool may already exist (another library built it); then we use it as is.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
        rayon::current_num_threads().max(1)
    })
}

/// Number of threads kernels (and gemm) may use: the value of [`set_num_threads`] if any, else
/// `KILN_NUM_THREADS`, else the number of cores; never more than [`max_threads`].
#[inline]
pub fn num_threads() -> usize {
    let max = max_threads();
    let n = match OVERRIDE.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    };
    n.clamp(1, max)
}

/// Sets the number of threads kernels use from now on, in every thread of the process
/// (clamped to `1..=max_threads()`); `0` restores the default (`KILN_NUM_THREADS` or all cores).
pub fn set_num_threads(n: usize) {
    OVERRIDE.store(n, Ordering::Relaxed);
}

/// A rayon pool of exactly `n` threads (`n < max_threads()`), built on first use and kept.
fn pool_of(n: usize) -> &'static rayon::ThreadPool {
    static POOLS: OnceLock<Vec<OnceLock<rayon::ThreadPool>>> = OnceLock::new();
    let pools = POOLS.get_or_init(|| (0..=max_threads()).map(|_| OnceLock::new()).collect());
    pools[n].get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(move |i| format!("kiln-{n}-{i}"))
            .build()
            .expect("kiln: cannot start a thread pool")
    })
}

/// Runs `f` so that the rayon parallel iterators inside it use at most [`num_threads`] threads:
/// in the global pool when it has that many, else in a pool of that size. Called from inside a
/// rayon worker, `f` runs in the current pool.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let n = num_threads();
    if n >= max_threads() || rayon::current_thread_index().is_some() {
        f()
    } else {
        pool_of(n).install(f)
    }
}

/// Runs `f(0)`, …, `f(parts - 1)` on the kiln pool (parallel when more than one thread is
/// allowed); the pool hands parts out one at a time, so a thread the host delays leaves its
/// parts to the others. Returns when every part has run; a part's panic is re-raised here.
pub fn run_parts(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 || num_threads() == 1 {
        (0..parts).for_each(f);
        return;
    }
    use rayon::prelude::*;
    install(|| (0..parts).into_par_iter().with_max_len(1).for_each(f));
}

/// Runs `f(index, piece)` over the `chunk`-sized pieces of `buf` (the last may be shorter),
/// through [`run_parts`] when `par`, else in order on the calling thread.
pub fn for_chunks<T: Send>(
    buf: &mut [T],
    chunk: usize,
    par: bool,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if chunk == 0 || buf.is_empty() {
        return;
    }
    let n = buf.len();
    let parts = n.div_ceil(chunk);
    if !par || parts == 1 {
        for (i, c) in buf.chunks_mut(chunk).enumerate() {
            f(i, c);
        }
        return;
    }
    by_pieces(buf, chunk, run_parts, f);
}

/// Calls `dispatch(parts, run)`, where `run(i)` runs `f(i, piece)` on the `i`-th `chunk`-sized
/// piece of `buf` (`chunk > 0`). `dispatch` must run every index below `parts` once and return
/// only when all have finished ([`run_parts`], or the spinning team).
fn by_pieces<T: Send>(
    buf: &mut [T],
    chunk: usize,
    dispatch: impl FnOnce(usize, &(dyn Fn(usize) + Sync)),
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let n = buf.len();
    // Raw pointers are not Sync; the pieces are disjoint.
    let base = buf.as_mut_ptr() as usize;
    dispatch(n.div_ceil(chunk), &|i| {
        let start = i * chunk;
        let len = chunk.min(n - start);
        // SAFETY: piece `i` is `start..start + len` of `buf`, which outlives the call; every
        // index runs once, so no two pieces alias.
        let piece = unsafe { std::slice::from_raw_parts_mut((base as *mut T).add(start), len) };
        f(i, piece)
    });
}

/// Runs `f(index, a_piece, b_piece)` over matching pieces of two buffers: piece `i` is
/// `a[i·a_chunk..]` (`a_chunk` elements, the last may be shorter) and `b[i·b_chunk..]`, through
/// [`run_parts`] when `par`, else in order on the calling thread.
///
/// # Panics
/// When the buffers do not split into the same number of pieces.
pub fn for_chunk_pairs<A: Send, B: Send>(
    a: &mut [A],
    a_chunk: usize,
    b: &mut [B],
    b_chunk: usize,
    par: bool,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let (na, nb) = (a.len(), b.len());
    let parts = na.div_ceil(a_chunk.max(1));
    assert!(
        a_chunk > 0 && b_chunk > 0 && parts == nb.div_ceil(b_chunk),
        "for_chunk_pairs: {na} elements by {a_chunk} and {nb} by {b_chunk} differ in pieces"
    );
    if !par || parts <= 1 {
        for (i, (pa, pb)) in a.chunks_mut(a_chunk).zip(b.chunks_mut(b_chunk)).enumerate() {
            f(i, pa, pb);
        }
        return;
    }
    // Raw pointers are not Sync; the pieces are disjoint.
    let (base_a, base_b) = (a.as_mut_ptr() as usize, b.as_mut_ptr() as usize);
    run_parts(parts, &|i| {
        let (sa, sb) = (i * a_chunk, i * b_chunk);
        // SAFETY: piece `i` of each buffer lies inside it (both outlive the call), and every
        // index runs once, so no two pieces alias.
        let (pa, pb) = unsafe {
            (
                std::slice::from_raw_parts_mut((base_a as *mut A).add(sa), a_chunk.min(na - sa)),
                std::slice::from_raw_parts_mut((base_b as *mut B).add(sb), b_chunk.min(nb - sb)),
            )
        };
        f(i, pa, pb)
    });
}

/// Splits `out` into chunks and runs `f(chunk_start, chunk)` on each, in parallel when `out`
/// is at least `PARALLEL_THRESHOLD` long and more than one thread is allowed.
pub fn for_each_chunk<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    let (chunk, par) = elementwise_chunks(out.len());
    for_chunks(out, chunk, par, |i, c| f(i * chunk, c));
}

/// [`for_each_chunk`] over two outputs of the same length, cut at the same places:
/// `f(chunk_start, chunk_of_a, chunk_of_b)`.
///
/// # Panics
/// If the lengths differ.
pub fn for_each_chunk_pair<A: Send, B: Send>(
    a: &mut [A],
    b: &mut [B],
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    assert_eq!(
        a.len(),
        b.len(),
        "for_each_chunk_pair: outputs of {} and {} elements",
        a.len(),
        b.len()
    );
    let (chunk, par) = elementwise_chunks(a.len());
    for_chunk_pairs(a, chunk, b, chunk, par, |i, a, b| f(i * chunk, a, b));
}

/// Chunk length (a multiple of 64, about four chunks per thread) and whether to run in
/// parallel, for an elementwise job over `n` elements.
fn elementwise_chunks(n: usize) -> (usize, bool) {
    let threads = num_threads();
    let par = n >= PARALLEL_THRESHOLD && threads > 1;
    let chunk = if par {
        (n.div_ceil(threads * 4)).div_ceil(64) * 64
    } else {
        n.max(1)
    };
    (chunk, par)
}

/// Splits `out` into one nearly equal part per thread ([`num_threads`] of them, each a
/// multiple of `align` elements except the last) and runs `f(part_start, part)` on each, in
/// parallel when `work` (the caller's estimate of the job's cost, in element operations) is at
/// least `PARALLEL_THRESHOLD`; otherwise one call on the calling thread. For memory-bound jobs
/// such as matrix-vector products, where every thread should stream the same amount.
pub fn for_each_split<T: Send>(
    out: &mut [T],
    align: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let n = out.len();
    let threads = num_threads();
    let align = align.max(1);
    if threads == 1 || work < PARALLEL_THRESHOLD || n <= align {
        return f(0, out);
    }
    let part = n.div_ceil(threads).div_ceil(align) * align;
    // Back-to-back splits (a decoded token's products) go to the spinning team when it is free.
    let dispatch = |parts: usize, run: &(dyn Fn(usize) + Sync)| {
        let on_team = parts <= crate::team::MAX_PARTS
            && crate::team::enabled()
            && crate::team::team(threads).try_run(parts, run);
        if !on_team {
            run_parts(parts, run);
        }
    };
    by_pieces(out, part, dispatch, |i, c| f(i * part, c));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    #[test]
    fn thread_count_override_is_clamped_honoured_and_reset() {
        let max = max_threads();
        assert!(max >= 1);
        set_num_threads(1);
        assert_eq!(num_threads(), 1);
        // One thread: the chunk driver stays on the calling thread.
        let caller = std::thread::current().id();
        let seen = Mutex::new(HashSet::new());
        let mut out = vec![0u32; PARALLEL_THRESHOLD * 4];
        for_each_chunk(&mut out, |s, c| {
            seen.lock().unwrap().insert(std::thread::current().id());
            for (i, o) in c.iter_mut().enumerate() {
                *o = (s + i) as u32;
            }
        });
        assert_eq!(*seen.lock().unwrap(), HashSet::from([caller]));
        assert!(out.iter().enumerate().all(|(i, &v)| v == i as u32));

        set_num_threads(max + 5);
        assert_eq!(num_threads(), max);
        if max > 1 {
            set_num_threads(max - 1);
            // Parallel iterators inside `install` see a pool of the requested size.
            assert_eq!(install(rayon::current_num_threads), max - 1);
            let seen = Mutex::new(HashSet::new());
            let mut out = vec![0u32; PARALLEL_THRESHOLD * 16];
            for_each_chunk(&mut out, |s, c| {
                seen.lock().unwrap().insert(std::thread::current().id());
                for (i, o) in c.iter_mut().enumerate() {
                    *o = (s + i) as u32;
                }
            });
            assert!(seen.lock().unwrap().len() < max);
            assert!(out.iter().enumerate().all(|(i, &v)| v == i as u32));
        }
        set_num_threads(0);
        assert_eq!(num_threads(), default_threads().clamp(1, max));
    }

    #[test]
    fn every_part_and_piece_runs_once_and_a_panic_reaches_the_caller() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for threads in [1, 2] {
            set_num_threads(threads);
            let hits: Vec<AtomicUsize> = (0..37).map(|_| AtomicUsize::new(0)).collect();
            run_parts(hits.len(), &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            let mut buf = vec![0usize; 1000];
            for_chunks(&mut buf, 64, true, |i, piece| {
                assert!(piece.len() == 64 || i == 15);
                for (k, v) in piece.iter_mut().enumerate() {
                    *v = i * 64 + k;
                }
            });
            assert!(buf.iter().enumerate().all(|(i, &v)| v == i));
            let (mut rows, mut marks) = (vec![0usize; 70], vec![0usize; 7]);
            for_chunk_pairs(&mut rows, 30, &mut marks, 3, true, |i, r, m| {
                r.iter_mut().for_each(|v| *v = i);
                m.iter_mut().for_each(|v| *v = i + 1);
            });
            assert!(rows.iter().enumerate().all(|(k, &v)| v == k / 30));
            assert_eq!(marks, [1, 1, 1, 2, 2, 2, 3]);
            let r = std::panic::catch_unwind(|| {
                run_parts(4, &|i| {
                    if i == 2 {
                        panic!("part 2 failed")
                    }
                })
            });
            let payload = r.expect_err("the part's panic reaches the caller");
            assert_eq!(payload.downcast_ref::<&str>(), Some(&"part 2 failed"));
        }
        set_num_threads(0);
    }

    #[test]
    fn split_parts_are_aligned_cover_everything_and_stay_serial_when_small() {
        set_num_threads(2);
        let mut out = vec![0usize; 1000];
        let starts = Mutex::new(Vec::new());
        for_each_split(&mut out, 8, PARALLEL_THRESHOLD, |s, c| {
            starts.lock().unwrap().push((s, c.len()));
            for (i, o) in c.iter_mut().enumerate() {
                *o = s + i;
            }
        });
        assert!(out.iter().enumerate().all(|(i, &v)| v == i));
        let mut parts = starts.into_inner().unwrap();
        parts.sort();
        // Other tests may change the thread count meanwhile: check the properties, not a count.
        assert!(!parts.is_empty() && parts.len() <= max_threads());
        let mut next = 0;
        for (i, &(s, len)) in parts.iter().enumerate() {
            assert_eq!(s, next, "parts {parts:?} leave a gap");
            assert!(i + 1 == parts.len() || len.is_multiple_of(8), "{parts:?}");
            assert!(len + 8 >= parts[0].1, "uneven parts {parts:?}");
            next = s + len;
        }
        assert_eq!(next, 1000);
        let calls = Mutex::new(0);
        for_each_split(&mut out, 8, PARALLEL_THRESHOLD - 1, |s, c| {
            assert_eq!((s, c.len()), (0, 1000));
            *calls.lock().unwrap() += 1;
        });
        assert_eq!(*calls.lock().unwrap(), 1);
        set_num_threads(0);
    }
}
