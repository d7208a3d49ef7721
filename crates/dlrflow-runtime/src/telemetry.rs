//! Logs, traces and metrics.
//!
//! Logs are JSON lines on stdout filtered by `RUST_LOG` (default `info`);
//! `DLRFLOW_LOG_FORMAT=text` switches to human-readable lines. Metrics use the
//! `metrics` facade with a Prometheus exporter rendered by each service's
//! `GET /metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber of binary `service`: JSON logs
/// (or text), and exported traces when the environment asks for them
/// ([`crate::otel`]). Safe to call more than once. A trace exporter that
/// cannot be built is logged and left out; logs always work.
pub fn init_logs(service: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let text = std::env::var("DLRFLOW_LOG_FORMAT").is_ok_and(|v| v == "text");
    let fmt = tracing_subscriber::fmt::layer().with_target(true);
    let fmt = if text {
        fmt.boxed()
    } else {
        fmt.json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed()
    };
    let (otel, otel_error) = match crate::otel::layer(service) {
        Ok(layer) => (layer, None),
        Err(e) => (None, Some(e)),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    if let Some(e) = otel_error {
        tracing::error!(error = %e, "traces are not exported");
    }
}

/// Installs logs for tests: silent unless `TEST_LOG` is set.
pub fn init_test_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("debug")),
            )
            .with_test_writer()
            .try_init();
    }
}

/// The buckets of every `…_seconds` histogram: 1 ms to 2 min, so both an
/// acknowledgement (milliseconds) and a record's way to the state under lag
/// (seconds to minutes) are resolved.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Counts one failed call to a backend (`dlrflow_backend_errors_total`):
/// `backend` is `postgres` or `redis`, `operation` names the call site (a
/// fixed word, never a value from a request).
pub fn backend_error(backend: &'static str, operation: &'static str) {
    metrics::counter!("dlrflow_backend_errors_total", "backend" => backend, "operation" => operation)
        .increment(1);
}

/// Shows `dlrflow_backend_errors_total` at 0 for each (backend, operation)
/// a service has, from its start: a rate or an alert then sees the first
/// error as an increase, not as a series that appears.
pub fn declare_backend_operations(ops: &[(&'static str, &'static str)]) {
    for &(backend, operation) in ops {
        metrics::counter!("dlrflow_backend_errors_total", "backend" => backend, "operation" => operation)
            .increment(0);
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Durations are histograms with buckets (summed across
            // replicas by `histogram_quantile`), not per-process summaries.
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("the buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // A second recorder (several apps in one test process) is harmless:
            // the first one keeps counting.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// `GET /metrics` for any service router.
pub async fn metrics_endpoint() -> String {
    metrics_handle().render()
}
