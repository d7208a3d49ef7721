//! `dlrflow-e2e` is the end-to-end harness: it runs the real service binaries
//! (`dlrflow-ingest`, N × `dlrflow-state`, `dlrflow-reconcile`) as separate
//! processes against real Kafka-protocol broker, Redis and PostgreSQL, while
//! `dlrflow-sim` plays the gateway in-process, and checks the outcome the way a
//! user would: the simulator's `verify` against its ground truth, the status
//! server's read log and the analytics topic.
//!
//! Every [`Pipeline`] has its own topics, consumer group, Redis prefix,
//! PostgreSQL schema and ports, so tests run in parallel without seeing each
//! other. It may also own a private broker or a private PostgreSQL server that
//! a test is allowed to stop; it must never stop, flush or drop anything shared
//! (no `FLUSHALL`, never the broker on 9092).

pub mod browser;
use std::collections::{BTreeMap, HashMap, HashSet};

use std::io::Write;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use dlrflow_sim::{
    DeliveryConfig, Gateway, ReadRecord, StatusServer, StatusServerConfig, Truth, VerifyOptions,
    VerifyReport,
};
use dlrflow_testkit::{create_topic, read_topic, test_brokers, unique_name};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// HTTP Basic credentials the ingest accepts and the simulator sends.
pub const USERNAME: &str = "e2e";
pub const PASSWORD: &str = "e2e-password";
/// The status API key the simulator accepts and the reconciler uses.
pub const STATUS_KEY: &str = "e2e-status-key";
/// Partitions of every topic a test creates.
pub const PARTITIONS: i32 = 6;
/// How long a service may take to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// Locations and binaries
// ---------------------------------------------------------------------------

/// The workspace root (this package lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `<target>/<profile>`, derived from the running test binary
/// (`<target>/<profile>/deps/<test>-<hash>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// `<target>`: the parent of the profile directory.
pub fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The binaries already built by this test process: cargo is asked once per
/// binary and decides itself whether anything changed.
static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The path of binary `name` of package `pkg` in this profile, after
/// `cargo build -p pkg --bin name` (once per test process; cargo rebuilds
/// only what changed). `DLRFLOW_E2E_NO_BUILD=1` uses whatever binary exists.
pub fn binary(pkg: &str, name: &str) -> anyhow::Result<PathBuf> {
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let path = profile_dir().join(name);
    let no_build = std::env::var_os("DLRFLOW_E2E_NO_BUILD").is_some();
    // The suite's own build (`cargo nextest run --workspace --all-targets`)
    // has just built every binary: a binary newer than every source is
    // used as it is. (`cargo build -p <one>` would rebuild the dependencies
    // that build unified with other features: minutes on 2 shared cores,
    // paid inside the first tests' time limit.)
    let fresh = || {
        std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .is_ok_and(|at| at >= newest_source())
    };
    if no_build || built.iter().any(|b| b == name) || fresh() {
        ensure!(path.is_file(), "{} is missing", path.display());
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "-q", "-p", pkg, "--bin", name])
        .env("CARGO_TARGET_DIR", target_dir());
    if profile_dir().file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    ensure!(status.success(), "cargo build -p {pkg} --bin {name} failed");
    ensure!(
        path.is_file(),
        "{} not found after the build",
        path.display()
    );
    built.push(name.to_owned());
    Ok(path)
}

/// The newest modification time of what the binaries are built from:
/// every file under `crates/`, `Cargo.toml`, `Cargo.lock`.
pub fn newest_source() -> std::time::SystemTime {
    fn walk(dir: &Path, newest: &mut std::time::SystemTime) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, newest);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                *newest = (*newest).max(modified);
            }
        }
    }
    let root = workspace_root();
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    walk(&root.join("crates"), &mut newest);
    for file in ["Cargo.toml", "Cargo.lock"] {
        if let Ok(modified) = std::fs::metadata(root.join(file)).and_then(|m| m.modified()) {
            newest = newest.max(modified);
        }
    }
    newest
}

use dlrflow_testkit::kill_with_this_process as watchdog;
pub use dlrflow_testkit::{free_port, open_log};

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// Service processes
// ---------------------------------------------------------------------------

/// Which binary a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ingest,
    State,
    Reconcile,
}

impl Kind {
    fn binary(self) -> anyhow::Result<PathBuf> {
        match self {
            Kind::Ingest => binary("dlrflow-ingest", "dlrflow-ingest"),
            Kind::State => binary("dlrflow-state", "dlrflow-state"),
            Kind::Reconcile => binary("dlrflow-reconcile", "dlrflow-reconcile"),
        }
    }

    /// Whether the service has public routes (`http.listen`); every one
    /// has the admin listener.
    fn public(self) -> bool {
        !matches!(self, Kind::Reconcile)
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Kind::Ingest | Kind::State => &["serve"],
            Kind::Reconcile => &[],
        }
    }
}

/// One service process: its command line, its ports, its log file.
struct Service {
    kind: Kind,
    /// `http.listen` (0 for a service without public routes).
    port: u16,
    /// `http.admin_listen`: `/healthz`, `/readyz`, `/metrics`.
    admin_port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Service {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = self.kind.binary()?;
        let log = open_log(&self.log, "start")?;
        let err = log.try_clone()?;
        let rust_log = std::env::var("DLRFLOW_E2E_RUST_LOG").unwrap_or_else(|_| "info".into());
        let child = Command::new(&bin)
            .args(self.kind.args())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", rust_log)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        watchdog(child.id());
        self.child = Some(child);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
            if let Ok(mut f) = open_log(&self.log, "SIGKILL") {
                let _ = f.flush();
            }
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn terminate(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    async fn wait_ready(&mut self, name: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?;
        let url = format!("{}/readyz", self.admin_url());
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    bail!(
                        "{name} exited with {status} before it was ready; log {}:\n{}",
                        self.log.display(),
                        log_tail(&self.log, 30)
                    );
                }
            } else {
                bail!("{name} is not running");
            }
            match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => last = format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} not ready after {READY_TIMEOUT:?} (last answer: {last}); log {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Private infrastructure a test may stop
// ---------------------------------------------------------------------------

pub use dlrflow_testkit::PrivateBroker;

pub use dlrflow_testkit::PrivatePostgres;

// ---------------------------------------------------------------------------
// The pipeline
// ---------------------------------------------------------------------------

/// What a [`Pipeline`] owns besides the shared services.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Run a private Tansu broker even when `DLRFLOW_E2E_BROKERS` names a
    /// shared one (the test stops it).
    pub private_broker: bool,
    /// Run a private PostgreSQL server (the test may restart it).
    pub private_postgres: bool,
}

/// The simulator's status API (`GET /status/{id}`) answering for `gateway`
/// with the gateway's real limit (120 reads per sliding 60 s) and
/// [`STATUS_KEY`].
pub async fn status_server(gateway: &Gateway) -> StatusServer {
    StatusServer::start(
        StatusServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            api_keys: vec![STATUS_KEY.to_owned()],
            limit: 120,
            window: Duration::from_secs(60),
            read_log: None,
        },
        gateway.clone(),
    )
    .await
    .expect("starting the status server")
}

/// The reconciler's settings a test picks.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// The status server's base URL (`GET {base}/status/{id}`).
    pub status_api: String,
    pub sources: Vec<String>,
    /// Deadline for every non-terminal status (queued, processing, sent).
    pub deadline_secs: u64,
    pub sweep_interval_ms: u64,
}

/// One test's private dlrflow deployment.
pub struct Pipeline {
    pub id: String,
    pub logs: PathBuf,
    pub brokers: String,
    pub raw_topic: String,
    /// dlrflow-reconcile's answers, applied by dlrflow-state.
    pub status_topic: String,
    pub dlq_topic: String,
    pub delivery_topic: String,
    pub group: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub reconcile_prefix: String,
    pub postgres_url: String,
    pub schema: String,
    /// librdkafka settings (`kafka.settings.*`) given to the ingest and the
    /// state replicas started after they are set.
    pub kafka_settings: Vec<(String, String)>,
    /// More environment for every service started after it is set
    /// (`OTEL_…`, say).
    pub extra_env: Vec<(String, String)>,
    /// Whether state replicas started after it is set use static membership
    /// (`kafka.instance_id` = `{group}-state-{i}`; the default). On Tansu
    /// 0.6.0 static membership is what lets a replica restarted at once take
    /// its partitions back, but a lone static member restarted after its
    /// session expired can wedge the group (tests/README.md, "Tansu"): a
    /// test whose only replica comes back after a long outage turns it off.
    pub static_membership: bool,
    services: BTreeMap<String, Service>,
    broker: Option<PrivateBroker>,
    postgres: Option<PrivatePostgres>,
    finished: bool,
}

impl Pipeline {
    /// Creates this test's topics (and private services) and names for
    /// everything else; starts no dlrflow process yet.
    pub async fn new(test: &str, opts: &Options) -> anyhow::Result<Self> {
        let id = unique_name(test);
        let short = id.rsplit('-').next().unwrap_or(&id).to_owned();
        let logs = target_dir().join("e2e-logs").join(&id);
        std::fs::create_dir_all(&logs)?;
        eprintln!("e2e: {test}: logs in {}", logs.display());
        // Every test gets its own broker unless DLRFLOW_E2E_BROKERS names one:
        // a private Tansu starts in well under a second, and one test (or one
        // broker crash) can then never disturb another.
        let external = std::env::var("DLRFLOW_E2E_BROKERS")
            .ok()
            .filter(|b| !b.trim().is_empty());
        let broker = if opts.private_broker || external.is_none() {
            Some(PrivateBroker::start_logging_to(Some(
                logs.join("tansu.log"),
            ))?)
        } else {
            None
        };
        let postgres = if opts.private_postgres {
            Some(PrivatePostgres::new(&short, logs.join("postgres.log"))?)
        } else {
            None
        };
        let brokers = match (&broker, external) {
            (Some(b), _) => b.brokers(),
            (None, Some(e)) => e,
            (None, None) => test_brokers(),
        };
        let postgres_url = postgres
            .as_ref()
            .map_or_else(dlrflow_testkit::test_postgres_url, |p| p.url());
        let redis_url = std::env::var("DLRFLOW_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let p = Pipeline {
            raw_topic: format!("e2e.{short}.raw"),
            status_topic: format!("e2e.{short}.status"),
            dlq_topic: format!("e2e.{short}.dlq"),
            delivery_topic: format!("e2e.{short}.delivery"),
            group: format!("e2e-{short}"),
            redis_prefix: format!("e2e:{short}:state:"),
            reconcile_prefix: format!("e2e:{short}:reconcile"),
            schema: format!("e2e_{short}"),
            id,
            logs,
            brokers,
            redis_url,
            postgres_url,
            services: BTreeMap::new(),
            broker,
            postgres,
            finished: false,
            kafka_settings: Vec::new(),
            extra_env: Vec::new(),
            static_membership: true,
        };
        for t in [
            &p.raw_topic,
            &p.status_topic,
            &p.dlq_topic,
            &p.delivery_topic,
        ] {
            create_topic(&p.brokers, t, PARTITIONS)
                .await
                .with_context(|| format!("creating topic {t}"))?;
        }
        Ok(p)
    }

    fn add(&mut self, name: &str, kind: Kind, env: Vec<(&str, String)>) -> u16 {
        let port = if kind.public() { free_port() } else { 0 };
        let admin_port = free_port();
        let mut env: Vec<(String, String)> =
            env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        if kind.public() {
            env.push(("DLRFLOW_HTTP__LISTEN".into(), format!("127.0.0.1:{port}")));
        }
        if matches!(kind, Kind::Ingest | Kind::State | Kind::Reconcile) {
            // The documented form: DLRFLOW_KAFKA__SETTINGS__SASL_PASSWORD
            // sets `sasl.password`.
            for (k, v) in &self.kafka_settings {
                let key = k.replace('.', "_").to_ascii_uppercase();
                env.push((format!("DLRFLOW_KAFKA__SETTINGS__{key}"), v.clone()));
            }
        }
        env.extend(self.extra_env.iter().cloned());
        env.push((
            "DLRFLOW_HTTP__ADMIN_LISTEN".into(),
            format!("127.0.0.1:{admin_port}"),
        ));
        self.services.insert(
            name.to_owned(),
            Service {
                kind,
                port,
                admin_port,
                env,
                log: self.logs.join(format!("{name}.log")),
                child: None,
            },
        );
        port
    }

    async fn launch(&mut self, name: &str) -> anyhow::Result<()> {
        let s = self
            .services
            .get_mut(name)
            .with_context(|| format!("no service {name}"))?;
        s.spawn()?;
        s.wait_ready(name).await
    }

    /// Starts `dlrflow-ingest` as `ingest` and waits for `/readyz`.
    pub async fn start_ingest(&mut self) -> anyhow::Result<()> {
        self.start_ingest_named("ingest").await
    }

    /// Starts one more `dlrflow-ingest` replica as `name` (its own port).
    pub async fn start_ingest_named(&mut self, name: &str) -> anyhow::Result<()> {
        let sources = format!(
            r#"[{{name="lisoloo",provider="lisoloo",auth="basic",credentials=[{{username="{USERNAME}",password="{PASSWORD}"}}]}},{{name="arpoone",provider="arpoone",auth="basic",credentials=[{{username="{USERNAME}",password="{PASSWORD}"}}]}},{{name="lisoloo-b",provider="lisoloo",auth="basic",credentials=[{{username="{USERNAME}",password="{PASSWORD}"}}]}}]"#
        );
        let env = vec![
            ("DLRFLOW_KAFKA__BROKERS", self.brokers.clone()),
            ("DLRFLOW_KAFKA__RAW_TOPIC", self.raw_topic.clone()),
            ("DLRFLOW_SOURCES", sources),
        ];
        self.add(name, Kind::Ingest, env);
        self.launch(name).await
    }

    /// Starts `n` `dlrflow-state` replicas named `state-0` … (the first alone,
    /// so that it creates the schema and migrates; the others together).
    pub async fn start_state(&mut self, n: usize) -> anyhow::Result<()> {
        for i in 0..n {
            let mut env = vec![
                ("DLRFLOW_KAFKA__BROKERS", self.brokers.clone()),
                ("DLRFLOW_KAFKA__RAW_TOPIC", self.raw_topic.clone()),
                ("DLRFLOW_KAFKA__STATUS_TOPIC", self.status_topic.clone()),
                ("DLRFLOW_KAFKA__DLQ_TOPIC", self.dlq_topic.clone()),
                ("DLRFLOW_KAFKA__DELIVERY_TOPIC", self.delivery_topic.clone()),
                ("DLRFLOW_KAFKA__GROUP_ID", self.group.clone()),
                ("DLRFLOW_REDIS__URL", self.redis_url.clone()),
                ("DLRFLOW_REDIS__PREFIX", self.redis_prefix.clone()),
                ("DLRFLOW_POSTGRES__URL", self.postgres_url.clone()),
                ("DLRFLOW_POSTGRES__SCHEMA", self.schema.clone()),
                ("DLRFLOW_HTTP__SHUTDOWN_GRACE_MS", "3000".into()),
                ("DLRFLOW_API__KEYS", read_keys_toml()),
                // Verification reads every message many times a second.
                ("DLRFLOW_API__REQUESTS_PER_SEC", "100000".into()),
                ("DLRFLOW_API__BURST", "100000".into()),
                // The reconciler's lag gate reads the progress this often:
                // well under the tests' deadlines of a few seconds.
                ("DLRFLOW_HEALTH__LAG_CHECK_INTERVAL_MS", "500".into()),
            ];
            if self.static_membership {
                // Static membership, as the state README recommends per replica.
                env.push((
                    "DLRFLOW_KAFKA__INSTANCE_ID",
                    format!("{}-state-{i}", self.group),
                ));
            }
            // librdkafka's own debug contexts, e.g. `cgrp` for group membership.
            if let Ok(debug) = std::env::var("DLRFLOW_E2E_KAFKA_DEBUG") {
                env.push(("DLRFLOW_KAFKA__SETTINGS__DEBUG", debug));
            }
            self.add(&format!("state-{i}"), Kind::State, env);
        }
        self.launch("state-0").await?;
        for i in 1..n {
            let s = self.services.get_mut(&format!("state-{i}")).unwrap();
            s.spawn()?;
        }
        for i in 1..n {
            let name = format!("state-{i}");
            self.services
                .get_mut(&name)
                .unwrap()
                .wait_ready(&name)
                .await?;
        }
        Ok(())
    }

    /// Starts `dlrflow-reconcile` as `reconcile` and waits for `/readyz`.
    pub async fn start_reconcile(&mut self, o: &ReconcileOptions) -> anyhow::Result<()> {
        self.start_reconcile_named("reconcile", o).await
    }

    /// Starts one more `dlrflow-reconcile` replica as `name`; every replica
    /// shares the Redis budget.
    pub async fn start_reconcile_named(
        &mut self,
        name: &str,
        o: &ReconcileOptions,
    ) -> anyhow::Result<()> {
        let d = o.deadline_secs.to_string();
        let sources = format!(
            "[{}]",
            o.sources
                .iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        let env = vec![
            ("DLRFLOW_STATUS_API__BASE_URL", o.status_api.clone()),
            ("DLRFLOW_KAFKA__BROKERS", self.brokers.clone()),
            ("DLRFLOW_KAFKA__STATUS_TOPIC", self.status_topic.clone()),
            ("DLRFLOW_STATUS_API__API_KEY", STATUS_KEY.to_owned()),
            ("DLRFLOW_REDIS__URL", self.redis_url.clone()),
            ("DLRFLOW_REDIS__PREFIX", self.reconcile_prefix.clone()),
            ("DLRFLOW_POSTGRES__URL", self.postgres_url.clone()),
            ("DLRFLOW_POSTGRES__SCHEMA", self.schema.clone()),
            ("DLRFLOW_RECONCILE__SOURCES", sources),
            ("DLRFLOW_RECONCILE__DEADLINE_QUEUED_SECS", d.clone()),
            ("DLRFLOW_RECONCILE__DEADLINE_PROCESSING_SECS", d.clone()),
            ("DLRFLOW_RECONCILE__DEADLINE_SENT_SECS", d.clone()),
            ("DLRFLOW_RECONCILE__INCOMPLETE_AFTER_SECS", d.clone()),
            ("DLRFLOW_RECONCILE__CONFLICT_REREAD_SECS", d),
            (
                "DLRFLOW_RECONCILE__SWEEP_INTERVAL_MS",
                o.sweep_interval_ms.to_string(),
            ),
            ("DLRFLOW_RECONCILE__POLL_INTERVAL_MS", "200".into()),
            // The state replicas report their progress every 500 ms here:
            // a partition silent for ten reports makes the lag unknown.
            ("DLRFLOW_RECONCILE__PROGRESS_STALE_AFTER_MS", "5000".into()),
            ("DLRFLOW_RECONCILE__BACKOFF_INITIAL_MS", "1000".into()),
            ("DLRFLOW_RECONCILE__BACKOFF_MAX_MS", "5000".into()),
            ("DLRFLOW_HTTP__SHUTDOWN_GRACE_MS", "3000".into()),
        ];
        self.add(name, Kind::Reconcile, env);
        self.launch(name).await
    }

    /// The ingest, one state replica, and a reconciler for the `lisoloo`
    /// source reading `server` once a status is `deadline_secs` old.
    pub async fn start_all(&mut self, server: &StatusServer, deadline_secs: u64) {
        self.start_ingest().await.expect("starting the ingest");
        self.start_state(1).await.expect("starting the state");
        self.start_reconcile(&ReconcileOptions {
            status_api: server.base_url(),
            sources: vec!["lisoloo".into()],
            deadline_secs,
            sweep_interval_ms: 500,
        })
        .await
        .expect("starting the reconciler");
    }

    /// The ingest's base URL (what the gateway posts to).
    pub fn ingest_url(&self) -> String {
        self.services["ingest"].url()
    }

    /// The base URL of the ingest replica `name`.
    pub fn url_of(&self, name: &str) -> String {
        self.services[name].url()
    }

    /// The read API of replica `state-i`.
    pub fn api_url(&self, i: usize) -> String {
        self.services[&format!("state-{i}")].url()
    }

    /// The admin listener of service `name` (`ingest`, `state-0`,
    /// `reconcile`): `/healthz`, `/readyz`, `/metrics`.
    pub fn admin_url(&self, name: &str) -> String {
        self.services[name].admin_url()
    }

    /// `GET {path}` on the admin listener of `name` until it answers 200
    /// (a probe may time out once on a loaded machine), within 20 s; then
    /// the body. A service that keeps answering otherwise fails the test
    /// with its last answer (for `/readyz`: its reasons).
    pub async fn admin_get_ok(&self, name: &str, path: &str) -> String {
        let url = format!("{}{path}", self.admin_url(name));
        let client = reqwest::Client::new();
        let last = std::sync::Mutex::new(String::new());
        let body = dlrflow_testkit::wait_for(Duration::from_secs(20), || async {
            let answer = match client.get(&url).send().await {
                Ok(r) => (r.status(), r.text().await.unwrap_or_default()),
                Err(e) => {
                    *last.lock().unwrap() = e.to_string();
                    return None;
                }
            };
            if answer.0.is_success() {
                return Some(answer.1);
            }
            *last.lock().unwrap() = format!("{} {}", answer.0, answer.1);
            None
        })
        .await;
        body.unwrap_or_else(|| panic!("{url}: {}", last.lock().unwrap()))
    }

    /// Runs `dlrflow-state rebuild --into {schema}_{suffix} --compare-with
    /// {schema}` with `state-0`'s settings (bounded to 5 minutes): the state
    /// rebuilt from the raw and status topics, compared row by row with the
    /// live one. Returns whether it exited 0 and what it printed.
    pub async fn rebuild(&self, suffix: &str) -> anyhow::Result<(bool, String)> {
        let into = format!("{}_{suffix}", self.schema);
        let args = [
            "rebuild",
            "--into",
            &into,
            "--compare-with",
            &self.schema,
            "--max-differences",
            "20",
        ];
        let (ok, stdout, stderr) = self.run_state(&args, Duration::from_secs(300)).await?;
        let text = format!("{stdout}{stderr}");
        std::fs::write(self.logs.join(format!("rebuild-{suffix}.log")), &text)?;
        Ok((ok, text))
    }

    /// Runs `dlrflow-state ARGS…` with `state-0`'s settings (bounded to a
    /// minute); returns whether it exited 0, its stdout and its stderr.
    pub async fn state_cli(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        self.run_state(args, Duration::from_secs(60)).await
    }

    /// `dlrflow-state ARGS…` with exactly `state-0`'s environment, within
    /// `limit`.
    async fn run_state(
        &self,
        args: &[&str],
        limit: Duration,
    ) -> anyhow::Result<(bool, String, String)> {
        let s = self
            .services
            .get("state-0")
            .context("the command takes state-0's settings")?;
        let bin = Kind::State.binary()?;
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .envs(s.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .with_context(|| {
                format!("dlrflow-state {} did not finish within {limit:?}", args[0])
            })??;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// What the log promises after a run: the analytics topic is clean
    /// ([`Analytics::assert_clean`]) and the state rebuilt from the raw and
    /// status topics equals the live one row by row.
    pub async fn assert_log_is_the_truth(&self) {
        self.analytics(Duration::from_secs(120))
            .await
            .unwrap()
            .assert_clean();
        let (ok, out) = self.rebuild("rebuilt").await.unwrap();
        assert!(
            ok && out.contains(r#""differences":0"#),
            "rebuild differs:\n{out}"
        );
    }

    /// SIGKILL `name` (it stays down until [`Pipeline::restart`]).
    pub fn kill9(&mut self, name: &str) {
        if let Some(s) = self.services.get_mut(name) {
            s.kill9();
        }
    }

    /// Starts `name` again with the same settings and port; waits for `/readyz`.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(s) = self.services.get_mut(name) {
            s.kill9();
        }
        self.launch(name).await
    }

    /// The private broker (for tests created with `private_broker`).
    pub fn broker(&mut self) -> &mut PrivateBroker {
        self.broker.as_mut().expect("Options::private_broker")
    }

    /// The private PostgreSQL (for tests created with `private_postgres`).
    pub fn postgres(&self) -> &PrivatePostgres {
        self.postgres.as_ref().expect("Options::private_postgres")
    }

    /// A small pool on this test's schema.
    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        let opts = PgConnectOptions::from_str(&self.postgres_url)?
            .options([("search_path", self.schema.as_str())]);
        Ok(PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts)
            .await?)
    }

    /// `SELECT count(*) …` on this test's schema; `None` while it fails.
    pub async fn count(&self, pool: &PgPool, sql: &str) -> Option<i64> {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.ok()
    }

    /// When each recipient's terminal Lisoloo event (`sms.delivered` /
    /// `sms.failed`) first reached the raw topic: (message_id, recipient) →
    /// the record timestamp, which the ingest sets to the receive time. Reads
    /// the topic for `timeout`.
    pub async fn terminal_received(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<HashMap<(String, String), chrono::DateTime<chrono::Utc>>> {
        let records = read_topic(
            &self.brokers,
            &self.raw_topic,
            usize::MAX,
            timeout,
            Duration::ZERO,
        )
        .await?;
        let mut out: HashMap<(String, String), chrono::DateTime<chrono::Utc>> = HashMap::new();
        for r in records {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.payload) else {
                continue;
            };
            if !matches!(
                v["event_type"].as_str(),
                Some("sms.delivered" | "sms.failed")
            ) {
                continue;
            }
            let (Some(m), Some(p), Some(at)) = (
                v["message_id"].as_str(),
                v["data"]["recipient_phone"].as_str(),
                r.timestamp
                    .and_then(chrono::DateTime::from_timestamp_millis),
            ) else {
                continue;
            };
            let first = out.entry((m.to_owned(), p.to_owned())).or_insert(at);
            *first = (*first).min(at);
        }
        Ok(out)
    }

    /// Waits until `dlrflow-state` applied at least `n` events (the fault    /// Waits until `dlrflow-state` applied at least `n` events (the fault
    /// injection point of a test).
    pub async fn wait_applied(&self, n: i64, timeout: Duration) -> anyhow::Result<i64> {
        let pool = self.pool().await?;
        let deadline = Instant::now() + timeout;
        loop {
            let c = self
                .count(&pool, "SELECT count(*) FROM delivery_events")
                .await
                .unwrap_or(0);
            if c >= n {
                pool.close().await;
                return Ok(c);
            }
            ensure!(
                Instant::now() < deadline,
                "only {c} of {n} events applied after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes every Redis key of this test's state prefix (`SCAN` + `DEL`,
    /// never `FLUSHALL`). Returns how many were deleted.
    pub async fn flush_redis_prefix(&self) -> anyhow::Result<usize> {
        delete_redis_prefix(&self.redis_url, &self.redis_prefix).await
    }

    /// Checks the analytics topic once the outbox is drained: every record
    /// parses, distinct `update_id`s equal the outbox rows, the copies of one
    /// `update_id` are identical and one (message, recipient, version) never
    /// carries two `update_id`s.
    pub async fn analytics(&self, timeout: Duration) -> anyhow::Result<Analytics> {
        let pool = self.pool().await?;
        let deadline = Instant::now() + timeout;
        let outbox = loop {
            let pending = self
                .count(
                    &pool,
                    "SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL",
                )
                .await;
            if pending == Some(0) {
                break self
                    .count(&pool, "SELECT count(*) FROM delivery_outbox")
                    .await
                    .context("counting the outbox")?;
            }
            ensure!(
                Instant::now() < deadline,
                "outbox not drained after {timeout:?} ({pending:?} unpublished)"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let events = self
            .count(&pool, "SELECT count(*) FROM delivery_events")
            .await
            .unwrap_or(-1);
        pool.close().await;
        let records = read_topic(
            &self.brokers,
            &self.delivery_topic,
            outbox as usize,
            timeout,
            Duration::from_secs(2),
        )
        .await?;
        let mut by_id: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
        let mut versions: HashMap<(String, String, i64), HashSet<String>> = HashMap::new();
        for r in &records {
            let v: serde_json::Value =
                serde_json::from_slice(&r.payload).context("an analytics record is not JSON")?;
            let id = v["update_id"]
                .as_str()
                .context("analytics record without update_id")?
                .to_owned();
            let key = (
                v["message_id"].as_str().unwrap_or_default().to_owned(),
                v["recipient"].as_str().unwrap_or_default().to_owned(),
                v["version"].as_i64().unwrap_or(-1),
            );
            versions.entry(key).or_default().insert(id.clone());
            by_id.entry(id).or_default().push(v);
        }
        let conflicting_ids: Vec<String> = by_id
            .iter()
            .filter(|(_, copies)| copies.iter().any(|c| c != &copies[0]))
            .map(|(id, _)| id.clone())
            .collect();
        let conflicting_versions = versions.values().filter(|ids| ids.len() > 1).count();
        Ok(Analytics {
            records: records.len(),
            distinct: by_id.len(),
            duplicates: records.len() - by_id.len(),
            outbox_rows: outbox as usize,
            delivery_events: events,
            conflicting_ids,
            conflicting_versions,
        })
    }

    /// Stops everything and removes the schema and Redis keys (the logs stay).
    pub async fn finish(mut self) {
        for s in self.services.values_mut() {
            s.terminate(Duration::from_secs(5));
        }
        if let Ok(pool) = self.pool().await {
            // The test's schema and those `rebuild` made beside it.
            let schemas: Vec<String> = sqlx::query_scalar(
                "SELECT nspname::text FROM pg_namespace WHERE nspname = $1 OR nspname LIKE $1 || '\\_%'",
            )
            .bind(&self.schema)
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            for schema in schemas {
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .execute(&pool)
                    .await;
            }
            pool.close().await;
        }
        let _ = delete_redis_prefix(&self.redis_url, &format!("e2e:{}:", self.short())).await;
        // The reconciler's budget keys start with their hash tag's brace:
        // `{e2e:…:reconcile:<key_id>}:reads`.
        let _ = delete_redis_prefix(&self.redis_url, &format!("{{e2e:{}:", self.short())).await;
        self.finished = true;
    }

    fn short(&self) -> &str {
        self.id.rsplit('-').next().unwrap_or(&self.id)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for s in self.services.values_mut() {
            s.kill9();
        }
        if !self.finished || std::thread::panicking() {
            eprintln!("e2e: logs of {}: {}", self.id, self.logs.display());
            let tansu = std::fs::read_to_string(self.logs.join("tansu.log")).unwrap_or_default();
            if let Some(line) = tansu.lines().find(|l| l.contains("panicked at")) {
                eprintln!(
                    "e2e: the broker's storage panicked (every later request fails): {line}; see {}",
                    self.logs.join("tansu.log").display()
                );
            }
        }
    }
}

async fn delete_redis_prefix(url: &str, prefix: &str) -> anyhow::Result<usize> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let n: usize = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// What the analytics topic held.
#[derive(Debug, Clone)]
pub struct Analytics {
    pub records: usize,
    pub distinct: usize,
    /// Extra copies of an `update_id` (allowed: at-least-once).
    pub duplicates: usize,
    pub outbox_rows: usize,
    pub delivery_events: i64,
    /// `update_id`s whose copies differ (never allowed).
    pub conflicting_ids: Vec<String>,
    /// (message, recipient, version) carried by more than one `update_id`.
    pub conflicting_versions: usize,
}

impl Analytics {
    /// Asserts what a subscriber relies on.
    pub fn assert_clean(&self) {
        eprintln!("e2e: analytics {self:?}");
        assert!(
            self.conflicting_ids.is_empty(),
            "different records for one update_id: {:?}",
            &self.conflicting_ids[..self.conflicting_ids.len().min(10)]
        );
        assert_eq!(
            self.conflicting_versions, 0,
            "a recipient version carried by two update_ids"
        );
        assert_eq!(
            self.distinct, self.outbox_rows,
            "every outbox row reached the analytics topic exactly as one update_id"
        );
    }
}

// ---------------------------------------------------------------------------
// The gateway side
// ---------------------------------------------------------------------------

/// The simulator's delivery settings for this pipeline's ingest.
pub fn delivery(target: &str, source: &str) -> DeliveryConfig {
    DeliveryConfig {
        target: target.to_owned(),
        source: source.to_owned(),
        basic_auth: Some((USERNAME.to_owned(), PASSWORD.to_owned())),
        time_scale: 0.01,
        concurrency: 32,
        ..DeliveryConfig::default()
    }
}

/// The read API key every state replica of a test accepts, for every source.
pub const READ_KEY: &str = "dlrk_e2e-read-key";

/// `api.keys` accepting [`READ_KEY`], as an environment value.
fn read_keys_toml() -> String {
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(READ_KEY.as_bytes()));
    format!("[{{id=\"e2e\",sha256=\"{hash}\",sources=[\"*\"]}}]")
}

/// Verifies `truth` against the read API, polling for up to `wait`, and
/// asserts 100 % matching. Returns the report.
pub async fn verify_all(truth: &Truth, api: &str, wait: Duration) -> VerifyReport {
    let started = Instant::now();
    let report = dlrflow_sim::verify_with(
        truth,
        api,
        &VerifyOptions {
            wait,
            poll_interval: Duration::from_millis(500),
            concurrency: 16,
            api_key: Some(READ_KEY.to_owned()),
            ..VerifyOptions::default()
        },
    )
    .await
    .expect("verify ran");
    let c = report.counts();
    eprintln!(
        "e2e: verify after {:.1}s: {} recipients, matching {}, wrong {}, missing {}",
        started.elapsed().as_secs_f64(),
        truth.recipients.len(),
        c.matching,
        c.wrong,
        c.missing
    );
    assert!(report.is_ok(), "verify failed:\n{}", report.table(30));
    assert_eq!(
        c.matching,
        truth.recipients.len(),
        "every recipient matches"
    );
    report
}

/// The reads of `reads` (200 answers) that a message did not need: every
/// recipient of it in `truth` had its terminal event in the raw topic
/// (`received`, see [`Pipeline::terminal_received`]) at least `slack`
/// before the read — the answer was waiting in Kafka. `slack` is how far
/// behind dlrflow-state's progress report may be at the read.
pub fn reads_not_needed(
    reads: &[ReadRecord],
    truth: &Truth,
    received: &HashMap<(String, String), chrono::DateTime<chrono::Utc>>,
    slack: Duration,
) -> Vec<String> {
    let slack = chrono::Duration::from_std(slack).unwrap_or_default();
    let mut recipients: HashMap<&str, Vec<&str>> = HashMap::new();
    for r in &truth.recipients {
        recipients
            .entry(r.message_id.as_str())
            .or_default()
            .push(r.recipient.as_str());
    }
    reads
        .iter()
        .filter(|r| r.status == 200)
        .filter(|r| {
            recipients.get(r.message_id.as_str()).is_some_and(|rs| {
                rs.iter().all(|p| {
                    received
                        .get(&(r.message_id.clone(), (*p).to_owned()))
                        .is_some_and(|at| *at + slack <= r.at)
                })
            })
        })
        .map(|r| format!("{} at {}", r.message_id, r.at))
        .collect()
}

/// The most reads (any status) inside any sliding `window` of the read log.
pub fn max_reads_in_window(reads: &[ReadRecord], window: Duration) -> usize {
    let mut at: Vec<_> = reads.iter().map(|r| r.at).collect();
    at.sort();
    let w = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..at.len() {
        while at[hi] - at[lo] >= w {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// Runs `f` and prints how long it took (the runtime each test reports).
pub fn timed(name: &str) -> Timer {
    Timer {
        name: name.to_owned(),
        started: Instant::now(),
    }
}

pub struct Timer {
    name: String,
    started: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        eprintln!(
            "e2e: {} took {:.1}s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// A round-robin TCP balancer in front of several ingest replicas, as a
/// load balancer would be: each new connection goes to the next backend
/// that accepts it (a dead one is skipped). Stops with the test.
pub struct RoundRobin {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RoundRobin {
    /// Listens on a free 127.0.0.1 port for `backends` (`host:port`).
    pub async fn start(backends: Vec<String>) -> anyhow::Result<RoundRobin> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let backends = std::sync::Arc::new(backends);
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let backends = backends.clone();
                let first = next;
                next = next.wrapping_add(1);
                tokio::spawn(async move {
                    for i in 0..backends.len() {
                        let b = &backends[(first + i) % backends.len()];
                        let connect = tokio::net::TcpStream::connect(b.as_str());
                        if let Ok(Ok(mut upstream)) =
                            tokio::time::timeout(Duration::from_secs(1), connect).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(RoundRobin { addr, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.task.abort();
    }
}
