//! `IoError`: everything that can go wrong reading or writing a checkpoint. Every message
//! starts with the file's path.

use std::path::{Path, PathBuf};

/// An error from opening, parsing or converting a checkpoint file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The file could not be opened, read, mapped or written.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("cannot open", "cannot map").
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file's structure is invalid: truncated, corrupt, or out of bounds.
    #[error("{}: invalid {format} file: {msg}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The format: `safetensors`, `GGUF` or `safetensors index`.
        format: &'static str,
        /// What is wrong, e.g. "tensor 'x': data span 123..456 exceeds file size 400".
        msg: String,
    },
    /// The file is well formed but uses something kiln does not support (a GGUF version, a
    /// dtype or quantisation type it cannot convert).
    #[error("{}: {msg}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported, e.g. "GGUF version 4 not supported (2 or 3)".
        msg: String,
    },
    /// A metadata key asked for is not in the file.
    #[error("{}: metadata key '{key}' missing", path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A metadata key holds a value of another type than asked for.
    #[error("{}: metadata key '{key}' has type {found}, expected {expected}", path.display())]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The type stored in the file.
        found: String,
        /// The type asked for.
        expected: &'static str,
    },
    /// A tensor asked for is not in the file.
    #[error("{}: no tensor named '{name}'", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A pickle in the file names a Python global outside the tensor-rebuild allow-list: loading
    /// it with `pickle` would run arbitrary code (or build objects kiln does not load).
    #[error("{}: global '{global}' is not allowed in a weights file (only tensor-rebuild globals are)", path.display())]
    ForbiddenGlobal {
        /// The file.
        path: PathBuf,
        /// The global as `module.name`, e.g. `os.system`.
        global: String,
    },
    /// Writing through kiln-nn's safetensors writer failed.
    #[error("{}: {source}", path.display())]
    Save {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: kiln_nn::NnError,
    },
}

impl IoError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            IoError::Io { path, .. }
            | IoError::Format { path, .. }
            | IoError::Unsupported { path, .. }
            | IoError::MissingKey { path, .. }
            | IoError::WrongType { path, .. }
            | IoError::MissingTensor { path, .. }
            | IoError::ForbiddenGlobal { path, .. }
            | IoError::Save { path, .. } => path,
        }
    }

    pub(crate) fn io(path: &Path, what: &'static str, source: std::io::Error) -> Self {
        IoError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }

    pub(crate) fn format(path: &Path, format: &'static str, msg: impl Into<String>) -> Self {
        IoError::Format {
            path: path.to_path_buf(),
            format,
            msg: msg.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, msg: impl Into<String>) -> Self {
        IoError::Unsupported {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn missing_tensor(path: &Path, name: &str) -> Self {
        IoError::MissingTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
        }
    }
}

/// `Result` with [`IoError`].
pub type Result<T> = std::result::Result<T, IoError>;

/// Maps a file read-only. Files shorter than `min_len` are rejected before mapping (an empty
/// mapping is not portable), naming `format` and the size.
pub(crate) fn map_file(path: &Path, format: &'static str, min_len: u64) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| IoError::io(path, "cannot open", e))?;
    let len = file
        .metadata()
        .map_err(|e| IoError::io(path, "cannot stat", e))?
        .len();
    if len < min_len {
        return Err(IoError::format(
            path,
            format,
            format!("file size {len} is smaller than the {min_len}-byte header"),
        ));
    }
    // SAFETY: the mapping is read-only and private to this process; as with every mmap-based
    // reader, the file must not be truncated or rewritten while it is open (documented on the
    // readers). All reads go through bounds-checked slices of the mapping.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| IoError::io(path, "cannot map", e))
}
