//! `gradcheck`: compares the gradients from `backward` with central finite differences in f64.

use crate::autograd::with_no_grad;
use crate::layout::Layout;
use crate::storage::Storage;
use crate::tensor::Tensor;
use crate::{alloc::Buffer, DType};

/// Tolerances and step of [`gradcheck_with`].
#[derive(Debug, Clone, Copy)]
pub struct GradcheckOptions {
    /// Finite-difference step.
    pub eps: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Relative tolerance.
    pub rtol: f64,
}

impl Default for GradcheckOptions {
    fn default() -> Self {
        GradcheckOptions {
            eps: 1e-6,
            atol: 1e-5,
            rtol: 1e-4,
        }
    }
}

/// Checks `f`'s analytic gradients at `inputs` (f64 leaves; those that `requires_grad` are
/// checked) against central differences, with default tolerances. The output may have any
/// shape: it is reduced to a scalar with fixed random weights so every output element counts.
pub fn gradcheck(f: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor]) -> Result<(), String> {
    gradcheck_with(f, inputs, GradcheckOptions::default())
}

/// [`gradcheck`] with explicit tolerances.
pub fn gradcheck_with(
    f: impl Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    opts: GradcheckOptions,
) -> Result<(), String> {
    for (i, x) in inputs.iter().enumerate() {
        if x.dtype() != DType::F64 || !x.is_leaf() {
            return Err(format!(
                "gradcheck: input {i} must be an f64 leaf, got {} (leaf: {})",
                x.dtype(),
                x.is_leaf()
            ));
        }
    }
    let out = f(inputs);
    if out.dtype() != DType::F64 {
        return Err(format!(
            "gradcheck: output must be f64, got {}",
            out.dtype()
        ));
    }
    let weights = Tensor::randn_f64(out.shape().clone(), 0x5eed);
    let project = |y: &Tensor| -> f64 {
        y.to_vec::<f64>()
            .iter()
            .zip(weights.to_vec::<f64>())
            .map(|(a, b)| a * b)
            .sum()
    };
    for x in inputs {
        x.zero_grad();
    }
    out.mul(&weights).sum_all().backward();

    for (i, x) in inputs.iter().enumerate() {
        if !x.tracks_grad() {
            continue;
        }
        let analytic = x
            .grad()
            .map(|g| g.to_vec::<f64>())
            .unwrap_or_else(|| vec![0.0; x.elem_count()]);
        let base = x.contiguous().to_vec::<f64>();
        for j in 0..base.len() {
            let eval = |delta: f64| -> f64 {
                let mut data = base.clone();
                data[j] += delta;
                let perturbed: Vec<Tensor> = inputs
                    .iter()
                    .enumerate()
                    .map(|(k, t)| {
                        if k == i {
                            Tensor::from_storage(
                                Storage::F64(Buffer::from_slice(&data)),
                                Layout::contiguous(x.shape().clone()),
                            )
                        } else {
                            t.detach()
                        }
                    })
                    .collect();
                with_no_grad(|| project(&f(&perturbed)))
            };
            let numeric = (eval(opts.eps) - eval(-opts.eps)) / (2.0 * opts.eps);
            let a = analytic[j];
            if (a - numeric).abs() > opts.atol + opts.rtol * numeric.abs() {
                return Err(format!(
                    "gradcheck: input {i} (shape {}), element {j}: analytic {a:.8} vs numeric {numeric:.8}",
                    x.shape()
                ));
            }
        }
        x.zero_grad();
    }
    Ok(())
}

/// An f64 standard-normal tensor (test inputs for gradcheck).
pub fn randn_f64(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn_f64(shape, seed)
}
