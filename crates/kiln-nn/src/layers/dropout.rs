//! `Dropout`: inverted dropout in training mode, the identity in evaluation mode.

use crate::{Forward, Module, RandomState, TrainFlag};
use kiln_core::Tensor;

/// `torch.nn.Dropout(p)`: zeroes each element with probability `p` and scales the rest by
/// `1/(1-p)` while training; the identity after `eval()`. Draws its masks from its own seeded
/// generator.
#[derive(Module, Debug)]
pub struct Dropout {
    training: TrainFlag,
    /// Drop probability.
    #[module(skip)]
    pub p: f64,
    rng: RandomState,
}

impl Dropout {
    /// Dropout with probability `p`, masks drawn from a generator seeded with `seed`.
    pub fn new(p: f64, seed: u64) -> Self {
        assert!(
            (0.0..=1.0).contains(&p),
            "Dropout: p must be in [0, 1], got {p}"
        );
        Dropout {
            training: TrainFlag::default(),
            p,
            rng: RandomState::new(seed),
        }
    }

    /// True in training mode.
    pub fn is_training(&self) -> bool {
        self.training.is_training()
    }
}

impl Clone for Dropout {
    fn clone(&self) -> Self {
        Dropout {
            training: self.training.clone(),
            p: self.p,
            rng: self.rng.clone(),
        }
    }
}

impl Forward for Dropout {
    /// Drops elements while training; returns `x` itself in evaluation mode.
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut rng = self.rng.lock();
        x.dropout(self.p, self.training.is_training(), &mut rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;
    use crate::ModuleExt;

    #[test]
    fn train_drops_eval_is_identity() {
        let d = Dropout::new(0.5, 3);
        let x = Tensor::ones([1000]);
        let y = d.forward(&x).to_vec::<f32>();
        let kept = y.iter().filter(|&&v| v != 0.0).count();
        assert!((400..600).contains(&kept), "{kept}");
        assert!(y.iter().all(|&v| v == 0.0 || v == 2.0));
        // The generator advances: the next mask differs.
        assert_ne!(d.forward(&x).to_vec::<f32>(), y);
        // Same seed, same masks.
        assert_eq!(Dropout::new(0.5, 3).forward(&x).to_vec::<f32>(), y);
        d.eval();
        assert!(!d.is_training());
        assert_eq!(d.forward(&x).to_vec::<f32>(), vec![1.0; 1000]);
        assert_eq!(d.num_parameters(), 0);
        gradcheck_module(&d, &Tensor::randn_f64([3, 4], 1).requires_grad()).unwrap();
    }
}
