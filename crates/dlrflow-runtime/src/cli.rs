//! What every binary's command line shares: `--config`, the `config`
//! command that prints the effective configuration, and one way to end with
//! an error.

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
