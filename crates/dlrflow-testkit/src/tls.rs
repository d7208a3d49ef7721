//! Certificates for tests: a private certificate authority that issues
//! server certificates for `localhost` and `127.0.0.1`, written as PEM files
//! the way an operator would hand them to a service or a backend.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A test certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate and its key, as PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    /// A new authority named `name` (its own key: certificates of two
    /// authorities never verify against each other).
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("dlrflow test CA {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        Self { issuer }
    }

    /// The authority's certificate (what a client trusts).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A client that trusts this authority only (rustls; HTTP/2 when the
    /// server offers it, unless `http1_only`), with a 5 s timeout.
    pub fn client(&self, http1_only: bool) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.cert_pem().as_bytes()).expect("CA PEM");
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(std::time::Duration::from_secs(5));
        if http1_only {
            b = b.http1_only();
        }
        b.build().expect("a TLS client")
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn issue(&self) -> Issued {
        self.issue_for(&["localhost", "127.0.0.1"])
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn issue_for(&self, names: &[&str]) -> Issued {
        self.issue_with(names, vec![ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// A certificate for `localhost` and `127.0.0.1` that is a server's and
    /// a client's too: the nodes of a TLS Redis Cluster present theirs to
    /// each other on the cluster bus, where the peer verifies it as a
    /// client's.
    pub fn issue_peer(&self) -> Issued {
        self.issue_with(
            &["localhost", "127.0.0.1"],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn issue_with(&self, names: &[&str], usages: Vec<ExtendedKeyUsagePurpose>) -> Issued {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("valid names");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes the authority's certificate as `ca.pem` in `dir`.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        write(&path, &self.cert_pem());
        path
    }
}

/// Where [`Issued::write`] put the files.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// `http.tls` for a listener serving these files (the default reload
    /// check).
    pub fn settings(&self) -> dlrflow_runtime::listener::TlsSettings {
        serde_json::from_value(serde_json::json!({
            "cert_file": self.cert,
            "key_file": self.key,
        }))
        .expect("TLS settings")
    }
}

impl Issued {
    /// Writes `cert.pem` and `key.pem` (mode 0600) in `dir`, replacing what
    /// is there in one rename each, as a secret mount would.
    pub fn write(&self, dir: &Path) -> TlsFiles {
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        write(&files.key, &self.key_pem);
        write(&files.cert, &self.cert_pem);
        files
    }
}

fn write(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("writing a PEM file");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::rename(&tmp, path).expect("renaming a PEM file");
}

/// A TLS front for a service that speaks plain TCP (a Tansu broker speaks no
/// TLS): takes TLS connections with `cert` on its own port and forwards the
/// bytes to `upstream`. Runs on a thread of its own until dropped.
pub struct TlsProxy {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsProxy {
    /// Serves on `listener` (bound by the caller, so its port can be
    /// advertised before the proxy starts).
    pub fn start(listener: std::net::TcpListener, cert: &Issued, upstream: u16) -> TlsProxy {
        use rustls::pki_types::pem::PemObject;
        let port = listener.local_addr().expect("bound").port();
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate PEM");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
            .expect("key PEM");
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        listener.set_nonblocking(true).expect("nonblocking");
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let (client, _) = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok(a) => a,
                            Err(_) => continue,
                        },
                    };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(client).await else {
                            return;
                        };
                        let Ok(mut plain) =
                            tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                        else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    });
                }
            });
        });
        TlsProxy {
            port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
