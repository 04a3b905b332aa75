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
//!
//! [strategy]
//! type = "full"              # linear_probe, bitfit, lora (r = 8, ...), or a registered method
//! llrd = 0.9
//!
//! [train]                    # any TrainConfig field
//! epochs = 2
//! lr = 5e-5
//! ```

use crate::data::{Columns, TextDataset};
use crate::error::{Result, TuneError};
use crate::strategy::Strategy;
use crate::trainer::{evaluate, TrainConfig, TrainReport, Trainer};
use kiln_data::Tokenizer;
use kiln_models::{BertForSequenceClassification, ClassifierPooling, LoadOptions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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

    /// Reads and splits the data: `(train, valid)`.
    pub fn load(&self) -> Result<(TextDataset, TextDataset)> {
        let cols = self.columns();
        let all = TextDataset::from_file(&self.train, &cols)?;
        let (train, valid) = match &self.valid {
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
        let mut opts = LoadOptions::default()
            .labels(labels.clone())
            .seed(self.train.seed);
        if let Some(p) = self.pooling {
            opts = opts.classifier_pooling(p);
        }
        let (model, _) = BertForSequenceClassification::from_pretrained_with(&self.model, &opts)?;
        std::fs::create_dir_all(&self.out).map_err(|e| TuneError::io(&self.out, e))?;
        let mut cfg = self.train.clone();
        cfg.out_dir = Some(self.out.clone());
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
