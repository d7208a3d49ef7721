//! Redis for tests: the shared one's address, and private instances a test
//! may stop and start.

use std::time::{Duration, Instant};

use crate::unique_name;

/// The shared Redis the tests use: `DLRFLOW_TEST_REDIS_URL`, default the
/// local stack's `redis://127.0.0.1:6379`.
pub fn test_redis_url() -> String {
    std::env::var("DLRFLOW_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A private Redis on a free port of its own, in its own directory, without
/// persistence: stopped and started again by the test (the shared Redis is
/// never touched). Killed when dropped.
pub struct PrivateRedis {
    pub port: u16,
    dir: std::path::PathBuf,
    password: Option<String>,
    /// The certificate and key files of a TLS-only server.
    tls: Option<crate::tls::TlsFiles>,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub fn start(password: Option<&str>) -> PrivateRedis {
        Self::start_with(password, None)
    }

    /// A server that speaks TLS only (`--port 0 --tls-port`), with `cert`
    /// as its certificate; clients need no certificate of their own.
    pub fn with_tls(cert: &crate::tls::Issued) -> PrivateRedis {
        Self::start_with(None, Some(cert))
    }

    fn start_with(password: Option<&str>, tls: Option<&crate::tls::Issued>) -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique_name("dlrflow-redis"));
        std::fs::create_dir_all(&dir).unwrap();
        let tls = tls.map(|cert| cert.write(&dir));
        let mut r = PrivateRedis {
            port,
            dir,
            password: password.map(str::to_owned),
            tls,
            child: None,
        };
        r.up();
        r
    }

    /// `redis://[:password@]127.0.0.1:port` (`rediss://` for TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.password {
            Some(pw) => format!("{scheme}://:{pw}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// Starts it (again, empty, on the same port).
    pub fn up(&mut self) {
        let mut cmd = std::process::Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some(files) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&files.cert)
                .arg("--tls-key-file")
                .arg(&files.key)
                .args(["--tls-auth-clients", "no"]),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        let child = cmd.spawn().expect("redis-server is installed");
        crate::kill_with_this_process(child.id());
        self.child = Some(child);
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

/// A private Redis Cluster of `masters` primaries (no replicas), each a
/// `redis-server` on a free 127.0.0.1 port with its cluster bus on another
/// (`--cluster-port`), in one directory of its own, without persistence.
/// [`RedisCluster::start`] returns once every node says `cluster_state:ok`.
/// Every process is killed when it is dropped (or when the test process
/// dies).
pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
    /// The CA file clients need with TLS.
    ca_file: Option<std::path::PathBuf>,
    children: Vec<std::process::Child>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        Self::start_with(masters, None)
    }

    /// A cluster that speaks TLS only, clients and cluster bus alike, with a
    /// certificate of `ca` for `localhost` and `127.0.0.1` (the address the
    /// nodes announce) that is also a client's (the bus verifies the peers');
    /// clients need no certificate of their own.
    pub fn with_tls(masters: usize, ca: &crate::tls::TestCa) -> RedisCluster {
        Self::start_with(masters, Some(ca))
    }

    fn start_with(masters: usize, ca: Option<&crate::tls::TestCa>) -> RedisCluster {
        assert!(masters >= 1, "a cluster needs a primary");
        let dir = std::env::temp_dir().join(unique_name("dlrflow-redis-cluster"));
        std::fs::create_dir_all(&dir).unwrap();
        let tls = ca.map(|ca| (ca.issue_peer().write(&dir), ca.write_ca(&dir)));
        let mut cluster = RedisCluster {
            ports: Vec::new(),
            dir,
            ca_file: tls.as_ref().map(|(_, ca)| ca.clone()),
            children: Vec::new(),
        };
        for _ in 0..masters {
            let (port, bus) = (crate::free_port(), crate::free_port());
            let mut cmd = std::process::Command::new("redis-server");
            match &tls {
                None => cmd.args(["--port", &port.to_string()]),
                Some((files, ca)) => cmd
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cluster", "yes", "--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(&files.cert)
                    .arg("--tls-key-file")
                    .arg(&files.key)
                    .arg("--tls-ca-cert-file")
                    .arg(ca),
            };
            let log = std::fs::File::create(cluster.dir.join(format!("redis-{port}.log")))
                .expect("a log file");
            cmd.args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-port", &bus.to_string()])
                .arg("--cluster-config-file")
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&cluster.dir)
                .stdout(log.try_clone().expect("a log file"))
                .stderr(log);
            let child = cmd.spawn().expect("redis-server is installed");
            crate::kill_with_this_process(child.id());
            cluster.children.push(child);
            cluster.ports.push(port);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for &port in &cluster.ports {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                cluster.fail_after(deadline, &format!("redis-server on {port} did not start"));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        // `--cluster create` waits for the nodes to meet on the bus, without
        // a limit of its own: it gets until the deadline.
        let out_file = cluster.dir.join("cluster-create.log");
        let out = std::fs::File::create(&out_file).expect("a log file");
        let mut create = cluster
            .cli()
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(out.try_clone().expect("a log file"))
            .stderr(out)
            .spawn()
            .expect("redis-cli is installed");
        let status = loop {
            if let Some(status) = create.try_wait().expect("waiting for redis-cli") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = create.kill();
                let _ = create.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !status.is_some_and(|s| s.success()) {
            let output = std::fs::read_to_string(&out_file).unwrap_or_default();
            cluster.fail_after(
                Instant::now(),
                &format!("redis-cli --cluster create ({status:?}): {output}"),
            );
        }
        for port in cluster.ports.clone() {
            loop {
                let info = cluster.info(port);
                if info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    break;
                }
                cluster.fail_after(
                    deadline,
                    &format!("node {port} never said cluster_state:ok: {info}"),
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// `redis-cli`, with the TLS options of this cluster.
    fn cli(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("redis-cli");
        if let Some(ca) = &self.ca_file {
            cmd.arg("--tls").arg("--cacert").arg(ca);
        }
        cmd
    }

    /// `CLUSTER INFO` of the node on `port` (empty when it does not answer).
    pub fn info(&self, port: u16) -> String {
        let out = self
            .cli()
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "cluster",
                "info",
            ])
            .output()
            .expect("redis-cli is installed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Panics with `what` and every node's log once `deadline` is past.
    fn fail_after(&self, deadline: Instant, what: &str) {
        if Instant::now() < deadline {
            return;
        }
        let mut logs = String::new();
        for port in &self.ports {
            let log = std::fs::read_to_string(self.dir.join(format!("redis-{port}.log")))
                .unwrap_or_default();
            logs.push_str(&format!("\n--- redis-{port}.log\n{log}"));
        }
        panic!("{what}{logs}");
    }

    /// The first node: `redis://127.0.0.1:port` (`rediss://` with TLS), what
    /// `redis.url` names with `redis.cluster = true`.
    pub fn url(&self) -> String {
        self.node_urls().swap_remove(0)
    }

    /// Every node's URL, in the order of [`RedisCluster::ports`].
    pub fn node_urls(&self) -> Vec<String> {
        let scheme = if self.ca_file.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.ports
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{p}"))
            .collect()
    }

    /// Kills the node on `ports[i]` (SIGKILL): its slots have no primary
    /// any more (the cluster has no replicas).
    pub fn kill_node(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// The CA certificate file clients of a TLS cluster verify it with.
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.ca_file.as_deref()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
