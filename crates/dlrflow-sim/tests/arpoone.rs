//! The Arpoone sender against a receiver inside the test.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{bounded, Receiver, Reply};
use dlrflow_sim::{run_arpoone, ArpooneConfig, DeliveryConfig, FinalStatus, Routing, WebhookFate};
use tokio_util::sync::CancellationToken;

fn cfg(target: &str) -> ArpooneConfig {
    ArpooneConfig {
        delivery: DeliveryConfig {
            target: target.to_owned(),
            source: "arpoone".to_owned(),
            basic_auth: Some(("arpoone".to_owned(), "pw".to_owned())),
            time_scale: 0.001,
            reorder_window: 4,
            duplicate_rate: 0.0,
            ..DeliveryConfig::default()
        },
        messages: 20,
        recipients: 2,
        send_rate: 0.0,
        failure_rate: 0.3,
        batch_max: 7,
        batch_linger: Duration::from_millis(20_000), // 20 ms scaled
        custom_payload: Some(r#"{"abc": "123"}"#.to_owned()),
        seed: 11,
        ..ArpooneConfig::default()
    }
}

#[tokio::test]
async fn per_status_batches_carry_the_documented_records() {
    let rx = Receiver::start(|_| Reply::Status(200)).await;
    let c = cfg(&rx.url());
    let report = bounded(30, run_arpoone(&c, CancellationToken::new()))
        .await
        .unwrap();
    let got = rx.received();
    assert_eq!(report.requests as usize, got.len());
    let mut finals: HashMap<(String, String), (String, String)> = HashMap::new();
    let mut records = 0;
    for r in &got {
        assert!(r.authorization.as_deref().unwrap().starts_with("Basic "));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let body = r.json();
        let arr = body.as_array().expect("an array");
        assert!(!arr.is_empty() && arr.len() <= 7);
        for rec in arr {
            records += 1;
            let status = rec["Status"].as_str().unwrap();
            let want_path = match status {
                "PENDING" => "/arpoone/webhook/pending",
                "DELIVERED" => "/arpoone/webhook/delivered",
                "NOT_DELIVERED" => "/arpoone/webhook/not_delivered",
                other => panic!("status {other}"),
            };
            assert_eq!(r.path, want_path);
            let mid = uuid::Uuid::parse_str(rec["MessageId"].as_str().unwrap()).unwrap();
            assert_eq!(mid.get_version_num(), 4);
            uuid::Uuid::parse_str(rec["OrganizationId"].as_str().unwrap()).unwrap();
            chrono::DateTime::parse_from_rfc3339(rec["ReportDateTime"].as_str().unwrap()).unwrap();
            assert!(rec["TotalSegments"].as_u64().unwrap() >= 1);
            assert!(rec["ReportDescription"].is_string());
            assert_eq!(rec["CustomPayload"], r#"{"abc": "123"}"#);
            assert!(rec["Msisdn"]
                .as_str()
                .unwrap()
                .chars()
                .all(|c| c.is_ascii_digit()));
            if status != "PENDING" {
                let key = (
                    rec["MessageId"].as_str().unwrap().to_owned(),
                    rec["Msisdn"].as_str().unwrap().to_owned(),
                );
                let prev = finals.insert(
                    key,
                    (
                        status.to_owned(),
                        rec["ReportDateTime"].as_str().unwrap().to_owned(),
                    ),
                );
                assert!(prev.is_none(), "one final record per recipient");
            }
        }
    }
    assert_eq!(report.totals.acked as usize, records);
    let truth = &report.truth;
    assert_eq!(truth.recipients.len(), 40);
    assert_eq!(finals.len(), 40);
    for t in &truth.recipients {
        let (status, at) = &finals[&(t.message_id.clone(), t.recipient.clone())];
        let want = match t.status {
            FinalStatus::Delivered => "DELIVERED",
            FinalStatus::Failed => "NOT_DELIVERED",
        };
        assert_eq!(status, want);
        let at = chrono::DateTime::parse_from_rfc3339(at).unwrap().to_utc();
        assert_eq!(Some(at), t.terminal_at());
        assert_eq!(t.terminal_webhook, WebhookFate::Acked);
    }
}

#[tokio::test]
async fn single_url_with_a_path_token_mixes_statuses() {
    let rx = Receiver::start(|_| Reply::Status(200)).await;
    let mut c = cfg(&rx.url());
    c.routing = Routing::Single;
    c.token = Some("tok123".to_owned());
    c.delivery.basic_auth = None;
    c.batch_max = 1000;
    c.batch_linger = Duration::from_secs(1000); // 1 s scaled: all records in few batches
    let report = bounded(30, run_arpoone(&c, CancellationToken::new()))
        .await
        .unwrap();
    let got = rx.received();
    assert!(got
        .iter()
        .all(|r| r.path == "/arpoone/webhook/tok123" && r.authorization.is_none()));
    let statuses: HashSet<String> = got
        .iter()
        .flat_map(|r| r.json().as_array().unwrap().clone())
        .map(|rec| rec["Status"].as_str().unwrap().to_owned())
        .collect();
    assert!(statuses.contains("PENDING") && statuses.contains("DELIVERED"));
    assert!(
        got.iter().any(|r| {
            let s: HashSet<_> = r
                .json()
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["Status"].clone())
                .collect();
            s.len() > 1
        }),
        "some batch mixes statuses"
    );
    assert_eq!(
        report.totals.dropped_4xx + report.totals.dropped_exhausted,
        0
    );
}

#[tokio::test]
async fn only_200_acknowledges() {
    // 204 is not 200: Arpoone retries it; the retry gets 200.
    let rx = Receiver::start(|r| {
        if r.nth == 0 {
            Reply::Status(204)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let mut c = cfg(&rx.url());
    c.messages = 3;
    let report = bounded(30, run_arpoone(&c, CancellationToken::new()))
        .await
        .unwrap();
    assert!(report.totals.retries > 0);
    assert_eq!(report.totals.acked, report.totals.sent);
    let mut count: HashMap<axum::body::Bytes, usize> = HashMap::new();
    for r in rx.received() {
        *count.entry(r.body).or_default() += 1;
    }
    assert!(count.values().all(|n| *n == 2));
}

#[tokio::test]
async fn four_xx_drops_a_batch() {
    let rx = Receiver::start(|_| Reply::Status(400)).await;
    let mut c = cfg(&rx.url());
    c.messages = 3;
    let report = bounded(30, run_arpoone(&c, CancellationToken::new()))
        .await
        .unwrap();
    assert_eq!(report.totals.retries, 0);
    assert_eq!(report.totals.dropped_4xx, report.totals.sent);
    assert_eq!(rx.received().len() as u64, report.requests);
    assert!(report
        .truth
        .recipients
        .iter()
        .all(|t| t.terminal_webhook == WebhookFate::Dropped4xx));
}
