//! `warpline-worker`: parses the command line, installs logging and tracing, and hands over to
//! [`warpline_worker::cli::run`] with a shutdown token that SIGINT and SIGTERM cancel; flushes
//! the spans still buffered before exiting. `warpline-worker reap`, the reaper a worker starts
//! for itself, runs before any of that: one thread, no runtime.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use warpline_amqp::shutdown;
use warpline_worker::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let reap = matches!(cli.command, Some(Command::Reap));
    warpline_executor::reaper::main_with(reap, || worker(cli))
}

async fn worker(cli: Cli) -> ExitCode {
    let telemetry = match warpline_telemetry::init("warpline-worker", cli.log.log_format, "info") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let token = CancellationToken::new();
    if let Err(e) = shutdown::cancel_on_signals(token.clone()) {
        eprintln!("error: cannot listen for SIGINT and SIGTERM: {e}");
        return ExitCode::from(2);
    }
    let code = match cli::run(cli, token).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    };
    telemetry.shutdown().await;
    code
}
