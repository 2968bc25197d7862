//! `warpline`: parse the command line, install logging, tracing and signal handling, run, and
//! flush the spans still buffered before exiting. `warpline reap`, the reaper `warpline run`
//! starts for itself, runs before any of that: one thread, no runtime.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use warpline_coordinator::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let reap = matches!(cli.command, Command::Reap);
    warpline_executor::reaper::main_with(reap, || warpline(cli))
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
