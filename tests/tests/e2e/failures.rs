//! Failure classification end to end: `warpline run` supervising a tool that fails the way real
//! Python toolchains, psql and console libraries do (`tests/fixtures/tools/flaky_tool.py`).
//! Transient failures are retried and complete, permanent ones halt after exactly one attempt,
//! unclassifiable ones escalate, and every reason quotes the causal line, not the noise printed
//! after it.

use std::path::Path;

use serde_json::Value;
use warpline_shared::audit::AuditEvent;
use warpline_shared::contracts::{Action, FailureClass};
use warpline_tests::*;

/// Writes a one-step pipeline running the fixture tool with MODE = the partition's dataset.
fn pipeline(dir: &Path, failures: Value) -> String {
    let tool = repo_root().join("tests/fixtures/tools/flaky_tool.py");
    let config = serde_json::json!({
        "name": "flaky",
        "workdir": "work",
        "retry": {"initial_ms": 10},
        "failures": failures,
        "steps": [{
            "id": "FETCH", "command": "python3",
            "args": [tool.display().to_string(), "{dataset}", "{attempt}"],
            "max_attempts": 3, "timeout_s": 30
        }],
    });
    let path = dir.join("pipeline.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path.display().to_string()
}

fn run(dir: &Path, pipeline: &str, modes: &str) -> (Finished, Value) {
    let audit = dir.join("audit.jsonl");
    let run = warpline(
        &[
            "run",
            pipeline,
            "--datasets",
            modes,
            "--json",
            "--progress",
            "none",
            "--audit",
            audit.to_str().unwrap(),
        ],
        &[],
    );
    let summary = run.summary();
    (run, summary)
}

/// The decisions applied to one run and the failure classes its results carried, in order.
fn story(dir: &Path, run_id: &str) -> (Vec<(Action, String)>, Vec<Option<FailureClass>>) {
    let mut decisions = Vec::new();
    let mut classes = Vec::new();
    for r in audit_records(&dir.join("audit.jsonl")) {
        if r.run_id.map(|id| id.to_string()).as_deref() != Some(run_id) {
            continue;
        }
        match r.event {
            AuditEvent::Decision { decision, .. } => {
                decisions.push((decision.action, decision.reason))
            }
            AuditEvent::StepResult { outcome } => {
                classes.push(outcome.result.failure.map(|f| f.class))
            }
            _ => {}
        }
    }
    (decisions, classes)
}

#[test]
fn transient_failures_retry_and_complete_quoting_the_causal_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), serde_json::json!({}));
    let (run, summary) = run(dir.path(), &p, "http500,pg_fatal,wrapped,reset");
    run.expect_code(0);
    // (mode, the text the first reason must quote, its stream and line)
    let expect = [
        (
            "http500",
            "stdout line 2: `❌ Failed: 500 Server Error: Internal Server Error for url: http://127.0.0.1:9/publications/ae-2024-06`",
            "exit code 1;",
        ),
        (
            "pg_fatal",
            "stderr line 1: `psql: error: connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  database \"datawarp\" is not currently accepting connections`",
            "exit code 2;",
        ),
        (
            // Wrapped at 80 columns and coloured: the two lines are joined, the codes gone.
            "wrapped",
            "stderr line 1: `❌ connection to server at \"localhost\" (127.0.0.1), port 5499 failed: Connection refused`",
            "exit code 1;",
        ),
        (
            "reset",
            "ConnectionResetError: [Errno 104] Connection reset by peer`",
            "exit code 1;",
        ),
    ];
    for (mode, quote, code) in expect {
        let r = run_of(&summary, mode);
        assert_eq!(r["state"], "COMPLETE", "{mode}: {}", run.context());
        assert_eq!(r["attempts"]["FETCH"], 2, "{mode}: {r}");
        let (d, classes) = story(dir.path(), r["run_id"].as_str().unwrap());
        assert_eq!(d[0].0, Action::Retry, "{mode}: {d:?}");
        assert!(d[0].1.contains(quote), "{mode}: {}", d[0].1);
        assert!(d[0].1.contains(code), "{mode}: {}", d[0].1);
        assert!(
            !d[0].1.contains("Error: 1"),
            "{mode} quotes noise: {}",
            d[0].1
        );
        assert!(!d[0].1.contains("FutureWarning"), "{mode}: {}", d[0].1);
        assert_eq!(classes, [Some(FailureClass::Transient), None], "{mode}");
    }
}

#[test]
fn permanent_failures_halt_after_one_attempt_and_the_unclassified_escalate() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), serde_json::json!({}));
    let (run, summary) = run(dir.path(), &p, "keyerror,http404,odd");
    run.expect_code(1);
    for (mode, quote) in [
        // The traceback's last line decides, not the recovered read timeout before it.
        // (Its line number depends on the Python version's traceback format.)
        (
            "keyerror",
            "KeyError: 'row_count'` (permanent: built-in: Python permanent exception)",
        ),
        (
            "http404",
            "stderr line 1: `requests.exceptions.HTTPError: 404 Client Error: Not Found",
        ),
    ] {
        let r = run_of(&summary, mode);
        assert_eq!(r["state"], "HALTED", "{mode}: {}", run.context());
        assert_eq!(r["attempts"]["FETCH"], 1, "{mode}: {r}");
        let (d, classes) = story(dir.path(), r["run_id"].as_str().unwrap());
        assert_eq!(d.len(), 1, "{mode}: {d:?}");
        assert_eq!(d[0].0, Action::Halt);
        assert!(d[0].1.contains(quote), "{mode}: {}", d[0].1);
        assert!(d[0].1.contains("a retry cannot fix this"), "{}", d[0].1);
        assert_eq!(classes, [Some(FailureClass::Permanent)]);
        let reason = r["reason"].as_str().unwrap();
        assert!(reason.contains(quote), "{mode}: summary reason {reason}");
    }
    let odd = run_of(&summary, "odd");
    assert_eq!(odd["state"], "ESCALATED", "{}", run.context());
    assert_eq!(odd["attempts"]["FETCH"], 1);
    let (d, classes) = story(dir.path(), odd["run_id"].as_str().unwrap());
    assert_eq!(d[0].0, Action::Escalate);
    let quote = "stdout line 2: `upload aborted: bucket quota reached for project 7`";
    assert!(d[0].1.contains(quote), "{}", d[0].1);
    assert!(d[0].1.contains("exit code 3"), "{}", d[0].1);
    assert_eq!(classes, [Some(FailureClass::Unclassified)]);
}

#[test]
fn pipeline_rules_reclassify_and_come_before_the_builtin_table() {
    let dir = tempfile::tempdir().unwrap();
    // The operator knows the quota resets and that this 500 never heals.
    let p = pipeline(
        dir.path(),
        serde_json::json!({"rules": [
            {"name": "quota resets hourly", "pattern": "bucket quota reached", "class": "transient"},
            {"pattern": "500 server error", "exit_codes": [1], "class": "permanent"}
        ]}),
    );
    let (run, summary) = run(dir.path(), &p, "odd,http500");
    run.expect_code(1);
    let odd = run_of(&summary, "odd");
    assert_eq!(odd["state"], "HALTED", "{}", run.context());
    assert_eq!(odd["attempts"]["FETCH"], 3);
    let (d, _) = story(dir.path(), odd["run_id"].as_str().unwrap());
    assert!(
        d[0].1.contains("(transient: quota resets hourly)"),
        "{}",
        d[0].1
    );
    let http = run_of(&summary, "http500");
    assert_eq!(http["state"], "HALTED");
    assert_eq!(http["attempts"]["FETCH"], 1);
    let (d, _) = story(dir.path(), http["run_id"].as_str().unwrap());
    assert!(
        d[0].1
            .contains("(permanent: rule 2 (pattern `500 server error`, exit codes 1))"),
        "{}",
        d[0].1
    );
}
