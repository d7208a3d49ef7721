//! `dlrflow-reconcile` finds the recipients whose state the webhooks cannot
//! settle — stuck past a deadline, flagged as a conflict, announced but never
//! seen, or every change of a strict-mode source — and fixes them from the
//! gateway's authoritative `GET /status/{message_id}`. It owns the status-API
//! client, the read budget shared by every replica (a sliding-window log in
//! Redis that never allows more than `budget.reads` in any `budget.window_ms`),
//! and the job table that makes each message read by one replica at a time,
//! oldest first, with backoff. It must never exceed the budget, never write
//! recipient state (each answer goes to the status topic, which dlrflow-state
//! applies through its one write path, so the state is a function of the
//! log and every change reaches the analytics stream), and never log the
//! API key.

pub mod client;
pub mod config;
pub mod jobs;
pub mod limiter;
pub use dlrflow_runtime::redact;
pub mod store;
mod telemetry;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use dlrflow_runtime::service::{probe, ready_check, Readiness, ReadyCheck, Service};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::client::StatusClient;
pub use crate::config::Config;
use crate::limiter::{Limiter, LimiterSettings};

/// A built reconciler: connected, migrated, listening.
pub struct App {
    service: Service,
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
    /// Publishes each answer to `kafka.status_topic`.
    pub(crate) producer: rdkafka::producer::FutureProducer,
    /// Names this replica in job leases.
    pub(crate) owner: String,
    pub(crate) key_id: String,
    pub(crate) health: Mutex<Health>,
    /// Faults injected by tests, by task name (see [`AppState::inject_fault`]).
    faults: Mutex<HashMap<String, Fault>>,
}

/// A failure a test makes a background task suffer (see
/// [`AppState::inject_fault`]). Never used by the service itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The task panics.
    Panic,
    /// The task returns an error.
    Error,
}

#[derive(Default)]
pub(crate) struct Health {
    /// Set after a 401 (ours or another replica's): reads are stopped.
    pub(crate) unauthorized: Option<String>,
    pub(crate) sweep_error: Option<String>,
    /// The limiter's Redis failed the last request (workers cannot get budget).
    pub(crate) redis_error: Option<String>,
    /// The last answer could not be published: no read is made until the
    /// broker takes records again (a read whose answer is lost is wasted).
    pub(crate) publish_error: Option<String>,
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

    /// Records whether the limiter's Redis answered the last time it was asked.
    pub(crate) fn set_redis_error(&self, error: Option<String>) {
        let mut h = self.health.lock().expect("health lock");
        match (&h.redis_error, &error) {
            (None, Some(e)) => tracing::warn!(
                error = %e,
                "Redis unreachable: no budget can be granted, status reads stop until it answers"
            ),
            (Some(_), None) => tracing::info!("Redis answers again: status reads resume"),
            _ => {}
        }
        telemetry::redis_up(error.is_none());
        h.redis_error = error;
    }

    pub(crate) fn publish_error(&self) -> Option<String> {
        self.health
            .lock()
            .expect("health lock")
            .publish_error
            .clone()
    }

    /// Records whether the last answer was published (one warning when
    /// publishing starts failing, one line when it works again).
    pub(crate) fn set_publish_error(&self, error: Option<String>) {
        let mut h = self.health.lock().expect("health lock");
        match (&h.publish_error, &error) {
            (None, Some(e)) => tracing::warn!(
                error = %e,
                "status answers cannot be published: status reads pause until the broker takes records"
            ),
            (Some(_), None) => tracing::info!("status answers are published again: reads resume"),
            _ => {}
        }
        h.publish_error = error;
    }

    /// Carries out a fault injected for `task`, if any (tests only).
    pub(crate) fn injected_fault(&self, task: &str) -> anyhow::Result<()> {
        let fault = self.faults.lock().expect("faults lock").remove(task);
        match fault {
            None => Ok(()),
            Some(Fault::Panic) => panic!("fault injected into `{task}` by a test"),
            Some(Fault::Error) => Err(anyhow::anyhow!("fault injected into `{task}` by a test")),
        }
    }
}

impl App {
    /// Validates the configuration, connects to PostgreSQL (running the
    /// migrations if `postgres.migrate`) and Redis, and binds the listener.
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        cfg.register_secrets();
        cfg.validate()?;
        // Install the Prometheus recorder now: counts made before the first
        // scrape would otherwise go to the no-op recorder.
        let _ = dlrflow_runtime::telemetry::metrics_handle();
        let pool = store::connect(&cfg.postgres).await?;
        if cfg.postgres.migrate {
            store::migrate(&pool).await?;
        }
        let redis = cfg
            .redis
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!(redact::error_text(&format!("{e:#}"))))
            .context("connecting to Redis (redis.url)")?;
        let key_id = cfg.key_id();
        let limiter = Limiter::new(
            redis,
            &LimiterSettings {
                prefix: cfg.redis.prefix.clone(),
                key_id: key_id.clone(),
                limit: cfg.budget.reads,
                window: cfg.budget.limiter_window(),
                unauthorized_hold: Duration::from_secs(cfg.budget.unauthorized_hold_secs),
                reset_hold: cfg.budget.limiter_window(),
            },
        );
        let client = StatusClient::new(&cfg).context("building the status API client")?;
        let producer = store::create_producer(&cfg)?;
        let mut service = Service::bind("dlrflow-reconcile", &cfg.http)
            .await?
            .with_scrub(redact::error_text);
        // Answers not yet acknowledged at the end: their jobs are not closed
        // either, and are read again after the restart.
        service.flush_on_stop(producer.clone());
        dlrflow_runtime::telemetry::declare_backend_operations(&[
            ("postgres", "sweep"),
            ("postgres", "backlog"),
            ("postgres", "claim"),
            ("postgres", "fail"),
            ("postgres", "release"),
            ("postgres", "retry_later"),
            ("postgres", "recheck"),
            ("postgres", "skip"),
            ("postgres", "complete"),
            ("kafka", "publish"),
            ("redis", "acquire"),
            ("redis", "refund"),
            ("redis", "pause"),
            ("redis", "mark_unauthorized"),
            ("redis", "unauthorized_check"),
        ]);
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "reconcile".into());
        let owner = format!("{host}/{}", uuid::Uuid::now_v7().simple());
        let state = AppState {
            inner: Arc::new(Inner {
                cfg,
                pool,
                limiter,
                client,
                producer,
                owner,
                key_id,
                health: Mutex::new(Health::default()),
                faults: Mutex::new(HashMap::new()),
            }),
        };
        Ok(App { service, state })
    }

    /// The service skeleton: its listeners' addresses (`admin_addr()`; the reconciler
    /// has no public routes), its lifecycle.
    pub fn service(&self) -> &Service {
        &self.service
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Sweeps, reads and serves `/healthz`, `/readyz`, `/metrics` until
    /// `shutdown`; then stops claiming jobs and lets reads in flight finish
    /// within `http.shutdown_grace_ms`.
    ///
    /// Every background task is supervised: the sweeper (`sweeper`), each
    /// worker (`worker-0` …) and the HTTP server (`http`) run until shutdown,
    /// and one that ends before — by panic, by error or by returning at all —
    /// stops the others and makes `run` return an error naming it (also
    /// logged as one error line), so the process exits and its orchestrator
    /// restarts it rather than keep a replica that answers `/readyz` but no
    /// longer works.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let inner = self.state.inner.clone();
        tracing::info!(
            key_id = %inner.key_id,
            sources = ?inner.cfg.reconcile.sources,
            "reconcile running"
        );
        let mut service = self.service;
        // Cancelled by shutdown or a dead task: workers stop claiming jobs
        // and the reads in flight finish within the grace.
        let work = service.work();
        service.spawn("sweeper", worker::sweeper(inner.clone(), work.clone()));
        for i in 0..inner.cfg.reconcile.concurrency {
            service.spawn(
                format!("worker-{i}"),
                worker::worker(inner.clone(), i, work.clone()),
            );
        }
        service
            .run(Router::new(), readiness(self.state), shutdown)
            .await
    }
}

/// `dlrflow-reconcile migrate`: connects with `postgres.*` alone and runs
/// dlrflow-state's migrations, then the reconciler's own (see
/// [`store::migrate`]); `serve` does the same at its start while
/// `postgres.migrate` is true.
pub async fn migrate(cfg: &config::MigrateConfig) -> anyhow::Result<()> {
    let pool = store::connect(&cfg.postgres).await?;
    let result = store::migrate(&pool).await;
    pool.close().await;
    result
}

/// `/readyz`: reads are allowed (no 401 holds them), PostgreSQL answers, the
/// budget's Redis answers (without it no read can be granted), the broker
/// answers and the status topic exists, and the last sweep worked. Details: `key_id` and the budget used in the window.
fn readiness(state: AppState) -> ReadyCheck {
    ready_check(move || {
        let inner = state.inner.clone();
        async move {
            let mut r = Readiness::default();
            r.detail("key_id", &inner.key_id);
            if let Some(reason) = inner.unauthorized() {
                r.problem(format!("status API key refused: {reason}"));
            }
            let pg = probe("PostgreSQL", sqlx::query("SELECT 1").execute(&inner.pool)).await;
            r.check(pg.map_err(|e| redact::error_text(&e)));
            match probe("Redis", inner.limiter.in_window()).await {
                Ok(used) => {
                    inner.set_redis_error(None);
                    r.detail(
                        "budget",
                        serde_json::json!({"limit": inner.limiter.limit(), "used_in_window": used}),
                    );
                }
                Err(e) => {
                    let e = redact::error_text(&e);
                    inner.set_redis_error(Some(e.clone()));
                    r.problem(format!("Redis unreachable, status reads stopped: {e}"));
                }
            }
            // An answer that cannot be published is a read wasted.
            let kafka = dlrflow_runtime::kafka::producer_topic_ready(
                &inner.producer,
                &inner.cfg.kafka.status_topic,
            )
            .await;
            if let Err(e) = kafka {
                r.problem(format!(
                    "Kafka: the status topic cannot take answers: {}",
                    redact::error_text(&e)
                ));
            } else if let Some(e) = inner.publish_error() {
                r.problem(format!(
                    "the last status answer could not be published, reads paused: {e}"
                ));
            }
            let sweep_error = inner
                .health
                .lock()
                .expect("health lock")
                .sweep_error
                .clone();
            if let Some(e) = sweep_error {
                r.problem(format!("last sweep failed: {e}"));
            }
            r
        }
    })
}

impl AppState {
    /// Why reads are stopped, if they are (after a 401).
    pub fn unauthorized(&self) -> Option<String> {
        self.inner.unauthorized()
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// **For tests only**: makes the background task `task` (`sweeper`,
    /// `worker-0`, `worker-1`, …) suffer `fault` at the start of its next
    /// round, to prove that a dead task stops the process (see [`App::run`]).
    /// The service never calls it; nothing outside a test should.
    pub fn inject_fault(&self, task: &str, fault: Fault) {
        self.inner
            .faults
            .lock()
            .expect("faults lock")
            .insert(task.to_owned(), fault);
    }
}
