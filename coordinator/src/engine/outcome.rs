//! Results and decisions: a worker's outcome (or a lost attempt) is received by the run's
//! machine, handed to the supervisor, and its decision applied through the guard.

use std::sync::Arc;

use tracing::{debug, warn};
use uuid::Uuid;
use warpline_shared::audit::AuditEvent;
use warpline_shared::contracts::{
    Check, PipelineState, ReportStatus, SCHEMA_VERSION, Severity, StepAttempts, StepOutcome,
    StepResult, ValidationReport,
};
use warpline_shared::machine::{AttemptFacts, Receipt, RunState};

use super::{AUDIT_TAIL_BYTES, Effect, Engine};

/// Warnings kept per run in its summary (a tool that warns on every attempt stays bounded).
const MAX_WARNINGS_KEPT: usize = 50;
use crate::supervisor::{AgentReply, DecisionInput};

impl Engine {
    pub(super) fn on_outcome(&mut self, mut outcome: StepOutcome) {
        let r = &outcome.result;
        let (Some(run_id), Some(attempt_id)) = (r.run_id, r.attempt_id) else {
            self.record(
                None,
                None,
                AuditEvent::StaleResult {
                    step_id: r.step_id.clone(),
                    attempt_id: r.attempt_id,
                    reason: "the result names no run or attempt".into(),
                },
            );
            return;
        };
        let Some(run) = self.runs.get_mut(&run_id) else {
            self.record(
                None,
                Some(run_id),
                AuditEvent::StaleResult {
                    step_id: r.step_id.clone(),
                    attempt_id: Some(attempt_id),
                    reason: format!("run {run_id} is unknown to this coordinator"),
                },
            );
            return;
        };
        // A worker that may not run the step hands it back: not an attempt, not judged.
        if outcome.result.refused {
            return self.on_hand_back(run_id, attempt_id, outcome);
        }
        // Backfill-level gates join the report before the state machine judges it, and only
        // for the attempt it awaits (a stale duplicate must not count as a sibling).
        if let Some(step) = run
            .machine
            .outstanding()
            .filter(|a| a.attempt_id == attempt_id)
            .map(|a| a.step)
        {
            self.gate(run_id, step, &mut outcome);
        }
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let facts = AttemptFacts::from_outcome(&outcome.result, &outcome.report);
        // A result that would let the run proceed must report every check the step
        // configures: one that leaves some out (forged, or from a worker that skipped them) is
        // rejected, and the attempt stays awaited.
        if facts.clean()
            && let Some(a) = run
                .machine
                .outstanding()
                .filter(|a| a.attempt_id == attempt_id)
        {
            let backfill = run.backfill_id;
            let pipeline = self.pipeline_of(run_id);
            let reported: std::collections::HashSet<&str> = outcome
                .report
                .checks
                .iter()
                .map(|c| c.name.as_str())
                .collect();
            let missing: Vec<String> = pipeline.steps()[a.step]
                .validations
                .iter()
                .map(|v| v.report_name())
                .filter(|n| !reported.contains(n.as_str()))
                .collect();
            if !missing.is_empty() {
                warn!(%run_id, %attempt_id, ?missing, "rejecting a result that does not report the step's checks");
                self.record(
                    Some(backfill),
                    Some(run_id),
                    AuditEvent::StaleResult {
                        step_id: outcome.result.step_id.clone(),
                        attempt_id: Some(attempt_id),
                        reason: format!(
                            "rejected: the report does not cover the step's checks (missing {}); the attempt is still awaited",
                            missing.join(", ")
                        ),
                    },
                );
                return;
            }
        }
        let run = self.runs.get_mut(&run_id).expect("run exists");
        match run.machine.receive(attempt_id, facts) {
            Receipt::Stale(reason) => {
                let step_id = outcome.result.step_id.clone();
                let backfill = Some(run.backfill_id);
                // Stale results change nothing, so the run is not marked dirty.
                self.record(
                    backfill,
                    Some(run_id),
                    AuditEvent::StaleResult {
                        step_id,
                        attempt_id: Some(attempt_id),
                        reason,
                    },
                );
            }
            Receipt::Accepted(a) => {
                run.dispatched_at = None;
                run.hand_backs.clear();
                let mut audited = outcome.clone();
                bound_tail(&mut audited.result.log_tail, AUDIT_TAIL_BYTES);
                self.record_run(run_id, AuditEvent::StepResult { outcome: audited });
                outcome.result.attempt = a.attempt;
                self.release(run_id, a.step);
                self.ask(run_id, outcome);
            }
        }
    }

    /// Evaluates the step's backfill-level gates (`sibling_deviation`, see [`crate::gates`])
    /// on an accepted outcome and keeps its failed warnings, before the supervisor sees it.
    fn gate(&mut self, run_id: Uuid, step: usize, outcome: &mut StepOutcome) {
        let Some(run) = self.runs.get(&run_id) else {
            return;
        };
        let (bid, partition) = (run.backfill_id, run.partition.clone());
        // Backfill-level steps have no siblings (the config refuses such gates on them).
        if run.scope.is_partition()
            && let Some(b) = self.backfills.get_mut(&bid)
            && crate::gates::apply(
                &b.pipeline,
                step,
                &partition,
                &mut outcome.report,
                &mut b.rec.siblings,
            )
        {
            self.dirty_backfills.insert(bid);
        }
        let step_id = outcome.result.step_id.clone();
        if let Some(run) = self.runs.get_mut(&run_id) {
            for c in outcome.report.failed(Severity::Warn) {
                if run.warnings.len() < MAX_WARNINGS_KEPT {
                    run.warnings
                        .push(format!("{step_id}: {} ({})", c.name, c.detail));
                }
            }
        }
    }

    pub(super) fn on_deadline(&mut self, run_id: Uuid, attempt_id: Uuid) {
        let Some(run) = self.runs.get(&run_id) else {
            return;
        };
        let Some(a) = run
            .machine
            .outstanding()
            .filter(|a| a.attempt_id == attempt_id)
        else {
            return;
        };
        let pipeline = self.pipeline_of(run_id);
        let step = &pipeline.steps()[a.step];
        let reason = format!(
            "no result within timeout_s {} + lost_grace_s {}",
            step.timeout_s, pipeline.config.lost_grace_s
        );
        self.declare_lost(run_id, attempt_id, reason);
    }

    /// Hands an attempt that will not report to the supervisor as a failed one.
    pub(super) fn declare_lost(&mut self, run_id: Uuid, attempt_id: Uuid, reason: String) {
        let Some(a) = self.runs[&run_id]
            .machine
            .outstanding()
            .filter(|a| a.attempt_id == attempt_id)
        else {
            return;
        };
        let step_id = self.runs[&run_id].machine.steps()[a.step].id.clone();
        self.record_run(
            run_id,
            AuditEvent::AttemptLost {
                step_id: step_id.clone(),
                attempt: a.attempt,
                attempt_id,
                reason: reason.clone(),
            },
        );
        self.on_outcome(lost_outcome(
            run_id, attempt_id, &step_id, a.attempt, reason,
        ));
    }

    /// Builds the supervisor's view and asks the agent (after the turn commits).
    pub(super) fn ask(&mut self, run_id: Uuid, outcome: StepOutcome) {
        let pipeline = self.pipeline_of(run_id);
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let Some((a, _)) = run.machine.deciding().cloned() else {
            return;
        };
        let attempts = run
            .machine
            .steps()
            .iter()
            .enumerate()
            .map(|(i, s)| StepAttempts {
                step_id: s.id.clone(),
                used: run.machine.attempts()[i],
                allowed: run.machine.allowed(i),
            })
            .collect();
        let state = PipelineState {
            schema_version: SCHEMA_VERSION,
            pipeline: pipeline.name().to_string(),
            run_id,
            partition: run.partition.clone(),
            state: run.machine.state_name(),
            step_id: run.machine.steps()[a.step].id.clone(),
            attempt: a.attempt,
            max_attempts: run.machine.allowed(a.step),
            attempts,
            history: run.history.clone(),
            legal_actions: run.machine.legal_now(),
        };
        let input = DecisionInput {
            state,
            result: outcome.result.clone(),
            report: outcome.report.clone(),
        };
        run.last = Some(Box::new(outcome));
        self.dirty_runs.insert(run_id);
        if let Some(reply) = self.agent.decide_now(&input) {
            // No I/O needed (the rules, the fast path): decided in this turn, so the result,
            // the decision and the next StepSpec commit together.
            return self.on_decided(run_id, a.attempt_id, reply);
        }
        self.effects.push(Effect::Decide {
            run_id,
            attempt_id: a.attempt_id,
            input: Arc::new(input),
        });
    }

    pub(super) fn on_decided(&mut self, run_id: Uuid, attempt_id: Uuid, reply: AgentReply) {
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let Some((a, facts)) = run.machine.deciding().cloned() else {
            return;
        };
        if a.attempt_id != attempt_id || !matches!(run.machine.state(), RunState::Running(_)) {
            debug!(%run_id, %attempt_id, "decision for an attempt no longer awaiting one");
            return;
        }
        let step_id = run.machine.steps()[a.step].id.clone();
        let applied = match run.machine.decide(reply.decision.action) {
            Ok(applied) => applied,
            Err(e) => {
                warn!(%run_id, error = %e, "decision refused by the state machine");
                return;
            }
        };
        run.close_attempt(
            step_id.clone(),
            a.attempt,
            &facts,
            applied.applied,
            reply.decision.reason.clone(),
        );
        let reason = match &applied.overridden {
            Some(why) => why.clone(),
            None => reply.decision.reason.clone(),
        };
        if reply.model.is_some() || reply.requests.is_some() {
            let bid = self.runs.get(&run_id).map(|r| r.backfill_id);
            if let Some(b) = bid.and_then(|bid| self.backfills.get_mut(&bid)) {
                let u = &mut b.rec.llm;
                u.decisions += 1;
                u.requests += u64::from(reply.requests.unwrap_or(1));
                if let Some(t) = &reply.tokens {
                    u.input_tokens += t.input;
                    u.output_tokens += t.output;
                }
                self.dirty_backfills.insert(b.rec.id);
            }
        }
        self.record_run(
            run_id,
            AuditEvent::Decision {
                step_id: step_id.clone(),
                attempt: a.attempt,
                agent: reply.agent,
                model: reply.model,
                decision: reply.decision,
                latency_ms: reply.latency_ms,
                tokens: reply.tokens,
                fallback: reply.fallback,
                prompt_hash: reply.prompt_hash,
                raw_reply: reply.raw_reply,
                requests: reply.requests,
                state: reply.state.map(Box::new),
                shadow: reply.shadow.map(Box::new),
            },
        );
        if let Some(why) = &applied.overridden {
            self.record_run(
                run_id,
                AuditEvent::GuardOverride {
                    step_id: step_id.clone(),
                    proposed: applied.proposed,
                    applied: applied.applied,
                    reason: why.clone(),
                },
            );
        }
        self.follow(run_id, a.attempt, step_id, applied, reason);
    }
}

/// The outcome standing in for an attempt that never reported.
fn lost_outcome(
    run_id: Uuid,
    attempt_id: Uuid,
    step_id: &str,
    attempt: u32,
    reason: String,
) -> StepOutcome {
    let result = StepResult {
        run_id: Some(run_id),
        attempt_id: Some(attempt_id),
        attempt,
        lost: true,
        ..StepResult::new(step_id, -1)
    };
    let report = ValidationReport {
        schema_version: SCHEMA_VERSION,
        status: ReportStatus::Fail,
        checks: vec![Check {
            name: "result received".into(),
            kind: "attempt_lost".into(),
            severity: Severity::Error,
            passed: false,
            detail: reason,
            value: None,
        }],
    };
    StepOutcome {
        schema_version: SCHEMA_VERSION,
        result,
        report,
    }
}

/// Keeps the last `max` bytes of a log tail, on a character boundary.
pub fn bound_tail(tail: &mut String, max: usize) {
    if tail.len() <= max {
        return;
    }
    let mut cut = tail.len() - max;
    while !tail.is_char_boundary(cut) {
        cut += 1;
    }
    let omitted = cut;
    *tail = format!("[... {omitted} bytes omitted ...]{}", &tail[cut..]);
}
