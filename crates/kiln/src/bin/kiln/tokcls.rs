//! `kiln finetune --task token-classification`, and `kiln eval` / `kiln predict` on a saved
//! token classifier.

use super::tune::{get, required_path};
use super::Error;
use clap::{Arg, ArgAction, ArgMatches, Command};
use kiln::tune::token_classification::{
    evaluate_tokens, is_token_task, load_token_classifier, predict_tags, read_tagged, split_words,
    TagColumns, TagDataSpec, TagFormat, TaggedDataset, TokenClassData, TokenRecipe,
};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The flags of tagged data, for `finetune`, `eval` and `predict`.
pub fn token_args(cmd: Command) -> Command {
    cmd.arg(
        Arg::new("format")
            .long("format")
            .value_parser(["jsonl", "conll", "slash"])
            .help("token classification: jsonl (lists of words and tags), conll (word and tag per line, blank line between sentences) or slash (word/tag items, one sentence per line); default from the extension"),
    )
    .arg(
        Arg::new("tokens")
            .long("tokens")
            .help("token classification: JSONL field with the words (default: tokens)"),
    )
    .arg(
        Arg::new("tags")
            .long("tags")
            .help("token classification: JSONL field with the tags (default: tags)"),
    )
}

/// The finetune-only flags of token classification.
pub fn finetune_args(cmd: Command) -> Command {
    token_args(cmd)
        .arg(
            Arg::new("label-all-tokens")
                .long("label-all-tokens")
                .action(ArgAction::SetTrue)
                .help("token classification: label every sub-token of a word (B- becomes I-), not only the first"),
        )
        .arg(
            Arg::new("label-names")
                .long("label-names")
                .num_args(1..)
                .help("token classification: tag names by id, for integer tags (e.g. O B-PER I-PER ...)"),
        )
}

fn given(m: &ArgMatches, name: &str) -> bool {
    m.try_contains_id(name).unwrap_or(false)
        && m.value_source(name) == Some(clap::parser::ValueSource::CommandLine)
}

/// Whether `kiln finetune` was asked for token classification: `--task token-classification`,
/// or a recipe whose `[data]` (or top level) says `task = "token-classification"`.
pub fn wants_tokens(m: &ArgMatches) -> Result<bool, Error> {
    if let Some(t) = get::<String>(m, "task") {
        return Ok(is_token_task(&t));
    }
    let Some(path) = get::<PathBuf>(m, "recipe") else {
        return Ok(false);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: invalid recipe: {e}", path.display()))?;
    let task = table
        .get("data")
        .and_then(|d| d.get("task"))
        .or_else(|| table.get("task"))
        .and_then(|v| v.as_str());
    Ok(task.is_some_and(is_token_task))
}

/// An error when a token-classification flag is given to another task.
pub fn reject_token_flags(m: &ArgMatches) -> Result<(), Error> {
    for flag in [
        "format",
        "tokens",
        "tags",
        "label-all-tokens",
        "label-names",
    ] {
        if given(m, flag) {
            return Err(format!("--{flag} is for --task token-classification").into());
        }
    }
    Ok(())
}

fn format_of(m: &ArgMatches, path: &Path) -> Result<TagFormat, Error> {
    Ok(match get::<String>(m, "format") {
        Some(f) => TagFormat::parse(&f)?,
        None => TagFormat::from_path(path)?,
    })
}

fn columns(m: &ArgMatches) -> TagColumns {
    let mut c = TagColumns::default();
    if let Some(v) = get::<String>(m, "tokens") {
        c.tokens = v;
    }
    if let Some(v) = get::<String>(m, "tags") {
        c.tags = v;
    }
    c
}

/// Runs `kiln finetune --task token-classification` (or a token-classification recipe).
pub fn run_finetune(
    m: &ArgMatches,
    apply_split: impl Fn(&mut TagDataSpec),
    apply_strategy: impl Fn(&mut toml::Table),
    apply_train: impl Fn(&mut kiln::tune::TrainConfig) -> Result<(), Error>,
) -> Result<(), Error> {
    for flag in [
        "text",
        "text-pair",
        "label",
        "pooling",
        "find-lr",
        "prompt-column",
        "response-column",
        "system",
        "sample",
        "sample-tokens",
    ] {
        if given(m, flag) {
            return Err(format!("--{flag} is not an option of token classification").into());
        }
    }
    let mut recipe = match get::<PathBuf>(m, "recipe") {
        Some(path) => TokenRecipe::from_toml_file(path)?,
        None => {
            let need = |name: &str| required_path(m, name);
            TokenRecipe::new(
                need("model")?,
                TagDataSpec::new(need("data")?),
                need("out")?,
            )
        }
    };
    if let Some(p) = get::<PathBuf>(m, "model") {
        recipe.model = p;
    }
    if let Some(p) = get::<PathBuf>(m, "out") {
        recipe.out = p;
    }
    let d = &mut recipe.data;
    apply_split(d);
    if let Some(f) = get::<String>(m, "format") {
        d.format = Some(TagFormat::parse(&f)?);
    }
    if let Some(v) = get::<String>(m, "tokens") {
        d.tokens = v;
    }
    if let Some(v) = get::<String>(m, "tags") {
        d.tags = v;
    }
    if m.get_flag("label-all-tokens") {
        d.label_all_tokens = true;
    }
    if let Some(v) = m.get_many::<String>("label-names") {
        d.label_names = Some(v.cloned().collect());
    }
    apply_strategy(&mut recipe.strategy);
    apply_train(&mut recipe.train)?;
    if m.get_flag("fresh") {
        let _ = std::fs::remove_dir_all(recipe.out.join("checkpoint"));
        let _ = std::fs::remove_file(recipe.out.join("metrics.jsonl"));
    }
    let strategy = recipe.strategy()?;
    eprintln!(
        "kiln finetune (token classification): {} on {} with {} → {}",
        recipe.model.display(),
        recipe.data.train.display(),
        strategy.describe(),
        recipe.out.display()
    );
    let report = recipe.run()?;
    let (trainable, total) = report.train.trainable_params;
    eprintln!(
        "trained {} steps in {:.1} s ({} train / {} valid sentences; {trainable} of {total} parameters trained)",
        report.train.steps, report.train.seconds, report.rows.0, report.rows.1
    );
    let mut out = std::io::stdout().lock();
    for (k, v) in &report.valid {
        writeln!(out, "validation {k}: {v:.4}")?;
    }
    writeln!(out, "tags: {}", report.labels.join(" "))?;
    writeln!(out, "saved to {}", report.out.display())?;
    Ok(())
}

/// Runs `kiln eval` on a token classifier: word accuracy, loss, entity P/R/F1 and the
/// per-type table.
pub fn run_eval(m: &ArgMatches, dir: &Path, data: &Path) -> Result<(), Error> {
    let (model, tokenizer) = load_token_classifier(dir)?;
    let labels = model.labels().to_vec();
    let ds = TaggedDataset::from_file_with_labels(data, format_of(m, data)?, &columns(m), &labels)?;
    let max_len = get(m, "max-length").unwrap_or(128);
    let batch = get(m, "batch-size").unwrap_or(64);
    let tokens = TokenClassData::tokenize(&ds, &tokenizer, max_len, false)?;
    let metrics = evaluate_tokens(&model, &tokens, batch)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "sentences: {} (words scored: {})",
        ds.len(),
        metrics.words()
    )?;
    for (k, v) in metrics.report() {
        writeln!(out, "{k}: {v:.4}")?;
    }
    if metrics.overall().is_some() {
        write!(out, "{}", metrics.table())?;
    } else {
        writeln!(
            out,
            "(the tags {labels:?} have no entity scheme: entity metrics skipped)"
        )?;
    }
    Ok(())
}

/// Runs `kiln predict` on a token classifier: one JSON line per sentence with its words and one
/// tag per word (raw texts are split into words by the tokenizer's pre-tokenizer, and their
/// words' character offsets are given too).
pub fn run_predict(m: &ArgMatches, dir: &Path) -> Result<(), Error> {
    let (model, tokenizer) = load_token_classifier(dir)?;
    let labels = model.labels().to_vec();
    let mut sentences: Vec<Vec<String>> = Vec::new();
    let mut offsets: Vec<Option<Vec<(usize, usize)>>> = Vec::new();
    for text in m.get_many::<String>("texts").into_iter().flatten() {
        if m.get_flag("words") {
            sentences.push(text.split_whitespace().map(str::to_string).collect());
            offsets.push(None);
        } else {
            let words = split_words(&tokenizer, text)?;
            sentences.push(words.iter().map(|(w, _)| w.clone()).collect());
            offsets.push(Some(words.iter().map(|(_, o)| *o).collect()));
        }
    }
    if let Some(path) = get::<PathBuf>(m, "data") {
        for s in read_tagged(&path, format_of(m, &path)?, &columns(m), false)? {
            sentences.push(s.words);
            offsets.push(None);
        }
    }
    if sentences.is_empty() {
        return Err("give texts to tag, or --data FILE".into());
    }
    let max_len = get(m, "max-length").unwrap_or(128);
    let batch: usize = get(m, "batch-size").unwrap_or(64);
    let with_logits = m.get_flag("logits");
    let mut out = std::io::stdout().lock();
    for (chunk, offs) in sentences.chunks(batch).zip(offsets.chunks(batch)) {
        let tagged = predict_tags(&model, &tokenizer, &labels, chunk, batch, max_len)?;
        for (words, off) in tagged.iter().zip(offs) {
            let mut row = serde_json::json!({
                "words": words.iter().map(|w| &w.word).collect::<Vec<_>>(),
                "tags": words.iter().map(|w| &w.tag).collect::<Vec<_>>(),
                "scores": words.iter().map(|w| w.score).collect::<Vec<_>>(),
            });
            if let Some(off) = off {
                row["offsets"] = serde_json::json!(off);
            }
            if with_logits {
                row["logits"] =
                    serde_json::json!(words.iter().map(|w| &w.logits).collect::<Vec<_>>());
            }
            writeln!(out, "{row}")?;
        }
    }
    Ok(())
}
