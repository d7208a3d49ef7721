//! The gateway's `GET /status/{message_id}` (see `status-api.md`).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, RETRY_AFTER};
use reqwest::StatusCode;

use crate::config::Config;

/// What one read returned. Every variant except [`Read::NotSent`] spent budget.
#[derive(Debug)]
pub enum Read {
    /// `200`: the body, to be parsed.
    Ok(Vec<u8>),
    /// `404`: not (yet) known to the gateway.
    NotFound,
    /// `429`: the key's budget is spent; `Retry-After` if given.
    RateLimited(Option<Duration>),
    /// `401` (or `403`): the key is refused.
    Unauthorized(StatusCode),
    /// `5xx`, another unexpected status, a timeout or a broken connection.
    Failed(String),
}

impl Read {
    /// The metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Read::Ok(_) => "ok",
            Read::NotFound => "not_found",
            Read::RateLimited(_) => "rate_limited",
            Read::Unauthorized(_) => "unauthorized",
            Read::Failed(_) => "failed",
        }
    }
}

/// A status-API client for one key.
#[derive(Clone)]
pub struct StatusClient {
    http: reqwest::Client,
    base: String,
}

impl StatusClient {
    pub fn new(cfg: &Config) -> anyhow::Result<Self> {
        let api = &cfg.status_api;
        let mut headers = HeaderMap::new();
        let name = HeaderName::from_bytes(api.auth_header.as_bytes())?;
        let mut value = HeaderValue::from_str(&cfg.auth_value())?;
        value.set_sensitive(true);
        headers.insert(name, value);
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_millis(api.timeout_ms))
            .connect_timeout(Duration::from_millis(api.connect_timeout_ms))
            .user_agent(concat!("dlrflow-reconcile/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(StatusClient {
            http,
            base: api.base_url.trim_end_matches('/').to_owned(),
        })
    }

    /// One read. Never retries: the caller owns the budget.
    pub async fn read(&self, message_id: &str) -> Read {
        let url = format!("{}/status/{}", self.base, encode_segment(message_id));
        let resp = match self.http.get(&url).send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Read::Failed("timeout".into()),
            Err(e) => return Read::Failed(format!("request failed: {e}")),
        };
        let status = resp.status();
        match status {
            StatusCode::OK => match resp.bytes().await {
                Ok(b) => Read::Ok(b.to_vec()),
                Err(e) => Read::Failed(format!("reading the body: {e}")),
            },
            StatusCode::NOT_FOUND => Read::NotFound,
            StatusCode::TOO_MANY_REQUESTS => Read::RateLimited(retry_after(resp.headers())),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Read::Unauthorized(status),
            other => Read::Failed(format!("HTTP {other}")),
        }
    }
}

/// `Retry-After` in seconds (an HTTP date is not used by this gateway; a
/// missing or unreadable value is `None`).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
}

/// Percent-encodes everything but unreserved characters, so a message id can
/// never change the path.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_cannot_escape_the_path() {
        assert_eq!(
            encode_segment("507f1f77bcf86cd799439011"),
            "507f1f77bcf86cd799439011"
        );
        assert_eq!(encode_segment("../a b/?"), "..%2Fa%20b%2F%3F");
    }

    #[test]
    fn retry_after_is_seconds() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }
}
