//! GPT-2 (`transformers.GPT2LMHeadModel`) with Hugging Face's parameter names, a KV cache for
//! one-token-per-step decoding, [`CausalLm`] for [`crate::generate`], and
//! `from_pretrained` / `save_pretrained` in HF's on-disk layout.
//!
//! HF's GPT-2 uses `Conv1D` layers whose weights are stored `[in, out]`; kiln uses [`Linear`]
//! (`[out, in]`), so [`gpt2_key_map`] transposes `c_attn`, `c_proj` and `c_fc` weights on load and
//! `save_pretrained` transposes them back. Attention runs on whole `[B, heads, L, d]` batches
//! through kiln-nn's [`scaled_dot_product_attention`] (no per-head loops), the LM head is the
//! (tied) token embedding, and only the last position goes through it when generating.

use crate::checkpoint::load_safetensors;
use crate::config::HfConfig;
use crate::error::ModelError;
use crate::generation::CausalLm;
use crate::remap::KeyMap;
use kiln_core::{DType, Rng, Tensor};
use kiln_nn::layers::{scaled_dot_product_attention, Dropout, Embedding, LayerNorm, Linear};
use kiln_nn::{
    init, Forward, LoadMode, Module, ModuleExt, NnError, RandomState, StateDict, TrainFlag,
};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------- config

/// The feed-forward activation (`activation_function` in config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gpt2Activation {
    /// `"gelu_new"`: GELU with the tanh approximation (GPT-2's own).
    #[default]
    GeluNew,
    /// `"gelu_pytorch_tanh"`: the same function as `gelu_new`, under PyTorch's name.
    GeluPytorchTanh,
    /// `"gelu"`: exact GELU (with `erf`).
    Gelu,
    /// `"relu"`.
    Relu,
    /// `"silu"` (also read from `"swish"`).
    Silu,
    /// `"tanh"`.
    Tanh,
    /// `"sigmoid"`.
    Sigmoid,
}

impl Gpt2Activation {
    /// The name config.json uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Gpt2Activation::GeluNew => "gelu_new",
            Gpt2Activation::GeluPytorchTanh => "gelu_pytorch_tanh",
            Gpt2Activation::Gelu => "gelu",
            Gpt2Activation::Relu => "relu",
            Gpt2Activation::Silu => "silu",
            Gpt2Activation::Tanh => "tanh",
            Gpt2Activation::Sigmoid => "sigmoid",
        }
    }

    /// Parses a config.json name; `None` for an unsupported one.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" => Gpt2Activation::GeluNew,
            "gelu_pytorch_tanh" => Gpt2Activation::GeluPytorchTanh,
            "gelu" => Gpt2Activation::Gelu,
            "relu" => Gpt2Activation::Relu,
            "silu" | "swish" => Gpt2Activation::Silu,
            "tanh" => Gpt2Activation::Tanh,
            "sigmoid" => Gpt2Activation::Sigmoid,
            _ => return None,
        })
    }

    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Gpt2Activation::GeluNew | Gpt2Activation::GeluPytorchTanh => x.gelu_tanh(),
            Gpt2Activation::Gelu => x.gelu(),
            Gpt2Activation::Relu => x.relu(),
            Gpt2Activation::Silu => x.silu(),
            Gpt2Activation::Tanh => x.tanh(),
            Gpt2Activation::Sigmoid => x.sigmoid(),
        }
    }
}

/// A GPT-2 configuration (HF's `GPT2Config`); defaults are the 124M `gpt2` model's, as in HF.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size (50257).
    pub vocab_size: usize,
    /// Longest sequence, cache included (1024).
    pub n_positions: usize,
    /// Hidden size `E` (768).
    pub n_embd: usize,
    /// Number of blocks (12).
    pub n_layer: usize,
    /// Attention heads; must divide `n_embd` (12).
    pub n_head: usize,
    /// Feed-forward inner size (`None`: `4 · n_embd`).
    pub n_inner: Option<usize>,
    /// Feed-forward activation (`gelu_new`).
    pub activation_function: Gpt2Activation,
    /// Dropout after each sub-layer (0.1).
    pub resid_pdrop: f64,
    /// Dropout after the embeddings (0.1).
    pub embd_pdrop: f64,
    /// Dropout on the attention weights (0.1).
    pub attn_pdrop: f64,
    /// Layer-norm epsilon (1e-5).
    pub layer_norm_epsilon: f64,
    /// Std of the normal initialisation (0.02).
    pub initializer_range: f64,
    /// Divide the attention scores by `√head_dim` (true).
    pub scale_attn_weights: bool,
    /// Also divide them by `layer index + 1` (false).
    pub scale_attn_by_inverse_layer_idx: bool,
    /// The LM head shares the token embedding (true).
    pub tie_word_embeddings: bool,
    /// Beginning-of-text token (50256; none when config.json has none).
    pub bos_token_id: Option<u32>,
    /// End-of-text token (50256; none when config.json has none).
    pub eos_token_id: Option<u32>,
    /// Other config.json fields, kept as they are for [`Gpt2Config::to_json`].
    pub extra: Map<String, Value>,
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Gpt2Config {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: Gpt2Activation::GeluNew,
            resid_pdrop: 0.1,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            layer_norm_epsilon: 1e-5,
            initializer_range: 0.02,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            tie_word_embeddings: true,
            bos_token_id: Some(50256),
            eos_token_id: Some(50256),
            extra: Map::new(),
        }
    }
}

/// Fields [`Gpt2Config`] reads itself (everything else goes to `extra`).
const KNOWN_FIELDS: &[&str] = &[
    "vocab_size",
    "n_positions",
    "n_ctx",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "layer_norm_epsilon",
    "initializer_range",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "add_cross_attention",
    "model_type",
    "architectures",
];

impl Gpt2Config {
    /// A small configuration (for tests and experiments): the given sizes, 128 positions, no
    /// dropout, BOS/EOS 50256 only when the vocabulary holds it, other fields at their
    /// defaults.
    pub fn small(vocab_size: usize, n_embd: usize, n_layer: usize, n_head: usize) -> Self {
        let eot = (vocab_size > 50256).then_some(50256);
        Gpt2Config {
            vocab_size,
            n_embd,
            n_layer,
            n_head,
            n_positions: 128,
            bos_token_id: eot,
            eos_token_id: eot,
            ..Self::default()
        }
        .dropout(0.0)
    }

    /// Sets the maximum sequence length.
    pub fn n_positions(mut self, n: usize) -> Self {
        self.n_positions = n;
        self
    }

    /// Sets the feed-forward inner size.
    pub fn n_inner(mut self, n: usize) -> Self {
        self.n_inner = Some(n);
        self
    }

    /// Sets the activation.
    pub fn activation(mut self, act: Gpt2Activation) -> Self {
        self.activation_function = act;
        self
    }

    /// Sets all three dropout probabilities (residual, embedding, attention).
    pub fn dropout(mut self, p: f64) -> Self {
        self.resid_pdrop = p;
        self.embd_pdrop = p;
        self.attn_pdrop = p;
        self
    }

    /// Ties (or unties) the LM head to the token embedding.
    pub fn tie_word_embeddings(mut self, on: bool) -> Self {
        self.tie_word_embeddings = on;
        self
    }

    /// Sets whether attention scores are divided by `√head_dim` and by `layer index + 1`.
    pub fn attention_scaling(mut self, by_head_dim: bool, by_inverse_layer_idx: bool) -> Self {
        self.scale_attn_weights = by_head_dim;
        self.scale_attn_by_inverse_layer_idx = by_inverse_layer_idx;
        self
    }

    /// The feed-forward inner size (`n_inner`, else `4 · n_embd`).
    pub fn inner_size(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Reads a HF `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_hf(&HfConfig::from_file(path)?)
    }

    /// Parses config.json text; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, ModelError> {
        Self::from_hf(&HfConfig::from_json_str(text, origin)?)
    }

    /// Reads the fields of a parsed config (HF defaults for absent ones) and validates them.
    pub fn from_hf(c: &HfConfig) -> Result<Self, ModelError> {
        c.expect_model_type("gpt2")?;
        let d = Gpt2Config::default();
        let act: String = c.get_or("activation_function", "gelu_new".to_string())?;
        let activation_function = Gpt2Activation::from_name(&act).ok_or_else(|| {
            c.field_error(
                "activation_function",
                format!(
                    "unsupported activation \"{act}\" (supported: gelu_new, gelu_pytorch_tanh, gelu, relu, silu, swish, tanh, sigmoid)"
                ),
            )
        })?;
        if c.get_or("add_cross_attention", false)? {
            return Err(c.field_error(
                "add_cross_attention",
                "cross-attention (encoder-decoder GPT-2) is not supported",
            ));
        }
        let n_positions: usize = c.get_or("n_positions", d.n_positions)?;
        if let Some(n_ctx) = c.opt::<usize>("n_ctx")? {
            if n_ctx != n_positions {
                return Err(c.field_error(
                    "n_ctx",
                    format!("is {n_ctx} but n_positions is {n_positions}; they must agree"),
                ));
            }
        }
        let cfg = Gpt2Config {
            vocab_size: c.get_or("vocab_size", d.vocab_size)?,
            n_positions,
            n_embd: c.get_or("n_embd", d.n_embd)?,
            n_layer: c.get_or("n_layer", d.n_layer)?,
            n_head: c.get_or("n_head", d.n_head)?,
            n_inner: c.opt("n_inner")?,
            activation_function,
            resid_pdrop: c.get_or("resid_pdrop", d.resid_pdrop)?,
            embd_pdrop: c.get_or("embd_pdrop", d.embd_pdrop)?,
            attn_pdrop: c.get_or("attn_pdrop", d.attn_pdrop)?,
            layer_norm_epsilon: c.get_or("layer_norm_epsilon", d.layer_norm_epsilon)?,
            initializer_range: c.get_or("initializer_range", d.initializer_range)?,
            scale_attn_weights: c.get_or("scale_attn_weights", d.scale_attn_weights)?,
            scale_attn_by_inverse_layer_idx: c.get_or(
                "scale_attn_by_inverse_layer_idx",
                d.scale_attn_by_inverse_layer_idx,
            )?,
            tie_word_embeddings: c.get_or("tie_word_embeddings", d.tie_word_embeddings)?,
            bos_token_id: c.opt("bos_token_id")?,
            eos_token_id: c.opt("eos_token_id")?,
            extra: c
                .map()
                .iter()
                .filter(|(k, _)| !KNOWN_FIELDS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        cfg.validate()
            .map_err(|(field, msg)| c.field_error(field, msg))?;
        Ok(cfg)
    }

    /// Checks sizes, probabilities and token ids; the error names the offending field.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_inner", self.inner_size()),
        ];
        for (field, v) in sizes {
            if v == 0 {
                return Err((field, "must be positive, got 0".to_string()));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err((
                "n_head",
                format!("{} does not divide n_embd {}", self.n_head, self.n_embd),
            ));
        }
        for (field, p) in [
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err((field, format!("must be in [0, 1], got {p}")));
            }
        }
        if self.layer_norm_epsilon.is_nan() || self.layer_norm_epsilon < 0.0 {
            return Err((
                "layer_norm_epsilon",
                format!("must be >= 0, got {}", self.layer_norm_epsilon),
            ));
        }
        for (field, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= self.vocab_size {
                    return Err((
                        field,
                        format!(
                            "{id} is outside the vocabulary (vocab_size {})",
                            self.vocab_size
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The config as HF's config.json object (sorted keys, `extra` fields kept), with
    /// `model_type` `gpt2` and `architectures` `["GPT2LMHeadModel"]`.
    pub fn to_json_value(&self) -> Value {
        let mut m: BTreeMap<String, Value> = self
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("architectures", Value::from(vec!["GPT2LMHeadModel"]));
        put("model_type", Value::from("gpt2"));
        put("vocab_size", Value::from(self.vocab_size));
        put("n_positions", Value::from(self.n_positions));
        put("n_embd", Value::from(self.n_embd));
        put("n_layer", Value::from(self.n_layer));
        put("n_head", Value::from(self.n_head));
        put("n_inner", Value::from(self.n_inner));
        put(
            "activation_function",
            Value::from(self.activation_function.as_str()),
        );
        put("resid_pdrop", Value::from(self.resid_pdrop));
        put("embd_pdrop", Value::from(self.embd_pdrop));
        put("attn_pdrop", Value::from(self.attn_pdrop));
        put("layer_norm_epsilon", Value::from(self.layer_norm_epsilon));
        put("initializer_range", Value::from(self.initializer_range));
        put("scale_attn_weights", Value::from(self.scale_attn_weights));
        put(
            "scale_attn_by_inverse_layer_idx",
            Value::from(self.scale_attn_by_inverse_layer_idx),
        );
        put("tie_word_embeddings", Value::from(self.tie_word_embeddings));
        put("add_cross_attention", Value::from(false));
        put("bos_token_id", Value::from(self.bos_token_id));
        put("eos_token_id", Value::from(self.eos_token_id));
        Value::Object(m.into_iter().collect())
    }

    /// The config as pretty-printed config.json text (see [`Gpt2Config::to_json_value`]).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.to_json_value()).expect("JSON value")
    }
}

// ---------------------------------------------------------------------- modules

/// Fresh weights as HF's `GPT2PreTrainedModel._init_weights` makes them: `N(0, std)` for
/// linear and embedding weights (`std / √(2 · n_layer)` for the residual projections `c_proj`),
/// zero biases, unit layer norms.
/// With `draw` false (a model whose every tensor a checkpoint will overwrite) the normal weights
/// are left at zero: drawing them is most of the time a load would otherwise take.
struct Init<'a> {
    rng: &'a mut Rng,
    dtype: DType,
    std: f64,
    draw: bool,
}

impl Init<'_> {
    fn normal(&mut self, shape: &[usize], std: f64) -> Tensor {
        if !self.draw {
            return Tensor::zeros_dtype(shape, self.dtype);
        }
        let t = Tensor::zeros(shape);
        init::normal_(&t, 0.0, std, self.rng);
        t.to_dtype(self.dtype)
    }

    fn linear(&mut self, input: usize, output: usize, std: f64) -> Linear {
        let w = self.normal(&[output, input], std);
        Linear::from_weights(w, Some(Tensor::zeros_dtype([output], self.dtype)))
    }

    fn layer_norm(&self, dim: usize, eps: f64) -> LayerNorm {
        LayerNorm::from_weights(
            Tensor::ones([dim]).to_dtype(self.dtype),
            Some(Tensor::zeros_dtype([dim], self.dtype)),
            eps,
        )
    }

    fn dropout(&mut self, p: f64) -> Dropout {
        Dropout::new(p, self.rng.next_u64())
    }
}

/// Causal self-attention: the fused `c_attn` projection (`E → 3E`: query, key, value), scaled
/// dot-product attention over all heads at once, and the output projection `c_proj`.
#[derive(Module, Debug)]
pub struct Gpt2Attention {
    /// Fused query/key/value projection `E → 3E` (HF's Conv1D, stored here as `[3E, E]`).
    pub c_attn: Linear,
    /// Output projection `E → E`.
    pub c_proj: Linear,
    /// Dropout after the output projection (`resid_pdrop`).
    pub resid_dropout: Dropout,
    training: TrainFlag,
    /// Number of heads.
    #[module(skip)]
    pub n_head: usize,
    /// What the queries are multiplied by before kiln's `1/√head_dim` scaling, so that the
    /// scores get GPT-2's scaling (`scale_attn_weights`, `scale_attn_by_inverse_layer_idx`).
    #[module(skip)]
    pub query_factor: f64,
    /// Dropout on the attention weights while training (`attn_pdrop`).
    #[module(skip)]
    pub attn_pdrop: f64,
    rng: RandomState,
}

/// How a forward pass masks attention (decided once for all layers).
enum AttnMask {
    /// Plain causal attention over a sequence without past (`is_causal`).
    Causal,
    /// No mask: one new token attending to every cached position.
    None,
    /// A boolean mask, true where the key takes part (`[L, S]` or `[B, 1, L, S]`).
    Allowed(Tensor),
}

impl Gpt2Attention {
    /// `x [B, L, E]` to `[B, L, E]`; with `past` keys and values `[B, H, P, d]` in front.
    /// Returns the output and the keys and values of all `P + L` positions.
    fn forward(
        &self,
        x: &Tensor,
        mask: &AttnMask,
        past: Option<&(Tensor, Tensor)>,
    ) -> (Tensor, Tensor, Tensor) {
        let (b, l, e) = (x.dims()[0], x.dims()[1], x.dims()[2]);
        let h = self.n_head;
        let d = e / h;
        // [B, L, 3E] -> [3, B, H, L, d]: one projection, then views.
        let qkv = self
            .c_attn
            .forward(x)
            .reshape([b, l, 3, h, d])
            .permute(&[2, 0, 3, 1, 4]);
        let part = |i: usize| qkv.narrow(0, i, 1).reshape([b, h, l, d]);
        let mut q = part(0);
        let (mut k, mut v) = (part(1), part(2));
        if let Some((pk, pv)) = past {
            k = Tensor::cat(&[pk, &k], 2);
            v = Tensor::cat(&[pv, &v], 2);
        }
        if self.query_factor != 1.0 {
            q = q.mul_scalar(self.query_factor);
        }
        let (attn_mask, is_causal) = match mask {
            AttnMask::Causal => (None, true),
            AttnMask::None => (None, false),
            AttnMask::Allowed(m) => (Some(m), false),
        };
        let mut rng = self.rng.lock();
        let ctx = scaled_dot_product_attention(
            &q,
            &k,
            &v,
            attn_mask,
            is_causal,
            self.attn_pdrop,
            self.training.is_training(),
            &mut rng,
        );
        drop(rng);
        let ctx = ctx.permute(&[0, 2, 1, 3]).reshape([b, l, e]);
        let out = self.resid_dropout.forward(&self.c_proj.forward(&ctx));
        (out, k, v)
    }
}

/// The feed-forward block: `dropout(c_proj(act(c_fc(x))))`.
#[derive(Module, Debug)]
pub struct Gpt2Mlp {
    /// `E → inner` (HF's Conv1D).
    pub c_fc: Linear,
    /// `inner → E` (HF's Conv1D).
    pub c_proj: Linear,
    /// Dropout (`resid_pdrop`).
    pub dropout: Dropout,
    /// The activation.
    #[module(skip)]
    pub act: Gpt2Activation,
}

impl Forward for Gpt2Mlp {
    /// `[.., E]` to `[.., E]`.
    fn forward(&self, x: &Tensor) -> Tensor {
        let hidden = self.act.apply(&self.c_fc.forward(x));
        self.dropout.forward(&self.c_proj.forward(&hidden))
    }
}

/// One pre-norm block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Module, Debug)]
pub struct Gpt2Block {
    /// Layer norm before attention.
    pub ln_1: LayerNorm,
    /// Causal self-attention.
    pub attn: Gpt2Attention,
    /// Layer norm before the feed-forward block.
    pub ln_2: LayerNorm,
    /// Feed-forward block.
    pub mlp: Gpt2Mlp,
}

impl Gpt2Block {
    fn new(c: &Gpt2Config, layer_idx: usize, init: &mut Init) -> Self {
        let (e, inner) = (c.n_embd, c.inner_size());
        let std = init.std;
        let proj_std = std / (2.0 * c.n_layer as f64).sqrt();
        let head_dim = (e / c.n_head) as f64;
        let mut query_factor = if c.scale_attn_weights {
            1.0
        } else {
            head_dim.sqrt()
        };
        if c.scale_attn_by_inverse_layer_idx {
            query_factor /= (layer_idx + 1) as f64;
        }
        Gpt2Block {
            ln_1: init.layer_norm(e, c.layer_norm_epsilon),
            attn: Gpt2Attention {
                c_attn: init.linear(e, 3 * e, std),
                c_proj: init.linear(e, e, proj_std),
                resid_dropout: init.dropout(c.resid_pdrop),
                training: TrainFlag::default(),
                n_head: c.n_head,
                query_factor,
                attn_pdrop: c.attn_pdrop,
                rng: RandomState::new(init.rng.next_u64()),
            },
            ln_2: init.layer_norm(e, c.layer_norm_epsilon),
            mlp: Gpt2Mlp {
                c_fc: init.linear(e, inner, std),
                c_proj: init.linear(inner, e, proj_std),
                dropout: init.dropout(c.resid_pdrop),
                act: c.activation_function,
            },
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: &AttnMask,
        past: Option<&(Tensor, Tensor)>,
    ) -> (Tensor, Tensor, Tensor) {
        let (a, k, v) = self.attn.forward(&self.ln_1.forward(x), mask, past);
        let x = x.add(&a);
        let x = x.add(&self.mlp.forward(&self.ln_2.forward(&x)));
        (x, k, v)
    }
}

/// Keys and values of every layer for the positions seen so far, and their padding mask: what
/// lets decoding feed one token per step. Made by [`GPT2LMHeadModel::new_cache`] (or
/// [`Gpt2Cache::default`]) and extended by each cached forward.
#[derive(Debug, Clone, Default)]
pub struct Gpt2Cache {
    /// Per layer `(keys, values)`, each `[B, H, len, head_dim]` (empty before the first call).
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    batch: usize,
    /// `[batch, len]` row-major, 1 = real token; `None` while every position is real.
    mask: Option<Vec<u32>>,
}

impl Gpt2Cache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first cached forward.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Batch size of the cached sequences (0 when empty).
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Forgets everything (the cache can then start a new sequence).
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Layer `i`'s cached `(keys, values)`, `[B, H, len, head_dim]`.
    pub fn layer(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(i)
    }
}

/// `transformers.GPT2Model`: token and position embeddings, the blocks (`h.{i}`), final norm.
#[derive(Module, Debug)]
pub struct Gpt2Model {
    /// Token embedding `[vocab_size, E]` (also the tied LM head).
    pub wte: Embedding,
    /// Position embedding `[n_positions, E]`.
    pub wpe: Embedding,
    /// Dropout after the embeddings (`embd_pdrop`).
    pub drop: Dropout,
    /// The blocks.
    pub h: Vec<Gpt2Block>,
    /// Final layer norm.
    pub ln_f: LayerNorm,
    #[module(skip)]
    config: Gpt2Config,
}

impl Gpt2Model {
    /// A freshly initialised model of `dtype` (f32 or f64). Panics when `config` is invalid.
    pub fn with_dtype(config: &Gpt2Config, dtype: DType, rng: &mut Rng) -> Self {
        Self::build(config, dtype, rng, true)
    }

    /// `with_dtype`, drawing the normal weights or (`draw` false) leaving them at zero.
    fn build(config: &Gpt2Config, dtype: DType, rng: &mut Rng, draw: bool) -> Self {
        if let Err((field, msg)) = config.validate() {
            panic!("Gpt2Model: invalid config: {field} {msg}");
        }
        assert!(
            dtype.is_float(),
            "Gpt2Model: dtype must be f32 or f64, got {dtype}"
        );
        let mut init = Init {
            rng,
            dtype,
            std: config.initializer_range,
            draw,
        };
        let std = init.std;
        let wte = Embedding::from_weights(init.normal(&[config.vocab_size, config.n_embd], std));
        let wpe = Embedding::from_weights(init.normal(&[config.n_positions, config.n_embd], std));
        let drop = init.dropout(config.embd_pdrop);
        let h = (0..config.n_layer)
            .map(|i| Gpt2Block::new(config, i, &mut init))
            .collect();
        Gpt2Model {
            wte,
            wpe,
            drop,
            h,
            ln_f: init.layer_norm(config.n_embd, config.layer_norm_epsilon),
            config: config.clone(),
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// The last hidden states `[B, L, E]` (after `ln_f`) for `input_ids [B, L]` (integer).
    ///
    /// `attention_mask [B, L]` (1 = real token, 0 = padding; for left-padded batches) masks
    /// padding keys out, and positions count real tokens only (as HF's `generate` computes
    /// `position_ids`), so a left-padded row gives the same outputs as the row alone. With a
    /// `cache`, the new tokens follow the cached ones (positions continue, their keys and
    /// values are appended); the mask then covers the new tokens only (the cache remembers the
    /// earlier ones; none = all real).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut Gpt2Cache>,
    ) -> Tensor {
        let name = "Gpt2Model";
        let c = &self.config;
        assert!(
            input_ids.rank() == 2 && !input_ids.dtype().is_float(),
            "{name}: input_ids must be an integer [batch, seq] tensor, got {} {}",
            input_ids.dtype(),
            input_ids.shape()
        );
        let (b, l) = (input_ids.dims()[0], input_ids.dims()[1]);
        let past = cache.as_ref().map_or(0, |c| c.len);
        assert!(
            l >= 1 && past + l <= c.n_positions,
            "{name}: {past} cached + {l} new positions (input_ids {}) must be in 1..={} (n_positions)",
            input_ids.shape(),
            c.n_positions
        );
        if let Some(cache) = cache.as_ref().filter(|c| c.len > 0) {
            assert!(
                cache.batch == b,
                "{name}: input_ids {} has batch {b} but the cache holds batch {}",
                input_ids.shape(),
                cache.batch
            );
        }
        if let Some(&bad) = input_ids
            .to_f64_vec()
            .iter()
            .find(|&&t| t < 0.0 || t >= c.vocab_size as f64)
        {
            panic!(
                "{name}: token id {bad} in input_ids {} is outside the vocabulary (vocab_size {})",
                input_ids.shape(),
                c.vocab_size
            );
        }
        let new_mask: Option<Vec<u32>> = attention_mask.map(|m| {
            assert!(
                m.dims() == input_ids.dims(),
                "{name}: attention_mask shape {} does not match input_ids {}",
                m.shape(),
                input_ids.shape()
            );
            m.ne_scalar(0.0).contiguous().to_vec::<u32>()
        });
        // The mask over all `past + l` positions, `[B, S]`, when any position is padding.
        let s = past + l;
        let past_mask = cache.as_ref().and_then(|c| c.mask.as_ref());
        let full_mask: Option<Vec<u32>> =
            if past_mask.is_none() && new_mask.as_ref().is_none_or(|m| m.iter().all(|&v| v != 0)) {
                None
            } else {
                let mut full = Vec::with_capacity(b * s);
                for row in 0..b {
                    match past_mask {
                        Some(p) => full.extend_from_slice(&p[row * past..(row + 1) * past]),
                        None => full.extend(std::iter::repeat_n(1, past)),
                    }
                    match &new_mask {
                        Some(n) => full.extend_from_slice(&n[row * l..(row + 1) * l]),
                        None => full.extend(std::iter::repeat_n(1, l)),
                    }
                }
                Some(full)
            };
        let dtype = self.wte.weight.dtype();
        let tokens = self.wte.forward(input_ids);
        let (positions, mask) = match &full_mask {
            None => {
                let pos = self
                    .wpe
                    .forward(&Tensor::arange_i64(past as i64, s as i64, 1));
                let mask = if past == 0 {
                    AttnMask::Causal
                } else if l == 1 {
                    AttnMask::None
                } else {
                    // New query i (absolute position past + i) sees keys j <= past + i.
                    let allowed: Vec<u32> = (0..l * s)
                        .map(|k| u32::from(k % s <= past + k / s))
                        .collect();
                    AttnMask::Allowed(Tensor::from_vec(allowed, [l, s]))
                };
                (pos, mask)
            }
            Some(full) => {
                // HF's generate: position = (number of real tokens so far) - 1, padding at 1.
                let mut pos = Vec::with_capacity(b * l);
                let mut allowed = Vec::with_capacity(b * l * s);
                for row in full.chunks_exact(s) {
                    let mut count = 0i64;
                    for (j, &m) in row.iter().enumerate() {
                        count += i64::from(m);
                        if j >= past {
                            pos.push(if m != 0 { count - 1 } else { 1 });
                        }
                    }
                    for i in 0..l {
                        allowed.extend(
                            row.iter()
                                .enumerate()
                                .map(|(j, &m)| u32::from(m != 0 && j <= past + i)),
                        );
                    }
                }
                let pos = self.wpe.forward(&Tensor::from_vec(pos, [b, l]));
                let mask = AttnMask::Allowed(Tensor::from_vec(allowed, [b, 1, l, s]));
                (pos, mask)
            }
        };
        let mut x = self.drop.forward(&tokens.add(&positions.to_dtype(dtype)));
        let mut kv = Vec::with_capacity(self.h.len());
        for (i, block) in self.h.iter().enumerate() {
            let past_kv = cache.as_ref().and_then(|c| c.layers.get(i));
            let (y, k, v) = block.forward(&x, &mask, past_kv);
            x = y;
            kv.push((k, v));
        }
        if let Some(cache) = cache {
            cache.layers = kv;
            cache.len = s;
            cache.batch = b;
            cache.mask = full_mask;
        }
        self.ln_f.forward(&x)
    }
}

/// `transformers.GPT2LMHeadModel`: [`Gpt2Model`] (`transformer.*`) and an LM head tied to the
/// token embedding (an own `lm_head` only when `tie_word_embeddings` is false).
#[derive(Module, Debug)]
pub struct GPT2LMHeadModel {
    /// The transformer.
    pub transformer: Gpt2Model,
    /// The untied LM head `E → vocab_size` without bias (`None` when tied to `wte`).
    pub lm_head: Option<Linear>,
    /// GPT-2 tokenizer files `(vocab.json / encoder.json, merges.txt / vocab.bpe)`, written
    /// out by `save_pretrained`.
    #[module(skip)]
    tokenizer_files: Option<(PathBuf, PathBuf)>,
}

impl GPT2LMHeadModel {
    /// A freshly initialised f32 model.
    pub fn new(config: &Gpt2Config, rng: &mut Rng) -> Self {
        Self::with_dtype(config, DType::F32, rng)
    }

    /// A freshly initialised model of `dtype` (f32 or f64). Panics when `config` is invalid.
    pub fn with_dtype(config: &Gpt2Config, dtype: DType, rng: &mut Rng) -> Self {
        Self::build(config, dtype, rng, true)
    }

    fn build(config: &Gpt2Config, dtype: DType, rng: &mut Rng, draw: bool) -> Self {
        let transformer = Gpt2Model::build(config, dtype, rng, draw);
        let lm_head = (!config.tie_word_embeddings).then(|| {
            let w = Tensor::zeros([config.vocab_size, config.n_embd]);
            if draw {
                init::normal_(&w, 0.0, config.initializer_range, rng);
            }
            Linear::from_weights(w.to_dtype(dtype), None)
        });
        GPT2LMHeadModel {
            transformer,
            lm_head,
            tokenizer_files: None,
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.transformer.config
    }

    /// Logits `[.., vocab_size]` of hidden states `[.., E]`.
    pub fn lm_logits(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(&self.transformer.wte.weight.t()),
        }
    }

    /// Logits `[B, L, vocab_size]` for `input_ids [B, L]`, with an optional `attention_mask
    /// [B, L]` for left-padded batches (see [`Gpt2Model::forward`]). Differentiable; dropout
    /// is active only in training mode.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        self.lm_logits(&self.transformer.forward(input_ids, attention_mask, None))
    }

    /// [`GPT2LMHeadModel::forward`] after the positions in `cache`, which it extends: logits
    /// `[B, L, vocab_size]` of the new tokens only.
    pub fn forward_with_cache(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut Gpt2Cache,
    ) -> Tensor {
        self.lm_logits(
            &self
                .transformer
                .forward(input_ids, attention_mask, Some(cache)),
        )
    }

    /// An empty KV cache.
    pub fn new_cache(&self) -> Gpt2Cache {
        Gpt2Cache::new()
    }

    /// Remembers GPT-2 tokenizer files (`encoder.json` / `vocab.json` and `vocab.bpe` /
    /// `merges.txt`) so that `save_pretrained` writes them as `vocab.json` and `merges.txt`.
    pub fn set_tokenizer_files(&mut self, vocab_json: impl AsRef<Path>, merges: impl AsRef<Path>) {
        self.tokenizer_files = Some((
            vocab_json.as_ref().to_path_buf(),
            merges.as_ref().to_path_buf(),
        ));
    }

    /// The tokenizer files this model was loaded with or given, `(vocab, merges)`.
    pub fn tokenizer_files(&self) -> Option<(&Path, &Path)> {
        self.tokenizer_files
            .as_ref()
            .map(|(v, m)| (v.as_path(), m.as_path()))
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (HF layout: Conv1D weights
    /// `[in, out]`, with or without the `transformer.` prefix; the old `attn.bias` /
    /// `attn.masked_bias` buffers and a tied `lm_head.weight` are ignored). Every model tensor
    /// must be in the checkpoint, and nothing else. GPT-2 tokenizer files in `dir`
    /// (`vocab.json` + `merges.txt`, or `encoder.json` + `vocab.bpe`) are remembered.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        let config = Gpt2Config::from_file(dir.join("config.json"))?;
        // Every tensor comes from the checkpoint, so none is drawn first.
        let mut model = Self::build(&config, DType::F32, &mut Rng::new(0), false);
        model.load_weights(&dir.join("model.safetensors"))?;
        model.tokenizer_files = gpt2_tokenizer_files(dir);
        Ok(model)
    }

    /// Loads an HF-layout GPT-2 safetensors checkpoint into this model (see
    /// [`GPT2LMHeadModel::from_pretrained`]).
    pub fn load_weights(&self, path: &Path) -> Result<(), ModelError> {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                what: "the model's weights (model.safetensors)",
            });
        }
        let sd = load_safetensors(path)?;
        let sd = gpt2_key_map(&sd, self.config().tie_word_embeddings).apply(&sd)?;
        let misfit = |message: String| ModelError::Checkpoint {
            path: path.to_path_buf(),
            model: "GPT2LMHeadModel",
            message,
        };
        let report = self
            .load_state_dict(&sd, LoadMode::NonStrict)
            .map_err(|e| match e {
                NnError::StateDict(m) => misfit(m),
                other => ModelError::Nn(other),
            })?;
        let list = |names: &[String]| {
            let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
            format!(
                "{}{}",
                shown.join(", "),
                if names.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            )
        };
        if !report.missing.is_empty() {
            return Err(misfit(format!(
                "{} tensors missing: {} (checkpoint keys look like: {})",
                report.missing.len(),
                list(&report.missing),
                sd.iter()
                    .take(4)
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !report.unexpected.is_empty() {
            return Err(misfit(format!(
                "{} unexpected tensors: {}",
                report.unexpected.len(),
                list(&report.unexpected)
            )));
        }
        Ok(())
    }

    /// The state dict in HF's layout: Conv1D weights transposed back to `[in, out]`, f32.
    pub fn hf_state_dict(&self) -> Result<StateDict, ModelError> {
        let sd: StateDict = self
            .state_dict()
            .iter()
            .map(|(k, t)| (k.to_string(), t.detach().to_dtype(DType::F32)))
            .collect();
        KeyMap::new().transpose(CONV1D_WEIGHTS).apply(&sd)
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` in HF's layout (Conv1D weights
    /// `[in, out]`, f32, a tied head not stored), creating `dir`; plus `vocab.json` and
    /// `merges.txt` when the model has tokenizer files (see
    /// [`GPT2LMHeadModel::set_tokenizer_files`]).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<(), ModelError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let cfg_path = dir.join("config.json");
        std::fs::write(&cfg_path, self.config().to_json() + "\n")
            .map_err(|e| io_err(&cfg_path, e))?;
        write_safetensors_f32(&self.hf_state_dict()?, &dir.join("model.safetensors"))?;
        if let Some((vocab, merges)) = &self.tokenizer_files {
            for (src, name) in [(vocab, "vocab.json"), (merges, "merges.txt")] {
                let dst = dir.join(name);
                if src != &dst {
                    std::fs::copy(src, &dst).map_err(|e| io_err(src, e))?;
                }
            }
        }
        Ok(())
    }

    /// [`GPT2LMHeadModel::save_pretrained`], then copies the tokenizer files found in
    /// `tokenizer_dir` (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`,
    /// `added_tokens.json`, `vocab.json`, `merges.txt`; `encoder.json` / `vocab.bpe` are
    /// written as `vocab.json` / `merges.txt`). Errors when it holds no GPT-2 tokenizer.
    pub fn save_pretrained_with_tokenizer(
        &self,
        dir: impl AsRef<Path>,
        tokenizer_dir: impl AsRef<Path>,
    ) -> Result<(), ModelError> {
        let (dir, tok) = (dir.as_ref(), tokenizer_dir.as_ref());
        if !tok.join("tokenizer.json").is_file() && gpt2_tokenizer_files(tok).is_none() {
            return Err(ModelError::MissingFile {
                path: tok.join("tokenizer.json"),
                what: "a tokenizer (tokenizer.json, vocab.json + merges.txt, or encoder.json + vocab.bpe)",
            });
        }
        self.save_pretrained(dir)?;
        let copies = [
            ("tokenizer.json", "tokenizer.json"),
            ("tokenizer_config.json", "tokenizer_config.json"),
            ("special_tokens_map.json", "special_tokens_map.json"),
            ("added_tokens.json", "added_tokens.json"),
            ("encoder.json", "vocab.json"),
            ("vocab.bpe", "merges.txt"),
            ("vocab.json", "vocab.json"),
            ("merges.txt", "merges.txt"),
        ];
        for (from, to) in copies {
            let (src, dst) = (tok.join(from), dir.join(to));
            if src.is_file() && src != dst {
                std::fs::copy(&src, &dst).map_err(|e| io_err(&src, e))?;
            }
        }
        Ok(())
    }
}

impl CausalLm for GPT2LMHeadModel {
    type Cache = Gpt2Cache;

    fn new_cache(&self) -> Gpt2Cache {
        Gpt2Cache::new()
    }

    /// Runs without recording a graph; only the last position goes through the LM head.
    fn next_logits(&self, ids: &[u32], cache: &mut Gpt2Cache) -> Vec<f32> {
        let _guard = kiln_core::no_grad();
        let n = ids.len();
        let input = Tensor::from_vec(ids.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, n]);
        let hidden = self.transformer.forward(&input, None, Some(cache));
        let e = hidden.dims()[2];
        let last = hidden.narrow(1, n - 1, 1).reshape([1, e]);
        self.lm_logits(&last).to_dtype(DType::F32).to_vec::<f32>()
    }

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
}

// ---------------------------------------------------------------------- checkpoints

/// The Conv1D weights (`[in, out]` in HF checkpoints).
const CONV1D_WEIGHTS: &[&str] = &[
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
];

/// The key map from a HF GPT-2 checkpoint to [`GPT2LMHeadModel`]: `transformer.` added to a
/// bare `GPT2Model` checkpoint, the causal-mask buffers `attn.bias` / `attn.masked_bias`
/// dropped, `lm_head.weight` dropped when `tied`, and the Conv1D weights transposed to
/// `Linear`'s `[out, in]`.
pub fn gpt2_key_map(checkpoint: &StateDict, tied: bool) -> KeyMap {
    let bare = !checkpoint
        .iter()
        .any(|(k, _)| k.starts_with("transformer."));
    let mut map = KeyMap::new();
    if bare {
        map = map
            .add_prefix("transformer.")
            .rename_suffix("transformer.lm_head.weight", "lm_head.weight");
    }
    let mut map = map.drop_suffix("attn.bias").drop_suffix("attn.masked_bias");
    if tied {
        map = map.drop_suffix("lm_head.weight");
    }
    map.transpose(CONV1D_WEIGHTS)
}

/// GPT-2 tokenizer files in `dir`: `(vocab.json, merges.txt)`, else `(encoder.json,
/// vocab.bpe)`; `None` when neither pair is there.
pub fn gpt2_tokenizer_files(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]
        .into_iter()
        .map(|(v, m)| (dir.join(v), dir.join(m)))
        .find(|(v, m)| v.is_file() && m.is_file())
}

fn io_err(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes the tensors of `sd` as f32 safetensors (with the `{"format": "pt"}` metadata
/// transformers expects), through kiln-nn's atomic writer.
fn write_safetensors_f32(sd: &StateDict, path: &Path) -> Result<(), ModelError> {
    let f32_sd: StateDict = sd
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_dtype(DType::F32)))
        .collect();
    Ok(kiln_nn::safetensors_io::save(&f32_sd, path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::write_safetensors;
    use kiln_nn::layers::gradcheck_module;

    fn tiny() -> Gpt2Config {
        Gpt2Config::small(11, 8, 2, 2).n_positions(8)
    }

    fn ids(rows: &[&[i64]]) -> Tensor {
        let l = rows[0].len();
        Tensor::from_vec(rows.concat(), [rows.len(), l])
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-gpt2-{tag}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    const GPT2_CONFIG: &str = r#"{
      "activation_function": "gelu_new",
      "architectures": ["GPT2LMHeadModel"],
      "attn_pdrop": 0.1,
      "bos_token_id": 50256,
      "embd_pdrop": 0.1,
      "eos_token_id": 50256,
      "initializer_range": 0.02,
      "layer_norm_epsilon": 1e-05,
      "model_type": "gpt2",
      "n_ctx": 1024,
      "n_embd": 768,
      "n_head": 12,
      "n_layer": 12,
      "n_positions": 1024,
      "resid_pdrop": 0.1,
      "summary_type": "cls_index",
      "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
      "vocab_size": 50257
    }"#;

    #[test]
    fn config_parses_hf_json_with_defaults_and_round_trips() {
        let c = Gpt2Config::from_json_str(GPT2_CONFIG, "config.json").unwrap();
        assert_eq!(c.n_embd, 768);
        assert_eq!(c.inner_size(), 3072);
        assert_eq!(c.activation_function, Gpt2Activation::GeluNew);
        assert!(c.tie_word_embeddings && c.scale_attn_weights);
        assert!(!c.scale_attn_by_inverse_layer_idx);
        assert_eq!(c.eos_token_id, Some(50256));
        assert_eq!(c.extra["summary_type"], "cls_index");
        let defaults = Gpt2Config {
            extra: c.extra.clone(),
            ..Gpt2Config::default()
        };
        assert_eq!(c, defaults);
        let back = Gpt2Config::from_json_str(&c.to_json(), "saved").unwrap();
        assert_eq!(back, c);
        let v = c.to_json_value();
        assert_eq!(v["architectures"][0], "GPT2LMHeadModel");
        assert_eq!(
            v["task_specific_params"]["text-generation"]["max_length"],
            50
        );
        // Non-default fields survive the round trip too.
        let odd = tiny()
            .n_inner(5)
            .activation(Gpt2Activation::Relu)
            .tie_word_embeddings(false)
            .attention_scaling(false, true);
        assert_eq!(Gpt2Config::from_json_str(&odd.to_json(), "x").unwrap(), odd);
        let swish = Gpt2Config::from_json_str(r#"{"activation_function": "swish"}"#, "x");
        assert_eq!(swish.unwrap().activation_function, Gpt2Activation::Silu);
    }

    #[test]
    fn config_errors_name_file_and_field() {
        let err = |json: &str| {
            Gpt2Config::from_json_str(json, "cfg.json")
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(r#"{"activation_function": "mish"}"#),
            "cfg.json: field `activation_function`: unsupported activation \"mish\" (supported: gelu_new, gelu_pytorch_tanh, gelu, relu, silu, swish, tanh, sigmoid)"
        );
        assert_eq!(
            err(r#"{"n_embd": 32, "n_head": 5}"#),
            "cfg.json: field `n_head`: 5 does not divide n_embd 32"
        );
        assert_eq!(
            err(r#"{"model_type": "bert"}"#),
            "cfg.json: field `model_type` is \"bert\", expected \"gpt2\""
        );
        assert!(err(r#"{"add_cross_attention": true}"#).contains("cross-attention"));
        assert_eq!(
            err(r#"{"n_ctx": 512}"#),
            "cfg.json: field `n_ctx`: is 512 but n_positions is 1024; they must agree"
        );
        assert_eq!(
            err(r#"{"vocab_size": 10, "bos_token_id": 3, "eos_token_id": 10}"#),
            "cfg.json: field `eos_token_id`: 10 is outside the vocabulary (vocab_size 10)"
        );
        assert_eq!(
            err(r#"{"attn_pdrop": 1.5}"#),
            "cfg.json: field `attn_pdrop`: must be in [0, 1], got 1.5"
        );
        assert_eq!(
            err(r#"{"n_layer": 0}"#),
            "cfg.json: field `n_layer`: must be positive, got 0"
        );
        assert!(err(r#"{"n_embd": "big"}"#).starts_with("cfg.json: field `n_embd`: invalid type"));
    }

    #[test]
    fn parameter_names_are_hf_names() {
        let m = GPT2LMHeadModel::new(&tiny(), &mut Rng::new(0));
        let names: Vec<(String, Vec<usize>)> = m
            .named_parameters()
            .into_iter()
            .map(|(n, p)| (n, p.dims().to_vec()))
            .collect();
        let block = |i: usize| -> Vec<(String, Vec<usize>)> {
            [
                ("ln_1.weight", vec![8]),
                ("ln_1.bias", vec![8]),
                ("attn.c_attn.weight", vec![24, 8]),
                ("attn.c_attn.bias", vec![24]),
                ("attn.c_proj.weight", vec![8, 8]),
                ("attn.c_proj.bias", vec![8]),
                ("ln_2.weight", vec![8]),
                ("ln_2.bias", vec![8]),
                ("mlp.c_fc.weight", vec![32, 8]),
                ("mlp.c_fc.bias", vec![32]),
                ("mlp.c_proj.weight", vec![8, 32]),
                ("mlp.c_proj.bias", vec![8]),
            ]
            .into_iter()
            .map(|(n, s)| (format!("transformer.h.{i}.{n}"), s))
            .collect()
        };
        let mut want = vec![
            ("transformer.wte.weight".to_string(), vec![11, 8]),
            ("transformer.wpe.weight".to_string(), vec![8, 8]),
        ];
        want.extend(block(0));
        want.extend(block(1));
        want.push(("transformer.ln_f.weight".to_string(), vec![8]));
        want.push(("transformer.ln_f.bias".to_string(), vec![8]));
        assert_eq!(names, want);
        // An untied head adds lm_head.weight (no bias); HF's init std for c_proj is smaller.
        let untied = GPT2LMHeadModel::new(&tiny().tie_word_embeddings(false), &mut Rng::new(0));
        let sd = untied.state_dict();
        assert_eq!(sd.get("lm_head.weight").unwrap().dims(), &[11, 8]);
        assert!(sd.get("lm_head.bias").is_none());
        assert_eq!(sd.len(), want.len() + 1);
        let big = GPT2LMHeadModel::new(&Gpt2Config::small(11, 64, 8, 2), &mut Rng::new(1));
        let std = |k: &str| {
            let v = big.state_dict().get(k).unwrap().to_f64_vec();
            (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
        };
        let (fc, proj) = (
            std("transformer.h.0.mlp.c_fc.weight"),
            std("transformer.h.0.mlp.c_proj.weight"),
        );
        assert!((fc - 0.02).abs() < 0.002, "{fc}");
        assert!((proj - 0.02 / 4.0).abs() < 0.0005, "{proj}");
    }

    /// GPT-2's forward in plain f64 loops over heads and positions, from the state dict.
    fn naive_logits(m: &GPT2LMHeadModel, tokens: &[usize]) -> Vec<f64> {
        let c = m.config();
        let sd = m.state_dict();
        let w = |k: &str| sd.get(k).unwrap_or_else(|| panic!("{k}")).to_f64_vec();
        let (e, h, l) = (c.n_embd, c.n_head, tokens.len());
        let d = e / h;
        let ln = |x: &[f64], wt: &[f64], b: &[f64]| -> Vec<f64> {
            x.chunks(e)
                .flat_map(|r| {
                    let mean = r.iter().sum::<f64>() / e as f64;
                    let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / e as f64;
                    let s = (var + c.layer_norm_epsilon).sqrt();
                    r.iter()
                        .enumerate()
                        .map(move |(i, v)| (v - mean) / s * wt[i] + b[i])
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        // x [l, in] · W[out, in]ᵀ + b.
        let lin = |x: &[f64], wt: &[f64], b: Option<&[f64]>, n_in: usize| -> Vec<f64> {
            let n_out = wt.len() / n_in;
            let mut y = vec![0.0; l * n_out];
            for i in 0..l {
                for o in 0..n_out {
                    let mut acc = b.map_or(0.0, |b| b[o]);
                    for k in 0..n_in {
                        acc += x[i * n_in + k] * wt[o * n_in + k];
                    }
                    y[i * n_out + o] = acc;
                }
            }
            y
        };
        let (wte, wpe) = (w("transformer.wte.weight"), w("transformer.wpe.weight"));
        let mut x: Vec<f64> = (0..l * e)
            .map(|k| wte[tokens[k / e] * e + k % e] + wpe[k])
            .collect();
        for layer in 0..c.n_layer {
            let p = |n: &str| w(&format!("transformer.h.{layer}.{n}"));
            let a = ln(&x, &p("ln_1.weight"), &p("ln_1.bias"));
            let qkv = lin(
                &a,
                &p("attn.c_attn.weight"),
                Some(&p("attn.c_attn.bias")),
                e,
            );
            let mut scale = if c.scale_attn_weights {
                1.0 / (d as f64).sqrt()
            } else {
                1.0
            };
            if c.scale_attn_by_inverse_layer_idx {
                scale /= (layer + 1) as f64;
            }
            let mut ctx = vec![0.0; l * e];
            for head in 0..h {
                for i in 0..l {
                    let q = |k: usize| qkv[i * 3 * e + head * d + k];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..d)
                                .map(|k| q(k) * qkv[j * 3 * e + e + head * d + k])
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let top = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - top).exp()).sum();
                    for (j, s) in scores.iter().enumerate() {
                        let pj = (s - top).exp() / z;
                        for k in 0..d {
                            ctx[i * e + head * d + k] += pj * qkv[j * 3 * e + 2 * e + head * d + k];
                        }
                    }
                }
            }
            let o = lin(
                &ctx,
                &p("attn.c_proj.weight"),
                Some(&p("attn.c_proj.bias")),
                e,
            );
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let a = ln(&x, &p("ln_2.weight"), &p("ln_2.bias"));
            let inner = c.inner_size();
            let f = lin(&a, &p("mlp.c_fc.weight"), Some(&p("mlp.c_fc.bias")), e);
            let f: Vec<f64> = f
                .iter()
                .map(|&v| match c.activation_function {
                    Gpt2Activation::Relu => v.max(0.0),
                    Gpt2Activation::GeluNew => {
                        0.5 * v
                            * (1.0
                                + ((2.0 / std::f64::consts::PI).sqrt()
                                    * (v + 0.044715 * v.powi(3)))
                                .tanh())
                    }
                    other => panic!("naive_logits: no reference for {other:?}"),
                })
                .collect();
            let o = lin(
                &f,
                &p("mlp.c_proj.weight"),
                Some(&p("mlp.c_proj.bias")),
                inner,
            );
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        }
        let x = ln(
            &x,
            &w("transformer.ln_f.weight"),
            &w("transformer.ln_f.bias"),
        );
        let head = if c.tie_word_embeddings {
            wte
        } else {
            w("lm_head.weight")
        };
        lin(&x, &head, None, e)
    }

    #[test]
    fn forward_matches_a_naive_per_head_reference_for_every_option() {
        let configs = [
            tiny(),
            tiny()
                .n_inner(12)
                .activation(Gpt2Activation::Relu)
                .tie_word_embeddings(false)
                .attention_scaling(false, true),
        ];
        for (ci, c) in configs.iter().enumerate() {
            let m = GPT2LMHeadModel::with_dtype(c, DType::F64, &mut Rng::new(7));
            // Larger weights than the init, so that attention is far from uniform.
            for (_, p) in m.named_parameters() {
                let t = Tensor::zeros(p.dims());
                init::normal_(&t, 0.0, 0.5, &mut Rng::new(ci as u64 + 11));
                p.tensor().assign(&t.to_dtype(DType::F64));
            }
            let tokens = [3usize, 9, 0, 10, 4, 4];
            let x = Tensor::from_vec(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, 6]);
            let got = m.forward(&x, None).to_f64_vec();
            let d = max_abs_diff(&got, &naive_logits(&m, &tokens));
            assert!(d < 1e-10, "config {ci}: max |Δ| {d}");
        }
    }

    #[test]
    fn later_tokens_do_not_change_earlier_logits_and_dropout_only_trains() {
        let m = GPT2LMHeadModel::new(&tiny().dropout(0.5), &mut Rng::new(2));
        m.eval();
        let a = m.forward(&ids(&[&[1, 2, 3, 4]]), None).to_vec::<f32>();
        let b = m.forward(&ids(&[&[1, 2, 3, 9]]), None).to_vec::<f32>();
        assert_eq!(a[..3 * 11], b[..3 * 11]);
        assert_ne!(a[3 * 11..], b[3 * 11..]);
        assert_eq!(a, m.forward(&ids(&[&[1, 2, 3, 4]]), None).to_vec::<f32>());
        m.train();
        let t = m.forward(&ids(&[&[1, 2, 3, 4]]), None).to_vec::<f32>();
        assert_ne!(a, t);
    }

    #[test]
    #[should_panic(
        expected = "Gpt2Model: input_ids must be an integer [batch, seq] tensor, got f32 [1, 3]"
    )]
    fn rejects_float_ids() {
        GPT2LMHeadModel::new(&tiny(), &mut Rng::new(0)).forward(&Tensor::zeros([1, 3]), None);
    }

    #[test]
    #[should_panic(
        expected = "Gpt2Model: attention_mask shape [1, 2] does not match input_ids [1, 3]"
    )]
    fn rejects_mask_of_other_shape() {
        let m = GPT2LMHeadModel::new(&tiny(), &mut Rng::new(0));
        m.forward(&ids(&[&[1, 2, 3]]), Some(&ids(&[&[1, 1]])));
    }

    #[test]
    #[should_panic(
        expected = "Gpt2Model: 6 cached + 3 new positions (input_ids [1, 3]) must be in 1..=8 (n_positions)"
    )]
    fn rejects_sequences_past_n_positions() {
        let m = GPT2LMHeadModel::new(&tiny(), &mut Rng::new(0));
        let mut cache = m.new_cache();
        m.forward_with_cache(&ids(&[&[1, 2, 3, 4, 5, 6]]), None, &mut cache);
        m.forward_with_cache(&ids(&[&[1, 2, 3]]), None, &mut cache);
    }

    #[test]
    #[should_panic(
        expected = "Gpt2Model: token id 11 in input_ids [1, 2] is outside the vocabulary (vocab_size 11)"
    )]
    fn rejects_ids_outside_the_vocabulary() {
        GPT2LMHeadModel::new(&tiny(), &mut Rng::new(0)).forward(&ids(&[&[1, 11]]), None);
    }

    #[test]
    #[should_panic(
        expected = "Gpt2Model: input_ids [1, 1] has batch 1 but the cache holds batch 2"
    )]
    fn rejects_a_cache_of_another_batch() {
        let m = GPT2LMHeadModel::new(&tiny(), &mut Rng::new(0));
        let mut cache = m.new_cache();
        m.forward_with_cache(&ids(&[&[1, 2], &[3, 4]]), None, &mut cache);
        assert_eq!((cache.len(), cache.batch_size()), (2, 2));
        assert_eq!(cache.layer(1).unwrap().0.dims(), &[2, 2, 2, 4]);
        m.forward_with_cache(&ids(&[&[1]]), None, &mut cache);
    }

    #[test]
    fn bare_and_old_checkpoints_load_and_misfits_are_precise_errors() {
        let src = GPT2LMHeadModel::new(&tiny(), &mut Rng::new(4));
        let hf = src.hf_state_dict().unwrap();
        assert_eq!(
            hf.get("transformer.h.0.attn.c_attn.weight").unwrap().dims(),
            &[8, 24]
        );
        let x = ids(&[&[1, 5, 7]]);
        let want = src.forward(&x, None).to_vec::<f32>();
        let save = |dir: &Path, sd: &StateDict| {
            std::fs::write(dir.join("config.json"), tiny().to_json()).unwrap();
            write_safetensors(sd, &dir.join("model.safetensors"));
        };
        // A bare GPT2Model checkpoint (no `transformer.`) with the old causal-mask buffers
        // and a tied lm_head.weight copy.
        let dir = temp_dir("bare");
        let mut old: StateDict = hf
            .iter()
            .map(|(k, t)| {
                (
                    k.strip_prefix("transformer.").unwrap().to_string(),
                    t.clone(),
                )
            })
            .collect();
        old.insert("h.0.attn.bias", Tensor::ones([1, 1, 8, 8]));
        old.insert("h.0.attn.masked_bias", Tensor::full([1], -1e4f32));
        old.insert(
            "lm_head.weight",
            hf.get("transformer.wte.weight").unwrap().clone(),
        );
        save(&dir, &old);
        let m = GPT2LMHeadModel::from_pretrained(&dir).unwrap();
        assert_eq!(m.forward(&x, None).to_vec::<f32>(), want);
        assert!(m.tokenizer_files().is_none());
        // Missing, unexpected and mis-shaped tensors.
        let mut missing = hf.clone();
        missing = missing
            .iter()
            .filter(|(k, _)| *k != "transformer.h.1.mlp.c_fc.bias")
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect();
        save(&dir, &missing);
        let e = GPT2LMHeadModel::from_pretrained(&dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checkpoint does not fit GPT2LMHeadModel: 1 tensors missing: transformer.h.1.mlp.c_fc.bias"),
            "{e}"
        );
        let mut extra = hf.clone();
        extra.insert("transformer.h.0.attn.q_attn.weight", Tensor::zeros([8, 8]));
        save(&dir, &extra);
        let e = GPT2LMHeadModel::from_pretrained(&dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1 unexpected tensors: transformer.h.0.attn.q_attn.weight"),
            "{e}"
        );
        let mut wrong = hf.clone();
        wrong.insert("transformer.wpe.weight", Tensor::zeros([9, 8]));
        save(&dir, &wrong);
        let e = GPT2LMHeadModel::from_pretrained(&dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("transformer.wpe.weight") && e.contains("[9, 8]"),
            "{e}"
        );
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        let e = GPT2LMHeadModel::from_pretrained(&dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.safetensors: file not found"), "{e}");
        std::fs::remove_file(dir.join("config.json")).unwrap();
        let e = GPT2LMHeadModel::from_pretrained(&dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json: file not found"), "{e}");
        let e = src
            .save_pretrained_with_tokenizer(dir.join("out"), &dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file not found (a tokenizer"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn untied_models_save_and_load_their_head_and_tokenizer_dirs_are_copied() {
        let c = tiny().tie_word_embeddings(false);
        let src = GPT2LMHeadModel::new(&c, &mut Rng::new(5));
        let tok = temp_dir("tok");
        std::fs::write(tok.join("encoder.json"), "{\"a\": 0}").unwrap();
        std::fs::write(tok.join("vocab.bpe"), "#version: 0.2\n").unwrap();
        std::fs::write(tok.join("tokenizer_config.json"), "{}").unwrap();
        let dir = temp_dir("untied");
        src.save_pretrained_with_tokenizer(&dir, &tok).unwrap();
        for f in [
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "config.json",
        ] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        let back = GPT2LMHeadModel::from_pretrained(&dir).unwrap();
        assert!(back.lm_head.is_some());
        let (v, m) = back.tokenizer_files().unwrap();
        assert_eq!(
            (v, m),
            (
                dir.join("vocab.json").as_path(),
                dir.join("merges.txt").as_path()
            )
        );
        let x = ids(&[&[2, 3, 4]]);
        assert_eq!(
            back.forward(&x, None).to_vec::<f32>(),
            src.forward(&x, None).to_vec::<f32>()
        );
        // Saving into the directory it was loaded from keeps its tokenizer files.
        back.save_pretrained(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("vocab.json")).unwrap(),
            "{\"a\": 0}"
        );
        std::fs::remove_dir_all(&dir).ok();
        std::fs::remove_dir_all(&tok).ok();
    }

    /// Logits of a left-padded batch, fed as a prefix then one token, through the cache.
    #[derive(Module)]
    struct Probe {
        model: GPT2LMHeadModel,
        #[module(skip)]
        prefix: Tensor,
        #[module(skip)]
        mask: Tensor,
        #[module(skip)]
        next: Tensor,
    }

    impl Forward for Probe {
        fn forward(&self, _x: &Tensor) -> Tensor {
            let mut cache = self.model.new_cache();
            let a = self
                .model
                .forward_with_cache(&self.prefix, Some(&self.mask), &mut cache);
            let b = self.model.forward_with_cache(&self.next, None, &mut cache);
            Tensor::cat(
                &[a.reshape([a.elem_count()]), b.reshape([b.elem_count()])],
                0,
            )
        }
    }

    #[test]
    fn gradients_match_finite_differences_f64_through_mask_and_cache() {
        let configs = [
            Gpt2Config::small(7, 4, 1, 2).n_positions(4),
            Gpt2Config::small(7, 4, 2, 2)
                .n_positions(4)
                .n_inner(6)
                .tie_word_embeddings(false)
                .attention_scaling(false, true),
        ];
        for c in &configs {
            let model = GPT2LMHeadModel::with_dtype(c, DType::F64, &mut Rng::new(9));
            model.eval();
            let probe = Probe {
                model,
                prefix: ids(&[&[0, 2, 5], &[3, 1, 6]]),
                mask: ids(&[&[0, 1, 1], &[1, 1, 1]]),
                next: ids(&[&[4], &[2]]),
            };
            gradcheck_module(&probe, &Tensor::zeros_dtype([1], DType::F64)).unwrap();
        }
    }
}
