//! Faults mid-stream; after each, every recipient's final state is exact.
//! Retries of the simulated gateway come after 0.3 s, 1.2 s, 6 s, 36 s
//! (time scale 0.01).

use std::time::Duration;

use dlrflow_e2e::{delivery, timed, verify_all, Options, Pipeline};
use dlrflow_sim::{run_lisoloo, Gateway, LisolooConfig, SimReport};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// A send of `messages` × 3 recipients spread over about 20 s, in the
/// background, so that a fault lands in the middle of it.
fn send(p: &Pipeline, messages: usize, duplicate_rate: f64) -> JoinHandle<SimReport> {
    let cfg = LisolooConfig {
        delivery: dlrflow_sim::DeliveryConfig {
            reorder_window: 64,
            duplicate_rate,
            ..delivery(&p.ingest_url(), "lisoloo")
        },
        messages,
        recipients: 3,
        send_rate: messages as f64 / 20.0,
        failure_rate: 0.1,
        carriers: Vec::new(),
        seed: 4242,
    };
    tokio::spawn(async move {
        run_lisoloo(&cfg, &Gateway::new(), CancellationToken::new())
            .await
            .unwrap()
    })
}

fn check_report(report: &SimReport) {
    eprintln!("{}", report.table());
    assert_eq!(report.totals.dropped_4xx, 0, "the ingest refused an event");
    assert_eq!(
        report.totals.dropped_exhausted, 0,
        "an event was dropped after every retry"
    );
}

/// `dlrflow-ingest` is SIGKILLed mid-send and restarted on the same port
/// 2 s later; requests that got no answer are retried by the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_and_restarted_mid_send() {
    let _t = timed("ingest_killed_and_restarted_mid_send");
    let mut p = Pipeline::new("fault-ingest", &Options::default())
        .await
        .unwrap();
    p.start_ingest().await.unwrap();
    p.start_state(1).await.unwrap();
    let sender = send(&p, 400, 0.02);

    let at = p.wait_applied(1000, WAIT).await.unwrap();
    p.kill9("ingest");
    eprintln!("e2e: ingest killed at {at} applied events");
    tokio::time::sleep(Duration::from_secs(2)).await; // down across the first retries
    p.restart("ingest").await.unwrap();

    let report = sender.await.unwrap();
    check_report(&report);
    assert!(report.totals.retries > 0, "the outage caused retries");
    verify_all(&report.truth, &p.api_url(0), Duration::from_secs(90)).await;
    p.finish().await;
}

/// Three state replicas; one is SIGKILLed mid-stream and restarted at once
/// (while the dead one still holds its partitions until its 10 s session
/// expires). The group must end with every partition assigned; uncommitted
/// work is redone without visible duplicates.
///
/// The replicas use static membership (`kafka.instance_id`), as the state
/// README recommends: without it, Tansu 0.6.0's coordinator leaves the dead
/// member's partitions unassigned when its session expires (it sends
/// "rebalance in progress" to one survivor only, which rejoins into the same
/// generation; see tests/README.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_replica_killed_and_restarted() {
    state_kill("fault-state", Duration::ZERO).await;
}

/// The same, restarted only after the dead member's session expired (12 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_replica_killed_and_restarted_after_its_session_expired() {
    state_kill("fault-state-late", Duration::from_secs(12)).await;
}

async fn state_kill(name: &str, down: Duration) {
    let _t = timed(name);
    let mut p = Pipeline::new(name, &Options::default()).await.unwrap();
    p.start_ingest().await.unwrap();
    p.start_state(3).await.unwrap();
    let sender = send(&p, 400, 0.05);

    let at = p.wait_applied(1000, WAIT).await.unwrap();
    p.kill9("state-1");
    eprintln!("e2e: state-1 killed at {at} applied events");
    tokio::time::sleep(down).await;
    p.restart("state-1").await.unwrap();

    let report = sender.await.unwrap();
    check_report(&report);
    verify_all(&report.truth, &p.api_url(0), Duration::from_secs(90)).await;
    // What the killed replica half-did (written, offsets not committed) was
    // read again by another: the log still gives exactly the live state.
    p.assert_log_is_the_truth().await;
    p.finish().await;
}

/// A private broker is SIGKILLed mid-send and restarted 2 s later (longer
/// than the 0.3 s and 1.2 s retries, shorter than the ingest's 3 s delivery
/// timeout): requests in flight get 503 or wait for the broker, the gateway
/// retries, the state consumers and the outbox relay reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_longer_than_the_first_retry() {
    broker_outage("fault-broker", Duration::from_secs(2)).await;
}

/// The same with a 6 s outage: longer than the ingest's 3 s delivery
/// deadline, so requests in flight get 503 while their records stay queued.
/// Guards the Tansu 0.6.0 epoch-bump panic: had librdkafka timed the records
/// out, the idempotent producer would bump its epoch and Tansu's storage would
/// panic and fail every later request (see README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_longer_than_the_ingest_delivery_timeout() {
    broker_outage("fault-broker-long", Duration::from_secs(6)).await;
}

async fn broker_outage(name: &str, outage: Duration) {
    let _t = timed(name);
    let opts = Options {
        private_broker: true,
        ..Options::default()
    };
    let mut p = Pipeline::new(name, &opts).await.unwrap();
    p.start_ingest().await.unwrap();
    p.start_state(2).await.unwrap();
    let sender = send(&p, 400, 0.02);

    let at = p.wait_applied(1000, WAIT).await.unwrap();
    p.broker().kill9();
    eprintln!("e2e: broker killed at {at} applied events");
    tokio::time::sleep(outage).await; // the outage itself
    p.broker().restart().unwrap();

    let report = sender.await.unwrap();
    check_report(&report);
    verify_all(&report.truth, &p.api_url(0), Duration::from_secs(120)).await;
    p.analytics(Duration::from_secs(60))
        .await
        .unwrap()
        .assert_clean();
    p.finish().await;
}

/// Every Redis key of this test's prefix is deleted mid-stream (the dedupe
/// fast path forgets everything); with 10 % duplicates PostgreSQL's unique
/// key must still keep each event applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_prefix_flushed_mid_stream() {
    let _t = timed("redis_prefix_flushed_mid_stream");
    let mut p = Pipeline::new("fault-redis", &Options::default())
        .await
        .unwrap();
    p.start_ingest().await.unwrap();
    p.start_state(2).await.unwrap();
    let sender = send(&p, 400, 0.10);

    let at = p.wait_applied(1500, WAIT).await.unwrap();
    let deleted = p.flush_redis_prefix().await.unwrap();
    eprintln!("e2e: deleted {deleted} redis keys at {at} applied events");
    assert!(
        deleted > 0,
        "the state service keeps dedupe keys under its prefix"
    );

    let report = sender.await.unwrap();
    check_report(&report);
    verify_all(&report.truth, &p.api_url(0), Duration::from_secs(90)).await;
    let a = p.analytics(Duration::from_secs(60)).await.unwrap();
    a.assert_clean();
    p.finish().await;
}

/// A private PostgreSQL is restarted (`pg_ctl restart -m fast`) mid-stream:
/// every connection is cut; batches are retried, offsets were not committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream() {
    let _t = timed("postgres_restarted_mid_stream");
    let opts = Options {
        private_postgres: true,
        ..Options::default()
    };
    let mut p = Pipeline::new("fault-postgres", &opts).await.unwrap();
    p.start_ingest().await.unwrap();
    p.start_state(2).await.unwrap();
    let sender = send(&p, 400, 0.02);

    let at = p.wait_applied(1000, WAIT).await.unwrap();
    p.postgres().restart().unwrap();
    eprintln!("e2e: postgres restarted at {at} applied events");

    let report = sender.await.unwrap();
    check_report(&report);
    verify_all(&report.truth, &p.api_url(0), Duration::from_secs(90)).await;
    p.analytics(Duration::from_secs(60))
        .await
        .unwrap()
        .assert_clean();
    p.finish().await;
}
