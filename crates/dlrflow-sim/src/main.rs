//! `dlrflow-sim`: gateway simulator and verifier (see the crate docs).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use dlrflow_sim::{
    run_arpoone_plan, run_lisoloo_plan, verify_with, ArpooneConfig, ArpoonePlan, DeliveryConfig,
    Gateway, LisolooConfig, LisolooPlan, Routing, SimReport, StatusServer, StatusServerConfig,
    Truth, VerifyOptions,
};
use tokio_util::sync::CancellationToken;

/// Simulates the Lisoloo and Arpoone SMS gateways against dlrflow, and verifies
/// dlrflow's state against the simulation's ground truth.
#[derive(Parser, Debug)]
#[command(name = "dlrflow-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send Lisoloo webhooks, serve GET /status, write the ground truth.
    Lisoloo(LisolooArgs),
    /// Send Arpoone webhook batches, write the ground truth.
    Arpoone(ArpooneArgs),
    /// Compare a truth file with dlrflow's read API; exits 1 on any difference.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Receiver base URL; events go to {target}/{source}/webhook[...].
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Source name in the URL path (default: the provider name).
    #[arg(long)]
    source: Option<String>,
    /// Full URL template overriding the default; placeholders {target}, {source},
    /// {status} (Arpoone: delivered|pending|not_delivered) and {token}.
    #[arg(long)]
    url_template: Option<String>,
    /// HTTP Basic user name.
    #[arg(long, env = "DLRFLOW_SIM_USERNAME")]
    username: Option<String>,
    /// HTTP Basic password (Basic auth is sent when both are set).
    #[arg(long, env = "DLRFLOW_SIM_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Number of messages (sends).
    #[arg(long, default_value_t = 100)]
    messages: usize,
    /// Recipients per message (default: Lisoloo 3, Arpoone 1).
    #[arg(long)]
    recipients: Option<usize>,
    /// Messages started per second (real time); 0 = all at once.
    #[arg(long, default_value_t = 50.0)]
    send_rate: f64,
    /// Share of recipients ending failed / NOT_DELIVERED.
    #[arg(long, default_value_t = 0.1)]
    failure_rate: f64,
    /// Lisoloo: a carrier of the mix, `NAME:WEIGHT:FAILURE_RATE[:CODE,CODE…]`
    /// (repeat it; its failure rate replaces --failure-rate). Default: four
    /// carriers, equally likely, any error code.
    #[arg(long = "carrier")]
    carriers: Vec<dlrflow_sim::CarrierProfile>,
    /// Maximum concurrent HTTP requests.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// An answer slower than this is a timeout and is retried (not scaled).
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Retry delays in seconds before each retry (unscaled). The default is
    /// the documented 30 s, 2 m, 10 m, 1 h: 1 first attempt + 4 retries.
    #[arg(long, value_delimiter = ',', default_value = "30,120,600,3600")]
    retry_schedule: Vec<f64>,
    /// Multiplies every simulated delay (lifecycle, retries, batch linger):
    /// 0.01 turns the retries into 0.3 s, 1.2 s, 6 s, 36 s.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Reorder buffer: once this many events wait, a random one goes first (1 = off).
    #[arg(long, default_value_t = 16)]
    reorder_window: usize,
    /// Share of events (Arpoone: batches) sent twice, same bytes.
    #[arg(long, default_value_t = 0.02)]
    duplicate_rate: f64,
    /// Share of terminal events the gateway never sends (as if it gave up).
    #[arg(long, default_value_t = 0.0)]
    withhold_terminal_rate: f64,
    /// Seed for everything planned (ids, recipients, outcomes, timings); random if unset.
    #[arg(long)]
    seed: Option<u64>,
    /// Where to write the ground truth (written at start, rewritten at the end).
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Seconds between progress lines on stderr; 0 = none.
    #[arg(long, default_value_t = 2.0)]
    progress_secs: f64,
    /// Also print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct LisolooArgs {
    #[command(flatten)]
    send: SendArgs,
    /// Where the GET /status server listens.
    #[arg(long, default_value = "127.0.0.1:8090")]
    status_listen: SocketAddr,
    /// Accepted status API key(s) (Authorization: Bearer KEY); repeat for several.
    #[arg(
        long = "status-key",
        env = "DLRFLOW_SIM_STATUS_KEY",
        hide_env_values = true,
        default_value = "sim-status-key"
    )]
    status_keys: Vec<String>,
    /// Status reads allowed per key in any sliding window.
    #[arg(long, default_value_t = 120)]
    status_limit: u32,
    /// The sliding window, in seconds.
    #[arg(long, default_value_t = 60.0)]
    status_window_secs: f64,
    /// Append every status read as a JSON line to this file.
    #[arg(long)]
    read_log: Option<PathBuf>,
    /// Do not start the status server.
    #[arg(long)]
    no_status_server: bool,
    /// Keep the status server up this long after sending (Ctrl-C ends it).
    #[arg(long, default_value_t = 0.0)]
    linger_secs: f64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoutingArg {
    /// One URL per status: .../webhook/{delivered|pending|not_delivered}.
    PerStatus,
    /// One URL for all statuses: .../webhook.
    Single,
}

#[derive(Args, Debug)]
struct ArpooneArgs {
    #[command(flatten)]
    send: SendArgs,
    /// URL routing.
    #[arg(long, value_enum, default_value = "per-status")]
    routing: RoutingArg,
    /// Path token: URL becomes {target}/{source}/webhook/{token}[/{status}].
    #[arg(long, env = "DLRFLOW_SIM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Most records per request (1..=1000).
    #[arg(long, default_value_t = 1000)]
    batch_max: usize,
    /// How long a batch waits for more records, in ms (scaled).
    #[arg(long, default_value_t = 1000)]
    batch_linger_ms: u64,
    /// Most PENDING records per recipient.
    #[arg(long, default_value_t = 2)]
    pending_max: u32,
    /// OrganizationId on every record.
    #[arg(long)]
    organization_id: Option<uuid::Uuid>,
    /// CustomPayload on every record (default: a per-message JSON string).
    #[arg(long)]
    custom_payload: Option<String>,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Truth file written by `lisoloo` or `arpoone`.
    #[arg(long)]
    truth: PathBuf,
    /// dlrflow read API base URL (GET {api}/v1/messages/{message_id}).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    api: String,
    /// The read API's key (`Authorization: Bearer`).
    #[arg(long, env = "DLRFLOW_SIM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Keep re-checking the unmatched ones until this many seconds have passed.
    #[arg(long, default_value_t = 0.0)]
    wait_secs: f64,
    /// Pause between passes, ms.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// Concurrent read API requests.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Differences listed individually.
    #[arg(long, default_value_t = 50)]
    show: usize,
}

impl SendArgs {
    fn delivery(&self, provider: &str) -> anyhow::Result<DeliveryConfig> {
        let basic_auth = match (&self.username, &self.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            // The gateway sends Basic auth only when both are configured.
            (Some(_), None) | (None, Some(_)) => {
                anyhow::bail!("--username and --password go together (Basic auth needs both)")
            }
            (None, None) => None,
        };
        anyhow::ensure!(
            self.retry_schedule
                .iter()
                .all(|s| s.is_finite() && *s >= 0.0),
            "--retry-schedule takes non-negative seconds"
        );
        Ok(DeliveryConfig {
            target: self.target.clone(),
            source: self.source.clone().unwrap_or_else(|| provider.to_owned()),
            url_template: self.url_template.clone(),
            basic_auth,
            concurrency: self.concurrency,
            request_timeout: Duration::from_millis(self.timeout_ms),
            retry_schedule: self
                .retry_schedule
                .iter()
                .map(|s| Duration::from_secs_f64(*s))
                .collect(),
            time_scale: self.time_scale,
            reorder_window: self.reorder_window,
            duplicate_rate: self.duplicate_rate,
            withhold_terminal_rate: self.withhold_terminal_rate,
            progress_interval: (self.progress_secs > 0.0)
                .then(|| Duration::from_secs_f64(self.progress_secs)),
        })
    }

    fn seed(&self) -> u64 {
        self.seed.unwrap_or_else(rand::random)
    }

    fn truth_path(&self, provider: &str) -> PathBuf {
        self.truth
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("truth-{provider}.json")))
    }
}

fn finish(report: &SimReport, path: &Path, json: bool) -> anyhow::Result<()> {
    report.truth.write_json(path)?;
    eprint!("{}", report.table());
    eprintln!(
        "truth: {} ({} recipients, {} messages)",
        path.display(),
        report.truth.recipients.len(),
        report.truth.message_count()
    );
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    }
    Ok(())
}

async fn lisoloo(args: LisolooArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let s = &args.send;
    let cfg = LisolooConfig {
        delivery: s.delivery("lisoloo")?,
        messages: s.messages,
        recipients: s.recipients.unwrap_or(3),
        send_rate: s.send_rate,
        failure_rate: s.failure_rate,
        carriers: s.carriers.clone(),
        seed: s.seed(),
    };
    let path = s.truth_path("lisoloo");
    let gateway = Gateway::new();
    let server = if args.no_status_server {
        None
    } else {
        let server = StatusServer::start(
            StatusServerConfig {
                listen: args.status_listen,
                api_keys: args.status_keys.clone(),
                limit: args.status_limit,
                window: Duration::from_secs_f64(args.status_window_secs),
                read_log: args.read_log.clone(),
            },
            gateway.clone(),
        )
        .await?;
        eprintln!("status server: {}/status/{{message_id}}", server.base_url());
        Some(server)
    };
    let plan = LisolooPlan::new(&cfg, chrono::Utc::now());
    plan.truth().write_json(&path)?;
    eprintln!(
        "lisoloo: seed {} — {} messages × {} recipients, {} events → {}",
        cfg.seed,
        cfg.messages,
        cfg.recipients,
        plan.event_count(),
        cfg.delivery.url_template.clone().unwrap_or_else(|| format!(
            "{}/{}/webhook",
            cfg.delivery.target.trim_end_matches('/'),
            cfg.delivery.source
        ))
    );
    let report = run_lisoloo_plan(&cfg, plan, &gateway, cancel.clone()).await?;
    finish(&report, &path, s.json)?;
    if let Some(server) = server {
        if args.linger_secs > 0.0 && !cancel.is_cancelled() {
            eprintln!(
                "status server lingering {:.0}s (Ctrl-C to stop)",
                args.linger_secs
            );
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs_f64(args.linger_secs)) => {}
            }
        }
        let reads = server.reads();
        eprintln!(
            "status reads: {} (200: {}, 404: {}, 429: {}, 401: {})",
            reads.len(),
            reads.iter().filter(|r| r.status == 200).count(),
            reads.iter().filter(|r| r.status == 404).count(),
            reads.iter().filter(|r| r.status == 429).count(),
            reads.iter().filter(|r| r.status == 401).count(),
        );
        server.shutdown().await;
    }
    Ok(())
}

async fn arpoone(args: ArpooneArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let s = &args.send;
    let defaults = ArpooneConfig::default();
    let cfg = ArpooneConfig {
        delivery: s.delivery("arpoone")?,
        messages: s.messages,
        recipients: s.recipients.unwrap_or(1),
        send_rate: s.send_rate,
        failure_rate: s.failure_rate,
        routing: match args.routing {
            RoutingArg::PerStatus => Routing::PerStatus,
            RoutingArg::Single => Routing::Single,
        },
        token: args.token.clone(),
        batch_max: args.batch_max,
        batch_linger: Duration::from_millis(args.batch_linger_ms),
        pending_max: args.pending_max,
        organization_id: args.organization_id.unwrap_or(defaults.organization_id),
        custom_payload: args.custom_payload.clone(),
        seed: s.seed(),
    };
    let path = s.truth_path("arpoone");
    let plan = ArpoonePlan::new(&cfg, chrono::Utc::now());
    plan.truth().write_json(&path)?;
    eprintln!(
        "arpoone: seed {} — {} messages × {} recipients, {} records",
        cfg.seed,
        cfg.messages,
        cfg.recipients,
        plan.record_count()
    );
    let report = run_arpoone_plan(&cfg, plan, cancel).await?;
    finish(&report, &path, s.json)
}

async fn verify(args: VerifyArgs) -> anyhow::Result<bool> {
    let truth = Truth::read_json(&args.truth)?;
    let opts = VerifyOptions {
        wait: Duration::from_secs_f64(args.wait_secs.max(0.0)),
        poll_interval: Duration::from_millis(args.poll_ms),
        concurrency: args.concurrency,
        progress: true,
        api_key: args.api_key.clone(),
        ..VerifyOptions::default()
    };
    let report = verify_with(&truth, &args.api, &opts)
        .await
        .context("verifying")?;
    print!("{}", report.table(args.show));
    Ok(report.is_ok())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        let on_signal = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping");
                on_signal.cancel();
            }
        });
        match cli.command {
            Command::Lisoloo(args) => lisoloo(args, cancel).await.map(|()| true),
            Command::Arpoone(args) => arpoone(args, cancel).await.map(|()| true),
            Command::Verify(args) => verify(args).await,
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
