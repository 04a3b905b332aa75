//! kiln-serve: serve a kiln model over HTTP with an OpenAI-compatible API.
//!
//! [`load_model`] reads a classifier directory (written by `kiln finetune`), a BERT
//! sentence-embedding directory or a causal LM (`.gguf` or Llama directory); [`Server`] (on the
//! current tokio runtime), [`BackgroundServer`] (its own runtime) or [`serve`] / [`run`] (until
//! ctrl-c / SIGTERM) answer `GET /health`, `GET /metrics`, `GET /v1/models`,
//! `POST /v1/classify`, `POST /v1/embeddings`, `POST /v1/completions` and
//! `POST /v1/chat/completions`. One worker thread owns the model behind a bounded queue (503
//! with Retry-After when full) and batches classify / embedding requests dynamically; panics in
//! model code are answered 500 and the worker keeps serving. See `docs/serving.md`.

pub mod api;
pub mod config;
pub mod error;
pub mod metrics;
pub mod model;
pub mod server;
mod worker;

pub use config::ServeConfig;
pub use error::{ApiError, ServeError};
pub use metrics::Metrics;
pub use model::{load_model, Backend, LoadedModel, ModelInfo, ModelKind, SeqId};
pub use server::{serve, BackgroundServer, Server, ShutdownHandle};

use std::path::Path;

/// Loads the model at `path` and serves it on a new tokio runtime until ctrl-c or SIGTERM
/// (what `kiln serve` runs); `on_ready` gets the bound address and the loaded model's info.
pub fn run(
    config: ServeConfig,
    path: &Path,
    on_ready: impl FnOnce(std::net::SocketAddr, &ModelInfo),
) -> Result<(), ServeError> {
    config.validate().map_err(ServeError::Config)?;
    let model = load_model(path, config.model_name.as_deref())?;
    let info = model.info.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            what: "cannot start the tokio runtime".into(),
            source,
        })?;
    rt.block_on(serve(config, model, |addr| on_ready(addr, &info)))
}
