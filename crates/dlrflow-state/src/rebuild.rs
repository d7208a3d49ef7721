//! `dlrflow-state rebuild --into SCHEMA [--compare-with SCHEMA]`: the state
//! is a function of the log. Replays the raw topic and the status topic from
//! their first retained record up to where they end when the rebuild starts,
//! through the one write path (parse, dedupe on PostgreSQL, merge, outbox),
//! into a fresh schema; then, with `--compare-with`, compares recipient and
//! message state row by row with another schema (the live one) and reports
//! every difference.
//!
//! Order: the records of all partitions of both topics are merged by record
//! timestamp (the ingest's receive time, the reconciler's read time), each
//! partition in offset order, as the live consumers met them. The merge of
//! webhooks is order-independent; an authoritative answer is not (it wins
//! over what came before it), and the timestamps put each answer after the
//! webhooks received before its read.
//!
//! Nothing is produced and no offset is committed: the rebuild reads with
//! its own throw-away group id, and the new schema's outbox is left
//! unpublished.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;

use crate::config::Config;

/// What a rebuild did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Rebuilt {
    /// Records read from each topic.
    pub records: BTreeMap<String, u64>,
    /// Updates written (applied, unchanged or conflict) and duplicates skipped.
    pub written: u64,
    /// Records (or updates of a status answer) the live consumer would have
    /// sent to the DLQ: unparsable, refused, foreign.
    pub dead: u64,
}

/// The columns that say when or how often a row was written rather than what
/// it holds: the same log applied at another time gives other values.
const RECIPIENT_NOISE: [&str; 3] = ["created_at", "updated_at", "version"];
const MESSAGE_NOISE: [&str; 3] = ["first_seen_at", "updated_at", "status_applied_at"];

/// Records held back at most while waiting for a partition that has not
/// delivered its next record yet (the timestamp merge needs one record of
/// every unfinished partition). Past it the oldest buffered record goes.
const MAX_BUFFERED: usize = 200_000;

/// Replays both topics into `into` (created and migrated; it must hold no
/// state yet).
pub async fn rebuild(cfg: &Config, into: &str) -> anyhow::Result<Rebuilt> {
    let mut pg = cfg.postgres.clone();
    pg.schema = Some(into.to_owned());
    pg.validate(1).map_err(|e| anyhow::anyhow!("--into: {e}"))?;
    let pool = pg
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{}", dlrflow_runtime::redact::scrub(&e.to_string())))
        .with_context(|| format!("connecting to PostgreSQL, schema {into}"))?;
    crate::store::migrate(&pool).await?;
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM delivery_events)",
    )
    .fetch_one(&pool)
    .await?;
    if rows > 0 {
        anyhow::bail!("schema {into} already holds state ({rows} rows): rebuild into a new schema");
    }

    let consumer: StreamConsumer = cfg
        .kafka
        .client
        .client_config(&[
            (
                "group.id",
                format!(
                    "{}-rebuild-{}",
                    cfg.kafka.group_id,
                    uuid::Uuid::new_v4().simple()
                ),
            ),
            ("client.id", "dlrflow-state-rebuild".into()),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("fetch.wait.max.ms", "50".into()),
        ])
        .create()
        .context("creating the rebuild consumer")?;
    let topics = [cfg.kafka.raw_topic.clone(), cfg.kafka.status_topic.clone()];
    let (assignment, ends) = {
        let consumer = &consumer;
        let topics = &topics;
        tokio::task::block_in_place(|| bounds(consumer, topics))?
    };
    consumer
        .assign(&assignment)
        .context("assigning the partitions")?;

    let mut merge = TimestampMerge::new(ends);
    let mut out = Rebuilt::default();
    let batch_size = cfg.batch.max_records;
    let mut batch = Vec::with_capacity(batch_size);
    while !merge.is_done() {
        if !merge.all_received() {
            let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
                .await
                .context("no record from the broker for 60 s")?
                .context("reading the topics")?
                .detach();
            *out.records.entry(m.topic().to_owned()).or_default() += 1;
            merge.push(m);
        }
        while let Some(m) = merge.pop() {
            batch.push(m);
            if batch.len() >= batch_size {
                apply(&pool, cfg, &mut batch, &mut out).await?;
            }
        }
    }
    apply(&pool, cfg, &mut batch, &mut out).await?;
    Ok(out)
}

/// Per (topic, partition): the offset a rebuild stops at.
type Ends = BTreeMap<(String, i32), i64>;

/// Per partition of `topics`: the assignment from the first retained record
/// and the offset the rebuild stops at (the end when it starts).
fn bounds(
    consumer: &StreamConsumer,
    topics: &[String],
) -> anyhow::Result<(TopicPartitionList, Ends)> {
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for topic in topics {
        let n = dlrflow_runtime::kafka::topic_ready(consumer.client(), topic, timeout)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for p in 0..n as i32 {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, timeout)
                .with_context(|| format!("watermarks of {topic}/{p}"))?;
            if high > low {
                tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
                ends.insert((topic.clone(), p), high);
            }
        }
    }
    Ok((tpl, ends))
}

async fn apply(
    pool: &PgPool,
    cfg: &Config,
    batch: &mut Vec<OwnedMessage>,
    out: &mut Rebuilt,
) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let (written, dead) =
        crate::consumer::apply_log(pool, std::mem::take(batch), &cfg.kafka.status_topic).await?;
    out.written += written;
    out.dead += dead;
    Ok(())
}

/// A k-way merge of partitions by record timestamp, each partition in offset
/// order: a record leaves once every partition not yet read to its end has
/// a record buffered (or the buffer is full).
struct TimestampMerge {
    queues: BTreeMap<(String, i32), VecDeque<OwnedMessage>>,
    /// The offset each partition ends at; removed once it is reached.
    pending: Ends,
    buffered: usize,
}

impl TimestampMerge {
    fn new(ends: Ends) -> Self {
        Self {
            queues: ends.keys().map(|k| (k.clone(), VecDeque::new())).collect(),
            pending: ends,
            buffered: 0,
        }
    }

    fn push(&mut self, m: OwnedMessage) {
        let key = (m.topic().to_owned(), m.partition());
        let Some(&end) = self.pending.get(&key) else {
            return; // past the end, or a partition not rebuilt
        };
        if m.offset() >= end {
            return;
        }
        if m.offset() + 1 >= end {
            self.pending.remove(&key);
        }
        self.queues.entry(key).or_default().push_back(m);
        self.buffered += 1;
    }

    fn all_received(&self) -> bool {
        self.pending.is_empty()
    }

    fn is_done(&self) -> bool {
        self.pending.is_empty() && self.buffered == 0
    }

    fn pop(&mut self) -> Option<OwnedMessage> {
        let waiting = self
            .pending
            .keys()
            .any(|k| self.queues.get(k).is_none_or(|q| q.is_empty()));
        if waiting && self.buffered < MAX_BUFFERED {
            return None;
        }
        let ts = |m: &OwnedMessage| m.timestamp().to_millis().unwrap_or(i64::MIN);
        let key = self
            .queues
            .iter()
            .filter_map(|(k, q)| q.front().map(|m| (ts(m), k)))
            .min()
            .map(|(_, k)| k.clone())?;
        self.buffered -= 1;
        self.queues.get_mut(&key)?.pop_front()
    }
}

/// One difference between two schemas.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Difference {
    pub table: &'static str,
    /// `message_id` (and `/recipient` for a recipient row).
    pub key: String,
    /// The row in the rebuilt schema and in the other one, without the
    /// columns that only say when the row was written; `null` where the row
    /// is missing.
    pub rebuilt: serde_json::Value,
    pub other: serde_json::Value,
}

/// Compares `recipient_state`, `messages` and `carrier_rollup` (its rows
/// with a count other than 0) of two schemas row by row.
/// Returns every difference (at most `limit`) and how many there are.
pub async fn compare(
    cfg: &Config,
    rebuilt: &str,
    other: &str,
    limit: i64,
) -> anyhow::Result<(Vec<Difference>, i64)> {
    for s in [rebuilt, other] {
        if !dlrflow_runtime::settings::valid_identifier(s) {
            anyhow::bail!("`{s}` is not a schema name dlrflow accepts");
        }
    }
    let mut pg = cfg.postgres.clone();
    pg.schema = None;
    let pool = pg
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{}", dlrflow_runtime::redact::scrub(&e.to_string())))
        .context("connecting to PostgreSQL")?;
    let mut out = Vec::new();
    let mut total = 0;
    for (table, key, noise, filter) in [
        (
            "recipient_state",
            "message_id || '/' || recipient",
            &RECIPIENT_NOISE[..],
            "",
        ),
        ("messages", "message_id", &MESSAGE_NOISE[..], ""),
        (
            "carrier_rollup",
            "concat_ws('/', source, to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI\"Z\"'), carrier, error_code, metric, bin)",
            &[][..],
            // A row whose contributions cancelled out says nothing.
            " WHERE n <> 0",
        ),
    ] {
        let noise: Vec<&str> = noise.to_vec();
        let sql = format!(
            r#"
WITH a AS (SELECT {key} AS k, to_jsonb(t) - $1::text[] AS row FROM "{rebuilt}".{table} t{filter}),
     b AS (SELECT {key} AS k, to_jsonb(t) - $1::text[] AS row FROM "{other}".{table} t{filter}),
     d AS (SELECT coalesce(a.k, b.k) AS k, a.row AS rebuilt, b.row AS other
             FROM a FULL JOIN b ON a.k = b.k
            WHERE a.row IS DISTINCT FROM b.row)
SELECT k, coalesce(rebuilt, 'null'::jsonb), coalesce(other, 'null'::jsonb),
       count(*) OVER ()
  FROM d ORDER BY k LIMIT $2"#
        );
        let rows: Vec<(String, serde_json::Value, serde_json::Value, i64)> = sqlx::query_as(&sql)
            .bind(&noise)
            .bind(limit)
            .fetch_all(&pool)
            .await
            .with_context(|| format!("comparing {table} of {rebuilt} and {other}"))?;
        total += rows.first().map_or(0, |r| r.3);
        out.extend(rows.into_iter().map(|(key, rebuilt, other, _)| Difference {
            table,
            key,
            rebuilt,
            other,
        }));
    }
    Ok((out, total))
}
