//! `Sequential`: layers applied in order, named `0`, `1`, ... like `torch.nn.Sequential`.

use crate::{Forward, Module, Visitor};
use kiln_core::Tensor;

/// A module that maps a tensor to a tensor: what [`Sequential`] chains. Every `Module +
/// Forward` type is one.
pub trait Layer: Module + Forward {}

impl<T: Module + Forward> Layer for T {}

/// Layers applied one after the other. Their parameters are named by position (`0.weight`,
/// `2.bias`, ...), so a PyTorch `nn.Sequential` checkpoint loads as is.
#[derive(Default)]
pub struct Sequential {
    layers: Vec<Box<dyn Layer>>,
}

impl Sequential {
    /// An empty sequence (the identity).
    pub fn new() -> Self {
        Self::default()
    }

    /// A sequence of the given layers.
    pub fn from_layers(layers: Vec<Box<dyn Layer>>) -> Self {
        Sequential { layers }
    }

    /// Appends a layer.
    pub fn push(&mut self, layer: impl Layer + 'static) {
        self.layers.push(Box::new(layer));
    }

    /// Appends a layer, builder style.
    pub fn with(mut self, layer: impl Layer + 'static) -> Self {
        self.push(layer);
        self
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// True when there are no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The layer at `index`.
    pub fn get(&self, index: usize) -> Option<&dyn Layer> {
        self.layers.get(index).map(|l| l.as_ref())
    }

    /// The layers in order.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Layer> {
        self.layers.iter().map(|l| l.as_ref())
    }
}

impl Module for Sequential {
    fn visit(&self, visitor: &mut Visitor) {
        // An empty list name: children are `0`, `1`, ... directly under this module.
        visitor.list("", &self.layers);
    }
}

impl Forward for Sequential {
    /// Applies each layer to the output of the previous one.
    fn forward(&self, x: &Tensor) -> Tensor {
        self.layers
            .iter()
            .fold(x.clone(), |h, layer| layer.forward(&h))
    }
}

impl std::fmt::Debug for Sequential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.layers.iter().map(|l| l.type_name()))
            .finish()
    }
}

/// Builds a [`Sequential`] from layers: `seq![Linear::new(4, 8, &mut rng), Relu, Linear::new(8, 2, &mut rng)]`.
#[macro_export]
macro_rules! seq {
    ($($layer:expr),* $(,)?) => {
        $crate::layers::Sequential::from_layers(::std::vec![
            $(::std::boxed::Box::new($layer) as ::std::boxed::Box<dyn $crate::layers::Layer>),*
        ])
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{gradcheck_module, LayerNorm, Linear, Relu, Tanh};
    use crate::{ModuleExt, Param};
    use kiln_core::Rng;

    #[test]
    fn names_like_torch_sequential() {
        let mut rng = Rng::new(0);
        let s = seq![
            Linear::new(4, 8, &mut rng),
            Relu,
            Linear::new(8, 2, &mut rng)
        ];
        let names: Vec<_> = s.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["0.weight", "0.bias", "2.weight", "2.bias"]);
        assert_eq!(s.len(), 3);
        assert_eq!(s.forward(&Tensor::ones([5, 4])).dims(), &[5, 2]);
        let summary = s.summary();
        assert!(
            summary.contains("Linear") && summary.contains("Relu"),
            "{summary}"
        );
        assert!(summary.contains("total parameters: 58"), "{summary}");
        assert_eq!(format!("{s:?}"), "[\"Linear\", \"Relu\", \"Linear\"]");

        // Nested under a field, and inside another Sequential.
        #[derive(crate::Module)]
        struct Net {
            body: Sequential,
            head: Param,
        }
        let n = Net {
            body: seq![seq![Linear::new(2, 2, &mut rng)], Tanh],
            head: Param::new(Tensor::ones([1])),
        };
        let names: Vec<_> = n.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["body.0.0.weight", "body.0.0.bias", "head"]);
        assert_eq!(n.body.get(1).unwrap().type_name(), "Tanh");
    }

    #[test]
    fn gradcheck_through_the_chain() {
        let s = Sequential::new()
            .with(Linear::from_weights(
                Tensor::randn_f64([6, 3], 1),
                Some(Tensor::randn_f64([6], 2)),
            ))
            .with(LayerNorm::from_weights(
                Tensor::randn_f64([6], 3),
                Some(Tensor::randn_f64([6], 4)),
                1e-5,
            ))
            .with(Tanh)
            .with(Linear::from_weights(Tensor::randn_f64([2, 6], 5), None));
        gradcheck_module(&s, &Tensor::randn_f64([4, 3], 6).requires_grad()).unwrap();
    }
}
