//! The outbox relay that publishes the `dlrflow.delivery.v1` records
//! ([`crate::record`]) the write path left in `delivery_outbox`.
//!
//! The relay takes unpublished outbox rows with `FOR UPDATE SKIP LOCKED` (so
//! replicas never publish the same rows at the same time), produces them with
//! an idempotent `acks=all` producer, waits for every acknowledgement and only
//! then marks the rows published and commits. A crash in between publishes the
//! rows again with the same `update_id`: at-least-once, deduplicable.
//!
//! A row the producer or the broker refuses for good (too large, invalid) never
//! blocks the rows behind it: the relay publishes the others, then re-renders
//! the refused record within the bounds (rows written before the bounds
//! existed) or, when that cannot help, drops it (marks it published without
//! sending it, replaces its payload with a small stub, counts
//! `dlrflow_state_outbox_dropped_total{reason}` and logs a WARN). Transient
//! failures (broker down, no acknowledgement in time, PostgreSQL down) fail
//! the round, which is retried with backoff; nothing is skipped for them.
//!
//! [`RelayHealth`] is the relay's account of its progress for `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dlrflow_runtime::kafka::header::TRACEPARENT;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sqlx::{PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::OutboxConfig;
use crate::record::{rebound, truncate_utf8, ts, MAX_RECORD_BYTES, SCHEMA};

/// Why the producer or the broker refused one record for good (the same record
/// would be refused again however often it is sent), as a metric label; `None`
/// for transient errors (broker down, queue full, timeouts, authorization…).
pub fn permanent_reason(e: &KafkaError) -> Option<&'static str> {
    match e.rdkafka_error_code()? {
        RDKafkaErrorCode::MessageSizeTooLarge
        | RDKafkaErrorCode::InvalidMessageSize
        | RDKafkaErrorCode::MessageBatchTooLarge => Some("message_too_large"),
        RDKafkaErrorCode::InvalidMessage
        | RDKafkaErrorCode::InvalidRecord
        | RDKafkaErrorCode::BadMessage => Some("invalid_record"),
        _ => None,
    }
}

/// Readiness limits of the relay (see [`RelayHealth::problems`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Not ready after this many failed rounds in a row (each round is
    /// retried with backoff: 5 rounds are about 3 s to 1 min of failures).
    pub max_consecutive_failures: u32,
    /// Not ready while the oldest unpublished outbox row is older than this
    /// (the analytics stream is that far behind).
    pub max_backlog_age: Duration,
    /// Not ready when no round finished for this long (the relay is hung or
    /// gone). The relay raises it to at least twice its produce timeout plus
    /// 10 s, the longest a healthy round and its backoff can take.
    pub max_round_gap: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_consecutive_failures: 5,
            max_backlog_age: Duration::from_secs(300),
            max_round_gap: Duration::from_secs(60),
        }
    }
}

/// The relay's progress as [`RelayHealth::status`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayStatus {
    /// When the last round succeeded (published, or found nothing to publish).
    pub last_success_at: Option<DateTime<Utc>>,
    /// Time since the last round finished, successful or not (since the health
    /// was created if none finished yet).
    pub since_last_round: Duration,
    /// Failed rounds since the last successful one.
    pub consecutive_failures: u32,
    /// The last round's error (bounded), while rounds fail.
    pub last_error: Option<String>,
    /// Age of the oldest unpublished outbox row, as last measured (at most
    /// about a second old while the relay runs), aged since; `None` when none
    /// is pending or nothing was measured yet.
    pub oldest_unpublished_age: Option<Duration>,
}

/// The relay's account of its progress, shared (cheap to clone) between the
/// relay ([`Relay::health`]) and `/readyz` ([`crate::api::readiness`]).
#[derive(Debug, Clone)]
pub struct RelayHealth {
    inner: Arc<Mutex<HealthState>>,
}

#[derive(Debug)]
struct HealthState {
    limits: RelayLimits,
    created: Instant,
    last_round: Option<Instant>,
    last_success_at: Option<DateTime<Utc>>,
    consecutive_failures: u32,
    last_error: Option<String>,
    /// Age of the oldest pending row and when it was measured.
    backlog: Option<(Duration, Instant)>,
}

impl Default for RelayHealth {
    fn default() -> Self {
        RelayHealth::new(RelayLimits::default())
    }
}

impl RelayHealth {
    /// A health with these limits; nothing reported yet (ready until
    /// `max_round_gap` passes without a round).
    pub fn new(limits: RelayLimits) -> Self {
        RelayHealth {
            inner: Arc::new(Mutex::new(HealthState {
                limits,
                created: Instant::now(),
                last_round: None,
                last_success_at: None,
                consecutive_failures: 0,
                last_error: None,
                backlog: None,
            })),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HealthState) -> T) -> T {
        // A panic while holding this lock cannot leave it inconsistent.
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// A round succeeded.
    pub fn round_ok(&self) {
        self.with(|h| {
            h.last_round = Some(Instant::now());
            h.last_success_at = Some(Utc::now());
            h.consecutive_failures = 0;
            h.last_error = None;
        });
    }

    /// A round failed with `error` (kept cut to 300 bytes).
    pub fn round_failed(&self, error: &str) {
        self.with(|h| {
            h.last_round = Some(Instant::now());
            h.consecutive_failures = h.consecutive_failures.saturating_add(1);
            h.last_error = Some(truncate_utf8(error, 300).to_owned());
        });
    }

    /// The relay deferred to a consumer with a backlog: alive, by choice
    /// not publishing (counts as a round for `max_round_gap`).
    pub fn deferred(&self) {
        self.with(|h| h.last_round = Some(Instant::now()));
    }

    /// The oldest unpublished outbox row is `age` old (`None`: none pending).
    pub fn backlog(&self, age: Option<Duration>) {
        self.with(|h| h.backlog = age.map(|a| (a, Instant::now())));
    }

    /// Raises `max_round_gap` to at least `gap`.
    pub fn min_round_gap(&self, gap: Duration) {
        self.with(|h| h.limits.max_round_gap = h.limits.max_round_gap.max(gap));
    }

    pub fn limits(&self) -> RelayLimits {
        self.with(|h| h.limits)
    }

    pub fn status(&self) -> RelayStatus {
        self.with(|h| RelayStatus {
            last_success_at: h.last_success_at,
            since_last_round: h.last_round.unwrap_or(h.created).elapsed(),
            consecutive_failures: h.consecutive_failures,
            last_error: h.last_error.clone(),
            oldest_unpublished_age: h.backlog.map(|(age, at)| age + at.elapsed()),
        })
    }

    /// Why the relay is not ready (empty: ready): no round for
    /// `max_round_gap`, `max_consecutive_failures` failed rounds in a row, or
    /// a backlog older than `max_backlog_age`.
    pub fn problems(&self) -> Vec<String> {
        let limits = self.limits();
        let s = self.status();
        let mut problems = Vec::new();
        if s.since_last_round > limits.max_round_gap {
            problems.push(format!(
                "outbox relay: no round finished for {} s",
                s.since_last_round.as_secs()
            ));
        }
        if s.consecutive_failures >= limits.max_consecutive_failures {
            problems.push(format!(
                "outbox relay: {} failed rounds in a row: {}",
                s.consecutive_failures,
                s.last_error.as_deref().unwrap_or("")
            ));
        }
        if let Some(age) = s
            .oldest_unpublished_age
            .filter(|a| *a > limits.max_backlog_age)
        {
            problems.push(format!(
                "outbox relay: oldest unpublished record is {} s old",
                age.as_secs()
            ));
        }
        problems
    }

    /// `Ok` when [`RelayHealth::problems`] is empty, else the problems joined.
    pub fn check(&self) -> Result<(), String> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// The outbox relay with everything it needs; [`Relay::run`] publishes until
/// shutdown.
pub struct Relay {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub topic: String,
    pub cfg: OutboxConfig,
    /// Longest wait for the acknowledgements of one round.
    pub produce_timeout: Duration,
    /// Shortens the idle wait after the consumer committed new rows.
    pub wake: Arc<Notify>,
    /// Set while the consumer has a backlog: the relay defers to it for up
    /// to `cfg.max_defer` ([`defer_for`]).
    pub consumer_backlogged: Arc<AtomicBool>,
    /// Where the relay reports its progress.
    pub health: RelayHealth,
}

/// How often the relay measures its backlog for [`RelayHealth`].
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

impl Relay {
    /// Publishes outbox rows until `shutdown`, reporting to `self.health`.
    pub async fn run(self, shutdown: CancellationToken) {
        let Relay {
            pool,
            producer,
            topic,
            cfg,
            produce_timeout,
            wake,
            consumer_backlogged,
            health,
        } = self;
        health.min_round_gap(produce_timeout * 2 + Duration::from_secs(10));
        let mut backoff = Duration::from_millis(100);
        let mut last_cleanup = Instant::now();
        let mut last_backlog: Option<Instant> = None;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if consumer_backlogged.load(Ordering::Relaxed) {
                match defer_for(&pool, cfg.max_defer).await {
                    Ok((age, Some(wait))) => {
                        // Woken after every batch of the consumer: the
                        // deferral ends as soon as it caught up.
                        health.backlog(age);
                        health.deferred();
                        metrics::counter!("dlrflow_state_outbox_deferrals_total").increment(1);
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = wake.notified() => {}
                            () = tokio::time::sleep(wait) => {}
                        }
                        continue;
                    }
                    Ok((_, None)) => {}
                    Err(e) => tracing::debug!(error = %e, "outbox backlog unknown; not deferring"),
                }
            }
            let round = relay_once(&pool, &producer, &topic, cfg.batch_size, produce_timeout).await;
            if last_backlog.is_none_or(|t| t.elapsed() >= BACKLOG_EVERY) {
                last_backlog = Some(Instant::now());
                match oldest_unpublished_age(&pool).await {
                    Ok(age) => health.backlog(age),
                    Err(e) => tracing::debug!(error = %e, "outbox backlog unknown"),
                }
            }
            match round {
                Ok(r) => {
                    health.round_ok();
                    backoff = Duration::from_millis(100);
                    if r.rows as i64 >= cfg.batch_size || r.rebounded > 0 {
                        continue;
                    }
                }
                Err(e) => {
                    health.round_failed(&format!("{e:#}"));
                    metrics::counter!("dlrflow_state_outbox_errors_total").increment(1);
                    tracing::warn!(error = %format!("{e:#}"), "outbox relay failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            if last_cleanup.elapsed() > Duration::from_secs(60) {
                last_cleanup = Instant::now();
                let r = sqlx::query(
                    "DELETE FROM delivery_outbox WHERE published_at IS NOT NULL \
                     AND published_at < now() - make_interval(secs => $1)",
                )
                .bind(cfg.retention.as_secs_f64())
                .execute(&pool)
                .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "outbox cleanup failed");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = wake.notified() => {}
                () = tokio::time::sleep(cfg.idle_poll) => {}
            }
        }
    }
}

/// Whether the relay leaves the machine to a consumer with a backlog, and
/// for how long at most: until the oldest unpublished row is `max_defer`
/// old. Also returns that row's age. `None` (publish now) when nothing is
/// pending or the oldest row is already that old.
async fn defer_for(
    pool: &PgPool,
    max_defer: Duration,
) -> Result<(Option<Duration>, Option<Duration>), sqlx::Error> {
    if max_defer.is_zero() {
        return Ok((None, None));
    }
    let age = oldest_unpublished_age(pool).await?;
    Ok((
        age,
        age.and_then(|a| max_defer.checked_sub(a))
            .filter(|w| !w.is_zero()),
    ))
}

/// Age of the oldest unpublished outbox row (`None`: none).
async fn oldest_unpublished_age(pool: &PgPool) -> Result<Option<Duration>, sqlx::Error> {
    let secs: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - created_at)::float8 FROM delivery_outbox \
         WHERE published_at IS NULL ORDER BY id LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// What one relay round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Unpublished rows taken (at most the batch size).
    pub rows: usize,
    /// Rows produced, acknowledged and marked published.
    pub published: usize,
    /// Refused rows whose record was re-rendered within the bounds
    /// ([`rebound`]); they stay unpublished and go out in the next round.
    pub rebounded: usize,
    /// Refused rows that could not be repaired: marked published without
    /// being sent, payload replaced by a stub.
    pub dropped: usize,
}

/// What became of one row of a round.
enum Fate {
    Published,
    Refused(&'static str),
    /// Not acknowledged (a transient failure in this round): left as it is.
    Pending,
}

/// One relay round. A permanently refused row does not fail the round (see
/// the module documentation); a transient failure does, after the rows that
/// were acknowledged and the refused ones have been marked.
pub async fn relay_once(
    pool: &PgPool,
    producer: &FutureProducer,
    topic: &str,
    batch_size: i64,
    produce_timeout: Duration,
) -> anyhow::Result<Round> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT id, update_id::text, message_id, payload, traceparent FROM delivery_outbox \
         WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(batch_size)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(Round::default());
    }
    let rows = rows
        .iter()
        .map(|r| {
            Ok(OutboxRow {
                id: r.try_get(0)?,
                update_id: r.try_get(1)?,
                key: r.try_get(2)?,
                payload: r.try_get(3)?,
                traceparent: r.try_get(4)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;

    // Not entered (no children); it spans the produce and the marking, and
    // links to each row's trace.
    let span = publish_span(topic, &rows);
    let mut fates: Vec<Fate> = rows.iter().map(|_| Fate::Pending).collect();
    let mut transient: Option<anyhow::Error> = None;
    let mut pending = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        if row.key.len() + row.payload.len() > MAX_RECORD_BYTES {
            fates[i] = Fate::Refused("message_too_large");
            continue;
        }
        let mut record = FutureRecord::to(topic).key(&row.key).payload(&row.payload);
        if let Some(tp) = &row.traceparent {
            // Only when the change had a trace: a header is a row for some
            // brokers' storage (see ARCHITECTURE.md).
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: TRACEPARENT,
                value: Some(tp.as_str()),
            }));
        }
        match producer.send_result(record) {
            Ok(delivery) => pending.push((i, delivery)),
            Err((e, _)) => match permanent_reason(&e) {
                Some(reason) => fates[i] = Fate::Refused(reason),
                None => {
                    // Queue full, broker gone…: stop producing this round.
                    transient = Some(anyhow::anyhow!("producing to {topic}: {e}"));
                    break;
                }
            },
        }
    }
    let deadline = tokio::time::Instant::now() + produce_timeout;
    for (i, delivery) in pending {
        // `timeout_at` polls the delivery first: acknowledgements that
        // arrived are taken even after the deadline passed.
        match tokio::time::timeout_at(deadline, delivery).await {
            Ok(Ok(Ok(_))) => fates[i] = Fate::Published,
            Ok(Ok(Err((e, _)))) => match permanent_reason(&e) {
                Some(reason) => fates[i] = Fate::Refused(reason),
                None => {
                    transient.get_or_insert_with(|| anyhow::anyhow!("producing to {topic}: {e}"));
                }
            },
            Ok(Err(_)) => {
                transient.get_or_insert_with(|| anyhow::anyhow!("producer dropped a delivery"));
            }
            Err(_) => {
                transient.get_or_insert_with(|| {
                    anyhow::anyhow!("no acknowledgement from {topic} within {produce_timeout:?}")
                });
            }
        }
    }

    let mut round = Round {
        rows: rows.len(),
        ..Round::default()
    };
    let mut published = Vec::new();
    for (row, fate) in rows.iter().zip(&fates) {
        match fate {
            Fate::Published => published.push(row.id),
            Fate::Pending => {}
            Fate::Refused(reason) => {
                if repair_refused(&mut tx, row, reason).await? {
                    round.rebounded += 1;
                } else {
                    round.dropped += 1;
                }
            }
        }
    }
    if !published.is_empty() {
        sqlx::query("UPDATE delivery_outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(&published)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    round.published = published.len();
    span.record("published", round.published);
    drop(span);
    if round.published > 0 {
        metrics::counter!("dlrflow_state_outbox_published_total").increment(round.published as u64);
    }
    match transient {
        Some(e) => Err(e),
        None => Ok(round),
    }
}

/// One unpublished outbox row: its record's key, payload and trace context.
struct OutboxRow {
    id: i64,
    update_id: String,
    key: String,
    payload: String,
    traceparent: Option<String>,
}

/// The span of one relay round (`publish`, a producer span with the
/// messaging attributes), linked to the trace of each row's change.
fn publish_span(topic: &str, rows: &[OutboxRow]) -> tracing::Span {
    let span = tracing::info_span!(
        "publish",
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.batch.message_count = rows.len() as i64,
        published = tracing::field::Empty,
    );
    if dlrflow_runtime::otel::enabled() {
        dlrflow_runtime::otel::attribute(&span, "messaging.destination.name", topic.to_owned());
        for row in rows {
            dlrflow_runtime::otel::link(&span, row.traceparent.as_deref());
        }
    }
    span
}

/// A row the broker refused for good (`reason`): re-rendered within the
/// field bounds when that fits a record (the next round publishes it like any
/// other; `true`), else replaced by a stub naming the reason and size and
/// marked published, so it cannot block the relay (`false`, dropped). Either
/// way one WARN line without the record's text, and a counter by reason.
async fn repair_refused(
    tx: &mut sqlx::PgConnection,
    row: &OutboxRow,
    reason: &'static str,
) -> Result<bool, sqlx::Error> {
    let bytes = row.payload.len();
    let bounded = rebound(&row.payload).filter(|p| p.len() + row.key.len() <= MAX_RECORD_BYTES);
    let repaired = bounded.is_some();
    let payload = bounded.unwrap_or_else(|| {
        json!({
            "schema": SCHEMA,
            "update_id": row.update_id,
            "dropped": {"reason": reason, "bytes": bytes, "at": ts(Some(Utc::now()))},
        })
        .to_string()
    });
    sqlx::query(
        "UPDATE delivery_outbox SET payload = $2, \
         published_at = CASE WHEN $3 THEN published_at ELSE now() END WHERE id = $1",
    )
    .bind(row.id)
    .bind(&payload)
    .bind(repaired)
    .execute(&mut *tx)
    .await?;
    let (counter, outcome) = if repaired {
        (
            "dlrflow_state_outbox_rebounded_total",
            "re-rendered within the field bounds",
        )
    } else {
        (
            "dlrflow_state_outbox_dropped_total",
            "cannot be repaired; dropped (not published)",
        )
    };
    metrics::counter!(counter, "reason" => reason).increment(1);
    tracing::warn!(
        outbox_id = row.id,
        update_id = %row.update_id,
        message_id = %truncate_utf8(&row.key, 128),
        reason,
        bytes,
        new_bytes = payload.len(),
        "outbox record refused; {outcome}"
    );
    Ok(repaired)
}
