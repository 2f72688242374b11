//! `cdc-worker-dev`: the development tools beside the daemon. They create LocalStack
//! resources, write simulated DMS output, run the demo and the benchmark. Operators run
//! `cdc-worker`; nothing here is needed in production.

mod bench;
mod demo;
mod simulate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cdc_worker::config::Config;
use cdc_worker::telemetry;

#[derive(Parser)]
#[command(
    name = "cdc-worker-dev",
    version,
    about = "Development tools for cdc-worker: LocalStack setup, simulated DMS output, the demo and the benchmark"
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
    /// Create the bucket, queue (with DLQ), notification and alerts topic the config names
    /// (for LocalStack and test accounts; production uses deploy/cloudformation).
    DevSetup(ConfigArg),
    /// Print (and remove) the alerts waiting in the inbox queue dev-setup subscribed to the
    /// alerts topic: the subject, then the JSON body, one alert per line pair.
    Alerts(ConfigArg),
    /// Write realistic DMS output (full load, then CDC) into the source bucket.
    Simulate {
        #[command(flatten)]
        config: ConfigArg,
        /// Seed of the generated data.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Pause between uploads, in milliseconds.
        #[arg(long, default_value_t = 0)]
        pace_ms: u64,
    },
    /// Set up LocalStack resources, simulate DMS, run the worker until every file is
    /// applied, and print the target tables and the alerts.
    Demo(ConfigArg),
    /// Measure throughput and latency on LocalStack (release build recommended).
    Bench(Box<bench::BenchArgs>),
    /// The benchmark's floor, run by `bench` as a process of its own.
    #[command(hide = true)]
    BenchFloor {
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long)]
        db: PathBuf,
    },
}

fn load(arg: &ConfigArg) -> Result<Config, ExitCode> {
    Config::load(arg.config.as_deref()).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match &cli.command {
        Command::DevSetup(c)
        | Command::Demo(c)
        | Command::Alerts(c)
        | Command::Simulate { config: c, .. } => match load(c) {
            Ok(config) => {
                telemetry::init_logging(&config.telemetry);
                telemetry::metrics_handle();
                Some(config)
            }
            Err(code) => return code,
        },
        Command::Bench(_) | Command::BenchFloor { .. } => None,
    };
    let result = match cli.command {
        Command::DevSetup(_) => demo::dev_setup(&config.expect("loaded")).await.map(|_| ()),
        Command::Simulate { seed, pace_ms, .. } => {
            demo::simulate(&config.expect("loaded"), seed, pace_ms)
                .await
                .map(|_| ())
        }
        Command::Demo(_) => demo::demo(config.expect("loaded")).await,
        Command::Alerts(_) => demo::print_alerts(&config.expect("loaded")).await,
        Command::Bench(args) => bench::run(*args).await,
        Command::BenchFloor { manifest, db } => bench::floor_child(&manifest, &db),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
