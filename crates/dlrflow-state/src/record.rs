//! The `dlrflow.delivery.v1` record (see `docs/delivery-v1.md`): what one
//! change of the write path ([`Applied`], with its [`Outcome`]) looks like on
//! the analytics topic.
//!
//! Records are bounded: every string copied into one is cut to
//! [`MAX_TEXT_BYTES`] ([`MAX_CUSTOM_PAYLOAD_BYTES`] for `custom_payload`) and
//! the cut fields are listed in `truncated`, so a record stays far below the
//! broker's message size limit whatever the provider sent.
//!
//! The write path ([`crate::store`]) renders records into the outbox; the
//! relay ([`crate::analytics`]) publishes them. Neither depends on the other.

use chrono::{DateTime, SecondsFormat, Utc};
use dlrflow_events::{DeliveryUpdate, RecipientState, Status};
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// What happened to one record of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its dedupe key was already recorded (earlier, or earlier in this batch).
    Duplicate,
    /// New, but it changed nothing.
    Unchanged,
    /// It changed the recipient's state (an analytics record was written).
    Applied,
    /// A second terminal status: the recipient was flagged for reconcile (an
    /// analytics record was written).
    Conflict,
    /// A message-level update (changed or not).
    Message,
    /// The message belongs to another source: nothing was written (the
    /// consumer dead-letters the record). A source can never change another
    /// source's message.
    Foreign,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Duplicate => "duplicate",
            Outcome::Unchanged => "unchanged",
            Outcome::Applied => "applied",
            Outcome::Conflict => "conflict",
            Outcome::Message => "message",
            Outcome::Foreign => "foreign",
        }
    }
}

/// One change written to `recipient_state` and to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Stable id of the analytics record: UUIDv5 over dedupe key and recipient.
    pub update_id: Uuid,
    pub dedupe_key: String,
    /// [`Outcome::Applied`] or [`Outcome::Conflict`].
    pub outcome: Outcome,
    pub previous_status: Option<Status>,
    /// The recipient's state after this update.
    pub state: RecipientState,
    /// `recipient_state.version` after this update (1 for a new recipient).
    pub version: i64,
}

/// The `schema` field of every record.
pub const SCHEMA: &str = "dlrflow.delivery.v1";

/// The most UTF-8 bytes of any string field a record carries (except
/// `update.custom_payload`); longer values are cut at a character boundary
/// and their field path is listed in `truncated`.
pub const MAX_TEXT_BYTES: usize = 1024;

/// The most UTF-8 bytes of `update.custom_payload`.
pub const MAX_CUSTOM_PAYLOAD_BYTES: usize = 4096;

/// The largest record (key + value) the relay hands to the producer: Kafka's
/// default `message.max.bytes`. Larger rows are treated as refused without a
/// produce attempt. Records rendered by [`payload`] are far smaller (at most
/// 14,336 bytes of string content, under 100 KiB even if every character
/// needed a six-byte JSON escape).
pub const MAX_RECORD_BYTES: usize = 1_000_000;

/// Top-level fields of a record, in [`payload`]'s order.
const TOP_FIELDS: [&str; 12] = [
    "schema",
    "update_id",
    "dedupe_key",
    "outcome",
    "message_id",
    "recipient",
    "source",
    "provider",
    "previous_status",
    "status",
    "version",
    "applied_at",
];

/// Fields of `update`.
const UPDATE_FIELDS: [&str; 13] = [
    "status",
    "occurred_at",
    "authoritative",
    "processing_at",
    "sent_at",
    "delivered_at",
    "failed_at",
    "carrier",
    "error_code",
    "error_message",
    "retryable",
    "segments",
    "custom_payload",
];

/// Fields of `state`.
const STATE_FIELDS: [&str; 14] = [
    "status",
    "queued_at",
    "processing_at",
    "sent_at",
    "delivered_at",
    "failed_at",
    "carrier",
    "error_code",
    "error_message",
    "retryable",
    "segments",
    "last_event_at",
    "needs_reconcile",
    "reconcile_reason",
];

/// The byte bound of the string at `path` (`"update.custom_payload"`, …).
pub fn text_limit(path: &str) -> usize {
    if path == "update.custom_payload" {
        MAX_CUSTOM_PAYLOAD_BYTES
    } else {
        MAX_TEXT_BYTES
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Collects the paths of the fields that were cut while a record is rendered.
#[derive(Default)]
struct Bounds {
    truncated: Vec<String>,
}

impl Bounds {
    fn text(&mut self, path: &str, s: &str) -> Value {
        let cut = truncate_utf8(s, text_limit(path));
        if cut.len() < s.len() {
            self.truncated.push(path.to_owned());
        }
        Value::String(cut.to_owned())
    }

    fn opt(&mut self, path: &str, s: Option<&str>) -> Value {
        s.map_or(Value::Null, |s| self.text(path, s))
    }

    /// A stored value re-rendered: strings bounded, scalars kept, anything a
    /// record never holds at `path` (arrays, objects) replaced by null.
    fn value(&mut self, path: &str, v: &Value) -> Value {
        match v {
            Value::String(s) => self.text(path, s),
            Value::Null | Value::Bool(_) | Value::Number(_) => v.clone(),
            Value::Array(_) | Value::Object(_) => {
                self.truncated.push(path.to_owned());
                Value::Null
            }
        }
    }

    /// Adds `truncated` to the record when something was cut.
    fn finish(self, mut record: Value) -> Value {
        if !self.truncated.is_empty() {
            record["truncated"] = json!(self.truncated);
        }
        record
    }
}

pub(crate) fn ts(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| {
        t.to_rfc3339_opts(SecondsFormat::Micros, true).into()
    })
}

/// Renders one analytics record. Every string copied from the update or the
/// state is bounded ([`MAX_TEXT_BYTES`], [`MAX_CUSTOM_PAYLOAD_BYTES`]); the
/// paths of the cut ones are listed in `truncated` (absent when nothing was
/// cut).
pub fn payload(
    a: &Applied,
    u: &DeliveryUpdate,
    provider: &str,
    applied_at: DateTime<Utc>,
) -> String {
    let s = &a.state;
    let mut b = Bounds::default();
    let record = json!({
        "schema": SCHEMA,
        "update_id": a.update_id,
        "dedupe_key": b.text("dedupe_key", &a.dedupe_key),
        "outcome": a.outcome.as_str(),
        "message_id": b.text("message_id", &s.message_id),
        "recipient": b.text("recipient", &s.recipient),
        "source": b.text("source", &u.source),
        "provider": b.text("provider", provider),
        "previous_status": a.previous_status.map(|p| p.as_str()),
        "status": s.status.as_str(),
        "version": a.version,
        "applied_at": ts(Some(applied_at)),
        "update": {
            "status": u.status.as_str(),
            "occurred_at": ts(Some(u.occurred_at)),
            "authoritative": u.authoritative,
            "processing_at": ts(u.processing_at),
            "sent_at": ts(u.sent_at),
            "delivered_at": ts(u.delivered_at),
            "failed_at": ts(u.failed_at),
            "carrier": b.opt("update.carrier", u.carrier.as_deref()),
            "error_code": b.opt("update.error_code", u.error_code.as_deref()),
            "error_message": b.opt("update.error_message", u.error_message.as_deref()),
            "retryable": u.retryable,
            "segments": u.segments,
            "custom_payload": b.opt("update.custom_payload", u.custom_payload.as_deref()),
        },
        "state": {
            "status": s.status.as_str(),
            "queued_at": ts(s.queued_at),
            "processing_at": ts(s.processing_at),
            "sent_at": ts(s.sent_at),
            "delivered_at": ts(s.delivered_at),
            "failed_at": ts(s.failed_at),
            "carrier": b.opt("state.carrier", s.carrier.as_deref()),
            "error_code": b.opt("state.error_code", s.error_code.as_deref()),
            "error_message": b.opt("state.error_message", s.error_message.as_deref()),
            "retryable": s.retryable,
            "segments": s.segments,
            "last_event_at": ts(Some(s.last_event_at)),
            "needs_reconcile": s.needs_reconcile,
            "reconcile_reason": s.reconcile_reason.map(|r| r.as_str()),
        },
    });
    b.finish(record).to_string()
}

/// A stored record re-rendered within the bounds: the known fields only, every
/// string cut as [`payload`] cuts it, `truncated` listing the earlier and the
/// new cuts. `None` when `stored` is not a `dlrflow.delivery.v1` record with
/// every required field, or when nothing needed cutting (re-rendering cannot
/// help then). Used for outbox rows the broker refuses, e.g. rows written
/// before records were bounded.
pub fn rebound(stored: &str) -> Option<String> {
    let v: Value = serde_json::from_str(stored).ok()?;
    let obj = v.as_object()?;
    if obj.get("schema")?.as_str()? != SCHEMA {
        return None;
    }
    let mut b = Bounds::default();
    let mut out = Map::new();
    for field in TOP_FIELDS {
        out.insert(field.to_owned(), b.value(field, obj.get(field)?));
    }
    for (name, fields) in [("update", &UPDATE_FIELDS[..]), ("state", &STATE_FIELDS[..])] {
        let inner = obj.get(name)?.as_object()?;
        let mut o = Map::new();
        for &field in fields {
            if let Some(x) = inner.get(field) {
                o.insert(field.to_owned(), b.value(&format!("{name}.{field}"), x));
            }
        }
        out.insert(name.to_owned(), Value::Object(o));
    }
    if b.truncated.is_empty() {
        return None;
    }
    // Keep the earlier cuts (known paths only, so the list stays small).
    let earlier: Vec<String> = obj
        .get("truncated")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|p| is_known_path(p))
        .map(str::to_owned)
        .collect();
    for p in earlier.into_iter().rev() {
        if !b.truncated.contains(&p) {
            b.truncated.insert(0, p);
        }
    }
    Some(b.finish(Value::Object(out)).to_string())
}

fn is_known_path(p: &str) -> bool {
    match p.split_once('.') {
        None => TOP_FIELDS.contains(&p),
        Some(("update", f)) => UPDATE_FIELDS.contains(&f),
        Some(("state", f)) => STATE_FIELDS.contains(&f),
        Some(_) => false,
    }
}
