//! Table-driven tests of `merge` and `merge_message`.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use dlrflow_events::{
    merge, merge_message, DeliveryUpdate, MergeOutcome, MessageUpdate, Provider, RecipientState,
    ReconcileReason, Status,
};

fn at(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 5, 27, 10, 15, 0).unwrap() + TimeDelta::seconds(secs)
}

/// A Lisoloo-like update of `status` at second `secs`, carrying its own time.
fn upd(key: &str, status: Status, secs: i64) -> DeliveryUpdate {
    let t = Some(at(secs));
    DeliveryUpdate {
        provider: Provider::Lisoloo,
        source: "s".into(),
        message_id: "m".into(),
        recipient: "+1".into(),
        status,
        occurred_at: at(secs),
        processing_at: if status == Status::Processing {
            t
        } else {
            None
        },
        sent_at: if status == Status::Sent { t } else { None },
        delivered_at: if status == Status::Delivered { t } else { None },
        failed_at: if status == Status::Failed { t } else { None },
        carrier: Some("vodacom_drc".into()),
        error_code: (status == Status::Failed).then(|| "1502".into()),
        error_message: (status == Status::Failed).then(|| "Number unreachable".into()),
        retryable: (status == Status::Failed).then_some(false),
        segments: (status == Status::Delivered).then_some(1),
        custom_payload: None,
        dedupe_key: key.into(),
        authoritative: false,
    }
}

fn auth(status: Status, secs: i64) -> DeliveryUpdate {
    DeliveryUpdate {
        provider: Provider::StatusApi,
        authoritative: true,
        ..upd("api", status, secs)
    }
}

/// Applies updates in order, returning the final state and each outcome's tag.
fn run(updates: &[DeliveryUpdate]) -> (Option<RecipientState>, Vec<&'static str>) {
    let mut state: Option<RecipientState> = None;
    let mut tags = vec![];
    for u in updates {
        let out = merge(state.as_ref(), u);
        tags.push(match &out {
            MergeOutcome::Unchanged => "unchanged",
            MergeOutcome::Applied { .. } => "applied",
            MergeOutcome::Conflict { .. } => "conflict",
        });
        if let Some(s) = out.into_state() {
            state = Some(s);
        }
    }
    (state, tags)
}

/// (name, updates, outcome tags, final status, needs_reconcile)
type Scenario = (
    &'static str,
    Vec<DeliveryUpdate>,
    Vec<&'static str>,
    Status,
    bool,
);

#[test]
fn scenarios() {
    use Status::*;
    // (name, updates, outcome tags, final status, needs_reconcile)
    let table: Vec<Scenario> = vec![
        (
            "in order",
            vec![
                upd("a", Processing, 1),
                upd("b", Sent, 3),
                upd("c", Delivered, 8),
            ],
            vec!["applied"; 3],
            Delivered,
            false,
        ),
        (
            "duplicate",
            vec![upd("a", Sent, 3), upd("a", Sent, 3)],
            vec!["applied", "unchanged"],
            Sent,
            false,
        ),
        (
            "late sent fills",
            vec![upd("c", Delivered, 8), upd("b", Sent, 3)],
            vec!["applied", "applied"],
            Delivered,
            false,
        ),
        (
            "late sent twice",
            vec![upd("c", Delivered, 8), upd("b", Sent, 3), upd("b", Sent, 3)],
            vec!["applied", "applied", "unchanged"],
            Delivered,
            false,
        ),
        (
            "lower event with nothing new",
            vec![
                upd("b", Sent, 3),
                upd("c", Delivered, 8),
                upd("b2", Sent, 4),
            ],
            vec!["applied", "applied", "unchanged"],
            Delivered,
            false,
        ),
        (
            "conflict",
            vec![upd("c", Delivered, 8), upd("f", Failed, 5)],
            vec!["applied", "conflict"],
            Delivered,
            true,
        ),
        (
            "conflict reversed",
            vec![upd("f", Failed, 5), upd("c", Delivered, 8)],
            vec!["applied", "conflict"],
            Failed,
            true,
        ),
        (
            "conflict once",
            vec![
                upd("c", Delivered, 8),
                upd("f", Failed, 5),
                upd("f", Failed, 5),
                upd("f2", Failed, 9),
            ],
            vec!["applied", "conflict", "unchanged", "unchanged"],
            Delivered,
            true,
        ),
        (
            "conflict then fill",
            vec![
                upd("c", Delivered, 8),
                upd("f", Failed, 5),
                upd("b", Sent, 3),
            ],
            vec!["applied", "conflict", "applied"],
            Delivered,
            true,
        ),
        (
            "authoritative resolves",
            vec![
                upd("c", Delivered, 8),
                upd("f", Failed, 5),
                auth(Failed, 60),
            ],
            vec!["applied", "conflict", "applied"],
            Failed,
            false,
        ),
        (
            "authoritative twice",
            vec![
                upd("c", Delivered, 8),
                auth(Delivered, 60),
                auth(Delivered, 60),
            ],
            vec!["applied", "applied", "unchanged"],
            Delivered,
            false,
        ),
        (
            "a stale authoritative answer never moves down",
            vec![upd("c", Delivered, 8), auth(Processing, 60)],
            vec!["applied", "applied"],
            Delivered,
            false,
        ),
        (
            "a stale authoritative answer leaves a conflict flagged",
            vec![upd("c", Delivered, 8), upd("f", Failed, 5), auth(Sent, 60)],
            vec!["applied", "conflict", "applied"],
            Delivered,
            true,
        ),
        (
            "authoritative first",
            vec![auth(Queued, 60), upd("a", Processing, 1)],
            vec!["applied", "applied"],
            Processing,
            false,
        ),
    ];
    for (name, updates, tags, status, flagged) in table {
        let (state, got) = run(&updates);
        let state = state.unwrap();
        assert_eq!(got, tags, "{name}");
        assert_eq!(state.status, status, "{name}");
        assert_eq!(state.needs_reconcile, flagged, "{name}");
        let reason = flagged.then_some(ReconcileReason::Conflict);
        assert_eq!(state.reconcile_reason, reason, "{name}");
    }
}

#[test]
fn late_lower_event_fills_without_moving_back() {
    let delivered = merge(None, &upd("c", Status::Delivered, 8))
        .into_state()
        .unwrap();
    let MergeOutcome::Applied {
        state,
        previous_status,
    } = merge(Some(&delivered), &upd("b", Status::Sent, 3))
    else {
        panic!("late sent must fill sent_at");
    };
    assert_eq!(previous_status, Some(Status::Delivered));
    assert_eq!(state.status, Status::Delivered);
    assert_eq!(state.sent_at, Some(at(3)));
    assert_eq!(state.delivered_at, Some(at(8)));
    assert_eq!(
        state.last_event_at,
        at(8),
        "last_event_at is a max, not the latest arrival"
    );
}

#[test]
fn conflict_changes_nothing_but_the_flag() {
    let delivered = merge(None, &upd("c", Status::Delivered, 8))
        .into_state()
        .unwrap();
    let MergeOutcome::Conflict { state } = merge(Some(&delivered), &upd("f", Status::Failed, 5))
    else {
        panic!("expected a conflict");
    };
    let mut want = delivered.clone();
    want.needs_reconcile = true;
    want.reconcile_reason = Some(ReconcileReason::Conflict);
    assert_eq!(state, want);

    // A recipient flagged for another reason is re-flagged as a conflict.
    let mut stuck = delivered.clone();
    stuck.flag(ReconcileReason::Stuck);
    let MergeOutcome::Conflict { state } = merge(Some(&stuck), &upd("f", Status::Failed, 5)) else {
        panic!("expected a conflict");
    };
    assert_eq!(state.reconcile_reason, Some(ReconcileReason::Conflict));
}

#[test]
fn authoritative_answer_replaces_the_losing_terminal() {
    let (state, _) = run(&[upd("c", Status::Delivered, 8), upd("f", Status::Failed, 5)]);
    let mut answer = auth(Status::Failed, 60);
    answer.failed_at = Some(at(5));
    answer.carrier = Some("airtel_drc".into());
    let MergeOutcome::Applied {
        state,
        previous_status,
    } = merge(state.as_ref(), &answer)
    else {
        panic!("authoritative must apply");
    };
    assert_eq!(previous_status, Some(Status::Delivered));
    assert_eq!(state.status, Status::Failed);
    assert_eq!(
        state.delivered_at, None,
        "the losing terminal's time is dropped"
    );
    assert_eq!(state.failed_at, Some(at(5)));
    assert_eq!(state.error_code.as_deref(), Some("1502"));
    assert_eq!(state.carrier.as_deref(), Some("airtel_drc"));
    assert_eq!(
        state.segments,
        Some(1),
        "a field the API leaves null is kept"
    );
    assert_eq!(state.last_event_at, at(60));
    assert!(!state.needs_reconcile);
    assert_eq!(state.reconcile_reason, None);

    // An answer that omits its own terminal time keeps the one we had.
    let (state, _) = run(&[upd("c", Status::Delivered, 8)]);
    let mut answer = auth(Status::Delivered, 60);
    answer.delivered_at = None;
    let state = merge(state.as_ref(), &answer).into_state().unwrap();
    assert_eq!(state.delivered_at, Some(at(8)));
}

#[test]
fn message_merge_fills_and_is_idempotent() {
    let q = MessageUpdate {
        source: "s".into(),
        message_id: "m".into(),
        total_recipients: Some(3),
        total_messages: Some(3),
        total_cost: Some(0.06),
        currency: Some("USD".into()),
        scheduled_at: None,
        occurred_at: at(0),
        dedupe_key: "q".into(),
    };
    let first = merge_message(None, &q).unwrap();
    assert_eq!(first.total_recipients, Some(3));
    assert_eq!(first.total_cost, Some(0.06));
    assert_eq!(first.queued_at, at(0));
    assert_eq!(
        merge_message(Some(&first), &q),
        None,
        "duplicate changes nothing"
    );

    let sparse = MessageUpdate {
        total_cost: None,
        currency: None,
        scheduled_at: Some(at(3600)),
        occurred_at: at(-5),
        dedupe_key: "q2".into(),
        ..q.clone()
    };
    let second = merge_message(Some(&first), &sparse).unwrap();
    assert_eq!(second.total_cost, Some(0.06), "missing fields do not erase");
    assert_eq!(second.currency.as_deref(), Some("USD"));
    assert_eq!(second.scheduled_at, Some(at(3600)));
    assert_eq!(second.queued_at, at(-5));
    // Either order gives the same state.
    let other = merge_message(merge_message(None, &sparse).as_ref(), &q).unwrap();
    assert_eq!(other, second);
}
