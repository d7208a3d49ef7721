//! Shared plumbing for every dlrflow binary: the service skeleton
//! ([`service`]: listener, health/readiness/metrics routes, supervised tasks,
//! drain and flush), the shared settings types ([`settings`]), typed
//! configuration loading (embedded defaults, then a file, then `DLRFLOW_`
//! environment variables),
//! telemetry (JSON logs through `tracing`, OpenTelemetry traces over OTLP
//! when configured, Prometheus metrics), Kafka client
//! settings with pass-through librdkafka options, W3C trace-context headers,
//! and the process shutdown signal.
//!
//! This crate holds no business rules: it never parses a webhook, never
//! decides a status, and only opens connections to PostgreSQL and Redis for
//! the services (it never queries them on its own).

pub mod cli;
pub mod config;
pub mod kafka;
pub mod listener;
pub mod otel;
pub mod redact;
pub mod service;
pub mod settings;
pub mod shutdown;
pub mod supervise;
pub mod telemetry;
pub mod text;
pub mod trace;

pub use secrecy::{ExposeSecret, SecretString};
pub use settings::Secret;
