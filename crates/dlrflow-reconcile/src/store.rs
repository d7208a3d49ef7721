//! PostgreSQL (the pool, the migrations) and the status topic.
//!
//! An answer is never written to the state from here: it is published to
//! `kafka.status_topic`, and dlrflow-state applies it through its one write
//! path (merge, recipient rows, `delivery_events`, the outbox to
//! `dlrflow.delivery.v1`) like any webhook update, so the state can be
//! rebuilt from the log.

use anyhow::Context;
use chrono::{DateTime, Utc};
use dlrflow_events::Provider;
use dlrflow_runtime::settings::PostgresSettings;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::migrate::Migrator;
use sqlx::PgPool;

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

/// Why an answer was not published.
#[derive(Debug)]
pub enum PublishError {
    /// Not acknowledged within `kafka.produce_timeout_ms`, or the broker is
    /// unreachable: read again later.
    Transient(String),
    /// The broker refuses this record whatever happens (too large, say).
    Permanent(String),
}

/// An idempotent `acks=all` producer for `kafka.status_topic`. Records never
/// time out inside librdkafka (`message.timeout.ms = 0`: a timed-out record
/// makes an idempotent producer bump its epoch, which the local broker cannot
/// handle); the caller bounds its wait with `kafka.produce_timeout_ms`.
pub fn create_producer(cfg: &crate::Config) -> anyhow::Result<FutureProducer> {
    cfg.kafka
        .client
        .client_config(&[
            ("client.id", "dlrflow-reconcile".to_owned()),
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            ("linger.ms", "0".into()),
            ("message.timeout.ms", "0".into()),
            ("retry.backoff.ms", "50".into()),
            ("reconnect.backoff.ms", "50".into()),
            ("reconnect.backoff.max.ms", "1000".into()),
        ])
        .create()
        .map_err(|e| anyhow::anyhow!(crate::redact::error_text(&e.to_string())))
        .context("creating the Kafka producer (kafka.*)")
}

/// Publishes one status answer: key `{source}/status_api/{message_id}`, the
/// exact bytes the API sent, the read time as the record timestamp, and the
/// trace context (`traceparent`, `tracestate`) when spans are exported.
/// Returns once the broker acknowledged it.
pub(crate) async fn publish_answer(
    inner: &crate::Inner,
    job: &crate::jobs::Job,
    body: &[u8],
    read_at: DateTime<Utc>,
    trace: Option<(String, Option<String>)>,
) -> Result<(), PublishError> {
    use dlrflow_runtime::kafka::{header, raw_key};
    let cfg = &inner.cfg.kafka;
    let key = raw_key::encode(
        &job.source,
        Provider::StatusApi.as_str(),
        Some(&job.message_id),
    );
    let mut record = FutureRecord::<str, [u8]>::to(&cfg.status_topic)
        .key(&key)
        .payload(body)
        .timestamp(read_at.timestamp_millis());
    if let Some((traceparent, tracestate)) = &trace {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: header::TRACEPARENT,
            value: Some(traceparent.as_str()),
        });
        if let Some(ts) = tracestate {
            headers = headers.insert(Header {
                key: header::TRACESTATE,
                value: Some(ts.as_str()),
            });
        }
        record = record.headers(headers);
    }
    let delivery = match inner.producer.send_result(record) {
        Ok(d) => d,
        Err((e, _)) => return Err(classify_kafka(&e)),
    };
    match tokio::time::timeout(cfg.produce_timeout, delivery).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err((e, _)))) => Err(classify_kafka(&e)),
        Ok(Err(_)) => Err(PublishError::Transient("the producer went away".into())),
        Err(_) => Err(PublishError::Transient(format!(
            "no acknowledgement from the broker within {} ms (kafka.produce_timeout_ms)",
            cfg.produce_timeout.as_millis()
        ))),
    }
}

fn classify_kafka(e: &KafkaError) -> PublishError {
    use rdkafka::types::RDKafkaErrorCode as C;
    let text = crate::redact::error_text(&e.to_string());
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidRecord | C::InvalidMessage) => {
            PublishError::Permanent(text)
        }
        _ => PublishError::Transient(text),
    }
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
