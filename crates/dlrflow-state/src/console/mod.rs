//! The operator page: `/console` on the admin listener (never the public
//! one), HTML rendered by the server, no JavaScript needed.
//!
//! * `/console` — a send's funnel over a time window (recipients first seen
//!   in it, by status), the silent non-terminal recipients, the open
//!   reconcile jobs, the DLQ's newest records by reason with a replay button
//!   each, the status-API budget in use, and each partition's lag;
//! * `/console/message?id=…` — one message: each recipient's timeline (every
//!   event, its source, the gateway's time beside the arrival time, what it
//!   did), the copies dropped as duplicates, the status reads;
//! * `POST /console/dlq/replay` — sends one DLQ record back to the topic it
//!   came from ([`crate::replay::replay_one`]).
//!
//! ## Who may see it
//!
//! The page shows phone numbers and can replay records, so it needs a read
//! API key that may read every source (`sources = ["*"]`), entered once on
//! `/console/login` and kept in an `HttpOnly`, `SameSite=Strict` cookie
//! scoped to `/console` (with `api.open = true` there is no login, as for
//! the read API). Each page load takes one request from the key's rate.
//! A replay is a `POST` that must come from the page itself: with a
//! `Sec-Fetch-Site` or `Origin` header, they must say same origin.

pub mod data;
mod page;

use std::sync::Arc;

use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use dlrflow_runtime::settings::RedisConnection;
use rdkafka::producer::FutureProducer;
use serde::Deserialize;
use sqlx::PgPool;

use crate::access::{Access, Caller, Refusal};
use crate::config::{Config, ConsoleConfig};

pub use data::{Budget, DlqRecord, Funnel, MessageView, Progress, BUDGET_WINDOW};

/// The cookie holding the operator's key.
const COOKIE: &str = "dlrflow_console";

/// What the page's handlers share.
#[derive(Clone)]
pub struct ConsoleState {
    pub pool: PgPool,
    pub redis: RedisConnection,
    pub access: Arc<Access>,
    /// For the DLQ reader and replays.
    pub cfg: Arc<Config>,
    pub producer: FutureProducer,
}

impl ConsoleState {
    fn settings(&self) -> &ConsoleConfig {
        &self.cfg.console
    }
}

/// The page's routes, for [`dlrflow_runtime::service::Service::with_admin_routes`].
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/console", get(overview))
        .route("/console/message", get(message))
        .route("/console/dlq/replay", post(replay))
        .route("/console/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .with_state(state)
        .layer(axum::middleware::map_response(harden))
}

/// Every answer of the page: never cached (it shows phone numbers), never
/// framed (clickjacking of the replay button), no script, forms only to
/// itself.
async fn harden(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (name, value) in [
        ("cache-control", "no-store"),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
        (
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    ] {
        h.insert(name, header::HeaderValue::from_static(value));
    }
    r
}

/// Why a request does not get the page.
enum Denied {
    /// No or an unknown key: the login form.
    Login,
    /// A key that may not read every source.
    Scoped(String),
    RateLimited(std::time::Duration),
    /// No key is configured at all.
    Closed,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Login => Redirect::to("/console/login").into_response(),
            Denied::Scoped(id) => (
                StatusCode::FORBIDDEN,
                Html(page::notice(
                    "Not allowed",
                    &format!("The key {id} may read only some sources; the operator page needs a key with sources = [\"*\"]."),
                )),
            )
                .into_response(),
            Denied::RateLimited(wait) => (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, wait.as_secs().max(1).to_string())],
                Html(page::notice("Too many requests", "This key's rate is used up; retry in a moment.")),
            )
                .into_response(),
            Denied::Closed => (
                StatusCode::UNAUTHORIZED,
                Html(page::notice(
                    "No keys",
                    "The read API has no keys, so nobody can sign in: add an [[api.keys]] entry with sources = [\"*\"] (dlrflow-state api-key).",
                )),
            )
                .into_response(),
        }
    }
}

/// The key in the request's cookie, if any.
fn cookie_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn check_key(access: &Access, key: Option<&str>) -> Result<Caller, Denied> {
    if access.is_closed() {
        return Err(Denied::Closed);
    }
    let bearer = key.map(|k| format!("Bearer {k}"));
    match access.admit(bearer.as_deref().map(str::as_bytes)) {
        Ok(caller) if caller.sources().is_none() => Ok(caller),
        Ok(caller) => Err(Denied::Scoped(caller.id().to_owned())),
        Err(Refusal::Unauthenticated) => Err(Denied::Login),
        Err(Refusal::RateLimited(wait)) => Err(Denied::RateLimited(wait)),
    }
}

fn admit(s: &ConsoleState, headers: &HeaderMap) -> Result<Caller, Denied> {
    check_key(&s.access, cookie_key(headers).as_deref())
}

/// A state-changing request must come from the page: browsers send
/// `Sec-Fetch-Site` (and `Origin` on a POST); when present they must say
/// the same origin. (The cookie is `SameSite=Strict` as well.)
fn same_origin(headers: &HeaderMap) -> bool {
    let site_ok = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v == "same-origin" || v == "none");
    let origin_ok = match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority == host),
        (Some(_), None) => false,
        (None, _) => true,
    };
    site_ok && origin_ok
}

/// `/console`'s query.
#[derive(Debug, Default, Deserialize)]
pub struct OverviewQuery {
    /// Only this source (tenant).
    pub source: Option<String>,
    /// The window's start and end (RFC 3339); by default the last
    /// `console.window_hours`.
    pub from: Option<String>,
    pub to: Option<String>,
    /// After a replay: where the record went.
    pub replayed: Option<String>,
}

/// The funnel's window from the query.
fn window(q: &OverviewQuery, default_hours: u32) -> Result<(DateTime<Utc>, DateTime<Utc>), String> {
    let parse = |name: &str, v: &Option<String>| -> Result<Option<DateTime<Utc>>, String> {
        match v.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => dlrflow_events::parse_timestamp(v).map(Some).ok_or_else(|| {
                format!("{name}: not a time (RFC 3339, e.g. 2026-12-06T10:00:00Z): {v}")
            }),
        }
    };
    let to = parse("to", &q.to)?.unwrap_or_else(Utc::now);
    let from = parse("from", &q.from)?
        .unwrap_or_else(|| to - chrono::Duration::hours(i64::from(default_hours)));
    if from >= to {
        return Err("from must be before to".to_owned());
    }
    Ok((from, to))
}

/// The end of `t`'s hour, or `t` when it is on the hour.
fn hour_ceil(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = crate::carriers::hour_of(t);
    if floor == t {
        t
    } else {
        floor + chrono::Duration::hours(1)
    }
}

async fn overview(
    State(s): State<ConsoleState>,
    headers: HeaderMap,
    Query(q): Query<OverviewQuery>,
) -> Response {
    if let Err(d) = admit(&s, &headers) {
        return d.into_response();
    }
    let settings = s.settings();
    let (from, to) = match window(&q, settings.window_hours) {
        Ok(w) => w,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Html(page::notice("Bad window", &e)),
            )
                .into_response()
        }
    };
    let source = q.source.as_deref().map(str::trim).filter(|v| !v.is_empty());
    let carrier_filter = crate::carriers::Filter {
        sources: source.map(|s| vec![s.to_owned()]),
        from: Some(crate::carriers::hour_of(from)),
        to: Some(hour_ceil(to)),
    };
    let (funnel, stuck, jobs, progress, budgets, dlq, carriers) = tokio::join!(
        data::funnel(&s.pool, source, from, to, settings.query_timeout()),
        data::stuck(
            &s.pool,
            settings.stuck_after(),
            settings.list_limit,
            settings.query_timeout()
        ),
        data::open_jobs(&s.pool, settings.list_limit),
        data::progress(&s.pool),
        data::budgets(&s.pool, &s.redis),
        data::dlq_recent(&s.cfg, settings.dlq_per_partition),
        crate::carriers::report(&s.pool, &carrier_filter),
    );
    let view = page::Overview {
        funnel: funnel.map_err(|e| data::explain(&e)),
        stuck: stuck.map_err(|e| data::explain(&e)),
        stuck_after: settings.stuck_after(),
        jobs: jobs.map_err(|e| e.to_string()),
        progress: progress.map_err(|e| e.to_string()),
        budgets: budgets.map_err(|e| format!("{e:#}")),
        budget_limit: settings.status_budget_per_minute,
        dlq: dlq.map_err(|e| format!("{e:#}")),
        carriers: carriers.map_err(|e| data::explain(&e)),
        replayed: q.replayed.clone(),
        query: &q,
    };
    Html(page::overview(&view)).into_response()
}

#[derive(Debug, Deserialize)]
struct MessageQuery {
    id: Option<String>,
}

async fn message(
    State(s): State<ConsoleState>,
    headers: HeaderMap,
    Query(q): Query<MessageQuery>,
) -> Response {
    if let Err(d) = admit(&s, &headers) {
        return d.into_response();
    }
    let id = q.id.as_deref().map(str::trim).unwrap_or_default();
    if id.is_empty() {
        return Redirect::to("/console").into_response();
    }
    if crate::api::check_id("message_id", id).is_err() {
        return (
            StatusCode::BAD_REQUEST,
            Html(page::notice(
                "Not a message id",
                "dlrflow stores no message with such an id.",
            )),
        )
            .into_response();
    }
    match data::message(&s.pool, id).await {
        Ok(Some(view)) => Html(page::message(&view)).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Html(page::notice("Not found", &format!("No message {id}."))),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Html(page::notice("Database unavailable", &e.to_string())),
        )
            .into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct ReplayForm {
    partition: i32,
    offset: i64,
}

async fn replay(
    State(s): State<ConsoleState>,
    headers: HeaderMap,
    Form(f): Form<ReplayForm>,
) -> Response {
    if let Err(d) = admit(&s, &headers) {
        return d.into_response();
    }
    if !same_origin(&headers) {
        return (
            StatusCode::FORBIDDEN,
            Html(page::notice(
                "Refused",
                "A replay must be sent from the operator page itself.",
            )),
        )
            .into_response();
    }
    match crate::replay::replay_one(&s.cfg, &s.producer, f.partition, f.offset).await {
        Ok(done) => {
            tracing::info!(
                target: "dlrflow::audit",
                route = "console_replay",
                dlq_partition = f.partition,
                dlq_offset = f.offset,
                topic = %done.topic,
                partition = done.partition,
                offset = done.offset,
                "DLQ record replayed from the operator page"
            );
            metrics::counter!("dlrflow_state_console_replays_total").increment(1);
            let to = format!(
                "/console?replayed={}%2F{}%2F{}#dlq",
                done.topic, done.partition, done.offset
            );
            Redirect::to(&to).into_response()
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            Html(page::notice("Replay failed", &format!("{e:#}"))),
        )
            .into_response(),
    }
}

async fn login_form(State(s): State<ConsoleState>) -> Response {
    if s.access.is_closed() {
        return Denied::Closed.into_response();
    }
    Html(page::login(None)).into_response()
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    key: String,
}

async fn login(State(s): State<ConsoleState>, Form(f): Form<LoginForm>) -> Response {
    let key = f.key.trim();
    match check_key(&s.access, Some(key)) {
        Ok(_) => (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, "/console".to_owned()),
                (
                    header::SET_COOKIE,
                    format!("{COOKIE}={key}; Path=/console; HttpOnly; SameSite=Strict"),
                ),
            ],
        )
            .into_response(),
        Err(Denied::Login) => (
            StatusCode::UNAUTHORIZED,
            Html(page::login(Some("Unknown key."))),
        )
            .into_response(),
        Err(d) => d.into_response(),
    }
}

async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/console/login".to_owned()),
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0"),
            ),
        ],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_key_comes_from_its_cookie_only() {
        let h = headers(&[("cookie", "a=1; dlrflow_console=dlrk_x ; b=2")]);
        assert_eq!(cookie_key(&h).as_deref(), Some("dlrk_x"));
        assert_eq!(
            cookie_key(&headers(&[("cookie", "dlrflow_console=")])),
            None
        );
        assert_eq!(cookie_key(&headers(&[("cookie", "other=dlrk_x")])), None);
    }

    #[test]
    fn a_replay_from_another_site_is_refused() {
        assert!(same_origin(&headers(&[])));
        assert!(same_origin(&headers(&[
            ("sec-fetch-site", "same-origin"),
            ("origin", "http://127.0.0.1:9081"),
            ("host", "127.0.0.1:9081"),
        ])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&headers(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:9081"),
        ])));
    }

    #[test]
    fn the_carrier_table_covers_the_whole_hours_around_the_window() {
        let t = |s: &str| dlrflow_events::parse_timestamp(s).unwrap();
        assert_eq!(
            crate::carriers::hour_of(t("2026-12-06T10:59:59.9Z")),
            t("2026-12-06T10:00:00Z")
        );
        assert_eq!(
            hour_ceil(t("2026-12-06T10:00:00.001Z")),
            t("2026-12-06T11:00:00Z")
        );
        assert_eq!(
            hour_ceil(t("2026-12-06T10:00:00Z")),
            t("2026-12-06T10:00:00Z")
        );
    }

    #[test]
    fn the_window_defaults_to_the_last_hours_and_refuses_nonsense() {
        let q = OverviewQuery::default();
        let (from, to) = window(&q, 24).unwrap();
        assert_eq!((to - from).num_hours(), 24);
        let q = OverviewQuery {
            from: Some("2026-12-06T10:00:00Z".into()),
            to: Some("2026-12-06T09:00:00Z".into()),
            ..Default::default()
        };
        assert!(window(&q, 24).unwrap_err().contains("before"));
        let q = OverviewQuery {
            from: Some("yesterday".into()),
            ..Default::default()
        };
        assert!(window(&q, 24).unwrap_err().contains("RFC 3339"));
    }
}
