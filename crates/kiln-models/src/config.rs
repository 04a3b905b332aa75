//! Helpers for Hugging Face `config.json` files: a parsed JSON object that hands out typed
//! fields (with HF's defaults for absent ones) and names the file and field in every error.

use crate::error::ModelError;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// A parsed `config.json`: a JSON object plus where it came from (for error messages).
#[derive(Debug, Clone)]
pub struct HfConfig {
    origin: String,
    map: Map<String, Value>,
}

impl HfConfig {
    /// Reads and parses `path` (which must hold a JSON object).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                what: "the model's config.json",
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses `text`; `origin` names the source in errors (a path, or `<string>`).
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, ModelError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ModelError::Json {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        match value {
            Value::Object(map) => Ok(HfConfig {
                origin: origin.to_string(),
                map,
            }),
            other => Err(ModelError::Json {
                origin: origin.to_string(),
                message: format!("expected a JSON object, got {}", kind(&other)),
            }),
        }
    }

    /// Where the config came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The whole JSON object.
    pub fn map(&self) -> &Map<String, Value> {
        &self.map
    }

    /// An error about `field` of this config.
    pub fn field_error(&self, field: &str, message: impl Into<String>) -> ModelError {
        ModelError::ConfigField {
            origin: self.origin.clone(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// `field` as a `T`, or `None` when absent or `null`.
    pub fn opt<T: DeserializeOwned>(&self, field: &str) -> Result<Option<T>, ModelError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| self.field_error(field, e.to_string())),
        }
    }

    /// `field` as a `T`, or `default` when absent or `null`.
    pub fn get_or<T: DeserializeOwned>(&self, field: &str, default: T) -> Result<T, ModelError> {
        Ok(self.opt(field)?.unwrap_or(default))
    }

    /// `field` as a `T`; an error when absent.
    pub fn require<T: DeserializeOwned>(&self, field: &str) -> Result<T, ModelError> {
        self.opt(field)?
            .ok_or_else(|| self.field_error(field, "missing"))
    }

    /// Checks that `model_type` is `expected` (an absent `model_type` is accepted).
    pub fn expect_model_type(&self, expected: &'static str) -> Result<(), ModelError> {
        match self.opt::<String>("model_type")? {
            Some(found) if found != expected => Err(ModelError::WrongModelType {
                origin: self.origin.clone(),
                found,
                expected,
            }),
            _ => Ok(()),
        }
    }

    /// The classification labels: `id2label` (keys are decimal strings, as HF writes them),
    /// else `num_labels` generic names `LABEL_i`, else HF's default of 2 labels. Both present
    /// and disagreeing is an error.
    pub fn labels(&self) -> Result<Vec<String>, ModelError> {
        let num_labels: Option<usize> = self.opt("num_labels")?;
        let Some(raw) = self.opt::<BTreeMap<String, String>>("id2label")? else {
            return Ok(default_labels(num_labels.unwrap_or(2)));
        };
        let mut by_id = BTreeMap::new();
        for (k, v) in raw {
            let id: usize = k.parse().map_err(|_| {
                self.field_error("id2label", format!("key \"{k}\" is not a label index"))
            })?;
            by_id.insert(id, v);
        }
        if let Some((i, _)) = by_id.keys().enumerate().find(|(i, id)| i != *id) {
            return Err(self.field_error(
                "id2label",
                format!(
                    "label indices must be 0..{}, index {i} is absent",
                    by_id.len()
                ),
            ));
        }
        if let Some(n) = num_labels {
            if n != by_id.len() {
                return Err(self.field_error(
                    "num_labels",
                    format!("is {n} but id2label has {} labels", by_id.len()),
                ));
            }
        }
        let labels: Vec<String> = by_id.into_values().collect();
        if let Some(l2i) = self.opt::<BTreeMap<String, usize>>("label2id")? {
            for (name, id) in &l2i {
                if labels.get(*id) != Some(name) {
                    return Err(self.field_error(
                        "label2id",
                        format!("\"{name}\": {id} disagrees with id2label"),
                    ));
                }
            }
        }
        Ok(labels)
    }
}

/// HF's generic label names `LABEL_0`, `LABEL_1`, ...
pub fn default_labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("LABEL_{i}")).collect()
}

/// `id2label` and `label2id` JSON objects in HF's layout for `labels`.
pub fn labels_json(labels: &[String]) -> (Value, Value) {
    let id2label: Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), Value::String(l.clone())))
        .collect();
    let label2id: Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), Value::from(i)))
        .collect();
    (Value::Object(id2label), Value::Object(label2id))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> HfConfig {
        HfConfig::from_json_str(s, "cfg.json").unwrap()
    }

    #[test]
    fn typed_fields_defaults_and_errors_name_file_and_field() {
        let c = cfg(r#"{"hidden_size": 8, "eps": 1e-12, "act": "gelu", "none": null}"#);
        assert_eq!(c.require::<usize>("hidden_size").unwrap(), 8);
        assert_eq!(c.get_or::<f64>("eps", 0.0).unwrap(), 1e-12);
        assert_eq!(c.get_or::<usize>("absent", 7).unwrap(), 7);
        assert_eq!(c.opt::<f64>("none").unwrap(), None);
        let e = c.require::<usize>("act").unwrap_err().to_string();
        assert!(e.starts_with("cfg.json: field `act`: invalid type"), "{e}");
        let e = c.require::<usize>("nope").unwrap_err().to_string();
        assert_eq!(e, "cfg.json: field `nope`: missing");
        let e = HfConfig::from_json_str("[1]", "x.json")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "x.json: invalid JSON: expected a JSON object, got an array"
        );
        let e = HfConfig::from_json_str("{", "x.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.json: invalid JSON: EOF"), "{e}");
    }

    #[test]
    fn model_type_check() {
        cfg(r#"{"model_type": "bert"}"#)
            .expect_model_type("bert")
            .unwrap();
        cfg("{}").expect_model_type("bert").unwrap();
        let e = cfg(r#"{"model_type": "gpt2"}"#)
            .expect_model_type("bert")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "cfg.json: field `model_type` is \"gpt2\", expected \"bert\""
        );
    }

    #[test]
    fn labels_from_id2label_num_labels_or_default() {
        assert_eq!(cfg("{}").labels().unwrap(), ["LABEL_0", "LABEL_1"]);
        assert_eq!(cfg(r#"{"num_labels": 3}"#).labels().unwrap().len(), 3);
        let c = cfg(r#"{"id2label": {"1": "pos", "0": "neg"}, "label2id": {"neg": 0, "pos": 1}}"#);
        assert_eq!(c.labels().unwrap(), ["neg", "pos"]);
        let (i2l, l2i) = labels_json(&c.labels().unwrap());
        assert_eq!(i2l["1"], "pos");
        assert_eq!(l2i["neg"], 0);
        let e = cfg(r#"{"id2label": {"0": "a"}, "num_labels": 2}"#)
            .labels()
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "cfg.json: field `num_labels`: is 2 but id2label has 1 labels"
        );
        let e = cfg(r#"{"id2label": {"0": "a", "2": "b"}}"#)
            .labels()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field `id2label`") && e.contains("index 1 is absent"),
            "{e}"
        );
        let e = cfg(r#"{"id2label": {"x": "a"}}"#)
            .labels()
            .unwrap_err()
            .to_string();
        assert!(e.contains("key \"x\" is not a label index"), "{e}");
        let e = cfg(r#"{"id2label": {"0": "a", "1": "b"}, "label2id": {"a": 1}}"#)
            .labels()
            .unwrap_err()
            .to_string();
        assert!(e.contains("field `label2id`"), "{e}");
    }
}
