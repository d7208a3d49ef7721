//! Backend outages and failures: no single job, and no Redis or PostgreSQL
//! failure, stops the reconciler for good, the budget holds throughout, and
//! `/readyz` says what is wrong.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use dlrflow_events::Status;
use dlrflow_testkit::{unique_name, wait_for, PrivateRedis};

fn ago(secs: i64) -> chrono::DateTime<Utc> {
    Utc::now() - chrono::Duration::seconds(secs)
}

const PHONE: &str = "+243990000001";

/// `n` messages whose one recipient is stuck in `sent`; the gateway says delivered.
async fn stuck_messages(db: &TestDb, server: &StatusServer, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|_| unique_name("m")).collect();
    let updates: Vec<_> = ids
        .iter()
        .map(|id| {
            server.set_truth(id, &[(PHONE.to_owned(), Status::Delivered)]);
            webhook(id, PHONE, Status::Sent, ago(3 * 3600))
        })
        .collect();
    db.seed(&updates).await;
    ids
}

/// Redis (a private one) is killed after part of the window's budget was
/// spent, while more messages wait, and comes back empty on the same port
/// 2 s later. While it is away no budget can be granted: no read reaches the
/// gateway and `/readyz` says 503 naming Redis. When it is back, reads resume
/// by themselves and `/readyz` says 200 — and the restarted, empty Redis does
/// not hand out a fresh budget inside the gateway's window (the budget was
/// used before, so every replica first waits one limiter window): no window
/// of the gateway's log ever holds more than the budget, and the gateway
/// never answers 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_stops_reads_which_resume_within_the_budget() {
    const BUDGET: usize = 10;
    const BEFORE: usize = 6;
    // A window much longer than the outage: a fresh budget handed out by the
    // restarted Redis would land inside the window of the reads before it.
    let window = Duration::from_secs(8);
    let server = StatusServer::start(BUDGET, window).await;
    let db = TestDb::new().await;
    let mut ids = stuck_messages(&db, &server, BEFORE).await;
    let mut redis = PrivateRedis::start(None);
    let mut cfg = test_config(&server, &db);
    cfg.redis.url = redis.url().into();
    cfg.budget.safety_margin_ms = 500;
    let started = Instant::now();
    let app = spawn(cfg).await;

    let first_reads = wait_for(Duration::from_secs(20), || async {
        (server.log().len() >= BEFORE).then_some(())
    })
    .await;
    assert!(first_reads.is_some(), "no reads: {:?}", server.log());
    let first = server.log()[0].at.duration_since(started);
    assert!(
        first < Duration::from_secs(3),
        "a budget never used before starts at once: {first:?}"
    );

    // Redis goes away; the workers find more stuck messages and keep asking
    // for budget (4 of the window's 10 are left).
    redis.down();
    let down_at = Instant::now();
    ids.extend(stuck_messages(&db, &server, BUDGET).await);
    let not_ready = wait_for(Duration::from_secs(8), || async {
        let (code, body) = readyz(app.addr).await;
        (code == 503).then_some(body)
    })
    .await
    .expect("/readyz stays 200 while Redis is down");
    let problems = not_ready["problems"].to_string();
    assert!(problems.contains("Redis"), "{not_ready}");
    let remaining = Duration::from_secs(2).saturating_sub(down_at.elapsed());
    tokio::time::sleep(remaining).await;
    let during: Vec<_> = server
        .log()
        .into_iter()
        .filter(|r| r.at > down_at + Duration::from_millis(300))
        .collect();
    assert!(during.is_empty(), "reads while Redis was down: {during:?}");

    // Back, empty, on the same port.
    redis.up();
    let ready = wait_for(Duration::from_secs(10), || async {
        let (code, body) = readyz(app.addr).await;
        (code == 200).then_some(body)
    })
    .await;
    assert!(
        ready.is_some(),
        "/readyz did not recover after Redis came back"
    );
    let done = wait_for(Duration::from_secs(30), || async {
        let n = db
            .count("SELECT count(*) FROM recipient_state WHERE status = 'delivered'")
            .await;
        (n == ids.len() as i64).then_some(())
    })
    .await;
    let log = server.log();
    assert!(
        done.is_some(),
        "reads did not resume after Redis came back: {} reads",
        log.len()
    );
    assert!(
        log.iter().all(|r| r.status == 200),
        "the gateway refused reads (budget exceeded): {log:?}"
    );
    let worst = max_in_window(&log, window);
    assert!(worst <= BUDGET, "{worst} reads in one gateway window");
    assert_eq!(log.len(), ids.len(), "each message read once");
    let metrics = metrics(app.addr).await;
    assert!(
        metrics.contains("dlrflow_reconcile_budget_resets_total"),
        "{metrics}"
    );
    app.stop().await;
    db.drop().await;
}

/// Write failures, made by a trigger in the test's own schema of the real
/// PostgreSQL: one message's answer is refused for good (SQLSTATE 22023 with
/// a 3,000-character message), another's fails twice with a serialization
/// failure (40001). The refused job is closed as failed with its error
/// bounded, is not read again, and holds up no one; the flaky one is written
/// after retries in place, without a second read; the others are fixed.
/// The reconciler only publishes; writing is dlrflow-state's. An answer
/// PostgreSQL refuses for one message goes to the DLQ (the others are
/// written), a transient failure is retried by the state's consumer, and
/// neither costs the budget a second read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_state_refuses_is_dead_lettered_and_a_transient_write_retried_without_a_second_read(
) {
    let server = StatusServer::start(120, Duration::from_secs(60)).await;
    let db = TestDb::new().await;
    let ids = stuck_messages(&db, &server, 4).await;
    let (bad, flaky) = (&ids[0], &ids[1]);
    let schema = db.schema();
    for sql in [
        format!("CREATE SEQUENCE {schema}.flaky_writes"),
        format!(
            r#"CREATE FUNCTION {schema}.refuse_some() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.message_id = '{bad}' AND NEW.status = 'delivered' THEN
    RAISE EXCEPTION 'refused: %', repeat('x', 3000) USING ERRCODE = '22023';
  END IF;
  IF NEW.message_id = '{flaky}' AND NEW.status = 'delivered'
     AND nextval('{schema}.flaky_writes') <= 2 THEN
    RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
  END IF;
  RETURN NEW;
END $$"#
        ),
        format!(
            "CREATE TRIGGER refuse_some BEFORE INSERT OR UPDATE ON {schema}.recipient_state \
             FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_some()"
        ),
    ] {
        sqlx::query(&sql).execute(&db.pool).await.unwrap();
    }
    let app = spawn(test_config(&server, &db)).await;

    let others_fixed = wait_for(Duration::from_secs(30), || async {
        let n = db
            .count("SELECT count(*) FROM recipient_state WHERE status = 'delivered'")
            .await;
        (n == 3).then_some(())
    })
    .await;
    assert!(others_fixed.is_some(), "{:?}", server.log());
    // The refused answer is in the DLQ, named as a record of the status topic.
    let status_topic = format!("{}.status", db.topics);
    let dlq = dlrflow_testkit::read_topic(
        &dlrflow_testkit::test_brokers(),
        &format!("{}.dlq", db.topics),
        1,
        Duration::from_secs(20),
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    assert_eq!(dlq.len(), 1, "one DLQ record: {dlq:?}");
    let header = |name: &str| {
        dlq[0]
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(
        header("original-topic").as_deref(),
        Some(status_topic.as_str())
    );
    assert!(
        header("error").unwrap_or_default().contains("refused"),
        "{:?}",
        header("error")
    );
    let raw_key = dlq[0].raw_key().expect("the answer's key");
    assert_eq!(
        (raw_key.provider, raw_key.message_id),
        ("status_api", bad.as_str())
    );
    // A quiet period of several sweeps (200 ms each): no job is read again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        server.reads_of(bad),
        1,
        "a refused answer is not re-read in a loop"
    );
    assert_eq!(
        server.reads_of(flaky),
        1,
        "a transient failure costs no second read"
    );
    for id in &ids[2..] {
        assert_eq!(server.reads_of(id), 1);
    }
    assert_eq!(db.status_of(bad, PHONE).await.unwrap().0, "sent");
    assert_eq!(db.status_of(flaky, PHONE).await.unwrap().0, "delivered");
    let metrics = metrics(app.addr).await;
    assert!(
        metrics.contains("dlrflow_reconcile_answers_published_total 4"),
        "{metrics}"
    );
    // Counted at each attempt of the batch (the transient failure retried it).
    assert!(
        dlrflow_testkit::metric_sum(&metrics, "dlrflow_state_records_refused_total") >= 1.0,
        "{metrics}"
    );
    let (code, body) = readyz(app.addr).await;
    assert_eq!(
        code, 200,
        "one refused answer does not make the replica unready: {body}"
    );
    app.stop().await;
    db.drop().await;
}

/// The broker (a private Tansu) dies before the reconciler's first answer:
/// that answer is not acknowledged within `kafka.produce_timeout_ms`, the
/// job is retried later, and no more reads are spent while the status topic
/// cannot take answers (`/readyz` says why). When the broker is back, reads
/// resume by themselves and every message ends in its true state, applied
/// by dlrflow-state from the status topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_pauses_reads_and_loses_no_answer() {
    const MESSAGES: usize = 6;
    const WORKERS: usize = 2;
    let server = StatusServer::start(120, Duration::from_secs(60)).await;
    let db = TestDb::new().await;
    let mut broker = dlrflow_testkit::PrivateBroker::start().unwrap();
    for t in ["raw", "status", "dlq", "delivery"] {
        dlrflow_testkit::create_topic(&broker.brokers(), &format!("{}.{t}", db.topics), 2)
            .await
            .unwrap();
    }
    let ids = stuck_messages(&db, &server, MESSAGES).await;
    let mut cfg = test_config(&server, &db);
    cfg.kafka.client.brokers = broker.brokers();
    cfg.kafka.produce_timeout = Duration::from_secs(2);
    cfg.reconcile.concurrency = WORKERS;
    broker.kill9();
    let app = spawn(cfg).await;

    // The first reads (at most one per worker) find no broker for their
    // answers; then reads pause.
    let paused = wait_for(Duration::from_secs(20), || async {
        let (code, body) = readyz(app.addr).await;
        (code == 503 && body.to_string().contains("status topic")).then_some(body)
    })
    .await;
    assert!(paused.is_some(), "/readyz never named the status topic");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = server.log().len();
    assert!(
        (1..=WORKERS).contains(&during),
        "{during} reads while answers could not be published (at most one per worker)"
    );

    broker.restart().unwrap();
    let fixed = wait_for(Duration::from_secs(60), || async {
        let n = db
            .count("SELECT count(*) FROM recipient_state WHERE status = 'delivered'")
            .await;
        (n == MESSAGES as i64).then_some(())
    })
    .await;
    assert!(
        fixed.is_some(),
        "not every answer was applied: {:?}",
        server.log()
    );
    let reads = server.log().len();
    assert!(
        reads <= MESSAGES + during,
        "{reads} reads for {MESSAGES} messages: only the lost answers are read again"
    );
    for id in &ids {
        assert!(server.reads_of(id) >= 1);
    }
    let ready = wait_for(Duration::from_secs(20), || async {
        (readyz(app.addr).await.0 == 200).then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "/readyz did not recover: {:?}",
        readyz(app.addr).await
    );
    app.stop().await;
    db.drop().await;
}

/// An answer the broker can never take (bigger than the producer's
/// `message.max.bytes`: librdkafka refuses it for good, as it would a
/// record the broker calls invalid) fails its job once — done, `failed`,
/// the error kept, the status API read once — and the reconciler goes on
/// with the other jobs, whose answers are published and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_broker_refuses_for_good_fails_its_job_and_the_others_go_on() {
    let server = StatusServer::start(120, Duration::from_secs(60)).await;
    let db = TestDb::new().await;
    let small = stuck_messages(&db, &server, 3).await;
    // 80 recipients: an answer of several KB, over the 2,000 bytes allowed.
    let big = unique_name("m");
    let phones: Vec<String> = (0..80).map(|i| format!("+2439900{i:05}")).collect();
    let truth: Vec<(String, Status)> = phones
        .iter()
        .map(|p| (p.clone(), Status::Delivered))
        .collect();
    server.set_truth(&big, &truth);
    let updates: Vec<_> = phones
        .iter()
        .map(|p| webhook(&big, p, Status::Sent, ago(3 * 3600)))
        .collect();
    db.seed(&updates).await;
    let mut cfg = test_config(&server, &db);
    cfg.kafka
        .client
        .settings
        .insert("message.max.bytes".into(), "2000".into());
    let app = spawn(cfg).await;

    let failed = wait_for(Duration::from_secs(60), || async {
        let n = db
            .count(&format!(
                "SELECT count(*) FROM reconcile_jobs WHERE message_id = '{big}' \
                  AND failed AND done_at IS NOT NULL AND last_error ILIKE '%size%'"
            ))
            .await;
        (n == 1).then_some(())
    })
    .await;
    assert!(
        failed.is_some(),
        "the job of the oversized answer is not failed with its error"
    );
    let fixed = wait_for(Duration::from_secs(60), || async {
        let n = db
            .count("SELECT count(*) FROM recipient_state WHERE status = 'delivered'")
            .await;
        (n == small.len() as i64).then_some(())
    })
    .await;
    assert!(fixed.is_some(), "the other answers were not applied");
    // Failed once, not retried: by the time the other answers are applied
    // (several sweeps and backoffs later) the job still has its one read
    // and one attempt, and the gateway saw one read of it.
    let attempts = db
        .count(&format!(
            "SELECT count(*) FROM reconcile_jobs WHERE message_id = '{big}' \
              AND failed AND attempts = 1 AND reads = 1"
        ))
        .await;
    assert_eq!(attempts, 1, "the refused answer's job was tried again");
    assert_eq!(
        server.reads_of(&big),
        1,
        "the refused answer was read again"
    );
    for id in &small {
        assert_eq!(server.reads_of(id), 1);
    }
    app.stop().await;
    db.drop().await;
}
