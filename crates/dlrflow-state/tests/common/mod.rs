//! Per-test isolation: own topics, group, Redis prefix and PostgreSQL schema.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use dlrflow_state::Config;
use dlrflow_testkit::{create_topic, test_brokers, unique_name, wait_for};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The test PostgreSQL (`DLRFLOW_TEST_POSTGRES_URL`); each test uses a schema of its own.
pub fn pg_base() -> String {
    dlrflow_testkit::test_postgres_url()
}

/// The read API key every test service accepts (for every source).
pub const READ_KEY: &str = "dlrk_test-read-key-for-every-source";

/// `[[api.keys]]` accepting [`READ_KEY`] for every source.
pub fn read_keys() -> Vec<dlrflow_state::access::ApiKeyConfig> {
    vec![dlrflow_state::access::ApiKeyConfig {
        id: "test".into(),
        sha256: dlrflow_state::access::key_hash(READ_KEY),
        sources: vec!["*".into()],
    }]
}

/// A client that presents [`READ_KEY`].
pub fn api_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = format!("Bearer {READ_KEY}").parse().unwrap();
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

pub struct Env {
    pub brokers: String,
    pub raw: String,
    pub status: String,
    pub dlq: String,
    pub delivery: String,
    pub group: String,
    pub prefix: String,
    pub schema: String,
}

impl Env {
    pub async fn new(partitions: i32) -> Env {
        dlrflow_runtime::telemetry::init_test_logs();
        let brokers = test_brokers();
        let id = unique_name("st");
        let env = Env {
            raw: format!("{id}.raw"),
            status: format!("{id}.status"),
            dlq: format!("{id}.dlq"),
            delivery: format!("{id}.delivery"),
            group: format!("{id}-group"),
            prefix: format!("{id}:"),
            schema: id.replace('-', "_"),
            brokers,
        };
        create_topic(&env.brokers, &env.raw, partitions)
            .await
            .unwrap();
        create_topic(&env.brokers, &env.dlq, 1).await.unwrap();
        create_topic(&env.brokers, &env.status, partitions)
            .await
            .unwrap();
        create_topic(&env.brokers, &env.delivery, partitions)
            .await
            .unwrap();
        env
    }

    pub fn config(&self) -> Config {
        let mut cfg = Config::defaults();
        cfg.http.listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.http.admin_listen = "127.0.0.1:0".parse().unwrap();
        cfg.http.shutdown_grace = Duration::from_secs(5);
        cfg.kafka.client.brokers = self.brokers.clone();
        cfg.kafka.raw_topic = self.raw.clone();
        cfg.kafka.status_topic = self.status.clone();
        cfg.kafka.dlq_topic = self.dlq.clone();
        cfg.kafka.delivery_topic = self.delivery.clone();
        cfg.kafka.group_id = self.group.clone();
        cfg.redis.conn.prefix = self.prefix.clone();
        cfg.postgres.url = pg_base().into();
        cfg.postgres.schema = Some(self.schema.clone());
        cfg.postgres.max_connections = 4;
        cfg.batch.retry_max = Duration::from_secs(1);
        cfg.outbox.idle_poll = Duration::from_millis(20);
        cfg.api.keys = read_keys();
        cfg
    }

    /// Environment variables that make a `dlrflow-state` process use this env.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        [
            ("DLRFLOW_HTTP__LISTEN", "127.0.0.1:0".to_owned()),
            ("DLRFLOW_HTTP__ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
            ("DLRFLOW_KAFKA__BROKERS", self.brokers.clone()),
            ("DLRFLOW_KAFKA__RAW_TOPIC", self.raw.clone()),
            ("DLRFLOW_KAFKA__STATUS_TOPIC", self.status.clone()),
            ("DLRFLOW_KAFKA__DLQ_TOPIC", self.dlq.clone()),
            ("DLRFLOW_KAFKA__DELIVERY_TOPIC", self.delivery.clone()),
            ("DLRFLOW_KAFKA__GROUP_ID", self.group.clone()),
            ("DLRFLOW_REDIS__PREFIX", self.prefix.clone()),
            ("DLRFLOW_POSTGRES__URL", pg_base()),
            ("DLRFLOW_POSTGRES__SCHEMA", self.schema.clone()),
            ("DLRFLOW_POSTGRES__MAX_CONNECTIONS", "3".to_owned()),
            ("DLRFLOW_BATCH__RETRY_MAX_MS", "1000".to_owned()),
            (
                "DLRFLOW_API__KEYS",
                format!(
                    "[{{id=\"test\",sha256=\"{}\",sources=[\"*\"]}}]",
                    dlrflow_state::access::key_hash(READ_KEY)
                ),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// A pool on the test's schema (for assertions).
    pub async fn pool(&self) -> PgPool {
        let cfg = self.config();
        let pool = cfg.postgres.connect().await.unwrap();
        dlrflow_state::migrate(&pool).await.unwrap();
        pool
    }

    pub async fn drop_schema(&self) {
        let pool = PgPool::connect(&pg_base()).await.unwrap();
        let _ = sqlx::query(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ))
        .execute(&pool)
        .await;
    }

    /// Deletes this test's Redis keys (never FLUSHALL: Redis is shared).
    pub async fn delete_redis_keys(&self) -> usize {
        let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        keys.len()
    }
}

pub struct Running {
    /// The read API (public listener).
    pub addr: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics` (admin listener).
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("app stops within 30 s")
            .unwrap()
            .unwrap();
    }
}

pub async fn spawn_app(cfg: Config) -> Running {
    let app = dlrflow_state::App::build(cfg).await.unwrap();
    let addr = app.service().public_addr().unwrap();
    let admin = app.service().admin_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run(shutdown.clone()));
    Running {
        addr,
        admin,
        shutdown,
        task,
    }
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// Waits until `sql` (a count) returns `want`; panics with the last value.
pub async fn wait_count(pool: &PgPool, sql: &str, want: i64, timeout: Duration) {
    let ok = wait_for(timeout, || async {
        (count(pool, sql).await == want).then_some(())
    })
    .await;
    if ok.is_none() {
        panic!(
            "`{sql}` is {} after {timeout:?}, want {want}",
            count(pool, sql).await
        );
    }
}

/// Checks every expected recipient row.
pub async fn assert_expected(pool: &PgPool, scenario: &dlrflow_testkit::scenario::Scenario) {
    type Row = (
        String,
        String,
        String,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT message_id, recipient, status, delivered_at, failed_at, error_code FROM recipient_state",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), scenario.expected.len(), "recipient rows");
    for (m, r, status, delivered_at, failed_at, error_code) in rows {
        let want = &scenario.expected[&(m.clone(), r.clone())];
        assert_eq!(status, want.status, "{m}/{r}");
        assert_eq!(delivered_at, want.delivered_at, "{m}/{r}");
        assert_eq!(failed_at, want.failed_at, "{m}/{r}");
        assert_eq!(error_code, want.error_code, "{m}/{r}");
    }
}

/// The `update_id`s on the analytics topic (with duplicates).
pub async fn analytics_ids(env: &Env, expected: usize) -> Vec<uuid::Uuid> {
    let records = dlrflow_testkit::read_topic(
        &env.brokers,
        &env.delivery,
        expected,
        Duration::from_secs(60),
        Duration::from_millis(1500),
    )
    .await
    .unwrap();
    records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            v["update_id"].as_str().unwrap().parse().unwrap()
        })
        .collect()
}
