//! Backfill-level steps: steps that run once per backfill (or once per dataset) before the
//! first partition starts or after the last one ended, instead of once per partition.
//!
//! A step says so in the config (`"scope": "backfill"`, `"when": "before" | "after"`, optional
//! `"per": "dataset"` and `"allow_partial"`). The coordinator gives each group of such steps
//! its own run ([`RunScope`]): one before-run, one after-run per dataset, one after-run for the
//! backfill, each a state machine over its group's steps in config order, so it is supervised,
//! validated, retried and audited like a partition's run. [`Pipeline::view`] is the pipeline
//! as one group sees it (its steps, its run directory, its placeholders); [`Pipeline::plan`]
//! lists every run a backfill has; [`Pipeline::partitions_list`] is the JSON file an after-run
//! reads to find what the partitions produced.
//!
//! A backfill-level run has no month: its placeholders are [`BACKFILL_PLACEHOLDERS`]
//! (`{first_month}`, `{last_month}`, `{datasets}`, `{partitions_file}`) besides `{partition}`
//! (the run's key, `_before`, `_after` or `_after_DATASET`), `{run_dir}`, `{workdir}`,
//! `{config_dir}`, `{attempt}`, the pipeline's `vars` and, per dataset, `{dataset}`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{ArtefactConfig, Pipeline, RenderError, StepConfig};
use crate::partition::Partition;
use crate::template;

/// Placeholders only backfill-level steps may use.
pub const BACKFILL_PLACEHOLDERS: [&str; 4] =
    ["first_month", "last_month", "datasets", "partitions_file"];

/// The file, in a backfill-level run's directory, that lists the partitions
/// (`{partitions_file}`).
pub const PARTITIONS_FILE: &str = "partitions.json";

/// How often a step runs (`scope` in the config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepScope {
    /// Once per partition.
    #[default]
    Partition,
    /// Once per backfill (or per dataset, with `per`), before or after the partitions.
    Backfill,
}

/// When a backfill-level step runs (`when`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepWhen {
    /// Before the first partition starts.
    Before,
    /// After the partitions (of the backfill, or of its dataset) ended.
    After,
}

/// What an after-step waits for (`per`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepPer {
    /// Every partition of the backfill (and every per-dataset after-run).
    Backfill,
    /// Every partition of one dataset: the step runs once per dataset.
    Dataset,
}

/// Which group of steps a run runs.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RunScope {
    /// One partition's steps.
    #[default]
    Partition,
    /// The backfill's before-steps, run before any partition starts.
    Before,
    /// One dataset's after-steps (`"per": "dataset"`), run once its partitions ended.
    AfterDataset,
    /// The backfill's after-steps, run once every partition and per-dataset after-run ended.
    After,
}

impl RunScope {
    /// True for a partition's run.
    pub fn is_partition(self) -> bool {
        self == RunScope::Partition
    }

    /// [`RunScope::is_partition`] for serde's `skip_serializing_if`.
    pub fn is_partition_ref(&self) -> bool {
        self.is_partition()
    }

    /// The run's key for a backfill-level scope (`_before`, `_after`, `_after_DATASET`); a
    /// dataset name cannot start with `_`, so it never names a partition's directory.
    pub fn key(self, partition: &Partition) -> String {
        match self {
            RunScope::Partition => partition.key(),
            RunScope::Before => "_before".into(),
            RunScope::After => "_after".into(),
            RunScope::AfterDataset => {
                format!("_after_{}", partition.dataset.as_deref().unwrap_or(""))
            }
        }
    }

    /// How an operator reads it: `before`, `after`, `after sales`, or the partition.
    pub fn label(self, partition: &Partition) -> String {
        match self {
            RunScope::Partition => partition.to_string(),
            RunScope::Before => "before".into(),
            RunScope::After => "after".into(),
            RunScope::AfterDataset => {
                format!("after {}", partition.dataset.as_deref().unwrap_or(""))
            }
        }
    }
}

impl StepConfig {
    /// The group of runs this step belongs to.
    pub fn run_scope(&self) -> RunScope {
        match (self.scope, self.when, self.per) {
            (StepScope::Partition, _, _) => RunScope::Partition,
            (StepScope::Backfill, Some(StepWhen::Before), _) => RunScope::Before,
            (StepScope::Backfill, _, Some(StepPer::Dataset)) => RunScope::AfterDataset,
            (StepScope::Backfill, _, _) => RunScope::After,
        }
    }
}

/// One partition in a backfill-level run's partitions file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListedPartition {
    /// Its key (`sales_2024-01`).
    pub partition: String,
    /// Its month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<String>,
    /// Its dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Its run.
    pub run_id: Uuid,
    /// Its final state (`COMPLETE`, `HALTED`, ...).
    pub state: String,
    /// Its run directory.
    pub run_dir: String,
    /// Its artefacts' paths by name, for a complete run (dynamic artefacts are not known to
    /// the coordinator: their record is `run_dir/.warpline/STEP.artefacts.json`).
    #[serde(default)]
    pub artefacts: BTreeMap<String, String>,
}

/// What `{partitions_file}` holds: the partitions a backfill-level run is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PartitionsList {
    /// The backfill.
    pub backfill_id: Uuid,
    /// The pipeline's name.
    pub pipeline: String,
    /// The run's scope.
    pub scope: RunScope,
    /// The dataset, for a per-dataset run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Partitions that completed.
    pub complete: usize,
    /// Every partition in scope, in backfill order.
    pub partitions: Vec<ListedPartition>,
}

impl Pipeline {
    /// This pipeline as the runs of `scope` see it: only that group's steps (in config order),
    /// run directories keyed by [`RunScope::key`].
    pub fn view(&self, scope: RunScope) -> Pipeline {
        let mut p = self.clone();
        p.set_scope(scope);
        p
    }

    /// True when the pipeline has steps of `scope`.
    pub fn has_scope(&self, scope: RunScope) -> bool {
        self.config.steps.iter().any(|s| s.run_scope() == scope)
    }

    /// Every step as written, whatever its scope.
    pub fn all_steps(&self) -> &[StepConfig] {
        &self.config.steps
    }

    /// Every run a backfill of `partitions` has, in the order they appear in its summary: the
    /// before-run, the partitions' runs, one after-run per dataset (in first-seen order), the
    /// after-run. A backfill-level run's partition carries no month; its `vars` hold
    /// [`BACKFILL_PLACEHOLDERS`]' values.
    pub fn plan(&self, partitions: &[Partition]) -> Vec<(RunScope, Partition)> {
        let mut out = Vec::with_capacity(partitions.len() + 2);
        if self.has_scope(RunScope::Before) {
            out.push((
                RunScope::Before,
                self.stage_partition(RunScope::Before, None, partitions),
            ));
        }
        out.extend(partitions.iter().map(|p| (RunScope::Partition, p.clone())));
        if self.has_scope(RunScope::AfterDataset) {
            let mut seen = std::collections::BTreeSet::new();
            for d in partitions.iter().filter_map(|p| p.dataset.as_ref()) {
                if seen.insert(d.clone()) {
                    out.push((
                        RunScope::AfterDataset,
                        self.stage_partition(RunScope::AfterDataset, Some(d), partitions),
                    ));
                }
            }
        }
        if self.has_scope(RunScope::After) {
            out.push((
                RunScope::After,
                self.stage_partition(RunScope::After, None, partitions),
            ));
        }
        out
    }

    /// The partition of a backfill-level run over `partitions` (those of `dataset`, when
    /// given): its range and datasets as variables.
    fn stage_partition(
        &self,
        scope: RunScope,
        dataset: Option<&String>,
        partitions: &[Partition],
    ) -> Partition {
        let scoped: Vec<&Partition> = partitions
            .iter()
            .filter(|p| dataset.is_none() || p.dataset.as_ref() == dataset)
            .collect();
        let mut vars = BTreeMap::new();
        if let Some(first) = scoped.iter().filter_map(|p| p.month.as_ref()).min() {
            vars.insert("first_month".to_string(), first.clone());
        }
        if let Some(last) = scoped.iter().filter_map(|p| p.month.as_ref()).max() {
            vars.insert("last_month".to_string(), last.clone());
        }
        let mut datasets: Vec<&String> = Vec::new();
        for d in scoped.iter().filter_map(|p| p.dataset.as_ref()) {
            if !datasets.contains(&d) {
                datasets.push(d);
            }
        }
        if !datasets.is_empty() {
            vars.insert(
                "datasets".to_string(),
                datasets
                    .iter()
                    .map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        let mut p = Partition {
            month: None,
            dataset: dataset.cloned(),
            vars,
        };
        if let Ok(dir) = self.view(scope).run_dir(&p) {
            p.vars.insert(
                "partitions_file".to_string(),
                dir.join(PARTITIONS_FILE).display().to_string(),
            );
        }
        p
    }

    /// The artefact paths a partition's complete run left, by name (paths declared in the
    /// config; dynamic artefacts are found by the worker, so they are not listed).
    pub fn static_artefacts(
        &self,
        partition: &Partition,
    ) -> Result<BTreeMap<String, String>, RenderError> {
        let run_dir = self.run_dir(partition)?;
        let mut known: BTreeMap<String, String> = BTreeMap::new();
        for s in self.steps() {
            for (name, a) in &s.artefacts {
                if let ArtefactConfig::Path(t) = a {
                    let rendered = template::render(t, |n| match n.strip_prefix("artefacts.") {
                        Some(a) => known.get(a).cloned(),
                        None => self.lookup_static(n, partition, &run_dir),
                    })
                    .map_err(|source| RenderError::Template {
                        step: s.id.clone(),
                        source,
                    })?;
                    let path = crate::paths::normalize(&run_dir.join(rendered));
                    known.insert(name.clone(), path.display().to_string());
                }
            }
        }
        Ok(known)
    }

    /// The content of a backfill-level run's `{partitions_file}`: every partition in its scope
    /// (`runs`: run id, partition, final state as in summaries), with a complete one's
    /// artefacts. `self` is the backfill's pipeline (the partitions' view).
    pub fn partitions_list<'a>(
        &self,
        backfill_id: Uuid,
        scope: RunScope,
        dataset: Option<&str>,
        runs: impl IntoIterator<Item = (Uuid, &'a Partition, String)>,
    ) -> PartitionsList {
        let mut partitions = Vec::new();
        let mut complete = 0;
        for (run_id, p, state) in runs {
            let done = state == "COMPLETE";
            complete += usize::from(done);
            let artefacts = if done {
                self.static_artefacts(p).unwrap_or_default()
            } else {
                BTreeMap::new()
            };
            partitions.push(ListedPartition {
                partition: p.key(),
                month: p.month.clone(),
                dataset: p.dataset.clone(),
                run_id,
                state,
                run_dir: self
                    .run_dir(p)
                    .map(|d: PathBuf| d.display().to_string())
                    .unwrap_or_default(),
                artefacts,
            });
        }
        PartitionsList {
            backfill_id,
            pipeline: self.name().to_string(),
            scope,
            dataset: dataset.map(str::to_string),
            complete,
            partitions,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::ConfigError;

    fn load(steps: serde_json::Value) -> Result<Pipeline, ConfigError> {
        let text = serde_json::json!({"name": "p", "workdir": "work", "steps": steps}).to_string();
        Pipeline::from_json(Path::new("/tmp/cfg/pipeline.json"), &text)
    }

    fn invalid(steps: serde_json::Value) -> (String, String) {
        match load(steps).unwrap_err() {
            ConfigError::Invalid { path, message, .. } => (path, message),
            other => panic!("unexpected {other}"),
        }
    }

    fn load_step() -> serde_json::Value {
        serde_json::json!({"id": "LOAD", "command": "load", "args": ["{month}"],
            "artefacts": {"csv": "out/{dataset}_{month}.csv"}})
    }

    fn parts() -> Vec<Partition> {
        ["sales", "stock"]
            .iter()
            .flat_map(|d| {
                ["2024-02", "2024-01"].iter().map(move |m| Partition {
                    month: Some(m.to_string()),
                    dataset: Some(d.to_string()),
                    ..Partition::default()
                })
            })
            .collect()
    }

    #[test]
    fn a_backfill_step_is_checked_with_its_own_placeholders_and_fields() {
        let after = |extra: serde_json::Value| {
            let mut s = serde_json::json!({"id": "EXPORT", "command": "export", "scope": "backfill", "when": "after"});
            s.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::json!([load_step(), s])
        };
        let (path, msg) = invalid(after(serde_json::json!({"args": ["{month}"]})));
        assert_eq!(path, "steps[1].args[0]");
        assert!(
            msg.contains("use `{first_month}` or `{last_month}`"),
            "{msg}"
        );
        let (_, msg) = invalid(after(serde_json::json!({"args": ["{dataset}"]})));
        assert!(msg.contains("per-dataset"), "{msg}");
        // A partition step's artefacts belong to its runs, not to the after-run.
        let (_, msg) = invalid(after(serde_json::json!({"args": ["{artefacts.csv}"]})));
        assert!(
            msg.contains("unknown placeholder `{artefacts.csv}`"),
            "{msg}"
        );
        let (path, msg) = invalid(serde_json::json!([
            {"id": "LOAD", "command": "load", "args": ["{first_month}"]}
        ]));
        assert_eq!(path, "steps[0].args[0]");
        assert!(
            msg.contains("only defined for backfill-level steps"),
            "{msg}"
        );
        let (path, msg) = invalid(after(serde_json::json!({"when": null})));
        assert_eq!(path, "steps[1].when");
        assert!(msg.contains("needs `\"when\": \"before\"`"), "{msg}");
        let (path, _) = invalid(serde_json::json!([
            {"id": "P", "command": "p", "scope": "backfill", "when": "before", "per": "dataset"},
            load_step()
        ]));
        assert_eq!(path, "steps[0].per");
        let (path, msg) = invalid(serde_json::json!([
            {"id": "LOAD", "command": "load", "allow_partial": true}
        ]));
        assert_eq!(path, "steps[0].allow_partial");
        assert!(msg.contains("only to a backfill-level step"), "{msg}");
        let (path, msg) = invalid(serde_json::json!([
            load_step(),
            {"id": "A", "command": "a", "scope": "backfill", "when": "after", "allow_partial": true},
            {"id": "B", "command": "b", "scope": "backfill", "when": "after"}
        ]));
        assert_eq!(path, "steps[2].allow_partial");
        assert!(msg.contains("must agree"), "{msg}");
        let (path, msg) = invalid(serde_json::json!([
            {"id": "P", "command": "p", "scope": "backfill", "when": "before"}
        ]));
        assert_eq!(path, "steps");
        assert!(
            msg.contains("at least one step that runs per partition"),
            "{msg}"
        );
        // Good: every backfill placeholder, the group's own artefacts, a per-dataset one.
        let p = load(serde_json::json!([
            load_step(),
            {"id": "EXPORT", "command": "export", "scope": "backfill", "when": "after", "per": "dataset",
             "args": ["{dataset}", "{first_month:%Y%m}", "{last_month}", "{datasets}", "{partitions_file}"],
             "artefacts": {"zip": "{dataset}.zip"}},
            {"id": "SIGN", "command": "sign", "scope": "backfill", "when": "after", "per": "dataset",
             "args": ["{artefacts.zip}"]}
        ]))
        .unwrap();
        assert_eq!(p.steps().len(), 1, "the partitions' steps");
        assert_eq!(p.all_steps().len(), 3);
        assert_eq!(p.view(RunScope::AfterDataset).steps().len(), 2);
    }

    #[test]
    fn the_plan_has_the_backfill_level_runs_around_the_partitions_with_their_range() {
        let p = load(serde_json::json!([
            {"id": "PREPARE", "command": "prepare", "scope": "backfill", "when": "before"},
            load_step(),
            {"id": "EXPORT", "command": "export", "scope": "backfill", "when": "after", "per": "dataset",
             "args": ["{dataset}", "{first_month:%B %Y}", "{last_month}", "{partitions_file}"]}
        ]))
        .unwrap();
        let plan = p.plan(&parts());
        let keys: Vec<String> = plan.iter().map(|(s, p)| s.key(p)).collect();
        assert_eq!(
            keys,
            [
                "_before",
                "sales_2024-02",
                "sales_2024-01",
                "stock_2024-02",
                "stock_2024-01",
                "_after_sales",
                "_after_stock"
            ]
        );
        let (scope, stock) = &plan[6];
        let view = p.view(*scope);
        let spec = view
            .render_step(0, stock, Uuid::nil(), 1, Uuid::nil())
            .unwrap();
        assert_eq!(
            spec.args,
            [
                "stock",
                "January 2024",
                "2024-02",
                "/tmp/cfg/work/runs/_after_stock/partitions.json"
            ]
        );
        assert_eq!(spec.cwd, "/tmp/cfg/work/runs/_after_stock");
        assert_eq!(plan[0].1.vars["datasets"], "sales,stock");
        // The partitions it lists, with a complete one's artefacts.
        let runs: Vec<(Uuid, &Partition, String)> = plan[3..5]
            .iter()
            .zip(["COMPLETE", "HALTED"])
            .map(|((_, p), s)| (Uuid::nil(), p, s.to_string()))
            .collect();
        let list = p.partitions_list(Uuid::nil(), RunScope::AfterDataset, Some("stock"), runs);
        assert_eq!(list.complete, 1);
        assert_eq!(
            list.partitions[0].artefacts["csv"],
            "/tmp/cfg/work/runs/stock_2024-02/out/stock_2024-02.csv"
        );
        assert!(list.partitions[1].artefacts.is_empty());
        // A per-dataset step needs datasets; a range placeholder needs months.
        let months_only: Vec<Partition> = parts()
            .into_iter()
            .map(|p| Partition { dataset: None, ..p })
            .collect();
        let p = load(serde_json::json!([
            {"id": "LOAD", "command": "load", "args": ["{month}"]},
            {"id": "EXPORT", "command": "export", "scope": "backfill", "when": "after", "per": "dataset"}
        ]))
        .unwrap();
        let err = p.check_partitions(&months_only[..1]).unwrap_err();
        assert!(err.to_string().contains("runs per dataset"), "{err}");
        let p = load(serde_json::json!([
            {"id": "LOAD", "command": "load", "args": ["{dataset}"]},
            {"id": "EXPORT", "command": "export", "scope": "backfill", "when": "after", "args": ["{last_month}"]}
        ]))
        .unwrap();
        let datasets_only = [Partition {
            dataset: Some("sales".into()),
            ..Partition::default()
        }];
        let err = p.check_partitions(&datasets_only).unwrap_err();
        assert!(
            err.to_string()
                .contains("uses `{last_month}` but the partitions have no month: give --months"),
            "{err}"
        );
    }
}
