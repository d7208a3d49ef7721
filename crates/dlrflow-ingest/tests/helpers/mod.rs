//! `spawn_app`: a real ingest on 127.0.0.1:0 writing to its own topic on the
//! real broker, so tests run in parallel without seeing each other.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use dlrflow_ingest::config::{AuthMode, Credential, Provider, SourceConfig};
use dlrflow_ingest::{App, Config};
use dlrflow_runtime::Secret;
use dlrflow_testkit::{create_topic, read_topic, test_brokers, unique_name, Record};
use tokio_util::sync::CancellationToken;

pub const USER: &str = "lisoloo_webhook_user";
pub const PASS: &str = "s3cret:with:colons";
pub const PASS_NEW: &str = "rotated-secret";
pub const ARPOONE_TOKEN: &str = "tok_0123456789abcdef";

pub struct TestApp {
    /// The public listener: webhooks only.
    pub addr: SocketAddr,
    /// The admin listener: `/healthz`, `/readyz`, `/metrics`.
    pub admin: SocketAddr,
    pub topic: String,
    pub brokers: String,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `path` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// POSTs one Lisoloo event to `/lisoloo/webhook` as [`USER`] with
    /// `password`; the answer's status.
    pub async fn post_lisoloo(&self, password: &str) -> reqwest::StatusCode {
        self.client
            .post(self.url("/lisoloo/webhook"))
            .header("Authorization", basic(USER, password))
            .body(lisoloo_event(&message_id()))
            .send()
            .await
            .unwrap()
            .status()
    }

    /// `GET /readyz` on the admin listener: the status.
    pub async fn ready(&self) -> reqwest::StatusCode {
        self.client
            .get(self.admin_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
    }

    pub async fn records(&self, expected: usize) -> Vec<Record> {
        read_topic(
            &self.brokers,
            &self.topic,
            expected,
            Duration::from_secs(20),
            Duration::from_millis(300),
        )
        .await
        .expect("reading the raw topic")
    }

    /// Stops the app the way SIGTERM would and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.take().unwrap().await?
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

pub fn sources(passwords: &[&str]) -> Vec<SourceConfig> {
    let creds = passwords
        .iter()
        .map(|p| Credential {
            username: USER.into(),
            password: Secret::new(p.to_string()),
        })
        .collect::<Vec<_>>();
    vec![
        SourceConfig {
            name: "lisoloo".into(),
            provider: Provider::Lisoloo,
            auth: Some(AuthMode::Basic),
            credentials: creds.clone(),
            path_tokens: vec![],
            allow_from: vec![],
        },
        SourceConfig {
            name: "arpoone".into(),
            provider: Provider::Arpoone,
            auth: Some(AuthMode::Basic),
            credentials: creds,
            path_tokens: vec![],
            allow_from: vec![],
        },
        SourceConfig {
            name: "arpoone-tok".into(),
            provider: Provider::Arpoone,
            auth: Some(AuthMode::PathToken),
            credentials: vec![],
            path_tokens: vec![Secret::new(ARPOONE_TOKEN)],
            allow_from: vec![],
        },
        SourceConfig {
            name: "open".into(),
            provider: Provider::Lisoloo,
            auth: Some(AuthMode::None),
            credentials: vec![],
            path_tokens: vec![],
            allow_from: vec![],
        },
    ]
}

pub fn config(brokers: &str, topic: &str) -> Config {
    let mut cfg: Config =
        dlrflow_runtime::config::load(dlrflow_ingest::config::DEFAULTS, None).unwrap();
    cfg.http.server.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.http.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    cfg.http.server.shutdown_grace = Duration::from_secs(5);
    cfg.kafka.client.brokers = brokers.into();
    cfg.kafka.raw_topic = topic.into();
    cfg.sources = sources(&[PASS, PASS_NEW]);
    cfg
}

/// An app on a fresh 6-partition topic of the real broker.
pub async fn spawn_app() -> TestApp {
    let brokers = test_brokers();
    let topic = unique_name("ingest-test");
    create_topic(&brokers, &topic, 6)
        .await
        .expect("creating the test topic");
    spawn_with(config(&brokers, &topic)).await
}

pub async fn spawn_with(cfg: Config) -> TestApp {
    dlrflow_runtime::telemetry::init_test_logs();
    let brokers = cfg.kafka.client.brokers.clone();
    let topic = cfg.kafka.raw_topic.clone();
    let app = App::build(cfg).await.expect("building the app");
    let addr = app.service().public_addr().unwrap();
    let admin = app.service().admin_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run(shutdown.clone()));
    TestApp {
        addr,
        admin,
        topic,
        brokers,
        client: reqwest::Client::new(),
        shutdown,
        task: Some(task),
    }
}

pub fn lisoloo_event(message_id: &str) -> String {
    format!(
        r#"{{"event_id":"{}","event_type":"sms.delivered","timestamp":"2026-05-27T10:15:08Z","message_id":"{message_id}","data":{{"recipient_phone":"+243998857000","carrier":"vodacom_drc","delivered_at":"2026-05-27T10:15:08Z","segments":1}}}}"#,
        uuid::Uuid::new_v4()
    )
}

pub fn message_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..24].to_owned()
}
