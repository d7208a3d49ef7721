//! Property: whatever a mutated event looks like, the real write path
//! (parse → validate → PostgreSQL, isolating refused records) gives every
//! record a disposition — written or dead-lettered — in one pass, never a
//! backend error that would make the consumer retry the batch forever; and
//! the same batch again changes nothing.

mod common;

use common::Env;
use dlrflow_runtime::kafka::header;
use dlrflow_state::consumer::{dispose, Disposition};
use dlrflow_state::Outcome;
use proptest::prelude::*;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

/// Raw JSON tokens that PostgreSQL, serde or the parser may choke on.
const HOSTILE: &[&str] = &[
    r#""\ud800""#,
    r#""\udc00x\ud800""#,
    r#""\u0000""#,
    r#""a\u0000b""#,
    "1e1001",
    "-1e1001",
    "123456789012345678901234567890",
    "-1",
    "0.5",
    "true",
    "null",
    "{}",
    "[]",
    r#""""#,
    r#"" ""#,
    r#""\u0001\u001f\u007f""#,
    r#""9999-12-31T23:59:59Z""#,
    r#""0000-01-01T00:00:00+23:59""#,
    r#""2026-05-27T10:00:00""#,
    r#""2026-13-45T99:99:99Z""#,
    r#""not a time""#,
    r#""+1555000000""#,
    r#""sms.delivered""#,
    r#""sms.nonsense""#,
    r#""\u202e\ufeff""#,
];

const FIELDS: &[&str] = &[
    "event_id",
    "event_type",
    "timestamp",
    "message_id",
    "data",
    "data.recipient_phone",
    "data.carrier",
    "data.delivered_at",
    "data.failed_at",
    "data.error_code",
    "data.error_message",
    "data.retryable",
    "data.segments",
    "data.total_recipients",
    "data.total_cost",
    "data.currency",
    "data.scheduled_at",
    "data.extra",
];

#[derive(Debug, Clone)]
enum Mutation {
    /// Replace (or add) a field's value with a hostile token.
    Set(usize, usize),
    /// A long string (KiB) in a field.
    Long(usize, usize),
    /// Deeply nested arrays in a field.
    Deep(usize, usize),
    /// The same key twice, the second hostile.
    Duplicate(usize, usize),
    /// A UTF-8 byte-order mark before the body.
    Bom,
    /// The body cut short.
    Cut(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let f = 0..FIELDS.len();
    prop_oneof![
        4 => (f.clone(), 0..HOSTILE.len()).prop_map(|(a, b)| Mutation::Set(a, b)),
        1 => (f.clone(), 1..200usize).prop_map(|(a, b)| Mutation::Long(a, b)),
        1 => (f.clone(), 1..200usize).prop_map(|(a, b)| Mutation::Deep(a, b)),
        1 => (f, 0..HOSTILE.len()).prop_map(|(a, b)| Mutation::Duplicate(a, b)),
        1 => Just(Mutation::Bom),
        1 => (0..400usize).prop_map(Mutation::Cut),
    ]
}

fn base(tag: &str, n: usize, kind: usize) -> serde_json::Value {
    let types = [
        "sms.queued",
        "sms.processing",
        "sms.sent",
        "sms.delivered",
        "sms.failed",
    ];
    serde_json::json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": types[kind % types.len()],
        "timestamp": "2026-05-27T10:00:05.000Z",
        "message_id": format!("{tag}-m{}", n % 3),
        "data": {
            "recipient_phone": format!("+1555{:07}", n % 5),
            "carrier": "vodacom",
            "delivered_at": "2026-05-27T10:00:05Z",
            "failed_at": "2026-05-27T10:00:05Z",
            "error_code": "E1",
            "error_message": "absent",
            "retryable": true,
            "segments": 1,
            "total_recipients": 5,
            "total_cost": 0.1,
            "currency": "USD",
        }
    })
}

/// Renders `v` with `field` set to the raw JSON text `token`.
fn with_token(mut v: serde_json::Value, field: &str, token: &str, duplicate: bool) -> String {
    const MARK: &str = "__HOSTILE_TOKEN__";
    let (obj, key) = match field.split_once('.') {
        Some((outer, inner)) => (&mut v[outer], inner),
        None => (&mut v, field),
    };
    if let Some(map) = obj.as_object_mut() {
        if duplicate {
            map.insert(format!("{key}{MARK}dup"), serde_json::Value::Null);
        } else {
            map.insert(key.to_owned(), MARK.into());
        }
    }
    let text = v.to_string();
    if duplicate {
        // `"key__HOSTILE_TOKEN__dup":null` → `"key":token` next to the real key.
        text.replace(
            &format!("\"{key}{MARK}dup\":null"),
            &format!("\"{key}\":{token}"),
        )
    } else {
        text.replace(&format!("\"{MARK}\""), token)
    }
}

fn render(tag: &str, n: usize, kind: usize, m: &Mutation) -> Vec<u8> {
    let v = base(tag, n, kind);
    match m {
        Mutation::Set(f, t) => with_token(v, FIELDS[*f], HOSTILE[*t], false).into_bytes(),
        Mutation::Duplicate(f, t) => with_token(v, FIELDS[*f], HOSTILE[*t], true).into_bytes(),
        Mutation::Long(f, kib) => {
            let token = format!("\"{}\"", "é".repeat(kib * 512));
            with_token(v, FIELDS[*f], &token, false).into_bytes()
        }
        Mutation::Deep(f, depth) => {
            let token = format!("{}{}", "[".repeat(*depth), "]".repeat(*depth));
            with_token(v, FIELDS[*f], &token, false).into_bytes()
        }
        Mutation::Bom => {
            let mut b = vec![0xEF, 0xBB, 0xBF];
            b.extend_from_slice(v.to_string().as_bytes());
            b
        }
        Mutation::Cut(at) => {
            let s = v.to_string().into_bytes();
            s[..(*at).min(s.len())].to_vec()
        }
    }
}

fn message(payload: Vec<u8>, offset: i64) -> OwnedMessage {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: header::SOURCE,
            value: Some("lisoloo-main"),
        })
        .insert(Header {
            key: header::PROVIDER,
            value: Some("lisoloo"),
        });
    OwnedMessage::new(
        Some(payload),
        None,
        "raw".into(),
        Timestamp::NotAvailable,
        0,
        offset,
        Some(headers),
    )
}

#[test]
fn every_mutated_record_is_written_or_dead_lettered_in_one_pass() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (env, pool) = rt.block_on(async {
        let env = Env::new(1).await;
        let pool = env.pool().await;
        (env, pool)
    });
    let case = std::sync::atomic::AtomicUsize::new(0);
    let config = ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(batch in proptest::collection::vec((0..5usize, mutation()), 1..16))| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}-c{n}", env.group);
        let msgs: Vec<OwnedMessage> = batch
            .iter()
            .enumerate()
            .map(|(n, (kind, m))| message(render(&tag, n, *kind, m), n as i64))
            .collect();
        let again = msgs.clone();
        let first = rt.block_on(dispose(&pool, msgs));
        let first = first.map_err(|e| TestCaseError::fail(format!("backend error: {e:#}")))?;
        prop_assert_eq!(first.len(), batch.len());
        // Replaying the batch changes nothing: everything is a duplicate or
        // dead again.
        let second = rt.block_on(dispose(&pool, again))
            .map_err(|e| TestCaseError::fail(format!("backend error on replay: {e:#}")))?;
        for (a, b) in first.iter().zip(&second) {
            match (a, b) {
                (Disposition::Dead(x), Disposition::Dead(y)) => prop_assert_eq!(x.kind, y.kind),
                (Disposition::Written(_), Disposition::Written(o)) => {
                    prop_assert_eq!(*o, Outcome::Duplicate)
                }
                (Disposition::Written(o), Disposition::Dead(_)) if *o == Outcome::Duplicate => {}
                (a, b) => prop_assert!(false, "{:?} then {:?}", a, b),
            }
        }
    });
    rt.block_on(async {
        pool.close().await;
        env.drop_schema().await;
    });
}
