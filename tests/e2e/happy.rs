//! The happy path at scale: every recipient's final state is exact despite
//! duplicates and full reordering, for both providers.

use std::time::Duration;

use dlrflow_e2e::{delivery, timed, verify_all, Options, Pipeline};
use dlrflow_sim::{run_arpoone, run_lisoloo, ArpooneConfig, Gateway, LisolooConfig, Routing};
use tokio_util::sync::CancellationToken;

/// 2,000 messages × 5 recipients (10,000 recipients, ~33,000 events), 5 %
/// sent twice, a reorder window of 2,000 events (every event of a message is
/// in the window at once: full reordering), two state replicas.
/// `DLRFLOW_E2E_HAPPY_MESSAGES=N` changes the number of messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lisoloo_at_scale_with_duplicates_and_full_reordering() {
    let _t = timed("lisoloo_at_scale_with_duplicates_and_full_reordering");
    let messages: usize = std::env::var("DLRFLOW_E2E_HAPPY_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut p = Pipeline::new("happy-lisoloo", &Options::default())
        .await
        .unwrap();
    p.start_ingest().await.unwrap();
    p.start_state(2).await.unwrap();

    let cfg = LisolooConfig {
        delivery: dlrflow_sim::DeliveryConfig {
            reorder_window: 2000,
            duplicate_rate: 0.05,
            concurrency: 16,
            ..delivery(&p.ingest_url(), "lisoloo")
        },
        messages,
        recipients: 5,
        send_rate: 0.0,
        failure_rate: 0.1,
        carriers: Vec::new(),
        seed: 20261123,
    };
    let report = run_lisoloo(&cfg, &Gateway::new(), CancellationToken::new())
        .await
        .unwrap();
    eprintln!("{}", report.table());
    assert_eq!(report.totals.dropped_4xx, 0, "the ingest refused an event");
    assert_eq!(
        report.totals.dropped_exhausted, 0,
        "an event was never acknowledged"
    );
    assert!(report.totals.duplicates > 0, "duplicates were sent");
    assert_eq!(report.truth.recipients.len(), messages * 5);

    verify_all(&report.truth, &p.api_url(1), Duration::from_secs(120)).await;
    // The analytics topic is checked by the smaller tests: reading ~25,000
    // records back from Tansu takes minutes.
    p.finish().await;
}

/// Arpoone with one URL per status (delivered / pending / not_delivered),
/// batches of up to 100 records, 5 % of batches sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arpoone_per_status_urls() {
    let _t = timed("arpoone_per_status_urls");
    let mut p = Pipeline::new("happy-arpoone", &Options::default())
        .await
        .unwrap();
    p.start_ingest().await.unwrap();
    p.start_state(1).await.unwrap();

    let cfg = ArpooneConfig {
        delivery: dlrflow_sim::DeliveryConfig {
            reorder_window: 64,
            duplicate_rate: 0.05,
            ..delivery(&p.ingest_url(), "arpoone")
        },
        messages: 500,
        recipients: 2,
        send_rate: 0.0,
        routing: Routing::PerStatus,
        batch_max: 100,
        seed: 7,
        ..ArpooneConfig::default()
    };
    let report = run_arpoone(&cfg, CancellationToken::new()).await.unwrap();
    eprintln!("{}", report.table());
    assert_eq!(report.totals.dropped_4xx, 0, "the ingest refused a batch");
    assert_eq!(
        report.totals.dropped_exhausted, 0,
        "a batch was never acknowledged"
    );
    assert_eq!(report.truth.recipients.len(), 1000);

    verify_all(&report.truth, &p.api_url(0), Duration::from_secs(90)).await;
    p.analytics(Duration::from_secs(60))
        .await
        .unwrap()
        .assert_clean();
    p.finish().await;
}
