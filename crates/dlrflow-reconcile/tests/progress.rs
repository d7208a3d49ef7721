//! The consumer-lag gate against real PostgreSQL, deterministically: the
//! `consumer_progress` rows dlrflow-state writes are set by hand, and one
//! sweep and one re-check (`jobs::still_needed`, right before a read) are
//! run against them. A partition whose progress is stale (its consumer
//! died or hangs), or that has no row at all, makes the lag unknown: a
//! message whose recipient went quiet past the deadline gets no stuck job
//! and no read while it lasts, and does once every partition reports again.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{database_url, phones, webhook, SOURCE};
use dlrflow_events::Status;
use dlrflow_reconcile::config::ReconcileConfig;
use dlrflow_reconcile::jobs::{self, NotNeeded, SweepParams, LAG_UNKNOWN_MS};
use dlrflow_reconcile::Config;
use dlrflow_runtime::settings::PostgresSettings;
use dlrflow_testkit::unique_name;
use sqlx::PgPool;

/// A fresh schema with dlrflow-state's tables and ours (PostgreSQL only).
struct Db {
    pool: PgPool,
    schema: String,
}

impl Db {
    async fn new() -> Db {
        let schema = unique_name("prog").replace('-', "_");
        let cfg = PostgresSettings {
            schema: Some(schema.clone()),
            ..PostgresSettings::with_url(database_url())
        };
        let pool = dlrflow_reconcile::store::connect(&cfg).await.unwrap();
        dlrflow_reconcile::store::migrate(&pool).await.unwrap();
        Db { pool, schema }
    }

    /// One `consumer_progress` row of the group `g`, raw topic `raw`: bound
    /// `caught_up_secs` ago, written `observed_secs` ago.
    async fn progress(&self, partition: i32, caught_up_secs: Option<i64>, observed_secs: i64) {
        sqlx::query(
            "INSERT INTO consumer_progress (group_id, topic, partition, caught_up_to, lag_records, observed_at)
             VALUES ('g', 'raw', $1, now() - $2 * interval '1 second', 0, now() - $3 * interval '1 second')
             ON CONFLICT (group_id, topic, partition) DO UPDATE
                SET caught_up_to = excluded.caught_up_to, observed_at = excluded.observed_at",
        )
        .bind(partition)
        .bind(caught_up_secs)
        .bind(observed_secs)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// A message whose two recipients are `sent` since `quiet_secs` ago
    /// (event time), that news written by the state `arrived_secs` ago.
    async fn message_sent(&self, quiet_secs: i64, arrived_secs: i64) -> String {
        let msg = unique_name("m");
        let at = Utc::now() - chrono::Duration::seconds(quiet_secs);
        let updates: Vec<_> = phones(2)
            .iter()
            .map(|p| webhook(&msg, p, Status::Sent, at))
            .collect();
        let mut tx = self.pool.begin().await.unwrap();
        dlrflow_state::apply_updates(&mut tx, &updates, Utc::now())
            .await
            .unwrap();
        sqlx::query(
            "UPDATE recipient_state SET updated_at = now() - $2 * interval '1 second' WHERE message_id = $1",
        )
        .bind(&msg)
        .bind(arrived_secs)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        msg
    }

    /// A message quiet for `quiet_secs`, its news written as it came.
    async fn quiet_message(&self, quiet_secs: i64) -> String {
        self.message_sent(quiet_secs, quiet_secs).await
    }

    async fn open_job(&self, msg: &str) -> Option<String> {
        sqlx::query_scalar(
            "SELECT reason FROM reconcile_jobs WHERE message_id = $1 AND done_at IS NULL",
        )
        .bind(msg)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    async fn drop(self) {
        self.pool.close().await;
        let admin = PgPool::connect(&database_url()).await.unwrap();
        let _ = sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .execute(&admin)
            .await;
        admin.close().await;
    }
}

/// 5 s deadlines (as the e2e tests), progress stale after 20 s (the default).
fn reconcile_config() -> ReconcileConfig {
    let mut r = Config::defaults().reconcile;
    r.sources = vec![SOURCE.to_owned()];
    r.deadline_queued_secs = 5;
    r.deadline_processing_secs = 5;
    r.deadline_sent_secs = 5;
    r.incomplete_after_secs = 5;
    assert_eq!(r.progress_stale_after(), Duration::from_secs(20));
    r
}

async fn sweep(db: &Db, cfg: &ReconcileConfig) -> jobs::Swept {
    let lock = format!("progress-test:{}", db.schema);
    let swept = jobs::sweep(
        &db.pool,
        &SweepParams {
            sources: &cfg.sources,
            strict_sources: &[],
            lock_name: &lock,
            cfg,
        },
    )
    .await
    .unwrap();
    assert!(swept.ran);
    swept
}

#[tokio::test]
async fn a_stale_partition_holds_stuck_jobs_and_reads_until_its_progress_is_fresh() {
    let db = Db::new().await;
    let cfg = reconcile_config();
    // Quiet for two minutes: far past the 5 s deadline.
    let msg = db.quiet_message(120).await;
    // Partition 0's consumer reports every few seconds and is caught up.
    db.progress(0, Some(1), 1).await;
    // Partition 1's consumer died 40 s ago, caught up at the time: its last
    // bound, 40 s old, would let through anything quiet since before
    // 45 s ago — but what it received since is unknown.
    db.progress(1, Some(40), 40).await;

    // The hole: taken at its word, the stale row's bound is a lag of 40 s,
    // and 120 s of quiet is past it plus the 5 s deadline.
    let trusting = jobs::consumer_lag(&db.pool, Duration::from_secs(3600))
        .await
        .unwrap()
        .expect("rows");
    assert!((39_000..45_000).contains(&trusting), "{trusting}");
    let lag = jobs::consumer_lag(&db.pool, cfg.progress_stale_after())
        .await
        .unwrap();
    assert_eq!(
        lag,
        Some(LAG_UNKNOWN_MS),
        "a stale partition's lag is unknown"
    );
    let swept = sweep(&db, &cfg).await;
    assert_eq!(swept.stuck, 0, "{swept:?}");
    assert_eq!(
        db.open_job(&msg).await,
        None,
        "no stuck job while partition 1 is stale"
    );

    // A job opened before the partition went stale is not read either: the
    // re-check right before the read uses the same gate.
    sqlx::query(
        "INSERT INTO reconcile_jobs (message_id, source, reason, since, due_at, first_requested_at)
         VALUES ($1, $2, 'stuck', now() - interval '120 seconds', now(), now())",
    )
    .bind(&msg)
    .bind(SOURCE)
    .execute(&db.pool)
    .await
    .unwrap();
    let job = jobs::claim(&db.pool, "test/0", &cfg.sources, cfg.lease())
        .await
        .unwrap()
        .expect("the job is due");
    assert_eq!(
        jobs::still_needed(&db.pool, &job, &cfg).await.unwrap(),
        Some(NotNeeded::Lagging),
        "read while partition 1's progress was stale"
    );
    jobs::skip(&db.pool, &job, "test/0", NotNeeded::Lagging)
        .await
        .unwrap();

    // Partition 1 reports again (its consumer is back and caught up): the
    // message, still quiet, gets its job and its read.
    db.progress(1, Some(1), 0).await;
    let lag = jobs::consumer_lag(&db.pool, cfg.progress_stale_after())
        .await
        .unwrap()
        .expect("rows");
    assert!((0..5_000).contains(&lag), "{lag}");
    let swept = sweep(&db, &cfg).await;
    assert_eq!(swept.stuck, 1, "{swept:?}");
    assert_eq!(db.open_job(&msg).await.as_deref(), Some("stuck"));
    let job = jobs::claim(&db.pool, "test/0", &cfg.sources, cfg.lease())
        .await
        .unwrap()
        .expect("the job is due");
    assert_eq!(job.message_id, msg);
    assert_eq!(
        jobs::still_needed(&db.pool, &job, &cfg).await.unwrap(),
        None
    );
    db.drop().await;
}

#[tokio::test]
async fn a_partition_nobody_reported_makes_the_lag_unknown() {
    let db = Db::new().await;
    let cfg = reconcile_config();
    let msg = db.quiet_message(120).await;
    // Partitions 0 and 2 report, partition 1 has no row (its consumer never
    // wrote one).
    db.progress(0, Some(1), 1).await;
    db.progress(2, Some(1), 1).await;
    assert_eq!(
        jobs::consumer_lag(&db.pool, cfg.progress_stale_after())
            .await
            .unwrap(),
        Some(LAG_UNKNOWN_MS)
    );
    assert_eq!(sweep(&db, &cfg).await.stuck, 0);
    assert_eq!(db.open_job(&msg).await, None);
    // A row without a bound yet (a new owner with records behind) is unknown too.
    db.progress(1, None, 0).await;
    assert_eq!(
        jobs::consumer_lag(&db.pool, cfg.progress_stale_after())
            .await
            .unwrap(),
        Some(LAG_UNKNOWN_MS)
    );
    assert_eq!(sweep(&db, &cfg).await.stuck, 0);
    // Every partition known and current: the stuck message is opened.
    db.progress(1, Some(2), 0).await;
    assert_eq!(sweep(&db, &cfg).await.stuck, 1);
    assert_eq!(db.open_job(&msg).await.as_deref(), Some("stuck"));
    db.drop().await;
}

/// The deadline counts from the later of the news' own time and its
/// arrival: a gateway that delivers its webhooks late (a backlog, retries)
/// sends the next one right behind, so news that just arrived is not
/// "quiet", whatever its timestamp says.
#[tokio::test]
async fn news_that_arrived_late_is_not_stuck_until_the_deadline_after_its_arrival() {
    let db = Db::new().await;
    let cfg = reconcile_config();
    db.progress(0, Some(0), 0).await;
    // `sent` 60 s ago by the gateway's clock, written by the state 1 s ago.
    let late = db.message_sent(60, 1).await;
    // The same news, arrived when it happened: stuck.
    let quiet = db.message_sent(60, 60).await;
    let swept = sweep(&db, &cfg).await;
    assert_eq!(swept.stuck, 1, "{swept:?}");
    assert_eq!(db.open_job(&late).await, None, "news 1 s old is not stuck");
    assert_eq!(db.open_job(&quiet).await.as_deref(), Some("stuck"));
    // A job for it opened before (or by another trigger's reasoning) is
    // closed unread as settled while its news is fresh.
    sqlx::query(
        "INSERT INTO reconcile_jobs (message_id, source, reason, since, due_at, first_requested_at)
         VALUES ($1, $2, 'stuck', now() - interval '1 hour', now() - interval '1 hour', now())",
    )
    .bind(&late)
    .bind(SOURCE)
    .execute(&db.pool)
    .await
    .unwrap();
    let job = jobs::claim(&db.pool, "test/0", &cfg.sources, cfg.lease())
        .await
        .unwrap()
        .expect("a due job");
    assert_eq!(job.message_id, late, "the oldest due job");
    assert_eq!(
        jobs::still_needed(&db.pool, &job, &cfg).await.unwrap(),
        Some(NotNeeded::Settled)
    );
    jobs::skip(&db.pool, &job, "test/0", NotNeeded::Settled)
        .await
        .unwrap();
    // Once the deadline has passed since its arrival, it is stuck.
    sqlx::query("UPDATE recipient_state SET updated_at = now() - interval '6 seconds' WHERE message_id = $1")
        .bind(&late)
        .execute(&db.pool)
        .await
        .unwrap();
    db.progress(0, Some(0), 0).await;
    assert_eq!(sweep(&db, &cfg).await.stuck, 1);
    assert_eq!(db.open_job(&late).await.as_deref(), Some("stuck"));

    // Incomplete likewise: `sms.queued` for 3 recipients 60 s ago by its
    // timestamp, first written 1 s ago, one recipient seen so far.
    let msg = unique_name("m");
    sqlx::query(
        "INSERT INTO messages (message_id, source, provider, total_recipients, queued_at, first_seen_at, updated_at)
         VALUES ($1, $2, 'lisoloo', 3, now() - interval '60 seconds', now() - interval '1 second', now())",
    )
    .bind(&msg)
    .bind(SOURCE)
    .execute(&db.pool)
    .await
    .unwrap();
    let swept = sweep(&db, &cfg).await;
    assert_eq!(swept.incomplete, 0, "{swept:?}");
    assert_eq!(db.open_job(&msg).await, None);
    sqlx::query(
        "UPDATE messages SET first_seen_at = now() - interval '6 seconds' WHERE message_id = $1",
    )
    .bind(&msg)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(sweep(&db, &cfg).await.incomplete, 1);
    assert_eq!(db.open_job(&msg).await.as_deref(), Some("incomplete"));
    db.drop().await;
}
