//! A submit's reprocess mode ([`crate::reprocess`]) applied against the backfills this engine
//! holds: in fleet mode every backfill ever submitted to the schema, restored from PostgreSQL,
//! so "earlier" means the coordinator's whole history, and a partition a live backfill is
//! still working on is never started twice.

use uuid::Uuid;
use warpline_shared::audit::AuditEvent;
use warpline_shared::machine::RunState;

use super::{BackfillRequest, Engine, OperatorAnswer, OperatorError, SubmitRefused, Submitted};
use crate::reprocess::{self, Reprocess};

impl Engine {
    /// Submits `req` with the partitions its reprocess mode keeps; refuses it when none is left.
    pub(super) fn submit_reprocessed(
        &mut self,
        mut req: BackfillRequest,
    ) -> Result<Submitted, SubmitRefused> {
        let name = req.pipeline.name().to_string();
        let earlier = reprocess::earlier(
            self.order
                .iter()
                .filter(|id| self.backfills[id].rec.pipeline == name)
                .flat_map(|id| self.backfills[id].rec.runs.iter())
                .map(|run_id| {
                    let r = &self.runs[run_id];
                    // A run not final is still driven by this coordinator (an escalated one
                    // waits for an operator): it is in progress.
                    let live = !matches!(r.machine.state(), RunState::Complete)
                        && !r.machine.state().is_final();
                    (r.partition.key(), r.machine.state().status(), live)
                }),
        );
        let mode = req.reprocess;
        let (kept, skipped) =
            reprocess::select(std::mem::take(&mut req.partitions), &earlier, mode);
        if kept.is_empty() {
            return Err(SubmitRefused::NothingToRun(skipped.describe(mode)));
        }
        req.partitions = kept;
        let runs = req.partitions.len();
        let id = self.submit(req);
        Ok(Submitted { id, runs, skipped })
    }
}

impl Engine {
    /// An operator's reprocess of backfill `of`: a new backfill of its pipeline, as submitted,
    /// over its partitions in their order, with its parallelism and priority, keeping the
    /// partitions `mode` keeps. Audited in `of`'s log (who, the mode, the new backfill).
    pub(super) fn reprocess(
        &mut self,
        of: Uuid,
        mode: Reprocess,
        operator: String,
    ) -> Result<OperatorAnswer, OperatorError> {
        let b = self
            .backfills
            .get(&of)
            .ok_or(OperatorError::UnknownBackfill(of))?;
        let partitions = b
            .rec
            .runs
            .iter()
            .map(|id| &self.runs[id])
            .filter(|r| r.scope.is_partition())
            .map(|r| r.partition.clone())
            .collect();
        let req = BackfillRequest {
            id: Uuid::now_v7(),
            pipeline: b.pipeline.clone(),
            partitions,
            max_parallel: b.rec.max_parallel,
            priority: b.rec.priority,
            request: None,
            reprocess: mode,
        };
        let submitted = self
            .submit_reprocessed(req)
            .map_err(|e| OperatorError::Refused(e.to_string()))?;
        let reason = if submitted.skipped.is_empty() {
            format!(
                "backfill {} runs its {} partition(s) again (reprocess `{}`)",
                submitted.id,
                submitted.runs,
                mode.as_str()
            )
        } else {
            format!(
                "backfill {} runs {} of its partitions again; {}",
                submitted.id,
                submitted.runs,
                submitted.skipped.describe(mode)
            )
        };
        self.record(
            Some(of),
            None,
            AuditEvent::BackfillResolution {
                operator,
                action: "reprocess".into(),
                reason,
            },
        );
        Ok(OperatorAnswer::Reprocessed {
            backfill_id: submitted.id,
            reprocess_of: of,
            runs: submitted.runs,
            skipped: submitted.skipped,
        })
    }
}

#[cfg(test)]
mod tests {
    use warpline_shared::machine::RunStatus;

    use super::super::tests::{Harness, outcome};
    use super::super::{Event, SubmitRefused};
    use super::*;
    use crate::reprocess::Reprocess;

    /// Earlier backfills of the same pipeline decide what a new one runs: `missing` skips every
    /// partition run before, `failed` reruns the halted one, none starts a partition a live
    /// backfill still runs, and with nothing left the submit is refused.
    #[tokio::test(start_paused = true)]
    async fn a_submit_runs_the_partitions_its_reprocess_mode_keeps() {
        let mut h = Harness::new();
        let steps = serde_json::json!([{"id": "A", "command": "true", "max_attempts": 1}]);
        let first = h.backfill(steps.clone(), &["ok", "bad", "slow"]);
        let t = h.turn([Event::Submit(Box::new(first), None)]).await;
        let specs = t.dispatched;
        h.turn([outcome(&specs[0], 0), outcome(&specs[1], 2)]).await;
        let submit = |h: &Harness, mode: Reprocess, parts: &[&str]| {
            let mut req = h.backfill(steps.clone(), parts);
            req.reprocess = mode;
            req
        };
        let keys = |h: &Harness, s: &Submitted| -> Vec<String> {
            h.engine.backfills[&s.id]
                .rec
                .runs
                .iter()
                .map(|r| h.engine.runs[r].partition.key())
                .collect()
        };
        let all = ["ok", "bad", "slow", "new"];
        let missing = h
            .engine
            .submit_reprocessed(submit(&h, Reprocess::Missing, &all))
            .unwrap();
        assert_eq!(keys(&h, &missing), ["new"]);
        assert_eq!(
            missing.skipped,
            reprocess::Skipped {
                complete: 1,
                failed: 1,
                in_progress: 1
            }
        );
        let failed = h
            .engine
            .submit_reprocessed(submit(&h, Reprocess::Failed, &all[..3]))
            .unwrap();
        assert_eq!(keys(&h, &failed), ["bad"]);
        let every = h
            .engine
            .submit_reprocessed(submit(&h, Reprocess::All, &all[..3]))
            .unwrap();
        assert_eq!(keys(&h, &every), ["ok"], "`bad` and `slow` are running now");
        let none = h
            .engine
            .submit_reprocessed(submit(&h, Reprocess::Missing, &["ok"]))
            .unwrap_err();
        assert!(
            matches!(&none, SubmitRefused::NothingToRun(why) if why.contains("1 completed before")),
            "{none}"
        );
        let s = h.summary(failed.id);
        assert_eq!(s.counts.get(&RunStatus::Running), Some(&1));
    }

    /// An operator's reprocess runs a backfill's pipeline again over its partitions with its
    /// parallelism and priority, keeps what the mode keeps, is audited in the backfill's log
    /// with who asked, and is refused (changing nothing) when no partition is left to run.
    #[tokio::test(start_paused = true)]
    async fn an_operator_reprocess_runs_a_backfill_again_as_the_mode_chooses() {
        let mut h = Harness::new();
        let steps = serde_json::json!([{"id": "A", "command": "true", "max_attempts": 1}]);
        let mut first = h.backfill(steps, &["ok", "bad", "slow"]);
        first.max_parallel = 3;
        first.priority = 7;
        let of = first.id;
        let t = h.turn([Event::Submit(Box::new(first), None)]).await;
        let specs = t.dispatched;
        h.turn([outcome(&specs[0], 0), outcome(&specs[1], 2)]).await;
        let ask = |mode| super::super::OperatorCommand::Reprocess {
            backfill_id: of,
            mode,
            operator: "ana".into(),
        };
        let answer = h.engine.on_operator(ask(Reprocess::Failed)).unwrap();
        let OperatorAnswer::Reprocessed {
            backfill_id,
            reprocess_of,
            runs,
            skipped,
        } = answer
        else {
            panic!("not a reprocess answer: {answer:?}");
        };
        assert_eq!((reprocess_of, runs), (of, 1));
        assert_eq!(
            skipped,
            reprocess::Skipped {
                complete: 1,
                failed: 0,
                in_progress: 1
            }
        );
        let new = &h.engine.backfills[&backfill_id];
        assert_eq!((new.rec.max_parallel, new.rec.priority), (3, 7));
        let parts: Vec<String> = new
            .rec
            .runs
            .iter()
            .map(|r| h.engine.runs[r].partition.key())
            .collect();
        assert_eq!(parts, ["bad"]);
        let t = h.commit().await;
        let audited = t.records.iter().find_map(|r| match r {
            AuditEvent::BackfillResolution {
                operator,
                action,
                reason,
            } if action == "reprocess" => Some((operator.clone(), reason.clone())),
            _ => None,
        });
        let (who, why) = audited.expect("the reprocess is audited");
        assert_eq!(who, "ana");
        assert!(why.contains(&backfill_id.to_string()), "{why}");
        assert_eq!(t.dispatched.len(), 1, "the new backfill's run starts");

        // `bad` runs again now, `ok` completed, `slow` still runs: nothing is left to run.
        let backfills = h.engine.order.len();
        let refused = h.engine.on_operator(ask(Reprocess::Failed)).unwrap_err();
        assert!(
            matches!(&refused, OperatorError::Refused(why) if why.contains("nothing to run")),
            "{refused}"
        );
        assert_eq!(h.engine.order.len(), backfills, "a refusal starts nothing");
        let unknown = Uuid::now_v7();
        let missing = h
            .engine
            .on_operator(super::super::OperatorCommand::Reprocess {
                backfill_id: unknown,
                mode: Reprocess::All,
                operator: "ana".into(),
            });
        assert_eq!(
            missing.unwrap_err(),
            OperatorError::UnknownBackfill(unknown)
        );
    }
}
