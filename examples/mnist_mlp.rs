//! An MLP (784-256-128-10, ReLU, optional dropout) trained with Adam and cross-entropy on
//! MNIST 5k: a seeded 80/20 split, per-epoch train loss and held-out accuracy.
//!
//! Run: `cargo run --release --example mnist_mlp [-- --epochs N --seed S --no-progress]`
//! (the data is fetched by `scripts/fetch_data.sh mnist` on first use).

use kiln::data::{datasets, DataError, DataLoader, Normalize, TensorDataset};
use kiln::nn::CosineAnnealingLR;
use kiln::prelude::*;
use std::time::Instant;

/// Training settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Passes over the training set.
    pub epochs: usize,
    /// Examples per mini-batch.
    pub batch_size: usize,
    /// Adam's initial learning rate, annealed to 0 over the epochs (cosine).
    pub lr: f64,
    /// Widths of the two hidden layers.
    pub hidden: (usize, usize),
    /// Dropout after each hidden layer (0 for none).
    pub dropout: f64,
    /// Seed of the split, the initialisation, the shuffling and the dropout masks.
    pub seed: u64,
    /// Fraction of the 5000 examples used for training; the rest is held out.
    pub train_fraction: f64,
    /// Show a progress bar per epoch.
    pub progress: bool,
    /// Print a line per epoch.
    pub verbose: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            epochs: 20,
            batch_size: 64,
            lr: 2e-3,
            hidden: (256, 128),
            dropout: 0.4,
            seed: 0,
            train_fraction: 0.8,
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
    /// Held-out accuracy (in [0, 1]) after each epoch.
    pub test_accuracy: Vec<f64>,
    /// Training and held-out example counts.
    pub sizes: (usize, usize),
    /// Wall time of the training loop, in seconds.
    pub seconds: f64,
}

/// The MLP: flatten `[N, 1, 28, 28]`, two ReLU hidden layers (with dropout when asked), 10 logits.
pub fn model(cfg: &Config) -> Sequential {
    let mut rng = Rng::new(cfg.seed);
    let (h1, h2) = cfg.hidden;
    let mut m = Sequential::new().with(Flatten::new());
    for (i, (fan_in, fan_out)) in [(784, h1), (h1, h2)].into_iter().enumerate() {
        m.push(Linear::new(fan_in, fan_out, &mut rng));
        m.push(Relu);
        if cfg.dropout > 0.0 {
            m.push(Dropout::new(cfg.dropout, cfg.seed + 1 + i as u64));
        }
    }
    m.with(Linear::new(h2, 10, &mut rng))
}

/// Share of rows of `logits` whose argmax is the label.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    let pred = logits.argmax(1, false).to_vec::<i64>();
    let truth = labels.to_vec::<i64>();
    let hits = pred.iter().zip(&truth).filter(|(p, t)| p == t).count();
    hits as f64 / truth.len().max(1) as f64
}

/// Loads MNIST 5k (fetching it when missing), trains, and evaluates after every epoch.
pub fn run(cfg: &Config) -> Result<Report, DataError> {
    let data = datasets::mnist_5k_or_fetch()?;
    let (train, test) = data.train_test_split(cfg.train_fraction, cfg.seed);
    // Standardise with the training set's statistics only.
    let norm = Normalize::fit_global(train.features());
    let (train, test): (TensorDataset, TensorDataset) =
        (train.normalized(&norm), test.normalized(&norm));
    let sizes = (train.len(), test.len());

    let net = model(cfg);
    let mut opt = Adam::new(net.named_parameters(), cfg.lr).expect("valid Adam settings");
    let mut sched = CosineAnnealingLR::new(&opt, cfg.epochs as u64, 0.0).expect("valid schedule");
    let mut loader = DataLoader::new(train, cfg.batch_size).shuffle(cfg.seed);
    let mut report = Report {
        train_loss: Vec::new(),
        test_accuracy: Vec::new(),
        sizes,
        seconds: 0.0,
    };
    if cfg.verbose {
        println!(
            "MNIST 5k: {} train / {} held-out, model {:?}, {} parameters",
            sizes.0,
            sizes.1,
            net,
            net.num_parameters()
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
        sched.step();
        net.eval();
        let acc = with_no_grad(|| accuracy(&net.forward(test.features()), test.labels()));
        report.train_loss.push(sum / count as f64);
        report.test_accuracy.push(acc);
        if cfg.verbose {
            println!(
                "epoch {epoch:>2}/{}  train loss {:.4}  held-out accuracy {:.2}%  ({:.2} s)",
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

/// Accuracy the full run must reach on the held-out 20%.
pub const TARGET_ACCURACY: f64 = 0.94;

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
                    .unwrap_or_else(|| usage("--epochs needs a positive integer"))
            }
            "--seed" => {
                cfg.seed = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage("--seed needs a non-negative integer"))
            }
            "--lr" => cfg.lr = parse(it.next(), "--lr needs a number"),
            "--batch-size" => {
                cfg.batch_size = parse(it.next(), "--batch-size needs a positive integer")
            }
            "--dropout" => cfg.dropout = parse(it.next(), "--dropout needs a number in [0, 1)"),
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
        "final held-out accuracy {:.2}% after {} epochs, training took {:.2} s",
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
fn parse<T: std::str::FromStr>(v: Option<&String>, msg: &str) -> T {
    v.and_then(|v| v.parse().ok()).unwrap_or_else(|| usage(msg))
}

#[allow(dead_code)]
fn usage(msg: &str) -> ! {
    eprintln!("error: {msg}\nusage: mnist_mlp [--epochs N] [--seed S] [--lr LR] [--batch-size B] [--dropout P] [--no-progress]");
    std::process::exit(2);
}
