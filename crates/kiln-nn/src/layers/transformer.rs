//! `TransformerEncoderLayer` and `TransformerEncoder`, with PyTorch's sub-module names
//! (`self_attn.*`, `linear1`, `linear2`, `norm1`, `norm2`; `layers.{i}.*`, `norm`) and forward
//! (post-norm by default, pre-norm with `norm_first`). Inputs are `[N, L, E]` by default
//! (`batch_first`, unlike PyTorch).

use crate::layers::{
    Dropout, LayerNorm, Linear, LinearConfig, MhaConfig, MhaOptions, MultiheadAttention, NormConfig,
};
use crate::{Forward, Module};
use kiln_core::{Rng, Tensor};

/// The feed-forward activation of a [`TransformerEncoderLayer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TransformerActivation {
    /// `max(x, 0)` (PyTorch's default).
    #[default]
    Relu,
    /// Exact GELU (with `erf`).
    Gelu,
}

/// Options of [`TransformerEncoderLayer::with_config`] (PyTorch's constructor arguments).
#[derive(Debug, Clone, Copy)]
pub struct TransformerEncoderLayerConfig {
    /// Number of attention heads (default 8).
    pub nhead: usize,
    /// Hidden size of the feed-forward block (default 2048).
    pub dim_feedforward: usize,
    /// Dropout probability everywhere (attention weights, feed-forward, residuals; default 0.1).
    pub dropout: f64,
    /// Feed-forward activation (default ReLU).
    pub activation: TransformerActivation,
    /// LayerNorm eps (default 1e-5).
    pub layer_norm_eps: f64,
    /// `[N, L, E]` inputs when true (kiln's default), `[L, N, E]` when false (PyTorch's).
    pub batch_first: bool,
    /// Pre-norm (normalise before attention / feed-forward) when true; post-norm by default.
    pub norm_first: bool,
    /// Biases in the linear layers and layer norms (default true).
    pub bias: bool,
}

impl Default for TransformerEncoderLayerConfig {
    fn default() -> Self {
        TransformerEncoderLayerConfig {
            nhead: 8,
            dim_feedforward: 2048,
            dropout: 0.1,
            activation: TransformerActivation::Relu,
            layer_norm_eps: 1e-5,
            batch_first: true,
            norm_first: false,
            bias: true,
        }
    }
}

impl TransformerEncoderLayerConfig {
    /// Defaults with `nhead` heads.
    pub fn new(nhead: usize) -> Self {
        TransformerEncoderLayerConfig {
            nhead,
            ..Self::default()
        }
    }

    /// Sets the number of heads.
    pub fn nhead(mut self, n: usize) -> Self {
        self.nhead = n;
        self
    }

    /// Sets the feed-forward hidden size.
    pub fn dim_feedforward(mut self, n: usize) -> Self {
        self.dim_feedforward = n;
        self
    }

    /// Sets the dropout probability.
    pub fn dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }

    /// Sets the feed-forward activation.
    pub fn activation(mut self, a: TransformerActivation) -> Self {
        self.activation = a;
        self
    }

    /// Sets the LayerNorm eps.
    pub fn layer_norm_eps(mut self, eps: f64) -> Self {
        self.layer_norm_eps = eps;
        self
    }

    /// Sets the input layout: `[N, L, E]` when true, `[L, N, E]` when false.
    pub fn batch_first(mut self, on: bool) -> Self {
        self.batch_first = on;
        self
    }

    /// Sets pre-norm (true) or post-norm (false).
    pub fn norm_first(mut self, on: bool) -> Self {
        self.norm_first = on;
        self
    }

    /// Sets whether linear layers and norms have biases.
    pub fn bias(mut self, on: bool) -> Self {
        self.bias = on;
        self
    }
}

/// `torch.nn.TransformerEncoderLayer`: self-attention then a feed-forward block, each with a
/// residual connection and a LayerNorm (after it by default, before it with `norm_first`).
#[derive(Module, Debug, Clone)]
pub struct TransformerEncoderLayer {
    /// Self-attention.
    pub self_attn: MultiheadAttention,
    /// `d_model → dim_feedforward`.
    pub linear1: Linear,
    /// Dropout after the activation.
    pub dropout: Dropout,
    /// `dim_feedforward → d_model`.
    pub linear2: Linear,
    /// Norm of the attention block.
    pub norm1: LayerNorm,
    /// Norm of the feed-forward block.
    pub norm2: LayerNorm,
    /// Dropout on the attention block's output.
    pub dropout1: Dropout,
    /// Dropout on the feed-forward block's output.
    pub dropout2: Dropout,
    /// Feed-forward activation.
    #[module(skip)]
    pub activation: TransformerActivation,
    /// Pre-norm when true.
    #[module(skip)]
    pub norm_first: bool,
}

impl TransformerEncoderLayer {
    /// A layer of width `d_model` with `nhead` heads and PyTorch's other defaults
    /// (`dim_feedforward` 2048, dropout 0.1, ReLU, post-norm), `batch_first`.
    pub fn new(d_model: usize, nhead: usize, rng: &mut Rng) -> Self {
        Self::with_config(d_model, TransformerEncoderLayerConfig::new(nhead), rng)
    }

    /// A layer with the given options; each sub-layer gets PyTorch's default init, and each
    /// dropout its own generator seeded from `rng`.
    pub fn with_config(
        d_model: usize,
        config: TransformerEncoderLayerConfig,
        rng: &mut Rng,
    ) -> Self {
        let c = config;
        let self_attn = MultiheadAttention::with_config(
            d_model,
            MhaConfig::new(c.nhead)
                .dropout(c.dropout)
                .bias(c.bias)
                .batch_first(c.batch_first),
            rng,
        );
        let lin = LinearConfig::default().bias(c.bias);
        let linear1 = Linear::with_config(d_model, c.dim_feedforward, lin, rng);
        let linear2 = Linear::with_config(c.dim_feedforward, d_model, lin, rng);
        let norm = || {
            LayerNorm::with_config(
                &[d_model],
                NormConfig::layer_norm().eps(c.layer_norm_eps).bias(c.bias),
            )
        };
        TransformerEncoderLayer {
            self_attn,
            linear1,
            dropout: Dropout::new(c.dropout, rng.next_u64()),
            linear2,
            norm1: norm(),
            norm2: norm(),
            dropout1: Dropout::new(c.dropout, rng.next_u64()),
            dropout2: Dropout::new(c.dropout, rng.next_u64()),
            activation: c.activation,
            norm_first: c.norm_first,
        }
    }

    /// The model width `d_model`.
    pub fn d_model(&self) -> usize {
        self.self_attn.embed_dim
    }

    fn sa_block(
        &self,
        x: &Tensor,
        src_mask: Option<&Tensor>,
        src_key_padding_mask: Option<&Tensor>,
        is_causal: bool,
    ) -> Tensor {
        let opts = MhaOptions {
            key_padding_mask: src_key_padding_mask,
            attn_mask: src_mask,
            is_causal,
            need_weights: false,
            average_attn_weights: true,
        };
        let y = self.self_attn.forward_qkv(x, x, x, opts).0;
        self.dropout1.forward(&y)
    }

    fn ff_block(&self, x: &Tensor) -> Tensor {
        let h = self.linear1.forward(x);
        let h = match self.activation {
            TransformerActivation::Relu => h.relu(),
            TransformerActivation::Gelu => h.gelu(),
        };
        let y = self.linear2.forward(&self.dropout.forward(&h));
        self.dropout2.forward(&y)
    }

    /// The layer on `src` (`[N, L, E]`, `[L, N, E]` when not `batch_first`, or `[L, E]`) with
    /// optional masks as in [`MultiheadAttention`]: `src_mask` `[L, L]` or `[N·nhead, L, L]`
    /// (boolean true = masked out, or additive float), `src_key_padding_mask` `[N, L]`
    /// (true = padding). `is_causal` adds a causal mask (PyTorch treats it as a hint about
    /// `src_mask`). Padded positions are still computed (PyTorch's fast path zeroes them).
    pub fn forward_with_mask(
        &self,
        src: &Tensor,
        src_mask: Option<&Tensor>,
        src_key_padding_mask: Option<&Tensor>,
        is_causal: bool,
    ) -> Tensor {
        let d = self.d_model();
        assert!(
            (src.rank() == 2 || src.rank() == 3) && src.dim(-1) == d,
            "TransformerEncoderLayer: src must be [N, L, {d}] ([L, N, {d}] when not batch_first, or [L, {d}]), got {}",
            src.shape()
        );
        if self.norm_first {
            let x = src.add(&self.sa_block(
                &self.norm1.forward(src),
                src_mask,
                src_key_padding_mask,
                is_causal,
            ));
            x.add(&self.ff_block(&self.norm2.forward(&x)))
        } else {
            let x = self.norm1.forward(&src.add(&self.sa_block(
                src,
                src_mask,
                src_key_padding_mask,
                is_causal,
            )));
            self.norm2.forward(&x.add(&self.ff_block(&x)))
        }
    }
}

impl Forward for TransformerEncoderLayer {
    /// The layer without masks.
    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with_mask(x, None, None, false)
    }
}

/// `torch.nn.TransformerEncoder`: a stack of [`TransformerEncoderLayer`]s (`layers.{i}.*`) and
/// an optional final LayerNorm (`norm.*`).
#[derive(Module, Debug, Clone)]
pub struct TransformerEncoder {
    /// The layers, applied in order.
    pub layers: Vec<TransformerEncoderLayer>,
    /// Final normalisation, if any.
    pub norm: Option<LayerNorm>,
}

impl TransformerEncoder {
    /// `num_layers` layers built from `config`, each initialised independently from `rng`
    /// (PyTorch deep-copies one layer, so its layers start equal), and a final LayerNorm
    /// (with the layer's eps and bias setting) when `final_norm`.
    pub fn new(
        d_model: usize,
        config: TransformerEncoderLayerConfig,
        num_layers: usize,
        final_norm: bool,
        rng: &mut Rng,
    ) -> Self {
        let layers = (0..num_layers)
            .map(|_| TransformerEncoderLayer::with_config(d_model, config, rng))
            .collect();
        let norm = final_norm.then(|| {
            LayerNorm::with_config(
                &[d_model],
                NormConfig::layer_norm()
                    .eps(config.layer_norm_eps)
                    .bias(config.bias),
            )
        });
        TransformerEncoder { layers, norm }
    }

    /// An encoder over given layers and final norm.
    pub fn from_layers(layers: Vec<TransformerEncoderLayer>, norm: Option<LayerNorm>) -> Self {
        TransformerEncoder { layers, norm }
    }

    /// Every layer with the same masks (see [`TransformerEncoderLayer::forward_with_mask`]),
    /// then the final norm.
    pub fn forward_with_mask(
        &self,
        src: &Tensor,
        mask: Option<&Tensor>,
        src_key_padding_mask: Option<&Tensor>,
        is_causal: bool,
    ) -> Tensor {
        let mut x = src.clone();
        for layer in &self.layers {
            x = layer.forward_with_mask(&x, mask, src_key_padding_mask, is_causal);
        }
        match &self.norm {
            Some(n) => n.forward(&x),
            None => x,
        }
    }
}

impl Forward for TransformerEncoder {
    /// The encoder without masks.
    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with_mask(x, None, None, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;
    use crate::{ModuleExt, Param};
    use kiln_core::gradcheck::randn_f64;

    /// Replaces every parameter of `layer` by seeded random f64 values (norm weights near 1).
    fn to_f64(layer: &mut TransformerEncoderLayer, seed: u64) {
        let r = |dims: &[usize], k: u64| randn_f64(dims, seed * 100 + k).mul_scalar(0.3);
        let a = &mut layer.self_attn;
        let e = a.embed_dim;
        a.in_proj_weight = Some(Param::new(r(&[3 * e, e], 1)));
        a.in_proj_bias = Some(Param::new(r(&[3 * e], 2)));
        a.out_proj = Linear::from_weights(r(&[e, e], 3), Some(r(&[e], 4)));
        let (i, o) = (layer.linear1.in_features(), layer.linear1.out_features());
        layer.linear1 = Linear::from_weights(r(&[o, i], 5), Some(r(&[o], 6)));
        layer.linear2 = Linear::from_weights(r(&[i, o], 7), Some(r(&[i], 8)));
        let eps = layer.norm1.eps;
        layer.norm1 = LayerNorm::from_weights(r(&[e], 9).add_scalar(1.0), Some(r(&[e], 10)), eps);
        layer.norm2 = LayerNorm::from_weights(r(&[e], 11).add_scalar(1.0), Some(r(&[e], 12)), eps);
    }

    fn small(config: TransformerEncoderLayerConfig, seed: u64) -> TransformerEncoderLayer {
        let mut l =
            TransformerEncoderLayer::with_config(4, config.dim_feedforward(6), &mut Rng::new(seed));
        to_f64(&mut l, seed);
        l.eval();
        l
    }

    #[test]
    fn names_follow_pytorch() {
        let mut rng = Rng::new(0);
        let l = TransformerEncoderLayer::new(8, 2, &mut rng);
        let names: Vec<String> = l.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "self_attn.in_proj_weight",
                "self_attn.in_proj_bias",
                "self_attn.out_proj.weight",
                "self_attn.out_proj.bias",
                "linear1.weight",
                "linear1.bias",
                "linear2.weight",
                "linear2.bias",
                "norm1.weight",
                "norm1.bias",
                "norm2.weight",
                "norm2.bias",
            ]
        );
        assert_eq!(l.linear1.weight.dims(), &[2048, 8]);
        assert!(l.self_attn.batch_first);
        assert_eq!(l.dropout.p, 0.1);
        let enc = TransformerEncoder::new(
            8,
            TransformerEncoderLayerConfig::new(2).dim_feedforward(16),
            2,
            true,
            &mut rng,
        );
        let names: Vec<String> = enc.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 2 * 12 + 2);
        assert_eq!(names[12], "layers.1.self_attn.in_proj_weight");
        assert_eq!(&names[24..], ["norm.weight", "norm.bias"]);
        // Layers are initialised independently.
        assert_ne!(
            enc.layers[0].linear1.weight.to_vec::<f32>(),
            enc.layers[1].linear1.weight.to_vec::<f32>()
        );
        let nb = TransformerEncoderLayer::with_config(
            8,
            TransformerEncoderLayerConfig::new(2).bias(false),
            &mut rng,
        );
        assert_eq!(nb.named_parameters().len(), 6);
    }

    /// The layer under fixed masks, for `gradcheck_module`.
    #[derive(Module)]
    struct Masked {
        layer: TransformerEncoderLayer,
        #[module(skip)]
        mask: Option<Tensor>,
        #[module(skip)]
        kpm: Option<Tensor>,
        #[module(skip)]
        causal: bool,
    }

    impl Forward for Masked {
        fn forward(&self, x: &Tensor) -> Tensor {
            self.layer
                .forward_with_mask(x, self.mask.as_ref(), self.kpm.as_ref(), self.causal)
        }
    }

    #[test]
    fn gradcheck_both_norm_orders_and_activations() {
        let x = randn_f64(&[2, 3, 4], 1).requires_grad();
        let kpm = Tensor::from_slice(&[0u32, 0, 1, 0, 0, 0], [2, 3]);
        for (i, norm_first) in [false, true].into_iter().enumerate() {
            for act in [TransformerActivation::Relu, TransformerActivation::Gelu] {
                let c = TransformerEncoderLayerConfig::new(2)
                    .norm_first(norm_first)
                    .activation(act);
                let layer = small(c, 2 + i as u64);
                gradcheck_module(&layer, &x).unwrap();
                let masked = Masked {
                    layer,
                    mask: Some(randn_f64(&[3, 3], 3)),
                    kpm: Some(kpm.clone()),
                    causal: true,
                };
                gradcheck_module(&masked, &x).unwrap();
            }
        }
        // Sequence-first, non-contiguous input.
        let layer = small(TransformerEncoderLayerConfig::new(2).batch_first(false), 4);
        let xt = randn_f64(&[2, 3, 4], 5).transpose(0, 1);
        assert!(!xt.is_contiguous());
        gradcheck_module(&layer, &xt).unwrap();
        let xs = randn_f64(&[2, 3, 4], 5).requires_grad();
        kiln_core::gradcheck(|x| layer.forward(&x[0].transpose(0, 1)), &[xs]).unwrap();
    }

    #[test]
    fn encoder_is_its_layers_then_the_norm() {
        let c = TransformerEncoderLayerConfig::new(2).dim_feedforward(8);
        let mut rng = Rng::new(6);
        let enc = TransformerEncoder::new(4, c, 2, true, &mut rng);
        enc.eval();
        let x = Tensor::randn([2, 3, 4], 7);
        let kpm = Tensor::from_slice(&[0u32, 1, 1, 0, 0, 0], [2, 3]);
        let want = enc
            .norm
            .as_ref()
            .unwrap()
            .forward(&enc.layers[1].forward_with_mask(
                &enc.layers[0].forward_with_mask(&x, None, Some(&kpm), true),
                None,
                Some(&kpm),
                true,
            ));
        assert_eq!(
            enc.forward_with_mask(&x, None, Some(&kpm), true)
                .to_vec::<f32>(),
            want.to_vec::<f32>()
        );
        let bare = TransformerEncoder::from_layers(enc.layers.clone(), None);
        assert_eq!(
            bare.forward(&x).to_vec::<f32>(),
            enc.layers[1]
                .forward(&enc.layers[0].forward(&x))
                .to_vec::<f32>()
        );
    }

    #[test]
    fn dropout_only_while_training() {
        let l = TransformerEncoderLayer::with_config(
            4,
            TransformerEncoderLayerConfig::new(2)
                .dim_feedforward(8)
                .dropout(0.3),
            &mut Rng::new(8),
        );
        let x = Tensor::randn([2, 3, 4], 9);
        assert_ne!(l.forward(&x).to_vec::<f32>(), l.forward(&x).to_vec::<f32>());
        l.eval();
        assert_eq!(l.forward(&x).to_vec::<f32>(), l.forward(&x).to_vec::<f32>());
    }

    #[test]
    #[should_panic(
        expected = "TransformerEncoderLayer: src must be [N, L, 4] ([L, N, 4] when not batch_first, or [L, 4]), got [2, 3, 5]"
    )]
    fn wrong_width_panics() {
        let l = TransformerEncoderLayer::with_config(
            4,
            TransformerEncoderLayerConfig::new(2).dim_feedforward(8),
            &mut Rng::new(0),
        );
        l.forward(&Tensor::zeros([2, 3, 5]));
    }
}
