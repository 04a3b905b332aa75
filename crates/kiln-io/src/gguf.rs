//! Memory-mapped GGUF (v2 and v3) reading: header, metadata of every value type, tensor table,
//! zero-copy raw tensor bytes and dequantised f32 tensors.
//!
//! Everything is validated at open, before any allocation sized by the file: string lengths
//! and array counts against the bytes left, tensor dims (at most 4, product checked, first dim
//! a multiple of the type's block size), offsets (aligned to `general.alignment`, default 32)
//! and data spans (inside the file). The file must not be truncated or rewritten while open.

use crate::error::{map_file, IoError, Result};
use crate::quant::{dequantize, GgmlType};
use kiln_core::alloc::Buffer;
use kiln_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FORMAT: &str = "GGUF";
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// A typed array of GGUF metadata values.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    /// u8 elements.
    U8(Vec<u8>),
    /// i8 elements.
    I8(Vec<i8>),
    /// u16 elements.
    U16(Vec<u16>),
    /// i16 elements.
    I16(Vec<i16>),
    /// u32 elements.
    U32(Vec<u32>),
    /// i32 elements.
    I32(Vec<i32>),
    /// f32 elements.
    F32(Vec<f32>),
    /// bool elements.
    Bool(Vec<bool>),
    /// string elements.
    String(Vec<String>),
    /// nested arrays.
    Array(Vec<GgufArray>),
    /// u64 elements.
    U64(Vec<u64>),
    /// i64 elements.
    I64(Vec<i64>),
    /// f64 elements.
    F64(Vec<f64>),
}

impl GgufArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name (`u32`, `string`, `array`, ...).
    pub fn elem_type_name(&self) -> &'static str {
        match self {
            GgufArray::U8(_) => "u8",
            GgufArray::I8(_) => "i8",
            GgufArray::U16(_) => "u16",
            GgufArray::I16(_) => "i16",
            GgufArray::U32(_) => "u32",
            GgufArray::I32(_) => "i32",
            GgufArray::F32(_) => "f32",
            GgufArray::Bool(_) => "bool",
            GgufArray::String(_) => "string",
            GgufArray::Array(_) => "array",
            GgufArray::U64(_) => "u64",
            GgufArray::I64(_) => "i64",
            GgufArray::F64(_) => "f64",
        }
    }
}

/// One GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// u8.
    U8(u8),
    /// i8.
    I8(i8),
    /// u16.
    U16(u16),
    /// i16.
    I16(i16),
    /// u32.
    U32(u32),
    /// i32.
    I32(i32),
    /// f32.
    F32(f32),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Typed array (possibly nested).
    Array(GgufArray),
    /// u64.
    U64(u64),
    /// i64.
    I64(i64),
    /// f64.
    F64(f64),
}

impl GgufValue {
    /// The type's name as used in errors (`u32`, `string`, `array[string]`, ...).
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::U8(_) => "u8".into(),
            GgufValue::I8(_) => "i8".into(),
            GgufValue::U16(_) => "u16".into(),
            GgufValue::I16(_) => "i16".into(),
            GgufValue::U32(_) => "u32".into(),
            GgufValue::I32(_) => "i32".into(),
            GgufValue::F32(_) => "f32".into(),
            GgufValue::Bool(_) => "bool".into(),
            GgufValue::String(_) => "string".into(),
            GgufValue::Array(a) => format!("array[{}]", a.elem_type_name()),
            GgufValue::U64(_) => "u64".into(),
            GgufValue::I64(_) => "i64".into(),
            GgufValue::F64(_) => "f64".into(),
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Tensor name.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` varies fastest (the torch shape reversed).
    pub dims: Vec<usize>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: usize,
    /// Absolute byte range of the data in the file.
    pub span: (usize, usize),
}

impl GgufTensorInfo {
    /// The PyTorch (row-major) shape: `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        // Validated at open not to overflow.
        self.dims.iter().product()
    }
}

/// An open, validated, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian reader over the mapping; errors are plain messages that the
/// caller wraps with the path.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type R<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> R<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "{} at byte {}: needs {n} bytes, file ends at {}",
                what(),
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> R<[u8; N]> {
        let s = self.take(N, what)?;
        Ok(s.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> R<u32> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> R<u64> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// A length or count that must fit in the `remaining / min_size` bytes left.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> R<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_size).map(|b| (n, b)))
            .filter(|&(_, b)| b <= self.remaining());
        match fits {
            Some((n, _)) => Ok(n),
            None => Err(format!(
                "{} at byte {at}: count {n} (at least {min_size} bytes each) exceeds the {} bytes left in the file",
                what(),
                self.remaining()
            )),
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> R<String> {
        let n = self.count(1, what)?;
        let at = self.pos;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| format!("{} at byte {at}: string is not UTF-8: {e}", what()))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> R<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.bool(what)?),
            8 => GgufValue::String(self.string(what)?),
            9 => GgufValue::Array(self.array_value(depth + 1, what)?),
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(format!(
                    "{} at byte {}: unknown value type {other}",
                    what(),
                    self.pos.saturating_sub(4)
                ))
            }
        })
    }

    fn bool(&mut self, what: &dyn Fn() -> String) -> R<bool> {
        match self.array::<1>(what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!(
                "{} at byte {}: bool byte {b} is neither 0 nor 1",
                what(),
                self.pos - 1
            )),
        }
    }

    fn array_value(&mut self, depth: usize, what: &dyn Fn() -> String) -> R<GgufArray> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(format!(
                "{} at byte {}: arrays nested deeper than {MAX_ARRAY_DEPTH}",
                what(),
                self.pos
            ));
        }
        let ty = self.u32(what)?;
        macro_rules! scalars {
            ($variant:ident, $t:ty, $n:literal) => {{
                let n = self.count($n, what)?;
                let bytes = self.take(n * $n, what)?;
                GgufArray::$variant(
                    bytes
                        .as_chunks::<$n>()
                        .0
                        .iter()
                        .map(|c| <$t>::from_le_bytes(*c))
                        .collect(),
                )
            }};
        }
        Ok(match ty {
            0 => scalars!(U8, u8, 1),
            1 => scalars!(I8, i8, 1),
            2 => scalars!(U16, u16, 2),
            3 => scalars!(I16, i16, 2),
            4 => scalars!(U32, u32, 4),
            5 => scalars!(I32, i32, 4),
            6 => scalars!(F32, f32, 4),
            7 => {
                let n = self.count(1, what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(what)?);
                }
                GgufArray::Bool(v)
            }
            8 => {
                let n = self.count(8, what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string(what)?);
                }
                GgufArray::String(v)
            }
            9 => {
                // Each nested array holds at least its type and count.
                let n = self.count(12, what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array_value(depth + 1, what)?);
                }
                GgufArray::Array(v)
            }
            10 => scalars!(U64, u64, 8),
            11 => scalars!(I64, i64, 8),
            12 => scalars!(F64, f64, 8),
            other => {
                return Err(format!(
                    "{} at byte {}: unknown array element type {other}",
                    what(),
                    self.pos - 4
                ))
            }
        })
    }
}

impl GgufFile {
    /// Maps `path` and validates header, metadata and tensor table (see the module docs).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mmap = map_file(path, FORMAT, 24)?;
        let parsed = Self::parse(path, &mmap)?;
        let (version, alignment, data_offset, metadata, tensors) = parsed;
        let meta_index = metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            alignment,
            data_offset,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        path: &Path,
        buf: &[u8],
    ) -> Result<(
        u32,
        usize,
        usize,
        Vec<(String, GgufValue)>,
        Vec<GgufTensorInfo>,
    )> {
        let err = |msg: String| IoError::format(path, FORMAT, msg);
        let mut r = Reader { buf, pos: 0 };
        let header = || "header".to_string();
        let magic = r.array::<4>(&header).map_err(err)?;
        if &magic != b"GGUF" {
            return Err(err(format!(
                "bad magic {magic:02x?} ({:?}), expected \"GGUF\"",
                String::from_utf8_lossy(&magic)
            )));
        }
        let version = r.u32(&header).map_err(err)?;
        if version != 2 && version != 3 {
            return Err(IoError::unsupported(
                path,
                format!("GGUF version {version} not supported (2 or 3)"),
            ));
        }
        // A tensor-table entry holds at least a name length, n_dims, type and offset.
        let n_tensors = r.count(24, &|| "tensor count".into()).map_err(err)?;
        // A key-value pair holds at least a key length, a type and one byte.
        let n_kv = r.count(13, &|| "metadata count".into()).map_err(err)?;

        let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(n_kv);
        let mut seen = std::collections::HashSet::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = r
                .string(&|| format!("metadata entry {i} key"))
                .map_err(err)?;
            let what = || format!("metadata key '{key}'");
            let ty = r.u32(&what).map_err(err)?;
            let value = r.value(ty, 0, &what).map_err(err)?;
            if !seen.insert(key.clone()) {
                return Err(err(format!("metadata key '{key}' appears twice")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, GgufValue::U32(a))) => {
                let a = *a as usize;
                if a == 0 || !a.is_power_of_two() {
                    return Err(err(format!("general.alignment {a} is not a power of two")));
                }
                a
            }
            Some((_, v)) => {
                return Err(IoError::WrongType {
                    path: path.to_path_buf(),
                    key: "general.alignment".into(),
                    found: v.type_name(),
                    expected: "u32",
                })
            }
        };

        struct Raw {
            name: String,
            dims: Vec<usize>,
            ty: GgmlType,
            offset: u64,
        }
        let mut raw = Vec::with_capacity(n_tensors);
        let mut names = std::collections::HashSet::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = r
                .string(&|| format!("tensor entry {i} name"))
                .map_err(err)?;
            let what = || format!("tensor '{name}'");
            let n_dims = r.u32(&what).map_err(err)? as usize;
            if n_dims > MAX_DIMS {
                return Err(err(format!(
                    "tensor '{name}': {n_dims} dimensions, at most {MAX_DIMS} allowed"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64(&what).map_err(err)?;
                dims.push(usize::try_from(d).map_err(|_| {
                    err(format!(
                        "tensor '{name}': dimension {d} does not fit in memory"
                    ))
                })?);
            }
            let ty_id = r.u32(&what).map_err(err)?;
            let ty = GgmlType::from_id(ty_id)
                .ok_or_else(|| err(format!("tensor '{name}': unknown ggml type id {ty_id}")))?;
            let offset = r.u64(&what).map_err(err)?;
            if !names.insert(name.clone()) {
                return Err(err(format!("tensor '{name}' appears twice")));
            }
            raw.push(Raw {
                name,
                dims,
                ty,
                offset,
            });
        }

        let data_offset = r
            .pos
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| err("data section offset overflows".into()))?;
        let file_len = buf.len();
        let mut tensors = Vec::with_capacity(raw.len());
        for Raw {
            name,
            dims,
            ty,
            offset,
        } in raw
        {
            let n = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| {
                    err(format!(
                        "tensor '{name}': element count of dims {dims:?} overflows"
                    ))
                })?;
            let row = dims.first().copied().unwrap_or(1);
            if !row.is_multiple_of(ty.block_size()) {
                return Err(err(format!(
                    "tensor '{name}': first dimension {row} is not a multiple of the {ty} block size {}",
                    ty.block_size()
                )));
            }
            let size = ty.bytes_for(n).ok_or_else(|| {
                err(format!(
                    "tensor '{name}': byte size of {n} {ty} elements overflows"
                ))
            })?;
            if !offset.is_multiple_of(alignment as u64) {
                return Err(err(format!(
                    "tensor '{name}': offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            let start = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data_offset));
            let end = start.and_then(|s| s.checked_add(size));
            let (start, end) = match (start, end) {
                (Some(s), Some(e)) if e <= file_len => (s, e),
                _ => {
                    return Err(err(format!(
                        "tensor '{name}': data span {}..{} exceeds file size {file_len}",
                        data_offset as u128 + offset as u128,
                        data_offset as u128 + offset as u128 + size as u128
                    )))
                }
            };
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ty,
                offset: offset as usize,
                span: (start, end),
            });
        }
        Ok((version, alignment, data_offset, metadata, tensors))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute offset of the data section.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// Metadata key-value pairs in file order.
    pub fn metadata_entries(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// The value of metadata `key`.
    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn get(&self, key: &str) -> Result<&GgufValue> {
        self.metadata(key).ok_or_else(|| IoError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    fn wrong(&self, key: &str, v: &GgufValue, expected: &'static str) -> IoError {
        IoError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            found: v.type_name(),
            expected,
        }
    }

    /// Metadata `key` as u32 (stored as u32).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        match self.get(key)? {
            GgufValue::U32(v) => Ok(*v),
            v => Err(self.wrong(key, v, "u32")),
        }
    }

    /// Metadata `key` as u64 (stored as any unsigned integer type).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        match self.get(key)? {
            GgufValue::U8(v) => Ok(*v as u64),
            GgufValue::U16(v) => Ok(*v as u64),
            GgufValue::U32(v) => Ok(*v as u64),
            GgufValue::U64(v) => Ok(*v),
            v => Err(self.wrong(key, v, "unsigned integer")),
        }
    }

    /// Metadata `key` as i32 (stored as i32).
    pub fn get_i32(&self, key: &str) -> Result<i32> {
        match self.get(key)? {
            GgufValue::I32(v) => Ok(*v),
            v => Err(self.wrong(key, v, "i32")),
        }
    }

    /// Metadata `key` as f32 (stored as f32).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.get(key)? {
            GgufValue::F32(v) => Ok(*v),
            v => Err(self.wrong(key, v, "f32")),
        }
    }

    /// Metadata `key` as bool.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.get(key)? {
            GgufValue::Bool(v) => Ok(*v),
            v => Err(self.wrong(key, v, "bool")),
        }
    }

    /// Metadata `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            GgufValue::String(v) => Ok(v),
            v => Err(self.wrong(key, v, "string")),
        }
    }

    /// Metadata `key` as an array of any element type.
    pub fn get_array(&self, key: &str) -> Result<&GgufArray> {
        match self.get(key)? {
            GgufValue::Array(a) => Ok(a),
            v => Err(self.wrong(key, v, "array")),
        }
    }

    /// Metadata `key` as an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.get(key)? {
            GgufValue::Array(GgufArray::String(v)) => Ok(v),
            v => Err(self.wrong(key, v, "array[string]")),
        }
    }

    /// Metadata `key` as an array of i32.
    pub fn get_i32_array(&self, key: &str) -> Result<&[i32]> {
        match self.get(key)? {
            GgufValue::Array(GgufArray::I32(v)) => Ok(v),
            v => Err(self.wrong(key, v, "array[i32]")),
        }
    }

    /// The tensor table, in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The table entry of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn info_or_err(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| IoError::missing_tensor(&self.path, name))
    }

    /// Type, quantised bytes (zero-copy from the mapping) and torch shape of tensor `name`.
    pub fn raw(&self, name: &str) -> Result<(GgmlType, &[u8], Vec<usize>)> {
        let info = self.info_or_err(name)?;
        let (s, e) = info.span;
        Ok((info.ty, &self.mmap[s..e], info.shape()))
    }

    /// Tensor `name` dequantised to f32, in its torch shape.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let info = self.info_or_err(name)?;
        if !info.ty.can_dequantize() {
            return Err(IoError::unsupported(
                &self.path,
                format!(
                    "tensor '{name}': {}",
                    crate::quant::UnsupportedType(info.ty)
                ),
            ));
        }
        let (s, e) = info.span;
        let mut buf = Buffer::<f32>::uninit(info.elem_count());
        dequantize(info.ty, &self.mmap[s..e], &mut buf)
            .map_err(|u| IoError::unsupported(&self.path, format!("tensor '{name}': {u}")))?;
        Ok(Tensor::from_buffer(buf, info.shape()))
    }
}
