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
//! revoke never interrupts one half-way.
//!
//! Failures are classified. A backend that is down (PostgreSQL unreachable,
//! a timeout, a serialization failure or deadlock, the broker refusing the
//! DLQ) fails the batch, which is retried with backoff and never skipped. A
//! record PostgreSQL refuses (`StoreError::is_record_error`) never holds back
//! the others: the failing write is split in halves until the record is
//! isolated, the rest commits, and the record goes to the DLQ. Redis is a
//! cache: while it is unreachable dedupe runs on PostgreSQL alone. A record
//! too large for the DLQ goes there as a bounded reference (see
//! [`dlq_header::FORM`]); the raw topic still holds every byte.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use dlrflow_events::{parse_record, Event, Provider};
use dlrflow_runtime::kafka::{copy_headers, header, header_str, raw_key};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{BatchConfig, Config};
use crate::dedupe::{Dedupe, DedupeError};
use crate::health::ConsumerHealth;
use crate::store::{apply_batch, Incoming, Outcome, StoreError};
use dlrflow_runtime::text::{truncate, ERROR_BOUND};

/// Headers added to a DLQ record.
pub mod dlq_header {
    pub const ERROR: &str = dlrflow_runtime::kafka::header::ERROR;
    pub const ERROR_KIND: &str = "error-kind";
    pub const ORIGINAL_TOPIC: &str = "original-topic";
    pub const ORIGINAL_PARTITION: &str = "original-partition";
    pub const ORIGINAL_OFFSET: &str = "original-offset";
    /// `reference` when the DLQ record holds a bounded reference to the raw
    /// record (JSON, see [`super::DlqReference`]) instead of its bytes.
    pub const FORM: &str = "dlq-form";
    /// Every header this crate adds, stripped again on replay.
    pub const ALL: [&str; 6] = [
        ERROR,
        ERROR_KIND,
        ORIGINAL_TOPIC,
        ORIGINAL_PARTITION,
        ORIGINAL_OFFSET,
        FORM,
    ];
}

/// Longest accepted `message_id` / recipient (PostgreSQL btree keys are bounded).
pub const MAX_ID_LEN: usize = 512;

/// Bytes kept free under the producer's `message.max.bytes` for the key,
/// the headers and the record batch's framing when deciding whether a
/// record can go to the DLQ whole.
const DLQ_HEADROOM: usize = 16 * 1024;

/// The payload of a DLQ record whose raw record was too large to copy
/// (header `dlq-form: reference`). `replay` fetches the bytes from the raw
/// topic at `topic`/`partition`/`offset`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DlqReference {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Payload size in bytes.
    pub size: usize,
    /// SHA-256 of the payload, hex.
    pub sha256: String,
    /// The payload's first KiB as text (invalid UTF-8 replaced).
    pub head: String,
    /// The error, truncated to `dlrflow_runtime::text::ERROR_BOUND`.
    pub error: String,
}

/// Tracks the partitions this consumer owns and commits before giving any up.
#[derive(Default)]
pub struct StateContext {
    assigned: Mutex<HashSet<(String, i32)>>,
    /// Partitions were assigned since the last progress report: the next
    /// batch waits for one (see `run`).
    unreported: std::sync::atomic::AtomicBool,
}

impl StateContext {
    /// Whether partitions were assigned since the last call.
    fn take_new_assignment(&self) -> bool {
        self.unreported
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }

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
                self.unreported
                    .store(true, std::sync::atomic::Ordering::SeqCst);
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
            // librdkafka's default (500) is how long the local broker holds
            // a fetch even when records arrive: at idle, half a second per
            // event. 10 ms costs extra fetches at idle (see ARCHITECTURE.md).
            ("fetch.wait.max.ms", "10".into()),
        ])
        .create_with_context(StateContext::default())
        .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&[&cfg.kafka.raw_topic, &cfg.kafka.status_topic])
        .with_context(|| {
            format!(
                "subscribing to kafka.raw_topic = {} and kafka.status_topic = {}",
                cfg.kafka.raw_topic, cfg.kafka.status_topic
            )
        })?;
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
    pub consumer: Arc<StateConsumer>,
    pub producer: FutureProducer,
    pub pool: PgPool,
    pub dedupe: Dedupe,
    pub cfg: Config,
    pub outbox_wake: Arc<Notify>,
    /// Whether the last batch came full (`batch.max_records`): records are
    /// waiting, the consumer has a backlog. The relay defers to it
    /// (`outbox.max_defer_ms`).
    pub backlogged: Arc<AtomicBool>,
    pub health: Arc<ConsumerHealth>,
}

/// A record that cannot become an update.
#[derive(Debug)]
pub struct Poison {
    pub kind: &'static str,
    pub error: String,
}

/// One parsed (or poison) update of a batch: a raw record, or one
/// recipient of a status answer (which makes one per recipient, each with a
/// copy of the record).
struct Parsed {
    msg: OwnedMessage,
    result: Result<(Event, Provider), Poison>,
    /// What `delivery_events.raw` keeps when not the record's bytes: the
    /// update of one recipient of a status answer, as JSON.
    raw: Option<String>,
    received_at: Option<DateTime<Utc>>,
    dlq_done: bool,
    /// The broker refused the whole record: send the bounded reference.
    dlq_reference: bool,
}

/// Where a raw record came from: its key ([`raw_key`]), or the `source` and
/// `provider` headers of a record written before the key carried them.
fn origin(msg: &OwnedMessage) -> Result<(&str, &str), Poison> {
    let headers = msg.headers();
    if let (Some(source), Some(provider)) = (
        header_str(headers, header::SOURCE),
        header_str(headers, header::PROVIDER),
    ) {
        return Ok((source, provider));
    }
    let key = msg.key().and_then(raw_key::decode).ok_or_else(|| Poison {
        kind: "missing_origin",
        error: "the key is not `{source}/{provider}/{message_id}` and no `source` and `provider` headers are present".to_owned(),
    })?;
    Ok((key.source, key.provider))
}

/// When the ingest received a record: the record timestamp (ms), or the
/// `received-at` header (µs) of a record written before.
fn received_at(msg: &OwnedMessage) -> Option<DateTime<Utc>> {
    header_str(msg.headers(), header::RECEIVED_AT)
        .and_then(dlrflow_events::parse_timestamp)
        .or_else(|| {
            msg.timestamp()
                .to_millis()
                .and_then(DateTime::<Utc>::from_timestamp_millis)
        })
}

/// The message id a record's key names (for log lines): the last part of a
/// [`raw_key`], or an earlier record's whole key.
fn key_message_id(msg: &OwnedMessage) -> Option<&str> {
    let key = msg.key()?;
    match raw_key::decode(key) {
        Some(k) => Some(k.message_id).filter(|m| !m.is_empty()),
        None => std::str::from_utf8(key).ok(),
    }
}

/// Parses and validates one raw record.
pub fn parse(msg: &OwnedMessage) -> Result<(Event, Provider), Poison> {
    let (source, provider_name) = origin(msg)?;
    let provider: Provider = provider_name.parse().map_err(|_| Poison {
        kind: "unknown_provider",
        error: format!("unknown provider `{}`", truncate(provider_name, 64)),
    })?;
    if provider == Provider::StatusApi {
        // Only dlrflow-reconcile writes status answers, to its own topic.
        return Err(Poison {
            kind: "status_answer_on_raw_topic",
            error: "a status-API answer belongs on kafka.status_topic".to_owned(),
        });
    }
    let mut event =
        parse_record(provider, source, msg.payload().unwrap_or_default()).map_err(|e| Poison {
            kind: e.kind(),
            error: truncate(&e.to_string(), ERROR_BOUND).into_owned(),
        })?;
    validate(&mut event)?;
    Ok((event, provider))
}

/// Parses and validates one record of the status topic (written by
/// dlrflow-reconcile: key `{source}/status_api/{message_id}`, value the
/// status API's exact answer, timestamp the read time): one authoritative
/// update per recipient, each with its JSON for `delivery_events.raw`. The
/// read time comes from the record, so a replay makes the same updates
/// (and the same dedupe keys).
pub fn parse_status(msg: &OwnedMessage) -> Result<Vec<(Event, String)>, Poison> {
    let key = msg
        .key()
        .and_then(raw_key::decode)
        .filter(|k| k.provider == Provider::StatusApi.as_str())
        .ok_or_else(|| Poison {
            kind: "missing_origin",
            error: "a status record's key is not `{source}/status_api/{message_id}`".to_owned(),
        })?;
    let read_at = msg
        .timestamp()
        .to_millis()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .ok_or_else(|| Poison {
            kind: "missing_timestamp",
            error: "a status record without a timestamp (the read time)".to_owned(),
        })?;
    let snapshot = dlrflow_events::parse_status_response(
        key.source,
        msg.payload().unwrap_or_default(),
        read_at,
    )
    .map_err(|e| Poison {
        kind: e.kind(),
        error: truncate(&e.to_string(), ERROR_BOUND).into_owned(),
    })?;
    if snapshot.message_id != key.message_id {
        return Err(Poison {
            kind: "invalid_value",
            error: format!(
                "the answer is about message `{}`, the key names `{}`",
                truncate(&snapshot.message_id, 128),
                truncate(key.message_id, 128)
            ),
        });
    }
    snapshot
        .recipients
        .into_iter()
        .map(|u| {
            let raw = serde_json::to_string(&u).unwrap_or_default();
            let mut event = Event::Recipient(u);
            validate(&mut event)?;
            Ok((event, raw))
        })
        .collect()
}

/// The updates of one record: one for a raw record (or its poison), one per
/// recipient for a status answer (none for an answer without recipients).
fn expand(msg: OwnedMessage, status_topic: &str) -> Vec<Parsed> {
    let received_at = received_at(&msg);
    let one = |msg, result, raw| Parsed {
        msg,
        result,
        raw,
        received_at,
        dlq_done: false,
        dlq_reference: false,
    };
    if msg.topic() != status_topic {
        let result = parse(&msg);
        return vec![one(msg, result, None)];
    }
    match parse_status(&msg) {
        Err(poison) => vec![one(msg, Err(poison), None)],
        Ok(updates) => updates
            .into_iter()
            .map(|(event, raw)| one(msg.clone(), Ok((event, Provider::StatusApi)), Some(raw)))
            .collect(),
    }
}

/// Checks what PostgreSQL would refuse in the keys (NUL characters, keys too
/// long for a btree index) and makes free text storable: a NUL in a carrier
/// name or an error text becomes U+FFFD instead of costing the status.
/// Anything else PostgreSQL refuses is isolated when the batch is written.
pub fn validate(event: &mut Event) -> Result<(), Poison> {
    let bad = |field: &str, why: &str| Poison {
        kind: "invalid_value",
        error: format!("invalid field `{field}`: {why}"),
    };
    let check_id = |field: &str, v: &str| {
        if v.len() > MAX_ID_LEN {
            return Err(bad(field, "longer than 512 bytes"));
        }
        if v.contains('\0') {
            return Err(bad(field, "contains U+0000"));
        }
        Ok(())
    };
    check_id(
        "source",
        match event {
            Event::Recipient(u) => &u.source,
            Event::Message(m) => &m.source,
        },
    )?;
    check_id("message_id", event.message_id())?;
    check_id("dedupe_key", event.dedupe_key())?;
    let clean = |v: &mut Option<String>| {
        if let Some(s) = v.as_mut().filter(|s| s.contains('\0')) {
            *s = s.replace('\0', "\u{fffd}");
        }
    };
    match event {
        Event::Recipient(u) => {
            check_id("recipient", &u.recipient)?;
            clean(&mut u.carrier);
            clean(&mut u.error_code);
            clean(&mut u.error_message);
            clean(&mut u.custom_payload);
        }
        Event::Message(m) => clean(&mut m.currency),
    }
    Ok(())
}

/// Runs until `shutdown`: then finishes (or abandons) the current batch,
/// commits synchronously and leaves the group.
pub async fn run(mut p: Pipeline, shutdown: CancellationToken) -> anyhow::Result<()> {
    started();
    let batch_cfg = p.cfg.batch.clone();
    let mut lag_checked = std::time::Instant::now();
    // Per partition, the newest record time written to the state: the
    // freshness while the partition has lag.
    let mut written: HashMap<i32, DateTime<Utc>> = HashMap::new();
    // Per partition, the offset after the last record of a finished batch
    // (written or dead-lettered): how far the state is complete. The fetch
    // position is further: fetched records may still wait in a batch.
    let mut applied: HashMap<i32, i64> = HashMap::new();
    loop {
        p.health.tick();
        if lag_checked.elapsed() >= p.cfg.health.lag_check_interval {
            lag_checked = std::time::Instant::now();
            observe_lag(&p, &written, &applied).await;
        }
        let Some(batch) = collect(&p.consumer, &batch_cfg, &shutdown).await else {
            break;
        };
        let backlogged = batch.len() >= batch_cfg.max_records;
        if p.backlogged.swap(backlogged, Ordering::Relaxed) && !backlogged {
            // Caught up: a deferring relay goes on at once.
            p.outbox_wake.notify_one();
        }
        if !batch.is_empty() && p.consumer.context().take_new_assignment() {
            // New partitions report their progress (lag unknown until this
            // process applied something) before their first batch is written:
            // the reconciler never sees state it was not told may be
            // incomplete, even when this process dies right after the batch.
            lag_checked = std::time::Instant::now();
            observe_lag(&p, &written, &applied).await;
        }
        if batch.is_empty() {
            // Idle: mark what the last batch committed.
            if p.dedupe.has_pending() {
                let result = p.dedupe.flush().await;
                note_redis(&p.health, result.err());
            }
            continue;
        }
        let offsets = last_offsets(batch.iter());
        let mut parsed: Vec<Parsed> = batch
            .into_iter()
            .flat_map(|msg| expand(msg, &p.cfg.kafka.status_topic))
            .collect();
        let span = batch_span(&p.cfg, &parsed);
        let mut backoff = batch_cfg.retry_initial;
        let started = std::time::Instant::now();
        let done = loop {
            match process(&mut p, &mut parsed).instrument(span.clone()).await {
                Ok(()) => break true,
                Err(e) => {
                    let error = format!("{e:#}");
                    p.health.batch_failed(&error);
                    metrics::counter!("dlrflow_state_batch_failures_total").increment(1);
                    tracing::warn!(
                        error = %truncate(&error, ERROR_BOUND),
                        records = parsed.len(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "batch failed; retrying"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => break false,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(batch_cfg.retry_max);
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
        p.health.batch_ok();
        observe_written(&p.cfg, &parsed, &mut written);
        for ((topic, partition), offset) in &offsets {
            if *topic == p.cfg.kafka.raw_topic {
                let next = applied.entry(*partition).or_insert(0);
                *next = (*next).max(offset + 1);
            }
        }
        store_offsets(&p.consumer, &offsets);
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

/// When this process's consumer first looked at its lag.
fn started() -> std::time::Instant {
    static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *STARTED.get_or_init(std::time::Instant::now)
}

/// The span of one batch (`process batch`, a consumer span with the
/// messaging attributes), linked to each record's trace context: a batch
/// has many parents. Its children are the steps of [`process`].
fn batch_span(cfg: &Config, parsed: &[Parsed]) -> tracing::Span {
    let span = tracing::info_span!(
        "process batch",
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.batch.message_count = parsed.len() as i64,
        trace_id = tracing::field::Empty,
    );
    dlrflow_runtime::otel::record_trace_id(&span);
    dlrflow_runtime::otel::attribute(
        &span,
        "messaging.destination.name",
        cfg.kafka.raw_topic.clone(),
    );
    dlrflow_runtime::otel::attribute(
        &span,
        "messaging.consumer.group.name",
        cfg.kafka.group_id.clone(),
    );
    for r in parsed.iter().filter(|_| dlrflow_runtime::otel::enabled()) {
        dlrflow_runtime::otel::link_record(
            &span,
            header_str(r.msg.headers(), header::TRACEPARENT),
            r.msg.partition(),
            r.msg.offset(),
        );
    }
    span
}

/// A written batch in the metrics: for each record the time from its
/// receipt by the ingest (its record timestamp, or an earlier record's
/// `received-at`) to
/// now, its state committed (`dlrflow_state_received_to_committed_seconds`);
/// and per partition the newest record time written, for the freshness.
fn observe_written(cfg: &Config, parsed: &[Parsed], written: &mut HashMap<i32, DateTime<Utc>>) {
    let now = Utc::now();
    for r in parsed
        .iter()
        .filter(|r| r.msg.topic() == cfg.kafka.raw_topic)
    {
        let Some(at) = r.received_at else {
            continue;
        };
        let age = (now - at).to_std().unwrap_or_default();
        metrics::histogram!("dlrflow_state_received_to_committed_seconds")
            .record(age.as_secs_f64());
        let newest = written.entry(r.msg.partition()).or_insert(at);
        *newest = (*newest).max(at);
    }
}

/// Tells the health, per assigned partition, how far the consumer is and how
/// many records are behind it (`dlrflow_state_consumer_lag_records`), and how
/// old the oldest record not yet in the state is at most
/// (`dlrflow_state_freshness_seconds`: 0 without lag; with lag, the age of
/// the newest record written, which the first unwritten one is not older
/// than; the time since the consumer started while nothing was written yet).
/// The same bound goes to the `consumer_progress` table for the reconciler.
async fn observe_lag(
    p: &Pipeline,
    written: &HashMap<i32, DateTime<Utc>>,
    applied: &HashMap<i32, i64>,
) {
    let consumer = p.consumer.clone();
    let applied = applied.clone();
    let raw_topic = p.cfg.kafka.raw_topic.clone();
    // Taken before the watermarks: a partition without lag then holds every
    // record received before this instant.
    let observed_at = Utc::now();
    let observed = tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_millis(500);
        // The assigned partitions; how far each is complete is what this
        // process applied, else (nothing applied here yet) where the group
        // left off — never the fetch position, which counts records still
        // waiting in a batch as done.
        let position = consumer.position().ok()?;
        // How many partitions the raw topic has: the replicas' assignments
        // together should hold them all (`dlrflow_state_assigned_partitions`).
        if let Ok(md) = consumer.fetch_metadata(Some(&raw_topic), timeout) {
            if let Some(t) = md.topics().iter().find(|t| t.name() == raw_topic) {
                metrics::gauge!("dlrflow_state_raw_partitions").set(t.partitions().len() as f64);
            }
        }
        let mut committed = None;
        let mut out = Vec::new();
        // The raw topic's partitions: the status topic's answers are not
        // what the reconciler waits for.
        for e in position
            .elements()
            .iter()
            .filter(|e| e.topic() == raw_topic)
        {
            let at = match applied.get(&e.partition()) {
                Some(&o) => o,
                None => {
                    let c = committed.get_or_insert_with(|| consumer.committed(timeout).ok());
                    match c
                        .as_ref()
                        .and_then(|c| c.find_partition(e.topic(), e.partition()))
                        .map(|c| c.offset())
                    {
                        Some(Offset::Offset(o)) => o,
                        _ => 0,
                    }
                }
            };
            let Ok((low, high)) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)
            else {
                continue;
            };
            out.push((e.partition(), at, (high - at.max(low)).max(0)));
        }
        Some(out)
    })
    .await
    .ok()
    .flatten();
    let Some(partitions) = observed else {
        return;
    };
    metrics::gauge!("dlrflow_state_assigned_partitions").set(partitions.len() as f64);
    let now = Utc::now();
    let mut caught_up = Vec::with_capacity(partitions.len());
    for (partition, _, lag) in &partitions {
        metrics::gauge!("dlrflow_state_consumer_lag_records", "partition" => partition.to_string())
            .set(*lag as f64);
        let bound = match (lag, written.get(partition)) {
            (0, _) => Some(observed_at),
            (_, Some(at)) => Some(*at),
            (_, None) => None,
        };
        let freshness = match bound {
            Some(at) if *lag > 0 => (now - at).to_std().unwrap_or_default().as_secs_f64(),
            Some(_) => 0.0,
            None => started().elapsed().as_secs_f64(),
        };
        metrics::gauge!("dlrflow_state_freshness_seconds", "partition" => partition.to_string())
            .set(freshness);
        caught_up.push(bound);
    }
    // A partition given up is reported by its new owner: this replica's
    // last figures for it would stay in the sums for ever.
    for gone in p.health.partitions(&partitions) {
        let partition = gone.to_string();
        metrics::gauge!("dlrflow_state_consumer_lag_records", "partition" => partition.clone())
            .set(0.0);
        metrics::gauge!("dlrflow_state_freshness_seconds", "partition" => partition).set(0.0);
    }
    if let Err(e) = write_progress(&p.pool, &p.cfg, &partitions, &caught_up, observed_at).await {
        dlrflow_runtime::telemetry::backend_error("postgres", "progress");
        tracing::warn!(error = %truncate(&e.to_string(), 300), "could not record the consumer's progress");
    }
}

/// Upserts one `consumer_progress` row per assigned partition. An unknown
/// bound keeps the one recorded before (still true: the state keeps what it
/// wrote).
async fn write_progress(
    pool: &PgPool,
    cfg: &Config,
    partitions: &[(i32, i64, i64)],
    caught_up: &[Option<DateTime<Utc>>],
    observed_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    if partitions.is_empty() {
        return Ok(());
    }
    let ids: Vec<i32> = partitions.iter().map(|(p, _, _)| *p).collect();
    let lags: Vec<i64> = partitions.iter().map(|(_, _, l)| *l).collect();
    sqlx::query(
        "INSERT INTO consumer_progress (group_id, topic, partition, caught_up_to, lag_records, observed_at) \
         SELECT $1, $2, p, c, l, $6 FROM unnest($3::int[], $4::timestamptz[], $5::bigint[]) AS u(p, c, l) \
         ON CONFLICT (group_id, topic, partition) DO UPDATE SET \
           caught_up_to = coalesce(excluded.caught_up_to, consumer_progress.caught_up_to), \
           lag_records = excluded.lag_records, observed_at = excluded.observed_at",
    )
    .bind(&cfg.kafka.group_id)
    .bind(&cfg.kafka.raw_topic)
    .bind(&ids)
    .bind(caught_up)
    .bind(&lags)
    .bind(observed_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records the outcome of a Redis round trip in the health and the log
/// (one warning when Redis goes away, one line when it is back).
fn note_redis(health: &ConsumerHealth, error: Option<DedupeError>) {
    let was_degraded = !health.verdict().degraded.is_empty();
    match error {
        None => {
            if was_degraded {
                tracing::info!("redis reachable again; dedupe fast path restored");
            }
            health.redis(None);
        }
        // A skipped round trip says nothing new.
        Some(DedupeError::Backoff) => {}
        Some(DedupeError::Redis(e)) => {
            dlrflow_runtime::telemetry::backend_error("redis", "dedupe");
            let text = dlrflow_runtime::redact::scrub(&e.to_string());
            if !was_degraded {
                tracing::warn!(error = %text, "redis unreachable: degraded, deduping through PostgreSQL alone");
            }
            health.redis(Some(text));
        }
    }
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
    // Closes at `max_wait` after the first record, or as soon as no record
    // came for `idle_close` (nothing more was fetched: waiting longer only
    // adds latency). A saturated consumer always has records queued, so its
    // batches still fill up.
    let deadline = tokio::time::Instant::now() + cfg.max_wait;
    while batch.len() < cfg.max_records {
        let gap = (tokio::time::Instant::now() + cfg.idle_close).min(deadline);
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(gap) => break,
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

/// The offset of the last record per topic and partition of `batch`.
fn last_offsets<'a>(batch: impl Iterator<Item = &'a OwnedMessage>) -> BTreeMap<(String, i32), i64> {
    let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for m in batch {
        let e = last
            .entry((m.topic().to_owned(), m.partition()))
            .or_insert(m.offset());
        *e = (*e).max(m.offset());
    }
    last
}

/// Stores `offset + 1` of the last record per partition still assigned.
fn store_offsets(consumer: &StateConsumer, last: &BTreeMap<(String, i32), i64>) {
    let ctx = consumer.context();
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in last {
        if !ctx.is_assigned(topic, *partition) {
            continue;
        }
        if tpl
            .add_partition_offset(topic, *partition, Offset::Offset(offset + 1))
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
/// Returns an error only for a failure of a backend (retry the batch).
async fn process(p: &mut Pipeline, parsed: &mut [Parsed]) -> anyhow::Result<()> {
    // Poison records to the DLQ, each once per batch.
    send_to_dlq(&p.producer, &p.cfg, parsed)
        .instrument(tracing::info_span!("dlq publish", otel.kind = "producer"))
        .await?;

    // Redis fast path; without Redis every key goes to PostgreSQL.
    let good: Vec<usize> = (0..parsed.len())
        .filter(|&i| parsed[i].result.is_ok())
        .collect();
    let keys: Vec<&str> = good
        .iter()
        .filter_map(|&i| {
            parsed[i]
                .result
                .as_ref()
                .ok()
                .map(|(ev, _)| ev.dedupe_key())
        })
        .collect();
    let dedupe_span = tracing::info_span!("dedupe", otel.kind = "client", db.system = "redis");
    let seen = match p.dedupe.check(&keys).instrument(dedupe_span).await {
        Ok(seen) => {
            note_redis(&p.health, None);
            seen
        }
        Err(e) => {
            note_redis(&p.health, Some(e));
            vec![false; keys.len()]
        }
    };
    let mut todo = Vec::with_capacity(good.len());
    let mut redis_dupes = 0u64;
    let mut dropped: Vec<usize> = Vec::new();
    for (&i, seen) in good.iter().zip(&seen) {
        if *seen {
            redis_dupes += 1;
            dropped.push(i);
        } else {
            todo.push(i);
        }
    }
    if redis_dupes > 0 {
        metrics::counter!("dlrflow_state_events_total", "outcome" => "duplicate_redis")
            .increment(redis_dupes);
    }

    // PostgreSQL, isolating any record it refuses.
    let written = write_isolating(&p.pool, parsed, todo, p.cfg.batch.writers)
        .instrument(tracing::info_span!(
            "postgres transaction",
            otel.kind = "client",
            db.system = "postgresql"
        ))
        .await
        .inspect_err(|_| dlrflow_runtime::telemetry::backend_error("postgres", "write_batch"))?;
    dropped.extend(
        written
            .committed
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Duplicate))
            .map(|&(i, _)| i),
    );
    count_dropped(&p.pool, parsed, &dropped).await;
    p.dedupe.committed(written.committed.iter().map(|&(i, _)| {
        parsed[i]
            .result
            .as_ref()
            .map_or("", |(ev, _)| ev.dedupe_key())
    }));
    if !written.rejected.is_empty() {
        for (i, poison) in written.rejected {
            parsed[i].result = Err(poison);
        }
        send_to_dlq(&p.producer, &p.cfg, parsed).await?;
    }
    Ok(())
}

/// Adds the duplicates a batch dropped to `dropped_copies` (for the
/// operator page), one statement per batch. Best effort: the state is
/// already committed, so a failure is logged and counted, never retried.
async fn count_dropped(pool: &PgPool, parsed: &[Parsed], dropped: &[usize]) {
    if dropped.is_empty() {
        return;
    }
    let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for &i in dropped {
        if let Ok((ev, _)) = &parsed[i].result {
            let key = match ev {
                Event::Recipient(u) => (u.message_id.as_str(), u.recipient.as_str()),
                Event::Message(m) => (m.message_id.as_str(), ""),
            };
            *counts.entry(key).or_default() += 1;
        }
    }
    let (ids, rest): (Vec<&str>, Vec<(&str, i64)>) =
        counts.iter().map(|(&(m, r), &n)| (m, (r, n))).unzip();
    let (recipients, copies): (Vec<&str>, Vec<i64>) = rest.into_iter().unzip();
    let done = sqlx::query(
        "INSERT INTO dropped_copies (message_id, recipient, copies, last_at) \
         SELECT m, r, n, now() FROM unnest($1::text[], $2::text[], $3::int8[]) AS u(m, r, n) \
         ON CONFLICT (message_id, recipient) DO UPDATE \
            SET copies = dropped_copies.copies + excluded.copies, last_at = excluded.last_at",
    )
    .bind(&ids)
    .bind(&recipients)
    .bind(&copies)
    .execute(pool)
    .await;
    if let Err(e) = done {
        metrics::counter!("dlrflow_state_dropped_copies_errors_total").increment(1);
        tracing::warn!(error = %e, "counting dropped duplicates for the operator page");
    }
}

/// Where one record of [`dispose`] ended.
#[derive(Debug)]
pub enum Disposition {
    /// Recorded in PostgreSQL with this outcome.
    Written(Outcome),
    /// For the DLQ: unparsable, refused by PostgreSQL, or foreign.
    Dead(Poison),
}

/// What the consumer does with a batch, minus Redis and the DLQ: parses
/// `msgs` and writes them through the one write path, isolating any record
/// PostgreSQL refuses. An error means a backend failed (retry); otherwise
/// every record has a disposition, in order.
pub async fn dispose(pool: &PgPool, msgs: Vec<OwnedMessage>) -> anyhow::Result<Vec<Disposition>> {
    let parsed: Vec<Parsed> = msgs
        .into_iter()
        .map(|msg| Parsed {
            result: parse(&msg),
            raw: None,
            received_at: None,
            msg,
            dlq_done: false,
            dlq_reference: false,
        })
        .collect();
    let todo = (0..parsed.len())
        .filter(|&i| parsed[i].result.is_ok())
        .collect();
    let written = write_isolating(pool, &parsed, todo, 1).await?;
    let mut out: Vec<Option<Disposition>> = parsed
        .into_iter()
        .map(|p| p.result.err().map(Disposition::Dead))
        .collect();
    for (i, o) in written.committed {
        out[i] = Some(Disposition::Written(o));
    }
    for (i, poison) in written.rejected {
        out[i] = Some(Disposition::Dead(poison));
    }
    Ok(out
        .into_iter()
        .map(|d| d.expect("every record has a disposition"))
        .collect())
}

/// What `rebuild` does with a run of records of the raw and status topics:
/// expands and writes them through the one write path exactly as the
/// consumer does, minus Redis (PostgreSQL decides every duplicate) and the
/// DLQ (what the consumer would dead-letter is only counted). Returns the
/// updates written and the dead ones; an error means a backend failed.
pub async fn apply_log(
    pool: &PgPool,
    msgs: Vec<OwnedMessage>,
    status_topic: &str,
) -> anyhow::Result<(u64, u64)> {
    let parsed: Vec<Parsed> = msgs
        .into_iter()
        .flat_map(|m| expand(m, status_topic))
        .collect();
    let todo: Vec<usize> = (0..parsed.len())
        .filter(|&i| parsed[i].result.is_ok())
        .collect();
    let poison = (parsed.len() - todo.len()) as u64;
    let written = write_isolating(pool, &parsed, todo, 1).await?;
    Ok((
        written.committed.len() as u64,
        poison + written.rejected.len() as u64,
    ))
}

/// What [`write_isolating`] did.
struct Written {
    /// Records now recorded in PostgreSQL (their dedupe keys may be marked),
    /// with their outcomes.
    committed: Vec<(usize, Outcome)>,
    /// Records PostgreSQL refused, or foreign to their message's source.
    rejected: Vec<(usize, Poison)>,
}

/// Writes the records `todo` of `parsed`, one transaction per chunk. A chunk
/// PostgreSQL refuses for its values is split in halves until the refused
/// record stands alone; it is returned in `rejected` and the rest is
/// written. A backend failure is returned as an error (retry everything:
/// what was written is deduplicated).
async fn write_isolating(
    pool: &PgPool,
    parsed: &[Parsed],
    todo: Vec<usize>,
    writers: usize,
) -> anyhow::Result<Written> {
    // Each message's records in one part, the parts written side by side
    // on their own connections: disjoint recipients, so they never wait on
    // each other's locks but for the shared carrier rollup rows (taken in
    // key order, last, as replicas do).
    let writers = writers.clamp(1, todo.len().max(1));
    let mut parts: Vec<Vec<usize>> = vec![Vec::with_capacity(todo.len() / writers + 1); writers];
    for i in todo {
        let message_id = parsed[i]
            .result
            .as_ref()
            .map_or("", |(ev, _)| ev.message_id());
        parts[part_of(message_id, writers)].push(i);
    }
    let written =
        futures::future::try_join_all(parts.into_iter().map(|part| write_part(pool, parsed, part)))
            .await?;
    let mut out = Written {
        committed: Vec::new(),
        rejected: Vec::new(),
    };
    let mut counts = [0u64; 6];
    for (w, c) in written {
        out.committed.extend(w.committed);
        out.rejected.extend(w.rejected);
        for (total, n) in counts.iter_mut().zip(c) {
            *total += n;
        }
    }
    for (o, n) in [
        Outcome::Duplicate,
        Outcome::Unchanged,
        Outcome::Applied,
        Outcome::Conflict,
        Outcome::Message,
        Outcome::Foreign,
    ]
    .into_iter()
    .zip(counts)
    {
        if n > 0 {
            metrics::counter!("dlrflow_state_events_total", "outcome" => o.as_str()).increment(n);
        }
    }
    Ok(out)
}

/// Which of `parts` writers takes a message (FNV-1a: the same in every
/// process).
fn part_of(message_id: &str, parts: usize) -> usize {
    (crate::store::fnv1a(message_id.as_bytes()) % parts as u64) as usize
}

/// Writes one part of a batch in one transaction, halving it until the
/// record PostgreSQL refuses is alone. Returns what was written and the
/// outcome counts.
async fn write_part(
    pool: &PgPool,
    parsed: &[Parsed],
    todo: Vec<usize>,
) -> anyhow::Result<(Written, [u64; 6])> {
    let mut out = Written {
        committed: Vec::with_capacity(todo.len()),
        rejected: Vec::new(),
    };
    let mut counts = [0u64; 6];
    let mut chunks = vec![todo];
    while let Some(chunk) = chunks.pop() {
        if chunk.is_empty() {
            continue;
        }
        let items: Vec<Incoming<'_>> = chunk
            .iter()
            .filter_map(|&i| {
                let (ev, provider) = parsed[i].result.as_ref().ok()?;
                Some(Incoming {
                    event: ev,
                    provider: provider.as_str(),
                    raw: parsed[i].raw.as_deref().or_else(|| {
                        parsed[i]
                            .msg
                            .payload()
                            .and_then(|b| std::str::from_utf8(b).ok())
                    }),
                    received_at: parsed[i].received_at,
                    traceparent: header_str(parsed[i].msg.headers(), header::TRACEPARENT)
                        .and_then(dlrflow_runtime::trace::valid_traceparent),
                })
            })
            .collect();
        match write_chunk(pool, &items).await {
            Ok(outcomes) => {
                for (&i, o) in chunk.iter().zip(outcomes) {
                    counts[o as usize] += 1;
                    if o == Outcome::Foreign {
                        let message_id = parsed[i]
                            .result
                            .as_ref()
                            .map_or("", |(ev, _)| ev.message_id());
                        out.rejected.push((
                            i,
                            Poison {
                                kind: "foreign_source",
                                error: format!(
                                    "message `{}` belongs to another source",
                                    truncate(message_id, 128)
                                ),
                            },
                        ));
                    } else {
                        out.committed.push((i, o));
                    }
                }
            }
            Err(e) if e.is_record_error() && chunk.len() == 1 => {
                let error = truncate(&e.to_string(), ERROR_BOUND).into_owned();
                metrics::counter!("dlrflow_state_records_refused_total").increment(1);
                out.rejected.push((
                    chunk[0],
                    Poison {
                        kind: "refused_by_database",
                        error,
                    },
                ));
            }
            Err(e) if e.is_record_error() => {
                tracing::info!(
                    records = chunk.len(),
                    error = %truncate(&e.to_string(), ERROR_BOUND),
                    "PostgreSQL refused a record; isolating it"
                );
                let (a, b) = chunk.split_at(chunk.len() / 2);
                chunks.push(b.to_vec());
                chunks.push(a.to_vec());
            }
            Err(e) => return Err(anyhow::Error::new(e).context("postgres write")),
        }
    }
    Ok((out, counts))
}

/// One transaction: the outcomes of `items` in order.
async fn write_chunk(pool: &PgPool, items: &[Incoming<'_>]) -> Result<Vec<Outcome>, StoreError> {
    let mut tx = pool.begin().await?;
    let result = apply_batch(&mut tx, items).await?;
    tx.commit().await?;
    Ok(result.outcomes)
}

/// Whether a DLQ record is a [`DlqReference`] rather than the raw record.
pub fn is_reference(m: &OwnedMessage) -> bool {
    header_str(m.headers(), dlq_header::FORM) == Some("reference")
}

/// The largest DLQ record sent whole; larger ones go as a [`DlqReference`].
fn dlq_limit(cfg: &Config) -> usize {
    cfg.kafka
        .client
        .max_message_bytes()
        .saturating_sub(DLQ_HEADROOM)
}

/// The bounded reference to `m` (see [`DlqReference`]).
fn reference(m: &OwnedMessage, error: &str) -> String {
    use sha2::Digest;
    let payload = m.payload().unwrap_or_default();
    let r = DlqReference {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        size: payload.len(),
        sha256: hex::encode(sha2::Sha256::digest(payload)),
        head: dlrflow_runtime::text::head(payload, 1024),
        error: error.to_owned(),
    };
    serde_json::to_string(&r).unwrap_or_default()
}

async fn send_to_dlq(
    producer: &FutureProducer,
    cfg: &Config,
    parsed: &mut [Parsed],
) -> anyhow::Result<()> {
    let limit = dlq_limit(cfg);
    let mut pending = Vec::new();
    for (i, item) in parsed.iter_mut().enumerate() {
        let Err(poison) = &item.result else { continue };
        if item.dlq_done {
            continue;
        }
        let m = &item.msg;
        let error = truncate(&poison.error, ERROR_BOUND);
        let original_headers: usize = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                    .sum()
            })
            .unwrap_or(0);
        let whole = m.payload().map_or(0, <[u8]>::len)
            + m.key().map_or(0, <[u8]>::len)
            + original_headers
            + error.len()
            <= limit;
        if !whole {
            item.dlq_reference = true;
        }
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        let mut extra = vec![
            (dlq_header::ERROR, error.as_ref()),
            (dlq_header::ERROR_KIND, poison.kind),
            (dlq_header::ORIGINAL_TOPIC, m.topic()),
            (dlq_header::ORIGINAL_PARTITION, &partition),
            (dlq_header::ORIGINAL_OFFSET, &offset),
        ];
        let body;
        let headers = if item.dlq_reference {
            extra.push((dlq_header::FORM, "reference"));
            body = reference(m, &error);
            // The original headers are kept when they are small (they are
            // the ingest's own); otherwise only the DLQ's.
            if original_headers <= 8 * 1024 {
                copy_headers(m.headers(), &extra)
            } else {
                copy_headers::<rdkafka::message::OwnedHeaders>(None, &extra)
            }
        } else {
            body = String::new();
            copy_headers(m.headers(), &extra)
        };
        let mut record = FutureRecord::<[u8], [u8]>::to(&cfg.kafka.dlq_topic).headers(headers);
        // The raw record's timestamp is its receive time: kept, so a replay
        // gives it back (the DLQ's retention counts from it too).
        if let Some(t) = m.timestamp().to_millis() {
            record = record.timestamp(t);
        }
        if let Some(k) = m.key().filter(|k| k.len() <= MAX_ID_LEN * 4) {
            record = record.key(k);
        }
        if item.dlq_reference {
            record = record.payload(body.as_bytes());
        } else if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        let fut = match producer.send_result(record) {
            Ok(fut) => fut,
            Err((e, _)) if is_too_large(&e) && !item.dlq_reference => {
                // Caught before it left: the next attempt sends the reference.
                item.dlq_reference = true;
                anyhow::bail!("enqueueing to the DLQ: {e} (retrying as a reference)");
            }
            Err((e, _)) => anyhow::bail!("enqueueing to the DLQ: {e}"),
        };
        tracing::warn!(
            kind = poison.kind,
            error = %truncate(&error, 300),
            partition = m.partition(),
            offset = m.offset(),
            message_id = key_message_id(m).map(|k| truncate(k, 128)).as_deref(),
            trace_id = header_str(m.headers(), header::TRACEPARENT).and_then(dlrflow_runtime::trace::trace_id),
            reference = item.dlq_reference,
            "poison record to the DLQ"
        );
        pending.push((i, fut));
    }
    let timeout = cfg.kafka.produce_timeout;
    let mut failure = None;
    for (i, fut) in pending {
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(Ok(_))) => {
                parsed[i].dlq_done = true;
                let kind = parsed[i].result.as_ref().err().map_or("", |p| p.kind);
                metrics::counter!("dlrflow_state_dlq_total", "kind" => kind).increment(1);
            }
            Ok(Ok(Err((e, _)))) => {
                if is_too_large(&e) {
                    parsed[i].dlq_reference = true;
                }
                failure = Some(anyhow::anyhow!("producing to the DLQ: {e}"));
            }
            Ok(Err(_)) => failure = Some(anyhow::anyhow!("DLQ delivery cancelled")),
            Err(_) => failure = Some(anyhow::anyhow!("no DLQ acknowledgement within {timeout:?}")),
        }
    }
    failure.map_or(Ok(()), Err)
}

/// The producer or the broker refused a record for its size.
fn is_too_large(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::MessageSizeTooLarge | C::InvalidRecord | C::InvalidMessageSize)
    )
}

#[cfg(test)]
mod origin_tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::Timestamp;

    const BODY: &str = r#"{"event_id":"f8a3b7c1-2e4d-4a9b-9d8f-7c6e5b4a3d2c","event_type":"sms.delivered","timestamp":"2026-05-27T10:15:08Z","message_id":"m1","data":{"recipient_phone":"+243998857000","delivered_at":"2026-05-27T10:15:08Z"}}"#;

    fn msg(key: Option<&str>, headers: &[(&str, &str)], ts: Timestamp) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        OwnedMessage::new(
            Some(BODY.as_bytes().to_vec()),
            key.map(|k| k.as_bytes().to_vec()),
            "raw".into(),
            ts,
            0,
            7,
            (!headers.is_empty()).then_some(h),
        )
    }

    fn source_of(m: &OwnedMessage) -> String {
        match parse(m).unwrap().0 {
            Event::Recipient(u) => u.source,
            Event::Message(m) => m.source,
        }
    }

    #[test]
    fn the_key_names_the_source_and_the_timestamp_is_the_receive_time() {
        let m = msg(
            Some("acme/lisoloo/m1"),
            &[],
            Timestamp::CreateTime(1_780_000_000_123),
        );
        assert_eq!(source_of(&m), "acme");
        assert_eq!(
            received_at(&m),
            DateTime::<Utc>::from_timestamp_millis(1_780_000_000_123)
        );
        assert_eq!(key_message_id(&m), Some("m1"));
    }

    #[test]
    fn records_of_an_earlier_ingest_are_read_from_their_headers() {
        let m = msg(
            Some("m1"),
            &[
                (header::SOURCE, "old-src"),
                (header::PROVIDER, "lisoloo"),
                (header::RECEIVED_AT, "2026-05-27T10:15:09.123456Z"),
            ],
            Timestamp::CreateTime(1),
        );
        assert_eq!(source_of(&m), "old-src");
        assert_eq!(
            received_at(&m),
            dlrflow_events::parse_timestamp("2026-05-27T10:15:09.123456Z"),
            "the µs header wins over the timestamp"
        );
        assert_eq!(key_message_id(&m), Some("m1"));
    }

    #[test]
    fn a_record_without_an_origin_is_poison() {
        for key in [None, Some("m1"), Some("/lisoloo/m1")] {
            let p = parse(&msg(key, &[], Timestamp::NotAvailable)).unwrap_err();
            assert_eq!(p.kind, "missing_origin", "{key:?}");
        }
        let p = parse(&msg(Some("acme/kannel/m1"), &[], Timestamp::NotAvailable)).unwrap_err();
        assert_eq!(p.kind, "unknown_provider");
        // One header of the earlier form alone does not count.
        let p = parse(&msg(
            None,
            &[(header::SOURCE, "a")],
            Timestamp::NotAvailable,
        ))
        .unwrap_err();
        assert_eq!(p.kind, "missing_origin");
    }
}
