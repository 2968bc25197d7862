//! The `warpline-worker` binary: `exec` prints the outcome as JSON, exits by the outcome, and
//! turns SIGTERM into a clean cancellation; a SIGKILLed worker's tool groups die with it (its
//! reaper), and a worker whose reaper died kills its tool and exits 2; fleet mode (the default) refuses to start without an
//! allowlist and waits out an unreachable broker. Fleet mode with a broker is in `amqp.rs`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warpline_shared::contracts::{ReportStatus, StepOutcome};

use crate::support::{Workdir, read_pid, reaper_of, wait_gone};

const BIN: &str = env!("CARGO_BIN_EXE_warpline-worker");

fn write_spec(w: &Workdir, spec: &warpline_shared::contracts::StepSpec) -> String {
    let path = w.at("spec.json");
    std::fs::write(&path, serde_json::to_vec(spec).unwrap()).unwrap();
    path
}

#[test]
fn exec_prints_the_outcome_and_exits_by_it() {
    let w = Workdir::new();
    let ok = write_spec(&w, &w.sh("echo hello", 30));
    let out = Command::new(BIN).args(["exec", &ok]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome: StepOutcome = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome.result.exit_code, 0);
    assert_eq!(outcome.result.log_tail, "hello\n");
    assert_eq!(outcome.report.status, ReportStatus::Pass);

    let failing = write_spec(&w, &w.sh("exit 4", 30));
    let out = Command::new(BIN).args(["exec", &failing]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let outcome: StepOutcome = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome.result.exit_code, 4);
}

#[test]
fn exec_honours_allow() {
    let w = Workdir::new();
    let spec = write_spec(&w, &w.sh("echo hello", 30));
    let out = Command::new(BIN)
        .args(["exec", &spec, "--allow", "python3,bash"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let outcome: StepOutcome = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        outcome.result.error.as_deref(),
        Some("command `sh` is not on this worker's allowlist (allowed: `bash`, `python3`)")
    );
}

#[test]
fn exec_refuses_a_bad_spec_file_clearly() {
    let w = Workdir::new();
    let path = w.at("bad.json");
    std::fs::write(&path, r#"{"step_id": "X"}"#).unwrap();
    let out = Command::new(BIN).args(["exec", &path]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a valid StepSpec"), "{stderr}");
    assert!(stderr.contains("missing field"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_worker_killed_with_sigkill_takes_its_tool_with_it() {
    let w = Workdir::new();
    let spec = write_spec(&w, &w.sh("echo $$ > tool.pid; exec sleep 300", 120));
    let mut child = Command::new(BIN)
        .args(["exec", &spec])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tool = read_pid(&w.root().join("run/tool.pid"), Duration::from_secs(20));
    child.kill().unwrap();
    child.wait().unwrap();
    // The tool is in its own process group, so only the parent-death signal can reach it.
    assert!(
        wait_gone(tool, Duration::from_secs(5)),
        "tool {tool} outlived its SIGKILLed worker"
    );
}

#[test]
fn a_worker_killed_with_sigkill_takes_its_tools_whole_group_with_it() {
    let w = Workdir::new();
    // A background child stays in the tool's process group; no death signal ever reached it.
    let script = "sleep 300 & echo $! > child.pid; echo $$ > tool.pid; wait";
    let spec = write_spec(&w, &w.sh(script, 120));
    let mut worker = Command::new(BIN)
        .args(["exec", &spec])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tool = read_pid(&w.root().join("run/tool.pid"), Duration::from_secs(20));
    let child = read_pid(&w.root().join("run/child.pid"), Duration::from_secs(20));
    worker.kill().unwrap();
    worker.wait().unwrap();
    for pid in [tool, child] {
        assert!(
            wait_gone(pid, Duration::from_secs(5)),
            "{pid} outlived its SIGKILLed worker"
        );
    }
}

#[test]
fn exec_stops_and_kills_its_tool_when_its_reaper_dies() {
    let w = Workdir::new();
    let spec = write_spec(&w, &w.sh("echo $$ > tool.pid; exec sleep 300", 120));
    let worker = Command::new(BIN)
        .args(["exec", &spec, "--kill-grace-s", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tool = read_pid(&w.root().join("run/tool.pid"), Duration::from_secs(20));
    // The tool runs, so the reaper started before it.
    let reaper = reaper_of(worker.id()).expect("the worker has a reaper");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(reaper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = worker.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the reaper (pid") && stderr.contains("restart the worker"),
        "{stderr}"
    );
    let outcome: StepOutcome = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        outcome.result.error.as_deref(),
        Some("cancelled: worker shutting down")
    );
    assert!(
        wait_gone(tool, Duration::from_secs(1)),
        "tool {tool} survived"
    );
}

#[test]
fn sigterm_cancels_exec_cleanly() {
    let w = Workdir::new();
    let spec = write_spec(&w, &w.sh("echo $$ > tool.pid; sleep 300", 120));
    let child = Command::new(BIN)
        .args(["exec", &spec, "--kill-grace-s", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tool = read_pid(&w.root().join("run/tool.pid"), Duration::from_secs(20));
    let start = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome: StepOutcome = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        outcome.result.error.as_deref(),
        Some("cancelled: worker shutting down")
    );
    assert!(
        wait_gone(tool, Duration::from_secs(1)),
        "tool {tool} survived"
    );
}

#[test]
fn fleet_mode_refuses_to_start_without_an_allowlist() {
    let out = Command::new(BIN)
        .env_remove("WARPLINE_ALLOW")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no commands allowed: pass --allow"),
        "{stderr}"
    );

    // An allowlist of only empty names is no allowlist.
    let out = Command::new(BIN)
        .env("WARPLINE_ALLOW", ",")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn fleet_mode_retries_an_unreachable_broker_and_stops_on_sigterm() {
    // Port 1 on loopback refuses connections at once.
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(BIN)
        .args([
            "--allow",
            "sh",
            "--amqp-url",
            "amqp://guest:secret@127.0.0.1:1/%2f",
        ])
        .env("NO_COLOR", "1")
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let read = || std::fs::read_to_string(log.path()).unwrap();
    while read()
        .matches("cannot connect to RabbitMQ; retrying")
        .count()
        < 3
    {
        assert!(start.elapsed() < Duration::from_secs(20), "{}", read());
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", read());
    let logs = read();
    assert!(
        !logs.contains("secret"),
        "the password leaked into the logs: {logs}"
    );
    assert!(logs.contains("guest:***@127.0.0.1:1"), "{logs}");
}
