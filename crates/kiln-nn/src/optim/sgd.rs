//! Stochastic gradient descent with momentum, dampening, Nesterov momentum and weight decay
//! (`torch.optim.SGD`).

use super::{check_non_negative, fused_update, sign, Algorithm, GroupConfig, Optim, ParamSlots};
use crate::error::NnError;
use kiln_core::{Float, Tensor};
use serde::{Deserialize, Serialize};

/// Hyper-parameters of an SGD group; the defaults are torch's.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SgdConfig {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// Momentum factor (default 0: plain SGD).
    pub momentum: f64,
    /// Dampening of the momentum (default 0).
    pub dampening: f64,
    /// L2 penalty added to the gradient (default 0).
    pub weight_decay: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening 0).
    pub nesterov: bool,
    /// Maximise the objective instead of minimising it.
    pub maximize: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
        }
    }
}

impl From<f64> for SgdConfig {
    /// Defaults with learning rate `lr`.
    fn from(lr: f64) -> Self {
        SgdConfig {
            lr,
            ..Default::default()
        }
    }
}

impl GroupConfig for SgdConfig {
    fn validate(&self) -> Result<(), NnError> {
        check_non_negative("lr", self.lr)?;
        check_non_negative("momentum", self.momentum)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        if !self.dampening.is_finite() {
            return Err(NnError::Config(format!(
                "dampening must be finite, got {}",
                self.dampening
            )));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(NnError::Config(
                "nesterov: Nesterov momentum needs momentum > 0 and dampening 0".into(),
            ));
        }
        Ok(())
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

/// The SGD update rule (state slot `momentum_buffer`, created from the first gradient).
pub struct SgdRule;

/// SGD, as `torch.optim.SGD`:
/// `g = ±grad + wd·p; b = μ·b + (1−τ)·g (b = g at the first step); g = g + μ·b (Nesterov) or b;
/// p -= lr·g`.
pub type Sgd = Optim<SgdRule>;

impl Algorithm for SgdRule {
    type Config = SgdConfig;
    const KIND: &'static str = "sgd";
    const SLOTS: &'static [&'static str] = &["momentum_buffer"];

    fn update(c: &SgdConfig, param: &Tensor, grad: &Tensor, state: &mut ParamSlots) {
        state.step += 1;
        kiln_core::dispatch_float!(param.dtype(), "sgd", |T| {
            if c.momentum == 0.0 {
                fused_update::<T, 0>(param, grad, [], |p, g, []| plain(c, p, g));
            } else {
                let (buf, first) = state.get_or_fill(0, param, 0.0);
                fused_update::<T, 1>(param, grad, [&buf], |p, g, [b]| {
                    with_momentum(c, first, p, g, b)
                });
            }
        })
    }
}

/// The scalars of one step in the element type.
struct Consts<T> {
    sign: T,
    wd: T,
    neg_lr: T,
    mu: T,
    keep: T,
}

impl<T: Float> Consts<T> {
    fn new(c: &SgdConfig) -> Self {
        Consts {
            sign: sign(c.maximize),
            wd: T::from_f64(c.weight_decay),
            neg_lr: T::from_f64(-c.lr),
            mu: T::from_f64(c.momentum),
            keep: T::from_f64(1.0 - c.dampening),
        }
    }

    #[inline(always)]
    fn direction<const L2: bool>(&self, p: T, g: T) -> T {
        let g = g * self.sign;
        if L2 {
            g + self.wd * p
        } else {
            g
        }
    }
}

fn plain<T: Float>(c: &SgdConfig, p: &mut [T], g: &[T]) {
    let k = Consts::new(c);
    if c.weight_decay != 0.0 {
        plain_impl::<T, true>(&k, p, g)
    } else {
        plain_impl::<T, false>(&k, p, g)
    }
}

fn plain_impl<T: Float, const L2: bool>(k: &Consts<T>, p: &mut [T], g: &[T]) {
    for (p, &g) in p.iter_mut().zip(g) {
        let d = k.direction::<L2>(*p, g);
        *p += k.neg_lr * d;
    }
}

fn with_momentum<T: Float>(c: &SgdConfig, first: bool, p: &mut [T], g: &[T], b: &mut [T]) {
    let k = Consts::new(c);
    match (c.weight_decay != 0.0, first, c.nesterov) {
        (true, true, n) => momentum_impl::<T, true, true>(&k, n, p, g, b),
        (true, false, n) => momentum_impl::<T, true, false>(&k, n, p, g, b),
        (false, true, n) => momentum_impl::<T, false, true>(&k, n, p, g, b),
        (false, false, n) => momentum_impl::<T, false, false>(&k, n, p, g, b),
    }
}

fn momentum_impl<T: Float, const L2: bool, const FIRST: bool>(
    k: &Consts<T>,
    nesterov: bool,
    p: &mut [T],
    g: &[T],
    b: &mut [T],
) {
    for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
        let d = k.direction::<L2>(*p, g);
        *b = if FIRST { d } else { *b * k.mu + k.keep * d };
        let step = if nesterov { d + k.mu * *b } else { *b };
        *p += k.neg_lr * step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::Optimizer;
    use crate::Param;

    fn run(c: SgdConfig, grads: &[f64]) -> Vec<f64> {
        let w = Param::new(Tensor::from_slice(&[1f64], [1]));
        let mut opt = Sgd::new(vec![w.clone()], c).unwrap();
        grads
            .iter()
            .map(|&g| {
                w.set_grad(Some(Tensor::from_slice(&[g], [1])));
                opt.step();
                w.item()
            })
            .collect()
    }

    #[test]
    fn momentum_nesterov_dampening_and_decay_by_hand() {
        let lr = 0.1;
        // Plain: 1 - 0.1*2 = 0.8.
        assert_eq!(run(lr.into(), &[2.0]), [0.8]);
        // Momentum 0.5: b1 = 2 -> 0.8; b2 = 0.5*2 + 2 = 3 -> 0.5.
        let m = SgdConfig {
            lr,
            momentum: 0.5,
            ..Default::default()
        };
        let r = run(m, &[2.0, 2.0]);
        assert!(
            (r[0] - 0.8).abs() < 1e-12 && (r[1] - 0.5).abs() < 1e-12,
            "{r:?}"
        );
        // Nesterov: step1 g + 0.5*2 = 3 -> 0.7; b2 = 3, step 2 + 1.5 = 3.5 -> 0.35.
        let r = run(
            SgdConfig {
                nesterov: true,
                ..m
            },
            &[2.0, 2.0],
        );
        assert!(
            (r[0] - 0.7).abs() < 1e-12 && (r[1] - 0.35).abs() < 1e-12,
            "{r:?}"
        );
        // Dampening 0.5: b2 = 0.5*2 + 0.5*2 = 2 -> 0.6.
        let r = run(
            SgdConfig {
                dampening: 0.5,
                ..m
            },
            &[2.0, 2.0],
        );
        assert!((r[1] - 0.6).abs() < 1e-12, "{r:?}");
        // Weight decay 0.5: g = 2 + 0.5 = 2.5 -> 0.75; maximize flips the sign of grad only.
        let wd = SgdConfig {
            lr,
            weight_decay: 0.5,
            ..Default::default()
        };
        assert!((run(wd, &[2.0])[0] - 0.75).abs() < 1e-12);
        let mx = SgdConfig {
            maximize: true,
            ..wd
        };
        assert!((run(mx, &[2.0])[0] - 1.15).abs() < 1e-12);
    }

    #[test]
    fn bad_values_name_the_field() {
        let w = Param::new(Tensor::ones([1]));
        for (c, field) in [
            (
                SgdConfig {
                    lr: -0.1,
                    ..Default::default()
                },
                "lr",
            ),
            (
                SgdConfig {
                    momentum: -1.0,
                    ..Default::default()
                },
                "momentum",
            ),
            (
                SgdConfig {
                    weight_decay: f64::NAN,
                    ..Default::default()
                },
                "weight_decay",
            ),
            (
                SgdConfig {
                    nesterov: true,
                    ..Default::default()
                },
                "nesterov",
            ),
        ] {
            let e = Sgd::new(vec![w.clone()], c).err().unwrap();
            assert!(
                matches!(&e, NnError::Config(m) if m.starts_with(field)),
                "{e}"
            );
        }
    }
}
