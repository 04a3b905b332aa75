//! `kiln serve`: a model over HTTP (see docs/serving.md).

use super::Error;
use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use kiln::serve::ServeConfig;
use std::path::PathBuf;

/// The `serve` command.
pub fn command() -> Command {
    let d = ServeConfig::default();
    let num = |name: &'static str, default: String, help: &'static str| {
        Arg::new(name)
            .long(name)
            .default_value(default)
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
        .arg(Arg::new("host").long("host").default_value(d.host.clone()).help("address to bind"))
        .arg(
            Arg::new("port")
                .long("port")
                .default_value(d.port.to_string())
                .value_parser(value_parser!(u16))
                .help("port to bind (0: any free port)"),
        )
        .arg(num("max-batch", d.max_batch.to_string(), "most texts per model call"))
        .arg(num("max-wait-ms", d.max_wait.as_millis().to_string(), "longest wait for a batch to fill"))
        .arg(num("queue", d.queue.to_string(), "requests that may wait before answers are 503"))
        .arg(num("body-limit", d.body_limit.to_string(), "largest request body in bytes (413 above)"))
        .arg(num("max-texts", d.max_texts.to_string(), "most texts per classify / embeddings request (413 above)"))
        .arg(num("max-text-tokens", d.max_text_tokens.to_string(), "most tokens per text (422 above)"))
        .arg(num("max-tokens", d.max_tokens.to_string(), "largest max_tokens a completion may ask for (422 above)"))
        .arg(Arg::new("name").long("name").help("the model's served name (default: file stem or directory name)"))
        .arg(
            Arg::new("no-batching")
                .long("no-batching")
                .action(ArgAction::SetTrue)
                .help("run each request alone (no dynamic batching)"),
        )
        .arg(
            Arg::new("quiet")
                .long("quiet")
                .action(ArgAction::SetTrue)
                .help("no log line per request"),
        )
}

/// Runs `kiln serve`.
pub fn run(m: &ArgMatches) -> Result<(), Error> {
    let path: &PathBuf = m.get_one("model").expect("required");
    let n = |name: &str| *m.get_one::<u64>(name).expect("default") as usize;
    let mut config = ServeConfig::default()
        .host(m.get_one::<String>("host").expect("default").as_str())
        .port(*m.get_one("port").expect("default"))
        .max_batch(n("max-batch"))
        .max_wait_ms(n("max-wait-ms") as u64)
        .queue(n("queue"))
        .body_limit(n("body-limit"))
        .max_texts(n("max-texts"))
        .max_text_tokens(n("max-text-tokens"))
        .max_tokens(n("max-tokens"))
        .batching(!m.get_flag("no-batching"))
        .log_requests(!m.get_flag("quiet"));
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
