//! `warpline run`: a whole backfill in one process (local mode).
//!
//! Before anything runs, every step of every partition is rendered and checked as a worker
//! would check it ([`super::preflight`]): its command resolves (an explicit path, or a name in
//! the `--tools-dir` directories then `PATH`) and is allowed, its secrets resolve. `--dry-run`
//! stops there and prints what would run.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warpline_executor::ExecConfig;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::Action;
use warpline_shared::machine::{RunState, RunStatus};
use warpline_shared::partition::{self, Partition, PartitionsFormat};
use warpline_shared::stage::RunScope;

use super::{ProgressMode, RunArgs};
use crate::api::{EngineHandle, protect};
use crate::audit_log::AuditLog;
use crate::auth::Auth;
use crate::engine::{
    BackfillRequest, Engine, EngineConfig, Event, Observer, OperatorCommand, Summary,
};
use crate::local::LocalFleet;
use crate::progress::{Bars, Lines, Quiet};
use crate::reprocess::{self, Reprocess};
use crate::resume;
use crate::supervisor::settings::{AgentOverrides, build_agent};
use crate::supervisor::{Agent, AgentTotals};
use crate::ui;

/// Parses `NAME=VALUE` pairs.
pub(crate) fn parse_vars(vars: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    vars.iter()
        .map(|v| {
            v.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .with_context(|| format!("invalid --var `{v}`: expected NAME=VALUE"))
        })
        .collect()
}

/// Reads a partitions file (CSV, or JSON when it ends in `.json`).
pub(super) fn read_partitions(file: &std::path::Path) -> anyhow::Result<Vec<Partition>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the partitions file `{}`", file.display()))?;
    let name = file.display().to_string();
    Ok(partition::parse_partitions_file(
        &name,
        &text,
        PartitionsFormat::of(&name),
    )?)
}

/// `warpline run`: a whole backfill in one process.
pub async fn run_local(args: RunArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let given = || -> anyhow::Result<Vec<Partition>> {
        Ok(match &args.partitions_file {
            Some(file) => read_partitions(file)?,
            None => partition::expand(
                args.partitions.months.as_deref(),
                args.partitions.datasets.as_deref(),
            )?,
        })
    };
    // A resume takes its partitions from the backfill it continues.
    let earlier = match &args.resume {
        Some(prefix) => Some(find_resumed(&args, prefix)?),
        None => None,
    };
    let mut partitions = match &earlier {
        Some(e) => {
            let named = args.partitions.months.is_some()
                || args.partitions.datasets.is_some()
                || args.partitions_file.is_some();
            if named {
                same_partitions(&given()?, &e.partitions, e.found.backfill_id)?;
            }
            e.partitions.clone()
        }
        None => given()?,
    };
    let mut pipeline =
        Pipeline::load_with_partition_vars(&args.pipeline, partition::var_names(&partitions))?;
    pipeline.set_vars(&parse_vars(&args.vars)?)?;
    if let Some(dir) = &args.workdir {
        pipeline.set_workdir(dir);
    }
    pipeline.check_partitions(&partitions)?;
    let replayed = match &earlier {
        Some(e) => {
            let r = resume::replay(&e.records, e.found.backfill_id, &pipeline)?;
            if r.backfill.cancelling {
                anyhow::bail!(
                    "backfill {} was cancelled by an operator and stays cancelled: start a new backfill instead (`--reprocess failed` skips the partitions that completed)",
                    r.backfill.id
                );
            }
            resume::check_unchanged(&r, &pipeline)?;
            Some(r)
        }
        None => None,
    };
    let answers = match &replayed {
        Some(r) => resolutions(&args, r)?,
        None => Vec::new(),
    };
    let mode = args.reprocess.unwrap_or_default();
    if replayed.is_none() && mode != Reprocess::All {
        let files = resume::audit_files(&pipeline.workdir, args.audit.as_deref());
        let mut states = Vec::new();
        for f in &files {
            for (key, state, _) in resume::run_states(&resume::read_log(f)?, pipeline.name()) {
                // Local backfills in these logs have no process left to drive them.
                states.push((key, state, false));
            }
        }
        let (kept, skipped) = reprocess::select(partitions, &reprocess::earlier(states), mode);
        if !skipped.is_empty() {
            eprintln!("warpline: {}", skipped.describe(mode));
        }
        if kept.is_empty() {
            eprintln!(
                "warpline: nothing to run: every partition was skipped; `--reprocess all` runs them again"
            );
            return Ok(ExitCode::SUCCESS);
        }
        partitions = kept;
    }
    let pipeline = Arc::new(pipeline);

    let mut exec = ExecConfig::new("local", Vec::<String>::new());
    exec.tools_dirs = warpline_executor::allow::tools_dirs(args.tools_dirs.clone())?;
    exec.secrets_dir = args.secrets_dir.clone();
    args.paths.clone().apply(
        &mut exec,
        warpline_executor::settings::Confinement::OnRequest,
    )?;
    exec.allowlist = if args.allow.is_empty() {
        // The pipeline is the operator's own: each step may run its own command.
        let mut own = BTreeSet::new();
        let views = super::preflight::Views::of(&pipeline);
        for (scope, p) in pipeline.plan(&partitions) {
            let view = views.get(scope);
            for i in 0..view.steps().len() {
                own.insert(view.render_command(i, &p)?);
            }
        }
        own
    } else {
        warpline_executor::allow::parse_allowlist(&args.allow)?
    };
    let (problems, programs) = super::preflight::preflight(&pipeline, &partitions, &exec);
    if !problems.is_empty() {
        anyhow::bail!(
            "preflight failed, nothing was run:\n  - {}",
            problems.join("\n  - ")
        );
    }
    if args.dry_run {
        print!(
            "{}",
            super::preflight::dry_run(&pipeline, &partitions, &programs)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    // Tools die with this process (SIGKILL, the OOM killer), their whole process group:
    // this binary again, as the reaper of the groups it registers, and the tools start with
    // `posix_spawn` rather than a fork of this multi-threaded process.
    let exe = std::env::current_exe().context("cannot find this program's own binary")?;
    let reaper =
        warpline_executor::reaper::Reaper::start(&exe, &[super::REAP]).with_context(|| {
            format!(
                "cannot start the reaper `{} {}`",
                exe.display(),
                super::REAP
            )
        })?;
    exec.reaper = Some(Arc::new(reaper));
    // The agent is set up before anything runs, so a missing API key stops the backfill here.
    let overrides = AgentOverrides {
        kind: args.agent.map(Into::into),
        model: args.llm.llm_model.clone(),
        base_url: args.llm.llm_base_url.clone(),
        shadow: args.shadow,
    };
    let agent = build_agent(&pipeline.config.agent, &overrides, &|k| {
        std::env::var(k).ok()
    })?;
    let agent_stats = agent.stats();
    let agent_model = agent.llm_agent().map(|l| l.settings().model.clone());

    let backfill_id = match &earlier {
        Some(e) => e.found.backfill_id,
        None => Uuid::now_v7(),
    };
    let audit_path = match &earlier {
        Some(e) => e.found.file.clone(),
        None => args.audit.clone().unwrap_or_else(|| {
            pipeline
                .workdir
                .join("audit")
                .join(format!("{backfill_id}.jsonl"))
        }),
    };
    let store = AuditLog::open(&audit_path)?;

    let workers = args.workers as usize;
    let max_parallel = args.max_parallel.map(|m| m as usize).unwrap_or(workers * 2);
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The dashboard, on request: the same pages as `serve`'s, over this process's loop.
    let dashboard = match args.ui {
        Some(addr) => Some(start_dashboard(addr, tx.clone(), audit_path.clone()).await?),
        None => None,
    };
    let fleet = LocalFleet::start(workers, max_parallel, exec, tx.clone());
    let stopper = fleet.stopper();

    let stderr_tty = std::io::stderr().is_terminal();
    let mode = match args.progress {
        ProgressMode::Auto if stderr_tty => ProgressMode::Bars,
        ProgressMode::Auto => ProgressMode::Lines,
        m => m,
    };
    let observer: Box<dyn Observer> = match mode {
        ProgressMode::Bars => Box::new(bars(&pipeline, &partitions)),
        ProgressMode::Lines => Box::new(Lines::stderr()),
        _ => Box::new(Quiet),
    };
    let observer = crate::spans::TraceObserver::wrap(observer);
    eprintln!(
        "warpline: {} {backfill_id}: {} runs of `{}` on {workers} workers; audit log {}",
        if replayed.is_some() {
            "resuming backfill"
        } else {
            "backfill"
        },
        partitions.len(),
        pipeline.name(),
        audit_path.display()
    );

    let cfg = EngineConfig {
        exit_when_idle: true,
        // Local mode keeps its history in the audit log only; nothing to prune.
        retention: None,
    };
    let agent_name = agent.name();
    let mut engine = Engine::new(
        cfg,
        Arc::new(agent),
        Box::new(store),
        Box::new(fleet),
        observer,
        tx.clone(),
    );
    // The resume's operator commands: their answers must be awaited, or the loop drops them.
    let mut replies = Vec::new();
    match replayed {
        Some(mut r) => {
            r.backfill.max_parallel = max_parallel;
            let operator = operator_name(&args);
            let escalated: Vec<Uuid> = r
                .runs
                .iter()
                .filter(|run| matches!(run.machine.state(), RunState::Escalated(_)))
                .map(|run| run.id)
                .collect();
            let halted = r
                .runs
                .iter()
                .any(|run| matches!(run.machine.state(), RunState::Halted(_)));
            let skipped = r
                .runs
                .iter()
                .filter(|run| run.machine.state() == RunState::Complete)
                .count();
            eprintln!(
                "warpline: {skipped} of {} runs completed before and are skipped",
                r.runs.len()
            );
            engine.resume(
                r.backfill,
                pipeline.clone(),
                r.runs,
                &r.interrupted,
                &operator,
            );
            let reason = args
                .reason
                .clone()
                .unwrap_or_else(|| "taken up by `warpline run --resume`".into());
            // HALTED runs resume at the step that failed, as `retry-failed` does in fleet mode;
            // first, so a run the operator answers `halt` below stays halted.
            if halted {
                let (tx, rx) = tokio::sync::oneshot::channel();
                engine.handle(Event::Operator(
                    OperatorCommand::RetryFailed {
                        backfill_id,
                        operator: operator.clone(),
                    },
                    tx,
                ));
                replies.push(rx);
            }
            for run_id in escalated {
                let action = answers
                    .iter()
                    .find(|(id, _)| *id == run_id)
                    .map(|(_, a)| *a)
                    .unwrap_or(Action::Retry);
                let (tx, rx) = tokio::sync::oneshot::channel();
                let cmd = OperatorCommand::Resolve {
                    run_id,
                    action,
                    reason: reason.clone(),
                    operator: operator.clone(),
                };
                engine.handle(Event::Operator(cmd, tx));
                replies.push(rx);
            }
        }
        None => {
            engine.submit(BackfillRequest {
                id: backfill_id,
                pipeline: pipeline.clone(),
                partitions,
                max_parallel,
                priority: 0,
                request: None,
                reprocess: Default::default(),
            });
        }
    }

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
    let engine = engine.run(&mut rx).await;
    watcher.abort();
    for mut reply in replies {
        if let Ok(Err(e)) = reply.try_recv() {
            eprintln!("warpline: an answer of the resume was refused: {e}");
        }
    }
    // Kill any tool still running and wait for the workers, bounded.
    let clean = stopper.stop(Duration::from_secs(15)).await;
    let mut engine = engine?;
    let summary = engine.summary(backfill_id);
    if !clean {
        eprintln!("warpline: some workers did not stop within 15 s");
    }
    let usage = AgentUsage {
        name: agent_name,
        model: agent_model,
        totals: agent_stats.totals(),
    };
    print_summary(&summary, &usage, args.json)?;
    let interrupted = shutdown.is_cancelled();
    if let Some((d, handle)) = dashboard {
        if args.ui_stay && !interrupted {
            handle.mark_ended();
            stay(&mut engine, &mut rx, &shutdown).await;
        }
        d.abort();
    }
    if interrupted {
        return Ok(ExitCode::from(130));
    }
    if args.fail_on_warn && summary.warnings > 0 {
        eprintln!(
            "warpline: {} warnings and --fail-on-warn: exiting 1",
            summary.warnings
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(if summary.all_complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The backfill `--resume` continues: where it is, its records and its partitions.
struct Resumed {
    found: resume::Found,
    records: Vec<AuditRecord>,
    partitions: Vec<Partition>,
}

/// Finds the backfill to resume: the latest of the pipeline in `--audit FILE`, or else in the
/// workdir's `audit/` directory (`prefix` empty), or the one whose id starts with `prefix`.
fn find_resumed(args: &RunArgs, prefix: &str) -> anyhow::Result<Resumed> {
    let (name, workdir) = name_and_workdir(args)?;
    let files = match &args.audit {
        Some(f) => vec![f.clone()],
        None => resume::audit_files(&workdir, None),
    };
    let prefix = (!prefix.trim().is_empty()).then_some(prefix.trim());
    let found = resume::find_backfill(&files, &name, prefix)?;
    let records = resume::read_log(&found.file)?;
    let partitions = records
        .iter()
        .filter(|r| r.backfill_id == Some(found.backfill_id))
        .filter_map(|r| match &r.event {
            // The partitions' runs; the backfill-level ones come from the pipeline again.
            AuditEvent::RunCreated { partition, scope } if scope.is_partition() => {
                Some(partition.clone())
            }
            _ => None,
        })
        .collect();
    Ok(Resumed {
        found,
        records,
        partitions,
    })
}

/// The pipeline's name and workdir as `run` will use them, read before the pipeline can be
/// loaded (loading needs the partitions, which a resume takes from the audit log).
fn name_and_workdir(args: &RunArgs) -> anyhow::Result<(String, PathBuf)> {
    let text = std::fs::read_to_string(&args.pipeline)
        .with_context(|| format!("cannot read the pipeline `{}`", args.pipeline.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("the pipeline `{}` is not JSON", args.pipeline.display()))?;
    let name = v["name"].as_str().unwrap_or_default().to_string();
    let workdir = match &args.workdir {
        Some(d) => d.clone(),
        None => {
            let abs = std::path::absolute(&args.pipeline)?;
            let dir = abs.parent().unwrap_or(std::path::Path::new("/"));
            dir.join(v["workdir"].as_str().unwrap_or("."))
        }
    };
    Ok((
        name,
        warpline_shared::paths::normalize(&std::path::absolute(&workdir)?),
    ))
}

/// Refuses partitions flags that name other partitions than the resumed backfill's.
fn same_partitions(given: &[Partition], theirs: &[Partition], id: Uuid) -> anyhow::Result<()> {
    let keys = |ps: &[Partition]| -> BTreeSet<String> { ps.iter().map(Partition::key).collect() };
    let (given, theirs) = (keys(given), keys(theirs));
    if given != theirs {
        let extra: Vec<&String> = given.difference(&theirs).take(5).collect();
        let missing: Vec<&String> = theirs.difference(&given).take(5).collect();
        anyhow::bail!(
            "--resume continues backfill {id}, whose partitions differ from the ones given (not in it: {extra:?}; in it but not given: {missing:?}): leave out --months, --datasets and --partitions-file to resume it, or start a new backfill with `--reprocess missing|failed` instead of --resume"
        );
    }
    Ok(())
}

/// `--resolve RUN=ACTION` against the replayed runs, each checked as the engine would check
/// it, so a wrong answer stops the resume before anything runs.
fn resolutions(args: &RunArgs, r: &resume::Replayed) -> anyhow::Result<Vec<(Uuid, Action)>> {
    let mut out = Vec::new();
    for spec in &args.resolve {
        let (run, action) = spec.rsplit_once('=').with_context(|| {
            format!("invalid --resolve `{spec}`: expected RUN=proceed|retry|halt")
        })?;
        let action = match action.trim() {
            "proceed" => Action::Proceed,
            "retry" => Action::Retry,
            "halt" => Action::Halt,
            other => {
                anyhow::bail!("invalid --resolve `{spec}`: `{other}` is not proceed, retry or halt")
            }
        };
        let run = run.trim();
        let by_id: Vec<_> = r
            .runs
            .iter()
            .filter(|x| !run.is_empty() && x.id.to_string().starts_with(run))
            .collect();
        let by_key: Vec<_> = r.runs.iter().filter(|x| x.partition.key() == run).collect();
        let target = match (by_id.as_slice(), by_key.as_slice()) {
            ([one], _) | ([], [one]) => *one,
            ([], []) => anyhow::bail!(
                "--resolve `{spec}`: no run of backfill {} matches `{run}` (give a run id, an id prefix or a partition key)",
                r.backfill.id
            ),
            (many, _) => anyhow::bail!(
                "--resolve `{spec}`: `{run}` matches {} runs; give a longer id",
                many.len()
            ),
        };
        if !matches!(target.machine.state(), RunState::Escalated(_)) {
            anyhow::bail!(
                "--resolve `{spec}`: run {} ({}) is {}, not escalated: only an escalation is answered",
                target.id,
                target.partition.key(),
                target.machine.state_name()
            );
        }
        target
            .machine
            .clone()
            .resolve(action)
            .map_err(|e| anyhow::anyhow!("--resolve `{spec}`: {e}"))?;
        out.push((target.id, action));
    }
    Ok(out)
}

/// Who the resume's answers are audited as: `--operator`, else `$USER`, else `local`.
fn operator_name(args: &RunArgs) -> String {
    args.operator
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "local".into())
}

/// Serves the dashboard for this process on `addr` (loopback only unless API tokens are set
/// in the environment, as for `serve`).
async fn start_dashboard(
    addr: std::net::SocketAddr,
    tx: mpsc::UnboundedSender<Event>,
    audit: PathBuf,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, EngineHandle)> {
    let auth = Arc::new(Auth::load(&|k| std::env::var(k).ok(), None)?);
    if auth.is_open() && !addr.ip().is_loopback() {
        anyhow::bail!(
            "refusing to serve the dashboard on `{addr}` with no token: use a loopback address \
             (e.g. --ui 127.0.0.1:8081) or set WARPLINE_OPERATOR_TOKEN"
        );
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on `{addr}` for the dashboard (--ui)"))?;
    let handle = EngineHandle::new(tx);
    let app = protect(
        ui::router(handle.clone(), ui::Records::File(audit), auth.clone()),
        auth,
    );
    eprintln!("warpline: dashboard on http://{}/", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((task, handle))
}

/// `--ui-stay`: answers the dashboard from the ended run's final state until a signal. Reads
/// are answered; actions are refused with how to continue the run instead.
async fn stay(
    engine: &mut Engine,
    rx: &mut mpsc::UnboundedReceiver<Event>,
    shutdown: &CancellationToken,
) {
    eprintln!("warpline: the run has ended; the dashboard stays up (read only) until Ctrl-C");
    loop {
        let ev = tokio::select! {
            () = shutdown.cancelled() => return,
            ev = rx.recv() => ev,
        };
        match ev {
            Some(Event::Operator(cmd, reply)) => {
                let _ = reply.send(engine.answer_ended(cmd));
            }
            // Nothing else reaches an ended loop but late worker messages, which it drops.
            Some(_) => {}
            None => return,
        }
    }
}

/// The agent's part of the summary: who decided and what the model calls cost.
#[derive(Debug, serde::Serialize)]
struct AgentUsage {
    name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    #[serde(flatten)]
    totals: AgentTotals,
}

fn print_summary(summary: &Summary, usage: &AgentUsage, json: bool) -> anyhow::Result<()> {
    if json {
        // The engine's summary plus an `agent` object (kept out of the engine: the agent layer
        // owns its counters).
        let mut value = serde_json::to_value(summary)?;
        value["agent"] = serde_json::to_value(usage)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let counts: Vec<String> = summary
        .counts
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    eprintln!(
        "warpline: {} runs: {}; {} steps executed in {:.1} s; {} warnings",
        summary.runs.len(),
        counts.join(", "),
        summary.steps_executed,
        summary.wall_ms as f64 / 1000.0,
        summary.warnings
    );
    for r in summary
        .runs
        .iter()
        .filter(|r| r.state != RunStatus::Complete)
    {
        eprintln!(
            "  {} {} at {}: {}",
            r.partition,
            r.state,
            r.step.as_deref().unwrap_or("-"),
            r.reason.as_deref().unwrap_or("")
        );
    }
    let t = &usage.totals;
    if let Some(model) = &usage.model {
        eprintln!(
            "warpline: agent {} ({model}): {} decisions, {} model calls ({} failed, {} requests), \
             {} fast path, {} fallbacks; tokens {} in / {} out; {} ms per call on average",
            usage.name,
            t.decisions,
            t.llm_calls,
            t.llm_failures,
            t.requests,
            t.fast_path,
            t.fallbacks,
            t.tokens_in,
            t.tokens_out,
            t.llm_latency_mean_ms
        );
    }
    eprintln!(
        "warpline: audit log {} (head {})",
        summary.audit, summary.audit_head
    );
    Ok(())
}

/// The progress bars of a backfill: one per step, as long as the runs that take it (every
/// partition's run for a partition step; for a backfill-level step, the runs of its scope:
/// one before-run, one after-run per dataset, one after-run), in the order they run, and one
/// over every run.
fn bars(pipeline: &Pipeline, partitions: &[Partition]) -> Bars {
    let plan = pipeline.plan(partitions);
    let views = super::preflight::Views::of(pipeline);
    let order = [
        RunScope::Before,
        RunScope::Partition,
        RunScope::AfterDataset,
        RunScope::After,
    ];
    let steps: Vec<(String, u64)> = order
        .into_iter()
        .flat_map(|scope| {
            let runs = plan.iter().filter(|(s, _)| *s == scope).count() as u64;
            let ids: Vec<String> = match runs {
                0 => Vec::new(),
                _ => views
                    .get(scope)
                    .steps()
                    .iter()
                    .map(|s| s.id.clone())
                    .collect(),
            };
            ids.into_iter().map(move |id| (id, runs))
        })
        .collect();
    Bars::new(&steps, plan.len() as u64)
}
