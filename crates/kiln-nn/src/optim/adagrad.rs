//! Adagrad, as `torch.optim.Adagrad`.

use super::{check_non_negative, fused_update, sign, Algorithm, GroupConfig, Optim, ParamSlots};
use crate::error::NnError;
use kiln_core::{Float, Tensor};
use serde::{Deserialize, Serialize};

/// Hyper-parameters of an Adagrad group; the defaults are torch's.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdagradConfig {
    /// Learning rate (default 1e-2).
    pub lr: f64,
    /// Learning-rate decay: step t uses `lr / (1 + (t − 1)·lr_decay)` (default 0).
    pub lr_decay: f64,
    /// L2 penalty added to the gradient (default 0).
    pub weight_decay: f64,
    /// Starting value of the squared-gradient sum (default 0).
    pub initial_accumulator_value: f64,
    /// Added to the denominator for stability (default 1e-10).
    pub eps: f64,
    /// Maximise the objective instead of minimising it.
    pub maximize: bool,
}

impl Default for AdagradConfig {
    fn default() -> Self {
        AdagradConfig {
            lr: 1e-2,
            lr_decay: 0.0,
            weight_decay: 0.0,
            initial_accumulator_value: 0.0,
            eps: 1e-10,
            maximize: false,
        }
    }
}

impl From<f64> for AdagradConfig {
    /// Defaults with learning rate `lr`.
    fn from(lr: f64) -> Self {
        AdagradConfig {
            lr,
            ..Default::default()
        }
    }
}

impl GroupConfig for AdagradConfig {
    fn validate(&self) -> Result<(), NnError> {
        check_non_negative("lr", self.lr)?;
        check_non_negative("lr_decay", self.lr_decay)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        check_non_negative("initial_accumulator_value", self.initial_accumulator_value)?;
        check_non_negative("eps", self.eps)
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
}

/// The Adagrad update rule (slot `sum`).
pub struct AdagradRule;

/// Adagrad, as `torch.optim.Adagrad`: `g = ±grad + wd·p; s += g²;
/// p -= lr/(1 + (t−1)·lr_decay) · g / (√s + ε)`.
pub type Adagrad = Optim<AdagradRule>;

impl Algorithm for AdagradRule {
    type Config = AdagradConfig;
    const KIND: &'static str = "adagrad";
    const SLOTS: &'static [&'static str] = &["sum"];

    fn update(c: &AdagradConfig, param: &Tensor, grad: &Tensor, state: &mut ParamSlots) {
        state.step += 1;
        let clr = c.lr / (1.0 + (state.step - 1) as f64 * c.lr_decay);
        let (sum, _) = state.get_or_fill(0, param, c.initial_accumulator_value);
        kiln_core::dispatch_float!(param.dtype(), "adagrad", |T| {
            fused_update::<T, 1>(param, grad, [&sum], |p, g, [s]| kernel(c, clr, p, g, s))
        })
    }
}

fn kernel<T: Float>(c: &AdagradConfig, clr: f64, p: &mut [T], g: &[T], s: &mut [T]) {
    if c.weight_decay != 0.0 {
        kernel_impl::<T, true>(c, clr, p, g, s)
    } else {
        kernel_impl::<T, false>(c, clr, p, g, s)
    }
}

/// One fused pass; `L2` is fixed per call so the loop has no branches.
fn kernel_impl<T: Float, const L2: bool>(
    c: &AdagradConfig,
    clr: f64,
    p: &mut [T],
    g: &[T],
    s: &mut [T],
) {
    let sg: T = sign(c.maximize);
    let wd = T::from_f64(c.weight_decay);
    let eps = T::from_f64(c.eps);
    let neg_clr = T::from_f64(-clr);
    for ((p, &g), s) in p.iter_mut().zip(g).zip(s.iter_mut()) {
        let mut g = g * sg;
        if L2 {
            g += wd * *p;
        }
        *s += g * g;
        *p += neg_clr * g / (s.sqrt() + eps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::Optimizer;
    use crate::Param;

    #[test]
    fn accumulates_squares_and_decays_the_rate() {
        let w = Param::new(Tensor::from_slice(&[1f64], [1]));
        let c = AdagradConfig {
            lr: 0.5,
            lr_decay: 1.0,
            initial_accumulator_value: 5.0,
            eps: 0.0,
            ..Default::default()
        };
        let mut opt = Adagrad::new(vec![w.clone()], c).unwrap();
        // s = 5 + 4 = 9: 1 − 0.5·2/3; then s = 9 + 16 = 25, clr = 0.25: − 0.25·4/5.
        for g in [2.0, 4.0] {
            w.set_grad(Some(Tensor::from_slice(&[g], [1])));
            opt.step();
        }
        let want = 1.0 - 1.0 / 3.0 - 0.2;
        assert!((w.item() - want).abs() < 1e-12, "{} vs {want}", w.item());
        let e = Adagrad::new(
            vec![w],
            AdagradConfig {
                lr_decay: -1.0,
                ..Default::default()
            },
        )
        .err()
        .unwrap();
        assert!(
            matches!(&e, NnError::Config(m) if m.starts_with("lr_decay")),
            "{e}"
        );
    }
}
