//! The `cdc-worker` command line: the daemon and the commands an operator runs. The
//! development tools (LocalStack setup, simulation, demo, benchmark) are `cdc-worker-dev`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cdc_worker::commands::ledger::Edit;
use cdc_worker::config::Config;
use cdc_worker::{commands, telemetry};

#[derive(Parser)]
#[command(
    name = "cdc-worker",
    version,
    about = "Keeps a warehouse in sync with AWS DMS Parquet files on S3"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// Configuration file (TOML). Environment variables CDC_WORKER__SECTION__KEY override it.
    #[arg(long, short, env = "CDC_WORKER_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker until SIGINT or SIGTERM.
    Run(ConfigArg),
    /// Validate the configuration and print it with defaults filled in (secrets masked).
    CheckConfig(ConfigArg),
    /// Check region and credentials, the queue and its redrive policy, the buckets, the
    /// bucket's notification to the queue, the topic and the warehouse (creates nothing).
    CheckConnection(ConfigArg),
    /// Exit 0 if the running worker's /healthz answers ok: it runs and can receive from its
    /// queue (for container health checks).
    Health(ConfigArg),
    /// Schema history and held tables.
    Schema {
        #[command(subcommand)]
        action: SchemaCommand,
    },
    /// Each table: schema version, held or not, waiting files, key and mode, last applied
    /// file (from the running worker's /status, else from the warehouse).
    Status(ConfigArg),
    /// Re-drive a table's files from an S3 listing through the queue (safe: the ledger
    /// skips what is applied).
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// Target table.
        #[arg(long)]
        table: String,
        /// Only files after this one in DMS order: a file name
        /// (20261124-101500123.parquet, LOAD00000002.parquet) or its S3 key.
        #[arg(long)]
        since: Option<String>,
        /// List what would be sent, send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Per-table leases: show one, or hold it (pausing the table on every worker).
    Lease {
        #[command(subcommand)]
        action: LeaseCommand,
    },
    /// A table's ledger; skip or forget one file (the way out of a table blocked by a file
    /// that can never be applied).
    Ledger {
        #[command(subcommand)]
        action: LedgerCommand,
    },
    /// Release what waits for a person on a table: a reload's swap, or a mass delete the
    /// destructive-change guard held (docs/reloads.md).
    Table {
        #[command(subcommand)]
        action: TableCommand,
    },
}

#[derive(Subcommand)]
enum TableCommand {
    /// Let a table's reload replace it: the new generation, complete and held by
    /// `dms.reload = "hold"` or by the destructive-change guard, is swapped in.
    AcceptReload {
        #[command(flatten)]
        config: ConfigArg,
        table: String,
    },
    /// Let the batch the destructive-change guard held apply (once): the table goes on.
    ReleaseGuard {
        #[command(flatten)]
        config: ConfigArg,
        table: String,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// The table's ledger entries, newest first.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        table: String,
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Record a file as skipped: it is never applied, its notification is acknowledged, and
    /// the table's later files go on.
    Skip {
        #[command(flatten)]
        config: ConfigArg,
        table: String,
        /// The S3 key, or the file name within the table's folder.
        file: String,
        /// Why (recorded in the ledger and the alert).
        #[arg(long)]
        reason: String,
    },
    /// Forget a file: the worker treats it as never seen and applies it when it comes again.
    Forget {
        #[command(flatten)]
        config: ConfigArg,
        table: String,
        /// The S3 key, or the file name within the table's folder.
        file: String,
        /// Why (recorded in the ledger and the alert).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum LeaseCommand {
    /// The lease of a table: holder, fencing token, expiry.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        table: String,
    },
    /// Take a table's lease (waiting while another worker holds it), keep it for a
    /// while, renewing it, then release it. Prints one JSON line per event.
    Hold {
        #[command(flatten)]
        config: ConfigArg,
        table: String,
        /// How long to hold it, e.g. "30s" or "10m".
        #[arg(long = "for", value_parser = humantime::parse_duration, default_value = "30s")]
        hold_for: std::time::Duration,
        /// Take and release it this many times.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
    },
}

#[derive(Subcommand)]
enum SchemaCommand {
    /// The current schema of a table.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        table: String,
    },
    /// Every schema version of a table with its changes.
    History {
        #[command(flatten)]
        config: ConfigArg,
        table: String,
    },
    /// Release a held table: its pending change is applied as the evolve preset would.
    Accept {
        #[command(flatten)]
        config: ConfigArg,
        table: String,
        /// For incompatible type changes: variant (default), cast or ignore.
        #[arg(long)]
        incompatible: Option<String>,
    },
}

fn load(arg: &ConfigArg) -> Result<Config, ExitCode> {
    Config::load(arg.config.as_deref()).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

impl Command {
    /// The configuration argument every command carries.
    fn config(&self) -> &ConfigArg {
        match self {
            Command::Run(c)
            | Command::CheckConfig(c)
            | Command::CheckConnection(c)
            | Command::Health(c)
            | Command::Status(c) => c,
            Command::Replay { config, .. } => config,
            Command::Schema { action } => match action {
                SchemaCommand::Show { config, .. }
                | SchemaCommand::History { config, .. }
                | SchemaCommand::Accept { config, .. } => config,
            },
            Command::Lease { action } => match action {
                LeaseCommand::Show { config, .. } | LeaseCommand::Hold { config, .. } => config,
            },
            Command::Table { action } => match action {
                TableCommand::AcceptReload { config, .. }
                | TableCommand::ReleaseGuard { config, .. } => config,
            },
            Command::Ledger { action } => match action {
                LedgerCommand::Show { config, .. }
                | LedgerCommand::Skip { config, .. }
                | LedgerCommand::Forget { config, .. } => config,
            },
        }
    }

    async fn run(self, config: Config) -> anyhow::Result<()> {
        match self {
            Command::Run(_) => cdc_worker::worker::run_until_signal(config).await,
            Command::CheckConfig(_) => {
                print!("{}", config.to_masked_toml());
                Ok(())
            }
            Command::CheckConnection(_) => commands::check_connection(config).await,
            Command::Health(_) => commands::health(&config).await,
            Command::Status(_) => commands::status(&config).await,
            Command::Replay {
                table,
                since,
                dry_run,
                ..
            } => commands::replay(&config, &table, since.as_deref(), dry_run).await,
            Command::Schema { action } => action.run(&config).await,
            Command::Lease { action } => action.run(&config).await,
            Command::Ledger { action } => action.run(&config).await,
            Command::Table { action } => match action {
                TableCommand::AcceptReload { table, .. } => {
                    commands::release_guarded(&config, &table, commands::Release::Reload).await
                }
                TableCommand::ReleaseGuard { table, .. } => {
                    commands::release_guarded(&config, &table, commands::Release::Deletes).await
                }
            },
        }
    }
}

impl SchemaCommand {
    async fn run(self, config: &Config) -> anyhow::Result<()> {
        match self {
            SchemaCommand::Show { table, .. } => commands::schema_show(config, &table).await,
            SchemaCommand::History { table, .. } => commands::schema_history(config, &table).await,
            SchemaCommand::Accept {
                table,
                incompatible,
                ..
            } => commands::schema_accept(config, &table, incompatible.as_deref()).await,
        }
    }
}

impl LeaseCommand {
    async fn run(self, config: &Config) -> anyhow::Result<()> {
        match self {
            LeaseCommand::Show { table, .. } => commands::lease_show(config, &table).await,
            LeaseCommand::Hold {
                table,
                hold_for,
                rounds,
                ..
            } => commands::lease_hold(config, &table, hold_for, rounds).await,
        }
    }
}

impl LedgerCommand {
    async fn run(self, config: &Config) -> anyhow::Result<()> {
        match self {
            LedgerCommand::Show { table, limit, .. } => {
                commands::ledger::show(config, &table, limit).await
            }
            LedgerCommand::Skip {
                table,
                file,
                reason,
                ..
            } => commands::ledger::edit(config, &table, &file, Edit::Skip, &reason).await,
            LedgerCommand::Forget {
                table,
                file,
                reason,
                ..
            } => commands::ledger::edit(config, &table, &file, Edit::Forget, &reason).await,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load(cli.command.config()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The container health check runs every few seconds: it stays silent.
    if !matches!(cli.command, Command::Health(_)) {
        telemetry::init_logging(&config.telemetry);
        telemetry::metrics_handle();
    }
    match cli.command.run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
