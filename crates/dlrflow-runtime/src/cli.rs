//! What every binary's command line shares: `--config`, the `config`
//! command that prints the effective configuration, and one way to end with
//! an error.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;

/// `--config FILE`, accepted before or after the command.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// Configuration file (TOML); `DLRFLOW_CONFIG` works too. Environment
    /// variables `DLRFLOW_…` override it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

/// A binary's command line: `--config` and an optional command of the
/// binary's own (`None`: its default, `serve`).
#[derive(Debug, clap::Parser)]
pub struct Cli<C: clap::Subcommand> {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(subcommand)]
    pub command: Option<C>,
}

/// A binary's `main`: parses the command line (`--help`, `--version` and a
/// usage error end here), sets up the JSON logs, runs `run` on a
/// multi-thread Tokio runtime and ends with [`exit`]. `about` is the first
/// line of `--help`; the version is the workspace's.
pub fn main<C, F>(
    binary: &'static str,
    about: &'static str,
    run: impl FnOnce(Cli<C>) -> F,
) -> ExitCode
where
    C: clap::Subcommand,
    F: Future<Output = anyhow::Result<()>>,
{
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::<C>::command()
        .name(binary)
        .bin_name(binary)
        .version(env!("CARGO_PKG_VERSION"))
        .about(about)
        .get_matches();
    let cli = Cli::<C>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    crate::telemetry::init_logs(binary);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(cli)));
    exit(binary, result)
}

/// Prints the effective configuration (defaults, then the file, then the
/// environment) as JSON, every secret as `***`: what `<binary> config` shows
/// an operator before starting the service.
pub fn print_config<T: Serialize>(cfg: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(cfg)?);
    Ok(())
}

/// The process's exit: on error one line on stderr and one ERROR log line,
/// both with every registered secret and URL password masked
/// ([`crate::redact::scrub`]), and exit code 1.
pub fn exit(binary: &str, result: anyhow::Result<()>) -> ExitCode {
    let code = exit_code(binary, result);
    crate::otel::shutdown();
    code
}

fn exit_code(binary: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = crate::redact::scrub(&format!("{e:#}")).replace('\n', " ");
            tracing::error!(error = %e, "{binary} stopped");
            eprintln!("{binary}: {e}");
            ExitCode::FAILURE
        }
    }
}
