//! `Linear`: `y = x Wᵀ + b`, parameters named and shaped like `torch.nn.Linear`, with an
//! [`AdapterSlot`] where LoRA and other adapters hook in.

use super::adapter::AdapterSlot;
use crate::error::NnError;
use crate::init;
use crate::{Forward, Module, Param};
use kiln_core::{Rng, Tensor};

/// A fully connected layer: `weight` `[out, in]`, optional `bias` `[out]`.
#[derive(Module, Debug, Clone)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Param,
    /// `[out_features]`, if the layer has a bias.
    pub bias: Option<Param>,
    /// Where an adapter (e.g. LoRA) can be set; empty by default. Its parameters are named
    /// under this layer's path (`lora_A.weight`), not under `adapter`.
    pub adapter: AdapterSlot,
}

/// Options of [`Linear::with_config`].
#[derive(Debug, Clone, Copy)]
pub struct LinearConfig {
    /// Whether to learn an additive bias (default true).
    pub bias: bool,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig { bias: true }
    }
}

impl LinearConfig {
    /// Sets whether the layer has a bias.
    pub fn bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
}

impl Linear {
    /// A layer with a bias, initialised like PyTorch: weight by `kaiming_uniform_(a=√5)`,
    /// bias `U(-1/√in, 1/√in)`.
    pub fn new(in_features: usize, out_features: usize, rng: &mut Rng) -> Self {
        Self::with_config(in_features, out_features, LinearConfig::default(), rng)
    }

    /// A layer with the given options (e.g. `LinearConfig::default().bias(false)`).
    pub fn with_config(
        in_features: usize,
        out_features: usize,
        config: LinearConfig,
        rng: &mut Rng,
    ) -> Self {
        let weight = Tensor::zeros([out_features, in_features]);
        init::kaiming_uniform_default_(&weight, rng);
        let bias = config.bias.then(|| {
            let b = Tensor::zeros([out_features]);
            init::bias_uniform_(&b, weight.shape(), rng);
            Param::new(b)
        });
        Linear {
            weight: Param::new(weight),
            bias,
            adapter: AdapterSlot::new(),
        }
    }

    /// A layer over given tensors (`weight` `[out, in]`, `bias` `[out]`), e.g. for loading.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        assert_eq!(
            weight.rank(),
            2,
            "Linear: weight must be [out, in], got {}",
            weight.shape()
        );
        if let Some(b) = &bias {
            assert_eq!(
                b.dims(),
                &[weight.dims()[0]],
                "Linear: bias shape {} does not match weight {}",
                b.shape(),
                weight.shape()
            );
        }
        Linear {
            weight: Param::new(weight),
            bias: bias.map(Param::new),
            adapter: AdapterSlot::new(),
        }
    }

    /// Number of input features.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Number of output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Folds the adapter into `weight` (see [`LinearAdapter::merge_into`](super::LinearAdapter::merge_into));
    /// false when the slot is empty.
    pub fn merge_adapter(&self) -> Result<bool, NnError> {
        match self.adapter.get() {
            Some(a) => a.merge_into(self.weight.tensor()).map(|_| true),
            None => Ok(false),
        }
    }

    /// Takes a merged adapter back out of `weight`; false when the slot is empty.
    pub fn unmerge_adapter(&self) -> Result<bool, NnError> {
        match self.adapter.get() {
            Some(a) => a.unmerge_from(self.weight.tensor()).map(|_| true),
            None => Ok(false),
        }
    }
}

impl Forward for Linear {
    /// `x.matmul(Wᵀ) + b` for `x` of shape `[.., in]` (`Wᵀ` is a strided view, not a copy),
    /// passed through the adapter when one is set.
    fn forward(&self, x: &Tensor) -> Tensor {
        let bias = self.bias.as_deref();
        let Some(adapter) = self.adapter.get() else {
            return x.linear(&self.weight, bias);
        };
        adapter
            .forward_with_base(x, &self.weight, bias)
            .unwrap_or_else(|| adapter.adapt(x, x.linear(&self.weight, bias)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;
    use crate::ModuleExt;
    use kiln_core::DType;

    #[test]
    fn shapes_names_and_leading_dims() {
        let mut rng = Rng::new(0);
        let l = Linear::new(4, 3, &mut rng);
        let names: Vec<_> = l
            .named_parameters()
            .into_iter()
            .map(|(n, p)| (n, p.dims().to_vec()))
            .collect();
        assert_eq!(
            names,
            [
                ("weight".to_string(), vec![3, 4]),
                ("bias".to_string(), vec![3])
            ]
        );
        assert_eq!(l.forward(&Tensor::ones([2, 5, 4])).dims(), &[2, 5, 3]);
        assert_eq!(l.forward(&Tensor::ones([4])).dims(), &[3]);
        let nb = Linear::with_config(4, 3, LinearConfig::default().bias(false), &mut rng);
        assert_eq!(nb.named_parameters().len(), 1);
        assert!(l.weight.to_vec::<f32>().iter().all(|v| v.abs() <= 0.5));
    }

    #[test]
    fn gradcheck_input_weight_bias() {
        let w = Tensor::randn_f64([3, 4], 1);
        let b = Tensor::randn_f64([3], 2);
        let l = Linear::from_weights(w.clone(), Some(b));
        assert_eq!(l.weight.dtype(), DType::F64);
        let x = Tensor::randn_f64([2, 2, 4], 3).requires_grad();
        gradcheck_module(&l, &x).unwrap();
        gradcheck_module(&Linear::from_weights(w, None), &x).unwrap();
        // Rank-1 input.
        gradcheck_module(&l, &Tensor::randn_f64([4], 4).requires_grad()).unwrap();
    }
}
