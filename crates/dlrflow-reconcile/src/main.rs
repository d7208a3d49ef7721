use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// dlrflow-reconcile: fixes unsettled recipients from the gateway's status API
/// within the shared read budget.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML); `DLRFLOW_CONFIG` works too. Environment
    /// variables `DLRFLOW_…` override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    dlrflow_runtime::telemetry::init_logs();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, secrets masked: in the logs and for a human at the terminal.
            let e = dlrflow_reconcile::redact::scrub(&format!("{e:#}"));
            tracing::error!(error = %e, "dlrflow-reconcile stopped");
            eprintln!("dlrflow-reconcile: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = dlrflow_reconcile::Config::load(cli.config.as_deref())?;
    let shutdown = dlrflow_runtime::shutdown::signal_token();
    // A signal while connecting stops the start too.
    let app = tokio::select! {
        app = dlrflow_reconcile::App::build(cfg) => app?,
        () = shutdown.cancelled() => return Ok(()),
    };
    app.run(shutdown).await
}
