//! Bounded text: what dlrflow copies from untrusted input into logs, error
//! headers and analytics records is cut to a documented length, and what it
//! prints of a connection URL never holds the password.

use std::borrow::Cow;

/// The bound of an error text copied into a DLQ header, a log line or a
/// dead-lettered reference (bytes).
pub const ERROR_BOUND: usize = 1024;

/// Cuts `s` to at most `max` bytes at a character boundary, appending
/// `…[+N bytes]` (within the bound) when it cut anything.
pub fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let marker = format!("…[+{} bytes]", s.len());
    let keep = max.saturating_sub(marker.len());
    let mut end = keep.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{marker}", &s[..end]))
}

/// The first `max` bytes of `bytes` as text (invalid UTF-8 replaced), for a
/// reference to a record too large to copy.
pub fn head(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    let text = String::from_utf8_lossy(cut);
    // A multi-byte character cut in half at the end becomes U+FFFD: harmless.
    text.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_short_text_and_bounds_long_text() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(1000);
        let t = truncate(&long, 100);
        assert!(t.len() <= 100, "{}", t.len());
        assert!(t.ends_with("…[+2000 bytes]"));
        assert!(truncate(&long, 3).len() <= 3 + "…[+2000 bytes]".len());
    }

    #[test]
    fn head_is_bounded_text() {
        assert_eq!(head(b"abcdef", 3), "abc");
        assert_eq!(head(&[0xff, b'a'], 10), "\u{fffd}a");
    }
}
