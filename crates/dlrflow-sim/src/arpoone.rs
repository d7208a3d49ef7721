//! The Arpoone gateway: records `PENDING` then `DELIVERED` | `NOT_DELIVERED`
//! per recipient, POSTed as JSON arrays of up to 1,000 records, either to one
//! URL per status or to one URL for all, expecting exactly HTTP 200.

use std::collections::HashMap;
use std::sync::atomic::AtomicU8;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::delivery::{self, AckRule, Delivery, DeliveryConfig, Poster, Stats};
use crate::lisoloo::{at, uuid_v4};
use crate::report::SimReport;
use crate::truth::{FinalStatus, Provider, Truth, TruthRecipient, WebhookFate};

/// How records are routed to URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// One URL per status: `{target}/{source}/webhook/{delivered|pending|not_delivered}`;
    /// a batch holds records of one status.
    PerStatus,
    /// One URL for all: `{target}/{source}/webhook`; batches mix statuses.
    Single,
}

/// Settings of an Arpoone run.
#[derive(Debug, Clone)]
pub struct ArpooneConfig {
    pub delivery: DeliveryConfig,
    pub messages: usize,
    pub recipients: usize,
    /// Messages started per second (unscaled); 0 = all at once.
    pub send_rate: f64,
    /// Share of recipients that end `NOT_DELIVERED`.
    pub failure_rate: f64,
    pub routing: Routing,
    /// Path token for `{token}` in the URL template (path-token auth). When set
    /// and no template is given, the URL is `{target}/{source}/webhook/{token}[/{status}]`.
    pub token: Option<String>,
    /// Most records per request (the documented maximum is 1,000).
    pub batch_max: usize,
    /// How long a batch waits for more records before it is sent (scaled).
    pub batch_linger: Duration,
    /// Most `PENDING` records per recipient before its final one.
    pub pending_max: u32,
    pub organization_id: Uuid,
    /// CustomPayload configured at send; `None` = a per-message default.
    pub custom_payload: Option<String>,
    pub seed: u64,
}

impl Default for ArpooneConfig {
    fn default() -> Self {
        Self {
            delivery: DeliveryConfig {
                source: "arpoone".to_owned(),
                ..DeliveryConfig::default()
            },
            messages: 100,
            recipients: 1,
            send_rate: 50.0,
            failure_rate: 0.1,
            routing: Routing::PerStatus,
            token: None,
            batch_max: 1000,
            batch_linger: Duration::from_secs(1),
            pending_max: 2,
            organization_id: Uuid::from_u128(0x6f0c_2a4e_8d1b_4c3a_9e5f_0a1b_2c3d_4e5f),
            custom_payload: None,
            seed: 0,
        }
    }
}

/// Record `Status` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordStatus {
    Pending,
    Delivered,
    NotDelivered,
}

impl RecordStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordStatus::Pending => "PENDING",
            RecordStatus::Delivered => "DELIVERED",
            RecordStatus::NotDelivered => "NOT_DELIVERED",
        }
    }

    /// The per-status URL segment.
    pub fn path(self) -> &'static str {
        match self {
            RecordStatus::Pending => "pending",
            RecordStatus::Delivered => "delivered",
            RecordStatus::NotDelivered => "not_delivered",
        }
    }

    fn label(self) -> usize {
        self as usize
    }
}

const LABELS: [&str; 3] = ["PENDING", "DELIVERED", "NOT_DELIVERED"];

const FAILURES: [&str; 4] = [
    "Absent subscriber",
    "Unknown subscriber",
    "Rejected by operator",
    "Expired",
];

/// One record exactly as sent.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Record {
    msisdn: String,
    status: &'static str,
    message_id: String,
    organization_id: String,
    report_description: String,
    report_date_time: String,
    total_segments: u32,
    custom_payload: String,
}

#[derive(Debug, Clone)]
struct PlanRecord {
    due: Duration,
    status: RecordStatus,
    message: usize,
    recipient: usize,
    description: &'static str,
    withheld: bool,
}

#[derive(Debug, Clone)]
struct PlanMessage {
    id: Uuid,
    segments: u32,
    custom_payload: String,
    recipients: Vec<String>,
}

/// A fully planned Arpoone run.
#[derive(Debug, Clone)]
pub struct ArpoonePlan {
    base: DateTime<Utc>,
    source: String,
    seed: u64,
    organization_id: Uuid,
    messages: Vec<PlanMessage>,
    records: Vec<PlanRecord>,
}

impl ArpoonePlan {
    pub fn new(cfg: &ArpooneConfig, base: DateTime<Utc>) -> Self {
        let base = DateTime::from_timestamp_millis(base.timestamp_millis()).unwrap_or(base);
        let d = &cfg.delivery;
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut messages = Vec::with_capacity(cfg.messages);
        let mut records = Vec::new();
        let ms = |v: f64| d.scaled(Duration::from_secs_f64(v / 1000.0));
        for m in 0..cfg.messages {
            let start = if cfg.send_rate > 0.0 {
                Duration::from_secs_f64(m as f64 / cfg.send_rate)
            } else {
                Duration::ZERO
            };
            let id = uuid_v4(&mut rng);
            let segments = [1, 1, 1, 2, 3][rng.gen_range(0..5)];
            let custom_payload = cfg
                .custom_payload
                .clone()
                .unwrap_or_else(|| format!("{{\"sim\":\"dlrflow-sim\",\"seq\":{m}}}"));
            let mut recipients = Vec::with_capacity(cfg.recipients);
            for r in 0..cfg.recipients {
                recipients.push(format!(
                    "2438{}{:07}",
                    rng.gen_range(1..10),
                    rng.gen_range(0..10_000_000u32)
                ));
                let pendings = match rng.gen_range(0..10) {
                    0 => 0,
                    1 | 2 => 2,
                    _ => 1,
                }
                .min(cfg.pending_max);
                let mut t = start + ms(rng.gen_range(200.0..2000.0));
                for _ in 0..pendings {
                    records.push(PlanRecord {
                        due: t,
                        status: RecordStatus::Pending,
                        message: m,
                        recipient: r,
                        description: "Sent to operator",
                        withheld: false,
                    });
                    t += ms(rng.gen_range(500.0..5000.0));
                }
                let failed = rng.gen_bool(cfg.failure_rate);
                let withheld = rng.gen_bool(d.withhold_terminal_rate);
                records.push(PlanRecord {
                    due: t + ms(rng.gen_range(1000.0..15_000.0)),
                    status: if failed {
                        RecordStatus::NotDelivered
                    } else {
                        RecordStatus::Delivered
                    },
                    message: m,
                    recipient: r,
                    description: if failed {
                        FAILURES[rng.gen_range(0..FAILURES.len())]
                    } else {
                        "Delivered"
                    },
                    withheld,
                });
            }
            messages.push(PlanMessage {
                id,
                segments,
                custom_payload,
                recipients,
            });
        }
        records.sort_by_key(|r| r.due);
        Self {
            base,
            source: d.source.clone(),
            seed: cfg.seed,
            organization_id: cfg.organization_id,
            messages,
            records,
        }
    }

    /// Number of records planned (withheld ones included).
    pub fn record_count(&self) -> usize {
        self.records.len()
    }

    fn record(&self, i: usize) -> Record {
        let r = &self.records[i];
        let m = &self.messages[r.message];
        Record {
            msisdn: m.recipients[r.recipient].clone(),
            status: r.status.as_str(),
            message_id: m.id.to_string(),
            organization_id: self.organization_id.to_string(),
            report_description: r.description.to_owned(),
            report_date_time: at(self.base, r.due).to_rfc3339_opts(SecondsFormat::Millis, false),
            total_segments: m.segments,
            custom_payload: m.custom_payload.clone(),
        }
    }

    fn body(&self, indices: &[usize]) -> Bytes {
        let records: Vec<Record> = indices.iter().map(|i| self.record(*i)).collect();
        Bytes::from(serde_json::to_vec(&records).expect("records serialize"))
    }

    fn truth_with(&self, fates: Option<&[AtomicU8]>) -> Truth {
        let mut recipients = Vec::new();
        for (i, r) in self.records.iter().enumerate() {
            if r.status == RecordStatus::Pending {
                continue;
            }
            let m = &self.messages[r.message];
            let t = at(self.base, r.due);
            let failed = r.status == RecordStatus::NotDelivered;
            recipients.push(TruthRecipient {
                queued_at: None,
                provider: Provider::Arpoone,
                source: self.source.clone(),
                message_id: m.id.to_string(),
                recipient: m.recipients[r.recipient].clone(),
                status: if failed {
                    FinalStatus::Failed
                } else {
                    FinalStatus::Delivered
                },
                sent_at: None,
                delivered_at: (!failed).then_some(t),
                failed_at: failed.then_some(t),
                error_code: None,
                error_message: failed.then(|| r.description.to_owned()),
                carrier: None,
                segments: m.segments,
                terminal_webhook: match fates {
                    Some(f) => {
                        WebhookFate::from_u8(f[i].load(std::sync::atomic::Ordering::Relaxed))
                    }
                    None if r.withheld => WebhookFate::Withheld,
                    None => WebhookFate::NotSent,
                },
            });
        }
        recipients
            .sort_by(|a, b| (&a.message_id, &a.recipient).cmp(&(&b.message_id, &b.recipient)));
        Truth {
            provider: Provider::Arpoone,
            source: self.source.clone(),
            seed: self.seed,
            generated_at: self.base,
            recipients,
        }
    }

    /// The ground truth as planned.
    pub fn truth(&self) -> Truth {
        self.truth_with(None)
    }
}

struct OpenBatch {
    records: Vec<usize>,
    deadline: Instant,
}

/// Plans and runs an Arpoone send. Returns when every batch is settled or
/// `cancel` fires.
pub async fn run_arpoone(
    cfg: &ArpooneConfig,
    cancel: CancellationToken,
) -> anyhow::Result<SimReport> {
    let plan = ArpoonePlan::new(cfg, Utc::now());
    run_arpoone_plan(cfg, plan, cancel).await
}

/// Runs an already made plan (its base time should be about now).
pub async fn run_arpoone_plan(
    cfg: &ArpooneConfig,
    plan: ArpoonePlan,
    cancel: CancellationToken,
) -> anyhow::Result<SimReport> {
    cfg.delivery.validate()?;
    anyhow::ensure!(
        (1..=1000).contains(&cfg.batch_max),
        "batch_max must be within 1..=1000"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&cfg.failure_rate),
        "failure_rate must be within 0..=1"
    );
    let started = Instant::now();
    let lag = (Utc::now() - plan.base).to_std().unwrap_or(Duration::ZERO);
    let start = started.checked_sub(lag).unwrap_or(started);
    let plan = Arc::new(plan);
    let stats = Arc::new(Stats::new(&LABELS, plan.records.len() as u64));
    let fates: Arc<Vec<AtomicU8>> =
        Arc::new((0..plan.records.len()).map(|_| AtomicU8::new(0)).collect());
    let poster = Poster::new(
        &cfg.delivery,
        AckRule::Only200,
        stats.clone(),
        cancel.clone(),
    )?;
    let token = cfg.token.clone().unwrap_or_default();
    let template = match (cfg.routing, cfg.token.is_some()) {
        (Routing::PerStatus, false) => "{target}/{source}/webhook/{status}",
        (Routing::PerStatus, true) => "{target}/{source}/webhook/{token}/{status}",
        (Routing::Single, false) => "{target}/{source}/webhook",
        (Routing::Single, true) => "{target}/{source}/webhook/{token}",
    };
    let linger = cfg.delivery.scaled(cfg.batch_linger);

    let done = CancellationToken::new();
    let progress = cfg
        .delivery
        .progress_interval
        .map(|i| delivery::spawn_progress("arpoone", i, stats.clone(), done.clone()));

    let (due_tx, due_rx) = mpsc::channel::<usize>(65_536);
    let (out_tx, mut out_rx) = mpsc::channel::<usize>(4096);
    let items: Vec<(Duration, usize)> = plan
        .records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.due, i))
        .collect();
    let scheduler = {
        let plan = plan.clone();
        let stats2 = stats.clone();
        let fates = fates.clone();
        tokio::spawn(delivery::schedule(
            items,
            start,
            due_tx,
            move |i: usize| {
                let r = &plan.records[i];
                if r.withheld {
                    stats2.withheld(r.status.label());
                    delivery::record_fate(&fates[i], WebhookFate::Withheld);
                    return Vec::new();
                }
                vec![i]
            },
            stats.clone(),
            cancel.clone(),
        ))
    };
    let shuffler = tokio::spawn(delivery::shuffle(
        due_rx,
        out_tx,
        cfg.delivery.reorder_window,
        StdRng::seed_from_u64(cfg.seed ^ 0x5eed_5eed),
    ));

    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x00d0_b1e5);
    let mut open: HashMap<Option<RecordStatus>, OpenBatch> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut input_done = false;
    loop {
        // Flush batches that are full, past their linger, or all at the end.
        let now = Instant::now();
        let ready: Vec<Option<RecordStatus>> = open
            .iter()
            .filter(|(_, b)| input_done || b.records.len() >= cfg.batch_max || b.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in ready {
            let Some(batch) = open.remove(&key) else {
                continue;
            };
            let url = cfg
                .delivery
                .url(template, key.map(RecordStatus::path).unwrap_or(""), &token);
            let mut counts = [0u64; 3];
            for i in &batch.records {
                counts[plan.records[*i].status.label()] += 1;
            }
            let items: Vec<(usize, u64)> = counts
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(l, n)| (l, *n))
                .collect();
            let body = plan.body(&batch.records);
            let copies = if rng.gen_bool(cfg.delivery.duplicate_rate) {
                2
            } else {
                1
            };
            let records = Arc::new(batch.records);
            for copy in 0..copies {
                let permit = tokio::select! {
                    _ = cancel.cancelled() => break,
                    p = poster.semaphore.clone().acquire_owned() => p?,
                };
                let d = Delivery {
                    url: url.clone(),
                    body: body.clone(),
                    items: items.clone(),
                    duplicate: copy > 0,
                };
                let poster = poster.clone();
                let fates = fates.clone();
                let records = records.clone();
                tasks.spawn(async move {
                    let fate = poster.deliver(d, permit).await;
                    for i in records.iter() {
                        delivery::record_fate(&fates[*i], fate);
                    }
                });
            }
        }
        while tasks.try_join_next().is_some() {}
        if input_done || cancel.is_cancelled() {
            break;
        }
        let next_deadline = open.values().map(|b| b.deadline).min();
        let next = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = async { match next_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            } } => continue,
            n = out_rx.recv() => n,
        };
        match next {
            None => input_done = true,
            Some(i) => {
                let key = match cfg.routing {
                    Routing::PerStatus => Some(plan.records[i].status),
                    Routing::Single => None,
                };
                open.entry(key)
                    .or_insert_with(|| OpenBatch {
                        records: Vec::new(),
                        deadline: Instant::now() + linger,
                    })
                    .records
                    .push(i);
            }
        }
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
        Provider::Arpoone,
        cfg.seed,
        started.elapsed(),
        &stats,
        cancel.is_cancelled(),
        truth,
    ))
}
