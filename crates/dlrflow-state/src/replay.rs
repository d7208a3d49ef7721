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
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
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
            // A status answer goes back to the status topic, everything else
            // to the raw topic.
            let topic =
                if dlrflow_runtime::kafka::header_str(m.headers(), dlq_header::ORIGINAL_TOPIC)
                    == Some(cfg.kafka.status_topic.as_str())
                {
                    &cfg.kafka.status_topic
                } else {
                    &cfg.kafka.raw_topic
                };
            let m = original.as_ref().unwrap_or(m);
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
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
            // The receive time (the raw record's timestamp) goes back with it.
            if let Some(t) = m.timestamp().to_millis() {
                record = record.timestamp(t);
            }
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            if let Some(v) = m.payload() {
                record = record.payload(v);
            }
            let fut = producer
                .send_result(record)
                .map_err(|(e, _)| anyhow::anyhow!("enqueueing to the raw topic: {e}"))?;
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
async fn fetch_referenced(
    cfg: &Config,
    m: &rdkafka::message::OwnedMessage,
) -> anyhow::Result<rdkafka::message::OwnedMessage> {
    use sha2::Digest;
    let r: crate::consumer::DlqReference = serde_json::from_slice(m.payload().unwrap_or_default())
        .with_context(|| format!("DLQ reference at {}/{}", m.partition(), m.offset()))?;
    let consumer: StreamConsumer = cfg
        .kafka
        .client
        .client_config(&[
            ("group.id", format!("{}-replay-fetch", cfg.kafka.group_id)),
            ("client.id", "dlrflow-state-replay-fetch".into()),
            ("enable.auto.commit", "false".into()),
        ])
        .create()
        .context("creating the raw-topic reader")?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(r.offset))?;
    consumer.assign(&tpl)?;
    let fetched = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .with_context(|| {
            format!(
                "no record at {}/{}/{} within 30 s",
                r.topic, r.partition, r.offset
            )
        })?
        .context("reading the raw topic")?
        .detach();
    anyhow::ensure!(
        fetched.offset() == r.offset,
        "{}/{}/{} is gone (retention?); the next record is at offset {}",
        r.topic,
        r.partition,
        r.offset,
        fetched.offset()
    );
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
