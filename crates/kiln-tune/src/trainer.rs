//! The Trainer: runs a [`Strategy`] on a model and a dataset — micro-batches with gradient
//! accumulation, clipping, a warmup + decay schedule, evaluation with streaming metrics, early
//! stopping with best-model restore, a progress bar, a metrics log (JSONL), a loss-curve plot
//! (PNG) and atomic checkpoints that resume exactly.

use crate::data::{permutation, TextBatch, TextDataset};
use crate::error::{Result, TuneError};
use crate::metrics::{Metric, MetricState};
use crate::strategy::{Plan, Strategy};
use kiln_core::{no_grad, Tensor};
use kiln_data::Tokenizer;
use kiln_models::{BertForSequenceClassification, BertForTokenClassification};
use kiln_nn::loss::cross_entropy;
use kiln_nn::optim::{clip_grad_norm_, AdamW, AdamWConfig, Optimizer, OptimizerState, ParamGroup};
use kiln_nn::{Module, ModuleExt, Reduction, StateDict};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A model the Trainer can fine-tune on text: one output row per example.
pub trait SequenceModel: Module {
    /// Logits `[B, num_labels]` (regression: `[B, 1]`) for a batch.
    fn logits(&self, batch: &TextBatch) -> Tensor;
}

impl SequenceModel for BertForSequenceClassification {
    fn logits(&self, batch: &TextBatch) -> Tensor {
        self.forward(
            &batch.input_ids,
            Some(&batch.attention_mask),
            Some(&batch.token_type_ids),
        )
    }
}

impl SequenceModel for BertForTokenClassification {
    /// The first token's logits (token-level training uses its own loop).
    fn logits(&self, batch: &TextBatch) -> Tensor {
        let out = self.forward(
            &batch.input_ids,
            Some(&batch.attention_mask),
            Some(&batch.token_type_ids),
        );
        out.narrow(1, 0, 1).squeeze(1)
    }
}

/// What the Trainer trains on (a plugin point): rows it batches into a summed loss, how many
/// loss terms each row contributes (the normaliser: the loss of an optimizer step is the sum
/// over its rows divided by their total terms, so accumulated micro-batches give the gradient
/// of the whole batch), and a streaming evaluation.
pub trait Task<M: ?Sized> {
    /// Number of rows.
    fn len(&self) -> usize;
    /// True when there are no rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Where the rows came from (for messages).
    fn origin(&self) -> &str;
    /// Loss terms of row `row`: 1 for a classifier, its response tokens for a causal LM.
    fn loss_terms(&self, row: usize) -> usize;
    /// The loss of `rows` summed over their loss terms, recorded for backward.
    fn loss(&self, model: &M, rows: &[usize]) -> Result<Tensor>;
    /// Evaluates `model` on every row in batches of `batch_size` (called in eval mode with
    /// grad mode off), streaming the metrics.
    fn evaluate(&self, model: &M, batch_size: usize) -> Result<MetricState>;
    /// An error when the task cannot report `metric` (default: every metric but the entity
    /// metrics, which need token classification).
    fn check_metric(&self, metric: Metric) -> Result<()> {
        if metric.is_entity() {
            return Err(TuneError::config(
                "metric",
                format!(
                    "`{}` is a token-classification metric (entities decoded from BIO / BIOES / BMES tags)",
                    metric.name()
                ),
            ));
        }
        Ok(())
    }
}

/// Sequence classification / regression on a [`TextDataset`]: one loss term per row.
struct TextTask<'a> {
    data: &'a TextDataset,
    tokenizer: &'a Tokenizer,
    max_length: usize,
}

impl<M: SequenceModel> Task<M> for TextTask<'_> {
    fn len(&self) -> usize {
        self.data.len()
    }

    fn origin(&self) -> &str {
        self.data.origin()
    }

    fn loss_terms(&self, _row: usize) -> usize {
        1
    }

    fn loss(&self, model: &M, rows: &[usize]) -> Result<Tensor> {
        let batch = self.data.batch(self.tokenizer, rows, self.max_length)?;
        let logits = model.logits(&batch);
        Ok(batch_loss(
            &logits,
            &batch.labels,
            self.data.classes().len(),
        ))
    }

    fn evaluate(&self, model: &M, batch_size: usize) -> Result<MetricState> {
        evaluate(
            model,
            self.tokenizer,
            self.data,
            batch_size,
            self.max_length,
        )
    }
}

/// How the learning rate moves after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear decay to 0 (Hugging Face's default).
    #[default]
    Linear,
    /// Half-cosine decay to 0.
    Cosine,
    /// Constant.
    Constant,
    /// One-cycle (Smith & Topin; PyTorch's `OneCycleLR` with cosine annealing): rises from
    /// lr / 25 to lr over the warmup steps (30 % of the steps when the warmup is 0), then
    /// falls to lr / (25 × 10⁴) at the last step. Only the learning rate cycles, not momentum.
    OneCycle,
}

/// One-cycle: the first lr is the peak / this (PyTorch's `div_factor`).
const ONE_CYCLE_DIV: f64 = 25.0;
/// One-cycle: the last lr is the first / this (PyTorch's `final_div_factor`).
const ONE_CYCLE_FINAL_DIV: f64 = 1e4;
/// One-cycle: the warmup fraction when no warmup is configured (PyTorch's `pct_start`).
const ONE_CYCLE_PCT_START: f64 = 0.3;

impl Schedule {
    /// The multiplier of the base lr at optimizer step `step` (0-based) of `total`.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup && self != Schedule::OneCycle {
            return (step + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let done = (step.saturating_sub(warmup) as f64 / span).min(1.0);
        match self {
            Schedule::Linear => 1.0 - done,
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * done).cos()),
            Schedule::Constant => 1.0,
            Schedule::OneCycle => one_cycle_factor(step, warmup, total),
        }
    }
}

/// PyTorch's `OneCycleLR` (two phases, cosine annealing) as a multiplier of the peak lr:
/// phase 1 ends at step `warmup − 1` (as a real number, `pct_start × total − 1` in PyTorch),
/// phase 2 at step `total − 1`.
fn one_cycle_factor(step: usize, warmup: usize, total: usize) -> f64 {
    let total = total.max(1) as f64;
    let warm = if warmup == 0 {
        ONE_CYCLE_PCT_START * total
    } else {
        warmup as f64
    };
    let initial = 1.0 / ONE_CYCLE_DIV;
    let last = initial / ONE_CYCLE_FINAL_DIV;
    let anneal = |from: f64, to: f64, pct: f64| {
        to + (from - to) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0)
    };
    let s = step as f64;
    let peak_at = warm - 1.0;
    if s <= peak_at {
        let pct = if peak_at > 0.0 { s / peak_at } else { 1.0 };
        return anneal(initial, 1.0, pct);
    }
    let span = (total - 1.0) - peak_at;
    let pct = if span > 0.0 {
        ((s - peak_at) / span).min(1.0)
    } else {
        1.0
    };
    anneal(1.0, last, pct)
}

/// Options of a training run; `Default` gives Hugging Face's usual fine-tuning setup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training data (default 3).
    pub epochs: usize,
    /// Stop after this many optimizer steps (default none).
    pub max_steps: Option<usize>,
    /// Rows per micro-batch (default 32).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (default 1); the loss is normalised so the accumulated
    /// gradient equals the gradient of the whole accumulated batch.
    pub grad_accum: usize,
    /// Peak learning rate (default 5e-5).
    pub lr: f64,
    /// AdamW decoupled weight decay, not applied to biases and norms (default 0.01).
    pub weight_decay: f64,
    /// Fraction of the optimizer steps spent warming up linearly (default 0.1).
    pub warmup_ratio: f64,
    /// Decay after warmup (default linear), or the one-cycle schedule.
    pub schedule: Schedule,
    /// Clip the global gradient L2 norm to this (default 1.0; `None` disables).
    pub max_grad_norm: Option<f64>,
    /// Tokens per row after truncation (default 128).
    pub max_length: usize,
    /// Seed of data order and dropout (default 42).
    pub seed: u64,
    /// Evaluate every this many optimizer steps (default: at the end of each epoch).
    pub eval_every: Option<usize>,
    /// Stop after this many evaluations without improvement (default none).
    pub early_stopping: Option<usize>,
    /// The metric that picks the best model (default accuracy).
    pub metric: Metric,
    /// Metrics reported at each evaluation (default accuracy and macro-F1).
    pub metrics: Vec<Metric>,
    /// Rows per evaluation batch (default 64).
    pub eval_batch_size: usize,
    /// Directory for `metrics.jsonl`, `curves.png` and `checkpoint/` (default none).
    pub out_dir: Option<PathBuf>,
    /// Also checkpoint every this many optimizer steps (default: each epoch end only).
    pub checkpoint_every: Option<usize>,
    /// Resume from `out_dir/checkpoint` when it exists (default true).
    pub resume: bool,
    /// Show a progress bar (default true).
    pub progress: bool,
    /// Restore the best evaluated weights at the end (default true).
    pub restore_best: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 3,
            max_steps: None,
            batch_size: 32,
            grad_accum: 1,
            lr: 5e-5,
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            schedule: Schedule::Linear,
            max_grad_norm: Some(1.0),
            max_length: 128,
            seed: 42,
            eval_every: None,
            early_stopping: None,
            metric: Metric::Accuracy,
            metrics: vec![Metric::Accuracy, Metric::MacroF1],
            eval_batch_size: 64,
            out_dir: None,
            checkpoint_every: None,
            resume: true,
            progress: true,
            restore_best: true,
        }
    }
}

impl TrainConfig {
    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(TuneError::config(f, m));
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs", "must be at least 1 (or set max_steps)".into());
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "must be at least 1".into());
        }
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("must be a positive number, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("must be ≥ 0, got {}", self.weight_decay),
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup_ratio",
                format!("must be in [0, 1), got {}", self.warmup_ratio),
            );
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad("max_grad_norm", format!("must be positive, got {n}"));
            }
        }
        if self.max_length < 2 {
            return bad(
                "max_length",
                "must be at least 2 (room for [CLS] and [SEP])".into(),
            );
        }
        if self.eval_every == Some(0) || self.checkpoint_every == Some(0) {
            return bad("eval_every", "must be at least 1".into());
        }
        if self.early_stopping == Some(0) {
            return bad("early_stopping", "patience must be at least 1".into());
        }
        Ok(())
    }
}

/// One evaluation during training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch (1-based) in which it ran.
    pub epoch: usize,
    /// Metric values by name (and `loss`).
    pub metrics: BTreeMap<String, f64>,
    /// Confusion matrix `[label][predicted]` (empty for regression).
    #[serde(default)]
    pub confusion: Vec<Vec<u64>>,
}

/// What a run did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    /// Optimizer steps done.
    pub steps: usize,
    /// Epochs started.
    pub epochs: usize,
    /// Mean training loss of the last epoch.
    pub train_loss: f64,
    /// Every evaluation, in order.
    pub evaluations: Vec<Evaluation>,
    /// The best evaluation (by the chosen metric), whose weights the model holds when
    /// `restore_best` is on.
    pub best: Option<Evaluation>,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Seconds spent training (evaluation included).
    pub seconds: f64,
    /// Trainable / total parameter elements.
    pub trainable_params: (usize, usize),
}

/// A hook into the training loop (a plugin point): called after each optimizer step and each
/// evaluation. Returning `false` from either stops training.
pub trait Callback: Send {
    /// After optimizer step `step` with that micro-batch window's loss and the lr.
    fn on_step(&mut self, step: usize, loss: f64, lr: f64) -> bool {
        let _ = (step, loss, lr);
        true
    }
    /// After an evaluation.
    fn on_evaluate(&mut self, eval: &Evaluation) -> bool {
        let _ = eval;
        true
    }
}

/// Trainer progress saved in a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainerState {
    /// Epoch (0-based) in progress.
    epoch: usize,
    /// Micro-batches of that epoch already done.
    micro: usize,
    /// Optimizer steps done.
    step: usize,
    evaluations: Vec<Evaluation>,
    best: Option<Evaluation>,
    since_best: usize,
    epoch_loss: (f64, usize),
    /// Every random generator of the model (dropout masks), so a resumed run draws the same.
    rng_states: Vec<[u64; 4]>,
    config: TrainConfig,
    strategy: Strategy,
}

/// Fine-tunes a model: `Trainer::new(config).strategy(s).fit(&model, &tokenizer, &train, valid)`.
pub struct Trainer {
    config: TrainConfig,
    strategy: Strategy,
    callbacks: Vec<Box<dyn Callback>>,
    stop_after_steps: Option<usize>,
}

impl Trainer {
    /// A trainer with `config` and full fine-tuning.
    pub fn new(config: TrainConfig) -> Self {
        Trainer {
            config,
            strategy: Strategy::full(),
            callbacks: Vec::new(),
            stop_after_steps: None,
        }
    }

    /// Sets the strategy.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Adds a callback.
    pub fn callback(mut self, cb: impl Callback + 'static) -> Self {
        self.callbacks.push(Box::new(cb));
        self
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Evaluates `model` on `data`: the configured metrics and the loss, streamed batch by batch.
    pub fn evaluate<M: SequenceModel>(
        &self,
        model: &M,
        tokenizer: &Tokenizer,
        data: &TextDataset,
    ) -> Result<MetricState> {
        evaluate(
            model,
            tokenizer,
            data,
            self.config.eval_batch_size,
            self.config.max_length,
        )
    }

    /// Trains `model` on `train`, evaluating on `valid`. Writes `metrics.jsonl`, `curves.png`
    /// and `checkpoint/` under `out_dir` when set, and resumes from a checkpoint there.
    pub fn fit<M: SequenceModel>(
        &mut self,
        model: &M,
        tokenizer: &Tokenizer,
        train: &TextDataset,
        valid: Option<&TextDataset>,
    ) -> Result<TrainReport> {
        if let Some(v) = valid {
            if v.classes() != train.classes() {
                return Err(TuneError::config(
                    "valid",
                    format!(
                        "validation labels {:?} differ from training labels {:?}",
                        v.classes(),
                        train.classes()
                    ),
                ));
            }
        }
        let max_length = self.config.max_length;
        let text_task = |data| TextTask {
            data,
            tokenizer,
            max_length,
        };
        self.fit_task(model, &text_task(train), valid.map(text_task).as_ref())
    }

    /// Trains `model` on any [`Task`] (classification, causal LM, a user's own), evaluating
    /// on `valid`: the same loop as [`Trainer::fit`] — accumulation normalised by the task's
    /// loss terms, clipping, schedule, evaluation, early stopping, `metrics.jsonl`,
    /// `curves.png`, checkpoints and exact resume.
    pub fn fit_task<M: Module, T: Task<M> + ?Sized>(
        &mut self,
        model: &M,
        train: &T,
        valid: Option<&T>,
    ) -> Result<TrainReport> {
        let cfg = self.config.clone();
        cfg.validate()?;
        if train.is_empty() {
            return Err(TuneError::config(
                "train",
                format!("{} has no rows", train.origin()),
            ));
        }
        if let Some(v) = valid {
            for m in cfg.metrics.iter().chain([&cfg.metric]) {
                v.check_metric(*m)?;
            }
        }
        let start = Instant::now();
        let plan = self.strategy.plan(model)?;
        let mut opt = build_optimizer(&plan, &cfg)?;
        let micro_per_epoch = train.len().div_ceil(cfg.batch_size);
        let steps_per_epoch = micro_per_epoch.div_ceil(cfg.grad_accum);
        let total_steps = cfg
            .max_steps
            .unwrap_or(usize::MAX)
            .min(steps_per_epoch * cfg.epochs.max(1));
        let epochs = total_steps.div_ceil(steps_per_epoch);
        let warmup = (cfg.warmup_ratio * total_steps as f64).round() as usize;
        let base_lrs = opt.lrs();

        let mut log = match &cfg.out_dir {
            Some(dir) => Some(MetricsLog::open(dir)?),
            None => None,
        };
        let mut st = TrainerState {
            epoch: 0,
            micro: 0,
            step: 0,
            evaluations: Vec::new(),
            best: None,
            since_best: 0,
            epoch_loss: (0.0, 0),
            rng_states: Vec::new(),
            config: cfg.clone(),
            strategy: self.strategy.clone(),
        };
        let mut best_weights: Option<StateDict> = None;
        // Dropout masks follow the run's seed, whatever seeds built the model.
        let fresh: Vec<[u64; 4]> = (0..model.rng_states().len())
            .map(|i| {
                kiln_core::Rng::new(cfg.seed ^ (i as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407))
                    .state()
            })
            .collect();
        model.set_rng_states(&fresh)?;
        if let (Some(dir), true) = (&cfg.out_dir, cfg.resume) {
            if let Some(saved) = load_checkpoint(&dir.join("checkpoint"), model, &mut *opt)? {
                st = saved;
                st.config = cfg.clone();
                st.strategy = self.strategy.clone();
                let best_path = dir.join("checkpoint").join("best.safetensors");
                if best_path.exists() {
                    best_weights = Some(kiln_nn::safetensors_io::load(&best_path)?);
                }
            }
        }
        let (trainable, total) = plan.counts();
        let bar = progress_bar(cfg.progress, total_steps as u64, st.step as u64);
        let mut stopped_early = false;
        let mut last_epoch_loss = f64::NAN;
        model.train();

        'epochs: while st.epoch < epochs && st.step < total_steps {
            plan.set_epoch(st.epoch);
            plan.set_step(st.step);
            let order = permutation(
                train.len(),
                cfg.seed ^ (st.epoch as u64).wrapping_mul(0x9E37_79B9),
            );
            let micro_batches: Vec<&[usize]> = order.chunks(cfg.batch_size).collect();
            // The loss terms of every accumulation window, for the loss normalisation.
            let windows: Vec<usize> = micro_batches
                .chunks(cfg.grad_accum)
                .map(|w| {
                    w.iter()
                        .flat_map(|b| b.iter())
                        .map(|&i| train.loss_terms(i))
                        .sum::<usize>()
                        .max(1)
                })
                .collect();
            let mut window_loss = 0.0;
            while st.micro < micro_batches.len() {
                let rows = micro_batches[st.micro];
                let window = st.micro / cfg.grad_accum;
                let loss_sum = train.loss(model, rows)?;
                let loss = loss_sum.mul_scalar(1.0 / windows[window] as f64);
                loss.backward();
                let loss_value = loss_sum.item();
                window_loss += loss_value;
                st.epoch_loss.0 += loss_value;
                st.epoch_loss.1 += rows.iter().map(|&i| train.loss_terms(i)).sum::<usize>();
                st.micro += 1;
                let window_done =
                    st.micro.is_multiple_of(cfg.grad_accum) || st.micro == micro_batches.len();
                if !window_done {
                    continue;
                }
                if !window_loss.is_finite() {
                    return Err(TuneError::config(
                        "lr",
                        format!(
                            "the training loss became {window_loss} at step {} (lr too high?)",
                            st.step + 1
                        ),
                    ));
                }
                let factor = cfg.schedule.factor(st.step, warmup, total_steps);
                for (g, base) in base_lrs.iter().enumerate() {
                    opt.set_lr(g, base * factor)?;
                }
                if let Some(max_norm) = cfg.max_grad_norm {
                    let params: Vec<_> = plan
                        .params
                        .iter()
                        .filter(|p| p.param.is_trainable())
                        .map(|p| p.param.clone())
                        .collect();
                    clip_grad_norm_(params.iter(), max_norm)?;
                }
                opt.step();
                opt.zero_grad();
                st.step += 1;
                plan.set_step(st.step);
                let mean_loss = window_loss / windows[window] as f64;
                window_loss = 0.0;
                let lr = cfg.lr * factor;
                bar.set_position(st.step as u64);
                bar.set_message(format!(
                    "epoch {}/{epochs} loss {mean_loss:.4} lr {lr:.2e}",
                    st.epoch + 1
                ));
                if let Some(log) = log.as_mut() {
                    log.write(&serde_json::json!({
                        "kind": "train", "step": st.step, "epoch": st.epoch + 1,
                        "loss": mean_loss, "lr": lr,
                        "elapsed_s": start.elapsed().as_secs_f64(),
                    }))?;
                }
                let mut keep_going = true;
                for cb in &mut self.callbacks {
                    keep_going &= cb.on_step(st.step, mean_loss, lr);
                }
                let epoch_end = st.micro == micro_batches.len();
                let eval_now = match cfg.eval_every {
                    Some(n) => st.step.is_multiple_of(n),
                    None => epoch_end,
                } || st.step == total_steps;
                if eval_now {
                    if let Some(v) = valid {
                        let improved =
                            self.run_evaluation(model, v, &mut st, log.as_mut(), &bar)?;
                        if improved && cfg.restore_best {
                            best_weights = Some(trainable_state(&plan));
                        }
                        for cb in &mut self.callbacks {
                            keep_going &= cb.on_evaluate(st.evaluations.last().unwrap());
                        }
                        if cfg.early_stopping.is_some_and(|p| st.since_best >= p) {
                            stopped_early = true;
                            keep_going = false;
                        }
                        model.train();
                    }
                }
                let checkpoint_now = epoch_end
                    || cfg
                        .checkpoint_every
                        .is_some_and(|n| st.step.is_multiple_of(n));
                if epoch_end {
                    last_epoch_loss = st.epoch_loss.0 / st.epoch_loss.1.max(1) as f64;
                    st.epoch += 1;
                    st.micro = 0;
                    st.epoch_loss = (0.0, 0);
                }
                if let (Some(dir), true) = (&cfg.out_dir, checkpoint_now) {
                    st.rng_states = model.rng_states();
                    save_checkpoint(
                        &dir.join("checkpoint"),
                        &plan,
                        &*opt,
                        &st,
                        best_weights.as_ref(),
                    )?;
                }
                if self.stop_after_steps.is_some_and(|n| st.step >= n) {
                    bar.abandon();
                    return Err(TuneError::config("stop_after_steps", "stopped for a test"));
                }
                if !keep_going || st.step >= total_steps {
                    break 'epochs;
                }
            }
        }
        bar.finish();
        model.eval();
        for p in &plan.params {
            p.param.tensor().set_requires_grad(p.trains);
        }
        if let (true, Some(best)) = (cfg.restore_best, &best_weights) {
            model.load_state_dict(best, kiln_nn::LoadMode::NonStrict)?;
        }
        if let Some(dir) = &cfg.out_dir {
            crate::plot::write_curves(&dir.join("metrics.jsonl"), &dir.join("curves.png"))?;
        }
        Ok(TrainReport {
            steps: st.step,
            epochs: st.epoch.max(1),
            train_loss: last_epoch_loss,
            evaluations: st.evaluations.clone(),
            best: st.best.clone(),
            stopped_early,
            seconds: start.elapsed().as_secs_f64(),
            trainable_params: (trainable, total),
        })
    }

    fn run_evaluation<M: Module, T: Task<M> + ?Sized>(
        &self,
        model: &M,
        valid: &T,
        st: &mut TrainerState,
        log: Option<&mut MetricsLog>,
        bar: &indicatif::ProgressBar,
    ) -> Result<bool> {
        let cfg = &self.config;
        let m = bar.suspend(|| {
            let _guard = no_grad();
            model.eval();
            valid.evaluate(model, cfg.eval_batch_size)
        })?;
        let key = cfg.metric;
        let value = m.value(key);
        // The best-model metric is always recorded, even when `metrics` does not list it.
        let mut metrics = m.report(&cfg.metrics);
        metrics.insert(key.name().to_string(), value);
        let eval = Evaluation {
            step: st.step,
            epoch: st.epoch + 1,
            metrics: metrics.clone(),
            confusion: if m.classes() > 0 {
                m.confusion()
            } else {
                Vec::new()
            },
        };
        let better = match &st.best {
            None => true,
            Some(b) => {
                let old = b.metrics.get(key.name()).copied().unwrap_or(f64::NAN);
                if key.higher_is_better() {
                    value > old
                } else {
                    value < old
                }
            }
        };
        if cfg.progress {
            let shown: Vec<String> = metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            bar.println(format!(
                "step {} (epoch {}): {}",
                st.step,
                st.epoch + 1,
                shown.join("  ")
            ));
        }
        if let Some(log) = log {
            let mut row =
                serde_json::json!({"kind": "eval", "step": st.step, "epoch": st.epoch + 1});
            for (k, v) in &metrics {
                row[k] = serde_json::json!(v);
            }
            log.write(&row)?;
        }
        st.evaluations.push(eval.clone());
        if better {
            st.best = Some(eval);
            st.since_best = 0;
        } else {
            st.since_best += 1;
        }
        Ok(better)
    }

    /// Test hook: make `fit` fail (as if killed) right after optimizer step `n` and its
    /// checkpoint.
    #[doc(hidden)]
    pub fn stop_after_steps(mut self, n: usize) -> Self {
        self.stop_after_steps = Some(n);
        self
    }
}

/// The summed loss of a batch: cross-entropy over classes, or squared error for regression
/// (`classes == 0`, one output).
fn batch_loss(logits: &Tensor, labels: &Tensor, classes: usize) -> Tensor {
    if classes == 0 {
        let pred = logits.reshape([labels.dims()[0]]);
        kiln_nn::loss::mse_loss(&pred, &labels.to_dtype(pred.dtype()), Reduction::Sum)
    } else {
        cross_entropy(logits, labels, None, -100, Reduction::Sum, 0.0)
    }
}

/// Evaluates `model` (in eval mode, without recording a graph) on `data` in batches.
pub fn evaluate<M: SequenceModel>(
    model: &M,
    tokenizer: &Tokenizer,
    data: &TextDataset,
    batch_size: usize,
    max_length: usize,
) -> Result<MetricState> {
    let _guard = no_grad();
    model.eval();
    let classes = data.classes().len();
    let mut m = MetricState::new(classes);
    let indices: Vec<usize> = (0..data.len()).collect();
    for rows in indices.chunks(batch_size) {
        let batch = data.batch(tokenizer, rows, max_length)?;
        let logits = model.logits(&batch);
        let loss = batch_loss(&logits, &batch.labels, classes).item();
        m.update_loss(loss, rows.len() as f64);
        if classes == 0 {
            m.update_regression(&logits, &batch.labels);
        } else {
            m.update_classification(&logits, &batch.labels);
        }
    }
    Ok(m)
}

/// AdamW over the plan's trainable parameters: one group per (LR multiplier, decay) pair, keyed
/// by parameter name.
fn build_optimizer(plan: &Plan, cfg: &TrainConfig) -> Result<Box<dyn Optimizer>> {
    let mut groups: BTreeMap<(u64, bool), Vec<(String, kiln_nn::Param)>> = BTreeMap::new();
    for (name, param, scale, decays) in plan.trainable() {
        groups
            .entry((scale.to_bits(), decays))
            .or_default()
            .push((name, param));
    }
    let groups = groups.into_iter().rev().map(|((scale, decays), params)| {
        let config = AdamWConfig {
            lr: cfg.lr * f64::from_bits(scale),
            weight_decay: if decays { cfg.weight_decay } else { 0.0 },
            ..Default::default()
        };
        ParamGroup::new(params, config)
    });
    Ok(Box::new(AdamW::with_groups(groups)?))
}

/// A copy of the trainable parameters (what changes during training).
fn trainable_state(plan: &Plan) -> StateDict {
    plan.params
        .iter()
        .filter(|p| p.trains)
        .map(|p| (p.name.clone(), p.param.tensor().detach().contiguous_copy()))
        .collect()
}

fn progress_bar(show: bool, total: u64, at: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(at);
    bar
}

/// The JSONL metrics log: one object per training step and per evaluation.
struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TuneError::io(dir, e))?;
        let path = dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TuneError::io(&path, e))?;
        Ok(MetricsLog { file, path })
    }

    fn write(&mut self, row: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{row}").map_err(|e| TuneError::io(&self.path, e))
    }
}

// ------------------------------------------------------------------------------ checkpoints

/// Writes the checkpoint into a fresh directory next to `dir`, then swaps it in with renames, so
/// a crash at any point leaves either the old or the new checkpoint complete.
fn save_checkpoint(
    dir: &Path,
    plan: &Plan,
    opt: &dyn Optimizer,
    st: &TrainerState,
    best: Option<&StateDict>,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| TuneError::io(&tmp, e))?;
    kiln_nn::safetensors_io::save(&trainable_state(plan), &tmp.join("model.safetensors"))?;
    opt.state_dict().save(tmp.join("optimizer.safetensors"))?;
    if let Some(best) = best {
        kiln_nn::safetensors_io::save(best, &tmp.join("best.safetensors"))?;
    }
    let state = serde_json::to_string_pretty(st).expect("trainer state serialises");
    let state_path = tmp.join("trainer_state.json");
    std::fs::write(&state_path, state).map_err(|e| TuneError::io(&state_path, e))?;
    sync_dir(&tmp);
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| TuneError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| TuneError::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(f) = std::fs::File::open(e.path()) {
                let _ = f.sync_all();
            }
        }
    }
}

/// Loads a checkpoint written by [`save_checkpoint`] (or the `.old` one a crash mid-swap left
/// behind); `None` when there is none.
fn load_checkpoint<M: Module>(
    dir: &Path,
    model: &M,
    opt: &mut dyn Optimizer,
) -> Result<Option<TrainerState>> {
    let dir = if dir.exists() {
        dir.to_path_buf()
    } else if dir.with_extension("old").exists() {
        dir.with_extension("old")
    } else {
        return Ok(None);
    };
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| TuneError::io(&state_path, e))?;
    let st: TrainerState = serde_json::from_str(&text)
        .map_err(|e| TuneError::io(&state_path, format!("not a kiln trainer state: {e}")))?;
    let weights = kiln_nn::safetensors_io::load(&dir.join("model.safetensors"))?;
    let report = model.load_state_dict(&weights, kiln_nn::LoadMode::NonStrict)?;
    if !report.unexpected.is_empty() {
        return Err(TuneError::io(
            dir.join("model.safetensors"),
            format!(
                "checkpoint tensors {:?} are not in the model (another model's checkpoint?)",
                report.unexpected
            ),
        ));
    }
    let opt_state = OptimizerState::load(dir.join("optimizer.safetensors"))?;
    opt.load_state_dict(&opt_state)?;
    model
        .set_rng_states(&st.rng_states)
        .map_err(|e| TuneError::io(&state_path, e))?;
    Ok(Some(st))
}
