//! Trainer equivalences on a small random BERT with the real MiniLM tokenizer: gradient
//! accumulation equals the full batch, a killed-and-resumed run equals an uninterrupted one, and
//! a short run learns a separable task.

use kiln_core::Rng;
use kiln_data::Tokenizer;
use kiln_models::{BertConfig, BertForSequenceClassification};
use kiln_nn::ModuleExt;
use kiln_tune::data::{Example, LabelKind};
use kiln_tune::{Metric, Schedule, Strategy, TextDataset, TrainConfig, Trainer};
use std::path::PathBuf;

fn tokenizer() -> Tokenizer {
    let dir = kiln_models::checkpoint::minilm_dir().expect("MiniLM files");
    Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
}

fn model(dropout: f64, seed: u64) -> BertForSequenceClassification {
    let config = BertConfig::small(30522, 16, 2, 2)
        .dropout(dropout)
        .labels(vec!["neg".into(), "pos".into()]);
    BertForSequenceClassification::new(&config, &mut Rng::new(seed))
}

/// Sentences whose label is whether they contain a positive or a negative word.
fn dataset(n: usize, seed: u64) -> TextDataset {
    let pos = ["good", "great", "wonderful", "moving", "brilliant"];
    let neg = ["bad", "awful", "dull", "boring", "terrible"];
    let fill = [
        "the film was",
        "a",
        "truly",
        "plot and acting",
        "overall",
        "this movie is",
    ];
    let mut rng = Rng::new(seed);
    let mut pick = |v: &[&str]| v[(rng.next_u64() % v.len() as u64) as usize].to_string();
    let examples = (0..n)
        .map(|i| {
            let label = if i % 2 == 0 { "pos" } else { "neg" };
            let word = if i % 2 == 0 { pick(&pos) } else { pick(&neg) };
            Example {
                text: format!("{} {} {}", pick(&fill), word, pick(&fill)),
                text_pair: None,
                label: label.into(),
                line: i + 1,
            }
        })
        .collect();
    TextDataset::from_examples(
        examples,
        LabelKind::Classes(vec!["neg".into(), "pos".into()]),
        "synthetic",
    )
    .unwrap()
}

fn quiet(cfg: TrainConfig) -> TrainConfig {
    TrainConfig {
        progress: false,
        ..cfg
    }
}

fn weights(m: &BertForSequenceClassification) -> Vec<(String, Vec<f32>)> {
    m.named_parameters()
        .into_iter()
        .map(|(n, p)| (n, p.to_vec::<f32>()))
        .collect()
}

fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            va.iter().zip(vb).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-tune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn accumulated_gradient_equals_full_batch() {
    let tok = tokenizer();
    let data = dataset(24, 1);
    let base = TrainConfig {
        epochs: 1,
        max_steps: Some(1),
        warmup_ratio: 0.0,
        schedule: Schedule::Constant,
        max_grad_norm: None,
        lr: 1e-2,
        weight_decay: 0.0,
        ..TrainConfig::default()
    };
    // Rows of unequal micro-batch sizes (10 + 10 + 4 in one window) exercise the normalisation.
    let full = model(0.0, 3);
    Trainer::new(quiet(TrainConfig {
        batch_size: 24,
        ..base.clone()
    }))
    .fit(&full, &tok, &data, None)
    .unwrap();
    let accum = model(0.0, 3);
    Trainer::new(quiet(TrainConfig {
        batch_size: 10,
        grad_accum: 3,
        ..base.clone()
    }))
    .fit(&accum, &tok, &data, None)
    .unwrap();
    let untouched = weights(&model(0.0, 3));
    let d_full = max_diff(&weights(&full), &untouched);
    assert!(d_full > 1e-4, "the step changed nothing ({d_full})");
    let d = max_diff(&weights(&full), &weights(&accum));
    assert!(
        d < 2e-6,
        "accumulated step differs from the full-batch step by {d}"
    );
}

#[test]
fn killed_and_resumed_run_equals_uninterrupted_run() {
    let tok = tokenizer();
    let data = dataset(40, 2);
    let (train, valid) = data.split(0.25, 0).unwrap();
    let cfg = |dir: PathBuf| {
        quiet(TrainConfig {
            epochs: 2,
            batch_size: 8,
            lr: 1e-3,
            checkpoint_every: Some(2),
            out_dir: Some(dir),
            ..TrainConfig::default()
        })
    };
    let whole = model(0.1, 5);
    let dir_a = temp_dir("whole");
    Trainer::new(cfg(dir_a.clone()))
        .strategy(Strategy::full().llrd(0.8))
        .fit(&whole, &tok, &train, Some(&valid))
        .unwrap();

    let dir_b = temp_dir("resumed");
    let first = model(0.1, 5);
    // Fails right after step 3 (mid-epoch: 4 steps per epoch), as a kill would.
    let err = Trainer::new(cfg(dir_b.clone()))
        .strategy(Strategy::full().llrd(0.8))
        .stop_after_steps(3)
        .fit(&first, &tok, &train, Some(&valid))
        .unwrap_err();
    assert!(err.to_string().contains("stopped"), "{err}");
    // A new process: fresh model object, same recipe, resumes from the checkpoint of step 2.
    let second = model(0.1, 5);
    let report = Trainer::new(cfg(dir_b.clone()))
        .strategy(Strategy::full().llrd(0.8))
        .fit(&second, &tok, &train, Some(&valid))
        .unwrap();
    assert_eq!(report.steps, 8);
    let d = max_diff(&weights(&whole), &weights(&second));
    assert_eq!(
        d, 0.0,
        "resumed run differs from the uninterrupted one by {d}"
    );
    assert!(dir_b.join("metrics.jsonl").is_file());
    assert!(dir_b.join("curves.png").is_file());
}

#[test]
fn a_short_run_learns_a_separable_task() {
    let tok = tokenizer();
    let train = dataset(192, 3);
    let valid = dataset(64, 4);
    let m = model(0.0, 7);
    let mut trainer = Trainer::new(quiet(TrainConfig {
        epochs: 10,
        batch_size: 16,
        lr: 1e-2,
        metrics: vec![Metric::Accuracy, Metric::MacroF1],
        ..TrainConfig::default()
    }));
    let before = trainer
        .evaluate(&m, &tok, &valid)
        .unwrap()
        .value(Metric::Accuracy);
    let report = trainer.fit(&m, &tok, &train, Some(&valid)).unwrap();
    let after = trainer
        .evaluate(&m, &tok, &valid)
        .unwrap()
        .value(Metric::Accuracy);
    let best = report.best.unwrap().metrics["accuracy"];
    assert!(after >= 0.95, "accuracy {before} → {after}");
    assert_eq!(after, best, "the best model is restored");
}

#[test]
fn bad_configurations_are_errors_naming_the_field() {
    let tok = tokenizer();
    let data = dataset(8, 1);
    let m = model(0.0, 1);
    for (cfg, field) in [
        (
            TrainConfig {
                batch_size: 0,
                ..TrainConfig::default()
            },
            "batch_size",
        ),
        (
            TrainConfig {
                lr: -1.0,
                ..TrainConfig::default()
            },
            "lr",
        ),
        (
            TrainConfig {
                grad_accum: 0,
                ..TrainConfig::default()
            },
            "grad_accum",
        ),
        (
            TrainConfig {
                warmup_ratio: 1.5,
                ..TrainConfig::default()
            },
            "warmup_ratio",
        ),
    ] {
        let e = Trainer::new(quiet(cfg))
            .fit(&m, &tok, &data, None)
            .unwrap_err();
        assert!(e.to_string().contains(field), "{e}");
    }
    let other = TextDataset::from_examples(
        vec![Example {
            text: "x".into(),
            text_pair: None,
            label: "a".into(),
            line: 1,
        }],
        LabelKind::Classes(vec!["a".into(), "b".into()]),
        "other",
    )
    .unwrap();
    let e = Trainer::new(quiet(TrainConfig::default()))
        .fit(&m, &tok, &data, Some(&other))
        .unwrap_err();
    assert!(e.to_string().contains("validation labels"), "{e}");
}

/// Names of the tensors that differ between two weight snapshots.
fn changed(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> Vec<String> {
    a.iter()
        .zip(b)
        .filter(|((_, va), (_, vb))| va != vb)
        .map(|((n, _), _)| n.clone())
        .collect()
}

#[test]
fn gradual_unfreezing_by_steps_trains_one_more_depth_every_n_steps() {
    let tok = tokenizer();
    let data = dataset(40, 6);
    // 40 rows in batches of 8: 5 steps per epoch, so the depth boundaries (every 2 steps) fall
    // inside epochs and one crosses the epoch boundary.
    let run = |steps: usize| {
        let m = model(0.0, 11);
        let before = weights(&m);
        let report = Trainer::new(quiet(TrainConfig {
            epochs: 3,
            max_steps: Some(steps),
            batch_size: 8,
            lr: 1e-3,
            ..TrainConfig::default()
        }))
        .strategy(Strategy::full().gradual_unfreeze_steps(2))
        .fit(&m, &tok, &data, None)
        .unwrap();
        assert_eq!(report.steps, steps);
        changed(&before, &weights(&m))
    };
    let depth_of = |n: &str| {
        if n.contains("embeddings") {
            3
        } else if n.contains("layer.0.") {
            2
        } else if n.contains("layer.1.") {
            1
        } else {
            0
        }
    };
    let all: Vec<String> = model(0.0, 11)
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    // Steps 0-1 train the head, steps 2-3 also the last layer, steps 4-5 also the first layer;
    // the embeddings (depth 3) would start at step 6.
    for (steps, depths) in [(2, 1), (4, 2), (6, 3)] {
        let expected: Vec<String> = all
            .iter()
            .filter(|n| depth_of(n) < depths)
            .cloned()
            .collect();
        assert_eq!(run(steps), expected, "after {steps} steps");
    }
}

#[test]
fn resume_restores_the_frozen_set_of_step_unfreezing() {
    let tok = tokenizer();
    let data = dataset(40, 2);
    let (train, valid) = data.split(0.25, 0).unwrap();
    let strategy = || Strategy::full().gradual_unfreeze_steps(2).llrd(0.9);
    let cfg = |dir: PathBuf| {
        quiet(TrainConfig {
            epochs: 2,
            batch_size: 8,
            lr: 1e-3,
            checkpoint_every: Some(1),
            out_dir: Some(dir),
            // The final weights, not the best evaluation's (checked below).
            restore_best: false,
            ..TrainConfig::default()
        })
    };
    let whole = model(0.1, 5);
    let dir_a = temp_dir("steps-whole");
    Trainer::new(cfg(dir_a))
        .strategy(strategy())
        .fit(&whole, &tok, &train, Some(&valid))
        .unwrap();
    // Killed after step 3: in the middle of depth period 1 and of epoch 1.
    let dir_b = temp_dir("steps-resumed");
    let first = model(0.1, 5);
    Trainer::new(cfg(dir_b.clone()))
        .strategy(strategy())
        .stop_after_steps(3)
        .fit(&first, &tok, &train, Some(&valid))
        .unwrap_err();
    let second = model(0.1, 5);
    let report = Trainer::new(cfg(dir_b))
        .strategy(strategy())
        .fit(&second, &tok, &train, Some(&valid))
        .unwrap();
    assert_eq!(report.steps, 8);
    let d = max_diff(&weights(&whole), &weights(&second));
    assert_eq!(d, 0.0, "resumed run differs by {d}");
    // The embeddings (depth 3, from step 6) trained in the last two steps of both runs.
    let untouched = weights(&model(0.1, 5));
    assert!(changed(&untouched, &weights(&second))
        .iter()
        .any(|n| n.contains("embeddings")));
}
