//! Per-backfill tallies kept as its runs change, so that a summary's counts, rate and stage and
//! the grid's totals are read without going through every run of the backfill: a status read
//! of a 100,000-partition backfill costs the same as one of a hundred.
//!
//! Each run keeps its [`Share`], what it added to its backfill's [`Tally`]. A run that changed
//! is in the engine's changed runs (the set its commit persists), so at the end of a turn, and
//! before any summary, each changed run's old share is taken out of the tally and its new one
//! put in ([`Engine::tally_changed`]): O(runs changed), not O(runs). A restored or newly
//! indexed backfill is counted from scratch once ([`Engine::recount`]). The engine's tests check
//! after every summary that the kept tally equals a recount.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use uuid::Uuid;
use warpline_shared::machine::{RunState, RunStatus};
use warpline_shared::stage::RunScope;

use super::grid::{Cell, cell_at, run_passed, warned};
use super::{Engine, RunRecord};

/// Every status, in the order a tally counts them.
const STATUSES: [RunStatus; 6] = [
    RunStatus::Cancelled,
    RunStatus::Complete,
    RunStatus::Escalated,
    RunStatus::Halted,
    RunStatus::Init,
    RunStatus::Running,
];

/// What one run adds to its backfill's tally.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Share {
    /// Its status; none until it is first tallied (then it added nothing).
    status: Option<RunStatus>,
    /// The step it runs (its scope and the step's index there), while it runs.
    in_step: Option<(RunScope, u16)>,
    /// Attempts executed: started, less the one still awaited.
    executed: u32,
    /// Attempts beyond the first of each step.
    retries: u32,
    /// Failed `warn` checks.
    warnings: u32,
    /// When it reached a final state.
    finished_at: Option<DateTime<Utc>>,
    /// A partition's run (not a backfill-level one): only those have cells and passed steps.
    partition: bool,
    /// How many of its first steps it passed.
    passed: u16,
    /// Its cells per state ([`Cell`] order).
    cells: [u16; Cell::ALL.len()],
}

impl Share {
    /// Run `r`'s share.
    pub(super) fn of(r: &RunRecord) -> Share {
        let state = r.machine.state();
        let status = state.status();
        let started: u32 = r.attempts_total.iter().sum();
        let outstanding = u32::from(r.machine.outstanding().is_some());
        let in_step = match state {
            RunState::Running(i) => Some((r.scope, i as u16)),
            _ => None,
        };
        let partition = r.scope.is_partition();
        let mut cells = [0u16; Cell::ALL.len()];
        let mut passed = 0;
        if partition {
            passed = run_passed(r);
            let at = match state {
                RunState::Complete | RunState::Init => None,
                s => s.step(),
            };
            let steps = r.machine.steps();
            for (i, &n) in r.attempts_total.iter().enumerate() {
                let cell = cell_at(i, n, passed, status, at, || {
                    warned(&r.warnings, &steps[i].id)
                });
                cells[cell as usize] += 1;
            }
        }
        Share {
            status: Some(status),
            in_step,
            executed: started - outstanding,
            retries: r.attempts_total.iter().map(|n| n.saturating_sub(1)).sum(),
            warnings: r.warnings.len() as u32,
            finished_at: r.finished_at,
            partition,
            passed: passed as u16,
            cells,
        }
    }
}

/// A backfill's runs, counted: the sums of their [`Share`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Runs per status ([`STATUSES`] order).
    counts: [usize; STATUSES.len()],
    /// Runs per step they run (no entry counts zero).
    in_step: HashMap<(RunScope, u16), usize>,
    /// Attempts executed.
    pub(super) executed: u64,
    /// Attempts beyond the first of each step.
    pub(super) retries: u64,
    /// Failed `warn` checks.
    pub(super) warnings: usize,
    /// Partition runs past each step (as long as its longest run's passed steps).
    passed: Vec<u64>,
    /// Partition runs' cells per state ([`Cell`] order).
    cells: [usize; Cell::ALL.len()],
    /// Runs' end times, each with how many runs ended then (no entry counts zero).
    ends: BTreeMap<DateTime<Utc>, u32>,
    /// Partition runs neither final nor parked for an operator.
    partitions_unended: usize,
}

impl Tally {
    /// Adds a run's share (`add`), or takes it out.
    fn change(&mut self, s: &Share, add: bool) {
        let Some(status) = s.status else {
            return;
        };
        fn by(n: &mut usize, add: bool, d: usize) {
            if add { *n += d } else { *n -= d }
        }
        fn by64(n: &mut u64, add: bool, d: u64) {
            if add { *n += d } else { *n -= d }
        }
        by(&mut self.counts[status as usize], add, 1);
        if let Some(at) = s.in_step {
            let n = self.in_step.entry(at).or_default();
            by(n, add, 1);
            if *n == 0 {
                self.in_step.remove(&at);
            }
        }
        by64(&mut self.executed, add, u64::from(s.executed));
        by64(&mut self.retries, add, u64::from(s.retries));
        by(&mut self.warnings, add, s.warnings as usize);
        if let Some(t) = s.finished_at {
            let n = self.ends.entry(t).or_default();
            if add {
                *n += 1;
            } else {
                *n -= 1;
                if *n == 0 {
                    self.ends.remove(&t);
                }
            }
        }
        if s.partition {
            let passed = usize::from(s.passed);
            if self.passed.len() < passed {
                self.passed.resize(passed, 0);
            }
            for n in &mut self.passed[..passed] {
                by64(n, add, 1);
            }
            while self.passed.last() == Some(&0) {
                self.passed.pop();
            }
            for (n, &d) in self.cells.iter_mut().zip(&s.cells) {
                by(n, add, usize::from(d));
            }
            if !(status.is_final() || status == RunStatus::Escalated) {
                by(&mut self.partitions_unended, add, 1);
            }
        }
    }

    /// Runs per status, for a summary (statuses no run has are left out).
    pub(super) fn counts(&self) -> BTreeMap<RunStatus, usize> {
        STATUSES
            .into_iter()
            .zip(self.counts)
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Runs with status `s`.
    pub(super) fn count(&self, s: RunStatus) -> usize {
        self.counts[s as usize]
    }

    /// Runs in all.
    pub(super) fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Runs in a final state.
    pub(super) fn finals(&self) -> usize {
        STATUSES
            .into_iter()
            .filter(|s| s.is_final())
            .map(|s| self.count(s))
            .sum()
    }

    /// True when every run is final or parked for an operator.
    pub(super) fn all_ended(&self) -> bool {
        self.finals() + self.count(RunStatus::Escalated) == self.total()
    }

    /// True when every partition run is final or parked for an operator.
    pub(super) fn partitions_ended(&self) -> bool {
        self.partitions_unended == 0
    }

    /// Runs at each step, by its scope and index there.
    pub(super) fn in_step(&self) -> impl Iterator<Item = (RunScope, usize, usize)> + '_ {
        self.in_step
            .iter()
            .map(|(&(scope, i), &n)| (scope, usize::from(i), n))
    }

    /// Partition runs past each of the first `steps` steps.
    pub(super) fn passed(&self, steps: usize) -> Vec<u64> {
        let mut out = self.passed.clone();
        out.resize(steps, 0);
        out
    }

    /// Partition runs' cells per state, in legend order.
    pub(super) fn cells(&self) -> [usize; Cell::ALL.len()] {
        self.cells
    }

    /// The latest end of a run.
    pub(super) fn last_end(&self) -> Option<DateTime<Utc>> {
        self.ends.last_key_value().map(|(t, _)| *t)
    }
}

impl Engine {
    /// Brings the tallies up to date with the runs changed since the last commit (those its
    /// commit will persist). Idempotent: a run whose share did not change is left as it is.
    pub(super) fn tally_changed(&mut self) {
        for id in &self.dirty_runs {
            let Some(r) = self.runs.get_mut(id) else {
                continue;
            };
            // A backfill being created is counted whole when its runs are indexed.
            let Some(b) = self.backfills.get_mut(&r.backfill_id) else {
                continue;
            };
            let share = Share::of(r);
            if share != r.share {
                b.tally.change(&r.share, false);
                b.tally.change(&share, true);
                r.share = share;
            }
        }
    }

    /// Counts backfill `bid`'s tally from scratch and sets each of its runs' share.
    pub(super) fn recount(&mut self, bid: Uuid) {
        let Some(b) = self.backfills.get_mut(&bid) else {
            return;
        };
        let mut tally = Tally::default();
        for id in &b.rec.runs {
            if let Some(r) = self.runs.get_mut(id) {
                r.share = Share::of(r);
                tally.change(&r.share, true);
            }
        }
        b.tally = tally;
    }

    /// Backfill `bid`'s tally counted from scratch, leaving the kept one alone (the tests check
    /// the kept one against it).
    #[cfg(test)]
    pub(super) fn counted(&self, bid: Uuid) -> Tally {
        let mut tally = Tally::default();
        for id in &self.backfills[&bid].rec.runs {
            tally.change(&Share::of(&self.runs[id]), true);
        }
        tally
    }
}
