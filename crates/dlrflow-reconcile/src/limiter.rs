//! The status-API budget shared by every replica: a sliding-window log in Redis.
//!
//! Each API key has three Redis keys `{<prefix>:<key_id>}:…` (the braces are
//! part of the key: a hash tag, so a Redis Cluster keeps the four keys of a
//! budget in one slot, as its scripts need; see "Keys" below)
//!
//! * `reads` — a sorted set holding one member per granted read, scored by the
//!   Redis server's clock (`TIME`, microseconds);
//! * `paused` — set with a TTL after a `429 Retry-After`: no grants until it expires;
//! * `unauthorized` — set after a `401`, holding the reason: no grants at all.
//!
//! [`Limiter::acquire`] runs one Lua script, atomic in Redis: refuse if
//! unauthorized or paused; otherwise drop the members scored `≤ now − W` and
//! grant (adding a member at `now`) only if fewer than `N` remain.
//!
//! ## The property, and why it holds
//!
//! *No interval of length `W` contains more than `N` grants*, for any `N ≥ 1`
//! and `W`, however many replicas call it. Take any interval `[a, a + W)` and
//! the last grant `t` in it. Every grant in the interval lies in `(t − W, t]`
//! (because `a > t − W`). Scripts run one at a time on one clock, so when `t`
//! was granted every earlier grant in `(t − W, t]` was still in the set (only
//! scores `≤ now − W` are removed), and the script granted only because fewer
//! than `N` were there: with `t` itself, at most `N`. Unlike GCRA with a burst,
//! there is no parameter that lets a boundary-straddling burst through.
//!
//! The gateway counts arrivals, not grants. The limiter therefore uses
//! `W = budget.window_ms + budget.safety_margin_ms`, and a worker only uses a
//! grant that is younger than half the margin when the request leaves (else it
//! drops it): if every request reaches the gateway less than `margin` after its
//! grant, any gateway window `[x, x + window)` holds arrivals granted within
//! `(x − margin, x + window)`, an interval shorter than `W`, so at most `N`.
//! What the proof assumes: one Redis primary whose clock does not jump forward
//! (a backward jump only makes the limiter stricter), and the network delay to
//! the gateway below half the margin. On a Redis Cluster that primary is the
//! owner of the budget's slot (see "Keys"); a failover to a replica that had
//! not yet received the last grants forgets them, as a failover of a single
//! replicated Redis would.
//!
//! ## When Redis forgets
//!
//! The proof also assumes the log is never lost. A Redis restarted without
//! persistence (or flushed) comes back empty while the gateway still counts
//! the reads of the last window: granting at once could double the budget.
//! So a fourth key, `epoch`, marks that the log is intact, and the script
//! grants nothing while it is missing ([`Acquire::Uninitialized`]). The
//! caller then tells a key used for the first time from a lost log (the
//! reconciler asks PostgreSQL whether this key has been used before, see
//! `jobs::first_use`) and calls [`Limiter::initialize`]: a first use starts
//! at once, a lost log holds every grant on every replica for `reset_hold`
//! (the limiter's whole window), after which no grant made before the loss
//! can be in any window. While Redis cannot be reached there are no grants
//! at all: the workers stop reading, and resume when it answers.
//!
//! ## Keys
//!
//! `{dlrflow:reconcile:3f2a…}:reads`, `…:paused`, `…:unauthorized`,
//! `…:epoch`: the part in braces is the budget's [`Limiter::name`], and the
//! hash tag that puts all four in one slot of a Redis Cluster (a script over
//! keys of different slots fails with `CROSSSLOT`). One budget is one slot,
//! so one node: its load is one key's reads, 120 a minute by default.
//!
//! Before the cluster support the keys were `<prefix>:<key_id>:reads` etc.,
//! without braces. The new names do not see the old keys: the first replica
//! of the new version finds no `epoch`, the budget's row in PostgreSQL says
//! it was used before, so it holds every grant for the reset hold (one
//! limiter window) as after a lost log, and the window then starts afresh.
//! A replica of the old version still reading after the first new one
//! started counts on the old keys beside the new ones (up to twice the
//! budget in a window): stop every old replica before the first new one
//! starts (scale to 0, or a `Recreate` rollout). The old keys expire by their
//! TTLs (`reads` after a window; `unauthorized` after its hold: a 401
//! marker set just before the upgrade is forgotten, the next read finds out
//! again).

use std::time::Duration;

use dlrflow_runtime::settings::RedisConnection;
use redis::Script;

/// Grant, or wait, or stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// One read may be made now. `left` reads remain in the current window;
    /// `at_us` is the grant's Redis time (microseconds since the epoch).
    Granted { left: u32, at_us: i64 },
    /// The budget is spent (or a 429 pause or a reset hold is on): ask again
    /// after `wait`.
    Wait { wait: Duration, paused: bool },
    /// The key was refused with a 401; no reads until an operator acts.
    Unauthorized { reason: String },
    /// The limiter's state is not in Redis: the key is new, or Redis lost it.
    /// No grant until [`Limiter::initialize`] was called.
    Uninitialized,
}

const ACQUIRE: &str = r#"
local reason = redis.call('GET', KEYS[3])
if reason then
  return {-1, 0, reason}
end
if redis.call('EXISTS', KEYS[4]) == 0 then
  return {2, 0, 'uninitialized'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then
  return {0, pause, 'paused'}
end
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
-- Lua would print these 16-digit numbers as %.14g: format them exactly.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - window))
local n = redis.call('ZCARD', KEYS[1])
if n < limit then
  local at = string.format('%.0f', now)
  redis.call('ZADD', KEYS[1], at, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', math.ceil(window / 1000) + 1000))
  return {1, limit - n - 1, at}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait_us = tonumber(oldest[2]) + window - now
return {0, math.max(1, math.ceil(wait_us / 1000)), 'budget'}
"#;

/// Sets the pause key to at least `ARGV[1]` ms (a shorter Retry-After never
/// shortens a longer pause).
const PAUSE: &str = r#"
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
end
return 1
"#;

/// Marks the log intact (`epoch`) if it is not yet; after a loss
/// (`ARGV[2]` > 0) also holds every grant for that many ms. Returns 1 if this
/// call did it, 0 if another caller already had.
const INITIALIZE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
local hold = tonumber(ARGV[2])
if hold > 0 and redis.call('PTTL', KEYS[2]) < hold then
  redis.call('SET', KEYS[2], 'reset', 'PX', hold)
end
return 1
"#;

/// Counts the grants inside the window at the Redis time of the node that
/// holds the log (on a cluster, `TIME` sent alone could be answered by
/// another node, with another clock).
const IN_WINDOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.0f', now - tonumber(ARGV[1])), '+inf')
"#;

/// The budget of one API key.
#[derive(Clone)]
pub struct Limiter {
    redis: RedisConnection,
    /// `{prefix}:{key_id}`: what `jobs::first_use` records, and the keys'
    /// hash tag.
    name: String,
    keys: [String; 4],
    limit: u32,
    window_us: u64,
    unauthorized_hold: Duration,
    reset_hold_ms: u64,
    acquire: Script,
    pause: Script,
    initialize: Script,
    in_window: Script,
}

/// How a [`Limiter`] counts.
#[derive(Debug, Clone)]
pub struct LimiterSettings {
    pub prefix: String,
    pub key_id: String,
    /// Grants per window.
    pub limit: u32,
    /// The window the limiter counts over (gateway window + safety margin).
    pub window: Duration,
    pub unauthorized_hold: Duration,
    /// No grants for this long after the Redis state was found lost (the
    /// limiter's window; see the module documentation).
    pub reset_hold: Duration,
}

impl Limiter {
    pub fn new(redis: RedisConnection, s: &LimiterSettings) -> Self {
        let name = format!("{}:{}", s.prefix, s.key_id);
        // The hash tag: every key of the budget in one cluster slot.
        let tag = format!("{{{name}}}");
        Limiter {
            redis,
            keys: [
                format!("{tag}:reads"),
                format!("{tag}:paused"),
                format!("{tag}:unauthorized"),
                format!("{tag}:epoch"),
            ],
            name,
            limit: s.limit,
            window_us: u64::try_from(s.window.as_micros()).unwrap_or(u64::MAX),
            unauthorized_hold: s.unauthorized_hold,
            reset_hold_ms: u64::try_from(s.reset_hold.as_millis()).unwrap_or(u64::MAX),
            acquire: Script::new(ACQUIRE),
            pause: Script::new(PAUSE),
            initialize: Script::new(INITIALIZE),
            in_window: Script::new(IN_WINDOW),
        }
    }

    /// Asks for one read. `member` must be unique per call (it names the grant).
    pub async fn acquire(&self, member: &str) -> redis::RedisResult<Acquire> {
        let mut conn = self.redis.clone();
        let (code, value, text): (i64, i64, String) = self
            .acquire
            .key(&self.keys[0])
            .key(&self.keys[1])
            .key(&self.keys[2])
            .key(&self.keys[3])
            .arg(self.limit)
            .arg(self.window_us)
            .arg(member)
            .invoke_async(&mut conn)
            .await?;
        Ok(match code {
            1 => Acquire::Granted {
                left: u32::try_from(value).unwrap_or(0),
                at_us: text.parse().unwrap_or(0),
            },
            0 => Acquire::Wait {
                wait: Duration::from_millis(u64::try_from(value).unwrap_or(1).max(1)),
                paused: text != "budget",
            },
            2 => Acquire::Uninitialized,
            _ => Acquire::Unauthorized { reason: text },
        })
    }

    /// Marks the limiter's state present after [`Acquire::Uninitialized`].
    /// `lost`: the key was used before, so Redis lost the log: every replica
    /// waits the reset hold first. Returns the hold this call started (zero
    /// for a first use, or when another caller initialized it already).
    pub async fn initialize(&self, lost: bool, epoch: &str) -> redis::RedisResult<Duration> {
        let mut conn = self.redis.clone();
        let hold = if lost { self.reset_hold_ms } else { 0 };
        let done: i64 = self
            .initialize
            .key(&self.keys[3])
            .key(&self.keys[1])
            .arg(epoch)
            .arg(hold)
            .invoke_async(&mut conn)
            .await?;
        Ok(if done == 1 {
            Duration::from_millis(hold)
        } else {
            Duration::ZERO
        })
    }

    /// Takes back the grant `member` when its read is not made after all
    /// (the job was re-checked and no longer needed it). The property holds:
    /// the log then counts only reads that were made, and removing a member
    /// can only make later grants possible that the made reads allow.
    pub async fn refund(&self, member: &str) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        redis::cmd("ZREM")
            .arg(&self.keys[0])
            .arg(member)
            .query_async::<()>(&mut conn)
            .await
    }

    /// Names the budget (`{prefix}:{key_id}`): what `jobs::first_use` records.
    /// The same before and after the keys got their hash tag, so an upgrade
    /// is seen as a lost log, not as a first use (see "Keys").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The budget's Redis keys: `reads`, `paused`, `unauthorized`, `epoch`
    /// (for operators' tools and tests).
    pub fn keys(&self) -> &[String; 4] {
        &self.keys
    }

    /// A 429 with `Retry-After`: every replica waits at least `for_`.
    pub async fn pause(&self, for_: Duration) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        let ms = u64::try_from(for_.as_millis()).unwrap_or(u64::MAX).max(1);
        let _: i64 = self
            .pause
            .key(&self.keys[1])
            .arg(ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// A 401: every replica stops reading with this key for the hold time.
    pub async fn mark_unauthorized(&self, reason: &str) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        let secs = self.unauthorized_hold.as_secs().max(1);
        redis::cmd("SET")
            .arg(&self.keys[2])
            .arg(reason)
            .arg("EX")
            .arg(secs)
            .query_async::<()>(&mut conn)
            .await
    }

    /// The reason of a 401 marker, if one is set for this key.
    pub async fn unauthorized_reason(&self) -> redis::RedisResult<Option<String>> {
        let mut conn = self.redis.clone();
        redis::cmd("GET")
            .arg(&self.keys[2])
            .query_async(&mut conn)
            .await
    }

    /// Grants currently inside the window (for `/readyz` and tests).
    pub async fn in_window(&self) -> redis::RedisResult<u64> {
        let mut conn = self.redis.clone();
        self.in_window
            .key(&self.keys[0])
            .arg(self.window_us)
            .invoke_async(&mut conn)
            .await
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }
}
