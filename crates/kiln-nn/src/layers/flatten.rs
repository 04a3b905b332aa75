//! `Flatten`: merges a range of dims into one (a view when the strides allow it).

use crate::{Forward, Module};
use kiln_core::Tensor;

/// `torch.nn.Flatten(start_dim=1, end_dim=-1)`.
#[derive(Module, Debug, Clone, Copy)]
pub struct Flatten {
    /// First dim merged (negative counts from the end).
    #[module(skip)]
    pub start_dim: i64,
    /// Last dim merged (negative counts from the end).
    #[module(skip)]
    pub end_dim: i64,
}

impl Default for Flatten {
    fn default() -> Self {
        Flatten {
            start_dim: 1,
            end_dim: -1,
        }
    }
}

impl Flatten {
    /// Flattens every dim but the first (PyTorch's default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Flattens dims `start_dim..=end_dim`.
    pub fn range(start_dim: i64, end_dim: i64) -> Self {
        Flatten { start_dim, end_dim }
    }
}

impl Forward for Flatten {
    /// Merges dims `start_dim..=end_dim` of `x`.
    fn forward(&self, x: &Tensor) -> Tensor {
        x.flatten(self.start_dim, self.end_dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;

    #[test]
    fn flattens_like_torch() {
        let x = Tensor::randn_f64([2, 3, 4, 5], 1).requires_grad();
        assert_eq!(Flatten::new().forward(&x).dims(), &[2, 60]);
        assert_eq!(Flatten::range(1, 2).forward(&x).dims(), &[2, 12, 5]);
        assert_eq!(Flatten::range(0, -2).forward(&x).dims(), &[24, 5]);
        gradcheck_module(
            &Flatten::new(),
            &x.transpose(1, 3).detach().contiguous_copy().requires_grad(),
        )
        .unwrap();
    }
}
