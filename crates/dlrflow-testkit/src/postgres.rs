//! A PostgreSQL server of a test's own, for tests that restart PostgreSQL.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context};

use crate::free_port;

/// A PostgreSQL server of its own (initdb into a temporary directory, trust
/// auth, 127.0.0.1 only), for tests that restart PostgreSQL.
pub struct PrivatePostgres {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    log: PathBuf,
    running: bool,
    tls: bool,
}

fn as_postgres(program: &Path) -> Command {
    // Running as root: PostgreSQL refuses to run as root, so run as `postgres`.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut bins: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("/usr/lib/postgresql (install postgresql)")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("pg_ctl").is_file())
        .collect();
    bins.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    bins.pop()
        .context("no PostgreSQL under /usr/lib/postgresql/*/bin")
}

impl PrivatePostgres {
    pub fn new(id: &str, log: PathBuf) -> anyhow::Result<Self> {
        Self::start(id, log, None)
    }

    /// A server that takes TLS connections only (`hostssl` in pg_hba.conf;
    /// a plain connection is refused), with `cert` as its certificate.
    pub fn with_tls(id: &str, log: PathBuf, cert: &crate::tls::Issued) -> anyhow::Result<Self> {
        Self::start(id, log, Some(cert))
    }

    fn start(id: &str, log: PathBuf, tls: Option<&crate::tls::Issued>) -> anyhow::Result<Self> {
        let bin = pg_bin()?;
        let root = std::env::temp_dir().join(format!("dlrflow-e2e-pg-{id}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        File::create(&log)?;
        let chown = |p: &Path| {
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(p)
                .status()
        };
        // Harmless when not root and already the owner.
        let _ = chown(&root);
        let _ = chown(&log);
        let data = root.join("data");
        let out = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .context("initdb")?;
        ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(cert) = tls {
            use std::os::unix::fs::PermissionsExt;
            for (name, text) in [
                ("server.crt", &cert.cert_pem),
                ("server.key", &cert.key_pem),
            ] {
                let path = data.join(name);
                std::fs::write(&path, text)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                let _ = chown(&path);
            }
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )?;
        }
        let mut pg = PrivatePostgres {
            bin,
            root,
            port: free_port(),
            log,
            running: false,
            tls: tls.is_some(),
        };
        pg.ctl(&["start"])?;
        pg.running = true;
        Ok(pg)
    }

    fn ctl(&self, action: &[&str]) -> anyhow::Result<()> {
        let mut opts = format!(
            "-p {} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port
        );
        if self.tls {
            opts.push_str(" -c ssl=on");
        }
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.root.join("data"))
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "-o", &opts])
            .args(action)
            .output()
            .context("pg_ctl")?;
        ensure!(
            out.status.success(),
            "pg_ctl {action:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m fast`: every connection is cut.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.ctl(&["restart", "-m", "fast"])
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.ctl(&["stop", "-m", "immediate"]);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
