//! `warpline`: parse the command line, install logging, tracing and signal handling, run, and
//! flush the spans still buffered before exiting. `warpline reap`, the reaper `warpline run`
//! starts for itself, runs before any of that: one thread, no runtime.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use warpline_coordinator::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Reap) {
        return match warpline_executor::reaper::serve(std::io::stdin().lock()) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: the reaper cannot read its standard input: {e}");
                ExitCode::from(2)
            }
        };
    }
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(warpline(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(2)
        }
    }
}

async fn warpline(cli: Cli) -> ExitCode {
    let telemetry = match warpline_telemetry::init("warpline", cli.log.log_format, "warn") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    if let Err(e) = warpline_amqp::shutdown::cancel_on_signals(shutdown.clone()) {
        eprintln!("error: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    let code = match cli::run(cli, shutdown).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    };
    telemetry.shutdown().await;
    code
}
