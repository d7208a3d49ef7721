//! The one service skeleton every dlrflow service runs in.
//!
//! A [`Service`] owns the listener, the operational routes, the background
//! tasks and the shutdown sequence; a service's `lib.rs` only builds its own
//! parts and hands them over:
//!
//! * listeners: the public one (`http.listen`) serves the service's own
//!   routes; the admin one (`http.admin_listen`, by default on `127.0.0.1`)
//!   serves `/healthz`, `/readyz` and `/metrics`, never the public port;
//! * readiness: one JSON shape everywhere (see [`Readiness`]), answered within
//!   [`READY_TIMEOUT`] whatever the checks do, and `not ready` from the moment
//!   shutdown begins;
//! * tasks: supervised ([`Tasks`]); one that ends before shutdown stops the
//!   others and makes [`Service::run`] return its error;
//! * shutdown: stop accepting, let in-flight requests and tasks finish, then
//!   flush the Kafka producers, all within `http.shutdown_grace_ms`; a flush
//!   that does not finish is logged.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use rdkafka::producer::{FutureProducer, Producer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::listener::{Serving, TlsReloader};
use crate::settings::HttpSettings;
use crate::supervise::Tasks;

/// `/readyz` answers within this long even if a check hangs.
pub const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one dependency probe ([`probe`]) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The body of every `/readyz` answer:
///
/// ```json
/// {"status": "ready" | "not ready", "problems": [...], "degraded": [...], ...details}
/// ```
///
/// `problems` make the service not ready (503); `degraded` are reported but
/// keep it ready (200), e.g. a cache that is down; `details` are the
/// service's own fields (partitions, budget), flattened into the object.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Readiness {
    pub problems: Vec<String>,
    pub degraded: Vec<String>,
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl Readiness {
    pub fn problem(&mut self, p: impl Into<String>) {
        self.problems.push(p.into());
    }

    pub fn degraded(&mut self, d: impl Into<String>) {
        self.degraded.push(d.into());
    }

    pub fn detail(&mut self, key: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        self.details.insert(key.to_owned(), value);
    }

    /// Records `result` of a dependency check: its error is a problem.
    pub fn check<T>(&mut self, result: Result<T, String>) -> Option<T> {
        result.map_err(|e| self.problem(e)).ok()
    }

    fn into_response(self) -> Response {
        let ready = self.problems.is_empty();
        let mut body = serde_json::to_value(&self).unwrap_or_default();
        body["status"] = if ready { "ready" } else { "not ready" }.into();
        let code = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, Json(body)).into_response()
    }
}

/// A service's readiness checks, run for every `/readyz` request.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Readiness> + Send + Sync>;

/// Makes a [`ReadyCheck`] of an async function.
pub fn ready_check<F, Fut>(f: F) -> ReadyCheck
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Readiness> + Send + 'static,
{
    Arc::new(move || Box::pin(f()))
}

/// Runs one dependency probe within [`PROBE_TIMEOUT`]: `Err("{what}: {error}")`
/// or `Err("{what}: no answer within 2 s")`.
pub async fn probe<T, E, F>(what: &str, fut: F) -> Result<T, String>
where
    E: std::fmt::Display,
    F: Future<Output = Result<T, E>>,
{
    match tokio::time::timeout(PROBE_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer within {} s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

/// Whether the service is stopping; handlers refuse new work once it is.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    stopping: Arc<AtomicBool>,
}

impl Lifecycle {
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// A bound service waiting for its routes, readiness and tasks.
pub struct Service {
    name: &'static str,
    public: Option<(SocketAddr, TcpListener)>,
    admin: (SocketAddr, TcpListener),
    public_serving: Serving,
    admin_serving: Serving,
    grace: Duration,
    lifecycle: Lifecycle,
    work: CancellationToken,
    tasks: Tasks,
    producers: Vec<FutureProducer>,
    admin_routes: Option<Router>,
}

impl Service {
    /// Installs the metrics recorder (so counts made before the first scrape
    /// are kept) and binds `http.listen` (if set) and `http.admin_listen`.
    pub async fn bind(name: &'static str, http: &HttpSettings) -> anyhow::Result<Service> {
        let _ = crate::telemetry::metrics_handle();
        let public = match http.listen {
            Some(addr) => Some(
                bound(TcpListener::bind(addr).await)
                    .with_context(|| format!("binding http.listen = {addr}"))?,
            ),
            None => None,
        };
        let admin = bound(TcpListener::bind(http.admin_listen).await)
            .with_context(|| format!("binding http.admin_listen = {}", http.admin_listen))?;
        let tls = match &http.tls {
            Some(tls) => Some(TlsReloader::load(tls.clone(), "http.tls")?),
            None => None,
        };
        let serving = |name, tls| Serving {
            name,
            max_connections: http.max_connections,
            header_read_timeout: http.header_read_timeout,
            max_header_bytes: http.max_header_bytes,
            idle_timeout: http.idle_timeout,
            tls,
        };
        let work = CancellationToken::new();
        Ok(Service {
            name,
            public,
            admin,
            public_serving: serving("public", tls),
            admin_serving: serving("admin", None),
            grace: http.shutdown_grace,
            lifecycle: Lifecycle::default(),
            tasks: Tasks::new(work.clone()),
            work,
            producers: Vec::new(),
            admin_routes: None,
        })
    }

    /// The public listener's address, if the service has one.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.public.as_ref().map(|(addr, _)| *addr)
    }

    /// The admin listener's address (`/healthz`, `/readyz`, `/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.0
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle.clone()
    }

    /// Cancelled when the service stops, for whatever reason (the shutdown
    /// signal given to [`Service::run`], a task that died): background tasks
    /// run until it is.
    pub fn work(&self) -> CancellationToken {
        self.work.clone()
    }

    /// Passes every task error through `scrub` before it is logged or
    /// returned (e.g. a redactor of the service's secrets).
    pub fn with_scrub(mut self, scrub: fn(&str) -> String) -> Self {
        self.tasks = self.tasks.with_scrub(scrub);
        self
    }

    /// Runs `fut` as the supervised task `name` until [`Service::work`] is
    /// cancelled; ending before is a failure that stops the service.
    pub fn spawn<F>(&mut self, name: impl Into<String>, fut: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.spawn(name, fut);
    }

    /// Serves `routes` on the admin listener beside the operational ones
    /// (e.g. an operator page): never on the public listener.
    pub fn with_admin_routes(mut self, routes: Router) -> Self {
        self.admin_routes = Some(routes);
        self
    }

    /// Flushes `producer` at the end of the shutdown, within the grace.
    pub fn flush_on_stop(&mut self, producer: FutureProducer) {
        self.producers.push(producer);
    }

    /// Serves `routes` on the public listener and the operational routes on
    /// the admin listener, and runs the tasks, until `shutdown` or the first
    /// task failure; then drains within the grace and flushes the producers.
    /// Returns the first task failure. A service without a public listener
    /// serves `routes` (if any) on the admin listener.
    pub async fn run(
        mut self,
        routes: Router,
        ready: ReadyCheck,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let link = {
            let work = self.work.clone();
            let lifecycle = self.lifecycle.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = shutdown.cancelled() => work.cancel(),
                    () = work.cancelled() => {}
                }
                // From the first moment of stopping, `/readyz` says so.
                lifecycle.stop();
            })
        };
        if let Some(tls) = self.public_serving.tls.clone() {
            let work = self.work.clone();
            self.tasks.spawn("tls reload", tls.watch(work));
        }
        let mut ops = ops_routes(ready, self.lifecycle.clone(), self.producers.clone());
        if let Some(extra) = self.admin_routes.take() {
            ops = ops.merge(extra);
        }
        let public_addr = self.public_addr();
        let (admin_addr, admin) = self.admin;
        match self.public {
            Some((_, listener)) => {
                serve(
                    &mut self.tasks,
                    &self.work,
                    listener,
                    routes,
                    self.public_serving,
                );
                serve(&mut self.tasks, &self.work, admin, ops, self.admin_serving);
            }
            None => {
                let all = routes.merge(ops);
                serve(&mut self.tasks, &self.work, admin, all, self.admin_serving);
            }
        }
        match public_addr {
            Some(addr) => {
                tracing::info!(service = self.name, %addr, admin = %admin_addr, "listening")
            }
            None => tracing::info!(service = self.name, admin = %admin_addr, "listening"),
        }
        let result = self.tasks.run(self.grace).await;
        self.lifecycle.stop();
        link.abort();
        for producer in self.producers {
            let grace = self.grace;
            let flushed = tokio::task::spawn_blocking(move || producer.flush(grace)).await;
            match flushed {
                Ok(Ok(())) => {}
                // Whatever was not acknowledged was not answered with 2xx
                // (ingest) or not committed (state): it is sent again.
                Ok(Err(e)) => tracing::warn!(error = %e, "producer not fully flushed at shutdown"),
                Err(e) => tracing::warn!(error = %e, "producer flush did not finish"),
            }
        }
        match &result {
            Ok(()) => tracing::info!(service = self.name, "stopped"),
            Err(e) => {
                tracing::error!(service = self.name, error = %format!("{e:#}"), "stopped after a failure")
            }
        }
        result
    }
}

/// A bound listener with its address.
fn bound(l: std::io::Result<TcpListener>) -> std::io::Result<(SocketAddr, TcpListener)> {
    let l = l?;
    Ok((l.local_addr()?, l))
}

/// Serves `routes` on `listener` as a supervised task until `work` is
/// cancelled.
fn serve(
    tasks: &mut Tasks,
    work: &CancellationToken,
    listener: TcpListener,
    routes: Router,
    serving: Serving,
) {
    let task = serving.name;
    let work = work.clone();
    tasks.spawn(task, async move {
        crate::listener::serve(listener, routes, serving, work)
            .await
            .with_context(|| format!("{task} listener"))
    });
}

/// `/healthz` (the process answers), `/readyz` (it can do its work) and
/// `/metrics` (Prometheus text).
///
/// Every scrape of `/metrics` first runs the readiness checks (within
/// [`READY_TIMEOUT`]) and sets `dlrflow_ready` (1 ready, 0 not), and reads
/// `dlrflow_kafka_producer_queue_messages` (records the service's producers
/// hold that the brokers have not acknowledged): an alert needs no probe of
/// its own to see a service that is up but not ready.
pub fn ops_routes(
    ready: ReadyCheck,
    lifecycle: Lifecycle,
    producers: Vec<FutureProducer>,
) -> Router {
    let checks = (ready.clone(), lifecycle.clone());
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/readyz",
            get(move || async move { readiness(&ready, &lifecycle).await.into_response() }),
        )
        .route(
            "/metrics",
            get(move || {
                let (ready, lifecycle) = checks.clone();
                let producers = producers.clone();
                async move {
                    let r = readiness(&ready, &lifecycle).await;
                    metrics::gauge!("dlrflow_ready").set(if r.problems.is_empty() {
                        1.0
                    } else {
                        0.0
                    });
                    if !producers.is_empty() {
                        let queued: i32 = producers.iter().map(|p| p.in_flight_count()).sum();
                        metrics::gauge!("dlrflow_kafka_producer_queue_messages")
                            .set(f64::from(queued));
                    }
                    crate::telemetry::metrics_endpoint().await
                }
            }),
        )
}

/// The service's readiness: `shutting down` once stopping, else its checks
/// within [`READY_TIMEOUT`].
async fn readiness(ready: &ReadyCheck, lifecycle: &Lifecycle) -> Readiness {
    let mut r = Readiness::default();
    if lifecycle.is_stopping() {
        r.problem("shutting down");
        return r;
    }
    match tokio::time::timeout(READY_TIMEOUT, ready()).await {
        Ok(r) => r,
        Err(_) => {
            r.problem(format!(
                "readiness checks did not answer within {} s",
                READY_TIMEOUT.as_secs()
            ));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
        let out = get_text(addr, path).await;
        let code = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
        // Chunked bodies: the JSON object is between the first '{' and the last '}'.
        let json = &body[body.find('{').unwrap()..=body.rfind('}').unwrap()];
        (code, serde_json::from_str(json).unwrap())
    }

    fn http() -> HttpSettings {
        serde_json::from_value(serde_json::json!({
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "shutdown_grace_ms": 2000,
        }))
        .unwrap()
    }

    async fn get_text(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// A scrape runs the readiness checks: `dlrflow_ready` follows them.
    #[tokio::test]
    async fn a_scrape_says_whether_the_service_is_ready() {
        let shutdown = CancellationToken::new();
        let svc = Service::bind("t", &http()).await.unwrap();
        let addr = svc.admin_addr();
        let broken = Arc::new(AtomicBool::new(true));
        let check = {
            let broken = broken.clone();
            ready_check(move || {
                let broken = broken.load(Ordering::SeqCst);
                async move {
                    let mut r = Readiness::default();
                    if broken {
                        r.problem("postgres: down");
                    }
                    r
                }
            })
        };
        let run = tokio::spawn(svc.run(Router::new(), check, shutdown.clone()));
        assert!(get_text(addr, "/metrics")
            .await
            .contains("\ndlrflow_ready 0\n"));
        broken.store(false, Ordering::SeqCst);
        assert!(get_text(addr, "/metrics")
            .await
            .contains("\ndlrflow_ready 1\n"));
        shutdown.cancel();
        run.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn readiness_has_one_shape_and_a_hanging_check_is_not_ready_in_time() {
        let shutdown = CancellationToken::new();
        let svc = Service::bind("t", &http()).await.unwrap();
        let addr = svc.admin_addr();
        let hang = Arc::new(AtomicBool::new(false));
        let check = {
            let hang = hang.clone();
            ready_check(move || {
                let hang = hang.load(Ordering::SeqCst);
                async move {
                    let mut r = Readiness::default();
                    r.detail("partitions", 3);
                    r.degraded("redis: down");
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    r
                }
            })
        };
        let run = tokio::spawn(svc.run(Router::new(), check, shutdown.clone()));
        let (code, body) = get_json(addr, "/readyz").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "ready");
        assert_eq!(body["partitions"], 3);
        assert_eq!(body["degraded"][0], "redis: down");
        assert_eq!(body["problems"], serde_json::json!([]));

        hang.store(true, Ordering::SeqCst);
        let (code, body) = get_json(addr, "/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["status"], "not ready");
        assert!(body["problems"][0]
            .as_str()
            .unwrap()
            .contains("did not answer"));

        shutdown.cancel();
        run.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_task_that_dies_stops_the_service_and_readiness_says_so_first() {
        let shutdown = CancellationToken::new();
        let mut svc = Service::bind("t", &http()).await.unwrap();
        let lifecycle = svc.lifecycle();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        svc.spawn("doomed", async move {
            let _ = rx.await;
            anyhow::bail!("boom")
        });
        let work = svc.work();
        let ready = ready_check(|| async { Readiness::default() });
        let run = tokio::spawn(svc.run(Router::new(), ready, shutdown.clone()));
        assert!(!lifecycle.is_stopping());
        tx.send(()).unwrap();
        let err = run.await.unwrap().unwrap_err();
        assert!(format!("{err:#}").contains("doomed"), "{err:#}");
        assert!(lifecycle.is_stopping());
        assert!(work.is_cancelled());
        assert!(
            !shutdown.is_cancelled(),
            "the service stops itself, not its caller's token"
        );
    }

    #[tokio::test]
    async fn operational_routes_are_only_on_the_admin_listener() {
        let shutdown = CancellationToken::new();
        let svc = Service::bind("t", &http()).await.unwrap();
        let (public, admin) = (svc.public_addr().unwrap(), svc.admin_addr());
        assert_ne!(public, admin);
        let routes = Router::new().route(
            "/own",
            get(|| async { Json(serde_json::json!({"own": true})) }),
        );
        let svc = svc.with_admin_routes(Router::new().route(
            "/operator",
            get(|| async { Json(serde_json::json!({"operator": true})) }),
        ));
        let ready = ready_check(|| async { Readiness::default() });
        let run = tokio::spawn(svc.run(routes, ready, shutdown.clone()));
        assert_eq!(get_json(public, "/own").await.0, 200);
        assert_eq!(get_json(admin, "/operator").await.0, 200);
        assert_eq!(
            status(public, "/operator").await,
            404,
            "admin routes on the public port"
        );
        assert_eq!(get_json(admin, "/readyz").await.0, 200);
        assert_eq!(get_json(admin, "/healthz").await.0, 200);
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(status(public, path).await, 404, "{path} on the public port");
        }
        assert_eq!(
            status(admin, "/own").await,
            404,
            "own routes on the admin port"
        );
        shutdown.cancel();
        run.await.unwrap().unwrap();

        // Without a public listener the service's routes go to the admin one.
        let mut settings = http();
        settings.listen = None;
        let svc = Service::bind("t", &settings).await.unwrap();
        assert_eq!(svc.public_addr(), None);
        let admin = svc.admin_addr();
        let routes = Router::new().route(
            "/own",
            get(|| async { Json(serde_json::json!({"own": true})) }),
        );
        let ready = ready_check(|| async { Readiness::default() });
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(svc.run(routes, ready, shutdown.clone()));
        assert_eq!(get_json(admin, "/own").await.0, 200);
        assert_eq!(get_json(admin, "/readyz").await.0, 200);
        shutdown.cancel();
        run.await.unwrap().unwrap();
    }

    #[test]
    fn listeners_are_validated_per_service() {
        let mut h = http();
        h.validate("ingest", true).unwrap();
        let e = h.validate("reconcile", false).unwrap_err().to_string();
        assert!(
            e.contains("http.listen") && e.contains("no public routes"),
            "{e}"
        );
        h.listen = None;
        h.validate("reconcile", false).unwrap();
        let e = h.validate("ingest", true).unwrap_err().to_string();
        assert!(e.contains("http.listen"), "{e}");
        h.listen = Some("127.0.0.1:9000".parse().unwrap());
        h.admin_listen = "127.0.0.1:9000".parse().unwrap();
        let e = h.validate("ingest", true).unwrap_err().to_string();
        assert!(e.contains("http.admin_listen"), "{e}");
    }

    async fn status(addr: SocketAddr, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out[9..12].parse().unwrap()
    }
}
