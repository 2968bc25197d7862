//! Backfill-level runs (see [`warpline_shared::stage`]): the before-run starts first and the
//! partitions only once it completed; a per-dataset after-run starts once its dataset's
//! partitions ended, the backfill's after-run once every partition and per-dataset after-run
//! did. When the runs an after-run waits for ended but did not all complete, and its steps do
//! not `allow_partial`, the backfill is escalated instead: `retry-failed` resumes the halted
//! runs (their completion then starts it), `resolve --action continue` runs it on what
//! completed, `cancel` ends the backfill. A before-run that halts escalates the backfill too.

use uuid::Uuid;
use warpline_shared::audit::AuditEvent;
use warpline_shared::machine::RunState;
use warpline_shared::stage::RunScope;

use super::{Backfill, Engine};

/// Whether a backfill-level run may start.
enum Gate {
    /// Its turn came.
    Open,
    /// Runs it waits for have not ended.
    Wait,
    /// They ended, some did not complete, and its steps do not allow that: why.
    Blocked(String),
}

impl Engine {
    /// True when the backfill's partitions may start: it has no before-run, or it completed.
    pub(super) fn before_done(&self, b: &Backfill) -> bool {
        b.rec
            .runs
            .first()
            .and_then(|id| self.runs.get(id))
            .is_none_or(|r| r.scope != RunScope::Before || r.machine.state() == RunState::Complete)
    }

    /// Indexes a backfill's runs once they are known: which are backfill-level ones, its
    /// datasets, and its tally, counted from scratch.
    pub(super) fn index_runs(&mut self, bid: Uuid) {
        let Some(b) = self.backfills.get(&bid) else {
            return;
        };
        let mut stage_runs = Vec::new();
        let mut datasets: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for id in &b.rec.runs {
            let Some(r) = self.runs.get(id) else {
                continue;
            };
            if !r.scope.is_partition() {
                stage_runs.push(*id);
            }
            if let Some(d) = &r.partition.dataset
                && seen.insert(d.as_str())
            {
                datasets.push(d.clone());
            }
        }
        if let Some(b) = self.backfills.get_mut(&bid) {
            b.stage_runs = stage_runs;
            b.datasets = datasets;
        }
        self.recount(bid);
    }

    /// Starts the backfill-level runs whose turn came, and escalates the backfill when one
    /// cannot go on without an operator. Called whenever a run of the backfill ends.
    pub(super) fn advance_stages(&mut self, bid: Uuid) {
        let Some(b) = self.backfills.get(&bid) else {
            return;
        };
        if self.stopping || b.rec.cancelling || b.rec.escalated.is_some() {
            return;
        }
        // A pipeline without backfill-level steps has nothing to do here, at any size.
        if b.stage_runs.is_empty() {
            return;
        }
        for run_id in b.stage_runs.clone() {
            let run = &self.runs[&run_id];
            let state = run.machine.state();
            if run.scope == RunScope::Before && state.is_final() && state != RunState::Complete {
                let reason = format!(
                    "the before-steps did not complete ({}): no partition starts until an operator answers `warpline retry-failed {bid}` (after fixing the cause) or `warpline cancel {bid}`",
                    run.reason.as_deref().unwrap_or("halted")
                );
                return self.escalate_stage(bid, run_id, "before-steps halted", reason, false);
            }
            if state != RunState::Init {
                continue;
            }
            match self.stage_gate(run_id) {
                Gate::Wait => {}
                Gate::Open => self.start_stage_run(bid, run_id),
                Gate::Blocked(reason) => {
                    let signature = format!(
                        "{}: partitions did not complete",
                        run.scope.label(&run.partition)
                    );
                    return self.escalate_stage(bid, run_id, &signature, reason, true);
                }
            }
        }
    }

    /// Whether backfill-level run `run_id` may start now.
    fn stage_gate(&self, run_id: Uuid) -> Gate {
        let run = &self.runs[&run_id];
        let b = &self.backfills[&run.backfill_id];
        let waits_for = |r: &super::RunRecord| match run.scope {
            RunScope::Before | RunScope::Partition => false,
            RunScope::AfterDataset => {
                r.scope.is_partition() && r.partition.dataset == run.partition.dataset
            }
            RunScope::After => matches!(r.scope, RunScope::Partition | RunScope::AfterDataset),
        };
        if run.scope == RunScope::Before {
            return Gate::Open;
        }
        let mut incomplete = Vec::new();
        for r in b
            .rec
            .runs
            .iter()
            .map(|id| &self.runs[id])
            .filter(|r| waits_for(r))
        {
            let state = r.machine.state();
            if !state.is_final() {
                return Gate::Wait;
            }
            if state != RunState::Complete {
                incomplete.push(format!(
                    "{} {}",
                    r.scope.label(&r.partition),
                    state.status().as_str().to_lowercase()
                ));
            }
        }
        let view = b.view(run.scope);
        let allow_partial = view.steps().first().is_some_and(|s| s.allow_partial);
        if incomplete.is_empty() || allow_partial || b.rec.partial_after {
            return Gate::Open;
        }
        let shown: Vec<&str> = incomplete.iter().take(5).map(String::as_str).collect();
        let more = incomplete.len().saturating_sub(shown.len());
        Gate::Blocked(format!(
            "the {} wait: {} of the runs they follow did not complete ({}{}) and they do not `allow_partial`: answer `warpline retry-failed {}` (after fixing the cause), `warpline resolve {} --action continue` (run them on what completed) or `warpline cancel {}`",
            match run.scope {
                RunScope::AfterDataset => format!(
                    "after-steps of dataset `{}`",
                    run.partition.dataset.as_deref().unwrap_or("")
                ),
                _ => "after-steps".to_string(),
            },
            incomplete.len(),
            shown.join(", "),
            if more > 0 {
                format!(", and {more} more")
            } else {
                String::new()
            },
            b.rec.id,
            b.rec.id,
            b.rec.id,
        ))
    }

    fn start_stage_run(&mut self, bid: Uuid, run_id: Uuid) {
        let run = self.runs.get_mut(&run_id).expect("stage runs exist");
        let Ok((from, to)) = run.machine.start() else {
            return;
        };
        let (from, to) = (from.name(run.machine.steps()), to.name(run.machine.steps()));
        self.record_run(
            run_id,
            AuditEvent::Transition {
                from,
                to,
                action: None,
            },
        );
        if let Some(b) = self.backfills.get_mut(&bid) {
            // Its slot is freed when it ends, as a partition's is.
            b.active += 1;
        }
        self.begin(run_id, 0);
    }

    fn escalate_stage(
        &mut self,
        bid: Uuid,
        run_id: Uuid,
        signature: &str,
        reason: String,
        after: bool,
    ) {
        let b = self.backfills.get_mut(&bid).expect("backfill exists");
        b.rec.escalated = Some(reason.clone());
        b.rec.after_blocked = after;
        self.dirty_backfills.insert(bid);
        self.record(
            Some(bid),
            None,
            AuditEvent::BackfillEscalated {
                signature: signature.to_string(),
                runs: vec![run_id],
                reason,
                after_blocked: after,
            },
        );
    }

    /// A backfill-level run's `{partitions_file}`: where, and its JSON (see
    /// [`warpline_shared::stage::PartitionsList`]).
    pub(super) fn partitions_file(&self, run_id: Uuid) -> (String, String) {
        let run = &self.runs[&run_id];
        let b = &self.backfills[&run.backfill_id];
        let path = run
            .partition
            .vars
            .get("partitions_file")
            .cloned()
            .unwrap_or_default();
        let in_scope = b.rec.runs.iter().map(|id| &self.runs[id]).filter(|r| {
            r.scope.is_partition()
                && (run.scope != RunScope::AfterDataset
                    || r.partition.dataset == run.partition.dataset)
        });
        let status = |r: &super::RunRecord| r.machine.state().status().as_str().to_string();
        let list = b.pipeline.partitions_list(
            b.rec.id,
            run.scope,
            run.partition.dataset.as_deref(),
            in_scope.map(|r| (r.id, &r.partition, status(r))),
        );
        let json = serde_json::to_string_pretty(&list).expect("lists serialise");
        (path, json)
    }
}
