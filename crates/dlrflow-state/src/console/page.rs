//! The operator page's HTML: one stylesheet inline, every value escaped,
//! tables that scroll inside their own box on a narrow screen. Elements a
//! test (or a script) reads carry `id` or `data-k` attributes.

use std::fmt::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::data::{Budget, DlqRecord, Funnel, Job, MessageView, Progress, Stuck, TimelineEvent};
use super::OverviewQuery;

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value.
fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const STYLE: &str = r#"
:root{--fg:#1d232a;--muted:#5b6672;--line:#d9dee3;--bg:#f6f7f9;--card:#fff;--ok:#137a3a;--bad:#b42318;--warn:#a15c00;--accent:#1f5fbf}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;padding:.6rem 1rem;background:#17202b;color:#fff}
header a{color:#fff;text-decoration:none;font-weight:600}
header form{display:flex;gap:.4rem;flex:1 1 16rem;max-width:34rem}
header input{flex:1;min-width:0}
main{padding:1rem;max-width:1400px;margin:0 auto}
.grid{display:grid;gap:1rem;grid-template-columns:repeat(auto-fit,minmax(min(100%,34rem),1fr))}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.8rem 1rem;min-width:0}
h1{font-size:1.3rem;margin:.2rem 0 1rem}
h2{font-size:1.05rem;margin:0 0 .6rem}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid var(--line);white-space:nowrap}
th{color:var(--muted);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.wrap{white-space:normal;overflow-wrap:anywhere}
.muted{color:var(--muted)}
.ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(7rem,1fr));gap:.5rem}
.tile{border:1px solid var(--line);border-radius:6px;padding:.4rem .6rem}
.tile b{display:block;font-size:1.3rem;font-variant-numeric:tabular-nums}
.bar{display:flex;height:.7rem;border-radius:4px;overflow:hidden;background:var(--line);margin:.6rem 0}
.bar span{display:block}
input,button,select{font:inherit;padding:.3rem .5rem;border:1px solid var(--line);border-radius:5px}
button{background:var(--accent);color:#fff;border-color:var(--accent);cursor:pointer}
form.inline{display:inline;margin:0}
.notice{border-left:4px solid var(--ok);background:#eaf6ee;padding:.5rem .8rem;margin-bottom:1rem;overflow-wrap:anywhere}
.error{border-left:4px solid var(--bad);background:#fdecea;padding:.5rem .8rem;overflow-wrap:anywhere}
.filters{display:flex;flex-wrap:wrap;gap:.5rem;align-items:end;margin-bottom:.6rem}
.filters label{display:flex;flex-direction:column;font-size:.8rem;color:var(--muted)}
details{margin:.4rem 0}
summary{cursor:pointer}
@media (max-width:600px){main{padding:.5rem}section{padding:.6rem}th,td{padding:.25rem .35rem}}
"#;

fn layout(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · dlrflow</title><style>{STYLE}</style></head>
<body><header><a href="/console">dlrflow · operator</a>
<form method="get" action="/console/message" role="search"><input name="id" placeholder="message id" aria-label="message id" required><button>Find</button></form>
<form method="post" action="/console/logout" class="inline"><button>Sign out</button></form>
</header><main>{body}</main></body></html>"#,
        title = esc(title),
    )
}

/// A page with one message (errors, refusals).
pub fn notice(title: &str, text: &str) -> String {
    layout(
        title,
        &format!(
            r#"<h1>{}</h1><p class="error">{}</p><p><a href="/console">Back</a></p>"#,
            esc(title),
            esc(text)
        ),
    )
}

pub fn login(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!(r#"<p class="error" id="login-error">{}</p>"#, esc(e)))
        .unwrap_or_default();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · dlrflow</title><style>{STYLE}</style></head>
<body><main><section style="max-width:28rem;margin:3rem auto">
<h1>dlrflow · operator</h1>{error}
<form method="post" action="/console/login">
<p><label>Read API key (sources = ["*"])<br><input type="password" name="key" id="key" autocomplete="off" required style="width:100%"></label></p>
<p><button id="sign-in">Sign in</button></p></form></section></main></body></html>"#
    )
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| "—".to_owned())
}

fn ago(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms} ms"),
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

fn status_class(status: &str) -> &'static str {
    match status {
        "delivered" => "ok",
        "failed" => "bad",
        _ => "",
    }
}

fn message_link(id: &str) -> String {
    format!(
        r#"<a href="/console/message?id={}">{}</a>"#,
        query_value(id),
        esc(id)
    )
}

fn error_box(e: &str) -> String {
    format!(r#"<p class="error">{}</p>"#, esc(e))
}

/// Everything `/console` shows; each part may have failed on its own.
pub struct Overview<'a> {
    pub funnel: Result<Funnel, String>,
    pub stuck: Result<(Vec<Stuck>, i64), String>,
    pub stuck_after: Duration,
    pub jobs: Result<Option<(Vec<Job>, i64)>, String>,
    pub progress: Result<Vec<Progress>, String>,
    pub budgets: Result<Vec<Budget>, String>,
    pub budget_limit: u32,
    pub dlq: Result<(Vec<DlqRecord>, i64), String>,
    pub carriers: Result<crate::carriers::CarrierReport, String>,
    pub replayed: Option<String>,
    pub query: &'a OverviewQuery,
}

pub fn overview(v: &Overview<'_>) -> String {
    let mut body = String::new();
    body.push_str("<h1>Pipeline</h1>");
    if let Some(r) = &v.replayed {
        let _ = write!(
            body,
            r#"<p class="notice" id="replayed">Replayed: the record is back on {} and goes through the state again.</p>"#,
            esc(r)
        );
    }
    body.push_str(r#"<div class="grid">"#);
    funnel_section(&mut body, v);
    budget_section(&mut body, v);
    body.push_str("</div>");
    carrier_section(&mut body, v);
    body.push_str(r#"<div class="grid">"#);
    stuck_section(&mut body, v);
    jobs_section(&mut body, v);
    dlq_section(&mut body, v);
    lag_section(&mut body, v);
    body.push_str("</div>");
    layout("Pipeline", &body)
}

fn funnel_section(body: &mut String, v: &Overview<'_>) {
    let q = v.query;
    let _ = write!(
        body,
        r#"<section id="funnel"><h2>Funnel</h2>
<form method="get" action="/console" class="filters">
<label>source<input name="source" value="{}" placeholder="all" size="10"></label>
<label>from (RFC 3339)<input name="from" value="{}" placeholder="24 h ago" size="20"></label>
<label>to<input name="to" value="{}" placeholder="now" size="20"></label>
<button>Show</button></form>"#,
        esc(q.source.as_deref().unwrap_or("")),
        esc(q.from.as_deref().unwrap_or("")),
        esc(q.to.as_deref().unwrap_or("")),
    );
    match &v.funnel {
        Err(e) => body.push_str(&error_box(e)),
        Ok(f) => {
            let _ = write!(
                body,
                r#"<p class="muted">Recipients first seen from {} to {} (UTC){}.</p><div class="tiles">"#,
                time(Some(f.from)),
                time(Some(f.to)),
                f.source
                    .as_deref()
                    .map(|s| format!(", source {}", esc(s)))
                    .unwrap_or_default()
            );
            for (k, label, n) in [
                ("messages", "messages", f.messages),
                ("announced", "announced", f.announced),
                ("recipients", "recipients", f.recipients),
                ("queued", "queued", f.queued),
                ("processing", "processing", f.processing),
                ("sent", "sent", f.sent),
                ("delivered", "delivered", f.delivered),
                ("failed", "failed", f.failed),
            ] {
                let _ = write!(
                    body,
                    r#"<div class="tile {}"><span class="muted">{label}</span><b data-k="{k}">{n}</b></div>"#,
                    status_class(k)
                );
            }
            body.push_str("</div>");
            if f.recipients > 0 {
                body.push_str(r#"<div class="bar" aria-hidden="true">"#);
                for (n, color) in [
                    (f.delivered, "#137a3a"),
                    (f.failed, "#b42318"),
                    (f.sent, "#5b8def"),
                    (f.processing, "#a9c1ef"),
                    (f.queued, "#c9ced4"),
                ] {
                    let pct = n as f64 * 100.0 / f.recipients as f64;
                    let _ = write!(
                        body,
                        r#"<span style="width:{pct:.3}%;background:{color}"></span>"#
                    );
                }
                body.push_str("</div>");
                let terminal = f.delivered + f.failed;
                let _ = write!(
                    body,
                    r#"<p class="muted">{:.1} % terminal, {:.1} % of terminal delivered.</p>"#,
                    terminal as f64 * 100.0 / f.recipients as f64,
                    if terminal > 0 {
                        f.delivered as f64 * 100.0 / terminal as f64
                    } else {
                        0.0
                    }
                );
            }
        }
    }
    body.push_str("</section>");
}

fn ms(v: Option<u64>) -> String {
    match v {
        None => "—".to_owned(),
        Some(ms) if ms < 10_000 => format!("{ms} ms"),
        Some(ms) if ms < 600_000 => format!("{:.1} s", ms as f64 / 1000.0),
        Some(ms) => format!("{:.1} min", ms as f64 / 60_000.0),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.1} %", v * 100.0))
        .unwrap_or_else(|| "—".to_owned())
}

fn carrier_section(body: &mut String, v: &Overview<'_>) {
    body.push_str(r#"<section id="carriers" style="margin:1rem 0"><h2>Carriers</h2>"#);
    match &v.carriers {
        Err(e) => body.push_str(&error_box(e)),
        Ok(r) => {
            let _ = write!(
                body,
                r#"<p class="muted">Recipients queued from {} to {} (whole hours around the funnel's window; the carrier rollup, see the read API's <code>/v1/analytics/carriers</code>). Times are p50 / p95, to the histogram's resolution.</p>"#,
                time(r.filter.from),
                time(r.filter.to)
            );
            if r.carriers.is_empty() {
                body.push_str(r#"<p class="muted">No recipient in these hours.</p>"#);
            } else {
                body.push_str(r#"<div class="scroll"><table><tr><th>carrier</th><th class="num">recipients</th><th class="num">delivered</th><th class="num">failed</th><th class="num">pending</th><th class="num">delivery rate</th><th class="num">sent → delivered</th><th class="num">queued → terminal</th><th class="num">status API only</th><th>top errors</th></tr>"#);
                for c in &r.carriers {
                    let s = &c.stats;
                    let errors: Vec<String> = c
                        .top_error_codes
                        .iter()
                        .map(|e| format!("{} ×{}", esc(&e.name), e.count))
                        .collect();
                    let name = c.carrier.as_deref().unwrap_or("(unknown)");
                    let _ = write!(
                        body,
                        r#"<tr class="carrier" data-carrier="{n}"><td>{n}</td><td class="num" data-k="recipients">{}</td><td class="num" data-k="delivered">{}</td><td class="num" data-k="failed">{}</td><td class="num" data-k="pending">{}</td><td class="num">{}</td><td class="num">{} / {}</td><td class="num">{} / {}</td><td class="num">{} ({})</td><td>{}</td></tr>"#,
                        s.recipients,
                        s.delivered,
                        s.failed,
                        s.pending,
                        pct(s.delivery_rate),
                        ms(s.sent_to_delivered.p50_ms),
                        ms(s.sent_to_delivered.p95_ms),
                        ms(s.queued_to_terminal.p50_ms),
                        ms(s.queued_to_terminal.p95_ms),
                        s.status_api_only,
                        pct(s.status_api_only_share),
                        errors.join(", "),
                        n = esc(name),
                    );
                }
                body.push_str("</table></div>");
            }
        }
    }
    body.push_str("</section>");
}

fn budget_section(body: &mut String, v: &Overview<'_>) {
    let _ = write!(
        body,
        r#"<section id="budget"><h2>Status-API budget</h2><p class="muted">Reads granted in the last {} s, of {} a minute, shared by every reconciler.</p>"#,
        super::BUDGET_WINDOW.as_secs(),
        v.budget_limit
    );
    match &v.budgets {
        Err(e) => body.push_str(&error_box(e)),
        Ok(b) if b.is_empty() => {
            body.push_str(r#"<p class="muted">No reconciler has read the status API yet.</p>"#)
        }
        Ok(b) => {
            body.push_str(r#"<div class="scroll"><table><tr><th>budget</th><th class="num">used</th><th>state</th></tr>"#);
            for b in b {
                let state = match (&b.unauthorized, b.paused_ms) {
                    (Some(why), _) => {
                        format!(r#"<span class="bad">refused (401): {}</span>"#, esc(why))
                    }
                    (None, Some(ms)) => format!(
                        r#"<span class="warn">paused for {} (429)</span>"#,
                        ago(ms as i64)
                    ),
                    (None, None) if b.used >= u64::from(v.budget_limit) => {
                        r#"<span class="warn">used up</span>"#.to_owned()
                    }
                    (None, None) => r#"<span class="ok">reading</span>"#.to_owned(),
                };
                let _ = write!(
                    body,
                    r#"<tr><td class="wrap">{}</td><td class="num" data-k="budget-used">{}</td><td>{state}</td></tr>"#,
                    esc(&b.name),
                    b.used
                );
            }
            body.push_str("</table></div>");
        }
    }
    body.push_str("</section>");
}

fn stuck_section(body: &mut String, v: &Overview<'_>) {
    let _ = write!(
        body,
        r#"<section id="stuck"><h2>Stuck recipients</h2><p class="muted">Not delivered or failed, and silent for more than {} min.</p>"#,
        v.stuck_after.as_secs() / 60
    );
    match &v.stuck {
        Err(e) => body.push_str(&error_box(e)),
        Ok((rows, total)) => {
            let _ = write!(
                body,
                r#"<p><b data-k="stuck-total">{total}</b>{} stuck.</p>"#,
                if *total >= 10_000 { "+" } else { "" }
            );
            if !rows.is_empty() {
                body.push_str(r#"<div class="scroll"><table><tr><th>message</th><th>recipient</th><th>source</th><th>status</th><th>last event</th><th>flagged</th></tr>"#);
                for r in rows {
                    let _ = write!(
                        body,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        message_link(&r.message_id),
                        esc(&r.recipient),
                        esc(&r.source),
                        esc(&r.status),
                        time(Some(r.last_event_at)),
                        if r.needs_reconcile { "yes" } else { "" }
                    );
                }
                body.push_str("</table></div>");
            }
        }
    }
    body.push_str("</section>");
}

fn jobs_section(body: &mut String, v: &Overview<'_>) {
    body.push_str(r#"<section id="jobs"><h2>Open reconcile jobs</h2>"#);
    match &v.jobs {
        Err(e) => body.push_str(&error_box(e)),
        Ok(None) => body.push_str(r#"<p class="muted">No reconciler runs against this database (no reconcile_jobs table).</p>"#),
        Ok(Some((rows, total))) => {
            let _ = write!(body, r#"<p><b data-k="jobs-open">{total}</b> open.</p>"#);
            if !rows.is_empty() {
                body.push_str(r#"<div class="scroll"><table><tr><th>message</th><th>reason</th><th>since</th><th>due</th><th class="num">attempts</th><th class="num">reads</th><th>last error</th></tr>"#);
                for j in rows {
                    let _ = write!(
                        body,
                        r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td>{}</td></tr>"#,
                        message_link(&j.message_id),
                        esc(&j.reason),
                        time(Some(j.since)),
                        time(Some(j.due_at)),
                        j.attempts,
                        j.reads,
                        esc(j.last_error.as_deref().unwrap_or(""))
                    );
                }
                body.push_str("</table></div>");
            }
        }
    }
    body.push_str("</section>");
}

fn dlq_section(body: &mut String, v: &Overview<'_>) {
    body.push_str(r#"<section id="dlq"><h2>Dead-letter queue</h2>"#);
    match &v.dlq {
        Err(e) => body.push_str(&error_box(e)),
        Ok((records, total)) => {
            let _ = write!(
                body,
                r#"<p><b data-k="dlq-total">{total}</b> records retained; the newest {} below.</p>"#,
                records.len()
            );
            let mut by_kind: std::collections::BTreeMap<&str, usize> = Default::default();
            for r in records {
                *by_kind.entry(r.kind.as_str()).or_default() += 1;
            }
            if !by_kind.is_empty() {
                body.push_str(r#"<p id="dlq-reasons">"#);
                for (kind, n) in &by_kind {
                    let _ = write!(
                        body,
                        r#"<span class="tile" style="display:inline-block;margin:0 .3rem .3rem 0">{} <b style="display:inline" data-reason="{}">{n}</b></span>"#,
                        esc(kind),
                        esc(kind)
                    );
                }
                body.push_str("</p>");
            }
            if !records.is_empty() {
                body.push_str(r#"<div class="scroll"><table><tr><th>when</th><th>reason</th><th>key</th><th>from</th><th>at</th><th></th></tr>"#);
                for r in records {
                    let _ = write!(
                        body,
                        r#"<tr class="dlq-record" data-partition="{p}" data-offset="{o}"><td>{}</td><td title="{}">{}</td><td>{}</td><td>{}</td><td>{p}/{o}</td>
<td><form method="post" action="/console/dlq/replay" class="inline"><input type="hidden" name="partition" value="{p}"><input type="hidden" name="offset" value="{o}"><button class="replay">Replay</button></form></td></tr>"#,
                        time(r.at),
                        esc(&r.error),
                        esc(&r.kind),
                        esc(&r.key),
                        esc(&r.original_topic),
                        p = r.partition,
                        o = r.offset,
                    );
                }
                body.push_str("</table></div>");
            }
        }
    }
    body.push_str("</section>");
}

fn lag_section(body: &mut String, v: &Overview<'_>) {
    body.push_str(r#"<section id="lag"><h2>Consumer lag</h2>"#);
    match &v.progress {
        Err(e) => body.push_str(&error_box(e)),
        Ok(rows) if rows.is_empty() => body
            .push_str(r#"<p class="muted">No state consumer has reported its progress yet.</p>"#),
        Ok(rows) => {
            let records: i64 = rows.iter().map(|r| r.lag_records).sum();
            let _ = write!(
                body,
                r#"<p><b data-k="lag-records">{records}</b> records behind in all.</p><div class="scroll"><table><tr><th>group</th><th>topic</th><th class="num">partition</th><th class="num">records behind</th><th class="num">oldest not applied</th><th class="num">reported</th></tr>"#
            );
            for r in rows {
                let _ = write!(
                    body,
                    r#"<tr><td>{}</td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{} ago</td></tr>"#,
                    esc(&r.group_id),
                    esc(&r.topic),
                    r.partition,
                    r.lag_records,
                    r.lag_ms
                        .map(|ms| ago(ms.max(0)))
                        .unwrap_or_else(|| "unknown".to_owned()),
                    ago(r.observed_ms.max(0)),
                );
            }
            body.push_str("</table></div>");
        }
    }
    body.push_str("</section>");
}

fn event_rows(body: &mut String, events: &[TimelineEvent]) {
    body.push_str(r#"<div class="scroll"><table><tr><th>source</th><th>status</th><th>gateway time</th><th>arrived</th><th class="num">arrival − gateway</th><th>outcome</th></tr>"#);
    for e in events {
        let delay = match (e.gateway_at, e.received_at) {
            (Some(g), Some(r)) => ago((r - g).num_milliseconds()),
            _ => "—".to_owned(),
        };
        let _ = write!(
            body,
            r#"<tr class="event" data-provider="{}"><td>{}</td><td class="{}">{}</td><td>{}</td><td>{}</td><td class="num">{delay}</td><td>{}</td></tr>"#,
            esc(&e.provider),
            if e.provider == "status_api" {
                "status read"
            } else {
                e.provider.as_str()
            },
            status_class(e.status.as_deref().unwrap_or("")),
            esc(e.status.as_deref().unwrap_or("message")),
            time(e.gateway_at),
            time(e.received_at),
            esc(e.outcome.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</table></div>");
}

pub fn message(v: &MessageView) -> String {
    let m = &v.message;
    let mut body = String::new();
    let _ = write!(
        body,
        r#"<h1>Message <span id="message-id">{}</span></h1><div class="grid"><section id="message"><h2>Message</h2><div class="scroll"><table>
<tr><th>source</th><td>{}</td></tr><tr><th>gateway</th><td>{}</td></tr>
<tr><th>recipients announced</th><td data-k="announced">{}</td></tr>
<tr><th>recipients seen</th><td data-k="recipients">{}</td></tr>
<tr><th>queued</th><td>{}</td></tr><tr><th>first seen</th><td>{}</td></tr>
<tr><th>status reads</th><td data-k="status-reads">{}</td></tr></table></div>"#,
        esc(&m.message_id),
        esc(&m.source),
        esc(&m.provider),
        m.total_recipients
            .map(|n| n.to_string())
            .unwrap_or_else(|| "—".into()),
        v.timelines.len(),
        time(m.queued_at),
        time(Some(m.first_seen_at)),
        v.status_reads,
    );
    match &v.job {
        None => body.push_str(r#"<p class="muted">No reconcile job.</p>"#),
        Some(j) => {
            let _ = write!(
                body,
                r#"<p>Reconcile job: {} since {}, {} attempts, {} reads{}.</p>"#,
                esc(&j.reason),
                time(Some(j.since)),
                j.attempts,
                j.reads,
                j.last_error
                    .as_deref()
                    .map(|e| format!(", last error: {}", esc(e)))
                    .unwrap_or_default()
            );
        }
    }
    if !v.message_events.is_empty() {
        body.push_str("<h2>Message events</h2>");
        event_rows(&mut body, &v.message_events);
    }
    body.push_str("</section></div>");
    body.push_str(r#"<section id="recipients" style="margin-top:1rem"><h2>Recipients</h2>"#);
    for t in &v.timelines {
        let (status, detail) = match &t.state {
            Some(s) => (
                s.status.as_str(),
                format!(
                    "{}{}{}",
                    s.carrier
                        .as_deref()
                        .map(|c| format!(" · {}", esc(c)))
                        .unwrap_or_default(),
                    s.error_code
                        .as_deref()
                        .map(|c| format!(
                            " · error {} {}",
                            esc(c),
                            esc(s.error_message.as_deref().unwrap_or(""))
                        ))
                        .unwrap_or_default(),
                    if s.needs_reconcile {
                        format!(
                            " · flagged ({})",
                            esc(s.reconcile_reason.as_deref().unwrap_or(""))
                        )
                    } else {
                        String::new()
                    }
                ),
            ),
            None => ("—", String::new()),
        };
        let _ = write!(
            body,
            r#"<details class="recipient" data-recipient="{r}" open><summary><b>{r}</b> <span class="{}" data-k="status">{}</span>{detail} · {} events · <span data-k="duplicates">{}</span> duplicates dropped</summary>"#,
            status_class(status),
            esc(status),
            t.events.len(),
            t.duplicates,
            r = esc(&t.recipient),
        );
        event_rows(&mut body, &t.events);
        body.push_str("</details>");
    }
    body.push_str("</section>");
    layout(&format!("Message {}", m.message_id), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_everywhere_it_goes() {
        assert_eq!(
            esc(r#"<script>"x"&'y'</script>"#),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
        let page = notice("<b>", "<img src=x onerror=alert(1)>");
        assert!(!page.contains("<img"));
        assert!(!page.contains("<b>"));
        assert_eq!(query_value("a b/é&"), "a%20b%2F%C3%A9%26");
    }
}
