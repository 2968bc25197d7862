//! What spawning a tool costs the worker, in CPU time (docs/BENCHMARKS.md, "Where the rest of
//! the time goes").
//!
//! ```text
//! cargo run --release -p warpline-executor --example spawn_cost -- MODE [N] [CONCURRENCY] [BALLAST_MB]
//! ```
//!
//! Runs N (2,000) `true`s, CONCURRENCY (8) at once, on a tokio runtime shaped like the
//! worker's (`#[tokio::main]`: one thread per CPU), after touching BALLAST_MB (0) of heap so the
//! process can be given a worker's resident size. MODE is:
//!
//! - `steps`: whole steps through [`run_step`] (log files, pipes, validators) with no reaper,
//!   as local mode runs them: each tool gets `PR_SET_PDEATHSIG` from a `pre_exec` hook, so std
//!   forks this process;
//! - `steps-reaper`: the same with a [`Reaper`] (this example started again as `reap`), as the
//!   worker runs them: `posix_spawn`, and one `write(2)` to register each tool's group and one
//!   to forget it;
//! - `fork`: the executor's spawn alone (piped stdout/stderr, own process group) with a
//!   `pre_exec` hook, which makes std `fork` the process;
//! - `spawn`: the same spawn without the hook, which std does with `posix_spawn` (`clone(CLONE_VM
//!   | CLONE_VFORK)` in glibc).
//!
//! Step directories go to `/dev/shm` when it exists (as with `warpline-bench`). It prints the CPU time of this process and of its reaped children (`/proc/self/stat`:
//! utime, stime, cutime, cstime) per step. Run the modes alternately: the machine's noise is
//! larger than one run's.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use warpline_executor::reaper::{self, Reaper};
use warpline_executor::{ExecConfig, run_step};
use warpline_shared::contracts::{SCHEMA_VERSION, StepSpec};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args
        .first()
        .map(String::as_str)
        .unwrap_or("steps")
        .to_string();
    if mode == "reap" {
        reaper::serve(std::io::stdin().lock()).expect("reaper");
        return;
    }
    let n: usize = args.get(1).map_or(2000, |a| a.parse().expect("N"));
    let concurrency: usize = args.get(2).map_or(8, |a| a.parse().expect("CONCURRENCY"));
    let ballast_mb: usize = args.get(3).map_or(0, |a| a.parse().expect("BALLAST_MB"));
    let ballast = vec![1u8; ballast_mb << 20];

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // As warpline-bench does: on ext4, the files the last run deleted slow this run's down.
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    let before = cpu();
    let start = Instant::now();
    let reaper_ticks = runtime.block_on(run(&mode, n, concurrency, dir.path()));
    let wall = start.elapsed();
    let after = cpu();
    let per = |a: u64, b: u64| (b - a) as f64 * 1000.0 / ticks() / n as f64;
    println!(
        "mode={mode} n={n} concurrency={concurrency} ballast_mb={ballast_mb} rss_kb={} wall_s={:.2} \
         self_user_ms={:.4} self_sys_ms={:.4} child_user_ms={:.4} child_sys_ms={:.4} reaper_ms={:.4} total_ms={:.4} (per step)",
        rss_kb(),
        wall.as_secs_f64(),
        per(before[0], after[0]),
        per(before[1], after[1]),
        per(before[2], after[2]),
        per(before[3], after[3]),
        per(0, reaper_ticks),
        per(
            before.iter().sum(),
            after.iter().sum::<u64>() + reaper_ticks
        ),
    );
    drop(ballast);
}

/// Runs the steps; returns the reaper's CPU time (utime + stime, in ticks), 0 without one.
async fn run(mode: &str, n: usize, concurrency: usize, dir: &Path) -> u64 {
    let program = Arc::new(which("true"));
    let mut cfg = ExecConfig::new("bench", [program.display().to_string()]);
    if mode == "steps-reaper" {
        let exe = std::env::current_exe().expect("this example's path");
        cfg.reaper = Some(Arc::new(Reaper::start(&exe, &["reap"]).expect("reaper")));
    }
    let cfg = Arc::new(cfg);
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await.expect("semaphore");
        let (program, cfg, mode) = (program.clone(), cfg.clone(), mode.to_string());
        let dir = dir.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            match mode.as_str() {
                "steps" | "steps-reaper" => {
                    let outcome =
                        run_step(&spec(&program, &dir, i), &cfg, &CancellationToken::new()).await;
                    assert_eq!(outcome.result.exit_code, 0, "{:?}", outcome.result.error);
                }
                "fork" => spawn_true(&program, true).await,
                "spawn" => spawn_true(&program, false).await,
                other => panic!("unknown mode `{other}`: steps, steps-reaper, fork or spawn"),
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    cfg.reaper.as_ref().map_or(0, |r| {
        let [user, sys, ..] = cpu_of(&format!("/proc/{}/stat", r.pid()));
        user + sys
    })
}

/// The executor's spawn of `program`, with or without its `pre_exec` hook; waits for it and
/// reads its pipes to the end.
async fn spawn_true(program: &Path, pre_exec: bool) {
    let mut command = tokio::process::Command::new(program);
    command
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if pre_exec {
        // SAFETY: as in the executor: prctl(2) only, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGKILL))
                    .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = command.spawn().expect("spawn");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let mut sink = Vec::new();
    out.read_to_end(&mut sink).await.expect("stdout");
    err.read_to_end(&mut sink).await.expect("stderr");
    assert!(child.wait().await.expect("wait").success());
}

fn spec(program: &Path, dir: &Path, i: usize) -> StepSpec {
    let at = |rel: String| dir.join(rel).display().to_string();
    StepSpec {
        schema_version: SCHEMA_VERSION,
        run_id: Default::default(),
        step_id: "EXTRACT".into(),
        attempt: 1,
        attempt_id: Default::default(),
        command: program.display().to_string(),
        args: Vec::new(),
        env: Default::default(),
        cwd: at(format!("runs/{}", i % 100)),
        timeout_s: 60,
        artefacts: Default::default(),
        validations: Vec::new(),
        log_dir: at(format!("logs/{i}")),
        workdir: dir.display().to_string(),
        input_roots: Vec::new(),
        pool: "default".into(),
        trace: Default::default(),
        deferred: Vec::new(),
        dynamic_artefacts: Default::default(),
        files: Default::default(),
        failures: Default::default(),
    }
}

fn which(name: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not on PATH"))
}

/// utime, stime, cutime, cstime of this process, in clock ticks.
fn cpu() -> [u64; 4] {
    cpu_of("/proc/self/stat")
}

/// utime, stime, cutime, cstime from a `/proc/PID/stat` file, in clock ticks.
fn cpu_of(path: &str) -> [u64; 4] {
    let stat = std::fs::read_to_string(path).expect(path);
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11)
        .take(4)
        .map(|v| v.parse().expect("stat field"))
        .collect();
    [f[0], f[1], f[2], f[3]]
}

fn ticks() -> f64 {
    // USER_HZ is 100 on every Linux this runs on (sysconf(_SC_CLK_TCK)).
    100.0
}

fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}
