#![no_main]
//! Any bytes: `parse_lisoloo` returns a value or a typed error, never panics; a
//! parsed recipient update merges cleanly (idempotently) into an empty state.

use dlrflow_events::{merge, parse_lisoloo, parse_record, Event, MergeOutcome, Provider};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = parse_lisoloo("fuzz", data);
    // The dispatcher must agree with the direct parser.
    assert_eq!(
        parsed.is_ok(),
        parse_record(Provider::Lisoloo, "fuzz", data).is_ok()
    );
    if let Ok(Event::Recipient(update)) = parsed {
        let first = merge(None, &update);
        let state = first
            .state()
            .expect("a new recipient is always applied")
            .clone();
        assert_eq!(merge(Some(&state), &update), MergeOutcome::Unchanged);
    }
});
