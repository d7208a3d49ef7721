//! Issue 9: ids PostgreSQL cannot hold in the read API, bounded analytics
//! records, an outbox relay that a refused row cannot block, and the relay's
//! health. Against the real broker, Redis and PostgreSQL.

mod common;

use std::time::Duration;

use chrono::{TimeZone, Utc};
use common::{count, spawn_app, wait_count, Env};
use dlrflow_events::{DeliveryUpdate, Provider, RecipientState, Status};
use dlrflow_state::analytics::{self, Relay, RelayHealth, RelayLimits, Round};
use dlrflow_state::record::{payload, MAX_CUSTOM_PAYLOAD_BYTES, MAX_TEXT_BYTES};
use dlrflow_state::{Applied, Outcome};
use dlrflow_testkit::scenario::{produce_raw, producer, RawRecord};
use rdkafka::producer::{FutureProducer, Producer, PurgeConfig};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- helpers

fn update(tag: &str, n: usize, text: &str) -> DeliveryUpdate {
    let at = Utc
        .with_ymd_and_hms(2026, 5, 27, 10, 0, 0)
        .single()
        .unwrap();
    DeliveryUpdate {
        provider: Provider::Arpoone,
        source: "arpoone-main".into(),
        message_id: format!("{tag}-m{n}"),
        recipient: format!("+24399{n:07}"),
        status: Status::Failed,
        occurred_at: at,
        processing_at: None,
        sent_at: None,
        delivered_at: None,
        failed_at: Some(at),
        carrier: Some(text.to_owned()),
        error_code: Some(text.to_owned()),
        error_message: Some(text.to_owned()),
        retryable: Some(false),
        segments: Some(1),
        custom_payload: Some(text.to_owned()),
        dedupe_key: format!("{tag}-k{n}"),
        authoritative: false,
    }
}

fn applied(u: &DeliveryUpdate) -> Applied {
    Applied {
        update_id: dlrflow_state::update_id(&u.dedupe_key, &u.recipient),
        dedupe_key: u.dedupe_key.clone(),
        outcome: Outcome::Applied,
        previous_status: None,
        state: RecipientState {
            message_id: u.message_id.clone(),
            recipient: u.recipient.clone(),
            status: u.status,
            queued_at: None,
            processing_at: None,
            sent_at: None,
            delivered_at: None,
            failed_at: u.failed_at,
            carrier: u.carrier.clone(),
            error_code: u.error_code.clone(),
            error_message: u.error_message.clone(),
            retryable: u.retryable,
            segments: u.segments,
            last_event_at: u.occurred_at,
            needs_reconcile: false,
            reconcile_reason: None,
        },
        version: 1,
    }
}

/// A record as [`payload`] renders it, for an update whose free text is `text`.
fn record(tag: &str, n: usize, text: &str) -> (Applied, String) {
    let u = update(tag, n, text);
    let a = applied(&u);
    let p = payload(&a, &u, "arpoone", Utc::now());
    (a, p)
}

/// A record as the code before issue 9 wrote it: the free text copied whole
/// into `update` and `state`.
fn unbounded_record(tag: &str, n: usize, text: &str) -> (Applied, String) {
    let (a, p) = record(tag, n, "x");
    let mut v: Value = serde_json::from_str(&p).unwrap();
    for path in ["update", "state"] {
        for f in ["carrier", "error_code", "error_message"] {
            v[path][f] = text.into();
        }
    }
    v["update"]["custom_payload"] = text.into();
    (a, v.to_string())
}

async fn insert_outbox(pool: &PgPool, a: &Applied, payload: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO delivery_outbox (update_id, message_id, payload) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(a.update_id)
    .bind(&a.state.message_id)
    .bind(payload)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The delivery topic's records as JSON (waits for `expected`, then settles).
async fn delivery_records(env: &Env, expected: usize) -> Vec<Value> {
    dlrflow_testkit::read_topic(
        &env.brokers,
        &env.delivery,
        expected,
        T,
        Duration::from_millis(1500),
    )
    .await
    .unwrap()
    .iter()
    .map(|r| serde_json::from_slice(&r.payload).unwrap())
    .collect()
}

/// A producer set up as the service's (idempotent, `acks=all`, records never
/// time out in librdkafka).
fn relay_producer(brokers: &str) -> FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "0")
        .set("reconnect.backoff.max.ms", "1000")
        .create()
        .unwrap()
}

fn relay(
    env: &Env,
    pool: &PgPool,
    producer: FutureProducer,
    produce_timeout: Duration,
    health: RelayHealth,
) -> Relay {
    let cfg = env.config();
    Relay {
        pool: pool.clone(),
        producer,
        topic: env.delivery.clone(),
        cfg: cfg.outbox.clone(),
        produce_timeout,
        wake: Default::default(),
        consumer_backlogged: Default::default(),
        health,
    }
}

async fn get(base: &str, path: &str) -> (u16, Value) {
    let r = common::api_client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    let json = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, json)
}

// ---------------------------------------------------------------- read API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_api_answers_400_for_ids_postgres_cannot_hold() {
    let env = Env::new(1).await;
    let app = spawn_app(env.config()).await;
    let base = format!("http://{}", app.addr);
    let pool = env.pool().await;
    sqlx::query(
        "INSERT INTO messages (message_id, source, provider) VALUES ('m1', 's', 'lisoloo')",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO recipient_state (message_id, recipient, source, provider, status, last_event_at) \
         VALUES ('m1', '+243990000001', 's', 'lisoloo', 'sent', now())",
    )
    .execute(&pool)
    .await
    .unwrap();

    let (s, body) = get(&base, "/v1/messages/m1").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["recipients"].as_array().unwrap().len(), 1);
    let (s, _) = get(&base, "/v1/messages/m1/recipients/%2B243990000001").await;
    assert_eq!(s, 200);

    // Not found: 404, also at exactly 512 bytes.
    let (s, body) = get(&base, "/v1/messages/unknown").await;
    assert_eq!((s, body["error"].as_str()), (404, Some("not found")));
    let (s, _) = get(&base, &format!("/v1/messages/{}", "x".repeat(512))).await;
    assert_eq!(s, 404);
    let (s, _) = get(&base, "/v1/messages/m1/recipients/%2B243990000002").await;
    assert_eq!(s, 404);

    // Ids PostgreSQL cannot hold or that no stored message can have: 400,
    // with the JSON error body, never 503.
    for path in [
        "/v1/messages/a%00b".to_owned(),
        "/v1/messages/%00".to_owned(),
        format!("/v1/messages/{}", "x".repeat(513)),
        format!("/v1/messages/{}", "é".repeat(257)),
        "/v1/messages/%FF%FE".to_owned(),
        "/v1/messages/m1/recipients/a%00b".to_owned(),
        "/v1/messages/a%00b/recipients/%2B243990000001".to_owned(),
        format!("/v1/messages/m1/recipients/{}", "1".repeat(513)),
        "/v1/messages/m1/recipients/%C3%28".to_owned(),
    ] {
        let (s, body) = get(&base, &path).await;
        assert_eq!(s, 400, "{path}: {body}");
        let err = body["error"].as_str().unwrap_or_default();
        assert!(err.starts_with("invalid"), "{path}: {body}");
    }
    // The service is fine afterwards.
    let (s, _) = get(&base, "/v1/messages/m1").await;
    assert_eq!(s, 200);
    app.stop().await;
    env.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_api_answers_503_for_a_real_database_error() {
    let env = Env::new(1).await;
    let app = spawn_app(env.config()).await;
    let base = format!("http://{}", app.addr);
    let pool = env.pool().await;
    sqlx::query(
        "INSERT INTO messages (message_id, source, provider) VALUES ('m1', 's', 'lisoloo')",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(get(&base, "/v1/messages/m1").await.0, 200);

    // The table is gone (an operator error, a failed migration): the database
    // fails the query, which is not the client's fault.
    sqlx::query("ALTER TABLE messages RENAME TO messages_away")
        .execute(&pool)
        .await
        .unwrap();
    let (s, body) = get(&base, "/v1/messages/m1").await;
    assert_eq!(
        (s, body["error"].as_str()),
        (503, Some("database unavailable"))
    );
    sqlx::query("ALTER TABLE recipient_state RENAME TO recipient_state_away")
        .execute(&pool)
        .await
        .unwrap();
    let (s, _) = get(&base, "/v1/messages/m1/recipients/%2B1").await;
    assert_eq!(s, 503);
    // An invalid id is still refused before the database is asked.
    assert_eq!(get(&base, "/v1/messages/a%00b").await.0, 400);

    sqlx::query("ALTER TABLE messages_away RENAME TO messages")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE recipient_state_away RENAME TO recipient_state")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(get(&base, "/v1/messages/m1").await.0, 200);
    assert_eq!(get(&base, "/v1/messages/m2").await.0, 404);
    app.stop().await;
    env.drop_schema().await;
}

// ---------------------------------------------------------------- bounded records

#[test]
fn payload_of_an_event_with_500_kb_fields_stays_small() {
    // Multi-byte characters, so a cut can land inside one.
    let huge = "é€".repeat(500 * 1024 / 5);
    assert!(huge.len() >= 500 * 1024);
    let (_, p) = record("huge", 1, &huge);
    assert!(p.len() < 16 * 1024, "record is {} bytes", p.len());
    let v: Value = serde_json::from_str(&p).unwrap();
    let truncated: Vec<&str> = v["truncated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(
        truncated,
        [
            "update.carrier",
            "update.error_code",
            "update.error_message",
            "update.custom_payload",
            "state.carrier",
            "state.error_code",
            "state.error_message",
        ]
    );
    for path in ["update", "state"] {
        for f in ["carrier", "error_code", "error_message"] {
            let s = v[path][f].as_str().unwrap();
            assert!(s.len() <= MAX_TEXT_BYTES && s.len() > MAX_TEXT_BYTES - 4);
            assert!(huge.starts_with(s), "{path}.{f} is a prefix");
        }
    }
    let cp = v["update"]["custom_payload"].as_str().unwrap();
    assert!(cp.len() <= MAX_CUSTOM_PAYLOAD_BYTES && cp.len() > MAX_CUSTOM_PAYLOAD_BYTES - 4);
    assert!(huge.starts_with(cp));

    // Short fields are copied whole and no `truncated` appears.
    let (_, p) = record("small", 1, "subscriber absent");
    let v: Value = serde_json::from_str(&p).unwrap();
    assert!(v.get("truncated").is_none(), "{p}");
    assert_eq!(v["state"]["error_message"], "subscriber absent");
    // Exactly at the bound: whole; one byte more: cut (custom_payload has a
    // larger bound).
    let (_, p) = record("edge", 1, &"a".repeat(MAX_TEXT_BYTES));
    let v: Value = serde_json::from_str(&p).unwrap();
    assert!(v.get("truncated").is_none(), "{p}");
    let (_, p) = record("edge", 1, &"a".repeat(MAX_TEXT_BYTES + 1));
    let v: Value = serde_json::from_str(&p).unwrap();
    assert_eq!(v["truncated"].as_array().unwrap().len(), 6, "{p}");
    assert_eq!(
        v["update"]["custom_payload"].as_str().unwrap().len(),
        MAX_TEXT_BYTES + 1
    );
}

#[test]
fn schema_describes_every_field_and_bound() {
    let schema: Value =
        serde_json::from_str(include_str!("../schema/delivery-v1.schema.json")).unwrap();
    let huge = "z".repeat(10_000);
    let (_, p) = record("schema", 1, &huge);
    let v: Value = serde_json::from_str(&p).unwrap();
    let props = &schema["properties"];
    for (k, x) in v.as_object().unwrap() {
        assert!(props.get(k).is_some(), "field {k} not in the schema");
        if let Some(inner) = x.as_object() {
            for f in inner.keys() {
                assert!(
                    props[k]["properties"].get(f).is_some(),
                    "field {k}.{f} not in the schema"
                );
            }
        }
    }
    assert_eq!(props["truncated"]["type"], "array");
    for path in v["truncated"].as_array().unwrap() {
        let path = path.as_str().unwrap();
        let (o, f) = path.split_once('.').unwrap();
        let want = if path == "update.custom_payload" {
            MAX_CUSTOM_PAYLOAD_BYTES
        } else {
            MAX_TEXT_BYTES
        };
        assert_eq!(
            props[o]["properties"][f]["maxLength"].as_u64(),
            Some(want as u64),
            "maxLength of {path}"
        );
    }
    for f in ["dedupe_key", "message_id", "recipient", "source"] {
        assert_eq!(
            props[f]["maxLength"].as_u64(),
            Some(MAX_TEXT_BYTES as u64),
            "{f}"
        );
    }
}

/// The whole way: a webhook with a 500 KB error message reaches the analytics
/// topic bounded, and the records behind it are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_error_message_reaches_analytics_bounded() {
    let env = Env::new(1).await;
    let app = spawn_app(env.config()).await;
    let tag = env.group.clone();
    let at = "2026-05-27T10:15:08.000Z";
    let event = |n: usize, ty: &str, data: Value| {
        RawRecord {
        key: format!("{tag}-m"),
        provider: "lisoloo",
        source: "lisoloo-main".into(),
        payload: serde_json::json!({
            "event_id": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("{tag}-{n}").as_bytes()).to_string(),
            "event_type": ty, "timestamp": at, "message_id": format!("{tag}-m"), "data": data,
        })
        .to_string(),
    }
    };
    let huge = "E".repeat(500 * 1024);
    let records = vec![
        event(
            1,
            "sms.failed",
            serde_json::json!({"recipient_phone": "+243990000001", "failed_at": at,
                "error_code": "E_X", "error_message": huge, "retryable": false}),
        ),
        event(
            2,
            "sms.delivered",
            serde_json::json!({"recipient_phone": "+243990000002", "delivered_at": at,
                "carrier": "vodacom_drc", "segments": 1}),
        ),
    ];
    let p = producer(&env.brokers).unwrap();
    produce_raw(&p, &env.raw, &records).await.unwrap();

    let pool = env.pool().await;
    wait_count(&pool, "SELECT count(*) FROM delivery_outbox", 2, T).await;
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL",
        0,
        T,
    )
    .await;
    let got = delivery_records(&env, 2).await;
    let ids: std::collections::HashSet<&str> = got
        .iter()
        .map(|v| v["update_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{got:?}");
    let failed = got
        .iter()
        .find(|v| v["recipient"] == "+243990000001")
        .unwrap();
    assert!(failed.to_string().len() < 8 * 1024);
    assert_eq!(
        failed["truncated"],
        serde_json::json!(["update.error_message", "state.error_message"])
    );
    assert_eq!(
        failed["state"]["error_message"].as_str().unwrap().len(),
        MAX_TEXT_BYTES
    );
    // The read API still has the whole text: only the analytics copy is cut.
    assert_eq!(
        count(
            &pool,
            "SELECT length(error_message)::bigint FROM recipient_state WHERE recipient = '+243990000001'"
        )
        .await,
        500 * 1024
    );
    app.stop().await;
    env.drop_schema().await;
}

// ---------------------------------------------------------------- relay

/// Rows the broker refuses for good do not block the rows behind them: a
/// v1 record too large for the broker (written before records were bounded)
/// is re-rendered within the bounds and published; a row that is not a
/// record at all is dropped. Nothing is retried in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_around_refused_rows() {
    let env = Env::new(1).await;
    let pool = env.pool().await;
    let tag = env.group.clone();
    let huge = "é".repeat(300 * 1024); // 600 KB, × 7 fields: about 4 MB
    let (a_old, p_old) = unbounded_record(&tag, 0, &huge);
    assert!(p_old.len() > 1_000_000);
    let old_id = insert_outbox(&pool, &a_old, &p_old).await;
    let (a_junk, _) = record(&tag, 1, "x");
    let junk = "j".repeat(1_100_000);
    let junk_id = insert_outbox(&pool, &a_junk, &junk).await;
    let mut normal = Vec::new();
    for n in 2..7 {
        let (a, p) = record(&tag, n, "subscriber absent");
        insert_outbox(&pool, &a, &p).await;
        normal.push(a.update_id);
    }

    let producer = relay_producer(&env.brokers);
    let round = |_: ()| analytics::relay_once(&pool, &producer, &env.delivery, 1000, T);
    // Round 1: the five normal rows go out; the old record is re-rendered, the
    // junk dropped.
    let r = round(()).await.unwrap();
    assert_eq!(
        r,
        Round {
            rows: 7,
            published: 5,
            rebounded: 1,
            dropped: 1
        }
    );
    // Round 2: the re-rendered record goes out. Round 3: nothing left.
    let r = round(()).await.unwrap();
    assert_eq!((r.rows, r.published, r.rebounded, r.dropped), (1, 1, 0, 0));
    assert_eq!(round(()).await.unwrap(), Round::default());
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL"
        )
        .await,
        0
    );

    // The dropped row keeps a small stub saying why; its text is gone.
    let stub: String = sqlx::query_scalar("SELECT payload FROM delivery_outbox WHERE id = $1")
        .bind(junk_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let stub: Value = serde_json::from_str(&stub).unwrap();
    assert_eq!(stub["dropped"]["reason"], "message_too_large");
    assert_eq!(stub["dropped"]["bytes"], 1_100_000);
    assert_eq!(stub["update_id"], a_junk.update_id.to_string());

    // On the topic: the five normal records and the re-rendered one, once each.
    let got = delivery_records(&env, 6).await;
    assert_eq!(got.len(), 6, "{got:?}");
    let ids: Vec<String> = got
        .iter()
        .map(|v| v["update_id"].as_str().unwrap().to_owned())
        .collect();
    for id in &normal {
        assert!(ids.contains(&id.to_string()));
    }
    assert!(!ids.contains(&a_junk.update_id.to_string()));
    let old = got
        .iter()
        .find(|v| v["update_id"] == a_old.update_id.to_string())
        .expect("the re-rendered record is published");
    assert!(old.to_string().len() < 16 * 1024);
    assert_eq!(old["schema"], "dlrflow.delivery.v1");
    assert_eq!(old["status"], "failed");
    assert_eq!(old["version"], 1);
    assert_eq!(old["truncated"].as_array().unwrap().len(), 7);
    assert_eq!(
        old["state"]["error_message"].as_str().unwrap(),
        "é".repeat(MAX_TEXT_BYTES / 2)
    );
    let stored: String = sqlx::query_scalar("SELECT payload FROM delivery_outbox WHERE id = $1")
        .bind(old_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(stored.len() < 16 * 1024);
    env.drop_schema().await;
}

/// The relay loop with a refused row at the head keeps publishing what
/// arrives behind it and reports itself healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_loop_is_not_blocked_by_a_refused_row() {
    let env = Env::new(1).await;
    let pool = env.pool().await;
    let tag = env.group.clone();
    let (a, p) = unbounded_record(&tag, 0, &"x".repeat(600 * 1024));
    insert_outbox(&pool, &a, &p).await;
    let (a, _) = record(&tag, 1, "x");
    let junk = a.update_id;
    insert_outbox(&pool, &a, &"not json ".repeat(200_000)).await;
    for n in 2..5 {
        let (a, p) = record(&tag, n, "subscriber absent");
        insert_outbox(&pool, &a, &p).await;
    }
    let health = RelayHealth::default();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        relay(&env, &pool, relay_producer(&env.brokers), T, health.clone()).run(shutdown.clone()),
    );
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL",
        0,
        T,
    )
    .await;
    // Rows written later are published too.
    for n in 5..8 {
        let (a, p) = record(&tag, n, "subscriber absent");
        insert_outbox(&pool, &a, &p).await;
    }
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL",
        0,
        T,
    )
    .await;
    // The round that published the last rows records its success.
    let t0 = std::time::Instant::now();
    while health.status().oldest_unpublished_age.is_some()
        || health.status().last_success_at.is_none()
    {
        assert!(t0.elapsed() < T, "{:?}", health.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = health.status();
    assert_eq!(s.consecutive_failures, 0, "{s:?}");
    assert!(s.last_success_at.is_some());
    assert_eq!(s.oldest_unpublished_age, None, "{s:?}");
    assert!(health.problems().is_empty(), "{:?}", health.problems());
    // 3 + 3 normal rows and the re-rendered one (at least once each); the
    // junk row never.
    let ids: std::collections::HashSet<String> = delivery_records(&env, 7)
        .await
        .iter()
        .map(|v| v["update_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 7, "{ids:?}");
    assert!(!ids.contains(&junk.to_string()));
    stop_relay(shutdown, task).await;
    env.drop_schema().await;
}

/// Stops a relay task and waits for it to end (20 s at most).
async fn stop_relay(shutdown: CancellationToken, task: tokio::task::JoinHandle<()>) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------- relay health

/// With the broker unreachable the relay's health turns not ready (failed
/// rounds in a row, an ageing backlog); once the broker is back it is ready
/// again and the backlog is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_health_reports_failures_and_backlog() {
    let env = Env::new(1).await;
    let pool = env.pool().await;
    let tag = env.group.clone();
    for n in 0..3 {
        let (a, p) = record(&tag, n, "subscriber absent");
        insert_outbox(&pool, &a, &p).await;
    }
    let limits = RelayLimits {
        max_consecutive_failures: 3,
        max_backlog_age: Duration::from_secs(2),
        max_round_gap: Duration::from_secs(60),
    };

    // Nothing listens on port 1: every round times out.
    let health = RelayHealth::new(limits);
    assert!(health.problems().is_empty(), "ready before the first round");
    let shutdown = CancellationToken::new();
    let dead = relay_producer("127.0.0.1:1");
    let task = tokio::spawn(
        relay(
            &env,
            &pool,
            dead.clone(),
            Duration::from_millis(500),
            health.clone(),
        )
        .run(shutdown.clone()),
    );
    let t0 = std::time::Instant::now();
    loop {
        let problems = health.problems();
        if problems
            .iter()
            .any(|p| p.contains("failed rounds in a row"))
            && problems.iter().any(|p| p.contains("oldest unpublished"))
        {
            break;
        }
        assert!(
            t0.elapsed() < T,
            "still {problems:?} / {:?}",
            health.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = health.status();
    assert!(s.consecutive_failures >= 3);
    assert!(s.last_success_at.is_none());
    assert!(s.last_error.unwrap().contains("no acknowledgement"));
    assert!(s.oldest_unpublished_age.unwrap() > Duration::from_secs(2));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap();
    dead.purge(PurgeConfig::default().queue().inflight());
    drop(dead);

    // The broker is back: the same health turns ready.
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        relay(&env, &pool, relay_producer(&env.brokers), T, health.clone()).run(shutdown.clone()),
    );
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL",
        0,
        T,
    )
    .await;
    let t0 = std::time::Instant::now();
    while !health.problems().is_empty() {
        assert!(t0.elapsed() < T, "{:?}", health.problems());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = health.status();
    assert_eq!(s.consecutive_failures, 0);
    assert!(s.last_success_at.is_some());
    assert_eq!(s.oldest_unpublished_age, None);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap();
    env.drop_schema().await;
}

/// A relay that stops coming round (hung, or never started) is reported.
#[test]
fn relay_health_reports_a_stalled_relay() {
    let health = RelayHealth::new(RelayLimits {
        max_round_gap: Duration::from_millis(50),
        ..RelayLimits::default()
    });
    assert!(health.check().is_ok());
    std::thread::sleep(Duration::from_millis(80));
    let err = health.check().unwrap_err();
    assert!(err.contains("no round finished"), "{err}");
    health.round_ok();
    assert!(health.check().is_ok());
    // A relay raises the gap to what its produce timeout needs.
    health.min_round_gap(Duration::from_secs(30));
    assert_eq!(health.limits().max_round_gap, Duration::from_secs(30));
}

/// Issue 13: while the consumer has a backlog the relay leaves the machine
/// to it, until the oldest unpublished row is `outbox.max_defer_ms` old or
/// the consumer caught up (its wake), whichever comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_defers_to_a_backlogged_consumer_for_at_most_max_defer() {
    let env = Env::new(1).await;
    let pool = env.pool().await;
    let tag = env.group.clone();
    let pending = "SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL";
    let mut r = relay(
        &env,
        &pool,
        relay_producer(&env.brokers),
        T,
        RelayHealth::default(),
    );
    r.cfg.max_defer = Duration::from_secs(6);
    let backlogged = r.consumer_backlogged.clone();
    let wake = r.wake.clone();
    let health = r.health.clone();
    backlogged.store(true, std::sync::atomic::Ordering::Relaxed);
    for n in 0..3 {
        let (a, p) = record(&tag, n, "x");
        insert_outbox(&pool, &a, &p).await;
    }
    let inserted = std::time::Instant::now();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(r.run(shutdown.clone()));

    // Deferred: the relay has seen the rows and let them age past 1.5 s,
    // and nothing went out; it counts as alive meanwhile.
    backlog_seen(&health, Duration::from_millis(1500)).await;
    assert_eq!(count(&pool, pending).await, 3);
    assert!(health.problems().is_empty(), "{:?}", health.problems());
    // Then it publishes although the consumer is still backlogged.
    wait_count(&pool, pending, 0, T).await;
    let waited = inserted.elapsed();
    assert!(
        waited >= Duration::from_millis(5900),
        "published after {waited:?}"
    );
    assert_eq!(delivery_records(&env, 3).await.len(), 3);

    // New rows: deferred again, until the consumer caught up and woke it.
    for n in 3..5 {
        let (a, p) = record(&tag, n, "x");
        insert_outbox(&pool, &a, &p).await;
    }
    wake.notify_one();
    backlog_seen(&health, Duration::from_secs(1)).await;
    assert_eq!(
        count(&pool, pending).await,
        2,
        "published while the consumer was backlogged"
    );
    let caught_up = std::time::Instant::now();
    backlogged.store(false, std::sync::atomic::Ordering::Relaxed);
    wake.notify_one();
    wait_count(&pool, pending, 0, T).await;
    // (Deferring on, the rows would wait 5 s more.)
    assert!(
        caught_up.elapsed() < Duration::from_secs(3),
        "a caught-up consumer's wake ends the deferral at once ({:?})",
        caught_up.elapsed()
    );
    stop_relay(shutdown, task).await;
    env.drop_schema().await;
}

/// Waits until the relay reports pending rows at least `age` old (it
/// measures them each time it decides whether to defer).
async fn backlog_seen(health: &RelayHealth, age: Duration) {
    let t0 = std::time::Instant::now();
    while health
        .status()
        .oldest_unpublished_age
        .is_none_or(|a| a < age)
    {
        assert!(t0.elapsed() < T, "{:?}", health.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
