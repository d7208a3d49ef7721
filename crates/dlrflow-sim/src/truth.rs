//! Ground truth: the final state of every simulated recipient, as the gateway
//! knows it, independent of which webhooks made it through.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Which provider's protocol a run spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Lisoloo,
    Arpoone,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Lisoloo => "lisoloo",
            Provider::Arpoone => "arpoone",
        }
    }
}

/// Terminal status of a recipient, in dlrflow's lattice vocabulary
/// (Arpoone `NOT_DELIVERED` is `failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalStatus {
    Delivered,
    Failed,
}

impl FinalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Delivered => "delivered",
            FinalStatus::Failed => "failed",
        }
    }
}

/// What happened to the webhook carrying a recipient's terminal event.
/// Ordered from worst to best: when a duplicate copy exists, the best fate of
/// any copy wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFate {
    /// The run ended (or was cancelled) before the event was settled.
    NotSent,
    /// The gateway gave up on it without sending (`--withhold-terminal-rate`).
    Withheld,
    /// Every attempt failed (5xx, connection error, timeout).
    Exhausted,
    /// The receiver answered 4xx; the gateway dropped it.
    Dropped4xx,
    /// The receiver acknowledged it.
    Acked,
}

impl WebhookFate {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            1 => WebhookFate::Withheld,
            2 => WebhookFate::Exhausted,
            3 => WebhookFate::Dropped4xx,
            4 => WebhookFate::Acked,
            _ => WebhookFate::NotSent,
        }
    }

    pub(crate) fn as_u8(self) -> u8 {
        match self {
            WebhookFate::NotSent => 0,
            WebhookFate::Withheld => 1,
            WebhookFate::Exhausted => 2,
            WebhookFate::Dropped4xx => 3,
            WebhookFate::Acked => 4,
        }
    }
}

/// The true final state of one recipient of one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruthRecipient {
    pub provider: Provider,
    pub source: String,
    pub message_id: String,
    pub recipient: String,
    pub status: FinalStatus,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub carrier: Option<String>,
    pub segments: u32,
    /// When the message was queued (Lisoloo `sms.queued`); `None` for
    /// Arpoone, which has no such event.
    #[serde(default)]
    pub queued_at: Option<DateTime<Utc>>,
    /// Fate of the terminal webhook (informational: dlrflow must reach the
    /// true status even when this is not `acked`, via the status API).
    pub terminal_webhook: WebhookFate,
}

impl TruthRecipient {
    /// The timestamp of the terminal transition (`delivered_at` or `failed_at`).
    pub fn terminal_at(&self) -> Option<DateTime<Utc>> {
        match self.status {
            FinalStatus::Delivered => self.delivered_at,
            FinalStatus::Failed => self.failed_at,
        }
    }
}

/// The ground truth of one simulator run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Truth {
    pub provider: Provider,
    pub source: String,
    pub seed: u64,
    pub generated_at: DateTime<Utc>,
    pub recipients: Vec<TruthRecipient>,
}

impl Truth {
    /// Writes the truth as pretty JSON (atomically: temp file then rename).
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).context("serializing truth")?;
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    pub fn read_json(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing truth {}", path.display()))
    }

    /// Recipients grouped by message id (sorted).
    pub fn by_message(&self) -> BTreeMap<&str, Vec<&TruthRecipient>> {
        let mut map: BTreeMap<&str, Vec<&TruthRecipient>> = BTreeMap::new();
        for r in &self.recipients {
            map.entry(r.message_id.as_str()).or_default().push(r);
        }
        map
    }

    /// Number of distinct messages.
    pub fn message_count(&self) -> usize {
        self.by_message().len()
    }
}
