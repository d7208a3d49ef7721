//! OpenTelemetry traces, exported over OTLP/HTTP when the standard `OTEL_…`
//! variables ask for it, and off otherwise (no layer, no exporter: a span
//! costs what a `tracing` span costs).
//!
//! On when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, unless `OTEL_SDK_DISABLED=true`
//! or `OTEL_TRACES_EXPORTER=none`. The SDK reads the rest itself:
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or
//! `http/json`), `OTEL_SERVICE_NAME` (default: the binary's name),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`),
//! `OTEL_BSP_SCHEDULE_DELAY` and the other batch settings.
//!
//! Context crosses Kafka as a W3C `traceparent` (and `tracestate`) record
//! header: the ingest writes its own server span's context, the state
//! service links each record of a batch to its batch span.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether the environment asks for exported traces.
pub fn configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The layer that turns `tracing` spans into exported OpenTelemetry spans,
/// when [`configured`]; `Err` says why the exporter cannot be built.
pub(crate) fn layer<S>(service: &str) -> Result<Option<impl Layer<S>>, String>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    if !configured() {
        return Ok(None);
    }
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/json") => Protocol::HttpJson,
        Ok("http/protobuf") | Err(_) => Protocol::HttpBinary,
        Ok(other) => {
            return Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL = {other:?}: dlrflow exports http/protobuf or http/json"
        ))
        }
    };
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .map_err(|e| format!("the OTLP exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer(service.to_owned());
    let _ = PROVIDER.set(provider);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(Some(tracing_opentelemetry::layer().with_tracer(tracer)))
}

/// Exports what is buffered and stops the exporter (at the process's end).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.shutdown();
    }
}

/// Whether spans are exported by this process.
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// The context a W3C `traceparent` (and `tracestate`) names; an invalid
/// or missing one gives the empty context.
pub fn extract(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let mut carrier = HashMap::new();
    if let Some(tp) = traceparent.and_then(crate::trace::valid_traceparent) {
        carrier.insert("traceparent".to_owned(), tp.to_owned());
        if let Some(ts) = tracestate {
            carrier.insert("tracestate".to_owned(), ts.to_owned());
        }
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// Makes `span` a child of the context in `traceparent`/`tracestate` (a
/// server span continuing the caller's trace). Nothing when spans are not
/// exported.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if enabled() {
        let _ = span.set_parent(extract(traceparent, tracestate));
    }
}

/// `span`'s own context as W3C headers (`traceparent`, and `tracestate` when
/// there is one), for a record it writes; `None` when spans are not
/// exported.
pub fn inject(span: &tracing::Span) -> Option<(String, Option<String>)> {
    if !enabled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    let tp = carrier.remove("traceparent")?;
    Some((tp, carrier.remove("tracestate").filter(|s| !s.is_empty())))
}

/// Links `span` to the context in a record's `traceparent` (a batch has
/// many parents), with the record's partition and offset on the link
/// (`messaging.destination.partition.id`, `messaging.kafka.offset`).
/// Nothing for a missing or invalid one, or when not exported.
pub fn link_record(span: &tracing::Span, traceparent: Option<&str>, partition: i32, offset: i64) {
    add_link(
        span,
        traceparent,
        vec![
            KeyValue::new("messaging.destination.partition.id", partition.to_string()),
            KeyValue::new("messaging.kafka.offset", offset),
        ],
    );
}

/// Links `span` to the context in `traceparent`, without attributes.
pub fn link(span: &tracing::Span, traceparent: Option<&str>) {
    add_link(span, traceparent, Vec::new());
}

fn add_link(span: &tracing::Span, traceparent: Option<&str>, attributes: Vec<KeyValue>) {
    if !enabled() || traceparent.is_none() {
        return;
    }
    let cx = extract(traceparent, None);
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link_with_attributes(sc, attributes);
    }
}

/// Sets `key` = `value` on `span`'s exported span (an attribute whose name
/// has dots, which `tracing` field names cannot carry everywhere).
pub fn attribute(span: &tracing::Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    if enabled() {
        span.set_attribute(key, value);
    }
}

/// The trace id of `span`'s exported span (32 hex digits), for a log line's
/// `trace_id`; `None` when spans are not exported.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Records `span`'s trace id in its `trace_id` field (declared `Empty`), so
/// every log line inside it carries the id. Nothing when not exported.
pub fn record_trace_id(span: &tracing::Span) {
    if let Some(id) = trace_id(span) {
        span.record("trace_id", id.as_str());
    }
}
