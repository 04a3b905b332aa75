//! Saving and loading fine-tuned models, and prediction with them.

use crate::error::{Result, TuneError};
use kiln_core::{no_grad, DType};
use kiln_data::{EncodeOptions, Padding, Tokenizer};
use kiln_models::BertForSequenceClassification;
use kiln_nn::ModuleExt;
use serde::Serialize;
use std::path::Path;

/// Tokenizer files copied next to a saved model when the source has them.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

/// Saves a classifier in Hugging Face layout (config.json with `id2label`, model.safetensors)
/// plus the tokenizer files found next to `tokenizer_json`.
pub fn save_classifier(
    model: &BertForSequenceClassification,
    tokenizer_json: &Path,
    out: &Path,
) -> Result<()> {
    model.save_pretrained(out)?;
    copy_tokenizer_files(tokenizer_json, out)
}

/// Copies the tokenizer files found next to `tokenizer_json` into `out` (nothing when they are
/// already there).
pub(crate) fn copy_tokenizer_files(tokenizer_json: &Path, out: &Path) -> Result<()> {
    let src = tokenizer_json.parent().unwrap_or(Path::new("."));
    for name in TOKENIZER_FILES {
        let from = src.join(name);
        if from.is_file() && src != out {
            std::fs::copy(&from, out.join(name)).map_err(|e| TuneError::io(&from, e))?;
        }
    }
    Ok(())
}

/// Loads a saved classifier and its tokenizer from `dir`.
pub fn load_classifier(dir: &Path) -> Result<(BertForSequenceClassification, Tokenizer)> {
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
    let model = BertForSequenceClassification::from_pretrained(dir)?;
    model.eval();
    Ok((model, tokenizer))
}

/// One prediction: the label and every class's probability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// The most probable class.
    pub label: String,
    /// Its probability.
    pub score: f64,
    /// Every class with its probability, in class order.
    pub probabilities: Vec<(String, f64)>,
}

/// Classifies `texts` in batches of `batch_size` (truncating to `max_length` tokens).
pub fn predict<S: AsRef<str> + Sync>(
    model: &BertForSequenceClassification,
    tokenizer: &Tokenizer,
    texts: &[S],
    batch_size: usize,
    max_length: usize,
) -> Result<Vec<Prediction>> {
    let _guard = no_grad();
    model.eval();
    let labels = model.labels().to_vec();
    let opts = EncodeOptions::default()
        .padding(Padding::Longest)
        .truncation(max_length);
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch_size.max(1)) {
        let enc = tokenizer.encode_batch(chunk, &opts)?;
        let logits = model.forward(
            &enc.input_ids,
            Some(&enc.attention_mask),
            Some(&enc.token_type_ids),
        );
        let probs: Vec<f64> = logits.softmax(-1).to_dtype(DType::F64).to_vec();
        for row in probs.chunks(labels.len()) {
            let (best, score) =
                row.iter()
                    .enumerate()
                    .fold(
                        (0, f64::NEG_INFINITY),
                        |a, (i, &p)| if p > a.1 { (i, p) } else { a },
                    );
            out.push(Prediction {
                label: labels[best].clone(),
                score,
                probabilities: labels.iter().cloned().zip(row.iter().copied()).collect(),
            });
        }
    }
    Ok(out)
}
