//! Loading a model from a path and the [`Backend`] trait the worker thread runs.
//!
//! [`load_model`] tells the kind from the path: a `.gguf` file (or a directory whose
//! config.json is a Llama's) is a causal LM; a directory whose config.json has `id2label` and
//! the architecture `BertForSequenceClassification` is a classifier (which also serves
//! embeddings from its encoder); any other BERT directory is a sentence embedder.

use crate::error::ServeError;
use kiln_core::{DType, Tensor};
use kiln_data::{ChatTemplate, Tokenizer};
use kiln_models::{
    step_many, BertForSequenceClassification, BertModel, CausalLm, GenerationConfig,
    LlamaForCausalLM, QuantActivations, Sequence, StopReason,
};
use kiln_nn::ModuleExt;
use std::collections::HashMap;
use std::path::Path;

/// What a served model can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Text classification (`/v1/classify`) and embeddings from its encoder (`/v1/embeddings`).
    Classifier,
    /// Sentence embeddings (`/v1/embeddings`).
    Embedder,
    /// Text generation (`/v1/completions`, `/v1/chat/completions`).
    CausalLm,
}

impl ModelKind {
    /// `classifier`, `embedder` or `causal-lm`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Classifier => "classifier",
            ModelKind::Embedder => "embedder",
            ModelKind::CausalLm => "causal-lm",
        }
    }

    /// True when the model answers `/v1/classify`.
    pub fn classifies(self) -> bool {
        self == ModelKind::Classifier
    }

    /// True when the model answers `/v1/embeddings`.
    pub fn embeds(self) -> bool {
        matches!(self, ModelKind::Classifier | ModelKind::Embedder)
    }

    /// True when the model answers the completion endpoints.
    pub fn generates(self) -> bool {
        self == ModelKind::CausalLm
    }
}

/// What the request handlers need to know about the model (shared, read-only).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The served name.
    pub name: String,
    /// What it does.
    pub kind: ModelKind,
    /// Its tokenizer (requests are tokenized by the handlers; the worker gets ids).
    pub tokenizer: Tokenizer,
    /// Class names by index (classifiers; empty otherwise).
    pub labels: Vec<String>,
    /// Most positions the model takes.
    pub max_positions: usize,
    /// The chat template (causal LMs that have one).
    pub chat_template: Option<ChatTemplate>,
    /// Tokens that end generation (EOS, `<|im_end|>`).
    pub stop_tokens: Vec<u32>,
}

/// Names one generation in progress inside a [`Backend`] (chosen by the worker).
pub type SeqId = u64;

/// The model computation the worker thread runs. Methods may panic: the worker catches it and
/// answers 500. `rows` are token ids with special tokens, unpadded.
///
/// Generation is stepwise, so that the worker can decode every generation in progress
/// together: [`Backend::start`] sets one up, [`Backend::step`] adds a token to each of several,
/// and [`Backend::finish`] drops one. Models that do not generate keep the defaults (errors).
pub trait Backend: Send {
    /// Class probabilities, one row per text, in label order.
    fn classify(&mut self, rows: &[&[u32]]) -> Result<Vec<Vec<f64>>, String>;
    /// Unit-norm sentence embeddings, one per text.
    fn embed(&mut self, rows: &[&[u32]]) -> Result<Vec<Vec<f32>>, String>;
    /// Sets up generation `id` of `prompt` (an error for a bad prompt or setting); nothing
    /// runs until its first step.
    fn start(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        config: &GenerationConfig,
    ) -> Result<(), String> {
        let _ = (id, prompt, config);
        Err("this model does not generate text".into())
    }
    /// Adds one token to each generation in `ids` (together, where the model can): the new
    /// tokens in order, each with the reason when it ended its generation (a stop token or the
    /// token budget).
    fn step(&mut self, ids: &[SeqId]) -> Result<Vec<(u32, Option<StopReason>)>, String> {
        let _ = ids;
        Err("this model does not generate text".into())
    }
    /// Drops generation `id` (ended, cancelled or failed); unknown ids are ignored.
    fn finish(&mut self, id: SeqId) {
        let _ = id;
    }
}

/// A model ready to serve: its description and its computation.
pub struct LoadedModel {
    /// Name, kind, tokenizer and limits.
    pub info: ModelInfo,
    /// The computation (moved to the worker thread).
    pub backend: Box<dyn Backend>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// `[B, L]` I64 ids (padded with `pad`), the attention mask and zero token types.
fn pad_rows(rows: &[&[u32]], pad: i64, mask_dtype: DType) -> (Tensor, Tensor, Tensor) {
    let b = rows.len();
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![pad; b * width];
    let mut mask = vec![0i64; b * width];
    for (r, row) in rows.iter().enumerate() {
        for (c, &t) in row.iter().enumerate() {
            ids[r * width + c] = t as i64;
            mask[r * width + c] = 1;
        }
    }
    (
        Tensor::from_vec(ids, [b, width]),
        Tensor::from_vec(mask, [b, width]).to_dtype(mask_dtype),
        Tensor::from_vec(vec![0i64; b * width], [b, width]),
    )
}

fn embed_with(bert: &BertModel, rows: &[&[u32]], pad: i64) -> Vec<Vec<f32>> {
    let (ids, mask, types) = pad_rows(rows, pad, DType::F32);
    let emb = bert.sentence_embeddings(&ids, Some(&mask), Some(&types));
    let dim = emb.dim(1);
    emb.to_dtype(DType::F32)
        .to_vec::<f32>()
        .chunks(dim)
        .map(<[f32]>::to_vec)
        .collect()
}

struct ClassifierBackend {
    model: BertForSequenceClassification,
    pad: i64,
}

impl Backend for ClassifierBackend {
    fn classify(&mut self, rows: &[&[u32]]) -> Result<Vec<Vec<f64>>, String> {
        let (ids, mask, types) = pad_rows(rows, self.pad, DType::I64);
        let logits = self.model.forward(&ids, Some(&mask), Some(&types));
        let n = self.model.labels().len();
        let probs: Vec<f64> = logits.softmax(-1).to_dtype(DType::F64).to_vec();
        Ok(probs.chunks(n).map(<[f64]>::to_vec).collect())
    }

    fn embed(&mut self, rows: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        Ok(embed_with(&self.model.bert, rows, self.pad))
    }
}

struct EmbedderBackend {
    model: BertModel,
    pad: i64,
}

impl Backend for EmbedderBackend {
    fn classify(&mut self, _: &[&[u32]]) -> Result<Vec<Vec<f64>>, String> {
        Err("a sentence embedder has no classifier head".into())
    }

    fn embed(&mut self, rows: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        Ok(embed_with(&self.model, rows, self.pad))
    }
}

/// A causal LM and its generations in progress.
struct LmBackend<M: CausalLm> {
    model: M,
    running: HashMap<SeqId, Sequence<M::Cache>>,
}

impl<M> Backend for LmBackend<M>
where
    M: CausalLm + Send,
    M::Cache: Send,
{
    fn classify(&mut self, _: &[&[u32]]) -> Result<Vec<Vec<f64>>, String> {
        Err("a causal language model does not classify".into())
    }

    fn embed(&mut self, _: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        Err("a causal language model does not serve embeddings".into())
    }

    fn start(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        config: &GenerationConfig,
    ) -> Result<(), String> {
        let seq = Sequence::new(&self.model, prompt, config.clone())?;
        self.running.insert(id, seq);
        Ok(())
    }

    fn step(&mut self, ids: &[SeqId]) -> Result<Vec<(u32, Option<StopReason>)>, String> {
        if let Some(id) = ids.iter().find(|id| !self.running.contains_key(id)) {
            return Err(format!("no generation {id} in progress"));
        }
        // Out of the map for the step, so that all can be borrowed at once; a panic drops them.
        let mut taken: Vec<(SeqId, Sequence<M::Cache>)> = ids
            .iter()
            .filter_map(|id| self.running.remove_entry(id))
            .collect();
        let mut seqs: Vec<&mut Sequence<M::Cache>> = taken.iter_mut().map(|(_, s)| s).collect();
        let tokens = step_many(&self.model, &mut seqs);
        let out = taken
            .iter()
            .zip(tokens)
            .map(|((_, s), t)| (t, s.finished()))
            .collect();
        self.running.extend(taken);
        Ok(out)
    }

    fn finish(&mut self, id: SeqId) {
        self.running.remove(&id);
    }
}

/// The served name: the file stem of a file, the name of a directory.
fn default_name(path: &Path) -> String {
    let name = if path.is_file() {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Loads the model at `path` (see the module docs for how the kind is told), served as `name`
/// (default: the file stem or directory name).
pub fn load_model(path: &Path, name: Option<&str>) -> Result<LoadedModel, ServeError> {
    let err = |message: String| ServeError::Model {
        path: path.to_path_buf(),
        message,
    };
    let name = name.map_or_else(|| default_name(path), str::to_string);
    if path.is_file() {
        if !is_gguf(path) {
            return Err(err(
                "not a GGUF file (no GGUF magic); give a .gguf file or a model directory".into(),
            ));
        }
        let model = LlamaForCausalLM::from_gguf(path, Some(QuantActivations::Q8))
            .map_err(|e| err(e.to_string()))?;
        return llama(model, name).map_err(err);
    }
    if !path.is_dir() {
        return Err(err("no such file or directory".into()));
    }
    let config_path = path.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| err(format!("config.json: {e} (a model directory needs one)")))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("config.json: invalid JSON: {e}")))?;
    let model_type = config["model_type"].as_str().unwrap_or("");
    let archs: Vec<&str> = config["architectures"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let arch = |s: &str| archs.iter().any(|a| a.contains(s));
    let tokenizer = || {
        let p = path.join("tokenizer.json");
        if !p.is_file() {
            return Err(err(
                "tokenizer.json: not found (the model's tokenizer)".into()
            ));
        }
        Tokenizer::from_file(&p).map_err(|e| err(e.to_string()))
    };
    if model_type == "llama" || arch("Llama") {
        let model = LlamaForCausalLM::from_pretrained(path).map_err(|e| err(e.to_string()))?;
        return llama(model, name).map_err(err);
    }
    if arch("BertForSequenceClassification") && config.get("id2label").is_some() {
        let (model, tokenizer) =
            kiln_tune::load_classifier(path).map_err(|e| err(e.to_string()))?;
        let info = ModelInfo {
            name,
            kind: ModelKind::Classifier,
            labels: model.labels().to_vec(),
            max_positions: model.config().max_position_embeddings,
            chat_template: None,
            stop_tokens: Vec::new(),
            tokenizer,
        };
        let pad = info.tokenizer.pad_id().unwrap_or(0) as i64;
        return Ok(LoadedModel {
            info,
            backend: Box::new(ClassifierBackend { model, pad }),
        });
    }
    if model_type == "bert" || arch("BertModel") {
        let tokenizer = tokenizer()?;
        let model = BertModel::from_pretrained(path).map_err(|e| err(e.to_string()))?;
        // Loaded models start in training mode: dropout would make answers random.
        model.eval();
        let info = ModelInfo {
            name,
            kind: ModelKind::Embedder,
            labels: Vec::new(),
            max_positions: model.config().max_position_embeddings,
            chat_template: None,
            stop_tokens: Vec::new(),
            tokenizer,
        };
        let pad = info.tokenizer.pad_id().unwrap_or(0) as i64;
        return Ok(LoadedModel {
            info,
            backend: Box::new(EmbedderBackend { model, pad }),
        });
    }
    Err(err(format!(
        "config.json: cannot tell what to serve (model_type {model_type:?}, architectures \
         {archs:?}); kiln serve takes a BertForSequenceClassification with id2label, a BERT \
         sentence-embedding model, or a Llama-family model"
    )))
}

fn llama(model: LlamaForCausalLM, name: String) -> Result<LoadedModel, String> {
    model.eval();
    let tok = model.tokenizer.clone().ok_or_else(|| {
        "the model has no tokenizer (a GGUF with a byte-level BPE tokenizer, or a directory with \
         tokenizer.json, is needed)"
            .to_string()
    })?;
    let chat_template = tok.template().map_err(|e| e.to_string())?;
    let tokenizer = tok.tokenizer;
    let mut stop_tokens: Vec<u32> = tokenizer.eos_id().into_iter().collect();
    if let Some(id) = tokenizer.token_to_id("<|im_end|>") {
        if !stop_tokens.contains(&id) {
            stop_tokens.push(id);
        }
    }
    let info = ModelInfo {
        name,
        kind: ModelKind::CausalLm,
        labels: Vec::new(),
        max_positions: model.config.max_position_embeddings,
        chat_template,
        stop_tokens,
        tokenizer,
    };
    Ok(LoadedModel {
        info,
        backend: Box::new(LmBackend {
            model,
            running: HashMap::new(),
        }),
    })
}
