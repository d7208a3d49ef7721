//! The carrier rollup kept by the write path: crafted transitions (a
//! conflict the status API resolves, a status-API-only terminal later
//! confirmed by a late webhook, a status-API-only failure, duplicates, a
//! late `sms.queued` that moves recipients to an earlier hour) against a real
//! PostgreSQL schema. After every step the rollup equals a from-scratch
//! computation over `recipient_state` (written here independently of
//! `dlrflow_state::carriers`), the same events in another order give the same
//! rollup, the migration's backfill gives it too, and the report's figures
//! are the ones worked out by hand.

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use common::pg_base;
use dlrflow_events::{DeliveryUpdate, Event, MessageUpdate, Provider, Status};
use dlrflow_runtime::settings::PostgresSettings;
use dlrflow_state::carriers::{report, CarrierReport, Filter};
use dlrflow_state::{apply_batch, migrate, Incoming};
use sqlx::{PgPool, Row};

fn t(h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 27, h, m, s).single().unwrap()
}

/// One recipient update; `api` makes it a status-API answer.
#[allow(clippy::too_many_arguments)]
fn upd(
    key: &str,
    source: &str,
    msg: &str,
    rcp: &str,
    carrier: &str,
    status: Status,
    at: DateTime<Utc>,
    sent: Option<DateTime<Utc>>,
    code: Option<&str>,
    api: bool,
) -> Event {
    Event::Recipient(DeliveryUpdate {
        provider: if api {
            Provider::StatusApi
        } else {
            Provider::Lisoloo
        },
        source: source.into(),
        message_id: msg.into(),
        recipient: rcp.into(),
        status,
        occurred_at: at,
        processing_at: (status == Status::Processing).then_some(at),
        sent_at: if status == Status::Sent {
            Some(at)
        } else {
            sent
        },
        delivered_at: (status == Status::Delivered).then_some(at),
        failed_at: (status == Status::Failed).then_some(at),
        carrier: Some(carrier.into()),
        error_code: code.map(str::to_owned),
        error_message: None,
        retryable: None,
        segments: None,
        custom_payload: None,
        dedupe_key: key.into(),
        authoritative: api,
    })
}

fn queued(key: &str, source: &str, msg: &str, at: DateTime<Utc>) -> Event {
    Event::Message(MessageUpdate {
        source: source.into(),
        message_id: msg.into(),
        total_recipients: Some(5),
        total_messages: Some(5),
        total_cost: None,
        currency: None,
        scheduled_at: None,
        occurred_at: at,
        dedupe_key: key.into(),
    })
}

/// The steps, in the order of the live run. m-1 (source s1) is queued at
/// 09:59:00 but that event arrives last; m-2 (source s2) has none.
fn steps() -> Vec<Vec<Event>> {
    use Status::*;
    let s = "s1";
    vec![
        // r1 vodacom: webhooks all the way to delivered.
        vec![
            upd(
                "r1-p",
                s,
                "m-1",
                "r1",
                "vodacom",
                Processing,
                t(10, 0, 1),
                None,
                None,
                false,
            ),
            upd(
                "r1-s",
                s,
                "m-1",
                "r1",
                "vodacom",
                Sent,
                t(10, 0, 2),
                None,
                None,
                false,
            ),
            upd(
                "r1-d",
                s,
                "m-1",
                "r1",
                "vodacom",
                Delivered,
                t(10, 0, 5),
                None,
                None,
                false,
            ),
            // r2 airtel: failed by webhook.
            upd(
                "r2-s",
                s,
                "m-1",
                "r2",
                "airtel",
                Sent,
                t(10, 0, 2),
                None,
                None,
                false,
            ),
            upd(
                "r2-f",
                s,
                "m-1",
                "r2",
                "airtel",
                Failed,
                t(10, 0, 12),
                None,
                Some("1502"),
                false,
            ),
        ],
        // r3 vodacom: delivered and failed by webhook: a conflict.
        vec![
            upd(
                "r3-s",
                s,
                "m-1",
                "r3",
                "vodacom",
                Sent,
                t(10, 0, 3),
                None,
                None,
                false,
            ),
            upd(
                "r3-d",
                s,
                "m-1",
                "r3",
                "vodacom",
                Delivered,
                t(10, 0, 6),
                None,
                None,
                false,
            ),
            upd(
                "r3-f",
                s,
                "m-1",
                "r3",
                "vodacom",
                Failed,
                t(10, 0, 7),
                None,
                Some("1503"),
                false,
            ),
            upd(
                "r4-s",
                s,
                "m-1",
                "r4",
                "airtel",
                Sent,
                t(10, 0, 2),
                None,
                None,
                false,
            ),
            upd(
                "r5-s",
                s,
                "m-1",
                "r5",
                "orange",
                Sent,
                t(10, 0, 4),
                None,
                None,
                false,
            ),
        ],
        // The status API: r3 failed (resolves the conflict), r4 delivered
        // (no webhook said so: status-API only), r5 failed (the same).
        vec![
            upd(
                "api-r3",
                s,
                "m-1",
                "r3",
                "vodacom",
                Failed,
                t(10, 0, 7),
                Some(t(10, 0, 3)),
                Some("1503"),
                true,
            ),
            upd(
                "api-r4",
                s,
                "m-1",
                "r4",
                "airtel",
                Delivered,
                t(10, 0, 9),
                Some(t(10, 0, 2)),
                None,
                true,
            ),
            upd(
                "api-r5",
                s,
                "m-1",
                "r5",
                "orange",
                Failed,
                t(10, 0, 20),
                Some(t(10, 0, 4)),
                Some("1510"),
                true,
            ),
            // m-2 of another source.
            upd(
                "r6-d",
                "s2",
                "m-2",
                "r6",
                "vodacom",
                Delivered,
                t(11, 30, 0),
                None,
                None,
                false,
            ),
        ],
        // Duplicates of everything so far change nothing.
        vec![
            upd(
                "r1-d",
                s,
                "m-1",
                "r1",
                "vodacom",
                Delivered,
                t(10, 0, 5),
                None,
                None,
                false,
            ),
            upd(
                "api-r4",
                s,
                "m-1",
                "r4",
                "airtel",
                Delivered,
                t(10, 0, 9),
                Some(t(10, 0, 2)),
                None,
                true,
            ),
            upd(
                "r3-f",
                s,
                "m-1",
                "r3",
                "vodacom",
                Failed,
                t(10, 0, 7),
                None,
                Some("1503"),
                false,
            ),
        ],
        // r4's delivered webhook comes late, after the status read.
        vec![upd(
            "r4-d",
            s,
            "m-1",
            "r4",
            "airtel",
            Delivered,
            t(10, 0, 9),
            None,
            None,
            false,
        )],
        // m-1's sms.queued comes last: its recipients move to 09:00.
        vec![queued("m1-q", s, "m-1", t(9, 59, 0))],
    ]
}

async fn apply(pool: &PgPool, events: &[Event]) {
    let items: Vec<Incoming<'_>> = events
        .iter()
        .map(|e| Incoming {
            event: e,
            provider: match e {
                Event::Recipient(u) if u.authoritative => "status_api",
                _ => "lisoloo",
            },
            raw: None,
            received_at: None,
            traceparent: None,
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    apply_batch(&mut tx, &items).await.unwrap();
    tx.commit().await.unwrap();
}

type Rollup = BTreeMap<(String, DateTime<Utc>, String, String, String, i16), i64>;

async fn rollup(pool: &PgPool) -> Rollup {
    sqlx::query_as::<_, (String, DateTime<Utc>, String, String, String, i16, i64)>(
        "SELECT source, hour, carrier, error_code, metric, bin, n FROM carrier_rollup WHERE n <> 0",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(s, h, c, e, m, b, n)| ((s, h, c, e, m, b), n))
    .collect()
}

/// The documented bin, written independently: 0 under 1 ms, else
/// floor(4 log2 ms) + 1, at most 127.
fn bin(from: DateTime<Utc>, to: DateTime<Utc>) -> i16 {
    let ms = (to - from).num_milliseconds();
    if ms < 1 {
        return 0;
    }
    ((4.0 * (ms as f64).log2()).floor() as i16 + 1).min(127)
}

/// The rollup computed from scratch over every recipient row.
async fn from_scratch(pool: &PgPool) -> Rollup {
    let rows = sqlx::query(
        "SELECT r.source, r.status, r.carrier, r.error_code, r.queued_at, r.processing_at, r.sent_at, \
                r.delivered_at, r.failed_at, r.last_event_at, r.webhook_terminals, m.queued_at AS mq \
         FROM recipient_state r JOIN messages m USING (message_id)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out = Rollup::new();
    for r in rows {
        let ts = |c: &str| r.get::<Option<DateTime<Utc>>, _>(c);
        let status: String = r.get("status");
        let queued = ts("mq").or(ts("queued_at"));
        let basis = queued
            .or([
                ts("processing_at"),
                ts("sent_at"),
                ts("delivered_at"),
                ts("failed_at"),
            ]
            .into_iter()
            .flatten()
            .min())
            .unwrap_or(r.get("last_event_at"));
        let hour = Utc
            .timestamp_opt(basis.timestamp() - basis.timestamp().rem_euclid(3600), 0)
            .unwrap();
        let code = if status == "failed" {
            r.get::<Option<String>, _>("error_code").unwrap_or_default()
        } else {
            String::new()
        };
        let carrier = r.get::<Option<String>, _>("carrier").unwrap_or_default();
        let source: String = r.get("source");
        let mut add = |metric: &str, b: i16| {
            *out.entry((
                source.clone(),
                hour,
                carrier.clone(),
                code.clone(),
                metric.to_owned(),
                b,
            ))
            .or_default() += 1;
        };
        add("recipients", 0);
        let (terminal_at, bit) = match status.as_str() {
            "delivered" => (ts("delivered_at"), 1),
            "failed" => (ts("failed_at"), 2),
            _ => continue,
        };
        add(&status, 0);
        if r.get::<i16, _>("webhook_terminals") & bit == 0 {
            add("status_api_only", 0);
        }
        if let (true, Some(s), Some(d)) = (status == "delivered", ts("sent_at"), ts("delivered_at"))
        {
            add("sent_to_delivered", bin(s, d));
        }
        if let (Some(q), Some(e)) = (queued, terminal_at) {
            add("queued_to_terminal", bin(q, e));
        }
    }
    out
}

async fn schema(tag: &str) -> (PgPool, String) {
    let schema = dlrflow_testkit::unique_name(tag).replace('-', "_");
    let cfg = PostgresSettings {
        schema: Some(schema.clone()),
        ..PostgresSettings::with_url(pg_base())
    };
    let pool = cfg.connect().await.unwrap();
    migrate(&pool).await.unwrap();
    (pool, schema)
}

async fn drop(pool: PgPool, schema: &str) {
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

fn carrier<'a>(r: &'a CarrierReport, name: &str) -> &'a dlrflow_state::carriers::CarrierStats {
    r.carriers
        .iter()
        .find(|c| c.carrier.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no carrier {name} in {r:#?}"))
}

fn edge(from: DateTime<Utc>, to: DateTime<Utc>) -> Option<u64> {
    // The upper edge of the bin: ceil(2^(bin/4)) ms.
    Some(2f64.powf(f64::from(bin(from, to)) / 4.0).ceil() as u64)
}

#[tokio::test]
async fn the_rollup_equals_a_from_scratch_computation_through_conflicts_and_overrides() {
    dlrflow_runtime::telemetry::init_test_logs();
    let (pool, name) = schema("carriers").await;
    let steps = steps();
    let all = Filter::default();
    for (i, step) in steps.iter().enumerate() {
        apply(&pool, step).await;
        let (got, want) = (rollup(&pool).await, from_scratch(&pool).await);
        assert!(!got.is_empty(), "step {i}: the rollup has rows");
        assert_eq!(got, want, "step {i}: rollup vs from scratch");
        if i == 2 {
            // After the status read, before r4's late webhook: r4 and r5
            // are terminal from the status API only; r3's failed was also
            // reported by a webhook (the conflict), so it is not.
            let r = report(&pool, &all).await.unwrap();
            assert_eq!(carrier(&r, "airtel").stats.status_api_only, 1);
            assert_eq!(carrier(&r, "orange").stats.status_api_only, 1);
            assert_eq!(carrier(&r, "vodacom").stats.status_api_only, 0);
            // Before m-1's sms.queued, no queued → terminal, and m-1 is at 10:00.
            assert_eq!(carrier(&r, "vodacom").stats.queued_to_terminal.count, 0);
            let ten = Filter::parse(
                None,
                Some("2026-05-27T10:00:00Z"),
                Some("2026-05-27T11:00:00Z"),
            )
            .unwrap();
            assert_eq!(
                report(&pool, &ten)
                    .await
                    .unwrap()
                    .carriers
                    .iter()
                    .map(|c| c.stats.recipients)
                    .sum::<u64>(),
                5
            );
        }
    }
    let r = report(&pool, &all).await.unwrap();
    eprintln!("{}", r.table());
    let v = carrier(&r, "vodacom");
    assert_eq!(
        (
            v.stats.recipients,
            v.stats.delivered,
            v.stats.failed,
            v.stats.pending
        ),
        (3, 2, 1, 0)
    );
    assert_eq!(v.stats.delivery_rate, Some(2.0 / 3.0));
    assert_eq!(v.stats.status_api_only, 0);
    assert_eq!(v.top_error_codes.len(), 1);
    assert_eq!(
        (
            v.top_error_codes[0].name.as_str(),
            v.top_error_codes[0].count
        ),
        ("1503", 1)
    );
    // r1 only: r6 has no sent time.
    assert_eq!(v.stats.sent_to_delivered.count, 1);
    assert_eq!(
        v.stats.sent_to_delivered.p50_ms,
        edge(t(10, 0, 2), t(10, 0, 5))
    );
    // r1 (65 s) and r3 (67 s): nearest rank, p50 is r1's, p95 r3's.
    assert_eq!(v.stats.queued_to_terminal.count, 2);
    assert_eq!(
        v.stats.queued_to_terminal.p50_ms,
        edge(t(9, 59, 0), t(10, 0, 5))
    );
    assert_eq!(
        v.stats.queued_to_terminal.p95_ms,
        edge(t(9, 59, 0), t(10, 0, 7))
    );
    let a = carrier(&r, "airtel");
    assert_eq!(
        (a.stats.recipients, a.stats.delivered, a.stats.failed),
        (2, 1, 1)
    );
    // r4's late webhook: reported, not missing.
    assert_eq!(a.stats.status_api_only, 0);
    assert_eq!(
        a.stats.sent_to_delivered.p50_ms,
        edge(t(10, 0, 2), t(10, 0, 9))
    );
    let o = carrier(&r, "orange");
    assert_eq!(
        (o.stats.recipients, o.stats.failed, o.stats.status_api_only),
        (1, 1, 1)
    );
    assert_eq!(o.stats.status_api_only_share, Some(1.0));
    let codes: Vec<(&str, u64, u64, &str)> = r
        .error_codes
        .iter()
        .map(|e| {
            (
                e.error_code.as_str(),
                e.stats.failed,
                e.stats.status_api_only,
                e.top_carriers[0].name.as_str(),
            )
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            ("1502", 1, 0, "airtel"),
            ("1503", 1, 0, "vodacom"),
            ("1510", 1, 1, "orange")
        ]
    );
    // from / to filter on the basis hour: m-1 moved to 09:00 with its
    // queued time; m-2 (s2) stays at 11:00.
    let nine = Filter::parse(
        None,
        Some("2026-05-27T09:00:00Z"),
        Some("2026-05-27T10:00:00Z"),
    )
    .unwrap();
    let n: u64 = report(&pool, &nine)
        .await
        .unwrap()
        .carriers
        .iter()
        .map(|c| c.stats.recipients)
        .sum();
    assert_eq!(n, 5);
    let ten = Filter::parse(
        None,
        Some("2026-05-27T10:00:00Z"),
        Some("2026-05-27T11:00:00Z"),
    )
    .unwrap();
    assert!(report(&pool, &ten).await.unwrap().carriers.is_empty());
    let s2 = Filter::parse(Some("s2"), None, None).unwrap();
    let r2 = report(&pool, &s2).await.unwrap();
    assert_eq!(r2.carriers.len(), 1);
    assert_eq!(r2.carriers[0].stats.delivered, 1);

    // The migration's backfill (0006) builds the same rollup and webhook
    // bits from a state written before it.
    let live = rollup(&pool).await;
    sqlx::query("TRUNCATE carrier_rollup")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE recipient_state SET webhook_terminals = 0")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(include_str!("../migrations/0006_carrier_rollup.sql"))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        rollup(&pool).await,
        live,
        "the backfill equals the write path"
    );

    // The same events in reverse order (each step reversed, the steps
    // reversed too, duplicates included) in another schema: the same rollup.
    let (other, other_name) = schema("carriers_rev").await;
    for step in steps.iter().rev() {
        let rev: Vec<Event> = step.iter().rev().cloned().collect();
        apply(&other, &rev).await;
    }
    assert_eq!(rollup(&other).await, from_scratch(&other).await);
    assert_eq!(
        rollup(&other).await,
        rollup(&pool).await,
        "order-independent"
    );
    drop(other, &other_name).await;
    drop(pool, &name).await;
}
