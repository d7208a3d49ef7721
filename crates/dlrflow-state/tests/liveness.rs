//! No single record, size or backend outage stops the consumer (issue 9):
//! odd records end in the state or in the DLQ, a record PostgreSQL refuses is
//! isolated, a foreign source cannot touch another source's message, a
//! record too large for the DLQ goes there as a reference that `replay` can
//! resolve, and Redis down only degrades dedupe.

mod common;

use std::time::Duration;

use common::{assert_expected, count, spawn_app, wait_count, Env};
use dlrflow_testkit::scenario::{lisoloo_scenario, produce_raw, producer, RawRecord};
use dlrflow_testkit::{read_topic, wait_for, PrivateRedis};
use serde_json::json;
use sha2::Digest;

const T: Duration = Duration::from_secs(90);

fn lisoloo(message_id: &str, event_type: &str, data: serde_json::Value) -> RawRecord {
    raw(
        message_id,
        "lisoloo-main",
        json!({
            "event_id": uuid::Uuid::new_v4().to_string(),
            "event_type": event_type,
            "timestamp": "2026-05-27T10:00:05.000Z",
            "message_id": message_id,
            "data": data,
        })
        .to_string(),
    )
}

fn raw(key: &str, source: &str, payload: String) -> RawRecord {
    RawRecord {
        key: key.to_owned(),
        provider: "lisoloo",
        source: source.to_owned(),
        payload,
    }
}

async fn readyz(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_records_end_in_state_or_dlq_and_never_hold_back_the_rest() {
    let env = Env::new(1).await;
    let pool = env.pool().await;
    // A rule of the database the parser knows nothing of: PostgreSQL refuses
    // this one value, for real, as it would refuse any value it cannot hold.
    sqlx::query(
        "ALTER TABLE recipient_state ADD CONSTRAINT test_refuse CHECK (carrier IS DISTINCT FROM 'refuse-me')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let app = spawn_app(env.config()).await;
    let tag = env.group.clone();
    let m = |n: &str| format!("{tag}-{n}");

    let mut odd = Vec::new();
    // 1. A lone surrogate escape in an unknown field: valid JSON, not jsonb.
    let surrogate = lisoloo(
        &m("sur"),
        "sms.delivered",
        json!({"recipient_phone": "+1555000001", "delivered_at": "2026-05-27T10:00:05Z", "x": "PLACEHOLDER"}),
    );
    odd.push(RawRecord {
        payload: surrogate.payload.replace("PLACEHOLDER", "\\ud800"),
        ..surrogate
    });
    // 2. A 520 KB event type: poison, and its error must not repeat it whole.
    odd.push(lisoloo(&m("long"), &"x".repeat(520_000), json!({})));
    // 3. A record too large to go to the DLQ whole (the DLQ keeps a reference).
    let big = lisoloo(
        &m("big"),
        "sms.unknown",
        json!({"pad": "y".repeat(990_000)}),
    );
    let big_payload = big.payload.clone();
    odd.push(big);
    // 4. NUL in an error text: the status counts, the text is made storable.
    odd.push(lisoloo(&m("nul"), "sms.failed", json!({"recipient_phone": "+1555000004", "failed_at": "2026-05-27T10:00:05Z", "error_code": "E1", "error_message": "bad\u{0}text"})));
    // 5. A value PostgreSQL refuses.
    odd.push(lisoloo(&m("refused"), "sms.sent", json!({"recipient_phone": "+1555000005", "carrier": "refuse-me", "sent_at": "2026-05-27T10:00:05Z"})));
    // 6. Another source's message.
    odd.push(lisoloo(&m("owned"), "sms.sent", json!({"recipient_phone": "+1555000006", "carrier": "c", "sent_at": "2026-05-27T10:00:05Z"})));
    let foreign = lisoloo(
        &m("owned"),
        "sms.delivered",
        json!({"recipient_phone": "+1555000006", "delivered_at": "2026-05-27T10:00:09Z"}),
    );
    odd.push(RawRecord {
        source: "lisoloo-other".into(),
        ..foreign
    });

    let scenario = lisoloo_scenario(&tag, 4, 3);
    let p = producer(&env.brokers).unwrap();
    // Odd records first, in the same partition: the good ones queue behind.
    produce_raw(&p, &env.raw, &odd).await.unwrap();
    produce_raw(&p, &env.raw, &scenario.records).await.unwrap();

    // Every good record is applied.
    let total_events = scenario.records.len() as i64 + 3; // + sur, nul, owned
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_events",
        total_events,
        T,
    )
    .await;
    let dlq = read_topic(&env.brokers, &env.dlq, 4, T, Duration::from_millis(1500))
        .await
        .unwrap();
    let mut kinds: Vec<&str> = dlq.iter().filter_map(|r| r.header("error-kind")).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "foreign_source",
            "refused_by_database",
            "unknown_event_type",
            "unknown_event_type"
        ],
        "DLQ kinds"
    );
    for r in &dlq {
        assert!(
            r.header("error").unwrap().len() <= 1024,
            "bounded error header"
        );
    }
    // The big one went as a reference that names its bytes.
    let reference = dlq
        .iter()
        .find(|r| r.header("dlq-form") == Some("reference"))
        .expect("a reference record");
    let v: serde_json::Value = serde_json::from_slice(&reference.payload).unwrap();
    assert_eq!(v["size"], big_payload.len());
    assert_eq!(
        v["sha256"],
        hex::encode(sha2::Sha256::digest(big_payload.as_bytes()))
    );
    assert!(reference.payload.len() < 4096);
    // The 520 KB one went whole, with a bounded error.
    assert!(dlq
        .iter()
        .any(|r| r.payload.len() > 520_000 && r.header("dlq-form").is_none()));

    // State: the scenario, the surrogate and NUL events applied, the foreign
    // event changed nothing.
    let status = |id: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, Option<String>)>(
                "SELECT status, error_message FROM recipient_state WHERE message_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(status(m("sur")).await.0, "delivered");
    assert_eq!(
        status(m("nul")).await,
        ("failed".to_owned(), Some("bad\u{fffd}text".to_owned()))
    );
    assert_eq!(status(m("owned")).await.0, "sent");
    let raw_text: String =
        sqlx::query_scalar("SELECT raw FROM delivery_events WHERE message_id = $1")
            .bind(m("sur"))
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(raw_text.contains("\\ud800"), "raw kept as received");
    let rows = count(&pool, "SELECT count(*) FROM recipient_state").await;
    assert_eq!(rows, scenario.expected.len() as i64 + 3);
    sqlx::query("DELETE FROM recipient_state WHERE message_id LIKE '%-sur' OR message_id LIKE '%-nul' OR message_id LIKE '%-owned'")
        .execute(&pool)
        .await
        .unwrap();
    assert_expected(&pool, &scenario).await;
    let (code, body) = readyz(app.admin).await;
    assert_eq!(code, 200, "{body}");

    // `replay` resolves the reference to the raw record's exact bytes.
    let mut cfg = env.config();
    cfg.kafka.produce_timeout = Duration::from_secs(30);
    let moved = dlrflow_state::replay::replay(
        &cfg,
        &dlrflow_state::replay::ReplayOptions {
            max: Some(4),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(moved, 4);
    let raw_records = read_topic(
        &env.brokers,
        &env.raw,
        odd.len() + scenario.records.len() + 4,
        T,
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    let replayed: Vec<_> = raw_records
        .iter()
        .filter(|r| r.header("replayed-from").is_some())
        .collect();
    assert_eq!(replayed.len(), 4);
    assert!(replayed.iter().any(|r| r.payload == big_payload.as_bytes()));

    app.stop().await;
    pool.close().await;
    env.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_degrades_dedupe_but_state_keeps_moving() {
    let env = Env::new(2).await;
    let mut redis = PrivateRedis::start(None);
    let mut cfg = env.config();
    cfg.redis.conn.url = redis.url().into();
    let app = spawn_app(cfg).await;
    let pool = env.pool().await;
    let p = producer(&env.brokers).unwrap();
    let scenario = lisoloo_scenario(&env.group, 9, 3);
    let thirds: Vec<&[RawRecord]> = scenario
        .records
        .chunks(scenario.records.len() / 3 + 1)
        .collect();

    produce_raw(&p, &env.raw, thirds[0]).await.unwrap();
    let mut done = thirds[0].len() as i64;
    wait_count(&pool, "SELECT count(*) FROM delivery_events", done, T).await;

    redis.down();
    // Sent during the outage, plus duplicates of what was already written.
    produce_raw(&p, &env.raw, thirds[1]).await.unwrap();
    produce_raw(&p, &env.raw, thirds[0]).await.unwrap();
    done += thirds[1].len() as i64;
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_events",
        done,
        Duration::from_secs(20),
    )
    .await;
    let degraded = wait_for(Duration::from_secs(20), || async {
        let (code, body) = readyz(app.admin).await;
        (code == 200 && body["degraded"].as_array().is_some_and(|d| !d.is_empty())).then_some(body)
    })
    .await;
    assert!(degraded.is_some(), "ready, and saying it is degraded");
    let metrics = reqwest::get(format!("http://{}/metrics", app.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dlrflow_state_redis_degraded 1"),
        "{metrics}"
    );

    redis.up();
    produce_raw(&p, &env.raw, thirds[2]).await.unwrap();
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_events",
        scenario.records.len() as i64,
        T,
    )
    .await;
    let restored = wait_for(Duration::from_secs(30), || async {
        let (code, body) = readyz(app.admin).await;
        (code == 200 && body["degraded"].as_array().is_some_and(|d| d.is_empty())).then_some(())
    })
    .await;
    assert!(restored.is_some(), "degraded clears once Redis is back");
    assert_expected(&pool, &scenario).await;
    // Nothing was applied twice although Redis forgot everything.
    assert_eq!(
        count(&pool, "SELECT sum(version)::int8 FROM recipient_state").await,
        scenario.update_ids.len() as i64
    );

    app.stop().await;
    pool.close().await;
    env.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_errors_never_show_secrets() {
    let env = Env::new(1).await;
    let cases = [
        (
            "redis",
            "redis://:redis-s3cret@127.0.0.1:1/0",
            "redis-s3cret",
        ),
        (
            "redis",
            "redis://user:redis-s3cret2@127.0.0.1:1",
            "redis-s3cret2",
        ),
        (
            "postgres",
            "postgres://postgres:pg-s3cret@127.0.0.1:1/x",
            "pg-s3cret",
        ),
        (
            "postgres",
            "postgres://postgres:pg-s3cret3@127.0.0.1:notaport/x",
            "pg-s3cret3",
        ),
    ];
    for (what, url, secret) in cases {
        let mut cfg = env.config();
        cfg.postgres.acquire_timeout = Duration::from_secs(1);
        match what {
            "redis" => cfg.redis.conn.url = url.into(),
            _ => cfg.postgres.url = url.into(),
        }
        let err = match dlrflow_state::App::build(cfg).await {
            Ok(_) => panic!("{url}: started against a closed port"),
            Err(e) => format!("{e:#} {e:?}"),
        };
        assert!(
            !err.contains(secret),
            "{what}: the error shows the secret: {err}"
        );
    }
    env.drop_schema().await;
}
