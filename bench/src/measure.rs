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
    /// The last step result recorded (before a cancel, the end of the steps that ran).
    pub last_result: DateTime<Utc>,
}

impl AuditFacts {
    /// Steps ÷ (first dispatch → last step result): the rate of a backfill cut short too.
    pub fn result_rate(&self) -> f64 {
        let wall = (self.last_result - self.first_dispatch)
            .to_std()
            .unwrap_or_default();
        self.steps as f64 / wall.as_secs_f64().max(f64::EPSILON)
    }

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
    let mut last_result: Option<DateTime<Utc>> = None;
    for (i, line) in text.lines().enumerate() {
        let (rec, _) = parse_line(line)
            .map_err(|e| anyhow::anyhow!("`{}` line {}: {e}", audit.display(), i + 1))?;
        match &rec.event {
            AuditEvent::StepDispatched { .. } => {
                first = Some(first.map_or(rec.ts, |f| f.min(rec.ts)));
            }
            AuditEvent::StepResult { .. } => {
                steps += 1;
                last_result = Some(last_result.map_or(rec.ts, |l| l.max(rec.ts)));
            }
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
        last_result: last_result.unwrap_or(last_finish),
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

/// The TCP ports of the RabbitMQ and PostgreSQL under test: their processes are told apart
/// from other brokers and clusters on the machine (tests start private ones) by who listens
/// on these ports.
#[derive(Debug, Clone, Copy)]
pub struct ServicePorts {
    /// RabbitMQ's AMQP port.
    pub amqp: u16,
    /// PostgreSQL's port.
    pub postgres: u16,
}

impl ServicePorts {
    /// From the services' URLs (the protocols' default ports when a URL names none).
    pub fn of(amqp_url: &str, database_url: &str) -> ServicePorts {
        let port = |url: &str, default: u16| {
            url.split_once("://")
                .map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or(""))
                .and_then(|auth| auth.rsplit('@').next())
                .and_then(|host| host.rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(default)
        };
        ServicePorts {
            amqp: port(amqp_url, 5672),
            postgres: port(database_url, 5432),
        }
    }
}

/// CPU seconds used by the whole machine (busy, i.e. not idle or waiting), and by the
/// RabbitMQ and PostgreSQL under test: the process listening on each port and its children
/// (PostgreSQL's backends; exited backends are not counted).
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
    pub fn now(ports: ServicePorts) -> MachineCpu {
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
        let rabbit = listener_pid(ports.amqp);
        let pg = listener_pid(ports.postgres);
        for (pid, ppid) in process_parents() {
            let is = |root: Option<u32>| root.is_some_and(|r| pid == r || ppid == r);
            let Ok((own, _)) = cpu_seconds(pid) else {
                continue;
            };
            if is(rabbit) {
                m.rabbitmq += own;
            } else if is(pg) {
                m.postgres += own;
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

/// Every process and its parent.
pub fn process_parents() -> Vec<(u32, u32)> {
    let mut all = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return all;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the parenthesised command name: the state, then the parent's pid.
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        {
            all.push((pid, ppid));
        }
    }
    all
}

/// The process listening on a local TCP port (IPv4 or IPv6), from the socket's inode in
/// `/proc/net/tcp*` and the processes' open descriptors.
fn listener_pid(port: u16) -> Option<u32> {
    let hex = format!(":{port:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address rem_address st ... inode (field 9); 0A = LISTEN.
            if f.len() > 9 && f[1].ends_with(&hex) && f[3] == "0A" {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for (pid, _) in process_parents() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// The `p`th percentile (nearest rank) of a non-empty list.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
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

    #[test]
    fn service_ports_come_from_the_urls() {
        let p = ServicePorts::of(
            "amqp://guest:guest@127.0.0.1:5673/%2f",
            "postgres://postgres@127.0.0.1/db",
        );
        assert_eq!((p.amqp, p.postgres), (5673, 5432));
        let p = ServicePorts::of("amqp://localhost", "postgres://u:p@h:6543/db?x=1");
        assert_eq!((p.amqp, p.postgres), (5672, 6543));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0, 1.0], 99.0), 3.0);
        assert_eq!(percentile(&[7.0], 0.0), 7.0);
    }
}
