//! What the operator page shows, read from PostgreSQL, Redis and Kafka.
//! Every query here is bounded (a time window on an index, a `LIMIT`, one
//! message's rows): a page load never scans the state.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use dlrflow_events::{parse_record, DeliveryUpdate, Event, Provider};
use dlrflow_runtime::kafka::header_str;
use dlrflow_runtime::settings::RedisConnection;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::{FromRow, PgPool};

use crate::config::Config;
use crate::consumer::dlq_header;

/// Recipients by status, of those first seen in `[from, to)`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Funnel {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub source: Option<String>,
    pub messages: i64,
    /// Recipients the messages announced (`total_recipients`), where known.
    pub announced: i64,
    pub recipients: i64,
    pub queued: i64,
    pub processing: i64,
    pub sent: i64,
    pub delivered: i64,
    pub failed: i64,
}

/// A read-only transaction whose statements are cancelled after `limit`:
/// a page load over a huge window fails with a message instead of keeping
/// a connection of the state's pool busy.
async fn bounded(
    pool: &PgPool,
    limit: Duration,
) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await?;
    // SET does not take parameters; the value is a number we format.
    sqlx::query(&format!(
        "SET LOCAL statement_timeout = {}",
        limit.as_millis().max(1)
    ))
    .execute(&mut *tx)
    .await?;
    Ok(tx)
}

/// What a cancelled page query says to the operator.
pub fn explain(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
            "counting took longer than console.query_timeout_ms: narrow the window or pick a source"
                .to_owned()
        }
        e => e.to_string(),
    }
}

pub async fn funnel(
    pool: &PgPool,
    source: Option<&str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    limit: Duration,
) -> sqlx::Result<Funnel> {
    let mut tx = bounded(pool, limit).await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM recipient_state \
          WHERE created_at >= $1 AND created_at < $2 AND ($3::text IS NULL OR source = $3) \
          GROUP BY status",
    )
    .bind(from)
    .bind(to)
    .bind(source)
    .fetch_all(&mut *tx)
    .await?;
    let (messages, announced): (i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*), sum(m.total_recipients)::int8 FROM messages m \
          WHERE m.message_id IN (SELECT DISTINCT message_id FROM recipient_state \
                  WHERE created_at >= $1 AND created_at < $2 AND ($3::text IS NULL OR source = $3))",
    )
    .bind(from)
    .bind(to)
    .bind(source)
    .fetch_one(&mut *tx)
    .await?;
    let mut f = Funnel {
        from,
        to,
        source: source.map(str::to_owned),
        messages,
        announced: announced.unwrap_or(0),
        ..Funnel::default()
    };
    for (status, n) in rows {
        f.recipients += n;
        match status.as_str() {
            "queued" => f.queued = n,
            "processing" => f.processing = n,
            "sent" => f.sent = n,
            "delivered" => f.delivered = n,
            "failed" => f.failed = n,
            _ => {}
        }
    }
    Ok(f)
}

/// A recipient with no terminal status that has been silent too long.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Stuck {
    pub message_id: String,
    pub recipient: String,
    pub source: String,
    pub status: String,
    pub last_event_at: DateTime<Utc>,
    pub needs_reconcile: bool,
}

/// The oldest silent non-terminal recipients (at most `limit`) and how many
/// there are in all (counted up to 10,000).
pub async fn stuck(
    pool: &PgPool,
    silent_for: Duration,
    limit: i64,
    timeout: Duration,
) -> sqlx::Result<(Vec<Stuck>, i64)> {
    let mut tx = bounded(pool, timeout).await?;
    let ms = i64::try_from(silent_for.as_millis()).unwrap_or(i64::MAX);
    let rows = sqlx::query_as::<_, Stuck>(
        "SELECT message_id, recipient, source, status, last_event_at, needs_reconcile \
           FROM recipient_state \
          WHERE status NOT IN ('delivered', 'failed') \
            AND last_event_at < now() - $1 * interval '1 millisecond' \
          ORDER BY last_event_at LIMIT $2",
    )
    .bind(ms)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM recipient_state \
          WHERE status NOT IN ('delivered', 'failed') \
            AND last_event_at < now() - $1 * interval '1 millisecond' LIMIT 10000) s",
    )
    .bind(ms)
    .fetch_one(&mut *tx)
    .await?;
    Ok((rows, total))
}

/// An open reconcile job (dlrflow-reconcile's table).
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Job {
    pub message_id: String,
    pub source: String,
    pub reason: String,
    pub since: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub attempts: i32,
    pub reads: i32,
    pub last_error: Option<String>,
}

/// The oldest open jobs and how many are open; `None` when no reconciler
/// ever ran against this database (its table is missing).
pub async fn open_jobs(pool: &PgPool, limit: i64) -> sqlx::Result<Option<(Vec<Job>, i64)>> {
    if !table_exists(pool, "reconcile_jobs").await? {
        return Ok(None);
    }
    let rows = sqlx::query_as::<_, Job>(
        "SELECT message_id, source, reason, since, due_at, attempts, reads, last_error \
           FROM reconcile_jobs WHERE done_at IS NULL ORDER BY since, message_id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reconcile_jobs WHERE done_at IS NULL")
            .fetch_one(pool)
            .await?;
    Ok(Some((rows, total)))
}

async fn table_exists(pool: &PgPool, name: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(name)
        .fetch_one(pool)
        .await
}

/// Where one partition of a state consumer group stands (the
/// `consumer_progress` rows every replica writes at its lag checks).
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Progress {
    pub group_id: String,
    pub topic: String,
    pub partition: i32,
    pub lag_records: i64,
    /// How old the oldest record possibly not yet in the state is, in ms
    /// (`None`: not known yet).
    pub lag_ms: Option<i64>,
    /// How long ago a replica last wrote this row, in ms.
    pub observed_ms: i64,
}

pub async fn progress(pool: &PgPool) -> sqlx::Result<Vec<Progress>> {
    sqlx::query_as::<_, Progress>(
        "SELECT group_id, topic, partition, lag_records, \
                (extract(epoch FROM now() - caught_up_to) * 1000)::int8 AS lag_ms, \
                (extract(epoch FROM now() - observed_at) * 1000)::int8 AS observed_ms \
           FROM consumer_progress ORDER BY group_id, topic, partition",
    )
    .fetch_all(pool)
    .await
}

/// The status-API budget as dlrflow-reconcile's limiter holds it in Redis.
#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    /// The budget's name (`{reconcile.budget prefix}:{key id}`).
    pub name: String,
    /// Reads granted in the last [`BUDGET_WINDOW`].
    pub used: u64,
    /// Milliseconds left of a pause after a `429`, if paused.
    pub paused_ms: Option<u64>,
    /// Why reads are refused after a `401`, if they are.
    pub unauthorized: Option<String>,
}

/// The status API's window (`../shared/status-api.md`: 120 reads a minute).
pub const BUDGET_WINDOW: Duration = Duration::from_secs(60);

/// Counts the grants in one budget's sorted set on the Redis server's own
/// clock, as the limiter does (`crates/dlrflow-reconcile/src/limiter.rs`:
/// keys `{name}:reads|paused|unauthorized`, one hash tag, so one slot of a
/// cluster).
const BUDGET_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local used = redis.call('ZCOUNT', KEYS[1], string.format('(%.0f', now - tonumber(ARGV[1])), '+inf')
return {used, redis.call('PTTL', KEYS[2]), redis.call('GET', KEYS[3]) or ''}
"#;

/// Every budget a reconciler registered (`reconcile_budgets`), with its use
/// now. Empty when no reconciler ever read.
pub async fn budgets(pool: &PgPool, redis: &RedisConnection) -> anyhow::Result<Vec<Budget>> {
    if !table_exists(pool, "reconcile_budgets").await? {
        return Ok(Vec::new());
    }
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM reconcile_budgets ORDER BY name")
        .fetch_all(pool)
        .await?;
    let script = redis::Script::new(BUDGET_SCRIPT);
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let tag = format!("{{{name}}}");
        let mut conn = redis.clone();
        let (used, pttl, unauthorized): (u64, i64, String) = script
            .key(format!("{tag}:reads"))
            .key(format!("{tag}:paused"))
            .key(format!("{tag}:unauthorized"))
            .arg(BUDGET_WINDOW.as_micros() as u64)
            .invoke_async(&mut conn)
            .await
            .with_context(|| format!("reading the budget {name} from Redis"))?;
        out.push(Budget {
            name,
            used,
            paused_ms: u64::try_from(pttl).ok().filter(|&ms| ms > 0),
            unauthorized: Some(unauthorized).filter(|u| !u.is_empty()),
        });
    }
    Ok(out)
}

/// One record of the DLQ.
#[derive(Debug, Clone, Serialize)]
pub struct DlqRecord {
    pub partition: i32,
    pub offset: i64,
    /// When it was dead-lettered (the DLQ record's timestamp).
    pub at: Option<DateTime<Utc>>,
    /// Why (`error-kind`, e.g. `invalid_json`).
    pub kind: String,
    pub error: String,
    pub original_topic: String,
    /// The record's key (`{source}/{provider}/{message_id}`), shortened.
    pub key: String,
    /// `reference` when the DLQ holds a pointer to a too-large raw record.
    pub form: Option<String>,
}

/// The DLQ's newest records (at most `per_partition` from each partition),
/// newest first, and its total size (the sum of the partitions' offsets
/// still retained).
pub async fn dlq_recent(cfg: &Config, per_partition: i64) -> anyhow::Result<(Vec<DlqRecord>, i64)> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || dlq_recent_blocking(&cfg, per_partition))
        .await
        .context("reading the DLQ")?
}

fn dlq_recent_blocking(cfg: &Config, per_partition: i64) -> anyhow::Result<(Vec<DlqRecord>, i64)> {
    let topic = &cfg.kafka.dlq_topic;
    let consumer: BaseConsumer = cfg
        .kafka
        .client
        .client_config(&[
            ("group.id", format!("{}-console", cfg.kafka.group_id)),
            ("client.id", "dlrflow-state-console".into()),
            ("enable.auto.commit", "false".into()),
        ])
        .create()
        .context("creating the DLQ reader")?;
    let timeout = Duration::from_secs(5);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("metadata of kafka.dlq_topic = {topic}"))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic.as_str())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    let mut total = 0;
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .with_context(|| format!("watermarks of {topic}/{p}"))?;
        total += high - low;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset((high - per_partition).max(low)))?;
            ends.insert(p, high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok((out, total));
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + timeout;
    while !ends.is_empty() && std::time::Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.context("reading the DLQ")?;
        if m.offset() + 1 >= ends.get(&m.partition()).copied().unwrap_or(0) {
            ends.remove(&m.partition());
        }
        let h = m.headers();
        let text = |name: &str| header_str(h, name).unwrap_or_default().to_owned();
        out.push(DlqRecord {
            partition: m.partition(),
            offset: m.offset(),
            at: m
                .timestamp()
                .to_millis()
                .and_then(DateTime::<Utc>::from_timestamp_millis),
            kind: text(dlq_header::ERROR_KIND),
            error: text(dlq_header::ERROR),
            original_topic: text(dlq_header::ORIGINAL_TOPIC),
            key: m
                .key()
                .map(|k| {
                    dlrflow_runtime::text::truncate(&String::from_utf8_lossy(k), 160).into_owned()
                })
                .unwrap_or_default(),
            form: header_str(h, dlq_header::FORM).map(str::to_owned),
        });
    }
    out.sort_by(|a, b| b.at.cmp(&a.at).then(b.offset.cmp(&a.offset)));
    Ok((out, total))
}

/// A message as the page shows it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct MessageRow {
    pub message_id: String,
    pub source: String,
    pub provider: String,
    pub total_recipients: Option<i32>,
    pub queued_at: Option<DateTime<Utc>>,
    pub first_seen_at: DateTime<Utc>,
}

/// One recipient's state.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct RecipientRow {
    pub recipient: String,
    pub status: String,
    pub carrier: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub last_event_at: DateTime<Utc>,
    pub needs_reconcile: bool,
    pub reconcile_reason: Option<String>,
}

/// One event recorded for a recipient.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEvent {
    /// `lisoloo`, `arpoone`, or `status_api` (a status read).
    pub provider: String,
    pub status: Option<String>,
    /// When the gateway says it happened (the event's own time).
    pub gateway_at: Option<DateTime<Utc>>,
    /// When the ingest received it (or the status API was read).
    pub received_at: Option<DateTime<Utc>>,
    /// What it did: `applied`, `unchanged`, `conflict`, `message`.
    pub outcome: Option<String>,
}

/// One `delivery_events` row.
#[derive(FromRow)]
struct EventRow {
    recipient: Option<String>,
    provider: Option<String>,
    status: Option<String>,
    raw: Option<String>,
    received_at: Option<DateTime<Utc>>,
    outcome: Option<String>,
    source: Option<String>,
}

/// A recipient and its events, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    pub state: Option<RecipientRow>,
    pub recipient: String,
    pub events: Vec<TimelineEvent>,
    /// Copies of its events dropped as duplicates.
    pub duplicates: i64,
}

/// A message, each recipient's timeline, and its reconcile job.
#[derive(Debug, Clone, Serialize)]
pub struct MessageView {
    pub message: MessageRow,
    pub timelines: Vec<Timeline>,
    /// Events about the message itself (`sms.queued` and the like).
    pub message_events: Vec<TimelineEvent>,
    pub job: Option<Job>,
    /// Status reads of this message (applied answers).
    pub status_reads: i64,
}

/// At most this many recipients of one message on the page.
pub const MAX_RECIPIENTS: i64 = 500;

pub async fn message(pool: &PgPool, message_id: &str) -> sqlx::Result<Option<MessageView>> {
    let Some(message) = sqlx::query_as::<_, MessageRow>(
        "SELECT message_id, source, provider, total_recipients, queued_at, first_seen_at \
           FROM messages WHERE message_id = $1",
    )
    .bind(message_id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let states = sqlx::query_as::<_, RecipientRow>(
        "SELECT recipient, status, carrier, error_code, error_message, last_event_at, \
                needs_reconcile, reconcile_reason \
           FROM recipient_state WHERE message_id = $1 ORDER BY recipient LIMIT $2",
    )
    .bind(message_id)
    .bind(MAX_RECIPIENTS)
    .fetch_all(pool)
    .await?;
    let events = sqlx::query_as::<_, EventRow>(
        "SELECT recipient, provider, status, raw::text AS raw, received_at, outcome, source \
           FROM delivery_events WHERE message_id = $1 \
          ORDER BY received_at NULLS LAST, processed_at LIMIT 5000",
    )
    .bind(message_id)
    .fetch_all(pool)
    .await?;
    let dropped: BTreeMap<String, i64> =
        sqlx::query_as("SELECT recipient, copies FROM dropped_copies WHERE message_id = $1")
            .bind(message_id)
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let job = if table_exists(pool, "reconcile_jobs").await? {
        sqlx::query_as::<_, Job>(
            "SELECT message_id, source, reason, since, due_at, attempts, reads, last_error \
               FROM reconcile_jobs WHERE message_id = $1",
        )
        .bind(message_id)
        .fetch_optional(pool)
        .await?
    } else {
        None
    };
    let mut by_recipient: BTreeMap<String, Vec<TimelineEvent>> = BTreeMap::new();
    let mut message_events = Vec::new();
    let mut reads = std::collections::BTreeSet::new();
    for EventRow {
        recipient,
        provider,
        status,
        raw,
        received_at,
        outcome,
        source,
    } in events
    {
        let (provider, source) = (provider.unwrap_or_default(), source.unwrap_or_default());
        if provider == "status_api" {
            reads.insert(received_at);
        }
        let ev = TimelineEvent {
            gateway_at: raw
                .as_deref()
                .and_then(|r| gateway_time(&provider, &source, r)),
            provider,
            status,
            received_at,
            outcome,
        };
        match recipient {
            Some(r) if !r.is_empty() => by_recipient.entry(r).or_default().push(ev),
            _ => message_events.push(ev),
        }
    }
    let mut timelines: Vec<Timeline> = states
        .into_iter()
        .map(|s| Timeline {
            recipient: s.recipient.clone(),
            events: by_recipient.remove(&s.recipient).unwrap_or_default(),
            duplicates: dropped.get(&s.recipient).copied().unwrap_or(0),
            state: Some(s),
        })
        .collect();
    // Events of recipients past the page's limit have no state row here.
    for (recipient, events) in by_recipient {
        if timelines.len() as i64 >= MAX_RECIPIENTS {
            break;
        }
        timelines.push(Timeline {
            duplicates: dropped.get(&recipient).copied().unwrap_or(0),
            recipient,
            events,
            state: None,
        });
    }
    Ok(Some(MessageView {
        message,
        timelines,
        message_events,
        job,
        status_reads: reads.len() as i64,
    }))
}

/// When the gateway says an event happened, from the stored record: the
/// webhook's own bytes, or the update a status answer made.
fn gateway_time(provider: &str, source: &str, raw: &str) -> Option<DateTime<Utc>> {
    // `raw` is jsonb as text: the webhook's JSON re-serialized, which parses
    // the same way.
    let provider: Provider = provider.parse().ok()?;
    if provider == Provider::StatusApi {
        return serde_json::from_str::<DeliveryUpdate>(raw)
            .ok()
            .map(|u| u.occurred_at);
    }
    match parse_record(provider, source, raw.as_bytes()).ok()? {
        Event::Recipient(u) => Some(u.occurred_at),
        Event::Message(m) => Some(m.occurred_at),
    }
}
