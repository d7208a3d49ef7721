//! The read API's keys against a real service: no key and a wrong key get
//! 401 with `WWW-Authenticate: Bearer`; a key sees only its sources (another
//! source's message is 404 like a missing one); two keys work at once
//! (rotation); each key has its own rate (429 + `Retry-After`); answers are
//! paged; and the audit line of the running binary names the key and the
//! message, never the phone number. Over HTTPS (`http.tls`) all the same.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use dlrflow_events::{DeliveryUpdate, Provider, Status};
use dlrflow_state::access::{key_hash, ApiKeyConfig};
use serde_json::Value;

use common::{spawn_app, Env};

const ACME_OLD: &str = "dlrk_acme-key-being-rotated-out";
const ACME_NEW: &str = "dlrk_acme-key-rotated-in";
const GLOBEX: &str = "dlrk_globex-key";

fn key(id: &str, secret: &str, sources: &[&str]) -> ApiKeyConfig {
    ApiKeyConfig {
        id: id.into(),
        sha256: key_hash(secret),
        sources: sources.iter().map(|s| s.to_string()).collect(),
    }
}

fn update(source: &str, message_id: &str, recipient: &str) -> DeliveryUpdate {
    DeliveryUpdate {
        provider: Provider::Lisoloo,
        source: source.into(),
        message_id: message_id.into(),
        recipient: recipient.into(),
        status: Status::Delivered,
        occurred_at: Utc::now(),
        processing_at: None,
        sent_at: None,
        delivered_at: Some(Utc::now()),
        failed_at: None,
        carrier: None,
        error_code: None,
        error_message: None,
        retryable: None,
        segments: None,
        custom_payload: None,
        dedupe_key: format!("{message_id}/{recipient}"),
        authoritative: false,
    }
}

/// Messages `m-acme` (5 recipients, source `acme`) and `m-globex` (1, `globex`).
async fn seed(env: &Env) {
    let pool = env.pool().await;
    let mut updates: Vec<DeliveryUpdate> = (1..=5)
        .map(|i| update("acme", "m-acme", &format!("+24399000000{i}")))
        .collect();
    updates.push(update("globex", "m-globex", "+243990000009"));
    let mut tx = pool.begin().await.unwrap();
    dlrflow_state::apply_updates(&mut tx, &updates, Utc::now())
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn get(
    base: &str,
    path: &str,
    key: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_scopes_rotation_rate_and_pages() {
    let env = Env::new(1).await;
    seed(&env).await;
    let mut cfg = env.config();
    cfg.api.keys = vec![
        key("acme-old", ACME_OLD, &["acme"]),
        key("acme-new", ACME_NEW, &["acme"]),
        key("globex", GLOBEX, &["globex"]),
    ];
    cfg.api.page_size = 2;
    cfg.api.requests_per_sec = 1;
    cfg.api.burst = 8;
    let app = spawn_app(cfg).await;
    let base = format!("http://{}", app.addr);

    // No key, a wrong key, a key in the wrong scheme: 401 with the challenge.
    for key in [None, Some("dlrk_wrong"), Some("")] {
        let (s, h, body) = get(&base, "/v1/messages/m-acme", key).await;
        assert_eq!(s, 401, "{key:?}: {body}");
        assert!(h["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
    }
    let (s, _, _) = get(
        &base,
        "/v1/messages/m-acme/recipients/%2B243990000001",
        None,
    )
    .await;
    assert_eq!(s, 401);

    // Both acme keys work during a rotation, and page through 5 recipients.
    for key in [ACME_OLD, ACME_NEW] {
        let mut seen = Vec::new();
        let mut path = "/v1/messages/m-acme".to_owned();
        loop {
            let (s, _, body) = get(&base, &path, Some(key)).await;
            assert_eq!(s, 200, "{body}");
            let page = body["recipients"].as_array().unwrap();
            assert!(page.len() <= 2, "page_size is 2: {body}");
            seen.extend(
                page.iter()
                    .map(|r| r["recipient"].as_str().unwrap().to_owned()),
            );
            match body["next_after"].as_str() {
                Some(after) => {
                    path = format!("/v1/messages/m-acme?after={}", after.replace('+', "%2B"))
                }
                None => break,
            }
        }
        let expected: Vec<String> = (1..=5).map(|i| format!("+24399000000{i}")).collect();
        assert_eq!(seen, expected, "{key}");
    }

    // Another source's message and recipient: 404, exactly like a missing one.
    let (s, _, foreign) = get(&base, "/v1/messages/m-globex", Some(ACME_NEW)).await;
    let (s2, _, missing) = get(&base, "/v1/messages/m-none", Some(ACME_NEW)).await;
    assert_eq!((s, s2), (404, 404));
    assert_eq!(foreign, missing);
    let (s, _, _) = get(
        &base,
        "/v1/messages/m-globex/recipients/%2B243990000009",
        Some(ACME_NEW),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _, _) = get(
        &base,
        "/v1/messages/m-globex/recipients/%2B243990000009",
        Some(GLOBEX),
    )
    .await;
    assert_eq!(s, 200);

    // The rate is per key: globex runs out of its burst, acme does not notice.
    let mut limited = None;
    for _ in 0..20 {
        let (s, h, _) = get(&base, "/v1/messages/m-globex", Some(GLOBEX)).await;
        if s == 429 {
            limited = Some(h);
            break;
        }
        assert_eq!(s, 200);
    }
    let h = limited.expect("a burst of 8 at 1/s runs out within 20 requests");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let (s, _, _) = get(&base, "/v1/messages/m-acme", Some(ACME_OLD)).await;
    assert_eq!(s, 200, "another key keeps its own rate");

    app.stop().await;
    env.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_line_names_the_key_and_message_never_the_phone() {
    let env = Env::new(1).await;
    seed(&env).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlrflow-state"))
        .arg("serve")
        .envs(env.env_vars())
        .env(
            "DLRFLOW_API__KEYS",
            format!(
                "[{{id=\"acme-backend\",sha256=\"{}\",sources=[\"acme\"]}}]",
                key_hash(ACME_NEW)
            ),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next_json = |timeout: Duration| -> Option<Value> {
        rx.recv_timeout(timeout)
            .ok()
            .map(|l| serde_json::from_str(&l).unwrap_or(Value::Null))
    };
    let mut addr = None;
    while let Some(v) = next_json(Duration::from_secs(30)) {
        if v["message"] == "listening" {
            addr = v["addr"].as_str().map(str::to_owned);
            break;
        }
    }
    let base = format!(
        "http://{}",
        addr.expect("the service logs where it listens")
    );
    let (s, _, _) = get(
        &base,
        "/v1/messages/m-acme/recipients/%2B243990000003",
        Some(ACME_NEW),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, _) = get(&base, "/v1/messages/m-globex", Some(ACME_NEW)).await;
    assert_eq!(s, 404);

    let mut audit = Vec::new();
    while audit.len() < 2 {
        let v = next_json(Duration::from_secs(10)).expect("two audit lines");
        if v["target"] == "dlrflow::audit" {
            audit.push(v);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(audit[0]["key_id"], "acme-backend", "{}", audit[0]);
    assert_eq!(audit[0]["message_id"], "m-acme");
    assert_eq!(audit[0]["status"], 200);
    assert_eq!(
        (&audit[1]["message_id"], &audit[1]["status"]),
        (&"m-globex".into(), &404.into())
    );
    for line in &audit {
        assert!(
            !line.to_string().contains("243990000003"),
            "a phone number in {line}"
        );
    }
    env.drop_schema().await;
}

/// The read API serves HTTPS itself when `http.tls` is set: HTTP/2 and
/// HTTP/1.1 with the configured certificate, the keys checked as over plain
/// HTTP, a client that trusts another CA refused, plain HTTP on the port
/// answered with nothing a client could take for data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_api_serves_https_with_its_keys() {
    use dlrflow_testkit::tls::TestCa;
    let env = Env::new(1).await;
    seed(&env).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("read-api");
    let files = ca.issue().write(dir.path());
    let mut cfg = env.config();
    cfg.api.keys = vec![key("acme", ACME_NEW, &["acme"])];
    cfg.http.tls = Some(files.settings());
    let app = spawn_app(cfg).await;
    let url = format!("https://localhost:{}/v1/messages/m-acme", app.addr.port());
    for (http1_only, version) in [
        (false, reqwest::Version::HTTP_2),
        (true, reqwest::Version::HTTP_11),
    ] {
        let c = ca.client(http1_only);
        let r = c.get(&url).bearer_auth(ACME_NEW).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), version);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["recipients"].as_array().unwrap().len(), 5);
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401, "no key over TLS is still 401");
    }
    let other = TestCa::new("someone-else");
    let refused = other
        .client(false)
        .get(&url)
        .bearer_auth(ACME_NEW)
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a client trusting another CA connects: {refused:?}"
    );
    let plain = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/v1/messages/m-acme",
            app.addr.port()
        ))
        .bearer_auth(ACME_NEW)
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    app.stop().await;
    env.drop_schema().await;
}

/// `GET /v1/analytics/carriers`: the same keys, each sees only its sources
/// (another source is 404, as a message of it is), 400 names a bad
/// parameter, 401 without a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carrier_report_sees_only_the_keys_sources() {
    let env = Env::new(1).await;
    seed(&env).await;
    let mut cfg = env.config();
    cfg.api.keys = vec![
        key("acme", ACME_NEW, &["acme"]),
        key("everyone", GLOBEX, &["*"]),
    ];
    let app = spawn_app(cfg).await;
    let base = format!("http://{}", app.addr);
    let path = "/v1/analytics/carriers";
    let recipients = |b: &Value| -> u64 {
        b["carriers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["recipients"].as_u64().unwrap())
            .sum()
    };

    let (s, _, b) = get(&base, path, Some(ACME_NEW)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(recipients(&b), 5, "acme's 5 recipients only: {b}");
    assert_eq!(b["filter"]["sources"], serde_json::json!(["acme"]));
    assert_eq!(b["carriers"][0]["delivered"], 5);
    assert_eq!(b["carriers"][0]["delivery_rate"], 1.0);
    let (s, _, b) = get(&base, path, Some(GLOBEX)).await;
    assert_eq!((s, recipients(&b)), (200, 6), "{b}");
    let (s, _, b) = get(&base, &format!("{path}?source=globex"), Some(GLOBEX)).await;
    assert_eq!((s, recipients(&b)), (200, 1), "{b}");
    let (s, _, _) = get(&base, &format!("{path}?source=globex"), Some(ACME_NEW)).await;
    assert_eq!(s, 404, "a source the key may not read");

    for (query, says) in [
        ("from=yesterday", "invalid from"),
        ("to=2026-05-27T10:15:00Z", "whole hours"),
        (
            "from=2026-05-27T11:00:00Z&to=2026-05-27T10:00:00Z",
            "before",
        ),
        ("sources=acme", "unknown field"),
    ] {
        let (s, _, b) = get(&base, &format!("{path}?{query}"), Some(GLOBEX)).await;
        assert_eq!(s, 400, "{query}: {b}");
        let msg = b["error"].as_str().unwrap();
        assert!(msg.contains(says), "{query}: {msg}");
    }
    let (s, _, _) = get(&base, path, None).await;
    assert_eq!(s, 401);
    app.stop().await;
    env.drop_schema().await;
}
