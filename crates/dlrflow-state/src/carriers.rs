//! Carrier and error analytics: per carrier (and per error code) how many
//! recipients, how many delivered / failed, how fast (sent → delivered,
//! queued → terminal, p50 / p95) and how often the terminal state came only
//! from the status API (no webhook ever reported it: the carrier's reports
//! went missing).
//!
//! ## Cheap at volume: an incremental rollup
//!
//! Nothing here scans `recipient_state`. The write path
//! ([`crate::store::apply_batch`]) keeps the table `carrier_rollup` in the
//! same transaction as the recipient rows: for every recipient a batch
//! changes it subtracts the recipient's old [contribution](contribute) and
//! adds its new one, as additive upserts (`n = n + delta`) in one global key
//! order. Additions commute, so duplicates (no change, no delta), reordering
//! (the state converges, so does its contribution), conflicts, status-API
//! overrides and concurrent replicas all end in the sum of the final
//! contributions; `rebuild --compare-with` checks that the rollup equals the
//! one a replay of the log builds. [`report`] reads the rollup rows of the
//! asked hours: its cost grows with sources × hours × carriers × error codes
//! × non-empty bins, not with recipients.
//!
//! ## Definitions
//!
//! * **Basis time** (what `from` / `to` filter on): the recipient's message's
//!   queued time (Lisoloo `sms.queued`), else the recipient's own queued time,
//!   else the earliest of its processing / sent / delivered / failed times,
//!   else its latest event time. The rollup keeps it to the hour, so `from`
//!   and `to` are whole hours and a recipient counts when
//!   `from <= basis < to`. When an earlier time becomes known (a late
//!   `sms.queued`) the recipient moves to that hour.
//! * **Queued time** (for queued → terminal): the message's queued time, else
//!   the recipient's own. Arpoone has no queued event: its recipients have no
//!   queued → terminal figure.
//! * **Only from the status API**: the recipient is terminal and no webhook
//!   ever reported that terminal status (`recipient_state.webhook_terminals`).
//!   A webhook terminal that arrives after the status read counts as
//!   reported: the report was late, not missing, and the recipient leaves
//!   the status-API-only count when it arrives. A webhook that reported the
//!   *other* terminal status (a conflict the status API resolved) does not
//!   count.
//! * **Error code**: the recipient's error code when it is `failed` (none
//!   otherwise); carrier and error code are cut to [`MAX_LABEL`] characters.
//! * **Latency percentiles** come from histograms with 4 bins per doubling
//!   (bin k >= 1 holds [2^((k-1)/4), 2^(k/4)) ms, bin 0 is under 1 ms, bin
//!   127 everything from 2^31.5 ms ≈ 35 days). A percentile (nearest rank) is
//!   reported as the upper edge of its bin rounded up to a whole ms: the true
//!   value is at most that and at least 84 % of it (2^(-1/4)). A latency below
//!   zero (clock skew between reports) counts as 0.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use dlrflow_events::{RecipientState, Status};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

/// Bins of a latency histogram.
pub const BINS: i16 = 128;
/// Carrier and error code are cut to this many characters in the rollup.
pub const MAX_LABEL: usize = 100;
/// Error codes listed per carrier (and carriers per error code) at most.
pub const TOP: usize = 10;

/// `recipient_state.webhook_terminals`: a webhook reported `delivered`.
pub const WEBHOOK_DELIVERED: i16 = 1;
/// `recipient_state.webhook_terminals`: a webhook reported `failed`.
pub const WEBHOOK_FAILED: i16 = 2;

/// The `webhook_terminals` bit of a terminal status (0 for the others).
pub fn webhook_bit(status: Status) -> i16 {
    match status {
        Status::Delivered => WEBHOOK_DELIVERED,
        Status::Failed => WEBHOOK_FAILED,
        _ => 0,
    }
}

/// The histogram bin of a latency in whole milliseconds: 0 below 1 ms, else
/// k with 2^(k-1) <= ms^4 < 2^k (exact integer arithmetic), at most
/// `BINS - 1`.
pub fn latency_bin(ms: i64) -> i16 {
    if ms < 1 {
        return 0;
    }
    let m = ms as u128;
    let Some(p) = m.checked_mul(m).and_then(|x| x.checked_mul(x)) else {
        return BINS - 1;
    };
    let bits = (128 - p.leading_zeros()) as i16;
    bits.min(BINS - 1)
}

/// The figure a percentile in `bin` is reported as: the bin's upper edge
/// 2^(bin/4) ms rounded up (1 for bin 0); for the open last bin, its lower
/// edge.
pub fn bin_edge_ms(bin: i16) -> u64 {
    let k = if bin >= BINS - 1 {
        BINS - 2
    } else {
        bin.max(0)
    };
    // The smallest whole ms above every value of the bin: ceil(2^(k/4)).
    2f64.powf(f64::from(k) / 4.0).ceil() as u64
}

/// What a rollup row is about; the order is the table's key order, which is
/// also the order rows are locked in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cell {
    pub source: String,
    pub hour: DateTime<Utc>,
    pub carrier: String,
    pub error_code: String,
    pub metric: &'static str,
    pub bin: i16,
}

/// Deltas to add to the rollup, by cell.
pub type Deltas = BTreeMap<Cell, i64>;

/// A carrier or error code as the rollup keeps it: its first [`MAX_LABEL`]
/// characters ('' for none; SQL `left(coalesce(x, ''), 100)`).
fn label(v: Option<&str>) -> String {
    v.unwrap_or("").chars().take(MAX_LABEL).collect()
}

/// The start of `t`'s hour: the rollup's unit of time.
pub fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    let secs = t.timestamp().div_euclid(3600) * 3600;
    DateTime::from_timestamp(secs, 0).unwrap_or(t)
}

fn millis(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    (to - from).num_milliseconds()
}

/// Adds `sign` × one recipient's contribution to `out` (see the module
/// docs): `source` is the recipient row's, `webhook_terminals` its bits,
/// `message_queued` its message's `queued_at`.
pub fn contribute(
    out: &mut Deltas,
    sign: i64,
    source: &str,
    s: &RecipientState,
    webhook_terminals: i16,
    message_queued: Option<DateTime<Utc>>,
) {
    let queued = message_queued.or(s.queued_at);
    let basis = queued
        .or([s.processing_at, s.sent_at, s.delivered_at, s.failed_at]
            .into_iter()
            .flatten()
            .min())
        .unwrap_or(s.last_event_at);
    let carrier = label(s.carrier.as_deref());
    let error_code = match s.status {
        Status::Failed => label(s.error_code.as_deref()),
        _ => String::new(),
    };
    let mut add = |metric: &'static str, bin: i16| {
        let cell = Cell {
            source: source.to_owned(),
            hour: hour_of(basis),
            carrier: carrier.clone(),
            error_code: error_code.clone(),
            metric,
            bin,
        };
        *out.entry(cell).or_insert(0) += sign;
    };
    add("recipients", 0);
    let terminal_at = match s.status {
        Status::Delivered => {
            add("delivered", 0);
            s.delivered_at
        }
        Status::Failed => {
            add("failed", 0);
            s.failed_at
        }
        _ => return,
    };
    if webhook_terminals & webhook_bit(s.status) == 0 {
        add("status_api_only", 0);
    }
    if let (Status::Delivered, Some(sent), Some(delivered)) = (s.status, s.sent_at, s.delivered_at)
    {
        add("sent_to_delivered", latency_bin(millis(sent, delivered)));
    }
    if let (Some(q), Some(t)) = (queued, terminal_at) {
        add("queued_to_terminal", latency_bin(millis(q, t)));
    }
}

/// Adds `deltas` to the rollup in `tx` (zero deltas dropped), one upsert in
/// key order.
pub(crate) async fn write_deltas(
    tx: &mut Transaction<'_, Postgres>,
    deltas: &Deltas,
) -> Result<(), sqlx::Error> {
    let live: Vec<(&Cell, i64)> = deltas
        .iter()
        .filter(|(_, &d)| d != 0)
        .map(|(c, &d)| (c, d))
        .collect();
    if live.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO carrier_rollup (source, hour, carrier, error_code, metric, bin, n) \
         SELECT s, h, c, e, m, b, n FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::int2[], $7::int8[]) \
                WITH ORDINALITY AS u(s, h, c, e, m, b, n, i) ORDER BY i \
         ON CONFLICT (source, hour, carrier, error_code, metric, bin) \
         DO UPDATE SET n = carrier_rollup.n + EXCLUDED.n",
    )
    .bind(live.iter().map(|(c, _)| c.source.as_str()).collect::<Vec<_>>())
    .bind(live.iter().map(|(c, _)| c.hour).collect::<Vec<_>>())
    .bind(live.iter().map(|(c, _)| c.carrier.as_str()).collect::<Vec<_>>())
    .bind(live.iter().map(|(c, _)| c.error_code.as_str()).collect::<Vec<_>>())
    .bind(live.iter().map(|(c, _)| c.metric).collect::<Vec<_>>())
    .bind(live.iter().map(|(c, _)| c.bin).collect::<Vec<_>>())
    .bind(live.iter().map(|(_, d)| *d).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

/// Which recipients a report covers: `sources` (all when `None`), basis time
/// in `[from, to)` (whole hours; open when `None`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Filter {
    pub sources: Option<Vec<String>>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl Filter {
    /// A filter from the route's / the CLI's text parameters: `from` / `to`
    /// RFC 3339 on a whole hour, `from < to`. The error says what is wrong.
    pub fn parse(
        source: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Filter, String> {
        let time = |name: &str, v: Option<&str>| -> Result<Option<DateTime<Utc>>, String> {
            let Some(v) = v else { return Ok(None) };
            let t = DateTime::parse_from_rfc3339(v)
                .map_err(|e| {
                    format!("invalid {name}: not an RFC 3339 time ({e}), e.g. 2026-05-27T10:00:00Z")
                })?
                .with_timezone(&Utc);
            if t != hour_of(t) {
                return Err(format!(
                    "invalid {name}: the rollup counts whole hours; give a time on the hour, e.g. {}",
                    hour_of(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ));
            }
            Ok(Some(t))
        };
        let from = time("from", from)?;
        let to = time("to", to)?;
        if let (Some(f), Some(t)) = (from, to) {
            if f >= t {
                return Err("invalid range: `from` must be before `to`".to_owned());
            }
        }
        let sources = match source {
            None => None,
            Some(s) if s.is_empty() || s.contains('\0') || s.len() > 512 => {
                return Err("invalid source: empty, too long or holding U+0000".to_owned());
            }
            Some(s) => Some(vec![s.to_owned()]),
        };
        Ok(Filter { sources, from, to })
    }
}

/// A latency's distribution: how many recipients have it, p50 and p95 in ms
/// (the upper edge of the percentile's histogram bin, see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: Option<u64>,
    pub p95_ms: Option<u64>,
}

/// The figures of one carrier or one error code.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Recipients with a basis time in the range (terminal or not).
    pub recipients: u64,
    pub delivered: u64,
    pub failed: u64,
    /// Neither delivered nor failed yet.
    pub pending: u64,
    /// delivered / (delivered + failed); `None` while nothing is terminal.
    pub delivery_rate: Option<f64>,
    /// Terminal recipients whose terminal status no webhook ever reported.
    pub status_api_only: u64,
    /// status_api_only / (delivered + failed).
    pub status_api_only_share: Option<f64>,
    pub sent_to_delivered: Latency,
    pub queued_to_terminal: Latency,
}

/// A name with a count (an error code of a carrier, a carrier of an error code).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Count {
    pub name: String,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CarrierStats {
    /// `None`: no report named the carrier.
    pub carrier: Option<String>,
    #[serde(flatten)]
    pub stats: Stats,
    /// Failed recipients by error code, most frequent first (at most [`TOP`];
    /// a failure without a code is `""`).
    pub top_error_codes: Vec<Count>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorCodeStats {
    /// Failures without an error code are counted per carrier (as `""` in
    /// its `top_error_codes`) but have no entry here.
    pub error_code: String,
    #[serde(flatten)]
    pub stats: Stats,
    /// The carriers of these failures, most frequent first (at most [`TOP`];
    /// an unknown carrier is `""`).
    pub top_carriers: Vec<Count>,
}

/// The answer of `GET /v1/analytics/carriers` and `dlrflow-state carriers`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CarrierReport {
    pub filter: Filter,
    /// Sorted by recipients (most first), then name.
    pub carriers: Vec<CarrierStats>,
    /// Failed recipients by error code, sorted by count, then code.
    pub error_codes: Vec<ErrorCodeStats>,
}

#[derive(Default)]
struct Acc {
    counters: HashMap<&'static str, i64>,
    sent_to_delivered: BTreeMap<i16, i64>,
    queued_to_terminal: BTreeMap<i16, i64>,
    by: BTreeMap<String, i64>,
}

impl Acc {
    fn add(&mut self, metric: &str, bin: i16, n: i64, other: &str) {
        match metric {
            "sent_to_delivered" => *self.sent_to_delivered.entry(bin).or_default() += n,
            "queued_to_terminal" => *self.queued_to_terminal.entry(bin).or_default() += n,
            m => {
                let key = match m {
                    "recipients" => "recipients",
                    "delivered" => "delivered",
                    "failed" => "failed",
                    "status_api_only" => "status_api_only",
                    _ => return,
                };
                *self.counters.entry(key).or_default() += n;
                if key == "failed" {
                    *self.by.entry(other.to_owned()).or_default() += n;
                }
            }
        }
    }

    fn stats(&self) -> Stats {
        let c = |k: &str| self.counters.get(k).copied().unwrap_or(0).max(0) as u64;
        let (delivered, failed) = (c("delivered"), c("failed"));
        let terminal = delivered + failed;
        let share = |n: u64| (terminal > 0).then(|| n as f64 / terminal as f64);
        Stats {
            recipients: c("recipients"),
            delivered,
            failed,
            pending: c("recipients").saturating_sub(terminal),
            delivery_rate: share(delivered),
            status_api_only: c("status_api_only"),
            status_api_only_share: share(c("status_api_only")),
            sent_to_delivered: latency(&self.sent_to_delivered),
            queued_to_terminal: latency(&self.queued_to_terminal),
        }
    }

    fn top(&self) -> Vec<Count> {
        let mut v: Vec<Count> = self
            .by
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(name, &n)| Count {
                name: name.clone(),
                count: n as u64,
            })
            .collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
        v.truncate(TOP);
        v
    }
}

/// Nearest-rank percentile `q` (0 < q <= 1) of a histogram, as a bin.
pub fn percentile_bin(bins: &BTreeMap<i16, i64>, q: f64) -> Option<i16> {
    let total: i64 = bins.values().copied().filter(|&n| n > 0).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as i64).clamp(1, total);
    let mut seen = 0;
    for (&bin, &n) in bins {
        seen += n.max(0);
        if seen >= rank {
            return Some(bin);
        }
    }
    None
}

fn latency(bins: &BTreeMap<i16, i64>) -> Latency {
    Latency {
        count: bins.values().copied().filter(|&n| n > 0).sum::<i64>() as u64,
        p50_ms: percentile_bin(bins, 0.5).map(bin_edge_ms),
        p95_ms: percentile_bin(bins, 0.95).map(bin_edge_ms),
    }
}

/// The carrier and error-code report for `filter`, from the rollup (one
/// grouped read of the rollup rows of the filter's sources and hours).
pub async fn report(pool: &PgPool, filter: &Filter) -> Result<CarrierReport, sqlx::Error> {
    let rows: Vec<(String, String, String, i16, i64)> = sqlx::query_as(
        "SELECT carrier, error_code, metric, bin, sum(n)::int8 FROM carrier_rollup \
         WHERE ($1::text[] IS NULL OR source = ANY($1)) \
           AND ($2::timestamptz IS NULL OR hour >= $2) \
           AND ($3::timestamptz IS NULL OR hour < $3) \
         GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0",
    )
    .bind(filter.sources.as_deref())
    .bind(filter.from)
    .bind(filter.to)
    .fetch_all(pool)
    .await?;
    let mut carriers: BTreeMap<String, Acc> = BTreeMap::new();
    let mut codes: BTreeMap<String, Acc> = BTreeMap::new();
    for (carrier, code, metric, bin, n) in &rows {
        carriers
            .entry(carrier.clone())
            .or_default()
            .add(metric, *bin, *n, code);
        if !code.is_empty() {
            codes
                .entry(code.clone())
                .or_default()
                .add(metric, *bin, *n, carrier);
        }
    }
    let mut carriers: Vec<CarrierStats> = carriers
        .iter()
        .map(|(name, acc)| CarrierStats {
            carrier: (!name.is_empty()).then(|| name.clone()),
            stats: acc.stats(),
            top_error_codes: acc.top(),
        })
        .filter(|c| c.stats.recipients > 0)
        .collect();
    carriers.sort_by(|a, b| {
        b.stats
            .recipients
            .cmp(&a.stats.recipients)
            .then_with(|| a.carrier.cmp(&b.carrier))
    });
    let mut error_codes: Vec<ErrorCodeStats> = codes
        .iter()
        .map(|(code, acc)| ErrorCodeStats {
            error_code: code.clone(),
            stats: acc.stats(),
            top_carriers: acc.top(),
        })
        .filter(|e| e.stats.failed > 0)
        .collect();
    error_codes.sort_by(|a, b| {
        b.stats
            .failed
            .cmp(&a.stats.failed)
            .then_with(|| a.error_code.cmp(&b.error_code))
    });
    Ok(CarrierReport {
        filter: filter.clone(),
        carriers,
        error_codes,
    })
}

fn pct(v: Option<f64>) -> String {
    v.map_or("–".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

fn ms(l: &Latency) -> String {
    match (l.p50_ms, l.p95_ms) {
        (Some(a), Some(b)) => format!("{a}/{b}"),
        _ => "–".to_owned(),
    }
}

fn top(v: &[Count]) -> String {
    let s: Vec<String> = v
        .iter()
        .take(3)
        .map(|c| {
            format!(
                "{}:{}",
                if c.name.is_empty() { "-" } else { &c.name },
                c.count
            )
        })
        .collect();
    s.join(" ")
}

impl CarrierReport {
    /// The report as two plain-text tables (carriers, then error codes).
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let header = |first: &str, last: &str| {
            format!(
                "{first:<20} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>17} {:>17}  {last}\n",
                "recipients",
                "delivered",
                "failed",
                "pending",
                "delivery",
                "api-only",
                "sent→dlv p50/p95",
                "q→term p50/p95",
            )
        };
        let line = |out: &mut String, name: &str, s: &Stats, tail: String| {
            let _ = writeln!(
                out,
                "{name:<20} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>17} {:>17}  {tail}",
                s.recipients,
                s.delivered,
                s.failed,
                s.pending,
                pct(s.delivery_rate),
                pct(s.status_api_only_share),
                ms(&s.sent_to_delivered),
                ms(&s.queued_to_terminal),
            );
        };
        out.push_str(&header("carrier", "top error codes"));
        for c in &self.carriers {
            line(
                &mut out,
                c.carrier.as_deref().unwrap_or("(unknown)"),
                &c.stats,
                top(&c.top_error_codes),
            );
        }
        out.push('\n');
        out.push_str(&header("error code", "top carriers"));
        for e in &self.error_codes {
            line(&mut out, &e.error_code, &e.stats, top(&e.top_carriers));
        }
        out.push_str(
            "\nlatencies in ms: the upper edge of the histogram bin (4 bins per doubling: the true value is 84-100 % of it); api-only: share of terminal recipients no webhook reported\n",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_quarter_doublings() {
        assert_eq!(latency_bin(-5), 0);
        assert_eq!(latency_bin(0), 0);
        assert_eq!(latency_bin(1), 1);
        // 2^(k-1) <= ms^4 < 2^k
        for ms in [2i64, 3, 7, 8, 1000, 1414, 1415, 60_000, 3_600_000] {
            let b = latency_bin(ms);
            let lo = 2f64.powf(f64::from(b - 1) / 4.0);
            let hi = 2f64.powf(f64::from(b) / 4.0);
            assert!(lo <= ms as f64 && (ms as f64) < hi, "{ms} in bin {b}");
            assert!(bin_edge_ms(b) as f64 >= ms as f64);
            assert!(ms as f64 >= 0.84 * bin_edge_ms(b) as f64 - 1.0);
        }
        assert_eq!(latency_bin(i64::MAX), BINS - 1);
        assert_eq!(latency_bin(4_000_000_000), BINS - 1);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let bins: BTreeMap<i16, i64> = [(10, 50), (20, 45), (30, 5)].into_iter().collect();
        assert_eq!(percentile_bin(&bins, 0.5), Some(10));
        assert_eq!(percentile_bin(&bins, 0.51), Some(20));
        assert_eq!(percentile_bin(&bins, 0.95), Some(20));
        assert_eq!(percentile_bin(&bins, 0.96), Some(30));
        assert_eq!(percentile_bin(&BTreeMap::new(), 0.5), None);
    }

    #[test]
    fn filter_refuses_what_the_rollup_cannot_answer() {
        assert!(Filter::parse(None, Some("2026-05-27T10:00:00Z"), None).is_ok());
        let e = Filter::parse(None, Some("2026-05-27T10:30:00Z"), None).unwrap_err();
        assert!(
            e.contains("whole hours") && e.contains("2026-05-27T10:00:00Z"),
            "{e}"
        );
        assert!(Filter::parse(None, Some("yesterday"), None)
            .unwrap_err()
            .contains("RFC 3339"));
        assert!(Filter::parse(
            None,
            Some("2026-05-27T10:00:00Z"),
            Some("2026-05-27T10:00:00Z")
        )
        .unwrap_err()
        .contains("before"));
        assert!(Filter::parse(Some(""), None, None).is_err());
    }
}
