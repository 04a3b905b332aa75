//! kiln-tune: fine-tune pretrained models. A [`Strategy`] says which parameters train, when and
//! at which learning rate (freezing, gradual unfreezing, layer-wise LR decay, LoRA, BitFit, linear
//! probe); the [`Trainer`] runs the loop (accumulation, clipping, warmup schedules, evaluation with
//! streaming metrics, early stopping, progress, metrics log, atomic checkpoints and exact resume).

pub mod causal;
pub mod data;
pub mod error;
pub mod lora;
pub mod lr_finder;
pub mod method;
pub mod metrics;
pub mod plot;
pub mod recipe;
pub mod save;
pub mod strategy;
pub mod token_classification;
pub mod trainer;

pub use causal::{
    CausalLmData, CausalLmModel, CausalRecipe, InstructionColumns, InstructionDataset, PromptFormat,
};
pub use data::{Columns, TextBatch, TextDataset};
pub use error::{Result, TuneError};
pub use lora::{
    apply_lora, load_adapter, lora_layers, merge_lora, remove_lora, save_adapter, unmerge_lora,
    LoraConfig, LoraLinear, LoraReport,
};
pub use lr_finder::{find_lr, suggest_lr, LrFinderConfig, LrFinderResult};
pub use method::{methods, MethodFn, Methods};
pub use metrics::{Metric, MetricState};
pub use recipe::{is_regression_model, predict_values, DataSpec, Recipe, RecipeReport, TaskKind};
pub use save::{load_classifier, predict, save_classifier, Prediction};
pub use strategy::{Method, Plan, Strategy};
pub use token_classification::{
    TagDataSpec, TagFormat, TaggedDataset, TokenClassData, TokenClassifier, TokenMetrics,
    TokenRecipe,
};
pub use trainer::{
    evaluate, Callback, Evaluation, Schedule, SequenceModel, Task, TrainConfig, TrainReport,
    Trainer,
};
