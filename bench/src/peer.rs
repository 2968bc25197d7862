//! The Celery peer of `versus`: its `run.sh` (passed in by path, never built or needed by the
//! project) run as a child, its `celery: … steps_per_s=…` line parsed, and the CPU of its
//! processes read from `/proc` over the same window its own figure covers.
//!
//! The script prints `variant: … (worker pid N)` on stderr once its worker is ready, then runs
//! `bench.py run`, which submits, waits and prints `detail: …` on stderr the moment it has
//! stopped its clock. Those two lines bound the window: every process under the worker (the
//! Celery worker and its prefork pool) and the driver (`bench.py`) is read at both, the tools
//! (`/bin/true`, reaped by the pool processes) through the pool's children's times, and
//! RabbitMQ and PostgreSQL as for Warpline ([`MachineCpu`]).

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::measure::{self, MachineCpu, ServicePorts};

/// One run of the peer.
#[derive(Debug, Clone)]
pub struct PeerRun {
    /// Its own figure (`steps_per_s=`).
    pub steps_per_s: f64,
    /// Steps it ran (`steps=`).
    pub steps: u64,
    /// Its `machine_cpu_busy=` (the busy share of all CPUs over its window).
    pub machine_busy_share: f64,
    /// The line as printed.
    pub line: String,
    /// CPU seconds over the window: the Celery worker's main process.
    pub worker: f64,
    /// The prefork pool processes.
    pub pool: f64,
    /// The steps' programs (the pool processes' waited-for children).
    pub tools: f64,
    /// The driver (`bench.py run`: submits the chains, polls the result backend).
    pub driver: f64,
    /// RabbitMQ, PostgreSQL and the whole machine over the window.
    pub machine: MachineCpu,
    /// The window's length (`variant:` → `detail:`).
    pub window: Duration,
}

/// Runs `run.sh --true --runs R --concurrency C` once.
pub async fn run(
    script: &Path,
    runs: usize,
    concurrency: usize,
    ports: ServicePorts,
) -> anyhow::Result<PeerRun> {
    let mut child = Command::new(script)
        .args(["--true", "--runs", &runs.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start `{}`", script.display()))?;
    let script_pid = child.id().context("the peer exited at once")?;
    let mut stderr = BufReader::new(child.stderr.take().context("no stderr")?).lines();
    let stdout = child.stdout.take().context("no stdout")?;
    let out = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut all = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            all.push(l);
        }
        all
    });
    let mut said = Vec::new();
    let mut start: Option<(u32, Tree, MachineCpu, Instant)> = None;
    let mut end: Option<(Tree, MachineCpu, Instant)> = None;
    while let Some(line) = stderr.next_line().await? {
        if line.starts_with("variant:") {
            let pid = line
                .rsplit_once("worker pid ")
                .and_then(|(_, p)| p.trim_end_matches(')').parse::<u32>().ok())
                .context("no worker pid in the peer's `variant:` line")?;
            start = Some((
                pid,
                Tree::read(pid, script_pid),
                MachineCpu::now(ports),
                Instant::now(),
            ));
        } else if line.starts_with("detail:")
            && let Some((pid, ..)) = &start
        {
            end = Some((
                Tree::read(*pid, script_pid),
                MachineCpu::now(ports),
                Instant::now(),
            ));
        }
        said.push(line);
    }
    let status = child.wait().await?;
    let out = out.await?;
    let tail = || said[said.len().saturating_sub(20)..].join("\n");
    if !status.success() {
        bail!("`{}` failed ({status}):\n{}", script.display(), tail());
    }
    let (Some((_, t0, m0, i0)), Some((t1, m1, i1))) = (start, end) else {
        bail!(
            "`{}` printed no `variant:` and `detail:` lines:\n{}",
            script.display(),
            tail()
        );
    };
    let line = out
        .iter()
        .rev()
        .find(|l| l.starts_with("celery:"))
        .cloned()
        .with_context(|| format!("`{}` printed no `celery:` line", script.display()))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no `{name}=` in `{line}`"))
    };
    let (worker, pool, tools, driver) = t1.since(&t0);
    Ok(PeerRun {
        steps_per_s: field("steps_per_s")?,
        steps: field("steps")? as u64,
        machine_busy_share: field("machine_cpu_busy")?,
        worker,
        pool,
        tools,
        driver,
        machine: m1.since(m0),
        window: i1 - i0,
        line,
    })
}

/// The peer's processes at one moment: pid → (own CPU s, waited-for children's CPU s), by role.
#[derive(Debug, Default)]
struct Tree {
    worker: (f64, f64),
    pool: HashMap<u32, (f64, f64)>,
    driver: HashMap<u32, f64>,
}

impl Tree {
    /// The worker, its descendants (the pool) and the script's other Python children (the
    /// driver).
    fn read(worker: u32, script: u32) -> Tree {
        let parents: HashMap<u32, u32> = measure::process_parents().into_iter().collect();
        let mut t = Tree {
            worker: measure::cpu_seconds(worker).unwrap_or_default(),
            ..Tree::default()
        };
        for (&pid, &ppid) in &parents {
            if pid == worker {
                continue;
            }
            if descends(pid, worker, &parents) {
                if let Ok(c) = measure::cpu_seconds(pid) {
                    t.pool.insert(pid, c);
                }
            } else if ppid == script
                && std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.contains("bench.py"))
                && let Ok((own, _)) = measure::cpu_seconds(pid)
            {
                t.driver.insert(pid, own);
            }
        }
        t
    }

    /// (worker, pool, tools, driver) CPU seconds between `earlier` and `self`; a process
    /// that appeared in between counts from zero.
    fn since(&self, earlier: &Tree) -> (f64, f64, f64, f64) {
        let worker = self.worker.0 - earlier.worker.0;
        let (mut pool, mut tools) = (0.0, 0.0);
        for (pid, (own, children)) in &self.pool {
            let (own0, children0) = earlier.pool.get(pid).copied().unwrap_or_default();
            pool += own - own0;
            tools += children - children0;
        }
        let driver = self
            .driver
            .iter()
            .map(|(pid, own)| own - earlier.driver.get(pid).copied().unwrap_or_default())
            .sum();
        (worker, pool, tools, driver)
    }
}

fn descends(mut pid: u32, ancestor: u32, parents: &HashMap<u32, u32>) -> bool {
    for _ in 0..64 {
        match parents.get(&pid) {
            Some(&p) if p == ancestor => return true,
            Some(&p) if p > 1 => pid = p,
            _ => return false,
        }
    }
    false
}
