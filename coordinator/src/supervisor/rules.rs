//! The rules agent: a cautious operator written down.
//!
//! It proceeds on a clean pass. Otherwise it reads the attempt's failure classification
//! ([`StepResult::failure`], made by the worker with the step's `failures` rules and the
//! built-in table; see `warpline_shared::classify`): `transient` failures are retried while
//! attempts remain and halted when they run out; `permanent` ones halt at once, without
//! pointless retries; a rule that says `escalate`, and a failure no rule classifies, go to an
//! operator. A tool that could not run at all halts; a lost attempt is retried. When the tool
//! exited 0 but its checks failed, a failed data gate (content that is wrong: a row count, a
//! manifest field, a deviation from sibling partitions) halts at once, since rerunning the step
//! on the same input yields the same data; other failed checks (an output missing or short) are
//! retried. Every reason quotes the causal line with its stream and line number, the exit code
//! and the rule that decided.

use std::sync::Arc;

use warpline_shared::classify::{self, AttemptLog, FailuresConfig};
use warpline_shared::contracts::{
    Action, FailureClass, FailureFact, Severity, StepResult, SupervisorDecision,
};
use warpline_shared::validate::measured_nothing;

use super::{Agent, AgentReply, DecisionFuture, DecisionInput, timed};

/// The rules agent.
#[derive(Debug, Default, Clone, Copy)]
pub struct RulesAgent;

/// Check kinds that measure content rather than the presence of an output.
pub const DATA_GATE_KINDS: [&str; 6] = [
    "sql",
    "json_path",
    "yaml_path",
    "parquet_rows",
    "sibling_deviation",
    "row_count",
];

/// How the rules read a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reading {
    /// A retry may fix it.
    Transient(String),
    /// A retry will not fix it.
    Permanent(String),
    /// A rule asks for an operator.
    Escalate(String),
    /// Nothing matches a known pattern.
    Unknown(String),
}

/// The attempt's classification: the worker's, or (from a worker that predates it) the
/// built-in table applied to the log tail.
fn failure_of(r: &StepResult) -> FailureFact {
    r.failure.clone().unwrap_or_else(|| {
        classify::classify(
            &FailuresConfig::default(),
            &AttemptLog::from_tail(&r.log_tail, r.exit_code, r.signal, r.timed_out),
        )
    })
}

/// `exit code 1; stderr line 12: `…` (rule: …)`.
fn cite(r: &StepResult, fact: &FailureFact) -> String {
    let what = if r.timed_out {
        format!(
            "the tool timed out after {} ms and was killed (exit code {})",
            r.duration_ms, r.exit_code
        )
    } else {
        format!("exit code {}", r.exit_code)
    };
    let line = match &fact.line {
        Some(l) => format!("; {l}"),
        None => "; no log output".to_string(),
    };
    format!("{what}{line} ({}: {})", fact.class, fact.rule)
}

fn read(input: &DecisionInput) -> Reading {
    let r = &input.result;
    if r.lost {
        return Reading::Transient("the attempt was lost (no result from a worker in time)".into());
    }
    if let Some(e) = &r.error {
        return Reading::Permanent(format!("the tool could not run: {e}"));
    }
    let fact = failure_of(r);
    if r.exit_code != 0 || r.timed_out {
        let why = cite(r, &fact);
        return match fact.class {
            FailureClass::Transient => Reading::Transient(why),
            FailureClass::Permanent => Reading::Permanent(why),
            FailureClass::Escalate => Reading::Escalate(why),
            FailureClass::Unclassified => Reading::Unknown(why),
        };
    }
    // Exit 0, but an error check failed: the output is missing, short or wrong.
    let failed: Vec<_> = input.report.failed(Severity::Error).collect();
    let list = failed
        .iter()
        .map(|c| format!("{} ({})", c.name, c.detail))
        .collect::<Vec<_>>()
        .join("; ");
    let line = fact
        .line
        .as_ref()
        .map(|l| format!("; {l}"))
        .unwrap_or_default();
    match fact.class {
        FailureClass::Permanent => Reading::Permanent(format!(
            "exit code 0 but checks failed: {list}{line} ({}: {})",
            fact.class, fact.rule
        )),
        FailureClass::Escalate => Reading::Escalate(format!(
            "exit code 0 but checks failed: {list}{line} ({}: {})",
            fact.class, fact.rule
        )),
        // A gate that could not measure (its database was down) says nothing about the data.
        _ if failed.iter().any(|c| measured_nothing(&c.kind, &c.detail)) => {
            Reading::Transient(format!(
                "exit code 0 but checks could not measure the data: {list}; a fresh attempt measures again"
            ))
        }
        _ if !failed.is_empty()
            && failed
                .iter()
                .all(|c| DATA_GATE_KINDS.contains(&c.kind.as_str())) =>
        {
            Reading::Permanent(format!(
                "exit code 0 but the data failed its gates: {list}; rerunning the step on the same input yields the same data"
            ))
        }
        _ => Reading::Transient(format!(
            "exit code 0 but checks failed: {list}; a fresh attempt may produce a complete output"
        )),
    }
}

/// The rules' decision for one attempt.
pub fn decide(input: &DecisionInput) -> SupervisorDecision {
    let st = &input.state;
    let used = format!(
        "attempt {} of {} for {}",
        st.attempt, st.max_attempts, st.step_id
    );
    let legal = |a| st.legal_actions.contains(&a);
    if legal(Action::Proceed) {
        let checks = input.report.checks.len();
        let warns: Vec<&str> = input
            .report
            .failed(Severity::Warn)
            .map(|c| c.name.as_str())
            .collect();
        let warn = if warns.is_empty() {
            String::new()
        } else {
            format!("; warnings: {}", warns.join(", "))
        };
        return SupervisorDecision::new(
            Action::Proceed,
            format!(
                "exit code 0 in {} ms and all {checks} error checks passed{warn} ({used})",
                input.result.duration_ms
            ),
        );
    }
    match read(input) {
        Reading::Transient(why) if legal(Action::Retry) => {
            SupervisorDecision::new(Action::Retry, format!("{why}; retrying ({used})"))
        }
        Reading::Transient(why) => SupervisorDecision::new(
            Action::Halt,
            format!("{why}; no attempts left ({used}), halting"),
        ),
        Reading::Permanent(why) => SupervisorDecision::new(
            Action::Halt,
            format!("{why}; a retry cannot fix this ({used})"),
        ),
        Reading::Escalate(why) => SupervisorDecision::new(
            Action::Escalate,
            format!("{why}; a rule asks for an operator ({used})"),
        ),
        Reading::Unknown(why) => SupervisorDecision::new(
            Action::Escalate,
            format!("cannot classify the failure: {why}; an operator should look ({used})"),
        ),
    }
}

impl Agent for RulesAgent {
    fn name(&self) -> &'static str {
        "rules"
    }

    fn decide(&self, input: Arc<DecisionInput>) -> DecisionFuture {
        Box::pin(async move { timed("rules", || decide(&input)) })
    }

    fn decide_now(&self, input: &DecisionInput) -> Option<AgentReply> {
        Some(timed("rules", || decide(input)))
    }
}

#[cfg(test)]
mod tests {

    use uuid::Uuid;
    use warpline_shared::contracts::{Check, PipelineState, StepResult, ValidationReport};
    use warpline_shared::machine::{AttemptFacts, legal_actions};
    use warpline_shared::partition::Partition;

    use super::*;

    fn input(result: StepResult, checks: Vec<Check>, attempt: u32, max: u32) -> DecisionInput {
        let report = ValidationReport::from_checks(checks);
        let facts = AttemptFacts::from_outcome(&result, &report);
        DecisionInput {
            state: PipelineState {
                schema_version: 1,
                pipeline: "p".into(),
                run_id: Uuid::nil(),
                partition: Partition::default(),
                state: "EXTRACT".into(),
                step_id: "EXTRACT".into(),
                attempt,
                max_attempts: max,
                attempts: vec![],
                history: vec![],
                legal_actions: legal_actions(&facts, attempt, max),
            },
            result,
            report,
        }
    }

    fn result(exit_code: i32, tail: &str) -> StepResult {
        StepResult {
            attempt: 1,
            duration_ms: 5,
            log_tail: tail.into(),
            ..StepResult::new("EXTRACT", exit_code)
        }
    }

    fn check(name: &str, severity: Severity, passed: bool) -> Check {
        Check {
            name: name.into(),
            kind: "file_size_min".into(),
            severity,
            passed,
            detail: "draft.yaml is 212 bytes".into(),
            value: None,
        }
    }

    #[test]
    fn clean_pass_proceeds_citing_warnings() {
        let d = decide(&input(
            result(0, "ok"),
            vec![
                check("a", Severity::Error, true),
                check("w", Severity::Warn, false),
            ],
            1,
            3,
        ));
        assert_eq!(d.action, Action::Proceed);
        assert!(d.reason.contains("warnings: w"), "{}", d.reason);
    }

    #[test]
    fn connection_errors_retry_then_halt() {
        let tail = "fetching\nConnectionError: HTTP 500 Internal Server Error from http://x\n";
        let d = decide(&input(result(75, tail), vec![], 1, 3));
        assert_eq!(d.action, Action::Retry);
        assert!(
            d.reason.contains(
                "exit code 75; stdout line 2: `ConnectionError: HTTP 500 Internal Server Error from http://x`"
            ),
            "{}",
            d.reason
        );
        assert!(d.reason.contains("attempt 1 of 3"), "{}", d.reason);
        let d = decide(&input(result(75, tail), vec![], 3, 3));
        assert_eq!(d.action, Action::Halt);
        assert!(d.reason.contains("no attempts left"), "{}", d.reason);
    }

    #[test]
    fn timeouts_and_losses_retry() {
        let mut r = result(143, "");
        r.timed_out = true;
        r.signal = Some(15);
        assert_eq!(decide(&input(r, vec![], 1, 2)).action, Action::Retry);
        let mut r = result(-1, "");
        r.lost = true;
        assert_eq!(decide(&input(r, vec![], 1, 2)).action, Action::Retry);
    }

    #[test]
    fn permanent_failures_halt_at_once() {
        let d = decide(&input(
            result(1, "CRITICAL: reference file not found"),
            vec![],
            1,
            3,
        ));
        assert_eq!(d.action, Action::Halt);
        assert!(d.reason.contains("CRITICAL"), "{}", d.reason);
        let mut r = result(-1, "");
        r.error = Some("command `rm` is not on this worker's allowlist".into());
        assert_eq!(decide(&input(r, vec![], 1, 3)).action, Action::Halt);
        assert_eq!(
            decide(&input(result(127, ""), vec![], 1, 3)).action,
            Action::Halt
        );
    }

    #[test]
    fn failed_output_checks_retry_then_halt() {
        let checks = vec![check("file_size_min(draft, 1024)", Severity::Error, false)];
        let d = decide(&input(
            result(0, "WARNING: row 3 is cut short"),
            checks.clone(),
            1,
            2,
        ));
        assert_eq!(d.action, Action::Retry);
        assert!(d.reason.contains("212 bytes"), "{}", d.reason);
        assert_eq!(
            decide(&input(result(0, ""), checks, 2, 2)).action,
            Action::Halt
        );
    }

    #[test]
    fn the_workers_classification_decides_and_is_quoted() {
        let mut r = result(1, "whatever the tail says");
        r.failure = Some(FailureFact {
            class: FailureClass::Permanent,
            rule: "rule 1 (pattern `quota`)".into(),
            line: Some(warpline_shared::contracts::CausalLine {
                stream: warpline_shared::contracts::LogStream::Stderr,
                line: 41,
                text: "quota exceeded for project 7".into(),
            }),
        });
        let d = decide(&input(r.clone(), vec![], 1, 3));
        assert_eq!(d.action, Action::Halt);
        assert!(
            d.reason.starts_with(
                "exit code 1; stderr line 41: `quota exceeded for project 7` (permanent: rule 1 (pattern `quota`)); a retry cannot fix this"
            ),
            "{}",
            d.reason
        );
        r.failure.as_mut().unwrap().class = FailureClass::Escalate;
        let d = decide(&input(r, vec![], 1, 3));
        assert_eq!(d.action, Action::Escalate);
        assert!(
            d.reason.contains("a rule asks for an operator"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn wrapped_psycopg2_refusal_retries_from_the_tail() {
        // No worker classification: the built-in table reads the tail.
        let tail = "loading\n[--- stderr ---]\n\x1b[31mpsycopg2.OperationalError: connection to server at \"127.0.0.1\", port 5499 failed: Connection\x1b[0m\nrefused\n";
        let d = decide(&input(result(1, tail), vec![], 1, 3));
        assert_eq!(d.action, Action::Retry, "{}", d.reason);
        assert!(d.reason.contains("stderr line 1"), "{}", d.reason);
        assert!(
            d.reason.contains("failed: Connection refused`"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn failed_data_gates_halt_at_once() {
        let gate = Check {
            name: "rows loaded".into(),
            kind: "sql".into(),
            severity: Severity::Error,
            passed: false,
            detail: "the query returned 1 (minimum 100)".into(),
            value: None,
        };
        let d = decide(&input(result(0, "loaded 1 rows"), vec![gate], 1, 3));
        assert_eq!(d.action, Action::Halt);
        assert!(
            d.reason
                .contains("rows loaded (the query returned 1 (minimum 100))"),
            "{}",
            d.reason
        );
    }

    /// The fault suite found it: a PostgreSQL restart while INGEST's `rows loaded` gate ran
    /// halted a healthy run as bad data. A gate that could not reach its database measured
    /// nothing; the attempt is retried, and a real verdict still halts.
    #[test]
    fn a_gate_that_could_not_reach_its_database_is_retried_not_halted() {
        let gate = |detail: &str| Check {
            name: "rows loaded".into(),
            kind: "sql".into(),
            severity: Severity::Error,
            passed: false,
            detail: detail.into(),
            value: None,
        };
        let down = format!(
            "{}: {}: the database system is shutting down",
            warpline_shared::validate::NOT_MEASURED,
            warpline_shared::validate::DB_UNREACHABLE
        );
        let d = decide(&input(
            result(0, "loaded 1750 rows"),
            vec![gate(&down)],
            1,
            3,
        ));
        assert_eq!(d.action, Action::Retry, "{}", d.reason);
        assert!(d.reason.contains("could not measure"), "{}", d.reason);
        let d = decide(&input(
            result(0, "loaded 1750 rows"),
            vec![gate(
                "the query failed: ERROR: relation \"x\" does not exist",
            )],
            1,
            3,
        ));
        assert_eq!(d.action, Action::Halt, "{}", d.reason);
    }

    #[test]
    fn unclassified_failures_escalate() {
        let d = decide(&input(result(3, "something odd happened"), vec![], 1, 3));
        assert_eq!(d.action, Action::Escalate);
        assert!(d.reason.contains("something odd happened"), "{}", d.reason);
    }
}
