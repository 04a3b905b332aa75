//! Errors of kiln-models: everything read from checkpoint directories and configs.

use std::path::PathBuf;

/// An error loading, remapping or saving a pretrained model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the model needs is not there.
    #[error("{}: file not found ({what})", .path.display())]
    MissingFile {
        /// The path looked for.
        path: PathBuf,
        /// What the file is for.
        what: &'static str,
    },
    /// A file could not be read or written.
    #[error("{}: {message}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS or format error.
        message: String,
    },
    /// A config file is not valid JSON or not a JSON object.
    #[error("{origin}: invalid JSON: {message}")]
    Json {
        /// The file path, or `<string>`.
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// A config field is missing, has the wrong type or an unsupported value.
    #[error("{origin}: field `{field}`: {message}")]
    ConfigField {
        /// The file path, or `<string>`.
        origin: String,
        /// The field's name.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The config describes another architecture.
    #[error("{origin}: field `model_type` is \"{found}\", expected \"{expected}\"")]
    WrongModelType {
        /// The file path, or `<string>`.
        origin: String,
        /// The `model_type` found.
        found: String,
        /// The `model_type` this model loads.
        expected: &'static str,
    },
    /// A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors.
    #[error("{}: checkpoint does not fit {model}: {message}", .path.display())]
    Checkpoint {
        /// The checkpoint file (or `<state dict>`).
        path: PathBuf,
        /// The model type being loaded.
        model: &'static str,
        /// The names (and shapes) that do not fit.
        message: String,
    },
    /// A key-remapping rule could not be applied (e.g. a split whose sizes do not add up).
    #[error("key map: {0}")]
    Remap(String),
    /// An error from kiln-nn (state dicts, safetensors files).
    #[error(transparent)]
    Nn(#[from] kiln_nn::NnError),
}
