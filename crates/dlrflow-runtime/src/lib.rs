//! Shared plumbing for every dlrflow binary: typed configuration loading
//! (embedded defaults, then a file, then `DLRFLOW_` environment variables),
//! telemetry (JSON logs through `tracing`, Prometheus metrics), Kafka client
//! settings with pass-through librdkafka options, W3C trace-context headers,
//! and the process shutdown signal.
//!
//! This crate holds no business rules: it never parses a webhook, never
//! decides a status, and never talks to PostgreSQL or Redis on its own.

pub mod config;
pub mod kafka;
pub mod shutdown;
pub mod supervise;
pub mod telemetry;
pub mod testing;
pub mod text;
pub mod trace;

pub use secrecy::{ExposeSecret, SecretString};
