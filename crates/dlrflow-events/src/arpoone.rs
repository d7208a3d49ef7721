//! Arpoone webhooks: a JSON array of reports; each element is one raw record.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ParseError;
use crate::status::{Provider, Status};
use crate::update::DeliveryUpdate;
use crate::wire::{from_json, hash_fields, nonempty, required, timestamp, without_bom, Text};

/// One element of the array. PascalCase as documented; camelCase aliases are
/// accepted because the document is loose about it.
#[derive(Deserialize)]
struct Report<'a> {
    #[serde(borrow, rename = "Msisdn", alias = "msisdn")]
    msisdn: Option<Text<'a>>,
    #[serde(borrow, rename = "Status", alias = "status")]
    status: Option<Text<'a>>,
    #[serde(borrow, rename = "MessageId", alias = "messageId")]
    message_id: Option<Text<'a>>,
    #[serde(borrow, rename = "ReportDescription", alias = "reportDescription")]
    report_description: Option<Text<'a>>,
    #[serde(borrow, rename = "ReportDateTime", alias = "reportDateTime")]
    report_date_time: Option<Text<'a>>,
    #[serde(rename = "TotalSegments", alias = "totalSegments")]
    total_segments: Option<u32>,
    #[serde(borrow, rename = "CustomPayload", alias = "customPayload")]
    custom_payload: Option<&'a RawValue>,
}

/// Maps an Arpoone `Status` (case-insensitive) to its canonical spelling and the
/// lattice: `PENDING` = sent (in the carrier's hands), `DELIVERED`, `NOT_DELIVERED`
/// = failed.
fn arpoone_status(raw: &str) -> Option<(&'static str, Status)> {
    let t = raw.trim();
    if t.eq_ignore_ascii_case("DELIVERED") {
        Some(("DELIVERED", Status::Delivered))
    } else if t.eq_ignore_ascii_case("NOT_DELIVERED") {
        Some(("NOT_DELIVERED", Status::Failed))
    } else if t.eq_ignore_ascii_case("PENDING") {
        Some(("PENDING", Status::Sent))
    } else {
        None
    }
}

/// The dedupe key of an Arpoone report, which carries no id of its own: sha256
/// hex over `arpoone.v1`, source, MessageId, Msisdn, Status (canonical upper
/// case) and ReportDateTime (the raw text as received), each length-prefixed.
pub fn arpoone_dedupe_key(
    source: &str,
    message_id: &str,
    msisdn: &str,
    status: &str,
    report_date_time_raw: &str,
) -> String {
    hash_fields(&[
        b"arpoone.v1",
        source.as_bytes(),
        message_id.as_bytes(),
        msisdn.as_bytes(),
        status.as_bytes(),
        report_date_time_raw.as_bytes(),
    ])
}

/// Parses ONE element of an Arpoone webhook array (its exact bytes).
///
/// Required: `Msisdn`, `Status`, `MessageId`, `ReportDateTime`. `TotalSegments`
/// and `CustomPayload` may be missing or `null`; `OrganizationId` and unknown
/// fields are ignored. `ReportDateTime` is RFC 3339 with or without offset and
/// fraction; no offset means UTC. A leading UTF-8 byte-order mark is ignored.
pub fn parse_arpoone(source: &str, element: &[u8]) -> Result<DeliveryUpdate, ParseError> {
    let r: Report<'_> = from_json(
        without_bom(element),
        "Arpoone report (one array element)",
        "",
    )?;
    let msisdn = nonempty(r.msisdn, "Msisdn")?;
    let status_raw = required(r.status, "Status")?;
    let message_id = nonempty(r.message_id, "MessageId")?;
    let when_raw = required(r.report_date_time, "ReportDateTime")?;

    let (status_canon, status) =
        arpoone_status(&status_raw.0).ok_or_else(|| ParseError::UnknownStatus {
            field: "Status".into(),
            value: status_raw.0.clone().into_owned(),
        })?;
    let at = timestamp(&when_raw.0, || "ReportDateTime".into())?;
    let custom_payload = r.custom_payload.and_then(|raw| {
        let text = raw.get();
        if text == "null" {
            None
        } else if text.starts_with('"') {
            // A JSON string: keep its content. Parsing cannot fail on a RawValue
            // string, but fall back to the raw text rather than unwrap.
            Some(serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_owned()))
        } else {
            Some(text.to_owned())
        }
    });

    let dedupe_key =
        arpoone_dedupe_key(source, &message_id.0, &msisdn.0, status_canon, &when_raw.0);
    let (mut sent_at, mut delivered_at, mut failed_at, mut error_message) =
        (None, None, None, None);
    match status {
        Status::Sent => sent_at = Some(at),
        Status::Delivered => delivered_at = Some(at),
        _ => {
            failed_at = Some(at);
            error_message = r.report_description.map(|d| d.0.into_owned());
        }
    }
    Ok(DeliveryUpdate {
        provider: Provider::Arpoone,
        source: source.to_owned(),
        message_id: message_id.0.into_owned(),
        recipient: msisdn.0.into_owned(),
        status,
        occurred_at: at,
        processing_at: None,
        sent_at,
        delivered_at,
        failed_at,
        carrier: None,
        error_code: None,
        error_message,
        retryable: None,
        segments: r.total_segments,
        custom_payload,
        dedupe_key,
        authoritative: false,
    })
}
