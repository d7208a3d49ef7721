//! `dlrflow-state` owns the way from the raw webhook topic to the exact,
//! queryable per-recipient delivery state: it consumes
//! `dlrflow.webhooks.raw.v1` in a consumer group, parses each record with
//! `dlrflow-events`, sends what cannot be parsed to the DLQ, dedupes through
//! Redis (a cache) and PostgreSQL (the truth: `delivery_events.dedupe_key`),
//! merges into `recipient_state` / `messages` in one transaction per batch,
//! writes every change to a transactional outbox and relays it to
//! `dlrflow.delivery.v1`. It serves the read API for the merchant backend and
//! the shared write path ([`apply_updates`]) that dlrflow-reconcile uses. It
//! must never store a Kafka offset before the state of its record is
//! committed, never mark a dedupe key in Redis before PostgreSQL holds it,
//! never decide a status itself (that is `dlrflow_events::merge`), and never
//! talk to the gateway's status API (that is dlrflow-reconcile).

pub mod access;
pub mod analytics;
pub mod api;
pub mod carriers;
pub mod config;
pub mod console;
pub mod consumer;
pub mod dedupe;
pub mod health;
pub mod rebuild;
pub mod record;
pub mod replay;
pub mod store;

use std::sync::Arc;

use anyhow::Context;
use dlrflow_runtime::service::Service;
use rdkafka::consumer::BaseConsumer;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use crate::config::Config;
pub use crate::store::{
    apply_batch, apply_batch_with, apply_updates, migrate, update_id, Applied, BatchResult,
    Incoming, Outcome, StoreError, WriteOptions,
};

/// A built service: PostgreSQL migrated, Redis connected, consumer subscribed,
/// listener bound.
pub struct App {
    service: Service,
    pipeline: consumer::Pipeline,
    api: api::ApiState,
    cfg: Config,
}

impl App {
    /// Connects, migrates (`postgres.migrate`) and binds. PostgreSQL and
    /// Redis must be reachable; the broker need not be yet (`/readyz` says).
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        cfg.register_secrets();
        cfg.validate()?;
        let mut service = Service::bind("dlrflow-state", &cfg.http).await?;
        dlrflow_runtime::telemetry::declare_backend_operations(&[
            ("redis", "dedupe"),
            ("postgres", "write_batch"),
            ("postgres", "read_api"),
            ("postgres", "progress"),
        ]);
        let pool = cfg
            .postgres
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("{}", dlrflow_runtime::redact::scrub(&e.to_string())))
            .context("connecting to PostgreSQL (postgres.url)")?;
        if cfg.postgres.migrate {
            store::migrate(&pool).await.context("running migrations")?;
        }
        let dedupe = dedupe::Dedupe::connect(&cfg.redis)
            .await
            .context("connecting to Redis (redis.url)")?;
        let consumer = consumer::create_consumer(&cfg)?;
        let producer = consumer::create_producer(&cfg, "dlrflow-state")?;
        // DLQ and analytics records not yet acknowledged at the end are not
        // committed either: they are produced again after the restart.
        service.flush_on_stop(producer.clone());
        let meta: BaseConsumer = cfg
            .kafka
            .client
            .client_config(&[("client.id", "dlrflow-state-meta".into())])
            .create()
            .context("creating the Kafka metadata client")?;
        let health = Arc::new(health::ConsumerHealth::new(cfg.health.stall_after));
        let api = api::ApiState {
            pool: pool.clone(),
            redis: dedupe.connection(),
            kafka: Arc::new(meta),
            raw_topic: cfg.kafka.raw_topic.clone(),
            health: health.clone(),
            access: Arc::new(access::Access::new(&cfg.api)),
            page_size: cfg.api.page_size,
        };
        if api.access.is_closed() {
            tracing::warn!(
                "the read API has no keys: every read answers 401 (set api.keys, or api.open = true behind an authenticating proxy)"
            );
        }
        let pipeline = consumer::Pipeline {
            consumer: Arc::new(consumer),
            producer,
            pool,
            dedupe,
            cfg: cfg.clone(),
            outbox_wake: Arc::new(Notify::new()),
            backlogged: Arc::default(),
            health,
        };
        Ok(App {
            service,
            pipeline,
            api,
            cfg,
        })
    }

    /// The service skeleton: its listeners' addresses (`public_addr()`,
    /// `admin_addr()`), its lifecycle.
    pub fn service(&self) -> &Service {
        &self.service
    }

    pub fn pool(&self) -> PgPool {
        self.api.pool.clone()
    }

    /// Runs the consumer, the outbox relay and the HTTP API until `shutdown`;
    /// then the consumer finishes its batch and commits, the relay finishes
    /// its round, HTTP drains, and the producer is flushed. If any of them
    /// ends before shutdown (an error, a panic), the others are stopped and
    /// the error is returned: the process exits rather than stay up half
    /// alive.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut service = self.service;
        let work = service.work();
        let relay_health = analytics::RelayHealth::default();
        let relay = analytics::Relay {
            pool: self.api.pool.clone(),
            producer: self.pipeline.producer.clone(),
            topic: self.cfg.kafka.delivery_topic.clone(),
            cfg: self.cfg.outbox.clone(),
            produce_timeout: self.cfg.kafka.produce_timeout,
            wake: self.pipeline.outbox_wake.clone(),
            consumer_backlogged: self.pipeline.backlogged.clone(),
            health: relay_health.clone(),
        }
        .run(work.clone());
        service.spawn("outbox relay", async move {
            relay.await;
            Ok(())
        });
        let producer = self.pipeline.producer.clone();
        service.spawn("consumer", consumer::run(self.pipeline, work));
        let ready = api::readiness(self.api.clone(), relay_health);
        if self.cfg.console.enabled {
            service = service.with_admin_routes(console::router(console::ConsoleState {
                pool: self.api.pool.clone(),
                redis: self.api.redis.clone(),
                access: self.api.access.clone(),
                cfg: Arc::new(self.cfg.clone()),
                producer,
            }));
        }
        service.run(api::router(self.api), ready, shutdown).await
    }
}
