//! The operator page in a real browser: headless Chromium (Debian's, installed
//! by `deploy/local/browser.sh` when missing) against the running services
//! after a simulated send with duplicates, reordering, withheld terminal
//! events (read back by the reconciler) and one poison record. What the page
//! shows must equal the simulator's truth; its replay button must move the
//! DLQ record back to the raw topic; it must be readable at 1280×800 and on
//! a phone. Screenshots go to `target/console/`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dlrflow_e2e::browser::Browser;
use dlrflow_e2e::{
    delivery, status_server, target_dir, timed, verify_all, Options, Pipeline, READ_KEY,
};
use dlrflow_sim::{run_lisoloo, FinalStatus, Gateway, LisolooConfig, WebhookFate};
use dlrflow_testkit::scenario::{produce_raw, producer, RawRecord};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_page_shows_the_truth_and_replays_from_the_dlq() {
    let _t = timed("the_operator_page_shows_the_truth_and_replays_from_the_dlq");
    let gateway = Gateway::new();
    let server = status_server(&gateway).await;
    let mut p = Pipeline::new("console", &Options::default()).await.unwrap();
    p.start_all(&server, 5).await;

    // One record the state cannot parse: it ends in the DLQ.
    let poison = RawRecord {
        key: "console-poison".into(),
        provider: "lisoloo",
        source: "lisoloo".into(),
        payload: "{\"event_type\": \"sms.delivered\", \"data\": ".into(),
    };
    produce_raw(&producer(&p.brokers).unwrap(), &p.raw_topic, &[poison])
        .await
        .unwrap();

    let cfg = LisolooConfig {
        delivery: dlrflow_sim::DeliveryConfig {
            reorder_window: 32,
            duplicate_rate: 0.05,
            withhold_terminal_rate: 0.05,
            ..delivery(&p.ingest_url(), "lisoloo")
        },
        messages: 60,
        recipients: 3,
        send_rate: 30.0,
        failure_rate: 0.2,
        carriers: Vec::new(),
        seed: 7,
    };
    let report = run_lisoloo(&cfg, &gateway, CancellationToken::new())
        .await
        .unwrap();
    eprintln!("{}", report.table());
    assert_eq!(report.totals.dropped_exhausted, 0);
    verify_all(&report.truth, &p.api_url(0), Duration::from_secs(150)).await;
    let truth = &report.truth.recipients;
    let delivered = truth
        .iter()
        .filter(|r| r.status == FinalStatus::Delivered)
        .count() as i64;
    let failed = truth
        .iter()
        .filter(|r| r.status == FinalStatus::Failed)
        .count() as i64;
    let messages: BTreeSet<&str> = truth.iter().map(|r| r.message_id.as_str()).collect();
    assert!(delivered > 0 && failed > 0, "the send has both outcomes");

    // The DLQ holds the poison record.
    let dlq = dlrflow_testkit::read_topic(
        &p.brokers,
        &p.dlq_topic,
        1,
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    assert_eq!(dlq.len(), 1, "one record in the DLQ");

    let admin = p.admin_url("state-0");
    let b = Browser::start(1280, 800).await.unwrap();
    let shots = target_dir().join("console");

    // Without the cookie: the login form; a wrong key is refused.
    b.goto(&format!("{admin}/console")).await.unwrap();
    b.wait_url("/console/login").await.unwrap();
    b.type_into("#key", "dlrk_wrong").await.unwrap();
    b.click(&b.find("#sign-in").await.unwrap()).await.unwrap();
    let refused = b.wait_for("#login-error").await.unwrap();
    assert_eq!(b.text_of(&refused).await.unwrap(), "Unknown key.");
    b.type_into("#key", READ_KEY).await.unwrap();
    b.click(&b.find("#sign-in").await.unwrap()).await.unwrap();
    b.wait_url("/console").await.unwrap();
    b.wait_for("#funnel").await.unwrap();

    // The funnel equals the simulator's truth.
    let n = |k: &'static str| {
        let b = &b;
        async move { b.number(&format!("#funnel [data-k={k}]")).await.unwrap() }
    };
    assert_eq!(n("recipients").await, truth.len() as i64);
    assert_eq!(n("messages").await, messages.len() as i64);
    assert_eq!(n("announced").await, truth.len() as i64);
    assert_eq!(n("delivered").await, delivered);
    assert_eq!(n("failed").await, failed);
    for k in ["queued", "processing", "sent"] {
        assert_eq!(n(k).await, 0, "{k}: every recipient is terminal");
    }
    // The carrier table equals the truth, carrier by carrier.
    let mut by_carrier: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for r in truth {
        let c = by_carrier
            .entry(r.carrier.clone().unwrap_or_else(|| "(unknown)".into()))
            .or_default();
        c.0 += 1;
        match r.status {
            FinalStatus::Delivered => c.1 += 1,
            FinalStatus::Failed => c.2 += 1,
        }
    }
    assert_eq!(
        b.find_all("#carriers tr.carrier").await.unwrap().len(),
        by_carrier.len()
    );
    for (carrier, (recipients, delivered, failed)) in &by_carrier {
        let row = format!("#carriers tr[data-carrier=\"{carrier}\"]");
        for (k, want) in [
            ("recipients", recipients),
            ("delivered", delivered),
            ("failed", failed),
            ("pending", &0),
        ] {
            assert_eq!(
                b.number(&format!("{row} [data-k={k}]")).await.unwrap(),
                *want,
                "{carrier}: {k}"
            );
        }
    }
    // Nothing stuck, no job left open, no lag; the budget the reconciler
    // used is shown by name.
    assert_eq!(b.number("#stuck [data-k=stuck-total]").await.unwrap(), 0);
    assert_eq!(b.number("#jobs [data-k=jobs-open]").await.unwrap(), 0);
    assert_eq!(b.number("#lag [data-k=lag-records]").await.unwrap(), 0);
    let budget = b.text("#budget").await.unwrap();
    assert!(budget.contains(&p.reconcile_prefix), "{budget}");
    // The reads the limiter granted in the last 60 s are the reads the
    // status server saw in that time (read before and after the page load:
    // a read in between would make them differ).
    let window = |at: chrono::DateTime<chrono::Utc>| {
        server
            .reads()
            .iter()
            .filter(|r| r.at > at - chrono::Duration::seconds(60))
            .count() as i64
    };
    let before = window(chrono::Utc::now());
    b.goto(&format!("{admin}/console")).await.unwrap();
    let used = b.number("#budget [data-k=budget-used]").await.unwrap();
    let after = window(chrono::Utc::now());
    eprintln!("e2e: budget used {used}; status server reads in the last 60 s {before}..{after}");
    // (On a loaded machine the reads may be more than 60 s old by now:
    // then both sides are 0, which the page must say too.)
    assert!(
        !server.reads().is_empty(),
        "the reconciler read the withheld messages"
    );
    assert!(
        (before..=after).contains(&used),
        "{used} vs {before}..{after}"
    );
    // The DLQ: one record, its reason, a replay button.
    assert_eq!(b.number("#dlq [data-k=dlq-total]").await.unwrap(), 1);
    let reason = b.find("#dlq-reasons [data-reason]").await.unwrap();
    let kind = b.attribute(&reason, "data-reason").await.unwrap().unwrap();
    assert_eq!(Some(kind.as_str()), dlq[0].header("error-kind"));
    assert!(!b.overflows_horizontally().await.unwrap(), "1280×800 fits");
    let shot = b
        .screenshot(&shots.join("overview-1280x800.png"))
        .await
        .unwrap();
    eprintln!("e2e: screenshot {}", shot.display());
    // The whole page in one picture, for a reader of the test's output.
    b.resize(1280, 2600).await.unwrap();
    b.screenshot(&shots.join("overview-1280-full.png"))
        .await
        .unwrap();
    b.resize(1280, 800).await.unwrap();

    // Replay from the page: the record is back on the raw topic.
    let replay = b.find("#dlq .dlq-record .replay").await.unwrap();
    b.click(&replay).await.unwrap();
    let notice = b.wait_for("#replayed").await.unwrap();
    let notice = b.text_of(&notice).await.unwrap();
    assert!(notice.contains(&p.raw_topic), "{notice}");
    let raw = dlrflow_testkit::read_topic(
        &p.brokers,
        &p.raw_topic,
        usize::MAX,
        Duration::from_secs(20),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    let from = format!("{}/{}/{}", p.dlq_topic, dlq[0].partition, dlq[0].offset);
    let back: Vec<_> = raw
        .iter()
        .filter(|r| r.header("replayed-from") == Some(from.as_str()))
        .collect();
    assert_eq!(back.len(), 1, "one record replayed from {from}");
    assert_eq!(back[0].payload, dlq[0].payload, "the same bytes went back");
    // Still poison, it goes through the state and into the DLQ again.
    let again = dlrflow_testkit::wait_for(Duration::from_secs(30), || async {
        b.goto(&format!("{admin}/console")).await.ok()?;
        (b.number("#dlq [data-k=dlq-total]").await.ok()? == 2).then_some(())
    })
    .await;
    assert!(
        again.is_some(),
        "the replayed record came back through the state"
    );

    // A replay of an offset the DLQ does not hold: refused at once, by name.
    let bad = reqwest::Client::new()
        .post(format!("{admin}/console/dlq/replay"))
        .header("cookie", format!("dlrflow_console={READ_KEY}"))
        .form(&[
            ("partition", dlq[0].partition.to_string()),
            ("offset", "999999".into()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 502);
    let text = bad.text().await.unwrap();
    assert!(text.contains("999999 is not one of them"), "{text}");
    // And without a key, nothing is replayed.
    let anon = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{admin}/console/dlq/replay"))
        .form(&[("partition", "0"), ("offset", "0")])
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 303, "sent to the login form");

    // A message whose terminal event was withheld: the page shows the
    // status read and each recipient's true status, and every event.
    let withheld = truth
        .iter()
        .find(|r| r.terminal_webhook == WebhookFate::Withheld)
        .expect("some terminal event was withheld");
    let id = &withheld.message_id;
    b.goto(&format!("{admin}/console/message?id={id}"))
        .await
        .unwrap();
    assert_eq!(b.text("#message-id").await.unwrap(), *id);
    assert!(b.number("#message [data-k=status-reads]").await.unwrap() >= 1);
    let want: BTreeMap<&str, &str> = truth
        .iter()
        .filter(|r| &r.message_id == id)
        .map(|r| (r.recipient.as_str(), r.status.as_str()))
        .collect();
    let pool = p.pool().await.unwrap();
    for (recipient, status) in &want {
        let sel = format!("#recipients details[data-recipient=\"{recipient}\"]");
        assert_eq!(
            b.text(&format!("{sel} [data-k=status]")).await.unwrap(),
            *status,
            "{recipient}"
        );
        let events = b.find_all(&format!("{sel} tr.event")).await.unwrap().len() as i64;
        let stored: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM delivery_events WHERE message_id = $1 AND recipient = $2",
        )
        .bind(id)
        .bind(recipient)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(events, stored, "{recipient}: every stored event is shown");
    }
    let reads = b
        .find_all("#recipients tr.event[data-provider=status_api]")
        .await
        .unwrap();
    assert!(!reads.is_empty(), "the status read is in the timeline");
    assert!(!b.overflows_horizontally().await.unwrap(), "1280×800 fits");
    b.screenshot(&shots.join("message-1280x800.png"))
        .await
        .unwrap();

    // Duplicates dropped: a message the gateway sent copies of shows them.
    if report.totals.duplicates > 0 {
        let (dup_id, copies): (String, i64) = sqlx::query_as(
            "SELECT message_id, sum(copies)::int8 FROM dropped_copies \
              WHERE recipient <> '' GROUP BY message_id ORDER BY 2 DESC LIMIT 1",
        )
        .fetch_one(&pool)
        .await
        .expect("dropped copies are counted");
        b.goto(&format!("{admin}/console/message?id={dup_id}"))
            .await
            .unwrap();
        let mut shown = 0;
        for e in b.find_all("#recipients [data-k=duplicates]").await.unwrap() {
            shown += b.text_of(&e).await.unwrap().parse::<i64>().unwrap();
        }
        assert_eq!(shown, copies, "{dup_id}: duplicates dropped");
    }

    // On a phone: nothing wider than the screen.
    b.resize(390, 844).await.unwrap();
    b.goto(&format!("{admin}/console")).await.unwrap();
    assert!(!b.overflows_horizontally().await.unwrap(), "390×844 fits");
    b.screenshot(&shots.join("overview-390x844.png"))
        .await
        .unwrap();
    b.goto(&format!("{admin}/console/message?id={id}"))
        .await
        .unwrap();
    assert!(!b.overflows_horizontally().await.unwrap(), "390×844 fits");
    b.screenshot(&shots.join("message-390x844.png"))
        .await
        .unwrap();

    // Signed out, the page is gone again.
    b.click(&b.find("header form.inline button").await.unwrap())
        .await
        .unwrap();
    b.wait_for("#sign-in").await.unwrap();
    b.goto(&format!("{admin}/console")).await.unwrap();
    b.wait_url("/console/login").await.unwrap();

    // Never cached, framed or scripted.
    let login = reqwest::get(format!("{admin}/console/login"))
        .await
        .unwrap();
    let h = login.headers();
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("frame-ancestors 'none'"));

    // Never on the public listener.
    let public = reqwest::get(format!("{}/console", p.api_url(0)))
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    drop(b);
    pool.close().await;
    p.finish().await;
    server.shutdown().await;
}
