//! What the PyTorch parity tests share: the fixture tensor format, loading and comparison.
#![allow(dead_code)] // each test binary uses its own subset

use kiln_core::Tensor;
use kiln_nn::StateDict;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Largest absolute difference allowed against a PyTorch fixture (f32 math on both sides).
pub const TOL: f64 = 1e-5;

/// A tensor as the fixture scripts write it: `{"shape": [...], "data": [...]}`, plus for masks
/// `"kind": "bool" | "float"` and `"neg_inf"`, the indices of -inf entries (JSON has none).
#[derive(Deserialize)]
pub struct Arr {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub neg_inf: Vec<usize>,
}

impl Arr {
    /// The values as an f32 tensor (with its -inf entries).
    pub fn f32(&self) -> Tensor {
        let mut v: Vec<f32> = self.data.iter().map(|&x| x as f32).collect();
        for &i in &self.neg_inf {
            v[i] = f32::NEG_INFINITY;
        }
        Tensor::from_vec(v, self.shape.clone())
    }

    /// The values as an i64 tensor (indices, targets).
    pub fn i64(&self) -> Tensor {
        let v: Vec<i64> = self.data.iter().map(|&x| x as i64).collect();
        Tensor::from_vec(v, self.shape.clone())
    }

    /// A U32 0/1 tensor for a boolean mask, else [`Arr::f32`].
    pub fn tensor(&self) -> Tensor {
        if self.kind.as_deref() == Some("bool") {
            let v: Vec<u32> = self.data.iter().map(|&x| x as u32).collect();
            Tensor::from_vec(v, self.shape.clone())
        } else {
            self.f32()
        }
    }
}

/// Reads `tests/fixtures/<dir>/<name>.json`.
pub fn fixture<T: DeserializeOwned>(dir: &str, name: &str) -> T {
    let path = format!(
        "{}/tests/fixtures/{dir}/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A fixture's state dict as f32 tensors.
pub fn state_dict(arrs: &BTreeMap<String, Arr>) -> StateDict {
    arrs.iter().map(|(k, v)| (k.clone(), v.f32())).collect()
}

/// Largest absolute difference between `got` and the finite reference `want` (same shape).
pub fn max_diff(got: &Tensor, want: &Arr) -> f64 {
    assert_eq!(got.dims(), want.shape.as_slice(), "shape");
    assert!(want.neg_inf.is_empty(), "expected values are finite");
    got.to_f64_vec()
        .iter()
        .zip(&want.data)
        .map(|(a, b)| {
            assert!(a.is_finite(), "non-finite value {a}");
            (a - b).abs()
        })
        .fold(0.0, f64::max)
}
