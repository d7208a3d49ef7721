//! The typed configuration of `dlrflow-state`. Defaults live in [`DEFAULTS`];
//! a file and `DLRFLOW_…` environment variables override them (see
//! `dlrflow_runtime::config`), e.g. `DLRFLOW_POSTGRES__SCHEMA=tenant_a`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use dlrflow_runtime::config::{self, ConfigError};
use dlrflow_runtime::kafka::KafkaConfig;
use serde::Deserialize;

pub const DEFAULTS: &str = r#"
[http]
listen = "127.0.0.1:8081"
shutdown_grace_ms = 10000

[kafka]
brokers = "127.0.0.1:9092"
raw_topic = "dlrflow.webhooks.raw.v1"
dlq_topic = "dlrflow.webhooks.dlq.v1"
delivery_topic = "dlrflow.delivery.v1"
group_id = "dlrflow-state"
produce_timeout_ms = 10000

[batch]
max_records = 2000
max_wait_ms = 50
retry_initial_ms = 100
retry_max_ms = 5000

[redis]
url = "redis://127.0.0.1:6379"
prefix = "dlrflow:"
ttl_secs = 604800

[postgres]
url = "postgres://postgres@127.0.0.1:5432/dlrflow"
pool_size = 8
acquire_timeout_ms = 5000

[health]
stall_after_ms = 30000

[outbox]
batch_size = 1000
idle_poll_ms = 50
retention_secs = 3600
"#;

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub http: HttpConfig,
    pub kafka: StateKafkaConfig,
    pub batch: BatchConfig,
    pub redis: RedisConfig,
    pub postgres: PostgresConfig,
    pub outbox: OutboxConfig,
    pub health: HealthConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HealthConfig {
    /// `/readyz` says not ready when the consumer loop has not come round,
    /// or one batch has kept failing, for this long.
    pub stall_after_ms: u64,
}

impl HealthConfig {
    pub fn stall_after(&self) -> Duration {
        Duration::from_millis(self.stall_after_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// How long shutdown waits for in-flight work (HTTP, the current batch).
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StateKafkaConfig {
    #[serde(flatten)]
    pub client: KafkaConfig,
    pub raw_topic: String,
    pub dlq_topic: String,
    pub delivery_topic: String,
    pub group_id: String,
    /// Optional static group membership (`group.instance.id`): a replica that
    /// restarts with the same id takes its partitions back at once instead of
    /// waiting for the broker to expire its old session. Use a stable,
    /// per-replica value (e.g. the pod name of a StatefulSet).
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Longest wait for a DLQ / analytics / replay produce acknowledgement.
    pub produce_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BatchConfig {
    /// At most this many records per Redis round trip and PostgreSQL transaction.
    pub max_records: usize,
    /// A batch closes this long after its first record at the latest.
    pub max_wait_ms: u64,
    /// Backoff of a failing batch (Redis, PostgreSQL or broker down), doubling.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RedisConfig {
    pub url: String,
    /// Every dedupe key is `{prefix}d:{dedupe_key}`.
    pub prefix: String,
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PostgresConfig {
    pub url: String,
    /// Optional schema: created if missing and set as `search_path`.
    #[serde(default)]
    pub schema: Option<String>,
    pub pool_size: u32,
    pub acquire_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OutboxConfig {
    /// Rows published per relay round.
    pub batch_size: i64,
    /// Relay poll interval when the outbox is empty.
    pub idle_poll_ms: u64,
    /// Published rows are deleted after this long.
    pub retention_secs: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/dlrflow".into(),
            schema: None,
            pool_size: 8,
            acquire_timeout_ms: 5000,
        }
    }
}

impl Config {
    /// Loads and validates the configuration.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg: Config = config::load(DEFAULTS, file)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads the defaults only (plus the environment), for tests and tools.
    pub fn defaults() -> Self {
        toml_defaults()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.client.validate()?;
        for (name, value) in [
            ("kafka.raw_topic", &self.kafka.raw_topic),
            ("kafka.dlq_topic", &self.kafka.dlq_topic),
            ("kafka.delivery_topic", &self.kafka.delivery_topic),
            ("kafka.group_id", &self.kafka.group_id),
            ("redis.url", &self.redis.url),
            ("postgres.url", &self.postgres.url),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::invalid(name, "must not be empty"));
            }
        }
        if self.kafka.raw_topic == self.kafka.dlq_topic {
            return Err(ConfigError::invalid(
                "kafka.dlq_topic",
                "must differ from kafka.raw_topic",
            ));
        }
        if !(1..=100_000).contains(&self.batch.max_records) {
            return Err(ConfigError::invalid(
                "batch.max_records",
                "must be between 1 and 100000",
            ));
        }
        if self.batch.max_wait_ms > 60_000 {
            return Err(ConfigError::invalid(
                "batch.max_wait_ms",
                "must be at most 60000",
            ));
        }
        if self.batch.retry_initial_ms == 0 || self.batch.retry_max_ms < self.batch.retry_initial_ms
        {
            return Err(ConfigError::invalid(
                "batch.retry_max_ms",
                "needs 0 < batch.retry_initial_ms <= batch.retry_max_ms",
            ));
        }
        if self.redis.ttl_secs == 0 {
            return Err(ConfigError::invalid("redis.ttl_secs", "must be positive"));
        }
        if self.postgres.pool_size < 2 {
            return Err(ConfigError::invalid(
                "postgres.pool_size",
                "must be at least 2 (consumer + relay)",
            ));
        }
        if let Some(schema) = &self.postgres.schema {
            if !valid_identifier(schema) {
                return Err(ConfigError::invalid(
                    "postgres.schema",
                    "use lower-case letters, digits and '_' (not starting with a digit)",
                ));
            }
        }
        if self.outbox.batch_size < 1 {
            return Err(ConfigError::invalid(
                "outbox.batch_size",
                "must be positive",
            ));
        }
        if self.health.stall_after_ms < 1000 {
            return Err(ConfigError::invalid(
                "health.stall_after_ms",
                "must be at least 1000",
            ));
        }
        if self.kafka.produce_timeout_ms < 100 {
            return Err(ConfigError::invalid(
                "kafka.produce_timeout_ms",
                "must be at least 100",
            ));
        }
        Ok(())
    }
}

fn toml_defaults() -> Config {
    config::load(DEFAULTS, None).expect("embedded defaults are valid")
}

pub(crate) fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.as_bytes()[0].is_ascii_digit()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl BatchConfig {
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

impl StateKafkaConfig {
    pub fn produce_timeout(&self) -> Duration {
        Duration::from_millis(self.produce_timeout_ms)
    }
}
