//! The report of one sender run.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use crate::delivery::{Stats, TypeReport};
use crate::truth::{Provider, Truth};

/// What a sender run did, per label (Lisoloo: event type; Arpoone: record
/// `Status`) and in total, plus the ground truth.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub provider: Provider,
    pub seed: u64,
    pub elapsed: Duration,
    /// HTTP requests made (Arpoone: one request carries many records).
    pub requests: u64,
    pub by_type: BTreeMap<String, TypeReport>,
    pub totals: TypeReport,
    /// True when the run was cancelled before every event was settled.
    pub cancelled: bool,
    #[serde(skip)]
    pub truth: Truth,
}

impl SimReport {
    pub(crate) fn new(
        provider: Provider,
        seed: u64,
        elapsed: Duration,
        stats: &Stats,
        cancelled: bool,
        truth: Truth,
    ) -> Self {
        let (by_type, totals) = stats.snapshot();
        Self {
            provider,
            seed,
            elapsed,
            requests: stats.requests.load(Ordering::Relaxed),
            by_type,
            totals,
            cancelled,
            truth,
        }
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} run (seed {}) in {:.1}s: {} requests{}",
            self.provider.as_str(),
            self.seed,
            self.elapsed.as_secs_f64(),
            self.requests,
            if self.cancelled { ", CANCELLED" } else { "" }
        );
        let _ = writeln!(
            s,
            "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9}",
            "type",
            "sent",
            "attempts",
            "acked",
            "retries",
            "drop4xx",
            "exhausted",
            "dups",
            "withheld",
            "cancelled"
        );
        let rows = self
            .by_type
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .chain(std::iter::once(("TOTAL", &self.totals)));
        for (name, r) in rows {
            let _ = writeln!(
                s,
                "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9}",
                name,
                r.sent,
                r.attempts,
                r.acked,
                r.retries,
                r.dropped_4xx,
                r.dropped_exhausted,
                r.duplicates,
                r.withheld,
                r.cancelled
            );
        }
        s
    }
}
