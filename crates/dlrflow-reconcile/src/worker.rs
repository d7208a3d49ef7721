//! The sweeper loop and the read workers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use dlrflow_events::parse_status_response;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::client::Read;
use crate::jobs::{self, Job, SweepParams};
use crate::limiter::Acquire;
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

/// Sweeps every `reconcile.sweep_interval_ms` until shutdown.
pub(crate) async fn sweeper(inner: Arc<Inner>, shutdown: CancellationToken) {
    let r = &inner.cfg.reconcile;
    let lock_name = format!("dlrflow-reconcile:sweep:{}", inner.cfg.postgres.schema);
    loop {
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
                inner.health.lock().expect("health lock").sweep_error = Some(e.to_string());
            }
        }
        match jobs::backlog(&inner.pool, &r.sources, r).await {
            Ok(b) => telemetry::backlog(&b),
            Err(e) => telemetry::db_error("backlog", &e),
        }
        if !nap(jitter(r.sweep_interval()), &shutdown).await {
            return;
        }
    }
}

/// One read worker: claim the oldest due job, wait for budget, read, write.
pub(crate) async fn worker(inner: Arc<Inner>, index: usize, shutdown: CancellationToken) {
    let owner = format!("{}/{index}", inner.owner);
    let r = &inner.cfg.reconcile;
    let mut grants = 0u64;
    while !shutdown.is_cancelled() {
        if inner.unauthorized().is_some() {
            // Stopped by a 401: only look whether the shared marker is gone.
            match inner.limiter.unauthorized_reason().await {
                Ok(None) => inner.set_unauthorized(None),
                Ok(Some(_)) => {}
                Err(e) => telemetry::redis_error("unauthorized check", &e),
            }
            if !nap(jitter(Duration::from_secs(5)), &shutdown).await {
                return;
            }
            continue;
        }
        let job = match jobs::claim(&inner.pool, &owner, &r.sources, r.lease()).await {
            Ok(Some(job)) => job,
            Ok(None) => {
                if !nap(jitter(r.poll_interval()), &shutdown).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                telemetry::db_error("claim", &e);
                if !nap(jitter(Duration::from_secs(1)), &shutdown).await {
                    return;
                }
                continue;
            }
        };
        process(&inner, &owner, &mut grants, job, &shutdown).await;
    }
}

/// Waits for a grant; `None` means the job was handed back.
async fn wait_for_grant(
    inner: &Inner,
    owner: &str,
    grants: &mut u64,
    job: &Job,
    shutdown: &CancellationToken,
) -> Option<()> {
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
        match inner.limiter.acquire(&member).await {
            Ok(Acquire::Granted { left, .. }) => {
                telemetry::budget_left(left);
                if asked.elapsed() > fresh {
                    // The grant may be older than half the margin by the time the
                    // request leaves: spend it on nothing rather than risk the window.
                    telemetry::grant_dropped();
                    continue;
                }
                return Some(());
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
            Ok(Acquire::Unauthorized { reason }) => {
                inner.set_unauthorized(Some(reason));
                if let Err(e) = jobs::release(&inner.pool, job, owner, Duration::ZERO).await {
                    telemetry::db_error("release", &e);
                }
                return None;
            }
            Err(e) => {
                telemetry::redis_error("acquire", &e);
                nap(jitter(Duration::from_millis(500)), shutdown).await;
            }
        }
    }
}

#[tracing::instrument(skip_all, fields(message_id = %job.message_id, reason = %job.reason, attempts = job.attempts))]
async fn process(
    inner: &Inner,
    owner: &str,
    grants: &mut u64,
    job: Job,
    shutdown: &CancellationToken,
) {
    let r = &inner.cfg.reconcile;
    if wait_for_grant(inner, owner, grants, &job, shutdown)
        .await
        .is_none()
    {
        return;
    }
    let read = inner.client.read(&job.message_id).await;
    telemetry::read(read.outcome());
    let backoff = jitter(r.backoff(u32::try_from(job.attempts).unwrap_or(0).saturating_add(1)));
    let failure = match read {
        Read::Ok(body) => match parse_status_response(&job.source, &body, Utc::now()) {
            Ok(snapshot) if snapshot.message_id != job.message_id => Some(format!(
                "the answer is about message `{}`",
                snapshot.message_id
            )),
            Ok(snapshot) => match write(inner, owner, &job, &snapshot).await {
                Ok(()) => None,
                Err(e) => {
                    tracing::error!(error = ?e, "writing the answer failed");
                    Some(format!("write failed: {e:#}"))
                }
            },
            Err(e) => {
                telemetry::bad_answer(&e);
                Some(format!("unreadable answer: {e}"))
            }
        },
        Read::NotFound => Some("404 not found".to_owned()),
        Read::Failed(e) => {
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
                telemetry::redis_error("mark unauthorized", &e);
            }
            inner.set_unauthorized(Some(reason));
            if let Err(e) = jobs::release(&inner.pool, &job, owner, Duration::ZERO).await {
                telemetry::db_error("release", &e);
            }
            return;
        }
    };
    if let Some(error) = failure {
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

/// Writes the answer and closes the job in one transaction.
async fn write(
    inner: &Inner,
    owner: &str,
    job: &Job,
    snapshot: &dlrflow_events::StatusSnapshot,
) -> anyhow::Result<()> {
    let mut tx = inner.pool.begin().await?;
    let before = jobs::conflicts(&mut tx, &job.message_id).await?;
    let written = crate::store::write_answer(&mut tx, &snapshot.recipients).await?;
    let after = jobs::conflicts(&mut tx, &job.message_id).await?;
    let still_ours = jobs::complete(&mut tx, job, owner, &written.changed).await?;
    tx.commit().await?;
    if !still_ours {
        tracing::warn!("the lease expired during the read; the answer was written anyway");
    }
    telemetry::written(written.changed.len(), before.saturating_sub(after));
    tracing::debug!(
        changed = written.changed.len(),
        recipients = snapshot.recipients.len(),
        "answer written"
    );
    Ok(())
}
