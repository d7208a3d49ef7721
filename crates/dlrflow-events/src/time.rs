//! A small, fast, lenient RFC 3339 / ISO 8601 timestamp reader.
//!
//! Accepted: `YYYY-MM-DD` + `T`/`t`/space + `HH:MM:SS`, an optional fraction of
//! any length (digits past nanoseconds are dropped), and an optional offset `Z`,
//! `z`, `±HH:MM`, `±HHMM` or `±HH`. No offset means UTC. Hand-written because
//! it runs on every event and chrono's general parser is several times slower.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, Utc};

/// Why a timestamp was refused; shown inside [`crate::ParseError::InvalidField`].
pub(crate) type TimeError = &'static str;

fn digits(b: &[u8], at: usize, n: usize) -> Result<u32, TimeError> {
    let slice = b.get(at..at + n).ok_or("timestamp is too short")?;
    let mut v = 0u32;
    for &c in slice {
        if !c.is_ascii_digit() {
            return Err("expected a digit");
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Ok(v)
}

fn expect(b: &[u8], at: usize, c: u8) -> Result<(), TimeError> {
    if b.get(at) == Some(&c) {
        Ok(())
    } else {
        Err("not an ISO 8601 timestamp (YYYY-MM-DDTHH:MM:SS[.f][Z|±HH:MM])")
    }
}

/// Parses a timestamp; see the module docs for what is accepted.
pub(crate) fn parse_timestamp(s: &str) -> Result<DateTime<Utc>, TimeError> {
    let b = s.trim().as_bytes();
    let year = digits(b, 0, 4)?;
    expect(b, 4, b'-')?;
    let month = digits(b, 5, 2)?;
    expect(b, 7, b'-')?;
    let day = digits(b, 8, 2)?;
    match b.get(10) {
        Some(b'T' | b't' | b' ') => {}
        _ => return Err("expected `T` between date and time"),
    }
    let hour = digits(b, 11, 2)?;
    expect(b, 13, b':')?;
    let minute = digits(b, 14, 2)?;
    expect(b, 16, b':')?;
    let mut second = digits(b, 17, 2)?;
    let mut i = 19;
    let mut nanos = 0u32;
    if matches!(b.get(i), Some(b'.' | b',')) {
        i += 1;
        let start = i;
        let mut scale = 100_000_000u32;
        while let Some(c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            nanos += u32::from(c - b'0') * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return Err("empty fraction of a second");
        }
    }
    let offset_secs: i64 = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') => {
            i += 1;
            0
        }
        Some(&sign @ (b'+' | b'-')) => {
            let oh = digits(b, i + 1, 2)?;
            i += 3;
            let om = if b.get(i) == Some(&b':') {
                i += 3;
                digits(b, i - 2, 2)?
            } else if b.len() >= i + 2 {
                i += 2;
                digits(b, i - 2, 2)?
            } else {
                0
            };
            if oh > 23 || om > 59 {
                return Err("offset out of range");
            }
            let secs = i64::from(oh * 3600 + om * 60);
            if sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        Some(_) => return Err("unexpected characters after the time"),
    };
    if i != b.len() {
        return Err("unexpected characters after the timestamp");
    }
    // A leap second is folded into the last second of the minute, as chrono does.
    if second == 60 {
        second = 59;
        nanos += 1_000_000_000;
    }
    let date = NaiveDate::from_ymd_opt(year as i32, month, day).ok_or("no such date")?;
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanos).ok_or("no such time")?;
    let local = NaiveDateTime::new(date, time);
    let utc = local
        .checked_sub_signed(TimeDelta::seconds(offset_secs))
        .ok_or("timestamp out of range")?;
    Ok(utc.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, ns: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap() + TimeDelta::nanoseconds(ns.into())
    }

    #[test]
    fn accepts_the_documented_and_lenient_forms() {
        let cases: &[(&str, DateTime<Utc>)] = &[
            ("2026-05-27T10:15:08Z", utc(2026, 5, 27, 10, 15, 8, 0)),
            ("2026-05-27T10:15:08z", utc(2026, 5, 27, 10, 15, 8, 0)),
            ("2026-05-27T10:15:08", utc(2026, 5, 27, 10, 15, 8, 0)),
            ("2026-05-27 10:15:08", utc(2026, 5, 27, 10, 15, 8, 0)),
            (
                "2026-05-27T10:15:08.5Z",
                utc(2026, 5, 27, 10, 15, 8, 500_000_000),
            ),
            (
                "2026-05-27T10:15:08.1234567",
                utc(2026, 5, 27, 10, 15, 8, 123_456_700),
            ),
            (
                "2026-05-27T10:15:08.123456789123Z",
                utc(2026, 5, 27, 10, 15, 8, 123_456_789),
            ),
            ("2026-05-27T12:15:08+02:00", utc(2026, 5, 27, 10, 15, 8, 0)),
            (
                "2026-05-27T08:15:08.250-0200",
                utc(2026, 5, 27, 10, 15, 8, 250_000_000),
            ),
            ("2026-05-27T11:15:08+01", utc(2026, 5, 27, 10, 15, 8, 0)),
            ("2026-05-27T00:15:08-10:00", utc(2026, 5, 27, 10, 15, 8, 0)),
            (" 2026-05-27T10:15:08Z ", utc(2026, 5, 27, 10, 15, 8, 0)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_timestamp(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn agrees_with_chrono_on_rfc3339() {
        for text in [
            "2026-05-27T10:15:08Z",
            "1999-12-31T23:59:59.999999999+14:00",
            "2000-02-29T00:00:00-12:30",
        ] {
            let want = DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc);
            assert_eq!(parse_timestamp(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn refuses_garbage() {
        for text in [
            "",
            "2026",
            "2026-05-27",
            "2026-05-27T10:15",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-05-27T24:00:00Z",
            "2026-05-27T10:15:08.Z",
            "2026-05-27T10:15:08+2:00",
            "2026-05-27T10:15:08+25:00",
            "2026-05-27T10:15:08Zjunk",
            "2026-05-27X10:15:08Z",
            "yesterday",
            "2026-05-27T10:15:08+01:0",
        ] {
            assert!(parse_timestamp(text).is_err(), "{text:?} should be refused");
        }
    }
}
