//! Sources and credentials replaced while the ingest runs (`sources_file`,
//! reloaded on change and on SIGHUP), and the per-source address allow-list,
//! against the real ingest and broker.

mod helpers;

use std::path::Path;
use std::time::Duration;

use helpers::*;
use reqwest::StatusCode;

const BOUND: Duration = Duration::from_secs(20);

/// A `sources_file` with the Lisoloo source and these passwords, written in
/// one rename as a config management tool or a secret mount would.
fn write_sources(path: &Path, passwords: &[&str]) {
    let creds: Vec<String> = passwords
        .iter()
        .map(|p| format!(r#"{{ username = "{USER}", password = "{p}" }}"#))
        .collect();
    write_file(
        path,
        &format!(
            "[[sources]]\nname = \"lisoloo\"\nprovider = \"lisoloo\"\nauth = \"basic\"\ncredentials = [{}]\n",
            creds.join(", ")
        ),
    );
}

fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Requests answered 2xx in this test process (each must be a record).
static ACCEPTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

async fn post(app: &TestApp, password: &str) -> StatusCode {
    let status = app.post_lisoloo(password).await;
    if status.is_success() {
        ACCEPTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    status
}

async fn metric(app: &TestApp, prefix: &str) -> f64 {
    dlrflow_testkit::metric_sum(&dlrflow_testkit::scrape(&app.admin_url("")).await, prefix)
}

async fn app_with_file(path: &Path, check: Duration) -> (TestApp, String) {
    let brokers = dlrflow_testkit::test_brokers();
    let topic = dlrflow_testkit::unique_name("ingest-reload");
    dlrflow_testkit::create_topic(&brokers, &topic, 3)
        .await
        .unwrap();
    let mut cfg = config(&brokers, &topic);
    cfg.sources = vec![];
    cfg.sources_file = Some(path.to_owned());
    cfg.sources_check = check;
    (spawn_with(cfg).await, topic)
}

#[tokio::test]
async fn a_password_rotates_through_the_sources_file_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sources.toml");
    write_sources(&file, &[PASS]);
    let (app, _) = app_with_file(&file, Duration::from_millis(100)).await;
    assert_eq!(post(&app, PASS).await, StatusCode::NO_CONTENT);
    assert_eq!(post(&app, PASS_NEW).await, StatusCode::UNAUTHORIZED);

    // 1. The new password is added next to the old one: both work.
    write_sources(&file, &[PASS, PASS_NEW]);
    dlrflow_testkit::wait_for(BOUND, || async {
        (post(&app, PASS_NEW).await == StatusCode::NO_CONTENT).then_some(())
    })
    .await
    .expect("the added password is accepted after the file changed");
    assert_eq!(post(&app, PASS).await, StatusCode::NO_CONTENT);

    // 2. The old one is removed while the gateway keeps sending with the
    // new one: not one of those requests fails during the swap.
    write_sources(&file, &[PASS_NEW]);
    let removed = dlrflow_testkit::wait_for(BOUND, || async {
        (post(&app, PASS).await == StatusCode::UNAUTHORIZED).then_some(())
    });
    let steady = async {
        for _ in 0..50 {
            assert_eq!(post(&app, PASS_NEW).await, StatusCode::NO_CONTENT);
        }
    };
    let (removed, ()) = tokio::join!(removed, steady);
    removed.expect("the removed password is refused after the file changed");

    // 3. A file that does not validate keeps the current set and says so.
    write_file(
        &file,
        "[[sources]]\nname = \"Not A Valid Name\"\nprovider = \"lisoloo\"\nauth = \"basic\"\n",
    );
    dlrflow_testkit::wait_for(BOUND, || async {
        (metric(
            &app,
            "dlrflow_ingest_sources_reloads_total{outcome=\"failed\"",
        )
        .await
            >= 1.0)
            .then_some(())
    })
    .await
    .expect("the failed reload is counted");
    assert_eq!(post(&app, PASS_NEW).await, StatusCode::NO_CONTENT);
    assert_eq!(post(&app, PASS).await, StatusCode::UNAUTHORIZED);
    assert!(metric(&app, "dlrflow_ingest_sources_reloads_total{outcome=\"ok\"").await >= 2.0);

    // Every 2xx is a record in the topic.
    let accepted = ACCEPTED.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(app.records(accepted).await.len(), accepted);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_sources_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sources.toml");
    write_sources(&file, &[PASS]);
    // No file checks within the test: only the signal can reload.
    let (app, _) = app_with_file(&file, Duration::from_secs(3600)).await;
    write_sources(&file, &[PASS_NEW]);
    assert_eq!(
        post(&app, PASS_NEW).await,
        StatusCode::UNAUTHORIZED,
        "reloaded without a signal"
    );
    dlrflow_testkit::sighup_self();
    dlrflow_testkit::wait_for(BOUND, || async {
        (post(&app, PASS_NEW).await == StatusCode::NO_CONTENT).then_some(())
    })
    .await
    .expect("SIGHUP reloads the file");
    assert_eq!(post(&app, PASS).await, StatusCode::UNAUTHORIZED);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_sources_file_stops_the_start_naming_the_file_and_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sources.toml");
    write_file(
        &file,
        "[[sources]]\nname = \"lisoloo\"\nprovider = \"lisoloo\"\nauth = \"basic\"\ncredentials = []\n",
    );
    let mut cfg = config("127.0.0.1:9092", "t");
    cfg.sources = vec![];
    cfg.sources_file = Some(file.clone());
    let err = match dlrflow_ingest::App::build(cfg).await {
        Ok(_) => panic!("started with a bad sources file"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("sources.toml") && err.contains("sources[0].credentials"),
        "{err}"
    );

    // Both at once is ambiguous.
    let mut cfg = config("127.0.0.1:9092", "t");
    cfg.sources_file = Some(file);
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("sources_file"), "{err}");
}

#[tokio::test]
async fn allow_from_admits_listed_addresses_and_believes_only_trusted_proxies() {
    let brokers = dlrflow_testkit::test_brokers();
    let topic = dlrflow_testkit::unique_name("ingest-allow");
    dlrflow_testkit::create_topic(&brokers, &topic, 3)
        .await
        .unwrap();
    let send = |app: &TestApp, forwarded: Option<&str>| {
        let mut req = app
            .client
            .post(app.url("/lisoloo/webhook"))
            .header("Authorization", basic(USER, PASS))
            .body(lisoloo_event(&message_id()));
        if let Some(f) = forwarded {
            req = req.header("X-Forwarded-For", f.to_owned());
        }
        async move { req.send().await.unwrap().status() }
    };

    // The gateway's network is 10.0.0.0/8; the test connects from 127.0.0.1.
    let mut cfg = config(&brokers, &topic);
    cfg.sources[0].allow_from = vec!["10.0.0.0/8".parse().unwrap()];
    let direct = spawn_with(cfg.clone()).await;
    assert_eq!(send(&direct, None).await, StatusCode::FORBIDDEN);
    // No trusted proxy: a client's X-Forwarded-For is not believed.
    assert_eq!(send(&direct, Some("10.1.2.3")).await, StatusCode::FORBIDDEN);
    // Other sources have no list.
    let arpoone = direct
        .client
        .post(direct.url("/arpoone/webhook"))
        .header("Authorization", basic(USER, PASS))
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(arpoone.status(), StatusCode::OK);
    drop(direct);

    // Behind a trusted proxy on 127.0.0.1: the address it appended counts.
    cfg.http.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let proxied = spawn_with(cfg).await;
    assert_eq!(
        send(&proxied, Some("10.1.2.3")).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        send(&proxied, Some("192.0.2.7")).await,
        StatusCode::FORBIDDEN
    );
    // A client cannot slip an allowed address in front of its own.
    assert_eq!(
        send(&proxied, Some("10.1.2.3, 192.0.2.7")).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(send(&proxied, None).await, StatusCode::FORBIDDEN);
    let forbidden = metric(
        &proxied,
        "dlrflow_ingest_requests_total{source=\"lisoloo\",outcome=\"forbidden\"",
    )
    .await;
    assert!(forbidden >= 3.0, "{forbidden}");
    assert_eq!(proxied.records(1).await.len(), 1);
    proxied.stop().await.unwrap();
}
