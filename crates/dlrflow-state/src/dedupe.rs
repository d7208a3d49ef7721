//! The Redis fast path of dedupe: a key `{prefix}d:{dedupe_key}` with a TTL per
//! event already written to PostgreSQL. Redis is only a cache: a key missing
//! (flushed, expired, restarted Redis) sends the record to PostgreSQL, whose
//! unique `delivery_events.dedupe_key` decides. A key is only set after the
//! transaction that recorded the event committed.
//!
//! One round trip per batch: the keys committed by the previous batch are set
//! in the same pipeline that checks the current batch's keys.
//!
//! On a Redis Cluster (`redis.cluster = true`) the keys stay as they are,
//! without a hash tag: they spread over every slot, so over every primary
//! (one tag for all would put the whole dedupe load on one node). The client
//! cannot send a pipeline over several slots, so a round trip is two steps
//! there: the marks as single `SET`s sent together (each to its node, over
//! the one multiplexed connection per node), then one `MGET`, which the
//! client splits by slot and puts back in order. Nothing needs atomicity
//! across keys: each key is a cache entry of its own.
//!
//! Redis down is not the pipeline down: a failed round trip makes the caller
//! treat every key as unseen (PostgreSQL decides), and Redis is left alone
//! for [`RETRY_AFTER`] so a dead server costs no time per batch. Marks that
//! could not be set are kept, up to [`MAX_PENDING`] (the oldest are dropped:
//! they are only a cache).

use std::time::{Duration, Instant};

use dlrflow_runtime::settings::RedisConnection;

/// How long Redis is skipped after a failed round trip.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);
/// The most marks kept while Redis is unreachable.
pub const MAX_PENDING: usize = 200_000;

/// On a cluster, the most marks sent at once (each is its own command).
const MARKS_IN_FLIGHT: usize = 2_000;

/// Why a check did not reach Redis.
#[derive(Debug, thiserror::Error)]
pub enum DedupeError {
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("skipped after a recent failure")]
    Backoff,
}

pub struct Dedupe {
    conn: RedisConnection,
    prefix: String,
    ttl_secs: u64,
    /// Keys committed to PostgreSQL but not yet marked in Redis.
    pending_marks: Vec<String>,
    /// Redis is not tried before this instant (after a failure).
    skip_until: Option<Instant>,
}

impl Dedupe {
    /// Connects with the `[redis]` settings; the error never holds the
    /// URL's password.
    pub async fn connect(cfg: &crate::config::DedupeRedisConfig) -> anyhow::Result<Self> {
        Ok(Self {
            conn: cfg.conn.connect().await?,
            prefix: cfg.conn.prefix.clone(),
            ttl_secs: cfg.ttl.as_secs(),
            pending_marks: Vec::new(),
            skip_until: None,
        })
    }

    pub fn connection(&self) -> RedisConnection {
        self.conn.clone()
    }

    fn key(&self, dedupe_key: &str) -> String {
        format!("{}d:{}", self.prefix, dedupe_key)
    }

    /// Marks the pending keys and returns, for each of `keys`, whether Redis
    /// has seen it. On error nothing is lost: the pending marks stay pending,
    /// and Redis is skipped for [`RETRY_AFTER`].
    pub async fn check(&mut self, keys: &[&str]) -> Result<Vec<bool>, DedupeError> {
        if keys.is_empty() && self.pending_marks.is_empty() {
            return Ok(Vec::new());
        }
        if self.skip_until.is_some_and(|t| Instant::now() < t) {
            return Err(DedupeError::Backoff);
        }
        let result = self.round_trip(keys).await;
        self.skip_until = result.is_err().then(|| Instant::now() + RETRY_AFTER);
        Ok(result?)
    }

    async fn round_trip(&mut self, keys: &[&str]) -> redis::RedisResult<Vec<bool>> {
        if self.conn.is_cluster() {
            return self.round_trip_cluster(keys).await;
        }
        let mut pipe = redis::pipe();
        for k in &self.pending_marks {
            pipe.cmd("SET")
                .arg(k)
                .arg(1)
                .arg("EX")
                .arg(self.ttl_secs)
                .ignore();
        }
        if keys.is_empty() {
            pipe.query_async::<()>(&mut self.conn).await?;
            self.pending_marks.clear();
            return Ok(Vec::new());
        }
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        pipe.cmd("MGET").arg(&full);
        let (found,): (Vec<Option<String>>,) = pipe.query_async(&mut self.conn).await?;
        self.pending_marks.clear();
        Ok(found.into_iter().map(|v| v.is_some()).collect())
    }

    /// [`Self::round_trip`] on a cluster: the marks first (so a key marked
    /// by the previous batch is seen by this one's check), then the check.
    async fn round_trip_cluster(&mut self, keys: &[&str]) -> redis::RedisResult<Vec<bool>> {
        // In bounded rounds: after an outage up to MAX_PENDING marks wait.
        for chunk in self.pending_marks.chunks(MARKS_IN_FLIGHT) {
            let marks = chunk.iter().map(|k| {
                let mut conn = self.conn.clone();
                let mut set = redis::cmd("SET");
                set.arg(k).arg(1).arg("EX").arg(self.ttl_secs);
                async move { set.query_async::<()>(&mut conn).await }
            });
            futures::future::try_join_all(marks).await?;
        }
        self.pending_marks.clear();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        let found: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&full)
            .query_async(&mut self.conn)
            .await?;
        Ok(found.into_iter().map(|v| v.is_some()).collect())
    }

    /// Remembers keys that PostgreSQL now holds, to mark on the next round trip.
    pub fn committed<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>) {
        let keys: Vec<String> = keys.into_iter().map(|k| self.key(k)).collect();
        self.pending_marks.extend(keys);
        if self.pending_marks.len() > MAX_PENDING {
            let excess = self.pending_marks.len() - MAX_PENDING;
            self.pending_marks.drain(..excess);
        }
    }

    /// Sets the pending marks now (idle or shutting down).
    pub async fn flush(&mut self) -> Result<(), DedupeError> {
        if self.pending_marks.is_empty() {
            return Ok(());
        }
        self.check(&[]).await.map(|_| ())
    }

    pub fn has_pending(&self) -> bool {
        !self.pending_marks.is_empty()
    }
}
