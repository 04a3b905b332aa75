//! kiln-data: reading data files and feeding them to models.
//!
//! - [`read_idx`] / [`read_csv`]: IDX (MNIST's format) and numeric CSV tables, gzipped or not,
//!   with errors that name the file, line and column.
//! - [`datasets`]: MNIST 5k and Fashion-MNIST from the local cache (`scripts/fetch_data.sh`).
//! - [`TensorDataset`], [`DataLoader`], [`Normalize`]: seeded splits, shuffled mini-batches
//!   `(x, y)`, standardisation.

pub mod csv;
pub mod dataset;
pub mod datasets;
pub mod error;
pub mod file;
pub mod idx;
pub mod loader;
#[cfg(feature = "progress")]
pub mod progress;

pub use csv::{read_csv, CsvOptions, CsvTable, LabelColumn};
pub use dataset::{Normalize, TensorDataset};
pub use datasets::{Source, Split};
pub use error::DataError;
pub use file::read_file;
pub use idx::{read_idx, IdxArray, IdxData, ImageLayout};
pub use loader::{Batches, DataLoader};
