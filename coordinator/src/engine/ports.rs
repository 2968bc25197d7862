//! The engine's edges: the [`Event`]s that come in, and the ports its effects go out through
//! ([`Transport`] for StepSpecs, [`Store`] for the durable turn, [`Observer`] for what was
//! committed), plus the [`Effect`]s a turn collects before it commits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_shared::contracts::{StepOutcome, StepSpec};
use warpline_shared::fleet::Heartbeat;

use super::{
    BackfillRecord, BackfillRequest, OperatorCommand, OperatorReply, RunRecord, SubmitRefused,
    Submitted,
};
use crate::supervisor::{AgentReply, DecisionInput};

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
    /// Answered with the backfill's id: a new one, or the one a request id already names.
    Submit(
        Box<BackfillRequest>,
        Option<oneshot::Sender<Result<Submitted, SubmitRefused>>>,
    ),
    /// An operator's command, answered once the turn is durable.
    Operator(OperatorCommand, oneshot::Sender<OperatorReply>),
    /// A worker's heartbeat (fleet mode).
    Heartbeat(Box<Heartbeat>),
    /// Once a second in fleet mode: find attempts whose worker went silent.
    Tick,
    /// Cancel the next chunk of a cancelling backfill's runs not started yet.
    CancelPending {
        /// The backfill.
        backfill_id: Uuid,
        /// Why (audited in each run's end).
        reason: String,
    },
    /// End the loop after this turn and leave every run as it is (a coordinator restart, or a
    /// standby taking over, picks them up from the store).
    Stop,
    /// Stop: cancel every unfinished run and end the loop.
    Shutdown {
        /// Why (e.g. "interrupted (SIGINT)").
        reason: String,
    },
}

impl Event {
    /// True for an operator's read ([`OperatorCommand::is_read`](super::OperatorCommand::is_read)).
    pub fn is_read(&self) -> bool {
        matches!(self, Event::Operator(cmd, _) if cmd.is_read())
    }
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
            Event::CancelPending { backfill_id, .. } => write!(f, "CancelPending({backfill_id})"),
            Event::Stop => write!(f, "Stop"),
            Event::Shutdown { reason } => write!(f, "Shutdown({reason})"),
        }
    }
}

/// Sends StepSpecs to workers. Must not block: fleet mode hands the spec to its publisher,
/// local mode to a channel sized for every run's one outstanding attempt.
pub trait Transport: Send {
    /// Queues one StepSpec for a worker.
    fn dispatch(&mut self, spec: StepSpec) -> anyhow::Result<()>;
}

/// What a turn changed besides its audit records, lent to [`Store::commit`] by the engine:
/// the store writes the engine's own records rather than copies of them, so a turn that
/// changes every run of a large backfill (its submit) does not hold each run twice.
#[derive(Default)]
pub struct Staged<'a> {
    /// Runs whose state changed, each once. Local mode keeps runs in memory only.
    pub runs: Vec<&'a RunRecord>,
    /// Backfills whose record changed, each once.
    pub backfills: Vec<&'a BackfillRecord>,
    /// StepSpecs this turn dispatches (fleet mode's outbox).
    pub dispatched: Vec<&'a StepSpec>,
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
    /// Stages the deletion of a finished backfill the engine has forgotten (retention): once
    /// the turn commits, the store deletes its rows, in batches and off the loop. Its audit
    /// lines stay in the JSONL file. Local mode's file is its only store, so the default
    /// deletes nothing.
    fn stage_prune(&mut self, _backfill_id: Uuid) {}
    /// Makes the turn durable: its audit records and what `staged` holds. Called before any
    /// of its effects is acted on.
    fn commit<'a>(&'a mut self, staged: Staged<'a>) -> StoreFuture<'a>;
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

    /// Local mode keeps runs and backfills in memory: only the audit records are written.
    fn commit<'a>(&'a mut self, _staged: Staged<'a>) -> StoreFuture<'a> {
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
    /// The engine forgot a backfill and its runs (retention): drop what is kept about them.
    fn forget(&mut self, _backfill_id: Uuid, _runs: &[Uuid]) {}
}

/// An action decided in a turn, taken after the turn commits.
pub(super) enum Effect {
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
    Submitted(
        oneshot::Sender<Result<Submitted, SubmitRefused>>,
        Result<Submitted, SubmitRefused>,
    ),
}
