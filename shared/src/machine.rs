//! The run state machine and its guard: the physics of a run.
//!
//! A run goes `INIT → step 1 → … → step N → COMPLETE`, or ends `HALTED` (keeping the failed
//! step, so it can be resumed), `ESCALATED` (parked until an operator answers) or `CANCELLED`.
//! At most one attempt is outstanding at a time; a result for any other attempt id is stale and
//! changes nothing, which makes duplicate deliveries harmless. After each attempt the supervisor
//! proposes an [`Action`]; [`guard`] replaces an illegal one with the safe one and says why.
//!
//! The machine is plain data (serde), so local mode keeps it in memory and fleet mode stores it
//! as JSON beside the run.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contracts::{Action, ReportStatus, Severity, StepResult, ValidationReport};

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "step", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunState {
    /// Created, nothing dispatched yet.
    Init,
    /// Working on step `n` (0-based).
    Running(usize),
    /// Every step proceeded.
    Complete,
    /// Stopped at step `n`; resumable from there.
    Halted(usize),
    /// Parked at step `n` until an operator answers.
    Escalated(usize),
    /// Stopped by an operator.
    Cancelled,
}

impl RunState {
    /// True for COMPLETE, HALTED and CANCELLED (ESCALATED waits, it is not final).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Complete | RunState::Halted(_) | RunState::Cancelled
        )
    }

    /// The state's display name: the step's id while running, else the state's name.
    pub fn name(self, steps: &[StepLimit]) -> String {
        match self {
            RunState::Init => "INIT".into(),
            RunState::Running(i) => steps[i].id.clone(),
            RunState::Complete => "COMPLETE".into(),
            RunState::Halted(_) => "HALTED".into(),
            RunState::Escalated(_) => "ESCALATED".into(),
            RunState::Cancelled => "CANCELLED".into(),
        }
    }

    /// The state without its step.
    pub fn status(self) -> RunStatus {
        match self {
            RunState::Init => RunStatus::Init,
            RunState::Running(_) => RunStatus::Running,
            RunState::Complete => RunStatus::Complete,
            RunState::Halted(_) => RunStatus::Halted,
            RunState::Escalated(_) => RunStatus::Escalated,
            RunState::Cancelled => RunStatus::Cancelled,
        }
    }

    /// The step the state refers to, if any.
    pub fn step(self) -> Option<usize> {
        match self {
            RunState::Running(i) | RunState::Halted(i) | RunState::Escalated(i) => Some(i),
            _ => None,
        }
    }
}

/// What a run is doing, without the step: the one status type the summaries, the audit log's
/// `run_finished` records and the HTTP API use. On the wire it is the upper-case name
/// (`"RUNNING"`, `"COMPLETE"`, ...).
///
/// The variants are declared in alphabetical order so that maps keyed by status (a summary's
/// `counts`) keep the order they had when they were keyed by name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    /// Stopped by an operator (or a shutdown).
    Cancelled,
    /// Every step proceeded.
    Complete,
    /// Parked until an operator answers.
    Escalated,
    /// Stopped at a step; resumable.
    Halted,
    /// Created, not started.
    Init,
    /// Working on a step.
    Running,
}

impl RunStatus {
    /// The wire name (`"COMPLETE"`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Cancelled => "CANCELLED",
            RunStatus::Complete => "COMPLETE",
            RunStatus::Escalated => "ESCALATED",
            RunStatus::Halted => "HALTED",
            RunStatus::Init => "INIT",
            RunStatus::Running => "RUNNING",
        }
    }

    /// True for COMPLETE, HALTED and CANCELLED (ESCALATED waits, it is not final).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunStatus::Complete | RunStatus::Halted | RunStatus::Cancelled
        )
    }
}

impl std::str::FromStr for RunStatus {
    type Err = String;

    /// Parses a wire name (`"COMPLETE"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "CANCELLED" => RunStatus::Cancelled,
            "COMPLETE" => RunStatus::Complete,
            "ESCALATED" => RunStatus::Escalated,
            "HALTED" => RunStatus::Halted,
            "INIT" => RunStatus::Init,
            "RUNNING" => RunStatus::Running,
            other => return Err(format!("`{other}` is not a run status")),
        })
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A step's id and its attempt limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepLimit {
    /// The step's id.
    pub id: String,
    /// Attempts allowed, the first included.
    pub max_attempts: u32,
}

/// The facts of one attempt that the guard needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptFacts {
    /// Exit code.
    pub exit_code: i32,
    /// Killed at its timeout.
    pub timed_out: bool,
    /// Declared lost (no result in time).
    pub lost: bool,
    /// The executor could not run it.
    pub error: Option<String>,
    /// Names of failed `error`-severity checks.
    pub failed_checks: Vec<String>,
}

impl AttemptFacts {
    /// Reads the facts off a result and its report.
    pub fn from_outcome(result: &StepResult, report: &ValidationReport) -> Self {
        let mut failed_checks: Vec<String> = report
            .failed(Severity::Error)
            .map(|c| c.name.clone())
            .collect();
        if report.status == ReportStatus::Fail && failed_checks.is_empty() {
            failed_checks.push("(report status fail)".into());
        }
        AttemptFacts {
            exit_code: result.exit_code,
            timed_out: result.timed_out,
            lost: result.lost,
            error: result.error.clone(),
            failed_checks,
        }
    }

    /// Exit 0, not timed out, not lost, and no `error` check failed: `proceed` is legal.
    pub fn clean(&self) -> bool {
        self.exit_code == 0
            && !self.timed_out
            && !self.lost
            && self.error.is_none()
            && self.failed_checks.is_empty()
    }

    /// Why `proceed` is illegal, in words.
    pub fn why_unclean(&self) -> String {
        let mut why = Vec::new();
        if self.lost {
            why.push("the attempt was lost".to_string());
        }
        if self.timed_out {
            why.push("the tool timed out".to_string());
        }
        if let Some(e) = &self.error {
            why.push(format!("the tool could not run ({e})"));
        }
        if self.exit_code != 0 && !self.timed_out && !self.lost {
            why.push(format!("exit code {}", self.exit_code));
        }
        if !self.failed_checks.is_empty() {
            why.push(format!("failed checks: {}", self.failed_checks.join(", ")));
        }
        why.join("; ")
    }
}

/// The actions legal after an attempt.
pub fn legal_actions(facts: &AttemptFacts, attempt: u32, allowed: u32) -> Vec<Action> {
    Action::ALL
        .into_iter()
        .filter(|a| match a {
            Action::Proceed => facts.clean(),
            Action::Retry => attempt < allowed,
            Action::Halt | Action::Escalate => true,
        })
        .collect()
}

/// The guard: returns the action to apply and, when it differs, why the proposal was illegal.
///
/// `proceed` becomes `retry` while attempts remain, else `halt`; `retry` becomes `halt`.
pub fn guard(
    proposed: Action,
    facts: &AttemptFacts,
    attempt: u32,
    allowed: u32,
) -> (Action, Option<String>) {
    match proposed {
        Action::Proceed if !facts.clean() => {
            let why = format!("proceed is illegal: {}", facts.why_unclean());
            if attempt < allowed {
                (
                    Action::Retry,
                    Some(format!(
                        "{why}; retrying (attempt {attempt} of {allowed} used)"
                    )),
                )
            } else {
                (
                    Action::Halt,
                    Some(format!(
                        "{why}; no attempts left ({attempt} of {allowed} used)"
                    )),
                )
            }
        }
        Action::Retry if attempt >= allowed => (
            Action::Halt,
            Some(format!("retry is illegal: all {allowed} attempts are used")),
        ),
        other => (other, None),
    }
}

/// An attempt the machine has handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The attempt's id (idempotency key).
    pub attempt_id: Uuid,
    /// 0-based step index.
    pub step: usize,
    /// 1-based attempt number.
    pub attempt: u32,
}

/// A move the machine refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    /// The move needs another state.
    #[error("cannot {what} while the run is {state}")]
    WrongState {
        /// The move.
        what: &'static str,
        /// The current state.
        state: String,
    },
    /// The step has used all its attempts.
    #[error("step `{step}` has used all {allowed} attempts")]
    NoAttemptsLeft {
        /// The step.
        step: String,
        /// Its limit.
        allowed: u32,
    },
    /// An operator asked for something illegal.
    #[error("`{action}` is not legal now: {why}")]
    Illegal {
        /// The action.
        action: Action,
        /// Why.
        why: String,
    },
}

/// What happened to a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    /// It answers the outstanding attempt; a decision is now awaited.
    Accepted(Attempt),
    /// It does not; it is ignored.
    Stale(String),
}

/// What the machine does after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Start an attempt of this step (after a backoff when it is a retry).
    Dispatch {
        /// 0-based step index.
        step: usize,
        /// True for a retry of the same step.
        retry: bool,
    },
    /// The run reached a final state.
    Finished(RunState),
    /// The run waits for an operator.
    Parked,
}

/// The outcome of applying a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// What was proposed.
    pub proposed: Action,
    /// What the guard let through.
    pub applied: Action,
    /// Why the guard overrode, when it did.
    pub overridden: Option<String>,
    /// State before.
    pub from: RunState,
    /// State after.
    pub to: RunState,
    /// What to do now.
    pub next: Next,
}

/// One run's state machine. Its fields are private: every change of state, and every attempt
/// handed out, received or withdrawn, goes through a method that checks the move is legal, so
/// nothing outside the machine can write a state or clear an outstanding attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// The pipeline's steps and limits.
    steps: Vec<StepLimit>,
    /// Current state.
    state: RunState,
    /// Attempts started per step (reset when a halted run resumes).
    attempts: Vec<u32>,
    /// Extra attempts granted by operators per step.
    granted: Vec<u32>,
    /// The attempt whose result is awaited.
    outstanding: Option<Attempt>,
    /// The attempt whose result arrived and awaits a decision, with its facts.
    deciding: Option<(Attempt, AttemptFacts)>,
}

impl Machine {
    /// A new run in `INIT`.
    pub fn new(steps: Vec<StepLimit>) -> Self {
        let n = steps.len();
        Machine {
            steps,
            state: RunState::Init,
            attempts: vec![0; n],
            granted: vec![0; n],
            outstanding: None,
            deciding: None,
        }
    }

    /// The pipeline's steps and limits.
    pub fn steps(&self) -> &[StepLimit] {
        &self.steps
    }

    /// The current state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Attempts started per step (reset when a halted run resumes).
    pub fn attempts(&self) -> &[u32] {
        &self.attempts
    }

    /// The attempt whose result is awaited.
    pub fn outstanding(&self) -> Option<Attempt> {
        self.outstanding
    }

    /// The attempt whose result arrived and awaits a decision (or, while escalated, the
    /// operator's answer), with its facts.
    pub fn deciding(&self) -> Option<&(Attempt, AttemptFacts)> {
        self.deciding.as_ref()
    }

    /// True when the run is at a step with no attempt outstanding and none awaiting a decision:
    /// the next thing that can happen to it is [`Machine::begin_attempt`].
    pub fn between_attempts(&self) -> bool {
        matches!(self.state, RunState::Running(_))
            && self.outstanding.is_none()
            && self.deciding.is_none()
    }

    /// The current state's name.
    pub fn state_name(&self) -> String {
        self.state.name(&self.steps)
    }

    /// Attempts allowed for a step, operator grants included.
    pub fn allowed(&self, step: usize) -> u32 {
        self.steps[step].max_attempts + self.granted[step]
    }

    fn wrong(&self, what: &'static str) -> MachineError {
        MachineError::WrongState {
            what,
            state: self.state_name(),
        }
    }

    /// `INIT → first step`.
    pub fn start(&mut self) -> Result<(RunState, RunState), MachineError> {
        if self.state != RunState::Init {
            return Err(self.wrong("start"));
        }
        self.state = RunState::Running(0);
        Ok((RunState::Init, self.state))
    }

    /// Hands out the next attempt of the current step.
    pub fn begin_attempt(&mut self, attempt_id: Uuid) -> Result<Attempt, MachineError> {
        let RunState::Running(step) = self.state else {
            return Err(self.wrong("begin an attempt"));
        };
        if self.outstanding.is_some() || self.deciding.is_some() {
            return Err(self.wrong("begin a second attempt"));
        }
        if self.attempts[step] >= self.allowed(step) {
            return Err(MachineError::NoAttemptsLeft {
                step: self.steps[step].id.clone(),
                allowed: self.allowed(step),
            });
        }
        self.attempts[step] += 1;
        let a = Attempt {
            attempt_id,
            step,
            attempt: self.attempts[step],
        };
        self.outstanding = Some(a);
        Ok(a)
    }

    /// Takes a result (or a loss) for `attempt_id`; anything but the outstanding attempt is stale.
    pub fn receive(&mut self, attempt_id: Uuid, facts: AttemptFacts) -> Receipt {
        match self.outstanding {
            Some(a) if a.attempt_id == attempt_id => {
                self.outstanding = None;
                self.deciding = Some((a, facts));
                Receipt::Accepted(a)
            }
            Some(a) => Receipt::Stale(format!(
                "attempt {attempt_id} is not outstanding (the run awaits {})",
                a.attempt_id
            )),
            None => Receipt::Stale(format!(
                "attempt {attempt_id} is not outstanding (the run is {} with no attempt awaited)",
                self.state_name()
            )),
        }
    }

    /// The actions legal for the attempt awaiting a decision.
    pub fn legal_now(&self) -> Vec<Action> {
        match &self.deciding {
            Some((a, f)) => legal_actions(f, a.attempt, self.allowed(a.step)),
            None => Vec::new(),
        }
    }

    /// Applies the supervisor's proposal through the guard.
    pub fn decide(&mut self, proposed: Action) -> Result<Applied, MachineError> {
        let Some((a, facts)) = self.deciding.take() else {
            return Err(self.wrong("decide"));
        };
        let (applied, overridden) = guard(proposed, &facts, a.attempt, self.allowed(a.step));
        let from = self.state;
        let next = self.apply(applied, a.step, facts);
        Ok(Applied {
            proposed,
            applied,
            overridden,
            from,
            to: self.state,
            next,
        })
    }

    fn apply(&mut self, action: Action, step: usize, facts: AttemptFacts) -> Next {
        match action {
            Action::Proceed if step + 1 == self.steps.len() => {
                self.state = RunState::Complete;
                Next::Finished(self.state)
            }
            Action::Proceed => {
                self.state = RunState::Running(step + 1);
                Next::Dispatch {
                    step: step + 1,
                    retry: false,
                }
            }
            Action::Retry => {
                self.state = RunState::Running(step);
                Next::Dispatch { step, retry: true }
            }
            Action::Halt => {
                self.state = RunState::Halted(step);
                Next::Finished(self.state)
            }
            Action::Escalate => {
                self.state = RunState::Escalated(step);
                // Keep the facts so the operator's answer is judged on the same attempt.
                let attempt = Attempt {
                    attempt_id: Uuid::nil(),
                    step,
                    attempt: self.attempts[step],
                };
                self.deciding = Some((attempt, facts));
                Next::Parked
            }
        }
    }

    /// An operator's answer to an escalation. `retry` is always allowed (it grants one more
    /// attempt when the step has none left); `proceed` only when the attempt was clean;
    /// `escalate` is not an answer.
    pub fn resolve(&mut self, action: Action) -> Result<Applied, MachineError> {
        let RunState::Escalated(step) = self.state else {
            return Err(self.wrong("resolve an escalation"));
        };
        let Some((a, facts)) = self.deciding.clone() else {
            return Err(self.wrong("resolve an escalation"));
        };
        match action {
            Action::Escalate => {
                return Err(MachineError::Illegal {
                    action,
                    why: "an escalation is answered with proceed, retry or halt".into(),
                });
            }
            Action::Proceed if !facts.clean() => {
                return Err(MachineError::Illegal {
                    action,
                    why: facts.why_unclean(),
                });
            }
            Action::Retry if self.attempts[step] >= self.allowed(step) => {
                self.granted[step] += 1;
            }
            _ => {}
        }
        self.deciding = None;
        let from = self.state;
        let next = self.apply(action, a.step, facts);
        Ok(Applied {
            proposed: action,
            applied: action,
            overridden: None,
            from,
            to: self.state,
            next,
        })
    }

    /// Halts a run that cannot go on (e.g. a step that cannot be rendered for its partition),
    /// keeping its step so it can be resumed. An outstanding attempt's result will be stale.
    /// Returns the states before and after.
    pub fn halt(&mut self) -> Result<(RunState, RunState), MachineError> {
        if self.state.is_final() {
            return Err(self.wrong("halt"));
        }
        let from = self.state;
        self.state = RunState::Halted(self.state.step().unwrap_or(0));
        self.outstanding = None;
        self.deciding = None;
        Ok((from, self.state))
    }

    /// Withdraws the outstanding attempt `attempt_id` that never ran (its StepSpec could not
    /// be made, or a worker that may not run it handed it back): it is no longer awaited and
    /// does not count as used.
    pub fn abandon(&mut self, attempt_id: Uuid) -> Result<Attempt, MachineError> {
        match self.outstanding {
            Some(a) if a.attempt_id == attempt_id => {
                self.outstanding = None;
                self.attempts[a.step] = self.attempts[a.step].saturating_sub(1);
                Ok(a)
            }
            _ => Err(self.wrong("abandon an attempt that is not outstanding")),
        }
    }

    /// Stops the run; an outstanding attempt's result will be stale.
    pub fn cancel(&mut self) -> Result<RunState, MachineError> {
        if self.state.is_final() {
            return Err(self.wrong("cancel"));
        }
        let from = self.state;
        self.state = RunState::Cancelled;
        self.outstanding = None;
        self.deciding = None;
        Ok(from)
    }

    /// Resumes a halted run at the step that failed, with fresh attempts; earlier steps are
    /// not run again.
    pub fn resume(&mut self) -> Result<usize, MachineError> {
        let RunState::Halted(step) = self.state else {
            return Err(self.wrong("resume"));
        };
        self.attempts[step] = 0;
        self.granted[step] = 0;
        self.state = RunState::Running(step);
        Ok(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine::new(vec![
            StepLimit {
                id: "EXTRACT".into(),
                max_attempts: 2,
            },
            StepLimit {
                id: "LOAD".into(),
                max_attempts: 1,
            },
        ])
    }

    fn clean() -> AttemptFacts {
        AttemptFacts {
            exit_code: 0,
            timed_out: false,
            lost: false,
            error: None,
            failed_checks: vec![],
        }
    }

    fn failed_check() -> AttemptFacts {
        AttemptFacts {
            failed_checks: vec!["file_exists(draft)".into()],
            ..clean()
        }
    }

    fn run_attempt(m: &mut Machine, facts: AttemptFacts) -> Attempt {
        let id = Uuid::now_v7();
        let a = m.begin_attempt(id).unwrap();
        assert_eq!(m.receive(id, facts), Receipt::Accepted(a));
        a
    }

    #[test]
    fn proceed_advances_to_complete() {
        let mut m = machine();
        assert_eq!(m.state_name(), "INIT");
        m.start().unwrap();
        assert_eq!(m.state_name(), "EXTRACT");
        run_attempt(&mut m, clean());
        let a = m.decide(Action::Proceed).unwrap();
        assert_eq!(
            a.next,
            Next::Dispatch {
                step: 1,
                retry: false
            }
        );
        assert_eq!(m.state_name(), "LOAD");
        run_attempt(&mut m, clean());
        let a = m.decide(Action::Proceed).unwrap();
        assert_eq!(a.next, Next::Finished(RunState::Complete));
        assert_eq!(m.state_name(), "COMPLETE");
    }

    #[test]
    fn retry_increments_attempts_until_the_limit() {
        let mut m = machine();
        m.start().unwrap();
        let first = run_attempt(&mut m, failed_check());
        assert_eq!(first.attempt, 1);
        assert_eq!(
            m.legal_now(),
            vec![Action::Retry, Action::Halt, Action::Escalate]
        );
        let a = m.decide(Action::Retry).unwrap();
        assert_eq!(a.applied, Action::Retry);
        assert_eq!(
            a.next,
            Next::Dispatch {
                step: 0,
                retry: true
            }
        );
        let second = run_attempt(&mut m, failed_check());
        assert_eq!(second.attempt, 2);
        assert_eq!(m.attempts[0], 2);
        assert_eq!(m.legal_now(), vec![Action::Halt, Action::Escalate]);
        // A retry past the limit is overridden to halt.
        let a = m.decide(Action::Retry).unwrap();
        assert_eq!(a.applied, Action::Halt);
        assert!(a.overridden.unwrap().contains("all 2 attempts"));
        assert_eq!(m.state, RunState::Halted(0));
        assert!(m.begin_attempt(Uuid::now_v7()).is_err());
    }

    #[test]
    fn guard_never_proceeds_past_a_failed_check() {
        let mut m = machine();
        m.start().unwrap();
        run_attempt(&mut m, failed_check());
        let a = m.decide(Action::Proceed).unwrap();
        assert_eq!(a.applied, Action::Retry);
        assert!(
            a.overridden
                .as_deref()
                .unwrap()
                .contains("file_exists(draft)")
        );
        run_attempt(&mut m, failed_check());
        let a = m.decide(Action::Proceed).unwrap();
        assert_eq!(a.applied, Action::Halt);
        assert_eq!(a.to, RunState::Halted(0));
    }

    #[test]
    fn guard_table() {
        let timed_out = AttemptFacts {
            exit_code: 143,
            timed_out: true,
            ..clean()
        };
        assert_eq!(
            guard(Action::Proceed, &clean(), 1, 1),
            (Action::Proceed, None)
        );
        assert_eq!(guard(Action::Proceed, &timed_out, 1, 3).0, Action::Retry);
        assert_eq!(guard(Action::Proceed, &timed_out, 3, 3).0, Action::Halt);
        assert_eq!(guard(Action::Retry, &clean(), 3, 3).0, Action::Halt);
        assert_eq!(guard(Action::Halt, &clean(), 1, 3), (Action::Halt, None));
        assert_eq!(
            guard(Action::Escalate, &timed_out, 3, 3),
            (Action::Escalate, None)
        );
    }

    #[test]
    fn stale_and_duplicate_results_are_ignored() {
        let mut m = machine();
        m.start().unwrap();
        let id = Uuid::now_v7();
        m.begin_attempt(id).unwrap();
        assert!(matches!(
            m.receive(Uuid::now_v7(), clean()),
            Receipt::Stale(_)
        ));
        assert!(matches!(m.receive(id, clean()), Receipt::Accepted(_)));
        // The same result delivered twice.
        assert!(matches!(m.receive(id, clean()), Receipt::Stale(_)));
        m.decide(Action::Proceed).unwrap();
        assert!(matches!(m.receive(id, clean()), Receipt::Stale(_)));
        assert_eq!(m.state_name(), "LOAD");
    }

    #[test]
    fn lost_attempts_are_failures() {
        let lost = AttemptFacts {
            exit_code: -1,
            lost: true,
            ..clean()
        };
        assert!(!lost.clean());
        assert!(lost.why_unclean().contains("lost"));
    }

    #[test]
    fn escalation_waits_for_an_operator() {
        let mut m = machine();
        m.start().unwrap();
        run_attempt(&mut m, failed_check());
        m.decide(Action::Retry).unwrap();
        run_attempt(&mut m, failed_check());
        let a = m.decide(Action::Escalate).unwrap();
        assert_eq!(a.next, Next::Parked);
        assert_eq!(m.state_name(), "ESCALATED");
        assert!(!m.state.is_final());
        assert!(matches!(
            m.resolve(Action::Proceed),
            Err(MachineError::Illegal { .. })
        ));
        // Retry grants an attempt beyond the limit.
        let a = m.resolve(Action::Retry).unwrap();
        assert_eq!(
            a.next,
            Next::Dispatch {
                step: 0,
                retry: true
            }
        );
        let third = run_attempt(&mut m, clean());
        assert_eq!(third.attempt, 3);
        m.decide(Action::Proceed).unwrap();
        assert_eq!(m.state_name(), "LOAD");
    }

    #[test]
    fn halted_runs_resume_at_the_failed_step() {
        let mut m = machine();
        m.start().unwrap();
        run_attempt(&mut m, clean());
        m.decide(Action::Proceed).unwrap();
        run_attempt(&mut m, failed_check());
        m.decide(Action::Halt).unwrap();
        assert_eq!(m.state, RunState::Halted(1));
        assert_eq!(m.resume().unwrap(), 1);
        assert_eq!(m.state_name(), "LOAD");
        assert_eq!(m.attempts, vec![1, 0]);
        assert_eq!(run_attempt(&mut m, clean()).attempt, 1);
    }

    #[test]
    fn cancel_makes_the_outstanding_result_stale() {
        let mut m = machine();
        m.start().unwrap();
        let id = Uuid::now_v7();
        m.begin_attempt(id).unwrap();
        m.cancel().unwrap();
        assert!(matches!(m.receive(id, clean()), Receipt::Stale(_)));
        assert!(m.cancel().is_err());
    }

    #[test]
    fn machine_round_trips_as_json() {
        let mut m = machine();
        m.start().unwrap();
        run_attempt(&mut m, failed_check());
        let back: Machine = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}
