//! The raw-topic consumer: batches of records → parse → DLQ for poison →
//! Redis fast-path dedupe → one PostgreSQL transaction → offsets stored.
//!
//! Offsets: `enable.auto.commit=true`, `enable.auto.offset.store=false`. An
//! offset is stored only after the batch holding its record was committed to
//! PostgreSQL (and its poison records acknowledged by the DLQ), and only for
//! partitions still assigned. The broker does not fence commits by
//! generation, so the [`StateContext`] tracks the assignment: records of a
//! revoked partition that are still being collected are dropped (the new owner
//! reads them again), and stored offsets are committed synchronously before the
//! partitions are given up. A batch is only processed between polls, so a
//! revoke never interrupts one half-way. A failing batch (Redis, PostgreSQL or
//! the broker down) is retried with backoff and never skipped.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use dlrflow_events::{parse_record, Event, Provider};
use dlrflow_runtime::kafka::{copy_headers, header, header_str};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{BatchConfig, Config};
use crate::dedupe::Dedupe;
use crate::store::{apply_batch, Incoming, Outcome};

/// Headers added to a DLQ record.
pub mod dlq_header {
    pub const ERROR: &str = dlrflow_runtime::kafka::header::ERROR;
    pub const ERROR_KIND: &str = "error-kind";
    pub const ORIGINAL_TOPIC: &str = "original-topic";
    pub const ORIGINAL_PARTITION: &str = "original-partition";
    pub const ORIGINAL_OFFSET: &str = "original-offset";
    /// Every header this crate adds, stripped again on replay.
    pub const ALL: [&str; 5] = [
        ERROR,
        ERROR_KIND,
        ORIGINAL_TOPIC,
        ORIGINAL_PARTITION,
        ORIGINAL_OFFSET,
    ];
}

/// Longest accepted `message_id` / recipient (PostgreSQL btree keys are bounded).
const MAX_ID_LEN: usize = 512;

/// Tracks the partitions this consumer owns and commits before giving any up.
#[derive(Default)]
pub struct StateContext {
    assigned: Mutex<HashSet<(String, i32)>>,
}

impl StateContext {
    pub fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        self.assigned
            .lock()
            .expect("assignment lock")
            .contains(&(topic.to_owned(), partition))
    }
}

impl ClientContext for StateContext {}

impl ConsumerContext for StateContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Commit what is stored while the partitions are still ours; after
            // this no offset of theirs is stored again.
            {
                let mut a = self.assigned.lock().expect("assignment lock");
                for e in tpl.elements() {
                    a.remove(&(e.topic().to_owned(), e.partition()));
                }
            }
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => tracing::info!(partitions = tpl.count(), "committed before revoke"),
                Err(e) => tracing::debug!(error = %e, "nothing committed before revoke"),
            }
            metrics::counter!("dlrflow_state_rebalances_total", "kind" => "revoke").increment(1);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut a = self.assigned.lock().expect("assignment lock");
                for e in tpl.elements() {
                    a.insert((e.topic().to_owned(), e.partition()));
                }
                tracing::info!(partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "assigned");
                metrics::counter!("dlrflow_state_rebalances_total", "kind" => "assign")
                    .increment(1);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

pub type StateConsumer = StreamConsumer<StateContext>;

/// Creates the group consumer, subscribed to the raw topic.
pub fn create_consumer(cfg: &Config) -> anyhow::Result<StateConsumer> {
    let mut client = cfg.kafka.client.clone();
    if let Some(id) = &cfg.kafka.instance_id {
        client
            .settings
            .entry("group.instance.id".into())
            .or_insert_with(|| id.clone());
    }
    let consumer: StateConsumer = client
        .client_config(&[
            ("group.id", cfg.kafka.group_id.clone()),
            ("client.id", "dlrflow-state".into()),
            ("enable.auto.commit", "true".into()),
            ("enable.auto.offset.store", "false".into()),
            ("auto.commit.interval.ms", "1000".into()),
            ("auto.offset.reset", "earliest".into()),
            ("session.timeout.ms", "10000".into()),
            ("heartbeat.interval.ms", "1000".into()),
            ("max.poll.interval.ms", "300000".into()),
            ("partition.assignment.strategy", "range,roundrobin".into()),
            ("reconnect.backoff.ms", "50".into()),
            ("reconnect.backoff.max.ms", "1000".into()),
        ])
        .create_with_context(StateContext::default())
        .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&[&cfg.kafka.raw_topic])
        .with_context(|| format!("subscribing to kafka.raw_topic = {}", cfg.kafka.raw_topic))?;
    Ok(consumer)
}

/// An idempotent `acks=all` producer (DLQ, analytics, replay).
pub fn create_producer(cfg: &Config, client_id: &str) -> anyhow::Result<FutureProducer> {
    cfg.kafka
        .client
        .client_config(&[
            ("client.id", client_id.to_owned()),
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            ("linger.ms", "5".into()),
            // Callers bound their wait with `kafka.produce_timeout_ms`; the
            // record itself never times out in librdkafka, because a timed-out
            // record makes an idempotent producer bump its epoch, which
            // Tansu 0.6.0 cannot handle (its storage panics). A record given
            // up on may still land: analytics and DLQ are at-least-once.
            ("message.timeout.ms", "0".into()),
            ("retry.backoff.ms", "50".into()),
            ("reconnect.backoff.ms", "50".into()),
            ("reconnect.backoff.max.ms", "1000".into()),
        ])
        .create()
        .context("creating the Kafka producer")
}

/// What the consumer loop needs.
pub struct Pipeline {
    pub consumer: StateConsumer,
    pub producer: FutureProducer,
    pub pool: PgPool,
    pub dedupe: Dedupe,
    pub cfg: Config,
    pub outbox_wake: Arc<Notify>,
}

/// A record that cannot become an update.
#[derive(Debug)]
pub struct Poison {
    pub kind: &'static str,
    pub error: String,
}

/// One parsed (or poison) record of a batch.
struct Parsed {
    msg: OwnedMessage,
    result: Result<(Event, Provider), Poison>,
    received_at: Option<DateTime<Utc>>,
    dlq_done: bool,
}

/// Parses and validates one raw record.
pub fn parse(msg: &OwnedMessage) -> Result<(Event, Provider), Poison> {
    let headers = msg.headers();
    let provider_name = header_str(headers, header::PROVIDER).ok_or_else(|| Poison {
        kind: "missing_header",
        error: format!("missing header `{}`", header::PROVIDER),
    })?;
    let provider: Provider = provider_name.parse().map_err(|_| Poison {
        kind: "unknown_provider",
        error: format!("unknown provider `{provider_name}`"),
    })?;
    let source = header_str(headers, header::SOURCE).ok_or_else(|| Poison {
        kind: "missing_header",
        error: format!("missing header `{}`", header::SOURCE),
    })?;
    let event =
        parse_record(provider, source, msg.payload().unwrap_or_default()).map_err(|e| Poison {
            kind: e.kind(),
            error: e.to_string(),
        })?;
    validate(&event)?;
    Ok((event, provider))
}

/// Checks what PostgreSQL would refuse (NUL characters, over-long keys), so a
/// record PostgreSQL rejects can never block its partition.
pub fn validate(event: &Event) -> Result<(), Poison> {
    let bad = |field: &str, why: &str| Poison {
        kind: "invalid_value",
        error: format!("invalid field `{field}`: {why}"),
    };
    let check_id = |field: &str, v: &str| {
        if v.len() > MAX_ID_LEN {
            return Err(bad(field, "longer than 512 bytes"));
        }
        Ok(())
    };
    check_id("message_id", event.message_id())?;
    check_id("dedupe_key", event.dedupe_key())?;
    if let Event::Recipient(u) = event {
        check_id("recipient", &u.recipient)?;
    }
    // Any string field holding U+0000 (text columns cannot): serialize once
    // and look for the escape.
    let text = serde_json::to_string(event).unwrap_or_default();
    if text.contains("\\u0000") {
        return Err(bad("*", "contains U+0000"));
    }
    Ok(())
}

/// Runs until `shutdown`: then finishes (or abandons) the current batch,
/// commits synchronously and leaves the group.
pub async fn run(mut p: Pipeline, shutdown: CancellationToken) -> anyhow::Result<()> {
    let batch_cfg = p.cfg.batch.clone();
    loop {
        let Some(batch) = collect(&p.consumer, &batch_cfg, &shutdown).await else {
            break;
        };
        if batch.is_empty() {
            // Idle: mark what the last batch committed.
            if p.dedupe.has_pending() {
                let _ = p.dedupe.flush().await;
            }
            continue;
        }
        let mut parsed: Vec<Parsed> = batch
            .into_iter()
            .map(|msg| {
                let received_at = header_str(msg.headers(), header::RECEIVED_AT)
                    .and_then(dlrflow_events::parse_timestamp);
                Parsed {
                    result: parse(&msg),
                    msg,
                    received_at,
                    dlq_done: false,
                }
            })
            .collect();
        let mut backoff = Duration::from_millis(batch_cfg.retry_initial_ms);
        let started = std::time::Instant::now();
        let done = loop {
            match process(&mut p, &mut parsed).await {
                Ok(()) => break true,
                Err(e) => {
                    metrics::counter!("dlrflow_state_batch_failures_total").increment(1);
                    tracing::warn!(
                        error = format!("{e:#}"),
                        records = parsed.len(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "batch failed; retrying"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => break false,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(batch_cfg.retry_max_ms));
                }
            }
        };
        if !done {
            tracing::info!(
                records = parsed.len(),
                "shutdown: abandoning the unwritten batch"
            );
            break;
        }
        store_offsets(&p.consumer, &parsed);
        tracing::debug!(
            records = parsed.len(),
            ms = started.elapsed().as_millis() as u64,
            "batch written"
        );
        metrics::histogram!("dlrflow_state_batch_records").record(parsed.len() as f64);
        p.outbox_wake.notify_one();
    }
    let _ = p.dedupe.flush().await;
    let consumer = p.consumer;
    tokio::task::spawn_blocking(move || {
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final commit");
        }
        consumer.unsubscribe();
        drop(consumer);
    })
    .await?;
    tracing::info!("consumer stopped");
    Ok(())
}

/// Waits for a first record (or shutdown → `None`), then collects up to
/// `max_records` within `max_wait`. Records of partitions revoked meanwhile
/// are dropped. Returns an empty batch after an idle second.
async fn collect(
    consumer: &StateConsumer,
    cfg: &BatchConfig,
    shutdown: &CancellationToken,
) -> Option<Vec<OwnedMessage>> {
    let mut batch = Vec::new();
    let first = tokio::select! {
        biased;
        () = shutdown.cancelled() => return None,
        m = consumer.recv() => m,
        () = tokio::time::sleep(Duration::from_secs(1)) => return Some(batch),
    };
    match first {
        Ok(m) => batch.push(m.detach()),
        Err(e) => {
            tracing::warn!(error = %e, "kafka consume error");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Some(batch);
        }
    }
    let deadline = tokio::time::Instant::now() + cfg.max_wait();
    while batch.len() < cfg.max_records {
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => break,
            m = consumer.recv() => match m {
                Ok(m) => batch.push(m.detach()),
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consume error");
                    break;
                }
            },
        }
    }
    let ctx = consumer.context();
    batch.retain(|m| ctx.is_assigned(m.topic(), m.partition()));
    Some(batch)
}

/// Stores `offset + 1` of the last record per partition still assigned.
fn store_offsets(consumer: &StateConsumer, parsed: &[Parsed]) {
    let mut last: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for p in parsed {
        let e = last
            .entry((p.msg.topic(), p.msg.partition()))
            .or_insert(p.msg.offset());
        *e = (*e).max(p.msg.offset());
    }
    let ctx = consumer.context();
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in last {
        if !ctx.is_assigned(topic, partition) {
            continue;
        }
        if tpl
            .add_partition_offset(topic, partition, Offset::Offset(offset + 1))
            .is_err()
        {
            continue;
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.store_offsets(&tpl) {
            // Lost the partition meanwhile: its new owner reads from the last
            // commit, and the writes above are idempotent.
            tracing::info!(error = %e, "offsets not stored");
        }
    }
}

/// One attempt at a batch. Idempotent: retrying after any failure is safe.
#[tracing::instrument(skip_all, fields(records = parsed.len()))]
async fn process(p: &mut Pipeline, parsed: &mut [Parsed]) -> anyhow::Result<()> {
    // Poison records to the DLQ, each once per batch.
    send_to_dlq(&p.producer, &p.cfg, parsed).await?;

    // Redis fast path.
    let good: Vec<usize> = (0..parsed.len())
        .filter(|&i| parsed[i].result.is_ok())
        .collect();
    let keys: Vec<&str> = good
        .iter()
        .map(|&i| match &parsed[i].result {
            Ok((ev, _)) => ev.dedupe_key(),
            Err(_) => unreachable!("filtered above"),
        })
        .collect();
    let seen = p.dedupe.check(&keys).await.context("redis dedupe check")?;
    let mut items = Vec::with_capacity(good.len());
    let mut redis_dupes = 0u64;
    for (&i, seen) in good.iter().zip(&seen) {
        if *seen {
            redis_dupes += 1;
            continue;
        }
        let Ok((ev, provider)) = &parsed[i].result else {
            continue;
        };
        items.push(Incoming {
            event: ev,
            provider: provider.as_str(),
            raw: parsed[i]
                .msg
                .payload()
                .and_then(|b| std::str::from_utf8(b).ok()),
            received_at: parsed[i].received_at,
        });
    }

    // One transaction.
    if !items.is_empty() {
        let mut tx = p.pool.begin().await.context("postgres begin")?;
        let result = apply_batch(&mut tx, &items)
            .await
            .context("postgres write")?;
        tx.commit().await.context("postgres commit")?;
        let mut counts = [0u64; 5];
        for o in &result.outcomes {
            counts[*o as usize] += 1;
        }
        for (o, n) in [
            Outcome::Duplicate,
            Outcome::Unchanged,
            Outcome::Applied,
            Outcome::Conflict,
            Outcome::Message,
        ]
        .into_iter()
        .zip(counts)
        {
            if n > 0 {
                metrics::counter!("dlrflow_state_events_total", "outcome" => o.as_str())
                    .increment(n);
            }
        }
        p.dedupe
            .committed(items.iter().map(|i| i.event.dedupe_key()));
    }
    if redis_dupes > 0 {
        metrics::counter!("dlrflow_state_events_total", "outcome" => "duplicate_redis")
            .increment(redis_dupes);
    }
    Ok(())
}

async fn send_to_dlq(
    producer: &FutureProducer,
    cfg: &Config,
    parsed: &mut [Parsed],
) -> anyhow::Result<()> {
    let mut pending = Vec::new();
    for (i, item) in parsed.iter().enumerate() {
        let Err(poison) = &item.result else { continue };
        if item.dlq_done {
            continue;
        }
        let m = &item.msg;
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        let headers = copy_headers(
            m.headers(),
            &[
                (dlq_header::ERROR, poison.error.as_str()),
                (dlq_header::ERROR_KIND, poison.kind),
                (dlq_header::ORIGINAL_TOPIC, m.topic()),
                (dlq_header::ORIGINAL_PARTITION, &partition),
                (dlq_header::ORIGINAL_OFFSET, &offset),
            ],
        );
        let mut record = FutureRecord::<[u8], [u8]>::to(&cfg.kafka.dlq_topic).headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        let fut = producer
            .send_result(record)
            .map_err(|(e, _)| anyhow::anyhow!("enqueueing to the DLQ: {e}"))?;
        tracing::warn!(kind = poison.kind, error = %poison.error, partition = m.partition(), offset = m.offset(), "poison record to the DLQ");
        pending.push((i, fut));
    }
    let timeout = cfg.kafka.produce_timeout();
    let mut failure = None;
    for (i, fut) in pending {
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(Ok(_))) => {
                parsed[i].dlq_done = true;
                metrics::counter!("dlrflow_state_dlq_total", "kind" => parsed[i].result.as_ref().err().map_or("", |p| p.kind)).increment(1);
            }
            Ok(Ok(Err((e, _)))) => failure = Some(anyhow::anyhow!("producing to the DLQ: {e}")),
            Ok(Err(_)) => failure = Some(anyhow::anyhow!("DLQ delivery cancelled")),
            Err(_) => failure = Some(anyhow::anyhow!("no DLQ acknowledgement within {timeout:?}")),
        }
    }
    failure.map_or(Ok(()), Err)
}
