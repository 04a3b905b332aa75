//! Fine-tuning strategies: one declarative object saying which parameters train, from which
//! epoch, and at which learning-rate multiplier.
//!
//! Parameters are sorted into **depth groups** by name, counted from the top of the network:
//! depth 0 is the task head (everything outside the layer stack and the embeddings, e.g.
//! `classifier.*`, `bert.pooler.*`), depth 1 the last layer of the stack (`…layer.5.…`), …,
//! depth L the first layer, and depth L + 1 the embeddings. Layer-wise LR decay multiplies the
//! learning rate of depth d by `decay^d`; gradual unfreezing trains depth 0 first and unfreezes
//! one more depth every `every` epochs, or every `every` optimizer steps (ULMFiT).
//!
//! ```
//! use kiln_tune::Strategy;
//! let s = Strategy::full().llrd(0.9).gradual_unfreeze(1);
//! let probe = Strategy::linear_probe();
//! let s2 = Strategy::full().freeze("bert.embeddings.*").freeze_layers(0..3);
//! # let _ = (s, probe, s2);
//! ```

use crate::error::{Result, TuneError};
use globset::{Glob, GlobMatcher};
use kiln_nn::{Module, ModuleExt, Param};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which parameters a strategy trains (before freezing rules and unfreezing schedules).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Method {
    /// Every parameter.
    Full,
    /// Only the task head (depth 0).
    LinearProbe,
    /// Only biases, plus the task head (Ben Zaken et al., 2022).
    BitFit,
    /// A parameter-efficient method registered by name (e.g. `lora`): it is applied to the
    /// model with `args`, and decides itself which parameters train.
    Adapter {
        /// The registered name.
        name: String,
        /// The method's arguments.
        #[serde(default)]
        args: toml::Table,
    },
}

/// A fine-tuning strategy. Build with [`Strategy::full`], [`Strategy::linear_probe`],
/// [`Strategy::bitfit`] or [`Strategy::adapter`], then add freezing, LLRD and gradual unfreezing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    /// What trains.
    pub method: Method,
    /// Globs of parameter names that stay frozen (`*` crosses dots).
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Layers of the stack (0-based indices, `[start, end)`) that stay frozen.
    #[serde(default)]
    pub freeze_layers: Option<(usize, usize)>,
    /// Layer-wise learning-rate decay: depth d trains at `lr × decay^d`.
    #[serde(default)]
    pub llrd: Option<f64>,
    /// Gradual unfreezing: one more depth group every this many epochs.
    #[serde(default)]
    pub unfreeze_every: Option<usize>,
    /// Gradual unfreezing by optimizer steps: one more depth group every this many steps
    /// (exclusive with `unfreeze_every`).
    #[serde(default)]
    pub unfreeze_every_steps: Option<usize>,
    /// Also freeze the embeddings (depth L + 1).
    #[serde(default)]
    pub freeze_embeddings: bool,
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy::full()
    }
}

impl Strategy {
    fn with_method(method: Method) -> Self {
        Strategy {
            method,
            freeze: Vec::new(),
            freeze_layers: None,
            llrd: None,
            unfreeze_every: None,
            unfreeze_every_steps: None,
            freeze_embeddings: false,
        }
    }

    /// Full fine-tuning: every parameter trains.
    pub fn full() -> Self {
        Self::with_method(Method::Full)
    }

    /// A linear probe: only the task head trains.
    pub fn linear_probe() -> Self {
        Self::with_method(Method::LinearProbe)
    }

    /// BitFit: biases and the task head train.
    pub fn bitfit() -> Self {
        Self::with_method(Method::BitFit)
    }

    /// A method registered by name (see [`crate::methods`](crate::method::methods)), e.g. `lora` with its arguments.
    pub fn adapter(name: impl Into<String>, args: toml::Table) -> Self {
        Self::with_method(Method::Adapter {
            name: name.into(),
            args,
        })
    }

    /// Keeps parameters matching `pattern` frozen.
    pub fn freeze(mut self, pattern: impl Into<String>) -> Self {
        self.freeze.push(pattern.into());
        self
    }

    /// Keeps layers `range` (0-based, of the layer stack) frozen.
    pub fn freeze_layers(mut self, range: std::ops::Range<usize>) -> Self {
        self.freeze_layers = Some((range.start, range.end));
        self
    }

    /// Keeps the embeddings frozen.
    pub fn freeze_embeddings(mut self) -> Self {
        self.freeze_embeddings = true;
        self
    }

    /// Layer-wise learning-rate decay (`lr × decay^depth`).
    pub fn llrd(mut self, decay: f64) -> Self {
        self.llrd = Some(decay);
        self
    }

    /// Gradual unfreezing: the head first, one more depth every `every` epochs.
    pub fn gradual_unfreeze(mut self, every: usize) -> Self {
        self.unfreeze_every = Some(every);
        self
    }

    /// Gradual unfreezing by optimizer steps: the head first, one more depth every `every`
    /// steps (exclusive with [`Strategy::gradual_unfreeze`]).
    pub fn gradual_unfreeze_steps(mut self, every: usize) -> Self {
        self.unfreeze_every_steps = Some(every);
        self
    }

    /// Parses a strategy from a TOML table (as in a recipe's `[strategy]`).
    pub fn from_toml(table: toml::Table) -> Result<Self> {
        let mut table = table;
        let type_value = table.remove("type");
        // Keys the strategy itself reads; for an adapter method the rest are its arguments.
        let (own, rest): (toml::Table, toml::Table) = table
            .into_iter()
            .partition(|(k, _)| STRATEGY_KEYS.contains(&k.as_str()));
        let method = match type_value {
            None => Method::Full,
            Some(toml::Value::String(name)) => match name.as_str() {
                "full" => Method::Full,
                "linear_probe" | "probe" => Method::LinearProbe,
                "bitfit" => Method::BitFit,
                other => Method::Adapter {
                    name: other.to_string(),
                    args: rest.clone(),
                },
            },
            Some(v) => {
                return Err(TuneError::config(
                    "strategy.type",
                    format!("expected a string, got {}", v.type_str()),
                ))
            }
        };
        if !matches!(method, Method::Adapter { .. }) {
            if let Some(k) = rest.keys().next() {
                return Err(TuneError::config(
                    format!("strategy.{k}"),
                    format!("unknown key (known: type, {})", STRATEGY_KEYS.join(", ")),
                ));
            }
        }
        let table = own;
        let mut s = Strategy::with_method(method);
        for (k, v) in table {
            let bad = |what: &str| TuneError::config(format!("strategy.{k}"), what.to_string());
            match k.as_str() {
                "freeze" => {
                    s.freeze = v
                        .try_into::<Vec<String>>()
                        .map_err(|_| bad("expected a list of glob strings"))?
                }
                "freeze_layers" => {
                    let r = v
                        .try_into::<Vec<usize>>()
                        .map_err(|_| bad("expected [start, end]"))?;
                    if r.len() != 2 || r[0] > r[1] {
                        return Err(bad("expected [start, end] with start ≤ end"));
                    }
                    s.freeze_layers = Some((r[0], r[1]));
                }
                "llrd" => s.llrd = Some(v.as_float().ok_or_else(|| bad("expected a number"))?),
                "unfreeze_every" => {
                    s.unfreeze_every = Some(
                        v.as_integer()
                            .filter(|&n| n > 0)
                            .ok_or_else(|| bad("expected a positive integer"))?
                            as usize,
                    )
                }
                "unfreeze_every_steps" => {
                    s.unfreeze_every_steps = Some(
                        v.as_integer()
                            .filter(|&n| n > 0)
                            .ok_or_else(|| bad("expected a positive integer"))?
                            as usize,
                    )
                }
                "freeze_embeddings" => {
                    s.freeze_embeddings = v.as_bool().ok_or_else(|| bad("expected true/false"))?
                }
                _ => unreachable!("only strategy keys are left"),
            }
        }
        s.validate()?;
        Ok(s)
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if let Some(d) = self.llrd {
            if !(d > 0.0 && d <= 1.0) {
                return Err(TuneError::config(
                    "llrd",
                    format!("must be in (0, 1], got {d}"),
                ));
            }
        }
        if self.unfreeze_every == Some(0) {
            return Err(TuneError::config("unfreeze_every", "must be at least 1"));
        }
        if self.unfreeze_every_steps == Some(0) {
            return Err(TuneError::config(
                "unfreeze_every_steps",
                "must be at least 1",
            ));
        }
        if let (Some(e), Some(n)) = (self.unfreeze_every, self.unfreeze_every_steps) {
            return Err(TuneError::config(
                "strategy.unfreeze_every_steps",
                format!(
                    "gradual unfreezing is either by epochs or by steps: got unfreeze_every = {e} \
                     and unfreeze_every_steps = {n}; set only one"
                ),
            ));
        }
        Ok(())
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        let mut s = match &self.method {
            Method::Full => "full".to_string(),
            Method::LinearProbe => "linear probe".to_string(),
            Method::BitFit => "bitfit".to_string(),
            Method::Adapter { name, .. } => name.clone(),
        };
        if let Some(d) = self.llrd {
            s.push_str(&format!(" + llrd {d}"));
        }
        if let Some(e) = self.unfreeze_every {
            s.push_str(&format!(" + gradual unfreezing every {e} epoch(s)"));
        }
        if let Some(n) = self.unfreeze_every_steps {
            s.push_str(&format!(" + gradual unfreezing every {n} step(s)"));
        }
        s
    }

    /// Resolves the strategy on `model`: applies an adapter method, and sorts every parameter
    /// into its depth group with its LR multiplier and the epoch (or step) it starts training.
    pub fn plan<M: Module>(&self, model: &M) -> Result<Plan> {
        self.validate()?;
        if let Method::Adapter { name, args } = &self.method {
            crate::method::methods().apply(name, model, args.clone())?;
        }
        // Trainability decided by an adapter method is the starting point for it; for the
        // others every parameter starts trainable.
        let named = model.named_parameters();
        let adapter_trainable: Vec<bool> = named.iter().map(|(_, p)| p.is_trainable()).collect();
        let layers = layer_count(named.iter().map(|(n, _)| n.as_str()));
        let freeze: Vec<GlobMatcher> = self
            .freeze
            .iter()
            .map(|p| {
                Glob::new(p)
                    .map(|g| g.compile_matcher())
                    .map_err(|e| TuneError::config(format!("freeze pattern `{p}`"), e.to_string()))
            })
            .collect::<Result<_>>()?;
        for (pattern, glob) in self.freeze.iter().zip(&freeze) {
            if !named.iter().any(|(n, _)| glob.is_match(n)) {
                let examples: Vec<&str> = named.iter().take(6).map(|(n, _)| n.as_str()).collect();
                return Err(TuneError::config(
                    format!("freeze pattern `{pattern}`"),
                    format!(
                        "matches no parameter (names look like: {})",
                        examples.join(", ")
                    ),
                ));
            }
        }
        let mut params = Vec::with_capacity(named.len());
        for ((name, param), adapter_on) in named.into_iter().zip(adapter_trainable) {
            let place = place_of(&name, layers);
            let depth = match place {
                Place::Head => 0,
                Place::Layer(i) => layers - i,
                Place::Embeddings => layers + 1,
            };
            let mut trains = match &self.method {
                Method::Full => true,
                Method::LinearProbe => place == Place::Head,
                Method::BitFit => place == Place::Head || is_bias(&name),
                Method::Adapter { .. } => adapter_on,
            };
            if freeze.iter().any(|g| g.is_match(&name)) {
                trains = false;
            }
            if let (Some((a, b)), Place::Layer(i)) = (self.freeze_layers, place) {
                if (a..b).contains(&i) {
                    trains = false;
                }
            }
            if self.freeze_embeddings && place == Place::Embeddings {
                trains = false;
            }
            let start_epoch = match self.unfreeze_every {
                Some(every) => depth * every,
                None => 0,
            };
            let start_step = match self.unfreeze_every_steps {
                Some(every) => depth * every,
                None => 0,
            };
            let lr_scale = self.llrd.map_or(1.0, |d| d.powi(depth as i32));
            params.push(PlannedParam {
                name,
                param,
                depth,
                trains,
                start_epoch,
                start_step,
                lr_scale,
            });
        }
        if !params.iter().any(|p| p.trains) {
            return Err(TuneError::config(
                "strategy",
                format!("`{}` leaves no parameter to train", self.describe()),
            ));
        }
        let plan = Plan { params, layers };
        plan.set_epoch(0);
        plan.set_step(0);
        Ok(plan)
    }
}

const STRATEGY_KEYS: [&str; 6] = [
    "freeze",
    "freeze_layers",
    "llrd",
    "unfreeze_every",
    "unfreeze_every_steps",
    "freeze_embeddings",
];

/// Where a parameter sits in the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Head,
    Layer(usize),
    Embeddings,
}

/// Layer-stack container names: `encoder.layer.N`, `model.layers.N`, `transformer.h.N`, ...
const STACKS: [&str; 5] = ["layer", "layers", "h", "blocks", "block"];

fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts
        .windows(2)
        .find(|w| STACKS.contains(&w[0]) && w[1].parse::<usize>().is_ok())
        .map(|w| w[1].parse().unwrap())
}

fn layer_count<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names.filter_map(layer_index).max().map_or(0, |m| m + 1)
}

fn place_of(name: &str, _layers: usize) -> Place {
    if let Some(i) = layer_index(name) {
        return Place::Layer(i);
    }
    let embed = name
        .split('.')
        .any(|p| p.contains("embed") || p == "wte" || p == "wpe");
    if embed {
        Place::Embeddings
    } else {
        Place::Head
    }
}

fn is_bias(name: &str) -> bool {
    name.ends_with(".bias") || name == "bias"
}

/// One parameter as a strategy placed it.
#[derive(Clone, Debug)]
pub struct PlannedParam {
    /// Dotted name.
    pub name: String,
    /// The parameter.
    pub param: Param,
    /// Depth from the top: 0 head, 1 last layer, …, layers + 1 embeddings.
    pub depth: usize,
    /// Whether it trains at all.
    pub trains: bool,
    /// The first epoch (0-based) in which it trains.
    pub start_epoch: usize,
    /// The optimizer step (0-based) from which it trains (gradual unfreezing by steps; 0
    /// otherwise).
    pub start_step: usize,
    /// Multiplier of the base learning rate.
    pub lr_scale: f64,
}

/// A strategy resolved on a model.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Every parameter of the model, in declaration order.
    pub params: Vec<PlannedParam>,
    /// Number of layers found in the stack.
    pub layers: usize,
}

impl Plan {
    /// The parameters that train at some point, as `(name, param, lr_scale, decays)` where
    /// `decays` is false for biases and normalisation weights (no weight decay, as in HF).
    pub fn trainable(&self) -> Vec<(String, Param, f64, bool)> {
        self.params
            .iter()
            .filter(|p| p.trains)
            .map(|p| {
                let lname = p.name.to_ascii_lowercase();
                let no_decay = is_bias(&p.name) || lname.contains("norm") || p.param.rank() < 2;
                (p.name.clone(), p.param.clone(), p.lr_scale, !no_decay)
            })
            .collect()
    }

    /// Sets which parameters record gradients in `epoch` (gradual unfreezing); frozen ones
    /// record no graph. Returns how many tensors train.
    pub fn set_epoch(&self, epoch: usize) -> usize {
        let mut n = 0;
        for p in &self.params {
            let on = p.trains && epoch >= p.start_epoch;
            p.param.tensor().set_requires_grad(on);
            n += on as usize;
        }
        n
    }

    /// Sets which parameters record gradients from optimizer step `step` on (gradual unfreezing
    /// by steps): call it at every step boundary, after [`Plan::set_epoch`]. Without unfreezing
    /// by steps it changes nothing. Returns how many tensors train.
    pub fn set_step(&self, step: usize) -> usize {
        let by_steps = self.params.iter().any(|p| p.start_step > 0);
        let mut n = 0;
        for p in &self.params {
            if by_steps {
                let on = p.trains && step >= p.start_step;
                p.param.tensor().set_requires_grad(on);
            }
            n += p.param.is_trainable() as usize;
        }
        n
    }

    /// Number of parameter elements that train at some point / in total.
    pub fn counts(&self) -> (usize, usize) {
        let total = self.params.iter().map(|p| p.param.elem_count()).sum();
        let train = self
            .params
            .iter()
            .filter(|p| p.trains)
            .map(|p| p.param.elem_count())
            .sum();
        (train, total)
    }

    /// Per depth: `(lr_scale, start_epoch, trainable elements)`.
    pub fn groups(&self) -> BTreeMap<usize, (f64, usize, usize)> {
        let mut g = BTreeMap::new();
        for p in self.params.iter().filter(|p| p.trains) {
            let e = g.entry(p.depth).or_insert((p.lr_scale, p.start_epoch, 0));
            e.2 += p.param.elem_count();
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Rng, Tensor};
    use kiln_models::{BertConfig, BertForSequenceClassification};

    fn tiny() -> BertForSequenceClassification {
        let config = BertConfig::small(50, 8, 3, 2).labels(vec!["a".into(), "b".into()]);
        BertForSequenceClassification::new(&config, &mut Rng::new(0))
    }

    fn trains(plan: &Plan, name: &str) -> bool {
        plan.params.iter().find(|p| p.name == name).unwrap().trains
    }

    #[test]
    fn depth_groups_follow_the_layer_stack() {
        let m = tiny();
        let plan = Strategy::full().llrd(0.5).plan(&m).unwrap();
        assert_eq!(plan.layers, 3);
        let depth = |n: &str| plan.params.iter().find(|p| p.name == n).unwrap().depth;
        assert_eq!(depth("classifier.weight"), 0);
        assert_eq!(depth("bert.pooler.dense.weight"), 0);
        assert_eq!(depth("bert.encoder.layer.2.output.dense.weight"), 1);
        assert_eq!(depth("bert.encoder.layer.0.output.dense.weight"), 3);
        assert_eq!(depth("bert.embeddings.word_embeddings.weight"), 4);
        let scale = |n: &str| plan.params.iter().find(|p| p.name == n).unwrap().lr_scale;
        assert_eq!(scale("classifier.weight"), 1.0);
        assert_eq!(scale("bert.encoder.layer.0.output.dense.weight"), 0.125);
        assert_eq!(scale("bert.embeddings.LayerNorm.weight"), 0.0625);
        assert_eq!(plan.counts().0, plan.counts().1);
    }

    #[test]
    fn probe_bitfit_and_freezing() {
        let m = tiny();
        let probe = Strategy::linear_probe().plan(&m).unwrap();
        assert!(trains(&probe, "classifier.weight"));
        assert!(!trains(
            &probe,
            "bert.encoder.layer.1.attention.self.query.weight"
        ));
        assert!(!m.bert.embeddings.word_embeddings.weight.tracks_grad());
        let bitfit = Strategy::bitfit().plan(&m).unwrap();
        assert!(trains(
            &bitfit,
            "bert.encoder.layer.1.attention.self.query.bias"
        ));
        assert!(!trains(
            &bitfit,
            "bert.encoder.layer.1.attention.self.query.weight"
        ));
        let f = Strategy::full()
            .freeze("bert.embeddings.*")
            .freeze_layers(0..2)
            .plan(&m)
            .unwrap();
        assert!(!trains(&f, "bert.embeddings.word_embeddings.weight"));
        assert!(!trains(&f, "bert.encoder.layer.1.output.dense.weight"));
        assert!(trains(&f, "bert.encoder.layer.2.output.dense.weight"));
        let e = Strategy::full().freeze("nope.*").plan(&m).unwrap_err();
        assert!(e.to_string().contains("matches no parameter"), "{e}");
        assert!(Strategy::full().llrd(1.5).plan(&m).is_err());
    }

    #[test]
    fn gradual_unfreezing_opens_one_depth_per_period() {
        let m = tiny();
        let plan = Strategy::full().gradual_unfreeze(2).plan(&m).unwrap();
        let on = |n: &str| {
            m.named_parameters()
                .into_iter()
                .find(|(k, _)| k == n)
                .unwrap()
                .1
                .tracks_grad()
        };
        assert!(on("classifier.weight"));
        assert!(!on("bert.encoder.layer.2.output.dense.weight"));
        plan.set_epoch(2);
        assert!(on("bert.encoder.layer.2.output.dense.weight"));
        assert!(!on("bert.encoder.layer.1.output.dense.weight"));
        plan.set_epoch(8);
        assert!(on("bert.embeddings.word_embeddings.weight"));
        // Frozen parameters record no graph: no gradient reaches them.
        plan.set_epoch(0);
        let ids = Tensor::from_vec(vec![1i64, 2, 3], [1, 3]);
        let logits = m.forward(&ids, None, None);
        logits.sum_all().backward();
        assert!(m.classifier.weight.grad().is_some());
        assert!(m.bert.encoder.layer[0].output.dense.weight.grad().is_none());
    }

    #[test]
    fn gradual_unfreezing_by_steps_opens_one_depth_per_period() {
        let m = tiny();
        let plan = Strategy::full().gradual_unfreeze_steps(3).plan(&m).unwrap();
        let on = |n: &str| {
            m.named_parameters()
                .into_iter()
                .find(|(k, _)| k == n)
                .unwrap()
                .1
                .tracks_grad()
        };
        let head = "classifier.weight";
        let last = "bert.encoder.layer.2.output.dense.weight";
        let first = "bert.encoder.layer.0.output.dense.weight";
        let embed = "bert.embeddings.word_embeddings.weight";
        assert!(on(head) && !on(last) && !on(first) && !on(embed));
        // The epoch boundary changes nothing by itself when unfreezing goes by steps.
        plan.set_epoch(5);
        plan.set_step(2);
        assert!(on(head) && !on(last));
        plan.set_step(3);
        assert!(on(head) && on(last) && !on("bert.encoder.layer.1.output.dense.weight"));
        plan.set_step(9);
        assert!(on(first) && !on(embed));
        assert_eq!(plan.set_step(12), plan.params.len());
        assert!(on(embed));
        // Going back (a resumed run) freezes again.
        assert!(plan.set_step(0) < plan.params.len());
        assert!(!on(last));
    }

    #[test]
    fn unfreezing_by_epochs_and_by_steps_are_exclusive() {
        let m = tiny();
        let e = Strategy::full()
            .gradual_unfreeze(1)
            .gradual_unfreeze_steps(10)
            .plan(&m)
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("unfreeze_every = 1") && msg.contains("unfreeze_every_steps = 10"),
            "{msg}"
        );
        let t: toml::Table =
            toml::from_str("type = \"full\"\nunfreeze_every = 2\nunfreeze_every_steps = 5")
                .unwrap();
        let e = Strategy::from_toml(t).unwrap_err();
        assert!(
            e.to_string().contains("either by epochs or by steps"),
            "{e}"
        );
        let t: toml::Table = toml::from_str("unfreeze_every_steps = 0").unwrap();
        let e = Strategy::from_toml(t).unwrap_err();
        assert!(
            e.to_string().contains("strategy.unfreeze_every_steps"),
            "{e}"
        );
        let t: toml::Table = toml::from_str("unfreeze_every_steps = 50").unwrap();
        assert_eq!(
            Strategy::from_toml(t).unwrap(),
            Strategy::full().gradual_unfreeze_steps(50)
        );
    }

    #[test]
    fn strategies_parse_from_toml() {
        let t: toml::Table = toml::from_str(
            "type = \"full\"\nllrd = 0.9\nunfreeze_every = 1\nfreeze = [\"bert.embeddings.*\"]",
        )
        .unwrap();
        let s = Strategy::from_toml(t).unwrap();
        assert_eq!(
            s,
            Strategy::full()
                .llrd(0.9)
                .gradual_unfreeze(1)
                .freeze("bert.embeddings.*")
        );
        let t: toml::Table = toml::from_str("type = \"full\"\nrank = 3").unwrap();
        let e = Strategy::from_toml(t).unwrap_err();
        assert!(e.to_string().contains("strategy.rank"), "{e}");
        let t: toml::Table = toml::from_str("type = \"lora\"\nr = 4\nllrd = 0.8").unwrap();
        let s = Strategy::from_toml(t).unwrap();
        match &s.method {
            Method::Adapter { name, args } => {
                assert_eq!(name, "lora");
                assert_eq!(args.get("r").and_then(|v| v.as_integer()), Some(4));
                assert!(!args.contains_key("llrd"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.llrd, Some(0.8));
    }
}
