//! The plugin registry: names → constructors for layers, losses, optimizers and schedulers, so
//! that a model (and its training setup) can be written in TOML and a user's own type, once
//! registered, is used by name exactly like a built-in one.
//!
//! ```
//! use kiln_core::Tensor;
//! use kiln_nn::{Forward, Module, Sequential, Visitor};
//! use kiln_nn::registry::registry;
//! use serde::Deserialize;
//!
//! /// `x · sigmoid(β x)` (in user crates, `#[derive(Module)]` with `#[module(skip)] beta`).
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Swish {
//!     beta: f64,
//! }
//! impl Module for Swish {
//!     fn visit(&self, _: &mut Visitor) {}
//! }
//! impl Forward for Swish {
//!     fn forward(&self, x: &Tensor) -> Tensor {
//!         x * &(x * self.beta).sigmoid()
//!     }
//! }
//!
//! registry().layer::<Swish>("doc_swish").unwrap();
//! let model = Sequential::from_toml(r#"
//!     seed = 0
//!     [[layer]]
//!     type = "linear"
//!     in = 4
//!     out = 8
//!     [[layer]]
//!     type = "doc_swish"
//!     beta = 1.5
//!     [[layer]]
//!     type = "Linear"
//!     in_features = 8
//!     out_features = 2
//! "#).unwrap();
//! assert_eq!(model.forward(&Tensor::ones([3, 4])).dims(), &[3, 2]);
//! ```
//!
//! Names are matched ignoring case, `_` and `-`, so `layer_norm`, `LayerNorm` and `layernorm`
//! are one name (and registering two of them is a [`NnError::Duplicate`]). Arguments are the
//! TOML table of the item minus its `type` key, deserialized into the constructor's args type;
//! built-ins use torch's argument names and defaults and reject unknown keys.

mod builtins;
mod spec;

pub use spec::{ComponentSpec, TrainSpec, Training};
/// The TOML crate, for building argument tables programmatically.
pub use toml;

use crate::error::NnError;
use crate::layers::Layer;
use crate::loss::Loss;
use crate::module::Param;
use crate::optim::{Algorithm, GroupConfig, Optim, Optimizer};
use crate::scheduler::Scheduler;
use kiln_core::Rng;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

/// What a layer constructor gets besides its arguments: the seeded generator that every layer
/// of a model draws its initial weights from, in order.
pub struct BuildContext {
    rng: Rng,
    seed: u64,
    index: usize,
}

impl BuildContext {
    /// A context whose generator is seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        BuildContext {
            rng: Rng::new(seed),
            seed,
            index: 0,
        }
    }

    /// The generator to initialise weights from (shared by all layers of the model, in order).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// The model's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Position of the layer being built in its `Sequential`.
    pub fn index(&self) -> usize {
        self.index
    }

    /// A fresh seed drawn from the generator (for layers with their own generator, e.g. dropout).
    pub fn next_seed(&mut self) -> u64 {
        self.rng.next_u64()
    }
}

type LayerCtor =
    Arc<dyn Fn(toml::Value, &mut BuildContext) -> Result<Box<dyn Layer>, String> + Send + Sync>;
type LossCtor = Arc<dyn Fn(toml::Value) -> Result<Box<dyn Loss>, String> + Send + Sync>;
type OptimizerCtor = Arc<
    dyn Fn(toml::Value, Vec<(String, Param)>) -> Result<Box<dyn Optimizer>, String> + Send + Sync,
>;
type SchedulerCtor =
    Arc<dyn Fn(toml::Value, &dyn Optimizer) -> Result<Box<dyn Scheduler>, String> + Send + Sync>;

/// The key a name is stored under: lowercase, without `_` and `-`.
fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Levenshtein distance between two strings (by chars).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

struct Entry<C> {
    /// The name as registered (for an alias: the name it stands for).
    name: String,
    /// False for aliases, which are not listed among the known names.
    primary: bool,
    ctor: C,
}

/// The registered constructors of one kind.
struct Table<C> {
    kind: &'static str,
    entries: RwLock<HashMap<String, Entry<C>>>,
}

impl<C: Clone> Table<C> {
    fn new(kind: &'static str) -> Self {
        Table {
            kind,
            entries: RwLock::new(HashMap::new()),
        }
    }

    fn insert(&self, name: &str, aliases: &[&str], ctor: C, replace: bool) -> Result<(), NnError> {
        if normalize(name).is_empty() {
            return Err(NnError::Config(format!(
                "cannot register a {} under the empty name `{name}`",
                self.kind
            )));
        }
        let mut keys = vec![normalize(name)];
        for a in aliases {
            let k = normalize(a);
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if !replace {
            if let Some(e) = keys.iter().find_map(|k| map.get(k)) {
                return Err(NnError::Duplicate {
                    kind: self.kind,
                    name: name.to_string(),
                    existing: e.name.clone(),
                });
            }
        }
        for (i, k) in keys.into_iter().enumerate() {
            map.insert(
                k,
                Entry {
                    name: name.to_string(),
                    primary: i == 0,
                    ctor: ctor.clone(),
                },
            );
        }
        Ok(())
    }

    /// The registered name and constructor of `name`, or an error listing the known names.
    fn get(&self, name: &str) -> Result<(String, C), NnError> {
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let key = normalize(name);
        if let Some(e) = map.get(&key) {
            return Ok((e.name.clone(), e.ctor.clone()));
        }
        let suggestion = map
            .iter()
            .map(|(k, e)| (edit_distance(&key, k), e.name.clone()))
            .filter(|(d, _)| *d <= 2.max(key.chars().count() / 3))
            .min()
            .map(|(_, n)| n);
        let mut known: Vec<String> = map
            .values()
            .filter(|e| e.primary)
            .map(|e| e.name.clone())
            .collect();
        known.sort();
        Err(NnError::UnknownName {
            kind: self.kind,
            name: name.to_string(),
            suggestion,
            known,
        })
    }

    fn names(&self) -> Vec<String> {
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = map
            .values()
            .filter(|e| e.primary)
            .map(|e| e.name.clone())
            .collect();
        names.sort();
        names
    }
}

/// Deserializes constructor arguments, with serde's message on failure.
fn parse_args<A: DeserializeOwned>(args: toml::Value) -> Result<A, String> {
    args.try_into::<A>().map_err(|e| e.message().to_string())
}

/// Deserializes a config that is also `Serialize` and rejects keys it does not have (the keys
/// it serializes back to), for config types without `deny_unknown_fields`.
fn parse_config_strict<C: DeserializeOwned + serde::Serialize>(
    args: toml::Value,
) -> Result<C, String> {
    let given: Vec<String> = match &args {
        toml::Value::Table(t) => t.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let config: C = parse_args(args)?;
    let back = toml::Value::try_from(&config).map_err(|e| e.to_string())?;
    if let toml::Value::Table(known) = back {
        if let Some(bad) = given.iter().find(|k| !known.contains_key(*k)) {
            let expected: Vec<String> = known.keys().map(|k| format!("`{k}`")).collect();
            return Err(format!(
                "unknown field `{bad}`, expected one of {}",
                expected.join(", ")
            ));
        }
    }
    Ok(config)
}

/// Maps names to constructors of layers, losses, optimizers and schedulers. Thread-safe: it can
/// be shared and written to from several threads. [`registry()`] is the global one (with the
/// built-ins); [`Registry::new`] and [`Registry::with_builtins`] make isolated ones.
pub struct Registry {
    layers: Table<LayerCtor>,
    losses: Table<LossCtor>,
    optimizers: Table<OptimizerCtor>,
    schedulers: Table<SchedulerCtor>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// The global registry, with every built-in registered. `Sequential::from_toml` and
/// [`TrainSpec::build`] look names up here.
pub fn registry() -> &'static Registry {
    static GLOBAL: OnceLock<Registry> = OnceLock::new();
    GLOBAL.get_or_init(Registry::with_builtins)
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry {
            layers: Table::new("layer"),
            losses: Table::new("loss"),
            optimizers: Table::new("optimizer"),
            schedulers: Table::new("scheduler"),
        }
    }

    /// A registry with every built-in layer, loss, optimizer and scheduler.
    pub fn with_builtins() -> Self {
        let r = Self::new();
        builtins::register_all(&r).expect("built-in names are unique");
        r
    }

    // ------------------------------------------------------------------ layers

    fn layer_ctor<A, L, F>(f: F) -> LayerCtor
    where
        A: DeserializeOwned + 'static,
        L: Layer + 'static,
        F: Fn(A, &mut BuildContext) -> Result<L, NnError> + Send + Sync + 'static,
    {
        Arc::new(move |args, ctx| {
            let a = parse_args::<A>(args)?;
            f(a, ctx)
                .map(|l| Box::new(l) as Box<dyn Layer>)
                .map_err(|e| e.to_string())
        })
    }

    /// Registers a layer type that deserializes directly from its TOML table.
    pub fn layer<T: Layer + DeserializeOwned + 'static>(&self, name: &str) -> Result<(), NnError> {
        self.register_layer(name, |t: T, _: &mut BuildContext| Ok(t))
    }

    /// Registers a layer constructor: its args type `A` is deserialized from the TOML table (use
    /// `#[serde(deny_unknown_fields)]` to reject typos); a name already taken is an error.
    pub fn register_layer<A, L, F>(&self, name: &str, f: F) -> Result<(), NnError>
    where
        A: DeserializeOwned + 'static,
        L: Layer + 'static,
        F: Fn(A, &mut BuildContext) -> Result<L, NnError> + Send + Sync + 'static,
    {
        self.layers.insert(name, &[], Self::layer_ctor(f), false)
    }

    /// As [`Registry::register_layer`], replacing any layer registered under the name.
    pub fn replace_layer<A, L, F>(&self, name: &str, f: F)
    where
        A: DeserializeOwned + 'static,
        L: Layer + 'static,
        F: Fn(A, &mut BuildContext) -> Result<L, NnError> + Send + Sync + 'static,
    {
        let _ = self.layers.insert(name, &[], Self::layer_ctor(f), true);
    }

    /// A built-in layer with aliases.
    fn builtin_layer<A, L, F>(&self, name: &str, aliases: &[&str], f: F) -> Result<(), NnError>
    where
        A: DeserializeOwned + 'static,
        L: Layer + 'static,
        F: Fn(A, &mut BuildContext) -> Result<L, NnError> + Send + Sync + 'static,
    {
        self.layers
            .insert(name, aliases, Self::layer_ctor(f), false)
    }

    /// Builds the layer registered as `type_name` from `args` (its TOML table without `type`).
    pub fn build_layer(
        &self,
        type_name: &str,
        args: toml::Table,
        ctx: &mut BuildContext,
    ) -> Result<Box<dyn Layer>, NnError> {
        self.build_layer_as(type_name, args, ctx, &format!("layer `{type_name}`"))
    }

    fn build_layer_as(
        &self,
        type_name: &str,
        args: toml::Table,
        ctx: &mut BuildContext,
        what: &str,
    ) -> Result<Box<dyn Layer>, NnError> {
        let (_, ctor) = self.layers.get(type_name)?;
        ctor(toml::Value::Table(args), ctx).map_err(|message| NnError::Args {
            what: what.to_string(),
            message,
        })
    }

    /// Registered layer names (aliases left out), sorted.
    pub fn layer_names(&self) -> Vec<String> {
        self.layers.names()
    }

    // ------------------------------------------------------------------ losses

    fn loss_ctor<A, L, F>(f: F) -> LossCtor
    where
        A: DeserializeOwned + 'static,
        L: Loss + 'static,
        F: Fn(A) -> Result<L, NnError> + Send + Sync + 'static,
    {
        Arc::new(move |args| {
            let a = parse_args::<A>(args)?;
            f(a).map(|l| Box::new(l) as Box<dyn Loss>)
                .map_err(|e| e.to_string())
        })
    }

    /// Registers a loss type that deserializes directly from its TOML table.
    pub fn loss<T: Loss + DeserializeOwned + 'static>(&self, name: &str) -> Result<(), NnError> {
        self.register_loss(name, |t: T| Ok(t))
    }

    /// Registers a loss constructor taking a deserialized args type; a name already taken is an
    /// error.
    pub fn register_loss<A, L, F>(&self, name: &str, f: F) -> Result<(), NnError>
    where
        A: DeserializeOwned + 'static,
        L: Loss + 'static,
        F: Fn(A) -> Result<L, NnError> + Send + Sync + 'static,
    {
        self.losses.insert(name, &[], Self::loss_ctor(f), false)
    }

    /// As [`Registry::register_loss`], replacing any loss registered under the name.
    pub fn replace_loss<A, L, F>(&self, name: &str, f: F)
    where
        A: DeserializeOwned + 'static,
        L: Loss + 'static,
        F: Fn(A) -> Result<L, NnError> + Send + Sync + 'static,
    {
        let _ = self.losses.insert(name, &[], Self::loss_ctor(f), true);
    }

    fn builtin_loss<A, L, F>(&self, name: &str, aliases: &[&str], f: F) -> Result<(), NnError>
    where
        A: DeserializeOwned + 'static,
        L: Loss + 'static,
        F: Fn(A) -> Result<L, NnError> + Send + Sync + 'static,
    {
        self.losses.insert(name, aliases, Self::loss_ctor(f), false)
    }

    /// Builds the loss registered as `type_name` from `args`.
    pub fn build_loss(&self, type_name: &str, args: toml::Table) -> Result<Box<dyn Loss>, NnError> {
        let (_, ctor) = self.losses.get(type_name)?;
        ctor(toml::Value::Table(args)).map_err(|message| NnError::Args {
            what: format!("loss `{type_name}`"),
            message,
        })
    }

    /// Registered loss names (aliases left out), sorted.
    pub fn loss_names(&self) -> Vec<String> {
        self.losses.names()
    }

    // ------------------------------------------------------------------ optimizers

    fn optimizer_ctor<A, O, F>(f: F) -> OptimizerCtor
    where
        A: DeserializeOwned + 'static,
        O: Optimizer + 'static,
        F: Fn(A, Vec<(String, Param)>) -> Result<O, NnError> + Send + Sync + 'static,
    {
        Arc::new(move |args, params| {
            let a = parse_args::<A>(args)?;
            f(a, params)
                .map(|o| Box::new(o) as Box<dyn Optimizer>)
                .map_err(|e| e.to_string())
        })
    }

    fn rule_ctor<R: Algorithm>() -> OptimizerCtor {
        Arc::new(|args, params| {
            let config = parse_config_strict::<R::Config>(args)?;
            config.validate().map_err(|e| e.to_string())?;
            Optim::<R>::new(params, config)
                .map(|o| Box::new(o) as Box<dyn Optimizer>)
                .map_err(|e| e.to_string())
        })
    }

    /// Registers an optimizer from its update rule: the TOML table is the rule's group config
    /// (`lr`, `betas`, ...; unknown keys are rejected), and the optimizer is an [`Optim<R>`]
    /// over the model's trainable parameters.
    pub fn optimizer<R: Algorithm>(&self, name: &str) -> Result<(), NnError> {
        self.optimizers
            .insert(name, &[], Self::rule_ctor::<R>(), false)
    }

    /// Registers an optimizer constructor, which gets its deserialized args and the model's
    /// trainable parameters by name; a name already taken is an error.
    pub fn register_optimizer<A, O, F>(&self, name: &str, f: F) -> Result<(), NnError>
    where
        A: DeserializeOwned + 'static,
        O: Optimizer + 'static,
        F: Fn(A, Vec<(String, Param)>) -> Result<O, NnError> + Send + Sync + 'static,
    {
        self.optimizers
            .insert(name, &[], Self::optimizer_ctor(f), false)
    }

    /// As [`Registry::register_optimizer`], replacing any optimizer registered under the name.
    pub fn replace_optimizer<A, O, F>(&self, name: &str, f: F)
    where
        A: DeserializeOwned + 'static,
        O: Optimizer + 'static,
        F: Fn(A, Vec<(String, Param)>) -> Result<O, NnError> + Send + Sync + 'static,
    {
        let _ = self
            .optimizers
            .insert(name, &[], Self::optimizer_ctor(f), true);
    }

    fn builtin_optimizer<R: Algorithm>(&self, name: &str, aliases: &[&str]) -> Result<(), NnError> {
        self.optimizers
            .insert(name, aliases, Self::rule_ctor::<R>(), false)
    }

    /// Builds the optimizer registered as `type_name` over `params`.
    pub fn build_optimizer(
        &self,
        type_name: &str,
        args: toml::Table,
        params: Vec<(String, Param)>,
    ) -> Result<Box<dyn Optimizer>, NnError> {
        let (_, ctor) = self.optimizers.get(type_name)?;
        ctor(toml::Value::Table(args), params).map_err(|message| NnError::Args {
            what: format!("optimizer `{type_name}`"),
            message,
        })
    }

    /// Registered optimizer names (aliases left out), sorted.
    pub fn optimizer_names(&self) -> Vec<String> {
        self.optimizers.names()
    }

    // ------------------------------------------------------------------ schedulers

    fn scheduler_ctor<A, S, F>(f: F) -> SchedulerCtor
    where
        A: DeserializeOwned + 'static,
        S: Scheduler + 'static,
        F: Fn(A, &dyn Optimizer) -> Result<S, NnError> + Send + Sync + 'static,
    {
        Arc::new(move |args, opt| {
            let a = parse_args::<A>(args)?;
            f(a, opt)
                .map(|s| Box::new(s) as Box<dyn Scheduler>)
                .map_err(|e| e.to_string())
        })
    }

    /// Registers a scheduler constructor, which gets its deserialized args and the optimizer it
    /// drives (take its [`HyperHandle`](crate::optim::HyperHandle) with `opt.hyper()`); a name
    /// already taken is an error.
    pub fn register_scheduler<A, S, F>(&self, name: &str, f: F) -> Result<(), NnError>
    where
        A: DeserializeOwned + 'static,
        S: Scheduler + 'static,
        F: Fn(A, &dyn Optimizer) -> Result<S, NnError> + Send + Sync + 'static,
    {
        self.schedulers
            .insert(name, &[], Self::scheduler_ctor(f), false)
    }

    /// As [`Registry::register_scheduler`], replacing any scheduler registered under the name.
    pub fn replace_scheduler<A, S, F>(&self, name: &str, f: F)
    where
        A: DeserializeOwned + 'static,
        S: Scheduler + 'static,
        F: Fn(A, &dyn Optimizer) -> Result<S, NnError> + Send + Sync + 'static,
    {
        let _ = self
            .schedulers
            .insert(name, &[], Self::scheduler_ctor(f), true);
    }

    fn builtin_scheduler<A, S, F>(&self, name: &str, aliases: &[&str], f: F) -> Result<(), NnError>
    where
        A: DeserializeOwned + 'static,
        S: Scheduler + 'static,
        F: Fn(A, &dyn Optimizer) -> Result<S, NnError> + Send + Sync + 'static,
    {
        self.schedulers
            .insert(name, aliases, Self::scheduler_ctor(f), false)
    }

    /// Builds the scheduler registered as `type_name`, driving `opt`.
    pub fn build_scheduler(
        &self,
        type_name: &str,
        args: toml::Table,
        opt: &dyn Optimizer,
    ) -> Result<Box<dyn Scheduler>, NnError> {
        let (_, ctor) = self.schedulers.get(type_name)?;
        ctor(toml::Value::Table(args), opt).map_err(|message| NnError::Args {
            what: format!("scheduler `{type_name}`"),
            message,
        })
    }

    /// Registered scheduler names (aliases left out), sorted.
    pub fn scheduler_names(&self) -> Vec<String> {
        self.schedulers.names()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_and_suggestions_are_close() {
        assert_eq!(normalize("Layer_Norm"), "layernorm");
        assert_eq!(normalize("RMSNorm"), normalize("rms_norm"));
        assert_eq!(edit_distance("lienar", "linear"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
