use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use dlrflow_runtime::cli::Cli;

#[derive(Subcommand)]
enum Command {
    /// Run the consumer, the outbox relay and the read API (the default).
    Serve,
    /// Run the PostgreSQL migrations and exit.
    Migrate,
    /// Print the effective configuration as JSON (secrets as `***`) and exit.
    Config,
    /// Make a new read API key: prints the key (give it to the reader; it is
    /// not stored anywhere) and the `[[api.keys]]` entry holding its hash.
    ApiKey {
        /// The key's name in the audit log.
        #[arg(long)]
        id: String,
        /// A source the key may read (repeat it; `*` for all).
        #[arg(long = "source", required = true)]
        sources: Vec<String>,
    },
    /// Rebuild the state from the log: replay the raw and status topics from
    /// their first retained record into a new schema; with --compare-with,
    /// compare recipient and message state row by row with another schema
    /// (the live one), print every difference and exit 1 on any.
    Rebuild {
        /// The new schema (created; must not hold state yet).
        #[arg(long)]
        into: String,
        /// The schema to compare with (e.g. the live `postgres.schema`).
        #[arg(long)]
        compare_with: Option<String>,
        /// Print at most this many differences per table.
        #[arg(long, default_value_t = 50)]
        max_differences: i64,
    },
    /// The carrier and error-code report (the same as GET
    /// /v1/analytics/carriers) from the rollup: a table, or --json.
    Carriers {
        /// Only this source (default: all).
        #[arg(long)]
        source: Option<String>,
        /// Recipients whose basis time is at or after this RFC 3339 time (a whole hour).
        #[arg(long)]
        from: Option<String>,
        /// Recipients whose basis time is before this RFC 3339 time (a whole hour).
        #[arg(long)]
        to: Option<String>,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move DLQ records back to the raw topic.
    Replay {
        /// Stop after this many records.
        #[arg(long)]
        max: Option<usize>,
        /// Stop when no record arrived for this many seconds.
        #[arg(long, default_value_t = 3)]
        idle_secs: u64,
    },
}

const ABOUT: &str = "dlrflow-state: raw webhook topic → deduped per-recipient delivery state in PostgreSQL, analytics stream, DLQ, and the read API.";

fn main() -> ExitCode {
    dlrflow_runtime::cli::main("dlrflow-state", ABOUT, run)
}

async fn run(cli: Cli<Command>) -> anyhow::Result<()> {
    let load = || dlrflow_state::Config::load(cli.config.config.as_deref());
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config => dlrflow_runtime::cli::print_config(&load()?),
        Command::ApiKey { id, sources } => {
            let key = dlrflow_state::access::new_key();
            let sha256 = dlrflow_state::access::key_hash(&key);
            let sources: Vec<String> = sources.iter().map(|s| format!("{s:?}")).collect();
            println!("# key (shown once; the configuration holds only its hash): {key}");
            println!(
                "[[api.keys]]\nid = {id:?}\nsha256 = {sha256:?}\nsources = [{}]",
                sources.join(", ")
            );
            Ok(())
        }
        Command::Serve => {
            let shutdown = dlrflow_runtime::shutdown::signal_token();
            let app = dlrflow_state::App::build(load()?).await?;
            app.run(shutdown).await
        }
        Command::Migrate => {
            let pool = load()?
                .postgres
                .connect()
                .await
                .context("connecting to PostgreSQL (postgres.url)")?;
            dlrflow_state::migrate(&pool)
                .await
                .context("running migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Rebuild {
            into,
            compare_with,
            max_differences,
        } => {
            let cfg = load()?;
            cfg.register_secrets();
            let rebuilt = dlrflow_state::rebuild::rebuild(&cfg, &into).await?;
            println!("{}", serde_json::json!({"rebuilt": into, "log": rebuilt}));
            let Some(other) = compare_with else {
                return Ok(());
            };
            let (differences, total) =
                dlrflow_state::rebuild::compare(&cfg, &into, &other, max_differences).await?;
            for d in &differences {
                println!("{}", serde_json::json!({"difference": d}));
            }
            println!(
                "{}",
                serde_json::json!({"compared": [into, other], "differences": total})
            );
            if total > 0 {
                anyhow::bail!("{total} rows differ between {into} and {other}");
            }
            Ok(())
        }
        Command::Carriers {
            source,
            from,
            to,
            json,
        } => {
            let filter = dlrflow_state::carriers::Filter::parse(
                source.as_deref(),
                from.as_deref(),
                to.as_deref(),
            )
            .map_err(anyhow::Error::msg)?;
            let pool = load()?
                .postgres
                .connect()
                .await
                .context("connecting to PostgreSQL (postgres.url)")?;
            let report = dlrflow_state::carriers::report(&pool, &filter)
                .await
                .context("reading the carrier rollup")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Replay { max, idle_secs } => {
            let opts = dlrflow_state::replay::ReplayOptions {
                max,
                idle: std::time::Duration::from_secs(idle_secs),
                ..Default::default()
            };
            let moved = dlrflow_state::replay::replay(&load()?, &opts).await?;
            println!("{}", serde_json::json!({"replayed": moved}));
            Ok(())
        }
    }
}
