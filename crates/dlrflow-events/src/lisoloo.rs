//! Lisoloo webhooks: one event object per POST, an envelope and five data shapes.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ParseError;
use crate::status::{Provider, Status};
use crate::update::{DeliveryUpdate, Event, MessageUpdate};
use crate::wire::{from_json, nonempty, required, timestamp, without_bom, Text};

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    event_id: Option<Text<'a>>,
    #[serde(borrow)]
    event_type: Option<Text<'a>>,
    #[serde(borrow)]
    timestamp: Option<Text<'a>>,
    #[serde(borrow)]
    message_id: Option<Text<'a>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Queued<'a> {
    total_recipients: Option<u32>,
    total_messages: Option<u32>,
    total_cost: Option<f64>,
    #[serde(borrow)]
    currency: Option<Text<'a>>,
    #[serde(borrow)]
    scheduled_at: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct Processing<'a> {
    #[serde(borrow)]
    recipient_phone: Option<Text<'a>>,
    #[serde(borrow)]
    carrier: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct Sent<'a> {
    #[serde(borrow)]
    recipient_phone: Option<Text<'a>>,
    #[serde(borrow)]
    carrier: Option<Text<'a>>,
    #[serde(borrow)]
    sent_at: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct Delivered<'a> {
    #[serde(borrow)]
    recipient_phone: Option<Text<'a>>,
    #[serde(borrow)]
    carrier: Option<Text<'a>>,
    #[serde(borrow)]
    delivered_at: Option<Text<'a>>,
    segments: Option<u32>,
}

#[derive(Deserialize)]
struct Failed<'a> {
    #[serde(borrow)]
    recipient_phone: Option<Text<'a>>,
    #[serde(borrow)]
    carrier: Option<Text<'a>>,
    #[serde(borrow)]
    failed_at: Option<Text<'a>>,
    #[serde(borrow)]
    error_code: Option<Text<'a>>,
    #[serde(borrow)]
    error_message: Option<Text<'a>>,
    retryable: Option<bool>,
}

/// The five documented `event_type` values.
pub const LISOLOO_EVENT_TYPES: [&str; 5] = [
    "sms.queued",
    "sms.processing",
    "sms.sent",
    "sms.delivered",
    "sms.failed",
];

fn owned(t: Option<Text<'_>>) -> Option<String> {
    t.map(|t| t.0.into_owned())
}

/// Parses one Lisoloo webhook body (the exact bytes of the POST).
///
/// `sms.queued` becomes [`Event::Message`]; the four per-recipient types become
/// [`Event::Recipient`]. Unknown fields are ignored; an unknown `event_type`, a
/// missing required field or a wrongly typed one is a [`ParseError`] naming it.
/// A leading UTF-8 byte-order mark is ignored.
pub fn parse_lisoloo(source: &str, body: &[u8]) -> Result<Event, ParseError> {
    let env: Envelope<'_> = from_json(without_bom(body), "Lisoloo event", "")?;
    let event_id = required(env.event_id, "event_id")?;
    let event_type = required(env.event_type, "event_type")?;
    let ts_raw = required(env.timestamp, "timestamp")?;
    let message_id = nonempty(env.message_id, "message_id")?;

    let event_type = event_type.0;
    if !LISOLOO_EVENT_TYPES.contains(&&*event_type) {
        return Err(ParseError::UnknownEventType(event_type.into_owned()));
    }
    let uuid = uuid::Uuid::try_parse(&event_id.0)
        .map_err(|e| ParseError::invalid("event_id", format!("not a UUID: {e}")))?;
    let occurred_at = timestamp(&ts_raw.0, || "timestamp".into())?;
    let data = required(env.data, "data")?;
    let data = data.get().as_bytes();
    let dedupe_key = {
        let mut buf = uuid::Uuid::encode_buffer();
        String::from(&*uuid.hyphenated().encode_lower(&mut buf))
    };
    let message_id = message_id.0.into_owned();

    if event_type == "sms.queued" {
        let d: Queued<'_> = from_json(data, "data", "data.")?;
        let scheduled_at = match d.scheduled_at {
            Some(s) => Some(timestamp(&s.0, || "data.scheduled_at".into())?),
            None => None,
        };
        return Ok(Event::Message(MessageUpdate {
            source: source.to_owned(),
            message_id,
            total_recipients: d.total_recipients,
            total_messages: d.total_messages,
            total_cost: d.total_cost,
            currency: owned(d.currency),
            scheduled_at,
            occurred_at,
            dedupe_key,
        }));
    }

    let base =
        move |recipient: Text<'_>, carrier: Option<Text<'_>>, status: Status| DeliveryUpdate {
            provider: Provider::Lisoloo,
            source: source.to_owned(),
            message_id,
            recipient: recipient.0.into_owned(),
            status,
            occurred_at,
            processing_at: None,
            sent_at: None,
            delivered_at: None,
            failed_at: None,
            carrier: owned(carrier),
            error_code: None,
            error_message: None,
            retryable: None,
            segments: None,
            custom_payload: None,
            dedupe_key,
            authoritative: false,
        };

    let update = match &*event_type {
        "sms.processing" => {
            let d: Processing<'_> = from_json(data, "data", "data.")?;
            let phone = nonempty(d.recipient_phone, "data.recipient_phone")?;
            let mut u = base(phone, d.carrier, Status::Processing);
            // The event carries no time of its own: the envelope's is the best we have.
            u.processing_at = Some(occurred_at);
            u
        }
        "sms.sent" => {
            let d: Sent<'_> = from_json(data, "data", "data.")?;
            let phone = nonempty(d.recipient_phone, "data.recipient_phone")?;
            let at = required(d.sent_at, "data.sent_at")?;
            let at = timestamp(&at.0, || "data.sent_at".into())?;
            let mut u = base(phone, d.carrier, Status::Sent);
            u.sent_at = Some(at);
            u
        }
        "sms.delivered" => {
            let d: Delivered<'_> = from_json(data, "data", "data.")?;
            let phone = nonempty(d.recipient_phone, "data.recipient_phone")?;
            let at = required(d.delivered_at, "data.delivered_at")?;
            let at = timestamp(&at.0, || "data.delivered_at".into())?;
            let mut u = base(phone, d.carrier, Status::Delivered);
            u.delivered_at = Some(at);
            u.segments = d.segments;
            u
        }
        _ => {
            // "sms.failed": the list check above leaves nothing else.
            let d: Failed<'_> = from_json(data, "data", "data.")?;
            let phone = nonempty(d.recipient_phone, "data.recipient_phone")?;
            let at = required(d.failed_at, "data.failed_at")?;
            let at = timestamp(&at.0, || "data.failed_at".into())?;
            let mut u = base(phone, d.carrier, Status::Failed);
            u.failed_at = Some(at);
            u.error_code = owned(d.error_code);
            u.error_message = owned(d.error_message);
            u.retryable = d.retryable;
            u
        }
    };
    Ok(Event::Recipient(update))
}
