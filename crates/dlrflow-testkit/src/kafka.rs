//! Topics on the test broker: its address, unique names, creation.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// The broker the tests use: `DLRFLOW_TEST_KAFKA_BROKERS`, default the local
/// stack's `127.0.0.1:9092`.
pub fn test_brokers() -> String {
    std::env::var("DLRFLOW_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A name no other test (or earlier run) uses.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Creates `name` with `partitions` partitions and waits until its metadata
/// shows every partition.
pub async fn create_topic(brokers: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    create_topic_with(brokers, &[], name, partitions).await
}

/// [`create_topic`] with librdkafka `settings` (e.g. TLS to the broker).
pub async fn create_topic_with(
    brokers: &str,
    settings: &[(&str, &str)],
    name: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let config = |brokers: &str| {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers);
        for (k, v) in settings {
            c.set(*k, *v);
        }
        c
    };
    let admin: AdminClient<DefaultClientContext> =
        config(brokers).create().context("admin client")?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let res = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("create topics")?;
    for r in res {
        if let Err((t, code)) = r {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                anyhow::bail!("creating topic {t}: {code:?}");
            }
        }
    }
    let consumer: BaseConsumer = config(brokers).create()?;
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match dlrflow_runtime::kafka::topic_ready(
                consumer.client(),
                &name,
                Duration::from_secs(2),
            ) {
                Ok(n) if n == partitions as usize => return Ok(()),
                _ if Instant::now() > deadline => {
                    anyhow::bail!("topic {name} not visible after 20 s")
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })
    .await?
}
