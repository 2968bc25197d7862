//! Showing a backfill as it goes: live progress bars on a terminal, one plain line per event
//! otherwise. Both read the committed audit records, so what is shown is what was recorded.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_shared::contracts::{Action, ReportStatus};
use warpline_shared::machine::RunStatus;

use crate::engine::Observer;

/// Shows nothing (for `--json` with no terminal, and tests).
pub struct Quiet;

impl Observer for Quiet {
    fn on_record(&mut self, _record: &AuditRecord) {}
}

/// Partition keys by run, learnt from `run_created` records.
#[derive(Default)]
struct Names(HashMap<Uuid, String>);

impl Names {
    fn learn(&mut self, r: &AuditRecord) {
        if let (Some(id), AuditEvent::RunCreated { partition, scope }) = (r.run_id, &r.event) {
            self.0.insert(id, scope.key(partition));
        }
    }

    fn of(&self, r: &AuditRecord) -> &str {
        r.run_id
            .and_then(|id| self.0.get(&id))
            .map(String::as_str)
            .unwrap_or("-")
    }
}

/// One line per meaningful event on standard error.
pub struct Lines {
    names: Names,
    out: Box<dyn Write + Send>,
}

impl Lines {
    /// Lines to standard error.
    pub fn stderr() -> Lines {
        Lines::stderr_knowing([])
    }

    /// Lines to standard error that already know these runs' partition keys: a coordinator
    /// restored from its store never sees their `run_created` records, and would otherwise
    /// name every such run `-`.
    pub fn stderr_knowing(runs: impl IntoIterator<Item = (Uuid, String)>) -> Lines {
        Lines {
            names: Names(runs.into_iter().collect()),
            out: Box::new(std::io::stderr()),
        }
    }
}

/// A one-line rendering of a record, or `None` for records not worth a line.
pub fn describe(part: &str, r: &AuditRecord) -> Option<String> {
    let ts = r.ts.format("%H:%M:%S%.3f");
    let text = match &r.event {
        AuditEvent::BackfillCreated {
            pipeline,
            partitions,
            agent,
            ..
        } => format!(
            "backfill {} of `{pipeline}`: {partitions} runs, agent {agent}",
            r.backfill_id.map(|b| b.to_string()).unwrap_or_default()
        ),
        AuditEvent::StepDispatched {
            step_id,
            attempt,
            delay_ms,
            ..
        } => {
            let wait = if *delay_ms > 0 {
                format!(" after {delay_ms} ms backoff")
            } else {
                String::new()
            };
            format!("{part} {step_id}#{attempt} dispatched{wait}")
        }
        AuditEvent::StepResult { outcome } => {
            let res = &outcome.result;
            let passed = outcome.report.checks.iter().filter(|c| c.passed).count();
            let status = match outcome.report.status {
                ReportStatus::Pass => "pass",
                ReportStatus::Fail => "FAIL",
            };
            let how = if res.timed_out {
                "timed out".to_string()
            } else {
                format!("exit {}", res.exit_code)
            };
            format!(
                "{part} {}#{} {how} in {} ms, checks {status} ({passed}/{})",
                res.step_id,
                res.attempt,
                res.duration_ms,
                outcome.report.checks.len()
            )
        }
        AuditEvent::Decision {
            step_id,
            attempt,
            agent,
            decision,
            fallback,
            ..
        } => {
            let why = fallback
                .as_deref()
                .map(|f| format!("; fallback: {f}"))
                .unwrap_or_default();
            format!(
                "{part} {step_id}#{attempt} → {} ({agent}{why}): {}",
                decision.action, decision.reason
            )
        }
        AuditEvent::GuardOverride {
            proposed,
            applied,
            reason,
            ..
        } => format!("{part} guard overrode {proposed} with {applied}: {reason}"),
        AuditEvent::AttemptLost {
            step_id,
            attempt,
            reason,
            ..
        } => {
            format!("{part} {step_id}#{attempt} LOST: {reason}")
        }
        AuditEvent::StepHandedBack {
            step_id,
            attempt,
            worker_id,
            reason,
            next,
            ..
        } => format!("{part} {step_id}#{attempt} handed back by {worker_id} ({reason}); {next}"),
        AuditEvent::StaleResult {
            step_id, reason, ..
        } => format!("{part} stale result for {step_id} ignored: {reason}"),
        AuditEvent::Escalated { step_id, reason } => {
            format!("{part} ESCALATED at {step_id}: {reason}")
        }
        AuditEvent::RunFinished {
            state,
            step_id,
            reason,
        } => match step_id {
            Some(s) => format!("{part} {state} at {s}: {reason}"),
            None => format!("{part} {state}"),
        },
        AuditEvent::BackfillFinished {
            complete,
            halted,
            cancelled,
            escalated,
            ..
        } => format!(
            "backfill finished: {complete} complete, {halted} halted, {escalated} escalated, {cancelled} cancelled"
        ),
        AuditEvent::BackfillPruned { runs, .. } => {
            format!("backfill pruned ({runs} runs): past its retention")
        }
        AuditEvent::OperatorResolution {
            operator,
            action,
            reason,
        } => {
            format!("{part} operator {operator}: {action} ({reason})")
        }
        AuditEvent::BackfillEscalated { reason, .. } => format!("backfill ESCALATED: {reason}"),
        AuditEvent::BackfillResolution {
            operator,
            action,
            reason,
        } => format!("backfill: operator {operator}: {action} ({reason})"),
        AuditEvent::RunCreated { .. } | AuditEvent::Transition { .. } => return None,
    };
    Some(format!("{ts} {text}"))
}

impl Observer for Lines {
    fn on_record(&mut self, r: &AuditRecord) {
        self.names.learn(r);
        if let Some(line) = describe(self.names.of(r), r) {
            let _ = writeln!(self.out, "{line}");
        }
    }

    fn forget(&mut self, _backfill_id: Uuid, runs: &[Uuid]) {
        for id in runs {
            self.names.0.remove(id);
        }
    }
}

/// The width of a bar's prefix: the longest step id, at least 7.
pub(crate) fn prefix_width(step_ids: &[String]) -> usize {
    step_ids.iter().map(String::len).max().unwrap_or(4).max(7)
}

/// The look of every bar (`warpline run`, `warpline watch`): prefix, bar, count, rate, ETA and
/// a message.
pub(crate) fn bar_style(width: usize, color: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{prefix:>{width}}} [{{bar:40.{color}/blue}}] {{pos:>5}}/{{len:5}} {{rate:>8}} eta {{eta:>4}} {{msg}}"
    ))
    .expect("valid template")
    // indicatif's `per_sec` prints every digit of the float; one decimal is enough.
    .with_key(
        "rate",
        |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.1}/s", state.per_sec());
        },
    )
    .progress_chars("=> ")
}

/// Live bars: one per step (runs past it) and one overall (runs finished), with rate and ETA.
pub struct Bars {
    names: Names,
    multi: MultiProgress,
    overall: ProgressBar,
    steps: Vec<(String, ProgressBar)>,
    retries: u64,
    halted: u64,
    escalated: u64,
}

impl Bars {
    /// Bars for a backfill of `runs` runs over these steps (each with the runs that take it),
    /// drawn on standard error.
    pub fn new(steps: &[(String, u64)], runs: u64) -> Bars {
        Bars::drawn(steps, runs, ProgressDrawTarget::stderr_with_hz(8))
    }

    fn drawn(steps: &[(String, u64)], runs: u64, target: ProgressDrawTarget) -> Bars {
        let multi = MultiProgress::with_draw_target(target);
        let ids: Vec<String> = steps.iter().map(|(id, _)| id.clone()).collect();
        let width = prefix_width(&ids);
        let style = |color: &str| bar_style(width, color);
        let steps = steps
            .iter()
            .map(|(id, n)| {
                let bar = multi.add(
                    ProgressBar::new(*n)
                        .with_style(style("cyan"))
                        .with_prefix(id.clone()),
                );
                (id.clone(), bar)
            })
            .collect();
        let overall = multi.add(
            ProgressBar::new(runs)
                .with_style(style("green"))
                .with_prefix("runs"),
        );
        overall.enable_steady_tick(Duration::from_millis(250));
        Bars {
            names: Names::default(),
            multi,
            overall,
            steps,
            retries: 0,
            halted: 0,
            escalated: 0,
        }
    }

    fn status(&self) -> String {
        format!(
            "{} retries, {} halted, {} escalated",
            self.retries, self.halted, self.escalated
        )
    }
}

impl Observer for Bars {
    fn on_record(&mut self, r: &AuditRecord) {
        self.names.learn(r);
        match &r.event {
            AuditEvent::Transition {
                from,
                action: Some(Action::Proceed),
                ..
            } => {
                if let Some((_, bar)) = self.steps.iter().find(|(id, _)| id == from) {
                    bar.inc(1);
                }
            }
            AuditEvent::Transition {
                action: Some(Action::Retry),
                ..
            } => self.retries += 1,
            AuditEvent::StepDispatched { step_id, .. } => {
                if let Some((_, bar)) = self.steps.iter().find(|(id, _)| id == step_id) {
                    bar.set_message(format!("last: {}", self.names.of(r)));
                }
            }
            AuditEvent::Escalated { .. } => {
                self.escalated += 1;
                let _ = self
                    .multi
                    .println(describe(self.names.of(r), r).unwrap_or_default());
            }
            AuditEvent::RunFinished { state, .. } => {
                self.overall.inc(1);
                if *state == RunStatus::Halted {
                    self.halted += 1;
                }
                if *state != RunStatus::Complete {
                    let _ = self
                        .multi
                        .println(describe(self.names.of(r), r).unwrap_or_default());
                }
            }
            _ => {}
        }
        self.overall.set_message(self.status());
    }

    fn finish(&mut self) {
        for (_, bar) in &self.steps {
            bar.abandon();
        }
        self.overall.abandon_with_message(self.status());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use warpline_shared::partition::Partition;

    fn record(run_id: Uuid, event: AuditEvent) -> AuditRecord {
        AuditRecord {
            seq: 1,
            ts: Utc::now(),
            prev_hash: String::new(),
            backfill_id: None,
            run_id: Some(run_id),
            event,
        }
    }

    /// A backfill-level step's bar is as long as its scope's runs and moves when one of
    /// them passes it; the bar over every run counts them too.
    #[test]
    fn each_step_has_a_bar_as_long_as_the_runs_that_take_it() {
        let steps = [
            ("SETUP".to_string(), 1),
            ("LOAD".to_string(), 3),
            ("CATALOGUE".to_string(), 1),
        ];
        let mut bars = Bars::drawn(&steps, 5, ProgressDrawTarget::hidden());
        let lengths: Vec<(String, Option<u64>)> = (bars.steps.iter())
            .map(|(id, b)| (id.clone(), b.length()))
            .collect();
        assert_eq!(
            lengths,
            [
                ("SETUP".to_string(), Some(1)),
                ("LOAD".to_string(), Some(3)),
                ("CATALOGUE".to_string(), Some(1))
            ]
        );
        assert_eq!(bars.overall.length(), Some(5));
        let before = Uuid::now_v7();
        bars.on_record(&record(
            before,
            AuditEvent::Transition {
                from: "SETUP".into(),
                to: "COMPLETE".into(),
                action: Some(Action::Proceed),
            },
        ));
        bars.on_record(&record(
            before,
            AuditEvent::RunFinished {
                state: RunStatus::Complete,
                step_id: None,
                reason: String::new(),
            },
        ));
        assert_eq!(bars.steps[0].1.position(), 1);
        assert_eq!(bars.steps[1].1.position(), 0);
        assert_eq!(bars.overall.position(), 1);
    }

    #[test]
    fn runs_are_named_whether_created_or_restored() {
        let (created, restored) = (Uuid::now_v7(), Uuid::now_v7());
        let mut names = Lines::stderr_knowing([(restored, "b_2024-02".to_string())]).names;
        let partition = Partition {
            month: Some("2024-01".into()),
            dataset: Some("a".into()),
            ..Partition::default()
        };
        names.learn(&record(
            created,
            AuditEvent::RunCreated {
                partition,
                scope: Default::default(),
            },
        ));
        let finished = |id| {
            record(
                id,
                AuditEvent::RunFinished {
                    state: RunStatus::Complete,
                    step_id: None,
                    reason: String::new(),
                },
            )
        };
        assert_eq!(names.of(&finished(created)), "a_2024-01");
        assert_eq!(names.of(&finished(restored)), "b_2024-02");
        assert_eq!(names.of(&finished(Uuid::now_v7())), "-");
    }
}
