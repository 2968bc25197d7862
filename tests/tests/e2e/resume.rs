//! Local-mode operations: `warpline run --resume` after a SIGKILL and after a half-failed
//! backfill (answering its escalations, retry-failed), per-attempt directories that are never
//! reused, `audit show` across backfills, and `--reprocess` modes, locally and for a fleet's
//! `submit`.
//!
//! Every step appends its partition to a counter file, so "nothing that completed ran again"
//! is counted, not inferred from the audit log.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use warpline_shared::audit::AuditEvent;
use warpline_tests::*;

/// A pipeline whose steps each append `{partition}` to `<workdir>/<STEP>.count` first.
fn counting_pipeline(dir: &Path, name: &str, steps: &[(&str, &str)]) -> String {
    let steps: Vec<Value> = steps
        .iter()
        .map(|(id, rest)| {
            json!({
                "id": id, "command": "sh", "max_attempts": 2, "timeout_s": 60,
                "args": ["-c", format!("echo {{partition}} >> {{workdir}}/{id}.count; {rest}")]
            })
        })
        .collect();
    let config = json!({
        "name": name,
        "workdir": "work",
        "retry": {"initial_ms": 10},
        "vars": {"tag": "x"},
        "steps": steps,
    });
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path.display().to_string()
}

/// How many times each step ran for each partition: step → partition → count.
fn counts(work: &Path) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(work).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(step) = name.strip_suffix(".count") else {
            continue;
        };
        let per: &mut BTreeMap<String, usize> = out.entry(step.to_string()).or_default();
        for line in std::fs::read_to_string(e.path()).unwrap().lines() {
            *per.entry(line.trim().to_string()).or_default() += 1;
        }
    }
    out
}

fn ran(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

/// The only audit log under `<work>/audit/`.
fn the_audit_log(work: &Path) -> std::path::PathBuf {
    let logs: Vec<_> = std::fs::read_dir(work.join("audit"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    logs[0].clone()
}

/// The attempt directories of a partition's runs: `<run id>/<STEP>-<n>`.
fn attempt_dirs(work: &Path, partition: &str) -> Vec<String> {
    let logs = work.join("runs").join(partition).join("logs");
    let mut out = Vec::new();
    for run in std::fs::read_dir(&logs).unwrap().flatten() {
        for a in std::fs::read_dir(run.path()).unwrap().flatten() {
            out.push(format!(
                "{}/{}",
                run.file_name().to_string_lossy(),
                a.file_name().to_string_lossy()
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn a_killed_local_backfill_resumes_without_running_again_what_completed() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    // SLOW passes at once for 2024-01; for the other months it waits for `go`.
    let pipeline = counting_pipeline(
        dir.path(),
        "killed",
        &[
            ("A", "true"),
            (
                "SLOW",
                "echo $$ > slow.pid; [ {partition} = 2024-01 ] || while [ ! -f {workdir}/go ]; do sleep 0.1; done",
            ),
            ("C", "true"),
        ],
    );
    let mut child = Command::new(bin("warpline"))
        .args([
            "run",
            &pipeline,
            "--months",
            "2024-01..2024-03",
            "--progress",
            "none",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until 2024-01 completed and both other months are inside SLOW.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid_of = |m: &str| -> Option<i32> {
        std::fs::read_to_string(work.join(format!("runs/{m}/slow.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    loop {
        // Read as text: the log is being written.
        let complete = std::fs::read_dir(work.join("audit"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| std::fs::read_to_string(e.path()).ok())
            .is_some_and(|text| {
                text.lines().any(|l| {
                    l.contains(r#""event":"run_finished""#) && l.contains(r#""state":"COMPLETE""#)
                })
            });
        if complete && pid_of("2024-02").is_some() && pid_of("2024-03").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the backfill never got there");
        std::thread::sleep(Duration::from_millis(50));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    // A killed `warpline` leaves its tools running (they have process groups of their own):
    // end the two waiting ones, as an operator would, before resuming.
    for m in ["2024-02", "2024-03"] {
        let _ = kill(Pid::from_raw(pid_of(m).unwrap()), Signal::SIGKILL);
    }
    std::fs::write(work.join("go"), "").unwrap();

    let resumed = warpline(
        &[
            "run",
            &pipeline,
            "--resume",
            "--json",
            "--progress",
            "lines",
            "--operator",
            "carol",
        ],
        &[],
    );
    resumed.expect_code(0);
    assert!(
        resumed
            .stderr()
            .contains("1 of 3 runs completed before and are skipped"),
        "{}",
        resumed.context()
    );
    let summary = resumed.summary();
    assert_eq!(
        summary["counts"],
        json!({"COMPLETE": 3}),
        "{}",
        resumed.context()
    );
    // Nothing that completed ran again; the two attempts in flight ran once more.
    let c = counts(&work);
    let once = ran(&[("2024-01", 1), ("2024-02", 1), ("2024-03", 1)]);
    assert_eq!(c["A"], once, "{}", resumed.context());
    assert_eq!(c["C"], once);
    assert_eq!(
        c["SLOW"],
        ran(&[("2024-01", 1), ("2024-02", 2), ("2024-03", 2)])
    );
    // The same backfill and log go on; the chain still verifies.
    let audit = the_audit_log(&work);
    warpline(&["audit", "verify", audit.to_str().unwrap()], &[]).expect_code(0);
    let records = audit_records(&audit);
    let created = records
        .iter()
        .filter(|r| matches!(r.event, AuditEvent::BackfillCreated { .. }))
        .count();
    assert_eq!(created, 1, "a resume is not a new backfill");
    let lost: Vec<&str> = records
        .iter()
        .filter_map(|r| match &r.event {
            AuditEvent::AttemptLost {
                step_id, reason, ..
            } => {
                assert!(reason.contains("in flight"), "{reason}");
                Some(step_id.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(lost, ["SLOW", "SLOW"]);
    assert!(records.iter().any(|r| matches!(
        &r.event,
        AuditEvent::BackfillResolution { operator, action, .. } if operator == "carol" && action == "resume"
    )));
    // The retried attempt has a directory of its own.
    let dirs = attempt_dirs(&work, "2024-02");
    let names: Vec<&str> = dirs.iter().map(|d| d.rsplit('/').next().unwrap()).collect();
    assert_eq!(names, ["A-1", "C-1", "SLOW-1", "SLOW-2"], "{dirs:?}");
}

#[test]
fn a_half_failed_local_backfill_resumes_at_the_failed_step_with_its_escalations_answered() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    // 2024-02 fails B permanently (halts), 2024-03 fails it in a way no rule knows (escalates),
    // until `fixed` exists.
    let pipeline = counting_pipeline(
        dir.path(),
        "half",
        &[
            ("A", "echo {tag} > tag"),
            (
                "B",
                "if [ ! -f {workdir}/fixed ]; then \
                   if [ {partition} = 2024-02 ]; then echo 'KeyError: period' >&2; exit 1; fi; \
                   if [ {partition} = 2024-03 ]; then echo 'odd failure' >&2; exit 3; fi; \
                 fi",
            ),
            ("C", "true"),
        ],
    );
    let first = warpline(
        &[
            "run",
            &pipeline,
            "--months",
            "2024-01..2024-03",
            "--json",
            "--progress",
            "none",
        ],
        &[],
    );
    first.expect_code(1);
    assert_eq!(
        first.summary()["counts"],
        json!({"COMPLETE": 1, "HALTED": 1, "ESCALATED": 1}),
        "{}",
        first.context()
    );
    std::fs::write(work.join("fixed"), "").unwrap();
    let before = std::fs::read_to_string(the_audit_log(&work)).unwrap();

    // Refused before anything runs: an answer the guard forbids, a run that is not
    // escalated, a variable that changes what already ran, other partitions.
    let refusals: [(&[&str], &str); 4] = [
        (
            &["--resolve", "2024-03=proceed", "--reason", "looks fine"],
            "`proceed` is not legal now",
        ),
        (
            &["--resolve", "2024-02=retry", "--reason", "again"],
            "is HALTED, not escalated",
        ),
        (&["--var", "tag=y"], "changed what its steps run"),
        (&["--months", "2024-01..2024-04"], "partitions differ"),
    ];
    for (extra, expected) in refusals {
        let mut args = vec!["run", pipeline.as_str(), "--resume", "--progress", "none"];
        args.extend_from_slice(extra);
        let refused = warpline(&args, &[]);
        refused.expect_code(2);
        assert!(refused.stderr().contains(expected), "{}", refused.context());
    }
    assert_eq!(
        std::fs::read_to_string(the_audit_log(&work)).unwrap(),
        before,
        "a refused resume writes nothing"
    );

    let resumed = warpline(
        &[
            "run",
            &pipeline,
            "--resume",
            "--resolve",
            "2024-03=retry",
            "--reason",
            "the source was fixed",
            "--operator",
            "alice",
            "--json",
            "--progress",
            "none",
        ],
        &[],
    );
    resumed.expect_code(0);
    assert_eq!(
        resumed.summary()["counts"],
        json!({"COMPLETE": 3}),
        "{}",
        resumed.context()
    );
    let c = counts(&work);
    let once = ran(&[("2024-01", 1), ("2024-02", 1), ("2024-03", 1)]);
    assert_eq!(c["A"], once, "earlier steps never run again");
    assert_eq!(c["C"], once);
    assert_eq!(
        c["B"],
        ran(&[("2024-01", 1), ("2024-02", 2), ("2024-03", 2)])
    );
    // The answers are audited under the operator, with the reason.
    let records = audit_records(&the_audit_log(&work));
    assert!(records.iter().any(|r| matches!(
        &r.event,
        AuditEvent::OperatorResolution { operator, reason, .. }
            if operator == "alice" && reason == "the source was fixed"
    )));
    assert!(records.iter().any(|r| matches!(
        &r.event,
        AuditEvent::BackfillResolution { operator, action, .. }
            if operator == "alice" && action == "retry-failed"
    )));
    // Attempt 1's logs are still there, untouched; attempt 2 has its own directory.
    let dirs = attempt_dirs(&work, "2024-02");
    assert!(dirs.iter().any(|d| d.ends_with("/B-1")), "{dirs:?}");
    assert!(dirs.iter().any(|d| d.ends_with("/B-2")), "{dirs:?}");
    let run_dir = work.join("runs/2024-02/logs");
    let b1 = dirs.iter().find(|d| d.ends_with("/B-1")).unwrap();
    let stderr = std::fs::read_to_string(run_dir.join(b1).join("stderr.log")).unwrap();
    assert!(stderr.contains("KeyError"), "{stderr}");
    // A resume of a finished backfill runs nothing.
    let again = warpline(&["run", &pipeline, "--resume", "--progress", "none"], &[]);
    again.expect_code(0);
    assert_eq!(counts(&work)["A"], once);
}

#[test]
fn audit_show_picks_the_latest_backfill_and_reprocess_modes_choose_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let audit = dir.path().join("shared.jsonl");
    let audit = audit.to_str().unwrap();
    // 2024-02 always halts.
    let pipeline = counting_pipeline(
        dir.path(),
        "modes",
        &[(
            "A",
            "if [ {partition} = 2024-02 ]; then echo 'KeyError: x' >&2; exit 1; fi",
        )],
    );
    let run = |months: &str, extra: &[&str]| {
        let mut args = vec![
            "run",
            pipeline.as_str(),
            "--months",
            months,
            "--audit",
            audit,
            "--json",
            "--progress",
            "none",
        ];
        args.extend_from_slice(extra);
        warpline(&args, &[])
    };
    let partitions = |f: &Finished| -> Vec<String> {
        f.summary()["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["partition"].as_str().unwrap().to_string())
            .collect()
    };
    run("2024-01..2024-02", &[]).expect_code(1);
    // missing: only what no backfill ran.
    let missing = run("2024-01..2024-03", &["--reprocess", "missing"]);
    missing.expect_code(0);
    assert_eq!(partitions(&missing), ["2024-03"], "{}", missing.context());
    assert!(
        missing
            .stderr()
            .contains("skipped 2 partitions (reprocess `missing`)"),
        "{}",
        missing.context()
    );
    // failed: that, and what ran without completing.
    let failed = run("2024-01..2024-04", &["--reprocess", "failed"]);
    failed.expect_code(1);
    assert_eq!(
        partitions(&failed),
        ["2024-02", "2024-04"],
        "{}",
        failed.context()
    );
    // all (the default): everything named.
    let all = run("2024-01..2024-02", &[]);
    assert_eq!(partitions(&all), ["2024-01", "2024-02"]);
    // Nothing left: said, and nothing runs.
    let none = run("2024-01", &["--reprocess", "failed"]);
    none.expect_code(0);
    assert!(
        none.stderr().contains("nothing to run"),
        "{}",
        none.context()
    );
    assert_eq!(
        counts(&work)["A"],
        ran(&[
            ("2024-01", 2),
            ("2024-02", 3),
            ("2024-03", 1),
            ("2024-04", 1)
        ])
    );

    // `audit show 2024-02` shows the latest backfill's run and names the earlier ones.
    let runs: Vec<String> = audit_records(Path::new(audit))
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::RunCreated { partition, .. } if partition.key() == "2024-02" => {
                r.run_id.map(|id| id.to_string())
            }
            _ => None,
        })
        .collect();
    assert_eq!(runs.len(), 3);
    let show = warpline(&["audit", "show", "2024-02", "--file", audit], &[]);
    show.expect_code(0);
    assert!(
        show.stdout()
            .starts_with(&format!("run {} (2024-02)", runs[2])),
        "{}",
        show.context()
    );
    assert!(
        show.stderr().contains("was run by 3 backfills")
            && show.stderr().contains(&runs[0])
            && show.stderr().contains(&runs[1]),
        "{}",
        show.context()
    );
    // An id prefix still selects exactly, the earliest run too (UUIDv7s of one process share
    // their first 24 characters or so: a prefix must reach the random bits).
    let exact = warpline(&["audit", "show", &runs[0][..33], "--file", audit], &[]);
    exact.expect_code(0);
    assert!(
        exact
            .stdout()
            .starts_with(&format!("run {} (2024-02)", runs[0])),
        "{}",
        exact.context()
    );
    assert!(exact.stderr().is_empty(), "{}", exact.context());
}

/// Fleet mode: `submit --reprocess` chooses against the backfills the coordinator holds in
/// PostgreSQL (also after a restart), says what it skipped, and refuses a submit it leaves
/// nothing to run.
#[test]
fn fleet_submits_reprocess_against_the_coordinators_earlier_backfills() {
    use warpline_tests::fleet::Fleet;
    let limit = Duration::from_secs(60);
    let mut fleet = Fleet::new("reprocess");
    let c = fleet.serve("first");
    fleet.wait_ready(&c, limit);
    fleet.worker("w1", 2, &["sh"]);
    let pipeline = fleet.pipeline(
        "modes",
        json!([{
            "id": "A", "command": "sh", "timeout_s": 60, "max_attempts": 1,
            "args": ["-c", "echo {partition} >> {workdir}/A.count; \
                      if [ {partition} = 2024-02 ]; then echo 'KeyError: x' >&2; exit 1; fi"]
        }]),
    );
    let work = fleet.dir().join("work");
    let first = fleet.submit(&c, &pipeline, &["--months", "2024-01..2024-02"]);
    fleet.wait_finished(&c, &first, limit);

    let missing = submit(&fleet, &c, &pipeline, "2024-01..2024-03", "missing");
    missing.expect_code(0);
    let answer: Value = serde_json::from_str(&missing.stdout()).unwrap();
    assert_eq!(answer["runs"], 1, "{}", missing.context());
    assert_eq!(
        answer["skipped"],
        json!({"complete": 1, "failed": 1, "in_progress": 0})
    );
    assert!(
        missing
            .stderr()
            .contains("skipped 2 partitions (reprocess `missing`)"),
        "{}",
        missing.context()
    );
    let id = answer["backfill_id"].as_str().unwrap().to_string();
    let s = fleet.wait_finished(&c, &id, limit);
    assert_eq!(s["runs"][0]["partition"], "2024-03", "{s:#}");

    let failed = submit(&fleet, &c, &pipeline, "2024-01..2024-03", "failed");
    failed.expect_code(0);
    let answer: Value = serde_json::from_str(&failed.stdout()).unwrap();
    let id = answer["backfill_id"].as_str().unwrap().to_string();
    let s = fleet.wait_finished(&c, &id, limit);
    let parts: Vec<&str> = s["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["partition"].as_str().unwrap())
        .collect();
    assert_eq!(parts, ["2024-02"], "{s:#}");

    let none = submit(&fleet, &c, &pipeline, "2024-01..2024-03", "missing");
    none.expect_code(2);
    assert!(
        none.stderr().contains("nothing to run"),
        "{}",
        none.context()
    );

    // A new coordinator knows the earlier backfills from PostgreSQL.
    fleet.kill("first");
    let second = fleet.serve_on("second", c.addr());
    fleet.wait_ready(&second, limit);
    let after = submit(&fleet, &second, &pipeline, "2024-01..2024-04", "missing");
    after.expect_code(0);
    let answer: Value = serde_json::from_str(&after.stdout()).unwrap();
    assert_eq!(answer["runs"], 1, "{}", after.context());
    let id = answer["backfill_id"].as_str().unwrap().to_string();
    fleet.wait_finished(&second, &id, limit);
    assert_eq!(
        counts(&work)["A"],
        ran(&[
            ("2024-01", 1),
            ("2024-02", 2),
            ("2024-03", 1),
            ("2024-04", 1)
        ])
    );
}

/// `submit PIPELINE --months MONTHS --reprocess MODE --json` against coordinator `c`.
fn submit(
    fleet: &warpline_tests::fleet::Fleet,
    c: &warpline_tests::fleet::Coordinator,
    pipeline: &str,
    months: &str,
    mode: &str,
) -> Finished {
    fleet.cli(
        c,
        &[
            "submit",
            pipeline,
            "--months",
            months,
            "--reprocess",
            mode,
            "--json",
        ],
    )
}
