//! Forward and backward parity of kiln's `Conv1d` / `Conv2d` with PyTorch, on fixtures written
//! by `scripts/make_conv_fixtures.py`: weights are loaded through `load_state_dict`, and the
//! output and input gradient must match within 1e-5 (max abs diff), the parameter gradients
//! within 1e-5 relative to their largest magnitude.

mod common;

use common::{fixture, max_diff, state_dict, Arr, TOL};
use kiln_core::Rng;
use kiln_nn::layers::{Conv1d, Conv1dConfig, Conv2d, Conv2dConfig, Layer, Padding1d, Padding2d};
use kiln_nn::{LoadMode, ModuleExt};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Fixture {
    name: String,
    config: Value,
    state_dict: BTreeMap<String, Arr>,
    input: Arr,
    output: Arr,
    gw: Arr,
    input_grad: Arr,
    param_grads: BTreeMap<String, Arr>,
}

fn load(name: &str) -> Fixture {
    fixture("conv", name)
}

const NAMES: [&str; 16] = [
    "conv2d_k3_pad1",
    "conv2d_mnist_first",
    "conv2d_stride2_nobias",
    "conv2d_stride_pad_mixed",
    "conv2d_dilation2",
    "conv2d_groups2",
    "conv2d_depthwise",
    "conv2d_pointwise",
    "conv2d_same_odd",
    "conv2d_same_even",
    "conv2d_unbatched",
    "conv1d_k3",
    "conv1d_groups_dilation",
    "conv1d_depthwise",
    "conv1d_same_even",
    "conv1d_unbatched",
];

fn num(c: &Value, k: &str) -> usize {
    c[k].as_u64().unwrap_or_else(|| panic!("config {k}: {c}")) as usize
}

fn pair(c: &Value, k: &str) -> (usize, usize) {
    let v: Vec<usize> = serde_json::from_value(c[k].clone()).unwrap();
    (v[0], v[1])
}

/// Builds the kiln layer a fixture's config describes (fresh init, replaced by the state dict).
fn build(c: &Value, rng: &mut Rng) -> Box<dyn Layer> {
    let bias = c["bias"].as_bool().unwrap();
    let (cin, cout, groups) = (num(c, "in"), num(c, "out"), num(c, "groups"));
    match c["kind"].as_str().unwrap() {
        "conv2d" => {
            let padding = match &c["padding"] {
                Value::String(s) => s.parse::<Padding2d>().unwrap(),
                _ => pair(c, "padding").into(),
            };
            let config = Conv2dConfig::default()
                .stride(pair(c, "stride"))
                .padding(padding)
                .dilation(pair(c, "dilation"))
                .groups(groups)
                .bias(bias);
            Box::new(Conv2d::with_config(
                cin,
                cout,
                pair(c, "kernel"),
                config,
                rng,
            ))
        }
        "conv1d" => {
            let padding = match &c["padding"] {
                Value::String(s) => s.parse::<Padding1d>().unwrap(),
                _ => num(c, "padding").into(),
            };
            let config = Conv1dConfig::default()
                .stride(num(c, "stride"))
                .padding(padding)
                .dilation(num(c, "dilation"))
                .groups(groups)
                .bias(bias);
            Box::new(Conv1d::with_config(
                cin,
                cout,
                num(c, "kernel"),
                config,
                rng,
            ))
        }
        other => panic!("unknown kind {other}"),
    }
}

#[test]
fn conv_layers_match_pytorch() {
    let mut rng = Rng::new(0);
    let mut worst = 0f64;
    for name in NAMES {
        let fx = load(name);
        assert_eq!(fx.name, name);
        let layer = build(&fx.config, &mut rng);
        let sd = state_dict(&fx.state_dict);
        let report = layer.load_state_dict(&sd, LoadMode::Strict).unwrap();
        assert_eq!(report.loaded.len(), fx.state_dict.len());
        let x = fx.input.f32().requires_grad();
        let y = layer.forward(&x);
        let out = max_diff(&y, &fx.output);
        assert!(out <= TOL, "{name}: output differs by {out}");
        y.mul(&fx.gw.f32()).sum_all().backward();
        let gx = max_diff(&x.grad().expect("input grad"), &fx.input_grad);
        assert!(gx <= TOL, "{name}: input grad differs by {gx}");
        let params = layer.named_parameters();
        assert_eq!(
            params.len(),
            fx.param_grads.len(),
            "{name}: parameter count"
        );
        let mut gp = 0f64;
        for (pname, p) in params {
            let want = &fx.param_grads[&pname];
            // Parameter gradients sum over every output position (values up to ~75 here), so
            // f32 rounding alone reaches ~1e-5 absolute: compare relative to their magnitude.
            let scale = want.data.iter().fold(1f64, |m, v| m.max(v.abs()));
            let d = max_diff(&p.grad().expect("param grad"), want) / scale;
            assert!(
                d <= TOL,
                "{name}: grad of {pname} differs by {d} (relative to {scale})"
            );
            gp = gp.max(d);
        }
        println!("{name}: output {out:.2e}, input grad {gx:.2e}, param grads (rel) {gp:.2e}");
        worst = worst.max(out).max(gx).max(gp);
    }
    println!("worst diff over all conv fixtures: {worst:.3e}");
}
