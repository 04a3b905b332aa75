//! Llama-family decoders (Llama 2/3, SmolLM2, ...): grouped-query attention, rotary position
//! embeddings (with linear and Llama-3 scaling), RMSNorm, SwiGLU, tied or separate output
//! embeddings, and a KV cache. Parameter names are Hugging Face's (`model.layers.0.self_attn.
//! q_proj.weight`, ...), so a safetensors checkpoint loads by name; a GGUF file (llama.cpp
//! layout) loads through [`LlamaForCausalLM::from_gguf`], either dequantised to f32 (trainable)
//! or kept block-quantised (`Q4_0`/`Q4_1`/`Q8_0` matrices multiplied in their blocks).

use crate::checkpoint::load_safetensors;
use crate::config::HfConfig;
use crate::error::ModelError;
use crate::generation::CausalLm;
use crate::gguf_tokenizer::tokenizer_from_gguf;
use kiln_core::{DType, QMatrix, QType, Rng, Tensor};
use kiln_data::{ChatTemplate, Tokenizer};
use kiln_io::{GgmlType, GgufFile};
use kiln_nn::layers::scaled_dot_product_attention;
use kiln_nn::{Embedding, Forward, Linear, Module, RmsNorm, StateDict, Visitor};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Arc;

/// Rotary-embedding frequency scaling (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3's band-wise scaling of the inverse frequencies.
    Llama3 {
        /// Scale of the low-frequency band.
        factor: f64,
        /// Wavelength band limits, as in HF.
        low_freq_factor: f64,
        /// Wavelength band limits, as in HF.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: usize,
    },
}

/// The shape of a Llama model (Hugging Face `LlamaConfig` names).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU hidden layer.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// The output projection is the token embedding.
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// The config stored in a GGUF file's `llama.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<LlamaConfig, ModelError> {
        let io = |e: kiln_io::IoError| ModelError::Io {
            path: file.path().to_path_buf(),
            message: e.to_string(),
        };
        let arch = file.get_str("general.architecture").map_err(io)?;
        if arch != "llama" {
            return Err(ModelError::WrongModelType {
                origin: file.path().display().to_string(),
                found: arch.to_string(),
                expected: "llama",
            });
        }
        let u = |k: &str| {
            file.get_u32(&format!("llama.{k}"))
                .map(|v| v as usize)
                .map_err(io)
        };
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = match file.metadata("llama.attention.head_count_kv") {
            Some(_) => u("attention.head_count_kv")?,
            None => heads,
        };
        let vocab = match file.metadata("llama.vocab_size") {
            Some(_) => u("vocab_size")?,
            None => file
                .get_str_array("tokenizer.ggml.tokens")
                .map_err(io)?
                .len(),
        };
        let head_dim = match file.metadata("llama.rope.dimension_count") {
            Some(_) => u("rope.dimension_count")?,
            None => hidden / heads.max(1),
        };
        let rope_theta = match file.metadata("llama.rope.freq_base") {
            Some(_) => file.get_f32("llama.rope.freq_base").map_err(io)? as f64,
            None => 10_000.0,
        };
        let rope_scaling = match file.metadata("llama.rope.scaling.type") {
            Some(_) if file.get_str("llama.rope.scaling.type").map_err(io)? == "linear" => {
                Some(RopeScaling::Linear {
                    factor: file.get_f32("llama.rope.scaling.factor").map_err(io)? as f64,
                })
            }
            _ => None,
        };
        let config = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: file
                .get_f32("llama.attention.layer_norm_rms_epsilon")
                .map_err(io)? as f64,
            rope_theta,
            rope_scaling,
            max_position_embeddings: u("context_length")?,
            tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        };
        config.validate(&file.path().display().to_string())?;
        Ok(config)
    }

    /// The config of a Hugging Face `config.json` (`model_type` "llama" or absent); absent
    /// optional fields take `LlamaConfig`'s defaults in transformers. `rope_scaling` of type
    /// "linear" and "llama3" are understood, "default" / null mean none; others are an error.
    pub fn from_hf(c: &HfConfig) -> Result<LlamaConfig, ModelError> {
        c.expect_model_type("llama")?;
        let hidden: usize = c.require("hidden_size")?;
        let heads: usize = c.require("num_attention_heads")?;
        let kv: usize = c.get_or("num_key_value_heads", heads)?;
        let head_dim = c.get_or("head_dim", hidden / heads.max(1))?;
        // transformers 5 keeps theta and scaling in `rope_parameters`; older files at the top.
        let rope: Option<Map<String, Value>> = match c.opt("rope_parameters")? {
            Some(p) => Some(p),
            None => c.opt("rope_scaling")?,
        };
        let rope_field = if c.map().contains_key("rope_parameters") {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        let num = |m: &Map<String, Value>, key: &str| -> Result<f64, ModelError> {
            m.get(key).and_then(Value::as_f64).ok_or_else(|| {
                c.field_error(rope_field, format!("`{key}` is missing or not a number"))
            })
        };
        let mut rope_theta: f64 = c.get_or("rope_theta", 10_000.0)?;
        let mut rope_scaling = None;
        if let Some(m) = &rope {
            if let Some(t) = m.get("rope_theta").and_then(Value::as_f64) {
                rope_theta = t;
            }
            let kind = m
                .get("rope_type")
                .or_else(|| m.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            rope_scaling = match kind {
                "default" => None,
                "linear" => Some(RopeScaling::Linear {
                    factor: num(m, "factor")?,
                }),
                "llama3" => Some(RopeScaling::Llama3 {
                    factor: num(m, "factor")?,
                    low_freq_factor: num(m, "low_freq_factor")?,
                    high_freq_factor: num(m, "high_freq_factor")?,
                    original_max_position_embeddings: num(m, "original_max_position_embeddings")?
                        as usize,
                }),
                other => {
                    return Err(c.field_error(
                        rope_field,
                        format!(
                            "rope type \"{other}\" is not supported (\"default\", \"linear\", \"llama3\")"
                        ),
                    ))
                }
            };
        }
        for (field, value) in [("attention_bias", true), ("mlp_bias", true)] {
            if c.get_or(field, false)? == value {
                return Err(c.field_error(field, "biases are not supported"));
            }
        }
        let act: String = c.get_or("hidden_act", "silu".to_string())?;
        if act != "silu" {
            return Err(c.field_error(
                "hidden_act",
                format!("\"{act}\" is not supported (\"silu\")"),
            ));
        }
        let config = LlamaConfig {
            vocab_size: c.require("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: c.require("intermediate_size")?,
            num_hidden_layers: c.require("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: c.get_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.get_or("max_position_embeddings", 2048)?,
            tie_word_embeddings: c.get_or("tie_word_embeddings", false)?,
        };
        config.validate(c.origin())?;
        Ok(config)
    }

    /// The `config.json` object transformers writes for `LlamaForCausalLM` (f32 weights; the
    /// special token ids are given because the config does not hold them).
    pub fn to_json_value(
        &self,
        bos_token_id: Option<u32>,
        eos_token_id: Option<u32>,
        pad_token_id: Option<u32>,
    ) -> Value {
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "pretraining_tp": 1,
            "initializer_range": 0.02,
            "use_cache": true,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "torch_dtype": "float32",
        })
    }

    fn validate(&self, origin: &str) -> Result<(), ModelError> {
        let bad = |field: &str, message: String| ModelError::ConfigField {
            origin: origin.to_string(),
            field: field.to_string(),
            message,
        };
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} key/value heads do not divide {} query heads",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("{} is not a positive even number", self.head_dim),
            ));
        }
        Ok(())
    }

    /// RoPE inverse frequencies `[head_dim / 2]`, with the configured scaling.
    fn inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// How block-quantised projections take their products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantActivations {
    /// f32 activations: equal to the dequantised model up to rounding.
    #[default]
    F32,
    /// Activations quantised to 8 bits per block too (llama.cpp's way): faster.
    Q8,
}

/// A projection `x · Wᵀ`: trainable dense weights, or frozen block-quantised ones.
#[derive(Debug, Clone)]
pub enum Proj {
    /// A `Linear` layer (its `weight` is a parameter).
    Dense(Linear),
    /// A quantised matrix; not a parameter (frozen).
    Quant(QMatrix, QuantActivations),
}

impl Module for Proj {
    fn visit(&self, visitor: &mut Visitor) {
        if let Proj::Dense(l) = self {
            l.visit(visitor);
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Proj::Dense(_) => "Linear",
            Proj::Quant(..) => "QLinear",
        }
    }
}

impl Forward for Proj {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Proj::Dense(l) => l.forward(x),
            Proj::Quant(q, QuantActivations::F32) => x.qmatmul(q),
            Proj::Quant(q, QuantActivations::Q8) => x.qmatmul_q8(q),
        }
    }
}

/// The token embedding: a dense `Embedding`, or a quantised table read row by row.
#[derive(Debug, Clone)]
pub enum TokenEmbedding {
    /// Trainable table `weight` `[vocab, hidden]`.
    Dense(Embedding),
    /// Frozen quantised table.
    Quant(QMatrix, QuantActivations),
}

impl Module for TokenEmbedding {
    fn visit(&self, visitor: &mut Visitor) {
        if let TokenEmbedding::Dense(e) = self {
            e.visit(visitor);
        }
    }
}

impl TokenEmbedding {
    fn lookup(&self, ids: &Tensor) -> Tensor {
        match self {
            TokenEmbedding::Dense(e) => e.forward(ids),
            TokenEmbedding::Quant(q, _) => {
                let flat: Vec<usize> = ids.to_vec::<i64>().iter().map(|&i| i as usize).collect();
                let mut dims = ids.dims().to_vec();
                dims.push(q.dims().1);
                q.gather_rows(&flat).reshape(dims)
            }
        }
    }

    /// `h · Eᵀ`: logits through the tied table.
    fn project(&self, h: &Tensor) -> Tensor {
        match self {
            TokenEmbedding::Dense(e) => h.matmul(&e.weight.t()),
            TokenEmbedding::Quant(q, QuantActivations::F32) => h.qmatmul(q),
            TokenEmbedding::Quant(q, QuantActivations::Q8) => h.qmatmul_q8(q),
        }
    }
}

/// Self-attention with grouped key/value heads.
#[derive(Module, Debug, Clone)]
pub struct LlamaAttention {
    /// `[heads·head_dim, hidden]`.
    pub q_proj: Proj,
    /// `[kv_heads·head_dim, hidden]`.
    pub k_proj: Proj,
    /// `[kv_heads·head_dim, hidden]`.
    pub v_proj: Proj,
    /// `[hidden, heads·head_dim]`.
    pub o_proj: Proj,
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug, Clone)]
pub struct LlamaMlp {
    /// `[intermediate, hidden]`.
    pub gate_proj: Proj,
    /// `[intermediate, hidden]`.
    pub up_proj: Proj,
    /// `[hidden, intermediate]`.
    pub down_proj: Proj,
}

/// One pre-norm decoder layer.
#[derive(Module, Debug, Clone)]
pub struct LlamaDecoderLayer {
    /// Attention.
    pub self_attn: LlamaAttention,
    /// Feed-forward.
    pub mlp: LlamaMlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the feed-forward block.
    pub post_attention_layernorm: RmsNorm,
}

/// The decoder stack without the output head.
#[derive(Module, Debug, Clone)]
pub struct LlamaModel {
    /// Token embedding.
    pub embed_tokens: TokenEmbedding,
    /// Decoder layers.
    pub layers: Vec<LlamaDecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
}

/// Keys and values of the positions seen so far, per layer, in preallocated storage
/// `[batch, kv_heads, capacity, head_dim]` written in place (the capacity doubles when full).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

/// One layer's keys and values; positions `0..len` of the capacity axis are valid.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl Clone for KvCache {
    /// A deep copy: the copies then grow independently.
    fn clone(&self) -> KvCache {
        let copy = |t: &Tensor| Tensor::from_storage(t.storage().clone(), t.layout().clone());
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| LayerKv {
                    k: copy(&l.k),
                    v: copy(&l.v),
                })
                .collect(),
            len: self.len,
        }
    }
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops everything cached (the storage is kept for reuse).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Makes room for `extra` more positions of `layers` layers of `[batch, kv, _, hd]`,
    /// doubling the capacity as often as needed and keeping what is cached.
    fn reserve(&mut self, layers: usize, [batch, kv, hd]: [usize; 3], extra: usize, dtype: DType) {
        let need = self.len + extra;
        let fits = self.layers.len() == layers
            && self.layers.first().is_none_or(|l| {
                l.k.dims()[..2] == [batch, kv] && l.k.dim(3) == hd && l.k.dtype() == dtype
            });
        if !fits {
            assert!(
                self.len == 0,
                "KvCache: {} cached positions of shape {:?} cannot take a batch of {batch} × {kv} heads × {hd} ({dtype}); clear() it first",
                self.len,
                self.layers.first().map(|l| l.k.dims().to_vec())
            );
            self.layers.clear();
        }
        let cap = self.layers.first().map_or(0, |l| l.k.dim(2));
        if !self.layers.is_empty() && need <= cap {
            return;
        }
        let mut new_cap = cap.max(16);
        while new_cap < need {
            new_cap *= 2;
        }
        let len = self.len;
        let grow = |old: Option<&Tensor>| -> Tensor {
            let t = Tensor::zeros_dtype([batch, kv, new_cap, hd], dtype);
            if let Some(old) = old.filter(|_| len > 0) {
                t.narrow(2, 0, len).assign(&old.narrow(2, 0, len));
            }
            t
        };
        if self.layers.is_empty() {
            self.layers = (0..layers)
                .map(|_| LayerKv {
                    k: grow(None),
                    v: grow(None),
                })
                .collect();
        } else {
            for l in &mut self.layers {
                l.k = grow(Some(&l.k));
                l.v = grow(Some(&l.v));
            }
        }
    }
}

impl LayerKv {
    /// Writes `k`, `v` `[batch, kv, l, hd]` (any layout) at positions `at..at + l`.
    fn write(&self, at: usize, k: &Tensor, v: &Tensor) {
        for (dst, src) in [(&self.k, k), (&self.v, v)] {
            dst.narrow(2, at, src.dim(2)).assign(&src.detach());
        }
    }
}

/// The tokenizer that travels with a Llama model: from the GGUF file, or from the
/// `tokenizer.json` / `tokenizer_config.json` of a pretrained directory.
#[derive(Debug, Clone)]
pub struct LlamaTokenizer {
    /// The tokenizer (its special token ids are the model's BOS / EOS / PAD).
    pub tokenizer: Tokenizer,
    /// The chat template's Jinja source, when the model has one.
    pub chat_template: Option<String>,
}

impl LlamaTokenizer {
    /// The compiled chat template, with the tokenizer's special tokens defined.
    pub fn template(&self) -> Result<Option<ChatTemplate>, ModelError> {
        self.chat_template
            .as_deref()
            .map(|src| {
                ChatTemplate::new(src)
                    .map(|t| t.with_tokenizer_tokens(&self.tokenizer))
                    .map_err(|e| ModelError::ConfigField {
                        origin: self.tokenizer.origin().to_string(),
                        field: "chat_template".into(),
                        message: e.to_string(),
                    })
            })
            .transpose()
    }
}

/// A Llama decoder with its language-model head.
#[derive(Module, Debug, Clone)]
pub struct LlamaForCausalLM {
    /// The decoder.
    pub model: LlamaModel,
    /// The output projection, absent when tied to the token embedding.
    pub lm_head: Option<Proj>,
    /// The shape.
    #[module(skip)]
    pub config: LlamaConfig,
    /// The tokenizer loaded with the model (GGUF files with a byte-level BPE tokenizer,
    /// directories with a `tokenizer.json`); [`LlamaForCausalLM::save_pretrained`] writes it.
    #[module(skip)]
    pub tokenizer: Option<LlamaTokenizer>,
    #[module(skip)]
    inv_freq: Vec<f64>,
}

/// `rotate_half` RoPE on `x [b, heads, len, head_dim]` with `cos`/`sin` `[len, head_dim]`
/// (differentiable).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.dim(-1) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    let rotated = Tensor::cat(&[x2.neg(), x1], -1);
    x.mul(cos).add(&rotated.mul(sin))
}

/// The RoPE angles of some positions: `cos`/`sin` `[positions, head_dim / 2]` (f64).
struct RopeTable {
    cos: Vec<f64>,
    sin: Vec<f64>,
    half: usize,
    /// One position per sequence of a batch (decoding several sequences), instead of one per
    /// step along the sequence axis shared by the whole batch.
    per_sequence: bool,
}

impl RopeTable {
    /// Positions `start..start + len`, shared by every sequence of a batch.
    fn new(inv_freq: &[f64], head_dim: usize, start: usize, len: usize) -> RopeTable {
        Self::at(inv_freq, head_dim, start..start + len, false)
    }

    /// One position per sequence, for inputs `[b, 1, ..]` of `b` sequences.
    fn per_sequence(inv_freq: &[f64], head_dim: usize, positions: &[usize]) -> RopeTable {
        Self::at(inv_freq, head_dim, positions.iter().copied(), true)
    }

    fn at(
        inv_freq: &[f64],
        head_dim: usize,
        positions: impl ExactSizeIterator<Item = usize>,
        per_sequence: bool,
    ) -> RopeTable {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for &f in &inv_freq[..half] {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTable {
            cos,
            sin,
            half,
            per_sequence,
        }
    }

    /// `cos`/`sin` `[len, head_dim]` (each half repeated) in `dtype`, for [`apply_rope`].
    fn tensors(&self, dtype: DType) -> (Tensor, Tensor) {
        debug_assert!(
            !self.per_sequence,
            "per-sequence positions are for decoding only"
        );
        let len = self.cos.len() / self.half.max(1);
        let full = |t: &[f64]| {
            let v: Vec<f64> = t
                .chunks_exact(self.half)
                .flat_map(|r| r.iter().chain(r).copied())
                .collect();
            Tensor::from_vec(v, [len, 2 * self.half]).to_dtype(dtype)
        };
        (full(&self.cos), full(&self.sin))
    }

    /// RoPE on `x [b, len, heads·head_dim]` in one pass, without temporaries (records no
    /// graph: for inputs that do not track gradients). Rounds as [`apply_rope`] does.
    fn apply(&self, x: &Tensor) -> Tensor {
        let (b, l, width) = (x.dim(0), x.dim(1), x.dim(2));
        let hd = 2 * self.half;
        let x = x.contiguous();
        let storage = kiln_core::dispatch_float!(x.dtype(), "rope", |T| {
            let s = x.storage();
            let src = &<T as kiln_core::Element>::slice(&s).expect("float")
                [x.layout().contiguous_range().expect("contiguous")];
            let mut out = kiln_core::alloc::Buffer::<T>::uninit(b * l * width);
            for (r, (o, xr)) in out
                .chunks_exact_mut(width)
                .zip(src.chunks_exact(width))
                .enumerate()
            {
                let pos = if self.per_sequence { r } else { r % l };
                let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
                let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
                for (oh, xh) in o.chunks_exact_mut(hd).zip(xr.chunks_exact(hd)) {
                    let (x1, x2) = xh.split_at(self.half);
                    let (o1, o2) = oh.split_at_mut(self.half);
                    for i in 0..self.half {
                        let (c, sn) = (cos[i] as T, sin[i] as T);
                        o1[i] = x1[i] * c + (-x2[i]) * sn;
                        o2[i] = x2[i] * c + x1[i] * sn;
                    }
                }
            }
            <T as kiln_core::Element>::into_storage(out)
        });
        Tensor::from_storage(
            storage,
            kiln_core::Layout::contiguous(kiln_core::Shape::from([b, l, width])),
        )
    }
}

/// The products of `x` with several projections: one pass over the activations (and one
/// thread dispatch for a single row) when all are quantised the same way.
fn project_many<const N: usize>(projs: [&Proj; N], x: &Tensor) -> [Tensor; N] {
    let quant: Option<(Vec<&QMatrix>, QuantActivations)> = projs
        .iter()
        .try_fold(
            (Vec::with_capacity(N), None::<QuantActivations>),
            |(mut ws, act), p| match p {
                Proj::Quant(q, a) if act.is_none_or(|b| b == *a) => {
                    ws.push(q);
                    Some((ws, Some(*a)))
                }
                _ => None,
            },
        )
        .and_then(|(ws, act)| act.map(|a| (ws, a)));
    match quant {
        Some((ws, act)) => x
            .qmatmul_many(&ws, act == QuantActivations::Q8)
            .try_into()
            .expect("one product per projection"),
        None => projs.map(|p| p.forward(x)),
    }
}

impl LlamaAttention {
    /// Attention over `x [b, l, hidden]` at positions `past..past + l`, where `cache` (when
    /// given) holds positions `0..past` and receives the new keys and values.
    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTable,
        config: &LlamaConfig,
        cache: Option<(&LayerKv, usize)>,
    ) -> Tensor {
        let (b, l) = (x.dim(0), x.dim(1));
        let (h, kv, hd) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        let [q, k, v] = project_many([&self.q_proj, &self.k_proj, &self.v_proj], x);
        let track = q.tracks_grad() || k.tracks_grad() || v.tracks_grad();
        let heads = |t: &Tensor, n: usize| t.reshape([b, l, n, hd]).transpose(1, 2);
        let (q_rows, q, k) = if track {
            let (cos, sin) = rope.tensors(q.dtype());
            let q = apply_rope(&heads(&q, h), &cos, &sin);
            (None, q, apply_rope(&heads(&k, kv), &cos, &sin))
        } else {
            let q = rope.apply(&q);
            (Some(q.clone()), heads(&q, h), heads(&rope.apply(&k), kv))
        };
        let v = heads(&v, kv);
        let (k, v, past) = match cache {
            Some((slot, past)) => {
                slot.write(past, &k, &v);
                let s = past + l;
                if let (Some(q_rows), 1) = (&q_rows, l) {
                    // One new position: the fused kernel reads the cache where it lies.
                    let out = q_rows.decode_attention(&slot.k, &slot.v, s);
                    return self.o_proj.forward(&out);
                }
                let (pk, pv) = (slot.k.narrow(2, 0, s), slot.v.narrow(2, 0, s));
                if track && past > 0 {
                    // Gradients reach the new keys and values, not the cached ones.
                    let old = |t: &Tensor| t.narrow(2, 0, past).contiguous_copy();
                    (
                        Tensor::cat(&[old(&pk), k], 2),
                        Tensor::cat(&[old(&pv), v], 2),
                        past,
                    )
                } else if track {
                    (k, v, past)
                } else {
                    (pk, pv, past)
                }
            }
            None => (k, v, 0),
        };
        let s = k.dim(2);
        // Grouped heads: q [b, kv, h/kv, l, hd] against k, v [b, kv, 1, s, hd].
        let g = h / kv;
        let q = q.reshape([b, kv, g, l, hd]);
        let (k, v) = (k.unsqueeze(2), v.unsqueeze(2));
        let mut rng = Rng::new(0);
        let out = if past == 0 {
            scaled_dot_product_attention(&q, &k, &v, None, l > 1, 0.0, false, &mut rng)
        } else if l == 1 {
            scaled_dot_product_attention(&q, &k, &v, None, false, 0.0, false, &mut rng)
        } else {
            // New positions past..past+l attend to keys 0..=past+i.
            let mask: Vec<f32> = (0..l)
                .flat_map(|i| {
                    (0..s).map(move |j| {
                        if j <= past + i {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, [l, s]).to_dtype(q.dtype());
            scaled_dot_product_attention(&q, &k, &v, Some(&mask), false, 0.0, false, &mut rng)
        };
        let out = out
            .reshape([b, h, l, hd])
            .transpose(1, 2)
            .reshape([b, l, h * hd]);
        self.o_proj.forward(&out)
    }
}

impl LlamaAttention {
    /// One new position of each of `b` sequences, `x [b, 1, hidden]`: sequence `i` is at
    /// position `past[i]`, attends over its own cache `slots[i]` and writes its key and value
    /// there. The projections take all the sequences at once. Records no graph.
    fn decode_many(
        &self,
        x: &Tensor,
        rope: &RopeTable,
        config: &LlamaConfig,
        slots: &[&LayerKv],
        past: &[usize],
    ) -> Tensor {
        let b = x.dim(0);
        let (kv, hd) = (config.num_key_value_heads, config.head_dim);
        let [q, k, v] = project_many([&self.q_proj, &self.k_proj, &self.v_proj], x);
        let (q, k) = (rope.apply(&q), rope.apply(&k));
        let heads = |t: &Tensor| t.reshape([b, 1, kv, hd]).transpose(1, 2);
        let (k, v) = (heads(&k), heads(&v));
        let outs: Vec<Tensor> = (0..b)
            .map(|i| {
                let slot = slots[i];
                slot.write(past[i], &k.narrow(0, i, 1), &v.narrow(0, i, 1));
                q.narrow(0, i, 1)
                    .decode_attention(&slot.k, &slot.v, past[i] + 1)
            })
            .collect();
        self.o_proj.forward(&Tensor::cat(&outs, 0))
    }
}

impl LlamaMlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let [gate, up] = project_many([&self.gate_proj, &self.up_proj], x);
        self.down_proj.forward(&gate.silu().mul(&up))
    }
}

impl LlamaForCausalLM {
    /// Logits `[batch, len, vocab]` for token ids `[batch, len]` (I64), continuing the positions
    /// in `cache` (and appending the new keys and values to it) when one is given.
    pub fn forward_with_cache(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        let h = self.hidden_states(ids, cache);
        self.head(&h)
    }

    /// The output projection of final hidden states `[.., hidden]`.
    fn head(&self, h: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => self.model.embed_tokens.project(h),
        }
    }

    /// The normed last hidden states `[batch, len, hidden]` (see `forward_with_cache`).
    fn hidden_states(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Tensor {
        assert!(
            ids.rank() == 2,
            "LlamaForCausalLM: token ids must be [batch, len], got {}",
            ids.shape()
        );
        let (b, l) = (ids.dim(0), ids.dim(1));
        let config = &self.config;
        let dtype = self.dtype();
        if let Some(c) = cache.as_deref_mut() {
            c.reserve(
                config.num_hidden_layers,
                [b, config.num_key_value_heads, config.head_dim],
                l,
                dtype,
            );
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        let rope = RopeTable::new(&self.inv_freq, config.head_dim, past, l);
        let mut h = self.model.embed_tokens.lookup(ids).to_dtype(dtype);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let slot = cache.as_deref().map(|c| (&c.layers[i], past));
            let a =
                layer
                    .self_attn
                    .forward(&layer.input_layernorm.forward(&h), &rope, config, slot);
            h = h.add(&a);
            h = h.add(
                &layer
                    .mlp
                    .forward(&layer.post_attention_layernorm.forward(&h)),
            );
        }
        if let Some(c) = cache {
            c.len = past + l;
        }
        self.model.norm.forward(&h)
    }

    /// The normed hidden states `[n, 1, hidden]` of one new token for each of `n` sequences,
    /// `ids[i]` continuing `caches[i]` (each a batch of one).
    fn decode_hidden_many(&self, ids: &[u32], caches: &mut [&mut KvCache]) -> Tensor {
        assert_eq!(
            ids.len(),
            caches.len(),
            "LlamaForCausalLM: one token per cache"
        );
        let config = &self.config;
        let dtype = self.dtype();
        for c in caches.iter_mut() {
            c.reserve(
                config.num_hidden_layers,
                [1, config.num_key_value_heads, config.head_dim],
                1,
                dtype,
            );
        }
        let past: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let rope = RopeTable::per_sequence(&self.inv_freq, config.head_dim, &past);
        let ids = Tensor::from_vec(ids.iter().map(|&i| i as i64).collect(), [ids.len(), 1]);
        let mut h = self.model.embed_tokens.lookup(&ids).to_dtype(dtype);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let slots: Vec<&LayerKv> = caches.iter().map(|c| &c.layers[i]).collect();
            let x = layer.input_layernorm.forward(&h);
            h = h.add(
                &layer
                    .self_attn
                    .decode_many(&x, &rope, config, &slots, &past),
            );
            h = h.add(
                &layer
                    .mlp
                    .forward(&layer.post_attention_layernorm.forward(&h)),
            );
        }
        for (c, p) in caches.iter_mut().zip(past) {
            c.len = p + 1;
        }
        self.model.norm.forward(&h)
    }

    /// The float dtype of the activations (that of the norms' weights).
    fn dtype(&self) -> DType {
        self.model
            .norm
            .weight
            .as_ref()
            .map_or(DType::F32, |w| w.dtype())
    }

    /// Loads a llama-architecture GGUF file. With `quantized`, block-quantised matrices
    /// (`Q4_0`, `Q4_1`, `Q8_0`) stay quantised and are multiplied in their blocks (frozen);
    /// every other tensor, and all of them without `quantized`, is dequantised to f32.
    pub fn from_gguf(
        path: impl AsRef<Path>,
        quantized: Option<QuantActivations>,
    ) -> Result<LlamaForCausalLM, ModelError> {
        let path = path.as_ref();
        let file = GgufFile::open(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let config = LlamaConfig::from_gguf(&file)?;
        let io = |e: kiln_io::IoError| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let (h, kv) = (config.num_attention_heads, config.num_key_value_heads);
        // llama.cpp stores the q/k rows of each head interleaved for its RoPE; HF's layout
        // has the two halves apart: row (head, t, j) of HF is row (head, j, t) of GGUF.
        let unpermute = |heads: usize, rows: usize| -> Vec<usize> {
            let half = rows / heads / 2;
            let mut order = Vec::with_capacity(rows);
            for hh in 0..heads {
                for t in 0..2 {
                    for j in 0..half {
                        order.push(hh * 2 * half + j * 2 + t);
                    }
                }
            }
            order
        };
        let expect_shape = |name: &str, want: [usize; 2]| -> Result<(), ModelError> {
            let info = file
                .tensor_info(name)
                .ok_or_else(|| ModelError::Checkpoint {
                    path: path.to_path_buf(),
                    model: "LlamaForCausalLM",
                    message: format!("tensor `{name}` is missing"),
                })?;
            if info.shape() != want {
                return Err(ModelError::Checkpoint {
                    path: path.to_path_buf(),
                    model: "LlamaForCausalLM",
                    message: format!(
                        "tensor `{name}` has shape {:?}, expected {want:?}",
                        info.shape()
                    ),
                });
            }
            Ok(())
        };
        let quant_of = |ty: GgmlType| match ty {
            GgmlType::Q4_0 => Some(QType::Q4_0),
            GgmlType::Q4_1 => Some(QType::Q4_1),
            GgmlType::Q8_0 => Some(QType::Q8_0),
            _ => None,
        };
        // Matrices for 8-bit products, prepared once the file is unmapped (lower peak memory).
        let to_prepare = std::cell::RefCell::new(Vec::new());
        // A matrix, quantised when asked and possible, rows reordered by `order`.
        let matrix = |name: &str,
                      shape: [usize; 2],
                      order: Option<Vec<usize>>|
         -> Result<Result<QMatrix, Tensor>, ModelError> {
            expect_shape(name, shape)?;
            let (ty, bytes, _) = file.raw(name).map_err(io)?;
            if let (Some(_), Some(qt)) = (quantized, quant_of(ty)) {
                let q = QMatrix::from_bytes(qt, shape[0], shape[1], Arc::new(bytes.to_vec()), 0)
                    .map_err(|m| ModelError::Checkpoint {
                        path: path.to_path_buf(),
                        model: "LlamaForCausalLM",
                        message: format!("tensor `{name}`: {m}"),
                    })?;
                let q = match order {
                    Some(o) => q.permute_rows(&o),
                    None => q,
                };
                if quantized == Some(QuantActivations::Q8) {
                    to_prepare.borrow_mut().push(q.clone());
                }
                return Ok(Ok(q));
            }
            let t = file.tensor_f32(name).map_err(io)?;
            Ok(Err(match order {
                Some(o) => {
                    let idx = Tensor::from_vec(o.iter().map(|&i| i as i64).collect(), [o.len()]);
                    t.index_select(0, &idx)
                }
                None => t,
            }))
        };
        let act = quantized.unwrap_or_default();
        let proj = |name: &str, shape: [usize; 2], order: Option<Vec<usize>>| {
            Ok::<_, ModelError>(match matrix(name, shape, order)? {
                Ok(q) => Proj::Quant(q, act),
                Err(t) => Proj::Dense(Linear::from_weights(t, None)),
            })
        };
        let vector = |name: &str, len: usize| -> Result<Tensor, ModelError> {
            let info = file
                .tensor_info(name)
                .ok_or_else(|| ModelError::Checkpoint {
                    path: path.to_path_buf(),
                    model: "LlamaForCausalLM",
                    message: format!("tensor `{name}` is missing"),
                })?;
            if info.shape() != [len] {
                return Err(ModelError::Checkpoint {
                    path: path.to_path_buf(),
                    model: "LlamaForCausalLM",
                    message: format!(
                        "tensor `{name}` has shape {:?}, expected [{len}]",
                        info.shape()
                    ),
                });
            }
            file.tensor_f32(name).map_err(io)
        };
        let (hid, inter, hd) = (
            config.hidden_size,
            config.intermediate_size,
            config.head_dim,
        );
        let eps = config.rms_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(LlamaDecoderLayer {
                self_attn: LlamaAttention {
                    q_proj: proj(&p("attn_q"), [h * hd, hid], Some(unpermute(h, h * hd)))?,
                    k_proj: proj(&p("attn_k"), [kv * hd, hid], Some(unpermute(kv, kv * hd)))?,
                    v_proj: proj(&p("attn_v"), [kv * hd, hid], None)?,
                    o_proj: proj(&p("attn_output"), [hid, h * hd], None)?,
                },
                mlp: LlamaMlp {
                    gate_proj: proj(&p("ffn_gate"), [inter, hid], None)?,
                    up_proj: proj(&p("ffn_up"), [inter, hid], None)?,
                    down_proj: proj(&p("ffn_down"), [hid, inter], None)?,
                },
                input_layernorm: RmsNorm::from_weights(vector(&p("attn_norm"), hid)?, eps),
                post_attention_layernorm: RmsNorm::from_weights(vector(&p("ffn_norm"), hid)?, eps),
            });
        }
        let embed_tokens = match matrix("token_embd.weight", [config.vocab_size, hid], None)? {
            Ok(q) => TokenEmbedding::Quant(q, act),
            Err(t) => TokenEmbedding::Dense(Embedding::from_weights(t)),
        };
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(proj("output.weight", [config.vocab_size, hid], None)?)
        };
        let norm = RmsNorm::from_weights(vector("output_norm.weight", hid)?, eps);
        let inv_freq = config.inv_freq();
        let tokenizer = match file.metadata("tokenizer.ggml.model") {
            Some(_) if file.get_str("tokenizer.ggml.model").map_err(io)? == "gpt2" => {
                let (tokenizer, _) = tokenizer_from_gguf(&file)?;
                let chat_template = match file.metadata("tokenizer.chat_template") {
                    Some(_) => Some(
                        file.get_str("tokenizer.chat_template")
                            .map_err(io)?
                            .to_string(),
                    ),
                    None => None,
                };
                Some(LlamaTokenizer {
                    tokenizer,
                    chat_template,
                })
            }
            _ => None,
        };
        drop(file);
        for q in to_prepare.into_inner() {
            q.prepare_q8();
        }
        Ok(LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            config,
            tokenizer,
            inv_freq,
        })
    }

    /// A randomly initialised model of the given shape (f32, dense), for tests and training.
    pub fn new(config: LlamaConfig, rng: &mut Rng) -> LlamaForCausalLM {
        config
            .validate("<config>")
            .expect("LlamaForCausalLM::new: invalid config");
        let (hid, inter, hd) = (
            config.hidden_size,
            config.intermediate_size,
            config.head_dim,
        );
        let (h, kv) = (config.num_attention_heads, config.num_key_value_heads);
        let lin = |i: usize, o: usize, rng: &mut Rng| {
            Proj::Dense(Linear::with_config(
                i,
                o,
                kiln_nn::LinearConfig::default().bias(false),
                rng,
            ))
        };
        let norm = || RmsNorm::from_weights(Tensor::ones([hid]), config.rms_norm_eps);
        let layers = (0..config.num_hidden_layers)
            .map(|_| LlamaDecoderLayer {
                self_attn: LlamaAttention {
                    q_proj: lin(hid, h * hd, rng),
                    k_proj: lin(hid, kv * hd, rng),
                    v_proj: lin(hid, kv * hd, rng),
                    o_proj: lin(h * hd, hid, rng),
                },
                mlp: LlamaMlp {
                    gate_proj: lin(hid, inter, rng),
                    up_proj: lin(hid, inter, rng),
                    down_proj: lin(inter, hid, rng),
                },
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
            })
            .collect();
        let embed = Embedding::new(config.vocab_size, hid, rng);
        let lm_head = (!config.tie_word_embeddings).then(|| lin(hid, config.vocab_size, rng));
        let inv_freq = config.inv_freq();
        LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens: TokenEmbedding::Dense(embed),
                layers,
                norm: norm(),
            },
            lm_head,
            config,
            tokenizer: None,
            inv_freq,
        }
    }
}

impl Proj {
    /// The weight `[out, in]` as a dense f32 tensor (quantised matrices dequantised).
    fn dense_weight(&self) -> Tensor {
        match self {
            Proj::Dense(l) => l.weight.detach().to_dtype(DType::F32),
            Proj::Quant(q, _) => q.dequantize(),
        }
    }
}

/// The names of one decoder layer's weights, in HF's order.
const LAYER_WEIGHTS: [&str; 9] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
];

fn io_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn write_json(path: &Path, value: &Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| io_err(path, e))?;
    std::fs::write(path, text + "\n").map_err(|e| io_err(path, e))
}

impl LlamaForCausalLM {
    /// Every weight under its Hugging Face name (`model.embed_tokens.weight`,
    /// `model.layers.0.self_attn.q_proj.weight`, ..., `lm_head.weight`), dense f32: quantised
    /// matrices are dequantised; a tied head is not stored (transformers ties it on load).
    pub fn hf_state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        let embed = match &self.model.embed_tokens {
            TokenEmbedding::Dense(e) => e.weight.detach().to_dtype(DType::F32),
            TokenEmbedding::Quant(q, _) => q.dequantize(),
        };
        sd.insert("model.embed_tokens.weight", embed);
        let norm = |n: &RmsNorm| {
            n.weight
                .as_ref()
                .map_or_else(|| Tensor::ones(n.normalized_shape.clone()), |w| w.detach())
                .to_dtype(DType::F32)
        };
        for (i, layer) in self.model.layers.iter().enumerate() {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            let weights = [
                a.q_proj.dense_weight(),
                a.k_proj.dense_weight(),
                a.v_proj.dense_weight(),
                a.o_proj.dense_weight(),
                m.gate_proj.dense_weight(),
                m.up_proj.dense_weight(),
                m.down_proj.dense_weight(),
                norm(&layer.input_layernorm),
                norm(&layer.post_attention_layernorm),
            ];
            for (name, w) in LAYER_WEIGHTS.iter().zip(weights) {
                sd.insert(format!("model.layers.{i}.{name}.weight"), w);
            }
        }
        sd.insert("model.norm.weight", norm(&self.model.norm));
        if let Some(head) = &self.lm_head {
            sd.insert("lm_head.weight", head.dense_weight());
        }
        sd
    }

    /// A dense model (trainable f32 weights) from Hugging Face-named tensors `sd` (see
    /// [`LlamaForCausalLM::hf_state_dict`]); `path` names the checkpoint in errors. Every
    /// weight must be there with its shape, and nothing else (RoPE `inv_freq` buffers and a
    /// tied model's `lm_head.weight` are ignored).
    pub fn from_hf_state_dict(
        config: LlamaConfig,
        sd: &StateDict,
        path: &Path,
    ) -> Result<LlamaForCausalLM, ModelError> {
        config.validate(&path.display().to_string())?;
        let misfit = |message: String| ModelError::Checkpoint {
            path: path.to_path_buf(),
            model: "LlamaForCausalLM",
            message,
        };
        let mut used = std::collections::HashSet::new();
        let mut take = |name: String, shape: &[usize]| -> Result<Tensor, ModelError> {
            let t = sd
                .get(&name)
                .ok_or_else(|| misfit(format!("tensor `{name}` is missing")))?;
            if t.dims() != shape {
                return Err(misfit(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            used.insert(name);
            Ok(t.detach().to_dtype(DType::F32))
        };
        let c = &config;
        let (hid, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (h, kv) = (c.num_attention_heads, c.num_key_value_heads);
        let shapes: [Vec<usize>; 9] = [
            vec![h * hd, hid],
            vec![kv * hd, hid],
            vec![kv * hd, hid],
            vec![hid, h * hd],
            vec![inter, hid],
            vec![inter, hid],
            vec![hid, inter],
            vec![hid],
            vec![hid],
        ];
        let embed = take("model.embed_tokens.weight".into(), &[c.vocab_size, hid])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let mut w = Vec::with_capacity(9);
            for (name, shape) in LAYER_WEIGHTS.iter().zip(&shapes) {
                w.push(take(format!("model.layers.{i}.{name}.weight"), shape)?);
            }
            let mut w = w.into_iter();
            let mut lin = || Proj::Dense(Linear::from_weights(w.next().expect("9 weights"), None));
            let (q_proj, k_proj, v_proj, o_proj) = (lin(), lin(), lin(), lin());
            let (gate_proj, up_proj, down_proj) = (lin(), lin(), lin());
            let mut norm = || RmsNorm::from_weights(w.next().expect("9 weights"), c.rms_norm_eps);
            let (input_layernorm, post_attention_layernorm) = (norm(), norm());
            layers.push(LlamaDecoderLayer {
                self_attn: LlamaAttention {
                    q_proj,
                    k_proj,
                    v_proj,
                    o_proj,
                },
                mlp: LlamaMlp {
                    gate_proj,
                    up_proj,
                    down_proj,
                },
                input_layernorm,
                post_attention_layernorm,
            });
        }
        let norm = RmsNorm::from_weights(take("model.norm.weight".into(), &[hid])?, c.rms_norm_eps);
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(Proj::Dense(Linear::from_weights(
                take("lm_head.weight".into(), &[c.vocab_size, hid])?,
                None,
            )))
        };
        let unexpected: Vec<&str> = sd
            .iter()
            .map(|(k, _)| k)
            .filter(|k| {
                let tied_head = c.tie_word_embeddings && *k == "lm_head.weight";
                !(used.contains(*k) || k.ends_with("rotary_emb.inv_freq") || tied_head)
            })
            .collect();
        if !unexpected.is_empty() {
            let shown: Vec<&str> = unexpected.iter().take(8).copied().collect();
            return Err(misfit(format!(
                "{} unexpected tensors: {}{}",
                unexpected.len(),
                shown.join(", "),
                if unexpected.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            )));
        }
        let inv_freq = config.inv_freq();
        Ok(LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens: TokenEmbedding::Dense(Embedding::from_weights(embed)),
                layers,
                norm,
            },
            lm_head,
            config,
            tokenizer: None,
            inv_freq,
        })
    }

    /// Loads a Hugging Face directory: `config.json`, `model.safetensors` (dense; f16 / bf16
    /// widened to f32) and, when there, the tokenizer (`tokenizer.json`, special tokens from
    /// `special_tokens_map.json`, chat template from `tokenizer_config.json` or
    /// `chat_template.jinja`).
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<LlamaForCausalLM, ModelError> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_hf(&HfConfig::from_file(dir.join("config.json"))?)?;
        let path = dir.join("model.safetensors");
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path,
                what: "the model's weights (model.safetensors)",
            });
        }
        let sd = load_safetensors(&path)?;
        let mut model = LlamaForCausalLM::from_hf_state_dict(config, &sd, &path)?;
        let tok_path = dir.join("tokenizer.json");
        if tok_path.is_file() {
            let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| io_err(&tok_path, e))?;
            let cfg_path = dir.join("tokenizer_config.json");
            let jinja = dir.join("chat_template.jinja");
            let chat_template = if jinja.is_file() {
                Some(std::fs::read_to_string(&jinja).map_err(|e| io_err(&jinja, e))?)
            } else if cfg_path.is_file() {
                HfConfig::from_file(&cfg_path)?.opt::<String>("chat_template")?
            } else {
                None
            };
            model.tokenizer = Some(LlamaTokenizer {
                tokenizer,
                chat_template,
            });
        }
        Ok(model)
    }

    /// Writes a Hugging Face directory transformers loads with `AutoModelForCausalLM` /
    /// `AutoTokenizer` (creating `dir`): `config.json`, `generation_config.json`,
    /// `model.safetensors` (see [`LlamaForCausalLM::hf_state_dict`]) and, when the model has a
    /// tokenizer, `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
    /// `special_tokens_map.json`.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<(), ModelError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let special = self
            .tokenizer
            .as_ref()
            .map(|t| t.tokenizer.special_tokens().clone())
            .unwrap_or_default();
        let config = self
            .config
            .to_json_value(special.bos, special.eos, special.pad);
        let path = dir.join("config.json");
        write_json(&path, &config)?;
        let mut generation = Map::new();
        for (key, id) in [
            ("bos_token_id", special.bos),
            ("eos_token_id", special.eos),
            ("pad_token_id", special.pad),
        ] {
            if let Some(id) = id {
                generation.insert(key.into(), id.into());
            }
        }
        let path = dir.join("generation_config.json");
        write_json(&path, &Value::Object(generation))?;
        let path = dir.join("model.safetensors");
        kiln_nn::safetensors_io::save(&self.hf_state_dict(), &path)?;
        if let Some(tok) = &self.tokenizer {
            let path = dir.join("tokenizer.json");
            tok.tokenizer
                .hf()
                .save(&path, false)
                .map_err(|e| io_err(&path, e))?;
            let name = |id: Option<u32>| {
                id.and_then(|id| tok.tokenizer.id_to_token(id))
                    .map_or(Value::Null, Value::String)
            };
            let mut map = Map::new();
            for (key, id) in [
                ("bos_token", special.bos),
                ("eos_token", special.eos),
                ("unk_token", special.unk),
                ("pad_token", special.pad),
            ] {
                if id.is_some() {
                    map.insert(key.into(), name(id));
                }
            }
            let path = dir.join("special_tokens_map.json");
            write_json(&path, &Value::Object(map.clone()))?;
            map.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
            map.insert("clean_up_tokenization_spaces".into(), false.into());
            map.insert(
                "model_max_length".into(),
                self.config.max_position_embeddings.into(),
            );
            if let Some(src) = &tok.chat_template {
                map.insert("chat_template".into(), src.clone().into());
            }
            let path = dir.join("tokenizer_config.json");
            write_json(&path, &Value::Object(map))?;
        }
        Ok(())
    }
}

impl Forward for LlamaForCausalLM {
    /// Logits `[batch, len, vocab]` of token ids `[batch, len]`, without a cache.
    fn forward(&self, ids: &Tensor) -> Tensor {
        self.forward_with_cache(ids, None)
    }
}

impl CausalLm for LlamaForCausalLM {
    type Cache = KvCache;

    fn new_cache(&self) -> KvCache {
        KvCache::new()
    }

    fn next_logits(&self, ids: &[u32], cache: &mut KvCache) -> Vec<f32> {
        let t = Tensor::from_vec(ids.iter().map(|&i| i as i64).collect(), [1, ids.len()]);
        // Only the last position's logits are wanted: project just that row.
        let logits = kiln_core::with_no_grad(|| {
            let h = self.hidden_states(&t, Some(cache));
            self.head(&h.narrow(1, ids.len() - 1, 1))
        });
        logits.to_dtype(DType::F32).to_vec::<f32>()
    }

    /// All the sequences' projections and MLPs run as one batch (the weights are read once);
    /// each attends over its own cache. For quantised weights every row's logits equal those
    /// of [`CausalLm::next_logits`] on its own exactly.
    fn next_logits_many(&self, ids: &[u32], caches: &mut [&mut KvCache]) -> Vec<Vec<f32>> {
        let logits = kiln_core::with_no_grad(|| self.head(&self.decode_hidden_many(ids, caches)));
        let vocab = self.config.vocab_size;
        logits
            .to_dtype(DType::F32)
            .to_vec::<f32>()
            .chunks_exact(vocab)
            .map(<[f32]>::to_vec)
            .collect()
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(kv_heads: usize) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 50,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: kv_heads,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
        }
    }

    /// The same random model with every projection quantised (Q4_1) and, if tied, the table.
    fn quantised(m: &LlamaForCausalLM, act: QuantActivations) -> LlamaForCausalLM {
        let mut q = m.clone();
        let quant =
            |p: &mut Proj| *p = Proj::Quant(QMatrix::quantize(QType::Q4_1, &p.dense_weight()), act);
        for l in &mut q.model.layers {
            let (a, f) = (&mut l.self_attn, &mut l.mlp);
            for p in [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut f.gate_proj,
                &mut f.up_proj,
                &mut f.down_proj,
            ] {
                quant(p);
            }
        }
        if let TokenEmbedding::Dense(e) = &q.model.embed_tokens {
            let table = QMatrix::quantize(QType::Q4_1, &e.weight.detach());
            q.model.embed_tokens = TokenEmbedding::Quant(table, act);
        }
        q
    }

    fn ids(n: usize) -> Vec<u32> {
        (0..n).map(|i| ((i * 17 + 3) % 50) as u32).collect()
    }

    fn row(ids: &[u32]) -> Tensor {
        Tensor::from_vec(ids.iter().map(|&i| i as i64).collect(), [1, ids.len()])
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Feeds `ids` in the chunks `sizes` through `cache` and checks every position's logits
    /// against the full forward without a cache, within `tol` relative to the largest logit.
    fn check_cached(model: &LlamaForCausalLM, cache: &mut KvCache, sizes: &[usize], tol: f32) {
        let n: usize = sizes.iter().sum();
        let all = ids(n);
        let v = model.config.vocab_size;
        let full = kiln_core::with_no_grad(|| model.forward(&row(&all))).to_vec::<f32>();
        let mut at = 0;
        for &len in sizes {
            let got = kiln_core::with_no_grad(|| {
                model.forward_with_cache(&row(&all[at..at + len]), Some(cache))
            });
            assert_eq!(got.dims(), &[1, len, v]);
            let got = got.to_vec::<f32>();
            let want = &full[at * v..(at + len) * v];
            // f32 sums in another order: the bound scales with the logits' magnitude.
            let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            let d = max_diff(&got, want);
            assert!(
                d <= tol * scale,
                "positions {at}..{}: max diff {d} (logits up to {scale})",
                at + len
            );
            at += len;
            assert_eq!(cache.len(), at);
        }
    }

    #[test]
    fn in_place_cache_gives_the_full_forward_logits_across_growth() {
        // A 5-token prompt, a 3-token chunk (masked path), then single tokens past the first
        // two capacity doublings (16 -> 32 -> 64); grouped (2 kv heads) and plain heads.
        let mut sizes = vec![5, 3];
        sizes.extend(std::iter::repeat_n(1, 30));
        for kv in [2, 4, 1] {
            let model = LlamaForCausalLM::new(tiny(kv), &mut Rng::new(kv as u64));
            let mut cache = model.new_cache();
            assert!(cache.is_empty());
            check_cached(&model, &mut cache, &sizes, 1e-5);
            assert_eq!(cache.layers[0].k.dim(2), 64);
        }
    }

    #[test]
    fn cleared_cache_is_reused_and_clones_are_independent() {
        let model = LlamaForCausalLM::new(tiny(2), &mut Rng::new(7));
        let mut cache = KvCache::new();
        check_cached(&model, &mut cache, &[20, 1, 1], 1e-5);
        let snapshot = cache.clone();
        cache.clear();
        assert!(cache.is_empty());
        // Reuse from scratch (same storage), then a different continuation of the snapshot.
        check_cached(&model, &mut cache, &[2, 1, 1, 4, 1], 1e-5);
        let mut fork = snapshot.clone();
        assert_eq!(fork.len(), 22);
        let step = |c: &mut KvCache| {
            kiln_core::with_no_grad(|| model.forward_with_cache(&row(&[9]), Some(c)))
                .to_vec::<f32>()
        };
        let mut again = snapshot.clone();
        assert_eq!(step(&mut fork), step(&mut again));
        let mut longer = ids(22);
        longer.push(9);
        let full = kiln_core::with_no_grad(|| model.forward(&row(&longer))).to_vec::<f32>();
        assert!(max_diff(&step(&mut snapshot.clone()), &full[22 * 50..]) <= 1e-5);
    }

    #[test]
    fn quantised_models_decode_like_their_full_forward() {
        let dense = LlamaForCausalLM::new(tiny(2), &mut Rng::new(3));
        let mut sizes = vec![9];
        sizes.extend(std::iter::repeat_n(1, 10));
        for act in [QuantActivations::F32, QuantActivations::Q8] {
            let model = quantised(&dense, act);
            check_cached(&model, &mut KvCache::new(), &sizes, 1e-4);
        }
    }

    #[test]
    fn sequences_decoded_together_get_their_own_logits() {
        // Three sequences at different positions (one crosses the cache's first doubling at
        // 16) decode four tokens together; each must get what it gets decoding alone: exactly
        // with quantised weights, within rounding with dense ones (gemm sums in another order).
        let dense = LlamaForCausalLM::new(tiny(2), &mut Rng::new(11));
        let models = [
            (dense.clone(), 1e-5),
            (quantised(&dense, QuantActivations::F32), 0.0),
            (quantised(&dense, QuantActivations::Q8), 0.0),
        ];
        for (model, tol) in &models {
            let prompts = [ids(3), ids(15), ids(9)];
            let mut together: Vec<KvCache> = prompts
                .iter()
                .map(|p| {
                    let mut c = model.new_cache();
                    model.next_logits(p, &mut c);
                    c
                })
                .collect();
            let mut alone = together.clone();
            for step in 0..4u32 {
                let next: Vec<u32> = (0..3).map(|i| (7 * i + step) % 50).collect();
                let mut refs: Vec<&mut KvCache> = together.iter_mut().collect();
                let got = model.next_logits_many(&next, &mut refs);
                for (i, c) in alone.iter_mut().enumerate() {
                    let want = model.next_logits(&next[i..=i], c);
                    let d = max_diff(&got[i], &want);
                    assert!(d <= *tol, "sequence {i}, step {step}: max diff {d}");
                    assert_eq!(together[i].len(), c.len());
                }
            }
        }
    }

    #[test]
    fn next_logits_are_the_last_positions_logits() {
        let model = LlamaForCausalLM::new(tiny(2), &mut Rng::new(5));
        let all = ids(6);
        let full = kiln_core::with_no_grad(|| model.forward(&row(&all))).to_vec::<f32>();
        let mut cache = model.new_cache();
        let got = model.next_logits(&all[..5], &mut cache);
        assert!(max_diff(&got, &full[4 * 50..5 * 50]) <= 1e-5);
        let got = model.next_logits(&all[5..], &mut cache);
        assert!(max_diff(&got, &full[5 * 50..]) <= 1e-5);
    }

    #[test]
    fn gradients_flow_through_a_cached_step() {
        let model = LlamaForCausalLM::new(tiny(2), &mut Rng::new(11));
        let all = ids(6);
        let mut cache = KvCache::new();
        kiln_core::with_no_grad(|| model.forward_with_cache(&row(&all[..4]), Some(&mut cache)));
        let mut nograd = cache.clone();
        let want = kiln_core::with_no_grad(|| {
            model.forward_with_cache(&row(&all[4..]), Some(&mut nograd))
        });
        let got = model.forward_with_cache(&row(&all[4..]), Some(&mut cache));
        assert!(got.tracks_grad());
        assert!(max_diff(&got.to_vec::<f32>(), &want.to_vec::<f32>()) <= 1e-5);
        got.sum_all().backward();
        let q = match &model.model.layers[0].self_attn.q_proj {
            Proj::Dense(l) => l.weight.grad().expect("q_proj has a gradient"),
            Proj::Quant(..) => unreachable!("dense model"),
        };
        assert!(q.to_vec::<f32>().iter().any(|g| *g != 0.0));
        // A single tracked step too (the fused kernel is for inference only).
        let one = model.forward_with_cache(&row(&[1]), Some(&mut cache));
        assert!(one.tracks_grad());
        assert_eq!(cache.len(), 7);
    }

    #[test]
    fn fused_decode_attention_equals_scaled_dot_product_attention() {
        for dtype in [DType::F32, DType::F64] {
            for (h, kv) in [(9, 3), (4, 4), (6, 1)] {
                let (b, hd, cap) = (2, 16, 24);
                let k = Tensor::randn([b, kv, cap, hd], 1).to_dtype(dtype);
                let v = Tensor::randn([b, kv, cap, hd], 2).to_dtype(dtype);
                let q = Tensor::randn([b, 1, h * hd], 3).to_dtype(dtype);
                for len in [1, 16, 17, 24] {
                    let got = kiln_core::with_no_grad(|| q.decode_attention(&k, &v, len));
                    let want = scaled_dot_product_attention(
                        &q.reshape([b, kv, h / kv, 1, hd]),
                        &k.narrow(2, 0, len).unsqueeze(2),
                        &v.narrow(2, 0, len).unsqueeze(2),
                        None,
                        false,
                        0.0,
                        false,
                        &mut Rng::new(0),
                    )
                    .reshape([b, 1, h * hd]);
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                    for (a, w) in got.to_f64_vec().iter().zip(want.to_f64_vec()) {
                        assert!(
                            (a - w).abs() <= tol * w.abs().max(1.0),
                            "{dtype} len {len}: {a} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
