//! Carrier and error analytics end to end: a simulated Lisoloo send with a
//! known carrier mix (weights, failure rates and error codes per carrier),
//! duplicates, reordering and 3 % of terminal events withheld (only the
//! status API can settle those), through the ingest, two state replicas and
//! the reconciler. Every figure of `GET /v1/analytics/carriers` (and of
//! `dlrflow-state carriers --json`) equals the one computed here from the
//! simulator's ground truth; the rollup survives `rebuild --compare-with`,
//! and a tampered rollup row is a difference.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dlrflow_e2e::{
    delivery, status_server, timed, verify_all, Options, Pipeline, ReconcileOptions, READ_KEY,
};
use dlrflow_sim::{
    run_lisoloo, CarrierProfile, FinalStatus, Gateway, LisolooConfig, TruthRecipient, WebhookFate,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn profile(name: &str, weight: u32, failure_rate: f64, codes: &[&str]) -> CarrierProfile {
    CarrierProfile {
        name: name.into(),
        weight,
        failure_rate,
        error_codes: codes.iter().map(|c| (*c).to_owned()).collect(),
    }
}

/// The documented histogram bin: 0 under 1 ms, else floor(4 log2 ms) + 1,
/// at most 127.
fn bin(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    let ms = (to - from).num_milliseconds();
    if ms < 1 {
        return 0;
    }
    ((4.0 * (ms as f64).log2()).floor() as i64 + 1).min(127)
}

/// Nearest-rank percentile of the bins, reported as the bin's upper edge
/// ceil(2^(bin/4)) ms.
fn percentile(bins: &[i64], q: f64) -> Value {
    if bins.is_empty() {
        return Value::Null;
    }
    let mut b = bins.to_vec();
    b.sort_unstable();
    let rank = ((q * b.len() as f64).ceil() as usize).clamp(1, b.len());
    let k = b[rank - 1].min(126);
    json!(2f64.powf(k as f64 / 4.0).ceil() as u64)
}

fn latency(bins: &[i64]) -> Value {
    json!({"count": bins.len(), "p50_ms": percentile(bins, 0.5), "p95_ms": percentile(bins, 0.95)})
}

fn top(counts: &BTreeMap<String, u64>) -> Value {
    let mut v: Vec<(&String, &u64)> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    Value::Array(
        v.into_iter()
            .take(10)
            .map(|(n, c)| json!({"name": n, "count": c}))
            .collect(),
    )
}

/// The figures of a group of recipients, as the API spells them.
fn stats(rs: &[&TruthRecipient]) -> serde_json::Map<String, Value> {
    let delivered = rs
        .iter()
        .filter(|r| r.status == FinalStatus::Delivered)
        .count() as u64;
    let failed = rs.len() as u64 - delivered;
    let terminal = delivered + failed;
    // Only the status API: the terminal webhook never reached dlrflow.
    let api_only = rs
        .iter()
        .filter(|r| r.terminal_webhook != WebhookFate::Acked)
        .count() as u64;
    let share = |n: u64| (terminal > 0).then(|| n as f64 / terminal as f64);
    let s2d: Vec<i64> = rs
        .iter()
        .filter_map(|r| Some(bin(r.sent_at?, r.delivered_at?)))
        .collect();
    let q2t: Vec<i64> = rs
        .iter()
        .filter_map(|r| Some(bin(r.queued_at?, r.terminal_at()?)))
        .collect();
    let v = json!({
        "recipients": rs.len(),
        "delivered": delivered,
        "failed": failed,
        "pending": 0,
        "delivery_rate": share(delivered),
        "status_api_only": api_only,
        "status_api_only_share": share(api_only),
        "sent_to_delivered": latency(&s2d),
        "queued_to_terminal": latency(&q2t),
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// The report the truth says the API must give (carriers, error codes).
fn expected(truth: &[TruthRecipient]) -> (Value, Value) {
    let mut by_carrier: BTreeMap<String, Vec<&TruthRecipient>> = BTreeMap::new();
    let mut by_code: BTreeMap<String, Vec<&TruthRecipient>> = BTreeMap::new();
    for r in truth {
        by_carrier
            .entry(
                r.carrier
                    .clone()
                    .expect("the simulator names every carrier"),
            )
            .or_default()
            .push(r);
        if r.status == FinalStatus::Failed {
            by_code
                .entry(r.error_code.clone().expect("every failure has a code"))
                .or_default()
                .push(r);
        }
    }
    let mut carriers: Vec<(u64, String, Value)> = by_carrier
        .iter()
        .map(|(name, rs)| {
            let mut codes: BTreeMap<String, u64> = BTreeMap::new();
            for r in rs.iter().filter(|r| r.status == FinalStatus::Failed) {
                *codes.entry(r.error_code.clone().unwrap()).or_default() += 1;
            }
            let mut m = stats(rs);
            m.insert("carrier".into(), json!(name));
            m.insert("top_error_codes".into(), top(&codes));
            (rs.len() as u64, name.clone(), Value::Object(m))
        })
        .collect();
    carriers.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut codes: Vec<(u64, String, Value)> = by_code
        .iter()
        .map(|(code, rs)| {
            let mut cs: BTreeMap<String, u64> = BTreeMap::new();
            for r in rs {
                *cs.entry(r.carrier.clone().unwrap()).or_default() += 1;
            }
            let mut m = stats(rs);
            m.insert("error_code".into(), json!(code));
            m.insert("top_carriers".into(), top(&cs));
            (rs.len() as u64, code.clone(), Value::Object(m))
        })
        .collect();
    codes.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    // Through JSON text and back, as the answer comes: serde_json's parser
    // may land one ulp off a float, the same way on both sides.
    let roundtrip = |v: Value| -> Value { serde_json::from_str(&v.to_string()).unwrap() };
    (
        roundtrip(Value::Array(carriers.into_iter().map(|c| c.2).collect())),
        roundtrip(Value::Array(codes.into_iter().map(|c| c.2).collect())),
    )
}

async fn get(url: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.expect("the read API answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carrier_report_equals_the_simulators_truth() {
    let _t = timed("carrier_report_equals_the_simulators_truth");
    let gateway = Gateway::new();
    let server = status_server(&gateway).await;
    let mut p = Pipeline::new("carriers", &Options::default())
        .await
        .unwrap();
    p.start_ingest().await.unwrap();
    // Two replicas: the raw and the status topic's records of one message
    // may be written by different replicas at once.
    p.start_state(2).await.unwrap();
    p.start_reconcile(&ReconcileOptions {
        status_api: server.base_url(),
        sources: vec!["lisoloo".into()],
        deadline_secs: 5,
        sweep_interval_ms: 500,
    })
    .await
    .unwrap();

    let cfg = LisolooConfig {
        delivery: dlrflow_sim::DeliveryConfig {
            reorder_window: 64,
            duplicate_rate: 0.02,
            withhold_terminal_rate: 0.03,
            ..delivery(&p.ingest_url(), "lisoloo")
        },
        messages: 300,
        recipients: 3,
        send_rate: 30.0,
        failure_rate: 0.0,
        carriers: vec![
            profile("vodacom_drc", 5, 0.05, &["1502", "1503"]),
            profile("airtel_drc", 3, 0.2, &["1501", "1510", "1502"]),
            profile("orange_drc", 2, 0.4, &["1504", "1505"]),
        ],
        seed: 1414,
    };
    let report = run_lisoloo(&cfg, &gateway, CancellationToken::new())
        .await
        .unwrap();
    eprintln!("{}", report.table());
    assert_eq!(report.totals.dropped_exhausted, 0);
    assert_eq!(report.totals.dropped_4xx, 0);
    let truth = &report.truth.recipients;
    let withheld = truth
        .iter()
        .filter(|r| r.terminal_webhook == WebhookFate::Withheld)
        .count();
    assert!(withheld > 0, "the scenario withholds terminal events");
    verify_all(&report.truth, &p.api_url(0), Duration::from_secs(150)).await;

    let (want_carriers, want_codes) = expected(truth);
    eprintln!(
        "e2e: expected carriers {}",
        serde_json::to_string(&want_carriers).unwrap()
    );
    // The mix is what the test says it is: three carriers with different
    // failure rates, more than one error code.
    assert_eq!(want_carriers.as_array().unwrap().len(), 3);
    assert!(want_codes.as_array().unwrap().len() >= 4);
    let url = format!("{}/v1/analytics/carriers", p.api_url(1));
    // Late webhooks (a terminal the status API set first) may still be
    // on their way when the statuses all match: wait for the figures.
    let started = Instant::now();
    let answer = loop {
        let (status, body) = get(&url, Some(READ_KEY)).await;
        assert_eq!(status, 200, "{body}");
        if body["carriers"] == want_carriers && body["error_codes"] == want_codes {
            break body;
        }
        if started.elapsed() > Duration::from_secs(60) {
            panic!(
                "the report differs from the truth:\n got carriers {}\nwant carriers {}\n got codes {}\nwant codes {}",
                body["carriers"], want_carriers, body["error_codes"], want_codes
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("e2e: the report equals the truth: {answer}");

    // from / to filter on the basis hour (the message's queued time).
    let hour = |t: DateTime<Utc>| {
        DateTime::from_timestamp(t.timestamp() - t.timestamp().rem_euclid(3600), 0).unwrap()
    };
    let queued: Vec<DateTime<Utc>> = truth.iter().filter_map(|r| r.queued_at).collect();
    let from = hour(*queued.iter().min().unwrap());
    let to = hour(*queued.iter().max().unwrap()) + chrono::Duration::hours(1);
    let fmt = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (status, body) = get(
        &format!("{url}?source=lisoloo&from={}&to={}", fmt(from), fmt(to)),
        Some(READ_KEY),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["carriers"], want_carriers);
    let (status, body) = get(&format!("{url}?to={}", fmt(from)), Some(READ_KEY)).await;
    assert_eq!((status, body["carriers"].clone()), (200, json!([])));
    let (status, body) = get(&format!("{url}?from=2026-05-27T10:30:00Z"), Some(READ_KEY)).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("whole hours"),
        "{body}"
    );
    let (status, _) = get(&url, None).await;
    assert_eq!(status, 401);

    // The CLI answers the same report.
    let (ok, out, err) = p.state_cli(&["carriers", "--json"]).await.unwrap();
    assert!(ok, "dlrflow-state carriers failed: {err}");
    let cli: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cli["carriers"], want_carriers);
    assert_eq!(cli["error_codes"], want_codes);
    let (ok, table, err) = p.state_cli(&["carriers"]).await.unwrap();
    assert!(
        ok && table.contains("vodacom_drc") && table.contains("1505"),
        "{table}{err}"
    );
    eprintln!("{table}");

    // The rollup is a function of the log: a rebuild gives the same rows,
    // and a tampered one is a difference.
    let (ok, out) = p.rebuild("rebuilt").await.unwrap();
    assert!(ok, "rebuild differs from the live state:\n{out}");
    let pool = p.pool().await.unwrap();
    sqlx::query(
        "UPDATE carrier_rollup SET n = n + 1 WHERE (source, hour, carrier, error_code, metric, bin) = \
         (SELECT source, hour, carrier, error_code, metric, bin FROM carrier_rollup WHERE metric = 'failed' LIMIT 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (ok, out) = p.rebuild("rebuilt2").await.unwrap();
    assert!(!ok, "a tampered rollup row must be a difference:\n{out}");
    assert!(
        out.contains("carrier_rollup") && out.contains(r#""differences":1"#),
        "{out}"
    );
    pool.close().await;
    p.finish().await;
    server.shutdown().await;
}
