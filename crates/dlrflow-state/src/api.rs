//! The read API for the merchant backend, and the service's readiness.
//!
//! Status codes: 200 found; 404 no such message / recipient; 400 an id that
//! cannot name anything dlrflow stores (it holds U+0000, is longer than
//! [`MAX_ID_LEN`] bytes, is not UTF-8 once percent-decoded, or PostgreSQL
//! refuses it as a value) — such ids are never sent to PostgreSQL as
//! queries that could fail; 503 the database failed (unreachable, timed out,
//! any other error), retry later.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use dlrflow_runtime::service::{probe, ready_check, Readiness, ReadyCheck, PROBE_TIMEOUT};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use sqlx::{FromRow, PgPool};

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub pool: PgPool,
    pub redis: redis::aio::ConnectionManager,
    /// Metadata-only client for `/readyz`.
    pub kafka: Arc<BaseConsumer>,
    pub raw_topic: String,
    /// The consumer's own account of its progress.
    pub health: Arc<crate::health::ConsumerHealth>,
}

/// The longest id (message id, recipient) dlrflow stores, in bytes: the
/// consumer dead-letters events with longer ones, so a longer id names
/// nothing.
pub const MAX_ID_LEN: usize = 512;

/// The one place that decides status codes.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
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
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Database(e) => {
                tracing::warn!(error = %e, "read API: database error");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(serde_json::json!({"error": self.to_string()}))).into_response()
    }
}

/// The read API (the skeleton adds `/healthz`, `/readyz` and `/metrics`).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/messages/{message_id}", get(get_message))
        .route(
            "/v1/messages/{message_id}/recipients/{phone}",
            get(get_recipient),
        )
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

/// A message with all its recipients, or `None`.
pub async fn load_message(
    pool: &PgPool,
    message_id: &str,
) -> Result<Option<MessageView>, sqlx::Error> {
    let msg: Option<MessageView> = sqlx::query_as(
        "SELECT message_id, source, provider, total_recipients, total_messages, total_cost, currency, \
                scheduled_at, queued_at FROM messages WHERE message_id = $1",
    )
    .bind(message_id)
    .fetch_optional(pool)
    .await?;
    let Some(mut msg) = msg else { return Ok(None) };
    msg.recipients = sqlx::query_as(&format!(
        "SELECT {RECIPIENT_COLUMNS} FROM recipient_state WHERE message_id = $1 ORDER BY recipient"
    ))
    .bind(message_id)
    .fetch_all(pool)
    .await?;
    Ok(Some(msg))
}

async fn get_message(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<MessageView>, ApiError> {
    let Path(message_id) = path?;
    check_id("message_id", &message_id)?;
    load_message(&s.pool, &message_id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound)
}

async fn get_recipient(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<RecipientView>, ApiError> {
    let Path((message_id, phone)) = path?;
    check_id("message_id", &message_id)?;
    check_id("recipient", &phone)?;
    let row: Option<RecipientView> = sqlx::query_as(&format!(
        "SELECT {RECIPIENT_COLUMNS} FROM recipient_state WHERE message_id = $1 AND recipient = $2"
    ))
    .bind(&message_id)
    .bind(&phone)
    .fetch_optional(&s.pool)
    .await?;
    row.map(Json).ok_or(ApiError::NotFound)
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
