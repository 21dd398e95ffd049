//! Logging and trace context.
//!
//! Logs go to stderr, as text or JSON (`FLOTA_LOG_FORMAT=json`), filtered by
//! `RUST_LOG` (default `info`). Trace context crosses processes as a W3C
//! `traceparent` string: in AMQP headers, in HTTP headers to the GPU server,
//! and its trace id in every result envelope.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Config, LogFormat};

/// Target of spans that exist for traces only (lock, GPU call, publish). Log
/// lines skip them and keep the enclosing task span as their context, so
/// every line of a task still carries its `task_id` and `trace_id`.
pub const TRACE_ONLY: &str = "flota::trace";

/// Install the global subscriber (logs only). Safe to call twice.
pub fn init(format: LogFormat) {
    let _ = install(format, None);
}

/// Logs, plus OTLP trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
/// Keep the guard alive for the process's life: dropping it flushes spans.
pub fn init_with_config(config: &Config, service: &'static str) -> TelemetryGuard {
    let provider =
        config.otlp_endpoint.as_deref().and_then(|endpoint| match otlp_provider(endpoint, service) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{service}: OTLP export disabled: {e}");
                None
            }
        });
    let tracer = provider.as_ref().map(|p| p.tracer(service));
    let _ = install(config.log_format, tracer);
    if let Some(endpoint) = &config.otlp_endpoint {
        tracing::info!(message = "Exporting traces over OTLP/HTTP.", endpoint = %crate::config::redact_url(endpoint));
    }
    TelemetryGuard { provider }
}

fn install(
    format: LogFormat,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
) -> Result<(), tracing_subscriber::util::TryInitError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    subscriber(format, filter, tracer).try_init()
}

/// Log lines through `filter`, spans to OTLP when there is a tracer.
fn subscriber(
    format: LogFormat,
    filter: EnvFilter,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
) -> impl tracing::Subscriber + Send + Sync + 'static {
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        // Colours only on a terminal: a log file, journald or `docker logs` would keep the escapes.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // `RUST_LOG` filters the log lines only; spans export at info whatever the log level.
    let otel = tracer.map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    // The closure only takes lines away, so it adds no level of its own: without this
    // hint the stack has none, every `trace!` of lapin, hyper and redis is asked about
    // at run time, and spans nobody records are built for every task.
    let kept = tracing_subscriber::filter::filter_fn(|meta| {
        (!meta.is_span() || meta.target() != TRACE_ONLY) && !dumps_frames(meta.target(), *meta.level())
    })
    .with_max_level_hint(tracing_subscriber::filter::LevelFilter::TRACE);
    // A task's span is the context of its lines at any log level: at `RUST_LOG=warn` a
    // warning inside a task still names its task and trace.
    let task_spans = tracing_subscriber::filter::filter_fn(is_task_span)
        .with_max_level_hint(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::registry().with(fmt.with_filter(filter.or(task_spans).and(kept))).with(otel)
}

/// The spans one task's or one request's lines are logged in: the worker's
/// `consume`, the scheduler's `record` and `submit` (pure).
fn is_task_span(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span()
        && matches!(meta.name(), "consume" | "record" | "submit")
        && (meta.target().starts_with("flota_worker") || meta.target().starts_with("flota_scheduler"))
}

/// Crates whose trace level prints every AMQP frame with `Debug`: the login's
/// PLAIN response (user and password) and each message body (prompt text).
const FRAME_DUMPERS: [&str; 2] = ["lapin", "amq_protocol"];

/// A trace line of a [`FRAME_DUMPERS`] crate: never logged, whatever `RUST_LOG`
/// says (their debug level and up stay available) (pure).
fn dumps_frames(target: &str, level: tracing::Level) -> bool {
    level == tracing::Level::TRACE && FRAME_DUMPERS.iter().any(|c| target.starts_with(c))
}

fn otlp_provider(endpoint: &str, service: &'static str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// Flushes and stops trace export when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Blocks while flushing: runs once, at exit.
            let _ = p.shutdown();
        }
    }
}

/// Make `span` a child of the remote context in `tp`, so exported spans join
/// the producer's trace (a no-op without OTLP export).
pub fn set_remote_parent(span: &tracing::Span, tp: &TraceParent) {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let (Ok(trace_id), Ok(span_id)) = (TraceId::from_hex(&tp.trace_id), SpanId::from_hex(&tp.span_id)) else {
        return;
    };
    let flags = if tp.flags == "01" { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let cx = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        TraceState::default(),
    ));
    let _ = span.set_parent(cx);
}

/// The `traceparent` to send downstream from inside `span`: the span's own
/// context when traces are exported (so the receiver's span is its child),
/// else `fallback` (a fresh span id in the same trace: the trace id travels).
pub fn traceparent_in(span: &tracing::Span, fallback: &str) -> String {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8())
    } else {
        fallback.to_string()
    }
}

/// A parsed W3C trace context (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub span_id: String,
    pub flags: String,
}

impl TraceParent {
    /// A new root context (sampled).
    pub fn new_root() -> TraceParent {
        TraceParent { trace_id: random_hex(16), span_id: random_hex(8), flags: "01".into() }
    }

    /// Parse a header; `None` when it is not a valid version-00 traceparent.
    pub fn parse(s: &str) -> Option<TraceParent> {
        let mut parts = s.trim().split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |v: &str, n: usize| {
            v.len() == n && v.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        if parts.next().is_some()
            || version != "00"
            || !hex(trace_id, 32)
            || !hex(span_id, 16)
            || !hex(flags, 2)
            || trace_id.bytes().all(|b| b == b'0')
            || span_id.bytes().all(|b| b == b'0')
        {
            return None;
        }
        Some(TraceParent { trace_id: trace_id.into(), span_id: span_id.into(), flags: flags.into() })
    }

    /// Parse, or start a new trace when absent or invalid.
    pub fn parse_or_new(s: Option<&str>) -> TraceParent {
        s.and_then(TraceParent::parse).unwrap_or_else(TraceParent::new_root)
    }

    /// The same trace, a new span (what a process forwards downstream).
    pub fn child(&self) -> TraceParent {
        TraceParent { trace_id: self.trace_id.clone(), span_id: random_hex(8), flags: self.flags.clone() }
    }

    pub fn header(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// `bytes` random bytes (never all zero, which W3C trace context forbids) as
/// hex, from the thread's userspace RNG: no system call per id.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    loop {
        rand::fill(&mut buf[..]);
        if buf.iter().any(|b| *b != 0) {
            return hex::encode(&buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What no layer wants is not even built: the stack's level is the log
    /// level, or info when spans are exported (pure: nothing is installed).
    #[test]
    fn the_stack_asks_for_no_more_than_its_layers_want() {
        use tracing::Subscriber;
        use tracing_subscriber::filter::LevelFilter;
        let logs = |level: &str| subscriber(LogFormat::Text, EnvFilter::new(level), None).max_level_hint();
        // Info at the least: the tasks' own spans are kept at every log level.
        assert_eq!(logs("warn"), Some(LevelFilter::INFO));
        assert_eq!(logs("info"), Some(LevelFilter::INFO));
        assert_eq!(logs("lapin=debug,warn"), Some(LevelFilter::DEBUG));
        let json = subscriber(LogFormat::Json, EnvFilter::new("error"), None);
        assert_eq!(json.max_level_hint(), Some(LevelFilter::INFO));
        let tracer = SdkTracerProvider::builder().build().tracer("test");
        let exported = subscriber(LogFormat::Text, EnvFilter::new("warn"), Some(tracer));
        assert_eq!(exported.max_level_hint(), Some(LevelFilter::INFO), "spans still reach OTLP at warn");
    }

    #[test]
    fn amqp_frame_dumps_are_never_logged() {
        use tracing::Level;
        assert!(dumps_frames("lapin::io_loop", Level::TRACE));
        assert!(dumps_frames("lapin::channels", Level::TRACE));
        assert!(dumps_frames("amq_protocol_tcp", Level::TRACE));
        assert!(!dumps_frames("lapin::channels", Level::DEBUG));
        assert!(!dumps_frames("flota_worker::consumer", Level::TRACE));
    }

    #[test]
    fn parses_the_w3c_example() {
        let tp = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(tp.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.span_id, "00f067aa0ba902b7");
        assert_eq!(tp.header(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    }

    #[test]
    fn refuses_bad_headers_and_makes_new_roots() {
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
        let root = TraceParent::parse_or_new(Some("garbage"));
        assert!(TraceParent::parse(&root.header()).is_some());
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
    }
}
