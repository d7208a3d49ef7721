//! `dlrflow-state-bench`: events/s from the raw topic to committed PostgreSQL
//! state, batched (the service as configured) next to a naive per-event run
//! (`batch.max_records = 1`: one Redis round trip and one transaction per
//! event), in the same run on the same services. Prints a table and writes
//! `reports/state-bench.md`. Not run in CI.
//!
//! `cargo run --release -p dlrflow-state --example state-bench -- --events 100000`
//!
//! `--idle 30` measures the idle latency instead (single events, broker ack →
//! committed), librdkafka's fetch wait next to dlrflow's defaults, and writes
//! `reports/state-idle-latency.md`.
//!
//! `--sustained 5000 --secs 60` produces at a steady rate as the ingest would
//! (acks=all, idempotent, no linger, a chunk every 10 ms) into a running
//! replica and measures, for every 20th chunk, the time from the broker's
//! acknowledgement of its last record to every record of it visible in
//! PostgreSQL (what the read API serves); writes `reports/state-sustained.md`.
//!
//! `--rollup 3` measures what the carrier rollup costs the write path: the
//! stage alone (parse + Redis + PostgreSQL, 2000 records per transaction, no
//! broker) on `--stage-events` records with the rollup on and off, in
//! alternating rounds (on, off, on, off, …) in one run, each round on a
//! fresh schema; writes `reports/state-rollup.md`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use dlrflow_state::Config;
use dlrflow_testkit::scenario::{lisoloo_scenario, produce_raw, producer, RawRecord};
use dlrflow_testkit::{create_topic, test_brokers, unique_name};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Raw records for the batched run.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Raw records for the naive run (it is slow; the rate is what counts).
    #[arg(long, default_value_t = 5_000)]
    naive_events: usize,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Records for the broker-less stage measurement (default: --events).
    #[arg(long)]
    stage_events: Option<usize>,
    /// Defaults to DLRFLOW_TEST_KAFKA_BROKERS or 127.0.0.1:9092.
    #[arg(long)]
    brokers: Option<String>,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/dlrflow")]
    postgres_url: String,
    /// `batch.max_records` of the batched runs.
    #[arg(long, default_value_t = 4000)]
    max_records: usize,
    /// `batch.writers` of the replica (default: the service's).
    #[arg(long)]
    writers: Option<usize>,
    /// `batch.max_wait_ms` of the replica (default: the service's).
    #[arg(long)]
    batch_max_wait_ms: Option<u64>,
    /// Extra librdkafka consumer settings, `key=value` (repeatable).
    #[arg(long)]
    kafka_setting: Vec<String>,
    #[arg(long, default_value = "reports/state-bench.md")]
    out: PathBuf,
    /// Instead of the throughput runs: the idle latency, producer ack →
    /// committed, of this many single events one at a time (100 ms apart),
    /// librdkafka's fetch wait and no idle close (before) next to the
    /// defaults, with the broker's CPU at idle for each.
    #[arg(long)]
    idle: Option<usize>,
    /// Seconds of idle for the broker CPU figure (--idle).
    #[arg(long, default_value_t = 20)]
    idle_cpu_secs: u64,
    /// Instead of the throughput runs: this many events/s, sustained for
    /// --secs, acknowledged → visible (see the module docs).
    #[arg(long)]
    sustained: Option<usize>,
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Instead of the throughput runs: this many rounds of the stage with
    /// the carrier rollup on and off (see the module docs).
    #[arg(long)]
    rollup: Option<usize>,
}

struct RunResult {
    name: String,
    records: usize,
    produce_secs: f64,
    process_secs: f64,
    /// The records written within `process_secs` (all but the last batch).
    timed_records: usize,
    total_secs: f64,
    /// First commit → the last `dlrflow.delivery.v1` record acknowledged.
    published_secs: f64,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.timed_records as f64 / self.process_secs
    }
}

async fn run(
    name: String,
    args: &Args,
    brokers: &str,
    records: &[RawRecord],
    max_records: usize,
    max_defer: Option<Duration>,
) -> anyhow::Result<RunResult> {
    let id = unique_name("bench");
    let schema = id.replace('-', "_");
    let mut cfg = bench_config(args, brokers, &id).await?;
    cfg.batch.max_records = max_records;
    if let Some(d) = max_defer {
        cfg.outbox.max_defer = d;
    }
    let p = producer(brokers)?;
    let started = Instant::now();
    produce_raw(&p, &cfg.kafka.raw_topic, records).await?;
    let produce_secs = started.elapsed().as_secs_f64();

    let app = dlrflow_state::App::build(cfg).await?;
    let pool = app.pool();
    let shutdown = CancellationToken::new();
    analyze_like_autovacuum(pool.clone(), shutdown.clone()).await?;
    let t0 = Instant::now();
    let task = tokio::spawn(app.run(shutdown.clone()));
    let want = records.len() as i64;
    // The clock comes from the rows themselves (`processed_at` is the start
    // of the transaction that wrote each one): the first batch's start to
    // the last batch's start. The poll only says when to stop, every
    // 250 ms: a `count(*)` every 20 ms (as before 2026-12-06) scanned the
    // growing table 50 times a second, a third of a core taken from the
    // pipeline it measures.
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery_events")
            .fetch_one(&pool)
            .await?;
        if n >= want {
            break;
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            anyhow::bail!("{name}: only {n} of {want} after 30 min");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // `processed_at` is when a transaction began: from the first one's
    // start to the last batch's start, every batch but the last was written.
    // The rate counts those records only (the last batch's transactions
    // began within a few milliseconds of each other).
    let (first_ms, span_ms, last_batch): (f64, f64, i64) = sqlx::query_as(
        "WITH b AS (SELECT min(processed_at) AS lo, max(processed_at) AS hi FROM delivery_events) \
         SELECT (extract(epoch FROM clock_timestamp() - b.lo) * 1000)::float8, \
                (extract(epoch FROM b.hi - b.lo) * 1000)::float8, \
                (SELECT count(*) FROM delivery_events WHERE processed_at > b.hi - interval '20 ms') \
           FROM b",
    )
    .fetch_one(&pool)
    .await?;
    let now = Instant::now();
    let first = now.checked_sub(Duration::from_secs_f64(first_ms.max(0.0) / 1000.0));
    let done = first.map_or(now, |f| {
        f + Duration::from_secs_f64(span_ms.max(0.0) / 1000.0)
    });
    // The analytics stream: every change's record acknowledged (the relay
    // marks a row published only then).
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL")
                .fetch_one(&pool)
                .await?;
        if pending == 0 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            anyhow::bail!("{name}: {pending} outbox rows unpublished after 30 min");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let published_at = Instant::now();
    shutdown.cancel();
    task.await??;
    let drop = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    let admin = sqlx::PgPool::connect(&args.postgres_url).await?;
    sqlx::query(&drop).execute(&admin).await?;
    Ok(RunResult {
        name,
        records: records.len(),
        produce_secs,
        process_secs: (done - first.unwrap_or(t0)).as_secs_f64().max(1e-3),
        timed_records: records.len().saturating_sub(last_batch.max(0) as usize),
        total_secs: (done - t0).as_secs_f64(),
        published_secs: (published_at - first.unwrap_or(t0)).as_secs_f64(),
    })
}

/// Topics `{id}.raw|dlq|delivery` on the broker, and a configuration of an
/// in-process replica on them with its own schema, group and Redis prefix.
async fn bench_config(args: &Args, brokers: &str, id: &str) -> anyhow::Result<Config> {
    for t in ["raw", "status", "dlq", "delivery"] {
        create_topic(brokers, &format!("{id}.{t}"), args.partitions).await?;
    }
    let mut cfg = Config::defaults();
    cfg.http.listen = Some("127.0.0.1:0".parse()?);
    cfg.http.admin_listen = "127.0.0.1:0".parse()?;
    cfg.kafka.client.brokers = brokers.to_owned();
    cfg.kafka.raw_topic = format!("{id}.raw");
    cfg.kafka.status_topic = format!("{id}.status");
    cfg.kafka.dlq_topic = format!("{id}.dlq");
    cfg.kafka.delivery_topic = format!("{id}.delivery");
    cfg.kafka.group_id = format!("{id}-group");
    cfg.redis.conn.prefix = format!("{id}:");
    cfg.postgres.url = args.postgres_url.clone().into();
    cfg.postgres.schema = Some(id.replace('-', "_"));
    if let Some(w) = args.writers {
        cfg.batch.writers = w;
    }
    if let Some(ms) = args.batch_max_wait_ms {
        cfg.batch.max_wait = Duration::from_millis(ms);
    }
    for kv in &args.kafka_setting {
        if let Some((k, v)) = kv.split_once('=') {
            cfg.kafka.client.settings.insert(k.to_owned(), v.to_owned());
        }
    }
    Ok(cfg)
}

/// Where the server runs without autovacuum (this project's CI machines
/// do), the bench's fresh tables never get statistics and the planner keeps
/// choosing sequential scans for the write path's `= ANY($1)` lookups as
/// they grow. A production server analyzes them by itself (autovacuum is on
/// by default); this task does what its autoanalyze would, every 5 s, and
/// says so. Returns whether it runs.
async fn analyze_like_autovacuum(
    pool: sqlx::PgPool,
    stop: CancellationToken,
) -> anyhow::Result<bool> {
    let on: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&pool)
        .await?;
    if on == "on" {
        return Ok(false);
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            for t in [
                "delivery_events",
                "messages",
                "recipient_state",
                "delivery_outbox",
                "carrier_rollup",
            ] {
                let _ = sqlx::query(&format!("ANALYZE {t}")).execute(&pool).await;
            }
        }
    });
    Ok(true)
}

/// One idle-latency run (see `--idle`).
struct IdleResult {
    name: &'static str,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The broker's CPU time per second of idle with the consumer attached.
    broker_cpu_ms_per_s: Option<f64>,
}

/// CPU seconds (user + system) of the `tansu` process that listens on the
/// port of `brokers`, from /proc; `None` when there is none (another broker).
fn broker_cpu_secs(brokers: &str) -> Option<f64> {
    let tick = 100.0; // USER_HZ on Linux
    let port = format!(":{}", brokers.rsplit(':').next()?);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
        let first = args.next().unwrap_or_default();
        if !first.ends_with("tansu") || !args.any(|a| a.contains(&port)) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        return Some((utime + stime) / tick);
    }
    None
}

/// Single events one at a time into an idle replica: for each, the time from
/// the broker's acknowledgement (when the ingest answers the gateway) to its
/// row committed in PostgreSQL (what the read API shows).
async fn idle(
    name: &'static str,
    args: &Args,
    brokers: &str,
    records: &[RawRecord],
    tune: impl FnOnce(&mut Config),
) -> anyhow::Result<IdleResult> {
    let id = unique_name("idle");
    let schema = id.replace('-', "_");
    let mut cfg = bench_config(args, brokers, &id).await?;
    tune(&mut cfg);
    let raw = cfg.kafka.raw_topic.clone();
    let app = dlrflow_state::App::build(cfg).await?;
    let pool = app.pool();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run(shutdown.clone()));
    // One producer as the ingest has it: no linger.
    let p: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()?;
    let count = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM delivery_events")
            .fetch_one(&pool)
            .await
    };
    // The first record waits for the group join; not measured.
    let mut seen = 0i64;
    let mut samples = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        produce_raw(&p, &raw, std::slice::from_ref(r)).await?;
        let acked = Instant::now();
        loop {
            let n = count(pool.clone()).await?;
            if n > seen {
                seen = n;
                break;
            }
            anyhow::ensure!(
                acked.elapsed() < Duration::from_secs(60),
                "{name}: record {i} not committed after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if i > 0 {
            samples.push(acked.elapsed().as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = match broker_cpu_secs(brokers) {
        Some(before) => {
            tokio::time::sleep(Duration::from_secs(args.idle_cpu_secs)).await;
            broker_cpu_secs(brokers)
                .map(|after| (after - before) * 1000.0 / args.idle_cpu_secs as f64)
        }
        None => None,
    };
    shutdown.cancel();
    task.await??;
    let admin = sqlx::PgPool::connect(&args.postgres_url).await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&admin)
        .await?;
    samples.sort_by(f64::total_cmp);
    let q =
        |f: f64| samples[((samples.len() as f64 * f).ceil() as usize).clamp(1, samples.len()) - 1];
    Ok(IdleResult {
        name,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: *samples.last().unwrap_or(&0.0),
        broker_cpu_ms_per_s: cpu,
    })
}

/// `--idle N`: before (librdkafka's fetch wait, no idle close) and the
/// defaults, in one run.
async fn idle_report(args: &Args, brokers: &str, n: usize) -> anyhow::Result<()> {
    let scenario = lisoloo_scenario(&unique_name("i"), (2 * n + 2).div_ceil(16) + 1, 5);
    let records: Vec<RawRecord> = scenario.records;
    anyhow::ensure!(records.len() >= 2 * (n + 1), "scenario too small");
    let (a, b) = records.split_at(n + 1);
    let before = idle(
        "fetch.wait.max.ms=500 (librdkafka default), no idle close",
        args,
        brokers,
        a,
        |c| {
            c.kafka
                .client
                .settings
                .insert("fetch.wait.max.ms".into(), "500".into());
            c.batch.idle_close = c.batch.max_wait;
        },
    )
    .await?;
    let after = idle(
        "defaults (fetch.wait.max.ms=10, batch.idle_close_ms=5)",
        args,
        brokers,
        &b[..n + 1],
        |_| {},
    )
    .await?;
    let mut table = String::from(
        "| consumer | events | ack → committed p50 (ms) | p99 (ms) | max (ms) | broker CPU at idle (ms/s) |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for r in [&before, &after] {
        table.push_str(&format!(
            "| {} | {n} | {:.1} | {:.1} | {:.1} | {} |\n",
            r.name,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.broker_cpu_ms_per_s
                .map_or("–".into(), |c| format!("{c:.1}"))
        ));
    }
    let summary = format!(
        "p50 ratio before/after: {:.1}×; idle broker CPU after/before: {}\n",
        before.p50_ms / after.p50_ms.max(1e-3),
        match (before.broker_cpu_ms_per_s, after.broker_cpu_ms_per_s) {
            (Some(b), Some(a)) => format!("{:.1}×", a / b.max(1e-3)),
            _ => "–".into(),
        }
    );
    println!("{table}\n{summary}");
    let report = format!(
        "# dlrflow-state idle latency\n\n\
         One in-process `dlrflow-state` replica, {} partitions, broker `{brokers}`; single \
         Lisoloo records produced one at a time (100 ms apart, `acks=all`, no linger), each timed \
         from the broker's acknowledgement to its row committed in PostgreSQL. The broker CPU is \
         its user + system time over {} s of idle with the consumer attached.\n\n\
         Command: `cargo run --release -p dlrflow-state --example state-bench -- --idle {n}`\n\n\
         {table}\n{summary}",
        args.partitions, args.idle_cpu_secs
    );
    let out = args.out.with_file_name("state-idle-latency.md");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&out, report).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// `--sustained RATE`: a steady load into a running replica; for every 20th
/// chunk, acknowledged → every record visible in PostgreSQL.
async fn sustained(args: &Args, brokers: &str, rate: usize) -> anyhow::Result<()> {
    const TICK: Duration = Duration::from_millis(10);
    // One chunk in 20 is probed (5 a second), each polled every 5 ms: the
    // probes must not become the load they measure.
    const PROBE_EVERY: usize = 20;
    const POLL: Duration = Duration::from_millis(5);
    let per_chunk = (rate / 100).max(1);
    let chunks = (args.secs as usize * 100).max(1);
    let scenario = lisoloo_scenario(
        &unique_name("u"),
        (per_chunk * chunks + 1).div_ceil(16) + 1,
        5,
    );
    let records: Vec<RawRecord> = scenario.records;
    anyhow::ensure!(records.len() > per_chunk * chunks, "scenario too small");
    let id = unique_name("sustained");
    let schema = id.replace('-', "_");
    let cfg = bench_config(args, brokers, &id).await?;
    let raw = cfg.kafka.raw_topic.clone();
    let app = dlrflow_state::App::build(cfg).await?;
    let pool = app.pool();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run(shutdown.clone()));
    let analyzed = analyze_like_autovacuum(pool.clone(), shutdown.clone()).await?;
    // The producer the ingest has: idempotent, acks=all, no linger.
    let p: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create()?;
    // Warm-up: the group join is not measured.
    produce_raw(&p, &raw, &records[..1]).await?;
    let joined = Instant::now();
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM delivery_events")
        .fetch_one(&pool)
        .await?
        < 1
    {
        anyhow::ensure!(
            joined.elapsed() < Duration::from_secs(60),
            "no commit after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let keys: Vec<String> = records[1..]
        .iter()
        .map(|r| {
            dlrflow_events::parse_record(
                dlrflow_events::Provider::Lisoloo,
                &r.source,
                r.payload.as_bytes(),
            )
            .map(|e| e.dedupe_key().to_owned())
        })
        .collect::<Result<_, _>>()?;
    // The probes' own two connections: they do not take the replica's, and
    // they stay a small load beside it.
    let probe_pool = dlrflow_runtime::settings::PostgresSettings {
        schema: Some(schema.clone()),
        max_connections: 2,
        ..dlrflow_runtime::settings::PostgresSettings::with_url(args.postgres_url.clone())
    }
    .connect()
    .await?;
    let mut probes = tokio::task::JoinSet::new();
    let mut late_ticks = 0usize;
    let started = Instant::now();
    let mut next = tokio::time::Instant::now();
    for c in 0..chunks {
        next += TICK;
        let range = 1 + c * per_chunk..1 + (c + 1) * per_chunk;
        let chunk = records[range.clone()].to_vec();
        let chunk_keys = keys[range.start - 1..range.end - 1].to_vec();
        let (p, raw, pool) = (p.clone(), raw.clone(), probe_pool.clone());
        let probe = c % PROBE_EVERY == 0;
        probes.spawn(async move {
            produce_raw(&p, &raw, &chunk).await?;
            let acked = Instant::now();
            if !probe {
                return Ok::<_, anyhow::Error>(None);
            }
            loop {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM delivery_events WHERE dedupe_key = ANY($1)",
                )
                .bind(&chunk_keys)
                .fetch_one(&pool)
                .await?;
                if n as usize >= chunk_keys.len() {
                    return Ok(Some(acked.elapsed().as_secs_f64() * 1000.0));
                }
                anyhow::ensure!(
                    acked.elapsed() < Duration::from_secs(120),
                    "chunk {c} not visible after 120 s"
                );
                tokio::time::sleep(POLL).await;
            }
        });
        if tokio::time::Instant::now() > next + TICK {
            late_ticks += 1;
        }
        tokio::time::sleep_until(next).await;
    }
    let offered_secs = started.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    while let Some(r) = probes.join_next().await {
        if let Some(ms) = r?? {
            samples.push(ms);
        }
    }
    shutdown.cancel();
    task.await??;
    let admin = sqlx::PgPool::connect(&args.postgres_url).await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&admin)
        .await?;
    samples.sort_by(f64::total_cmp);
    let q =
        |f: f64| samples[((samples.len() as f64 * f).ceil() as usize).clamp(1, samples.len()) - 1];
    let events = per_chunk * chunks;
    let table = format!(
        "| offered | events | achieved events/s | chunks probed | acknowledged → visible p50 (ms) | p99 (ms) | max (ms) | ticks late |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n\
         | {rate}/s for {} s, {per_chunk} every 10 ms | {events} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {late_ticks} |\n",
        args.secs,
        events as f64 / offered_secs,
        samples.len(),
        q(0.5),
        q(0.99),
        samples.last().copied().unwrap_or(0.0),
    );
    println!("{table}");
    let report = format!(
        "# dlrflow-state under a sustained load\n\n\
         One in-process `dlrflow-state` replica (defaults), {} partitions, broker `{brokers}`, \
         PostgreSQL and Redis local. Lisoloo records produced as the ingest produces them \
         (idempotent, `acks=all`, no linger), {per_chunk} every 10 ms; for every 20th chunk the \
         time from the acknowledgement of its records to all of them visible in PostgreSQL \
         (polled every 5 ms by dedupe key over two connections: what the read API serves). \
         \"ticks late\" counts 10 ms ticks the producer loop missed.{}\n\n\
         Command: `cargo run --release -p dlrflow-state --example state-bench -- --sustained {rate} --secs {}`\n\n\
         {table}",
        args.partitions,
        if analyzed {
            " The server runs without autovacuum: the bench ran ANALYZE on the replica's tables \
             every 5 s, as autovacuum's autoanalyze would."
        } else {
            ""
        },
        args.secs
    );
    let out = args.out.with_file_name("state-sustained.md");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&out, report).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// The part dlrflow-state controls, without the broker: parse, Redis
/// check + mark, one PostgreSQL transaction per `chunk` records.
async fn stage(
    args: &Args,
    records: &[RawRecord],
    chunk: usize,
    opts: dlrflow_state::WriteOptions,
) -> anyhow::Result<f64> {
    let id = unique_name("stage");
    let schema = id.replace('-', "_");
    let pg = dlrflow_runtime::settings::PostgresSettings {
        schema: Some(schema.clone()),
        ..dlrflow_runtime::settings::PostgresSettings::with_url(args.postgres_url.clone())
    };
    let pool = pg.connect().await?;
    dlrflow_state::migrate(&pool).await?;
    let mut redis = dlrflow_state::Config::defaults().redis;
    redis.conn.prefix = format!("{id}:");
    redis.ttl = std::time::Duration::from_secs(600);
    let mut dedupe = dlrflow_state::dedupe::Dedupe::connect(&redis).await?;
    let started = Instant::now();
    for part in records.chunks(chunk) {
        let events: Vec<_> = part
            .iter()
            .map(|r| {
                dlrflow_events::parse_record(
                    dlrflow_events::Provider::Lisoloo,
                    &r.source,
                    r.payload.as_bytes(),
                )
            })
            .collect::<Result<_, _>>()?;
        let keys: Vec<&str> = events.iter().map(|e| e.dedupe_key()).collect();
        let seen = dedupe.check(&keys).await?;
        let items: Vec<dlrflow_state::Incoming<'_>> = events
            .iter()
            .zip(part)
            .zip(seen)
            .filter(|(_, s)| !s)
            .map(|((e, r), _)| dlrflow_state::Incoming {
                event: e,
                provider: "lisoloo",
                raw: Some(&r.payload),
                received_at: None,
                traceparent: None,
            })
            .collect();
        let mut tx = pool.begin().await?;
        dlrflow_state::apply_batch_with(&mut tx, &items, opts).await?;
        tx.commit().await?;
        dedupe.committed(keys.iter().copied());
    }
    dedupe.flush().await?;
    let secs = started.elapsed().as_secs_f64();
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await?;
    Ok(records.len() as f64 / secs)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    dlrflow_runtime::telemetry::init_test_logs();
    let brokers = args.brokers.clone().unwrap_or_else(test_brokers);
    if let Some(n) = args.idle {
        return idle_report(&args, &brokers, n.max(2)).await;
    }
    if let Some(rate) = args.sustained {
        return sustained(&args, &brokers, rate.max(100)).await;
    }
    if let Some(rounds) = args.rollup {
        return rollup_report(&args, rounds.max(1)).await;
    }
    let tag = unique_name("b");
    // 5 recipients per message: 1 + 3 * 5 = 16 records per message.
    let scenario = lisoloo_scenario(&tag, args.events.div_ceil(16), 5);
    let records: Vec<RawRecord> = scenario.records.into_iter().take(args.events).collect();
    let naive_records = &records[..args.naive_events.min(records.len())];

    eprintln!("batched run: {} records …", records.len());
    let writers = args
        .writers
        .unwrap_or_else(|| Config::defaults().batch.writers);
    let batched = run(
        format!(
            "batched ({writers} writers, {} records per batch, the relay defers up to 10 s to a backlog)",
            args.max_records
        ),
        &args,
        &brokers,
        &records,
        args.max_records,
        None,
    )
    .await?;
    eprintln!(
        "batched run, relay never deferring: {} records …",
        records.len()
    );
    let no_defer = run(
        format!(
            "batched ({writers} writers, {} records per batch), outbox.max_defer_ms = 0 (the relay publishes beside the consumer)",
            args.max_records
        ),
        &args,
        &brokers,
        &records,
        args.max_records,
        Some(Duration::ZERO),
    )
    .await?;
    eprintln!("naive run: {} records …", naive_records.len());
    let naive = run(
        "naive (1 record per Redis call + transaction)".to_owned(),
        &args,
        &brokers,
        naive_records,
        1,
        None,
    )
    .await?;

    eprintln!("stage runs (no broker) …");
    let stage_n = args.stage_events.unwrap_or(args.events);
    let stage_scenario = lisoloo_scenario(&unique_name("s"), stage_n.div_ceil(16), 5);
    let stage_records: Vec<RawRecord> = stage_scenario.records.into_iter().take(stage_n).collect();
    let on = dlrflow_state::WriteOptions::default();
    let stage_batched = stage(&args, &stage_records, 2000, on).await?;
    let stage_naive = stage(
        &args,
        &stage_records[..naive_records.len().max(1000).min(stage_records.len())],
        1,
        on,
    )
    .await?;
    let speedup = batched.rate() / naive.rate();
    let mut table = String::from(
        "| run | records | produce (s) | first → last commit (s) | incl. group join (s) | events/s committed | first commit → all analytics records acknowledged (s) |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in [&batched, &no_defer, &naive] {
        table.push_str(&format!(
            "| {} | {} | {:.1} | {:.2} | {:.2} | **{:.0}** | {:.2} |\n",
            r.name,
            r.records,
            r.produce_secs,
            r.process_secs,
            r.total_secs,
            r.rate(),
            r.published_secs
        ));
    }
    table.push_str(&format!(
        "| stage only, no broker: parse + Redis + PostgreSQL, 2000 per transaction | {} | – | – | – | {stage_batched:.0} |\n\
         | stage only, no broker: parse + Redis + PostgreSQL, 1 per transaction | {} | – | – | – | {stage_naive:.0} |\n",
        stage_records.len(),
        naive_records.len().max(1000).min(stage_records.len())
    ));
    let summary = format!(
        "end-to-end speedup: {speedup:.1}×; stage speedup: {:.1}× (target ≥ 5×); batched end-to-end {:.0} events/s, stage {stage_batched:.0} events/s (target ≥ 20000)\n",
        stage_batched / stage_naive,
        batched.rate()
    );
    println!("{table}\n{summary}");
    let report = format!(
        "# dlrflow-state benchmark\n\n\
         Raw topic → committed PostgreSQL state (`delivery_events` rows), one in-process \
         `dlrflow-state` replica, {} partitions, broker `{brokers}`, PostgreSQL and Redis local. \
         Lisoloo records (`sms.queued` + processing/sent/delivered|failed for 5 recipients per \
         message), pre-produced before the consumer starts; the rate is measured from the first \
         to the last committed record.\n\n\
         Command: `cargo run --release -p dlrflow-state --example state-bench -- --events {}`\n\n\
         {table}\n{summary}",
        args.partitions, args.events
    );
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&args.out, report).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// `--rollup N`: the stage with the carrier rollup on and off, alternating.
async fn rollup_report(args: &Args, rounds: usize) -> anyhow::Result<()> {
    let n = args.stage_events.unwrap_or(args.events);
    let scenario = lisoloo_scenario(&unique_name("r"), n.div_ceil(16), 5);
    let records: Vec<RawRecord> = scenario.records.into_iter().take(n).collect();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for (rollup, out) in [(true, &mut on), (false, &mut off)] {
            let opts = dlrflow_state::WriteOptions {
                carrier_rollup: rollup,
            };
            let rate = stage(args, &records, 2000, opts).await?;
            eprintln!("round {round}: rollup {rollup}: {rate:.0} events/s");
            out.push(rate);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Each round's on / off pair ran back to back: the median of their
    // ratios is less exposed to load that comes and goes than the ratio of
    // the medians.
    let mut ratios: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a / b).collect();
    let ratio = median(&mut ratios);
    let rounds_on = fmt(&on);
    let rounds_off = fmt(&off);
    let (m_on, m_off) = (median(&mut on), median(&mut off));
    let table = format!(
        "| write path (stage only, 2000 records per transaction) | records | rounds (events/s) | median events/s |\n\
         |---|---:|---|---:|\n\
         | carrier rollup on (the service) | {n} | {rounds_on} | {m_on:.0} |\n\
         | carrier rollup off | {n} | {rounds_off} | {m_off:.0} |\n"
    );
    let summary = format!(
        "rollup cost: {:.1} % of the write path's throughput (median of the rounds' on / off = {ratio:.3}; \
         ratio of the medians {:.3}); load average at the end {}\n",
        (1.0 - ratio) * 100.0,
        m_on / m_off,
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    println!("{table}\n{summary}");
    let out = args.out.with_file_name("state-rollup.md");
    let report = format!(
        "# dlrflow-state: what the carrier rollup costs the write path\n\n\
         The stage alone (parse + Redis dedupe + one PostgreSQL transaction per 2000 records, \
         no broker), Lisoloo records (`sms.queued` + processing/sent/delivered|failed for 5 \
         recipients per message), each round on a fresh schema, rollup on and off alternating.\n\n\
         Command: `cargo run --release -p dlrflow-state --example state-bench -- --rollup {rounds} --stage-events {n}`\n\n\
         {table}\n{summary}"
    );
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&out, report).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
