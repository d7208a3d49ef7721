//! End-to-end behaviour of one or two reconcilers against a real status
//! server, real Redis and real PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use dlrflow_events::Status;
use dlrflow_testkit::{unique_name, wait_for};

fn ago(secs: i64) -> chrono::DateTime<Utc> {
    Utc::now() - chrono::Duration::seconds(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_whose_terminal_event_was_never_delivered_ends_in_its_true_state() {
    let server = StatusServer::start(120, Duration::from_secs(60)).await;
    let db = TestDb::new().await;
    let stuck = unique_name("m");
    let fresh = unique_name("m");
    let scheduled = unique_name("m");
    let phones = phones(2);
    // The gateway delivered to both recipients of `stuck`; we heard "sent" 3 h
    // ago for one and "delivered" for the other. `fresh` was sent a minute ago.
    db.seed(&[
        webhook(&stuck, &phones[0], Status::Sent, ago(3 * 3600)),
        webhook(&stuck, &phones[1], Status::Delivered, ago(3 * 3600)),
        webhook(&fresh, &phones[0], Status::Sent, ago(60)),
        webhook(&scheduled, &phones[0], Status::Queued, ago(3 * 3600)),
    ])
    .await;
    // `scheduled` waits for its send time, tomorrow: queued is not stuck.
    sqlx::query(
        "UPDATE messages SET scheduled_at = now() + interval '1 day' WHERE message_id = $1",
    )
    .bind(&scheduled)
    .execute(&db.pool)
    .await
    .unwrap();
    server.set_truth(
        &stuck,
        &[
            (phones[0].clone(), Status::Delivered),
            (phones[1].clone(), Status::Delivered),
        ],
    );
    server.set_truth(&fresh, &[(phones[0].clone(), Status::Delivered)]);

    let app = spawn(test_config(&server, &db)).await;
    let settled = wait_for(Duration::from_secs(20), || async {
        (db.status_of(&stuck, &phones[0]).await?.0 == "delivered").then_some(())
    })
    .await;
    assert!(settled.is_some(), "the stuck recipient was not reconciled");
    // Give the sweeper a few more rounds: nothing else is read.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.reads_of(&stuck), 1);
    assert_eq!(
        server.reads_of(&fresh),
        0,
        "a recipient inside its deadline is not read"
    );
    assert_eq!(db.status_of(&fresh, &phones[0]).await.unwrap().0, "sent");
    let done: i64 = db
        .count(&format!("SELECT count(*) FROM reconcile_jobs WHERE message_id = '{stuck}' AND done_at IS NOT NULL AND reads = 1"))
        .await;
    assert_eq!(done, 1);
    // The change went out on the analytics outbox like any update.
    let published: i64 = db
        .count(&format!(
            "SELECT count(*) FROM delivery_outbox WHERE message_id = '{stuck}' AND payload LIKE '%\"provider\":\"status_api\"%' AND payload LIKE '%\"status\":\"delivered\"%'"
        ))
        .await;
    assert!(published >= 1, "no outbox record for the reconciled change");
    let metrics = reqwest::get(format!("http://{}/metrics", app.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dlrflow_reconcile_reads_total"),
        "{metrics}"
    );
    app.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_failed_conflict_is_resolved_to_the_api_answer() {
    let server = StatusServer::start(120, Duration::from_secs(60)).await;
    let db = TestDb::new().await;
    let msg = unique_name("m");
    let phone = phones(1).remove(0);
    db.seed(&[webhook(&msg, &phone, Status::Delivered, ago(30))])
        .await;
    db.seed(&[webhook(&msg, &phone, Status::Failed, ago(20))])
        .await;
    let (status, flagged) = db.status_of(&msg, &phone).await.unwrap();
    assert_eq!(
        (status.as_str(), flagged),
        ("delivered", true),
        "the merge flags the conflict"
    );
    server.set_truth(&msg, &[(phone.clone(), Status::Failed)]);

    let app = spawn(test_config(&server, &db)).await;
    let resolved = wait_for(Duration::from_secs(20), || async {
        let (status, flagged) = db.status_of(&msg, &phone).await?;
        (status == "failed" && !flagged).then_some(())
    })
    .await;
    assert!(
        resolved.is_some(),
        "conflict not resolved: {:?}",
        db.status_of(&msg, &phone).await
    );
    let error_code: Option<String> =
        sqlx::query_scalar("SELECT error_code FROM recipient_state WHERE message_id = $1")
            .bind(&msg)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        error_code.as_deref(),
        Some("ABSENT_SUBSCRIBER"),
        "the API's error fields win"
    );
    // A quiet period of several sweeps (200 ms each): no second read.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(server.reads_of(&msg), 1);
    let metrics = reqwest::get(format!("http://{}/metrics", app.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dlrflow_reconcile_answers_published_total 1"),
        "{metrics}"
    );
    app.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_reads_a_burst_of_1000_recipients_once() {
    let server = StatusServer::start(120, Duration::from_secs(60)).await;
    let db = TestDb::new().await;
    let msg = unique_name("m");
    let phones = phones(1000);
    let mut cfg = test_config(&server, &db);
    cfg.reconcile.strict_sources = vec![SOURCE.to_owned()];
    cfg.reconcile.debounce_ms = 1500;
    server.set_truth(
        &msg,
        &phones
            .iter()
            .map(|p| (p.clone(), Status::Delivered))
            .collect::<Vec<_>>(),
    );
    let app = spawn(cfg).await;

    // The burst: 1,000 "sent" events, then their "delivered", in chunks.
    for status in [Status::Sent, Status::Delivered] {
        for chunk in phones.chunks(250) {
            let updates: Vec<_> = chunk
                .iter()
                .map(|p| webhook(&msg, p, status, ago(1)))
                .collect();
            db.seed(&updates).await;
        }
    }
    let read = wait_for(Duration::from_secs(20), || async {
        (server.reads_of(&msg) >= 1).then_some(())
    })
    .await;
    assert!(read.is_some(), "strict mode never read the message");
    // Well past the debounce and many sweeps later: still exactly one read.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(server.reads_of(&msg), 1, "{:?}", server.log());
    let delivered = db
        .count(&format!("SELECT count(*) FROM recipient_state WHERE message_id = '{msg}' AND status = 'delivered'"))
        .await;
    assert_eq!(delivered, 1000);

    // A later event on the message is confirmed by one more read.
    db.seed(&[webhook(&msg, &unique_name("+243"), Status::Sent, ago(0))])
        .await;
    let again = wait_for(Duration::from_secs(15), || async {
        (server.reads_of(&msg) >= 2).then_some(())
    })
    .await;
    assert!(
        again.is_some(),
        "a new event after the read was not confirmed"
    );
    // A quiet period of several sweeps: the answer's own write is not a new change.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(server.reads_of(&msg), 2);
    app.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_stops_reads_and_fails_readiness() {
    let server = StatusServer::start(120, Duration::from_secs(60)).await;
    let db = TestDb::new().await;
    let msgs: Vec<String> = (0..3).map(|_| unique_name("m")).collect();
    for m in &msgs {
        db.seed(&[webhook(m, "+243990000001", Status::Sent, ago(3 * 3600))])
            .await;
    }
    let mut cfg = test_config(&server, &db);
    cfg.status_api.api_key = dlrflow_runtime::Secret::new("wrong-key");
    let app = spawn(cfg).await;
    let refused = wait_for(Duration::from_secs(15), || async {
        app.state.unauthorized()
    })
    .await;
    let reason = refused.expect("the 401 was not noticed");
    assert!(reason.contains("401"), "{reason}");
    assert!(
        !reason.contains("wrong-key"),
        "the key must never be shown: {reason}"
    );
    let resp = reqwest::get(format!("http://{}/readyz", app.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body = resp.text().await.unwrap();
    assert!(body.contains("401"), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Reads already in flight when the first 401 came back (at most one per
    // worker) are all that reached the server.
    let log = server.log();
    let first = log[0].at;
    assert!(log.len() <= 4, "reads continued after a 401: {log:?}");
    assert!(
        log.iter()
            .all(|r| r.status == 401 && r.at.duration_since(first) < Duration::from_millis(500)),
        "{log:?}"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", app.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dlrflow_reconcile_unauthorized 1"),
        "{metrics}"
    );
    app.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_every_replica_for_its_retry_after() {
    let server = StatusServer::start(120, Duration::from_secs(60)).await;
    let db = TestDb::new().await;
    let msgs: Vec<String> = (0..6).map(|_| unique_name("m")).collect();
    for m in &msgs {
        db.seed(&[webhook(m, "+243990000001", Status::Sent, ago(3 * 3600))])
            .await;
        server.set_truth(m, &[("+243990000001".to_owned(), Status::Delivered)]);
    }
    server.throttle_next(1, 2);
    let cfg = test_config(&server, &db);
    let a = spawn(cfg.clone()).await;
    let b = spawn(cfg).await;
    let all = wait_for(Duration::from_secs(30), || async {
        let n = db
            .count("SELECT count(*) FROM recipient_state WHERE status = 'delivered'")
            .await;
        (n == 6).then_some(())
    })
    .await;
    assert!(all.is_some(), "not all messages were reconciled");
    let log = server.log();
    let throttled = log.iter().find(|r| r.status == 429).expect("one 429").at;
    // Reads granted before the pause reached Redis may still arrive just after
    // the 429 (at most one per worker, within moments); after those, no replica
    // reads again until Retry-After (2 s) has passed.
    let after: Vec<Duration> = log
        .iter()
        .filter(|r| r.at > throttled)
        .map(|r| r.at.duration_since(throttled))
        .collect();
    let in_flight = after
        .iter()
        .filter(|d| **d < Duration::from_millis(300))
        .count();
    assert!(in_flight <= 7, "{after:?}");
    assert!(
        after
            .iter()
            .all(|d| *d < Duration::from_millis(300) || *d >= Duration::from_millis(1950)),
        "a replica read during the pause: {after:?}"
    );
    assert_eq!(log.iter().filter(|r| r.status == 200).count(), 6);
    a.stop().await;
    b.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_backs_off_then_succeeds_and_an_unknown_message_is_given_up() {
    let server = StatusServer::start(120, Duration::from_secs(60)).await;
    let db = TestDb::new().await;
    let late = unique_name("m");
    let unknown = unique_name("m");
    db.seed(&[
        webhook(&late, "+243990000001", Status::Processing, ago(3 * 3600)),
        webhook(&unknown, "+243990000001", Status::Queued, ago(3 * 3600)),
    ])
    .await;
    server.set_truth(&late, &[("+243990000001".to_owned(), Status::Failed)]);
    server.script(&late, &[404, 503]);
    let mut cfg = test_config(&server, &db);
    cfg.reconcile.give_up_after_secs = 3;
    let started = Instant::now();
    let app = spawn(cfg).await;
    let settled = wait_for(Duration::from_secs(20), || async {
        (db.status_of(&late, "+243990000001").await?.0 == "failed").then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "404 then 503 then 200 did not settle: {:?}",
        server.log()
    );
    assert_eq!(server.reads_of(&late), 3);
    let gave_up = wait_for(Duration::from_secs(20), || async {
        let n = db
            .count(&format!(
                "SELECT count(*) FROM reconcile_jobs WHERE message_id = '{unknown}' AND gave_up"
            ))
            .await;
        (n == 1).then_some(())
    })
    .await;
    assert!(gave_up.is_some(), "the unknown message was never given up");
    let reads = server.reads_of(&unknown);
    // Backoff 300 ms doubling (± 20 %) over ~3 s: a handful of reads, not a loop.
    assert!(
        (2..=6).contains(&reads),
        "{reads} reads of an unknown message in {:?}",
        started.elapsed()
    );
    // Given up: a quiet second brings no further read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        server.reads_of(&unknown),
        reads,
        "a given-up message is not read again at once"
    );
    assert_eq!(
        db.status_of(&unknown, "+243990000001").await.unwrap().0,
        "queued"
    );
    app.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_unseen_recipients_is_read_after_the_deadline() {
    let server = StatusServer::start(120, Duration::from_secs(60)).await;
    let db = TestDb::new().await;
    let msg = unique_name("m");
    let phones = phones(3);
    // sms.queued announced 3 recipients 20 minutes ago; we heard of one.
    sqlx::query(
        "INSERT INTO messages (message_id, source, provider, total_recipients, queued_at, first_seen_at, updated_at)
         VALUES ($1, $2, 'lisoloo', 3, now() - interval '20 minutes', now() - interval '20 minutes', now())",
    )
    .bind(&msg)
    .bind(SOURCE)
    .execute(&db.pool)
    .await
    .unwrap();
    db.seed(&[webhook(&msg, &phones[0], Status::Delivered, ago(1100))])
        .await;
    server.set_truth(
        &msg,
        &phones
            .iter()
            .map(|p| (p.clone(), Status::Delivered))
            .collect::<Vec<_>>(),
    );
    let app = spawn(test_config(&server, &db)).await;
    let complete = wait_for(Duration::from_secs(20), || async {
        let n = db
            .count(&format!("SELECT count(*) FROM recipient_state WHERE message_id = '{msg}' AND status = 'delivered'"))
            .await;
        (n == 3).then_some(())
    })
    .await;
    assert!(complete.is_some(), "unseen recipients were not filled in");
    // A quiet period of several sweeps: the filled-in message is not read again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(server.reads_of(&msg), 1);
    app.stop().await;
    db.drop().await;
}
