//! The rules agent: a cautious operator written down.
//!
//! It proceeds on a clean pass; retries what a retry can fix (timeouts, lost attempts,
//! connection errors, transient exit codes, outputs that came out missing or short) while
//! attempts remain; halts what a retry cannot fix (the tool cannot run, usage or config errors,
//! `CRITICAL` failures) or what is still failing when attempts run out; and escalates what it
//! cannot classify. Every reason cites the facts it used.

use std::sync::{Arc, LazyLock};

use regex::Regex;
use warpline_shared::contracts::{Action, Severity, SupervisorDecision};

use super::{Agent, AgentReply, DecisionFuture, DecisionInput, timed};

/// The rules agent.
#[derive(Debug, Default, Clone, Copy)]
pub struct RulesAgent;

/// Exit codes that say "try again later" (sysexits `EX_TEMPFAIL`, `EX_UNAVAILABLE`).
const TRANSIENT_EXIT: [i32; 2] = [75, 69];
/// Exit codes that a retry will not change: usage (2, `EX_USAGE`, `EX_DATAERR`, `EX_NOINPUT`),
/// config (`EX_CONFIG`), not executable (126), not found (127).
const PERMANENT_EXIT: [i32; 7] = [2, 64, 65, 66, 78, 126, 127];

static TRANSIENT_LOG: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)ConnectionError|connection (refused|reset|closed|aborted)|timed? ?out|temporar(y|ily)|HTTP 5\d\d|\b50[234]\b.*(gateway|unavailable)|too many (connections|requests)|deadlock detected|try again",
    )
    .expect("valid regex")
});

static PERMANENT_LOG: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"CRITICAL|(?i)permission denied|no such file|syntax error|invalid argument|unrecognized option|not on this worker's allowlist")
        .expect("valid regex")
});

/// How the rules read a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reading {
    /// A retry may fix it.
    Transient(String),
    /// A retry will not fix it.
    Permanent(String),
    /// Nothing matches a known pattern.
    Unknown(String),
}

/// Finds the first log-tail line matching `re`, as `line N: `text``.
fn cite(tail: &str, re: &Regex) -> Option<String> {
    tail.lines()
        .enumerate()
        .find(|(_, l)| re.is_match(l))
        .map(|(i, l)| {
            let l = l.trim();
            let shown: String = l.chars().take(160).collect();
            format!("log tail line {}: `{shown}`", i + 1)
        })
}

fn last_line(tail: &str) -> String {
    tail.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| {
            format!(
                "last log line `{}`",
                l.trim().chars().take(160).collect::<String>()
            )
        })
        .unwrap_or_else(|| "no log output".into())
}

fn read(input: &DecisionInput) -> Reading {
    let r = &input.result;
    let tail = r.log_tail.as_str();
    if r.lost {
        return Reading::Transient("the attempt was lost (no result from a worker in time)".into());
    }
    if r.timed_out {
        return Reading::Transient(format!(
            "the tool timed out after {} ms and was killed",
            r.duration_ms
        ));
    }
    if let Some(e) = &r.error {
        return Reading::Permanent(format!("the tool could not run: {e}"));
    }
    if r.exit_code != 0 {
        let code = r.exit_code;
        if TRANSIENT_EXIT.contains(&code) {
            let at = cite(tail, &TRANSIENT_LOG).unwrap_or_else(|| last_line(tail));
            return Reading::Transient(format!("exit code {code} (temporary failure); {at}"));
        }
        if let Some(at) = cite(tail, &TRANSIENT_LOG) {
            return Reading::Transient(format!("exit code {code}; {at}"));
        }
        if PERMANENT_EXIT.contains(&code) {
            return Reading::Permanent(format!(
                "exit code {code} (usage, config or missing program); {}",
                last_line(tail)
            ));
        }
        if let Some(at) = cite(tail, &PERMANENT_LOG) {
            return Reading::Permanent(format!("exit code {code}; {at}"));
        }
        if let Some(sig) = r.signal {
            return Reading::Transient(format!(
                "the tool was killed by signal {sig} (exit code {code})"
            ));
        }
        return Reading::Unknown(format!("exit code {code}; {}", last_line(tail)));
    }
    // Exit 0, but an error check failed: the output is missing, short or the log shows a fault.
    let failed: Vec<String> = input
        .report
        .failed(Severity::Error)
        .map(|c| format!("{} ({})", c.name, c.detail))
        .collect();
    if let Some(at) = cite(tail, &PERMANENT_LOG) {
        return Reading::Permanent(format!(
            "exit code 0 but checks failed: {}; {at}",
            failed.join("; ")
        ));
    }
    Reading::Transient(format!(
        "exit code 0 but checks failed: {}; a fresh attempt may produce a complete output",
        failed.join("; ")
    ))
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
        assert!(d.reason.contains("log tail line 2"), "{}", d.reason);
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
    fn unclassified_failures_escalate() {
        let d = decide(&input(result(3, "something odd happened"), vec![], 1, 3));
        assert_eq!(d.action, Action::Escalate);
        assert!(d.reason.contains("something odd happened"), "{}", d.reason);
    }
}
