//! Logs: readable text on a terminal; on Cloud Run (or `LOG_FORMAT=json`) one JSON object per
//! line in Cloud Logging's shape — `severity`, `message`, `time`, and every field of the event
//! and of the spans it happened in at the top level, where Logs Explorer can filter on them
//! (`jsonPayload.doc="ff_push_notifications/abc"`). Every line about one notification is in its
//! span (`doc`, `notification_id`); such a line also names the notification as its
//! `logging.googleapis.com/operation`, so Logs Explorer shows its lines together.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

pub fn init(format: &LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = match format {
        LogFormat::Json => json(std::io::stderr).with_env_filter(filter).try_init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init(),
    };
}

/// The Cloud Logging JSON subscriber, writing to `writer`.
pub fn json<W>(
    writer: W,
) -> tracing_subscriber::fmt::SubscriberBuilder<
    JsonFields,
    CloudLogging,
    tracing::level_filters::LevelFilter,
    W,
>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        // Span fields are kept as JSON, which `CloudLogging` reads back for each event.
        .fmt_fields(JsonFields::new())
        .event_format(CloudLogging)
        .with_writer(writer)
}

/// Formats events as Cloud Logging structured JSON. Needs span fields recorded by
/// [`JsonFields`], as [`json`] sets up.
pub struct CloudLogging;

/// Cloud Logging's special field that groups entries into one operation.
const OPERATION: &str = "logging.googleapis.com/operation";

fn severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The whole cause chain, so the log line says why, not just what.
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        self.0.insert(field.name().to_string(), Value::from(text));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), Value::from(format!("{value:?}")));
    }
}

impl<S, N> FormatEvent<S, N> for CloudLogging
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
        // Outermost span first, so that inner spans' fields win.
        let mut spans = Map::new();
        for span in ctx.event_scope().into_iter().flat_map(|s| s.from_root()) {
            if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields.as_str())
            {
                spans.extend(map);
            }
        }
        writeln!(writer, "{}", to_json(event, spans))
    }
}

fn to_json(event: &Event<'_>, spans: Map<String, Value>) -> String {
    let mut fields = Fields::default();
    event.record(&mut fields);
    let mut line = Map::new();
    let meta = event.metadata();
    line.insert("severity".into(), severity(meta.level()).into());
    line.insert(
        "message".into(),
        fields.0.remove("message").unwrap_or(Value::from("")),
    );
    line.insert(
        "time".into(),
        chrono::Utc::now()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .into(),
    );
    line.insert("target".into(), meta.target().into());
    for (k, v) in fields.0.into_iter().chain(spans) {
        line.entry(k).or_insert(v);
    }
    if let Some(id) = line.get("notification_id").cloned() {
        line.insert(
            OPERATION.into(),
            serde_json::json!({"id": id, "producer": "ffpush"}),
        );
    }
    Value::Object(line).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_cloud_logging_json() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = json(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                doc = "ff_push_notifications/abc",
                sent = 3u64,
                "notification finished"
            );
            tracing::info!("plain");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["severity"], "WARNING");
        assert_eq!(lines[0]["message"], "notification finished");
        assert_eq!(lines[0]["doc"], "ff_push_notifications/abc");
        assert_eq!(lines[0]["sent"], 3);
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(lines[1]["severity"], "INFO");
        assert!(
            lines[1].get(OPERATION).is_none(),
            "not about a notification"
        );
    }

    #[test]
    fn span_fields_and_the_operation_are_on_every_line_in_the_span() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = json(move || writer.clone())
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "notification",
                doc = "ff_push_notifications/abc",
                notification_id = "abc"
            );
            span.in_scope(|| {
                tracing::info!("claimed");
                tracing::debug_span!("inner", attempt = 2u64).in_scope(|| {
                    tracing::debug!(token = "tok…(9 chars)", "retrying");
                });
            });
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        for line in &lines {
            assert_eq!(line["doc"], "ff_push_notifications/abc", "{line}");
            assert_eq!(line["notification_id"], "abc", "{line}");
            assert_eq!(
                line[OPERATION],
                serde_json::json!({"id": "abc", "producer": "ffpush"})
            );
        }
        assert_eq!(lines[1]["attempt"], 2);
        assert_eq!(lines[1]["token"], "tok…(9 chars)");
    }
}
