//! Forward and backward parity of kiln's layers with PyTorch, on fixtures written by
//! `scripts/make_layer_fixtures.py`: weights are loaded through `load_state_dict`, and the
//! output, input gradient and parameter gradients must match within 1e-5 (max abs diff).

mod common;

use common::{fixture, max_diff, state_dict, Arr, TOL};
use kiln_core::Rng;
use kiln_nn::layers::{
    Dropout, Embedding, Flatten, Gelu, Layer, LayerNorm, Linear, LinearConfig, NormConfig, Relu,
    RmsNorm, Sigmoid, Silu, Softmax, Tanh,
};
use kiln_nn::{seq, LoadMode, ModuleExt};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Fixture {
    name: String,
    config: serde_json::Value,
    state_dict: BTreeMap<String, Arr>,
    input: Arr,
    output: Arr,
    gw: Arr,
    input_grad: Option<Arr>,
    param_grads: BTreeMap<String, Arr>,
}

/// Loads the fixture's weights into `layer`, runs forward and backward, compares everything.
/// Returns the largest difference seen.
fn check(name: &str, layer: &dyn Layer) -> f64 {
    let fx = load(name);
    assert_eq!(fx.name, name);
    let sd = state_dict(&fx.state_dict);
    let report = layer.load_state_dict(&sd, LoadMode::Strict).unwrap();
    assert_eq!(report.loaded.len(), fx.state_dict.len());
    let float_input = fx.input_grad.is_some();
    let x = if float_input {
        fx.input.f32().requires_grad()
    } else {
        fx.input.i64()
    };
    let y = layer.forward(&x);
    let mut worst = max_diff(&y, &fx.output);
    assert!(worst <= TOL, "{name}: output differs by {worst}");
    if y.tracks_grad() {
        y.mul(&fx.gw.f32()).sum_all().backward();
    }
    if let Some(g) = &fx.input_grad {
        let d = max_diff(&x.grad().expect("input grad"), g);
        assert!(d <= TOL, "{name}: input grad differs by {d}");
        worst = worst.max(d);
    }
    let params = layer.named_parameters();
    assert_eq!(
        params.len(),
        fx.param_grads.len(),
        "{name}: parameter count"
    );
    for (pname, p) in params {
        let want = &fx.param_grads[&pname];
        let d = max_diff(&p.grad().expect("param grad"), want);
        assert!(d <= TOL, "{name}: grad of {pname} differs by {d}");
        worst = worst.max(d);
    }
    println!("{name}: max abs diff {worst:.3e}");
    worst
}

fn cfg_usize(fx: &serde_json::Value, k: &str) -> usize {
    fx[k].as_u64().unwrap() as usize
}

#[test]
fn layers_match_pytorch() {
    let mut rng = Rng::new(0);
    let mut worst = 0f64;
    for name in ["linear", "linear_nobias", "linear_1d"] {
        let c = load(name).config;
        let l = Linear::with_config(
            cfg_usize(&c, "in"),
            cfg_usize(&c, "out"),
            LinearConfig::default().bias(c["bias"].as_bool().unwrap()),
            &mut rng,
        );
        worst = worst.max(check(name, &l));
    }
    worst = worst.max(check("embedding", &Embedding::new(10, 4, &mut rng)));

    for name in ["layernorm", "layernorm_2d", "layernorm_noaffine"] {
        let c = load(name).config;
        let shape: Vec<usize> = serde_json::from_value(c["shape"].clone()).unwrap();
        let cfg = NormConfig::layer_norm()
            .eps(c["eps"].as_f64().unwrap())
            .elementwise_affine(c["affine"].as_bool().unwrap());
        worst = worst.max(check(name, &LayerNorm::with_config(&shape, cfg)));
    }
    for name in ["rmsnorm", "rmsnorm_noaffine"] {
        let c = load(name).config;
        let cfg = NormConfig::rms_norm()
            .eps(c["eps"].as_f64().unwrap())
            .elementwise_affine(c["affine"].as_bool().unwrap());
        worst = worst.max(check(name, &RmsNorm::with_config(&[6], cfg)));
    }

    let d = Dropout::new(0.5, 1);
    d.eval();
    let unit: Vec<(&str, Box<dyn Layer>)> = vec![
        ("relu", Box::new(Relu)),
        ("gelu", Box::new(Gelu::new())),
        ("gelu_tanh", Box::new(Gelu::tanh())),
        ("silu", Box::new(Silu)),
        ("tanh", Box::new(Tanh)),
        ("sigmoid", Box::new(Sigmoid)),
        ("softmax", Box::new(Softmax::new(1))),
        ("softmax_last", Box::new(Softmax::new(-1))),
        ("flatten", Box::new(Flatten::new())),
        ("dropout_eval", Box::new(d)),
    ];
    for (name, layer) in &unit {
        worst = worst.max(check(name, layer.as_ref()));
    }

    let mlp = seq![
        Linear::new(6, 8, &mut rng),
        Relu,
        Linear::new(8, 3, &mut rng)
    ];
    worst = worst.max(check("sequential", &mlp));
    println!("worst max abs diff over all fixtures: {worst:.3e}");
}

fn load(name: &str) -> Fixture {
    fixture("layers", name)
}
