//! A small CNN on Fashion-MNIST (Debian's `dataset-fashion-mnist`: 60k training and the official
//! 10k test images): two blocks of Conv2d 3×3 → BatchNorm2d → ReLU → MaxPool2d(2), then dropout,
//! a 128-unit hidden layer and 10 logits, trained with Adam and cross-entropy.
//!
//! Run: `cargo run --release --example fashion_cnn [-- --epochs N]`
//! (the data is fetched by `scripts/fetch_data.sh fashion` on first use).

use kiln::data::{datasets, DataError, DataLoader, Normalize, Split, TensorDataset};
use kiln::prelude::*;
use std::time::Instant;

/// Training settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Passes over the training set.
    pub epochs: usize,
    /// Examples per mini-batch.
    pub batch_size: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Channels of the two convolution blocks.
    pub channels: (usize, usize),
    /// Seed of the initialisation, the shuffling and the dropout masks.
    pub seed: u64,
    /// Use only the first this-many training images (all when `None`).
    pub train_limit: Option<usize>,
    /// Evaluate on only the first this-many test images (all when `None`).
    pub test_limit: Option<usize>,
    /// Show a progress bar per epoch.
    pub progress: bool,
    /// Print a line per epoch.
    pub verbose: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            epochs: 4,
            batch_size: 64,
            lr: 1e-3,
            channels: (32, 64),
            seed: 0,
            train_limit: None,
            test_limit: None,
            progress: true,
            verbose: true,
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Mean training loss of each epoch.
    pub train_loss: Vec<f64>,
    /// Test accuracy (in [0, 1]) after each epoch.
    pub test_accuracy: Vec<f64>,
    /// Training and test example counts.
    pub sizes: (usize, usize),
    /// Wall time of the training loop (evaluation included), in seconds.
    pub seconds: f64,
}

/// The CNN, for `[N, 1, 28, 28]` images.
pub fn model(cfg: &Config) -> Sequential {
    let mut rng = Rng::new(cfg.seed);
    let (c1, c2) = cfg.channels;
    let same = Conv2dConfig::default().padding(1);
    seq![
        Conv2d::with_config(1, c1, 3, same, &mut rng),
        BatchNorm2d::new(c1),
        Relu,
        MaxPool2d::new(2),
        Conv2d::with_config(c1, c2, 3, same, &mut rng),
        BatchNorm2d::new(c2),
        Relu,
        MaxPool2d::new(2),
        Flatten::new(),
        Dropout::new(0.25, cfg.seed + 1),
        Linear::new(c2 * 7 * 7, 128, &mut rng),
        Relu,
        Dropout::new(0.25, cfg.seed + 2),
        Linear::new(128, 10, &mut rng)
    ]
}

/// Share of `data` the model classifies correctly, evaluated in batches (eval mode, no graph).
pub fn accuracy(net: &Sequential, data: &TensorDataset, batch_size: usize) -> f64 {
    net.eval();
    let mut hits = 0usize;
    with_no_grad(|| {
        let mut start = 0;
        while start < data.len() {
            let len = batch_size.min(data.len() - start);
            let part = data.slice(start, len);
            let pred = net
                .forward(part.features())
                .argmax(1, false)
                .to_vec::<i64>();
            let truth = part.labels().to_vec::<i64>();
            hits += pred.iter().zip(&truth).filter(|(p, t)| p == t).count();
            start += len;
        }
    });
    hits as f64 / data.len().max(1) as f64
}

fn limit(data: TensorDataset, n: Option<usize>) -> TensorDataset {
    match n {
        Some(n) if n < data.len() => data.slice(0, n),
        _ => data,
    }
}

/// Loads Fashion-MNIST (fetching it when missing), trains, and evaluates on the test set after
/// every epoch.
pub fn run(cfg: &Config) -> Result<Report, DataError> {
    let train = limit(
        datasets::fashion_mnist_or_fetch(Split::Train)?,
        cfg.train_limit,
    );
    let test = limit(datasets::fashion_mnist(Split::Test)?, cfg.test_limit);
    // Standardise with the training set's statistics only.
    let norm = Normalize::fit_global(train.features());
    let (train, test) = (train.normalized(&norm), test.normalized(&norm));
    let sizes = (train.len(), test.len());

    let net = model(cfg);
    let mut opt = Adam::new(net.named_parameters(), cfg.lr).expect("valid Adam settings");
    let mut loader = DataLoader::new(train, cfg.batch_size).shuffle(cfg.seed);
    let mut report = Report {
        train_loss: Vec::new(),
        test_accuracy: Vec::new(),
        sizes,
        seconds: 0.0,
    };
    if cfg.verbose {
        println!(
            "Fashion-MNIST: {} train / {} test images, {} parameters\n{}",
            sizes.0,
            sizes.1,
            net.num_parameters(),
            net.summary()
        );
    }
    let start = Instant::now();
    for epoch in 1..=cfg.epochs {
        let t0 = Instant::now();
        net.train();
        let bar = cfg.progress.then(|| {
            kiln::data::progress::batch_bar(
                loader.len() as u64,
                format!("epoch {epoch}/{}", cfg.epochs),
            )
        });
        let (mut sum, mut count) = (0.0, 0usize);
        for (x, y) in loader.iter() {
            opt.zero_grad();
            let loss = loss::cross_entropy(&net.forward(&x), &y, None, -100, Reduction::Mean, 0.0);
            loss.backward();
            opt.step();
            let n = y.elem_count();
            sum += loss.item() * n as f64;
            count += n;
            if let Some(bar) = &bar {
                bar.inc(1);
                bar.set_message(format!("loss {:.4}", sum / count as f64));
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let acc = accuracy(&net, &test, 500);
        report.train_loss.push(sum / count as f64);
        report.test_accuracy.push(acc);
        if cfg.verbose {
            println!(
                "epoch {epoch:>2}/{}  train loss {:.4}  test accuracy {:.2}%  ({:.1} s)",
                cfg.epochs,
                sum / count as f64,
                100.0 * acc,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Test accuracy the full run must reach.
pub const TARGET_ACCURACY: f64 = 0.89;

#[allow(dead_code)]
fn main() {
    let mut cfg = Config::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--epochs" => {
                cfg.epochs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&e: &usize| e > 0)
                    .unwrap_or_else(|| usage("--epochs needs a positive integer"))
            }
            "--no-progress" => cfg.progress = false,
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let report = match run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let acc = *report.test_accuracy.last().unwrap_or(&0.0);
    println!(
        "final test accuracy {:.2}% after {} epochs; training and evaluation took {:.1} s",
        100.0 * acc,
        cfg.epochs,
        report.seconds
    );
    if acc < TARGET_ACCURACY {
        eprintln!("FAILED: below the {:.0}% target", 100.0 * TARGET_ACCURACY);
        std::process::exit(1);
    }
}

#[allow(dead_code)]
fn usage(msg: &str) -> ! {
    eprintln!("error: {msg}\nusage: fashion_cnn [--epochs N] [--no-progress]");
    std::process::exit(2);
}
