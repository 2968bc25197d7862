//! Hand-backs (fleet mode): a worker that may not run a step (not on its allowlist, or the
//! command does not resolve on it) answers with a `refused` result instead of failing it.
//!
//! The refused attempt is withdrawn without counting ([`Machine::abandon`]) and the step is
//! begun again after a delay, as a new attempt id with the same attempt number, so a
//! redelivered copy of the refusal is stale like any duplicate. Everything is committed in the
//! turn of the refusal before its message is acked, and the re-dispatch goes through the
//! outbox like any StepSpec: a coordinator that dies in between recovers a run between
//! attempts and begins it again. What [`crate::fleet::capability::after_hand_back`] decides
//! bounds the hand-backs; past the bound the run escalates with the reason, naming the step,
//! the command and the refusing workers — not HALTED, since no tool failed.
//!
//! [`Machine::abandon`]: warpline_shared::machine::Machine::abandon

use std::time::Instant;

use tracing::warn;
use uuid::Uuid;
use warpline_shared::audit::AuditEvent;
use warpline_shared::contracts::{Action, StepOutcome, SupervisorDecision};
use warpline_shared::machine::{AttemptFacts, Receipt};

use super::liveness::silence;
use super::{AUDIT_TAIL_BYTES, Engine, Event, bound_tail, ports::Effect};
use crate::fleet::capability::{AfterHandBack, HandBack, after_hand_back};
use crate::supervisor::AgentReply;

/// The agent name the audit log gives the coordinator's own escalation after hand-backs.
pub const HAND_BACK_AGENT: &str = "hand-back";

impl Engine {
    pub(super) fn on_hand_back(&mut self, run_id: Uuid, attempt_id: Uuid, outcome: StepOutcome) {
        let run = self
            .runs
            .get_mut(&run_id)
            .expect("the caller checked the run");
        let Some(a) = run
            .machine
            .outstanding()
            .filter(|a| a.attempt_id == attempt_id)
        else {
            let backfill = Some(run.backfill_id);
            self.record(
                backfill,
                Some(run_id),
                AuditEvent::StaleResult {
                    step_id: outcome.result.step_id.clone(),
                    attempt_id: Some(attempt_id),
                    reason: "a hand-back of an attempt that is not outstanding".into(),
                },
            );
            return;
        };
        let pipeline = self.pipeline_of(run_id);
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let spec = match pipeline.render_step(a.step, &run.partition, run_id, a.attempt, attempt_id)
        {
            Ok(spec) => spec,
            Err(e) => {
                // It rendered when it was dispatched; should that change, halt as begin would.
                let _ = run.machine.abandon(attempt_id);
                return self.stop_run(run_id, format!("cannot render the step: {e}"));
            }
        };
        let reason = outcome
            .result
            .error
            .clone()
            .unwrap_or_else(|| "the worker may not run it".into());
        run.hand_backs.push(HandBack {
            worker_id: outcome.result.worker_id.clone(),
            reason: reason.clone(),
        });
        let now = Instant::now();
        let live = self
            .workers
            .values()
            .filter(|(hb, at)| now.duration_since(*at) < silence(hb.interval_s))
            .map(|(hb, _)| hb);
        let next = after_hand_back(&spec, &run.hand_backs, live);
        let hand_backs = u32::try_from(run.hand_backs.len()).unwrap_or(u32::MAX);
        let (next_name, delay) = match &next {
            AfterHandBack::Redispatch(d) => ("redispatch", *d),
            AfterHandBack::Escalate(_) => ("escalate", std::time::Duration::ZERO),
        };
        self.record_run(
            run_id,
            AuditEvent::StepHandedBack {
                step_id: spec.step_id.clone(),
                attempt: a.attempt,
                attempt_id,
                worker_id: outcome.result.worker_id.clone(),
                reason,
                hand_backs,
                next: next_name.into(),
                delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            },
        );
        match next {
            AfterHandBack::Redispatch(after) => {
                let run = self.runs.get_mut(&run_id).expect("run exists");
                if run.machine.abandon(attempt_id).is_err() {
                    return;
                }
                run.attempts_total[a.step] = run.attempts_total[a.step].saturating_sub(1);
                run.dispatched_at = None;
                self.release(run_id, a.step);
                self.effects.push(Effect::Timer {
                    after,
                    event: Event::Ready {
                        run_id,
                        waited_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
                    },
                });
            }
            AfterHandBack::Escalate(why) => {
                warn!(%run_id, step = %spec.step_id, reason = %why, "no worker took the step: escalating");
                let run = self.runs.get_mut(&run_id).expect("run exists");
                run.hand_backs.clear();
                let facts = AttemptFacts::from_outcome(&outcome.result, &outcome.report);
                let Receipt::Accepted(a) = run.machine.receive(attempt_id, facts) else {
                    return;
                };
                run.dispatched_at = None;
                let mut audited = outcome.clone();
                bound_tail(&mut audited.result.log_tail, AUDIT_TAIL_BYTES);
                self.record_run(run_id, AuditEvent::StepResult { outcome: audited });
                self.release(run_id, a.step);
                let run = self.runs.get_mut(&run_id).expect("run exists");
                run.last = Some(Box::new(outcome));
                let reply = AgentReply::new(
                    HAND_BACK_AGENT,
                    SupervisorDecision::new(Action::Escalate, why),
                );
                self.on_decided(run_id, attempt_id, reply);
            }
        }
    }
}
