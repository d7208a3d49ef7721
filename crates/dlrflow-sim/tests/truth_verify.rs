//! Ground truth contents and the verifier against a fake read API.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::{bounded, lisoloo_cfg, Receiver, Reply};
use dlrflow_sim::{
    run_lisoloo, verify, verify_with, FinalStatus, Gateway, LisolooPlan, Truth, Verdict,
    VerifyOptions,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dlrflow-sim-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[tokio::test]
async fn truth_file_holds_every_recipients_final_state() {
    let rx = Receiver::start(|_| Reply::Status(204)).await;
    let mut cfg = lisoloo_cfg(&rx.url());
    cfg.messages = 10;
    cfg.recipients = 3;
    cfg.failure_rate = 0.5;
    let report = bounded(
        30,
        run_lisoloo(&cfg, &Gateway::new(), CancellationToken::new()),
    )
    .await
    .unwrap();
    let path = temp_path("truth.json");
    report.truth.write_json(&path).unwrap();
    let back = Truth::read_json(&path).unwrap();
    assert_eq!(back, report.truth);
    let raw: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(raw["provider"], "lisoloo");
    assert_eq!(raw["seed"], 7);
    let first = &raw["recipients"][0];
    for field in [
        "message_id",
        "recipient",
        "status",
        "sent_at",
        "delivered_at",
        "failed_at",
        "error_code",
        "carrier",
        "segments",
        "source",
        "provider",
        "terminal_webhook",
    ] {
        assert!(first.get(field).is_some(), "truth has {field}");
    }
    assert_eq!(back.recipients.len(), 30);
    assert_eq!(back.message_count(), 10);
    let failed = back
        .recipients
        .iter()
        .filter(|r| r.status == FinalStatus::Failed)
        .count();
    assert!(failed > 0 && failed < 30, "{failed}");
    for r in &back.recipients {
        assert_eq!(r.source, "lisoloo");
        match r.status {
            FinalStatus::Delivered => {
                assert!(
                    r.delivered_at.is_some() && r.failed_at.is_none() && r.error_code.is_none()
                );
                assert!(r.sent_at.unwrap() <= r.delivered_at.unwrap());
            }
            FinalStatus::Failed => {
                assert!(r.failed_at.is_some() && r.delivered_at.is_none());
                assert!(r.error_code.is_some() && r.error_message.is_some());
            }
        }
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn plans_are_deterministic_for_a_seed() {
    let cfg = lisoloo_cfg("http://127.0.0.1:9");
    let base = chrono::Utc::now();
    let a = LisolooPlan::new(&cfg, base);
    let b = LisolooPlan::new(&cfg, base);
    assert_eq!(a.truth(), b.truth());
    let mut other = cfg.clone();
    other.seed = 8;
    assert_ne!(
        LisolooPlan::new(&other, base).truth().recipients,
        a.truth().recipients
    );
}

/// A fake dlrflow read API serving whatever the test put in `messages`.
#[derive(Clone, Default)]
struct FakeApi {
    messages: Arc<Mutex<HashMap<String, Value>>>,
}

async fn get_message(State(api): State<FakeApi>, Path(id): Path<String>) -> Response {
    match api.messages.lock().unwrap().get(&id) {
        Some(v) => Json(v.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn start_api(api: FakeApi) -> String {
    let app = Router::new()
        .route("/v1/messages/{id}", get(get_message))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// What a correct dlrflow would answer for `truth`.
fn correct_answers(truth: &Truth) -> HashMap<String, Value> {
    truth
        .by_message()
        .into_iter()
        .map(|(id, rs)| {
            let recipients: Vec<Value> = rs
                .iter()
                .map(|r| {
                    json!({
                        "recipient": r.recipient,
                        "status": r.status.as_str(),
                        "sent_at": r.sent_at,
                        "delivered_at": r.delivered_at,
                        "failed_at": r.failed_at,
                        // Numbers are accepted as well as strings.
                        "error_code": r.error_code.as_ref().map(|c| c.parse::<u32>().unwrap()),
                    })
                })
                .collect();
            (
                id.to_owned(),
                json!({"message_id": id, "recipients": recipients}),
            )
        })
        .collect()
}

fn sample_truth(failure_rate: f64) -> Truth {
    let mut cfg = lisoloo_cfg("http://127.0.0.1:9");
    cfg.messages = 6;
    cfg.recipients = 2;
    cfg.failure_rate = failure_rate;
    LisolooPlan::new(&cfg, chrono::Utc::now()).truth()
}

#[tokio::test]
async fn verify_passes_when_everything_matches() {
    let truth = sample_truth(0.5);
    let api = FakeApi::default();
    *api.messages.lock().unwrap() = correct_answers(&truth);
    let base = start_api(api).await;
    let report = bounded(20, verify(&truth, &base)).await.unwrap();
    assert!(report.is_ok(), "{}", report.table(20));
    assert_eq!(report.matching(), 12);
    assert_eq!(report.wrong() + report.missing(), 0);
}

#[tokio::test]
async fn verify_detects_wrong_and_missing() {
    let truth = sample_truth(0.5);
    let mut answers = correct_answers(&truth);
    let ids: Vec<String> = truth.by_message().keys().map(|s| s.to_string()).collect();
    // Message 0: gone entirely (2 missing).
    answers.remove(&ids[0]);
    // Message 1: one recipient missing.
    answers.get_mut(&ids[1]).unwrap()["recipients"]
        .as_array_mut()
        .unwrap()
        .remove(0);
    // Message 2: first recipient's status flipped.
    {
        let r = &mut answers.get_mut(&ids[2]).unwrap()["recipients"][0];
        let flipped = if r["status"] == "delivered" {
            "failed"
        } else {
            "delivered"
        };
        r["status"] = json!(flipped);
    }
    // Message 3: first recipient stuck at "sent".
    answers.get_mut(&ids[3]).unwrap()["recipients"][0]["status"] = json!("sent");
    // Message 4: first recipient has the right status but a shifted timestamp.
    {
        let r = &mut answers.get_mut(&ids[4]).unwrap()["recipients"][0];
        for f in ["delivered_at", "failed_at"] {
            if r[f].is_string() {
                r[f] = json!("2001-01-01T00:00:00Z");
            }
        }
    }
    let api = FakeApi::default();
    *api.messages.lock().unwrap() = answers;
    let base = start_api(api).await;
    let report = bounded(20, verify(&truth, &base)).await.unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.missing(), 3, "{}", report.table(20));
    assert_eq!(report.wrong(), 3, "{}", report.table(20));
    assert_eq!(report.matching(), 6);
    let by = report.counts_by_status();
    assert_eq!(
        by.values()
            .map(|c| c.matching + c.wrong + c.missing)
            .sum::<usize>(),
        12
    );
    let table = report.table(20);
    assert!(
        table.contains("MISSING") && table.contains("WRONG"),
        "{table}"
    );
    assert!(report
        .checks
        .iter()
        .any(|c| matches!(&c.verdict, Verdict::Wrong(d) if d.iter().any(|l| l.contains("2001")))));
}

#[tokio::test]
async fn verify_detects_a_wrong_error_code() {
    let truth = sample_truth(1.0);
    let mut answers = correct_answers(&truth);
    let id = truth.recipients[0].message_id.clone();
    answers.get_mut(&id).unwrap()["recipients"][0]["error_code"] = json!("9999");
    let api = FakeApi::default();
    *api.messages.lock().unwrap() = answers;
    let base = start_api(api).await;
    let report = bounded(20, verify(&truth, &base)).await.unwrap();
    assert_eq!(report.wrong(), 1);
}

#[tokio::test]
async fn verify_waits_for_late_state() {
    let truth = sample_truth(0.3);
    let answers = correct_answers(&truth);
    let api = FakeApi::default();
    let base = start_api(api.clone()).await;
    // Half the messages now, the rest after a while.
    let ids: Vec<String> = answers.keys().cloned().collect();
    for id in &ids[..3] {
        api.messages
            .lock()
            .unwrap()
            .insert(id.clone(), answers[id].clone());
    }
    let late = api.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        late.messages.lock().unwrap().extend(answers);
    });
    let opts = VerifyOptions {
        wait: Duration::from_secs(10),
        poll_interval: Duration::from_millis(100),
        ..VerifyOptions::default()
    };
    let report = bounded(20, verify_with(&truth, &base, &opts))
        .await
        .unwrap();
    assert!(report.is_ok(), "{}", report.table(20));
    assert!(report.passes > 1);
    // Without waiting, the same situation is reported as missing.
    let api2 = FakeApi::default();
    let base2 = start_api(api2).await;
    let report = bounded(20, verify(&truth, &base2)).await.unwrap();
    assert_eq!(report.missing(), 12);
    assert_eq!(report.passes, 1);
}

#[tokio::test]
async fn verify_reports_an_unreachable_api_as_missing() {
    let truth = sample_truth(0.0);
    let report = bounded(20, verify(&truth, "http://127.0.0.1:9"))
        .await
        .unwrap();
    assert_eq!(report.missing(), 12);
    assert!(!report.is_ok());
}
