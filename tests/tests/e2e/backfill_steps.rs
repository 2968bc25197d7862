//! Backfill-level steps (`"scope": "backfill"`): a before-step that prepares a directory, a
//! per-dataset export after each dataset's months (retried once by the supervisor), a
//! catalogue after the whole backfill, and `allow_partial`; in local mode (`warpline run`)
//! and in fleet mode (`serve` + a worker, across a coordinator restart), with the submit
//! check covering their commands.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use warpline_shared::audit::AuditEvent;
use warpline_shared::stage::RunScope;
use warpline_tests::fleet::Fleet;
use warpline_tests::*;

const LIMIT: Duration = Duration::from_secs(120);

/// A shell step: `sh -c SCRIPT sh ARGS…` in the run's directory.
fn sh(id: &str, script: &str, args: &[&str]) -> Value {
    let mut argv = vec![json!("-c"), json!(script), json!("sh")];
    argv.extend(args.iter().map(|a| json!(a)));
    json!({"id": id, "command": "sh", "args": argv, "timeout_s": 60})
}

/// `step` with backfill scope and the given fields.
fn backfill(mut step: Value, fields: Value) -> Value {
    step["scope"] = json!("backfill");
    step.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    step
}

/// The paths a partitions file lists for artefact `csv`, one per line, then `cat` them: the
/// export's input, in backfill order.
const CONCAT: &str = r#"grep -o '"csv": "[^"]*"' "$1" | cut -d'"' -f4 | xargs cat"#;

fn write_pipeline(dir: &Path, steps: Value) -> String {
    let config = json!({
        "name": "stages",
        "workdir": "work",
        "retry": {"initial_ms": 10, "max_ms": 100},
        "steps": steps,
    });
    let path = dir.join("stages.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path.display().to_string()
}

/// The pipeline of the local test: PREPARE (before), LOAD (per partition: needs PREPARE's
/// directory), EXPORT (after each dataset: fails its first attempt with a transient error),
/// CATALOGUE (after everything).
fn steps() -> Value {
    json!([
        backfill(
            sh("PREPARE", r#"mkdir -p "$1" && echo ready > "$1/ready""#, &["{workdir}/shared"]),
            json!({"when": "before"})
        ),
        {
            "id": "LOAD", "command": "sh", "timeout_s": 60,
            "args": ["-c", r#"test -f "$1/ready" && echo "$2,$3" > out.csv"#, "sh", "{workdir}/shared", "{dataset}", "{month}"],
            "artefacts": {"csv": "out.csv"},
            "validations": [{"kind": "file_exists", "artefact": "csv"}]
        },
        backfill(
            json!({
                "id": "EXPORT", "command": "sh", "timeout_s": 60, "max_attempts": 2,
                "args": ["-c", format!(
                    r#"if [ ! -f tried ]; then touch tried; echo "ConnectionError: export service busy" >&2; exit 75; fi; {CONCAT} > "$2""#
                ), "sh", "{partitions_file}", "{dataset}_{first_month:%Y%m}_{last_month:%Y%m}.csv"],
                "artefacts": {"export": "{dataset}_{first_month:%Y%m}_{last_month:%Y%m}.csv"},
                "validations": [{"kind": "file_exists", "artefact": "export"}]
            }),
            json!({"when": "after", "per": "dataset"})
        ),
        backfill(
            sh(
                "CATALOGUE",
                r#"echo "$1 $2..$3 $(grep -c '"state": "COMPLETE"' "$4") complete" > catalogue.txt"#,
                &["{datasets}", "{first_month}", "{last_month}", "{partitions_file}"]
            ),
            json!({"when": "after"})
        ),
    ])
}

fn local(dir: &Path, pipeline: &str, extra: &[&str]) -> Finished {
    let audit = dir.join("audit.jsonl");
    let mut args = vec![
        "run",
        pipeline,
        "--workers",
        "2",
        "--json",
        "--progress",
        "lines",
        "--audit",
        audit.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    warpline(&args, &[])
}

/// The sequence of (run scope key, event name) of the audit log, for ordering assertions.
fn scope_of_runs(audit: &Path) -> std::collections::HashMap<uuid::Uuid, (RunScope, String)> {
    audit_records(audit)
        .into_iter()
        .filter_map(|r| match (r.run_id, r.event) {
            (Some(id), AuditEvent::RunCreated { partition, scope }) => {
                Some((id, (scope, scope.key(&partition))))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn local_backfill_level_steps_prepare_export_each_dataset_and_catalogue_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(dir.path(), steps());
    let run = local(
        dir.path(),
        &pipeline,
        &["--months", "2024-01..2024-02", "--datasets", "a,b"],
    );
    run.expect_code(0);
    let s = run.summary();
    assert_eq!(
        s["counts"]["COMPLETE"],
        8,
        "1 + 4 + 2 + 1 runs\n{}",
        run.context()
    );
    assert_eq!(s["stage"], "done", "{s:#}");
    assert_eq!(s["steps"], json!(["LOAD"]), "{s:#}");
    let before = run_of(&s, "_before");
    assert_eq!(
        (&before["scope"], &before["steps"]),
        (&json!("before"), &json!(["PREPARE"]))
    );
    // The supervisor retried the export's transient failure once per dataset.
    for d in ["a", "b"] {
        let r = run_of(&s, &format!("_after_{d}"));
        assert_eq!(r["scope"], "after_dataset");
        assert_eq!(r["attempts"], json!({"EXPORT": 2}), "{r:#}");
        let export = std::fs::read_to_string(
            dir.path()
                .join(format!("work/runs/_after_{d}/{d}_202401_202402.csv")),
        )
        .unwrap();
        assert_eq!(export, format!("{d},2024-01\n{d},2024-02\n"));
        // The partitions file the worker wrote for it: the dataset's runs, complete.
        let list: Value = serde_json::from_str(
            &std::fs::read_to_string(
                dir.path()
                    .join(format!("work/runs/_after_{d}/partitions.json")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            (&list["dataset"], &list["complete"]),
            (&json!(d), &json!(2)),
            "{list:#}"
        );
    }
    let catalogue =
        std::fs::read_to_string(dir.path().join("work/runs/_after/catalogue.txt")).unwrap();
    assert_eq!(catalogue, "a,b 2024-01..2024-02 4 complete\n");

    // Audited like any step, in order: PREPARE finished before any LOAD was dispatched, a
    // dataset's export after its loads, the catalogue after both exports.
    let audit = dir.path().join("audit.jsonl");
    let scopes = scope_of_runs(&audit);
    let mut order: Vec<(String, String)> = Vec::new();
    for r in audit_records(&audit) {
        let Some((_, key)) = r.run_id.and_then(|id| scopes.get(&id)) else {
            continue;
        };
        match r.event {
            AuditEvent::StepDispatched { step_id, .. } => {
                order.push((key.clone(), format!("dispatch {step_id}")))
            }
            AuditEvent::RunFinished { .. } => order.push((key.clone(), "finished".into())),
            AuditEvent::Decision { decision, .. } if key.starts_with("_after_") => {
                order.push((key.clone(), format!("decision {:?}", decision.action)))
            }
            _ => {}
        }
    }
    let at = |key: &str, what: &str| {
        order
            .iter()
            .position(|(k, w)| k == key && w == what)
            .unwrap_or_else(|| panic!("no `{what}` of {key} in {order:?}"))
    };
    let first_load = order
        .iter()
        .position(|(_, w)| w == "dispatch LOAD")
        .unwrap();
    assert!(at("_before", "finished") < first_load, "{order:?}");
    for d in ["a", "b"] {
        let export = at(&format!("_after_{d}"), "dispatch EXPORT");
        for m in ["2024-01", "2024-02"] {
            assert!(at(&format!("{d}_{m}"), "finished") < export, "{order:?}");
        }
        assert!(
            at(&format!("_after_{d}"), "decision Retry") < at(&format!("_after_{d}"), "finished")
        );
        assert!(at(&format!("_after_{d}"), "finished") < at("_after", "dispatch CATALOGUE"));
    }
    warpline(&["audit", "verify", audit.to_str().unwrap()], &[]).expect_code(0);
    // `audit show` finds a backfill-level run by its key.
    let show = warpline(
        &[
            "audit",
            "show",
            "_after_a",
            "--file",
            audit.to_str().unwrap(),
        ],
        &[],
    );
    assert!(show.stdout().contains("EXPORT"), "{}", show.context());

    // The preflight covers the backfill-level steps' commands too: a missing tool in the
    // catalogue step stops the run before anything runs.
    let mut broken = steps();
    broken[3]["command"] = json!("no-such-catalogue-tool");
    let pipeline = write_pipeline(dir.path(), broken);
    let refused = local(
        dir.path(),
        &pipeline,
        &["--months", "2024-01", "--datasets", "a"],
    );
    assert_ne!(refused.code(), 0);
    assert!(
        refused
            .stderr()
            .contains("preflight failed, nothing was run")
            && refused.stderr().contains("step `CATALOGUE`"),
        "{}",
        refused.context()
    );
}

/// A dataset's export with `allow_partial` runs on the months that loaded (the partitions
/// file lists the halted one); the catalogue, which does not allow it, waits: local mode has
/// no operator, so the backfill ends escalated and the catalogue is not started, saying why.
#[test]
fn local_after_steps_run_on_partial_partitions_only_when_they_allow_it() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        json!([
            sh(
                "LOAD",
                r#"if [ "$1" = 2024-02 ]; then echo "CRITICAL: reference file not found" >&2; exit 1; fi; echo ok > out.csv"#,
                &["{month}"]
            ),
            backfill(
                sh(
                    "EXPORT",
                    r#"grep -c '"state": "HALTED"' "$1" > halted.txt"#,
                    &["{partitions_file}"]
                ),
                json!({"when": "after", "per": "dataset", "allow_partial": true})
            ),
            backfill(
                sh("CATALOGUE", "touch catalogue.txt", &[]),
                json!({"when": "after"})
            ),
        ]),
    );
    let run = local(
        dir.path(),
        &pipeline,
        &["--months", "2024-01..2024-02", "--datasets", "a"],
    );
    assert_eq!(run.code(), 1, "{}", run.context());
    let s = run.summary();
    assert_eq!(run_of(&s, "a_2024-02")["state"], "HALTED", "{s:#}");
    assert_eq!(run_of(&s, "_after_a")["state"], "COMPLETE", "{s:#}");
    let halted = std::fs::read_to_string(dir.path().join("work/runs/_after_a/halted.txt")).unwrap();
    assert_eq!(halted.trim(), "1");
    let catalogue = run_of(&s, "_after");
    assert_eq!(catalogue["state"], "CANCELLED", "{s:#}");
    let why = catalogue["reason"].as_str().unwrap();
    assert!(
        why.contains("not started: the backfill was escalated")
            && why.contains("do not `allow_partial`")
            && why.contains("a 2024-02 halted"),
        "{why}"
    );
    assert!(!dir.path().join("work/runs/_after/catalogue.txt").exists());
    let escalated = audit_records(&dir.path().join("audit.jsonl"))
        .into_iter()
        .any(|r| matches!(r.event, AuditEvent::BackfillEscalated { .. }));
    assert!(escalated);
}

/// Fleet mode: the submit check refuses a backfill whose after-step no live worker may run;
/// then a before-step, the partitions and an after-step run on a worker over RabbitMQ, and a
/// coordinator killed while the after-step runs is replaced by one that finishes it from
/// PostgreSQL without running it twice.
#[test]
fn fleet_backfill_level_steps_survive_a_coordinator_restart() {
    let mut fleet = Fleet::new("stages");
    let c = fleet.serve_with("first", "127.0.0.1:0", &["--fleet-check", "refuse"], &[]);
    fleet.wait_ready(&c, LIMIT);
    fleet.worker("w1", 2, &["sh"]);

    let unrunnable = fleet.pipeline(
        "unrunnable",
        json!([
            sh("LOAD", "true", &[]),
            backfill(
                json!({"id": "PUBLISH", "command": "publish-catalogue"}),
                json!({"when": "after"})
            ),
        ]),
    );
    // Wait for the worker's heartbeat, then submit: refused, naming the after-step.
    let deadline = std::time::Instant::now() + LIMIT;
    let refused = loop {
        let out = fleet.cli(&c, &["submit", &unrunnable, "--datasets", "a"]);
        if out.stderr().contains("PUBLISH") || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_ne!(refused.code(), 0, "{}", refused.context());
    assert!(
        refused.stderr().contains("PUBLISH") && refused.stderr().contains("publish-catalogue"),
        "{}",
        refused.context()
    );

    let pipeline = fleet.pipeline(
        "stages",
        json!([
            backfill(sh("PREPARE", r#"mkdir -p "$1""#, &["{workdir}/shared"]), json!({"when": "before"})),
            {
                "id": "LOAD", "command": "sh", "timeout_s": 60,
                "args": ["-c", r#"echo "$1" > "$2/$1.csv" && echo "$1" > out.csv"#, "sh", "{dataset}", "{workdir}/shared"],
                "artefacts": {"csv": "out.csv"}
            },
            backfill(
                sh(
                    "EXPORT",
                    &format!(r#"echo started > started; sleep 3; {CONCAT} | sort > export.csv; echo run >> runs"#),
                    &["{partitions_file}"]
                ),
                json!({"when": "after"})
            ),
        ]),
    );
    let id = fleet.submit(&c, &pipeline, &["--datasets", "a,b,c"]);
    let work = Path::new(&pipeline).parent().unwrap().join("work");
    fleet.wait_file(&work.join("runs/_after/started"), LIMIT);
    let during = fleet.status(&c, &id);
    assert_eq!(during["stage"], "after", "{during:#}");
    assert_eq!(run_of(&during, "_after")["step"], "EXPORT", "{during:#}");
    fleet.kill("first");

    let second = fleet.serve_on("second", c.addr());
    fleet.wait_ready(&second, LIMIT);
    let s = fleet.wait_finished(&second, &id, LIMIT);
    assert_eq!(s["counts"]["COMPLETE"], 5, "{s:#}");
    assert_eq!(s["stage"], "done", "{s:#}");
    assert_eq!(
        run_of(&s, "_after")["attempts"],
        json!({"EXPORT": 1}),
        "{s:#}"
    );
    assert_eq!(
        std::fs::read_to_string(work.join("runs/_after/export.csv")).unwrap(),
        "a\nb\nc\n"
    );
    assert_eq!(
        std::fs::read_to_string(work.join("runs/_after/runs")).unwrap(),
        "run\n",
        "the after-step ran once"
    );
    // The dashboard's backfill page shows the stage and the backfill-level runs.
    let (code, page) = warpline_tests::fleet::http_get(second.addr(), &format!("/backfills/{id}"));
    assert_eq!(code, 200);
    assert!(
        page.contains("id=\"backfill-steps\"") && page.contains("data-stage=\"done\""),
        "{page}"
    );
    let verify = fleet.warpline(&["audit", "verify", fleet.audit().to_str().unwrap()]);
    verify.expect_code(0);
}

/// A local backfill whose after-step halted (its tool was broken) resumes at that step once
/// the cause is fixed: the after-run completes on the resume and no partition runs again.
#[test]
fn a_halted_after_step_resumes_without_running_the_partitions_again() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        json!([
            sh(
                "LOAD",
                r#"echo "$2" >> "$1/loads""#,
                &["{workdir}", "{dataset}"]
            ),
            backfill(
                json!({
                    "id": "EXPORT", "command": "sh", "timeout_s": 60, "max_attempts": 1,
                    "args": ["-c", r#"if [ ! -f "$1/fixed" ]; then echo "export tool misconfigured" >&2; exit 2; fi; echo done > "$1/exported""#, "sh", "{workdir}"]
                }),
                json!({"when": "after"})
            ),
        ]),
    );
    let work = dir.path().join("work");
    let first = local(dir.path(), &pipeline, &["--datasets", "a,b"]);
    assert_ne!(
        first.code(),
        0,
        "the after-step halted\n{}",
        first.context()
    );
    let s = first.summary();
    let after = run_of(&s, "_after");
    assert_eq!(after["state"], "HALTED", "{}", first.context());
    assert_eq!(
        std::fs::read_to_string(work.join("loads"))
            .unwrap()
            .lines()
            .count(),
        2
    );

    std::fs::write(work.join("fixed"), "").unwrap();
    let resumed = local(dir.path(), &pipeline, &["--resume"]);
    resumed.expect_code(0);
    let s = resumed.summary();
    assert_eq!(
        run_of(&s, "_after")["state"],
        "COMPLETE",
        "{}",
        resumed.context()
    );
    assert!(work.join("exported").exists());
    assert_eq!(
        std::fs::read_to_string(work.join("loads"))
            .unwrap()
            .lines()
            .count(),
        2,
        "a completed partition ran again on the resume"
    );
    let audit = dir.path().join("audit.jsonl");
    warpline(&["audit", "verify", audit.to_str().unwrap()], &[]).expect_code(0);
}
