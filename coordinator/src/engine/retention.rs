//! Retention (fleet mode, `warpline serve --retention-days N`): a backfill that is finished —
//! every run final (complete, halted or cancelled), no escalation open, no after-run waiting
//! for an operator — and whose last run ended longer than the retention ago is *forgotten*:
//! dropped from the engine's memory in one turn, and its rows deleted by the store once that
//! turn has committed ([`Store::stage_prune`]; PostgreSQL deletes them in bounded batches, off
//! the loop). The tick looks every [`PRUNE_EVERY`]; with no retention it never does.
//!
//! What stays: the JSONL audit log. It mirrors the database's whole chain, so it already holds
//! every line that is deleted, and pruning never rewrites it: `warpline audit verify` still
//! verifies it and `warpline audit show` still prints each of its runs' story; the chain
//! also says it was pruned, in a `backfill_pruned` record (which the database keeps too). What goes: the
//! backfill in the API, the dashboard and the metrics; its partitions in `--reprocess` (they
//! count as never run); and its submit's request id (a repeat of that submit makes a new
//! backfill).
//!
//! [`Store::stage_prune`]: super::Store::stage_prune

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use uuid::Uuid;
use warpline_shared::audit::AuditEvent;
use warpline_shared::machine::RunStatus;

use super::{Backfill, Engine};

/// How often the tick looks for backfills past their retention.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Engine {
    /// From the tick: forgets the backfills past their retention, at most once per
    /// [`PRUNE_EVERY`] (the first tick of a session looks at once).
    pub(super) fn prune_when_due(&mut self, now: Instant) {
        if self.cfg.retention.is_none()
            || self
                .pruned_at
                .is_some_and(|t| now.duration_since(t) < PRUNE_EVERY)
        {
            return;
        }
        self.pruned_at = Some(now);
        self.prune_expired(Utc::now());
    }

    /// The backfills that are finished and whose last run ended before `now` minus the
    /// retention, in submission order (none without a retention).
    pub fn expired(&self, now: DateTime<Utc>) -> Vec<Uuid> {
        let Some(cutoff) = self
            .cfg
            .retention
            .and_then(|keep| chrono::Duration::from_std(keep).ok())
            .and_then(|keep| now.checked_sub_signed(keep))
        else {
            return Vec::new();
        };
        self.order
            .iter()
            .copied()
            .filter(|id| {
                let b = &self.backfills[id];
                self.finished(b) && self.ended_at(b).is_some_and(|t| t < cutoff)
            })
            .collect()
    }

    /// Forgets every backfill [`Engine::expired`] names at `now`, and stages their deletion in
    /// the store; returns them.
    pub fn prune_expired(&mut self, now: DateTime<Utc>) -> Vec<Uuid> {
        let expired = self.expired(now);
        for id in &expired {
            self.forget(*id);
        }
        expired
    }

    /// True when the engine holds the backfill (it was neither pruned nor never known).
    pub fn holds(&self, backfill_id: Uuid) -> bool {
        self.backfills.contains_key(&backfill_id)
    }

    /// How many runs the engine holds, of every backfill.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Every run final, and nothing waiting for an operator: no open escalation, no after-run
    /// held back. (A cancel in progress has runs not final yet.)
    fn finished(&self, b: &Backfill) -> bool {
        b.rec.escalated.is_none()
            && !b.rec.after_blocked
            && b.rec.runs.iter().all(|r| {
                self.runs
                    .get(r)
                    .is_some_and(|r| r.machine.state().is_final())
            })
    }

    /// When the backfill's last run ended (its creation when it has none); `None` when a run
    /// has no end time, which keeps it.
    fn ended_at(&self, b: &Backfill) -> Option<DateTime<Utc>> {
        b.rec
            .runs
            .iter()
            .map(|r| self.runs.get(r).and_then(|r| r.finished_at))
            .try_fold(b.rec.created_at, |last, t| t.map(|t| last.max(t)))
    }

    /// Drops a backfill and everything kept by its id or its runs' ids, and stages the
    /// deletion of its rows.
    fn forget(&mut self, id: Uuid) {
        let Some(b) = self.backfills.remove(&id) else {
            return;
        };
        let ended_at = self.ended_at(&b);
        self.order.retain(|o| *o != id);
        self.dirty_backfills.remove(&id);
        if self.snapshots.is_some() {
            self.forgotten.push(id);
        }
        let runs: HashSet<Uuid> = b.rec.runs.iter().copied().collect();
        let mut counts: BTreeMap<RunStatus, usize> = BTreeMap::new();
        for run_id in &b.rec.runs {
            if let Some(run) = self.runs.remove(run_id) {
                *counts.entry(run.machine.state().status()).or_default() += 1;
            }
            self.dirty_runs.remove(run_id);
        }
        // A final run waits for no step cap, so the queues hold none of them; cleared anyway,
        // so that nothing names a run the engine no longer has. (Nor does it have an attempt
        // out: `seen` and `inflight` count only outstanding attempts.)
        for queue in self.waiting.values_mut() {
            queue.retain(|r| !runs.contains(r));
        }
        let count = |s: RunStatus| counts.get(&s).copied().unwrap_or(0);
        // Said in the chain, after every line it deletes: the file tells why the database no
        // longer has them, and the database's last line is always one it keeps (a restart
        // checks the file against it).
        self.record(
            Some(id),
            None,
            AuditEvent::BackfillPruned {
                pipeline: b.rec.pipeline.clone(),
                runs: b.rec.runs.len(),
                complete: count(RunStatus::Complete),
                halted: count(RunStatus::Halted),
                cancelled: count(RunStatus::Cancelled),
                ended_at,
                retention_s: self.cfg.retention.map(|d| d.as_secs()).unwrap_or(0),
            },
        );
        self.store.stage_prune(id);
        self.observer.forget(id, &b.rec.runs);
        tracing::info!(
            backfill_id = %id,
            pipeline = %b.rec.pipeline,
            runs = b.rec.runs.len(),
            complete = count(RunStatus::Complete),
            halted = count(RunStatus::Halted),
            cancelled = count(RunStatus::Cancelled),
            ended_at = ?ended_at,
            "forgot a finished backfill past its retention; the store deletes its rows next"
        );
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::super::tests::{Harness, outcome};
    use super::super::{Event, OperatorCommand};
    use super::*;

    /// Only a finished backfill past its retention is forgotten: not one still within it, not
    /// one whose run waits for an operator, not one whose cancel waits for a running step. Its
    /// pruning is audited, and nothing the engine keeps names it or its runs afterwards.
    #[tokio::test(start_paused = true)]
    async fn only_finished_backfills_past_their_retention_are_forgotten() {
        let mut h = Harness::new();
        h.engine.cfg.retention = Some(Duration::from_secs(30 * 24 * 3600));
        let steps = serde_json::json!([{"id": "A", "command": "true", "max_attempts": 1}]);
        let done = h.backfill(steps.clone(), &["a", "b"]);
        let parked = h.backfill(steps.clone(), &["c"]);
        let cancelling = h.backfill(steps, &["d"]);
        let (done_id, parked_id, cancelling_id) = (done.id, parked.id, cancelling.id);
        let t = h
            .turn([done, parked, cancelling].map(|b| Event::Submit(Box::new(b), None)))
            .await;
        let spec = |bid: Uuid| {
            t.dispatched
                .iter()
                .find(|s| h.engine.runs[&s.run_id].backfill_id == bid)
                .unwrap()
                .clone()
        };
        let parked_spec = spec(parked_id);
        let done_specs: Vec<_> = t
            .dispatched
            .iter()
            .filter(|s| h.engine.runs[&s.run_id].backfill_id == done_id)
            .cloned()
            .collect();
        let (reply, _answer) = oneshot::channel();
        let cancel = OperatorCommand::Cancel {
            backfill_id: cancelling_id,
            operator: "ops".into(),
        };
        h.turn([
            outcome(&done_specs[0], 0),
            outcome(&done_specs[1], 0),
            // Unclassified: the rules escalate it.
            outcome(&parked_spec, 1),
            Event::Operator(cancel, reply),
        ])
        .await;
        let b = &h.engine.backfills[&cancelling_id].rec;
        assert!(b.cancelling);
        assert!(
            !h.engine.runs[&b.runs[0]].machine.state().is_final(),
            "its step still runs"
        );

        let now = Utc::now();
        assert!(h.engine.expired(now).is_empty());
        assert!(
            h.engine
                .expired(now + chrono::Duration::days(29))
                .is_empty()
        );
        let later = now + chrono::Duration::days(31);
        assert_eq!(h.engine.expired(later), [done_id]);
        let done_runs = h.engine.backfills[&done_id].rec.runs.clone();
        assert_eq!(h.engine.prune_expired(later), [done_id]);
        let t = h.commit().await;
        assert_eq!(t.kinds(), ["backfill_pruned"]);
        assert!(matches!(
            &t.records[0],
            AuditEvent::BackfillPruned {
                runs: 2,
                complete: 2,
                halted: 0,
                cancelled: 0,
                ..
            }
        ));
        assert!(!h.engine.holds(done_id));
        assert!(!h.engine.order.contains(&done_id));
        assert!(done_runs.iter().all(|r| !h.engine.runs.contains_key(r)));
        assert!(h.engine.holds(parked_id) && h.engine.holds(cancelling_id));
        assert_eq!(h.engine.run_count(), 2);
        // Nothing is left to prune.
        assert!(h.engine.prune_expired(later).is_empty());
    }
}
