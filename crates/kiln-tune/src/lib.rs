//! kiln-tune: fine-tune pretrained models. A [`Strategy`] says which parameters train, when and
//! at which learning rate (freezing, gradual unfreezing, layer-wise LR decay, LoRA, BitFit, linear
//! probe); the [`Trainer`] runs the loop (accumulation, clipping, warmup schedules, evaluation with
//! streaming metrics, early stopping, progress, metrics log, atomic checkpoints and exact resume).

pub mod data;
pub mod error;
pub mod methods;
pub mod metrics;
pub mod plot;
pub mod recipe;
pub mod save;
pub mod strategy;
pub mod trainer;

pub use data::{Columns, TextBatch, TextDataset};
pub use error::{Result, TuneError};
pub use metrics::{Metric, MetricState};
pub use recipe::{DataSpec, Recipe, RecipeReport};
pub use save::{load_classifier, predict, save_classifier, Prediction};
pub use strategy::{Method, Plan, Strategy};
pub use trainer::{
    evaluate, Callback, Evaluation, Schedule, SequenceModel, TrainConfig, TrainReport, Trainer,
};

/// The methods registered before any user code runs.
fn builtin_methods() -> std::collections::BTreeMap<String, methods::MethodFn> {
    std::collections::BTreeMap::new()
}
