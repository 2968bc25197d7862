//! The deterministic engine tests of backfill-level runs ([`super::stages`]): what starts
//! when, what an after-run is told about the partitions, and what happens when partitions or
//! backfill-level steps fail, across a restart.

use std::sync::Arc;

use uuid::Uuid;
use warpline_shared::audit::AuditEvent;
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::StepSpec;
use warpline_shared::machine::RunStatus;
use warpline_shared::partition::Partition;
use warpline_shared::stage::{PartitionsList, RunScope};

use super::tests::{Harness, outcome};
use super::*;

/// A backfill of `steps` over every (dataset, month) pair.
fn request(
    h: &Harness,
    steps: serde_json::Value,
    datasets: &[&str],
    months: &[&str],
) -> BackfillRequest {
    let config = serde_json::json!({"name": "p", "steps": steps}).to_string();
    let pipeline = Pipeline::from_json(&h.dir.path().join("p.json"), &config).unwrap();
    let partitions: Vec<Partition> = datasets
        .iter()
        .flat_map(|d| {
            months.iter().map(move |m| Partition {
                dataset: Some(d.to_string()),
                month: Some(m.to_string()),
                ..Partition::default()
            })
        })
        .collect();
    BackfillRequest {
        id: Uuid::now_v7(),
        pipeline: Arc::new(pipeline),
        max_parallel: partitions.len(),
        partitions,
        priority: 0,
        request: None,
        reprocess: Default::default(),
    }
}

fn ids(specs: &[StepSpec]) -> Vec<&str> {
    specs.iter().map(|s| s.step_id.as_str()).collect()
}

/// The partitions file a backfill-level attempt carries.
fn listed(spec: &StepSpec) -> PartitionsList {
    assert_eq!(spec.files.len(), 1, "{:?}", spec.files);
    let (path, json) = spec.files.iter().next().unwrap();
    assert!(path.ends_with("/partitions.json"), "{path}");
    serde_json::from_str(json).unwrap()
}

fn run_of(h: &mut Harness, id: Uuid, partition: &str) -> RunSummary {
    h.summary(id)
        .runs
        .into_iter()
        .find(|r| r.partition == partition)
        .unwrap_or_else(|| panic!("no run `{partition}`"))
}

/// Before-steps run alone first; per-dataset after-steps start as soon as their dataset's
/// partitions completed, with the range and a partitions file; the backfill's after-steps
/// start last; the stage reads before → partitions → after → done.
#[tokio::test(start_paused = true)]
async fn backfill_steps_run_before_and_after_the_partitions_in_order() {
    let mut h = Harness::new();
    let req = request(
        &h,
        serde_json::json!([
            {"id": "PREPARE", "command": "true", "scope": "backfill", "when": "before"},
            {"id": "LOAD", "command": "true", "args": ["{month}"],
             "artefacts": {"csv": "out/{dataset}_{month}.csv"}},
            {"id": "EXPORT", "command": "true", "scope": "backfill", "when": "after", "per": "dataset",
             "args": ["{dataset}", "{first_month}", "{last_month:%Y%m}", "{partitions_file}"]},
            {"id": "CATALOGUE", "command": "true", "scope": "backfill", "when": "after",
             "args": ["{datasets}", "{partition}"]}
        ]),
        &["a", "b"],
        &["2024-01", "2024-02"],
    );
    let id = req.id;
    let first = h.turn([Event::Submit(Box::new(req), None)]).await;
    assert_eq!(
        ids(&first.dispatched),
        ["PREPARE"],
        "only the before-step starts"
    );
    let s = h.summary(id);
    assert_eq!(s.stage, BackfillStage::Before);
    assert_eq!(s.steps, ["LOAD"], "the partitions' steps");
    let keys: Vec<&str> = s.runs.iter().map(|r| r.partition.as_str()).collect();
    assert_eq!(
        keys,
        [
            "_before",
            "a_2024-01",
            "a_2024-02",
            "b_2024-01",
            "b_2024-02",
            "_after_a",
            "_after_b",
            "_after"
        ]
    );
    assert_eq!(run_of(&mut h, id, "_after_a").scope, RunScope::AfterDataset);
    assert_eq!(run_of(&mut h, id, "_after").steps, ["CATALOGUE"]);

    let loads = h.turn([outcome(&first.dispatched[0], 0)]).await;
    assert_eq!(ids(&loads.dispatched), ["LOAD"; 4]);
    assert_eq!(h.summary(id).stage, BackfillStage::Partitions);
    let loads = loads.dispatched;
    let (a, b): (Vec<_>, Vec<_>) = loads
        .iter()
        .partition(|s| s.cwd.ends_with("/a_2024-01") || s.cwd.ends_with("/a_2024-02"));

    let one = h.turn([outcome(a[0], 0)]).await;
    assert!(one.dispatched.is_empty(), "dataset a has a partition left");
    let export_a = h.turn([outcome(a[1], 0)]).await.dispatched;
    assert_eq!(ids(&export_a), ["EXPORT"]);
    let e = &export_a[0];
    assert_eq!(e.args[..3], ["a", "2024-01", "202402"]);
    assert!(e.cwd.ends_with("/runs/_after_a"), "{}", e.cwd);
    assert_eq!(&e.args[3], e.files.keys().next().unwrap());
    let list = listed(e);
    assert_eq!(
        (list.scope, list.dataset.as_deref(), list.complete),
        (RunScope::AfterDataset, Some("a"), 2)
    );
    assert_eq!(list.partitions[0].state, "COMPLETE");
    assert!(
        list.partitions[0].artefacts["csv"].ends_with("/runs/a_2024-01/out/a_2024-01.csv"),
        "{:?}",
        list.partitions[0]
    );
    assert_eq!(
        h.summary(id).stage,
        BackfillStage::Partitions,
        "an after-run of a dataset runs while another dataset's partitions do"
    );

    h.turn([outcome(b[0], 0)]).await;
    let export_b = h.turn([outcome(b[1], 0)]).await.dispatched;
    assert_eq!(ids(&export_b), ["EXPORT"]);
    assert_eq!(h.summary(id).stage, BackfillStage::After);
    assert!(
        h.turn([outcome(&export_a[0], 0)])
            .await
            .dispatched
            .is_empty()
    );
    let catalogue = h.turn([outcome(&export_b[0], 0)]).await.dispatched;
    assert_eq!(ids(&catalogue), ["CATALOGUE"]);
    assert_eq!(catalogue[0].args, ["a,b", "_after"]);
    assert_eq!(listed(&catalogue[0]).partitions.len(), 4);
    let done = h.turn([outcome(&catalogue[0], 0)]).await;
    assert!(done.kinds().contains(&"run_finished"));
    let s = h.summary(id);
    assert!(s.finished);
    assert_eq!(s.stage, BackfillStage::Done);
    assert_eq!(s.counts.get(&RunStatus::Complete), Some(&8));
}

/// An after-step that does not `allow_partial` waits for a halted partition: the backfill is
/// escalated, saying how to answer; `continue` runs it on what completed, listing the halted
/// partition with its state.
#[tokio::test(start_paused = true)]
async fn an_after_step_escalates_the_backfill_when_a_partition_halted_and_continue_runs_it() {
    let mut h = Harness::new();
    let req = request(
        &h,
        serde_json::json!([
            {"id": "LOAD", "command": "true", "max_attempts": 1},
            {"id": "EXPORT", "command": "true", "scope": "backfill", "when": "after"}
        ]),
        &["a"],
        &["2024-01", "2024-02"],
    );
    let id = req.id;
    let loads = h
        .turn([Event::Submit(Box::new(req), None)])
        .await
        .dispatched;
    h.turn([outcome(&loads[0], 0)]).await;
    let halted = h.turn([outcome(&loads[1], 127)]).await;
    assert!(halted.dispatched.is_empty());
    assert!(
        halted.records.iter().any(|r| matches!(
            r,
            AuditEvent::BackfillEscalated {
                after_blocked: true,
                ..
            }
        )),
        "the escalation says the after-steps are what waits: {:?}",
        halted.kinds()
    );
    let s = h.summary(id);
    assert_eq!(s.stage, BackfillStage::After);
    assert!(!s.finished, "the after-step waits for an operator");
    let why = s.escalated.unwrap();
    assert!(
        why.contains("1 of the runs they follow did not complete (a 2024-02 halted)"),
        "{why}"
    );
    assert!(why.contains("--action continue"), "{why}");
    assert!(h.engine.idle(), "local mode ends here rather than waiting");

    let (tx, _rx) = tokio::sync::oneshot::channel();
    let answered = h
        .turn([Event::Operator(
            OperatorCommand::ResolveBackfill {
                backfill_id: id,
                action: BackfillAction::Continue,
                reason: "export what loaded".into(),
                operator: "ops".into(),
            },
            tx,
        )])
        .await;
    assert_eq!(ids(&answered.dispatched), ["EXPORT"]);
    let list = listed(&answered.dispatched[0]);
    assert_eq!(list.complete, 1);
    let states: Vec<&str> = list.partitions.iter().map(|p| p.state.as_str()).collect();
    assert_eq!(states, ["COMPLETE", "HALTED"]);
    assert!(list.partitions[1].artefacts.is_empty());
    h.turn([outcome(&answered.dispatched[0], 0)]).await;
    assert_eq!(h.summary(id).stage, BackfillStage::Done);
}

/// With `allow_partial` the after-step runs at once; a failing attempt of it is retried by
/// the supervisor like any step's, and a restart in between loses nothing.
#[tokio::test(start_paused = true)]
async fn a_partial_after_step_runs_at_once_and_its_failures_are_retried_across_a_restart() {
    let mut h = Harness::new();
    let req = request(
        &h,
        serde_json::json!([
            {"id": "LOAD", "command": "true", "max_attempts": 1},
            {"id": "EXPORT", "command": "true", "scope": "backfill", "when": "after",
             "allow_partial": true, "max_attempts": 2}
        ]),
        &["a"],
        &["2024-01", "2024-02"],
    );
    let id = req.id;
    let loads = h
        .turn([Event::Submit(Box::new(req), None)])
        .await
        .dispatched;
    h.turn([outcome(&loads[0], 127)]).await;
    let export = h.turn([outcome(&loads[1], 0)]).await;
    assert!(!export.kinds().contains(&"backfill_escalated"));
    let e1 = export.dispatched[0].clone();
    assert_eq!((e1.step_id.as_str(), e1.attempt), ("EXPORT", 1));

    // Exit 75: the rules retry after the backoff; the coordinator restarts meanwhile.
    let failed = h.turn([outcome(&e1, 75)]).await;
    assert_eq!(failed.kinds(), ["step_result", "decision", "transition"]);
    let restarted = h.restart().await;
    // The restored backfill knows its one backfill-level run without looking through all.
    let stage_runs = &h.engine.backfills[&id].stage_runs;
    assert_eq!(stage_runs.len(), 1);
    assert_eq!(h.engine.runs[&stage_runs[0]].scope, RunScope::After);
    let e2 = restarted.dispatched[0].clone();
    assert_eq!((e2.step_id.as_str(), e2.attempt), ("EXPORT", 2));
    assert_eq!(
        listed(&e2).complete,
        1,
        "the restored after-run lists the partitions again"
    );
    h.turn([outcome(&e2, 0)]).await;
    let s = h.summary(id);
    let after = run_of(&mut h, id, "_after");
    assert_eq!(
        (after.state, after.attempts["EXPORT"]),
        (RunStatus::Complete, 2)
    );
    assert_eq!(s.stage, BackfillStage::Done);
}

/// A before-step that halts keeps every partition back and escalates the backfill;
/// `continue` is refused (nothing can start without it), `retry-failed` resumes it and its
/// completion starts the partitions.
#[tokio::test(start_paused = true)]
async fn a_halted_before_step_holds_the_partitions_until_it_is_retried() {
    let mut h = Harness::new();
    let req = request(
        &h,
        serde_json::json!([
            {"id": "PREPARE", "command": "true", "scope": "backfill", "when": "before", "max_attempts": 1},
            {"id": "LOAD", "command": "true"}
        ]),
        &["a"],
        &["2024-01"],
    );
    let id = req.id;
    let prepare = h
        .turn([Event::Submit(Box::new(req), None)])
        .await
        .dispatched;
    let halted = h.turn([outcome(&prepare[0], 127)]).await;
    assert!(
        halted.kinds().contains(&"backfill_escalated"),
        "{:?}",
        halted.kinds()
    );
    assert!(halted.dispatched.is_empty());
    assert_eq!(h.summary(id).stage, BackfillStage::Before);
    assert!(h.engine.idle());

    let (tx, rx) = tokio::sync::oneshot::channel();
    h.turn([Event::Operator(
        OperatorCommand::ResolveBackfill {
            backfill_id: id,
            action: BackfillAction::Continue,
            reason: "go".into(),
            operator: "ops".into(),
        },
        tx,
    )])
    .await;
    let refused = rx.await.unwrap().unwrap_err();
    assert!(refused.to_string().contains("retry-failed"), "{refused}");

    let (tx, _rx) = tokio::sync::oneshot::channel();
    let again = h
        .turn([Event::Operator(
            OperatorCommand::RetryFailed {
                backfill_id: id,
                operator: "ops".into(),
            },
            tx,
        )])
        .await;
    assert_eq!(ids(&again.dispatched), ["PREPARE"]);
    let load = h.turn([outcome(&again.dispatched[0], 0)]).await.dispatched;
    assert_eq!(ids(&load), ["LOAD"]);
    h.turn([outcome(&load[0], 0)]).await;
    let s = h.summary(id);
    assert_eq!(s.counts.get(&RunStatus::Complete), Some(&2));
    assert_eq!(s.stage, BackfillStage::Done);
}

/// A run's scope survives the store's JSON (PostgreSQL keeps runs as such), and a
/// partition's run keeps the old shape.
#[test]
fn a_run_records_scope_round_trips_and_a_partitions_run_omits_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"name": "p", "steps": [{"id": "A", "command": "true"},
        {"id": "E", "command": "true", "scope": "backfill", "when": "after"}]}"#;
    let pipeline = Pipeline::from_json(&dir.path().join("p.json"), config).unwrap();
    let plan = pipeline.plan(&[Partition {
        month: Some("2024-01".into()),
        ..Partition::default()
    }]);
    assert_eq!(plan.len(), 2);
    let (scope, p) = plan[1].clone();
    assert_eq!(scope, RunScope::After);
    assert_eq!(p.vars["first_month"], "2024-01");
    let rec = RunRecord {
        id: Uuid::now_v7(),
        backfill_id: Uuid::now_v7(),
        partition: p,
        machine: warpline_shared::machine::Machine::new(vec![]),
        history: vec![],
        attempts_total: vec![],
        last: None,
        reason: None,
        warnings: vec![],
        dispatched_at: None,
        finished_at: None,
        hand_backs: vec![],
        scope,
        share: Default::default(),
    };
    let back: RunRecord = serde_json::from_value(serde_json::to_value(&rec).unwrap()).unwrap();
    assert_eq!(back.scope, RunScope::After);
    let json = serde_json::to_value(RunRecord {
        scope: RunScope::Partition,
        ..rec
    })
    .unwrap();
    assert!(json.get("scope").is_none(), "{json}");
}
