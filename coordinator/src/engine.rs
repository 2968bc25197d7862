//! The coordinator's event loop: every input becomes one [`Event`], handled in one place by the
//! [`Engine`], which owns every backfill and every run's state machine. No locks: the loop is
//! the only writer.
//!
//! A turn takes the events that are ready (one at least, at most [`MAX_TURN`]), applies them to
//! the runs, stages what happened in the [`Store`] (audit records, changed runs and backfills,
//! StepSpecs to send), commits, and only then acts: dispatches StepSpecs, acknowledges consumed
//! messages, spawns supervisor calls, arms timers, answers operators. An action is therefore
//! never taken that the store does not already hold (persist before act). A decision an agent
//! gives at once ([`Agent::decide_now`]: the rules, the fast path) is applied in the turn of its
//! result, so a passing step costs one commit; other agents answer with [`Event::Decided`].
//!
//! Local mode and fleet mode run this same loop; only the [`Transport`] (channels or RabbitMQ)
//! and the [`Store`] (a JSONL file, or PostgreSQL beside it) differ.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};
use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::{
    Action, AttemptSummary, Check, PipelineState, ReportStatus, SCHEMA_VERSION, Severity,
    StepAttempts, StepOutcome, StepResult, StepSpec, ValidationReport,
};
use warpline_shared::fleet::Heartbeat;
use warpline_shared::machine::{
    Applied, AttemptFacts, Machine, Next, Receipt, RunState, StepLimit,
};
use warpline_shared::partition::Partition;

use crate::supervisor::{Agent, AgentReply, DecisionInput};

/// Most events handled in one turn before committing.
pub const MAX_TURN: usize = 512;
/// Bytes of a result's log tail kept in the audit log.
pub const AUDIT_TAIL_BYTES: usize = 4096;

/// Acknowledges a consumed message once the turn that applied it is durable.
pub type Ack = Box<dyn FnOnce() + Send>;

/// Everything that can happen to the coordinator.
pub enum Event {
    /// A worker's result and report, with the acknowledgement of the message that carried it.
    Outcome(Box<StepOutcome>, Option<Ack>),
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
    /// A new backfill.
    Submit(Box<BackfillRequest>, Option<oneshot::Sender<Uuid>>),
    /// An operator's command, answered once the turn is durable.
    Operator(OperatorCommand, oneshot::Sender<OperatorReply>),
    /// A worker's heartbeat (fleet mode).
    Heartbeat(Box<Heartbeat>),
    /// Once a second in fleet mode: find attempts whose worker went silent.
    Tick,
    /// End the loop after this turn and leave every run as it is (a coordinator restart, or a
    /// standby taking over, picks them up from the store).
    Stop,
    /// Stop: cancel every unfinished run and end the loop.
    Shutdown {
        /// Why (e.g. "interrupted (SIGINT)").
        reason: String,
    },
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Outcome(o, _) => write!(f, "Outcome({:?})", o.result.attempt_id),
            Event::Decided { run_id, .. } => write!(f, "Decided({run_id})"),
            Event::Ready { run_id, .. } => write!(f, "Ready({run_id})"),
            Event::Deadline { run_id, .. } => write!(f, "Deadline({run_id})"),
            Event::Submit(b, _) => write!(f, "Submit({})", b.id),
            Event::Operator(c, _) => write!(f, "Operator({c:?})"),
            Event::Heartbeat(h) => write!(f, "Heartbeat({})", h.worker_id),
            Event::Tick => write!(f, "Tick"),
            Event::Stop => write!(f, "Stop"),
            Event::Shutdown { reason } => write!(f, "Shutdown({reason})"),
        }
    }
}

/// What an operator can ask of the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum OperatorCommand {
    /// Answer an escalation.
    Resolve {
        /// The run.
        run_id: Uuid,
        /// proceed, retry or halt.
        action: Action,
        /// Why.
        reason: String,
        /// Who.
        operator: String,
    },
    /// Start nothing new; let running steps finish; end every run.
    Cancel {
        /// The backfill.
        backfill_id: Uuid,
    },
    /// Resume every HALTED run of a backfill at the step that failed.
    RetryFailed {
        /// The backfill.
        backfill_id: Uuid,
    },
    /// The state of one backfill, or of all.
    Status {
        /// The backfill, or all.
        backfill_id: Option<Uuid>,
    },
    /// Every run waiting for an operator.
    Escalations,
    /// The workers heard from recently.
    Workers,
    /// Answer a backfill's escalation: continue starting runs, or cancel the backfill.
    ResolveBackfill {
        /// The backfill.
        backfill_id: Uuid,
        /// continue or cancel.
        action: BackfillAction,
        /// Why.
        reason: String,
        /// Who.
        operator: String,
    },
}

/// An operator's answer to a backfill escalation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackfillAction {
    /// Start runs again (the signature count starts over).
    Continue,
    /// Cancel the backfill.
    Cancel,
}

/// The engine's answer to an operator: a JSON document, or why it refused.
pub type OperatorReply = Result<serde_json::Value, OperatorError>;

/// Why the engine refused an operator's command. The HTTP API maps the variants to status
/// codes (unknown ids to 404, refusals to 409), so callers need not read the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorError {
    /// No backfill has this id.
    #[error("no backfill `{0}`")]
    UnknownBackfill(Uuid),
    /// No run has this id.
    #[error("no run `{0}`")]
    UnknownRun(Uuid),
    /// The command is not legal now (e.g. resolving a run that is not escalated).
    #[error("{0}")]
    Refused(String),
}

/// A run waiting for an operator (`warpline escalations`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Escalation {
    /// The run.
    pub run_id: Uuid,
    /// Its backfill.
    pub backfill_id: Uuid,
    /// Its partition key.
    pub partition: String,
    /// The step it is parked at.
    pub step: String,
    /// Attempts of that step so far.
    pub attempts: u32,
    /// The supervisor's reason for escalating.
    pub reason: String,
}

/// Sends StepSpecs to workers. Must not block: fleet mode hands the spec to its publisher,
/// local mode to a channel sized for every run's one outstanding attempt.
pub trait Transport: Send {
    /// Queues one StepSpec for a worker.
    fn dispatch(&mut self, spec: StepSpec) -> anyhow::Result<()>;
}

/// Durable state of the coordinator. The JSONL audit log is always part of it; fleet mode adds
/// PostgreSQL (runs, backfills and the outbox of StepSpecs).
pub trait Store: Send {
    /// Stages an audit event in the current turn and returns the sealed record.
    fn record(
        &mut self,
        backfill_id: Option<Uuid>,
        run_id: Option<Uuid>,
        event: AuditEvent,
    ) -> AuditRecord;
    /// Stages a run's new state. Local mode keeps runs in memory only, so the default does
    /// nothing.
    fn stage_run(&mut self, _run: &RunRecord) {}
    /// Stages a backfill's new state (default: memory only).
    fn stage_backfill(&mut self, _backfill: &BackfillRecord) {}
    /// Stages a StepSpec that this turn dispatches (the outbox; default: memory only).
    fn stage_dispatch(&mut self, _spec: &StepSpec) {}
    /// Makes the turn durable. Called before any of its effects is acted on.
    fn commit(&mut self) -> StoreFuture<'_>;
    /// Where the audit log lives and its head hash, for summaries.
    fn audit_location(&self) -> (String, String);
}

/// The future of a [`Store::commit`].
pub type StoreFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + 'a>>;

impl Store for crate::audit_log::AuditLog {
    fn record(
        &mut self,
        backfill_id: Option<Uuid>,
        run_id: Option<Uuid>,
        event: AuditEvent,
    ) -> AuditRecord {
        self.stage(backfill_id, run_id, event)
    }

    fn commit(&mut self) -> StoreFuture<'_> {
        Box::pin(async move { crate::audit_log::AuditLog::commit(self) })
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
    Dispatch(Box<StepSpec>),
    Decide {
        run_id: Uuid,
        attempt_id: Uuid,
        input: Arc<DecisionInput>,
    },
    Timer {
        after: Duration,
        event: Event,
    },
    Ack(Ack),
    Reply(oneshot::Sender<OperatorReply>, OperatorReply),
    Submitted(oneshot::Sender<Uuid>, Uuid),
}

/// A new backfill.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    /// Its id (chosen by the caller, so it can name files after it).
    pub id: Uuid,
    /// The pipeline.
    pub pipeline: Arc<Pipeline>,
    /// One run per partition, started in this order.
    pub partitions: Vec<Partition>,
    /// Most runs in progress at once.
    pub max_parallel: usize,
    /// Higher first when slots are scarce.
    pub priority: i32,
}

/// One run, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run.
    pub id: Uuid,
    /// Its backfill.
    pub backfill_id: Uuid,
    /// Its partition.
    pub partition: Partition,
    /// Its state machine.
    pub machine: Machine,
    /// Earlier attempts, for the supervisor.
    pub history: Vec<AttemptSummary>,
    /// Attempts per step over the run's whole life (not reset by a resume).
    pub attempts_total: Vec<u32>,
    /// The outcome awaiting a decision.
    pub last: Option<StepOutcome>,
    /// Why the run stopped, when it did.
    pub reason: Option<String>,
    /// When the outstanding attempt was dispatched (to re-arm its deadline after a restart).
    pub dispatched_at: Option<DateTime<Utc>>,
    /// When the run reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One backfill, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackfillRecord {
    /// The backfill.
    pub id: Uuid,
    /// The pipeline's name.
    pub pipeline: String,
    /// Its runs, in partition order.
    pub runs: Vec<Uuid>,
    /// Runs not started yet.
    pub pending: VecDeque<Uuid>,
    /// Most runs in progress at once.
    pub max_parallel: usize,
    /// Dispatch priority.
    pub priority: i32,
    /// Cancel requested: nothing new starts.
    pub cancelling: bool,
    /// When it was submitted.
    pub created_at: DateTime<Utc>,
    /// The pipeline as submitted, so a restarted coordinator can rebuild it.
    pub source: PipelineSource,
    /// Why the backfill is escalated (no new run starts until an operator answers).
    #[serde(default)]
    pub escalated: Option<String>,
    /// HALTED runs by failure signature, for backfill-level supervision.
    #[serde(default)]
    pub halt_signatures: BTreeMap<String, Vec<Uuid>>,
}

/// A pipeline as submitted: its file, its config (variables applied) and its workdir.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineSource {
    /// The config file's path as the submitter saw it (it anchors `{config_dir}`).
    pub file: String,
    /// The config.
    pub config: serde_json::Value,
    /// The workdir in force.
    pub workdir: String,
}

impl PipelineSource {
    /// Captures a loaded pipeline.
    pub fn of(p: &Pipeline) -> PipelineSource {
        PipelineSource {
            file: p.file.display().to_string(),
            config: serde_json::to_value(&p.config).expect("configs serialise"),
            workdir: p.workdir.display().to_string(),
        }
    }

    /// Rebuilds the pipeline.
    pub fn load(&self) -> anyhow::Result<Pipeline> {
        let mut p =
            Pipeline::from_json(std::path::Path::new(&self.file), &self.config.to_string())?;
        p.set_workdir(std::path::Path::new(&self.workdir));
        Ok(p)
    }
}

struct Backfill {
    rec: BackfillRecord,
    pipeline: Arc<Pipeline>,
    /// Runs started and not yet final or parked.
    active: usize,
    started: Instant,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// End the loop when no run can move any more (local mode).
    pub exit_when_idle: bool,
}

/// One run in a summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Current or final state.
    pub state: String,
    /// The step it is at or stopped at (none when complete or not started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Attempts per step.
    pub attempts: BTreeMap<String, u32>,
    /// Why it did not complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A backfill's summary (`warpline run --json`, `warpline status --json`, the HTTP API).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Contract version.
    pub schema_version: u32,
    /// The backfill.
    pub backfill_id: Uuid,
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline's step ids, in order (so a client can tell how far each run got).
    #[serde(default)]
    pub steps: Vec<String>,
    /// Runs by state.
    pub counts: BTreeMap<String, usize>,
    /// Runs in progress per step.
    pub in_step: BTreeMap<String, usize>,
    /// Attempts executed (results received, losses included).
    pub steps_executed: u64,
    /// Final runs per minute since the backfill started.
    pub runs_per_minute: f64,
    /// Estimated seconds to finish at that rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
    /// Wall time so far.
    pub wall_ms: u64,
    /// True once every run is final (or parked for an operator).
    pub finished: bool,
    /// Cancel requested.
    pub cancelling: bool,
    /// Why the backfill is escalated, when it is (no new run starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalated: Option<String>,
    /// The audit log.
    pub audit: String,
    /// Its last committed line's hash.
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
    cfg: EngineConfig,
    backfills: HashMap<Uuid, Backfill>,
    /// Backfills in submission order.
    order: Vec<Uuid>,
    runs: HashMap<Uuid, RunRecord>,
    /// Attempts in flight per (pipeline, step) for `concurrency` caps.
    inflight: HashMap<(String, String), u32>,
    /// Runs waiting for a step's cap.
    waiting: HashMap<(String, String), VecDeque<Uuid>>,
    agent: Arc<dyn Agent>,
    store: Box<dyn Store>,
    transport: Box<dyn Transport>,
    observer: Box<dyn Observer>,
    /// Feeds timers and agent replies back into the loop. Unbounded, yet bounded in practice:
    /// each run has at most one attempt, one decision and one timer outstanding at a time.
    events: mpsc::UnboundedSender<Event>,
    effects: Vec<Effect>,
    turn: Vec<AuditRecord>,
    dirty_runs: HashSet<Uuid>,
    dirty_backfills: HashSet<Uuid>,
    /// Workers by id: their last heartbeat and when it arrived.
    workers: HashMap<String, (Heartbeat, Instant)>,
    /// Attempts seen running in heartbeats: which worker, and when last.
    seen: HashMap<Uuid, (String, Instant, Duration)>,
    stopping: bool,
    /// Set by [`Event::Stop`]: leave the loop, keep the runs.
    halting: bool,
}

impl Engine {
    /// A new engine with no backfills.
    pub fn new(
        cfg: EngineConfig,
        agent: Arc<dyn Agent>,
        store: Box<dyn Store>,
        transport: Box<dyn Transport>,
        observer: Box<dyn Observer>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Engine {
        Engine {
            cfg,
            backfills: HashMap::new(),
            order: Vec::new(),
            runs: HashMap::new(),
            inflight: HashMap::new(),
            waiting: HashMap::new(),
            agent,
            store,
            transport,
            observer,
            events,
            effects: Vec::new(),
            turn: Vec::new(),
            dirty_runs: HashSet::new(),
            dirty_backfills: HashSet::new(),
            workers: HashMap::new(),
            seen: HashMap::new(),
            stopping: false,
            halting: false,
        }
    }

    fn record(&mut self, backfill_id: Option<Uuid>, run_id: Option<Uuid>, event: AuditEvent) {
        let rec = self.store.record(backfill_id, run_id, event);
        self.turn.push(rec);
    }

    fn record_run(&mut self, run_id: Uuid, event: AuditEvent) {
        let backfill = self.runs.get(&run_id).map(|r| r.backfill_id);
        self.dirty_runs.insert(run_id);
        self.record(backfill, Some(run_id), event);
    }

    /// Accepts a backfill: one run per partition, started as slots free up.
    pub fn submit(&mut self, req: BackfillRequest) -> Uuid {
        let id = req.id;
        self.record(
            Some(id),
            None,
            AuditEvent::BackfillCreated {
                pipeline: req.pipeline.name().to_string(),
                config: req.pipeline.file.display().to_string(),
                partitions: req.partitions.len(),
                agent: self.agent.name().to_string(),
            },
        );
        let limits: Vec<StepLimit> = req
            .pipeline
            .steps()
            .iter()
            .map(|s| StepLimit {
                id: s.id.clone(),
                max_attempts: s.max_attempts,
            })
            .collect();
        let mut rec = BackfillRecord {
            id,
            pipeline: req.pipeline.name().to_string(),
            runs: Vec::with_capacity(req.partitions.len()),
            pending: VecDeque::with_capacity(req.partitions.len()),
            max_parallel: req.max_parallel.max(1),
            priority: req.priority,
            cancelling: false,
            created_at: Utc::now(),
            source: PipelineSource::of(&req.pipeline),
            escalated: None,
            halt_signatures: BTreeMap::new(),
        };
        for p in req.partitions {
            let run_id = Uuid::now_v7();
            self.runs.insert(
                run_id,
                RunRecord {
                    id: run_id,
                    backfill_id: id,
                    partition: p.clone(),
                    machine: Machine::new(limits.clone()),
                    history: Vec::new(),
                    attempts_total: vec![0; limits.len()],
                    last: None,
                    reason: None,
                    dispatched_at: None,
                    finished_at: None,
                },
            );
            rec.runs.push(run_id);
            rec.pending.push_back(run_id);
            self.record_run(run_id, AuditEvent::RunCreated { partition: p });
        }
        self.backfills.insert(
            id,
            Backfill {
                rec,
                pipeline: req.pipeline,
                active: 0,
                started: Instant::now(),
            },
        );
        self.order.push(id);
        self.dirty_backfills.insert(id);
        self.fill();
        id
    }

    /// Puts stored backfills and runs back into the loop after a restart: re-arms deadlines,
    /// re-asks decisions that were awaited, restarts runs waiting out a backoff. StepSpecs that
    /// were stored but not sent are the Store's to publish again.
    pub fn restore(
        &mut self,
        backfills: Vec<(BackfillRecord, Arc<Pipeline>)>,
        runs: Vec<RunRecord>,
    ) {
        for r in runs {
            self.runs.insert(r.id, r);
        }
        for (rec, pipeline) in backfills {
            let id = rec.id;
            let active = rec
                .runs
                .iter()
                .filter(|r| {
                    self.runs
                        .get(r)
                        .is_some_and(|r| matches!(r.machine.state, RunState::Running(_)))
                })
                .count();
            self.backfills.insert(
                id,
                Backfill {
                    rec,
                    pipeline,
                    active,
                    started: Instant::now(),
                },
            );
            self.order.push(id);
        }
        self.order
            .sort_by_key(|id| self.backfills[id].rec.created_at);
        let ids: Vec<Uuid> = self.runs.keys().copied().collect();
        for run_id in ids {
            let run = &self.runs[&run_id];
            let RunState::Running(step) = run.machine.state else {
                continue;
            };
            if let Some(a) = run.machine.outstanding {
                let pipeline = self.pipeline_of(run_id);
                let s = &pipeline.steps()[step];
                *self
                    .inflight
                    .entry((pipeline.name().to_string(), s.id.clone()))
                    .or_insert(0) += 1;
                let total = Duration::from_secs(s.timeout_s + pipeline.config.lost_grace_s);
                let elapsed = run
                    .dispatched_at
                    .map(|t| (Utc::now() - t).to_std().unwrap_or_default())
                    .unwrap_or_default();
                self.effects.push(Effect::Timer {
                    after: total.saturating_sub(elapsed),
                    event: Event::Deadline {
                        run_id,
                        attempt_id: a.attempt_id,
                    },
                });
            } else if run.machine.deciding.is_some() {
                if let Some(outcome) = run.last.clone() {
                    self.ask(run_id, outcome);
                }
            } else {
                self.begin(run_id, 0);
            }
        }
        self.fill();
    }

    fn pipeline_of(&self, run_id: Uuid) -> Arc<Pipeline> {
        self.backfills[&self.runs[&run_id].backfill_id]
            .pipeline
            .clone()
    }

    /// Starts pending runs while slots are free, highest priority first.
    fn fill(&mut self) {
        if self.stopping {
            return;
        }
        let mut ids: Vec<Uuid> = self
            .order
            .iter()
            .copied()
            .filter(|id| {
                let b = &self.backfills[id];
                !b.rec.cancelling
                    && b.rec.escalated.is_none()
                    && !b.rec.pending.is_empty()
                    && b.active < b.rec.max_parallel
            })
            .collect();
        ids.sort_by_key(|id| std::cmp::Reverse(self.backfills[id].rec.priority));
        for bid in ids {
            loop {
                let b = self.backfills.get_mut(&bid).expect("backfill exists");
                if b.active >= b.rec.max_parallel {
                    break;
                }
                let Some(run_id) = b.rec.pending.pop_front() else {
                    break;
                };
                b.active += 1;
                self.dirty_backfills.insert(bid);
                let run = self.runs.get_mut(&run_id).expect("pending runs exist");
                if run.machine.state == RunState::Init {
                    let (from, to) = run.machine.start().expect("INIT starts");
                    let (from, to) = (from.name(&run.machine.steps), to.name(&run.machine.steps));
                    self.record_run(
                        run_id,
                        AuditEvent::Transition {
                            from,
                            to,
                            action: None,
                        },
                    );
                }
                self.begin(run_id, 0);
            }
        }
    }

    /// Starts the next attempt of a run's current step, or queues it behind the step's cap.
    fn begin(&mut self, run_id: Uuid, delay_ms: u64) {
        let pipeline = self.pipeline_of(run_id);
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let RunState::Running(step) = run.machine.state else {
            return;
        };
        let key = (
            pipeline.name().to_string(),
            pipeline.steps()[step].id.clone(),
        );
        if let Some(cap) = pipeline.steps()[step].concurrency
            && self.inflight.get(&key).copied().unwrap_or(0) >= cap
        {
            self.waiting.entry(key).or_default().push_back(run_id);
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
        let spec =
            match pipeline.render_step(step, &run.partition, run_id, attempt.attempt, attempt_id) {
                Ok(s) => s,
                Err(e) => {
                    // A partition the config cannot render for: permanent, so halt at once.
                    run.machine.outstanding = None;
                    return self.stop_run(run_id, format!("cannot render the step: {e}"));
                }
            };
        run.attempts_total[step] += 1;
        run.dispatched_at = Some(Utc::now());
        *self.inflight.entry(key).or_insert(0) += 1;
        let deadline = Duration::from_secs(spec.timeout_s + pipeline.config.lost_grace_s);
        self.record_run(
            run_id,
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
        self.record_run(
            run_id,
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
        run.finished_at = Some(Utc::now());
        let name = state.name(&run.machine.steps);
        let bid = run.backfill_id;
        self.record_run(
            run_id,
            AuditEvent::RunFinished {
                state: name,
                step_id,
                reason,
            },
        );
        if matches!(state, RunState::Halted(_)) {
            self.note_halt(run_id);
        }
        self.free_slot(bid);
    }

    /// Backfill-level supervision: counts HALTED runs by failure signature and escalates the
    /// backfill when `escalate_after_same_halts` of them share one.
    fn note_halt(&mut self, run_id: Uuid) {
        let run = &self.runs[&run_id];
        let bid = run.backfill_id;
        let Some(last) = run.history.last() else {
            return;
        };
        let mut signature = format!("{}: exit {}", last.step_id, last.exit_code);
        if last.timed_out {
            signature.push_str(", timed out");
        }
        if last.lost {
            signature.push_str(", lost");
        }
        if !last.failed_checks.is_empty() {
            signature.push_str(&format!(", failed {}", last.failed_checks.join(", ")));
        }
        let Some(b) = self.backfills.get_mut(&bid) else {
            return;
        };
        let threshold = b.pipeline.config.escalate_after_same_halts as usize;
        let runs = b.rec.halt_signatures.entry(signature.clone()).or_default();
        runs.push(run_id);
        self.dirty_backfills.insert(bid);
        if threshold == 0 || runs.len() < threshold || b.rec.escalated.is_some() {
            return;
        }
        let runs = runs.clone();
        let reason = format!(
            "{} runs halted the same way ({signature}): no new run starts until an operator answers \
             `warpline resolve {bid} --action continue|cancel`",
            runs.len()
        );
        b.rec.escalated = Some(reason.clone());
        self.record(
            Some(bid),
            None,
            AuditEvent::BackfillEscalated {
                signature,
                runs,
                reason,
            },
        );
    }

    fn free_slot(&mut self, bid: Uuid) {
        if let Some(b) = self.backfills.get_mut(&bid) {
            b.active = b.active.saturating_sub(1);
        }
        self.fill();
    }

    /// Releases a step's cap slot and starts a run waiting for it.
    fn release(&mut self, run_id: Uuid, step: usize) {
        let pipeline = self.pipeline_of(run_id);
        let key = (
            pipeline.name().to_string(),
            pipeline.steps()[step].id.clone(),
        );
        if let Some(n) = self.inflight.get_mut(&key) {
            *n = n.saturating_sub(1);
        }
        while let Some(next) = self.waiting.get_mut(&key).and_then(VecDeque::pop_front) {
            let waiting_here = self.runs.get(&next).is_some_and(|r| {
                matches!(r.machine.state, RunState::Running(s) if s == step)
                    && r.machine.outstanding.is_none()
                    && r.machine.deciding.is_none()
            });
            if waiting_here {
                self.begin(next, 0);
                break;
            }
        }
    }

    /// Handles one event.
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Outcome(outcome, ack) => {
                self.on_outcome(*outcome);
                if let Some(ack) = ack {
                    self.effects.push(Effect::Ack(ack));
                }
            }
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
            // A request whose client stopped waiting was answered with a 503 ("try again"):
            // applying it now (a standby that queued it before it led, a loop that answered
            // too late) would do what the client was told did not happen.
            Event::Submit(req, Some(reply)) if reply.is_closed() => {
                warn!(backfill_id = %req.id, "dropping a submit whose client gave up waiting");
            }
            Event::Operator(cmd, reply) if reply.is_closed() => {
                warn!(
                    ?cmd,
                    "dropping an operator command whose client gave up waiting"
                );
            }
            Event::Submit(req, reply) => {
                let id = self.submit(*req);
                if let Some(reply) = reply {
                    self.effects.push(Effect::Submitted(reply, id));
                }
            }
            Event::Operator(cmd, reply) => {
                let answer = self.on_operator(cmd);
                self.effects.push(Effect::Reply(reply, answer));
            }
            Event::Heartbeat(hb) => self.on_heartbeat(*hb),
            Event::Tick => self.on_tick(),
            Event::Stop => self.halting = true,
            Event::Shutdown { reason } => self.shutdown(reason),
        }
    }

    fn on_heartbeat(&mut self, hb: Heartbeat) {
        let now = Instant::now();
        let silence = Duration::from_secs(hb.interval_s.max(1) * 3);
        for a in &hb.running {
            self.seen
                .insert(a.attempt_id, (hb.worker_id.clone(), now, silence));
        }
        if hb.stopping {
            self.workers.remove(&hb.worker_id);
        } else {
            self.workers.insert(hb.worker_id.clone(), (hb, now));
        }
    }

    /// Declares lost the outstanding attempts whose worker stopped heartbeating and that no
    /// other worker has picked up since (a broker redelivers a dead worker's steps at once).
    fn on_tick(&mut self) {
        let now = Instant::now();
        self.workers.retain(|_, (hb, at)| {
            now.duration_since(*at) < Duration::from_secs(hb.interval_s.max(1) * 3)
        });
        let mut lost = Vec::new();
        for r in self.runs.values() {
            if let Some(a) = r.machine.outstanding
                && let Some((worker, at, silence)) = self.seen.get(&a.attempt_id)
                && now.duration_since(*at) > *silence
            {
                lost.push((r.id, a.attempt_id, worker.clone(), now.duration_since(*at)));
            }
        }
        for (run_id, attempt_id, worker, quiet) in lost {
            self.seen.remove(&attempt_id);
            self.declare_lost(
                run_id,
                attempt_id,
                format!(
                    "worker `{worker}` stopped heartbeating ({} s without word) and no other worker took the step",
                    quiet.as_secs()
                ),
            );
        }
    }

    fn on_outcome(&mut self, mut outcome: StepOutcome) {
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
        let facts = AttemptFacts::from_outcome(&outcome.result, &outcome.report);
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
                let mut audited = outcome.clone();
                bound_tail(&mut audited.result.log_tail, AUDIT_TAIL_BYTES);
                self.record_run(run_id, AuditEvent::StepResult { outcome: audited });
                outcome.result.attempt = a.attempt;
                self.release(run_id, a.step);
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
        let pipeline = self.pipeline_of(run_id);
        let step = &pipeline.steps()[a.step];
        let reason = format!(
            "no result within timeout_s {} + lost_grace_s {}",
            step.timeout_s, pipeline.config.lost_grace_s
        );
        self.declare_lost(run_id, attempt_id, reason);
    }

    /// Hands an attempt that will not report to the supervisor as a failed one.
    fn declare_lost(&mut self, run_id: Uuid, attempt_id: Uuid, reason: String) {
        let Some(a) = self.runs[&run_id]
            .machine
            .outstanding
            .filter(|a| a.attempt_id == attempt_id)
        else {
            return;
        };
        let step_id = self.runs[&run_id].machine.steps[a.step].id.clone();
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
    fn ask(&mut self, run_id: Uuid, outcome: StepOutcome) {
        let pipeline = self.pipeline_of(run_id);
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
            pipeline: pipeline.name().to_string(),
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
        let input = DecisionInput {
            state,
            result: outcome.result.clone(),
            report: outcome.report.clone(),
        };
        run.last = Some(outcome);
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

    fn on_decided(&mut self, run_id: Uuid, attempt_id: Uuid, reply: AgentReply) {
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let Some((a, facts)) = run.machine.deciding.clone() else {
            return;
        };
        if a.attempt_id != attempt_id || !matches!(run.machine.state, RunState::Running(_)) {
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
        let reason = match &applied.overridden {
            Some(why) => why.clone(),
            None => reply.decision.reason.clone(),
        };
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

    /// Records a transition and does what it implies.
    fn follow(
        &mut self,
        run_id: Uuid,
        attempt: u32,
        step_id: String,
        applied: Applied,
        reason: String,
    ) {
        let steps = self.runs[&run_id].machine.steps.clone();
        self.record_run(
            run_id,
            AuditEvent::Transition {
                from: applied.from.name(&steps),
                to: applied.to.name(&steps),
                action: Some(applied.applied),
            },
        );
        let bid = self.runs[&run_id].backfill_id;
        let cancelling = self.backfills.get(&bid).is_some_and(|b| b.rec.cancelling);
        match applied.next {
            Next::Dispatch { .. } if cancelling || self.stopping => {
                let why = "cancelled by an operator: the running step finished, nothing new starts"
                    .to_string();
                self.cancel_run(run_id, why);
                self.free_slot(bid);
            }
            Next::Dispatch { retry: false, .. } => self.begin(run_id, 0),
            Next::Dispatch { retry: true, .. } => {
                let after = self.pipeline_of(run_id).config.retry.backoff(attempt + 1);
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
                self.record_run(run_id, AuditEvent::Escalated { step_id, reason });
                // A parked run frees its slot; it waits for an operator, not for a worker.
                self.free_slot(bid);
            }
        }
    }

    /// Cancels one run and records it.
    fn cancel_run(&mut self, run_id: Uuid, reason: String) {
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let from = run.machine.state;
        let step = from.step().map(|i| run.machine.steps[i].id.clone());
        if run.machine.cancel().is_err() {
            return;
        }
        run.reason = Some(reason.clone());
        run.finished_at = Some(Utc::now());
        let from = from.name(&run.machine.steps);
        self.record_run(
            run_id,
            AuditEvent::Transition {
                from,
                to: "CANCELLED".into(),
                action: None,
            },
        );
        self.record_run(
            run_id,
            AuditEvent::RunFinished {
                state: "CANCELLED".into(),
                step_id: step,
                reason,
            },
        );
    }

    fn on_operator(&mut self, cmd: OperatorCommand) -> OperatorReply {
        match cmd {
            OperatorCommand::Resolve {
                run_id,
                action,
                reason,
                operator,
            } => {
                let run = self
                    .runs
                    .get_mut(&run_id)
                    .ok_or(OperatorError::UnknownRun(run_id))?;
                let attempt = run.machine.attempts[run.machine.state.step().unwrap_or(0)];
                let applied = run
                    .machine
                    .resolve(action)
                    .map_err(|e| OperatorError::Refused(e.to_string()))?;
                let step_id = run.machine.steps[applied.from.step().unwrap_or(0)]
                    .id
                    .clone();
                let bid = run.backfill_id;
                self.record_run(
                    run_id,
                    AuditEvent::OperatorResolution {
                        operator: operator.clone(),
                        action,
                        reason: reason.clone(),
                    },
                );
                if let Some(b) = self.backfills.get_mut(&bid) {
                    // The parked run takes a slot again; finishing frees it.
                    b.active += 1;
                }
                let to = applied.to.name(&self.runs[&run_id].machine.steps);
                self.follow(
                    run_id,
                    attempt,
                    step_id,
                    applied,
                    format!("operator {operator}: {reason}"),
                );
                Ok(serde_json::json!({"run_id": run_id, "action": action, "state": to}))
            }
            OperatorCommand::Cancel { backfill_id } => {
                let b = self
                    .backfills
                    .get_mut(&backfill_id)
                    .ok_or(OperatorError::UnknownBackfill(backfill_id))?;
                b.rec.cancelling = true;
                let pending: Vec<Uuid> = b.rec.pending.drain(..).collect();
                let runs = b.rec.runs.clone();
                self.dirty_backfills.insert(backfill_id);
                let why = "cancelled by an operator".to_string();
                for id in pending {
                    self.cancel_run(id, why.clone());
                }
                // Runs between steps or parked end now; runs with a step in flight end after it.
                for id in runs {
                    let m = &self.runs[&id].machine;
                    let idle = m.outstanding.is_none() && m.deciding.is_none();
                    let parked = matches!(m.state, RunState::Escalated(_));
                    if !m.state.is_final() && (idle || parked) {
                        let was_running = matches!(m.state, RunState::Running(_));
                        self.cancel_run(id, why.clone());
                        if was_running && let Some(b) = self.backfills.get_mut(&backfill_id) {
                            b.active = b.active.saturating_sub(1);
                        }
                    }
                }
                Ok(serde_json::to_value(self.summary(backfill_id)).expect("summary serialises"))
            }
            OperatorCommand::RetryFailed { backfill_id } => {
                let b = self
                    .backfills
                    .get_mut(&backfill_id)
                    .ok_or(OperatorError::UnknownBackfill(backfill_id))?;
                b.rec.cancelling = false;
                // Resuming the halted runs is the operator's answer to a backfill escalation too.
                let was_escalated = b.rec.escalated.take().is_some();
                b.rec.halt_signatures.clear();
                let runs = b.rec.runs.clone();
                if was_escalated {
                    self.record(
                        Some(backfill_id),
                        None,
                        AuditEvent::BackfillResolution {
                            operator: "retry-failed".into(),
                            action: "continue".into(),
                            reason: "the halted runs were resumed".into(),
                        },
                    );
                }
                let mut resumed = 0;
                for id in runs {
                    let run = self.runs.get_mut(&id).expect("run exists");
                    if let Ok(step) = run.machine.resume() {
                        run.reason = None;
                        run.finished_at = None;
                        let to = run.machine.steps[step].id.clone();
                        self.record_run(
                            id,
                            AuditEvent::Transition {
                                from: "HALTED".into(),
                                to,
                                action: Some(Action::Retry),
                            },
                        );
                        self.backfills
                            .get_mut(&backfill_id)
                            .expect("backfill exists")
                            .rec
                            .pending
                            .push_back(id);
                        resumed += 1;
                    }
                }
                self.dirty_backfills.insert(backfill_id);
                self.fill();
                Ok(serde_json::json!({"backfill_id": backfill_id, "resumed": resumed}))
            }
            OperatorCommand::Status {
                backfill_id: Some(id),
            } => {
                if !self.backfills.contains_key(&id) {
                    return Err(OperatorError::UnknownBackfill(id));
                }
                Ok(serde_json::to_value(self.summary(id)).expect("summary serialises"))
            }
            OperatorCommand::Status { backfill_id: None } => {
                let all: Vec<Summary> = self.order.iter().map(|id| self.summary(*id)).collect();
                Ok(serde_json::to_value(all).expect("summaries serialise"))
            }
            OperatorCommand::ResolveBackfill {
                backfill_id,
                action,
                reason,
                operator,
            } => {
                let b = self
                    .backfills
                    .get_mut(&backfill_id)
                    .ok_or(OperatorError::UnknownBackfill(backfill_id))?;
                if b.rec.escalated.is_none() {
                    return Err(OperatorError::Refused(format!(
                        "backfill `{backfill_id}` is not escalated"
                    )));
                }
                b.rec.escalated = None;
                b.rec.halt_signatures.clear();
                self.dirty_backfills.insert(backfill_id);
                let name = match action {
                    BackfillAction::Continue => "continue",
                    BackfillAction::Cancel => "cancel",
                };
                self.record(
                    Some(backfill_id),
                    None,
                    AuditEvent::BackfillResolution {
                        operator,
                        action: name.to_string(),
                        reason,
                    },
                );
                match action {
                    BackfillAction::Continue => {
                        self.fill();
                        Ok(serde_json::to_value(self.summary(backfill_id))
                            .expect("summary serialises"))
                    }
                    BackfillAction::Cancel => {
                        self.on_operator(OperatorCommand::Cancel { backfill_id })
                    }
                }
            }
            OperatorCommand::Workers => {
                let mut list: Vec<serde_json::Value> = self
                    .workers
                    .values()
                    .map(|(hb, at)| {
                        serde_json::json!({
                            "worker_id": hb.worker_id,
                            "pool": hb.pool,
                            "slots": hb.slots,
                            "running": hb.running.len(),
                            "last_seen_ms": at.elapsed().as_millis() as u64,
                        })
                    })
                    .collect();
                list.sort_by(|a, b| a["worker_id"].as_str().cmp(&b["worker_id"].as_str()));
                Ok(serde_json::Value::Array(list))
            }
            OperatorCommand::Escalations => {
                let list: Vec<Escalation> = self
                    .order
                    .iter()
                    .flat_map(|b| self.backfills[b].rec.runs.iter())
                    .filter_map(|id| {
                        let r = &self.runs[id];
                        let RunState::Escalated(step) = r.machine.state else {
                            return None;
                        };
                        let reason = r
                            .history
                            .last()
                            .map(|h| h.reason.clone())
                            .unwrap_or_default();
                        Some(Escalation {
                            run_id: r.id,
                            backfill_id: r.backfill_id,
                            partition: r.partition.key(),
                            step: r.machine.steps[step].id.clone(),
                            attempts: r.machine.attempts[step],
                            reason,
                        })
                    })
                    .collect();
                Ok(serde_json::to_value(list).expect("escalations serialise"))
            }
        }
    }

    fn shutdown(&mut self, reason: String) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        let ids: Vec<Uuid> = self
            .order
            .iter()
            .flat_map(|b| self.backfills[b].rec.runs.clone())
            .collect();
        for id in ids {
            if !self.runs[&id].machine.state.is_final() {
                self.cancel_run(id, reason.clone());
            }
        }
        for b in self.backfills.values_mut() {
            b.rec.pending.clear();
            b.active = 0;
        }
        // Nothing more is dispatched once stopping.
        self.effects
            .retain(|e| !matches!(e, Effect::Dispatch(_) | Effect::Timer { .. }));
    }

    /// True when no run can move any more without an operator.
    pub fn idle(&self) -> bool {
        self.runs.values().all(|r| match r.machine.state {
            RunState::Running(_) => false,
            // A run not started yet can only start if its backfill is not escalated.
            RunState::Init => self
                .backfills
                .get(&r.backfill_id)
                .is_some_and(|b| b.rec.escalated.is_some()),
            _ => true,
        })
    }

    /// Commits the turn, shows it, then acts on it.
    async fn end_turn(&mut self) -> anyhow::Result<()> {
        for id in self.dirty_backfills.drain() {
            if let Some(b) = self.backfills.get(&id) {
                self.store.stage_backfill(&b.rec);
            }
        }
        for id in self.dirty_runs.drain() {
            if let Some(r) = self.runs.get(&id) {
                self.store.stage_run(r);
            }
        }
        for e in &self.effects {
            if let Effect::Dispatch(spec) = e {
                self.store.stage_dispatch(spec);
            }
        }
        self.store.commit().await?;
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
                Effect::Ack(ack) => ack(),
                Effect::Reply(tx, answer) => {
                    let _ = tx.send(answer);
                }
                Effect::Submitted(tx, id) => {
                    let _ = tx.send(id);
                }
            }
        }
        Ok(())
    }

    /// Runs the loop until every run is final or parked (when `exit_when_idle`), or until a
    /// shutdown; returns the engine for its summaries.
    pub async fn run(
        mut self,
        events: &mut mpsc::UnboundedReceiver<Event>,
    ) -> anyhow::Result<Engine> {
        self.end_turn().await?;
        while !(self.stopping || self.halting || (self.cfg.exit_when_idle && self.idle())) {
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
            self.end_turn().await?;
        }
        if self.halting {
            // Runs go on after a restart: nothing is finished, nothing more is recorded.
            self.observer.finish();
            return Ok(self);
        }
        // Local mode ends with no operator to answer: runs an escalated backfill never started
        // are cancelled, saying why.
        for id in self.order.clone() {
            let b = self.backfills.get_mut(&id).expect("backfill exists");
            let Some(why) = b.rec.escalated.clone() else {
                continue;
            };
            let pending: Vec<Uuid> = b.rec.pending.drain(..).collect();
            for run_id in pending {
                self.cancel_run(
                    run_id,
                    format!("not started: the backfill was escalated ({why})"),
                );
            }
        }
        let reason = if self.stopping {
            "stopped before every run finished".to_string()
        } else {
            "every run is final or waiting for an operator".to_string()
        };
        for id in self.order.clone() {
            let s = self.summary(id);
            let count = |st: &str| s.counts.get(st).copied().unwrap_or(0);
            self.record(
                Some(id),
                None,
                AuditEvent::BackfillFinished {
                    complete: count("COMPLETE"),
                    halted: count("HALTED"),
                    cancelled: count("CANCELLED"),
                    escalated: count("ESCALATED"),
                    reason: reason.clone(),
                },
            );
        }
        self.end_turn().await?;
        self.observer.finish();
        Ok(self)
    }

    /// A backfill's summary.
    pub fn summary(&self, backfill_id: Uuid) -> Summary {
        let b = &self.backfills[&backfill_id];
        let mut counts = BTreeMap::new();
        let mut in_step = BTreeMap::new();
        let runs: Vec<RunSummary> = b
            .rec
            .runs
            .iter()
            .map(|id| {
                let r = &self.runs[id];
                let state = r.machine.state_name();
                let bucket = match r.machine.state {
                    RunState::Running(_) => "RUNNING".to_string(),
                    _ => state.clone(),
                };
                *counts.entry(bucket).or_insert(0) += 1;
                if let RunState::Running(i) = r.machine.state {
                    *in_step.entry(r.machine.steps[i].id.clone()).or_insert(0) += 1;
                }
                RunSummary {
                    run_id: r.id,
                    partition: r.partition.key(),
                    month: r.partition.month.clone(),
                    dataset: r.partition.dataset.clone(),
                    step: match r.machine.state {
                        RunState::Complete | RunState::Init => None,
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
        // Attempts started, less those still awaited: derived from the runs, so it survives a
        // coordinator restart.
        let steps_executed: u64 = b
            .rec
            .runs
            .iter()
            .map(|id| {
                let r = &self.runs[id];
                let started: u64 = r.attempts_total.iter().map(|&n| u64::from(n)).sum();
                started - u64::from(r.machine.outstanding.is_some())
            })
            .sum();
        let finals = runs
            .iter()
            .filter(|r| matches!(r.state.as_str(), "COMPLETE" | "HALTED" | "CANCELLED"))
            .count();
        let elapsed = b.started.elapsed();
        let minutes = elapsed.as_secs_f64() / 60.0;
        let rate = if minutes > 0.0 {
            finals as f64 / minutes
        } else {
            0.0
        };
        let left = runs.len() - finals;
        let eta_s = (rate > 0.0 && left > 0).then(|| (left as f64 / rate * 60.0) as u64);
        let finished = b.rec.pending.is_empty()
            && runs.iter().all(|r| {
                matches!(
                    r.state.as_str(),
                    "COMPLETE" | "HALTED" | "CANCELLED" | "ESCALATED"
                )
            });
        let (audit, audit_head) = self.store.audit_location();
        Summary {
            schema_version: SCHEMA_VERSION,
            backfill_id,
            pipeline: b.rec.pipeline.clone(),
            steps: b.pipeline.steps().iter().map(|s| s.id.clone()).collect(),
            counts,
            in_step,
            steps_executed,
            runs_per_minute: (rate * 10.0).round() / 10.0,
            eta_s,
            wall_ms: elapsed.as_millis() as u64,
            finished,
            cancelling: b.rec.cancelling,
            escalated: b.rec.escalated.clone(),
            audit,
            audit_head,
            runs,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit_log::AuditLog;
    use crate::progress::Quiet;
    use crate::supervisor::RulesAgent;

    /// A transport that drops every spec: these tests never run a step.
    struct Nowhere;

    impl Transport for Nowhere {
        fn dispatch(&mut self, _: StepSpec) -> anyhow::Result<()> {
            Ok(())
        }
    }

    fn engine(dir: &std::path::Path) -> Engine {
        let (tx, _) = mpsc::unbounded_channel();
        Engine::new(
            EngineConfig {
                exit_when_idle: false,
            },
            Arc::new(RulesAgent),
            Box::new(AuditLog::open(dir.join("audit.jsonl")).unwrap()),
            Box::new(Nowhere),
            Box::new(Quiet),
            tx,
        )
    }

    fn backfill(dir: &std::path::Path) -> BackfillRequest {
        let config = r#"{"name": "p", "steps": [{"id": "A", "command": "true"}]}"#;
        let pipeline = Pipeline::from_json(&dir.join("p.json"), config).unwrap();
        BackfillRequest {
            id: Uuid::now_v7(),
            pipeline: Arc::new(pipeline),
            partitions: vec![Partition {
                dataset: Some("a".into()),
                ..Partition::default()
            }],
            max_parallel: 1,
            priority: 0,
        }
    }

    #[test]
    fn requests_whose_client_gave_up_are_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = engine(dir.path());
        let (reply, gave_up) = oneshot::channel();
        drop(gave_up);
        engine.handle(Event::Submit(Box::new(backfill(dir.path())), Some(reply)));
        assert!(
            engine.backfills.is_empty(),
            "a submit answered 503 took effect"
        );

        let id = engine.submit(backfill(dir.path()));
        let (reply, gave_up) = oneshot::channel();
        drop(gave_up);
        let cancel = OperatorCommand::Cancel { backfill_id: id };
        engine.handle(Event::Operator(cancel, reply));
        assert!(
            !engine.backfills[&id].rec.cancelling,
            "a cancel answered 503 took effect"
        );

        let (reply, mut answer) = oneshot::channel();
        engine.handle(Event::Operator(
            OperatorCommand::Cancel { backfill_id: id },
            reply,
        ));
        assert!(engine.backfills[&id].rec.cancelling);
        assert!(matches!(engine.effects.last(), Some(Effect::Reply(..))));
        assert!(
            answer.try_recv().is_err(),
            "answered only after the turn commits"
        );
    }

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
