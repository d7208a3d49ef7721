//! No service shows a secret: the three services run with a secret in every
//! place that takes one (the PostgreSQL and Redis URLs, a librdkafka
//! password, the gateway's Basic password, the read API key, the status API
//! key), a send goes through with wrong credentials and wrong keys tried on
//! the way, and none of those values is in any service's log (at debug
//! level), `/readyz` or `/metrics`.

use std::time::Duration;

use dlrflow_e2e::{
    delivery, status_server, timed, verify_all, Options, Pipeline, PASSWORD, READ_KEY, STATUS_KEY,
    USERNAME,
};
use dlrflow_sim::{run_lisoloo, Gateway, LisolooConfig};
use dlrflow_testkit::PrivateRedis;
use tokio_util::sync::CancellationToken;

const PG_SECRET: &str = "pg-e2e-Secret-7c1d";
const REDIS_SECRET: &str = "redis-e2e-Secret-90ab";
const KAFKA_SECRET: &str = "kafka-e2e-Secret-33ef";
const WRONG_PASSWORD: &str = "wrong-e2e-Secret-a1b2";
const WRONG_KEY: &str = "dlrk_wrong-e2e-Secret-c3d4";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_service_shows_a_secret_in_logs_readiness_or_metrics() {
    let _t = timed("no_service_shows_a_secret_in_logs_readiness_or_metrics");
    // Debug logs: the most a service ever writes.
    std::env::set_var("DLRFLOW_E2E_RUST_LOG", "debug");
    let gateway = Gateway::new();
    let server = status_server(&gateway).await;

    let mut p = Pipeline::new("secrets", &Options::default()).await.unwrap();
    // A Redis that needs its password, a PostgreSQL URL with one (trust
    // authentication takes any), a broker password librdkafka carries.
    let redis = PrivateRedis::start(Some(REDIS_SECRET));
    p.redis_url = redis.url();
    assert!(p.postgres_url.contains("postgres@"), "{}", p.postgres_url);
    p.postgres_url = p
        .postgres_url
        .replace("postgres@", &format!("postgres:{PG_SECRET}@"));
    p.kafka_settings = vec![
        ("sasl.username".into(), "dlrflow".into()),
        ("sasl.password".into(), KAFKA_SECRET.into()),
    ];
    p.start_all(&server, 3).await;

    // Wrong credentials and keys on the way in and out.
    let http = reqwest::Client::new();
    let refused = http
        .post(format!("{}/lisoloo/webhook", p.ingest_url()))
        .basic_auth(USERNAME, Some(WRONG_PASSWORD))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let refused = http
        .get(format!("{}/v1/messages/m-1", p.api_url(0)))
        .bearer_auth(WRONG_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // A send with withheld terminal events, so the reconciler reads too.
    let cfg = LisolooConfig {
        delivery: dlrflow_sim::DeliveryConfig {
            reorder_window: 16,
            duplicate_rate: 0.05,
            withhold_terminal_rate: 0.1,
            ..delivery(&p.ingest_url(), "lisoloo")
        },
        messages: 40,
        recipients: 2,
        send_rate: 0.0,
        failure_rate: 0.1,
        carriers: Vec::new(),
        seed: 4242,
    };
    let report = run_lisoloo(&cfg, &gateway, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.totals.dropped_4xx, 0);
    verify_all(&report.truth, &p.api_url(0), Duration::from_secs(120)).await;
    assert!(
        server.reads().iter().any(|r| r.status == 200),
        "the reconciler read the status API with its key"
    );

    let secrets = [
        PASSWORD,
        READ_KEY,
        STATUS_KEY,
        PG_SECRET,
        REDIS_SECRET,
        KAFKA_SECRET,
        WRONG_PASSWORD,
        WRONG_KEY,
    ];
    let mut seen = Vec::new();
    for name in ["ingest", "state-0", "reconcile"] {
        for path in ["/readyz", "/metrics"] {
            seen.push((format!("{name} {path}"), p.admin_get_ok(name, path).await));
        }
    }
    let logs = p.logs.clone();
    p.finish().await;
    for name in ["ingest", "state-0", "reconcile"] {
        let log = std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap();
        assert!(log.lines().count() > 3, "{name} logged next to nothing");
        seen.push((format!("{name} log"), log));
    }
    // The refused attempts were logged, without what they carried.
    let ingest_log = &seen.iter().find(|(w, _)| w == "ingest log").unwrap().1;
    assert!(ingest_log.contains("rejected request"), "{ingest_log}");
    // The state's readiness shows Redis was reached with its password.
    let state_ready = &seen.iter().find(|(w, _)| w == "state-0 /readyz").unwrap().1;
    assert!(state_ready.contains("\"degraded\":[]"), "{state_ready}");
    for (what, text) in &seen {
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "{what} shows the secret {:?}…",
                &secret[..4]
            );
        }
    }
}
