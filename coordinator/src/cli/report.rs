//! How a backfill's summary reads to people at the end of a command: the exit code, the last
//! words, the counts line, durations, and how far runs got per step. Shared by the operator
//! commands ([`super::ops`]) and by following a backfill ([`super::watch`]).

use std::process::ExitCode;

use warpline_shared::machine::RunStatus;

use crate::engine::{RunSummary, Summary};

/// 0 when every run completed, 1 otherwise.
pub(crate) fn exit_for(summary: &Summary) -> ExitCode {
    if summary.all_complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The last words of a followed backfill, on standard error.
pub(crate) fn print_end(s: &Summary) {
    eprintln!(
        "warpline: backfill {} {}: {} runs: {}; {} steps executed in {}",
        s.backfill_id,
        if s.cancelling {
            "cancelled"
        } else {
            "finished"
        },
        s.runs.len(),
        counts_line(s),
        s.steps_executed,
        duration(s.wall_ms / 1000)
    );
    for r in s.runs.iter().filter(|r| r.state != RunStatus::Complete) {
        eprintln!(
            "  {} {} at {}: {}",
            r.partition,
            r.state,
            r.step.as_deref().unwrap_or("-"),
            r.reason
                .as_deref()
                .unwrap_or("waiting for an operator: see `warpline escalations`")
        );
    }
}

/// `6 COMPLETE, 2 RUNNING, 1 HALTED`.
pub(crate) fn counts_line(s: &Summary) -> String {
    if s.counts.is_empty() {
        return "none".into();
    }
    s.counts
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whole seconds as `42s`, `3m 05s` or `1h 02m`.
pub(crate) fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// How many runs have passed each step (proceeded from it), in the pipeline's step order.
pub(crate) fn passed_per_step(s: &Summary) -> Vec<u64> {
    // The coordinator's count, over every run (a summary may list only some).
    if s.passed.len() == s.steps.len() && !s.steps.is_empty() {
        return s.passed.clone();
    }
    let mut out = vec![0; s.steps.len()];
    // Backfill-level runs have steps of their own.
    for r in s.runs.iter().filter(|r| r.scope.is_partition()) {
        for n in out.iter_mut().take(steps_passed(r, &s.steps)) {
            *n += 1;
        }
    }
    out
}

/// How many steps a run has passed.
fn steps_passed(r: &RunSummary, steps: &[String]) -> usize {
    if r.state == RunStatus::Complete {
        return steps.len();
    }
    if let Some(i) = r
        .step
        .as_ref()
        .and_then(|s| steps.iter().position(|x| x == s))
    {
        return i;
    }
    // A cancelled run names no step: the steps before the last one it attempted passed.
    steps
        .iter()
        .rposition(|id| r.attempts.contains_key(id))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(185), "3m 05s");
        assert_eq!(duration(3720), "1h 02m");
    }
}
