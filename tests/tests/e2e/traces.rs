//! Traces: `serve` and two workers (and local mode's `warpline run`) export their spans over
//! OTLP to a real receiver inside the test (`warpline_tests::otlp`, decoding the exporter's
//! protobuf), over `http/protobuf` and `grpc`. Each run's spans from every process must form
//! one trace whose id is the run id, linked `run` → `publish steps` (PRODUCER, coordinator) →
//! `process steps` (CONSUMER, worker) → `run STEP`, `validate STEP`, `publish results`
//! (PRODUCER) → `process results` (CONSUMER, coordinator), with the decisions under the run;
//! and nothing may be exported unless the endpoint is configured.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_tests::fleet::Fleet;
use warpline_tests::otlp::{Protocol, ReceivedSpan, Receiver};
use warpline_tests::{Finished, audit_records, bin, repo_root};

const LIMIT: Duration = Duration::from_secs(90);
/// The variables a test sets itself (an exporter configured in the developer's shell must not
/// leak into a test that expects none).
const OTEL_VARS: [&str; 6] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_SAMPLER",
];

fn sh(id: &str, script: &str) -> Value {
    json!({"id": id, "command": "sh", "args": ["-c", script], "timeout_s": 60})
}

/// FETCH passes; LOAD fails its first attempt with exit 75 (retried) and then passes: three
/// attempts per run, two of one step.
fn steps() -> Value {
    json!([
        sh("FETCH", "echo fetched {month}"),
        sh("LOAD", "[ {attempt} -gt 1 ] || exit 75"),
    ])
}

/// What the audit log says one run did: its attempts (attempt id → step) and decisions.
struct RunFacts {
    run_id: Uuid,
    attempts: BTreeMap<String, String>,
    decisions: usize,
}

fn facts(records: &[AuditRecord]) -> Vec<RunFacts> {
    let mut runs: BTreeMap<Uuid, RunFacts> = BTreeMap::new();
    for r in records {
        let Some(run_id) = r.run_id else { continue };
        let f = runs.entry(run_id).or_insert_with(|| RunFacts {
            run_id,
            attempts: BTreeMap::new(),
            decisions: 0,
        });
        match &r.event {
            AuditEvent::StepDispatched {
                step_id,
                attempt_id,
                ..
            } => {
                f.attempts.insert(attempt_id.to_string(), step_id.clone());
            }
            AuditEvent::Decision { .. } => f.decisions += 1,
            _ => {}
        }
    }
    runs.into_values().collect()
}

/// Checks one run's trace; `coordinator` is the coordinator's service name, `worker_service`
/// names the service each worker id must report.
fn check_run_trace(
    spans: &[ReceivedSpan],
    run: &RunFacts,
    coordinator: &str,
    worker_service: &dyn Fn(&str) -> String,
) {
    let trace_id = run.run_id.simple().to_string();
    let mine: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let show = || {
        mine.iter()
            .map(|s| {
                format!(
                    "{} {} [{}] {} parent={:?} {:?}",
                    s.service, s.name, s.kind, s.span_id, s.parent, s.attributes
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let by_id: HashMap<&str, &ReceivedSpan> =
        mine.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let named = |name: &str| -> Vec<&ReceivedSpan> {
        mine.iter().copied().filter(|s| s.name == name).collect()
    };
    let parent_of = |s: &ReceivedSpan| -> &ReceivedSpan {
        let p = s
            .parent
            .as_deref()
            .unwrap_or_else(|| panic!("`{}` has no parent:\n{}", s.name, show()));
        by_id
            .get(p)
            .copied()
            .unwrap_or_else(|| panic!("the parent of `{}` did not arrive:\n{}", s.name, show()))
    };

    // The root: one `run` span, from the coordinator, parentless.
    let roots = named("run");
    assert_eq!(
        roots.len(),
        1,
        "run {}: one root span\n{}",
        run.run_id,
        show()
    );
    let root = roots[0];
    assert_eq!(root.parent, None, "{}", show());
    assert_eq!(root.service, coordinator);
    assert_eq!(root.attr("warpline.run.state"), "COMPLETE");

    // One `publish steps` per dispatched attempt, under the root.
    let publishes = named("publish steps");
    assert_eq!(
        publishes.len(),
        run.attempts.len(),
        "run {}: a publish per attempt\n{}",
        run.run_id,
        show()
    );
    for p in &publishes {
        assert_eq!(
            (p.kind, p.service.as_str()),
            ("producer", coordinator),
            "{}",
            show()
        );
        assert_eq!(
            p.parent.as_deref(),
            Some(root.span_id.as_str()),
            "{}",
            show()
        );
        assert_eq!(p.attr("messaging.operation.name"), "publish");
        assert!(
            run.attempts.contains_key(p.attr("messaging.message.id")),
            "{}",
            show()
        );
    }

    // One `process steps` per attempt, on a worker, continuing that attempt's publish.
    let processes = named("process steps");
    assert_eq!(
        processes.len(),
        run.attempts.len(),
        "run {}: a process per attempt\n{}",
        run.run_id,
        show()
    );
    for p in &processes {
        assert_eq!(p.kind, "consumer", "{}", show());
        let worker = p.attr("warpline.worker.id");
        assert_eq!(p.service, worker_service(worker), "{}", show());
        let publish = parent_of(p);
        assert_eq!(publish.name, "publish steps", "{}", show());
        let attempt = p.attr("warpline.attempt.id");
        assert_eq!(publish.attr("warpline.attempt.id"), attempt, "{}", show());
        let step = &run.attempts[attempt];
        assert_eq!(p.attr("warpline.step.id"), step);
        // Its children: the tool, the validators, the result's publish.
        let children: Vec<&ReceivedSpan> = mine
            .iter()
            .copied()
            .filter(|c| c.parent.as_deref() == Some(p.span_id.as_str()))
            .collect();
        let mut names: Vec<(&str, &str)> =
            children.iter().map(|c| (c.name.as_str(), c.kind)).collect();
        names.sort();
        let run_name = format!("run {step}");
        let validate_name = format!("validate {step}");
        let mut want = vec![
            ("publish results", "producer"),
            (run_name.as_str(), "internal"),
            (validate_name.as_str(), "internal"),
        ];
        want.sort();
        assert_eq!(
            names,
            want,
            "children of `process steps` of {attempt}\n{}",
            show()
        );
        for c in &children {
            assert_eq!(c.service, p.service);
            assert!(
                c.start_ns >= p.start_ns && c.end_ns <= p.end_ns,
                "`{}` lies outside its parent\n{}",
                c.name,
                show()
            );
        }
        let tool = children.iter().find(|c| c.name == run_name).unwrap();
        let passed = p.attr("warpline.outcome") == "passed";
        assert_eq!(
            tool.status,
            if passed { "ok" } else { "error" },
            "{}",
            show()
        );
        assert_eq!(
            tool.attr("process.exit.code"),
            if passed { "0" } else { "75" }
        );
    }

    // One `process results` per attempt, on the coordinator, continuing the worker's publish.
    let results = named("process results");
    assert_eq!(
        results.len(),
        run.attempts.len(),
        "run {}: a result per attempt\n{}",
        run.run_id,
        show()
    );
    for r in &results {
        assert_eq!(
            (r.kind, r.service.as_str()),
            ("consumer", coordinator),
            "{}",
            show()
        );
        let publish = parent_of(r);
        assert_eq!(publish.name, "publish results", "{}", show());
        assert_eq!(parent_of(publish).name, "process steps");
    }

    // A decision span per audited decision, under the run.
    let decisions: Vec<&ReceivedSpan> = mine
        .iter()
        .copied()
        .filter(|s| s.name.starts_with("decide "))
        .collect();
    assert_eq!(
        decisions.len(),
        run.decisions,
        "run {}: a span per decision\n{}",
        run.run_id,
        show()
    );
    for d in &decisions {
        assert_eq!(
            d.parent.as_deref(),
            Some(root.span_id.as_str()),
            "{}",
            show()
        );
        assert_eq!(d.service, coordinator);
        assert!(!d.attr("warpline.decision.action").is_empty(), "{}", show());
    }
    let retry = decisions
        .iter()
        .filter(|d| d.attr("warpline.decision.action") == "retry")
        .count();
    assert_eq!(retry, 1, "LOAD's first attempt is retried\n{}", show());

    // Nothing else in the trace.
    let accounted = 1 + publishes.len() + processes.len() * 4 + results.len() + decisions.len();
    assert_eq!(
        mine.len(),
        accounted,
        "run {}: unexpected spans\n{}",
        run.run_id,
        show()
    );
}

/// Every span belongs to one of the runs' traces (no stray trace from a log span or a CLI).
fn check_no_stray_traces(spans: &[ReceivedSpan], runs: &[RunFacts]) {
    let ids: Vec<String> = runs.iter().map(|r| r.run_id.simple().to_string()).collect();
    let stray: Vec<String> = spans
        .iter()
        .filter(|s| !ids.contains(&s.trace_id))
        .map(|s| format!("{} {} {}", s.service, s.name, s.trace_id))
        .collect();
    assert!(
        stray.is_empty(),
        "spans outside every run's trace: {stray:#?}"
    );
}

/// `serve` and two workers exporting to `receiver`; each process stopped with SIGTERM at the
/// end, so what arrives after the backfill was flushed on shutdown.
fn fleet_backfill(name: &str, receiver: &Receiver, months: &str) -> (Fleet, Vec<RunFacts>) {
    let mut fleet = Fleet::new(name);
    fleet.env.extend(receiver.env("e2e-coordinator"));
    let c = fleet.serve("coordinator");
    fleet.wait_ready(&c, LIMIT);
    for (id, service) in [("w1", "e2e-worker-1"), ("w2", "e2e-worker-2")] {
        // Later entries win: each worker names its own service.
        fleet.env.push(("OTEL_SERVICE_NAME".into(), service.into()));
        fleet.worker(id, 2, &["sh"]);
    }
    let pipeline = fleet.pipeline("traced", steps());
    let id = fleet.submit(&c, &pipeline, &["--months", months]);
    let summary = fleet.wait_finished(&c, &id, LIMIT);
    let runs = summary["runs"].as_array().map(Vec::len).unwrap_or(0);
    assert!(
        runs > 0 && summary["counts"]["COMPLETE"] == runs as u64,
        "{summary:#}"
    );
    // The batch exporter holds spans up to 5 s: what is still buffered must leave on SIGTERM.
    for p in ["w1", "w2", "coordinator"] {
        fleet.signal(p, Signal::SIGTERM);
    }
    for p in ["w1", "w2", "coordinator"] {
        fleet.wait_exit(p, LIMIT);
    }
    let facts = facts(&fleet.audit_records());
    assert_eq!(facts.len(), runs);
    (fleet, facts)
}

fn worker_service(worker: &str) -> String {
    match worker {
        "w1" => "e2e-worker-1".into(),
        "w2" => "e2e-worker-2".into(),
        other => panic!("a span from an unknown worker `{other}`"),
    }
}

#[test]
fn a_runs_spans_from_the_coordinator_and_two_workers_form_one_trace_over_http() {
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let (_fleet, runs) = fleet_backfill("traces_http", &receiver, "2024-01..2024-03");
    let spans = receiver.spans();
    for run in &runs {
        check_run_trace(&spans, run, "e2e-coordinator", &worker_service);
    }
    check_no_stray_traces(&spans, &runs);
}

#[test]
fn a_runs_spans_form_one_trace_over_grpc() {
    let receiver = Receiver::start(Protocol::Grpc);
    let (_fleet, runs) = fleet_backfill("traces_grpc", &receiver, "2024-01");
    let spans = receiver.spans();
    for run in &runs {
        check_run_trace(&spans, run, "e2e-coordinator", &worker_service);
    }
    check_no_stray_traces(&spans, &runs);
}

/// `warpline run` of the test pipeline in `dir`, with `env` (every other OTEL variable
/// removed); returns its audit records.
fn local_run(dir: &Path, name: &str, env: &[(String, String)]) -> (Finished, Vec<AuditRecord>) {
    let pipeline = dir.join(format!("{name}.json"));
    let config = json!({
        "name": name,
        "workdir": "work",
        "retry": {"initial_ms": 10, "max_ms": 100},
        "steps": steps(),
    });
    std::fs::write(&pipeline, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let audit = dir.join(format!("{name}.audit.jsonl"));
    let args = [
        "run",
        pipeline.to_str().unwrap(),
        "--months",
        "2024-01..2024-02",
        "--allow",
        "sh",
        "--workers",
        "2",
        "--progress",
        "none",
        "--json",
        "--audit",
        audit.to_str().unwrap(),
    ];
    let exe = bin("warpline");
    let mut cmd = Command::new(&exe);
    cmd.args(args).current_dir(repo_root());
    for k in OTEL_VARS {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let command = format!("{} {}", exe.display(), args.join(" "));
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let finished = Finished { command, output };
    finished.expect_code(0);
    let records = audit_records(&audit);
    (finished, records)
}

#[test]
fn local_mode_emits_the_same_trace() {
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let dir = tempfile::tempdir().unwrap();
    let (_, records) = local_run(dir.path(), "local_traced", &receiver.env("e2e-local"));
    // `warpline run` exited: everything it exported was flushed at its normal exit.
    let runs = facts(&records);
    assert_eq!(runs.len(), 2);
    let spans = receiver.spans();
    for run in &runs {
        check_run_trace(&spans, run, "e2e-local", &|_| "e2e-local".to_string());
    }
    check_no_stray_traces(&spans, &runs);
    let local: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == "process steps").collect();
    assert!(
        local
            .iter()
            .all(|s| s.attr("messaging.system") == "warpline.local")
    );
}

#[test]
fn nothing_is_exported_unless_an_endpoint_is_configured() {
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let dir = tempfile::tempdir().unwrap();
    let everything_but_the_endpoint: Vec<(String, String)> = receiver
        .env("e2e-off")
        .into_iter()
        .filter(|(k, _)| k != "OTEL_EXPORTER_OTLP_ENDPOINT")
        .collect();
    local_run(dir.path(), "unset", &everything_but_the_endpoint);
    let mut disabled = receiver.env("e2e-off");
    disabled.push(("OTEL_SDK_DISABLED".into(), "true".into()));
    local_run(dir.path(), "disabled", &disabled);
    assert_eq!(receiver.requests(), 0, "{:#?}", receiver.spans());
    // The same run with only the endpoint added does export: the zeros above mean something.
    local_run(dir.path(), "enabled", &receiver.env("e2e-on"));
    assert!(
        receiver.requests() > 0,
        "the configured run exported nothing"
    );
    assert!(receiver.spans().iter().all(|s| s.service == "e2e-on"));
}
