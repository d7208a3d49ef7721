//! The sources the ingest takes webhooks for, with their credentials and
//! allowed addresses, replaceable while the service runs.
//!
//! They come from `[[sources]]` in the configuration, or from the file named
//! by `sources_file`. That file is read again on SIGHUP and when it changes
//! (checked every `sources_check_ms`): a set that validates replaces the old
//! one at once and as a whole, so a request sees either the old or the new
//! set, never a mix; one that does not keeps the old set, and the log line
//! and `dlrflow_ingest_sources_reloads_total{outcome="failed"}` say why.
//! This is how a credential rotates without a restart: add the new password
//! next to the old one, let the gateway switch (Lisoloo invalidates the old
//! one the moment the merchant saves the new one), then remove the old one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use dlrflow_runtime::config::ConfigError;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{validate_sources, SourceConfig};

/// The current sources by name.
pub type SourceMap = HashMap<String, SourceConfig>;

/// The live set of sources, shared by every request.
#[derive(Clone)]
pub struct Sources {
    current: Arc<RwLock<Arc<SourceMap>>>,
}

impl Sources {
    pub fn new(list: &[SourceConfig]) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(by_name(list)))),
        }
    }

    /// The set as it is now; a request keeps using the one it started with.
    pub fn current(&self) -> Arc<SourceMap> {
        self.current.read().expect("sources lock").clone()
    }

    fn replace(&self, list: &[SourceConfig]) {
        *self.current.write().expect("sources lock") = Arc::new(by_name(list));
    }
}

fn by_name(list: &[SourceConfig]) -> SourceMap {
    list.iter().map(|s| (s.name.clone(), s.clone())).collect()
}

/// The shape of `sources_file`: `[[sources]]` entries and nothing else.
#[derive(Debug, Deserialize, Serialize)]
struct SourcesFile {
    #[serde(default)]
    sources: Vec<SourceConfig>,
}

/// Reads and validates `sources_file`; errors name the file and the setting.
pub fn load_file(path: &Path) -> Result<Vec<SourceConfig>, ConfigError> {
    let file: SourcesFile = dlrflow_runtime::config::load_file(path)?;
    validate_sources(&file.sources).map_err(|e| match e {
        ConfigError::Invalid { setting, reason } => ConfigError::Invalid {
            setting: format!("{} {setting}", path.display()),
            reason,
        },
        other => other,
    })?;
    Ok(file.sources)
}

/// Reloads `path` into `sources` on SIGHUP and when the file changes, until
/// `stop` is cancelled.
pub async fn watch(
    path: PathBuf,
    check: Duration,
    sources: Sources,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = stamp(&path);
    loop {
        let why = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = hangup.recv() => "SIGHUP",
            _ = tick.tick() => {
                if stamp(&path) == seen {
                    continue;
                }
                "file changed"
            }
        };
        // Whatever the outcome, this version of the file has been judged: a
        // broken file is reported once, not at every check.
        seen = stamp(&path);
        // A small file: read in place.
        match load_file(&path) {
            Ok(list) => {
                for s in &list {
                    s.register_secrets();
                }
                sources.replace(&list);
                let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
                metrics::counter!("dlrflow_ingest_sources_reloads_total", "outcome" => "ok")
                    .increment(1);
                tracing::info!(why, file = %path.display(), sources = ?names, "sources reloaded");
            }
            Err(e) => {
                metrics::counter!("dlrflow_ingest_sources_reloads_total", "outcome" => "failed")
                    .increment(1);
                tracing::error!(
                    why,
                    file = %path.display(),
                    error = %e,
                    "sources not reloaded; the current set stays in use"
                );
            }
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The address a request comes from: the peer, or, when the peer is one of
/// `trusted_proxies`, the last address in `X-Forwarded-For` that is not a
/// trusted proxy itself (a client can put anything at the front of that
/// header; only what the trusted proxies appended counts).
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted_proxies: &[IpNet]) -> IpAddr {
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|n| n.contains(ip));
    if !trusted(&peer) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in header.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if trusted(&ip) => client = ip,
            Ok(ip) => return ip,
            // A hop we cannot read: stop at the last address we could.
            Err(_) => return client,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Not from a proxy: the header is the client's word, ignored.
        assert_eq!(
            client_ip(ip("203.0.113.9"), Some("198.51.100.1"), &proxies),
            ip("203.0.113.9")
        );
        // From the proxy: the address it appended.
        assert_eq!(
            client_ip(ip("10.1.2.3"), Some("198.51.100.1"), &proxies),
            ip("198.51.100.1")
        );
        // A forged entry in front of the real one does not count.
        assert_eq!(
            client_ip(ip("10.1.2.3"), Some("192.0.2.66, 198.51.100.1"), &proxies),
            ip("198.51.100.1")
        );
        // Two proxies in a row.
        assert_eq!(
            client_ip(ip("10.1.2.3"), Some("198.51.100.1, 10.9.9.9"), &proxies),
            ip("198.51.100.1")
        );
        // A proxy without the header: the proxy itself.
        assert_eq!(client_ip(ip("10.1.2.3"), None, &proxies), ip("10.1.2.3"));
        // Garbage hop: the last readable address.
        assert_eq!(
            client_ip(ip("10.1.2.3"), Some("nonsense"), &proxies),
            ip("10.1.2.3")
        );
    }
}
