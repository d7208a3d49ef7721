//! `dlrflow-state replay`: moves DLQ records back to the raw topic.
//!
//! It reads the DLQ in its own consumer group (`{kafka.group_id}-replay`),
//! produces each record to the raw topic with its original key, value,
//! timestamp (the receive time) and headers (minus the DLQ's own), waits for the acknowledgements, and only
//! then commits the DLQ offsets. A crash in between replays some records twice;
//! the raw consumer dedupes them. A DLQ record that is a bounded reference
//! (`dlq-form: reference`, a record too large to copy whole) is replayed from
//! the raw topic it points at, which must still hold it (retention).

use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::consumer::{create_producer, dlq_header};

/// Options of one replay run.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Stop after this many records.
    pub max: Option<usize>,
    /// Stop when nothing arrived for this long (after the first record, or
    /// `first_wait` before it).
    pub idle: Duration,
    pub first_wait: Duration,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            max: None,
            idle: Duration::from_secs(3),
            first_wait: Duration::from_secs(15),
        }
    }
}

/// Replays DLQ records; returns how many were moved.
pub async fn replay(cfg: &Config, opts: &ReplayOptions) -> anyhow::Result<usize> {
    let consumer: StreamConsumer = cfg
        .kafka
        .client
        .client_config(&[
            ("group.id", format!("{}-replay", cfg.kafka.group_id)),
            ("client.id", "dlrflow-state-replay".into()),
            ("enable.auto.commit", "false".into()),
            ("auto.offset.reset", "earliest".into()),
        ])
        .create()
        .context("creating the DLQ consumer")?;
    consumer
        .subscribe(&[&cfg.kafka.dlq_topic])
        .with_context(|| format!("subscribing to kafka.dlq_topic = {}", cfg.kafka.dlq_topic))?;
    let producer = create_producer(cfg, "dlrflow-state-replay")?;
    // Only what is in the DLQ now: a record replayed that is still poison
    // comes back to the DLQ, and must not be replayed again in this run.
    let end = high_watermarks(&consumer, &cfg.kafka.dlq_topic)?;
    let mut finished: std::collections::HashSet<i32> = end
        .iter()
        .filter(|(_, e)| **e == 0)
        .map(|(p, _)| *p)
        .collect();
    let max = opts.max.unwrap_or(usize::MAX);
    let mut moved = 0usize;
    while moved < max && finished.len() < end.len() {
        let wait = if moved == 0 {
            opts.first_wait
        } else {
            opts.idle
        };
        let chunk_max = (max - moved).min(500);
        let mut chunk = Vec::new();
        match tokio::time::timeout(wait, consumer.recv()).await {
            Err(_) => break,
            Ok(m) => chunk.push(m.context("reading the DLQ")?.detach()),
        }
        while chunk.len() < chunk_max {
            match tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await {
                Err(_) => break,
                Ok(m) => chunk.push(m.context("reading the DLQ")?.detach()),
            }
        }
        chunk.retain(|m| {
            let last = end.get(&m.partition()).copied().unwrap_or(0) - 1;
            if m.offset() >= last {
                finished.insert(m.partition());
            }
            m.offset() <= last
        });
        if chunk.is_empty() {
            continue;
        }
        // References are resolved to the raw records they point at.
        let mut originals = Vec::new();
        for m in &chunk {
            if crate::consumer::is_reference(m) {
                originals.push(Some(fetch_referenced(cfg, m).await?));
            } else {
                originals.push(None);
            }
        }
        let mut pending = Vec::with_capacity(chunk.len());
        for (m, original) in chunk.iter().zip(&originals) {
            let (topic, record) = back_to_origin(cfg, m, original.as_ref());
            let record = record.record(topic);
            let fut = producer
                .send_result(record)
                .map_err(|(e, _)| anyhow::anyhow!("enqueueing to {topic}: {e}"))?;
            pending.push(fut);
        }
        for fut in pending {
            match tokio::time::timeout(cfg.kafka.produce_timeout, fut).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((e, _)))) => anyhow::bail!("producing to {}: {e}", cfg.kafka.raw_topic),
                _ => anyhow::bail!("no acknowledgement from {}", cfg.kafka.raw_topic),
            }
        }
        let mut next: std::collections::BTreeMap<(&str, i32), i64> = Default::default();
        for m in &chunk {
            let e = next.entry((m.topic(), m.partition())).or_default();
            *e = (*e).max(m.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        }
        consumer
            .commit(&tpl, CommitMode::Sync)
            .context("committing DLQ offsets")?;
        moved += chunk.len();
    }
    consumer.unsubscribe();
    Ok(moved)
}

/// The raw record a DLQ reference points at, checked against its hash.
async fn fetch_referenced(cfg: &Config, m: &OwnedMessage) -> anyhow::Result<OwnedMessage> {
    use sha2::Digest;
    let r: crate::consumer::DlqReference = serde_json::from_slice(m.payload().unwrap_or_default())
        .with_context(|| format!("DLQ reference at {}/{}", m.partition(), m.offset()))?;
    let fetched = fetch_at(cfg, &r.topic, r.partition, r.offset).await?;
    let hash = hex::encode(sha2::Sha256::digest(fetched.payload().unwrap_or_default()));
    anyhow::ensure!(
        hash == r.sha256,
        "{}/{}/{} does not match the DLQ reference's hash",
        r.topic,
        r.partition,
        r.offset
    );
    Ok(fetched)
}

/// A DLQ record on its way back: the topic it came from (the status topic
/// for a status answer, else the raw topic) and what to send there.
struct Outgoing {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    timestamp: Option<i64>,
    headers: OwnedHeaders,
}

impl Outgoing {
    fn record<'a>(&'a self, topic: &'a str) -> FutureRecord<'a, [u8], [u8]> {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(self.headers.clone());
        // The receive time (the raw record's timestamp) goes back with it.
        if let Some(t) = self.timestamp {
            record = record.timestamp(t);
        }
        if let Some(k) = &self.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &self.payload {
            record = record.payload(v.as_slice());
        }
        record
    }
}

/// Where DLQ record `dlq` goes back to, and what is sent: the original's
/// key, value, timestamp and headers (`original` when `dlq` is a reference
/// to it), minus the DLQ's own headers, plus `replayed-from`.
fn back_to_origin<'c>(
    cfg: &'c Config,
    dlq: &OwnedMessage,
    original: Option<&OwnedMessage>,
) -> (&'c str, Outgoing) {
    let topic = if dlrflow_runtime::kafka::header_str(dlq.headers(), dlq_header::ORIGINAL_TOPIC)
        == Some(cfg.kafka.status_topic.as_str())
    {
        &cfg.kafka.status_topic
    } else {
        &cfg.kafka.raw_topic
    };
    let m = original.unwrap_or(dlq);
    let mut headers = OwnedHeaders::new();
    if let Some(h) = m.headers() {
        for h in h.iter() {
            if !dlq_header::ALL.contains(&h.key) {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
    }
    let from = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
    headers = headers.insert(Header {
        key: "replayed-from",
        value: Some(from.as_str()),
    });
    (
        topic,
        Outgoing {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            timestamp: m.timestamp().to_millis(),
            headers,
        },
    )
}

/// What [`replay_one`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayedOne {
    /// The topic the record went back to.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Sends the one DLQ record at `partition`/`offset` back to the topic it
/// came from and waits for the acknowledgement (the operator page's
/// action). It does not move the replay group's offsets: a later
/// `dlrflow-state replay` sends it once more, which the consumer dedupes.
pub async fn replay_one(
    cfg: &Config,
    producer: &rdkafka::producer::FutureProducer,
    partition: i32,
    offset: i64,
) -> anyhow::Result<ReplayedOne> {
    let dlq = fetch_at(cfg, &cfg.kafka.dlq_topic, partition, offset).await?;
    let original = if crate::consumer::is_reference(&dlq) {
        Some(fetch_referenced(cfg, &dlq).await?)
    } else {
        None
    };
    let (topic, out) = back_to_origin(cfg, &dlq, original.as_ref());
    let fut = producer
        .send_result(out.record(topic))
        .map_err(|(e, _)| anyhow::anyhow!("enqueueing to {topic}: {e}"))?;
    match tokio::time::timeout(cfg.kafka.produce_timeout, fut).await {
        Ok(Ok(Ok(d))) => Ok(ReplayedOne {
            topic: topic.to_owned(),
            partition: d.partition,
            offset: d.offset,
        }),
        Ok(Ok(Err((e, _)))) => anyhow::bail!("producing to {topic}: {e}"),
        _ => anyhow::bail!("no acknowledgement from {topic}"),
    }
}

/// The record at `topic`/`partition`/`offset`, which must still be there.
async fn fetch_at(
    cfg: &Config,
    topic: &str,
    partition: i32,
    offset: i64,
) -> anyhow::Result<OwnedMessage> {
    let consumer: StreamConsumer = cfg
        .kafka
        .client
        .client_config(&[
            ("group.id", format!("{}-replay-fetch", cfg.kafka.group_id)),
            ("client.id", "dlrflow-state-replay-fetch".into()),
            ("enable.auto.commit", "false".into()),
        ])
        .create()
        .with_context(|| format!("creating a reader of {topic}"))?;
    // An offset the partition does not hold is refused at once, by name,
    // not after a 30 s wait for a record that cannot come.
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .with_context(|| {
            format!("{topic}/{partition}: no such partition, or the broker did not answer")
        })?;
    anyhow::ensure!(
        (low..high).contains(&offset),
        "{topic}/{partition} holds offsets {low}..{high}; {offset} is not one of them (replayed already and gone with retention, or never there)"
    );
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let fetched = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .with_context(|| format!("no record at {topic}/{partition}/{offset} within 30 s"))?
        .with_context(|| format!("reading {topic}"))?
        .detach();
    anyhow::ensure!(
        fetched.offset() == offset,
        "{topic}/{partition}/{offset} is gone (retention?); the next record is at offset {}",
        fetched.offset()
    );
    Ok(fetched)
}

/// The DLQ's end offsets per partition at the start of the run.
fn high_watermarks(
    consumer: &StreamConsumer,
    topic: &str,
) -> anyhow::Result<std::collections::HashMap<i32, i64>> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("metadata of kafka.dlq_topic = {topic}"))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .with_context(|| format!("kafka.dlq_topic = {topic} does not exist"))?;
    let mut out = std::collections::HashMap::new();
    for p in t.partitions() {
        let (_, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .with_context(|| format!("watermarks of {topic}/{}", p.id()))?;
        out.insert(p.id(), high);
    }
    Ok(out)
}
