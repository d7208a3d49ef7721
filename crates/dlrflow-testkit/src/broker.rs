//! A private Tansu broker per test, and the Tansu binary the local stack uses.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A Tansu broker of a test's own: own port, own SQLite file, so a test may
/// kill, freeze or restart it without disturbing any other test. Killed on
/// drop, and by a watchdog if the test process dies first.
pub struct PrivateBroker {
    /// The SQLite file's directory, removed with the broker.
    dir: tempfile::TempDir,
    log: PathBuf,
    port: u16,
    /// A TLS front the broker advertises instead of its own port.
    tls: Option<crate::tls::TlsProxy>,
    /// The port clients are told to use (`port`, or the TLS front's).
    advertised: u16,
    child: Option<std::process::Child>,
}

impl PrivateBroker {
    /// Starts a broker in a temporary directory on a free port and waits
    /// until it listens.
    pub fn start() -> anyhow::Result<PrivateBroker> {
        Self::start_logging_to(None)
    }

    /// The same, appending the broker's output to `log` (kept after the
    /// test, e.g. beside an e2e run's service logs) instead of a file in the
    /// temporary directory.
    pub fn start_logging_to(log: Option<PathBuf>) -> anyhow::Result<PrivateBroker> {
        Self::launch(log, None)
    }

    /// A broker reached over TLS only, the way a managed Kafka is: Tansu
    /// speaks no TLS, so a TLS front with `cert` forwards to it, and the
    /// broker advertises the front's address in its metadata. `brokers()`
    /// is the front; every client speaks TLS, since the metadata names
    /// only the front.
    pub fn with_tls(cert: &crate::tls::Issued) -> anyhow::Result<PrivateBroker> {
        let front = std::net::TcpListener::bind("127.0.0.1:0")?;
        let advertised = front.local_addr()?.port();
        let mut broker = Self::launch(None, Some(advertised))?;
        broker.tls = Some(crate::tls::TlsProxy::start(front, cert, broker.port));
        Ok(broker)
    }

    /// Starts Tansu on a free port, advertising `advertised` (default its
    /// own port).
    fn launch(log: Option<PathBuf>, advertised: Option<u16>) -> anyhow::Result<PrivateBroker> {
        let dir = tempfile::tempdir().context("broker data directory")?;
        let log = log.unwrap_or_else(|| dir.path().join("tansu.log"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut broker = PrivateBroker {
            dir,
            log,
            port,
            tls: None,
            advertised: advertised.unwrap_or(port),
            child: None,
        };
        broker.restart()?;
        Ok(broker)
    }

    fn data(&self) -> &Path {
        self.dir.path()
    }

    /// Where clients connect (the TLS front of [`PrivateBroker::with_tls`]).
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    /// Starts the broker again on the same port and data (after `kill9`).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "the private broker already runs");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        writeln!(log, "=== testkit: tansu start on port {}", self.port)?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        let child = tansu_command_advertising(&url, &advertised)?
            .current_dir(self.data())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting tansu")?;
        crate::kill_with_this_process(child.id());
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "tansu did not listen on {} within 30 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        index_tansu_headers(&self.data().join("tansu.db"));
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
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.freeze(false);
        self.kill9();
    }
}

/// The Tansu command line dlrflow runs a broker with (the same as
/// `deploy/local/stack.sh`): SQLite storage in the working directory, the
/// listener advertised as itself.
pub fn tansu_command(listener_url: &str) -> anyhow::Result<std::process::Command> {
    tansu_command_advertising(listener_url, listener_url)
}

/// [`tansu_command`] with another address advertised to clients (a TLS
/// front, a proxy).
pub fn tansu_command_advertising(
    listener_url: &str,
    advertised_url: &str,
) -> anyhow::Result<std::process::Command> {
    let mut cmd = std::process::Command::new(tansu_binary()?);
    cmd.args([
        "broker",
        "--listener-url",
        listener_url,
        "--advertised-listener-url",
        advertised_url,
        "--storage-engine",
        "sqlite://tansu.db",
    ]);
    Ok(cmd)
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
