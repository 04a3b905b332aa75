//! kiln-io: checkpoint formats. Memory-mapped safetensors (single files, sharded checkpoints,
//! directories), GGUF v2/v3 with ggml dequantisation, and PyTorch checkpoints (zip and legacy
//! pickle containers) through a restricted unpickler.
//!
//! Every reader is fuzz-safe: a truncated, corrupt or hostile file is an [`IoError`] naming the
//! file and what is wrong; counts, lengths and offsets are checked against the file size with
//! checked arithmetic before anything is allocated or sliced.

pub mod error;
pub mod gguf;
pub mod quant;
pub mod safetensors;
pub mod torch;

pub use error::{IoError, Result};
pub use gguf::{GgufArray, GgufFile, GgufTensorInfo, GgufValue};
pub use quant::{dequantize, GgmlType, UnsupportedType};
pub use safetensors::{
    load_safetensors_dir, load_sharded, save, save_with_metadata, SafeDtype, SafetensorsFile,
    TensorInfo,
};
pub use torch::load_torch;
