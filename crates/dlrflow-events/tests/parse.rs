//! Table-driven parser tests built from the providers' own documented examples
//! (`shared/seeds/`) and `status-api.md`, plus every error path.

use chrono::{DateTime, TimeZone, Utc};
use dlrflow_events::{
    arpoone_dedupe_key, parse_arpoone, parse_lisoloo, parse_record, parse_status_response,
    DeliveryUpdate, Event, ParseError, Provider, Status,
};

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

const EVENT_ID: &str = "f8a3b7c1-2e4d-4a9b-9d8f-7c6e5b4a3d2c";
const MESSAGE_ID: &str = "507f1f77bcf86cd799439011";

/// The documented envelope around a documented `data` block.
fn lisoloo(event_type: &str, timestamp: &str, data: &str) -> String {
    format!(
        r#"{{ "event_id": "{EVENT_ID}", "event_type": "{event_type}", "timestamp": "{timestamp}", "message_id": "{MESSAGE_ID}", "data": {data} }}"#
    )
}

fn recipient(ev: Event) -> DeliveryUpdate {
    match ev {
        Event::Recipient(u) => u,
        Event::Message(m) => panic!("expected a recipient update, got {m:?}"),
    }
}

/// What the four per-recipient examples of the event-types document must become.
struct Want {
    status: Status,
    processing_at: Option<&'static str>,
    sent_at: Option<&'static str>,
    delivered_at: Option<&'static str>,
    failed_at: Option<&'static str>,
    segments: Option<u32>,
    error: (Option<&'static str>, Option<&'static str>, Option<bool>),
}

#[test]
fn lisoloo_documented_recipient_events() {
    let table: &[(&str, &str, &str, Want)] = &[
        (
            "sms.processing",
            "2026-05-27T10:15:01Z",
            r#"{ "recipient_phone": "+243998857000", "carrier": "vodacom_drc" }"#,
            Want {
                status: Status::Processing,
                processing_at: Some("2026-05-27T10:15:01Z"),
                sent_at: None,
                delivered_at: None,
                failed_at: None,
                segments: None,
                error: (None, None, None),
            },
        ),
        (
            "sms.sent",
            "2026-05-27T10:15:03Z",
            r#"{ "recipient_phone": "+243998857000", "carrier": "vodacom_drc", "sent_at": "2026-05-27T10:15:03Z" }"#,
            Want {
                status: Status::Sent,
                processing_at: None,
                sent_at: Some("2026-05-27T10:15:03Z"),
                delivered_at: None,
                failed_at: None,
                segments: None,
                error: (None, None, None),
            },
        ),
        (
            "sms.delivered",
            "2026-05-27T10:15:08Z",
            r#"{ "recipient_phone": "+243998857000", "carrier": "vodacom_drc", "delivered_at": "2026-05-27T10:15:08Z", "segments": 1 }"#,
            Want {
                status: Status::Delivered,
                processing_at: None,
                sent_at: None,
                delivered_at: Some("2026-05-27T10:15:08Z"),
                failed_at: None,
                segments: Some(1),
                error: (None, None, None),
            },
        ),
        (
            "sms.failed",
            "2026-05-27T10:15:05Z",
            r#"{ "recipient_phone": "+243998857000", "carrier": "vodacom_drc", "failed_at": "2026-05-27T10:15:05Z", "error_code": "1502", "error_message": "Number unreachable", "retryable": false }"#,
            Want {
                status: Status::Failed,
                processing_at: None,
                sent_at: None,
                delivered_at: None,
                failed_at: Some("2026-05-27T10:15:05Z"),
                segments: None,
                error: (Some("1502"), Some("Number unreachable"), Some(false)),
            },
        ),
    ];
    for (event_type, ts, data, want) in table {
        let body = lisoloo(event_type, ts, data);
        let u = recipient(parse_lisoloo("src-a", body.as_bytes()).unwrap());
        let ctx = *event_type;
        assert_eq!(u.provider, Provider::Lisoloo, "{ctx}");
        assert_eq!(u.source, "src-a", "{ctx}");
        assert_eq!(u.message_id, MESSAGE_ID, "{ctx}");
        assert_eq!(u.recipient, "+243998857000", "{ctx}");
        assert_eq!(u.carrier.as_deref(), Some("vodacom_drc"), "{ctx}");
        assert_eq!(u.status, want.status, "{ctx}");
        assert_eq!(u.occurred_at, t(ts), "{ctx}");
        assert_eq!(u.processing_at, want.processing_at.map(t), "{ctx}");
        assert_eq!(u.sent_at, want.sent_at.map(t), "{ctx}");
        assert_eq!(u.delivered_at, want.delivered_at.map(t), "{ctx}");
        assert_eq!(u.failed_at, want.failed_at.map(t), "{ctx}");
        assert_eq!(u.segments, want.segments, "{ctx}");
        let error = (
            u.error_code.as_deref(),
            u.error_message.as_deref(),
            u.retryable,
        );
        assert_eq!(error, want.error, "{ctx}");
        assert_eq!(u.dedupe_key, EVENT_ID, "{ctx}");
        assert!(!u.authoritative, "{ctx}");
        assert_eq!(u.custom_payload, None, "{ctx}");
        // The dispatcher gives the same answer.
        let via = parse_record(Provider::Lisoloo, "src-a", body.as_bytes()).unwrap();
        assert_eq!(via, Event::Recipient(u), "{ctx}");
    }
}

#[test]
fn lisoloo_documented_queued_event() {
    let table: &[(&str, Option<&str>)] = &[
        (
            r#"{ "total_recipients": 3, "total_messages": 3, "total_cost": 0.06, "currency": "USD", "scheduled_at": null }"#,
            None,
        ),
        (
            r#"{ "total_recipients": 3, "total_messages": 3, "total_cost": 0.06, "currency": "USD", "scheduled_at": "2026-05-28T09:00:00Z" }"#,
            Some("2026-05-28T09:00:00Z"),
        ),
        (
            r#"{ "total_recipients": 3, "total_messages": 3, "total_cost": 0.06, "currency": "USD" }"#,
            None,
        ),
    ];
    for (data, scheduled) in table {
        let body = lisoloo("sms.queued", "2026-05-27T10:15:00Z", data);
        let Event::Message(m) = parse_lisoloo("src-a", body.as_bytes()).unwrap() else {
            panic!("sms.queued must be message-level");
        };
        assert_eq!(m.source, "src-a");
        assert_eq!(m.message_id, MESSAGE_ID);
        assert_eq!(m.total_recipients, Some(3));
        assert_eq!(m.total_messages, Some(3));
        assert_eq!(m.total_cost, Some(0.06));
        assert_eq!(m.currency.as_deref(), Some("USD"));
        assert_eq!(m.scheduled_at, scheduled.map(t));
        assert_eq!(m.occurred_at, t("2026-05-27T10:15:00Z"));
        assert_eq!(m.dedupe_key, EVENT_ID);
    }
}

#[test]
fn lisoloo_is_lenient_where_it_may_be() {
    // Unknown fields anywhere, escaped strings, a numeric error_code, a null or
    // missing carrier, an upper-case event_id, fractional/offset timestamps.
    let body = r#"{"event_id":"F8A3B7C1-2E4D-4A9B-9D8F-7C6E5B4A3D2C","event_type":"sms.failed","api_version":2,
        "timestamp":"2026-05-27T12:15:05.5+02:00","message_id":"507f\u0031f77","data":{"recipient_phone":"+243\u0039","carrier":null,
        "failed_at":"2026-05-27T10:15:05","error_code":1502,"retryable":true,"new_field":{"x":[1,2]}}}"#;
    let u = recipient(parse_lisoloo("s", body.as_bytes()).unwrap());
    assert_eq!(u.dedupe_key, EVENT_ID);
    assert_eq!(u.message_id, "507f1f77");
    assert_eq!(u.recipient, "+2439");
    assert_eq!(u.carrier, None);
    assert_eq!(u.occurred_at, t("2026-05-27T10:15:05.5Z"));
    assert_eq!(u.failed_at, Some(t("2026-05-27T10:15:05Z")));
    assert_eq!(u.error_code.as_deref(), Some("1502"));
    assert_eq!(u.error_message, None);
    assert_eq!(u.retryable, Some(true));

    // Fields that belong to another event type are ignored, not misread.
    let body = lisoloo(
        "sms.processing",
        "2026-05-27T10:15:01Z",
        r#"{"recipient_phone":"+1","delivered_at":"garbage","segments":"x"}"#,
    );
    let u = recipient(parse_lisoloo("s", body.as_bytes()).unwrap());
    assert_eq!(
        (u.status, u.delivered_at, u.segments),
        (Status::Processing, None, None)
    );
}

/// (case, body, expected kind, text the error's message must contain)
type ErrCase = (&'static str, Vec<u8>, &'static str, &'static str);

fn check_errors(cases: Vec<ErrCase>, parse: impl Fn(&[u8]) -> Result<(), ParseError>) {
    for (case, body, kind, needle) in cases {
        let err = parse(&body).expect_err(case);
        assert_eq!(err.kind(), kind, "{case}: {err}");
        let text = err.to_string();
        assert!(
            text.contains(needle),
            "{case}: `{text}` should mention `{needle}`"
        );
    }
}

#[test]
fn lisoloo_error_paths() {
    let env = |event_type: &str, data: &str| {
        lisoloo(event_type, "2026-05-27T10:15:08Z", data).into_bytes()
    };
    let without = |field: &str| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&env("sms.processing", r#"{"recipient_phone":"+1"}"#)).unwrap();
        v.as_object_mut().unwrap().remove(field);
        serde_json::to_vec(&v).unwrap()
    };
    let with = |field: &str, value: &str| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&env("sms.processing", r#"{"recipient_phone":"+1"}"#)).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        serde_json::to_vec(&v).unwrap()
    };
    let cases: Vec<ErrCase> = vec![
        ("empty body", b"".to_vec(), "not_json", "EOF"),
        (
            "truncated",
            b"{\"event_id\":".to_vec(),
            "not_json",
            "line 1",
        ),
        (
            "not utf-8",
            b"{\"event_id\":\"\xff\"}".to_vec(),
            "not_json",
            "unicode",
        ),
        ("array", b"[]".to_vec(), "not_an_object", "Lisoloo event"),
        (
            "string",
            b"\"sms.sent\"".to_vec(),
            "not_an_object",
            "Lisoloo event",
        ),
        (
            "no event_id",
            without("event_id"),
            "missing_field",
            "event_id",
        ),
        (
            "no event_type",
            without("event_type"),
            "missing_field",
            "event_type",
        ),
        (
            "no timestamp",
            without("timestamp"),
            "missing_field",
            "timestamp",
        ),
        (
            "no message_id",
            without("message_id"),
            "missing_field",
            "message_id",
        ),
        ("no data", without("data"), "missing_field", "data"),
        ("null data", with("data", "null"), "missing_field", "data"),
        (
            "null event_id",
            with("event_id", "null"),
            "missing_field",
            "event_id",
        ),
        (
            "event_id not uuid",
            with("event_id", r#""evt-1""#),
            "invalid_field",
            "event_id",
        ),
        (
            "event_id object",
            with("event_id", "{}"),
            "invalid_field",
            "event_id",
        ),
        (
            "empty message_id",
            with("message_id", r#""""#),
            "invalid_field",
            "message_id",
        ),
        (
            "message_id array",
            with("message_id", "[1]"),
            "invalid_field",
            "message_id",
        ),
        (
            "bad timestamp",
            with("timestamp", r#""yesterday""#),
            "invalid_field",
            "timestamp",
        ),
        (
            "unknown type",
            env("sms.clicked", "{}"),
            "unknown_event_type",
            "sms.clicked",
        ),
        (
            "numeric type",
            with("event_type", "5"),
            "unknown_event_type",
            "`5`",
        ),
        (
            "data is a number",
            env("sms.sent", "5"),
            "not_an_object",
            "data",
        ),
        (
            "data is an array",
            env("sms.queued", "[]"),
            "not_an_object",
            "data",
        ),
        (
            "processing no phone",
            env("sms.processing", r#"{"carrier":"x"}"#),
            "missing_field",
            "data.recipient_phone",
        ),
        (
            "processing empty phone",
            env("sms.processing", r#"{"recipient_phone":" "}"#),
            "invalid_field",
            "data.recipient_phone",
        ),
        (
            "processing carrier bool",
            env(
                "sms.processing",
                r#"{"recipient_phone":"+1","carrier":true}"#,
            ),
            "invalid_field",
            "data.carrier",
        ),
        (
            "sent no sent_at",
            env("sms.sent", r#"{"recipient_phone":"+1"}"#),
            "missing_field",
            "data.sent_at",
        ),
        (
            "sent bad sent_at",
            env("sms.sent", r#"{"recipient_phone":"+1","sent_at":"10:15"}"#),
            "invalid_field",
            "data.sent_at",
        ),
        (
            "delivered no delivered_at",
            env("sms.delivered", r#"{"recipient_phone":"+1"}"#),
            "missing_field",
            "data.delivered_at",
        ),
        (
            "delivered bad delivered_at",
            env(
                "sms.delivered",
                r#"{"recipient_phone":"+1","delivered_at":"2026-02-30T00:00:00Z"}"#,
            ),
            "invalid_field",
            "data.delivered_at",
        ),
        (
            "delivered segments text",
            env(
                "sms.delivered",
                r#"{"recipient_phone":"+1","delivered_at":"2026-05-27T10:15:08Z","segments":"one"}"#,
            ),
            "invalid_field",
            "data.segments",
        ),
        (
            "delivered segments negative",
            env(
                "sms.delivered",
                r#"{"recipient_phone":"+1","delivered_at":"2026-05-27T10:15:08Z","segments":-1}"#,
            ),
            "invalid_field",
            "data.segments",
        ),
        (
            "failed no failed_at",
            env("sms.failed", r#"{"recipient_phone":"+1","error_code":"1"}"#),
            "missing_field",
            "data.failed_at",
        ),
        (
            "failed retryable text",
            env(
                "sms.failed",
                r#"{"recipient_phone":"+1","failed_at":"2026-05-27T10:15:08Z","retryable":"no"}"#,
            ),
            "invalid_field",
            "data.retryable",
        ),
        (
            "failed no phone",
            env("sms.failed", r#"{"failed_at":"2026-05-27T10:15:08Z"}"#),
            "missing_field",
            "data.recipient_phone",
        ),
        (
            "queued cost text",
            env("sms.queued", r#"{"total_cost":"0.06"}"#),
            "invalid_field",
            "data.total_cost",
        ),
        (
            "queued recipients float",
            env("sms.queued", r#"{"total_recipients":2.5}"#),
            "invalid_field",
            "data.total_recipients",
        ),
        (
            "queued bad scheduled_at",
            env("sms.queued", r#"{"scheduled_at":"soon"}"#),
            "invalid_field",
            "data.scheduled_at",
        ),
    ];
    check_errors(cases, |b| parse_lisoloo("s", b).map(|_| ()));
}

fn arpoone_doc(status: &str, when: &str, segments: &str, payload: &str) -> String {
    format!(
        r#"{{ "Msisdn": "351912345678", "Status": "{status}", "MessageId": "3f1c2a9e-8b7d-4c6e-9a5b-1d2e3f4a5b6c", "OrganizationId": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d", "ReportDescription": "Carrier said so", "ReportDateTime": "{when}"{segments}{payload} }}"#
    )
}

/// (Status, ReportDateTime, TotalSegments json, CustomPayload json, lattice status,
/// occurred_at, segments, custom_payload)
type ArpooneCase = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Status,
    &'static str,
    Option<u32>,
    Option<&'static str>,
);

#[test]
fn arpoone_documented_reports() {
    // (status, ReportDateTime, TotalSegments, CustomPayload, lattice status, occurred_at, segments, payload)
    let table: &[ArpooneCase] = &[
        (
            "DELIVERED",
            "2026-05-27T10:15:08Z",
            r#", "TotalSegments": 1"#,
            r#", "CustomPayload": "{\"abc\": \"123\"}""#,
            Status::Delivered,
            "2026-05-27T10:15:08Z",
            Some(1),
            Some(r#"{"abc": "123"}"#),
        ),
        (
            "PENDING",
            "2026-05-27T10:15:03",
            r#", "TotalSegments": null"#,
            r#", "CustomPayload": null"#,
            Status::Sent,
            "2026-05-27T10:15:03Z",
            None,
            None,
        ),
        (
            "NOT_DELIVERED",
            "2026-05-27T10:15:05.1234567",
            "",
            "",
            Status::Failed,
            "2026-05-27T10:15:05.1234567Z",
            None,
            None,
        ),
        (
            "delivered",
            "2026-05-27T11:15:08+01:00",
            r#", "TotalSegments": 3"#,
            r#", "CustomPayload": {"abc": "123"}"#,
            Status::Delivered,
            "2026-05-27T10:15:08Z",
            Some(3),
            Some(r#"{"abc": "123"}"#),
        ),
        (
            "Pending",
            "2026-05-27T10:15:03.5-00:30",
            "",
            r#", "CustomPayload": "order-42""#,
            Status::Sent,
            "2026-05-27T10:45:03.5Z",
            None,
            Some("order-42"),
        ),
    ];
    for (status, when, segments, payload, want_status, want_at, want_segments, want_payload) in
        table
    {
        let body = arpoone_doc(status, when, segments, payload);
        let u = parse_arpoone("arp-1", body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(u.provider, Provider::Arpoone);
        assert_eq!(u.source, "arp-1");
        assert_eq!(u.message_id, "3f1c2a9e-8b7d-4c6e-9a5b-1d2e3f4a5b6c");
        assert_eq!(u.recipient, "351912345678");
        assert_eq!(u.status, *want_status, "{status}");
        assert_eq!(u.occurred_at, t(want_at), "{status}");
        let at = Some(t(want_at));
        assert_eq!(
            u.sent_at,
            if *want_status == Status::Sent {
                at
            } else {
                None
            }
        );
        assert_eq!(
            u.delivered_at,
            if *want_status == Status::Delivered {
                at
            } else {
                None
            }
        );
        assert_eq!(
            u.failed_at,
            if *want_status == Status::Failed {
                at
            } else {
                None
            }
        );
        let description = (*want_status == Status::Failed).then_some("Carrier said so");
        assert_eq!(u.error_message.as_deref(), description);
        assert_eq!(u.segments, *want_segments);
        assert_eq!(u.custom_payload.as_deref(), *want_payload);
        assert!(!u.authoritative);
        let canon = status.to_ascii_uppercase();
        let key = arpoone_dedupe_key("arp-1", &u.message_id, "351912345678", &canon, when);
        assert_eq!(u.dedupe_key, key);
        assert_eq!(u.dedupe_key.len(), 64);
        let via = parse_record(Provider::Arpoone, "arp-1", body.as_bytes()).unwrap();
        assert_eq!(via, Event::Recipient(u));
    }
}

#[test]
fn arpoone_dedupe_key_is_unambiguous_and_sensitive() {
    let base = arpoone_dedupe_key("s", "m", "n", "PENDING", "2026-05-27T10:15:03Z");
    assert_eq!(
        base,
        arpoone_dedupe_key("s", "m", "n", "PENDING", "2026-05-27T10:15:03Z")
    );
    let variants = [
        arpoone_dedupe_key("s2", "m", "n", "PENDING", "2026-05-27T10:15:03Z"),
        arpoone_dedupe_key("s", "m2", "n", "PENDING", "2026-05-27T10:15:03Z"),
        arpoone_dedupe_key("s", "m", "n2", "PENDING", "2026-05-27T10:15:03Z"),
        arpoone_dedupe_key("s", "m", "n", "DELIVERED", "2026-05-27T10:15:03Z"),
        arpoone_dedupe_key("s", "m", "n", "PENDING", "2026-05-27T10:15:04Z"),
        // Field boundaries matter: "sm" + "" is not "s" + "m".
        arpoone_dedupe_key("sm", "", "n", "PENDING", "2026-05-27T10:15:03Z"),
    ];
    for v in &variants {
        assert_ne!(&base, v);
    }
    assert_ne!(
        arpoone_dedupe_key("ab", "c", "", "", ""),
        arpoone_dedupe_key("a", "bc", "", "", "")
    );
    // The wire's numeric Msisdn keys the same as its string form.
    let a = parse_arpoone("s", br#"{"Msisdn":351912345678,"Status":"PENDING","MessageId":"m","ReportDateTime":"2026-05-27T10:15:03Z"}"#).unwrap();
    let b = parse_arpoone("s", br#"{"Msisdn":"351912345678","Status":"PENDING","MessageId":"m","ReportDateTime":"2026-05-27T10:15:03Z"}"#).unwrap();
    assert_eq!(a, b);
}

#[test]
fn arpoone_error_paths() {
    let ok = r#"{"Msisdn":"351912345678","Status":"DELIVERED","MessageId":"m-1","ReportDateTime":"2026-05-27T10:15:08Z"}"#;
    let edit = |field: &str, value: Option<&str>| {
        let mut v: serde_json::Value = serde_json::from_str(ok).unwrap();
        match value {
            Some(x) => v[field] = serde_json::from_str(x).unwrap(),
            None => {
                v.as_object_mut().unwrap().remove(field);
            }
        }
        serde_json::to_vec(&v).unwrap()
    };
    let cases: Vec<ErrCase> = vec![
        ("not json", b"Msisdn=1".to_vec(), "not_json", "line 1"),
        (
            "whole array",
            format!("[{ok}]").into_bytes(),
            "not_an_object",
            "one array element",
        ),
        ("no Msisdn", edit("Msisdn", None), "missing_field", "Msisdn"),
        (
            "null Msisdn",
            edit("Msisdn", Some("null")),
            "missing_field",
            "Msisdn",
        ),
        (
            "empty Msisdn",
            edit("Msisdn", Some(r#""""#)),
            "invalid_field",
            "Msisdn",
        ),
        ("no Status", edit("Status", None), "missing_field", "Status"),
        (
            "no MessageId",
            edit("MessageId", None),
            "missing_field",
            "MessageId",
        ),
        (
            "no ReportDateTime",
            edit("ReportDateTime", None),
            "missing_field",
            "ReportDateTime",
        ),
        (
            "unknown Status",
            edit("Status", Some(r#""READ""#)),
            "unknown_status",
            "READ",
        ),
        (
            "bad ReportDateTime",
            edit("ReportDateTime", Some(r#""27/05/2026 10:15""#)),
            "invalid_field",
            "ReportDateTime",
        ),
        (
            "TotalSegments text",
            edit("TotalSegments", Some(r#""two""#)),
            "invalid_field",
            "TotalSegments",
        ),
        (
            "Status object",
            edit("Status", Some("{}")),
            "invalid_field",
            "Status",
        ),
    ];
    check_errors(cases, |b| parse_arpoone("s", b).map(|_| ()));
}

const STATUS_DOC: &str = r#"{
  "message_id": "507f1f77bcf86cd799439011",
  "status": "processing",
  "total_recipients": 3,
  "recipients": [
    {
      "recipient_phone": "+243998857000",
      "status": "delivered",
      "carrier": "vodacom_drc",
      "sent_at": "2026-05-27T10:15:03Z",
      "delivered_at": "2026-05-27T10:15:08Z",
      "failed_at": null,
      "error_code": null,
      "error_message": null,
      "retryable": null,
      "segments": 1
    },
    { "recipient_phone": "+243998857001", "status": "pending", "future_field": [1] },
    { "recipient_phone": "+243998857002", "status": "failed", "carrier": null,
      "sent_at": "2026-05-27T10:15:03.250Z", "failed_at": "2026-05-27T10:15:05.123456Z",
      "error_code": "1502", "error_message": "Number unreachable", "retryable": false }
  ],
  "cost": {"amount": 0.06}
}"#;

#[test]
fn status_api_documented_response() {
    let fetched = Utc.with_ymd_and_hms(2026, 5, 27, 10, 16, 0).unwrap();
    let snap = parse_status_response("src-a", STATUS_DOC.as_bytes(), fetched).unwrap();
    assert_eq!(snap.message_id, MESSAGE_ID);
    assert_eq!(snap.message_status, "processing");
    assert_eq!(snap.total_recipients, Some(3));
    assert_eq!(snap.recipients.len(), 3);
    for u in &snap.recipients {
        assert_eq!(u.provider, Provider::StatusApi);
        assert!(u.authoritative);
        assert_eq!(u.occurred_at, fetched);
        assert_eq!(u.message_id, MESSAGE_ID);
        assert_eq!(u.source, "src-a");
        assert_eq!(u.dedupe_key.len(), 64);
    }
    let [d, p, f] = &snap.recipients[..] else {
        unreachable!()
    };
    assert_eq!(
        (d.recipient.as_str(), d.status),
        ("+243998857000", Status::Delivered)
    );
    assert_eq!(d.carrier.as_deref(), Some("vodacom_drc"));
    assert_eq!(d.sent_at, Some(t("2026-05-27T10:15:03Z")));
    assert_eq!(d.delivered_at, Some(t("2026-05-27T10:15:08Z")));
    assert_eq!(
        (
            d.failed_at,
            d.error_code.as_deref(),
            d.retryable,
            d.segments
        ),
        (None, None, None, Some(1))
    );
    assert_eq!(
        (p.recipient.as_str(), p.status),
        ("+243998857001", Status::Queued)
    );
    assert_eq!(
        (p.sent_at, p.carrier.as_deref(), p.segments),
        (None, None, None)
    );
    assert_eq!(f.status, Status::Failed);
    assert_eq!(f.sent_at, Some(t("2026-05-27T10:15:03.25Z")));
    assert_eq!(f.failed_at, Some(t("2026-05-27T10:15:05.123456Z")));
    assert_eq!(f.error_code.as_deref(), Some("1502"));
    assert_eq!(f.error_message.as_deref(), Some("Number unreachable"));
    assert_eq!(f.retryable, Some(false));
    let keys: std::collections::HashSet<_> =
        snap.recipients.iter().map(|u| &u.dedupe_key).collect();
    assert_eq!(keys.len(), 3, "one key per recipient");

    // Minimal answers are fine: no status, no recipients.
    let snap = parse_status_response("s", br#"{"message_id":"m"}"#, fetched).unwrap();
    assert_eq!(
        (
            snap.message_status.as_str(),
            snap.total_recipients,
            snap.recipients.len()
        ),
        ("", None, 0)
    );
    let snap = parse_status_response(
        "s",
        br#"{"message_id":"m","status":"sent","recipients":null,"total_recipients":null}"#,
        fetched,
    )
    .unwrap();
    assert!(snap.recipients.is_empty());
}

#[test]
fn status_api_error_paths() {
    let cases: Vec<ErrCase> = vec![
        ("html error page", b"<html>502</html>".to_vec(), "not_json", "line 1"),
        ("array", b"[]".to_vec(), "not_an_object", "status API response"),
        ("no message_id", br#"{"status":"sent"}"#.to_vec(), "missing_field", "message_id"),
        ("recipients object", br#"{"message_id":"m","recipients":{}}"#.to_vec(), "invalid_field", "recipients"),
        ("recipient no phone", br#"{"message_id":"m","recipients":[{"status":"sent"}]}"#.to_vec(), "missing_field", "recipients[0].recipient_phone"),
        ("recipient no status", br#"{"message_id":"m","recipients":[{"recipient_phone":"+1","status":"sent"},{"recipient_phone":"+2"}]}"#.to_vec(), "missing_field", "recipients[1].status"),
        ("recipient unknown status", br#"{"message_id":"m","recipients":[{"recipient_phone":"+1","status":"bounced"}]}"#.to_vec(), "unknown_status", "bounced"),
        ("recipient bad time", br#"{"message_id":"m","recipients":[{"recipient_phone":"+1","status":"sent","sent_at":"now"}]}"#.to_vec(), "invalid_field", "recipients[0].sent_at"),
        ("recipient segments text", br#"{"message_id":"m","recipients":[{"recipient_phone":"+1","status":"sent","segments":"1"}]}"#.to_vec(), "invalid_field", "recipients[0].segments"),
        ("recipient retryable number", br#"{"message_id":"m","recipients":[{"recipient_phone":"+1","status":"failed","retryable":0}]}"#.to_vec(), "invalid_field", "recipients[0].retryable"),
    ];
    let fetched = Utc.with_ymd_and_hms(2026, 5, 27, 10, 16, 0).unwrap();
    check_errors(cases, |b| {
        parse_status_response("s", b, fetched).map(|_| ())
    });
}

/// The ingest keeps a body's leading UTF-8 byte-order mark in the raw record
/// (exact bytes), so the consumer's parser must read through it.
#[test]
fn parse_record_ignores_a_leading_byte_order_mark() {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    let with_bom = |b: &[u8]| [BOM, b].concat();
    let delivered = lisoloo(
        "sms.delivered",
        "2026-05-27T10:15:08Z",
        r#"{ "recipient_phone": "+243998857000", "delivered_at": "2026-05-27T10:15:08Z" }"#,
    );
    let queued = lisoloo(
        "sms.queued",
        "2026-05-27T10:15:00Z",
        r#"{ "total_recipients": 1 }"#,
    );
    let report = arpoone_doc("DELIVERED", "2026-05-27T10:15:08Z", "", "");
    for (provider, body) in [
        (Provider::Lisoloo, delivered.as_bytes()),
        (Provider::Lisoloo, queued.as_bytes()),
        (Provider::Arpoone, report.as_bytes()),
    ] {
        let want = parse_record(provider, "s", body).unwrap();
        let got = parse_record(provider, "s", &with_bom(body))
            .unwrap_or_else(|e| panic!("{provider:?} with a BOM: {e}"));
        assert_eq!(got, want, "{provider:?}: the BOM changes nothing");
        // Whitespace after the mark is still JSON whitespace.
        let spaced = with_bom(&[b" \n", body].concat());
        assert_eq!(parse_record(provider, "s", &spaced).unwrap(), want);
    }
    assert_eq!(
        recipient(parse_lisoloo("s", &with_bom(delivered.as_bytes())).unwrap()).message_id,
        MESSAGE_ID
    );
    assert_eq!(
        parse_arpoone("s", &with_bom(report.as_bytes()))
            .unwrap()
            .status,
        Status::Delivered
    );

    // Only one mark, only at the very start; anything else is still refused.
    let not_json: Vec<Vec<u8>> = vec![
        BOM.to_vec(),
        with_bom(BOM),
        with_bom(&with_bom(delivered.as_bytes())),
        [b" ", BOM, delivered.as_bytes()].concat(),
        [&BOM[..2], delivered.as_bytes()].concat(),
    ];
    for bytes in &not_json {
        for provider in [Provider::Lisoloo, Provider::Arpoone] {
            let err = parse_record(provider, "s", bytes).unwrap_err();
            assert_eq!(err.kind(), "not_json", "{provider:?} {bytes:?}: {err}");
        }
    }
    // The mark does not turn a non-object into a record.
    let err = parse_record(Provider::Lisoloo, "s", &with_bom(b"[1, 2]")).unwrap_err();
    assert_eq!(err.kind(), "not_an_object", "{err}");
}

#[test]
fn parse_record_refuses_status_api() {
    let err = parse_record(Provider::StatusApi, "s", STATUS_DOC.as_bytes()).unwrap_err();
    assert!(matches!(
        err,
        ParseError::UnsupportedProvider(Provider::StatusApi)
    ));
}

#[test]
fn enums_spell_and_order_as_documented() {
    assert_eq!(
        serde_json::to_string(&Provider::StatusApi).unwrap(),
        r#""status_api""#
    );
    assert_eq!(
        serde_json::to_string(&Provider::Lisoloo).unwrap(),
        r#""lisoloo""#
    );
    assert_eq!(
        serde_json::to_string(&Provider::Arpoone).unwrap(),
        r#""arpoone""#
    );
    for p in [Provider::Lisoloo, Provider::Arpoone, Provider::StatusApi] {
        assert_eq!(p.as_str().parse::<Provider>().unwrap(), p);
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            format!("\"{}\"", p.as_str())
        );
    }
    for s in Status::ALL {
        assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{}\"", s.as_str())
        );
        assert_eq!(s.is_terminal(), s.rank() == 3);
    }
    assert!("pending".parse::<Status>().is_err());
    assert!(Status::Queued < Status::Processing && Status::Processing < Status::Sent);
    assert!(Status::Sent < Status::Delivered && Status::Sent < Status::Failed);
    assert_eq!(Status::Delivered.rank(), Status::Failed.rank());
    // DeliveryUpdate round-trips through JSON (it rides on the delivery topic).
    let u = parse_status_response("s", STATUS_DOC.as_bytes(), Utc::now())
        .unwrap()
        .recipients
        .remove(2);
    let back: DeliveryUpdate = serde_json::from_str(&serde_json::to_string(&u).unwrap()).unwrap();
    assert_eq!(back, u);
}
