//! Request bodies, their parsing (errors name the field) and validation.

use crate::error::ApiError;
use axum::http::StatusCode;
use kiln_data::ChatMessage;
use kiln_models::GenerationConfig;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// `POST /v1/classify`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// A text or an array of texts.
    pub input: Value,
    /// The model name (optional; must be the served one).
    pub model: Option<String>,
}

/// `POST /v1/embeddings` (OpenAI shape).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsRequest {
    /// A text or an array of texts.
    pub input: Value,
    /// The model name (optional; must be the served one).
    pub model: Option<String>,
    /// `float` (default) or `base64` (little-endian f32).
    pub encoding_format: Option<String>,
    /// End-user id (accepted, unused).
    pub user: Option<String>,
}

/// Declares a generation request: its own fields plus the sampling fields both completion
/// endpoints take (spelled out, since `deny_unknown_fields` does not work with `flatten`).
macro_rules! generation_request {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty,)*
            /// The model name (optional; must be the served one).
            pub model: Option<String>,
            /// Most new tokens.
            pub max_tokens: Option<i64>,
            /// 0 decodes greedily; above 0 samples (default 1).
            pub temperature: Option<f64>,
            /// Nucleus sampling mass, in (0, 1].
            pub top_p: Option<f64>,
            /// Keep the k most likely tokens (≥ 1).
            pub top_k: Option<i64>,
            /// Sampler seed (default 0: answers are reproducible).
            pub seed: Option<u64>,
            /// A stop string or up to 4 of them.
            pub stop: Option<Value>,
            /// HF repetition penalty (> 0; 1 is none).
            pub repetition_penalty: Option<f64>,
            /// Stream server-sent events.
            pub stream: Option<bool>,
            /// Number of choices (only 1).
            pub n: Option<i64>,
            /// End-user id (accepted, unused).
            pub user: Option<String>,
        }

        impl $name {
            /// The sampling fields.
            pub fn sampling(&self) -> Sampling {
                Sampling {
                    max_tokens: self.max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    seed: self.seed,
                    stop: self.stop.clone(),
                    repetition_penalty: self.repetition_penalty,
                    stream: self.stream,
                    n: self.n,
                }
            }
        }
    };
}

generation_request!(
    /// `POST /v1/completions` (OpenAI shape).
    CompletionRequest {
        /// The text to continue.
        prompt: Value,
    }
);

generation_request!(
    /// `POST /v1/chat/completions` (OpenAI shape).
    ChatRequest {
        /// `[{"role", "content"}]`.
        messages: Value,
    }
);

/// The generation parameters both completion endpoints take.
#[derive(Debug, Default, Clone)]
pub struct Sampling {
    /// Most new tokens.
    pub max_tokens: Option<i64>,
    /// 0 decodes greedily; above 0 samples (default 1).
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (≥ 1).
    pub top_k: Option<i64>,
    /// Sampler seed (default 0).
    pub seed: Option<u64>,
    /// A stop string or up to 4 of them.
    pub stop: Option<Value>,
    /// HF repetition penalty.
    pub repetition_penalty: Option<f64>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Number of choices (only 1).
    pub n: Option<i64>,
}

/// Parses a JSON body into `T`; errors are 400 naming the field.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the request body is empty; expected a JSON object",
        ));
    }
    // serde would also read a struct from an array of its fields: only objects are requests.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(match serde_json::from_slice::<Value>(body) {
            Err(e) => ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")),
            Ok(v) => ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the request body must be a JSON object, got {}",
                    type_name(&v)
                ),
            ),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    if value.is_ok() {
        de.end()
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    }
    value.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {msg}"));
        }
        if let Some(field) = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            // The path ends with the unknown field itself.
            let name = if path == "." {
                field.to_string()
            } else {
                path.clone()
            };
            return ApiError::bad_field(
                name.clone(),
                format!("unknown field `{name}`: {}", strip_position(&msg)),
            );
        }
        if let Some(field) = msg
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            return ApiError::bad_field(field, format!("missing field `{field}`"));
        }
        if path == "." {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the request body must be a JSON object: {}",
                    strip_position(&msg)
                ),
            );
        }
        ApiError::bad_field(path.clone(), format!("{path}: {}", strip_position(&msg)))
    })
}

/// serde_json's message without " at line L column C".
fn strip_position(msg: &str) -> &str {
    msg.rfind(" at line ").map_or(msg, |i| &msg[..i])
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The texts of an `input` field: a non-empty string or a non-empty array of them, at most
/// `max_texts` (else 413).
pub fn texts(input: &Value, max_texts: usize) -> Result<Vec<String>, ApiError> {
    let bad = |m: String| ApiError::bad_field("input", m);
    match input {
        Value::String(s) if s.is_empty() => Err(bad("input must not be empty".into())),
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) if a.is_empty() => Err(bad("input must not be an empty array".into())),
        Value::Array(a) if a.len() > max_texts => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "input has {} texts, more than the limit of {max_texts} per request",
                a.len()
            ),
        )
        .param("input")),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) if s.is_empty() => Err(ApiError::bad_field(
                    format!("input[{i}]"),
                    format!("input[{i}] must not be empty"),
                )),
                Value::String(s) => Ok(s.clone()),
                other => Err(ApiError::bad_field(
                    format!("input[{i}]"),
                    format!("input[{i}] must be a string, got {}", type_name(other)),
                )),
            })
            .collect(),
        other => Err(bad(format!(
            "input must be a string or an array of strings, got {}",
            type_name(other)
        ))),
    }
}

/// The prompt of a completion: a non-empty string.
pub fn prompt(v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) if s.is_empty() => {
            Err(ApiError::bad_field("prompt", "prompt must not be empty"))
        }
        Value::String(s) => Ok(s.clone()),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => prompt(&a[0]),
        other => Err(ApiError::bad_field(
            "prompt",
            format!("prompt must be a string, got {}", type_name(other)),
        )),
    }
}

/// The messages of a chat request: a non-empty array of `{"role", "content"}` with role
/// `system`, `user` or `assistant`.
pub fn messages(v: &Value) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(a) = v else {
        return Err(ApiError::bad_field(
            "messages",
            format!("messages must be an array, got {}", type_name(v)),
        ));
    };
    if a.is_empty() {
        return Err(ApiError::bad_field(
            "messages",
            "messages must not be empty",
        ));
    }
    a.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |f: &str| format!("messages[{i}].{f}");
            let Value::Object(o) = m else {
                return Err(ApiError::bad_field(
                    format!("messages[{i}]"),
                    format!("messages[{i}] must be an object, got {}", type_name(m)),
                ));
            };
            if let Some(k) = o
                .keys()
                .find(|k| !matches!(k.as_str(), "role" | "content" | "name"))
            {
                return Err(ApiError::bad_field(
                    at(k),
                    format!("unknown field `{}` (expected role, content, name)", at(k)),
                ));
            }
            let role = match o.get("role") {
                Some(Value::String(r)) if matches!(r.as_str(), "system" | "user" | "assistant") => {
                    r.clone()
                }
                Some(Value::String(r)) => {
                    return Err(ApiError::bad_field(
                        at("role"),
                        format!(
                            "{} must be system, user or assistant, got {r:?}",
                            at("role")
                        ),
                    ))
                }
                Some(other) => {
                    return Err(ApiError::bad_field(
                        at("role"),
                        format!("{} must be a string, got {}", at("role"), type_name(other)),
                    ))
                }
                None => {
                    return Err(ApiError::bad_field(
                        at("role"),
                        format!("missing field `{}`", at("role")),
                    ))
                }
            };
            let content = match o.get("content") {
                Some(Value::String(c)) => c.clone(),
                Some(other) => {
                    return Err(ApiError::bad_field(
                        at("content"),
                        format!(
                            "{} must be a string, got {}",
                            at("content"),
                            type_name(other)
                        ),
                    ))
                }
                None => {
                    return Err(ApiError::bad_field(
                        at("content"),
                        format!("missing field `{}`", at("content")),
                    ))
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// A validated generation request: the config (without stop tokens), stop strings, streaming.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Sampling settings and the token budget.
    pub config: GenerationConfig,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream server-sent events.
    pub stream: bool,
}

/// Checks `s`: `max_tokens` in 1..=`cap` (422 above), temperature ≥ 0, top_p in (0, 1],
/// top_k ≥ 1, repetition_penalty > 0, stop a string or ≤ 4 non-empty strings, n = 1.
pub fn generation(
    s: &Sampling,
    default_max: usize,
    cap: usize,
) -> Result<GenerationParams, ApiError> {
    let max_tokens = match s.max_tokens {
        None => default_max.min(cap),
        Some(n) if n < 1 => {
            return Err(ApiError::bad_field(
                "max_tokens",
                format!("max_tokens must be at least 1, got {n}"),
            ))
        }
        Some(n) if n as u64 > cap as u64 => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("max_tokens {n} is above this server's limit of {cap}"),
            )
            .param("max_tokens"))
        }
        Some(n) => n as usize,
    };
    let temperature = s.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::bad_field(
            "temperature",
            format!("temperature must be a finite number ≥ 0, got {temperature}"),
        ));
    }
    let mut config = if temperature == 0.0 {
        GenerationConfig::greedy(max_tokens)
    } else {
        GenerationConfig::sampling(max_tokens, temperature as f32, s.seed.unwrap_or(0))
    };
    if let Some(p) = s.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad_field(
                "top_p",
                format!("top_p must be in (0, 1], got {p}"),
            ));
        }
        config.top_p = Some(p as f32);
    }
    if let Some(k) = s.top_k {
        if k < 1 {
            return Err(ApiError::bad_field(
                "top_k",
                format!("top_k must be at least 1, got {k}"),
            ));
        }
        config.top_k = Some(k as usize);
    }
    if let Some(r) = s.repetition_penalty {
        if !(r.is_finite() && r > 0.0) {
            return Err(ApiError::bad_field(
                "repetition_penalty",
                format!("repetition_penalty must be a finite number > 0, got {r}"),
            ));
        }
        config.repetition_penalty = r as f32;
    }
    if let Some(n) = s.n {
        if n != 1 {
            return Err(ApiError::bad_field(
                "n",
                format!("n must be 1 (one choice per request), got {n}"),
            ));
        }
    }
    let stop = match &s.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(x)) if x.is_empty() => {
            return Err(ApiError::bad_field("stop", "stop must not be empty"))
        }
        Some(Value::String(x)) => vec![x.clone()],
        Some(Value::Array(a)) if a.len() > 4 => {
            return Err(ApiError::bad_field(
                "stop",
                format!("stop takes at most 4 strings, got {}", a.len()),
            ))
        }
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(x) if !x.is_empty() => Ok(x.clone()),
                other => Err(ApiError::bad_field(
                    format!("stop[{i}]"),
                    format!(
                        "stop[{i}] must be a non-empty string, got {}",
                        if other.is_string() {
                            "\"\""
                        } else {
                            type_name(other)
                        }
                    ),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::bad_field(
                "stop",
                format!(
                    "stop must be a string or an array of strings, got {}",
                    type_name(other)
                ),
            ))
        }
    };
    config
        .validate()
        .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, m))?;
    Ok(GenerationParams {
        config,
        stop,
        stream: s.stream.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: std::fmt::Debug>(r: Result<T, ApiError>) -> ApiError {
        r.unwrap_err()
    }

    #[test]
    fn parse_errors_name_the_field() {
        let e = err(parse::<ClassifyRequest>(b"{\"input\": 1,"));
        assert!(e.message.starts_with("malformed JSON"), "{e}");
        let e = err(parse::<ClassifyRequest>(b"  "));
        assert!(e.message.contains("empty"), "{e}");
        let e = err(parse::<ClassifyRequest>(
            b"{\"input\": \"a\", \"inptu\": 1}",
        ));
        assert_eq!(e.param.as_deref(), Some("inptu"), "{e}");
        let e = err(parse::<ClassifyRequest>(b"{}"));
        assert_eq!(e.param.as_deref(), Some("input"), "{e}");
        let e = err(parse::<CompletionRequest>(
            b"{\"prompt\": \"a\", \"temperature\": \"hot\"}",
        ));
        assert_eq!(e.param.as_deref(), Some("temperature"), "{e}");
        let e = err(parse::<CompletionRequest>(
            b"{\"prompt\": \"a\", \"frob\": 1}",
        ));
        assert_eq!(e.param.as_deref(), Some("frob"), "{e}");
        let e = err(parse::<CompletionRequest>(
            b"{\"prompt\": \"a\", \"seed\": -1}",
        ));
        assert_eq!(e.param.as_deref(), Some("seed"), "{e}");
        let e = err(parse::<ClassifyRequest>(b"[1, 2]"));
        assert!(e.message.contains("must be a JSON object"), "{e}");
        let e = err(parse::<ClassifyRequest>(b"{\"input\": \"a\"} x"));
        assert!(e.message.starts_with("malformed JSON"), "{e}");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn inputs_are_strings_or_arrays_of_strings() {
        assert_eq!(texts(&"a".into(), 4).unwrap(), vec!["a"]);
        assert_eq!(
            texts(&serde_json::json!(["a", "b"]), 4).unwrap(),
            vec!["a", "b"]
        );
        let e = err(texts(&serde_json::json!(["a", 3]), 4));
        assert_eq!(e.param.as_deref(), Some("input[1]"));
        assert!(e.message.contains("must be a string, got a number"), "{e}");
        assert!(err(texts(&serde_json::json!([]), 4))
            .message
            .contains("empty"));
        assert!(err(texts(&"".into(), 4)).message.contains("empty"));
        assert!(err(texts(&Value::Null, 4)).message.contains("got null"));
        let e = err(texts(&serde_json::json!(vec!["a"; 5]), 4));
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn generation_parameters_are_checked() {
        let ok = |s: Sampling| generation(&s, 16, 32).unwrap();
        let bad = |s: Sampling| generation(&s, 16, 32).unwrap_err();
        let p = ok(Sampling::default());
        assert_eq!(p.config.max_new_tokens, 16);
        assert!(p.config.do_sample && p.config.seed == 0);
        let p = ok(Sampling {
            temperature: Some(0.0),
            max_tokens: Some(3),
            stop: Some(serde_json::json!(["x", "y"])),
            ..Default::default()
        });
        assert!(!p.config.do_sample);
        assert_eq!((p.config.max_new_tokens, p.stop.len()), (3, 2));
        let e = bad(Sampling {
            top_p: Some(7.0),
            ..Default::default()
        });
        assert_eq!(e.param.as_deref(), Some("top_p"));
        let e = bad(Sampling {
            max_tokens: Some(-3),
            ..Default::default()
        });
        assert_eq!(
            (e.param.as_deref(), e.status.as_u16()),
            (Some("max_tokens"), 400)
        );
        let e = bad(Sampling {
            max_tokens: Some(33),
            ..Default::default()
        });
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        let e = bad(Sampling {
            temperature: Some(-0.5),
            ..Default::default()
        });
        assert_eq!(e.param.as_deref(), Some("temperature"));
        for (s, field) in [
            (
                Sampling {
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                Sampling {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                Sampling {
                    n: Some(2),
                    ..Default::default()
                },
                "n",
            ),
            (
                Sampling {
                    stop: Some(serde_json::json!(["a", "b", "c", "d", "e"])),
                    ..Default::default()
                },
                "stop",
            ),
            (
                Sampling {
                    stop: Some(serde_json::json!([""])),
                    ..Default::default()
                },
                "stop[0]",
            ),
            (
                Sampling {
                    stop: Some(serde_json::json!(5)),
                    ..Default::default()
                },
                "stop",
            ),
        ] {
            assert_eq!(bad(s).param.as_deref(), Some(field));
        }
    }

    #[test]
    fn chat_messages_are_checked() {
        let m = messages(&serde_json::json!([{"role": "user", "content": "hi"}])).unwrap();
        assert_eq!(m.len(), 1);
        for (v, field) in [
            (serde_json::json!([]), "messages"),
            (serde_json::json!("hi"), "messages"),
            (serde_json::json!([1]), "messages[0]"),
            (
                serde_json::json!([{"role": "robot", "content": "x"}]),
                "messages[0].role",
            ),
            (serde_json::json!([{"role": "user"}]), "messages[0].content"),
            (
                serde_json::json!([{"role": "user", "content": 1}]),
                "messages[0].content",
            ),
            (
                serde_json::json!([{"role": "user", "content": "x", "x": 1}]),
                "messages[0].x",
            ),
        ] {
            assert_eq!(err(messages(&v)).param.as_deref(), Some(field), "{v}");
        }
        assert!(prompt(&serde_json::json!(["one"])).is_ok());
        assert_eq!(
            err(prompt(&serde_json::json!(3))).param.as_deref(),
            Some("prompt")
        );
    }
}
