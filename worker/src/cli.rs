//! The `warpline-worker` command line: one subcommand per way of running the worker.
//!
//! `exec` runs one StepSpec from a file, which is how a tool's spec is tried by hand and how the
//! executor is tested end to end. Fleet mode (a queue consumer with `--amqp-url`, `--pool` and
//! `--slots`) is meant to be added as another [`Command`] variant.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use warpline_shared::contracts::{ReportStatus, StepSpec};

use crate::executor::{DEFAULT_TAIL_BYTES, ExecConfig, run_step};

/// Warpline's worker: runs pipeline steps and reports what they did.
#[derive(Debug, Parser)]
#[command(name = "warpline-worker", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The worker's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one StepSpec from a JSON file and print its StepOutcome as JSON on stdout.
    ///
    /// Exits 0 when the tool succeeded and every error-severity check passed, 1 otherwise.
    Exec(ExecArgs),
}

/// Arguments of `warpline-worker exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The StepSpec file (JSON).
    pub spec: PathBuf,
    /// Commands this run may start, comma-separated. Without it, only the spec's own command is
    /// allowed: running a spec file by hand is the operator's own choice.
    #[arg(long, value_delimiter = ',', value_name = "CMD,...")]
    pub allow: Vec<String>,
    /// Names this worker in the result.
    #[arg(long, env = "WARPLINE_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Bytes of stdout+stderr kept in the result's log tail.
    #[arg(long, default_value_t = DEFAULT_TAIL_BYTES)]
    pub tail_bytes: usize,
    /// Seconds between SIGTERM and SIGKILL when the tool times out or is cancelled.
    #[arg(long, default_value_t = 5.0)]
    pub kill_grace_s: f64,
}

/// Runs the parsed command line until it finishes or `shutdown` is cancelled.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Exec(args) => exec(args, shutdown).await,
    }
}

/// `warpline-worker exec`: runs one spec and prints its outcome.
pub async fn exec(args: ExecArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let text = tokio::fs::read_to_string(&args.spec)
        .await
        .with_context(|| format!("cannot read the step spec `{}`", args.spec.display()))?;
    let spec: StepSpec = serde_json::from_str(&text).with_context(|| {
        format!(
            "`{}` is not a valid StepSpec; see shared/schema for its shape",
            args.spec.display()
        )
    })?;
    let allowlist: BTreeSet<String> = if args.allow.is_empty() {
        tracing::info!(command = %spec.command, "no --allow given; allowing the spec's own command");
        BTreeSet::from([spec.command.clone()])
    } else {
        args.allow.into_iter().filter(|c| !c.is_empty()).collect()
    };
    let kill_grace = Duration::try_from_secs_f64(args.kill_grace_s)
        .context("--kill-grace-s must be a non-negative number of seconds")?;
    let cfg = ExecConfig {
        worker_id: args
            .worker_id
            .unwrap_or_else(|| format!("exec-{}", std::process::id())),
        allowlist,
        search_dirs: binary_dir().into_iter().collect(),
        tail_bytes: args.tail_bytes,
        kill_grace,
    };
    let outcome = run_step(&spec, &cfg, &shutdown).await;
    println!(
        "{}",
        serde_json::to_string_pretty(&outcome).context("cannot serialise the outcome")?
    );
    Ok(
        if outcome.result.succeeded() && outcome.report.status == ReportStatus::Pass {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// The directory holding the running binary, where sibling tools are looked for first.
fn binary_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.parent().map(PathBuf::from)
}
