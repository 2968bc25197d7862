//! Operator commands: what an operator can ask ([`OperatorCommand`]), how the engine answers
//! ([`OperatorReply`], [`OperatorError`]), and the handler that applies them to the runs.

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use warpline_shared::audit::AuditEvent;
use warpline_shared::contracts::Action;
use warpline_shared::machine::{RunState, RunStatus};
use warpline_shared::stage::RunScope;

use super::ports::Effect;
use super::{Engine, Event, Summary};

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
        /// Who (audited; empty when a backfill escalation's answer already was).
        operator: String,
    },
    /// Resume every HALTED run of a backfill at the step that failed.
    RetryFailed {
        /// The backfill.
        backfill_id: Uuid,
        /// Who (audited).
        operator: String,
    },
    /// The state of one backfill, or of all.
    Status {
        /// The backfill, or all.
        backfill_id: Option<Uuid>,
        /// Which runs each summary lists.
        #[serde(default)]
        runs: super::RunsShown,
    },
    /// One page of a backfill's grid ([`Engine::grid`]).
    Grid {
        /// The backfill.
        backfill_id: Uuid,
        /// Which runs, which page.
        filter: super::grid::Filter,
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
    /// Start a new backfill of a backfill's pipeline (as it was submitted) over its
    /// partitions, choosing which run again with a reprocess mode against every backfill of
    /// that pipeline the engine holds (this one included).
    Reprocess {
        /// The backfill to run again.
        backfill_id: Uuid,
        /// Which of its partitions run.
        mode: crate::reprocess::Reprocess,
        /// Who (audited).
        operator: String,
    },
}

/// An operator's answer to a backfill escalation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackfillAction {
    /// Start runs again (the signature count starts over).
    Continue,
    /// Cancel the backfill.
    Cancel,
}

/// The engine's answer to an operator: what it did or what it knows, or why it refused.
pub type OperatorReply = Result<OperatorAnswer, OperatorError>;

/// What the engine answers to an [`OperatorCommand`]: a closed set, one variant per kind of
/// answer. On the wire (the HTTP API) each variant is its content alone (`untagged`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OperatorAnswer {
    /// `resolve`: the run's new state.
    Resolved {
        /// The run.
        run_id: Uuid,
        /// The action applied.
        action: Action,
        /// Its state now (the step's id when it runs again).
        state: String,
    },
    /// `retry-failed`: how many HALTED runs were resumed.
    Resumed {
        /// The backfill.
        backfill_id: Uuid,
        /// Runs resumed.
        resumed: usize,
    },
    /// `reprocess`: the new backfill.
    Reprocessed {
        /// The new backfill.
        backfill_id: Uuid,
        /// The backfill it runs again.
        reprocess_of: Uuid,
        /// Its runs.
        runs: usize,
        /// Partitions the mode left out.
        skipped: crate::reprocess::Skipped,
    },
    /// `grid`: one page of a backfill's grid.
    Grid(Box<super::grid::GridPage>),
    /// `status`, `cancel`, `resolve-backfill`: one backfill's summary.
    Summary(Box<Summary>),
    /// `status` of all: every backfill's summary, in submission order.
    Summaries(Vec<Summary>),
    /// `escalations`: every run waiting for an operator.
    Escalations(Vec<Escalation>),
    /// `workers`: the workers heard from recently, by id.
    Workers(Vec<WorkerInfo>),
}

/// A worker heard from recently (`GET /v1/workers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerInfo {
    /// Its id (`--worker-id`, default `<hostname>-<pid>`).
    pub worker_id: String,
    /// The pool it consumes.
    pub pool: String,
    /// Steps it runs at once.
    pub slots: u32,
    /// Steps running now.
    pub running: usize,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ms: u64,
    /// What it may run: its allowlist entries as resolved on it (`entry`, `program`, `pinned`
    /// arguments, and `resolved`, the absolute path the program resolves to there, absent when
    /// it does not). Absent from a worker that predates advertising.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub allow: Option<Vec<warpline_shared::fleet::AllowedCommand>>,
}

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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

/// Runs not started yet that a cancel ends per turn.
pub const CANCEL_CHUNK: usize = 2_000;

impl Engine {
    /// Cancels up to [`CANCEL_CHUNK`] of a cancelling backfill's runs not started yet, and
    /// comes back for the rest in the next turn.
    pub(super) fn cancel_pending(&mut self, backfill_id: Uuid, why: String) {
        let Some(b) = self.backfills.get_mut(&backfill_id) else {
            return;
        };
        let n = b.rec.pending.len().min(CANCEL_CHUNK);
        let chunk: Vec<Uuid> = b.rec.pending.drain(..n).collect();
        let more = !b.rec.pending.is_empty();
        for id in chunk {
            self.cancel_run(id, why.clone());
        }
        if more {
            self.effects.push(Effect::Timer {
                after: std::time::Duration::ZERO,
                event: Event::CancelPending {
                    backfill_id,
                    reason: why,
                },
            });
        }
    }
}

impl OperatorCommand {
    /// True for a command that only reads (status, escalations, workers): it changes nothing,
    /// so nothing need be committed before it is answered.
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            OperatorCommand::Status { .. }
                | OperatorCommand::Grid { .. }
                | OperatorCommand::Escalations
                | OperatorCommand::Workers
        )
    }
}

impl Engine {
    /// Answers an operator after the loop has ended (a local run's dashboard kept up with
    /// `--ui-stay`): what it asks to read is answered from the final state; what would change
    /// a run is refused, since nothing would record or carry it out any more.
    pub fn answer_ended(&mut self, cmd: OperatorCommand) -> OperatorReply {
        match cmd {
            cmd if cmd.is_read() => self.on_operator(cmd),
            _ => Err(OperatorError::Refused(
                "this local run has ended: nothing can change it from here; continue it with \
                 `warpline run PIPELINE --resume` (answer escalations with --resolve RUN=ACTION)"
                    .into(),
            )),
        }
    }

    pub(super) fn on_operator(&mut self, cmd: OperatorCommand) -> OperatorReply {
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
                let attempt = run.machine.attempts()[run.machine.state().step().unwrap_or(0)];
                let applied = run
                    .machine
                    .resolve(action)
                    .map_err(|e| OperatorError::Refused(e.to_string()))?;
                let step_id = run.machine.steps()[applied.from.step().unwrap_or(0)]
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
                if let Some(run) = self.runs.get_mut(&run_id) {
                    run.reason = None;
                }
                let to = applied.to.name(self.runs[&run_id].machine.steps());
                self.follow(
                    run_id,
                    attempt,
                    step_id,
                    applied,
                    format!("operator {operator}: {reason}"),
                );
                Ok(OperatorAnswer::Resolved {
                    run_id,
                    action,
                    state: to,
                })
            }
            OperatorCommand::Cancel {
                backfill_id,
                operator,
            } => {
                if !self.backfills.contains_key(&backfill_id) {
                    return Err(OperatorError::UnknownBackfill(backfill_id));
                }
                // An escalated backfill answered with cancel has its answer audited already.
                if !operator.is_empty() {
                    self.record(
                        Some(backfill_id),
                        None,
                        AuditEvent::BackfillResolution {
                            operator: operator.clone(),
                            action: "cancel".into(),
                            reason: "cancelled: nothing new starts, running steps finish".into(),
                        },
                    );
                }
                let b = self.backfills.get_mut(&backfill_id).expect("checked");
                b.rec.cancelling = true;
                let runs = b.rec.runs.clone();
                self.dirty_backfills.insert(backfill_id);
                let why = if operator.is_empty() {
                    "cancelled by an operator".to_string()
                } else {
                    format!("cancelled by operator {operator}")
                };
                // Runs not started yet end a chunk per turn ([`CANCEL_CHUNK`]), so the cancel
                // is answered at once however many there are (the backfill reads cancelling
                // until the last has ended, and nothing of it starts meanwhile).
                self.cancel_pending(backfill_id, why.clone());
                // Runs between steps or parked end now; runs with a step in flight end after it.
                for id in runs {
                    let r = &self.runs[&id];
                    let m = &r.machine;
                    if m.state() == RunState::Init && r.scope.is_partition() {
                        continue;
                    }
                    let idle = m.outstanding().is_none() && m.deciding().is_none();
                    let parked = matches!(m.state(), RunState::Escalated(_));
                    if !m.state().is_final() && (idle || parked) {
                        let was_running = matches!(m.state(), RunState::Running(_));
                        self.cancel_run(id, why.clone());
                        if was_running && let Some(b) = self.backfills.get_mut(&backfill_id) {
                            b.active = b.active.saturating_sub(1);
                        }
                    }
                }
                // Counts only: the answer stays small at any backfill size.
                Ok(OperatorAnswer::Summary(Box::new(
                    self.summary_where(backfill_id, super::RunsShown::None),
                )))
            }
            OperatorCommand::RetryFailed {
                backfill_id,
                operator,
            } => {
                let b = self
                    .backfills
                    .get_mut(&backfill_id)
                    .ok_or(OperatorError::UnknownBackfill(backfill_id))?;
                // A cancelled backfill stays cancelled: resuming its halted runs would quietly
                // undo the cancel (and its summary would read finished instead of cancelled).
                if b.rec.cancelling {
                    return Err(OperatorError::Refused(format!(
                        "backfill {backfill_id} was cancelled: retry-failed resumes the halted runs of a backfill that goes on; submit the pipeline again to run it"
                    )));
                }
                // Resuming the halted runs is the operator's answer to a backfill escalation too.
                let was_escalated = b.rec.escalated.take().is_some();
                b.rec.after_blocked = false;
                b.rec.halt_signatures.clear();
                let runs = b.rec.runs.clone();
                if was_escalated {
                    self.record(
                        Some(backfill_id),
                        None,
                        AuditEvent::BackfillResolution {
                            operator: operator.clone(),
                            action: "continue".into(),
                            reason: "the halted runs were resumed".into(),
                        },
                    );
                }
                let mut resumed = 0;
                let mut stage_runs = Vec::new();
                for id in runs {
                    let run = self.runs.get_mut(&id).expect("run exists");
                    if let Ok(step) = run.machine.resume() {
                        run.reason = None;
                        run.finished_at = None;
                        let to = run.machine.steps()[step].id.clone();
                        self.record_run(
                            id,
                            AuditEvent::Transition {
                                from: "HALTED".into(),
                                to,
                                action: Some(Action::Retry),
                            },
                        );
                        if self.runs[&id].scope.is_partition() {
                            self.backfills
                                .get_mut(&backfill_id)
                                .expect("backfill exists")
                                .rec
                                .pending
                                .push_back(id);
                        } else {
                            // A backfill-level run had its turn already: it goes on at once.
                            stage_runs.push(id);
                        }
                        resumed += 1;
                    }
                }
                self.record(
                    Some(backfill_id),
                    None,
                    AuditEvent::BackfillResolution {
                        operator,
                        action: "retry-failed".into(),
                        reason: format!("{resumed} halted runs resumed at the step that failed"),
                    },
                );
                self.dirty_backfills.insert(backfill_id);
                for id in stage_runs {
                    if let Some(b) = self.backfills.get_mut(&backfill_id) {
                        b.active += 1;
                    }
                    self.begin(id, 0);
                }
                self.fill();
                Ok(OperatorAnswer::Resumed {
                    backfill_id,
                    resumed,
                })
            }
            OperatorCommand::Status {
                backfill_id: Some(id),
                runs,
            } => {
                if !self.backfills.contains_key(&id) {
                    return Err(OperatorError::UnknownBackfill(id));
                }
                Ok(OperatorAnswer::Summary(Box::new(
                    self.summary_where(id, runs),
                )))
            }
            OperatorCommand::Grid {
                backfill_id,
                filter,
            } => {
                if !self.backfills.contains_key(&backfill_id) {
                    return Err(OperatorError::UnknownBackfill(backfill_id));
                }
                Ok(OperatorAnswer::Grid(Box::new(
                    self.grid(backfill_id, &filter),
                )))
            }
            OperatorCommand::Status {
                backfill_id: None,
                runs,
            } => {
                let all: Vec<Summary> = (self.order.clone().into_iter())
                    .map(|id| self.summary_where(id, runs))
                    .collect();
                Ok(OperatorAnswer::Summaries(all))
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
                let before_halted = b.rec.runs.first().is_some_and(|id| {
                    let r = &self.runs[id];
                    r.scope == RunScope::Before && r.machine.state().is_final()
                });
                if action == BackfillAction::Continue && before_halted {
                    return Err(OperatorError::Refused(format!(
                        "the before-steps of backfill `{backfill_id}` did not complete, and no partition starts without them: answer `warpline retry-failed {backfill_id}` (after fixing the cause) or `--action cancel`"
                    )));
                }
                let b = self.backfills.get_mut(&backfill_id).expect("checked");
                b.rec.escalated = None;
                // Continuing past after-steps that wait for incomplete partitions runs them
                // on what completed.
                if std::mem::take(&mut b.rec.after_blocked) && action == BackfillAction::Continue {
                    b.rec.partial_after = true;
                }
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
                        self.advance_stages(backfill_id);
                        self.fill();
                        Ok(OperatorAnswer::Summary(Box::new(self.summary(backfill_id))))
                    }
                    BackfillAction::Cancel => self.on_operator(OperatorCommand::Cancel {
                        backfill_id,
                        operator: String::new(),
                    }),
                }
            }
            OperatorCommand::Reprocess {
                backfill_id,
                mode,
                operator,
            } => self.reprocess(backfill_id, mode, operator),
            OperatorCommand::Workers => Ok(OperatorAnswer::Workers(super::snapshot::worker_infos(
                self.workers.values().map(|(hb, at)| (hb, at)),
            ))),
            OperatorCommand::Escalations => {
                // Only backfills whose tally counts an escalated run are looked through.
                self.tally_changed();
                let list: Vec<Escalation> = (self.order.iter())
                    .map(|b| &self.backfills[b])
                    .filter(|b| b.tally.count(RunStatus::Escalated) > 0)
                    .flat_map(|b| b.rec.runs.iter())
                    .filter_map(|id| {
                        let r = &self.runs[id];
                        let RunState::Escalated(step) = r.machine.state() else {
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
                            partition: r.scope.key(&r.partition),
                            step: r.machine.steps()[step].id.clone(),
                            attempts: r.machine.attempts()[step],
                            reason,
                        })
                    })
                    .collect();
                Ok(OperatorAnswer::Escalations(list))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use warpline_shared::machine::RunStatus;

    use super::super::tests::Harness;
    use super::*;

    /// A cancel ends the runs not started yet a chunk per turn: its answer comes at once with
    /// the first chunk, the rest follows turn by turn, nothing of the backfill starts
    /// meanwhile, and a restart in the middle goes on with what is left.
    #[tokio::test(start_paused = true)]
    async fn a_cancel_ends_runs_not_started_a_chunk_per_turn_across_a_restart() {
        let mut h = Harness::new();
        let steps = serde_json::json!([{"id": "A", "command": "true"}]);
        let names: Vec<String> = (0..2 * CANCEL_CHUNK + 10)
            .map(|i| format!("p{i}"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut req = h.backfill(steps, &names);
        req.max_parallel = 1;
        let id = req.id;
        let t = h.turn([Event::Submit(Box::new(req), None)]).await;
        assert_eq!(t.dispatched.len(), 1);
        let count =
            |h: &mut Harness, st: RunStatus| h.summary(id).counts.get(&st).copied().unwrap_or(0);

        let answer = h
            .engine
            .on_operator(OperatorCommand::Cancel {
                backfill_id: id,
                operator: "ana".into(),
            })
            .unwrap();
        let OperatorAnswer::Summary(s) = answer else {
            panic!("not a summary: {answer:?}");
        };
        assert!(s.cancelling && s.runs.is_empty(), "counts only");
        assert_eq!(s.counts.get(&RunStatus::Cancelled), Some(&CANCEL_CHUNK));
        let t = h.commit().await;
        assert!(t.dispatched.is_empty(), "nothing starts once cancelling");
        assert!(
            t.timers.iter().any(|(_, e)| e.starts_with("CancelPending")),
            "{:?}",
            t.timers
        );

        // The next chunk comes in its own turn.
        let next = h.next_event().await;
        assert!(matches!(next, Event::CancelPending { .. }), "{next:?}");
        let t = h.turn([next]).await;
        assert!(t.dispatched.is_empty());
        assert_eq!(count(&mut h, RunStatus::Cancelled), 2 * CANCEL_CHUNK);

        // A restart before the last chunk: the restored engine goes on cancelling.
        let t = h.restart().await;
        assert!(
            t.dispatched.is_empty(),
            "a cancelling backfill starts nothing"
        );
        // The one running run and nine left: the restore cancelled those nine.
        assert_eq!(count(&mut h, RunStatus::Cancelled), 2 * CANCEL_CHUNK + 9);
        assert_eq!(count(&mut h, RunStatus::Running), 1);
        assert!(!h.summary(id).finished, "its running step has not ended");
    }
}
