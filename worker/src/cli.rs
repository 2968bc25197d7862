//! The `warpline-worker` command line.
//!
//! Without a subcommand the worker runs in fleet mode: it consumes its pool's StepSpecs from
//! RabbitMQ until SIGINT or SIGTERM ([`crate::consumer`]). Every flag has an environment
//! fallback (`WARPLINE_AMQP_URL`, `WARPLINE_POOL`, ...), so a container is configured by its
//! environment alone. `exec` runs one StepSpec from a file, which is how a tool's spec is tried
//! by hand and how the executor is tested end to end.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use warpline_shared::contracts::{ReportStatus, StepSpec};

use crate::consumer::{self, WorkerConfig};
use warpline_amqp::{Backoff, FleetArgs};
use warpline_executor::allow::{parse_allowlist as allowlist, tools_dirs};
use warpline_executor::reaper::Reaper;
use warpline_executor::settings::{Confinement, PathArgs};
use warpline_executor::{DEFAULT_TAIL_BYTES, ExecConfig, run_step};

/// Warpline's worker: runs pipeline steps and reports what they did.
///
/// Without a subcommand, consumes StepSpecs from RabbitMQ (fleet mode).
#[derive(Debug, Parser)]
#[command(
    name = "warpline-worker",
    version = env!("WARPLINE_LONG_VERSION"),
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; fleet mode when absent.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Fleet mode's settings.
    #[command(flatten)]
    pub consume: ConsumeArgs,
    /// Log format (also for `exec`).
    #[command(flatten)]
    pub log: warpline_telemetry::LogArgs,
}

/// Settings of fleet mode (the default command).
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The broker and the fleet's names on it (shared with `warpline serve`).
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// The worker pool (queue) to consume.
    #[arg(long, env = "WARPLINE_POOL", default_value = "default")]
    pub pool: String,
    /// Steps run at once (and the broker prefetch, unless `--prefetch` says more).
    #[arg(long, env = "WARPLINE_SLOTS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub slots: u16,
    /// StepSpecs the broker may hand this worker ahead of a free slot (at least `--slots`,
    /// which is the default). More than the slots lets a slot start its next step as soon as
    /// its tool exits, while the last one's outcome is still being confirmed: for short
    /// steps. A spec held here waits for a slot of this worker, not for another worker, so
    /// keep it at `--slots` when steps are long.
    #[arg(long, env = "WARPLINE_PREFETCH", value_name = "N")]
    pub prefetch: Option<u16>,
    /// What this worker may run, comma-separated (required): a program, optionally followed
    /// by the arguments it is pinned to, e.g. `load-batch,/opt/venv/bin/python
    /// /opt/tc/url_to_manifest.py`. Relative paths are taken from the current directory.
    #[arg(
        long,
        env = "WARPLINE_ALLOW",
        value_delimiter = ',',
        value_name = "ENTRY,..."
    )]
    pub allow: Vec<String>,
    /// Directories searched for a bare command name before `PATH` (repeatable; the variable
    /// takes a `:`-separated list). Nothing else is searched: not the worker's own directory.
    #[arg(
        long = "tools-dir",
        env = "WARPLINE_TOOLS_DIR",
        value_delimiter = ':',
        value_name = "DIR"
    )]
    pub tools_dirs: Vec<PathBuf>,
    /// Where `{secret:NAME}` references are read from: the file `NAME` in this directory.
    #[arg(long, env = "WARPLINE_SECRETS_DIR", value_name = "DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// Which paths a step's arguments may name (shared with `exec` and `warpline run`).
    #[command(flatten)]
    pub paths: PathArgs,
    /// Names this worker in heartbeats and results [default: <hostname>-<pid>].
    #[arg(long, env = "WARPLINE_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, env = "WARPLINE_HEARTBEAT_S", default_value_t = 5.0)]
    pub heartbeat_s: f64,
    /// Seconds running steps may go on after SIGTERM before they are cancelled and requeued.
    #[arg(long, env = "WARPLINE_DRAIN_S", default_value_t = 30.0)]
    pub drain_s: f64,
    /// Seconds between SIGTERM and SIGKILL when a tool times out or is cancelled.
    #[arg(long, default_value_t = 5.0)]
    pub kill_grace_s: f64,
    /// Bytes of stdout+stderr kept in each result's log tail.
    #[arg(long, default_value_t = DEFAULT_TAIL_BYTES)]
    pub tail_bytes: usize,
    /// Serve Prometheus metrics at `http://ADDR/metrics`, and `/healthz` and `/readyz` (ready
    /// while connected to the broker), e.g. `0.0.0.0:9091`; off when unset.
    #[arg(long, env = "WARPLINE_METRICS", value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// The worker's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one StepSpec from a JSON file and print its StepOutcome as JSON on stdout.
    ///
    /// Exits 0 when the tool succeeded and every error-severity check passed, 1 otherwise.
    Exec(ExecArgs),
    /// Shell completions and man pages.
    #[command(flatten)]
    Dist(warpline_telemetry::dist::DistCommand),
    /// The reaper a worker starts for itself (internal): kills the process groups the worker
    /// registers on its standard input once that reaches end of file, i.e. once the worker is
    /// gone. See `warpline_executor::reaper`.
    #[command(hide = true)]
    Reap,
}

/// The hidden subcommand that runs the reaper ([`Command::Reap`]).
pub const REAP: &str = "reap";

/// Starts this binary again as the reaper of this process's tools (`warpline-worker reap`).
pub fn start_reaper() -> anyhow::Result<Arc<Reaper>> {
    let exe = std::env::current_exe().context("cannot find this worker's own binary")?;
    let reaper = Reaper::start(&exe, &[REAP])
        .with_context(|| format!("cannot start the reaper `{} {REAP}`", exe.display()))?;
    tracing::info!(reaper_pid = reaper.pid(), "reaper started");
    Ok(Arc::new(reaper))
}

/// What a worker whose reaper exited says as it stops.
fn reaper_lost(reaper: &Reaper) -> anyhow::Error {
    anyhow::anyhow!(
        "the reaper (pid {}) exited, so tools would no longer die with this worker: stopped; restart the worker",
        reaper.pid()
    )
}

/// A token cancelled by `shutdown` and by the reaper's exit.
fn until_reaper_lost(shutdown: &CancellationToken, reaper: &Reaper) -> CancellationToken {
    let stop = shutdown.child_token();
    let (lost, token) = (reaper.exited(), stop.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = lost.cancelled() => token.cancel(),
            () = token.cancelled() => {}
        }
    });
    stop
}

/// Arguments of `warpline-worker exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The StepSpec file (JSON).
    pub spec: PathBuf,
    /// Allowlist entries, comma-separated (as for fleet mode). Without it, only the spec's own
    /// command is allowed: running a spec file by hand is the operator's own choice.
    #[arg(long, value_delimiter = ',', value_name = "ENTRY,...")]
    pub allow: Vec<String>,
    /// Directories searched for a bare command name before `PATH`.
    #[arg(
        long = "tools-dir",
        env = "WARPLINE_TOOLS_DIR",
        value_delimiter = ':',
        value_name = "DIR"
    )]
    pub tools_dirs: Vec<PathBuf>,
    /// Where `{secret:NAME}` references are read from.
    #[arg(long, env = "WARPLINE_SECRETS_DIR", value_name = "DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// Which paths a step's arguments may name (shared with `exec` and `warpline run`).
    #[command(flatten)]
    pub paths: PathArgs,
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
        Some(Command::Exec(args)) => exec(args, shutdown).await,
        Some(Command::Dist(dist)) => {
            dist.run(
                <Cli as clap::CommandFactory>::command(),
                &mut std::io::stdout(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Reap) => {
            // `main` runs the reaper before building a runtime; this is for a caller of `run`.
            warpline_executor::reaper::serve(std::io::stdin().lock())
                .context("the reaper cannot read its standard input")?;
            Ok(ExitCode::SUCCESS)
        }
        None => fleet(cli.consume, shutdown).await,
    }
}

/// Fleet mode: consume StepSpecs until shutdown. The signing key comes only from
/// `WARPLINE_SIGNING_KEY` (never a flag, which `ps` would show); empty means unset.
pub async fn fleet(args: ConsumeArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let signing_key = warpline_amqp::signing_key();
    let metrics_addr = args.metrics;
    let mut cfg = fleet_config(args, signing_key)?;
    let reaper = start_reaper()?;
    cfg.exec.reaper = Some(reaper.clone());
    // A worker whose reaper exited stops as on SIGTERM (steps it is handed meanwhile are handed
    // back: `unrunnable`), then exits with an error so that it is restarted.
    let shutdown = until_reaper_lost(&shutdown, &reaper);
    // The metrics stay up while the worker drains, and stop once it has.
    let metrics_stop = CancellationToken::new();
    let server = match metrics_addr {
        Some(addr) => {
            let registry = crate::metrics::get().registry.clone();
            // Ready while a broker session is up.
            let ready = || crate::metrics::get().connected.get() > 0;
            let (bound, task) =
                warpline_telemetry::prom::serve(addr, registry, ready, metrics_stop.clone())
                    .await?;
            tracing::info!(%bound, "serving Prometheus metrics at /metrics");
            Some(task)
        }
        None => None,
    };
    let ended = consumer::run(cfg, shutdown).await;
    metrics_stop.cancel();
    if let Some(task) = server {
        let _ = task.await;
    }
    ended?;
    if !reaper.alive() {
        return Err(reaper_lost(&reaper));
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks fleet mode's flags and builds its config.
pub fn fleet_config(
    args: ConsumeArgs,
    signing_key: Option<Vec<u8>>,
) -> anyhow::Result<WorkerConfig> {
    let allowlist = allowlist(&args.allow)?;
    anyhow::ensure!(
        !allowlist.is_empty(),
        "no commands allowed: pass --allow ENTRY,... (or set WARPLINE_ALLOW) naming the tools this worker may run, e.g. `--allow url_to_manifest,enrich_manifest,load-batch,export_to_parquet`"
    );
    anyhow::ensure!(!args.pool.is_empty(), "--pool must not be empty");
    let worker_id = args.worker_id.unwrap_or_else(default_worker_id);
    anyhow::ensure!(
        !worker_id.is_empty() && worker_id.len() <= 200,
        "--worker-id must be 1 to 200 bytes long"
    );
    let secs = |name: &str, v: f64| {
        Duration::try_from_secs_f64(v)
            .with_context(|| format!("--{name} must be a non-negative number of seconds"))
    };
    let heartbeat = secs("heartbeat-s", args.heartbeat_s)?;
    anyhow::ensure!(
        heartbeat >= Duration::from_millis(100),
        "--heartbeat-s must be at least 0.1"
    );
    let mut cfg = WorkerConfig {
        topology: args.fleet.topology(),
        amqp_url: args.fleet.connection_url(),
        pool: args.pool,
        slots: args.slots,
        prefetch: prefetch(args.slots, args.prefetch)?,
        heartbeat,
        drain: secs("drain-s", args.drain_s)?,
        signing_key,
        exec: ExecConfig {
            worker_id,
            allowlist,
            tools_dirs: tools_dirs(args.tools_dirs)?,
            secrets_dir: args.secrets_dir,
            tail_bytes: args.tail_bytes,
            kill_grace: secs("kill-grace-s", args.kill_grace_s)?,
            confine_args: true,
            path_roots: Vec::new(),
            reaper: None,
        },
        backoff: Backoff::default(),
    };
    args.paths.apply(&mut cfg.exec, Confinement::ByDefault)?;
    Ok(cfg)
}

/// The broker prefetch: `--prefetch`, or the slots; never fewer than the slots.
fn prefetch(slots: u16, prefetch: Option<u16>) -> anyhow::Result<u16> {
    let n = prefetch.unwrap_or(slots);
    anyhow::ensure!(
        n >= slots,
        "--prefetch {n} is less than --slots {slots}: a slot would wait for a delivery the broker may not send; give at least {slots}"
    );
    Ok(n)
}

/// `<hostname>-<pid>`, or `worker-<pid>` when the hostname cannot be read.
fn default_worker_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_string());
    format!("{host}-{}", std::process::id())
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
        allowlist(&args.allow)?
    };
    let kill_grace = Duration::try_from_secs_f64(args.kill_grace_s)
        .context("--kill-grace-s must be a non-negative number of seconds")?;
    let mut cfg = ExecConfig {
        worker_id: args
            .worker_id
            .unwrap_or_else(|| format!("exec-{}", std::process::id())),
        allowlist,
        tools_dirs: tools_dirs(args.tools_dirs)?,
        secrets_dir: args.secrets_dir,
        tail_bytes: args.tail_bytes,
        kill_grace,
        confine_args: true,
        path_roots: Vec::new(),
        reaper: None,
    };
    args.paths.apply(&mut cfg, Confinement::ByDefault)?;
    let reaper = start_reaper()?;
    cfg.reaper = Some(reaper.clone());
    let outcome = run_step(&spec, &cfg, &until_reaper_lost(&shutdown, &reaper)).await;
    println!(
        "{}",
        serde_json::to_string_pretty(&outcome).context("cannot serialise the outcome")?
    );
    if !reaper.alive() {
        // The step was cancelled (its tool killed) when the reaper went, or it ended anyway.
        return Err(reaper_lost(&reaper));
    }
    Ok(
        if outcome.result.succeeded() && outcome.report.status == ReportStatus::Pass {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}
