//! The worker thread that owns the model: a bounded queue in front of it, dynamic batching of
//! classify / embedding requests, continuous batching of generations (every generation in
//! progress gets its next token in one step; new ones join between steps) streaming text back,
//! and panics caught and answered 500.

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::model::{Backend, ModelInfo, SeqId};
use axum::http::StatusCode;
use kiln_models::{GenerationConfig, StopReason};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{
    sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError,
};
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

/// Batching settings of the worker: `max_batch` texts per model call and generations per
/// decoding step (one when `batching` is off).
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

/// The 500 for a generation call that returned an error.
fn generation_failed(e: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("generation failed: {e}"),
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
        let mut running: Vec<Running> = Vec::new();
        let mut next_id: SeqId = 0;
        let most = if self.config.batching {
            self.config.max_batch.max(1)
        } else {
            1
        };
        loop {
            // Take in what is waiting; block only when nothing is being generated.
            while running.len() < most {
                let job = match carry.take() {
                    Some(j) => j,
                    None => {
                        let got = if running.is_empty() {
                            rx.recv().map_err(|_| TryRecvError::Disconnected)
                        } else {
                            rx.try_recv()
                        };
                        match got {
                            Ok(j) => {
                                self.metrics.queued(-1);
                                j
                            }
                            // Disconnected: finish what is running, then stop.
                            Err(_) if !running.is_empty() => break,
                            Err(_) => return,
                        }
                    }
                };
                match job {
                    Job::Generate {
                        prompt,
                        config,
                        stop,
                        events,
                    } => {
                        next_id += 1;
                        if let Some(r) = self.start(next_id, &prompt, &config, stop, events) {
                            running.push(r);
                        }
                    }
                    job => {
                        let (batch, next) = self.gather(job, &rx);
                        carry = next;
                        self.run_batch(batch);
                    }
                }
            }
            if !running.is_empty() {
                self.step(&mut running);
            }
        }
    }

    /// `first` and the classify / embedding jobs that arrive within the batching window, up to
    /// `max_batch` texts; a generation job that arrives meanwhile is handed back.
    fn gather(&self, first: Job, rx: &Receiver<Job>) -> (Vec<Job>, Option<Job>) {
        let mut batch = vec![first];
        if !self.config.batching {
            return (batch, None);
        }
        let mut rows = batch[0].rows();
        let deadline = Instant::now() + self.config.max_wait;
        while rows < self.config.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => {
                    self.metrics.queued(-1);
                    if matches!(j, Job::Generate { .. }) {
                        return (batch, Some(j));
                    }
                    rows += j.rows();
                    batch.push(j);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        (batch, None)
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

    /// Sets up generation `id`; a bad request or a panic is answered at once (`None`).
    fn start(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        config: &GenerationConfig,
        stop: Vec<String>,
        events: mpsc::UnboundedSender<GenEvent>,
    ) -> Option<Running> {
        let backend = &mut *self.backend;
        let error = match catch_unwind(AssertUnwindSafe(|| backend.start(id, prompt, config))) {
            Ok(Ok(())) => {
                return Some(Running {
                    id,
                    hold: stop.iter().map(String::len).max().unwrap_or(1).max(1) - 1,
                    stop,
                    events,
                    tokens: Vec::new(),
                    sent: 0,
                })
            }
            Ok(Err(e)) => generation_failed(&e),
            Err(p) => {
                self.metrics.panicked();
                internal("generating", p.as_ref())
            }
        };
        self.backend.finish(id);
        let _ = events.send(GenEvent::Error(error));
        None
    }

    /// One token for every generation in `running` (one model step for all), streamed to
    /// each; ended, cancelled and failed generations leave `running`.
    fn step(&mut self, running: &mut Vec<Running>) {
        // A client that went away cancels its generation.
        running.retain(|r| {
            let gone = r.events.is_closed();
            if gone {
                self.backend.finish(r.id);
            }
            !gone
        });
        if running.is_empty() {
            return;
        }
        let ids: Vec<SeqId> = running.iter().map(|r| r.id).collect();
        let start = Instant::now();
        let backend = &mut *self.backend;
        let result = catch_unwind(AssertUnwindSafe(|| backend.step(&ids)));
        let error = match result {
            Ok(Ok(out)) if out.len() == ids.len() => {
                self.metrics.decode_step(ids.len(), start.elapsed());
                let tokenizer = &self.info.tokenizer;
                let mut still = Vec::with_capacity(running.len());
                for (mut r, (token, ended)) in running.drain(..).zip(out) {
                    match r.push(token, ended, tokenizer) {
                        Some(done) => {
                            self.backend.finish(r.id);
                            let _ = r.events.send(done);
                        }
                        None => still.push(r),
                    }
                }
                *running = still;
                return;
            }
            Ok(Ok(out)) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "internal error while generating: {} tokens for {} generations",
                    out.len(),
                    ids.len()
                ),
            ),
            Ok(Err(e)) => generation_failed(&e),
            Err(p) => {
                self.metrics.panicked();
                internal("generating", p.as_ref())
            }
        };
        // The step is one computation: every generation in it fails.
        for r in running.drain(..) {
            self.backend.finish(r.id);
            let _ = r.events.send(GenEvent::Error(error.clone()));
        }
    }
}

/// A generation in progress: where its text goes and how much has been sent.
struct Running {
    id: SeqId,
    stop: Vec<String>,
    /// Bytes held back at the end of the text (what could start a stop string).
    hold: usize,
    events: mpsc::UnboundedSender<GenEvent>,
    tokens: Vec<u32>,
    /// Bytes of the decoded text already sent.
    sent: usize,
}

impl Running {
    /// Takes the next token: sends the text that is now certain, and returns the final event
    /// when the generation has ended (a stop token or the budget, `ended`, or a stop string).
    fn push(
        &mut self,
        token: u32,
        ended: Option<StopReason>,
        tokenizer: &kiln_data::Tokenizer,
    ) -> Option<GenEvent> {
        self.tokens.push(token);
        let text = tokenizer.decode(&self.tokens, true).unwrap_or_default();
        let stopped_at = find_stop(&text, &self.stop);
        let finish_reason = match (stopped_at, ended) {
            (Some(_), _) | (None, Some(StopReason::StopToken)) => "stop",
            (None, Some(StopReason::MaxTokens)) => "length",
            (None, Some(StopReason::Callback)) => "cancelled",
            (None, None) => {
                // Hold back a partial UTF-8 character and what could start a stop string.
                let mut end = text.trim_end_matches('\u{fffd}').len();
                end = end.min(text.len().saturating_sub(self.hold));
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                self.send_until(&text, end);
                return None;
            }
        };
        self.send_until(&text, stopped_at.unwrap_or(text.len()));
        Some(GenEvent::Done {
            finish_reason,
            completion_tokens: self.tokens.len(),
        })
    }

    /// Sends `text` from what was sent so far up to byte `end`.
    fn send_until(&mut self, text: &str, end: usize) {
        if end > self.sent && text.is_char_boundary(self.sent) && text.is_char_boundary(end) {
            let _ = self
                .events
                .send(GenEvent::Text(text[self.sent..end].to_string()));
            self.sent = end;
        }
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
