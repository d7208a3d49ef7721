//! Compares a run's ground truth with dlrflow's read API
//! (`GET {api}/v1/messages/{message_id}`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::truth::{FinalStatus, Truth, TruthRecipient};

/// Settings of a verification.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Keep polling the unmatched recipients until this deadline (zero = one pass).
    pub wait: Duration,
    /// Pause between passes.
    pub poll_interval: Duration,
    /// Read API requests in flight.
    pub concurrency: usize,
    pub request_timeout: Duration,
    /// Print a progress line to stderr after each pass.
    pub progress: bool,
    /// Sent as `Authorization: Bearer …` (the read API's key).
    pub api_key: Option<String>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            wait: Duration::ZERO,
            poll_interval: Duration::from_secs(1),
            concurrency: 16,
            request_timeout: Duration::from_secs(10),
            progress: false,
            api_key: None,
        }
    }
}

/// The outcome for one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", content = "detail", rename_all = "snake_case")]
pub enum Verdict {
    Match,
    /// Found, but fields differ (one line per difference).
    Wrong(Vec<String>),
    /// Message or recipient not found (or the API failed): the reason.
    Missing(String),
}

/// One recipient's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct RecipientCheck {
    pub message_id: String,
    pub recipient: String,
    pub expected: FinalStatus,
    pub verdict: Verdict,
}

/// Counts for one true status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VerifyCounts {
    pub matching: usize,
    pub wrong: usize,
    pub missing: usize,
}

/// The result of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub checks: Vec<RecipientCheck>,
    pub passes: u32,
}

impl VerifyReport {
    pub fn counts(&self) -> VerifyCounts {
        let mut c = VerifyCounts::default();
        for check in &self.checks {
            bump(&mut c, &check.verdict);
        }
        c
    }

    pub fn counts_by_status(&self) -> BTreeMap<FinalStatus, VerifyCounts> {
        let mut map: BTreeMap<FinalStatus, VerifyCounts> = BTreeMap::new();
        for check in &self.checks {
            bump(map.entry(check.expected).or_default(), &check.verdict);
        }
        map
    }

    pub fn matching(&self) -> usize {
        self.counts().matching
    }

    pub fn wrong(&self) -> usize {
        self.counts().wrong
    }

    pub fn missing(&self) -> usize {
        self.counts().missing
    }

    /// True when every recipient matched.
    pub fn is_ok(&self) -> bool {
        self.checks.iter().all(|c| c.verdict == Verdict::Match)
    }

    /// A summary table by true status, then up to `max_rows` differences.
    pub fn table(&self, max_rows: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<12} {:>9} {:>9} {:>9}",
            "true status", "matching", "wrong", "missing"
        );
        for (status, c) in self.counts_by_status() {
            let _ = writeln!(
                s,
                "{:<12} {:>9} {:>9} {:>9}",
                status.as_str(),
                c.matching,
                c.wrong,
                c.missing
            );
        }
        let t = self.counts();
        let _ = writeln!(
            s,
            "{:<12} {:>9} {:>9} {:>9}",
            "TOTAL", t.matching, t.wrong, t.missing
        );
        let diffs: Vec<&RecipientCheck> = self
            .checks
            .iter()
            .filter(|c| c.verdict != Verdict::Match)
            .collect();
        for c in diffs.iter().take(max_rows) {
            let detail = match &c.verdict {
                Verdict::Wrong(d) => format!("WRONG   {}", d.join("; ")),
                Verdict::Missing(why) => format!("MISSING {why}"),
                Verdict::Match => continue,
            };
            let _ = writeln!(
                s,
                "  {} {} (true {}): {}",
                c.message_id,
                c.recipient,
                c.expected.as_str(),
                detail
            );
        }
        if diffs.len() > max_rows {
            let _ = writeln!(s, "  ... and {} more", diffs.len() - max_rows);
        }
        s
    }
}

fn bump(c: &mut VerifyCounts, v: &Verdict) {
    match v {
        Verdict::Match => c.matching += 1,
        Verdict::Wrong(_) => c.wrong += 1,
        Verdict::Missing(_) => c.missing += 1,
    }
}

/// One pass against `api_base`, no waiting.
pub async fn verify(truth: &Truth, api_base: &str) -> anyhow::Result<VerifyReport> {
    verify_with(truth, api_base, &VerifyOptions::default()).await
}

/// Verifies, re-checking only the unmatched messages until all match or
/// `opts.wait` has passed.
pub async fn verify_with(
    truth: &Truth,
    api_base: &str,
    opts: &VerifyOptions,
) -> anyhow::Result<VerifyReport> {
    let client = reqwest::Client::builder()
        .timeout(opts.request_timeout)
        .build()?;
    let base = api_base.trim_end_matches('/');
    let by_message = truth.by_message();
    let deadline = Instant::now() + opts.wait;
    let mut results: HashMap<(String, String), Verdict> = HashMap::new();
    let mut pending: Vec<&str> = by_message.keys().copied().collect();
    let mut passes = 0u32;
    loop {
        passes += 1;
        let fetched: Vec<(&str, Result<Option<Value>, String>)> =
            stream::iter(pending.iter().copied())
                .map(|id| {
                    let (client, key) = (&client, opts.api_key.as_deref());
                    async move { (id, fetch(client, base, key, id).await) }
                })
                .buffer_unordered(opts.concurrency.max(1))
                .collect()
                .await;
        let mut still = Vec::new();
        for (id, answer) in fetched {
            let mut all_match = true;
            for t in &by_message[id] {
                let verdict = judge(t, &answer);
                all_match &= verdict == Verdict::Match;
                results.insert((t.message_id.clone(), t.recipient.clone()), verdict);
            }
            if !all_match {
                still.push(id);
            }
        }
        still.sort_unstable();
        pending = still;
        if opts.progress {
            let total = truth.recipients.len();
            let unmatched: usize = pending.iter().map(|id| by_message[id].len()).sum();
            eprintln!(
                "[verify pass {passes}] {}/{} recipients match, {} messages unmatched",
                total - unmatched,
                total,
                pending.len()
            );
        }
        if pending.is_empty() || Instant::now() + opts.poll_interval > deadline {
            break;
        }
        tokio::time::sleep(opts.poll_interval).await;
    }
    let checks = truth
        .recipients
        .iter()
        .map(|t| RecipientCheck {
            message_id: t.message_id.clone(),
            recipient: t.recipient.clone(),
            expected: t.status,
            verdict: results
                .remove(&(t.message_id.clone(), t.recipient.clone()))
                .unwrap_or_else(|| Verdict::Missing("not checked".to_owned())),
        })
        .collect();
    Ok(VerifyReport { checks, passes })
}

/// The message with all its recipients, following the read API's pages
/// (`next_after`).
async fn fetch(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    id: &str,
) -> Result<Option<Value>, String> {
    let url = format!("{base}/v1/messages/{id}");
    let mut message: Option<Value> = None;
    let mut after: Option<String> = None;
    // A key over its rate is told to wait; ten waits in a row is a failure.
    let mut limited = 0;
    loop {
        let mut req = client
            .get(&url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.map_err(|e| format!("GET {url}: {e}"))?;
        let page: Value = match resp.status().as_u16() {
            404 => return Ok(None),
            // Over the key's rate: wait as told (at most 5 s) and ask again.
            429 if limited < 10 => {
                limited += 1;
                let wait = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1)
                    .min(5);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            200 => resp
                .json()
                .await
                .map_err(|e| format!("GET {url}: bad JSON: {e}"))?,
            code => return Err(format!("GET {url}: HTTP {code}")),
        };
        limited = 0;
        after = page["next_after"].as_str().map(str::to_owned);
        match &mut message {
            None => message = Some(page),
            Some(m) => {
                let more = page["recipients"].as_array().cloned().unwrap_or_default();
                if let Some(all) = m["recipients"].as_array_mut() {
                    all.extend(more);
                }
            }
        }
        if after.is_none() {
            return Ok(message);
        }
    }
}

/// Digits only, so `+243…` and `243…` compare equal.
fn phone_key(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

fn str_field<'a>(v: &'a Value, names: &[&str]) -> Option<&'a Value> {
    names
        .iter()
        .find_map(|n| v.get(*n))
        .filter(|v| !v.is_null())
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn judge(t: &TruthRecipient, answer: &Result<Option<Value>, String>) -> Verdict {
    let body = match answer {
        Err(e) => return Verdict::Missing(e.clone()),
        Ok(None) => return Verdict::Missing("message 404".to_owned()),
        Ok(Some(b)) => b,
    };
    let want = phone_key(&t.recipient);
    let found = body
        .get("recipients")
        .and_then(Value::as_array)
        .and_then(|rs| {
            rs.iter().find(|r| {
                str_field(r, &["recipient", "recipient_phone", "msisdn"])
                    .is_some_and(|p| phone_key(&as_text(p)) == want)
            })
        });
    let Some(r) = found else {
        return Verdict::Missing("recipient not in message".to_owned());
    };
    let mut diffs = Vec::new();
    let status = str_field(r, &["status"]).map(as_text).unwrap_or_default();
    if status != t.status.as_str() {
        diffs.push(format!("status {status:?} != {:?}", t.status.as_str()));
    }
    let (field, want_at) = match t.status {
        FinalStatus::Delivered => ("delivered_at", t.delivered_at),
        FinalStatus::Failed => ("failed_at", t.failed_at),
    };
    if let Some(want_at) = want_at {
        let got = str_field(r, &[field]).map(as_text);
        let parsed = got
            .as_deref()
            .and_then(|g| DateTime::parse_from_rfc3339(g).ok())
            .map(|d| d.with_timezone(&Utc));
        if parsed != Some(want_at) {
            diffs.push(format!(
                "{field} {:?} != {:?}",
                got.unwrap_or_else(|| "null".to_owned()),
                crate::lisoloo::fmt_ts(want_at)
            ));
        }
    }
    if let Some(code) = &t.error_code {
        let got = str_field(r, &["error_code"]).map(as_text);
        if got.as_deref() != Some(code.as_str()) {
            diffs.push(format!("error_code {got:?} != {code:?}"));
        }
    }
    if diffs.is_empty() {
        Verdict::Match
    } else {
        Verdict::Wrong(diffs)
    }
}
