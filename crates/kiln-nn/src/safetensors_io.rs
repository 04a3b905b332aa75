//! Save and load state dicts as safetensors (the format PyTorch and Hugging Face use).

use crate::error::NnError;
use crate::module::{dtype_tag, StateDict};
use kiln_core::{DType, Storage, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Writes `sd` to `path` with the `{"format": "pt"}` metadata `transformers` looks for
/// (written to a temporary file, then renamed: a crash never leaves a half-written checkpoint
/// under the final name).
pub fn save(sd: &StateDict, path: &Path) -> Result<(), NnError> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_with_metadata(sd, &metadata, path)
}

/// [`save`] with the given `__metadata__` string map.
pub fn save_with_metadata(
    sd: &StateDict,
    metadata: &HashMap<String, String>,
    path: &Path,
) -> Result<(), NnError> {
    let file_err = |e: String| NnError::File(path.display().to_string(), e);
    let mut bytes: Vec<(String, Vec<u8>, DType, Vec<usize>)> = Vec::with_capacity(sd.len());
    for (name, t) in sd.iter() {
        let t = t.contiguous();
        let raw = match t.dtype() {
            DType::F32 => t
                .to_vec::<f32>()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F64 => t
                .to_vec::<f64>()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::I64 => t
                .to_vec::<i64>()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::U32 => t
                .to_vec::<u32>()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        };
        bytes.push((name.to_string(), raw, t.dtype(), t.dims().to_vec()));
    }
    let views = bytes
        .iter()
        .map(|(n, raw, d, shape)| {
            let dtype = match dtype_tag(*d) {
                "F32" => Dtype::F32,
                "F64" => Dtype::F64,
                "I64" => Dtype::I64,
                _ => Dtype::U32,
            };
            TensorView::new(dtype, shape.clone(), raw)
                .map(|v| (n.clone(), v))
                .map_err(|e| file_err(format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, &Some(metadata.clone()), &tmp)
        .map_err(|e| file_err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(e.to_string()))
}

/// Reads every tensor of a safetensors file. F16 and BF16 tensors are widened to f32.
pub fn load(path: &Path) -> Result<StateDict, NnError> {
    let file_err = |e: String| NnError::File(path.display().to_string(), e);
    let data = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
    let st = SafeTensors::deserialize(&data)
        .map_err(|e| file_err(format!("not a valid safetensors file: {e}")))?;
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    let mut sd = StateDict::new();
    for name in names {
        let view = st
            .tensor(&name)
            .map_err(|e| file_err(format!("{name}: {e}")))?;
        sd.insert(
            name.clone(),
            tensor_from_view(&view).map_err(|e| file_err(format!("{name}: {e}")))?,
        );
    }
    Ok(sd)
}

trait ToBuffer<T: Copy> {
    fn to_buffer(&self) -> kiln_core::alloc::Buffer<T>;
}

impl<T: Copy> ToBuffer<T> for &[T] {
    fn to_buffer(&self) -> kiln_core::alloc::Buffer<T> {
        kiln_core::alloc::Buffer::from_slice(self)
    }
}

fn tensor_from_view(view: &TensorView<'_>) -> Result<Tensor, String> {
    let raw = view.data();
    let shape = view.shape().to_vec();
    fn chunks<const N: usize>(raw: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        raw.chunks_exact(N)
            .map(|c| c.try_into().expect("exact chunk"))
    }
    let storage = match view.dtype() {
        Dtype::F32 => Storage::F32(
            chunks::<4>(raw)
                .map(f32::from_le_bytes)
                .collect::<Vec<_>>()
                .as_slice()
                .to_buffer(),
        ),
        Dtype::F64 => Storage::F64(
            chunks::<8>(raw)
                .map(f64::from_le_bytes)
                .collect::<Vec<_>>()
                .as_slice()
                .to_buffer(),
        ),
        Dtype::I64 => Storage::I64(
            chunks::<8>(raw)
                .map(i64::from_le_bytes)
                .collect::<Vec<_>>()
                .as_slice()
                .to_buffer(),
        ),
        Dtype::U32 => Storage::U32(
            chunks::<4>(raw)
                .map(u32::from_le_bytes)
                .collect::<Vec<_>>()
                .as_slice()
                .to_buffer(),
        ),
        Dtype::BF16 => Storage::F32(
            chunks::<2>(raw)
                .map(|b| f32::from_bits((u16::from_le_bytes(b) as u32) << 16))
                .collect::<Vec<_>>()
                .as_slice()
                .to_buffer(),
        ),
        Dtype::F16 => Storage::F32(
            chunks::<2>(raw)
                .map(|b| f16_to_f32(u16::from_le_bytes(b)))
                .collect::<Vec<_>>()
                .as_slice()
                .to_buffer(),
        ),
        other => return Err(format!("unsupported dtype {other:?}")),
    };
    Ok(Tensor::from_storage(
        storage,
        kiln_core::Layout::contiguous(shape),
    ))
}

/// IEEE half to single precision.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if mant == 0 => sign,
        0 => {
            // Subnormal: normalise.
            let shift = mant.leading_zeros() - 21;
            sign | ((127 - 15 + 1 - shift) << 23) | ((mant << shift) & 0x3ff) << 13
        }
        0x1f => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::f16_to_f32;

    #[test]
    fn half_precision_decodes_normals_subnormals_and_specials() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
    }
}
