//! The backfill grid: partitions × steps, each cell a state and an attempt count, derived from
//! the engine's [`Summary`] (so it is exactly what the API answers), filtered and paginated on
//! the server so a page stays small at any backfill size.

use crate::engine::{RunSummary, Summary};

/// The state of one step of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// A run's cells, one per step of `steps`, each with its attempts so far.
pub fn cells(run: &RunSummary, steps: &[String]) -> Vec<(Cell, u32)> {
    let attempts = |s: &String| run.attempts.get(s).copied().unwrap_or(0);
    let at = run
        .step
        .as_ref()
        .and_then(|s| steps.iter().position(|x| x == s));
    let last_tried = steps.iter().rposition(|s| attempts(s) > 0);
    steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = attempts(s);
            let cell = match (run.state.as_str(), at) {
                ("COMPLETE", _) => Cell::Passed,
                ("INIT", _) => Cell::Pending,
                ("CANCELLED", _) => match last_tried {
                    Some(l) if i < l => Cell::Passed,
                    _ => Cell::Cancelled,
                },
                (state, Some(k)) => {
                    if i < k {
                        Cell::Passed
                    } else if i > k {
                        Cell::Pending
                    } else {
                        match state {
                            "HALTED" => Cell::Halted,
                            "ESCALATED" => Cell::Escalated,
                            _ if n > 1 => Cell::Retrying,
                            _ => Cell::Running,
                        }
                    }
                }
                (_, None) => Cell::Pending,
            };
            // Warnings are kept as `STEP: check (detail)`.
            let warned = || {
                run.warnings.iter().any(|w| {
                    w.strip_prefix(s.as_str())
                        .is_some_and(|r| r.starts_with(": "))
                })
            };
            let cell = if cell == Cell::Passed && warned() {
                Cell::Warned
            } else {
                cell
            };
            (cell, n)
        })
        .collect()
}

/// What the grid shows: a state (a run shows if any of its cells is in it), a dataset, a page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only runs with a cell in this state.
    pub state: Option<Cell>,
    /// Only runs of this dataset.
    pub dataset: Option<String>,
    /// Only partitions whose key contains this text.
    pub search: Option<String>,
    /// Zero-based page.
    pub page: usize,
}

/// Rows per grid page.
pub const PAGE_SIZE: usize = 100;

/// Parses a state name from a query.
pub fn parse_cell(s: &str) -> Option<Cell> {
    Cell::ALL.into_iter().find(|c| c.name() == s)
}

/// One page of the filtered grid, and how many runs matched.
pub struct Page<'a> {
    /// The rows: a run and its cells.
    pub rows: Vec<(&'a RunSummary, Vec<(Cell, u32)>)>,
    /// Runs matching the filter.
    pub matched: usize,
    /// Pages in all (at least 1).
    pub pages: usize,
    /// Cells per state over the whole backfill (not only the page).
    pub totals: Vec<(Cell, usize)>,
}

/// Filters and paginates a summary's runs.
pub fn page<'a>(s: &'a Summary, f: &Filter) -> Page<'a> {
    let mut totals = [0usize; 7];
    let mut matched = 0;
    let mut rows = Vec::new();
    let first = f.page * PAGE_SIZE;
    // Backfill-level runs have steps of their own: the page shows them in a table of theirs.
    for run in s.runs.iter().filter(|r| r.scope.is_partition()) {
        let cs = cells(run, &s.steps);
        for (c, _) in &cs {
            totals[Cell::ALL.iter().position(|x| x == c).expect("listed")] += 1;
        }
        if let Some(d) = &f.dataset
            && run.dataset.as_deref() != Some(d.as_str())
        {
            continue;
        }
        if let Some(q) = &f.search
            && !run.partition.contains(q.as_str())
        {
            continue;
        }
        if let Some(want) = f.state
            && !cs.iter().any(|(c, _)| *c == want)
        {
            continue;
        }
        if matched >= first && matched < first + PAGE_SIZE {
            rows.push((run, cs));
        }
        matched += 1;
    }
    Page {
        rows,
        matched,
        pages: matched.div_ceil(PAGE_SIZE).max(1),
        totals: Cell::ALL.into_iter().zip(totals).collect(),
    }
}

/// The datasets of a backfill, in first-seen order.
pub fn datasets(s: &Summary) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for r in &s.runs {
        if let Some(d) = r.dataset.as_deref()
            && !out.contains(&d)
        {
            out.push(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use uuid::Uuid;
    use warpline_shared::machine::RunStatus;

    /// A run in `state` (a status name, or a step id for a running run, as summaries had it).
    fn run(state: &str, step: Option<&str>, attempts: &[(&str, u32)]) -> RunSummary {
        RunSummary {
            run_id: Uuid::now_v7(),
            partition: format!("d_{state}"),
            month: None,
            dataset: Some("d".into()),
            state: state.parse().unwrap_or(RunStatus::Running),
            step: step.map(String::from),
            attempts: attempts.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
            reason: None,
            warnings: Vec::new(),
            scope: Default::default(),
            steps: Vec::new(),
        }
    }

    fn steps() -> Vec<String> {
        vec!["fetch".into(), "load".into(), "export".into()]
    }

    fn names(cs: Vec<(Cell, u32)>) -> Vec<(&'static str, u32)> {
        cs.into_iter().map(|(c, n)| (c.name(), n)).collect()
    }

    #[test]
    fn cells_follow_the_run_state() {
        let s = steps();
        assert_eq!(
            names(cells(
                &run("load", Some("load"), &[("fetch", 1), ("load", 1)]),
                &s
            )),
            [("passed", 1), ("running", 1), ("pending", 0)]
        );
        assert_eq!(
            names(cells(
                &run("load", Some("load"), &[("fetch", 1), ("load", 2)]),
                &s
            )),
            [("passed", 1), ("retrying", 2), ("pending", 0)]
        );
        assert_eq!(
            names(cells(
                &run("HALTED", Some("load"), &[("fetch", 1), ("load", 3)]),
                &s
            )),
            [("passed", 1), ("halted", 3), ("pending", 0)]
        );
        assert_eq!(
            names(cells(
                &run(
                    "ESCALATED",
                    Some("export"),
                    &[("fetch", 1), ("load", 1), ("export", 1)]
                ),
                &s
            )),
            [("passed", 1), ("passed", 1), ("escalated", 1)]
        );
        assert_eq!(
            names(cells(
                &run(
                    "COMPLETE",
                    None,
                    &[("fetch", 2), ("load", 1), ("export", 1)]
                ),
                &s
            )),
            [("passed", 2), ("passed", 1), ("passed", 1)]
        );
        assert_eq!(
            names(cells(
                &run("CANCELLED", None, &[("fetch", 1), ("load", 1)]),
                &s
            )),
            [("passed", 1), ("cancelled", 1), ("cancelled", 0)]
        );
        assert_eq!(
            names(cells(&run("INIT", None, &[]), &s)),
            [("pending", 0), ("pending", 0), ("pending", 0)]
        );
        // A step that passed with failed `warn` checks has a colour of its own.
        let mut warned = run(
            "COMPLETE",
            None,
            &[("fetch", 1), ("load", 1), ("export", 1)],
        );
        warned.warnings = vec!["load: rows like the other months (12% below)".into()];
        assert_eq!(
            names(cells(&warned, &s)),
            [("passed", 1), ("passed-warn", 1), ("passed", 1)]
        );
        assert_eq!(parse_cell("passed-warn"), Some(Cell::Warned));
    }

    #[test]
    fn pages_filter_by_state_and_dataset_and_count_everything() {
        let mut runs = Vec::new();
        for i in 0..250 {
            let mut r = run(
                if i % 50 == 0 { "HALTED" } else { "COMPLETE" },
                Some("load"),
                &[("fetch", 1), ("load", 1), ("export", 1)],
            );
            r.partition = format!("p{i}");
            r.dataset = Some(if i % 2 == 0 { "a" } else { "b" }.into());
            runs.push(r);
        }
        let summary = Summary {
            schema_version: 1,
            backfill_id: Uuid::nil(),
            pipeline: "p".into(),
            steps: steps(),
            stage: crate::engine::BackfillStage::Partitions,
            counts: BTreeMap::new(),
            in_step: BTreeMap::new(),
            steps_executed: 0,
            runs_per_minute: 0.0,
            eta_s: None,
            wall_ms: 0,
            submitted_at: chrono::Utc::now(),
            finished_at: None,
            finished: false,
            cancelling: false,
            escalated: None,
            audit: String::new(),
            audit_head: String::new(),
            warnings: 0,
            llm: Default::default(),
            runs,
        };
        let all = page(&summary, &Filter::default());
        assert_eq!((all.rows.len(), all.matched, all.pages), (100, 250, 3));
        let last = page(
            &summary,
            &Filter {
                page: 2,
                ..Filter::default()
            },
        );
        assert_eq!(last.rows.len(), 50);
        assert_eq!(last.rows[0].0.partition, "p200");
        let halted = page(
            &summary,
            &Filter {
                state: Some(Cell::Halted),
                ..Filter::default()
            },
        );
        assert_eq!(halted.matched, 5);
        let a = page(
            &summary,
            &Filter {
                dataset: Some("b".into()),
                ..Filter::default()
            },
        );
        assert_eq!(a.matched, 125);
        let totals: BTreeMap<_, _> = all.totals.iter().map(|(c, n)| (c.name(), *n)).collect();
        assert_eq!(totals["halted"], 5);
        assert_eq!(totals["passed"], 245 * 3 + 5);
        assert_eq!(datasets(&summary), ["a", "b"]);
        assert_eq!(parse_cell("escalated"), Some(Cell::Escalated));
        assert_eq!(parse_cell("nope"), None);
    }
}
