//! W3C trace context (`traceparent`) carried from the HTTP request into Kafka
//! headers and on to every consumer.

/// Returns `value` when it is a well-formed W3C `traceparent`
/// (`00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero), else `None`, so a
/// malformed header is dropped rather than propagated.
pub fn valid_traceparent(value: &str) -> Option<&str> {
    let value = value.trim();
    let parts: Vec<&str> = value.split('-').collect();
    if parts.len() < 4 {
        return None;
    }
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let (version, trace_id, parent_id, flags) = (parts[0], parts[1], parts[2], parts[3]);
    if !hex(version, 2)
        || version == "ff"
        || !hex(trace_id, 32)
        || !hex(parent_id, 16)
        || !hex(flags, 2)
    {
        return None;
    }
    if version == "00" && parts.len() != 4 {
        return None;
    }
    if trace_id.bytes().all(|b| b == b'0') || parent_id.bytes().all(|b| b == b'0') {
        return None;
    }
    Some(value)
}

/// The trace id part of a valid `traceparent`, for log fields.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    valid_traceparent(traceparent).map(|t| &t[3..35])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_w3c_example_and_rejects_malformed_values() {
        let ok = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(valid_traceparent(ok), Some(ok));
        assert_eq!(trace_id(ok), Some("0af7651916cd43dd8448eb211c80319c"));
        for bad in [
            "",
            "garbage",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert_eq!(valid_traceparent(bad), None, "{bad}");
        }
    }
}
