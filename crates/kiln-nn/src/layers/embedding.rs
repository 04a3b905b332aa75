//! `Embedding`: a lookup table of `num_embeddings` rows of size `embedding_dim`.

use crate::init;
use crate::{Forward, Module, Param};
use kiln_core::{Rng, Tensor};

/// `torch.nn.Embedding`: parameter `weight` `[num_embeddings, embedding_dim]`, initialised
/// `N(0, 1)`. The input is an integer tensor of ids of any shape; the output appends
/// `embedding_dim`.
#[derive(Module, Debug, Clone)]
pub struct Embedding {
    /// `[num_embeddings, embedding_dim]`.
    pub weight: Param,
}

impl Embedding {
    /// A table initialised from `N(0, 1)` like PyTorch.
    pub fn new(num_embeddings: usize, embedding_dim: usize, rng: &mut Rng) -> Self {
        let w = Tensor::zeros([num_embeddings, embedding_dim]);
        init::normal_(&w, 0.0, 1.0, rng);
        Embedding {
            weight: Param::new(w),
        }
    }

    /// A table over a given `[num_embeddings, embedding_dim]` weight.
    pub fn from_weights(weight: Tensor) -> Self {
        assert_eq!(
            weight.rank(),
            2,
            "Embedding: weight must be [num_embeddings, embedding_dim], got {}",
            weight.shape()
        );
        Embedding {
            weight: Param::new(weight),
        }
    }

    /// Number of rows.
    pub fn num_embeddings(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Size of each row.
    pub fn embedding_dim(&self) -> usize {
        self.weight.dims()[1]
    }
}

impl Forward for Embedding {
    /// The rows of `weight` picked by the integer `ids`: shape `[ids.., embedding_dim]`.
    fn forward(&self, ids: &Tensor) -> Tensor {
        self.weight.embedding(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;
    use crate::ModuleExt;

    #[test]
    fn lookup_names_and_gradcheck() {
        let e = Embedding::new(10, 4, &mut Rng::new(0));
        assert_eq!(e.named_parameters()[0].0, "weight");
        let ids = Tensor::from_slice(&[1i64, 3, 3, 9, 0, 1], [2, 3]);
        let y = e.forward(&ids);
        assert_eq!(y.dims(), &[2, 3, 4]);
        let w = e.weight.to_vec::<f32>();
        assert_eq!(y.to_vec::<f32>()[4..8], w[12..16]);

        let e64 = Embedding::from_weights(Tensor::randn_f64([10, 4], 1));
        gradcheck_module(&e64, &ids).unwrap();
    }
}
