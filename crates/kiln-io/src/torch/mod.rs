//! PyTorch checkpoints (`pytorch_model.bin`, `.pth`, `.pt`), read-only: the zip container
//! (`torch.save` since 1.6) and the legacy pickle container, through a restricted unpickler
//! that only understands the tensor-rebuild globals and never runs code.
//!
//! Zip: `<prefix>/data.pkl` (the object), `<prefix>/data/<key>` (one stored member per storage),
//! `<prefix>/byteorder` (must say `little` when present). Legacy: five pickles in a row (magic
//! number, protocol version 1001, system info, the object, the list of storage keys), then each
//! storage in key-list order as an 8-byte element count and its raw little-endian bytes.
//!
//! The object must be a dict. When it holds a dict under `state_dict`, `model_state_dict` or
//! `model` (a training checkpoint), that dict is the state dict. Nested dicts give dotted names
//! (`{"enc": {"w": t}}` → `enc.w`); values that are neither tensors nor dicts (epoch numbers,
//! config strings, lists) are skipped. Tensors are rebuilt from storage, offset, size and stride
//! (views, transposes and storages shared by several names come out as torch shows them) into
//! contiguous kiln tensors: float32/float64 as F32/F64, float16/bfloat16 widened to F32, every
//! integer type and bool as I64.

mod pickle;
mod zip;

use crate::error::{map_file, IoError, Result};
use kiln_core::alloc::Buffer;
use kiln_core::Tensor;
use kiln_nn::module::StateDict;
use pickle::{unpickle, Arena, PickleError, StorageTable, TensorRef, TorchDtype, Value};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::rc::Rc;

const FORMAT: &str = "PyTorch";

/// The legacy format's magic number 0x1950a86a20f9469cfc6c, as little-endian bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The legacy format's protocol version.
const LEGACY_PROTOCOL: i64 = 1001;
/// Keys under which training checkpoints keep the model's state dict, in order of preference.
const STATE_DICT_KEYS: [&str; 3] = ["state_dict", "model_state_dict", "model"];
/// Deepest dict nesting followed.
const MAX_DEPTH: usize = 64;

/// Loads every tensor of a PyTorch checkpoint (zip or legacy container; see the module docs).
///
/// Errors name the file: I/O, a truncated or corrupt container or pickle, a global outside the
/// allow-list ([`IoError::ForbiddenGlobal`]), a big-endian file, a pickled `nn.Module`, a
/// tensor outside its storage.
pub fn load_torch(path: impl AsRef<Path>) -> Result<StateDict> {
    let path = path.as_ref();
    let mmap = map_file(path, FORMAT, 4)?;
    let b: &[u8] = &mmap;
    if zip::is_zip(b) {
        load_zip(path, b)
    } else if b[0] == 0x80 {
        load_legacy(path, b)
    } else if b.len() > 262 && &b[257..262] == b"ustar" {
        Err(IoError::unsupported(
            path,
            "tar-format PyTorch checkpoints (PyTorch < 0.4) are not supported",
        ))
    } else {
        Err(IoError::format(
            path,
            FORMAT,
            format!(
                "neither a zip archive nor a pickle (starts with {:02x?})",
                &b[..4]
            ),
        ))
    }
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> IoError {
    IoError::format(path, FORMAT, msg)
}

fn pickle_err(path: &Path, part: &str, e: PickleError) -> IoError {
    match e {
        PickleError::Format(m) => fmt_err(path, format!("{part}: {m}")),
        PickleError::Forbidden(global) => IoError::ForbiddenGlobal {
            path: path.to_path_buf(),
            global,
        },
        PickleError::Unsupported(m) => IoError::unsupported(path, format!("{part}: {m}")),
    }
}

fn load_zip(path: &Path, b: &[u8]) -> Result<StateDict> {
    let zerr = |m: String| fmt_err(path, format!("zip archive: {m}"));
    let index = zip::read_index(b).map_err(zerr)?;
    let pkls: Vec<&str> = index
        .names
        .iter()
        .map(String::as_str)
        .filter(|n| {
            *n == "data.pkl"
                || n.strip_suffix("/data.pkl")
                    .is_some_and(|p| !p.contains('/'))
        })
        .collect();
    let pkl_name = match pkls[..] {
        [one] => one,
        [] => {
            return Err(zerr(
                "no '<archive>/data.pkl' member: not a torch.save archive".into(),
            ))
        }
        _ => return Err(zerr(format!("several data.pkl members: {pkls:?}"))),
    };
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    if let Some(order) = index.get(b, &format!("{prefix}byteorder")).map_err(zerr)? {
        match order {
            b"little" => {}
            b"big" => {
                return Err(IoError::unsupported(
                    path,
                    "big-endian checkpoint (byteorder 'big'); only little-endian files load",
                ))
            }
            other => {
                return Err(zerr(format!(
                    "byteorder is {:?}, not 'little' or 'big'",
                    String::from_utf8_lossy(other)
                )))
            }
        }
    }
    let pkl = index
        .get(b, pkl_name)
        .map_err(zerr)?
        .expect("data.pkl listed");
    let mut table = StorageTable::default();
    let u = unpickle(pkl, 0, &mut table).map_err(|e| pickle_err(path, pkl_name, e))?;
    let mut storages: HashMap<String, &[u8]> = HashMap::with_capacity(table.order.len());
    for key in &table.order {
        let (dtype, numel) = table.meta[key];
        let rec = format!("{prefix}data/{key}");
        let bytes = index
            .get(b, &rec)
            .map_err(zerr)?
            .ok_or_else(|| zerr(format!("storage '{key}': member '{rec}' missing")))?;
        let need = storage_bytes(numel, dtype);
        if need.is_none_or(|n| n > bytes.len() as u64) {
            return Err(zerr(format!(
                "storage '{key}': {numel} × {} needs more than the {} bytes of '{rec}'",
                dtype.name(),
                bytes.len()
            )));
        }
        storages.insert(key.clone(), &bytes[..need.expect("checked") as usize]);
    }
    build(path, b.len(), &u.value, &u.arena, &storages)
}

fn storage_bytes(numel: u64, dtype: TorchDtype) -> Option<u64> {
    numel.checked_mul(dtype.size() as u64)
}

fn load_legacy(path: &Path, b: &[u8]) -> Result<StateDict> {
    let mut scratch = StorageTable::default();
    let magic = unpickle(b, 0, &mut scratch).map_err(|e| pickle_err(path, "magic number", e))?;
    let is_magic = matches!(&magic.value, Value::BigInt(m) if m[..] == LEGACY_MAGIC);
    if !is_magic {
        return Err(fmt_err(
            path,
            format!(
                "a pickle without the legacy torch.save magic number (found a {}): not a PyTorch checkpoint",
                magic.value.kind()
            ),
        ));
    }
    let proto = unpickle(b, magic.end, &mut scratch)
        .map_err(|e| pickle_err(path, "protocol version", e))?;
    if !matches!(proto.value, Value::Int(LEGACY_PROTOCOL)) {
        return Err(IoError::unsupported(
            path,
            format!(
                "legacy protocol version {:?} not supported ({LEGACY_PROTOCOL})",
                proto.value
            ),
        ));
    }
    let sys =
        unpickle(b, proto.end, &mut scratch).map_err(|e| pickle_err(path, "system info", e))?;
    if let Value::Dict(d) = sys.value {
        if let Some(Value::Bool(false)) = sys.arena.dicts[d].get_str("little_endian") {
            return Err(IoError::unsupported(
                path,
                "big-endian checkpoint (little_endian: False); only little-endian files load",
            ));
        }
    }
    let mut table = StorageTable::default();
    let data = unpickle(b, sys.end, &mut table).map_err(|e| pickle_err(path, "data pickle", e))?;
    let keys =
        unpickle(b, data.end, &mut scratch).map_err(|e| pickle_err(path, "storage key list", e))?;
    let Value::List(l) = keys.value else {
        return Err(fmt_err(
            path,
            format!("storage key list is a {}, not a list", keys.value.kind()),
        ));
    };
    let mut pos = keys.end;
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for k in &keys.arena.lists[l] {
        let key = k
            .as_str()
            .ok_or_else(|| fmt_err(path, format!("storage key list holds a {}", k.kind())))?;
        let &(dtype, numel) = table.meta.get(key).ok_or_else(|| {
            fmt_err(
                path,
                format!("storage '{key}' in the key list is not referenced by the data pickle"),
            )
        })?;
        let left = b.len() - pos;
        if left < 8 {
            return Err(fmt_err(
                path,
                format!("storage '{key}': element count at byte {pos} is past the end of the file (truncated)"),
            ));
        }
        let count = u64::from_le_bytes(b[pos..pos + 8].try_into().expect("8 bytes"));
        if count != numel {
            return Err(fmt_err(
                path,
                format!("storage '{key}' at byte {pos}: {count} elements in the file, {numel} in the pickle"),
            ));
        }
        pos += 8;
        let n = storage_bytes(count, dtype)
            .filter(|&n| n <= (left - 8) as u64)
            .ok_or_else(|| {
                fmt_err(
                    path,
                    format!(
                        "storage '{key}' at byte {pos}: {count} × {} exceeds the {} bytes left (truncated)",
                        dtype.name(),
                        left - 8
                    ),
                )
            })? as usize;
        if storages.insert(key.to_string(), &b[pos..pos + n]).is_some() {
            return Err(fmt_err(
                path,
                format!("storage '{key}' appears twice in the key list"),
            ));
        }
        pos += n;
    }
    build(path, b.len(), &data.value, &data.arena, &storages)
}

/// Finds the state dict in `root`, flattens it and materialises every tensor.
fn build(
    path: &Path,
    file_len: usize,
    root: &Value,
    arena: &Arena,
    storages: &HashMap<String, &[u8]>,
) -> Result<StateDict> {
    let Value::Dict(mut d) = *root else {
        return Err(fmt_err(
            path,
            format!("the checkpoint is a {}, not a dict of tensors", root.kind()),
        ));
    };
    if let Some(&Value::Dict(sub)) = STATE_DICT_KEYS.iter().find_map(|k| {
        arena.dicts[d]
            .get_str(k)
            .filter(|v| matches!(v, Value::Dict(_)))
    }) {
        d = sub;
    }
    let mut tensors = Vec::new();
    let mut seen = HashSet::new();
    flatten(path, arena, d, "", 0, &mut seen, &mut tensors)?;
    // Shared storages and stride-0 views can make the tensors bigger than the file: bound the
    // total so a small hostile file cannot ask for an enormous allocation.
    let limit = (file_len as u64).saturating_mul(4).saturating_add(1 << 24);
    let mut total = 0u64;
    for (name, t) in &tensors {
        let n = t
            .size
            .iter()
            .try_fold(1u64, |a, &s| a.checked_mul(s))
            .ok_or_else(|| {
                fmt_err(
                    path,
                    format!("tensor '{name}': size {:?} overflows", t.size),
                )
            })?;
        total = total.saturating_add(n);
        if total > limit {
            return Err(fmt_err(
                path,
                format!("the tensors hold more than {limit} elements (4× the file size + 16 Mi): shared or stride-0 storages blow it up"),
            ));
        }
    }
    let mut names = HashSet::with_capacity(tensors.len());
    let mut sd = StateDict::new();
    for (name, t) in tensors {
        if !names.insert(name.clone()) {
            return Err(fmt_err(path, format!("tensor name '{name}' appears twice")));
        }
        let bytes = storages.get(&t.storage.key).ok_or_else(|| {
            fmt_err(
                path,
                format!(
                    "tensor '{name}': storage '{}' is not in the file",
                    t.storage.key
                ),
            )
        })?;
        let tensor =
            materialize(&t, bytes).map_err(|m| fmt_err(path, format!("tensor '{name}': {m}")))?;
        sd.insert(name, tensor);
    }
    Ok(sd)
}

/// Collects the tensors of dict `d` (and nested dicts) with dotted names.
fn flatten(
    path: &Path,
    arena: &Arena,
    d: usize,
    prefix: &str,
    depth: usize,
    seen: &mut HashSet<usize>,
    out: &mut Vec<(String, Rc<TensorRef>)>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(fmt_err(
            path,
            format!("dicts nested more than {MAX_DEPTH} deep under '{prefix}'"),
        ));
    }
    if !seen.insert(d) {
        return Err(fmt_err(
            path,
            format!("dict '{prefix}' is reached twice (shared or cyclic dicts are not supported)"),
        ));
    }
    for (k, v) in &arena.dicts[d].entries {
        if !matches!(v, Value::Tensor(_) | Value::Dict(_)) {
            continue;
        }
        let key = match k {
            Value::Int(i) => i.to_string(),
            other => other
                .as_str()
                .ok_or_else(|| {
                    fmt_err(
                        path,
                        format!(
                            "a {} key under '{prefix}' holds a {}",
                            other.kind(),
                            v.kind()
                        ),
                    )
                })?
                .to_string(),
        };
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match v {
            Value::Tensor(t) => out.push((name, t.clone())),
            Value::Dict(sub) => flatten(path, arena, *sub, &name, depth + 1, seen, out)?,
            _ => unreachable!("filtered above"),
        }
    }
    Ok(())
}

/// Gathers tensor `t` from its root storage's bytes `bytes` into a contiguous kiln tensor.
fn materialize(t: &TensorRef, bytes: &[u8]) -> std::result::Result<Tensor, String> {
    let st = &t.storage;
    let (region_start, region_len) = st.view.unwrap_or((0, st.numel));
    let size: Vec<usize> = t.size.iter().map(|&s| s as usize).collect();
    let n: u64 = t.size.iter().product();
    if n > 0 {
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&s, &st)| {
                (s - 1).checked_mul(st).and_then(|x| acc.checked_add(x))
            });
        if last.is_none_or(|l| l >= region_len) {
            return Err(format!(
                "size {:?}, stride {:?} at offset {} reach beyond its storage '{}' of {region_len} {} elements",
                t.size,
                t.stride,
                t.offset,
                st.key,
                st.dtype.name()
            ));
        }
    }
    // Validated: region_start + offset + extent < numel, so every index below fits.
    let base = (region_start + if n > 0 { t.offset } else { 0 }) as usize;
    let stride: Vec<usize> = t.stride.iter().map(|&s| s as usize).collect();
    let n = n as usize;
    let g = Gather {
        src: bytes,
        base,
        size: &size,
        stride: &stride,
    };
    use TorchDtype::*;
    Ok(match st.dtype {
        F32 => Tensor::from_buffer(g.run::<4, f32>(n, f32::from_le_bytes), &size[..]),
        F64 => Tensor::from_buffer(g.run::<8, f64>(n, f64::from_le_bytes), &size[..]),
        F16 => Tensor::from_buffer(
            g.run::<2, f32>(n, |b| half::f16::from_le_bytes(b).to_f32()),
            &size[..],
        ),
        BF16 => Tensor::from_buffer(
            g.run::<2, f32>(n, |b| f32::from_bits((u16::from_le_bytes(b) as u32) << 16)),
            &size[..],
        ),
        I64 => Tensor::from_buffer(g.run::<8, i64>(n, i64::from_le_bytes), &size[..]),
        I32 => Tensor::from_buffer(
            g.run::<4, i64>(n, |b| i32::from_le_bytes(b) as i64),
            &size[..],
        ),
        I16 => Tensor::from_buffer(
            g.run::<2, i64>(n, |b| i16::from_le_bytes(b) as i64),
            &size[..],
        ),
        I8 => Tensor::from_buffer(g.run::<1, i64>(n, |b| b[0] as i8 as i64), &size[..]),
        U8 => Tensor::from_buffer(g.run::<1, i64>(n, |b| b[0] as i64), &size[..]),
        Bool => Tensor::from_buffer(g.run::<1, i64>(n, |b| (b[0] != 0) as i64), &size[..]),
    })
}

/// A validated strided view of a storage's bytes.
struct Gather<'a> {
    src: &'a [u8],
    /// Element index of the first element.
    base: usize,
    size: &'a [usize],
    stride: &'a [usize],
}

/// Elements per parallel chunk of a contiguous conversion.
const CHUNK: usize = 1 << 16;

impl Gather<'_> {
    fn contiguous(&self) -> bool {
        let mut expect = 1;
        for (&s, &st) in self.size.iter().zip(self.stride).rev() {
            if s != 1 && st != expect {
                return false;
            }
            expect *= s;
        }
        true
    }

    /// Converts the `n` elements in row-major order with `f`.
    fn run<const N: usize, T: Copy + Send + Sync>(
        &self,
        n: usize,
        f: impl Fn([u8; N]) -> T + Sync,
    ) -> Buffer<T> {
        let mut out = Buffer::<T>::uninit(n);
        if n == 0 {
            return out;
        }
        if self.contiguous() {
            let src = &self.src[self.base * N..(self.base + n) * N];
            let convert = |o: &mut [T], s: &[u8]| {
                for (o, c) in o.iter_mut().zip(s.as_chunks::<N>().0) {
                    *o = f(*c);
                }
            };
            if n >= 4 * CHUNK {
                out.par_chunks_mut(CHUNK)
                    .zip(src.par_chunks(CHUNK * N))
                    .for_each(|(o, s)| convert(o, s));
            } else {
                convert(&mut out, src);
            }
            return out;
        }
        // Strided: the innermost dimension in a loop, the outer ones by an index counter.
        let d = self.size.len();
        let (inner, inner_stride) = (self.size[d - 1], self.stride[d - 1]);
        let mut idx = vec![0usize; d - 1];
        let at = |e: usize| -> T {
            let p = e * N;
            f(self.src[p..p + N].try_into().expect("N bytes"))
        };
        for row in out.chunks_mut(inner) {
            let off = self.base
                + idx
                    .iter()
                    .zip(self.stride)
                    .map(|(&i, &s)| i * s)
                    .sum::<usize>();
            for (j, o) in row.iter_mut().enumerate() {
                *o = at(off + j * inner_stride);
            }
            for k in (0..d - 1).rev() {
                idx[k] += 1;
                if idx[k] < self.size[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        out
    }
}
