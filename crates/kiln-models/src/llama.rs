//! Llama-family decoders (Llama 2/3, SmolLM2, ...): grouped-query attention, rotary position
//! embeddings (with linear and Llama-3 scaling), RMSNorm, SwiGLU, tied or separate output
//! embeddings, and a KV cache. Parameter names are Hugging Face's (`model.layers.0.self_attn.
//! q_proj.weight`, ...), so a safetensors checkpoint loads by name; a GGUF file (llama.cpp
//! layout) loads through [`LlamaForCausalLM::from_gguf`], either dequantised to f32 (trainable)
//! or kept block-quantised (`Q4_0`/`Q4_1`/`Q8_0` matrices multiplied in their blocks).

use crate::error::ModelError;
use crate::generation::CausalLm;
use kiln_core::{DType, QMatrix, QType, Rng, Tensor};
use kiln_io::{GgmlType, GgufFile};
use kiln_nn::layers::scaled_dot_product_attention;
use kiln_nn::{Embedding, Forward, Linear, Module, RmsNorm, Visitor};
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

/// Keys and values of the positions seen so far, per layer (`[batch, kv_heads, seen, head_dim]`).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2))
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops everything cached.
    pub fn clear(&mut self) {
        self.layers.clear();
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
    #[module(skip)]
    inv_freq: Vec<f64>,
}

/// `rotate_half` RoPE on `x [b, heads, len, head_dim]` with `cos`/`sin` `[len, head_dim]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.dim(-1) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    let rotated = Tensor::cat(&[x2.neg(), x1], -1);
    x.mul(cos).add(&rotated.mul(sin))
}

impl LlamaAttention {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        config: &LlamaConfig,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let (b, l) = (x.dim(0), x.dim(1));
        let (h, kv, hd) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        let heads = |t: Tensor, n: usize| t.reshape([b, l, n, hd]).transpose(1, 2);
        let q = apply_rope(&heads(self.q_proj.forward(x), h), cos, sin);
        let mut k = apply_rope(&heads(self.k_proj.forward(x), kv), cos, sin);
        let mut v = heads(self.v_proj.forward(x), kv);
        let past = match cache {
            Some(slot) => {
                let past = slot.as_ref().map_or(0, |(pk, _)| pk.dim(2));
                if let Some((pk, pv)) = slot.take() {
                    k = Tensor::cat(&[pk, k], 2);
                    v = Tensor::cat(&[pv, v], 2);
                }
                *slot = Some((k.detach(), v.detach()));
                past
            }
            None => 0,
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

impl LlamaMlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let gate = self.gate_proj.forward(x).silu();
        self.down_proj.forward(&gate.mul(&self.up_proj.forward(x)))
    }
}

impl LlamaForCausalLM {
    /// Logits `[batch, len, vocab]` for token ids `[batch, len]` (I64), continuing the positions
    /// in `cache` (and appending the new keys and values to it) when one is given.
    pub fn forward_with_cache(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Tensor {
        assert!(
            ids.rank() == 2,
            "LlamaForCausalLM: token ids must be [batch, len], got {}",
            ids.shape()
        );
        let l = ids.dim(1);
        let past = cache.as_ref().map_or(0, |c| c.len());
        let config = &self.config;
        let dtype = self.dtype();
        // cos / sin [l, head_dim] for positions past..past+l (f64 angles, then the model dtype).
        let half = config.head_dim / 2;
        let mut cos = Vec::with_capacity(l * config.head_dim);
        let mut sin = Vec::with_capacity(l * config.head_dim);
        for p in past..past + l {
            for _ in 0..2 {
                for &f in &self.inv_freq[..half] {
                    let a = p as f64 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, [l, config.head_dim]).to_dtype(dtype);
        let sin = Tensor::from_vec(sin, [l, config.head_dim]).to_dtype(dtype);
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize(config.num_hidden_layers, None);
        }
        let mut h = self.model.embed_tokens.lookup(ids).to_dtype(dtype);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let a = layer.self_attn.forward(
                &layer.input_layernorm.forward(&h),
                &cos,
                &sin,
                config,
                slot,
            );
            h = h.add(&a);
            h = h.add(
                &layer
                    .mlp
                    .forward(&layer.post_attention_layernorm.forward(&h)),
            );
        }
        let h = self.model.norm.forward(&h);
        match &self.lm_head {
            Some(head) => head.forward(&h),
            None => self.model.embed_tokens.project(&h),
        }
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
                return Ok(Ok(match order {
                    Some(o) => q.permute_rows(&o),
                    None => q,
                }));
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
        Ok(LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            config,
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
            inv_freq,
        }
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
        let logits = kiln_core::with_no_grad(|| self.forward_with_cache(&t, Some(cache)));
        let v = logits.dim(-1);
        logits
            .narrow(1, ids.len() - 1, 1)
            .reshape([v])
            .to_dtype(DType::F32)
            .to_vec::<f32>()
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
}
