//! Reading checkpoint files, and finding the local model cache that `scripts/fetch_models.sh`
//! fills.

use crate::error::ModelError;
use kiln_nn::StateDict;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The fetch script, relative to the repository root.
pub const FETCH_SCRIPT: &str = "scripts/fetch_models.sh";

/// Reads every tensor of a safetensors checkpoint, memory-mapped (F16/BF16 widened to f32),
/// through kiln-io. The one place kiln-models reads weight files.
pub fn load_safetensors(path: &Path) -> Result<StateDict, ModelError> {
    kiln_io::SafetensorsFile::open(path)
        .and_then(|f| f.to_state_dict())
        .map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// The repository root (the directory holding `scripts/`), as kiln-data finds it.
pub use kiln_data::datasets::repo_root;

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

/// Writes `sd` as a safetensors file (tests build odd checkpoints with it).
#[cfg(test)]
pub(crate) fn write_safetensors(sd: &StateDict, path: &Path) {
    kiln_io::save(sd, path).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_name_the_path() {
        let dir = std::env::temp_dir().join(format!("kiln-models-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.safetensors");
        std::fs::write(&p, b"nonsense").unwrap();
        let e = load_safetensors(&p).err().unwrap().to_string();
        assert!(e.contains("bad.safetensors") && e.contains("header"), "{e}");
        let e = load_safetensors(&dir.join("none.safetensors"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("none.safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
