//! Per-recipient state and the monotonic merge of updates into it.
//!
//! ## Convergence
//!
//! For non-authoritative updates the state is a join-semilattice: every field is
//! combined with an order-independent, idempotent rule, so any permutation of
//! the same set of updates, with any duplicates, ends in the same state:
//!
//! | field | rule |
//! |---|---|
//! | `status` | highest lattice rank |
//! | `queued_at` … `failed_at` | earliest time seen for that status |
//! | `carrier`, `segments` | greatest value seen (a deterministic tie-break; they rarely differ) |
//! | `error_code`, `error_message`, `retryable` | taken together from one update: the greatest triple |
//! | `last_event_at` | latest `occurred_at` |
//!
//! The one exception is a **conflict**: a terminal status arriving on a
//! recipient already in the *other* terminal status. As the design requires,
//! that update is not applied; the state is only flagged (`needs_reconcile`,
//! reason [`ReconcileReason::Conflict`]). Which terminal status stays until the
//! status API answers therefore depends on arrival order, and so do the fields
//! the refused update carried. What *is* order-independent: every arrival order
//! of a set holding both terminal statuses ends flagged as a conflict, and the
//! authoritative answer then sets status, terminal times and error fields to the
//! same values whatever the order was.
//!
//! An **authoritative** update (status API) is not joined: it sets the state to
//! the API's answer and clears any reconcile flag.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::status::Status;
use crate::update::{DeliveryUpdate, MessageUpdate};

/// Why a recipient is waiting for the status API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconcileReason {
    /// Two different terminal statuses were reported.
    Conflict,
    /// Non-terminal past its deadline (a webhook was probably dropped).
    Stuck,
    /// Known from a message-level event but never heard of individually.
    Incomplete,
    /// The operator asked for strict ordering: every change is confirmed.
    Strict,
}

impl ReconcileReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReconcileReason::Conflict => "conflict",
            ReconcileReason::Stuck => "stuck",
            ReconcileReason::Incomplete => "incomplete",
            ReconcileReason::Strict => "strict",
        }
    }
}

impl std::fmt::Display for ReconcileReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ReconcileReason {
    type Err = crate::status::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "conflict" => Ok(ReconcileReason::Conflict),
            "stuck" => Ok(ReconcileReason::Stuck),
            "incomplete" => Ok(ReconcileReason::Incomplete),
            "strict" => Ok(ReconcileReason::Strict),
            other => Err(crate::status::UnknownName(other.to_owned())),
        }
    }
}

/// What dlrflow knows about one recipient of one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipientState {
    pub message_id: String,
    pub recipient: String,
    pub status: Status,
    pub queued_at: Option<DateTime<Utc>>,
    pub processing_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub carrier: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub retryable: Option<bool>,
    pub segments: Option<u32>,
    /// Latest `occurred_at` of any update merged (max, so order-independent).
    pub last_event_at: DateTime<Utc>,
    pub needs_reconcile: bool,
    pub reconcile_reason: Option<ReconcileReason>,
}

impl RecipientState {
    /// An empty state for the update's recipient: nothing known yet.
    fn blank(update: &DeliveryUpdate) -> Self {
        RecipientState {
            message_id: update.message_id.clone(),
            recipient: update.recipient.clone(),
            status: update.status,
            queued_at: None,
            processing_at: None,
            sent_at: None,
            delivered_at: None,
            failed_at: None,
            carrier: None,
            error_code: None,
            error_message: None,
            retryable: None,
            segments: None,
            last_event_at: update.occurred_at,
            needs_reconcile: false,
            reconcile_reason: None,
        }
    }

    /// Flags the state for the status API; returns whether anything changed.
    pub fn flag(&mut self, reason: ReconcileReason) -> bool {
        let changed = !self.needs_reconcile || self.reconcile_reason != Some(reason);
        self.needs_reconcile = true;
        self.reconcile_reason = Some(reason);
        changed
    }
}

/// The result of [`merge`].
#[derive(Debug, Clone, PartialEq)]
pub enum MergeOutcome {
    /// Nothing changed (a duplicate, or nothing new): write nothing, emit nothing.
    Unchanged,
    /// The state changed; `previous_status` is `None` for a new recipient. The
    /// status may be the same as before when only fields were filled in.
    Applied {
        state: RecipientState,
        previous_status: Option<Status>,
    },
    /// A second, different terminal status: `state` is the current state flagged
    /// with `needs_reconcile` and [`ReconcileReason::Conflict`], nothing else.
    Conflict { state: RecipientState },
}

impl MergeOutcome {
    /// The new state to write, if any.
    pub fn state(&self) -> Option<&RecipientState> {
        match self {
            MergeOutcome::Unchanged => None,
            MergeOutcome::Applied { state, .. } | MergeOutcome::Conflict { state } => Some(state),
        }
    }

    /// The new state to write, if any, by value.
    pub fn into_state(self) -> Option<RecipientState> {
        match self {
            MergeOutcome::Unchanged => None,
            MergeOutcome::Applied { state, .. } | MergeOutcome::Conflict { state } => Some(state),
        }
    }

    pub fn is_changed(&self) -> bool {
        !matches!(self, MergeOutcome::Unchanged)
    }
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Joins a non-authoritative update into `s` (see the module docs for the rules).
fn join(s: &mut RecipientState, u: &DeliveryUpdate) {
    if u.status.rank() > s.status.rank() {
        s.status = u.status;
    }
    if u.status == Status::Queued {
        s.queued_at = earliest(s.queued_at, Some(u.occurred_at));
    }
    s.processing_at = earliest(s.processing_at, u.processing_at);
    s.sent_at = earliest(s.sent_at, u.sent_at);
    s.delivered_at = earliest(s.delivered_at, u.delivered_at);
    s.failed_at = earliest(s.failed_at, u.failed_at);
    if u.carrier.is_some() && u.carrier > s.carrier {
        s.carrier.clone_from(&u.carrier);
    }
    if u.segments > s.segments {
        s.segments = u.segments;
    }
    let incoming = (&u.error_code, &u.error_message, u.retryable);
    if incoming > (&s.error_code, &s.error_message, s.retryable) {
        s.error_code.clone_from(&u.error_code);
        s.error_message.clone_from(&u.error_message);
        s.retryable = u.retryable;
    }
    s.last_event_at = s.last_event_at.max(u.occurred_at);
}

/// Whether `incoming` would move an `earliest` field.
fn improves_earliest(existing: Option<DateTime<Utc>>, incoming: Option<DateTime<Utc>>) -> bool {
    matches!((existing, incoming), (None, Some(_)))
        || matches!((existing, incoming), (Some(e), Some(i)) if i < e)
}

/// Whether [`join`] would change `s`: the same rules, read-only, so the common
/// duplicate / nothing-new case costs no clone.
fn join_changes(s: &RecipientState, u: &DeliveryUpdate) -> bool {
    u.status.rank() > s.status.rank()
        || (u.status == Status::Queued && improves_earliest(s.queued_at, Some(u.occurred_at)))
        || improves_earliest(s.processing_at, u.processing_at)
        || improves_earliest(s.sent_at, u.sent_at)
        || improves_earliest(s.delivered_at, u.delivered_at)
        || improves_earliest(s.failed_at, u.failed_at)
        || (u.carrier.is_some() && u.carrier > s.carrier)
        || u.segments > s.segments
        || (&u.error_code, &u.error_message, u.retryable)
            > (&s.error_code, &s.error_message, s.retryable)
        || u.occurred_at > s.last_event_at
}

/// Sets `s` to an authoritative answer. Fields the API answers win; fields it
/// leaves null are kept only where they do not contradict the answer (times of
/// earlier statuses, carrier, segments, and the terminal time / error fields of
/// the status the API confirms). Flags are cleared.
fn overwrite(s: &mut RecipientState, u: &DeliveryUpdate) {
    s.status = u.status;
    s.processing_at = u.processing_at.or(s.processing_at);
    s.sent_at = u.sent_at.or(s.sent_at);
    let delivered = u.status == Status::Delivered;
    let failed = u.status == Status::Failed;
    s.delivered_at = if delivered {
        u.delivered_at.or(s.delivered_at)
    } else {
        u.delivered_at
    };
    s.failed_at = if failed {
        u.failed_at.or(s.failed_at)
    } else {
        u.failed_at
    };
    if failed {
        s.error_code = u.error_code.clone().or(s.error_code.take());
        s.error_message = u.error_message.clone().or(s.error_message.take());
        s.retryable = u.retryable.or(s.retryable);
    } else {
        s.error_code.clone_from(&u.error_code);
        s.error_message.clone_from(&u.error_message);
        s.retryable = u.retryable;
    }
    if u.carrier.is_some() {
        s.carrier.clone_from(&u.carrier);
    }
    s.segments = u.segments.or(s.segments);
    s.last_event_at = s.last_event_at.max(u.occurred_at);
    s.needs_reconcile = false;
    s.reconcile_reason = None;
}

/// Merges one update into a recipient's state.
///
/// * Status only moves up the lattice; a late lower update still fills the
///   fields it carries.
/// * A different terminal status on a terminal state is a
///   [`MergeOutcome::Conflict`] (or `Unchanged` if already flagged as one).
/// * An authoritative update wins — over a conflict too — and clears the
///   reconcile flag, unless it ranks below the current status: then it is a
///   stale read and only fills fields, like a late webhook (rule 4: status
///   never moves back).
/// * A duplicate (or anything that adds nothing) is [`MergeOutcome::Unchanged`].
///
/// The caller is responsible for `update` being about `current`'s recipient.
pub fn merge(current: Option<&RecipientState>, update: &DeliveryUpdate) -> MergeOutcome {
    let Some(cur) = current else {
        let mut state = RecipientState::blank(update);
        if update.authoritative {
            overwrite(&mut state, update);
        } else {
            join(&mut state, update);
        }
        return MergeOutcome::Applied {
            state,
            previous_status: None,
        };
    };
    // The status API answers with the gateway's state when it was read. The
    // gateway's own state only moves up, so an answer ranked below what we
    // already hold was read before a webhook we have since applied: it is
    // stale, and is joined like a late webhook (fills fields, never moves the
    // status back, keeps any flag) instead of overwriting.
    let authoritative = update.authoritative && update.status.rank() >= cur.status.rank();
    if !authoritative
        && cur.status.is_terminal()
        && update.status.is_terminal()
        && cur.status != update.status
    {
        let mut state = cur.clone();
        return if state.flag(ReconcileReason::Conflict) {
            MergeOutcome::Conflict { state }
        } else {
            MergeOutcome::Unchanged
        };
    }
    if !authoritative && !join_changes(cur, update) {
        return MergeOutcome::Unchanged;
    }
    let mut state = cur.clone();
    if authoritative {
        overwrite(&mut state, update);
    } else {
        join(&mut state, update);
    }
    if state == *cur {
        MergeOutcome::Unchanged
    } else {
        MergeOutcome::Applied {
            state,
            previous_status: Some(cur.status),
        }
    }
}

/// Message-level facts from `sms.queued`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageState {
    pub message_id: String,
    pub source: String,
    pub total_recipients: Option<u32>,
    pub total_messages: Option<u32>,
    pub total_cost: Option<f64>,
    pub currency: Option<String>,
    pub scheduled_at: Option<DateTime<Utc>>,
    /// Earliest `occurred_at` of the `sms.queued` events seen.
    pub queued_at: DateTime<Utc>,
}

fn greatest<T: Ord + Clone>(a: &mut Option<T>, b: &Option<T>) {
    if let Some(bv) = b {
        match a {
            Some(av) if bv <= av => {}
            _ => *a = Some(bv.clone()),
        }
    }
}

/// Merges a message-level update; `None` means nothing changed (a duplicate).
///
/// Fields fill when missing; when two updates disagree the greatest value is
/// kept (`total_cost` by `f64::total_cmp`), and `queued_at` is the earliest
/// time, so the result does not depend on arrival order.
pub fn merge_message(
    current: Option<&MessageState>,
    update: &MessageUpdate,
) -> Option<MessageState> {
    let mut s = match current {
        Some(c) => c.clone(),
        None => MessageState {
            message_id: update.message_id.clone(),
            source: update.source.clone(),
            total_recipients: None,
            total_messages: None,
            total_cost: None,
            currency: None,
            scheduled_at: None,
            queued_at: update.occurred_at,
        },
    };
    greatest(&mut s.total_recipients, &update.total_recipients);
    greatest(&mut s.total_messages, &update.total_messages);
    if let Some(c) = update.total_cost {
        match s.total_cost {
            Some(old) if c.total_cmp(&old).is_le() => {}
            _ => s.total_cost = Some(c),
        }
    }
    greatest(&mut s.currency, &update.currency);
    greatest(&mut s.scheduled_at, &update.scheduled_at);
    s.queued_at = s.queued_at.min(update.occurred_at);
    match current {
        Some(c) if *c == s => None,
        _ => Some(s),
    }
}
