//! The sweeper loop and the read workers.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use chrono::Utc;
use dlrflow_events::parse_status_response;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::client::Read;
use crate::jobs::{self, Job, SweepParams};
use crate::limiter::Acquire;
use crate::redact;
use crate::telemetry;
use crate::Inner;

/// Sleeps for `d` unless `shutdown` comes first; returns false on shutdown.
async fn nap(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// `d` ± 20 %, so replicas do not move in lockstep.
fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::thread_rng().gen_range(0.8..1.2);
    d.mul_f64(f)
}

/// Sweeps every `reconcile.sweep_interval_ms` until shutdown. Errors are
/// retried at the next sweep (and shown by `/readyz`); returning before
/// shutdown is a failure of the process (see `App::run`).
pub(crate) async fn sweeper(inner: Arc<Inner>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let r = &inner.cfg.reconcile;
    let schema = inner.cfg.postgres.schema.as_deref().unwrap_or("public");
    let lock_name = format!("dlrflow-reconcile:sweep:{schema}");
    loop {
        inner.injected_fault("sweeper")?;
        let params = SweepParams {
            sources: &r.sources,
            strict_sources: &r.strict_sources,
            lock_name: &lock_name,
            cfg: r,
        };
        match jobs::sweep(&inner.pool, &params).await {
            Ok(swept) => {
                telemetry::swept(&swept);
                inner.health.lock().expect("health lock").sweep_error = None;
            }
            Err(e) => {
                telemetry::db_error("sweep", &e);
                inner.health.lock().expect("health lock").sweep_error =
                    Some(redact::error_text(&e.to_string()));
            }
        }
        match jobs::backlog(&inner.pool, &r.sources, r).await {
            Ok(b) => telemetry::backlog(&b),
            Err(e) => telemetry::db_error("backlog", &e),
        }
        if !nap(jitter(r.sweep_interval()), &shutdown).await {
            return Ok(());
        }
    }
}

/// One read worker: claim the oldest due job, wait for budget, read, write.
/// Returning before shutdown is a failure of the process (see `App::run`).
pub(crate) async fn worker(
    inner: Arc<Inner>,
    index: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = format!("worker-{index}");
    let owner = format!("{}/{index}", inner.owner);
    let r = &inner.cfg.reconcile;
    let mut grants = 0u64;
    while !shutdown.is_cancelled() {
        inner.injected_fault(&name)?;
        if inner.unauthorized().is_some() {
            // Stopped by a 401: only look whether the shared marker is gone.
            match inner.limiter.unauthorized_reason().await {
                Ok(None) => inner.set_unauthorized(None),
                Ok(Some(_)) => {}
                Err(e) => telemetry::redis_error("unauthorized_check", &e),
            }
            if !nap(jitter(Duration::from_secs(5)), &shutdown).await {
                return Ok(());
            }
            continue;
        }
        if inner.publish_error().is_some() {
            // The last answer was lost to the broker: no job is claimed (and
            // no read spent) until the status topic answers again.
            let probe = dlrflow_runtime::kafka::producer_topic_ready(
                &inner.producer,
                &inner.cfg.kafka.status_topic,
            )
            .await;
            if probe.is_err() {
                if !nap(jitter(Duration::from_secs(1)), &shutdown).await {
                    return Ok(());
                }
                continue;
            }
            inner.set_publish_error(None);
        }
        let job = match jobs::claim(&inner.pool, &owner, &r.sources, r.lease()).await {
            Ok(Some(job)) => job,
            Ok(None) => {
                if !nap(jitter(r.poll_interval()), &shutdown).await {
                    return Ok(());
                }
                continue;
            }
            Err(e) => {
                telemetry::db_error("claim", &e);
                if !nap(jitter(Duration::from_secs(1)), &shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        process(&inner, &owner, &mut grants, job, &shutdown).await;
    }
    Ok(())
}

/// Waits for a grant and returns its name; `None` means the job was handed
/// back.
async fn wait_for_grant(
    inner: &Inner,
    owner: &str,
    grants: &mut u64,
    job: &Job,
    shutdown: &CancellationToken,
) -> Option<String> {
    let r = &inner.cfg.reconcile;
    let started = Instant::now();
    let max_wait = r.lease() / 2;
    let fresh = inner.cfg.budget.safety_margin() / 2;
    loop {
        if shutdown.is_cancelled() || started.elapsed() > max_wait {
            // Someone else (or this worker, later) takes it; no read was made.
            if let Err(e) = jobs::release(&inner.pool, job, owner, Duration::ZERO).await {
                telemetry::db_error("release", &e);
            }
            return None;
        }
        *grants += 1;
        let member = format!("{owner}/{grants}");
        let asked = Instant::now();
        let acquired = inner.limiter.acquire(&member).await;
        if acquired.is_ok() {
            inner.set_redis_error(None);
        }
        match acquired {
            Ok(Acquire::Granted { left, .. }) => {
                telemetry::budget_left(left);
                if asked.elapsed() > fresh {
                    // The grant may be older than half the margin by the time the
                    // request leaves: spend it on nothing rather than risk the window.
                    telemetry::grant_dropped();
                    continue;
                }
                return Some(member);
            }
            Ok(Acquire::Wait { wait, paused }) => {
                if !paused {
                    telemetry::budget_left(0);
                }
                let extra = Duration::from_millis(rand::thread_rng().gen_range(0..25));
                let remaining = max_wait.saturating_sub(started.elapsed());
                nap(
                    (wait + extra).min(remaining + Duration::from_millis(1)),
                    shutdown,
                )
                .await;
            }
            Ok(Acquire::Uninitialized) => {
                // New budget, or Redis lost its log: PostgreSQL knows which.
                // Nothing is granted until it is settled.
                if let Err(e) = initialize_budget(inner, &member).await {
                    tracing::warn!(error = %redact::error_text(&format!("{e:#}")), "could not initialize the budget in Redis");
                    nap(jitter(Duration::from_millis(500)), shutdown).await;
                }
            }
            Ok(Acquire::Unauthorized { reason }) => {
                inner.set_unauthorized(Some(reason));
                if let Err(e) = jobs::release(&inner.pool, job, owner, Duration::ZERO).await {
                    telemetry::db_error("release", &e);
                }
                return None;
            }
            Err(e) => {
                // No budget can be granted: no read. Ask again shortly; the
                // connection is re-established as soon as Redis answers.
                dlrflow_runtime::telemetry::backend_error("redis", "acquire");
                inner.set_redis_error(Some(redact::error_text(&e.to_string())));
                nap(jitter(Duration::from_millis(500)), shutdown).await;
            }
        }
    }
}

/// After [`Acquire::Uninitialized`]: a budget this database has seen before
/// lost its Redis log, and every replica waits the limiter's window; a new
/// one starts at once. Replicas do this one at a time (see `jobs::first_use`):
/// Redis is initialized before the first-use row commits.
async fn initialize_budget(inner: &Inner, epoch: &str) -> anyhow::Result<()> {
    let mut tx = inner.pool.begin().await?;
    let first = jobs::first_use(&mut tx, inner.limiter.name()).await?;
    let hold = inner.limiter.initialize(!first, epoch).await?;
    tx.commit().await?;
    if !hold.is_zero() {
        telemetry::budget_reset(hold);
    }
    Ok(())
}

/// One job, one span (`reconcile job`) with its steps as children: the wait
/// for a grant of the shared budget, the status read, the write.
#[tracing::instrument(
    name = "reconcile job",
    skip_all,
    fields(
        message_id = %job.message_id,
        reason = %job.reason,
        attempts = job.attempts,
        trace_id = tracing::field::Empty
    )
)]
async fn process(
    inner: &Inner,
    owner: &str,
    grants: &mut u64,
    job: Job,
    shutdown: &CancellationToken,
) {
    dlrflow_runtime::otel::record_trace_id(&tracing::Span::current());
    let r = &inner.cfg.reconcile;
    // Checked before the wait (no grant for a settled message) and again
    // right before the read: the wait can be long, and the webhooks may
    // settle the message meanwhile.
    if !needed(inner, owner, &job, None).await {
        return;
    }
    let Some(grant) = wait_for_grant(inner, owner, grants, &job, shutdown)
        .instrument(tracing::info_span!("grant wait"))
        .await
    else {
        return;
    };
    if !needed(inner, owner, &job, Some(&grant)).await {
        return;
    }
    let read = inner
        .client
        .read(&job.message_id)
        .instrument(tracing::info_span!(
            "status read",
            otel.kind = "client",
            http.request.method = "GET"
        ))
        .await;
    telemetry::read(read.outcome());
    let read_at = chrono::DateTime::<Utc>::from_timestamp_millis(Utc::now().timestamp_millis())
        .unwrap_or_else(Utc::now);
    let backoff = jitter(r.backoff(u32::try_from(job.attempts).unwrap_or(0).saturating_add(1)));
    let failure = match read {
        // The read time, as the status record's timestamp (ms) will say it.
        Read::Ok(body) => match parse_status_response(&job.source, &body, read_at) {
            Ok(snapshot) if snapshot.message_id != job.message_id => Some(format!(
                "the answer is about message `{}`",
                snapshot.message_id
            )),
            Ok(_) => match publish(inner, owner, &job, &body, read_at)
                .instrument(tracing::info_span!(
                    "publish",
                    otel.kind = "producer",
                    messaging.system = "kafka",
                    messaging.destination.name = inner.cfg.kafka.status_topic.as_str()
                ))
                .await
            {
                Published::Done => None,
                Published::Transient(e) => Some(format!("publishing the answer failed: {e}")),
                Published::Permanent { reason, error } => {
                    let error = redact::error_text(&format!(
                        "the answer can never be published ({reason}): {error}"
                    ));
                    telemetry::job_failed(&job.message_id, &reason, &error);
                    if let Err(e) = jobs::fail(&inner.pool, &job, owner, &error).await {
                        // The lease ends and the job comes back: no worse than a retry.
                        telemetry::db_error("fail", &e);
                    }
                    return;
                }
            },
            Err(e) => {
                telemetry::bad_answer(&e);
                Some(format!("unreadable answer: {e}"))
            }
        },
        Read::NotFound => Some("404 not found".to_owned()),
        Read::Failed(e) => {
            let e = redact::error_text(&e);
            tracing::warn!(error = %e, "status read failed");
            Some(e)
        }
        Read::RateLimited(retry_after) => {
            let pause = retry_after.unwrap_or_else(|| inner.cfg.budget.window());
            telemetry::rate_limited(pause);
            if let Err(e) = inner.limiter.pause(pause).await {
                telemetry::redis_error("pause", &e);
            }
            if let Err(e) = jobs::retry_later(
                &inner.pool,
                &job,
                owner,
                "429 rate limited",
                pause,
                false,
                r.give_up_after(),
            )
            .await
            {
                telemetry::db_error("retry_later", &e);
            }
            return;
        }
        Read::Unauthorized(code) => {
            let reason = format!(
                "status API answered {code} for API key {}: check status_api.api_key",
                inner.key_id
            );
            telemetry::unauthorized(&reason);
            if let Err(e) = inner.limiter.mark_unauthorized(&reason).await {
                telemetry::redis_error("mark_unauthorized", &e);
            }
            inner.set_unauthorized(Some(reason));
            if let Err(e) = jobs::release(&inner.pool, &job, owner, Duration::ZERO).await {
                telemetry::db_error("release", &e);
            }
            return;
        }
    };
    if let Some(error) = failure {
        let error = redact::error_text(&error);
        match jobs::retry_later(
            &inner.pool,
            &job,
            owner,
            &error,
            backoff,
            true,
            r.give_up_after(),
        )
        .await
        {
            Ok(true) => telemetry::gave_up(&job.message_id, &error),
            Ok(false) => {}
            Err(e) => telemetry::db_error("retry_later", &e),
        }
    }
}

/// Re-checks `job` (see `jobs::still_needed`). When it is no longer needed,
/// closes it without a read, gives `grant` back, and returns false. A failed
/// check reads anyway: a wasted read is better than a missed one.
async fn needed(inner: &Inner, owner: &str, job: &Job, grant: Option<&str>) -> bool {
    let why = match jobs::still_needed(&inner.pool, job, &inner.cfg.reconcile).await {
        Ok(None) => return true,
        Ok(Some(why)) => why,
        Err(e) => {
            telemetry::db_error("recheck", &e);
            return true;
        }
    };
    if let Some(member) = grant {
        if let Err(e) = inner.limiter.refund(member).await {
            // The grant stays spent: the budget is only stricter.
            telemetry::redis_error("refund", &e);
        }
    }
    if let Err(e) = jobs::skip(&inner.pool, job, owner, why).await {
        // The lease ends and the job comes back: checked again then.
        telemetry::db_error("skip", &e);
    }
    telemetry::read_skipped(&job.message_id, why.as_str());
    false
}

/// How publishing an answer ended.
enum Published {
    Done,
    /// Not acknowledged in time, or refused for now: read again later.
    Transient(String),
    /// Can never succeed (the broker refuses the record itself): the job is
    /// marked failed.
    Permanent {
        reason: String,
        error: String,
    },
}

/// Publishes the answer (exact bytes) to `kafka.status_topic` and waits for
/// the broker's `acks=all` acknowledgement; only then is the job closed.
/// dlrflow-state applies it from there like any other record, so the state
/// stays a function of the log.
async fn publish(
    inner: &Inner,
    owner: &str,
    job: &Job,
    body: &[u8],
    read_at: chrono::DateTime<Utc>,
) -> Published {
    let trace = dlrflow_runtime::otel::inject(&tracing::Span::current());
    match crate::store::publish_answer(inner, job, body, read_at, trace).await {
        Ok(()) => {}
        Err(crate::store::PublishError::Permanent(e)) => {
            return Published::Permanent {
                reason: "record_refused".to_owned(),
                error: e,
            }
        }
        Err(crate::store::PublishError::Transient(e)) => {
            telemetry::publish_error(&e);
            inner.set_publish_error(Some(e.clone()));
            return Published::Transient(e);
        }
    }
    inner.set_publish_error(None);
    match jobs::complete(&inner.pool, job, owner, read_at).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!("the lease expired during the read; the answer was published anyway")
        }
        // The answer is in the log: a job left open is read again at worst.
        Err(e) => telemetry::db_error("complete", &e),
    }
    telemetry::published();
    Published::Done
}
