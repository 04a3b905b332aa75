//! kiln: a deep-learning framework in Rust.
//!
//! `use kiln::prelude::*;` brings in everything a model script needs.

pub use kiln_core as core;
pub use kiln_data as data;
pub use kiln_io as io;
pub use kiln_models as models;
pub use kiln_nn as nn;
pub use kiln_serve as serve;
pub use kiln_tune as tune;

/// The names most programs need.
pub mod prelude {
    pub use kiln_core::{
        enable_grad, gradcheck, no_grad, with_no_grad, Conv1dOptions, Conv2dOptions, CustomOp,
        DType, Device, GradFn, Infer, Rng, Shape, Tensor,
    };
    pub use kiln_data::{
        datasets, ChatMessage, ChatTemplate, DataLoader, EncodeOptions, Normalize, Padding, Split,
        TensorDataset, Tokenizer,
    };
    pub use kiln_models::{
        generate, BertForSequenceClassification, BertModel, GenerationConfig, LlamaForCausalLM,
        LoadOptions, QuantActivations,
    };
    pub use kiln_nn::loss::{self, Loss, Reduction};
    pub use kiln_nn::optim::Optimizer;
    pub use kiln_nn::registry::{registry, BuildContext, Registry, TrainSpec, Training};
    pub use kiln_nn::scheduler::Scheduler;
    pub use kiln_nn::{
        seq, Adam, AdamW, AdaptiveAvgPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d, Buffer, Conv1d,
        Conv1dConfig, Conv2d, Conv2dConfig, Dropout, Embedding, Flatten, Forward, Gelu, Gru, Layer,
        LayerNorm, Linear, LoadMode, Lstm, MaxPool2d, MhaConfig, MhaOptions, Module, ModuleExt,
        MultiheadAttention, Param, Relu, RmsNorm, RnnConfig, Sequential, Sgd, Sigmoid, Silu,
        Softmax, Tanh, TrainFlag, TransformerEncoder, TransformerEncoderLayer,
        TransformerEncoderLayerConfig,
    };
    pub use kiln_tune::{
        Columns, DataSpec, Metric, Recipe, Schedule, Strategy, TextDataset, TrainConfig, Trainer,
    };
}
