use std::process::ExitCode;

use clap::Subcommand;
use dlrflow_runtime::cli::Cli;

#[derive(Subcommand)]
enum Command {
    /// Sweep and read (the default).
    Serve,
    /// Print the effective configuration as JSON (secrets as `***`) and exit.
    Config,
}

const ABOUT: &str = "dlrflow-reconcile: fixes unsettled recipients from the gateway's status API within the shared read budget.";

fn main() -> ExitCode {
    dlrflow_runtime::cli::main("dlrflow-reconcile", ABOUT, run)
}

async fn run(cli: Cli<Command>) -> anyhow::Result<()> {
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
