//! The benchmark's arithmetic: waiting for a backfill by tailing its audit log, reading the
//! audit log's timestamps afterwards, CPU time and peak memory from `/proc`, and the median and
//! spread of repeated measurements.
//!
//! Waiting costs the system under test nothing: the coordinator is not polled, its audit file
//! is read for `"event":"run_finished"`. Timings come from the audit records' `ts`, which the
//! coordinator stamps as it stages each record.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use warpline_shared::audit::{AuditEvent, parse_line};
use warpline_shared::machine::RunStatus;

/// Linux's `USER_HZ`: the unit of the CPU times in `/proc/PID/stat` and `/proc/stat`.
const TICKS_PER_S: f64 = 100.0;

/// Waits until the audit log holds `runs` `run_finished` records, reading only what was
/// appended since the last look.
pub async fn wait_finished(audit: &Path, runs: usize, limit: Duration) -> anyhow::Result<()> {
    const NEEDLE: &[u8] = b"\"event\":\"run_finished\"";
    let deadline = Instant::now() + limit;
    let mut offset = 0u64;
    let mut partial: Vec<u8> = Vec::new();
    let mut finished = 0usize;
    loop {
        if let Ok(mut f) = std::fs::File::open(audit) {
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            offset += buf.len() as u64;
            partial.extend_from_slice(&buf);
            // Count whole lines only; keep the unfinished last one for the next look.
            let cut = partial
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            finished += partial[..cut]
                .split(|&b| b == b'\n')
                .filter(|l| l.windows(NEEDLE.len()).any(|w| w == NEEDLE))
                .count();
            partial.drain(..cut);
        }
        if finished >= runs {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {finished} of {runs} runs finished within {} s; see {}",
                limit.as_secs(),
                audit.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the audit log says about a finished backfill.
#[derive(Debug, Clone)]
pub struct AuditFacts {
    /// Step results received (attempts executed).
    pub steps: u64,
    /// Runs that completed.
    pub complete: u64,
    /// Runs that ended otherwise.
    pub not_complete: u64,
    /// The first StepSpec dispatched.
    pub first_dispatch: DateTime<Utc>,
    /// The last run finished.
    pub last_finish: DateTime<Utc>,
}

impl AuditFacts {
    /// From the first dispatch to the last run's end.
    pub fn wall(&self) -> Duration {
        (self.last_finish - self.first_dispatch)
            .to_std()
            .unwrap_or_default()
    }
}

/// Reads a whole audit log (every line's hash is checked on the way).
pub fn audit_facts(audit: &Path) -> anyhow::Result<AuditFacts> {
    let text = std::fs::read_to_string(audit)
        .with_context(|| format!("cannot read `{}`", audit.display()))?;
    let (mut steps, mut complete, mut not_complete) = (0, 0, 0);
    let (mut first, mut last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = (None, None);
    for (i, line) in text.lines().enumerate() {
        let (rec, _) = parse_line(line)
            .map_err(|e| anyhow::anyhow!("`{}` line {}: {e}", audit.display(), i + 1))?;
        match &rec.event {
            AuditEvent::StepDispatched { .. } => {
                first = Some(first.map_or(rec.ts, |f| f.min(rec.ts)));
            }
            AuditEvent::StepResult { .. } => steps += 1,
            AuditEvent::RunFinished { state, .. } => {
                if *state == RunStatus::Complete {
                    complete += 1;
                } else {
                    not_complete += 1;
                }
                last = Some(last.map_or(rec.ts, |l| l.max(rec.ts)));
            }
            _ => {}
        }
    }
    let (Some(first_dispatch), Some(last_finish)) = (first, last) else {
        bail!("`{}` holds no dispatch or no finished run", audit.display());
    };
    Ok(AuditFacts {
        steps,
        complete,
        not_complete,
        first_dispatch,
        last_finish,
    })
}

/// CPU seconds a process used, and those of the children it waited for (a worker's tools).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces: field 3
    // (state) is index 0, utime (14) index 11, stime 12, cutime 13, cstime 14.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/PID/stat")?;
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    anyhow::ensure!(f.len() > 14, "unexpected /proc/{pid}/stat");
    Ok(((f[11] + f[12]) / TICKS_PER_S, (f[13] + f[14]) / TICKS_PER_S))
}

/// Peak resident set size (VmHWM) in MiB.
pub fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

/// CPU seconds used by the whole machine (busy, i.e. not idle or waiting), and by the
/// RabbitMQ (`beam.smp`) and PostgreSQL (`postgres`) processes, which other users share.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    /// Every CPU's busy time.
    pub busy: f64,
    /// RabbitMQ's processes.
    pub rabbitmq: f64,
    /// PostgreSQL's processes (exited backends are not counted).
    pub postgres: f64,
}

impl MachineCpu {
    /// Reads the counters now.
    pub fn now() -> MachineCpu {
        let mut m = MachineCpu::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/stat")
            && let Some(cpu) = stat.lines().next()
        {
            let v: Vec<f64> = cpu
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0.0))
                .collect();
            // user nice system idle iowait irq softirq steal ...
            let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
            m.busy = (v.iter().take(8).sum::<f64>() - idle) / TICKS_PER_S;
        }
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
                    continue;
                };
                let Ok((own, _)) = cpu_seconds(pid) else {
                    continue;
                };
                match comm.trim() {
                    "beam.smp" => m.rabbitmq += own,
                    "postgres" => m.postgres += own,
                    _ => {}
                }
            }
        }
        m
    }

    /// The counters' growth since `earlier`.
    pub fn since(self, earlier: MachineCpu) -> MachineCpu {
        MachineCpu {
            busy: self.busy - earlier.busy,
            rabbitmq: self.rabbitmq - earlier.rabbitmq,
            postgres: (self.postgres - earlier.postgres).max(0.0),
        }
    }
}

/// The median and the spread of repeated measurements.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// Of a non-empty list.
    pub fn of(values: &[f64]) -> Spread {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = f.precision().unwrap_or(1);
        write!(
            f,
            "{:.p$} [{:.p$} – {:.p$}]",
            self.median, self.min, self.max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 4.0]).median, 2.5);
        assert_eq!(format!("{:.2}", Spread::of(&[1.0])), "1.00 [1.00 – 1.00]");
    }
}
