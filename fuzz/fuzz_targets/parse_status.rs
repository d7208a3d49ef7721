#![no_main]
//! Any bytes: `parse_status_response` returns a value or a typed error, never
//! panics; every recipient it yields is authoritative and wins a merge.

use chrono::{TimeZone, Utc};
use dlrflow_events::{merge, parse_status_response, Provider};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fetched_at = Utc.with_ymd_and_hms(2026, 5, 27, 10, 16, 0).unwrap();
    if let Ok(snapshot) = parse_status_response("fuzz", data, fetched_at) {
        for update in &snapshot.recipients {
            assert!(update.authoritative);
            assert_eq!(update.provider, Provider::StatusApi);
            let state = merge(None, update).into_state().expect("applied");
            assert_eq!(state.status, update.status);
            assert!(!state.needs_reconcile);
        }
    }
});
