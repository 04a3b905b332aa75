//! The registry of fine-tuning methods: a name (`"lora"`) → a function that applies the method
//! to a model, given its arguments as a TOML table. The Trainer and the `kiln` command look
//! methods up here by name, so a method a user registers is used exactly like a built-in one.
//!
//! ```
//! use kiln_core::Rng;
//! use kiln_nn::{Linear, Module, ModuleExt};
//! use kiln_tune::method::methods;
//!
//! #[derive(Module)]
//! struct Net {
//!     query: Linear,
//!     value: Linear,
//! }
//! let mut rng = Rng::new(0);
//! let net = Net { query: Linear::new(4, 4, &mut rng), value: Linear::new(4, 4, &mut rng) };
//! let args: toml::Table = toml::from_str("r = 2\ntarget_modules = [\"query\"]").unwrap();
//! methods().apply("LoRA", &net, args).unwrap();
//! assert_eq!(net.num_trainable_parameters(), 2 * 4 + 4 * 2);
//!
//! // A user's own method: train only the biases (BitFit).
//! methods()
//!     .register("doc_bitfit", |model, _args| {
//!         model.freeze("*")?;
//!         model.unfreeze("*.bias")?;
//!         Ok(())
//!     })
//!     .unwrap();
//! methods().apply("doc-bitfit", &net, toml::Table::new()).unwrap();
//! assert_eq!(net.num_trainable_parameters(), 8);
//! ```

use crate::error::{Result, TuneError};
use crate::lora::{apply_lora, LoraConfig};
use kiln_nn::Module;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};

/// A fine-tuning method: prepares `model` in place (attaches adapters, freezes parameters)
/// from its arguments.
pub type MethodFn = Arc<dyn Fn(&dyn Module, toml::Table) -> Result<()> + Send + Sync>;

/// Names → fine-tuning methods. Names match ignoring case, `_` and `-` (as kiln-nn's registry).
pub struct Methods {
    map: RwLock<BTreeMap<String, (String, MethodFn)>>,
}

fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The process-wide method registry, with the built-ins (`lora`) registered.
pub fn methods() -> &'static Methods {
    static METHODS: OnceLock<Methods> = OnceLock::new();
    METHODS.get_or_init(Methods::with_builtins)
}

impl Methods {
    /// An empty registry.
    pub fn new() -> Self {
        Methods {
            map: RwLock::new(BTreeMap::new()),
        }
    }

    /// A registry with the built-in methods: `lora` (arguments: the fields of [`LoraConfig`]).
    pub fn with_builtins() -> Self {
        let m = Methods::new();
        m.register("lora", |model, args| {
            let config = LoraConfig::from_toml_table(args)?;
            apply_lora(model, &config).map(|_| ())
        })
        .expect("built-in names are distinct");
        m
    }

    /// Registers `f` under `name`; an error when the name (ignoring case, `_`, `-`) is taken.
    pub fn register<F>(&self, name: &str, f: F) -> Result<()>
    where
        F: Fn(&dyn Module, toml::Table) -> Result<()> + Send + Sync + 'static,
    {
        let key = normalize(name);
        if key.is_empty() {
            return Err(TuneError::config("method name", "must not be empty"));
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if let Some((existing, _)) = map.get(&key) {
            return Err(TuneError::config(
                "method name",
                format!("`{name}` is already registered (as `{existing}`); use `replace` to override it"),
            ));
        }
        map.insert(key, (name.to_string(), Arc::new(f)));
        Ok(())
    }

    /// Registers `f` under `name`, replacing any method of that name.
    pub fn replace<F>(&self, name: &str, f: F)
    where
        F: Fn(&dyn Module, toml::Table) -> Result<()> + Send + Sync + 'static,
    {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.insert(normalize(name), (name.to_string(), Arc::new(f)));
    }

    /// The method registered as `name`; an error listing the known names otherwise.
    pub fn get(&self, name: &str) -> Result<MethodFn> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(&normalize(name))
            .map(|(_, f)| f.clone())
            .ok_or_else(|| {
                let known: Vec<&str> = map.values().map(|(n, _)| n.as_str()).collect();
                TuneError::config(
                    "fine-tuning method",
                    format!(
                        "unknown method `{name}`; known methods: {}",
                        known.join(", ")
                    ),
                )
            })
    }

    /// Applies the method `name` to `model` with `args`; errors name the method.
    pub fn apply(&self, name: &str, model: &dyn Module, args: toml::Table) -> Result<()> {
        let f = self.get(name)?;
        f(model, args).map_err(|e| match e {
            TuneError::Config { what, message } => {
                TuneError::config(format!("method `{name}`: {what}"), message)
            }
            other => other,
        })
    }

    /// The registered names (as registered), sorted by normalised name.
    pub fn names(&self) -> Vec<String> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.values().map(|(n, _)| n.clone()).collect()
    }
}

impl Default for Methods {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Rng;
    use kiln_nn::{Linear, ModuleExt};

    #[derive(Module)]
    struct Net {
        query: Linear,
        classifier: Linear,
    }

    fn net() -> Net {
        let mut rng = Rng::new(1);
        Net {
            query: Linear::new(4, 4, &mut rng),
            classifier: Linear::new(4, 2, &mut rng),
        }
    }

    #[test]
    fn builtin_lora_by_name_and_errors() {
        let m = Methods::with_builtins();
        assert_eq!(m.names(), ["lora"]);
        let n = net();
        let args: toml::Table = toml::from_str(
            "r = 2\nalpha = 4\ntarget_modules = [\"query\"]\nmodules_to_save = [\"classifier\"]",
        )
        .unwrap();
        m.apply("LORA", &n, args).unwrap();
        assert_eq!(n.num_trainable_parameters(), 2 * 4 + 4 * 2 + 4 * 2 + 2);
        assert!(crate::lora::lora_layers(&n)[0].1.scaling() == 2.0);

        let err = m
            .apply("lora", &net(), toml::from_str("rank = 2").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("method `lora`") && err.contains("unknown field `rank`"),
            "{err}"
        );
        let err = m
            .apply(
                "lora",
                &net(),
                toml::from_str("target_modules = [\"nope\"]").unwrap(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("`nope` matches no Linear layer"), "{err}");
        let err = m
            .apply("dora", &net(), toml::Table::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown method `dora`; known methods: lora"),
            "{err}"
        );
    }

    #[test]
    fn user_methods_register_replace_and_collide() {
        let m = Methods::new();
        m.register("freeze_all", |model, _| {
            model.freeze("*")?;
            Ok(())
        })
        .unwrap();
        let err = m
            .register("Freeze-All", |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("already registered (as `freeze_all`)"),
            "{err}"
        );
        let n = net();
        m.apply("freezeall", &n, toml::Table::new()).unwrap();
        assert_eq!(n.num_trainable_parameters(), 0);
        m.replace("freeze_all", |model, _| {
            model.unfreeze("*")?;
            Ok(())
        });
        m.apply("freeze_all", &n, toml::Table::new()).unwrap();
        assert_eq!(n.num_trainable_parameters(), n.num_parameters());
        assert!(m.register("", |_, _| Ok(())).is_err());
    }
}
