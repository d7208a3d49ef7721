use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dlrflow_runtime::cli::ConfigArgs;

/// dlrflow-reconcile: fixes unsettled recipients from the gateway's status API
/// within the shared read budget.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Sweep and read (the default).
    Serve,
    /// Print the effective configuration as JSON (secrets as `***`) and exit.
    Config,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    dlrflow_runtime::telemetry::init_logs();
    dlrflow_runtime::cli::exit("dlrflow-reconcile", run(cli).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = dlrflow_reconcile::Config::load(cli.config.config.as_deref())?;
    if let Some(Command::Config) = cli.command {
        return dlrflow_runtime::cli::print_config(&cfg);
    }
    let shutdown = dlrflow_runtime::shutdown::signal_token();
    // A signal while connecting stops the start too.
    let app = tokio::select! {
        app = dlrflow_reconcile::App::build(cfg) => app?,
        () = shutdown.cancelled() => return Ok(()),
    };
    app.run(shutdown).await
}
