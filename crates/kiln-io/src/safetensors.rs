//! Memory-mapped safetensors reading: single files, sharded checkpoints
//! (`model.safetensors.index.json`), directories; saving goes through kiln-nn's writer.
//!
//! The header is validated completely at open: its length (within the file, at most 100 MiB),
//! every dtype, every shape (element count × dtype size equals the byte span, with checked
//! arithmetic), every span (inside the data region, no two overlapping). Tensor bytes are read
//! from the mapping only when asked for. The file must not be truncated or rewritten while open.

use crate::error::{map_file, IoError, Result};
use crate::quant::{dequantize, GgmlType};
use kiln_core::alloc::Buffer;
use kiln_core::Tensor;
use kiln_nn::module::StateDict;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

const FORMAT: &str = "safetensors";
const INDEX_FORMAT: &str = "safetensors index";

/// Largest header (and index file) accepted: 100 MiB.
pub const MAX_HEADER_LEN: u64 = 100 << 20;

/// A safetensors element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SafeDtype {
    /// Booleans, one byte each (loaded as I64 0/1).
    Bool,
    /// u8 (loaded as I64).
    U8,
    /// i8 (loaded as I64).
    I8,
    /// i16 (loaded as I64).
    I16,
    /// u16 (loaded as I64).
    U16,
    /// IEEE half (loaded as F32).
    F16,
    /// bfloat16 (loaded as F32).
    BF16,
    /// i32 (loaded as I64).
    I32,
    /// u32 (loaded as U32).
    U32,
    /// f32.
    F32,
    /// f64.
    F64,
    /// i64.
    I64,
    /// u64 (loaded as I64; values above `i64::MAX` are an error).
    U64,
    /// 8-bit float e4m3 (not loadable).
    F8E4M3,
    /// 8-bit float e5m2 (not loadable).
    F8E5M2,
}

impl SafeDtype {
    /// The dtype named `s` in a header (`"F32"`, `"BF16"`, ...).
    pub fn from_name(s: &str) -> Option<SafeDtype> {
        use SafeDtype::*;
        Some(match s {
            "BOOL" => Bool,
            "U8" => U8,
            "I8" => I8,
            "I16" => I16,
            "U16" => U16,
            "F16" => F16,
            "BF16" => BF16,
            "I32" => I32,
            "U32" => U32,
            "F32" => F32,
            "F64" => F64,
            "I64" => I64,
            "U64" => U64,
            "F8_E4M3" => F8E4M3,
            "F8_E5M2" => F8E5M2,
            _ => return None,
        })
    }

    /// The header name.
    pub fn name(self) -> &'static str {
        use SafeDtype::*;
        match self {
            Bool => "BOOL",
            U8 => "U8",
            I8 => "I8",
            I16 => "I16",
            U16 => "U16",
            F16 => "F16",
            BF16 => "BF16",
            I32 => "I32",
            U32 => "U32",
            F32 => "F32",
            F64 => "F64",
            I64 => "I64",
            U64 => "U64",
            F8E4M3 => "F8_E4M3",
            F8E5M2 => "F8_E5M2",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        use SafeDtype::*;
        match self {
            Bool | U8 | I8 | F8E4M3 | F8E5M2 => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 => 4,
            F64 | I64 | U64 => 8,
        }
    }
}

impl std::fmt::Display for SafeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dtype, shape and byte span (relative to the data region) of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type in the file.
    pub dtype: SafeDtype,
    /// Shape (row-major, as PyTorch).
    pub shape: Vec<usize>,
    /// `[begin, end)` byte offsets into the data region.
    pub data_offsets: (usize, usize),
}

/// An open, validated, memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Maps `path` and validates its header (see the module docs).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let err = |msg: String| IoError::format(path, FORMAT, msg);
        let mmap = map_file(path, FORMAT, 8)?;
        let file_len = mmap.len() as u64;
        let n = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes checked"));
        if n > MAX_HEADER_LEN {
            return Err(err(format!(
                "header length {n} exceeds the {MAX_HEADER_LEN}-byte limit"
            )));
        }
        if n > file_len - 8 {
            return Err(err(format!(
                "header length {n} exceeds file size {file_len} (less the 8-byte length)"
            )));
        }
        // n <= MAX_HEADER_LEN and <= file length: both fit in usize.
        let data_start = 8 + n as usize;
        let data_len = mmap.len() - data_start;
        let header = std::str::from_utf8(&mmap[8..data_start])
            .map_err(|e| err(format!("header is not UTF-8: {e}")))?;
        let json: serde_json::Value = serde_json::from_str(header)
            .map_err(|e| err(format!("header is not valid JSON: {e}")))?;
        let serde_json::Value::Object(entries) = json else {
            return Err(err("header is not a JSON object".into()));
        };
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, v) in entries {
            if name == "__metadata__" {
                let serde_json::Value::Object(m) = v else {
                    return Err(err("__metadata__ is not an object".into()));
                };
                for (k, v) in m {
                    let serde_json::Value::String(s) = v else {
                        return Err(err(format!("__metadata__ value of '{k}' is not a string")));
                    };
                    metadata.insert(k, s);
                }
                continue;
            }
            let info = parse_entry(&name, &v, data_len).map_err(err)?;
            tensors.insert(name, info);
        }
        let mut spans: Vec<(&str, (usize, usize))> = tensors
            .iter()
            .map(|(n, i)| (n.as_str(), i.data_offsets))
            .collect();
        spans.sort_by_key(|s| s.1);
        for w in spans.windows(2) {
            let ((a, (ab, ae)), (b, (bb, be))) = (w[0], w[1]);
            if bb < ae {
                return Err(err(format!(
                    "tensors '{a}' (bytes {ab}..{ae}) and '{b}' (bytes {bb}..{be}) overlap"
                )));
            }
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Dtype, shape and span of `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The `__metadata__` string map (empty when the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The raw little-endian bytes of `name`, zero-copy from the mapping.
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| IoError::missing_tensor(&self.path, name))?;
        let (b, e) = info.data_offsets;
        Ok(&self.mmap[self.data_start + b..self.data_start + e])
    }

    /// Tensor `name` as a kiln tensor: F32 as is, F64 as F64, F16/BF16 widened to F32, U32 as
    /// U32, the other integer types and BOOL as I64.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let raw = self.raw(name)?;
        let info = &self.tensors[name];
        let shape = info.shape.clone();
        let n = raw.len() / info.dtype.size();
        fn ints<const N: usize>(raw: &[u8], n: usize, f: impl Fn([u8; N]) -> i64) -> Buffer<i64> {
            let mut buf = Buffer::uninit(n);
            for (o, c) in buf.iter_mut().zip(raw.as_chunks::<N>().0) {
                *o = f(*c);
            }
            buf
        }
        use SafeDtype::*;
        let t = match info.dtype {
            F32 | F16 | BF16 => {
                let ty = match info.dtype {
                    F32 => GgmlType::F32,
                    F16 => GgmlType::F16,
                    _ => GgmlType::BF16,
                };
                let mut buf = Buffer::<f32>::uninit(n);
                dequantize(ty, raw, &mut buf).expect("plain float types always convert");
                Tensor::from_buffer(buf, shape)
            }
            F64 => {
                let mut buf = Buffer::<f64>::uninit(n);
                for (o, c) in buf.iter_mut().zip(raw.as_chunks::<8>().0) {
                    *o = f64::from_le_bytes(*c);
                }
                Tensor::from_buffer(buf, shape)
            }
            U32 => {
                let mut buf = Buffer::<u32>::uninit(n);
                for (o, c) in buf.iter_mut().zip(raw.as_chunks::<4>().0) {
                    *o = u32::from_le_bytes(*c);
                }
                Tensor::from_buffer(buf, shape)
            }
            I64 => Tensor::from_buffer(ints::<8>(raw, n, i64::from_le_bytes), shape),
            I32 => Tensor::from_buffer(ints::<4>(raw, n, |b| i32::from_le_bytes(b) as i64), shape),
            I16 => Tensor::from_buffer(ints::<2>(raw, n, |b| i16::from_le_bytes(b) as i64), shape),
            U16 => Tensor::from_buffer(ints::<2>(raw, n, |b| u16::from_le_bytes(b) as i64), shape),
            I8 => Tensor::from_buffer(ints::<1>(raw, n, |b| b[0] as i8 as i64), shape),
            U8 => Tensor::from_buffer(ints::<1>(raw, n, |b| b[0] as i64), shape),
            Bool => Tensor::from_buffer(ints::<1>(raw, n, |b| (b[0] != 0) as i64), shape),
            U64 => {
                if let Some(v) = raw
                    .as_chunks::<8>()
                    .0
                    .iter()
                    .map(|c| u64::from_le_bytes(*c))
                    .find(|&v| v > i64::MAX as u64)
                {
                    return Err(IoError::unsupported(
                        &self.path,
                        format!("tensor '{name}': U64 value {v} does not fit in i64"),
                    ));
                }
                Tensor::from_buffer(ints::<8>(raw, n, |b| u64::from_le_bytes(b) as i64), shape)
            }
            F8E4M3 | F8E5M2 => {
                return Err(IoError::unsupported(
                    &self.path,
                    format!("tensor '{name}': dtype {} cannot be loaded", info.dtype),
                ))
            }
        };
        Ok(t)
    }

    /// Every tensor, by sorted name.
    pub fn to_state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::new();
        for name in self.tensors.keys() {
            sd.insert(name.clone(), self.tensor(name)?);
        }
        Ok(sd)
    }
}

/// Validates one header entry against the data region's length.
fn parse_entry(
    name: &str,
    v: &serde_json::Value,
    data_len: usize,
) -> std::result::Result<TensorInfo, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("tensor '{name}': entry is not an object"))?;
    let field = |k: &str| {
        obj.get(k)
            .ok_or_else(|| format!("tensor '{name}': missing '{k}'"))
    };
    let dtype_name = field("dtype")?
        .as_str()
        .ok_or_else(|| format!("tensor '{name}': dtype is not a string"))?;
    let dtype = SafeDtype::from_name(dtype_name)
        .ok_or_else(|| format!("tensor '{name}': unknown dtype '{dtype_name}'"))?;
    let as_usize = |v: &serde_json::Value, what: &str| {
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| format!("tensor '{name}': {what} {v} is not a non-negative integer"))
    };
    let shape = field("shape")?
        .as_array()
        .ok_or_else(|| format!("tensor '{name}': shape is not an array"))?
        .iter()
        .map(|d| as_usize(d, "shape entry"))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let offsets = field("data_offsets")?
        .as_array()
        .filter(|a| a.len() == 2)
        .ok_or_else(|| format!("tensor '{name}': data_offsets is not a [begin, end] pair"))?;
    let begin = as_usize(&offsets[0], "data offset")?;
    let end = as_usize(&offsets[1], "data offset")?;
    if begin > end {
        return Err(format!(
            "tensor '{name}': data span {begin}..{end} ends before it begins"
        ));
    }
    if end > data_len {
        return Err(format!(
            "tensor '{name}': data span {begin}..{end} exceeds the data region of {data_len} bytes"
        ));
    }
    let bytes = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("tensor '{name}': shape {shape:?} of {dtype} overflows"))?;
    if bytes != end - begin {
        return Err(format!(
            "tensor '{name}': shape {shape:?} of {dtype} needs {bytes} bytes, data span {begin}..{end} holds {}",
            end - begin
        ));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        data_offsets: (begin, end),
    })
}

/// Loads a sharded checkpoint from its `model.safetensors.index.json`: every tensor of the
/// `weight_map`, each shard (a file next to the index) opened once.
pub fn load_sharded(index_json: impl AsRef<Path>) -> Result<StateDict> {
    let index = index_json.as_ref();
    let err = |msg: String| IoError::format(index, INDEX_FORMAT, msg);
    let file = std::fs::File::open(index).map_err(|e| IoError::io(index, "cannot open", e))?;
    let len = file
        .metadata()
        .map_err(|e| IoError::io(index, "cannot stat", e))?
        .len();
    if len > MAX_HEADER_LEN {
        return Err(err(format!(
            "file size {len} exceeds the {MAX_HEADER_LEN}-byte limit"
        )));
    }
    let text = std::fs::read(index).map_err(|e| IoError::io(index, "cannot read", e))?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| err("no 'weight_map' object".into()))?;
    let dir = index.parent().unwrap_or_else(|| Path::new("."));
    let mut weight_map: Vec<(&str, &str)> = Vec::with_capacity(map.len());
    for (name, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| err(format!("weight_map entry '{name}' is not a string")))?;
        let plain = !shard.is_empty()
            && Path::new(shard)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(err(format!(
                "weight_map entry '{name}': shard '{shard}' is not a file name relative to the index"
            )));
        }
        weight_map.push((name, shard));
    }
    let mut shards: BTreeMap<&str, SafetensorsFile> = BTreeMap::new();
    for &(name, shard) in &weight_map {
        if shards.contains_key(shard) {
            continue;
        }
        let shard_path = dir.join(shard);
        if !shard_path.is_file() {
            return Err(err(format!(
                "shard '{shard}' (holding '{name}') not found at {}",
                shard_path.display()
            )));
        }
        shards.insert(shard, SafetensorsFile::open(&shard_path)?);
    }
    let mut sd = StateDict::new();
    for (name, shard) in weight_map {
        let file = &shards[shard];
        if file.info(name).is_none() {
            return Err(err(format!(
                "weight_map maps '{name}' to shard '{shard}', which lacks it ({})",
                file.path().display()
            )));
        }
        sd.insert(name, file.tensor(name)?);
    }
    Ok(sd)
}

/// Loads the checkpoint in `dir`: `model.safetensors` when present, else the shards listed in
/// `model.safetensors.index.json`.
pub fn load_safetensors_dir(dir: impl AsRef<Path>) -> Result<StateDict> {
    let dir = dir.as_ref();
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return SafetensorsFile::open(&single)?.to_state_dict();
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return load_sharded(&index);
    }
    Err(IoError::io(
        dir,
        "no model.safetensors or model.safetensors.index.json in this directory",
        std::io::Error::from(std::io::ErrorKind::NotFound),
    ))
}

/// Writes `sd` to `path` with kiln-nn's safetensors writer (f32/f64/i64/u32 tensors,
/// `{"format": "pt"}` metadata, atomic rename). The file reads back with
/// [`SafetensorsFile::open`].
pub fn save(sd: &StateDict, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    kiln_nn::safetensors_io::save(sd, path).map_err(|source| IoError::Save {
        path: path.to_path_buf(),
        source,
    })
}

/// [`save`] with the given `__metadata__` string map.
pub fn save_with_metadata(
    sd: &StateDict,
    metadata: &std::collections::HashMap<String, String>,
    path: impl AsRef<Path>,
) -> Result<()> {
    let path = path.as_ref();
    kiln_nn::safetensors_io::save_with_metadata(sd, metadata, path).map_err(|source| {
        IoError::Save {
            path: path.to_path_buf(),
            source,
        }
    })
}
