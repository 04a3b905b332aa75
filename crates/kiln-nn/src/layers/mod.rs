//! Standard layers with PyTorch's parameter names, shapes and default initialisation, and
//! [`gradcheck_module`] to check a layer's gradients with respect to its input and parameters.

mod activation;
mod adapter;
mod attention;
mod batchnorm;
mod conv;
mod dropout;
mod embedding;
mod flatten;
mod linear;
mod norm;
mod pool;
mod rnn;
mod sequential;
mod transformer;

pub use activation::{Gelu, GeluApprox, Relu, Sigmoid, Silu, Softmax, Tanh};
pub use adapter::{AdapterSlot, LinearAdapter};
pub use attention::{scaled_dot_product_attention, MhaConfig, MhaOptions, MultiheadAttention};
pub use batchnorm::{batch_norm, BatchNorm1d, BatchNorm2d, BatchNormConfig};
pub use conv::{Conv1d, Conv1dConfig, Conv2d, Conv2dConfig, Padding1d, Padding2d};
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use flatten::Flatten;
pub use linear::{Linear, LinearConfig};
pub use norm::{layer_norm, rms_norm, LayerNorm, NormConfig, RMSNorm, RmsNorm};
pub use pool::{AdaptiveAvgPool2d, AvgPool1d, AvgPool2d, MaxPool1d, MaxPool2d};
pub use rnn::{Gru, Lstm, Rnn, RnnConfig, RnnNonlinearity, GRU, LSTM, RNN};
pub use sequential::{Layer, Sequential};
pub use transformer::{
    TransformerActivation, TransformerEncoder, TransformerEncoderLayer,
    TransformerEncoderLayerConfig,
};

use crate::{Forward, ModuleExt};
use kiln_core::{with_no_grad, DType, GradcheckOptions, Tensor};

/// [`gradcheck_module_with`] with default tolerances.
pub fn gradcheck_module<M: ModuleExt + Forward + ?Sized>(m: &M, x: &Tensor) -> Result<(), String> {
    gradcheck_module_with(m, x, GradcheckOptions::default())
}

/// Checks the gradients `backward` gives a module's parameters (all must be f64), and its input
/// when `x` is an f64 leaf that requires grad, against central finite differences. The output
/// is reduced with fixed random weights. Each parameter is perturbed in place and restored.
pub fn gradcheck_module_with<M: ModuleExt + Forward + ?Sized>(
    m: &M,
    x: &Tensor,
    opts: GradcheckOptions,
) -> Result<(), String> {
    let mut targets: Vec<(String, Tensor)> = m
        .named_parameters()
        .into_iter()
        .map(|(n, p)| (n, p.tensor().clone()))
        .collect();
    if x.tracks_grad() {
        targets.push(("input".to_string(), x.clone()));
    }
    for (name, t) in &targets {
        if t.dtype() != DType::F64 || !t.is_leaf() {
            return Err(format!(
                "gradcheck_module: {name} must be an f64 leaf, got {}",
                t.dtype()
            ));
        }
        t.zero_grad();
    }
    let out = m.forward(x);
    if out.dtype() != DType::F64 {
        return Err(format!(
            "gradcheck_module: output must be f64, got {}",
            out.dtype()
        ));
    }
    let weights = Tensor::randn_f64(out.shape().clone(), 0x5eed).to_vec::<f64>();
    let project = |y: &Tensor| -> f64 {
        y.to_vec::<f64>()
            .iter()
            .zip(&weights)
            .map(|(a, b)| a * b)
            .sum()
    };
    if out.tracks_grad() {
        out.backward_with_grad(&Tensor::from_vec(weights.clone(), out.shape().clone()));
    }
    for (name, t) in &targets {
        let analytic = t
            .grad()
            .map(|g| g.to_vec::<f64>())
            .unwrap_or_else(|| vec![0.0; t.elem_count()]);
        t.zero_grad();
        let base = t.contiguous().to_vec::<f64>();
        let set = |data: &[f64]| t.assign(&Tensor::from_slice(data, t.shape().clone()));
        let mut result = Ok(());
        for j in 0..base.len() {
            let eval = |delta: f64| {
                let mut data = base.clone();
                data[j] += delta;
                set(&data);
                with_no_grad(|| project(&m.forward(x)))
            };
            let numeric = (eval(opts.eps) - eval(-opts.eps)) / (2.0 * opts.eps);
            let a = analytic[j];
            if (a - numeric).abs() > opts.atol + opts.rtol * numeric.abs() {
                result = Err(format!(
                    "gradcheck_module: {name} (shape {}), element {j}: analytic {a:.8} vs numeric {numeric:.8}",
                    t.shape()
                ));
                break;
            }
        }
        set(&base);
        result?;
    }
    Ok(())
}
