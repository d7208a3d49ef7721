//! The typed configuration of `dlrflow-state`. Defaults live in [`DEFAULTS`];
//! a file and `DLRFLOW_…` environment variables override them (see
//! `dlrflow_runtime::config`), e.g. `DLRFLOW_POSTGRES__SCHEMA=tenant_a`.

use std::path::Path;
use std::time::Duration;

use dlrflow_runtime::config::{self, ConfigError};
use dlrflow_runtime::kafka::KafkaConfig;
use dlrflow_runtime::settings::{ms, secs, HttpSettings, PostgresSettings, RedisSettings};
use serde::{Deserialize, Serialize};

pub use crate::access::{ApiConfig, ApiKeyConfig};

pub const DEFAULTS: &str = r#"
[http]
listen = "127.0.0.1:8081"
admin_listen = "127.0.0.1:9081"
shutdown_grace_ms = 10000

[kafka]
brokers = "127.0.0.1:9092"
raw_topic = "dlrflow.webhooks.raw.v1"
status_topic = "dlrflow.status.v1"
dlq_topic = "dlrflow.webhooks.dlq.v1"
delivery_topic = "dlrflow.delivery.v1"
group_id = "dlrflow-state"
produce_timeout_ms = 10000

[batch]
max_records = 4000
max_wait_ms = 50
writers = 2
idle_close_ms = 5
retry_initial_ms = 100
retry_max_ms = 5000

[redis]
url = "redis://127.0.0.1:6379"
# true: url is one node of a Redis Cluster
cluster = false
prefix = "dlrflow:"
ttl_secs = 604800
connect_timeout_ms = 2000
response_timeout_ms = 5000

[postgres]
url = "postgres://postgres@127.0.0.1:5432/dlrflow"
max_connections = 8
acquire_timeout_ms = 5000
migrate = true

[health]
stall_after_ms = 30000
lag_check_interval_ms = 5000

[api]
open = false
requests_per_sec = 200
burst = 400
page_size = 1000

[console]
enabled = true
window_hours = 24
stuck_after_secs = 600
list_limit = 50
dlq_per_partition = 20
status_budget_per_minute = 120
query_timeout_ms = 5000

[outbox]
batch_size = 1000
idle_poll_ms = 50
retention_secs = 3600
max_defer_ms = 10000
"#;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    pub http: HttpSettings,
    pub kafka: StateKafkaConfig,
    pub batch: BatchConfig,
    pub redis: DedupeRedisConfig,
    pub postgres: PostgresSettings,
    pub outbox: OutboxConfig,
    pub health: HealthConfig,
    /// The read API's keys, rate and page size.
    pub api: ApiConfig,
    /// The operator page on the admin listener.
    pub console: ConsoleConfig,
}

/// `[console]`: the operator page (`/console` on `http.admin_listen`; see
/// `crate::console`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve the page (it needs a read API key with `sources = ["*"]`).
    pub enabled: bool,
    /// The funnel's default window: the last this many hours.
    pub window_hours: u32,
    /// A non-terminal recipient silent this long is listed as stuck.
    pub stuck_after_secs: u64,
    /// At most this many stuck recipients and open jobs are listed.
    pub list_limit: i64,
    /// The newest this many DLQ records of each partition are listed.
    pub dlq_per_partition: i64,
    /// The status API's reads per minute (`../shared/status-api.md`), shown
    /// beside the reads in use.
    pub status_budget_per_minute: u32,
    /// The funnel's and the stuck list's queries are cancelled after this
    /// long (the page then says to narrow the window).
    pub query_timeout_ms: u64,
}

impl ConsoleConfig {
    pub fn stuck_after(&self) -> Duration {
        Duration::from_secs(self.stuck_after_secs)
    }

    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HealthConfig {
    /// `/readyz` says not ready when the consumer loop has not come round,
    /// or one batch has kept failing, for this long.
    #[serde(rename = "stall_after_ms", with = "ms")]
    pub stall_after: Duration,
    /// How often the consumer compares its positions with the partitions'
    /// ends: the lag and freshness metrics, and the `consumer_progress` rows
    /// dlrflow-reconcile reads (its lag can look this much older).
    #[serde(rename = "lag_check_interval_ms", with = "ms")]
    pub lag_check_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct StateKafkaConfig {
    #[serde(flatten)]
    pub client: KafkaConfig,
    pub raw_topic: String,
    /// dlrflow-reconcile's status-API answers, applied as authoritative
    /// updates beside the raw topic (the state is a function of both).
    pub status_topic: String,
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
    #[serde(rename = "produce_timeout_ms", with = "ms")]
    pub produce_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BatchConfig {
    /// At most this many records per Redis round trip and PostgreSQL transaction.
    pub max_records: usize,
    /// Transactions a batch is written in, side by side, each on its own
    /// connection (a message's records always in the same one).
    pub writers: usize,
    /// A batch closes this long after its first record at the latest.
    #[serde(rename = "max_wait_ms", with = "ms")]
    pub max_wait: Duration,
    /// …and as soon as no record came for this long: at idle an event does
    /// not wait `max_wait` for company. `>= max_wait_ms` turns it off.
    #[serde(rename = "idle_close_ms", with = "ms")]
    pub idle_close: Duration,
    /// Backoff of a failing batch (Redis, PostgreSQL or broker down), doubling.
    #[serde(rename = "retry_initial_ms", with = "ms")]
    pub retry_initial: Duration,
    #[serde(rename = "retry_max_ms", with = "ms")]
    pub retry_max: Duration,
}

/// `[redis]`: the connection, and how long a dedupe key is kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DedupeRedisConfig {
    /// Every dedupe key is `{prefix}d:{dedupe_key}`.
    #[serde(flatten)]
    pub conn: RedisSettings,
    #[serde(rename = "ttl_secs", with = "secs")]
    pub ttl: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OutboxConfig {
    /// Rows published per relay round.
    pub batch_size: i64,
    /// Relay poll interval when the outbox is empty.
    #[serde(rename = "idle_poll_ms", with = "ms")]
    pub idle_poll: Duration,
    /// Published rows are deleted after this long.
    #[serde(rename = "retention_secs", with = "secs")]
    pub retention: Duration,
    /// While the consumer has a backlog (its batches come full), the relay
    /// leaves the machine to it until the oldest unpublished row is this
    /// old: in a burst the state is committed first and the analytics
    /// stream follows, at most about this far behind. 0: never defer.
    #[serde(rename = "max_defer_ms", with = "ms")]
    pub max_defer: Duration,
}

impl Config {
    /// Loads and validates the configuration.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        config::load_service(DEFAULTS, file, Self::register_secrets, Self::validate)
    }

    /// Loads the defaults only (plus the environment), for tests and tools.
    pub fn defaults() -> Self {
        toml_defaults()
    }

    /// Makes every secret of this configuration invisible in what the
    /// process prints from now on (`dlrflow_runtime::redact`).
    pub fn register_secrets(&self) {
        self.kafka.client.register_secrets();
        self.redis.conn.register_secrets();
        self.postgres.register_secrets();
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate("dlrflow-state", true)?;
        self.kafka.client.validate()?;
        if !(1..=16).contains(&self.batch.writers) {
            return Err(ConfigError::invalid("batch.writers", "must be 1 to 16"));
        }
        // The consumer's writers and the outbox relay each hold a connection.
        self.postgres.validate(self.batch.writers as u32 + 1)?;
        self.redis.conn.validate()?;
        self.api.validate()?;
        for (name, ok) in [
            ("console.window_hours", self.console.window_hours > 0),
            (
                "console.query_timeout_ms",
                self.console.query_timeout_ms > 0,
            ),
            ("console.list_limit", self.console.list_limit > 0),
            (
                "console.dlq_per_partition",
                self.console.dlq_per_partition > 0,
            ),
            (
                "console.status_budget_per_minute",
                self.console.status_budget_per_minute > 0,
            ),
        ] {
            if !ok {
                return Err(ConfigError::invalid(name, "must be at least 1"));
            }
        }
        for (name, value) in [
            ("kafka.raw_topic", &self.kafka.raw_topic),
            ("kafka.status_topic", &self.kafka.status_topic),
            ("kafka.dlq_topic", &self.kafka.dlq_topic),
            ("kafka.delivery_topic", &self.kafka.delivery_topic),
            ("kafka.group_id", &self.kafka.group_id),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::invalid(name, "must not be empty"));
            }
        }
        if self.kafka.status_topic == self.kafka.raw_topic
            || self.kafka.status_topic == self.kafka.dlq_topic
        {
            return Err(ConfigError::invalid(
                "kafka.status_topic",
                "must differ from kafka.raw_topic and kafka.dlq_topic",
            ));
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
        if self.batch.idle_close < Duration::from_millis(1) {
            return Err(ConfigError::invalid(
                "batch.idle_close_ms",
                "must be at least 1",
            ));
        }
        if self.batch.max_wait > Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "batch.max_wait_ms",
                "must be at most 60000",
            ));
        }
        if self.batch.retry_initial.is_zero() || self.batch.retry_max < self.batch.retry_initial {
            return Err(ConfigError::invalid(
                "batch.retry_max_ms",
                "needs 0 < batch.retry_initial_ms <= batch.retry_max_ms",
            ));
        }
        if self.redis.ttl.is_zero() {
            return Err(ConfigError::invalid("redis.ttl_secs", "must be positive"));
        }
        if self.outbox.batch_size < 1 {
            return Err(ConfigError::invalid(
                "outbox.batch_size",
                "must be positive",
            ));
        }
        // A deferring relay still reports to /readyz; its round gap limit
        // (60 s at least) must never be reached by deferring alone.
        if self.outbox.max_defer > Duration::from_secs(30) {
            return Err(ConfigError::invalid(
                "outbox.max_defer_ms",
                "must be at most 30000",
            ));
        }
        if self.health.stall_after < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "health.stall_after_ms",
                "must be at least 1000",
            ));
        }
        if self.health.lag_check_interval < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "health.lag_check_interval_ms",
                "must be at least 100",
            ));
        }
        if self.kafka.produce_timeout < Duration::from_millis(100) {
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
