//! `pow`: elementwise power `a^b` of float tensors with NumPy broadcasting, differentiable in
//! both the base and the exponent.
//!
//! Gradients follow PyTorch's `pow` backward exactly:
//! - base: `g · b · a^(b−1)`, set to 0 where `b == 0` (so `0^0` has gradient 0, not NaN);
//! - exponent: `g · out · ln(a)`, set to 0 where `a == 0` and `b >= 0` (so `0^b` has gradient
//!   0 instead of `0 · −∞`); where `a == 0` and `b < 0` it is `∞ · −∞ = −∞`, as in PyTorch.
//!
//! Negative bases follow `powf`: the result is real for integral exponents and NaN otherwise.
//! The gradient with respect to such a base is `b · a^(b−1)` (finite for integral `b`); the
//! gradient with respect to the exponent uses the real logarithm of a negative number, so it
//! is NaN there (PyTorch gives NaN too).
//!
//! A one-element exponent takes a fast path: 0, ±0.5, ±1, 2, 3 and −2 avoid `powf` (like
//! PyTorch, 0.5 is `sqrt`, so `(−0)^0.5 = −0` and `(−∞)^0.5 = NaN`).

use crate::autograd::GradFn;
use crate::dispatch_float;
use crate::dtype::{Element, Float};
use crate::ops::compare::{zip3, zip4};
use crate::ops::kernels::{map, zip_map};
use crate::shape::{broadcast_shape, Shape};
use crate::tensor::Tensor;

/// The single value of a one-element exponent, if it has one element.
fn scalar_exponent(b: &Tensor) -> Option<f64> {
    (b.elem_count() == 1).then(|| b.item())
}

/// `a^e` for a constant exponent, with the special values computed without `powf`.
fn pow_const<T: Float>(a: &Tensor, e: f64) -> crate::alloc::Buffer<T> {
    let one = T::one();
    match e {
        0.0 => map::<T, T>(a, "pow", |_| one),
        1.0 => map::<T, T>(a, "pow", |x| x),
        2.0 => map::<T, T>(a, "pow", |x| x * x),
        3.0 => map::<T, T>(a, "pow", |x| x * x * x),
        0.5 => map::<T, T>(a, "pow", |x| x.sqrt()),
        -0.5 => map::<T, T>(a, "pow", |x| one / x.sqrt()),
        -1.0 => map::<T, T>(a, "pow", |x| one / x),
        -2.0 => map::<T, T>(a, "pow", |x| one / (x * x)),
        _ => {
            let e = T::from_f64(e);
            map::<T, T>(a, "pow", |x| x.powf(e))
        }
    }
}

fn pow_forward(a: &Tensor, b: &Tensor) -> Tensor {
    assert!(
        a.dtype() == b.dtype(),
        "pow: dtype mismatch, {} vs {} (shapes {} and {})",
        a.dtype(),
        b.dtype(),
        a.shape(),
        b.shape()
    );
    let (storage, shape) = dispatch_float!(a.dtype(), "pow", |T| {
        let (buf, shape) = match scalar_exponent(b) {
            // A one-element exponent leaves the elements (and their order) of `a` unchanged;
            // only leading size-1 dims may be added.
            Some(e) => {
                let shape = broadcast_shape(a.shape(), b.shape(), "pow");
                (pow_const::<T>(a, e), shape)
            }
            None => zip_map::<T, T>(a, b, "pow", |x, y| x.powf(y)),
        };
        (<T as Element>::into_storage(buf), shape)
    });
    Tensor::op_result(storage, shape, &[a, b], || Box::new(PowBackward))
}

struct PowBackward;

/// `g · b · a^(b−1)` over the output shape (0 where `b == 0`).
fn grad_base<T: Float>(g: &Tensor, a: &Tensor, b: &Tensor, shape: &Shape) -> Tensor {
    let zero = T::zero();
    let buf = match scalar_exponent(b) {
        Some(e) => {
            let ev = T::from_f64(e);
            let (buf, _) = match e {
                0.0 => zip_map::<T, T>(g, a, "pow_backward", |_, _| zero),
                1.0 => zip_map::<T, T>(g, a, "pow_backward", |gv, _| gv),
                2.0 => zip_map::<T, T>(g, a, "pow_backward", |gv, x| gv * (x + x)),
                _ => {
                    let em1 = T::from_f64(e - 1.0);
                    zip_map::<T, T>(g, a, "pow_backward", |gv, x| gv * ev * x.powf(em1))
                }
            };
            buf
        }
        None => zip3::<T, T, T, T>(g, a, b, shape, "pow_backward", |gv, x, y| {
            if y == zero {
                zero
            } else {
                gv * y * x.powf(y - T::one())
            }
        }),
    };
    Tensor::from_buffer(buf, shape.clone())
}

/// `g · out · ln(a)` over the output shape (0 where `a == 0` and `b >= 0`).
fn grad_exponent<T: Float>(
    g: &Tensor,
    a: &Tensor,
    b: &Tensor,
    out: &Tensor,
    shape: &Shape,
) -> Tensor {
    let zero = T::zero();
    let buf = zip4::<T, T, T, T, T>(g, a, b, out, shape, "pow_backward", |gv, x, y, o| {
        if x == zero && y >= zero {
            zero
        } else {
            gv * o * x.ln()
        }
    });
    Tensor::from_buffer(buf, shape.clone())
}

impl GradFn for PowBackward {
    fn name(&self) -> &'static str {
        "pow"
    }

    fn backward(&self, inputs: &[Tensor], output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (a, b) = (&inputs[0], &inputs[1]);
        let shape = g.shape();
        dispatch_float!(g.dtype(), "pow_backward", |T| {
            vec![
                a.tracks_grad()
                    .then(|| grad_base::<T>(g, a, b, shape).sum_to(a.shape())),
                b.tracks_grad()
                    .then(|| grad_exponent::<T>(g, a, b, output, shape).sum_to(b.shape())),
            ]
        })
    }
}

impl Tensor {
    /// `self ^ exponent` elementwise (float dtypes, broadcasting); differentiable in both, with PyTorch's rules at a zero base.
    pub fn pow(&self, exponent: &Tensor) -> Tensor {
        pow_forward(self, exponent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::DType;

    /// Positive f64 values (bases for gradchecks): |N(0, 1)| + 0.3.
    fn positive(shape: &[usize], seed: u64) -> Tensor {
        let v: Vec<f64> = randn_f64(shape, seed)
            .to_vec::<f64>()
            .iter()
            .map(|x| x.abs() + 0.3)
            .collect();
        Tensor::from_vec(v, shape)
    }

    fn close(got: f64, want: f64) -> bool {
        (got.is_nan() && want.is_nan())
            || got == want
            || (got - want).abs() <= 1e-14 * want.abs().max(1e-300)
    }

    #[test]
    fn values_match_powf_with_broadcasting() {
        let a = positive(&[2, 3, 4], 1);
        let b = randn_f64(&[3, 1], 2);
        let got = a.pow(&b);
        assert_eq!(got.dims(), &[2, 3, 4]);
        let got = got.to_vec::<f64>();
        let (va, vb) = (a.to_vec::<f64>(), b.to_vec::<f64>());
        for (i, g) in got.iter().enumerate() {
            let want = va[i].powf(vb[(i / 4) % 3]);
            assert!(close(*g, want), "at {i}: {g} vs {want}");
        }
        // Broadcast the base instead, with a transposed exponent; and f32.
        let base = positive(&[4], 3);
        let e = randn_f64(&[4, 3], 4);
        let got = base.to_dtype(DType::F32).pow(&e.t().to_dtype(DType::F32));
        let (vb, ve) = (base.to_vec::<f64>(), e.to_vec::<f64>());
        for (i, g) in got.to_vec::<f32>().iter().enumerate() {
            let (r, c) = (i / 4, i % 4);
            let want = (vb[c] as f32).powf(ve[c * 3 + r] as f32);
            assert!(
                (g - want).abs() <= 1e-6 * want.abs(),
                "at {i}: {g} vs {want}"
            );
        }
    }

    #[test]
    fn constant_exponents_match_powf() {
        let vals = [0.0f64, -0.0, 0.25, 1.0, 2.0, 7.5, -1.5, -3.0, 1e-3];
        let a = Tensor::from_slice(&vals, [9]);
        for e in [0.0, 1.0, 2.0, 3.0, 0.5, -0.5, -1.0, -2.0, 1.7, -2.5] {
            // As a rank-0, a [1] and a [1, 1] exponent (the last adds a leading dim).
            for shape in [vec![], vec![1], vec![1, 1]] {
                let got = a.pow(&Tensor::from_vec(vec![e], shape.clone()));
                let want_dims: &[usize] = if shape.len() == 2 { &[1, 9] } else { &[9] };
                assert_eq!(got.dims(), want_dims);
                for (x, g) in vals.iter().zip(got.to_vec::<f64>()) {
                    let want = x.powf(e);
                    // sqrt(-0) = -0 while powf(-0, 0.5) = +0: equal as numbers.
                    assert!(close(g, want), "{x}^{e}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn gradcheck_pow_with_broadcast_and_non_contiguous() {
        let a = positive(&[3, 4], 5).requires_grad();
        let b = randn_f64(&[4], 6).requires_grad();
        gradcheck(|x| x[0].pow(&x[1]), &[a, b]).unwrap();
        // Broadcast base, transposed base, narrowed exponent.
        let a = positive(&[4, 3], 7).requires_grad();
        let b = randn_f64(&[2, 3, 6], 8).requires_grad();
        gradcheck(|x| x[0].t().pow(&x[1].narrow(2, 1, 4)), &[a, b]).unwrap();
        // One-element exponents (fast paths), differentiable too.
        for (i, e) in [2.0, 0.5, -1.0, 1.0, 3.0, 1.3].into_iter().enumerate() {
            let a = positive(&[2, 3], 9 + i as u64).requires_grad();
            let b = Tensor::from_slice(&[e], [1]).requires_grad();
            gradcheck(|x| x[0].t().pow(&x[1]), &[a, b]).unwrap();
        }
    }

    #[test]
    fn zero_base_follows_pytorch() {
        let a = Tensor::from_slice(&[0.0f64, 0.0, 0.0, 0.0, 2.0], [5]).requires_grad();
        let b = Tensor::from_slice(&[0.0f64, 1.0, 2.5, -1.0, 0.0], [5]).requires_grad();
        let out = a.pow(&b);
        assert_eq!(out.to_vec::<f64>(), vec![1.0, 0.0, 0.0, f64::INFINITY, 1.0]);
        out.backward_with_grad(&Tensor::ones([5]).to_dtype(DType::F64));
        // d/da = b·a^(b−1), zeroed where b == 0.
        assert_eq!(
            a.grad().unwrap().to_vec::<f64>(),
            vec![0.0, 1.0, 0.0, f64::NEG_INFINITY, 0.0]
        );
        // d/db = out·ln(a), zeroed where a == 0 and b >= 0; inf·(−inf) for b < 0.
        assert_eq!(
            b.grad().unwrap().to_vec::<f64>(),
            vec![0.0, 0.0, 0.0, f64::NEG_INFINITY, 2f64.ln()]
        );
    }

    #[test]
    fn zero_exponent_has_zero_base_gradient_for_constant_exponent() {
        let a = Tensor::from_slice(&[0.0f64, 3.0], [2]).requires_grad();
        let b = Tensor::scalar(0.0f64).requires_grad();
        a.pow(&b).sum_all().backward();
        assert_eq!(a.grad().unwrap().to_vec::<f64>(), vec![0.0, 0.0]);
        // d/db = 1·ln(3) from the second element; the first (0^0) contributes 0.
        assert_eq!(b.grad().unwrap().to_vec::<f64>(), vec![3f64.ln()]);
    }

    #[test]
    fn negative_base_with_integral_exponent() {
        let a = Tensor::from_slice(&[-2.0f64, -0.5], [2]).requires_grad();
        let b = Tensor::from_slice(&[3.0f64, 2.0], [2]).requires_grad();
        let out = a.pow(&b);
        assert_eq!(out.to_vec::<f64>(), vec![-8.0, 0.25]);
        out.sum_all().backward();
        assert_eq!(
            a.grad().unwrap().to_vec::<f64>(),
            vec![3.0 * 4.0, 2.0 * -0.5]
        );
        assert!(b.grad().unwrap().to_vec::<f64>().iter().all(|g| g.is_nan()));
        // Non-integral exponent of a negative base: NaN.
        let r = Tensor::from_slice(&[-2.0f64], [1]).pow(&Tensor::from_slice(&[0.5f64], [1]));
        assert!(r.item().is_nan());
    }

    #[test]
    #[should_panic(expected = "pow: shapes [2, 3] and [2] cannot be broadcast together")]
    fn shape_mismatch_panics() {
        let _ = Tensor::ones([2, 3]).pow(&Tensor::ones([2]));
    }

    #[test]
    #[should_panic(expected = "pow: expected a float tensor (f32 or f64), got i64")]
    fn integer_dtype_panics() {
        let t = Tensor::ones([2]).to_dtype(DType::I64);
        let _ = t.pow(&t);
    }

    #[test]
    #[should_panic(expected = "pow: dtype mismatch, f32 vs f64")]
    fn dtype_mismatch_panics() {
        let _ = Tensor::ones([2]).pow(&Tensor::ones([2]).to_dtype(DType::F64));
    }
}
