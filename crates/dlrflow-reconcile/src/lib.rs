//! `dlrflow-reconcile` finds the recipients whose state the webhooks cannot
//! settle — stuck past a deadline, flagged as a conflict, announced but never
//! seen, or every change of a strict-mode source — and fixes them from the
//! gateway's authoritative `GET /status/{message_id}`. It owns the status-API
//! client, the read budget shared by every replica (a sliding-window log in
//! Redis that never allows more than `budget.reads` in any `budget.window_ms`),
//! and the job table that makes each message read by one replica at a time,
//! oldest first, with backoff. It must never exceed the budget, never write
//! recipient state except through dlrflow-state's write path (so every change
//! reaches the analytics stream), and never log the API key.

pub mod client;
pub mod config;
pub mod jobs;
pub mod limiter;
pub mod store;
mod telemetry;
mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::client::StatusClient;
pub use crate::config::Config;
use crate::limiter::{Limiter, LimiterSettings};

/// A built reconciler: connected, migrated, listening.
pub struct App {
    listener: TcpListener,
    state: AppState,
}

/// Shared by the HTTP handlers, the sweeper and the workers.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cfg: Config,
    pub(crate) pool: PgPool,
    pub(crate) limiter: Limiter,
    pub(crate) client: StatusClient,
    /// Names this replica in job leases.
    pub(crate) owner: String,
    pub(crate) key_id: String,
    pub(crate) health: Mutex<Health>,
    shutting_down: AtomicBool,
}

#[derive(Default)]
pub(crate) struct Health {
    /// Set after a 401 (ours or another replica's): reads are stopped.
    pub(crate) unauthorized: Option<String>,
    pub(crate) sweep_error: Option<String>,
}

impl Inner {
    pub(crate) fn unauthorized(&self) -> Option<String> {
        self.health
            .lock()
            .expect("health lock")
            .unauthorized
            .clone()
    }

    pub(crate) fn set_unauthorized(&self, reason: Option<String>) {
        telemetry::unauthorized_state(reason.is_some());
        self.health.lock().expect("health lock").unauthorized = reason;
    }
}

impl App {
    /// Validates the configuration, connects to PostgreSQL (running the
    /// migrations if `postgres.migrate`) and Redis, and binds the listener.
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        cfg.validate()?;
        // Install the Prometheus recorder now: counts made before the first
        // scrape would otherwise go to the no-op recorder.
        let _ = dlrflow_runtime::telemetry::metrics_handle();
        let pool = store::connect(&cfg.postgres).await?;
        if cfg.postgres.migrate {
            store::migrate(&pool).await?;
        }
        let redis_client = redis::Client::open(cfg.redis.url.as_str()).context("redis.url")?;
        let redis = redis::aio::ConnectionManager::new(redis_client)
            .await
            .context("connecting to Redis (redis.url)")?;
        let key_id = cfg.key_id();
        let limiter = Limiter::new(
            redis,
            &LimiterSettings {
                prefix: cfg.redis.prefix.clone(),
                key_id: key_id.clone(),
                limit: cfg.budget.reads,
                window: cfg.budget.window() + cfg.budget.safety_margin(),
                unauthorized_hold: Duration::from_secs(cfg.budget.unauthorized_hold_secs),
            },
        );
        let client = StatusClient::new(&cfg).context("building the status API client")?;
        let listener = TcpListener::bind(cfg.http.listen)
            .await
            .with_context(|| format!("binding http.listen = {}", cfg.http.listen))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "reconcile".into());
        let owner = format!("{host}/{}", uuid::Uuid::now_v7().simple());
        let state = AppState {
            inner: Arc::new(Inner {
                cfg,
                pool,
                limiter,
                client,
                owner,
                key_id,
                health: Mutex::new(Health::default()),
                shutting_down: AtomicBool::new(false),
            }),
        };
        Ok(App { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Sweeps, reads and serves `/healthz`, `/readyz`, `/metrics` until
    /// `shutdown`; then stops claiming jobs and lets reads in flight finish
    /// within `http.shutdown_grace_ms`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let inner = self.state.inner.clone();
        let grace = inner.cfg.http.shutdown_grace();
        tracing::info!(
            addr = %self.local_addr(),
            key_id = %inner.key_id,
            sources = ?inner.cfg.reconcile.sources,
            "reconcile running"
        );
        let mut tasks = tokio::task::JoinSet::new();
        let work = CancellationToken::new();
        tasks.spawn(worker::sweeper(inner.clone(), work.clone()));
        for i in 0..inner.cfg.reconcile.concurrency {
            tasks.spawn(worker::worker(inner.clone(), i, work.clone()));
        }
        let server = {
            let shutdown = shutdown.clone();
            let inner = inner.clone();
            axum::serve(self.listener, router(self.state.clone())).with_graceful_shutdown(
                async move {
                    shutdown.cancelled().await;
                    inner.shutting_down.store(true, Ordering::SeqCst);
                },
            )
        };
        let server = tokio::spawn(async move { server.await });
        shutdown.cancelled().await;
        inner.shutting_down.store(true, Ordering::SeqCst);
        work.cancel();
        let drained = tokio::time::timeout(grace, async {
            while let Some(res) = tasks.join_next().await {
                if let Err(e) = res {
                    tracing::error!(error = %e, "a reconcile task failed");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("reads in flight did not finish within the grace period");
            tasks.abort_all();
        }
        match tokio::time::timeout(grace, server).await {
            Ok(res) => res.context("server task")?.context("http server")?,
            Err(_) => tracing::warn!("http server did not stop within the grace period"),
        }
        tracing::info!("reconcile stopped");
        Ok(())
    }
}

/// The reconciler's routes, separate from `App` so they can be tested alone.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(dlrflow_runtime::telemetry::metrics_endpoint),
        )
        .with_state(state)
}

fn not_ready(reason: impl Into<String>) -> Response {
    let body = serde_json::json!({"status": "not ready", "reason": reason.into()});
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let inner = &state.inner;
    if inner.shutting_down.load(Ordering::Relaxed) {
        return not_ready("shutting down");
    }
    if let Some(reason) = inner.unauthorized() {
        return not_ready(format!("status API key refused: {reason}"));
    }
    if let Err(e) = sqlx::query("SELECT 1").execute(&inner.pool).await {
        return not_ready(format!("PostgreSQL: {e}"));
    }
    let in_window = match inner.limiter.in_window().await {
        Ok(n) => n,
        Err(e) => return not_ready(format!("Redis: {e}")),
    };
    let sweep_error = inner
        .health
        .lock()
        .expect("health lock")
        .sweep_error
        .clone();
    if let Some(e) = sweep_error {
        return not_ready(format!("last sweep failed: {e}"));
    }
    Json(serde_json::json!({
        "status": "ready",
        "key_id": inner.key_id,
        "budget": {"limit": inner.limiter.limit(), "used_in_window": in_window},
    }))
    .into_response()
}

impl AppState {
    /// Why reads are stopped, if they are (after a 401).
    pub fn unauthorized(&self) -> Option<String> {
        self.inner.unauthorized()
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }
}
