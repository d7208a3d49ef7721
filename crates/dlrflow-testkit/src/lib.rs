//! What the tests of every crate, the end-to-end suite and the benchmarks
//! share, and nothing a service runs: the test broker's topics, private
//! brokers, Redis instances and Redis Clusters that a test may kill, the
//! test PostgreSQL, bounded waiting, and deterministic Lisoloo scenarios with
//! their expected state. Used only as a dev-dependency (the architecture test
//! checks it).

mod broker;
mod kafka;
mod postgres;
mod redis;
pub mod scenario;
pub mod tls;
mod wait;

pub use broker::{index_tansu_headers, tansu_binary, tansu_command, PrivateBroker};
pub use dlrflow_runtime::kafka::{read_topic, read_topic_with, Record};
pub use kafka::{create_topic, create_topic_with, test_brokers, unique_name};
pub use postgres::PrivatePostgres;
pub use redis::{test_redis_url, PrivateRedis, RedisCluster};
pub use wait::wait_for;

/// `GET {base}/metrics` (a service's admin listener, `http://host:port`) as
/// Prometheus text.
pub async fn scrape(base: &str) -> String {
    let url = format!("{}/metrics", base.trim_end_matches('/'));
    let r = reqwest::get(&url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    r.text().await.unwrap_or_default()
}

/// The sum of the values of the series in Prometheus `text` whose line
/// starts with `prefix`: a metric's name, or its name and the start of its
/// labels (`name{outcome="ok"`). 0 when there is none.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends SIGHUP to this test process (the reload signal of a service run
/// inside it).
pub fn sighup_self() {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -HUP failed");
}

/// The PostgreSQL the tests use: `DLRFLOW_TEST_POSTGRES_URL`, default the
/// local stack's database `dlrflow` (`deploy/local/stack.sh up` creates it).
pub fn test_postgres_url() -> String {
    std::env::var("DLRFLOW_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/dlrflow".into())
}

/// Kills `pid` (SIGKILL) once this test process is gone, so that a test
/// killed by the runner (a timeout) leaves no broker, Redis or service
/// behind. A plain shell loop: safe Rust cannot ask the kernel for a
/// parent-death signal.
pub fn kill_with_this_process(pid: u32) {
    let script = format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         kill -0 {me} 2>/dev/null || kill -9 {pid} 2>/dev/null",
        me = std::process::id()
    );
    let _ = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    // The kernel may hand the same port to two binds in a row once the first
    // listener is closed: never return a port twice in one process (a service
    // given the same port for `http.listen` and `http.admin_listen` refuses
    // to start).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding 127.0.0.1:0");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Opens `path` for appending a child process's output, after a line saying
/// what happens now (`=== testkit: start at …`), so one log shows every
/// start and kill of a process.
pub fn open_log(path: &std::path::Path, what: &str) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(
        f,
        "=== testkit: {what} at {}",
        chrono::Utc::now().to_rfc3339()
    )?;
    Ok(f)
}
