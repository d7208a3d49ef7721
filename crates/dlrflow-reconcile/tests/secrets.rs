//! Secrets never leave the process: the real binary is started with a
//! password in every URL (Redis, PostgreSQL, the status API's base URL) and
//! an API key, against backends that are unreachable, that refuse the
//! password, and that accept it; whatever it prints (logs at `debug`, the
//! startup error) and serves (`/metrics`, `/readyz`) and stores
//! (`reconcile_jobs.last_error`) is searched for them.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use dlrflow_events::Status;
use dlrflow_testkit::{unique_name, wait_for, PrivateRedis};

const API_KEY: &str = "apikey-S3CRET-c0ffee";
const REDIS_PW: &str = "redispw-S3CRET-a11ce";
const PG_PW: &str = "pgpw-S3CRET-b0b";
const BASE_PW: &str = "basepw-S3CRET-d00d";
const WRONG_PW: &str = "wrongpw-S3CRET-e1f";
const SECRETS: [&str; 5] = [API_KEY, REDIS_PW, PG_PW, BASE_PW, WRONG_PW];

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn assert_no_secret(what: &str, text: &str) {
    for s in SECRETS {
        // Also the tell-tale core of each, in case it was cut or re-encoded.
        let core = &s[s.find("S3CRET").unwrap()..];
        assert!(
            !text.contains(s) && !text.contains(core),
            "{what} shows the secret `{s}`:\n{text}"
        );
    }
}

/// The binary with everything set through the environment, as in production.
fn reconciler(env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dlrflow-reconcile"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "debug")
        .env("RUST_BACKTRACE", "0")
        .env("DLRFLOW_STATUS_API__API_KEY", API_KEY)
        .env("DLRFLOW_RECONCILE__SOURCES", format!("[\"{SOURCE}\"]"))
        .env(
            "DLRFLOW_HTTP__ADMIN_LISTEN",
            format!("127.0.0.1:{}", closed_port()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A running binary whose output is drained as it comes (a full pipe would
/// block it).
struct Proc {
    child: std::process::Child,
    out: Vec<std::thread::JoinHandle<Vec<u8>>>,
}

impl Proc {
    fn spawn(env: &[(&str, String)]) -> Proc {
        let mut child = reconciler(env).spawn().unwrap();
        let drain = |mut r: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                buf
            })
        };
        let out = vec![
            drain(Box::new(child.stdout.take().unwrap())),
            drain(Box::new(child.stderr.take().unwrap())),
        ];
        Proc { child, out }
    }

    /// Waits up to `limit` for the exit (killing it after); returns whether it
    /// exited by itself, its status, and everything it printed.
    fn finish(mut self, limit: Duration) -> (bool, std::process::ExitStatus, String) {
        let deadline = Instant::now() + limit;
        let mut exited = true;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                exited = false;
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = self.child.wait().unwrap();
        let printed = self
            .out
            .into_iter()
            .map(|h| String::from_utf8_lossy(&h.join().unwrap()).into_owned())
            .collect::<Vec<_>>()
            .join("");
        (exited, status, printed)
    }
}

/// Runs a start that must fail; returns everything it printed.
fn failed_start(case: &str, env: &[(&str, String)]) -> String {
    let (exited, status, printed) = Proc::spawn(env).finish(Duration::from_secs(30));
    assert!(
        exited,
        "{case}: the reconciler neither started nor stopped within 30 s:\n{printed}"
    );
    assert!(
        !status.success(),
        "{case}: started although it should not have"
    );
    printed
}

fn pg_url(port: u16, password: &str) -> String {
    // The local PostgreSQL trusts local connections, so any password works.
    let base = database_url();
    let rest = base
        .strip_prefix("postgres://postgres@")
        .unwrap_or("127.0.0.1:5432/dlrflow");
    let rest = rest.split_once('/').map_or("dlrflow", |(_, db)| db);
    format!("postgres://postgres:{password}@127.0.0.1:{port}/{rest}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_errors_metrics_or_job_errors() {
    let db = TestDb::new().await;
    let schema = db.schema().to_owned();
    let mut redis = PrivateRedis::start(Some(REDIS_PW));
    let pg = || pg_url(5432, PG_PW);
    let common_env = |redis_url: String, pg_url: String| {
        vec![
            ("DLRFLOW_REDIS__URL", redis_url),
            ("DLRFLOW_POSTGRES__URL", pg_url),
            ("DLRFLOW_POSTGRES__SCHEMA", schema.clone()),
        ]
    };

    // Unreachable Redis, unreachable PostgreSQL, Redis refusing the password,
    // and a URL that is not a Redis URL: each start fails and says which
    // setting, never its secret.
    let cases = [
        (
            "unreachable Redis",
            common_env(
                format!("redis://:{REDIS_PW}@127.0.0.1:{}", closed_port()),
                pg(),
            ),
            "redis.url",
        ),
        (
            "unreachable PostgreSQL",
            common_env(redis.url(), pg_url(closed_port(), PG_PW)),
            "postgres.url",
        ),
        (
            "Redis refusing the password",
            common_env(
                format!("redis://:{WRONG_PW}@127.0.0.1:{}", redis.port),
                pg(),
            ),
            "redis.url",
        ),
        (
            // A typo (one slash): the server echoes the password back as
            // part of the database name it cannot find.
            "a malformed PostgreSQL URL",
            common_env(
                redis.url(),
                format!("postgres:/postgres:{PG_PW}@127.0.0.1:5432"),
            ),
            "postgres.url",
        ),
        (
            "not a Redis URL",
            common_env(format!("http://:{REDIS_PW}@127.0.0.1:1"), pg()),
            "redis.url",
        ),
    ];
    for (case, env, setting) in cases {
        let out = failed_start(case, &env);
        assert!(
            out.contains(setting),
            "{case}: the error names no setting:\n{out}"
        );
        assert_no_secret(case, &out);
    }

    // Everything reachable; the status API's base URL carries credentials
    // (the key goes in another header) and refuses connections, so every
    // read fails and is logged and stored.
    let msg = unique_name("m");
    db.seed(&[webhook(
        &msg,
        "+243990000001",
        Status::Sent,
        chrono::Utc::now() - chrono::Duration::hours(3),
    )])
    .await;
    let http_port = closed_port();
    let mut env = common_env(redis.url(), pg());
    env.extend([
        (
            "DLRFLOW_HTTP__ADMIN_LISTEN",
            format!("127.0.0.1:{http_port}"),
        ),
        (
            "DLRFLOW_STATUS_API__BASE_URL",
            format!("http://gw:{BASE_PW}@127.0.0.1:{}", closed_port()),
        ),
        ("DLRFLOW_STATUS_API__AUTH_HEADER", "X-Api-Key".into()),
        ("DLRFLOW_RECONCILE__SWEEP_INTERVAL_MS", "200".into()),
        ("DLRFLOW_RECONCILE__BACKOFF_INITIAL_MS", "200".into()),
        ("DLRFLOW_RECONCILE__BACKOFF_MAX_MS", "400".into()),
    ]);
    let proc = Proc::spawn(&env);
    let pid = proc.child.id();
    let addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let read_failed = wait_for(Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT last_error FROM reconcile_jobs WHERE message_id = $1 AND attempts >= 2",
        )
        .bind(&msg)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
        .flatten()
    })
    .await;
    let served = match read_failed {
        Some(_) => {
            let (_, ready) = readyz(addr).await;
            format!("{ready}\n{}", metrics(addr).await)
        }
        None => String::new(),
    };
    let stored: Vec<Option<String>> = sqlx::query_scalar("SELECT last_error FROM reconcile_jobs")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    // Stop it as an orchestrator would, and collect what it printed.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let (exited, status, printed) =
        tokio::task::spawn_blocking(move || proc.finish(Duration::from_secs(20)))
            .await
            .unwrap();
    assert!(
        exited && status.success(),
        "{status:?}: it did not stop cleanly on SIGTERM:\n{printed}"
    );
    let last_error = read_failed.unwrap_or_else(|| panic!("no read was attempted:\n{printed}"));
    assert!(last_error.contains("request failed"), "{last_error}");
    assert!(served.contains("dlrflow_reconcile_reads_total"), "{served}");
    assert!(printed.contains("status read failed"), "{printed}");
    assert_no_secret("the logs", &printed);
    assert_no_secret("/readyz and /metrics", &served);
    assert_no_secret("reconcile_jobs.last_error", &format!("{stored:?}"));
    redis.down();
    db.drop().await;
}
