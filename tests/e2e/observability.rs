//! Observability that is tested, not only written: the alert rules pass
//! `promtool check rules` and `promtool test rules` (a unit test per alert),
//! the dashboard is valid JSON, and every metric the dashboard and the rules
//! name is in a real scrape of the three services after traffic: a send with
//! withheld terminal events (so the reconciler reads under its budget) and
//! one event for the DLQ.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use dlrflow_e2e::{
    delivery, status_server, timed, workspace_root, Options, Pipeline, PASSWORD, USERNAME,
};
use dlrflow_sim::{run_lisoloo, Gateway, LisolooConfig};
use dlrflow_testkit::{metric_sum, scrape, wait_for};
use tokio_util::sync::CancellationToken;

fn observability() -> PathBuf {
    workspace_root().join("deploy/observability")
}

/// Every `dlrflow_…` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("dlrflow_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The metric names of a scrape (`name{labels} value` and `name value` lines).
fn scraped_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let out = std::process::Command::new("bash")
        .arg(observability().join("check.sh"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running deploy/observability/check.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS: 9 rules found"), "{text}");
    // One unit test group per alert.
    let rules = std::fs::read_to_string(observability().join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(observability().join("alerts.test.yml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test in alerts.test.yml"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_the_alerts_is_in_a_real_scrape() {
    let _t = timed("every_metric_of_the_dashboard_and_the_alerts_is_in_a_real_scrape");
    let dashboard = std::fs::read_to_string(observability().join("dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard.json");
    assert!(!parsed["panels"].as_array().unwrap().is_empty());
    let rules = std::fs::read_to_string(observability().join("alerts.yml")).unwrap();
    let mut wanted = metric_names(&dashboard);
    wanted.extend(metric_names(&rules));

    let gateway = Gateway::new();
    let server = status_server(&gateway).await;
    let mut p = Pipeline::new("observability", &Options::default())
        .await
        .unwrap();
    p.start_all(&server, 3).await;
    let cfg = LisolooConfig {
        delivery: dlrflow_sim::DeliveryConfig {
            withhold_terminal_rate: 0.3,
            ..delivery(&p.ingest_url(), "lisoloo")
        },
        messages: 20,
        recipients: 2,
        send_rate: 20.0,
        failure_rate: 0.1,
        carriers: Vec::new(),
        seed: 12,
    };
    let report = run_lisoloo(&cfg, &gateway, CancellationToken::new())
        .await
        .unwrap();
    assert!(report.totals.withheld > 0, "the send withholds some events");
    // An event type nobody knows: accepted (2xx), then the DLQ.
    let unknown = serde_json::json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": "sms.teleported",
        "timestamp": "2026-05-27T10:00:05.000Z",
        "message_id": "observability-dlq",
        "data": {},
    });
    let r = reqwest::Client::new()
        .post(format!("{}/lisoloo/webhook", p.ingest_url()))
        .basic_auth(USERNAME, Some(PASSWORD))
        .body(unknown.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    // The reconciler has read (the budget is measured), the DLQ record is
    // counted, and the lag has been looked at (every 5 s).
    let admin = |name: &str| p.admin_url(name);
    let settled = wait_for(Duration::from_secs(90), || async {
        let state = scrape(&admin("state-0")).await;
        let reconcile = scrape(&admin("reconcile")).await;
        (metric_sum(&state, "dlrflow_state_dlq_total") >= 1.0
            && state.contains("dlrflow_state_freshness_seconds")
            && reconcile.contains("dlrflow_reconcile_budget_left")
            && metric_sum(&reconcile, "dlrflow_reconcile_reads_total") >= 1.0)
            .then_some(())
    })
    .await;
    let mut scraped = BTreeSet::new();
    let mut texts = Vec::new();
    for name in ["ingest", "state-0", "reconcile"] {
        let text = scrape(&admin(name)).await;
        scraped.extend(scraped_names(&text));
        texts.push(format!("--- {name}\n{text}"));
    }
    let missing: Vec<&String> = wanted.difference(&scraped).collect();
    assert!(
        settled.is_some() && missing.is_empty(),
        "not in any scrape: {missing:?} (settled: {})\n{}",
        settled.is_some(),
        texts.join("\n")
    );
    // Readiness is in the scrape, and every service is ready.
    for text in &texts {
        assert!(text.contains("dlrflow_ready 1"), "{text}");
    }
    eprintln!(
        "observability e2e: {} metric names of the dashboard and the alerts, all in the scrapes",
        wanted.len()
    );
    p.finish().await;
    server.shutdown().await;
}
