//! A small webhook receiver: the sender's peer in these tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Router;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One request the receiver saw.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Bytes,
    /// How many earlier requests carried the same body.
    pub nth: usize,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }
}

/// What to answer.
pub enum Reply {
    Status(u16),
    /// Wait this long, then answer 200.
    Hang(Duration),
}

type Behavior = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

#[derive(Clone)]
struct St {
    log: Arc<Mutex<Vec<Received>>>,
    seen: Arc<Mutex<HashMap<Bytes, usize>>>,
    behavior: Behavior,
}

pub struct Receiver {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
    stop: CancellationToken,
}

impl Receiver {
    pub async fn start(behavior: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        let st = St {
            log: Arc::default(),
            seen: Arc::default(),
            behavior: Arc::new(behavior),
        };
        let log = st.log.clone();
        let app = Router::new().fallback(handle).with_state(st);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await
                .unwrap();
        });
        Self { addr, log, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn handle(State(st): State<St>, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    let nth = {
        let mut seen = st.seen.lock().unwrap();
        let n = seen.entry(body.clone()).or_insert(0);
        *n += 1;
        *n - 1
    };
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let rec = Received {
        at: Instant::now(),
        path: uri.path().to_owned(),
        authorization: h("authorization"),
        content_type: h("content-type"),
        body,
        nth,
    };
    st.log.lock().unwrap().push(rec.clone());
    match (st.behavior)(&rec) {
        Reply::Status(code) => StatusCode::from_u16(code).unwrap(),
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK
        }
    }
}

/// A small, fast, deterministic Lisoloo config aimed at `target`.
pub fn lisoloo_cfg(target: &str) -> dlrflow_sim::LisolooConfig {
    dlrflow_sim::LisolooConfig {
        delivery: dlrflow_sim::DeliveryConfig {
            target: target.to_owned(),
            source: "lisoloo".to_owned(),
            basic_auth: Some(("lisoloo_webhook_user".to_owned(), "s3cret".to_owned())),
            concurrency: 8,
            request_timeout: Duration::from_secs(2),
            time_scale: 0.001,
            reorder_window: 1,
            duplicate_rate: 0.0,
            withhold_terminal_rate: 0.0,
            ..dlrflow_sim::DeliveryConfig::default()
        },
        messages: 1,
        recipients: 1,
        send_rate: 0.0,
        failure_rate: 0.0,
        carriers: Vec::new(),
        seed: 7,
    }
}

/// Runs `f` with a hard deadline.
pub async fn bounded<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test exceeded its deadline")
}
