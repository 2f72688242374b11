//! JSON log lines that machines and people read: one object per line with `timestamp`,
//! `level`, `target` and `message` first, then the fields of the enclosing spans and of
//! the event, flat (an event's field wins over a span's of the same name).
//!
//! tracing-subscriber's own JSON format repeats span data (`span` and `spans`), writes a
//! second `message` key when an event has a field of that name (here the field is the
//! message and the format string its `summary`), and prints `?`-recorded
//! values as Rust `Debug` text. Here a list recorded with `?` (`file_keys = ?keys`)
//! becomes a JSON array, `Some(x)` becomes `x` and `None` becomes `null`.

use std::fmt;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format of `telemetry.log_format = "json"`; span fields must be recorded
/// with [`JsonFields`].
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Line::default();
        line.put(
            "timestamp",
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.put("level", Value::String(meta.level().as_str().into()));
        line.put("target", Value::String(meta.target().into()));
        line.put("message", Value::String(String::new()));
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields) {
                    for (k, v) in map {
                        line.put(&k, tidy(v));
                    }
                }
            }
        }
        let mut visitor = EventFields {
            line: &mut line,
            messages: Vec::new(),
        };
        event.record(&mut visitor);
        let EventFields { mut messages, .. } = visitor;
        // tracing records the format string first and a `message = ..` field after it:
        // the field, the more specific text, is the line's message, and the format string
        // is kept as `summary` rather than written as a second `message` key.
        if let Some(message) = messages.pop() {
            line.put("message", Value::String(message));
        }
        if let Some(format_string) = messages.pop() {
            line.put("summary", Value::String(format_string));
        }
        writeln!(writer, "{}", line.render())
    }
}

/// Keys in insertion order, each once (a later value replaces an earlier one in place).
#[derive(Default)]
struct Line(Vec<(String, Value)>);

impl Line {
    fn put(&mut self, key: &str, value: Value) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    fn render(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
            .collect();
        format!("{{{}}}", parts.join(","))
    }
}

struct EventFields<'a> {
    line: &'a mut Line,
    messages: Vec<String>,
}

impl Visit for EventFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.messages.push(value.to_string());
        } else {
            self.line
                .put(field.name(), Value::String(value.to_string()));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.line.put(field.name(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.line.put(field.name(), Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.line.put(field.name(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.line.put(field.name(), Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.line
            .put(field.name(), Value::String(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.messages.push(text);
        } else {
            self.line.put(field.name(), tidy(Value::String(text)));
        }
    }
}

/// Rust `Debug` text made JSON: `["a", "b"]` as an array, `Some("x")` as `"x"`, `None`
/// as null. Anything that does not parse stays the string it was.
fn tidy(value: Value) -> Value {
    let Value::String(text) = &value else {
        return value;
    };
    if text == "None" {
        return Value::Null;
    }
    if let Some(inner) = text.strip_prefix("Some(").and_then(|t| t.strip_suffix(')')) {
        return match serde_json::from_str::<Value>(inner) {
            Ok(v) => tidy(v),
            Err(_) => Value::String(inner.to_string()),
        };
    }
    if text.starts_with('[')
        && text.ends_with(']')
        && let Ok(array @ Value::Array(_)) = serde_json::from_str::<Value>(text)
    {
        return array;
    }
    value
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(log: impl FnOnce()) -> Vec<(String, serde_json::Map<String, Value>)> {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| {
                let keys = l.matches("\"message\":").count();
                assert_eq!(keys, 1, "one message key: {l}");
                let parsed = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                (l.to_string(), parsed)
            })
            .collect()
    }

    #[test]
    fn one_flat_object_per_line_with_arrays_and_no_debug_text() {
        let logged = lines(|| {
            let keys = vec!["dms/a.parquet", "dms/b.parquet"];
            let span = tracing::info_span!("batch", table = "orders", file_keys = ?keys);
            let _entered = span.enter();
            let held: Option<&str> = Some("missing key");
            let none: Option<&str> = None;
            tracing::warn!(message = "the alert's own text", reason = ?held, other = ?none, n = 3, "alert");
        });
        let (raw, line) = &logged[0];
        let at = |key: &str| raw.find(&format!("\"{key}\":")).unwrap();
        assert!(raw.starts_with("{\"timestamp\":"), "{raw}");
        assert!(
            at("level") < at("target") && at("target") < at("message"),
            "{raw}"
        );
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["message"], "the alert's own text");
        assert_eq!(line["summary"], "alert");
        assert_eq!(line["table"], "orders");
        assert_eq!(
            line["file_keys"],
            serde_json::json!(["dms/a.parquet", "dms/b.parquet"])
        );
        assert_eq!(line["reason"], "missing key");
        assert!(line["other"].is_null());
        assert_eq!(line["n"], 3);
        assert!(!line.contains_key("span") && !line.contains_key("spans"));
    }
}
