//! Fine-tune all-MiniLM-L6-v2 as a sentiment classifier from Rust: the README's worked example.
//!
//! `cargo run --release --example finetune -- [ROWS]` (default: 2000 training rows, one epoch,
//! LLRD 0.9). The files come from `scripts/fetch_models.sh minilm` and
//! `scripts/fetch_data.sh rotten-tomatoes` (run automatically when missing).

use kiln::prelude::*;
use kiln::tune::predict;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: usize = std::env::args().nth(1).map_or(Ok(2000), |s| s.parse())?;
    let dir = kiln::models::checkpoint::minilm_dir()?;
    let csv = kiln::data::datasets::rotten_tomatoes()?;

    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
    let data = TextDataset::from_file(&csv, &Columns::new("text", "label"))?;
    let (train, valid) = data.split(0.2, 0)?;
    let train = train.take(rows);
    let (model, _) = BertForSequenceClassification::from_pretrained_with(
        &dir,
        &LoadOptions::default().labels(train.classes().to_vec()),
    )?;

    let report = Trainer::new(TrainConfig {
        epochs: 1,
        lr: 5e-5,
        ..Default::default()
    })
    .strategy(Strategy::full().llrd(0.9))
    .fit(&model, &tokenizer, &train, Some(&valid))?;
    println!("validation: {:?}", report.best.map(|b| b.metrics));

    model.save_pretrained("out/sentiment-rust")?; // loads in transformers
    for p in predict(
        &model,
        &tokenizer,
        &["a moving, beautifully made film"],
        8,
        128,
    )? {
        println!("{} ({:.3})", p.label, p.score);
    }
    Ok(())
}
