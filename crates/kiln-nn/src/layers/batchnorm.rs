//! `BatchNorm1d` and `BatchNorm2d` with a fused training kernel: the forward makes one pass per
//! channel for the batch mean and variance and one pass to normalise (and scale/shift); the
//! backward makes one pass per channel for `Σg` and `Σg·x̂` (which are also `dbias` and
//! `dweight`) and one pass for `dx`. In evaluation mode the layer is a per-channel affine map
//! with the running statistics folded into its scale and shift. Channels (for the statistics)
//! and `(n, c)` blocks (for the elementwise passes) are split across threads for large inputs.

use crate::{Buffer, Forward, Module, Param, TrainFlag};
use kiln_core::alloc::Buffer as Buf;
use kiln_core::parallel::{for_chunks, num_threads, PARALLEL_THRESHOLD};
use kiln_core::{with_no_grad, DType, Element, Float, GradFn, Tensor};
use std::sync::Arc;

// ---------------------------------------------------------------------- kernels

/// Geometry of a channel-first input `[N, C, *]`: `n` batches, `c` channels, `s` elements
/// per `(n, c)` block.
#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    s: usize,
}

impl Geom {
    fn of(x: &Tensor) -> Geom {
        let d = x.dims();
        Geom {
            n: d[0],
            c: d[1],
            s: d[2..].iter().product(),
        }
    }

    /// Values per channel.
    fn m(&self) -> usize {
        self.n * self.s
    }
}

/// Threads for an input of this geometry: one below `PARALLEL_THRESHOLD` elements.
fn tasks(g: Geom, units: usize) -> usize {
    if g.n * g.c * g.s < PARALLEL_THRESHOLD {
        1
    } else {
        num_threads().min(units).max(1)
    }
}

/// `f(channel)` for every channel, channels split across threads for large inputs.
fn per_channel<R: Send>(g: Geom, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let t = tasks(g, g.c);
    if t <= 1 {
        return (0..g.c).map(f).collect();
    }
    let per = g.c.div_ceil(t);
    let mut out: Vec<Option<R>> = (0..g.c).map(|_| None).collect();
    for_chunks(&mut out, per, true, |i, slots| {
        for (k, slot) in slots.iter_mut().enumerate() {
            *slot = Some(f(i * per + k));
        }
    });
    out.into_iter()
        .map(|r| r.expect("every channel ran"))
        .collect()
}

/// `f(channel, block_index, out_block)` over the `(n, c)` blocks of `out`, blocks split
/// across threads for large inputs.
fn per_block<T: Send>(g: Geom, out: &mut [T], f: impl Fn(usize, usize, &mut [T]) + Sync) {
    if g.s == 0 {
        return;
    }
    let blocks = g.n * g.c;
    let t = tasks(g, blocks);
    let run = |b0: usize, chunk: &mut [T]| {
        for (k, blk) in chunk.chunks_mut(g.s).enumerate() {
            let b = b0 + k;
            f(b % g.c, b, blk);
        }
    };
    if t <= 1 {
        return run(0, out);
    }
    let per = blocks.div_ceil(t);
    for_chunks(out, per * g.s, true, |i, chunk| run(i * per, chunk));
}

/// The blocks of channel `ch`: `x[(i·C + ch)·S ..][..S]` for every batch index `i`.
fn channel_blocks<T>(x: &[T], g: Geom, ch: usize) -> impl Iterator<Item = &[T]> {
    (0..g.n).map(move |i| &x[(i * g.c + ch) * g.s..(i * g.c + ch + 1) * g.s])
}

/// Per-channel batch mean and biased variance, one shifted pass in f64.
fn channel_stats<T: Float>(x: &[T], g: Geom) -> Vec<(f64, f64)> {
    let m = g.m() as f64;
    per_channel(g, |ch| {
        let shift = x[ch * g.s].to_f64();
        let (mut s1, mut s2) = (0f64, 0f64);
        for blk in channel_blocks(x, g, ch) {
            for &v in blk {
                let d = v.to_f64() - shift;
                s1 += d;
                s2 += d * d;
            }
        }
        let mu = s1 / m;
        (shift + mu, (s2 / m - mu * mu).max(0.0))
    })
}

/// `y = (x − mean[c]) · scale[c] + shift[c]` over the blocks of `x`.
fn affine_blocks<T: Float>(x: &[T], g: Geom, coef: &[(T, T, T)]) -> Buf<T> {
    let mut out = Buf::<T>::uninit(x.len());
    per_block(g, &mut out, |ch, b, y| {
        let (mean, scale, shift) = coef[ch];
        for (o, &v) in y.iter_mut().zip(&x[b * g.s..(b + 1) * g.s]) {
            *o = (v - mean) * scale + shift;
        }
    });
    out
}

/// Training forward: normalised output and the per-channel `(mean, biased var)`.
fn bn_train_forward<T: Float>(
    x: &[T],
    g: Geom,
    w: Option<&[T]>,
    b: Option<&[T]>,
    eps: f64,
) -> (Buf<T>, Vec<(f64, f64)>) {
    let stats = channel_stats(x, g);
    let coef: Vec<(T, T, T)> = stats
        .iter()
        .enumerate()
        .map(|(ch, &(mean, var))| {
            let rstd = 1.0 / (var + eps).sqrt();
            let scale = rstd * w.map_or(1.0, |w| w[ch].to_f64());
            let shift = b.map_or(0.0, |b| b[ch].to_f64());
            (T::from_f64(mean), T::from_f64(scale), T::from_f64(shift))
        })
        .collect();
    (affine_blocks(x, g, &coef), stats)
}

/// Training backward: `(dx, dweight, dbias)` with the parameter gradients in f64.
/// `stats` holds each channel's `(mean, 1/√(var + eps))`.
fn bn_train_backward<T: Float>(
    x: &[T],
    gy: &[T],
    g: Geom,
    w: Option<&[T]>,
    stats: &[(f64, f64)],
) -> (Buf<T>, Vec<f64>, Vec<f64>) {
    // Pass 1: Σg and Σg·x̂ per channel.
    let sums = per_channel(g, |ch| {
        let (mean, rstd) = stats[ch];
        let (mut sg, mut sgx) = (0f64, 0f64);
        for (xb, gb) in channel_blocks(x, g, ch).zip(channel_blocks(gy, g, ch)) {
            for (&xv, &gv) in xb.iter().zip(gb) {
                let gv = gv.to_f64();
                sg += gv;
                sgx += gv * (xv.to_f64() - mean);
            }
        }
        (sg, sgx * rstd)
    });
    // Pass 2: dx = w·rstd·(g − mean(g) − x̂·mean(g·x̂)) = a·g + k·(x − mean) + c0.
    let m = g.m() as f64;
    let coef: Vec<(T, T, T, T)> = sums
        .iter()
        .enumerate()
        .map(|(ch, &(sg, sgx))| {
            let (mean, rstd) = stats[ch];
            let a = rstd * w.map_or(1.0, |w| w[ch].to_f64());
            (
                T::from_f64(mean),
                T::from_f64(a),
                T::from_f64(-a * rstd * sgx / m),
                T::from_f64(-a * sg / m),
            )
        })
        .collect();
    let mut dx = Buf::<T>::uninit(x.len());
    per_block(g, &mut dx, |ch, b, d| {
        let (mean, a, k, c0) = coef[ch];
        let r = b * g.s..(b + 1) * g.s;
        for ((o, &xv), &gv) in d.iter_mut().zip(&x[r.clone()]).zip(&gy[r]) {
            *o = a * gv + k * (xv - mean) + c0;
        }
    });
    let dw = sums.iter().map(|&(_, sgx)| sgx).collect();
    let db = sums.iter().map(|&(sg, _)| sg).collect();
    (dx, dw, db)
}

/// A contiguous copy-free view of `t`'s values, outside the graph.
fn contiguous(t: &Tensor) -> Tensor {
    let d = t.detach();
    if d.is_contiguous() {
        d
    } else {
        d.contiguous()
    }
}

/// Runs `f` on the contiguous elements of each tensor (all of dtype `T`).
fn with_values<T: Element, R>(ts: &[&Tensor], f: impl FnOnce(&[&[T]]) -> R) -> R {
    let cs: Vec<Tensor> = ts.iter().map(|t| contiguous(t)).collect();
    let guards: Vec<_> = cs.iter().map(|t| t.storage()).collect();
    let slices: Vec<&[T]> = cs
        .iter()
        .zip(&guards)
        .map(|(t, s)| &T::slice(s).expect("dtype checked")[t.layout().contiguous_range().unwrap()])
        .collect();
    f(&slices)
}

/// A `[C]` tensor of `dtype` from f64 values.
fn channel_tensor(v: &[f64], dtype: DType) -> Tensor {
    Tensor::from_slice(v, [v.len()]).to_dtype(dtype)
}

/// Backward of the fused training normalisation; inputs are `[x, weight?, bias?]`.
struct BatchNormBackward {
    stats: Arc<Vec<(f64, f64)>>,
    has_weight: bool,
    has_bias: bool,
}

impl GradFn for BatchNormBackward {
    fn name(&self) -> &'static str {
        "batch_norm"
    }

    fn backward(&self, inputs: &[Tensor], _out: &Tensor, gy: &Tensor) -> Vec<Option<Tensor>> {
        let x = &inputs[0];
        let g = Geom::of(x);
        let dtype = x.dtype();
        kiln_core::dispatch_float!(dtype, "batch_norm", |T| {
            let mut ts = vec![x, gy];
            if self.has_weight {
                ts.push(&inputs[1]);
            }
            let (dx, dw, db) = with_values::<T, _>(&ts, |v| {
                bn_train_backward(v[0], v[1], g, v.get(2).copied(), &self.stats)
            });
            let mut grads = vec![Some(Tensor::from_buffer(dx, x.shape().clone()))];
            if self.has_weight {
                grads.push(inputs[1].tracks_grad().then(|| channel_tensor(&dw, dtype)));
            }
            if self.has_bias {
                let b = &inputs[inputs.len() - 1];
                grads.push(b.tracks_grad().then(|| channel_tensor(&db, dtype)));
            }
            grads
        })
    }
}

/// Backward of `y = x·scale[c] + shift[c]`; inputs are `[x, scale, shift]`.
struct ChannelAffineBackward;

impl GradFn for ChannelAffineBackward {
    fn name(&self) -> &'static str {
        "batch_norm_eval"
    }

    fn backward(&self, inputs: &[Tensor], _out: &Tensor, gy: &Tensor) -> Vec<Option<Tensor>> {
        let (x, scale, shift) = (&inputs[0], &inputs[1], &inputs[2]);
        let g = Geom::of(x);
        let dtype = x.dtype();
        kiln_core::dispatch_float!(dtype, "batch_norm_eval", |T| {
            with_values::<T, _>(&[x, gy, scale], |v| {
                let (xv, gv, sv) = (v[0], v[1], v[2]);
                let dx = x.tracks_grad().then(|| {
                    let zero: Vec<(T, T, T)> = sv
                        .iter()
                        .map(|&s| (T::default(), s, T::default()))
                        .collect();
                    Tensor::from_buffer(affine_blocks(gv, g, &zero), x.shape().clone())
                });
                let need = scale.tracks_grad() || shift.tracks_grad();
                let (ds, dt) = if need {
                    let sums = per_channel(g, |ch| {
                        let (mut sgx, mut sg) = (0f64, 0f64);
                        for (xb, gb) in channel_blocks(xv, g, ch).zip(channel_blocks(gv, g, ch)) {
                            for (&a, &b) in xb.iter().zip(gb) {
                                sgx += a.to_f64() * b.to_f64();
                                sg += b.to_f64();
                            }
                        }
                        (sgx, sg)
                    });
                    let ds: Vec<f64> = sums.iter().map(|s| s.0).collect();
                    let dt: Vec<f64> = sums.iter().map(|s| s.1).collect();
                    (
                        scale.tracks_grad().then(|| channel_tensor(&ds, dtype)),
                        shift.tracks_grad().then(|| channel_tensor(&dt, dtype)),
                    )
                } else {
                    (None, None)
                };
                vec![dx, ds, dt]
            })
        })
    }
}

// ---------------------------------------------------------------------- functional

fn check_param(op: &str, what: &str, p: Option<&Tensor>, x: &Tensor) {
    if let Some(p) = p {
        let c = x.dims()[1];
        assert!(
            p.dims() == [c],
            "{op}: {what} has shape {}, expected [{c}] for input of shape {}",
            p.shape(),
            x.shape()
        );
    }
}

/// Normalises `x` with batch statistics (fused); returns the output and each channel's
/// `(mean, biased variance)`.
fn batch_norm_train(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    op: &str,
) -> (Tensor, Vec<(f64, f64)>) {
    let g = Geom::of(x);
    assert!(
        g.m() > 1,
        "{op}: expected more than 1 value per channel when training, got input of shape {}",
        x.shape()
    );
    for p in [weight, bias].into_iter().flatten() {
        assert_eq!(
            p.dtype(),
            x.dtype(),
            "{op}: parameter dtype {} differs from input dtype {}",
            p.dtype(),
            x.dtype()
        );
    }
    let mut inputs = vec![x];
    inputs.extend(weight);
    inputs.extend(bias);
    let (storage, stats) = kiln_core::dispatch_float!(x.dtype(), op, |T| {
        with_values::<T, _>(&inputs, |v| {
            let w = weight.map(|_| v[1]);
            let b = bias.map(|_| v[v.len() - 1]);
            let (out, stats) = bn_train_forward(v[0], g, w, b, eps);
            (T::into_storage(out), stats)
        })
    });
    let saved: Vec<(f64, f64)> = stats
        .iter()
        .map(|&(m, v)| (m, 1.0 / (v + eps).sqrt()))
        .collect();
    let out = Tensor::op_result(storage, x.shape().clone(), &inputs, || BatchNormBackward {
        stats: Arc::new(saved),
        has_weight: weight.is_some(),
        has_bias: bias.is_some(),
    });
    (out, stats)
}

/// `x·scale[c] + shift[c]` (fused; differentiable in all three).
fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor, op: &str) -> Tensor {
    let g = Geom::of(x);
    let storage = kiln_core::dispatch_float!(x.dtype(), op, |T| {
        with_values::<T, _>(&[x, scale, shift], |v| {
            let coef: Vec<(T, T, T)> = v[1]
                .iter()
                .zip(v[2])
                .map(|(&s, &t)| (T::default(), s, t))
                .collect();
            T::into_storage(affine_blocks(v[0], g, &coef))
        })
    });
    Tensor::op_result(storage, x.shape().clone(), &[x, scale, shift], || {
        ChannelAffineBackward
    })
}

/// Batch normalisation over dim 1 of `x` (`[N, C, *]`), like `F.batch_norm`: with `training`
/// (or without running statistics) it normalises with the batch mean and biased variance and,
/// if running statistics are given, updates them in place
/// (`running = (1 − momentum)·running + momentum·batch`, unbiased variance) without recording
/// anything; otherwise it uses the running statistics. Panics when training with a single
/// value per channel.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    x: &Tensor,
    running_mean: Option<&Tensor>,
    running_var: Option<&Tensor>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> Tensor {
    batch_norm_named(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        "batch_norm",
    )
}

#[allow(clippy::too_many_arguments)]
fn batch_norm_named(
    x: &Tensor,
    running_mean: Option<&Tensor>,
    running_var: Option<&Tensor>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    momentum: f64,
    eps: f64,
    op: &str,
) -> Tensor {
    assert!(
        x.rank() >= 2,
        "{op}: expected an input of shape [N, C, *], got {}",
        x.shape()
    );
    check_param(op, "weight", weight, x);
    check_param(op, "bias", bias, x);
    check_param(op, "running_mean", running_mean, x);
    check_param(op, "running_var", running_var, x);
    let running = running_mean.zip(running_var);
    if training || running.is_none() {
        let (y, stats) = batch_norm_train(x, weight, bias, eps, op);
        if let (true, Some((rm, rv))) = (training, running) {
            let m = Geom::of(x).m() as f64;
            let unbiased = m / (m - 1.0);
            let f = momentum;
            with_no_grad(|| {
                let old_m = rm.to_f64_vec();
                let old_v = rv.to_f64_vec();
                let new_m: Vec<f64> = old_m
                    .iter()
                    .zip(&stats)
                    .map(|(&r, &(mu, _))| (1.0 - f) * r + f * mu)
                    .collect();
                let new_v: Vec<f64> = old_v
                    .iter()
                    .zip(&stats)
                    .map(|(&r, &(_, var))| (1.0 - f) * r + f * var * unbiased)
                    .collect();
                rm.assign(&channel_tensor(&new_m, rm.dtype()));
                rv.assign(&channel_tensor(&new_v, rv.dtype()));
            });
        }
        return y;
    }
    let (rm, rv) = running.expect("checked");
    // Fold the running statistics into a per-channel scale and shift (tiny [C] ops that carry
    // the gradients of weight and bias).
    let dtype = x.dtype();
    let inv = with_no_grad(|| rv.to_dtype(dtype).add_scalar(eps).rsqrt());
    let rm = rm.detach().to_dtype(dtype);
    let scale = match weight {
        Some(w) => w.mul(&inv),
        None => inv,
    };
    let shift = match bias {
        Some(b) => b.sub(&rm.mul(&scale)),
        None => rm.mul(&scale).neg(),
    };
    channel_affine(x, &scale, &shift, op)
}

// ---------------------------------------------------------------------- layers

/// Options of [`BatchNorm1d::with_config`] and [`BatchNorm2d::with_config`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormConfig {
    /// Added to the variance (default 1e-5).
    pub eps: f64,
    /// Weight of the batch statistics in the running average (default `Some(0.1)`); `None`
    /// keeps a cumulative moving average (factor `1/num_batches_tracked`).
    pub momentum: Option<f64>,
    /// Learn a per-channel `weight` and `bias` (default true).
    pub affine: bool,
    /// Keep running statistics for evaluation (default true); without them the layer always
    /// uses batch statistics.
    pub track_running_stats: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig {
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
        }
    }
}

impl BatchNormConfig {
    /// Sets eps.
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets the momentum (`None`: cumulative moving average).
    pub fn momentum(mut self, momentum: Option<f64>) -> Self {
        self.momentum = momentum;
        self
    }

    /// Sets whether the layer has `weight` and `bias`.
    pub fn affine(mut self, on: bool) -> Self {
        self.affine = on;
        self
    }

    /// Sets whether the layer keeps running statistics.
    pub fn track_running_stats(mut self, on: bool) -> Self {
        self.track_running_stats = on;
        self
    }
}

macro_rules! batch_norm_layer {
    ($name:ident, $doc:literal, $ranks:expr, $expected:literal) => {
        #[doc = $doc]
        #[derive(Module, Clone)]
        pub struct $name {
            /// Per-channel scale `[C]` (ones), when affine.
            pub weight: Option<Param>,
            /// Per-channel shift `[C]` (zeros), when affine.
            pub bias: Option<Param>,
            /// Running mean `[C]` (zeros), when tracking running statistics.
            pub running_mean: Option<Buffer>,
            /// Running (unbiased) variance `[C]` (ones), when tracking running statistics.
            pub running_var: Option<Buffer>,
            /// Training steps seen (i64, shape `[]`), when tracking running statistics.
            pub num_batches_tracked: Option<Buffer>,
            training: TrainFlag,
            /// Number of channels `C`.
            #[module(skip)]
            pub num_features: usize,
            /// Added to the variance.
            #[module(skip)]
            pub eps: f64,
            /// Running-average factor (`None`: cumulative average).
            #[module(skip)]
            pub momentum: Option<f64>,
        }

        impl $name {
            /// A layer over `num_features` channels with PyTorch's defaults.
            pub fn new(num_features: usize) -> Self {
                Self::with_config(num_features, BatchNormConfig::default())
            }

            /// A layer with the given options (f32 state).
            pub fn with_config(num_features: usize, config: BatchNormConfig) -> Self {
                Self::build(num_features, config, DType::F32, None, None)
            }

            /// An affine layer over given `weight` and `bias` (`[C]`); the running statistics
            /// take their dtype.
            pub fn from_weights(weight: Tensor, bias: Tensor, config: BatchNormConfig) -> Self {
                assert!(
                    weight.rank() == 1 && bias.shape() == weight.shape(),
                    "{}: weight {} and bias {} must both be [C]",
                    stringify!($name),
                    weight.shape(),
                    bias.shape()
                );
                let c = weight.dims()[0];
                let dtype = weight.dtype();
                Self::build(c, config.affine(true), dtype, Some(weight), Some(bias))
            }

            fn build(
                c: usize,
                config: BatchNormConfig,
                dtype: DType,
                weight: Option<Tensor>,
                bias: Option<Tensor>,
            ) -> Self {
                let track = config.track_running_stats;
                let affine = config.affine;
                $name {
                    weight: affine.then(|| {
                        Param::new(weight.unwrap_or_else(|| Tensor::ones([c]).to_dtype(dtype)))
                    }),
                    bias: affine.then(|| {
                        Param::new(bias.unwrap_or_else(|| Tensor::zeros_dtype([c], dtype)))
                    }),
                    running_mean: track.then(|| Buffer::new(Tensor::zeros_dtype([c], dtype))),
                    running_var: track.then(|| Buffer::new(Tensor::ones([c]).to_dtype(dtype))),
                    num_batches_tracked: track.then(|| Buffer::new(Tensor::scalar(0i64))),
                    training: TrainFlag::default(),
                    num_features: c,
                    eps: config.eps,
                    momentum: config.momentum,
                }
            }

            /// True in training mode.
            pub fn is_training(&self) -> bool {
                self.training.is_training()
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "{}({}, eps={}, momentum={:?}, affine={}, track_running_stats={})",
                    stringify!($name),
                    self.num_features,
                    self.eps,
                    self.momentum,
                    self.weight.is_some(),
                    self.running_mean.is_some()
                )
            }
        }

        impl Forward for $name {
            /// Normalises each channel: with batch statistics while training (updating the
            /// running ones), with the running statistics in evaluation mode.
            fn forward(&self, x: &Tensor) -> Tensor {
                let name = stringify!($name);
                assert!(
                    $ranks.contains(&x.rank()),
                    "{name}: expected input of shape {}, got {}",
                    $expected,
                    x.shape()
                );
                assert_eq!(
                    x.dims()[1],
                    self.num_features,
                    "{name}: expected {} channels (dim 1), got input of shape {}",
                    self.num_features,
                    x.shape()
                );
                let training = self.training.is_training();
                let mut factor = 0.0;
                if let (true, Some(nbt)) = (training, &self.num_batches_tracked) {
                    let n = nbt.item() as i64 + 1;
                    nbt.assign(&Tensor::scalar(n).to_dtype(nbt.dtype()));
                    factor = self.momentum.unwrap_or(1.0 / n as f64);
                }
                batch_norm_named(
                    x,
                    self.running_mean.as_deref(),
                    self.running_var.as_deref(),
                    self.weight.as_deref(),
                    self.bias.as_deref(),
                    training,
                    factor,
                    self.eps,
                    name,
                )
            }
        }
    };
}

batch_norm_layer!(
    BatchNorm1d,
    "`torch.nn.BatchNorm1d` over `[N, C]` or `[N, C, L]`: normalises each channel over the batch (and length).",
    [2usize, 3],
    "[N, C] or [N, C, L]"
);

batch_norm_layer!(
    BatchNorm2d,
    "`torch.nn.BatchNorm2d` over `[N, C, H, W]`: normalises each channel over the batch and the plane.",
    [4usize],
    "[N, C, H, W]"
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;
    use crate::ModuleExt;
    use kiln_core::gradcheck;
    use kiln_core::gradcheck::randn_f64;

    /// Unfused reference from elementary ops: normalise over every dim but 1.
    fn reference(
        x: &Tensor,
        mean: &Tensor,
        var: &Tensor,
        w: Option<&Tensor>,
        b: Option<&Tensor>,
        eps: f64,
    ) -> Tensor {
        let mut shape = vec![1usize; x.rank()];
        shape[1] = x.dims()[1];
        let y = x
            .sub(&mean.reshape(shape.clone()))
            .mul(&var.reshape(shape.clone()).add_scalar(eps).rsqrt());
        let y = match w {
            Some(w) => y.mul(&w.reshape(shape.clone())),
            None => y,
        };
        match b {
            Some(b) => y.add(&b.reshape(shape)),
            None => y,
        }
    }

    fn reduce_dims(x: &Tensor) -> Vec<usize> {
        (0..x.rank()).filter(|&d| d != 1).collect()
    }

    fn batch_reference(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, eps: f64) -> Tensor {
        let dims = reduce_dims(x);
        let mean = x.mean(dims.clone(), false);
        let var = x.var(dims, 0, false);
        reference(x, &mean, &var, w, b, eps)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        a.to_f64_vec()
            .iter()
            .zip(b.to_f64_vec())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn names_state_and_defaults_follow_torch() {
        let bn = BatchNorm2d::new(3);
        let sd: Vec<(String, Vec<usize>, DType)> = bn
            .state_dict()
            .iter()
            .map(|(n, t)| (n.to_string(), t.dims().to_vec(), t.dtype()))
            .collect();
        assert_eq!(
            sd,
            [
                ("weight".to_string(), vec![3], DType::F32),
                ("bias".to_string(), vec![3], DType::F32),
                ("running_mean".to_string(), vec![3], DType::F32),
                ("running_var".to_string(), vec![3], DType::F32),
                ("num_batches_tracked".to_string(), vec![], DType::I64),
            ]
        );
        assert_eq!(bn.weight.as_ref().unwrap().to_vec::<f32>(), vec![1.0; 3]);
        assert_eq!(
            bn.running_var.as_ref().unwrap().to_vec::<f32>(),
            vec![1.0; 3]
        );
        assert_eq!((bn.eps, bn.momentum), (1e-5, Some(0.1)));
        assert_eq!(bn.named_buffers().len(), 3);
        let bare = BatchNorm1d::with_config(
            4,
            BatchNormConfig::default()
                .affine(false)
                .track_running_stats(false),
        );
        assert!(bare.state_dict().is_empty());
        assert_eq!(format!("{bare:?}"), "BatchNorm1d(4, eps=0.00001, momentum=Some(0.1), affine=false, track_running_stats=false)");
    }

    #[test]
    fn training_forward_and_running_stats_match_the_reference() {
        let x = randn_f64(&[4, 3, 5, 6], 1).mul_scalar(2.0).add_scalar(0.7);
        let w = randn_f64(&[3], 2);
        let b = randn_f64(&[3], 3);
        let bn = BatchNorm2d::from_weights(w.clone(), b.clone(), BatchNormConfig::default());
        let y = bn.forward(&x);
        assert!(max_diff(&y, &batch_reference(&x, Some(&w), Some(&b), 1e-5)) < 1e-12);
        // Running stats after one step: 0.9·init + 0.1·batch (unbiased variance).
        let dims = reduce_dims(&x);
        let mean = x.mean(dims.clone(), false);
        let var_u = x.var(dims.clone(), 1, false);
        let want_m = mean.mul_scalar(0.1);
        let want_v = var_u.mul_scalar(0.1).add_scalar(0.9);
        assert!(max_diff(bn.running_mean.as_ref().unwrap(), &want_m) < 1e-12);
        assert!(max_diff(bn.running_var.as_ref().unwrap(), &want_v) < 1e-12);
        assert_eq!(
            bn.num_batches_tracked.as_ref().unwrap().to_vec::<i64>(),
            vec![1]
        );

        // Cumulative average (momentum None): after two steps, the plain mean of both batches.
        let cma = BatchNorm1d::with_config(3, BatchNormConfig::default().momentum(None));
        let x1 = randn_f64(&[6, 3, 4], 4).add_scalar(1.0);
        let x2 = randn_f64(&[6, 3, 4], 5).mul_scalar(3.0);
        cma.forward(&x1.to_dtype(DType::F32));
        cma.forward(&x2.to_dtype(DType::F32));
        let d = [0usize, 2];
        let want_m = x1.mean(d, false).add(&x2.mean(d, false)).mul_scalar(0.5);
        let want_v = x1
            .var(d, 1, false)
            .add(&x2.var(d, 1, false))
            .mul_scalar(0.5);
        assert!(max_diff(cma.running_mean.as_ref().unwrap(), &want_m) < 1e-6);
        assert!(max_diff(cma.running_var.as_ref().unwrap(), &want_v) < 1e-5);
        assert_eq!(cma.num_batches_tracked.as_ref().unwrap().item(), 2.0);

        // f32 and a non-contiguous input ([N, C] from a transposed [C, N]).
        let xt = randn_f64(&[5, 9], 6).add_scalar(3.0);
        let bn1 = BatchNorm1d::new(5);
        let got = bn1.forward(&xt.to_dtype(DType::F32).t());
        assert!(max_diff(&got, &batch_reference(&xt.t(), None, None, 1e-5)) < 1e-5);
    }

    #[test]
    fn eval_uses_running_stats_and_train_eval_switch_through_a_parent() {
        #[derive(Module)]
        struct Net {
            bn: BatchNorm2d,
            head: BatchNorm1d,
        }
        let net = Net {
            bn: BatchNorm2d::from_weights(
                randn_f64(&[2], 1),
                randn_f64(&[2], 2),
                BatchNormConfig::default(),
            ),
            head: BatchNorm1d::new(2),
        };
        let x = randn_f64(&[3, 2, 4, 4], 3).add_scalar(2.0);
        net.bn.forward(&x);
        net.eval();
        assert!(!net.bn.is_training() && !net.head.is_training());
        let rm = net.bn.running_mean.as_ref().unwrap().tensor().clone();
        let rv = net.bn.running_var.as_ref().unwrap().tensor().clone();
        let (rm0, rv0) = (rm.to_f64_vec(), rv.to_f64_vec());
        let y = net.bn.forward(&x);
        let w = net.bn.weight.as_deref().unwrap();
        let b = net.bn.bias.as_deref().unwrap();
        assert!(max_diff(&y, &reference(&x, &rm, &rv, Some(w), Some(b), 1e-5)) < 1e-12);
        // Eval leaves the running statistics and the counter alone.
        assert_eq!((rm.to_f64_vec(), rv.to_f64_vec()), (rm0, rv0));
        assert_eq!(net.bn.num_batches_tracked.as_ref().unwrap().item(), 1.0);
        net.train();
        assert!(net.bn.is_training());
        assert!(
            max_diff(
                &net.bn.forward(&x),
                &batch_reference(&x, Some(w), Some(b), 1e-5)
            ) < 1e-12
        );
        // Without running statistics, eval mode still normalises with the batch.
        let free =
            BatchNorm2d::with_config(2, BatchNormConfig::default().track_running_stats(false));
        free.eval();
        let got = free.forward(&x.to_dtype(DType::F32));
        assert!(max_diff(&got, &batch_reference(&x, None, None, 1e-5)) < 1e-5);
    }

    #[test]
    fn gradcheck_train_and_eval() {
        let cfg = BatchNormConfig::default();
        let x = randn_f64(&[3, 2, 3, 4], 1)
            .mul_scalar(1.5)
            .add_scalar(0.5)
            .requires_grad();
        let bn = BatchNorm2d::from_weights(randn_f64(&[2], 2), randn_f64(&[2], 3), cfg);
        gradcheck_module(&bn, &x).unwrap();
        bn.eval();
        bn.running_var
            .as_ref()
            .unwrap()
            .assign(&Tensor::from_slice(&[0.7f64, 1.9], [2]));
        bn.running_mean
            .as_ref()
            .unwrap()
            .assign(&Tensor::from_slice(&[0.3f64, -0.4], [2]));
        gradcheck_module(&bn, &x).unwrap();
        // BatchNorm1d on [N, C] and [N, C, L], no affine, non-contiguous input.
        let bn1 = BatchNorm1d::from_weights(randn_f64(&[4], 4), randn_f64(&[4], 5), cfg);
        gradcheck_module(&bn1, &randn_f64(&[5, 4], 6).requires_grad()).unwrap();
        let xt = randn_f64(&[3, 4, 6], 7).requires_grad();
        gradcheck(
            |t| bn1.forward(&t[0].transpose(0, 2)),
            std::slice::from_ref(&xt),
        )
        .unwrap();
        gradcheck(
            |t| {
                batch_norm(
                    &t[0].permute(&[2, 1, 0]),
                    None,
                    None,
                    None,
                    None,
                    true,
                    0.1,
                    1e-3,
                )
            },
            std::slice::from_ref(&xt),
        )
        .unwrap();
        bn1.eval();
        gradcheck_module(&bn1, &randn_f64(&[2, 4, 3], 8).requires_grad()).unwrap();
        let plain = BatchNorm1d::with_config(6, cfg.affine(false));
        plain.eval();
        gradcheck(|t| plain.forward(&t[0].transpose(1, 2)), &[xt]).unwrap();
    }

    #[test]
    fn large_inputs_match_the_unfused_gradients() {
        let x = Tensor::randn([16, 8, 24, 24], 1)
            .to_dtype(DType::F64)
            .requires_grad();
        let w = randn_f64(&[8], 2).requires_grad();
        let b = randn_f64(&[8], 3).requires_grad();
        let gw = randn_f64(&[16, 8, 24, 24], 4);
        let (y, _) = batch_norm_train(&x, Some(&w), Some(&b), 1e-5, "test");
        assert!(max_diff(&y, &batch_reference(&x, Some(&w), Some(&b), 1e-5)) < 1e-10);
        y.mul(&gw).sum_all().backward();
        let fused: Vec<Tensor> = [&x, &w, &b].iter().map(|t| t.grad().unwrap()).collect();
        for t in [&x, &w, &b] {
            t.zero_grad();
        }
        batch_reference(&x, Some(&w), Some(&b), 1e-5)
            .mul(&gw)
            .sum_all()
            .backward();
        for (f, t) in fused.iter().zip([&x, &w, &b]) {
            assert!(max_diff(f, &t.grad().unwrap()) < 1e-8);
        }
    }

    #[test]
    #[should_panic(
        expected = "BatchNorm1d: expected more than 1 value per channel when training, got input of shape [1, 3]"
    )]
    fn single_value_per_channel_panics_when_training() {
        BatchNorm1d::new(3).forward(&Tensor::ones([1, 3]));
    }

    #[test]
    fn single_value_per_channel_is_fine_in_eval() {
        let bn = BatchNorm1d::new(3);
        bn.eval();
        assert_eq!(bn.forward(&Tensor::ones([1, 3])).dims(), &[1, 3]);
    }

    #[test]
    #[should_panic(
        expected = "BatchNorm2d: expected 3 channels (dim 1), got input of shape [2, 4, 5, 5]"
    )]
    fn wrong_channel_count_panics() {
        BatchNorm2d::new(3).forward(&Tensor::ones([2, 4, 5, 5]));
    }

    #[test]
    #[should_panic(expected = "BatchNorm2d: expected input of shape [N, C, H, W], got [2, 3, 5]")]
    fn wrong_rank_panics() {
        BatchNorm2d::new(3).forward(&Tensor::ones([2, 3, 5]));
    }
}
