//! Reading a whole file, gunzipping it when it is a gzip stream.

use crate::error::{DataError, Result};
use flate2::read::MultiGzDecoder;
use std::io::Read;
use std::path::Path;

/// The bytes of `path`, decompressed when the file starts with the gzip magic (`1f 8b`),
/// whatever its extension. An empty result (before or after decompression) is an error.
pub fn read_file(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let raw = std::fs::read(path).map_err(|e| {
        DataError::io(
            path,
            if e.kind() == std::io::ErrorKind::NotFound {
                "file not found"
            } else {
                "cannot read"
            },
            e,
        )
    })?;
    if raw.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    if raw.len() < 2 || raw[..2] != [0x1f, 0x8b] {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len() * 4);
    MultiGzDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .map_err(|e| DataError::io(path, "corrupt gzip stream", e))?;
    if out.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod test_util {
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "kiln-data-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        /// Writes `bytes` to `name` in the directory (gzipped when `name` ends in `.gz`).
        pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            if name.ends_with(".gz") {
                let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
                enc.write_all(bytes).unwrap();
                std::fs::write(&path, enc.finish().unwrap()).unwrap();
            } else {
                std::fs::write(&path, bytes).unwrap();
            }
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::TempDir;
    use super::*;

    #[test]
    fn reads_plain_and_gzipped_files_alike() {
        let dir = TempDir::new("file");
        let plain = dir.write("a.bin", b"hello, world");
        let gz = dir.write("a.bin.gz", b"hello, world");
        assert_eq!(read_file(&plain).unwrap(), b"hello, world");
        assert_eq!(read_file(&gz).unwrap(), b"hello, world");
        assert_ne!(std::fs::read(&gz).unwrap(), b"hello, world");
    }

    #[test]
    fn missing_empty_and_corrupt_files_are_errors_naming_the_file() {
        let dir = TempDir::new("file-err");
        let err = read_file(dir.0.join("nope.csv")).unwrap_err().to_string();
        assert!(
            err.contains("nope.csv") && err.contains("file not found"),
            "{err}"
        );
        let empty = dir.write("empty.idx", b"");
        let err = read_file(&empty).unwrap_err().to_string();
        assert!(
            err.contains("empty.idx") && err.ends_with("file is empty"),
            "{err}"
        );
        let empty_gz = dir.write("empty.idx.gz", b"");
        let err = read_file(&empty_gz).unwrap_err().to_string();
        assert!(
            err.contains("empty.idx.gz") && err.ends_with("file is empty"),
            "{err}"
        );
        // A gzip header followed by garbage (a name without .gz: `write` would gzip it).
        let bad = dir.write("bad.bin", &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3]);
        let err = read_file(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.bin") && err.contains("corrupt gzip stream"),
            "{err}"
        );
    }
}
