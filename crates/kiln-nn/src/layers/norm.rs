//! `LayerNorm` and `RMSNorm` with fused kernels: the forward makes two sweeps per row for the
//! statistics (mean, then the centred squares, each summed in f64 over 16 interleaved lanes)
//! and one to normalise (and scale/shift); the backward computes `dx`, `dweight` and
//! `dbias` in one kernel (its sums, then `dx`), accumulating the parameter gradients per thread
//! and skipping those of a frozen weight or bias. The row loops run in functions compiled for
//! AVX-512 or AVX2 when the CPU has them. Rows are split across threads for large inputs.

use crate::{Forward, Module, Param};
use kiln_core::alloc::Buffer;
use kiln_core::parallel::{for_chunk_pairs, num_threads, PARALLEL_THRESHOLD};
use kiln_core::vmath::{run_wide, WideKernel};
use kiln_core::{Element, Float, GradFn, Layout, Storage, Tensor};
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------- kernels

/// Runs `f(first_row, rows_of_a, rows_of_b)` over row blocks of `a` (`n` elements per row) and
/// `b` (one element per row), on several threads when the work is large. Returns each block's
/// result in order.
fn par_rows<A: Send, B: Send, R: Send>(
    n: usize,
    a: &mut [A],
    b: &mut [B],
    f: impl Fn(usize, &mut [A], &mut [B]) -> R + Sync,
) -> Vec<R> {
    let rows = b.len();
    let tasks = if rows * n < PARALLEL_THRESHOLD {
        1
    } else {
        num_threads().min(rows).max(1)
    };
    if tasks == 1 {
        return vec![f(0, a, b)];
    }
    let per = rows.div_ceil(tasks);
    let results: Vec<Mutex<Option<R>>> =
        (0..rows.div_ceil(per)).map(|_| Mutex::new(None)).collect();
    for_chunk_pairs(a, per * n, b, per, true, |i, a, b| {
        *results[i].lock().unwrap() = Some(f(i * per, a, b));
    });
    results
        .into_iter()
        .map(|r| r.into_inner().unwrap().expect("every part ran"))
        .collect()
}

/// Per-row statistics kept for the backward: mean (0 for RMSNorm) and `1/√(var + eps)`.
type Stats = Arc<Vec<(f64, f64)>>;

/// The values of `t` (contiguous) in its storage `s`, borrowed.
fn view<'a, T: Element>(s: &'a Storage, t: &Tensor) -> &'a [T] {
    let r = t.layout().contiguous_range().expect("contiguous");
    &T::slice(s).expect("dtype checked")[r]
}

/// Independent partial sums per lane: a row's sums run as several chains (vectorised) rather
/// than one chain of dependent f64 additions.
const LANES: usize = 16;

/// `Σ f(a[i], b[i])` over rows `a`, `b` of equal length, summed in f64 over [`LANES`]
/// interleaved chains.
#[inline(always)]
fn lane_sum<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (ca, cb) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += f(x, y);
        }
    }
    for ((s, &x), &y) in acc.iter_mut().zip(ra).zip(rb) {
        *s += f(x, y);
    }
    acc.iter().sum()
}

/// A row's mean (0 for RMSNorm) and biased variance (mean square for RMSNorm), in f64, by two
/// sweeps (the row is in L1 by the second).
#[inline(always)]
fn row_moments<T: Float>(x: &[T], rms: bool) -> (f64, f64) {
    let n = x.len() as f64;
    if rms {
        return (0.0, lane_sum(x, x, |v, _| v.to_f64() * v.to_f64()) / n);
    }
    let mean = lane_sum(x, x, |v, _| v.to_f64()) / n;
    let var = lane_sum(x, x, |v, _| {
        let d = v.to_f64() - mean;
        d * d
    }) / n;
    (mean, var)
}

/// The forward over one thread's block of rows (compiled wide by [`run_wide`]): normalises
/// rows `r0..` into `out` (whole rows) and writes their `(mean, rstd)` into `stats`.
struct RowsForward<'a, 'b, T> {
    x: &'a [T],
    n: usize,
    w: Option<&'a [T]>,
    b: Option<&'a [T]>,
    eps: f64,
    rms: bool,
    r0: usize,
    out: &'b mut [T],
    stats: &'b mut [(f64, f64)],
}

impl<T: Float> WideKernel for RowsForward<'_, '_, T> {
    #[inline(always)]
    fn run(&mut self) {
        let (n, r0) = (self.n, self.r0);
        for (k, (y, st)) in self
            .out
            .chunks_mut(n)
            .zip(self.stats.iter_mut())
            .enumerate()
        {
            let r = r0 + k;
            let x = &self.x[r * n..(r + 1) * n];
            let (mean, var) = row_moments(x, self.rms);
            let rstd = 1.0 / (var + self.eps).sqrt();
            *st = (mean, rstd);
            let (mt, rt) = (T::from_f64(mean), T::from_f64(rstd));
            match (self.w, self.b) {
                (Some(w), Some(b)) => {
                    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *y = (x - mt) * rt * w + b;
                    }
                }
                (Some(w), None) => {
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                        *y = (x - mt) * rt * w;
                    }
                }
                (None, Some(b)) => {
                    for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                        *y = (x - mt) * rt + b;
                    }
                }
                (None, None) => {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = (x - mt) * rt;
                    }
                }
            }
        }
    }
}

fn norm_forward<T: Float>(
    x: &[T],
    n: usize,
    w: Option<&[T]>,
    b: Option<&[T]>,
    eps: f64,
    rms: bool,
) -> (Buffer<T>, Vec<(f64, f64)>) {
    let rows = x.len().checked_div(n).unwrap_or(0);
    if x.is_empty() {
        return (Buffer::uninit(0), vec![(0.0, 0.0); rows]);
    }
    let mut out = Buffer::<T>::uninit(x.len());
    let mut stats = vec![(0.0, 0.0); rows];
    par_rows(n, &mut out, &mut stats, |r0, out, stats| {
        run_wide(&mut RowsForward {
            x,
            n,
            w,
            b,
            eps,
            rms,
            r0,
            out,
            stats,
        })
    });
    (out, stats)
}

/// The backward over one thread's block of rows (compiled wide by [`run_wide`]): writes `dx`
/// of rows `r0..` (whole rows) and adds their shares of `dweight` and `dbias` into `dw` and
/// `db` (empty unless wanted).
struct RowsBackward<'a, 'b, T> {
    x: &'a [T],
    g: &'a [T],
    n: usize,
    w: &'a [T],
    stats: &'a [(f64, f64)],
    rms: bool,
    r0: usize,
    dx: &'b mut [T],
    dw: Vec<f64>,
    db: Vec<f64>,
}

impl<T: Float> WideKernel for RowsBackward<'_, '_, T> {
    #[inline(always)]
    fn run(&mut self) {
        let (n, r0) = (self.n, self.r0);
        let (dw, db) = (&mut self.dw, &mut self.db);
        let mut gw = vec![T::zero(); n];
        let inv_n = 1.0 / n as f64;
        for (k, dx) in self.dx.chunks_mut(n).enumerate() {
            let r = r0 + k;
            let (x, g) = (&self.x[r * n..(r + 1) * n], &self.g[r * n..(r + 1) * n]);
            let (mean, rstd) = self.stats[r];
            let xh = |v: T| (v.to_f64() - mean) * rstd;
            // ĝ = g·w, rounded once to T.
            for ((gw, &g), &w) in gw.iter_mut().zip(g).zip(self.w) {
                *gw = g * w;
            }
            // Sweep 1: Σ ĝ and Σ ĝ·x̂, and the parameter gradients that are wanted.
            let sg = lane_sum(&gw, &gw, |h, _| h.to_f64());
            let sgx = lane_sum(&gw, x, |h, x| h.to_f64() * xh(x));
            for ((dw, &g), &x) in dw.iter_mut().zip(g).zip(x) {
                *dw += g.to_f64() * xh(x);
            }
            for (db, &g) in db.iter_mut().zip(g) {
                *db += g.to_f64();
            }
            let mg = if self.rms { 0.0 } else { sg * inv_n };
            let mgx = sgx * inv_n;
            // Sweep 2: dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)).
            for ((dx, &h), &x) in dx.iter_mut().zip(&gw).zip(x) {
                *dx = T::from_f64(rstd * (h.to_f64() - mg - xh(x) * mgx));
            }
        }
    }
}

/// `(dx, dweight, dbias)`; the parameter gradients are summed in f64, and left empty unless
/// `need_w` / `need_b` (a frozen LayerNorm skips their sweeps).
#[allow(clippy::too_many_arguments)]
fn norm_backward<T: Float>(
    x: &[T],
    g: &[T],
    n: usize,
    w: Option<&[T]>,
    stats: &[(f64, f64)],
    rms: bool,
    need_w: bool,
    need_b: bool,
) -> (Buffer<T>, Vec<f64>, Vec<f64>) {
    if x.is_empty() {
        return (Buffer::uninit(0), vec![0.0; n], vec![0.0; n]);
    }
    let mut dx = Buffer::<T>::uninit(x.len());
    let mut unit = vec![(); stats.len()];
    let ones;
    let w = match w {
        Some(w) => w,
        None => {
            ones = vec![T::one(); n];
            &ones[..]
        }
    };
    let partials = par_rows(n, &mut dx, &mut unit, |r0, dx, _| {
        let mut rows = RowsBackward {
            x,
            g,
            n,
            w,
            stats,
            rms,
            r0,
            dx,
            dw: vec![0f64; if need_w { n } else { 0 }],
            db: vec![0f64; if need_b { n } else { 0 }],
        };
        run_wide(&mut rows);
        (rows.dw, rows.db)
    });
    let mut dw = vec![0f64; if need_w { n } else { 0 }];
    let mut db = vec![0f64; if need_b { n } else { 0 }];
    for (pw, pb) in partials {
        dw.iter_mut().zip(pw).for_each(|(d, p)| *d += p);
        db.iter_mut().zip(pb).for_each(|(d, p)| *d += p);
    }
    (dx, dw, db)
}

/// Backward of the fused normalisation; inputs are `[x, weight?, bias?]`.
struct NormBackward {
    n: usize,
    stats: Stats,
    rms: bool,
    has_weight: bool,
    has_bias: bool,
}

impl GradFn for NormBackward {
    fn name(&self) -> &'static str {
        if self.rms {
            "rms_norm"
        } else {
            "layer_norm"
        }
    }

    fn backward(&self, inputs: &[Tensor], _out: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        let w = self.has_weight.then(|| &inputs[1]);
        // A parameter that takes no gradient (a frozen LayerNorm) costs no sweep.
        let need_w = self.has_weight && inputs[1].tracks_grad();
        let need_b = self.has_bias && inputs[inputs.len() - 1].tracks_grad();
        kiln_core::dispatch_float!(x.dtype(), self.name(), |T| {
            let (x, g, w) = (x.contiguous(), g.contiguous(), w.map(Tensor::contiguous));
            let (xs, gs, ws) = (x.storage(), g.storage(), w.as_ref().map(Tensor::storage));
            let wv = ws.as_ref().zip(w.as_ref()).map(|(s, w)| view::<T>(s, w));
            let (dx, dw, db) = norm_backward(
                view::<T>(&xs, &x),
                view::<T>(&gs, &g),
                self.n,
                wv,
                &self.stats,
                self.rms,
                need_w,
                need_b,
            );
            let mut grads = vec![Some(Tensor::from_buffer(dx, x.shape().clone()))];
            let pshape = inputs[1..]
                .first()
                .map(|p| p.shape().clone())
                .unwrap_or_else(|| x.shape().clone());
            let to_t = |v: Vec<f64>| {
                Tensor::from_storage(
                    Storage::F64(Buffer::from_slice(&v)),
                    Layout::contiguous(pshape.clone()),
                )
                .to_dtype(x.dtype())
            };
            if self.has_weight {
                grads.push(need_w.then(|| to_t(dw)));
            }
            if self.has_bias {
                grads.push(need_b.then(|| to_t(db)));
            }
            grads
        })
    }
}

fn fused_norm(
    x: &Tensor,
    normalized: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    rms: bool,
) -> Tensor {
    let op = if rms { "rms_norm" } else { "layer_norm" };
    let k = normalized.len();
    assert!(
        k >= 1 && x.rank() >= k && &x.dims()[x.rank() - k..] == normalized,
        "{op}: input of shape {} does not end with the normalized shape {normalized:?}",
        x.shape()
    );
    for (name, p) in [("weight", weight), ("bias", bias)] {
        if let Some(p) = p {
            assert!(
                p.dims() == normalized && p.dtype() == x.dtype(),
                "{op}: {name} is {} {}, expected {normalized:?} {}",
                p.shape(),
                p.dtype(),
                x.dtype()
            );
        }
    }
    let n: usize = normalized.iter().product();
    let mut inputs = vec![x];
    inputs.extend(weight);
    inputs.extend(bias);
    let (storage, stats) = kiln_core::dispatch_float!(x.dtype(), op, |T| {
        let (xc, w, b) = (
            x.contiguous(),
            weight.map(Tensor::contiguous),
            bias.map(Tensor::contiguous),
        );
        let (xs, ws, bs) = (
            xc.storage(),
            w.as_ref().map(Tensor::storage),
            b.as_ref().map(Tensor::storage),
        );
        let wv = ws.as_ref().zip(w.as_ref()).map(|(s, w)| view::<T>(s, w));
        let bv = bs.as_ref().zip(b.as_ref()).map(|(s, b)| view::<T>(s, b));
        let (out, stats) = norm_forward(view::<T>(&xs, &xc), n, wv, bv, eps, rms);
        (T::into_storage(out), stats)
    });
    let stats = Arc::new(stats);
    Tensor::op_result(storage, x.shape().clone(), &inputs, || NormBackward {
        n,
        stats,
        rms,
        has_weight: weight.is_some(),
        has_bias: bias.is_some(),
    })
}

/// Layer normalisation over the trailing `normalized_shape` dims (fused kernel):
/// `(x − mean) / √(var + eps) · weight + bias`, biased variance, like `F.layer_norm`.
pub fn layer_norm(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Tensor {
    fused_norm(x, normalized_shape, weight, bias, eps, false)
}

/// RMS normalisation over the trailing `normalized_shape` dims (fused kernel):
/// `x / √(mean(x²) + eps) · weight`, like `F.rms_norm`.
pub fn rms_norm(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    eps: f64,
) -> Tensor {
    fused_norm(x, normalized_shape, weight, None, eps, true)
}

// ---------------------------------------------------------------------- layers

/// `torch.nn.LayerNorm`: parameters `weight` (ones) and `bias` (zeros) of the normalized shape
/// when `elementwise_affine`.
#[derive(Module, Debug, Clone)]
pub struct LayerNorm {
    /// Scale, `normalized_shape`.
    pub weight: Option<Param>,
    /// Shift, `normalized_shape`.
    pub bias: Option<Param>,
    /// The trailing dims normalised over.
    #[module(skip)]
    pub normalized_shape: Vec<usize>,
    /// Added to the variance (default 1e-5).
    #[module(skip)]
    pub eps: f64,
}

/// Options of [`LayerNorm::with_config`] and [`RmsNorm::with_config`].
#[derive(Debug, Clone, Copy)]
pub struct NormConfig {
    /// Added to the variance / mean square.
    pub eps: f64,
    /// Learn a per-element scale (and, for LayerNorm, shift).
    pub elementwise_affine: bool,
    /// Learn the shift (LayerNorm only; ignored without `elementwise_affine`).
    pub bias: bool,
}

impl NormConfig {
    /// PyTorch's LayerNorm defaults: eps 1e-5, affine, with bias.
    pub fn layer_norm() -> Self {
        NormConfig {
            eps: 1e-5,
            elementwise_affine: true,
            bias: true,
        }
    }

    /// RMSNorm defaults: eps 1e-6, affine.
    pub fn rms_norm() -> Self {
        NormConfig {
            eps: 1e-6,
            elementwise_affine: true,
            bias: false,
        }
    }

    /// Sets eps.
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets `elementwise_affine`.
    pub fn elementwise_affine(mut self, on: bool) -> Self {
        self.elementwise_affine = on;
        self
    }

    /// Sets whether LayerNorm has a bias.
    pub fn bias(mut self, on: bool) -> Self {
        self.bias = on;
        self
    }
}

impl LayerNorm {
    /// LayerNorm over the last dim of size `dim`, with PyTorch's defaults.
    pub fn new(dim: usize) -> Self {
        Self::with_config(&[dim], NormConfig::layer_norm())
    }

    /// LayerNorm over `normalized_shape` with the given options.
    pub fn with_config(normalized_shape: &[usize], config: NormConfig) -> Self {
        let affine = config.elementwise_affine;
        LayerNorm {
            weight: affine.then(|| Param::new(Tensor::ones(normalized_shape))),
            bias: (affine && config.bias).then(|| Param::new(Tensor::zeros(normalized_shape))),
            normalized_shape: normalized_shape.to_vec(),
            eps: config.eps,
        }
    }

    /// LayerNorm over given parameters (their shape is the normalized shape).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, eps: f64) -> Self {
        LayerNorm {
            normalized_shape: weight.dims().to_vec(),
            weight: Some(Param::new(weight)),
            bias: bias.map(Param::new),
            eps,
        }
    }
}

impl Forward for LayerNorm {
    /// Normalises the trailing dims of `x`.
    fn forward(&self, x: &Tensor) -> Tensor {
        layer_norm(
            x,
            &self.normalized_shape,
            self.weight.as_deref(),
            self.bias.as_deref(),
            self.eps,
        )
    }
}

/// `torch.nn.RMSNorm`: parameter `weight` (ones) of the normalized shape when
/// `elementwise_affine`. Default eps here is 1e-6 (PyTorch's `None` means the dtype's epsilon).
#[derive(Module, Debug, Clone)]
pub struct RmsNorm {
    /// Scale, `normalized_shape`.
    pub weight: Option<Param>,
    /// The trailing dims normalised over.
    #[module(skip)]
    pub normalized_shape: Vec<usize>,
    /// Added to the mean square (default 1e-6).
    #[module(skip)]
    pub eps: f64,
}

/// PyTorch's spelling.
pub type RMSNorm = RmsNorm;

impl RmsNorm {
    /// RMSNorm over the last dim of size `dim`, eps 1e-6.
    pub fn new(dim: usize) -> Self {
        Self::with_config(&[dim], NormConfig::rms_norm())
    }

    /// RMSNorm over `normalized_shape` with the given options (`bias` is ignored).
    pub fn with_config(normalized_shape: &[usize], config: NormConfig) -> Self {
        RmsNorm {
            weight: config
                .elementwise_affine
                .then(|| Param::new(Tensor::ones(normalized_shape))),
            normalized_shape: normalized_shape.to_vec(),
            eps: config.eps,
        }
    }

    /// RMSNorm over a given weight (its shape is the normalized shape).
    pub fn from_weights(weight: Tensor, eps: f64) -> Self {
        RmsNorm {
            normalized_shape: weight.dims().to_vec(),
            weight: Some(Param::new(weight)),
            eps,
        }
    }
}

impl Forward for RmsNorm {
    /// Normalises the trailing dims of `x`.
    fn forward(&self, x: &Tensor) -> Tensor {
        rms_norm(x, &self.normalized_shape, self.weight.as_deref(), self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;
    use crate::ModuleExt;
    use kiln_core::gradcheck::randn_f64;
    use kiln_core::{gradcheck, DType};

    /// Unfused reference from elementary ops.
    fn reference(
        x: &Tensor,
        w: Option<&Tensor>,
        b: Option<&Tensor>,
        eps: f64,
        rms: bool,
    ) -> Tensor {
        let d = -1i32;
        let y = if rms {
            x.mul(&x.square().mean(d, true).add_scalar(eps).rsqrt())
        } else {
            let c = x.sub(&x.mean(d, true));
            c.mul(&x.var(d, 0, true).add_scalar(eps).rsqrt())
        };
        let y = match w {
            Some(w) => y.mul(w),
            None => y,
        };
        match b {
            Some(b) => y.add(b),
            None => y,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        a.to_f64_vec()
            .iter()
            .zip(b.to_f64_vec())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn names_defaults_and_values() {
        let ln = LayerNorm::new(6);
        let names: Vec<_> = ln.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["weight", "bias"]);
        assert_eq!(ln.eps, 1e-5);
        let rn = RmsNorm::new(6);
        let names: Vec<_> = rn.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["weight"]);
        assert_eq!(rn.eps, 1e-6);
        assert_eq!(
            LayerNorm::with_config(&[6], NormConfig::layer_norm().elementwise_affine(false))
                .num_parameters(),
            0
        );

        let x = randn_f64(&[4, 5, 6], 1).mul_scalar(3.0).add_scalar(10.0);
        let w = randn_f64(&[6], 2);
        let b = randn_f64(&[6], 3);
        for rms in [false, true] {
            let got = fused_norm(&x, &[6], Some(&w), (!rms).then_some(&b), 1e-5, rms);
            let want = reference(&x, Some(&w), (!rms).then_some(&b), 1e-5, rms);
            assert!(max_diff(&got, &want) < 1e-12, "rms {rms}");
            // f32, non-contiguous input.
            let xt = x.to_dtype(DType::F32).transpose(0, 1);
            let got = fused_norm(&xt, &[6], None, None, 1e-5, rms);
            let want = reference(&x.transpose(0, 1), None, None, 1e-5, rms);
            assert!(max_diff(&got, &want) < 1e-5, "rms {rms}");
        }
    }

    #[test]
    fn gradcheck_fused_kernels_dx_dweight_dbias() {
        let x = randn_f64(&[3, 4, 5], 4).requires_grad();
        let w = randn_f64(&[5], 5).requires_grad();
        let b = randn_f64(&[5], 6).requires_grad();
        let inputs = [x.clone(), w.clone(), b.clone()];
        gradcheck(
            |t| layer_norm(&t[0], &[5], Some(&t[1]), Some(&t[2]), 1e-5),
            &inputs,
        )
        .unwrap();
        gradcheck(|t| layer_norm(&t[0], &[5], None, None, 1e-5), &inputs[..1]).unwrap();
        gradcheck(|t| rms_norm(&t[0], &[5], Some(&t[1]), 1e-6), &inputs[..2]).unwrap();
        gradcheck(|t| rms_norm(&t[0], &[5], None, 1e-6), &inputs[..1]).unwrap();
        // Two normalized dims, non-contiguous input.
        let w2 = randn_f64(&[3, 4], 7).requires_grad();
        let b2 = randn_f64(&[3, 4], 8).requires_grad();
        gradcheck(
            |t| {
                layer_norm(
                    &t[0].permute(&[2, 0, 1]),
                    &[3, 4],
                    Some(&t[1]),
                    Some(&t[2]),
                    1e-5,
                )
            },
            &[x.clone(), w2.clone(), b2],
        )
        .unwrap();

        // Through the layers.
        let ln = LayerNorm::from_weights(randn_f64(&[5], 9), Some(randn_f64(&[5], 10)), 1e-5);
        gradcheck_module(&ln, &x).unwrap();
        let rn = RmsNorm::from_weights(randn_f64(&[5], 11), 1e-6);
        gradcheck_module(&rn, &x).unwrap();
    }

    #[test]
    fn empty_inputs() {
        let x = Tensor::zeros([0, 4]).requires_grad();
        let y = LayerNorm::new(4).forward(&x);
        assert_eq!(y.dims(), &[0, 4]);
        y.sum_all().backward();
        assert_eq!(x.grad().unwrap().dims(), &[0, 4]);
        assert_eq!(
            RmsNorm::with_config(&[0], NormConfig::rms_norm())
                .forward(&Tensor::zeros([2, 0]))
                .dims(),
            &[2, 0]
        );
    }

    #[test]
    fn large_inputs_split_rows_across_threads() {
        let x = Tensor::randn([300, 512], 1)
            .to_dtype(DType::F64)
            .requires_grad();
        let w = randn_f64(&[512], 2).requires_grad();
        let b = randn_f64(&[512], 3).requires_grad();
        let g = randn_f64(&[300, 512], 4);
        for rms in [false, true] {
            let bias = (!rms).then_some(&b);
            let y = fused_norm(&x, &[512], Some(&w), bias, 1e-5, rms);
            assert!(max_diff(&y, &reference(&x, Some(&w), bias, 1e-5, rms)) < 1e-10);
            y.mul(&g).sum_all().backward();
            let fused: Vec<_> = [&x, &w].iter().map(|t| t.grad().unwrap()).collect();
            let fused_b = b.grad();
            for t in [&x, &w, &b] {
                t.zero_grad();
            }
            reference(&x, Some(&w), bias, 1e-5, rms)
                .mul(&g)
                .sum_all()
                .backward();
            assert!(max_diff(&fused[0], &x.grad().unwrap()) < 1e-9);
            assert!(max_diff(&fused[1], &w.grad().unwrap()) < 1e-9);
            if !rms {
                assert!(max_diff(&fused_b.unwrap(), &b.grad().unwrap()) < 1e-9);
            }
            for t in [&x, &w, &b] {
                t.zero_grad();
            }
        }
    }

    /// The f32 rows (vectorised sums, a row length with a remainder) agree with f64, and a
    /// frozen weight and bias get no gradient while `x` gets the same one.
    #[test]
    fn f32_matches_f64_and_frozen_parameters_take_no_gradient() {
        for (rows, n) in [(7, 45), (300, 400)] {
            let x64 = randn_f64(&[rows, n], 1).mul_scalar(3.0).add_scalar(2.0);
            let (w64, b64, g64) = (
                randn_f64(&[n], 2),
                randn_f64(&[n], 3),
                randn_f64(&[rows, n], 4),
            );
            for rms in [false, true] {
                let run = |dtype: DType, train_params: bool| {
                    let cast = |t: &Tensor| t.to_dtype(dtype).detach();
                    let x = cast(&x64).requires_grad();
                    let (w, b) = (cast(&w64), cast(&b64));
                    let (w, b) = if train_params {
                        (w.requires_grad(), b.requires_grad())
                    } else {
                        (w, b)
                    };
                    let bias = (!rms).then_some(&b);
                    let y = fused_norm(&x, &[n], Some(&w), bias, 1e-5, rms);
                    y.mul(&cast(&g64)).sum_all().backward();
                    let f64s = |t: Option<Tensor>| t.map(|t| t.to_dtype(DType::F64));
                    (
                        y.to_dtype(DType::F64),
                        f64s(x.grad()).unwrap(),
                        f64s(w.grad()),
                        f64s(b.grad()),
                    )
                };
                let (y, dx, dw, db) = run(DType::F64, true);
                let (y32, dx32, dw32, db32) = run(DType::F32, true);
                assert!(max_diff(&y, &y32) < 1e-5, "{rows}x{n} rms {rms}");
                assert!(max_diff(&dx, &dx32) < 1e-4, "{rows}x{n} rms {rms}");
                assert!(max_diff(&dw.unwrap(), &dw32.unwrap()) < 1e-3);
                if !rms {
                    assert!(max_diff(&db.unwrap(), &db32.unwrap()) < 1e-3);
                }
                let (y_frozen, dx_frozen, dw_frozen, db_frozen) = run(DType::F32, false);
                assert!(dw_frozen.is_none() && db_frozen.is_none());
                assert_eq!(max_diff(&y_frozen, &y32), 0.0);
                assert_eq!(max_diff(&dx_frozen, &dx32), 0.0);
            }
        }
    }
}
