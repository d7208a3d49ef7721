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
