//! Max/min reductions (values over any dims, differentiable) and argmax/argmin over one dim,
//! plus the `[outer, red, inner]` block machinery that `stats` and `softmax` share.
//!
//! NaN propagates as in PyTorch: a reduction that meets a NaN returns NaN, and argmax/argmin
//! return the index of the first NaN. Ties go to the first occurrence.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dtype::{Element, Float};
use crate::layout::Layout;
use crate::ops::reduce::{reduce_map, ReducePlan};
use crate::parallel::{for_each_chunk, num_threads, PARALLEL_THRESHOLD};
use crate::shape::{Dim, DimVec, Dims, Shape};
use crate::tensor::Tensor;
use crate::{dispatch_dtype, dispatch_float};
use std::ops::Range;

// ---------------------------------------------------------------------- shared machinery

/// A contiguous tensor seen as `[outer, red, inner]`: the dims an op works along (reduced,
/// or normalised over by softmax) form the middle block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Blocks {
    pub(crate) outer: usize,
    pub(crate) red: usize,
    pub(crate) inner: usize,
}

impl Blocks {
    /// The blocks of `shape` around the sorted `dims` when they are adjacent; no dims gives a
    /// middle block of size 1.
    pub(crate) fn of(shape: &[usize], dims: &[usize]) -> Option<Blocks> {
        let (Some(&first), Some(&last)) = (dims.first(), dims.last()) else {
            return Some(Blocks {
                outer: shape.iter().product(),
                red: 1,
                inner: 1,
            });
        };
        (last + 1 - first == dims.len()).then(|| Blocks {
            outer: shape[..first].iter().product(),
            red: shape[first..=last].iter().product(),
            inner: shape[last + 1..].iter().product(),
        })
    }

    /// Number of elements of the whole block structure.
    pub(crate) fn len(&self) -> usize {
        self.outer * self.red * self.inner
    }

    /// Start of the row `r` of outer index `o`, at column `i`.
    #[inline(always)]
    pub(crate) fn at(&self, o: usize, r: usize, i: usize) -> usize {
        (o * self.red + r) * self.inner + i
    }
}

/// The storage range and `[outer, red, inner]` blocks for reducing `dims` of a view that is a
/// permutation of a contiguous range of storage (a transpose, say), when the reduced dims are
/// adjacent in storage order and the kept dims keep their relative order there, so that the
/// outputs come out in row-major order of the kept dims. Contiguous views are the common case.
pub(crate) fn storage_blocks(layout: &Layout, dims: &[usize]) -> Option<(Range<usize>, Blocks)> {
    if let Some(range) = layout.contiguous_range() {
        return Blocks::of(layout.dims(), dims).map(|b| (range, b));
    }
    if layout.elem_count() == 0 {
        return None;
    }
    // Dims of size > 1 from the largest stride to the smallest.
    let mut order: DimVec = (0..layout.dims().len())
        .filter(|&d| layout.dims()[d] > 1)
        .collect();
    order.sort_by_key(|&d| std::cmp::Reverse(layout.strides()[d]));
    let mut expected = 1;
    for &d in order.iter().rev() {
        if layout.strides()[d] != expected {
            return None;
        }
        expected *= layout.dims()[d];
    }
    let reduced = |d: &usize| dims.contains(d);
    let kept: DimVec = order.iter().copied().filter(|d| !reduced(d)).collect();
    if kept.windows(2).any(|w| w[0] > w[1]) {
        return None;
    }
    let first = order.iter().position(reduced).unwrap_or(order.len());
    let count = order.iter().filter(|d| reduced(d)).count();
    if order[first..first + count].iter().any(|d| !reduced(d)) {
        return None;
    }
    let size = |ds: &[usize]| ds.iter().map(|&d| layout.dims()[d]).product::<usize>();
    let b = Blocks {
        outer: size(&order[..first]),
        red: size(&order[first..first + count]),
        inner: size(&order[first + count..]),
    };
    Some((layout.offset()..layout.offset() + b.len(), b))
}

/// `x`, detached and contiguous, with `dims` moved together so they form the middle block:
/// a copy only when `x` is not contiguous or the dims are not adjacent. Returns the tensor, its
/// blocks and the permutation applied (when one was).
pub(crate) fn canonical(x: &Tensor, dims: &[usize]) -> (Tensor, Blocks, Option<DimVec>) {
    let x = x.detach();
    if let Some(b) = Blocks::of(x.dims(), dims) {
        return (x.contiguous(), b, None);
    }
    let mut perm: DimVec = (0..x.rank()).filter(|d| !dims.contains(d)).collect();
    let outer = perm.iter().map(|&d| x.dims()[d]).product();
    let red = dims.iter().map(|&d| x.dims()[d]).product();
    perm.extend_from_slice(dims);
    let xp = x.permute(&perm).contiguous();
    (
        xp,
        Blocks {
            outer,
            red,
            inner: 1,
        },
        Some(perm),
    )
}

/// The gradient `buf` computed in the layout of `canonical`'s tensor (shape `shape`), put
/// back into the input's dim order.
pub(crate) fn uncanonical<T: Element>(
    buf: Buffer<T>,
    shape: &Shape,
    perm: Option<DimVec>,
) -> Tensor {
    let t = Tensor::from_buffer(buf, shape.clone());
    match perm {
        None => t,
        Some(perm) => {
            let mut inverse = DimVec::from_elem(0, perm.len());
            for (i, &p) in perm.iter().enumerate() {
                inverse[p] = i;
            }
            t.permute(&inverse).contiguous()
        }
    }
}

/// A mutable buffer shared by parallel tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: tasks only write disjoint ranges (the contract of `slice`).
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub(crate) fn new(buf: &mut [T]) -> Self {
        SharedMut {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// `len` elements from `start`.
    ///
    /// # Safety
    /// No two live slices obtained from the same buffer may overlap, and the buffer must
    /// outlive them.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "SharedMut: range out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}

/// Fewest columns of a task that splits the columns of one outer index.
const MIN_SEGMENT: usize = 1024;

/// Runs `f(outer_range, inner_range)` over tasks that cover `[0, outer) × [0, inner)`: one
/// call on this thread for small work, else in parallel by groups of outer indices, or by
/// column segments of each outer index when there are few outer indices.
pub(crate) fn for_each_block(b: Blocks, f: impl Fn(Range<usize>, Range<usize>) + Sync) {
    let threads = num_threads();
    if b.len() < PARALLEL_THRESHOLD || threads == 1 || b.outer * b.inner <= 1 {
        return f(0..b.outer, 0..b.inner);
    }
    let tasks = threads * 4;
    if b.outer >= tasks || b.inner == 1 {
        let per = b.outer.div_ceil(tasks);
        crate::parallel::run_parts(b.outer.div_ceil(per), &|t| {
            f(t * per..((t + 1) * per).min(b.outer), 0..b.inner)
        });
    } else {
        // Column segments stay long: short strided runs cost more than the parallelism gains.
        let splits = tasks.div_ceil(b.outer);
        let seg = b
            .inner
            .div_ceil(splits)
            .next_multiple_of(16)
            .max(MIN_SEGMENT);
        let nseg = b.inner.div_ceil(seg);
        crate::parallel::run_parts(b.outer * nseg, &|t| {
            let (o, s) = (t / nseg, t % nseg);
            f(o..o + 1, s * seg..((s + 1) * seg).min(b.inner))
        });
    }
}

/// Splits a range of columns into tiles for kernels that make several passes over the `red`
/// rows of a tile: when a tile of at least 512 columns fits in cache (64K elements), tiles
/// that fit, so later passes hit the cache; otherwise long tiles (8192 columns), so that every
/// pass streams long contiguous runs (short strided runs defeat prefetching and thrash cache
/// sets when rows are a power of two apart).
pub(crate) fn tiles(cols: Range<usize>, red: usize) -> impl Iterator<Item = Range<usize>> {
    const CACHE_ELEMS: usize = 1 << 16;
    const LONG: usize = 8192;
    let tile = if red <= CACHE_ELEMS / 512 {
        (CACHE_ELEMS / red.max(1)).min(LONG)
    } else {
        LONG
    };
    let end = cols.end;
    cols.step_by(tile).map(move |s| s..(s + tile).min(end))
}

/// Reduces one long row with `leaf` on chunks in parallel (combined in order) when `split`
/// and the row is long enough, else `leaf(xs)`.
pub(crate) fn reduce_row<T: Sync, A: Send>(
    xs: &[T],
    split: bool,
    leaf: impl Fn(&[T]) -> A + Sync + Send,
    combine: impl Fn(A, A) -> A + Sync + Send,
) -> A {
    if split && xs.len() >= 2 * PARALLEL_THRESHOLD && num_threads() > 1 {
        use rayon::prelude::*;
        let chunk = xs
            .len()
            .div_ceil(num_threads() * 4)
            .max(PARALLEL_THRESHOLD / 4)
            .next_multiple_of(64);
        xs.par_chunks(chunk)
            .map(&leaf)
            .reduce_with(&combine)
            .expect("reduce_row: empty row")
    } else {
        leaf(xs)
    }
}

/// True for NaN (never for integers: the comparison folds away).
#[allow(clippy::eq_op)]
#[inline(always)]
pub(crate) fn is_nan<T: PartialEq + Copy>(x: T) -> bool {
    x != x
}

/// The better of `acc` and `x` for a max (`MAX`) or min reduction; NaN wins.
#[inline(always)]
pub(crate) fn pick<T: Element, const MAX: bool>(acc: T, x: T) -> T {
    let better = if MAX { x > acc } else { x < acc };
    if better || is_nan(x) {
        x
    } else {
        acc
    }
}

/// Max (`MAX`) or min of a non-empty slice, NaN-propagating (the first NaN), with eight
/// independent lanes and a NaN flag per lane (cheaper than propagating NaN in the lanes).
pub(crate) fn extreme_slice<T: Element, const MAX: bool>(xs: &[T]) -> T {
    let mut acc = [xs[0]; 8];
    let mut nan = [false; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            let x = c[k];
            nan[k] |= is_nan(x);
            let better = if MAX { x > acc[k] } else { x < acc[k] };
            acc[k] = if better { x } else { acc[k] };
        }
    }
    let mut m = acc[0];
    for &x in acc[1..].iter().chain(rest) {
        m = pick::<T, MAX>(m, x);
    }
    if nan.iter().any(|&n| n) || is_nan(m) {
        return *xs.iter().find(|&&x| is_nan(x)).expect("a NaN was seen");
    }
    m
}

/// Max or min of a row, split across threads when `split` and the row is long.
pub(crate) fn extreme_row<T: Element, const MAX: bool>(xs: &[T], split: bool) -> T {
    reduce_row(xs, split, extreme_slice::<T, MAX>, pick::<T, MAX>)
}

/// Index of the first max (`MAX`) or min of a non-empty slice; the first NaN if any.
fn arg_slice<T: Element, const MAX: bool>(xs: &[T], split: bool) -> usize {
    let v = extreme_row::<T, MAX>(xs, split);
    let pos = if is_nan(v) {
        xs.iter().position(|&x| is_nan(x))
    } else {
        xs.iter().position(|&x| x == v)
    };
    pos.expect("arg_slice: the extreme is in the slice")
}

/// True when `x` is the reduced value `m` (NaN matches NaN).
#[inline(always)]
fn matches<T: Element>(x: T, m: T) -> bool {
    x == m || (is_nan(x) && is_nan(m))
}

// ---------------------------------------------------------------------- kernels

/// Max/min values over the blocks' middle dim, for the columns `is` of outer index `o`.
fn extreme_cols<T: Element, const MAX: bool>(
    src: &[T],
    b: Blocks,
    o: usize,
    is: Range<usize>,
    out: &mut [T],
) {
    for t in tiles(is.clone(), b.red) {
        let acc = &mut out[t.start - is.start..t.end - is.start];
        let first = b.at(o, 0, t.start);
        acc.copy_from_slice(&src[first..first + t.len()]);
        for r in 1..b.red {
            let s = b.at(o, r, t.start);
            for (a, &x) in acc.iter_mut().zip(&src[s..s + t.len()]) {
                *a = pick::<T, MAX>(*a, x);
            }
        }
    }
}

/// Argmax/argmin over the blocks' middle dim for the columns `is` of outer index `o`.
fn arg_cols<T: Element, const MAX: bool>(
    src: &[T],
    b: Blocks,
    o: usize,
    is: Range<usize>,
    best: &mut Vec<T>,
    out: &mut [i64],
) {
    for t in tiles(is.clone(), b.red) {
        let idx = &mut out[t.start - is.start..t.end - is.start];
        idx.fill(0);
        let first = b.at(o, 0, t.start);
        best.clear();
        best.extend_from_slice(&src[first..first + t.len()]);
        for r in 1..b.red {
            let s = b.at(o, r, t.start);
            for ((m, i), &x) in best
                .iter_mut()
                .zip(idx.iter_mut())
                .zip(&src[s..s + t.len()])
            {
                let better = if MAX { x > *m } else { x < *m };
                let take = better || (is_nan(x) && !is_nan(*m));
                *m = if take { x } else { *m };
                *i = if take { r as i64 } else { *i };
            }
        }
    }
}

fn empty_reduction_check(x: &Tensor, dims: &[usize], op: &str) {
    let count: usize = dims.iter().map(|&d| x.dims()[d]).product();
    assert!(
        count > 0,
        "{op}: cannot reduce over zero elements (dims {dims:?} of shape {})",
        x.shape()
    );
}

/// Max/min values of `x` over `dims`, in row-major order of the kept dims.
fn extreme_values<T: Element, const MAX: bool>(x: &Tensor, dims: &[usize], op: &str) -> Buffer<T> {
    let Some((range, b)) = storage_blocks(x.layout(), dims) else {
        return reduce_map::<T, T>(x, dims, op, extreme_slice::<T, MAX>).0;
    };
    let storage = x.storage();
    let src = &crate::typed_slice!(storage, T, op)[range];
    let mut out = Buffer::<T>::uninit(b.outer * b.inner);
    let dst = SharedMut::new(&mut out);
    let split = b.outer < num_threads();
    for_each_block(b, |os, is| {
        for o in os {
            // SAFETY: tasks cover disjoint (outer, column) ranges.
            let seg = unsafe { dst.slice(o * b.inner + is.start, is.len()) };
            if b.inner == 1 {
                seg[0] = extreme_row::<T, MAX>(&src[o * b.red..(o + 1) * b.red], split);
            } else {
                extreme_cols::<T, MAX>(src, b, o, is.clone(), seg);
            }
        }
    });
    out
}

/// Argmax/argmin of `x` along `dim`, in row-major order of the other dims.
fn arg_extreme<T: Element, const MAX: bool>(x: &Tensor, dim: usize, op: &str) -> Buffer<i64> {
    let Some((range, b)) = storage_blocks(x.layout(), &[dim]) else {
        return reduce_map::<T, i64>(x, &[dim], op, |xs| arg_slice::<T, MAX>(xs, false) as i64).0;
    };
    let storage = x.storage();
    let src = &crate::typed_slice!(storage, T, op)[range];
    let mut out = Buffer::<i64>::uninit(b.outer * b.inner);
    let dst = SharedMut::new(&mut out);
    let split = b.outer < num_threads();
    for_each_block(b, |os, is| {
        let mut best = Vec::new();
        for o in os {
            // SAFETY: tasks cover disjoint (outer, column) ranges.
            let seg = unsafe { dst.slice(o * b.inner + is.start, is.len()) };
            if b.inner == 1 {
                seg[0] = arg_slice::<T, MAX>(&src[o * b.red..(o + 1) * b.red], split) as i64;
            } else {
                arg_cols::<T, MAX>(src, b, o, is.clone(), &mut best, seg);
            }
        }
    });
    out
}

// ---------------------------------------------------------------------- ops and backward

fn extreme(x: &Tensor, dims: &[usize], keepdim: bool, max: bool, split_ties: bool) -> Tensor {
    let op = if max { "max" } else { "min" };
    empty_reduction_check(x, dims, op);
    let storage = dispatch_dtype!(x.dtype(), |T| {
        let buf = if max {
            extreme_values::<T, true>(x, dims, op)
        } else {
            extreme_values::<T, false>(x, dims, op)
        };
        <T as Element>::into_storage(buf)
    });
    let plan = ReducePlan::new(x.layout(), dims);
    let dims = DimVec::from_slice(dims);
    Tensor::op_result(storage, plan.out_shape(keepdim), &[x], move || {
        Box::new(ExtremeBackward {
            dims,
            max,
            split_ties,
        })
    })
}

fn arg(x: &Tensor, dim: usize, keepdim: bool, max: bool) -> Tensor {
    let op = if max { "argmax" } else { "argmin" };
    empty_reduction_check(x, &[dim], op);
    let buf = dispatch_dtype!(x.dtype(), |T| {
        if max {
            arg_extreme::<T, true>(x, dim, op)
        } else {
            arg_extreme::<T, false>(x, dim, op)
        }
    });
    Tensor::from_buffer(buf, ReducePlan::new(x.layout(), &[dim]).out_shape(keepdim))
}

/// Backward of max/min: to the selected element along a single dim, or split evenly among
/// the elements equal to the result (`split_ties`, the `amax` convention).
struct ExtremeBackward {
    dims: DimVec,
    max: bool,
    split_ties: bool,
}

impl GradFn for ExtremeBackward {
    fn name(&self) -> &'static str {
        if self.max {
            "max"
        } else {
            "min"
        }
    }

    fn backward(&self, inputs: &[Tensor], output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        let g = g.contiguous();
        let grad = dispatch_float!(x.dtype(), self.name(), |T| {
            let gs = g.storage();
            let gv =
                &crate::typed_slice!(gs, T, self.name())[g.layout().contiguous_range().unwrap()];
            if self.split_ties {
                let out = output.contiguous();
                let os = out.storage();
                let ov = &crate::typed_slice!(os, T, self.name())
                    [out.layout().contiguous_range().unwrap()];
                let (xc, b, perm) = canonical(x, &self.dims);
                let xs = xc.storage();
                let xv = &crate::typed_slice!(xs, T, self.name())
                    [xc.layout().contiguous_range().unwrap()];
                uncanonical(split_ties_grad(xv, b, ov, gv), xc.shape(), perm)
            } else {
                let d = self.dims[0];
                let idx = if self.max {
                    arg_extreme::<T, true>(x, d, "max_backward")
                } else {
                    arg_extreme::<T, false>(x, d, "min_backward")
                };
                let b = Blocks::of(x.dims(), &[d]).unwrap();
                let mut grad = Buffer::<T>::uninit(x.elem_count());
                for_each_chunk(&mut grad, |_, c| c.fill(<T as num_traits::Zero>::zero()));
                for (k, (&i, &gk)) in idx.iter().zip(gv).enumerate() {
                    grad[b.at(k / b.inner, i as usize, k % b.inner)] = gk;
                }
                Tensor::from_buffer(grad, x.shape().clone())
            }
        });
        vec![Some(grad)]
    }
}

/// `g / count` at the elements equal to their reduced value `out`, 0 elsewhere.
fn split_ties_grad<T: Float>(xv: &[T], b: Blocks, out: &[T], g: &[T]) -> Buffer<T> {
    let mut grad = Buffer::<T>::uninit(xv.len());
    let dst = SharedMut::new(&mut grad);
    for_each_block(b, |os, is| {
        let mut count = vec![0usize; is.len()];
        for o in os {
            if b.inner == 1 {
                let row = o * b.red..(o + 1) * b.red;
                let m = out[o];
                let n = xv[row.clone()].iter().filter(|&&x| matches(x, m)).count();
                let w = g[o] / T::from_f64(n as f64);
                // SAFETY: tasks cover disjoint outer ranges.
                let d = unsafe { dst.slice(row.start, b.red) };
                for (d, &x) in d.iter_mut().zip(&xv[row]) {
                    *d = if matches(x, m) { w } else { T::zero() };
                }
                continue;
            }
            let (ms, gs) = (&out[o * b.inner..], &g[o * b.inner..]);
            count.fill(0);
            for r in 0..b.red {
                let s = b.at(o, r, is.start);
                for (k, (c, &x)) in count.iter_mut().zip(&xv[s..s + is.len()]).enumerate() {
                    *c += matches(x, ms[is.start + k]) as usize;
                }
            }
            for r in 0..b.red {
                let s = b.at(o, r, is.start);
                // SAFETY: tasks cover disjoint (outer, column) ranges.
                let d = unsafe { dst.slice(s, is.len()) };
                for (k, (d, &x)) in d.iter_mut().zip(&xv[s..s + is.len()]).enumerate() {
                    let i = is.start + k;
                    *d = if matches(x, ms[i]) {
                        gs[i] / T::from_f64(count[k] as f64)
                    } else {
                        T::zero()
                    };
                }
            }
        }
    });
    grad
}

impl Tensor {
    /// Maximum over `dims` (one dim, a list, or `()` for all), keeping them as size 1 when `keepdim`.
    pub fn max(&self, dims: impl Dims, keepdim: bool) -> Tensor {
        let dims = dims.resolve_all(self.rank(), "max");
        extreme(self, &dims, keepdim, true, dims.len() != 1)
    }

    /// Minimum over `dims` (one dim, a list, or `()` for all), keeping them as size 1 when `keepdim`.
    pub fn min(&self, dims: impl Dims, keepdim: bool) -> Tensor {
        let dims = dims.resolve_all(self.rank(), "min");
        extreme(self, &dims, keepdim, false, dims.len() != 1)
    }

    /// Maximum of all elements as a rank-0 tensor (gradient split evenly among ties).
    pub fn max_all(&self) -> Tensor {
        let dims = ().resolve_all(self.rank(), "max_all");
        extreme(self, &dims, false, true, true)
    }

    /// Minimum of all elements as a rank-0 tensor (gradient split evenly among ties).
    pub fn min_all(&self) -> Tensor {
        let dims = ().resolve_all(self.rank(), "min_all");
        extreme(self, &dims, false, false, true)
    }

    /// Index (i64) of the first maximum along `dim` (a NaN counts as the maximum).
    pub fn argmax(&self, dim: impl Dim, keepdim: bool) -> Tensor {
        arg(self, dim.resolve(self.rank(), "argmax"), keepdim, true)
    }

    /// Index (i64) of the first minimum along `dim` (a NaN counts as the minimum).
    pub fn argmin(&self, dim: impl Dim, keepdim: bool) -> Tensor {
        arg(self, dim.resolve(self.rank(), "argmin"), keepdim, false)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::DType;

    /// Reference reduction over `dims` of a row-major `shape`: `f` gets the reduced values
    /// (in row-major order) of each kept position.
    pub(crate) fn reference<R>(
        vals: &[f64],
        shape: &[usize],
        dims: &[usize],
        f: impl Fn(&[f64]) -> R,
    ) -> Vec<R> {
        let strides: Vec<usize> = (0..shape.len())
            .map(|i| shape[i + 1..].iter().product())
            .collect();
        let kept: Vec<usize> = (0..shape.len()).filter(|d| !dims.contains(d)).collect();
        let n_out: usize = kept.iter().map(|&d| shape[d]).product();
        let n_red: usize = dims.iter().map(|&d| shape[d]).product();
        let unravel = |mut k: usize, ds: &[usize]| -> usize {
            let mut off = 0;
            for &d in ds.iter().rev() {
                off += (k % shape[d]) * strides[d];
                k /= shape[d];
            }
            off
        };
        (0..n_out)
            .map(|o| {
                let base = unravel(o, &kept);
                let group: Vec<f64> = (0..n_red).map(|j| vals[base + unravel(j, dims)]).collect();
                f(&group)
            })
            .collect()
    }

    fn ref_max(g: &[f64]) -> f64 {
        g.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
    }
    fn ref_min(g: &[f64]) -> f64 {
        g.iter().cloned().fold(f64::INFINITY, f64::min)
    }
    fn ref_argmax(g: &[f64]) -> i64 {
        let m = ref_max(g);
        g.iter().position(|&v| v == m).unwrap() as i64
    }
    fn ref_argmin(g: &[f64]) -> i64 {
        let m = ref_min(g);
        g.iter().position(|&v| v == m).unwrap() as i64
    }

    #[test]
    fn values_over_any_dims_match_reference() {
        let shape = [3usize, 4, 5];
        let x = randn_f64(&shape, 1);
        let v = x.to_vec::<f64>();
        let cases: Vec<Vec<usize>> = vec![
            vec![0],
            vec![1],
            vec![2],
            vec![0, 1],
            vec![1, 2],
            vec![0, 2],
            vec![0, 1, 2],
        ];
        for dims in cases {
            let got = x.max(dims.as_slice(), false).to_vec::<f64>();
            assert_eq!(got, reference(&v, &shape, &dims, ref_max), "max {dims:?}");
            let got = x.min(dims.as_slice(), true);
            let mut keep = shape.to_vec();
            for &d in &dims {
                keep[d] = 1;
            }
            assert_eq!(got.dims(), keep.as_slice());
            assert_eq!(got.to_vec::<f64>(), reference(&v, &shape, &dims, ref_min));
        }
        assert_eq!(x.max(-1i32, false).dims(), &[3, 4]);
        assert_eq!(x.max_all().rank(), 0);
        assert_eq!(x.max_all().item(), ref_max(&v));
        assert_eq!(x.min_all().item(), ref_min(&v));
    }

    #[test]
    fn non_contiguous_inputs_match_reference() {
        let x = randn_f64(&[4, 6], 2);
        let t = x.t(); // [6, 4]
        let tv = t.contiguous().to_vec::<f64>();
        for d in 0..2 {
            assert_eq!(
                t.max(d, false).to_vec::<f64>(),
                reference(&tv, &[6, 4], &[d], ref_max)
            );
            assert_eq!(
                t.argmin(d, false).to_vec::<i64>(),
                reference(&tv, &[6, 4], &[d], ref_argmin)
            );
        }
        let n = x.narrow(1, 1, 3);
        let nv = n.contiguous().to_vec::<f64>();
        assert_eq!(
            n.min(1, false).to_vec::<f64>(),
            reference(&nv, &[4, 3], &[1], ref_min)
        );
        assert_eq!(
            n.argmax(1, true).to_vec::<i64>(),
            reference(&nv, &[4, 3], &[1], ref_argmax)
        );
        assert_eq!(n.argmax(1, true).dims(), &[4, 1]);
    }

    #[test]
    fn permuted_views_reduce_in_storage_order() {
        let x = randn_f64(&[3, 4, 5], 4);
        let l = |p: &[usize]| x.permute(p).layout().clone();
        // [5, 3, 4] view: reducing the view's dim 0 is reducing storage's last dim.
        let (_, b) = storage_blocks(&l(&[2, 0, 1]), &[0]).unwrap();
        assert_eq!(
            b,
            Blocks {
                outer: 12,
                red: 5,
                inner: 1
            }
        );
        // Kept dims in swapped storage order: outputs would not be row-major.
        assert!(storage_blocks(&l(&[1, 0, 2]), &[2]).is_none());
        // Reduced dims not adjacent in storage order.
        assert!(storage_blocks(&l(&[2, 0, 1]), &[0, 1]).is_none());
        let cases: [&[usize]; 7] = [&[0], &[1], &[2], &[0, 1], &[1, 2], &[0, 2], &[0, 1, 2]];
        for perm in [[2usize, 0, 1], [1, 0, 2], [0, 2, 1], [2, 1, 0]] {
            let p = x.permute(&perm);
            let pv = p.contiguous().to_vec::<f64>();
            for dims in cases {
                let want = reference(&pv, p.dims(), dims, ref_max);
                assert_eq!(
                    p.max(dims, false).to_vec::<f64>(),
                    want,
                    "{perm:?} {dims:?}"
                );
            }
            for d in 0..3 {
                let want = reference(&pv, p.dims(), &[d], ref_argmin);
                assert_eq!(p.argmin(d, false).to_vec::<i64>(), want, "{perm:?} {d}");
            }
        }
    }

    #[test]
    fn argmax_argmin_first_occurrence_on_ties() {
        let x = Tensor::from_slice(&[1f32, 3., 3., 0., 0., 2.], [2, 3]);
        assert_eq!(x.argmax(1, false).to_vec::<i64>(), vec![1, 2]);
        assert_eq!(x.argmin(1, false).to_vec::<i64>(), vec![0, 0]);
        assert_eq!(x.argmax(0, false).to_vec::<i64>(), vec![0, 0, 0]);
        assert_eq!(x.argmin(0, false).to_vec::<i64>(), vec![1, 1, 1]);
        assert_eq!(x.argmax(0, false).dtype(), DType::I64);
        // Strided column kernel with ties: [3, 2] along dim 0.
        let y = Tensor::from_slice(&[5f64, 1., 5., 1., 2., 1.], [3, 2]);
        assert_eq!(y.argmax(0, false).to_vec::<i64>(), vec![0, 0]);
        assert_eq!(y.argmin(0, false).to_vec::<i64>(), vec![2, 0]);
    }

    #[test]
    fn nan_propagates_and_is_selected() {
        let nan = f32::NAN;
        let x = Tensor::from_slice(&[1f32, nan, 5., nan, 0., 2., 7., 1., 3.], [3, 3]);
        let mx = x.max(1, false).to_vec::<f32>();
        assert!(mx[0].is_nan() && mx[1].is_nan() && mx[2] == 7.0);
        let mn = x.min(1, false).to_vec::<f32>();
        assert!(mn[0].is_nan() && mn[1].is_nan() && mn[2] == 1.0);
        assert_eq!(x.argmax(1, false).to_vec::<i64>(), vec![1, 0, 0]);
        assert_eq!(x.argmin(1, false).to_vec::<i64>(), vec![1, 0, 1]);
        // Along dim 0 (column kernel) and over all.
        assert_eq!(x.argmax(0, false).to_vec::<i64>(), vec![1, 0, 0]);
        assert_eq!(x.argmin(0, false).to_vec::<i64>(), vec![1, 0, 1]);
        let c = x.max(0, false).to_vec::<f32>();
        assert!(c[0].is_nan() && c[1].is_nan() && c[2] == 5.0);
        assert!(x.max_all().item().is_nan());
        assert!(x.min_all().item().is_nan());
        // A NaN after more than eight elements (lane accumulators).
        let mut long = vec![1f64; 20];
        long[17] = f64::NAN;
        let l = Tensor::from_slice(&long, [20]);
        assert!(l.max(0, false).item().is_nan());
        assert_eq!(l.argmin(0, false).item(), 17.0);
    }

    #[test]
    fn integer_dtypes() {
        let x = Tensor::from_slice(&[3i64, -7, 9, 9, 0, -7], [2, 3]);
        assert_eq!(x.max(1, false).to_vec::<i64>(), vec![9, 9]);
        assert_eq!(x.min(0, false).to_vec::<i64>(), vec![3, -7, -7]);
        assert_eq!(x.argmax(1, false).to_vec::<i64>(), vec![2, 0]);
        assert_eq!(x.argmin(1, false).to_vec::<i64>(), vec![1, 2]);
        let u = Tensor::from_slice(&[4u32, 1, 8, 2], [4]);
        assert_eq!(u.max_all().to_vec::<u32>(), vec![8]);
        assert_eq!(u.min_all().to_vec::<u32>(), vec![1]);
        assert_eq!(u.argmax(0, false).item(), 2.0);
    }

    #[test]
    fn large_inputs_use_the_parallel_paths() {
        // Many rows, few long rows, one huge row, column reductions, several tiles per task.
        for (shape, dim) in [
            (vec![300usize, 257], 1usize),
            (vec![2, 140_001], 1),
            (vec![280_003], 0),
            (vec![3, 50_000], 0),
            (vec![70, 1100], 0),
            (vec![2, 20_000], 0),
            (vec![2, 100, 3000], 1),
        ] {
            let x = Tensor::randn(shape.as_slice(), 5);
            let v: Vec<f64> = x.to_f64_vec();
            let got = x.max(dim, false).to_f64_vec();
            assert_eq!(got, reference(&v, &shape, &[dim], ref_max), "{shape:?}");
            let got = x.min(dim, false).to_f64_vec();
            assert_eq!(got, reference(&v, &shape, &[dim], ref_min), "{shape:?}");
            let got = x.argmax(dim, false).to_vec::<i64>();
            assert_eq!(got, reference(&v, &shape, &[dim], ref_argmax), "{shape:?}");
            let got = x.argmin(dim, false).to_vec::<i64>();
            assert_eq!(got, reference(&v, &shape, &[dim], ref_argmin), "{shape:?}");
        }
        let x = Tensor::randn([300_000], 9);
        let v = x.to_f64_vec();
        assert_eq!(x.max_all().item(), ref_max(&v));
        assert_eq!(x.min_all().item(), ref_min(&v));
    }

    #[test]
    fn gradient_goes_to_first_max_along_one_dim() {
        let x = Tensor::from_slice(&[1f64, 4., 4., 2., 0., 2.], [2, 3]).requires_grad();
        x.max(1, false).sum_all().backward();
        assert_eq!(
            x.grad().unwrap().to_vec::<f64>(),
            vec![0., 1., 0., 1., 0., 0.]
        );
        x.zero_grad();
        x.min(0, true).sum_all().backward();
        assert_eq!(
            x.grad().unwrap().to_vec::<f64>(),
            vec![1., 0., 0., 0., 1., 1.]
        );
    }

    #[test]
    fn gradient_splits_ties_over_several_dims() {
        let x = Tensor::from_slice(&[1f64, 4., 4., 2., 4., 2.], [2, 3]).requires_grad();
        x.max_all().backward();
        let third = 1.0 / 3.0;
        assert_eq!(
            x.grad().unwrap().to_vec::<f64>(),
            vec![0., third, third, 0., third, 0.]
        );
        x.zero_grad();
        let y = Tensor::from_slice(&[2f64, 2., 5., 2.], [2, 1, 2]).requires_grad();
        y.min([0, 2], false).sum_all().backward();
        assert_eq!(
            y.grad().unwrap().to_vec::<f64>(),
            vec![1. / 3., 1. / 3., 0., 1. / 3.]
        );
    }

    #[test]
    fn gradcheck_max_min() {
        let x = randn_f64(&[3, 4, 5], 11).requires_grad();
        let xs = std::slice::from_ref(&x);
        for max in [true, false] {
            let f = |t: &Tensor, d: &[usize], k: bool| {
                if max {
                    t.max(d, k)
                } else {
                    t.min(d, k)
                }
            };
            gradcheck(|x| f(&x[0], &[2], false), xs).unwrap();
            gradcheck(|x| f(&x[0], &[1], true), xs).unwrap();
            gradcheck(|x| f(&x[0], &[0, 1], false), xs).unwrap();
            gradcheck(|x| f(&x[0], &[0, 2], true), xs).unwrap();
            gradcheck(|x| f(&x[0].transpose(0, 2), &[1], false), xs).unwrap();
            gradcheck(|x| f(&x[0].narrow(2, 1, 3), &[1, 2], false), xs).unwrap();
            gradcheck(|x| f(&x[0].transpose(1, 2), &[0, 2], false), xs).unwrap();
        }
        gradcheck(|x| x[0].max_all(), xs).unwrap();
        gradcheck(|x| x[0].t().min_all(), xs).unwrap();
        // Broadcast operand feeding the reduction.
        let b = randn_f64(&[5], 12).requires_grad();
        gradcheck(|x| x[0].add(&x[1]).max(1, false), &[x.clone(), b]).unwrap();
    }

    #[test]
    fn large_backward_matches_serial_rule() {
        let x = Tensor::randn([3, 40_000], 6)
            .to_dtype(DType::F64)
            .requires_grad();
        x.max(0, false).sum_all().backward();
        let idx = x.detach().argmax(0, false).to_vec::<i64>();
        let g = x.grad().unwrap().to_vec::<f64>();
        for (i, &k) in idx.iter().enumerate() {
            for r in 0..3 {
                assert_eq!(g[r * 40_000 + i], if r as i64 == k { 1.0 } else { 0.0 });
            }
        }
        x.zero_grad();
        x.max([0, 1], false).backward();
        let g = x.grad().unwrap().to_vec::<f64>();
        assert_eq!(g.iter().sum::<f64>(), 1.0);
        assert_eq!(g.iter().filter(|&&v| v == 1.0).count(), 1);
    }

    #[test]
    #[should_panic(expected = "max: cannot reduce over zero elements (dims [1] of shape [2, 0])")]
    fn empty_reduction_panics_with_shape() {
        let _ = Tensor::zeros([2, 0]).max(1, false);
    }

    #[test]
    #[should_panic(expected = "argmax: dim 2 out of range for a tensor of rank 2")]
    fn bad_dim_panics() {
        let _ = Tensor::zeros([2, 3]).argmax(2, false);
    }
}
