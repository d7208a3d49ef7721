//! The gateway's `GET /status/{message_id}` answer (see `status-api.md`).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ParseError;
use crate::status::{Provider, Status};
use crate::update::DeliveryUpdate;
use crate::wire::{from_json, hash_fields, nonempty, timestamp, Text};

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    message_id: Option<Text<'a>>,
    #[serde(borrow)]
    status: Option<Text<'a>>,
    total_recipients: Option<u32>,
    #[serde(borrow)]
    recipients: Option<Vec<RecipientBody<'a>>>,
}

#[derive(Deserialize)]
struct RecipientBody<'a> {
    #[serde(borrow)]
    recipient_phone: Option<Text<'a>>,
    #[serde(borrow)]
    status: Option<Text<'a>>,
    #[serde(borrow)]
    carrier: Option<Text<'a>>,
    #[serde(borrow)]
    sent_at: Option<Text<'a>>,
    #[serde(borrow)]
    delivered_at: Option<Text<'a>>,
    #[serde(borrow)]
    failed_at: Option<Text<'a>>,
    #[serde(borrow)]
    error_code: Option<Text<'a>>,
    #[serde(borrow)]
    error_message: Option<Text<'a>>,
    retryable: Option<bool>,
    segments: Option<u32>,
}

/// One status-API answer: the message and every recipient's authoritative state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusSnapshot {
    pub message_id: String,
    /// Message-level status as sent (`pending`, `scheduled`, `processing`, `sent`,
    /// `delivered`, `failed`, `partially_delivered`, or a newer value); empty if absent.
    pub message_status: String,
    pub total_recipients: Option<u32>,
    /// One authoritative update per recipient, provider [`Provider::StatusApi`].
    pub recipients: Vec<DeliveryUpdate>,
}

/// Maps a recipient status of the API; `pending` is the lattice's `queued`.
fn api_status(raw: &str) -> Option<Status> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "pending" | "queued" => Some(Status::Queued),
        "processing" => Some(Status::Processing),
        "sent" => Some(Status::Sent),
        "delivered" => Some(Status::Delivered),
        "failed" => Some(Status::Failed),
        _ => None,
    }
}

fn opt_time(
    raw: Option<Text<'_>>,
    index: usize,
    name: &str,
) -> Result<Option<DateTime<Utc>>, ParseError> {
    match raw {
        None => Ok(None),
        Some(t) => timestamp(&t.0, || format!("recipients[{index}].{name}")).map(Some),
    }
}

/// Parses a `200 OK` body of `GET /status/{message_id}` fetched at `fetched_at`.
///
/// Lenient: unknown fields are ignored, optional fields may be missing or null,
/// timestamps may carry fractions and offsets. Required: `message_id`, and per
/// recipient `recipient_phone` and `status`. Each recipient becomes an
/// authoritative [`DeliveryUpdate`] whose `occurred_at` is `fetched_at`.
pub fn parse_status_response(
    source: &str,
    body: &[u8],
    fetched_at: DateTime<Utc>,
) -> Result<StatusSnapshot, ParseError> {
    let b: Body<'_> = from_json(body, "status API response", "")?;
    let message_id = nonempty(b.message_id, "message_id")?.0.into_owned();
    let fetched_text = fetched_at.to_rfc3339_opts(SecondsFormat::Nanos, true);
    let raw_recipients = b.recipients.unwrap_or_default();
    let mut recipients = Vec::with_capacity(raw_recipients.len());
    for (i, r) in raw_recipients.into_iter().enumerate() {
        let phone = match r.recipient_phone {
            Some(p) if !p.0.trim().is_empty() => p.0.into_owned(),
            Some(_) => {
                return Err(ParseError::invalid(
                    format!("recipients[{i}].recipient_phone"),
                    "empty",
                ))
            }
            None => {
                return Err(ParseError::missing(format!(
                    "recipients[{i}].recipient_phone"
                )))
            }
        };
        let status_raw = r
            .status
            .ok_or_else(|| ParseError::missing(format!("recipients[{i}].status")))?;
        let status = api_status(&status_raw.0).ok_or_else(|| ParseError::UnknownStatus {
            field: format!("recipients[{i}].status"),
            value: status_raw.0.to_string(),
        })?;
        let dedupe_key = hash_fields(&[
            b"status_api.v1",
            source.as_bytes(),
            message_id.as_bytes(),
            phone.as_bytes(),
            status.as_str().as_bytes(),
            fetched_text.as_bytes(),
        ]);
        recipients.push(DeliveryUpdate {
            provider: Provider::StatusApi,
            source: source.to_owned(),
            message_id: message_id.clone(),
            recipient: phone,
            status,
            occurred_at: fetched_at,
            processing_at: None,
            sent_at: opt_time(r.sent_at, i, "sent_at")?,
            delivered_at: opt_time(r.delivered_at, i, "delivered_at")?,
            failed_at: opt_time(r.failed_at, i, "failed_at")?,
            carrier: r.carrier.map(|t| t.0.into_owned()),
            error_code: r.error_code.map(|t| t.0.into_owned()),
            error_message: r.error_message.map(|t| t.0.into_owned()),
            retryable: r.retryable,
            segments: r.segments,
            custom_payload: None,
            dedupe_key,
            authoritative: true,
        });
    }
    Ok(StatusSnapshot {
        message_id,
        message_status: b.status.map(|t| t.0.into_owned()).unwrap_or_default(),
        total_recipients: b.total_recipients,
        recipients,
    })
}
