//! The `Module` trait and everything derived from its visitor: named parameters, state dicts,
//! train/eval, freezing by glob, summaries.

use crate::error::NnError;
use crate::layers::AdapterSlot;
use kiln_core::{DType, Rng, Shape, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

/// A trainable tensor: a leaf that requires grad (until frozen). Derefs to its [`Tensor`].
#[derive(Clone)]
pub struct Param(Tensor);

impl Param {
    /// Wraps `t` (detached from any graph) as a trainable parameter.
    pub fn new(t: Tensor) -> Self {
        let t = t.detach().contiguous_copy();
        t.set_requires_grad(true);
        Param(t)
    }

    /// The parameter's tensor (a leaf; its gradient is in `grad()`).
    pub fn tensor(&self) -> &Tensor {
        &self.0
    }

    /// True unless the parameter is frozen.
    pub fn is_trainable(&self) -> bool {
        self.0.tracks_grad()
    }
}

impl std::ops::Deref for Param {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.0
    }
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Param({:?})", self.0)
    }
}

/// A non-trainable tensor that belongs to a module's state (e.g. batch-norm running stats):
/// saved and loaded with the parameters, never optimised.
#[derive(Clone)]
pub struct Buffer(Tensor);

impl Buffer {
    /// Wraps `t` (detached) as a buffer.
    pub fn new(t: Tensor) -> Self {
        Buffer(t.detach().contiguous_copy())
    }

    /// The buffer's tensor.
    pub fn tensor(&self) -> &Tensor {
        &self.0
    }
}

impl std::ops::Deref for Buffer {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.0
    }
}

/// Train/eval mode of a layer whose behaviour depends on it (dropout, batch norm).
/// Starts in training mode, as in PyTorch; `Module::train`/`eval` flip every flag in a model.
#[derive(Debug)]
pub struct TrainFlag(AtomicBool);

impl TrainFlag {
    /// True in training mode.
    pub fn is_training(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the mode.
    pub fn set(&self, training: bool) {
        self.0.store(training, Ordering::Relaxed)
    }
}

impl Default for TrainFlag {
    fn default() -> Self {
        TrainFlag(AtomicBool::new(true))
    }
}

/// A layer's random generator (e.g. for dropout masks). Visited like a parameter, so a training
/// checkpoint can save every generator of a model and a resumed run draws the same masks.
#[derive(Debug)]
pub struct RandomState(std::sync::Mutex<Rng>);

impl RandomState {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        RandomState(std::sync::Mutex::new(Rng::new(seed)))
    }

    /// Exclusive access to the generator.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Rng> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The generator's state.
    pub fn state(&self) -> [u64; 4] {
        self.lock().state()
    }

    /// Continues from a saved state.
    pub fn set_state(&self, state: [u64; 4]) {
        *self.lock() = Rng::from_state(state);
    }
}

impl Clone for RandomState {
    fn clone(&self) -> Self {
        RandomState(std::sync::Mutex::new(self.lock().clone()))
    }
}

impl Clone for TrainFlag {
    fn clone(&self) -> Self {
        TrainFlag(AtomicBool::new(self.is_training()))
    }
}

/// What a [`Visitor`] reports.
pub enum Visited<'a> {
    /// A sub-module starts (full dotted name, type name).
    Enter(&'a str, &'static str),
    /// The sub-module entered last ends.
    Leave,
    /// A parameter with its full dotted name.
    Param(&'a str, &'a Param),
    /// A buffer with its full dotted name.
    Buffer(&'a str, &'a Buffer),
    /// A train/eval flag.
    Flag(&'a TrainFlag),
    /// A random generator.
    Rng(&'a RandomState),
    /// The adapter slot of a layer (a [`Linear`](crate::Linear)), with the layer's dotted name;
    /// the adapter's own items (if one is set) follow under that same name.
    Adapter(&'a str, &'a AdapterSlot),
}

/// Walks a module tree, keeping the dotted path, and reports each item to a callback.
pub struct Visitor<'f> {
    path: String,
    marks: Vec<usize>,
    callback: &'f mut dyn FnMut(Visited<'_>),
}

impl<'f> Visitor<'f> {
    /// A visitor calling `callback` for every item.
    pub fn new(callback: &'f mut dyn FnMut(Visited<'_>)) -> Self {
        Visitor {
            path: String::new(),
            marks: Vec::new(),
            callback,
        }
    }

    fn push(&mut self, name: &str) {
        self.marks.push(self.path.len());
        if !self.path.is_empty() && !name.is_empty() {
            self.path.push('.');
        }
        self.path.push_str(name);
    }

    fn pop(&mut self) {
        let len = self.marks.pop().expect("visitor: leave without enter");
        self.path.truncate(len);
    }

    /// Reports a parameter named `name` under the current path.
    pub fn param(&mut self, name: &str, p: &Param) {
        self.push(name);
        (self.callback)(Visited::Param(&self.path, p));
        self.pop();
    }

    /// Reports a buffer named `name` under the current path.
    pub fn buffer(&mut self, name: &str, b: &Buffer) {
        self.push(name);
        (self.callback)(Visited::Buffer(&self.path, b));
        self.pop();
    }

    /// Reports a train/eval flag.
    pub fn flag(&mut self, f: &TrainFlag) {
        (self.callback)(Visited::Flag(f));
    }

    /// Reports a random generator.
    pub fn rng(&mut self, r: &RandomState) {
        (self.callback)(Visited::Rng(r));
    }

    /// Reports the adapter slot of the layer being visited (named by the current path).
    pub fn adapter(&mut self, slot: &AdapterSlot) {
        (self.callback)(Visited::Adapter(&self.path, slot));
    }

    /// Visits sub-module `m` under `name`.
    pub fn module<M: Module + ?Sized>(&mut self, name: &str, m: &M) {
        self.push(name);
        (self.callback)(Visited::Enter(&self.path, m.type_name()));
        m.visit(self);
        (self.callback)(Visited::Leave);
        self.pop();
    }

    /// Visits the items of a list, named `name.0`, `name.1`, ...
    pub fn list<T: Visit>(&mut self, name: &str, items: &[T]) {
        self.push(name);
        for (i, item) in items.iter().enumerate() {
            item.visit_named(&i.to_string(), self);
        }
        self.pop();
    }
}

/// A building block: parameters, buffers and sub-modules that a visitor can walk.
/// Write it with `#[derive(Module)]`; add behaviour with [`Forward`].
pub trait Module: Send + Sync {
    /// Reports every parameter, buffer, flag and sub-module to `visitor`, with its name.
    fn visit(&self, visitor: &mut Visitor);

    /// Short type name shown in summaries.
    fn type_name(&self) -> &'static str {
        let full = std::any::type_name::<Self>();
        let base = full.split('<').next().unwrap_or(full);
        base.rsplit("::").next().unwrap_or(base)
    }
}

/// A module that maps one tensor to one tensor.
pub trait Forward {
    /// Computes the module's output.
    fn forward(&self, x: &Tensor) -> Tensor;
}

/// Anything a derived module's field can be: parameters, buffers, flags, modules and
/// `Vec`/`Option`/`Box` of them.
pub trait Visit {
    /// Reports this field, named `name`, to the visitor.
    fn visit_named(&self, name: &str, visitor: &mut Visitor);
}

impl Visit for Param {
    fn visit_named(&self, name: &str, visitor: &mut Visitor) {
        visitor.param(name, self)
    }
}

impl Visit for Buffer {
    fn visit_named(&self, name: &str, visitor: &mut Visitor) {
        visitor.buffer(name, self)
    }
}

impl Visit for TrainFlag {
    fn visit_named(&self, _name: &str, visitor: &mut Visitor) {
        visitor.flag(self)
    }
}

impl Visit for RandomState {
    fn visit_named(&self, _name: &str, visitor: &mut Visitor) {
        visitor.rng(self)
    }
}

impl<T: Visit> Visit for Vec<T> {
    fn visit_named(&self, name: &str, visitor: &mut Visitor) {
        visitor.list(name, self)
    }
}

impl<T: Visit> Visit for Option<T> {
    fn visit_named(&self, name: &str, visitor: &mut Visitor) {
        if let Some(x) = self {
            x.visit_named(name, visitor)
        }
    }
}

impl<M: Module + ?Sized> Visit for M {
    fn visit_named(&self, name: &str, visitor: &mut Visitor) {
        visitor.module(name, self)
    }
}

impl<M: Module + ?Sized> Module for Box<M> {
    fn visit(&self, visitor: &mut Visitor) {
        (**self).visit(visitor)
    }
    fn type_name(&self) -> &'static str {
        (**self).type_name()
    }
}

impl<M: Module + ?Sized> Module for std::sync::Arc<M> {
    fn visit(&self, visitor: &mut Visitor) {
        (**self).visit(visitor)
    }
    fn type_name(&self) -> &'static str {
        (**self).type_name()
    }
}

/// Named tensors of a module (parameters and buffers), in visiting order.
#[derive(Clone, Default)]
pub struct StateDict {
    entries: Vec<(String, Tensor)>,
}

impl StateDict {
    /// An empty state dict.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces `name`.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        let name = name.into();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = t,
            None => self.entries.push((name, t)),
        }
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Names and tensors in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl FromIterator<(String, Tensor)> for StateDict {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        let mut sd = StateDict::new();
        for (n, t) in iter {
            sd.insert(n, t);
        }
        sd
    }
}

/// How strictly [`ModuleExt::load_state_dict`] matches names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// Every module tensor must be present and no extra key may exist.
    Strict,
    /// Load what matches; report the rest.
    NonStrict,
}

/// What a state-dict load found. Shape mismatches are always an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors loaded.
    pub loaded: Vec<String>,
    /// Module tensors absent from the state dict.
    pub missing: Vec<String>,
    /// State-dict keys the module does not have.
    pub unexpected: Vec<String>,
    /// (name, module shape, state-dict shape) for tensors whose shapes differ.
    pub mismatched: Vec<(String, Shape, Shape)>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} loaded", self.loaded.len())?;
        if !self.missing.is_empty() {
            write!(f, "; missing: {}", self.missing.join(", "))?;
        }
        if !self.unexpected.is_empty() {
            write!(f, "; unexpected: {}", self.unexpected.join(", "))?;
        }
        for (n, want, got) in &self.mismatched {
            write!(
                f,
                "; shape mismatch for {n}: module {want}, state dict {got}"
            )?;
        }
        Ok(())
    }
}

/// Everything a [`Module`] gets from its visitor.
pub trait ModuleExt: Module {
    /// Calls `f` for every item in the tree.
    fn walk(&self, mut f: impl FnMut(Visited<'_>)) {
        let mut visitor = Visitor::new(&mut f);
        self.visit(&mut visitor);
    }

    /// Parameters with their dotted names, in declaration order.
    fn named_parameters(&self) -> Vec<(String, Param)> {
        let mut out = Vec::new();
        self.walk(|v| {
            if let Visited::Param(n, p) = v {
                out.push((n.to_string(), p.clone()))
            }
        });
        out
    }

    /// Parameters in declaration order.
    fn parameters(&self) -> Vec<Param> {
        self.named_parameters()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    /// Buffers with their dotted names.
    fn named_buffers(&self) -> Vec<(String, Buffer)> {
        let mut out = Vec::new();
        self.walk(|v| {
            if let Visited::Buffer(n, b) = v {
                out.push((n.to_string(), b.clone()))
            }
        });
        out
    }

    /// The adapter slot of every layer that has one (every [`Linear`](crate::Linear)), with the
    /// layer's dotted name, in visiting order. The slots are shared with the layers: setting an
    /// adapter in one changes that layer's output.
    fn adapter_slots(&self) -> Vec<(String, AdapterSlot)> {
        let mut out = Vec::new();
        self.walk(|v| {
            if let Visited::Adapter(n, s) = v {
                out.push((n.to_string(), s.clone()))
            }
        });
        out
    }

    /// Total number of parameter elements.
    fn num_parameters(&self) -> usize {
        self.parameters().iter().map(|p| p.elem_count()).sum()
    }

    /// Number of parameter elements that are not frozen.
    fn num_trainable_parameters(&self) -> usize {
        self.parameters()
            .iter()
            .filter(|p| p.is_trainable())
            .map(|p| p.elem_count())
            .sum()
    }

    /// Parameters and buffers by name (sharing storage with the module).
    fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        self.walk(|v| match v {
            Visited::Param(n, p) => sd.insert(n, p.tensor().clone()),
            Visited::Buffer(n, b) => sd.insert(n, b.tensor().clone()),
            _ => {}
        });
        sd
    }

    /// Copies tensors from `sd` into the module's parameters and buffers (converting dtype).
    /// Checks everything before writing anything: on error the module is unchanged.
    fn load_state_dict(&self, sd: &StateDict, mode: LoadMode) -> Result<LoadReport, NnError> {
        let own = self.state_dict();
        let mut report = LoadReport::default();
        let mut pairs = Vec::new();
        for (name, t) in own.iter() {
            match sd.get(name) {
                None => report.missing.push(name.to_string()),
                Some(src) if src.shape() != t.shape() => report.mismatched.push((
                    name.to_string(),
                    t.shape().clone(),
                    src.shape().clone(),
                )),
                Some(src) => pairs.push((name.to_string(), t.clone(), src.clone())),
            }
        }
        let own_names: std::collections::HashSet<&str> = own.iter().map(|(n, _)| n).collect();
        report.unexpected = sd
            .iter()
            .filter(|(n, _)| !own_names.contains(n))
            .map(|(n, _)| n.to_string())
            .collect();
        let strict_fail = mode == LoadMode::Strict
            && !(report.missing.is_empty() && report.unexpected.is_empty());
        if strict_fail || !report.mismatched.is_empty() {
            return Err(NnError::StateDict(report.to_string()));
        }
        for (name, dst, src) in pairs {
            dst.assign(&src.detach().to_dtype(dst.dtype()));
            report.loaded.push(name);
        }
        Ok(report)
    }

    /// Sets training mode on every layer (dropout active, batch norm uses batch statistics).
    fn train(&self) {
        self.walk(|v| {
            if let Visited::Flag(f) = v {
                f.set(true)
            }
        });
    }

    /// Sets evaluation mode on every layer.
    fn eval(&self) {
        self.walk(|v| {
            if let Visited::Flag(f) = v {
                f.set(false)
            }
        });
    }

    /// The state of every random generator in the model, in visiting order.
    fn rng_states(&self) -> Vec<[u64; 4]> {
        let mut out = Vec::new();
        self.walk(|v| {
            if let Visited::Rng(r) = v {
                out.push(r.state())
            }
        });
        out
    }

    /// Restores states saved by [`ModuleExt::rng_states`] from a model of the same structure.
    fn set_rng_states(&self, states: &[[u64; 4]]) -> Result<(), NnError> {
        let count = self.rng_states().len();
        if count != states.len() {
            return Err(NnError::StateDict(format!(
                "the model has {count} random generators but {} states were given",
                states.len()
            )));
        }
        let mut it = states.iter();
        self.walk(|v| {
            if let Visited::Rng(r) = v {
                r.set_state(*it.next().expect("counted"))
            }
        });
        Ok(())
    }

    /// Freezes the parameters whose names match the glob `pattern` (`*` crosses dots:
    /// `encoder.*`, `*.bias`, `layers.[0-3].*`). Returns how many matched; a pattern that is
    /// invalid or matches nothing is an error (it is almost always a typo).
    fn freeze(&self, pattern: &str) -> Result<usize, NnError> {
        set_trainable(self, pattern, false)
    }

    /// Unfreezes the parameters whose names match `pattern` (see [`ModuleExt::freeze`]).
    fn unfreeze(&self, pattern: &str) -> Result<usize, NnError> {
        set_trainable(self, pattern, true)
    }

    /// A table of sub-modules and parameters with shapes and counts, and the totals.
    fn summary(&self) -> String {
        let mut lines = vec![format!(
            "{:<48} {:<20} {:>12}",
            "name", "shape / type", "params"
        )];
        let mut depth = 0usize;
        let mut counts: Vec<usize> = Vec::new();
        let mut starts: Vec<usize> = Vec::new();
        self.walk(|v| match v {
            Visited::Enter(n, ty) => {
                starts.push(lines.len());
                counts.push(0);
                lines.push(format!(
                    "{:<48} {:<20}",
                    format!("{}{}", "  ".repeat(depth), n),
                    ty
                ));
                depth += 1;
            }
            Visited::Leave => {
                depth -= 1;
                let c = counts.pop().unwrap_or(0);
                if let Some(parent) = counts.last_mut() {
                    *parent += c;
                }
                let at = starts.pop().unwrap();
                lines[at] = format!("{} {:>12}", lines[at], c);
            }
            Visited::Param(n, p) => {
                let frozen = if p.is_trainable() { "" } else { " (frozen)" };
                lines.push(format!(
                    "{:<48} {:<20} {:>12}{frozen}",
                    format!("{}{}", "  ".repeat(depth), n),
                    format!("{}", p.shape()),
                    p.elem_count()
                ));
                if let Some(c) = counts.last_mut() {
                    *c += p.elem_count();
                }
            }
            Visited::Buffer(n, b) => lines.push(format!(
                "{:<48} {:<20} {:>12}",
                format!("{}{} (buffer)", "  ".repeat(depth), n),
                format!("{}", b.shape()),
                "-"
            )),
            Visited::Flag(_) | Visited::Rng(_) | Visited::Adapter(..) => {}
        });
        lines.push(format!(
            "total parameters: {}  trainable: {}",
            self.num_parameters(),
            self.num_trainable_parameters()
        ));
        lines.join("\n")
    }

    /// Writes the state dict to a safetensors file (f32/f64/i64/u32 tensors by name).
    fn save_safetensors(&self, path: impl AsRef<std::path::Path>) -> Result<(), NnError> {
        crate::safetensors_io::save(&self.state_dict(), path.as_ref())
    }

    /// Loads a safetensors file written by kiln or by PyTorch/Hugging Face into the module.
    fn load_safetensors(
        &self,
        path: impl AsRef<std::path::Path>,
        mode: LoadMode,
    ) -> Result<LoadReport, NnError> {
        let sd = crate::safetensors_io::load(path.as_ref())?;
        self.load_state_dict(&sd, mode)
            .map_err(|e| NnError::File(path.as_ref().display().to_string(), e.to_string()))
    }
}

impl<M: Module + ?Sized> ModuleExt for M {}

fn set_trainable<M: Module + ?Sized>(m: &M, pattern: &str, on: bool) -> Result<usize, NnError> {
    let glob = globset::Glob::new(pattern)
        .map_err(|e| NnError::Pattern(pattern.to_string(), e.to_string()))?
        .compile_matcher();
    let mut matched = 0;
    m.walk(|v| {
        if let Visited::Param(n, p) = v {
            if glob.is_match(n) {
                p.tensor().set_requires_grad(on);
                matched += 1;
            }
        }
    });
    if matched == 0 {
        let names: Vec<String> = m
            .named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .take(8)
            .collect();
        return Err(NnError::Pattern(
            pattern.to_string(),
            format!(
                "matches no parameter (names look like: {})",
                names.join(", ")
            ),
        ));
    }
    Ok(matched)
}

/// The dtype names safetensors uses.
pub(crate) fn dtype_tag(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::U32 => "U32",
    }
}

/// Map from name to tensor, for building state dicts by hand.
pub type TensorMap = BTreeMap<String, Tensor>;

impl From<HashMap<String, Tensor>> for StateDict {
    fn from(m: HashMap<String, Tensor>) -> Self {
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().collect()
    }
}

impl From<TensorMap> for StateDict {
    fn from(m: TensorMap) -> Self {
        m.into_iter().collect()
    }
}
