//! Parity with PyTorch: replays the fixtures written by `scripts/make_optim_fixtures.py`
//! (torch.optim and torch.optim.lr_scheduler over 20 steps with fixed gradients) and checks
//! every parameter after every step to 1e-6 (f32), and the lrs and momenta used at each step.
//! Each fixture also runs a second time with a checkpoint at step 10: optimizer and scheduler
//! state go through files and are loaded into fresh objects (without a scheduler, the fresh
//! optimizer lists its groups in reverse order).

use kiln_core::Tensor;
use kiln_nn::optim::{
    Adagrad, AdagradConfig, Adam, AdamConfig, AdamW, AdamWConfig, Optimizer, OptimizerState,
    ParamGroup, RmsProp, RmsPropConfig, Sgd, SgdConfig,
};
use kiln_nn::scheduler::{
    Anneal, CosineAnnealingLR, ExponentialLR, LinearWarmupDecayLR, MultiStepLR, OneCycleConfig,
    OneCycleLR, PerGroup, PlateauConfig, PlateauMode, ReduceLROnPlateau, Scheduler, SchedulerState,
    StepLR, ThresholdMode,
};
use kiln_nn::Param;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

const TOL: f32 = 1e-6;
const RESUME_AT: usize = 10;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    floats(v).into_iter().map(|x| x as f32).collect()
}

fn make_params(fx: &Value) -> BTreeMap<String, Param> {
    fx["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let shape: Vec<usize> = floats(&p["shape"]).iter().map(|&d| d as usize).collect();
            let t = Tensor::from_vec(f32s(&p["init"]), shape);
            (p["name"].as_str().unwrap().to_string(), Param::new(t))
        })
        .collect()
}

fn groups<C: serde::de::DeserializeOwned>(
    fx: &Value,
    params: &BTreeMap<String, Param>,
    reversed: bool,
) -> Vec<ParamGroup<C>> {
    let mut out: Vec<ParamGroup<C>> = fx["optimizer"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let named: Vec<(String, Param)> = g["params"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    let n = n.as_str().unwrap();
                    (n.to_string(), params[n].clone())
                })
                .collect();
            let config: C = serde_json::from_value(g["config"].clone()).expect("config");
            ParamGroup::new(named, config)
        })
        .collect();
    if reversed {
        out.reverse();
    }
    out
}

fn make_optimizer(
    fx: &Value,
    params: &BTreeMap<String, Param>,
    reversed: bool,
) -> Box<dyn Optimizer> {
    let kind = fx["optimizer"]["kind"].as_str().unwrap();
    match kind {
        "sgd" => Box::new(Sgd::with_groups(groups::<SgdConfig>(fx, params, reversed)).unwrap()),
        "adam" => Box::new(Adam::with_groups(groups::<AdamConfig>(fx, params, reversed)).unwrap()),
        "adamw" => {
            Box::new(AdamW::with_groups(groups::<AdamWConfig>(fx, params, reversed)).unwrap())
        }
        "rmsprop" => {
            Box::new(RmsProp::with_groups(groups::<RmsPropConfig>(fx, params, reversed)).unwrap())
        }
        "adagrad" => {
            Box::new(Adagrad::with_groups(groups::<AdagradConfig>(fx, params, reversed)).unwrap())
        }
        other => panic!("unknown optimizer kind {other}"),
    }
}

fn make_scheduler(fx: &Value, opt: &dyn Optimizer) -> Option<Box<dyn Scheduler>> {
    let spec = &fx["scheduler"];
    if spec.is_null() {
        return None;
    }
    let a = &spec["args"];
    let u = |k: &str| a[k].as_u64().unwrap_or_else(|| panic!("{k}"));
    let f = |k: &str| a[k].as_f64().unwrap_or_else(|| panic!("{k}"));
    let per_group = |k: &str| match &a[k] {
        Value::Array(_) => PerGroup::Each(floats(&a[k])),
        v => PerGroup::All(v.as_f64().unwrap()),
    };
    Some(match spec["kind"].as_str().unwrap() {
        "StepLR" => Box::new(StepLR::new(opt, u("step_size"), f("gamma")).unwrap()),
        "MultiStepLR" => {
            let m: Vec<u64> = floats(&a["milestones"]).iter().map(|&x| x as u64).collect();
            Box::new(MultiStepLR::new(opt, m, f("gamma")).unwrap())
        }
        "ExponentialLR" => Box::new(ExponentialLR::new(opt, f("gamma")).unwrap()),
        "CosineAnnealingLR" => Box::new(
            CosineAnnealingLR::with_warmup(opt, u("warmup_steps"), u("t_max"), f("eta_min"))
                .unwrap(),
        ),
        "LinearWarmupDecayLR" => {
            Box::new(LinearWarmupDecayLR::new(opt, u("warmup_steps"), u("total_steps")).unwrap())
        }
        "OneCycleLR" => {
            let config = OneCycleConfig {
                pct_start: f("pct_start"),
                anneal: match a["anneal"].as_str().unwrap() {
                    "cos" => Anneal::Cos,
                    _ => Anneal::Linear,
                },
                three_phase: a["three_phase"].as_bool().unwrap(),
                ..Default::default()
            };
            Box::new(OneCycleLR::new(opt, per_group("max_lr"), u("total_steps"), config).unwrap())
        }
        "ReduceLROnPlateau" => {
            let config = PlateauConfig {
                mode: match a["mode"].as_str().unwrap() {
                    "min" => PlateauMode::Min,
                    _ => PlateauMode::Max,
                },
                factor: f("factor"),
                patience: u("patience"),
                threshold: f("threshold"),
                threshold_mode: match a["threshold_mode"].as_str().unwrap() {
                    "rel" => ThresholdMode::Rel,
                    _ => ThresholdMode::Abs,
                },
                cooldown: u("cooldown"),
                min_lr: per_group("min_lr"),
                ..Default::default()
            };
            Box::new(ReduceLROnPlateau::new(opt, config).unwrap())
        }
        other => panic!("unknown scheduler {other}"),
    })
}

/// For each optimizer group, the index of the fixture group it holds.
fn group_order(fx: &Value, reversed: bool) -> Vec<usize> {
    let n = fx["optimizer"]["groups"].as_array().unwrap().len();
    if reversed {
        (0..n).rev().collect()
    } else {
        (0..n).collect()
    }
}

/// Replays a fixture; returns the largest parameter difference seen.
fn replay(name: &str, fx: &Value, resume: bool) -> f32 {
    let params = make_params(fx);
    let mut opt = make_optimizer(fx, &params, false);
    let mut sched = make_scheduler(fx, &*opt);
    let mut order = group_order(fx, false);
    let mut worst = 0f32;
    let tmp = std::env::temp_dir().join(format!("kiln-optim-parity-{}-{name}", std::process::id()));
    for (k, step) in fx["steps"].as_array().unwrap().iter().enumerate() {
        if resume && k == RESUME_AT {
            std::fs::create_dir_all(&tmp).unwrap();
            let opt_path = tmp.join("opt.safetensors");
            opt.state_dict().save(&opt_path).unwrap();
            let sched_path = tmp.join("sched.json");
            if let Some(s) = &sched {
                s.state_dict().save(&sched_path).unwrap();
            }
            // Fresh objects (lrs deliberately wrong until the state is loaded). Without a
            // scheduler the groups are listed in reverse: optimizer state is keyed by parameter
            // name. Scheduler state is per group index (as in torch), so it keeps the order.
            let reversed = sched.is_none();
            opt = make_optimizer(fx, &params, reversed);
            for g in 0..opt.num_groups() {
                opt.set_lr(g, 123.0).unwrap();
            }
            sched = make_scheduler(fx, &*opt);
            let report = opt
                .load_state_dict(&OptimizerState::load(&opt_path).unwrap())
                .unwrap();
            assert!(report.unexpected.is_empty(), "{name}: {report}");
            if let Some(s) = &mut sched {
                s.load_state_dict(&SchedulerState::load(&sched_path).unwrap())
                    .unwrap();
            }
            order = group_order(fx, reversed);
            std::fs::remove_dir_all(&tmp).ok();
        }
        let want_lrs = floats(&step["lrs"]);
        let hyper = opt.hyper();
        // Optimizer group g holds the parameters of fixture group order[g].
        for (g, fixture_group) in order.iter().enumerate() {
            let (got, want) = (hyper.lr(g), want_lrs[*fixture_group]);
            assert!(
                (got - want).abs() <= 1e-12,
                "{name} step {k} group {fixture_group}: lr {got} vs torch {want}"
            );
            let want_m = step["momenta"][*fixture_group].as_f64();
            let got_m = hyper.momentum(g);
            match (got_m, want_m) {
                (Some(a), Some(b)) => assert!(
                    (a - b).abs() <= 1e-12,
                    "{name} step {k} group {fixture_group}: momentum {a} vs torch {b}"
                ),
                (None, None) => {}
                (a, b) => panic!("{name} step {k}: momentum {a:?} vs torch {b:?}"),
            }
        }
        for (n, p) in &params {
            let g = f32s(&step["grads"][n.as_str()]);
            p.set_grad(Some(Tensor::from_vec(g, p.shape().clone())));
        }
        opt.step();
        if let Some(s) = &mut sched {
            match step.get("metric") {
                Some(m) => s.step_with_metric(m.as_f64().unwrap()),
                None => s.step(),
            }
        }
        for (n, p) in &params {
            let want = f32s(&step["params"][n.as_str()]);
            let got = p.to_vec::<f32>();
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            worst = worst.max(diff);
            assert!(
                diff <= TOL,
                "{name} step {k} param {n}: max diff {diff:e}\n  kiln  {got:?}\n  torch {want:?}"
            );
        }
    }
    worst
}

#[test]
fn optimizers_and_schedulers_match_pytorch() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("fixtures: run scripts/make_optim_fixtures.py")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 26,
        "expected the full fixture set, found {}",
        files.len()
    );
    let mut overall = 0f32;
    for path in &files {
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(fx["steps"].as_array().unwrap().len(), 20, "{name}");
        let straight = replay(&name, &fx, false);
        let resumed = replay(&name, &fx, true);
        println!("{name:40} max |kiln - torch| = {straight:.2e} (resumed: {resumed:.2e})");
        overall = overall.max(straight).max(resumed);
    }
    println!("{} fixtures, worst difference {overall:.2e}", files.len());
}
