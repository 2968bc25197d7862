//! The backfill grid as the dashboard draws it: the engine computes a page of it
//! ([`crate::engine::grid`]: cells, filters, totals), and the pages colour each cell.

pub use crate::engine::grid::{Cell, Filter, GridPage, PAGE_SIZE, summary_cells};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::RunSummary;
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
            names(summary_cells(
                &run("load", Some("load"), &[("fetch", 1), ("load", 1)]),
                &s
            )),
            [("passed", 1), ("running", 1), ("pending", 0)]
        );
        assert_eq!(
            names(summary_cells(
                &run("load", Some("load"), &[("fetch", 1), ("load", 2)]),
                &s
            )),
            [("passed", 1), ("retrying", 2), ("pending", 0)]
        );
        assert_eq!(
            names(summary_cells(
                &run("HALTED", Some("load"), &[("fetch", 1), ("load", 3)]),
                &s
            )),
            [("passed", 1), ("halted", 3), ("pending", 0)]
        );
        assert_eq!(
            names(summary_cells(
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
            names(summary_cells(
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
            names(summary_cells(
                &run("CANCELLED", None, &[("fetch", 1), ("load", 1)]),
                &s
            )),
            [("passed", 1), ("cancelled", 1), ("cancelled", 0)]
        );
        assert_eq!(
            names(summary_cells(&run("INIT", None, &[]), &s)),
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
            names(summary_cells(&warned, &s)),
            [("passed", 1), ("passed-warn", 1), ("passed", 1)]
        );
        assert_eq!(Cell::parse("passed-warn"), Some(Cell::Warned));
    }
}
