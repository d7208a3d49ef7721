//! Three reconcilers share one API key over a backlog of 1,000 stuck messages.
//!
//! What is tested: the budget scaled down so the test stays short — 100 reads
//! per 2 s window (the gateway's 120 per 60 s has the same shape; the limiter's
//! property does not depend on the parameters, see `tests/limiter.rs`), with a
//! 500 ms safety margin, so the limiter counts 100 per 2.5 s. The status server
//! enforces 100 per any 2 s with 429s. Asserted: the server's log has no 2 s
//! window with more than 100 reads and no 429, every message was read exactly
//! once, and every message ends in its true terminal state. The same again
//! with the budget on a private three-primary Redis Cluster
//! (`redis.cluster = true`).

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use dlrflow_events::Status;
use dlrflow_testkit::{unique_name, wait_for, RedisCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_drain_a_backlog_of_1000_within_the_shared_budget() {
    drain_a_backlog_of_1000(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_drain_a_backlog_of_1000_within_the_budget_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    drain_a_backlog_of_1000(Some(&cluster)).await;
}

/// The scenario above; the budget on `cluster` if there is one, else on the
/// shared Redis.
async fn drain_a_backlog_of_1000(cluster: Option<&RedisCluster>) {
    const MESSAGES: usize = 1000;
    let window = Duration::from_secs(2);
    let server = StatusServer::start(100, window).await;
    let db = TestDb::new().await;
    let old = Utc::now() - chrono::Duration::hours(3);
    let ids: Vec<String> = (0..MESSAGES).map(|_| unique_name("m")).collect();
    let phone = "+243990000001".to_owned();
    let mut updates = Vec::with_capacity(MESSAGES);
    for (i, id) in ids.iter().enumerate() {
        let truth = if i % 10 == 0 {
            Status::Failed
        } else {
            Status::Delivered
        };
        server.set_truth(id, &[(phone.clone(), truth)]);
        updates.push(webhook(id, &phone, Status::Sent, old));
    }
    for chunk in updates.chunks(250) {
        db.seed(chunk).await;
    }

    let mut cfg = test_config(&server, &db);
    cfg.budget.safety_margin_ms = 500;
    if let Some(cluster) = cluster {
        cfg.redis.url = cluster.url().into();
        cfg.redis.cluster = true;
    }
    let started = Instant::now();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(spawn(cfg.clone()).await);
    }
    // Ready: the budget's Redis (each replica's cluster connection) answers
    // and reports the budget.
    for r in &replicas {
        let (code, body) = readyz(r.addr).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["budget"]["limit"], 100, "{body}");
    }
    let drained = wait_for(Duration::from_secs(90), || async {
        let open = db
            .count("SELECT count(*) FROM recipient_state WHERE status = 'sent'")
            .await;
        (open == 0).then_some(())
    })
    .await;
    let elapsed = started.elapsed();
    // A few more sweeps: nothing is read twice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for r in replicas {
        r.stop().await;
    }
    let log = server.log();
    let worst = max_in_window(&log, window);
    eprintln!(
        "replicas: {} reads in {elapsed:?}; busiest 2 s window {worst}; busiest 2.5 s window {}",
        log.len(),
        max_in_window(&log, Duration::from_millis(2500))
    );
    assert!(
        drained.is_some(),
        "backlog not drained in 90 s: {} reads",
        log.len()
    );
    assert!(worst <= 100, "{worst} reads in one 2 s window");
    assert_eq!(
        log.iter().filter(|r| r.status != 200).count(),
        0,
        "the server refused reads"
    );
    assert_eq!(log.len(), MESSAGES, "every message read exactly once");
    assert_eq!(unique_set(&log).len(), MESSAGES);
    // 1,000 reads at 100 per 2.5 s cannot finish before 9 full windows.
    let first = log.iter().map(|r| r.at).min().unwrap();
    let last = log.iter().map(|r| r.at).max().unwrap();
    assert!(
        last.duration_since(first) >= Duration::from_millis(22_000),
        "{:?}",
        last.duration_since(first)
    );
    let failed = db
        .count("SELECT count(*) FROM recipient_state WHERE status = 'failed'")
        .await;
    assert_eq!(failed, (MESSAGES / 10) as i64);
    let done = db
        .count("SELECT count(*) FROM reconcile_jobs WHERE done_at IS NOT NULL AND reads = 1")
        .await;
    assert_eq!(done, MESSAGES as i64);
    db.drop().await;
}

/// The production numbers, 120 reads per 60 s (1 s safety margin), over 66 s:
/// three replicas with 300 stuck messages make exactly two budgets' worth of
/// reads — 120 at once, then 120 more once the first grants left the limiter's
/// 61 s window — and no 60 s window of the server's log holds more than 120.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_budget_holds_over_a_minute_and_a_bit() {
    const MESSAGES: usize = 300;
    let window = Duration::from_secs(60);
    let server = StatusServer::start(120, window).await;
    let db = TestDb::new().await;
    let old = Utc::now() - chrono::Duration::hours(3);
    let ids: Vec<String> = (0..MESSAGES).map(|_| unique_name("m")).collect();
    let phone = "+243990000001".to_owned();
    let updates: Vec<_> = ids
        .iter()
        .map(|id| {
            server.set_truth(id, &[(phone.clone(), Status::Delivered)]);
            webhook(id, &phone, Status::Sent, old)
        })
        .collect();
    db.seed(&updates).await;
    let cfg = test_config(&server, &db);
    assert_eq!(
        (
            cfg.budget.reads,
            cfg.budget.window_ms,
            cfg.budget.safety_margin_ms
        ),
        (120, 60_000, 1000)
    );
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(spawn(cfg.clone()).await);
    }
    let first = wait_for(Duration::from_secs(10), || async {
        server.log().first().map(|r| r.at)
    })
    .await
    .expect("no read at all");
    tokio::time::sleep(Duration::from_secs(66).saturating_sub(first.elapsed())).await;
    for r in replicas {
        r.stop().await;
    }
    let log = server.log();
    let worst = max_in_window(&log, window);
    eprintln!(
        "production budget: {} reads in 66 s; busiest 60 s window {worst}",
        log.len()
    );
    assert!(worst <= 120, "{worst} reads in one 60 s window");
    assert_eq!(log.iter().filter(|r| r.status != 200).count(), 0);
    assert_eq!(log.len(), 240, "two budgets' worth in 66 s");
    assert_eq!(unique_set(&log).len(), 240, "no message read twice");
    let fixed = db
        .count("SELECT count(*) FROM recipient_state WHERE status = 'delivered'")
        .await;
    assert_eq!(fixed, 240, "every read fixed its message");
    db.drop().await;
}
