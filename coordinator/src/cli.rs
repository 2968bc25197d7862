//! The `warpline` command line: `run` (local mode) and the `audit` tools.

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warpline_shared::audit;
use warpline_shared::config::Pipeline;
use warpline_shared::partition;
use warpline_worker::ExecConfig;

use crate::audit_log::AuditLog;
use crate::engine::{Engine, EngineConfig, Event, Observer, Summary};
use crate::local::LocalFleet;
use crate::progress::{Bars, Lines, Quiet, describe};
use crate::supervisor::AgentKind;

/// Warpline: supervised backfills of command-line pipelines.
#[derive(Debug, Parser)]
#[command(name = "warpline", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a backfill in this process: the coordinator and N workers, no services needed.
    Run(RunArgs),
    /// Inspect audit logs.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// The partitions of a backfill.
#[derive(Debug, Clone, Args)]
pub struct PartitionArgs {
    /// Months to cover, inclusive: FROM..TO (YYYY-MM..YYYY-MM) or one YYYY-MM.
    #[arg(long)]
    pub months: Option<String>,
    /// Datasets to cover: a,b,c. With --months, every dataset × every month.
    #[arg(long)]
    pub datasets: Option<String>,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// Bars on a terminal, lines otherwise.
    Auto,
    /// Live progress bars.
    Bars,
    /// One line per event.
    Lines,
    /// Nothing.
    None,
}

/// `warpline run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline config (JSON).
    pub pipeline: PathBuf,
    /// The partitions.
    #[command(flatten)]
    pub partitions: PartitionArgs,
    /// In-process workers (concurrent tool runs).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,
    /// Most runs in progress at once (default: twice --workers, so workers stay busy while
    /// some runs wait out a retry backoff).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_parallel: Option<u32>,
    /// The supervisor agent.
    #[arg(long, value_enum, default_value_t = AgentKind::Rules)]
    pub agent: AgentKind,
    /// The audit log to append to (default: `<workdir>/audit/<backfill id>.jsonl`).
    #[arg(long)]
    pub audit: Option<PathBuf>,
    /// Print a machine-readable summary on standard output.
    #[arg(long)]
    pub json: bool,
    /// Use this workdir instead of the pipeline's (outputs, run directories, default audit log).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Set a pipeline variable: NAME=VALUE (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// How to show progress on standard error.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
}

/// `warpline audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check an audit log's hash chain; names the first bad line.
    Verify {
        /// The JSONL file.
        file: PathBuf,
    },
    /// Print one run's story in order.
    Show {
        /// A run id, a unique prefix of one, or a partition key (e.g. `sales_2024-01`).
        run: String,
        /// The JSONL file.
        #[arg(long, env = "WARPLINE_AUDIT")]
        file: PathBuf,
        /// Print the raw JSON records instead of one line each.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command line; the future resolves to the process's exit code.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run_local(args, shutdown).await,
        Command::Audit(AuditCommand::Verify { file }) => audit_verify(&file),
        Command::Audit(AuditCommand::Show { run, file, json }) => audit_show(&run, &file, json),
    }
}

/// Parses `NAME=VALUE` pairs.
fn parse_vars(vars: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    vars.iter()
        .map(|v| {
            v.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .with_context(|| format!("invalid --var `{v}`: expected NAME=VALUE"))
        })
        .collect()
}

/// `warpline run`: a whole backfill in one process.
pub async fn run_local(args: RunArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let mut pipeline = Pipeline::load(&args.pipeline)?;
    pipeline.set_vars(&parse_vars(&args.vars)?)?;
    if let Some(dir) = &args.workdir {
        pipeline.set_workdir(dir);
    }
    let partitions = partition::expand(
        args.partitions.months.as_deref(),
        args.partitions.datasets.as_deref(),
    )?;
    pipeline.check_partitions(&partitions)?;
    let pipeline = Arc::new(pipeline);

    let backfill_id = Uuid::now_v7();
    let audit_path = args.audit.clone().unwrap_or_else(|| {
        pipeline
            .workdir
            .join("audit")
            .join(format!("{backfill_id}.jsonl"))
    });
    let store = AuditLog::open(&audit_path)?;

    let workers = args.workers as usize;
    let max_parallel = args.max_parallel.map(|m| m as usize).unwrap_or(workers * 2);
    let mut exec = ExecConfig::new("local", pipeline.commands());
    // The DataWarp tools are built beside `warpline`: look there before $PATH.
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
    {
        exec.search_dirs.push(dir);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let fleet = LocalFleet::start(workers, max_parallel, exec, tx.clone());
    let stopper = fleet.stopper();

    let stderr_tty = std::io::stderr().is_terminal();
    let mode = match args.progress {
        ProgressMode::Auto if stderr_tty => ProgressMode::Bars,
        ProgressMode::Auto => ProgressMode::Lines,
        m => m,
    };
    let step_ids: Vec<String> = pipeline.steps().iter().map(|s| s.id.clone()).collect();
    let observer: Box<dyn Observer> = match mode {
        ProgressMode::Bars => Box::new(Bars::new(&step_ids, partitions.len() as u64)),
        ProgressMode::Lines => Box::new(Lines::stderr()),
        _ => Box::new(Quiet),
    };
    eprintln!(
        "warpline: backfill {backfill_id}: {} runs of `{}` on {workers} workers; audit log {}",
        partitions.len(),
        pipeline.name(),
        audit_path.display()
    );

    let cfg = EngineConfig {
        max_parallel,
        exit_when_idle: true,
    };
    let agent = args.agent.build();
    let agent_name = agent.name();
    let mut engine = Engine::new(
        pipeline.clone(),
        backfill_id,
        cfg,
        agent,
        Box::new(store),
        Box::new(fleet),
        observer,
        tx.clone(),
    );
    engine.submit(&partitions, agent_name);

    // A signal becomes one event: the loop cancels every unfinished run and ends.
    let watcher = {
        let tx = tx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            let _ = tx.send(Event::Shutdown {
                reason: "interrupted by a signal (SIGINT or SIGTERM)".into(),
            });
        })
    };
    let summary = engine.run(rx).await;
    watcher.abort();
    // Kill any tool still running and wait for the workers, bounded.
    let clean = stopper.stop(Duration::from_secs(15)).await;
    let summary = summary?;
    if !clean {
        eprintln!("warpline: some workers did not stop within 15 s");
    }
    print_summary(&summary, args.json)?;
    if shutdown.is_cancelled() {
        return Ok(ExitCode::from(130));
    }
    Ok(if summary.all_complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_summary(summary: &Summary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
        return Ok(());
    }
    let counts: Vec<String> = summary
        .counts
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    eprintln!(
        "warpline: {} runs: {}; {} steps executed in {:.1} s",
        summary.runs.len(),
        counts.join(", "),
        summary.steps_executed,
        summary.wall_ms as f64 / 1000.0
    );
    for r in summary.runs.iter().filter(|r| r.state != "COMPLETE") {
        eprintln!(
            "  {} {} at {}: {}",
            r.partition,
            r.state,
            r.step.as_deref().unwrap_or("-"),
            r.reason.as_deref().unwrap_or("")
        );
    }
    eprintln!(
        "warpline: audit log {} (head {})",
        summary.audit, summary.audit_head
    );
    Ok(())
}

fn audit_verify(file: &PathBuf) -> anyhow::Result<ExitCode> {
    let f = std::fs::File::open(file)
        .with_context(|| format!("cannot open the audit log `{}`", file.display()))?;
    match audit::verify(BufReader::new(f)) {
        Ok(v) => {
            println!("ok: {} lines, chain intact, head {}", v.lines, v.head);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("FAILED: `{}`: {e}", file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

fn audit_show(run: &str, file: &PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let read = || -> anyhow::Result<Vec<audit::AuditRecord>> {
        let f = std::fs::File::open(file)
            .with_context(|| format!("cannot open the audit log `{}`", file.display()))?;
        let mut out = Vec::new();
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line?;
            let (rec, _) =
                audit::parse_line(&line).map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
            out.push(rec);
        }
        Ok(out)
    };
    let records = read()?;
    // Resolve the run: an id, a unique id prefix, or a partition key.
    let mut matches: Vec<(Uuid, String)> = records
        .iter()
        .filter_map(|r| match (&r.event, r.run_id) {
            (audit::AuditEvent::RunCreated { partition }, Some(id)) => Some((id, partition.key())),
            _ => None,
        })
        .filter(|(id, key)| id.to_string().starts_with(run) || key == run)
        .collect();
    matches.dedup();
    let (id, key) = match matches.as_slice() {
        [one] => one.clone(),
        [] => bail!(
            "no run matching `{run}` in `{}`: give a run id, an id prefix or a partition key",
            file.display()
        ),
        many => {
            let list: Vec<String> = many
                .iter()
                .map(|(id, key)| format!("{id} ({key})"))
                .collect();
            bail!(
                "`{run}` matches {} runs: {}; give a longer id",
                many.len(),
                list.join(", ")
            )
        }
    };
    println!("run {id} ({key})");
    for r in records.iter().filter(|r| r.run_id == Some(id)) {
        if json {
            println!("{}", serde_json::to_string(r)?);
        } else if let Some(line) = describe(&key, r).or_else(|| transition_line(r)) {
            println!("{:>5} {line}", r.seq);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn transition_line(r: &audit::AuditRecord) -> Option<String> {
    match &r.event {
        audit::AuditEvent::Transition { from, to, action } => Some(format!(
            "{} state {from} → {to}{}",
            r.ts.format("%H:%M:%S%.3f"),
            action.map(|a| format!(" ({a})")).unwrap_or_default()
        )),
        audit::AuditEvent::RunCreated { partition } => Some(format!(
            "{} created for {partition}",
            r.ts.format("%H:%M:%S%.3f")
        )),
        _ => None,
    }
}
