//! The backfill grid: partitions × steps, each cell a state and an attempt count, derived from
//! the runs' records in the loop and cut to one page there ([`Engine::grid`]), so the dashboard
//! never receives, nor the loop builds, a summary of every run to show a hundred of them.

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use warpline_shared::machine::{RunState, RunStatus};

use warpline_shared::stage::RunScope;

use super::summary::{RunSummary, Summary, run_summary};
use super::{Engine, RunRecord};

/// The state of one step of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cell {
    /// Not reached yet.
    Pending,
    /// Its first attempt is out.
    Running,
    /// A later attempt is out (or waits for its backoff).
    Retrying,
    /// Passed; the run went past it.
    Passed,
    /// Passed, with failed `warn` checks.
    #[serde(rename = "passed-warn")]
    Warned,
    /// The run halted here.
    Halted,
    /// The run is parked here for an operator.
    Escalated,
    /// The run was cancelled here (or before reaching it).
    Cancelled,
}

impl Cell {
    /// The CSS class and legend word.
    pub fn name(self) -> &'static str {
        match self {
            Cell::Pending => "pending",
            Cell::Running => "running",
            Cell::Retrying => "retrying",
            Cell::Passed => "passed",
            Cell::Warned => "passed-warn",
            Cell::Halted => "halted",
            Cell::Escalated => "escalated",
            Cell::Cancelled => "cancelled",
        }
    }

    /// Every state, in legend order.
    pub const ALL: [Cell; 8] = [
        Cell::Pending,
        Cell::Running,
        Cell::Retrying,
        Cell::Passed,
        Cell::Warned,
        Cell::Halted,
        Cell::Escalated,
        Cell::Cancelled,
    ];

    /// Parses a state name (a query's `state=`).
    pub fn parse(s: &str) -> Option<Cell> {
        Cell::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// How many of a run's first steps it passed (the run went past them): from its status, the
/// step it is at or stopped at (none when complete or not started) and its attempts per step.
/// The one derivation behind the grid's passed cells and the summary's `passed`.
pub fn steps_passed(status: RunStatus, at: Option<usize>, attempts: &[u32]) -> usize {
    match (status, at) {
        (RunStatus::Complete, _) => attempts.len(),
        (RunStatus::Init, _) => 0,
        // A cancelled run names no step: the steps before the last one it tried passed.
        (RunStatus::Cancelled, _) => attempts.iter().rposition(|&n| n > 0).unwrap_or(0),
        (_, Some(k)) => k,
        (_, None) => 0,
    }
}

/// A run's cells, one per step, each with its attempts so far, into `out` (cleared first):
/// from its status, the step it is at or stopped at, its attempts per step, and whether a
/// step passed with failed `warn` checks.
pub fn cells_into(
    status: RunStatus,
    at: Option<usize>,
    attempts: &[u32],
    warned: impl Fn(usize) -> bool,
    out: &mut Vec<(Cell, u32)>,
) {
    let passed = steps_passed(status, at, attempts);
    out.clear();
    out.extend(
        (attempts.iter().enumerate())
            .map(|(i, &n)| (cell_at(i, n, passed, status, at, || warned(i)), n)),
    );
}

/// Step `i`'s cell, with `n` attempts so far, of a run that passed its first `passed` steps and
/// is at or stopped at step `at`; `warned` tells (asked only of a passed step) whether it
/// passed with failed `warn` checks.
pub(super) fn cell_at(
    i: usize,
    n: u32,
    passed: usize,
    status: RunStatus,
    at: Option<usize>,
    warned: impl FnOnce() -> bool,
) -> Cell {
    if i < passed {
        if warned() { Cell::Warned } else { Cell::Passed }
    } else {
        match status {
            RunStatus::Init => Cell::Pending,
            RunStatus::Cancelled => Cell::Cancelled,
            _ if at != Some(i) => Cell::Pending,
            RunStatus::Halted => Cell::Halted,
            RunStatus::Escalated => Cell::Escalated,
            _ if n > 1 => Cell::Retrying,
            _ => Cell::Running,
        }
    }
}

/// [`cells_into`] a new vector.
pub fn cells(
    status: RunStatus,
    at: Option<usize>,
    attempts: &[u32],
    warned: impl Fn(usize) -> bool,
) -> Vec<(Cell, u32)> {
    let mut out = Vec::with_capacity(attempts.len());
    cells_into(status, at, attempts, warned, &mut out);
    out
}

/// The step a run is at or stopped at, as the cells read it (none when complete or not started).
fn at_step(r: &RunRecord) -> Option<usize> {
    match r.machine.state() {
        RunState::Complete | RunState::Init => None,
        s => s.step(),
    }
}

/// How many of its first steps a run passed ([`steps_passed`]).
pub fn run_passed(r: &RunRecord) -> usize {
    steps_passed(r.machine.state().status(), at_step(r), &r.attempts_total)
}

/// A run's cells over its own steps, into `out`.
pub fn run_cells_into(r: &RunRecord, out: &mut Vec<(Cell, u32)>) {
    let steps = r.machine.steps();
    cells_into(
        r.machine.state().status(),
        at_step(r),
        &r.attempts_total,
        |i| warned(&r.warnings, &steps[i].id),
        out,
    );
}

/// A summarised run's cells over `steps` (the summary's, or a backfill-level run's own), by
/// the same derivation.
pub fn summary_cells(run: &RunSummary, steps: &[String]) -> Vec<(Cell, u32)> {
    let attempts: Vec<u32> = steps
        .iter()
        .map(|s| run.attempts.get(s).copied().unwrap_or(0))
        .collect();
    let at = run
        .step
        .as_ref()
        .and_then(|s| steps.iter().position(|x| x == s));
    cells(run.state, at, &attempts, |i| {
        warned(&run.warnings, &steps[i])
    })
}

/// True when a run's warnings (kept as `STEP: check (detail)`) name `step`.
pub(super) fn warned(warnings: &[String], step: &str) -> bool {
    warnings.iter().any(|w| {
        w.strip_prefix(step)
            .is_some_and(|rest| rest.starts_with(": "))
    })
}

/// What the grid shows: a state (a run shows if any of its cells is in it), a dataset, a
/// partition text, a page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Only runs with a cell in this state.
    pub state: Option<Cell>,
    /// Only runs of this dataset.
    pub dataset: Option<String>,
    /// Only partitions whose key contains this text.
    pub search: Option<String>,
    /// Zero-based page.
    pub page: usize,
    /// Only this run (a run page needs its backfill's summary and that run alone).
    pub run: Option<Uuid>,
}

/// Rows per grid page.
pub const PAGE_SIZE: usize = 100;

/// One page of a backfill's grid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GridPage {
    /// The backfill's summary; its `runs` are the page's rows and the backfill-level runs, in
    /// the backfill's order.
    pub summary: Summary,
    /// Partition runs matching the filter.
    pub matched: usize,
    /// Pages in all (at least 1).
    pub pages: usize,
    /// Cells per state over every partition run (not only the page), in legend order.
    pub totals: Vec<(Cell, usize)>,
    /// The backfill's datasets, in first-seen order.
    pub datasets: Vec<String>,
}

impl Engine {
    /// One page of backfill `id`'s grid (the backfill must exist). The totals and the
    /// datasets come from the backfill's tally and index, and an unfiltered page is cut without
    /// looking at the runs before it or after it: only a filter by state, dataset or partition
    /// text looks at every run.
    pub fn grid(&mut self, id: Uuid, f: &Filter) -> GridPage {
        let b = &self.backfills[&id];
        let first = f.page.saturating_mul(PAGE_SIZE);
        let on_page =
            |matched: usize| matched >= first && matched < first.saturating_add(PAGE_SIZE);
        let mut rows = Vec::new();
        let matched =
            if f.state.is_none() && f.dataset.is_none() && f.search.is_none() && f.run.is_none() {
                // Every partition run matches.
                let partitions = (b.rec.runs.iter()).filter(|r| !b.stage_runs.contains(r));
                rows.extend(partitions.skip(first).take(PAGE_SIZE).copied());
                b.rec.runs.len() - b.stage_runs.len()
            } else {
                let one = f.run.map(|want| [want]);
                let candidates: &[Uuid] = match &one {
                    Some(one) => one,
                    None => &b.rec.runs,
                };
                let mut matched = 0;
                // One buffer for every run's cells.
                let mut cs = Vec::new();
                for run_id in candidates {
                    // Backfill-level runs have steps of their own: the page shows them apart.
                    let Some(r) = (self.runs.get(run_id))
                        .filter(|r| r.backfill_id == id && r.scope.is_partition())
                    else {
                        continue;
                    };
                    if let Some(d) = &f.dataset
                        && r.partition.dataset.as_deref() != Some(d.as_str())
                    {
                        continue;
                    }
                    if let Some(q) = &f.search
                        && !r.partition.key().contains(q.as_str())
                    {
                        continue;
                    }
                    if let Some(want) = f.state {
                        run_cells_into(r, &mut cs);
                        if !cs.iter().any(|(c, _)| *c == want) {
                            continue;
                        }
                    }
                    if on_page(matched) {
                        rows.push(*run_id);
                    }
                    matched += 1;
                }
                matched
            };
        // The page's rows and the backfill-level runs, in the backfill's order: the before-run
        // first, the after-runs last (see `Pipeline::plan`).
        let stage = |before: bool| {
            (b.stage_runs.iter())
                .map(|id| &self.runs[id])
                .filter(move |r| (r.scope == RunScope::Before) == before)
        };
        let runs = (stage(true))
            .chain(rows.iter().map(|id| &self.runs[id]))
            .chain(stage(false))
            .map(run_summary)
            .collect();
        let datasets = b.datasets.clone();
        let summary = self.summary_listing(id, runs);
        let totals = self.backfills[&id].tally.cells();
        GridPage {
            summary,
            matched,
            pages: matched.div_ceil(PAGE_SIZE).max(1),
            totals: Cell::ALL.into_iter().zip(totals).collect(),
            datasets,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::Event;
    use super::super::tests::{Harness, outcome};
    use super::*;

    /// The loop cuts the page: 100 rows of the partitions matching the filter, in order, with
    /// totals and counts over every run, and the summary lists only the page's runs.
    #[tokio::test(start_paused = true)]
    async fn a_grid_page_is_cut_in_the_loop_and_counts_every_run() {
        let mut h = Harness::new();
        let parts: Vec<String> = (0..250).map(|i| format!("p{i}")).collect();
        let names: Vec<&str> = parts.iter().map(String::as_str).collect();
        let steps = serde_json::json!([
            {"id": "A", "command": "true", "max_attempts": 1},
            {"id": "B", "command": "true"}
        ]);
        let req = h.backfill(steps, &names);
        let id = req.id;
        let t = h.turn([Event::Submit(Box::new(req), None)]).await;
        assert_eq!(t.dispatched.len(), 250);
        // Every 50th halts at A (exit 2, one attempt); the others pass A and run B.
        let results: Vec<Event> = t
            .dispatched
            .iter()
            .enumerate()
            .map(|(i, s)| outcome(s, if i % 50 == 0 { 2 } else { 0 }))
            .collect();
        h.turn(results).await;

        let g = h.engine.grid(id, &Filter::default());
        assert_eq!((g.summary.runs.len(), g.matched, g.pages), (100, 250, 3));
        assert_eq!(g.summary.total_runs(), 250);
        assert_eq!(g.summary.counts.get(&RunStatus::Halted), Some(&5));
        // Past each step, over every run (not only the page's): 245 passed A, none B yet.
        assert_eq!(
            (g.summary.passed.clone(), g.summary.retries),
            (vec![245, 0], 0)
        );
        let totals: BTreeMap<_, _> = g.totals.iter().map(|(c, n)| (c.name(), *n)).collect();
        assert_eq!(
            (
                totals["halted"],
                totals["pending"],
                totals["passed"],
                totals["running"]
            ),
            (5, 5, 245, 245)
        );
        assert_eq!(g.datasets.len(), 250);
        assert_eq!(g.datasets[0], "p0");
        let rows: Vec<Vec<&str>> = g.summary.runs[..2]
            .iter()
            .map(|r| {
                summary_cells(r, &g.summary.steps)
                    .into_iter()
                    .map(|(c, _)| c.name())
                    .collect()
            })
            .collect();
        assert_eq!(rows, [["halted", "pending"], ["passed", "running"]]);

        let mut page = |f: Filter| h.engine.grid(id, &f);
        let last = page(Filter {
            page: 2,
            ..Filter::default()
        });
        assert_eq!(last.summary.runs.len(), 50);
        assert_eq!(last.summary.runs[0].partition, "p200");
        let halted = page(Filter {
            state: Some(Cell::Halted),
            ..Filter::default()
        });
        assert_eq!(halted.matched, 5);
        assert!(
            halted
                .summary
                .runs
                .iter()
                .all(|r| r.state == RunStatus::Halted)
        );
        let one = page(Filter {
            dataset: Some("p7".into()),
            ..Filter::default()
        });
        assert_eq!(one.matched, 1);
        let text = page(Filter {
            search: Some("p1".into()),
            ..Filter::default()
        });
        assert_eq!(text.matched, 1 + 10 + 100);
        let rid = g.summary.runs[3].run_id;
        let run = page(Filter {
            run: Some(rid),
            ..Filter::default()
        });
        assert_eq!(run.summary.runs.len(), 1);
        assert_eq!(run.summary.runs[0].run_id, rid);
        let beyond = page(Filter {
            page: usize::MAX,
            ..Filter::default()
        });
        assert!(beyond.summary.runs.is_empty());
        assert_eq!(beyond.matched, 250);
    }
}
