//! The normalized shapes every provider's records become.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::status::{Provider, Status};

/// One recipient-level status report, whatever provider it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryUpdate {
    pub provider: Provider,
    /// The configured source (tenant / API key) the record arrived on.
    pub source: String,
    pub message_id: String,
    /// The recipient's number exactly as the provider sent it.
    pub recipient: String,
    pub status: Status,
    /// When the provider says this happened (Lisoloo: envelope `timestamp`;
    /// Arpoone: `ReportDateTime`; status API: the fetch time).
    pub occurred_at: DateTime<Utc>,
    pub processing_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub carrier: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub retryable: Option<bool>,
    pub segments: Option<u32>,
    /// Arpoone `CustomPayload`, verbatim (a JSON string's content, or the raw JSON
    /// text when the provider sent something else).
    pub custom_payload: Option<String>,
    /// Stable idempotency key: Lisoloo `event_id` (canonical UUID text); Arpoone
    /// [`crate::arpoone_dedupe_key`]; status API a hash of the answer.
    pub dedupe_key: String,
    /// True for status-API answers: they overwrite the state instead of joining it.
    pub authoritative: bool,
}

/// The message-level facts of a Lisoloo `sms.queued` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageUpdate {
    pub source: String,
    pub message_id: String,
    pub total_recipients: Option<u32>,
    pub total_messages: Option<u32>,
    pub total_cost: Option<f64>,
    pub currency: Option<String>,
    pub scheduled_at: Option<DateTime<Utc>>,
    /// Envelope `timestamp`.
    pub occurred_at: DateTime<Utc>,
    /// The event's `event_id`.
    pub dedupe_key: String,
}

/// What one raw record becomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "update", rename_all = "snake_case")]
pub enum Event {
    Message(MessageUpdate),
    Recipient(DeliveryUpdate),
}

impl Event {
    pub fn message_id(&self) -> &str {
        match self {
            Event::Message(m) => &m.message_id,
            Event::Recipient(r) => &r.message_id,
        }
    }

    pub fn dedupe_key(&self) -> &str {
        match self {
            Event::Message(m) => &m.dedupe_key,
            Event::Recipient(r) => &r.dedupe_key,
        }
    }
}

/// The namespace of [`update_id`] (UUIDv5 over `dedupe_key \n recipient`).
pub const UPDATE_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6a0c_5d1e_8f3b_4c2a_9e71_d3f0_b5a4_c817);

/// The stable analytics id of an update: the same update (dedupe key and
/// recipient) always gets the same id, whichever replica or replay wrote it.
pub fn update_id(dedupe_key: &str, recipient: &str) -> uuid::Uuid {
    let mut name = Vec::with_capacity(dedupe_key.len() + recipient.len() + 1);
    name.extend_from_slice(dedupe_key.as_bytes());
    name.push(b'\n');
    name.extend_from_slice(recipient.as_bytes());
    uuid::Uuid::new_v5(&UPDATE_ID_NAMESPACE, &name)
}
