//! The thin HTTP receiver for gateway webhooks.
//!
//! It authenticates each request, checks that the body is JSON of the
//! provider's outer shape, and answers 2xx only after Kafka acknowledged every
//! record (`acks=all`, idempotent producer). It never interprets an event
//! beyond that: parsing, dedupe and state belong to `dlrflow-state`. A 4xx
//! tells the gateway never to send again, so only bad credentials (401), a body
//! that is not JSON of the right outer shape (400) and a body or record that
//! can never be written (413) get one; anything else the broker did not take
//! gets 503 with `Retry-After`.

pub mod auth;
pub mod config;
mod error;
mod produce;
pub mod sources;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use dlrflow_runtime::service::{ready_check, Lifecycle, Readiness, Service};
use http_body_util::BodyExt;
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{AuthMode, Provider, SourceConfig};
pub use crate::config::{Config, RECORD_HEADROOM};
pub use crate::error::ApiError;
use crate::produce::{OutRecord, Producer as RawProducer};
use crate::sources::{SourceMap, Sources};

/// The longest `message_id` used as the record key. A longer one (which the
/// consumer dead-letters anyway) would only take room from the record's own
/// size limit, so such a record is written without a key.
pub const MAX_KEY_LEN: usize = 512;

/// Arpoone sends at most this many records per request.
pub const ARPOONE_MAX_RECORDS: usize = 1000;

/// The UTF-8 byte-order mark. JSON texts must not start with one (RFC 8259
/// §8.1) but parsers may ignore it, and some senders write it: it is skipped
/// for the checks and the key, and kept in the record.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The metrics label of a request whose path names no configured source.
const UNKNOWN_SOURCE: &str = "unknown";

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    sources: Sources,
    producer: RawProducer,
    http: config::HttpConfig,
    /// The largest body read (`http.body_limit_bytes`, default the record limit).
    body_limit: usize,
    /// The largest record value (Lisoloo body, Arpoone element) written.
    record_limit: usize,
    lifecycle: Lifecycle,
}

/// A built, bound ingest service.
pub struct App {
    service: Service,
    state: AppState,
}

impl App {
    /// Creates the producer and binds the listener. The broker need not be
    /// reachable yet: `/readyz` says whether it is.
    pub async fn build(mut cfg: Config) -> anyhow::Result<App> {
        cfg.register_secrets();
        cfg.validate()?;
        if let Some(path) = &cfg.sources_file {
            cfg.sources = sources::load_file(path)?;
            cfg.register_secrets();
        }
        let mut service = Service::bind("dlrflow-ingest", &cfg.http.server).await?;
        let producer = RawProducer::new(&cfg.kafka).context("creating the Kafka producer")?;
        let (body_limit, record_limit) = (cfg.body_limit(), cfg.kafka.record_limit());
        tracing::info!(
            body_limit,
            record_limit,
            message_max_bytes = cfg.kafka.client.max_message_bytes(),
            "bodies over body_limit and records (a Lisoloo body, an Arpoone element) over record_limit get 413"
        );
        // Connect (and obtain the idempotent producer id) before the first
        // request instead of during it; a broker that is down is not fatal.
        match producer.ready().await {
            Ok(partitions) => {
                tracing::info!(topic = %cfg.kafka.raw_topic, partitions, "broker reachable")
            }
            Err(reason) => {
                tracing::warn!(%reason, "broker not ready yet; answering 503 until it is")
            }
        }
        // Records still unacknowledged at the end were answered with 503 (the
        // gateway resends them), so a failed flush loses nothing.
        service.flush_on_stop(producer.kafka().clone());
        let sources = Sources::new(&cfg.sources);
        if let Some(path) = cfg.sources_file.clone() {
            let watch = sources::watch(path, cfg.sources_check, sources.clone(), service.work());
            service.spawn("sources reload", watch);
        }
        let state = AppState {
            inner: Arc::new(Inner {
                sources,
                producer,
                http: cfg.http.clone(),
                body_limit,
                record_limit,
                lifecycle: service.lifecycle(),
            }),
        };
        Ok(App { service, state })
    }

    /// The service skeleton: its listeners' addresses (`public_addr()`,
    /// `admin_addr()`), its lifecycle.
    pub fn service(&self) -> &Service {
        &self.service
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets
    /// in-flight requests finish and flushes the producer, all within
    /// `http.shutdown_grace_ms`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ready = {
            let state = self.state.clone();
            ready_check(move || {
                let state = state.clone();
                async move {
                    let mut r = Readiness::default();
                    match state.inner.producer.ready().await {
                        Ok(partitions) => r.detail("partitions", partitions),
                        Err(reason) => r.problem(format!("kafka: {reason}")),
                    }
                    r
                }
            })
        };
        self.service.run(router(self.state), ready, shutdown).await
    }
}

/// The ingest's webhook routes (the skeleton adds `/healthz`, `/readyz` and
/// `/metrics`), separate from `App` so handlers can be tested alone.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/{source}/webhook", post(webhook))
        .route("/{source}/webhook/{kind}", post(webhook))
        .route("/{source}/t/{token}/webhook", post(webhook))
        .route("/{source}/t/{token}/webhook/{kind}", post(webhook))
        .with_state(state)
}

/// What the URL named; every webhook route fills the fields it has.
#[derive(serde::Deserialize)]
struct Target {
    source: String,
    token: Option<String>,
    kind: Option<String>,
}

async fn webhook(
    State(state): State<AppState>,
    Path(target): Path<Target>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let peer = peer.map(|Extension(ConnectInfo(addr))| addr.ip());
    handle(state, target, peer, headers, body).await
}

async fn handle(
    state: AppState,
    target: Target,
    peer: Option<std::net::IpAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // One set of sources for the whole request, even if it is replaced meanwhile.
    let sources = state.inner.sources.current();
    // Only configured names become label values: a path is whatever the
    // client sent, and every new label value is a new series.
    let source_label = match sources.get_key_value(&target.source) {
        Some((name, _)) => name.clone(),
        None => UNKNOWN_SOURCE.to_owned(),
    };
    let result = accept(&state, &sources, target, peer, &headers, body)
        .instrument(server_span(&headers))
        .await;
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(e) => e.kind(),
    };
    metrics::counter!("dlrflow_ingest_requests_total", "source" => source_label, "outcome" => outcome).increment(1);
    match result {
        Ok(resp) => resp,
        Err(e) => e.into_response_with(state.inner.http.retry_after_secs),
    }
}

/// One server span per request (`webhook`), a child of the gateway's valid
/// `traceparent` when spans are exported (set before the span is entered:
/// its trace id is fixed then); [`accept`] writes the span's own context
/// into each record's `traceparent` header (the gateway's, as received,
/// when spans are not exported).
fn server_span(headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "webhook",
        otel.kind = "server",
        http.request.method = "POST",
        source = tracing::field::Empty,
        records = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        message_id = tracing::field::Empty,
        event_id = tracing::field::Empty,
    );
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    dlrflow_runtime::otel::set_parent(&span, header("traceparent"), header("tracestate"));
    span
}

async fn accept(
    state: &AppState,
    sources: &SourceMap,
    target: Target,
    peer: Option<std::net::IpAddr>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let inner = &state.inner;
    let source = sources.get(&target.source).ok_or(ApiError::UnknownRoute)?;
    tracing::Span::current().record("source", source.name.as_str());
    if let Some(kind) = &target.kind {
        let known = matches!(kind.as_str(), "delivered" | "pending" | "not_delivered");
        if source.provider != Provider::Arpoone || !known {
            return Err(ApiError::UnknownRoute);
        }
    }
    if !source.allow_from.is_empty() {
        // Without the peer's address (a router run without a listener) the
        // list cannot be satisfied.
        let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        let client = peer.map(|p| sources::client_ip(p, forwarded, &inner.http.trusted_proxies));
        if !client.is_some_and(|ip| source.allow_from.iter().any(|n| n.contains(&ip))) {
            return Err(ApiError::Forbidden);
        }
    }
    authenticate(source, target.token.as_deref(), headers)?;
    if inner.lifecycle.is_stopping() {
        return Err(ApiError::Unavailable("shutting down"));
    }

    let body = read_body(body, headers, inner.body_limit, &inner.http).await?;
    // The checks and the key skip a leading byte-order mark; the records keep
    // the bytes as received.
    let json = body.strip_prefix(BOM).unwrap_or(&body);
    let gateway_tp = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(dlrflow_runtime::trace::valid_traceparent);
    let span = tracing::Span::current();
    let own = dlrflow_runtime::otel::inject(&span);
    let traceparent = own.as_ref().map(|(tp, _)| tp.as_str()).or(gateway_tp);
    if let Some(tp) = traceparent.and_then(dlrflow_runtime::trace::trace_id) {
        span.record("trace_id", tp);
    }
    let meta = produce::Meta {
        source: &source.name,
        provider: source.provider.as_str(),
        traceparent,
        tracestate: own.as_ref().and_then(|(_, ts)| ts.as_deref()),
    };

    match source.provider {
        Provider::Lisoloo => {
            if body.len() > inner.record_limit {
                return Err(ApiError::TooLarge {
                    what: "event",
                    limit: inner.record_limit,
                });
            }
            let key = lisoloo_key(json)?;
            tracing::Span::current().record("records", 1);
            inner
                .producer
                .send_all(
                    &meta,
                    vec![OutRecord {
                        message_id: key.as_deref(),
                        payload: &body,
                    }],
                )
                .await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Provider::Arpoone => {
            let elements: Vec<&serde_json::value::RawValue> = serde_json::from_slice(json)
                .map_err(|e| ApiError::BadBody(format!("expected a JSON array of records: {e}")))?;
            if elements.len() > ARPOONE_MAX_RECORDS {
                return Err(ApiError::BadBody(format!(
                    "{} records in one request; at most {ARPOONE_MAX_RECORDS} are allowed",
                    elements.len()
                )));
            }
            // Checked before anything is enqueued: a request is written whole
            // or not at all.
            if elements.iter().any(|e| e.get().len() > inner.record_limit) {
                return Err(ApiError::TooLarge {
                    what: "array element",
                    limit: inner.record_limit,
                });
            }
            tracing::Span::current().record("records", elements.len());
            let keys: Vec<Option<String>> = elements.iter().map(|e| arpoone_key(e.get())).collect();
            let records = elements
                .iter()
                .zip(&keys)
                .map(|(e, k)| OutRecord {
                    message_id: k.as_deref(),
                    payload: e.get().as_bytes(),
                })
                .collect();
            inner.producer.send_all(&meta, records).await?;
            Ok((
                StatusCode::OK,
                Json(serde_json::json!({"accepted": elements.len()})),
            )
                .into_response())
        }
    }
}

fn authenticate(
    source: &SourceConfig,
    token: Option<&str>,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let unauthorized = || ApiError::Unauthorized {
        realm: source.name.clone(),
    };
    match source.auth {
        Some(AuthMode::Basic) => {
            if token.is_some() {
                return Err(ApiError::UnknownRoute);
            }
            let header = headers
                .get(axum::http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if auth::basic_matches(header, &source.credentials) {
                Ok(())
            } else {
                Err(unauthorized())
            }
        }
        Some(AuthMode::PathToken) => match token {
            Some(t) if auth::path_token_matches(t, source) => Ok(()),
            Some(_) => Err(unauthorized()),
            // A path-token source has no route without its token.
            None => Err(ApiError::UnknownRoute),
        },
        Some(AuthMode::None) if token.is_none() => Ok(()),
        Some(AuthMode::None) | None => Err(ApiError::UnknownRoute),
    }
}

/// Reads the whole body within the size limit and the slow-client timeout.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    http: &config::HttpConfig,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = ApiError::TooLarge {
        what: "body",
        limit,
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large);
    }
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(http.body_read_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::Unavailable("request body not received in time")),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large),
        Ok(Err(_)) => Err(ApiError::Unavailable("request body could not be read")),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

#[derive(serde::Deserialize)]
struct LisolooProbe<'a> {
    #[serde(borrow)]
    message_id: Option<std::borrow::Cow<'a, str>>,
    /// Raw, so that an odd `event_id` cannot cost the key (the state
    /// service judges the record).
    #[serde(borrow)]
    event_id: Option<&'a serde_json::value::RawValue>,
}

/// Checks that a Lisoloo body (without its byte-order mark) is JSON and
/// returns its `message_id` (the key), and records it and the `event_id`
/// in the request's span for the log lines (bounded; neither is a secret
/// nor a phone number).
fn lisoloo_key(body: &[u8]) -> Result<Option<String>, ApiError> {
    match serde_json::from_slice::<LisolooProbe>(body) {
        Ok(p) => {
            let span = tracing::Span::current();
            if let Some(m) = &p.message_id {
                span.record(
                    "message_id",
                    dlrflow_runtime::text::truncate(m, 128).as_ref(),
                );
            }
            if let Some(e) = p.event_id.map(|e| e.get().trim_matches('"')) {
                span.record("event_id", dlrflow_runtime::text::truncate(e, 64).as_ref());
            }
            Ok(p.message_id
                .map(|m| m.into_owned())
                .filter(|k| k.len() <= MAX_KEY_LEN))
        }
        Err(_) => match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => Ok(None),
            Err(e) => Err(ApiError::BadBody(format!("body is not JSON: {e}"))),
        },
    }
}

#[derive(serde::Deserialize)]
struct ArpooneProbe<'a> {
    #[serde(rename = "MessageId", borrow)]
    message_id: Option<std::borrow::Cow<'a, str>>,
}

fn arpoone_key(element: &str) -> Option<String> {
    serde_json::from_str::<ArpooneProbe>(element)
        .ok()
        .and_then(|p| p.message_id.map(|m| m.into_owned()))
        .filter(|k| k.len() <= MAX_KEY_LEN)
}

impl AppState {
    /// The underlying Kafka producer (tests and shutdown).
    pub fn kafka_producer(&self) -> &FutureProducer {
        self.inner.producer.kafka()
    }
}
