//! Helpers for tests that run against a real Kafka-protocol broker: unique
//! names, topic creation and reading a topic back. Used by the integration
//! tests of every crate; never by production code paths.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

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
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("admin client")?;
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
    let brokers = brokers.to_owned();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match crate::kafka::topic_ready(consumer.client(), &name, Duration::from_secs(2)) {
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

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Reads every partition of `topic` from the beginning until `expected`
/// records arrived or `timeout` passed, then keeps reading for `settle` to
/// catch records beyond `expected`. Returns what it got.
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> anyhow::Result<Vec<Record>> {
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique_name("reader"))
            .set("enable.auto.commit", "false")
            .create()?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
        let partitions = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p as i32, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        let mut settle_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if out.len() >= expected && settle_until.is_none() {
                settle_until = Some(now + settle);
            }
            if settle_until.is_some_and(|s| now >= s) || now >= deadline {
                break;
            }
            if let Some(msg) = consumer.poll(Duration::from_millis(100)) {
                let msg = msg?;
                let headers = msg
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    partition: msg.partition(),
                    offset: msg.offset(),
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
        }
        Ok(out)
    })
    .await?
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Tansu broker of a test's own: own port, own SQLite file in a temporary
/// directory, so a test may kill, freeze or restart it without disturbing any
/// other test. Killed on drop.
pub struct PrivateBroker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateBroker {
    /// Starts a broker on a free port and waits until it listens.
    pub fn start() -> anyhow::Result<PrivateBroker> {
        let dir = tempfile::tempdir().context("broker data directory")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut broker = PrivateBroker {
            dir,
            port,
            child: None,
        };
        broker.restart()?;
        Ok(broker)
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker again on the same port and data (after `kill9`).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = std::process::Command::new(tansu_binary()?)
            .current_dir(self.dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("tansu.log"))?)
            .spawn()
            .context("starting tansu")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "tansu did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        index_tansu_headers(&self.dir.path().join("tansu.db"));
        Ok(())
    }

    /// SIGKILL, and wait for the process to go.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a broker that stops answering
    /// without closing its connections.
    pub fn freeze(&self, frozen: bool) -> anyhow::Result<()> {
        let pid = self.child.as_ref().context("broker not running")?.id();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
        Ok(())
    }

    /// The broker's own log (panics show up here).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.freeze(false);
        self.kill9();
    }
}

/// The Tansu binary: `DLRFLOW_TANSU`, `tansu` on `PATH`, or `~/.cargo/bin/tansu`
/// (where `deploy/local/stack.sh up` installs it).
pub fn tansu_binary() -> anyhow::Result<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    });
    [
        std::env::var_os("DLRFLOW_TANSU").map(std::path::PathBuf::from),
        on_path,
        std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo/bin/tansu")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file())
    .context("the tansu binary was not found (deploy/local/stack.sh up installs it)")
}

/// Adds the index Tansu 0.6.0's SQLite schema lacks: its `header` table has
/// none, so fetching each record's headers scans every header row of every
/// topic, and consuming records with headers slows down as the database grows
/// (measured: of 20,000 records with 4 headers each, 5,000 arrived in 40 s;
/// with the index all 20,000 took 1.3 s). Idempotent; needs the `sqlite3`
/// command (`deploy/local/stack.sh up` installs it) and only warns without it.
pub fn index_tansu_headers(db: &std::path::Path) {
    const SQL: &str =
        "create index if not exists dlrflow_header_record on header (topition, offset_id);";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::process::Command::new("sqlite3")
            .arg(db)
            .arg(SQL)
            .output()
        {
            Ok(out) if out.status.success() => return,
            // The broker creates its schema just after it starts listening.
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(out) => {
                eprintln!(
                    "warning: could not index Tansu's header table: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                return;
            }
            Err(e) => {
                eprintln!("warning: sqlite3 not available ({e}); Tansu's header fetches stay slow");
                return;
            }
        }
    }
}

/// A private Redis on a free port of its own, in its own directory, without
/// persistence: stopped and started again by the test (the shared Redis is
/// never touched). Killed when dropped.
pub struct PrivateRedis {
    pub port: u16,
    dir: std::path::PathBuf,
    password: Option<String>,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub fn start(password: Option<&str>) -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique_name("dlrflow-redis"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = PrivateRedis {
            port,
            dir,
            password: password.map(str::to_owned),
            child: None,
        };
        r.up();
        r
    }

    /// `redis://[:password@]127.0.0.1:port`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Starts it (again, empty, on the same port).
    pub fn up(&mut self) {
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        self.child = Some(cmd.spawn().expect("redis-server is installed"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "private redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it: every connection drops and its data is gone.
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
