//! Matrix product with `torch.matmul` semantics — dot (1-D·1-D), matrix-vector, vector-matrix,
//! matrix-matrix and batched products with broadcast batch dims — computed by the `gemm` crate,
//! with its backward rule.
//!
//! Operands are never copied: gemm takes a row and a column stride for each operand, which covers
//! transposed (`x.matmul(&w.t())`), sliced and broadcast (stride 0) views. A stack of matrices
//! multiplied by one shared matrix is folded into a single tall product when the stack's rows
//! lie at a constant stride (the common `[batch, seq, in] · [in, out]` case). Otherwise the
//! batch is walked with per-batch offsets, in parallel over batches when each product is small.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dispatch_float;
use crate::dtype::Element;
use crate::layout::Layout;
use crate::parallel;
use crate::shape::{DimVec, Shape};
use crate::tensor::Tensor;
use gemm::Parallelism;

/// m·n·k at or above which a single product is split across threads inside gemm (below it one
/// thread). gemm itself never splits blocks under 48·48·256 ≈ 2^19.2 of work; on a 2-core Zen 4
/// a second thread gave nothing up to 80³ (2^19), and from 2^20 (≈ 100³, ~25 µs on one core)
/// the work clearly outweighs waking and joining a worker. Re-check with the `matmul_f32_small`
/// group of `benches/core_ops.rs` on a quiet machine.
pub(crate) const GEMM_PARALLEL_WORK: usize = 1 << 20;

/// Total m·n·k of a batch at or above which its products are spread over threads, whole
/// products per thread (no synchronisation inside gemm, so the bar is lower than for one
/// product).
const BATCH_PARALLEL_WORK: usize = 1 << 19;

/// m·n·k of one product from which gemm's own threading can beat one thread per product (when
/// the batch does not split evenly over the threads).
const BATCH_INNER_PARALLEL_WORK: usize = 1 << 24;

/// One operand seen as a stack of matrices: batch dims, then a `rows × cols` matrix.
struct Operand {
    batch: DimVec,
    batch_strides: DimVec,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
    offset: usize,
}

impl Operand {
    /// `layout` as matrices; a 1-D operand is a row vector on the left (`[1, k]`) and a column
    /// vector on the right (`[k, 1]`), as in `torch.matmul`.
    fn new(layout: &Layout, left: bool) -> Self {
        let (dims, strides) = (layout.dims(), layout.strides());
        let r = dims.len();
        if r == 1 {
            let (len, s) = (dims[0], strides[0]);
            // The stride of the size-1 dim is never followed; give it a harmless value.
            let (rows, cols, rs, cs) = if left {
                (1, len, len.max(1) * s.max(1), s)
            } else {
                (len, 1, s, 1)
            };
            return Operand {
                batch: DimVec::new(),
                batch_strides: DimVec::new(),
                rows,
                cols,
                rs,
                cs,
                offset: layout.offset(),
            };
        }
        Operand {
            batch: DimVec::from_slice(&dims[..r - 2]),
            batch_strides: DimVec::from_slice(&strides[..r - 2]),
            rows: dims[r - 2],
            cols: dims[r - 1],
            rs: strides[r - 2],
            cs: strides[r - 1],
            offset: layout.offset(),
        }
    }

    /// Strides of the batch dims broadcast to `batch` (0 along broadcast dims).
    fn broadcast_strides(&self, batch: &[usize]) -> DimVec {
        let lead = batch.len() - self.batch.len();
        (0..batch.len())
            .map(|i| {
                if i < lead || self.batch[i - lead] == 1 {
                    0
                } else {
                    self.batch_strides[i - lead]
                }
            })
            .collect()
    }
}

/// Output shape of `a.matmul(b)`, the broadcast batch shape, and `(m, k, n)`; panics on
/// misaligned or unbroadcastable shapes.
fn plan(a: &Tensor, b: &Tensor) -> (Shape, DimVec, Operand, Operand) {
    let (sa, sb) = (a.shape(), b.shape());
    assert!(
        a.rank() >= 1 && b.rank() >= 1,
        "matmul: both operands need at least 1 dim, got shapes {sa} and {sb}"
    );
    assert!(
        a.dtype() == b.dtype(),
        "matmul: dtype mismatch, {} vs {} (shapes {sa} and {sb})",
        a.dtype(),
        b.dtype()
    );
    let (oa, ob) = (
        Operand::new(a.layout(), true),
        Operand::new(b.layout(), false),
    );
    assert!(
        oa.cols == ob.rows,
        "matmul: shapes {sa} and {sb} are not aligned ({} != {})",
        oa.cols,
        ob.rows
    );
    let r = oa.batch.len().max(ob.batch.len());
    let mut batch = DimVec::from_elem(1, r);
    for (i, out) in batch.iter_mut().enumerate() {
        let da = (i + oa.batch.len())
            .checked_sub(r)
            .map_or(1, |j| oa.batch[j]);
        let db = (i + ob.batch.len())
            .checked_sub(r)
            .map_or(1, |j| ob.batch[j]);
        assert!(
            da == db || da == 1 || db == 1,
            "matmul: batch dims of shapes {sa} and {sb} cannot be broadcast ({:?} vs {:?})",
            oa.batch.as_slice(),
            ob.batch.as_slice()
        );
        *out = if da == 1 { db } else { da };
    }
    let mut out = batch.clone();
    if a.rank() > 1 {
        out.push(oa.rows);
    }
    if b.rank() > 1 {
        out.push(ob.cols);
    }
    (Shape::from(out), batch, oa, ob)
}

/// Threads for one product of `work = m·n·k` multiply-adds: all of kiln's when it is large
/// enough for them ([`GEMM_PARALLEL_WORK`]), else the calling thread alone.
pub(crate) fn gemm_par(work: usize) -> Parallelism {
    let threads = parallel::num_threads();
    if threads > 1 && work >= GEMM_PARALLEL_WORK {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// What `dst` holds before [`gemm_into`] adds the product.
#[derive(Clone, Copy)]
pub(crate) enum Start<T> {
    /// Nothing: `dst = a·b`.
    Zero,
    /// Its current values: `dst += a·b`.
    Keep,
    /// The `n` values at the pointer, in every row: `dst = row + a·b` (a bias, written by each
    /// thread into its share of `dst` so that it costs no pass of its own, as `torch.addmm`).
    Row(*const T),
}

// SAFETY: a `Row` pointer is only read, by every share, while the caller keeps it alive.
unsafe impl<T> Send for Start<T> {}
unsafe impl<T> Sync for Start<T> {}

/// Writes `row[cols]` into rows `rows` of `dst` (rows `n` apart), then returns the `accumulate`
/// flag gemm needs for `start`.
///
/// # Safety
/// `dst` must address `rows.end` rows of `n` elements, and a `Row` pointer `n` values.
unsafe fn prepare<T: Element>(
    start: Start<T>,
    dst: *mut T,
    n: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> bool {
    match start {
        Start::Zero => false,
        Start::Keep => true,
        Start::Row(row) => {
            // SAFETY: forwarded from the caller's contract.
            unsafe {
                let row = std::slice::from_raw_parts(row.add(cols.start), cols.len());
                for r in rows {
                    std::slice::from_raw_parts_mut(dst.add(r * n + cols.start), cols.len())
                        .copy_from_slice(row);
                }
            }
            true
        }
    }
}

/// Rows (or columns) of one thread's share are a multiple of this, so every share fills whole
/// micro-kernel tiles.
const SPLIT_ALIGN: usize = 16;

/// `dst[m × n] = init + a[m × k] · b[k × n]` with the given element strides (see [`Start`]);
/// `dst` rows are `n` apart.
///
/// `Parallelism::Rayon(t)` is served by splitting the product into `t` independent products
/// over row blocks of `a` (or column blocks of `b` when `a` is short and `b` wide), each run on
/// one thread without synchronisation inside gemm. On 2 cores this beat gemm's own threading on
/// every shape of a BERT layer: +5–10 % on the forward products and +30–40 % on the weight
/// gradients (384 × 384 × 4096), where gemm's split leaves a thread idle.
///
/// # Safety
/// Every element addressed through the pointers and strides must be inside its allocation, a
/// [`Start::Row`] pointer must address `n` values, and `dst` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into<T: Element>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    init: Start<T>,
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
    par: Parallelism,
) {
    let threads = match par {
        Parallelism::Rayon(t) => t,
        _ => 1,
    };
    let by_rows = m >= n || m >= 8 * SPLIT_ALIGN * threads;
    let extent = if by_rows { m } else { n };
    let parts = threads.min(extent / SPLIT_ALIGN);
    if parts <= 1 {
        // SAFETY: `dst` is the whole `m × n` output.
        let accumulate = unsafe { prepare(init, dst, n, 0..m, 0..n) };
        gemm_raw(
            (m, n, k),
            (dst, n),
            accumulate,
            a,
            (a_rs, a_cs),
            b,
            (b_rs, b_cs),
            par,
        );
        return;
    }
    let share = extent.div_ceil(parts).next_multiple_of(SPLIT_ALIGN);
    // Raw pointers are not Send; the shares address disjoint blocks of `dst`.
    let (dst, a, b) = (dst as usize, a as usize, b as usize);
    let run = |i: usize| {
        let start = i * share;
        let len = share.min(extent.saturating_sub(start));
        if len == 0 {
            return;
        }
        let (dst, a, b) = (dst as *mut T, a as *const T, b as *const T);
        // SAFETY: row (column) block `start..start + len` of `a` (`b`) and of `dst` lies inside
        // the operands the caller vouched for; the blocks of different shares do not overlap.
        unsafe {
            if by_rows {
                let accumulate = prepare(init, dst, n, start..start + len, 0..n);
                gemm_raw(
                    (len, n, k),
                    (dst.add(start * n), n),
                    accumulate,
                    a.add(start * a_rs),
                    (a_rs, a_cs),
                    b,
                    (b_rs, b_cs),
                    Parallelism::None,
                );
            } else {
                let accumulate = prepare(init, dst, n, 0..m, start..start + len);
                gemm_raw(
                    (m, len, k),
                    (dst.add(start), n),
                    accumulate,
                    a,
                    (a_rs, a_cs),
                    b.add(start * b_cs),
                    (b_rs, b_cs),
                    Parallelism::None,
                );
            }
        }
    };
    use rayon::prelude::*;
    parallel::install(|| (0..parts).into_par_iter().for_each(run));
}

/// One call of gemm: `dst = a·b`, or `dst += a·b` when `accumulate`; `dst` rows are `dst_rs`
/// apart.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw<T: Element>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    accumulate: bool,
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
    par: Parallelism,
) {
    // gemm computes dst = alpha·dst + beta·(a·b); alpha is ignored unless it reads dst.
    // SAFETY: forwarded from the callers' contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            if accumulate { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

/// Storage offset of batch `i` (row-major over `batch`) for an operand with `strides`.
#[inline]
pub(crate) fn batch_offset(mut i: usize, batch: &[usize], strides: &[usize], base: usize) -> usize {
    let mut off = base;
    for (&d, &s) in batch.iter().zip(strides).rev() {
        off += (i % d) * s;
        i /= d;
    }
    off
}

fn forward<T: Element>(
    a: &Tensor,
    b: &Tensor,
    batch: &[usize],
    oa: &Operand,
    ob: &Operand,
) -> Buffer<T> {
    let (m, k, n) = (oa.rows, oa.cols, ob.cols);
    let count: usize = batch.iter().product();
    let mut out = Buffer::<T>::uninit(count * m * n);
    if out.is_empty() {
        return out;
    }
    if k == 0 {
        out.fill(T::zero());
        return out;
    }
    let ga = a.storage();
    let gb = (!a.same_storage(b)).then(|| b.storage());
    let sa: &[T] = crate::typed_slice!(ga, T, "matmul");
    let sb: &[T] = match &gb {
        Some(g) => crate::typed_slice!(**g, T, "matmul"),
        None => sa,
    };
    let (a_bs, b_bs) = (oa.broadcast_strides(batch), ob.broadcast_strides(batch));
    let threads = parallel::num_threads();
    let work = m * n * k;

    // One product, or a stack times a shared matrix whose rows lie at a constant stride: one
    // gemm of `count·m` rows.
    let folded = if count == 1 {
        Some((m, oa.rs))
    } else if b_bs.iter().all(|&s| s == 0) {
        let mut dims = DimVec::from_slice(batch);
        dims.push(m);
        let mut strides = a_bs.clone();
        strides.push(oa.rs);
        let (md, ms) = Layout::new(Shape::from(dims), strides, 0).merged();
        match md.len() {
            0 => Some((count * m, oa.rs)),
            1 => Some((count * m, ms[0])),
            _ => None,
        }
    } else {
        None
    };
    if let Some((rows, rs)) = folded {
        // SAFETY: the layouts of `a` and `b` lie inside their storages (checked when the
        // tensors were built), the folded rows are exactly the rows of every batch of `a`, and
        // `out` is a fresh buffer of `rows × n` elements.
        unsafe {
            gemm_into(
                (rows, n, k),
                out.as_mut_ptr(),
                Start::Zero,
                sa.as_ptr().add(oa.offset),
                (rs, oa.cs),
                sb.as_ptr().add(ob.offset),
                (ob.rs, ob.cs),
                gemm_par(rows * n * k),
            );
        }
        return out;
    }

    let one = |i: usize, dst: &mut [T], par: Parallelism| {
        let pa = batch_offset(i, batch, &a_bs, oa.offset);
        let pb = batch_offset(i, batch, &b_bs, ob.offset);
        // SAFETY: batch `i` of each operand is a matrix of its layout, inside its storage;
        // `dst` is this batch's `m × n` block of the fresh output buffer.
        unsafe {
            gemm_into(
                (m, n, k),
                dst.as_mut_ptr(),
                Start::Zero,
                sa.as_ptr().add(pa),
                (oa.rs, oa.cs),
                sb.as_ptr().add(pb),
                (ob.rs, ob.cs),
                par,
            );
        }
    };
    // Whole products per thread need no synchronisation inside gemm; large products go to
    // gemm's threads instead when the batch would not split evenly over the threads.
    let per_batch =
        work < BATCH_INNER_PARALLEL_WORK || count.is_multiple_of(threads) || count >= 8 * threads;
    if threads > 1 && count * work >= BATCH_PARALLEL_WORK && per_batch {
        parallel::for_chunks(&mut out, m * n, true, |i, dst| {
            one(i, dst, Parallelism::None)
        });
    } else {
        let par = gemm_par(work);
        for (i, dst) in out.chunks_mut(m * n).enumerate() {
            one(i, dst, par);
        }
    }
    out
}

/// Number of matrices in the batch dims of a tensor of rank >= 2.
fn batch_count(t: &Tensor) -> usize {
    t.dims()[..t.rank() - 2].iter().product()
}

struct MatmulBackward;

/// A rank-2 view whose columns are contiguous (`w.t()` of a row-major `w`): its gradient is
/// computed transposed, so that it reaches `w` row-major and is accumulated without a copy.
fn is_transposed_matrix(t: &Tensor) -> bool {
    t.rank() == 2 && !t.is_contiguous() && t.layout().strides() == [1, t.dim(0)]
}

impl GradFn for MatmulBackward {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn reads_output(&self) -> bool {
        false
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        // Back to the matrix forms used by the forward: a [.., m, k], b [.., k, n], g [.., m, n].
        let a2 = if a.rank() == 1 {
            a.unsqueeze(0)
        } else {
            a.clone()
        };
        let b2 = if b.rank() == 1 {
            b.unsqueeze(1)
        } else {
            b.clone()
        };
        let g2 = match (a.rank(), b.rank()) {
            (1, 1) => g.reshape([1, 1]),
            (1, _) => g.unsqueeze(-2),
            (_, 1) => g.unsqueeze(-1),
            _ => g.clone(),
        };
        let (m, k, n) = (a2.dim(-2), a2.dim(-1), b2.dim(-1));
        let count = batch_count(&g2);
        let ga = a.tracks_grad().then(|| {
            if count > 1 && batch_count(&a2) == 1 {
                // a is shared by every batch: dA = Σ_i G_i·B_iᵀ = [G_1 .. G_B]·[B_1 .. B_B]ᵀ,
                // one product with inner size B·n.
                let nb = g2.rank() - 2;
                let gs = g2
                    .reshape([count, m, n])
                    .permute(&[1, 0, 2])
                    .reshape([m, count * n]);
                let bs = b2
                    .broadcast_as(Shape::from(
                        g2.dims()[..nb]
                            .iter()
                            .copied()
                            .chain([k, n])
                            .collect::<Vec<_>>(),
                    ))
                    .reshape([count, k, n])
                    .permute(&[1, 0, 2])
                    .reshape([k, count * n]);
                gs.matmul(&bs.t()).reshape(a.shape())
            } else {
                g2.matmul(&b2.t()).sum_to(a2.shape()).reshape(a.shape())
            }
        });
        let gb = b.tracks_grad().then(|| {
            if count > 1 && batch_count(&b2) == 1 {
                // b is shared by every batch: dB = Σ_i A_iᵀ·G_i = [A_1; ..; A_B]ᵀ·[G_1; ..; G_B],
                // one product with inner size B·m.
                let nb = g2.rank() - 2;
                let batch_shape: Vec<usize> = g2.dims()[..nb].to_vec();
                let a_full = a2.broadcast_as(Shape::from(
                    batch_shape
                        .iter()
                        .copied()
                        .chain([m, k])
                        .collect::<Vec<_>>(),
                ));
                let af = a_full.reshape([count * m, k]);
                let gf = g2.reshape([count * m, n]);
                if is_transposed_matrix(b) {
                    gf.t().matmul(&af).t()
                } else {
                    af.t().matmul(&gf).reshape(b.shape())
                }
            } else if count == 1 && is_transposed_matrix(b) && a2.rank() == 2 {
                g2.t().matmul(&a2).t()
            } else {
                a2.t().matmul(&g2).sum_to(b2.shape()).reshape(b.shape())
            }
        });
        vec![ga, gb]
    }
}

impl Tensor {
    /// Matrix product as `torch.matmul`: dot, matrix-vector, matrix, broadcast batched products.
    pub fn matmul(&self, other: &Tensor) -> Tensor {
        let (shape, batch, oa, ob) = plan(self, other);
        let storage = dispatch_float!(self.dtype(), "matmul", |T| {
            <T as Element>::into_storage(forward::<T>(self, other, &batch, &oa, &ob))
        });
        Tensor::op_result(storage, shape, &[self, other], || Box::new(MatmulBackward))
    }
}

#[cfg(test)]
mod tests {
    use super::{gemm_into, gemm_raw};
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::{DType, Tensor};
    use gemm::Parallelism;

    /// `torch.matmul` of the row-major values of `a` and `b`, with plain f64 loops:
    /// (shape, values).
    fn naive(a: &Tensor, b: &Tensor) -> (Vec<usize>, Vec<f64>) {
        let (va, vb) = (a.to_f64_vec(), b.to_f64_vec());
        let (da, db) = (a.dims().to_vec(), b.dims().to_vec());
        let da2 = if da.len() == 1 {
            vec![1, da[0]]
        } else {
            da.clone()
        };
        let db2 = if db.len() == 1 {
            vec![db[0], 1]
        } else {
            db.clone()
        };
        let (m, k, n) = (da2[da2.len() - 2], da2[da2.len() - 1], db2[db2.len() - 1]);
        assert_eq!(k, db2[db2.len() - 2]);
        let (ba, bb) = (&da2[..da2.len() - 2], &db2[..db2.len() - 2]);
        let r = ba.len().max(bb.len());
        let pad = |x: &[usize]| {
            let mut v = vec![1; r - x.len()];
            v.extend_from_slice(x);
            v
        };
        let (pa, pb) = (pad(ba), pad(bb));
        let batch: Vec<usize> = (0..r).map(|i| pa[i].max(pb[i])).collect();
        let count: usize = batch.iter().product();
        let mut out = vec![0.0; count * m * n];
        for bi in 0..count {
            let mut idx = vec![0; r];
            let mut rem = bi;
            for d in (0..r).rev() {
                idx[d] = rem % batch[d];
                rem /= batch[d];
            }
            let linear = |dims: &[usize]| {
                idx.iter()
                    .zip(dims)
                    .fold(0, |acc, (&i, &d)| acc * d + if d == 1 { 0 } else { i })
            };
            let (ia, ib) = (linear(&pa), linear(&pb));
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0;
                    for l in 0..k {
                        s += va[ia * m * k + i * k + l] * vb[ib * k * n + l * n + j];
                    }
                    out[bi * m * n + i * n + j] = s;
                }
            }
        }
        let mut shape = batch;
        if da.len() > 1 {
            shape.push(m);
        }
        if db.len() > 1 {
            shape.push(n);
        }
        (shape, out)
    }

    fn assert_matches_naive(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
        let got = a.matmul(b);
        let (shape, want) = naive(a, b);
        assert_eq!(got.dims(), shape.as_slice(), "{what}: shape");
        for (i, (g, w)) in got.to_f64_vec().iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    type Transform = fn(&Tensor, &Tensor) -> (Tensor, Tensor);

    /// (name, leaf shape of a, leaf shape of b, operands built from the leaves).
    fn cases() -> Vec<(&'static str, Vec<usize>, Vec<usize>, Transform)> {
        let id: Transform = |a, b| (a.clone(), b.clone());
        vec![
            ("dot", vec![5], vec![5], id),
            ("matrix", vec![3, 4], vec![4, 2], id),
            ("vector-matrix", vec![4], vec![4, 3], id),
            ("matrix-vector", vec![3, 4], vec![4], id),
            ("batched", vec![2, 3, 4], vec![2, 4, 5], id),
            ("stack-shared", vec![2, 3, 4], vec![4, 5], id),
            ("shared-stack", vec![3, 4], vec![2, 4, 5], id),
            ("broadcast-both", vec![2, 1, 3, 4], vec![3, 4, 5], id),
            ("size-1-batch", vec![1, 3, 4], vec![2, 4, 5], id),
            ("vector-stack", vec![4], vec![2, 4, 3], id),
            ("stack-vector", vec![2, 3, 4], vec![4], id),
            ("x-w-transposed", vec![3, 4], vec![5, 4], |a, b| {
                (a.clone(), b.t())
            }),
            ("lhs-transposed", vec![4, 3], vec![4, 2], |a, b| {
                (a.t(), b.clone())
            }),
            (
                "batched-both-transposed",
                vec![2, 4, 3],
                vec![2, 5, 4],
                |a, b| (a.t(), b.t()),
            ),
            ("narrowed", vec![3, 6], vec![5, 3], |a, b| {
                (a.narrow(1, 1, 4), b.narrow(0, 1, 4))
            }),
            ("permuted-batch", vec![3, 2, 4], vec![4, 5], |a, b| {
                (a.transpose(0, 1), b.clone())
            }),
            (
                "stack-transposed-shared",
                vec![2, 3, 4],
                vec![5, 4],
                |a, b| (a.clone(), b.t()),
            ),
            ("expanded-rows", vec![1, 4], vec![4, 2], |a, b| {
                (a.broadcast_as([3, 4]), b.clone())
            }),
            ("vector-expanded-stack", vec![4], vec![4, 3], |a, b| {
                (a.clone(), b.unsqueeze(0).broadcast_as([2, 4, 3]))
            }),
            (
                "rank-4-transposed",
                vec![2, 2, 4, 3],
                vec![2, 1, 4, 2],
                |a, b| (a.transpose(-1, -2), b.clone()),
            ),
        ]
    }

    #[test]
    fn values_match_a_naive_triple_loop() {
        for (i, (name, sa, sb, f)) in cases().into_iter().enumerate() {
            let a = randn_f64(&sa, 10 + i as u64);
            let b = randn_f64(&sb, 100 + i as u64);
            let (x, y) = f(&a, &b);
            assert_matches_naive(&x, &y, 1e-12, name);
            // The same in f32.
            let (x, y) = f(&a.to_dtype(DType::F32), &b.to_dtype(DType::F32));
            assert_eq!(x.matmul(&y).dtype(), DType::F32);
            assert_matches_naive(&x, &y, 1e-5, name);
        }
    }

    #[test]
    fn gradcheck_every_case() {
        for (i, (name, sa, sb, f)) in cases().into_iter().enumerate() {
            let a = randn_f64(&sa, 20 + i as u64).requires_grad();
            let b = randn_f64(&sb, 200 + i as u64).requires_grad();
            gradcheck(
                |t| {
                    let (x, y) = f(&t[0], &t[1]);
                    x.matmul(&y)
                },
                &[a, b],
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn gradcheck_one_operand_tracked_and_chained() {
        let a = randn_f64(&[2, 3, 4], 31).requires_grad();
        let w = randn_f64(&[5, 4], 32);
        gradcheck(|t| t[0].matmul(&w.t()), std::slice::from_ref(&a)).unwrap();
        let x = randn_f64(&[3, 4], 33);
        let w = randn_f64(&[2, 4, 5], 34).requires_grad();
        gradcheck(|t| x.matmul(&t[0]), std::slice::from_ref(&w)).unwrap();
        // A product of products, and the same tensor on both sides.
        let a = randn_f64(&[3, 3], 35).requires_grad();
        gradcheck(|t| t[0].matmul(&t[0].t()).matmul(&t[0]), &[a]).unwrap();
    }

    #[test]
    fn large_products_take_the_threaded_paths_and_stay_exact() {
        // One product above the threading threshold.
        let a = Tensor::randn([100, 120], 1);
        let b = Tensor::randn([110, 120], 2);
        assert_matches_naive(&a, &b.t(), 1e-4, "threaded single");
        // Many small products: parallel over batches.
        let a = Tensor::randn([48, 20, 24], 3);
        let b = Tensor::randn([48, 24, 28], 4);
        assert_matches_naive(&a, &b, 1e-4, "batch-parallel");
        // Broadcast batches, transposed operand, f64.
        let a = randn_f64(&[3, 1, 30, 40], 5);
        let b = randn_f64(&[4, 50, 40], 6);
        assert_matches_naive(&a, &b.t(), 1e-12, "broadcast batch-parallel");
        // A stack times a shared matrix folded into one tall product.
        let a = Tensor::randn([8, 40, 64], 7);
        let b = Tensor::randn([64, 96], 8);
        assert_matches_naive(&a, &b, 1e-4, "folded");
        // Large products, a batch that does not split evenly over two threads: gemm's threads.
        let a = Tensor::randn([3, 256, 256], 9);
        let b = Tensor::randn([3, 256, 256], 10);
        assert_matches_naive(&a, &b, 1e-4, "inner-parallel batch");
    }

    #[test]
    fn split_products_equal_one_product_on_every_split() {
        // Row splits (tall a, transposed a), column splits (short a, wide b), shares that do not
        // divide evenly, 2 and 3 threads, overwrite and accumulate.
        let cases = [
            (1000, 96, 70, false),
            (1000, 96, 70, true),
            (24, 900, 50, false),
            (40, 530, 33, true),
            (384, 384, 300, false),
            (17, 20, 9, false),
        ];
        for (m, n, k, transposed_a) in cases {
            let a: Vec<f64> = (0..m * k)
                .map(|i| ((i * 37) % 101) as f64 / 50.0 - 1.0)
                .collect();
            let b: Vec<f64> = (0..k * n)
                .map(|i| ((i * 53) % 97) as f64 / 48.0 - 1.0)
                .collect();
            let a_strides = if transposed_a { (1, m) } else { (k, 1) };
            let init: Vec<f64> = (0..m * n).map(|i| (i % 13) as f64).collect();
            for accumulate in [false, true] {
                let mut want = init.clone();
                let mut got = init.clone();
                // SAFETY: every operand is a full dense matrix of the stated shape and strides.
                unsafe {
                    gemm_raw(
                        (m, n, k),
                        (want.as_mut_ptr(), n),
                        accumulate,
                        a.as_ptr(),
                        a_strides,
                        b.as_ptr(),
                        (n, 1),
                        Parallelism::None,
                    );
                }
                for threads in [2, 3] {
                    got.copy_from_slice(&init);
                    // SAFETY: as above.
                    unsafe {
                        gemm_into(
                            (m, n, k),
                            got.as_mut_ptr(),
                            if accumulate {
                                super::Start::Keep
                            } else {
                                super::Start::Zero
                            },
                            a.as_ptr(),
                            a_strides,
                            b.as_ptr(),
                            (n, 1),
                            Parallelism::Rayon(threads),
                        );
                    }
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                            "{m}x{n}x{k} threads {threads} accumulate {accumulate}: [{i}] {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn same_storage_on_both_sides() {
        let a = randn_f64(&[3, 4], 41);
        assert_matches_naive(&a, &a.t(), 1e-12, "a·aᵀ");
        assert_matches_naive(&a.t(), &a, 1e-12, "aᵀ·a");
    }

    #[test]
    fn empty_and_zero_inner_dims() {
        let a = Tensor::zeros([0, 3]);
        assert_eq!(a.matmul(&Tensor::ones([3, 4])).dims(), &[0, 4]);
        let a = randn_f64(&[2, 0], 1).requires_grad();
        let b = randn_f64(&[0, 3], 2).requires_grad();
        let y = a.matmul(&b);
        assert_eq!(y.dims(), &[2, 3]);
        assert_eq!(y.to_vec::<f64>(), vec![0.0; 6]);
        y.sum_all().backward();
        assert_eq!(a.grad().unwrap().dims(), &[2, 0]);
        assert_eq!(b.grad().unwrap().dims(), &[0, 3]);
        let y = Tensor::zeros([0]).matmul(&Tensor::zeros([0]));
        assert_eq!((y.dims().len(), y.item()), (0, 0.0));
    }

    #[test]
    fn records_a_matmul_node() {
        let x = Tensor::randn([2, 3], 1).requires_grad();
        let w = Tensor::randn([4, 3], 2);
        let y = x.matmul(&w.t());
        assert_eq!(y.grad_fn_name(), Some("matmul"));
        y.sum_all().backward();
        // d(sum(x·wᵀ))/dx[i, j] = Σ_o w[o, j]
        let wv = w.to_vec::<f32>();
        let want: Vec<f32> = (0..3)
            .map(|j| (0..4).map(|o| wv[o * 3 + j]).sum())
            .collect();
        let got = x.grad().unwrap().to_vec::<f32>();
        for i in 0..2 {
            for j in 0..3 {
                assert!((got[i * 3 + j] - want[j]).abs() < 1e-5);
            }
        }
    }

    #[test]
    #[should_panic(expected = "matmul: shapes [2, 3] and [4, 5] are not aligned (3 != 4)")]
    fn misaligned_matrices_panic() {
        let _ = Tensor::zeros([2, 3]).matmul(&Tensor::zeros([4, 5]));
    }

    #[test]
    #[should_panic(expected = "matmul: shapes [3] and [4] are not aligned (3 != 4)")]
    fn misaligned_vectors_panic() {
        let _ = Tensor::zeros([3]).matmul(&Tensor::zeros([4]));
    }

    #[test]
    #[should_panic(
        expected = "matmul: batch dims of shapes [2, 3, 4] and [3, 4, 5] cannot be broadcast ([2] vs [3])"
    )]
    fn unbroadcastable_batches_panic() {
        let _ = Tensor::zeros([2, 3, 4]).matmul(&Tensor::zeros([3, 4, 5]));
    }

    #[test]
    #[should_panic(expected = "matmul: both operands need at least 1 dim, got shapes [] and [3]")]
    fn scalars_panic() {
        let _ = Tensor::scalar(1f32).matmul(&Tensor::zeros([3]));
    }

    #[test]
    #[should_panic(expected = "matmul: dtype mismatch, f32 vs f64 (shapes [2, 2] and [2, 2])")]
    fn mixed_dtypes_panic() {
        let _ = Tensor::zeros([2, 2]).matmul(&randn_f64(&[2, 2], 1));
    }

    #[test]
    #[should_panic(expected = "matmul: expected a float tensor (f32 or f64), got i64")]
    fn integer_operands_panic() {
        let a = Tensor::arange_i64(0, 4, 1).reshape([2, 2]);
        let _ = a.matmul(&a);
    }
}
