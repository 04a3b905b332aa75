//! `kiln finetune` killed with SIGKILL in the middle of an epoch and run again resumes from its
//! last checkpoint and saves exactly the model of an uninterrupted run (same seed): a tiny
//! random BERT classifier with the real MiniLM tokenizer, on a few hundred generated rows.

use kiln::core::Rng;
use kiln::models::checkpoint::minilm_dir;
use kiln::models::{BertConfig, BertForSequenceClassification};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A fresh directory under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-kill-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The base model: a 2-layer, 16-wide BERT with the MiniLM vocabulary, saved with the real
/// tokenizer.
fn base_model(dir: &Path) {
    let tokenizer = minilm_dir().unwrap().join("tokenizer.json");
    let config = BertConfig::small(30522, 16, 2, 2).labels(vec!["neg".into(), "pos".into()]);
    let model = BertForSequenceClassification::new(&config, &mut Rng::new(3));
    kiln::tune::save_classifier(&model, &tokenizer, dir).unwrap();
}

/// `rows` rows of `text,label`: the label says whether the sentence has a positive word.
fn write_csv(path: &Path, rows: usize) {
    let pos = ["good", "great", "wonderful", "moving", "brilliant"];
    let neg = ["bad", "awful", "dull", "boring", "terrible"];
    let fill = ["the film was", "a", "truly", "plot and acting", "overall"];
    let mut s = String::from("text,label\n");
    for i in 0..rows {
        let (word, label) = if i % 2 == 0 {
            (pos[(i / 2) % 5], "pos")
        } else {
            (neg[(i / 2) % 5], "neg")
        };
        s.push_str(&format!(
            "{} {word} {} number {i},{label}\n",
            fill[i % 5],
            fill[(i / 5) % 5]
        ));
    }
    std::fs::write(path, s).unwrap();
}

fn finetune(model: &Path, data: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["finetune", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--max-length",
            "16",
            "--save-every",
            "3",
            "--seed",
            "7",
            "--no-progress",
        ]);
    cmd
}

/// `(epoch, micro, step)` of the checkpoint in `out` (or of the `.old` one a kill mid-swap
/// leaves), when one is complete.
fn checkpoint_position(out: &Path) -> Option<(u64, u64, u64)> {
    ["checkpoint", "checkpoint.old"].iter().find_map(|d| {
        let text = std::fs::read_to_string(out.join(d).join("trainer_state.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some((
            v["epoch"].as_u64()?,
            v["micro"].as_u64()?,
            v["step"].as_u64()?,
        ))
    })
}

#[test]
fn a_sigkilled_finetune_resumes_to_the_same_model() {
    let root = temp_dir("root");
    let model = root.join("base");
    base_model(&model);
    let data = root.join("reviews.csv");
    // 400 rows, 320 for training: 40 steps per epoch, 80 in all.
    write_csv(&data, 400);

    let whole = root.join("whole");
    let out = finetune(&model, &data, &whole).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let resumed = root.join("resumed");
    let mut child = finetune(&model, &data, &resumed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a checkpoint in the middle of the first epoch, then SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((0, micro, step)) = checkpoint_position(&resumed) {
            if micro > 0 && step >= 6 {
                break;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before a mid-epoch checkpoint was seen"
        );
        assert!(Instant::now() < deadline, "no checkpoint after 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was killed, not finished");
    assert!(!resumed.join("model.safetensors").exists());
    let (epoch, micro, step) = checkpoint_position(&resumed).expect("a checkpoint survives");
    assert!(
        step < 80 && micro > 0,
        "not killed mid-epoch: epoch {epoch}, micro-batch {micro}, step {step}"
    );

    // The same command again resumes from that checkpoint and finishes.
    let out = finetune(&model, &data, &resumed).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("trained 80 steps"));
    let a = std::fs::read(whole.join("model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed model differs from the uninterrupted one"
    );
    // Not vacuous: training changed the base weights.
    let base = std::fs::read(model.join("model.safetensors")).unwrap();
    assert!(base != a);
    let _ = std::fs::remove_dir_all(&root);
}
