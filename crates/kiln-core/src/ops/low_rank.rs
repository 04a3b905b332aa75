//! `x · wᵀ + bias + s · (x · aᵀ) · bᵀ` as one op: a linear layer with a low-rank update, which is
//! LoRA's forward (PEFT's `base_layer(x) + lora_B(lora_A(x)) * scaling`) with `a` `[r, in]` and
//! `b` `[out, r]`.
//!
//! Composed, the update is an `[.., out]` tensor of its own that is then added to the layer's
//! output, and in backward its share of `x`'s gradient is a second `[.., in]` tensor that
//! autograd adds to the layer's. Here gemm accumulates both onto the one output
//! (`out = bias + x·wᵀ + low·bᵀ` with `low = s·x·aᵀ`; `dx = g·w + (s·g·b)·a`), which saves per
//! adapted layer and step two full-size intermediates, two additions and their passes.
//! Backward keeps `low` (`[.., r]`) for `b`'s gradient.

use crate::alloc::Buffer;
use crate::autograd::GradFn;
use crate::dispatch_float;
use crate::dtype::Float;
use crate::layout::Layout;
use crate::ops::matmul::{gemm_into, gemm_par, Start};
use crate::storage::Storage;
use crate::tensor::Tensor;

const OP: &str = "linear_low_rank";

/// A matrix operand of gemm: element `(i, j)` at `offset + i·rs + j·cs` of `t`'s storage.
#[derive(Clone, Copy)]
struct Mat<'a> {
    t: &'a Tensor,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// A contiguous `[rows, cols]` tensor as it is.
    fn rows(t: &'a Tensor, cols: usize) -> Self {
        Mat { t, rs: cols, cs: 1 }
    }

    /// A rank-2 tensor as its transpose.
    fn transposed(t: &'a Tensor) -> Self {
        let s = t.layout().strides();
        Mat {
            t,
            rs: s[1],
            cs: s[0],
        }
    }

    /// A rank-2 tensor as it is.
    fn plain(t: &'a Tensor) -> Self {
        let s = t.layout().strides();
        Mat {
            t,
            rs: s[0],
            cs: s[1],
        }
    }
}

/// `[m, n]` = `row` (a bias broadcast over the rows; zero when `None`) `+ p·q + u·v`, with
/// `p [m, k1]`, `q [k1, n]`, `u [m, k2]`, `v [k2, n]`.
fn sum_of_products<T: Float>(
    (m, n): (usize, usize),
    row: Option<&Tensor>,
    (p, q, k1): (Mat, Mat, usize),
    (u, v, k2): (Mat, Mat, usize),
) -> Storage {
    let mut out = Buffer::<T>::uninit(m * n);
    if out.is_empty() {
        return T::into_storage(out);
    }
    let guards: Vec<_> = [p.t, q.t, u.t, v.t].iter().map(|t| t.storage()).collect();
    let ptr = |i: usize, t: &Tensor| -> *const T {
        let s: &[T] = crate::typed_slice!(guards[i], T, OP);
        // SAFETY: the offset is inside the storage (it is the tensor's own).
        unsafe { s.as_ptr().add(t.layout().offset()) }
    };
    let row_guard = row.map(|r| r.storage());
    let start = match (&row_guard, row) {
        (Some(g), Some(r)) => {
            let s: &[T] = crate::typed_slice!(g, T, OP);
            // SAFETY: as above; the row holds `n` contiguous values (checked by the caller).
            Start::Row(unsafe { s.as_ptr().add(r.layout().offset()) })
        }
        _ => Start::Zero,
    };
    // SAFETY: every operand's layout addresses its `rows × cols` elements inside its storage
    // (the caller built the `Mat`s from the tensors' own strides and shapes), `out` is a fresh
    // `m × n` buffer that overlaps none of them.
    unsafe {
        gemm_into(
            (m, n, k1),
            out.as_mut_ptr(),
            start,
            ptr(0, p.t),
            (p.rs, p.cs),
            ptr(1, q.t),
            (q.rs, q.cs),
            gemm_par(m * n * k1),
        );
        gemm_into(
            (m, n, k2),
            out.as_mut_ptr(),
            Start::Keep,
            ptr(2, u.t),
            (u.rs, u.cs),
            ptr(3, v.t),
            (v.rs, v.cs),
            gemm_par(m * n * k2),
        );
    }
    T::into_storage(out)
}

/// Backward of [`Tensor::linear_low_rank`]; inputs `[x, weight, a, b]` and the bias, if any.
struct LowRankBackward {
    scale: f64,
    /// `s · x·aᵀ`, `[M, r]` (rows of `x` flattened).
    low: Tensor,
}

impl GradFn for LowRankBackward {
    fn name(&self) -> &'static str {
        OP
    }

    fn reads_input(&self, index: usize) -> bool {
        // The bias's gradient is the output gradient's column sums.
        index < 4
    }

    fn reads_output(&self) -> bool {
        false
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (x, w, a, b) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
        let (n, k) = (w.dim(0), w.dim(1));
        let m = g.elem_count() / n.max(1);
        let g2 = g.reshape([m, n]).contiguous();
        let x2 = x.reshape([m, k]).contiguous();
        // `s · g·b`: the gradient of `x·aᵀ`.
        let dlow = (x.tracks_grad() || a.tracks_grad())
            .then(|| g2.matmul(b).mul_scalar(self.scale).contiguous());
        let gx = x.tracks_grad().then(|| {
            let dlow = dlow.as_ref().expect("made when x takes a gradient");
            let r = a.dim(0);
            let storage = dispatch_float!(x.dtype(), OP, |T| sum_of_products::<T>(
                (m, k),
                None,
                (Mat::rows(&g2, n), Mat::plain(w), n),
                (Mat::rows(dlow, r), Mat::plain(a), r),
            ));
            Tensor::from_storage(storage, Layout::contiguous(x.shape().clone()))
        });
        let ga = a.tracks_grad().then(|| {
            dlow.as_ref()
                .expect("made when a takes a gradient")
                .t()
                .matmul(&x2)
        });
        let gb = b.tracks_grad().then(|| g2.t().matmul(&self.low));
        let gw = w.tracks_grad().then(|| g2.t().matmul(&x2));
        let gbias = inputs
            .get(4)
            .map(|bias| bias.tracks_grad().then(|| g2.sum(0, false)));
        let mut grads = vec![gx, gw, ga, gb];
        grads.extend(gbias);
        grads
    }
}

impl Tensor {
    /// `self · weightᵀ + bias + scale · (self · aᵀ) · bᵀ` over the last dim (`[.., in]` to
    /// `[.., out]`): a linear layer plus a low-rank update, LoRA's forward, as one op. `weight` is
    /// `[out, in]`, `bias` `[out]`, `a` `[r, in]` and `b` `[out, r]`. Equals
    /// `self.linear(weight, bias).add(&self.matmul(&a.t()).mul_scalar(scale).matmul(&b.t()))`.
    ///
    /// # Panics
    /// On mismatched shapes or dtypes, naming them.
    pub fn linear_low_rank(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
    ) -> Tensor {
        assert!(
            weight.rank() == 2 && self.rank() >= 1 && self.dim(-1) == weight.dim(1),
            "{OP}: input {} does not match weight {} (expected [.., in] and [out, in])",
            self.shape(),
            weight.shape()
        );
        let (n, k) = (weight.dim(0), weight.dim(1));
        assert!(
            a.rank() == 2
                && b.rank() == 2
                && a.dim(1) == k
                && b.dim(0) == n
                && b.dim(1) == a.dim(0),
            "{OP}: a {} and b {} do not fit weight {} (expected [r, {k}] and [{n}, r])",
            a.shape(),
            b.shape(),
            weight.shape()
        );
        if let Some(bias) = bias {
            assert!(
                bias.dims() == [n],
                "{OP}: bias {} does not match weight {} (expected [{n}])",
                bias.shape(),
                weight.shape()
            );
        }
        let dtype = self.dtype();
        assert!(
            [weight, a, b]
                .iter()
                .chain(&bias)
                .all(|t| t.dtype() == dtype),
            "{OP}: dtypes differ: input {dtype}, weight {}, a {}, b {}{}",
            weight.dtype(),
            a.dtype(),
            b.dtype(),
            bias.map_or(String::new(), |t| format!(", bias {}", t.dtype()))
        );
        let r = a.dim(0);
        let low_of = |x: &Tensor| x.matmul(&a.t()).mul_scalar(scale);
        if k == 0 || r == 0 || !dtype.is_float() {
            return self.linear(weight, bias).add(&low_of(self).matmul(&b.t()));
        }
        let x = self.contiguous();
        let m = x.elem_count() / k;
        let x2 = x.reshape([m, k]);
        let low = crate::autograd::with_no_grad(|| low_of(&x2).contiguous());
        let bias = bias.map(Tensor::contiguous);
        let storage = dispatch_float!(dtype, OP, |T| sum_of_products::<T>(
            (m, n),
            bias.as_ref(),
            (Mat::rows(&x2, k), Mat::transposed(weight), k),
            (Mat::rows(&low, r), Mat::transposed(b), r),
        ));
        let mut dims = self.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        // The contiguous `x` is the input, so backward reads it without a second copy.
        let mut inputs = vec![&x, weight, a, b];
        inputs.extend(bias.as_ref());
        Tensor::op_result(storage, dims.into(), &inputs, || LowRankBackward {
            scale,
            low,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::ops::linear::tests::assert_close;
    use crate::{DType, Tensor};

    fn composed(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor) -> Tensor {
        x.linear(w, bias)
            .add(&x.matmul(&a.t()).mul_scalar(0.7).matmul(&b.t()))
    }

    #[test]
    fn values_and_gradients_equal_the_composed_ops() {
        // Small and large enough to split over threads; with and without bias; a transposed
        // weight view; frozen weight and bias as in LoRA.
        for (xdims, n, r, with_bias, frozen) in [
            (vec![2, 3, 7], 5, 2, true, false),
            (vec![300, 64], 96, 8, true, true),
            (vec![4, 7], 6, 3, false, true),
            (vec![7], 4, 1, true, false),
        ] {
            let k = *xdims.last().unwrap();
            let x = randn_f64(&xdims, 1).requires_grad();
            let w = randn_f64(&[k, n], 2).t();
            let w = if frozen {
                w
            } else {
                w.contiguous().requires_grad()
            };
            let bias = with_bias.then(|| {
                let b = randn_f64(&[n], 3);
                if frozen {
                    b
                } else {
                    b.requires_grad()
                }
            });
            let a = randn_f64(&[r, k], 4).requires_grad();
            let b = randn_f64(&[n, r], 5).requires_grad();
            let g = randn_f64(
                &{
                    let mut d = xdims.clone();
                    *d.last_mut().unwrap() = n;
                    d
                },
                6,
            );
            let mut leaves = vec![x.clone(), a.clone(), b.clone()];
            if !frozen {
                leaves.push(w.clone());
                leaves.extend(bias.clone());
            }
            let grads = |y: Tensor| {
                y.mul(&g).sum_all().backward();
                let got: Vec<Tensor> = leaves.iter().map(|t| t.grad().unwrap()).collect();
                leaves.iter().for_each(|t| t.zero_grad());
                got
            };
            let fused = x.linear_low_rank(&w, bias.as_ref(), &a, &b, 0.7);
            let want = composed(&x, &w, bias.as_ref(), &a, &b);
            assert_close(&fused, &want, 1e-12, "value");
            for (i, (got, want)) in grads(fused).iter().zip(grads(want)).enumerate() {
                assert_close(got, &want, 1e-12, &format!("gradient {i} of {xdims:?}"));
            }
            let f32s = |t: &Tensor| t.detach().to_dtype(DType::F32);
            let got = f32s(&x).linear_low_rank(
                &f32s(&w),
                bias.as_ref().map(f32s).as_ref(),
                &f32s(&a),
                &f32s(&b),
                0.7,
            );
            assert_close(&got, &composed(&x, &w, bias.as_ref(), &a, &b), 1e-4, "f32");
        }
    }

    #[test]
    fn a_strided_input_gets_the_composed_gradient() {
        let x = randn_f64(&[6, 5], 1).requires_grad();
        let (w, a, b) = (
            randn_f64(&[4, 6], 2),
            randn_f64(&[2, 6], 3),
            randn_f64(&[4, 2], 4),
        );
        let g = randn_f64(&[5, 4], 5);
        x.t()
            .linear_low_rank(&w, None, &a, &b, 0.7)
            .mul(&g)
            .sum_all()
            .backward();
        let got = x.grad().unwrap();
        x.zero_grad();
        composed(&x.t(), &w, None, &a, &b)
            .mul(&g)
            .sum_all()
            .backward();
        assert_close(&got, &x.grad().unwrap(), 1e-12, "xᵀ view");
    }

    #[test]
    fn gradcheck_every_input() {
        let x = randn_f64(&[2, 3, 4], 6).requires_grad();
        let w = randn_f64(&[5, 4], 7).requires_grad();
        let bias = randn_f64(&[5], 8).requires_grad();
        let a = randn_f64(&[2, 4], 9).requires_grad();
        let b = randn_f64(&[5, 2], 10).requires_grad();
        gradcheck(
            |t| t[0].linear_low_rank(&t[1], Some(&t[2]), &t[3], &t[4], 1.5),
            &[x, w, bias, a, b],
        )
        .unwrap();
    }

    #[test]
    #[should_panic(expected = "linear_low_rank: a [2, 3] and b [5, 2] do not fit weight [5, 4]")]
    fn a_wrong_adapter_is_named() {
        randn_f64(&[2, 4], 1).linear_low_rank(
            &randn_f64(&[5, 4], 2),
            None,
            &randn_f64(&[2, 3], 3),
            &randn_f64(&[5, 2], 4),
            1.0,
        );
    }
}
