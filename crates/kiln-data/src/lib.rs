//! kiln-data: reading data files and feeding them to models.
//!
//! - [`read_idx`] / [`read_csv`]: IDX (MNIST's format) and numeric CSV tables, gzipped or not,
//!   with errors that name the file, line and column.
//! - [`datasets`]: MNIST 5k and Fashion-MNIST from the local cache (`scripts/fetch_data.sh`).
//! - [`TensorDataset`], [`DataLoader`], [`Normalize`]: seeded splits, shuffled mini-batches
//!   `(x, y)`, standardisation.
//! - [`Tokenizer`], [`ChatTemplate`]: HF `tokenizer.json`, GPT-2 byte-level BPE, GGUF BPE
//!   vocabularies; batch encoding into `[B, L]` tensors; chat templates.

pub mod csv;
pub mod dataset;
pub mod datasets;
pub mod error;
pub mod file;
pub mod idx;
pub mod loader;
#[cfg(feature = "progress")]
pub mod progress;
pub mod tokenizer;

pub use csv::{read_csv, CsvOptions, CsvTable, LabelColumn};
pub use dataset::{Normalize, TensorDataset};
pub use datasets::{Source, Split};
pub use error::DataError;
pub use file::read_file;
pub use idx::{read_idx, IdxArray, IdxData, ImageLayout};
pub use loader::{Batches, DataLoader};
pub use tokenizer::{
    BatchEncoding, BpeVocab, ChatMessage, ChatTemplate, EncodeOptions, Encoding, PadSide, Padding,
    PreTokenizerKind, SpecialTokens, TokenType, Tokenizer,
};
