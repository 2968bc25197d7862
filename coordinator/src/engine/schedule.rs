//! Scheduling: accepting and restoring backfills, starting runs while slots are free, starting
//! attempts under step caps, following a decision to its next move, and ending runs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tracing::warn;
use uuid::Uuid;
use warpline_shared::audit::AuditEvent;
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::Action;
use warpline_shared::machine::{Applied, Next, RunState, RunStatus};

use super::{
    Backfill, BackfillRecord, BackfillRequest, Effect, Engine, Event, PipelineSource, RunRecord,
    SubmitConflict,
};

impl Engine {
    /// The answer to a submit whose request id names a backfill already: that backfill when
    /// it asked the same, a conflict when it asked something else; `None` for a new request.
    pub fn submitted_before(&self, req: &BackfillRequest) -> Option<Result<Uuid, SubmitConflict>> {
        let key = req.request.as_ref()?;
        let (id, b) = self
            .backfills
            .iter()
            .find(|(_, b)| b.rec.request.as_ref().is_some_and(|k| k.id == key.id))?;
        let same = b
            .rec
            .request
            .as_ref()
            .is_some_and(|k| k.digest == key.digest);
        Some(if same {
            Ok(*id)
        } else {
            Err(SubmitConflict {
                request_id: key.id.clone(),
                backfill_id: *id,
            })
        })
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
        let rec = BackfillRecord {
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
            siblings: Default::default(),
            request: req.request.clone(),
            llm: Default::default(),
            after_blocked: false,
            partial_after: false,
        };
        let backfill = Backfill::new(rec, req.pipeline.clone(), 0);
        let mut rec = backfill.rec.clone();
        // The partitions' runs, and the backfill-level runs before and after them. Room for
        // all of them at once: growing a map of 100,000 runs step by step holds the old table
        // beside the new one at each step, and the turn's records likewise.
        let plan = req.pipeline.plan(&req.partitions);
        self.runs.reserve(plan.len());
        self.turn
            .reserve(plan.len() + 2 * req.max_parallel.min(plan.len()));
        for (scope, p) in plan {
            let run_id = Uuid::now_v7();
            self.runs.insert(
                run_id,
                RunRecord::new(run_id, id, p.clone(), scope, &backfill.view(scope)),
            );
            rec.runs.push(run_id);
            if scope.is_partition() {
                rec.pending.push_back(run_id);
            }
            self.record_run(
                run_id,
                AuditEvent::RunCreated {
                    partition: p,
                    scope,
                },
            );
        }
        self.backfills.insert(id, Backfill { rec, ..backfill });
        self.index_runs(id);
        self.order.push(id);
        self.dirty_backfills.insert(id);
        self.advance_stages(id);
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
        let mut of_backfill: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        for r in runs {
            of_backfill.entry(r.backfill_id).or_default().push(r.id);
            self.runs.insert(r.id, r);
        }
        for (mut rec, pipeline) in backfills {
            let id = rec.id;
            // Not stored (see `BackfillRecord::runs`): partition order is creation order.
            let mut ids = of_backfill.remove(&id).unwrap_or_default();
            ids.sort_unstable();
            rec.pending = ids
                .iter()
                .copied()
                // Backfill-level runs are started by the stages, never from `pending`.
                .filter(|r| {
                    let run = &self.runs[r];
                    run.scope.is_partition() && run.machine.state() == RunState::Init
                })
                .collect();
            rec.runs = ids;
            let active = rec
                .runs
                .iter()
                .filter(|r| {
                    self.runs
                        .get(r)
                        .is_some_and(|r| matches!(r.machine.state(), RunState::Running(_)))
                })
                .count();
            self.backfills
                .insert(id, Backfill::new(rec, pipeline, active));
            self.index_runs(id);
            self.order.push(id);
        }
        self.order
            .sort_by_key(|id| self.backfills[id].rec.created_at);
        let ids: Vec<Uuid> = self.runs.keys().copied().collect();
        for run_id in ids {
            let run = &self.runs[&run_id];
            let RunState::Running(step) = run.machine.state() else {
                continue;
            };
            if let Some(a) = run.machine.outstanding() {
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
                // At least the grace from now: results that waited in the broker while this
                // coordinator was away arrive in the first seconds of the session, and must
                // not find their attempts already declared lost (and re-run).
                let grace = Duration::from_secs(pipeline.config.lost_grace_s);
                self.effects.push(Effect::Timer {
                    after: total.saturating_sub(elapsed).max(grace),
                    event: Event::Deadline {
                        run_id,
                        attempt_id: a.attempt_id,
                    },
                });
            } else if run.machine.deciding().is_some() {
                if let Some(outcome) = run.last.clone() {
                    self.ask(run_id, *outcome);
                }
            } else {
                self.begin(run_id, 0);
            }
        }
        for id in self.order.clone() {
            // A cancel the last session did not finish goes on.
            if self.backfills[&id].rec.cancelling {
                self.cancel_pending(
                    id,
                    "cancelled by an operator (before the coordinator restarted)".into(),
                );
            }
            self.advance_stages(id);
        }
        self.fill();
    }

    /// Starts pending runs while slots are free, highest priority first.
    pub(super) fn fill(&mut self) {
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
                    && self.before_done(b)
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
                if run.machine.state() == RunState::Init {
                    let (from, to) = run.machine.start().expect("INIT starts");
                    let (from, to) = (from.name(run.machine.steps()), to.name(run.machine.steps()));
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
    pub(super) fn begin(&mut self, run_id: Uuid, delay_ms: u64) {
        let pipeline = self.pipeline_of(run_id);
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let RunState::Running(step) = run.machine.state() else {
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
                    let _ = run.machine.abandon(attempt_id);
                    return self.stop_run(run_id, format!("cannot render the step: {e}"));
                }
            };
        let mut spec = spec;
        if !run.scope.is_partition() {
            // Rendered now, so a resumed after-run lists the partitions as they ended last.
            let (path, content) = self.partitions_file(run_id);
            spec.files.insert(path, content);
        }
        let run = self.runs.get_mut(&run_id).expect("run exists");
        run.attempts_total[step] += 1;
        // Attempt directories are numbered over the run's whole life, not by the machine's
        // count, which a resume or retry-failed starts again at 1: a later attempt never
        // writes into an earlier one's logs.
        spec.log_dir = lifetime_log_dir(&spec.log_dir, &spec.step_id, run.attempts_total[step]);
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
    pub(super) fn stop_run(&mut self, run_id: Uuid, reason: String) {
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let Ok((from, to)) = run.machine.halt() else {
            return;
        };
        let (from, to) = (from.name(run.machine.steps()), to.name(run.machine.steps()));
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
    pub(super) fn finish_run(&mut self, run_id: Uuid, reason: String) {
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let state = run.machine.state();
        let step_id = match state {
            RunState::Complete => None,
            s => s.step().map(|i| run.machine.steps()[i].id.clone()),
        };
        run.reason = (state != RunState::Complete).then(|| reason.clone());
        run.finished_at = Some(Utc::now());
        let bid = run.backfill_id;
        self.record_run(
            run_id,
            AuditEvent::RunFinished {
                state: state.status(),
                step_id,
                reason,
            },
        );
        if matches!(state, RunState::Halted(_)) {
            self.note_halt(run_id);
        }
        self.free_slot(bid);
        self.advance_stages(bid);
    }

    /// Backfill-level supervision: counts HALTED runs by failure signature and escalates the
    /// backfill when `escalate_after_same_halts` of them share one.
    pub(super) fn note_halt(&mut self, run_id: Uuid) {
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
                after_blocked: false,
            },
        );
    }

    pub(super) fn free_slot(&mut self, bid: Uuid) {
        if let Some(b) = self.backfills.get_mut(&bid) {
            b.active = b.active.saturating_sub(1);
        }
        self.fill();
    }

    /// Releases a step's cap slot and starts a run waiting for it.
    pub(super) fn release(&mut self, run_id: Uuid, step: usize) {
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
                matches!(r.machine.state(), RunState::Running(s) if s == step)
                    && r.machine.outstanding().is_none()
                    && r.machine.deciding().is_none()
            });
            if waiting_here {
                self.begin(next, 0);
                break;
            }
        }
    }

    /// Records a transition and does what it implies.
    pub(super) fn follow(
        &mut self,
        run_id: Uuid,
        attempt: u32,
        step_id: String,
        applied: Applied,
        reason: String,
    ) {
        let steps = self.runs[&run_id].machine.steps().to_vec();
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
                if let Some(run) = self.runs.get_mut(&run_id) {
                    run.reason = Some(reason.clone());
                    self.dirty_runs.insert(run_id);
                }
                self.record_run(run_id, AuditEvent::Escalated { step_id, reason });
                // A parked run frees its slot; it waits for an operator, not for a worker.
                self.free_slot(bid);
            }
        }
    }

    /// Cancels one run and records it.
    pub(super) fn cancel_run(&mut self, run_id: Uuid, reason: String) {
        let run = self.runs.get_mut(&run_id).expect("run exists");
        let from = run.machine.state();
        let step = from.step().map(|i| run.machine.steps()[i].id.clone());
        if run.machine.cancel().is_err() {
            return;
        }
        run.reason = Some(reason.clone());
        run.finished_at = Some(Utc::now());
        let from = from.name(run.machine.steps());
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
                state: RunStatus::Cancelled,
                step_id: step,
                reason,
            },
        );
    }

    pub(super) fn shutdown(&mut self, reason: String) {
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
            if !self.runs[&id].machine.state().is_final() {
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
        self.timers.clear();
    }
}

/// `logs/<run id>/<STEP>-<n>` with `n` the step's attempt over the run's whole life
/// ([`RunRecord::attempts_total`]): the rendered directory with its last part renamed.
fn lifetime_log_dir(rendered: &str, step_id: &str, n: u32) -> String {
    std::path::Path::new(rendered)
        .with_file_name(format!("{step_id}-{n}"))
        .display()
        .to_string()
}
