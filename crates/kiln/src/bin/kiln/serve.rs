//! `kiln serve`: a model over HTTP (see docs/serving.md).

use super::Error;
use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use kiln::serve::ServeConfig;
use std::path::PathBuf;

/// The `serve` command.
pub fn command() -> Command {
    // No clap defaults: absent flags keep `ServeConfig::default()`'s values.
    let num = |name: &'static str, help: &'static str| {
        Arg::new(name)
            .long(name)
            .value_parser(value_parser!(u64))
            .help(help)
    };
    Command::new("serve")
        .about("Serve a classifier, sentence embedder or causal LM over an OpenAI-compatible HTTP API")
        .arg(
            Arg::new("model")
                .long("model")
                .required(true)
                .value_parser(value_parser!(PathBuf))
                .help("a directory written by `kiln finetune`, a BERT sentence-embedding directory, or a .gguf / Llama directory"),
        )
        .arg(Arg::new("host").long("host").help("address to bind (default 127.0.0.1)"))
        .arg(
            Arg::new("port")
                .long("port")
                .value_parser(value_parser!(u16))
                .help("port to bind (default 8080; 0: any free port)"),
        )
        .arg(num("max-batch", "most texts per model call and generations decoded together (default 16)"))
        .arg(num("max-wait-ms", "longest wait for a batch to fill (default 5)"))
        .arg(num("queue", "requests that may wait before answers are 503 (default 256)"))
        .arg(num("body-limit", "largest request body in bytes, 413 above (default 1 MiB)"))
        .arg(num("max-texts", "most texts per classify / embeddings request, 413 above (default 256)"))
        .arg(num("max-text-tokens", "most tokens per text, 422 above (default 512)"))
        .arg(num("max-tokens", "largest max_tokens a completion may ask for, 422 above (default 512)"))
        .arg(Arg::new("name").long("name").help("the model's served name (default: file stem or directory name)"))
        .arg(
            Arg::new("no-batching")
                .long("no-batching")
                .action(ArgAction::SetTrue)
                .help("run each request alone, one generation at a time (no batching)"),
        )
        .arg(
            Arg::new("quiet")
                .long("quiet")
                .action(ArgAction::SetTrue)
                .help("no log line per request"),
        )
}

/// A `ServeConfig` builder method taking a size.
type SetSize = fn(ServeConfig, usize) -> ServeConfig;

/// Runs `kiln serve`.
pub fn run(m: &ArgMatches) -> Result<(), Error> {
    let path: &PathBuf = m.get_one("model").expect("required");
    let mut config = ServeConfig::default()
        .batching(!m.get_flag("no-batching"))
        .log_requests(!m.get_flag("quiet"));
    let n = |name: &str| m.get_one::<u64>(name).map(|&v| v as usize);
    if let Some(h) = m.get_one::<String>("host") {
        config = config.host(h.as_str());
    }
    if let Some(&p) = m.get_one::<u16>("port") {
        config = config.port(p);
    }
    let sizes: [(&str, SetSize); 7] = [
        ("max-batch", ServeConfig::max_batch),
        ("max-wait-ms", |c, v| c.max_wait_ms(v as u64)),
        ("queue", ServeConfig::queue),
        ("body-limit", ServeConfig::body_limit),
        ("max-texts", ServeConfig::max_texts),
        ("max-text-tokens", ServeConfig::max_text_tokens),
        ("max-tokens", ServeConfig::max_tokens),
    ];
    for (name, set) in sizes {
        if let Some(v) = n(name) {
            config = set(config, v);
        }
    }
    if let Some(name) = m.get_one::<String>("name") {
        config = config.model_name(name.as_str());
    }
    let batching = config.batching;
    kiln::serve::run(config, path, |addr, info| {
        eprintln!(
            "kiln serve: `{}` ({}) on http://{addr} (dynamic batching {}); ctrl-c stops",
            info.name,
            info.kind.as_str(),
            if batching { "on" } else { "off" }
        );
    })?;
    eprintln!("kiln serve: stopped");
    Ok(())
}
