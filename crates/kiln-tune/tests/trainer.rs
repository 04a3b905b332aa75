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

#[test]
fn one_cycle_matches_torch_one_cycle_lr() {
    // Written by scripts/make_schedule_fixtures.py from torch.optim.lr_scheduler.OneCycleLR.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/one_cycle.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let max_lr = fixture["max_lr"].as_f64().unwrap();
    let mut worst = 0.0f64;
    for case in fixture["cases"].as_array().unwrap() {
        let total = case["total"].as_u64().unwrap() as usize;
        let warmup = case["warmup"].as_u64().unwrap() as usize;
        let lrs = case["lrs"].as_array().unwrap();
        assert_eq!(lrs.len(), total);
        for (step, want) in lrs.iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = max_lr * Schedule::OneCycle.factor(step, warmup, total);
            let rel = (got - want).abs() / want;
            worst = worst.max(rel);
            assert!(
                rel < 1e-9,
                "total {total} warmup {warmup} step {step}: kiln {got:e}, torch {want:e}"
            );
        }
    }
    eprintln!("one-cycle: max relative difference to torch {worst:e}");
}

#[test]
fn one_cycle_drives_the_trainer_lr() {
    struct Lrs(std::sync::Arc<std::sync::Mutex<Vec<f64>>>);
    impl kiln_tune::Callback for Lrs {
        fn on_step(&mut self, _step: usize, _loss: f64, lr: f64) -> bool {
            self.0.lock().unwrap().push(lr);
            true
        }
    }
    let tok = tokenizer();
    let data = dataset(40, 1);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let cfg = quiet(TrainConfig {
        epochs: 2,
        batch_size: 8,
        lr: 1e-3,
        warmup_ratio: 0.3,
        schedule: Schedule::OneCycle,
        ..TrainConfig::default()
    });
    Trainer::new(cfg)
        .callback(Lrs(seen.clone()))
        .fit(&model(0.0, 1), &tok, &data, None)
        .unwrap();
    let lrs = seen.lock().unwrap().clone();
    // 10 steps, warmup round(0.3 × 10) = 3: the peak at step index 2.
    assert_eq!(lrs.len(), 10);
    let expected: Vec<f64> = (0..10)
        .map(|s| 1e-3 * Schedule::OneCycle.factor(s, 3, 10))
        .collect();
    assert_eq!(lrs, expected);
    assert!((lrs[0] - 1e-3 / 25.0).abs() < 1e-15 && lrs[2] == 1e-3);
    assert!((lrs[9] - 1e-3 / 25.0 / 1e4).abs() < 1e-15);
}

#[test]
fn lr_finder_sweeps_suggests_and_restores_the_model() {
    use kiln_tune::{find_lr, LrFinderConfig};
    let tok = tokenizer();
    let data = dataset(64, 8);
    let m = model(0.1, 9);
    // A frozen tensor and eval mode, to see that both come back.
    m.bert
        .embeddings
        .position_embeddings
        .weight
        .tensor()
        .set_requires_grad(false);
    m.eval();
    let before = weights(&m);
    let rng_before = m.rng_states();
    let flags = |m: &BertForSequenceClassification| -> Vec<bool> {
        m.named_parameters()
            .into_iter()
            .map(|(_, p)| p.is_trainable())
            .collect()
    };
    let flags_before = flags(&m);
    let dir = temp_dir("lr-finder");
    let config = LrFinderConfig {
        steps: 60,
        batch_size: 16,
        end_lr: 100.0,
        strategy: Strategy::full().llrd(0.9),
        out_dir: Some(dir.clone()),
        ..LrFinderConfig::default()
    };
    let found = find_lr(&m, &tok, &data, &config).unwrap();
    // Restored bit for bit: weights, random generators, gradient flags, eval mode.
    assert_eq!(weights(&m), before);
    assert_eq!(m.rng_states(), rng_before);
    assert_eq!(flags(&m), flags_before);
    assert!(!m.bert.embeddings.dropout.is_training());
    assert!(m.classifier.weight.grad().is_none());
    // An exponential sweep from start_lr, stopped by the divergence rule.
    let n = found.lrs.len();
    assert!((3..=60).contains(&n), "{n} sweep steps");
    for (i, lr) in found.lrs.iter().enumerate() {
        assert_eq!(*lr, config.lr_at(i));
    }
    assert_eq!(found.lrs[0], 1e-7);
    assert_eq!((found.losses.len(), found.smoothed.len()), (n, n));
    let min = found.smoothed.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!(found.diverged, "lr up to 100 must blow the loss up");
    assert!(found.smoothed[n - 1] > 4.0 * min || !found.losses[n - 1].is_finite());
    assert!(found.smoothed[..n - 1].iter().all(|&s| s <= 4.0 * min));
    // The suggestion is a swept lr below the divergence, and the loss falls there.
    let at = found
        .lrs
        .iter()
        .position(|&l| l == found.suggestion)
        .unwrap();
    assert!(at < n - 1);
    assert!(found.smoothed[at + 1] < found.smoothed[at.saturating_sub(1)]);
    assert!(found.table().contains("<- suggestion"));
    assert!(dir.join("lr_finder.png").is_file());
    assert_eq!(
        std::fs::read_to_string(dir.join("lr_finder.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"train\""))
            .count(),
        n
    );
    // The same sweep again gives the same numbers (the model really was restored).
    let again = find_lr(&m, &tok, &data, &config).unwrap();
    assert_eq!(again, found);
}

/// `text,label` rows whose label is 0.5 per positive word minus 0.5 per negative word, plus 0.25
/// (real values: the task is detected as regression).
fn regression_csv(path: &std::path::Path, rows: usize) {
    let pos = ["good", "great", "wonderful"];
    let neg = ["bad", "awful", "dull"];
    let mut s = String::from("text,label\n");
    for i in 0..rows {
        let (p, n) = (i % 4, (i / 4) % 3);
        let mut words: Vec<&str> = vec!["the film was"];
        words.extend((0..p).map(|k| pos[(i + k) % 3]));
        words.extend((0..n).map(|k| neg[(i + k) % 3]));
        let value = 0.5 * p as f64 - 0.5 * n as f64 + 0.25;
        s.push_str(&format!("{},{value}\n", words.join(" ")));
    }
    std::fs::write(path, s).unwrap();
}

#[test]
fn a_recipe_on_real_valued_labels_trains_a_regression_head() {
    use kiln_tune::{is_regression_model, predict_values, DataSpec, Recipe, TaskKind};
    let root = temp_dir("regression");
    std::fs::create_dir_all(&root).unwrap();
    let base = root.join("base");
    let tok_path = kiln_models::checkpoint::minilm_dir()
        .unwrap()
        .join("tokenizer.json");
    kiln_tune::save_classifier(&model(0.0, 4), &tok_path, &base).unwrap();
    // A pretrained encoder without a task head (as MiniLM is): drop the 2-class classifier.
    let weights_path = base.join("model.safetensors");
    let encoder: kiln_nn::StateDict = kiln_nn::safetensors_io::load(&weights_path)
        .unwrap()
        .iter()
        .filter(|(n, _)| !n.starts_with("classifier."))
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    kiln_nn::safetensors_io::save(&encoder, &weights_path).unwrap();
    let csv = root.join("scores.csv");
    regression_csv(&csv, 200);
    let mut recipe = Recipe::new(&base, DataSpec::new(&csv), root.join("out"));
    recipe.train = quiet(TrainConfig {
        epochs: 10,
        batch_size: 16,
        lr: 1e-2,
        ..TrainConfig::default()
    });
    assert_eq!(recipe.data.task, TaskKind::Auto);
    let report = recipe.run().unwrap();
    assert!(report.labels.is_empty() && report.confusion.is_empty());
    let keys: Vec<&str> = report.valid.keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["loss", "mae", "mse"]);
    let out = root.join("out");
    assert!(is_regression_model(&out).unwrap());
    assert!(!is_regression_model(&base).unwrap());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["problem_type"], "regression");
    // The reported MSE / MAE are those of the saved model's predictions on the validation rows.
    let (model, tok) = kiln_tune::load_classifier(&out).unwrap();
    let valid =
        TextDataset::from_file_regression(out.join("valid.csv"), &kiln_tune::Columns::default())
            .unwrap();
    let texts: Vec<String> = (0..valid.len())
        .map(|i| valid.examples()[i].text.clone())
        .collect();
    let targets: Vec<f64> = (0..valid.len()).map(|i| valid.target(i)).collect();
    let preds = predict_values(&model, &tok, &texts, 7, 128).unwrap();
    let n = preds.len() as f64;
    let mse = preds
        .iter()
        .zip(&targets)
        .map(|(p, t)| (p - t).powi(2))
        .sum::<f64>()
        / n;
    let mae = preds
        .iter()
        .zip(&targets)
        .map(|(p, t)| (p - t).abs())
        .sum::<f64>()
        / n;
    assert!(
        (mse - report.valid["mse"]).abs() < 1e-5,
        "{mse} vs {:?}",
        report.valid
    );
    assert!(
        (mae - report.valid["mae"]).abs() < 1e-5,
        "{mae} vs {:?}",
        report.valid
    );
    // It learned: better than always predicting the mean target.
    let mean = targets.iter().sum::<f64>() / n;
    let var = targets.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / n;
    assert!(mse < 0.5 * var, "mse {mse}, variance {var}");
    // Integer labels stay classes unless the task says otherwise.
    let ints = root.join("ints.csv");
    std::fs::write(&ints, "text,label\na,0\nb,1\nc,0\nd,1\ne,1\n").unwrap();
    let (train, _) = DataSpec::new(&ints).load().unwrap();
    assert_eq!(train.classes(), ["0", "1"]);
    let spec = DataSpec {
        task: TaskKind::Regression,
        ..DataSpec::new(&ints)
    };
    assert!(spec.load().unwrap().0.classes().is_empty());
    let _ = std::fs::remove_dir_all(&root);
}
