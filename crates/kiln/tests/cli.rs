//! The `kiln` binary end to end on the real checkpoints (fetched by scripts/fetch_models.sh
//! when missing): generate answers "Paris", embed writes unit vectors, inspect describes the
//! files, and bad input is a one-line error with a non-zero exit code.

use kiln::models::checkpoint::{fetch_model, minilm_dir};
use std::process::{Command, Output};

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run the kiln binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn gguf() -> String {
    fetch_model("smollm2", "smollm2", &[GGUF])
        .unwrap()
        .join(GGUF)
        .display()
        .to_string()
}

#[test]
fn generate_continues_with_paris_and_reports_speed() {
    let model = gguf();
    for weights in ["q8", "f32"] {
        let out = kiln(&[
            "generate",
            "--model",
            &model,
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "3",
            "--weights",
            weights,
        ]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{weights}: {stderr}");
        assert!(
            stdout.starts_with("The capital of France is Paris"),
            "{weights}: {stdout:?}"
        );
        assert!(
            stderr.contains("tokens/s") && stderr.contains("3 new tokens"),
            "{stderr}"
        );
    }
}

#[test]
fn chat_mode_uses_the_template_and_stops_at_the_end_token() {
    let out = kiln(&[
        "generate",
        "--model",
        &gguf(),
        "--chat",
        "--prompt",
        "What is the capital of France? Answer in one word.",
        "--max-tokens",
        "16",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Paris"), "{}", text(&out.stdout));
}

#[test]
fn embed_writes_one_unit_vector_per_text() {
    let dir = minilm_dir().unwrap();
    let out = kiln(&[
        "embed",
        "--model",
        dir.to_str().unwrap(),
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<Vec<f64>> = text(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 3);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for r in &rows {
        assert_eq!(r.len(), 384);
        assert!((dot(r, r) - 1.0).abs() < 1e-4);
    }
    // The two sentences about eating are closer to each other than to the third.
    assert!(dot(&rows[0], &rows[1]) > dot(&rows[0], &rows[2]) + 0.2);
}

#[test]
fn embed_equals_sentence_transformers() {
    // The committed fixture of scripts/make_bert_fixtures.py: sentence-transformers' embeddings.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../kiln-models/tests/fixtures/minilm.json"
    );
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let sentences: Vec<&str> = fx["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .map(|s| s.as_str().unwrap())
        .collect();
    let expected: Vec<f64> = fx["sentence_embeddings"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let dir = minilm_dir().unwrap();
    let mut args = vec!["embed", "--model", dir.to_str().unwrap()];
    args.extend(&sentences);
    let out = kiln(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: Vec<f64> = text(&out.stdout)
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(got.len(), 3 * 384);
    let diff = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        diff < 1e-4,
        "max abs diff {diff} against sentence-transformers"
    );
}

#[test]
fn inspect_describes_gguf_and_safetensors() {
    let out = kiln(&["inspect", &gguf()]);
    let s = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(s.contains("GGUF v3, 272 tensors"), "{s}");
    assert!(
        s.contains("general.architecture") && s.contains("blk.0.attn_q.weight"),
        "{s}"
    );
    let st = minilm_dir().unwrap().join("model.safetensors");
    let out = kiln(&["inspect", st.to_str().unwrap()]);
    let s = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(s.contains("safetensors, 104 tensors"), "{s}");
    assert!(s.contains("embeddings.word_embeddings.weight"), "{s}");
    let pt = format!(
        "{}/../kiln-io/tests/fixtures/torch/types_zip.pt",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = kiln(&["inspect", &pt]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("PyTorch checkpoint"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn bad_input_is_an_error_naming_the_problem() {
    let out = kiln(&["inspect", "/nonexistent/model.gguf"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("kiln: error: /nonexistent/model.gguf"),
        "{}",
        text(&out.stderr)
    );
    let out = kiln(&[
        "generate",
        "--model",
        &gguf(),
        "--prompt",
        "x",
        "--top-p",
        "2",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("top_p must be in (0, 1]"),
        "{}",
        text(&out.stderr)
    );
    let out = kiln(&["generate", "--model", &gguf()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--prompt"),
        "{}",
        text(&out.stderr)
    );
    let dir = std::env::temp_dir();
    let out = kiln(&["embed", "--model", dir.to_str().unwrap(), "x"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("tokenizer.json"),
        "{}",
        text(&out.stderr)
    );
}
