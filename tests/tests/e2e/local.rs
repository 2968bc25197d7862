//! Local mode (`warpline run`): the DataWarp example end to end, fault injection over HTTP,
//! timeouts, the guard, Ctrl-C and refused input.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use warpline_shared::audit::AuditEvent;
use warpline_shared::contracts::Action;
use warpline_tests::*;

const PIPELINE: &str = "examples/datawarp/pipeline.json";

/// Runs the DataWarp example in its own workdir and schema.
fn datawarp(work: &Path, schema: &str, extra: &[&str]) -> Finished {
    let audit = work.join("audit.jsonl");
    // The tools are found only where the operator says: here, the workspace's build.
    let tools = bin_dir();
    let mut args = vec![
        "run",
        PIPELINE,
        "--tools-dir",
        tools.to_str().unwrap(),
        "--workers",
        "4",
        "--json",
        "--progress",
        "lines",
        "--workdir",
        work.to_str().unwrap(),
        "--audit",
        audit.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    warpline(&args, &[("DATAWARP_SCHEMA", schema)])
}

/// The decisions applied to one run, in order, from the audit log.
fn decisions(work: &Path, run_id: &str) -> Vec<(Action, String)> {
    audit_records(&work.join("audit.jsonl"))
        .into_iter()
        .filter(|r| r.run_id.map(|id| id.to_string()).as_deref() == Some(run_id))
        .filter_map(|r| match r.event {
            AuditEvent::Decision { decision, .. } => Some((decision.action, decision.reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn datawarp_backfill_completes_and_its_audit_log_verifies() {
    let _pg = postgres_admin();
    let work = tempfile::tempdir().unwrap();
    let schema = unique("e2e_local");
    let _guard = SchemaGuard(schema.clone());
    let run = datawarp(
        work.path(),
        &schema,
        &[
            "--months",
            "2024-01..2024-02",
            "--datasets",
            "ae_attendances,rtt_waiting_times,gp_appointments",
        ],
    );
    run.expect_code(0);
    let summary = run.summary();
    assert_eq!(summary["counts"]["COMPLETE"], 6, "{}", run.context());
    assert_eq!(summary["steps_executed"], 24, "{}", run.context());
    for r in summary["runs"].as_array().unwrap() {
        assert_eq!(
            r["attempts"],
            serde_json::json!({"EXTRACT": 1, "ENRICH": 1, "INGEST": 1, "PUBLISH": 1})
        );
        let key = r["partition"].as_str().unwrap();
        let (ds, month) = key.rsplit_once('_').unwrap();
        let parquet = work.path().join(format!("runs/{key}/{ds}_{month}.parquet"));
        assert!(
            parquet.metadata().map(|m| m.len() > 0).unwrap_or(false),
            "{} missing",
            parquet.display()
        );
    }
    // The rows loaded equal the source's rows.
    let csv = std::fs::read_to_string(
        repo_root().join("examples/datawarp/data/gp_appointments/2024-02.csv"),
    )
    .unwrap();
    let rows = csv.lines().skip(1).filter(|l| !l.trim().is_empty()).count() as i64;
    let mut db =
        postgres::Client::connect(&database_url(), postgres::NoTls).expect("datawarp database");
    let loaded: i64 = db
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{schema}\".gp_appointments WHERE period_month = '2024-02'"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(loaded, rows);

    // The log verifies, and any edited line is named.
    let audit = work.path().join("audit.jsonl");
    let ok = warpline(&["audit", "verify", audit.to_str().unwrap()], &[]);
    ok.expect_code(0);
    assert!(ok.stdout().contains("chain intact"), "{}", ok.context());
    let text = std::fs::read_to_string(&audit).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let target = lines.len() / 2;
    lines[target] = lines[target].replacen("\"seq\":", "\"seq\": ", 1);
    std::fs::write(&audit, lines.join("\n") + "\n").unwrap();
    let bad = warpline(&["audit", "verify", audit.to_str().unwrap()], &[]);
    bad.expect_code(1);
    assert!(
        bad.stderr().contains(&format!("line {}", target + 1)),
        "{}",
        bad.context()
    );

    // `audit show` tells one run's story.
    std::fs::write(&audit, text).unwrap();
    let show = warpline(
        &[
            "audit",
            "show",
            "ae_attendances_2024-01",
            "--file",
            audit.to_str().unwrap(),
        ],
        &[],
    );
    show.expect_code(0);
    for step in ["EXTRACT#1", "ENRICH#1", "INGEST#1", "PUBLISH#1", "COMPLETE"] {
        assert!(
            show.stdout().contains(step),
            "{step} missing\n{}",
            show.context()
        );
    }
}

fn source_server(scripts: Vec<(&str, Vec<Fault>)>) -> FaultServer {
    let scripts: HashMap<String, Vec<Fault>> = scripts
        .into_iter()
        .map(|(p, f)| (p.to_string(), f))
        .collect();
    FaultServer::start(repo_root().join("examples/datawarp/data"), scripts)
}

#[test]
fn a_truncated_month_is_caught_retried_then_halted() {
    let _pg = postgres_admin();
    let server = source_server(vec![(
        "/ae_attendances/2024-02.csv",
        vec![Fault::Truncate(120)],
    )]);
    let work = tempfile::tempdir().unwrap();
    let schema = unique("e2e_trunc");
    let _guard = SchemaGuard(schema.clone());
    let var = format!("source_base={}", server.base);
    let run = datawarp(
        work.path(),
        &schema,
        &[
            "--months",
            "2024-01..2024-02",
            "--datasets",
            "ae_attendances",
            "--var",
            &var,
        ],
    );
    run.expect_code(1);
    let summary = run.summary();
    assert_eq!(
        run_of(&summary, "ae_attendances_2024-01")["state"],
        "COMPLETE",
        "{}",
        run.context()
    );
    let bad = run_of(&summary, "ae_attendances_2024-02");
    assert_eq!(bad["state"], "HALTED", "{}", run.context());
    assert_eq!(bad["step"], "EXTRACT");
    assert_eq!(bad["attempts"]["EXTRACT"], 3);
    assert_eq!(server.hits("/ae_attendances/2024-02.csv"), 3);
    let d = decisions(work.path(), bad["run_id"].as_str().unwrap());
    let actions: Vec<Action> = d.iter().map(|(a, _)| *a).collect();
    assert_eq!(
        actions,
        [Action::Retry, Action::Retry, Action::Halt],
        "{d:?}"
    );
    assert!(
        d.iter().all(|(_, why)| why.contains("file_size_min")),
        "{d:?}"
    );
    assert!(
        bad["reason"].as_str().unwrap().contains("no attempts left"),
        "{bad}"
    );
}

#[test]
fn a_source_failing_once_with_http_500_completes_on_retry() {
    let _pg = postgres_admin();
    let server = source_server(vec![(
        "/rtt_waiting_times/2024-03.csv",
        vec![Fault::Status(500), Fault::Serve],
    )]);
    let work = tempfile::tempdir().unwrap();
    let schema = unique("e2e_500");
    let _guard = SchemaGuard(schema.clone());
    let var = format!("source_base={}", server.base);
    let run = datawarp(
        work.path(),
        &schema,
        &[
            "--months",
            "2024-03",
            "--datasets",
            "rtt_waiting_times",
            "--var",
            &var,
        ],
    );
    run.expect_code(0);
    let summary = run.summary();
    let r = run_of(&summary, "rtt_waiting_times_2024-03");
    assert_eq!(r["state"], "COMPLETE");
    assert_eq!(r["attempts"]["EXTRACT"], 2, "{r}");
    let d = decisions(work.path(), r["run_id"].as_str().unwrap());
    assert_eq!(d[0].0, Action::Retry, "{d:?}");
    assert!(d[0].1.contains("ConnectionError"), "{d:?}");
    assert!(d[0].1.contains("500"), "{d:?}");
}

/// Writes a pipeline of shell steps into a fresh directory.
fn shell_pipeline(dir: &Path, steps: Value) -> String {
    let config = serde_json::json!({
        "name": "shell",
        "workdir": "work",
        "retry": {"initial_ms": 10},
        "lost_grace_s": 5,
        "steps": steps,
    });
    let path = dir.join("pipeline.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path.display().to_string()
}

#[test]
fn a_hanging_tool_is_killed_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = shell_pipeline(
        dir.path(),
        serde_json::json!([{
            "id": "HANG", "command": "sh",
            "args": ["-c", "echo $$ > pid-{attempt}; sleep 60 & wait"],
            "timeout_s": 1, "max_attempts": 2
        }]),
    );
    let started = Instant::now();
    let run = warpline(
        &[
            "run",
            &pipeline,
            "--months",
            "2024-01",
            "--json",
            "--progress",
            "none",
        ],
        &[],
    );
    let took = started.elapsed();
    run.expect_code(1);
    let summary = run.summary();
    let r = run_of(&summary, "2024-01");
    assert_eq!(r["state"], "HALTED", "{}", run.context());
    assert_eq!(r["attempts"]["HANG"], 2);
    assert!(r["reason"].as_str().unwrap().contains("timed out"), "{r}");
    assert!(
        took < Duration::from_secs(20),
        "two 1 s timeouts took {took:?}"
    );
    let audit = audit_records(Path::new(summary["audit"].as_str().unwrap()));
    let timed_out: Vec<bool> = audit
        .iter()
        .filter_map(|r| match &r.event {
            AuditEvent::StepResult { outcome } => Some(outcome.result.timed_out),
            _ => None,
        })
        .collect();
    assert_eq!(timed_out, [true, true]);
    for attempt in [1, 2] {
        let pid: i32 =
            std::fs::read_to_string(dir.path().join(format!("work/runs/2024-01/pid-{attempt}")))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
        assert!(
            !alive(pid),
            "attempt {attempt}'s tool (pid {pid}) is still running"
        );
    }
}

#[test]
fn always_proceed_is_still_bounded_by_the_guard() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = shell_pipeline(
        dir.path(),
        serde_json::json!([{
            "id": "MAKE", "command": "true", "max_attempts": 2,
            "artefacts": {"out": "never-written.txt"},
            "validations": [{"kind": "file_exists", "artefact": "out"}]
        }]),
    );
    let run = warpline(
        &[
            "run",
            &pipeline,
            "--datasets",
            "a",
            "--agent",
            "always-proceed",
            "--json",
            "--progress",
            "none",
        ],
        &[],
    );
    run.expect_code(1);
    let summary = run.summary();
    assert_eq!(
        run_of(&summary, "a")["state"],
        "HALTED",
        "{}",
        run.context()
    );
    let overrides: Vec<(Action, Action)> =
        audit_records(Path::new(summary["audit"].as_str().unwrap()))
            .into_iter()
            .filter_map(|r| match r.event {
                AuditEvent::GuardOverride {
                    proposed, applied, ..
                } => Some((proposed, applied)),
                _ => None,
            })
            .collect();
    assert_eq!(
        overrides,
        [
            (Action::Proceed, Action::Retry),
            (Action::Proceed, Action::Halt)
        ]
    );
}

/// The pid a tool wrote into `file` (waiting for it).
fn pid_in(file: &Path) -> i32 {
    let text = wait_file(file, Duration::from_secs(20));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("`{}` holds no pid ({e}): {text}", file.display()))
}

/// A `warpline run` killed with SIGKILL (no chance to clean up) takes its tools' whole
/// process groups with it: its reaper sees it gone. A parent-death signal reached only the
/// tool itself, never a child the tool left in the background.
#[test]
fn a_local_run_killed_with_sigkill_takes_its_tools_whole_group_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let script = "sleep 300 & echo $! > child.pid; echo $$ > tool.pid; wait";
    let pipeline = shell_pipeline(
        dir.path(),
        serde_json::json!([{"id": "SLOW", "command": "sh", "args": ["-c", script], "timeout_s": 600}]),
    );
    let audit = dir.path().join("audit.jsonl");
    let mut run = Command::new(bin("warpline"))
        .args(["run", &pipeline, "--datasets", "a", "--progress", "none"])
        .args(["--audit", audit.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tool = pid_in(&dir.path().join("work/runs/a/tool.pid"));
    let child = pid_in(&dir.path().join("work/runs/a/child.pid"));
    run.kill().unwrap();
    run.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (alive(tool) || alive(child)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in [tool, child] {
        assert!(!alive(pid), "{pid} outlived its SIGKILLed `warpline run`");
    }
}

#[test]
fn ctrl_c_kills_the_tools_and_leaves_a_verifiable_log() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = shell_pipeline(
        dir.path(),
        serde_json::json!([{
            "id": "SLOW", "command": "sh", "args": ["-c", "echo $$ > pid; sleep 60"], "timeout_s": 120
        }]),
    );
    let audit = dir.path().join("audit.jsonl");
    let child = Command::new(bin("warpline"))
        .args([
            "run",
            &pipeline,
            "--datasets",
            "a,b",
            "--json",
            "--progress",
            "none",
            "--audit",
            audit.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("work/runs/a/pid");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pid_file.exists()
        || std::fs::read_to_string(&pid_file)
            .unwrap_or_default()
            .trim()
            .is_empty()
    {
        assert!(Instant::now() < deadline, "the tool never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let tool: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!alive(tool), "the tool (pid {tool}) survived Ctrl-C");
    let ok = warpline(&["audit", "verify", audit.to_str().unwrap()], &[]);
    ok.expect_code(0);
    let finished: Vec<String> = audit_records(&audit)
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::RunFinished { state, .. } => Some(state.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(finished, ["CANCELLED", "CANCELLED"]);
}

#[test]
fn bad_config_and_partitions_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = shell_pipeline(
        dir.path(),
        serde_json::json!([{
            "id": "A", "command": "true",
            "validations": [{"kind": "log_regex_absent", "pattern": "CRITICAL("}]
        }]),
    );
    let run = warpline(&["run", &pipeline, "--months", "2024-01"], &[]);
    run.expect_code(2);
    assert!(
        run.stderr().contains("steps[0].validations[0].pattern"),
        "{}",
        run.context()
    );
    assert!(run.stderr().contains("invalid regex"), "{}", run.context());
    assert!(
        !dir.path().join("work").exists(),
        "a refused config must not create its workdir"
    );

    let good = shell_pipeline(
        dir.path(),
        serde_json::json!([{"id": "A", "command": "true", "args": ["{month}"]}]),
    );
    for (args, needle) in [
        (vec!["--months", "2024-13"], "invalid month `2024-13`"),
        (vec!["--months", "2024-05..2024-01"], "FROM is after TO"),
        (vec!["--datasets", "a"], "--months"),
        (
            vec!["--months", "2024-01", "--datasets", "../etc"],
            "invalid dataset `../etc`",
        ),
    ] {
        let mut all = vec!["run", good.as_str()];
        all.extend(args);
        let run = warpline(&all, &[]);
        run.expect_code(2);
        assert!(run.stderr().contains(needle), "{needle}\n{}", run.context());
    }
}

#[test]
fn runs_halting_the_same_way_escalate_the_backfill_and_stop_new_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "name": "broken-upstream",
        "workdir": "work",
        "escalate_after_same_halts": 2,
        "steps": [{
            "id": "FETCH", "command": "sh",
            "args": ["-c", "echo 'CRITICAL: upstream answers 410 Gone'; exit 1"]
        }]
    });
    let path = dir.path().join("pipeline.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let run = warpline(
        &[
            "run",
            path.to_str().unwrap(),
            "--months",
            "2024-01..2024-06",
            "--workers",
            "1",
            "--max-parallel",
            "1",
            "--json",
            "--progress",
            "none",
        ],
        &[],
    );
    run.expect_code(1);
    let summary = run.summary();
    assert_eq!(summary["counts"]["HALTED"], 2, "{}", run.context());
    assert_eq!(summary["counts"]["CANCELLED"], 4, "{}", run.context());
    assert_eq!(summary["steps_executed"], 2, "{}", run.context());
    let not_started = run_of(&summary, "2024-06")["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        not_started.contains("backfill was escalated"),
        "{not_started}"
    );
    let escalations: Vec<(String, usize)> =
        audit_records(Path::new(summary["audit"].as_str().unwrap()))
            .into_iter()
            .filter_map(|r| match r.event {
                AuditEvent::BackfillEscalated {
                    signature, runs, ..
                } => Some((signature, runs.len())),
                _ => None,
            })
            .collect();
    assert_eq!(escalations, [("FETCH: exit 1".to_string(), 2)]);
}

#[test]
fn ui_stay_keeps_the_dashboard_up_after_the_run_until_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = shell_pipeline(
        dir.path(),
        serde_json::json!([{
            "id": "ONLY", "command": "sh", "args": ["-c", "test {dataset} != b"],
            "max_attempts": 1
        }]),
    );
    let port = warpline_tests::faults::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(bin("warpline"))
        .args([
            "run",
            &pipeline,
            "--datasets",
            "a,b",
            "--progress",
            "none",
            "--ui",
            &addr,
            "--ui-stay",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The stderr lines as they come, so the test can wait for "the run has ended".
    let (tx, lines) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen
        .iter()
        .any(|l: &String| l.contains("the run has ended"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("`--ui-stay` never said the run ended:\n{}", seen.join("\n"));
            }
        }
    }
    let id = seen
        .iter()
        .find_map(|l| l.strip_prefix("warpline: backfill "))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no backfill id in:\n{}", seen.join("\n")))
        .to_string();
    // The process is still there and its pages answer from the final state.
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "{}", seen.join("\n"));
    let (code, body) = warpline_tests::fleet::http_get(&addr, &format!("/backfills/{id}"));
    assert_eq!(code, 200, "{body}");
    // One grid cell per run: a's step passed; b's failure is unclassified, so it escalated.
    assert!(
        body.contains("data-step=\"ONLY\" data-state=\"escalated\"")
            && body.contains("data-step=\"ONLY\" data-state=\"passed\""),
        "the final states are not on the page: {body}"
    );
    // Read only: a banner says how to go on, and no action is drawn (b's escalation would
    // have its resolve form, the backfill its retry and reprocess buttons).
    assert!(body.contains("id=\"ended\""), "no read-only banner: {body}");
    assert!(
        !body.contains("action=\"/ui/"),
        "an ended run's page draws an action: {body}"
    );
    let (code, body) = warpline_tests::fleet::http_get(&addr, "/");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(&id[..8]),
        "the backfill is not listed: {body}"
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    // A signal after the run ended leaves the run's own exit code: one run did not complete.
    assert_eq!(status.code(), Some(1), "{}", seen.join("\n"));
    assert_eq!(
        warpline_tests::fleet::http_get(&addr, "/").0,
        0,
        "the dashboard still answers after the process ended"
    );
}
