//! Shared helpers: a temporary workdir, StepSpecs rooted in it, and process probes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;
use warpline_executor::ExecConfig;
use warpline_shared::contracts::{StepSpec, Validation};

/// A temporary workdir for one test.
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Self {
        Workdir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A path under the workdir, as a string.
    pub fn at(&self, rel: &str) -> String {
        self.root().join(rel).display().to_string()
    }

    /// A spec running `sh -c SCRIPT` in `<workdir>/run`, logging to `<workdir>/logs/1`.
    pub fn sh(&self, script: &str, timeout_s: u64) -> StepSpec {
        self.spec("sh", &["-c", script], timeout_s)
    }

    pub fn spec(&self, command: &str, args: &[&str], timeout_s: u64) -> StepSpec {
        StepSpec {
            schema_version: 1,
            run_id: Uuid::now_v7(),
            step_id: "EXTRACT".into(),
            attempt: 1,
            attempt_id: Uuid::now_v7(),
            command: command.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: BTreeMap::new(),
            cwd: self.at("run"),
            timeout_s,
            artefacts: BTreeMap::from([("draft".to_string(), self.at("run/draft.yaml"))]),
            validations: Vec::<Validation>::new(),
            log_dir: self.at("logs/1"),
            workdir: self.root().display().to_string(),
            input_roots: Vec::new(),
            pool: "default".into(),
            trace: BTreeMap::new(),
            deferred: Vec::new(),
            dynamic_artefacts: BTreeMap::new(),
            files: BTreeMap::new(),
            failures: Default::default(),
        }
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root().join(rel)).unwrap()
    }
}

/// A config allowing `sh` and a few coreutils, with a short kill grace.
pub fn config() -> ExecConfig {
    ExecConfig {
        worker_id: "test-worker".into(),
        allowlist: BTreeSet::from(["sh".into(), "head".into(), "echo".into()]),
        tools_dirs: Vec::new(),
        secrets_dir: None,
        tail_bytes: 64 * 1024,
        kill_grace: Duration::from_secs(1),
        confine_args: true,
        path_roots: Vec::new(),
        reaper: None,
    }
}

/// True when no process has this pid, or it is a zombie awaiting its reaper (which in a
/// container may be a PID 1 that never reaps).
pub fn pid_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            state.is_some_and(|s| s.starts_with('Z') || s.starts_with('X'))
        }
    }
}

/// Waits up to `limit` for a process to be gone.
pub fn wait_gone(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if pid_gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    pid_gone(pid)
}

/// Waits up to `limit` for a file to hold a pid, and returns it.
pub fn read_pid(path: &PathBuf, limit: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(
            start.elapsed() < limit,
            "no pid in `{}` after {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The child of `pid` running `warpline-worker reap`.
pub fn reaper_of(pid: u32) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .find(|child| {
            std::fs::read(format!("/proc/{child}/cmdline"))
                .is_ok_and(|cmd| cmd.split(|b| *b == 0).any(|arg| arg == b"reap"))
        })
}
