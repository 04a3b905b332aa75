//! LoRA (Hu et al. 2021): low-rank adapters on a model's `Linear` layers, as in Hugging Face
//! PEFT. [`apply_lora`] attaches a [`LoraLinear`] to every `Linear` whose name matches the
//! config's targets and freezes the rest of the model (except `modules_to_save`, e.g. a task
//! head); [`merge_lora`]/[`unmerge_lora`] fold the adapters into the base weights and back;
//! [`save_adapter`]/[`load_adapter`] write and read the PEFT layout (`adapter_config.json` +
//! `adapter_model.safetensors` with PEFT's key names), so an adapter trained here loads with
//! `peft.PeftModel.from_pretrained` and the reverse.
//!
//! ```
//! use kiln_core::{Rng, Tensor};
//! use kiln_nn::{Forward, Linear, Module, ModuleExt};
//! use kiln_tune::lora::{apply_lora, merge_lora, LoraConfig};
//!
//! #[derive(Module)]
//! struct Net {
//!     query: Linear,
//!     classifier: Linear,
//! }
//! let mut rng = Rng::new(0);
//! let net = Net { query: Linear::new(8, 8, &mut rng), classifier: Linear::new(8, 2, &mut rng) };
//! let config = LoraConfig::default()
//!     .r(4)
//!     .alpha(8.0)
//!     .target_modules(["query"])
//!     .modules_to_save(["classifier"]);
//! let report = apply_lora(&net, &config).unwrap();
//! assert_eq!(report.adapted, ["query"]);
//! // lora_A, lora_B and the classifier train; the base query layer is frozen.
//! assert_eq!(net.num_trainable_parameters(), 4 * 8 + 8 * 4 + 8 * 2 + 2);
//! let x = Tensor::ones([3, 8]);
//! let y = net.classifier.forward(&net.query.forward(&x));
//! merge_lora(&net).unwrap();
//! assert_eq!(y.dims(), &[3, 2]);
//! ```

use crate::error::{Result, TuneError};
use kiln_core::{with_no_grad, DType, Rng, Tensor};
use kiln_nn::layers::{AdapterSlot, Dropout, LinearAdapter};
use kiln_nn::{init, Forward, Module, ModuleExt, NnError, Param, StateDict, Visited};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// File name of the adapter configuration in the PEFT layout.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights in the PEFT layout.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before every saved key.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// What LoRA adapts and how (PEFT's `LoraConfig` fields, same defaults: r 8, alpha 8, no
/// dropout). Reads from TOML/JSON with these names (PEFT's `lora_alpha`/`lora_dropout` are
/// accepted too); unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update `B·A`.
    pub r: usize,
    /// Scale numerator: the update is multiplied by `alpha / r` (`alpha / √r` with rsLoRA).
    #[serde(alias = "lora_alpha")]
    pub alpha: f64,
    /// Dropout probability on the adapter's input while training.
    #[serde(alias = "lora_dropout")]
    pub dropout: f64,
    /// Which `Linear` layers get an adapter: a plain name matches a layer whose dotted name is
    /// it or ends with `.name` (PEFT's rule: `query`, `attention.self.value`); a pattern with
    /// `*`, `?`, `[` or `{` is a glob over the whole name (`*` crosses dots). Empty: inferred
    /// from the model as PEFT does (`query`+`value`, `q_proj`+`v_proj` or `c_attn`).
    pub target_modules: Vec<String>,
    /// rsLoRA: scale by `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Which biases train: only `"none"` is supported (PEFT's default).
    pub bias: String,
    /// Modules trained in full and saved with the adapter (e.g. `classifier`), matched like
    /// `target_modules`.
    pub modules_to_save: Vec<String>,
    /// Seed of the `lora_A` initialisation and the dropout masks (kiln only; not saved).
    #[serde(skip_serializing)]
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: Vec::new(),
            use_rslora: false,
            bias: "none".to_string(),
            modules_to_save: Vec::new(),
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// Sets the rank.
    pub fn r(mut self, r: usize) -> Self {
        self.r = r;
        self
    }

    /// Sets `alpha`.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// Sets the dropout probability.
    pub fn dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }

    /// Sets the target modules (names or globs).
    pub fn target_modules<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.target_modules = names.into_iter().map(Into::into).collect();
        self
    }

    /// Turns rsLoRA scaling on or off.
    pub fn use_rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }

    /// Sets the modules trained in full and saved with the adapter.
    pub fn modules_to_save<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.modules_to_save = names.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the initialisation/dropout seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The factor the update `B·A x` is multiplied by: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks the values: `r ≥ 1`, finite `alpha`, dropout in `[0, 1)`, bias `"none"`.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(TuneError::config("lora.r", "the rank must be at least 1"));
        }
        if !self.alpha.is_finite() {
            return Err(TuneError::config(
                "lora.alpha",
                format!("must be finite, got {}", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(TuneError::config(
                "lora.dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        if self.bias != "none" {
            return Err(TuneError::config(
                "lora.bias",
                format!(
                    "only \"none\" is supported (biases stay frozen), got {:?}",
                    self.bias
                ),
            ));
        }
        Ok(())
    }

    /// Parses a TOML table (e.g. a recipe's `[lora]` section).
    pub fn from_toml_table(table: toml::Table) -> Result<Self> {
        table
            .try_into::<LoraConfig>()
            .map_err(|e| TuneError::config("lora", e.to_string()))
    }
}

/// One factor of a LoRA update, a module with a single `weight` (as PEFT's `lora_A`/`lora_B`
/// `nn.Linear` without bias).
#[derive(Module, Debug)]
pub struct LoraFactor {
    /// `[r, in]` for `lora_A`, `[out, r]` for `lora_B`.
    pub weight: Param,
}

/// A LoRA adapter of a `Linear` `[out, in]`: output `y + s · B(A(dropout(x)))` with `lora_A`
/// `[r, in]`, `lora_B` `[out, r]` and scale `s`. Parameters are named `lora_A.weight` and
/// `lora_B.weight` under the layer, as in PEFT's saved files.
#[derive(Module, Debug)]
pub struct LoraLinear {
    #[module(rename = "lora_A")]
    lora_a: LoraFactor,
    #[module(rename = "lora_B")]
    lora_b: LoraFactor,
    lora_dropout: Option<Dropout>,
    #[module(skip)]
    scaling: f64,
    #[module(skip)]
    merged: AtomicBool,
}

impl LoraLinear {
    /// An adapter for a `Linear` of `in_features → out_features`, initialised like PEFT:
    /// `lora_A` by `kaiming_uniform_(a=√5)` from `rng`, `lora_B` zeros (so the layer's output
    /// is unchanged until training). `dropout` > 0 draws masks from a generator seeded with
    /// `dropout_seed`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_features: usize,
        out_features: usize,
        r: usize,
        scaling: f64,
        dropout: f64,
        dtype: DType,
        rng: &mut Rng,
        dropout_seed: u64,
    ) -> Self {
        assert!(
            r >= 1,
            "LoraLinear: rank must be at least 1 (layer {out_features}x{in_features})"
        );
        let a = Tensor::zeros([r, in_features]);
        init::kaiming_uniform_default_(&a, rng);
        let b = Tensor::zeros_dtype([out_features, r], dtype);
        Self::from_weights(a.to_dtype(dtype), b, scaling, dropout, dropout_seed)
    }

    /// An adapter over given factors `a` `[r, in]` and `b` `[out, r]` (same dtype).
    pub fn from_weights(
        a: Tensor,
        b: Tensor,
        scaling: f64,
        dropout: f64,
        dropout_seed: u64,
    ) -> Self {
        assert!(
            a.rank() == 2 && b.rank() == 2 && a.dims()[0] == b.dims()[1] && a.dims()[0] >= 1,
            "LoraLinear: lora_A must be [r, in] and lora_B [out, r], got {} and {}",
            a.shape(),
            b.shape()
        );
        assert_eq!(
            a.dtype(),
            b.dtype(),
            "LoraLinear: lora_A dtype {} differs from lora_B dtype {}",
            a.dtype(),
            b.dtype()
        );
        LoraLinear {
            lora_a: LoraFactor {
                weight: Param::new(a),
            },
            lora_b: LoraFactor {
                weight: Param::new(b),
            },
            lora_dropout: (dropout > 0.0).then(|| Dropout::new(dropout, dropout_seed)),
            scaling,
            merged: AtomicBool::new(false),
        }
    }

    /// `lora_A.weight` `[r, in]`.
    pub fn lora_a(&self) -> &Param {
        &self.lora_a.weight
    }

    /// `lora_B.weight` `[out, r]`.
    pub fn lora_b(&self) -> &Param {
        &self.lora_b.weight
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.lora_a.weight.dims()[0]
    }

    /// The scale `s` of the update.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// The dropout probability (0 without dropout).
    pub fn dropout_p(&self) -> f64 {
        self.lora_dropout.as_ref().map_or(0.0, |d| d.p)
    }

    /// The weight update `s · B·A` `[out, in]` (not recorded by autograd).
    pub fn delta_weight(&self) -> Tensor {
        with_no_grad(|| {
            self.lora_b
                .weight
                .matmul(&self.lora_a.weight)
                .mul_scalar(self.scaling)
        })
    }

    fn check_weight(&self, weight: &Tensor, op: &str) -> Result<(), NnError> {
        let want = [self.lora_b.weight.dims()[0], self.lora_a.weight.dims()[1]];
        if weight.dims() != want {
            return Err(NnError::Config(format!(
                "LoraLinear::{op}: base weight {} does not fit the adapter ({}x{} from lora_B {} · lora_A {})",
                weight.shape(),
                want[0],
                want[1],
                self.lora_b.weight.shape(),
                self.lora_a.weight.shape()
            )));
        }
        Ok(())
    }
}

impl LinearAdapter for LoraLinear {
    /// `base + s · (dropout(x) Aᵀ) Bᵀ`; `base` alone while merged.
    fn adapt(&self, x: &Tensor, base: Tensor) -> Tensor {
        if self.is_merged() {
            return base;
        }
        let dropped;
        let x = match &self.lora_dropout {
            Some(d) => {
                dropped = d.forward(x);
                &dropped
            }
            None => x,
        };
        // Scale the rank-r intermediate: r ≤ out, so this is the cheaper place.
        let low = x.matmul(&self.lora_a.weight.t()).mul_scalar(self.scaling);
        base.add(&low.matmul(&self.lora_b.weight.t()))
    }

    /// Without dropout: the base layer and the update in one op ([`Tensor::linear_low_rank`]),
    /// which spares the update's own `[.., out]` tensor and, in backward, the second gradient
    /// of `x`.
    fn forward_with_base(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Option<Tensor> {
        if self.is_merged() || self.lora_dropout.is_some() {
            return None;
        }
        Some(x.linear_low_rank(
            weight,
            bias,
            &self.lora_a.weight,
            &self.lora_b.weight,
            self.scaling,
        ))
    }

    /// `W += s · B·A`; an error when already merged or when `weight` has another shape.
    fn merge_into(&self, weight: &Tensor) -> Result<(), NnError> {
        self.check_weight(weight, "merge_into")?;
        if self.merged.swap(true, Ordering::AcqRel) {
            return Err(NnError::Config(
                "LoraLinear::merge_into: the adapter is already merged".into(),
            ));
        }
        let delta = self.delta_weight().to_dtype(weight.dtype());
        with_no_grad(|| weight.assign(&weight.detach().add(&delta)));
        Ok(())
    }

    /// `W -= s · B·A`; an error when not merged.
    fn unmerge_from(&self, weight: &Tensor) -> Result<(), NnError> {
        self.check_weight(weight, "unmerge_from")?;
        if !self.merged.swap(false, Ordering::AcqRel) {
            return Err(NnError::Config(
                "LoraLinear::unmerge_from: the adapter is not merged".into(),
            ));
        }
        let delta = self.delta_weight().to_dtype(weight.dtype());
        with_no_grad(|| weight.assign(&weight.detach().sub(&delta)));
        Ok(())
    }

    fn is_merged(&self) -> bool {
        self.merged.load(Ordering::Acquire)
    }
}

/// What [`apply_lora`] (or [`load_adapter`]) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoraReport {
    /// The target names used (the config's, or the ones inferred from the model).
    pub targets: Vec<String>,
    /// Names of the `Linear` layers that got an adapter, in model order.
    pub adapted: Vec<String>,
    /// Parameters of `modules_to_save`, left trainable.
    pub saved_parameters: Vec<String>,
    /// Trainable parameter elements after the change (adapters + saved modules).
    pub trainable: usize,
    /// All parameter elements (base + adapters).
    pub total: usize,
}

impl std::fmt::Display for LoraReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LoRA on {} layers ({}); trainable {} of {} parameters ({:.3}%)",
            self.adapted.len(),
            self.targets.join(", "),
            self.trainable,
            self.total,
            100.0 * self.trainable as f64 / self.total.max(1) as f64
        )
    }
}

/// A target: a PEFT-style name (suffix at a dot boundary) or a glob over the whole name.
enum Target {
    Name(String),
    Glob(globset::GlobMatcher),
}

impl Target {
    fn new(pattern: &str, what: &str) -> Result<Self> {
        if pattern.is_empty() {
            return Err(TuneError::config(what, "empty module name"));
        }
        if pattern.contains(['*', '?', '[', '{']) {
            let glob = globset::Glob::new(pattern)
                .map_err(|e| TuneError::config(what, format!("pattern `{pattern}`: {e}")))?;
            Ok(Target::Glob(glob.compile_matcher()))
        } else {
            Ok(Target::Name(pattern.to_string()))
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Target::Name(t) => {
                name == t
                    || (name.len() > t.len()
                        && name.ends_with(t.as_str())
                        && name.as_bytes()[name.len() - t.len() - 1] == b'.')
            }
            Target::Glob(g) => g.is_match(name),
        }
    }
}

fn is_plain_name(pattern: &str) -> bool {
    !pattern.contains(['*', '?', '[', '{'])
}

fn examples(names: &[String]) -> String {
    let mut shown: Vec<&str> = names.iter().take(6).map(String::as_str).collect();
    if names.len() > shown.len() {
        shown.push("...");
    }
    if shown.is_empty() {
        "the model has none".to_string()
    } else {
        format!("names look like: {}", shown.join(", "))
    }
}

/// The `Linear` layers of `model` as PEFT would pick them by default.
fn infer_targets(names: &[String]) -> Result<Vec<String>> {
    const DEFAULTS: [&[&str]; 3] = [&["query", "value"], &["q_proj", "v_proj"], &["c_attn"]];
    for set in DEFAULTS {
        let all = set.iter().all(|t| {
            let t = Target::Name(t.to_string());
            names.iter().any(|n| t.matches(n))
        });
        if all {
            return Ok(set.iter().map(|s| s.to_string()).collect());
        }
    }
    Err(TuneError::config(
        "lora.target_modules",
        format!(
            "none given and none of the defaults (query+value, q_proj+v_proj, c_attn) fit the model's Linear layers ({})",
            examples(names)
        ),
    ))
}

/// Parameters of the modules named by `patterns` (every parameter under a matching module).
/// Each pattern must match something when `strict`.
fn saved_parameters<M: Module + ?Sized>(
    model: &M,
    patterns: &[String],
    strict: bool,
) -> Result<Vec<(String, Param)>> {
    let targets = patterns
        .iter()
        .map(|p| Target::new(p, "lora.modules_to_save"))
        .collect::<Result<Vec<_>>>()?;
    let params = model.named_parameters();
    let under = |t: &Target, name: &str| {
        let mut prefix = name;
        while let Some(dot) = prefix.rfind('.') {
            prefix = &prefix[..dot];
            if t.matches(prefix) {
                return true;
            }
        }
        false
    };
    let mut out = Vec::new();
    let mut hit = vec![false; targets.len()];
    for (name, p) in params.iter() {
        let mut any = false;
        for (i, t) in targets.iter().enumerate() {
            if under(t, name) {
                hit[i] = true;
                any = true;
            }
        }
        if any && !is_adapter_param(name) {
            out.push((name.clone(), p.clone()));
        }
    }
    if strict {
        if let Some(i) = hit.iter().position(|h| !h) {
            let modules: Vec<String> = params
                .iter()
                .filter_map(|(n, _)| n.rfind('.').map(|d| n[..d].to_string()))
                .fold(Vec::new(), |mut v, m| {
                    if v.last() != Some(&m) {
                        v.push(m)
                    }
                    v
                });
            return Err(TuneError::config(
                "lora.modules_to_save",
                format!(
                    "`{}` matches no module with parameters (module {})",
                    patterns[i],
                    examples(&modules)
                ),
            ));
        }
    }
    Ok(out)
}

fn is_adapter_param(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.") || name.starts_with("lora_")
}

/// The LoRA adapter in `a`, if it is one.
fn as_lora(a: Arc<dyn LinearAdapter>) -> Option<Arc<LoraLinear>> {
    let any: Arc<dyn Any + Send + Sync> = a;
    any.downcast::<LoraLinear>().ok()
}

/// Every `Linear` of `model` that carries a LoRA adapter, with its name, in model order.
pub fn lora_layers<M: Module + ?Sized>(model: &M) -> Vec<(String, Arc<LoraLinear>)> {
    model
        .adapter_slots()
        .into_iter()
        .filter_map(|(n, s)| s.get().and_then(as_lora).map(|l| (n, l)))
        .collect()
}

/// Attaches adapters to the given slots, freezes the rest, unfreezes `modules_to_save`.
/// Checks everything before changing the model.
fn attach<M: Module + ?Sized>(
    model: &M,
    config: &LoraConfig,
    chosen: &[(String, AdapterSlot)],
    targets: Vec<String>,
    strict_saved: bool,
) -> Result<LoraReport> {
    let params: HashMap<String, Param> = model.named_parameters().into_iter().collect();
    let mut shapes = Vec::with_capacity(chosen.len());
    for (name, slot) in chosen {
        if let Some(a) = slot.get() {
            return Err(TuneError::config(
                "lora",
                format!("layer `{name}` already has an adapter ({})", a.type_name()),
            ));
        }
        let key = if name.is_empty() {
            "weight".to_string()
        } else {
            format!("{name}.weight")
        };
        let w = params.get(&key).ok_or_else(|| {
            TuneError::config("lora", format!("layer `{name}` has no parameter `{key}`"))
        })?;
        shapes.push((w.dims()[1], w.dims()[0], w.dtype()));
    }
    let saved = saved_parameters(model, &config.modules_to_save, strict_saved)?;
    // New adapters follow the model's mode: in eval mode their dropout is off.
    let mut any_flag = false;
    let mut training = false;
    model.walk(|v| {
        if let Visited::Flag(f) = v {
            any_flag = true;
            training |= f.is_training();
        }
    });
    let training = training || !any_flag;

    for p in params.values() {
        p.set_requires_grad(false);
    }
    let mut rng = Rng::new(config.seed);
    let scaling = config.scaling();
    for (i, ((_, slot), &(inp, out, dtype))) in chosen.iter().zip(&shapes).enumerate() {
        let lora = LoraLinear::new(
            inp,
            out,
            config.r,
            scaling,
            config.dropout,
            dtype,
            &mut rng,
            config.seed.wrapping_add(1 + i as u64),
        );
        if !training {
            lora.eval();
        }
        slot.set(Arc::new(lora));
    }
    for (_, p) in &saved {
        p.set_requires_grad(true);
    }
    Ok(LoraReport {
        targets,
        adapted: chosen.iter().map(|(n, _)| n.clone()).collect(),
        saved_parameters: saved.into_iter().map(|(n, _)| n).collect(),
        trainable: model.num_trainable_parameters(),
        total: model.num_parameters(),
    })
}

/// Attaches a LoRA adapter to every `Linear` of `model` whose name matches
/// `config.target_modules`, freezes every other parameter (so the frozen base records no
/// autograd graph) and leaves the parameters of `config.modules_to_save` trainable. A target
/// or saved module that matches nothing is an error naming it (with example names); on error
/// the model is unchanged.
pub fn apply_lora<M: Module + ?Sized>(model: &M, config: &LoraConfig) -> Result<LoraReport> {
    config.validate()?;
    let slots = model.adapter_slots();
    let names: Vec<String> = slots.iter().map(|(n, _)| n.clone()).collect();
    let targets = if config.target_modules.is_empty() {
        infer_targets(&names)?
    } else {
        config.target_modules.clone()
    };
    let matchers = targets
        .iter()
        .map(|t| Target::new(t, "lora.target_modules"))
        .collect::<Result<Vec<_>>>()?;
    for (t, m) in targets.iter().zip(&matchers) {
        if !names.iter().any(|n| m.matches(n)) {
            return Err(TuneError::config(
                "lora.target_modules",
                format!("`{t}` matches no Linear layer ({})", examples(&names)),
            ));
        }
    }
    let chosen: Vec<(String, AdapterSlot)> = slots
        .into_iter()
        .filter(|(n, _)| matchers.iter().any(|m| m.matches(n)))
        .collect();
    attach(model, config, &chosen, targets, true)
}

/// The base weight of every layer, by layer name (`query` → `query.weight`).
fn layer_weights<M: Module + ?Sized>(model: &M) -> HashMap<String, Tensor> {
    model
        .named_parameters()
        .into_iter()
        .filter_map(|(n, p)| {
            let layer = if n == "weight" {
                String::new()
            } else {
                n.strip_suffix(".weight")?.to_string()
            };
            Some((layer, p.tensor().clone()))
        })
        .collect()
}

fn weight_in(weights: &HashMap<String, Tensor>, layer: &str) -> Result<Tensor> {
    weights
        .get(layer)
        .cloned()
        .ok_or_else(|| TuneError::config("lora", format!("layer `{layer}` has no weight")))
}

fn no_lora() -> TuneError {
    TuneError::config(
        "lora",
        "the model has no LoRA adapters (call apply_lora first)",
    )
}

/// Folds every LoRA adapter into its layer's weight (`W += s·B·A`); the adapters stay attached
/// but add nothing until [`unmerge_lora`]. Returns how many were merged; an error when the
/// model has no adapters or one is already merged.
pub fn merge_lora<M: Module + ?Sized>(model: &M) -> Result<usize> {
    let layers = lora_layers(model);
    if layers.is_empty() {
        return Err(no_lora());
    }
    let weights = layer_weights(model);
    for (name, l) in &layers {
        l.merge_into(&weight_in(&weights, name)?)
            .map_err(|e| TuneError::config(format!("lora layer `{name}`"), e.to_string()))?;
    }
    Ok(layers.len())
}

/// Takes every merged LoRA adapter back out of its layer's weight. Returns how many.
pub fn unmerge_lora<M: Module + ?Sized>(model: &M) -> Result<usize> {
    let layers = lora_layers(model);
    if layers.is_empty() {
        return Err(no_lora());
    }
    let weights = layer_weights(model);
    for (name, l) in &layers {
        l.unmerge_from(&weight_in(&weights, name)?)
            .map_err(|e| TuneError::config(format!("lora layer `{name}`"), e.to_string()))?;
    }
    Ok(layers.len())
}

/// Detaches every LoRA adapter. With `merge` the updates stay in the base weights (PEFT's
/// `merge_and_unload`), without it merged adapters are unmerged first (`unload`). Parameters
/// stay frozen as they are. Returns how many adapters were removed.
pub fn remove_lora<M: Module + ?Sized>(model: &M, merge: bool) -> Result<usize> {
    let slots = model.adapter_slots();
    let weights = layer_weights(model);
    let mut removed = 0;
    for (name, slot) in slots {
        let Some(l) = slot.get().and_then(as_lora) else {
            continue;
        };
        let w = weight_in(&weights, &name)?;
        let r = match (merge, l.is_merged()) {
            (true, false) => l.merge_into(&w),
            (false, true) => l.unmerge_from(&w),
            _ => Ok(()),
        };
        r.map_err(|e| TuneError::config(format!("lora layer `{name}`"), e.to_string()))?;
        slot.take();
        removed += 1;
    }
    if removed == 0 {
        return Err(no_lora());
    }
    Ok(removed)
}

fn prefixed(name: &str) -> String {
    format!("{PEFT_PREFIX}{name}")
}

/// Writes the model's LoRA adapters in the PEFT layout to `dir` (created if needed):
/// `adapter_config.json` (PEFT's fields: `peft_type` "LORA", `r`, `lora_alpha`, ...,
/// `task_type` e.g. `"SEQ_CLS"`, `base_model_name_or_path`) and `adapter_model.safetensors`
/// (`base_model.model.<layer>.lora_A.weight`/`lora_B.weight`, and each parameter of
/// `config.modules_to_save` as `base_model.model.<name>`, e.g. the trained classifier).
pub fn save_adapter<M: Module + ?Sized>(
    model: &M,
    config: &LoraConfig,
    dir: impl AsRef<Path>,
    base_model_name_or_path: Option<&str>,
    task_type: Option<&str>,
) -> Result<()> {
    config.validate()?;
    let dir = dir.as_ref();
    let layers = lora_layers(model);
    if layers.is_empty() {
        return Err(no_lora());
    }
    let mut sd = StateDict::new();
    for (name, l) in &layers {
        if l.rank() != config.r {
            return Err(TuneError::config(
                "lora.r",
                format!(
                    "config says {} but layer `{name}` has rank {}",
                    config.r,
                    l.rank()
                ),
            ));
        }
        if (l.scaling() - config.scaling()).abs() > 1e-12 * config.scaling().abs().max(1.0) {
            return Err(TuneError::config(
                "lora.alpha",
                format!(
                    "config scaling {} differs from layer `{name}`'s {}",
                    config.scaling(),
                    l.scaling()
                ),
            ));
        }
        let dot = if name.is_empty() { "" } else { "." };
        sd.insert(
            prefixed(&format!("{name}{dot}lora_A.weight")),
            l.lora_a().tensor().clone(),
        );
        sd.insert(
            prefixed(&format!("{name}{dot}lora_B.weight")),
            l.lora_b().tensor().clone(),
        );
    }
    // Not strict: PEFT's own configs list names for other architectures (`score`).
    for (name, p) in saved_parameters(model, &config.modules_to_save, false)? {
        sd.insert(prefixed(&name), p.tensor().clone());
    }
    // PEFT matches a list entry as a whole name or a dot-bounded suffix; globs have no PEFT
    // equivalent, so then the adapted layers are listed by full name.
    let targets: Vec<String> = if !config.target_modules.is_empty()
        && config.target_modules.iter().all(|t| is_plain_name(t))
    {
        config.target_modules.clone()
    } else if config.target_modules.is_empty() {
        let names: Vec<String> = model.adapter_slots().into_iter().map(|(n, _)| n).collect();
        infer_targets(&names)?
    } else {
        layers.iter().map(|(n, _)| n.clone()).collect()
    };
    let alpha = if config.alpha.fract() == 0.0 && config.alpha.abs() < 1e15 {
        json!(config.alpha as i64)
    } else {
        json!(config.alpha)
    };
    let saved = if config.modules_to_save.is_empty() {
        Value::Null
    } else {
        json!(config.modules_to_save)
    };
    let peft_config = json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": config.bias,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": false,
        "lora_dropout": config.dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": saved,
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": task_type,
        "use_dora": false,
        "use_rslora": config.use_rslora,
    });
    std::fs::create_dir_all(dir).map_err(|e| TuneError::io(dir, e))?;
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let text =
        serde_json::to_string_pretty(&peft_config).map_err(|e| TuneError::io(&config_path, e))?;
    std::fs::write(&config_path, text + "\n").map_err(|e| TuneError::io(&config_path, e))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    kiln_nn::safetensors_io::save_with_metadata(&sd, &metadata, &dir.join(ADAPTER_WEIGHTS_FILE))?;
    Ok(())
}

/// Reads PEFT's `adapter_config.json` into a [`LoraConfig`]; unsupported options (DoRA,
/// `fan_in_fan_out`, per-layer rank/alpha patterns, trained biases) are errors naming them.
pub fn read_adapter_config(path: impl AsRef<Path>) -> Result<LoraConfig> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| TuneError::io(path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| TuneError::io(path, format!("invalid JSON: {e}")))?;
    let bad = |what: &str, message: String| TuneError::Io {
        path: path.display().to_string(),
        message: format!("{what}: {message}"),
    };
    let obj = v
        .as_object()
        .ok_or_else(|| bad("adapter config", "not a JSON object".into()))?;
    let peft_type = obj.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(bad(
            "peft_type",
            format!("only \"LORA\" adapters are supported, got {peft_type:?}"),
        ));
    }
    let flag = |key: &str| obj.get(key).and_then(Value::as_bool).unwrap_or(false);
    for key in ["use_dora", "fan_in_fan_out", "lora_bias"] {
        if flag(key) {
            return Err(bad(key, "true is not supported".into()));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if obj
            .get(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(key, "per-layer ranks/alphas are not supported".into()));
        }
    }
    let num = |key: &str| -> Result<Option<f64>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(key, format!("expected a number, got {v}"))),
        }
    };
    let names = |key: &str| -> Result<Vec<String>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(key, format!("expected strings, got {i}")))
                })
                .collect(),
            Some(v) => Err(bad(key, format!("expected a list of names, got {v}"))),
        }
    };
    let defaults = LoraConfig::default();
    let r = num("r")?.map_or(defaults.r as f64, |r| r);
    if r < 1.0 || r.fract() != 0.0 {
        return Err(bad("r", format!("expected a positive integer, got {r}")));
    }
    let mut modules_to_save = Vec::new();
    for m in names("modules_to_save")? {
        if !modules_to_save.contains(&m) {
            modules_to_save.push(m);
        }
    }
    let config = LoraConfig {
        r: r as usize,
        alpha: num("lora_alpha")?.unwrap_or(defaults.alpha),
        dropout: num("lora_dropout")?.unwrap_or(defaults.dropout),
        target_modules: names("target_modules")?,
        use_rslora: flag("use_rslora"),
        bias: obj
            .get("bias")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string(),
        modules_to_save,
        seed: 0,
    };
    config
        .validate()
        .map_err(|e| bad("adapter config", e.to_string()))?;
    Ok(config)
}

/// Loads a PEFT LoRA adapter from `dir` (`adapter_config.json` + `adapter_model.safetensors`,
/// written by PEFT or [`save_adapter`]) into `model`: attaches adapters to exactly the layers
/// the file has weights for, loads them and the saved modules' parameters (e.g. the trained
/// classifier), freezes the rest. Returns the adapter's config. Errors name the file and key.
pub fn load_adapter<M: Module + ?Sized>(model: &M, dir: impl AsRef<Path>) -> Result<LoraConfig> {
    let dir = dir.as_ref();
    let mut config = read_adapter_config(dir.join(ADAPTER_CONFIG_FILE))?;
    let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
    if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(TuneError::io(
            &weights_path,
            "missing; only safetensors adapters are supported (adapter_model.bin found: re-save it with safe_serialization=True)",
        ));
    }
    let file = kiln_nn::safetensors_io::load(&weights_path)?;
    let bad_key = |key: &str, message: String| TuneError::Io {
        path: weights_path.display().to_string(),
        message: format!("`{key}`: {message}"),
    };

    let slots = model.adapter_slots();
    let slot_names: Vec<String> = slots.iter().map(|(n, _)| n.clone()).collect();
    let own: HashMap<String, Tensor> = model
        .named_parameters()
        .into_iter()
        .map(|(n, p)| (n, p.tensor().clone()))
        .collect();
    let weights = layer_weights(model);
    // Layer name → (lora_A, lora_B); everything else must be a model parameter.
    let mut factors: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let mut others: Vec<(String, String, Tensor)> = Vec::new();
    for (key, t) in file.iter() {
        let name = key
            .strip_prefix(PEFT_PREFIX)
            .ok_or_else(|| bad_key(key, format!("expected keys to start with `{PEFT_PREFIX}`")))?;
        let layer_of = |suffix: &str| {
            name.strip_suffix(suffix)
                .map(|l| l.strip_suffix('.').unwrap_or(l).to_string())
        };
        if let Some(layer) = layer_of("lora_A.weight") {
            factors.entry(layer).or_default().0 = Some(t.clone());
        } else if let Some(layer) = layer_of("lora_B.weight") {
            factors.entry(layer).or_default().1 = Some(t.clone());
        } else if name.contains("lora_") {
            return Err(bad_key(
                key,
                "unsupported LoRA tensor (only Linear lora_A/lora_B weights are)".into(),
            ));
        } else {
            match own.get(name) {
                Some(p) if p.shape() == t.shape() => {
                    others.push((key.to_string(), name.to_string(), t.clone()))
                }
                Some(p) => {
                    return Err(bad_key(
                        key,
                        format!(
                            "shape {} does not match the model's {}",
                            t.shape(),
                            p.shape()
                        ),
                    ))
                }
                None => return Err(bad_key(key, format!("the model has no parameter `{name}`"))),
            }
        }
    }
    if factors.is_empty() {
        return Err(TuneError::io(&weights_path, "no lora_A/lora_B weights"));
    }
    let mut chosen = Vec::new();
    let mut values = Vec::new();
    for (layer, (a, b)) in factors {
        let key = prefixed(&layer);
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad_key(
                &key,
                "has only one of lora_A.weight / lora_B.weight".into(),
            ));
        };
        let Some(i) = slot_names.iter().position(|n| *n == layer) else {
            return Err(bad_key(
                &key,
                format!(
                    "the model has no Linear layer `{layer}` ({})",
                    examples(&slot_names)
                ),
            ));
        };
        let w = weight_in(&weights, &layer)?;
        let (out, inp) = (w.dims()[0], w.dims()[1]);
        if a.dims() != [config.r, inp] || b.dims() != [out, config.r] {
            return Err(bad_key(
                &key,
                format!(
                    "lora_A {} / lora_B {} do not fit rank {} on a {out}x{inp} layer (want [{}, {inp}] / [{out}, {}])",
                    a.shape(),
                    b.shape(),
                    config.r,
                    config.r,
                    config.r
                ),
            ));
        }
        chosen.push(slots[i].clone());
        values.push((a, b));
    }
    // A regex target (a string in PEFT) becomes the list of adapted layers.
    let all_names = config.target_modules.iter().all(|t| is_plain_name(t));
    let targets = if config.target_modules.is_empty() || !all_names {
        chosen.iter().map(|(n, _)| n.clone()).collect()
    } else {
        config.target_modules.clone()
    };
    config.target_modules = targets.clone();
    attach(model, &config, &chosen, targets, false)?;
    for ((_, slot), (a, b)) in chosen.iter().zip(values) {
        let l = slot.get().and_then(as_lora).expect("attached above");
        l.lora_a().assign(&a.to_dtype(l.lora_a().dtype()));
        l.lora_b().assign(&b.to_dtype(l.lora_b().dtype()));
    }
    for (_, name, t) in others {
        let dst = own.get(&name).expect("checked above");
        dst.assign(&t.to_dtype(dst.dtype()));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_nn::layers::{gradcheck_module, Linear};
    use kiln_nn::{Forward, Module};

    #[derive(Module)]
    struct Attn {
        query: Linear,
        key: Linear,
        value: Linear,
    }

    #[derive(Module)]
    struct Net {
        layer: Vec<Attn>,
        classifier: Linear,
    }

    impl Forward for Net {
        fn forward(&self, x: &Tensor) -> Tensor {
            let mut h = x.clone();
            for l in &self.layer {
                h = l
                    .query
                    .forward(&h)
                    .add(&l.key.forward(&h))
                    .add(&l.value.forward(&h))
                    .tanh();
            }
            self.classifier.forward(&h)
        }
    }

    fn net(dtype: DType) -> Net {
        let mut rng = Rng::new(7);
        let lin = |i, o, rng: &mut Rng| {
            let l = Linear::new(i, o, rng);
            Linear::from_weights(
                l.weight.to_dtype(dtype),
                l.bias.as_ref().map(|b| b.to_dtype(dtype)),
            )
        };
        Net {
            layer: (0..2)
                .map(|_| Attn {
                    query: lin(6, 6, &mut rng),
                    key: lin(6, 6, &mut rng),
                    value: lin(6, 6, &mut rng),
                })
                .collect(),
            classifier: lin(6, 3, &mut rng),
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        a.to_dtype(DType::F64)
            .to_vec::<f64>()
            .iter()
            .zip(b.to_dtype(DType::F64).to_vec::<f64>())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn config_defaults_serde_and_validation() {
        let d = LoraConfig::default();
        assert_eq!(
            (d.r, d.alpha, d.dropout, d.bias.as_str()),
            (8, 8.0, 0.0, "none")
        );
        assert_eq!(d.scaling(), 1.0);
        let c = LoraConfig::default().r(4).alpha(8.0).use_rslora(true);
        assert_eq!(c.scaling(), 4.0);
        let t: LoraConfig = toml::from_str(
            "r = 4\nlora_alpha = 16\ndropout = 0.1\ntarget_modules = [\"query\", \"value\"]\nmodules_to_save = [\"classifier\"]",
        )
        .unwrap();
        assert_eq!(
            t,
            LoraConfig::default()
                .r(4)
                .alpha(16.0)
                .dropout(0.1)
                .target_modules(["query", "value"])
                .modules_to_save(["classifier"])
        );
        let j: LoraConfig = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(j, t);
        let err = toml::from_str::<LoraConfig>("rank = 4")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `rank`"), "{err}");
        for (c, what) in [
            (LoraConfig::default().r(0), "lora.r"),
            (LoraConfig::default().dropout(1.0), "lora.dropout"),
            (LoraConfig::default().alpha(f64::NAN), "lora.alpha"),
            (
                LoraConfig {
                    bias: "all".into(),
                    ..LoraConfig::default()
                },
                "lora.bias",
            ),
        ] {
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
    }

    #[test]
    fn targets_by_name_glob_and_inference_and_errors() {
        let n = net(DType::F32);
        let r = apply_lora(
            &n,
            &LoraConfig::default().target_modules(["query", "value"]),
        )
        .unwrap();
        assert_eq!(
            r.adapted,
            [
                "layer.0.query",
                "layer.0.value",
                "layer.1.query",
                "layer.1.value"
            ]
        );
        let n = net(DType::F32);
        let r = apply_lora(&n, &LoraConfig::default().target_modules(["layer.1.*"])).unwrap();
        assert_eq!(r.adapted, ["layer.1.query", "layer.1.key", "layer.1.value"]);
        // Inferred like PEFT for BERT-style names.
        let n = net(DType::F32);
        let r = apply_lora(&n, &LoraConfig::default()).unwrap();
        assert_eq!(r.targets, ["query", "value"]);
        assert_eq!(r.adapted.len(), 4);
        // `uery` is not a dot-bounded suffix of `query`.
        let n = net(DType::F32);
        let err = apply_lora(&n, &LoraConfig::default().target_modules(["uery"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`uery` matches no Linear layer")
                && err.contains("names look like: layer.0.query"),
            "{err}"
        );
        assert!(n.adapter_slots().iter().all(|(_, s)| s.is_empty()));
        assert_eq!(n.num_trainable_parameters(), n.num_parameters());
        let err = apply_lora(
            &n,
            &LoraConfig::default()
                .target_modules(["query"])
                .modules_to_save(["head"]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`head` matches no module"), "{err}");
        // A second application is refused.
        apply_lora(&n, &LoraConfig::default().target_modules(["query"])).unwrap();
        let err = apply_lora(&n, &LoraConfig::default().target_modules(["query"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("already has an adapter"), "{err}");
    }

    #[test]
    fn freezes_base_trains_adapters_and_saved_modules() {
        let n = net(DType::F32);
        let config = LoraConfig::default()
            .r(2)
            .alpha(4.0)
            .target_modules(["query", "value"])
            .modules_to_save(["classifier"]);
        let r = apply_lora(&n, &config).unwrap();
        assert_eq!(r.saved_parameters, ["classifier.weight", "classifier.bias"]);
        let lora_params = 4 * (2 * 6 + 6 * 2);
        assert_eq!(r.trainable, lora_params + 6 * 3 + 3);
        assert_eq!(r.total, n.num_parameters());
        assert!(r.to_string().contains("LoRA on 4 layers"));
        // Output is unchanged at init (lora_B = 0).
        let x = Tensor::randn([5, 6], 1);
        let base = net(DType::F32).forward(&x);
        let y = n.forward(&x);
        assert!(max_diff(&y, &base) == 0.0);
        // Frozen base layers record no graph.
        assert!(!n.layer[0].key.forward(&x).tracks_grad());
        y.sum_all().backward();
        assert!(n.layer[0].query.weight.grad().is_none());
        assert!(n.layer[0].key.weight.grad().is_none());
        assert!(n.classifier.weight.grad().is_some());
        let layers = lora_layers(&n);
        assert_eq!(layers.len(), 4);
        for (_, l) in &layers {
            let gb = l.lora_b().grad().expect("lora_B gets a gradient");
            assert!(gb.to_vec::<f32>().iter().any(|v| *v != 0.0));
            // B = 0, so A's gradient is zero, but it exists.
            assert!(l.lora_a().grad().is_some());
            assert_eq!(l.scaling(), 2.0);
        }
    }

    #[test]
    fn forward_matches_formula_merge_unmerge_remove() {
        let n = net(DType::F64);
        let reference = net(DType::F64);
        apply_lora(
            &n,
            &LoraConfig::default()
                .r(3)
                .alpha(6.0)
                .use_rslora(true)
                .target_modules(["query"]),
        )
        .unwrap();
        for (i, (_, l)) in lora_layers(&n).iter().enumerate() {
            l.lora_b().assign(&Tensor::randn_f64([6, 3], 10 + i as u64));
        }
        let x = Tensor::randn_f64([4, 6], 2);
        // Independent reference: W' = W + (6/√3) B·A per query layer, on a plain model.
        let s = 6.0 / 3f64.sqrt();
        for ((_, l), layer) in lora_layers(&n).iter().zip(&reference.layer) {
            let (a, b) = (l.lora_a().to_vec::<f64>(), l.lora_b().to_vec::<f64>());
            let w = layer.query.weight.to_vec::<f64>();
            let mut w2 = w.clone();
            for o in 0..6 {
                for i in 0..6 {
                    let d: f64 = (0..3).map(|k| b[o * 3 + k] * a[k * 6 + i]).sum();
                    w2[o * 6 + i] += s * d;
                }
            }
            layer.query.weight.assign(&Tensor::from_vec(w2, [6, 6]));
        }
        let expect = reference.forward(&x);
        let y = n.forward(&x);
        assert!(max_diff(&y, &expect) < 1e-12, "{}", max_diff(&y, &expect));

        let w0 = n.layer[0].query.weight.detach().contiguous_copy();
        assert_eq!(merge_lora(&n).unwrap(), 2);
        assert!(max_diff(&n.forward(&x), &expect) < 1e-12);
        assert!(max_diff(&n.layer[0].query.weight, &reference.layer[0].query.weight) < 1e-12);
        let err = merge_lora(&n).unwrap_err().to_string();
        assert!(err.contains("already merged"), "{err}");
        assert_eq!(unmerge_lora(&n).unwrap(), 2);
        assert!(max_diff(&n.layer[0].query.weight, &w0) < 1e-12);
        assert!(max_diff(&n.forward(&x), &expect) < 1e-12);
        let err = unmerge_lora(&n).unwrap_err().to_string();
        assert!(err.contains("not merged"), "{err}");

        // remove with merge keeps the update in the weights; without, restores the base.
        assert_eq!(remove_lora(&n, true).unwrap(), 2);
        assert!(lora_layers(&n).is_empty());
        assert!(max_diff(&n.forward(&x), &expect) < 1e-12);
        assert!(n
            .named_parameters()
            .iter()
            .all(|(k, _)| !k.contains("lora")));
        let err = merge_lora(&n).unwrap_err().to_string();
        assert!(err.contains("no LoRA adapters"), "{err}");

        let m = net(DType::F64);
        let base = m.forward(&x);
        apply_lora(&m, &LoraConfig::default().target_modules(["value"])).unwrap();
        for (_, l) in lora_layers(&m) {
            l.lora_b().assign(&Tensor::randn_f64([6, 8], 3));
        }
        merge_lora(&m).unwrap();
        assert_eq!(remove_lora(&m, false).unwrap(), 2);
        assert!(max_diff(&m.forward(&x), &base) < 1e-12);
    }

    #[test]
    fn dropout_only_in_training() {
        let l = Linear::from_weights(Tensor::zeros([4, 8]), None);
        let lora = Arc::new(LoraLinear::from_weights(
            Tensor::ones([8, 8]),
            Tensor::ones([4, 8]),
            1.0,
            0.5,
            3,
        ));
        l.adapter.set(lora.clone());
        assert_eq!(lora.dropout_p(), 0.5);
        let x = Tensor::ones([1, 8]);
        // Without dropout every output is 8·8 = 64.
        let train = l.forward(&x).to_vec::<f32>();
        assert!(train.iter().any(|v| *v != 64.0), "{train:?}");
        l.eval();
        assert_eq!(l.forward(&x).to_vec::<f32>(), vec![64.0; 4]);
        l.train();
        assert_ne!(l.forward(&x).to_vec::<f32>(), vec![64.0; 4]);
    }

    #[test]
    fn gradcheck_lora_linear() {
        let l = Linear::from_weights(
            Tensor::randn_f64([3, 5], 1),
            Some(Tensor::randn_f64([3], 2)),
        );
        l.adapter.set(Arc::new(LoraLinear::from_weights(
            Tensor::randn_f64([2, 5], 3),
            Tensor::randn_f64([3, 2], 4),
            1.5,
            0.0,
            0,
        )));
        gradcheck_module(&l, &Tensor::randn_f64([2, 4, 5], 5).requires_grad()).unwrap();
        let xt = Tensor::randn_f64([5, 4], 6).t().detach().requires_grad();
        gradcheck_module(&l, &xt).unwrap();
        // Dropout in eval mode is the identity, so the same check holds.
        let d = Linear::from_weights(Tensor::randn_f64([3, 5], 1), None);
        d.adapter.set(Arc::new(LoraLinear::from_weights(
            Tensor::randn_f64([2, 5], 3),
            Tensor::randn_f64([3, 2], 4),
            0.5,
            0.3,
            0,
        )));
        d.eval();
        gradcheck_module(&d, &Tensor::randn_f64([4, 5], 7).requires_grad()).unwrap();
    }

    #[test]
    #[should_panic(
        expected = "LoraLinear: lora_A must be [r, in] and lora_B [out, r], got [2, 5] and [3, 4]"
    )]
    fn mismatched_factors_panic() {
        LoraLinear::from_weights(Tensor::zeros([2, 5]), Tensor::zeros([3, 4]), 1.0, 0.0, 0);
    }

    #[test]
    fn merge_rejects_wrong_weight_shape() {
        let l = LoraLinear::from_weights(Tensor::zeros([2, 5]), Tensor::zeros([3, 2]), 1.0, 0.0, 0);
        let err = l
            .merge_into(&Tensor::zeros([5, 3]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("base weight [5, 3] does not fit the adapter (3x5"),
            "{err}"
        );
        assert!(!l.is_merged());
    }

    #[test]
    fn save_load_roundtrip_and_config_errors() {
        let dir = std::env::temp_dir().join(format!("kiln-lora-unit-{}", std::process::id()));
        let n = net(DType::F32);
        let config = LoraConfig::default()
            .r(2)
            .alpha(5.0)
            .target_modules(["layer.*.value"])
            .modules_to_save(["classifier"]);
        apply_lora(&n, &config).unwrap();
        for (i, (_, l)) in lora_layers(&n).iter().enumerate() {
            l.lora_b().assign(&Tensor::randn([6, 2], 20 + i as u64));
        }
        n.classifier.weight.assign(&Tensor::randn([3, 6], 30));
        save_adapter(&n, &config, &dir, Some("tiny"), Some("SEQ_CLS")).unwrap();
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).unwrap())
                .unwrap();
        // A glob has no PEFT equivalent: the adapted layers are listed.
        assert_eq!(
            cfg["target_modules"],
            json!(["layer.0.value", "layer.1.value"])
        );
        assert_eq!(cfg["lora_alpha"], json!(5));
        assert_eq!(cfg["peft_type"], "LORA");
        let file = kiln_nn::safetensors_io::load(&dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
        let keys: Vec<&str> = file.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "base_model.model.classifier.bias",
                "base_model.model.classifier.weight",
                "base_model.model.layer.0.value.lora_A.weight",
                "base_model.model.layer.0.value.lora_B.weight",
                "base_model.model.layer.1.value.lora_A.weight",
                "base_model.model.layer.1.value.lora_B.weight",
            ]
        );
        let m = net(DType::F32);
        let loaded = load_adapter(&m, &dir).unwrap();
        assert_eq!((loaded.r, loaded.alpha), (2, 5.0));
        let x = Tensor::randn([3, 6], 4);
        assert!(max_diff(&m.forward(&x), &n.forward(&x)) == 0.0);
        assert!(m.classifier.weight.is_trainable() && m.classifier.adapter.is_empty());

        // Errors name the file and the key.
        let mut bad = StateDict::new();
        bad.insert(
            "base_model.model.layer.0.nope.lora_A.weight",
            Tensor::zeros([2, 6]),
        );
        bad.insert(
            "base_model.model.layer.0.nope.lora_B.weight",
            Tensor::zeros([6, 2]),
        );
        kiln_nn::safetensors_io::save(&bad, &dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
        let err = load_adapter(&net(DType::F32), &dir)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(ADAPTER_WEIGHTS_FILE)
                && err.contains("base_model.model.layer.0.nope")
                && err.contains("no Linear layer `layer.0.nope`"),
            "{err}"
        );
        std::fs::write(
            dir.join(ADAPTER_CONFIG_FILE),
            r#"{"peft_type": "LORA", "r": 2, "use_dora": true}"#,
        )
        .unwrap();
        let err = load_adapter(&net(DType::F32), &dir)
            .unwrap_err()
            .to_string();
        assert!(err.contains("adapter_config.json: use_dora"), "{err}");
        std::fs::write(dir.join(ADAPTER_CONFIG_FILE), r#"{"peft_type": "IA3"}"#).unwrap();
        let err = load_adapter(&net(DType::F32), &dir)
            .unwrap_err()
            .to_string();
        assert!(err.contains("only \"LORA\""), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
