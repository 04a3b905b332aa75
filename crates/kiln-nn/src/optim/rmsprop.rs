//! RMSprop with optional momentum and centering, as `torch.optim.RMSprop`.

use super::{
    check_non_negative, fused_update, sign, Algorithm, GroupConfig, Lerp, Optim, ParamSlots,
};
use crate::error::NnError;
use kiln_core::{Float, Tensor};
use serde::{Deserialize, Serialize};

/// Hyper-parameters of an RMSprop group; the defaults are torch's.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RmsPropConfig {
    /// Learning rate (default 1e-2).
    pub lr: f64,
    /// Smoothing constant of the squared-gradient average (default 0.99).
    pub alpha: f64,
    /// Added to the denominator for stability (default 1e-8).
    pub eps: f64,
    /// L2 penalty added to the gradient (default 0).
    pub weight_decay: f64,
    /// Momentum factor (default 0).
    pub momentum: f64,
    /// Normalise by the estimated variance (subtract the squared mean gradient).
    pub centered: bool,
    /// Maximise the objective instead of minimising it.
    pub maximize: bool,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        RmsPropConfig {
            lr: 1e-2,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            centered: false,
            maximize: false,
        }
    }
}

impl From<f64> for RmsPropConfig {
    /// Defaults with learning rate `lr`.
    fn from(lr: f64) -> Self {
        RmsPropConfig {
            lr,
            ..Default::default()
        }
    }
}

impl GroupConfig for RmsPropConfig {
    fn validate(&self) -> Result<(), NnError> {
        check_non_negative("lr", self.lr)?;
        check_non_negative("alpha", self.alpha)?;
        check_non_negative("eps", self.eps)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        check_non_negative("momentum", self.momentum)
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn momentum(&self) -> Option<f64> {
        Some(self.momentum)
    }
    fn set_momentum(&mut self, momentum: f64) {
        self.momentum = momentum;
    }
}

/// The RMSprop update rule (slots `square_avg`, `momentum_buffer`, `grad_avg`).
pub struct RmsPropRule;

/// RMSprop, as `torch.optim.RMSprop`: `g = ±grad + wd·p; s = α·s + (1−α)·g²;
/// ḡ = lerp(ḡ, g, 1−α) and d = √(s − ḡ²) + ε when centered, else d = √s + ε;
/// b = μ·b + g/d, p -= lr·b with momentum, else p -= lr·g/d`.
pub type RmsProp = Optim<RmsPropRule>;

impl Algorithm for RmsPropRule {
    type Config = RmsPropConfig;
    const KIND: &'static str = "rmsprop";
    const SLOTS: &'static [&'static str] = &["square_avg", "momentum_buffer", "grad_avg"];

    fn update(c: &RmsPropConfig, param: &Tensor, grad: &Tensor, state: &mut ParamSlots) {
        state.step += 1;
        let (sq, _) = state.get_or_fill(0, param, 0.0);
        let buf = (c.momentum > 0.0).then(|| state.get_or_fill(1, param, 0.0).0);
        let avg = c.centered.then(|| state.get_or_fill(2, param, 0.0).0);
        let l2 = c.weight_decay != 0.0;
        kiln_core::dispatch_float!(param.dtype(), "rmsprop", |T| {
            let k = Consts::<T>::new(c);
            match (&buf, &avg) {
                (Some(b), Some(a)) => {
                    fused_update::<T, 3>(param, grad, [&sq, b, a], |p, g, [s, b, a]| {
                        kernel::<T, true, true>(&k, l2, p, g, s, b, a)
                    })
                }
                (Some(b), None) => fused_update::<T, 2>(param, grad, [&sq, b], |p, g, [s, b]| {
                    kernel::<T, true, false>(&k, l2, p, g, s, b, &mut [])
                }),
                (None, Some(a)) => fused_update::<T, 2>(param, grad, [&sq, a], |p, g, [s, a]| {
                    kernel::<T, false, true>(&k, l2, p, g, s, &mut [], a)
                }),
                (None, None) => fused_update::<T, 1>(param, grad, [&sq], |p, g, [s]| {
                    kernel::<T, false, false>(&k, l2, p, g, s, &mut [], &mut [])
                }),
            }
        })
    }
}

/// The scalars of one step in the element type.
struct Consts<T> {
    sign: T,
    wd: T,
    alpha: T,
    w: T,
    avg_lerp: Lerp<T>,
    eps: T,
    mu: T,
    neg_lr: T,
}

impl<T: Float> Consts<T> {
    fn new(c: &RmsPropConfig) -> Self {
        Consts {
            sign: sign(c.maximize),
            wd: T::from_f64(c.weight_decay),
            alpha: T::from_f64(c.alpha),
            w: T::from_f64(1.0 - c.alpha),
            avg_lerp: Lerp::new(1.0 - c.alpha),
            eps: T::from_f64(c.eps),
            mu: T::from_f64(c.momentum),
            neg_lr: T::from_f64(-c.lr),
        }
    }
}

fn kernel<T: Float, const MOMENTUM: bool, const CENTERED: bool>(
    k: &Consts<T>,
    l2: bool,
    p: &mut [T],
    g: &[T],
    sq: &mut [T],
    buf: &mut [T],
    avg: &mut [T],
) {
    if l2 {
        kernel_impl::<T, MOMENTUM, CENTERED, true>(k, p, g, sq, buf, avg)
    } else {
        kernel_impl::<T, MOMENTUM, CENTERED, false>(k, p, g, sq, buf, avg)
    }
}

/// One fused pass; the flags are fixed per call so the loop has no branches.
fn kernel_impl<T: Float, const MOMENTUM: bool, const CENTERED: bool, const L2: bool>(
    k: &Consts<T>,
    p: &mut [T],
    g: &[T],
    sq: &mut [T],
    buf: &mut [T],
    avg: &mut [T],
) {
    let n = p.len();
    let (g, sq) = (&g[..n], &mut sq[..n]);
    let buf = if MOMENTUM { &mut buf[..n] } else { buf };
    let avg = if CENTERED { &mut avg[..n] } else { avg };
    for i in 0..n {
        let mut gi = g[i] * k.sign;
        if L2 {
            gi += k.wd * p[i];
        }
        let s = sq[i] * k.alpha + k.w * gi * gi;
        sq[i] = s;
        let d = if CENTERED {
            let ai = k.avg_lerp.at(avg[i], gi);
            avg[i] = ai;
            (s + -ai * ai).sqrt()
        } else {
            s.sqrt()
        } + k.eps;
        if MOMENTUM {
            let bi = buf[i] * k.mu + gi / d;
            buf[i] = bi;
            p[i] += k.neg_lr * bi;
        } else {
            p[i] += k.neg_lr * gi / d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::Optimizer;
    use crate::Param;

    #[test]
    fn first_step_by_hand() {
        // s = 0.01·4 = 0.04, d = 0.2: p = 1 − 0.1·2/0.2 = 0.
        let w = Param::new(Tensor::from_slice(&[1f64], [1]));
        let mut opt = RmsProp::new(
            vec![w.clone()],
            RmsPropConfig {
                lr: 0.1,
                eps: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        w.set_grad(Some(Tensor::from_slice(&[2f64], [1])));
        opt.step();
        assert!(w.item().abs() < 1e-12, "{}", w.item());
        // Centered: ḡ = 0.02, s − ḡ² = 0.0396.
        let w = Param::new(Tensor::from_slice(&[1f64], [1]));
        let c = RmsPropConfig {
            lr: 0.1,
            eps: 0.0,
            centered: true,
            momentum: 0.9,
            ..Default::default()
        };
        let mut opt = RmsProp::new(vec![w.clone()], c).unwrap();
        w.set_grad(Some(Tensor::from_slice(&[2f64], [1])));
        opt.step();
        let want = 1.0 - 0.1 * 2.0 / 0.0396f64.sqrt();
        assert!((w.item() - want).abs() < 1e-12, "{} vs {want}", w.item());
        let st = opt.param_state("0").unwrap();
        assert!(st.slots.iter().all(Option::is_some));
    }

    #[test]
    fn negative_alpha_is_an_error() {
        let w = Param::new(Tensor::ones([1]));
        let e = RmsProp::new(
            vec![w],
            RmsPropConfig {
                alpha: -0.5,
                ..Default::default()
            },
        )
        .err()
        .unwrap();
        assert!(
            matches!(&e, NnError::Config(m) if m.starts_with("alpha")),
            "{e}"
        );
    }
}
