//! The job table: the sweeper turns triggers into jobs, workers lease them.
//!
//! A job is one message to read. It is *open* (`done_at IS NULL`) until a read
//! succeeds or it is abandoned; a trigger firing again reopens a done job. Every
//! statement here is safe to run from any number of replicas at once: the
//! sweep is serialized by an advisory lock, a claim uses `FOR UPDATE SKIP
//! LOCKED` and a lease, and a worker only finishes a job it still leases.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};

use crate::config::ReconcileConfig;

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One leased job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    pub message_id: String,
    pub source: String,
    pub reason: String,
    pub attempts: i32,
    pub first_requested_at: DateTime<Utc>,
    /// Database time at the claim, before the read.
    pub claimed_at: DateTime<Utc>,
}

/// What one sweep enqueued, by trigger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub stuck: u64,
    pub flagged: u64,
    pub strict: u64,
    pub incomplete: u64,
    pub deleted: u64,
    /// The consumer's lag the sweep saw (see [`consumer_lag`]).
    pub lag_ms: Option<i64>,
    /// False when another replica held the sweep lock.
    pub ran: bool,
}

/// Gauges computed after a sweep.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backlog {
    pub open_jobs: i64,
    pub due_jobs: i64,
    pub oldest_open_job_secs: f64,
    pub oldest_stuck_secs: f64,
}

/// The sweep parameters, from the configuration.
pub struct SweepParams<'a> {
    pub sources: &'a [String],
    pub strict_sources: &'a [String],
    pub lock_name: &'a str,
    pub cfg: &'a ReconcileConfig,
}

/// The longest lag [`consumer_lag`] reports (ten years): "unknown" is this.
pub const LAG_UNKNOWN_MS: i64 = 10 * 365 * 24 * 3_600_000;

/// How old the oldest raw record possibly not yet in the state is, in ms,
/// from the `consumer_progress` rows dlrflow-state writes at every lag check
/// (of the group and topic that wrote last): `now() - min(caught_up_to)`.
///
/// The lag is unknown ([`LAG_UNKNOWN_MS`]: nothing that went quiet within
/// ten years is opened or read as stuck or incomplete) while any partition's
/// progress is not known to be current:
///
/// - its bound is not known yet (`caught_up_to` NULL);
/// - its row is stale: not written for `stale_after`
///   (`reconcile.progress_stale_after_ms`, a few of dlrflow-state's
///   `health.lag_check_interval_ms`). Its consumer died, hangs in a failing
///   batch, or the partition waits for an owner: the records behind it are
///   unknown, however recent its last bound looked;
/// - it has no row at all while a higher-numbered partition has one (a
///   partition nobody reported).
///
/// `None` when no state consumer ever wrote a row (no gate: the triggers
/// work as without it).
pub async fn consumer_lag(
    ex: impl sqlx::PgExecutor<'_>,
    stale_after: Duration,
) -> sqlx::Result<Option<i64>> {
    let (rows, unknown, missing, lag): (i64, i64, i64, Option<f64>) = sqlx::query_as(
        r#"
WITH w AS (SELECT group_id, topic FROM consumer_progress ORDER BY observed_at DESC LIMIT 1),
     p AS (SELECT p.* FROM consumer_progress p JOIN w USING (group_id, topic))
SELECT count(*),
       count(*) FILTER (WHERE caught_up_to IS NULL
                           OR observed_at < now() - $1 * interval '1 millisecond'),
       coalesce(max(partition) + 1 - count(*), 0),
       extract(epoch FROM now() - min(caught_up_to))::float8 * 1000
  FROM p"#,
    )
    .bind(ms(stale_after))
    .fetch_one(ex)
    .await?;
    Ok(match (rows, unknown, missing, lag) {
        (0, _, _, _) => None,
        (_, 0, 0, Some(ms)) => Some((ms.max(0.0) as i64).min(LAG_UNKNOWN_MS)),
        _ => Some(LAG_UNKNOWN_MS),
    })
}

const UPSERT_TAIL: &str = r#"
ON CONFLICT (message_id) DO UPDATE
   SET reason = excluded.reason, since = excluded.since, due_at = excluded.due_at,
       first_requested_at = excluded.first_requested_at, attempts = 0,
       last_error = NULL, done_at = NULL, gave_up = false, failed = false
 WHERE reconcile_jobs.done_at IS NOT NULL
"#;

/// The deadline of a recipient's status, in ms, as SQL.
const DEADLINE: &str =
    "(CASE rs.status WHEN 'queued' THEN $3 WHEN 'processing' THEN $4 ELSE $5 END) * interval '1 millisecond'";

/// Finds the recipients the webhooks did not settle and opens a job per
/// message: one sweep at a time across replicas (an advisory lock), each kind
/// of candidate in its own step, all in one transaction.
#[tracing::instrument(skip_all)]
pub async fn sweep(pool: &PgPool, p: &SweepParams<'_>) -> sqlx::Result<Swept> {
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext($1))")
        .bind(p.lock_name)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(Swept::default());
    }
    let lag = consumer_lag(&mut *tx, p.cfg.progress_stale_after()).await?;
    let out = Swept {
        ran: true,
        lag_ms: lag,
        stuck: open_stuck(&mut tx, p, lag).await?,
        flagged: open_flagged(&mut tx, p).await?,
        strict: open_strict(&mut tx, p).await?,
        incomplete: open_incomplete(&mut tx, p, lag).await?,
        deleted: delete_finished(&mut tx, p).await?,
    };
    tx.commit().await?;
    Ok(out)
}

type Tx<'c> = sqlx::Transaction<'c, sqlx::Postgres>;

/// Stuck: non-terminal with no news past the deadline of its status (and
/// past the message's scheduled time), and not read within that deadline.
/// "No news" is as far as dlrflow-state is complete: the deadline must have
/// passed before `now - lag` (see [`consumer_lag`]), so while the state
/// lags nothing that went quiet within the lag and the deadline is opened —
/// its news may be waiting in Kafka.
async fn open_stuck(tx: &mut Tx<'_>, p: &SweepParams<'_>, lag: Option<i64>) -> sqlx::Result<u64> {
    let cfg = p.cfg;
    let sql = format!(
        r#"
WITH cand AS (
    SELECT rs.message_id, min(rs.source) AS source, min(rs.last_event_at) AS since
      FROM recipient_state rs
      LEFT JOIN reconcile_jobs j ON j.message_id = rs.message_id
      LEFT JOIN messages m ON m.message_id = rs.message_id
     WHERE rs.source = ANY($1)
       AND rs.status NOT IN ('delivered', 'failed') -- dlrflow-state's open-recipient index predicate
       AND rs.created_at > now() - $2 * interval '1 millisecond'
       AND rs.last_event_at > now() - $2 * interval '1 millisecond'
       AND rs.last_event_at < now() - coalesce($7::bigint, 0) * interval '1 millisecond' - {DEADLINE}
       AND rs.updated_at < now() - coalesce($7::bigint, 0) * interval '1 millisecond' - {DEADLINE}
       AND (m.scheduled_at IS NULL OR m.scheduled_at < now() - {DEADLINE})
       AND (j.message_id IS NULL
            OR (j.done_at IS NOT NULL AND (j.last_read_at IS NULL OR j.last_read_at < now() - {DEADLINE})))
     GROUP BY rs.message_id
     ORDER BY min(rs.last_event_at)
     LIMIT $6
)
INSERT INTO reconcile_jobs (message_id, source, reason, since, due_at, first_requested_at)
SELECT message_id, source, 'stuck', since, now(), now() FROM cand
{UPSERT_TAIL}"#
    );
    Ok(sqlx::query(&sql)
        .bind(p.sources)
        .bind(ms(cfg.max_age()))
        .bind(ms(cfg.deadline_queued()))
        .bind(ms(cfg.deadline_processing()))
        .bind(ms(cfg.deadline_sent()))
        .bind(cfg.sweep_batch)
        .bind(lag)
        .execute(&mut **tx)
        .await?
        .rows_affected())
}

/// Flagged by dlrflow-state (conflict, or any other reason it sets): read at
/// once unless read since the flag was set (then after conflict_reread).
async fn open_flagged(tx: &mut Tx<'_>, p: &SweepParams<'_>) -> sqlx::Result<u64> {
    let cfg = p.cfg;
    let sql = format!(
        r#"
WITH cand AS (
    SELECT rs.message_id, min(rs.source) AS source,
           min(coalesce(rs.reconcile_reason, 'conflict')) AS reason, min(rs.updated_at) AS since
      FROM recipient_state rs
      LEFT JOIN reconcile_jobs j ON j.message_id = rs.message_id
      LEFT JOIN messages m ON m.message_id = rs.message_id
     WHERE rs.needs_reconcile
       AND rs.source = ANY($1)
       AND (j.message_id IS NULL
            OR (j.done_at IS NOT NULL
                AND (j.last_read_at IS NULL
                     OR rs.updated_at > greatest(j.last_read_at, m.status_applied_at)
                     OR j.last_read_at < now() - $2 * interval '1 millisecond')))
     GROUP BY rs.message_id
     ORDER BY min(rs.updated_at)
     LIMIT $3
)
INSERT INTO reconcile_jobs (message_id, source, reason, since, due_at, first_requested_at)
SELECT message_id, source, reason, since, now(), now() FROM cand
{UPSERT_TAIL}"#
    );
    Ok(sqlx::query(&sql)
        .bind(p.sources)
        .bind(ms(cfg.conflict_reread()))
        .bind(cfg.sweep_batch)
        .execute(&mut **tx)
        .await?
        .rows_affected())
}

/// Strict sources: any change since the last read, once the message is
/// quiet. Moves the watermark on unless the batch limit left candidates.
async fn open_strict(tx: &mut Tx<'_>, p: &SweepParams<'_>) -> sqlx::Result<u64> {
    let cfg = p.cfg;
    if p.strict_sources.is_empty() {
        return Ok(0);
    }
    let sql = format!(
        r#"
WITH cand AS (
SELECT rs.message_id, min(rs.source) AS source, min(rs.updated_at) AS since
  FROM recipient_state rs
  LEFT JOIN reconcile_jobs j ON j.message_id = rs.message_id
  LEFT JOIN messages m ON m.message_id = rs.message_id
 WHERE rs.source = ANY($1)
   AND rs.updated_at > greatest(now() - $3 * interval '1 millisecond',
                                (SELECT at FROM reconcile_watermarks WHERE name = 'strict')
                                  - $2 * interval '1 millisecond' - interval '1 minute')
   AND (j.message_id IS NULL
        OR (j.done_at IS NOT NULL
            AND (j.last_read_at IS NULL
                 OR rs.updated_at > greatest(j.last_read_at, m.status_applied_at))))
 GROUP BY rs.message_id
HAVING max(rs.updated_at) < now() - $2 * interval '1 millisecond'
 ORDER BY min(rs.updated_at)
 LIMIT $4
)
INSERT INTO reconcile_jobs (message_id, source, reason, since, due_at, first_requested_at)
SELECT message_id, source, 'strict', since, now(), now() FROM cand
{UPSERT_TAIL}"#
    );
    let opened = sqlx::query(&sql)
        .bind(p.strict_sources)
        .bind(ms(cfg.debounce()))
        .bind(ms(cfg.max_age()))
        .bind(cfg.sweep_batch)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    // Next sweeps only look at changes since this one (minus the debounce
    // and a minute of slack for transactions committing late) — unless this
    // sweep hit its batch limit and left candidates behind.
    if opened < u64::try_from(cfg.sweep_batch).unwrap_or(u64::MAX) {
        sqlx::query(
            "INSERT INTO reconcile_watermarks (name, at) VALUES ('strict', now())
             ON CONFLICT (name) DO UPDATE SET at = excluded.at",
        )
        .execute(&mut **tx)
        .await?;
    }
    Ok(opened)
}

/// Incomplete: the message announced more recipients than we have seen,
/// `incomplete_after` before `now - lag` (as for [`open_stuck`]).
async fn open_incomplete(
    tx: &mut Tx<'_>,
    p: &SweepParams<'_>,
    lag: Option<i64>,
) -> sqlx::Result<u64> {
    let cfg = p.cfg;
    let sql = format!(
        r#"
WITH cand AS (
    SELECT m.message_id, m.source, coalesce(m.queued_at, m.first_seen_at) AS since
      FROM messages m
      LEFT JOIN reconcile_jobs j ON j.message_id = m.message_id
     WHERE m.source = ANY($1)
       AND m.total_recipients IS NOT NULL
       AND coalesce(m.queued_at, m.first_seen_at)
           < now() - (coalesce($5::bigint, 0) + $2) * interval '1 millisecond'
       AND m.first_seen_at < now() - (coalesce($5::bigint, 0) + $2) * interval '1 millisecond'
       AND coalesce(m.queued_at, m.first_seen_at) > now() - $3 * interval '1 millisecond'
       AND (m.scheduled_at IS NULL OR m.scheduled_at < now() - $2 * interval '1 millisecond')
       AND m.total_recipients > (SELECT count(*) FROM recipient_state rs WHERE rs.message_id = m.message_id)
       AND (j.message_id IS NULL
            OR (j.done_at IS NOT NULL
                AND (j.last_read_at IS NULL OR j.last_read_at < now() - $2 * interval '1 millisecond')))
     ORDER BY 3
     LIMIT $4
)
INSERT INTO reconcile_jobs (message_id, source, reason, since, due_at, first_requested_at)
SELECT message_id, source, 'incomplete', since, now(), now() FROM cand
{UPSERT_TAIL}"#
    );
    Ok(sqlx::query(&sql)
        .bind(p.sources)
        .bind(ms(cfg.incomplete_after()))
        .bind(ms(cfg.max_age()))
        .bind(cfg.sweep_batch)
        .bind(lag)
        .execute(&mut **tx)
        .await?
        .rows_affected())
}

/// Forgets jobs finished longer ago than `job_retention`.
async fn delete_finished(tx: &mut Tx<'_>, p: &SweepParams<'_>) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM reconcile_jobs WHERE done_at IS NOT NULL AND done_at < now() - $1 * interval '1 millisecond'",
    )
    .bind(ms(p.cfg.job_retention()))
    .execute(&mut **tx)
    .await?
    .rows_affected())
}

/// The backlog gauges.
pub async fn backlog(
    pool: &PgPool,
    sources: &[String],
    cfg: &ReconcileConfig,
) -> sqlx::Result<Backlog> {
    let (open_jobs, due_jobs, oldest_open_job_secs): (i64, i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE due_at <= now()),
                extract(epoch FROM now() - min(first_requested_at))::float8
           FROM reconcile_jobs WHERE done_at IS NULL AND source = ANY($1)",
    )
    .bind(sources)
    .fetch_one(pool)
    .await?;
    let oldest_stuck_secs: Option<f64> = sqlx::query_scalar(&format!(
        "SELECT extract(epoch FROM now() - min(rs.last_event_at))::float8
           FROM recipient_state rs
          WHERE rs.source = ANY($1)
            AND rs.status NOT IN ('delivered', 'failed')
            AND rs.created_at > now() - $2 * interval '1 millisecond'
            AND rs.last_event_at < now() - {DEADLINE}"
    ))
    .bind(sources)
    .bind(ms(cfg.max_age()))
    .bind(ms(cfg.deadline_queued()))
    .bind(ms(cfg.deadline_processing()))
    .bind(ms(cfg.deadline_sent()))
    .fetch_one(pool)
    .await?;
    Ok(Backlog {
        open_jobs,
        due_jobs,
        oldest_open_job_secs: oldest_open_job_secs.unwrap_or(0.0),
        oldest_stuck_secs: oldest_stuck_secs.unwrap_or(0.0),
    })
}

/// Leases the oldest due open job of `sources`, if any.
pub async fn claim(
    pool: &PgPool,
    owner: &str,
    sources: &[String],
    lease: Duration,
) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(
        r#"
UPDATE reconcile_jobs j
   SET lease_owner = $1,
       lease_until = clock_timestamp() + $2 * interval '1 millisecond',
       last_attempt_at = clock_timestamp()
  FROM (SELECT message_id FROM reconcile_jobs
         WHERE done_at IS NULL AND due_at <= now()
           AND (lease_until IS NULL OR lease_until < now())
           AND source = ANY($3)
         ORDER BY since, message_id
         LIMIT 1
         FOR UPDATE SKIP LOCKED) p
 WHERE j.message_id = p.message_id
RETURNING j.message_id, j.source, j.reason, j.attempts, j.first_requested_at,
          clock_timestamp() AS claimed_at"#,
    )
    .bind(owner)
    .bind(ms(lease))
    .bind(sources)
    .fetch_optional(pool)
    .await
}

/// Records that the budget `name` (`{redis.prefix}:{key_id}`) is in use;
/// true if this is its first use in this database. The limiter asks when its
/// Redis state is missing: a budget used before means Redis lost its log.
///
/// Takes a transaction-scoped advisory lock on the name first, so replicas
/// settle it one at a time: the caller initializes Redis before it commits,
/// and the next replica finds both the row and the Redis state.
pub async fn first_use(tx: &mut Transaction<'_, Postgres>, name: &str) -> sqlx::Result<bool> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('dlrflow-reconcile:budget:' || $1))")
        .bind(name)
        .execute(&mut **tx)
        .await?;
    let inserted: Option<bool> = sqlx::query_scalar(
        "INSERT INTO reconcile_budgets (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING true",
    )
    .bind(name)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(inserted.is_some())
}

/// Why a job is no longer worth its read, re-checked right before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotNeeded {
    /// The message no longer meets any trigger: the webhooks settled it.
    Settled,
    /// It would as of now, but not as far as dlrflow-state is complete: the
    /// answer may be in Kafka already. The sweep opens the job again once the state is
    /// caught up, if the message is still unsettled.
    Lagging,
}

impl NotNeeded {
    pub fn as_str(self) -> &'static str {
        match self {
            NotNeeded::Settled => "settled",
            NotNeeded::Lagging => "consumer_lag",
        }
    }
}

/// Whether `job` still needs its read now: its message meets a trigger (a
/// flag; a recipient stuck, or fewer recipients than announced, as far as
/// dlrflow-state is complete, see [`open_stuck`]); a strict job always does.
/// `None`: read it.
pub async fn still_needed(
    pool: &PgPool,
    job: &Job,
    cfg: &ReconcileConfig,
) -> sqlx::Result<Option<NotNeeded>> {
    if job.reason == "strict" {
        return Ok(None);
    }
    let mut conn = pool.acquire().await?;
    let lag = consumer_lag(&mut *conn, cfg.progress_stale_after()).await?;
    // Each condition twice: as of now, and as far as the state is complete.
    let sql = format!(
        r#"
WITH t(horizon) AS (SELECT now() - coalesce($2::bigint, 0) * interval '1 millisecond')
SELECT
  EXISTS (SELECT 1 FROM recipient_state rs WHERE rs.message_id = $1 AND rs.needs_reconcile),
  EXISTS (SELECT 1 FROM recipient_state rs LEFT JOIN messages m ON m.message_id = rs.message_id
           WHERE rs.message_id = $1
             AND rs.status NOT IN ('delivered', 'failed')
             AND rs.last_event_at < now() - {DEADLINE}
             AND rs.updated_at < now() - {DEADLINE}
             AND (m.scheduled_at IS NULL OR m.scheduled_at < now() - {DEADLINE})),
  EXISTS (SELECT 1 FROM recipient_state rs LEFT JOIN messages m ON m.message_id = rs.message_id
           WHERE rs.message_id = $1
             AND rs.status NOT IN ('delivered', 'failed')
             AND rs.last_event_at < (SELECT horizon FROM t) - {DEADLINE}
             AND rs.updated_at < (SELECT horizon FROM t) - {DEADLINE}
             AND (m.scheduled_at IS NULL OR m.scheduled_at < now() - {DEADLINE})),
  EXISTS (SELECT 1 FROM messages m
           WHERE m.message_id = $1 AND m.total_recipients IS NOT NULL
             AND coalesce(m.queued_at, m.first_seen_at) < now() - $6 * interval '1 millisecond'
             AND m.first_seen_at < now() - $6 * interval '1 millisecond'
             AND m.total_recipients > (SELECT count(*) FROM recipient_state rs WHERE rs.message_id = m.message_id)),
  EXISTS (SELECT 1 FROM messages m
           WHERE m.message_id = $1 AND m.total_recipients IS NOT NULL
             AND coalesce(m.queued_at, m.first_seen_at)
                 < (SELECT horizon FROM t) - $6 * interval '1 millisecond'
             AND m.first_seen_at < (SELECT horizon FROM t) - $6 * interval '1 millisecond'
             AND m.total_recipients > (SELECT count(*) FROM recipient_state rs WHERE rs.message_id = m.message_id))"#
    );
    let (flagged, stuck, stuck_complete, incomplete, incomplete_complete): (
        bool,
        bool,
        bool,
        bool,
        bool,
    ) = sqlx::query_as(&sql)
        .bind(&job.message_id)
        .bind(lag)
        .bind(ms(cfg.deadline_queued()))
        .bind(ms(cfg.deadline_processing()))
        .bind(ms(cfg.deadline_sent()))
        .bind(ms(cfg.incomplete_after()))
        .fetch_one(&mut *conn)
        .await?;
    Ok(if flagged || stuck_complete || incomplete_complete {
        None
    } else if stuck || incomplete {
        Some(NotNeeded::Lagging)
    } else {
        Some(NotNeeded::Settled)
    })
}

/// Closes a job without a read ([`still_needed`] said no): done, nothing
/// counted as read (`last_read_at` stays), `skipped` counted, so the sweep
/// opens it again if its message is still unsettled later.
pub async fn skip(pool: &PgPool, job: &Job, owner: &str, why: NotNeeded) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE reconcile_jobs SET done_at = now(), lease_owner = NULL, lease_until = NULL,
                skipped = skipped + 1, gave_up = false, failed = false,
                last_error = 'not read: ' || $3
          WHERE message_id = $1 AND lease_owner = $2",
    )
    .bind(&job.message_id)
    .bind(owner)
    .bind(why.as_str())
    .execute(pool)
    .await?;
    Ok(())
}

/// Gives a job back without counting an attempt (no read was made).
pub async fn release(pool: &PgPool, job: &Job, owner: &str, delay: Duration) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE reconcile_jobs SET lease_owner = NULL, lease_until = NULL,
                due_at = greatest(due_at, now() + $3 * interval '1 millisecond')
          WHERE message_id = $1 AND lease_owner = $2",
    )
    .bind(&job.message_id)
    .bind(owner)
    .bind(ms(delay))
    .execute(pool)
    .await?;
    Ok(())
}

/// A read that did not settle the message: try again after `delay`, or give
/// up once the job is older than `give_up_after`. Returns whether it gave up.
pub async fn retry_later(
    pool: &PgPool,
    job: &Job,
    owner: &str,
    error: &str,
    delay: Duration,
    count_attempt: bool,
    give_up_after: Duration,
) -> sqlx::Result<bool> {
    let gave_up: Option<bool> = sqlx::query_scalar(
        r#"
UPDATE reconcile_jobs
   SET attempts = attempts + $4, reads = reads + 1, last_error = $3,
       due_at = now() + $5 * interval '1 millisecond',
       lease_owner = NULL, lease_until = NULL,
       gave_up = (now() - first_requested_at > $6 * interval '1 millisecond'),
       done_at = CASE WHEN now() - first_requested_at > $6 * interval '1 millisecond' THEN now() END,
       last_read_at = CASE WHEN now() - first_requested_at > $6 * interval '1 millisecond'
                           THEN now() ELSE last_read_at END
 WHERE message_id = $1 AND lease_owner = $2
RETURNING gave_up"#,
    )
    .bind(&job.message_id)
    .bind(owner)
    .bind(error)
    .bind(i32::from(count_attempt))
    .bind(ms(delay))
    .bind(ms(give_up_after))
    .fetch_optional(pool)
    .await?;
    Ok(gave_up.unwrap_or(false))
}

/// Closes a job whose answer can never be written (a permanent error): done,
/// `failed`, the error kept. Like a completed read it counts as read now, so
/// its triggers fire again only after their usual guard (a deadline later, a
/// newer change, `conflict_reread_secs`), never in a loop.
pub async fn fail(pool: &PgPool, job: &Job, owner: &str, error: &str) -> sqlx::Result<bool> {
    let done = sqlx::query(
        r#"
UPDATE reconcile_jobs
   SET done_at = now(), reads = reads + 1, attempts = attempts + 1, last_error = $3,
       lease_owner = NULL, lease_until = NULL, gave_up = false, failed = true,
       last_read_at = greatest(last_read_at, $4)
 WHERE message_id = $1 AND lease_owner = $2"#,
    )
    .bind(&job.message_id)
    .bind(owner)
    .bind(error)
    .bind(job.claimed_at)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(done == 1)
}

/// Finishes a job whose answer the broker acknowledged. `last_read_at` is
/// the read time; the recipient rows the answer changes when dlrflow-state
/// applies it are known by `messages.status_applied_at`, so they are not
/// taken for new changes (see the triggers).
pub async fn complete(
    pool: &PgPool,
    job: &Job,
    owner: &str,
    read_at: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        r#"
UPDATE reconcile_jobs
   SET done_at = now(), reads = reads + 1, attempts = attempts + 1, last_error = NULL,
       lease_owner = NULL, lease_until = NULL, gave_up = false, failed = false,
       last_read_at = greatest($3, $4)
 WHERE message_id = $1 AND lease_owner = $2"#,
    )
    .bind(&job.message_id)
    .bind(owner)
    .bind(job.claimed_at)
    .bind(read_at)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(done == 1)
}
