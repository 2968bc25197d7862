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

pub mod grid;
mod handback;
mod liveness;
mod operator;
mod outcome;
mod ports;
mod records;
mod reprocess;
mod resume;
mod retention;
mod schedule;
pub mod snapshot;
#[cfg(test)]
mod stage_tests;
mod stages;
mod summary;
mod tally;
#[cfg(test)]
mod tests;

pub use operator::{
    BackfillAction, Escalation, OperatorAnswer, OperatorCommand, OperatorError, OperatorReply,
    WorkerInfo,
};
pub use outcome::bound_tail;
pub use ports::{Ack, Event, Observer, Staged, Store, StoreFuture, Transport};
pub use records::{
    BackfillRecord, BackfillRequest, EngineConfig, LlmUsage, PipelineSource, RunRecord,
    SubmitConflict, SubmitKey, SubmitRefused, Submitted,
};
pub use retention::PRUNE_EVERY;
pub use summary::{Attempts, BackfillStage, RunSummary, RunsShown, Summary};

use ports::Effect;
use records::Backfill;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tracing::{debug, warn};
use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_shared::config::Pipeline;
use warpline_shared::fleet::Heartbeat;
use warpline_shared::machine::{RunState, RunStatus};

use crate::supervisor::Agent;

/// Most events handled in one turn before committing.
pub const MAX_TURN: usize = 512;
/// Records (and changed runs) a turn's buffers keep room for after its commit.
const KEPT_ROOM: usize = 4 * MAX_TURN;
/// Bytes of a result's log tail kept in the audit log.
pub const AUDIT_TAIL_BYTES: usize = 4096;

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
    /// Feeds agent replies back into the loop. Unbounded, yet bounded in practice: each run has
    /// at most one decision outstanding at a time.
    events: mpsc::UnboundedSender<Event>,
    /// Retry backoffs and attempt deadlines, owned by the loop: they fire only into this
    /// engine, and die with it when a session ends, so a timer armed by one session can never
    /// act in the next (which re-arms what it needs from the store).
    timers: DelayQueue<Event>,
    effects: Vec<Effect>,
    turn: Vec<AuditRecord>,
    dirty_runs: HashSet<Uuid>,
    dirty_backfills: HashSet<Uuid>,
    /// Workers by id: their last heartbeat and when it arrived.
    workers: HashMap<String, (Heartbeat, Instant)>,
    /// Attempts seen running in heartbeats: their run, which worker, when last, and how long
    /// that worker may stay silent.
    seen: HashMap<Uuid, (Uuid, String, Instant, Duration)>,
    stopping: bool,
    /// Set by [`Event::Stop`]: leave the loop, keep the runs.
    halting: bool,
    /// A read that arrived while a turn was being filled: it begins the next turn, answered
    /// from that turn's committed state (see [`Engine::run_until`]).
    deferred: Option<Event>,
    /// When the tick last looked for backfills past their retention.
    pruned_at: Option<Instant>,
    /// Where committed state is published for reads that skip the loop (`serve`).
    snapshots: Option<snapshot::Snapshots>,
    /// Every backfill is to be published at the next commit (a restore, a first publish).
    publish_all: bool,
    /// Backfills forgotten since the last publish.
    forgotten: Vec<Uuid>,
    /// The workers changed since the last publish.
    workers_changed: bool,
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
            timers: DelayQueue::new(),
            effects: Vec::new(),
            turn: Vec::new(),
            dirty_runs: HashSet::new(),
            dirty_backfills: HashSet::new(),
            workers: HashMap::new(),
            seen: HashMap::new(),
            stopping: false,
            halting: false,
            deferred: None,
            pruned_at: None,
            snapshots: None,
            publish_all: false,
            forgotten: Vec::new(),
            workers_changed: false,
        }
    }

    /// Publishes committed state to `snapshots` after every commit (see [`snapshot`]).
    pub fn publish_to(&mut self, snapshots: snapshot::Snapshots) {
        self.snapshots = Some(snapshots);
        self.publish_all = true;
        self.workers_changed = true;
    }

    /// The backfills a commit must publish again: every one after a restore, else those
    /// whose record or runs the turn changed. Taken before the turn's changes are staged.
    fn touched(&mut self) -> Vec<Uuid> {
        if self.snapshots.is_none() {
            return Vec::new();
        }
        if std::mem::take(&mut self.publish_all) {
            return self.order.clone();
        }
        let mut touched: HashSet<Uuid> = self.dirty_backfills.iter().copied().collect();
        touched.extend(
            (self.dirty_runs.iter()).filter_map(|id| self.runs.get(id).map(|r| r.backfill_id)),
        );
        touched.into_iter().collect()
    }

    /// Publishes what a commit changed (`touched`, the forgotten backfills, the workers).
    fn publish(&mut self, touched: Vec<Uuid>) {
        let Some(snapshots) = self.snapshots.clone() else {
            return;
        };
        let mut summaries = Vec::with_capacity(touched.len() + self.forgotten.len());
        for id in touched {
            if self.backfills.contains_key(&id) {
                summaries.push((id, Some(self.summary_where(id, RunsShown::None))));
            }
        }
        summaries.extend(self.forgotten.drain(..).map(|id| (id, None)));
        let workers = std::mem::take(&mut self.workers_changed)
            .then(|| self.workers.values().cloned().collect());
        snapshots.publish(summaries, self.store.audit_location(), workers);
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

    /// The pipeline that renders a run: its backfill's, as the run's scope sees it.
    fn pipeline_of(&self, run_id: Uuid) -> Arc<Pipeline> {
        let run = &self.runs[&run_id];
        self.backfills[&run.backfill_id].view(run.scope)
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
            // Idempotent: only a run between attempts begins one (a duplicate, or a Ready that
            // outlived a restart, finds an attempt already outstanding and changes nothing).
            Event::Ready { run_id, waited_ms } => {
                if !self.stopping
                    && self
                        .runs
                        .get(&run_id)
                        .is_some_and(|r| r.machine.between_attempts())
                {
                    self.begin(run_id, waited_ms);
                } else {
                    debug!(%run_id, "ignoring a backoff for a run that is not between attempts");
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
                let answer = match self.submitted_before(&req) {
                    Some(known) => known
                        .map(|id| Submitted {
                            id,
                            runs: self.backfills[&id].rec.runs.len(),
                            skipped: Default::default(),
                        })
                        .map_err(SubmitRefused::from),
                    None => self.submit_reprocessed(*req),
                };
                if let Some(reply) = reply {
                    self.effects.push(Effect::Submitted(reply, answer));
                }
            }
            Event::Operator(cmd, reply) => {
                let answer = self.on_operator(cmd);
                self.effects.push(Effect::Reply(reply, answer));
            }
            Event::Heartbeat(hb) => self.on_heartbeat(*hb),
            Event::Tick => self.on_tick(),
            Event::CancelPending {
                backfill_id,
                reason,
            } => self.cancel_pending(backfill_id, reason),
            Event::Stop => self.halting = true,
            Event::Shutdown { reason } => self.shutdown(reason),
        }
    }

    /// Answers a read ([`Event::is_read`]) now, from the state as it is.
    fn answer_read(&mut self, ev: Event) {
        if let Event::Operator(cmd, reply) = ev
            && !reply.is_closed()
        {
            let _ = reply.send(self.on_operator(cmd));
        }
    }

    /// True when no run can move any more without an operator.
    pub fn idle(&self) -> bool {
        self.runs.values().all(|r| match r.machine.state() {
            RunState::Running(_) => false,
            // A run not started yet can only start if its backfill is not escalated and its
            // before-steps completed. A backfill-level run starts the moment the runs it waits
            // for end, so one still waiting waits for something else.
            RunState::Init if r.scope.is_partition() => self
                .backfills
                .get(&r.backfill_id)
                .is_some_and(|b| b.rec.escalated.is_some() || !self.before_done(b)),
            _ => true,
        })
    }

    /// Waits for the next input: an event from outside, or one of the engine's timers.
    pub(super) async fn next_event(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<Event>,
    ) -> Option<Event> {
        let timers = &mut self.timers;
        let armed = !timers.is_empty();
        tokio::select! {
            ev = events.recv() => ev,
            Some(expired) = std::future::poll_fn(|cx| timers.poll_expired(cx)), if armed => {
                Some(expired.into_inner())
            }
        }
    }

    /// An input that is ready now, without waiting (to fill a turn).
    fn ready_event(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) -> Option<Event> {
        if let Ok(ev) = events.try_recv() {
            return Some(ev);
        }
        if self.timers.is_empty() {
            return None;
        }
        let timers = &mut self.timers;
        std::future::poll_fn(|cx| timers.poll_expired(cx))
            .now_or_never()
            .flatten()
            .map(|expired| expired.into_inner())
    }

    /// Commits the turn, shows it, then acts on it.
    async fn end_turn(&mut self) -> anyhow::Result<()> {
        self.tally_changed();
        let touched = self.touched();
        // Lent, not copied: nothing changes them until the commit returns.
        let staged = Staged {
            backfills: (self.dirty_backfills.drain())
                .filter_map(|id| self.backfills.get(&id).map(|b| &b.rec))
                .collect(),
            runs: (self.dirty_runs.drain())
                .filter_map(|id| self.runs.get(&id))
                .collect(),
            dispatched: (self.effects.iter())
                .filter_map(|e| match e {
                    Effect::Dispatch(spec) => Some(&**spec),
                    _ => None,
                })
                .collect(),
        };
        self.store.commit(staged).await?;
        // Before the turn's answers go out: a client answered reads what it did.
        self.publish(touched);
        for rec in self.turn.drain(..) {
            self.observer.on_record(&rec);
        }
        // A large turn's room (a 100,000-partition submit's records, ~50 MB) is not kept for
        // the usual turns of at most MAX_TURN events.
        self.turn.shrink_to(KEPT_ROOM);
        self.dirty_runs.shrink_to(KEPT_ROOM);
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
                    self.timers.insert(event, after);
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
    pub async fn run(self, events: &mut mpsc::UnboundedReceiver<Event>) -> anyhow::Result<Engine> {
        self.run_until(events, CancellationToken::new()).await
    }

    /// [`Engine::run`], also ending (as [`Event::Stop`] does: runs left as they are) once
    /// `stop` is cancelled. Fleet mode stops a session this way rather than with an event in
    /// the channel it shares with the next session.
    pub async fn run_until(
        mut self,
        events: &mut mpsc::UnboundedReceiver<Event>,
        stop: CancellationToken,
    ) -> anyhow::Result<Engine> {
        self.end_turn().await?;
        while !(self.stopping || self.halting || (self.cfg.exit_when_idle && self.idle())) {
            let first = match self.deferred.take() {
                Some(ev) => Some(ev),
                None => tokio::select! {
                    biased;
                    () = stop.cancelled() => {
                        self.halting = true;
                        break;
                    }
                    ev = self.next_event(events) => ev,
                },
            };
            let Some(first) = first else {
                break;
            };
            // Reads (status, the grid, escalations, workers) change nothing: at the start of a
            // turn the state is what the last commit holds, so one is answered at once instead
            // of after a turn of up to MAX_TURN events and its commit. One that comes while a
            // turn fills ends the filling and begins the next turn.
            if first.is_read() {
                self.answer_read(first);
                continue;
            }
            self.handle(first);
            for _ in 1..MAX_TURN {
                match self.ready_event(events) {
                    Some(ev) if ev.is_read() => {
                        self.deferred = Some(ev);
                        break;
                    }
                    Some(ev) => self.handle(ev),
                    None => break,
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
            b.rec.pending.clear();
            let why = match b.rec.escalated.clone() {
                Some(why) => format!("not started: the backfill was escalated ({why})"),
                None => {
                    "not started: the runs it waits for did not end (one waits for an operator)"
                        .to_string()
                }
            };
            // Partitions an escalation (or unfinished before-steps) kept back, and
            // backfill-level runs whose turn never came.
            let unstarted: Vec<Uuid> = b
                .rec
                .runs
                .iter()
                .copied()
                .filter(|r| self.runs[r].machine.state() == RunState::Init)
                .collect();
            for run_id in unstarted {
                self.cancel_run(run_id, why.clone());
            }
        }
        let reason = if self.stopping {
            "stopped before every run finished".to_string()
        } else {
            "every run is final or waiting for an operator".to_string()
        };
        for id in self.order.clone() {
            let s = self.summary(id);
            let count = |st: RunStatus| s.counts.get(&st).copied().unwrap_or(0);
            self.record(
                Some(id),
                None,
                AuditEvent::BackfillFinished {
                    complete: count(RunStatus::Complete),
                    halted: count(RunStatus::Halted),
                    cancelled: count(RunStatus::Cancelled),
                    escalated: count(RunStatus::Escalated),
                    reason: reason.clone(),
                },
            );
        }
        self.end_turn().await?;
        self.observer.finish();
        Ok(self)
    }
}
