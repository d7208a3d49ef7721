//! The Lisoloo sender against a receiver inside the test.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use base64::Engine;
use common::{bounded, lisoloo_cfg, Receiver, Reply};
use dlrflow_sim::{run_lisoloo, FinalStatus, Gateway, WebhookFate};
use tokio_util::sync::CancellationToken;

fn event_id(r: &common::Received) -> String {
    r.json()["event_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn events_follow_the_documents() {
    let rx = Receiver::start(|_| Reply::Status(204)).await;
    let mut cfg = lisoloo_cfg(&rx.url());
    cfg.messages = 5;
    cfg.recipients = 3;
    cfg.failure_rate = 0.5;
    cfg.delivery.reorder_window = 8;
    let gateway = Gateway::new();
    let report = bounded(30, run_lisoloo(&cfg, &gateway, CancellationToken::new()))
        .await
        .unwrap();
    let got = rx.received();
    // 1 queued per message + processing + (sent) + terminal per recipient.
    assert_eq!(report.totals.acked as usize, got.len());
    assert_eq!(report.by_type["sms.queued"].acked, 5);
    assert_eq!(report.by_type["sms.processing"].acked, 15);
    assert_eq!(
        report.by_type["sms.delivered"].acked + report.by_type["sms.failed"].acked,
        15
    );
    let want_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("lisoloo_webhook_user:s3cret")
    );
    let mut ids = HashSet::new();
    let mut per_recipient: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for r in &got {
        assert_eq!(r.path, "/lisoloo/webhook");
        assert_eq!(r.authorization.as_deref(), Some(want_auth.as_str()));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let v = r.json();
        let id = uuid::Uuid::parse_str(v["event_id"].as_str().unwrap()).unwrap();
        assert_eq!(id.get_version_num(), 4);
        assert!(ids.insert(id), "event ids are unique without duplicates");
        let mid = v["message_id"].as_str().unwrap();
        assert_eq!(mid.len(), 24);
        assert!(mid
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap()).unwrap();
        let data = &v["data"];
        let ty = v["event_type"].as_str().unwrap();
        match ty {
            "sms.queued" => {
                assert_eq!(data["total_recipients"], 3);
                assert!(data["total_messages"].as_u64().unwrap() >= 3);
                assert!(data["total_cost"].as_f64().unwrap() > 0.0);
                assert_eq!(data["currency"], "USD");
                assert!(data["scheduled_at"].is_null());
                continue;
            }
            "sms.processing" => assert!(data["carrier"].is_string()),
            "sms.sent" => assert_eq!(data["sent_at"], v["timestamp"]),
            "sms.delivered" => {
                assert_eq!(data["delivered_at"], v["timestamp"]);
                assert!(data["segments"].as_u64().unwrap() >= 1);
            }
            "sms.failed" => {
                assert_eq!(data["failed_at"], v["timestamp"]);
                assert!(data["error_code"].is_string());
                assert!(data["error_message"].is_string());
                assert!(data["retryable"].is_boolean());
            }
            other => panic!("unexpected event type {other}"),
        }
        let phone = data["recipient_phone"].as_str().unwrap();
        assert!(phone.starts_with("+243") && phone.len() == 13, "{phone}");
        per_recipient
            .entry((mid.to_owned(), phone.to_owned()))
            .or_default()
            .push(ty.to_owned());
    }
    // Every recipient got processing, then (maybe) sent, then exactly one terminal.
    let truth = &report.truth;
    assert_eq!(truth.recipients.len(), 15);
    for t in &truth.recipients {
        let types = &per_recipient[&(t.message_id.clone(), t.recipient.clone())];
        let terminal: Vec<_> = types
            .iter()
            .filter(|t| *t == "sms.delivered" || *t == "sms.failed")
            .collect();
        assert_eq!(terminal.len(), 1);
        let expect = match t.status {
            FinalStatus::Delivered => "sms.delivered",
            FinalStatus::Failed => "sms.failed",
        };
        assert_eq!(terminal[0], expect);
        assert!(types.contains(&"sms.processing".to_owned()));
        assert_eq!(types.contains(&"sms.sent".to_owned()), t.sent_at.is_some());
        assert_eq!(t.terminal_webhook, WebhookFate::Acked);
    }
    // The gateway's state ends at the truth.
    for t in &truth.recipients {
        let s = gateway.status(&t.message_id).unwrap();
        let r = s
            .recipients
            .iter()
            .find(|r| r.recipient_phone == t.recipient)
            .unwrap();
        assert_eq!(
            serde_json::to_value(r.status).unwrap(),
            serde_json::json!(t.status.as_str())
        );
    }
}

#[tokio::test]
async fn five_xx_is_retried_on_the_scaled_schedule_then_acked() {
    // Two 503s, then 204, for every event.
    let rx = Receiver::start(|r| {
        if r.nth < 2 {
            Reply::Status(503)
        } else {
            Reply::Status(204)
        }
    })
    .await;
    let cfg = lisoloo_cfg(&rx.url()); // time scale 0.001: 30 ms, 120 ms, 600 ms, 3.6 s
    let report = bounded(
        30,
        run_lisoloo(&cfg, &Gateway::new(), CancellationToken::new()),
    )
    .await
    .unwrap();
    let events = 4; // queued, processing, sent, delivered
    assert_eq!(report.totals.acked, events);
    assert_eq!(report.totals.retries, 2 * events);
    assert_eq!(report.totals.attempts, 3 * events);
    assert_eq!(
        report.totals.dropped_exhausted + report.totals.dropped_4xx,
        0
    );
    let mut by_id: HashMap<String, Vec<tokio::time::Instant>> = HashMap::new();
    for r in rx.received() {
        by_id.entry(event_id(&r)).or_default().push(r.at);
    }
    assert_eq!(by_id.len() as u64, events);
    for times in by_id.values() {
        assert_eq!(times.len(), 3);
        assert!(times[1] - times[0] >= Duration::from_millis(30));
        assert!(times[2] - times[1] >= Duration::from_millis(120));
    }
}

#[tokio::test]
async fn four_xx_drops_without_retry() {
    let rx = Receiver::start(|_| Reply::Status(401)).await;
    let cfg = lisoloo_cfg(&rx.url());
    let report = bounded(
        30,
        run_lisoloo(&cfg, &Gateway::new(), CancellationToken::new()),
    )
    .await
    .unwrap();
    assert_eq!(report.totals.dropped_4xx, 4);
    assert_eq!(report.totals.retries, 0);
    assert_eq!(report.totals.acked, 0);
    assert_eq!(rx.received().len(), 4, "each event is sent exactly once");
    assert_eq!(
        report.truth.recipients[0].terminal_webhook,
        WebhookFate::Dropped4xx
    );
}

#[tokio::test]
async fn persistent_5xx_exhausts_after_one_try_and_four_retries() {
    let rx = Receiver::start(|_| Reply::Status(500)).await;
    let mut cfg = lisoloo_cfg(&rx.url());
    cfg.delivery.time_scale = 0.0005; // 15 ms, 60 ms, 300 ms, 1.8 s
    let report = bounded(
        30,
        run_lisoloo(&cfg, &Gateway::new(), CancellationToken::new()),
    )
    .await
    .unwrap();
    assert_eq!(report.totals.dropped_exhausted, 4);
    assert_eq!(report.totals.attempts, 4 * 5);
    assert_eq!(report.totals.retries, 4 * 4);
    let mut by_id: HashMap<String, Vec<tokio::time::Instant>> = HashMap::new();
    for r in rx.received() {
        by_id.entry(event_id(&r)).or_default().push(r.at);
    }
    for times in by_id.values() {
        assert_eq!(times.len(), 5);
        assert!(times[4] - times[3] >= Duration::from_millis(1800));
    }
    assert_eq!(
        report.truth.recipients[0].terminal_webhook,
        WebhookFate::Exhausted
    );
}

#[tokio::test]
async fn no_answer_within_the_timeout_is_retried() {
    // First attempt of each event hangs past the timeout; the retry is answered.
    let rx = Receiver::start(|r| {
        if r.nth == 0 {
            Reply::Hang(Duration::from_secs(3))
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let mut cfg = lisoloo_cfg(&rx.url());
    cfg.delivery.request_timeout = Duration::from_millis(300);
    let report = bounded(
        30,
        run_lisoloo(&cfg, &Gateway::new(), CancellationToken::new()),
    )
    .await
    .unwrap();
    assert_eq!(report.totals.acked, 4);
    assert_eq!(report.totals.retries, 4);
    let mut count: HashMap<String, usize> = HashMap::new();
    for r in rx.received() {
        *count.entry(event_id(&r)).or_default() += 1;
    }
    assert!(count.values().all(|n| *n == 2), "{count:?}");
}

#[tokio::test]
async fn duplicates_resend_the_same_event() {
    let rx = Receiver::start(|_| Reply::Status(200)).await;
    let mut cfg = lisoloo_cfg(&rx.url());
    cfg.messages = 3;
    cfg.recipients = 2;
    cfg.delivery.duplicate_rate = 1.0;
    cfg.delivery.reorder_window = 4;
    let report = bounded(
        30,
        run_lisoloo(&cfg, &Gateway::new(), CancellationToken::new()),
    )
    .await
    .unwrap();
    let got = rx.received();
    let events = report.totals.sent - report.totals.duplicates;
    assert_eq!(report.totals.duplicates, events);
    assert_eq!(got.len() as u64, 2 * events);
    let mut bodies: HashMap<String, Vec<axum::body::Bytes>> = HashMap::new();
    for r in &got {
        bodies.entry(event_id(r)).or_default().push(r.body.clone());
    }
    assert_eq!(bodies.len() as u64, events);
    for copies in bodies.values() {
        assert_eq!(copies.len(), 2, "each event id arrives twice");
        assert_eq!(copies[0], copies[1], "a duplicate is the same bytes");
    }
}

#[tokio::test]
async fn withheld_terminal_events_are_never_sent_but_the_gateway_knows() {
    let rx = Receiver::start(|_| Reply::Status(204)).await;
    let mut cfg = lisoloo_cfg(&rx.url());
    cfg.messages = 2;
    cfg.recipients = 2;
    cfg.delivery.withhold_terminal_rate = 1.0;
    let gateway = Gateway::new();
    let report = bounded(30, run_lisoloo(&cfg, &gateway, CancellationToken::new()))
        .await
        .unwrap();
    assert!(rx.received().iter().all(|r| {
        let ty = r.json()["event_type"].as_str().unwrap().to_owned();
        ty != "sms.delivered" && ty != "sms.failed"
    }));
    assert_eq!(report.by_type["sms.delivered"].withheld, 4);
    for t in &report.truth.recipients {
        assert_eq!(t.terminal_webhook, WebhookFate::Withheld);
        let s = gateway.status(&t.message_id).unwrap();
        assert_eq!(s.status, "delivered");
    }
}

#[tokio::test]
async fn cancel_stops_a_run_promptly() {
    let rx = Receiver::start(|_| Reply::Status(500)).await;
    let mut cfg = lisoloo_cfg(&rx.url());
    cfg.delivery.time_scale = 1.0; // retries would take over an hour
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.cancel();
    });
    let report = bounded(10, run_lisoloo(&cfg, &Gateway::new(), cancel))
        .await
        .unwrap();
    assert!(report.cancelled);
    assert_eq!(report.totals.acked, 0);
}
