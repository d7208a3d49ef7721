//! Hostile input end to end (issue 9): the real ingest, state and reconcile;
//! valid events mixed with more than 30 kinds of input the ingest accepts.
//! Every valid recipient ends in its state, every accepted hostile record
//! ends in the state or in the DLQ (none lost), no batch ever fails (so no
//! record is retried), and the consumer group's lag returns to zero.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dlrflow_e2e::{status_server, timed, Options, Pipeline, PASSWORD, USERNAME};
use dlrflow_sim::Gateway;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use sha2::Digest;

/// Where a hostile record must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    State,
    Dlq,
}

struct Case {
    name: &'static str,
    /// `lisoloo`, `lisoloo-b` or `arpoone`.
    source: &'static str,
    body: Vec<u8>,
    end: End,
}

const TS: &str = "2026-05-27T10:00:05.000Z";

fn event(message_id: &str, event_type: &str, data: Value) -> Value {
    json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": event_type,
        "timestamp": TS,
        "message_id": message_id,
        "data": data,
    })
}

/// `v` rendered with the string `"@@"` replaced by the raw JSON text `token`.
fn with(v: Value, token: &str) -> Vec<u8> {
    v.to_string().replace("\"@@\"", token).into_bytes()
}

fn delivered(phone: &str) -> Value {
    json!({"recipient_phone": phone, "delivered_at": TS, "carrier": "vodacom"})
}

fn cases(tag: &str, owned: &str) -> Vec<Case> {
    let m = |n: usize| format!("{tag}-h{n}");
    let big = "x".repeat(500_000);
    let mut c = Vec::new();
    let mut add = |name, source, body: Vec<u8>, end| {
        c.push(Case {
            name,
            source,
            body,
            end,
        })
    };
    let l = "lisoloo";
    add(
        "lone surrogate, unknown field",
        l,
        with(
            event(
                &m(1),
                "sms.delivered",
                json!({"recipient_phone": "+1000001", "delivered_at": TS, "x": "@@"}),
            ),
            r#""\ud800""#,
        ),
        End::State,
    );
    add(
        "lone surrogate, carrier",
        l,
        with(
            event(
                &m(2),
                "sms.delivered",
                json!({"recipient_phone": "+1000002", "delivered_at": TS, "carrier": "@@"}),
            ),
            r#""\udc00""#,
        ),
        End::Dlq,
    );
    add(
        "lone surrogate, message_id",
        l,
        with(
            event(
                "@@",
                "sms.sent",
                json!({"recipient_phone": "+1000003", "sent_at": TS}),
            ),
            r#""\ud800abc""#,
        ),
        End::Dlq,
    );
    add(
        "NUL, error_message",
        l,
        with(
            event(
                &m(4),
                "sms.failed",
                json!({"recipient_phone": "+1000004", "failed_at": TS, "error_code": "E", "error_message": "@@"}),
            ),
            r#""a\u0000b""#,
        ),
        End::State,
    );
    add(
        "NUL, message_id",
        l,
        with(
            event(
                "@@",
                "sms.sent",
                json!({"recipient_phone": "+1000005", "sent_at": TS}),
            ),
            r#""m\u0000""#,
        ),
        End::Dlq,
    );
    add(
        "NUL, recipient",
        l,
        with(
            event(
                &m(6),
                "sms.sent",
                json!({"recipient_phone": "@@", "sent_at": TS}),
            ),
            r#""+1\u0000""#,
        ),
        End::Dlq,
    );
    add(
        "NUL, carrier",
        l,
        with(
            event(
                &m(7),
                "sms.delivered",
                json!({"recipient_phone": "+1000007", "delivered_at": TS, "carrier": "@@"}),
            ),
            r#""\u0000""#,
        ),
        End::State,
    );
    add(
        "1e1001, segments",
        l,
        with(
            event(
                &m(8),
                "sms.delivered",
                json!({"recipient_phone": "+1000008", "delivered_at": TS, "segments": "@@"}),
            ),
            "1e1001",
        ),
        End::Dlq,
    );
    add(
        "1e1001, unknown field",
        l,
        with(
            event(
                &m(9),
                "sms.delivered",
                json!({"recipient_phone": "+1000009", "delivered_at": TS, "n": "@@"}),
            ),
            "1e1001",
        ),
        End::State,
    );
    add("500 KB error_message", l, event(&m(10), "sms.failed", json!({"recipient_phone": "+1000010", "failed_at": TS, "error_code": "E", "error_message": big})).to_string().into_bytes(), End::State);
    add(
        "500 KB event_type",
        l,
        event(&m(11), &big, json!({})).to_string().into_bytes(),
        End::Dlq,
    );
    add(
        "500 KB message_id",
        l,
        event(
            &big,
            "sms.sent",
            json!({"recipient_phone": "+1000012", "sent_at": TS}),
        )
        .to_string()
        .into_bytes(),
        End::Dlq,
    );
    add(
        "500 KB carrier",
        l,
        event(
            &m(13),
            "sms.delivered",
            json!({"recipient_phone": "+1000013", "delivered_at": TS, "carrier": big}),
        )
        .to_string()
        .into_bytes(),
        End::State,
    );
    add(
        "500 KB recipient",
        l,
        event(
            &m(14),
            "sms.sent",
            json!({"recipient_phone": big, "sent_at": TS}),
        )
        .to_string()
        .into_bytes(),
        End::Dlq,
    );
    add(
        "nesting at the parser's limit",
        l,
        with(
            event(
                &m(15),
                "sms.delivered",
                json!({"recipient_phone": "+1000015", "delivered_at": TS, "deep": "@@"}),
            ),
            &format!("{}{}", "[".repeat(120), "]".repeat(120)),
        ),
        End::State,
    );
    // serde_json skips an unknown value without a depth limit: the ingest
    // accepts it, and so must the state.
    add(
        "nesting far past the parser's limit, unknown field",
        l,
        with(
            event(
                &m(40),
                "sms.delivered",
                json!({"recipient_phone": "+1000040", "delivered_at": TS, "deep": "@@"}),
            ),
            &format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        ),
        End::State,
    );
    add(
        "byte-order mark",
        l,
        [
            &[0xEF, 0xBB, 0xBF][..],
            event(&m(16), "sms.delivered", delivered("+1000016"))
                .to_string()
                .as_bytes(),
        ]
        .concat(),
        End::State,
    );
    add(
        "duplicate keys",
        l,
        event(&m(17), "sms.delivered", delivered("+1000017"))
            .to_string()
            .replacen(
                "\"event_type\"",
                "\"event_type\":\"sms.sent\",\"event_type\"",
                1,
            )
            .into_bytes(),
        End::Dlq,
    );
    add(
        // The parser reads a number where it expects an id as its text.
        "message_id a number",
        l,
        with(
            event(
                "@@",
                "sms.sent",
                json!({"recipient_phone": "+1000018", "sent_at": TS}),
            ),
            "42",
        ),
        End::State,
    );
    add(
        "data a string",
        l,
        with(event(&m(19), "sms.sent", json!("@@")), r#""data""#),
        End::Dlq,
    );
    add(
        "segments a string",
        l,
        with(
            event(
                &m(20),
                "sms.delivered",
                json!({"recipient_phone": "+1000020", "delivered_at": TS, "segments": "@@"}),
            ),
            r#""two""#,
        ),
        End::Dlq,
    );
    add(
        "retryable a string",
        l,
        with(
            event(
                &m(21),
                "sms.failed",
                json!({"recipient_phone": "+1000021", "failed_at": TS, "error_code": "E", "retryable": "@@"}),
            ),
            r#""yes""#,
        ),
        End::Dlq,
    );
    add(
        "unknown event type",
        l,
        event(&m(22), "sms.bounced", json!({}))
            .to_string()
            .into_bytes(),
        End::Dlq,
    );
    add(
        "control characters",
        l,
        with(
            event(
                &m(23),
                "sms.failed",
                json!({"recipient_phone": "+1000023", "failed_at": TS, "error_code": "E", "error_message": "@@"}),
            ),
            r#""\u0001\u001b[31m\u007f""#,
        ),
        End::State,
    );
    add("far-past timestamp", l, json!({"event_id": uuid::Uuid::new_v4().to_string(), "event_type": "sms.sent", "timestamp": "0001-01-01T00:00:00Z", "message_id": m(24), "data": {"recipient_phone": "+1000024", "sent_at": "0001-01-01T00:00:00Z"}}).to_string().into_bytes(), End::State);
    add("far-future timestamp", l, json!({"event_id": uuid::Uuid::new_v4().to_string(), "event_type": "sms.delivered", "timestamp": "9999-12-31T23:59:59Z", "message_id": m(25), "data": {"recipient_phone": "+1000025", "delivered_at": "9999-12-31T23:59:59Z"}}).to_string().into_bytes(), End::State);
    add("offset-less timestamp", l, json!({"event_id": uuid::Uuid::new_v4().to_string(), "event_type": "sms.delivered", "timestamp": "2026-05-27T10:00:05", "message_id": m(26), "data": {"recipient_phone": "+1000026", "delivered_at": "2026-05-27T10:00:05"}}).to_string().into_bytes(), End::State);
    add(
        "empty message_id",
        l,
        event(
            "",
            "sms.sent",
            json!({"recipient_phone": "+1000027", "sent_at": TS}),
        )
        .to_string()
        .into_bytes(),
        End::Dlq,
    );
    add(
        "empty strings in data",
        l,
        event(
            &m(28),
            "sms.delivered",
            json!({"recipient_phone": "+1000028", "delivered_at": TS, "carrier": ""}),
        )
        .to_string()
        .into_bytes(),
        End::State,
    );
    add(
        "huge array inside data",
        l,
        with(
            event(
                &m(29),
                "sms.delivered",
                json!({"recipient_phone": "+1000029", "delivered_at": TS, "list": "@@"}),
            ),
            &format!("[{}0]", "0,".repeat(100_000)),
        ),
        End::State,
    );
    add(
        "another source's message",
        "lisoloo-b",
        event(
            owned,
            "sms.failed",
            json!({"recipient_phone": "+1999000", "failed_at": TS, "error_code": "X"}),
        )
        .to_string()
        .into_bytes(),
        End::Dlq,
    );
    add("invalid date", l, json!({"event_id": uuid::Uuid::new_v4().to_string(), "event_type": "sms.sent", "timestamp": "2026-13-45T99:99:99Z", "message_id": m(31), "data": {}}).to_string().into_bytes(), End::Dlq);
    add("missing data", l, json!({"event_id": uuid::Uuid::new_v4().to_string(), "event_type": "sms.sent", "timestamp": TS, "message_id": m(32)}).to_string().into_bytes(), End::Dlq);
    add(
        "an array to the Lisoloo URL",
        l,
        b"[1,2,3]".to_vec(),
        End::Dlq,
    );
    add("a bare number", l, b"42".to_vec(), End::Dlq);
    add("event_id not a UUID", l, json!({"event_id": "nope", "event_type": "sms.sent", "timestamp": TS, "message_id": m(35), "data": {}}).to_string().into_bytes(), End::Dlq);
    add(
        "990 KB body (DLQ reference)",
        l,
        event(&m(36), "sms.unknown", json!({"pad": "y".repeat(989_700)}))
            .to_string()
            .into_bytes(),
        End::Dlq,
    );
    add("Arpoone: lone surrogate in CustomPayload", "arpoone", format!(r#"[{{"Msisdn":"+1000037","Status":"DELIVERED","MessageId":"{}","ReportDateTime":"{TS}","CustomPayload":"\ud800"}}]"#, m(37)).into_bytes(), End::State);
    add("Arpoone: unknown status", "arpoone", format!(r#"[{{"Msisdn":"+1000038","Status":"EXPLODED","MessageId":"{}","ReportDateTime":"{TS}"}}]"#, m(38)).into_bytes(), End::Dlq);
    add("Arpoone: 500 KB MessageId", "arpoone", format!(r#"[{{"Msisdn":"+1000039","Status":"DELIVERED","MessageId":"{big}","ReportDateTime":"{TS}"}}]"#).into_bytes(), End::Dlq);
    c
}

fn sha(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_ends_in_state_or_dlq_and_never_stalls_the_pipeline() {
    let _t = timed("hostile_input_ends_in_state_or_dlq_and_never_stalls_the_pipeline");
    let server = status_server(&Gateway::new()).await;
    let mut p = Pipeline::new("hostile", &Options::default()).await.unwrap();
    p.start_all(&server, 5).await;

    let tag = p.group.clone();
    let http = reqwest::Client::new();
    let post = |source: &str, body: Vec<u8>| {
        let url = format!("{}/{source}/webhook", p.ingest_url());
        let req = http
            .post(url)
            .basic_auth(USERNAME, Some(PASSWORD))
            .header("content-type", "application/json")
            .body(body);
        async move { req.send().await.unwrap().status().as_u16() }
    };

    // Valid messages: queued, then per recipient sent and a terminal event.
    // The hostile records are posted in between.
    let valid_messages = 20;
    let mut expected: BTreeMap<(String, String), &str> = BTreeMap::new();
    let mut valid = Vec::new();
    for i in 0..valid_messages {
        let id = format!("{tag}-v{i}");
        valid.push(event(&id, "sms.queued", json!({"total_recipients": 3, "total_messages": 3, "total_cost": 0.1, "currency": "USD"})));
        for r in 0..3 {
            let phone = format!("+2439{i:03}{r}");
            valid.push(event(
                &id,
                "sms.sent",
                json!({"recipient_phone": phone, "sent_at": TS, "carrier": "vodacom"}),
            ));
            if (i + r) % 4 == 0 {
                valid.push(event(&id, "sms.failed", json!({"recipient_phone": phone, "failed_at": TS, "error_code": "E_ABSENT", "error_message": "absent", "retryable": true})));
                expected.insert((id.clone(), phone), "failed");
            } else {
                valid.push(event(&id, "sms.delivered", delivered(&phone)));
                expected.insert((id.clone(), phone), "delivered");
            }
        }
    }
    let owned = format!("{tag}-v0");
    let hostile = cases(&tag, &owned);
    assert!(hostile.len() >= 30, "{} kinds", hostile.len());

    let started = Instant::now();
    // The owner of `owned` first, so the foreign event finds it owned.
    let mut valid = valid.into_iter();
    for v in valid.by_ref().take(4) {
        assert_eq!(post("lisoloo", v.to_string().into_bytes()).await, 204);
    }
    // ...and applied: a consumer that joins its group late reads everything
    // in one batch, where the foreign record (another source's key, so
    // another partition) may come first and take the message (seen once in
    // CI: the owner's own events were then the foreign ones).
    let owner_applied = dlrflow_testkit::wait_for(Duration::from_secs(60), || async {
        let resp = http
            .get(format!("{}/v1/messages/{owned}", p.api_url(0)))
            .bearer_auth(dlrflow_e2e::READ_KEY)
            .send()
            .await
            .ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;
    assert!(
        owner_applied.is_some(),
        "{owned} was not applied within 60 s"
    );
    let mut accepted = Vec::new();
    for (n, case) in hostile.iter().enumerate() {
        let status = post(case.source, case.body.clone()).await;
        assert!(
            (200..300).contains(&status),
            "{}: the ingest answered {status}; every case here is JSON it must accept",
            case.name
        );
        accepted.push(case);
        for v in valid.by_ref().take(5 + n % 3) {
            assert_eq!(post("lisoloo", v.to_string().into_bytes()).await, 204);
        }
    }
    for v in valid {
        assert_eq!(post("lisoloo", v.to_string().into_bytes()).await, 204);
    }
    let posted = started.elapsed();

    // Every valid recipient reaches its state through the read API.
    let bound = Duration::from_secs(60);
    let deadline = Instant::now() + bound;
    let mut pending = expected.clone();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} valid recipients not settled within {bound:?}: {:?}",
            pending.len(),
            pending.keys().next()
        );
        let ids: Vec<String> = pending.keys().map(|k| k.0.clone()).collect();
        for id in ids {
            let Ok(resp) = http
                .get(format!("{}/v1/messages/{id}", p.api_url(0)))
                .bearer_auth(dlrflow_e2e::READ_KEY)
                .send()
                .await
            else {
                continue;
            };
            let Ok(v) = resp.json::<Value>().await else {
                continue;
            };
            for r in v["recipients"].as_array().into_iter().flatten() {
                let key = (id.clone(), r["recipient"].as_str().unwrap_or("").to_owned());
                if pending.get(&key).is_some_and(|want| r["status"] == *want) {
                    pending.remove(&key);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled = started.elapsed();

    // Every accepted hostile record is in the state or in the DLQ.
    let pool = p.pool().await.unwrap();
    let raws: Vec<String> =
        sqlx::query_scalar("SELECT raw FROM delivery_events WHERE raw IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap();
    let in_state: std::collections::HashSet<String> =
        raws.iter().map(|r| sha(r.as_bytes())).collect();
    let want_dlq = accepted.iter().filter(|c| c.end == End::Dlq).count();
    let dlq = dlrflow_testkit::read_topic(
        &p.brokers,
        &p.dlq_topic,
        want_dlq,
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    let mut in_dlq: BTreeMap<String, String> = BTreeMap::new();
    for r in &dlq {
        let kind = r.header("error-kind").unwrap_or("").to_owned();
        assert!(
            r.header("error").unwrap_or("").len() <= 1024,
            "bounded error header"
        );
        if r.header("dlq-form") == Some("reference") {
            let v: Value = serde_json::from_slice(&r.payload).unwrap();
            in_dlq.insert(
                v["sha256"].as_str().unwrap().to_owned(),
                format!("{kind}, as a reference"),
            );
        } else {
            in_dlq.insert(sha(&r.payload), kind);
        }
    }
    let mut report = Vec::new();
    let mut wrong = Vec::new();
    for case in &accepted {
        // Arpoone records are the array's elements; each case has one.
        let bytes = if case.source == "arpoone" {
            let elements: Vec<&serde_json::value::RawValue> =
                serde_json::from_slice(&case.body).unwrap();
            elements[0].get().as_bytes().to_vec()
        } else {
            case.body.clone()
        };
        let h = sha(&bytes);
        let end = match (in_state.contains(&h), in_dlq.get(&h)) {
            (true, None) => "state".to_owned(),
            (false, Some(kind)) => format!("DLQ ({kind})"),
            (s, d) => format!("lost or twice: in state {s}, in DLQ {d:?}"),
        };
        let want = match case.end {
            End::State => "state",
            End::Dlq => "DLQ",
        };
        if !end.starts_with(want) {
            wrong.push(format!("{}: ended in {end}, want {want}", case.name));
        }
        report.push(format!("| {} | {end} |", case.name));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(
        in_dlq.len(),
        want_dlq,
        "nothing else in the DLQ: {in_dlq:?}"
    );

    // No batch ever failed: no record was retried.
    let metrics = dlrflow_testkit::scrape(&p.admin_url("state-0")).await;
    let failures = dlrflow_testkit::metric_sum(&metrics, "dlrflow_state_batch_failures_total");
    assert_eq!(failures, 0.0, "batches failed and were retried");

    // The group's lag is zero: its committed offsets reach the topic's end.
    let lag_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lag = group_lag(&p.brokers, &p.group, &p.raw_topic);
        if lag == 0 {
            break;
        }
        assert!(Instant::now() < lag_deadline, "consumer lag stays at {lag}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Every service is still up and ready.
    for name in ["ingest", "state-0"] {
        p.admin_get_ok(name, "/readyz").await;
    }
    eprintln!(
        "hostile e2e: {} hostile kinds, {} valid recipients; posted in {posted:?}, settled {settled:?} after the first post\n| input | ended in |\n|---|---|\n{}",
        accepted.len(),
        expected.len(),
        report.join("\n")
    );
    pool.close().await;
    p.finish().await;
}

/// Records of `topic` not yet committed by `group`.
fn group_lag(brokers: &str, group: &str, topic: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .unwrap();
    let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    for &p in &parts {
        tpl.add_partition(topic, p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    let mut lag = 0;
    for &p in &parts {
        let (_, high) = c
            .fetch_watermarks(topic, p, Duration::from_secs(5))
            .unwrap();
        let done = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        lag += (high - done).max(0);
    }
    lag
}
