//! The Lisoloo gateway's own state and its `GET /status/{message_id}` API
//! (contract: shared/status-api.md), with Bearer-key auth, the hard
//! 120-reads-per-minute sliding-window limit per key, and a log of every read.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn ser_ts<S: Serializer>(v: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(t) => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true)),
        None => s.serialize_none(),
    }
}

/// Recipient status as the gateway knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecipientStatus {
    Pending,
    Processing,
    Sent,
    Delivered,
    Failed,
}

impl RecipientStatus {
    fn is_terminal(self) -> bool {
        matches!(self, RecipientStatus::Delivered | RecipientStatus::Failed)
    }
}

/// One recipient in a `GET /status` answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusRecipient {
    pub recipient_phone: String,
    pub status: RecipientStatus,
    pub carrier: Option<String>,
    #[serde(serialize_with = "ser_ts")]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "ser_ts")]
    pub delivered_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "ser_ts")]
    pub failed_at: Option<DateTime<Utc>>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub retryable: Option<bool>,
    pub segments: Option<u32>,
}

impl StatusRecipient {
    pub(crate) fn pending(phone: &str) -> Self {
        Self {
            recipient_phone: phone.to_owned(),
            status: RecipientStatus::Pending,
            carrier: None,
            sent_at: None,
            delivered_at: None,
            failed_at: None,
            error_code: None,
            error_message: None,
            retryable: None,
            segments: None,
        }
    }
}

/// A `GET /status` answer body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusResponse {
    pub message_id: String,
    /// pending | processing | sent | delivered | failed | partially_delivered
    pub status: String,
    pub total_recipients: usize,
    pub recipients: Vec<StatusRecipient>,
}

/// Message status derived from its recipients: all terminal → delivered,
/// failed or partially_delivered (mixed); otherwise all pending → pending;
/// every non-terminal recipient at `sent` → sent; else processing.
pub fn derive_message_status(recipients: &[StatusRecipient]) -> &'static str {
    use RecipientStatus::*;
    if recipients.is_empty() {
        return "pending";
    }
    if recipients.iter().all(|r| r.status.is_terminal()) {
        let delivered = recipients.iter().filter(|r| r.status == Delivered).count();
        return match delivered {
            0 => "failed",
            n if n == recipients.len() => "delivered",
            _ => "partially_delivered",
        };
    }
    if recipients.iter().all(|r| r.status == Pending) {
        return "pending";
    }
    if recipients
        .iter()
        .all(|r| r.status.is_terminal() || r.status == Sent)
    {
        return "sent";
    }
    "processing"
}

/// The gateway's current state of every message, advanced by the sender as
/// transitions fall due (whether or not their webhooks get through).
#[derive(Debug, Clone, Default)]
pub struct Gateway {
    messages: Arc<Mutex<HashMap<String, Vec<StatusRecipient>>>>,
}

impl Gateway {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current status of a message, `None` if not (yet) known.
    pub fn status(&self, message_id: &str) -> Option<StatusResponse> {
        let map = self.messages.lock().unwrap();
        let recipients = map.get(message_id)?.clone();
        Some(StatusResponse {
            message_id: message_id.to_owned(),
            status: derive_message_status(&recipients).to_owned(),
            total_recipients: recipients.len(),
            recipients,
        })
    }

    /// Ids of all known messages.
    pub fn message_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.messages.lock().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    }

    pub(crate) fn insert(&self, message_id: &str, recipients: Vec<StatusRecipient>) {
        self.messages
            .lock()
            .unwrap()
            .insert(message_id.to_owned(), recipients);
    }

    pub(crate) fn update(
        &self,
        message_id: &str,
        index: usize,
        f: impl FnOnce(&mut StatusRecipient),
    ) {
        let mut map = self.messages.lock().unwrap();
        if let Some(r) = map.get_mut(message_id).and_then(|rs| rs.get_mut(index)) {
            f(r);
        }
    }
}

/// Settings of the status server.
#[derive(Debug, Clone)]
pub struct StatusServerConfig {
    /// Where to listen (127.0.0.1:0 picks a free port).
    pub listen: SocketAddr,
    /// Accepted API keys (`Authorization: Bearer <key>`); each has its own budget.
    pub api_keys: Vec<String>,
    /// Reads allowed per key in any sliding `window`.
    pub limit: u32,
    pub window: Duration,
    /// Append every read as a JSON line to this file.
    pub read_log: Option<PathBuf>,
}

impl Default for StatusServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            api_keys: vec!["sim-status-key".to_owned()],
            limit: 120,
            window: Duration::from_secs(60),
            read_log: None,
        }
    }
}

/// One `GET /status` request as the gateway saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadRecord {
    pub at: DateTime<Utc>,
    pub message_id: String,
    /// HTTP status answered: 200, 401, 404 or 429.
    pub status: u16,
    /// Index of the API key used (into `api_keys`), if it was valid.
    pub key_index: Option<usize>,
}

struct ServerState {
    gateway: Gateway,
    keys: Vec<String>,
    limit: u32,
    window: Duration,
    /// Accepted (counted) reads per key, oldest first.
    windows: Mutex<Vec<VecDeque<Instant>>>,
    reads: Mutex<Vec<ReadRecord>>,
    log_file: Option<Mutex<std::fs::File>>,
}

impl ServerState {
    /// Counts a read against the key's budget, or returns the seconds until
    /// the oldest counted read leaves the window.
    fn admit(&self, key: usize) -> Result<(), u64> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap();
        let w = &mut windows[key];
        while let Some(oldest) = w.front() {
            if now.duration_since(*oldest) >= self.window {
                w.pop_front();
            } else {
                break;
            }
        }
        if w.len() >= self.limit as usize {
            let oldest = *w.front().expect("limit > 0 implies non-empty");
            let wait = (oldest + self.window).saturating_duration_since(now);
            return Err(wait.as_secs_f64().ceil().max(1.0) as u64);
        }
        w.push_back(now);
        Ok(())
    }

    fn log(&self, rec: ReadRecord) {
        if let Some(file) = &self.log_file {
            if let Ok(line) = serde_json::to_string(&rec) {
                let mut f = file.lock().unwrap();
                if let Err(err) = writeln!(f, "{line}") {
                    tracing::warn!(error = %err, "cannot write read log");
                }
            }
        }
        self.reads.lock().unwrap().push(rec);
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn get_status(
    State(st): State<Arc<ServerState>>,
    Path(message_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let key_index = bearer(&headers).and_then(|k| st.keys.iter().position(|x| x == k));
    let (code, response) = match key_index {
        None => (
            StatusCode::UNAUTHORIZED,
            (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({"error": "invalid API key"})),
            )
                .into_response(),
        ),
        Some(ki) => match st.admit(ki) {
            Err(retry_after) => {
                let mut resp = (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(serde_json::json!({"error": "rate limit exceeded", "retry_after": retry_after})),
                )
                    .into_response();
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                (StatusCode::TOO_MANY_REQUESTS, resp)
            }
            Ok(()) => match st.gateway.status(&message_id) {
                Some(s) => (StatusCode::OK, Json(s).into_response()),
                None => (
                    StatusCode::NOT_FOUND,
                    (
                        StatusCode::NOT_FOUND,
                        Json(serde_json::json!({"error": "message not found"})),
                    )
                        .into_response(),
                ),
            },
        },
    };
    st.log(ReadRecord {
        at: Utc::now(),
        message_id,
        status: code.as_u16(),
        key_index,
    });
    response
}

async fn get_reads(State(st): State<Arc<ServerState>>) -> Json<Vec<ReadRecord>> {
    Json(st.reads.lock().unwrap().clone())
}

fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/status/{message_id}", get(get_status))
        .route("/reads", get(get_reads))
        .with_state(state)
}

/// A running status server. Dropping it does not stop it; call `shutdown`.
pub struct StatusServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl StatusServer {
    /// Binds and starts serving `gateway`'s state.
    pub async fn start(cfg: StatusServerConfig, gateway: Gateway) -> anyhow::Result<Self> {
        anyhow::ensure!(cfg.limit > 0, "status limit must be at least 1");
        anyhow::ensure!(
            !cfg.api_keys.is_empty(),
            "at least one status API key is needed"
        );
        let log_file = match &cfg.read_log {
            Some(path) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening read log {}", path.display()))?,
            )),
            None => None,
        };
        let state = Arc::new(ServerState {
            gateway,
            windows: Mutex::new(vec![VecDeque::new(); cfg.api_keys.len()]),
            keys: cfg.api_keys,
            limit: cfg.limit,
            window: cfg.window,
            reads: Mutex::new(Vec::new()),
            log_file,
        });
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding status server to {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let app = router(state.clone());
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await });
            if let Err(err) = serve.await {
                tracing::error!(error = %err, "status server failed");
            }
        });
        Ok(Self {
            addr,
            state,
            stop,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{local_addr}`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every read so far, oldest first.
    pub fn reads(&self) -> Vec<ReadRecord> {
        self.state.reads.lock().unwrap().clone()
    }

    /// Stops accepting, drains in-flight requests.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(statuses: &[RecipientStatus]) -> Vec<StatusRecipient> {
        statuses
            .iter()
            .map(|s| StatusRecipient {
                status: *s,
                ..StatusRecipient::pending("+243000000000")
            })
            .collect()
    }

    #[test]
    fn message_status_is_derived_from_recipients() {
        use RecipientStatus::*;
        let cases: &[(&[RecipientStatus], &str)] = &[
            (&[Pending, Pending], "pending"),
            (&[Pending, Processing], "processing"),
            (&[Sent, Processing], "processing"),
            (&[Sent, Sent], "sent"),
            (&[Sent, Delivered], "sent"),
            (&[Delivered, Delivered], "delivered"),
            (&[Failed, Failed], "failed"),
            (&[Delivered, Failed], "partially_delivered"),
            (&[Pending, Delivered], "processing"),
        ];
        for (statuses, want) in cases {
            assert_eq!(
                derive_message_status(&with(statuses)),
                *want,
                "{statuses:?}"
            );
        }
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }
}
