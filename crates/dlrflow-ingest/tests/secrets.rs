//! Secrets never reach logs, startup errors or `/metrics` (issue 9). The
//! real `dlrflow-ingest` binary runs with every log level on (`RUST_LOG=trace`,
//! librdkafka debug contexts too) and the secrets in its configuration; its
//! whole output is searched for them.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use dlrflow_testkit::{create_topic, test_brokers, unique_name};
use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BASIC_PASSWORD: &str = "basic-s3cret-pw";
const PATH_TOKEN: &str = "path-token-s3cret-0123";
const SASL_PASSWORD: &str = "kafka-s3cret-pw";

/// A configuration file in a fresh temporary directory.
fn config_file(toml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name("ingest-secrets"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ingest.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn sources_toml() -> String {
    format!(
        r#"
[[sources]]
name = "lisoloo"
provider = "lisoloo"
auth = "basic"
credentials = [{{ username = "hook", password = "{BASIC_PASSWORD}" }}]

[[sources]]
name = "arp"
provider = "arpoone"
auth = "path_token"
path_tokens = ["{PATH_TOKEN}"]
"#
    )
}

/// The binary with `config` and `env`, nothing else from this process's
/// `DLRFLOW_…` environment, every log level on and JSON logs.
fn ingest(config: &std::path::Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dlrflow-ingest"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DLRFLOW_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--config")
        .arg(config)
        .env("RUST_LOG", "trace")
        .env("RUST_BACKTRACE", "0")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn assert_no_secret(text: &str, secrets: &[&str], what: &str) {
    for s in secrets {
        assert!(!text.contains(s), "{what} shows the secret `{s}`:\n{text}");
    }
}

/// A configuration the ingest refuses at start, the secret in it, and what
/// the error must name instead.
struct Refused {
    name: &'static str,
    toml: String,
    env: Vec<(&'static str, String)>,
    secret: &'static str,
    names: &'static str,
}

#[tokio::test]
async fn startup_errors_never_show_secrets() {
    let base = |kafka: &str| {
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[kafka]\n{kafka}\n{}",
            sources_toml()
        )
    };
    let cases = [
        Refused {
            name: "a password in the broker address",
            toml: base("brokers = \"hook:brokers-s3cret@127.0.0.1:9092\""),
            env: vec![],
            secret: "brokers-s3cret",
            names: "kafka.brokers",
        },
        Refused {
            name: "a misspelt password setting",
            toml: base("[kafka.settings]\n\"sasl.passwrd\" = \"typo-s3cret\""),
            env: vec![],
            secret: "typo-s3cret",
            names: "sasl.passwrd",
        },
        Refused {
            name: "a Java JAAS line",
            toml: base(
                "[kafka.settings]\n\"sasl.jaas.config\" = 'PlainLoginModule required username=\"u\" password=\"jaas-s3cret\";'",
            ),
            env: vec![],
            secret: "jaas-s3cret",
            names: "sasl.jaas.config",
        },
        Refused {
            name: "an invalid value next to a secret",
            toml: base(
                "[kafka.settings]\n\"sasl.password\" = \"sasl-s3cret\"\n\"security.protocol\" = \"sasl-s3cret\"",
            ),
            env: vec![],
            secret: "sasl-s3cret",
            names: "security.protocol",
        },
        Refused {
            name: "a password that is a number",
            toml: base("").replace(&format!("\"{BASIC_PASSWORD}\""), "987654321"),
            env: vec![],
            secret: "987654321",
            names: "password",
        },
        Refused {
            name: "a DLRFLOW_SOURCES list TOML cannot parse",
            toml: "[http]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n".into(),
            env: vec![(
                "DLRFLOW_SOURCES",
                "[{name=\"l\",provider=\"lisoloo\",auth=\"basic\",credentials=[{username=\"u\",password=\"env-s3cret\"}]".into(),
            )],
            secret: "env-s3cret",
            names: "sources",
        },
        Refused {
            name: "a path token that is too short",
            toml: base("").replace(PATH_TOKEN, "tok-s3cret"),
            env: vec![],
            secret: "tok-s3cret",
            names: "path_tokens",
        },
    ];
    for case in cases {
        let path = config_file(&case.toml);
        let env: Vec<(&str, &str)> = case.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = tokio::time::timeout(Duration::from_secs(30), ingest(&path, &env).output())
            .await
            .unwrap_or_else(|_| panic!("{}: still running after 30 s", case.name))
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{}: started:\n{text}", case.name);
        assert!(
            text.contains(case.names),
            "{}: the error does not name `{}`:\n{text}",
            case.name,
            case.names
        );
        assert_no_secret(&text, &[case.secret], case.name);
    }
}

/// A child's output lines, collected as they come.
struct Output {
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Output {
    /// Everything the child printed, once both pipes reached their end
    /// (after the child exited).
    async fn all(self) -> String {
        for r in self.readers {
            tokio::time::timeout(Duration::from_secs(10), r)
                .await
                .expect("the child's pipes close after it exits")
                .unwrap();
        }
        self.lines.lock().unwrap().join("\n")
    }
}

fn collect(child: &mut Child) -> Output {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let l = lines.clone();
    let out = tokio::spawn(async move {
        let mut r = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = r.next_line().await {
            l.lock().unwrap().push(line);
        }
    });
    let l = lines.clone();
    let err = tokio::spawn(async move {
        let mut r = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = r.next_line().await {
            l.lock().unwrap().push(line);
        }
    });
    Output {
        lines,
        readers: vec![out, err],
    }
}

#[tokio::test]
async fn logs_and_metrics_never_show_secrets() {
    let brokers = test_brokers();
    let topic = unique_name("ingest-secrets");
    create_topic(&brokers, &topic, 1).await.unwrap();
    let path = config_file(&format!(
        r#"
[http]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[kafka]
brokers = "{brokers}"
raw_topic = "{topic}"

[kafka.settings]
"sasl.username" = "kafka-user"
"sasl.password" = "{SASL_PASSWORD}"
"debug" = "generic,broker,conf,security,protocol,msg"
{}"#,
        sources_toml()
    ));
    let mut child = ingest(&path, &[]).spawn().unwrap();
    let output = collect(&mut child);
    let lines = output.lines.clone();
    let (addr, admin) = dlrflow_testkit::wait_for(Duration::from_secs(30), || {
        let lines = lines.clone();
        async move {
            lines.lock().unwrap().iter().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                let addr = |k: &str| v[k].as_str().map(str::to_owned);
                (v["message"] == "listening").then(|| Some((addr("addr")?, addr("admin")?)))?
            })
        }
    })
    .await
    .unwrap_or_else(|| panic!("no listening line:\n{}", lines.lock().unwrap().join("\n")));
    let url = |p: &str| format!("http://{addr}{p}");
    let client = reqwest::Client::new();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let right = format!("Basic {}", b64(&format!("hook:{BASIC_PASSWORD}")));
    let event = |mid: &str| {
        format!(
            r#"{{"event_id":"{}","event_type":"sms.sent","timestamp":"2026-05-27T10:15:08Z","message_id":"{mid}","data":{{"recipient_phone":"+1","sent_at":"2026-05-27T10:15:08Z"}}}}"#,
            uuid::Uuid::new_v4()
        )
    };
    let report = r#"[{"Msisdn":"351911111111","Status":"DELIVERED","MessageId":"m-1","ReportDateTime":"2026-05-27T10:15:00"}]"#;
    let wrong_password = "wrong-attempt-s3cret";
    let wrong_token = "wrong-token-s3cret-0123";
    let requests: Vec<(String, Option<String>, String, StatusCode)> = vec![
        (
            url("/lisoloo/webhook"),
            Some(right.clone()),
            event("m-ok"),
            StatusCode::NO_CONTENT,
        ),
        (
            url("/lisoloo/webhook"),
            Some(format!("Basic {}", b64(&format!("hook:{wrong_password}")))),
            event("m-1"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            url("/lisoloo/webhook"),
            Some(format!("Bearer {BASIC_PASSWORD}")),
            event("m-2"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            url("/lisoloo/webhook"),
            Some(format!("Basic {BASIC_PASSWORD}")),
            event("m-3"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            url(&format!("/arp/t/{PATH_TOKEN}/webhook/delivered")),
            None,
            report.into(),
            StatusCode::OK,
        ),
        (
            url(&format!("/arp/t/{wrong_token}/webhook")),
            None,
            report.into(),
            StatusCode::UNAUTHORIZED,
        ),
        // A token in the wrong place of the URL.
        (
            url(&format!("/{PATH_TOKEN}/webhook")),
            None,
            report.into(),
            StatusCode::NOT_FOUND,
        ),
        (
            url(&format!("/lisoloo/t/{PATH_TOKEN}/webhook")),
            Some(right.clone()),
            event("m-4"),
            StatusCode::NOT_FOUND,
        ),
        // A body carrying a secret is the gateway's data, kept in the topic
        // but never logged.
        (
            url("/lisoloo/webhook"),
            Some(right.clone()),
            format!("{{\"not json {SASL_PASSWORD}"),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (u, auth, body, want) in requests {
        let mut req = client.post(&u).body(body);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let got = req.send().await.unwrap().status();
        assert_eq!(got, want, "{u}");
    }
    let metrics = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dlrflow_ingest_requests_total"),
        "{metrics}"
    );

    // SIGTERM, as an orchestrator would stop it; then all of its output is in.
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("stopped after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    let logs = output.all().await;
    assert!(logs.contains("rejected request"), "{logs}");
    assert!(logs.contains("librdkafka"), "{logs}");

    let secrets = [
        BASIC_PASSWORD,
        PATH_TOKEN,
        SASL_PASSWORD,
        wrong_password,
        wrong_token,
        &b64(&format!("hook:{BASIC_PASSWORD}")),
        &b64(&format!("hook:{wrong_password}")),
    ];
    assert_no_secret(&logs, &secrets, "the logs");
    assert_no_secret(&metrics, &secrets, "/metrics");
}
