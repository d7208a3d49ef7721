//! The HTTP server behind every listener of a [`crate::service::Service`]:
//! HTTP/1.1 and HTTP/2 (ALPN or prior knowledge), optional TLS with a
//! certificate reloaded without dropping a connection, and the limits that
//! keep an abusive or broken client from holding the service:
//!
//! * `http.max_connections`: one more connection is answered `503` with
//!   `Retry-After` and closed at once (over TLS: closed), counted in
//!   `dlrflow_http_connections_refused_total`;
//! * `http.header_read_timeout_ms`: a request head (and, over TLS, the
//!   handshake before it) must arrive within it, so a client that connects
//!   and sends nothing, or trickles its headers (slowloris), is
//!   disconnected; the body has its own limit in the service (the ingest's
//!   `http.body_read_timeout_ms`);
//! * `http.idle_timeout_ms`: a connection without a request in flight for
//!   that long is closed (HTTP/1.1 keep-alive connections already close when
//!   no new request head arrives within `http.header_read_timeout_ms`);
//! * `http.max_header_bytes`: a larger request head gets `431`;
//! * HTTP/2: at most 256 concurrent streams, a PING every 20 s, and a peer
//!   that does not answer one within 20 s is disconnected.
//!
//! The client's address is in every request as
//! `axum::extract::ConnectInfo<SocketAddr>`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::settings::ms;

/// `[http.tls]`: serve HTTPS on the public listener. The files are PEM: the
/// certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or
/// SEC1). They are read again on SIGHUP and when either file changes
/// (checked every `reload_check_ms`); a pair that does not load keeps the
/// current one and says why. Connections already open keep theirs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(
        rename = "reload_check_ms",
        with = "ms",
        default = "default_reload_check"
    )]
    pub reload_check: Duration,
}

fn default_reload_check() -> Duration {
    Duration::from_secs(5)
}

/// How one listener serves: its name in metrics and logs (`public`,
/// `admin`), its limits and its TLS.
#[derive(Clone)]
pub struct Serving {
    pub name: &'static str,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub idle_timeout: Duration,
    pub tls: Option<Arc<TlsReloader>>,
}

/// The `Retry-After` of a connection refused for `max_connections`.
const REFUSED_RETRY_AFTER_SECS: u64 = 5;

/// The smallest buffer hyper accepts for a request head.
const MIN_HEADER_BUF: usize = 8192;

/// Serves `routes` on `listener` until `stop` is cancelled, then stops
/// accepting and waits for the open connections to finish their requests
/// (the caller bounds that wait with the service's grace).
pub async fn serve(
    listener: TcpListener,
    routes: Router,
    serving: Serving,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(serving.header_read_timeout)
        .max_buf_size(serving.max_header_bytes.max(MIN_HEADER_BUF));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(serving.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(serving.max_connections));
    let name = serving.name;
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment
                    // rather than spin; the listener itself is still fine.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("dlrflow_http_connections_refused_total", "listener" => name)
                .increment(1);
            connections.spawn(refuse(stream, serving.tls.is_some()));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            peer,
            routes: routes.clone(),
            builder: builder.clone(),
            serving: serving.clone(),
            stop: stop.clone(),
        };
        connections.spawn(async move {
            let _slot = slot;
            metrics::gauge!("dlrflow_http_open_connections", "listener" => name).increment(1.0);
            conn.run(stream).await;
            metrics::gauge!("dlrflow_http_open_connections", "listener" => name).decrement(1.0);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// One accepted connection and what it needs.
struct Connection {
    peer: SocketAddr,
    routes: Router,
    builder: Builder<TokioExecutor>,
    serving: Serving,
    stop: CancellationToken,
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        let name = self.serving.name;
        let peer = self.peer;
        let result = match self.serving.tls.clone() {
            None => self.serve(TokioIo::new(stream)).await,
            Some(tls) => {
                let handshake = tokio::time::timeout(
                    self.serving.header_read_timeout,
                    tls.acceptor().accept(stream),
                );
                match handshake.await {
                    Ok(Ok(stream)) => self.serve(TokioIo::new(stream)).await,
                    Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                    Err(_) => Err("TLS handshake timed out".to_owned()),
                }
                .inspect_err(|_| {
                    metrics::counter!("dlrflow_tls_handshake_failures_total", "listener" => name)
                        .increment(1);
                })
            }
        };
        if let Err(e) = result {
            // Timeouts, resets, malformed requests, failed handshakes: the
            // client's problem, not the service's.
            tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
        }
    }

    /// Serves requests on `io` until the client closes it, it stays idle
    /// too long, or the service stops (then in-flight requests finish).
    async fn serve<I>(self, io: I) -> Result<(), String>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let service = {
            let (routes, peer, activity) = (self.routes, self.peer, activity.clone());
            hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let guard = activity.begin();
                let answer = routes.clone().oneshot(req);
                async move {
                    let response = answer.await;
                    drop(guard);
                    response
                }
            })
        };
        let conn = self.builder.serve_connection_with_upgrades(io, service);
        let mut conn = std::pin::pin!(conn);
        let (first, idle) = (self.serving.header_read_timeout, self.serving.idle_timeout);
        let mut closing = false;
        loop {
            let wake = activity.idle_deadline(first, idle);
            tokio::select! {
                result = conn.as_mut() => return result.map_err(|e| e.to_string()),
                () = self.stop.cancelled(), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = tokio::time::sleep_until(wake), if !closing => {
                    if activity.idle_deadline(first, idle) <= tokio::time::Instant::now() {
                        // No request yet within the head timeout (a client
                        // that connects and sends nothing, or trickles the
                        // preface), or none for the idle timeout.
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }
}

/// The requests of one connection: how many are in flight, whether there
/// was one, and when the last began or ended.
struct Activity {
    state: std::sync::Mutex<(usize, bool, tokio::time::Instant)>,
}

/// Ends a request's part in [`Activity`] when dropped (also on a panic or a
/// cancelled request).
struct InFlight(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Self {
            state: std::sync::Mutex::new((0, false, tokio::time::Instant::now())),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        let mut s = self.state.lock().expect("activity lock");
        s.0 += 1;
        s.1 = true;
        s.2 = tokio::time::Instant::now();
        InFlight(self.clone())
    }

    /// When the connection counts as idle if nothing happens before: `first`
    /// after it opened while no request came, `idle` after the last request
    /// ended; never while a request is in flight (then: check again later).
    fn idle_deadline(&self, first: Duration, idle: Duration) -> tokio::time::Instant {
        let s = self.state.lock().expect("activity lock");
        match *s {
            (0, false, since) => since + first,
            (0, true, since) => since + idle,
            _ => tokio::time::Instant::now() + idle,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().expect("activity lock");
        s.0 -= 1;
        s.2 = tokio::time::Instant::now();
    }
}

/// Answers a connection over the limit: `503` with `Retry-After` on plain
/// HTTP (a gateway retries it), a plain close over TLS.
async fn refuse(mut stream: TcpStream, tls: bool) {
    if !tls {
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {REFUSED_RETRY_AFTER_SECS}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }
}

/// The certificate and key of a TLS listener, read again on SIGHUP and when
/// a file changes.
pub struct TlsReloader {
    settings: TlsSettings,
    setting: &'static str,
    current: RwLock<(Arc<ServerConfig>, Stamp)>,
}

/// What the files looked like when last loaded.
type Stamp = Option<(SystemTime, u64, SystemTime, u64)>;

impl TlsReloader {
    /// Loads the pair once; an error names `setting` (e.g. `http.tls`).
    pub fn load(settings: TlsSettings, setting: &'static str) -> anyhow::Result<Arc<Self>> {
        let stamp = stamp(&settings);
        let config = server_config(&settings).with_context(|| format!("{setting}: not loaded"))?;
        Ok(Arc::new(Self {
            settings,
            setting,
            current: RwLock::new((Arc::new(config), stamp)),
        }))
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self.current.read().expect("tls lock").0.clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Loads the files again; on error keeps the current pair.
    pub fn reload(&self, why: &str) -> anyhow::Result<()> {
        let stamp = stamp(&self.settings);
        match server_config(&self.settings) {
            Ok(config) => {
                *self.current.write().expect("tls lock") = (Arc::new(config), stamp);
                metrics::counter!("dlrflow_tls_reloads_total", "outcome" => "ok").increment(1);
                tracing::info!(setting = self.setting, why, "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                // Remember the stamp anyway: a broken file is reported once,
                // not at every check, until it changes again.
                self.current.write().expect("tls lock").1 = stamp;
                metrics::counter!("dlrflow_tls_reloads_total", "outcome" => "failed").increment(1);
                tracing::error!(
                    setting = self.setting,
                    why,
                    error = %format!("{e:#}"),
                    "TLS certificate not reloaded; keeping the current one"
                );
                Err(e)
            }
        }
    }

    /// Reloads on SIGHUP and when a file's time or size changes, until
    /// `stop` is cancelled.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) -> anyhow::Result<()> {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        let mut tick = tokio::time::interval(self.settings.reload_check);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                _ = hangup.recv() => { let _ = self.reload("SIGHUP"); }
                _ = tick.tick() => {
                    let seen = self.current.read().expect("tls lock").1;
                    if stamp(&self.settings) != seen {
                        let _ = self.reload("file changed");
                    }
                }
            }
        }
    }
}

fn stamp(s: &TlsSettings) -> Stamp {
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    let (c, k) = (one(&s.cert_file)?, one(&s.key_file)?);
    Some((c.0, c.1, k.0, k.1))
}

fn server_config(s: &TlsSettings) -> anyhow::Result<ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&s.cert_file)
        .and_then(|i| i.collect())
        .map_err(|e| anyhow::anyhow!("cert_file {}: {e}", s.cert_file.display()))?;
    if certs.is_empty() {
        anyhow::bail!("cert_file {}: no certificate in it", s.cert_file.display());
    }
    // The key's own error text never holds key material; the path is shown.
    let key = PrivateKeyDer::from_pem_file(&s.key_file)
        .map_err(|e| anyhow::anyhow!("key_file {}: {e}", s.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and the key do not form a pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
