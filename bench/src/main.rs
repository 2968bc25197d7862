//! `warpline-bench`: the fleet benchmark. It starts a real `warpline serve` and real
//! `warpline-worker` processes (the release build beside this binary) against the local
//! RabbitMQ and PostgreSQL, each repetition in its own database schema and queue prefix, submits
//! a backfill with `warpline submit`, waits for it by reading the coordinator's audit log, and
//! tears everything down. What it measures and how is in `docs/BENCHMARKS.md`; [`scenario`]
//! holds the scenarios, [`fleet`] the processes, [`measure`] the arithmetic, [`peer`] the Celery
//! peer of `versus`, [`otlp`] the tracing scenario's sink.

mod fleet;
mod measure;
mod otlp;
mod peer;
mod scenario;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = scenario::Cli::parse();
    match scenario::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
