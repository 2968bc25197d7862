//! Observability: `/metrics` on the coordinator and on workers, parsed by a Prometheus text
//! parser and checked against the audit log of the backfill it counted; JSON logs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use warpline_shared::audit::AuditEvent;
use warpline_tests::fleet::{Fleet, http_get};

/// Long enough for anything these small backfills do on a busy two-core machine.
const LIMIT: Duration = Duration::from_secs(90);

fn sh(id: &str, script: &str) -> Value {
    json!({"id": id, "command": "sh", "args": ["-c", script], "timeout_s": 60})
}

/// `/metrics` of `addr`, parsed; fails unless it answers 200 in the text format.
fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(
        status, 200,
        "GET http://{addr}/metrics answered {status}: {body}"
    );
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("`/metrics` of {addr} does not parse: {e}\n{body}"))
}

/// The values of counter `name`, keyed by the labels named in `keys` (in that order).
fn counters(s: &prometheus_parse::Scrape, name: &str, keys: &[&str]) -> BTreeMap<Vec<String>, u64> {
    let mut out = BTreeMap::new();
    for sample in s.samples.iter().filter(|x| x.metric == name) {
        let prometheus_parse::Value::Counter(v) = sample.value else {
            panic!("`{name}` is not a counter: {:?}", sample.value);
        };
        let key: Vec<String> = keys
            .iter()
            .map(|k| sample.labels.get(k).unwrap_or_default().to_string())
            .collect();
        *out.entry(key).or_insert(0) += v as u64;
    }
    out.retain(|_, v| *v > 0);
    out
}

/// A gauge's value (summed over its label sets).
fn gauge(s: &prometheus_parse::Scrape, name: &str) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .map(|x| match x.value {
            prometheus_parse::Value::Gauge(v) => v,
            ref other => panic!("`{name}` is not a gauge: {other:?}"),
        })
        .sum()
}

/// Where a worker started with `WARPLINE_METRICS=127.0.0.1:0` and JSON logs serves its
/// metrics.
fn worker_metrics_addr(fleet: &mut Fleet, id: &str) -> String {
    let line = fleet.wait_log(id, "serving Prometheus metrics");
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    v["fields"]["bound"]
        .as_str()
        .unwrap_or_else(|| panic!("no bound address: {line}"))
        .to_string()
}

#[test]
fn metrics_on_the_coordinator_and_the_workers_count_what_the_audit_log_says() {
    let mut fleet = Fleet::new("metrics");
    fleet
        .env
        .push(("WARPLINE_METRICS".into(), "127.0.0.1:0".into()));
    let c = fleet.serve("coordinator");
    fleet.wait_ready(&c, LIMIT);
    // The workers log JSON lines.
    fleet
        .env
        .push(("WARPLINE_LOG_FORMAT".into(), "json".into()));
    for id in ["w1", "w2"] {
        fleet.worker(id, 2, &["sh"]);
    }
    let workers: Vec<String> = ["w1", "w2"]
        .iter()
        .map(|id| worker_metrics_addr(&mut fleet, id))
        .collect();
    // FETCH passes; LOAD fails its first attempt with exit 75 (retried) and then passes.
    let pipeline = fleet.pipeline(
        "metered",
        json!([
            sh("FETCH", "echo fetched {month}"),
            sh("LOAD", "[ {attempt} -gt 1 ] || exit 75"),
        ]),
    );
    let id = fleet.submit(&c, &pipeline, &["--months", "2024-01..2024-03"]);
    let summary = fleet.wait_finished(&c, &id, LIMIT);
    assert_eq!(summary["counts"]["COMPLETE"], 3, "{summary:#}");

    // What the audit log says happened.
    let mut steps: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    let mut decisions: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    let mut worker_steps: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for r in fleet.audit_records() {
        match &r.event {
            AuditEvent::StepResult { outcome } => {
                let label = warpline_telemetry::outcome_label(outcome).to_string();
                let step = outcome.result.step_id.clone();
                *steps
                    .entry(vec!["metered".into(), step.clone(), label.clone()])
                    .or_insert(0) += 1;
                *worker_steps.entry(vec![step, label]).or_insert(0) += 1;
            }
            AuditEvent::Decision {
                agent, decision, ..
            } => {
                *decisions
                    .entry(vec![decision.action.as_str().to_string(), agent.clone()])
                    .or_insert(0) += 1;
            }
            _ => {}
        }
    }
    assert_eq!(
        steps.values().sum::<u64>(),
        9,
        "3 runs × (FETCH + 2 × LOAD): {steps:?}"
    );
    assert_eq!(
        steps.get(&vec!["metered".into(), "LOAD".into(), "failed".into()]),
        Some(&3),
        "{steps:?}"
    );

    let m = scrape(c.addr());
    assert_eq!(
        counters(
            &m,
            "warpline_steps_finished_total",
            &["pipeline", "step", "outcome"]
        ),
        steps,
        "the coordinator's step counters match the audit log"
    );
    assert_eq!(
        counters(&m, "warpline_decisions_total", &["action", "agent"]),
        decisions,
        "the coordinator's decision counters match the audit log"
    );
    assert!(
        decisions.contains_key(&vec!["retry".to_string(), "rules".to_string()]),
        "the failed LOADs were retried by the rules: {decisions:?}"
    );
    assert_eq!(
        counters(&m, "warpline_runs_finished_total", &["pipeline", "state"]),
        BTreeMap::from([(vec!["metered".into(), "COMPLETE".into()], 3)])
    );
    assert_eq!(gauge(&m, "warpline_leader"), 1.0);
    assert_eq!(gauge(&m, "warpline_outbox_backlog"), 0.0);
    assert_eq!(gauge(&m, "warpline_workers_alive"), 2.0);
    assert_eq!(gauge(&m, "warpline_worker_slots"), 4.0);
    assert_eq!(gauge(&m, "warpline_dead_letters"), 0.0);
    let runs: f64 = m
        .samples
        .iter()
        .filter(|s| s.metric == "warpline_runs" && s.labels.get("state") == Some("COMPLETE"))
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(runs, 3.0, "runs by state come from the database");
    let histogram_count = |name: &str| -> f64 {
        m.samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| match &s.value {
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(histogram_count("warpline_step_duration_seconds"), 9.0);
    assert_eq!(
        histogram_count("warpline_step_schedule_to_start_seconds"),
        9.0
    );
    // Every result but a run's last is followed by a StepSpec: 3 × 2.
    assert_eq!(histogram_count("warpline_result_to_dispatch_seconds"), 6.0);

    // The compose file's healthchecks, run as they are against these processes, pass.
    let compose: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(warpline_tests::repo_root().join("docker-compose.yml")).unwrap(),
    )
    .unwrap();
    let compose = serde_json::to_value(compose).unwrap();
    for (svc, port, addr) in [
        ("coordinator", "8080", c.addr().to_string()),
        ("worker", "9091", workers[0].clone()),
    ] {
        let test = &compose["services"][svc]["healthcheck"]["test"];
        assert_eq!(test[0], "CMD", "{test}");
        let script = test[3]
            .as_str()
            .unwrap()
            .replace(&format!("127.0.0.1/{port}"), &addr.replace(':', "/"));
        let ok = std::process::Command::new(test[1].as_str().unwrap())
            .args([test[2].as_str().unwrap(), &script])
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "{svc}'s compose healthcheck fails against a ready {svc}: {script}"
        );
    }

    // The workers between them ran and reported every step.
    let mut ran: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for addr in &workers {
        let w = scrape(addr);
        assert_eq!(gauge(&w, "warpline_worker_slots"), 2.0);
        assert_eq!(gauge(&w, "warpline_worker_slots_busy"), 0.0);
        for (k, v) in counters(&w, "warpline_worker_steps_total", &["step", "outcome"]) {
            *ran.entry(k).or_insert(0) += v;
        }
    }
    assert_eq!(
        ran, worker_steps,
        "the workers' step counters match the audit log"
    );

    // Every line a worker logged is a JSON object; a step's lines name its run, step and
    // attempt.
    let mut step_lines = 0;
    for id in ["w1", "w2"] {
        for line in fleet.log(id).lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("`{id}` logged a line that is not JSON ({e}): {line}"));
            assert!(
                v["timestamp"].is_string() && v["level"].is_string(),
                "{line}"
            );
            if v["fields"]["message"] == "running step" {
                let span = v["spans"]
                    .as_array()
                    .and_then(|s| s.iter().find(|s| s["name"] == "step_delivery"))
                    .unwrap_or_else(|| panic!("no step span: {line}"));
                assert!(span["run_id"].is_string(), "{line}");
                assert!(span["step"].is_string(), "{line}");
                assert!(span["attempt"].is_number(), "{line}");
                assert!(span["attempt_id"].is_string(), "{line}");
                step_lines += 1;
            }
        }
    }
    assert_eq!(step_lines, 9, "one `running step` line per attempt");
}
