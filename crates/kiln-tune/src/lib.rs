//! kiln-tune: fine-tune pretrained models. A [`Strategy`] says which parameters train, when and
//! at which learning rate (freezing, gradual unfreezing, layer-wise LR decay, LoRA, BitFit, linear
//! probe); the [`Trainer`] runs the loop (accumulation, clipping, warmup schedules, evaluation with
//! streaming metrics, early stopping, progress, metrics log, atomic checkpoints and exact resume).

pub mod error;

pub use error::{Result, TuneError};
