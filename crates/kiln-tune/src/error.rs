//! Errors of fine-tuning: bad data, bad recipes, checkpoint I/O.

use thiserror::Error;

/// Everything that can go wrong while preparing data, building a strategy or training.
#[derive(Debug, Error)]
pub enum TuneError {
    /// A data file is unusable: the file, the line (1-based, 0 when not about one line) and why.
    #[error("{file}:{line}: {message}")]
    Data {
        /// The file.
        file: String,
        /// 1-based line, 0 when the problem is not about one line.
        line: usize,
        /// What was wrong.
        message: String,
    },
    /// A configuration value is invalid: which one and why.
    #[error("invalid {what}: {message}")]
    Config {
        /// The option or recipe key.
        what: String,
        /// What was expected.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        message: String,
    },
    /// An error from a layer, optimizer or scheduler.
    #[error(transparent)]
    Nn(#[from] kiln_nn::NnError),
    /// An error from loading or saving a model.
    #[error(transparent)]
    Model(#[from] kiln_models::ModelError),
    /// An error from the data layer (tokenizer, CSV).
    #[error(transparent)]
    DataLayer(#[from] kiln_data::DataError),
}

impl TuneError {
    /// A configuration error about `what`.
    pub fn config(what: impl Into<String>, message: impl Into<String>) -> Self {
        TuneError::Config {
            what: what.into(),
            message: message.into(),
        }
    }

    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<std::path::Path>, err: impl std::fmt::Display) -> Self {
        TuneError::Io {
            path: path.as_ref().display().to_string(),
            message: err.to_string(),
        }
    }
}

/// Result with [`TuneError`].
pub type Result<T, E = TuneError> = std::result::Result<T, E>;
