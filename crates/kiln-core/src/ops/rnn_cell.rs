//! Fused LSTM and GRU cell updates: from the gate pre-activations of one time step (the input
//! projection `x·W_ihᵀ + b` and the recurrent product `h·W_hhᵀ`) to the new state, in one pass
//! and one graph node per step, with hand-written backward rules.
//!
//! - [`lstm_cell`]`(xg, hg, c)`: gates `i, f, g, o` (PyTorch's order) of `xg + hg`;
//!   `c' = σ(f)·c + σ(i)·tanh(g)`, `h' = σ(o)·tanh(c')`; returns `[2, B, H]` holding `h'` then `c'`.
//! - [`gru_cell`]`(xg, hg, b_hh, h)`: `r, z = σ(xg + hg + b_hh)`,
//!   `n = tanh(xg_n + r·(hg_n + b_hn))`, `h' = (1 − z)·n + z·h`; returns `[B, H]`.
//!
//! The gate inputs may be row-strided views (a time step of a projection of the whole sequence):
//! rows are read in place when their elements are adjacent. f32 activations use the vectorised
//! `vmath` kernels; rows are split across threads above `PARALLEL_THRESHOLD` elements.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dispatch_float;
use crate::dtype::{Element, Float};
use crate::parallel::{install, num_threads, PARALLEL_THRESHOLD};
use crate::tensor::Tensor;
use crate::vmath;

/// Sigmoid and tanh over slices: `vmath` for f32, scalar f64 math for f64.
trait Act: Float {
    fn sigmoid_into(src: &[Self], dst: &mut [Self]);
    fn tanh_into(src: &[Self], dst: &mut [Self]);
}

impl Act for f32 {
    fn sigmoid_into(src: &[f32], dst: &mut [f32]) {
        vmath::sigmoid(src, dst)
    }
    fn tanh_into(src: &[f32], dst: &mut [f32]) {
        vmath::tanh(src, dst)
    }
}

impl Act for f64 {
    fn sigmoid_into(src: &[f64], dst: &mut [f64]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = 1.0 / (1.0 + (-s).exp());
        }
    }
    fn tanh_into(src: &[f64], dst: &mut [f64]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.tanh();
        }
    }
}

/// A rank-2 tensor whose rows can be read in place: `t` itself when each row's elements are
/// adjacent (any row stride), a contiguous copy otherwise.
fn row_major(t: &Tensor) -> Tensor {
    if t.dims()[1] <= 1 || t.layout().strides()[1] == 1 {
        t.clone()
    } else {
        t.contiguous()
    }
}

/// Rows of a [`row_major`] tensor: `(storage slice, offset, row stride)`.
struct Rows<'a, T> {
    data: &'a [T],
    offset: usize,
    stride: usize,
    width: usize,
}

impl<T: Element> Rows<'_, T> {
    #[inline]
    fn row(&self, r: usize) -> &[T] {
        let s = self.offset + r * self.stride;
        &self.data[s..s + self.width]
    }
}

/// Calls `f` with the [`Rows`] of each tensor (read-locked for the duration).
macro_rules! with_rows {
    ($T:ty, [$($t:ident),*], |$($r:ident),*| $body:expr) => {{
        $(let $t = row_major($t);)*
        $(let $r = $t.storage();)*
        $(let $r = Rows::<$T> {
            data: <$T as Element>::slice(&$r).expect("dtype checked"),
            offset: $t.layout().offset(),
            stride: $t.layout().strides()[0],
            width: $t.dims()[1],
        };)*
        $body
    }};
}

/// Runs `f(first_row, blocks...)` over blocks of rows of up to three output slices, whose
/// rows are `w0`, `w1`, `w2` wide; on several threads when `work` is large.
fn par_rows3<T: Send>(
    rows: usize,
    work: usize,
    (o0, w0): (&mut [T], usize),
    (o1, w1): (&mut [T], usize),
    (o2, w2): (&mut [T], usize),
    f: impl Fn(usize, &mut [T], &mut [T], &mut [T]) + Sync,
) {
    let tasks = if work < PARALLEL_THRESHOLD {
        1
    } else {
        num_threads().min(rows).max(1)
    };
    if tasks == 1 {
        return f(0, o0, o1, o2);
    }
    let per = rows.div_ceil(tasks);
    // Split by hand: a zero-width output (`w = 0`) still yields one empty block per task.
    let mut parts = Vec::with_capacity(tasks);
    let (mut a, mut b, mut c) = (o0, o1, o2);
    let mut r = 0;
    while r < rows {
        let n = per.min(rows - r);
        let (a1, a2) = a.split_at_mut(n * w0);
        let (b1, b2) = b.split_at_mut(n * w1);
        let (c1, c2) = c.split_at_mut(n * w2);
        parts.push((r, a1, b1, c1));
        (a, b, c) = (a2, b2, c2);
        r += n;
    }
    use rayon::prelude::*;
    install(|| {
        parts.into_par_iter().for_each(|(r, a, b, c)| f(r, a, b, c));
    });
}

/// The elements of a contiguous tensor `t` whose storage is `s`.
fn whole<'a, T: Element>(s: &'a crate::Storage, t: &Tensor) -> &'a [T] {
    let r = t.layout().contiguous_range().expect("contiguous");
    &T::slice(s).expect("dtype checked")[r]
}

fn check2(op: &str, what: &str, t: &Tensor, rows: usize, cols: usize, dtype: crate::DType) {
    assert!(
        t.dims() == [rows, cols] && t.dtype() == dtype,
        "{op}: {what} must be [{rows}, {cols}] {dtype}, got {} {}",
        t.shape(),
        t.dtype()
    );
}

// ---------------------------------------------------------------------- LSTM

fn lstm_forward<T: Act>(
    xg: &Tensor,
    hg: &Tensor,
    c: &Tensor,
    b: usize,
    h: usize,
) -> (Buffer<T>, Buffer<T>) {
    let mut out = Buffer::<T>::uninit(2 * b * h);
    let mut act = Buffer::<T>::uninit(4 * b * h);
    with_rows!(T, [xg, hg, c], |xr, hr, cr| {
        let (ho, co) = out.split_at_mut(b * h);
        par_rows3(
            b,
            4 * b * h,
            (ho, h),
            (co, h),
            (&mut act, 4 * h),
            |r0, ho, co, act| {
                let mut pre = vec![T::zero(); 4 * h];
                let mut tc = vec![T::zero(); h];
                for (k, ((ho, co), act)) in ho
                    .chunks_mut(h)
                    .zip(co.chunks_mut(h))
                    .zip(act.chunks_mut(4 * h))
                    .enumerate()
                {
                    let r = r0 + k;
                    for ((p, &x), &y) in pre.iter_mut().zip(xr.row(r)).zip(hr.row(r)) {
                        *p = x + y;
                    }
                    T::sigmoid_into(&pre[..2 * h], &mut act[..2 * h]);
                    T::tanh_into(&pre[2 * h..3 * h], &mut act[2 * h..3 * h]);
                    T::sigmoid_into(&pre[3 * h..], &mut act[3 * h..]);
                    let cp = cr.row(r);
                    for j in 0..h {
                        co[j] = act[h + j] * cp[j] + act[j] * act[2 * h + j];
                    }
                    T::tanh_into(co, &mut tc);
                    for j in 0..h {
                        ho[j] = act[3 * h + j] * tc[j];
                    }
                }
            },
        );
    });
    (out, act)
}

/// `(d pre-activations [B, 4H], d c [B, H])`.
fn lstm_backward<T: Act>(
    act: &[T],
    out: &[T],
    c: &Tensor,
    grad: &[T],
    b: usize,
    h: usize,
) -> (Buffer<T>, Buffer<T>) {
    let mut dpre = Buffer::<T>::uninit(4 * b * h);
    let mut dc = Buffer::<T>::uninit(b * h);
    let one = T::one();
    let cout = &out[b * h..];
    let (gh, gc) = grad.split_at(b * h);
    with_rows!(T, [c], |cr| {
        let mut none: [T; 0] = [];
        par_rows3(
            b,
            4 * b * h,
            (&mut dpre, 4 * h),
            (&mut dc, h),
            (&mut none, 0),
            |r0, dp, dcb, _| {
                let mut tc = vec![T::zero(); h];
                for (k, (dp, dcr)) in dp.chunks_mut(4 * h).zip(dcb.chunks_mut(h)).enumerate() {
                    let r = r0 + k;
                    let a = &act[r * 4 * h..(r + 1) * 4 * h];
                    let cn = &cout[r * h..(r + 1) * h];
                    T::tanh_into(cn, &mut tc);
                    let (gh, gc) = (&gh[r * h..(r + 1) * h], &gc[r * h..(r + 1) * h]);
                    let cp = cr.row(r);
                    for j in 0..h {
                        let (i, f, g, o) = (a[j], a[h + j], a[2 * h + j], a[3 * h + j]);
                        let t = tc[j];
                        let dcj = gc[j] + gh[j] * o * (one - t * t);
                        dp[j] = dcj * g * i * (one - i);
                        dp[h + j] = dcj * cp[j] * f * (one - f);
                        dp[2 * h + j] = dcj * i * (one - g * g);
                        dp[3 * h + j] = gh[j] * t * o * (one - o);
                        dcr[j] = dcj * f;
                    }
                }
            },
        );
    });
    (dpre, dc)
}

struct LstmCellBackward {
    /// Activated gates `[B, 4H]` (i, f, g, o).
    act: Tensor,
}

impl GradFn for LstmCellBackward {
    fn name(&self) -> &'static str {
        "lstm_cell"
    }

    fn backward(&self, inputs: &[Tensor], output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let c = &inputs[2];
        let (b, h) = (c.dims()[0], c.dims()[1]);
        let g = g.contiguous();
        let (dpre, dc) = dispatch_float!(c.dtype(), "lstm_cell", |T| {
            let (sa, so, sg) = (self.act.storage(), output.storage(), g.storage());
            let (dpre, dc) = lstm_backward::<T>(
                whole(&sa, &self.act),
                whole(&so, output),
                c,
                whole(&sg, &g),
                b,
                h,
            );
            (
                Tensor::from_buffer(dpre, [b, 4 * h]),
                Tensor::from_buffer(dc, [b, h]),
            )
        });
        vec![
            inputs[0].tracks_grad().then(|| dpre.clone()),
            inputs[1].tracks_grad().then_some(dpre),
            inputs[2].tracks_grad().then_some(dc),
        ]
    }
}

/// One fused LSTM step: `xg`, `hg` `[B, 4H]` (input projection with both biases, and `h·W_hhᵀ`),
/// `c` `[B, H]`; returns `[2, B, H]` holding the new `h` and the new `c`.
pub fn lstm_cell(xg: &Tensor, hg: &Tensor, c: &Tensor) -> Tensor {
    let op = "lstm_cell";
    assert!(
        c.rank() == 2,
        "{op}: c must be [batch, hidden], got {}",
        c.shape()
    );
    let (b, h) = (c.dims()[0], c.dims()[1]);
    check2(op, "xg", xg, b, 4 * h, c.dtype());
    check2(op, "hg", hg, b, 4 * h, c.dtype());
    let (storage, act) = dispatch_float!(c.dtype(), op, |T| {
        let (out, act) = lstm_forward::<T>(xg, hg, c, b, h);
        (
            <T as Element>::into_storage(out),
            Tensor::from_buffer(act, [b, 4 * h]),
        )
    });
    Tensor::op_result(storage, [2, b, h].into(), &[xg, hg, c], || {
        LstmCellBackward { act }
    })
}

// ---------------------------------------------------------------------- GRU

fn gru_forward<T: Act>(
    xg: &Tensor,
    hg: &Tensor,
    bias: Option<&[T]>,
    hp: &Tensor,
    b: usize,
    h: usize,
) -> (Buffer<T>, Buffer<T>) {
    let mut out = Buffer::<T>::uninit(b * h);
    let mut saved = Buffer::<T>::uninit(4 * b * h);
    let one = T::one();
    with_rows!(T, [xg, hg, hp], |xr, hr, pr| {
        let mut none: [T; 0] = [];
        par_rows3(
            b,
            4 * b * h,
            (&mut out, h),
            (&mut saved, 4 * h),
            (&mut none, 0),
            |r0, ho, sv, _| {
                let mut pre = vec![T::zero(); 2 * h];
                for (k, (ho, sv)) in ho.chunks_mut(h).zip(sv.chunks_mut(4 * h)).enumerate() {
                    let r = r0 + k;
                    let (x, y, hprev) = (xr.row(r), hr.row(r), pr.row(r));
                    // sv = [r, z, n, W_hn h + b_hn]
                    for j in 0..2 * h {
                        pre[j] = x[j] + y[j] + bias.map_or(T::zero(), |bb| bb[j]);
                    }
                    T::sigmoid_into(&pre, &mut sv[..2 * h]);
                    for j in 0..h {
                        let hn = y[2 * h + j] + bias.map_or(T::zero(), |bb| bb[2 * h + j]);
                        sv[3 * h + j] = hn;
                        pre[j] = x[2 * h + j] + sv[j] * hn;
                    }
                    T::tanh_into(&pre[..h], &mut sv[2 * h..3 * h]);
                    for j in 0..h {
                        let (z, n) = (sv[h + j], sv[2 * h + j]);
                        ho[j] = (one - z) * n + z * hprev[j];
                    }
                }
            },
        );
    });
    (out, saved)
}

/// `(d xg [B, 3H], d hg [B, 3H], d h [B, H])`.
fn gru_backward<T: Act>(
    saved: &[T],
    hp: &Tensor,
    grad: &[T],
    b: usize,
    h: usize,
) -> [Buffer<T>; 3] {
    let mut dx = Buffer::<T>::uninit(3 * b * h);
    let mut dh = Buffer::<T>::uninit(3 * b * h);
    let mut dprev = Buffer::<T>::uninit(b * h);
    let one = T::one();
    with_rows!(T, [hp], |pr| {
        par_rows3(
            b,
            4 * b * h,
            (&mut dx, 3 * h),
            (&mut dh, 3 * h),
            (&mut dprev, h),
            |r0, dx, dh, dp| {
                for (k, ((dx, dh), dp)) in dx
                    .chunks_mut(3 * h)
                    .zip(dh.chunks_mut(3 * h))
                    .zip(dp.chunks_mut(h))
                    .enumerate()
                {
                    let row = r0 + k;
                    let sv = &saved[row * 4 * h..(row + 1) * 4 * h];
                    let g = &grad[row * h..(row + 1) * h];
                    let hprev = pr.row(row);
                    for j in 0..h {
                        let (r, z, n, hn) = (sv[j], sv[h + j], sv[2 * h + j], sv[3 * h + j]);
                        let dpn = g[j] * (one - z) * (one - n * n);
                        let dpr = dpn * hn * r * (one - r);
                        let dpz = g[j] * (hprev[j] - n) * z * (one - z);
                        dx[j] = dpr;
                        dx[h + j] = dpz;
                        dx[2 * h + j] = dpn;
                        dh[j] = dpr;
                        dh[h + j] = dpz;
                        dh[2 * h + j] = dpn * r;
                        dp[j] = g[j] * z;
                    }
                }
            },
        );
    });
    [dx, dh, dprev]
}

struct GruCellBackward {
    /// `[B, 4H]`: r, z, n and `W_hn h + b_hn` per row.
    saved: Tensor,
}

impl GradFn for GruCellBackward {
    fn name(&self) -> &'static str {
        "gru_cell"
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let hp = &inputs[2];
        let (b, h) = (hp.dims()[0], hp.dims()[1]);
        let g = g.contiguous();
        let [dx, dh, dprev] = dispatch_float!(hp.dtype(), "gru_cell", |T| {
            let (ss, sg) = (self.saved.storage(), g.storage());
            let [dx, dh, dp] = gru_backward::<T>(whole(&ss, &self.saved), hp, whole(&sg, &g), b, h);
            [
                Tensor::from_buffer(dx, [b, 3 * h]),
                Tensor::from_buffer(dh, [b, 3 * h]),
                Tensor::from_buffer(dp, [b, h]),
            ]
        });
        let mut grads = vec![
            inputs[0].tracks_grad().then_some(dx),
            None,
            inputs[2].tracks_grad().then_some(dprev),
        ];
        if let Some(bias) = inputs.get(3) {
            grads.push(bias.tracks_grad().then(|| dh.sum(0, false)));
        }
        grads[1] = inputs[1].tracks_grad().then_some(dh);
        grads
    }
}

/// One fused GRU step: `xg` `[B, 3H]` (input projection with `b_ih`), `hg` `[B, 3H]`
/// (`h·W_hhᵀ`), optional `b_hh` `[3H]`, `h` `[B, H]`; returns the new `h` `[B, H]`.
pub fn gru_cell(xg: &Tensor, hg: &Tensor, b_hh: Option<&Tensor>, h: &Tensor) -> Tensor {
    let op = "gru_cell";
    assert!(
        h.rank() == 2,
        "{op}: h must be [batch, hidden], got {}",
        h.shape()
    );
    let (b, hs) = (h.dims()[0], h.dims()[1]);
    check2(op, "xg", xg, b, 3 * hs, h.dtype());
    check2(op, "hg", hg, b, 3 * hs, h.dtype());
    if let Some(bias) = b_hh {
        assert!(
            bias.dims() == [3 * hs] && bias.dtype() == h.dtype(),
            "{op}: b_hh must be [{}] {}, got {} {}",
            3 * hs,
            h.dtype(),
            bias.shape(),
            bias.dtype()
        );
    }
    let (storage, saved) = dispatch_float!(h.dtype(), op, |T| {
        let bias: Option<Vec<T>> = b_hh.map(|t| t.contiguous().to_vec::<T>());
        let (out, saved) = gru_forward::<T>(xg, hg, bias.as_deref(), h, b, hs);
        (
            <T as Element>::into_storage(out),
            Tensor::from_buffer(saved, [b, 4 * hs]),
        )
    });
    let mut inputs = vec![xg, hg, h];
    inputs.extend(b_hh);
    Tensor::op_result(storage, [b, hs].into(), &inputs, || GruCellBackward {
        saved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, randn_f64};

    /// LSTM step from elementary ops: `[2, B, H]` of (h', c').
    fn lstm_reference(xg: &Tensor, hg: &Tensor, c: &Tensor) -> Tensor {
        let g = xg.add(hg).chunk(4, 1);
        let (i, f, gg, o) = (g[0].sigmoid(), g[1].sigmoid(), g[2].tanh(), g[3].sigmoid());
        let cn = f.mul(c).add(&i.mul(&gg));
        Tensor::stack(&[o.mul(&cn.tanh()), cn], 0)
    }

    /// GRU step from elementary ops.
    fn gru_reference(xg: &Tensor, hg: &Tensor, b: Option<&Tensor>, h: &Tensor) -> Tensor {
        let hg = match b {
            Some(b) => hg.add(b),
            None => hg.clone(),
        };
        let (x, y) = (xg.chunk(3, 1), hg.chunk(3, 1));
        let r = x[0].add(&y[0]).sigmoid();
        let z = x[1].add(&y[1]).sigmoid();
        let n = x[2].add(&r.mul(&y[2])).tanh();
        n.add(&z.mul(&h.sub(&n)))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        a.to_f64_vec()
            .iter()
            .zip(b.to_f64_vec())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// A `[rows, cols]` view with row stride `2·cols` (a time step of a `[rows, 2, cols]` tensor).
    fn strided(rows: usize, cols: usize, seed: u64) -> Tensor {
        randn_f64(&[rows, 2, cols], seed).narrow(1, 1, 1).squeeze(1)
    }

    #[test]
    fn lstm_cell_matches_reference_f32_f64_strided_and_large() {
        for (b, h) in [(3, 5), (64, 300)] {
            let xg = strided(b, 4 * h, 1);
            let hg = randn_f64(&[b, 4 * h], 2);
            let c = randn_f64(&[b, 2 * h], 3).narrow(1, 0, h);
            assert!(!xg.is_contiguous() && !c.is_contiguous());
            let d = max_diff(&lstm_cell(&xg, &hg, &c), &lstm_reference(&xg, &hg, &c));
            assert!(d < 1e-14, "f64 {b}x{h}: {d}");
            let f = |t: &Tensor| t.to_dtype(crate::DType::F32);
            let d = max_diff(
                &lstm_cell(&f(&xg), &f(&hg), &f(&c)),
                &lstm_reference(&xg, &hg, &c),
            );
            assert!(d < 1e-6, "f32 {b}x{h}: {d}");
        }
        // A transposed (column-strided) gate input is copied, with the same result.
        let xt = randn_f64(&[8, 2], 4).t();
        let (hg, c) = (randn_f64(&[2, 8], 5), randn_f64(&[2, 2], 6));
        let d = max_diff(&lstm_cell(&xt, &hg, &c), &lstm_reference(&xt, &hg, &c));
        assert!(d < 1e-14, "{d}");
    }

    #[test]
    fn gru_cell_matches_reference_f32_f64_strided_and_large() {
        for (b, h) in [(3, 5), (64, 400)] {
            let xg = strided(b, 3 * h, 1);
            let hg = randn_f64(&[b, 3 * h], 2);
            let bias = randn_f64(&[3 * h], 3);
            let hp = strided(b, h, 4);
            for bb in [Some(&bias), None] {
                let d = max_diff(
                    &gru_cell(&xg, &hg, bb, &hp),
                    &gru_reference(&xg, &hg, bb, &hp),
                );
                assert!(d < 1e-14, "f64 {b}x{h}: {d}");
            }
            let f = |t: &Tensor| t.to_dtype(crate::DType::F32);
            let d = max_diff(
                &gru_cell(&f(&xg), &f(&hg), Some(&f(&bias)), &f(&hp)),
                &gru_reference(&xg, &hg, Some(&bias), &hp),
            );
            assert!(d < 1e-5, "f32 {b}x{h}: {d}");
        }
    }

    #[test]
    fn gradcheck_lstm_cell() {
        let inputs = [
            randn_f64(&[3, 8], 1).requires_grad(),
            randn_f64(&[3, 8], 2).requires_grad(),
            randn_f64(&[3, 2], 3).requires_grad(),
        ];
        gradcheck(|t| lstm_cell(&t[0], &t[1], &t[2]), &inputs).unwrap();
        // Non-contiguous operands (views of the leaves), and one grad-free input.
        let x = randn_f64(&[3, 2, 8], 4).requires_grad();
        let c = randn_f64(&[2, 3], 5).requires_grad();
        let hg = randn_f64(&[3, 8], 6);
        gradcheck(
            |t| lstm_cell(&t[0].narrow(1, 1, 1).squeeze(1), &hg, &t[1].t()),
            &[x, c],
        )
        .unwrap();
    }

    #[test]
    fn gradcheck_gru_cell() {
        let inputs = [
            randn_f64(&[3, 6], 1).requires_grad(),
            randn_f64(&[3, 6], 2).requires_grad(),
            randn_f64(&[6], 3).requires_grad(),
            randn_f64(&[3, 2], 4).requires_grad(),
        ];
        gradcheck(|t| gru_cell(&t[0], &t[1], Some(&t[2]), &t[3]), &inputs).unwrap();
        gradcheck(|t| gru_cell(&t[0], &t[1], None, &t[3]), &inputs).unwrap();
        let x = randn_f64(&[3, 2, 6], 5).requires_grad();
        let h = randn_f64(&[2, 3], 6).requires_grad();
        let hg = randn_f64(&[3, 6], 7);
        gradcheck(
            |t| gru_cell(&t[0].narrow(1, 0, 1).squeeze(1), &hg, None, &t[1].t()),
            &[x, h],
        )
        .unwrap();
    }

    #[test]
    #[should_panic(expected = "lstm_cell: hg must be [2, 12] f32, got [2, 8] f32")]
    fn lstm_cell_shape_mismatch_panics() {
        lstm_cell(
            &Tensor::zeros([2, 12]),
            &Tensor::zeros([2, 8]),
            &Tensor::zeros([2, 3]),
        );
    }

    #[test]
    #[should_panic(expected = "gru_cell: b_hh must be [9] f32, got [3] f32")]
    fn gru_cell_bias_mismatch_panics() {
        let z = Tensor::zeros([2, 9]);
        gru_cell(&z, &z, Some(&Tensor::zeros([3])), &Tensor::zeros([2, 3]));
    }
}
