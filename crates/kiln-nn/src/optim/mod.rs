//! Optimizers: SGD, Adam, AdamW, RMSprop and Adagrad with parameter groups, plus gradient
//! clipping.
//!
//! Every optimizer is an [`Optim`] over an [`Algorithm`] (the per-parameter update rule) and
//! follows `torch.optim`: the same update formulas, the same defaults, the same state slot
//! names (`exp_avg`, `momentum_buffer`, ...). Parameters are held **by name** (from
//! [`crate::ModuleExt::named_parameters`]; unnamed parameters get their global index, `"0"`,
//! `"1"`, ... as torch does), so optimizer state saved under one grouping loads under another.
//!
//! ```
//! use kiln_core::Tensor;
//! use kiln_nn::optim::{Adam, AdamConfig, Optimizer, ParamGroup};
//! use kiln_nn::Param;
//!
//! let w = Param::new(Tensor::ones([3]));
//! let b = Param::new(Tensor::zeros([3]));
//! // One group with a plain learning rate...
//! let mut opt = Adam::new(vec![w.clone(), b.clone()], 1e-3).unwrap();
//! // ...or groups with their own hyper-parameters.
//! let base = AdamConfig { lr: 1e-3, ..Default::default() };
//! let _grouped = Adam::with_groups([
//!     ParamGroup::new(vec![("w".to_string(), w.clone())], base),
//!     ParamGroup::new(vec![("b".to_string(), b.clone())], AdamConfig { weight_decay: 0.0, lr: 1e-2, ..base }),
//! ])
//! .unwrap();
//! w.mul(&w).sum_all().backward();
//! opt.step();
//! opt.zero_grad();
//! ```
//!
//! **Updates are fused**: each step makes one pass over a parameter, its gradient and its state
//! buffers, writing the parameter and state in place (no temporary tensors), split across threads
//! for large tensors. Gradients are only read, never written (autograd may share one gradient
//! tensor between several parameters).
//!
//! **State files** are safetensors: each state tensor is stored under `"{param}.{slot}"` (e.g.
//! `encoder.0.weight.exp_avg`), and the header metadata key `kiln.optimizer` holds a JSON
//! document with the algorithm, each parameter's step count and each group's parameter names and
//! hyper-parameters. See [`OptimizerState::save`].

mod adagrad;
mod adam;
mod clip;
mod rmsprop;
mod sgd;

pub use adagrad::{Adagrad, AdagradConfig, AdagradRule};
pub use adam::{Adam, AdamConfig, AdamRule, AdamW, AdamWConfig, AdamWRule};
pub use clip::{
    clip_grad_norm_, clip_grad_norm_with, clip_grad_value_, grad_norm, NormType, ParamRef,
};
pub use rmsprop::{RmsProp, RmsPropConfig, RmsPropRule};
pub use sgd::{Sgd, SgdConfig, SgdRule};

use crate::error::NnError;
use crate::module::{LoadReport, Param};
use kiln_core::{DType, Float, Tensor, TensorId};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::marker::PhantomData;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

// ---------------------------------------------------------------------------------- traits

/// What every optimizer offers: stepping, gradient clearing, per-group learning rates, and
/// state save/load. Schedulers drive optimizers through [`Optimizer::hyper`].
pub trait Optimizer: Send {
    /// Updates every trainable parameter that has a gradient (frozen parameters and parameters
    /// without a gradient are skipped, as in torch).
    fn step(&mut self);

    /// Clears the gradient of every parameter (sets it to `None`, torch's `set_to_none=True`).
    fn zero_grad(&self);

    /// Number of parameter groups.
    fn num_groups(&self) -> usize;

    /// The learning rate of group `group` (panics when out of range).
    fn lr(&self, group: usize) -> f64 {
        self.hyper().lr(group)
    }

    /// Every group's learning rate.
    fn lrs(&self) -> Vec<f64> {
        self.hyper().lrs()
    }

    /// Sets the learning rate of group `group`; a negative or non-finite lr or an unknown group
    /// is an error.
    fn set_lr(&mut self, group: usize, lr: f64) -> Result<(), NnError> {
        self.hyper().set_lr(group, lr)
    }

    /// The shared, schedulable hyper-parameters (lr, momentum/beta1) of every group. A clone
    /// stays connected to the optimizer: writes through it take effect at the next step.
    fn hyper(&self) -> HyperHandle;

    /// Every parameter with its name, group by group.
    fn named_params(&self) -> Vec<(String, Param)>;

    /// The optimizer state (per-parameter step counts and buffers, keyed by parameter name, and
    /// each group's hyper-parameters). Tensors are copies.
    fn state_dict(&self) -> OptimizerState;

    /// Restores per-parameter state by name, and the hyper-parameters of every group whose set
    /// of parameter names equals a saved group's. Everything is checked before anything is
    /// written: unknown state slots or shape mismatches are errors and change nothing. The
    /// report lists loaded names, `missing` (parameters without saved state: they start fresh)
    /// and `unexpected` (saved names this optimizer does not hold).
    fn load_state_dict(&mut self, state: &OptimizerState) -> Result<LoadReport, NnError>;
}

/// Hyper-parameters of one parameter group: validation and access to the schedulable values.
pub trait GroupConfig:
    Clone + std::fmt::Debug + Send + Sync + Serialize + DeserializeOwned + 'static
{
    /// Checks every value; the error names the offending field.
    fn validate(&self) -> Result<(), NnError>;
    /// The learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate.
    fn set_lr(&mut self, lr: f64);
    /// The value a one-cycle schedule cycles: momentum (SGD, RMSprop) or beta1 (Adam);
    /// `None` when the algorithm has none.
    fn momentum(&self) -> Option<f64> {
        None
    }
    /// Sets the value returned by [`GroupConfig::momentum`] (ignored when there is none).
    fn set_momentum(&mut self, _momentum: f64) {}
}

/// A per-parameter update rule: the part that differs between optimizers. Implement it to add
/// an optimizer; [`Optim`] supplies groups, names, skipping, scheduling and state files.
pub trait Algorithm: Send + Sync + 'static {
    /// Hyper-parameters of a group.
    type Config: GroupConfig;
    /// Name written into state files (`"adam"`, `"sgd"`, ...).
    const KIND: &'static str;
    /// Names of the state buffers, in slot order (`["exp_avg", "exp_avg_sq"]`).
    const SLOTS: &'static [&'static str];

    /// Updates `param` in place from `grad` (same shape and dtype, contiguous, not sharing
    /// storage with the parameter). `state.slots` has one entry per name in [`Algorithm::SLOTS`],
    /// `None` until the rule creates it.
    fn update(config: &Self::Config, param: &Tensor, grad: &Tensor, state: &mut ParamSlots);
}

// ---------------------------------------------------------------------------------- params

/// Parameters as an optimizer takes them: named (`(String, Param)`, as `named_parameters()`
/// returns) or unnamed (`Param`; they are named by their global index, as torch numbers them).
pub trait IntoParams {
    /// The parameters with their names, if any.
    fn into_params(self) -> Vec<(Option<String>, Param)>;
}

impl IntoParams for Vec<(String, Param)> {
    fn into_params(self) -> Vec<(Option<String>, Param)> {
        self.into_iter().map(|(n, p)| (Some(n), p)).collect()
    }
}

impl IntoParams for Vec<(&str, Param)> {
    fn into_params(self) -> Vec<(Option<String>, Param)> {
        self.into_iter()
            .map(|(n, p)| (Some(n.to_string()), p))
            .collect()
    }
}

impl IntoParams for &[(String, Param)] {
    fn into_params(self) -> Vec<(Option<String>, Param)> {
        self.iter()
            .map(|(n, p)| (Some(n.clone()), p.clone()))
            .collect()
    }
}

impl IntoParams for Vec<Param> {
    fn into_params(self) -> Vec<(Option<String>, Param)> {
        self.into_iter().map(|p| (None, p)).collect()
    }
}

impl IntoParams for &[Param] {
    fn into_params(self) -> Vec<(Option<String>, Param)> {
        self.iter().map(|p| (None, p.clone())).collect()
    }
}

impl<const N: usize> IntoParams for [Param; N] {
    fn into_params(self) -> Vec<(Option<String>, Param)> {
        self.into_iter().map(|p| (None, p)).collect()
    }
}

impl<const N: usize> IntoParams for [(&str, Param); N] {
    fn into_params(self) -> Vec<(Option<String>, Param)> {
        self.into_iter()
            .map(|(n, p)| (Some(n.to_string()), p))
            .collect()
    }
}

impl IntoParams for Param {
    fn into_params(self) -> Vec<(Option<String>, Param)> {
        vec![(None, self)]
    }
}

/// Parameters that share hyper-parameters (torch's `param_groups` entry).
#[derive(Clone, Debug)]
pub struct ParamGroup<C> {
    params: Vec<(Option<String>, Param)>,
    config: C,
}

impl<C> ParamGroup<C> {
    /// A group of `params` with `config` (anything that converts: a config struct, or a plain
    /// `f64` learning rate with the other values at torch's defaults).
    pub fn new(params: impl IntoParams, config: impl Into<C>) -> Self {
        ParamGroup {
            params: params.into_params(),
            config: config.into(),
        }
    }

    /// The group's hyper-parameters.
    pub fn config(&self) -> &C {
        &self.config
    }

    /// Number of parameters in the group.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// True when the group holds no parameter.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
}

// ---------------------------------------------------------------------------------- hyper

/// The schedulable values of one group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupHyper {
    /// Learning rate.
    pub lr: f64,
    /// Momentum or beta1 (`None` for algorithms without one).
    pub momentum: Option<f64>,
}

/// Shared handle to an optimizer's per-group learning rates and momenta. The optimizer reads it
/// at every step; schedulers keep a clone and write to it. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct HyperHandle(Arc<Mutex<Vec<GroupHyper>>>);

impl HyperHandle {
    fn lock(&self) -> MutexGuard<'_, Vec<GroupHyper>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn group_index(&self, group: usize) -> Result<(), NnError> {
        let n = self.num_groups();
        if group >= n {
            return Err(NnError::Config(format!(
                "group: index {group} out of range (the optimizer has {n} groups)"
            )));
        }
        Ok(())
    }

    /// Number of groups.
    pub fn num_groups(&self) -> usize {
        self.lock().len()
    }

    /// A copy of every group's values.
    pub fn snapshot(&self) -> Vec<GroupHyper> {
        self.lock().clone()
    }

    /// Learning rate of `group` (panics when out of range).
    pub fn lr(&self, group: usize) -> f64 {
        self.lock()[group].lr
    }

    /// Every group's learning rate.
    pub fn lrs(&self) -> Vec<f64> {
        self.lock().iter().map(|h| h.lr).collect()
    }

    /// Sets the learning rate of `group` (must be finite and >= 0).
    pub fn set_lr(&self, group: usize, lr: f64) -> Result<(), NnError> {
        self.group_index(group)?;
        check_non_negative("lr", lr)?;
        self.lock()[group].lr = lr;
        Ok(())
    }

    /// Momentum / beta1 of `group`, if its algorithm has one (panics when out of range).
    pub fn momentum(&self, group: usize) -> Option<f64> {
        self.lock()[group].momentum
    }

    /// Sets momentum / beta1 of `group`; an error when the algorithm has none or the value is
    /// outside [0, 1).
    pub fn set_momentum(&self, group: usize, momentum: f64) -> Result<(), NnError> {
        self.group_index(group)?;
        check_unit_interval("momentum", momentum)?;
        let mut h = self.lock();
        match &mut h[group].momentum {
            Some(m) => {
                *m = momentum;
                Ok(())
            }
            None => Err(NnError::Config(
                "momentum: the optimizer has no momentum or beta1 to set".into(),
            )),
        }
    }

    pub(crate) fn set_lr_unchecked(&self, group: usize, lr: f64) {
        if let Some(h) = self.lock().get_mut(group) {
            h.lr = lr;
        }
    }

    pub(crate) fn set_momentum_unchecked(&self, group: usize, momentum: f64) {
        if let Some(Some(m)) = self.lock().get_mut(group).map(|h| &mut h.momentum) {
            *m = momentum;
        }
    }

    fn push(&self, h: GroupHyper) {
        self.lock().push(h);
    }
}

// ---------------------------------------------------------------------------------- state

/// The state of one parameter while it is being optimised: its step count and its buffers,
/// one slot per name in [`Algorithm::SLOTS`].
#[derive(Clone, Debug, Default)]
pub struct ParamSlots {
    /// Number of updates applied so far.
    pub step: u64,
    /// The buffers (each contiguous, owning its storage, with the parameter's shape and dtype).
    pub slots: Vec<Option<Tensor>>,
}

impl ParamSlots {
    /// Empty state with `n` slots.
    pub fn new(n: usize) -> Self {
        ParamSlots {
            step: 0,
            slots: vec![None; n],
        }
    }

    /// Slot `i`, created filled with `value` (in the shape and dtype of `like`) if absent.
    /// Returns the tensor and whether it was just created.
    pub fn get_or_fill(&mut self, i: usize, like: &Tensor, value: f64) -> (Tensor, bool) {
        match &self.slots[i] {
            Some(t) => (t.clone(), false),
            None => {
                let t = like.full_like(value);
                self.slots[i] = Some(t.clone());
                (t, true)
            }
        }
    }
}

/// Saved state of one parameter.
#[derive(Clone, Debug, Default)]
pub struct ParamState {
    /// Number of updates applied.
    pub step: u64,
    /// Buffers by slot name (`exp_avg`, ...).
    pub tensors: BTreeMap<String, Tensor>,
}

/// Saved hyper-parameters of one group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupState {
    /// Names of the group's parameters.
    pub params: Vec<String>,
    /// The group's config as JSON (the algorithm's config struct, with the current lr).
    pub config: serde_json::Value,
}

/// An optimizer's full state, keyed by parameter name. Save it with [`OptimizerState::save`].
#[derive(Clone, Debug, Default)]
pub struct OptimizerState {
    /// The algorithm that wrote it (`"adam"`, `"sgd"`, ...).
    pub kind: String,
    /// Per-parameter state by parameter name (parameters never updated have none).
    pub params: BTreeMap<String, ParamState>,
    /// Every group's parameter names and hyper-parameters, in group order.
    pub groups: Vec<GroupState>,
}

/// The JSON document stored in a state file's metadata.
#[derive(Serialize, Deserialize)]
struct StateMeta {
    kind: String,
    steps: BTreeMap<String, u64>,
    slots: BTreeMap<String, Vec<String>>,
    groups: Vec<GroupState>,
}

/// Metadata key of optimizer state files.
pub const STATE_METADATA_KEY: &str = "kiln.optimizer";

impl OptimizerState {
    /// Writes the state as a safetensors file: tensors under `"{param}.{slot}"`, step counts,
    /// slot lists and group hyper-parameters as JSON under the metadata key
    /// [`STATE_METADATA_KEY`]. Written to a temporary file, then renamed.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), NnError> {
        let path = path.as_ref();
        let file_err = |e: String| NnError::File(path.display().to_string(), e);
        let meta = StateMeta {
            kind: self.kind.clone(),
            steps: self
                .params
                .iter()
                .map(|(n, s)| (n.clone(), s.step))
                .collect(),
            slots: self
                .params
                .iter()
                .map(|(n, s)| (n.clone(), s.tensors.keys().cloned().collect()))
                .collect(),
            groups: self.groups.clone(),
        };
        let meta = serde_json::to_string(&meta).map_err(|e| file_err(e.to_string()))?;
        let mut blobs = Vec::new();
        for (name, st) in &self.params {
            for (slot, t) in &st.tensors {
                let t = t.contiguous();
                let (dtype, bytes): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
                    DType::F32 => (
                        safetensors::Dtype::F32,
                        t.to_vec::<f32>()
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect(),
                    ),
                    DType::F64 => (
                        safetensors::Dtype::F64,
                        t.to_vec::<f64>()
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect(),
                    ),
                    other => {
                        return Err(file_err(format!(
                            "{name}.{slot}: optimizer state must be f32 or f64, got {other}"
                        )))
                    }
                };
                blobs.push((format!("{name}.{slot}"), dtype, t.dims().to_vec(), bytes));
            }
        }
        let views = blobs
            .iter()
            .map(|(k, d, shape, bytes)| {
                safetensors::tensor::TensorView::new(*d, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| file_err(format!("{k}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let info = Some(HashMap::from([(STATE_METADATA_KEY.to_string(), meta)]));
        let tmp = path.with_extension("tmp");
        safetensors::serialize_to_file(views, &info, &tmp).map_err(|e| file_err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| file_err(e.to_string()))
    }

    /// Reads a file written by [`OptimizerState::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, NnError> {
        let path = path.as_ref();
        let file_err = |e: String| NnError::File(path.display().to_string(), e);
        let data = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&data)
            .map_err(|e| file_err(format!("not a valid safetensors file: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&data)
            .map_err(|e| file_err(format!("not a valid safetensors file: {e}")))?;
        let meta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(STATE_METADATA_KEY))
            .ok_or_else(|| {
                file_err(format!(
                    "no `{STATE_METADATA_KEY}` metadata: not an optimizer state file"
                ))
            })?;
        let meta: StateMeta = serde_json::from_str(meta)
            .map_err(|e| file_err(format!("bad `{STATE_METADATA_KEY}` metadata: {e}")))?;
        let mut params = BTreeMap::new();
        for (name, slots) in &meta.slots {
            let mut tensors = BTreeMap::new();
            for slot in slots {
                let key = format!("{name}.{slot}");
                let view = st
                    .tensor(&key)
                    .map_err(|e| file_err(format!("{key}: {e}")))?;
                let raw = view.data();
                let t = match view.dtype() {
                    safetensors::Dtype::F32 => {
                        let v: Vec<f32> = raw
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect();
                        Tensor::from_vec(v, view.shape().to_vec())
                    }
                    safetensors::Dtype::F64 => {
                        let v: Vec<f64> = raw
                            .chunks_exact(8)
                            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                            .collect();
                        Tensor::from_vec(v, view.shape().to_vec())
                    }
                    other => return Err(file_err(format!("{key}: unsupported dtype {other:?}"))),
                };
                tensors.insert(slot.clone(), t);
            }
            let step = meta.steps.get(name).copied().unwrap_or(0);
            params.insert(name.clone(), ParamState { step, tensors });
        }
        Ok(OptimizerState {
            kind: meta.kind,
            params,
            groups: meta.groups,
        })
    }
}

// ---------------------------------------------------------------------------------- Optim

struct Entry {
    name: String,
    param: Param,
    state: ParamSlots,
}

struct Group<C> {
    config: C,
    entries: Vec<Entry>,
}

/// An optimizer: parameter groups, each with its own config, updated by the rule `A`.
/// Use the aliases [`Sgd`], [`Adam`], [`AdamW`], [`RmsProp`], [`Adagrad`].
pub struct Optim<A: Algorithm> {
    groups: Vec<Group<A::Config>>,
    hyper: HyperHandle,
    _rule: PhantomData<fn() -> A>,
}

impl<A: Algorithm> Optim<A> {
    /// One group of `params` with `config` (a config struct, or a plain `f64` learning rate with
    /// torch's defaults for everything else). Invalid values or no parameters are errors.
    pub fn new(params: impl IntoParams, config: impl Into<A::Config>) -> Result<Self, NnError> {
        Self::with_groups([ParamGroup::new(params, config)])
    }

    /// Several groups, each with its own config. A parameter (by name or by tensor) may appear
    /// in only one group.
    pub fn with_groups(
        groups: impl IntoIterator<Item = ParamGroup<A::Config>>,
    ) -> Result<Self, NnError> {
        let mut opt = Optim {
            groups: Vec::new(),
            hyper: HyperHandle::default(),
            _rule: PhantomData,
        };
        for g in groups {
            opt.add_param_group(g)?;
        }
        if opt.groups.iter().all(|g| g.entries.is_empty()) {
            return Err(NnError::Config(
                "params: the optimizer got an empty parameter list".into(),
            ));
        }
        Ok(opt)
    }

    /// Adds a group (torch's `add_param_group`). Schedulers created before keep driving only
    /// the groups they knew.
    pub fn add_param_group(&mut self, group: ParamGroup<A::Config>) -> Result<(), NnError> {
        group.config.validate()?;
        let mut names: HashSet<String> = HashSet::new();
        let mut ids: HashSet<TensorId> = HashSet::new();
        let mut index = 0usize;
        for g in &self.groups {
            for e in &g.entries {
                names.insert(e.name.clone());
                ids.insert(e.param.id());
                index += 1;
            }
        }
        let mut entries = Vec::with_capacity(group.params.len());
        for (name, param) in group.params {
            let name = name.unwrap_or_else(|| index.to_string());
            index += 1;
            if !param.dtype().is_float() {
                return Err(NnError::Config(format!(
                    "params: parameter `{name}` has dtype {}, optimizers need f32 or f64",
                    param.dtype()
                )));
            }
            if !names.insert(name.clone()) {
                return Err(NnError::Config(format!(
                    "params: the name `{name}` appears more than once"
                )));
            }
            if !ids.insert(param.id()) {
                return Err(NnError::Config(format!(
                    "params: parameter `{name}` appears in more than one place"
                )));
            }
            entries.push(Entry {
                name,
                param,
                state: ParamSlots::new(A::SLOTS.len()),
            });
        }
        self.hyper.push(GroupHyper {
            lr: group.config.lr(),
            momentum: group.config.momentum(),
        });
        self.groups.push(Group {
            config: group.config,
            entries,
        });
        Ok(())
    }

    /// The current config of `group` (with the scheduled lr and momentum).
    pub fn group_config(&self, group: usize) -> A::Config {
        let mut c = self.groups[group].config.clone();
        let h = self.hyper.lock()[group];
        c.set_lr(h.lr);
        if let Some(m) = h.momentum {
            c.set_momentum(m);
        }
        c
    }

    /// Replaces the config of `group` (validated first).
    pub fn set_group_config(&mut self, group: usize, config: A::Config) -> Result<(), NnError> {
        self.hyper.group_index(group)?;
        config.validate()?;
        self.hyper.lock()[group] = GroupHyper {
            lr: config.lr(),
            momentum: config.momentum(),
        };
        self.groups[group].config = config;
        Ok(())
    }

    /// Names of the parameters of `group`.
    pub fn group_param_names(&self, group: usize) -> Vec<String> {
        self.groups[group]
            .entries
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// The live state of the parameter named `name` (step count and buffers), if it has one.
    pub fn param_state(&self, name: &str) -> Option<&ParamSlots> {
        self.groups
            .iter()
            .flat_map(|g| &g.entries)
            .find(|e| e.name == name)
            .map(|e| &e.state)
    }
}

/// The gradient ready for an update kernel: the parameter's dtype, contiguous, and not sharing
/// storage with the parameter.
fn prepare_grad(param: &Tensor, g: Tensor) -> Tensor {
    let g = if g.dtype() != param.dtype() {
        g.to_dtype(param.dtype())
    } else {
        g
    };
    if !g.is_contiguous() || g.same_storage(param) {
        g.contiguous_copy()
    } else {
        g
    }
}

impl<A: Algorithm> Optimizer for Optim<A> {
    fn step(&mut self) {
        let _guard = kiln_core::no_grad();
        let hyper = self.hyper.snapshot();
        for (group, h) in self.groups.iter_mut().zip(hyper) {
            group.config.set_lr(h.lr);
            if let Some(m) = h.momentum {
                group.config.set_momentum(m);
            }
            for e in &mut group.entries {
                if !e.param.is_trainable() {
                    continue;
                }
                let Some(g) = e.param.grad() else { continue };
                let g = prepare_grad(&e.param, g);
                A::update(&group.config, &e.param, &g, &mut e.state);
            }
        }
    }

    fn zero_grad(&self) {
        for g in &self.groups {
            for e in &g.entries {
                e.param.zero_grad();
            }
        }
    }

    fn num_groups(&self) -> usize {
        self.groups.len()
    }

    fn hyper(&self) -> HyperHandle {
        self.hyper.clone()
    }

    fn named_params(&self) -> Vec<(String, Param)> {
        self.groups
            .iter()
            .flat_map(|g| &g.entries)
            .map(|e| (e.name.clone(), e.param.clone()))
            .collect()
    }

    fn state_dict(&self) -> OptimizerState {
        let mut params = BTreeMap::new();
        for e in self.groups.iter().flat_map(|g| &g.entries) {
            if e.state.step == 0 && e.state.slots.iter().all(Option::is_none) {
                continue;
            }
            let tensors = A::SLOTS
                .iter()
                .zip(&e.state.slots)
                .filter_map(|(n, t)| t.as_ref().map(|t| (n.to_string(), t.contiguous_copy())))
                .collect();
            params.insert(
                e.name.clone(),
                ParamState {
                    step: e.state.step,
                    tensors,
                },
            );
        }
        let groups = (0..self.groups.len())
            .map(|i| GroupState {
                params: self.group_param_names(i),
                config: serde_json::to_value(self.group_config(i))
                    .expect("configs serialise to JSON"),
            })
            .collect();
        OptimizerState {
            kind: A::KIND.to_string(),
            params,
            groups,
        }
    }

    fn load_state_dict(&mut self, state: &OptimizerState) -> Result<LoadReport, NnError> {
        let err = |m: String| NnError::StateDict(format!("optimizer ({}): {m}", A::KIND));
        // Check everything first.
        let mut report = LoadReport::default();
        let mut plan: Vec<(usize, usize, ParamSlots)> = Vec::new();
        let mut known: HashSet<&str> = HashSet::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for (ei, e) in g.entries.iter().enumerate() {
                known.insert(&e.name);
                let Some(saved) = state.params.get(&e.name) else {
                    report.missing.push(e.name.clone());
                    continue;
                };
                let mut slots = ParamSlots::new(A::SLOTS.len());
                slots.step = saved.step;
                for (slot, t) in &saved.tensors {
                    let Some(i) = A::SLOTS.iter().position(|s| s == slot) else {
                        return Err(err(format!(
                            "state of `{}` has slot `{slot}` (written by `{}`), expected one of {:?}",
                            e.name, state.kind, A::SLOTS
                        )));
                    };
                    if t.shape() != e.param.shape() {
                        report.mismatched.push((
                            format!("{}.{slot}", e.name),
                            e.param.shape().clone(),
                            t.shape().clone(),
                        ));
                        continue;
                    }
                    if !t.dtype().is_float() {
                        return Err(err(format!(
                            "state `{}.{slot}` has dtype {}",
                            e.name,
                            t.dtype()
                        )));
                    }
                    slots.slots[i] = Some(t.detach().to_dtype(e.param.dtype()).contiguous_copy());
                }
                plan.push((gi, ei, slots));
                report.loaded.push(e.name.clone());
            }
        }
        report.unexpected = state
            .params
            .keys()
            .filter(|n| !known.contains(n.as_str()))
            .cloned()
            .collect();
        if !report.mismatched.is_empty() {
            return Err(err(report.to_string()));
        }
        let mut configs = Vec::new();
        if state.kind == A::KIND {
            for (gi, g) in self.groups.iter().enumerate() {
                let mine: HashSet<&str> = g.entries.iter().map(|e| e.name.as_str()).collect();
                let found = state.groups.iter().find(|s| {
                    s.params.len() == mine.len()
                        && s.params.iter().all(|n| mine.contains(n.as_str()))
                });
                if let Some(saved) = found {
                    let c: A::Config = serde_json::from_value(saved.config.clone())
                        .map_err(|e| err(format!("group {gi} config: {e}")))?;
                    c.validate()?;
                    configs.push((gi, c));
                }
            }
        }
        // Then write.
        for (gi, ei, slots) in plan {
            self.groups[gi].entries[ei].state = slots;
        }
        for (gi, c) in configs {
            self.set_group_config(gi, c)?;
        }
        Ok(report)
    }
}

// ---------------------------------------------------------------------------------- kernels

struct SlotPtrs<T, const N: usize>([*mut T; N]);

// SAFETY: the pointers address distinct buffers that the caller holds write locks on for the
// whole update; every thread touches a disjoint range of them.
unsafe impl<T: Send, const N: usize> Sync for SlotPtrs<T, N> {}
unsafe impl<T: Send, const N: usize> Send for SlotPtrs<T, N> {}

impl<T, const N: usize> SlotPtrs<T, N> {
    /// `len` elements of buffer `i` from `start`.
    ///
    /// # Safety
    /// `start + len` is within the buffer and no other live slice overlaps the range.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, i: usize, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0[i].add(start), len)
    }
}

/// Runs a fused elementwise update over a parameter, its gradient and `N` state buffers:
/// `f(param_chunk, grad_chunk, [state_chunks])` over matching chunks, on several threads for
/// large tensors. All tensors must be contiguous with the same element count and dtype `T`,
/// and the parameter and states must not share storage with each other or with the gradient.
pub fn fused_update<T: Float, const N: usize>(
    param: &Tensor,
    grad: &Tensor,
    states: [&Tensor; N],
    f: impl Fn(&mut [T], &[T], [&mut [T]; N]) + Sync,
) {
    for (i, s) in states.iter().enumerate() {
        assert!(
            !s.same_storage(param) && !s.same_storage(grad),
            "fused_update: state {i} shares storage with the parameter or the gradient"
        );
        for t in &states[..i] {
            assert!(!s.same_storage(t), "fused_update: two states share storage");
        }
    }
    assert!(
        !grad.same_storage(param),
        "fused_update: the gradient shares storage with the parameter"
    );
    let range = |t: &Tensor, what: &str| {
        assert_eq!(
            t.elem_count(),
            param.elem_count(),
            "fused_update: {what} size"
        );
        t.layout()
            .contiguous_range()
            .unwrap_or_else(|| panic!("fused_update: {what} is not contiguous"))
    };
    let (pr, gr) = (range(param, "parameter"), range(grad, "gradient"));
    let srs: [std::ops::Range<usize>; N] = std::array::from_fn(|i| range(states[i], "state"));
    let mut pg = param.storage_mut();
    let gg = grad.storage();
    let mut sgs: Vec<_> = states.iter().map(|s| s.storage_mut()).collect();
    let p = &mut T::slice_mut(&mut pg).expect("fused_update: parameter dtype")[pr];
    let g = &T::slice(&gg).expect("fused_update: gradient dtype")[gr];
    let ptrs = SlotPtrs::<T, N>(std::array::from_fn(|i| {
        T::slice_mut(&mut sgs[i]).expect("fused_update: state dtype")[srs[i].clone()].as_mut_ptr()
    }));
    kiln_core::parallel::for_each_chunk(p, |start, chunk| {
        let n = chunk.len();
        // SAFETY: chunks are disjoint ranges within every buffer (all have p.len() elements).
        let s: [&mut [T]; N] = std::array::from_fn(|i| unsafe { ptrs.slice(i, start, n) });
        f(chunk, &g[start..start + n], s)
    });
}

/// torch's `lerp(a, b, w)` with a fixed scalar weight: `a + w (b − a)` for |w| < 0.5, else
/// `b − (b − a)(1 − w)` (the two forms torch uses for accuracy), chosen once outside the loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lerp<T> {
    from_start: bool,
    coef: T,
}

impl<T: Float> Lerp<T> {
    pub(crate) fn new(w: f64) -> Self {
        let w = T::from_f64(w);
        let from_start = w.abs() < T::from_f64(0.5);
        Lerp {
            from_start,
            // b + (w − 1)(b − a) rounds exactly as b − (b − a)(1 − w).
            coef: if from_start { w } else { w - T::one() },
        }
    }

    #[inline(always)]
    pub(crate) fn at(self, a: T, b: T) -> T {
        let base = if self.from_start { a } else { b };
        base + self.coef * (b - a)
    }
}

/// `-1` to maximise, `1` to minimise: multiplying by it is exact.
pub(crate) fn sign<T: Float>(maximize: bool) -> T {
    if maximize {
        -T::one()
    } else {
        T::one()
    }
}

// ---------------------------------------------------------------------------------- checks

pub(crate) fn check_non_negative(field: &str, v: f64) -> Result<(), NnError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(NnError::Config(format!(
            "{field} must be finite and >= 0, got {v}"
        )))
    }
}

pub(crate) fn check_unit_interval(field: &str, v: f64) -> Result<(), NnError> {
    if (0.0..1.0).contains(&v) {
        Ok(())
    } else {
        Err(NnError::Config(format!(
            "{field} must be in [0, 1), got {v}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(vals: &[f32]) -> Param {
        Param::new(Tensor::from_slice(vals, [vals.len()]))
    }

    #[test]
    fn unnamed_params_get_global_indices_and_duplicates_are_rejected() {
        let (a, b, c) = (p(&[1.0]), p(&[2.0]), p(&[3.0]));
        let opt = Sgd::with_groups([
            ParamGroup::new(vec![a.clone(), b.clone()], 0.1),
            ParamGroup::new(vec![c.clone()], 0.2),
        ])
        .unwrap();
        let names: Vec<_> = opt.named_params().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["0", "1", "2"]);
        assert_eq!(opt.lrs(), vec![0.1, 0.2]);
        let err = Sgd::new(vec![a.clone(), a.clone()], 0.1)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("params") && err.contains("more than one"),
            "{err}"
        );
        let err = Sgd::new(vec![("x", a), ("x", b)], 0.1)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`x` appears more than once"), "{err}");
        let err = Sgd::new(Vec::<Param>::new(), 0.1)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("empty parameter list"), "{err}");
    }

    #[test]
    fn frozen_and_gradless_params_are_skipped_and_zero_grad_clears() {
        let (a, b, c) = (p(&[1.0]), p(&[1.0]), p(&[1.0]));
        let mut opt = Sgd::new(vec![a.clone(), b.clone(), c.clone()], 0.5).unwrap();
        a.set_grad(Some(Tensor::ones([1])));
        b.set_grad(Some(Tensor::ones([1])));
        b.set_requires_grad(false);
        opt.step();
        assert_eq!(a.to_vec::<f32>(), [0.5]);
        assert_eq!(b.to_vec::<f32>(), [1.0]);
        assert_eq!(c.to_vec::<f32>(), [1.0]);
        opt.zero_grad();
        assert!(a.grad().is_none() && b.grad().is_none());
    }

    #[test]
    fn set_lr_validates_and_reaches_the_update() {
        let a = p(&[1.0]);
        let mut opt = Sgd::new(vec![a.clone()], 0.5).unwrap();
        assert!(opt.set_lr(0, -1.0).unwrap_err().to_string().contains("lr"));
        assert!(opt
            .set_lr(3, 1.0)
            .unwrap_err()
            .to_string()
            .contains("group"));
        opt.set_lr(0, 0.25).unwrap();
        a.set_grad(Some(Tensor::ones([1])));
        opt.step();
        assert_eq!(a.to_vec::<f32>(), [0.75]);
        assert_eq!(opt.group_config(0).lr, 0.25);
    }

    #[test]
    fn shared_gradients_are_not_modified() {
        // Autograd can hand the same gradient tensor to several leaves.
        let (a, b) = (p(&[1.0, 2.0]), p(&[3.0, 4.0]));
        let g = Tensor::from_slice(&[1f32, 1.0], [2]);
        a.set_grad(Some(g.clone()));
        b.set_grad(Some(g.clone()));
        let mut opt = Adam::new(vec![a, b], 0.1).unwrap();
        opt.step();
        assert_eq!(g.to_vec::<f32>(), [1.0, 1.0]);
    }

    #[test]
    fn large_tensors_update_in_parallel_chunks_like_small_ones() {
        let n = (1 << 17) + 3;
        let vals: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let big = Param::new(Tensor::from_slice(&vals, [n]));
        let grads: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        big.set_grad(Some(Tensor::from_slice(&grads, [n])));
        let mut opt = Adam::new(vec![big.clone()], 0.01).unwrap();
        opt.step();
        opt.step();
        let out = big.to_vec::<f32>();
        for i in [0, 1, 65535, 65536, n - 1] {
            let small = p(&[vals[i]]);
            small.set_grad(Some(Tensor::from_slice(&[grads[i]], [1])));
            let mut o = Adam::new(vec![small.clone()], 0.01).unwrap();
            o.step();
            o.step();
            assert_eq!(small.to_vec::<f32>()[0], out[i], "element {i}");
        }
    }

    #[test]
    fn state_round_trips_through_a_file_under_another_grouping() {
        let (a, b) = (p(&[1.0, -1.0]), p(&[0.5]));
        let mut opt = Adam::with_groups([
            ParamGroup::new(vec![("a", a.clone())], 0.1),
            ParamGroup::new(vec![("b", b.clone())], 0.01),
        ])
        .unwrap();
        a.set_grad(Some(Tensor::from_slice(&[0.3f32, -0.2], [2])));
        b.set_grad(Some(Tensor::from_slice(&[0.7f32], [1])));
        opt.step();
        let dir = std::env::temp_dir().join(format!("kiln-optim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("adam.safetensors");
        opt.state_dict().save(&path).unwrap();
        let loaded = OptimizerState::load(&path).unwrap();
        assert_eq!(loaded.kind, "adam");
        assert_eq!(loaded.params["a"].step, 1);
        assert_eq!(
            loaded.params["a"].tensors["exp_avg"].to_vec::<f32>(),
            opt.param_state("a").unwrap().slots[0]
                .as_ref()
                .unwrap()
                .to_vec::<f32>()
        );
        // Another grouping: groups reversed, plus an extra parameter without state.
        let c = p(&[0.0]);
        let mut other = Adam::with_groups([
            ParamGroup::new(vec![("b", b.clone())], 1.0),
            ParamGroup::new(vec![("a", a.clone()), ("c", c)], 1.0),
        ])
        .unwrap();
        let report = other.load_state_dict(&loaded).unwrap();
        assert_eq!(report.loaded, ["b", "a"]);
        assert_eq!(report.missing, ["c"]);
        // Group {b} matched a saved group: its lr came back; {a, c} did not.
        assert_eq!(other.lrs(), vec![0.01, 1.0]);
        assert_eq!(other.param_state("a").unwrap().step, 1);

        // Wrong shapes and foreign slots are errors that change nothing.
        let mut bad = loaded.clone();
        bad.params
            .get_mut("a")
            .unwrap()
            .tensors
            .insert("exp_avg".into(), Tensor::zeros([3]));
        let e = other.load_state_dict(&bad).unwrap_err().to_string();
        assert!(e.contains("shape mismatch for a.exp_avg"), "{e}");
        let mut sgd = Sgd::new(vec![("a", a.clone())], 0.1).unwrap();
        let e = sgd.load_state_dict(&loaded).unwrap_err().to_string();
        assert!(e.contains("slot `exp_avg`"), "{e}");
        std::fs::write(dir.join("x.safetensors"), b"nope").unwrap();
        assert!(OptimizerState::load(dir.join("x.safetensors")).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn hyper_handle_is_shared_and_checked() {
        let a = p(&[1.0]);
        let opt = Sgd::new(
            vec![a],
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                ..Default::default()
            },
        )
        .unwrap();
        let h = opt.hyper();
        h.set_lr(0, 0.3).unwrap();
        assert_eq!(opt.lr(0), 0.3);
        h.set_momentum(0, 0.5).unwrap();
        assert_eq!(opt.group_config(0).momentum, 0.5);
        assert!(h.set_momentum(0, 1.5).is_err());
        let ada = Adagrad::new(vec![p(&[1.0])], 0.1).unwrap();
        assert!(ada.hyper().set_momentum(0, 0.5).is_err());
    }

    #[test]
    fn lerp_matches_both_forms() {
        assert_eq!(Lerp::<f64>::new(0.25).at(1.0, 3.0), 1.5);
        assert_eq!(Lerp::<f64>::new(0.75).at(1.0, 3.0), 2.5);
        let (a, b, w) = (0.3f32, 1.7f32, 0.9f32);
        assert_eq!(Lerp::<f32>::new(w as f64).at(a, b), b - (b - a) * (1.0 - w));
    }
}
