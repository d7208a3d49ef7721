//! One function per thing worth counting: each logs it and bumps its metric.

use std::time::Duration;

use crate::jobs::{Backlog, Swept};
use crate::redact;

pub(crate) fn read(outcome: &'static str) {
    metrics::counter!("dlrflow_reconcile_reads_total", "outcome" => outcome).increment(1);
}

/// A job closed without its read: re-checked, its message no longer needed
/// it (`why`: `settled`, or `consumer_lag` while dlrflow-state lags past the
/// deadline).
pub(crate) fn read_skipped(message_id: &str, why: &'static str) {
    tracing::info!(
        message_id,
        why,
        "status read not needed; job closed without it"
    );
    metrics::counter!("dlrflow_reconcile_reads_skipped_total", "why" => why).increment(1);
}

pub(crate) fn budget_left(left: u32) {
    metrics::gauge!("dlrflow_reconcile_budget_left").set(f64::from(left));
}

pub(crate) fn grant_dropped() {
    tracing::warn!("a budget grant arrived too late to be used safely; dropped");
    metrics::counter!("dlrflow_reconcile_grants_dropped_total").increment(1);
}

pub(crate) fn swept(s: &Swept) {
    if !s.ran {
        return;
    }
    consumer_lag(s.lag_ms);
    for (trigger, n) in [
        ("stuck", s.stuck),
        ("flagged", s.flagged),
        ("strict", s.strict),
        ("incomplete", s.incomplete),
    ] {
        if n > 0 {
            metrics::counter!("dlrflow_reconcile_jobs_opened_total", "trigger" => trigger)
                .increment(n);
        }
    }
    if s.stuck + s.flagged + s.strict + s.incomplete > 0 {
        tracing::info!(
            stuck = s.stuck,
            flagged = s.flagged,
            strict = s.strict,
            incomplete = s.incomplete,
            "sweep opened jobs"
        );
    }
}

/// The consumer lag the sweep saw (`-1`: no state consumer reported one).
pub(crate) fn consumer_lag(lag_ms: Option<i64>) {
    metrics::gauge!("dlrflow_reconcile_state_lag_seconds")
        .set(lag_ms.map_or(-1.0, |ms| ms as f64 / 1000.0));
}

pub(crate) fn backlog(b: &Backlog) {
    metrics::gauge!("dlrflow_reconcile_backlog").set(b.open_jobs as f64);
    metrics::gauge!("dlrflow_reconcile_backlog_due").set(b.due_jobs as f64);
    metrics::gauge!("dlrflow_reconcile_oldest_job_age_seconds").set(b.oldest_open_job_secs);
    metrics::gauge!("dlrflow_reconcile_oldest_stuck_age_seconds").set(b.oldest_stuck_secs);
}

/// An answer is in the status topic (acknowledged) and its job closed.
pub(crate) fn published() {
    metrics::counter!("dlrflow_reconcile_answers_published_total").increment(1);
}

pub(crate) fn rate_limited(pause: Duration) {
    tracing::warn!(
        pause_ms = pause.as_millis() as u64,
        "status API answered 429: every replica pauses"
    );
    metrics::counter!("dlrflow_reconcile_rate_limited_total").increment(1);
}

pub(crate) fn unauthorized(reason: &str) {
    tracing::error!(%reason, "status API refused the key: reads with it stop on every replica");
    metrics::counter!("dlrflow_reconcile_unauthorized_total").increment(1);
}

pub(crate) fn unauthorized_state(on: bool) {
    metrics::gauge!("dlrflow_reconcile_unauthorized").set(if on { 1.0 } else { 0.0 });
}

pub(crate) fn bad_answer(e: &dlrflow_events::ParseError) {
    tracing::warn!(error = %e, "status API answer could not be parsed");
    metrics::counter!("dlrflow_reconcile_bad_answers_total").increment(1);
}

pub(crate) fn gave_up(message_id: &str, error: &str) {
    tracing::warn!(
        message_id,
        error = %redact::error_text(error),
        "giving up on a message: reconcile.give_up_after_secs passed"
    );
    metrics::counter!("dlrflow_reconcile_gave_up_total").increment(1);
}

pub(crate) fn db_error(stage: &'static str, e: &sqlx::Error) {
    let (class, _) = crate::store::classify_sqlx(e);
    tracing::error!(stage, class = class.as_str(), error = %redact::error_text(&e.to_string()), "PostgreSQL error");
    dlrflow_runtime::telemetry::backend_error("postgres", stage);
}

pub(crate) fn redis_error(stage: &'static str, e: &redis::RedisError) {
    tracing::error!(stage, error = %redact::error_text(&e.to_string()), "Redis error");
    dlrflow_runtime::telemetry::backend_error("redis", stage);
}

pub(crate) fn redis_up(up: bool) {
    metrics::gauge!("dlrflow_reconcile_redis_up").set(if up { 1.0 } else { 0.0 });
}

pub(crate) fn budget_reset(hold: Duration) {
    tracing::warn!(
        hold_ms = hold.as_millis() as u64,
        "the limiter's log of recent reads was lost (Redis restarted empty or was flushed): \
         no replica reads until one window has passed"
    );
    metrics::counter!("dlrflow_reconcile_budget_resets_total").increment(1);
}

/// Publishing an answer failed for now; `error` is already scrubbed.
pub(crate) fn publish_error(error: &str) {
    tracing::warn!(
        error,
        "publishing the answer failed; the message is read again later"
    );
    dlrflow_runtime::telemetry::backend_error("kafka", "publish");
}

pub(crate) fn job_failed(message_id: &str, reason: &str, error: &str) {
    tracing::error!(
        message_id,
        reason,
        error,
        "the answer can never be published: job marked failed, the others go on"
    );
    metrics::counter!("dlrflow_reconcile_jobs_failed_total", "reason" => reason.to_owned())
        .increment(1);
}
