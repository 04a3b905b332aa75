//! Forward and backward parity of kiln's attention layers with PyTorch, on fixtures written by
//! `scripts/make_attn_fixtures.py` (eval mode, PyTorch's slow path): weights are loaded through
//! `load_state_dict`, and outputs (and attention weights), input gradients and parameter
//! gradients must match within 1e-5 (max abs diff).

mod common;

use common::{fixture, max_diff, Arr, TOL};
use kiln_core::{Rng, Tensor};
use kiln_nn::layers::{
    MhaConfig, MhaOptions, MultiheadAttention, TransformerActivation, TransformerEncoder,
    TransformerEncoderLayer, TransformerEncoderLayerConfig,
};
use kiln_nn::{LoadMode, Module, ModuleExt, StateDict};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Fixture {
    name: String,
    config: serde_json::Value,
    state_dict: BTreeMap<String, Arr>,
    inputs: BTreeMap<String, Arr>,
    masks: BTreeMap<String, Arr>,
    outputs: BTreeMap<String, Arr>,
    gws: BTreeMap<String, Arr>,
    input_grads: BTreeMap<String, Arr>,
    param_grads: BTreeMap<String, Arr>,
}

fn load(name: &str) -> Fixture {
    let fx: Fixture = fixture("attn", name);
    assert_eq!(fx.name, name);
    fx
}

fn cfg(c: &serde_json::Value, k: &str) -> usize {
    c[k].as_u64().unwrap() as usize
}

/// Loads the weights, runs `run` on the fixture's inputs (leaves requiring grad) and masks,
/// back-propagates `Σ out·gw (+ Σ weights·gw)`, compares everything; returns the worst diff.
fn check<M: Module + ?Sized>(
    fx: &Fixture,
    m: &M,
    run: impl Fn(&BTreeMap<String, Tensor>, &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor>,
) -> f64 {
    let name = &fx.name;
    let sd: StateDict = fx
        .state_dict
        .iter()
        .map(|(k, v)| (k.clone(), v.tensor()))
        .collect();
    m.load_state_dict(&sd, LoadMode::Strict).unwrap();
    m.eval();
    let inputs: BTreeMap<String, Tensor> = fx
        .inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.tensor().requires_grad()))
        .collect();
    let masks: BTreeMap<String, Tensor> = fx
        .masks
        .iter()
        .map(|(k, v)| (k.clone(), v.tensor()))
        .collect();
    let outs = run(&inputs, &masks);
    assert_eq!(outs.len(), fx.outputs.len(), "{name}: outputs");
    let mut worst = 0f64;
    let mut loss: Option<Tensor> = None;
    for (k, want) in &fx.outputs {
        let d = max_diff(&outs[k], want);
        assert!(d <= TOL, "{name}: {k} differs by {d}");
        worst = worst.max(d);
        let term = outs[k].mul(&fx.gws[k].tensor()).sum_all();
        loss = Some(match loss {
            Some(l) => l.add(&term),
            None => term,
        });
    }
    loss.unwrap().backward();
    for (k, want) in &fx.input_grads {
        let d = max_diff(&inputs[k].grad().expect("input grad"), want);
        assert!(d <= TOL, "{name}: grad of input {k} differs by {d}");
        worst = worst.max(d);
    }
    let params = m.named_parameters();
    assert_eq!(
        params.len(),
        fx.param_grads.len(),
        "{name}: parameter count"
    );
    for (pname, p) in params {
        let d = max_diff(&p.grad().expect("param grad"), &fx.param_grads[&pname]);
        assert!(d <= TOL, "{name}: grad of {pname} differs by {d}");
        worst = worst.max(d);
    }
    println!("{name}: max abs diff {worst:.3e}");
    worst
}

fn check_mha(name: &str) -> f64 {
    let fx = load(name);
    let c = &fx.config;
    let e = cfg(c, "embed_dim");
    let mut config = MhaConfig::new(cfg(c, "num_heads"))
        .batch_first(c["batch_first"].as_bool().unwrap())
        .dropout(0.1);
    if let Some(k) = c["kdim"].as_u64() {
        config = config.kdim(k as usize);
    }
    if let Some(v) = c["vdim"].as_u64() {
        config = config.vdim(v as usize);
    }
    let m = MultiheadAttention::with_config(e, config, &mut Rng::new(0));
    let is_causal = c["is_causal"].as_bool().unwrap();
    let need_weights = c["need_weights"].as_bool().unwrap();
    let average = c["average_attn_weights"].as_bool().unwrap();
    check(&fx, &m, |ins, masks| {
        let q = &ins["query"];
        let (k, v) = (ins.get("key").unwrap_or(q), ins.get("value").unwrap_or(q));
        let mut opts = MhaOptions::default()
            .need_weights(need_weights)
            .average_attn_weights(average)
            .is_causal(is_causal);
        if let Some(kpm) = masks.get("key_padding_mask") {
            opts = opts.key_padding_mask(kpm);
        }
        // kiln's is_causal builds the causal mask itself: PyTorch's (equal) mask is not needed.
        if let (Some(am), false) = (masks.get("attn_mask"), is_causal) {
            opts = opts.attn_mask(am);
        }
        let (y, w) = m.forward_qkv(q, k, v, opts);
        let mut out = BTreeMap::from([("out".to_string(), y)]);
        if let Some(w) = w {
            out.insert("weights".to_string(), w);
        }
        out
    })
}

#[test]
fn multihead_attention_matches_pytorch() {
    let mut worst = 0f64;
    for name in [
        "mha_kpm",
        "mha_causal",
        "mha_float_mask",
        "mha_kdim_seq_first",
        "mha_fully_masked",
    ] {
        worst = worst.max(check_mha(name));
    }
    println!("multihead attention: worst {worst:.3e}");
}

fn layer_config(c: &serde_json::Value) -> TransformerEncoderLayerConfig {
    TransformerEncoderLayerConfig::new(cfg(c, "nhead"))
        .dim_feedforward(cfg(c, "dim_feedforward"))
        .activation(match c["activation"].as_str().unwrap() {
            "relu" => TransformerActivation::Relu,
            "gelu" => TransformerActivation::Gelu,
            other => panic!("unknown activation {other}"),
        })
        .batch_first(c["batch_first"].as_bool().unwrap())
        .norm_first(c["norm_first"].as_bool().unwrap())
        .layer_norm_eps(c["layer_norm_eps"].as_f64().unwrap())
}

/// Runs `fwd(src, src_mask, src_key_padding_mask, is_causal)` of module `m` on fixture `fx`.
fn check_stack<M: Module>(
    fx: &Fixture,
    m: &M,
    fwd: impl Fn(&M, &Tensor, Option<&Tensor>, Option<&Tensor>, bool) -> Tensor,
) -> f64 {
    let is_causal = fx.config["is_causal"].as_bool().unwrap();
    check(fx, m, |ins, masks| {
        // With is_causal, kiln builds the causal mask itself (PyTorch's is the same mask).
        let src_mask = if is_causal {
            None
        } else {
            masks.get("src_mask")
        };
        let kpm = masks.get("src_key_padding_mask");
        let y = fwd(m, &ins["src"], src_mask, kpm, is_causal);
        BTreeMap::from([("out".to_string(), y)])
    })
}

fn check_encoder(name: &str) -> f64 {
    let fx = load(name);
    let c = &fx.config;
    let (d, config) = (cfg(c, "d_model"), layer_config(c));
    let mut rng = Rng::new(0);
    match c["num_layers"].as_u64() {
        None => {
            let layer = TransformerEncoderLayer::with_config(d, config, &mut rng);
            check_stack(&fx, &layer, |l, x, m, k, ca| {
                l.forward_with_mask(x, m, k, ca)
            })
        }
        Some(n) => {
            let enc = TransformerEncoder::new(d, config, n as usize, true, &mut rng);
            check_stack(&fx, &enc, |e, x, m, k, ca| e.forward_with_mask(x, m, k, ca))
        }
    }
}

#[test]
fn transformer_encoder_matches_pytorch() {
    let mut worst = 0f64;
    for name in [
        "enc_relu",
        "enc_gelu",
        "enc_norm_first",
        "enc_fully_masked",
        "encoder_2layers",
    ] {
        worst = worst.max(check_encoder(name));
    }
    println!("transformer encoder: worst {worst:.3e}");
}
