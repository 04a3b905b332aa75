//! LoRA parity with Hugging Face PEFT: fixtures from `scripts/make_lora_fixtures.py` (a tiny
//! random BertForSequenceClassification, its PEFT LoRA adapter with a trained classifier, inputs
//! and PEFT's logits). kiln loads the base with `from_pretrained`, the adapter with
//! `load_adapter`, and must give PEFT's logits; merging must not change them; unmerging must
//! restore the base weights; an adapter saved by kiln must hold the same keys and values.
//!
//! Set `KILN_LORA_EXPORT_DIR=<dir>` to keep the adapter kiln saves (plus `check.json`) for
//! `scripts/check_peft_adapter.py`, which loads it with `peft.PeftModel.from_pretrained`.

use kiln_core::{DType, Tensor};
use kiln_models::BertForSequenceClassification;
use kiln_nn::{ModuleExt, StateDict};
use kiln_tune::lora::{
    apply_lora, load_adapter, lora_layers, merge_lora, save_adapter, unmerge_lora, LoraConfig,
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE,
};
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora")
}

struct Inputs {
    ids: Tensor,
    mask: Tensor,
    types: Tensor,
    logits: Tensor,
    base_logits: Tensor,
    json: Value,
}

fn ints(v: &Value) -> Tensor {
    let rows = v.as_array().unwrap();
    let data: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect();
    let cols = data.len() / rows.len();
    Tensor::from_vec(data, [rows.len(), cols])
}

fn floats(v: &Value) -> Tensor {
    let rows = v.as_array().unwrap();
    let data: Vec<f32> = rows
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    let cols = data.len() / rows.len();
    Tensor::from_vec(data, [rows.len(), cols])
}

fn inputs() -> Inputs {
    let text = std::fs::read_to_string(fixtures().join("inputs.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    Inputs {
        ids: ints(&json["input_ids"]),
        mask: ints(&json["attention_mask"]),
        types: ints(&json["token_type_ids"]),
        logits: floats(&json["logits"]),
        base_logits: floats(&json["base_logits"]),
        json,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    a.to_dtype(DType::F64)
        .to_vec::<f64>()
        .iter()
        .zip(b.to_dtype(DType::F64).to_vec::<f64>())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn base() -> BertForSequenceClassification {
    BertForSequenceClassification::from_pretrained(fixtures().join("base")).unwrap()
}

fn logits(m: &BertForSequenceClassification, x: &Inputs) -> Tensor {
    m.forward(&x.ids, Some(&x.mask), Some(&x.types))
}

#[test]
fn peft_adapter_loads_with_peft_logits_merges_and_unmerges() {
    let x = inputs();
    let model = base();
    model.eval();
    let d = max_diff(&logits(&model, &x), &x.base_logits);
    println!("base logits max diff vs transformers: {d:.3e}");
    assert!(d <= 1e-5, "{d}");

    let config = load_adapter(&model, fixtures().join("adapter")).unwrap();
    assert_eq!((config.r, config.alpha, config.dropout), (4, 8.0, 0.1));
    let mut targets = config.target_modules.clone();
    targets.sort();
    assert_eq!(targets, ["query", "value"]);
    assert!(config.modules_to_save.contains(&"classifier".to_string()));
    // The adapters were attached to an eval-mode model: their dropout is off.
    assert_eq!(lora_layers(&model).len(), 4);

    let adapted = logits(&model, &x);
    let d = max_diff(&adapted, &x.logits);
    println!("PEFT adapter logits max diff vs peft: {d:.3e}");
    assert!(d <= 1e-5, "{d}");
    assert!(max_diff(&adapted, &x.base_logits) > 1e-2);
    // Only the adapters and the classifier train.
    let trainable: Vec<String> = model
        .named_parameters()
        .into_iter()
        .filter(|(_, p)| p.is_trainable())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(trainable.len(), 4 * 2 + 2, "{trainable:?}");
    assert!(trainable
        .iter()
        .all(|n| n.contains(".lora_") || n.starts_with("classifier.")));

    let fresh = base();
    let q0 = &fresh.bert.encoder.layer[0]
        .attention
        .self_attention
        .query
        .weight;
    let q = &model.bert.encoder.layer[0]
        .attention
        .self_attention
        .query
        .weight;
    assert_eq!(merge_lora(&model).unwrap(), 4);
    assert!(max_diff(q, q0) > 1e-3);
    let d = max_diff(&logits(&model, &x), &x.logits);
    println!("merged logits max diff vs peft: {d:.3e}");
    assert!(d <= 1e-5, "{d}");
    unmerge_lora(&model).unwrap();
    let d = max_diff(q, q0);
    println!("unmerged weight max diff vs base: {d:.3e}");
    assert!(d <= 1e-6, "{d}");
    assert!(max_diff(&logits(&model, &x), &x.logits) <= 1e-5);
}

#[test]
fn kiln_saved_adapter_matches_peft_layout_and_reloads() {
    let x = inputs();
    let model = base();
    model.eval();
    let config = load_adapter(&model, fixtures().join("adapter")).unwrap();
    let expect = logits(&model, &x);

    let keep = std::env::var_os("KILN_LORA_EXPORT_DIR").map(PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("kiln-lora-peft-{}", std::process::id()))
    });
    let base_dir = fixtures().join("base").canonicalize().unwrap();
    save_adapter(
        &model,
        &config,
        &dir,
        Some(base_dir.to_str().unwrap()),
        Some("SEQ_CLS"),
    )
    .unwrap();

    // Same keys and values as PEFT's own file.
    let theirs =
        kiln_nn::safetensors_io::load(&fixtures().join("adapter").join(ADAPTER_WEIGHTS_FILE))
            .unwrap();
    let ours = kiln_nn::safetensors_io::load(&dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    let keys = |sd: &StateDict| sd.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>();
    assert_eq!(keys(&ours), keys(&theirs));
    assert!(keys(&ours).contains(&"base_model.model.classifier.weight".to_string()));
    assert!(keys(&ours).contains(
        &"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight".to_string()
    ));
    for (k, t) in theirs.iter() {
        assert_eq!(max_diff(ours.get(k).unwrap(), t), 0.0, "{k}");
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).unwrap())
            .unwrap();
    let peft: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("adapter").join(ADAPTER_CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    for key in [
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "bias",
        "task_type",
        "fan_in_fan_out",
    ] {
        assert_eq!(cfg[key], peft[key], "{key}");
    }

    // Reloads into a fresh base with identical logits.
    let again = base();
    again.eval();
    let c2 = load_adapter(&again, &dir).unwrap();
    assert_eq!(c2.r, config.r);
    assert_eq!(max_diff(&logits(&again, &x), &expect), 0.0);

    if keep.is_some() {
        let mut check = x.json.clone();
        check["logits"] = serde_json::json!(expect
            .to_vec::<f32>()
            .chunks(expect.dims()[1])
            .map(|r| r.to_vec())
            .collect::<Vec<_>>());
        std::fs::write(dir.join("check.json"), check.to_string()).unwrap();
        println!("kept {}", dir.display());
    } else {
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn lora_on_bert_trains_adapters_and_head_only() {
    let x = inputs();
    let model = base();
    let report = apply_lora(
        &model,
        &LoraConfig::default()
            .r(2)
            .alpha(4.0)
            .dropout(0.1)
            .target_modules(["query", "value"])
            .modules_to_save(["classifier"]),
    )
    .unwrap();
    assert_eq!(report.adapted.len(), 4);
    assert_eq!(
        report.adapted[0],
        "bert.encoder.layer.0.attention.self.query"
    );
    assert_eq!(
        report.saved_parameters,
        ["classifier.weight", "classifier.bias"]
    );
    // Training mode: adapters' dropout is active; lora_B = 0 so logits equal the base's
    // (up to the model's own dropout, off in eval).
    model.eval();
    assert!(max_diff(&logits(&model, &x), &x.base_logits) <= 1e-5);
    model.train();
    logits(&model, &x).sum_all().backward();
    for (n, p) in model.named_parameters() {
        let trains = n.contains(".lora_") || n.starts_with("classifier.");
        assert_eq!(p.is_trainable(), trains, "{n}");
        if !trains {
            assert!(p.grad().is_none(), "{n}");
        }
    }
    for (_, l) in lora_layers(&model) {
        assert!(l
            .lora_b()
            .grad()
            .unwrap()
            .to_vec::<f32>()
            .iter()
            .any(|v| *v != 0.0));
    }
    let err = apply_lora(&model, &LoraConfig::default().target_modules(["q_proj"]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`q_proj` matches no Linear layer") && err.contains("bert.encoder.layer.0"),
        "{err}"
    );
}
