//! A submit's reprocess mode ([`crate::reprocess`]) applied against the backfills this engine
//! holds: in fleet mode every backfill ever submitted to the schema, restored from PostgreSQL,
//! so "earlier" means the coordinator's whole history, and a partition a live backfill is
//! still working on is never started twice.

use warpline_shared::machine::RunState;

use super::{BackfillRequest, Engine, SubmitRefused, Submitted};
use crate::reprocess;

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
}
