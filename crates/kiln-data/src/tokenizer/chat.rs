//! HF chat templates (Jinja) rendered with minijinja, in the environment transformers builds:
//! `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a
//! Python-style `tojson`, and Python string/dict methods (`.strip()`, `.items()`, ...).

use super::Tokenizer;
use crate::error::{DataError, Result};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

/// One chat turn: a role ("system", "user", "assistant", ...) and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: String,
    /// What they say.
    pub content: String,
}

impl ChatMessage {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("system", content)
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("user", content)
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("assistant", content)
    }

    fn to_value(&self) -> Value {
        Value::from_iter([
            ("role", Value::from(self.role.as_str())),
            ("content", Value::from(self.content.as_str())),
        ])
    }
}

/// A compiled chat template (`tokenizer.chat_template` of a GGUF, `chat_template` of a
/// `tokenizer_config.json`).
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    vars: Vec<(String, Value)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("vars", &self.vars)
            .finish()
    }
}

const NAME: &str = "chat_template";

fn template_err(e: Error) -> DataError {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg += &format!(": {s}");
        source = s.source();
    }
    DataError::ChatTemplate { msg }
}

impl ChatTemplate {
    /// Compiles `source` (errors carry minijinja's message and line).
    pub fn new(source: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(template_err)?;
        Ok(ChatTemplate {
            env,
            vars: Vec::new(),
        })
    }

    /// Defines a string variable for the template (e.g. `bos_token`), replacing an earlier one.
    pub fn with_var(mut self, name: &str, value: &str) -> ChatTemplate {
        self.vars.retain(|(n, _)| n != name);
        self.vars.push((name.to_string(), Value::from(value)));
        self
    }

    /// Defines `bos_token`, `eos_token`, `unk_token` and `pad_token` from `tokenizer`'s special
    /// tokens (those it has), as transformers passes them.
    pub fn with_tokenizer_tokens(mut self, tokenizer: &Tokenizer) -> ChatTemplate {
        let s = tokenizer.special_tokens();
        for (name, id) in [
            ("bos_token", s.bos),
            ("eos_token", s.eos),
            ("unk_token", s.unk),
            ("pad_token", s.pad),
        ] {
            if let Some(token) = id.and_then(|id| tokenizer.id_to_token(id)) {
                self = self.with_var(name, &token);
            }
        }
        self
    }

    /// Renders `messages`; `add_generation_prompt` asks the template to open an assistant turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(NAME).map_err(template_err)?;
        let msgs: Vec<Value> = messages.iter().map(ChatMessage::to_value).collect();
        let ctx = Value::from_iter(
            self.vars
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .chain([
                    ("messages".to_string(), Value::from(msgs)),
                    (
                        "add_generation_prompt".to_string(),
                        Value::from(add_generation_prompt),
                    ),
                ]),
        );
        template.render(ctx).map_err(template_err)
    }
}

/// `raise_exception(msg)`: templates call it to reject a conversation.
fn raise_exception(msg: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(
    value: &Value,
    indent: Option<usize>,
    kwargs: Kwargs,
) -> std::result::Result<Value, Error> {
    let indent = match kwargs.get::<Option<usize>>("indent")? {
        Some(i) => Some(i),
        None => indent,
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn newline(out: &mut String, indent: usize, level: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n(' ', indent * level));
}

/// Writes `v` as Python's `json.dumps` does (separators `", "`/`": "`, or `","` + newlines
/// when indenting; non-ASCII kept).
fn write_json(
    v: &Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), Error> {
    let quote = |s: &str| serde_json::to_string(s).expect("strings serialise");
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match i64::try_from(v.clone()) {
            Ok(i) if !v.to_string().contains('.') => out.push_str(&i.to_string()),
            _ => {
                let f = f64::try_from(v.clone())?;
                out.push_str(&if f.is_finite() {
                    format!("{f:?}")
                } else {
                    "NaN".into()
                });
            }
        },
        ValueKind::String => out.push_str(&quote(v.as_str().unwrap_or_default())),
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                match (i, indent) {
                    (_, Some(n)) => {
                        if i > 0 {
                            out.push(',');
                        }
                        newline(out, n, level + 1);
                    }
                    (0, None) => {}
                    (_, None) => out.push_str(", "),
                }
                out.push_str(&quote(
                    &k.as_str().map_or_else(|| k.to_string(), str::to_string),
                ));
                out.push_str(": ");
                write_json(&v.get_item(k)?, indent, level + 1, out)?;
            }
            if let Some(n) = indent {
                newline(out, n, level);
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                match (i, indent) {
                    (_, Some(n)) => {
                        if i > 0 {
                            out.push(',');
                        }
                        newline(out, n, level + 1);
                    }
                    (0, None) => {}
                    (_, None) => out.push_str(", "),
                }
                write_json(item, indent, level + 1, out)?;
            }
            if let Some(n) = indent {
                newline(out, n, level);
            }
            out.push(']');
        }
        _ => out.push_str(&quote(&v.to_string())),
    }
    Ok(())
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31) (H. Hinnant's civil_from_days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a (year, month, day) date (H. Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats the UTC time `secs` (since the Unix epoch) with C `strftime` directives.
fn strftime(fmt: &str, secs: i64) -> std::result::Result<String, Error> {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (tod / 3600, tod / 60 % 60, tod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let month = MONTHS[m as usize - 1];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let spec = chars.next().unwrap_or('%');
        let piece = match spec {
            'Y' => y.to_string(),
            'y' => format!("{:02}", y.rem_euclid(100)),
            'm' => format!("{m:02}"),
            'd' => format!("{d:02}"),
            'e' => format!("{d:>2}"),
            'B' => month.to_string(),
            'b' | 'h' => month[..3].to_string(),
            'A' => WEEKDAYS[weekday].to_string(),
            'a' => WEEKDAYS[weekday][..3].to_string(),
            'j' => format!("{yday:03}"),
            'H' => format!("{hh:02}"),
            'I' => format!("{:02}", (hh + 11) % 12 + 1),
            'p' => (if hh < 12 { "AM" } else { "PM" }).to_string(),
            'M' => format!("{mm:02}"),
            'S' => format!("{ss:02}"),
            'F' => format!("{y}-{m:02}-{d:02}"),
            'T' => format!("{hh:02}:{mm:02}:{ss:02}"),
            '%' => "%".to_string(),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{other}"),
                ))
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

/// `strftime_now(format)`: the current time (UTC) formatted with `strftime` directives.
fn strftime_now(fmt: String) -> std::result::Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&fmt, secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_exception_is_an_error_with_the_message() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}ok",
        )
        .unwrap();
        let err = t
            .render(&[ChatMessage::user("hi")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("first message must be system"), "{err}");
        assert_eq!(t.render(&[ChatMessage::system("s")], false).unwrap(), "ok");
    }

    #[test]
    fn syntax_error_is_reported_at_compile_time() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}").unwrap_err();
        assert!(matches!(err, DataError::ChatTemplate { .. }), "{err}");
        assert!(err.to_string().contains("chat template"), "{err}");
    }

    #[test]
    fn variables_reach_the_template() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}",
        )
        .unwrap()
        .with_var("bos_token", "<s>")
        .with_var("bos_token", "<BOS>");
        let out = t
            .render(&[ChatMessage::user("a"), ChatMessage::assistant("b")], true)
            .unwrap();
        assert_eq!(out, "<BOS>user=a;assistant=b;");
    }

    #[test]
    fn strftime_matches_known_dates() {
        // 2024-02-29T13:05:09Z is 1709211909 seconds after the epoch (a leap day, a Thursday).
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I%p %%", 1_709_211_909).unwrap(),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 24 01PM %"
        );
        assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert_eq!(strftime("%F %T", 86_399).unwrap(), "1970-01-01 23:59:59");
        assert!(strftime("%Q", 0).is_err());
    }
}
