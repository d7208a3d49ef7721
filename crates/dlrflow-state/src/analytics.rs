//! The `dlrflow.delivery.v1` record (see `docs/delivery-v1.md`) and the outbox
//! relay that publishes it.
//!
//! The relay takes unpublished outbox rows with `FOR UPDATE SKIP LOCKED` (so
//! replicas never publish the same rows at the same time), produces them with
//! an idempotent `acks=all` producer, waits for every acknowledgement and only
//! then marks the rows published and commits. A crash in between publishes the
//! rows again with the same `update_id`: at-least-once, deduplicable.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use dlrflow_events::DeliveryUpdate;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sqlx::{PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::OutboxConfig;
use crate::store::Applied;

/// The `schema` field of every record.
pub const SCHEMA: &str = "dlrflow.delivery.v1";

fn ts(t: Option<DateTime<Utc>>) -> serde_json::Value {
    t.map_or(serde_json::Value::Null, |t| {
        t.to_rfc3339_opts(SecondsFormat::Micros, true).into()
    })
}

/// Renders one analytics record.
pub fn payload(
    a: &Applied,
    u: &DeliveryUpdate,
    provider: &str,
    applied_at: DateTime<Utc>,
) -> String {
    let s = &a.state;
    json!({
        "schema": SCHEMA,
        "update_id": a.update_id,
        "dedupe_key": a.dedupe_key,
        "outcome": a.outcome.as_str(),
        "message_id": s.message_id,
        "recipient": s.recipient,
        "source": u.source,
        "provider": provider,
        "previous_status": a.previous_status.map(|p| p.as_str()),
        "status": s.status.as_str(),
        "version": a.version,
        "applied_at": ts(Some(applied_at)),
        "update": {
            "status": u.status.as_str(),
            "occurred_at": ts(Some(u.occurred_at)),
            "authoritative": u.authoritative,
            "processing_at": ts(u.processing_at),
            "sent_at": ts(u.sent_at),
            "delivered_at": ts(u.delivered_at),
            "failed_at": ts(u.failed_at),
            "carrier": u.carrier,
            "error_code": u.error_code,
            "error_message": u.error_message,
            "retryable": u.retryable,
            "segments": u.segments,
            "custom_payload": u.custom_payload,
        },
        "state": {
            "status": s.status.as_str(),
            "queued_at": ts(s.queued_at),
            "processing_at": ts(s.processing_at),
            "sent_at": ts(s.sent_at),
            "delivered_at": ts(s.delivered_at),
            "failed_at": ts(s.failed_at),
            "carrier": s.carrier,
            "error_code": s.error_code,
            "error_message": s.error_message,
            "retryable": s.retryable,
            "segments": s.segments,
            "last_event_at": ts(Some(s.last_event_at)),
            "needs_reconcile": s.needs_reconcile,
            "reconcile_reason": s.reconcile_reason.map(|r| r.as_str()),
        },
    })
    .to_string()
}

/// Publishes outbox rows until `shutdown`; `wake` shortens the idle wait after
/// the consumer committed new rows.
pub async fn run_relay(
    pool: PgPool,
    producer: FutureProducer,
    topic: String,
    cfg: OutboxConfig,
    produce_timeout: Duration,
    wake: std::sync::Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut last_cleanup = std::time::Instant::now();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        match relay_once(&pool, &producer, &topic, cfg.batch_size, produce_timeout).await {
            Ok(n) => {
                backoff = Duration::from_millis(100);
                if n > 0 {
                    metrics::counter!("dlrflow_state_outbox_published_total").increment(n as u64);
                }
                if n as i64 >= cfg.batch_size {
                    continue;
                }
            }
            Err(e) => {
                metrics::counter!("dlrflow_state_outbox_errors_total").increment(1);
                tracing::warn!(error = %e, "outbox relay failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        if last_cleanup.elapsed() > Duration::from_secs(60) {
            last_cleanup = std::time::Instant::now();
            let r = sqlx::query(
                "DELETE FROM delivery_outbox WHERE published_at IS NOT NULL \
                 AND published_at < now() - make_interval(secs => $1)",
            )
            .bind(cfg.retention_secs as f64)
            .execute(&pool)
            .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "outbox cleanup failed");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(cfg.idle_poll_ms)) => {}
        }
    }
}

/// One relay round: returns how many rows were published.
pub async fn relay_once(
    pool: &PgPool,
    producer: &FutureProducer,
    topic: &str,
    batch_size: i64,
    produce_timeout: Duration,
) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT id, message_id, payload FROM delivery_outbox WHERE published_at IS NULL \
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(batch_size)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut pending = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: i64 = row.try_get(0)?;
        let key: String = row.try_get(1)?;
        let payload: String = row.try_get(2)?;
        ids.push(id);
        let record = FutureRecord::to(topic).key(&key).payload(&payload);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for p in pending {
        match tokio::time::timeout(produce_timeout, p).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((e, _)))) => anyhow::bail!("producing to {topic}: {e}"),
            Ok(Err(_)) => anyhow::bail!("producer dropped a delivery"),
            Err(_) => anyhow::bail!("no acknowledgement from {topic} within {produce_timeout:?}"),
        }
    }
    sqlx::query("UPDATE delivery_outbox SET published_at = now() WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ids.len())
}
