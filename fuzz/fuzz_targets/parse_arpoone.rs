#![no_main]
//! Any bytes: `parse_arpoone` returns a value or a typed error, never panics; the
//! dedupe key is stable and a parsed update merges idempotently.

use dlrflow_events::{merge, parse_arpoone, MergeOutcome};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(update) = parse_arpoone("fuzz", data) {
        assert_eq!(update.dedupe_key.len(), 64);
        let again = parse_arpoone("fuzz", data).expect("same bytes parse the same");
        assert_eq!(again.dedupe_key, update.dedupe_key);
        let state = merge(None, &update).into_state().expect("applied");
        assert_eq!(merge(Some(&state), &update), MergeOutcome::Unchanged);
    }
});
