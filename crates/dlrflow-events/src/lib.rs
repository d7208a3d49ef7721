//! `dlrflow-events` owns dlrflow's business rules about delivery reports: the
//! providers' wire formats (the Lisoloo envelope and its five data shapes, one
//! Arpoone report, the status API's answer), their normalization into one
//! [`DeliveryUpdate`], the status lattice `queued < processing < sent <
//! {delivered, failed}`, the dedupe keys, and [`merge`], which folds updates into
//! a [`RecipientState`] so that any arrival order converges. Everything here is a
//! pure function of its arguments: this crate must never do I/O (no network,
//! Kafka, Redis, database, files, clock or randomness), never depend on a crate
//! that does, and never panic on input: bad records are a typed [`ParseError`]
//! for the caller to send to the DLQ.

mod arpoone;
mod error;
mod lisoloo;
mod merge;
mod status;
mod status_api;
mod time;
mod update;
mod wire;

pub use arpoone::{arpoone_dedupe_key, parse_arpoone};
pub use error::ParseError;
pub use lisoloo::{parse_lisoloo, LISOLOO_EVENT_TYPES};
pub use merge::{
    merge, merge_message, MergeOutcome, MessageState, RecipientState, ReconcileReason,
};
pub use status::{Provider, Status, UnknownName};
pub use status_api::{parse_status_response, StatusSnapshot};
pub use update::{update_id, DeliveryUpdate, Event, MessageUpdate, UPDATE_ID_NAMESPACE};

/// Parses one raw record of the raw topic: a Lisoloo body, or one Arpoone array
/// element, exactly as the ingest wrote it (a leading UTF-8 byte-order mark
/// is ignored). [`Provider::StatusApi`] has no raw records and is refused.
pub fn parse_record(provider: Provider, source: &str, bytes: &[u8]) -> Result<Event, ParseError> {
    match provider {
        Provider::Lisoloo => parse_lisoloo(source, bytes),
        Provider::Arpoone => parse_arpoone(source, bytes).map(Event::Recipient),
        Provider::StatusApi => Err(ParseError::UnsupportedProvider(provider)),
    }
}

/// Parses a timestamp the way every parser here does: RFC 3339 / ISO 8601 with
/// or without fraction and offset, no offset meaning UTC.
pub fn parse_timestamp(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    time::parse_timestamp(text).ok()
}
