//! Events the gateway never delivers are found: 2 % of terminal events are
//! withheld, so only `dlrflow-reconcile` reading `GET /status` (the
//! simulator's real limit: 120 reads per sliding 60 s) can settle them.

use std::collections::BTreeSet;
use std::time::Duration;

use dlrflow_e2e::{
    delivery, max_reads_in_window, status_server, timed, verify_all, Options, Pipeline,
};
use dlrflow_sim::{run_lisoloo, Gateway, LisolooConfig, WebhookFate};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_terminal_events_are_recovered_within_the_read_budget() {
    let _t = timed("withheld_terminal_events_are_recovered_within_the_read_budget");
    let gateway = Gateway::new();
    let server = status_server(&gateway).await;

    let mut p = Pipeline::new("reconcile-withheld", &Options::default())
        .await
        .unwrap();
    p.start_all(&server, 5).await;

    let cfg = LisolooConfig {
        delivery: dlrflow_sim::DeliveryConfig {
            reorder_window: 64,
            duplicate_rate: 0.02,
            withhold_terminal_rate: 0.02,
            ..delivery(&p.ingest_url(), "lisoloo")
        },
        messages: 300,
        recipients: 3,
        send_rate: 30.0,
        failure_rate: 0.1,
        seed: 99,
    };
    let report = run_lisoloo(&cfg, &gateway, CancellationToken::new())
        .await
        .unwrap();
    eprintln!("{}", report.table());
    assert_eq!(report.totals.dropped_exhausted, 0);
    let withheld: BTreeSet<&str> = report
        .truth
        .recipients
        .iter()
        .filter(|r| r.terminal_webhook == WebhookFate::Withheld)
        .map(|r| r.message_id.as_str())
        .collect();
    eprintln!(
        "e2e: {} terminal events withheld across {} messages",
        report.totals.withheld,
        withheld.len()
    );
    assert!(
        !withheld.is_empty(),
        "the scenario withholds some terminal events"
    );
    assert!(withheld.len() <= 60, "small enough for the read budget");

    verify_all(&report.truth, &p.api_url(0), Duration::from_secs(150)).await;

    let reads = server.reads();
    let read_ids: BTreeSet<&str> = reads
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.message_id.as_str())
        .collect();
    let max = max_reads_in_window(&reads, Duration::from_secs(60));
    let throttled = reads.iter().filter(|r| r.status == 429).count();
    eprintln!(
        "e2e: status reads {} (200: {}, 429: {throttled}), distinct messages read {}, max in any 60 s window {max}",
        reads.len(),
        reads.iter().filter(|r| r.status == 200).count(),
        read_ids.len()
    );
    assert!(
        withheld.iter().all(|m| read_ids.contains(m)),
        "every message with a withheld terminal event was read"
    );
    assert!(
        max <= 120,
        "{max} reads within 60 s: over the gateway's budget"
    );
    assert_eq!(throttled, 0, "the reconciler never hit the gateway's 429");
    p.finish().await;
    server.shutdown().await;
}
