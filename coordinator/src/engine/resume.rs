//! Local resume: a backfill rebuilt from its audit log ([`crate::resume::replay`]) put back
//! into the loop. Unlike a fleet restore, nothing is awaited from a worker: the process that
//! ran the earlier attempts is gone, so an attempt it left outstanding is declared lost (the
//! supervisor then decides, as for any lost attempt), and runs a signal cancelled are taken up
//! where they stopped.

use std::sync::Arc;

use uuid::Uuid;
use warpline_shared::audit::AuditEvent;
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::Action;
use warpline_shared::machine::RunState;

use super::{Backfill, BackfillRecord, Engine, RunRecord};

impl Engine {
    /// Puts a replayed backfill back: `interrupted` runs (cancelled by a signal) are reopened,
    /// outstanding attempts declared lost, awaited decisions asked again, runs between
    /// attempts begun, runs not started queued. HALTED and ESCALATED runs are left to the
    /// operator commands that follow (retry-failed, resolve). The resume itself is audited
    /// under `operator`.
    pub fn resume(
        &mut self,
        rec: BackfillRecord,
        pipeline: Arc<Pipeline>,
        runs: Vec<RunRecord>,
        interrupted: &[Uuid],
        operator: &str,
    ) {
        let id = rec.id;
        let complete = runs
            .iter()
            .filter(|r| r.machine.state() == RunState::Complete)
            .count();
        let ids: Vec<Uuid> = rec.runs.clone();
        for r in runs {
            self.runs.insert(r.id, r);
        }
        let active = ids
            .iter()
            .filter(|r| matches!(self.runs[r].machine.state(), RunState::Running(_)))
            .count();
        self.backfills
            .insert(id, Backfill::new(rec, pipeline, active));
        self.index_runs(id);
        self.order.push(id);
        self.dirty_backfills.insert(id);
        self.record(
            Some(id),
            None,
            AuditEvent::BackfillResolution {
                operator: operator.to_string(),
                action: "resume".into(),
                reason: format!(
                    "resumed from the audit log by `warpline run --resume`: {complete} complete runs are skipped, {} runs in flight or interrupted are taken up",
                    active
                ),
            },
        );
        for run_id in ids {
            let run = self.runs.get_mut(&run_id).expect("the backfill's run");
            if interrupted.contains(&run_id) {
                run.reason = None;
                run.finished_at = None;
                let to = run.machine.state_name();
                self.record_run(
                    run_id,
                    AuditEvent::Transition {
                        from: "CANCELLED".into(),
                        to,
                        action: Some(Action::Retry),
                    },
                );
            }
            let run = &self.runs[&run_id];
            if !matches!(run.machine.state(), RunState::Running(_)) {
                continue;
            }
            if let Some(a) = run.machine.outstanding() {
                let step = self.pipeline_of(run_id).steps()[a.step].clone();
                *self
                    .inflight
                    .entry((self.pipeline_of(run_id).name().to_string(), step.id))
                    .or_insert(0) += 1;
                self.declare_lost(
                    run_id,
                    a.attempt_id,
                    "in flight when the earlier `warpline run` process stopped (taken up by --resume)"
                        .into(),
                );
            } else if run.machine.deciding().is_some() {
                if let Some(outcome) = run.last.clone() {
                    self.ask(run_id, *outcome);
                }
            } else {
                self.begin(run_id, 0);
            }
        }
        self.fill();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use warpline_shared::contracts::StepSpec;
    use warpline_shared::machine::RunState;

    use super::super::tests::{Harness, Turn, outcome};
    use super::super::{Event, OperatorCommand};

    /// Drives an engine through every kind of move (retries, a hand-back, a halt and
    /// retry-failed, an escalation and its answer, an attempt left in flight), then rebuilds
    /// the backfill from its audit log alone: every run's machine, attempt counts, history,
    /// warnings and reason are the engine's own. Resuming it declares the attempt in flight
    /// lost, and the run goes on.
    #[tokio::test(start_paused = true)]
    async fn a_backfill_replayed_from_its_audit_log_is_the_engines_and_resumes() {
        let mut h = Harness::new();
        let req = h.backfill(
            serde_json::json!([
                {"id": "A", "command": "true", "max_attempts": 2},
                {"id": "B", "command": "true", "max_attempts": 1},
                {"id": "C", "command": "true"}
            ]),
            &["done", "halts", "escalates", "flying"],
        );
        let (id, pipeline) = (req.id, req.pipeline.clone());
        let mut specs: HashMap<String, StepSpec> = HashMap::new();
        // The latest StepSpec of each run, by partition.
        fn keep(h: &Harness, specs: &mut HashMap<String, StepSpec>, turn: Turn) {
            for s in turn.dispatched {
                specs.insert(h.engine.runs[&s.run_id].partition.key(), s);
            }
        }
        let t = h.turn([Event::Submit(Box::new(req), None)]).await;
        keep(&h, &mut specs, t);
        assert_eq!(specs.len(), 4);
        // `done`: handed back once, then A fails transiently and is retried, then passes.
        let mut back = match outcome(&specs["done"], -1) {
            Event::Outcome(o, a) => (o, a),
            _ => unreachable!(),
        };
        back.0.result.refused = true;
        back.0.result.worker_id = "narrow".into();
        h.turn([Event::Outcome(back.0, back.1)]).await;
        let ready = h.next_event().await;
        let t = h.turn([ready]).await;
        keep(&h, &mut specs, t);
        let t = h.turn([outcome(&specs["done"], 75)]).await;
        keep(&h, &mut specs, t);
        let ready = h.next_event().await;
        let t = h.turn([ready]).await;
        keep(&h, &mut specs, t);
        for name in ["done", "done", "done"] {
            let t = h.turn([outcome(&specs[name], 0)]).await;
            keep(&h, &mut specs, t);
        }
        // `halts`: A passes, B fails transiently with no attempt left: halted; retry-failed
        // resumes it at B, which passes.
        let t = h.turn([outcome(&specs["halts"], 0)]).await;
        keep(&h, &mut specs, t);
        h.turn([outcome(&specs["halts"], 75)]).await;
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let retry = OperatorCommand::RetryFailed {
            backfill_id: id,
            operator: "alice".into(),
        };
        let t = h.turn([Event::Operator(retry, tx)]).await;
        assert_eq!(
            t.dispatched.len(),
            1,
            "retry-failed resumed `halts`: {:?}",
            t.kinds()
        );
        keep(&h, &mut specs, t);
        for _ in 0..2 {
            let t = h.turn([outcome(&specs["halts"], 0)]).await;
            keep(&h, &mut specs, t);
        }
        // `escalates`: an unclassified failure escalates; the operator answers retry, and
        // the retry fails the same way.
        h.turn([outcome(&specs["escalates"], 3)]).await;
        let esc = h.engine.backfills[&id].rec.runs[2];
        assert!(matches!(
            h.engine.runs[&esc].machine.state(),
            RunState::Escalated(0)
        ));
        let (tx, _rx2) = tokio::sync::oneshot::channel();
        let resolve = OperatorCommand::Resolve {
            run_id: esc,
            action: warpline_shared::contracts::Action::Retry,
            reason: "try again".into(),
            operator: "alice".into(),
        };
        h.turn([Event::Operator(resolve, tx)]).await;
        let ready = h.next_event().await;
        let t = h.turn([ready]).await;
        keep(&h, &mut specs, t);
        h.turn([outcome(&specs["escalates"], 3)]).await;
        // `flying`: A and B pass, C is left in flight.
        for _ in 0..2 {
            let t = h.turn([outcome(&specs["flying"], 0)]).await;
            keep(&h, &mut specs, t);
        }

        let records = crate::resume::read_log(&h.dir.path().join("audit.jsonl")).unwrap();
        let replayed = crate::resume::replay(&records, id, &pipeline).unwrap();
        crate::resume::check_unchanged(&replayed, &pipeline).unwrap();
        assert_eq!(replayed.backfill.runs, h.engine.backfills[&id].rec.runs);
        assert!(replayed.interrupted.is_empty());
        for r in &replayed.runs {
            let theirs = &h.engine.runs[&r.id];
            let key = r.partition.key();
            assert_eq!(r.machine, theirs.machine, "{key}");
            assert_eq!(r.attempts_total, theirs.attempts_total, "{key}");
            assert_eq!(r.history, theirs.history, "{key}");
            assert_eq!(r.warnings, theirs.warnings, "{key}");
            assert_eq!(r.reason, theirs.reason, "{key}");
        }
        let states: Vec<String> = replayed
            .runs
            .iter()
            .map(|r| r.machine.state_name())
            .collect();
        assert_eq!(states, ["COMPLETE", "COMPLETE", "ESCALATED", "C"]);

        // A new process resumes it: the attempt in flight is declared lost and retried; the
        // complete runs dispatch nothing.
        let flying = replayed.runs[3].id;
        let mut h2 = Harness::new();
        h2.engine.resume(
            replayed.backfill,
            pipeline.clone(),
            replayed.runs,
            &replayed.interrupted,
            "bob",
        );
        let t = h2.commit().await;
        assert_eq!(
            t.kinds(),
            [
                "backfill_resolution",
                "attempt_lost",
                "step_result",
                "decision",
                "transition"
            ]
        );
        let ready = h2.next_event().await;
        let t = h2.turn([ready]).await;
        assert_eq!(t.dispatched.len(), 1);
        let b = &t.dispatched[0];
        assert_eq!((b.run_id, b.step_id.as_str(), b.attempt), (flying, "C", 2));
        assert!(
            b.log_dir.ends_with("/C-2"),
            "a new attempt gets a new directory: {}",
            b.log_dir
        );
    }
}
