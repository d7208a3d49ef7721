//! PostgreSQL: connection, migrations, and the one write path
//! ([`apply_batch`] / [`apply_updates`]) shared by the consumer and
//! dlrflow-reconcile. Everything a batch changes — recipient rows, message
//! rows, the durable dedupe record, the analytics outbox and the carrier
//! rollup ([`crate::carriers`]) — is written in the caller's transaction, so
//! a crash either keeps all of it or none.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;

use chrono::{DateTime, Utc};
use dlrflow_events::{
    merge, merge_message, DeliveryUpdate, Event, MergeOutcome, MessageState, MessageUpdate,
    RecipientState, ReconcileReason, Status,
};
use sqlx::migrate::Migrator;
use sqlx::{PgPool, Postgres, Row, Transaction};

/// Migrations 1..999 of this crate. dlrflow-reconcile keeps its own, numbered
/// from 1000, in the same `_sqlx_migrations` table: each side ignores the
/// other's versions.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

pub use crate::record::{Applied, Outcome};
pub use dlrflow_events::{update_id, UPDATE_ID_NAMESPACE};

/// A PostgreSQL failure; [`StoreError::is_record_error`] tells whether the
/// records written are to blame (the consumer isolates and dead-letters them)
/// or the database is (back off, retry, never skip).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("postgres migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("configuration setting `postgres.url`: {0}")]
    Url(#[source] sqlx::Error),
}

impl StoreError {
    /// True when PostgreSQL refused the values written, so the same records
    /// would fail again however often they are retried: SQLSTATE class 22
    /// (data exception: a value out of range, bad encoding, a timestamp
    /// PostgreSQL cannot hold), 23 (integrity constraint) and 54 (program
    /// limit exceeded, e.g. an index row too large), and values that cannot be
    /// encoded or decoded. Everything else — connections, pool timeouts,
    /// serialization failures, deadlocks, shutdowns, missing tables or
    /// privileges — is the database's state, not the records': transient.
    pub fn is_record_error(&self) -> bool {
        match self {
            StoreError::Database(e) => is_record_error(e),
            StoreError::Migrate(_) | StoreError::Url(_) => false,
        }
    }
}

/// See [`StoreError::is_record_error`].
pub fn is_record_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54")),
        sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => true,
        _ => false,
    }
}

/// Runs this crate's migrations (ignoring versions it does not know, i.e.
/// dlrflow-reconcile's).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let mut m = Migrator {
        migrations: MIGRATOR.migrations.clone(),
        ..Migrator::DEFAULT
    };
    m.set_ignore_missing(true);
    m.run(pool).await?;
    Ok(())
}

/// One record for [`apply_batch`].
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    pub event: &'a Event,
    /// The provider the record came from (`messages.provider` of a new message).
    pub provider: &'a str,
    /// The exact record as text, stored in `delivery_events.raw`.
    pub raw: Option<&'a str>,
    /// When the ingest received it (the record timestamp, or an earlier
    /// record's `received-at` header).
    pub received_at: Option<DateTime<Utc>>,
    /// Its trace context (a valid W3C `traceparent`), carried on to the
    /// `dlrflow.delivery.v1` record of the change it makes.
    pub traceparent: Option<&'a str>,
}

/// The result of [`apply_batch`]: one outcome per input, in input order, and
/// the changes.
#[derive(Debug, Clone, Default)]
pub struct BatchResult {
    pub outcomes: Vec<Outcome>,
    pub applied: Vec<Applied>,
}

/// Applies authoritative or webhook updates exactly as the consumer does:
/// rows are locked, merged with [`dlrflow_events::merge`], written, recorded
/// in `delivery_events` (an update whose `dedupe_key` is already there is
/// skipped) and every change gets an outbox row for `dlrflow.delivery.v1`. The
/// caller commits `tx`. `delivery_events.raw` holds the update as JSON; the
/// changes' `dlrflow.delivery.v1` records carry the current span's trace
/// context when spans are exported.
pub async fn apply_updates(
    tx: &mut Transaction<'_, Postgres>,
    updates: &[DeliveryUpdate],
    received_at: DateTime<Utc>,
) -> Result<Vec<Applied>, StoreError> {
    let events: Vec<Event> = updates.iter().cloned().map(Event::Recipient).collect();
    let raws: Vec<Option<String>> = updates
        .iter()
        .map(|u| serde_json::to_string(u).ok())
        .collect();
    let trace = dlrflow_runtime::otel::inject(&tracing::Span::current());
    let items: Vec<Incoming<'_>> = events
        .iter()
        .zip(updates)
        .zip(&raws)
        .map(|((event, u), raw)| Incoming {
            event,
            provider: u.provider.as_str(),
            raw: raw.as_deref(),
            received_at: Some(received_at),
            traceparent: trace.as_ref().map(|(tp, _)| tp.as_str()),
        })
        .collect();
    Ok(apply_batch(tx, &items).await?.applied)
}

/// A stable 64-bit lock key (FNV-1a) for one recipient, identical in every
/// process and binary.
fn lock_key(message_id: &str, recipient: &str) -> i64 {
    fnv1a(
        b"dlrflow.r\0"
            .iter()
            .chain(message_id.as_bytes())
            .chain(b"\0")
            .chain(recipient.as_bytes()),
    ) as i64
}

/// FNV-1a (64 bits) of `bytes`: the same in every process and binary.
pub(crate) fn fnv1a<'a>(bytes: impl IntoIterator<Item = &'a u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What [`apply_batch_with`] maintains besides the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Keep the carrier rollup (`carrier_rollup`, [`crate::carriers`]) in
    /// the same transaction. On in every service; off only to measure what
    /// it costs (the `state-bench` example): a state written without it has
    /// a rollup that no longer matches it (a `rebuild` makes a matching one).
    pub carrier_rollup: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            carrier_rollup: true,
        }
    }
}

/// Writes one batch in `tx` (see the module docs). Records are merged in input
/// order; a dedupe key seen before (in PostgreSQL, or earlier in the batch) is
/// a [`Outcome::Duplicate`] and changes nothing.
pub async fn apply_batch(
    tx: &mut Transaction<'_, Postgres>,
    items: &[Incoming<'_>],
) -> Result<BatchResult, StoreError> {
    apply_batch_with(tx, items, WriteOptions::default()).await
}

/// [`apply_batch`] with [`WriteOptions`].
pub async fn apply_batch_with(
    tx: &mut Transaction<'_, Postgres>,
    items: &[Incoming<'_>],
    opts: WriteOptions,
) -> Result<BatchResult, StoreError> {
    let mut result = BatchResult {
        outcomes: vec![Outcome::Duplicate; items.len()],
        applied: Vec::new(),
    };
    if items.is_empty() {
        return Ok(result);
    }
    lock_recipients(tx, items).await?;
    let mut seen = recorded_keys(tx, items).await?;
    let fresh: Vec<usize> = (0..items.len())
        .filter(|&i| !seen.contains(items[i].event.dedupe_key()))
        .collect();
    if fresh.is_empty() {
        return Ok(result);
    }
    let (fresh, claimed) =
        claim_messages(tx, items, fresh, &mut seen, &mut result.outcomes).await?;
    if fresh.is_empty() {
        return Ok(result);
    }
    let (mut current, source_of, mut bits) = load_recipients(tx, items, &fresh).await?;
    let before = opts.carrier_rollup.then(|| (current.clone(), bits.clone()));
    let (touched, message_updates, bits_changed) = tracing::info_span!("merge")
        .in_scope(|| merge_in_order(items, &fresh, &mut current, &mut bits, &mut result));
    if !touched.is_empty() {
        write_recipients(tx, &touched, &current, &source_of, &bits).await?;
    }
    let bits_only: Touched = bits_changed.difference(&touched).cloned().collect();
    if !bits_only.is_empty() {
        write_webhook_terminals(tx, &bits_only, &bits).await?;
    }
    let queued_changes = if message_updates.is_empty() {
        QueuedChanges::new()
    } else {
        write_messages(tx, &message_updates).await?
    };
    record_events(tx, items, &fresh, &result.outcomes).await?;
    mark_status_applied(tx, items, &fresh).await?;
    write_outbox(tx, items, &fresh, &result).await?;
    if let Some((before, bits_before)) = before {
        let changed: Touched = touched.union(&bits_only).cloned().collect();
        roll_up(
            tx,
            &Rollup {
                before: &before,
                bits_before: &bits_before,
                current: &current,
                bits: &bits,
                source_of: &source_of,
                changed: &changed,
                queued_changes: &queued_changes,
                claimed: &claimed,
            },
        )
        .await?;
    }
    Ok(result)
}

/// What [`roll_up`] needs: each changed recipient before and after the
/// batch, and the messages whose queued time the batch changed.
struct Rollup<'a> {
    before: &'a Current,
    bits_before: &'a Bits,
    current: &'a Current,
    bits: &'a Bits,
    source_of: &'a SourceOf<'a>,
    changed: &'a Touched,
    queued_changes: &'a QueuedChanges,
    claimed: &'a Claimed,
}

/// Keeps `carrier_rollup` equal to the sum of every recipient's
/// contribution ([`crate::carriers`]): for each recipient whose state or
/// webhook bits the batch changed, and each recipient of a message whose
/// queued time it changed, minus the old contribution plus the new one. The
/// old one is exact because every writer of a message's recipients or of
/// its queued time holds the message's advisory lock ([`lock_recipients`]).
async fn roll_up(tx: &mut Transaction<'_, Postgres>, r: &Rollup<'_>) -> Result<(), StoreError> {
    // Every message of the batch was read by the claim, under the
    // message's advisory lock: its queued time before the batch, and after
    // it unless the batch changed it.
    let old = |m: &str| r.claimed.queued.get(m).copied().flatten();
    let now = |m: &str| {
        r.queued_changes
            .get(m)
            .map_or_else(|| old(m), |c| Some(c.1))
    };
    let mut deltas = crate::carriers::Deltas::new();
    for key in r.changed {
        let (m, p) = (key.0.as_str(), key.1.as_str());
        let source = r.source_of.get(&(m, p)).map_or("", |s| s.0);
        if let Some((state, _)) = r.before.get(key) {
            let bits = r.bits_before.get(key).copied().unwrap_or(0);
            crate::carriers::contribute(&mut deltas, -1, source, state, bits, old(m));
        }
        if let Some((state, _)) = r.current.get(key) {
            let bits = r.bits.get(key).copied().unwrap_or(0);
            crate::carriers::contribute(&mut deltas, 1, source, state, bits, now(m));
        }
    }
    // A message whose row this batch created has no recipient but the ones
    // the batch wrote (in `changed`): only older messages are read.
    let ids: Vec<&str> = r
        .queued_changes
        .keys()
        .filter(|m| !r.claimed.created.contains(*m))
        .map(String::as_str)
        .collect();
    if !ids.is_empty() {
        let rows = sqlx::query(&format!(
            "SELECT {STATE_COLUMNS}, source, webhook_terminals FROM recipient_state \
             WHERE message_id = ANY($1) ORDER BY message_id, recipient"
        ))
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        for row in &rows {
            let (state, _) = state_from_row(row)?;
            let key = (state.message_id.clone(), state.recipient.clone());
            if r.changed.contains(&key) {
                continue;
            }
            let source: String = row.try_get("source")?;
            let bits: i16 = row.try_get("webhook_terminals")?;
            let m = state.message_id.as_str();
            crate::carriers::contribute(&mut deltas, -1, &source, &state, bits, old(m));
            crate::carriers::contribute(&mut deltas, 1, &source, &state, bits, now(m));
        }
    }
    crate::carriers::write_deltas(tx, &deltas).await?;
    Ok(())
}

/// Sets `webhook_terminals` of rows whose state the batch left as it was (a
/// late webhook repeating the terminal status the status API set). Not a
/// change of the state: `updated_at` and `version` stay.
async fn write_webhook_terminals(
    tx: &mut Transaction<'_, Postgres>,
    keys: &Touched,
    bits: &Bits,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE recipient_state r SET webhook_terminals = u.w \
         FROM unnest($1::text[], $2::text[], $3::int2[]) AS u(m, p, w) \
         WHERE r.message_id = u.m AND r.recipient = u.p",
    )
    .bind(keys.iter().map(|k| k.0.as_str()).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1.as_str()).collect::<Vec<_>>())
    .bind(
        keys.iter()
            .map(|k| bits.get(k).copied().unwrap_or(0))
            .collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Sets `messages.status_applied_at` (the transaction time) for the messages
/// a status-API answer in `fresh` was applied to: dlrflow-reconcile then
/// knows the rows that answer changed were its own read, not new news.
async fn mark_status_applied(
    tx: &mut Transaction<'_, Postgres>,
    items: &[Incoming<'_>],
    fresh: &[usize],
) -> Result<(), StoreError> {
    let ids: BTreeSet<&str> = fresh
        .iter()
        .filter_map(|&i| match items[i].event {
            Event::Recipient(u) if u.authoritative => Some(u.message_id.as_str()),
            _ => None,
        })
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = ids.into_iter().collect();
    sqlx::query("UPDATE messages SET status_applied_at = now() WHERE message_id = ANY($1)")
        .bind(&ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The message and recipient an input is about ("" for a message-level one),
/// and its source.
fn subject(event: &Event) -> (&str, &str, &str) {
    match event {
        Event::Recipient(u) => (&u.message_id, &u.recipient, &u.source),
        Event::Message(m) => (&m.message_id, "", &m.source),
    }
}

/// Serializes with any other writer of the same recipients (another replica
/// during a rebalance, reconcile): advisory locks in one global order, before
/// anything else, so writers never wait on each other in a cycle. The same
/// dedupe key always belongs to the same recipient, so the dedupe check is
/// race-free once these are held.
async fn lock_recipients(
    tx: &mut Transaction<'_, Postgres>,
    items: &[Incoming<'_>],
) -> Result<(), StoreError> {
    // Each recipient, and its message ("" as the recipient: the key a
    // message-level event locks), so that a batch that changes a message's
    // queued time and re-rolls all its recipients ([`roll_up`]) never runs
    // beside a writer of one of them.
    let mut locks: Vec<i64> = items
        .iter()
        .flat_map(|i| {
            let (message_id, recipient, _) = subject(i.event);
            [lock_key(message_id, recipient), lock_key(message_id, "")]
        })
        .collect();
    locks.sort_unstable();
    locks.dedup();
    sqlx::query("SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::int8[]) AS k")
        .bind(&locks)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The durable dedupe: which of the batch's keys are already recorded.
async fn recorded_keys(
    tx: &mut Transaction<'_, Postgres>,
    items: &[Incoming<'_>],
) -> Result<HashSet<String>, StoreError> {
    let keys: Vec<&str> = items.iter().map(|i| i.event.dedupe_key()).collect();
    let rows = sqlx::query("SELECT dedupe_key FROM delivery_events WHERE dedupe_key = ANY($1)")
        .bind(&keys)
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
}

/// What [`claim_messages`] learnt of the batch's messages, for [`roll_up`]:
/// their queued time before the batch, and which rows the batch created
/// (such a message has no recipient the batch does not write itself).
#[derive(Debug, Default)]
struct Claimed {
    queued: HashMap<String, Option<DateTime<Utc>>>,
    created: HashSet<String>,
}

/// Gives every message touched a `messages` row (sorted: one lock order),
/// then keeps the inputs of the source that owns their message (tenant
/// isolation: another source's input is [`Outcome::Foreign`], changes
/// nothing and is not recorded), each dedupe key once.
async fn claim_messages(
    tx: &mut Transaction<'_, Postgres>,
    items: &[Incoming<'_>],
    fresh: Vec<usize>,
    seen: &mut HashSet<String>,
    outcomes: &mut [Outcome],
) -> Result<(Vec<usize>, Claimed), StoreError> {
    let mut msgs: Vec<(&str, &str, &str)> = Vec::new();
    let mut ids = BTreeSet::new();
    for &i in &fresh {
        let (id, _, source) = subject(items[i].event);
        if ids.insert(id) {
            msgs.push((id, source, items[i].provider));
        }
    }
    msgs.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let ids: Vec<&str> = msgs.iter().map(|m| m.0).collect();
    let created: HashSet<String> = sqlx::query_scalar(
        "INSERT INTO messages (message_id, source, provider) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ON CONFLICT (message_id) DO NOTHING \
         RETURNING message_id",
    )
    .bind(&ids)
    .bind(msgs.iter().map(|m| m.1).collect::<Vec<_>>())
    .bind(msgs.iter().map(|m| m.2).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    let rows: Vec<(String, String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT message_id, source, queued_at FROM messages WHERE message_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut owners: HashMap<String, String> = HashMap::with_capacity(rows.len());
    let mut claimed = Claimed {
        queued: HashMap::with_capacity(rows.len()),
        created,
    };
    for (id, source, queued) in rows {
        claimed.queued.insert(id.clone(), queued);
        owners.insert(id, source);
    }
    let fresh = fresh
        .into_iter()
        .filter(|&i| {
            let (id, _, source) = subject(items[i].event);
            if owners.get(id).is_some_and(|owner| owner != source) {
                outcomes[i] = Outcome::Foreign;
                return false;
            }
            // Only now the in-batch dedupe, so that a foreign record can never
            // hide a genuine one that carries the same key.
            seen.insert(items[i].event.dedupe_key().to_owned())
        })
        .collect();
    Ok((fresh, claimed))
}

/// The current recipient rows (locked), by (message, recipient).
type Current = HashMap<(String, String), (RecipientState, i64)>;
/// The recipients a batch changed, by (message, recipient).
type Touched = BTreeSet<(String, String)>;
/// The source and provider a new recipient row gets. A row a status-API
/// answer creates takes its message's gateway provider (`lisoloo`,
/// `arpoone`), not `status_api`, so the row says the same whichever came
/// first, the answer or the webhooks (and a rebuild from the log agrees).
type SourceOf<'a> = HashMap<(&'a str, &'a str), (&'a str, &'a str)>;
/// `recipient_state.webhook_terminals` of the recipients loaded or created.
type Bits = HashMap<(String, String), i16>;
/// Messages whose queued time a batch changed: (before, after).
type QueuedChanges = HashMap<String, (Option<DateTime<Utc>>, DateTime<Utc>)>;
/// The columns [`state_from_row`] reads.
const STATE_COLUMNS: &str = "message_id, recipient, status, queued_at, processing_at, sent_at, \
    delivered_at, failed_at, carrier, error_code, error_message, retryable, segments, last_event_at, \
    needs_reconcile, reconcile_reason, version";

/// Loads, and locks, the rows of the recipients the fresh inputs are about.
async fn load_recipients<'a>(
    tx: &mut Transaction<'_, Postgres>,
    items: &'a [Incoming<'a>],
    fresh: &[usize],
) -> Result<(Current, SourceOf<'a>, Bits), StoreError> {
    let mut pairs: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut source_of: SourceOf<'a> = HashMap::new();
    for &i in fresh {
        if let Event::Recipient(u) = items[i].event {
            pairs.insert((&u.message_id, &u.recipient));
            source_of
                .entry((&u.message_id, &u.recipient))
                .or_insert((&u.source, items[i].provider));
        }
    }
    let mut current = Current::new();
    let mut bits = Bits::new();
    if pairs.is_empty() {
        return Ok((current, source_of, bits));
    }
    let rows = sqlx::query(
        "SELECT r.message_id, r.recipient, r.status, r.queued_at, r.processing_at, r.sent_at, \
                r.delivered_at, r.failed_at, r.carrier, r.error_code, r.error_message, r.retryable, \
                r.segments, r.last_event_at, r.needs_reconcile, r.reconcile_reason, r.version, \
                r.webhook_terminals \
         FROM recipient_state r \
         JOIN unnest($1::text[], $2::text[]) AS k(m, p) ON r.message_id = k.m AND r.recipient = k.p \
         ORDER BY r.message_id, r.recipient \
         FOR UPDATE OF r",
    )
    .bind(pairs.iter().map(|p| p.0).collect::<Vec<_>>())
    .bind(pairs.iter().map(|p| p.1).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    for row in &rows {
        let (state, version) = state_from_row(row)?;
        let key = (state.message_id.clone(), state.recipient.clone());
        bits.insert(key.clone(), row.try_get("webhook_terminals")?);
        current.insert(key, (state, version));
    }
    Ok((current, source_of, bits))
}

/// Merges the fresh inputs in input order into `current`, filling in each
/// outcome and change, and records in `bits` the terminal statuses webhooks
/// reported (whatever the merge made of them); returns the recipients
/// changed, the message-level inputs and the recipients whose bits changed.
fn merge_in_order<'a>(
    items: &'a [Incoming<'a>],
    fresh: &[usize],
    current: &mut Current,
    bits: &mut Bits,
    result: &mut BatchResult,
) -> (Touched, Vec<(usize, &'a MessageUpdate)>, Touched) {
    let mut touched = Touched::new();
    let mut bits_changed = Touched::new();
    let mut message_updates: Vec<(usize, &MessageUpdate)> = Vec::new();
    for &i in fresh {
        let u = match items[i].event {
            Event::Message(m) => {
                message_updates.push((i, m));
                result.outcomes[i] = Outcome::Message;
                continue;
            }
            Event::Recipient(u) => u,
        };
        let key = (u.message_id.clone(), u.recipient.clone());
        let bit = crate::carriers::webhook_bit(u.status);
        if !u.authoritative && bit != 0 {
            let b = bits.entry(key.clone()).or_insert(0);
            if *b & bit == 0 {
                *b |= bit;
                bits_changed.insert(key.clone());
            }
        }
        let cur = current.get(&key);
        let version = cur.map_or(0, |c| c.1) + 1;
        let (state, previous_status, kind) = match merge(cur.map(|c| &c.0), u) {
            MergeOutcome::Unchanged => {
                result.outcomes[i] = Outcome::Unchanged;
                continue;
            }
            MergeOutcome::Applied {
                state,
                previous_status,
            } => (state, previous_status, Outcome::Applied),
            MergeOutcome::Conflict { state } => {
                let prev = Some(state.status);
                (state, prev, Outcome::Conflict)
            }
        };
        result.outcomes[i] = kind;
        result.applied.push(Applied {
            update_id: update_id(&u.dedupe_key, &u.recipient),
            dedupe_key: u.dedupe_key.clone(),
            outcome: kind,
            previous_status,
            state: state.clone(),
            version,
        });
        touched.insert(key.clone());
        current.insert(key, (state, version));
    }
    (touched, message_updates, bits_changed)
}

/// The durable dedupe record of every fresh input, with its outcome and the
/// input as received.
async fn record_events(
    tx: &mut Transaction<'_, Postgres>,
    items: &[Incoming<'_>],
    fresh: &[usize],
    outcomes: &[Outcome],
) -> Result<(), StoreError> {
    let mut ev = EventRows::default();
    for &i in fresh {
        let it = &items[i];
        let (message_id, recipient, source) = subject(it.event);
        let (recipient, status) = match it.event {
            Event::Recipient(u) => (Some(recipient), Some(u.status.as_str())),
            Event::Message(_) => (None, None),
        };
        ev.key.push(it.event.dedupe_key());
        ev.message_id.push(message_id);
        ev.recipient.push(recipient);
        ev.source.push(source);
        ev.provider.push(it.provider);
        ev.status.push(status);
        // A text column holds any UTF-8 but the NUL character, which no
        // record that parsed as JSON contains; refuse it anyway.
        ev.raw.push(it.raw.filter(|r| !r.contains('\0')));
        ev.received_at.push(it.received_at);
        ev.outcome.push(outcomes[i].as_str());
    }
    sqlx::query(
        "INSERT INTO delivery_events (dedupe_key, message_id, recipient, source, provider, status, raw, received_at, outcome) \
         SELECT k, m, r, s, p, st, raw, ra, o \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[], $9::text[]) \
              AS u(k, m, r, s, p, st, raw, ra, o) \
         ON CONFLICT (dedupe_key) DO NOTHING",
    )
    .bind(&ev.key)
    .bind(&ev.message_id)
    .bind(&ev.recipient)
    .bind(&ev.source)
    .bind(&ev.provider)
    .bind(&ev.status)
    .bind(&ev.raw)
    .bind(&ev.received_at)
    .bind(&ev.outcome)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One outbox row (the `dlrflow.delivery.v1` record) per change.
async fn write_outbox(
    tx: &mut Transaction<'_, Postgres>,
    items: &[Incoming<'_>],
    fresh: &[usize],
    result: &BatchResult,
) -> Result<(), StoreError> {
    if result.applied.is_empty() {
        return Ok(());
    }
    let now = Utc::now();
    let n = result.applied.len();
    let (mut ids, mut mids, mut payloads, mut traces) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let changed = fresh
        .iter()
        .filter(|&&i| matches!(result.outcomes[i], Outcome::Applied | Outcome::Conflict));
    for (a, &i) in result.applied.iter().zip(changed) {
        let Event::Recipient(u) = items[i].event else {
            continue;
        };
        ids.push(a.update_id);
        mids.push(a.state.message_id.as_str());
        payloads.push(crate::record::payload(a, u, items[i].provider, now));
        traces.push(items[i].traceparent);
    }
    sqlx::query(
        "INSERT INTO delivery_outbox (update_id, message_id, payload, traceparent) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])",
    )
    .bind(&ids)
    .bind(&mids)
    .bind(&payloads)
    .bind(&traces)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[derive(Default)]
struct EventRows<'a> {
    key: Vec<&'a str>,
    message_id: Vec<&'a str>,
    recipient: Vec<Option<&'a str>>,
    source: Vec<&'a str>,
    provider: Vec<&'a str>,
    status: Vec<Option<&'static str>>,
    raw: Vec<Option<&'a str>>,
    received_at: Vec<Option<DateTime<Utc>>>,
    outcome: Vec<&'static str>,
}

fn state_from_row(row: &sqlx::postgres::PgRow) -> Result<(RecipientState, i64), sqlx::Error> {
    let status: String = row.try_get("status")?;
    let status = Status::from_str(&status).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    let reason: Option<String> = row.try_get("reconcile_reason")?;
    let reconcile_reason = reason
        .map(|r| ReconcileReason::from_str(&r))
        .transpose()
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    let segments: Option<i32> = row.try_get("segments")?;
    Ok((
        RecipientState {
            message_id: row.try_get("message_id")?,
            recipient: row.try_get("recipient")?,
            status,
            queued_at: row.try_get("queued_at")?,
            processing_at: row.try_get("processing_at")?,
            sent_at: row.try_get("sent_at")?,
            delivered_at: row.try_get("delivered_at")?,
            failed_at: row.try_get("failed_at")?,
            carrier: row.try_get("carrier")?,
            error_code: row.try_get("error_code")?,
            error_message: row.try_get("error_message")?,
            retryable: row.try_get("retryable")?,
            segments: segments.map(|s| s.max(0) as u32),
            last_event_at: row.try_get("last_event_at")?,
            needs_reconcile: row.try_get("needs_reconcile")?,
            reconcile_reason,
        },
        row.try_get("version")?,
    ))
}

async fn write_recipients(
    tx: &mut Transaction<'_, Postgres>,
    touched: &BTreeSet<(String, String)>,
    current: &HashMap<(String, String), (RecipientState, i64)>,
    source_of: &HashMap<(&str, &str), (&str, &str)>,
    bits: &Bits,
) -> Result<(), StoreError> {
    let n = touched.len();
    let mut mid = Vec::with_capacity(n);
    let mut rcp = Vec::with_capacity(n);
    let mut src = Vec::with_capacity(n);
    let mut prov = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut queued = Vec::with_capacity(n);
    let mut processing = Vec::with_capacity(n);
    let mut sent = Vec::with_capacity(n);
    let mut delivered = Vec::with_capacity(n);
    let mut failed = Vec::with_capacity(n);
    let mut carrier = Vec::with_capacity(n);
    let mut code = Vec::with_capacity(n);
    let mut msg = Vec::with_capacity(n);
    let mut retryable = Vec::with_capacity(n);
    let mut segments = Vec::with_capacity(n);
    let mut last = Vec::with_capacity(n);
    let mut needs = Vec::with_capacity(n);
    let mut reason = Vec::with_capacity(n);
    let mut version = Vec::with_capacity(n);
    let mut webhook = Vec::with_capacity(n);
    for key in touched {
        let (s, v) = &current[key];
        let (source, provider) = source_of
            .get(&(key.0.as_str(), key.1.as_str()))
            .copied()
            .unwrap_or(("", ""));
        mid.push(s.message_id.as_str());
        rcp.push(s.recipient.as_str());
        src.push(source);
        prov.push(provider);
        status.push(s.status.as_str());
        queued.push(s.queued_at);
        processing.push(s.processing_at);
        sent.push(s.sent_at);
        delivered.push(s.delivered_at);
        failed.push(s.failed_at);
        carrier.push(s.carrier.as_deref());
        code.push(s.error_code.as_deref());
        msg.push(s.error_message.as_deref());
        retryable.push(s.retryable);
        segments.push(s.segments.map(|x| x.min(i32::MAX as u32) as i32));
        last.push(s.last_event_at);
        needs.push(s.needs_reconcile);
        reason.push(s.reconcile_reason.map(ReconcileReason::as_str));
        version.push(*v);
        webhook.push(bits.get(key).copied().unwrap_or(0));
    }
    sqlx::query(
        "INSERT INTO recipient_state (message_id, recipient, source, provider, status, queued_at, processing_at, \
            sent_at, delivered_at, failed_at, carrier, error_code, error_message, retryable, segments, \
            last_event_at, needs_reconcile, reconcile_reason, version, webhook_terminals) \
         SELECT mid, rcp, src, \
            CASE WHEN prov = 'status_api' \
                 THEN coalesce((SELECT m.provider FROM messages m \
                                 WHERE m.message_id = u.mid AND m.provider <> 'status_api'), prov) \
                 ELSE prov END, \
            st, q, pr, se, de, fa, ca, co, me, re, sg, la, ne, rs, ve, wt \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], \
            $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::text[], $12::text[], \
            $13::text[], $14::bool[], $15::int4[], $16::timestamptz[], $17::bool[], $18::text[], $19::int8[], \
            $20::int2[]) \
            AS u(mid, rcp, src, prov, st, q, pr, se, de, fa, ca, co, me, re, sg, la, ne, rs, ve, wt) \
         ON CONFLICT (message_id, recipient) DO UPDATE SET \
            provider = CASE WHEN recipient_state.provider = 'status_api' THEN EXCLUDED.provider \
                            ELSE recipient_state.provider END, \
            status = EXCLUDED.status, queued_at = EXCLUDED.queued_at, processing_at = EXCLUDED.processing_at, \
            sent_at = EXCLUDED.sent_at, delivered_at = EXCLUDED.delivered_at, failed_at = EXCLUDED.failed_at, \
            carrier = EXCLUDED.carrier, error_code = EXCLUDED.error_code, error_message = EXCLUDED.error_message, \
            retryable = EXCLUDED.retryable, segments = EXCLUDED.segments, last_event_at = EXCLUDED.last_event_at, \
            needs_reconcile = EXCLUDED.needs_reconcile, reconcile_reason = EXCLUDED.reconcile_reason, \
            version = EXCLUDED.version, webhook_terminals = EXCLUDED.webhook_terminals, updated_at = now()",
    )
    .bind(&mid)
    .bind(&rcp)
    .bind(&src)
    .bind(&prov)
    .bind(&status)
    .bind(&queued)
    .bind(&processing)
    .bind(&sent)
    .bind(&delivered)
    .bind(&failed)
    .bind(&carrier)
    .bind(&code)
    .bind(&msg)
    .bind(&retryable)
    .bind(&segments)
    .bind(&last)
    .bind(&needs)
    .bind(&reason)
    .bind(&version)
    .bind(&webhook)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Merges the message-level inputs into their `messages` rows; returns the
/// messages whose queued time changed.
async fn write_messages(
    tx: &mut Transaction<'_, Postgres>,
    updates: &[(usize, &MessageUpdate)],
) -> Result<QueuedChanges, StoreError> {
    let mut ids: Vec<&str> = updates.iter().map(|(_, m)| m.message_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let rows = sqlx::query(
        "SELECT message_id, source, total_recipients, total_messages, total_cost, currency, scheduled_at, queued_at \
         FROM messages WHERE message_id = ANY($1) ORDER BY message_id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut states: HashMap<String, Option<MessageState>> = HashMap::new();
    let mut queued_before: HashMap<String, Option<DateTime<Utc>>> = HashMap::new();
    for row in &rows {
        let id: String = row.try_get("message_id")?;
        let queued_at: Option<DateTime<Utc>> = row.try_get("queued_at")?;
        queued_before.insert(id.clone(), queued_at);
        let state = match queued_at {
            None => None,
            Some(queued_at) => {
                let tr: Option<i32> = row.try_get("total_recipients")?;
                let tm: Option<i32> = row.try_get("total_messages")?;
                Some(MessageState {
                    message_id: id.clone(),
                    source: row.try_get("source")?,
                    total_recipients: tr.map(|v| v.max(0) as u32),
                    total_messages: tm.map(|v| v.max(0) as u32),
                    total_cost: row.try_get("total_cost")?,
                    currency: row.try_get("currency")?,
                    scheduled_at: row.try_get("scheduled_at")?,
                    queued_at,
                })
            }
        };
        states.insert(id, state);
    }
    let mut changed: BTreeSet<String> = BTreeSet::new();
    for (_, m) in updates {
        let cur = states.get(&m.message_id).cloned().flatten();
        if let Some(next) = merge_message(cur.as_ref(), m) {
            states.insert(m.message_id.clone(), Some(next));
            changed.insert(m.message_id.clone());
        }
    }
    if changed.is_empty() {
        return Ok(QueuedChanges::new());
    }
    let list: Vec<&MessageState> = changed
        .iter()
        .filter_map(|id| states[id].as_ref())
        .collect();
    sqlx::query(
        "UPDATE messages m SET total_recipients = u.tr, total_messages = u.tm, total_cost = u.tc, \
            currency = u.cur, scheduled_at = u.sa, queued_at = u.qa, updated_at = now() \
         FROM unnest($1::text[], $2::int4[], $3::int4[], $4::float8[], $5::text[], $6::timestamptz[], $7::timestamptz[]) \
            AS u(id, tr, tm, tc, cur, sa, qa) \
         WHERE m.message_id = u.id",
    )
    .bind(list.iter().map(|s| s.message_id.as_str()).collect::<Vec<_>>())
    .bind(list.iter().map(|s| s.total_recipients.map(|v| v.min(i32::MAX as u32) as i32)).collect::<Vec<_>>())
    .bind(list.iter().map(|s| s.total_messages.map(|v| v.min(i32::MAX as u32) as i32)).collect::<Vec<_>>())
    .bind(list.iter().map(|s| s.total_cost).collect::<Vec<_>>())
    .bind(list.iter().map(|s| s.currency.as_deref()).collect::<Vec<_>>())
    .bind(list.iter().map(|s| s.scheduled_at).collect::<Vec<_>>())
    .bind(list.iter().map(|s| Some(s.queued_at)).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(list
        .iter()
        .filter_map(|s| {
            let before = queued_before.get(&s.message_id).copied().flatten();
            (before != Some(s.queued_at)).then(|| (s.message_id.clone(), (before, s.queued_at)))
        })
        .collect())
}
