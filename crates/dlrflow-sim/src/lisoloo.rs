//! The Lisoloo gateway: plans sends (N messages × K recipients), walks each
//! recipient through pending → processing → sent → delivered | failed, and
//! POSTs one JSON event per transition (plus one `sms.queued` per message) as
//! the Lisoloo webhook documents describe.

use std::sync::atomic::AtomicU8;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::delivery::{self, AckRule, Delivery, DeliveryConfig, Poster, Stats};
use crate::report::SimReport;
use crate::status::{Gateway, RecipientStatus, StatusRecipient};
use crate::truth::{FinalStatus, Provider, Truth, TruthRecipient, WebhookFate};

/// Settings of a Lisoloo run.
#[derive(Debug, Clone)]
pub struct LisolooConfig {
    pub delivery: DeliveryConfig,
    /// Messages to send (each a `POST /send` to the gateway).
    pub messages: usize,
    /// Recipients per message.
    pub recipients: usize,
    /// Messages started per second (unscaled); 0 = all at once.
    pub send_rate: f64,
    /// Share of recipients that end `failed` (when `carriers` is empty).
    pub failure_rate: f64,
    /// The carrier mix; empty: the four default carriers, equally likely,
    /// all failing at `failure_rate` with any code of [`ERRORS`].
    pub carriers: Vec<CarrierProfile>,
    pub seed: u64,
}

/// One carrier of a mix: how often recipients are on it, how often they
/// fail there and with which codes.
#[derive(Debug, Clone, PartialEq)]
pub struct CarrierProfile {
    pub name: String,
    /// Relative weight of the carrier in the mix (> 0).
    pub weight: u32,
    /// Share of its recipients that end `failed`.
    pub failure_rate: f64,
    /// The codes of [`ERRORS`] its failures draw from (equally likely);
    /// empty: all of them.
    pub error_codes: Vec<String>,
}

impl std::str::FromStr for CarrierProfile {
    type Err = String;

    /// `NAME:WEIGHT:FAILURE_RATE[:CODE,CODE…]`, e.g. `vodacom_drc:5:0.1:1502,1503`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (name, weight, rate, codes) = match parts.as_slice() {
            [n, w, r] => (*n, *w, *r, ""),
            [n, w, r, c] => (*n, *w, *r, *c),
            _ => return Err(format!("`{s}`: expected NAME:WEIGHT:FAILURE_RATE[:CODES]")),
        };
        let p = CarrierProfile {
            name: name.to_owned(),
            weight: weight.parse().map_err(|e| format!("`{s}`: weight: {e}"))?,
            failure_rate: rate
                .parse()
                .map_err(|e| format!("`{s}`: failure rate: {e}"))?,
            error_codes: codes
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        p.check()?;
        Ok(p)
    }
}

impl CarrierProfile {
    fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.weight == 0 {
            return Err(format!("carrier `{}`: a name and a weight > 0", self.name));
        }
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(format!(
                "carrier `{}`: failure rate within 0..=1",
                self.name
            ));
        }
        if let Some(c) = self
            .error_codes
            .iter()
            .find(|c| !ERRORS.iter().any(|e| e.0 == c.as_str()))
        {
            return Err(format!("carrier `{}`: unknown error code {c}", self.name));
        }
        Ok(())
    }

    /// The indexes into [`ERRORS`] its failures draw from.
    fn errors(&self) -> Vec<usize> {
        (0..ERRORS.len())
            .filter(|&i| {
                self.error_codes.is_empty() || self.error_codes.iter().any(|c| c == ERRORS[i].0)
            })
            .collect()
    }
}

impl Default for LisolooConfig {
    fn default() -> Self {
        Self {
            delivery: DeliveryConfig::default(),
            messages: 100,
            recipients: 3,
            send_rate: 50.0,
            failure_rate: 0.1,
            carriers: Vec::new(),
            seed: 0,
        }
    }
}

/// The five Lisoloo event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Queued,
    Processing,
    Sent,
    Delivered,
    Failed,
}

impl EventType {
    pub const ALL: [EventType; 5] = [
        EventType::Queued,
        EventType::Processing,
        EventType::Sent,
        EventType::Delivered,
        EventType::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Queued => "sms.queued",
            EventType::Processing => "sms.processing",
            EventType::Sent => "sms.sent",
            EventType::Delivered => "sms.delivered",
            EventType::Failed => "sms.failed",
        }
    }

    fn label(self) -> usize {
        self as usize
    }

    fn is_terminal(self) -> bool {
        matches!(self, EventType::Delivered | EventType::Failed)
    }
}

const LABELS: [&str; 5] = [
    "sms.queued",
    "sms.processing",
    "sms.sent",
    "sms.delivered",
    "sms.failed",
];

/// The carrier error catalogue the simulator draws failures from:
/// (code, message, retryable, fails before `sent`).
pub const ERRORS: [(&str, &str, bool, bool); 6] = [
    ("1502", "Number unreachable", false, false),
    ("1501", "Invalid number", false, true),
    ("1503", "Absent subscriber", true, false),
    ("1504", "Handset memory full", true, false),
    ("1505", "Blocked by carrier", false, true),
    ("1510", "Carrier timeout", true, false),
];

const CARRIERS: [(&str, &str); 4] = [
    ("vodacom_drc", "81"),
    ("airtel_drc", "99"),
    ("orange_drc", "89"),
    ("africell_drc", "90"),
];

#[derive(Debug, Clone)]
struct PlanRecipient {
    phone: String,
    carrier: String,
    sent: Option<Duration>,
    terminal: Duration,
    /// `None` = delivered, `Some(i)` = failed with `ERRORS[i]`.
    error: Option<usize>,
}

#[derive(Debug, Clone)]
struct PlanMessage {
    id: String,
    queued: Duration,
    segments: u32,
    recipients: Vec<PlanRecipient>,
}

#[derive(Debug, Clone)]
struct PlanEvent {
    due: Duration,
    kind: EventType,
    message: usize,
    recipient: usize,
    event_id: Uuid,
    duplicate: bool,
    withheld: bool,
}

/// A fully planned run: deterministic for a given config (seed) and base time.
#[derive(Debug, Clone)]
pub struct LisolooPlan {
    base: DateTime<Utc>,
    source: String,
    seed: u64,
    messages: Vec<PlanMessage>,
    events: Vec<PlanEvent>,
}

pub(crate) fn uuid_v4(rng: &mut StdRng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.gen()).into_uuid()
}

fn object_id(rng: &mut StdRng, base: DateTime<Utc>) -> String {
    // Mongo ObjectId: 4-byte seconds, 5 random bytes, 3-byte counter.
    let secs = base.timestamp() as u32;
    let rand: [u8; 8] = rng.gen();
    let mut s = format!("{secs:08x}");
    for b in rand {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn ms(d: f64) -> Duration {
    Duration::from_secs_f64(d / 1000.0)
}

/// Truncates to milliseconds (the wire precision).
pub(crate) fn at(base: DateTime<Utc>, offset: Duration) -> DateTime<Utc> {
    base + chrono::Duration::milliseconds(offset.as_millis() as i64)
}

pub(crate) fn fmt_ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl LisolooPlan {
    /// Plans a run starting at `base` (truncated to milliseconds).
    pub fn new(cfg: &LisolooConfig, base: DateTime<Utc>) -> Self {
        let base = at(
            DateTime::from_timestamp_millis(base.timestamp_millis()).unwrap_or(base),
            Duration::ZERO,
        );
        let d = &cfg.delivery;
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mix: Vec<(&CarrierProfile, Vec<usize>)> =
            cfg.carriers.iter().map(|c| (c, c.errors())).collect();
        let total_weight: u32 = mix.iter().map(|c| c.0.weight).sum::<u32>().max(1);
        let mut messages = Vec::with_capacity(cfg.messages);
        let mut events = Vec::new();
        for m in 0..cfg.messages {
            let queued = if cfg.send_rate > 0.0 {
                Duration::from_secs_f64(m as f64 / cfg.send_rate)
            } else {
                Duration::ZERO
            };
            let segments = *[1, 1, 1, 1, 1, 1, 2, 2, 3]
                .get(rng.gen_range(0..9))
                .unwrap_or(&1);
            let id = object_id(&mut rng, base);
            let mut recipients = Vec::with_capacity(cfg.recipients);
            events.push(PlanEvent {
                due: queued,
                kind: EventType::Queued,
                message: m,
                recipient: 0,
                event_id: uuid_v4(&mut rng),
                duplicate: rng.gen_bool(d.duplicate_rate),
                withheld: false,
            });
            for r in 0..cfg.recipients {
                let (carrier, phone, error) = if mix.is_empty() {
                    // The original draws, so a run without a mix is unchanged.
                    let (carrier, prefix) = CARRIERS[rng.gen_range(0..CARRIERS.len())];
                    let phone = format!("+243{prefix}{:07}", rng.gen_range(0..10_000_000u32));
                    (carrier.to_owned(), phone, None)
                } else {
                    let mut w = rng.gen_range(0..total_weight);
                    let (ci, c) = mix
                        .iter()
                        .enumerate()
                        .find(|(_, (c, _))| {
                            let hit = w < c.weight;
                            w = w.saturating_sub(c.weight);
                            hit
                        })
                        .unwrap_or((0, &mix[0]));
                    let phone =
                        format!("+243{}{:07}", 60 + ci % 40, rng.gen_range(0..10_000_000u32));
                    let error = rng
                        .gen_bool(c.0.failure_rate)
                        .then(|| c.1[rng.gen_range(0..c.1.len())]);
                    (c.0.name.clone(), phone, Some(error))
                };
                let processing = queued + d.scaled(ms(rng.gen_range(300.0..3000.0)));
                let error = match error {
                    Some(e) => e,
                    None => rng
                        .gen_bool(cfg.failure_rate)
                        .then(|| rng.gen_range(0..ERRORS.len())),
                };
                let before_sent = error.is_some_and(|e| ERRORS[e].3);
                let sent =
                    (!before_sent).then(|| processing + d.scaled(ms(rng.gen_range(500.0..5000.0))));
                let terminal = sent.unwrap_or(processing)
                    + d.scaled(ms(if error.is_some() {
                        rng.gen_range(1000.0..30_000.0)
                    } else {
                        rng.gen_range(1500.0..20_000.0)
                    }));
                let mut push = |rng: &mut StdRng, due, kind: EventType| {
                    let withheld = kind.is_terminal() && rng.gen_bool(d.withhold_terminal_rate);
                    events.push(PlanEvent {
                        due,
                        kind,
                        message: m,
                        recipient: r,
                        event_id: uuid_v4(rng),
                        duplicate: rng.gen_bool(d.duplicate_rate),
                        withheld,
                    });
                };
                push(&mut rng, processing, EventType::Processing);
                if let Some(s) = sent {
                    push(&mut rng, s, EventType::Sent);
                }
                let kind = if error.is_some() {
                    EventType::Failed
                } else {
                    EventType::Delivered
                };
                push(&mut rng, terminal, kind);
                recipients.push(PlanRecipient {
                    phone,
                    carrier,
                    sent,
                    terminal,
                    error,
                });
            }
            messages.push(PlanMessage {
                id,
                queued,
                segments,
                recipients,
            });
        }
        // Stable sort: equal due times keep the causal order of the plan.
        events.sort_by_key(|e| e.due);
        Self {
            base,
            source: d.source.clone(),
            seed: cfg.seed,
            messages,
            events,
        }
    }

    /// Number of webhook events planned (withheld ones included, duplicates not).
    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    /// Message ids in plan order.
    pub fn message_ids(&self) -> Vec<String> {
        self.messages.iter().map(|m| m.id.clone()).collect()
    }

    /// The JSON body of planned event `i` (exact bytes the gateway sends).
    fn body(&self, i: usize) -> Bytes {
        let e = &self.events[i];
        let m = &self.messages[e.message];
        let ts = fmt_ts(at(self.base, e.due));
        let data = match e.kind {
            EventType::Queued => {
                let total_messages = m.recipients.len() as u64 * u64::from(m.segments);
                let cost = (total_messages as f64 * 0.02 * 100.0).round() / 100.0;
                json!({
                    "total_recipients": m.recipients.len(),
                    "total_messages": total_messages,
                    "total_cost": cost,
                    "currency": "USD",
                    "scheduled_at": null,
                })
            }
            kind => {
                let r = &m.recipients[e.recipient];
                match kind {
                    EventType::Processing => json!({
                        "recipient_phone": r.phone,
                        "carrier": r.carrier,
                    }),
                    EventType::Sent => json!({
                        "recipient_phone": r.phone,
                        "carrier": r.carrier,
                        "sent_at": ts,
                    }),
                    EventType::Delivered => json!({
                        "recipient_phone": r.phone,
                        "carrier": r.carrier,
                        "delivered_at": ts,
                        "segments": m.segments,
                    }),
                    _ => {
                        let (code, msg, retryable, _) = ERRORS[r.error.unwrap_or(0)];
                        json!({
                            "recipient_phone": r.phone,
                            "carrier": r.carrier,
                            "failed_at": ts,
                            "error_code": code,
                            "error_message": msg,
                            "retryable": retryable,
                        })
                    }
                }
            }
        };
        let body = json!({
            "event_id": e.event_id.to_string(),
            "event_type": e.kind.as_str(),
            "timestamp": ts,
            "message_id": m.id,
            "data": data,
        });
        Bytes::from(serde_json::to_vec(&body).expect("JSON values serialize"))
    }

    /// Applies planned event `i` to the gateway's state.
    fn apply(&self, gateway: &Gateway, i: usize) {
        let e = &self.events[i];
        let m = &self.messages[e.message];
        let t = at(self.base, e.due);
        if e.kind == EventType::Queued {
            gateway.insert(
                &m.id,
                m.recipients
                    .iter()
                    .map(|r| StatusRecipient::pending(&r.phone))
                    .collect(),
            );
            return;
        }
        let r = &m.recipients[e.recipient];
        let segments = m.segments;
        gateway.update(&m.id, e.recipient, |s| {
            s.carrier = Some(r.carrier.clone());
            s.segments = Some(segments);
            // The gateway's own machine only moves forward.
            match e.kind {
                EventType::Processing => s.status = s.status.max(RecipientStatus::Processing),
                EventType::Sent => {
                    s.status = s.status.max(RecipientStatus::Sent);
                    s.sent_at = Some(t);
                }
                EventType::Delivered => {
                    s.status = RecipientStatus::Delivered;
                    s.delivered_at = Some(t);
                }
                EventType::Failed => {
                    let (code, msg, retryable, _) = ERRORS[r.error.unwrap_or(0)];
                    s.status = RecipientStatus::Failed;
                    s.failed_at = Some(t);
                    s.error_code = Some(code.to_owned());
                    s.error_message = Some(msg.to_owned());
                    s.retryable = Some(retryable);
                }
                EventType::Queued => {}
            }
        });
    }

    /// The ground truth; `fates[i]` is the fate of planned event `i`.
    fn truth_with(&self, fates: Option<&[AtomicU8]>) -> Truth {
        let mut terminal_fate = vec![vec![WebhookFate::NotSent; 0]; self.messages.len()];
        for (mi, m) in self.messages.iter().enumerate() {
            terminal_fate[mi] = vec![WebhookFate::NotSent; m.recipients.len()];
        }
        for (i, e) in self.events.iter().enumerate() {
            if e.kind.is_terminal() {
                terminal_fate[e.message][e.recipient] = match fates {
                    Some(f) => {
                        WebhookFate::from_u8(f[i].load(std::sync::atomic::Ordering::Relaxed))
                    }
                    None if e.withheld => WebhookFate::Withheld,
                    None => WebhookFate::NotSent,
                };
            }
        }
        let mut recipients = Vec::new();
        for (mi, m) in self.messages.iter().enumerate() {
            for (ri, r) in m.recipients.iter().enumerate() {
                let end = at(self.base, r.terminal);
                let err = r.error.map(|e| ERRORS[e]);
                recipients.push(TruthRecipient {
                    provider: Provider::Lisoloo,
                    source: self.source.clone(),
                    message_id: m.id.clone(),
                    recipient: r.phone.clone(),
                    status: if err.is_some() {
                        FinalStatus::Failed
                    } else {
                        FinalStatus::Delivered
                    },
                    sent_at: r.sent.map(|s| at(self.base, s)),
                    delivered_at: err.is_none().then_some(end),
                    failed_at: err.is_some().then_some(end),
                    error_code: err.map(|e| e.0.to_owned()),
                    error_message: err.map(|e| e.1.to_owned()),
                    carrier: Some(r.carrier.clone()),
                    segments: m.segments,
                    queued_at: Some(at(self.base, m.queued)),
                    terminal_webhook: terminal_fate[mi][ri],
                });
            }
        }
        Truth {
            provider: Provider::Lisoloo,
            source: self.source.clone(),
            seed: self.seed,
            generated_at: self.base,
            recipients,
        }
    }

    /// The ground truth as planned (terminal webhook fates not yet known).
    pub fn truth(&self) -> Truth {
        self.truth_with(None)
    }
}

/// An event handed from the scheduler to the dispatcher.
#[derive(Debug, Clone, Copy)]
struct Due {
    index: usize,
    copy: bool,
}

/// Plans and runs a Lisoloo send against `cfg.delivery.target`, advancing
/// `gateway` as transitions fall due. Returns when every event is settled
/// (acknowledged or dropped) or `cancel` fires.
pub async fn run_lisoloo(
    cfg: &LisolooConfig,
    gateway: &Gateway,
    cancel: CancellationToken,
) -> anyhow::Result<SimReport> {
    let plan = LisolooPlan::new(cfg, Utc::now());
    run_lisoloo_plan(cfg, plan, gateway, cancel).await
}

/// Runs an already made plan (see `LisolooPlan::new`); its base time should be
/// about now, as event timestamps are the base plus each event's offset.
pub async fn run_lisoloo_plan(
    cfg: &LisolooConfig,
    plan: LisolooPlan,
    gateway: &Gateway,
    cancel: CancellationToken,
) -> anyhow::Result<SimReport> {
    cfg.delivery.validate()?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&cfg.failure_rate),
        "failure_rate must be within 0..=1"
    );
    for c in &cfg.carriers {
        c.check().map_err(anyhow::Error::msg)?;
    }
    let started = Instant::now();
    // Align the monotonic clock with the plan's wall-clock base.
    let lag = (Utc::now() - plan.base).to_std().unwrap_or(Duration::ZERO);
    let start = started.checked_sub(lag).unwrap_or(started);

    let plan = Arc::new(plan);
    let stats = Arc::new(Stats::new(&LABELS, plan.events.len() as u64));
    let fates: Arc<Vec<AtomicU8>> =
        Arc::new((0..plan.events.len()).map(|_| AtomicU8::new(0)).collect());
    let poster = Poster::new(
        &cfg.delivery,
        AckRule::Any2xx,
        stats.clone(),
        cancel.clone(),
    )?;
    let url = cfg.delivery.url("{target}/{source}/webhook", "", "");

    let done = CancellationToken::new();
    let progress = cfg
        .delivery
        .progress_interval
        .map(|i| delivery::spawn_progress("lisoloo", i, stats.clone(), done.clone()));

    let (due_tx, due_rx) = mpsc::channel::<Due>(65_536);
    let (out_tx, mut out_rx) = mpsc::channel::<Due>(1024);
    let items: Vec<(Duration, usize)> = plan
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.due, i))
        .collect();
    let scheduler = {
        let plan = plan.clone();
        let gateway = gateway.clone();
        let stats = stats.clone();
        let fates = fates.clone();
        let cancel = cancel.clone();
        let stats2 = stats.clone();
        tokio::spawn(delivery::schedule(
            items,
            start,
            due_tx,
            move |i: usize| {
                plan.apply(&gateway, i);
                let e = &plan.events[i];
                if e.withheld {
                    stats2.withheld(e.kind.label());
                    delivery::record_fate(&fates[i], WebhookFate::Withheld);
                    return Vec::new();
                }
                let mut out = vec![Due {
                    index: i,
                    copy: false,
                }];
                if e.duplicate {
                    out.push(Due {
                        index: i,
                        copy: true,
                    });
                }
                out
            },
            stats,
            cancel,
        ))
    };
    let shuffler = tokio::spawn(delivery::shuffle(
        due_rx,
        out_tx,
        cfg.delivery.reorder_window,
        StdRng::seed_from_u64(cfg.seed ^ 0x5eed_5eed),
    ));

    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => None,
            n = out_rx.recv() => n,
        };
        let Some(due) = next else { break };
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = poster.semaphore.clone().acquire_owned() => p?,
        };
        let e = &plan.events[due.index];
        let d = Delivery {
            url: url.clone(),
            body: plan.body(due.index),
            items: vec![(e.kind.label(), 1)],
            duplicate: due.copy,
        };
        let poster = poster.clone();
        let fates = fates.clone();
        let index = due.index;
        tasks.spawn(async move {
            let fate = poster.deliver(d, permit).await;
            delivery::record_fate(&fates[index], fate);
        });
        while tasks.try_join_next().is_some() {}
    }
    drop(out_rx);
    while tasks.join_next().await.is_some() {}
    let _ = scheduler.await;
    let _ = shuffler.await;
    done.cancel();
    if let Some(p) = progress {
        let _ = p.await;
    }
    let truth = plan.truth_with(Some(&fates));
    Ok(SimReport::new(
        Provider::Lisoloo,
        cfg.seed,
        started.elapsed(),
        &stats,
        cancel.is_cancelled(),
        truth,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carrier_mix_parses_and_shapes_the_plan() {
        let v: CarrierProfile = "vodacom_drc:3:0:1502".parse().unwrap();
        assert_eq!(
            (v.name.as_str(), v.weight, v.failure_rate),
            ("vodacom_drc", 3, 0.0)
        );
        let o: CarrierProfile = "orange_drc:1:1".parse().unwrap();
        assert!(o.error_codes.is_empty());
        for bad in ["x", "x:0:0.1", "x:1:2", "x:1:0.1:9999", ":1:0.1"] {
            assert!(bad.parse::<CarrierProfile>().is_err(), "{bad}");
        }
        let o: CarrierProfile = "orange_drc:1:1:1504,1505".parse().unwrap();
        let cfg = LisolooConfig {
            messages: 200,
            recipients: 2,
            carriers: vec![v, o],
            ..LisolooConfig::default()
        };
        let plan = LisolooPlan::new(&cfg, Utc::now());
        let truth = plan.truth_with(None);
        let on = |c: &str| {
            truth
                .recipients
                .iter()
                .filter(|r| r.carrier.as_deref() == Some(c))
                .collect::<Vec<_>>()
        };
        let (v, o) = (on("vodacom_drc"), on("orange_drc"));
        assert_eq!(v.len() + o.len(), 400);
        // Weights 3:1 (about 300:100).
        assert!((250..=350).contains(&v.len()), "{}", v.len());
        assert!(v.iter().all(|r| r.status == FinalStatus::Delivered));
        assert!(o.iter().all(|r| r.status == FinalStatus::Failed
            && matches!(r.error_code.as_deref(), Some("1504" | "1505"))));
        assert!(truth.recipients.iter().all(|r| r.queued_at.is_some()));
    }
}
