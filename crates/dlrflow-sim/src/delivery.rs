//! The gateway's webhook delivery machinery, shared by both providers: HTTP
//! POST with the documented retry rules, a reorder (shuffle) stage, the event
//! scheduler, counters and the live progress line.
//!
//! Retry reading of the Lisoloo overview ("up to 4 attempts on 5xx responses
//! or connection failures, with exponential backoff 30s → 2m → 10m → 1h.
//! After 4 failures the event is dropped"): the four backoff delays are four
//! *retry* attempts, each preceded by its delay, after the initial attempt —
//! 1 + 4 = 5 requests at most, at t = 0, 30 s, 2 m 30 s, 12 m 30 s, 1 h 12 m 30 s.
//! A schedule with an unused 1 h step would make no sense, and DESIGN.md pairs
//! "4 failed attempts" with the four delays. The schedule is configurable
//! (`retry_schedule`), so the other reading (3 delays) is one flag away.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::truth::WebhookFate;

/// The documented retry delays: 30 s, 2 m, 10 m, 1 h.
pub const DEFAULT_RETRY_SCHEDULE: [Duration; 4] = [
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
    Duration::from_secs(3600),
];

/// How long a reorder buffer holds events when no new event arrives.
const REORDER_HOLD: Duration = Duration::from_millis(100);

/// Settings shared by both senders.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Base URL of the receiver, e.g. `http://127.0.0.1:8080`.
    pub target: String,
    /// Source name used in the URL path (`{target}/{source}/webhook`).
    pub source: String,
    /// Overrides the URL. Placeholders: `{target}`, `{source}`, `{status}`
    /// (Arpoone: delivered|pending|not_delivered), `{token}`.
    pub url_template: Option<String>,
    /// HTTP Basic credentials; none means no `Authorization` header.
    pub basic_auth: Option<(String, String)>,
    /// Maximum HTTP requests in flight.
    pub concurrency: usize,
    /// An answer slower than this is a timeout (retried). Not scaled.
    pub request_timeout: Duration,
    /// Delays before each retry, unscaled (the default is the documented one).
    pub retry_schedule: Vec<Duration>,
    /// Multiplies every simulated delay: lifecycle transitions, retry delays
    /// and Arpoone batch linger. 0.01 turns 30 s into 0.3 s.
    pub time_scale: f64,
    /// Reorder buffer size: an event is sent once this many are waiting, a
    /// random one first. 1 = no extra reordering (concurrency still reorders).
    pub reorder_window: usize,
    /// Share of events sent twice (same bytes, same event id).
    pub duplicate_rate: f64,
    /// Share of terminal events the gateway never sends at all.
    pub withhold_terminal_rate: f64,
    /// Print a progress line to stderr this often; `None` = silent.
    pub progress_interval: Option<Duration>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            target: "http://127.0.0.1:8080".to_owned(),
            source: "lisoloo".to_owned(),
            url_template: None,
            basic_auth: None,
            concurrency: 32,
            request_timeout: Duration::from_secs(5),
            retry_schedule: DEFAULT_RETRY_SCHEDULE.to_vec(),
            time_scale: 1.0,
            reorder_window: 16,
            duplicate_rate: 0.02,
            withhold_terminal_rate: 0.0,
            progress_interval: None,
        }
    }
}

impl DeliveryConfig {
    pub(crate) fn scaled(&self, d: Duration) -> Duration {
        scale(d, self.time_scale)
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.concurrency > 0, "concurrency must be at least 1");
        anyhow::ensure!(
            self.time_scale.is_finite() && self.time_scale >= 0.0,
            "time_scale must be a finite number >= 0"
        );
        for (name, rate) in [
            ("duplicate_rate", self.duplicate_rate),
            ("withhold_terminal_rate", self.withhold_terminal_rate),
        ] {
            anyhow::ensure!((0.0..=1.0).contains(&rate), "{name} must be within 0..=1");
        }
        anyhow::ensure!(
            self.target.starts_with("http://") || self.target.starts_with("https://"),
            "target must be an http(s) URL, got {:?}",
            self.target
        );
        Ok(())
    }

    /// Expands the URL template (or `default_template`).
    pub(crate) fn url(&self, default_template: &str, status: &str, token: &str) -> String {
        let template = self.url_template.as_deref().unwrap_or(default_template);
        template
            .replace("{target}", self.target.trim_end_matches('/'))
            .replace("{source}", &self.source)
            .replace("{status}", status)
            .replace("{token}", token)
    }
}

pub(crate) fn scale(d: Duration, factor: f64) -> Duration {
    Duration::from_secs_f64((d.as_secs_f64() * factor).max(0.0))
}

/// When the receiver's answer counts as an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckRule {
    /// Lisoloo: any 2xx.
    Any2xx,
    /// Arpoone: exactly 200 ("otherwise, the webhook will be retried").
    Only200,
}

/// Counters for one label (an event type or an Arpoone record status).
/// All counts are in items (events or records), not requests.
#[derive(Debug, Default)]
pub(crate) struct LabelCounters {
    sent: AtomicU64,
    attempts: AtomicU64,
    acked: AtomicU64,
    retries: AtomicU64,
    dropped_4xx: AtomicU64,
    dropped_exhausted: AtomicU64,
    duplicates: AtomicU64,
    withheld: AtomicU64,
    cancelled: AtomicU64,
}

/// Per-label report: see `SimReport`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TypeReport {
    /// Deliveries started (duplicate copies included).
    pub sent: u64,
    /// HTTP attempts carrying these items (first tries + retries).
    pub attempts: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Retry attempts made.
    pub retries: u64,
    /// Deliveries dropped because the receiver answered 4xx.
    pub dropped_4xx: u64,
    /// Deliveries dropped after the last retry failed.
    pub dropped_exhausted: u64,
    /// Of `sent`, how many were duplicate copies.
    pub duplicates: u64,
    /// Terminal events never sent (the gateway gave up).
    pub withheld: u64,
    /// Deliveries abandoned because the run was cancelled.
    pub cancelled: u64,
}

impl TypeReport {
    fn add(&mut self, o: &TypeReport) {
        self.sent += o.sent;
        self.attempts += o.attempts;
        self.acked += o.acked;
        self.retries += o.retries;
        self.dropped_4xx += o.dropped_4xx;
        self.dropped_exhausted += o.dropped_exhausted;
        self.duplicates += o.duplicates;
        self.withheld += o.withheld;
        self.cancelled += o.cancelled;
    }
}

/// All counters of one run.
#[derive(Debug)]
pub(crate) struct Stats {
    labels: Vec<(&'static str, LabelCounters)>,
    pub(crate) requests: AtomicU64,
    pub(crate) retries_pending: AtomicI64,
    pub(crate) in_flight: AtomicI64,
    pub(crate) due: AtomicU64,
    pub(crate) total: u64,
}

impl Stats {
    pub(crate) fn new(labels: &[&'static str], total: u64) -> Self {
        Self {
            labels: labels
                .iter()
                .map(|l| (*l, LabelCounters::default()))
                .collect(),
            requests: AtomicU64::new(0),
            retries_pending: AtomicI64::new(0),
            in_flight: AtomicI64::new(0),
            due: AtomicU64::new(0),
            total,
        }
    }

    pub(crate) fn label(&self, idx: usize) -> &LabelCounters {
        &self.labels[idx].1
    }

    fn for_items(&self, items: &[(usize, u64)], f: impl Fn(&LabelCounters) -> &AtomicU64) {
        for (idx, n) in items {
            f(self.label(*idx)).fetch_add(*n, Ordering::Relaxed);
        }
    }

    pub(crate) fn withheld(&self, label: usize) {
        self.label(label).withheld.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> (std::collections::BTreeMap<String, TypeReport>, TypeReport) {
        let mut by = std::collections::BTreeMap::new();
        let mut total = TypeReport::default();
        for (name, c) in &self.labels {
            let r = TypeReport {
                sent: c.sent.load(Ordering::Relaxed),
                attempts: c.attempts.load(Ordering::Relaxed),
                acked: c.acked.load(Ordering::Relaxed),
                retries: c.retries.load(Ordering::Relaxed),
                dropped_4xx: c.dropped_4xx.load(Ordering::Relaxed),
                dropped_exhausted: c.dropped_exhausted.load(Ordering::Relaxed),
                duplicates: c.duplicates.load(Ordering::Relaxed),
                withheld: c.withheld.load(Ordering::Relaxed),
                cancelled: c.cancelled.load(Ordering::Relaxed),
            };
            total.add(&r);
            by.insert((*name).to_owned(), r);
        }
        (by, total)
    }
}

/// One delivery: a body to POST to a URL, carrying some labelled items.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub url: String,
    pub body: Bytes,
    /// (label index, item count).
    pub items: Vec<(usize, u64)>,
    pub duplicate: bool,
}

/// What the receiver's answer means.
enum Answer {
    Ack,
    Drop,
    Retry,
}

/// Posts deliveries with the gateway's retry rules.
#[derive(Clone)]
pub(crate) struct Poster {
    client: reqwest::Client,
    basic_auth: Option<(String, String)>,
    ack: AckRule,
    retry_delays: Arc<Vec<Duration>>,
    pub(crate) semaphore: Arc<Semaphore>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
}

impl Poster {
    pub(crate) fn new(
        cfg: &DeliveryConfig,
        ack: AckRule,
        stats: Arc<Stats>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.request_timeout)
            .pool_max_idle_per_host(cfg.concurrency)
            .build()?;
        Ok(Self {
            client,
            basic_auth: cfg.basic_auth.clone(),
            ack,
            retry_delays: Arc::new(cfg.retry_schedule.iter().map(|d| cfg.scaled(*d)).collect()),
            semaphore: Arc::new(Semaphore::new(cfg.concurrency)),
            stats,
            cancel,
        })
    }

    async fn attempt(&self, d: &Delivery) -> Answer {
        let mut req = self
            .client
            .post(&d.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(d.body.clone());
        if let Some((user, pass)) = &self.basic_auth {
            req = req.basic_auth(user, Some(pass));
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.for_items(&d.items, |c| &c.attempts);
        match req.send().await {
            Ok(resp) => {
                let code = resp.status().as_u16();
                tracing::debug!(url = %d.url, code, "webhook answered");
                match (self.ack, code) {
                    (AckRule::Any2xx, 200..=299) | (AckRule::Only200, 200) => Answer::Ack,
                    (_, 400..=499) => Answer::Drop,
                    _ => Answer::Retry,
                }
            }
            Err(err) => {
                tracing::debug!(url = %d.url, error = %err, "webhook attempt failed");
                Answer::Retry
            }
        }
    }

    /// Delivers until acknowledged, dropped or out of retries. The first
    /// attempt uses `permit`; each retry waits for a new one.
    pub(crate) async fn deliver(&self, d: Delivery, permit: OwnedSemaphorePermit) -> WebhookFate {
        self.stats.for_items(&d.items, |c| &c.sent);
        if d.duplicate {
            self.stats.for_items(&d.items, |c| &c.duplicates);
        }
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let fate = self.deliver_inner(&d, permit).await;
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        match fate {
            WebhookFate::Acked => self.stats.for_items(&d.items, |c| &c.acked),
            WebhookFate::Dropped4xx => self.stats.for_items(&d.items, |c| &c.dropped_4xx),
            WebhookFate::Exhausted => self.stats.for_items(&d.items, |c| &c.dropped_exhausted),
            WebhookFate::NotSent | WebhookFate::Withheld => {
                self.stats.for_items(&d.items, |c| &c.cancelled)
            }
        }
        fate
    }

    async fn deliver_inner(&self, d: &Delivery, permit: OwnedSemaphorePermit) -> WebhookFate {
        let mut permit = Some(permit);
        let mut retry = 0usize;
        loop {
            let p = match permit.take() {
                Some(p) => p,
                None => tokio::select! {
                    _ = self.cancel.cancelled() => return WebhookFate::NotSent,
                    p = self.semaphore.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return WebhookFate::NotSent,
                    },
                },
            };
            let answer = self.attempt(d).await;
            drop(p);
            match answer {
                Answer::Ack => return WebhookFate::Acked,
                Answer::Drop => return WebhookFate::Dropped4xx,
                Answer::Retry => {}
            }
            let Some(delay) = self.retry_delays.get(retry).copied() else {
                return WebhookFate::Exhausted;
            };
            retry += 1;
            self.stats.retries_pending.fetch_add(1, Ordering::Relaxed);
            let cancelled = tokio::select! {
                _ = self.cancel.cancelled() => true,
                _ = tokio::time::sleep(delay) => false,
            };
            self.stats.retries_pending.fetch_sub(1, Ordering::Relaxed);
            if cancelled {
                return WebhookFate::NotSent;
            }
            self.stats.for_items(&d.items, |c| &c.retries);
        }
    }
}

/// Emits `items` (sorted by due offset) at `start + due`, calling `on_due`
/// first (the gateway's state advances whether or not a webhook follows).
/// Items for which `on_due` returns `None` are not forwarded.
pub(crate) async fn schedule<T, U>(
    items: Vec<(Duration, T)>,
    start: Instant,
    tx: mpsc::Sender<U>,
    mut on_due: impl FnMut(T) -> Vec<U>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) {
    for (due, item) in items {
        let at = start + due;
        if Instant::now() < at {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(at) => {}
            }
        } else if cancel.is_cancelled() {
            return;
        }
        stats.due.fetch_add(1, Ordering::Relaxed);
        for out in on_due(item) {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = tx.send(out) => if r.is_err() { return },
            }
        }
    }
}

/// Reorders a stream: holds up to `window - 1` items and releases a random one
/// whenever the buffer is full; releases everything (in random order) when no
/// item arrived for a short while or the input ended.
pub(crate) async fn shuffle<T>(
    mut rx: mpsc::Receiver<T>,
    tx: mpsc::Sender<T>,
    window: usize,
    mut rng: StdRng,
) {
    let window = window.max(1);
    let mut buf: Vec<T> = Vec::with_capacity(window);
    loop {
        let next = if buf.is_empty() {
            rx.recv().await
        } else {
            match tokio::time::timeout(REORDER_HOLD, rx.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    while !buf.is_empty() {
                        let i = rng.gen_range(0..buf.len());
                        if tx.send(buf.swap_remove(i)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
            }
        };
        let Some(item) = next else { break };
        buf.push(item);
        while buf.len() >= window {
            let i = rng.gen_range(0..buf.len());
            if tx.send(buf.swap_remove(i)).await.is_err() {
                return;
            }
        }
    }
    while !buf.is_empty() {
        let i = rng.gen_range(0..buf.len());
        if tx.send(buf.swap_remove(i)).await.is_err() {
            return;
        }
    }
}

/// Records the best fate of an event across its copies.
pub(crate) fn record_fate(slot: &AtomicU8, fate: WebhookFate) {
    slot.fetch_max(fate.as_u8(), Ordering::Relaxed);
}

/// Prints a progress line every `interval` until `done` is cancelled.
pub(crate) fn spawn_progress(
    name: &'static str,
    interval: Duration,
    stats: Arc<Stats>,
    done: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut last_sent = 0u64;
        let mut last_at = start;
        let mut tick = tokio::time::interval_at(start + interval, interval);
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (_, t) = stats.snapshot();
            let now = Instant::now();
            let dt = now.duration_since(last_at).as_secs_f64().max(1e-9);
            let rate = (t.sent - last_sent) as f64 / dt;
            last_sent = t.sent;
            last_at = now;
            eprintln!(
                "[{name} {:>7.1}s] due {}/{} sent {} ({:.1}/s) acked {} in-flight {} retries-pending {} dropped {} (4xx {}, exhausted {}) withheld {} requests {}",
                now.duration_since(start).as_secs_f64(),
                stats.due.load(Ordering::Relaxed),
                stats.total,
                t.sent,
                rate,
                t.acked,
                stats.in_flight.load(Ordering::Relaxed),
                stats.retries_pending.load(Ordering::Relaxed),
                t.dropped_4xx + t.dropped_exhausted,
                t.dropped_4xx,
                t.dropped_exhausted,
                t.withheld,
                stats.requests.load(Ordering::Relaxed),
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn url_templates_expand() {
        let cfg = DeliveryConfig {
            target: "http://127.0.0.1:8080/".to_owned(),
            source: "arpoone".to_owned(),
            ..DeliveryConfig::default()
        };
        assert_eq!(
            cfg.url("{target}/{source}/webhook/{status}", "not_delivered", ""),
            "http://127.0.0.1:8080/arpoone/webhook/not_delivered"
        );
        let cfg = DeliveryConfig {
            url_template: Some("{target}/hooks/{token}/{status}".to_owned()),
            ..cfg
        };
        assert_eq!(
            cfg.url("ignored", "pending", "t0k"),
            "http://127.0.0.1:8080/hooks/t0k/pending"
        );
    }

    #[test]
    fn time_scale_shrinks_the_documented_schedule() {
        let scaled: Vec<Duration> = DEFAULT_RETRY_SCHEDULE
            .iter()
            .map(|d| scale(*d, 0.01))
            .collect();
        let ms: Vec<u128> = scaled.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![300, 1200, 6000, 36000]);
    }

    #[tokio::test]
    async fn shuffle_reorders_but_loses_nothing() {
        let (in_tx, in_rx) = mpsc::channel(1000);
        let (out_tx, mut out_rx) = mpsc::channel(1000);
        let task = tokio::spawn(shuffle(in_rx, out_tx, 16, StdRng::seed_from_u64(1)));
        for i in 0..200u32 {
            in_tx.send(i).await.unwrap();
        }
        drop(in_tx);
        let mut got = Vec::new();
        while let Some(i) = out_rx.recv().await {
            got.push(i);
        }
        task.await.unwrap();
        assert_ne!(got, (0..200).collect::<Vec<_>>(), "order changed");
        got.sort_unstable();
        assert_eq!(got, (0..200).collect::<Vec<_>>(), "nothing lost or doubled");
    }
}
