//! `warpline`: parse the command line, install tracing and signal handling, run.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use warpline_coordinator::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WARPLINE_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a coordinator's log collected from a file or a container
        // stays greppable (as the worker's does).
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let shutdown = CancellationToken::new();
    if let Err(e) = warpline_amqp::shutdown::cancel_on_signals(shutdown.clone()) {
        eprintln!("error: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    match cli::run(cli, shutdown).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
