//! The reconciler's typed configuration. Defaults live in [`DEFAULTS`]; a file
//! and `DLRFLOW_…` environment variables override them (see
//! `dlrflow_runtime::config`): `DLRFLOW_STATUS_API__API_KEY=…`,
//! `DLRFLOW_RECONCILE__SOURCES='["acme"]'`.

use std::path::Path;
use std::time::Duration;

use dlrflow_runtime::config::{self, ConfigError};
use dlrflow_runtime::settings::{HttpSettings, PostgresSettings, RedisSettings};
use dlrflow_runtime::{ExposeSecret, Secret};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const DEFAULTS: &str = r#"
[http]
admin_listen = "127.0.0.1:9082"
shutdown_grace_ms = 10000

[status_api]
base_url = "http://127.0.0.1:8090"
api_key = ""
auth_header = "Authorization"
auth_scheme = "Bearer"
timeout_ms = 10000
connect_timeout_ms = 2000

[kafka]
brokers = "127.0.0.1:9092"
status_topic = "dlrflow.status.v1"
produce_timeout_ms = 10000

[budget]
reads = 120
window_ms = 60000
safety_margin_ms = 1000
key_id = ""
unauthorized_hold_secs = 3600

[redis]
url = "redis://127.0.0.1:6379"
# true: url is one node of a Redis Cluster
cluster = false
prefix = "dlrflow:reconcile"
connect_timeout_ms = 1000
response_timeout_ms = 2000

[postgres]
url = "postgres://postgres@127.0.0.1:5432/dlrflow"
schema = "public"
max_connections = 8
acquire_timeout_ms = 10000
migrate = true

[reconcile]
sources = []
strict_sources = []
sweep_interval_ms = 5000
sweep_batch = 5000
debounce_ms = 5000
deadline_queued_secs = 600
deadline_processing_secs = 600
deadline_sent_secs = 7200
incomplete_after_secs = 600
conflict_reread_secs = 600
max_age_secs = 259200
give_up_after_secs = 86400
backoff_initial_ms = 5000
backoff_max_ms = 600000
lease_ms = 120000
concurrency = 4
poll_interval_ms = 500
job_retention_secs = 604800
# A consumer_progress row not rewritten for this long makes the state's lag
# unknown (no stuck / incomplete job opened or read): a few times
# dlrflow-state's health.lag_check_interval_ms (default 5000).
progress_stale_after_ms = 20000
"#;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    /// `admin_listen` (`/healthz`, `/readyz`, `/metrics`; no public
    /// listener); the grace covers reads and writes in flight.
    pub http: HttpSettings,
    pub status_api: StatusApiConfig,
    pub budget: BudgetConfig,
    /// The budget's sliding-window log (every replica shares it).
    pub redis: RedisSettings,
    /// Runs dlrflow-state's migrations, then ours, when `migrate`.
    pub postgres: PostgresSettings,
    pub reconcile: ReconcileConfig,
    /// Where each status answer goes (dlrflow-state applies it from there).
    pub kafka: ReconcileKafkaConfig,
}

/// `[kafka]`: the status topic's producer (`acks=all`, idempotent).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ReconcileKafkaConfig {
    #[serde(flatten)]
    pub client: dlrflow_runtime::kafka::KafkaConfig,
    /// Each `GET /status` answer, exact bytes, key
    /// `{source}/status_api/{message_id}`, timestamp the read time.
    pub status_topic: String,
    /// Longest wait for the broker's acknowledgement of an answer; past it
    /// the job is retried later (the answer is read again).
    #[serde(rename = "produce_timeout_ms", with = "dlrflow_runtime::settings::ms")]
    pub produce_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct StatusApiConfig {
    /// `GET {base_url}/status/{message_id}`.
    pub base_url: String,
    /// The gateway API key; never logged. Required.
    pub api_key: Secret,
    /// The header carrying the key (default `Authorization`).
    pub auth_header: String,
    /// Put before the key with one space (default `Bearer`); empty sends the bare key.
    pub auth_scheme: String,
    /// Whole-request timeout; a timeout counts as a read (it may have reached the gateway).
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BudgetConfig {
    /// Reads allowed per window per API key, across every replica (gateway: 120).
    pub reads: u32,
    /// The gateway's window (gateway: 60 000 ms).
    pub window_ms: u64,
    /// The limiter counts over `window_ms + safety_margin_ms`, which covers the
    /// time between a grant in Redis and the request reaching the gateway. A
    /// grant older than half the margin is not used.
    pub safety_margin_ms: u64,
    /// Names the API key in Redis keys and metrics; default: the first 16 hex
    /// digits of the key's SHA-256 (a new key gets a fresh budget and state).
    pub key_id: String,
    /// After a 401, reads with this key stop on every replica for this long
    /// (or until the process runs with another key); then one read probes again.
    pub unauthorized_hold_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ReconcileConfig {
    /// The sources (tenants) this API key serves. Required.
    pub sources: Vec<String>,
    /// Sources in strict mode: every change is confirmed by one read per
    /// message once the message has been quiet for `debounce_ms`.
    pub strict_sources: Vec<String>,
    pub sweep_interval_ms: u64,
    /// At most this many messages enqueued per trigger per sweep.
    pub sweep_batch: i64,
    pub debounce_ms: u64,
    /// A recipient with no news for this long in `queued` is stuck.
    pub deadline_queued_secs: u64,
    pub deadline_processing_secs: u64,
    /// In `sent`: longer than the gateway's webhook retries (30 s + 2 m + 10 m + 1 h ≈ 73 min).
    pub deadline_sent_secs: u64,
    /// A message announcing more recipients than we have seen is read this long after it was queued.
    pub incomplete_after_secs: u64,
    /// A conflict that a read could not clear is read again after this long.
    pub conflict_reread_secs: u64,
    /// Recipients created longer ago than this are no longer swept as stuck or incomplete.
    pub max_age_secs: u64,
    /// A job failing (404, 5xx, timeout) for this long since it was requested is abandoned.
    pub give_up_after_secs: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// How long a replica owns a claimed job; a crashed replica's jobs return after it.
    pub lease_ms: u64,
    /// Reads in flight per replica.
    pub concurrency: usize,
    /// How often an idle worker looks for a due job.
    pub poll_interval_ms: u64,
    /// Finished jobs are deleted after this long.
    pub job_retention_secs: u64,
    /// dlrflow-state rewrites each partition's `consumer_progress` row every
    /// `health.lag_check_interval_ms` (5 s by default); a row older than this
    /// makes the lag unknown (see `jobs::consumer_lag`). A few lag-check
    /// intervals plus the longest batch; too small, and reads pause whenever
    /// a check is late; too large, and a dead consumer's last bound is
    /// trusted that much longer.
    pub progress_stale_after_ms: u64,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

/// What `dlrflow-reconcile migrate` reads: the PostgreSQL settings alone
/// (no status-API key, no Redis, no Kafka).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateConfig {
    pub postgres: PostgresSettings,
}

impl MigrateConfig {
    /// Loads the configuration as [`Config::load`] does (defaults, file,
    /// environment; a key nothing reads is refused, so the service's own file
    /// works here too) and validates only the PostgreSQL settings: the other
    /// sections may be left at their defaults (an empty API key included).
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg: Config = config::load_service(DEFAULTS, file, Config::register_secrets, |c| {
            c.postgres.validate(1)
        })?;
        Ok(Self {
            postgres: cfg.postgres,
        })
    }
}

impl Config {
    /// Loads and validates the configuration.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        config::load_service(DEFAULTS, file, Self::register_secrets, Self::validate)
    }

    /// The embedded defaults, unvalidated (tests fill in the rest).
    pub fn defaults() -> Self {
        config::load::<Config>(DEFAULTS, None).expect("embedded defaults parse")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate("dlrflow-reconcile", false)?;
        self.kafka.client.validate()?;
        if self.kafka.status_topic.trim().is_empty() {
            return Err(ConfigError::invalid(
                "kafka.status_topic",
                "must not be empty",
            ));
        }
        let api = &self.status_api;
        if !(api.base_url.starts_with("http://") || api.base_url.starts_with("https://")) {
            return Err(ConfigError::invalid(
                "status_api.base_url",
                "must be an http:// or https:// URL",
            ));
        }
        let Ok(base) = reqwest::Url::parse(&api.base_url) else {
            return Err(ConfigError::invalid(
                "status_api.base_url",
                "not a valid URL",
            ));
        };
        if (!base.username().is_empty() || base.password().is_some())
            && api.auth_header.eq_ignore_ascii_case("authorization")
        {
            // reqwest turns URL credentials into a Basic `Authorization`
            // header, which would replace the API key's.
            return Err(ConfigError::invalid(
                "status_api.base_url",
                "credentials in the URL would replace the API key's Authorization header; \
                 remove them or send the key in another status_api.auth_header",
            ));
        }
        if api.api_key.expose_secret().trim().is_empty() {
            return Err(ConfigError::invalid(
                "status_api.api_key",
                "required (DLRFLOW_STATUS_API__API_KEY)",
            ));
        }
        if reqwest::header::HeaderName::from_bytes(api.auth_header.as_bytes()).is_err() {
            return Err(ConfigError::invalid(
                "status_api.auth_header",
                "not a valid HTTP header name",
            ));
        }
        if reqwest::header::HeaderValue::from_str(&self.auth_value()).is_err() {
            return Err(ConfigError::invalid(
                "status_api.auth_scheme",
                "scheme and key must be printable ASCII",
            ));
        }
        if api.timeout_ms == 0 || api.connect_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "status_api.timeout_ms",
                "timeouts must be positive",
            ));
        }
        let b = &self.budget;
        if b.reads == 0 {
            return Err(ConfigError::invalid("budget.reads", "must be at least 1"));
        }
        if b.window_ms < 10 {
            return Err(ConfigError::invalid(
                "budget.window_ms",
                "must be at least 10 ms",
            ));
        }
        if b.safety_margin_ms < 2 {
            return Err(ConfigError::invalid(
                "budget.safety_margin_ms",
                "must be at least 2 ms: a grant is only used within half the margin",
            ));
        }
        if !b.key_id.is_empty()
            && !b
                .key_id
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(ConfigError::invalid(
                "budget.key_id",
                "use letters, digits, '-' and '_'",
            ));
        }
        if self.redis.prefix.trim().is_empty() {
            return Err(ConfigError::invalid("redis.prefix", "must not be empty"));
        }
        self.redis.validate()?;
        // The sweeper and a worker each hold a connection.
        self.postgres.validate(2)?;
        let r = &self.reconcile;
        if r.sources.is_empty() {
            return Err(ConfigError::invalid(
                "reconcile.sources",
                "list the sources this API key serves",
            ));
        }
        if let Some(s) = r.strict_sources.iter().find(|s| !r.sources.contains(s)) {
            return Err(ConfigError::invalid(
                "reconcile.strict_sources",
                format!("`{s}` is not in reconcile.sources"),
            ));
        }
        for (name, v) in [
            ("reconcile.sweep_interval_ms", r.sweep_interval_ms),
            ("reconcile.deadline_queued_secs", r.deadline_queued_secs),
            (
                "reconcile.deadline_processing_secs",
                r.deadline_processing_secs,
            ),
            ("reconcile.deadline_sent_secs", r.deadline_sent_secs),
            ("reconcile.backoff_initial_ms", r.backoff_initial_ms),
            ("reconcile.poll_interval_ms", r.poll_interval_ms),
            ("reconcile.max_age_secs", r.max_age_secs),
            ("reconcile.give_up_after_secs", r.give_up_after_secs),
            (
                "reconcile.progress_stale_after_ms",
                r.progress_stale_after_ms,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(name, "must be positive"));
            }
        }
        if r.sweep_batch < 1 {
            return Err(ConfigError::invalid(
                "reconcile.sweep_batch",
                "must be at least 1",
            ));
        }
        if r.backoff_max_ms < r.backoff_initial_ms {
            return Err(ConfigError::invalid(
                "reconcile.backoff_max_ms",
                "must be at least reconcile.backoff_initial_ms",
            ));
        }
        if r.concurrency == 0 || r.concurrency > 64 {
            return Err(ConfigError::invalid(
                "reconcile.concurrency",
                "must be between 1 and 64",
            ));
        }
        let needed = api.timeout_ms.saturating_mul(3);
        if r.lease_ms < needed {
            return Err(ConfigError::invalid(
                "reconcile.lease_ms",
                format!("must be at least 3 × status_api.timeout_ms ({needed} ms): a read and its write must finish inside the lease"),
            ));
        }
        if r.job_retention_secs < r.max_age_secs {
            return Err(ConfigError::invalid(
                "reconcile.job_retention_secs",
                "must be at least reconcile.max_age_secs (a deleted job forgets when its message was last read)",
            ));
        }
        Ok(())
    }

    /// Makes every secret of this configuration invisible in what the process
    /// prints from now on (see [`crate::redact`]).
    pub fn register_secrets(&self) {
        crate::redact::register(self.status_api.api_key.expose_secret());
        self.kafka.client.register_secrets();
        self.redis.register_secrets();
        self.postgres.register_secrets();
        crate::redact::register_url(&self.status_api.base_url);
    }

    /// The value of the auth header: `{scheme} {key}` or the bare key.
    pub(crate) fn auth_value(&self) -> String {
        let key = self.status_api.api_key.expose_secret();
        if self.status_api.auth_scheme.is_empty() {
            key.to_owned()
        } else {
            format!("{} {key}", self.status_api.auth_scheme)
        }
    }

    /// The key's name in Redis and metrics (never the key itself).
    pub fn key_id(&self) -> String {
        if !self.budget.key_id.is_empty() {
            return self.budget.key_id.clone();
        }
        let digest = Sha256::digest(self.status_api.api_key.expose_secret().as_bytes());
        hex::encode(&digest[..8])
    }
}

impl BudgetConfig {
    pub fn window(&self) -> Duration {
        ms(self.window_ms)
    }
    pub fn safety_margin(&self) -> Duration {
        ms(self.safety_margin_ms)
    }
    /// The window the limiter counts over: the gateway's plus the margin.
    pub fn limiter_window(&self) -> Duration {
        self.window() + self.safety_margin()
    }
}

impl ReconcileConfig {
    pub fn sweep_interval(&self) -> Duration {
        ms(self.sweep_interval_ms)
    }
    pub fn debounce(&self) -> Duration {
        ms(self.debounce_ms)
    }
    pub fn deadline_queued(&self) -> Duration {
        secs(self.deadline_queued_secs)
    }
    pub fn deadline_processing(&self) -> Duration {
        secs(self.deadline_processing_secs)
    }
    pub fn deadline_sent(&self) -> Duration {
        secs(self.deadline_sent_secs)
    }
    pub fn incomplete_after(&self) -> Duration {
        secs(self.incomplete_after_secs)
    }
    pub fn conflict_reread(&self) -> Duration {
        secs(self.conflict_reread_secs)
    }
    pub fn max_age(&self) -> Duration {
        secs(self.max_age_secs)
    }
    pub fn give_up_after(&self) -> Duration {
        secs(self.give_up_after_secs)
    }
    pub fn backoff_initial(&self) -> Duration {
        ms(self.backoff_initial_ms)
    }
    pub fn backoff_max(&self) -> Duration {
        ms(self.backoff_max_ms)
    }
    pub fn lease(&self) -> Duration {
        ms(self.lease_ms)
    }
    pub fn poll_interval(&self) -> Duration {
        ms(self.poll_interval_ms)
    }
    pub fn job_retention(&self) -> Duration {
        secs(self.job_retention_secs)
    }
    pub fn progress_stale_after(&self) -> Duration {
        ms(self.progress_stale_after_ms)
    }

    /// Exponential backoff after `attempts` failed reads, capped.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u64 << attempts.saturating_sub(1).min(20);
        ms(self
            .backoff_initial_ms
            .saturating_mul(factor)
            .min(self.backoff_max_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        let mut c = Config::defaults();
        c.status_api.api_key = Secret::from("k-123");
        c.reconcile.sources = vec!["acme".into()];
        c
    }

    #[test]
    fn defaults_with_a_key_and_a_source_are_valid() {
        valid().validate().unwrap();
        assert_eq!(valid().http.admin_listen.to_string(), "127.0.0.1:9082");
        assert_eq!(valid().http.listen, None);
        assert_eq!(valid().budget.reads, 120);
        assert_eq!(valid().auth_value(), "Bearer k-123");
        // Production gateways answer over TLS.
        let mut tls = valid();
        tls.status_api.base_url = "https://api.lisoloo.example".into();
        tls.validate().unwrap();
    }

    #[test]
    fn errors_name_the_setting() {
        type Change = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "status_api.api_key",
                Box::new(|c| c.status_api.api_key = Secret::from("")),
            ),
            (
                "reconcile.sources",
                Box::new(|c| c.reconcile.sources.clear()),
            ),
            (
                "reconcile.strict_sources",
                Box::new(|c| c.reconcile.strict_sources = vec!["other".into()]),
            ),
            ("budget.reads", Box::new(|c| c.budget.reads = 0)),
            (
                "status_api.base_url",
                Box::new(|c| c.status_api.base_url = "ftp://x".into()),
            ),
            (
                "status_api.auth_header",
                Box::new(|c| c.status_api.auth_header = "bad header".into()),
            ),
            (
                "status_api.base_url",
                Box::new(|c| c.status_api.base_url = "https://u:url-pw-1@gw.example".into()),
            ),
            (
                "reconcile.lease_ms",
                Box::new(|c| c.reconcile.lease_ms = 1000),
            ),
            (
                "postgres.schema",
                Box::new(|c| c.postgres.schema = Some("x; drop".into())),
            ),
        ];
        for (setting, change) in cases {
            let mut c = valid();
            change(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(setting), "{setting}: {err}");
            assert!(!err.contains("url-pw-1"), "{err}");
        }
    }

    #[test]
    fn the_key_id_is_a_hash_never_the_key() {
        let c = valid();
        let id = c.key_id();
        assert_eq!(id.len(), 16);
        assert!(!id.contains("k-123"));
        let mut d = valid();
        d.budget.key_id = "tenant-a".into();
        assert_eq!(d.key_id(), "tenant-a");
    }

    #[test]
    fn url_credentials_are_fine_with_another_auth_header() {
        let mut c = valid();
        c.status_api.base_url = "https://u:pw@gw.example".into();
        c.status_api.auth_header = "X-Api-Key".into();
        c.validate().unwrap();
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = valid().reconcile;
        assert_eq!(r.backoff(1), Duration::from_secs(5));
        assert_eq!(r.backoff(2), Duration::from_secs(10));
        assert_eq!(r.backoff(30), Duration::from_secs(600));
    }
}
