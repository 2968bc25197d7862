//! Summaries: a backfill's state as operators and clients read it ([`Summary`], [`RunSummary`]).

use std::collections::BTreeMap;

use super::{Engine, LlmUsage, RunRecord};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use warpline_shared::contracts::SCHEMA_VERSION;
use warpline_shared::machine::{RunState, RunStatus};
use warpline_shared::stage::RunScope;

/// One run in a summary.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Current or final status (`RUNNING` while at a step; the step is in `step`).
    #[schema(value_type = String, example = "RUNNING")]
    pub state: RunStatus,
    /// The step it is at or stopped at (none when complete or not started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Attempts per step (a JSON object: step id → attempts; steps not tried are left out).
    #[schema(value_type = BTreeMap<String, u32>)]
    pub attempts: Attempts,
    /// Why it did not complete (or waits for an operator).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Failed `warn` checks of its attempts (`STEP: name (detail)`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Which steps it runs: `partition` (omitted), or a backfill-level run's `before`,
    /// `after_dataset` (its `dataset` set) or `after`.
    #[serde(default, skip_serializing_if = "RunScope::is_partition_ref")]
    #[schema(value_type = String, example = "after")]
    pub scope: RunScope,
    /// A backfill-level run's step ids, in order (a partition's are the summary's `steps`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
}

/// A run's attempts per step, in the pipeline's order: serialised as a JSON object (step id →
/// attempts), kept as a list. A full summary holds one per run, and a one-entry `BTreeMap`
/// allocates a whole B-tree node (~300 bytes): 30 MB of a 100,000-run status answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attempts(Vec<(String, u32)>);

impl Attempts {
    /// The attempts of step `id`, when it was tried.
    pub fn get(&self, id: &str) -> Option<&u32> {
        self.0.iter().find(|(s, _)| s == id).map(|(_, n)| n)
    }

    /// True when step `id` was tried.
    pub fn contains_key(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// The attempts of each step tried.
    pub fn values(&self) -> impl Iterator<Item = &u32> {
        self.0.iter().map(|(_, n)| n)
    }
}

impl std::ops::Index<&str> for Attempts {
    type Output = u32;

    fn index(&self, id: &str) -> &u32 {
        self.get(id)
            .unwrap_or_else(|| panic!("no attempts of step `{id}`"))
    }
}

impl FromIterator<(String, u32)> for Attempts {
    fn from_iter<I: IntoIterator<Item = (String, u32)>>(iter: I) -> Attempts {
        Attempts(iter.into_iter().collect())
    }
}

impl Serialize for Attempts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de> Deserialize<'de> for Attempts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Attempts, D::Error> {
        // In the order the object lists them (the coordinator writes the pipeline's).
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Attempts;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of step ids to attempts")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Attempts, A::Error> {
                let mut out = Vec::with_capacity(m.size_hint().unwrap_or(0));
                while let Some(entry) = m.next_entry::<String, u32>()? {
                    out.push(entry);
                }
                Ok(Attempts(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Which runs a summary lists (`GET /v1/backfills/{id}?runs=`); its counts, rate and state are
/// over every run whichever it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunsShown {
    /// Every run (the default).
    #[default]
    All,
    /// The runs an operator looks at: halted, escalated, cancelled.
    Failed,
    /// None: counts only, the same answer at any backfill size.
    None,
}

impl RunsShown {
    /// True when a summary of this kind lists run `r`.
    pub fn keeps(self, r: &RunRecord) -> bool {
        match self {
            RunsShown::All => true,
            RunsShown::None => false,
            RunsShown::Failed => matches!(
                r.machine.state().status(),
                RunStatus::Halted | RunStatus::Escalated | RunStatus::Cancelled
            ),
        }
    }
}

/// Where a backfill is: its before-steps, its partitions, its after-steps, or done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackfillStage {
    /// The before-steps have not completed: no partition starts.
    Before,
    /// Partitions' runs have not all ended (per-dataset after-runs may run meanwhile).
    #[default]
    Partitions,
    /// Every partition's run ended; after-steps have not.
    After,
    /// Every run ended (or waits for an operator).
    Done,
}

/// A backfill's summary (`warpline run --json`, `warpline status --json`, the HTTP API).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Summary {
    /// Contract version.
    pub schema_version: u32,
    /// The backfill.
    pub backfill_id: Uuid,
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline's step ids that run per partition, in order (so a client can tell how
    /// far each run got); a backfill-level run lists its own in its `steps`.
    #[serde(default)]
    pub steps: Vec<String>,
    /// Where the backfill is: `before`, `partitions`, `after` or `done`.
    #[serde(default)]
    pub stage: BackfillStage,
    /// Runs by status.
    #[schema(value_type = BTreeMap<String, usize>)]
    pub counts: BTreeMap<RunStatus, usize>,
    /// Runs in progress per step.
    pub in_step: BTreeMap<String, usize>,
    /// Attempts executed (results received, losses included).
    pub steps_executed: u64,
    /// Final runs per minute between the submit and the last run's end (or now), from the
    /// coordinator's stored timestamps: the same for every client, and across restarts.
    pub runs_per_minute: f64,
    /// Estimated seconds to finish at that rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
    /// Wall time from the submit to the last run's end (or, while it runs, to now).
    pub wall_ms: u64,
    /// When the backfill was submitted.
    #[schema(value_type = String, format = DateTime)]
    pub submitted_at: DateTime<Utc>,
    /// When its last run ended, once it is finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<DateTime<Utc>>,
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
    /// Failed `warn` checks over every run.
    #[serde(default)]
    pub warnings: usize,
    /// LLM calls and tokens its decisions used.
    #[serde(default)]
    pub llm: LlmUsage,
    /// Partition runs past each of `steps` (passed it, the run went on), over every run.
    #[serde(default)]
    pub passed: Vec<u64>,
    /// Attempts beyond the first of each step (retries, resumes, operators' retries), over
    /// every run.
    #[serde(default)]
    pub retries: u64,
    /// Every run, or those `?runs=` chose.
    pub runs: Vec<RunSummary>,
}

impl Summary {
    /// True when every run completed (from the counts, so it holds for a summary that lists
    /// only some of its runs).
    pub fn all_complete(&self) -> bool {
        self.counts
            .iter()
            .all(|(st, n)| *st == RunStatus::Complete || *n == 0)
    }

    /// Runs in all (from the counts; `runs` may list only some).
    pub fn total_runs(&self) -> usize {
        self.counts.values().sum()
    }

    /// Sets the wall time, the rate and the ETA as of `now` (or of the last run's end, once
    /// finished) from the counts and the stored timestamps.
    pub fn pace(&mut self, now: DateTime<Utc>) {
        let (total, finals) = (self.total_runs(), self.final_runs());
        let elapsed = (self.finished_at.unwrap_or(now) - self.submitted_at)
            .to_std()
            .unwrap_or_default();
        let minutes = elapsed.as_secs_f64() / 60.0;
        let rate = if minutes > 0.0 {
            finals as f64 / minutes
        } else {
            0.0
        };
        let left = total - finals;
        self.eta_s = (rate > 0.0 && left > 0).then(|| (left as f64 / rate * 60.0) as u64);
        self.runs_per_minute = (rate * 10.0).round() / 10.0;
        self.wall_ms = elapsed.as_millis() as u64;
    }

    /// Runs in a final state (complete, halted, cancelled).
    pub fn final_runs(&self) -> usize {
        self.counts
            .iter()
            .filter(|(st, _)| st.is_final())
            .map(|(_, n)| n)
            .sum()
    }
}

impl Engine {
    /// A backfill's summary, every run listed.
    pub fn summary(&mut self, backfill_id: Uuid) -> Summary {
        self.summary_where(backfill_id, RunsShown::All)
    }

    /// A backfill's summary listing the runs `shown` chooses (in order); every count, rate and
    /// state is still over all of them. Counts only ([`RunsShown::None`]) costs the same at any
    /// backfill size; a list costs a look at each run.
    pub(super) fn summary_where(&mut self, backfill_id: Uuid, shown: RunsShown) -> Summary {
        let runs = match shown {
            RunsShown::None => Vec::new(),
            _ => (self.backfills[&backfill_id].rec.runs.iter())
                .map(|id| &self.runs[id])
                .filter(|r| shown.keeps(r))
                .map(run_summary)
                .collect(),
        };
        self.summary_listing(backfill_id, runs)
    }

    /// A backfill's summary listing `runs`: counts, rate and state from its tally (see
    /// [`super::tally`]), brought up to date first.
    pub(super) fn summary_listing(&mut self, backfill_id: Uuid, runs: Vec<RunSummary>) -> Summary {
        self.tally_changed();
        #[cfg(test)]
        self.check_tally(backfill_id);
        let finished = {
            let b = &self.backfills[&backfill_id];
            b.rec.pending.is_empty() && b.tally.all_ended()
        };
        let finished_at = if finished {
            self.last_end(backfill_id)
        } else {
            None
        };
        let b = &self.backfills[&backfill_id];
        let t = &b.tally;
        let steps: Vec<String> = b.pipeline.steps().iter().map(|s| s.id.clone()).collect();
        let mut in_step = BTreeMap::new();
        for (scope, i, n) in t.in_step() {
            let view = b.view(scope);
            *in_step.entry(view.steps()[i].id.clone()).or_insert(0) += n;
        }
        let submitted_at = b.rec.created_at;
        let stage = if t.all_ended() {
            BackfillStage::Done
        } else if !self.before_done(b) {
            BackfillStage::Before
        } else if !t.partitions_ended() {
            BackfillStage::Partitions
        } else {
            BackfillStage::After
        };
        let (audit, audit_head) = self.store.audit_location();
        let mut summary = Summary {
            schema_version: SCHEMA_VERSION,
            backfill_id,
            pipeline: b.rec.pipeline.clone(),
            passed: t.passed(steps.len()),
            steps,
            stage,
            counts: t.counts(),
            in_step,
            steps_executed: t.executed,
            runs_per_minute: 0.0,
            eta_s: None,
            wall_ms: 0,
            submitted_at,
            finished_at,
            finished,
            cancelling: b.rec.cancelling,
            escalated: b.rec.escalated.clone(),
            audit,
            audit_head,
            warnings: t.warnings,
            llm: b.rec.llm,
            retries: t.retries,
            runs,
        };
        summary.pace(Utc::now());
        summary
    }
}

/// One run as a summary lists it.
pub(super) fn run_summary(r: &RunRecord) -> RunSummary {
    RunSummary {
        run_id: r.id,
        partition: r.scope.key(&r.partition),
        month: r.partition.month.clone(),
        dataset: r.partition.dataset.clone(),
        step: match r.machine.state() {
            RunState::Complete | RunState::Init => None,
            s => s.step().map(|i| r.machine.steps()[i].id.clone()),
        },
        attempts: r
            .machine
            .steps()
            .iter()
            .zip(&r.attempts_total)
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| (s.id.clone(), *n))
            .collect(),
        reason: r.reason.clone(),
        warnings: r.warnings.clone(),
        state: r.machine.state().status(),
        scope: r.scope,
        steps: if r.scope.is_partition() {
            Vec::new()
        } else {
            r.machine.steps().iter().map(|s| s.id.clone()).collect()
        },
    }
}
