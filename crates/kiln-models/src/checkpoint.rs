//! Reading checkpoint files, and finding the local model cache that `scripts/fetch_models.sh`
//! fills.

use crate::error::ModelError;
use kiln_core::Tensor;
use kiln_nn::StateDict;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The fetch script, relative to the repository root.
pub const FETCH_SCRIPT: &str = "scripts/fetch_models.sh";

/// Reads every tensor of a safetensors checkpoint (F16/BF16 widened to f32). The one place
/// kiln-models reads weight files.
pub fn load_safetensors(path: &Path) -> Result<StateDict, ModelError> {
    let err = |message: String| ModelError::Io {
        path: path.to_path_buf(),
        message,
    };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let st = SafeTensors::deserialize(&data)
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let mut names: Vec<&String> = st.names();
    names.sort();
    let mut sd = StateDict::new();
    for name in names {
        let view = st.tensor(name).map_err(|e| err(format!("{name}: {e}")))?;
        let (raw, shape) = (view.data(), view.shape().to_vec());
        fn le<const N: usize, T>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            raw.chunks_exact(N)
                .map(|c| f(c.try_into().expect("exact chunk")))
                .collect()
        }
        let t = match view.dtype() {
            Dtype::F32 => Tensor::from_vec(le(raw, f32::from_le_bytes), shape),
            Dtype::F64 => Tensor::from_vec(le(raw, f64::from_le_bytes), shape),
            Dtype::I64 => Tensor::from_vec(le(raw, i64::from_le_bytes), shape),
            Dtype::BF16 => Tensor::from_vec(
                le(raw, |b| {
                    f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
                }),
                shape,
            ),
            Dtype::F16 => Tensor::from_vec(le(raw, |b| f16_to_f32(u16::from_le_bytes(b))), shape),
            other => return Err(err(format!("{name}: unsupported dtype {other:?}"))),
        };
        sd.insert(name.clone(), t);
    }
    Ok(sd)
}

/// IEEE half to single precision.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if mant == 0 => sign,
        0 => {
            let shift = mant.leading_zeros() - 21;
            sign | ((127 - 15 + 1 - shift) << 23) | ((mant << shift) & 0x3ff) << 13
        }
        0x1f => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

/// The repository root: the first ancestor holding `scripts/fetch_models.sh`, searched from the
/// running package's `CARGO_MANIFEST_DIR`, this crate's directory, then the current directory.
pub fn repo_root() -> Option<PathBuf> {
    let starts = [
        std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
        std::env::current_dir().ok(),
    ];
    starts.into_iter().flatten().find_map(|start| {
        start
            .ancestors()
            .find(|d| d.join(FETCH_SCRIPT).is_file())
            .map(Path::to_path_buf)
    })
}

/// The model cache: `$KILN_MODEL_DIR` when set, else `.cache/models` under the repository root
/// (or the current directory when no root is found).
pub fn model_cache_dir() -> PathBuf {
    match std::env::var_os("KILN_MODEL_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root()
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".cache")
            .join("models"),
    }
}

/// The directory of all-MiniLM-L6-v2 in the model cache, running
/// `scripts/fetch_models.sh minilm` first when its files are not there.
pub fn minilm_dir() -> Result<PathBuf, ModelError> {
    fetch_model(
        "minilm",
        "all-MiniLM-L6-v2",
        &["config.json", "model.safetensors"],
    )
}

/// `<model cache>/<subdir>`, running `scripts/fetch_models.sh <name>` when one of `files` is
/// missing there. Concurrent callers in one process are serialised (the script itself locks
/// across processes).
pub fn fetch_model(name: &str, subdir: &str, files: &[&str]) -> Result<PathBuf, ModelError> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cache = model_cache_dir();
    let dir = cache.join(subdir);
    let present = || files.iter().all(|f| dir.join(f).is_file());
    if present() {
        return Ok(dir);
    }
    let root = repo_root().ok_or_else(|| ModelError::MissingFile {
        path: dir.join(files.first().copied().unwrap_or("")),
        what: "model files; run scripts/fetch_models.sh from the kiln repository (or set KILN_MODEL_DIR)",
    })?;
    let script = root.join(FETCH_SCRIPT);
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg(name)
        .env("KILN_MODEL_DIR", &cache)
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| ModelError::Io {
            path: script.clone(),
            message: format!("cannot run bash: {e}"),
        })?;
    if !status.success() || !present() {
        return Err(ModelError::Io {
            path: script,
            message: format!(
                "`fetch_models.sh {name}` failed ({status}) to put {files:?} in {}; its messages above say why",
                dir.display()
            ),
        });
    }
    Ok(dir)
}

/// Writes f32 / i64 tensors of `sd` as a safetensors file (tests build odd checkpoints with it).
#[cfg(test)]
pub(crate) fn write_safetensors(sd: &StateDict, path: &Path) {
    use safetensors::tensor::TensorView;
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = sd
        .iter()
        .map(|(n, t)| {
            let (dtype, bytes) = match t.dtype() {
                kiln_core::DType::F32 => (
                    Dtype::F32,
                    t.contiguous()
                        .to_vec::<f32>()
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
                kiln_core::DType::I64 => (
                    Dtype::I64,
                    t.contiguous()
                        .to_vec::<i64>()
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
                other => panic!("write_safetensors: unsupported dtype {other}"),
            };
            (n.to_string(), dtype, t.dims().to_vec(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_decodes() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
    }

    #[test]
    fn bad_files_name_the_path() {
        let dir = std::env::temp_dir().join(format!("kiln-models-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.safetensors");
        std::fs::write(&p, b"nonsense").unwrap();
        let e = load_safetensors(&p).err().unwrap().to_string();
        assert!(
            e.contains("bad.safetensors") && e.contains("not a valid safetensors file"),
            "{e}"
        );
        let e = load_safetensors(&dir.join("none.safetensors"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("none.safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
