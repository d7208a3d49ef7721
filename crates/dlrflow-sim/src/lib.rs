//! `dlrflow-sim` owns a faithful simulation of the SMS gateways dlrflow listens
//! to, and a verifier. The Lisoloo sender plans sends (messages × recipients),
//! walks each recipient through pending → processing → sent → delivered |
//! failed, and POSTs one JSON event per transition with HTTP Basic auth, the
//! documented retry rules (2xx acks, 4xx drops, 5xx / connection error /
//! 5 s timeout retries after 30 s, 2 m, 10 m, 1 h, scaled by a time factor),
//! reordering and duplicates; its gateway state is served by a
//! `GET /status/{message_id}` server with the 120-reads-per-minute limit. The
//! Arpoone sender POSTs arrays of up to 1,000 records. Every run writes its
//! ground truth, which `verify` compares with dlrflow's read API.
//!
//! It must never depend on `dlrflow-events` or any other dlrflow crate: it is
//! an independent oracle, so it builds and checks the wire formats from its
//! own reading of the providers' documents (shared/seeds) — a shared bug would
//! otherwise pass unnoticed. It speaks only HTTP, never Kafka, Redis or
//! PostgreSQL, and only to the addresses it is given.

pub mod arpoone;
pub mod delivery;
pub mod lisoloo;
pub mod report;
pub mod status;
pub mod truth;
pub mod verify;

pub use arpoone::{run_arpoone, run_arpoone_plan, ArpooneConfig, ArpoonePlan, Routing};
pub use delivery::{DeliveryConfig, TypeReport, DEFAULT_RETRY_SCHEDULE};
pub use lisoloo::{run_lisoloo, run_lisoloo_plan, CarrierProfile, LisolooConfig, LisolooPlan};
pub use report::SimReport;
pub use status::{Gateway, ReadRecord, StatusResponse, StatusServer, StatusServerConfig};
pub use truth::{FinalStatus, Provider, Truth, TruthRecipient, WebhookFate};
pub use verify::{verify, verify_with, Verdict, VerifyOptions, VerifyReport};
