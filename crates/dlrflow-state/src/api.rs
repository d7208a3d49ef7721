//! The read API for the merchant backend, and the service's readiness.
//!
//! Every request needs `Authorization: Bearer <key>` (see [`crate::access`])
//! unless `api.open`; each read writes one audit line (target
//! `dlrflow::audit`: key id, message id, status; never a phone number).
//!
//! Status codes: 200 found; 401 no or an unknown key (`WWW-Authenticate:
//! Bearer`); 429 over the key's rate (`Retry-After`); 404 no such message /
//! recipient, or one of a source the key may not read (the two are not told
//! apart); 400 an id that
//! cannot name anything dlrflow stores (it holds U+0000, is longer than
//! [`MAX_ID_LEN`] bytes, is not UTF-8 once percent-decoded, or PostgreSQL
//! refuses it as a value) — such ids are never sent to PostgreSQL as
//! queries that could fail; 503 the database failed (unreachable, timed out,
//! any other error), retry later.
//!
//! `GET /v1/analytics/carriers?source=&from=&to=` answers
//! [`crate::carriers::report`] over the sources the key may read (`source`
//! narrows it to one; a source the key may not read is 404); 400 names a
//! parameter that is not an RFC 3339 time on a whole hour, or `from >= to`.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use dlrflow_runtime::service::{probe, ready_check, Readiness, ReadyCheck, PROBE_TIMEOUT};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use sqlx::{FromRow, PgPool};

use crate::access::Caller;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub pool: PgPool,
    pub redis: dlrflow_runtime::settings::RedisConnection,
    /// Metadata-only client for `/readyz`.
    pub kafka: Arc<BaseConsumer>,
    pub raw_topic: String,
    /// The consumer's own account of its progress.
    pub health: Arc<crate::health::ConsumerHealth>,
    /// Keys, scopes and rates.
    pub access: Arc<crate::access::Access>,
    /// Recipients per answer at most (`api.page_size`).
    pub page_size: u32,
}

/// The longest id (message id, recipient) dlrflow stores, in bytes: the
/// consumer dead-letters events with longer ones, so a longer id names
/// nothing.
pub const MAX_ID_LEN: usize = 512;

/// The one place that decides status codes.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid API key is required (Authorization: Bearer <key>)")]
    Unauthorized,
    #[error("too many requests for this key")]
    RateLimited(std::time::Duration),
    #[error("not found")]
    NotFound,
    /// The request cannot name anything stored (400).
    #[error("{0}")]
    BadRequest(String),
    #[error("database unavailable")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for ApiError {
    /// A data exception (SQLSTATE class 22, e.g. a character PostgreSQL
    /// cannot hold) comes from the value looked up: 400. Everything else is
    /// the database's state: 503.
    fn from(e: sqlx::Error) -> Self {
        let data_exception = matches!(&e, sqlx::Error::Database(db)
            if db.code().is_some_and(|c| c.starts_with("22")));
        if data_exception {
            ApiError::BadRequest("invalid id: PostgreSQL cannot hold it".to_owned())
        } else {
            ApiError::Database(e)
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::BadRequest(format!("invalid path: {}", e.body_text()))
    }
}

/// Refuses ids nothing stored can have: U+0000 (PostgreSQL text cannot hold
/// it) and more than [`MAX_ID_LEN`] bytes.
pub fn check_id(field: &str, v: &str) -> Result<(), ApiError> {
    if v.contains('\0') {
        return Err(ApiError::BadRequest(format!(
            "invalid {field}: contains U+0000"
        )));
    }
    if v.len() > MAX_ID_LEN {
        return Err(ApiError::BadRequest(format!(
            "invalid {field}: longer than {MAX_ID_LEN} bytes"
        )));
    }
    Ok(())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Database(e) => {
                dlrflow_runtime::telemetry::backend_error("postgres", "read_api");
                tracing::warn!(error = %e, "read API: database error");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let mut resp =
            (status, Json(serde_json::json!({"error": self.to_string()}))).into_response();
        let headers = resp.headers_mut();
        match &self {
            ApiError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"dlrflow\""),
                );
            }
            ApiError::RateLimited(wait) => {
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            _ => {}
        }
        resp
    }
}

impl From<crate::access::Refusal> for ApiError {
    fn from(r: crate::access::Refusal) -> Self {
        match r {
            crate::access::Refusal::Unauthenticated => ApiError::Unauthorized,
            crate::access::Refusal::RateLimited(wait) => ApiError::RateLimited(wait),
        }
    }
}

/// Authenticates the request and takes one from the key's rate.
fn admit(s: &ApiState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let result = s
        .access
        .admit(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()));
    if let Err(refusal) = &result {
        let outcome = match refusal {
            crate::access::Refusal::Unauthenticated => "unauthorized",
            crate::access::Refusal::RateLimited(_) => "rate_limited",
        };
        metrics::counter!("dlrflow_state_api_refused_total", "reason" => outcome).increment(1);
    }
    Ok(result?)
}

/// One line per read: who, which message, what came of it. Never the
/// recipient: a phone number is personal data.
fn audit(
    caller: &Caller,
    route: &'static str,
    message_id: &str,
    result: &Result<impl Sized, ApiError>,
) {
    let status = match result {
        Ok(_) => 200,
        Err(ApiError::NotFound) => 404,
        Err(ApiError::BadRequest(_)) => 400,
        Err(_) => 503,
    };
    tracing::info!(
        target: "dlrflow::audit",
        key_id = caller.id(),
        route,
        message_id = %dlrflow_runtime::text::truncate(message_id, 128),
        status,
        "read"
    );
}

/// The read API (the skeleton adds `/healthz`, `/readyz` and `/metrics`).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/messages/{message_id}", get(get_message))
        .route(
            "/v1/messages/{message_id}/recipients/{phone}",
            get(get_recipient),
        )
        .route("/v1/analytics/carriers", get(get_carriers))
        .with_state(state)
}

#[derive(Debug, Serialize, FromRow)]
pub struct MessageView {
    pub message_id: String,
    pub source: String,
    pub provider: String,
    pub total_recipients: Option<i32>,
    pub total_messages: Option<i32>,
    pub total_cost: Option<f64>,
    pub currency: Option<String>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub queued_at: Option<DateTime<Utc>>,
    #[sqlx(skip)]
    pub recipients: Vec<RecipientView>,
    /// Set when more recipients follow: ask again with `?after=` this value.
    #[sqlx(skip)]
    pub next_after: Option<String>,
}

#[derive(Debug, Serialize, FromRow)]
pub struct RecipientView {
    pub recipient: String,
    pub status: String,
    pub queued_at: Option<DateTime<Utc>>,
    pub processing_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub carrier: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub retryable: Option<bool>,
    pub segments: Option<i32>,
    pub last_event_at: DateTime<Utc>,
    pub needs_reconcile: bool,
    pub reconcile_reason: Option<String>,
    pub updated_at: DateTime<Utc>,
}

const RECIPIENT_COLUMNS: &str = "recipient, status, queued_at, processing_at, sent_at, delivered_at, failed_at, \
    carrier, error_code, error_message, retryable, segments, last_event_at, needs_reconcile, reconcile_reason, updated_at";

/// The page of recipients a message answer holds: those after `after` in
/// recipient order, at most `limit`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Page {
    pub after: Option<String>,
    pub limit: Option<u32>,
}

/// A message with one page of its recipients (see [`MessageView::next_after`]),
/// or `None`.
pub async fn load_message(
    pool: &PgPool,
    message_id: &str,
    after: Option<&str>,
    limit: u32,
) -> Result<Option<MessageView>, sqlx::Error> {
    let msg: Option<MessageView> = sqlx::query_as(
        "SELECT message_id, source, provider, total_recipients, total_messages, total_cost, currency, \
                scheduled_at, queued_at FROM messages WHERE message_id = $1",
    )
    .bind(message_id)
    .fetch_optional(pool)
    .await?;
    let Some(mut msg) = msg else { return Ok(None) };
    // One more than the page: whether there is a next page.
    let mut rows: Vec<RecipientView> = sqlx::query_as(&format!(
        "SELECT {RECIPIENT_COLUMNS} FROM recipient_state \
         WHERE message_id = $1 AND ($2::text IS NULL OR recipient > $2) \
         ORDER BY recipient LIMIT $3"
    ))
    .bind(message_id)
    .bind(after)
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        msg.next_after = rows.last().map(|r| r.recipient.clone());
    }
    msg.recipients = rows;
    Ok(Some(msg))
}

async fn get_message(
    State(s): State<ApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<MessageView>, ApiError> {
    let caller = admit(&s, &headers)?;
    let Path(message_id) = path?;
    let result = async {
        let Query(page) =
            page.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
        check_id("message_id", &message_id)?;
        if let Some(after) = &page.after {
            check_id("after", after)?;
        }
        let limit = page.limit.unwrap_or(s.page_size).clamp(1, s.page_size);
        load_message(&s.pool, &message_id, page.after.as_deref(), limit)
            .await?
            .filter(|m| caller.may_read(&m.source))
            .ok_or(ApiError::NotFound)
    }
    .await;
    audit(&caller, "message", &message_id, &result);
    result.map(Json)
}

/// The query of `GET /v1/analytics/carriers`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarrierQuery {
    pub source: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

async fn get_carriers(
    State(s): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<CarrierQuery>, QueryRejection>,
) -> Result<Json<crate::carriers::CarrierReport>, ApiError> {
    let caller = admit(&s, &headers)?;
    let result = async {
        let Query(q) =
            query.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
        let mut filter =
            crate::carriers::Filter::parse(q.source.as_deref(), q.from.as_deref(), q.to.as_deref())
                .map_err(ApiError::BadRequest)?;
        match (&filter.sources, caller.sources()) {
            // A source the key may not read is not told apart from one
            // that has no data: both are 404.
            (Some(asked), _) if !asked.iter().all(|a| caller.may_read(a)) => {
                return Err(ApiError::NotFound)
            }
            (Some(_), _) | (None, None) => {}
            (None, Some(scope)) => filter.sources = Some(scope.to_vec()),
        }
        Ok(crate::carriers::report(&s.pool, &filter).await?)
    }
    .await;
    // The audit line names no message: a report is about a whole source.
    audit(&caller, "carriers", "", &result);
    result.map(Json)
}

async fn get_recipient(
    State(s): State<ApiState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<RecipientView>, ApiError> {
    let caller = admit(&s, &headers)?;
    let Path((message_id, phone)) = path?;
    let result = async {
        check_id("message_id", &message_id)?;
        check_id("recipient", &phone)?;
        // The key's scope is checked in the same query: a recipient of a
        // source it may not read is not found.
        let row: Option<RecipientView> = sqlx::query_as(&format!(
            "SELECT {RECIPIENT_COLUMNS} FROM recipient_state \
             WHERE message_id = $1 AND recipient = $2 AND ($3::text[] IS NULL OR \
               (SELECT source FROM messages WHERE message_id = $1) = ANY($3))"
        ))
        .bind(&message_id)
        .bind(&phone)
        .bind(caller.sources())
        .fetch_optional(&s.pool)
        .await?;
        row.ok_or(ApiError::NotFound)
    }
    .await;
    audit(&caller, "recipient", &message_id, &result);
    result.map(Json)
}

/// `/readyz`: PostgreSQL and the broker answer, the consumer makes progress
/// ([`crate::health::ConsumerHealth`]) and the outbox relay publishes
/// ([`crate::analytics::RelayHealth`]). Redis is a cache: without it dedupe
/// runs on PostgreSQL alone, so it only makes the service `degraded`.
pub fn readiness(s: ApiState, relay: crate::analytics::RelayHealth) -> ReadyCheck {
    ready_check(move || {
        let (s, relay) = (s.clone(), relay.clone());
        async move {
            let pg = probe("postgres", sqlx::query("SELECT 1").execute(&s.pool));
            let redis = async {
                let mut conn = s.redis.clone();
                probe("redis", redis::cmd("PING").query_async::<String>(&mut conn)).await
            };
            let kafka = {
                let client = s.kafka.clone();
                let topic = s.raw_topic.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        dlrflow_runtime::kafka::topic_ready(client.client(), &topic, PROBE_TIMEOUT)
                    })
                    .await
                    .map_err(|e| format!("kafka: {e}"))?
                    .map_err(|e| format!("kafka: {e}"))
                }
            };
            let (pg, redis, kafka) = tokio::join!(pg, redis, kafka);
            let mut r = Readiness::default();
            r.check(pg);
            r.check(kafka);
            let verdict = s.health.verdict();
            r.problems.extend(verdict.problems);
            r.problems.extend(relay.problems());
            r.degraded = verdict.degraded;
            if let Err(e) = redis {
                if r.degraded.is_empty() {
                    r.degraded(format!("{e}; dedupe runs on PostgreSQL alone"));
                }
            }
            r
        }
    })
}
