//! PostgreSQL: the pool, the migrations, and writing an authoritative answer.
//!
//! Writing goes through dlrflow-state's write path (merge, recipient rows,
//! `delivery_events`, the outbox to the analytics topic), so a reconciled
//! change reaches `dlrflow.delivery.v1` like any webhook update.

use anyhow::Context;
use chrono::Utc;
use dlrflow_events::DeliveryUpdate;
use dlrflow_runtime::settings::PostgresSettings;
use sqlx::migrate::Migrator;
use sqlx::{PgPool, Postgres, Transaction};

/// A pool whose connections use `postgres.schema` as their `search_path`
/// (the schema is created if missing); errors never show a secret.
pub async fn connect(cfg: &PostgresSettings) -> anyhow::Result<PgPool> {
    cfg.connect()
        .await
        .map_err(|e| anyhow::anyhow!(crate::redact::error_text(&format!("{e:#}"))))
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

/// Whether retrying the same write can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The database's state: a lost connection, a pool timeout, a
    /// serialization failure or deadlock, a shutdown. Back off and retry.
    Transient,
    /// Anything else, e.g. a value PostgreSQL refuses: the same write fails
    /// again, so the job is marked failed and the others go on.
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// Classifies a PostgreSQL error found anywhere in `e`'s chain (a
/// `sqlx::Error`, possibly inside dlrflow-state's `StoreError`), with a short
/// reason for metrics: the SQLSTATE, or the kind of client-side failure.
///
/// Transient: SQLSTATE class 08 (connection exception), 40001
/// (serialization failure), 40P01 (deadlock), 57P01/57P02/57P03 (admin or
/// crash shutdown, cannot connect now), class 53 (insufficient resources, e.g.
/// too many connections), 55P03 (lock not available), 57014 (statement
/// timeout); I/O and TLS errors, pool timeouts, a closed pool, a crashed
/// connection worker. Everything else is permanent.
pub fn classify(e: &anyhow::Error) -> (ErrorClass, String) {
    let Some(sql) = e.chain().find_map(|c| c.downcast_ref::<sqlx::Error>()) else {
        return (ErrorClass::Permanent, "other".into());
    };
    classify_sqlx(sql)
}

/// See [`classify`].
pub fn classify_sqlx(e: &sqlx::Error) -> (ErrorClass, String) {
    use ErrorClass::{Permanent, Transient};
    let (class, reason) = match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let transient = code.starts_with("08")
                || code.starts_with("53")
                || matches!(
                    code.as_str(),
                    "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "55P03" | "57014"
                );
            let reason = if code.is_empty() {
                "database".into()
            } else {
                code
            };
            return (if transient { Transient } else { Permanent }, reason);
        }
        sqlx::Error::Io(_) => (Transient, "io"),
        sqlx::Error::Tls(_) => (Transient, "tls"),
        sqlx::Error::PoolTimedOut => (Transient, "pool_timeout"),
        sqlx::Error::PoolClosed => (Transient, "pool_closed"),
        sqlx::Error::WorkerCrashed => (Transient, "worker_crashed"),
        sqlx::Error::Protocol(_) => (Transient, "protocol"),
        sqlx::Error::Encode(_) => (Permanent, "encode"),
        sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => (Permanent, "decode"),
        _ => (Permanent, "other"),
    };
    (class, reason.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_side_failures_are_transient_and_bad_values_permanent() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify_sqlx(&io), (ErrorClass::Transient, "io".into()));
        assert_eq!(
            classify_sqlx(&sqlx::Error::PoolTimedOut).0,
            ErrorClass::Transient
        );
        let wrapped = anyhow::Error::new(sqlx::Error::PoolClosed).context("writing");
        assert_eq!(classify(&wrapped).0, ErrorClass::Transient);
        assert_eq!(
            classify(&anyhow::anyhow!("no database here")),
            (ErrorClass::Permanent, "other".into())
        );
        assert_eq!(
            classify_sqlx(&sqlx::Error::RowNotFound).0,
            ErrorClass::Permanent
        );
    }
}
