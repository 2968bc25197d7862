//! What the engine stores: a backfill as submitted ([`BackfillRequest`]), and a run and a
//! backfill as persisted ([`RunRecord`], [`BackfillRecord`], [`PipelineSource`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::{Action, AttemptSummary, ReportStatus, StepOutcome};
use warpline_shared::machine::{AttemptFacts, Machine, StepLimit};
use warpline_shared::partition::Partition;
use warpline_shared::stage::RunScope;

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
    /// The client's request id and the digest of what it asked, when it gave one: a second
    /// submit with the same id gets this backfill back instead of a new one.
    pub request: Option<SubmitKey>,
    /// Which partitions run, against earlier backfills of the same pipeline the engine holds
    /// (see [`crate::reprocess`]); `All` runs every one.
    pub reprocess: crate::reprocess::Reprocess,
}

/// A submit the engine applied: the backfill (new, or the one its request id names) and what
/// its reprocess mode left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The backfill.
    pub id: Uuid,
    /// Its runs.
    pub runs: usize,
    /// Partitions left out by the reprocess mode.
    pub skipped: crate::reprocess::Skipped,
}

/// Why a submit was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitRefused {
    /// Its request id names another submit.
    #[error(transparent)]
    Conflict(#[from] SubmitConflict),
    /// Its reprocess mode left no partition to run.
    #[error("nothing to run: {0}; submit with reprocess `all` to run them again")]
    NothingToRun(String),
}

/// A submit's idempotency key: the client's `request_id` and the sha256 of its request body
/// (without the id). Kept in the backfill's record, so it holds across restarts and failovers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitKey {
    /// The client's request id.
    pub id: String,
    /// sha256 (hex) of the request it named.
    pub digest: String,
}

/// Why a submit was not applied: its request id already names a backfill submitted with a
/// different request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "request_id `{request_id}` was already used for a different submit (backfill {backfill_id}): use a new id for a new backfill"
)]
pub struct SubmitConflict {
    /// The request id.
    pub request_id: String,
    /// The backfill it names.
    pub backfill_id: Uuid,
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
    /// The outcome awaiting a decision. Boxed: most runs have none, and a run is held in
    /// memory for every partition of every backfill (an outcome inline would be ~420 of the
    /// run's ~900 bytes).
    pub last: Option<Box<StepOutcome>>,
    /// Why the run stopped or waits for an operator, when it does.
    pub reason: Option<String>,
    /// Failed `warn` checks of its accepted attempts (`STEP: name (detail)`), oldest first.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// When the outstanding attempt was dispatched (to re-arm its deadline after a restart).
    pub dispatched_at: Option<DateTime<Utc>>,
    /// When the run reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
    /// Workers that handed the current step back since its last attempt that ran (see
    /// [`crate::fleet::capability`]); cleared when an attempt of it reports.
    #[serde(default)]
    pub hand_backs: Vec<crate::fleet::capability::HandBack>,
    /// Which steps it runs: a partition's, or a group of backfill-level steps.
    #[serde(default, skip_serializing_if = "RunScope::is_partition_ref")]
    pub scope: RunScope,
    /// What it adds to its backfill's tally (not stored: counted again on restore).
    #[serde(skip)]
    pub share: super::tally::Share,
}

impl RunRecord {
    /// A run not started yet of `partition` in backfill `backfill_id`, over `steps` (the steps
    /// of its scope: [`Pipeline::steps`] of the backfill's pipeline or of its scope's view).
    pub fn new(
        id: Uuid,
        backfill_id: Uuid,
        partition: Partition,
        scope: RunScope,
        steps: &Pipeline,
    ) -> RunRecord {
        let limits: Vec<StepLimit> = steps
            .steps()
            .iter()
            .map(|s| StepLimit {
                id: s.id.clone(),
                max_attempts: s.max_attempts,
            })
            .collect();
        RunRecord {
            id,
            backfill_id,
            partition,
            attempts_total: vec![0; limits.len()],
            machine: Machine::new(limits),
            history: Vec::new(),
            last: None,
            reason: None,
            warnings: Vec::new(),
            dispatched_at: None,
            finished_at: None,
            hand_backs: Vec::new(),
            scope,
            share: Default::default(),
        }
    }

    /// Closes the attempt that was awaiting a decision into the run's history, with the action
    /// the state machine applied and the decision's reason; the outcome it kept is taken. The
    /// engine and a local resume's replay both call it, so a replayed history is the engine's.
    pub fn close_attempt(
        &mut self,
        step_id: String,
        attempt: u32,
        facts: &AttemptFacts,
        applied: Action,
        reason: String,
    ) {
        let outcome = self.last.take();
        self.history.push(AttemptSummary {
            step_id,
            attempt,
            exit_code: facts.exit_code,
            timed_out: facts.timed_out,
            lost: facts.lost,
            status: outcome
                .as_ref()
                .map(|o| o.report.status)
                .unwrap_or(ReportStatus::Fail),
            failed_checks: facts.failed_checks.clone(),
            action: applied,
            reason,
        });
    }
}

/// One backfill, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackfillRecord {
    /// The backfill.
    pub id: Uuid,
    /// The pipeline's name.
    pub pipeline: String,
    /// Its runs, in partition order. Not in the stored JSON: a backfill's record is written
    /// again in every turn that starts one of its runs, and with these lists (two UUIDs per
    /// partition) each such write was as long as the backfill (~8 MB at 100,000 partitions).
    /// [`Engine::restore`](super::Engine::restore) rebuilds both from the runs: their ids are
    /// UUIDv7s made in partition order by one process, so they sort in that order.
    #[serde(skip)]
    pub runs: Vec<Uuid>,
    /// Runs not started yet: after a restore, its runs still in INIT, in order.
    #[serde(skip)]
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
    /// Values the runs that passed a step measured, for `sibling_deviation` gates.
    #[serde(default)]
    pub siblings: crate::gates::Siblings,
    /// The submit's idempotency key, when the client gave a request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<SubmitKey>,
    /// What the backfill's decisions cost in LLM calls and tokens.
    #[serde(default)]
    pub llm: LlmUsage,
    /// The backfill is escalated because after-steps wait for partitions that did not
    /// complete (an operator's `continue` then runs them on what completed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub after_blocked: bool,
    /// An operator let the after-steps run although some partitions did not complete.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial_after: bool,
}

/// LLM use of a backfill's decisions: what an operator pays for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LlmUsage {
    /// Decisions an LLM made (a fallback to the rules after it failed counts too: it was asked).
    pub decisions: u64,
    /// HTTP requests to the model, retries included.
    pub requests: u64,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Reply tokens.
    pub output_tokens: u64,
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

pub(super) struct Backfill {
    pub(super) rec: BackfillRecord,
    pub(super) pipeline: Arc<Pipeline>,
    /// The pipeline as each group of backfill-level steps sees it ([`Pipeline::view`]).
    pub(super) views: HashMap<RunScope, Arc<Pipeline>>,
    /// Runs started and not yet final or parked.
    pub(super) active: usize,
    /// Its backfill-level runs, in order (indexed once, by [`Engine::index_runs`], so
    /// that a run's end does not look through every run of the backfill for them).
    ///
    /// [`Engine::index_runs`]: super::Engine::index_runs
    pub(super) stage_runs: Vec<Uuid>,
    /// Its datasets, in first-seen order (indexed with `stage_runs`).
    pub(super) datasets: Vec<String>,
    /// Its runs, counted (see [`super::tally`]).
    pub(super) tally: super::tally::Tally,
}

impl Backfill {
    pub(super) fn new(rec: BackfillRecord, pipeline: Arc<Pipeline>, active: usize) -> Backfill {
        let views = [RunScope::Before, RunScope::AfterDataset, RunScope::After]
            .into_iter()
            .filter(|s| pipeline.has_scope(*s))
            .map(|s| (s, Arc::new(pipeline.view(s))))
            .collect();
        Backfill {
            rec,
            pipeline,
            views,
            active,
            stage_runs: Vec::new(),
            datasets: Vec::new(),
            tally: Default::default(),
        }
    }

    /// The pipeline that renders runs of `scope`.
    pub(super) fn view(&self, scope: RunScope) -> Arc<Pipeline> {
        match scope {
            RunScope::Partition => self.pipeline.clone(),
            s => self
                .views
                .get(&s)
                .cloned()
                .unwrap_or_else(|| Arc::new(self.pipeline.view(s))),
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// End the loop when no run can move any more (local mode).
    pub exit_when_idle: bool,
    /// How long a finished backfill is kept after its last run ended (`serve
    /// --retention-days`); then the engine forgets it and the store deletes its rows (see
    /// [`super::retention`]). `None` keeps everything.
    pub retention: Option<std::time::Duration>,
}
