//! Per-backfill tallies kept as its runs change, so that a summary's counts, rate and stage and
//! the grid's totals are read without going through every run of the backfill: a status read
//! of a 100,000-partition backfill costs the same as one of a hundred.
//!
//! Each run keeps its [`Share`], what it added to its backfill's [`Tally`]. A run that changed
//! is in the engine's changed runs (the set its commit persists), so at the end of a turn, and
//! before any summary, each changed run's old share is taken out of the tally and its new one
//! put in ([`Engine::tally_changed`]): O(runs changed), not O(runs). A restored or newly
//! indexed backfill is counted from scratch once ([`Engine::recount`]). The latest end of a run
//! is kept as a running maximum; after a run that had ended changes (an operator's retry) it is
//! looked for again among the runs, once, when a finished backfill's summary needs it
//! ([`Engine::last_end`]). The engine's tests check after every summary that the kept tally
//! agrees with one counted from scratch.

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
    /// The latest end of a run, unless [`Tally::end_unknown`].
    last_end: Option<DateTime<Utc>>,
    /// A run whose end was the latest is no longer ended (retried, resumed): the latest end
    /// is found again, by a look at the runs, the next time a finished backfill's summary
    /// needs it. Kept this way rather than as every end time (3 MB at 100,000 runs), for an
    /// event an operator causes.
    end_unknown: bool,
    /// Partition runs neither final nor parked for an operator.
    partitions_unended: usize,
}

impl Tally {
    /// Adds the share of a run counted from scratch, which ended at `end` if it did.
    fn add(&mut self, s: &Share, end: Option<DateTime<Utc>>) {
        self.change(s, true);
        self.last_end = self.last_end.max(end);
    }

    /// Takes a run's `old` share out and puts its `new` one in; the run now ended at `end`,
    /// if it did.
    fn swap(&mut self, old: &Share, new: &Share, end: Option<DateTime<Utc>>) {
        // A run that had ended may have had the latest end (the share does not keep it, to
        // stay small): the latest is looked for again when it is needed.
        if old
            .status
            .is_some_and(|s| s.is_final() || s == RunStatus::Escalated)
        {
            self.end_unknown = true;
        }
        self.change(old, false);
        self.add(new, end);
    }

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

    /// True when the tallies agree, the latest end aside when one of them lost track of it.
    #[cfg(test)]
    fn agrees(&self, other: &Tally) -> bool {
        let known = |t: &Tally| (!t.end_unknown).then_some(t.last_end);
        let ends = match (known(self), known(other)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let rest = |t: &Tally| Tally {
            last_end: None,
            end_unknown: false,
            ..t.clone()
        };
        ends && rest(self) == rest(other)
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
                b.tally.swap(&r.share, &share, r.finished_at);
                r.share = share;
            }
        }
    }

    /// The latest end of one of backfill `bid`'s runs, found again when the tally lost it.
    pub(super) fn last_end(&mut self, bid: Uuid) -> Option<DateTime<Utc>> {
        let b = self.backfills.get_mut(&bid)?;
        if b.tally.end_unknown {
            b.tally.last_end = (b.rec.runs.iter())
                .filter_map(|id| self.runs.get(id).and_then(|r| r.finished_at))
                .max();
            b.tally.end_unknown = false;
        }
        b.tally.last_end
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
                tally.add(&r.share, r.finished_at);
            }
        }
        b.tally = tally;
    }

    /// Checks backfill `bid`'s kept tally against one counted from scratch (the engine's tests
    /// do after every summary).
    #[cfg(test)]
    pub(super) fn check_tally(&self, bid: Uuid) {
        let mut counted = Tally::default();
        for id in &self.backfills[&bid].rec.runs {
            let r = &self.runs[id];
            counted.add(&Share::of(r), r.finished_at);
        }
        let kept = &self.backfills[&bid].tally;
        assert!(
            kept.agrees(&counted),
            "the kept tally is the runs' count: kept {kept:?}, counted {counted:?}"
        );
    }
}
