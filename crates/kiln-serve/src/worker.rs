//! The worker thread that owns the model: a bounded queue in front of it, dynamic batching of
//! classify / embedding requests, one generation at a time streaming text back, and panics
//! caught and answered 500.

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::model::{Backend, ModelInfo};
use axum::http::StatusCode;
use kiln_models::{GenerationConfig, StopReason};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Where a classify / embedding job's answer goes.
type Reply<T> = oneshot::Sender<Result<Vec<T>, ApiError>>;

/// One request for the worker.
pub(crate) enum Job {
    /// Class probabilities of each row.
    Classify {
        rows: Vec<Vec<u32>>,
        reply: Reply<Vec<f64>>,
    },
    /// Embeddings of each row.
    Embed {
        rows: Vec<Vec<u32>>,
        reply: Reply<Vec<f32>>,
    },
    /// A completion, streamed back as text pieces.
    Generate {
        prompt: Vec<u32>,
        config: GenerationConfig,
        stop: Vec<String>,
        events: mpsc::UnboundedSender<GenEvent>,
    },
}

impl Job {
    fn rows(&self) -> usize {
        match self {
            Job::Classify { rows, .. } | Job::Embed { rows, .. } => rows.len(),
            Job::Generate { .. } => 1,
        }
    }
}

/// What a generation sends back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum GenEvent {
    /// The next piece of text.
    Text(String),
    /// The end: why, and how many tokens were generated.
    Done {
        finish_reason: &'static str,
        completion_tokens: usize,
    },
    /// Generation failed.
    Error(ApiError),
}

/// Batching settings of the worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub batching: bool,
}

/// The sending side of the queue.
#[derive(Clone)]
pub(crate) struct Queue {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// Queues `job`, or answers 503 (with Retry-After) when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.metrics.queued(1);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queued(-1);
                let mut err = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    match e {
                        TrySendError::Full(_) => {
                            "the server is busy: the request queue is full; retry shortly"
                        }
                        TrySendError::Disconnected(_) => "the model worker has stopped",
                    },
                );
                err.retry_after = Some(1);
                Err(err)
            }
        }
    }
}

/// Starts the worker thread owning `backend`, behind a queue of `capacity` jobs. The thread
/// ends when every [`Queue`] is dropped.
pub(crate) fn spawn(
    backend: Box<dyn Backend>,
    info: Arc<ModelInfo>,
    config: WorkerConfig,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> std::io::Result<(Queue, std::thread::JoinHandle<()>)> {
    let (tx, rx) = sync_channel(capacity);
    let worker = Worker {
        backend,
        info,
        config,
        metrics: metrics.clone(),
    };
    let handle = std::thread::Builder::new()
        .name(format!("kiln-serve-{}", worker.info.kind.as_str()))
        .spawn(move || worker.run(rx))?;
    Ok((Queue { tx, metrics }, handle))
}

fn internal(what: &str, payload: &(dyn std::any::Any + Send)) -> ApiError {
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("internal error while {what}: {msg}"),
    )
}

struct Worker {
    backend: Box<dyn Backend>,
    info: Arc<ModelInfo>,
    config: WorkerConfig,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        let _guard = kiln_core::no_grad();
        let mut carry: Option<Job> = None;
        loop {
            let job = match carry.take() {
                Some(j) => j,
                None => match rx.recv() {
                    Ok(j) => {
                        self.metrics.queued(-1);
                        j
                    }
                    Err(_) => return,
                },
            };
            if let Job::Generate {
                prompt,
                config,
                stop,
                events,
            } = job
            {
                self.generate(&prompt, &config, &stop, &events);
                continue;
            }
            let mut batch = vec![job];
            if self.config.batching {
                let mut rows = batch[0].rows();
                let deadline = Instant::now() + self.config.max_wait;
                while rows < self.config.max_batch {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(j) => {
                            self.metrics.queued(-1);
                            if matches!(j, Job::Generate { .. }) {
                                carry = Some(j);
                                break;
                            }
                            rows += j.rows();
                            batch.push(j);
                        }
                        Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                            break
                        }
                    }
                }
            }
            self.run_batch(batch);
        }
    }

    /// Runs the classify jobs of `batch` together, then the embedding jobs together.
    fn run_batch(&mut self, batch: Vec<Job>) {
        let mut classify = Vec::new();
        let mut embed = Vec::new();
        for job in batch {
            match job {
                Job::Classify { rows, reply } => classify.push((rows, reply)),
                Job::Embed { rows, reply } => embed.push((rows, reply)),
                Job::Generate { .. } => unreachable!("generation jobs are never batched"),
            }
        }
        if !classify.is_empty() {
            self.answer(classify, "classifying", |b, rows| b.classify(rows));
        }
        if !embed.is_empty() {
            self.answer(embed, "embedding", |b, rows| b.embed(rows));
        }
    }

    /// Runs all `jobs`' rows as batches; when that fails and there were several jobs, runs each
    /// job alone so that only the failing one gets the error.
    fn answer<T>(
        &mut self,
        jobs: Vec<(Vec<Vec<u32>>, Reply<T>)>,
        what: &str,
        f: impl Fn(&mut dyn Backend, &[&[u32]]) -> Result<Vec<T>, String>,
    ) {
        let all: Vec<&[u32]> = jobs
            .iter()
            .flat_map(|(rows, _)| rows.iter().map(Vec::as_slice))
            .collect();
        match self.run_rows(&all, what, &f) {
            Ok(out) => {
                let mut rest = out.into_iter();
                for (rows, reply) in jobs {
                    let mine: Vec<T> = rest.by_ref().take(rows.len()).collect();
                    let _ = reply.send(Ok(mine));
                }
            }
            Err(e) if jobs.len() == 1 => {
                let (_, reply) = jobs.into_iter().next().expect("one job");
                let _ = reply.send(Err(e));
            }
            Err(_) => {
                for (rows, reply) in jobs {
                    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
                    let _ = reply.send(self.run_rows(&refs, what, &f));
                }
            }
        }
    }

    /// `f` over `rows` sorted by length (less padding) in chunks of `max_batch`, results back in
    /// the rows' order; a panic or error is a 500.
    fn run_rows<T>(
        &mut self,
        rows: &[&[u32]],
        what: &str,
        f: &impl Fn(&mut dyn Backend, &[&[u32]]) -> Result<Vec<T>, String>,
    ) -> Result<Vec<T>, ApiError> {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].len());
        let mut out: Vec<Option<T>> = (0..rows.len()).map(|_| None).collect();
        for chunk in order.chunks(self.config.max_batch.max(1)) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| rows[i]).collect();
            self.metrics.batch(batch.len());
            let backend = &mut *self.backend;
            let result = catch_unwind(AssertUnwindSafe(|| f(backend, &batch)));
            let values = match result {
                Ok(Ok(v)) if v.len() == batch.len() => v,
                Ok(Ok(v)) => {
                    return Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "internal error while {what}: {} results for {} texts",
                            v.len(),
                            batch.len()
                        ),
                    ))
                }
                Ok(Err(e)) => {
                    return Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("{what} failed: {e}"),
                    ))
                }
                Err(p) => {
                    self.metrics.panicked();
                    return Err(internal(what, p.as_ref()));
                }
            };
            for (&i, v) in chunk.iter().zip(values) {
                out[i] = Some(v);
            }
        }
        Ok(out.into_iter().map(|v| v.expect("every row ran")).collect())
    }

    fn generate(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        stop: &[String],
        events: &mpsc::UnboundedSender<GenEvent>,
    ) {
        let tokenizer = &self.info.tokenizer;
        let hold = stop.iter().map(String::len).max().unwrap_or(1).max(1) - 1;
        let mut ids: Vec<u32> = Vec::new();
        let mut sent = 0usize;
        let mut stopped_at: Option<usize> = None;
        let start = Instant::now();
        let backend = &mut *self.backend;
        let result = catch_unwind(AssertUnwindSafe(|| {
            backend.generate(prompt, config, &mut |t| {
                ids.push(t);
                if events.is_closed() {
                    return false;
                }
                let Ok(text) = tokenizer.decode(&ids, true) else {
                    return true;
                };
                if let Some(pos) = find_stop(&text, stop) {
                    stopped_at = Some(pos);
                    return false;
                }
                // Hold back a partial UTF-8 character and what could start a stop string.
                let mut end = text.trim_end_matches('\u{fffd}').len();
                end = end.min(text.len().saturating_sub(hold));
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                if end > sent && text.is_char_boundary(sent) {
                    let _ = events.send(GenEvent::Text(text[sent..end].to_string()));
                    sent = end;
                }
                true
            })
        }));
        let elapsed = start.elapsed();
        let generated = match result {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                let _ = events.send(GenEvent::Error(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("generation failed: {e}"),
                )));
                return;
            }
            Err(p) => {
                self.metrics.panicked();
                let _ = events.send(GenEvent::Error(internal("generating", p.as_ref())));
                return;
            }
        };
        self.metrics.generated(generated.tokens.len(), elapsed);
        let text = tokenizer
            .decode(&generated.tokens, true)
            .unwrap_or_default();
        let end = stopped_at
            .or_else(|| find_stop(&text, stop))
            .unwrap_or(text.len());
        if end > sent && text.is_char_boundary(sent) && text.is_char_boundary(end) {
            let _ = events.send(GenEvent::Text(text[sent..end].to_string()));
        }
        let finish_reason = match generated.stop {
            _ if stopped_at.is_some() => "stop",
            StopReason::StopToken => "stop",
            StopReason::MaxTokens => "length",
            StopReason::Callback => "cancelled",
        };
        let _ = events.send(GenEvent::Done {
            finish_reason,
            completion_tokens: generated.tokens.len(),
        });
    }
}

/// Byte position of the earliest stop string in `text`.
fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_stop_string_wins() {
        let stop = vec!["lo".to_string(), "e".to_string()];
        assert_eq!(find_stop("hello", &stop), Some(1));
        assert_eq!(find_stop("hallo", &stop), Some(3));
        assert_eq!(find_stop("hi", &stop), None);
        assert_eq!(find_stop("hi", &[]), None);
    }
}
