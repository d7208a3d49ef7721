//! The ingest's typed configuration. Defaults live in `DEFAULTS`; a file and
//! `DLRFLOW_…` environment variables override them (see `dlrflow_runtime::config`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dlrflow_runtime::config::{self, ConfigError};
pub use dlrflow_runtime::kafka::is_secret_setting;
use dlrflow_runtime::kafka::KafkaConfig;
use dlrflow_runtime::settings::{ms, HttpSettings};
use dlrflow_runtime::{ExposeSecret, Secret};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const DEFAULTS: &str = r#"
[http]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9080"
body_read_timeout_ms = 4000
retry_after_secs = 5
shutdown_grace_ms = 10000

[kafka]
brokers = "127.0.0.1:9092"
raw_topic = "dlrflow.webhooks.raw.v1"
delivery_timeout_ms = 3000
message_timeout_ms = 0
linger_ms = 1
queue_max_messages = 100000
queue_max_kbytes = 262144
"#;

/// Bytes kept free under the producer's `message.max.bytes` for everything a
/// record carries besides its value: the key (a message id of at most
/// [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) = 512 bytes after a source name of at
/// most [`MAX_SOURCE_NAME_LEN`] bytes and the provider: at most 590 bytes),
/// the headers (a `traceparent` and a `tracestate`, at most about 600
/// bytes), librdkafka's per-record framing (at most 36 bytes) and the record
/// batch's header (61 bytes). What is left is the record limit: the largest Lisoloo body or
/// Arpoone element the ingest accepts.
pub const RECORD_HEADROOM: usize = 4096;

/// The longest source name (it is copied into every record's key).
pub const MAX_SOURCE_NAME_LEN: usize = 64;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    /// A TOML file of `[[sources]]`, read at start and again on SIGHUP or
    /// when it changes (see [`crate::sources`]); set either this or
    /// `sources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources_file: Option<PathBuf>,
    /// How often `sources_file` is checked for a change.
    #[serde(
        rename = "sources_check_ms",
        with = "ms",
        default = "default_sources_check"
    )]
    pub sources_check: Duration,
    pub http: HttpConfig,
    pub kafka: IngestKafkaConfig,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
}

fn default_sources_check() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HttpConfig {
    /// `listen` (webhooks only), `admin_listen` and `shutdown_grace_ms` (in-flight requests and the producer
    /// flush).
    #[serde(flatten)]
    pub server: HttpSettings,
    /// Larger bodies get 413. Unset (the default), it is the record limit
    /// ([`IngestKafkaConfig::record_limit`]), so a body the HTTP layer takes
    /// always fits in one record. Set it higher only for larger Arpoone
    /// batches: every Lisoloo body and Arpoone element is still held to the
    /// record limit.
    pub body_limit_bytes: Option<usize>,
    /// A client that has not sent its whole body by then gets 503.
    #[serde(rename = "body_read_timeout_ms", with = "ms")]
    pub body_read_timeout: Duration,
    /// The `Retry-After` value on every 503.
    pub retry_after_secs: u64,
    /// Proxies (CIDR) whose `X-Forwarded-For` is believed when a source has
    /// an `allow_from` list; empty (the default), the peer address counts.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct IngestKafkaConfig {
    #[serde(flatten)]
    pub client: KafkaConfig,
    pub raw_topic: String,
    /// Longest wait for the broker's acknowledgement before the request gets
    /// 503; keep it well below the gateway's 5 s timeout.
    #[serde(rename = "delivery_timeout_ms", with = "ms")]
    pub delivery_timeout: Duration,
    /// librdkafka `message.timeout.ms`: how long a record the request already
    /// gave up on keeps being retried in the background (0 = until delivered;
    /// the bounded queue still caps memory). Not the request deadline: an
    /// idempotent producer whose records time out bumps its epoch, which
    /// Tansu 0.6.0 cannot handle (its storage panics and every later request
    /// fails), so by default records never time out.
    pub message_timeout_ms: u64,
    /// librdkafka `linger.ms`: 1 (the default) gathers the records of
    /// concurrent requests into one produce request, which the broker writes
    /// in one go (1.7× the requests/s of 0 at 10–50 connections on the local
    /// broker, p50 2 ms instead of 3); 0 answers a lone request ~1 ms sooner.
    pub linger_ms: u64,
    /// Bounds of the producer queue; when full, requests get 503.
    pub queue_max_messages: u64,
    pub queue_max_kbytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Lisoloo,
    Arpoone,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Lisoloo => "lisoloo",
            Provider::Arpoone => "arpoone",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// HTTP Basic with one of `credentials`.
    Basic,
    /// A secret token in the URL path (`/{source}/t/{token}/webhook…`); Arpoone only.
    PathToken,
    /// No authentication at all: an explicit choice, never a default.
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Credential {
    pub username: String,
    pub password: Secret,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SourceConfig {
    /// The first path segment: `POST /{name}/webhook`.
    pub name: String,
    pub provider: Provider,
    /// Required: `basic`, `path_token` or `none`.
    pub auth: Option<AuthMode>,
    /// Active Basic credentials; several at once allow rotation without downtime.
    #[serde(default)]
    pub credentials: Vec<Credential>,
    /// Active path tokens (`auth = "path_token"`).
    #[serde(default)]
    pub path_tokens: Vec<Secret>,
    /// Addresses (CIDR) the source's requests may come from; empty (the
    /// default), any. Others get 403.
    #[serde(default)]
    pub allow_from: Vec<IpNet>,
}

impl SourceConfig {
    /// Makes the source's passwords and tokens invisible in what the
    /// process prints from now on.
    pub fn register_secrets(&self) {
        for c in &self.credentials {
            dlrflow_runtime::redact::register(c.password.expose_secret());
        }
        for t in &self.path_tokens {
            dlrflow_runtime::redact::register(t.expose_secret());
        }
    }
}

impl Config {
    /// Loads and validates the configuration.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        config::load_service(DEFAULTS, file, Self::register_secrets, Self::validate)
    }

    /// The largest request body: `http.body_limit_bytes`, or the record limit
    /// when it is not set.
    pub fn body_limit(&self) -> usize {
        self.http
            .body_limit_bytes
            .unwrap_or_else(|| self.kafka.record_limit())
    }

    /// Makes every secret of this configuration (passwords, path tokens,
    /// `kafka.settings` secrets) invisible in what the process prints from
    /// now on (`dlrflow_runtime::redact`).
    pub fn register_secrets(&self) {
        self.kafka.client.register_secrets();
        for s in &self.sources {
            s.register_secrets();
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.http.server.validate("dlrflow-ingest", true)?;
        self.kafka.client.validate()?;
        // librdkafka prints broker addresses in its logs and errors: a
        // password in one would end up there. Credentials belong in
        // `kafka.settings` (`sasl.username`, `sasl.password`), which it redacts.
        if self.kafka.client.brokers.contains('@') {
            return Err(ConfigError::invalid(
                "kafka.brokers",
                "must not carry credentials (user:password@host); set kafka.settings.sasl.username / sasl.password instead (value not shown)",
            ));
        }
        let max = self.kafka.client.max_message_bytes();
        if max < RECORD_HEADROOM + 1024 {
            return Err(ConfigError::invalid(
                "kafka.settings.message.max.bytes",
                format!(
                    "must be at least {} so a record can hold 1024 bytes after the {RECORD_HEADROOM}-byte headroom for key, headers and framing",
                    RECORD_HEADROOM + 1024
                ),
            ));
        }
        if self.kafka.raw_topic.trim().is_empty() {
            return Err(ConfigError::invalid("kafka.raw_topic", "must not be empty"));
        }
        let delivery_ms = self.kafka.delivery_timeout.as_millis();
        if !(100..=4500).contains(&delivery_ms) {
            return Err(ConfigError::invalid(
                "kafka.delivery_timeout_ms",
                "must be between 100 and 4500 ms: the gateway gives up after 5 s",
            ));
        }
        if self.kafka.queue_max_messages < 1000 {
            return Err(ConfigError::invalid(
                "kafka.queue_max_messages",
                "must be at least 1000 (one Arpoone batch)",
            ));
        }
        if self.http.body_limit_bytes.is_some_and(|n| n < 1024) {
            return Err(ConfigError::invalid(
                "http.body_limit_bytes",
                "must be at least 1024",
            ));
        }
        match (&self.sources_file, self.sources.is_empty()) {
            (Some(_), false) => Err(ConfigError::invalid(
                "sources_file",
                "set either [[sources]] or sources_file, not both",
            )),
            (Some(_), true) if self.sources_check.is_zero() => {
                Err(ConfigError::invalid("sources_check_ms", "must be above 0"))
            }
            // Read and validated when the service starts (crate::sources).
            (Some(_), true) => Ok(()),
            (None, _) => validate_sources(&self.sources),
        }
    }
}

/// The checks every set of sources passes, from the configuration or from
/// `sources_file`; errors name `sources[i].field`.
pub fn validate_sources(sources: &[SourceConfig]) -> Result<(), ConfigError> {
    if sources.is_empty() {
        return Err(ConfigError::invalid(
            "sources",
            "no source configured; add at least one [[sources]] entry",
        ));
    }
    let mut names = HashSet::new();
    for (i, s) in sources.iter().enumerate() {
        let at = |field: &str| format!("sources[{i}].{field}");
        let valid_name = !s.name.is_empty()
            && s.name.len() <= MAX_SOURCE_NAME_LEN
            && s.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid_name {
            return Err(ConfigError::invalid(
                at("name"),
                format!("use 1 to {MAX_SOURCE_NAME_LEN} lower-case letters, digits, '-' and '_'"),
            ));
        }
        if !names.insert(s.name.as_str()) {
            return Err(ConfigError::invalid(
                at("name"),
                format!("duplicate source `{}`", s.name),
            ));
        }
        match s.auth {
            None => {
                return Err(ConfigError::invalid(
                    at("auth"),
                    "required: \"basic\", \"path_token\" or \"none\" (no authentication is never a default)",
                ))
            }
            Some(AuthMode::Basic) => {
                if s.credentials.is_empty() {
                    return Err(ConfigError::invalid(at("credentials"), "auth = \"basic\" needs at least one credential"));
                }
                for (j, c) in s.credentials.iter().enumerate() {
                    if c.username.contains(':') {
                        return Err(ConfigError::invalid(
                            format!("sources[{i}].credentials[{j}].username"),
                            "must not contain ':' (RFC 7617)",
                        ));
                    }
                    if c.password.expose_secret().is_empty() {
                        return Err(ConfigError::invalid(
                            format!("sources[{i}].credentials[{j}].password"),
                            "must not be empty",
                        ));
                    }
                }
            }
            Some(AuthMode::PathToken) => {
                if s.provider != Provider::Arpoone {
                    return Err(ConfigError::invalid(at("auth"), "path_token is for Arpoone sources only"));
                }
                if s.path_tokens.is_empty() {
                    return Err(ConfigError::invalid(at("path_tokens"), "auth = \"path_token\" needs at least one token"));
                }
                if s.path_tokens.iter().any(|t| t.expose_secret().len() < 16) {
                    return Err(ConfigError::invalid(at("path_tokens"), "each token needs at least 16 characters"));
                }
            }
            Some(AuthMode::None) => {}
        }
    }
    Ok(())
}

impl IngestKafkaConfig {
    /// The largest record value the ingest writes: the producer's
    /// `message.max.bytes` (librdkafka's default 1,000,000, or the value in
    /// `kafka.settings`) minus [`RECORD_HEADROOM`]. 995,904 bytes by default.
    pub fn record_limit(&self) -> usize {
        self.client
            .max_message_bytes()
            .saturating_sub(RECORD_HEADROOM)
    }
}
