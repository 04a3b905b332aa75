//! Variance, standard deviation and log-sum-exp over any dims, numerically stable: variance
//! is two-pass (mean, then compensated squared deviations) with f64 accumulators, log-sum-exp
//! subtracts the max. Fused forward and backward kernels on the `[outer, red, inner]` blocks.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dispatch_float;
use crate::dtype::{Element, Float};
use crate::ops::reduce::{reduce_map, ReducePlan};
use crate::ops::reduce_extrema::{
    canonical, extreme_row, for_each_block, pick, reduce_row, storage_blocks, tiles, uncanonical,
    Blocks, SharedMut,
};
use crate::ops::softmax::{exp_of, sum_exp_shifted, ExpSlice};
use crate::parallel::num_threads;
use crate::shape::{DimVec, Dims};
use crate::tensor::Tensor;
use num_traits::{Float as _, Zero as _};
use std::ops::Range;

// ---------------------------------------------------------------------- row helpers

/// Sum of a slice in f64, eight lanes.
fn sum_f64<T: Float>(xs: &[T]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| Element::to_f64(x)).sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += Element::to_f64(c[k]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `(Σ (x - mean), Σ (x - mean)²)` in f64, eight lanes.
fn dev_sums<T: Float>(xs: &[T], mean: f64) -> (f64, f64) {
    let (mut a1, mut a2) = ([0f64; 8], [0f64; 8]);
    let chunks = xs.chunks_exact(8);
    let (mut t1, mut t2) = (0.0, 0.0);
    for &x in chunks.remainder() {
        let d = Element::to_f64(x) - mean;
        t1 += d;
        t2 += d * d;
    }
    for c in chunks {
        for k in 0..8 {
            let d = Element::to_f64(c[k]) - mean;
            a1[k] += d;
            a2[k] += d * d;
        }
    }
    (a1.iter().sum::<f64>() + t1, a2.iter().sum::<f64>() + t2)
}

/// Mean of a row in f64.
fn mean_row<T: Float>(xs: &[T], split: bool) -> f64 {
    reduce_row(xs, split, sum_f64::<T>, |a, b| a + b) / xs.len() as f64
}

/// Sum of squared deviations from the mean of a row (two-pass, compensated).
fn m2_row<T: Float>(xs: &[T], split: bool) -> f64 {
    let mean = mean_row(xs, split);
    let (d1, d2) = reduce_row(
        xs,
        split,
        |c| dev_sums(c, mean),
        |a, b| (a.0 + b.0, a.1 + b.1),
    );
    (d2 - d1 * d1 / xs.len() as f64).max(0.0)
}

/// The divisor `N - correction`, at least 0.
fn dof(n: usize, correction: usize) -> f64 {
    (n as f64 - correction as f64).max(0.0)
}

/// Variance (or standard deviation) from the squared deviations of `n` elements.
fn finish_var(m2: f64, n: usize, correction: usize, std: bool) -> f64 {
    let var = m2 / dof(n, correction);
    if std {
        var.sqrt()
    } else {
        var
    }
}

/// PyTorch's log-sum-exp of a row: the max is subtracted unless it is infinite.
fn lse_row<T: ExpSlice>(xs: &[T], split: bool) -> T {
    let m = extreme_row::<T, true>(xs, split);
    let shift = if m.is_infinite() { T::zero() } else { m };
    let s = reduce_row(xs, split, |c| sum_exp_shifted(c, shift), |a, b| a + b);
    T::from_f64(s.ln() + Element::to_f64(shift))
}

/// The shift of log-sum-exp's column `k`: its max, or 0 when that is infinite.
fn lse_shift<T: Float>(m: T) -> T {
    if m.is_infinite() {
        T::zero()
    } else {
        m
    }
}

/// Per-task scratch of the column kernels.
#[derive(Default)]
struct Cols<T> {
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
    t: Vec<T>,
    u: Vec<T>,
}

fn reset(v: &mut Vec<f64>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// Column means of the tile `t` of outer index `o`, into `mean`.
fn col_means<T: Float>(x: &[T], b: Blocks, o: usize, t: &Range<usize>, mean: &mut Vec<f64>) {
    reset(mean, t.len());
    for r in 0..b.red {
        let s = b.at(o, r, t.start);
        for (m, &v) in mean.iter_mut().zip(&x[s..s + t.len()]) {
            *m += Element::to_f64(v);
        }
    }
    let n = b.red as f64;
    for m in mean.iter_mut() {
        *m /= n;
    }
}

// ---------------------------------------------------------------------- drivers

/// Reduces `dims` of `x` to one value per kept position: `row(values, split)` on each row when
/// the reduced dims are the last contiguous block, `cols(x, blocks, o, tile, out, scratch)` on
/// tiles of strided columns otherwise, and `reduce_map` for other layouts.
fn reduce_blocks<T: Float>(
    x: &Tensor,
    dims: &[usize],
    op: &str,
    row: impl Fn(&[T], bool) -> T + Sync,
    cols: impl Fn(&[T], Blocks, usize, Range<usize>, &mut [T], &mut Cols<T>) + Sync,
) -> Buffer<T> {
    let Some((range, b)) = storage_blocks(x.layout(), dims) else {
        return reduce_map::<T, T>(x, dims, op, |xs| row(xs, false)).0;
    };
    let storage = x.storage();
    let src = &crate::typed_slice!(storage, T, op)[range];
    let mut out = Buffer::<T>::uninit(b.outer * b.inner);
    let dst = SharedMut::new(&mut out);
    let split = b.outer < num_threads();
    for_each_block(b, |os, is| {
        let mut scratch = Cols::default();
        for o in os {
            // SAFETY: tasks cover disjoint (outer, column) ranges.
            let seg = unsafe { dst.slice(o * b.inner + is.start, is.len()) };
            if b.inner == 1 {
                seg[0] = row(&src[o * b.red..(o + 1) * b.red], split);
            } else {
                for t in tiles(is.clone(), b.red) {
                    let out = &mut seg[t.start - is.start..t.end - is.start];
                    cols(src, b, o, t, out, &mut scratch);
                }
            }
        }
    });
    out
}

/// The gradient of a reduction of `x` over `dims`, in `x`'s shape: `row(o, x_row, gx_row,
/// split)` on each row of the canonical blocks when they are rows, else `cols(x, blocks, o,
/// tile, gx, scratch)`.
fn grad_blocks<T: Float>(
    x: &Tensor,
    dims: &[usize],
    row: impl Fn(usize, &[T], &mut [T], bool) + Sync,
    cols: impl Fn(&[T], Blocks, usize, Range<usize>, &SharedMut<T>, &mut Cols<T>) + Sync,
) -> Tensor {
    let (xc, b, perm) = canonical(x, dims);
    let storage = xc.storage();
    let xv = &crate::typed_slice!(storage, T, "backward")[xc.layout().contiguous_range().unwrap()];
    let mut gx = Buffer::<T>::uninit(xv.len());
    if !xv.is_empty() {
        let dst = SharedMut::new(&mut gx);
        let split = b.outer < num_threads();
        for_each_block(b, |os, is| {
            let mut scratch = Cols::default();
            for o in os {
                if b.inner == 1 {
                    let r = o * b.red..(o + 1) * b.red;
                    // SAFETY: each outer index belongs to exactly one task.
                    let gx = unsafe { dst.slice(r.start, b.red) };
                    row(o, &xv[r], gx, split);
                } else {
                    for t in tiles(is.clone(), b.red) {
                        cols(xv, b, o, t, &dst, &mut scratch);
                    }
                }
            }
        });
    }
    uncanonical(gx, xc.shape(), perm)
}

/// Row `r` of outer index `o` at the columns `t`, for writing.
///
/// # Safety
/// The caller's task owns `(o, t)` and holds no other slice of that row.
#[allow(clippy::mut_from_ref)]
#[inline(always)]
unsafe fn row_mut<'a, T>(
    dst: &'a SharedMut<T>,
    b: Blocks,
    o: usize,
    r: usize,
    t: &Range<usize>,
) -> &'a mut [T] {
    dst.slice(b.at(o, r, t.start), t.len())
}

/// The contiguous elements of `t` as a slice (of a tensor known to be contiguous).
fn values<T: Element>(t: &Tensor, op: &str) -> Vec<T> {
    let storage = t.storage();
    crate::typed_slice!(storage, T, op)[t.layout().contiguous_range().unwrap()].to_vec()
}

// ---------------------------------------------------------------------- variance

fn var_impl(x: &Tensor, dims: &[usize], correction: usize, keepdim: bool, std: bool) -> Tensor {
    let op = if std { "std" } else { "var" };
    let plan = ReducePlan::new(x.layout(), dims);
    let n = plan.reduced_count();
    let storage = dispatch_float!(x.dtype(), op, |T| {
        let buf = if n == 0 {
            Buffer::<T>::filled(plan.kept.elem_count(), T::nan())
        } else {
            reduce_blocks::<T>(
                x,
                dims,
                op,
                |xs, split| T::from_f64(finish_var(m2_row(xs, split), n, correction, std)),
                |x, b, o, t, out, s| {
                    col_means(x, b, o, &t, &mut s.a);
                    reset(&mut s.b, t.len());
                    reset(&mut s.c, t.len());
                    let w = t.len();
                    let (d1, d2, m) = (&mut s.b[..w], &mut s.c[..w], &s.a[..w]);
                    for r in 0..b.red {
                        let st = b.at(o, r, t.start);
                        let xs = &x[st..st + w];
                        for k in 0..w {
                            let d = Element::to_f64(xs[k]) - m[k];
                            d1[k] += d;
                            d2[k] += d * d;
                        }
                    }
                    for ((o, &d1), &d2) in out.iter_mut().zip(&s.b).zip(&s.c) {
                        let m2 = (d2 - d1 * d1 / n as f64).max(0.0);
                        *o = T::from_f64(finish_var(m2, n, correction, std));
                    }
                },
            )
        };
        <T as Element>::into_storage(buf)
    });
    let dims = DimVec::from_slice(dims);
    Tensor::op_result(storage, plan.out_shape(keepdim), &[x], move || {
        Box::new(VarBackward {
            dims,
            correction,
            std,
        })
    })
}

/// Backward of var/std: `g · 2 (x − mean) / (N − c)`, and for std divided by `2 std` (0 where
/// the std is 0, as PyTorch).
struct VarBackward {
    dims: DimVec,
    correction: usize,
    std: bool,
}

impl GradFn for VarBackward {
    fn name(&self) -> &'static str {
        if self.std {
            "std"
        } else {
            "var"
        }
    }

    fn backward(&self, inputs: &[Tensor], output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        let n: usize = self.dims.iter().map(|&d| x.dims()[d]).product();
        let denom = dof(n, self.correction);
        let grad = dispatch_float!(x.dtype(), self.name(), |T| {
            let (gv, ov) = (
                values::<T>(&g.contiguous(), self.name()),
                values::<T>(output, self.name()),
            );
            // Per output k: the factor applied to (x - mean).
            let coef = |k: usize| -> T {
                let (gk, ok) = (Element::to_f64(gv[k]), Element::to_f64(ov[k]));
                T::from_f64(if !self.std {
                    2.0 * gk / denom
                } else if ok == 0.0 {
                    0.0
                } else {
                    gk / (denom * ok)
                })
            };
            grad_blocks::<T>(
                x,
                &self.dims,
                |o, xs, gx, split| {
                    let (c, mean) = (coef(o), T::from_f64(mean_row(xs, split)));
                    for (d, &v) in gx.iter_mut().zip(xs) {
                        *d = c * (v - mean);
                    }
                },
                |x, b, o, t, dst, s| {
                    col_means(x, b, o, &t, &mut s.a);
                    s.t.clear();
                    s.t.extend(t.clone().map(|i| coef(o * b.inner + i)));
                    s.u.clear();
                    s.u.extend(s.a.iter().map(|&m| T::from_f64(m)));
                    for r in 0..b.red {
                        // SAFETY: this task owns (o, t); one row at a time.
                        let gx = unsafe { row_mut(dst, b, o, r, &t) };
                        let st = b.at(o, r, t.start);
                        for (((d, &v), &c), &m) in
                            gx.iter_mut().zip(&x[st..st + t.len()]).zip(&s.t).zip(&s.u)
                        {
                            *d = c * (v - m);
                        }
                    }
                },
            )
        });
        vec![Some(grad)]
    }
}

// ---------------------------------------------------------------------- logsumexp

fn logsumexp_impl(x: &Tensor, dims: &[usize], keepdim: bool) -> Tensor {
    let plan = ReducePlan::new(x.layout(), dims);
    let storage = dispatch_float!(x.dtype(), "logsumexp", |T| {
        let buf = if plan.reduced_count() == 0 {
            Buffer::<T>::filled(plan.kept.elem_count(), T::neg_infinity())
        } else {
            reduce_blocks::<T>(x, dims, "logsumexp", lse_row::<T>, |x, b, o, t, out, s| {
                // Column max (then the shift), staged in `s.t`.
                let first = b.at(o, 0, t.start);
                s.t.clear();
                s.t.extend_from_slice(&x[first..first + t.len()]);
                for r in 1..b.red {
                    let st = b.at(o, r, t.start);
                    for (m, &v) in s.t.iter_mut().zip(&x[st..st + t.len()]) {
                        *m = pick::<T, true>(*m, v);
                    }
                }
                for m in s.t.iter_mut() {
                    *m = lse_shift(*m);
                }
                reset(&mut s.a, t.len());
                s.u.clear();
                s.u.resize(t.len(), T::zero());
                for r in 0..b.red {
                    let st = b.at(o, r, t.start);
                    let shift = &s.t[..t.len()];
                    exp_of(&x[st..st + t.len()], &mut s.u, |k, v| v - shift[k]);
                    for (acc, &e) in s.a.iter_mut().zip(&s.u) {
                        *acc += Element::to_f64(e);
                    }
                }
                for ((o, &sum), &shift) in out.iter_mut().zip(&s.a).zip(&s.t) {
                    *o = T::from_f64(sum.ln() + Element::to_f64(shift));
                }
            })
        };
        <T as Element>::into_storage(buf)
    });
    let dims = DimVec::from_slice(dims);
    Tensor::op_result(storage, plan.out_shape(keepdim), &[x], move || {
        Box::new(LogSumExpBackward { dims })
    })
}

/// Backward of logsumexp: `g · exp(x − out)` (0 where `out` is −inf: every input was −inf).
struct LogSumExpBackward {
    dims: DimVec,
}

impl GradFn for LogSumExpBackward {
    fn name(&self) -> &'static str {
        "logsumexp"
    }

    fn backward(&self, inputs: &[Tensor], output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        let grad = dispatch_float!(x.dtype(), "logsumexp", |T| {
            let (gv, ov) = (
                values::<T>(&g.contiguous(), "logsumexp"),
                values::<T>(output, "logsumexp"),
            );
            // exp(x - out) with the shift -inf (so exp gives 0) where out is -inf.
            let shift = |v: T, out: T| {
                if out == T::neg_infinity() {
                    out
                } else {
                    v - out
                }
            };
            grad_blocks::<T>(
                x,
                &self.dims,
                |o, xs, gx, _| {
                    let (out, gk) = (ov[o], gv[o]);
                    exp_of(xs, gx, |_, v| shift(v, out));
                    for d in gx.iter_mut() {
                        *d *= gk;
                    }
                },
                |x, b, o, t, dst, _| {
                    let k0 = o * b.inner + t.start;
                    let (outs, gs) = (&ov[k0..k0 + t.len()], &gv[k0..k0 + t.len()]);
                    for r in 0..b.red {
                        // SAFETY: this task owns (o, t); one row at a time.
                        let gx = unsafe { row_mut(dst, b, o, r, &t) };
                        let st = b.at(o, r, t.start);
                        exp_of(&x[st..st + t.len()], gx, |k, v| shift(v, outs[k]));
                        for (d, &gk) in gx.iter_mut().zip(gs) {
                            *d *= gk;
                        }
                    }
                },
            )
        });
        vec![Some(grad)]
    }
}

impl Tensor {
    /// Variance over `dims` with divisor `N - correction` (0: population, 1: unbiased), keeping them as size 1 when `keepdim`.
    pub fn var(&self, dims: impl Dims, correction: usize, keepdim: bool) -> Tensor {
        let dims = dims.resolve_all(self.rank(), "var");
        var_impl(self, &dims, correction, keepdim, false)
    }

    /// Standard deviation over `dims` with divisor `N - correction`, keeping them as size 1 when `keepdim`.
    pub fn std(&self, dims: impl Dims, correction: usize, keepdim: bool) -> Tensor {
        let dims = dims.resolve_all(self.rank(), "std");
        var_impl(self, &dims, correction, keepdim, true)
    }

    /// `ln Σ exp(x)` over `dims`, computed stably (max subtracted), keeping them as size 1 when `keepdim`.
    pub fn logsumexp(&self, dims: impl Dims, keepdim: bool) -> Tensor {
        let dims = dims.resolve_all(self.rank(), "logsumexp");
        logsumexp_impl(self, &dims, keepdim)
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::{DType, Tensor};

    /// The groups of reduced values (row-major) of each kept position of `shape`.
    fn groups(vals: &[f64], shape: &[usize], dims: &[usize]) -> Vec<Vec<f64>> {
        crate::ops::reduce_extrema::tests::reference(vals, shape, dims, |g| g.to_vec())
    }

    fn ref_var(g: &[f64], correction: usize) -> f64 {
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        g.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - correction as f64)
    }

    fn ref_lse(g: &[f64]) -> f64 {
        let m = g.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if m.is_infinite() {
            return g.iter().map(|v| v.exp()).sum::<f64>().ln();
        }
        m + g.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            let ok = (g - w).abs() <= tol * (1.0 + w.abs()) || g == w || (g.is_nan() && w.is_nan());
            assert!(ok, "element {k}: got {g}, want {w}");
        }
    }

    const CASES: [&[usize]; 7] = [&[0], &[1], &[2], &[0, 1], &[1, 2], &[0, 2], &[0, 1, 2]];

    #[test]
    fn var_std_match_reference_over_any_dims() {
        let shape = [3usize, 4, 5];
        let x = randn_f64(&shape, 1).add_scalar(2.0);
        let v = x.to_vec::<f64>();
        let x32 = x.to_dtype(DType::F32);
        let v32 = x32.to_f64_vec();
        for dims in CASES {
            for correction in [0usize, 1] {
                let want: Vec<f64> = groups(&v, &shape, dims)
                    .iter()
                    .map(|g| ref_var(g, correction))
                    .collect();
                assert_close(
                    &x.var(dims, correction, false).to_vec::<f64>(),
                    &want,
                    1e-12,
                );
                let sd: Vec<f64> = want.iter().map(|v| v.sqrt()).collect();
                assert_close(&x.std(dims, correction, true).to_vec::<f64>(), &sd, 1e-12);
                let want32: Vec<f64> = groups(&v32, &shape, dims)
                    .iter()
                    .map(|g| ref_var(g, correction))
                    .collect();
                assert_close(
                    &x32.var(dims, correction, false).to_f64_vec(),
                    &want32,
                    1e-6,
                );
            }
        }
        assert_eq!(x.var(1, 1, true).dims(), &[3, 1, 5]);
        assert_eq!(x.std((), 0, false).rank(), 0);
        // Non-contiguous input.
        let t = x.transpose(0, 2); // [5, 4, 3]
        let tv = t.contiguous().to_vec::<f64>();
        let want: Vec<f64> = groups(&tv, &[5, 4, 3], &[2])
            .iter()
            .map(|g| ref_var(g, 1))
            .collect();
        assert_close(&t.var(-1i32, 1, false).to_vec::<f64>(), &want, 1e-12);
        for perm in [[2usize, 0, 1], [1, 0, 2], [2, 1, 0]] {
            let p = x.permute(&perm);
            let pv = p.contiguous().to_vec::<f64>();
            for dims in CASES {
                let g = groups(&pv, p.dims(), dims);
                let want: Vec<f64> = g.iter().map(|g| ref_var(g, 0)).collect();
                assert_close(&p.var(dims, 0, false).to_vec::<f64>(), &want, 1e-12);
                let want: Vec<f64> = g.iter().map(|g| ref_lse(g)).collect();
                assert_close(&p.logsumexp(dims, false).to_vec::<f64>(), &want, 1e-12);
            }
        }
    }

    #[test]
    fn f32_variance_is_stable_with_a_large_offset() {
        // Naive E[x²] − E[x]² in f32 loses everything here; the two-pass f64 path does not.
        let n = 10_000;
        let vals: Vec<f64> = (0..n).map(|i| 1e4 + (i % 10) as f64 * 0.1).collect();
        let x = Tensor::from_slice(&vals, [n]).to_dtype(DType::F32);
        let want = ref_var(&x.to_f64_vec(), 0);
        let got = x.var(0, 0, false).item();
        assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
        // The column kernel too.
        let xc = x.reshape([n / 10, 10]);
        let got = xc.var(0, 0, false).to_f64_vec();
        let want: Vec<f64> = groups(&xc.to_f64_vec(), &[n / 10, 10], &[0])
            .iter()
            .map(|g| ref_var(g, 0))
            .collect();
        assert_close(&got, &want, 1e-5);
    }

    #[test]
    fn degenerate_counts_follow_torch() {
        let x = Tensor::from_slice(&[3f32, 3., 3.], [3, 1]);
        assert!(x
            .var(1, 1, false)
            .to_vec::<f32>()
            .iter()
            .all(|v| v.is_nan()));
        assert_eq!(x.var(1, 0, false).to_vec::<f32>(), vec![0.0; 3]);
        let e = Tensor::zeros([2, 0]);
        assert!(e
            .var(1, 0, false)
            .to_vec::<f32>()
            .iter()
            .all(|v| v.is_nan()));
        assert_eq!(
            e.logsumexp(1, false).to_vec::<f32>(),
            vec![f32::NEG_INFINITY; 2]
        );
    }

    #[test]
    fn logsumexp_matches_reference_over_any_dims() {
        let shape = [3usize, 4, 5];
        let x = randn_f64(&shape, 2).mul_scalar(5.0);
        let v = x.to_vec::<f64>();
        let x32 = x.to_dtype(DType::F32);
        for dims in CASES {
            let want: Vec<f64> = groups(&v, &shape, dims)
                .iter()
                .map(|g| ref_lse(g))
                .collect();
            assert_close(&x.logsumexp(dims, false).to_vec::<f64>(), &want, 1e-12);
            assert_close(&x32.logsumexp(dims, true).to_f64_vec(), &want, 1e-6);
        }
        let t = x.t(); // [3, 5, 4]
        let tv = t.contiguous().to_vec::<f64>();
        let want: Vec<f64> = groups(&tv, &[3, 5, 4], &[1])
            .iter()
            .map(|g| ref_lse(g))
            .collect();
        assert_close(&t.logsumexp(1, false).to_vec::<f64>(), &want, 1e-12);
    }

    #[test]
    fn logsumexp_handles_infinities_like_torch() {
        let (inf, ninf) = (f64::INFINITY, f64::NEG_INFINITY);
        let vals = [
            1e4, 1e4, -3.0, ninf, ninf, ninf, inf, 1.0, ninf, ninf, 2.0, 0.5,
        ];
        for dtype in [DType::F64, DType::F32] {
            let x = Tensor::from_slice(&vals, [4, 3]).to_dtype(dtype);
            let r = x.logsumexp(1, false).to_f64_vec();
            assert!((r[0] - (1e4 + 2f64.ln())).abs() < 1e-2, "{r:?}");
            assert_eq!(r[1], ninf);
            assert_eq!(r[2], inf);
            assert!((r[3] - (2f64.exp() + 0.5f64.exp()).ln()).abs() < 1e-6);
            // The same along dim 0 (column kernel).
            let c = x.t().contiguous().logsumexp(0, false).to_f64_vec();
            assert_eq!(c[1], ninf);
            assert_eq!(c[2], inf);
            assert!((c[0] - (1e4 + 2f64.ln())).abs() < 1e-2);
        }
        // Gradient of an all -inf row is 0, of a masked entry 0, elsewhere softmax.
        let x = Tensor::from_slice(&[ninf, ninf, ninf, ninf, 0.0, 0.0], [2, 3]).requires_grad();
        x.logsumexp(1, false).sum_all().backward();
        assert_eq!(
            x.grad().unwrap().to_vec::<f64>(),
            vec![0., 0., 0., 0., 0.5, 0.5]
        );
    }

    #[test]
    fn large_inputs_use_the_parallel_paths() {
        for (shape, dims) in [
            (vec![300usize, 257], vec![1usize]),
            (vec![2, 140_001], vec![1]),
            (vec![280_003], vec![0]),
            (vec![3, 50_000], vec![0]),
            (vec![20, 40, 100], vec![0, 2]),
            (vec![2, 20_000], vec![0]),
            (vec![2, 100, 3000], vec![1]),
        ] {
            let x = Tensor::randn(shape.as_slice(), 3).add_scalar(1.0);
            let v = x.to_f64_vec();
            let g = groups(&v, &shape, &dims);
            let want: Vec<f64> = g.iter().map(|g| ref_var(g, 1)).collect();
            assert_close(&x.var(dims.as_slice(), 1, false).to_f64_vec(), &want, 1e-5);
            let want: Vec<f64> = g.iter().map(|g| ref_lse(g)).collect();
            assert_close(
                &x.logsumexp(dims.as_slice(), false).to_f64_vec(),
                &want,
                1e-5,
            );
            // Backward against the analytic formulas.
            let xg = x.to_dtype(DType::F64).requires_grad();
            xg.var(dims.as_slice(), 1, true).sum_all().backward();
            let gv = xg.grad().unwrap().to_vec::<f64>();
            xg.zero_grad();
            xg.logsumexp(dims.as_slice(), true).sum_all().backward();
            let gl = xg.grad().unwrap().to_vec::<f64>();
            let (mean, lse) = (
                xg.detach()
                    .mean(dims.as_slice(), true)
                    .broadcast_as(xg.shape().clone())
                    .to_vec::<f64>(),
                xg.detach()
                    .logsumexp(dims.as_slice(), true)
                    .broadcast_as(xg.shape().clone())
                    .to_vec::<f64>(),
            );
            let n = g[0].len() as f64;
            for k in 0..v.len() {
                let wv = 2.0 * (v[k] - mean[k]) / (n - 1.0);
                assert!((gv[k] - wv).abs() < 1e-9, "{shape:?} var grad {k}");
                let wl = (v[k] - lse[k]).exp();
                assert!((gl[k] - wl).abs() < 1e-9, "{shape:?} lse grad {k}");
            }
        }
    }

    #[test]
    fn gradcheck_var_std_logsumexp() {
        let x = randn_f64(&[3, 4, 5], 11).requires_grad();
        let xs = std::slice::from_ref(&x);
        for dims in CASES {
            gradcheck(|x| x[0].var(dims, 1, false), xs).unwrap();
            gradcheck(|x| x[0].std(dims, 0, true), xs).unwrap();
            gradcheck(|x| x[0].logsumexp(dims, false), xs).unwrap();
        }
        // Non-contiguous inputs.
        gradcheck(|x| x[0].transpose(0, 2).var(1, 1, false), xs).unwrap();
        gradcheck(|x| x[0].narrow(2, 1, 3).std([0, 2], 1, false), xs).unwrap();
        gradcheck(|x| x[0].t().logsumexp(-1i32, true), xs).unwrap();
        // A broadcast operand feeding the reduction.
        let b = randn_f64(&[5], 12).requires_grad();
        gradcheck(
            |x| x[0].mul(&x[1]).std(-1i32, 1, false),
            &[x.clone(), b.clone()],
        )
        .unwrap();
        gradcheck(
            |x| x[0].add(&x[1]).logsumexp([0, 1], false),
            &[x.clone(), b],
        )
        .unwrap();
    }

    #[test]
    fn std_gradient_is_zero_for_constant_input() {
        let x = Tensor::full([2, 3], 1.5f64).requires_grad();
        x.std(1, 1, false).sum_all().backward();
        assert_eq!(x.grad().unwrap().to_vec::<f64>(), vec![0.0; 6]);
    }

    #[test]
    #[should_panic(expected = "var: expected a float tensor (f32 or f64), got i64")]
    fn integer_input_panics() {
        let _ = Tensor::from_slice(&[1i64, 2], [2]).var(0, 1, false);
    }

    #[test]
    #[should_panic(expected = "logsumexp: dim 3 out of range for a tensor of rank 2")]
    fn bad_dim_panics() {
        let _ = Tensor::zeros([2, 3]).logsumexp(3, false);
    }
}
