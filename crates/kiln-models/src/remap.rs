//! Checkpoint name remapping: a small declarative [`KeyMap`] applied to a [`StateDict`] before
//! `load_state_dict`, so that a checkpoint written by another framework (or for another head)
//! lines up with a kiln model's parameter names and layouts.
//!
//! Rules run in the order they were added, each over every key. Suffix rules match whole
//! dot-separated segments: the suffix `gamma` matches `LayerNorm.gamma` but not `LayerNormgamma`.
//!
//! ```
//! use kiln_models::KeyMap;
//! // A TF-style BERT checkpoint into a bare BertModel:
//! let map = KeyMap::new()
//!     .strip_prefix("bert.")
//!     .rename_suffix("gamma", "weight")
//!     .rename_suffix("beta", "bias")
//!     .drop_suffix("embeddings.position_ids");
//! ```

use crate::error::ModelError;
use kiln_nn::StateDict;

#[derive(Debug, Clone)]
enum Rule {
    StripPrefix(String),
    AddPrefix(String),
    RenameSuffix {
        from: String,
        to: String,
    },
    Drop(String),
    Transpose(Vec<String>),
    Split {
        suffix: String,
        dim: usize,
        parts: Vec<(String, usize)>,
    },
}

/// An ordered list of renaming / reshaping rules for checkpoint keys.
#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    rules: Vec<Rule>,
}

/// When `key` ends with the whole segments `suffix`, the part before it (with its trailing dot).
fn suffix_base<'a>(key: &'a str, suffix: &str) -> Option<&'a str> {
    let base = key.strip_suffix(suffix)?;
    (base.is_empty() || base.ends_with('.')).then_some(base)
}

impl KeyMap {
    /// An empty map (the identity).
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes `prefix` (e.g. `"bert."`) from the keys that start with it.
    pub fn strip_prefix(mut self, prefix: &str) -> Self {
        self.rules.push(Rule::StripPrefix(prefix.to_string()));
        self
    }

    /// Prepends `prefix` to the keys that do not already start with it.
    pub fn add_prefix(mut self, prefix: &str) -> Self {
        self.rules.push(Rule::AddPrefix(prefix.to_string()));
        self
    }

    /// Replaces the trailing segments `from` by `to` (e.g. `gamma` → `weight`).
    pub fn rename_suffix(mut self, from: &str, to: &str) -> Self {
        self.rules.push(Rule::RenameSuffix {
            from: from.to_string(),
            to: to.to_string(),
        });
        self
    }

    /// Removes the keys ending with the segments `suffix` (e.g. non-persistent buffers such as
    /// `embeddings.position_ids`).
    pub fn drop_suffix(mut self, suffix: &str) -> Self {
        self.rules.push(Rule::Drop(suffix.to_string()));
        self
    }

    /// Transposes the 2-D tensors whose keys end with one of `suffixes` (e.g. GPT-2's Conv1D
    /// weights, stored `[in, out]`, into `Linear`'s `[out, in]`).
    pub fn transpose(mut self, suffixes: &[&str]) -> Self {
        self.rules.push(Rule::Transpose(
            suffixes.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }

    /// Splits each tensor whose key ends with `suffix` along `dim` into consecutive parts of the
    /// given sizes, named by replacing `suffix` with each part's name (e.g. `attn.c_attn.weight`
    /// into `attn.q_proj.weight`, `attn.k_proj.weight`, `attn.v_proj.weight`). The sizes must
    /// add up to the tensor's size along `dim`.
    pub fn split(mut self, suffix: &str, dim: usize, parts: &[(&str, usize)]) -> Self {
        self.rules.push(Rule::Split {
            suffix: suffix.to_string(),
            dim,
            parts: parts.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
        });
        self
    }

    /// Applies the rules in order; the input is not changed. Errors when a split or transpose
    /// does not fit a tensor's shape, or when two keys end up with the same name.
    pub fn apply(&self, sd: &StateDict) -> Result<StateDict, ModelError> {
        let mut entries: Vec<(String, kiln_core::Tensor)> =
            sd.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
        for rule in &self.rules {
            let mut next = Vec::with_capacity(entries.len());
            for (key, t) in entries {
                match rule {
                    Rule::StripPrefix(p) => match key.strip_prefix(p.as_str()) {
                        Some(rest) => next.push((rest.to_string(), t)),
                        None => next.push((key, t)),
                    },
                    Rule::AddPrefix(p) if !key.starts_with(p.as_str()) => {
                        next.push((format!("{p}{key}"), t))
                    }
                    Rule::AddPrefix(_) => next.push((key, t)),
                    Rule::RenameSuffix { from, to } => match suffix_base(&key, from) {
                        Some(base) => next.push((format!("{base}{to}"), t)),
                        None => next.push((key, t)),
                    },
                    Rule::Drop(s) => {
                        if suffix_base(&key, s).is_none() {
                            next.push((key, t));
                        }
                    }
                    Rule::Transpose(list) => {
                        if list.iter().any(|s| suffix_base(&key, s).is_some()) {
                            if t.rank() != 2 {
                                return Err(ModelError::Remap(format!(
                                    "transpose of {key}: expected a 2-D tensor, got shape {}",
                                    t.shape()
                                )));
                            }
                            next.push((key, t.t().contiguous()));
                        } else {
                            next.push((key, t));
                        }
                    }
                    Rule::Split { suffix, dim, parts } => match suffix_base(&key, suffix) {
                        Some(base) => {
                            let total: usize = parts.iter().map(|p| p.1).sum();
                            if *dim >= t.rank() || t.dims()[*dim] != total {
                                return Err(ModelError::Remap(format!(
                                    "split of {key} (shape {}) along dim {dim} into sizes {:?}: the sizes must add up to the tensor's size along that dim",
                                    t.shape(),
                                    parts.iter().map(|p| p.1).collect::<Vec<_>>()
                                )));
                            }
                            let mut start = 0;
                            for (name, size) in parts {
                                next.push((
                                    format!("{base}{name}"),
                                    t.narrow(*dim, start, *size).contiguous(),
                                ));
                                start += size;
                            }
                        }
                        None => next.push((key, t)),
                    },
                }
            }
            entries = next;
        }
        let mut seen = std::collections::HashSet::new();
        for (k, _) in &entries {
            if !seen.insert(k.as_str()) {
                return Err(ModelError::Remap(format!(
                    "two checkpoint tensors map to the same name {k}"
                )));
            }
        }
        Ok(entries.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Tensor;

    fn sd(keys: &[&str]) -> StateDict {
        keys.iter()
            .enumerate()
            .map(|(i, k)| (k.to_string(), Tensor::full([2], i as f32)))
            .collect()
    }

    fn keys(sd: &StateDict) -> Vec<&str> {
        sd.iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn prefixes_suffix_renames_and_drops() {
        let src = sd(&[
            "bert.embeddings.LayerNorm.gamma",
            "bert.embeddings.LayerNorm.beta",
            "bert.embeddings.position_ids",
            "classifier.weight",
            "x.notgamma",
        ]);
        let out = KeyMap::new()
            .strip_prefix("bert.")
            .rename_suffix("gamma", "weight")
            .rename_suffix("beta", "bias")
            .drop_suffix("embeddings.position_ids")
            .apply(&src)
            .unwrap();
        assert_eq!(
            keys(&out),
            [
                "embeddings.LayerNorm.weight",
                "embeddings.LayerNorm.bias",
                "classifier.weight",
                "x.notgamma"
            ]
        );
        // Tensors travel with their keys.
        assert_eq!(
            out.get("embeddings.LayerNorm.bias")
                .unwrap()
                .to_vec::<f32>(),
            [1.0; 2]
        );
        // add_prefix skips keys that already have it; the identity map changes nothing.
        let out = KeyMap::new()
            .add_prefix("bert.")
            .apply(&sd(&["bert.a", "b"]))
            .unwrap();
        assert_eq!(keys(&out), ["bert.a", "bert.b"]);
        assert_eq!(keys(&KeyMap::new().apply(&src).unwrap()), keys(&src));
    }

    #[test]
    fn gpt2_style_conv1d_transpose_then_fused_qkv_split() {
        // Conv1D weight [in=2, out=3·2] (x @ W), bias [6].
        let w: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut src = StateDict::new();
        src.insert("h.0.attn.c_attn.weight", Tensor::from_vec(w, [2, 6]));
        src.insert(
            "h.0.attn.c_attn.bias",
            Tensor::from_vec((0..6).map(|v| v as f32).collect::<Vec<_>>(), [6]),
        );
        src.insert("h.0.mlp.c_fc.weight", Tensor::zeros([2, 4]));
        let parts = |p: &str| {
            [
                (format!("q_proj.{p}")),
                format!("k_proj.{p}"),
                format!("v_proj.{p}"),
            ]
        };
        let (wp, bp) = (parts("weight"), parts("bias"));
        let out = KeyMap::new()
            .transpose(&["attn.c_attn.weight", "mlp.c_fc.weight"])
            .split("c_attn.weight", 0, &[(&wp[0], 2), (&wp[1], 2), (&wp[2], 2)])
            .split("c_attn.bias", 0, &[(&bp[0], 2), (&bp[1], 2), (&bp[2], 2)])
            .apply(&src)
            .unwrap();
        // The transposed weight is [6, 2] with row r = column r of the original: [r, 6 + r].
        let k = out.get("h.0.attn.k_proj.weight").unwrap();
        assert_eq!(k.dims(), &[2, 2]);
        assert_eq!(k.to_vec::<f32>(), [2.0, 8.0, 3.0, 9.0]);
        assert_eq!(
            out.get("h.0.attn.v_proj.bias").unwrap().to_vec::<f32>(),
            [4.0, 5.0]
        );
        assert_eq!(out.get("h.0.mlp.c_fc.weight").unwrap().dims(), &[4, 2]);
        assert!(out.get("h.0.attn.c_attn.weight").is_none());
        assert_eq!(out.len(), 7);
    }

    #[test]
    fn misfits_are_errors_naming_key_and_shape() {
        let mut src = StateDict::new();
        src.insert("a.c_attn.weight", Tensor::zeros([5, 2]));
        let e = KeyMap::new()
            .split("c_attn.weight", 0, &[("q", 2), ("k", 2)])
            .apply(&src)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("split of a.c_attn.weight (shape [5, 2]) along dim 0 into sizes [2, 2]"),
            "{e}"
        );
        let mut src = StateDict::new();
        src.insert("b.weight", Tensor::zeros([3]));
        let e = KeyMap::new()
            .transpose(&["weight"])
            .apply(&src)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("transpose of b.weight: expected a 2-D tensor, got shape [3]"),
            "{e}"
        );
        let e = KeyMap::new()
            .strip_prefix("bert.")
            .apply(&sd(&["bert.x", "x"]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("map to the same name x"), "{e}");
    }
}
