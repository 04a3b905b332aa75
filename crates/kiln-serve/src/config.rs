//! [`ServeConfig`]: where to listen, batching, queue and request limits.

use std::time::Duration;

/// Server settings; `Default` listens on 127.0.0.1:8080 with dynamic batching on.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// Address to bind (default `127.0.0.1`).
    pub host: String,
    /// Port to bind; 0 picks a free one (default 8080).
    pub port: u16,
    /// Most texts run as one batch by the worker (default 16).
    pub max_batch: usize,
    /// How long the worker waits for more requests to fill a batch (default 5 ms).
    pub max_wait: Duration,
    /// Requests waiting for the worker before new ones are refused with 503 (default 256).
    pub queue: usize,
    /// Dynamic batching of classify / embedding requests (default on; off runs each request
    /// alone, for comparison).
    pub batching: bool,
    /// Largest request body in bytes, else 413 (default 1 MiB).
    pub body_limit: usize,
    /// Most texts in one classify / embeddings request, else 413 (default 256).
    pub max_texts: usize,
    /// Most tokens in one text (special tokens included), else 422 (default 512; never above
    /// the model's position limit).
    pub max_text_tokens: usize,
    /// Largest `max_tokens` a completion may ask for, else 422 (default 512).
    pub max_tokens: usize,
    /// `max_tokens` of a completion request that gives none (default 16, as OpenAI).
    pub default_max_tokens: usize,
    /// The model's name in responses and `/v1/models` (default: the file stem or directory
    /// name of the model path).
    pub model_name: Option<String>,
    /// Print one line per request to stderr (default off).
    pub log_requests: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            max_batch: 16,
            max_wait: Duration::from_millis(5),
            queue: 256,
            batching: true,
            body_limit: 1 << 20,
            max_texts: 256,
            max_text_tokens: 512,
            max_tokens: 512,
            default_max_tokens: 16,
            model_name: None,
            log_requests: false,
        }
    }
}

impl ServeConfig {
    /// Sets the bind address.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// Sets the port (0: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Sets the largest batch (in texts).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }

    /// Sets the longest wait for a batch to fill, in milliseconds.
    pub fn max_wait_ms(mut self, ms: u64) -> Self {
        self.max_wait = Duration::from_millis(ms);
        self
    }

    /// Sets the queue length.
    pub fn queue(mut self, n: usize) -> Self {
        self.queue = n;
        self
    }

    /// Turns dynamic batching on or off.
    pub fn batching(mut self, on: bool) -> Self {
        self.batching = on;
        self
    }

    /// Sets the body size limit in bytes.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Sets the most texts per request.
    pub fn max_texts(mut self, n: usize) -> Self {
        self.max_texts = n;
        self
    }

    /// Sets the most tokens per text.
    pub fn max_text_tokens(mut self, n: usize) -> Self {
        self.max_text_tokens = n;
        self
    }

    /// Sets the cap on a completion's `max_tokens`.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }

    /// Sets the `max_tokens` used when a request gives none.
    pub fn default_max_tokens(mut self, n: usize) -> Self {
        self.default_max_tokens = n;
        self
    }

    /// Sets the model's served name.
    pub fn model_name(mut self, name: impl Into<String>) -> Self {
        self.model_name = Some(name.into());
        self
    }

    /// Turns per-request log lines on or off.
    pub fn log_requests(mut self, on: bool) -> Self {
        self.log_requests = on;
        self
    }

    /// Checks the values; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_batch", self.max_batch),
            ("queue", self.queue),
            ("body_limit", self.body_limit),
            ("max_texts", self.max_texts),
            ("max_text_tokens", self.max_text_tokens),
            ("max_tokens", self.max_tokens),
            ("default_max_tokens", self.default_max_tokens),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("ServeConfig: {name} must be at least 1"));
            }
        }
        if self.host.is_empty() {
            return Err("ServeConfig: host must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_builders() {
        let c = ServeConfig::default();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8080));
        assert_eq!((c.max_batch, c.queue), (16, 256));
        assert_eq!(c.max_wait, Duration::from_millis(5));
        assert!(c.batching && c.validate().is_ok());
        let c = c
            .port(0)
            .max_batch(4)
            .max_wait_ms(9)
            .queue(2)
            .batching(false);
        assert_eq!((c.port, c.max_batch, c.queue), (0, 4, 2));
        assert_eq!(c.max_wait, Duration::from_millis(9));
        assert!(!c.batching);
    }

    #[test]
    fn zero_limits_are_rejected_by_name() {
        let e = ServeConfig::default().queue(0).validate().unwrap_err();
        assert!(e.contains("queue must be at least 1"), "{e}");
        let e = ServeConfig::default().max_tokens(0).validate().unwrap_err();
        assert!(e.contains("max_tokens"), "{e}");
        let e = ServeConfig::default().host("").validate().unwrap_err();
        assert!(e.contains("host"), "{e}");
    }
}
