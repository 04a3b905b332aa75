//! `DataError`: everything that can go wrong reading a data file or fetching a dataset.

use std::path::PathBuf;

/// An error from reading, parsing or fetching data. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read (or its gzip stream is corrupt).
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("cannot open", "cannot read", "corrupt gzip stream").
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file (after decompression) holds no bytes.
    #[error("{path}: file is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// An IDX file whose header or payload is malformed.
    #[error("{path}: invalid IDX file: {msg}")]
    Idx {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A CSV cell or row that cannot be read (line and column are 1-based).
    #[error("{path}:{line}: column {column}: {msg}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// 1-based line number in the (decompressed) file.
        line: usize,
        /// 1-based column number.
        column: usize,
        /// What is wrong.
        msg: String,
    },
    /// The file parsed, but its contents are not what the dataset expects.
    #[error("{path}: {msg}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A dataset file is missing from the cache directory.
    #[error("{path} not found: run `{command}` to download {dataset} (or set KILN_DATA_DIR to a directory that holds it)")]
    Missing {
        /// The missing file.
        path: PathBuf,
        /// The dataset's name.
        dataset: &'static str,
        /// The command that fetches it.
        command: String,
    },
    /// The fetch script could not be found, started, or it failed.
    #[error("fetching {dataset}: {msg}")]
    Fetch {
        /// The dataset's name.
        dataset: &'static str,
        /// What went wrong.
        msg: String,
    },
    /// A tokenizer file or vocabulary that cannot be used, or an input it cannot encode.
    #[error("{origin}: {msg}")]
    Tokenizer {
        /// Where the tokenizer came from: a file path, or a description such as "BPE vocabulary".
        origin: String,
        /// What is wrong.
        msg: String,
    },
    /// A chat template that does not compile, or that fails while rendering.
    #[error("chat template: {msg}")]
    ChatTemplate {
        /// What is wrong (minijinja's message, with line information).
        msg: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, what: &'static str, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            what,
            source,
        }
    }

    pub(crate) fn idx(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        DataError::Idx {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        DataError::Invalid {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// `Result` with [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;
