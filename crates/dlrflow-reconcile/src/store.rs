//! PostgreSQL: the pool, the migrations, and writing an authoritative answer.
//!
//! Writing goes through dlrflow-state's write path (merge, recipient rows,
//! `delivery_events`, the outbox to the analytics topic), so a reconciled
//! change reaches `dlrflow.delivery.v1` like any webhook update.

use anyhow::Context;
use chrono::Utc;
use dlrflow_events::DeliveryUpdate;
use dlrflow_runtime::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::{PgPool, Postgres, Transaction};

use crate::config::PostgresConfig;

/// A pool whose connections use `postgres.schema` as their `search_path`
/// (the schema is created if missing), opened by dlrflow-state's `connect`.
pub async fn connect(cfg: &PostgresConfig) -> anyhow::Result<PgPool> {
    let state_cfg = dlrflow_state::PostgresConfig {
        url: cfg.url.expose_secret().to_owned(),
        schema: Some(cfg.schema.clone()),
        pool_size: cfg.max_connections,
        acquire_timeout_ms: 10_000,
    };
    dlrflow_state::connect(&state_cfg)
        .await
        .context("connecting to PostgreSQL (postgres.url)")
}

/// Runs dlrflow-state's migrations (1..999), then ours (from 1000). Each side
/// ignores the other's versions.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    dlrflow_state::migrate(pool)
        .await
        .context("running dlrflow-state migrations")?;
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
    /// The recipients whose state changed.
    pub changed: Vec<String>,
}

/// Writes updates (the authoritative ones of an answer, or webhook updates in
/// tests) through dlrflow-state's write path inside `tx`: merge, recipient
/// rows, `delivery_events`, and the outbox to `dlrflow.delivery.v1`.
pub async fn write_answer(
    tx: &mut Transaction<'_, Postgres>,
    updates: &[DeliveryUpdate],
) -> anyhow::Result<Written> {
    let applied = dlrflow_state::apply_updates(tx, updates, Utc::now())
        .await
        .context("writing through dlrflow-state")?;
    Ok(Written {
        changed: applied.into_iter().map(|a| a.state.recipient).collect(),
    })
}
