//! Kafka client settings shared by producers and consumers.
//!
//! `KafkaConfig::settings` passes librdkafka properties through untouched and
//! wins over everything dlrflow sets. Because environment variable names
//! cannot hold dots, an underscore in a settings key stands for a dot:
//! `DLRFLOW_KAFKA__SETTINGS__SOCKET_TIMEOUT_MS=1000` sets
//! `socket.timeout.ms=1000`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::client::{Client, ClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedHeaders};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize, Serializer};

use crate::config::ConfigError;

/// Record header names. A raw record written by this version carries at
/// most `traceparent` and `tracestate` (only when the request had a trace
/// context); its source and provider are in its key ([`raw_key`]) and its
/// receive time is the record timestamp. Records of
/// earlier versions carry `source`, `provider`, `received-at`, `ingest-id`
/// and `endpoint` as headers; the consumer still reads them.
pub mod header {
    /// Earlier raw records only (now in the key).
    pub const SOURCE: &str = "source";
    /// Earlier raw records only (now in the key).
    pub const PROVIDER: &str = "provider";
    /// Earlier raw records only (now the record timestamp).
    pub const RECEIVED_AT: &str = "received-at";
    /// Earlier raw records only (the record's partition and offset identify it).
    pub const INGEST_ID: &str = "ingest-id";
    pub const TRACEPARENT: &str = "traceparent";
    /// Written only when the trace has vendor state (W3C `tracestate`).
    pub const TRACESTATE: &str = "tracestate";
    /// Earlier raw records only (an Arpoone element's `Status` says the same).
    pub const ENDPOINT: &str = "endpoint";
    pub const ERROR: &str = "error";
}

/// The raw record's key: `{source}/{provider}/{message_id}`, e.g.
/// `acme/lisoloo/507f1f77bcf86cd799439011`. Source names (`[a-z0-9_-]`) and
/// providers never hold a `/`; the message id is everything after the second
/// one (it may hold `/`, and it is empty when the body had none).
///
/// The key carries what the consumer needs besides the body, so a record
/// needs no header: on Tansu's SQLite storage every header is a row of its
/// own and costs throughput (see ARCHITECTURE.md, "The raw record"). All
/// events of one message of one source share a key, hence a partition.
pub mod raw_key {
    /// What a raw record's key says.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct RawKey<'a> {
        pub source: &'a str,
        pub provider: &'a str,
        /// Empty when the body named no message id.
        pub message_id: &'a str,
    }

    /// The key of a record from `source` (of `provider`) for `message_id`.
    pub fn encode(source: &str, provider: &str, message_id: Option<&str>) -> String {
        let parts = [source, "/", provider, "/", message_id.unwrap_or("")];
        let mut k = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        parts.iter().for_each(|p| k.push_str(p));
        k
    }

    /// Reads a key written by [`encode`]; `None` for any other key (an
    /// earlier record's bare message id, say) or when source or provider is
    /// empty.
    pub fn decode(key: &[u8]) -> Option<RawKey<'_>> {
        let key = std::str::from_utf8(key).ok()?;
        let mut parts = key.splitn(3, '/');
        let source = parts.next().filter(|s| !s.is_empty())?;
        let provider = parts.next().filter(|s| !s.is_empty())?;
        let message_id = parts.next()?;
        Some(RawKey {
            source,
            provider,
            message_id,
        })
    }
}

/// `[kafka]`'s client part. Its `Debug` and `Serialize` show secret
/// `settings` values as `***`.
#[derive(Clone, Deserialize, Serialize)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Raw librdkafka properties, applied last. Values may be written as
    /// strings, numbers or booleans (`DLRFLOW_KAFKA__SETTINGS__FETCH_WAIT_MAX_MS=10`
    /// arrives as a number).
    #[serde(
        default,
        deserialize_with = "settings_map",
        serialize_with = "masked_settings"
    )]
    pub settings: BTreeMap<String, String>,
}

/// Whether a librdkafka property (as written in `kafka.settings`, with `.` or
/// `_`) holds a secret: a password, secret, token, key material or a SASL
/// configuration string. Such values are never printed.
pub fn is_secret_setting(key: &str) -> bool {
    let key = key.to_ascii_lowercase().replace('_', ".");
    ["password", "secret", "token", "jaas", "oauthbearer.config"]
        .iter()
        .any(|w| key.contains(w))
        || key == "ssl.key.pem"
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings: BTreeMap<&str, &str> = self
            .settings
            .iter()
            .map(|(k, v)| (k.as_str(), shown(k, v)))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("settings", &settings)
            .finish()
    }
}

impl KafkaConfig {
    /// Hides every secret `settings` value from everything printed from now on.
    pub fn register_secrets(&self) {
        self.secret_settings().for_each(crate::redact::register);
    }

    /// Every `settings` value that is a secret, for redaction.
    pub fn secret_settings(&self) -> impl Iterator<Item = &str> {
        self.settings
            .iter()
            .filter(|(k, _)| is_secret_setting(k))
            .map(|(_, v)| v.as_str())
    }
}

/// The settings with every secret value shown as `***`.
fn masked_settings<S: Serializer>(
    settings: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(settings.iter().map(|(k, v)| (k, shown(k, v))))
}

/// A setting's value as it may be shown.
fn shown<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret_setting(key) {
        crate::settings::MASK
    } else {
        value
    }
}

fn settings_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::Text(s) => s,
                Scalar::Int(i) => i.to_string(),
                Scalar::Float(f) => f.to_string(),
                Scalar::Bool(b) => b.to_string(),
            };
            (k, v)
        })
        .collect())
}

impl KafkaConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::invalid("kafka.brokers", "must not be empty"));
        }
        Ok(())
    }

    /// The largest record a producer made from this config may write:
    /// librdkafka's `message.max.bytes` (default 1,000,000) from the
    /// pass-through settings. The broker's own limit may be lower.
    pub fn max_message_bytes(&self) -> usize {
        self.settings
            .iter()
            .find(|(k, _)| k.replace('_', ".") == "message.max.bytes")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1_000_000)
    }

    /// A client config with the brokers and the pass-through settings; `base`
    /// holds the caller's own defaults, which the pass-through overrides.
    pub fn client_config(&self, base: &[(&str, String)]) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers);
        for (k, v) in base {
            cfg.set(*k, v);
        }
        for (k, v) in &self.settings {
            cfg.set(k.replace('_', "."), v);
        }
        cfg
    }
}

/// Checks that `topic` exists with at least one partition, within `timeout`,
/// and returns its partition count. Blocking: call it from `spawn_blocking`.
pub fn topic_ready<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<usize, String> {
    let md = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("metadata: {e}"))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| format!("topic {topic} missing"))?;
    if let Some(err) = t.error() {
        return Err(format!("topic {topic}: {err:?}"));
    }
    if t.partitions().is_empty() {
        return Err(format!("topic {topic} has no partitions"));
    }
    Ok(t.partitions().len())
}

/// [`topic_ready`] for a producer, off the async runtime, within
/// [`crate::service::PROBE_TIMEOUT`]: what a readiness check asks.
pub async fn producer_topic_ready(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
) -> Result<usize, String> {
    use rdkafka::producer::Producer as _;
    let producer = producer.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        topic_ready(producer.client(), &topic, crate::service::PROBE_TIMEOUT)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Reads a UTF-8 header value by name.
pub fn header_str<'a, H: Headers>(headers: Option<&'a H>, name: &str) -> Option<&'a str> {
    let headers = headers?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Copies every header of `from`, replacing or adding `extra`.
pub fn copy_headers<H: Headers>(from: Option<&H>, extra: &[(&str, &str)]) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(from) = from {
        for h in from.iter() {
            if extra.iter().any(|(k, _)| *k == h.key) {
                continue;
            }
            out = out.insert(rdkafka::message::Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    for (k, v) in extra {
        out = out.insert(rdkafka::message::Header {
            key: k,
            value: Some(*v),
        });
    }
    out
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record timestamp (ms since the epoch), when it has one.
    pub timestamp: Option<i64>,
}

impl Record {
    /// The key read as a raw record's key ([`raw_key`]).
    pub fn raw_key(&self) -> Option<raw_key::RawKey<'_>> {
        self.key.as_deref().and_then(raw_key::decode)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Reads every partition of `topic` from the beginning (outside any consumer
/// group's offsets: `dlrflow-ingest tail`, tests) until `expected`
/// records arrived or `timeout` passed, then keeps reading for `settle` to
/// catch records beyond `expected`. Returns what it got.
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> anyhow::Result<Vec<Record>> {
    read_topic_with(brokers, &[], topic, expected, timeout, settle).await
}

/// [`read_topic`] with librdkafka `settings` (e.g. TLS to the broker).
pub async fn read_topic_with(
    brokers: &str,
    settings: &[(&str, &str)],
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> anyhow::Result<Vec<Record>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("dlrflow-reader-{}", uuid::Uuid::now_v7().simple()),
        )
        .set("enable.auto.commit", "false");
    for (k, v) in settings {
        config.set(*k, *v);
    }
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create()?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
        let partitions = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p as i32, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        let mut settle_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if out.len() >= expected && settle_until.is_none() {
                settle_until = Some(now + settle);
            }
            if settle_until.is_some_and(|s| now >= s) || now >= deadline {
                break;
            }
            if let Some(msg) = consumer.poll(Duration::from_millis(100)) {
                let msg = msg?;
                let headers = msg
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    partition: msg.partition(),
                    offset: msg.offset(),
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().unwrap_or_default().to_vec(),
                    headers,
                    timestamp: msg.timestamp().to_millis(),
                });
            }
        }
        Ok(out)
    })
    .await?
}

#[cfg(test)]
mod raw_key_tests {
    use super::raw_key::{decode, encode, RawKey};

    #[test]
    fn keys_round_trip_and_the_message_id_keeps_its_slashes() {
        for (source, provider, mid) in [
            ("acme", "lisoloo", Some("507f1f77bcf86cd799439011")),
            ("shop-2", "arpoone", Some("a/b//c")),
            ("acme", "lisoloo", None),
        ] {
            let k = encode(source, provider, mid);
            assert_eq!(
                decode(k.as_bytes()),
                Some(RawKey {
                    source,
                    provider,
                    message_id: mid.unwrap_or(""),
                }),
                "{k}"
            );
        }
        assert_eq!(encode("acme", "lisoloo", Some("m1")), "acme/lisoloo/m1");
    }

    #[test]
    fn other_keys_are_not_raw_keys() {
        for k in [
            &b"507f1f77bcf86cd799439011"[..],
            b"a/b",
            b"/lisoloo/m",
            b"acme//m",
            b"\xff\xfe/a/b",
        ] {
            assert_eq!(decode(k), None, "{k:?}");
        }
    }
}

#[cfg(test)]
// `figment::Jail`'s closure must return `figment::Error`, which is large.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[derive(Deserialize, Serialize)]
    struct Holder {
        kafka: KafkaConfig,
    }

    #[test]
    fn settings_from_the_environment_become_librdkafka_properties() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DLRFLOW_KAFKA__SETTINGS__FETCH_WAIT_MAX_MS", "10");
            jail.set_env("DLRFLOW_KAFKA__SETTINGS__CHECK_CRCS", "true");
            jail.set_env("DLRFLOW_KAFKA__SETTINGS__CLIENT_RACK", "eu-1a");
            let h: Holder = crate::config::load("[kafka]\nbrokers = \"b:9092\"\n", None).unwrap();
            let cfg = h.kafka.client_config(&[("linger.ms", "5".into())]);
            assert_eq!(cfg.get("fetch.wait.max.ms"), Some("10"));
            assert_eq!(cfg.get("check.crcs"), Some("true"));
            assert_eq!(cfg.get("client.rack"), Some("eu-1a"));
            assert_eq!(cfg.get("bootstrap.servers"), Some("b:9092"));
            assert_eq!(cfg.get("linger.ms"), Some("5"));
            Ok(())
        });
    }
}
