//! Activation functions as parameter-free layers, for use in [`Sequential`](super::Sequential).

use crate::{Forward, Module};
use kiln_core::Tensor;

/// `max(x, 0)`.
#[derive(Module, Debug, Clone, Copy, Default)]
pub struct Relu;

impl Forward for Relu {
    /// Applies ReLU elementwise.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.relu()
    }
}

/// How [`Gelu`] evaluates the Gaussian CDF (PyTorch's `approximate` argument).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GeluApprox {
    /// Exact, with `erf` (`approximate='none'`).
    #[default]
    None,
    /// The tanh approximation (`approximate='tanh'`).
    Tanh,
}

/// GELU: `x·Φ(x)`, exact by default.
#[derive(Module, Debug, Clone, Copy, Default)]
pub struct Gelu {
    /// Exact or tanh-approximated.
    #[module(skip)]
    pub approximate: GeluApprox,
}

impl Gelu {
    /// Exact GELU (with `erf`).
    pub fn new() -> Self {
        Gelu::default()
    }

    /// GELU with the tanh approximation.
    pub fn tanh() -> Self {
        Gelu {
            approximate: GeluApprox::Tanh,
        }
    }
}

impl Forward for Gelu {
    /// Applies GELU elementwise.
    fn forward(&self, x: &Tensor) -> Tensor {
        match self.approximate {
            GeluApprox::None => x.gelu(),
            GeluApprox::Tanh => x.gelu_tanh(),
        }
    }
}

/// SiLU (swish): `x·sigmoid(x)`.
#[derive(Module, Debug, Clone, Copy, Default)]
pub struct Silu;

impl Forward for Silu {
    /// Applies SiLU elementwise.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.silu()
    }
}

/// `tanh x`.
#[derive(Module, Debug, Clone, Copy, Default)]
pub struct Tanh;

impl Forward for Tanh {
    /// Applies tanh elementwise.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.tanh()
    }
}

/// `1 / (1 + e^-x)`.
#[derive(Module, Debug, Clone, Copy, Default)]
pub struct Sigmoid;

impl Forward for Sigmoid {
    /// Applies the logistic sigmoid elementwise.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.sigmoid()
    }
}

/// Softmax along a dim (negative counts from the end), like `torch.nn.Softmax(dim)`.
#[derive(Module, Debug, Clone, Copy)]
pub struct Softmax {
    /// The dim normalised over.
    #[module(skip)]
    pub dim: i64,
}

impl Softmax {
    /// Softmax along `dim`.
    pub fn new(dim: i64) -> Self {
        Softmax { dim }
    }
}

impl Forward for Softmax {
    /// Applies softmax along `dim`.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.softmax(self.dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;

    #[test]
    fn forward_matches_tensor_ops_and_gradchecks() {
        let x = Tensor::randn_f64([3, 5], 1).requires_grad();
        let layers: Vec<(Box<dyn crate::layers::Layer>, Tensor)> = vec![
            (Box::new(Relu), x.relu()),
            (Box::new(Gelu::new()), x.gelu()),
            (Box::new(Gelu::tanh()), x.gelu_tanh()),
            (Box::new(Silu), x.silu()),
            (Box::new(Tanh), x.tanh()),
            (Box::new(Sigmoid), x.sigmoid()),
            (Box::new(Softmax::new(-1)), x.softmax(1)),
            (Box::new(Softmax::new(0)), x.softmax(0)),
        ];
        for (l, want) in layers {
            assert_eq!(l.forward(&x).to_vec::<f64>(), want.to_vec::<f64>());
            gradcheck_module(l.as_ref(), &x).unwrap();
        }
    }
}
