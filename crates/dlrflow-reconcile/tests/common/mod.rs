//! Shared test helpers: a status-API server that follows `status-api.md`
//! (with a read log and a hard sliding-window limit), a fresh PostgreSQL schema
//! per test, a unique Redis prefix per test, and a running reconciler.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use dlrflow_events::{DeliveryUpdate, Provider, Status};
use dlrflow_reconcile::{App, AppState, Config};
use dlrflow_runtime::settings::PostgresSettings;
use dlrflow_runtime::Secret;
use dlrflow_testkit::unique_name;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const API_KEY: &str = "test-api-key-0123";
pub const SOURCE: &str = "acme";

/// One request the status server received.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub at: Instant,
    pub message_id: String,
    pub status: u16,
}

#[derive(Default)]
struct ServerState {
    truth: HashMap<String, Value>,
    log: Vec<ReadRecord>,
    /// Statuses to answer before the truth, per message (e.g. 404, 500).
    scripted: HashMap<String, VecDeque<u16>>,
    /// Answer 429 with this Retry-After (seconds) to the next N reads.
    throttle_next: Option<(usize, u64)>,
}

/// A gateway status API: `GET /status/{message_id}` with the key's hard limit.
#[derive(Clone)]
pub struct StatusServer {
    state: Arc<Mutex<ServerState>>,
    pub addr: SocketAddr,
    pub limit: usize,
    pub window: Duration,
}

impl StatusServer {
    /// Starts a server allowing `limit` reads in any `window` (more get 429).
    pub async fn start(limit: usize, window: Duration) -> StatusServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = StatusServer {
            state: Arc::new(Mutex::new(ServerState::default())),
            addr,
            limit,
            window,
        };
        let app = Router::new()
            .route("/status/{message_id}", get(status))
            .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the answer for a message: `(recipient, status)` pairs.
    pub fn set_truth(&self, message_id: &str, recipients: &[(String, Status)]) {
        let body = answer(message_id, recipients);
        self.state
            .lock()
            .unwrap()
            .truth
            .insert(message_id.to_owned(), body);
    }

    pub fn script(&self, message_id: &str, statuses: &[u16]) {
        self.state
            .lock()
            .unwrap()
            .scripted
            .insert(message_id.to_owned(), statuses.iter().copied().collect());
    }

    pub fn throttle_next(&self, reads: usize, retry_after_secs: u64) {
        self.state.lock().unwrap().throttle_next = Some((reads, retry_after_secs));
    }

    pub fn log(&self) -> Vec<ReadRecord> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn reads_of(&self, message_id: &str) -> usize {
        self.log()
            .iter()
            .filter(|r| r.message_id == message_id)
            .count()
    }
}

/// The most requests that arrived within any interval of `window`.
pub fn max_in_window(log: &[ReadRecord], window: Duration) -> usize {
    let mut times: Vec<Instant> = log.iter().map(|r| r.at).collect();
    times.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].duration_since(times[start]) >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A `200 OK` body as `status-api.md` describes it.
pub fn answer(message_id: &str, recipients: &[(String, Status)]) -> Value {
    let now = Utc::now();
    let list: Vec<Value> = recipients
        .iter()
        .map(|(phone, st)| {
            let api = match st {
                Status::Queued => "pending",
                other => other.as_str(),
            };
            let sent = (st.rank() >= 2).then(|| ts(now - chrono::Duration::seconds(30)));
            json!({
                "recipient_phone": phone,
                "status": api,
                "carrier": "vodacom_drc",
                "sent_at": sent,
                "delivered_at": (*st == Status::Delivered).then(|| ts(now - chrono::Duration::seconds(20))),
                "failed_at": (*st == Status::Failed).then(|| ts(now - chrono::Duration::seconds(20))),
                "error_code": (*st == Status::Failed).then_some("ABSENT_SUBSCRIBER"),
                "error_message": (*st == Status::Failed).then_some("Absent subscriber"),
                "retryable": (*st == Status::Failed).then_some(false),
                "segments": 1,
            })
        })
        .collect();
    json!({
        "message_id": message_id,
        "status": "processing",
        "total_recipients": recipients.len(),
        "recipients": list,
    })
}

async fn status(
    State(s): State<StatusServer>,
    Path(message_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let now = Instant::now();
    let mut st = s.state.lock().unwrap();
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {API_KEY}"));
    // The hard limit: this request would be one too many in the window.
    let recent: Vec<Instant> = st
        .log
        .iter()
        .map(|r| r.at)
        .filter(|t| now.duration_since(*t) < s.window)
        .collect();
    let over = recent.len() >= s.limit;
    let throttled = match &mut st.throttle_next {
        Some((n, secs)) if *n > 0 => {
            *n -= 1;
            Some(*secs)
        }
        _ => None,
    };
    let scripted = st
        .scripted
        .get_mut(&message_id)
        .and_then(VecDeque::pop_front);
    let (code, body, retry_after) = if !authorized {
        (401, json!({"error": "invalid API key"}), None)
    } else if let Some(secs) = throttled {
        (429, json!({"error": "rate limited"}), Some(secs))
    } else if over {
        let oldest = recent.iter().min().copied().unwrap_or(now);
        let wait = s
            .window
            .saturating_sub(now.duration_since(oldest))
            .as_secs()
            + 1;
        (429, json!({"error": "rate limited"}), Some(wait))
    } else if let Some(code) = scripted {
        (code, json!({"error": "scripted"}), None)
    } else if let Some(truth) = st.truth.get(&message_id) {
        (200, truth.clone(), None)
    } else {
        (404, json!({"error": "not found"}), None)
    };
    st.log.push(ReadRecord {
        at: now,
        message_id,
        status: code,
    });
    drop(st);
    let mut resp = (StatusCode::from_u16(code).unwrap(), Json(body)).into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from(secs));
    }
    resp
}

/// A fresh schema in the `dlrflow` database, and the test's own topics
/// (`{topics}.raw`, `.status`, `.dlq`, `.delivery`) on the test broker.
pub struct TestDb {
    pub cfg: PostgresSettings,
    pub pool: PgPool,
    pub topics: String,
}

pub use dlrflow_testkit::{test_postgres_url as database_url, test_redis_url as redis_url};

impl TestDb {
    /// The test's own schema.
    pub fn schema(&self) -> &str {
        self.cfg
            .schema
            .as_deref()
            .expect("a test database has its own schema")
    }

    /// Creates the schema and migrates it (dlrflow-state's tables and ours).
    pub async fn new() -> TestDb {
        let schema = unique_name("t").replace('-', "_");
        let admin = sqlx::PgPool::connect(&database_url()).await.unwrap();
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let cfg = PostgresSettings {
            schema: Some(schema),
            ..PostgresSettings::with_url(database_url())
        };
        let pool = dlrflow_reconcile::store::connect(&cfg).await.unwrap();
        dlrflow_reconcile::store::migrate(&pool).await.unwrap();
        let topics = format!("rt.{}", cfg.schema.as_deref().unwrap_or_default());
        for t in ["raw", "status", "dlq", "delivery"] {
            dlrflow_testkit::create_topic(
                &dlrflow_testkit::test_brokers(),
                &format!("{topics}.{t}"),
                2,
            )
            .await
            .unwrap();
        }
        TestDb { cfg, pool, topics }
    }

    /// Drops the schema (best effort).
    pub async fn drop(self) {
        self.pool.close().await;
        if let Ok(admin) = sqlx::PgPool::connect(&database_url()).await {
            let _ = sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema()))
                .execute(&admin)
                .await;
            admin.close().await;
        }
    }

    pub async fn status_of(&self, message_id: &str, recipient: &str) -> Option<(String, bool)> {
        sqlx::query_as("SELECT status, needs_reconcile FROM recipient_state WHERE message_id = $1 AND recipient = $2")
            .bind(message_id)
            .bind(recipient)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }

    /// Writes webhook updates through dlrflow-state's write path (what its
    /// consumer would have made of them), as if each had arrived at its
    /// event time: the rows' `updated_at` (when the state last heard of a
    /// recipient, which the stuck trigger counts from too) is set back to
    /// their `last_event_at`.
    pub async fn seed(&self, updates: &[DeliveryUpdate]) {
        let mut tx = self.pool.begin().await.unwrap();
        dlrflow_state::apply_updates(&mut tx, updates, Utc::now())
            .await
            .unwrap();
        let ids: Vec<&str> = updates.iter().map(|u| u.message_id.as_str()).collect();
        sqlx::query(
            "UPDATE recipient_state SET updated_at = last_event_at
              WHERE message_id = ANY($1) AND updated_at > last_event_at",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
}

/// A webhook (non-authoritative) update.
pub fn webhook(
    message_id: &str,
    recipient: &str,
    status: Status,
    at: DateTime<Utc>,
) -> DeliveryUpdate {
    DeliveryUpdate {
        provider: Provider::Lisoloo,
        source: SOURCE.to_owned(),
        message_id: message_id.to_owned(),
        recipient: recipient.to_owned(),
        status,
        occurred_at: at,
        processing_at: (status.rank() >= 1).then_some(at),
        sent_at: (status.rank() >= 2).then_some(at),
        delivered_at: (status == Status::Delivered).then_some(at),
        failed_at: (status == Status::Failed).then_some(at),
        carrier: None,
        error_code: (status == Status::Failed).then(|| "E1".to_owned()),
        error_message: None,
        retryable: None,
        segments: Some(1),
        custom_payload: None,
        dedupe_key: uuid::Uuid::now_v7().to_string(),
        authoritative: false,
    }
}

/// A configuration for tests: fast sweeps, everything local and unique.
pub fn test_config(server: &StatusServer, db: &TestDb) -> Config {
    let mut c = Config::defaults();
    c.http.admin_listen = "127.0.0.1:0".parse().unwrap();
    c.http.shutdown_grace = Duration::from_secs(5);
    c.status_api.base_url = server.url();
    c.status_api.api_key = Secret::new(API_KEY);
    c.status_api.timeout_ms = 5000;
    c.redis.url = Secret::new(redis_url());
    c.redis.prefix = unique_name("dlrflow-test-reconcile");
    c.postgres = db.cfg.clone();
    c.postgres.max_connections = 6;
    c.postgres.migrate = false;
    c.budget.reads = server.limit as u32;
    c.budget.window_ms = server.window.as_millis() as u64;
    c.reconcile.sources = vec![SOURCE.to_owned()];
    c.reconcile.sweep_interval_ms = 200;
    c.reconcile.poll_interval_ms = 50;
    c.reconcile.debounce_ms = 1000;
    c.reconcile.backoff_initial_ms = 300;
    c.reconcile.backoff_max_ms = 2000;
    c.reconcile.lease_ms = 60_000;
    c.kafka.client.brokers = dlrflow_testkit::test_brokers();
    c.kafka.status_topic = format!("{}.status", db.topics);
    c
}

/// The dlrflow-state that applies the reconciler's answers: the same schema,
/// the status topic of `cfg`, the test's other topics beside it.
pub fn state_config(cfg: &Config) -> dlrflow_state::Config {
    let base = cfg
        .kafka
        .status_topic
        .strip_suffix(".status")
        .expect("a test status topic ends in .status")
        .to_owned();
    let mut s = dlrflow_state::Config::defaults();
    s.http.listen = Some("127.0.0.1:0".parse().unwrap());
    s.http.admin_listen = "127.0.0.1:0".parse().unwrap();
    s.http.shutdown_grace = Duration::from_secs(5);
    s.kafka.client.brokers = cfg.kafka.client.brokers.clone();
    s.kafka.raw_topic = format!("{base}.raw");
    s.kafka.status_topic = cfg.kafka.status_topic.clone();
    s.kafka.dlq_topic = format!("{base}.dlq");
    s.kafka.delivery_topic = format!("{base}.delivery");
    s.kafka.group_id = format!("{base}.state");
    s.redis.conn.url = Secret::new(redis_url());
    s.redis.conn.prefix = format!("{base}:state:");
    s.postgres = cfg.postgres.clone();
    s.postgres.max_connections = 4;
    s.postgres.migrate = false;
    s.batch.retry_max = Duration::from_secs(1);
    s.outbox.idle_poll = Duration::from_millis(20);
    s
}

/// A running reconciler, with the dlrflow-state that applies its answers.
pub struct Running {
    pub state: AppState,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub consumer: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        for (what, task) in [("reconciler", self.task), ("state", self.consumer)] {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .unwrap_or_else(|_| panic!("{what} stops within 15 s"))
                .unwrap()
                .unwrap();
        }
    }
}

pub async fn spawn(cfg: Config) -> Running {
    dlrflow_runtime::telemetry::init_test_logs();
    let state_app = dlrflow_state::App::build(state_config(&cfg)).await.unwrap();
    let app = App::build(cfg).await.unwrap();
    let addr = app.service().admin_addr();
    let state = app.state();
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(state_app.run(shutdown.clone()));
    let task = tokio::spawn(app.run(shutdown.clone()));
    Running {
        state,
        addr,
        shutdown,
        task,
        consumer,
    }
}

/// Distinct recipient numbers.
pub fn phones(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("+24399{:07}", i)).collect()
}

pub fn unique_set(log: &[ReadRecord]) -> HashSet<String> {
    log.iter().map(|r| r.message_id.clone()).collect()
}

/// `GET /readyz`: the status code and the body (bounded in time).
pub async fn readyz(addr: SocketAddr) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("/readyz answers within 5 s");
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap_or(Value::Null))
}

/// `GET /metrics` as text.
pub async fn metrics(addr: SocketAddr) -> String {
    reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
