//! Property tests of `merge`.
//!
//! Generator choice: the convergence property is checked on *consistent*
//! histories, i.e. event sets with at most one kind of terminal status. Such a
//! set must reach the exact same `RecipientState` under every permutation with
//! any duplicates. Sets holding both `delivered` and `failed` are checked
//! separately: by design (DESIGN.md rule 4) the second terminal status is not
//! applied but flagged, so which one stays depends on arrival order; what must
//! hold is that every order ends flagged as a conflict, and that the status
//! API's answer then yields the same status, terminal times and error fields
//! whatever the order was.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use dlrflow_events::{
    merge, merge_message, DeliveryUpdate, MergeOutcome, MessageUpdate, Provider, RecipientState,
    ReconcileReason, Status,
};
use proptest::prelude::*;
use proptest::sample::Index;

fn at(ms: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 27, 10, 15, 0).unwrap() + TimeDelta::milliseconds(ms)
}

#[derive(Debug, Clone)]
struct Ev {
    status: Status,
    occurred_ms: i64,
    own_time_ms: i64,
    carrier: Option<&'static str>,
    segments: Option<u32>,
    error: (Option<&'static str>, Option<&'static str>, Option<bool>),
}

fn ev_strategy(statuses: Vec<Status>) -> impl Strategy<Value = Ev> {
    (
        proptest::sample::select(statuses),
        0i64..20_000,
        0i64..20_000,
        proptest::option::of(proptest::sample::select(vec![
            "vodacom_drc",
            "airtel_drc",
            "orange",
        ])),
        proptest::option::of(1u32..4),
        (
            proptest::option::of(proptest::sample::select(vec!["1502", "1503"])),
            proptest::option::of(proptest::sample::select(vec![
                "Number unreachable",
                "Rejected",
            ])),
            proptest::option::of(any::<bool>()),
        ),
    )
        .prop_map(
            |(status, occurred_ms, own_time_ms, carrier, segments, error)| Ev {
                status,
                occurred_ms,
                own_time_ms,
                carrier,
                segments,
                error: if status == Status::Failed {
                    error
                } else {
                    (None, None, None)
                },
            },
        )
}

fn to_update(i: usize, e: &Ev) -> DeliveryUpdate {
    let own = Some(at(e.own_time_ms));
    DeliveryUpdate {
        provider: if i % 2 == 0 {
            Provider::Lisoloo
        } else {
            Provider::Arpoone
        },
        source: "s".into(),
        message_id: "m".into(),
        recipient: "+243998857000".into(),
        status: e.status,
        occurred_at: at(e.occurred_ms),
        processing_at: (e.status == Status::Processing).then_some(own).flatten(),
        sent_at: (e.status == Status::Sent).then_some(own).flatten(),
        delivered_at: (e.status == Status::Delivered).then_some(own).flatten(),
        failed_at: (e.status == Status::Failed).then_some(own).flatten(),
        carrier: e.carrier.map(str::to_owned),
        error_code: e.error.0.map(str::to_owned),
        error_message: e.error.1.map(str::to_owned),
        retryable: e.error.2,
        segments: e.segments,
        custom_payload: None,
        dedupe_key: format!("k{i}"),
        authoritative: false,
    }
}

/// Applies `order` (indices into `updates`) and returns the final state, plus
/// whether any merge reported a conflict.
fn fold(updates: &[DeliveryUpdate], order: &[usize]) -> (RecipientState, bool) {
    let mut state: Option<RecipientState> = None;
    let mut conflict = false;
    for &i in order {
        let out = merge(state.as_ref(), &updates[i]);
        conflict |= matches!(out, MergeOutcome::Conflict { .. });
        if let Some(s) = out.into_state() {
            state = Some(s);
        }
    }
    (state.expect("at least one update"), conflict)
}

/// A consistent history: queued/processing/sent plus at most one terminal kind.
fn consistent() -> impl Strategy<Value = Vec<Ev>> {
    prop_oneof![
        Just(vec![Status::Queued, Status::Processing, Status::Sent]),
        Just(vec![
            Status::Queued,
            Status::Processing,
            Status::Sent,
            Status::Delivered
        ]),
        Just(vec![Status::Processing, Status::Sent, Status::Failed]),
        Just(vec![Status::Delivered]),
    ]
    .prop_flat_map(|statuses| proptest::collection::vec(ev_strategy(statuses), 1..9))
}

/// A set with both terminal statuses (at least one of each).
fn conflicting() -> impl Strategy<Value = Vec<Ev>> {
    let all = Status::ALL.to_vec();
    (
        ev_strategy(vec![Status::Delivered]),
        ev_strategy(vec![Status::Failed]),
        proptest::collection::vec(ev_strategy(all), 0..7),
    )
        .prop_map(|(d, f, mut rest)| {
            rest.push(d);
            rest.push(f);
            rest
        })
}

/// Each index once, plus `dups` extra copies, in a shuffled order.
fn arrival(n: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(any::<Index>(), 0..n + 1).prop_flat_map(move |dups| {
        let mut order: Vec<usize> = (0..n).collect();
        order.extend(dups.iter().map(|d| d.index(n)));
        Just(order).prop_shuffle()
    })
}

fn authoritative_strategy() -> impl Strategy<Value = DeliveryUpdate> {
    (
        proptest::sample::select(Status::ALL.to_vec()),
        0i64..20_000,
        20_000i64..40_000,
    )
        .prop_map(|(status, own, fetched)| {
            let own = Some(at(own));
            DeliveryUpdate {
                provider: Provider::StatusApi,
                source: "s".into(),
                message_id: "m".into(),
                recipient: "+243998857000".into(),
                status,
                occurred_at: at(fetched),
                processing_at: None,
                sent_at: (status.rank() >= 2).then_some(own).flatten(),
                delivered_at: (status == Status::Delivered).then_some(own).flatten(),
                failed_at: (status == Status::Failed).then_some(own).flatten(),
                carrier: Some("api_carrier".into()),
                error_code: (status == Status::Failed).then(|| "9".into()),
                error_message: (status == Status::Failed).then(|| "api says failed".into()),
                retryable: (status == Status::Failed).then_some(true),
                segments: Some(2),
                custom_payload: None,
                dedupe_key: "api".into(),
                authoritative: true,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any permutation, with any duplicates, of a consistent history reaches the
    /// same state as the in-order sequence, and never reports a conflict.
    #[test]
    fn permutations_converge(
        (evs, order) in consistent().prop_flat_map(|evs| { let n = evs.len(); (Just(evs), arrival(n)) })
    ) {
        let updates: Vec<_> = evs.iter().enumerate().map(|(i, e)| to_update(i, e)).collect();
        let mut in_order: Vec<usize> = (0..updates.len()).collect();
        in_order.sort_by_key(|&i| (updates[i].status.rank(), updates[i].occurred_at));
        let (want, c1) = fold(&updates, &in_order);
        let (got, c2) = fold(&updates, &order);
        prop_assert!(!c1 && !c2);
        prop_assert_eq!(&got, &want);
        // The state's status is the highest one seen; last_event_at the latest.
        let top = updates.iter().map(|u| u.status).max_by_key(|s| s.rank()).unwrap();
        prop_assert_eq!(got.status, top);
        prop_assert_eq!(got.last_event_at, updates.iter().map(|u| u.occurred_at).max().unwrap());
        prop_assert!(!got.needs_reconcile);
    }

    /// Merging an update a second time (right away) never changes anything,
    /// whatever state it lands on, authoritative or not.
    #[test]
    fn merge_is_idempotent(
        (evs, order) in conflicting().prop_flat_map(|evs| { let n = evs.len(); (Just(evs), arrival(n)) }),
        pick in any::<Index>(),
        answer in authoritative_strategy(),
    ) {
        let updates: Vec<_> = evs.iter().enumerate().map(|(i, e)| to_update(i, e)).collect();
        let prefix = &order[..pick.index(order.len())];
        let mut state: Option<RecipientState> = None;
        for &i in prefix {
            if let Some(s) = merge(state.as_ref(), &updates[i]).into_state() { state = Some(s); }
        }
        for u in updates.iter().chain(std::iter::once(&answer)) {
            let once = merge(state.as_ref(), u).into_state().or_else(|| state.clone()).unwrap();
            prop_assert_eq!(merge(Some(&once), u), MergeOutcome::Unchanged);
        }
    }

    /// An authoritative update at or above the current rank always wins:
    /// whatever the state (including a flagged conflict), the result is the
    /// API's status and fields, unflagged. A lower one is a stale read.
    #[test]
    fn authoritative_always_wins(
        (evs, order) in prop_oneof![consistent(), conflicting()]
            .prop_flat_map(|evs| { let n = evs.len(); (Just(evs), arrival(n)) }),
        answer in authoritative_strategy(),
    ) {
        let updates: Vec<_> = evs.iter().enumerate().map(|(i, e)| to_update(i, e)).collect();
        let (before, _) = fold(&updates, &order);
        let after = merge(Some(&before), &answer).into_state().unwrap_or(before.clone());
        if answer.status.rank() < before.status.rank() {
            // A stale read (below what webhooks already proved) never moves
            // the status back and settles nothing.
            prop_assert_eq!(after.status, before.status);
            prop_assert_eq!(after.needs_reconcile, before.needs_reconcile);
            prop_assert_eq!(after.delivered_at, before.delivered_at);
            prop_assert_eq!(after.failed_at, before.failed_at);
            return Ok(());
        }
        prop_assert_eq!(after.status, answer.status);
        prop_assert!(!after.needs_reconcile);
        prop_assert_eq!(after.reconcile_reason, None);
        prop_assert_eq!(&after.carrier, &answer.carrier);
        prop_assert_eq!(after.segments, answer.segments);
        prop_assert_eq!(after.delivered_at, answer.delivered_at);
        prop_assert_eq!(after.failed_at, answer.failed_at);
        prop_assert_eq!(&after.error_code, &answer.error_code);
        prop_assert_eq!(&after.error_message, &answer.error_message);
        prop_assert_eq!(after.retryable, answer.retryable);
        if answer.sent_at.is_some() { prop_assert_eq!(after.sent_at, answer.sent_at); }
        prop_assert_eq!(after.last_event_at, before.last_event_at.max(answer.occurred_at));
    }

    /// Both terminal statuses in one set: every arrival order ends flagged as a
    /// conflict; after the API's answer all orders agree on what it decides.
    #[test]
    fn conflicting_sets_flag_then_resolve(
        (evs, o1, o2) in conflicting().prop_flat_map(|evs| { let n = evs.len(); (Just(evs), arrival(n), arrival(n)) }),
        answer in authoritative_strategy().prop_filter("a terminal answer", |a| a.status.is_terminal()),
    ) {
        let updates: Vec<_> = evs.iter().enumerate().map(|(i, e)| to_update(i, e)).collect();
        let (a, ca) = fold(&updates, &o1);
        let (b, cb) = fold(&updates, &o2);
        for (s, c) in [(&a, ca), (&b, cb)] {
            prop_assert!(c);
            prop_assert!(s.status.is_terminal());
            prop_assert!(s.needs_reconcile);
            prop_assert_eq!(s.reconcile_reason, Some(ReconcileReason::Conflict));
        }
        let ra = merge(Some(&a), &answer).into_state().unwrap_or(a.clone());
        let rb = merge(Some(&b), &answer).into_state().unwrap_or(b.clone());
        let decided = |s: &RecipientState| (
            s.status, s.delivered_at, s.failed_at, s.error_code.clone(),
            s.error_message.clone(), s.retryable, s.carrier.clone(), s.segments,
            s.needs_reconcile, s.processing_at,
        );
        prop_assert_eq!(decided(&ra), decided(&rb));
    }

    /// `merge_message` converges under any order and duplicates, and is idempotent.
    #[test]
    fn message_merge_converges(
        (items, order) in proptest::collection::vec(
            (proptest::option::of(1u32..5), proptest::option::of(0u32..100), 0i64..10_000,
             proptest::option::of(proptest::sample::select(vec!["USD", "EUR"]))),
            1..6,
        ).prop_flat_map(|v| { let n = v.len(); (Just(v), arrival(n)) })
    ) {
        let ups: Vec<MessageUpdate> = items.iter().enumerate().map(|(i, (r, cents, ms, cur))| MessageUpdate {
            source: "s".into(),
            message_id: "m".into(),
            total_recipients: *r,
            total_messages: *r,
            total_cost: cents.map(|c| f64::from(c) / 100.0),
            currency: cur.map(str::to_owned),
            scheduled_at: None,
            occurred_at: at(*ms),
            dedupe_key: format!("q{i}"),
        }).collect();
        let run = |order: &[usize]| {
            let mut s = None;
            for &i in order {
                if let Some(n) = merge_message(s.as_ref(), &ups[i]) { s = Some(n); }
            }
            s.unwrap()
        };
        let want = run(&(0..ups.len()).collect::<Vec<_>>());
        let got = run(&order);
        prop_assert_eq!(&got, &want);
        for u in &ups {
            let once = merge_message(Some(&got), u).unwrap_or(got.clone());
            prop_assert_eq!(merge_message(Some(&once), u), None);
        }
    }
}
