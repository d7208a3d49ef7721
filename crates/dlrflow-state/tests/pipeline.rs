//! The consumer on the real broker, Redis and PostgreSQL.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{analytics_ids, assert_expected, count, spawn_app, wait_count, Env};
use dlrflow_testkit::scenario::{
    lisoloo_scenario, produce_raw, producer, shuffled_with_duplicates, RawRecord,
};

const T: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_and_duplicated_events_converge() {
    let env = Env::new(3).await;
    let scenario = lisoloo_scenario(&env.group, 20, 5);
    let records = shuffled_with_duplicates(&scenario.records, 30, 7);
    let app = spawn_app(env.config()).await;
    let p = producer(&env.brokers).unwrap();
    produce_raw(&p, &env.raw, &records).await.unwrap();

    let pool = env.pool().await;
    let unique = scenario.records.len() as i64;
    wait_count(&pool, "SELECT count(*) FROM delivery_events", unique, T).await;
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL",
        0,
        T,
    )
    .await;
    assert_expected(&pool, &scenario).await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM messages WHERE total_recipients = 5"
        )
        .await,
        20
    );

    // Analytics: exactly the expected update ids, each once (no crash here).
    let ids = analytics_ids(&env, scenario.update_ids.len()).await;
    assert_eq!(ids.len(), scenario.update_ids.len());
    let got: HashSet<_> = ids.into_iter().collect();
    let want: HashSet<_> = scenario.update_ids.iter().copied().collect();
    assert_eq!(got, want);

    // Read API.
    let http = common::api_client();
    let base = format!("http://{}", app.addr);
    let (mid, phone) = scenario.expected.keys().next().unwrap().clone();
    let body: serde_json::Value = http
        .get(format!("{base}/v1/messages/{mid}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["message_id"], mid.as_str());
    assert_eq!(body["total_recipients"], 5);
    assert_eq!(body["recipients"].as_array().unwrap().len(), 5);
    let r = http
        .get(format!(
            "{base}/v1/messages/{mid}/recipients/{}",
            phone.replace('+', "%2B")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r: serde_json::Value = r.json().await.unwrap();
    assert_eq!(r["recipient"], phone.as_str());
    assert_eq!(
        r["status"],
        scenario.expected[&(mid.clone(), phone.clone())].status
    );
    let missing = http
        .get(format!("{base}/v1/messages/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let admin = format!("http://{}", app.admin);
    let ready = http.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    // The read API's port has no operational routes; the admin port no API.
    for path in ["/readyz", "/healthz", "/metrics"] {
        let code = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(code, 404, "{path} on the read API's port");
    }
    let api_on_admin = http
        .get(format!("{admin}/v1/messages/{mid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(api_on_admin.status(), 404, "the read API on the admin port");
    let metrics = dlrflow_testkit::scrape(&admin).await;
    assert!(metrics.contains("dlrflow_state_events_total"), "{metrics}");

    app.stop().await;
    env.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_mid_stream_causes_no_double_application() {
    let env = Env::new(2).await;
    let scenario = lisoloo_scenario(&env.group, 10, 4);
    let (first, second) = scenario.records.split_at(scenario.records.len() / 2);
    let app = spawn_app(env.config()).await;
    let p = producer(&env.brokers).unwrap();
    let pool = env.pool().await;

    produce_raw(&p, &env.raw, first).await.unwrap();
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_events",
        first.len() as i64,
        T,
    )
    .await;
    // Redis marks are set on the round trip after the commit: wait for them.
    let prefix = env.prefix.clone();
    let marked = dlrflow_testkit::wait_for(T, || {
        let prefix = prefix.clone();
        let n = first.len();
        async move {
            let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query_async(&mut conn)
                .await
                .ok()?;
            (keys.len() == n).then_some(())
        }
    })
    .await;
    assert!(marked.is_some(), "redis marks for the first half");
    let deleted = env.delete_redis_keys().await;
    assert_eq!(deleted, first.len());

    // Everything again (Redis knows nothing now), plus the second half.
    let mut again: Vec<RawRecord> = first.to_vec();
    again.extend_from_slice(second);
    again.extend_from_slice(first);
    produce_raw(&p, &env.raw, &again).await.unwrap();
    let unique = scenario.records.len() as i64;
    wait_count(&pool, "SELECT count(*) FROM delivery_events", unique, T).await;
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL",
        0,
        T,
    )
    .await;
    assert_expected(&pool, &scenario).await;
    // Exactly one change per recipient event: versions count them.
    assert_eq!(
        count(&pool, "SELECT sum(version)::int8 FROM recipient_state").await,
        scenario.update_ids.len() as i64
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM delivery_outbox").await,
        scenario.update_ids.len() as i64
    );
    let ids = analytics_ids(&env, scenario.update_ids.len()).await;
    assert_eq!(
        ids.len(),
        scenario.update_ids.len(),
        "no duplicate analytics record"
    );
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        scenario.update_ids.len()
    );

    app.stop().await;
    env.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dlq_while_the_partition_moves_on_and_replay_returns_them() {
    let env = Env::new(1).await;
    let scenario = lisoloo_scenario(&env.group, 3, 2);
    let app = spawn_app(env.config()).await;
    let p = producer(&env.brokers).unwrap();
    let pool = env.pool().await;

    let poison = |payload: &str| RawRecord {
        key: format!("{}-m0", env.group),
        provider: "lisoloo",
        source: "lisoloo-main".into(),
        payload: payload.into(),
    };
    let mut records = vec![poison(
        r#"{"event_id":"f8a3b7c1-2e4d-4a9b-9d8f-7c6e5b4a3d2c","event_type":"sms.bounced","timestamp":"2026-05-27T10:15:01Z","message_id":"x","data":{}}"#,
    )];
    records.extend_from_slice(&scenario.records[..5]);
    records.push(poison("not json at all"));
    records.extend_from_slice(&scenario.records[5..]);
    produce_raw(&p, &env.raw, &records).await.unwrap();

    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_events",
        scenario.records.len() as i64,
        T,
    )
    .await;
    assert_expected(&pool, &scenario).await;
    let dlq = dlrflow_testkit::read_topic(&env.brokers, &env.dlq, 2, T, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(dlq.len(), 2);
    assert_eq!(dlq[0].payload, records[0].payload.as_bytes());
    assert_eq!(dlq[0].header("error-kind"), Some("unknown_event_type"));
    assert!(dlq[0].header("error").unwrap().contains("sms.bounced"));
    assert_eq!(dlq[0].header("original-topic"), Some(env.raw.as_str()));
    assert_eq!(dlq[0].header("original-offset"), Some("0"));
    // The raw record's key (its origin) and timestamp (its receive time) go
    // with it.
    let key = dlq[0].raw_key().unwrap();
    assert_eq!(
        (key.source, key.provider, key.message_id),
        ("lisoloo-main", "lisoloo", records[0].key.as_str())
    );
    let received = dlrflow_testkit::read_topic(&env.brokers, &env.raw, 1, T, Duration::ZERO)
        .await
        .unwrap();
    assert!(dlq[0].timestamp.is_some());
    assert_eq!(dlq[0].timestamp, received[0].timestamp, "the receive time");
    assert_eq!(dlq[1].header("error-kind"), Some("not_json"));

    // Replay moves both back to the raw topic (they are still poison, so the
    // consumer sends them to the DLQ again).
    let mut cfg = env.config();
    cfg.kafka.group_id = format!("{}-r", env.group);
    let opts = dlrflow_state::replay::ReplayOptions {
        max: Some(10),
        idle: Duration::from_secs(2),
        ..Default::default()
    };
    let moved = dlrflow_state::replay::replay(&cfg, &opts).await.unwrap();
    assert_eq!(moved, 2);
    let raw = dlrflow_testkit::read_topic(
        &env.brokers,
        &env.raw,
        records.len() + 2,
        T,
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    assert_eq!(raw.len(), records.len() + 2);
    let replayed: Vec<_> = raw
        .iter()
        .filter(|r| r.header("replayed-from").is_some())
        .collect();
    assert_eq!(replayed.len(), 2);
    assert!(replayed.iter().all(|r| r.header("error").is_none()
        && r.raw_key().is_some_and(|k| k.provider == "lisoloo")
        && r.timestamp == received[0].timestamp));
    let dlq = dlrflow_testkit::read_topic(&env.brokers, &env.dlq, 4, T, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(dlq.len(), 4);

    app.stop().await;
    env.drop_schema().await;
}

/// Issue 13: a batch is written in `batch.writers` transactions side by
/// side, each message's records in exactly one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_written_by_two_writers_each_message_in_one() {
    let env = Env::new(3).await;
    let scenario = lisoloo_scenario(&env.group, 40, 3);
    let p = producer(&env.brokers).unwrap();
    produce_raw(&p, &env.raw, &scenario.records).await.unwrap();
    // Every record in one batch: no idle close, a long window.
    let mut cfg = env.config();
    assert_eq!(cfg.batch.writers, 2, "the default");
    cfg.batch.max_records = 10_000;
    cfg.batch.max_wait = Duration::from_secs(5);
    cfg.batch.idle_close = cfg.batch.max_wait;
    let _app = spawn_app(cfg).await;

    let pool = env.pool().await;
    let n = scenario.records.len() as i64;
    wait_count(&pool, "SELECT count(*) FROM delivery_events", n, T).await;
    assert_expected(&pool, &scenario).await;
    // `xmin`: the transaction that wrote a row.
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM (SELECT message_id FROM delivery_events \
             GROUP BY message_id HAVING count(DISTINCT xmin::text) > 1) m"
        )
        .await,
        0,
        "a message's records were split between transactions"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(DISTINCT xmin::text) FROM delivery_events"
        )
        .await,
        2,
        "one batch, two writers"
    );
}
