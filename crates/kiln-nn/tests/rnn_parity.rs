//! Forward and backward parity of kiln's `Lstm`, `Gru` and `Rnn` with PyTorch, on fixtures
//! written by `scripts/make_rnn_fixtures.py`: weights are loaded through `load_state_dict`; the
//! output, final states, and the gradients of the input, initial states and every parameter must
//! match within 1e-5 (max abs diff).

mod common;

use common::{fixture, max_diff, state_dict, Arr, TOL};
use kiln_core::{Rng, Tensor};
use kiln_nn::layers::{Gru, Lstm, Rnn, RnnConfig, RnnNonlinearity};
use kiln_nn::{LoadMode, Module, ModuleExt};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Config {
    num_layers: usize,
    bias: bool,
    batch_first: bool,
    bidirectional: bool,
}

#[derive(Deserialize)]
struct Fixture {
    name: String,
    kind: String,
    input_size: usize,
    hidden_size: usize,
    config: Config,
    state_dict: BTreeMap<String, Arr>,
    input: Arr,
    h0: Option<Arr>,
    c0: Option<Arr>,
    output: Arr,
    h_n: Arr,
    c_n: Option<Arr>,
    gw: Arr,
    gh: Arr,
    gc: Option<Arr>,
    input_grad: Arr,
    h0_grad: Option<Arr>,
    c0_grad: Option<Arr>,
    param_grads: BTreeMap<String, Arr>,
}

/// Runs one fixture; returns the largest difference seen.
fn check(name: &str) -> f64 {
    let fx = load(name);
    assert_eq!(fx.name, name);
    let c = &fx.config;
    let mut config = RnnConfig::default()
        .num_layers(c.num_layers)
        .bias(c.bias)
        .batch_first(c.batch_first)
        .bidirectional(c.bidirectional);
    let mut rng = Rng::new(0);
    let (is, hs) = (fx.input_size, fx.hidden_size);
    let x = fx.input.f32().requires_grad();
    let h0 = fx.h0.as_ref().map(|a| a.f32().requires_grad());
    let c0 = fx.c0.as_ref().map(|a| a.f32().requires_grad());
    let sd = state_dict(&fx.state_dict);
    let load_into = |m: &dyn Module| {
        let report = m.load_state_dict(&sd, LoadMode::Strict).unwrap();
        assert_eq!(report.loaded.len(), fx.state_dict.len());
    };
    // (layer as module, output, h_n, c_n)
    let (module, out, hn, cn): (Box<dyn Module>, Tensor, Tensor, Option<Tensor>) =
        match fx.kind.as_str() {
            "lstm" => {
                let l = Lstm::with_config(is, hs, config, &mut rng);
                load_into(&l);
                let state = h0.as_ref().map(|h| (h, c0.as_ref().unwrap()));
                let (o, h, c) = l.forward_with_state(&x, state);
                (Box::new(l), o, h, Some(c))
            }
            "gru" => {
                let l = Gru::with_config(is, hs, config, &mut rng);
                load_into(&l);
                let (o, h) = l.forward_with_state(&x, h0.as_ref());
                (Box::new(l), o, h, None)
            }
            k @ ("rnn_tanh" | "rnn_relu") => {
                let nl = if k == "rnn_tanh" {
                    RnnNonlinearity::Tanh
                } else {
                    RnnNonlinearity::Relu
                };
                config = config.nonlinearity(nl);
                let l = Rnn::with_config(is, hs, config, &mut rng);
                load_into(&l);
                let (o, h) = l.forward_with_state(&x, h0.as_ref());
                (Box::new(l), o, h, None)
            }
            k => panic!("{name}: unknown kind {k}"),
        };
    let mut diffs = vec![
        ("output", max_diff(&out, &fx.output)),
        ("h_n", max_diff(&hn, &fx.h_n)),
    ];
    let mut loss = out
        .mul(&fx.gw.f32())
        .sum_all()
        .add(&hn.mul(&fx.gh.f32()).sum_all());
    if let Some(cn) = &cn {
        diffs.push(("c_n", max_diff(cn, fx.c_n.as_ref().unwrap())));
        loss = loss.add(&cn.mul(&fx.gc.as_ref().unwrap().f32()).sum_all());
    }
    loss.backward();
    diffs.push(("input grad", max_diff(&x.grad().unwrap(), &fx.input_grad)));
    if let (Some(h0), Some(g)) = (&h0, &fx.h0_grad) {
        diffs.push(("h0 grad", max_diff(&h0.grad().unwrap(), g)));
    }
    if let (Some(c0), Some(g)) = (&c0, &fx.c0_grad) {
        diffs.push(("c0 grad", max_diff(&c0.grad().unwrap(), g)));
    }
    let params = module.named_parameters();
    assert_eq!(params.len(), fx.param_grads.len());
    let mut worst_param = 0f64;
    for (n, p) in &params {
        let want = &fx.param_grads[n];
        worst_param = worst_param.max(max_diff(&p.grad().unwrap(), want));
    }
    diffs.push(("param grads", worst_param));
    let mut worst = 0f64;
    for (what, d) in &diffs {
        assert!(d < &TOL, "{name}: {what} differs by {d:e}");
        worst = worst.max(*d);
    }
    eprintln!("{name}: max diff {worst:.2e} ({diffs:?})");
    worst
}

#[test]
fn lstm_matches_pytorch() {
    for name in [
        "lstm_2l_bidir_bf",
        "lstm_2l_bidir_tm",
        "lstm_nobias_zero_state",
        "lstm_unbatched_bidir",
    ] {
        check(name);
    }
}

#[test]
fn gru_matches_pytorch() {
    for name in [
        "gru_2l_bidir_bf",
        "gru_2l_bidir_tm",
        "gru_nobias_zero_state",
        "gru_unbatched_bidir",
    ] {
        check(name);
    }
}

#[test]
fn rnn_matches_pytorch() {
    for name in ["rnn_tanh_2l_bidir_tm", "rnn_relu_2l_bidir_tm"] {
        check(name);
    }
}

fn load(name: &str) -> Fixture {
    fixture("rnn", name)
}
