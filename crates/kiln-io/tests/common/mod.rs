//! Shared test helpers: locating (and fetching) the real checkpoints, fixtures, temp files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The repository root (holds `scripts/fetch_models.sh`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|d| d.join("scripts/fetch_models.sh").is_file())
        .expect("repository root with scripts/fetch_models.sh above the crate")
        .to_path_buf()
}

/// `$KILN_MODEL_DIR`, else `<repo>/.cache/models`.
pub fn model_dir() -> PathBuf {
    match std::env::var_os("KILN_MODEL_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root().join(".cache").join("models"),
    }
}

/// `model_dir()/rel`, running `scripts/fetch_models.sh <name>` first when it is missing (the
/// test fails, never skips, when the fetch does not produce it).
pub fn model_file(name: &str, rel: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = model_dir();
    let path = dir.join(rel);
    if !path.is_file() {
        let script = repo_root().join("scripts/fetch_models.sh");
        let status = std::process::Command::new("bash")
            .arg(&script)
            .arg(name)
            .env("KILN_MODEL_DIR", &dir)
            .stdin(std::process::Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            status.success(),
            "`{} {name}` failed ({status})",
            script.display()
        );
        assert!(
            path.is_file(),
            "{} missing after fetching {name}",
            path.display()
        );
    }
    path
}

/// The MiniLM safetensors checkpoint.
pub fn minilm() -> PathBuf {
    model_file("minilm", "all-MiniLM-L6-v2/model.safetensors")
}

/// The SmolLM2 Q4_1 GGUF.
pub fn smollm2() -> PathBuf {
    model_file("smollm2", "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A fixture under tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// A JSON fixture.
pub fn json(name: &str) -> serde_json::Value {
    let p = fixture(name);
    let text = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&text).unwrap()
}

/// A fresh, empty directory for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-io-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// JSON numbers as f32 (exact for values written from f32).
pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// JSON numbers as usizes.
pub fn usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}
