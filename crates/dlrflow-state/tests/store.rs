//! The write path dlrflow-reconcile shares: `apply_updates` in a caller's
//! transaction, against a real PostgreSQL schema.

mod common;

use chrono::{TimeZone, Utc};
use common::{count, pg_base};
use dlrflow_events::{DeliveryUpdate, Provider, Status};
use dlrflow_runtime::settings::PostgresSettings;
use dlrflow_state::{apply_updates, migrate, Outcome};

fn update(status: Status, second: u32, key: &str, authoritative: bool) -> DeliveryUpdate {
    let at = Utc
        .with_ymd_and_hms(2026, 5, 27, 10, 15, second)
        .single()
        .unwrap();
    DeliveryUpdate {
        provider: if authoritative {
            Provider::StatusApi
        } else {
            Provider::Lisoloo
        },
        source: "lisoloo-main".into(),
        message_id: "m-1".into(),
        recipient: "+243998857000".into(),
        status,
        occurred_at: at,
        processing_at: None,
        sent_at: None,
        delivered_at: (status == Status::Delivered).then_some(at),
        failed_at: (status == Status::Failed).then_some(at),
        carrier: None,
        error_code: (status == Status::Failed).then(|| "E1".into()),
        error_message: None,
        retryable: None,
        segments: None,
        custom_payload: None,
        dedupe_key: key.into(),
        authoritative,
    }
}

#[tokio::test]
async fn apply_updates_merges_flags_conflicts_resolves_authoritatively_and_dedupes() {
    dlrflow_runtime::telemetry::init_test_logs();
    let schema = dlrflow_testkit::unique_name("store").replace('-', "_");
    let cfg = PostgresSettings {
        schema: Some(schema.clone()),
        ..PostgresSettings::with_url(pg_base())
    };
    let pool = cfg.connect().await.unwrap();
    migrate(&pool).await.unwrap();
    migrate(&pool).await.unwrap(); // idempotent

    let delivered = update(Status::Delivered, 8, "k-delivered", false);
    let failed = update(Status::Failed, 9, "k-failed", false);
    let api = update(Status::Failed, 30, "k-api", true);

    let mut tx = pool.begin().await.unwrap();
    let applied = apply_updates(&mut tx, &[delivered.clone(), failed.clone()], Utc::now())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(applied.len(), 2);
    assert_eq!(applied[0].outcome, Outcome::Applied);
    assert_eq!(applied[0].version, 1);
    assert_eq!(applied[1].outcome, Outcome::Conflict);
    assert!(applied[1].state.needs_reconcile);
    assert_eq!(applied[1].state.status, Status::Delivered);

    let mut tx = pool.begin().await.unwrap();
    let applied = apply_updates(&mut tx, std::slice::from_ref(&api), Utc::now())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].state.status, Status::Failed);
    assert!(!applied[0].state.needs_reconcile);
    assert_eq!(applied[0].version, 3);
    assert_eq!(
        applied[0].update_id,
        dlrflow_state::update_id("k-api", "+243998857000")
    );

    // Everything again: already recorded, nothing applied, nothing published.
    let mut tx = pool.begin().await.unwrap();
    let again = apply_updates(&mut tx, &[delivered, failed, api], Utc::now())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(again.is_empty());

    let row: (String, bool, Option<String>, i64, String) = sqlx::query_as(
        "SELECT status, needs_reconcile, error_code, version, provider FROM recipient_state WHERE message_id = 'm-1'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "failed".into(),
            false,
            Some("E1".into()),
            3,
            "lisoloo".into()
        )
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM messages WHERE message_id = 'm-1'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM delivery_events").await,
        3
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM delivery_events WHERE outcome = 'conflict'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM delivery_outbox").await,
        3
    );
    let payload: String =
        sqlx::query_scalar("SELECT payload FROM delivery_outbox ORDER BY id DESC LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(v["schema"], "dlrflow.delivery.v1");
    assert_eq!(v["provider"], "status_api");
    assert_eq!(v["previous_status"], "delivered");
    assert_eq!(v["status"], "failed");
    assert_eq!(v["version"], 3);
    assert_eq!(v["update"]["authoritative"], true);
    assert_eq!(v["state"]["needs_reconcile"], false);

    pool.close().await;
    let admin = sqlx::PgPool::connect(&pg_base()).await.unwrap();
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
}

#[test]
fn config_errors_name_the_setting() {
    let mut cfg = dlrflow_state::Config::defaults();
    cfg.validate().unwrap();
    cfg.batch.max_records = 0;
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("batch.max_records"));
    for (set, key) in [
        (
            (|c: &mut dlrflow_state::Config| c.batch.writers = 0) as fn(&mut dlrflow_state::Config),
            "batch.writers",
        ),
        (|c| c.batch.writers = 17, "batch.writers"),
        (
            |c| c.postgres.max_connections = 2,
            "postgres.max_connections",
        ),
        (
            |c| c.outbox.max_defer = std::time::Duration::from_secs(31),
            "outbox.max_defer_ms",
        ),
    ] {
        let mut cfg = dlrflow_state::Config::defaults();
        set(&mut cfg);
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(key), "{key}: {e}");
    }
    let mut cfg = dlrflow_state::Config::defaults();
    cfg.postgres.schema = Some("Bad-Schema".into());
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("postgres.schema"));
    let mut cfg = dlrflow_state::Config::defaults();
    cfg.kafka.dlq_topic = cfg.kafka.raw_topic.clone();
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("kafka.dlq_topic"));
}

/// The operator page's funnel counts over a window of `recipient_state`;
/// a window too large to count within `console.query_timeout_ms` is
/// cancelled by PostgreSQL and the page says what to do, instead of holding
/// a connection of the state's pool for as long as the count takes.
#[tokio::test]
async fn the_console_funnel_counts_a_window_and_a_slow_count_is_cancelled() {
    use dlrflow_state::console::data::{explain, funnel};
    use std::time::Duration;
    let schema = dlrflow_testkit::unique_name("console").replace('-', "_");
    let cfg = PostgresSettings {
        schema: Some(schema.clone()),
        ..PostgresSettings::with_url(pg_base())
    };
    let pool = cfg.connect().await.unwrap();
    migrate(&pool).await.unwrap();
    // 300,000 recipients of 100,000 messages in the last hour, every fifth failed.
    sqlx::query(
        "INSERT INTO messages (message_id, source, provider, total_recipients) \
         SELECT 'm' || i, 'lisoloo', 'lisoloo', 3 FROM generate_series(1, 100000) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO recipient_state (message_id, recipient, source, provider, status, last_event_at, created_at) \
         SELECT 'm' || (i % 100000 + 1), '+243' || i, 'lisoloo', 'lisoloo', \
                CASE WHEN i % 5 = 0 THEN 'failed' ELSE 'delivered' END, now(), \
                now() - (i % 3600) * interval '1 second' \
           FROM generate_series(1, 300000) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    let to = Utc::now() + chrono::Duration::seconds(1);
    let from = to - chrono::Duration::hours(2);
    let f = funnel(&pool, None, from, to, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        (f.messages, f.announced, f.recipients, f.delivered, f.failed),
        (100_000, 300_000, 300_000, 240_000, 60_000)
    );
    let f = funnel(&pool, Some("other"), from, to, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(f.recipients, 0);
    let e = funnel(&pool, None, from, to, Duration::from_millis(1))
        .await
        .unwrap_err();
    assert!(explain(&e).contains("narrow the window"), "{e}");
    // The pool is not left with a cancelled transaction: it reads on.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 100_000);
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}
