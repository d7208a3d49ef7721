//! Who may read what through the read API.
//!
//! A caller presents `Authorization: Bearer <key>`. The configuration holds
//! only each key's SHA-256 (`api.keys[].sha256`), so a leaked configuration
//! does not leak a key. Every configured hash is compared in constant time,
//! whatever matched before, so timing tells nothing about which key was
//! close. A key sees only the messages of its `sources` (`"*"`: all); a
//! message of another source answers 404 exactly like one that does not
//! exist. Each key has its own request rate (a token bucket per replica);
//! over it, 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dlrflow_runtime::config::ConfigError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// `[api]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ApiConfig {
    /// No authentication at all: every caller reads every source. Only
    /// behind a proxy that authenticates; an explicit choice, never a
    /// default.
    pub open: bool,
    /// The active keys; several at once allow rotation without downtime.
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
    /// Sustained requests per second allowed to one key (per replica).
    pub requests_per_sec: u32,
    /// Requests one key may make at once above the sustained rate.
    pub burst: u32,
    /// The most recipients one answer holds; more are paged with `after`.
    pub page_size: u32,
}

/// `[[api.keys]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ApiKeyConfig {
    /// Names the key in the audit log and metrics (never the key itself).
    pub id: String,
    /// Hex SHA-256 of the key (`dlrflow-state api-key` makes a key and its hash).
    pub sha256: String,
    /// The sources (tenants) this key may read; `["*"]` for all.
    pub sources: Vec<String>,
}

impl ApiConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut ids = std::collections::HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let at = |f: &str| format!("api.keys[{i}].{f}");
            if k.id.is_empty()
                || k.id.len() > 64
                || !k
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(ConfigError::invalid(
                    at("id"),
                    "use 1 to 64 letters, digits, '-' and '_'",
                ));
            }
            if !ids.insert(k.id.as_str()) {
                return Err(ConfigError::invalid(
                    at("id"),
                    format!("duplicate key id `{}`", k.id),
                ));
            }
            if parse_hash(&k.sha256).is_none() {
                return Err(ConfigError::invalid(
                    at("sha256"),
                    "must be 64 hex digits: the SHA-256 of the key, not the key (see `dlrflow-state api-key`)",
                ));
            }
            if k.sources.is_empty() || k.sources.iter().any(|s| s.trim().is_empty()) {
                return Err(ConfigError::invalid(
                    at("sources"),
                    "list the sources this key may read, or [\"*\"] for all",
                ));
            }
        }
        if self.requests_per_sec == 0 || self.burst == 0 {
            return Err(ConfigError::invalid(
                "api.requests_per_sec",
                "api.requests_per_sec and api.burst must be positive",
            ));
        }
        if !(1..=10_000).contains(&self.page_size) {
            return Err(ConfigError::invalid(
                "api.page_size",
                "must be between 1 and 10000",
            ));
        }
        Ok(())
    }
}

fn parse_hash(hex_text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(hex_text.trim()).ok()?;
    bytes.try_into().ok()
}

/// The hex SHA-256 of `key`, as `api.keys[].sha256` holds it.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random key (256 bits, URL-safe) for `dlrflow-state api-key`.
pub fn new_key() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("dlrk_{}", hex::encode(bytes))
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `api.open`: no authentication configured.
    Anyone,
    Key {
        id: String,
        /// `None`: every source.
        sources: Option<Vec<String>>,
    },
}

impl Caller {
    /// The name in the audit log.
    pub fn id(&self) -> &str {
        match self {
            Caller::Anyone => "-",
            Caller::Key { id, .. } => id,
        }
    }

    /// The sources it may read; `None`: every source.
    pub fn sources(&self) -> Option<&[String]> {
        match self {
            Caller::Anyone => None,
            Caller::Key { sources, .. } => sources.as_deref(),
        }
    }

    pub fn may_read(&self, source: &str) -> bool {
        match self {
            Caller::Anyone | Caller::Key { sources: None, .. } => true,
            Caller::Key {
                sources: Some(s), ..
            } => s.iter().any(|x| x == source),
        }
    }
}

/// Why a request is refused before it reads anything.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No key, a malformed header or an unknown key (401).
    Unauthenticated,
    /// Over the key's rate; retry after this long (429).
    RateLimited(Duration),
}

struct Key {
    id: String,
    hash: [u8; 32],
    sources: Option<Vec<String>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The keys and their rate buckets.
pub struct Access {
    open: bool,
    keys: Vec<Key>,
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Access {
    /// From a validated `[api]`.
    pub fn new(cfg: &ApiConfig) -> Self {
        let keys = cfg
            .keys
            .iter()
            .map(|k| Key {
                id: k.id.clone(),
                hash: parse_hash(&k.sha256).unwrap_or([0; 32]),
                sources: (!k.sources.iter().any(|s| s == "*")).then(|| k.sources.clone()),
            })
            .collect();
        Self {
            open: cfg.open,
            keys,
            rate: f64::from(cfg.requests_per_sec),
            burst: f64::from(cfg.burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether any caller can read at all (for the start-up warning).
    pub fn is_closed(&self) -> bool {
        !self.open && self.keys.is_empty()
    }

    /// Authenticates the `Authorization` header and takes one request from
    /// the caller's rate.
    pub fn admit(&self, authorization: Option<&[u8]>) -> Result<Caller, Refusal> {
        if self.open {
            return Ok(Caller::Anyone);
        }
        let presented = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| Sha256::digest(key.trim().as_bytes()));
        let Some(presented) = presented else {
            return Err(Refusal::Unauthenticated);
        };
        let mut found: Option<&Key> = None;
        for k in &self.keys {
            let hit: Choice = presented.as_slice().ct_eq(&k.hash);
            if bool::from(hit) {
                found = Some(k);
            }
        }
        let key = found.ok_or(Refusal::Unauthenticated)?;
        self.take(&key.id)?;
        Ok(Caller::Key {
            id: key.id.clone(),
            sources: key.sources.clone(),
        })
    }

    fn take(&self, id: &str) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(id.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.duration_since(b.at).as_secs_f64() * self.rate;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - b.tokens) / self.rate;
            Err(Refusal::RateLimited(Duration::from_secs_f64(wait)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(keys: Vec<ApiKeyConfig>) -> ApiConfig {
        ApiConfig {
            open: false,
            keys,
            requests_per_sec: 1,
            burst: 2,
            page_size: 100,
        }
    }

    fn key(id: &str, secret: &str, sources: &[&str]) -> ApiKeyConfig {
        ApiKeyConfig {
            id: id.into(),
            sha256: key_hash(secret),
            sources: sources.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_key_is_known_by_its_hash_and_sees_only_its_sources() {
        let a = Access::new(&cfg(vec![
            key("old", "k-old", &["acme"]),
            key("new", "k-new", &["acme"]),
            key("ops", "k-ops", &["*"]),
        ]));
        let caller = a.admit(Some(b"Bearer k-new")).unwrap();
        assert_eq!(caller.id(), "new");
        assert!(caller.may_read("acme") && !caller.may_read("other"));
        assert!(a.admit(Some(b"bearer k-ops")).unwrap().may_read("other"));
        for bad in [
            None,
            Some(&b"Bearer nope"[..]),
            Some(b"Basic k-new"),
            Some(b"k-new"),
        ] {
            assert_eq!(a.admit(bad), Err(Refusal::Unauthenticated), "{bad:?}");
        }
    }

    #[test]
    fn each_key_has_its_own_rate() {
        let a = Access::new(&cfg(vec![key("a", "ka", &["*"]), key("b", "kb", &["*"])]));
        a.admit(Some(b"Bearer ka")).unwrap();
        a.admit(Some(b"Bearer ka")).unwrap();
        let Err(Refusal::RateLimited(wait)) = a.admit(Some(b"Bearer ka")) else {
            panic!("the third request within the burst of 2 must wait");
        };
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        a.admit(Some(b"Bearer kb")).unwrap();
    }

    #[test]
    fn validation_refuses_a_plain_key_where_its_hash_belongs() {
        let mut c = cfg(vec![key("a", "ka", &["acme"])]);
        c.validate().unwrap();
        c.keys[0].sha256 = "ka".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("api.keys[0].sha256") && !err.contains("\"ka\""),
            "{err}"
        );
        c.keys[0].sha256 = key_hash("ka");
        c.keys[0].sources.clear();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("api.keys[0].sources"));
    }
}
