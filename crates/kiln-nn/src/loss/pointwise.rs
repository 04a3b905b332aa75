//! Elementwise losses: the loss of each element is a function of the input, the target and
//! (for BCE) a weight and a positive-class weight; one fused kernel computes it and reduces,
//! another computes the gradients with respect to the input and the target.

use super::{contiguous_slice, par_sum, KlReduction, Loss, Reduction};
use kiln_core::alloc::Buffer;
use kiln_core::parallel::for_each_chunk;
use kiln_core::{Element, GradFn, Layout, Shape, Tensor};

/// Which elementwise loss, with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Mse,
    L1,
    Huber(f64),
    SmoothL1(f64),
    Bce,
    BceLogits,
    KlDiv { log_target: bool },
}

/// `ln(1 + e^{-x})`, stable for any `x`.
#[inline(always)]
fn softplus_neg(x: f64) -> f64 {
    (-x.abs()).exp().ln_1p() + (-x).max(0.0)
}

#[inline(always)]
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// PyTorch's `sign`: 0 at 0.
#[inline(always)]
fn sign(d: f64) -> f64 {
    if d > 0.0 {
        1.0
    } else if d < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// `x·ln(y)`, 0 when `x == 0` (PyTorch's `xlogy`).
#[inline(always)]
fn xlogy(x: f64, y: f64) -> f64 {
    if x == 0.0 && !y.is_nan() {
        0.0
    } else {
        x * y.ln()
    }
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Mse => "mse_loss",
            Kind::L1 => "l1_loss",
            Kind::Huber(_) => "huber_loss",
            Kind::SmoothL1(_) => "smooth_l1_loss",
            Kind::Bce => "binary_cross_entropy",
            Kind::BceLogits => "binary_cross_entropy_with_logits",
            Kind::KlDiv { .. } => "kl_div",
        }
    }

    /// The loss of one element (before the elementwise weight); `pw` is the positive weight.
    #[inline(always)]
    fn value(self, x: f64, y: f64, pw: f64) -> f64 {
        match self {
            Kind::Mse => (x - y) * (x - y),
            Kind::L1 => (x - y).abs(),
            Kind::Huber(delta) => {
                let d = x - y;
                if d.abs() < delta {
                    0.5 * d * d
                } else {
                    delta * (d.abs() - 0.5 * delta)
                }
            }
            Kind::SmoothL1(beta) => {
                let d = x - y;
                if d.abs() < beta {
                    0.5 * d * d / beta
                } else {
                    d.abs() - 0.5 * beta
                }
            }
            Kind::Bce => (y - 1.0) * (-x).ln_1p().max(-100.0) - y * x.ln().max(-100.0),
            Kind::BceLogits => (1.0 - y) * x + ((pw - 1.0) * y + 1.0) * softplus_neg(x),
            Kind::KlDiv { log_target: false } => xlogy(y, y) - y * x,
            Kind::KlDiv { log_target: true } => y.exp() * (y - x),
        }
    }

    /// `∂ value / ∂ x`.
    #[inline(always)]
    fn dx(self, x: f64, y: f64, pw: f64) -> f64 {
        match self {
            Kind::Mse => 2.0 * (x - y),
            Kind::L1 => sign(x - y),
            Kind::Huber(delta) => (x - y).clamp(-delta, delta),
            Kind::SmoothL1(beta) => {
                let d = x - y;
                if d < -beta {
                    -1.0
                } else if d > beta {
                    1.0
                } else {
                    d / beta
                }
            }
            Kind::Bce => (x - y) / ((1.0 - x) * x).max(1e-12),
            Kind::BceLogits => {
                let t = pw * y;
                (t + 1.0 - y) * sigmoid(x) - t
            }
            Kind::KlDiv { log_target: false } => -y,
            Kind::KlDiv { log_target: true } => -y.exp(),
        }
    }

    /// `∂ value / ∂ y`.
    #[inline(always)]
    fn dy(self, x: f64, y: f64, pw: f64) -> f64 {
        match self {
            Kind::Mse | Kind::L1 | Kind::Huber(_) | Kind::SmoothL1(_) => -self.dx(x, y, pw),
            Kind::Bce => (-x).ln_1p().max(-100.0) - x.ln().max(-100.0),
            Kind::BceLogits => -x + (pw - 1.0) * softplus_neg(x),
            Kind::KlDiv { log_target: false } => {
                if y == 0.0 {
                    0.0
                } else {
                    y.ln() + 1.0 - x
                }
            }
            Kind::KlDiv { log_target: true } => y.exp() * (y - x + 1.0),
        }
    }
}

/// Checks that `target` matches `input` in shape and (float) dtype.
fn check_pair(name: &str, input: &Tensor, target: &Tensor) {
    assert!(
        input.dtype().is_float(),
        "{name}: input must be f32 or f64, got {} (input shape {}, target shape {})",
        input.dtype(),
        input.shape(),
        target.shape()
    );
    assert!(
        target.dtype() == input.dtype(),
        "{name}: target dtype {} differs from input dtype {} (input shape {}, target shape {})",
        target.dtype(),
        input.dtype(),
        input.shape(),
        target.shape()
    );
    assert!(
        target.shape() == input.shape(),
        "{name}: target shape {} differs from input shape {}",
        target.shape(),
        input.shape()
    );
}

/// `p` (a float weight) broadcast to `shape` as a contiguous constant of `input`'s dtype.
fn broadcast_param(name: &str, what: &str, p: &Tensor, input: &Tensor) -> Tensor {
    let shape = input.shape();
    let (pd, sd) = (p.dims(), shape.dims());
    let fits = pd.len() <= sd.len()
        && pd
            .iter()
            .rev()
            .zip(sd.iter().rev())
            .all(|(&a, &b)| a == b || a == 1);
    assert!(
        p.dtype().is_float() && fits,
        "{name}: {what} must be a float tensor that broadcasts to the input shape {}, got {} of shape {}",
        shape,
        p.dtype(),
        p.shape()
    );
    p.detach()
        .to_dtype(input.dtype())
        .broadcast_as(shape.clone())
        .contiguous()
}

/// How the elementwise losses are combined.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Reduce {
    None,
    /// The sum times a factor (1 for sum, 1/n for mean, 1/batch for batchmean).
    Scaled(f64),
}

/// Backward of an elementwise loss: holds the contiguous operands.
struct PointwiseBackward {
    kind: Kind,
    x: Tensor,
    y: Tensor,
    w: Option<Tensor>,
    pw: Option<Tensor>,
    reduce: Reduce,
}

impl GradFn for PointwiseBackward {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (want_x, want_y) = (inputs[0].tracks_grad(), inputs[1].tracks_grad());
        let (kind, name) = (self.kind, self.kind.name());
        let g = g.contiguous();
        let shape = self.x.shape().clone();
        let n = shape.elem_count();
        let make = |storage| Tensor::from_storage(storage, Layout::contiguous(shape.clone()));
        kiln_core::dispatch_float!(self.x.dtype(), name, |T| {
            let (xg, yg, gg) = (self.x.storage(), self.y.storage(), g.storage());
            let xs = contiguous_slice::<T>(&xg, &self.x, name);
            let ys = contiguous_slice::<T>(&yg, &self.y, name);
            let gs = contiguous_slice::<T>(&gg, &g, name);
            let wg = self.w.as_ref().map(|w| (w.storage(), w));
            let ws = wg.as_ref().map(|(s, w)| contiguous_slice::<T>(s, w, name));
            let pg = self.pw.as_ref().map(|p| (p.storage(), p));
            let ps = pg.as_ref().map(|(s, p)| contiguous_slice::<T>(s, p, name));
            let scale = |k: usize| -> f64 {
                let gk = match self.reduce {
                    Reduce::None => Element::to_f64(gs[k]),
                    Reduce::Scaled(f) => Element::to_f64(gs[0]) * f,
                };
                ws.map_or(gk, |w| gk * Element::to_f64(w[k]))
            };
            let grad = |d: fn(Kind, f64, f64, f64) -> f64| {
                let mut out = Buffer::<T>::uninit(n);
                for_each_chunk(&mut out, |k0, chunk| {
                    for (j, o) in chunk.iter_mut().enumerate() {
                        let k = k0 + j;
                        let pw = ps.map_or(1.0, |p| Element::to_f64(p[k]));
                        *o = T::from_f64(
                            scale(k) * d(kind, Element::to_f64(xs[k]), Element::to_f64(ys[k]), pw),
                        );
                    }
                });
                make(<T as Element>::into_storage(out))
            };
            vec![
                want_x.then(|| grad(Kind::dx)),
                want_y.then(|| grad(Kind::dy)),
            ]
        })
    }
}

/// The elementwise loss `kind` of `input` against `target`, reduced.
fn pointwise(
    kind: Kind,
    input: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    pos_weight: Option<&Tensor>,
    reduction: KlReduction,
) -> Tensor {
    let name = kind.name();
    check_pair(name, input, target);
    let x = input.detach().contiguous();
    let y = target.detach().contiguous();
    let w = weight.map(|w| broadcast_param(name, "weight", w, input));
    let pw = pos_weight.map(|p| broadcast_param(name, "pos_weight", p, input));
    let n = input.elem_count();
    let reduce = match reduction {
        KlReduction::None => Reduce::None,
        KlReduction::Sum => Reduce::Scaled(1.0),
        KlReduction::Mean => Reduce::Scaled(1.0 / n as f64),
        KlReduction::BatchMean => {
            Reduce::Scaled(1.0 / input.dims().first().copied().unwrap_or(1) as f64)
        }
    };
    let storage = kiln_core::dispatch_float!(input.dtype(), name, |T| {
        let (xg, yg) = (x.storage(), y.storage());
        let xs = contiguous_slice::<T>(&xg, &x, name);
        let ys = contiguous_slice::<T>(&yg, &y, name);
        let wg = w.as_ref().map(|w| (w.storage(), w));
        let ws = wg.as_ref().map(|(s, w)| contiguous_slice::<T>(s, w, name));
        let pg = pw.as_ref().map(|p| (p.storage(), p));
        let ps = pg.as_ref().map(|(s, p)| contiguous_slice::<T>(s, p, name));
        if kind == Kind::Bce {
            if let Some(bad) = xs.iter().find(|v| !(**v >= 0.0 && **v <= 1.0)) {
                panic!(
                    "{name}: every input must be a probability in [0, 1], got {bad:?} (input shape {})",
                    input.shape()
                );
            }
        }
        let at = |k: usize| -> f64 {
            let pwk = ps.map_or(1.0, |p| Element::to_f64(p[k]));
            let v = kind.value(Element::to_f64(xs[k]), Element::to_f64(ys[k]), pwk);
            ws.map_or(v, |w| v * Element::to_f64(w[k]))
        };
        match reduce {
            Reduce::None => {
                let mut out = Buffer::<T>::uninit(n);
                for_each_chunk(&mut out, |k0, chunk| {
                    for (j, o) in chunk.iter_mut().enumerate() {
                        *o = T::from_f64(at(k0 + j));
                    }
                });
                <T as Element>::into_storage(out)
            }
            Reduce::Scaled(f) => {
                let total = par_sum(n, 1, |r| r.map(at).sum());
                <T as Element>::into_storage(Buffer::filled(1, T::from_f64(total * f)))
            }
        }
    });
    let shape = match reduce {
        Reduce::None => input.shape().clone(),
        Reduce::Scaled(_) => Shape::scalar(),
    };
    Tensor::op_result(storage, shape, &[input, target], move || {
        PointwiseBackward {
            kind,
            x,
            y,
            w,
            pw,
            reduce,
        }
    })
}

// ---------------------------------------------------------------------- public functions

/// Mean squared error `(input − target)²`, as `torch.nn.functional.mse_loss` (the target must
/// have the input's shape and dtype).
pub fn mse_loss(input: &Tensor, target: &Tensor, reduction: Reduction) -> Tensor {
    pointwise(Kind::Mse, input, target, None, None, reduction.into())
}

/// Mean absolute error `|input − target|`, as `torch.nn.functional.l1_loss` (gradient 0 where
/// they are equal).
pub fn l1_loss(input: &Tensor, target: &Tensor, reduction: Reduction) -> Tensor {
    pointwise(Kind::L1, input, target, None, None, reduction.into())
}

/// Huber loss, as `torch.nn.functional.huber_loss`: `½d²` where `|d| < delta`, else
/// `delta·(|d| − ½delta)`, with `d = input − target`. `delta` must be positive.
pub fn huber_loss(input: &Tensor, target: &Tensor, delta: f64, reduction: Reduction) -> Tensor {
    assert!(
        delta > 0.0,
        "huber_loss: delta must be positive, got {delta}"
    );
    pointwise(
        Kind::Huber(delta),
        input,
        target,
        None,
        None,
        reduction.into(),
    )
}

/// Smooth L1 loss, as `torch.nn.functional.smooth_l1_loss`: `½d²/beta` where `|d| < beta`,
/// else `|d| − ½beta`; `beta = 0` is the L1 loss. `beta` must not be negative.
pub fn smooth_l1_loss(input: &Tensor, target: &Tensor, beta: f64, reduction: Reduction) -> Tensor {
    assert!(
        beta >= 0.0,
        "smooth_l1_loss: beta must not be negative, got {beta}"
    );
    let kind = if beta == 0.0 {
        Kind::L1
    } else {
        Kind::SmoothL1(beta)
    };
    pointwise(kind, input, target, None, None, reduction.into())
}

/// Binary cross-entropy of probabilities `input` (in `[0, 1]`, checked) against `target`, as
/// `torch.nn.functional.binary_cross_entropy`: `−w·(t·ln x + (1 − t)·ln(1 − x))` with each
/// log clamped to `≥ −100`. `weight` broadcasts to the input's shape.
pub fn binary_cross_entropy(
    input: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
) -> Tensor {
    pointwise(Kind::Bce, input, target, weight, None, reduction.into())
}

/// Binary cross-entropy on logits, as `torch.nn.functional.binary_cross_entropy_with_logits`,
/// in the stable form `(1 − t)·x + (1 + (p − 1)·t)·ln(1 + e^{−x})`. `weight` broadcasts to the
/// input's shape; `pos_weight` (the weight `p` of positive examples, typically `[C]`)
/// broadcasts over the class dim, the last one.
pub fn binary_cross_entropy_with_logits(
    input: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    pos_weight: Option<&Tensor>,
    reduction: Reduction,
) -> Tensor {
    pointwise(
        Kind::BceLogits,
        input,
        target,
        weight,
        pos_weight,
        reduction.into(),
    )
}

/// Kullback–Leibler divergence, as `torch.nn.functional.kl_div`: `input` holds
/// log-probabilities, `target` probabilities (`t·(ln t − x)`, 0 where `t = 0`) or, with
/// `log_target`, log-probabilities (`e^t·(t − x)`). `KlReduction::BatchMean` divides the sum
/// by the batch size.
pub fn kl_div(input: &Tensor, target: &Tensor, reduction: KlReduction, log_target: bool) -> Tensor {
    pointwise(
        Kind::KlDiv { log_target },
        input,
        target,
        None,
        None,
        reduction,
    )
}

// ---------------------------------------------------------------------- config structs

macro_rules! simple_loss {
    ($(#[$doc:meta])* $name:ident, $f:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq)]
        pub struct $name {
            /// How the elementwise losses are combined (default `Mean`).
            pub reduction: Reduction,
        }

        impl $name {
            /// The loss with the given reduction.
            pub fn new(reduction: Reduction) -> Self {
                $name { reduction }
            }

            /// The loss of `input` against `target`.
            pub fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
                $f(input, target, self.reduction)
            }
        }

        impl Loss for $name {
            fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
                $name::forward(self, input, target)
            }
        }
    };
}

simple_loss!(
    /// `torch.nn.MSELoss`: [`mse_loss`] as an object.
    MseLoss,
    mse_loss
);
simple_loss!(
    /// `torch.nn.L1Loss`: [`l1_loss`] as an object.
    L1Loss,
    l1_loss
);

/// `torch.nn.HuberLoss`: [`huber_loss`] as an object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HuberLoss {
    /// Where the loss turns from quadratic to linear (default 1).
    pub delta: f64,
    /// How the elementwise losses are combined (default `Mean`).
    pub reduction: Reduction,
}

impl Default for HuberLoss {
    fn default() -> Self {
        HuberLoss {
            delta: 1.0,
            reduction: Reduction::Mean,
        }
    }
}

impl HuberLoss {
    /// The loss of `input` against `target`.
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        huber_loss(input, target, self.delta, self.reduction)
    }
}

impl Loss for HuberLoss {
    fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        HuberLoss::forward(self, input, target)
    }
}

/// `torch.nn.SmoothL1Loss`: [`smooth_l1_loss`] as an object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SmoothL1Loss {
    /// Where the loss turns from quadratic to linear (default 1; 0 is the L1 loss).
    pub beta: f64,
    /// How the elementwise losses are combined (default `Mean`).
    pub reduction: Reduction,
}

impl Default for SmoothL1Loss {
    fn default() -> Self {
        SmoothL1Loss {
            beta: 1.0,
            reduction: Reduction::Mean,
        }
    }
}

impl SmoothL1Loss {
    /// The loss of `input` against `target`.
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        smooth_l1_loss(input, target, self.beta, self.reduction)
    }
}

impl Loss for SmoothL1Loss {
    fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        SmoothL1Loss::forward(self, input, target)
    }
}

/// `torch.nn.BCELoss`: [`binary_cross_entropy`] as an object.
#[derive(Clone, Debug, Default)]
pub struct BceLoss {
    /// Elementwise weight broadcast to the input's shape, or none.
    pub weight: Option<Tensor>,
    /// How the elementwise losses are combined (default `Mean`).
    pub reduction: Reduction,
}

impl BceLoss {
    /// The loss of probabilities `input` against `target`.
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        binary_cross_entropy(input, target, self.weight.as_ref(), self.reduction)
    }
}

impl Loss for BceLoss {
    fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        BceLoss::forward(self, input, target)
    }
}

/// `torch.nn.BCEWithLogitsLoss`: [`binary_cross_entropy_with_logits`] as an object.
#[derive(Clone, Debug, Default)]
pub struct BceWithLogitsLoss {
    /// Elementwise weight broadcast to the input's shape, or none.
    pub weight: Option<Tensor>,
    /// Weight of positive examples, broadcast over the class (last) dim, or none.
    pub pos_weight: Option<Tensor>,
    /// How the elementwise losses are combined (default `Mean`).
    pub reduction: Reduction,
}

impl BceWithLogitsLoss {
    /// The loss of logits `input` against `target`.
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        binary_cross_entropy_with_logits(
            input,
            target,
            self.weight.as_ref(),
            self.pos_weight.as_ref(),
            self.reduction,
        )
    }
}

impl Loss for BceWithLogitsLoss {
    fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        BceWithLogitsLoss::forward(self, input, target)
    }
}

/// `torch.nn.KLDivLoss`: [`kl_div`] as an object.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KlDivLoss {
    /// How the elementwise terms are combined (default `Mean`; `BatchMean` is the KL
    /// divergence per sample).
    pub reduction: KlReduction,
    /// True when the target holds log-probabilities.
    pub log_target: bool,
}

impl KlDivLoss {
    /// The divergence of log-probabilities `input` from `target`.
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        kl_div(input, target, self.reduction, self.log_target)
    }
}

impl Loss for KlDivLoss {
    fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        KlDivLoss::forward(self, input, target)
    }
}
