//! What `/readyz` says about the consumer: it is not ready when its loop has
//! not come round for `health.stall_after_ms` (hung), or when the same batch
//! has been failing for that long (a backend down). Redis being unreachable
//! is reported as `degraded`, not as not ready: dedupe then goes through
//! PostgreSQL's unique key and nothing stops. A partition with records
//! behind the consumer's position that has not moved for that long is not
//! ready either (a fetch that never returns, a broker that serves nothing).
//! A replica that has held no partition of the raw topic for that long is
//! degraded: it is alive but consumes nothing (more replicas than
//! partitions, or a group whose rebalance never completes).

use std::collections::HashMap;
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
    /// Per assigned partition: position, since when at it, records behind.
    partitions: HashMap<i32, (i64, Instant, i64)>,
    /// Since when this replica holds no partition of the raw topic (none
    /// before its first look at its assignment).
    unassigned_since: Option<Instant>,
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
                partitions: HashMap::new(),
                unassigned_since: None,
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

    /// The consumer's positions and lag per assigned partition
    /// (`(partition, position, records behind)`); others are forgotten.
    /// Returns the partitions held before and not any more.
    pub fn partitions(&self, observed: &[(i32, i64, i64)]) -> Vec<i32> {
        let now = Instant::now();
        self.with(|s| {
            let mut next = HashMap::with_capacity(observed.len());
            for &(p, at, lag) in observed {
                let since = match s.partitions.get(&p) {
                    Some(&(prev, since, _)) if prev == at => since,
                    _ => now,
                };
                next.insert(p, (at, since, lag));
            }
            let mut gone: Vec<i32> = s
                .partitions
                .keys()
                .filter(|p| !next.contains_key(p))
                .copied()
                .collect();
            gone.sort_unstable();
            s.partitions = next;
            if observed.is_empty() {
                s.unassigned_since.get_or_insert(now);
            } else {
                s.unassigned_since = None;
            }
            gone
        })
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
            let mut stuck: Vec<_> = s
                .partitions
                .iter()
                .filter(|(_, (_, since, lag))| {
                    *lag > 0 && now.duration_since(*since) > self.stall_after
                })
                .collect();
            stuck.sort_unstable_by_key(|(p, _)| **p);
            for (p, (_, since, lag)) in stuck {
                v.problems.push(format!(
                    "consumer: partition {p} is {lag} records behind and has not moved for {} s",
                    now.duration_since(*since).as_secs()
                ));
            }
            if let Some(since) = s.unassigned_since {
                let unassigned = now.duration_since(since);
                if unassigned > self.stall_after {
                    v.degraded.push(format!(
                        "consumer: holds no partition of the raw topic for {} s (more replicas than partitions, or a group rebalance that does not complete)",
                        unassigned.as_secs()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_behind_and_not_moving_is_a_problem() {
        let h = ConsumerHealth::new(Duration::from_millis(50));
        h.partitions(&[(0, 10, 5), (1, 7, 0)]);
        assert!(h.verdict().problems.is_empty());
        std::thread::sleep(Duration::from_millis(80));
        h.tick();
        // Partition 1 has no lag; partition 0 is stuck.
        h.partitions(&[(0, 10, 5), (1, 7, 0)]);
        let v = h.verdict();
        assert_eq!(v.problems.len(), 1, "{v:?}");
        assert!(v.problems[0].contains("partition 0"), "{v:?}");
        // It moves: fine again.
        h.partitions(&[(0, 12, 3), (1, 7, 0)]);
        assert!(h.verdict().problems.is_empty());
        // Partition 1 went to another replica.
        assert_eq!(h.partitions(&[(0, 12, 3)]), vec![1]);
    }

    #[test]
    fn a_batch_failing_too_long_and_a_silent_loop_are_problems() {
        let h = ConsumerHealth::new(Duration::from_millis(50));
        h.batch_failed("postgres down");
        assert!(h.verdict().problems.is_empty());
        std::thread::sleep(Duration::from_millis(80));
        let v = h.verdict();
        assert!(
            v.problems.iter().any(|p| p.contains("no progress")),
            "{v:?}"
        );
        h.batch_failed("postgres down");
        let v = h.verdict();
        assert!(
            v.problems.iter().any(|p| p.contains("postgres down")),
            "{v:?}"
        );
        h.batch_ok();
        assert!(h.verdict().problems.is_empty());
        h.redis(Some("refused".into()));
        let v = h.verdict();
        assert!(v.problems.is_empty() && v.degraded.len() == 1, "{v:?}");
    }

    #[test]
    fn holding_no_partition_for_long_is_a_degradation() {
        let h = ConsumerHealth::new(Duration::from_millis(50));
        h.partitions(&[]);
        assert!(h.verdict().degraded.is_empty());
        std::thread::sleep(Duration::from_millis(80));
        h.tick();
        h.partitions(&[]);
        let v = h.verdict();
        assert!(v.problems.is_empty(), "{v:?}");
        assert!(
            v.degraded.iter().any(|d| d.contains("holds no partition")),
            "{v:?}"
        );
        h.partitions(&[(3, 0, 0)]);
        assert!(h.verdict().degraded.is_empty());
    }
}
