//! The settings every service shares, one type each: the HTTP listener,
//! PostgreSQL and Redis, plus the [`Secret`] wrapper and the `…_ms` /
//! `…_secs` duration fields.
//!
//! Durations are [`Duration`]s in the code and keep their unit in the key
//! (`shutdown_grace_ms = 10000`), so a file never has to guess a unit and the
//! code never multiplies by 1000. Every type here is `Serialize` so that
//! [`crate::config::load`] can find keys nothing read and a service can print
//! its effective configuration; secrets serialize as `***`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Executor, PgPool};

use crate::config::ConfigError;

/// What a secret prints as.
pub const MASK: &str = "***";

/// A secret setting (a password, an API key, a URL with credentials): read
/// from the configuration like a string, printed and serialized as `***`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }
}

impl ExposeSecret<str> for Secret {
    fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(MASK)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(MASK)
    }
}

impl From<String> for Secret {
    fn from(v: String) -> Self {
        Self::new(v)
    }
}

impl From<&str> for Secret {
    fn from(v: &str) -> Self {
        Self::new(v)
    }
}

/// `#[serde(with = "dlrflow_runtime::settings::ms")]`: a [`Duration`] written
/// as whole milliseconds.
pub mod ms {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// `#[serde(with = "dlrflow_runtime::settings::secs")]`: a [`Duration`]
/// written as whole seconds.
pub mod secs {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// `[http]`: the service's listeners.
///
/// Every service has an admin listener (`/healthz`, `/readyz`, `/metrics`)
/// of its own, by default on `127.0.0.1`, so that the operational routes are
/// never on the public port. The public listener serves the service's own
/// routes (the ingest's webhooks, the state's read API); a service without
/// public routes (the reconciler) has none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpSettings {
    /// Address of the service's public routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub admin_listen: SocketAddr,
    /// How long shutdown waits for in-flight requests and background work.
    #[serde(rename = "shutdown_grace_ms", with = "ms")]
    pub shutdown_grace: Duration,
    /// Open connections per listener; one more is answered 503 (see
    /// [`crate::listener`]).
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// A request head (and a TLS handshake) must arrive within this; it also
    /// ends an idle HTTP/1.1 keep-alive connection.
    #[serde(
        rename = "header_read_timeout_ms",
        with = "ms",
        default = "defaults::header_read_timeout"
    )]
    pub header_read_timeout: Duration,
    /// A larger request head gets 431.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
    /// A connection without a request in flight for this long is closed.
    #[serde(
        rename = "idle_timeout_ms",
        with = "ms",
        default = "defaults::idle_timeout"
    )]
    pub idle_timeout: Duration,
    /// HTTPS on the public listener; unset, plain HTTP (behind a proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::listener::TlsSettings>,
}

/// The defaults of the settings every listener shares, the same in every
/// service (so they are not repeated in each service's `DEFAULTS`).
mod defaults {
    use std::time::Duration;

    pub fn max_connections() -> usize {
        4096
    }

    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }

    pub fn max_header_bytes() -> usize {
        16 * 1024
    }

    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
}

impl HttpSettings {
    /// `public`: whether the service has public routes (then `listen` must
    /// be set) or not (then it must not be: nothing would answer there).
    pub fn validate(&self, service: &str, public: bool) -> Result<(), ConfigError> {
        match (public, self.listen) {
            (true, None) => Err(ConfigError::invalid(
                "http.listen",
                format!("{service} needs the address of its public routes"),
            )),
            (false, Some(_)) => Err(ConfigError::invalid(
                "http.listen",
                format!(
                    "{service} has no public routes; its /healthz, /readyz and /metrics are on http.admin_listen"
                ),
            )),
            (false, None) if self.tls.is_some() => Err(ConfigError::invalid(
                "http.tls",
                format!("{service} has no public listener to serve TLS on"),
            )),
            _ if self.max_connections == 0 => Err(ConfigError::invalid(
                "http.max_connections",
                "must be at least 1",
            )),
            _ if self.header_read_timeout.is_zero() => Err(ConfigError::invalid(
                "http.header_read_timeout_ms",
                "must be above 0",
            )),
            _ if self.idle_timeout.is_zero() => Err(ConfigError::invalid(
                "http.idle_timeout_ms",
                "must be above 0",
            )),
            _ if self.max_header_bytes < 8192 => Err(ConfigError::invalid(
                "http.max_header_bytes",
                "must be at least 8192 (HTTP/1.1's smallest head buffer)",
            )),
            (true, Some(listen)) if listen == self.admin_listen && listen.port() != 0 => {
                Err(ConfigError::invalid(
                    "http.admin_listen",
                    "must differ from http.listen: the operational routes have a listener of their own",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Makes rustls use ring (the one TLS stack of every dlrflow connection: the
/// listeners, PostgreSQL, Redis, the status API) wherever a library asks for
/// the process's default. Harmless when called again.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `[postgres]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database`; a secret.
    pub url: Secret,
    /// Schema holding dlrflow's tables: created if missing and set as every
    /// connection's `search_path`. Unset, the server's `search_path` applies.
    #[serde(default)]
    pub schema: Option<String>,
    /// Pool size.
    pub max_connections: u32,
    /// Longest wait for a pooled connection.
    #[serde(rename = "acquire_timeout_ms", with = "ms")]
    pub acquire_timeout: Duration,
    /// Run the migrations at start.
    pub migrate: bool,
    /// TLS to the server: `disable`, `prefer`, `require`, `verify-ca` or
    /// `verify-full` (libpq's names). Unset, the URL's `sslmode` applies
    /// (default `prefer`). Use `verify-full` across any network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<String>,
    /// The CA certificate(s), PEM, that sign the server's certificate (for
    /// `verify-ca` / `verify-full`). Unset, the URL's `sslrootcert`, else the
    /// bundled public roots (webpki).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl PostgresSettings {
    /// Settings for `url` with the defaults the services ship with.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: Secret::new(url),
            schema: None,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
            migrate: true,
            sslmode: None,
            ca_file: None,
        }
    }

    /// `min_connections`: what the service runs at once (e.g. a consumer and
    /// a relay), below which it would deadlock on its own pool.
    pub fn validate(&self, min_connections: u32) -> Result<(), ConfigError> {
        if self.url.expose_secret().trim().is_empty() {
            return Err(ConfigError::invalid("postgres.url", "must not be empty"));
        }
        if PgConnectOptions::from_str(self.url.expose_secret()).is_err() {
            return Err(ConfigError::invalid(
                "postgres.url",
                "is not a postgres:// URL (value not shown)",
            ));
        }
        if self.max_connections < min_connections {
            return Err(ConfigError::invalid(
                "postgres.max_connections",
                format!("must be at least {min_connections}"),
            ));
        }
        if self.acquire_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "postgres.acquire_timeout_ms",
                "must be positive",
            ));
        }
        if let Some(mode) = &self.sslmode {
            if PgSslMode::from_str(mode).is_err() {
                return Err(ConfigError::invalid(
                    "postgres.sslmode",
                    "use disable, prefer, require, verify-ca or verify-full",
                ));
            }
        }
        if let Some(ca) = &self.ca_file {
            if !ca.is_file() {
                return Err(ConfigError::invalid(
                    "postgres.ca_file",
                    format!("{}: no such file", ca.display()),
                ));
            }
        }
        if let Some(schema) = &self.schema {
            if !valid_identifier(schema) {
                return Err(ConfigError::invalid(
                    "postgres.schema",
                    "use lower-case letters, digits and '_' (not starting with a digit)",
                ));
            }
        }
        Ok(())
    }

    /// Hides the URL's password from everything printed from now on.
    pub fn register_secrets(&self) {
        crate::redact::register_url(self.url.expose_secret());
    }

    /// Opens a pool. With `schema`, the schema is created if missing and
    /// every connection's `search_path` is set to it.
    pub async fn connect(&self) -> Result<PgPool, sqlx::Error> {
        install_crypto();
        let mut opts = PgConnectOptions::from_str(self.url.expose_secret())?;
        if let Some(mode) = &self.sslmode {
            opts = opts.ssl_mode(PgSslMode::from_str(mode)?);
        }
        if let Some(ca) = &self.ca_file {
            opts = opts.ssl_root_cert(ca);
        }
        if let Some(schema) = &self.schema {
            self.ensure_schema(&opts, schema).await?;
            opts = opts.options([("search_path", schema.as_str())]);
        }
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_with(opts)
            .await
    }

    /// Creates `schema` unless it exists; only then, so a role without
    /// CREATE on the database can use a schema prepared for it.
    async fn ensure_schema(&self, opts: &PgConnectOptions, schema: &str) -> sqlx::Result<()> {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.acquire_timeout)
            .connect_with(opts.clone())
            .await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(&admin)
                .await?;
        if !exists {
            // Validated as a plain identifier by `validate`; quoted anyway.
            let sql = format!(
                "CREATE SCHEMA IF NOT EXISTS \"{}\"",
                schema.replace('"', "")
            );
            // Two processes creating the same schema at once may race on the
            // catalog's unique index; the loser retries once.
            if admin.execute(sql.as_str()).await.is_err() {
                admin.execute(sql.as_str()).await?;
            }
        }
        admin.close().await;
        Ok(())
    }
}

/// A PostgreSQL identifier dlrflow accepts for a schema: lower-case letters,
/// digits and `_`, not starting with a digit, at most 63 bytes.
pub fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.as_bytes()[0].is_ascii_digit()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `[redis]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisSettings {
    /// `redis://[:password@]host:port[/db]`; a secret.
    pub url: Secret,
    /// Put before every key, so several deployments can share one Redis.
    pub prefix: String,
    /// Longest wait for a new connection.
    #[serde(rename = "connect_timeout_ms", with = "ms")]
    pub connect_timeout: Duration,
    /// Longest wait for one command's answer; then the command fails and the
    /// caller's own fallback (PostgreSQL for dedupe, no budget for reads)
    /// applies.
    #[serde(rename = "response_timeout_ms", with = "ms")]
    pub response_timeout: Duration,
    /// With a `rediss://` URL: the CA certificate(s), PEM, that sign the
    /// server's certificate. Unset, the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// `url` names one node of a Redis Cluster (any node: the client learns
    /// the others and the slot map from it, and follows `MOVED`/`ASK`).
    /// Off: `url` is one Redis server (or a proxy in front of several).
    #[serde(default)]
    pub cluster: bool,
}

/// A connection to the `[redis]` server or cluster, for every command,
/// pipeline and script (`ConnectionLike`). Both kinds reconnect by
/// themselves and are cheap to clone (one shared multiplexed connection).
///
/// On a cluster a command is sent to the node that owns its key's slot, a
/// script's keys must all share one slot (a hash tag, `{…}`), `MGET`/`DEL`
/// over several slots are split by the client, and a pipeline must stay in
/// one slot: code that pipelines keys of different slots asks
/// [`RedisConnection::is_cluster`] and sends them another way.
#[derive(Clone)]
pub enum RedisConnection {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl RedisConnection {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
    }
}

impl redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if redis::Client::open(self.url.expose_secret()).is_err() {
            return Err(ConfigError::invalid(
                "redis.url",
                "is not a redis:// or rediss:// URL (value not shown)",
            ));
        }
        if let Some(ca) = &self.ca_file {
            if !self.url.expose_secret().starts_with("rediss://") {
                return Err(ConfigError::invalid(
                    "redis.ca_file",
                    "is for TLS: use a rediss:// URL",
                ));
            }
            if !ca.is_file() {
                return Err(ConfigError::invalid(
                    "redis.ca_file",
                    format!("{}: no such file", ca.display()),
                ));
            }
        }
        if self.cluster {
            self.validate_cluster()?;
        }
        for (key, d) in [
            ("redis.connect_timeout_ms", self.connect_timeout),
            ("redis.response_timeout_ms", self.response_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::invalid(key, "must be positive"));
            }
        }
        Ok(())
    }

    /// What a cluster refuses: databases other than 0, and braces in the
    /// prefix (a `{…}` there would be the hash tag of every key: all of
    /// them on one node, and the limiter's own tags ignored).
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        use redis::IntoConnectionInfo;
        let info = self
            .url
            .expose_secret()
            .into_connection_info()
            .map_err(|_| ConfigError::invalid("redis.url", "is not a redis:// or rediss:// URL"))?;
        if info.redis.db != 0 {
            return Err(ConfigError::invalid(
                "redis.url",
                "names a database other than 0: a Redis Cluster has only database 0 \
                 (redis.cluster = true)",
            ));
        }
        if self.prefix.contains(['{', '}']) {
            return Err(ConfigError::invalid(
                "redis.prefix",
                "must not hold '{' or '}' with redis.cluster = true: dlrflow sets the \
                 keys' hash tags itself",
            ));
        }
        Ok(())
    }

    /// Hides the URL's password from everything printed from now on.
    pub fn register_secrets(&self) {
        crate::redact::register_url(self.url.expose_secret());
    }

    /// A client for the URL, with `ca_file`'s roots for `rediss://`. Its
    /// error never holds the URL's password.
    pub fn client(&self) -> anyhow::Result<redis::Client> {
        install_crypto();
        let scrub =
            |e: redis::RedisError| anyhow::anyhow!("{}", crate::redact::scrub(&e.to_string()));
        match &self.ca_file {
            None => redis::Client::open(self.url.expose_secret()).map_err(scrub),
            Some(ca) => {
                let root = std::fs::read(ca)
                    .map_err(|e| anyhow::anyhow!("redis.ca_file {}: {e}", ca.display()))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root),
                };
                redis::Client::build_with_tls(self.url.expose_secret(), certs).map_err(scrub)
            }
        }
    }

    /// A connection that reconnects by itself: to the server, or with
    /// `cluster` to the cluster `url` is a node of. Its error never holds
    /// the URL's password.
    pub async fn connect(&self) -> anyhow::Result<RedisConnection> {
        if self.cluster {
            return self.connect_cluster().await.map(RedisConnection::Cluster);
        }
        self.connect_single().await.map(RedisConnection::Single)
    }

    async fn connect_single(&self) -> anyhow::Result<redis::aio::ConnectionManager> {
        let scrub =
            |e: redis::RedisError| anyhow::anyhow!("{}", crate::redact::scrub(&e.to_string()));
        let client = self.client()?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.connect_timeout)
            .set_response_timeout(self.response_timeout)
            // One retry after at most 500 ms: the default backoff grows to a
            // minute and more between attempts, long after Redis is back.
            .set_number_of_retries(1)
            .set_factor(2)
            .set_max_delay(500);
        redis::aio::ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(scrub)
    }

    /// The cluster client: `url` is the first node it asks for the slot
    /// map; the password, user and TLS of `url` (with `ca_file`'s roots)
    /// apply to every node. The connection refreshes the slot map itself
    /// (on `MOVED`, on a node lost).
    async fn connect_cluster(&self) -> anyhow::Result<redis::cluster_async::ClusterConnection> {
        install_crypto();
        let scrub =
            |e: redis::RedisError| anyhow::anyhow!("{}", crate::redact::scrub(&e.to_string()));
        let mut builder = redis::cluster::ClusterClientBuilder::new([self.url.expose_secret()])
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.response_timeout)
            // Redirects count as retries: room for a MOVED, an ASK (a slot
            // being moved) and one retry after a failure, all within 500 ms
            // of waiting. As for one server, a failed command is not retried
            // for long: its caller falls back (PostgreSQL, or no grant).
            .retries(3)
            .min_retry_wait(100)
            .max_retry_wait(500);
        if let Some(ca) = &self.ca_file {
            let root = std::fs::read(ca)
                .map_err(|e| anyhow::anyhow!("redis.ca_file {}: {e}", ca.display()))?;
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root),
            });
        }
        let client = builder.build().map_err(scrub)?;
        client.get_async_connection().await.map_err(scrub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_or_serializes() {
        let s = Secret::new("postgres://u:hunter2@h/db");
        assert_eq!(format!("{s:?}"), MASK);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose_secret(), "postgres://u:hunter2@h/db");
    }

    #[test]
    fn a_cluster_refuses_a_database_and_braces_in_the_prefix() {
        let redis = |url: &str, prefix: &str, cluster: bool| -> RedisSettings {
            serde_json::from_value(serde_json::json!({
                "url": url, "prefix": prefix, "cluster": cluster,
                "connect_timeout_ms": 1000, "response_timeout_ms": 1000,
            }))
            .unwrap()
        };
        redis("redis://h:7000", "dlrflow:", true)
            .validate()
            .unwrap();
        redis("redis://h:7000/0", "dlrflow:", true)
            .validate()
            .unwrap();
        // One server may use another database, and braces in its prefix.
        redis("redis://h:6379/3", "{x}:", false).validate().unwrap();
        let err = redis("redis://:pw@h:7000/3", "dlrflow:", true)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis.url") && !err.contains("pw"), "{err}");
        let err = redis("redis://h:7000", "dl{rflow}:", true)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis.prefix"), "{err}");
        // Off unless set: the key is optional in a file.
        let off: RedisSettings = serde_json::from_value(serde_json::json!({
            "url": "redis://h", "prefix": "p",
            "connect_timeout_ms": 1, "response_timeout_ms": 1,
        }))
        .unwrap();
        assert!(!off.cluster);
    }

    #[test]
    fn durations_keep_their_unit_in_the_key() {
        let http: HttpSettings = serde_json::from_str(
            r#"{"listen":"127.0.0.1:1","admin_listen":"127.0.0.1:2","shutdown_grace_ms":1500}"#,
        )
        .unwrap();
        assert_eq!(http.shutdown_grace, Duration::from_millis(1500));
        let back = serde_json::to_value(&http).unwrap();
        assert_eq!(back["shutdown_grace_ms"], 1500);
    }

    #[test]
    fn postgres_validation_names_the_setting() {
        let mut pg = PostgresSettings::with_url("postgres://postgres@127.0.0.1/x");
        pg.validate(2).unwrap();
        pg.max_connections = 1;
        let err = pg.validate(2).unwrap_err().to_string();
        assert!(err.contains("postgres.max_connections"), "{err}");
        pg.max_connections = 2;
        pg.schema = Some("Bad-Name".into());
        let err = pg.validate(2).unwrap_err().to_string();
        assert!(err.contains("postgres.schema"), "{err}");
        pg.schema = None;
        pg.url = Secret::new("host=h password=pw");
        let err = pg.validate(2).unwrap_err().to_string();
        assert!(err.contains("postgres.url") && !err.contains("pw"), "{err}");
    }
}
