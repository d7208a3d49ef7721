//! Background tasks whose end is seen: a service runs its parts (consumer,
//! relay, HTTP server, workers) as [`Tasks`]; the first one to end before
//! shutdown — by error, by panic or by returning at all — stops the process
//! with one clear log line, so the orchestrator restarts it instead of
//! keeping a green zombie.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A set of named long-running tasks sharing one shutdown token.
pub struct Tasks {
    set: JoinSet<anyhow::Result<()>>,
    names: HashMap<tokio::task::Id, String>,
    shutdown: CancellationToken,
    scrub: fn(&str) -> String,
}

impl Tasks {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
            shutdown,
            scrub: |s| s.to_owned(),
        }
    }

    /// Passes every error text through `scrub` (e.g. a redactor of the
    /// service's secrets) before it is logged or returned.
    pub fn with_scrub(mut self, scrub: fn(&str) -> String) -> Self {
        self.scrub = scrub;
        self
    }

    /// Starts `fut` as the task `name`. It should run until the shutdown
    /// token is cancelled; ending earlier is a failure.
    pub fn spawn<F>(&mut self, name: impl Into<String>, fut: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.into();
        // Shown at 0 from the start, so the first failure is an increase.
        metrics::counter!("dlrflow_task_failures_total", "task" => name.clone()).increment(0);
        let handle = self.set.spawn(fut);
        self.names.insert(handle.id(), name);
    }

    /// Waits until shutdown or the first task that ends; then cancels the
    /// token and gives the others `grace` to finish. Returns the first
    /// failure: a task that ended before shutdown (error, panic or plain
    /// return), or a task that failed while shutting down.
    pub async fn run(mut self, grace: std::time::Duration) -> anyhow::Result<()> {
        let mut failure: Option<anyhow::Error> = None;
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            Some(joined) = self.set.join_next_with_id() => {
                let early = !self.shutdown.is_cancelled();
                let (name, result) = self.describe(joined);
                let err = match result {
                    Ok(()) if early => Some(anyhow::anyhow!("task `{name}` stopped before shutdown")),
                    Ok(()) => None,
                    Err(e) => Some(anyhow::anyhow!(
                        "task `{name}` stopped unexpectedly: {}",
                        (self.scrub)(&format!("{e:#}")).replace('\n', " ")
                    )),
                };
                if let Some(e) = err {
                    tracing::error!(task = %name, error = %e, "background task ended; stopping the process");
                    metrics::counter!("dlrflow_task_failures_total", "task" => name).increment(1);
                    failure = Some(e);
                }
                self.shutdown.cancel();
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            match tokio::time::timeout_at(deadline, self.set.join_next_with_id()).await {
                Ok(None) => break,
                Ok(Some(joined)) => {
                    if let (name, Err(e)) = self.describe(joined) {
                        tracing::warn!(
                            task = name,
                            error = format!("{e:#}"),
                            "task failed while stopping"
                        );
                        failure.get_or_insert(e.context(format!("task `{name}` failed")));
                    }
                }
                Err(_) => {
                    tracing::warn!(
                        remaining = self.set.len(),
                        "tasks did not stop within the grace period; abandoning them"
                    );
                    self.set.abort_all();
                    break;
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

impl Tasks {
    fn describe(
        &self,
        joined: Result<(tokio::task::Id, anyhow::Result<()>), tokio::task::JoinError>,
    ) -> (String, anyhow::Result<()>) {
        let name = |id| {
            self.names
                .get(&id)
                .cloned()
                .unwrap_or_else(|| "unnamed".into())
        };
        match joined {
            Ok((id, r)) => (name(id), r),
            Err(e) => {
                let task = name(e.id());
                if !e.is_panic() {
                    return (task, Err(anyhow::anyhow!("{e}")));
                }
                let payload = e.into_panic();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-text panic".to_owned());
                (task, Err(anyhow::anyhow!("panicked: {msg}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn until(token: CancellationToken) -> anyhow::Result<()> {
        token.cancelled().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_panicking_task_stops_the_others_and_is_reported() {
        let token = CancellationToken::new();
        let mut tasks = Tasks::new(token.clone());
        tasks.spawn("steady", until(token.clone()));
        tasks.spawn("doomed", async { panic!("boom") });
        let err = tasks.run(Duration::from_secs(5)).await.unwrap_err();
        assert!(format!("{err:#}").contains("boom"), "{err:#}");
        assert!(format!("{err:#}").contains("doomed"), "{err:#}");
        assert!(token.is_cancelled());
    }

    #[tokio::test]
    async fn a_task_returning_early_is_a_failure() {
        let token = CancellationToken::new();
        let mut tasks = Tasks::new(token.clone());
        tasks.spawn("steady", until(token.clone()));
        tasks.spawn("quitter", async { Ok(()) });
        let err = tasks.run(Duration::from_secs(5)).await.unwrap_err();
        assert!(format!("{err:#}").contains("quitter"), "{err:#}");
    }

    #[tokio::test]
    async fn shutdown_is_clean_when_every_task_stops() {
        let token = CancellationToken::new();
        let mut tasks = Tasks::new(token.clone());
        tasks.spawn("a", until(token.clone()));
        tasks.spawn("b", until(token.clone()));
        token.cancel();
        tasks.run(Duration::from_secs(5)).await.unwrap();
    }
}
