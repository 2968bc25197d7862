//! Fleet mode (`warpline serve` + `warpline-worker`): the DataWarp backfill across three
//! workers, a worker and a coordinator killed mid-backfill, a standby taking over, a garbage
//! result dead-lettered, and the operator commands (resolve, cancel, retry-failed) over the CLI.
//!
//! Every test has its own [`Fleet`]: its own database schema, queue prefix and directory, with
//! real processes against the local RabbitMQ and PostgreSQL.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_shared::contracts::Action;
use warpline_tests::fleet::{Fleet, http_get, readyz};
use warpline_tests::*;

const DATAWARP: &str = "examples/datawarp/pipeline.json";
const DATAWARP_TOOLS: [&str; 4] = [
    "url_to_manifest",
    "enrich_manifest",
    "load-batch",
    "export_to_parquet",
];

/// Long enough for anything these small backfills do on a busy two-core machine.
const LIMIT: Duration = Duration::from_secs(60);

/// A shell step: `sh -c SCRIPT` in the run's directory.
fn sh(id: &str, script: &str) -> Value {
    json!({"id": id, "command": "sh", "args": ["-c", script], "timeout_s": 60})
}

/// The `step_result` records of an audit log: (run, attempt id, step, worker).
fn step_results(records: &[AuditRecord]) -> Vec<(Uuid, Uuid, String, String)> {
    records
        .iter()
        .filter_map(|r| match &r.event {
            AuditEvent::StepResult { outcome } => Some((
                r.run_id.expect("a step result names its run"),
                outcome.result.attempt_id.expect("an attempt id"),
                outcome.result.step_id.clone(),
                outcome.result.worker_id.clone(),
            )),
            _ => None,
        })
        .collect()
}

/// The run summaries of a backfill summary.
fn runs(summary: &Value) -> &Vec<Value> {
    summary["runs"].as_array().expect("runs array")
}

/// Asserts every run of a summary is in `state`.
fn assert_all(summary: &Value, state: &str, n: usize) {
    assert_eq!(runs(summary).len(), n, "{summary:#}");
    for r in runs(summary) {
        assert_eq!(r["state"], state, "{summary:#}");
    }
}

#[test]
fn datawarp_backfill_runs_across_three_workers_and_its_log_verifies() {
    let mut fleet = Fleet::new("datawarp");
    let c = fleet.serve("coordinator");
    fleet.wait_ready(&c, LIMIT);
    let tables = unique("e2e_fleet_dw");
    let _tables = SchemaGuard(tables.clone());
    for id in ["w1", "w2", "w3"] {
        fleet.worker_with_env(
            id,
            2,
            &DATAWARP_TOOLS,
            &[
                ("DATAWARP_SCHEMA", &tables),
                ("WARPLINE_TOOLS_DIR", bin_dir().to_str().unwrap()),
            ],
        );
    }
    let work = fleet.dir().join("work");
    let out = fleet.cli(
        &c,
        &[
            "submit",
            DATAWARP,
            "--months",
            "2024-01..2024-12",
            "--datasets",
            "ae_attendances,rtt_waiting_times,gp_appointments",
            "--workdir",
            work.to_str().unwrap(),
            "--max-parallel",
            "12",
            "--wait",
            "--json",
        ],
    );
    out.expect_code(0);
    let summary = out.summary();
    assert_all(&summary, "COMPLETE", 36);
    assert_eq!(summary["counts"]["COMPLETE"], 36, "{summary:#}");
    for r in runs(&summary) {
        assert_eq!(
            r["attempts"],
            json!({"EXTRACT": 1, "ENRICH": 1, "INGEST": 1, "PUBLISH": 1}),
            "{r}"
        );
        let key = r["partition"].as_str().unwrap();
        let (ds, month) = key.rsplit_once('_').unwrap();
        let parquet = work.join(format!("runs/{key}/{ds}_{month}.parquet"));
        assert!(
            parquet.metadata().map(|m| m.len() > 0).unwrap_or(false),
            "{} missing",
            parquet.display()
        );
    }

    let records = fleet.audit_records();
    let results = step_results(&records);
    assert_eq!(results.len(), 144, "one result per step of every run");
    let workers: BTreeSet<&str> = results.iter().map(|(.., w)| w.as_str()).collect();
    assert_eq!(
        workers,
        BTreeSet::from(["w1", "w2", "w3"]),
        "every worker ran steps"
    );
    let verify = fleet.warpline(&["audit", "verify", fleet.audit().to_str().unwrap()]);
    verify.expect_code(0);
    assert!(
        verify.stdout().contains("chain intact"),
        "{}",
        verify.context()
    );
}

#[test]
fn a_step_whose_worker_is_killed_runs_again_on_another_worker() {
    let mut fleet = Fleet::new("worker_kill");
    let c = fleet.serve("coordinator");
    fleet.wait_ready(&c, LIMIT);
    let pipeline = fleet.pipeline(
        "killed",
        json!([
            // The first run of the step sleeps until its worker is killed; the redelivered
            // one finishes at once.
            sh(
                "SLOW",
                "echo $$ >> pids; [ $(wc -l < pids) -gt 1 ] || sleep 30"
            ),
            sh("DONE", "echo done > done"),
        ]),
    );
    fleet.worker("doomed", 1, &["sh"]);
    let id = fleet.submit(&c, &pipeline, &["--months", "2024-01"]);
    let run_dir = Path::new(&pipeline)
        .parent()
        .unwrap()
        .join("work/runs/2024-01");
    let first: i32 = fleet
        .wait_file(&run_dir.join("pids"), LIMIT)
        .trim()
        .parse()
        .unwrap();
    fleet.worker("survivor", 1, &["sh"]);
    fleet.kill("doomed");
    // The tool has a process group of its own, yet it dies with its worker (parent-death
    // signal): the redelivered step never runs beside its first copy.
    let gone_by = std::time::Instant::now() + Duration::from_secs(5);
    while alive(first) && std::time::Instant::now() < gone_by {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !alive(first),
        "the tool {first} outlived its SIGKILLed worker"
    );

    let summary = fleet.wait_finished(&c, &id, LIMIT);
    assert_all(&summary, "COMPLETE", 1);
    // The broker redelivered the very same attempt: no attempt was lost or retried.
    assert_eq!(runs(&summary)[0]["attempts"], json!({"SLOW": 1, "DONE": 1}));
    let pids = std::fs::read_to_string(run_dir.join("pids")).unwrap();
    let pids: Vec<&str> = pids.lines().collect();
    assert_eq!(pids.len(), 2, "SLOW ran twice: {pids:?}");
    assert_ne!(pids[0], pids[1]);
    let results = step_results(&fleet.audit_records());
    let slow: Vec<&str> = results
        .iter()
        .filter(|(_, _, step, _)| step == "SLOW")
        .map(|(.., w)| w.as_str())
        .collect();
    assert_eq!(slow, ["survivor"], "only the survivor reported SLOW");
}

#[test]
fn a_restarted_coordinator_finishes_the_backfill_without_applying_a_result_twice() {
    let mut fleet = Fleet::new("coord_restart");
    let c = fleet.serve("first");
    fleet.wait_ready(&c, LIMIT);
    let pipeline = fleet.pipeline(
        "restart",
        json!([
            sh("A", "sleep 0.3; echo a >> steps"),
            sh("B", "sleep 0.3; echo b >> steps"),
            sh("C", "sleep 0.3; echo c >> steps"),
        ]),
    );
    fleet.worker("w1", 2, &["sh"]);
    fleet.worker("w2", 2, &["sh"]);
    // `submit --wait` follows the backfill across the restart (it retries an unreachable
    // coordinator for a minute).
    fleet.spawn_cli(
        "submit",
        &c,
        &[
            "submit",
            &pipeline,
            "--datasets",
            "a,b,c,d,e,f,g,h",
            "--max-parallel",
            "4",
            "--wait",
            "--json",
        ],
    );
    let audit = fleet.audit();
    fleet_wait(LIMIT, "6 step results before the kill", || {
        count_events(&audit, "step_result") >= 6
    });
    fleet.kill("first");
    let before = step_results(&fleet.audit_records()).len();
    assert!(before < 24, "the backfill finished before the kill");
    let second = fleet.serve_on("second", c.addr());
    fleet.wait_ready(&second, LIMIT);

    let (status, stdout) = fleet.wait_exit("submit", LIMIT);
    assert_eq!(status.code(), Some(0), "submit --wait: {status}\n{stdout}");
    let summary: Value = serde_json::from_str(&stdout).expect("a JSON summary");
    assert_all(&summary, "COMPLETE", 8);

    let records = fleet.audit_records();
    let results = step_results(&records);
    let mut per_attempt: HashMap<Uuid, usize> = HashMap::new();
    let mut results_per_run: HashMap<Uuid, usize> = HashMap::new();
    for (run, attempt, ..) in &results {
        *per_attempt.entry(*attempt).or_default() += 1;
        *results_per_run.entry(*run).or_default() += 1;
    }
    let twice: Vec<_> = per_attempt.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "results applied twice: {twice:?}");
    let mut decisions_per_run: HashMap<Uuid, usize> = HashMap::new();
    for r in &records {
        if let AuditEvent::Decision { .. } = r.event {
            *decisions_per_run.entry(r.run_id.unwrap()).or_default() += 1;
        }
    }
    assert_eq!(
        decisions_per_run, results_per_run,
        "one decision per result"
    );
    assert_eq!(results.len(), 24, "3 steps × 8 runs, each applied once");
    // The restarted coordinator's event lines name the runs it restored.
    let log = fleet.log("second");
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.ends_with(" dispatched") || l.ends_with(" COMPLETE"))
        .collect();
    assert!(!events.is_empty(), "no run event after the restart:\n{log}");
    for line in events {
        let run = line.split_whitespace().nth(1).unwrap_or_default();
        assert!(
            run.len() == 1 && "abcdefgh".contains(run),
            "a restored run is not named: `{line}`"
        );
    }
    let verify = fleet.warpline(&["audit", "verify", audit.to_str().unwrap()]);
    verify.expect_code(0);
}

#[test]
fn a_standby_coordinator_takes_over_when_the_active_one_dies() {
    let mut fleet = Fleet::new("standby");
    let active = fleet.serve("active");
    fleet.wait_ready(&active, LIMIT);
    let standby = fleet.serve("standby");
    fleet.wait_log("standby", "waiting as a standby");
    assert_eq!(readyz(&standby), 503, "a standby is not ready");
    let pipeline = fleet.pipeline(
        "failover",
        json!([sh("A", "sleep 0.3"), sh("B", "sleep 0.3")]),
    );
    fleet.worker("w1", 2, &["sh"]);
    fleet.worker("w2", 2, &["sh"]);
    let id = fleet.submit(
        &active,
        &pipeline,
        &["--datasets", "a,b,c,d,e,f", "--max-parallel", "4"],
    );
    let audit = fleet.audit();
    fleet_wait(LIMIT, "2 step results before the kill", || {
        count_events(&audit, "step_result") >= 2
    });
    assert_eq!(
        readyz(&standby),
        503,
        "a standby is not ready while the active one lives"
    );
    // A standby takes no work: what it refuses must not happen later, when it leads.
    let refused = fleet.cli(&standby, &["submit", &pipeline, "--datasets", "x"]);
    refused.expect_code(2);
    assert!(refused.stderr().contains("503"), "{}", refused.context());
    fleet.kill("active");
    fleet.wait_ready(&standby, LIMIT);
    fleet.wait_log("standby", "leading schema");

    let summary = fleet.wait_finished(&standby, &id, LIMIT);
    let all = fleet.cli(&standby, &["status", "--json"]);
    all.expect_code(0);
    let ids: Vec<Value> = all
        .summary()
        .as_array()
        .expect("a list of summaries")
        .iter()
        .map(|s| s["backfill_id"].clone())
        .collect();
    assert_eq!(
        ids,
        [json!(id)],
        "only the backfill the active accepted exists"
    );
    assert_all(&summary, "COMPLETE", 6);
    for r in runs(&summary) {
        for step in ["A", "B"] {
            assert!(r["attempts"][step].as_u64() >= Some(1), "{r}");
        }
    }
    fleet
        .warpline(&["audit", "verify", audit.to_str().unwrap()])
        .expect_code(0);
}

#[test]
fn a_garbage_result_is_dead_lettered_and_the_coordinator_goes_on() {
    let mut fleet = Fleet::new("garbage");
    let c = fleet.serve("coordinator");
    fleet.wait_ready(&c, LIMIT);
    let results = fleet.topology().results_queue();
    let garbage = b"this is not a step result".to_vec();
    let anonymous = br#"{"result": {"step_id": "A", "exit_code": 0, "artefacts": {}}, "report": {"status": "pass", "checks": []}}"#.to_vec();
    fleet.publish_raw(&results, &garbage);
    fleet.publish_raw(&results, &anonymous);

    let dead = fleet.dead_letters(2, Duration::from_secs(20));
    assert_eq!(dead.len(), 2, "both messages are dead-lettered: {dead:?}");
    assert_eq!(dead[0].0, garbage);
    let reason = dead[0].1.as_deref().unwrap_or_default();
    assert!(reason.starts_with("malformed result"), "{reason}");
    assert_eq!(dead[1].0, anonymous);
    let reason = dead[1].1.as_deref().unwrap_or_default();
    assert!(reason.contains("names no run_id or attempt_id"), "{reason}");
    assert!(
        fleet.log("coordinator").contains("dead-lettering a result"),
        "the coordinator says what it did"
    );

    fleet.worker("w1", 2, &["sh"]);
    let pipeline = fleet.pipeline("after", json!([sh("A", "true"), sh("B", "true")]));
    let out = fleet.cli(
        &c,
        &["submit", &pipeline, "--datasets", "a,b", "--wait", "--json"],
    );
    out.expect_code(0);
    assert_all(&out.summary(), "COMPLETE", 2);
    assert_eq!(readyz(&c), 200);
}

#[test]
fn an_escalation_resolved_over_the_cli_completes() {
    let mut fleet = Fleet::new("escalation");
    let c = fleet.serve("coordinator");
    fleet.wait_ready(&c, LIMIT);
    let marker = fleet.dir().join("fixed");
    let script = format!(
        "test -f '{}' || (echo 'the numbers look odd' >&2; exit 3)",
        marker.display()
    );
    let pipeline = fleet.pipeline("escalate", json!([sh("ODD", &script), sh("NEXT", "true")]));
    fleet.worker("w1", 1, &["sh"]);
    let id = fleet.submit(&c, &pipeline, &["--datasets", "a"]);
    fleet.wait_status(&c, &id, LIMIT, "escalated", |s| {
        s["counts"]["ESCALATED"] == 1
    });

    let list = fleet.cli(&c, &["escalations", "--json"]);
    list.expect_code(0);
    let list = list.summary();
    let esc = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["backfill_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no escalation of {id}: {list:#}"));
    assert_eq!(esc["step"], "ODD", "{esc}");
    assert!(
        esc["reason"].as_str().unwrap().contains("exit code 3"),
        "{esc}"
    );
    let run = esc["run_id"].as_str().unwrap().to_string();

    std::fs::write(&marker, "").unwrap();
    let resolve = |fleet: &Fleet| {
        fleet.cli(
            &c,
            &[
                "resolve",
                &run,
                "--action",
                "retry",
                "--reason",
                "the source was republished",
                "--operator",
                "e2e-operator",
            ],
        )
    };
    let ok = resolve(&fleet);
    ok.expect_code(0);
    assert!(
        ok.stdout().contains("retry by e2e-operator"),
        "{}",
        ok.context()
    );

    let summary = fleet.wait_finished(&c, &id, LIMIT);
    assert_all(&summary, "COMPLETE", 1);
    assert_eq!(runs(&summary)[0]["attempts"], json!({"ODD": 2, "NEXT": 1}));
    // A second answer is refused: the run is no longer escalated.
    let again = resolve(&fleet);
    again.expect_code(2);
    assert!(again.stderr().contains("409"), "{}", again.context());

    let resolutions: Vec<(String, Action, String)> = fleet
        .audit_records()
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::OperatorResolution {
                operator,
                action,
                reason,
            } => Some((operator, action, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        resolutions,
        [(
            "e2e-operator".to_string(),
            Action::Retry,
            "the source was republished".to_string()
        )]
    );
}

#[test]
fn cancel_starts_nothing_new_and_every_run_ends() {
    let mut fleet = Fleet::new("cancel");
    let c = fleet.serve("coordinator");
    fleet.wait_ready(&c, LIMIT);
    let pipeline = fleet.pipeline(
        "cancel",
        json!([
            sh("SLEEP", "echo $$ > pid; sleep 2"),
            sh("AFTER", "touch after")
        ]),
    );
    fleet.worker("w1", 2, &["sh"]);
    let id = fleet.submit(
        &c,
        &pipeline,
        &["--datasets", "a,b,c,d,e,f", "--max-parallel", "2"],
    );
    let runs_dir = Path::new(&pipeline).parent().unwrap().join("work/runs");
    let started = |ds: &str| runs_dir.join(ds).join("pid").exists();
    fleet_wait(LIMIT, "two tools running", || {
        ["a", "b", "c", "d", "e", "f"]
            .iter()
            .filter(|d| started(d))
            .count()
            == 2
    });
    let cancel = fleet.cli(&c, &["cancel", &id]);
    cancel.expect_code(0);
    assert!(
        cancel
            .stdout()
            .contains("2 runs end CANCELLED once their running step finishes"),
        "{}",
        cancel.context()
    );

    let summary = fleet.wait_finished(&c, &id, LIMIT);
    assert_eq!(summary["cancelling"], true, "{summary:#}");
    assert_all(&summary, "CANCELLED", 6);
    let ran: Vec<&str> = ["a", "b", "c", "d", "e", "f"]
        .into_iter()
        .filter(|d| started(d))
        .collect();
    assert_eq!(
        ran.len(),
        2,
        "only the two running tools ever started: {ran:?}"
    );
    for d in ["a", "b", "c", "d", "e", "f"] {
        assert!(
            !runs_dir.join(d).join("after").exists(),
            "AFTER ran for `{d}` after the cancel"
        );
    }
    for r in runs(&summary) {
        let d = r["partition"].as_str().unwrap();
        let expected = if ran.contains(&d) {
            json!({"SLEEP": 1})
        } else {
            json!({})
        };
        assert_eq!(r["attempts"], expected, "{r}");
    }

    // The running steps finished and were recorded; nothing was dispatched after the cancel.
    let records = fleet.audit_records();
    let cancelled_at = records
        .iter()
        .find(|r| matches!(&r.event, AuditEvent::Transition { to, .. } if to == "CANCELLED"))
        .expect("a cancellation")
        .seq;
    let late: Vec<u64> = records
        .iter()
        .filter(|r| matches!(r.event, AuditEvent::StepDispatched { .. }) && r.seq > cancelled_at)
        .map(|r| r.seq)
        .collect();
    assert!(
        late.is_empty(),
        "steps dispatched after the cancel: {late:?}"
    );
    assert_eq!(
        step_results(&records).len(),
        2,
        "the running steps reported"
    );
}

#[test]
fn retry_failed_resumes_halted_runs_at_the_failed_step() {
    let mut fleet = Fleet::new("retry_failed");
    let c = fleet.serve("coordinator");
    fleet.wait_ready(&c, LIMIT);
    let marker = fleet.dir().join("gate-open");
    let gate = format!("test -f '{}' || exit 2", marker.display());
    let pipeline = fleet.pipeline(
        "resume",
        json!([
            sh("FIRST", "echo ran >> first"),
            {"id": "GATE", "command": "sh", "args": ["-c", gate], "max_attempts": 2},
            sh("LAST", "echo ran >> last"),
        ]),
    );
    fleet.worker("w1", 3, &["sh"]);
    let id = fleet.submit(&c, &pipeline, &["--datasets", "a,b,c"]);
    let halted = fleet.wait_finished(&c, &id, LIMIT);
    assert_all(&halted, "HALTED", 3);
    for r in runs(&halted) {
        assert_eq!(r["step"], "GATE", "{r}");
        // Exit code 2 is a usage error: the rules halt at once rather than retry.
        assert_eq!(r["attempts"], json!({"FIRST": 1, "GATE": 1}), "{r}");
    }

    std::fs::write(&marker, "").unwrap();
    let resumed = fleet.cli(&c, &["retry-failed", &id, "--json"]);
    resumed.expect_code(0);
    assert_eq!(resumed.summary()["resumed"], 3, "{}", resumed.context());
    let summary = fleet.wait_finished(&c, &id, LIMIT);
    assert_all(&summary, "COMPLETE", 3);
    let runs_dir = Path::new(&pipeline).parent().unwrap().join("work/runs");
    for r in runs(&summary) {
        assert_eq!(
            r["attempts"],
            json!({"FIRST": 1, "GATE": 2, "LAST": 1}),
            "{r}"
        );
        let d = r["partition"].as_str().unwrap();
        let first = std::fs::read_to_string(runs_dir.join(d).join("first")).unwrap();
        assert_eq!(first.lines().count(), 1, "FIRST ran again for `{d}`");
    }
}

/// How many complete lines of the audit log (which a coordinator may be appending to) record
/// `event`.
fn count_events(audit: &Path, event: &str) -> usize {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    let needle = format!("\"event\":\"{event}\"");
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.contains(&needle))
        .count()
}

/// Polls `done` every 50 ms until it holds; fails after `limit` naming `what`.
fn fleet_wait(limit: Duration, what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client that resends a submit (its answer was lost, or it timed out) with the same
/// `--request-id` gets the first backfill back, also from a coordinator that restarted in
/// between: the id is kept with the backfill in PostgreSQL, not only in the leader's memory.
#[test]
fn a_request_id_names_one_backfill_across_a_coordinator_restart() {
    let mut fleet = Fleet::new("request_id");
    let c = fleet.serve("first");
    fleet.wait_ready(&c, LIMIT);
    let pipeline = fleet.pipeline("once", json!([sh("A", "true")]));
    let args = ["--datasets", "a,b", "--request-id", "nightly-42"];
    let first = fleet.submit(&c, &pipeline, &args);
    fleet.kill("first");
    let second = fleet.serve_on("second", c.addr());
    fleet.wait_ready(&second, LIMIT);

    let again = fleet.submit(&second, &pipeline, &args);
    assert_eq!(again, first, "the same request made a second backfill");
    let other = fleet.cli(
        &second,
        &[
            "submit",
            &pipeline,
            "--datasets",
            "c",
            "--request-id",
            "nightly-42",
        ],
    );
    assert_ne!(other.code(), 0, "{}", other.context());
    assert!(
        other
            .stderr()
            .contains("already used for a different submit"),
        "{}",
        other.context()
    );
    let created = count_events(&fleet.audit(), "backfill_created");
    assert_eq!(created, 1, "one backfill for one request id");
}

/// A worker with `--prefetch` above its slots holds that many specs (the broker's queue shows
/// only the rest as ready) yet never runs more tools at once than its slots, and every run
/// completes.
#[test]
fn a_prefetch_above_the_slots_holds_more_specs_but_runs_no_more_tools_at_once() {
    // Fewer than the slots is refused before anything connects.
    let out = std::process::Command::new(bin("warpline-worker"))
        .args(["--slots", "4", "--prefetch", "2", "--allow", "true"])
        .args(["--amqp-url", "amqp://127.0.0.1:1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--prefetch 2 is less than --slots 4"), "{err}");
    let mut fleet = Fleet::new("prefetch");
    let c = fleet.serve("coordinator");
    fleet.wait_ready(&c, LIMIT);
    let probe = fleet.dir().join("probe");
    std::fs::create_dir_all(&probe).unwrap();
    let probe_env = probe.display().to_string();
    fleet.worker_with_env(
        "w",
        2,
        &["sh"],
        &[("WARPLINE_PREFETCH", "6"), ("PROBE", &probe_env)],
    );
    // Each step notes when its tool started and ended, in nanoseconds, in a file of its own.
    let script = r#"s=$(date +%s%N); sleep 2; e=$(date +%s%N); echo "$s $e" > "$PROBE/$$""#;
    let pipeline = fleet.pipeline("prefetch", json!([sh("WORK", script)]));
    let id = fleet.submit(
        &c,
        &pipeline,
        &["--datasets", "a,b,c,d,e,f,g,h", "--max-parallel", "8"],
    );
    // Eight specs on one worker: 2 running and 4 held by the worker leave 2 ready in the
    // queue (with the prefetch at the slots it would be 6).
    let deadline = std::time::Instant::now() + LIMIT;
    let mut seen = Vec::new();
    loop {
        let (code, body) = http_get(c.addr(), "/v1/fleet");
        let view: Value = serde_json::from_str(&body).unwrap_or_default();
        let queued = view["pools"][0]["queued"].as_u64();
        seen.push(queued);
        if code == 200 && queued == Some(2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the queue never showed 2 ready specs (6 held by the worker): saw {seen:?}, last {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let summary = fleet.wait_finished(&c, &id, LIMIT);
    assert_all(&summary, "COMPLETE", 8);
    // Counts only, read from what the loop published at its last commit: the same counts
    // and fleet as the full status, and no runs.
    let (code, body) = http_get(c.addr(), &format!("/v1/backfills/{id}?runs=none"));
    assert_eq!(code, 200, "{body}");
    let counts: Value = serde_json::from_str(&body).unwrap();
    for key in ["counts", "finished", "steps_executed", "passed"] {
        assert_eq!(counts[key], summary[key], "{key}: {counts:#}");
    }
    assert_eq!(counts["runs"], json!([]), "{counts:#}");
    assert_eq!(
        counts["fleet"]["workers"][0]["worker_id"], "w",
        "{counts:#}"
    );
    let (code, body) = http_get(
        c.addr(),
        &format!("/v1/backfills/{}?runs=none", Uuid::now_v7()),
    );
    assert_eq!(code, 404, "an unknown backfill: {body}");
    // At most 2 tools at once: sweep the start and end times.
    let mut edges: Vec<(u128, i32)> = Vec::new();
    for entry in std::fs::read_dir(&probe).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let times: Vec<u128> = text
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        edges.push((times[0], 1));
        edges.push((times[1], -1));
    }
    assert_eq!(edges.len(), 16, "eight steps noted their times");
    // An end sorts before a start at the same instant.
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in &edges {
        now += d;
        most = most.max(now);
    }
    assert_eq!(most, 2, "tools at once on a worker of 2 slots: {edges:?}");
}
