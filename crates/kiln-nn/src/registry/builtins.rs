//! The built-in layers, losses, optimizers and schedulers, under snake_case names (torch's class
//! names match too, since names are compared ignoring case and `_`). Arguments use torch's names
//! and defaults. Registering one more built-in is one `r.builtin_*` line in [`register_all`]
//! (plus an args struct when it takes arguments).

use super::{BuildContext, Registry};
use crate::error::NnError;
use crate::layers::{
    AdaptiveAvgPool2d, AvgPool1d, AvgPool2d, BatchNorm1d, BatchNorm2d, BatchNormConfig, Conv1d,
    Conv1dConfig, Conv2d, Conv2dConfig, Dropout, Embedding, Flatten, Gelu, GeluApprox, Gru,
    LayerNorm, Linear, LinearConfig, Lstm, MaxPool1d, MaxPool2d, MhaConfig, MultiheadAttention,
    NormConfig, Padding1d, Padding2d, Relu, RmsNorm, Rnn, RnnConfig, RnnNonlinearity, Sigmoid,
    Silu, Softmax, Tanh, TransformerActivation, TransformerEncoderLayer,
    TransformerEncoderLayerConfig,
};
use crate::loss::{
    BceLoss, BceWithLogitsLoss, CrossEntropyLoss, HuberLoss, KlDivLoss, KlReduction, L1Loss,
    MseLoss, NllLoss, Reduction, SmoothL1Loss,
};
use crate::optim::{AdagradRule, AdamRule, AdamWRule, Optimizer, RmsPropRule, SgdRule};
use crate::scheduler::{
    Anneal, CosineAnnealingLR, ExponentialLR, LinearWarmupDecayLR, MultiStepLR, OneCycleConfig,
    OneCycleLR, PerGroup, PlateauConfig, PlateauMode, ReduceLROnPlateau, StepLR, ThresholdMode,
};
use kiln_core::Tensor;
use kiln_core::{AvgPool1dOptions, AvgPool2dOptions, MaxPool1dOptions, MaxPool2dOptions};
use serde::Deserialize;

/// Registers every built-in into `r`.
pub(super) fn register_all(r: &Registry) -> Result<(), NnError> {
    // Layers.
    r.builtin_layer("linear", &[], linear)?;
    r.builtin_layer("embedding", &[], embedding)?;
    r.builtin_layer("layer_norm", &[], layer_norm)?;
    r.builtin_layer("rms_norm", &[], rms_norm)?;
    r.builtin_layer("dropout", &[], dropout)?;
    r.builtin_layer("flatten", &[], flatten)?;
    r.builtin_layer("relu", &[], |_: NoArgs, _: &mut BuildContext| Ok(Relu))?;
    r.builtin_layer("gelu", &[], gelu)?;
    r.builtin_layer("silu", &[], |_: NoArgs, _: &mut BuildContext| Ok(Silu))?;
    r.builtin_layer("tanh", &[], |_: NoArgs, _: &mut BuildContext| Ok(Tanh))?;
    r.builtin_layer("sigmoid", &[], |_: NoArgs, _: &mut BuildContext| {
        Ok(Sigmoid)
    })?;
    r.builtin_layer("softmax", &[], softmax)?;
    r.builtin_layer("conv1d", &[], conv1d)?;
    r.builtin_layer("conv2d", &[], conv2d)?;
    r.builtin_layer("lstm", &[], |a: RnnArgs, ctx: &mut BuildContext| {
        let a = a.gated("lstm")?;
        Ok(Lstm::with_config(
            a.input_size,
            a.hidden_size,
            a.config()?,
            ctx.rng(),
        ))
    })?;
    r.builtin_layer("gru", &[], |a: RnnArgs, ctx: &mut BuildContext| {
        let a = a.gated("gru")?;
        Ok(Gru::with_config(
            a.input_size,
            a.hidden_size,
            a.config()?,
            ctx.rng(),
        ))
    })?;
    r.builtin_layer("rnn", &[], |a: RnnArgs, ctx: &mut BuildContext| {
        Ok(Rnn::with_config(
            a.input_size,
            a.hidden_size,
            a.config()?,
            ctx.rng(),
        ))
    })?;
    r.builtin_layer("max_pool2d", &[], max_pool2d)?;
    r.builtin_layer("avg_pool2d", &[], avg_pool2d)?;
    r.builtin_layer("max_pool1d", &[], max_pool1d)?;
    r.builtin_layer("avg_pool1d", &[], avg_pool1d)?;
    r.builtin_layer(
        "adaptive_avg_pool2d",
        &[],
        |a: AdaptivePoolArgs, _: &mut BuildContext| {
            let (h, w) = a.output_size.pair();
            if h == 0 || w == 0 {
                return Err(bad(
                    "adaptive_avg_pool2d: output_size must be positive".into()
                ));
            }
            Ok(AdaptiveAvgPool2d::new((h, w)))
        },
    )?;
    r.builtin_layer(
        "batch_norm1d",
        &[],
        |a: BatchNormArgs, _: &mut BuildContext| {
            Ok(BatchNorm1d::with_config(a.num_features, a.config()?))
        },
    )?;
    r.builtin_layer(
        "batch_norm2d",
        &[],
        |a: BatchNormArgs, _: &mut BuildContext| {
            Ok(BatchNorm2d::with_config(a.num_features, a.config()?))
        },
    )?;
    r.builtin_layer("multihead_attention", &[], multihead_attention)?;
    r.builtin_layer("transformer_encoder_layer", &[], transformer_encoder_layer)?;

    // Losses.
    r.builtin_loss("cross_entropy", &["CrossEntropyLoss"], cross_entropy)?;
    r.builtin_loss("nll", &["NLLLoss"], nll)?;
    r.builtin_loss("mse", &["MSELoss"], |a: ReductionArgs| {
        Ok(MseLoss::new(a.reduction.into()))
    })?;
    r.builtin_loss("l1", &["L1Loss"], |a: ReductionArgs| {
        Ok(L1Loss::new(a.reduction.into()))
    })?;
    r.builtin_loss("huber", &["HuberLoss"], huber)?;
    r.builtin_loss("smooth_l1", &["SmoothL1Loss"], smooth_l1)?;
    r.builtin_loss("bce", &["BCELoss", "binary_cross_entropy"], bce)?;
    r.builtin_loss(
        "bce_with_logits",
        &["BCEWithLogitsLoss", "binary_cross_entropy_with_logits"],
        bce_with_logits,
    )?;
    r.builtin_loss("kl_div", &["KLDivLoss"], kl_div)?;

    // Optimizers (the TOML table is the rule's group config).
    r.builtin_optimizer::<SgdRule>("sgd", &[])?;
    r.builtin_optimizer::<AdamRule>("adam", &[])?;
    r.builtin_optimizer::<AdamWRule>("adamw", &[])?;
    r.builtin_optimizer::<RmsPropRule>("rmsprop", &[])?;
    r.builtin_optimizer::<AdagradRule>("adagrad", &[])?;

    // Schedulers.
    r.builtin_scheduler("step_lr", &[], step_lr)?;
    r.builtin_scheduler("multi_step_lr", &[], multi_step_lr)?;
    r.builtin_scheduler("exponential_lr", &[], exponential_lr)?;
    r.builtin_scheduler("cosine_annealing_lr", &["cosine"], cosine)?;
    r.builtin_scheduler(
        "linear_warmup_decay_lr",
        &["linear_warmup", "linear_schedule_with_warmup"],
        linear_warmup_decay,
    )?;
    r.builtin_scheduler("one_cycle_lr", &[], one_cycle)?;
    r.builtin_scheduler("reduce_lr_on_plateau", &["plateau"], plateau)?;
    Ok(())
}

fn yes() -> bool {
    true
}

fn bad(message: String) -> NnError {
    NnError::Config(message)
}

/// Arguments of parameter-free layers: none.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// One dim or several (`normalized_shape = 64` or `[8, 8]`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Dims {
    One(usize),
    Many(Vec<usize>),
}

impl Dims {
    fn to_vec(&self) -> Vec<usize> {
        match self {
            Dims::One(d) => vec![*d],
            Dims::Many(v) => v.clone(),
        }
    }
}

/// One value for every group, or one per group.
#[derive(Deserialize)]
#[serde(untagged)]
enum PerGroupArg {
    All(f64),
    Each(Vec<f64>),
}

impl From<PerGroupArg> for PerGroup {
    fn from(a: PerGroupArg) -> Self {
        match a {
            PerGroupArg::All(v) => PerGroup::All(v),
            PerGroupArg::Each(v) => PerGroup::Each(v),
        }
    }
}

// ---------------------------------------------------------------------------- layers

/// A size for both spatial dims, or one per dim (`kernel_size = 3` or `[3, 5]`).
#[derive(Deserialize)]
#[serde(untagged)]
enum PairArg {
    One(usize),
    Two([usize; 2]),
}

impl PairArg {
    fn pair(&self) -> (usize, usize) {
        match *self {
            PairArg::One(v) => (v, v),
            PairArg::Two([h, w]) => (h, w),
        }
    }
}

/// Convolution padding: a size, one per dim, or torch's `"same"` / `"valid"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum PaddingArg {
    Size(PairArg),
    Named(String),
}

impl Default for PaddingArg {
    fn default() -> Self {
        PaddingArg::Size(PairArg::One(0))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConvArgs {
    #[serde(alias = "in")]
    in_channels: usize,
    #[serde(alias = "out")]
    out_channels: usize,
    kernel_size: PairArg,
    #[serde(default = "one_pair")]
    stride: PairArg,
    #[serde(default)]
    padding: PaddingArg,
    #[serde(default = "one_pair")]
    dilation: PairArg,
    #[serde(default = "one_usize")]
    groups: usize,
    #[serde(default = "yes")]
    bias: bool,
}

fn one_usize() -> usize {
    1
}

fn one_pair() -> PairArg {
    PairArg::One(1)
}

fn conv2d(a: ConvArgs, ctx: &mut BuildContext) -> Result<Conv2d, NnError> {
    let padding: Padding2d = match &a.padding {
        PaddingArg::Size(p) => p.pair().into(),
        PaddingArg::Named(s) => s.parse()?,
    };
    let config = Conv2dConfig {
        stride: a.stride.pair(),
        padding,
        dilation: a.dilation.pair(),
        groups: a.groups,
        bias: a.bias,
    };
    check_conv(&a)?;
    Ok(Conv2d::with_config(
        a.in_channels,
        a.out_channels,
        a.kernel_size.pair(),
        config,
        ctx.rng(),
    ))
}

fn conv1d(a: ConvArgs, ctx: &mut BuildContext) -> Result<Conv1d, NnError> {
    let one_dim = |p: &PairArg, what: &str| match *p {
        PairArg::One(v) => Ok(v),
        PairArg::Two(_) => Err(bad(format!("conv1d: {what} takes one size"))),
    };
    let padding: Padding1d = match &a.padding {
        PaddingArg::Size(p) => one_dim(p, "padding")?.into(),
        PaddingArg::Named(s) => s.parse()?,
    };
    let config = Conv1dConfig::default()
        .stride(one_dim(&a.stride, "stride")?)
        .padding(padding)
        .dilation(one_dim(&a.dilation, "dilation")?)
        .groups(a.groups)
        .bias(a.bias);
    check_conv(&a)?;
    Ok(Conv1d::with_config(
        a.in_channels,
        a.out_channels,
        one_dim(&a.kernel_size, "kernel_size")?,
        config,
        ctx.rng(),
    ))
}

/// The checks the layer constructors would otherwise panic on.
fn check_conv(a: &ConvArgs) -> Result<(), NnError> {
    let (kh, kw) = a.kernel_size.pair();
    let (sh, sw) = a.stride.pair();
    let (dh, dw) = a.dilation.pair();
    if a.in_channels == 0 || a.out_channels == 0 || kh * kw * sh * sw * dh * dw == 0 {
        return Err(bad(
            "conv: channels, kernel_size, stride and dilation must be positive".into(),
        ));
    }
    if a.groups == 0
        || !a.in_channels.is_multiple_of(a.groups)
        || !a.out_channels.is_multiple_of(a.groups)
    {
        return Err(bad(format!(
            "conv: groups = {} must divide in_channels = {} and out_channels = {}",
            a.groups, a.in_channels, a.out_channels
        )));
    }
    Ok(())
}

/// Kernel, stride (default: the kernel) and padding of a pooling layer, checked like torch.
fn pool_geometry(
    what: &str,
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    padding: (usize, usize),
) -> Result<(), NnError> {
    let (sh, sw) = stride.unwrap_or(kernel);
    if kernel.0 == 0 || kernel.1 == 0 || sh == 0 || sw == 0 {
        return Err(bad(format!(
            "{what}: kernel_size and stride must be positive"
        )));
    }
    if padding.0 > kernel.0 / 2 || padding.1 > kernel.1 / 2 {
        return Err(bad(format!(
            "{what}: padding {padding:?} must be at most half the kernel size {kernel:?}"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolArgs {
    kernel_size: PairArg,
    stride: Option<PairArg>,
    #[serde(default = "zero_pair")]
    padding: PairArg,
    #[serde(default = "one_pair")]
    dilation: PairArg,
    #[serde(default)]
    ceil_mode: bool,
    #[serde(default = "yes")]
    count_include_pad: bool,
}

fn zero_pair() -> PairArg {
    PairArg::One(0)
}

impl PoolArgs {
    /// Kernel, stride and padding of a 2-D pool, validated.
    fn geometry2d(&self, what: &str) -> Result<PoolGeometry2d, NnError> {
        let (kernel, padding) = (self.kernel_size.pair(), self.padding.pair());
        let stride = self.stride.as_ref().map(PairArg::pair);
        pool_geometry(what, kernel, stride, padding)?;
        Ok((kernel, stride, padding))
    }

    /// Kernel, stride and padding of a 1-D pool, validated.
    fn geometry1d(&self, what: &str) -> Result<(usize, Option<usize>, usize), NnError> {
        let one = |p: &PairArg, arg: &str| match *p {
            PairArg::One(v) => Ok(v),
            PairArg::Two(_) => Err(bad(format!("{what}: {arg} takes one size"))),
        };
        let kernel = one(&self.kernel_size, "kernel_size")?;
        let stride = self.stride.as_ref().map(|s| one(s, "stride")).transpose()?;
        let padding = one(&self.padding, "padding")?;
        one(&self.dilation, "dilation")?;
        pool_geometry(what, (kernel, 1), stride.map(|s| (s, 1)), (padding, 0))?;
        Ok((kernel, stride, padding))
    }
}

/// Kernel, optional stride and padding of a 2-D pool.
type PoolGeometry2d = ((usize, usize), Option<(usize, usize)>, (usize, usize));

fn max_pool2d(a: PoolArgs, _: &mut BuildContext) -> Result<MaxPool2d, NnError> {
    let (kernel, stride, padding) = a.geometry2d("max_pool2d")?;
    let dilation = a.dilation.pair();
    if dilation.0 == 0 || dilation.1 == 0 {
        return Err(bad("max_pool2d: dilation must be positive".into()));
    }
    Ok(MaxPool2d::with_options(MaxPool2dOptions {
        kernel,
        stride,
        padding,
        dilation,
        ceil_mode: a.ceil_mode,
    }))
}

fn avg_pool2d(a: PoolArgs, _: &mut BuildContext) -> Result<AvgPool2d, NnError> {
    let (kernel, stride, padding) = a.geometry2d("avg_pool2d")?;
    if a.dilation.pair() != (1, 1) {
        return Err(bad("avg_pool2d: takes no dilation".into()));
    }
    Ok(AvgPool2d::with_options(AvgPool2dOptions {
        kernel,
        stride,
        padding,
        ceil_mode: a.ceil_mode,
        count_include_pad: a.count_include_pad,
        divisor_override: None,
    }))
}

fn max_pool1d(a: PoolArgs, _: &mut BuildContext) -> Result<MaxPool1d, NnError> {
    let (kernel, stride, padding) = a.geometry1d("max_pool1d")?;
    let dilation = a.dilation.pair().0;
    if dilation == 0 {
        return Err(bad("max_pool1d: dilation must be positive".into()));
    }
    Ok(MaxPool1d::with_options(MaxPool1dOptions {
        kernel,
        stride,
        padding,
        dilation,
        ceil_mode: a.ceil_mode,
    }))
}

fn avg_pool1d(a: PoolArgs, _: &mut BuildContext) -> Result<AvgPool1d, NnError> {
    let (kernel, stride, padding) = a.geometry1d("avg_pool1d")?;
    if a.dilation.pair() != (1, 1) {
        return Err(bad("avg_pool1d: takes no dilation".into()));
    }
    Ok(AvgPool1d::with_options(AvgPool1dOptions {
        kernel,
        stride,
        padding,
        ceil_mode: a.ceil_mode,
        count_include_pad: a.count_include_pad,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdaptivePoolArgs {
    output_size: PairArg,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchNormArgs {
    num_features: usize,
    #[serde(default = "default_bn_eps")]
    eps: f64,
    /// A number, or `false` for torch's `momentum=None` (cumulative average).
    #[serde(default)]
    momentum: Option<MomentumArg>,
    #[serde(default = "yes")]
    affine: bool,
    #[serde(default = "yes")]
    track_running_stats: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MomentumArg {
    Value(f64),
    Off(bool),
}

fn default_bn_eps() -> f64 {
    1e-5
}

impl BatchNormArgs {
    fn config(&self) -> Result<BatchNormConfig, NnError> {
        if self.num_features == 0 || self.eps.is_nan() || self.eps < 0.0 {
            return Err(bad(
                "batch_norm: num_features must be positive and eps non-negative".into(),
            ));
        }
        let momentum = match self.momentum {
            None => Some(0.1),
            Some(MomentumArg::Value(m)) if (0.0..=1.0).contains(&m) => Some(m),
            Some(MomentumArg::Value(m)) => {
                return Err(bad(format!("batch_norm: momentum {m} is not in [0, 1]")))
            }
            Some(MomentumArg::Off(false)) => None,
            Some(MomentumArg::Off(true)) => {
                return Err(bad(
                    "batch_norm: momentum takes a number, or false for a cumulative average".into(),
                ))
            }
        };
        Ok(BatchNormConfig {
            eps: self.eps,
            momentum,
            affine: self.affine,
            track_running_stats: self.track_running_stats,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MhaArgs {
    embed_dim: usize,
    num_heads: usize,
    #[serde(default)]
    dropout: f64,
    #[serde(default = "yes")]
    bias: bool,
    kdim: Option<usize>,
    vdim: Option<usize>,
    #[serde(default = "yes")]
    batch_first: bool,
}

/// The checks shared by attention layers: heads divide the width, dropout is a probability.
fn check_heads(what: &str, dim: usize, heads: usize, dropout: f64) -> Result<(), NnError> {
    if heads == 0 || dim == 0 || !dim.is_multiple_of(heads) {
        return Err(bad(format!(
            "{what}: num_heads = {heads} must be positive and divide the width {dim}"
        )));
    }
    if !(0.0..1.0).contains(&dropout) {
        return Err(bad(format!("{what}: dropout {dropout} is not in [0, 1)")));
    }
    Ok(())
}

fn multihead_attention(a: MhaArgs, ctx: &mut BuildContext) -> Result<MultiheadAttention, NnError> {
    check_heads("multihead_attention", a.embed_dim, a.num_heads, a.dropout)?;
    let config = MhaConfig {
        num_heads: a.num_heads,
        dropout: a.dropout,
        bias: a.bias,
        kdim: a.kdim,
        vdim: a.vdim,
        batch_first: a.batch_first,
    };
    Ok(MultiheadAttention::with_config(
        a.embed_dim,
        config,
        ctx.rng(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EncoderLayerArgs {
    d_model: usize,
    nhead: usize,
    #[serde(default = "default_ff")]
    dim_feedforward: usize,
    #[serde(default = "default_dropout")]
    dropout: f64,
    #[serde(default = "default_activation")]
    activation: String,
    #[serde(default = "default_ln_eps")]
    layer_norm_eps: f64,
    #[serde(default = "yes")]
    batch_first: bool,
    #[serde(default)]
    norm_first: bool,
    #[serde(default = "yes")]
    bias: bool,
}

fn default_ff() -> usize {
    2048
}

fn default_dropout() -> f64 {
    0.1
}

fn default_activation() -> String {
    "relu".into()
}

fn default_ln_eps() -> f64 {
    1e-5
}

fn transformer_encoder_layer(
    a: EncoderLayerArgs,
    ctx: &mut BuildContext,
) -> Result<TransformerEncoderLayer, NnError> {
    check_heads("transformer_encoder_layer", a.d_model, a.nhead, a.dropout)?;
    let activation = match a.activation.to_ascii_lowercase().as_str() {
        "relu" => TransformerActivation::Relu,
        "gelu" => TransformerActivation::Gelu,
        other => {
            return Err(bad(format!(
                "transformer_encoder_layer: activation `{other}` is not one of relu, gelu"
            )))
        }
    };
    if a.dim_feedforward == 0 {
        return Err(bad(
            "transformer_encoder_layer: dim_feedforward must be positive".into(),
        ));
    }
    let config = TransformerEncoderLayerConfig {
        nhead: a.nhead,
        dim_feedforward: a.dim_feedforward,
        dropout: a.dropout,
        activation,
        layer_norm_eps: a.layer_norm_eps,
        batch_first: a.batch_first,
        norm_first: a.norm_first,
        bias: a.bias,
    };
    Ok(TransformerEncoderLayer::with_config(
        a.d_model,
        config,
        ctx.rng(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RnnArgs {
    input_size: usize,
    hidden_size: usize,
    #[serde(default = "one_usize")]
    num_layers: usize,
    #[serde(default = "yes")]
    bias: bool,
    #[serde(default = "yes")]
    batch_first: bool,
    #[serde(default)]
    dropout: f64,
    #[serde(default)]
    bidirectional: bool,
    /// `tanh` or `relu` (plain RNN only).
    #[serde(default)]
    nonlinearity: Option<String>,
}

impl RnnArgs {
    fn config(&self) -> Result<RnnConfig, NnError> {
        let nonlinearity = match self.nonlinearity.as_deref() {
            None | Some("tanh") => RnnNonlinearity::Tanh,
            Some("relu") => RnnNonlinearity::Relu,
            Some(other) => {
                return Err(bad(format!(
                    "rnn: nonlinearity `{other}` is not one of tanh, relu"
                )))
            }
        };
        if self.input_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return Err(bad(
                "rnn: input_size, hidden_size and num_layers must be positive".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(format!(
                "rnn: dropout {} is not in [0, 1)",
                self.dropout
            )));
        }
        Ok(RnnConfig {
            num_layers: self.num_layers,
            bias: self.bias,
            batch_first: self.batch_first,
            dropout: self.dropout,
            bidirectional: self.bidirectional,
            nonlinearity,
        })
    }

    /// Arguments of an LSTM or GRU, which have no `nonlinearity`.
    fn gated(self, what: &str) -> Result<Self, NnError> {
        match self.nonlinearity {
            Some(_) => Err(bad(format!("{what}: takes no nonlinearity"))),
            None => Ok(self),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinearArgs {
    #[serde(alias = "in")]
    in_features: usize,
    #[serde(alias = "out")]
    out_features: usize,
    #[serde(default = "yes")]
    bias: bool,
}

fn linear(a: LinearArgs, ctx: &mut BuildContext) -> Result<Linear, NnError> {
    let config = LinearConfig::default().bias(a.bias);
    Ok(Linear::with_config(
        a.in_features,
        a.out_features,
        config,
        ctx.rng(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingArgs {
    num_embeddings: usize,
    embedding_dim: usize,
}

fn embedding(a: EmbeddingArgs, ctx: &mut BuildContext) -> Result<Embedding, NnError> {
    Ok(Embedding::new(a.num_embeddings, a.embedding_dim, ctx.rng()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerNormArgs {
    normalized_shape: Dims,
    #[serde(default = "layer_norm_eps")]
    eps: f64,
    #[serde(default = "yes")]
    elementwise_affine: bool,
    #[serde(default = "yes")]
    bias: bool,
}

fn layer_norm_eps() -> f64 {
    NormConfig::layer_norm().eps
}

fn layer_norm(a: LayerNormArgs, _: &mut BuildContext) -> Result<LayerNorm, NnError> {
    let config = NormConfig::layer_norm()
        .eps(a.eps)
        .elementwise_affine(a.elementwise_affine)
        .bias(a.bias);
    Ok(LayerNorm::with_config(&a.normalized_shape.to_vec(), config))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RmsNormArgs {
    normalized_shape: Dims,
    #[serde(default = "rms_norm_eps")]
    eps: f64,
    #[serde(default = "yes")]
    elementwise_affine: bool,
}

fn rms_norm_eps() -> f64 {
    NormConfig::rms_norm().eps
}

fn rms_norm(a: RmsNormArgs, _: &mut BuildContext) -> Result<RmsNorm, NnError> {
    let config = NormConfig::rms_norm()
        .eps(a.eps)
        .elementwise_affine(a.elementwise_affine);
    Ok(RmsNorm::with_config(&a.normalized_shape.to_vec(), config))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DropoutArgs {
    #[serde(default = "half")]
    p: f64,
    /// Seed of the dropout masks (default: drawn from the model's generator).
    seed: Option<u64>,
}

fn half() -> f64 {
    0.5
}

fn dropout(a: DropoutArgs, ctx: &mut BuildContext) -> Result<Dropout, NnError> {
    if !(0.0..=1.0).contains(&a.p) {
        return Err(bad(format!("p must be in [0, 1], got {}", a.p)));
    }
    let seed = a.seed.unwrap_or_else(|| ctx.next_seed());
    Ok(Dropout::new(a.p, seed))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlattenArgs {
    #[serde(default = "one")]
    start_dim: i64,
    #[serde(default = "minus_one")]
    end_dim: i64,
}

fn one() -> i64 {
    1
}

fn minus_one() -> i64 {
    -1
}

fn flatten(a: FlattenArgs, _: &mut BuildContext) -> Result<Flatten, NnError> {
    Ok(Flatten::range(a.start_dim, a.end_dim))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum ApproxArg {
    #[default]
    None,
    Tanh,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GeluArgs {
    #[serde(default)]
    approximate: ApproxArg,
}

fn gelu(a: GeluArgs, _: &mut BuildContext) -> Result<Gelu, NnError> {
    Ok(Gelu {
        approximate: match a.approximate {
            ApproxArg::None => GeluApprox::None,
            ApproxArg::Tanh => GeluApprox::Tanh,
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SoftmaxArgs {
    dim: i64,
}

fn softmax(a: SoftmaxArgs, _: &mut BuildContext) -> Result<Softmax, NnError> {
    Ok(Softmax::new(a.dim))
}

// ---------------------------------------------------------------------------- losses

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ReductionArg {
    #[default]
    Mean,
    Sum,
    None,
}

impl From<ReductionArg> for Reduction {
    fn from(r: ReductionArg) -> Self {
        match r {
            ReductionArg::Mean => Reduction::Mean,
            ReductionArg::Sum => Reduction::Sum,
            ReductionArg::None => Reduction::None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReductionArgs {
    #[serde(default)]
    reduction: ReductionArg,
}

/// A 1-d constant tensor of weights.
fn weights(w: Option<Vec<f64>>) -> Option<Tensor> {
    w.map(|v| {
        let n = v.len();
        Tensor::from_vec(v, [n])
    })
}

fn minus_hundred() -> i64 {
    -100
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CrossEntropyArgs {
    weight: Option<Vec<f64>>,
    #[serde(default = "minus_hundred")]
    ignore_index: i64,
    #[serde(default)]
    label_smoothing: f64,
    #[serde(default)]
    reduction: ReductionArg,
}

fn cross_entropy(a: CrossEntropyArgs) -> Result<CrossEntropyLoss, NnError> {
    if !(0.0..=1.0).contains(&a.label_smoothing) {
        return Err(bad(format!(
            "label_smoothing must be in [0, 1], got {}",
            a.label_smoothing
        )));
    }
    Ok(CrossEntropyLoss {
        weight: weights(a.weight),
        ignore_index: a.ignore_index,
        label_smoothing: a.label_smoothing,
        reduction: a.reduction.into(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NllArgs {
    weight: Option<Vec<f64>>,
    #[serde(default = "minus_hundred")]
    ignore_index: i64,
    #[serde(default)]
    reduction: ReductionArg,
}

fn nll(a: NllArgs) -> Result<NllLoss, NnError> {
    Ok(NllLoss {
        weight: weights(a.weight),
        ignore_index: a.ignore_index,
        reduction: a.reduction.into(),
    })
}

fn one_f() -> f64 {
    1.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HuberArgs {
    #[serde(default = "one_f")]
    delta: f64,
    #[serde(default)]
    reduction: ReductionArg,
}

fn huber(a: HuberArgs) -> Result<HuberLoss, NnError> {
    if a.delta.is_nan() || a.delta <= 0.0 {
        return Err(bad(format!("delta must be > 0, got {}", a.delta)));
    }
    Ok(HuberLoss {
        delta: a.delta,
        reduction: a.reduction.into(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SmoothL1Args {
    #[serde(default = "one_f")]
    beta: f64,
    #[serde(default)]
    reduction: ReductionArg,
}

fn smooth_l1(a: SmoothL1Args) -> Result<SmoothL1Loss, NnError> {
    if a.beta.is_nan() || a.beta < 0.0 {
        return Err(bad(format!("beta must be >= 0, got {}", a.beta)));
    }
    Ok(SmoothL1Loss {
        beta: a.beta,
        reduction: a.reduction.into(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BceArgs {
    weight: Option<Vec<f64>>,
    #[serde(default)]
    reduction: ReductionArg,
}

fn bce(a: BceArgs) -> Result<BceLoss, NnError> {
    Ok(BceLoss {
        weight: weights(a.weight),
        reduction: a.reduction.into(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BceWithLogitsArgs {
    weight: Option<Vec<f64>>,
    pos_weight: Option<Vec<f64>>,
    #[serde(default)]
    reduction: ReductionArg,
}

fn bce_with_logits(a: BceWithLogitsArgs) -> Result<BceWithLogitsLoss, NnError> {
    Ok(BceWithLogitsLoss {
        weight: weights(a.weight),
        pos_weight: weights(a.pos_weight),
        reduction: a.reduction.into(),
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum KlReductionArg {
    #[default]
    Mean,
    Sum,
    None,
    BatchMean,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KlDivArgs {
    #[serde(default)]
    reduction: KlReductionArg,
    #[serde(default)]
    log_target: bool,
}

fn kl_div(a: KlDivArgs) -> Result<KlDivLoss, NnError> {
    Ok(KlDivLoss {
        reduction: match a.reduction {
            KlReductionArg::Mean => KlReduction::Mean,
            KlReductionArg::Sum => KlReduction::Sum,
            KlReductionArg::None => KlReduction::None,
            KlReductionArg::BatchMean => KlReduction::BatchMean,
        },
        log_target: a.log_target,
    })
}

// ---------------------------------------------------------------------------- schedulers

fn tenth() -> f64 {
    0.1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepArgs {
    step_size: u64,
    #[serde(default = "tenth")]
    gamma: f64,
}

fn step_lr(a: StepArgs, opt: &dyn Optimizer) -> Result<StepLR, NnError> {
    StepLR::new(opt, a.step_size, a.gamma)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MultiStepArgs {
    milestones: Vec<u64>,
    #[serde(default = "tenth")]
    gamma: f64,
}

fn multi_step_lr(a: MultiStepArgs, opt: &dyn Optimizer) -> Result<MultiStepLR, NnError> {
    MultiStepLR::new(opt, a.milestones, a.gamma)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExponentialArgs {
    gamma: f64,
}

fn exponential_lr(a: ExponentialArgs, opt: &dyn Optimizer) -> Result<ExponentialLR, NnError> {
    ExponentialLR::new(opt, a.gamma)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CosineArgs {
    #[serde(alias = "T_max")]
    t_max: u64,
    #[serde(default)]
    eta_min: f64,
    /// Linear warmup steps before the cosine (kiln's extension; default 0).
    #[serde(default)]
    warmup_steps: u64,
}

fn cosine(a: CosineArgs, opt: &dyn Optimizer) -> Result<CosineAnnealingLR, NnError> {
    CosineAnnealingLR::with_warmup(opt, a.warmup_steps, a.t_max, a.eta_min)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinearWarmupArgs {
    #[serde(alias = "num_warmup_steps")]
    warmup_steps: u64,
    #[serde(alias = "num_training_steps")]
    total_steps: u64,
}

fn linear_warmup_decay(
    a: LinearWarmupArgs,
    opt: &dyn Optimizer,
) -> Result<LinearWarmupDecayLR, NnError> {
    LinearWarmupDecayLR::new(opt, a.warmup_steps, a.total_steps)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum AnnealArg {
    #[default]
    Cos,
    Linear,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OneCycleArgs {
    max_lr: PerGroupArg,
    total_steps: Option<u64>,
    epochs: Option<u64>,
    steps_per_epoch: Option<u64>,
    #[serde(default = "pct_start")]
    pct_start: f64,
    #[serde(default)]
    anneal_strategy: AnnealArg,
    #[serde(default = "yes")]
    cycle_momentum: bool,
    #[serde(default = "base_momentum")]
    base_momentum: f64,
    #[serde(default = "max_momentum")]
    max_momentum: f64,
    #[serde(default = "div_factor")]
    div_factor: f64,
    #[serde(default = "final_div_factor")]
    final_div_factor: f64,
    #[serde(default)]
    three_phase: bool,
}

fn pct_start() -> f64 {
    OneCycleConfig::default().pct_start
}
fn base_momentum() -> f64 {
    OneCycleConfig::default().base_momentum
}
fn max_momentum() -> f64 {
    OneCycleConfig::default().max_momentum
}
fn div_factor() -> f64 {
    OneCycleConfig::default().div_factor
}
fn final_div_factor() -> f64 {
    OneCycleConfig::default().final_div_factor
}

fn one_cycle(a: OneCycleArgs, opt: &dyn Optimizer) -> Result<OneCycleLR, NnError> {
    let total_steps = match (a.total_steps, a.epochs, a.steps_per_epoch) {
        (Some(t), None, None) => t,
        (None, Some(e), Some(s)) => e * s,
        _ => {
            return Err(bad(
                "give either total_steps, or epochs and steps_per_epoch".into(),
            ))
        }
    };
    let config = OneCycleConfig {
        pct_start: a.pct_start,
        anneal: match a.anneal_strategy {
            AnnealArg::Cos => Anneal::Cos,
            AnnealArg::Linear => Anneal::Linear,
        },
        cycle_momentum: a.cycle_momentum,
        base_momentum: a.base_momentum,
        max_momentum: a.max_momentum,
        div_factor: a.div_factor,
        final_div_factor: a.final_div_factor,
        three_phase: a.three_phase,
    };
    OneCycleLR::new(opt, PerGroup::from(a.max_lr), total_steps, config)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum ModeArg {
    #[default]
    Min,
    Max,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum ThresholdModeArg {
    #[default]
    Rel,
    Abs,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlateauArgs {
    #[serde(default)]
    mode: ModeArg,
    #[serde(default = "tenth")]
    factor: f64,
    #[serde(default = "patience")]
    patience: u64,
    #[serde(default = "threshold")]
    threshold: f64,
    #[serde(default)]
    threshold_mode: ThresholdModeArg,
    #[serde(default)]
    cooldown: u64,
    min_lr: Option<PerGroupArg>,
    #[serde(default = "plateau_eps")]
    eps: f64,
}

fn patience() -> u64 {
    PlateauConfig::default().patience
}
fn threshold() -> f64 {
    PlateauConfig::default().threshold
}
fn plateau_eps() -> f64 {
    PlateauConfig::default().eps
}

fn plateau(a: PlateauArgs, opt: &dyn Optimizer) -> Result<ReduceLROnPlateau, NnError> {
    let config = PlateauConfig {
        mode: match a.mode {
            ModeArg::Min => PlateauMode::Min,
            ModeArg::Max => PlateauMode::Max,
        },
        factor: a.factor,
        patience: a.patience,
        threshold: a.threshold,
        threshold_mode: match a.threshold_mode {
            ThresholdModeArg::Rel => ThresholdMode::Rel,
            ThresholdModeArg::Abs => ThresholdMode::Abs,
        },
        cooldown: a.cooldown,
        min_lr: a.min_lr.map_or(PerGroup::All(0.0), PerGroup::from),
        eps: a.eps,
    };
    ReduceLROnPlateau::new(opt, config)
}
