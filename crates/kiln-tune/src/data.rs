//! Text datasets for fine-tuning: rows read from CSV, TSV or JSONL with named text and label
//! columns, label names mapped to ids, a seeded train/validation split, and batches tokenized and
//! padded per batch (dynamic padding).
//!
//! ```no_run
//! use kiln_tune::data::{Columns, TextDataset};
//! let data = TextDataset::from_file("reviews.csv", &Columns::new("text", "label"))?;
//! let (train, valid) = data.split(0.2, 0)?;
//! # Ok::<(), kiln_tune::TuneError>(())
//! ```

use crate::error::{Result, TuneError};
use kiln_core::{Rng, Tensor};
use kiln_data::{EncodeOptions, Padding, Tokenizer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

/// Which columns hold the text, the optional second text (sentence pairs) and the label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Columns {
    /// The text column (default `"text"`).
    pub text: String,
    /// A second text column for sentence-pair tasks (default none).
    #[serde(default)]
    pub text_pair: Option<String>,
    /// The label column (default `"label"`).
    pub label: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns::new("text", "label")
    }
}

impl Columns {
    /// Text from column `text`, labels from column `label`.
    pub fn new(text: impl Into<String>, label: impl Into<String>) -> Self {
        Columns {
            text: text.into(),
            text_pair: None,
            label: label.into(),
        }
    }

    /// Adds a second text column (sentence pairs).
    pub fn pair(mut self, column: impl Into<String>) -> Self {
        self.text_pair = Some(column.into());
        self
    }
}

/// The file formats a dataset is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated, first line a header, RFC 4180 quoting.
    Csv,
    /// Tab-separated, first line a header.
    Tsv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// The format named by the file's extension (`.csv`, `.tsv`, `.jsonl`/`.json`).
    pub fn from_path(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Ok(Format::Csv),
            "tsv" | "tab" => Ok(Format::Tsv),
            "jsonl" | "ndjson" | "json" => Ok(Format::Jsonl),
            _ => Err(data_err(
                path,
                0,
                format!(
                    "cannot tell the format from the extension {:?}: use .csv, .tsv or .jsonl",
                    path.extension().unwrap_or_default()
                ),
            )),
        }
    }
}

/// One row: its text(s), the label as written in the file, and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The text.
    pub text: String,
    /// The second text of a pair.
    pub text_pair: Option<String>,
    /// The label cell, as written.
    pub label: String,
    /// 1-based line of the row in its file (its first line, for quoted multi-line cells).
    pub line: usize,
}

/// What the labels are: class names (classification) or numbers (regression).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LabelKind {
    /// Class names; the index of a name is its id.
    Classes(Vec<String>),
    /// A real number per row.
    Regression,
}

/// A labelled text dataset.
#[derive(Clone, Debug)]
pub struct TextDataset {
    examples: Vec<Example>,
    labels: LabelKind,
    origin: String,
}

fn data_err(path: &Path, line: usize, message: impl Into<String>) -> TuneError {
    TuneError::Data {
        file: path.display().to_string(),
        line,
        message: message.into(),
    }
}

/// Class names sorted as Hugging Face's `datasets` would list integer labels (numerically when
/// every name is an integer), otherwise lexicographically.
fn sorted_classes(names: BTreeSet<String>) -> Vec<String> {
    let mut v: Vec<String> = names.into_iter().collect();
    if v.iter().all(|s| s.parse::<i64>().is_ok()) {
        v.sort_by_key(|s| s.parse::<i64>().unwrap());
    }
    v
}

impl TextDataset {
    /// Reads a classification dataset (label names are the sorted distinct label cells).
    /// The format comes from the extension. Missing columns, empty cells, ragged rows, non-UTF-8
    /// bytes and a file without rows are errors naming the file, line and column.
    pub fn from_file(path: impl AsRef<Path>, columns: &Columns) -> Result<TextDataset> {
        let path = path.as_ref();
        let examples = read_examples(path, Format::from_path(path)?, columns)?;
        let names: BTreeSet<String> = examples.iter().map(|e| e.label.clone()).collect();
        if names.len() < 2 {
            return Err(data_err(
                path,
                0,
                format!(
                    "column `{}` has {} distinct label(s); classification needs at least 2",
                    columns.label,
                    names.len()
                ),
            ));
        }
        Ok(TextDataset {
            examples,
            labels: LabelKind::Classes(sorted_classes(names)),
            origin: path.display().to_string(),
        })
    }

    /// Reads a dataset whose labels must be among `classes` (e.g. a validation or test file for
    /// a trained model); an unknown label is an error naming the line.
    pub fn from_file_with_classes(
        path: impl AsRef<Path>,
        columns: &Columns,
        classes: &[String],
    ) -> Result<TextDataset> {
        let path = path.as_ref();
        let examples = read_examples(path, Format::from_path(path)?, columns)?;
        for e in &examples {
            if !classes.contains(&e.label) {
                return Err(data_err(
                    path,
                    e.line,
                    format!(
                        "column `{}`: unknown label {:?} (the model's labels are {:?})",
                        columns.label, e.label, classes
                    ),
                ));
            }
        }
        Ok(TextDataset {
            examples,
            labels: LabelKind::Classes(classes.to_vec()),
            origin: path.display().to_string(),
        })
    }

    /// Reads a regression dataset (every label cell must be a finite number).
    pub fn from_file_regression(path: impl AsRef<Path>, columns: &Columns) -> Result<TextDataset> {
        let path = path.as_ref();
        let examples = read_examples(path, Format::from_path(path)?, columns)?;
        for e in &examples {
            match e.label.trim().parse::<f64>() {
                Ok(v) if v.is_finite() => {}
                _ => {
                    return Err(data_err(
                        path,
                        e.line,
                        format!(
                            "column `{}`: {:?} is not a finite number",
                            columns.label, e.label
                        ),
                    ))
                }
            }
        }
        Ok(TextDataset {
            examples,
            labels: LabelKind::Regression,
            origin: path.display().to_string(),
        })
    }

    /// A dataset from rows in memory (labels as class names, all of which must be in `classes`).
    pub fn from_examples(
        examples: Vec<Example>,
        labels: LabelKind,
        origin: impl Into<String>,
    ) -> Result<TextDataset> {
        let origin = origin.into();
        if examples.is_empty() {
            return Err(TuneError::config(origin, "the dataset has no rows"));
        }
        if let LabelKind::Classes(classes) = &labels {
            if let Some(e) = examples.iter().find(|e| !classes.contains(&e.label)) {
                return Err(TuneError::Data {
                    file: origin,
                    line: e.line,
                    message: format!("unknown label {:?} (labels are {classes:?})", e.label),
                });
            }
        }
        Ok(TextDataset {
            examples,
            labels,
            origin,
        })
    }

    /// The first `n` rows (all when there are fewer), with the same labels.
    pub fn take(&self, n: usize) -> TextDataset {
        TextDataset {
            examples: self.examples[..n.min(self.examples.len())].to_vec(),
            labels: self.labels.clone(),
            origin: self.origin.clone(),
        }
    }

    /// The rows.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The label kind (class names or regression).
    pub fn labels(&self) -> &LabelKind {
        &self.labels
    }

    /// The class names (empty for regression).
    pub fn classes(&self) -> &[String] {
        match &self.labels {
            LabelKind::Classes(c) => c,
            LabelKind::Regression => &[],
        }
    }

    /// Where the rows came from (for messages).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Splits into `(train, valid)` with `valid_ratio` of the rows (rounded, at least one each)
    /// in validation, after a shuffle seeded with `seed`. Both keep all class names.
    pub fn split(&self, valid_ratio: f64, seed: u64) -> Result<(TextDataset, TextDataset)> {
        if !(valid_ratio > 0.0 && valid_ratio < 1.0) {
            return Err(TuneError::config(
                "valid_ratio",
                format!("must be in (0, 1), got {valid_ratio}"),
            ));
        }
        let n = self.examples.len();
        if n < 2 {
            return Err(TuneError::config(
                "valid_ratio",
                format!("{} has {n} row(s); a split needs at least 2", self.origin),
            ));
        }
        let order = permutation(n, seed);
        let n_valid = ((n as f64 * valid_ratio).round() as usize).clamp(1, n - 1);
        let pick = |idx: &[usize], tag: &str| TextDataset {
            examples: idx.iter().map(|&i| self.examples[i].clone()).collect(),
            labels: self.labels.clone(),
            origin: format!("{} ({tag})", self.origin),
        };
        Ok((
            pick(&order[n_valid..], "train"),
            pick(&order[..n_valid], "valid"),
        ))
    }

    /// The label of row `i` as a class id (classification) or value (regression).
    pub fn target(&self, i: usize) -> f64 {
        let e = &self.examples[i];
        match &self.labels {
            LabelKind::Classes(c) => c.iter().position(|n| *n == e.label).unwrap_or(0) as f64,
            LabelKind::Regression => e.label.trim().parse().unwrap_or(f64::NAN),
        }
    }

    /// Writes the rows as CSV with columns `text`, `label` (and `text_pair` for pairs).
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        let mut w = csv::Writer::from_path(path).map_err(|e| TuneError::io(path, e))?;
        let pairs = self.examples.first().is_some_and(|e| e.text_pair.is_some());
        let io = |e: csv::Error| TuneError::io(path, e);
        if pairs {
            w.write_record(["text", "text_pair", "label"]).map_err(io)?;
        } else {
            w.write_record(["text", "label"]).map_err(io)?;
        }
        for e in &self.examples {
            if pairs {
                let pair = e.text_pair.as_deref().unwrap_or("");
                w.write_record([e.text.as_str(), pair, e.label.as_str()])
                    .map_err(io)?;
            } else {
                w.write_record([e.text.as_str(), e.label.as_str()])
                    .map_err(io)?;
            }
        }
        w.flush().map_err(|e| TuneError::io(path, e))
    }

    /// Tokenizes rows `indices` into one padded batch (padding to the longest row, truncation to
    /// `max_length` tokens).
    pub fn batch(
        &self,
        tokenizer: &Tokenizer,
        indices: &[usize],
        max_length: usize,
    ) -> Result<TextBatch> {
        let opts = EncodeOptions::default()
            .padding(Padding::Longest)
            .truncation(max_length);
        let enc = if self.examples[indices[0]].text_pair.is_some() {
            let pairs: Vec<(&str, &str)> = indices
                .iter()
                .map(|&i| {
                    let e = &self.examples[i];
                    (e.text.as_str(), e.text_pair.as_deref().unwrap_or(""))
                })
                .collect();
            tokenizer.encode_batch_pairs(&pairs, &opts)?
        } else {
            let texts: Vec<&str> = indices
                .iter()
                .map(|&i| self.examples[i].text.as_str())
                .collect();
            tokenizer.encode_batch(&texts, &opts)?
        };
        let targets: Vec<f64> = indices.iter().map(|&i| self.target(i)).collect();
        let labels = match self.labels {
            LabelKind::Classes(_) => Tensor::from_vec(
                targets.iter().map(|&t| t as i64).collect::<Vec<i64>>(),
                [targets.len()],
            ),
            LabelKind::Regression => {
                Tensor::from_vec(targets.iter().map(|&t| t as f32).collect(), [targets.len()])
            }
        };
        Ok(TextBatch {
            input_ids: enc.input_ids,
            attention_mask: enc.attention_mask,
            token_type_ids: enc.token_type_ids,
            labels,
        })
    }
}

/// One tokenized, padded batch.
#[derive(Clone, Debug)]
pub struct TextBatch {
    /// `[B, L]` i64 token ids.
    pub input_ids: Tensor,
    /// `[B, L]` i64, 1 for tokens and 0 for padding.
    pub attention_mask: Tensor,
    /// `[B, L]` i64 segment ids.
    pub token_type_ids: Tensor,
    /// `[B]` i64 class ids, or `[B]` f32 values for regression.
    pub labels: Tensor,
}

impl TextBatch {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.input_ids.dims()[0]
    }

    /// True for a batch without rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A permutation of `0..n` drawn from a generator seeded with `seed` (Fisher–Yates).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Reads rows with the given columns from a file.
pub fn read_examples(path: &Path, format: Format, columns: &Columns) -> Result<Vec<Example>> {
    let bytes = std::fs::read(path).map_err(|e| TuneError::io(path, e))?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(data_err(path, 0, "the file is empty"));
    }
    let label = Some(columns.label.as_str());
    let examples = match format {
        Format::Csv => read_delimited(path, &bytes, b',', columns, label)?,
        Format::Tsv => read_delimited(path, &bytes, b'\t', columns, label)?,
        Format::Jsonl => read_jsonl(path, &bytes, columns, label)?,
    };
    if examples.is_empty() {
        return Err(data_err(path, 0, "the file has a header but no data rows"));
    }
    Ok(examples)
}

/// Reads only the text column of a file (e.g. rows to classify); labels are not needed.
pub fn read_texts(path: &Path, format: Format, column: &str) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| TuneError::io(path, e))?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(data_err(path, 0, "the file is empty"));
    }
    let columns = Columns::new(column, "");
    let rows = match format {
        Format::Csv => read_delimited(path, &bytes, b',', &columns, None)?,
        Format::Tsv => read_delimited(path, &bytes, b'\t', &columns, None)?,
        Format::Jsonl => read_jsonl(path, &bytes, &columns, None)?,
    };
    Ok(rows.into_iter().map(|e| e.text).collect())
}

fn read_delimited(
    path: &Path,
    bytes: &[u8],
    delimiter: u8,
    columns: &Columns,
    label_column: Option<&str>,
) -> Result<Vec<Example>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(bytes);
    let csv_err = |e: csv::Error| {
        let line = e
            .position()
            .map(|p| line_of(bytes, p.byte() as usize))
            .unwrap_or(0);
        let message = match e.kind() {
            csv::ErrorKind::Utf8 { err, .. } => format!(
                "not valid UTF-8 in column {} (the file must be UTF-8 text)",
                err.field() + 1
            ),
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => format!("the row has {len} cells but the header has {expected_len}"),
            _ => e.to_string(),
        };
        data_err(path, line, message)
    };
    let header = reader.headers().map_err(csv_err)?.clone();
    let find = |name: &str| -> Result<usize> {
        header.iter().position(|h| h == name).ok_or_else(|| {
            data_err(
                path,
                1,
                format!(
                    "no column `{name}` (the header has: {})",
                    header.iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    };
    let text = find(&columns.text)?;
    let pair = columns.text_pair.as_deref().map(find).transpose()?;
    let label = label_column.map(find).transpose()?;
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        // The csv crate does not count skipped blank lines; count newlines before the record.
        let line = record
            .position()
            .map(|p| line_of(bytes, p.byte() as usize))
            .unwrap_or(0);
        if record.iter().all(|c| c.trim().is_empty()) {
            continue;
        }
        let cell = |i: usize, name: &str| -> Result<String> {
            let v = record.get(i).unwrap_or("");
            if v.trim().is_empty() {
                return Err(data_err(
                    path,
                    line,
                    format!("column `{name}` (column {}) is empty", i + 1),
                ));
            }
            Ok(v.to_string())
        };
        out.push(Example {
            text: cell(text, &columns.text)?,
            text_pair: match (pair, &columns.text_pair) {
                (Some(i), Some(name)) => Some(cell(i, name)?),
                _ => None,
            },
            label: match label {
                Some(i) => cell(i, &columns.label)?.trim().to_string(),
                None => String::new(),
            },
            line,
        });
    }
    Ok(out)
}

/// The 1-based line of the first non-blank byte at or after offset `at` (the csv crate reports
/// a record's start before the blank lines it skipped).
fn line_of(bytes: &[u8], at: usize) -> usize {
    let mut at = at.min(bytes.len());
    while at < bytes.len() && matches!(bytes[at], b'\n' | b'\r') {
        at += 1;
    }
    1 + bytes[..at].iter().filter(|&&b| b == b'\n').count()
}

fn read_jsonl(
    path: &Path,
    bytes: &[u8],
    columns: &Columns,
    label_column: Option<&str>,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = std::str::from_utf8(raw).map_err(|e| {
            data_err(
                path,
                line,
                format!(
                    "not valid UTF-8 at byte {} of the line (the file must be UTF-8 text)",
                    e.valid_up_to() + 1
                ),
            )
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| data_err(path, line, format!("invalid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| {
            data_err(path, line, "expected a JSON object with the text and label")
        })?;
        let field = |name: &str| -> Result<String> {
            match obj.get(name) {
                None => Err(data_err(path, line, format!("no field `{name}`"))),
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(serde_json::Value::Bool(b)) => Ok(b.to_string()),
                Some(other) => Err(data_err(
                    path,
                    line,
                    format!("field `{name}` must be a non-empty string or a number, got {other}"),
                )),
            }
        };
        out.push(Example {
            text: field(&columns.text)?,
            text_pair: columns.text_pair.as_deref().map(field).transpose()?,
            label: match label_column {
                Some(name) => field(name)?.trim().to_string(),
                None => String::new(),
            },
            line,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, body: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-tune-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn csv_with_quotes_and_multiline_cells() {
        let p = write(
            "a.csv",
            b"id,text,label\n1,\"good, really\",pos\n2,\"two\nlines\",neg\n\n3,fine,pos\n",
        );
        let d = TextDataset::from_file(&p, &Columns::default()).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d.classes(), &["neg".to_string(), "pos".to_string()]);
        assert_eq!(d.examples()[0].text, "good, really");
        assert_eq!(d.examples()[1].text, "two\nlines");
        assert_eq!(d.examples()[2].line, 6);
        assert_eq!(d.target(0), 1.0);
        assert_eq!(d.target(1), 0.0);
    }

    #[test]
    fn integer_labels_sort_numerically() {
        let p = write("n.tsv", b"text\tlabel\na\t10\nb\t2\nc\t1\n");
        let d = TextDataset::from_file(&p, &Columns::default()).unwrap();
        assert_eq!(d.classes(), &["1", "2", "10"]);
    }

    #[test]
    fn jsonl_rows_and_pairs() {
        let p = write(
            "j.jsonl",
            b"{\"a\": \"x\", \"b\": \"y\", \"y\": 1}\n\n{\"a\": \"z\", \"b\": \"w\", \"y\": 0}\n",
        );
        let cols = Columns::new("a", "y").pair("b");
        let d = TextDataset::from_file(&p, &cols).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.examples()[1].text_pair.as_deref(), Some("w"));
        assert_eq!(d.examples()[1].line, 3);
        assert_eq!(d.classes(), &["0", "1"]);
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let cols = Columns::default();
        let e = TextDataset::from_file(write("m.csv", b"text,y\na,1\n"), &cols).unwrap_err();
        assert!(e.to_string().contains("m.csv:1: no column `label`"), "{e}");
        let e = TextDataset::from_file(write("e.csv", b""), &cols).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = TextDataset::from_file(write("h.csv", b"text,label\n"), &cols).unwrap_err();
        assert!(e.to_string().contains("no data rows"), "{e}");
        let e = TextDataset::from_file(write("r.csv", b"text,label\na,1\nb\n"), &cols).unwrap_err();
        assert!(e.to_string().contains("r.csv:3:"), "{e}");
        let e = TextDataset::from_file(write("u.csv", b"text,label\na,1\n\xff\xfe,0\n"), &cols)
            .unwrap_err();
        assert!(e.to_string().contains("u.csv:3: not valid UTF-8"), "{e}");
        let e =
            TextDataset::from_file(write("c.csv", b"text,label\na,1\n ,0\n"), &cols).unwrap_err();
        assert!(e.to_string().contains("c.csv:3: column `text`"), "{e}");
        let e =
            TextDataset::from_file(write("o.csv", b"text,label\na,1\nb,1\n"), &cols).unwrap_err();
        assert!(e.to_string().contains("at least 2"), "{e}");
        let e =
            TextDataset::from_file(write("j.jsonl", b"{\"text\": \"a\"}\n"), &cols).unwrap_err();
        assert!(e.to_string().contains("j.jsonl:1: no field `label`"), "{e}");
        let e = TextDataset::from_file(write("x.txt", b"a"), &cols).unwrap_err();
        assert!(e.to_string().contains("extension"), "{e}");
        let classes = vec!["neg".to_string(), "pos".to_string()];
        let e = TextDataset::from_file_with_classes(
            write("v.csv", b"text,label\na,pos\nb,meh\n"),
            &cols,
            &classes,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("v.csv:3: column `label`: unknown label \"meh\""),
            "{e}"
        );
        let e =
            TextDataset::from_file_regression(write("g.csv", b"text,label\na,1.5\nb,x\n"), &cols)
                .unwrap_err();
        assert!(e.to_string().contains("g.csv:3:"), "{e}");
    }

    #[test]
    fn split_is_seeded_disjoint_and_complete() {
        let rows: String = (0..50).map(|i| format!("t{i},{}\n", i % 2)).collect();
        let p = write("s.csv", format!("text,label\n{rows}").as_bytes());
        let d = TextDataset::from_file(&p, &Columns::default()).unwrap();
        let (tr, va) = d.split(0.2, 7).unwrap();
        assert_eq!((tr.len(), va.len()), (40, 10));
        let (tr2, _) = d.split(0.2, 7).unwrap();
        assert_eq!(tr.examples(), tr2.examples());
        let (tr3, _) = d.split(0.2, 8).unwrap();
        assert_ne!(tr.examples(), tr3.examples());
        let mut all: Vec<String> = tr
            .examples()
            .iter()
            .chain(va.examples())
            .map(|e| e.text.clone())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 50);
        assert!(d.split(1.0, 0).is_err());
        assert!(d.split(0.0, 0).is_err());
    }
}
