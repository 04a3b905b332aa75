//! Prometheus metrics: requests per endpoint and status, latencies, batch sizes (texts per
//! model call, sequences per decoding step), generated tokens, queue depth.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Upper bounds of the batch-size histogram, in texts.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A cumulative histogram with fixed buckets.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Requests {
    counts: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
}

/// The server's counters; shared by the handlers and the worker.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<Requests>,
    batches: Mutex<Histogram>,
    decode_batches: Mutex<Histogram>,
    queue_depth: AtomicI64,
    queue_capacity: u64,
    generated_tokens: AtomicU64,
    generation_micros: AtomicU64,
    prompt_tokens: AtomicU64,
    panics: AtomicU64,
}

impl Metrics {
    /// Empty counters for a queue of `queue_capacity`.
    pub fn new(queue_capacity: usize) -> Metrics {
        Metrics {
            requests: Mutex::new(Requests::default()),
            batches: Mutex::new(Histogram::new(&BATCH_BUCKETS)),
            decode_batches: Mutex::new(Histogram::new(&BATCH_BUCKETS)),
            queue_depth: AtomicI64::new(0),
            queue_capacity: queue_capacity as u64,
            generated_tokens: AtomicU64::new(0),
            generation_micros: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            panics: AtomicU64::new(0),
        }
    }

    /// Counts one answered request.
    pub fn request(&self, endpoint: &str, status: u16, latency: Duration) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *r.counts.entry((endpoint.to_string(), status)).or_insert(0) += 1;
        r.latency
            .entry(endpoint.to_string())
            .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS))
            .observe(latency.as_secs_f64());
    }

    /// Records one model call on `n` texts.
    pub fn batch(&self, n: usize) {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(n as f64);
    }

    /// Adds `delta` to the queue depth.
    pub fn queued(&self, delta: i64) {
        self.queue_depth.fetch_add(delta, Ordering::Relaxed);
    }

    /// Requests waiting for the worker now.
    pub fn queue_depth(&self) -> i64 {
        self.queue_depth.load(Ordering::Relaxed).max(0)
    }

    /// Records one decoding step that gave `sequences` concurrent generations a token each.
    pub fn decode_step(&self, sequences: usize, took: Duration) {
        self.generated_tokens
            .fetch_add(sequences as u64, Ordering::Relaxed);
        self.generation_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.decode_batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(sequences as f64);
    }

    /// Counts tokens of prompts and inputs.
    pub fn prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a caught panic.
    pub fn panicked(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
    }

    /// Everything in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        {
            let r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            out += "# HELP kiln_requests_total HTTP requests answered, by endpoint and status.\n";
            out += "# TYPE kiln_requests_total counter\n";
            for ((ep, status), n) in &r.counts {
                let _ = writeln!(
                    out,
                    "kiln_requests_total{{endpoint=\"{ep}\",status=\"{status}\"}} {n}"
                );
            }
            out += "# HELP kiln_request_duration_seconds Time to the response head, by endpoint.\n";
            out += "# TYPE kiln_request_duration_seconds histogram\n";
            for (ep, h) in &r.latency {
                h.render(
                    &mut out,
                    "kiln_request_duration_seconds",
                    &format!("endpoint=\"{ep}\""),
                );
            }
        }
        out += "# HELP kiln_batch_size Texts per model call (dynamic batching).\n";
        out += "# TYPE kiln_batch_size histogram\n";
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .render(&mut out, "kiln_batch_size", "");
        out += "# HELP kiln_decode_batch_size Generations advanced together per decoding step.\n";
        out += "# TYPE kiln_decode_batch_size histogram\n";
        self.decode_batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .render(&mut out, "kiln_decode_batch_size", "");
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "kiln_queue_depth",
            "gauge",
            "Requests waiting for the model worker.",
            self.queue_depth().to_string(),
        );
        gauge(
            &mut out,
            "kiln_queue_capacity",
            "gauge",
            "Most requests that may wait before 503.",
            self.queue_capacity.to_string(),
        );
        gauge(
            &mut out,
            "kiln_prompt_tokens_total",
            "counter",
            "Tokens of inputs and prompts.",
            self.prompt_tokens.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "kiln_generated_tokens_total",
            "counter",
            "Tokens generated.",
            self.generated_tokens.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "kiln_generation_seconds_total",
            "counter",
            "Wall time of decoding steps (tokens/s = rate of tokens / rate of this).",
            (self.generation_micros.load(Ordering::Relaxed) as f64 / 1e6).to_string(),
        );
        gauge(
            &mut out,
            "kiln_panics_total",
            "counter",
            "Panics caught in model compute (answered 500).",
            self.panics.load(Ordering::Relaxed).to_string(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_histograms() {
        let m = Metrics::new(8);
        m.request("/v1/classify", 200, Duration::from_millis(3));
        m.request("/v1/classify", 200, Duration::from_millis(30));
        m.request("/v1/classify", 400, Duration::from_micros(500));
        m.batch(3);
        m.queued(2);
        m.decode_step(3, Duration::from_millis(300));
        m.decode_step(2, Duration::from_millis(200));
        let text = m.render();
        for line in [
            "kiln_requests_total{endpoint=\"/v1/classify\",status=\"200\"} 2",
            "kiln_requests_total{endpoint=\"/v1/classify\",status=\"400\"} 1",
            "kiln_request_duration_seconds_bucket{endpoint=\"/v1/classify\",le=\"0.001\"} 1",
            "kiln_request_duration_seconds_bucket{endpoint=\"/v1/classify\",le=\"0.005\"} 2",
            "kiln_request_duration_seconds_bucket{endpoint=\"/v1/classify\",le=\"+Inf\"} 3",
            "kiln_request_duration_seconds_count{endpoint=\"/v1/classify\"} 3",
            "kiln_batch_size_bucket{le=\"2\"} 0",
            "kiln_batch_size_bucket{le=\"4\"} 1",
            "kiln_batch_size_sum 3",
            "kiln_queue_depth 2",
            "kiln_queue_capacity 8",
            "kiln_decode_batch_size_bucket{le=\"2\"} 1",
            "kiln_decode_batch_size_bucket{le=\"4\"} 2",
            "kiln_generated_tokens_total 5",
            "kiln_generation_seconds_total 0.5",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
