//! Many replicas on one machine: 3 ingest replicas behind a round-robin
//! balancer, 3 state replicas in one group, 2 reconcilers sharing one
//! budget; a send of 10,000 messages × 5 recipients with duplicates,
//! reordering and withheld terminal events; one state replica and one
//! ingest replica SIGKILLed mid-send. Every recipient matches the truth,
//! the gateway's budget holds, the analytics stream is clean, and the state
//! rebuilt from the log equals the live one.
//!
//! Heavy (about 10 minutes on 2 cores), so it is not in the default run:
//!
//!     deploy/local/test.sh --run-ignored only -E 'test(many_replicas)'
//!
//! `DLRFLOW_E2E_SCALE_MESSAGES` changes the number of messages.

use std::time::{Duration, Instant};

use dlrflow_e2e::{
    delivery, max_reads_in_window, reads_not_needed, status_server, timed, verify_all, Options,
    Pipeline, ReconcileOptions, RoundRobin,
};
use dlrflow_sim::{run_lisoloo, Gateway, LisolooConfig};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavy: deploy/local/test.sh --run-ignored only -E 'test(many_replicas)'"]
async fn many_replicas_share_the_work_and_survive_kills() {
    let _t = timed("many_replicas_share_the_work_and_survive_kills");
    let messages: usize = std::env::var("DLRFLOW_E2E_SCALE_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let gateway = Gateway::new();
    let server = status_server(&gateway).await;
    let mut p = Pipeline::new("scale", &Options::default()).await.unwrap();
    let ingests = ["ingest-0", "ingest-1", "ingest-2"];
    for name in ingests {
        p.start_ingest_named(name).await.unwrap();
    }
    p.start_state(3).await.unwrap();
    for name in ["reconcile-0", "reconcile-1"] {
        p.start_reconcile_named(
            name,
            &ReconcileOptions {
                status_api: server.base_url(),
                sources: vec!["lisoloo".into()],
                deadline_secs: 5,
                sweep_interval_ms: 500,
            },
        )
        .await
        .unwrap();
    }
    let balancer = RoundRobin::start(
        ingests
            .iter()
            .map(|n| p.url_of(n).trim_start_matches("http://").to_owned())
            .collect(),
    )
    .await
    .unwrap();

    let cfg = LisolooConfig {
        delivery: dlrflow_sim::DeliveryConfig {
            reorder_window: 64,
            duplicate_rate: 0.05,
            withhold_terminal_rate: 0.005,
            concurrency: 64,
            ..delivery(&balancer.url(), "lisoloo")
        },
        messages,
        recipients: 5,
        send_rate: 200.0,
        failure_rate: 0.1,
        carriers: Vec::new(),
        seed: 15,
    };
    let started = Instant::now();
    let send = tokio::spawn(async move {
        run_lisoloo(&cfg, &gateway, CancellationToken::new())
            .await
            .unwrap()
    });
    // Mid-send: one state replica and one ingest replica die. The state
    // replica comes back (static membership: Tansu hands its partitions back
    // to the same instance id); the ingest replica stays dead, and the
    // balancer sends its connections elsewhere.
    let at = p
        .wait_applied((messages as i64) * 4, Duration::from_secs(300))
        .await
        .unwrap();
    p.kill9("state-1");
    p.kill9("ingest-1");
    eprintln!("e2e: state-1 and ingest-1 killed at {at} applied events");
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.restart("state-1").await.unwrap();

    let report = send.await.unwrap();
    let send_secs = started.elapsed().as_secs_f64();
    eprintln!("{}", report.table());
    assert_eq!(report.totals.dropped_4xx, 0, "the ingest refused an event");
    assert_eq!(
        report.totals.dropped_exhausted, 0,
        "an event was lost after every retry"
    );
    let verify = verify_all(&report.truth, &p.api_url(0), Duration::from_secs(420)).await;
    let total = started.elapsed().as_secs_f64();
    let reads = server.reads();
    let max = max_reads_in_window(&reads, Duration::from_secs(60));
    let throttled = reads.iter().filter(|r| r.status == 429).count();
    eprintln!(
        "e2e: {messages} messages × 5 recipients: send {send_secs:.0} s, all verified after {total:.0} s; \
         {} webhook requests ({:.0}/s over the send); status reads {} (max {max} in 60 s, {throttled} × 429); verify {:?}",
        report.totals.attempts,
        report.totals.attempts as f64 / send_secs,
        reads.len(),
        verify.counts(),
    );
    // What the reads were for: messages with a withheld terminal report
    // (needed), reads whose every terminal report was in Kafka a second
    // before (the answer was waiting there: the horizon let them through),
    // and the rest (a terminal report not yet received by the ingest at the
    // read: the gateway's delivery was later than the deadline).
    let withheld: std::collections::BTreeSet<&str> = report
        .truth
        .recipients
        .iter()
        .filter(|r| r.terminal_webhook == dlrflow_sim::WebhookFate::Withheld)
        .map(|r| r.message_id.as_str())
        .collect();
    let ok_reads: Vec<_> = reads.iter().filter(|r| r.status == 200).collect();
    let of_withheld = ok_reads
        .iter()
        .filter(|r| withheld.contains(r.message_id.as_str()))
        .count();
    let received = p.terminal_received(Duration::from_secs(20)).await.unwrap();
    let waiting_in_kafka =
        reads_not_needed(&reads, &report.truth, &received, Duration::from_secs(1));
    eprintln!(
        "e2e: reads by cause: {} of 200, {of_withheld} of the {} messages with a withheld terminal report, \
         {} whose every terminal report was in Kafka ≥ 1 s before, {} with a report not yet received",
        ok_reads.len(),
        withheld.len(),
        waiting_in_kafka.len(),
        ok_reads.len().saturating_sub(of_withheld + waiting_in_kafka.len()),
    );
    // For the last kind: how long after the read the message's last
    // terminal report reached the ingest.
    let mut late = [0usize; 4];
    for r in ok_reads
        .iter()
        .filter(|r| !withheld.contains(r.message_id.as_str()))
    {
        let last = report
            .truth
            .recipients
            .iter()
            .filter(|t| t.message_id == r.message_id)
            .filter_map(|t| received.get(&(t.message_id.clone(), t.recipient.clone())))
            .max();
        let Some(after) = last.map(|at| (*at - r.at).num_milliseconds()) else {
            continue;
        };
        if after < 0 {
            continue;
        }
        late[match after {
            0..1_000 => 0,
            1_000..5_000 => 1,
            5_000..30_000 => 2,
            _ => 3,
        }] += 1;
    }
    eprintln!(
        "e2e: last terminal report received after the read: <1 s {}, 1-5 s {}, 5-30 s {}, ≥30 s {}",
        late[0], late[1], late[2], late[3]
    );
    assert!(
        max <= 120,
        "{max} reads within 60 s: over the gateway's budget"
    );
    assert_eq!(throttled, 0, "the reconcilers never hit the gateway's 429");
    p.assert_log_is_the_truth().await;
    drop(balancer);
    p.finish().await;
    server.shutdown().await;
}
