//! What `/readyz` says about the consumer: it is not ready when its loop has
//! not come round for `health.stall_after_ms` (hung), or when the same batch
//! has been failing for that long (a backend down). Redis being unreachable
//! is reported as `degraded`, not as not ready: dedupe then goes through
//! PostgreSQL's unique key and nothing stops.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct ConsumerHealth {
    state: Mutex<State>,
    stall_after: Duration,
}

#[derive(Debug)]
struct State {
    last_loop: Instant,
    failing_since: Option<Instant>,
    last_error: Option<String>,
    redis_error: Option<String>,
}

/// A readiness verdict: problems make it not ready; degradations do not.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub problems: Vec<String>,
    pub degraded: Vec<String>,
}

impl ConsumerHealth {
    pub fn new(stall_after: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                last_loop: Instant::now(),
                failing_since: None,
                last_error: None,
                redis_error: None,
            }),
            stall_after,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("health lock"))
    }

    /// The consumer loop came round (after a batch, or an idle wait).
    pub fn tick(&self) {
        self.with(|s| s.last_loop = Instant::now());
    }

    pub fn batch_ok(&self) {
        self.with(|s| {
            s.last_loop = Instant::now();
            s.failing_since = None;
            s.last_error = None;
        });
    }

    pub fn batch_failed(&self, error: &str) {
        self.with(|s| {
            s.last_loop = Instant::now();
            s.failing_since.get_or_insert_with(Instant::now);
            s.last_error = Some(dlrflow_runtime::text::truncate(error, 300).into_owned());
        });
    }

    /// `Some(error)` while Redis cannot be reached, `None` once it answers.
    pub fn redis(&self, error: Option<String>) {
        metrics::gauge!("dlrflow_state_redis_degraded").set(if error.is_some() {
            1.0
        } else {
            0.0
        });
        self.with(|s| s.redis_error = error);
    }

    pub fn verdict(&self) -> Verdict {
        let now = Instant::now();
        self.with(|s| {
            let mut v = Verdict::default();
            let idle = now.duration_since(s.last_loop);
            if idle > self.stall_after {
                v.problems
                    .push(format!("consumer: no progress for {} s", idle.as_secs()));
            }
            if let Some(since) = s.failing_since {
                let failing = now.duration_since(since);
                if failing > self.stall_after {
                    v.problems.push(format!(
                        "consumer: batch failing for {} s: {}",
                        failing.as_secs(),
                        s.last_error.as_deref().unwrap_or("")
                    ));
                }
            }
            if let Some(e) = &s.redis_error {
                v.degraded
                    .push(format!("redis: {e}; dedupe runs on PostgreSQL alone"));
            }
            v
        })
    }
}
