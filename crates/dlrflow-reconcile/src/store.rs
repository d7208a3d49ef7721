//! PostgreSQL: the pool, the migrations, and writing an authoritative answer.
//!
//! Writing goes through dlrflow-state's write path (merge, recipient rows,
//! `delivery_events`, the outbox to the analytics topic), so a reconciled
//! change reaches `dlrflow.delivery.v1` like any webhook update.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use dlrflow_events::DeliveryUpdate;
use dlrflow_runtime::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use crate::config::PostgresConfig;

/// A pool whose connections use `postgres.schema` as their `search_path`.
pub async fn connect(cfg: &PostgresConfig) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(cfg.url.expose_secret())
        .context("postgres.url is not a PostgreSQL URL")?
        .options([("search_path", cfg.schema.as_str())]);
    PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("connecting to PostgreSQL (postgres.url)")
}

/// Runs dlrflow-state's migrations, then ours (versions from 1000). Both
/// ignore the other's versions.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    state_migrate(pool).await?;
    let mut ours: Migrator = sqlx::migrate!("./migrations");
    ours.set_ignore_missing(true);
    ours.run(pool)
        .await
        .context("running dlrflow-reconcile migrations")?;
    Ok(())
}

/// What writing one answer changed.
#[derive(Debug, Clone, Default)]
pub struct Written {
    /// Recipients whose state changed.
    pub changed: usize,
}

/// Writes the authoritative updates of one answer through dlrflow-state's
/// write path, inside `tx`.
pub async fn write_answer(
    tx: &mut Transaction<'_, Postgres>,
    updates: &[DeliveryUpdate],
) -> anyhow::Result<Written> {
    state_apply(tx, updates).await
}

async fn state_migrate(pool: &PgPool) -> anyhow::Result<()> {
    interim::migrate(pool).await
}

async fn state_apply(
    tx: &mut Transaction<'_, Postgres>,
    updates: &[DeliveryUpdate],
) -> anyhow::Result<Written> {
    interim::apply(tx, updates).await
}

/// INTERIM: stands in for `dlrflow_state::{migrate, apply_updates}` until that
/// crate publishes them (it is being written in parallel). It follows the
/// agreed table contract and `dlrflow_events::merge`; it writes no outbox.
mod interim {
    use anyhow::Context;
    use chrono::{DateTime, Utc};
    use dlrflow_events::{
        merge, DeliveryUpdate, MergeOutcome, RecipientState, ReconcileReason, Status,
    };
    use sqlx::{PgPool, Postgres, Row, Transaction};

    use super::Written;

    pub(super) async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
        sqlx::raw_sql(include_str!("../tests/fixtures/state_tables.sql"))
            .execute(pool)
            .await
            .context("creating the state tables")?;
        Ok(())
    }

    fn parse_status(s: &str) -> anyhow::Result<Status> {
        s.parse().with_context(|| format!("status `{s}`"))
    }

    pub(super) async fn apply(
        tx: &mut Transaction<'_, Postgres>,
        updates: &[DeliveryUpdate],
    ) -> anyhow::Result<Written> {
        let mut out = Written::default();
        for u in updates {
            let row = sqlx::query(
                "SELECT status, queued_at, processing_at, sent_at, delivered_at, failed_at, carrier,
                        error_code, error_message, retryable, segments, last_event_at,
                        needs_reconcile, reconcile_reason
                   FROM recipient_state WHERE message_id = $1 AND recipient = $2 FOR UPDATE",
            )
            .bind(&u.message_id)
            .bind(&u.recipient)
            .fetch_optional(&mut **tx)
            .await?;
            let current = match row {
                None => None,
                Some(r) => Some(RecipientState {
                    message_id: u.message_id.clone(),
                    recipient: u.recipient.clone(),
                    status: parse_status(r.get::<&str, _>("status"))?,
                    queued_at: r.get("queued_at"),
                    processing_at: r.get("processing_at"),
                    sent_at: r.get("sent_at"),
                    delivered_at: r.get("delivered_at"),
                    failed_at: r.get("failed_at"),
                    carrier: r.get("carrier"),
                    error_code: r.get("error_code"),
                    error_message: r.get("error_message"),
                    retryable: r.get("retryable"),
                    segments: r.get::<Option<i32>, _>("segments").map(|s| s.max(0) as u32),
                    last_event_at: r.get::<DateTime<Utc>, _>("last_event_at"),
                    needs_reconcile: r.get::<Option<bool>, _>("needs_reconcile").unwrap_or(false),
                    reconcile_reason: r
                        .get::<Option<String>, _>("reconcile_reason")
                        .and_then(|s| s.parse::<ReconcileReason>().ok()),
                }),
            };
            let outcome = merge(current.as_ref(), u);
            let (MergeOutcome::Applied { state: s, .. } | MergeOutcome::Conflict { state: s }) =
                outcome
            else {
                continue;
            };
            out.changed += 1;
            sqlx::query(
                r#"
INSERT INTO recipient_state (message_id, recipient, source, provider, status, queued_at, processing_at,
    sent_at, delivered_at, failed_at, carrier, error_code, error_message, retryable, segments,
    last_event_at, needs_reconcile, reconcile_reason, version, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, 1, now(), clock_timestamp())
ON CONFLICT (message_id, recipient) DO UPDATE SET
    status = excluded.status, queued_at = excluded.queued_at, processing_at = excluded.processing_at,
    sent_at = excluded.sent_at, delivered_at = excluded.delivered_at, failed_at = excluded.failed_at,
    carrier = excluded.carrier, error_code = excluded.error_code, error_message = excluded.error_message,
    retryable = excluded.retryable, segments = excluded.segments, last_event_at = excluded.last_event_at,
    needs_reconcile = excluded.needs_reconcile, reconcile_reason = excluded.reconcile_reason,
    version = recipient_state.version + 1, updated_at = clock_timestamp()"#,
            )
            .bind(&s.message_id)
            .bind(&s.recipient)
            .bind(&u.source)
            .bind(u.provider.as_str())
            .bind(s.status.as_str())
            .bind(s.queued_at)
            .bind(s.processing_at)
            .bind(s.sent_at)
            .bind(s.delivered_at)
            .bind(s.failed_at)
            .bind(&s.carrier)
            .bind(&s.error_code)
            .bind(&s.error_message)
            .bind(s.retryable)
            .bind(s.segments.map(|v| v as i32))
            .bind(s.last_event_at)
            .bind(s.needs_reconcile)
            .bind(s.reconcile_reason.map(|r| r.as_str()))
            .execute(&mut **tx)
            .await?;
            sqlx::query(
                "INSERT INTO delivery_events (dedupe_key, message_id, recipient, source, provider, status, raw,
                                              received_at, outcome, processed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, now(), 'applied', now())
                 ON CONFLICT (dedupe_key) DO NOTHING",
            )
            .bind(&u.dedupe_key)
            .bind(&u.message_id)
            .bind(&u.recipient)
            .bind(&u.source)
            .bind(u.provider.as_str())
            .bind(u.status.as_str())
            .bind(serde_json::to_value(u)?)
            .execute(&mut **tx)
            .await?;
        }
        Ok(out)
    }
}
