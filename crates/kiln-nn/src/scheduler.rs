//! Learning-rate schedulers, as `torch.optim.lr_scheduler` (plus the Hugging Face linear
//! warmup/decay schedule).
//!
//! A scheduler is created from an optimizer and keeps its [`HyperHandle`]: `step()` computes the
//! learning rate of every group from that group's **base lr** (its lr when the scheduler was
//! created) and writes it into the optimizer. As in torch, creating a scheduler already sets the
//! lrs of step 0, and `step()` is called once per epoch (or per batch) *after*
//! `optimizer.step()`:
//!
//! ```
//! use kiln_core::Tensor;
//! use kiln_nn::optim::{Optimizer, Sgd};
//! use kiln_nn::scheduler::{Scheduler, StepLR};
//! use kiln_nn::Param;
//!
//! let w = Param::new(Tensor::ones([2]));
//! let mut opt = Sgd::new(vec![w.clone()], 0.1).unwrap();
//! let mut sched = StepLR::new(&opt, 10, 0.5).unwrap();
//! for _epoch in 0..20 {
//!     w.mul(&w).sum_all().backward();
//!     opt.step();
//!     opt.zero_grad();
//!     sched.step();
//! }
//! assert!((opt.lr(0) - 0.025).abs() < 1e-12);
//! ```
//!
//! Closed-form schedulers (all but [`ReduceLROnPlateau`]) compute each lr from the epoch count,
//! so the value written by a manual `set_lr` lasts only until the next `step()`. Schedulers
//! created before an `add_param_group` drive only the groups they knew. State (epoch count, base
//! lrs, plateau bookkeeping) saves to JSON with [`SchedulerState`]; loading it also writes the
//! restored lrs (and momenta) into the optimizer.

use crate::error::NnError;
use crate::optim::{HyperHandle, Optimizer};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use std::path::Path;

/// A learning-rate schedule that drives an optimizer's group lrs.
pub trait Scheduler: Send {
    /// Advances one epoch (or batch) and sets the optimizer's lrs for it.
    fn step(&mut self);

    /// Advances with a validation metric ([`ReduceLROnPlateau`] needs one; the closed-form
    /// schedulers ignore it).
    fn step_with_metric(&mut self, metric: f64) {
        let _ = metric;
        self.step()
    }

    /// Number of `step` calls so far (torch's `last_epoch`).
    fn last_epoch(&self) -> u64;

    /// The lrs set by the last step (or by construction), one per group.
    fn last_lr(&self) -> Vec<f64>;

    /// The scheduler's progress, for checkpoints.
    fn state_dict(&self) -> SchedulerState;

    /// Restores progress saved by a scheduler of the same kind over as many groups, and writes
    /// the restored lrs (and momenta) into the optimizer.
    fn load_state_dict(&mut self, state: &SchedulerState) -> Result<(), NnError>;
}

/// A scheduler's progress. Serialises to JSON ([`SchedulerState::save`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerState {
    /// Which scheduler wrote it (`"StepLR"`, ...).
    pub kind: String,
    /// Number of steps taken.
    pub last_epoch: u64,
    /// The lr each group started from.
    pub base_lrs: Vec<f64>,
    /// The lrs set last.
    pub last_lrs: Vec<f64>,
    /// Plateau: best metric so far (`None` before the first one).
    #[serde(default)]
    pub best: Option<f64>,
    /// Plateau: steps without improvement.
    #[serde(default)]
    pub num_bad_epochs: u64,
    /// Plateau: cooldown steps left.
    #[serde(default)]
    pub cooldown_counter: u64,
}

impl SchedulerState {
    /// The state as a JSON string.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("scheduler state serialises")
    }

    /// Parses a JSON string written by [`SchedulerState::to_json`].
    pub fn from_json(s: &str) -> Result<Self, NnError> {
        serde_json::from_str(s).map_err(|e| NnError::StateDict(format!("scheduler state: {e}")))
    }

    /// Writes the state as a JSON file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), NnError> {
        let path = path.as_ref();
        std::fs::write(path, self.to_json())
            .map_err(|e| NnError::File(path.display().to_string(), e.to_string()))
    }

    /// Reads a JSON file written by [`SchedulerState::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, NnError> {
        let path = path.as_ref();
        let file_err = |e: String| NnError::File(path.display().to_string(), e);
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        Self::from_json(&text).map_err(|e| file_err(e.to_string()))
    }
}

/// One value for every group, or one per group.
#[derive(Clone, Debug, PartialEq)]
pub enum PerGroup {
    /// The same value for all groups.
    All(f64),
    /// One value per group, in group order.
    Each(Vec<f64>),
}

impl From<f64> for PerGroup {
    fn from(v: f64) -> Self {
        PerGroup::All(v)
    }
}

impl From<Vec<f64>> for PerGroup {
    fn from(v: Vec<f64>) -> Self {
        PerGroup::Each(v)
    }
}

impl From<&[f64]> for PerGroup {
    fn from(v: &[f64]) -> Self {
        PerGroup::Each(v.to_vec())
    }
}

impl PerGroup {
    fn resolve(&self, groups: usize, field: &str) -> Result<Vec<f64>, NnError> {
        let v = match self {
            PerGroup::All(x) => vec![*x; groups],
            PerGroup::Each(v) if v.len() == groups => v.clone(),
            PerGroup::Each(v) => {
                return Err(NnError::Config(format!(
                    "{field}: {} values for {groups} parameter groups",
                    v.len()
                )))
            }
        };
        for &x in &v {
            non_negative(field, x)?;
        }
        Ok(v)
    }
}

fn non_negative(field: &str, v: f64) -> Result<(), NnError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(NnError::Config(format!(
            "{field} must be finite and >= 0, got {v}"
        )))
    }
}

fn positive(field: &str, v: f64) -> Result<(), NnError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(NnError::Config(format!(
            "{field} must be finite and > 0, got {v}"
        )))
    }
}

/// What every scheduler keeps: the optimizer handle, base lrs, the epoch and the last lrs.
#[derive(Clone, Debug)]
struct Core {
    hyper: HyperHandle,
    base_lrs: Vec<f64>,
    last_epoch: u64,
    last_lrs: Vec<f64>,
}

impl Core {
    fn new<O: Optimizer + ?Sized>(opt: &O) -> Self {
        let hyper = opt.hyper();
        let base_lrs = hyper.lrs();
        Core {
            hyper,
            last_lrs: base_lrs.clone(),
            base_lrs,
            last_epoch: 0,
        }
    }

    fn groups(&self) -> usize {
        self.base_lrs.len()
    }

    fn apply(&mut self, lrs: Vec<f64>, momenta: Option<Vec<f64>>) {
        for (i, &lr) in lrs.iter().enumerate() {
            self.hyper.set_lr_unchecked(i, lr);
        }
        for (i, m) in momenta.into_iter().flatten().enumerate() {
            self.hyper.set_momentum_unchecked(i, m);
        }
        self.last_lrs = lrs;
    }

    fn state(&self, kind: &str) -> SchedulerState {
        SchedulerState {
            kind: kind.to_string(),
            last_epoch: self.last_epoch,
            base_lrs: self.base_lrs.clone(),
            last_lrs: self.last_lrs.clone(),
            best: None,
            num_bad_epochs: 0,
            cooldown_counter: 0,
        }
    }

    fn check(&self, kind: &str, s: &SchedulerState) -> Result<(), NnError> {
        if s.kind != kind {
            return Err(NnError::StateDict(format!(
                "scheduler state of kind `{}` loaded into a {kind}",
                s.kind
            )));
        }
        if s.base_lrs.len() != self.groups() || s.last_lrs.len() != self.groups() {
            return Err(NnError::StateDict(format!(
                "{kind} state has {} groups, the scheduler drives {}",
                s.base_lrs.len(),
                self.groups()
            )));
        }
        Ok(())
    }
}

/// A schedule computed from the epoch alone.
trait ClosedForm {
    fn core(&self) -> &Core;
    fn core_mut(&mut self) -> &mut Core;
    /// The lr of `group` at `epoch`.
    fn lr_at(&self, epoch: u64, group: usize, base_lr: f64) -> f64;
    /// The momentum of `group` at `epoch`, for schedules that cycle it.
    fn momentum_at(&self, _epoch: u64, _group: usize) -> Option<f64> {
        None
    }
    /// Computes the lrs of the current epoch and writes them.
    fn refresh(&mut self) {
        let core = self.core();
        let e = core.last_epoch;
        let lrs: Vec<f64> = (0..core.groups())
            .map(|i| self.lr_at(e, i, core.base_lrs[i]))
            .collect();
        let momenta: Option<Vec<f64>> =
            (0..core.groups()).map(|i| self.momentum_at(e, i)).collect();
        self.core_mut().apply(lrs, momenta);
    }
}

macro_rules! closed_form_scheduler {
    ($t:ident) => {
        impl Scheduler for $t {
            fn step(&mut self) {
                self.core.last_epoch += 1;
                self.refresh();
            }
            fn last_epoch(&self) -> u64 {
                self.core.last_epoch
            }
            fn last_lr(&self) -> Vec<f64> {
                self.core.last_lrs.clone()
            }
            fn state_dict(&self) -> SchedulerState {
                self.core.state(stringify!($t))
            }
            fn load_state_dict(&mut self, state: &SchedulerState) -> Result<(), NnError> {
                self.core.check(stringify!($t), state)?;
                self.core.last_epoch = state.last_epoch;
                self.core.base_lrs = state.base_lrs.clone();
                self.refresh();
                Ok(())
            }
        }
        impl $t {
            fn start(mut self) -> Self {
                self.refresh();
                self
            }
        }
    };
}

// ---------------------------------------------------------------------------------- StepLR

/// Multiplies the lr by `gamma` every `step_size` epochs: `base · γ^⌊epoch / step_size⌋`.
#[derive(Clone, Debug)]
pub struct StepLR {
    core: Core,
    step_size: u64,
    gamma: f64,
}

impl StepLR {
    /// A step schedule over every group of `opt` (`step_size` >= 1, `gamma` >= 0).
    pub fn new<O: Optimizer + ?Sized>(
        opt: &O,
        step_size: u64,
        gamma: f64,
    ) -> Result<Self, NnError> {
        if step_size == 0 {
            return Err(NnError::Config("step_size must be >= 1".into()));
        }
        non_negative("gamma", gamma)?;
        Ok(StepLR {
            core: Core::new(opt),
            step_size,
            gamma,
        }
        .start())
    }
}

impl ClosedForm for StepLR {
    fn core(&self) -> &Core {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
    fn lr_at(&self, epoch: u64, _group: usize, base: f64) -> f64 {
        base * self.gamma.powf((epoch / self.step_size) as f64)
    }
}

closed_form_scheduler!(StepLR);

// ---------------------------------------------------------------------------------- MultiStepLR

/// Multiplies the lr by `gamma` at each milestone epoch: `base · γ^(milestones ≤ epoch)`
/// (a milestone listed twice counts twice, as in torch).
#[derive(Clone, Debug)]
pub struct MultiStepLR {
    core: Core,
    milestones: Vec<u64>,
    gamma: f64,
}

impl MultiStepLR {
    /// A milestone schedule over every group of `opt`.
    pub fn new<O: Optimizer + ?Sized>(
        opt: &O,
        milestones: impl Into<Vec<u64>>,
        gamma: f64,
    ) -> Result<Self, NnError> {
        non_negative("gamma", gamma)?;
        let mut milestones = milestones.into();
        milestones.sort_unstable();
        Ok(MultiStepLR {
            core: Core::new(opt),
            milestones,
            gamma,
        }
        .start())
    }
}

impl ClosedForm for MultiStepLR {
    fn core(&self) -> &Core {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
    fn lr_at(&self, epoch: u64, _group: usize, base: f64) -> f64 {
        let passed = self.milestones.partition_point(|&m| m <= epoch);
        base * self.gamma.powf(passed as f64)
    }
}

closed_form_scheduler!(MultiStepLR);

// ---------------------------------------------------------------------------------- ExponentialLR

/// Multiplies the lr by `gamma` every epoch: `base · γ^epoch`.
#[derive(Clone, Debug)]
pub struct ExponentialLR {
    core: Core,
    gamma: f64,
}

impl ExponentialLR {
    /// An exponential schedule over every group of `opt`.
    pub fn new<O: Optimizer + ?Sized>(opt: &O, gamma: f64) -> Result<Self, NnError> {
        non_negative("gamma", gamma)?;
        Ok(ExponentialLR {
            core: Core::new(opt),
            gamma,
        }
        .start())
    }
}

impl ClosedForm for ExponentialLR {
    fn core(&self) -> &Core {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
    fn lr_at(&self, epoch: u64, _group: usize, base: f64) -> f64 {
        base * self.gamma.powf(epoch as f64)
    }
}

closed_form_scheduler!(ExponentialLR);

// ---------------------------------------------------------------------------------- Cosine

/// Cosine annealing from the base lr to `eta_min` over `t_max` epochs, optionally after a linear
/// warmup.
///
/// Without warmup this is `torch.optim.lr_scheduler.CosineAnnealingLR`:
/// `η_min + (base − η_min)·(1 + cos(π·epoch/t_max))/2`, which keeps following the cosine (back
/// up) after `t_max`, as torch's does. With `warmup_steps = w > 0` (like Hugging Face's
/// `get_cosine_schedule_with_warmup`, `t_max` counting the warmup): `base·epoch/w` for
/// `epoch < w`, then the cosine over the remaining `t_max − w` epochs, holding `η_min` after
/// `t_max`.
#[derive(Clone, Debug)]
pub struct CosineAnnealingLR {
    core: Core,
    t_max: u64,
    eta_min: f64,
    warmup_steps: u64,
}

impl CosineAnnealingLR {
    /// torch's cosine annealing (`t_max` >= 1, `eta_min` >= 0).
    pub fn new<O: Optimizer + ?Sized>(opt: &O, t_max: u64, eta_min: f64) -> Result<Self, NnError> {
        Self::with_warmup(opt, 0, t_max, eta_min)
    }

    /// Linear warmup from 0 over `warmup_steps`, then cosine annealing until `t_max`
    /// (`warmup_steps` <= `t_max`).
    pub fn with_warmup<O: Optimizer + ?Sized>(
        opt: &O,
        warmup_steps: u64,
        t_max: u64,
        eta_min: f64,
    ) -> Result<Self, NnError> {
        if t_max == 0 {
            return Err(NnError::Config("t_max must be >= 1".into()));
        }
        if warmup_steps > t_max {
            return Err(NnError::Config(format!(
                "warmup_steps ({warmup_steps}) must be <= t_max ({t_max})"
            )));
        }
        non_negative("eta_min", eta_min)?;
        Ok(CosineAnnealingLR {
            core: Core::new(opt),
            t_max,
            eta_min,
            warmup_steps,
        }
        .start())
    }
}

impl ClosedForm for CosineAnnealingLR {
    fn core(&self) -> &Core {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
    fn lr_at(&self, epoch: u64, _group: usize, base: f64) -> f64 {
        let (w, t) = (self.warmup_steps, self.t_max);
        if w == 0 {
            let c = (PI * epoch as f64 / t as f64).cos();
            return self.eta_min + (base - self.eta_min) * (1.0 + c) / 2.0;
        }
        if epoch < w {
            return base * epoch as f64 / w as f64;
        }
        let progress = ((epoch - w) as f64 / (t - w).max(1) as f64).min(1.0);
        self.eta_min + (base - self.eta_min) * 0.5 * (1.0 + (PI * progress).cos())
    }
}

closed_form_scheduler!(CosineAnnealingLR);

// ---------------------------------------------------------------------------------- Linear

/// Linear warmup from 0 to the base lr over `warmup_steps`, then linear decay to 0 at
/// `total_steps` (Hugging Face's `get_linear_schedule_with_warmup`): the factor is
/// `epoch/max(1, w)` for `epoch < w`, else `max(0, (total − epoch)/max(1, total − w))`.
#[derive(Clone, Debug)]
pub struct LinearWarmupDecayLR {
    core: Core,
    warmup_steps: u64,
    total_steps: u64,
}

impl LinearWarmupDecayLR {
    /// The schedule over every group of `opt` (`warmup_steps` <= `total_steps`).
    pub fn new<O: Optimizer + ?Sized>(
        opt: &O,
        warmup_steps: u64,
        total_steps: u64,
    ) -> Result<Self, NnError> {
        if warmup_steps > total_steps {
            return Err(NnError::Config(format!(
                "warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})"
            )));
        }
        Ok(LinearWarmupDecayLR {
            core: Core::new(opt),
            warmup_steps,
            total_steps,
        }
        .start())
    }
}

impl ClosedForm for LinearWarmupDecayLR {
    fn core(&self) -> &Core {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
    fn lr_at(&self, epoch: u64, _group: usize, base: f64) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        let factor = if epoch < w {
            epoch as f64 / w.max(1) as f64
        } else {
            (t as f64 - epoch as f64).max(0.0) / t.saturating_sub(w).max(1) as f64
        };
        base * factor
    }
}

closed_form_scheduler!(LinearWarmupDecayLR);

// ---------------------------------------------------------------------------------- OneCycle

/// How [`OneCycleLR`] interpolates within a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Anneal {
    /// Cosine (torch's default).
    Cos,
    /// Linear.
    Linear,
}

/// Settings of [`OneCycleLR`]; the defaults are torch's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OneCycleConfig {
    /// Fraction of the steps spent increasing the lr (default 0.3).
    pub pct_start: f64,
    /// Interpolation (default cosine).
    pub anneal: Anneal,
    /// Cycle momentum (or Adam's beta1) inversely to the lr (default true).
    pub cycle_momentum: bool,
    /// Lowest momentum, reached at the peak lr (default 0.85).
    pub base_momentum: f64,
    /// Highest momentum, at the start and end (default 0.95).
    pub max_momentum: f64,
    /// The initial lr is `max_lr / div_factor` (default 25).
    pub div_factor: f64,
    /// The final lr is `initial_lr / final_div_factor` (default 1e4).
    pub final_div_factor: f64,
    /// Three phases (up, back down to the initial lr, annihilation) instead of two.
    pub three_phase: bool,
}

impl Default for OneCycleConfig {
    fn default() -> Self {
        OneCycleConfig {
            pct_start: 0.3,
            anneal: Anneal::Cos,
            cycle_momentum: true,
            base_momentum: 0.85,
            max_momentum: 0.95,
            div_factor: 25.0,
            final_div_factor: 1e4,
            three_phase: false,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Phase {
    end_step: f64,
    lr: (Point, Point),
    momentum: (bool, bool),
}

/// Which lr a phase starts or ends at.
#[derive(Clone, Copy, Debug)]
enum Point {
    Initial,
    Max,
    Min,
}

/// The 1cycle policy (`torch.optim.lr_scheduler.OneCycleLR`): from `max_lr/div_factor` up to
/// `max_lr` over `pct_start` of `total_steps`, then down to `initial/final_div_factor`, with
/// momentum (or beta1) cycling the other way. It ignores the optimizer's own lrs. Stepping past
/// `total_steps` holds the final values (torch raises an error).
#[derive(Clone, Debug)]
pub struct OneCycleLR {
    core: Core,
    max_lrs: Vec<f64>,
    total_steps: u64,
    config: OneCycleConfig,
    phases: Vec<Phase>,
}

impl OneCycleLR {
    /// The policy over every group of `opt`, peaking at `max_lr` (one value or one per group)
    /// after `pct_start · total_steps` steps.
    pub fn new<O: Optimizer + ?Sized>(
        opt: &O,
        max_lr: impl Into<PerGroup>,
        total_steps: u64,
        config: OneCycleConfig,
    ) -> Result<Self, NnError> {
        let mut core = Core::new(opt);
        let max_lrs = max_lr.into().resolve(core.groups(), "max_lr")?;
        if total_steps == 0 {
            return Err(NnError::Config("total_steps must be >= 1".into()));
        }
        if !(0.0..=1.0).contains(&config.pct_start) {
            return Err(NnError::Config(format!(
                "pct_start must be in [0, 1], got {}",
                config.pct_start
            )));
        }
        positive("div_factor", config.div_factor)?;
        positive("final_div_factor", config.final_div_factor)?;
        if config.cycle_momentum {
            non_negative("base_momentum", config.base_momentum)?;
            non_negative("max_momentum", config.max_momentum)?;
            if (0..core.groups()).any(|i| core.hyper.momentum(i).is_none()) {
                return Err(NnError::Config(
                    "cycle_momentum: the optimizer has no momentum or beta1 (set cycle_momentum to false)"
                        .into(),
                ));
            }
        }
        let t = total_steps as f64;
        let p = config.pct_start;
        use Point::*;
        let phases = if config.three_phase {
            vec![
                Phase {
                    end_step: p * t - 1.0,
                    lr: (Initial, Max),
                    momentum: (true, false),
                },
                Phase {
                    end_step: 2.0 * p * t - 2.0,
                    lr: (Max, Initial),
                    momentum: (false, true),
                },
                Phase {
                    end_step: t - 1.0,
                    lr: (Initial, Min),
                    momentum: (true, true),
                },
            ]
        } else {
            vec![
                Phase {
                    end_step: p * t - 1.0,
                    lr: (Initial, Max),
                    momentum: (true, false),
                },
                Phase {
                    end_step: t - 1.0,
                    lr: (Max, Min),
                    momentum: (false, true),
                },
            ]
        };
        core.base_lrs = max_lrs.iter().map(|m| m / config.div_factor).collect();
        Ok(OneCycleLR {
            core,
            max_lrs,
            total_steps,
            config,
            phases,
        }
        .start())
    }

    fn anneal(&self, start: f64, end: f64, pct: f64) -> f64 {
        match self.config.anneal {
            Anneal::Cos => end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0),
            Anneal::Linear => (end - start) * pct + start,
        }
    }

    /// (phase, fraction of it done) at `epoch`.
    fn locate(&self, epoch: u64) -> (Phase, f64) {
        let step = epoch.min(self.total_steps) as f64;
        let mut start = 0.0;
        for (i, ph) in self.phases.iter().enumerate() {
            if step <= ph.end_step || i + 1 == self.phases.len() {
                let width = ph.end_step - start;
                let pct = if width == 0.0 {
                    1.0
                } else {
                    (step - start) / width
                };
                return (*ph, pct);
            }
            start = ph.end_step;
        }
        unreachable!("the last phase always matches")
    }
}

impl ClosedForm for OneCycleLR {
    fn core(&self) -> &Core {
        &self.core
    }
    fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
    fn lr_at(&self, epoch: u64, group: usize, _base: f64) -> f64 {
        let initial = self.max_lrs[group] / self.config.div_factor;
        let value = |p: Point| match p {
            Point::Initial => initial,
            Point::Max => self.max_lrs[group],
            Point::Min => initial / self.config.final_div_factor,
        };
        let (ph, pct) = self.locate(epoch);
        self.anneal(value(ph.lr.0), value(ph.lr.1), pct)
    }
    fn momentum_at(&self, epoch: u64, _group: usize) -> Option<f64> {
        if !self.config.cycle_momentum {
            return None;
        }
        let value = |high: bool| {
            if high {
                self.config.max_momentum
            } else {
                self.config.base_momentum
            }
        };
        let (ph, pct) = self.locate(epoch);
        Some(self.anneal(value(ph.momentum.0), value(ph.momentum.1), pct))
    }
}

closed_form_scheduler!(OneCycleLR);

// ---------------------------------------------------------------------------------- Plateau

/// Whether a lower or a higher metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlateauMode {
    /// Lower is better (a loss).
    Min,
    /// Higher is better (an accuracy).
    Max,
}

/// How [`PlateauConfig::threshold`] measures a significant improvement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThresholdMode {
    /// Relative: better than `best·(1 ∓ threshold)` (torch's default).
    Rel,
    /// Absolute: better than `best ∓ threshold`.
    Abs,
}

/// Settings of [`ReduceLROnPlateau`]; the defaults are torch's.
#[derive(Clone, Debug, PartialEq)]
pub struct PlateauConfig {
    /// Lower or higher is better (default min).
    pub mode: PlateauMode,
    /// The lr is multiplied by this on a plateau (default 0.1; must be in [0, 1)).
    pub factor: f64,
    /// Steps without improvement tolerated before reducing (default 10).
    pub patience: u64,
    /// Smallest change that counts as an improvement (default 1e-4).
    pub threshold: f64,
    /// Relative or absolute threshold (default relative).
    pub threshold_mode: ThresholdMode,
    /// Steps to wait after a reduction before counting bad steps again (default 0).
    pub cooldown: u64,
    /// Lower bound of each group's lr (default 0).
    pub min_lr: PerGroup,
    /// Reductions smaller than this are skipped (default 1e-8).
    pub eps: f64,
}

impl Default for PlateauConfig {
    fn default() -> Self {
        PlateauConfig {
            mode: PlateauMode::Min,
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            threshold_mode: ThresholdMode::Rel,
            cooldown: 0,
            min_lr: PerGroup::All(0.0),
            eps: 1e-8,
        }
    }
}

/// Reduces the lr of every group by `factor` when a metric has stopped improving for more than
/// `patience` steps (`torch.optim.lr_scheduler.ReduceLROnPlateau`). Call
/// [`Scheduler::step_with_metric`]; plain `step()` panics, since the schedule needs the metric.
#[derive(Clone, Debug)]
pub struct ReduceLROnPlateau {
    core: Core,
    config: PlateauConfig,
    min_lrs: Vec<f64>,
    best: Option<f64>,
    num_bad_epochs: u64,
    cooldown_counter: u64,
}

impl ReduceLROnPlateau {
    /// The scheduler over every group of `opt`.
    pub fn new<O: Optimizer + ?Sized>(opt: &O, config: PlateauConfig) -> Result<Self, NnError> {
        let core = Core::new(opt);
        if !(0.0..1.0).contains(&config.factor) {
            return Err(NnError::Config(format!(
                "factor must be in [0, 1), got {}",
                config.factor
            )));
        }
        non_negative("threshold", config.threshold)?;
        non_negative("eps", config.eps)?;
        let min_lrs = config.min_lr.resolve(core.groups(), "min_lr")?;
        Ok(ReduceLROnPlateau {
            core,
            config,
            min_lrs,
            best: None,
            num_bad_epochs: 0,
            cooldown_counter: 0,
        })
    }

    fn is_better(&self, a: f64) -> bool {
        let Some(best) = self.best else {
            // Against ±inf: anything but NaN (and the infinity itself) improves.
            return match self.config.mode {
                PlateauMode::Min => a < f64::INFINITY,
                PlateauMode::Max => a > f64::NEG_INFINITY,
            };
        };
        let t = self.config.threshold;
        match (self.config.mode, self.config.threshold_mode) {
            (PlateauMode::Min, ThresholdMode::Rel) => a < best * (1.0 - t),
            (PlateauMode::Min, ThresholdMode::Abs) => a < best - t,
            (PlateauMode::Max, ThresholdMode::Rel) => a > best * (t + 1.0),
            (PlateauMode::Max, ThresholdMode::Abs) => a > best + t,
        }
    }

    /// The best metric seen so far.
    pub fn best(&self) -> Option<f64> {
        self.best
    }

    /// Steps since the last improvement (reset by reductions and cooldown).
    pub fn num_bad_epochs(&self) -> u64 {
        self.num_bad_epochs
    }
}

impl Scheduler for ReduceLROnPlateau {
    fn step(&mut self) {
        panic!("ReduceLROnPlateau::step: this scheduler needs the metric; call step_with_metric(metric)")
    }

    fn step_with_metric(&mut self, metric: f64) {
        self.core.last_epoch += 1;
        if self.is_better(metric) {
            self.best = Some(metric);
            self.num_bad_epochs = 0;
        } else {
            self.num_bad_epochs += 1;
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad_epochs = 0;
        }
        if self.num_bad_epochs > self.config.patience {
            for i in 0..self.core.groups() {
                let old = self.core.hyper.lr(i);
                let new = (old * self.config.factor).max(self.min_lrs[i]);
                if old - new > self.config.eps {
                    self.core.hyper.set_lr_unchecked(i, new);
                }
            }
            self.cooldown_counter = self.config.cooldown;
            self.num_bad_epochs = 0;
        }
        self.core.last_lrs = (0..self.core.groups())
            .map(|i| self.core.hyper.lr(i))
            .collect();
    }

    fn last_epoch(&self) -> u64 {
        self.core.last_epoch
    }

    fn last_lr(&self) -> Vec<f64> {
        self.core.last_lrs.clone()
    }

    fn state_dict(&self) -> SchedulerState {
        SchedulerState {
            best: self.best,
            num_bad_epochs: self.num_bad_epochs,
            cooldown_counter: self.cooldown_counter,
            ..self.core.state("ReduceLROnPlateau")
        }
    }

    fn load_state_dict(&mut self, state: &SchedulerState) -> Result<(), NnError> {
        self.core.check("ReduceLROnPlateau", state)?;
        self.core.last_epoch = state.last_epoch;
        self.core.base_lrs = state.base_lrs.clone();
        self.best = state.best;
        self.num_bad_epochs = state.num_bad_epochs;
        self.cooldown_counter = state.cooldown_counter;
        self.core.apply(state.last_lrs.clone(), None);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{Adagrad, Adam, ParamGroup, Sgd, SgdConfig};
    use crate::Param;
    use kiln_core::Tensor;

    fn sgd(lrs: &[f64]) -> Sgd {
        Sgd::with_groups(lrs.iter().map(|&lr| {
            ParamGroup::new(
                Param::new(Tensor::ones([1])),
                SgdConfig {
                    lr,
                    momentum: 0.9,
                    ..Default::default()
                },
            )
        }))
        .unwrap()
    }

    fn lrs_over<S: Scheduler>(s: &mut S, n: usize) -> Vec<Vec<f64>> {
        let mut out = vec![s.last_lr()];
        for _ in 0..n {
            s.step();
            out.push(s.last_lr());
        }
        out
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn step_multistep_and_exponential_by_hand() {
        let opt = sgd(&[1.0, 0.5]);
        let mut s = StepLR::new(&opt, 2, 0.1).unwrap();
        let l = lrs_over(&mut s, 4);
        assert!(
            close(l[1][0], 1.0) && close(l[2][0], 0.1) && close(l[4][1], 0.005),
            "{l:?}"
        );
        assert_eq!(opt.lrs(), l[4]);
        let opt = sgd(&[1.0]);
        let mut s = MultiStepLR::new(&opt, vec![3, 1, 3], 0.5).unwrap();
        let l: Vec<f64> = lrs_over(&mut s, 4).into_iter().map(|v| v[0]).collect();
        assert_eq!(l, [1.0, 0.5, 0.5, 0.125, 0.125]);
        let opt = sgd(&[2.0]);
        let mut s = ExponentialLR::new(&opt, 0.5).unwrap();
        assert_eq!(lrs_over(&mut s, 2)[2], [0.5]);
    }

    #[test]
    fn cosine_with_and_without_warmup() {
        let opt = sgd(&[1.0]);
        let mut s = CosineAnnealingLR::new(&opt, 4, 0.2).unwrap();
        let l: Vec<f64> = lrs_over(&mut s, 8).into_iter().map(|v| v[0]).collect();
        assert!(
            close(l[2], 0.6) && close(l[4], 0.2) && close(l[8], 1.0),
            "{l:?}"
        );
        let opt = sgd(&[1.0]);
        let mut s = CosineAnnealingLR::with_warmup(&opt, 2, 6, 0.0).unwrap();
        let l: Vec<f64> = lrs_over(&mut s, 8).into_iter().map(|v| v[0]).collect();
        assert!(
            close(l[0], 0.0) && close(l[1], 0.5) && close(l[2], 1.0) && close(l[4], 0.5),
            "{l:?}"
        );
        assert!(l[6].abs() < 1e-12 && l[8].abs() < 1e-12, "{l:?}");
        assert!(CosineAnnealingLR::with_warmup(&opt, 7, 6, 0.0).is_err());
    }

    #[test]
    fn linear_warmup_then_decay() {
        let opt = sgd(&[1.0]);
        let mut s = LinearWarmupDecayLR::new(&opt, 2, 6).unwrap();
        let l: Vec<f64> = lrs_over(&mut s, 7).into_iter().map(|v| v[0]).collect();
        assert_eq!(l, [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
    }

    #[test]
    fn one_cycle_peaks_and_cycles_momentum() {
        let opt = sgd(&[1.0]);
        let mut s = OneCycleLR::new(&opt, 1.0, 10, OneCycleConfig::default()).unwrap();
        assert!(close(opt.lr(0), 0.04) && close(opt.hyper().momentum(0).unwrap(), 0.95));
        let l: Vec<f64> = lrs_over(&mut s, 12).into_iter().map(|v| v[0]).collect();
        assert!(close(l[2], 1.0), "{l:?}");
        assert!(close(l[9], 0.04 / 1e4), "{l:?}");
        assert!(close(l[12], l[10]), "held after total_steps: {l:?}");
        let opt = sgd(&[1.0]);
        let mut s = OneCycleLR::new(&opt, 1.0, 10, OneCycleConfig::default()).unwrap();
        s.step();
        s.step();
        assert!(close(opt.hyper().momentum(0).unwrap(), 0.85));
        let ada = Adagrad::new(vec![Param::new(Tensor::ones([1]))], 0.1).unwrap();
        let e = OneCycleLR::new(&ada, 1.0, 10, OneCycleConfig::default()).unwrap_err();
        assert!(e.to_string().contains("cycle_momentum"), "{e}");
        let e = OneCycleLR::new(&opt, vec![1.0, 2.0], 10, OneCycleConfig::default()).unwrap_err();
        assert!(e.to_string().contains("max_lr"), "{e}");
        // Adam: beta1 is cycled.
        let adam = Adam::new(vec![Param::new(Tensor::ones([1]))], 0.1).unwrap();
        let _s = OneCycleLR::new(&adam, 1.0, 10, OneCycleConfig::default()).unwrap();
        assert_eq!(adam.group_config(0).betas.0, 0.95);
    }

    #[test]
    fn plateau_waits_patience_then_cools_down() {
        let opt = sgd(&[1.0]);
        let cfg = PlateauConfig {
            factor: 0.5,
            patience: 1,
            cooldown: 1,
            min_lr: 0.2.into(),
            ..Default::default()
        };
        let mut s = ReduceLROnPlateau::new(&opt, cfg).unwrap();
        let mut lrs = Vec::new();
        for m in [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5] {
            s.step_with_metric(m);
            lrs.push(opt.lr(0));
        }
        // Bad at steps 2, 3 -> reduce at 3; cooldown step 4; bad 5, 6 -> reduce at 6 (to 0.25);
        // the next reduction would go below min_lr.
        assert_eq!(lrs, [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]);
        assert_eq!(s.best(), Some(0.5));
        let e = ReduceLROnPlateau::new(
            &opt,
            PlateauConfig {
                factor: 1.0,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("config: factor"), "{e}");
    }

    #[test]
    #[should_panic(expected = "needs the metric")]
    fn plateau_step_without_metric_panics() {
        let opt = sgd(&[1.0]);
        ReduceLROnPlateau::new(&opt, PlateauConfig::default())
            .unwrap()
            .step();
    }

    #[test]
    fn state_round_trips_through_json() {
        let opt = sgd(&[1.0, 0.1]);
        let mut s = StepLR::new(&opt, 2, 0.5).unwrap();
        for _ in 0..5 {
            s.step();
        }
        let dir = std::env::temp_dir().join(format!("kiln-sched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.json");
        s.state_dict().save(&path).unwrap();
        let opt2 = sgd(&[1.0, 0.1]);
        let mut s2 = StepLR::new(&opt2, 2, 0.5).unwrap();
        s2.load_state_dict(&SchedulerState::load(&path).unwrap())
            .unwrap();
        assert_eq!(opt2.lrs(), opt.lrs());
        s.step();
        s2.step();
        assert_eq!(opt2.lrs(), opt.lrs());
        let e = ExponentialLR::new(&opt2, 0.5)
            .unwrap()
            .load_state_dict(&s.state_dict())
            .unwrap_err();
        assert!(e.to_string().contains("kind `StepLR`"), "{e}");
        // Plateau keeps its bookkeeping, including "no best yet".
        let mut p = ReduceLROnPlateau::new(&opt, PlateauConfig::default()).unwrap();
        let st = SchedulerState::from_json(&p.state_dict().to_json()).unwrap();
        assert_eq!(st.best, None);
        p.step_with_metric(3.0);
        let st = SchedulerState::from_json(&p.state_dict().to_json()).unwrap();
        assert_eq!(
            (st.best, st.num_bad_epochs, st.last_epoch),
            (Some(3.0), 0, 1)
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
