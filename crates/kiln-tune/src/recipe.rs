//! A fine-tuning recipe: the whole job — model, data, strategy, training options, output — as
//! one value, written in TOML or built from the `kiln finetune` flags, and run with
//! [`Recipe::run`].
//!
//! ```toml
//! model = ".cache/models/all-MiniLM-L6-v2"
//! out = "out/sentiment"
//! pooling = "mean"           # what the head reads: "cls" (default) or "mean"
//!
//! [data]
//! train = "reviews.csv"      # .csv, .tsv or .jsonl
//! valid_ratio = 0.2          # or: valid = "valid.csv"
//! text = "text"
//! label = "label"
//! task = "auto"              # or "classification", "regression"
//!
//! [strategy]
//! type = "full"              # linear_probe, bitfit, lora (r = 8, ...), or a registered method
//! llrd = 0.9
//!
//! [train]                    # any TrainConfig field
//! epochs = 2
//! lr = 5e-5
//! ```

use crate::data::{Columns, LabelKind, TextDataset};
use crate::error::{Result, TuneError};
use crate::lr_finder::{find_lr, LrFinderConfig, LrFinderResult};
use crate::metrics::Metric;
use crate::strategy::Strategy;
use crate::trainer::{evaluate, TrainConfig, TrainReport, Trainer};
use kiln_core::{no_grad, DType};
use kiln_data::{EncodeOptions, Padding, Tokenizer};
use kiln_models::{BertForSequenceClassification, ClassifierPooling, LoadOptions};
use kiln_nn::ModuleExt;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What the model learns from the label column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Regression when every training label is a number and one of them is not an integer
    /// (`0.5`, `3.25`), classification otherwise (so `0`/`1` labels are classes).
    #[default]
    Auto,
    /// Sequence classification: label names are classes; cross-entropy.
    Classification,
    /// Regression: one real-valued output (`num_labels` 1, `problem_type` "regression" in the
    /// saved config.json); mean squared error, reported as MSE and MAE.
    Regression,
}

impl TaskKind {
    /// Parses `auto`, `classification` or `regression`.
    pub fn parse(name: &str) -> Result<TaskKind> {
        match name.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(TaskKind::Auto),
            "classification" | "classify" => Ok(TaskKind::Classification),
            "regression" => Ok(TaskKind::Regression),
            other => Err(TuneError::config(
                "task",
                format!("unknown task `{other}` (known: auto, classification, regression)"),
            )),
        }
    }
}

/// Whether class names read from a label column are really real numbers: every one parses as a
/// finite number and at least one is not an integer.
fn numeric_labels(classes: &[String]) -> bool {
    let values: Option<Vec<f64>> = classes
        .iter()
        .map(|c| c.trim().parse::<f64>().ok().filter(|v| v.is_finite()))
        .collect();
    values.is_some_and(|v| v.iter().any(|x| x.fract() != 0.0))
}

/// Where the data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Training rows (.csv, .tsv or .jsonl).
    pub train: PathBuf,
    /// Validation rows; when absent, `valid_ratio` of `train` is held out.
    #[serde(default)]
    pub valid: Option<PathBuf>,
    /// Fraction held out for validation when `valid` is absent (default 0.2).
    #[serde(default = "default_valid_ratio")]
    pub valid_ratio: f64,
    /// Seed of the split (default 0).
    #[serde(default)]
    pub split_seed: u64,
    /// The text column (default `text`).
    #[serde(default = "default_text")]
    pub text: String,
    /// A second text column for pairs.
    #[serde(default)]
    pub text_pair: Option<String>,
    /// The label column (default `label`).
    #[serde(default = "default_label")]
    pub label: String,
    /// Use only the first N training rows (after the split), e.g. for a quick run.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Classification, regression, or decided from the labels (default auto).
    #[serde(default)]
    pub task: TaskKind,
}

fn default_valid_ratio() -> f64 {
    0.2
}
fn default_text() -> String {
    "text".into()
}
fn default_label() -> String {
    "label".into()
}

impl DataSpec {
    /// Training rows from `train`, with the defaults.
    pub fn new(train: impl Into<PathBuf>) -> Self {
        DataSpec {
            train: train.into(),
            valid: None,
            valid_ratio: default_valid_ratio(),
            split_seed: 0,
            text: default_text(),
            text_pair: None,
            label: default_label(),
            limit: None,
            task: TaskKind::Auto,
        }
    }

    /// The columns to read.
    pub fn columns(&self) -> Columns {
        Columns {
            text: self.text.clone(),
            text_pair: self.text_pair.clone(),
            label: self.label.clone(),
        }
    }

    /// Reads and splits the data: `(train, valid)`, as classes or as real values (see
    /// [`TaskKind`]).
    pub fn load(&self) -> Result<(TextDataset, TextDataset)> {
        let cols = self.columns();
        let all = match self.task {
            TaskKind::Regression => TextDataset::from_file_regression(&self.train, &cols)?,
            TaskKind::Classification => TextDataset::from_file(&self.train, &cols)?,
            TaskKind::Auto => {
                let all = TextDataset::from_file(&self.train, &cols)?;
                if numeric_labels(all.classes()) {
                    TextDataset::from_file_regression(&self.train, &cols)?
                } else {
                    all
                }
            }
        };
        let regression = matches!(all.labels(), LabelKind::Regression);
        let (train, valid) = match &self.valid {
            Some(v) if regression => {
                let valid = TextDataset::from_file_regression(v, &cols)?;
                (all, valid)
            }
            Some(v) => {
                let valid = TextDataset::from_file_with_classes(v, &cols, all.classes())?;
                (all, valid)
            }
            None => all.split(self.valid_ratio, self.split_seed)?,
        };
        let train = match self.limit {
            Some(n) => train.take(n),
            None => train,
        };
        Ok((train, valid))
    }
}

/// A whole fine-tuning job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The pretrained model directory (Hugging Face layout: config.json, model.safetensors,
    /// tokenizer.json).
    pub model: PathBuf,
    /// Where the fine-tuned model, logs and plot go.
    pub out: PathBuf,
    /// The data.
    pub data: DataSpec,
    /// What the classification head reads: `cls` (default, as Hugging Face's BERT) or `mean`
    /// (the masked mean of the last layer, as sentence-transformers models are trained).
    #[serde(default)]
    pub pooling: Option<ClassifierPooling>,
    /// The strategy (`type` plus its keys; default full fine-tuning).
    #[serde(default)]
    pub strategy: toml::Table,
    /// Training options.
    #[serde(default)]
    pub train: TrainConfig,
}

/// What [`Recipe::run`] did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecipeReport {
    /// The training report.
    pub train: TrainReport,
    /// Final validation metrics (of the restored best model).
    pub valid: std::collections::BTreeMap<String, f64>,
    /// Validation confusion matrix `[label][predicted]`.
    pub confusion: Vec<Vec<u64>>,
    /// Class names.
    pub labels: Vec<String>,
    /// Training and validation rows.
    pub rows: (usize, usize),
    /// The saved model directory.
    pub out: PathBuf,
}

impl Recipe {
    /// A recipe with defaults for `model`, `data` and `out`.
    pub fn new(model: impl Into<PathBuf>, data: DataSpec, out: impl Into<PathBuf>) -> Self {
        Recipe {
            model: model.into(),
            out: out.into(),
            data,
            pooling: None,
            strategy: toml::Table::new(),
            train: TrainConfig::default(),
        }
    }

    /// Parses a TOML recipe; relative paths are taken relative to the recipe's directory.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TuneError::io(path, e))?;
        let mut r: Recipe = toml::from_str(&text)
            .map_err(|e| TuneError::io(path, format!("invalid recipe: {e}")))?;
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

    /// The strategy the recipe names. For LoRA on a classifier, the new classification head
    /// trains too and is saved with the adapter (PEFT's `modules_to_save`), unless the recipe
    /// says otherwise.
    pub fn strategy(&self) -> Result<Strategy> {
        let mut table = self.strategy.clone();
        let is_lora = table
            .get("type")
            .and_then(|v| v.as_str())
            .is_some_and(|t| t.eq_ignore_ascii_case("lora"));
        if is_lora && !table.contains_key("modules_to_save") {
            table.insert(
                "modules_to_save".into(),
                toml::Value::Array(vec![toml::Value::String("classifier".into())]),
            );
        }
        Strategy::from_toml(table)
    }

    fn lora_config(&self) -> Result<Option<crate::lora::LoraConfig>> {
        match self.strategy()?.method {
            crate::strategy::Method::Adapter { name, args }
                if name.eq_ignore_ascii_case("lora") =>
            {
                Ok(Some(crate::lora::LoraConfig::from_toml_table(args)?))
            }
            _ => Ok(None),
        }
    }

    /// Runs the LR range test ([`find_lr`]) for this job — its model, training data, strategy,
    /// batch size and optimizer options — and writes `lr_finder.jsonl` and `lr_finder.png`
    /// into `out`. Trains nothing and saves no model.
    pub fn find_lr(&self) -> Result<LrFinderResult> {
        let strategy = self.strategy()?;
        self.train.validate()?;
        let tokenizer = Tokenizer::from_file(self.model.join("tokenizer.json"))?;
        let (train, _) = self.data.load()?;
        let model = self.load_model(&train)?;
        let mut cfg = LrFinderConfig::from_train(&self.train, strategy);
        cfg.out_dir = Some(self.out.clone());
        find_lr(&model, &tokenizer, &train, &cfg)
    }

    /// The pretrained model with a new head for `train`'s labels (one output for regression).
    fn load_model(&self, train: &TextDataset) -> Result<BertForSequenceClassification> {
        let opts = if train.classes().is_empty() {
            LoadOptions::default().num_labels(1)
        } else {
            LoadOptions::default().labels(train.classes().to_vec())
        };
        let mut opts = opts.seed(self.train.seed);
        if let Some(p) = self.pooling {
            opts = opts.classifier_pooling(p);
        }
        Ok(BertForSequenceClassification::from_pretrained_with(&self.model, &opts)?.0)
    }

    /// Runs the job: loads the model and data, trains with progress and logs under `out`,
    /// evaluates the best model, and saves it (config with labels, weights, tokenizer,
    /// `training.json`, and the validation rows as `valid.csv`) to `out`.
    pub fn run(&self) -> Result<RecipeReport> {
        let strategy = self.strategy()?;
        self.train.validate()?;
        let tokenizer_path = self.model.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
        let (train, valid) = self.data.load()?;
        let labels = train.classes().to_vec();
        let regression = labels.is_empty();
        let model = self.load_model(&train)?;
        std::fs::create_dir_all(&self.out).map_err(|e| TuneError::io(&self.out, e))?;
        let mut cfg = self.train.clone();
        cfg.out_dir = Some(self.out.clone());
        if regression {
            // Class metrics mean nothing for real values: report MSE and MAE, pick by MSE.
            let class_metric = |m: &Metric| {
                matches!(
                    m,
                    Metric::Accuracy | Metric::MacroF1 | Metric::Precision | Metric::Recall
                )
            };
            cfg.metrics.retain(|m| !class_metric(m));
            for m in [Metric::Mse, Metric::Mae] {
                if !cfg.metrics.contains(&m) {
                    cfg.metrics.push(m);
                }
            }
            if class_metric(&cfg.metric) {
                cfg.metric = Metric::Mse;
            }
        }
        let mut trainer = Trainer::new(cfg.clone()).strategy(strategy.clone());
        let report = trainer.fit(&model, &tokenizer, &train, Some(&valid))?;
        // The model holds the best evaluation's weights (restore_best); without it, or when
        // no evaluation ran, evaluate the final weights.
        let final_eval = match (&report.best, cfg.restore_best) {
            (Some(best), true) => best.clone(),
            _ => {
                let m = evaluate(
                    &model,
                    &tokenizer,
                    &valid,
                    cfg.eval_batch_size,
                    cfg.max_length,
                )?;
                crate::trainer::Evaluation {
                    step: report.steps,
                    epoch: report.epochs,
                    metrics: m.report(&cfg.metrics),
                    confusion: m.confusion(),
                }
            }
        };
        if let Some(lora) = self.lora_config()? {
            // The adapter in PEFT layout (with the trained head), then the merged model.
            let base = self.model.display().to_string();
            crate::lora::save_adapter(
                &model,
                &lora,
                self.out.join("adapter"),
                Some(&base),
                Some("SEQ_CLS"),
            )?;
            crate::lora::remove_lora(&model, true)?;
        }
        crate::save::save_classifier(&model, &tokenizer_path, &self.out)?;
        if regression {
            mark_regression(&self.out.join("config.json"))?;
        }
        valid.write_csv(&self.out.join("valid.csv"))?;
        let result = RecipeReport {
            train: report,
            valid: final_eval.metrics,
            confusion: final_eval.confusion,
            labels,
            rows: (train.len(), valid.len()),
            out: self.out.clone(),
        };
        let info = serde_json::json!({
            "recipe": self,
            "strategy": strategy,
            "report": result,
        });
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

/// Adds `"problem_type": "regression"` to a saved config.json (as Hugging Face writes it for a
/// regression head).
fn mark_regression(config: &Path) -> Result<()> {
    let text = std::fs::read_to_string(config).map_err(|e| TuneError::io(config, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TuneError::io(config, format!("invalid JSON: {e}")))?;
    v["problem_type"] = serde_json::json!("regression");
    let text = serde_json::to_string_pretty(&v).expect("JSON serialises");
    std::fs::write(config, text).map_err(|e| TuneError::io(config, e))
}

/// Whether the model saved in `dir` is a regression model: its config.json says
/// `"problem_type": "regression"`, or (Hugging Face's rule) has no problem type and one label.
pub fn is_regression_model(dir: &Path) -> Result<bool> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TuneError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TuneError::io(&path, format!("invalid JSON: {e}")))?;
    Ok(match v.get("problem_type").and_then(|p| p.as_str()) {
        Some(p) => p == "regression",
        None => {
            let labels = v
                .get("id2label")
                .and_then(|m| m.as_object())
                .map(|m| m.len())
                .or_else(|| {
                    v.get("num_labels")
                        .and_then(|n| n.as_u64())
                        .map(|n| n as usize)
                });
            labels == Some(1)
        }
    })
}

/// The predicted values of a regression model for `texts`, in batches of `batch_size`
/// (truncating to `max_length` tokens).
pub fn predict_values<S: AsRef<str> + Sync>(
    model: &BertForSequenceClassification,
    tokenizer: &Tokenizer,
    texts: &[S],
    batch_size: usize,
    max_length: usize,
) -> Result<Vec<f64>> {
    let outputs = model.labels().len();
    if outputs != 1 {
        return Err(TuneError::config(
            "model",
            format!("a regression model has one output, this one has {outputs}"),
        ));
    }
    let _guard = no_grad();
    model.eval();
    let opts = EncodeOptions::default()
        .padding(Padding::Longest)
        .truncation(max_length);
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch_size.max(1)) {
        let enc = tokenizer.encode_batch(chunk, &opts)?;
        let values = model.forward(
            &enc.input_ids,
            Some(&enc.attention_mask),
            Some(&enc.token_type_ids),
        );
        out.extend(values.to_dtype(DType::F64).to_vec::<f64>());
    }
    Ok(out)
}
