//! Dedupe on a Redis Cluster (`redis.cluster = true`): a private cluster of
//! three primaries, started by the test. The dedupe keys carry no hash tag
//! and spread over every node; the check and the marks still work, and the
//! `dlrflow-state` binary runs on the cluster with its Redis fast path and
//! reports a lost primary on `/readyz`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{assert_expected, count, wait_count, Env};
use dlrflow_runtime::settings::RedisConnection;
use dlrflow_state::dedupe::Dedupe;
use dlrflow_testkit::scenario::{lisoloo_scenario, produce_raw, producer};
use dlrflow_testkit::{free_port, metric_sum, scrape, unique_name, wait_for, RedisCluster};

const T: Duration = Duration::from_secs(90);

/// `[redis]` of dlrflow-state for `cluster`, with a prefix of its own.
fn dedupe_config(cluster: &RedisCluster) -> dlrflow_state::config::DedupeRedisConfig {
    let mut cfg = dlrflow_state::Config::defaults().redis;
    cfg.conn.url = cluster.url().into();
    cfg.conn.cluster = true;
    cfg.conn.prefix = format!("{}:", unique_name("dedupe"));
    cfg.conn.validate().unwrap();
    cfg
}

/// How many keys each node of `cluster` holds (`DBSIZE`, asked of each node
/// directly: the cluster is the test's own).
async fn keys_per_node(cluster: &RedisCluster) -> Vec<u64> {
    let mut sizes = Vec::new();
    for url in cluster.node_urls() {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        sizes.push(redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap());
    }
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_checks_and_marks_keys_spread_over_every_node_of_a_cluster() {
    let cluster = RedisCluster::start(3);
    let cfg = dedupe_config(&cluster);
    let mut dedupe = Dedupe::connect(&cfg).await.unwrap();
    let keys: Vec<String> = (0..600).map(|i| format!("lisoloo:m{i}:r{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let (first, rest) = keys.split_at(400);

    // Nothing seen yet.
    assert_eq!(dedupe.check(first).await.unwrap(), vec![false; 400]);
    // PostgreSQL committed the first 400: the next round trip marks them and
    // then sees them, and not the others.
    dedupe.committed(first.iter().copied());
    assert!(dedupe.has_pending());
    let seen = dedupe.check(&keys).await.unwrap();
    assert!(!dedupe.has_pending());
    assert_eq!(&seen[..400], &[true; 400][..]);
    assert_eq!(&seen[400..], &[false; 200][..]);

    // The marks are spread over the three primaries, not piled on one.
    let sizes = keys_per_node(&cluster).await;
    assert_eq!(sizes.iter().sum::<u64>(), 400, "{sizes:?}");
    assert!(
        sizes.iter().all(|&n| n > 50),
        "one node holds too few: {sizes:?}"
    );

    // A flush (idle, shutdown) marks the rest; every mark has the TTL.
    dedupe.committed(rest.iter().copied());
    dedupe.flush().await.unwrap();
    assert!(!dedupe.has_pending());
    assert_eq!(keys_per_node(&cluster).await.iter().sum::<u64>(), 600);
    assert_eq!(dedupe.check(&keys).await.unwrap(), vec![true; 600]);
    let mut conn = cfg.conn.connect().await.unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}d:{}", cfg.conn.prefix, keys[599]))
        .query_async(&mut conn)
        .await
        .unwrap();
    let want = i64::try_from(cfg.ttl.as_secs()).unwrap();
    assert!(ttl > want - 60 && ttl <= want, "ttl {ttl}, want {want}");

    // Why the cluster path exists: one pipeline over keys of several slots
    // is refused by the cluster client.
    assert!(matches!(conn, RedisConnection::Cluster(_)));
    let err = redis::pipe()
        .cmd("EXISTS")
        .arg(format!("{}d:{}", cfg.conn.prefix, keys[0]))
        .cmd("EXISTS")
        .arg(format!("{}d:{}", cfg.conn.prefix, keys[1]))
        .cmd("EXISTS")
        .arg(format!("{}d:{}", cfg.conn.prefix, keys[2]))
        .query_async::<(bool, bool, bool)>(&mut conn)
        .await
        .expect_err("a pipeline over three slots");
    assert_eq!(err.kind(), redis::ErrorKind::CrossSlot, "{err}");
}

/// A `dlrflow-state` process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGTERM, and the process stops within 30 s with success.
    fn terminate(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                assert!(status.success(), "dlrflow-state exited with {status}");
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "dlrflow-state did not stop on SIGTERM within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_service_dedupes_through_a_cluster_and_is_ready() {
    let mut cluster = RedisCluster::start(3);
    let env = Env::new(3).await;
    let pool = env.pool().await;
    let admin_port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_dlrflow-state"))
        .envs(env.env_vars())
        .env(
            "DLRFLOW_HTTP__ADMIN_LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )
        .env("DLRFLOW_REDIS__URL", cluster.url())
        .env("DLRFLOW_REDIS__CLUSTER", "true")
        .stdout(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn dlrflow-state");
    dlrflow_testkit::kill_with_this_process(child.id());
    let proc = Proc(child);
    let admin = format!("http://127.0.0.1:{admin_port}");

    // Every event once: written to PostgreSQL, then marked in the cluster.
    let scenario = lisoloo_scenario(&env.group, 30, 4);
    let unique = scenario.records.len();
    let p = producer(&env.brokers).unwrap();
    produce_raw(&p, &env.raw, &scenario.records).await.unwrap();
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_events",
        unique as i64,
        T,
    )
    .await;
    let marked = wait_for(T, || async {
        let sizes = keys_per_node(&cluster).await;
        (sizes.iter().sum::<u64>() == unique as u64).then_some(sizes)
    })
    .await;
    let sizes = marked.unwrap_or_else(|| panic!("{unique} marks never all in the cluster"));
    assert!(
        sizes.iter().all(|&n| n > 0),
        "marks on every node: {sizes:?}"
    );

    // Every event again: each is a duplicate the cluster knows, and
    // PostgreSQL is not asked.
    produce_raw(&p, &env.raw, &scenario.records).await.unwrap();
    let prefix = "dlrflow_state_events_total{outcome=\"duplicate_redis\"";
    let dupes = wait_for(T, || {
        let admin = admin.clone();
        async move {
            let n = metric_sum(&scrape(&admin).await, prefix);
            (n >= unique as f64).then_some(n)
        }
    })
    .await;
    assert_eq!(
        dupes,
        Some(unique as f64),
        "duplicates found in the cluster"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM delivery_events").await,
        unique as i64
    );
    assert_expected(&pool, &scenario).await;

    // Ready, and not degraded: its readiness pings the cluster's primaries.
    let ready = reqwest::get(format!("{admin}/readyz")).await.unwrap();
    let status = ready.status();
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["degraded"], serde_json::json!([]), "{body}");
    assert_eq!(
        metric_sum(&scrape(&admin).await, "dlrflow_state_redis_degraded"),
        0.0
    );

    // One primary gone: the readiness ping of every primary fails, so the
    // service says it is degraded (Redis is a cache), and stays ready.
    cluster.kill_node(2);
    let degraded = wait_for(Duration::from_secs(30), || {
        let admin = admin.clone();
        async move {
            let ready = reqwest::get(format!("{admin}/readyz")).await.ok()?;
            let status = ready.status();
            let body: serde_json::Value = ready.json().await.ok()?;
            let redis = body["degraded"]
                .as_array()?
                .iter()
                .any(|d| d.as_str().is_some_and(|d| d.starts_with("redis")));
            (status == 200 && redis).then_some(body)
        }
    })
    .await;
    assert!(degraded.is_some(), "/readyz never said Redis is degraded");

    proc.terminate();
    env.drop_schema().await;
}
