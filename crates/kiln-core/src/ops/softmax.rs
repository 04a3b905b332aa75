//! Softmax and log-softmax along one dim, forward and backward as fused kernels: one pass for
//! the max, one for exp and sum, one to normalise, per row. When the dim is not the last, rows
//! are strided and handled a tile of contiguous columns at a time.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dispatch_float;
use crate::dtype::{Element, Float};
use crate::layout::Layout;
use crate::ops::reduce::sum_slice;
use crate::ops::reduce_extrema::{extreme_slice, for_each_block, pick, tiles, Blocks, SharedMut};
use crate::shape::Dim;
use crate::tensor::Tensor;
use std::ops::Range;

/// Floats with a slice exponential: the vectorised `vmath::exp` for f32.
pub(crate) trait ExpSlice: Float {
    /// `dst[i] = exp(src[i])`.
    fn exp_slice(src: &[Self], dst: &mut [Self]);
}

impl ExpSlice for f32 {
    fn exp_slice(src: &[f32], dst: &mut [f32]) {
        crate::vmath::exp(src, dst)
    }
}

impl ExpSlice for f64 {
    fn exp_slice(src: &[f64], dst: &mut [f64]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x.exp();
        }
    }
}

/// Elements per call of the slice exponential (staged through a stack buffer).
const CHUNK: usize = 256;

/// `dst[k] = exp(pre(k, src[k]))`.
#[inline(always)]
pub(crate) fn exp_of<T: ExpSlice>(src: &[T], dst: &mut [T], pre: impl Fn(usize, T) -> T) {
    let mut tmp = [T::zero(); CHUNK];
    for (c, (s, d)) in src.chunks(CHUNK).zip(dst.chunks_mut(CHUNK)).enumerate() {
        let t = &mut tmp[..s.len()];
        for (j, (t, &x)) in t.iter_mut().zip(s).enumerate() {
            *t = pre(c * CHUNK + j, x);
        }
        T::exp_slice(t, d);
    }
}

/// `dst = exp(src - shift)`; returns `Σ dst` in f64.
pub(crate) fn exp_shifted<T: ExpSlice>(src: &[T], shift: T, dst: &mut [T]) -> f64 {
    let mut total = 0.0;
    for (s, d) in src.chunks(CHUNK).zip(dst.chunks_mut(CHUNK)) {
        exp_of(s, d, |_, x| x - shift);
        total += Element::to_f64(sum_slice(d));
    }
    total
}

/// `Σ exp(src - shift)` in f64, without keeping the exponentials.
pub(crate) fn sum_exp_shifted<T: ExpSlice>(src: &[T], shift: T) -> f64 {
    let mut buf = [T::zero(); CHUNK];
    src.chunks(CHUNK)
        .map(|s| exp_shifted(s, shift, &mut buf[..s.len()]))
        .sum()
}

/// Dot product with eight independent accumulators.
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x * y)
        .fold(T::zero(), |s, v| s + v);
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Scratch vectors of one task, reused across its tiles.
struct Scratch<T> {
    a: Vec<T>,
    b: Vec<T>,
}

/// Runs a fused kernel over `b`, writing `out` (laid out like the input): `row(o, out_row)`
/// for each row when the dim is the last one, else `cols(o, tile, out, scratch)` for each tile
/// of columns of each outer index.
fn drive<T: Float>(
    b: Blocks,
    out: &mut [T],
    row: impl Fn(usize, &mut [T]) + Sync,
    cols: impl Fn(usize, Range<usize>, &SharedMut<T>, &mut Scratch<T>) + Sync,
) {
    let dst = SharedMut::new(out);
    for_each_block(b, |os, is| {
        let mut scratch = Scratch {
            a: Vec::new(),
            b: Vec::new(),
        };
        for o in os {
            if b.inner == 1 {
                // SAFETY: each outer index belongs to exactly one task.
                row(o, unsafe { dst.slice(o * b.red, b.red) });
            } else {
                for t in tiles(is.clone(), b.red) {
                    cols(o, t, &dst, &mut scratch);
                }
            }
        }
    });
}

/// Row `r` of outer index `o` restricted to the columns `t`, for writing.
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

/// Row `r` of outer index `o` restricted to the columns `t`.
#[inline(always)]
fn row<'a, T>(src: &'a [T], b: Blocks, o: usize, r: usize, t: &Range<usize>) -> &'a [T] {
    let s = b.at(o, r, t.start);
    &src[s..s + t.len()]
}

/// Column-wise max over the rows of a tile, into `m`.
fn col_max<T: Float>(x: &[T], b: Blocks, o: usize, t: &Range<usize>, m: &mut Vec<T>) {
    m.clear();
    m.extend_from_slice(row(x, b, o, 0, t));
    for r in 1..b.red {
        for (m, &v) in m.iter_mut().zip(row(x, b, o, r, t)) {
            *m = pick::<T, true>(*m, v);
        }
    }
}

// ---------------------------------------------------------------------- forward

fn softmax_forward<T: ExpSlice>(x: &[T], b: Blocks, out: &mut [T]) {
    drive(
        b,
        out,
        |o, y| {
            let x = &x[o * b.red..(o + 1) * b.red];
            let m = extreme_slice::<T, true>(x);
            let inv = T::one() / T::from_f64(exp_shifted(x, m, y));
            for v in y.iter_mut() {
                *v *= inv;
            }
        },
        |o, t, dst, s| {
            col_max(x, b, o, &t, &mut s.a);
            s.b.clear();
            s.b.resize(t.len(), T::zero());
            for r in 0..b.red {
                // SAFETY: this task owns (o, t); one row at a time.
                let y = unsafe { row_mut(dst, b, o, r, &t) };
                let m = &s.a[..y.len()];
                exp_of(row(x, b, o, r, &t), y, |k, v| v - m[k]);
                for (acc, &v) in s.b.iter_mut().zip(y.iter()) {
                    *acc += v;
                }
            }
            for acc in s.b.iter_mut() {
                *acc = T::one() / *acc;
            }
            for r in 0..b.red {
                // SAFETY: as above.
                let y = unsafe { row_mut(dst, b, o, r, &t) };
                for (v, &inv) in y.iter_mut().zip(&s.b) {
                    *v *= inv;
                }
            }
        },
    );
}

fn log_softmax_forward<T: ExpSlice>(x: &[T], b: Blocks, out: &mut [T]) {
    drive(
        b,
        out,
        |o, y| {
            let x = &x[o * b.red..(o + 1) * b.red];
            let m = extreme_slice::<T, true>(x);
            let ls = T::from_f64(sum_exp_shifted(x, m).ln());
            for (y, &v) in y.iter_mut().zip(x) {
                *y = (v - m) - ls;
            }
        },
        |o, t, dst, s| {
            col_max(x, b, o, &t, &mut s.a);
            // The exponentials of a row are staged in the output row, then overwritten.
            s.b.clear();
            s.b.resize(t.len(), T::zero());
            for r in 0..b.red {
                // SAFETY: this task owns (o, t); one row at a time.
                let y = unsafe { row_mut(dst, b, o, r, &t) };
                let m = &s.a[..y.len()];
                exp_of(row(x, b, o, r, &t), y, |k, v| v - m[k]);
                for (acc, &v) in s.b.iter_mut().zip(y.iter()) {
                    *acc += v;
                }
            }
            for acc in s.b.iter_mut() {
                *acc = acc.ln();
            }
            for r in 0..b.red {
                // SAFETY: as above.
                let y = unsafe { row_mut(dst, b, o, r, &t) };
                for ((y, &v), (&m, &ls)) in y
                    .iter_mut()
                    .zip(row(x, b, o, r, &t))
                    .zip(s.a.iter().zip(&s.b))
                {
                    *y = (v - m) - ls;
                }
            }
        },
    );
}

// ---------------------------------------------------------------------- backward

/// `gx = y ⊙ (g − Σ g ⊙ y)` along the dim.
fn softmax_backward<T: ExpSlice>(y: &[T], g: &[T], b: Blocks, gx: &mut [T]) {
    drive(
        b,
        gx,
        |o, gx| {
            let r = o * b.red..(o + 1) * b.red;
            let (y, g) = (&y[r.clone()], &g[r]);
            let d = dot(y, g);
            for ((out, &yv), &gv) in gx.iter_mut().zip(y).zip(g) {
                *out = yv * (gv - d);
            }
        },
        |o, t, dst, s| {
            s.a.clear();
            s.a.resize(t.len(), T::zero());
            for r in 0..b.red {
                for ((d, &yv), &gv) in
                    s.a.iter_mut()
                        .zip(row(y, b, o, r, &t))
                        .zip(row(g, b, o, r, &t))
                {
                    *d += yv * gv;
                }
            }
            for r in 0..b.red {
                // SAFETY: this task owns (o, t); one row at a time.
                let out = unsafe { row_mut(dst, b, o, r, &t) };
                for (((out, &yv), &gv), &d) in out
                    .iter_mut()
                    .zip(row(y, b, o, r, &t))
                    .zip(row(g, b, o, r, &t))
                    .zip(&s.a)
                {
                    *out = yv * (gv - d);
                }
            }
        },
    );
}

/// `gx = g − exp(y) ⊙ Σ g` along the dim (`y` is the log-softmax).
fn log_softmax_backward<T: ExpSlice>(y: &[T], g: &[T], b: Blocks, gx: &mut [T]) {
    drive(
        b,
        gx,
        |o, gx| {
            let r = o * b.red..(o + 1) * b.red;
            let (y, g) = (&y[r.clone()], &g[r]);
            let s = sum_slice(g);
            exp_of(y, gx, |_, v| v);
            for (out, &gv) in gx.iter_mut().zip(g) {
                *out = gv - *out * s;
            }
        },
        |o, t, dst, s| {
            s.a.clear();
            s.a.resize(t.len(), T::zero());
            for r in 0..b.red {
                for (acc, &gv) in s.a.iter_mut().zip(row(g, b, o, r, &t)) {
                    *acc += gv;
                }
            }
            for r in 0..b.red {
                // SAFETY: this task owns (o, t); one row at a time.
                let out = unsafe { row_mut(dst, b, o, r, &t) };
                exp_of(row(y, b, o, r, &t), out, |_, v| v);
                for ((out, &gv), &sum) in out.iter_mut().zip(row(g, b, o, r, &t)).zip(&s.a) {
                    *out = gv - *out * sum;
                }
            }
        },
    );
}

// ---------------------------------------------------------------------- ops

fn softmax_impl(x: &Tensor, dim: usize, log: bool) -> Tensor {
    let op = if log { "log_softmax" } else { "softmax" };
    let xc = x.detach().contiguous();
    let b = Blocks::of(x.dims(), &[dim]).expect("one dim is adjacent");
    let storage = dispatch_float!(x.dtype(), op, |T| {
        let guard = xc.storage();
        let src = &crate::typed_slice!(guard, T, op)[xc.layout().contiguous_range().unwrap()];
        let mut out = Buffer::<T>::uninit(src.len());
        if !src.is_empty() {
            if log {
                log_softmax_forward(src, b, &mut out);
            } else {
                softmax_forward(src, b, &mut out);
            }
        }
        <T as Element>::into_storage(out)
    });
    Tensor::op_result(storage, x.shape().clone(), &[x], || {
        Box::new(SoftmaxBackward { b, log })
    })
}

struct SoftmaxBackward {
    b: Blocks,
    log: bool,
}

impl GradFn for SoftmaxBackward {
    fn name(&self) -> &'static str {
        if self.log {
            "log_softmax"
        } else {
            "softmax"
        }
    }

    /// The rule reads the output (the probabilities), not the logits.
    fn reads_input(&self, _index: usize) -> bool {
        false
    }

    fn backward(&self, inputs: &[Tensor], output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (x, op) = (&inputs[0], self.name());
        let (y, g) = (output.contiguous(), g.contiguous());
        let storage = dispatch_float!(x.dtype(), op, |T| {
            let (ys, gs) = (y.storage(), g.storage());
            let yv = &crate::typed_slice!(ys, T, op)[y.layout().contiguous_range().unwrap()];
            let gv = &crate::typed_slice!(gs, T, op)[g.layout().contiguous_range().unwrap()];
            let mut gx = Buffer::<T>::uninit(yv.len());
            if !yv.is_empty() {
                if self.log {
                    log_softmax_backward(yv, gv, self.b, &mut gx);
                } else {
                    softmax_backward(yv, gv, self.b, &mut gx);
                }
            }
            <T as Element>::into_storage(gx)
        });
        vec![Some(Tensor::from_storage(
            storage,
            Layout::contiguous(x.shape().clone()),
        ))]
    }
}

impl Tensor {
    /// Softmax along `dim`: `exp(x - max) / Σ exp(x - max)` (float tensors).
    pub fn softmax(&self, dim: impl Dim) -> Tensor {
        softmax_impl(self, dim.resolve(self.rank(), "softmax"), false)
    }

    /// Log-softmax along `dim`: `x - max - ln Σ exp(x - max)` (float tensors).
    pub fn log_softmax(&self, dim: impl Dim) -> Tensor {
        softmax_impl(self, dim.resolve(self.rank(), "log_softmax"), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::DType;

    /// Softmax (or log-softmax) of row-major `vals` of `shape` along `dim`, in plain f64.
    fn reference(vals: &[f64], shape: &[usize], dim: usize, log: bool) -> Vec<f64> {
        let inner: usize = shape[dim + 1..].iter().product();
        let red = shape[dim];
        let outer: usize = shape[..dim].iter().product();
        let mut out = vec![0.0; vals.len()];
        for o in 0..outer {
            for i in 0..inner {
                let idx = |r: usize| (o * red + r) * inner + i;
                let m = (0..red)
                    .map(|r| vals[idx(r)])
                    .fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = (0..red).map(|r| (vals[idx(r)] - m).exp()).sum();
                for r in 0..red {
                    let z = vals[idx(r)] - m;
                    out[idx(r)] = if log { z - s.ln() } else { z.exp() / s };
                }
            }
        }
        out
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            let ok = (g - w).abs() <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan()) || g == w;
            assert!(ok, "element {k}: got {g}, want {w}");
        }
    }

    #[test]
    fn values_match_reference_along_every_dim() {
        let shape = [3usize, 4, 5];
        let x = randn_f64(&shape, 1).mul_scalar(3.0);
        let v = x.to_vec::<f64>();
        let x32 = x.to_dtype(DType::F32);
        for dim in 0..3 {
            for log in [false, true] {
                let want = reference(&v, &shape, dim, log);
                let (got, got32) = if log {
                    (x.log_softmax(dim), x32.log_softmax(dim))
                } else {
                    (x.softmax(dim), x32.softmax(dim))
                };
                assert_eq!(got.dims(), &shape);
                assert_close(&got.to_vec::<f64>(), &want, 1e-12);
                assert_close(&got32.to_f64_vec(), &want, 2e-6);
            }
        }
        assert_close(
            &x.softmax(-1i32).to_vec::<f64>(),
            &reference(&v, &shape, 2, false),
            1e-12,
        );
    }

    #[test]
    fn non_contiguous_inputs() {
        let x = randn_f64(&[4, 6], 2);
        let t = x.t(); // [6, 4]
        let tv = t.contiguous().to_vec::<f64>();
        for dim in 0..2 {
            assert_close(
                &t.softmax(dim).to_vec::<f64>(),
                &reference(&tv, &[6, 4], dim, false),
                1e-12,
            );
            assert_close(
                &t.log_softmax(dim).to_vec::<f64>(),
                &reference(&tv, &[6, 4], dim, true),
                1e-12,
            );
        }
        let n = x.narrow(1, 1, 4);
        let nv = n.contiguous().to_vec::<f64>();
        assert_close(
            &n.softmax(1).to_vec::<f64>(),
            &reference(&nv, &[4, 4], 1, false),
            1e-12,
        );
    }

    #[test]
    fn extreme_inputs_and_attention_masks_stay_finite() {
        let ninf = f64::NEG_INFINITY;
        let vals = [
            1e4,
            -1e4,
            0.0,
            1e4 - 1.0,
            ninf,
            3.0,
            ninf,
            -2.0,
            5.0,
            ninf,
            ninf,
            -1e4,
        ];
        let shape = [3usize, 4];
        for dim in [1usize, 0] {
            for dtype in [DType::F64, DType::F32] {
                let x = Tensor::from_slice(&vals, shape).to_dtype(dtype);
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                let p = x.softmax(dim).to_f64_vec();
                let lp = x.log_softmax(dim).to_f64_vec();
                assert!(p.iter().all(|v| v.is_finite()), "{p:?}");
                assert_close(&p, &reference(&vals, &shape, dim, false), tol);
                // Masked entries have log-probability -inf, the rest are finite.
                for (l, &v) in lp.iter().zip(&vals) {
                    assert_eq!(l.is_finite(), v.is_finite(), "{lp:?}");
                }
                assert_close(&lp, &reference(&vals, &shape, dim, true), tol);
            }
        }
        // Gradients through a masked softmax are finite, zero at masked entries.
        let x = Tensor::from_slice(&vals, shape).requires_grad();
        let w = randn_f64(&[3, 4], 3);
        x.softmax(1).mul(&w).sum_all().backward();
        let g = x.grad().unwrap().to_vec::<f64>();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        for (gv, &v) in g.iter().zip(&vals) {
            if v == ninf {
                assert_eq!(*gv, 0.0);
            }
        }
        x.zero_grad();
        x.log_softmax(1).narrow(1, 0, 1).sum_all().backward();
        assert!(x
            .grad()
            .unwrap()
            .to_vec::<f64>()
            .iter()
            .all(|v| v.is_finite()));
    }

    #[test]
    fn fully_masked_rows_give_nan_like_torch() {
        let x = Tensor::from_slice(&[f32::NEG_INFINITY; 3], [1, 3]);
        assert!(x.softmax(1).to_vec::<f32>().iter().all(|v| v.is_nan()));
    }

    #[test]
    fn large_inputs_use_the_parallel_paths() {
        for (shape, dim) in [
            (vec![300usize, 257], 1usize),
            (vec![2, 40_000], 1),
            (vec![3, 30_000], 0),
            (vec![64, 40, 30], 1),
            (vec![2, 20_000], 0),
            (vec![2, 100, 3000], 1),
        ] {
            let x = Tensor::randn(shape.as_slice(), 7).mul_scalar(4.0);
            let v = x.to_f64_vec();
            for log in [false, true] {
                let want = reference(&v, &shape, dim, log);
                let y = if log {
                    x.log_softmax(dim)
                } else {
                    x.softmax(dim)
                };
                assert_close(&y.to_f64_vec(), &want, 1e-5);
            }
            // Backward of both, against the analytic formulas in f64.
            let xg = x.to_dtype(DType::F64).requires_grad();
            let w = Tensor::randn(shape.as_slice(), 8).to_dtype(DType::F64);
            let wv = w.to_vec::<f64>();
            let p = reference(&v, &shape, dim, false);
            let inner: usize = shape[dim + 1..].iter().product();
            let red = shape[dim];
            for log in [false, true] {
                let y = if log {
                    xg.log_softmax(dim)
                } else {
                    xg.softmax(dim)
                };
                y.mul(&w).sum_all().backward();
                let got = xg.grad().unwrap().to_vec::<f64>();
                xg.zero_grad();
                let mut want = vec![0.0; v.len()];
                for base in (0..v.len()).filter(|k| (k / inner).is_multiple_of(red)) {
                    let idx = |r: usize| base + r * inner;
                    if log {
                        let s: f64 = (0..red).map(|r| wv[idx(r)]).sum();
                        for r in 0..red {
                            want[idx(r)] = wv[idx(r)] - p[idx(r)] * s;
                        }
                    } else {
                        let d: f64 = (0..red).map(|r| wv[idx(r)] * p[idx(r)]).sum();
                        for r in 0..red {
                            want[idx(r)] = p[idx(r)] * (wv[idx(r)] - d);
                        }
                    }
                }
                assert_close(&got, &want, 1e-9);
            }
        }
    }

    #[test]
    fn gradcheck_softmax_and_log_softmax() {
        let x = randn_f64(&[3, 4, 5], 11).requires_grad();
        let xs = std::slice::from_ref(&x);
        for dim in 0..3 {
            gradcheck(|x| x[0].softmax(dim), xs).unwrap();
            gradcheck(|x| x[0].log_softmax(dim), xs).unwrap();
        }
        // Non-contiguous inputs: transposed, and sliced.
        gradcheck(|x| x[0].transpose(0, 2).softmax(-1i32), xs).unwrap();
        gradcheck(|x| x[0].transpose(1, 2).log_softmax(1), xs).unwrap();
        gradcheck(|x| x[0].narrow(2, 1, 3).softmax(0), xs).unwrap();
        gradcheck(|x| x[0].narrow(1, 0, 2).log_softmax(-1i32), xs).unwrap();
        // Large logits.
        let big = randn_f64(&[2, 6], 12).mul_scalar(30.0).requires_grad();
        gradcheck(|x| x[0].softmax(1), std::slice::from_ref(&big)).unwrap();
        gradcheck(|x| x[0].log_softmax(0), std::slice::from_ref(&big)).unwrap();
    }

    #[test]
    #[should_panic(expected = "softmax: expected a float tensor (f32 or f64), got i64")]
    fn integer_input_panics() {
        let _ = Tensor::from_slice(&[1i64, 2], [2]).softmax(0);
    }

    #[test]
    #[should_panic(expected = "log_softmax: dim 2 out of range for a tensor of rank 2")]
    fn bad_dim_panics() {
        let _ = Tensor::zeros([2, 3]).log_softmax(2);
    }
}
