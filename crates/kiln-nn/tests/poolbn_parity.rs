//! Parity of kiln's pooling and batch-norm layers with PyTorch, on fixtures written by
//! `scripts/make_poolbn_fixtures.py`. Pools: output and input gradient. Batch norm: three
//! training steps (outputs, input and parameter gradients), the running statistics and
//! `num_batches_tracked` after them, then one evaluation step. Tolerance 1e-5 (max abs diff).

mod common;

use common::{fixture, max_diff, Arr, TOL};
use kiln_core::{AvgPool1dOptions, AvgPool2dOptions, MaxPool1dOptions, MaxPool2dOptions};
use kiln_nn::layers::{
    AdaptiveAvgPool2d, AvgPool1d, AvgPool2d, BatchNorm1d, BatchNorm2d, BatchNormConfig, Layer,
    MaxPool1d, MaxPool2d,
};
use kiln_nn::{LoadMode, ModuleExt, StateDict};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Step {
    input: Arr,
    output: Arr,
    gw: Arr,
    input_grad: Arr,
    param_grads: BTreeMap<String, Arr>,
}

fn load_json(name: &str) -> Value {
    let v: Value = fixture("poolbn", name);
    assert_eq!(v["name"], name);
    v
}

/// Runs one forward/backward step of `layer` and compares output and gradients.
fn check_step(what: &str, layer: &dyn Layer, step: &Step) -> f64 {
    let x = step.input.f32().requires_grad();
    let y = layer.forward(&x);
    let mut worst = max_diff(&y, &step.output);
    assert!(worst <= TOL, "{what}: output differs by {worst}");
    y.mul(&step.gw.f32()).sum_all().backward();
    let d = max_diff(&x.grad().expect("input grad"), &step.input_grad);
    assert!(d <= TOL, "{what}: input grad differs by {d}");
    worst = worst.max(d);
    let params = layer.named_parameters();
    assert_eq!(params.len(), step.param_grads.len(), "{what}: parameters");
    for (pname, p) in params {
        let d = max_diff(&p.grad().expect("param grad"), &step.param_grads[&pname]);
        assert!(d <= TOL, "{what}: grad of {pname} differs by {d}");
        worst = worst.max(d);
        p.zero_grad();
    }
    worst
}

fn opt_usize(v: &Value) -> Option<usize> {
    v.as_u64().map(|x| x as usize)
}

/// `3` or `[3, 2]` as a pair.
fn pair(v: &Value) -> (usize, usize) {
    match v.as_array() {
        Some(a) => (
            a[0].as_u64().unwrap() as usize,
            a[1].as_u64().unwrap() as usize,
        ),
        None => {
            let k = v.as_u64().unwrap() as usize;
            (k, k)
        }
    }
}

fn pool_layer(kind: &str, c: &Value) -> Box<dyn Layer> {
    let flag = |k: &str| c[k].as_bool().unwrap();
    match kind {
        "max2d" => {
            let mut o = MaxPool2dOptions::new(pair(&c["kernel"]))
                .padding(pair(&c["padding"]))
                .dilation(pair(&c["dilation"]))
                .ceil_mode(flag("ceil_mode"));
            if !c["stride"].is_null() {
                o = o.stride(pair(&c["stride"]));
            }
            Box::new(MaxPool2d::with_options(o))
        }
        "avg2d" => {
            let mut o = AvgPool2dOptions::new(pair(&c["kernel"]))
                .padding(pair(&c["padding"]))
                .ceil_mode(flag("ceil_mode"))
                .count_include_pad(flag("count_include_pad"));
            if !c["stride"].is_null() {
                o = o.stride(pair(&c["stride"]));
            }
            if let Some(d) = opt_usize(&c["divisor_override"]) {
                o = o.divisor_override(d);
            }
            Box::new(AvgPool2d::with_options(o))
        }
        "adaptive2d" => Box::new(AdaptiveAvgPool2d::new(pair(&c["output_size"]))),
        "max1d" => {
            let mut o = MaxPool1dOptions::new(opt_usize(&c["kernel"]).unwrap())
                .padding(opt_usize(&c["padding"]).unwrap())
                .dilation(opt_usize(&c["dilation"]).unwrap())
                .ceil_mode(flag("ceil_mode"));
            if let Some(s) = opt_usize(&c["stride"]) {
                o = o.stride(s);
            }
            Box::new(MaxPool1d::with_options(o))
        }
        "avg1d" => {
            let mut o = AvgPool1dOptions::new(opt_usize(&c["kernel"]).unwrap())
                .padding(opt_usize(&c["padding"]).unwrap())
                .ceil_mode(flag("ceil_mode"))
                .count_include_pad(flag("count_include_pad"));
            if let Some(s) = opt_usize(&c["stride"]) {
                o = o.stride(s);
            }
            Box::new(AvgPool1d::with_options(o))
        }
        other => panic!("unknown pool kind {other}"),
    }
}

#[test]
fn pools_match_pytorch() {
    let mut worst = 0f64;
    for name in [
        "max2d_basic",
        "max2d_pad_ceil",
        "max2d_dilation",
        "max2d_rect_overlap_unbatched",
        "max2d_ceil_edge",
        "avg2d_basic",
        "avg2d_pad_ceil_include",
        "avg2d_pad_ceil_exclude",
        "avg2d_rect_exclude",
        "avg2d_divisor",
        "adaptive_3x2",
        "adaptive_4x5",
        "adaptive_global",
        "adaptive_upsample",
        "max1d_pad_ceil",
        "max1d_dilation_unbatched",
        "avg1d_exclude",
        "avg1d_basic",
    ] {
        let fx = load_json(name);
        let layer = pool_layer(fx["kind"].as_str().unwrap(), &fx["config"]);
        let step: Step = serde_json::from_value(fx).unwrap();
        let d = check_step(name, layer.as_ref(), &step);
        println!("{name}: max abs diff {d:.3e}");
        worst = worst.max(d);
    }
    println!("pools: worst max abs diff {worst:.3e}");
}

fn state(v: &Value) -> BTreeMap<String, Arr> {
    serde_json::from_value(v.clone()).unwrap()
}

fn state_dict(s: &BTreeMap<String, Arr>) -> StateDict {
    s.iter()
        .map(|(k, v)| {
            let t = if k == "num_batches_tracked" {
                v.i64()
            } else {
                v.f32()
            };
            (k.clone(), t)
        })
        .collect()
}

#[test]
fn batch_norm_matches_pytorch() {
    let mut worst = 0f64;
    for name in [
        "bn2d",
        "bn2d_momentum_none",
        "bn2d_noaffine_eps",
        "bn2d_no_running_stats",
        "bn1d_2d",
        "bn1d_3d_momentum_none",
    ] {
        let fx = load_json(name);
        let c = &fx["config"];
        let cfg = BatchNormConfig::default()
            .eps(c["eps"].as_f64().unwrap())
            .momentum(c["momentum"].as_f64())
            .affine(c["affine"].as_bool().unwrap())
            .track_running_stats(c["track_running_stats"].as_bool().unwrap());
        let features = c["num_features"].as_u64().unwrap() as usize;
        let layer: Box<dyn Layer> = match fx["kind"].as_str().unwrap() {
            "bn1d" => Box::new(BatchNorm1d::with_config(features, cfg)),
            _ => Box::new(BatchNorm2d::with_config(features, cfg)),
        };
        let init = state(&fx["init_state"]);
        let report = layer
            .load_state_dict(&state_dict(&init), LoadMode::Strict)
            .unwrap();
        assert_eq!(report.loaded.len(), init.len());
        layer.train();
        let steps: Vec<Step> = serde_json::from_value(fx["steps"].clone()).unwrap();
        for (i, step) in steps.iter().enumerate() {
            worst = worst.max(check_step(
                &format!("{name} step {i}"),
                layer.as_ref(),
                step,
            ));
        }
        let after = state(&fx["state_after"]);
        let sd = layer.state_dict();
        assert_eq!(sd.len(), after.len(), "{name}: state entries");
        for (k, want) in &after {
            let got = sd.get(k).unwrap_or_else(|| panic!("{name}: no {k}"));
            let d = max_diff(got, want);
            assert!(d <= TOL, "{name}: {k} after 3 steps differs by {d}");
            worst = worst.max(d);
        }
        layer.eval();
        let eval: Step = serde_json::from_value(fx["eval"].clone()).unwrap();
        worst = worst.max(check_step(&format!("{name} eval"), layer.as_ref(), &eval));
        println!("{name}: ok");
    }
    println!("batch norm: worst max abs diff {worst:.3e}");
}
