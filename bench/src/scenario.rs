//! The scenarios of `docs/BENCHMARKS.md` and the command line that picks them.
//!
//! - `throughput`: end-to-end steps/s of trivial steps (`true`, one passing check each, the
//!   rules agent) with 1, 2 and 4 worker processes.
//! - `efficiency`: ideal time ÷ wall time for steps that sleep (800 × 50 ms on 16 slots).
//! - `overhead`: the coordinator's overhead per step (result received → next StepSpec
//!   confirmed by the broker, from `GET /v1/metrics`) while it is not saturated.
//! - `submit`: submit time and the coordinator's peak RSS for a 10,000-partition backfill.
//! - `versus`: Warpline and the Celery peer (its `run.sh`, passed by path) on the same work,
//!   alternately: steps/s, their ratio, CPU per 1,000 steps of every process, the busy share.
//! - `tracing`: throughput with tracing off and on (into an OTLP/HTTP sink inside the
//!   benchmark that counts and drops), alternately.
//!
//! Every repetition starts a fresh fleet, so no repetition inherits another's queues, rows or
//! warm caches inside the coordinator; PostgreSQL's and RabbitMQ's own caches stay warm.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use warpline_coordinator::fleet::metrics::LatencySnapshot;

use crate::fleet::{Fleet, Services, Shape};
use crate::measure::{self, AuditFacts, MachineCpu, Spread};
use crate::otlp;
use crate::peer;

/// The fleet benchmark: real processes against the local RabbitMQ and PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "warpline-bench", version, about)]
pub struct Cli {
    /// What to measure.
    #[command(subcommand)]
    pub scenario: Scenario,
    /// Where `warpline` and `warpline-worker` are [default: beside this binary].
    #[arg(long, global = true)]
    pub bin_dir: Option<PathBuf>,
    /// RabbitMQ.
    #[arg(
        long,
        global = true,
        env = "WARPLINE_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// PostgreSQL; each repetition uses its own schema `bench_<pid>_<n>` in this database.
    #[arg(
        long,
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/warpline_bench"
    )]
    pub database_url: String,
    /// Repetitions of each measurement (the median and the spread are reported).
    #[arg(long, global = true, default_value_t = 3)]
    pub repeat: usize,
    /// Append one JSON object per repetition to this file.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Keep each fleet's directory (logs, audit log, step logs).
    #[arg(long, global = true)]
    pub keep: bool,
    /// Where each fleet's workdir (step run directories and logs) goes [default: /dev/shm
    /// when it exists, else the temporary directory]. Deleting thousands of files on ext4 makes
    /// the next repetition's mkdir and file creation slower for about 30 s (the inode
    /// allocator skips recently deleted inodes), which would measure the file system, not
    /// Warpline.
    #[arg(long, global = true)]
    pub workdir_root: Option<PathBuf>,
    /// Specs each worker may hold beyond its slots (its `--prefetch` is slots + this; 0, the
    /// workers' default, is prefetch = slots).
    #[arg(long, global = true, default_value_t = 0)]
    pub prefetch_extra: u16,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// (a) End-to-end steps/s for trivial steps.
    Throughput(ThroughputArgs),
    /// (b) Scheduling efficiency: ideal time ÷ wall time for steps that sleep.
    Efficiency(EfficiencyArgs),
    /// (c) Coordinator overhead per step (result received → next StepSpec confirmed).
    Overhead(OverheadArgs),
    /// (d) Submit time and coordinator peak RSS for a large backfill.
    Submit(SubmitArgs),
    /// Everything above with its defaults.
    All,
    /// Warpline against the Celery peer on the same work, alternately (not part of `all`: it
    /// needs the peer's script).
    Versus(VersusArgs),
    /// Throughput with tracing off and on into an OTLP/HTTP sink, alternately.
    Tracing(TracingArgs),
}

/// `versus`.
#[derive(Debug, Clone, Args)]
pub struct VersusArgs {
    /// The Celery peer's `run.sh` (it sets up its own venv and worker, prints `celery: …`).
    #[arg(long)]
    pub peer: PathBuf,
    /// Runs of 4 trivial steps each (the peer's shape: `/bin/true` steps).
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// Steps at once, the same for both: the peer's `--concurrency` (prefork processes), and
    /// Warpline's workers × slots.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Warpline's worker processes (the concurrency is split evenly among them).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
}

/// `tracing`.
#[derive(Debug, Clone, Args)]
pub struct TracingArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 8)]
    pub slots: u16,
    /// Runs (partitions).
    #[arg(long, default_value_t = 1000)]
    pub runs: usize,
    /// Steps per run.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Runs in progress at once.
    #[arg(long, default_value_t = 256)]
    pub max_parallel: usize,
}

/// `throughput`.
#[derive(Debug, Clone, Args)]
pub struct ThroughputArgs {
    /// Worker processes, one measurement per value.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub workers: Vec<usize>,
    /// Slots per worker.
    #[arg(long, default_value_t = 8)]
    pub slots: u16,
    /// Runs (partitions).
    #[arg(long, default_value_t = 1000)]
    pub runs: usize,
    /// Steps per run.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Runs in progress at once.
    #[arg(long, default_value_t = 256)]
    pub max_parallel: usize,
}

/// `efficiency`.
#[derive(Debug, Clone, Args)]
pub struct EfficiencyArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Slots per worker (16 in all by default).
    #[arg(long, default_value_t = 8)]
    pub slots: u16,
    /// Runs (partitions).
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// Steps per run (runs × steps = 800 by default).
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// How long each step sleeps.
    #[arg(long, default_value_t = 50)]
    pub sleep_ms: u64,
    /// Runs in progress at once.
    #[arg(long, default_value_t = 200)]
    pub max_parallel: usize,
}

/// `overhead`.
#[derive(Debug, Clone, Args)]
pub struct OverheadArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 4)]
    pub slots: u16,
    /// Runs (partitions).
    #[arg(long, default_value_t = 400)]
    pub runs: usize,
    /// Steps per run.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Runs in progress at once (= the slots: one step per run in flight, no queueing).
    #[arg(long, default_value_t = 4)]
    pub max_parallel: usize,
}

/// `submit`.
#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Datasets (`d000,d001,...`).
    #[arg(long, default_value_t = 100)]
    pub datasets: usize,
    /// Months per dataset (from 2016-01).
    #[arg(long, default_value_t = 100)]
    pub months: usize,
    /// Steps per run.
    #[arg(long, default_value_t = 1)]
    pub steps: usize,
    /// Runs in progress at once.
    #[arg(long, default_value_t = 512)]
    pub max_parallel: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 8)]
    pub slots: u16,
    /// Stop after the submit instead of running the backfill to its end.
    #[arg(long)]
    pub no_run: bool,
    /// While it runs, time this many `GET /v1/backfills/ID` (status), as many
    /// `GET /v1/backfills/ID?runs=none` (counts only) and as many dashboard pages
    /// `GET /backfills/ID` (the grid), one of each every 250 ms.
    #[arg(long, default_value_t = 0)]
    pub probes: usize,
    /// After the probes, cancel the backfill: time the answer, and until every run ended.
    #[arg(long)]
    pub cancel: bool,
    /// At the end, restart the coordinator and time its recovery (start → `/readyz` 200)
    /// with every run in PostgreSQL; also reports the schema's table sizes.
    #[arg(long)]
    pub restart: bool,
}

/// The extra measurements of a large backfill.
#[derive(Debug, Clone, Copy, Default)]
struct Scale {
    probes: usize,
    cancel: bool,
    restart: bool,
}

/// What [`Scale`] measured.
#[derive(Debug, Clone, Default)]
struct ScaleMeasured {
    status_ms: Vec<f64>,
    status_bytes: usize,
    /// `GET /v1/backfills/ID?runs=none`: the counts-only summary.
    counts_ms: Vec<f64>,
    counts_bytes: usize,
    grid_ms: Vec<f64>,
    grid_bytes: usize,
    /// The cancel's answer, and until the last run ended.
    cancel: Option<(Duration, Duration)>,
    recovery: Option<Duration>,
    /// (table, bytes, rows).
    tables: Vec<(String, i64, i64)>,
}

/// Runs the chosen scenario(s).
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let bin_dir = match &cli.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no directory")?
            .to_path_buf(),
    };
    for b in ["warpline", "warpline-worker"] {
        anyhow::ensure!(
            bin_dir.join(b).exists(),
            "`{}` is missing: run `cargo build --release --workspace --bins` first",
            bin_dir.join(b).display()
        );
    }
    let bench = Bench {
        services: Services {
            bin_dir,
            amqp_url: cli.amqp_url.clone(),
            database_url: cli.database_url.clone(),
            keep: cli.keep,
            prefetch_extra: cli.prefetch_extra,
            workdir_root: cli.workdir_root.clone().unwrap_or_else(|| {
                let shm = PathBuf::from("/dev/shm");
                if shm.is_dir() {
                    shm
                } else {
                    std::env::temp_dir()
                }
            }),
        },
        repeat: cli.repeat.max(1),
        json: cli.json.clone(),
    };
    eprintln!("load before: {}", load_average());
    match cli.scenario {
        Scenario::Throughput(a) => bench.throughput(&a).await,
        Scenario::Efficiency(a) => bench.efficiency(&a).await,
        Scenario::Overhead(a) => bench.overhead(&a).await,
        Scenario::Submit(a) => bench.submit(&a).await,
        Scenario::Versus(a) => bench.versus(&a).await,
        Scenario::Tracing(a) => bench.tracing(&a).await,
        Scenario::All => {
            bench.throughput(&defaults()).await?;
            bench.efficiency(&defaults()).await?;
            bench.overhead(&defaults()).await?;
            bench.submit(&defaults()).await
        }
    }?;
    eprintln!("load after: {}", load_average());
    Ok(())
}

/// A scenario's arguments with every default, for `all`.
fn defaults<T: Args + clap::FromArgMatches>() -> T {
    let matches = T::augment_args(clap::Command::new("defaults")).get_matches_from(["defaults"]);
    T::from_arg_matches(&matches).expect("every argument has a default")
}

struct Bench {
    services: Services,
    repeat: usize,
    json: Option<PathBuf>,
}

/// One backfill on one fleet.
#[derive(Clone)]
struct Job {
    scenario: &'static str,
    shape: Shape,
    pipeline: Value,
    partitions: Vec<String>,
    runs: usize,
    max_parallel: usize,
    /// Stop after the submit.
    submit_only: bool,
    /// Set on every process of the fleet.
    env: Vec<(String, String)>,
    /// Probes, cancel and restart of the `submit` scenario.
    scale: Scale,
}

/// What one repetition measured.
struct Measured {
    facts: Option<AuditFacts>,
    submit: Duration,
    rss_after_submit_mib: f64,
    rss_end_mib: f64,
    latency: LatencySnapshot,
    coordinator_cpu: f64,
    workers_cpu: f64,
    tools_cpu: f64,
    machine: MachineCpu,
    /// From just before the submit to the moment the last run was seen finished.
    window: Duration,
    scale: ScaleMeasured,
}

impl Measured {
    fn steps_per_s(&self) -> f64 {
        self.facts
            .as_ref()
            .map_or(0.0, |f| f.steps as f64 / f.wall().as_secs_f64())
    }

    /// CPU seconds per 1,000 steps of the processes that serve the backfill.
    fn cpu_per_1000(&self) -> f64 {
        let steps = self.facts.as_ref().map_or(0, |f| f.steps).max(1) as f64;
        self.ours() / steps * 1000.0
    }

    fn ours(&self) -> f64 {
        self.coordinator_cpu
            + self.workers_cpu
            + self.tools_cpu
            + self.machine.rabbitmq
            + self.machine.postgres
    }

    /// CPU seconds per 1,000 steps of the processes this benchmark started, and of the rest.
    fn cpu_line(&self) -> String {
        let steps = self.facts.as_ref().map_or(0, |f| f.steps).max(1) as f64;
        let per = |s: f64| s / steps * 1000.0;
        let ours = self.ours();
        format!(
            "CPU s per 1,000 steps: coordinator {:.2}, workers {:.2}, tools {:.2}, rabbitmq {:.2}, postgres {:.2} = {:.2}; machine busy {:.0} %; everything else on the machine {:.2} s in all",
            per(self.coordinator_cpu),
            per(self.workers_cpu),
            per(self.tools_cpu),
            per(self.machine.rabbitmq),
            per(self.machine.postgres),
            per(ours),
            busy_share(self.machine.busy, self.window) * 100.0,
            (self.machine.busy - ours).max(0.0)
        )
    }
}

impl Bench {
    async fn throughput(&self, a: &ThroughputArgs) -> anyhow::Result<()> {
        for &workers in &a.workers {
            let job = Job {
                scenario: "throughput",
                shape: Shape {
                    workers,
                    slots: a.slots,
                },
                pipeline: pipeline(a.steps, "true", &[]),
                partitions: months(a.runs),
                runs: a.runs,
                max_parallel: a.max_parallel,
                submit_only: false,
                env: Vec::new(),
                scale: Scale::default(),
            };
            let all = self.repeat(&job).await?;
            let rate: Vec<f64> = all.iter().map(Measured::steps_per_s).collect();
            let p50: Vec<f64> = all
                .iter()
                .map(|m| m.latency.result_to_confirm.p50_ms)
                .collect();
            println!(
                "(a) throughput, {workers} worker(s) × {} slots, {} runs × {} steps: {:.0} steps/s (median [min – max] of {}); overhead p50 under this load {:.2} ms",
                a.slots,
                a.runs,
                a.steps,
                Spread::of(&rate),
                all.len(),
                Spread::of(&p50),
            );
        }
        Ok(())
    }

    async fn efficiency(&self, a: &EfficiencyArgs) -> anyhow::Result<()> {
        let sleep = format!("{:.3}", a.sleep_ms as f64 / 1000.0);
        let job = Job {
            scenario: "efficiency",
            shape: Shape {
                workers: a.workers,
                slots: a.slots,
            },
            pipeline: pipeline(a.steps, "sleep", &[sleep.as_str()]),
            partitions: months(a.runs),
            runs: a.runs,
            max_parallel: a.max_parallel,
            submit_only: false,
            env: Vec::new(),
            scale: Scale::default(),
        };
        let slots = a.workers * usize::from(a.slots);
        let all = self.repeat(&job).await?;
        let eff: Vec<f64> = all
            .iter()
            .map(|m| {
                let f = m.facts.as_ref().expect("the backfill ran");
                let ideal = f.steps as f64 * a.sleep_ms as f64 / 1000.0 / slots as f64;
                ideal / f.wall().as_secs_f64()
            })
            .collect();
        let wall: Vec<f64> = all
            .iter()
            .map(|m| m.facts.as_ref().map_or(0.0, |f| f.wall().as_secs_f64()))
            .collect();
        println!(
            "(b) efficiency, {} steps × {} ms on {} × {} = {slots} slots: {:.3} (wall {:.3} s; ideal {:.3} s)",
            a.runs * a.steps,
            a.sleep_ms,
            a.workers,
            a.slots,
            Spread::of(&eff),
            Spread::of(&wall),
            (a.runs * a.steps) as f64 * a.sleep_ms as f64 / 1000.0 / slots as f64,
        );
        Ok(())
    }

    async fn overhead(&self, a: &OverheadArgs) -> anyhow::Result<()> {
        let job = Job {
            scenario: "overhead",
            shape: Shape {
                workers: a.workers,
                slots: a.slots,
            },
            pipeline: pipeline(a.steps, "true", &[]),
            partitions: months(a.runs),
            runs: a.runs,
            max_parallel: a.max_parallel,
            submit_only: false,
            env: Vec::new(),
            scale: Scale::default(),
        };
        let all = self.repeat(&job).await?;
        let pick = |f: fn(&LatencySnapshot) -> f64| -> Spread {
            Spread::of(&all.iter().map(|m| f(&m.latency)).collect::<Vec<_>>())
        };
        println!(
            "(c) overhead per step, {} runs × {} steps, {} in flight: result → next StepSpec confirmed p50 {:.2} ms, p99 {:.2} ms; result → handed to the publisher p50 {:.2} ms, p99 {:.2} ms",
            a.runs,
            a.steps,
            a.max_parallel,
            pick(|l| l.result_to_confirm.p50_ms),
            pick(|l| l.result_to_confirm.p99_ms),
            pick(|l| l.result_to_dispatch.p50_ms),
            pick(|l| l.result_to_dispatch.p99_ms),
        );
        Ok(())
    }

    async fn submit(&self, a: &SubmitArgs) -> anyhow::Result<()> {
        let datasets: Vec<String> = (0..a.datasets).map(|i| format!("d{i:03}")).collect();
        let runs = a.datasets * a.months;
        let job = Job {
            scenario: "submit",
            shape: Shape {
                workers: a.workers,
                slots: a.slots,
            },
            pipeline: pipeline(a.steps, "true", &[]),
            partitions: vec![
                "--datasets".into(),
                datasets.join(","),
                "--months".into(),
                month_range(2016, a.months),
            ],
            runs,
            max_parallel: a.max_parallel,
            submit_only: a.no_run,
            env: Vec::new(),
            scale: Scale {
                probes: a.probes,
                cancel: a.cancel,
                restart: a.restart,
            },
        };
        let all = self.repeat(&job).await?;
        let submit: Vec<f64> = all.iter().map(|m| m.submit.as_secs_f64()).collect();
        let rss_submit: Vec<f64> = all.iter().map(|m| m.rss_after_submit_mib).collect();
        let rss_end: Vec<f64> = all.iter().map(|m| m.rss_end_mib).collect();
        println!(
            "(d) {runs}-partition backfill ({} datasets × {} months): submit {:.3} s; coordinator VmHWM after submit {:.1} MiB, at the end {:.1} MiB{}",
            a.datasets,
            a.months,
            Spread::of(&submit),
            Spread::of(&rss_submit),
            Spread::of(&rss_end),
            if a.no_run {
                " (not run)".to_string()
            } else {
                format!(
                    ", ran at {:.0} steps/s",
                    Spread::of(&all.iter().map(Measured::steps_per_s).collect::<Vec<_>>())
                )
            }
        );
        for (i, m) in all.iter().enumerate() {
            let sc = &m.scale;
            if !sc.status_ms.is_empty() {
                println!(
                    "    #{}: status ({} bytes) p50 {:.1} ms p99 {:.1} ms; counts only (?runs=none, {} bytes) p50 {:.1} ms p99 {:.1} ms; dashboard grid page ({} bytes) p50 {:.1} ms p99 {:.1} ms ({} of each, while it ran)",
                    i + 1,
                    sc.status_bytes,
                    measure::percentile(&sc.status_ms, 50.0),
                    measure::percentile(&sc.status_ms, 99.0),
                    sc.counts_bytes,
                    measure::percentile(&sc.counts_ms, 50.0),
                    measure::percentile(&sc.counts_ms, 99.0),
                    sc.grid_bytes,
                    measure::percentile(&sc.grid_ms, 50.0),
                    measure::percentile(&sc.grid_ms, 99.0),
                    sc.status_ms.len(),
                );
            }
            if let Some((answer, drained)) = sc.cancel {
                println!(
                    "    #{}: cancel answered in {:.3} s, every run ended {:.3} s after it was sent; before it, {} steps ran at {:.0} steps/s",
                    i + 1,
                    answer.as_secs_f64(),
                    drained.as_secs_f64(),
                    m.facts.as_ref().map_or(0, |f| f.steps),
                    m.facts.as_ref().map_or(0.0, AuditFacts::result_rate),
                );
            }
            if let Some(r) = sc.recovery {
                println!(
                    "    #{}: coordinator restart with {runs} runs in PostgreSQL: ready in {:.3} s",
                    i + 1,
                    r.as_secs_f64()
                );
            }
            if !sc.tables.is_empty() {
                let per = 100_000.0 / runs.max(1) as f64;
                let list: Vec<String> = sc
                    .tables
                    .iter()
                    .map(|(t, bytes, rows)| {
                        format!(
                            "{t} {:.1} MiB ({rows} rows)",
                            *bytes as f64 * per / 1024.0 / 1024.0
                        )
                    })
                    .collect();
                println!(
                    "    #{}: tables per 100,000 runs: {}",
                    i + 1,
                    list.join(", ")
                );
            }
        }
        Ok(())
    }

    /// Warpline and the peer on the same work, one after the other, `--repeat` rounds; the
    /// order flips every round so that neither always runs on the machine the other warmed.
    async fn versus(&self, a: &VersusArgs) -> anyhow::Result<()> {
        anyhow::ensure!(
            a.workers > 0 && a.concurrency >= a.workers && a.concurrency.is_multiple_of(a.workers),
            "--concurrency {} must be a multiple of --workers {}",
            a.concurrency,
            a.workers
        );
        let peer_script = std::fs::canonicalize(&a.peer)
            .with_context(|| format!("cannot find the peer's script `{}`", a.peer.display()))?;
        let job = Job {
            scenario: "versus",
            shape: Shape {
                workers: a.workers,
                slots: u16::try_from(a.concurrency / a.workers)?,
            },
            pipeline: pipeline(4, "true", &[]),
            partitions: months(a.runs),
            runs: a.runs,
            max_parallel: a.runs,
            submit_only: false,
            env: Vec::new(),
            scale: Scale::default(),
        };
        let (mut ratios, mut ours, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
        let (mut our_cpu, mut their_cpu) = (Vec::new(), Vec::new());
        for round in 1..=self.repeat {
            let (w, p) = if round % 2 == 1 {
                let w = self.once_logged(&job, round).await?;
                (
                    w,
                    peer::run(&peer_script, a.runs, a.concurrency, self.services.ports()).await?,
                )
            } else {
                let p =
                    peer::run(&peer_script, a.runs, a.concurrency, self.services.ports()).await?;
                (self.once_logged(&job, round).await?, p)
            };
            let per = |s: f64| s / p.steps.max(1) as f64 * 1000.0;
            let peer_total =
                p.worker + p.pool + p.tools + p.driver + p.machine.rabbitmq + p.machine.postgres;
            eprintln!("    {}", p.line);
            eprintln!(
                "    celery CPU s per 1,000 steps: worker {:.2}, pool {:.2}, tools {:.2}, driver {:.2}, rabbitmq {:.2}, postgres {:.2} = {:.2}; machine busy {:.0} % (its own figure {:.0} %)",
                per(p.worker),
                per(p.pool),
                per(p.tools),
                per(p.driver),
                per(p.machine.rabbitmq),
                per(p.machine.postgres),
                per(peer_total),
                busy_share(p.machine.busy, p.window) * 100.0,
                p.machine_busy_share * 100.0,
            );
            let ratio = w.steps_per_s() / p.steps_per_s.max(f64::EPSILON);
            println!(
                "round {round}: warpline {:.0} steps/s, celery {:.1} steps/s: {ratio:.2}×; CPU s per 1,000 steps warpline {:.2}, celery {:.2}",
                w.steps_per_s(),
                p.steps_per_s,
                w.cpu_per_1000(),
                per(peer_total),
            );
            self.record(json!({
                "scenario": "versus-peer",
                "repetition": round,
                "runs": a.runs,
                "concurrency": a.concurrency,
                "steps": p.steps,
                "steps_per_s": p.steps_per_s,
                "cpu_s": {
                    "worker": p.worker,
                    "pool": p.pool,
                    "tools": p.tools,
                    "driver": p.driver,
                    "rabbitmq": p.machine.rabbitmq,
                    "postgres": p.machine.postgres,
                    "machine_busy": p.machine.busy,
                },
                "window_s": p.window.as_secs_f64(),
                "line": p.line,
            }))?;
            ratios.push(ratio);
            ours.push(w.steps_per_s());
            theirs.push(p.steps_per_s);
            our_cpu.push(w.cpu_per_1000());
            their_cpu.push(per(peer_total));
        }
        println!(
            "versus, {} runs × 4 trivial steps, {} at once ({} worker(s) × {} slots vs --concurrency {}): warpline {:.0} steps/s, celery {:.1} steps/s, ratio {:.2}× (median [min – max] of {}); CPU s per 1,000 steps warpline {:.2}, celery {:.2}",
            a.runs,
            a.concurrency,
            a.workers,
            a.concurrency / a.workers,
            a.concurrency,
            Spread::of(&ours),
            Spread::of(&theirs),
            Spread::of(&ratios),
            ratios.len(),
            Spread::of(&our_cpu),
            Spread::of(&their_cpu),
        );
        Ok(())
    }

    /// Throughput with tracing off, then on (or the other way round, every other round), into
    /// a sink that counts what arrives.
    async fn tracing(&self, a: &TracingArgs) -> anyhow::Result<()> {
        let sink = otlp::Sink::start()?;
        let off = Job {
            scenario: "tracing-off",
            shape: Shape {
                workers: a.workers,
                slots: a.slots,
            },
            pipeline: pipeline(a.steps, "true", &[]),
            partitions: months(a.runs),
            runs: a.runs,
            max_parallel: a.max_parallel,
            submit_only: false,
            env: Vec::new(),
            scale: Scale::default(),
        };
        let on = Job {
            scenario: "tracing-on",
            env: vec![
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
                    sink.endpoint.clone(),
                ),
                (
                    "OTEL_EXPORTER_OTLP_PROTOCOL".to_string(),
                    "http/protobuf".to_string(),
                ),
            ],
            ..off.clone()
        };
        let (mut rate_off, mut rate_on, mut cpu_off, mut cpu_on) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut spans, mut bytes, mut requests) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=self.repeat {
            let mut traced = |m: &Measured, before: otlp::Received| {
                let got = sink.received().since(before);
                let steps = m.facts.as_ref().map_or(0, |f| f.steps).max(1) as f64;
                eprintln!(
                    "    sink: {} requests, {} bytes, {} spans ({:.2} spans and {:.0} bytes per step)",
                    got.requests,
                    got.bytes,
                    got.spans,
                    got.spans as f64 / steps,
                    got.bytes as f64 / steps
                );
                spans.push(got.spans as f64 / steps);
                bytes.push(got.bytes as f64 / steps);
                requests.push(got.requests as f64);
            };
            let first_off = round % 2 == 1;
            for traced_now in [!first_off, first_off] {
                if traced_now {
                    let before = sink.received();
                    // The processes flush their last spans as they stop, so `once` has
                    // returned only after they arrived.
                    let m = self.once_logged(&on, round).await?;
                    traced(&m, before);
                    rate_on.push(m.steps_per_s());
                    cpu_on.push(m.cpu_per_1000());
                } else {
                    let before = sink.received();
                    let m = self.once_logged(&off, round).await?;
                    anyhow::ensure!(
                        sink.received() == before,
                        "spans arrived from a fleet with tracing off"
                    );
                    rate_off.push(m.steps_per_s());
                    cpu_off.push(m.cpu_per_1000());
                }
            }
        }
        let ratio: Vec<f64> = rate_on
            .iter()
            .zip(&rate_off)
            .map(|(on, off)| on / off)
            .collect();
        println!(
            "tracing, {} worker(s) × {} slots, {} runs × {} steps: off {:.0} steps/s, on {:.0} steps/s, on ÷ off {:.3}; CPU s per 1,000 steps off {:.2}, on {:.2}; {:.2} spans and {:.0} bytes per step arrived in {:.0} requests per run (median [min – max] of {})",
            a.workers,
            a.slots,
            a.runs,
            a.steps,
            Spread::of(&rate_off),
            Spread::of(&rate_on),
            Spread::of(&ratio),
            Spread::of(&cpu_off),
            Spread::of(&cpu_on),
            Spread::of(&spans),
            Spread::of(&bytes),
            Spread::of(&requests),
            ratio.len(),
        );
        Ok(())
    }

    /// Runs a job `repeat` times, each on a fresh fleet.
    async fn repeat(&self, job: &Job) -> anyhow::Result<Vec<Measured>> {
        let mut all = Vec::new();
        for i in 1..=self.repeat {
            all.push(self.once_logged(job, i).await?);
        }
        Ok(all)
    }

    /// One repetition, printed (and kept in `--json`) as it ends.
    async fn once_logged(&self, job: &Job, i: usize) -> anyhow::Result<Measured> {
        let m = self.once(job).await?;
        let facts = m.facts.as_ref();
        eprintln!(
            "  {} {}×{} #{i}: {} steps in {:.3} s = {:.0} steps/s; submit {:.3} s; RSS {:.1} MiB; overhead p50 {:.2} ms p99 {:.2} ms (to publisher p50 {:.2} ms); load {}",
            job.scenario,
            job.shape.workers,
            job.shape.slots,
            facts.map_or(0, |f| f.steps),
            facts.map_or(0.0, |f| f.wall().as_secs_f64()),
            m.steps_per_s(),
            m.submit.as_secs_f64(),
            m.rss_end_mib,
            m.latency.result_to_confirm.p50_ms,
            m.latency.result_to_confirm.p99_ms,
            m.latency.result_to_dispatch.p50_ms,
            load_average(),
        );
        eprintln!("    {}", m.cpu_line());
        self.record(json!({
            "scenario": job.scenario,
            "repetition": i,
            "workers": job.shape.workers,
            "slots": job.shape.slots,
            "prefetch_extra": self.services.prefetch_extra,
            "runs": job.runs,
            "tracing": !job.env.is_empty(),
            "steps": facts.map(|f| f.steps),
            "wall_s": facts.map(|f| f.wall().as_secs_f64()),
            "steps_per_s": m.steps_per_s(),
            "submit_s": m.submit.as_secs_f64(),
            "rss_after_submit_mib": m.rss_after_submit_mib,
            "rss_end_mib": m.rss_end_mib,
            "latency": m.latency,
            "cpu_s": {
                "coordinator": m.coordinator_cpu,
                "workers": m.workers_cpu,
                "tools": m.tools_cpu,
                "rabbitmq": m.machine.rabbitmq,
                "postgres": m.machine.postgres,
                "machine_busy": m.machine.busy,
            },
            "window_s": m.window.as_secs_f64(),
            "load": load_average(),
        }))?;
        Ok(m)
    }

    /// Appends one line to `--json`, if given.
    fn record(&self, line: Value) -> anyhow::Result<()> {
        use std::io::Write;
        if let Some(path) = &self.json {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            writeln!(f, "{line}")?;
        }
        Ok(())
    }

    async fn once(&self, job: &Job) -> anyhow::Result<Measured> {
        let mut fleet = Fleet::start(&self.services, job.shape, &job.env).await?;
        let measured = measure_on(&mut fleet, job).await;
        let stopped = fleet.stop().await;
        let measured = measured?;
        stopped?;
        Ok(measured)
    }
}

async fn measure_on(fleet: &mut Fleet, job: &Job) -> anyhow::Result<Measured> {
    let pipeline = fleet.write_pipeline(&job.pipeline)?;
    // Let the processes settle (connections, first heartbeats) before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ports = fleet.ports();
    let machine_before = MachineCpu::now(ports);
    let window = std::time::Instant::now();
    let pid = fleet.coordinator_pid();
    // CPU spent starting up is not the backfill's.
    let (coordinator_start, _) = measure::cpu_seconds(pid)?;
    let mut workers_start = (0.0, 0.0);
    for w in fleet.worker_pids() {
        let (own, children) = measure::cpu_seconds(w)?;
        workers_start.0 += own;
        workers_start.1 += children;
    }
    let (id, submit) = fleet.submit(&pipeline, &job.partitions, job.max_parallel)?;
    let rss_after_submit_mib = measure::peak_rss_mib(pid)?;
    let mut scale = ScaleMeasured::default();
    for _ in 0..job.scale.probes {
        let (t, n) = fleet.time_get(&format!("/v1/backfills/{id}")).await?;
        scale.status_ms.push(t.as_secs_f64() * 1000.0);
        scale.status_bytes = n;
        let (t, n) = fleet
            .time_get(&format!("/v1/backfills/{id}?runs=none"))
            .await?;
        scale.counts_ms.push(t.as_secs_f64() * 1000.0);
        scale.counts_bytes = n;
        let (t, n) = fleet.time_get(&format!("/backfills/{id}")).await?;
        scale.grid_ms.push(t.as_secs_f64() * 1000.0);
        scale.grid_bytes = n;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if job.scale.cancel {
        let started = std::time::Instant::now();
        let answered = fleet
            .time_post(&format!("/v1/backfills/{id}/cancel"))
            .await?;
        measure::wait_finished(&fleet.audit_path(), job.runs, Duration::from_secs(900)).await?;
        scale.cancel = Some((answered, started.elapsed()));
    }
    let facts = if job.submit_only {
        None
    } else {
        measure::wait_finished(&fleet.audit_path(), job.runs, Duration::from_secs(1800)).await?;
        let facts = measure::audit_facts(&fleet.audit_path())?;
        anyhow::ensure!(
            job.scale.cancel || (facts.not_complete == 0 && facts.complete == job.runs as u64),
            "{} of {} runs completed ({} ended otherwise); see {}",
            facts.complete,
            job.runs,
            facts.not_complete,
            fleet.dir().display()
        );
        Some(facts)
    };
    let machine = MachineCpu::now(ports).since(machine_before);
    let window = window.elapsed();
    let latency = fleet.metrics().await?;
    let coordinator_cpu = measure::cpu_seconds(pid)?.0 - coordinator_start;
    let (mut workers_cpu, mut tools_cpu) = (-workers_start.0, -workers_start.1);
    for w in fleet.worker_pids() {
        let (own, children) = measure::cpu_seconds(w)?;
        workers_cpu += own;
        tools_cpu += children;
    }
    let rss_end_mib = measure::peak_rss_mib(pid)?;
    if job.scale.restart {
        scale.recovery = Some(fleet.restart_coordinator().await?);
    }
    if job.scale.restart || job.scale.probes > 0 {
        scale.tables = fleet.table_sizes().await?;
    }
    Ok(Measured {
        facts,
        submit,
        rss_after_submit_mib,
        rss_end_mib,
        scale,
        latency,
        coordinator_cpu,
        workers_cpu,
        tools_cpu,
        machine,
        window,
    })
}

/// The share of all CPUs that was busy: busy CPU seconds ÷ (window × CPUs).
fn busy_share(busy: f64, window: Duration) -> f64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    busy / (window.as_secs_f64() * cpus).max(f64::EPSILON)
}

/// A pipeline of `steps` identical steps running `command args`, each with one check that
/// passes (no `ERROR` in the logs).
fn pipeline(steps: usize, command: &str, args: &[&str]) -> Value {
    let steps: Vec<Value> = (1..=steps)
        .map(|i| {
            json!({
                "id": format!("S{i}"),
                "command": command,
                "args": args,
                "timeout_s": 60,
                "max_attempts": 3,
                "validations": [
                    {"kind": "log_regex_absent", "pattern": "ERROR"}
                ]
            })
        })
        .collect();
    json!({
        "name": "bench",
        "description": "warpline-bench: trivial steps",
        "workdir": "work",
        "steps": steps,
    })
}

/// `--months` for `n` partitions (one month each, from 1800-01).
fn months(n: usize) -> Vec<String> {
    vec!["--months".into(), month_range(1800, n)]
}

/// `FROM..TO` covering `n` months from January of `year`.
fn month_range(year: usize, n: usize) -> String {
    let last = n.max(1) - 1;
    format!("{year:04}-01..{:04}-{:02}", year + last / 12, last % 12 + 1)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_ranges_cover_n_months() {
        assert_eq!(month_range(1800, 1), "1800-01..1800-01");
        assert_eq!(month_range(1800, 12), "1800-01..1800-12");
        assert_eq!(month_range(2016, 100), "2016-01..2024-04");
        let m = warpline_shared::partition::parse_months(&month_range(1800, 1000)).unwrap();
        assert_eq!(m.len(), 1000);
    }
}
