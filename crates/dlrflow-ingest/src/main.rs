use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use dlrflow_runtime::cli::Cli;

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP receiver (the default).
    Serve,
    /// Print the effective configuration as JSON (secrets as `***`) and exit.
    Config,
    /// Print the records of a topic as JSON lines (key, headers, payload).
    Tail {
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(long, default_value = "dlrflow.webhooks.raw.v1")]
        topic: String,
        /// Stop after this many records.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Stop after this many seconds even if fewer records arrived.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
}

const ABOUT: &str = "dlrflow-ingest: receives gateway webhooks and makes them durable in Kafka.";

fn main() -> ExitCode {
    dlrflow_runtime::cli::main("dlrflow-ingest", ABOUT, run)
}

async fn run(cli: Cli<Command>) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config => {
            let cfg = dlrflow_ingest::Config::load(cli.config.config.as_deref())?;
            dlrflow_runtime::cli::print_config(&cfg)
        }
        Command::Serve => {
            let cfg = dlrflow_ingest::Config::load(cli.config.config.as_deref())?;
            let shutdown = dlrflow_runtime::shutdown::signal_token();
            let app = dlrflow_ingest::App::build(cfg).await?;
            app.run(shutdown).await
        }
        Command::Tail {
            brokers,
            topic,
            count,
            timeout_secs,
        } => {
            let records = dlrflow_runtime::kafka::read_topic(
                &brokers,
                &topic,
                count,
                Duration::from_secs(timeout_secs),
                Duration::ZERO,
            )
            .await
            .context("reading the topic")?;
            for r in records.iter().take(count) {
                let headers: serde_json::Map<String, serde_json::Value> = r
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned().into()))
                    .collect();
                let line = serde_json::json!({
                    "partition": r.partition,
                    "offset": r.offset,
                    "key": r.key.as_deref().map(String::from_utf8_lossy),
                    "timestamp": r.timestamp.and_then(chrono::DateTime::from_timestamp_millis),
                    "headers": headers,
                    "payload": String::from_utf8_lossy(&r.payload),
                });
                println!("{line}");
            }
            if records.len() < count {
                anyhow::bail!(
                    "only {} of {count} records within {timeout_secs} s",
                    records.len()
                );
            }
            Ok(())
        }
    }
}
