//! TLS to the broker through the librdkafka pass-through (`kafka.settings`):
//! the ingest writes to a broker reached over TLS only, and refuses to
//! answer 2xx when the broker's certificate is not the configured CA's.

mod helpers;

use std::time::Duration;

use dlrflow_testkit::tls::TestCa;
use dlrflow_testkit::{create_topic_with, read_topic_with, unique_name, wait_for, PrivateBroker};
use helpers::*;
use reqwest::StatusCode;

#[tokio::test]
async fn records_reach_a_tls_only_broker_and_another_ca_gets_503() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (TestCa::new("kafka"), TestCa::new("other"));
    let broker = PrivateBroker::with_tls(&ca.issue()).unwrap();
    let topic = unique_name("ingest-kafka-tls");
    let ca_file = ca.write_ca(dir.path()).display().to_string();
    // The broker advertises only its TLS front: every client speaks TLS.
    let tls = [
        ("security.protocol", "ssl"),
        ("ssl.ca.location", ca_file.as_str()),
    ];
    create_topic_with(&broker.brokers(), &tls, &topic, 3)
        .await
        .unwrap();

    let mut cfg = config(&broker.brokers(), &topic);
    let settings = &mut cfg.kafka.client.settings;
    settings.insert("security.protocol".into(), "ssl".into());
    settings.insert("ssl.ca.location".into(), ca_file.clone());
    let app = spawn_with(cfg.clone()).await;
    wait_for(Duration::from_secs(30), || async {
        (app.ready().await == StatusCode::OK).then_some(())
    })
    .await
    .expect("ready over TLS");
    assert_eq!(app.post_lisoloo(PASS).await, StatusCode::NO_CONTENT);
    assert_eq!(app.post_lisoloo(PASS).await, StatusCode::NO_CONTENT);
    app.stop().await.unwrap();
    let records = read_topic_with(
        &broker.brokers(),
        &tls,
        &topic,
        2,
        Duration::from_secs(20),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    assert_eq!(
        records.len(),
        2,
        "both acknowledged records are in the topic"
    );

    // The broker's certificate is not signed by the configured CA: nothing
    // is written, so nothing is acknowledged.
    let other_dir = tempfile::tempdir().unwrap();
    cfg.kafka.client.settings.insert(
        "ssl.ca.location".into(),
        other.write_ca(other_dir.path()).display().to_string(),
    );
    let app = spawn_with(cfg).await;
    assert_eq!(
        app.post_lisoloo(PASS).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(app.ready().await, StatusCode::SERVICE_UNAVAILABLE);
    app.stop().await.unwrap();
    let records = read_topic_with(
        &broker.brokers(),
        &tls,
        &topic,
        3,
        Duration::from_secs(3),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    assert_eq!(
        records.len(),
        2,
        "nothing written through an unverified broker"
    );
}
