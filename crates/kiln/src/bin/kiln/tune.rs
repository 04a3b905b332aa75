//! `kiln finetune`, `kiln eval` and `kiln predict`.

use super::tokcls;
use super::Error;
use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use kiln::tune::causal::{CausalRecipe, InstructionSpec};
use kiln::tune::data::{Columns, TextDataset};
use kiln::tune::{
    evaluate, is_regression_model, load_classifier, predict, predict_values, DataSpec, Metric,
    Recipe, Schedule, TaskKind, TrainConfig,
};
use std::io::Write;
use std::path::PathBuf;

fn path_arg(name: &'static str, help: &'static str) -> Arg {
    Arg::new(name)
        .long(name)
        .value_parser(value_parser!(PathBuf))
        .help(help)
}

fn num<T: Clone + Send + Sync + std::str::FromStr + 'static>(
    name: &'static str,
    help: &'static str,
) -> Arg
where
    <T as std::str::FromStr>::Err: std::error::Error + Send + Sync + 'static,
{
    Arg::new(name)
        .long(name)
        .value_parser(clap::builder::ValueParser::new(|s: &str| s.parse::<T>()))
        .help(help)
}

fn columns_args(cmd: Command) -> Command {
    cmd.arg(
        Arg::new("text")
            .long("text")
            .help("text column (default: text)"),
    )
    .arg(
        Arg::new("text-pair")
            .long("text-pair")
            .help("second text column, for sentence pairs"),
    )
    .arg(
        Arg::new("label")
            .long("label")
            .help("label column (default: label)"),
    )
}

/// The `finetune` command.
pub fn finetune_command() -> Command {
    let cmd = Command::new("finetune")
        .about("Fine-tune a pretrained model on a CSV/TSV/JSONL file: a BERT-family text classifier, or (--task causal-lm) a Llama-family chat model on prompt/response pairs")
        .arg(path_arg("recipe", "a recipe.toml with every option (flags given too override it)"))
        .arg(
            Arg::new("task")
                .long("task")
                .value_parser(["auto", "classification", "regression", "causal-lm", "token-classification"])
                .help("classification, regression (one output, MSE loss), causal-lm (instruction tuning of a chat model, loss on the responses; a recipe says task = \"causal_lm\"), token-classification (one tag per word: NER, chunking, segmentation; a recipe says [data] task = \"token-classification\"), or auto (default): classification, or regression when the labels are numbers, not all integers"),
        )
        .arg(path_arg("model", "pretrained model directory (config.json, model.safetensors, tokenizer.json); with --task causal-lm also a .gguf file (dequantised)"))
        .arg(path_arg("data", "training rows: .csv, .tsv or .jsonl with a header / fields (token classification: also .conll or word/tag text)").alias("train"))
        .arg(path_arg("valid", "validation rows (default: hold out --valid-ratio of --data)"))
        .arg(num::<f64>("valid-ratio", "fraction of --data held out for validation (default 0.2)"))
        .arg(num::<u64>("split-seed", "seed of the train/validation split (default 0)"))
        .arg(num::<usize>("limit", "train on only the first N training rows"))
        .arg(path_arg("out", "directory for the fine-tuned model, metrics.jsonl and curves.png"))
        .arg(
            Arg::new("pooling")
                .long("pooling")
                .value_parser(["cls", "mean"])
                .help("what the classification head reads: the [CLS] position (default) or the mean over tokens"),
        )
        .arg(
            Arg::new("strategy")
                .long("strategy")
                .help("full, linear_probe, bitfit, lora, or a registered method (default full)"),
        )
        .arg(num::<i64>("rank", "LoRA rank r (with --strategy lora)"))
        .arg(num::<f64>("alpha", "LoRA alpha (with --strategy lora)"))
        .arg(
            Arg::new("targets")
                .long("targets")
                .num_args(1..)
                .help("LoRA target modules (default: query value)"),
        )
        .arg(num::<f64>("llrd", "layer-wise learning-rate decay factor, e.g. 0.9"))
        .arg(num::<i64>("unfreeze-every", "gradual unfreezing: one more layer group every N epochs"))
        .arg(
            num::<i64>(
                "unfreeze-every-steps",
                "gradual unfreezing: one more layer group every N optimizer steps",
            )
            .conflicts_with("unfreeze-every"),
        )
        .arg(
            Arg::new("freeze")
                .long("freeze")
                .action(ArgAction::Append)
                .help("glob of parameter names to keep frozen (repeatable)"),
        )
        .arg(num::<usize>("epochs", "passes over the training data (default 3)"))
        .arg(num::<usize>("max-steps", "stop after this many optimizer steps"))
        .arg(num::<usize>("batch-size", "rows per micro-batch (default 32)"))
        .arg(num::<usize>("grad-accum", "micro-batches per optimizer step (default 1)"))
        .arg(num::<f64>("lr", "peak learning rate (default 5e-5)"))
        .arg(num::<f64>("weight-decay", "AdamW weight decay (default 0.01)"))
        .arg(num::<f64>("warmup-ratio", "fraction of steps warming up (default 0.1)"))
        .arg(Arg::new("schedule").long("schedule").value_parser(["linear", "cosine", "constant", "one-cycle"]).help("lr after warmup: linear (default), cosine, constant, or one-cycle (OneCycleLR; --warmup-ratio is its pct_start)"))
        .arg(num::<usize>("max-length", "tokens per row after truncation (default 128)"))
        .arg(num::<u64>("seed", "seed of data order, dropout and new weights (default 42)"))
        .arg(num::<usize>("eval-every", "evaluate every N steps (default: each epoch)"))
        .arg(num::<usize>("early-stopping", "stop after N evaluations without improvement"))
        .arg(num::<usize>("save-every", "also checkpoint every N optimizer steps (default: each epoch end); a killed run resumes from the last one"))
        .arg(Arg::new("metric").long("metric").help("metric that picks the best model (default accuracy)"))
        .arg(
            Arg::new("prompt-column")
                .long("prompt-column")
                .help("causal-lm: prompt column (default: prompt)"),
        )
        .arg(
            Arg::new("response-column")
                .long("response-column")
                .help("causal-lm: response column (default: response)"),
        )
        .arg(Arg::new("system").long("system").help("causal-lm: system message before every prompt"))
        .arg(
            Arg::new("sample")
                .long("sample")
                .action(ArgAction::Append)
                .help("causal-lm: a prompt answered before and after training (repeatable; default: the first training prompt)"),
        )
        .arg(num::<usize>("sample-tokens", "causal-lm: most new tokens of those answers (default 48)"))
        .arg(
            Arg::new("no-progress")
                .long("no-progress")
                .action(ArgAction::SetTrue)
                .help("no progress bar"),
        )
        .arg(
            Arg::new("find-lr")
                .long("find-lr")
                .action(ArgAction::SetTrue)
                .help("run the LR range test (1e-7 to 10 over 100 steps), print the suggested lr and the table, write lr_finder.png to --out, and exit"),
        )
        .arg(
            Arg::new("fresh")
                .long("fresh")
                .action(ArgAction::SetTrue)
                .help("ignore a checkpoint left in --out by an interrupted run"),
        );
    tokcls::finetune_args(columns_args(cmd))
}

/// The `eval` command.
pub fn eval_command() -> Command {
    columns_args(
        Command::new("eval")
            .about("Metrics and confusion matrix of a fine-tuned classifier on a labelled file")
            .arg(path_arg("model", "a directory written by kiln finetune").required(true))
            .arg(path_arg("data", "labelled rows: .csv, .tsv or .jsonl").required(true))
            .arg(num::<usize>(
                "max-length",
                "tokens per row after truncation (default 128)",
            ))
            .arg(num::<usize>("batch-size", "rows per batch (default 64)")),
    )
    .pipe(tokcls::token_args)
}

/// The `predict` command.
pub fn predict_command() -> Command {
    Command::new("predict")
        .about("Labels and probabilities from a fine-tuned classifier (values from a regression model), one JSON line per text")
        .arg(path_arg("model", "a directory written by kiln finetune").required(true))
        .arg(Arg::new("texts").num_args(0..).help("texts to classify"))
        .arg(path_arg(
            "data",
            "classify the rows of a .csv/.tsv/.jsonl file instead",
        ))
        .arg(
            Arg::new("text")
                .long("text")
                .help("text column of --data (default: text)"),
        )
        .arg(num::<usize>(
            "max-length",
            "tokens per row after truncation (default 128)",
        ))
        .arg(num::<usize>("batch-size", "rows per batch (default 64)"))
        .arg(
            Arg::new("words")
                .long("words")
                .action(ArgAction::SetTrue)
                .help("token classification: each text is words separated by spaces (default: raw text, split into words by the tokenizer)"),
        )
        .arg(
            Arg::new("logits")
                .long("logits")
                .action(ArgAction::SetTrue)
                .help("token classification: also print each word's logits (its first sub-token's)"),
        )
        .pipe(tokcls::token_args)
}

/// `value.pipe(f)` = `f(value)`, to chain a builder through a function.
trait Pipe: Sized {
    fn pipe(self, f: impl FnOnce(Self) -> Self) -> Self {
        f(self)
    }
}

impl Pipe for Command {}

/// The value of flag `name`, when given or defaulted.
pub(crate) fn get<T: Clone + Send + Sync + 'static>(m: &ArgMatches, name: &str) -> Option<T> {
    m.get_one::<T>(name).cloned()
}

/// The path of flag `name`, which is required when no `--recipe` gives it.
pub(crate) fn required_path(m: &ArgMatches, name: &str) -> Result<PathBuf, Error> {
    get::<PathBuf>(m, name)
        .ok_or_else(|| format!("--{name} is required (or give everything in --recipe FILE)").into())
}

/// The task a recipe file declares (`task = "..."`), if any.
fn recipe_task(path: &PathBuf) -> Result<Option<String>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: invalid recipe: {e}", path.display()))?;
    Ok(table
        .get("task")
        .and_then(|v| v.as_str())
        .map(str::to_string))
}

/// The data flags both tasks share: training file, validation file or ratio, split seed, limit.
fn apply_split_flags(
    m: &ArgMatches,
    train: &mut PathBuf,
    valid: &mut Option<PathBuf>,
    valid_ratio: &mut f64,
    split_seed: &mut u64,
    limit: &mut Option<usize>,
) {
    if let Some(p) = get::<PathBuf>(m, "data") {
        *train = p;
    }
    if let Some(p) = get::<PathBuf>(m, "valid") {
        *valid = Some(p);
    }
    if let Some(v) = get(m, "valid-ratio") {
        *valid_ratio = v;
    }
    if let Some(v) = get(m, "split-seed") {
        *split_seed = v;
    }
    if let Some(v) = get(m, "limit") {
        *limit = Some(v);
    }
}

/// Runs `kiln finetune`.
pub fn run_finetune(m: &ArgMatches) -> Result<(), Error> {
    if tokcls::wants_tokens(m)? {
        return tokcls::run_finetune(
            m,
            |d| {
                apply_split_flags(
                    m,
                    &mut d.train,
                    &mut d.valid,
                    &mut d.valid_ratio,
                    &mut d.split_seed,
                    &mut d.limit,
                )
            },
            |s| apply_strategy_flags(m, s),
            |t| apply_train_flags(m, t),
        );
    }
    tokcls::reject_token_flags(m)?;
    let from_recipe = match get::<PathBuf>(m, "recipe") {
        Some(p) => recipe_task(&p)?,
        None => None,
    };
    let causal = match (get::<String>(m, "task").as_deref(), from_recipe.as_deref()) {
        (Some("causal-lm"), _) => true,
        (Some(_), _) => false,
        (None, Some(t)) => matches!(t, "causal_lm" | "causal-lm"),
        (None, None) => false,
    };
    if causal {
        return run_finetune_causal(m);
    }
    for flag in [
        "prompt-column",
        "response-column",
        "system",
        "sample",
        "sample-tokens",
    ] {
        if m.value_source(flag).is_some() {
            return Err(format!("--{flag} is for --task causal-lm").into());
        }
    }
    let mut recipe = match get::<PathBuf>(m, "recipe") {
        Some(path) => Recipe::from_toml_file(path)?,
        None => {
            let need = |name: &str| required_path(m, name);
            Recipe::new(need("model")?, DataSpec::new(need("data")?), need("out")?)
        }
    };
    if let Some(p) = get::<PathBuf>(m, "model") {
        recipe.model = p;
    }
    if let Some(p) = get::<PathBuf>(m, "out") {
        recipe.out = p;
    }
    if let Some(v) = get::<String>(m, "pooling") {
        recipe.pooling = kiln::models::ClassifierPooling::parse(&v);
    }
    let d = &mut recipe.data;
    apply_split_flags(
        m,
        &mut d.train,
        &mut d.valid,
        &mut d.valid_ratio,
        &mut d.split_seed,
        &mut d.limit,
    );
    if let Some(v) = get::<String>(m, "task") {
        d.task = TaskKind::parse(&v)?;
    }
    if let Some(v) = get::<String>(m, "text") {
        d.text = v;
    }
    if let Some(v) = get::<String>(m, "text-pair") {
        d.text_pair = Some(v);
    }
    if let Some(v) = get::<String>(m, "label") {
        d.label = v;
    }
    apply_strategy_flags(m, &mut recipe.strategy);
    apply_train_flags(m, &mut recipe.train)?;
    if m.get_flag("fresh") {
        let _ = std::fs::remove_dir_all(recipe.out.join("checkpoint"));
        let _ = std::fs::remove_file(recipe.out.join("metrics.jsonl"));
    }
    let strategy = recipe.strategy()?;
    if m.get_flag("find-lr") {
        eprintln!(
            "kiln finetune --find-lr: {} on {} with {}",
            recipe.model.display(),
            recipe.data.train.display(),
            strategy.describe()
        );
        let found = recipe.find_lr()?;
        let mut out = std::io::stdout().lock();
        write!(out, "{}", found.table())?;
        if found.diverged {
            writeln!(
                out,
                "the loss diverged at lr {:.3e}",
                found.lrs.last().copied().unwrap_or(f64::NAN)
            )?;
        }
        writeln!(out, "suggested lr: {:.3e}", found.suggestion)?;
        writeln!(out, "plot: {}", recipe.out.join("lr_finder.png").display())?;
        return Ok(());
    }
    eprintln!(
        "kiln finetune: {} on {} with {} → {}",
        recipe.model.display(),
        recipe.data.train.display(),
        strategy.describe(),
        recipe.out.display()
    );
    let report = recipe.run()?;
    let (trainable, total) = report.train.trainable_params;
    eprintln!(
        "trained {} steps in {:.1} s ({} train / {} valid rows; {trainable} of {total} parameters trained)",
        report.train.steps, report.train.seconds, report.rows.0, report.rows.1
    );
    let mut out = std::io::stdout().lock();
    for (k, v) in &report.valid {
        writeln!(out, "validation {k}: {v:.4}")?;
    }
    if !report.labels.is_empty() {
        writeln!(
            out,
            "{}",
            kiln::tune::metrics::confusion_table(&report.labels, &report.confusion)
        )?;
    }
    writeln!(out, "saved to {}", report.out.display())?;
    Ok(())
}

/// Runs `kiln finetune --task causal-lm` (or a recipe with `task = "causal_lm"`).
fn run_finetune_causal(m: &ArgMatches) -> Result<(), Error> {
    for flag in ["text", "text-pair", "label"] {
        if get::<String>(m, flag).is_some() {
            return Err(format!(
                "--{flag} is for classification; causal-lm reads --prompt-column and --response-column"
            )
            .into());
        }
    }
    for flag in ["pooling", "find-lr"] {
        if m.value_source(flag) == Some(clap::parser::ValueSource::CommandLine) {
            return Err(format!("--{flag} is for classification and regression").into());
        }
    }
    let mut recipe = match get::<PathBuf>(m, "recipe") {
        Some(path) => CausalRecipe::from_toml_file(path)?,
        None => {
            let need = |name: &str| required_path(m, name);
            CausalRecipe::new(
                need("model")?,
                InstructionSpec::new(need("data")?),
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
    apply_split_flags(
        m,
        &mut d.train,
        &mut d.valid,
        &mut d.valid_ratio,
        &mut d.split_seed,
        &mut d.limit,
    );
    if let Some(v) = get::<String>(m, "prompt-column") {
        d.prompt = v;
    }
    if let Some(v) = get::<String>(m, "response-column") {
        d.response = v;
    }
    if let Some(v) = get::<String>(m, "system") {
        d.system = Some(v);
    }
    if let Some(v) = m.get_many::<String>("sample") {
        recipe.samples = v.cloned().collect();
    }
    if let Some(v) = get(m, "sample-tokens") {
        recipe.sample_tokens = v;
    }
    // Another method than the recipe's drops the recipe's method arguments (LoRA's r, ...).
    if let Some(v) = get::<String>(m, "strategy") {
        let current = recipe.strategy.get("type").and_then(|t| t.as_str());
        if current != Some(v.as_str()) {
            recipe.strategy = toml::Table::new();
        }
    }
    apply_strategy_flags(m, &mut recipe.strategy);
    apply_train_flags(m, &mut recipe.train)?;
    if m.get_flag("fresh") {
        let _ = std::fs::remove_dir_all(recipe.out.join("checkpoint"));
        let _ = std::fs::remove_file(recipe.out.join("metrics.jsonl"));
    }
    let strategy = recipe.strategy()?;
    eprintln!(
        "kiln finetune (causal LM): {} on {} with {} → {}",
        recipe.model.display(),
        recipe.data.train.display(),
        strategy.describe(),
        recipe.out.display()
    );
    let report = recipe.run()?;
    let (trainable, total) = report.train.trainable_params;
    eprintln!(
        "trained {} steps in {:.1} s ({} train / {} valid rows; {trainable} of {total} parameters trained); last epoch loss {:.4}",
        report.train.steps, report.train.seconds, report.rows.0, report.rows.1, report.train.train_loss
    );
    let mut out = std::io::stdout().lock();
    for (k, v) in &report.valid {
        writeln!(out, "validation {k}: {v:.4}")?;
    }
    for s in &report.samples {
        writeln!(out, "prompt: {}", s.prompt)?;
        writeln!(out, "  before: {}", s.before)?;
        writeln!(out, "  after:  {}", s.after)?;
    }
    if let Some(a) = &report.adapter {
        writeln!(out, "adapter (PEFT layout) saved to {}", a.display())?;
    }
    writeln!(
        out,
        "merged model (Hugging Face layout) saved to {}",
        report.out.display()
    )?;
    Ok(())
}

/// The strategy flags, on top of a recipe's `[strategy]` table.
fn apply_strategy_flags(m: &ArgMatches, s: &mut toml::Table) {
    if let Some(v) = get::<String>(m, "strategy") {
        s.insert("type".into(), toml::Value::String(v));
    }
    if let Some(v) = get::<i64>(m, "rank") {
        s.insert("r".into(), toml::Value::Integer(v));
    }
    if let Some(v) = get::<f64>(m, "alpha") {
        s.insert("alpha".into(), toml::Value::Float(v));
    }
    if let Some(v) = m.get_many::<String>("targets") {
        let list = v.map(|t| toml::Value::String(t.clone())).collect();
        s.insert("target_modules".into(), toml::Value::Array(list));
    }
    if let Some(v) = get::<f64>(m, "llrd") {
        s.insert("llrd".into(), toml::Value::Float(v));
    }
    if let Some(v) = get::<i64>(m, "unfreeze-every") {
        s.insert("unfreeze_every".into(), toml::Value::Integer(v));
        s.remove("unfreeze_every_steps");
    }
    if let Some(v) = get::<i64>(m, "unfreeze-every-steps") {
        s.insert("unfreeze_every_steps".into(), toml::Value::Integer(v));
        s.remove("unfreeze_every");
    }
    if let Some(v) = m.get_many::<String>("freeze") {
        let list = v.map(|t| toml::Value::String(t.clone())).collect();
        s.insert("freeze".into(), toml::Value::Array(list));
    }
}

/// The training flags, on top of a recipe's `[train]` options.
fn apply_train_flags(m: &ArgMatches, t: &mut TrainConfig) -> Result<(), Error> {
    if let Some(v) = get(m, "epochs") {
        t.epochs = v;
    }
    if let Some(v) = get(m, "max-steps") {
        t.max_steps = Some(v);
    }
    if let Some(v) = get(m, "batch-size") {
        t.batch_size = v;
    }
    if let Some(v) = get(m, "grad-accum") {
        t.grad_accum = v;
    }
    if let Some(v) = get(m, "lr") {
        t.lr = v;
    }
    if let Some(v) = get(m, "weight-decay") {
        t.weight_decay = v;
    }
    if let Some(v) = get(m, "warmup-ratio") {
        t.warmup_ratio = v;
    }
    if let Some(v) = get::<String>(m, "schedule") {
        t.schedule = match v.as_str() {
            "cosine" => Schedule::Cosine,
            "constant" => Schedule::Constant,
            "one-cycle" => Schedule::OneCycle,
            _ => Schedule::Linear,
        };
    }
    if let Some(v) = get(m, "max-length") {
        t.max_length = v;
    }
    if let Some(v) = get(m, "seed") {
        t.seed = v;
    }
    if let Some(v) = get(m, "eval-every") {
        t.eval_every = Some(v);
    }
    if let Some(v) = get(m, "early-stopping") {
        t.early_stopping = Some(v);
    }
    if let Some(v) = get(m, "save-every") {
        t.checkpoint_every = Some(v);
    }
    if let Some(v) = get::<String>(m, "metric") {
        t.metric = Metric::parse(&v)?;
    }
    if m.get_flag("no-progress") {
        t.progress = false;
    }
    if m.get_flag("fresh") {
        t.resume = false;
    }
    Ok(())
}

/// Runs `kiln eval`.
pub fn run_eval(m: &ArgMatches) -> Result<(), Error> {
    let dir: PathBuf = get(m, "model").expect("required");
    let data: PathBuf = get(m, "data").expect("required");
    if kiln::tune::token_classification::is_token_classifier(&dir)? {
        return tokcls::run_eval(m, &dir, &data);
    }
    tokcls::reject_token_flags(m)?;
    let (model, tokenizer) = load_classifier(&dir)?;
    let mut cols = Columns::default();
    if let Some(v) = get::<String>(m, "text") {
        cols.text = v;
    }
    cols.text_pair = get::<String>(m, "text-pair");
    if let Some(v) = get::<String>(m, "label") {
        cols.label = v;
    }
    let labels = model.labels().to_vec();
    let regression = is_regression_model(&dir)?;
    let ds = if regression {
        TextDataset::from_file_regression(&data, &cols)?
    } else {
        TextDataset::from_file_with_classes(&data, &cols, &labels)?
    };
    let max_len = get(m, "max-length").unwrap_or(128);
    let batch = get(m, "batch-size").unwrap_or(64);
    let state = evaluate(&model, &tokenizer, &ds, batch, max_len)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "rows: {}", ds.len())?;
    if regression {
        for (k, v) in state.report(&[Metric::Mse, Metric::Mae]) {
            writeln!(out, "{k}: {v:.4}")?;
        }
        return Ok(());
    }
    let metrics = [
        Metric::Accuracy,
        Metric::MacroF1,
        Metric::Precision,
        Metric::Recall,
    ];
    for (k, v) in state.report(&metrics) {
        writeln!(out, "{k}: {v:.4}")?;
    }
    writeln!(out, "{}", state.confusion_table(&labels))?;
    Ok(())
}

/// Runs `kiln predict`.
pub fn run_predict(m: &ArgMatches) -> Result<(), Error> {
    let dir: PathBuf = get(m, "model").expect("required");
    if kiln::tune::token_classification::is_token_classifier(&dir)? {
        return tokcls::run_predict(m, &dir);
    }
    tokcls::reject_token_flags(m)?;
    let (model, tokenizer) = load_classifier(&dir)?;
    let mut texts: Vec<String> = m
        .get_many::<String>("texts")
        .map(|v| v.cloned().collect())
        .unwrap_or_default();
    if let Some(path) = get::<PathBuf>(m, "data") {
        let format = kiln::tune::data::Format::from_path(&path)?;
        let column = get::<String>(m, "text").unwrap_or_else(|| "text".into());
        texts.extend(kiln::tune::data::read_texts(&path, format, &column)?);
    }
    if texts.is_empty() {
        return Err("give texts to classify, or --data FILE".into());
    }
    let max_len = get(m, "max-length").unwrap_or(128);
    let batch: usize = get(m, "batch-size").unwrap_or(64);
    let bar = if texts.len() > batch {
        indicatif::ProgressBar::new(texts.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut out = std::io::stdout().lock();
    if is_regression_model(&dir)? {
        for chunk in texts.chunks(batch) {
            let values = predict_values(&model, &tokenizer, chunk, batch, max_len)?;
            for (text, v) in chunk.iter().zip(values) {
                writeln!(out, "{}", serde_json::json!({"text": text, "value": v}))?;
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        return Ok(());
    }
    for chunk in texts.chunks(batch) {
        for (text, p) in chunk
            .iter()
            .zip(predict(&model, &tokenizer, chunk, batch, max_len)?)
        {
            let probs: serde_json::Map<String, serde_json::Value> = p
                .probabilities
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                .collect();
            writeln!(
                out,
                "{}",
                serde_json::json!({"text": text, "label": p.label, "score": p.score, "probabilities": probs})
            )?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}
