//! `warpline-worker`: parses the command line, logs to stderr and hands over to
//! [`warpline_worker::cli::run`] with a shutdown token that SIGINT and SIGTERM cancel.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use warpline_amqp::shutdown;
use warpline_worker::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs collected from a file or a container stay greppable.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let token = CancellationToken::new();
    if let Err(e) = shutdown::cancel_on_signals(token.clone()) {
        eprintln!("error: cannot listen for SIGINT and SIGTERM: {e}");
        return ExitCode::from(2);
    }
    match cli::run(cli, token).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
