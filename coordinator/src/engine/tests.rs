//! The engine's deterministic tests. [`Harness`] drives an [`Engine`] the way its loop does
//! (events in, one turn committed, effects acted on) with a transport and an observer that
//! record what was dispatched and committed, in paused tokio time, so a test states a sequence
//! of events and asserts the StepSpecs, timers and audit records each turn produced.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::{
    ReportStatus, SCHEMA_VERSION, StepOutcome, StepResult, StepSpec, ValidationReport,
};
use warpline_shared::machine::RunStatus;
use warpline_shared::partition::Partition;

use super::*;
use crate::audit_log::AuditLog;
use crate::progress::Quiet;
use crate::supervisor::RulesAgent;

/// A transport that drops every spec: these tests never run a step.
struct Nowhere;

impl Transport for Nowhere {
    fn dispatch(&mut self, _: StepSpec) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Keeps every dispatched StepSpec.
struct Recorder(Arc<Mutex<Vec<StepSpec>>>);

impl Transport for Recorder {
    fn dispatch(&mut self, spec: StepSpec) -> anyhow::Result<()> {
        self.0.lock().unwrap().push(spec);
        Ok(())
    }
}

/// Keeps every committed audit record.
struct Collect(Arc<Mutex<Vec<AuditRecord>>>);

impl Observer for Collect {
    fn on_record(&mut self, record: &AuditRecord) {
        self.0.lock().unwrap().push(record.clone());
    }
}

/// What one turn did, once committed.
#[derive(Debug, Default)]
pub(super) struct Turn {
    /// The audit records it committed, in order.
    pub records: Vec<AuditEvent>,
    /// The StepSpecs it dispatched.
    pub dispatched: Vec<StepSpec>,
    /// The timers it armed: after how long, and the event (as `Debug`).
    pub timers: Vec<(Duration, String)>,
}

impl Turn {
    /// The audit records' kinds (`step_dispatched`, `decision`, ...).
    pub fn kinds(&self) -> Vec<&'static str> {
        self.records.iter().map(AuditEvent::name).collect()
    }
}

/// An engine under test with the rules agent, a JSONL audit log in a temporary directory, and
/// recording ports. Timers and agent calls send their events to [`Harness::next_event`], which
/// the test calls when it wants the next one (tokio time is paused, so a backoff elapses at once
/// and in order).
pub(super) struct Harness {
    pub engine: Engine,
    pub dir: tempfile::TempDir,
    dispatched: Arc<Mutex<Vec<StepSpec>>>,
    records: Arc<Mutex<Vec<AuditRecord>>>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Harness {
    /// A new engine with nothing submitted.
    pub fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let dispatched = Arc::new(Mutex::new(Vec::new()));
        let records = Arc::new(Mutex::new(Vec::new()));
        let (tx, events) = mpsc::unbounded_channel();
        let engine = Engine::new(
            EngineConfig {
                exit_when_idle: false,
                retention: None,
            },
            Arc::new(RulesAgent),
            Box::new(AuditLog::open(dir.path().join("audit.jsonl")).unwrap()),
            Box::new(Recorder(dispatched.clone())),
            Box::new(Collect(records.clone())),
            tx,
        );
        Harness {
            engine,
            dir,
            dispatched,
            records,
            events,
        }
    }

    /// A backfill of `steps` (JSON array of step configs) over datasets `parts`.
    pub fn backfill(&self, steps: serde_json::Value, parts: &[&str]) -> BackfillRequest {
        let config = serde_json::json!({"name": "p", "steps": steps}).to_string();
        let pipeline = Pipeline::from_json(&self.dir.path().join("p.json"), &config).unwrap();
        BackfillRequest {
            id: Uuid::now_v7(),
            pipeline: Arc::new(pipeline),
            partitions: parts
                .iter()
                .map(|d| Partition {
                    dataset: Some(d.to_string()),
                    ..Partition::default()
                })
                .collect(),
            max_parallel: parts.len().max(1),
            priority: 0,
            request: None,
            reprocess: Default::default(),
        }
    }

    /// Handles `events` as one turn, commits it and acts on it.
    pub async fn turn(&mut self, events: impl IntoIterator<Item = Event>) -> Turn {
        for e in events {
            self.engine.handle(e);
        }
        self.commit().await
    }

    /// Commits what the engine staged so far (e.g. after `submit` or `restore`) and acts on it.
    pub async fn commit(&mut self) -> Turn {
        let timers = self
            .engine
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Timer { after, event } => Some((*after, format!("{event:?}"))),
                _ => None,
            })
            .collect();
        self.engine.end_turn().await.unwrap();
        Turn {
            records: std::mem::take(&mut *self.records.lock().unwrap())
                .into_iter()
                .map(|r| r.event)
                .collect(),
            dispatched: std::mem::take(&mut *self.dispatched.lock().unwrap()),
            timers,
        }
    }

    /// The next event a timer or an agent call sent (paused time runs until one fires).
    pub async fn next_event(&mut self) -> Event {
        self.next_event_within(Duration::from_secs(3600))
            .await
            .expect("an event within an hour of paused time")
    }

    /// The next event within `limit` of paused time, if any.
    pub async fn next_event_within(&mut self, limit: Duration) -> Option<Event> {
        tokio::time::timeout(limit, self.engine.next_event(&mut self.events))
            .await
            .ok()
            .flatten()
    }

    /// Ends this engine as a session ends (the broker dropped, the lock moved) and starts a new
    /// one on the same event channel, restored from what the old one stored, as `serve` does.
    pub async fn restart(&mut self) -> Turn {
        let backfills = self
            .engine
            .backfills
            .values()
            // Through the JSON PostgreSQL keeps, so what the record does not store is lost here
            // as it is there.
            .map(|b| (through_json(&b.rec), b.pipeline.clone()))
            .collect();
        let runs = self.engine.runs.values().map(through_json).collect();
        let tx = self.engine.events.clone();
        self.engine = Engine::new(
            EngineConfig {
                exit_when_idle: false,
                retention: None,
            },
            Arc::new(RulesAgent),
            Box::new(AuditLog::open(self.dir.path().join("audit.jsonl")).unwrap()),
            Box::new(Recorder(self.dispatched.clone())),
            Box::new(Collect(self.records.clone())),
            tx,
        );
        self.engine.restore(backfills, runs);
        self.commit().await
    }

    /// The summary of backfill `id`.
    pub fn summary(&mut self, id: Uuid) -> Summary {
        self.engine.summary(id)
    }
}

/// The outcome a worker would send for `spec`: its exit code, and a report that passes when
/// the exit code is 0.
pub(super) fn outcome(spec: &StepSpec, exit_code: i32) -> Event {
    let result = StepResult {
        run_id: Some(spec.run_id),
        attempt_id: Some(spec.attempt_id),
        attempt: spec.attempt,
        ..StepResult::new(&spec.step_id, exit_code)
    };
    let report = ValidationReport {
        schema_version: SCHEMA_VERSION,
        status: if exit_code == 0 {
            ReportStatus::Pass
        } else {
            ReportStatus::Fail
        },
        checks: vec![],
    };
    Event::Outcome(
        Box::new(StepOutcome {
            schema_version: SCHEMA_VERSION,
            result,
            report,
        }),
        None,
    )
}

fn engine(dir: &std::path::Path) -> Engine {
    let (tx, _) = mpsc::unbounded_channel();
    Engine::new(
        EngineConfig {
            exit_when_idle: false,
            retention: None,
        },
        Arc::new(RulesAgent),
        Box::new(AuditLog::open(dir.join("audit.jsonl")).unwrap()),
        Box::new(Nowhere),
        Box::new(Quiet),
        tx,
    )
}

fn backfill(dir: &std::path::Path) -> BackfillRequest {
    let config = r#"{"name": "p", "steps": [{"id": "A", "command": "true"}]}"#;
    let pipeline = Pipeline::from_json(&dir.join("p.json"), config).unwrap();
    BackfillRequest {
        id: Uuid::now_v7(),
        pipeline: Arc::new(pipeline),
        partitions: vec![Partition {
            dataset: Some("a".into()),
            ..Partition::default()
        }],
        max_parallel: 1,
        priority: 0,
        request: None,
        reprocess: Default::default(),
    }
}

/// A step that fails once is retried after its backoff, then proceeds; each turn commits
/// exactly the records and dispatches exactly the specs the sequence implies.
#[tokio::test(start_paused = true)]
async fn a_failed_attempt_is_retried_after_its_backoff_and_then_completes() {
    let mut h = Harness::new();
    let req = h.backfill(
        serde_json::json!([
            {"id": "A", "command": "true", "max_attempts": 2},
            {"id": "B", "command": "true"}
        ]),
        &["a"],
    );
    let id = req.id;
    let first = h.turn([Event::Submit(Box::new(req), None)]).await;
    assert_eq!(
        first.kinds(),
        [
            "backfill_created",
            "run_created",
            "transition",
            "step_dispatched"
        ]
    );
    assert_eq!(first.dispatched.len(), 1);
    let a1 = first.dispatched[0].clone();
    assert_eq!((a1.step_id.as_str(), a1.attempt), ("A", 1));
    assert_eq!(first.timers.len(), 1, "the deadline of A#1");

    // Exit 75 (`EX_TEMPFAIL`): the rules retry.
    let failed = h.turn([outcome(&a1, 75)]).await;
    assert_eq!(failed.kinds(), ["step_result", "decision", "transition"]);
    assert!(
        failed.dispatched.is_empty(),
        "a retry waits out its backoff"
    );
    let backoff: Vec<_> = failed
        .timers
        .iter()
        .filter(|(_, e)| e.starts_with("Ready"))
        .collect();
    assert_eq!(backoff.len(), 1, "{:?}", failed.timers);
    assert_eq!(backoff[0].0, Duration::from_secs(2), "the default backoff");

    // The deadline of A#1 fires later than the backoff; only Ready comes first.
    let ready = h.next_event().await;
    assert!(matches!(ready, Event::Ready { .. }), "{ready:?}");
    let retried = h.turn([ready]).await;
    assert_eq!(retried.kinds(), ["step_dispatched"]);
    let a2 = retried.dispatched[0].clone();
    assert_eq!((a2.step_id.as_str(), a2.attempt), ("A", 2));

    let passed = h.turn([outcome(&a2, 0)]).await;
    assert_eq!(
        passed.kinds(),
        ["step_result", "decision", "transition", "step_dispatched"]
    );
    let b1 = passed.dispatched[0].clone();
    let done = h.turn([outcome(&b1, 0)]).await;
    assert_eq!(
        done.kinds(),
        ["step_result", "decision", "transition", "run_finished"]
    );
    let s = h.summary(id);
    assert_eq!(s.runs[0].state, RunStatus::Complete);
    assert_eq!(s.counts.get(&RunStatus::Complete), Some(&1));
    assert!(s.finished);
    // A late duplicate of A#1 changes nothing and is recorded as stale.
    let late = h.turn([outcome(&a1, 0)]).await;
    assert_eq!(late.kinds(), ["stale_result"]);
    assert!(late.dispatched.is_empty());
}

#[test]
fn requests_whose_client_gave_up_are_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = engine(dir.path());
    let (reply, gave_up) = oneshot::channel();
    drop(gave_up);
    engine.handle(Event::Submit(Box::new(backfill(dir.path())), Some(reply)));
    assert!(
        engine.backfills.is_empty(),
        "a submit answered 503 took effect"
    );

    let id = engine.submit(backfill(dir.path()));
    let (reply, gave_up) = oneshot::channel();
    drop(gave_up);
    let cancel = OperatorCommand::Cancel {
        backfill_id: id,
        operator: "t".into(),
    };
    engine.handle(Event::Operator(cancel, reply));
    assert!(
        !engine.backfills[&id].rec.cancelling,
        "a cancel answered 503 took effect"
    );

    let (reply, mut answer) = oneshot::channel();
    engine.handle(Event::Operator(
        OperatorCommand::Cancel {
            backfill_id: id,
            operator: "t".into(),
        },
        reply,
    ));
    assert!(engine.backfills[&id].rec.cancelling);
    assert!(matches!(engine.effects.last(), Some(Effect::Reply(..))));
    assert!(
        answer.try_recv().is_err(),
        "answered only after the turn commits"
    );
}

/// After the loop has ended (`run --ui-stay`) reads are answered from the final state and
/// anything that would change a run is refused without touching it.
#[test]
fn an_ended_engine_answers_reads_and_refuses_actions() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = engine(dir.path());
    let id = engine.submit(backfill(dir.path()));
    let read = engine.answer_ended(OperatorCommand::Status {
        runs: RunsShown::All,
        backfill_id: Some(id),
    });
    assert!(
        matches!(&read, Ok(OperatorAnswer::Summary(s)) if s.runs.len() == 1),
        "{read:?}"
    );
    let act = engine.answer_ended(OperatorCommand::Cancel {
        backfill_id: id,
        operator: "t".into(),
    });
    assert!(
        matches!(&act, Err(OperatorError::Refused(why)) if why.contains("--resume")),
        "{act:?}"
    );
    assert!(
        !engine.backfills[&id].rec.cancelling,
        "a refused cancel took effect"
    );
}

#[test]
fn bound_tail_keeps_the_end_on_a_char_boundary() {
    let mut s = "é".repeat(10);
    bound_tail(&mut s, 5);
    assert!(s.ends_with("éé"), "{s}");
    assert!(s.starts_with("[... "), "{s}");
    let mut short = "abc".to_string();
    bound_tail(&mut short, 5);
    assert_eq!(short, "abc");
}

fn retrying_step() -> serde_json::Value {
    serde_json::json!([{"id": "A", "command": "true", "max_attempts": 3}])
}

/// The fault test's first finding: a session ends while a run waits out its backoff, the next
/// session restores the run and begins its attempt, and the old session's backoff then fired
/// into the new loop and began a second attempt ("cannot begin a second attempt while the run
/// is A"), halting a healthy run.
#[tokio::test(start_paused = true)]
async fn a_backoff_armed_before_a_restart_never_acts_after_it() {
    let mut h = Harness::new();
    let req = h.backfill(retrying_step(), &["a"]);
    let id = req.id;
    let first = h.turn([Event::Submit(Box::new(req), None)]).await;
    let a1 = first.dispatched[0].clone();
    let failed = h.turn([outcome(&a1, 75)]).await;
    assert!(failed.timers.iter().any(|(_, e)| e.starts_with("Ready")));

    let restored = h.restart().await;
    assert_eq!(
        restored.kinds(),
        ["step_dispatched"],
        "restore begins the waiting run"
    );
    let a2 = restored.dispatched[0].clone();
    assert_eq!(a2.attempt, 2);

    // Well past the old backoff: whatever fires must not touch the run.
    while let Some(ev) = h.next_event_within(Duration::from_secs(10)).await {
        let turn = h.turn([ev]).await;
        assert!(
            !turn.kinds().contains(&"run_finished"),
            "a timer from the ended session acted: {:?}",
            turn.records
        );
    }
    let s = h.summary(id);
    assert_eq!(s.runs[0].state, RunStatus::Running, "{:?}", s.runs[0]);
    let done = h.turn([outcome(&a2, 0)]).await;
    assert!(done.kinds().contains(&"run_finished"));
    assert_eq!(h.summary(id).runs[0].state, RunStatus::Complete);
}

/// `Ready` is idempotent: a second one for a run whose attempt is already out changes nothing.
#[tokio::test(start_paused = true)]
async fn a_duplicate_ready_changes_nothing() {
    let mut h = Harness::new();
    let req = h.backfill(retrying_step(), &["a"]);
    let id = req.id;
    let first = h.turn([Event::Submit(Box::new(req), None)]).await;
    let a1 = first.dispatched[0].clone();
    h.turn([outcome(&a1, 75)]).await;
    let ready = |run_id| Event::Ready {
        run_id,
        waited_ms: 2000,
    };
    let run_id = a1.run_id;
    let began = h.turn([ready(run_id)]).await;
    assert_eq!(began.kinds(), ["step_dispatched"]);
    let again = h.turn([ready(run_id), ready(run_id)]).await;
    assert!(again.records.is_empty(), "{:?}", again.records);
    assert!(again.dispatched.is_empty());
    assert_eq!(h.summary(id).runs[0].state, RunStatus::Running);
}

/// After a restart the deadline of an attempt dispatched long ago is armed from the recovery
/// time (at least `lost_grace_s`), so its result, waiting in the queue, is consumed before the
/// attempt could be declared lost and run again.
#[tokio::test(start_paused = true)]
async fn a_restart_rearms_deadlines_from_the_recovery_time() {
    let mut h = Harness::new();
    let req = h.backfill(
        serde_json::json!([{"id": "A", "command": "true", "timeout_s": 60}]),
        &["a"],
    );
    let first = h.turn([Event::Submit(Box::new(req), None)]).await;
    let a1 = first.dispatched[0].clone();
    // The coordinator was away for longer than the attempt's whole deadline.
    for r in h.engine.runs.values_mut() {
        r.dispatched_at = Some(chrono::Utc::now() - chrono::Duration::hours(2));
    }
    let restored = h.restart().await;
    let deadlines: Vec<_> = restored
        .timers
        .iter()
        .filter(|(_, e)| e.starts_with("Deadline"))
        .collect();
    assert_eq!(deadlines.len(), 1, "{:?}", restored.timers);
    assert!(
        deadlines[0].0 >= Duration::from_secs(30),
        "deadline re-armed at {:?}, before the result could arrive",
        deadlines[0].0
    );
    let done = h.turn([outcome(&a1, 0)]).await;
    assert!(done.kinds().contains(&"run_finished"), "{:?}", done.kinds());
}

fn heartbeat(
    worker: &str,
    running: Vec<warpline_shared::fleet::RunningAttempt>,
    interval_s: u64,
) -> Event {
    Event::Heartbeat(Box::new(warpline_shared::fleet::Heartbeat::new(
        worker.into(),
        "default".into(),
        2,
        running,
        interval_s,
    )))
}

fn running(run_id: Uuid, attempt_id: Uuid) -> warpline_shared::fleet::RunningAttempt {
    warpline_shared::fleet::RunningAttempt {
        run_id,
        attempt_id,
        step_id: "A".into(),
        started_at: chrono::Utc::now(),
    }
}

/// A heartbeat flood (attempt ids nobody awaits, a made-up worker per beat) leaves bounded
/// state: no unknown attempt is tracked and at most `MAX_WORKERS` workers are remembered.
#[tokio::test(start_paused = true)]
async fn heartbeat_state_is_bounded_whatever_heartbeats_claim() {
    let mut h = Harness::new();
    let req = h.backfill(retrying_step(), &["a"]);
    let first = h.turn([Event::Submit(Box::new(req), None)]).await;
    let a1 = first.dispatched[0].clone();
    let flood: Vec<_> = (0..5000)
        .map(|_| running(Uuid::now_v7(), Uuid::now_v7()))
        .collect();
    h.turn([heartbeat("made-up", flood, 5)]).await;
    assert!(
        h.engine.seen.is_empty(),
        "{} unknown attempts tracked",
        h.engine.seen.len()
    );
    assert!(h.engine.workers["made-up"].0.running.is_empty());
    // The real attempt is tracked.
    h.turn([heartbeat("w1", vec![running(a1.run_id, a1.attempt_id)], 5)])
        .await;
    assert_eq!(h.engine.seen.len(), 1);
    for i in 0..(super::liveness::MAX_WORKERS + 10) {
        h.engine.handle(heartbeat(&format!("w-{i}"), vec![], 5));
    }
    assert!(h.engine.workers.len() <= super::liveness::MAX_WORKERS);
}

/// An interval of `u64::MAX` neither overflows (`* 3` panicked in debug builds, wrapped in
/// release) nor makes a worker immortal: it counts as `MAX_INTERVAL_S`.
#[tokio::test(start_paused = true)]
async fn a_huge_heartbeat_interval_expires_like_the_longest_allowed() {
    let mut h = Harness::new();
    h.turn([heartbeat("slow", vec![], u64::MAX)]).await;
    assert!(h.engine.workers.contains_key("slow"));
    let longest = Duration::from_secs(3 * super::liveness::MAX_INTERVAL_S);
    assert_eq!(super::liveness::silence(u64::MAX), longest);
    assert_eq!(super::liveness::silence(0), Duration::from_secs(3));
    h.turn([Event::Tick]).await;
    assert!(h.engine.workers.contains_key("slow"), "not silent yet");
}

/// With signing off a forged result can claim a real outstanding attempt: one whose report
/// leaves out the step's configured checks is rejected (not "checks pass (0/0)"), the attempt
/// stays awaited, and the real result is applied.
#[tokio::test(start_paused = true)]
async fn a_result_that_skips_the_steps_checks_is_rejected() {
    let mut h = Harness::new();
    let req = h.backfill(
        serde_json::json!([{
            "id": "A", "command": "true",
            "validations": [{"name": "no errors", "kind": "log_regex_absent", "pattern": "ERROR"}]
        }]),
        &["a"],
    );
    let id = req.id;
    let first = h.turn([Event::Submit(Box::new(req), None)]).await;
    let a1 = first.dispatched[0].clone();
    let forged = h.turn([outcome(&a1, 0)]).await;
    assert_eq!(forged.kinds(), ["stale_result"], "{:?}", forged.records);
    match &forged.records[0] {
        AuditEvent::StaleResult { reason, .. } => assert!(reason.contains("no errors"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.summary(id).runs[0].state, RunStatus::Running);
    let Event::Outcome(mut real, ack) = outcome(&a1, 0) else {
        unreachable!()
    };
    real.report.checks.push(warpline_shared::contracts::Check {
        name: "no errors".into(),
        kind: "log_regex_absent".into(),
        severity: warpline_shared::contracts::Severity::Error,
        passed: true,
        detail: "no match".into(),
        value: None,
    });
    let applied = h.turn([Event::Outcome(real, ack)]).await;
    assert!(
        applied.kinds().contains(&"run_finished"),
        "{:?}",
        applied.kinds()
    );
    assert_eq!(h.summary(id).runs[0].state, RunStatus::Complete);
}

/// A heartbeat of a worker of pool `default` whose allowlist is `allow`, each entry resolving.
fn advertising(worker: &str, allow: &[&str]) -> Event {
    let mut hb =
        warpline_shared::fleet::Heartbeat::new(worker.into(), "default".into(), 2, vec![], 5);
    hb.allow = Some(
        allow
            .iter()
            .map(|p| warpline_shared::fleet::AllowedCommand {
                entry: p.to_string(),
                program: p.to_string(),
                pinned: Vec::new(),
                resolved: Some(format!("/usr/bin/{p}")),
            })
            .collect(),
    );
    Event::Heartbeat(Box::new(hb))
}

/// The refused outcome `worker` hands back for `spec`.
fn refused(spec: &StepSpec, worker: &str) -> Event {
    let Event::Outcome(mut o, ack) = outcome(spec, -1) else {
        unreachable!("outcome makes an Outcome")
    };
    o.result.refused = true;
    o.result.worker_id = worker.into();
    o.result.error = Some(format!(
        "command `{}` is not on this worker's allowlist (allowed: `url_to_manifest`)",
        spec.command
    ));
    Event::Outcome(o, ack)
}

/// A worker that may not run a step hands it back: the attempt is withdrawn without counting,
/// audited, and dispatched again after a delay for another worker; a duplicate of the refusal
/// is stale; the capable worker's result completes the run with one attempt used.
#[tokio::test(start_paused = true)]
async fn a_refused_attempt_is_handed_back_and_dispatched_again_without_counting() {
    let mut h = Harness::new();
    h.turn([
        advertising("narrow", &["url_to_manifest"]),
        advertising("wide", &["true"]),
    ])
    .await;
    let req = h.backfill(
        serde_json::json!([{"id": "A", "command": "true", "max_attempts": 1}]),
        &["a"],
    );
    let id = req.id;
    let first = h.turn([Event::Submit(Box::new(req), None)]).await;
    let a1 = first.dispatched[0].clone();

    let back = h.turn([refused(&a1, "narrow")]).await;
    assert_eq!(back.kinds(), ["step_handed_back"]);
    let AuditEvent::StepHandedBack {
        worker_id,
        hand_backs,
        next,
        delay_ms,
        ..
    } = &back.records[0]
    else {
        unreachable!()
    };
    assert_eq!(
        (worker_id.as_str(), *hand_backs, next.as_str(), *delay_ms),
        ("narrow", 1, "redispatch", 1000)
    );
    assert!(
        back.dispatched.is_empty(),
        "the re-dispatch waits its delay"
    );
    assert!(
        back.timers
            .iter()
            .any(|(d, e)| *d == Duration::from_secs(1) && e.starts_with("Ready"))
    );
    // The broker redelivered the refusal: stale, nothing changes.
    assert_eq!(
        h.turn([refused(&a1, "narrow")]).await.kinds(),
        ["stale_result"]
    );

    let ready = h.next_event().await;
    let again = h.turn([ready]).await;
    assert_eq!(again.kinds(), ["step_dispatched"]);
    let a1b = again.dispatched[0].clone();
    assert_eq!(a1b.attempt, 1, "a hand-back is not an attempt");
    assert_ne!(a1b.attempt_id, a1.attempt_id);

    let done = h.turn([outcome(&a1b, 0)]).await;
    assert!(done.kinds().contains(&"run_finished"), "{:?}", done.kinds());
    let s = h.summary(id);
    assert_eq!(s.runs[0].state, RunStatus::Complete);
    assert_eq!(s.runs[0].attempts.get("A"), Some(&1), "{:?}", s.runs[0]);
}

/// When no live worker may run a step, a few hand-backs (surviving a coordinator restart in
/// between) escalate the run, naming the step, the command and the refusing workers; nothing
/// halts and nothing loops.
#[tokio::test(start_paused = true)]
async fn a_step_no_live_worker_may_run_escalates_after_bounded_hand_backs() {
    let mut h = Harness::new();
    h.turn([advertising("narrow", &["url_to_manifest"])]).await;
    let req = h.backfill(
        serde_json::json!([{"id": "LOAD", "command": "load-batch"}]),
        &["a"],
    );
    let id = req.id;
    let mut spec = h
        .turn([Event::Submit(Box::new(req), None)])
        .await
        .dispatched[0]
        .clone();
    let limit = crate::fleet::capability::MAX_HAND_BACKS_UNRUNNABLE;
    for n in 1..limit {
        let back = h.turn([refused(&spec, "narrow")]).await;
        assert_eq!(back.kinds(), ["step_handed_back"], "hand-back {n}");
        let next = if n == 2 {
            // The coordinator restarts while the run waits: the next session begins it.
            let restored = h.restart().await;
            h.turn([advertising("narrow", &["url_to_manifest"])]).await;
            restored
        } else {
            let ready = h.next_event().await;
            h.turn([ready]).await
        };
        assert_eq!(next.kinds(), ["step_dispatched"], "after hand-back {n}");
        spec = next.dispatched[0].clone();
        assert_eq!(spec.attempt, 1);
    }
    let last = h.turn([refused(&spec, "narrow")]).await;
    assert_eq!(
        last.kinds(),
        [
            "step_handed_back",
            "step_result",
            "decision",
            "transition",
            "escalated"
        ]
    );
    assert!(last.dispatched.is_empty() && !last.timers.iter().any(|(_, e)| e.starts_with("Ready")));
    let s = h.summary(id);
    assert_eq!(s.runs[0].state, RunStatus::Escalated, "{:?}", s.runs[0]);
    let reason = s.runs[0].reason.clone().unwrap_or_default();
    for needle in [
        "no live worker of pool `default` may run it",
        "step `LOAD`",
        "command `load-batch`",
        "`narrow`",
    ] {
        assert!(reason.contains(needle), "{needle} missing from {reason}");
    }
}

fn through_json<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    serde_json::from_value(serde_json::to_value(v).expect("records serialise")).expect("and load")
}

/// A backfill's stored record holds no run lists (each write of it would be as long as the
/// backfill); a restart rebuilds them from the runs, in partition order, and the runs not
/// started yet start in that order.
#[tokio::test(start_paused = true)]
async fn a_restart_rebuilds_the_run_lists_in_partition_order() {
    let mut h = Harness::new();
    let mut req = h.backfill(
        serde_json::json!([{"id": "A", "command": "true"}]),
        &["a", "b", "c", "d", "e"],
    );
    req.max_parallel = 2;
    let id = req.id;
    h.turn([Event::Submit(Box::new(req), None)]).await;
    let before = h.engine.backfills[&id].rec.clone();
    assert_eq!(before.runs.len(), 5);
    assert_eq!(before.pending.len(), 3);
    let stored = serde_json::to_value(&before).unwrap();
    assert!(
        stored.get("runs").is_none() && stored.get("pending").is_none(),
        "{stored}"
    );

    h.restart().await;
    let after = &h.engine.backfills[&id].rec;
    assert_eq!(after.runs, before.runs, "partition order");
    assert_eq!(
        after.pending, before.pending,
        "the same runs wait, in order"
    );
    assert_eq!(h.engine.backfills[&id].active, 2);
}

/// A submit that names a request id is applied once: the same request again (a client retrying
/// after a 503, also after the coordinator restarted or failed over) gets the same backfill,
/// and the id reused for another request is refused. The key lives in the stored record.
#[tokio::test(start_paused = true)]
async fn a_request_id_is_applied_once_across_restarts() {
    let mut h = Harness::new();
    let keyed = |h: &Harness, digest: &str| {
        let mut req = h.backfill(serde_json::json!([{"id": "A", "command": "true"}]), &["a"]);
        req.request = Some(SubmitKey {
            id: "nightly-2024-05".into(),
            digest: digest.into(),
        });
        req
    };
    let submit = |req: BackfillRequest| {
        let (tx, rx) = oneshot::channel();
        (Event::Submit(Box::new(req), Some(tx)), rx)
    };
    let (event, answer) = submit(keyed(&h, "d1"));
    let first = h.turn([event]).await;
    let id = answer.await.unwrap().expect("a new request is applied").id;
    assert_eq!(first.kinds()[0], "backfill_created");

    // The key survives the store's JSON, as PostgreSQL keeps the record.
    let stored: BackfillRecord =
        serde_json::from_value(serde_json::to_value(&h.engine.backfills[&id].rec).unwrap())
            .unwrap();
    assert_eq!(stored.request, h.engine.backfills[&id].rec.request);
    h.restart().await;

    let (event, answer) = submit(keyed(&h, "d1"));
    let again = h.turn([event]).await;
    assert_eq!(
        answer.await.unwrap().map(|s| s.id),
        Ok(id),
        "the same request gets its backfill"
    );
    assert!(
        !again.kinds().contains(&"backfill_created"),
        "{:?}",
        again.kinds()
    );
    assert_eq!(h.engine.backfills.len(), 1);

    let (event, answer) = submit(keyed(&h, "d2"));
    let other = h.turn([event]).await;
    let conflict = answer
        .await
        .unwrap()
        .expect_err("another request under the same id");
    let SubmitRefused::Conflict(conflict) = conflict else {
        panic!("a conflict: {conflict}");
    };
    assert_eq!(conflict.backfill_id, id);
    assert!(conflict.to_string().contains("use a new id"), "{conflict}");
    assert!(other.records.is_empty(), "{:?}", other.kinds());
    assert_eq!(h.engine.backfills.len(), 1);
}

/// Rate, elapsed time and ETA come from the stored submit and finish times, so a restarted
/// coordinator (or a client that attached late) reports the same figures, and a finished
/// backfill's elapsed time stops growing.
#[tokio::test(start_paused = true)]
async fn rates_come_from_stored_timestamps_across_a_restart() {
    let mut h = Harness::new();
    let mut req = h.backfill(
        serde_json::json!([{"id": "A", "command": "true"}]),
        &["a", "b"],
    );
    req.max_parallel = 1;
    let id = req.id;
    let first = h.turn([Event::Submit(Box::new(req), None)]).await;
    let a = first.dispatched[0].clone();
    let next = h.turn([outcome(&a, 0)]).await;
    let b = next.dispatched[0].clone();
    // As if it had been submitted ten minutes ago: one of two runs done in ten minutes.
    let ten_minutes_ago = chrono::Utc::now() - chrono::Duration::minutes(10);
    h.engine.backfills.get_mut(&id).unwrap().rec.created_at = ten_minutes_ago;

    h.restart().await;
    let s = h.summary(id);
    assert_eq!(s.submitted_at, ten_minutes_ago);
    assert!(
        s.wall_ms >= 600_000,
        "elapsed restarted from the restore: {}",
        s.wall_ms
    );
    assert!(
        (0.09..=0.11).contains(&s.runs_per_minute),
        "1 run in 10 min, not since the restore: {}",
        s.runs_per_minute
    );
    let eta = s.eta_s.expect("one run left");
    assert!(
        (540..=660).contains(&eta),
        "ETA for the last run at that rate: {eta}"
    );
    assert!(s.finished_at.is_none());

    h.turn([outcome(&b, 0)]).await;
    let done = h.summary(id);
    let finished_at = done.finished_at.expect("finished");
    assert_eq!(
        done.wall_ms,
        (finished_at - ten_minutes_ago).num_milliseconds() as u64,
        "elapsed ends at the last run's end"
    );
    assert_eq!(done.eta_s, None);
    assert_eq!(
        h.summary(id).wall_ms,
        done.wall_ms,
        "a finished backfill's clock stops"
    );
}

/// An audit log whose commits after the first `open` wait until the test lets them through.
struct Gated {
    log: AuditLog,
    open: Arc<tokio::sync::Semaphore>,
}

impl Store for Gated {
    fn record(
        &mut self,
        backfill_id: Option<Uuid>,
        run_id: Option<Uuid>,
        event: AuditEvent,
    ) -> AuditRecord {
        self.log.stage(backfill_id, run_id, event)
    }

    fn commit<'a>(&'a mut self, _: crate::engine::Staged<'a>) -> crate::engine::StoreFuture<'a> {
        Box::pin(async move {
            self.open.acquire().await?.forget();
            self.log.commit()
        })
    }

    fn audit_location(&self) -> (String, String) {
        (
            self.log.path().display().to_string(),
            self.log.head().to_string(),
        )
    }
}

/// A read at the head of the queue is answered from the committed state at once, even when
/// the turn that follows it cannot commit; a read that comes while a turn fills waits for
/// that turn's commit only, not for the events queued after it.
#[tokio::test]
async fn reads_are_answered_without_waiting_for_the_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let open = Arc::new(tokio::sync::Semaphore::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = Engine::new(
        EngineConfig {
            exit_when_idle: false,
            retention: None,
        },
        Arc::new(RulesAgent),
        Box::new(Gated {
            log: AuditLog::open(dir.path().join("audit.jsonl")).unwrap(),
            open: open.clone(),
        }),
        Box::new(Nowhere),
        Box::new(Quiet),
        tx.clone(),
    );
    let status = |tx: &mpsc::UnboundedSender<Event>, id| {
        let (reply, answer) = oneshot::channel();
        tx.send(Event::Operator(
            OperatorCommand::Status {
                backfill_id: Some(id),
                runs: RunsShown::All,
            },
            reply,
        ))
        .unwrap();
        answer
    };
    let first = backfill(dir.path());
    let a = first.id;
    // The loop's first commit (of nothing) and the submit's go through.
    tx.send(Event::Submit(Box::new(first), None)).unwrap();
    open.add_permits(2);
    let task = tokio::spawn(async move {
        let _ = engine.run(&mut rx).await;
    });
    let known = status(&tx, a);
    let s = tokio::time::timeout(Duration::from_secs(10), known)
        .await
        .expect("the first status is answered")
        .unwrap()
        .unwrap();
    assert!(matches!(s, OperatorAnswer::Summary(s) if s.backfill_id == a));

    // A status ahead of a submit whose commit is held: answered at once, from what was
    // committed (the held backfill is not in it yet).
    let mut held = backfill(dir.path());
    held.partitions[0].dataset = Some("b".into());
    let b = held.id;
    let early = status(&tx, a);
    tx.send(Event::Submit(Box::new(held), None)).unwrap();
    let late = status(&tx, b);
    let s = tokio::time::timeout(Duration::from_secs(10), early)
        .await
        .expect("a read is not held behind a commit")
        .unwrap()
        .unwrap();
    assert!(matches!(s, OperatorAnswer::Summary(s) if s.backfill_id == a));
    // The status behind the held submit waits for its commit, then sees it.
    let mut late = late;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut late)
            .await
            .is_err(),
        "a read behind an uncommitted submit was answered before the commit"
    );
    open.add_permits(1);
    let s = tokio::time::timeout(Duration::from_secs(10), late)
        .await
        .expect("answered once the submit committed")
        .unwrap()
        .unwrap();
    assert!(matches!(s, OperatorAnswer::Summary(s) if s.backfill_id == b));
    task.abort();
}
