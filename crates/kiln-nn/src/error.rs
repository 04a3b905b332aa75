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
    /// A name looked up in the [`Registry`](crate::registry::Registry) is not registered.
    #[error("unknown {kind} `{name}`{}; known {}: {}", did_you_mean(.suggestion), plural(.kind), .known.join(", "))]
    UnknownName {
        /// What was looked up: `layer`, `loss`, `optimizer` or `scheduler`.
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// The closest registered name, if one is close.
        suggestion: Option<String>,
        /// Every registered name of that kind (without aliases), sorted.
        known: Vec<String>,
    },
    /// A registered constructor got missing, unknown or invalid arguments.
    #[error("{what}: {message}")]
    Args {
        /// Which item: `layer 2 (`linear`)`, `optimizer `adam``, ...
        what: String,
        /// What was wrong (serde's message, or the constructor's error).
        message: String,
    },
    /// A TOML document could not be parsed.
    #[error("{origin}:{line}:{column}: invalid TOML: {message}")]
    Toml {
        /// The file path, or `<string>`.
        origin: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error (in characters).
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A name was registered twice.
    #[error("{kind} `{name}` is already registered (as `{existing}`); use `replace_{kind}` to override it")]
    Duplicate {
        /// `layer`, `loss`, `optimizer` or `scheduler`.
        kind: &'static str,
        /// The name being registered.
        name: String,
        /// The registered name it collides with (names match ignoring case, `_` and `-`).
        existing: String,
    },
}

fn plural(kind: &str) -> String {
    if kind.ends_with('s') {
        format!("{kind}es")
    } else {
        format!("{kind}s")
    }
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}
