//! The listener every service serves on (`dlrflow_runtime::listener`), run
//! through the real service skeleton: connection, head-size and slow-client
//! limits, TLS with HTTP/1.1 and HTTP/2, and a certificate that is replaced
//! (file change, SIGHUP) without dropping the connections already open.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use dlrflow_runtime::listener::TlsSettings;
use dlrflow_runtime::service::{ready_check, Readiness, Service};
use dlrflow_runtime::settings::HttpSettings;
use dlrflow_testkit::tls::TestCa;
use dlrflow_testkit::wait_for;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Generous bound for "the server closes it by itself"; never a timing claim.
const BOUND: Duration = Duration::from_secs(15);

fn settings() -> HttpSettings {
    let mut h: HttpSettings = serde_json::from_value(serde_json::json!({
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "shutdown_grace_ms": 2000,
    }))
    .unwrap();
    h.header_read_timeout = Duration::from_millis(500);
    h.idle_timeout = Duration::from_millis(500);
    h
}

fn routes() -> Router {
    Router::new().route(
        "/own",
        get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("hello {}", peer.ip()) }),
    )
}

struct Running {
    public: SocketAddr,
    admin: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(h: HttpSettings) -> Running {
    dlrflow_runtime::telemetry::init_test_logs();
    let svc = Service::bind("test", &h).await.unwrap();
    let (public, admin) = (svc.public_addr().unwrap(), svc.admin_addr());
    let stop = CancellationToken::new();
    let ready = ready_check(|| async { Readiness::default() });
    let task = tokio::spawn(svc.run(routes(), ready, stop.clone()));
    Running {
        public,
        admin,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }

    async fn metric(&self, prefix: &str) -> f64 {
        let text = dlrflow_testkit::scrape(&format!("http://{}", self.admin)).await;
        dlrflow_testkit::metric_sum(&text, prefix)
    }
}

/// Everything the server sends until it closes the connection (or `BOUND`).
async fn read_until_closed(s: &mut TcpStream) -> Option<String> {
    let mut out = Vec::new();
    match tokio::time::timeout(BOUND, s.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

async fn get_plain(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_until_closed(&mut s).await.expect("an answer")
}

#[tokio::test]
async fn connections_over_the_limit_get_503_and_slow_or_idle_clients_are_cut_off() {
    let mut h = settings();
    h.max_connections = 2;
    let app = start(h).await;

    // Two clients connect and send nothing: they hold both slots...
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(app.public).await.unwrap());
    }
    // ...until the listener has seen them; then a third is refused at once.
    let refused = wait_for(BOUND, || async {
        let answer = get_plain(app.public, "/own").await;
        answer.starts_with("HTTP/1.1 503").then_some(answer)
    })
    .await
    .expect("a connection over max_connections is answered 503");
    assert!(refused.contains("Retry-After: "), "{refused}");
    assert!(app.metric("dlrflow_http_connections_refused_total").await >= 1.0);

    // The idle ones send no request head within header_read_timeout: the
    // server closes them by itself, and the slots are free again.
    for s in &mut idle {
        assert!(
            read_until_closed(s).await.is_some(),
            "an idle connection stays open"
        );
    }
    let served = wait_for(BOUND, || async {
        let answer = get_plain(app.public, "/own").await;
        answer.starts_with("HTTP/1.1 200").then_some(answer)
    })
    .await
    .expect("served again once the idle connections are gone");
    assert!(served.contains("hello 127.0.0.1"), "{served}");

    // A keep-alive connection that made a request and then stays idle is
    // closed too.
    let mut keep = TcpStream::connect(app.public).await.unwrap();
    keep.write_all(b"GET /own HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let after = read_until_closed(&mut keep)
        .await
        .expect("an idle keep-alive connection stays open");
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");

    // Slowloris: a head that trickles in a byte at a time never completes;
    // the connection is cut well before the client is done.
    let mut slow = TcpStream::connect(app.public).await.unwrap();
    slow.write_all(b"GET /own HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut cut = false;
    for _ in 0..(BOUND.as_millis() / 100) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await
        {
            cut = true;
            break;
        }
    }
    assert!(cut, "a head sent a byte at a time is never cut off");

    // A head larger than max_header_bytes gets 431.
    let mut big = TcpStream::connect(app.public).await.unwrap();
    let filler = "a".repeat(40 * 1024);
    let _ = big
        .write_all(format!("GET /own HTTP/1.1\r\nHost: x\r\nX-Big: {filler}\r\n\r\n").as_bytes())
        .await;
    let answer = read_until_closed(&mut big).await.unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");

    app.stop().await;
}

fn tls_settings(
    dir: &Path,
    files: &dlrflow_testkit::tls::TlsFiles,
    check: Duration,
) -> HttpSettings {
    let mut h = settings();
    h.tls = Some(TlsSettings {
        cert_file: files.cert.clone(),
        key_file: files.key.clone(),
        reload_check: check,
    });
    let _ = dir;
    h
}

async fn answers(c: &reqwest::Client, url: &str) -> Result<reqwest::Version, String> {
    let r = c.get(url).send().await.map_err(|e| format!("{e:?}"))?;
    if r.status() != 200 {
        return Err(format!("status {}", r.status()));
    }
    let v = r.version();
    let body = r.text().await.map_err(|e| e.to_string())?;
    assert!(body.starts_with("hello "), "{body}");
    Ok(v)
}

#[tokio::test]
async fn tls_serves_both_http_versions_and_a_new_certificate_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (TestCa::new("one"), TestCa::new("two"));
    let files = ca1.issue().write(dir.path());
    let app = start(tls_settings(dir.path(), &files, Duration::from_millis(100))).await;
    let url = format!("https://localhost:{}/own", app.public.port());

    let h2 = ca1.client(false);
    let h1 = ca1.client(true);
    assert_eq!(answers(&h2, &url).await.unwrap(), reqwest::Version::HTTP_2);
    assert_eq!(answers(&h1, &url).await.unwrap(), reqwest::Version::HTTP_11);
    // Plain HTTP on the TLS port is not served.
    let plain = reqwest::get(format!("http://{}/own", app.public)).await;
    assert!(plain.map(|r| r.status() != 200).unwrap_or(true));

    // The operator replaces the pair: new connections get the new one (a
    // client trusting only the new authority gets through)...
    ca2.issue().write(dir.path());
    let trusts_two = ca2.client(false);
    wait_for(BOUND, || async { answers(&trusts_two, &url).await.ok() })
        .await
        .expect("the new certificate is served after the files change");
    // ...a new client trusting only the old authority does not...
    assert!(answers(&ca1.client(false), &url).await.is_err());
    // ...and the connections opened before keep working.
    assert_eq!(answers(&h2, &url).await.unwrap(), reqwest::Version::HTTP_2);
    assert_eq!(answers(&h1, &url).await.unwrap(), reqwest::Version::HTTP_11);
    assert!(app.metric("dlrflow_tls_reloads_total{outcome=\"ok\"").await >= 1.0);

    // A broken key is refused: the current pair stays and says why.
    std::fs::write(
        &files.key,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    wait_for(BOUND, || async {
        (app.metric("dlrflow_tls_reloads_total{outcome=\"failed\"")
            .await
            >= 1.0)
            .then_some(())
    })
    .await
    .expect("a failed reload is counted");
    assert!(answers(&ca2.client(false), &url).await.is_ok());

    app.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (TestCa::new("one"), TestCa::new("two"));
    let files = ca1.issue().write(dir.path());
    // No file checks within the test: only the signal can reload.
    let app = start(tls_settings(dir.path(), &files, Duration::from_secs(3600))).await;
    let url = format!("https://localhost:{}/own", app.public.port());
    assert!(answers(&ca1.client(false), &url).await.is_ok());

    ca2.issue().write(dir.path());
    let trusts_two = ca2.client(false);
    assert!(
        answers(&trusts_two, &url).await.is_err(),
        "reloaded without a signal"
    );
    dlrflow_testkit::sighup_self();
    wait_for(BOUND, || async { answers(&trusts_two, &url).await.ok() })
        .await
        .expect("SIGHUP makes the new certificate served");
    app.stop().await;
}

#[tokio::test]
async fn tls_files_that_do_not_load_stop_the_start_with_the_setting_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("one");
    let files = ca.issue().write(dir.path());
    let mut h = tls_settings(dir.path(), &files, Duration::from_secs(5));
    h.tls.as_mut().unwrap().key_file = dir.path().join("missing.pem");
    let err = Service::bind("test", &h).await.err().expect("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("http.tls") && text.contains("missing.pem"),
        "{text}"
    );

    // A key of another certificate does not form a pair.
    let other = ca.issue();
    std::fs::write(&files.key, other.key_pem).unwrap();
    let h = tls_settings(dir.path(), &files, Duration::from_secs(5));
    let err = Service::bind("test", &h).await.err().expect("refused");
    assert!(format!("{err:#}").contains("pair"), "{err:#}");
}
