//! BERT (`transformers.BertModel` and its sequence / token classification heads), with Hugging
//! Face's parameter names, so HF checkpoints load as they are; plus sentence embeddings (mean
//! pooling + L2 normalisation, as sentence-transformers' all-MiniLM-L6-v2 computes them).
//!
//! Attention runs on whole `[B, heads, L, d]` batches through kiln-nn's
//! [`scaled_dot_product_attention`] (one fused kernel, head splits read in place); layer norms
//! use kiln-nn's fused kernel.

use crate::checkpoint::load_safetensors;
use crate::config::{default_labels, labels_json, HfConfig};
use crate::error::ModelError;
use crate::remap::KeyMap;
use kiln_core::{DType, Rng, Tensor};
use kiln_nn::layers::{scaled_dot_product_attention, Dropout, Embedding, LayerNorm, Linear};
use kiln_nn::{
    init, Forward, LoadMode, LoadReport, Module, ModuleExt, NnError, RandomState, TrainFlag,
};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

// ---------------------------------------------------------------------- config

/// The feed-forward activation (`hidden_act` in config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HiddenAct {
    /// `"gelu"`: exact GELU (with `erf`).
    #[default]
    Gelu,
    /// `"gelu_new"`: GELU with the tanh approximation.
    GeluNew,
    /// `"relu"`.
    Relu,
}

impl HiddenAct {
    /// The name config.json uses.
    pub fn as_str(self) -> &'static str {
        match self {
            HiddenAct::Gelu => "gelu",
            HiddenAct::GeluNew => "gelu_new",
            HiddenAct::Relu => "relu",
        }
    }

    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            HiddenAct::Gelu => x.gelu(),
            HiddenAct::GeluNew => x.gelu_tanh(),
            HiddenAct::Relu => x.relu(),
        }
    }
}

/// What the sequence-classification head reads: the `[CLS]` position (BERT's pooler, as
/// Hugging Face's `BertForSequenceClassification`) or the mean of the last hidden states over
/// real tokens (as sentence-transformers models such as all-MiniLM-L6-v2 were trained to be
/// read), then the pooler's dense + tanh. Saved as `"classifier_pooling"` in config.json.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassifierPooling {
    /// The first (`[CLS]`) position (default; Hugging Face's behaviour).
    #[default]
    Cls,
    /// The mean over real tokens.
    Mean,
}

impl ClassifierPooling {
    /// The config.json spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ClassifierPooling::Cls => "cls",
            ClassifierPooling::Mean => "mean",
        }
    }

    /// Parses the config.json spelling (`cls` or `mean`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cls" => Some(ClassifierPooling::Cls),
            "mean" => Some(ClassifierPooling::Mean),
            _ => None,
        }
    }
}

/// A BERT configuration (HF's `BertConfig`); defaults are bert-base-uncased's, as in HF.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size (30522).
    pub vocab_size: usize,
    /// Hidden size `E` (768).
    pub hidden_size: usize,
    /// Number of encoder layers (12).
    pub num_hidden_layers: usize,
    /// Attention heads; must divide `hidden_size` (12).
    pub num_attention_heads: usize,
    /// Feed-forward inner size (3072).
    pub intermediate_size: usize,
    /// Feed-forward activation (exact GELU).
    pub hidden_act: HiddenAct,
    /// Dropout after embeddings and each sub-layer (0.1).
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention weights (0.1).
    pub attention_probs_dropout_prob: f64,
    /// Longest sequence (512).
    pub max_position_embeddings: usize,
    /// Number of token types (segments) (2).
    pub type_vocab_size: usize,
    /// Std of the normal initialisation (0.02).
    pub initializer_range: f64,
    /// Layer-norm epsilon (1e-12).
    pub layer_norm_eps: f64,
    /// Padding token id (0): its word-embedding row starts at zero.
    pub pad_token_id: Option<usize>,
    /// Dropout before the classifier heads (`None`: `hidden_dropout_prob`).
    pub classifier_dropout: Option<f64>,
    /// What the sequence-classification head reads (default `[CLS]`).
    pub classifier_pooling: ClassifierPooling,
    /// Class names of the heads, by index (`id2label`); their number is `num_labels`.
    pub labels: Vec<String>,
    /// Other config.json fields, kept as they are for [`BertConfig::to_json`].
    pub extra: Map<String, Value>,
}

impl Default for BertConfig {
    fn default() -> Self {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: HiddenAct::Gelu,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: Some(0),
            classifier_dropout: None,
            classifier_pooling: ClassifierPooling::Cls,
            labels: default_labels(2),
            extra: Map::new(),
        }
    }
}

/// Fields [`BertConfig`] reads itself (everything else goes to `extra`).
const KNOWN_FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
    "classifier_dropout",
    "classifier_pooling",
    "position_embedding_type",
    "model_type",
    "architectures",
    "num_labels",
    "id2label",
    "label2id",
];

impl BertConfig {
    /// A small configuration (for tests and experiments): the given sizes, 4·hidden inner
    /// size, other fields at their defaults.
    pub fn small(vocab_size: usize, hidden_size: usize, layers: usize, heads: usize) -> Self {
        BertConfig {
            vocab_size,
            hidden_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: 4 * hidden_size,
            ..Self::default()
        }
    }

    /// Sets the maximum sequence length.
    pub fn max_position_embeddings(mut self, n: usize) -> Self {
        self.max_position_embeddings = n;
        self
    }

    /// Sets the activation.
    pub fn hidden_act(mut self, act: HiddenAct) -> Self {
        self.hidden_act = act;
        self
    }

    /// Sets both dropout probabilities (hidden and attention).
    pub fn dropout(mut self, p: f64) -> Self {
        self.hidden_dropout_prob = p;
        self.attention_probs_dropout_prob = p;
        self
    }

    /// Sets `num_labels` with generic names `LABEL_i`.
    pub fn num_labels(mut self, n: usize) -> Self {
        self.labels = default_labels(n);
        self
    }

    /// Sets the class names (their number is `num_labels`).
    pub fn labels(mut self, labels: Vec<String>) -> Self {
        self.labels = labels;
        self
    }

    /// Number of classes of the heads.
    pub fn label_count(&self) -> usize {
        self.labels.len()
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
        c.expect_model_type("bert")?;
        let d = BertConfig::default();
        let act: String = c.get_or("hidden_act", "gelu".to_string())?;
        let hidden_act = match act.as_str() {
            "gelu" => HiddenAct::Gelu,
            "gelu_new" => HiddenAct::GeluNew,
            "relu" => HiddenAct::Relu,
            other => {
                return Err(c.field_error(
                    "hidden_act",
                    format!("unsupported activation \"{other}\" (supported: gelu, gelu_new, relu)"),
                ))
            }
        };
        let pos: String = c.get_or("position_embedding_type", "absolute".to_string())?;
        if pos != "absolute" {
            return Err(c.field_error(
                "position_embedding_type",
                format!("\"{pos}\" is not supported (only \"absolute\" is)"),
            ));
        }
        let pad_token_id = match c.map().get("pad_token_id") {
            Some(Value::Null) => None,
            _ => Some(c.get_or("pad_token_id", 0usize)?),
        };
        let pooling: String = c.get_or("classifier_pooling", "cls".to_string())?;
        let classifier_pooling = ClassifierPooling::parse(&pooling).ok_or_else(|| {
            c.field_error(
                "classifier_pooling",
                format!("\"{pooling}\" is not supported (use \"cls\" or \"mean\")"),
            )
        })?;
        let cfg = BertConfig {
            vocab_size: c.get_or("vocab_size", d.vocab_size)?,
            hidden_size: c.get_or("hidden_size", d.hidden_size)?,
            num_hidden_layers: c.get_or("num_hidden_layers", d.num_hidden_layers)?,
            num_attention_heads: c.get_or("num_attention_heads", d.num_attention_heads)?,
            intermediate_size: c.get_or("intermediate_size", d.intermediate_size)?,
            hidden_act,
            hidden_dropout_prob: c.get_or("hidden_dropout_prob", d.hidden_dropout_prob)?,
            attention_probs_dropout_prob: c.get_or(
                "attention_probs_dropout_prob",
                d.attention_probs_dropout_prob,
            )?,
            max_position_embeddings: c
                .get_or("max_position_embeddings", d.max_position_embeddings)?,
            type_vocab_size: c.get_or("type_vocab_size", d.type_vocab_size)?,
            initializer_range: c.get_or("initializer_range", d.initializer_range)?,
            layer_norm_eps: c.get_or("layer_norm_eps", d.layer_norm_eps)?,
            pad_token_id,
            classifier_dropout: c.opt("classifier_dropout")?,
            classifier_pooling,
            labels: c.labels()?,
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

    /// Checks sizes and probabilities; the error names the offending field.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        for (field, v) in sizes {
            if v == 0 {
                return Err((field, "must be positive, got 0".to_string()));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err((
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        let probs = [
            ("hidden_dropout_prob", Some(self.hidden_dropout_prob)),
            (
                "attention_probs_dropout_prob",
                Some(self.attention_probs_dropout_prob),
            ),
            ("classifier_dropout", self.classifier_dropout),
        ];
        for (field, p) in probs {
            if let Some(p) = p {
                if !(0.0..=1.0).contains(&p) {
                    return Err((field, format!("must be in [0, 1], got {p}")));
                }
            }
        }
        if let Some(pad) = self.pad_token_id {
            if pad >= self.vocab_size {
                return Err((
                    "pad_token_id",
                    format!(
                        "{pad} is outside the vocabulary (vocab_size {})",
                        self.vocab_size
                    ),
                ));
            }
        }
        if self.labels.is_empty() {
            return Err(("num_labels", "must be positive, got 0".to_string()));
        }
        Ok(())
    }

    /// The config as HF's config.json object (sorted keys, `extra` fields kept), with
    /// `architectures` set to `[architecture]` when given.
    pub fn to_json_value(&self, architecture: Option<&str>) -> Value {
        let mut m: BTreeMap<String, Value> = self
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        if let Some(a) = architecture {
            put("architectures", Value::from(vec![a]));
        }
        put("model_type", Value::from("bert"));
        put("vocab_size", Value::from(self.vocab_size));
        put("hidden_size", Value::from(self.hidden_size));
        put("num_hidden_layers", Value::from(self.num_hidden_layers));
        put("num_attention_heads", Value::from(self.num_attention_heads));
        put("intermediate_size", Value::from(self.intermediate_size));
        put("hidden_act", Value::from(self.hidden_act.as_str()));
        put("hidden_dropout_prob", Value::from(self.hidden_dropout_prob));
        put(
            "attention_probs_dropout_prob",
            Value::from(self.attention_probs_dropout_prob),
        );
        put(
            "max_position_embeddings",
            Value::from(self.max_position_embeddings),
        );
        put("type_vocab_size", Value::from(self.type_vocab_size));
        put("initializer_range", Value::from(self.initializer_range));
        put("layer_norm_eps", Value::from(self.layer_norm_eps));
        put("pad_token_id", Value::from(self.pad_token_id));
        put("classifier_dropout", Value::from(self.classifier_dropout));
        if self.classifier_pooling != ClassifierPooling::Cls {
            put(
                "classifier_pooling",
                Value::from(self.classifier_pooling.as_str()),
            );
        }
        put("position_embedding_type", Value::from("absolute"));
        let (i2l, l2i) = labels_json(&self.labels);
        put("id2label", i2l);
        put("label2id", l2i);
        Value::Object(m.into_iter().collect())
    }

    /// The config as pretty-printed config.json text (see [`BertConfig::to_json_value`]).
    pub fn to_json(&self, architecture: Option<&str>) -> String {
        serde_json::to_string_pretty(&self.to_json_value(architecture)).expect("JSON value")
    }
}

// ---------------------------------------------------------------------- modules

/// `N(0, std²)` samples of `shape` (drawn in f32, then converted to `dtype`), with an optional
/// padding row set to zero.
fn draw_normal(
    shape: &[usize],
    std: f64,
    pad_row: Option<usize>,
    dtype: DType,
    rng: &mut Rng,
) -> Tensor {
    let t = Tensor::zeros(shape);
    init::normal_(&t, 0.0, std, rng);
    let t = t.to_dtype(dtype);
    let Some(p) = pad_row else { return t };
    let dim = shape[1];
    let mut data = t.to_f64_vec();
    data[p * dim..(p + 1) * dim].fill(0.0);
    Tensor::from_vec(data, shape).to_dtype(dtype)
}

/// Fresh weights as HF's `BertPreTrainedModel._init_weights` makes them: `N(0, std)` for
/// linear and embedding weights, zero biases, unit layer norms.
struct Init<'a> {
    rng: &'a mut Rng,
    dtype: DType,
    std: f64,
    /// `Some` while building a model whose weights a checkpoint will supply: see [`Deferred`].
    deferred: Option<Vec<Deferred>>,
}

/// A normal-initialised weight of a model built for loading. It is left at zero and the
/// generator only skips over its draws (about 3 ns a sample instead of 40: Box–Muller's `ln`
/// and `cos`); the state it started from is kept, so a weight the checkpoint lacks (a new
/// classifier) gets exactly the values an eagerly built model would have: same seed, same
/// numbers. Loading MiniLM went from 1.4–1.9 s to 0.23–0.33 s.
struct Deferred {
    dims: Vec<usize>,
    rng: Rng,
    std: f64,
    /// An embedding's padding row, zeroed after the draws.
    pad_row: Option<usize>,
}

impl<'a> Init<'a> {
    /// Draws every weight now (`defer` false), or defers them for a checkpoint to fill.
    fn new(rng: &'a mut Rng, dtype: DType, std: f64, defer: bool) -> Self {
        Init {
            rng,
            dtype,
            std,
            deferred: defer.then(Vec::new),
        }
    }

    fn normal(&mut self, shape: &[usize]) -> Tensor {
        self.normal_padded(shape, None)
    }

    fn normal_padded(&mut self, shape: &[usize], pad_row: Option<usize>) -> Tensor {
        if let Some(deferred) = &mut self.deferred {
            deferred.push(Deferred {
                dims: shape.to_vec(),
                rng: self.rng.clone(),
                std: self.std,
                pad_row,
            });
            // `Rng::next_normal` takes two draws per sample.
            for _ in 0..2 * shape.iter().product::<usize>() {
                self.rng.next_u64();
            }
            return Tensor::zeros_dtype(shape, self.dtype);
        }
        draw_normal(shape, self.std, pad_row, self.dtype, self.rng)
    }

    /// Draws the deferred weights of `model` that `missing` names (the ones the checkpoint did
    /// not supply). Construction draws the Linear and Embedding weights in the order the module
    /// tree lists them (biases and layer norms take no draws), which pairs each deferred draw
    /// with its parameter; the shapes are checked.
    fn draw_missing(self, model: &dyn Module, missing: &[String]) {
        let Some(deferred) = self.deferred else {
            return;
        };
        let drawn: Vec<_> = model
            .named_parameters()
            .into_iter()
            .filter(|(name, _)| name.ends_with(".weight") && !name.contains("LayerNorm"))
            .collect();
        assert_eq!(
            drawn.len(),
            deferred.len(),
            "BERT: deferred initialisation does not pair with the parameters"
        );
        for ((name, param), mut d) in drawn.into_iter().zip(deferred) {
            assert_eq!(
                param.tensor().dims(),
                d.dims.as_slice(),
                "BERT: deferred draw for {name} has another shape"
            );
            if missing.contains(&name) {
                let t = draw_normal(&d.dims, d.std, d.pad_row, self.dtype, &mut d.rng);
                param.tensor().assign(&t);
            }
        }
    }

    fn linear(&mut self, input: usize, output: usize) -> Linear {
        let w = self.normal(&[output, input]);
        Linear::from_weights(w, Some(Tensor::zeros_dtype([output], self.dtype)))
    }

    fn embedding(&mut self, n: usize, dim: usize, pad: Option<usize>) -> Embedding {
        Embedding::from_weights(self.normal_padded(&[n, dim], pad))
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

/// Word + position + token-type embeddings, then layer norm and dropout.
#[derive(Module, Debug)]
pub struct BertEmbeddings {
    /// `[vocab_size, E]`.
    pub word_embeddings: Embedding,
    /// `[max_position_embeddings, E]`.
    pub position_embeddings: Embedding,
    /// `[type_vocab_size, E]`.
    pub token_type_embeddings: Embedding,
    /// Layer norm over `E`.
    #[module(rename = "LayerNorm")]
    pub layer_norm: LayerNorm,
    /// Dropout (`hidden_dropout_prob`).
    pub dropout: Dropout,
}

impl BertEmbeddings {
    fn new(c: &BertConfig, init: &mut Init) -> Self {
        let e = c.hidden_size;
        BertEmbeddings {
            word_embeddings: init.embedding(c.vocab_size, e, c.pad_token_id),
            position_embeddings: init.embedding(c.max_position_embeddings, e, None),
            token_type_embeddings: init.embedding(c.type_vocab_size, e, None),
            layer_norm: init.layer_norm(e, c.layer_norm_eps),
            dropout: init.dropout(c.hidden_dropout_prob),
        }
    }

    /// `[B, L]` ids (and optional `[B, L]` token types, default 0) to `[B, L, E]`.
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>) -> Tensor {
        let l = input_ids.dims()[1];
        let words = self.word_embeddings.forward(input_ids);
        let positions = self
            .position_embeddings
            .forward(&Tensor::arange_i64(0, l as i64, 1));
        let types = match token_type_ids {
            Some(t) => self.token_type_embeddings.forward(t),
            // All type 0: row 0, broadcast over the batch (as HF's zero buffer, without a gather).
            None => self.token_type_embeddings.weight.narrow(0, 0, 1),
        };
        let x = words.add(&types).add(&positions);
        self.dropout.forward(&self.layer_norm.forward(&x))
    }
}

/// Multi-head self-attention: `query`, `key`, `value` projections and scaled dot-product
/// attention over all heads at once.
#[derive(Module, Debug)]
pub struct BertSelfAttention {
    /// Query projection `E → E`.
    pub query: Linear,
    /// Key projection `E → E`.
    pub key: Linear,
    /// Value projection `E → E`.
    pub value: Linear,
    training: TrainFlag,
    /// Number of heads.
    #[module(skip)]
    pub num_heads: usize,
    /// Dropout on the attention weights while training.
    #[module(skip)]
    pub dropout_p: f64,
    rng: RandomState,
}

impl BertSelfAttention {
    fn new(c: &BertConfig, init: &mut Init) -> Self {
        let e = c.hidden_size;
        BertSelfAttention {
            query: init.linear(e, e),
            key: init.linear(e, e),
            value: init.linear(e, e),
            training: TrainFlag::default(),
            num_heads: c.num_attention_heads,
            dropout_p: c.attention_probs_dropout_prob,
            rng: RandomState::new(init.rng.next_u64()),
        }
    }

    /// `x [B, L, E]` with an optional additive mask `[B, 1, 1, L]` to `[B, L, E]`.
    pub fn forward(&self, x: &Tensor, additive_mask: Option<&Tensor>) -> Tensor {
        self.attend(x, x, additive_mask)
    }

    /// Attention of the query rows `queries [B, Lq, E]` over all of `x [B, L, E]`:
    /// `[B, Lq, E]`, equal to those rows of `forward(x)` (each query row is independent).
    fn attend(&self, queries: &Tensor, x: &Tensor, additive_mask: Option<&Tensor>) -> Tensor {
        let (b, l, e) = (x.dims()[0], x.dims()[1], x.dims()[2]);
        let lq = queries.dims()[1];
        let h = self.num_heads;
        let heads = |t: Tensor, rows: usize| t.reshape([b, rows, h, e / h]).permute(&[0, 2, 1, 3]);
        let q = heads(self.query.forward(queries), lq);
        let k = heads(self.key.forward(x), l);
        let v = heads(self.value.forward(x), l);
        let mut rng = self.rng.lock();
        let ctx = scaled_dot_product_attention(
            &q,
            &k,
            &v,
            additive_mask,
            false,
            self.dropout_p,
            self.training.is_training(),
            &mut rng,
        );
        ctx.permute(&[0, 2, 1, 3]).reshape([b, lq, e])
    }
}

/// `LayerNorm(dropout(dense(x)) + residual)` after attention.
#[derive(Module, Debug)]
pub struct BertSelfOutput {
    /// `E → E`.
    pub dense: Linear,
    /// Layer norm over `E`.
    #[module(rename = "LayerNorm")]
    pub layer_norm: LayerNorm,
    /// Dropout (`hidden_dropout_prob`).
    pub dropout: Dropout,
}

impl BertSelfOutput {
    /// Projects `x`, adds `residual`, normalises.
    pub fn forward(&self, x: &Tensor, residual: &Tensor) -> Tensor {
        let y = self.dropout.forward(&self.dense.forward(x));
        self.layer_norm.forward(&y.add(residual))
    }
}

/// Self-attention and its output block (`attention.self`, `attention.output`).
#[derive(Module, Debug)]
pub struct BertAttention {
    /// The attention proper (HF's `self`).
    #[module(rename = "self")]
    pub self_attention: BertSelfAttention,
    /// Projection, residual and layer norm.
    pub output: BertSelfOutput,
}

/// First feed-forward half: `act(dense(x))`, `E → intermediate_size`.
#[derive(Module, Debug)]
pub struct BertIntermediate {
    /// `E → intermediate_size`.
    pub dense: Linear,
    /// The activation.
    #[module(skip)]
    pub act: HiddenAct,
}

/// Second feed-forward half: `LayerNorm(dropout(dense(x)) + residual)`.
#[derive(Module, Debug)]
pub struct BertFeedForwardOutput {
    /// `intermediate_size → E`.
    pub dense: Linear,
    /// Layer norm over `E`.
    #[module(rename = "LayerNorm")]
    pub layer_norm: LayerNorm,
    /// Dropout (`hidden_dropout_prob`).
    pub dropout: Dropout,
}

/// One encoder layer: attention, then the feed-forward block.
#[derive(Module, Debug)]
pub struct BertLayer {
    /// Self-attention block.
    pub attention: BertAttention,
    /// Feed-forward first half.
    pub intermediate: BertIntermediate,
    /// Feed-forward second half.
    pub output: BertFeedForwardOutput,
}

impl BertLayer {
    fn new(c: &BertConfig, init: &mut Init) -> Self {
        let (e, i) = (c.hidden_size, c.intermediate_size);
        BertLayer {
            attention: BertAttention {
                self_attention: BertSelfAttention::new(c, init),
                output: BertSelfOutput {
                    dense: init.linear(e, e),
                    layer_norm: init.layer_norm(e, c.layer_norm_eps),
                    dropout: init.dropout(c.hidden_dropout_prob),
                },
            },
            intermediate: BertIntermediate {
                dense: init.linear(e, i),
                act: c.hidden_act,
            },
            output: BertFeedForwardOutput {
                dense: init.linear(i, e),
                layer_norm: init.layer_norm(e, c.layer_norm_eps),
                dropout: init.dropout(c.hidden_dropout_prob),
            },
        }
    }

    /// `[B, L, E]` to `[B, L, E]`.
    pub fn forward(&self, x: &Tensor, additive_mask: Option<&Tensor>) -> Tensor {
        self.forward_rows(x, x, additive_mask)
    }

    /// The output rows of the positions in `queries [B, Lq, E]` (rows of `x [B, L, E]`), all
    /// of `x` serving as keys and values: `[B, Lq, E]`. Everything after the attention is
    /// per position, so the other rows need not be computed.
    fn forward_rows(&self, queries: &Tensor, x: &Tensor, additive_mask: Option<&Tensor>) -> Tensor {
        let a = self
            .attention
            .self_attention
            .attend(queries, x, additive_mask);
        let a = self.attention.output.forward(&a, queries);
        let i = self
            .intermediate
            .act
            .apply(&self.intermediate.dense.forward(&a));
        let o = self.output.dropout.forward(&self.output.dense.forward(&i));
        self.output.layer_norm.forward(&o.add(&a))
    }
}

/// The stack of encoder layers (`encoder.layer.{i}`).
#[derive(Module, Debug)]
pub struct BertEncoder {
    /// The layers.
    pub layer: Vec<BertLayer>,
}

/// `tanh(dense(hidden[:, 0]))`: the first token's pooled representation.
#[derive(Module, Debug)]
pub struct BertPooler {
    /// `E → E`.
    pub dense: Linear,
}

impl BertPooler {
    /// `[B, L, E]` to `[B, E]`.
    pub fn forward(&self, hidden: &Tensor) -> Tensor {
        let (b, e) = (hidden.dims()[0], hidden.dims()[2]);
        let first = hidden.narrow(1, 0, 1).reshape([b, e]);
        self.dense.forward(&first).tanh()
    }
}

/// What [`BertModel::forward`] returns.
#[derive(Debug, Clone)]
pub struct BertOutput {
    /// `[B, L, E]`: the last layer's hidden states.
    pub last_hidden_state: Tensor,
    /// `[B, E]`: the pooler's output (`None` for a model without pooler).
    pub pooler_output: Option<Tensor>,
}

/// `transformers.BertModel`: embeddings, encoder and (optional) pooler, named as in HF.
#[derive(Module, Debug)]
pub struct BertModel {
    /// Input embeddings.
    pub embeddings: BertEmbeddings,
    /// Encoder layers.
    pub encoder: BertEncoder,
    /// Pooler (absent in the token-classification head, as in HF).
    pub pooler: Option<BertPooler>,
    #[module(skip)]
    config: BertConfig,
}

/// The additive attention mask HF builds: 0 where `mask` is nonzero, the dtype's lowest value
/// where it is 0; shape `[B, 1, 1, L]`.
fn additive_mask(mask: &Tensor, dtype: DType) -> Tensor {
    let (b, l) = (mask.dims()[0], mask.dims()[1]);
    let lowest = if dtype == DType::F64 {
        f64::MIN
    } else {
        f32::MIN as f64
    };
    mask.ne_scalar(0.0)
        .to_dtype(dtype)
        .rsub_scalar(1.0)
        .mul_scalar(lowest)
        .reshape([b, 1, 1, l])
}

fn check_ids(
    model: &str,
    c: &BertConfig,
    ids: &Tensor,
    mask: Option<&Tensor>,
    types: Option<&Tensor>,
) {
    assert!(
        ids.rank() == 2 && !ids.dtype().is_float(),
        "{model}: input_ids must be an integer [batch, seq] tensor, got {} {}",
        ids.dtype(),
        ids.shape()
    );
    assert!(
        ids.dims()[1] >= 1 && ids.dims()[1] <= c.max_position_embeddings,
        "{model}: sequence length {} of input_ids {} must be in 1..={} (max_position_embeddings)",
        ids.dims()[1],
        ids.shape(),
        c.max_position_embeddings
    );
    for (name, t) in [("attention_mask", mask), ("token_type_ids", types)] {
        if let Some(t) = t {
            assert!(
                t.dims() == ids.dims(),
                "{model}: {name} shape {} does not match input_ids {}",
                t.shape(),
                ids.shape()
            );
        }
    }
    if let Some(t) = types {
        assert!(
            !t.dtype().is_float(),
            "{model}: token_type_ids must be integers, got {}",
            t.dtype()
        );
    }
}

impl BertModel {
    /// A freshly initialised f32 model with a pooler.
    pub fn new(config: &BertConfig, rng: &mut Rng) -> Self {
        Self::with_dtype(config, DType::F32, true, rng)
    }

    /// A freshly initialised model of `dtype` (f32 or f64), with or without pooler. Panics
    /// when `config` is invalid (sizes, heads not dividing the hidden size).
    pub fn with_dtype(config: &BertConfig, dtype: DType, pooler: bool, rng: &mut Rng) -> Self {
        let mut init = Init::new(rng, dtype, config.initializer_range, false);
        Self::build(config, pooler, &mut init)
    }

    fn build(config: &BertConfig, pooler: bool, init: &mut Init) -> Self {
        if let Err((field, msg)) = config.validate() {
            panic!("BertModel: invalid config: {field} {msg}");
        }
        assert!(
            init.dtype.is_float(),
            "BertModel: dtype must be f32 or f64, got {}",
            init.dtype
        );
        let embeddings = BertEmbeddings::new(config, init);
        let layer = (0..config.num_hidden_layers)
            .map(|_| BertLayer::new(config, init))
            .collect();
        let pooler = pooler.then(|| BertPooler {
            dense: init.linear(config.hidden_size, config.hidden_size),
        });
        BertModel {
            embeddings,
            encoder: BertEncoder { layer },
            pooler,
            config: config.clone(),
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Checks the inputs and returns the embedding output with the additive attention mask.
    fn embed(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> (Tensor, Option<Tensor>) {
        check_ids(
            "BertModel",
            &self.config,
            input_ids,
            attention_mask,
            token_type_ids,
        );
        let x = self.embeddings.forward(input_ids, token_type_ids);
        let mask = attention_mask.map(|m| additive_mask(m, x.dtype()));
        (x, mask)
    }

    /// Runs the model on `input_ids [B, L]` (integer), with an optional `attention_mask
    /// [B, L]` (1 = real token, 0 = padding; integer or float) and `token_type_ids [B, L]`
    /// (default all 0). Dropout is active only in training mode.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> BertOutput {
        let (mut x, mask) = self.embed(input_ids, attention_mask, token_type_ids);
        for layer in &self.encoder.layer {
            x = layer.forward(&x, mask.as_ref());
        }
        let pooler_output = self.pooler.as_ref().map(|p| p.forward(&x));
        BertOutput {
            last_hidden_state: x,
            pooler_output,
        }
    }

    /// The pooler output `[B, E]` alone (arguments as [`BertModel::forward`]): the last layer
    /// computes only the first position, the one the pooler reads (its attention still runs
    /// over all keys). The values equal `forward(..).pooler_output`; for MiniLM this skips
    /// about a seventh of the forward and backward work. Panics without a pooler.
    pub fn pooled(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> Tensor {
        let pooler = self
            .pooler
            .as_ref()
            .expect("BertModel::pooled: the model has no pooler");
        let (mut x, mask) = self.embed(input_ids, attention_mask, token_type_ids);
        let layers = &self.encoder.layer;
        if let Some((last, rest)) = layers.split_last() {
            for layer in rest {
                x = layer.forward(&x, mask.as_ref());
            }
            x = last.forward_rows(&x.narrow(1, 0, 1), &x, mask.as_ref());
        }
        pooler.forward(&x)
    }

    /// Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the
    /// last hidden states mean-pooled over real tokens, then L2-normalised: `[B, E]`.
    pub fn sentence_embeddings(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> Tensor {
        let out = self.forward(input_ids, attention_mask, token_type_ids);
        l2_normalize(&mean_pooling(&out.last_hidden_state, attention_mask))
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (a HF `BertModel` checkpoint, or a
    /// head's, whose `bert.` prefix is stripped and head tensors ignored). The encoder must load
    /// completely; a missing pooler is freshly initialised.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_pretrained_with(dir, &LoadOptions::default()).map(|(m, _)| m)
    }

    /// [`BertModel::from_pretrained`] with options; also returns what the load found.
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        opts: &LoadOptions,
    ) -> Result<(Self, LoadReport), ModelError> {
        let dir = dir.as_ref();
        let config = opts.config(dir)?;
        let mut rng = Rng::new(opts.seed);
        let mut init = Init::new(&mut rng, DType::F32, config.initializer_range, true);
        let model = Self::build(&config, true, &mut init);
        let report = load_weights(&model, "BertModel", dir, false, opts.strict)?;
        init.draw_missing(&model, &report.missing);
        Ok((model, report))
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (HF names), creating `dir`.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<(), ModelError> {
        save_pretrained(self, &self.config, "BertModel", dir.as_ref())
    }
}

/// Mean of `last_hidden [B, L, E]` over the positions where `attention_mask [B, L]` is nonzero
/// (over all positions without a mask): `[B, E]`.
pub fn mean_pooling(last_hidden: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
    assert!(
        last_hidden.rank() == 3,
        "mean_pooling: last_hidden must be [batch, seq, hidden], got {}",
        last_hidden.shape()
    );
    let Some(mask) = attention_mask else {
        return last_hidden.mean(1, false);
    };
    assert!(
        mask.dims() == &last_hidden.dims()[..2],
        "mean_pooling: attention_mask shape {} does not match last_hidden {}",
        mask.shape(),
        last_hidden.shape()
    );
    let m = mask
        .ne_scalar(0.0)
        .to_dtype(last_hidden.dtype())
        .unsqueeze(-1);
    let summed = last_hidden.mul(&m).sum(1, false);
    let counts = m.sum(1, false).maximum_scalar(1e-9);
    summed.div(&counts)
}

/// Each row of `x [.., E]` divided by its L2 norm (at least 1e-12), as `F.normalize`.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x.square().sum(-1, true).sqrt().maximum_scalar(1e-12);
    x.div(&norm)
}

// ---------------------------------------------------------------------- heads

/// `transformers.BertForSequenceClassification`: `classifier(dropout(pooler_output))`.
#[derive(Module, Debug)]
pub struct BertForSequenceClassification {
    /// The encoder, with pooler.
    pub bert: BertModel,
    /// Dropout (`classifier_dropout`, else `hidden_dropout_prob`).
    pub dropout: Dropout,
    /// `E → num_labels`.
    pub classifier: Linear,
}

/// `transformers.BertForTokenClassification`: `classifier(dropout(last_hidden_state))`; its
/// BertModel has no pooler (as in HF).
#[derive(Module, Debug)]
pub struct BertForTokenClassification {
    /// The encoder, without pooler.
    pub bert: BertModel,
    /// Dropout (`classifier_dropout`, else `hidden_dropout_prob`).
    pub dropout: Dropout,
    /// `E → num_labels`.
    pub classifier: Linear,
}

fn head_parts(config: &BertConfig, pooler: bool, init: &mut Init) -> (BertModel, Dropout, Linear) {
    let bert = BertModel::build(config, pooler, init);
    let p = config
        .classifier_dropout
        .unwrap_or(config.hidden_dropout_prob);
    let dropout = init.dropout(p);
    let classifier = init.linear(config.hidden_size, config.labels.len());
    (bert, dropout, classifier)
}

macro_rules! head_common {
    ($ty:ident, $pooler:expr) => {
        impl $ty {
            /// A freshly initialised f32 model (`config.labels` gives the classes).
            pub fn new(config: &BertConfig, rng: &mut Rng) -> Self {
                Self::with_dtype(config, DType::F32, rng)
            }

            /// A freshly initialised model of `dtype` (f32 or f64).
            pub fn with_dtype(config: &BertConfig, dtype: DType, rng: &mut Rng) -> Self {
                let mut init = Init::new(rng, dtype, config.initializer_range, false);
                let (bert, dropout, classifier) = head_parts(config, $pooler, &mut init);
                $ty {
                    bert,
                    dropout,
                    classifier,
                }
            }

            /// The model's configuration.
            pub fn config(&self) -> &BertConfig {
                self.bert.config()
            }

            /// The class names, by index.
            pub fn labels(&self) -> &[String] {
                &self.bert.config().labels
            }

            /// Loads `dir/config.json` and `dir/model.safetensors`: a checkpoint of this head, or
            /// a bare BertModel's (keys without `bert.`; e.g. all-MiniLM-L6-v2), whose
            /// classifier is then freshly initialised. The encoder must load completely.
            pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
                Self::from_pretrained_with(dir, &LoadOptions::default()).map(|(m, _)| m)
            }

            /// `from_pretrained` with options (e.g. the number of labels of a new classifier);
            /// also returns what the load found (freshly initialised tensors are `missing`).
            pub fn from_pretrained_with(
                dir: impl AsRef<Path>,
                opts: &LoadOptions,
            ) -> Result<(Self, LoadReport), ModelError> {
                let dir = dir.as_ref();
                let config = opts.config(dir)?;
                let mut rng = Rng::new(opts.seed);
                let mut init = Init::new(&mut rng, DType::F32, config.initializer_range, true);
                let (bert, dropout, classifier) = head_parts(&config, $pooler, &mut init);
                let model = $ty {
                    bert,
                    dropout,
                    classifier,
                };
                let report = load_weights(&model, stringify!($ty), dir, true, opts.strict)?;
                init.draw_missing(&model, &report.missing);
                Ok((model, report))
            }

            /// Writes `dir/config.json` and `dir/model.safetensors` (HF names), creating `dir`.
            pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<(), ModelError> {
                save_pretrained(self, self.bert.config(), stringify!($ty), dir.as_ref())
            }
        }
    };
}

head_common!(BertForSequenceClassification, true);
head_common!(BertForTokenClassification, false);

impl BertForSequenceClassification {
    /// Logits `[B, num_labels]` (arguments as [`BertModel::forward`]).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> Tensor {
        let pooled = match self.config().classifier_pooling {
            ClassifierPooling::Cls => self.bert.pooled(input_ids, attention_mask, token_type_ids),
            ClassifierPooling::Mean => {
                let out = self.bert.forward(input_ids, attention_mask, token_type_ids);
                let mean = mean_pooling(&out.last_hidden_state, attention_mask);
                let pooler = self
                    .bert
                    .pooler
                    .as_ref()
                    .expect("the classifier has a pooler");
                pooler.forward(&mean.unsqueeze(1))
            }
        };
        self.classifier.forward(&self.dropout.forward(&pooled))
    }
}

impl BertForTokenClassification {
    /// Logits `[B, L, num_labels]` (arguments as [`BertModel::forward`]).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> Tensor {
        let out = self.bert.forward(input_ids, attention_mask, token_type_ids);
        self.classifier
            .forward(&self.dropout.forward(&out.last_hidden_state))
    }
}

// ---------------------------------------------------------------------- loading and saving

/// Options of `from_pretrained_with`.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Every model tensor must be in the checkpoint and every checkpoint tensor used (default
    /// false: pooler / classifier may be freshly initialised, extra tensors are ignored; both
    /// are listed in the returned report).
    pub strict: bool,
    /// Seed of the fresh initialisation (and dropout masks) (default 0).
    pub seed: u64,
    /// Class names replacing the config's (e.g. a new classifier with another label count).
    pub labels: Option<Vec<String>>,
    /// Pooling of a sequence-classification head replacing the config's.
    pub classifier_pooling: Option<ClassifierPooling>,
}

impl LoadOptions {
    /// Sets strict loading.
    pub fn strict(mut self, on: bool) -> Self {
        self.strict = on;
        self
    }

    /// Sets the initialisation seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Uses `n` classes named `LABEL_i`.
    pub fn num_labels(mut self, n: usize) -> Self {
        self.labels = Some(default_labels(n));
        self
    }

    /// Uses the given class names.
    pub fn labels(mut self, labels: Vec<String>) -> Self {
        self.labels = Some(labels);
        self
    }

    /// Sets what a sequence-classification head reads.
    pub fn classifier_pooling(mut self, pooling: ClassifierPooling) -> Self {
        self.classifier_pooling = Some(pooling);
        self
    }

    fn config(&self, dir: &Path) -> Result<BertConfig, ModelError> {
        let path = dir.join("config.json");
        let mut config = BertConfig::from_file(&path)?;
        if let Some(labels) = &self.labels {
            if labels.is_empty() {
                return Err(ModelError::ConfigField {
                    origin: "LoadOptions".to_string(),
                    field: "labels".to_string(),
                    message: "must not be empty".to_string(),
                });
            }
            config.labels = labels.clone();
        }
        if let Some(p) = self.classifier_pooling {
            config.classifier_pooling = p;
        }
        Ok(config)
    }
}

/// The key map from a HF BERT checkpoint to a kiln model: TF-era `gamma`/`beta` names, the
/// `position_ids` buffer dropped, and the `bert.` prefix stripped (for a bare model) or added
/// to a bare checkpoint (for a head).
pub fn bert_key_map(checkpoint: &kiln_nn::StateDict, head: bool) -> KeyMap {
    let map = KeyMap::new()
        .rename_suffix("gamma", "weight")
        .rename_suffix("beta", "bias")
        .drop_suffix("embeddings.position_ids");
    let bare = !checkpoint.iter().any(|(k, _)| k.starts_with("bert."));
    match (head, bare) {
        (false, _) => map.strip_prefix("bert."),
        (true, true) => map.add_prefix("bert."),
        (true, false) => map,
    }
}

/// Reads `dir/model.safetensors`, remaps it and loads it into `model`. Non-strict: the encoder
/// (`embeddings.*`, `encoder.*`) must load completely, anything else may stay fresh.
fn load_weights<M: Module>(
    model: &M,
    name: &'static str,
    dir: &Path,
    head: bool,
    strict: bool,
) -> Result<LoadReport, ModelError> {
    let path = dir.join("model.safetensors");
    if !path.is_file() {
        return Err(ModelError::MissingFile {
            path,
            what: "the model's weights (model.safetensors)",
        });
    }
    let raw = load_safetensors(&path)?;
    let sd = bert_key_map(&raw, head).apply(&raw)?;
    drop(raw);
    let misfit = |message: String| ModelError::Checkpoint {
        path: path.clone(),
        model: name,
        message,
    };
    let mode = if strict {
        LoadMode::Strict
    } else {
        LoadMode::NonStrict
    };
    let report = model.load_state_dict(&sd, mode).map_err(|e| match e {
        NnError::StateDict(m) => misfit(m),
        other => ModelError::Nn(other),
    })?;
    let encoder = if head { "bert." } else { "" };
    let missing_encoder: Vec<&str> = report
        .missing
        .iter()
        .map(String::as_str)
        .filter(|k| {
            let k = k.strip_prefix(encoder).unwrap_or(k);
            k.starts_with("embeddings.") || k.starts_with("encoder.")
        })
        .collect();
    if !missing_encoder.is_empty() {
        let shown: Vec<&str> = missing_encoder.iter().take(8).copied().collect();
        return Err(misfit(format!(
            "{} encoder tensors missing: {}{} (checkpoint keys look like: {})",
            missing_encoder.len(),
            shown.join(", "),
            if missing_encoder.len() > shown.len() {
                ", ..."
            } else {
                ""
            },
            sd.iter()
                .take(4)
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // The file's tensors (and any dtype conversions) were copied into the parameters; without
    // this their buffers would stay in the allocator's cache for the life of the process
    // (≈ 250 MB for MiniLM, a fifth of a fine-tuning step's peak RSS), in size classes the
    // step's activations mostly do not reuse.
    drop(sd);
    kiln_core::alloc::empty_cache();
    Ok(report)
}

fn save_pretrained<M: Module>(
    model: &M,
    config: &BertConfig,
    architecture: &str,
    dir: &Path,
) -> Result<(), ModelError> {
    let io = |path: &Path, e: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, config.to_json(Some(architecture)) + "\n")
        .map_err(|e| io(&cfg_path, e))?;
    model.save_safetensors(dir.join("model.safetensors"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::write_safetensors;
    use kiln_nn::layers::gradcheck_module;
    use kiln_nn::StateDict;

    fn tiny() -> BertConfig {
        BertConfig::small(12, 16, 2, 4).max_position_embeddings(8)
    }

    fn ids(rows: &[&[i64]]) -> Tensor {
        let l = rows[0].len();
        Tensor::from_vec(rows.concat(), [rows.len(), l])
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        a.to_f64_vec()
            .iter()
            .zip(b.to_f64_vec())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-bert-{tag}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const MINILM_CONFIG: &str = r#"{
      "_name_or_path": "nreimers/MiniLM-L6-H384-uncased",
      "architectures": ["BertModel"],
      "attention_probs_dropout_prob": 0.1,
      "gradient_checkpointing": false,
      "hidden_act": "gelu",
      "hidden_dropout_prob": 0.1,
      "hidden_size": 384,
      "initializer_range": 0.02,
      "intermediate_size": 1536,
      "layer_norm_eps": 1e-12,
      "max_position_embeddings": 512,
      "model_type": "bert",
      "num_attention_heads": 12,
      "num_hidden_layers": 6,
      "pad_token_id": 0,
      "position_embedding_type": "absolute",
      "transformers_version": "4.8.2",
      "type_vocab_size": 2,
      "use_cache": true,
      "vocab_size": 30522
    }"#;

    #[test]
    fn config_parses_hf_json_with_defaults_and_round_trips() {
        let c = BertConfig::from_json_str(MINILM_CONFIG, "config.json").unwrap();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
            (384, 6, 12)
        );
        assert_eq!(c.intermediate_size, 1536);
        assert_eq!(c.hidden_act, HiddenAct::Gelu);
        assert_eq!(c.labels, ["LABEL_0", "LABEL_1"]);
        assert_eq!(c.extra["transformers_version"], "4.8.2");
        // Absent fields take HF's defaults.
        let d = BertConfig::from_json_str(r#"{"model_type": "bert"}"#, "c.json").unwrap();
        assert_eq!(d, BertConfig::default());
        // to_json writes HF's layout and reads back identically.
        let text = c.to_json(Some("BertForSequenceClassification"));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["architectures"][0], "BertForSequenceClassification");
        assert_eq!(v["id2label"]["1"], "LABEL_1");
        assert_eq!(v["label2id"]["LABEL_0"], 0);
        assert_eq!(v["layer_norm_eps"], 1e-12);
        assert_eq!(v["use_cache"], true);
        assert_eq!(BertConfig::from_json_str(&text, "back").unwrap(), c);
        let relu = c
            .clone()
            .hidden_act(HiddenAct::Relu)
            .labels(vec!["neg".into(), "pos".into()]);
        let back = BertConfig::from_json_str(&relu.to_json(None), "back").unwrap();
        assert_eq!(back, relu);
        assert_eq!(back.label_count(), 2);
        assert_eq!(
            BertConfig::from_json_str(r#"{"hidden_act": "gelu_new"}"#, "c")
                .unwrap()
                .hidden_act,
            HiddenAct::GeluNew
        );
    }

    #[test]
    fn config_errors_name_file_and_field() {
        let err = |s: &str| {
            BertConfig::from_json_str(s, "m/config.json")
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(r#"{"hidden_act": "swish"}"#),
            "m/config.json: field `hidden_act`: unsupported activation \"swish\" (supported: gelu, gelu_new, relu)"
        );
        assert_eq!(
            err(r#"{"position_embedding_type": "relative_key"}"#),
            "m/config.json: field `position_embedding_type`: \"relative_key\" is not supported (only \"absolute\" is)"
        );
        assert_eq!(
            err(r#"{"model_type": "gpt2"}"#),
            "m/config.json: field `model_type` is \"gpt2\", expected \"bert\""
        );
        assert_eq!(
            err(r#"{"hidden_size": 10, "num_attention_heads": 4}"#),
            "m/config.json: field `num_attention_heads`: 4 does not divide hidden_size 10"
        );
        assert!(err(r#"{"hidden_size": "big"}"#)
            .starts_with("m/config.json: field `hidden_size`: invalid type: string \"big\""));
        assert_eq!(
            err(r#"{"hidden_dropout_prob": 1.5}"#),
            "m/config.json: field `hidden_dropout_prob`: must be in [0, 1], got 1.5"
        );
        assert_eq!(
            err(r#"{"vocab_size": 0}"#),
            "m/config.json: field `vocab_size`: must be positive, got 0"
        );
        assert_eq!(
            err(r#"{"classifier_pooling": "max"}"#),
            "m/config.json: field `classifier_pooling`: \"max\" is not supported (use \"cls\" or \"mean\")"
        );
    }

    #[test]
    fn mean_pooling_classifier_reads_the_masked_mean_and_round_trips() {
        let mut config = tiny();
        config.classifier_pooling = ClassifierPooling::Mean;
        let m = BertForSequenceClassification::new(&config, &mut Rng::new(3));
        m.eval();
        // Padding does not move the logits: the mean is over real tokens only.
        let alone = m.forward(&ids(&[&[2, 5, 7]]), None, None);
        let batch = ids(&[&[2, 5, 7, 0, 0], &[3, 4, 5, 6, 1]]);
        let mask = ids(&[&[1, 1, 1, 0, 0], &[1, 1, 1, 1, 1]]);
        let logits = m.forward(&batch, Some(&mask), None);
        assert!(max_abs_diff(&logits.narrow(0, 0, 1), &alone) < 1e-5);
        // It is the pooler's dense + tanh on the masked mean, then the classifier.
        let hidden = m.bert.forward(&batch, Some(&mask), None).last_hidden_state;
        let mean = mean_pooling(&hidden, Some(&mask));
        let dense = m.bert.pooler.as_ref().unwrap().dense.forward(&mean).tanh();
        assert!(max_abs_diff(&m.classifier.forward(&dense), &logits) < 1e-6);
        // ...which differs from reading [CLS] with the same weights.
        let cls = m.bert.pooled(&batch, Some(&mask), None);
        assert!(max_abs_diff(&m.classifier.forward(&cls), &logits) > 1e-4);
        // Saved in config.json and read back; the default stays out of the file.
        let json = config.to_json_value(None);
        assert_eq!(json["classifier_pooling"], "mean");
        let back = BertConfig::from_json_str(&json.to_string(), "c").unwrap();
        assert_eq!(back.classifier_pooling, ClassifierPooling::Mean);
        assert!(tiny()
            .to_json_value(None)
            .get("classifier_pooling")
            .is_none());
    }

    #[test]
    fn parameter_names_are_hf_names() {
        let c = BertConfig::small(12, 16, 1, 4);
        let m = BertModel::new(&c, &mut Rng::new(0));
        let names: Vec<String> = m.state_dict().iter().map(|(n, _)| n.to_string()).collect();
        let want = [
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.0.attention.self.query.bias",
            "encoder.layer.0.attention.self.key.weight",
            "encoder.layer.0.attention.self.key.bias",
            "encoder.layer.0.attention.self.value.weight",
            "encoder.layer.0.attention.self.value.bias",
            "encoder.layer.0.attention.output.dense.weight",
            "encoder.layer.0.attention.output.dense.bias",
            "encoder.layer.0.attention.output.LayerNorm.weight",
            "encoder.layer.0.attention.output.LayerNorm.bias",
            "encoder.layer.0.intermediate.dense.weight",
            "encoder.layer.0.intermediate.dense.bias",
            "encoder.layer.0.output.dense.weight",
            "encoder.layer.0.output.dense.bias",
            "encoder.layer.0.output.LayerNorm.weight",
            "encoder.layer.0.output.LayerNorm.bias",
            "pooler.dense.weight",
            "pooler.dense.bias",
        ];
        assert_eq!(names, want);
        assert_eq!(
            m.encoder.layer[0].intermediate.dense.weight.dims(),
            &[64, 16]
        );
        // HF's init: pad row of the word embeddings is zero, layer norms are identity.
        let w = m.embeddings.word_embeddings.weight.to_vec::<f32>();
        assert!(w[..16].iter().all(|&v| v == 0.0) && w[16..].iter().any(|&v| v != 0.0));
        let seq = BertForSequenceClassification::new(&c.clone().num_labels(3), &mut Rng::new(0));
        let names: Vec<String> = seq
            .state_dict()
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(names.len(), want.len() + 2);
        assert_eq!(names[0], "bert.embeddings.word_embeddings.weight");
        assert!(names.contains(&"bert.pooler.dense.bias".to_string()));
        assert_eq!(
            &names[names.len() - 2..],
            ["classifier.weight", "classifier.bias"]
        );
        assert_eq!(seq.classifier.weight.dims(), &[3, 16]);
        let tok = BertForTokenClassification::new(&c, &mut Rng::new(0));
        let names: Vec<String> = tok
            .state_dict()
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(names.len(), want.len());
        assert!(!names.iter().any(|n| n.contains("pooler")));
    }

    #[test]
    fn padding_is_masked_out_and_pooling_ignores_it() {
        let m = BertModel::new(&tiny(), &mut Rng::new(1));
        m.eval();
        let alone = m.forward(&ids(&[&[2, 5, 7]]), None, None);
        let batch = ids(&[&[2, 5, 7, 0, 0], &[3, 4, 5, 6, 1]]);
        let mask = ids(&[&[1, 1, 1, 0, 0], &[1, 1, 1, 1, 1]]);
        let out = m.forward(&batch, Some(&mask), None);
        assert_eq!(out.last_hidden_state.dims(), &[2, 5, 16]);
        let padded = out.last_hidden_state.narrow(0, 0, 1).narrow(1, 0, 3);
        assert!(max_abs_diff(&padded, &alone.last_hidden_state) < 1e-5);
        let pooled = out.pooler_output.unwrap();
        assert_eq!(pooled.dims(), &[2, 16]);
        assert!(max_abs_diff(&pooled.narrow(0, 0, 1), &alone.pooler_output.unwrap()) < 1e-5);
        // Mean pooling over real tokens only; embeddings have unit norm.
        let e = m.sentence_embeddings(&batch, Some(&mask), None);
        let e_alone = m.sentence_embeddings(&ids(&[&[2, 5, 7]]), None, None);
        assert!(max_abs_diff(&e.narrow(0, 0, 1), &e_alone) < 1e-5);
        for row in e.to_vec::<f32>().chunks(16) {
            let n: f32 = row.iter().map(|v| v * v).sum();
            assert!((n - 1.0).abs() < 1e-5, "{n}");
        }
        // A float mask works the same as an integer one; token type 0 given = default.
        let fmask = mask.to_dtype(DType::F32);
        let types = Tensor::zeros_dtype([2, 5], DType::I64);
        let o2 = m.forward(&batch, Some(&fmask), Some(&types));
        assert!(max_abs_diff(&o2.last_hidden_state, &out.last_hidden_state) < 1e-6);
        // mean_pooling equals a hand-written masked mean.
        let h = Tensor::from_vec((0..12).map(|v| v as f32).collect::<Vec<_>>(), [2, 3, 2]);
        let pm = ids(&[&[1, 1, 0], &[1, 0, 0]]);
        assert_eq!(
            mean_pooling(&h, Some(&pm)).to_vec::<f32>(),
            [1.0, 2.0, 6.0, 7.0]
        );
        assert_eq!(mean_pooling(&h, None).to_vec::<f32>(), [2.0, 3.0, 8.0, 9.0]);
        let n = l2_normalize(&Tensor::from_slice(&[3f32, 4.0, 0.0, 0.0], [2, 2]));
        assert_eq!(n.to_vec::<f32>(), [0.6, 0.8, 0.0, 0.0]);
    }

    #[test]
    fn dropout_only_in_training_and_token_types_matter() {
        let m = BertModel::new(&tiny(), &mut Rng::new(2));
        let x = ids(&[&[2, 5, 7, 9]]);
        let a = m.forward(&x, None, None).last_hidden_state;
        let b = m.forward(&x, None, None).last_hidden_state;
        assert!(
            max_abs_diff(&a, &b) > 1e-3,
            "dropout is active in training mode"
        );
        m.eval();
        let a = m.forward(&x, None, None).last_hidden_state;
        let b = m.forward(&x, None, None).last_hidden_state;
        assert_eq!(a.to_vec::<f32>(), b.to_vec::<f32>());
        let t = m
            .forward(&x, None, Some(&ids(&[&[0, 0, 1, 1]])))
            .last_hidden_state;
        assert!(max_abs_diff(&a, &t) > 1e-3);
        // Without dropout, training and evaluation agree.
        let m0 = BertModel::new(&tiny().dropout(0.0), &mut Rng::new(2));
        let a = m0.forward(&x, None, None).last_hidden_state;
        m0.eval();
        assert!(max_abs_diff(&a, &m0.forward(&x, None, None).last_hidden_state) < 1e-7);
    }

    #[test]
    #[should_panic(
        expected = "BertModel: input_ids must be an integer [batch, seq] tensor, got f32 [4]"
    )]
    fn rejects_float_or_1d_ids() {
        let m = BertModel::new(&tiny(), &mut Rng::new(0));
        m.forward(&Tensor::zeros([4]), None, None);
    }

    #[test]
    #[should_panic(
        expected = "BertModel: attention_mask shape [1, 3] does not match input_ids [1, 4]"
    )]
    fn rejects_mask_of_other_shape() {
        let m = BertModel::new(&tiny(), &mut Rng::new(0));
        m.forward(&ids(&[&[1, 2, 3, 4]]), Some(&ids(&[&[1, 1, 1]])), None);
    }

    #[test]
    #[should_panic(
        expected = "BertModel: sequence length 9 of input_ids [1, 9] must be in 1..=8 (max_position_embeddings)"
    )]
    fn rejects_too_long_sequences() {
        let m = BertModel::new(&tiny(), &mut Rng::new(0));
        m.forward(&Tensor::zeros_dtype([1, 9], DType::I64), None, None);
    }

    #[test]
    fn save_pretrained_round_trips_and_heads_load_bare_checkpoints() {
        let dir = temp_dir("roundtrip");
        let c = tiny();
        let m = BertModel::new(&c, &mut Rng::new(4));
        m.eval();
        m.save_pretrained(&dir).unwrap();
        let (back, report) =
            BertModel::from_pretrained_with(&dir, &LoadOptions::default().strict(true)).unwrap();
        back.eval();
        assert_eq!(report.loaded.len(), m.state_dict().len());
        assert_eq!(back.config(), m.config());
        for ((n, a), (_, b)) in m.state_dict().iter().zip(back.state_dict().iter()) {
            assert_eq!(a.to_vec::<f32>(), b.to_vec::<f32>(), "{n}");
        }
        let x = ids(&[&[2, 5, 7, 1]]);
        assert_eq!(
            m.forward(&x, None, None).last_hidden_state.to_vec::<f32>(),
            back.forward(&x, None, None)
                .last_hidden_state
                .to_vec::<f32>()
        );
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"][0], "BertModel");

        // A bare checkpoint into a head: `bert.` added, classifier fresh and reported missing.
        let opts = LoadOptions::default().num_labels(3).seed(9);
        let (seq, report) =
            BertForSequenceClassification::from_pretrained_with(&dir, &opts).unwrap();
        assert_eq!(report.missing, ["classifier.weight", "classifier.bias"]);
        assert!(report.unexpected.is_empty());
        assert_eq!(seq.labels().len(), 3);
        assert_eq!(
            seq.bert
                .pooler
                .as_ref()
                .unwrap()
                .dense
                .weight
                .to_vec::<f32>(),
            m.pooler.as_ref().unwrap().dense.weight.to_vec::<f32>()
        );
        let e = BertForSequenceClassification::from_pretrained_with(
            &dir,
            &LoadOptions::default().strict(true),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("checkpoint does not fit BertForSequenceClassification")
                && e.contains("missing: classifier.weight, classifier.bias"),
            "{e}"
        );
        // The token head has no pooler: the checkpoint's pooler is reported unexpected.
        let (tok, report) = BertForTokenClassification::from_pretrained_with(&dir, &opts).unwrap();
        assert_eq!(
            report.unexpected,
            ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
        );
        tok.eval();
        assert_eq!(tok.forward(&x, None, None).dims(), &[1, 4, 3]);

        // A head round-trips too, labels included, and loads back into a bare BertModel.
        seq.eval();
        let hdir = dir.join("head");
        seq.save_pretrained(&hdir).unwrap();
        let seq2 = BertForSequenceClassification::from_pretrained(&hdir).unwrap();
        seq2.eval();
        assert_eq!(seq2.labels(), ["LABEL_0", "LABEL_1", "LABEL_2"]);
        assert_eq!(
            seq.forward(&x, None, None).to_vec::<f32>(),
            seq2.forward(&x, None, None).to_vec::<f32>()
        );
        let (bare, report) =
            BertModel::from_pretrained_with(&hdir, &LoadOptions::default()).unwrap();
        // Checkpoint keys come sorted.
        assert_eq!(report.unexpected, ["classifier.bias", "classifier.weight"]);
        assert_eq!(bare.state_dict().len(), report.loaded.len());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn loading_draws_only_the_missing_weights_and_the_same_values_as_an_eager_build() {
        let dir = temp_dir("deferred");
        let c = tiny();
        let saved = BertModel::with_dtype(&c, DType::F32, false, &mut Rng::new(4));
        saved.save_pretrained(&dir).unwrap();
        let opts = LoadOptions::default().num_labels(3).seed(9);
        let (seq, report) =
            BertForSequenceClassification::from_pretrained_with(&dir, &opts).unwrap();
        assert_eq!(
            report.missing,
            [
                "bert.pooler.dense.weight",
                "bert.pooler.dense.bias",
                "classifier.weight",
                "classifier.bias"
            ]
        );
        // The new pooler and classifier: as `new` with the same seed draws them.
        let eager = BertForSequenceClassification::new(seq.config(), &mut Rng::new(9));
        let fresh = |m: &BertForSequenceClassification| {
            let pooler = &m.bert.pooler.as_ref().unwrap().dense.weight;
            (pooler.to_vec::<f32>(), m.classifier.weight.to_vec::<f32>())
        };
        let (pooler, classifier) = fresh(&seq);
        assert_eq!((&pooler, &classifier), (&fresh(&eager).0, &fresh(&eager).1));
        assert!(pooler.iter().chain(&classifier).all(|v| v.is_finite()));
        assert!(pooler.iter().any(|&v| v != 0.0) && classifier.iter().any(|&v| v != 0.0));
        // The encoder: the checkpoint's values, not the seed's.
        let word = |m: &BertModel| m.embeddings.word_embeddings.weight.to_vec::<f32>();
        assert_eq!(word(&seq.bert), word(&saved));
        assert_ne!(word(&seq.bert), word(&eager.bert));
        // The token head (no pooler) draws its classifier the same way.
        let (tok, _) = BertForTokenClassification::from_pretrained_with(&dir, &opts).unwrap();
        let eager_tok = BertForTokenClassification::new(tok.config(), &mut Rng::new(9));
        assert_eq!(
            tok.classifier.weight.to_vec::<f32>(),
            eager_tok.classifier.weight.to_vec::<f32>()
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn from_pretrained_errors_are_precise() {
        let dir = temp_dir("errors");
        let e = BertModel::from_pretrained(&dir).unwrap_err().to_string();
        assert!(
            e.ends_with("config.json: file not found (the model's config.json)"),
            "{e}"
        );
        std::fs::write(dir.join("config.json"), tiny().to_json(None)).unwrap();
        let e = BertModel::from_pretrained(&dir).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "model.safetensors: file not found (the model's weights (model.safetensors))"
            ),
            "{e}"
        );
        // TF-era names and the position_ids buffer are accepted.
        let m = BertModel::new(&tiny(), &mut Rng::new(5));
        let mut sd = StateDict::new();
        for (n, t) in m.state_dict().iter() {
            let n = n
                .replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta");
            sd.insert(format!("bert.{n}"), t.clone());
        }
        sd.insert(
            "bert.embeddings.position_ids",
            Tensor::arange_i64(0, 8, 1).reshape([1, 8]),
        );
        let save = |sd: &StateDict| write_safetensors(sd, &dir.join("model.safetensors"));
        save(&sd);
        let back = BertModel::from_pretrained_with(&dir, &LoadOptions::default().strict(true))
            .unwrap()
            .0;
        assert_eq!(
            back.embeddings
                .layer_norm
                .weight
                .as_ref()
                .unwrap()
                .to_vec::<f32>(),
            m.embeddings
                .layer_norm
                .weight
                .as_ref()
                .unwrap()
                .to_vec::<f32>()
        );
        // A mis-shaped tensor names the key and both shapes.
        let mut bad = sd.clone();
        bad.insert(
            "bert.encoder.layer.1.intermediate.dense.weight",
            Tensor::zeros([64, 15]),
        );
        save(&bad);
        let e = BertModel::from_pretrained(&dir).unwrap_err().to_string();
        assert!(
            e.contains("checkpoint does not fit BertModel")
                && e.contains("shape mismatch for encoder.layer.1.intermediate.dense.weight: module [64, 16], state dict [64, 15]"),
            "{e}"
        );
        // Encoder tensors may not be missing, even when not strict.
        let partial: StateDict = sd
            .iter()
            .filter(|(n, _)| !n.contains("layer.1.output"))
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        save(&partial);
        let e = BertModel::from_pretrained(&dir).unwrap_err().to_string();
        assert!(
            e.contains("4 encoder tensors missing: encoder.layer.1.output.dense.weight"),
            "{e}"
        );
        // Another architecture's config.
        std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
        let e = BertForTokenClassification::from_pretrained(&dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("config.json: field `model_type` is \"gpt2\", expected \"bert\""),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// BertModel with fixed inputs as a one-tensor `Forward`, for `gradcheck_module`.
    #[derive(Module)]
    struct Probe {
        bert: BertModel,
        #[module(skip)]
        ids: Tensor,
        #[module(skip)]
        mask: Tensor,
        #[module(skip)]
        types: Tensor,
        /// Check `BertModel::pooled` instead of `forward`.
        #[module(skip)]
        pooled_only: bool,
    }

    impl Forward for Probe {
        fn forward(&self, _x: &Tensor) -> Tensor {
            if self.pooled_only {
                return self
                    .bert
                    .pooled(&self.ids, Some(&self.mask), Some(&self.types));
            }
            let o = self
                .bert
                .forward(&self.ids, Some(&self.mask), Some(&self.types));
            let pooled = o.pooler_output.unwrap();
            let n = o.last_hidden_state.elem_count();
            let m = pooled.elem_count();
            Tensor::cat(&[o.last_hidden_state.reshape([n]), pooled.reshape([m])], 0)
        }
    }

    #[test]
    fn gradients_reach_every_parameter_and_match_finite_differences_f64() {
        let c = BertConfig::small(12, 16, 2, 4).max_position_embeddings(8);
        let bert = BertModel::with_dtype(&c, DType::F64, true, &mut Rng::new(3));
        bert.eval();
        // Backward from the pooled output reaches every parameter.
        let x = ids(&[&[2, 5, 7, 0], &[3, 4, 5, 6]]);
        let mask = ids(&[&[1, 1, 1, 0], &[1, 1, 1, 1]]);
        let types = ids(&[&[0, 0, 1, 1], &[0, 1, 1, 1]]);
        let o = bert.forward(&x, Some(&mask), Some(&types));
        o.pooler_output.unwrap().sum_all().backward();
        for (n, p) in bert.named_parameters() {
            let g = p.grad().unwrap_or_else(|| panic!("{n} has no gradient"));
            assert!(
                g.to_f64_vec().iter().any(|v| *v != 0.0),
                "{n}: zero gradient"
            );
            p.zero_grad();
        }
        // Every parameter's gradient against central differences (one short sequence keeps
        // the ~7k perturbations cheap; the padded batch is covered above and in parity tests).
        let probe = Probe {
            bert,
            ids: ids(&[&[2, 5, 7, 0, 0]]),
            mask: ids(&[&[1, 1, 1, 1, 0]]),
            types: ids(&[&[0, 0, 1, 1, 0]]),
            pooled_only: false,
        };
        gradcheck_module(&probe, &Tensor::zeros_dtype([1], DType::F64)).unwrap();
    }

    #[test]
    fn pooled_equals_the_full_forward_in_values_and_gradients() {
        let c = BertConfig::small(12, 16, 2, 4).max_position_embeddings(8);
        let bert = BertModel::with_dtype(&c, DType::F64, true, &mut Rng::new(5));
        bert.eval();
        let x = ids(&[&[2, 5, 7, 0], &[3, 4, 5, 6]]);
        let mask = ids(&[&[1, 1, 1, 0], &[1, 1, 1, 1]]);
        let types = ids(&[&[0, 0, 1, 1], &[0, 1, 1, 1]]);
        // A non-uniform weighting of the outputs, so every gradient entry is exercised.
        let w = Tensor::randn_f64([2, 16], 9);
        let full = bert
            .forward(&x, Some(&mask), Some(&types))
            .pooler_output
            .unwrap();
        full.mul(&w).sum_all().backward();
        let want: Vec<(String, Vec<f64>)> = bert
            .named_parameters()
            .into_iter()
            .map(|(n, p)| {
                let g = p.grad().unwrap().to_f64_vec();
                p.zero_grad();
                (n, g)
            })
            .collect();
        let got = bert.pooled(&x, Some(&mask), Some(&types));
        assert_eq!(got.dims(), &[2, 16]);
        assert!(max_abs_diff(&got, &full) < 1e-12);
        got.mul(&w).sum_all().backward();
        for ((n, g), (_, p)) in want.iter().zip(bert.named_parameters()) {
            let h = p.grad().unwrap().to_f64_vec();
            let d = g
                .iter()
                .zip(&h)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(d < 1e-12, "{n}: gradients differ by {d}");
        }
        // And against central differences, for every parameter.
        let probe = Probe {
            bert,
            ids: ids(&[&[2, 5, 7, 0, 0]]),
            mask: ids(&[&[1, 1, 1, 1, 0]]),
            types: ids(&[&[0, 0, 1, 1, 0]]),
            pooled_only: true,
        };
        gradcheck_module(&probe, &Tensor::zeros_dtype([1], DType::F64)).unwrap();
    }

    #[test]
    #[should_panic(expected = "BertModel::pooled: the model has no pooler")]
    fn pooled_without_pooler_panics() {
        let m = BertModel::with_dtype(&tiny(), DType::F32, false, &mut Rng::new(0));
        m.pooled(&ids(&[&[2, 5]]), None, None);
    }
}
