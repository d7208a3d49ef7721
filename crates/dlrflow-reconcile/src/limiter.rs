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

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

/// Grant, or wait, or stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// One read may be made now. `left` reads remain in the current window;
    /// `at_us` is the grant's Redis time (microseconds since the epoch).
    Granted { left: u32, at_us: i64 },
    /// The budget is spent (or a 429 pause is on): ask again after `wait`.
    Wait { wait: Duration, paused: bool },
    /// The key was refused with a 401; no reads until an operator acts.
    Unauthorized { reason: String },
}

const ACQUIRE: &str = r#"
local reason = redis.call('GET', KEYS[3])
if reason then
  return {-1, 0, reason}
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

/// The budget of one API key.
#[derive(Clone)]
pub struct Limiter {
    redis: ConnectionManager,
    keys: [String; 3],
    limit: u32,
    window_us: u64,
    unauthorized_hold: Duration,
    acquire: Script,
    pause: Script,
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
            ],
            limit: s.limit,
            window_us: u64::try_from(s.window.as_micros()).unwrap_or(u64::MAX),
            unauthorized_hold: s.unauthorized_hold,
            acquire: Script::new(ACQUIRE),
            pause: Script::new(PAUSE),
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
                paused: text == "paused",
            },
            _ => Acquire::Unauthorized { reason: text },
        })
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
