//! Adam (optionally AMSGrad) and AdamW, as `torch.optim.Adam` / `torch.optim.AdamW`.

use super::{
    check_non_negative, check_unit_interval, fused_update, sign, Algorithm, GroupConfig, Lerp,
    Optim, ParamSlots,
};
use crate::error::NnError;
use kiln_core::{Float, Tensor};
use serde::{Deserialize, Serialize};

/// Hyper-parameters of an Adam group; the defaults are torch's.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamConfig {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// Decay rates of the first and second moment estimates (default (0.9, 0.999)).
    pub betas: (f64, f64),
    /// Added to the denominator for stability (default 1e-8).
    pub eps: f64,
    /// L2 penalty added to the gradient (default 0).
    pub weight_decay: f64,
    /// Use the AMSGrad variant (the running maximum of the second moment).
    pub amsgrad: bool,
    /// Maximise the objective instead of minimising it.
    pub maximize: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            maximize: false,
        }
    }
}

impl From<f64> for AdamConfig {
    /// Defaults with learning rate `lr`.
    fn from(lr: f64) -> Self {
        AdamConfig {
            lr,
            ..Default::default()
        }
    }
}

/// Hyper-parameters of an AdamW group: as [`AdamConfig`], but the weight decay (default 0.01)
/// is decoupled: the parameter shrinks by `lr·weight_decay` instead of the gradient growing.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// Decay rates of the first and second moment estimates (default (0.9, 0.999)).
    pub betas: (f64, f64),
    /// Added to the denominator for stability (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (default 0.01).
    pub weight_decay: f64,
    /// Use the AMSGrad variant.
    pub amsgrad: bool,
    /// Maximise the objective instead of minimising it.
    pub maximize: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            amsgrad: false,
            maximize: false,
        }
    }
}

impl From<f64> for AdamWConfig {
    /// Defaults with learning rate `lr`.
    fn from(lr: f64) -> Self {
        AdamWConfig {
            lr,
            ..Default::default()
        }
    }
}

/// The values both variants share.
struct Hyper {
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
}

fn validate(lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64) -> Result<(), NnError> {
    check_non_negative("lr", lr)?;
    check_unit_interval("betas.0", betas.0)?;
    check_unit_interval("betas.1", betas.1)?;
    check_non_negative("eps", eps)?;
    check_non_negative("weight_decay", weight_decay)
}

macro_rules! adam_config {
    ($cfg:ty, $decoupled:expr) => {
        impl GroupConfig for $cfg {
            fn validate(&self) -> Result<(), NnError> {
                validate(self.lr, self.betas, self.eps, self.weight_decay)
            }
            fn lr(&self) -> f64 {
                self.lr
            }
            fn set_lr(&mut self, lr: f64) {
                self.lr = lr;
            }
            fn momentum(&self) -> Option<f64> {
                Some(self.betas.0)
            }
            fn set_momentum(&mut self, momentum: f64) {
                self.betas.0 = momentum;
            }
        }

        impl $cfg {
            fn hyper(&self) -> Hyper {
                Hyper {
                    lr: self.lr,
                    betas: self.betas,
                    eps: self.eps,
                    weight_decay: self.weight_decay,
                    amsgrad: self.amsgrad,
                    maximize: self.maximize,
                    decoupled: $decoupled,
                }
            }
        }
    };
}

adam_config!(AdamConfig, false);
adam_config!(AdamWConfig, true);

/// The Adam update rule (slots `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`).
pub struct AdamRule;

/// The AdamW update rule (same slots as Adam).
pub struct AdamWRule;

/// Adam, as `torch.optim.Adam`: `g = ±grad + wd·p; m = lerp(m, g, 1−β1); v = β2·v + (1−β2)·g²;
/// p -= lr/(1−β1ᵗ) · m / (√v̂ / √(1−β2ᵗ) + ε)` with `v̂ = max(v̂, v)` under AMSGrad, else `v`.
pub type Adam = Optim<AdamRule>;

/// AdamW, as `torch.optim.AdamW`: Adam without the L2 term, and `p *= 1 − lr·wd` first.
pub type AdamW = Optim<AdamWRule>;

const SLOTS: &[&str] = &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"];

impl Algorithm for AdamRule {
    type Config = AdamConfig;
    const KIND: &'static str = "adam";
    const SLOTS: &'static [&'static str] = SLOTS;
    fn update(c: &AdamConfig, param: &Tensor, grad: &Tensor, state: &mut ParamSlots) {
        update(&c.hyper(), param, grad, state)
    }
}

impl Algorithm for AdamWRule {
    type Config = AdamWConfig;
    const KIND: &'static str = "adamw";
    const SLOTS: &'static [&'static str] = SLOTS;
    fn update(c: &AdamWConfig, param: &Tensor, grad: &Tensor, state: &mut ParamSlots) {
        update(&c.hyper(), param, grad, state)
    }
}

fn update(h: &Hyper, param: &Tensor, grad: &Tensor, state: &mut ParamSlots) {
    state.step += 1;
    let t = state.step as f64;
    let (m, _) = state.get_or_fill(0, param, 0.0);
    let (v, _) = state.get_or_fill(1, param, 0.0);
    let vmax = h.amsgrad.then(|| state.get_or_fill(2, param, 0.0).0);
    let l2 = h.weight_decay != 0.0 && !h.decoupled;
    kiln_core::dispatch_float!(param.dtype(), "adam", |T| {
        let k = Consts::<T>::new(h, t);
        match (&vmax, l2) {
            (Some(vm), true) => {
                fused_update::<T, 3>(param, grad, [&m, &v, vm], |p, g, [m, v, vm]| {
                    kernel::<T, true, true>(&k, p, g, m, v, vm)
                })
            }
            (Some(vm), false) => {
                fused_update::<T, 3>(param, grad, [&m, &v, vm], |p, g, [m, v, vm]| {
                    kernel::<T, true, false>(&k, p, g, m, v, vm)
                })
            }
            (None, true) => fused_update::<T, 2>(param, grad, [&m, &v], |p, g, [m, v]| {
                kernel::<T, false, true>(&k, p, g, m, v, &mut [])
            }),
            (None, false) => fused_update::<T, 2>(param, grad, [&m, &v], |p, g, [m, v]| {
                kernel::<T, false, false>(&k, p, g, m, v, &mut [])
            }),
        }
    })
}

/// The scalars of one step, in the element type (torch computes them in double precision and
/// casts them).
struct Consts<T> {
    sign: T,
    wd: T,
    shrink: T,
    m_lerp: Lerp<T>,
    b2: T,
    w2: T,
    eps: T,
    neg_step: T,
    bias2_sqrt: T,
}

impl<T: Float> Consts<T> {
    fn new(h: &Hyper, t: f64) -> Self {
        let decoupled = h.decoupled && h.weight_decay != 0.0;
        Consts {
            sign: sign(h.maximize),
            wd: T::from_f64(h.weight_decay),
            shrink: T::from_f64(if decoupled {
                1.0 - h.lr * h.weight_decay
            } else {
                1.0
            }),
            m_lerp: Lerp::new(1.0 - h.betas.0),
            b2: T::from_f64(h.betas.1),
            w2: T::from_f64(1.0 - h.betas.1),
            eps: T::from_f64(h.eps),
            neg_step: T::from_f64(-(h.lr / (1.0 - h.betas.0.powf(t)))),
            bias2_sqrt: T::from_f64((1.0 - h.betas.1.powf(t)).sqrt()),
        }
    }
}

/// One fused pass; `AMS` and `L2` are fixed per call so the loop has no branches.
fn kernel<T: Float, const AMS: bool, const L2: bool>(
    k: &Consts<T>,
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    vmax: &mut [T],
) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    let vmax = if AMS { &mut vmax[..n] } else { vmax };
    for i in 0..n {
        // Multiplying by 1 (no decoupled decay) is exact.
        let pi = p[i] * k.shrink;
        let mut gi = g[i] * k.sign;
        if L2 {
            gi += k.wd * pi;
        }
        let mi = k.m_lerp.at(m[i], gi);
        let vi = v[i] * k.b2 + k.w2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        let vi = if AMS {
            let x = if vmax[i] > vi { vmax[i] } else { vi };
            vmax[i] = x;
            x
        } else {
            vi
        };
        p[i] = pi + k.neg_step * mi / (vi.sqrt() / k.bias2_sqrt + k.eps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::Optimizer;
    use crate::Param;

    #[test]
    fn first_step_moves_by_lr_times_the_sign() {
        // m̂ = g, v̂ = g²: the first step is lr·g/(|g| + ε).
        let w = Param::new(Tensor::from_slice(&[1f64, 1.0], [2]));
        let mut opt = Adam::new(vec![w.clone()], 0.1).unwrap();
        w.set_grad(Some(Tensor::from_slice(&[3f64, -0.5], [2])));
        opt.step();
        let r = w.to_vec::<f64>();
        assert!(
            (r[0] - 0.9).abs() < 1e-8 && (r[1] - 1.1).abs() < 1e-8,
            "{r:?}"
        );
        assert_eq!(opt.param_state("0").unwrap().step, 1);
    }

    #[test]
    fn adamw_shrinks_the_parameter_before_the_step() {
        let w = Param::new(Tensor::from_slice(&[2f64], [1]));
        let c = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![w.clone()], c).unwrap();
        w.set_grad(Some(Tensor::from_slice(&[1f64], [1])));
        opt.step();
        // 2·(1 − 0.05) − 0.1 = 1.8
        assert!((w.item() - 1.8).abs() < 1e-9, "{}", w.item());
    }

    #[test]
    fn amsgrad_keeps_the_largest_second_moment() {
        let w = Param::new(Tensor::from_slice(&[0f64], [1]));
        let c = AdamConfig {
            lr: 0.1,
            amsgrad: true,
            ..Default::default()
        };
        let mut opt = Adam::new(vec![w.clone()], c).unwrap();
        for g in [10.0, 0.0] {
            w.set_grad(Some(Tensor::from_slice(&[g], [1])));
            opt.step();
        }
        let st = opt.param_state("0").unwrap();
        let v = st.slots[1].as_ref().unwrap().item();
        let vmax = st.slots[2].as_ref().unwrap().item();
        assert!((vmax - 0.1).abs() < 1e-12 && v < vmax, "{v} {vmax}");
    }

    #[test]
    fn betas_outside_the_unit_interval_are_errors() {
        let w = Param::new(Tensor::ones([1]));
        for (betas, field) in [((1.0, 0.999), "betas.0"), ((0.9, -0.1), "betas.1")] {
            let e = Adam::new(
                vec![w.clone()],
                AdamConfig {
                    betas,
                    ..Default::default()
                },
            )
            .err()
            .unwrap();
            assert!(
                matches!(&e, NnError::Config(m) if m.starts_with(field)),
                "{e}"
            );
        }
        let e = AdamW::new(
            vec![w],
            AdamWConfig {
                eps: -1.0,
                ..Default::default()
            },
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("eps"), "{e}");
    }
}
