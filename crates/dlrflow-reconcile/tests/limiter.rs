//! The shared limiter's property against real Redis: no interval of the
//! window's length holds more grants than the budget, whatever the parameters
//! and however many callers race. Every test runs twice: on the shared Redis,
//! and on a private three-primary Redis Cluster (`redis.cluster = true`),
//! where the budget's scripts only work because its keys share a hash tag.

mod common;

use std::time::{Duration, Instant};

use dlrflow_reconcile::limiter::{Acquire, Limiter, LimiterSettings};
use dlrflow_runtime::settings::{RedisConnection, RedisSettings};
use dlrflow_testkit::{unique_name, RedisCluster};

/// Where a test's budgets live.
enum Target {
    /// The shared test Redis (`DLRFLOW_TEST_REDIS_URL`), one server.
    Shared,
    /// A private cluster of three primaries, gone with the test.
    Cluster(RedisCluster),
}

impl Target {
    fn cluster() -> Target {
        Target::Cluster(RedisCluster::start(3))
    }

    /// `[redis]` as the reconciler would have it for this target.
    fn settings(&self) -> RedisSettings {
        let mut redis = dlrflow_reconcile::Config::defaults().redis;
        match self {
            Target::Shared => redis.url = common::redis_url().into(),
            Target::Cluster(c) => {
                redis.url = c.url().into();
                redis.cluster = true;
            }
        }
        redis.validate().unwrap();
        redis
    }

    /// A connection of its own (each limiter has one, like a replica).
    async fn connect(&self) -> RedisConnection {
        self.settings().connect().await.unwrap()
    }
}

/// A limiter on a new budget (`prefix` is fresh): initialized as a first use.
async fn limiter(t: &Target, prefix: &str, limit: u32, window: Duration) -> Limiter {
    let l = limiter_with_hold(t, prefix, limit, window, Duration::from_secs(60)).await;
    l.initialize(false, "test").await.unwrap();
    l
}

/// A limiter, not initialized; `reset_hold` after a lost log.
async fn limiter_with_hold(
    t: &Target,
    prefix: &str,
    limit: u32,
    window: Duration,
    reset_hold: Duration,
) -> Limiter {
    let conn = t.connect().await;
    Limiter::new(
        conn,
        &LimiterSettings {
            prefix: prefix.to_owned(),
            key_id: "k".into(),
            limit,
            window,
            unauthorized_hold: Duration::from_secs(5),
            reset_hold,
        },
    )
}

/// The most grants (Redis µs timestamps) inside any interval `[a, a + w)`.
fn max_in_window(mut grants: Vec<i64>, window_us: i64) -> usize {
    grants.sort_unstable();
    let mut best = 0;
    let mut start = 0;
    for end in 0..grants.len() {
        while grants[end] - grants[start] >= window_us {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// `callers` tasks (each with its own Redis connection, like replicas) hammer
/// one budget for `run`; returns every grant's Redis time.
async fn hammer(
    t: &Target,
    limit: u32,
    window: Duration,
    callers: usize,
    run: Duration,
) -> Vec<i64> {
    let prefix = unique_name("dlrflow-test-limiter");
    let mut tasks = Vec::new();
    for c in 0..callers {
        let l = limiter(t, &prefix, limit, window).await;
        tasks.push(tokio::spawn(async move {
            let end = Instant::now() + run;
            let mut grants = Vec::new();
            let mut i = 0;
            while Instant::now() < end {
                i += 1;
                match l.acquire(&format!("{c}/{i}")).await.unwrap() {
                    Acquire::Granted { at_us, .. } => grants.push(at_us),
                    // Come back early and often: the harshest caller there is.
                    Acquire::Wait { wait, .. } => {
                        tokio::time::sleep(wait.min(Duration::from_millis(3))).await
                    }
                    other => panic!("{other:?}"),
                }
            }
            grants
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_window_ever_holds_more_than_the_budget() {
    budget_is_never_exceeded(&Target::Shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_window_ever_holds_more_than_the_budget_on_a_cluster() {
    budget_is_never_exceeded(&Target::cluster()).await;
}

async fn budget_is_never_exceeded(t: &Target) {
    for (limit, window_ms, callers) in [(10u32, 300u64, 8usize), (1, 50, 4), (25, 700, 12)] {
        let window = Duration::from_millis(window_ms);
        let run = Duration::from_millis(window_ms * 4 + 100);
        let grants = hammer(t, limit, window, callers, run).await;
        let w = i64::try_from(window.as_micros()).unwrap();
        let worst = max_in_window(grants.clone(), w);
        assert!(
            worst <= limit as usize,
            "limit {limit}/{window_ms} ms: {worst} grants in one window"
        );
        // And the budget is used, not starved: about limit per window.
        let windows = run.as_millis() as f64 / window_ms as f64;
        let expected = (windows.floor() as usize) * limit as usize;
        assert!(
            grants.len() >= expected,
            "limit {limit}/{window_ms} ms: only {} grants in {run:?}",
            grants.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_stops_grants_and_a_401_marker_stops_them_until_it_is_gone() {
    pause_and_unauthorized(&Target::Shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_stops_grants_and_a_401_marker_stops_them_until_it_is_gone_on_a_cluster() {
    pause_and_unauthorized(&Target::cluster()).await;
}

async fn pause_and_unauthorized(t: &Target) {
    let prefix = unique_name("dlrflow-test-limiter");
    let a = limiter(t, &prefix, 100, Duration::from_secs(60)).await;
    let b = limiter(t, &prefix, 100, Duration::from_secs(60)).await;
    assert!(matches!(
        a.acquire("1").await.unwrap(),
        Acquire::Granted { left: 99, .. }
    ));
    a.pause(Duration::from_millis(400)).await.unwrap();
    // A shorter pause never shortens a longer one.
    b.pause(Duration::from_millis(10)).await.unwrap();
    match b.acquire("2").await.unwrap() {
        Acquire::Wait {
            wait, paused: true, ..
        } => {
            assert!(wait > Duration::from_millis(300), "{wait:?}")
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(matches!(
        b.acquire("3").await.unwrap(),
        Acquire::Granted { left: 98, .. }
    ));
    a.mark_unauthorized("401 for key k").await.unwrap();
    match b.acquire("4").await.unwrap() {
        Acquire::Unauthorized { reason } => assert_eq!(reason, "401 for key k"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        b.unauthorized_reason().await.unwrap().as_deref(),
        Some("401 for key k")
    );
    assert_eq!(a.in_window().await.unwrap(), 2);
    // Clean up the marker (its TTL would too).
    let mut conn = t.connect().await;
    let deleted: u64 = redis::cmd("DEL")
        .arg(&a.keys()[2])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the 401 marker is {}", a.keys()[2]);
    assert_eq!(b.unauthorized_reason().await.unwrap(), None);
    assert!(matches!(
        b.acquire("5").await.unwrap(),
        Acquire::Granted { left: 97, .. }
    ));
}

/// A Redis that lost the limiter's keys (restarted empty, flushed) has
/// forgotten grants the gateway still counts: nothing is granted until the
/// caller says whether the budget is new, and a lost one holds every grant
/// for the reset hold. Only this test's own keys are deleted; the shared
/// Redis is never flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_log_holds_every_grant_for_the_reset_hold() {
    lost_log(&Target::Shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_log_holds_every_grant_for_the_reset_hold_on_a_cluster() {
    lost_log(&Target::cluster()).await;
}

async fn lost_log(t: &Target) {
    let prefix = unique_name("dlrflow-test-limiter");
    let hold = Duration::from_millis(600);
    let a = limiter_with_hold(t, &prefix, 3, Duration::from_secs(60), hold).await;
    // The budget's name (what PostgreSQL records) has no braces; its keys
    // carry it as their hash tag.
    assert_eq!(a.name(), format!("{prefix}:k"));
    assert_eq!(
        a.keys(),
        &[
            format!("{{{prefix}:k}}:reads"),
            format!("{{{prefix}:k}}:paused"),
            format!("{{{prefix}:k}}:unauthorized"),
            format!("{{{prefix}:k}}:epoch"),
        ]
    );
    // A new budget: nothing granted before it is initialized, then at once.
    assert_eq!(a.acquire("0").await.unwrap(), Acquire::Uninitialized);
    assert_eq!(a.initialize(false, "e1").await.unwrap(), Duration::ZERO);
    for i in 1..=3 {
        let got = a.acquire(&i.to_string()).await.unwrap();
        assert!(matches!(got, Acquire::Granted { .. }), "{got:?}");
    }
    assert!(matches!(
        a.acquire("4").await.unwrap(),
        Acquire::Wait { paused: false, .. }
    ));
    // Redis forgets everything about this budget: its log and its epoch are
    // there, then gone.
    let mut conn = t.connect().await;
    for key in [&a.keys()[0], &a.keys()[3]] {
        let there: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(there, "{key}");
    }
    let _: () = redis::cmd("DEL")
        .arg(a.keys())
        .query_async(&mut conn)
        .await
        .unwrap();
    // The empty log would grant 3 more at once: it grants nothing instead.
    let b = limiter_with_hold(t, &prefix, 3, Duration::from_secs(60), hold).await;
    assert_eq!(b.acquire("5").await.unwrap(), Acquire::Uninitialized);
    assert_eq!(a.acquire("6").await.unwrap(), Acquire::Uninitialized);
    // Both learn it is a lost log; one of them starts the hold.
    let started = Instant::now();
    assert_eq!(b.initialize(true, "e2").await.unwrap(), hold);
    assert_eq!(a.initialize(true, "e3").await.unwrap(), Duration::ZERO);
    match a.acquire("7").await.unwrap() {
        Acquire::Wait { paused: true, wait } => assert!(wait > hold / 2, "{wait:?}"),
        other => panic!("a lost log granted at once: {other:?}"),
    }
    let mut i = 0;
    loop {
        i += 1;
        match a.acquire(&format!("8/{i}")).await.unwrap() {
            Acquire::Granted { .. } => break,
            Acquire::Wait { wait, .. } => tokio::time::sleep(wait).await,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        started.elapsed() >= hold - Duration::from_millis(20),
        "{:?}",
        started.elapsed()
    );
}
