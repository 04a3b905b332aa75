//! Models and training setups written in TOML: `[[layer]]` tables, and optional `[loss]`,
//! `[optimizer]` and `[scheduler]` tables, each with a `type` naming a registered constructor.

use super::{registry, BuildContext, Registry};
use crate::error::NnError;
use crate::layers::{Layer, Sequential};
use crate::loss::Loss;
use crate::module::ModuleExt;
use crate::optim::Optimizer;
use crate::scheduler::Scheduler;
use std::path::Path;

/// Top-level keys a spec may have.
const TOP_KEYS: [&str; 5] = ["seed", "layer", "loss", "optimizer", "scheduler"];

/// One item of a spec: the registered name (`type`) and the rest of its table.
#[derive(Clone, Debug, PartialEq)]
pub struct ComponentSpec {
    /// The `type` key: a registered name.
    pub type_name: String,
    /// Every other key of the table: the constructor's arguments.
    pub args: toml::Table,
}

impl ComponentSpec {
    fn parse(value: toml::Value, what: &str) -> Result<Self, NnError> {
        let toml::Value::Table(mut args) = value else {
            return Err(NnError::Args {
                what: what.to_string(),
                message: format!("expected a table, got {}", value.type_str()),
            });
        };
        let type_name = match args.remove("type") {
            Some(toml::Value::String(s)) => s,
            Some(other) => {
                return Err(NnError::Args {
                    what: what.to_string(),
                    message: format!(
                        "`type` must be a string (a registered name), got {}",
                        other.type_str()
                    ),
                })
            }
            None => {
                return Err(NnError::Args {
                    what: what.to_string(),
                    message: "missing `type` (the registered name to build)".into(),
                })
            }
        };
        Ok(ComponentSpec { type_name, args })
    }
}

/// A parsed model / training file: `seed` (default 0), the `[[layer]]` tables in order, and the
/// optional `[loss]`, `[optimizer]` and `[scheduler]` tables.
///
/// ```toml
/// seed = 42
///
/// [[layer]]
/// type = "linear"
/// in = 4
/// out = 16
///
/// [[layer]]
/// type = "relu"
///
/// [loss]
/// type = "mse"
///
/// [optimizer]
/// type = "adam"
/// lr = 1e-2
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSpec {
    /// Seed of the generator the layers are initialised from.
    pub seed: u64,
    /// The layers, in order.
    pub layers: Vec<ComponentSpec>,
    /// The loss, if given.
    pub loss: Option<ComponentSpec>,
    /// The optimizer, if given.
    pub optimizer: Option<ComponentSpec>,
    /// The scheduler, if given.
    pub scheduler: Option<ComponentSpec>,
}

/// Everything a [`TrainSpec`] builds.
pub struct Training {
    /// The model.
    pub model: Sequential,
    /// The loss.
    pub loss: Box<dyn Loss>,
    /// The optimizer over the model's trainable parameters.
    pub optimizer: Box<dyn Optimizer>,
    /// The scheduler driving the optimizer, if the spec has one.
    pub scheduler: Option<Box<dyn Scheduler>>,
}

/// Line and column (1-based, in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

impl TrainSpec {
    /// Parses a spec from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, NnError> {
        Self::parse(text, "<string>")
    }

    /// Reads and parses a spec file; errors name the path (and the line and column of a TOML
    /// syntax error).
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, NnError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| NnError::File(path.display().to_string(), e.to_string()))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, origin: &str) -> Result<Self, NnError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            NnError::Toml {
                origin: origin.to_string(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        let spec_err = |message: String| NnError::Args {
            what: origin.to_string(),
            message,
        };
        if let Some(bad) = doc.keys().find(|k| !TOP_KEYS.contains(&k.as_str())) {
            return Err(spec_err(format!(
                "unknown top-level key `{bad}`, expected one of `seed`, `layer` ([[layer]] tables), `loss`, `optimizer`, `scheduler`"
            )));
        }
        let seed = match doc.remove("seed") {
            None => 0,
            Some(toml::Value::Integer(s)) if s >= 0 => s as u64,
            Some(other) => {
                return Err(spec_err(format!(
                    "`seed` must be a non-negative integer, got {other}"
                )))
            }
        };
        let layers = match doc.remove("layer") {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| ComponentSpec::parse(v, &format!("layer {i}")))
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(spec_err(format!(
                    "`layer` must be an array of tables ([[layer]]), got {}",
                    other.type_str()
                )))
            }
        };
        let mut part = |key: &str| {
            doc.remove(key)
                .map(|v| ComponentSpec::parse(v, &format!("[{key}]")))
                .transpose()
        };
        Ok(TrainSpec {
            seed,
            layers,
            loss: part("loss")?,
            optimizer: part("optimizer")?,
            scheduler: part("scheduler")?,
        })
    }

    /// Builds the model through the global [`registry()`].
    pub fn build_model(&self) -> Result<Sequential, NnError> {
        registry().build_model(self)
    }

    /// Builds the model, loss, optimizer and scheduler through the global [`registry()`].
    pub fn build(&self) -> Result<Training, NnError> {
        registry().build_training(self)
    }
}

impl Registry {
    /// Builds the `[[layer]]`s of `spec` into a [`Sequential`], initialising them in order from
    /// one generator seeded with `spec.seed`. Errors name the layer's index and type.
    pub fn build_model(&self, spec: &TrainSpec) -> Result<Sequential, NnError> {
        if spec.layers.is_empty() {
            return Err(NnError::Args {
                what: "model".into(),
                message: "no [[layer]] tables: a model needs at least one layer".into(),
            });
        }
        let mut ctx = BuildContext::new(spec.seed);
        let mut layers: Vec<Box<dyn Layer>> = Vec::with_capacity(spec.layers.len());
        for (i, l) in spec.layers.iter().enumerate() {
            ctx.index = i;
            let what = format!("layer {i} (`{}`)", l.type_name);
            let built = self
                .build_layer_as(&l.type_name, l.args.clone(), &mut ctx, &what)
                .map_err(|e| match e {
                    e @ NnError::UnknownName { .. } => NnError::Args {
                        what: format!("layer {i}"),
                        message: e.to_string(),
                    },
                    other => other,
                })?;
            layers.push(built);
        }
        Ok(Sequential::from_layers(layers))
    }

    /// Parses TOML text and builds its `[[layer]]`s (see [`Registry::build_model`]).
    pub fn build_sequential(&self, text: &str) -> Result<Sequential, NnError> {
        self.build_model(&TrainSpec::from_toml(text)?)
    }

    /// Builds everything in `spec`: the model, the loss, the optimizer over the model's
    /// trainable parameters (by name) and the scheduler (if any). `[loss]` and `[optimizer]`
    /// are required.
    pub fn build_training(&self, spec: &TrainSpec) -> Result<Training, NnError> {
        let missing = |key: &str| NnError::Args {
            what: "training spec".into(),
            message: format!("missing [{key}] table"),
        };
        let model = self.build_model(spec)?;
        let loss_spec = spec.loss.as_ref().ok_or_else(|| missing("loss"))?;
        let loss = self.build_loss(&loss_spec.type_name, loss_spec.args.clone())?;
        let opt_spec = spec
            .optimizer
            .as_ref()
            .ok_or_else(|| missing("optimizer"))?;
        let params = model
            .named_parameters()
            .into_iter()
            .filter(|(_, p)| p.is_trainable())
            .collect();
        let optimizer = self.build_optimizer(&opt_spec.type_name, opt_spec.args.clone(), params)?;
        let scheduler = spec
            .scheduler
            .as_ref()
            .map(|s| self.build_scheduler(&s.type_name, s.args.clone(), optimizer.as_ref()))
            .transpose()?;
        Ok(Training {
            model,
            loss,
            optimizer,
            scheduler,
        })
    }
}

impl Sequential {
    /// Builds a model from TOML `[[layer]]` tables (and an optional `seed`) through the global
    /// [`registry()`]; `[loss]`/`[optimizer]`/`[scheduler]` tables are allowed and ignored.
    pub fn from_toml(text: &str) -> Result<Sequential, NnError> {
        TrainSpec::from_toml(text)?.build_model()
    }

    /// Reads a TOML file and builds its model (see [`Sequential::from_toml`]).
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Sequential, NnError> {
        TrainSpec::from_toml_file(path)?.build_model()
    }
}
