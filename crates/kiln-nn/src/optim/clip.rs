//! Gradient clipping: by global norm (`torch.nn.utils.clip_grad_norm_`) and by value
//! (`clip_grad_value_`).
//!
//! Clipping replaces each gradient with a scaled or clamped copy instead of writing into it:
//! autograd may hand the same gradient tensor to several parameters, and an in-place write
//! would clip those twice.

use crate::error::NnError;
use crate::module::Param;
use kiln_core::{Element, Tensor};

/// Anything that holds a parameter tensor: `Param`, `Tensor`, `(String, Param)` and references
/// to them, so `&model.parameters()` and `&model.named_parameters()` both work.
pub trait ParamRef {
    /// The parameter tensor (whose `grad()` is clipped).
    fn param_tensor(&self) -> &Tensor;
}

impl ParamRef for Tensor {
    fn param_tensor(&self) -> &Tensor {
        self
    }
}

impl ParamRef for Param {
    fn param_tensor(&self) -> &Tensor {
        self.tensor()
    }
}

impl ParamRef for (String, Param) {
    fn param_tensor(&self) -> &Tensor {
        self.1.tensor()
    }
}

impl<P: ParamRef + ?Sized> ParamRef for &P {
    fn param_tensor(&self) -> &Tensor {
        (**self).param_tensor()
    }
}

/// Which norm [`clip_grad_norm_with`] measures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormType {
    /// Euclidean norm `√Σg²` (the default).
    L2,
    /// Largest absolute value.
    Inf,
    /// `(Σ|g|ᵖ)^(1/p)` for a finite `p > 0`.
    P(f64),
}

fn grads<P: ParamRef>(params: impl IntoIterator<Item = P>) -> Vec<(Tensor, Tensor)> {
    params
        .into_iter()
        .filter_map(|p| {
            let t = p.param_tensor().clone();
            t.grad().map(|g| (t, g))
        })
        .collect()
}

fn norm_of(grads: &[(Tensor, Tensor)], norm: NormType) -> f64 {
    let mut acc = 0f64;
    for (_, g) in grads {
        let g = g.contiguous();
        let r = g.layout().contiguous_range().expect("contiguous");
        let s = g.storage();
        kiln_core::with_float_storage!(&*s, "clip_grad_norm_", |b: T| {
            let xs = &b[r];
            match norm {
                NormType::L2 => acc += xs.iter().map(|x| x.to_f64() * x.to_f64()).sum::<f64>(),
                NormType::P(p) => acc += xs.iter().map(|x| x.to_f64().abs().powf(p)).sum::<f64>(),
                NormType::Inf => {
                    for x in xs {
                        let a = x.to_f64().abs();
                        // NaN propagates, as torch's max does.
                        if a > acc || a.is_nan() {
                            acc = a;
                        }
                    }
                }
            }
        });
        if acc.is_nan() {
            return f64::NAN;
        }
    }
    match norm {
        NormType::L2 => acc.sqrt(),
        NormType::P(p) => acc.powf(1.0 / p),
        NormType::Inf => acc,
    }
}

fn check_norm_type(norm: NormType) -> Result<(), NnError> {
    match norm {
        NormType::P(p) if !(p.is_finite() && p > 0.0) => Err(NnError::Config(format!(
            "norm_type: p must be finite and > 0, got {p} (use NormType::Inf for the max norm)"
        ))),
        _ => Ok(()),
    }
}

/// The norm of all gradients of `params` taken together (parameters without a gradient are
/// skipped), without changing anything.
pub fn grad_norm<P: ParamRef>(
    params: impl IntoIterator<Item = P>,
    norm: NormType,
) -> Result<f64, NnError> {
    check_norm_type(norm)?;
    Ok(norm_of(&grads(params), norm))
}

/// Scales the gradients of `params` so that their global L2 norm is at most `max_norm`, and
/// returns the norm before clipping (torch's `clip_grad_norm_`). See [`clip_grad_norm_with`].
pub fn clip_grad_norm_<P: ParamRef>(
    params: impl IntoIterator<Item = P>,
    max_norm: f64,
) -> Result<f64, NnError> {
    clip_grad_norm_with(params, max_norm, NormType::L2)
}

/// Scales every gradient by `min(1, max_norm / (norm + 1e-6))`, where `norm` is the `norm_type`
/// norm of all gradients together, and returns `norm`. As in torch, a non-finite norm is not an
/// error: an infinite one zeroes the gradients and NaN makes them NaN; check the returned value
/// to skip such steps. A negative or NaN `max_norm` is an error.
pub fn clip_grad_norm_with<P: ParamRef>(
    params: impl IntoIterator<Item = P>,
    max_norm: f64,
    norm_type: NormType,
) -> Result<f64, NnError> {
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(NnError::Config(format!(
            "max_norm must be >= 0, got {max_norm}"
        )));
    }
    check_norm_type(norm_type)?;
    let grads = grads(params);
    let total = norm_of(&grads, norm_type);
    let coef = max_norm / (total + 1e-6);
    // A NaN norm scales by NaN, as torch does.
    if coef.is_nan() || coef < 1.0 {
        let _guard = kiln_core::no_grad();
        for (p, g) in &grads {
            p.set_grad(Some(g.mul_scalar(coef)));
        }
    }
    Ok(total)
}

/// Clamps every gradient of `params` into `[-clip_value, clip_value]` (torch's
/// `clip_grad_value_`). A negative or NaN `clip_value` is an error.
pub fn clip_grad_value_<P: ParamRef>(
    params: impl IntoIterator<Item = P>,
    clip_value: f64,
) -> Result<(), NnError> {
    if clip_value.is_nan() || clip_value < 0.0 {
        return Err(NnError::Config(format!(
            "clip_value must be >= 0, got {clip_value}"
        )));
    }
    let _guard = kiln_core::no_grad();
    for (p, g) in grads(params) {
        p.set_grad(Some(g.clamp(-clip_value, clip_value)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModuleExt;

    fn with_grad(g: &[f32]) -> Param {
        let p = Param::new(Tensor::zeros([g.len()]));
        p.set_grad(Some(Tensor::from_slice(g, [g.len()])));
        p
    }

    #[test]
    fn global_l2_norm_scales_every_gradient() {
        // ‖(3, 4, 12)‖ = 13.
        let (a, b) = (with_grad(&[3.0, 4.0]), with_grad(&[12.0]));
        let params = vec![a.clone(), b.clone(), Param::new(Tensor::zeros([2]))];
        let n = clip_grad_norm_(&params, 6.5).unwrap();
        assert_eq!(n, 13.0);
        let c = 6.5 / (13.0 + 1e-6);
        let ga = a.grad().unwrap().to_vec::<f32>();
        assert!((ga[0] - (3.0 * c) as f32).abs() < 1e-6 && (ga[1] - (4.0 * c) as f32).abs() < 1e-6);
        assert!((b.grad().unwrap().item() - 12.0 * c).abs() < 1e-5);
        assert!((grad_norm(&params, NormType::L2).unwrap() - 6.5).abs() < 1e-5);
        // Below the limit nothing changes.
        let n2 = clip_grad_norm_(&params, 100.0).unwrap();
        assert!((n2 - 6.5).abs() < 1e-5);
        assert!((b.grad().unwrap().item() - 12.0 * c).abs() < 1e-5);
    }

    #[test]
    fn inf_and_p_norms() {
        let params = vec![with_grad(&[1.0, -5.0]), with_grad(&[2.0])];
        assert_eq!(grad_norm(&params, NormType::Inf).unwrap(), 5.0);
        assert_eq!(grad_norm(&params, NormType::P(1.0)).unwrap(), 8.0);
        let n = clip_grad_norm_with(&params, 1.0, NormType::Inf).unwrap();
        assert_eq!(n, 5.0);
        let g = params[0].grad().unwrap().to_vec::<f32>();
        assert!((g[1] + 1.0).abs() < 1e-6, "{g:?}");
        assert!(grad_norm(&params, NormType::P(0.0)).is_err());
    }

    #[test]
    fn shared_gradients_are_clipped_once() {
        let g = Tensor::from_slice(&[3f32, 4.0], [2]);
        let (a, b) = (
            Param::new(Tensor::zeros([2])),
            Param::new(Tensor::zeros([2])),
        );
        a.set_grad(Some(g.clone()));
        b.set_grad(Some(g.clone()));
        let n = clip_grad_norm_([&a, &b], 1.0).unwrap();
        assert!((n - 50f64.sqrt()).abs() < 1e-6);
        assert_eq!(g.to_vec::<f32>(), [3.0, 4.0]);
        let total = grad_norm([&a, &b], NormType::L2).unwrap();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
    }

    #[test]
    fn clip_by_value_and_bad_arguments() {
        let p = with_grad(&[-3.0, 0.5, 2.0]);
        clip_grad_value_([&p], 1.0).unwrap();
        assert_eq!(p.grad().unwrap().to_vec::<f32>(), [-1.0, 0.5, 1.0]);
        let e = clip_grad_value_([&p], -1.0).unwrap_err().to_string();
        assert!(e.contains("clip_value"), "{e}");
        let e = clip_grad_norm_([&p], f64::NAN).unwrap_err().to_string();
        assert!(e.contains("max_norm"), "{e}");
    }

    #[test]
    fn non_finite_norms_follow_torch() {
        let p = with_grad(&[f32::INFINITY, 1.0]);
        assert!(clip_grad_norm_([&p], 1.0).unwrap().is_infinite());
        assert_eq!(p.grad().unwrap().to_vec::<f32>()[1], 0.0);
        let q = with_grad(&[f32::NAN, 1.0]);
        assert!(clip_grad_norm_([&q], 1.0).unwrap().is_nan());
    }

    #[derive(crate::Module)]
    struct Two {
        a: Param,
        b: Param,
    }

    #[test]
    fn takes_named_parameters_of_a_module() {
        let m = Two {
            a: with_grad(&[3.0]),
            b: with_grad(&[4.0]),
        };
        assert_eq!(clip_grad_norm_(m.named_parameters(), 10.0).unwrap(), 5.0);
    }
}
