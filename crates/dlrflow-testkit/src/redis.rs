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
