//! The `kiln` command line: `kiln finetune`, `kiln eval`, `kiln predict`, `kiln generate`,
//! `kiln embed`, `kiln inspect`.

#[path = "kiln/serve.rs"]
mod serve;
#[path = "kiln/tokcls.rs"]
mod tokcls;
#[path = "kiln/tune.rs"]
mod tune;

use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use kiln::core::{no_grad, DType};
use kiln::data::{ChatMessage, EncodeOptions, Padding, Tokenizer};
use kiln::io::{GgufFile, GgufValue, SafetensorsFile};
use kiln::models::{
    generate, tokenizer_from_gguf, BertModel, GenerationConfig, LlamaForCausalLM, QuantActivations,
    StopReason,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

type Error = Box<dyn std::error::Error>;

fn cli() -> Command {
    Command::new("kiln")
        .about("kiln: run, inspect and fine-tune pretrained models on the CPU")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(tune::finetune_command())
        .subcommand(tune::eval_command())
        .subcommand(tune::predict_command())
        .subcommand(serve::command())
        .subcommand(
            Command::new("generate")
                .about("Continue a prompt with a Llama-family language model (GGUF file or HF directory), streaming tokens")
                .arg(
                    Arg::new("model")
                        .long("model")
                        .required(true)
                        .value_parser(value_parser!(PathBuf))
                        .help("a .gguf file (llama architecture, byte-level BPE tokenizer inside), or a directory in Hugging Face layout (config.json, model.safetensors, tokenizer.json), e.g. a kiln finetune --task causal-lm output"),
                )
                .arg(Arg::new("prompt").long("prompt").required(true).help("the text to continue"))
                .arg(
                    Arg::new("max-tokens")
                        .long("max-tokens")
                        .default_value("64")
                        .value_parser(value_parser!(usize))
                        .help("most tokens to generate"),
                )
                .arg(
                    Arg::new("temperature")
                        .long("temperature")
                        .default_value("0")
                        .value_parser(value_parser!(f32))
                        .help("0 decodes greedily; above 0 samples at this temperature"),
                )
                .arg(Arg::new("top-k").long("top-k").value_parser(value_parser!(usize)))
                .arg(Arg::new("top-p").long("top-p").value_parser(value_parser!(f32)))
                .arg(
                    Arg::new("repetition-penalty")
                        .long("repetition-penalty")
                        .default_value("1")
                        .value_parser(value_parser!(f32)),
                )
                .arg(
                    Arg::new("seed")
                        .long("seed")
                        .default_value("0")
                        .value_parser(value_parser!(u64)),
                )
                .arg(
                    Arg::new("chat")
                        .long("chat")
                        .action(ArgAction::SetTrue)
                        .help("wrap the prompt in the model's chat template as a user message"),
                )
                .arg(Arg::new("system").long("system").help("system message (with --chat)"))
                .arg(
                    Arg::new("weights")
                        .long("weights")
                        .default_value("q8")
                        .value_parser(["q8", "quant", "f32"])
                        .help("q8: quantised weights and 8-bit activations (fastest); quant: quantised weights, f32 activations; f32: everything dequantised"),
                ),
        )
        .subcommand(
            Command::new("embed")
                .about("Sentence embeddings with a BERT model directory (mean pooling + L2 norm), one JSON line per text")
                .arg(
                    Arg::new("model")
                        .long("model")
                        .required(true)
                        .value_parser(value_parser!(PathBuf))
                        .help("directory with config.json, model.safetensors and tokenizer.json"),
                )
                .arg(Arg::new("texts").required(true).num_args(1..).help("texts to embed")),
        )
        .subcommand(
            Command::new("inspect")
                .about("Format, tensors, dtypes, shapes, parameter count and metadata of a checkpoint")
                .arg(
                    Arg::new("file")
                        .required(true)
                        .value_parser(value_parser!(PathBuf))
                        .help("a .gguf, .safetensors, or PyTorch .bin/.pth/.pt file"),
                )
                .arg(
                    Arg::new("all")
                        .long("all")
                        .action(ArgAction::SetTrue)
                        .help("list every tensor (default: the first 40)"),
                ),
        )
}

fn main() -> ExitCode {
    let matches = cli().get_matches();
    let result = match matches.subcommand() {
        Some(("finetune", m)) => tune::run_finetune(m),
        Some(("eval", m)) => tune::run_eval(m),
        Some(("predict", m)) => tune::run_predict(m),
        Some(("serve", m)) => serve::run(m),
        Some(("generate", m)) => run_generate(m),
        Some(("embed", m)) => run_embed(m),
        Some(("inspect", m)) => run_inspect(m),
        _ => unreachable!("clap requires a subcommand"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_generate(m: &ArgMatches) -> Result<(), Error> {
    let path: &PathBuf = m.get_one("model").expect("required");
    let prompt: &String = m.get_one("prompt").expect("required");
    let weights = m.get_one::<String>("weights").expect("default").as_str();
    let temperature: f32 = *m.get_one("temperature").expect("default");
    let mut config = if temperature > 0.0 {
        GenerationConfig::sampling(
            *m.get_one("max-tokens").expect("default"),
            temperature,
            *m.get_one("seed").expect("default"),
        )
    } else {
        GenerationConfig::greedy(*m.get_one("max-tokens").expect("default"))
    };
    config.top_k = m.get_one::<usize>("top-k").copied();
    config.top_p = m.get_one::<f32>("top-p").copied();
    config.repetition_penalty = *m.get_one("repetition-penalty").expect("default");
    config.validate()?;

    let t0 = Instant::now();
    let (model, tokenizer, template) = if path.is_dir() {
        // A directory in Hugging Face layout (e.g. a merged `kiln finetune --task causal-lm`
        // output): f32 weights as saved, the tokenizer and chat template from its files.
        let model = LlamaForCausalLM::from_pretrained(path)?;
        let tok = model
            .tokenizer
            .clone()
            .ok_or_else(|| format!("{}: no tokenizer.json next to the model", path.display()))?;
        let template = tok.template()?;
        (model, tok.tokenizer, template)
    } else {
        let file = GgufFile::open(path)?;
        let (tokenizer, template) = tokenizer_from_gguf(&file)?;
        drop(file);
        let quant = match weights {
            "f32" => None,
            "quant" => Some(QuantActivations::F32),
            _ => Some(QuantActivations::Q8),
        };
        (
            LlamaForCausalLM::from_gguf(path, quant)?,
            tokenizer,
            template,
        )
    };
    let load_s = t0.elapsed().as_secs_f64();

    let text = if m.get_flag("chat") {
        let template = template.ok_or_else(|| {
            format!(
                "{}: --chat needs a chat template, and this file has none",
                path.display()
            )
        })?;
        let mut messages = Vec::new();
        if let Some(s) = m.get_one::<String>("system") {
            messages.push(ChatMessage::system(s.as_str()));
        }
        messages.push(ChatMessage::user(prompt.as_str()));
        template.render(&messages, true)?
    } else {
        prompt.clone()
    };
    let ids = tokenizer.encode(&text, true)?.ids;
    config.stop_tokens = tokenizer.eos_id().into_iter().collect();
    if let Some(id) = tokenizer.token_to_id("<|im_end|>") {
        config.stop_tokens.push(id);
    }

    let _guard = no_grad();
    let mut out = std::io::stdout().lock();
    if !m.get_flag("chat") {
        write!(out, "{prompt}")?;
        out.flush()?;
    }
    // Decode incrementally: print what the new token adds to the decoded text.
    let mut generated: Vec<u32> = Vec::new();
    let mut shown = 0usize;
    let mut first_token_at = None;
    let start = Instant::now();
    let result = generate(&model, &ids, &config, |t| {
        if first_token_at.is_none() {
            first_token_at = Some(start.elapsed());
        }
        generated.push(t);
        if let Ok(s) = tokenizer.decode(&generated, true) {
            // Hold back a trailing partial UTF-8 character (shown as U+FFFD) until it completes.
            if !s.ends_with('\u{fffd}') && s.len() > shown && s.is_char_boundary(shown) {
                let _ = write!(out, "{}", &s[shown..]);
                let _ = out.flush();
                shown = s.len();
            }
        }
        true
    })?;
    writeln!(out)?;
    let total = start.elapsed().as_secs_f64();
    let prefill = first_token_at.map_or(total, |d| d.as_secs_f64());
    let n = result.tokens.len();
    let decode_rate = if n > 1 {
        format!(
            "{:.1} tokens/s",
            (n - 1) as f64 / (total - prefill).max(1e-9)
        )
    } else {
        "-".into()
    };
    eprintln!(
        "kiln: {} prompt tokens in {:.2} s ({:.1} tokens/s), {n} new tokens, decode {decode_rate}; model loaded in {load_s:.2} s; weights {weights}; stopped: {}",
        ids.len(),
        prefill,
        ids.len() as f64 / prefill.max(1e-9),
        match result.stop {
            StopReason::StopToken => "end-of-sequence token",
            StopReason::MaxTokens => "--max-tokens reached",
            StopReason::Callback => "interrupted",
        }
    );
    Ok(())
}

fn run_embed(m: &ArgMatches) -> Result<(), Error> {
    let dir: &PathBuf = m.get_one("model").expect("required");
    let texts: Vec<&String> = m.get_many("texts").expect("required").collect();
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(format!(
            "{}: file not found (the model's tokenizer)",
            tokenizer_path.display()
        )
        .into());
    }
    let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
    let model = BertModel::from_pretrained(dir)?;
    kiln::nn::ModuleExt::eval(&model); // no dropout: embeddings are deterministic
    let _guard = no_grad();
    let max_len = model.config().max_position_embeddings;
    let opts = EncodeOptions::default()
        .padding(Padding::Longest)
        .truncation(max_len);
    let batch = tokenizer.encode_batch(&texts, &opts)?;
    let emb = model.sentence_embeddings(
        &batch.input_ids,
        Some(&batch.attention_mask.to_dtype(DType::F32)),
        Some(&batch.token_type_ids),
    );
    let dim = emb.dim(1);
    let values = emb.to_vec::<f32>();
    let mut out = std::io::stdout().lock();
    for (text, row) in texts.iter().zip(values.chunks(dim)) {
        let nums: Vec<String> = row.iter().map(|v| format!("{v:.6}")).collect();
        writeln!(
            out,
            "{{\"text\": {}, \"embedding\": [{}]}}",
            serde_json::to_string(text)?,
            nums.join(", ")
        )?;
    }
    Ok(())
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn value_summary(v: &GgufValue) -> String {
    let s = format!("{v:?}");
    if s.chars().count() > 100 {
        format!(
            "{}… ({})",
            s.chars().take(100).collect::<String>(),
            v.type_name()
        )
    } else {
        s
    }
}

fn run_inspect(m: &ArgMatches) -> Result<(), Error> {
    let path: &PathBuf = m.get_one("file").expect("required");
    let all = m.get_flag("all");
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        f.read_exact(&mut magic)
            .map_err(|e| format!("{}: too short to be a checkpoint ({e})", path.display()))?;
    }
    if &magic == b"GGUF" {
        inspect_gguf(path, all)
    } else if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        inspect_safetensors(path, all)
    } else if matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pth" | "pt" | "ckpt")
    ) {
        inspect_torch(path, all)
    } else {
        Err(format!(
            "{}: not a GGUF file (no GGUF magic) and not named .safetensors, .bin, .pth or .pt",
            path.display()
        )
        .into())
    }
}

fn inspect_gguf(path: &Path, all: bool) -> Result<(), Error> {
    let f = GgufFile::open(path)?;
    let infos = f.tensor_infos();
    let params: usize = infos.iter().map(|t| t.elem_count()).sum();
    println!(
        "{}: GGUF v{}, {} tensors, {} parameters ({params}), alignment {}",
        path.display(),
        f.version(),
        infos.len(),
        human(params),
        f.alignment()
    );
    let mut types = std::collections::BTreeMap::new();
    for t in infos {
        *types.entry(t.ty.name()).or_insert(0usize) += 1;
    }
    println!("tensor types: {types:?}");
    println!("metadata ({} keys):", f.metadata_entries().len());
    for (k, v) in f.metadata_entries() {
        println!("  {k} = {}", value_summary(v));
    }
    println!("tensors:");
    for t in infos.iter().take(if all { usize::MAX } else { 40 }) {
        println!("  {:<40} {:<6} {:?}", t.name, t.ty.name(), t.shape());
    }
    if !all && infos.len() > 40 {
        println!("  … {} more (--all lists them)", infos.len() - 40);
    }
    Ok(())
}

fn inspect_torch(path: &Path, all: bool) -> Result<(), Error> {
    let sd = kiln::io::load_torch(path)?;
    let params: usize = sd.iter().map(|(_, t)| t.elem_count()).sum();
    println!(
        "{}: PyTorch checkpoint, {} tensors, {} parameters ({params})",
        path.display(),
        sd.len(),
        human(params)
    );
    println!("tensors:");
    for (name, t) in sd.iter().take(if all { usize::MAX } else { 40 }) {
        println!("  {:<60} {:<5} {:?}", name, t.dtype(), t.dims());
    }
    if !all && sd.len() > 40 {
        println!("  … {} more (--all lists them)", sd.len() - 40);
    }
    Ok(())
}

fn inspect_safetensors(path: &Path, all: bool) -> Result<(), Error> {
    let f = SafetensorsFile::open(path)?;
    let names = f.names();
    let mut params = 0usize;
    let mut dtypes = std::collections::BTreeMap::new();
    for n in &names {
        let info = f.info(n).expect("listed");
        params += info.shape.iter().product::<usize>();
        *dtypes.entry(format!("{:?}", info.dtype)).or_insert(0usize) += 1;
    }
    println!(
        "{}: safetensors, {} tensors, {} parameters ({params})",
        path.display(),
        names.len(),
        human(params)
    );
    println!("dtypes: {dtypes:?}");
    if !f.metadata().is_empty() {
        println!("metadata: {:?}", f.metadata());
    }
    println!("tensors:");
    for n in names.iter().take(if all { usize::MAX } else { 40 }) {
        let info = f.info(n).expect("listed");
        println!(
            "  {:<60} {:<5} {:?}",
            n,
            format!("{:?}", info.dtype),
            info.shape
        );
    }
    if !all && names.len() > 40 {
        println!("  … {} more (--all lists them)", names.len() - 40);
    }
    Ok(())
}
