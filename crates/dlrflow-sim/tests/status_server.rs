//! The gateway's GET /status server: auth, 404, the sliding-window limit,
//! the read log, and state that follows the sender.

mod common;

use std::time::Duration;

use common::{bounded, lisoloo_cfg, Receiver, Reply};
use dlrflow_sim::{
    run_lisoloo, Gateway, LisolooPlan, ReadRecord, StatusServer, StatusServerConfig,
};
use tokio_util::sync::CancellationToken;

fn server_cfg() -> StatusServerConfig {
    StatusServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        api_keys: vec!["key-a".to_owned(), "key-b".to_owned()],
        ..StatusServerConfig::default()
    }
}

async fn get(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    key: Option<&str>,
) -> reqwest::Response {
    let mut req = client.get(format!("{base}/status/{id}"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn auth_and_unknown_ids() {
    let server = StatusServer::start(server_cfg(), Gateway::new())
        .await
        .unwrap();
    let base = server.base_url();
    let c = reqwest::Client::new();
    bounded(10, async {
        assert_eq!(
            get(&c, &base, "507f1f77bcf86cd799439011", None)
                .await
                .status(),
            401
        );
        assert_eq!(
            get(&c, &base, "507f1f77bcf86cd799439011", Some("wrong"))
                .await
                .status(),
            401
        );
        let basic = c
            .get(format!("{base}/status/x"))
            .basic_auth("key-a", Some(""))
            .send()
            .await
            .unwrap();
        assert_eq!(basic.status(), 401);
        assert_eq!(
            get(&c, &base, "507f1f77bcf86cd799439011", Some("key-a"))
                .await
                .status(),
            404
        );
    })
    .await;
    let reads = server.reads();
    let codes: Vec<u16> = reads.iter().map(|r| r.status).collect();
    assert_eq!(codes, vec![401, 401, 401, 404]);
    assert_eq!(reads[3].key_index, Some(0));
    assert_eq!(reads[3].message_id, "507f1f77bcf86cd799439011");
    server.shutdown().await;
}

#[tokio::test]
async fn the_121st_read_in_a_minute_gets_429_with_retry_after() {
    let dir = std::env::temp_dir().join(format!("dlrflow-sim-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let log_path = dir.join("reads.jsonl");
    let mut cfg = server_cfg();
    cfg.read_log = Some(log_path.clone());
    let server = StatusServer::start(cfg, Gateway::new()).await.unwrap();
    let base = server.base_url();
    let c = reqwest::Client::new();
    bounded(20, async {
        for i in 0..120 {
            let r = get(&c, &base, &format!("m{i}"), Some("key-a")).await;
            assert_eq!(r.status(), 404, "read {i} is within the budget");
        }
        let r = get(&c, &base, "m120", Some("key-a")).await;
        assert_eq!(r.status(), 429);
        let retry_after: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        // A refused read does not count, and other keys have their own budget.
        assert_eq!(get(&c, &base, "m121", Some("key-a")).await.status(), 429);
        assert_eq!(get(&c, &base, "m0", Some("key-b")).await.status(), 404);
        // The log is also served for tests.
        let served: Vec<ReadRecord> = c
            .get(format!("{base}/reads"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(served.len(), 123);
        assert_eq!(served.iter().filter(|r| r.status == 429).count(), 2);
    })
    .await;
    assert_eq!(server.reads().len(), 123);
    let lines: Vec<ReadRecord> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, server.reads());
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_window_slides() {
    let mut cfg = server_cfg();
    cfg.limit = 3;
    cfg.window = Duration::from_millis(400);
    let server = StatusServer::start(cfg, Gateway::new()).await.unwrap();
    let base = server.base_url();
    let c = reqwest::Client::new();
    bounded(10, async {
        for _ in 0..3 {
            assert_eq!(get(&c, &base, "m", Some("key-a")).await.status(), 404);
        }
        assert_eq!(get(&c, &base, "m", Some("key-a")).await.status(), 429);
        // Wait (with a deadline) until the window lets a read through again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let code = get(&c, &base, "m", Some("key-a")).await.status();
            if code == 404 {
                break;
            }
            assert_eq!(code, 429);
            assert!(tokio::time::Instant::now() < deadline, "window never slid");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn status_follows_the_gateway_not_the_webhooks() {
    // The receiver refuses everything: the gateway's state still advances.
    let rx = Receiver::start(|_| Reply::Status(400)).await;
    let mut cfg = lisoloo_cfg(&rx.url());
    cfg.messages = 4;
    cfg.recipients = 3;
    cfg.failure_rate = 0.4;
    let gateway = Gateway::new();
    let server = StatusServer::start(server_cfg(), gateway.clone())
        .await
        .unwrap();
    let report = bounded(30, run_lisoloo(&cfg, &gateway, CancellationToken::new()))
        .await
        .unwrap();
    let c = reqwest::Client::new();
    for (mid, recipients) in report.truth.by_message() {
        let body: serde_json::Value = bounded(10, async {
            let r = get(&c, &server.base_url(), mid, Some("key-b")).await;
            assert_eq!(r.status(), 200);
            r.json().await.unwrap()
        })
        .await;
        assert_eq!(body["message_id"], mid);
        assert_eq!(body["total_recipients"], 3);
        let delivered = recipients
            .iter()
            .filter(|t| t.delivered_at.is_some())
            .count();
        let want = match delivered {
            0 => "failed",
            3 => "delivered",
            _ => "partially_delivered",
        };
        assert_eq!(body["status"], want);
        for t in recipients {
            let r = body["recipients"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["recipient_phone"] == t.recipient.as_str())
                .unwrap();
            assert_eq!(r["status"], t.status.as_str());
            assert_eq!(r["carrier"], t.carrier.clone().unwrap().as_str());
            let at = |f: &str| {
                r[f].as_str()
                    .map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc())
            };
            assert_eq!(at("delivered_at"), t.delivered_at);
            assert_eq!(at("failed_at"), t.failed_at);
            assert_eq!(at("sent_at"), t.sent_at);
            assert_eq!(r["error_code"].as_str(), t.error_code.as_deref());
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_message_is_visible_from_sms_queued_on() {
    let gateway = Gateway::new();
    let mut cfg = lisoloo_cfg("http://127.0.0.1:9");
    cfg.delivery.time_scale = 1.0;
    let plan = LisolooPlan::new(&cfg, chrono::Utc::now());
    let id = plan.message_ids()[0].clone();
    assert!(gateway.status(&id).is_none());
    // Nothing listens on port 9: sends fail and are retried; the state advances anyway.
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let gateway = gateway.clone();
        let cancel = cancel.clone();
        async move { dlrflow_sim::run_lisoloo_plan(&cfg, plan, &gateway, cancel).await }
    });
    bounded(10, async {
        while gateway.status(&id).is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let s = gateway.status(&id).unwrap();
    // Processing follows 0.3–3 s later; a slow machine may already see it.
    assert!(
        s.status == "pending" || s.status == "processing",
        "{}",
        s.status
    );
    assert_eq!(s.total_recipients, 1);
    cancel.cancel();
    let report = bounded(10, run).await.unwrap().unwrap();
    assert!(report.cancelled);
}
