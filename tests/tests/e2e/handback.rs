//! Fleet mode with workers that may not run every step: workers advertise their allowlists in
//! heartbeats, a worker that may not run a step hands it back instead of failing it, `submit`
//! refuses a backfill no live worker may run unless overridden, and then its runs escalate
//! after a few hand-backs instead of halting.
//!
//! Real `warpline serve` and `warpline-worker` processes on the local RabbitMQ and PostgreSQL,
//! each test in its own [`Fleet`] (schema, queue prefix, directory).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use warpline_shared::audit::AuditEvent;
use warpline_shared::machine::RunStatus;
use warpline_tests::fleet::{Coordinator, Fleet, http_get};

/// Long enough for these small backfills, hand-back delays included, on a busy machine.
const LIMIT: Duration = Duration::from_secs(120);

/// A shell step: `sh -c SCRIPT` in the run's directory.
fn sh(id: &str, script: &str) -> Value {
    json!({"id": id, "command": "sh", "args": ["-c", script], "timeout_s": 60})
}

/// Waits until `/v1/workers` lists every worker of `ids` with an advertised allowlist, and
/// returns that list.
fn wait_workers(c: &Coordinator, ids: &[&str]) -> Vec<Value> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (code, body) = http_get(c.addr(), "/v1/workers");
        let list: Vec<Value> = serde_json::from_str(&body).unwrap_or_default();
        let advertised = |id: &&str| {
            list.iter()
                .any(|w| w["worker_id"] == *id && w["allow"].is_array())
        };
        if code == 200 && ids.iter().all(advertised) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "workers {ids:?} not heard from with their allowlists: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two workers consume one pool; only `wide` may run the step's command (`sh`), `narrow` may
/// run only `true`. Every run completes on `wide` with one attempt; `narrow`'s refusals are
/// audited as hand-backs and halt nothing. The workers' allowlists are served as resolved on
/// them (`/v1/workers`, the dashboard's fleet page, `status --json`), with the pool's slots and
/// queue depth.
#[test]
fn a_step_only_one_worker_may_run_completes_and_the_other_hands_it_back() {
    let mut fleet = Fleet::new("handback");
    let c = fleet.serve_with(
        "coordinator",
        "127.0.0.1:0",
        &["--fleet-check", "refuse"],
        &[],
    );
    fleet.wait_ready(&c, LIMIT);
    fleet.worker("narrow", 2, &["true"]);
    fleet.worker("wide", 2, &["sh"]);
    let workers = wait_workers(&c, &["narrow", "wide"]);
    let narrow = workers.iter().find(|w| w["worker_id"] == "narrow").unwrap();
    assert_eq!(narrow["allow"][0]["entry"], "true", "{narrow}");
    assert!(
        narrow["allow"][0]["resolved"]
            .as_str()
            .is_some_and(|p| p.starts_with('/') && p.ends_with("/true")),
        "the entry as resolved on the worker: {narrow}"
    );

    // The fleet view: the pool with both workers, its slots and its queue's depth.
    let (code, body) = http_get(c.addr(), "/v1/fleet");
    assert_eq!(code, 200, "{body}");
    let view: Value = serde_json::from_str(&body).unwrap();
    let pool = &view["pools"][0];
    assert_eq!(
        (&pool["pool"], &pool["workers"], &pool["slots"]),
        (&json!("default"), &json!(2), &json!(4)),
        "{view:#}"
    );
    assert!(
        pool["queued"].is_u64(),
        "the queue depth from the broker: {view:#}"
    );
    // And the dashboard's fleet page, with each worker's allowlist as resolved on it.
    let (code, page) = http_get(c.addr(), "/fleet");
    assert_eq!(code, 200, "{page}");
    assert!(page.contains(">Queued</th>"), "{page}");
    assert!(
        page.contains("true <span class=\"muted\">→ /"),
        "narrow's allowlist on the fleet page: {page}"
    );

    let pipeline = fleet.pipeline("handback", json!([sh("WORK", "sleep 0.2")]));
    let datasets = "a,b,c,d,e,f";
    let id = fleet.submit(&c, &pipeline, &["--datasets", datasets]);
    let summary = fleet.wait_finished(&c, &id, LIMIT);
    // `status --json` carries the fleet the backfill ran on: workers with their allowlists.
    let wide = summary["fleet"]["workers"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["worker_id"] == "wide"))
        .unwrap_or_else(|| panic!("no fleet in status --json: {summary:#}"));
    assert_eq!(wide["allow"][0]["entry"], "sh", "{wide}");
    assert!(
        summary["fleet"]["pools"][0]["queued"].is_u64(),
        "{summary:#}"
    );
    let runs = summary["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 6, "{summary:#}");
    for r in runs {
        assert_eq!(r["state"], "COMPLETE", "{summary:#}");
        assert_eq!(
            r["attempts"],
            json!({"WORK": 1}),
            "a hand-back is not an attempt: {summary:#}"
        );
    }

    let records = fleet.audit_records();
    let mut hand_backs = 0;
    for r in &records {
        match &r.event {
            AuditEvent::StepHandedBack {
                worker_id,
                reason,
                next,
                ..
            } => {
                hand_backs += 1;
                assert_eq!(worker_id, "narrow");
                assert_eq!(next, "redispatch");
                assert!(
                    reason.contains("`sh` is not on this worker's allowlist"),
                    "{reason}"
                );
            }
            AuditEvent::StepResult { outcome } => {
                assert_eq!(outcome.result.worker_id, "wide", "{:?}", outcome.result);
                assert!(!outcome.result.refused);
            }
            AuditEvent::RunFinished { state, .. } => assert_eq!(*state, RunStatus::Complete),
            _ => {}
        }
    }
    // Six steps published at once to two consumers: the broker gives `narrow` its share.
    assert!(
        hand_backs >= 1,
        "narrow handed nothing back:\n{}",
        fleet.log("narrow")
    );
    fleet.note(&format!("{hand_backs} hand-backs by narrow"));
}

/// A pool where no live worker may run the step's command: `submit` refuses it, naming the
/// step, the pool and the live workers (and, before any worker, that none is live); `--dry-run`
/// says the same and submits nothing; with `--allow-unrunnable` it is accepted with a warning,
/// and each run escalates after the bounded hand-backs with a reason naming the step, the
/// command and the refusing worker, never HALTED.
#[test]
fn a_backfill_no_live_worker_may_run_is_refused_and_overridden_its_runs_escalate() {
    let mut fleet = Fleet::new("unrunnable");
    let c = fleet.serve_with(
        "coordinator",
        "127.0.0.1:0",
        &["--fleet-check", "refuse"],
        &[],
    );
    fleet.wait_ready(&c, LIMIT);
    let pipeline = fleet.pipeline("unrunnable", json!([sh("WORK", "true")]));

    let none = fleet.cli(&c, &["submit", &pipeline, "--datasets", "a,b"]);
    assert_eq!(none.code(), 2, "{}", none.context());
    assert!(
        none.stderr().contains("no live worker at all"),
        "{}",
        none.context()
    );

    fleet.worker("narrow", 2, &["true"]);
    wait_workers(&c, &["narrow"]);
    let refused = fleet.cli(&c, &["submit", &pipeline, "--datasets", "a,b"]);
    assert_eq!(refused.code(), 2, "{}", refused.context());
    for needle in [
        "no live worker may run this backfill",
        "step `WORK`: no live worker of pool `default` may run `sh` (live: narrow)",
        "--allow-unrunnable",
    ] {
        assert!(
            refused.stderr().contains(needle),
            "{needle}: {}",
            refused.context()
        );
    }

    let dry = fleet.cli(&c, &["submit", &pipeline, "--datasets", "a,b", "--dry-run"]);
    dry.expect_code(0);
    assert!(
        dry.stdout().contains("argv: sh -c true"),
        "{}",
        dry.context()
    );
    assert!(
        dry.stdout()
            .contains("WORK: no live worker of pool `default` may run `sh`"),
        "{}",
        dry.context()
    );
    let (_, list) = http_get(c.addr(), "/v1/backfills");
    assert_eq!(
        list.trim(),
        "[]",
        "a dry run or a refused submit started nothing"
    );

    let over = fleet.cli(
        &c,
        &[
            "submit",
            &pipeline,
            "--datasets",
            "a,b",
            "--allow-unrunnable",
        ],
    );
    over.expect_code(0);
    assert!(
        over.stderr()
            .contains("warning: step `WORK`: no live worker of pool `default` may run `sh`"),
        "{}",
        over.context()
    );
    let id = over.stdout().trim().to_string();
    let summary = fleet.wait_status(&c, &id, LIMIT, "escalated", |s| {
        s["counts"]["ESCALATED"] == 2
    });
    for r in summary["runs"].as_array().unwrap() {
        let reason = r["reason"].as_str().unwrap_or_default();
        for needle in [
            "no live worker of pool `default` may run it",
            "step `WORK`",
            "command `sh`",
            "`narrow`",
        ] {
            assert!(reason.contains(needle), "{needle}: {summary:#}");
        }
    }

    let records = fleet.audit_records();
    let backs: Vec<(Option<uuid::Uuid>, String)> = records
        .iter()
        .filter_map(|r| match &r.event {
            AuditEvent::StepHandedBack { next, .. } => Some((r.run_id, next.clone())),
            _ => None,
        })
        .collect();
    // Bounded: four hand-backs per run, the last one escalating.
    assert_eq!(backs.len(), 8, "{backs:?}");
    assert_eq!(
        backs.iter().filter(|(_, n)| n == "escalate").count(),
        2,
        "{backs:?}"
    );
    assert!(records.iter().all(|r| !matches!(
        &r.event,
        AuditEvent::RunFinished { state, .. } if *state == RunStatus::Halted
    )));
    assert!(records.iter().any(|r| matches!(
        &r.event,
        AuditEvent::Decision { agent, .. } if agent == "hand-back"
    )));
}

/// `submit --partitions-file`: the client parses the CSV as `run` does and sends the rows; each
/// row's extra column is a per-partition variable the worker's step sees rendered. With
/// signing on: the signed heartbeats carry the allowlist the submit check reads.
#[test]
fn submit_takes_partitions_from_a_file_with_per_partition_values() {
    let mut fleet = Fleet::new("partitions_file");
    fleet.env.push((
        "WARPLINE_SIGNING_KEY".into(),
        "e2e-signing-key-for-partitions-file".into(),
    ));
    let c = fleet.serve_with(
        "coordinator",
        "127.0.0.1:0",
        &["--fleet-check", "refuse"],
        &[],
    );
    fleet.wait_ready(&c, LIMIT);
    fleet.worker("w1", 2, &["sh"]);
    wait_workers(&c, &["w1"]);
    let pipeline = fleet.pipeline("slugs", json!([sh("GET", "printf %s '{url}' > got.txt")]));
    let rows = fleet.dir().join("rows.csv");
    std::fs::write(
        &rows,
        "dataset,url\nae,https://example.org/ae/january-2024\nrtt,https://example.org/rtt/february-2024\n",
    )
    .unwrap();
    let bad = fleet.dir().join("bad.csv");
    std::fs::write(&bad, "dataset,url\nae,x\nae,y\n").unwrap();
    let refused = fleet.cli(
        &c,
        &[
            "submit",
            &pipeline,
            "--partitions-file",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(refused.code(), 2, "{}", refused.context());
    assert!(refused.stderr().contains("row 2"), "{}", refused.context());

    let id = fleet.submit(
        &c,
        &pipeline,
        &["--partitions-file", rows.to_str().unwrap()],
    );
    let summary = fleet.wait_finished(&c, &id, LIMIT);
    assert_eq!(summary["counts"]["COMPLETE"], 2, "{summary:#}");
    for (dataset, url) in [
        ("ae", "https://example.org/ae/january-2024"),
        ("rtt", "https://example.org/rtt/february-2024"),
    ] {
        let got = fleet.dir().join("work/runs").join(dataset).join("got.txt");
        assert_eq!(
            std::fs::read_to_string(&got).unwrap_or_default(),
            url,
            "{}",
            got.display()
        );
    }
}
