//! Parity of kiln's GPT-2 with transformers' `GPT2LMHeadModel` on the small random-initialised
//! checkpoint `scripts/make_gpt2_fixtures.py` wrote (tests/fixtures/gpt2), with prompts
//! tokenised by kiln's GPT-2 tokenizer from the real vocabulary (fetched with
//! `scripts/fetch_models.sh gpt2-vocab` when missing). Max abs diff ≤ 1e-4.

use kiln_core::{DType, Tensor};
use kiln_data::Tokenizer;
use kiln_models::checkpoint::{fetch_model, load_safetensors};
use kiln_models::{generate, CausalLm, GPT2LMHeadModel, GenerationConfig};
use kiln_nn::{ModuleExt, StateDict};
use std::path::PathBuf;

const TOL: f64 = 1e-4;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2")
}

fn vocab_dir() -> PathBuf {
    fetch_model("gpt2-vocab", "gpt2-vocab", &["encoder.json", "vocab.bpe"])
        .unwrap_or_else(|e| panic!("GPT-2 vocabulary: {e}"))
}

fn tokenizer() -> Tokenizer {
    let dir = vocab_dir();
    Tokenizer::from_gpt2_files(dir.join("encoder.json"), dir.join("vocab.bpe")).unwrap()
}

fn reference() -> StateDict {
    load_safetensors(&fixture_dir().join("reference.safetensors")).unwrap()
}

fn prompts() -> Vec<String> {
    let text = std::fs::read_to_string(fixture_dir().join("prompts.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn model() -> GPT2LMHeadModel {
    let m = GPT2LMHeadModel::from_pretrained(fixture_dir()).unwrap();
    m.eval();
    m
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.to_vec::<i64>()
}

/// The prompts' ids from kiln's tokenizer, checked against transformers' ids.
fn prompt_ids(reference: &StateDict) -> Vec<Vec<i64>> {
    let tok = tokenizer();
    prompts()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ids: Vec<i64> = tok
                .encode(p, true)
                .unwrap()
                .ids
                .iter()
                .map(|&t| t as i64)
                .collect();
            let want = i64s(reference.get(&format!("ids_{i}")).unwrap());
            assert_eq!(ids, want, "prompt {i} {p:?}: token ids differ");
            ids
        })
        .collect()
}

fn row(ids: &[i64]) -> Tensor {
    Tensor::from_slice(ids, [1, ids.len()])
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

#[test]
fn tokens_and_logits_match_transformers() {
    let reference = reference();
    let model = model();
    let v = model.config().vocab_size;
    let sampled = i64s(reference.get("sampled_ids").unwrap());
    for (i, ids) in prompt_ids(&reference).iter().enumerate() {
        let l = ids.len();
        let logits = model.forward(&row(ids), None);
        assert_eq!(logits.dims(), &[1, l, v]);
        let all = logits.to_vec::<f32>();
        let picked: Vec<f32> = (0..l)
            .flat_map(|p| sampled.iter().map(move |&s| (p, s)))
            .map(|(p, s)| all[p * v + s as usize])
            .collect();
        let want = reference.get(&format!("logits_{i}")).unwrap();
        let d_sampled = max_abs_diff(&picked, &want.to_vec::<f32>());
        let want_last = reference.get(&format!("last_logits_{i}")).unwrap();
        let d_last = max_abs_diff(&all[(l - 1) * v..], &want_last.to_vec::<f32>());
        println!("prompt {i} ({l} tokens): max |Δ| sampled {d_sampled:.2e}, last {d_last:.2e}");
        assert!(
            d_sampled <= TOL,
            "prompt {i}: sampled logits differ by {d_sampled}"
        );
        assert!(d_last <= TOL, "prompt {i}: last logits differ by {d_last}");
    }
}

#[test]
fn greedy_generation_with_the_cache_matches_transformers() {
    let reference = reference();
    let model = model();
    for (i, ids) in prompt_ids(&reference).iter().enumerate() {
        let prompt: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
        let mut streamed = 0;
        let g = generate(&model, &prompt, &GenerationConfig::greedy(12), |_| {
            streamed += 1;
            true
        })
        .unwrap();
        let got: Vec<i64> = g.tokens.iter().map(|&t| t as i64).collect();
        assert_eq!(got, i64s(reference.get(&format!("greedy_{i}")).unwrap()));
        assert_eq!(streamed, 12);
    }
}

#[test]
fn the_cache_gives_the_full_forwards_logits() {
    let reference = reference();
    let model = model();
    let ids = &prompt_ids(&reference)[2];
    let l = ids.len();
    let v = model.config().vocab_size;
    let full = model.forward(&row(ids), None).to_vec::<f32>();
    // A prefix of 10, single tokens, then a chunk of 4 (multi-token step after a past), rest.
    let mut cache = model.new_cache();
    let mut start = 0;
    let mut steps = vec![10, 1, 1, 1, 4];
    steps.push(l - steps.iter().sum::<usize>());
    for n in steps {
        let logits = model.forward_with_cache(&row(&ids[start..start + n]), None, &mut cache);
        assert_eq!(logits.dims(), &[1, n, v]);
        let d = max_abs_diff(&logits.to_vec::<f32>(), &full[start * v..(start + n) * v]);
        assert!(
            d <= 1e-5,
            "positions {start}..{}: cached logits differ by {d}",
            start + n
        );
        start += n;
        assert_eq!(cache.len(), start);
    }
    // next_logits (CausalLm) is the last position's row.
    let mut cache = model.new_cache();
    let u: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
    let last = model.next_logits(&u, &mut cache);
    assert!(max_abs_diff(&last, &full[(l - 1) * v..]) <= 1e-5);
    assert_eq!(cache.len(), l);
}

#[test]
fn left_padded_batches_give_each_rows_own_logits_also_with_the_cache() {
    let reference = reference();
    let model = model();
    let all_ids = prompt_ids(&reference);
    let rows = [&all_ids[0], &all_ids[1]];
    let len = rows.iter().map(|r| r.len()).max().unwrap();
    let v = model.config().vocab_size;
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for r in rows {
        let pad = len - r.len();
        ids.extend(std::iter::repeat_n(50256i64, pad).chain(r.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, r.len())));
    }
    let ids = Tensor::from_vec(ids, [2, len]);
    let mask = Tensor::from_vec(mask, [2, len]);
    let mut cache = model.new_cache();
    let batch = model
        .forward_with_cache(&ids, Some(&mask), &mut cache)
        .to_vec::<f32>();
    let uncached = model.forward(&ids, Some(&mask)).to_vec::<f32>();
    assert!(max_abs_diff(&batch, &uncached) <= 1e-6);
    // One more token per row through the cache (no mask: both real).
    let next = [464i64, 318];
    let step = model
        .forward_with_cache(&Tensor::from_slice(&next, [2, 1]), None, &mut cache)
        .to_vec::<f32>();
    for (b, r) in rows.iter().enumerate() {
        let pad = len - r.len();
        let mut longer = r.to_vec();
        longer.push(next[b]);
        let alone = model.forward(&row(&longer), None).to_vec::<f32>();
        let got = &batch[(b * len + pad) * v..(b + 1) * len * v];
        let d = max_abs_diff(got, &alone[..r.len() * v]);
        assert!(d <= 1e-5, "row {b}: padded logits differ by {d}");
        let d = max_abs_diff(&step[b * v..(b + 1) * v], &alone[r.len() * v..]);
        assert!(
            d <= 1e-5,
            "row {b}: cached step after padding differs by {d}"
        );
    }
}

#[test]
fn save_pretrained_round_trips_in_hf_layout() {
    let mut model = model();
    let vocab = vocab_dir();
    model.set_tokenizer_files(vocab.join("encoder.json"), vocab.join("vocab.bpe"));
    let dir = std::env::temp_dir().join(format!("kiln-gpt2-save-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    model.save_pretrained(&dir).unwrap();
    // The file holds exactly the fixture checkpoint's tensors (HF names, Conv1D [in, out]).
    let saved = load_safetensors(&dir.join("model.safetensors")).unwrap();
    let original = load_safetensors(&fixture_dir().join("model.safetensors")).unwrap();
    assert_eq!(saved.len(), original.len());
    for (k, t) in original.iter() {
        let s = saved.get(k).unwrap_or_else(|| panic!("{k} not saved"));
        assert_eq!(s.dims(), t.dims(), "{k}");
        assert_eq!(s.to_vec::<f32>(), t.to_vec::<f32>(), "{k}");
    }
    assert_eq!(
        std::fs::read(dir.join("vocab.json")).unwrap(),
        std::fs::read(vocab.join("encoder.json")).unwrap()
    );
    assert!(dir.join("merges.txt").is_file());
    let back = GPT2LMHeadModel::from_pretrained(&dir).unwrap();
    assert_eq!(back.config(), model.config());
    assert!(back.tokenizer_files().is_some());
    let ids0 = i64s(reference().get("ids_0").unwrap());
    let ids = row(&ids0);
    assert_eq!(
        back.forward(&ids, None).to_vec::<f32>(),
        model.forward(&ids, None).to_vec::<f32>()
    );
    // The saved tokenizer files load as a GPT-2 tokenizer.
    let tok = Tokenizer::from_gpt2_files(dir.join("vocab.json"), dir.join("merges.txt")).unwrap();
    let again: Vec<i64> = tok
        .encode(&prompts()[0], true)
        .unwrap()
        .ids
        .iter()
        .map(|&t| t as i64)
        .collect();
    assert_eq!(again, ids0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn backward_reaches_every_parameter() {
    let model = model();
    model.train();
    let ids = row(&[464, 3139, 286, 4881, 318]);
    let logits = model.forward(&ids, None);
    // Next-token negative log-likelihood on the sequence itself.
    let lp = logits.narrow(1, 0, 4).log_softmax(-1);
    let targets = Tensor::from_slice(&[3139i64, 286, 4881, 318], [1, 4, 1]);
    let loss = lp.gather(2, &targets).mean_all().neg();
    loss.backward();
    for (n, p) in model.named_parameters() {
        assert_eq!(p.dtype(), DType::F32);
        let g = p.grad().unwrap_or_else(|| panic!("{n} has no gradient"));
        assert_eq!(g.dims(), p.dims(), "{n}");
        assert!(
            g.to_f64_vec().iter().any(|v| *v != 0.0),
            "{n}: zero gradient"
        );
    }
}
