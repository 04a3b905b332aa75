//! `torch.nn.functional.linear`: `x · wᵀ + b` as one op, with its backward rule.
//!
//! The bias is not a separate addition: each thread writes it into its share of the output and
//! gemm accumulates the product onto it (as `torch.addmm` does), which saves one read and one
//! write of the whole output per layer. The backward keeps only what it needs: `x` when the
//! weight takes a gradient, the weight when `x` does (a frozen layer of a LoRA model keeps
//! neither for the weight's sake).

use crate::autograd::GradFn;
use crate::dispatch_float;
use crate::dtype::Element;
use crate::ops::matmul::{gemm_into, gemm_par, Start};
use crate::tensor::Tensor;

/// Backward of [`Tensor::linear`]; inputs `[x, weight, bias]`.
struct LinearBackward {
    /// The weight takes a gradient (so `x`'s values are read).
    weight_grad: bool,
    /// `x` takes a gradient (so the weight's values are read).
    input_grad: bool,
}

impl GradFn for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn reads_input(&self, index: usize) -> bool {
        match index {
            0 => self.weight_grad,
            1 => self.input_grad,
            _ => false,
        }
    }

    fn reads_output(&self) -> bool {
        false
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let (x, w, b) = (&inputs[0], &inputs[1], &inputs[2]);
        let (n, k) = (w.dim(0), w.dim(1));
        let g2 = g.reshape([g.elem_count() / n.max(1), n]);
        let gx = x.tracks_grad().then(|| g.matmul(w));
        let gw = w.tracks_grad().then(|| {
            let x2 = x.reshape([x.elem_count() / k.max(1), k]);
            g2.t().matmul(&x2)
        });
        let gb = b.tracks_grad().then(|| g2.sum(0, false));
        vec![gx, gw, gb]
    }
}

impl Tensor {
    /// `self · weightᵀ + bias` over the last dim (`[.., in]` to `[.., out]`), as
    /// `torch.nn.functional.linear`: `weight` is `[out, in]`, `bias` `[out]`.
    ///
    /// # Panics
    /// On mismatched shapes or dtypes, naming them.
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        assert!(
            weight.rank() == 2 && self.rank() >= 1 && self.dim(-1) == weight.dim(1),
            "linear: input {} does not match weight {} (expected [.., in] and [out, in])",
            self.shape(),
            weight.shape()
        );
        let Some(bias) = bias else {
            return self.matmul(&weight.t());
        };
        let (n, k) = (weight.dim(0), weight.dim(1));
        assert!(
            bias.dims() == [n],
            "linear: bias {} does not match weight {} (expected [{n}])",
            bias.shape(),
            weight.shape()
        );
        assert!(
            self.dtype() == weight.dtype() && self.dtype() == bias.dtype(),
            "linear: dtypes differ: input {}, weight {}, bias {}",
            self.dtype(),
            weight.dtype(),
            bias.dtype()
        );
        let shared =
            self.same_storage(weight) || self.same_storage(bias) || weight.same_storage(bias);
        if k == 0 || shared {
            return self.matmul(&weight.t()).add(bias);
        }
        let x = self.contiguous();
        let b = bias.contiguous();
        let m = x.elem_count() / k;
        let mut dims = self.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = n;
        let par = gemm_par(m * n * k);
        let storage = dispatch_float!(self.dtype(), "linear", |T| {
            let mut out = crate::alloc::Buffer::<T>::uninit(m * n);
            if !out.is_empty() {
                let (gx, gw, gb) = (x.storage(), weight.storage(), b.storage());
                let sx: &[T] = crate::typed_slice!(gx, T, "linear");
                let sw: &[T] = crate::typed_slice!(gw, T, "linear");
                let sb: &[T] = crate::typed_slice!(gb, T, "linear");
                let (ws0, ws1) = (weight.layout().strides()[0], weight.layout().strides()[1]);
                // SAFETY: `x` is contiguous `[m, k]` from its offset, the weight's layout (read
                // as the `[k, n]` matrix wᵀ: row stride ws1, column stride ws0) and the `n`
                // bias values lie inside their storages, and `out` is a fresh `m × n` buffer.
                unsafe {
                    gemm_into(
                        (m, n, k),
                        out.as_mut_ptr(),
                        Start::Row(sb.as_ptr().add(b.layout().offset())),
                        sx.as_ptr().add(x.layout().offset()),
                        (k, 1),
                        sw.as_ptr().add(weight.layout().offset()),
                        (ws1, ws0),
                        par,
                    );
                }
            }
            <T as Element>::into_storage(out)
        });
        Tensor::op_result(storage, dims.into(), &[self, weight, bias], || {
            LinearBackward {
                weight_grad: weight.tracks_grad(),
                input_grad: self.tracks_grad(),
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::{DType, Tensor};

    /// `x · wᵀ + b` by the composed ops, for comparison.
    fn composed(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        x.matmul(&w.t()).add(b)
    }

    /// Same shape, and every element within `tol` (relative above 1, absolute below).
    pub(crate) fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        for (i, (g, w)) in got.to_f64_vec().iter().zip(want.to_f64_vec()).enumerate() {
            assert!(
                (g - w).abs() <= tol * w.abs().max(1.0),
                "{what}: [{i}] {g} vs {w}"
            );
        }
    }

    #[test]
    fn matches_matmul_plus_bias_on_every_rank_and_layout() {
        for (xdims, n) in [
            (vec![5], 3),
            (vec![4, 7], 6),
            (vec![2, 3, 7], 5),
            (vec![300, 40], 530),
            (vec![0, 7], 3),
        ] {
            let k = *xdims.last().unwrap();
            let x = randn_f64(&xdims, 1);
            let w = randn_f64(&[n, k], 2);
            let b = randn_f64(&[n], 3);
            let want = composed(&x, &w, &b);
            assert_close(&x.linear(&w, Some(&b)), &want, 1e-12, "f64");
            // A transposed weight view and a non-contiguous input.
            let wt = randn_f64(&[k, n], 4).t();
            assert_close(
                &x.linear(&wt, Some(&b)),
                &composed(&x, &wt, &b),
                1e-12,
                "wᵀ view",
            );
            if xdims.len() == 2 && xdims[0] > 0 {
                let xt = randn_f64(&[k, xdims[0]], 5).t();
                assert_close(
                    &xt.linear(&w, Some(&b)),
                    &composed(&xt, &w, &b),
                    1e-12,
                    "xᵀ view",
                );
            }
            let (x32, w32, b32) = (
                x.to_dtype(DType::F32),
                w.to_dtype(DType::F32),
                b.to_dtype(DType::F32),
            );
            assert_close(&x32.linear(&w32, Some(&b32)), &want, 1e-4, "f32");
            assert_close(&x.linear(&w, None), &x.matmul(&w.t()), 1e-12, "no bias");
        }
    }

    #[test]
    fn gradcheck_every_input_and_frozen_ones() {
        let x = randn_f64(&[2, 3, 4], 6).requires_grad();
        let w = randn_f64(&[5, 4], 7).requires_grad();
        let b = randn_f64(&[5], 8).requires_grad();
        gradcheck(
            |t| t[0].linear(&t[1], Some(&t[2])),
            &[x.clone(), w.clone(), b.clone()],
        )
        .unwrap();
        // Frozen weight and bias: only the input's gradient, equal to the composed ops'.
        let (wf, bf) = (randn_f64(&[5, 4], 9), randn_f64(&[5], 10));
        let g = randn_f64(&[2, 3, 5], 11);
        x.linear(&wf, Some(&bf)).mul(&g).sum_all().backward();
        let got = x.grad().unwrap();
        x.zero_grad();
        composed(&x, &wf, &bf).mul(&g).sum_all().backward();
        assert_close(&got, &x.grad().unwrap(), 1e-12, "frozen weight");
    }

    #[test]
    #[should_panic(expected = "linear: bias [4] does not match weight [5, 4]")]
    fn a_wrong_bias_is_named() {
        randn_f64(&[2, 4], 1).linear(&randn_f64(&[5, 4], 2), Some(&randn_f64(&[4], 3)));
    }
}
