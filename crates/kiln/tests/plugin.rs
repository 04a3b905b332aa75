//! The plugin registry: built-ins by name, user plugins from TOML, every error path, and the
//! `custom_plugin` example training with a falling loss.

#[allow(dead_code)]
#[path = "../../../examples/custom_plugin.rs"]
mod custom_plugin;

use kiln::nn::layers::{GeluApprox, LinearConfig};
use kiln::nn::loss::{
    BceLoss, BceWithLogitsLoss, CrossEntropyLoss, HuberLoss, KlDivLoss, KlReduction, L1Loss,
    MseLoss, NllLoss, SmoothL1Loss,
};
use kiln::nn::optim::{
    Adagrad, AdagradConfig, AdamConfig, AdamWConfig, RmsProp, RmsPropConfig, SgdConfig,
};
use kiln::nn::registry::toml;
use kiln::nn::scheduler::{
    CosineAnnealingLR, ExponentialLR, LinearWarmupDecayLR, MultiStepLR, OneCycleConfig, OneCycleLR,
    PlateauConfig, ReduceLROnPlateau, SchedulerState, StepLR,
};
use kiln::nn::{NnError, Param};
use kiln::prelude::*;
use serde::Deserialize;

fn table(src: &str) -> toml::Table {
    toml::from_str(src).unwrap()
}

fn err_of<T>(r: Result<T, NnError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` not in: {msg}");
    }
}

// ------------------------------------------------------------------------------ the example

#[test]
fn example_trains_with_user_layer_and_optimizer_and_the_loss_falls() {
    let losses = custom_plugin::run(custom_plugin::SPEC, 300, false).unwrap();
    let first = losses[..10].iter().sum::<f64>() / 10.0;
    let last = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(last < 0.1 * first, "loss {first} -> {last}");
    println!("custom_plugin: mean loss of the first 10 steps {first:.5}, last 10 {last:.5}");
    // The same spec runs the same way twice (fixed seed), and the plugins are now built-in-like.
    let again = custom_plugin::run(custom_plugin::SPEC, 5, false).unwrap();
    assert_eq!(again[..], losses[..5]);
    let m = Sequential::from_toml("[[layer]]\ntype = \"Swish\"\nbeta = 2.0").unwrap();
    let x = Tensor::from_slice(&[-1.0f32, 0.5, 2.0], [3]);
    let want: Vec<f32> = x
        .to_vec::<f32>()
        .iter()
        .map(|v| v / (1.0 + (-2.0 * v).exp()))
        .collect();
    for (a, b) in m.forward(&x).to_vec::<f32>().iter().zip(&want) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

// ------------------------------------------------------------------------------ built-ins

#[test]
fn toml_model_equals_the_hand_built_model_with_the_same_seed() {
    let m = Sequential::from_toml(
        r#"
        seed = 3
        layer = [
            { type = "linear", in = 4, out = 8 },
            { type = "ReLU" },
            { type = "Linear", in_features = 8, out_features = 2, bias = false },
        ]
        "#,
    )
    .unwrap();
    let mut rng = Rng::new(3);
    let h = seq![
        Linear::new(4, 8, &mut rng),
        Relu,
        Linear::with_config(8, 2, LinearConfig::default().bias(false), &mut rng)
    ];
    let (a, b) = (m.named_parameters(), h.named_parameters());
    assert_eq!(a.len(), 3);
    for ((na, pa), (nb, pb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(pa.to_vec::<f32>(), pb.to_vec::<f32>(), "{na}");
    }
    let x = Tensor::randn([5, 4], 9);
    assert_eq!(m.forward(&x).to_vec::<f32>(), h.forward(&x).to_vec::<f32>());
}

#[test]
fn every_builtin_layer_builds_by_name_and_by_torch_name() {
    let reg = Registry::with_builtins();
    assert_eq!(
        reg.layer_names(),
        [
            "adaptive_avg_pool2d",
            "avg_pool1d",
            "avg_pool2d",
            "batch_norm1d",
            "batch_norm2d",
            "conv1d",
            "conv2d",
            "dropout",
            "embedding",
            "flatten",
            "gelu",
            "gru",
            "layer_norm",
            "linear",
            "lstm",
            "max_pool1d",
            "max_pool2d",
            "multihead_attention",
            "relu",
            "rms_norm",
            "rnn",
            "sigmoid",
            "silu",
            "softmax",
            "tanh",
            "transformer_encoder_layer"
        ]
    );
    let x = Tensor::randn([2, 3, 4], 1);
    // (name, torch name, args, input, output dims)
    let ids = Tensor::from_vec(vec![1i64, 0, 4], [3]);
    let img = Tensor::randn([1, 2, 5, 5], 2);
    let cases: Vec<(&str, &str, &str, &Tensor, Vec<usize>)> = vec![
        ("linear", "Linear", "in = 4\nout = 5", &x, vec![2, 3, 5]),
        (
            "embedding",
            "Embedding",
            "num_embeddings = 5\nembedding_dim = 6",
            &ids,
            vec![3, 6],
        ),
        (
            "layer_norm",
            "LayerNorm",
            "normalized_shape = [3, 4]",
            &x,
            vec![2, 3, 4],
        ),
        (
            "rms_norm",
            "RMSNorm",
            "normalized_shape = 4",
            &x,
            vec![2, 3, 4],
        ),
        ("dropout", "Dropout", "p = 0.25", &x, vec![2, 3, 4]),
        ("flatten", "Flatten", "", &x, vec![2, 12]),
        ("relu", "ReLU", "", &x, vec![2, 3, 4]),
        ("gelu", "GELU", "approximate = \"tanh\"", &x, vec![2, 3, 4]),
        ("silu", "SiLU", "", &x, vec![2, 3, 4]),
        ("tanh", "Tanh", "", &x, vec![2, 3, 4]),
        ("sigmoid", "Sigmoid", "", &x, vec![2, 3, 4]),
        ("softmax", "Softmax", "dim = -1", &x, vec![2, 3, 4]),
        (
            "conv1d",
            "Conv1d",
            "in_channels = 3\nout_channels = 2\nkernel_size = 3\npadding = \"same\"",
            &x,
            vec![2, 2, 4],
        ),
        (
            "conv2d",
            "Conv2d",
            "in = 2\nout = 6\nkernel_size = [1, 3]\nstride = 2\npadding = [0, 1]\ngroups = 2",
            &img,
            vec![1, 6, 3, 3],
        ),
        (
            "lstm",
            "LSTM",
            "input_size = 4\nhidden_size = 5\nbidirectional = true",
            &x,
            vec![2, 3, 10],
        ),
        (
            "gru",
            "GRU",
            "input_size = 4\nhidden_size = 5\nnum_layers = 2",
            &x,
            vec![2, 3, 5],
        ),
        (
            "rnn",
            "RNN",
            "input_size = 4\nhidden_size = 3\nnonlinearity = \"relu\"",
            &x,
            vec![2, 3, 3],
        ),
        (
            "max_pool2d",
            "MaxPool2d",
            "kernel_size = 3\nstride = 2\npadding = 1\nceil_mode = true",
            &img,
            vec![1, 2, 3, 3],
        ),
        (
            "avg_pool2d",
            "AvgPool2d",
            "kernel_size = [2, 3]\ncount_include_pad = false",
            &img,
            vec![1, 2, 2, 1],
        ),
        (
            "max_pool1d",
            "MaxPool1d",
            "kernel_size = 2",
            &x,
            vec![2, 3, 2],
        ),
        (
            "avg_pool1d",
            "AvgPool1d",
            "kernel_size = 3\nstride = 1\npadding = 1",
            &x,
            vec![2, 3, 4],
        ),
        (
            "adaptive_avg_pool2d",
            "AdaptiveAvgPool2d",
            "output_size = [2, 3]",
            &img,
            vec![1, 2, 2, 3],
        ),
        (
            "batch_norm1d",
            "BatchNorm1d",
            "num_features = 3\nmomentum = false",
            &x,
            vec![2, 3, 4],
        ),
        (
            "batch_norm2d",
            "BatchNorm2d",
            "num_features = 2\neps = 1e-3\naffine = false",
            &img,
            vec![1, 2, 5, 5],
        ),
        (
            "multihead_attention",
            "MultiheadAttention",
            "embed_dim = 4\nnum_heads = 2",
            &x,
            vec![2, 3, 4],
        ),
        (
            "transformer_encoder_layer",
            "TransformerEncoderLayer",
            "d_model = 4\nnhead = 2\ndim_feedforward = 8\nactivation = \"gelu\"\nnorm_first = true",
            &x,
            vec![2, 3, 4],
        ),
    ];
    assert_eq!(cases.len(), reg.layer_names().len());
    for (name, torch_name, args, input, dims) in cases {
        for n in [name, torch_name] {
            let mut ctx = BuildContext::new(0);
            let l = reg.build_layer(n, table(args), &mut ctx).unwrap();
            assert_eq!(l.forward(input).dims(), &dims[..], "{n}");
        }
    }
    // Arguments reach the layer: eps, affine flags, approximation, dims.
    let mut ctx = BuildContext::new(0);
    let ln = reg
        .build_layer(
            "layer_norm",
            table("normalized_shape = 4\neps = 0.5\nbias = false"),
            &mut ctx,
        )
        .unwrap();
    let direct = LayerNorm::from_weights(Tensor::ones([4]), None, 0.5);
    assert_eq!(
        ln.forward(&x).to_vec::<f32>(),
        direct.forward(&x).to_vec::<f32>()
    );
    assert_eq!(ln.named_parameters().len(), 1);
    let g = reg
        .build_layer("gelu", table("approximate = \"tanh\""), &mut ctx)
        .unwrap();
    let direct = Gelu {
        approximate: GeluApprox::Tanh,
    };
    assert_eq!(
        g.forward(&x).to_vec::<f32>(),
        direct.forward(&x).to_vec::<f32>()
    );
    let sm = reg
        .build_layer("softmax", table("dim = 1"), &mut ctx)
        .unwrap();
    assert_eq!(
        sm.forward(&x).to_vec::<f32>(),
        Softmax::new(1).forward(&x).to_vec::<f32>()
    );
    let d = reg
        .build_layer("dropout", table("p = 1.0"), &mut ctx)
        .unwrap();
    assert!(d.forward(&x).to_vec::<f32>().iter().all(|v| *v == 0.0));
}

#[test]
fn every_builtin_loss_builds_by_name_and_matches_the_struct() {
    let reg = Registry::with_builtins();
    assert_eq!(
        reg.loss_names(),
        [
            "bce",
            "bce_with_logits",
            "cross_entropy",
            "huber",
            "kl_div",
            "l1",
            "mse",
            "nll",
            "smooth_l1"
        ]
    );
    let logits = Tensor::randn([4, 3], 1);
    let classes = Tensor::from_vec(vec![0i64, 2, 1, 2], [4]);
    let a = Tensor::randn([4, 3], 2);
    let b = Tensor::randn([4, 3], 3);
    let probs = a.sigmoid();
    let targets = Tensor::rand([4, 3], 4);
    let w = Tensor::from_vec(vec![0.5f64, 1.0, 2.0], [3]);
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Box<dyn Loss>,
        &'a Tensor,
        &'a Tensor,
    );
    let cases: Vec<Case> = vec![
        (
            "cross_entropy",
            "CrossEntropyLoss",
            "weight = [0.5, 1.0, 2.0]\nlabel_smoothing = 0.1\nreduction = \"sum\"",
            Box::new(CrossEntropyLoss {
                weight: Some(w.clone()),
                label_smoothing: 0.1,
                reduction: Reduction::Sum,
                ..Default::default()
            }),
            &logits,
            &classes,
        ),
        (
            "nll",
            "NLLLoss",
            "ignore_index = 2",
            Box::new(NllLoss {
                ignore_index: 2,
                ..Default::default()
            }),
            &logits,
            &classes,
        ),
        ("mse", "MSELoss", "", Box::new(MseLoss::default()), &a, &b),
        (
            "l1",
            "L1Loss",
            "reduction = \"sum\"",
            Box::new(L1Loss::new(Reduction::Sum)),
            &a,
            &b,
        ),
        (
            "huber",
            "HuberLoss",
            "delta = 0.5",
            Box::new(HuberLoss {
                delta: 0.5,
                reduction: Reduction::Mean,
            }),
            &a,
            &b,
        ),
        (
            "smooth_l1",
            "SmoothL1Loss",
            "beta = 0.5",
            Box::new(SmoothL1Loss {
                beta: 0.5,
                reduction: Reduction::Mean,
            }),
            &a,
            &b,
        ),
        (
            "bce",
            "BCELoss",
            "",
            Box::new(BceLoss::default()),
            &probs,
            &targets,
        ),
        (
            "bce_with_logits",
            "BCEWithLogitsLoss",
            "pos_weight = [0.5, 1.0, 2.0]",
            Box::new(BceWithLogitsLoss {
                pos_weight: Some(w.clone()),
                ..Default::default()
            }),
            &a,
            &targets,
        ),
        (
            "kl_div",
            "KLDivLoss",
            "reduction = \"batchmean\"",
            Box::new(KlDivLoss {
                reduction: KlReduction::BatchMean,
                log_target: false,
            }),
            &a,
            &targets,
        ),
    ];
    assert_eq!(cases.len(), reg.loss_names().len());
    for (name, torch_name, args, direct, input, target) in cases {
        let want = direct.forward(input, target).item();
        for n in [name, torch_name] {
            let l = reg.build_loss(n, table(args)).unwrap();
            let got = l.forward(input, target).item();
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{n}: {got} vs {want}"
            );
        }
    }
}

/// Two steps of an optimizer on a fixed quadratic; returns the parameter.
fn two_steps(opt: &mut dyn Optimizer, p: &Param) -> Vec<f32> {
    for _ in 0..2 {
        p.mul(p).mul_scalar(0.5).add(p).sum_all().backward();
        opt.step();
        opt.zero_grad();
    }
    p.to_vec::<f32>()
}

fn fresh() -> Param {
    Param::new(Tensor::randn([5], 11))
}

#[test]
fn every_builtin_optimizer_builds_by_name_and_matches_the_direct_one() {
    let reg = Registry::with_builtins();
    assert_eq!(
        reg.optimizer_names(),
        ["adagrad", "adam", "adamw", "rmsprop", "sgd"]
    );
    type Direct = Box<dyn Fn(Param) -> Box<dyn Optimizer>>;
    let cases: Vec<(&str, &str, &str, Direct)> = vec![
        (
            "sgd",
            "SGD",
            "lr = 0.1\nmomentum = 0.9\nnesterov = true",
            Box::new(|p| {
                let c = SgdConfig {
                    lr: 0.1,
                    momentum: 0.9,
                    nesterov: true,
                    ..Default::default()
                };
                Box::new(Sgd::new(vec![("w", p)], c).unwrap())
            }),
        ),
        (
            "adam",
            "Adam",
            "lr = 0.01\nbetas = [0.8, 0.9]\namsgrad = true",
            Box::new(|p| {
                let c = AdamConfig {
                    lr: 0.01,
                    betas: (0.8, 0.9),
                    amsgrad: true,
                    ..Default::default()
                };
                Box::new(Adam::new(vec![("w", p)], c).unwrap())
            }),
        ),
        (
            "adamw",
            "AdamW",
            "lr = 0.01\nweight_decay = 0.1",
            Box::new(|p| {
                let c = AdamWConfig {
                    lr: 0.01,
                    weight_decay: 0.1,
                    ..Default::default()
                };
                Box::new(AdamW::new(vec![("w", p)], c).unwrap())
            }),
        ),
        (
            "rmsprop",
            "RMSprop",
            "lr = 0.01\nalpha = 0.9\ncentered = true",
            Box::new(|p| {
                let c = RmsPropConfig {
                    lr: 0.01,
                    alpha: 0.9,
                    centered: true,
                    ..Default::default()
                };
                Box::new(RmsProp::new(vec![("w", p)], c).unwrap())
            }),
        ),
        (
            "adagrad",
            "Adagrad",
            "lr = 0.1\nlr_decay = 0.01",
            Box::new(|p| {
                let c = AdagradConfig {
                    lr: 0.1,
                    lr_decay: 0.01,
                    ..Default::default()
                };
                Box::new(Adagrad::new(vec![("w", p)], c).unwrap())
            }),
        ),
    ];
    for (name, torch_name, args, direct) in cases {
        let p = fresh();
        let want = two_steps(direct(p.clone()).as_mut(), &p);
        assert_ne!(want, fresh().to_vec::<f32>(), "{name} moved nothing");
        for n in [name, torch_name] {
            let p = fresh();
            let mut opt = reg
                .build_optimizer(n, table(args), vec![("w".to_string(), p.clone())])
                .unwrap();
            assert_eq!(two_steps(opt.as_mut(), &p), want, "{n}");
            assert_eq!(opt.state_dict().kind, direct(fresh()).state_dict().kind);
        }
    }
}

#[test]
fn every_builtin_scheduler_builds_by_name_and_matches_the_direct_one() {
    let reg = Registry::with_builtins();
    assert_eq!(
        reg.scheduler_names(),
        [
            "cosine_annealing_lr",
            "exponential_lr",
            "linear_warmup_decay_lr",
            "multi_step_lr",
            "one_cycle_lr",
            "reduce_lr_on_plateau",
            "step_lr"
        ]
    );
    let opt = || {
        Sgd::new(
            vec![fresh()],
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                ..Default::default()
            },
        )
        .unwrap()
    };
    type Direct = Box<dyn Fn(&Sgd) -> Box<dyn Scheduler>>;
    let cases: Vec<(&str, &str, &str, Direct)> = vec![
        (
            "step_lr",
            "StepLR",
            "step_size = 2\ngamma = 0.5",
            Box::new(|o| Box::new(StepLR::new(o, 2, 0.5).unwrap())),
        ),
        (
            "multi_step_lr",
            "MultiStepLR",
            "milestones = [1, 3]",
            Box::new(|o| Box::new(MultiStepLR::new(o, vec![1, 3], 0.1).unwrap())),
        ),
        (
            "exponential_lr",
            "ExponentialLR",
            "gamma = 0.9",
            Box::new(|o| Box::new(ExponentialLR::new(o, 0.9).unwrap())),
        ),
        (
            "cosine_annealing_lr",
            "CosineAnnealingLR",
            "T_max = 6\neta_min = 0.01",
            Box::new(|o| Box::new(CosineAnnealingLR::new(o, 6, 0.01).unwrap())),
        ),
        (
            "linear_warmup_decay_lr",
            "LinearWarmupDecayLR",
            "num_warmup_steps = 2\nnum_training_steps = 8",
            Box::new(|o| Box::new(LinearWarmupDecayLR::new(o, 2, 8).unwrap())),
        ),
        (
            "one_cycle_lr",
            "OneCycleLR",
            "max_lr = 1.0\nepochs = 2\nsteps_per_epoch = 5",
            Box::new(|o| Box::new(OneCycleLR::new(o, 1.0, 10, OneCycleConfig::default()).unwrap())),
        ),
        (
            "reduce_lr_on_plateau",
            "ReduceLROnPlateau",
            "patience = 1\nfactor = 0.5",
            Box::new(|o| {
                Box::new(
                    ReduceLROnPlateau::new(
                        o,
                        PlateauConfig {
                            patience: 1,
                            factor: 0.5,
                            ..Default::default()
                        },
                    )
                    .unwrap(),
                )
            }),
        ),
    ];
    assert_eq!(cases.len(), reg.scheduler_names().len());
    let lrs = |s: &mut dyn Scheduler, o: &Sgd| -> Vec<f64> {
        (0..5)
            .map(|_| {
                s.step_with_metric(1.0);
                o.lr(0)
            })
            .collect()
    };
    for (name, torch_name, args, direct) in cases {
        let o = opt();
        let want = lrs(direct(&o).as_mut(), &o);
        assert!(want.iter().any(|&l| l != 0.1), "{name}: {want:?}");
        for n in [name, torch_name] {
            let o = opt();
            let mut s = reg.build_scheduler(n, table(args), &o).unwrap();
            assert_eq!(lrs(s.as_mut(), &o), want, "{n}");
        }
    }
}

// ------------------------------------------------------------------------------ user plugins

/// A user loss: `scale · mean((x − y)²)`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaledMse {
    scale: f64,
}

impl Loss for ScaledMse {
    fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        (input - target).square().mean_all() * self.scale
    }
}

/// A user scheduler: halves the lr every `every` steps.
struct Halving {
    hyper: kiln::nn::optim::HyperHandle,
    every: u64,
    base: f64,
    epoch: u64,
}

impl Scheduler for Halving {
    fn step(&mut self) {
        self.epoch += 1;
        let lr = self.base * 0.5f64.powi((self.epoch / self.every) as i32);
        self.hyper.set_lr(0, lr).unwrap();
    }
    fn last_epoch(&self) -> u64 {
        self.epoch
    }
    fn last_lr(&self) -> Vec<f64> {
        self.hyper.lrs()
    }
    fn state_dict(&self) -> SchedulerState {
        SchedulerState {
            kind: "Halving".into(),
            last_epoch: self.epoch,
            base_lrs: vec![self.base],
            last_lrs: self.hyper.lrs(),
            best: None,
            num_bad_epochs: 0,
            cooldown_counter: 0,
        }
    }
    fn load_state_dict(&mut self, state: &SchedulerState) -> Result<(), NnError> {
        self.epoch = state.last_epoch;
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HalvingArgs {
    every: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeavyBallArgs {
    lr: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleArgs {
    #[serde(alias = "by")]
    factor: f64,
}

/// A user layer built by a typed constructor: `factor · x`, with a learnable scalar from the rng.
#[derive(Module)]
struct Scale {
    gain: Param,
    #[module(skip)]
    factor: f64,
}

impl Forward for Scale {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.mul(&self.gain) * self.factor
    }
}

const USER_SPEC: &str = r#"
seed = 5

[[layer]]
type = "linear"
in = 3
out = 1

[[layer]]
type = "scale"
by = 2.0

[loss]
type = "scaled_mse"
scale = 3.0

[optimizer]
type = "heavy_ball"
lr = 0.01

[scheduler]
type = "halving"
every = 2
"#;

fn user_registry() -> Registry {
    let reg = Registry::with_builtins();
    reg.register_layer("scale", |a: ScaleArgs, ctx: &mut BuildContext| {
        let g = ctx.rng().next_f32();
        Ok(Scale {
            gain: Param::new(Tensor::from_slice(&[g], [1])),
            factor: a.factor,
        })
    })
    .unwrap();
    reg.loss::<ScaledMse>("scaled_mse").unwrap();
    reg.register_optimizer(
        "heavy_ball",
        |a: HeavyBallArgs, params: Vec<(String, Param)>| {
            let c = SgdConfig {
                lr: a.lr,
                momentum: 0.9,
                ..Default::default()
            };
            Sgd::new(params, c)
        },
    )
    .unwrap();
    reg.register_scheduler("halving", |a: HalvingArgs, opt: &dyn Optimizer| {
        let hyper = opt.hyper();
        Ok(Halving {
            base: hyper.lr(0),
            hyper,
            every: a.every,
            epoch: 0,
        })
    })
    .unwrap();
    reg
}

#[test]
fn user_layer_loss_optimizer_and_scheduler_work_from_toml_like_builtins() {
    let reg = user_registry();
    let spec = TrainSpec::from_toml(USER_SPEC).unwrap();
    let Training {
        model,
        loss,
        mut optimizer,
        scheduler,
    } = reg.build_training(&spec).unwrap();
    let mut scheduler = scheduler.unwrap();
    let names: Vec<String> = model
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["0.weight", "0.bias", "1.gain"]);
    // The user layer drew its gain right after the linear layer, from the model's generator.
    let mut rng = Rng::new(5);
    let _ = Linear::new(3, 1, &mut rng);
    assert_eq!(
        model.named_parameters()[2].1.to_vec::<f32>(),
        [rng.next_f32()]
    );

    let x = Tensor::randn([16, 3], 1);
    let y = x.sum(1, true);
    let out = model.forward(&x);
    let l = loss.forward(&out, &y);
    let mse = MseLoss::default().forward(&out, &y).item();
    assert!((l.item() - 3.0 * mse).abs() < 1e-5 * mse.max(1.0));
    let mut losses = Vec::new();
    for _ in 0..40 {
        let l = loss.forward(&model.forward(&x), &y);
        l.backward();
        optimizer.step();
        optimizer.zero_grad();
        scheduler.step();
        losses.push(l.item());
    }
    assert_eq!(optimizer.state_dict().kind, "sgd");
    assert_eq!(optimizer.lr(0), 0.01 * 0.5f64.powi(20));
    assert!(losses[39] < losses[0], "{losses:?}");
    // The user names are listed next to the built-ins.
    assert!(reg.layer_names().contains(&"scale".to_string()));
    assert!(reg.scheduler_names().contains(&"halving".to_string()));
}

#[test]
fn the_global_registry_is_usable_from_many_threads() {
    std::thread::scope(|s| {
        for t in 0..8 {
            s.spawn(move || {
                let name = format!("thread_scale_{t}");
                registry()
                    .register_layer(&name, |a: ScaleArgs, _: &mut BuildContext| {
                        Ok(Scale {
                            gain: Param::new(Tensor::ones([1])),
                            factor: a.factor,
                        })
                    })
                    .unwrap();
                for _ in 0..20 {
                    let m = Sequential::from_toml(&format!(
                        "[[layer]]\ntype = \"{name}\"\nfactor = {t}.0\n[[layer]]\ntype = \"relu\""
                    ))
                    .unwrap();
                    let y = m.forward(&Tensor::ones([2]));
                    assert_eq!(y.to_vec::<f32>(), [t as f32; 2]);
                }
            });
        }
    });
    for t in 0..8 {
        assert!(registry()
            .layer_names()
            .contains(&format!("thread_scale_{t}")));
    }
}

// ------------------------------------------------------------------------------ errors

#[test]
fn unknown_names_list_the_known_ones_and_suggest_the_closest() {
    let reg = Registry::with_builtins();
    let msg = err_of(reg.build_sequential(
        "[[layer]]\ntype = \"linear\"\nin = 2\nout = 2\n[[layer]]\ntype = \"lienar\"",
    ));
    assert_contains(
        &msg,
        &[
            "layer 1: unknown layer `lienar` (did you mean `linear`?)",
            "known layers: adaptive_avg_pool2d, avg_pool1d, avg_pool2d, batch_norm1d, batch_norm2d, conv1d, conv2d",
        ],
    );
    let msg = err_of(reg.build_optimizer("adamm", toml::Table::new(), vec![]));
    assert_contains(
        &msg,
        &[
            "unknown optimizer `adamm` (did you mean `adam`?)",
            "known optimizers: adagrad, adam, adamw, rmsprop, sgd",
        ],
    );
    let msg = err_of(reg.build_loss("CrossEntropyLos", toml::Table::new()));
    assert_contains(
        &msg,
        &[
            "unknown loss `CrossEntropyLos` (did you mean `cross_entropy`?)",
            "known losses",
        ],
    );
    let o = Sgd::new(vec![fresh()], 0.1).unwrap();
    let msg = err_of(reg.build_scheduler("zzz", toml::Table::new(), &o));
    assert_contains(
        &msg,
        &["unknown scheduler `zzz`; known schedulers: cosine_annealing_lr"],
    );
    assert!(!msg.contains("did you mean"), "{msg}");
    assert!(matches!(
        reg.build_loss("nope", toml::Table::new()),
        Err(NnError::UnknownName { kind: "loss", .. })
    ));
}

#[test]
fn bad_missing_and_unknown_args_name_the_layer_and_serdes_message() {
    let reg = Registry::with_builtins();
    let build = |s: &str| err_of(reg.build_sequential(s));
    let relu = "[[layer]]\ntype = \"relu\"\n";
    assert_contains(
        &build(&format!("{relu}[[layer]]\ntype = \"linear\"\nin = 4")),
        &["layer 1 (`linear`): missing field `out_features`"],
    );
    assert_contains(
        &build("[[layer]]\ntype = \"linear\"\nin = 4\nout = 2\noutt = 3"),
        &[
            "layer 0 (`linear`): unknown field `outt`, expected one of",
            "`out_features`",
        ],
    );
    assert_contains(
        &build("[[layer]]\ntype = \"linear\"\nin = \"four\"\nout = 2"),
        &["layer 0 (`linear`): invalid type: string \"four\""],
    );
    assert_contains(
        &build("[[layer]]\ntype = \"relu\"\ninplace = true"),
        &["layer 0 (`relu`): unknown field `inplace`"],
    );
    assert_contains(
        &build("[[layer]]\ntype = \"dropout\"\np = 1.5"),
        &["layer 0 (`dropout`): config: p must be in [0, 1], got 1.5"],
    );
    assert_contains(
        &build("[[layer]]\ntype = \"gelu\"\napproximate = \"fast\""),
        &["layer 0 (`gelu`): unknown variant `fast`, expected `none` or `tanh`"],
    );
    assert_contains(
        &build("[[layer]]\ntype = \"max_pool2d\"\nkernel_size = 2\npadding = 2"),
        &["layer 0 (`max_pool2d`): config: max_pool2d: padding (2, 2) must be at most half the kernel size (2, 2)"],
    );
    assert_contains(
        &build("[[layer]]\ntype = \"avg_pool1d\"\nkernel_size = [2, 2]"),
        &["avg_pool1d: kernel_size takes one size"],
    );
    assert_contains(
        &build("[[layer]]\ntype = \"multihead_attention\"\nembed_dim = 6\nnum_heads = 4"),
        &["multihead_attention: num_heads = 4 must be positive and divide the width 6"],
    );
    assert_contains(
        &build("[[layer]]\ntype = \"transformer_encoder_layer\"\nd_model = 4\nnhead = 2\nactivation = \"swish\""),
        &["activation `swish` is not one of relu, gelu"],
    );
    assert_contains(
        &build("[[layer]]\ntype = \"batch_norm2d\"\nnum_features = 3\nmomentum = 2.0"),
        &["batch_norm: momentum 2 is not in [0, 1]"],
    );
    assert_contains(
        &build(
            "[[layer]]\ntype = \"lstm\"\ninput_size = 2\nhidden_size = 2\nnonlinearity = \"relu\"",
        ),
        &["lstm: takes no nonlinearity"],
    );
    assert_contains(&build("[[layer]]\nin = 3"), &["layer 0: missing `type`"]);
    assert_contains(
        &build("[[layer]]\ntype = 3"),
        &["layer 0: `type` must be a string"],
    );
    assert_contains(&build("seed = 1"), &["no [[layer]] tables"]);
    assert_contains(
        &build("seed = -1\n[[layer]]\ntype = \"relu\""),
        &["`seed` must be a non-negative integer"],
    );
    assert_contains(
        &build("[[layers]]\ntype = \"relu\""),
        &["<string>: unknown top-level key `layers`"],
    );

    let params = || vec![("w".to_string(), fresh())];
    let msg = err_of(reg.build_optimizer("sgd", table("lr = 0.1\nmomentm = 0.9"), params()));
    assert_contains(
        &msg,
        &[
            "optimizer `sgd`: unknown field `momentm`, expected one of",
            "`momentum`",
        ],
    );
    let msg = err_of(reg.build_optimizer("adam", table("lr = -1.0"), params()));
    assert_contains(&msg, &["optimizer `adam`:", "lr"]);
    let msg = err_of(reg.build_optimizer("adam", table("betas = 0.9"), params()));
    assert_contains(&msg, &["optimizer `adam`: invalid type"]);
    let o = Sgd::new(params(), 0.1).unwrap();
    let msg = err_of(reg.build_scheduler("step_lr", table("step_size = 0"), &o));
    assert_contains(
        &msg,
        &["scheduler `step_lr`: config: step_size must be >= 1"],
    );
    let msg = err_of(reg.build_scheduler("step_lr", toml::Table::new(), &o));
    assert_contains(&msg, &["scheduler `step_lr`: missing field `step_size`"]);
    let msg = err_of(reg.build_scheduler("one_cycle_lr", table("max_lr = 1.0"), &o));
    assert_contains(
        &msg,
        &["give either total_steps, or epochs and steps_per_epoch"],
    );
    let msg = err_of(reg.build_loss("mse", table("reduction = \"avg\"")));
    assert_contains(
        &msg,
        &["loss `mse`: unknown variant `avg`, expected one of `mean`, `sum`, `none`"],
    );

    let spec = TrainSpec::from_toml("[[layer]]\ntype = \"relu\"\n[loss]\ntype = \"mse\"").unwrap();
    assert_contains(
        &err_of(reg.build_training(&spec)),
        &["missing [optimizer] table"],
    );
    let spec = TrainSpec::from_toml("[[layer]]\ntype = \"linear\"\nin=1\nout=1\n[loss]\ntype = \"mse\"\n[optimizer]\ntype = \"sgd\"\n[scheduler]\ngamma = 0.5").unwrap_err();
    assert_contains(&spec.to_string(), &["[scheduler]: missing `type`"]);
}

#[test]
fn toml_syntax_errors_and_missing_files_name_the_place() {
    let msg = err_of(Sequential::from_toml(
        "[[layer]]\ntype = \"relu\"\nin = = 3\n",
    ));
    assert_contains(&msg, &["<string>:3:", "invalid TOML"]);
    let dir = std::env::temp_dir().join(format!("kiln-plugin-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.toml");
    std::fs::write(&path, "seed = 1\n\n[[layer]]\ntype = \"relu\n").unwrap();
    let msg = err_of(Sequential::from_toml_file(&path));
    assert_contains(&msg, &[&format!("{}:4:", path.display()), "invalid TOML"]);
    assert!(matches!(
        TrainSpec::from_toml_file(&path),
        Err(NnError::Toml { line: 4, .. })
    ));
    std::fs::write(&path, "[[layer]]\ntype = \"linear\"\nin = 2\nout = 3\n").unwrap();
    assert_eq!(Sequential::from_toml_file(&path).unwrap().len(), 1);
    let missing = dir.join("nope.toml");
    let msg = err_of(TrainSpec::from_toml_file(&missing));
    assert_contains(&msg, &[&missing.display().to_string()]);
    assert!(matches!(
        TrainSpec::from_toml_file(&missing),
        Err(NnError::File(..))
    ));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn duplicate_names_are_errors_unless_replaced() {
    let reg = Registry::with_builtins();
    let msg = err_of(reg.layer::<custom_plugin::Swish>("Linear"));
    assert_contains(&msg, &["layer `Linear` is already registered (as `linear`); use `replace_layer` to override it"]);
    reg.layer::<custom_plugin::Swish>("swish").unwrap();
    let msg = err_of(reg.layer::<custom_plugin::Swish>("SWISH"));
    assert_contains(&msg, &["layer `SWISH` is already registered (as `swish`)"]);
    let msg = err_of(reg.loss::<ScaledMse>("MSELoss"));
    assert_contains(&msg, &["loss `MSELoss` is already registered (as `mse`)"]);
    let msg = err_of(reg.optimizer::<custom_plugin::LionRule>("adam"));
    assert_contains(
        &msg,
        &["optimizer `adam` is already registered (as `adam`)"],
    );
    let msg = err_of(
        reg.register_scheduler("StepLR", |a: HalvingArgs, o: &dyn Optimizer| {
            StepLR::new(o, a.every, 0.5)
        }),
    );
    assert_contains(
        &msg,
        &["scheduler `StepLR` is already registered (as `step_lr`)"],
    );
    // Replacing: `linear` now builds the user layer.
    reg.replace_layer("linear", |a: ScaleArgs, _: &mut BuildContext| {
        Ok(Scale {
            gain: Param::new(Tensor::ones([1])),
            factor: a.factor,
        })
    });
    let m = reg
        .build_sequential("[[layer]]\ntype = \"Linear\"\nfactor = 3.0")
        .unwrap();
    assert_eq!(m.forward(&Tensor::ones([2])).to_vec::<f32>(), [3.0, 3.0]);
    assert_eq!(Registry::new().layer_names(), Vec::<String>::new());
    assert_contains(
        &err_of(reg.layer::<custom_plugin::Swish>("__")),
        &["empty name"],
    );
}
