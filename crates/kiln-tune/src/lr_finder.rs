//! The learning-rate finder (Leslie Smith's LR range test, fastai's `lr_find`): train for a few
//! steps while the learning rate grows exponentially from `start_lr` to `end_lr`, record the
//! loss, stop when it diverges, and suggest the learning rate where the smoothed loss falls
//! fastest. The model is restored afterwards: its weights and buffers bit for bit, its random
//! generators, its train/eval mode and which parameters record gradients.
//!
//! ```no_run
//! # fn main() -> kiln_tune::Result<()> {
//! # let (model, tokenizer, train): (kiln_models::BertForSequenceClassification, kiln_data::Tokenizer, kiln_tune::TextDataset) = todo!();
//! let found = kiln_tune::find_lr(&model, &tokenizer, &train, &kiln_tune::LrFinderConfig::default())?;
//! println!("suggested lr: {:.2e}\n{}", found.suggestion, found.table());
//! # Ok(()) }
//! ```

use crate::data::{permutation, TextDataset};
use crate::error::{Result, TuneError};
use crate::strategy::{Plan, Strategy};
use crate::trainer::{SequenceModel, TrainConfig};
use kiln_core::Tensor;
use kiln_data::Tokenizer;
use kiln_nn::loss::cross_entropy;
use kiln_nn::optim::{clip_grad_norm_, AdamW, AdamWConfig, Optimizer, ParamGroup};
use kiln_nn::{ModuleExt, Reduction, StateDict, Visited};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;

/// Options of [`find_lr`]; `Default` gives fastai's sweep (1e-7 to 10 in 100 steps).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrFinderConfig {
    /// First learning rate (default 1e-7).
    pub start_lr: f64,
    /// Last learning rate (default 10).
    pub end_lr: f64,
    /// Optimizer steps of the sweep, at most (default 100).
    pub steps: usize,
    /// Weight of the exponential moving average of the loss (default 0.98, bias-corrected).
    pub smooth: f64,
    /// Stop when the smoothed loss exceeds this multiple of its minimum (default 4).
    pub diverge: f64,
    /// Rows per step (default 32).
    pub batch_size: usize,
    /// Tokens per row after truncation (default 128).
    pub max_length: usize,
    /// AdamW weight decay, not applied to biases and norms (default 0.01).
    pub weight_decay: f64,
    /// Clip the global gradient L2 norm to this (default 1.0).
    pub max_grad_norm: Option<f64>,
    /// Seed of the batch order (default 42).
    pub seed: u64,
    /// The strategy whose parameters (and LR multipliers) the sweep trains (default full).
    pub strategy: Strategy,
    /// Directory for `lr_finder.jsonl` and `lr_finder.png` (default none).
    pub out_dir: Option<PathBuf>,
}

impl Default for LrFinderConfig {
    fn default() -> Self {
        LrFinderConfig {
            start_lr: 1e-7,
            end_lr: 10.0,
            steps: 100,
            smooth: 0.98,
            diverge: 4.0,
            batch_size: 32,
            max_length: 128,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            seed: 42,
            strategy: Strategy::full(),
            out_dir: None,
        }
    }
}

impl LrFinderConfig {
    /// The sweep for a training run: its batch size, truncation, weight decay, clipping, seed
    /// and output directory, with the default sweep range.
    pub fn from_train(cfg: &TrainConfig, strategy: Strategy) -> Self {
        LrFinderConfig {
            batch_size: cfg.batch_size * cfg.grad_accum,
            max_length: cfg.max_length,
            weight_decay: cfg.weight_decay,
            max_grad_norm: cfg.max_grad_norm,
            seed: cfg.seed,
            strategy,
            out_dir: cfg.out_dir.clone(),
            ..LrFinderConfig::default()
        }
    }

    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(TuneError::config(format!("lr finder {f}"), m));
        if !(self.start_lr.is_finite() && self.start_lr > 0.0) {
            return bad(
                "start_lr",
                format!("must be positive, got {}", self.start_lr),
            );
        }
        if !(self.end_lr.is_finite() && self.end_lr > self.start_lr) {
            return bad(
                "end_lr",
                format!(
                    "must be above start_lr ({}), got {}",
                    self.start_lr, self.end_lr
                ),
            );
        }
        if self.steps < 3 {
            return bad("steps", format!("must be at least 3, got {}", self.steps));
        }
        if !(0.0..1.0).contains(&self.smooth) {
            return bad("smooth", format!("must be in [0, 1), got {}", self.smooth));
        }
        if self.diverge.is_nan() || self.diverge <= 1.0 {
            return bad("diverge", format!("must be above 1, got {}", self.diverge));
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if self.max_length < 2 {
            return bad("max_length", "must be at least 2".into());
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad("max_grad_norm", format!("must be positive, got {n}"));
            }
        }
        Ok(())
    }

    /// The learning rate of sweep step `i`: `start × (end / start)^(i / (steps − 1))`.
    pub fn lr_at(&self, i: usize) -> f64 {
        let t = i as f64 / (self.steps - 1) as f64;
        self.start_lr * (self.end_lr / self.start_lr).powf(t)
    }
}

/// What [`find_lr`] measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrFinderResult {
    /// The learning rate of every step run.
    pub lrs: Vec<f64>,
    /// The training loss (mean over the batch) at each step, before its update.
    pub losses: Vec<f64>,
    /// The bias-corrected exponential moving average of `losses`.
    pub smoothed: Vec<f64>,
    /// The suggested learning rate: where the smoothed loss falls fastest against log(lr).
    pub suggestion: f64,
    /// Whether the sweep stopped early because the loss diverged.
    pub diverged: bool,
}

impl LrFinderResult {
    /// A text table: step, lr, loss and smoothed loss, the suggestion marked.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:>5}  {:>10}  {:>10}  {:>10}\n",
            "step", "lr", "loss", "smoothed"
        );
        for (i, ((lr, loss), sm)) in self
            .lrs
            .iter()
            .zip(&self.losses)
            .zip(&self.smoothed)
            .enumerate()
        {
            let mark = if *lr == self.suggestion {
                "  <- suggestion"
            } else {
                ""
            };
            s.push_str(&format!(
                "{i:>5}  {lr:>10.3e}  {loss:>10.4}  {sm:>10.4}{mark}\n"
            ));
        }
        s
    }
}

/// The learning rate at the steepest descent of `smoothed` against ln(lr): the most negative
/// finite-difference slope (central inside, one-sided at the ends, as `numpy.gradient`), skipping
/// the first tenth of the points (a noisy start); the last point is dropped when the sweep
/// diverged.
pub fn suggest_lr(lrs: &[f64], smoothed: &[f64], diverged: bool) -> Option<f64> {
    let n = lrs.len().min(smoothed.len());
    // A diverged last point is dropped before the slopes, so it does not steepen its neighbour.
    let n = if diverged { n.saturating_sub(1) } else { n };
    if n < 3 {
        return None;
    }
    let x: Vec<f64> = lrs[..n].iter().map(|l| l.ln()).collect();
    let y = &smoothed[..n];
    let slope = |i: usize| {
        let (a, b) = if i == 0 {
            (0, 1)
        } else if i == n - 1 {
            (n - 2, n - 1)
        } else {
            (i - 1, i + 1)
        };
        (y[b] - y[a]) / (x[b] - x[a])
    };
    let end = n;
    let mut start = n / 10;
    if start + 1 >= end {
        start = 0;
    }
    (start..end)
        .filter(|&i| slope(i).is_finite())
        .min_by(|&a, &b| slope(a).total_cmp(&slope(b)))
        .map(|i| lrs[i])
}

/// Runs the LR range test on `model` over batches of `train` (cycling through reshuffled passes
/// when the sweep is longer than one), then restores the model; writes `lr_finder.jsonl` and
/// `lr_finder.png` into `config.out_dir` when set. An adapter strategy (e.g. LoRA) stays applied
/// to the model, with the adapter weights it had right after being applied.
pub fn find_lr<M: SequenceModel>(
    model: &M,
    tokenizer: &Tokenizer,
    train: &TextDataset,
    config: &LrFinderConfig,
) -> Result<LrFinderResult> {
    config.validate()?;
    if train.is_empty() {
        return Err(TuneError::config(
            "train",
            format!("{} has no rows", train.origin()),
        ));
    }
    // What the sweep changes, to put back afterwards.
    let grad_flags: HashMap<String, bool> = model
        .named_parameters()
        .into_iter()
        .map(|(n, p)| (n, p.is_trainable()))
        .collect();
    let mut modes = Vec::new();
    model.walk(|v| {
        if let Visited::Flag(f) = v {
            modes.push(f.is_training())
        }
    });
    let rngs = model.rng_states();
    let plan = config.strategy.plan(model)?;
    let saved: StateDict = model
        .state_dict()
        .iter()
        .map(|(n, t)| (n.to_string(), t.detach().contiguous_copy()))
        .collect();
    let outcome = sweep(model, tokenizer, train, config, &plan);
    // Restore even when the sweep failed.
    model.load_state_dict(&saved, kiln_nn::LoadMode::Strict)?;
    model.set_rng_states(&rngs)?;
    for (name, p) in model.named_parameters() {
        let on = grad_flags.get(&name).copied().unwrap_or(p.is_trainable());
        p.tensor().set_requires_grad(on);
        p.tensor().zero_grad();
    }
    let mut k = 0;
    model.walk(|v| {
        if let Visited::Flag(f) = v {
            f.set(modes[k]);
            k += 1;
        }
    });
    let (lrs, losses, smoothed, diverged) = outcome?;
    let suggestion = suggest_lr(&lrs, &smoothed, diverged).ok_or_else(|| {
        TuneError::config(
            "lr finder",
            format!(
                "the loss diverged after {} step(s), too few to suggest a learning rate \
                 (lower start_lr, now {:e})",
                lrs.len(),
                config.start_lr
            ),
        )
    })?;
    let result = LrFinderResult {
        lrs,
        losses,
        smoothed,
        suggestion,
        diverged,
    };
    if let Some(dir) = &config.out_dir {
        write_outputs(dir, &result)?;
    }
    Ok(result)
}

type Sweep = (Vec<f64>, Vec<f64>, Vec<f64>, bool);

fn sweep<M: SequenceModel>(
    model: &M,
    tokenizer: &Tokenizer,
    train: &TextDataset,
    config: &LrFinderConfig,
    plan: &Plan,
) -> Result<Sweep> {
    let classes = train.classes().len();
    let opt = optimizer(plan, config.weight_decay)?;
    let mut opt: Box<dyn Optimizer> = Box::new(opt);
    let scales = opt.lrs();
    let params: Vec<kiln_nn::Param> = plan
        .params
        .iter()
        .filter(|p| p.param.is_trainable())
        .map(|p| p.param.clone())
        .collect();
    model.train();
    let (mut lrs, mut losses, mut smoothed) = (Vec::new(), Vec::new(), Vec::new());
    let (mut avg, mut best) = (0.0, f64::INFINITY);
    let mut order: Vec<usize> = Vec::new();
    let mut pos = 0;
    let mut pass = 0u64;
    for i in 0..config.steps {
        if pos >= order.len() {
            order = permutation(
                train.len(),
                config.seed ^ pass.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            pass += 1;
            pos = 0;
        }
        let rows = &order[pos..(pos + config.batch_size).min(order.len())];
        pos += rows.len();
        let lr = config.lr_at(i);
        for (g, scale) in scales.iter().enumerate() {
            opt.set_lr(g, lr * scale)?;
        }
        let batch = train.batch(tokenizer, rows, config.max_length)?;
        let logits = model.logits(&batch);
        let loss = mean_loss(&logits, &batch.labels, classes);
        let value = loss.item();
        if !value.is_finite() {
            opt.zero_grad();
            return Ok((lrs, losses, smoothed, true));
        }
        loss.backward();
        if let Some(max_norm) = config.max_grad_norm {
            clip_grad_norm_(params.iter(), max_norm)?;
        }
        opt.step();
        opt.zero_grad();
        avg = config.smooth * avg + (1.0 - config.smooth) * value;
        let sm = avg / (1.0 - config.smooth.powi(i as i32 + 1));
        best = best.min(sm);
        lrs.push(lr);
        losses.push(value);
        smoothed.push(sm);
        if sm > config.diverge * best {
            return Ok((lrs, losses, smoothed, true));
        }
    }
    Ok((lrs, losses, smoothed, false))
}

/// The mean loss of a batch: cross-entropy over classes, or squared error for regression
/// (`classes == 0`, one output).
fn mean_loss(logits: &Tensor, labels: &Tensor, classes: usize) -> Tensor {
    if classes == 0 {
        let pred = logits.reshape([labels.dims()[0]]);
        kiln_nn::loss::mse_loss(&pred, &labels.to_dtype(pred.dtype()), Reduction::Mean)
    } else {
        cross_entropy(logits, labels, None, -100, Reduction::Mean, 0.0)
    }
}

/// AdamW over the plan's trainable parameters with lr = the LR multiplier of each group (the
/// sweep multiplies it by its lr), one group per (multiplier, decay) pair as the Trainer does.
fn optimizer(plan: &Plan, weight_decay: f64) -> Result<AdamW> {
    let mut groups: BTreeMap<(u64, bool), Vec<(String, kiln_nn::Param)>> = BTreeMap::new();
    for (name, param, scale, decays) in plan.trainable() {
        groups
            .entry((scale.to_bits(), decays))
            .or_default()
            .push((name, param));
    }
    let groups = groups.into_iter().rev().map(|((scale, decays), params)| {
        let config = AdamWConfig {
            lr: f64::from_bits(scale),
            weight_decay: if decays { weight_decay } else { 0.0 },
            ..Default::default()
        };
        ParamGroup::new(params, config)
    });
    Ok(AdamW::with_groups(groups)?)
}

/// `lr_finder.jsonl` (one row per step, plus the suggestion) and `lr_finder.png`, drawn by
/// [`crate::plot::write_curves`]: left, the loss per sweep step (grey), its moving average
/// (blue) and the suggestion (red dot, at its smoothed loss); right, log10(lr) per step.
fn write_outputs(dir: &std::path::Path, r: &LrFinderResult) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TuneError::io(dir, e))?;
    let path = dir.join("lr_finder.jsonl");
    let mut text = Vec::new();
    let at = r.lrs.iter().position(|&l| l == r.suggestion).unwrap_or(0);
    for (i, ((lr, loss), sm)) in r.lrs.iter().zip(&r.losses).zip(&r.smoothed).enumerate() {
        let row = serde_json::json!({
            "kind": "train", "step": i, "lr": lr, "loss": loss, "smoothed": sm,
        });
        writeln!(text, "{row}").expect("writing to a Vec");
        let row = serde_json::json!({"kind": "eval", "step": i, "log10_lr": lr.log10()});
        writeln!(text, "{row}").expect("writing to a Vec");
    }
    let row = serde_json::json!({
        "kind": "eval", "step": at, "loss": r.smoothed[at], "suggestion": r.suggestion,
    });
    writeln!(text, "{row}").expect("writing to a Vec");
    std::fs::write(&path, text).map_err(|e| TuneError::io(&path, e))?;
    crate::plot::write_curves(&path, &dir.join("lr_finder.png"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suggestion_is_the_steepest_point_of_the_curve() {
        // loss = -tanh(2 (log10 lr + 3)): steepest (against log lr) exactly at lr = 1e-3.
        let config = LrFinderConfig {
            start_lr: 1e-6,
            end_lr: 1.0,
            steps: 61,
            ..LrFinderConfig::default()
        };
        let lrs: Vec<f64> = (0..61).map(|i| config.lr_at(i)).collect();
        assert!((lrs[0] - 1e-6).abs() < 1e-18 && (lrs[60] - 1.0).abs() < 1e-12);
        let loss: Vec<f64> = lrs
            .iter()
            .map(|l| -(2.0 * (l.log10() + 3.0)).tanh())
            .collect();
        let s = suggest_lr(&lrs, &loss, false).unwrap();
        assert!((s.log10() + 3.0).abs() < 1e-9, "{s}");
        // A diverged last point is ignored even when it would be steepest.
        let mut dropping = loss.clone();
        dropping[60] = -100.0;
        let s = suggest_lr(&lrs, &dropping, true).unwrap();
        assert!((s.log10() + 3.0).abs() < 1e-9, "{s}");
        assert_eq!(suggest_lr(&lrs[..2], &loss[..2], false), None);
    }

    #[test]
    fn bad_options_name_the_field() {
        for (c, field) in [
            (
                LrFinderConfig {
                    start_lr: 0.0,
                    ..Default::default()
                },
                "start_lr",
            ),
            (
                LrFinderConfig {
                    end_lr: 1e-8,
                    ..Default::default()
                },
                "end_lr",
            ),
            (
                LrFinderConfig {
                    steps: 2,
                    ..Default::default()
                },
                "steps",
            ),
            (
                LrFinderConfig {
                    smooth: 1.0,
                    ..Default::default()
                },
                "smooth",
            ),
            (
                LrFinderConfig {
                    diverge: 1.0,
                    ..Default::default()
                },
                "diverge",
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
