use std::path::PathBuf;

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
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    dlrflow_runtime::telemetry::init_logs();
    let cfg = dlrflow_reconcile::Config::load(cli.config.as_deref())?;
    let shutdown = dlrflow_runtime::shutdown::signal_token();
    let app = dlrflow_reconcile::App::build(cfg).await?;
    app.run(shutdown).await
}
