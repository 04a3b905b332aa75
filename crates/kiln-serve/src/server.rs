//! The HTTP server: routes, handlers, metrics middleware, start and graceful shutdown.

use crate::api::{self, ChatRequest, ClassifyRequest, CompletionRequest, EmbeddingsRequest};
use crate::config::ServeConfig;
use crate::error::{ApiError, ServeError};
use crate::metrics::Metrics;
use crate::model::{LoadedModel, ModelInfo};
use crate::worker::{self, GenEvent, Job, Queue, WorkerConfig};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

struct AppState {
    info: Arc<ModelInfo>,
    queue: Queue,
    metrics: Arc<Metrics>,
    config: ServeConfig,
    created: u64,
    next_id: AtomicU64,
}

type Shared = Arc<AppState>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AppState {
    fn body(&self, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
        body.map_err(|r| {
            let status = r.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    format!(
                        "the request body is larger than this server's limit of {} bytes",
                        self.config.body_limit
                    ),
                )
            } else {
                ApiError::new(
                    status,
                    format!("cannot read the request body: {}", r.body_text()),
                )
            }
        })
    }

    /// 400 unless the model serves `endpoint`.
    fn require(&self, endpoint: &str, ok: bool, needs: &str) -> Result<(), ApiError> {
        if ok {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{endpoint} needs {needs}, but this server serves `{}`, a {}",
                self.info.name,
                self.info.kind.as_str()
            ),
        ))
    }

    /// 404 when the request names another model.
    fn check_model(&self, model: &Option<String>) -> Result<(), ApiError> {
        match model {
            Some(m) if *m != self.info.name => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model `{m}` is not served here; this server serves `{}`",
                    self.info.name
                ),
            )
            .param("model")),
            _ => Ok(()),
        }
    }

    /// Token ids of each text (special tokens added); 422 for a text over the limit.
    fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, ApiError> {
        let limit = self.config.max_text_tokens.min(self.info.max_positions);
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let ids = self
                    .info
                    .tokenizer
                    .encode(t, true)
                    .map_err(|e| ApiError::bad_field(format!("input[{i}]"), e.to_string()))?
                    .ids;
                if ids.len() > limit {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!(
                            "input[{i}] has {} tokens, more than this server's limit of {limit}",
                            ids.len()
                        ),
                    )
                    .param(format!("input[{i}]")));
                }
                Ok(ids)
            })
            .collect()
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

fn worker_gone() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the model worker stopped before answering",
    )
}

async fn health(State(st): State<Shared>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": st.info.name,
        "kind": st.info.kind.as_str(),
        "queue_depth": st.metrics.queue_depth(),
    }))
}

async fn models(State(st): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.info.name,
            "object": "model",
            "created": st.created,
            "owned_by": "kiln",
            "kind": st.info.kind.as_str(),
            "labels": st.info.labels,
            "max_positions": st.info.max_positions,
        }],
    }))
}

async fn metrics(State(st): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

async fn classify(
    State(st): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    st.require(
        "/v1/classify",
        st.info.kind.classifies(),
        "a classifier (a directory written by `kiln finetune`)",
    )?;
    let req: ClassifyRequest = api::parse(&st.body(body)?)?;
    st.check_model(&req.model)?;
    let texts = api::texts(&req.input, st.config.max_texts)?;
    let rows = st.tokenize(&texts)?;
    let tokens: usize = rows.iter().map(Vec::len).sum();
    st.metrics.prompt_tokens(tokens);
    let (tx, rx) = oneshot::channel();
    st.queue.submit(Job::Classify { rows, reply: tx })?;
    let probs = rx.await.map_err(|_| worker_gone())??;
    let labels = &st.info.labels;
    let data: Vec<Value> = probs
        .iter()
        .enumerate()
        .map(|(i, row)| {
            // First maximum wins, as kiln_tune::predict.
            let (best, score) =
                row.iter()
                    .enumerate()
                    .fold(
                        (0, f64::NEG_INFINITY),
                        |a, (i, &p)| if p > a.1 { (i, p) } else { a },
                    );
            let probabilities: serde_json::Map<String, Value> = labels
                .iter()
                .zip(row)
                .map(|(l, &p)| (l.clone(), json!(p)))
                .collect();
            json!({
                "index": i,
                "label": labels.get(best).cloned().unwrap_or_default(),
                "score": score,
                "probabilities": probabilities,
            })
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "model": st.info.name,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

/// Standard base64 of `v`'s little-endian bytes (OpenAI's `encoding_format: "base64"`).
fn base64_f32(v: &[f32]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn embeddings(
    State(st): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    st.require(
        "/v1/embeddings",
        st.info.kind.embeds(),
        "a BERT encoder (a sentence-embedding or classifier directory)",
    )?;
    let req: EmbeddingsRequest = api::parse(&st.body(body)?)?;
    st.check_model(&req.model)?;
    let b64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_field(
                "encoding_format",
                format!("encoding_format must be \"float\" or \"base64\", got {other:?}"),
            ))
        }
    };
    let texts = api::texts(&req.input, st.config.max_texts)?;
    let rows = st.tokenize(&texts)?;
    let tokens: usize = rows.iter().map(Vec::len).sum();
    st.metrics.prompt_tokens(tokens);
    let (tx, rx) = oneshot::channel();
    st.queue.submit(Job::Embed { rows, reply: tx })?;
    let vectors = rx.await.map_err(|_| worker_gone())??;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if b64 { json!(base64_f32(v)) } else { json!(v) };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": st.info.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

/// Which completion endpoint, for the response shapes.
#[derive(Clone, Copy, PartialEq)]
enum Flavor {
    Text,
    Chat,
}

async fn completions(
    State(st): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    st.require(
        "/v1/completions",
        st.info.kind.generates(),
        "a causal language model (a .gguf file or a Llama directory)",
    )?;
    let req: CompletionRequest = api::parse(&st.body(body)?)?;
    st.check_model(&req.model)?;
    let text = api::prompt(&req.prompt)?;
    run_generation(st, text, "prompt", &req.sampling(), Flavor::Text).await
}

async fn chat_completions(
    State(st): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    st.require(
        "/v1/chat/completions",
        st.info.kind.generates(),
        "a causal language model (a .gguf file or a Llama directory)",
    )?;
    let req: ChatRequest = api::parse(&st.body(body)?)?;
    st.check_model(&req.model)?;
    let messages = api::messages(&req.messages)?;
    let template = st.info.chat_template.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "/v1/chat/completions needs a chat template, and `{}` has none; use /v1/completions",
                st.info.name
            ),
        )
    })?;
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::bad_field("messages", format!("the chat template failed: {e}")))?;
    run_generation(st, text, "messages", &req.sampling(), Flavor::Chat).await
}

async fn run_generation(
    st: Shared,
    text: String,
    field: &str,
    sampling: &api::Sampling,
    flavor: Flavor,
) -> Result<Response, ApiError> {
    let mut params = api::generation(sampling, st.config.default_max_tokens, st.config.max_tokens)?;
    let prompt = st
        .info
        .tokenizer
        .encode(&text, true)
        .map_err(|e| ApiError::bad_field(field, e.to_string()))?
        .ids;
    if prompt.is_empty() {
        return Err(ApiError::bad_field(field, format!("{field} has no tokens")));
    }
    let need = prompt.len() + params.config.max_new_tokens;
    if need > st.info.max_positions {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{field} has {} tokens; with max_tokens {} that is more than the model's {} positions",
                prompt.len(),
                params.config.max_new_tokens,
                st.info.max_positions
            ),
        )
        .param(field));
    }
    st.metrics.prompt_tokens(prompt.len());
    params.config.stop_tokens = st.info.stop_tokens.clone();
    let prompt_tokens = prompt.len();
    let (tx, mut rx) = mpsc::unbounded_channel();
    st.queue.submit(Job::Generate {
        prompt,
        config: params.config,
        stop: params.stop,
        events: tx,
    })?;
    let (id, object) = match flavor {
        Flavor::Text => (st.id("cmpl"), "text_completion"),
        Flavor::Chat => (st.id("chatcmpl"), "chat.completion"),
    };
    let created = now_secs();
    if !params.stream {
        let mut out = String::new();
        loop {
            match rx.recv().await {
                Some(GenEvent::Text(t)) => out += &t,
                Some(GenEvent::Error(e)) => return Err(e),
                None => return Err(worker_gone()),
                Some(GenEvent::Done {
                    finish_reason,
                    completion_tokens,
                }) => {
                    let choice = match flavor {
                        Flavor::Text => json!({
                            "text": out, "index": 0, "logprobs": null,
                            "finish_reason": finish_reason,
                        }),
                        Flavor::Chat => json!({
                            "index": 0,
                            "message": {"role": "assistant", "content": out},
                            "finish_reason": finish_reason,
                        }),
                    };
                    return Ok(Json(json!({
                        "id": id, "object": object, "created": created,
                        "model": st.info.name,
                        "choices": [choice],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens,
                        },
                    }))
                    .into_response());
                }
            }
        }
    }
    // Streaming: wait for the first event, so that an immediate failure is a plain error answer.
    let first = match rx.recv().await {
        Some(GenEvent::Error(e)) => return Err(e),
        None => return Err(worker_gone()),
        Some(ev) => ev,
    };
    let chunk = {
        let model = st.info.name.clone();
        let object = match flavor {
            Flavor::Text => "text_completion",
            Flavor::Chat => "chat.completion.chunk",
        };
        move |text: Option<&str>, finish: Option<&str>, role: bool| -> Event {
            let choice = match flavor {
                Flavor::Text => json!({
                    "text": text.unwrap_or(""), "index": 0, "logprobs": null,
                    "finish_reason": finish,
                }),
                Flavor::Chat => {
                    let delta = match (role, text) {
                        (true, _) => json!({"role": "assistant", "content": ""}),
                        (false, Some(t)) => json!({"content": t}),
                        (false, None) => json!({}),
                    };
                    json!({"index": 0, "delta": delta, "finish_reason": finish})
                }
            };
            let v = json!({
                "id": id, "object": object, "created": created, "model": model,
                "choices": [choice],
            });
            Event::default().data(v.to_string())
        }
    };
    // States: 0 = role chunk (chat) pending, 1 = streaming, 2 = [DONE] pending, 3 = ended.
    let start_state = if flavor == Flavor::Chat { 0u8 } else { 1 };
    let stream = futures_util::stream::unfold(
        (rx, Some(first), start_state, chunk),
        |(mut rx, mut pending, state, chunk)| async move {
            let ev = match state {
                0 => {
                    let e = chunk(None, None, true);
                    return Some((Ok::<_, Infallible>(e), (rx, pending, 1, chunk)));
                }
                2 => {
                    let e = Event::default().data("[DONE]");
                    return Some((Ok(e), (rx, pending, 3, chunk)));
                }
                3 => return None,
                _ => match pending.take() {
                    Some(ev) => Some(ev),
                    None => rx.recv().await,
                },
            };
            let (event, next) = match ev {
                Some(GenEvent::Text(t)) => (chunk(Some(&t), None, false), 1),
                Some(GenEvent::Done { finish_reason, .. }) => {
                    (chunk(None, Some(finish_reason), false), 2)
                }
                Some(GenEvent::Error(e)) => (Event::default().data(e.body().to_string()), 2),
                None => (Event::default().data(worker_gone().body().to_string()), 2),
            };
            Some((Ok(event), (rx, pending, next, chunk)))
        },
    );
    Ok(Sse::new(stream).into_response())
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route for {method} {}; the endpoints are GET /health, GET /metrics, GET /v1/models, \
             POST /v1/classify, POST /v1/embeddings, POST /v1/completions, POST /v1/chat/completions",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

async fn track(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().clone();
    let resp = next.run(req).await;
    let took = start.elapsed();
    st.metrics.request(&endpoint, resp.status().as_u16(), took);
    if st.config.log_requests {
        eprintln!(
            "kiln serve: {method} {endpoint} {} {:.1} ms",
            resp.status().as_u16(),
            took.as_secs_f64() * 1e3
        );
    }
    resp
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/classify", post(classify))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(state.config.body_limit))
        .with_state(state)
}

/// Asks a running server to stop: it finishes the requests in flight, then returns.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Starts the graceful shutdown.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// A server running on the current tokio runtime.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    shutdown: ShutdownHandle,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
    worker: std::thread::JoinHandle<()>,
}

impl Server {
    /// Binds `config.host:config.port` (port 0: any free port), starts the model worker and
    /// serves in a task of the current runtime.
    pub async fn start(config: ServeConfig, model: LoadedModel) -> Result<Server, ServeError> {
        config.validate().map_err(ServeError::Config)?;
        let addr = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Io {
                what: format!("cannot listen on {addr}"),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Io {
            what: "no local address".into(),
            source,
        })?;
        let metrics = Arc::new(Metrics::new(config.queue));
        let info = Arc::new(model.info);
        let (queue, worker) = worker::spawn(
            model.backend,
            info.clone(),
            WorkerConfig {
                max_batch: config.max_batch,
                max_wait: config.max_wait,
                batching: config.batching,
            },
            config.queue,
            metrics.clone(),
        )
        .map_err(|source| ServeError::Io {
            what: "cannot start the model worker thread".into(),
            source,
        })?;
        let state = Arc::new(AppState {
            info,
            queue,
            metrics,
            config,
            created: now_secs(),
            next_id: AtomicU64::new(0),
        });
        let app = router(state);
        let (tx, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await
                .map_err(|source| ServeError::Io {
                    what: "serving".into(),
                    source,
                })
        });
        Ok(Server {
            addr,
            shutdown: ShutdownHandle(Arc::new(tx)),
            task,
            worker,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Waits until the server has shut down (after [`ShutdownHandle::shutdown`]) and its
    /// worker has finished.
    pub async fn wait(self) -> Result<(), ServeError> {
        let result = self.task.await.map_err(|e| ServeError::Io {
            what: "the server task failed".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let worker = self.worker;
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        result
    }
}

/// Resolves on ctrl-c or (on Unix) SIGTERM.
async fn termination() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Serves `model` until ctrl-c or SIGTERM, then shuts down gracefully (requests in flight
/// finish). `on_ready` is called with the bound address once the server listens.
pub async fn serve(
    config: ServeConfig,
    model: LoadedModel,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let server = Server::start(config, model).await?;
    on_ready(server.local_addr());
    let handle = server.shutdown_handle();
    tokio::spawn(async move {
        termination().await;
        handle.shutdown();
    });
    server.wait().await
}

/// A server with its own runtime on a background thread (for synchronous programs and tests).
#[derive(Debug)]
pub struct BackgroundServer {
    addr: SocketAddr,
    shutdown: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl BackgroundServer {
    /// Starts `model` on a new thread with its own multi-threaded tokio runtime.
    pub fn start(config: ServeConfig, model: LoadedModel) -> Result<BackgroundServer, ServeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kiln-serve-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|source| ServeError::Io {
                        what: "cannot start the tokio runtime".into(),
                        source,
                    })?;
                rt.block_on(async move {
                    match Server::start(config, model).await {
                        Ok(server) => {
                            let _ = tx.send(Ok((server.local_addr(), server.shutdown_handle())));
                            server.wait().await
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            let _ = tx.send(Err(e));
                            Err(ServeError::Config(msg))
                        }
                    }
                })
            })
            .map_err(|source| ServeError::Io {
                what: "cannot start the server thread".into(),
                source,
            })?;
        match rx.recv() {
            Ok(Ok((addr, shutdown))) => Ok(BackgroundServer {
                addr,
                shutdown,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(thread
                .join()
                .map_err(|_| ServeError::Config("the server thread panicked".into()))
                .and_then(|r| r)
                .err()
                .unwrap_or_else(|| ServeError::Config("the server thread ended".into()))),
        }
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Shuts down gracefully and waits for the thread.
    pub fn stop(mut self) -> Result<(), ServeError> {
        self.shutdown.shutdown();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(ServeError::Config("the server thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        self.shutdown.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelKind;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        // 1.0f32 = 00 00 80 3f; 2.0f32 = 00 00 00 40.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 2.0]), "AACAPwAAAEA=");
        assert_eq!(base64_f32(&[]), "");
    }

    #[test]
    fn kinds_say_which_endpoints_they_serve() {
        assert!(ModelKind::Classifier.classifies() && ModelKind::Classifier.embeds());
        assert!(ModelKind::Embedder.embeds() && !ModelKind::Embedder.classifies());
        assert!(ModelKind::CausalLm.generates() && !ModelKind::CausalLm.embeds());
    }
}
