//! Errors of kiln-nn: everything that meets the outside world (files, names, patterns, configs).

/// An error from a module, state dict, file or configuration.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// A state dict did not fit the module (missing/unexpected keys, shape mismatches).
    #[error("state dict does not fit the module: {0}")]
    StateDict(String),
    /// A parameter-name pattern was invalid or matched nothing.
    #[error("parameter pattern `{0}`: {1}")]
    Pattern(String, String),
    /// A file could not be read or written, or its contents were invalid.
    #[error("{0}: {1}")]
    File(String, String),
    /// A configuration value was invalid.
    #[error("config: {0}")]
    Config(String),
}
