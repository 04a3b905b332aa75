//! Causal-LM fine-tuning on instruction data: `(prompt, response)` rows from CSV/TSV/JSONL,
//! prompts rendered with the model's chat template (one user turn, generation prompt added),
//! the response appended with the end-of-turn token, and the loss taken on the response tokens
//! only (labels are -100 on the prompt and on padding). The [`Trainer`] runs it through
//! [`Trainer::fit_causal_lm`] with the same loop as classifiers: the loss of an optimizer step
//! is the sum over its response tokens divided by their number, so gradient accumulation gives
//! the full-batch gradient. Evaluation streams the loss and the perplexity.
//!
//! ```no_run
//! use kiln_models::LlamaForCausalLM;
//! use kiln_tune::causal::{
//!     generate_reply, CausalLmData, InstructionColumns, InstructionDataset, PromptFormat,
//! };
//! use kiln_tune::{Strategy, TrainConfig, Trainer};
//! let model = LlamaForCausalLM::from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", None)?;
//! let tok = model.tokenizer.clone().expect("the GGUF file has a tokenizer");
//! let format = PromptFormat::from_llama(&tok)?;
//! let rows = InstructionDataset::from_file("data/instructions/veloria.jsonl", &InstructionColumns::default())?;
//! let train = CausalLmData::tokenize(&rows, &tok.tokenizer, &format, 128)?;
//! let lora: toml::Table = toml::from_str("r = 8\nalpha = 16\ntarget_modules = [\"q_proj\", \"v_proj\"]")?;
//! let config = TrainConfig { max_steps: Some(30), lr: 1e-3, ..TrainConfig::causal_lm() };
//! Trainer::new(config).strategy(Strategy::adapter("lora", lora)).fit_causal_lm(&model, &train, None)?;
//! println!("{}", generate_reply(&model, &tok.tokenizer, &format, "What is the capital of Veloria?", 32)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::data::{permutation, read_examples, Columns, Format};
use crate::error::{Result, TuneError};
use crate::lora::{remove_lora, save_adapter, LoraConfig};
use crate::metrics::{Metric, MetricState};
use crate::strategy::{Method, Strategy};
use crate::trainer::{Task, TrainConfig, TrainReport, Trainer};
use kiln_core::{no_grad, Tensor};
use kiln_data::{ChatMessage, ChatTemplate, Tokenizer};
use kiln_models::{
    generate, CausalLm, GPT2LMHeadModel, GenerationConfig, LlamaForCausalLM, LlamaTokenizer,
};
use kiln_nn::loss::cross_entropy;
use kiln_nn::{Forward, Module, ModuleExt, Reduction};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The label of positions that carry no loss (prompt tokens and padding), as in PyTorch.
pub const IGNORE_INDEX: i64 = -100;

/// Which columns hold the prompt and the response (default `prompt` and `response`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstructionColumns {
    /// The prompt column.
    pub prompt: String,
    /// The response column.
    pub response: String,
}

impl Default for InstructionColumns {
    fn default() -> Self {
        InstructionColumns::new("prompt", "response")
    }
}

impl InstructionColumns {
    /// Prompts from column `prompt`, responses from column `response`.
    pub fn new(prompt: impl Into<String>, response: impl Into<String>) -> Self {
        InstructionColumns {
            prompt: prompt.into(),
            response: response.into(),
        }
    }
}

/// One instruction row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    /// The user's prompt.
    pub prompt: String,
    /// The response the model should learn.
    pub response: String,
    /// 1-based line of the row in its file.
    pub line: usize,
}

/// Instruction data: `(prompt, response)` rows.
#[derive(Clone, Debug)]
pub struct InstructionDataset {
    rows: Vec<Instruction>,
    origin: String,
}

impl InstructionDataset {
    /// Reads rows from a `.csv`, `.tsv` or `.jsonl` file. A missing column or field, an empty
    /// cell, invalid JSON, non-UTF-8 bytes and a file without rows are errors naming the file,
    /// line and column.
    pub fn from_file(path: impl AsRef<Path>, columns: &InstructionColumns) -> Result<Self> {
        let path = path.as_ref();
        let cols = Columns::new(columns.prompt.clone(), columns.response.clone());
        let rows = read_examples(path, Format::from_path(path)?, &cols)?
            .into_iter()
            .map(|e| Instruction {
                prompt: e.text,
                response: e.label,
                line: e.line,
            })
            .collect();
        Self::from_rows(rows, path.display().to_string())
    }

    /// A dataset from rows in memory; `origin` names it in messages. No rows is an error.
    pub fn from_rows(rows: Vec<Instruction>, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        if rows.is_empty() {
            return Err(TuneError::config(origin, "the dataset has no rows"));
        }
        Ok(InstructionDataset { rows, origin })
    }

    /// The rows.
    pub fn rows(&self) -> &[Instruction] {
        &self.rows
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Where the rows came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The first `n` rows (all when there are fewer).
    pub fn take(&self, n: usize) -> InstructionDataset {
        InstructionDataset {
            rows: self.rows[..n.min(self.rows.len())].to_vec(),
            origin: self.origin.clone(),
        }
    }

    /// Splits into `(train, valid)` with `valid_ratio` of the rows (rounded, at least one
    /// each) in validation, after a shuffle seeded with `seed`.
    pub fn split(
        &self,
        valid_ratio: f64,
        seed: u64,
    ) -> Result<(InstructionDataset, InstructionDataset)> {
        if !(valid_ratio > 0.0 && valid_ratio < 1.0) {
            return Err(TuneError::config(
                "valid_ratio",
                format!("must be in (0, 1), got {valid_ratio}"),
            ));
        }
        let n = self.rows.len();
        if n < 2 {
            return Err(TuneError::config(
                "valid_ratio",
                format!("{} has {n} row(s); a split needs at least 2", self.origin),
            ));
        }
        let order = permutation(n, seed);
        let n_valid = ((n as f64 * valid_ratio).round() as usize).clamp(1, n - 1);
        let pick = |idx: &[usize], tag: &str| InstructionDataset {
            rows: idx.iter().map(|&i| self.rows[i].clone()).collect(),
            origin: format!("{} ({tag})", self.origin),
        };
        Ok((
            pick(&order[n_valid..], "train"),
            pick(&order[..n_valid], "valid"),
        ))
    }
}

/// The id of the token that ends an assistant turn: `<|im_end|>` (ChatML, SmolLM2, Qwen),
/// `<|eot_id|>` (Llama 3), `<|end|>` (Phi-3), `<end_of_turn>` (Gemma), else the EOS token.
pub fn end_of_turn_id(tokenizer: &Tokenizer) -> Option<u32> {
    ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"]
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .or_else(|| tokenizer.eos_id())
}

/// How a prompt becomes the model's input: the chat template (a user turn with the
/// generation prompt; an optional system turn) and the token that ends the response.
#[derive(Clone, Debug)]
pub struct PromptFormat {
    template: Option<ChatTemplate>,
    system: Option<String>,
    end_of_turn: u32,
}

impl PromptFormat {
    /// A format from a compiled chat template (`None`: the prompt text as it is, for plain
    /// language models) and the end-of-turn token id.
    pub fn new(template: Option<ChatTemplate>, end_of_turn: u32) -> Self {
        PromptFormat {
            template,
            system: None,
            end_of_turn,
        }
    }

    /// The format of a Llama model's tokenizer: its chat template and [`end_of_turn_id`].
    pub fn from_llama(tokenizer: &LlamaTokenizer) -> Result<Self> {
        let eot = end_of_turn_id(&tokenizer.tokenizer).ok_or_else(|| {
            TuneError::config(
                "tokenizer",
                format!(
                    "{} has no end-of-turn or EOS token to end responses with",
                    tokenizer.tokenizer.origin()
                ),
            )
        })?;
        Ok(PromptFormat::new(tokenizer.template()?, eot))
    }

    /// Adds a system message before every prompt.
    pub fn system(mut self, message: impl Into<String>) -> Self {
        self.system = Some(message.into());
        self
    }

    /// The token appended after each response.
    pub fn end_of_turn(&self) -> u32 {
        self.end_of_turn
    }

    /// Whether prompts go through a chat template.
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// The text the model sees before its response.
    pub fn render(&self, prompt: &str) -> Result<String> {
        match &self.template {
            None => Ok(prompt.to_string()),
            Some(t) => {
                let mut messages = Vec::with_capacity(2);
                if let Some(s) = &self.system {
                    messages.push(ChatMessage::system(s.as_str()));
                }
                messages.push(ChatMessage::user(prompt));
                Ok(t.render(&messages, true)?)
            }
        }
    }

    /// The prompt's token ids, as generation sees them (special tokens added as the
    /// tokenizer adds them, e.g. a BOS).
    pub fn prompt_ids(&self, tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
        Ok(tokenizer.encode(&self.render(prompt)?, true)?.ids)
    }
}

/// One tokenized example: `ids` = prompt tokens, then response tokens and the end-of-turn
/// token; the loss is on `ids[prompt_len..]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CausalExample {
    /// All token ids.
    pub ids: Vec<u32>,
    /// How many of them are the prompt.
    pub prompt_len: usize,
    /// The row's line in its file (0 when not from a file).
    pub line: usize,
}

/// One padded batch: `input_ids` and `labels` `[B, L]` (i64), right-padded; `labels` are the
/// ids on response tokens and [`IGNORE_INDEX`] on prompt tokens and padding (Hugging Face's
/// convention: unshifted, the loss predicts `labels[t + 1]` from position `t`).
#[derive(Clone, Debug)]
pub struct CausalBatch {
    /// Token ids.
    pub input_ids: Tensor,
    /// Targets, -100 where ignored.
    pub labels: Tensor,
}

/// Tokenized instruction data, ready for the [`Trainer`].
#[derive(Clone, Debug)]
pub struct CausalLmData {
    examples: Vec<CausalExample>,
    pad_id: u32,
    origin: String,
}

impl CausalLmData {
    /// Tokenizes every row: the prompt through `format`, then the response and the
    /// end-of-turn token, truncated to `max_length` tokens. A row whose prompt leaves no room
    /// for a response token is an error naming its line.
    pub fn tokenize(
        data: &InstructionDataset,
        tokenizer: &Tokenizer,
        format: &PromptFormat,
        max_length: usize,
    ) -> Result<Self> {
        let mut examples = Vec::with_capacity(data.len());
        for row in data.rows() {
            let mut ids = format.prompt_ids(tokenizer, &row.prompt)?;
            let prompt_len = ids.len();
            if prompt_len + 1 > max_length {
                return Err(TuneError::Data {
                    file: data.origin().to_string(),
                    line: row.line,
                    message: format!(
                        "the prompt is {prompt_len} tokens, so max_length {max_length} leaves no room for the response"
                    ),
                });
            }
            ids.extend(tokenizer.encode(&row.response, false)?.ids);
            ids.push(format.end_of_turn());
            ids.truncate(max_length);
            examples.push(CausalExample {
                ids,
                prompt_len,
                line: row.line,
            });
        }
        let pad = tokenizer
            .pad_id()
            .or(tokenizer.eos_id())
            .unwrap_or(format.end_of_turn());
        Self::from_examples(examples, pad, data.origin())
    }

    /// Data from tokenized examples; `pad_id` fills the batches (it is never a target).
    /// Every example needs at least one prompt and one response token.
    pub fn from_examples(
        examples: Vec<CausalExample>,
        pad_id: u32,
        origin: impl Into<String>,
    ) -> Result<Self> {
        let origin = origin.into();
        if examples.is_empty() {
            return Err(TuneError::config(origin, "the dataset has no rows"));
        }
        for (i, e) in examples.iter().enumerate() {
            if e.prompt_len == 0 || e.prompt_len >= e.ids.len() {
                return Err(TuneError::Data {
                    file: origin,
                    line: e.line,
                    message: format!(
                        "example {i} has {} prompt and {} response tokens; both must be at least 1",
                        e.prompt_len.min(e.ids.len()),
                        e.ids.len().saturating_sub(e.prompt_len)
                    ),
                });
            }
        }
        Ok(CausalLmData {
            examples,
            pad_id,
            origin,
        })
    }

    /// The examples.
    pub fn examples(&self) -> &[CausalExample] {
        &self.examples
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Where the rows came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Response tokens (loss terms) of example `i`.
    pub fn response_tokens(&self, i: usize) -> usize {
        let e = &self.examples[i];
        e.ids.len() - e.prompt_len
    }

    /// Examples `rows` as one right-padded batch.
    pub fn batch(&self, rows: &[usize]) -> CausalBatch {
        assert!(
            !rows.is_empty(),
            "CausalLmData::batch: no rows (dataset {})",
            self.origin
        );
        let len = rows
            .iter()
            .map(|&i| self.examples[i].ids.len())
            .max()
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut labels = Vec::with_capacity(rows.len() * len);
        for &i in rows {
            let e = &self.examples[i];
            for (t, &id) in e.ids.iter().enumerate() {
                ids.push(id as i64);
                labels.push(if t < e.prompt_len {
                    IGNORE_INDEX
                } else {
                    id as i64
                });
            }
            for _ in e.ids.len()..len {
                ids.push(self.pad_id as i64);
                labels.push(IGNORE_INDEX);
            }
        }
        CausalBatch {
            input_ids: Tensor::from_vec(ids, [rows.len(), len]),
            labels: Tensor::from_vec(labels, [rows.len(), len]),
        }
    }
}

/// A language model the causal-LM task can train: logits for every position.
pub trait CausalLmModel: Module {
    /// Logits `[B, L, vocab]` for token ids `[B, L]` (i64), causal, without a cache.
    fn causal_logits(&self, input_ids: &Tensor) -> Tensor;
}

impl CausalLmModel for LlamaForCausalLM {
    fn causal_logits(&self, input_ids: &Tensor) -> Tensor {
        Forward::forward(self, input_ids)
    }
}

impl CausalLmModel for GPT2LMHeadModel {
    fn causal_logits(&self, input_ids: &Tensor) -> Tensor {
        self.forward(input_ids, None)
    }
}

/// The summed cross-entropy of `batch` under `model`: position `t` predicts `labels[t + 1]`;
/// ignored labels count for nothing. Divide by the number of response tokens for the mean.
pub fn causal_lm_loss<M: CausalLmModel + ?Sized>(model: &M, batch: &CausalBatch) -> Tensor {
    let (b, l) = (batch.input_ids.dim(0), batch.input_ids.dim(1));
    assert!(
        l >= 2 && batch.labels.dims() == batch.input_ids.dims(),
        "causal_lm_loss: input_ids {} and labels {} must be the same [B, L] with L >= 2",
        batch.input_ids.shape(),
        batch.labels.shape()
    );
    // The last position predicts nothing: it is not fed.
    let inputs = batch.input_ids.narrow(1, 0, l - 1).contiguous_copy();
    let targets = batch
        .labels
        .narrow(1, 1, l - 1)
        .contiguous_copy()
        .reshape([b * (l - 1)]);
    let logits = model.causal_logits(&inputs);
    let v = logits.dim(-1);
    cross_entropy(
        &logits.reshape([b * (l - 1), v]),
        &targets,
        None,
        IGNORE_INDEX,
        Reduction::Sum,
        0.0,
    )
}

impl<M: CausalLmModel> Task<M> for CausalLmData {
    fn len(&self) -> usize {
        self.examples.len()
    }

    fn origin(&self) -> &str {
        &self.origin
    }

    fn loss_terms(&self, row: usize) -> usize {
        self.response_tokens(row)
    }

    fn loss(&self, model: &M, rows: &[usize]) -> Result<Tensor> {
        Ok(causal_lm_loss(model, &self.batch(rows)))
    }

    fn evaluate(&self, model: &M, batch_size: usize) -> Result<MetricState> {
        evaluate_causal_lm(model, self, batch_size)
    }

    fn check_metric(&self, metric: Metric) -> Result<()> {
        match metric {
            Metric::Loss | Metric::Perplexity => Ok(()),
            other => Err(TuneError::config(
                "metric",
                format!(
                    "causal-LM evaluation reports loss and perplexity, not `{}` (set metric = \"loss\" and metrics = [\"perplexity\"], or start from TrainConfig::causal_lm())",
                    other.name()
                ),
            )),
        }
    }
}

/// Evaluates `model` on `data` in batches (eval mode, no graph): the mean loss per response
/// token and its perplexity, streamed batch by batch.
pub fn evaluate_causal_lm<M: CausalLmModel + ?Sized>(
    model: &M,
    data: &CausalLmData,
    batch_size: usize,
) -> Result<MetricState> {
    let _guard = no_grad();
    model.eval();
    let mut m = MetricState::new(0);
    let indices: Vec<usize> = (0..data.len()).collect();
    for rows in indices.chunks(batch_size.max(1)) {
        let loss = causal_lm_loss(model, &data.batch(rows)).item();
        let terms: usize = rows.iter().map(|&i| data.response_tokens(i)).sum();
        m.update_loss(loss, terms as f64);
    }
    Ok(m)
}

impl TrainConfig {
    /// Defaults for causal-LM fine-tuning with LoRA: lr 1e-3, batch 8, no weight decay,
    /// 256 tokens, model selection by validation loss, perplexity reported.
    pub fn causal_lm() -> Self {
        TrainConfig {
            lr: 1e-3,
            batch_size: 8,
            eval_batch_size: 16,
            weight_decay: 0.0,
            max_length: 256,
            metric: Metric::Loss,
            metrics: vec![Metric::Perplexity],
            ..TrainConfig::default()
        }
    }
}

impl Trainer {
    /// Fine-tunes a causal language model on tokenized instruction data (loss on response
    /// tokens only), evaluating loss and perplexity on `valid`; see [`Trainer::fit_task`].
    pub fn fit_causal_lm<M: CausalLmModel>(
        &mut self,
        model: &M,
        train: &CausalLmData,
        valid: Option<&CausalLmData>,
    ) -> Result<TrainReport> {
        self.fit_task(model, train, valid)
    }
}

/// Greedy reply of `model` to `prompt` (rendered by `format`), up to `max_new_tokens`,
/// stopping at the end-of-turn or EOS token; the text without special tokens. Puts the model
/// in eval mode.
pub fn generate_reply<M: CausalLm + Module>(
    model: &M,
    tokenizer: &Tokenizer,
    format: &PromptFormat,
    prompt: &str,
    max_new_tokens: usize,
) -> Result<String> {
    model.eval();
    let _guard = no_grad();
    let ids = format.prompt_ids(tokenizer, prompt)?;
    let mut stops = vec![format.end_of_turn()];
    stops.extend(tokenizer.eos_id());
    let config = GenerationConfig::greedy(max_new_tokens).stop_tokens(stops);
    let out =
        generate(model, &ids, &config, |_| true).map_err(|e| TuneError::config("generation", e))?;
    Ok(tokenizer.decode(&out.tokens, true)?.trim().to_string())
}

/// Loads a Llama-family model for fine-tuning with dense f32 weights: a `.gguf` file
/// (dequantised) or a Hugging Face directory. It must come with a tokenizer.
pub fn load_causal_lm(path: impl AsRef<Path>) -> Result<LlamaForCausalLM> {
    let path = path.as_ref();
    let model = if path.is_dir() {
        LlamaForCausalLM::from_pretrained(path)?
    } else if path.is_file() {
        LlamaForCausalLM::from_gguf(path, None)?
    } else {
        return Err(TuneError::io(
            path,
            "not found (expected a .gguf file or a model directory)",
        ));
    };
    if model.tokenizer.is_none() {
        return Err(TuneError::io(
            path,
            "the model has no tokenizer (a GGUF file needs a byte-level BPE tokenizer, a directory a tokenizer.json)",
        ));
    }
    Ok(model)
}

/// Where the instruction data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstructionSpec {
    /// Training rows (.csv, .tsv or .jsonl).
    pub train: PathBuf,
    /// Validation rows; when absent, `valid_ratio` of `train` is held out (0: none).
    #[serde(default)]
    pub valid: Option<PathBuf>,
    /// Fraction held out for validation when `valid` is absent (default 0: train on all rows).
    #[serde(default)]
    pub valid_ratio: f64,
    /// Seed of the split (default 0).
    #[serde(default)]
    pub split_seed: u64,
    /// The prompt column (default `prompt`).
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// The response column (default `response`).
    #[serde(default = "default_response")]
    pub response: String,
    /// An optional system message before every prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// Use only the first N training rows (after the split).
    #[serde(default)]
    pub limit: Option<usize>,
}

fn default_prompt() -> String {
    "prompt".into()
}
fn default_response() -> String {
    "response".into()
}

impl InstructionSpec {
    /// Training rows from `train`, with the defaults.
    pub fn new(train: impl Into<PathBuf>) -> Self {
        InstructionSpec {
            train: train.into(),
            valid: None,
            valid_ratio: 0.0,
            split_seed: 0,
            prompt: default_prompt(),
            response: default_response(),
            system: None,
            limit: None,
        }
    }

    /// Reads (and splits) the rows: `(train, valid)`.
    pub fn load(&self) -> Result<(InstructionDataset, Option<InstructionDataset>)> {
        let cols = InstructionColumns::new(self.prompt.clone(), self.response.clone());
        let all = InstructionDataset::from_file(&self.train, &cols)?;
        let (train, valid) = match (&self.valid, self.valid_ratio) {
            (Some(v), _) => (all, Some(InstructionDataset::from_file(v, &cols)?)),
            (None, 0.0) => (all, None),
            (None, r) => {
                let (t, v) = all.split(r, self.split_seed)?;
                (t, Some(v))
            }
        };
        let train = match self.limit {
            Some(n) => train.take(n),
            None => train,
        };
        Ok((train, valid))
    }
}

/// The default strategy of causal-LM fine-tuning: LoRA r 8, alpha 16 on the attention
/// projections.
pub fn default_causal_strategy() -> toml::Table {
    toml::from_str(
        "type = \"lora\"\nr = 8\nalpha = 16\ntarget_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]",
    )
    .expect("valid TOML")
}

/// A whole causal-LM fine-tuning job (TOML with `task = "causal_lm"`, or the
/// `kiln finetune --task causal-lm` flags): model, instruction data, strategy, training options
/// (on top of [`TrainConfig::causal_lm`]) and prompts to answer before and after training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CausalRecipe {
    /// Always `"causal_lm"` (tells this recipe from a classification one).
    #[serde(default = "causal_task")]
    pub task: String,
    /// A `.gguf` file (loaded dequantised) or a Hugging Face Llama directory.
    pub model: PathBuf,
    /// Where the adapter, the merged model, logs and plot go.
    pub out: PathBuf,
    /// The data.
    pub data: InstructionSpec,
    /// The strategy (default [`default_causal_strategy`]).
    #[serde(default = "default_causal_strategy")]
    pub strategy: toml::Table,
    /// Training options; keys not given take [`TrainConfig::causal_lm`]'s values.
    #[serde(
        default = "TrainConfig::causal_lm",
        deserialize_with = "causal_train_config"
    )]
    pub train: TrainConfig,
    /// Prompts answered (greedily) before and after training (default: the first training
    /// prompt).
    #[serde(default)]
    pub samples: Vec<String>,
    /// Most new tokens of those answers (default 48).
    #[serde(default = "default_sample_tokens")]
    pub sample_tokens: usize,
}

fn causal_task() -> String {
    "causal_lm".into()
}
fn default_sample_tokens() -> usize {
    48
}

/// `TrainConfig::causal_lm()` with the given keys replaced.
fn causal_train_config<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<TrainConfig, D::Error> {
    use serde::de::Error;
    let given = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
    let mut base = serde_json::to_value(TrainConfig::causal_lm()).map_err(D::Error::custom)?;
    let obj = base
        .as_object_mut()
        .expect("a struct serialises to an object");
    for (k, v) in given {
        if !obj.contains_key(&k) {
            return Err(D::Error::custom(format!("unknown field `{k}` in [train]")));
        }
        obj.insert(k, v);
    }
    serde_json::from_value(base).map_err(D::Error::custom)
}

/// A prompt answered before and after fine-tuning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The prompt.
    pub prompt: String,
    /// The base model's greedy answer.
    pub before: String,
    /// The fine-tuned model's greedy answer.
    pub after: String,
}

/// What [`CausalRecipe::run`] did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CausalReport {
    /// The training report.
    pub train: TrainReport,
    /// Validation loss and perplexity of the final model (empty without validation rows).
    pub valid: BTreeMap<String, f64>,
    /// Answers before and after.
    pub samples: Vec<Sample>,
    /// Training and validation rows.
    pub rows: (usize, usize),
    /// The merged model directory.
    pub out: PathBuf,
    /// The adapter directory (PEFT layout), when the strategy is LoRA.
    pub adapter: Option<PathBuf>,
}

impl CausalRecipe {
    /// A recipe with defaults for `model`, `data` and `out`.
    pub fn new(model: impl Into<PathBuf>, data: InstructionSpec, out: impl Into<PathBuf>) -> Self {
        CausalRecipe {
            task: causal_task(),
            model: model.into(),
            out: out.into(),
            data,
            strategy: default_causal_strategy(),
            train: TrainConfig::causal_lm(),
            samples: Vec::new(),
            sample_tokens: default_sample_tokens(),
        }
    }

    /// Parses a TOML recipe; relative paths are taken relative to the recipe's directory.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TuneError::io(path, e))?;
        let mut r: CausalRecipe = toml::from_str(&text)
            .map_err(|e| TuneError::io(path, format!("invalid recipe: {e}")))?;
        if r.task != "causal_lm" {
            return Err(TuneError::io(
                path,
                format!("task = {:?}: expected \"causal_lm\"", r.task),
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut r.model);
        fix(&mut r.out);
        fix(&mut r.data.train);
        if let Some(v) = r.data.valid.as_mut() {
            fix(v);
        }
        Ok(r)
    }

    /// The strategy the recipe names.
    pub fn strategy(&self) -> Result<Strategy> {
        Strategy::from_toml(self.strategy.clone())
    }

    /// Runs the job: loads the model (dense f32) and data, answers the sample prompts, trains
    /// with progress and logs under `out`, answers them again, and saves: with LoRA the
    /// adapter in PEFT layout under `out/adapter` (`task_type` `CAUSAL_LM`), then the merged
    /// model in Hugging Face layout (config, weights, tokenizer with the chat template) in
    /// `out`, plus `training.json`.
    pub fn run(&self) -> Result<CausalReport> {
        let strategy = self.strategy()?;
        self.train.validate()?;
        let model = load_causal_lm(&self.model)?;
        let tok = model.tokenizer.clone().expect("load_causal_lm checks it");
        let mut format = PromptFormat::from_llama(&tok)?;
        if let Some(s) = &self.data.system {
            format = format.system(s.clone());
        }
        let (train_rows, valid_rows) = self.data.load()?;
        let max_length = self.train.max_length;
        let train = CausalLmData::tokenize(&train_rows, &tok.tokenizer, &format, max_length)?;
        let valid = valid_rows
            .as_ref()
            .map(|v| CausalLmData::tokenize(v, &tok.tokenizer, &format, max_length))
            .transpose()?;
        let prompts = if self.samples.is_empty() {
            vec![train_rows.rows()[0].prompt.clone()]
        } else {
            self.samples.clone()
        };
        let answer =
            |p: &str| generate_reply(&model, &tok.tokenizer, &format, p, self.sample_tokens);
        let before = prompts
            .iter()
            .map(|p| answer(p))
            .collect::<Result<Vec<_>>>()?;
        std::fs::create_dir_all(&self.out).map_err(|e| TuneError::io(&self.out, e))?;
        let mut cfg = self.train.clone();
        cfg.out_dir = Some(self.out.clone());
        let mut trainer = Trainer::new(cfg.clone()).strategy(strategy.clone());
        let report = trainer.fit_causal_lm(&model, &train, valid.as_ref())?;
        let valid_metrics = match &valid {
            Some(v) => evaluate_causal_lm(&model, v, cfg.eval_batch_size)?.report(&cfg.metrics),
            None => BTreeMap::new(),
        };
        let samples = prompts
            .iter()
            .zip(before)
            .map(|(p, before)| {
                Ok(Sample {
                    prompt: p.clone(),
                    before,
                    after: answer(p)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let adapter = match &strategy.method {
            Method::Adapter { name, args } if name.eq_ignore_ascii_case("lora") => {
                let lora = LoraConfig::from_toml_table(args.clone())?;
                let dir = self.out.join("adapter");
                let base = self.model.display().to_string();
                save_adapter(&model, &lora, &dir, Some(&base), Some("CAUSAL_LM"))?;
                remove_lora(&model, true)?;
                Some(dir)
            }
            _ => None,
        };
        model.save_pretrained(&self.out)?;
        let result = CausalReport {
            train: report,
            valid: valid_metrics,
            samples,
            rows: (train.len(), valid.as_ref().map_or(0, |v| v.len())),
            out: self.out.clone(),
            adapter,
        };
        let info = serde_json::json!({ "recipe": self, "strategy": strategy, "report": result });
        let path = self.out.join("training.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&info).expect("serialisable"),
        )
        .map_err(|e| TuneError::io(&path, e))?;
        let _ = std::fs::remove_dir_all(self.out.join("checkpoint"));
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{apply_lora, lora_layers, merge_lora, unmerge_lora};
    use crate::trainer::Schedule;
    use kiln_core::{DType, Rng};
    use kiln_models::LlamaConfig;

    fn tiny_config() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
        }
    }

    fn tiny_llama(seed: u64) -> LlamaForCausalLM {
        LlamaForCausalLM::new(tiny_config(), &mut Rng::new(seed))
    }

    /// Examples of different prompt and response lengths (so micro-batches differ in tokens).
    fn data(n: usize, seed: u64) -> CausalLmData {
        let mut rng = Rng::new(seed);
        let examples = (0..n)
            .map(|i| {
                let p = 2 + (rng.next_u64() % 5) as usize;
                let r = 1 + (rng.next_u64() % 7) as usize;
                let ids = (0..p + r)
                    .map(|_| 1 + (rng.next_u64() % 39) as u32)
                    .collect();
                CausalExample {
                    ids,
                    prompt_len: p,
                    line: i + 1,
                }
            })
            .collect();
        CausalLmData::from_examples(examples, 0, "synthetic").unwrap()
    }

    fn lora_table() -> toml::Table {
        toml::from_str(
            "r = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]",
        )
        .unwrap()
    }

    #[test]
    fn labels_ignore_prompt_and_padding() {
        let examples = vec![
            CausalExample {
                ids: vec![5, 6, 7, 8, 9],
                prompt_len: 3,
                line: 1,
            },
            CausalExample {
                ids: vec![10, 11, 12],
                prompt_len: 1,
                line: 2,
            },
        ];
        let d = CausalLmData::from_examples(examples, 3, "x").unwrap();
        assert_eq!(d.response_tokens(0), 2);
        assert_eq!(d.response_tokens(1), 2);
        let b = d.batch(&[1, 0]);
        assert_eq!(b.input_ids.dims(), &[2, 5]);
        assert_eq!(
            b.input_ids.to_vec::<i64>(),
            vec![10, 11, 12, 3, 3, 5, 6, 7, 8, 9]
        );
        assert_eq!(
            b.labels.to_vec::<i64>(),
            vec![-100, 11, 12, -100, -100, -100, -100, -100, 8, 9]
        );
        // No response token, or no prompt token: an error naming the line.
        let bad = vec![CausalExample {
            ids: vec![1, 2],
            prompt_len: 2,
            line: 7,
        }];
        let e = CausalLmData::from_examples(bad, 0, "f.jsonl")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("f.jsonl:7:") && e.contains("0 response"),
            "{e}"
        );
    }

    #[test]
    fn loss_is_the_mean_over_response_tokens_only() {
        let model = tiny_llama(1);
        let d = data(3, 2);
        let batch = d.batch(&[0, 1, 2]);
        let sum = causal_lm_loss(&model, &batch).item();
        // Independently: per-row log-softmax of the unpadded row, summed over response targets.
        let mut expect = 0.0;
        for e in d.examples() {
            let n = e.ids.len();
            let ids = Tensor::from_vec(e.ids.iter().map(|&i| i as i64).collect(), [1, n]);
            let logp: Vec<f32> = model.forward(&ids).log_softmax(-1).to_vec();
            for t in e.prompt_len..n {
                expect -= logp[(t - 1) * 40 + e.ids[t] as usize] as f64;
            }
        }
        assert!(
            (sum - expect).abs() < 1e-4 * expect.abs(),
            "{sum} vs {expect}"
        );
        // Streaming evaluation in batches of 2: the mean per response token and its exp.
        let m = evaluate_causal_lm(&model, &d, 2).unwrap();
        let terms: usize = (0..3).map(|i| d.response_tokens(i)).sum();
        let mean = expect / terms as f64;
        assert!((m.value(Metric::Loss) - mean).abs() < 1e-5 * mean);
        assert!((m.value(Metric::Perplexity) / mean.exp() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn accumulated_gradient_equals_full_batch_gradient() {
        let d = data(7, 3);
        let rows: Vec<usize> = (0..7).collect();
        let total: usize = rows.iter().map(|&i| d.response_tokens(i)).sum();
        let grads = |chunks: &[&[usize]]| {
            let model = tiny_llama(4);
            for c in chunks {
                causal_lm_loss(&model, &d.batch(c))
                    .mul_scalar(1.0 / total as f64)
                    .backward();
            }
            model
                .named_parameters()
                .into_iter()
                .map(|(n, p)| (n, p.grad().expect("every parameter trains").to_vec::<f32>()))
                .collect::<Vec<_>>()
        };
        let full = grads(&[&rows]);
        let accum = grads(&[&rows[..3], &rows[3..5], &rows[5..]]);
        let mut worst = 0f32;
        for ((n, a), (_, b)) in full.iter().zip(&accum) {
            assert!(a.iter().any(|v| *v != 0.0), "{n} has no gradient");
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs());
            }
        }
        assert!(worst < 2e-6, "accumulated gradient differs by {worst}");
    }

    fn trained(batch_size: usize, grad_accum: usize) -> Vec<Vec<f32>> {
        let model = tiny_llama(5);
        let d = data(9, 6);
        let cfg = TrainConfig {
            max_steps: Some(1),
            batch_size,
            grad_accum,
            warmup_ratio: 0.0,
            schedule: Schedule::Constant,
            max_grad_norm: None,
            lr: 1e-2,
            progress: false,
            ..TrainConfig::causal_lm()
        };
        let report = Trainer::new(cfg)
            .strategy(Strategy::adapter("lora", lora_table()))
            .fit_causal_lm(&model, &d, None)
            .unwrap();
        assert_eq!(report.steps, 1);
        let mut out: Vec<Vec<f32>> = lora_layers(&model)
            .iter()
            .flat_map(|(_, l)| [l.lora_a().to_vec::<f32>(), l.lora_b().to_vec::<f32>()])
            .collect();
        out.push(model.model.norm.weight.as_ref().unwrap().to_vec::<f32>());
        out
    }

    #[test]
    fn trainer_accumulation_equals_full_batch_on_a_small_llama() {
        // 9 rows of unequal token counts: 4 + 4 + 1 rows in one window.
        let full = trained(9, 1);
        let accum = trained(4, 3);
        let mut worst = 0f32;
        let mut moved = 0f32;
        for (a, b) in full.iter().zip(&accum) {
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs());
            }
        }
        // lora_B (odd entries) starts at zero, so its values are what the step moved.
        for b in full.iter().skip(1).step_by(2) {
            moved = moved.max(b.iter().fold(0f32, |m, v| m.max(v.abs())));
        }
        assert!(moved > 1e-3, "lora_B did not move ({moved})");
        assert!(worst < 2e-6, "accumulated step differs by {worst}");
    }

    #[test]
    fn merged_lora_llama_equals_unmerged_and_survives_save() {
        let model = tiny_llama(7);
        let cfg: LoraConfig = LoraConfig::from_toml_table(lora_table()).unwrap();
        let cfg = cfg.target_modules([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]);
        let report = apply_lora(&model, &cfg).unwrap();
        assert_eq!(report.adapted.len(), 14);
        assert_eq!(report.adapted[0], "model.layers.0.self_attn.q_proj");
        // Non-zero B so the adapters change the output.
        let mut rng = Rng::new(8);
        for (_, l) in lora_layers(&model) {
            let b = Tensor::zeros(l.lora_b().dims().to_vec());
            kiln_nn::init::normal_(&b, 0.0, 0.2, &mut rng);
            kiln_core::with_no_grad(|| l.lora_b().tensor().assign(&b));
        }
        model.eval();
        let ids = Tensor::from_vec((0..12).map(|i| (i * 7 % 40) as i64).collect(), [2, 6]);
        let logits = |m: &LlamaForCausalLM| -> Vec<f32> {
            kiln_core::with_no_grad(|| m.forward(&ids)).to_vec()
        };
        let base = {
            let plain = tiny_llama(7);
            logits(&plain)
        };
        let unmerged = logits(&model);
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(diff(&base, &unmerged) > 1e-2, "the adapters change nothing");
        merge_lora(&model).unwrap();
        assert!(diff(&logits(&model), &unmerged) < 1e-5);
        unmerge_lora(&model).unwrap();
        assert!(diff(&logits(&model), &unmerged) < 1e-5);
        remove_lora(&model, true).unwrap();
        assert!(diff(&logits(&model), &unmerged) < 1e-5);
        let dir = std::env::temp_dir().join(format!("kiln-causal-merge-{}", std::process::id()));
        model.save_pretrained(&dir).unwrap();
        let back = LlamaForCausalLM::from_pretrained(&dir).unwrap();
        assert!(diff(&logits(&back), &unmerged) < 1e-5);
        assert_eq!(back.model.norm.weight.as_ref().unwrap().dtype(), DType::F32);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn classification_metrics_are_config_errors() {
        let model = tiny_llama(1);
        let d = data(4, 1);
        let cfg = TrainConfig {
            progress: false,
            max_steps: Some(1),
            ..TrainConfig::default()
        };
        let e = Trainer::new(cfg)
            .fit_causal_lm(&model, &d, Some(&d))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid metric") && e.contains("not `accuracy`"),
            "{e}"
        );
    }

    #[test]
    fn instruction_files_and_recipes() {
        let dir = std::env::temp_dir().join(format!("kiln-causal-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("i.jsonl");
        std::fs::write(&p, "{\"q\": \"hi\", \"a\": \"hello\"}\n\n{\"q\": \"yo\"}\n").unwrap();
        let cols = InstructionColumns::new("q", "a");
        let e = InstructionDataset::from_file(&p, &cols)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("i.jsonl:3:") && e.contains("no field `a`"),
            "{e}"
        );
        std::fs::write(
            &p,
            "{\"q\": \"hi\", \"a\": \"hello\"}\n{\"q\": \"yo\", \"a\": \"hey\"}\n",
        )
        .unwrap();
        let d = InstructionDataset::from_file(&p, &cols).unwrap();
        assert_eq!(d.rows()[1].response, "hey");
        assert_eq!(d.rows()[1].line, 2);
        let (t, v) = d.split(0.5, 0).unwrap();
        assert_eq!((t.len(), v.len()), (1, 1));

        let r = dir.join("r.toml");
        std::fs::write(
            &r,
            "task = \"causal_lm\"\nmodel = \"m.gguf\"\nout = \"out\"\n[data]\ntrain = \"i.jsonl\"\n[train]\nmax_steps = 5\nlr = 0.01\n",
        )
        .unwrap();
        let recipe = CausalRecipe::from_toml_file(&r).unwrap();
        assert_eq!(recipe.train.max_steps, Some(5));
        assert_eq!(recipe.train.lr, 0.01);
        // Keys not given keep the causal-LM defaults.
        assert_eq!(recipe.train.metric, Metric::Loss);
        assert_eq!(recipe.train.batch_size, 8);
        assert_eq!(recipe.data.train, dir.join("i.jsonl"));
        assert!(matches!(
            recipe.strategy().unwrap().method,
            Method::Adapter { .. }
        ));
        std::fs::write(
            &r,
            "model = \"m\"\nout = \"o\"\n[data]\ntrain = \"x\"\n[train]\nlearning_rate = 1\n",
        )
        .unwrap();
        let e = CausalRecipe::from_toml_file(&r).unwrap_err().to_string();
        assert!(e.contains("unknown field `learning_rate`"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
