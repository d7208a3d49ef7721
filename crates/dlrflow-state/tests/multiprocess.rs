//! Three `dlrflow-state` processes in one group; one is killed with SIGKILL
//! mid-stream and restarted. The state must be exact and the analytics topic
//! must hold every expected `update_id` (duplicates of one id are allowed:
//! at-least-once; the test prints how many there were).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{analytics_ids, assert_expected, count, wait_count, Env};
use dlrflow_testkit::scenario::{
    lisoloo_scenario, produce_raw, producer, shuffled_with_duplicates,
};
use dlrflow_testkit::wait_for;

const T: Duration = Duration::from_secs(90);

struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

fn start(env: &Env, name: &str) -> Proc {
    start_with(env, name, &[])
}

fn start_with(env: &Env, name: &str, extra: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dlrflow-state"));
    cmd.envs(env.env_vars())
        .envs(extra.iter().copied())
        .env(
            "DLRFLOW_KAFKA__INSTANCE_ID",
            name.trim_end_matches("-restarted"),
        )
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().expect("spawn dlrflow-state");
    let stdout = child.stdout.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let name = name.to_owned();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if std::env::var_os("TEST_LOG").is_some() {
                eprintln!("[{name}] {line}");
            }
            sink.lock().unwrap().push(line);
        }
    });
    Proc { child, log }
}

impl Proc {
    fn has_partitions(&self) -> bool {
        let log = self.log.lock().unwrap();
        // The latest assignment log line must list at least one partition.
        log.iter()
            .rev()
            .find(|l| l.contains("\"message\":\"assigned\""))
            .is_some_and(|l| !l.contains("\"partitions\":\"[]\""))
    }

    /// The admin listener's address, once the process logged it.
    fn admin(&self) -> Option<String> {
        let log = self.log.lock().unwrap();
        log.iter().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == "listening").then(|| v["admin"].as_str().map(str::to_owned))?
        })
    }

    fn terminate(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("process did not stop on SIGTERM within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_one_killed_and_restarted_converge_exactly() {
    let env = Env::new(6).await;
    let pool = env.pool().await; // creates the schema and migrates once
    let scenario = lisoloo_scenario(&env.group, 300, 5);
    let records = shuffled_with_duplicates(&scenario.records, 20, 11);
    let unique = scenario.records.len() as i64;
    let (first, second) = records.split_at(records.len() / 2);

    let mut procs = vec![start(&env, "p0"), start(&env, "p1"), start(&env, "p2")];
    let p = producer(&env.brokers).unwrap();
    let assigned = wait_for(T, || {
        let ok = procs[0].has_partitions();
        async move { ok.then_some(()) }
    })
    .await;
    assert!(assigned.is_some(), "p0 got partitions");

    produce_raw(&p, &env.raw, first).await.unwrap();
    let progressed = wait_for(T, || {
        let pool = pool.clone();
        async move {
            (count(&pool, "SELECT count(*) FROM delivery_events").await >= unique / 5).then_some(())
        }
    })
    .await;
    assert!(progressed.is_some(), "processing started");
    let mut victim = procs.remove(0);
    victim.child.kill().unwrap(); // SIGKILL
    victim.child.wait().unwrap();
    let at_kill = count(&pool, "SELECT count(*) FROM delivery_events").await;

    produce_raw(&p, &env.raw, second).await.unwrap();
    procs.push(start(&env, "p0-restarted"));

    wait_count(&pool, "SELECT count(*) FROM delivery_events", unique, T).await;
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL",
        0,
        T,
    )
    .await;
    assert_expected(&pool, &scenario).await;
    assert_eq!(
        count(&pool, "SELECT sum(version)::int8 FROM recipient_state").await,
        scenario.update_ids.len() as i64,
        "every recipient event applied exactly once"
    );

    let ids = analytics_ids(&env, scenario.update_ids.len()).await;
    let distinct: HashSet<_> = ids.iter().copied().collect();
    let want: HashSet<_> = scenario.update_ids.iter().copied().collect();
    assert_eq!(
        distinct, want,
        "the analytics topic holds exactly the expected update ids"
    );
    let mut per_id: HashMap<_, usize> = HashMap::new();
    for id in &ids {
        *per_id.entry(id).or_default() += 1;
    }
    let duplicates = ids.len() - distinct.len();
    eprintln!(
        "multiprocess: {} raw records ({} unique), killed p0 at {at_kill} events; analytics records {}, distinct {}, duplicates {duplicates}",
        records.len(),
        unique,
        ids.len(),
        distinct.len()
    );

    for p in procs {
        p.terminate();
    }
    env.drop_schema().await;
}

/// Two replicas, one partition: one of them holds nothing. It says so in
/// `/readyz` (degraded, still ready) once that lasted `health.stall_after`,
/// and both export how many partitions they hold and how many the raw topic
/// has, which is what the `DlrflowPartitionsUnassigned` alert compares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_holds_no_partition_says_so() {
    let env = Env::new(1).await;
    let pool = env.pool().await; // creates the schema and migrates once
    let fast = [
        ("DLRFLOW_HEALTH__STALL_AFTER_MS", "1000"),
        ("DLRFLOW_HEALTH__LAG_CHECK_INTERVAL_MS", "200"),
    ];
    let procs = [
        start_with(&env, "idle-a", &fast),
        start_with(&env, "idle-b", &fast),
    ];
    // Per replica: (partitions held, raw-topic partitions, /readyz status,
    // degraded lines), until one holds the partition and the other says it
    // holds none.
    let seen = wait_for(T, || {
        let admins: Vec<Option<String>> = procs.iter().map(Proc::admin).collect();
        async move {
            let mut out = Vec::new();
            for admin in admins {
                let base = format!("http://{}", admin?);
                let metrics = reqwest::get(format!("{base}/metrics"))
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                let held =
                    dlrflow_testkit::metric_sum(&metrics, "dlrflow_state_assigned_partitions");
                let raw = dlrflow_testkit::metric_sum(&metrics, "dlrflow_state_raw_partitions");
                let r = reqwest::get(format!("{base}/readyz")).await.ok()?;
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.ok()?;
                let degraded: Vec<String> = body["degraded"]
                    .as_array()?
                    .iter()
                    .filter_map(|d| d.as_str().map(str::to_owned))
                    .collect();
                out.push((held, raw, status, degraded));
            }
            let idle = out
                .iter()
                .filter(|(held, _, _, d)| *held == 0.0 && !d.is_empty())
                .count();
            let busy = out
                .iter()
                .filter(|(held, _, _, d)| *held == 1.0 && d.is_empty())
                .count();
            (idle == 1 && busy == 1).then_some(out)
        }
    })
    .await;
    let seen = seen.expect("one replica holds the partition, the other says it holds none");
    for (held, raw, status, degraded) in &seen {
        assert_eq!(*raw, 1.0, "the raw topic's partitions: {seen:?}");
        assert_eq!(*status, 200, "holding nothing is not unready: {seen:?}");
        if *held == 0.0 {
            assert!(
                degraded
                    .iter()
                    .any(|d| d.contains("holds no partition of the raw topic")),
                "{seen:?}"
            );
        }
    }
    for p in procs {
        p.terminate();
    }
    pool.close().await;
    env.drop_schema().await;
}
