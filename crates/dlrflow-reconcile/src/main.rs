use std::process::ExitCode;

use clap::Subcommand;
use dlrflow_reconcile::config::MigrateConfig;
use dlrflow_runtime::cli::Cli;

#[derive(Subcommand)]
enum Command {
    /// Sweep and read (the default).
    Serve,
    /// Run the PostgreSQL migrations (dlrflow-state's, then the
    /// reconciler's own, 1000+) and exit. Needs only the `postgres.*`
    /// settings: no API key, Redis or Kafka.
    Migrate,
    /// Print the effective configuration as JSON (secrets as `***`) and exit.
    Config {
        /// Print what this command reads instead of what `serve` reads
        /// (`migrate`: the PostgreSQL settings alone), validated for it.
        #[arg(long = "for", value_enum, default_value_t = For::Serve)]
        command: For,
    },
}

/// The command whose configuration `config` prints.
#[derive(Clone, Copy, clap::ValueEnum)]
enum For {
    Serve,
    Migrate,
}

const ABOUT: &str = "dlrflow-reconcile: fixes unsettled recipients from the gateway's status API within the shared read budget.";

fn main() -> ExitCode {
    dlrflow_runtime::cli::main("dlrflow-reconcile", ABOUT, run)
}

async fn run(cli: Cli<Command>) -> anyhow::Result<()> {
    let file = cli.config.config.as_deref();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config {
            command: For::Serve,
        } => dlrflow_runtime::cli::print_config(&dlrflow_reconcile::Config::load(file)?),
        Command::Config {
            command: For::Migrate,
        } => dlrflow_runtime::cli::print_config(&MigrateConfig::load(file)?),
        Command::Migrate => {
            dlrflow_reconcile::migrate(&MigrateConfig::load(file)?).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Serve => serve(dlrflow_reconcile::Config::load(file)?).await,
    }
}

/// Sweeps and reads until a signal (migrating first when `postgres.migrate`).
async fn serve(cfg: dlrflow_reconcile::Config) -> anyhow::Result<()> {
    let shutdown = dlrflow_runtime::shutdown::signal_token();
    // A signal while connecting stops the start too.
    let app = tokio::select! {
        app = dlrflow_reconcile::App::build(cfg) => app?,
        () = shutdown.cancelled() => return Ok(()),
    };
    app.run(shutdown).await
}
