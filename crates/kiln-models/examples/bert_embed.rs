//! Loads all-MiniLM-L6-v2, embeds token ids (as the HF tokenizer gives them) and times one
//! forward at batch 32 × 128 tokens and 1 × 16 tokens.
//!
//! With a directory argument it also saves a 3-label BertForSequenceClassification built from
//! MiniLM there (`save_pretrained`), e.g. to check that `transformers` loads it.
//!
//! Run: `cargo run --release -p kiln-models --example bert_embed [-- SAVE_DIR]`

use kiln_core::{no_grad, Rng, Tensor};
use kiln_models::checkpoint::minilm_dir;
use kiln_models::{BertForSequenceClassification, BertModel, LoadOptions};
use kiln_nn::ModuleExt;
use std::time::Instant;

fn random_ids(b: usize, l: usize, rng: &mut Rng) -> Tensor {
    // [CLS] … [SEP] around random word pieces from the vocabulary's regular range.
    let mut ids = Vec::with_capacity(b * l);
    for _ in 0..b {
        ids.push(101i64);
        ids.extend((1..l - 1).map(|_| 1000 + rng.below(28000) as i64));
        ids.push(102);
    }
    Tensor::from_vec(ids, [b, l])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = minilm_dir()?;
    let model = BertModel::from_pretrained(&dir)?;
    model.eval();
    let _guard = no_grad();
    // "Hello world" as the HF tokenizer encodes it.
    let ids = Tensor::from_slice(&[101i64, 7592, 2088, 102], [1, 4]);
    let e = model.sentence_embeddings(&ids, None, None);
    println!(
        "embedding of \"Hello world\": {:?} (first 4 of {})",
        &e.to_vec::<f32>()[..4],
        e.dims()[1]
    );
    let mut rng = Rng::new(0);
    for (b, l) in [(32, 128), (1, 16)] {
        let ids = random_ids(b, l, &mut rng);
        let mask = Tensor::ones([b, l]);
        model.forward(&ids, Some(&mask), None); // warm-up
        let t = Instant::now();
        let out = model.forward(&ids, Some(&mask), None);
        let dt = t.elapsed();
        println!(
            "forward [{b}, {l}] -> {:?}: {:.2} ms",
            out.last_hidden_state.dims(),
            dt.as_secs_f64() * 1e3
        );
    }
    if let Some(out) = std::env::args().nth(1) {
        let opts = LoadOptions::default().num_labels(3);
        let (clf, report) = BertForSequenceClassification::from_pretrained_with(&dir, &opts)?;
        println!("classifier: freshly initialised {:?}", report.missing);
        clf.save_pretrained(&out)?;
        println!("saved to {out}");
    }
    Ok(())
}
