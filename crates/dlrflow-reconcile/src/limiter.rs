//! The status-API budget shared by every replica: a sliding-window log in Redis.
//!
//! Each API key has three Redis keys under `{prefix}:{key_id}:`
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
//! the gateway below half the margin.
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

use std::time::Duration;

use redis::aio::ConnectionManager;
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

/// The budget of one API key.
#[derive(Clone)]
pub struct Limiter {
    redis: ConnectionManager,
    keys: [String; 4],
    limit: u32,
    window_us: u64,
    unauthorized_hold: Duration,
    reset_hold_ms: u64,
    acquire: Script,
    pause: Script,
    initialize: Script,
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
    pub fn new(redis: ConnectionManager, s: &LimiterSettings) -> Self {
        let base = format!("{}:{}", s.prefix, s.key_id);
        Limiter {
            redis,
            keys: [
                format!("{base}:reads"),
                format!("{base}:paused"),
                format!("{base}:unauthorized"),
                format!("{base}:epoch"),
            ],
            limit: s.limit,
            window_us: u64::try_from(s.window.as_micros()).unwrap_or(u64::MAX),
            unauthorized_hold: s.unauthorized_hold,
            reset_hold_ms: u64::try_from(s.reset_hold.as_millis()).unwrap_or(u64::MAX),
            acquire: Script::new(ACQUIRE),
            pause: Script::new(PAUSE),
            initialize: Script::new(INITIALIZE),
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
    pub fn name(&self) -> &str {
        self.keys[0].trim_end_matches(":reads")
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
        let (now_s, now_us): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now = now_s * 1_000_000 + now_us;
        let min = now - i64::try_from(self.window_us).unwrap_or(i64::MAX);
        redis::cmd("ZCOUNT")
            .arg(&self.keys[0])
            .arg(format!("({min}"))
            .arg("+inf")
            .query_async(&mut conn)
            .await
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }
}
