//! Helpers shared by the provider parsers: lenient scalar types, error paths,
//! the length-prefixed hash behind synthetic dedupe keys.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{self, Deserialize, Deserializer, Visitor};
use sha2::{Digest, Sha256};

use crate::error::ParseError;
use crate::time::parse_timestamp;

/// A string field that some senders write as a JSON number (`"error_code": 1502`,
/// `"Msisdn": 243998857000`). Borrowed from the input when it has no escapes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Text<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Deserializes `bytes` as `T`. The fast path is plain serde_json; only when it
/// fails is the input read again, through `serde_path_to_error`, to name the
/// field that broke (`prefix` is prepended to that path, e.g. `data.`).
pub(crate) fn from_json<'a, T: serde::Deserialize<'a>>(
    bytes: &'a [u8],
    what: &'static str,
    prefix: &str,
) -> Result<T, ParseError> {
    // serde's derived structs also accept a JSON array (positional fields):
    // only an object is a record.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Err(e) => ParseError::NotJson(e),
                Ok(_) => ParseError::NotAnObject { what },
            },
        );
    }
    match serde_json::from_slice::<T>(bytes) {
        Ok(v) => Ok(v),
        Err(e) => Err(describe::<T>(bytes, e, what, prefix)),
    }
}

#[cold]
fn describe<'a, T: serde::Deserialize<'a>>(
    bytes: &'a [u8],
    err: serde_json::Error,
    what: &'static str,
    prefix: &str,
) -> ParseError {
    if err.is_syntax() || err.is_eof() || err.is_io() {
        return ParseError::NotJson(err);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(e) => {
            let path = e.path().to_string();
            if path == "." || path.is_empty() {
                // Wrong type at the root: `[...]` or `"x"` where an object belongs.
                if e.inner().to_string().contains("invalid type") {
                    return ParseError::NotAnObject { what };
                }
                return ParseError::invalid(prefix.trim_end_matches('.'), err.to_string());
            }
            ParseError::invalid(format!("{prefix}{path}"), e.into_inner().to_string())
        }
        // Cannot happen (same input, same type), but never panic on input.
        Ok(_) => ParseError::invalid(prefix.trim_end_matches('.'), err.to_string()),
    }
}

/// `bytes` without a leading UTF-8 byte-order mark. JSON must not start with
/// one (RFC 8259 §8.1) but a parser may ignore it, and some senders write it;
/// the ingest keeps it in the raw record, so the parsers skip it.
pub(crate) fn without_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// A required field: `None` (absent or `null`) becomes `MissingField`.
pub(crate) fn required<T>(v: Option<T>, field: &'static str) -> Result<T, ParseError> {
    v.ok_or_else(|| ParseError::missing(field))
}

/// Parses a timestamp field, naming it on failure.
pub(crate) fn timestamp(
    raw: &str,
    field: impl FnOnce() -> String,
) -> Result<DateTime<Utc>, ParseError> {
    parse_timestamp(raw)
        .map_err(|reason| ParseError::invalid(field(), format!("{reason}: `{raw}`")))
}

/// sha256 hex of the fields, each written as an 8-byte big-endian length and
/// then its bytes, so no two different field lists encode the same.
pub(crate) fn hash_fields(fields: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for f in fields {
        h.update((f.len() as u64).to_be_bytes());
        h.update(f);
    }
    hex::encode(h.finalize())
}

/// A required text field that must also not be empty (ids, phone numbers).
pub(crate) fn nonempty<'a>(
    v: Option<Text<'a>>,
    field: &'static str,
) -> Result<Text<'a>, ParseError> {
    let t = required(v, field)?;
    if t.0.trim().is_empty() {
        return Err(ParseError::invalid(field, "empty"));
    }
    Ok(t)
}
