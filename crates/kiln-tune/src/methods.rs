//! Fine-tuning methods by name: the plugin point for parameter-efficient methods. A method gets
//! the model and its TOML arguments, changes the model (e.g. attaches adapters) and leaves
//! trainable exactly the parameters it wants trained; a [`crate::Strategy`] naming it (from Rust,
//! a recipe or the CLI) then uses it like a built-in one.
//!
//! ```
//! use kiln_tune::methods;
//! // A method that trains only the layer norms.
//! methods::register("norms_only", |model, _args| {
//!     use kiln_nn::ModuleExt;
//!     model.freeze("*")?;
//!     model.unfreeze("*LayerNorm*")?;
//!     Ok(())
//! })
//! .unwrap();
//! assert!(methods::names().contains(&"norms_only".to_string()));
//! ```

use crate::error::{Result, TuneError};
use kiln_nn::Module;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};

/// A method's constructor: applies the method to the model with its arguments.
pub type MethodFn = Arc<dyn Fn(&dyn Module, &toml::Table) -> Result<()> + Send + Sync>;

fn table() -> &'static RwLock<BTreeMap<String, MethodFn>> {
    static T: OnceLock<RwLock<BTreeMap<String, MethodFn>>> = OnceLock::new();
    T.get_or_init(|| RwLock::new(crate::builtin_methods()))
}

/// Registers `f` as method `name`; a name already taken is an error.
pub fn register(
    name: &str,
    f: impl Fn(&dyn Module, &toml::Table) -> Result<()> + Send + Sync + 'static,
) -> Result<()> {
    let mut t = table().write().unwrap_or_else(|e| e.into_inner());
    if t.contains_key(name) {
        return Err(TuneError::config(
            "method",
            format!("a fine-tuning method named `{name}` is already registered"),
        ));
    }
    t.insert(name.to_string(), Arc::new(f));
    Ok(())
}

/// The registered method names, sorted.
pub fn names() -> Vec<String> {
    let t = table().read().unwrap_or_else(|e| e.into_inner());
    t.keys().cloned().collect()
}

/// Applies method `name` to `model`.
pub fn apply(name: &str, model: &dyn Module, args: &toml::Table) -> Result<()> {
    let f = {
        let t = table().read().unwrap_or_else(|e| e.into_inner());
        t.get(name).cloned().ok_or_else(|| {
            TuneError::config(
                "strategy.type",
                format!(
                    "unknown fine-tuning method `{name}` (built in: full, linear_probe, bitfit; \
                     registered: {})",
                    t.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })?
    };
    f(model, args)
}
