//! The coordinator's event loop: every input becomes one [`Event`], handled in one place by the
//! [`Engine`], which owns every run's state machine. No locks: the loop is the only writer.
//!
//! A turn takes the events that are ready (one at least, at most [`MAX_TURN`]), applies them to
//! the runs, stages what happened in the store (the audit log, and in fleet mode the database),
//! commits, and only then acts: dispatches StepSpecs, spawns supervisor calls, arms timers. An
//! action is therefore never taken that the store does not already hold (persist before act).
//!
//! Local mode and fleet mode run this same loop; only the [`Transport`] (channels or RabbitMQ)
//! and the [`Store`] (a JSONL file, or PostgreSQL beside it) differ.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::{
    Action, AttemptSummary, Check, PipelineState, ReportStatus, SCHEMA_VERSION, Severity,
    StepAttempts, StepOutcome, StepResult, ValidationReport,
};
use warpline_shared::machine::{AttemptFacts, Machine, Next, Receipt, RunState, StepLimit};
use warpline_shared::partition::Partition;

use crate::supervisor::{Agent, AgentReply, DecisionInput};

/// Most events handled in one turn before committing.
pub const MAX_TURN: usize = 512;
/// Bytes of a result's log tail kept in the audit log.
pub const AUDIT_TAIL_BYTES: usize = 4096;

/// Everything that can happen to the coordinator.
#[derive(Debug)]
pub enum Event {
    /// A worker's result and report.
    Outcome(Box<StepOutcome>),
    /// A supervisor agent answered for an attempt.
    Decided {
        /// The run.
        run_id: Uuid,
        /// The attempt decided on.
        attempt_id: Uuid,
        /// The agent's reply.
        reply: Box<AgentReply>,
    },
    /// A retry's backoff has elapsed.
    Ready {
        /// The run.
        run_id: Uuid,
        /// How long it waited.
        waited_ms: u64,
    },
    /// An attempt's deadline (timeout + grace) has passed.
    Deadline {
        /// The run.
        run_id: Uuid,
        /// The attempt.
        attempt_id: Uuid,
    },
    /// Stop: cancel every unfinished run and end the loop.
    Shutdown {
        /// Why (e.g. "interrupted (SIGINT)").
        reason: String,
    },
}

/// Sends StepSpecs to workers. Must not block: fleet mode hands the spec to its publisher,
/// local mode to a channel sized for every run's one outstanding attempt.
pub trait Transport: Send {
    /// Queues one StepSpec for a worker.
    fn dispatch(&mut self, spec: warpline_shared::contracts::StepSpec) -> anyhow::Result<()>;
}

/// Durable state of the coordinator.
pub trait Store: Send {
    /// Stages an audit event in the current turn and returns the sealed record.
    fn record(
        &mut self,
        backfill_id: Option<Uuid>,
        run_id: Option<Uuid>,
        event: AuditEvent,
    ) -> AuditRecord;
    /// Makes the turn durable. Called before any of its effects is acted on.
    fn commit(&mut self) -> anyhow::Result<()>;
    /// Where the audit log lives and its head hash, for summaries.
    fn audit_location(&self) -> (String, String);
}

impl Store for crate::audit_log::AuditLog {
    fn record(
        &mut self,
        backfill_id: Option<Uuid>,
        run_id: Option<Uuid>,
        event: AuditEvent,
    ) -> AuditRecord {
        self.stage(backfill_id, run_id, event)
    }

    fn commit(&mut self) -> anyhow::Result<()> {
        crate::audit_log::AuditLog::commit(self)
    }

    fn audit_location(&self) -> (String, String) {
        (self.path().display().to_string(), self.head().to_string())
    }
}

/// Watches committed records (progress bars, line logs).
pub trait Observer: Send {
    /// Called for every committed record, in order.
    fn on_record(&mut self, record: &AuditRecord);
    /// Called once when the loop ends.
    fn finish(&mut self) {}
}

/// An action decided in a turn, taken after the turn commits.
enum Effect {
    Dispatch(Box<warpline_shared::contracts::StepSpec>),
    Decide {
        run_id: Uuid,
        attempt_id: Uuid,
        input: Arc<DecisionInput>,
    },
    Timer {
        after: Duration,
        event: Event,
    },
}

/// One run.
struct Run {
    id: Uuid,
    partition: Partition,
    machine: Machine,
    history: Vec<AttemptSummary>,
    /// Attempts per step over the run's whole life (not reset by a resume).
    attempts_total: Vec<u32>,
    /// The outcome awaiting a decision.
    last: Option<StepOutcome>,
    /// Why the run stopped, when it did.
    reason: Option<String>,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most runs in progress at once (rolling: the next starts when one ends).
    pub max_parallel: usize,
    /// End the loop when no run can move any more (local mode).
    pub exit_when_idle: bool,
}

/// One run in the final summary.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The run.
    pub run_id: Uuid,
    /// Its partition key.
    pub partition: String,
    /// Its month.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub month: Option<String>,
    /// Its dataset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Final state (or ESCALATED).
    pub state: String,
    /// The step it stopped at, if not complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Attempts per step.
    pub attempts: BTreeMap<String, u32>,
    /// Why it did not complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The backfill's summary (`warpline run --json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Contract version.
    pub schema_version: u32,
    /// The backfill.
    pub backfill_id: Uuid,
    /// The pipeline's name.
    pub pipeline: String,
    /// Runs by final state.
    pub counts: BTreeMap<String, usize>,
    /// Attempts executed (results received, losses included).
    pub steps_executed: u64,
    /// Wall time.
    pub wall_ms: u64,
    /// The audit log.
    pub audit: String,
    /// Its last line's hash.
    pub audit_head: String,
    /// Every run.
    pub runs: Vec<RunSummary>,
}

impl Summary {
    /// True when every run completed.
    pub fn all_complete(&self) -> bool {
        self.runs.iter().all(|r| r.state == "COMPLETE")
    }
}

/// The event loop's state.
pub struct Engine {
    pipeline: Arc<Pipeline>,
    backfill_id: Uuid,
    cfg: EngineConfig,
    runs: HashMap<Uuid, Run>,
    order: Vec<Uuid>,
    /// Runs not started yet, in partition order.
    pending: VecDeque<Uuid>,
    /// Runs started and not yet final or parked.
    active: usize,
    /// Attempts in flight per step (for `concurrency` caps).
    inflight: Vec<u32>,
    /// Runs waiting for a step's cap, per step.
    waiting: Vec<VecDeque<Uuid>>,
    agent: Arc<dyn Agent>,
    store: Box<dyn Store>,
    transport: Box<dyn Transport>,
    observer: Box<dyn Observer>,
    /// Feeds timers and agent replies back into the loop. Unbounded, yet bounded in practice:
    /// each run has at most one attempt, one decision and one timer outstanding at a time.
    events: mpsc::UnboundedSender<Event>,
    effects: Vec<Effect>,
    turn: Vec<AuditRecord>,
    steps_executed: u64,
    stopping: bool,
    started: Instant,
}

impl Engine {
    /// A new engine for one backfill.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pipeline: Arc<Pipeline>,
        backfill_id: Uuid,
        cfg: EngineConfig,
        agent: Arc<dyn Agent>,
        store: Box<dyn Store>,
        transport: Box<dyn Transport>,
        observer: Box<dyn Observer>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Engine {
        let n = pipeline.steps().len();
        Engine {
            pipeline,
            backfill_id,
            cfg,
            runs: HashMap::new(),
            order: Vec::new(),
            pending: VecDeque::new(),
            active: 0,
            inflight: vec![0; n],
            waiting: vec![VecDeque::new(); n],
            agent,
            store,
            transport,
            observer,
            events,
            effects: Vec::new(),
            turn: Vec::new(),
            steps_executed: 0,
            stopping: false,
            started: Instant::now(),
        }
    }

    /// The backfill's id.
    pub fn backfill_id(&self) -> Uuid {
        self.backfill_id
    }

    fn record(&mut self, run_id: Option<Uuid>, event: AuditEvent) {
        let rec = self.store.record(Some(self.backfill_id), run_id, event);
        self.turn.push(rec);
    }

    /// Accepts a backfill: one run per partition, started as slots free up.
    pub fn submit(&mut self, partitions: &[Partition], agent: &str) {
        let config = self.pipeline.file.display().to_string();
        self.record(
            None,
            AuditEvent::BackfillCreated {
                pipeline: self.pipeline.name().to_string(),
                config,
                partitions: partitions.len(),
                agent: agent.to_string(),
            },
        );
        let limits: Vec<StepLimit> = self
            .pipeline
            .steps()
            .iter()
            .map(|s| StepLimit {
                id: s.id.clone(),
                max_attempts: s.max_attempts,
            })
            .collect();
        for p in partitions {
            let id = Uuid::now_v7();
            self.runs.insert(
                id,
                Run {
                    id,
                    partition: p.clone(),
                    machine: Machine::new(limits.clone()),
                    history: Vec::new(),
                    attempts_total: vec![0; limits.len()],
                    last: None,
                    reason: None,
                },
            );
            self.order.push(id);
            self.pending.push_back(id);
            self.record(
                Some(id),
                AuditEvent::RunCreated {
                    partition: p.clone(),
                },
            );
        }
        self.fill();
    }

    /// Starts pending runs while slots are free.
    fn fill(&mut self) {
        while !self.stopping && self.active < self.cfg.max_parallel {
            let Some(id) = self.pending.pop_front() else {
                break;
            };
            let run = self.runs.get_mut(&id).expect("pending runs exist");
            let (from, to) = run.machine.start().expect("pending runs are in INIT");
            let (from, to) = (from.name(&run.machine.steps), to.name(&run.machine.steps));
            self.active += 1;
            self.record(
                Some(id),
                AuditEvent::Transition {
                    from,
                    to,
                    action: None,
                },
            );
            self.begin(id, 0);
        }
    }

    /// Starts the next attempt of a run's current step, or queues it behind the step's cap.
    fn begin(&mut self, run_id: Uuid, delay_ms: u64) {
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let RunState::Running(step) = run.machine.state else {
            return;
        };
        if let Some(cap) = self.pipeline.steps()[step].concurrency
            && self.inflight[step] >= cap
        {
            self.waiting[step].push_back(run_id);
            return;
        }
        let attempt_id = Uuid::now_v7();
        let attempt = match run.machine.begin_attempt(attempt_id) {
            Ok(a) => a,
            Err(e) => {
                warn!(%run_id, error = %e, "cannot begin an attempt");
                return self.stop_run(run_id, format!("cannot begin an attempt: {e}"));
            }
        };
        let spec = match self.pipeline.render_step(
            step,
            &run.partition,
            run_id,
            attempt.attempt,
            attempt_id,
        ) {
            Ok(s) => s,
            Err(e) => {
                // A partition the config cannot render for: permanent, so halt at once.
                run.machine.outstanding = None;
                return self.stop_run(run_id, format!("cannot render the step: {e}"));
            }
        };
        run.attempts_total[step] += 1;
        self.inflight[step] += 1;
        let deadline = Duration::from_secs(spec.timeout_s + self.pipeline.config.lost_grace_s);
        self.record(
            Some(run_id),
            AuditEvent::StepDispatched {
                step_id: spec.step_id.clone(),
                attempt: spec.attempt,
                attempt_id,
                command: spec.command.clone(),
                args: spec.args.clone(),
                delay_ms,
            },
        );
        self.effects.push(Effect::Dispatch(Box::new(spec)));
        self.effects.push(Effect::Timer {
            after: deadline,
            event: Event::Deadline { run_id, attempt_id },
        });
    }

    /// Halts a run that cannot go on (a config problem found at dispatch time).
    fn stop_run(&mut self, run_id: Uuid, reason: String) {
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let step = run.machine.state.step().unwrap_or(0);
        let from = run.machine.state_name();
        run.machine.state = RunState::Halted(step);
        let to = run.machine.state_name();
        self.record(
            Some(run_id),
            AuditEvent::Transition {
                from,
                to,
                action: Some(Action::Halt),
            },
        );
        self.finish_run(run_id, reason);
    }

    /// Records a run's end and frees its slot.
    fn finish_run(&mut self, run_id: Uuid, reason: String) {
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let state = run.machine.state;
        let step_id = match state {
            RunState::Complete => None,
            s => s.step().map(|i| run.machine.steps[i].id.clone()),
        };
        run.reason = (state != RunState::Complete).then(|| reason.clone());
        self.record(
            Some(run_id),
            AuditEvent::RunFinished {
                state: state.name(&self.runs[&run_id].machine.steps),
                step_id,
                reason,
            },
        );
        self.active = self.active.saturating_sub(1);
        self.fill();
    }

    /// Releases a step's cap slot and starts a run waiting for it.
    fn release(&mut self, step: usize) {
        self.inflight[step] = self.inflight[step].saturating_sub(1);
        while let Some(next) = self.waiting[step].pop_front() {
            if matches!(self.runs[&next].machine.state, RunState::Running(s) if s == step) {
                self.begin(next, 0);
                break;
            }
        }
    }

    /// Handles one event.
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Outcome(outcome) => self.on_outcome(*outcome),
            Event::Decided {
                run_id,
                attempt_id,
                reply,
            } => self.on_decided(run_id, attempt_id, *reply),
            Event::Ready { run_id, waited_ms } => {
                if !self.stopping && self.runs.contains_key(&run_id) {
                    self.begin(run_id, waited_ms);
                }
            }
            Event::Deadline { run_id, attempt_id } => self.on_deadline(run_id, attempt_id),
            Event::Shutdown { reason } => self.shutdown(reason),
        }
    }

    fn on_outcome(&mut self, mut outcome: StepOutcome) {
        let r = &outcome.result;
        let (Some(run_id), Some(attempt_id)) = (r.run_id, r.attempt_id) else {
            self.record(
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
                Some(run_id),
                AuditEvent::StaleResult {
                    step_id: r.step_id.clone(),
                    attempt_id: Some(attempt_id),
                    reason: format!("run {run_id} is not part of this backfill"),
                },
            );
            return;
        };
        let facts = AttemptFacts::from_outcome(&outcome.result, &outcome.report);
        match run.machine.receive(attempt_id, facts) {
            Receipt::Stale(reason) => {
                let step_id = outcome.result.step_id.clone();
                self.record(
                    Some(run_id),
                    AuditEvent::StaleResult {
                        step_id,
                        attempt_id: Some(attempt_id),
                        reason,
                    },
                );
            }
            Receipt::Accepted(a) => {
                self.steps_executed += 1;
                let mut audited = outcome.clone();
                bound_tail(&mut audited.result.log_tail, AUDIT_TAIL_BYTES);
                self.record(Some(run_id), AuditEvent::StepResult { outcome: audited });
                outcome.result.attempt = a.attempt;
                self.release(a.step);
                self.ask(run_id, outcome);
            }
        }
    }

    fn on_deadline(&mut self, run_id: Uuid, attempt_id: Uuid) {
        let Some(run) = self.runs.get(&run_id) else {
            return;
        };
        let Some(a) = run
            .machine
            .outstanding
            .filter(|a| a.attempt_id == attempt_id)
        else {
            return;
        };
        let pipeline = self.pipeline.clone();
        let step = &pipeline.steps()[a.step];
        let reason = format!(
            "no result within timeout_s {} + lost_grace_s {}",
            step.timeout_s, self.pipeline.config.lost_grace_s
        );
        self.record(
            Some(run_id),
            AuditEvent::AttemptLost {
                step_id: step.id.clone(),
                attempt: a.attempt,
                attempt_id,
                reason: reason.clone(),
            },
        );
        let result = StepResult {
            schema_version: SCHEMA_VERSION,
            step_id: step.id.clone(),
            exit_code: -1,
            artefacts: BTreeMap::new(),
            run_id: Some(run_id),
            attempt_id: Some(attempt_id),
            attempt: a.attempt,
            worker_id: String::new(),
            started_at: None,
            finished_at: None,
            duration_ms: 0,
            timed_out: false,
            signal: None,
            lost: true,
            error: None,
            stdout_path: None,
            stderr_path: None,
            log_tail: String::new(),
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
            }],
        };
        self.on_outcome(StepOutcome {
            schema_version: SCHEMA_VERSION,
            result,
            report,
        });
    }

    /// Builds the supervisor's view and asks the agent (after the turn commits).
    fn ask(&mut self, run_id: Uuid, outcome: StepOutcome) {
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let Some((a, _)) = run.machine.deciding.clone() else {
            return;
        };
        let attempts = run
            .machine
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| StepAttempts {
                step_id: s.id.clone(),
                used: run.machine.attempts[i],
                allowed: run.machine.allowed(i),
            })
            .collect();
        let state = PipelineState {
            schema_version: SCHEMA_VERSION,
            pipeline: self.pipeline.name().to_string(),
            run_id,
            partition: run.partition.clone(),
            state: run.machine.state_name(),
            step_id: run.machine.steps[a.step].id.clone(),
            attempt: a.attempt,
            max_attempts: run.machine.allowed(a.step),
            attempts,
            history: run.history.clone(),
            legal_actions: run.machine.legal_now(),
        };
        let input = Arc::new(DecisionInput {
            state,
            result: outcome.result.clone(),
            report: outcome.report.clone(),
        });
        run.last = Some(outcome);
        self.effects.push(Effect::Decide {
            run_id,
            attempt_id: a.attempt_id,
            input,
        });
    }

    fn on_decided(&mut self, run_id: Uuid, attempt_id: Uuid, reply: AgentReply) {
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let Some((a, facts)) = run.machine.deciding.clone() else {
            return;
        };
        if a.attempt_id != attempt_id {
            debug!(%run_id, %attempt_id, "decision for an attempt no longer awaiting one");
            return;
        }
        let step_id = run.machine.steps[a.step].id.clone();
        let applied = match run.machine.decide(reply.decision.action) {
            Ok(applied) => applied,
            Err(e) => {
                warn!(%run_id, error = %e, "decision refused by the state machine");
                return;
            }
        };
        let outcome = run.last.take();
        run.history.push(AttemptSummary {
            step_id: step_id.clone(),
            attempt: a.attempt,
            exit_code: facts.exit_code,
            timed_out: facts.timed_out,
            lost: facts.lost,
            status: outcome
                .as_ref()
                .map(|o| o.report.status)
                .unwrap_or(ReportStatus::Fail),
            failed_checks: facts.failed_checks.clone(),
            action: applied.applied,
            reason: reply.decision.reason.clone(),
        });
        let steps = run.machine.steps.clone();
        let reason = match &applied.overridden {
            Some(why) => why.clone(),
            None => reply.decision.reason.clone(),
        };
        self.record(
            Some(run_id),
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
        if let Some(why) = applied.overridden {
            self.record(
                Some(run_id),
                AuditEvent::GuardOverride {
                    step_id: step_id.clone(),
                    proposed: applied.proposed,
                    applied: applied.applied,
                    reason: why,
                },
            );
        }
        self.record(
            Some(run_id),
            AuditEvent::Transition {
                from: applied.from.name(&steps),
                to: applied.to.name(&steps),
                action: Some(applied.applied),
            },
        );
        match applied.next {
            Next::Dispatch { retry: false, .. } => self.begin(run_id, 0),
            Next::Dispatch { retry: true, .. } => {
                let after = self.pipeline.config.retry.backoff(a.attempt + 1);
                self.effects.push(Effect::Timer {
                    after,
                    event: Event::Ready {
                        run_id,
                        waited_ms: after.as_millis() as u64,
                    },
                });
            }
            Next::Finished(_) => self.finish_run(run_id, reason),
            Next::Parked => {
                self.record(Some(run_id), AuditEvent::Escalated { step_id, reason });
                // A parked run frees its slot; it waits for an operator, not for a worker.
                self.active = self.active.saturating_sub(1);
                self.fill();
            }
        }
    }

    fn shutdown(&mut self, reason: String) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        let ids: Vec<Uuid> = self.order.clone();
        for id in ids {
            let run = self.runs.get_mut(&id).expect("run exists");
            if run.machine.state.is_final() {
                continue;
            }
            let from = run.machine.state;
            let step = from.step().map(|i| run.machine.steps[i].id.clone());
            if run.machine.cancel().is_ok() {
                run.reason = Some(reason.clone());
                let steps = run.machine.steps.clone();
                self.record(
                    Some(id),
                    AuditEvent::Transition {
                        from: from.name(&steps),
                        to: "CANCELLED".into(),
                        action: None,
                    },
                );
                self.record(
                    Some(id),
                    AuditEvent::RunFinished {
                        state: "CANCELLED".into(),
                        step_id: step,
                        reason: reason.clone(),
                    },
                );
            }
        }
        self.pending.clear();
        self.active = 0;
        // Nothing more is dispatched once stopping.
        self.effects
            .retain(|e| !matches!(e, Effect::Dispatch(_) | Effect::Timer { .. }));
    }

    /// True when no run can move any more without an operator.
    pub fn idle(&self) -> bool {
        self.pending.is_empty()
            && self.runs.values().all(|r| {
                r.machine.state.is_final() || matches!(r.machine.state, RunState::Escalated(_))
            })
    }

    /// Commits the turn, shows it, then acts on it.
    fn end_turn(&mut self) -> anyhow::Result<()> {
        self.store.commit()?;
        for rec in self.turn.drain(..) {
            self.observer.on_record(&rec);
        }
        for effect in std::mem::take(&mut self.effects) {
            match effect {
                Effect::Dispatch(spec) => self.transport.dispatch(*spec)?,
                Effect::Decide {
                    run_id,
                    attempt_id,
                    input,
                } => {
                    let fut = self.agent.decide(input);
                    let tx = self.events.clone();
                    tokio::spawn(async move {
                        let reply = Box::new(fut.await);
                        let _ = tx.send(Event::Decided {
                            run_id,
                            attempt_id,
                            reply,
                        });
                    });
                }
                Effect::Timer { after, event } => {
                    let tx = self.events.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = tx.send(event);
                    });
                }
            }
        }
        Ok(())
    }

    /// Runs the loop until every run is final or parked (when `exit_when_idle`), or until a
    /// shutdown, and returns the summary.
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) -> anyhow::Result<Summary> {
        self.end_turn()?;
        while !(self.stopping || (self.cfg.exit_when_idle && self.idle())) {
            let Some(first) = events.recv().await else {
                break;
            };
            self.handle(first);
            for _ in 1..MAX_TURN {
                match events.try_recv() {
                    Ok(ev) => self.handle(ev),
                    Err(_) => break,
                }
            }
            self.end_turn()?;
        }
        let summary = self.summary();
        let count = |s: &str| summary.counts.get(s).copied().unwrap_or(0);
        let reason = if self.stopping {
            "stopped before every run finished".to_string()
        } else {
            "every run is final or waiting for an operator".to_string()
        };
        self.record(
            None,
            AuditEvent::BackfillFinished {
                complete: count("COMPLETE"),
                halted: count("HALTED"),
                cancelled: count("CANCELLED"),
                escalated: count("ESCALATED"),
                reason,
            },
        );
        self.end_turn()?;
        self.observer.finish();
        let (audit, audit_head) = self.store.audit_location();
        Ok(Summary {
            audit,
            audit_head,
            wall_ms: self.started.elapsed().as_millis() as u64,
            ..summary
        })
    }

    fn summary(&self) -> Summary {
        let mut counts = BTreeMap::new();
        let runs: Vec<RunSummary> = self
            .order
            .iter()
            .map(|id| {
                let r = &self.runs[id];
                let state = r.machine.state_name();
                *counts.entry(state.clone()).or_insert(0) += 1;
                RunSummary {
                    run_id: r.id,
                    partition: r.partition.key(),
                    month: r.partition.month.clone(),
                    dataset: r.partition.dataset.clone(),
                    step: match r.machine.state {
                        RunState::Complete => None,
                        s => s.step().map(|i| r.machine.steps[i].id.clone()),
                    },
                    attempts: r
                        .machine
                        .steps
                        .iter()
                        .zip(&r.attempts_total)
                        .filter(|(_, n)| **n > 0)
                        .map(|(s, n)| (s.id.clone(), *n))
                        .collect(),
                    reason: r.reason.clone(),
                    state,
                }
            })
            .collect();
        Summary {
            schema_version: SCHEMA_VERSION,
            backfill_id: self.backfill_id,
            pipeline: self.pipeline.name().to_string(),
            counts,
            steps_executed: self.steps_executed,
            wall_ms: 0,
            audit: String::new(),
            audit_head: String::new(),
            runs,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_tail_keeps_the_end_on_a_char_boundary() {
        let mut s = "é".repeat(10);
        bound_tail(&mut s, 5);
        assert!(s.ends_with("éé"), "{s}");
        assert!(s.starts_with("[... "), "{s}");
        let mut short = "abc".to_string();
        bound_tail(&mut short, 5);
        assert_eq!(short, "abc");
    }
}
