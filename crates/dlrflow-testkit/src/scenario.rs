//! Support for the integration tests and the benchmark: a deterministic
//! scenario of Lisoloo webhook records with its expected final state, and a
//! producer that writes raw records the way dlrflow-ingest does. Never used by
//! the service itself.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use dlrflow_runtime::kafka::raw_key;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use uuid::Uuid;

/// One raw-topic record.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub key: String,
    pub provider: &'static str,
    pub source: String,
    pub payload: String,
}

/// What a recipient must end as.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub status: &'static str,
    pub delivered_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub error_code: Option<String>,
}

/// Records (unique, in causal order) and the expected outcome.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub records: Vec<RawRecord>,
    /// `(message_id, recipient)` → final state.
    pub expected: BTreeMap<(String, String), Expected>,
    /// The `update_id` of every recipient event (each one changes state).
    pub update_ids: Vec<Uuid>,
}

/// A small deterministic generator (no external randomness in tests).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `messages` messages with `recipients` recipients each: one `sms.queued`
/// per message, then `sms.processing`, `sms.sent` and `sms.delivered` (or,
/// for every fifth recipient, `sms.failed`) per recipient. `tag` makes ids
/// unique per run.
pub fn lisoloo_scenario(tag: &str, messages: usize, recipients: usize) -> Scenario {
    let ns = Uuid::new_v5(&Uuid::NAMESPACE_OID, tag.as_bytes());
    let base = Utc
        .with_ymd_and_hms(2026, 5, 27, 10, 0, 0)
        .single()
        .expect("valid time");
    let mut records = Vec::new();
    let mut expected = BTreeMap::new();
    let mut update_ids = Vec::new();
    let mut n = 0u64;
    let mut event_id = || {
        n += 1;
        Uuid::new_v5(&ns, &n.to_be_bytes())
    };
    for m in 0..messages {
        let message_id = format!("{tag}-m{m}");
        let t0 = base + chrono::Duration::seconds(m as i64);
        let envelope = |id: Uuid, ty: &str, at: DateTime<Utc>, data: serde_json::Value| RawRecord {
            key: message_id.clone(),
            provider: "lisoloo",
            source: "lisoloo-main".into(),
            payload: serde_json::json!({
                "event_id": id.to_string(), "event_type": ty, "timestamp": ts(at),
                "message_id": message_id, "data": data,
            })
            .to_string(),
        };
        records.push(envelope(
            event_id(),
            "sms.queued",
            t0,
            serde_json::json!({"total_recipients": recipients, "total_messages": recipients, "total_cost": 0.02 * recipients as f64, "currency": "USD"}),
        ));
        for r in 0..recipients {
            let phone = format!("+24399{:07}", m * 1000 + r);
            let t1 = t0 + chrono::Duration::milliseconds(100 + r as i64);
            let t2 = t1 + chrono::Duration::seconds(2);
            let t3 = t2 + chrono::Duration::seconds(5);
            let failed = r % 5 == 4;
            let ids = [event_id(), event_id(), event_id()];
            records.push(envelope(
                ids[0],
                "sms.processing",
                t1,
                serde_json::json!({"recipient_phone": phone, "carrier": "vodacom_drc"}),
            ));
            records.push(envelope(ids[1], "sms.sent", t2, serde_json::json!({"recipient_phone": phone, "carrier": "vodacom_drc", "sent_at": ts(t2)})));
            if failed {
                records.push(envelope(ids[2], "sms.failed", t3, serde_json::json!({"recipient_phone": phone, "failed_at": ts(t3), "error_code": "E_ABSENT", "error_message": "subscriber absent", "retryable": true})));
            } else {
                records.push(envelope(ids[2], "sms.delivered", t3, serde_json::json!({"recipient_phone": phone, "carrier": "vodacom_drc", "delivered_at": ts(t3), "segments": 1})));
            }
            for id in ids {
                update_ids.push(dlrflow_events::update_id(&id.to_string(), &phone));
            }
            expected.insert(
                (message_id.clone(), phone),
                Expected {
                    status: if failed { "failed" } else { "delivered" },
                    delivered_at: (!failed).then_some(t3),
                    failed_at: failed.then_some(t3),
                    error_code: failed.then(|| "E_ABSENT".to_owned()),
                },
            );
        }
    }
    Scenario {
        records,
        expected,
        update_ids,
    }
}

/// Shuffles the records and appends duplicates of about `dup_percent` % of them
/// at random places.
pub fn shuffled_with_duplicates(
    records: &[RawRecord],
    dup_percent: usize,
    seed: u64,
) -> Vec<RawRecord> {
    let mut rng = Rng::new(seed);
    let mut out = records.to_vec();
    for r in records {
        if rng.below(100) < dup_percent {
            out.push(r.clone());
        }
    }
    rng.shuffle(&mut out);
    out
}

/// An `acks=all` producer for tests (not idempotent: Tansu 0.6 answered
/// large idempotent bursts with an unknown broker error).
pub fn producer(brokers: &str) -> anyhow::Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        // Batches of the size the ingest makes under load. Tansu 0.6.0 stalls
        // (consumer heartbeats time out) serving multi-MB batches.
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("test producer")
}

/// Produces the records as dlrflow-ingest would (key, timestamp) and waits for
/// every acknowledgement.
pub async fn produce_raw(
    producer: &FutureProducer,
    topic: &str,
    records: &[RawRecord],
) -> anyhow::Result<()> {
    for chunk in records.chunks(5000) {
        let received_at = Utc::now().timestamp_millis();
        let keys: Vec<String> = chunk
            .iter()
            .map(|r| raw_key::encode(&r.source, r.provider, Some(&r.key)))
            .collect();
        let mut pending = Vec::with_capacity(chunk.len());
        for (r, key) in chunk.iter().zip(&keys) {
            let record = FutureRecord::to(topic)
                .key(key)
                .payload(&r.payload)
                .timestamp(received_at);
            pending.push(producer.send(record, Duration::from_secs(30)));
        }
        for p in futures::future::join_all(pending).await {
            p.map_err(|(e, _)| anyhow::anyhow!("producing test record: {e}"))?;
        }
    }
    Ok(())
}
