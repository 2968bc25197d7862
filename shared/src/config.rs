//! The pipeline config: an ordered list of steps, each an existing command-line tool with its
//! arguments, limits, artefacts and checks. Loaded once into a typed [`Pipeline`], checked
//! whole before anything runs, then rendered into [`StepSpec`]s one attempt at a time.
//!
//! Every error names the file, the JSON path (`steps[2].validations[0].pattern`) and what was
//! expected. Unknown fields are refused at the pipeline and step level, so a misspelt
//! `max_attempt` is caught rather than silently defaulted.
//!
//! An optional `agent` section ([`AgentConfig`]) chooses the supervisor agent and bounds an
//! LLM's calls (timeout, concurrency, rate, retries, budget); it never widens what the state
//! machine allows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::classify::FailuresConfig;
use crate::contracts::{
    CheckSpec, DynamicArtefact, LogStream, SCHEMA_VERSION, Severity, StepSpec, Validation,
};
use crate::partition::Partition;
use crate::stage::{BACKFILL_PLACEHOLDERS, RunScope, StepPer, StepScope, StepWhen};
use crate::template::{self, Rendered, TemplateError};

/// Placeholders every template may use.
pub const BUILTIN_PLACEHOLDERS: [&str; 7] = [
    "month",
    "dataset",
    "partition",
    "run_dir",
    "attempt",
    "workdir",
    "config_dir",
];

/// States that no step may be named after.
pub const RESERVED_STATES: [&str; 5] = ["INIT", "COMPLETE", "HALTED", "ESCALATED", "CANCELLED"];

/// The pipeline file as written.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Optional `$schema` reference for editors.
    #[serde(default, rename = "$schema", skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// The pipeline's name.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// Root of every path a step may touch, relative to the config file's directory.
    #[serde(default = "default_workdir")]
    pub workdir: String,
    /// Each run's directory, relative to `workdir`; must use `{partition}`.
    #[serde(default = "default_run_dir")]
    pub run_dir: String,
    /// Operator-defined placeholders (overridable with `--var name=value`). Values may use
    /// `{workdir}` and `{config_dir}`.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Environment given to every step (a step's own `env` wins).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Backoff between attempts of a step.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Seconds past a step's `timeout_s` after which an attempt with no result is lost.
    #[serde(default = "default_lost_grace")]
    pub lost_grace_s: u64,
    /// Backfill-level supervision: when this many runs of one backfill halt with the same
    /// failure signature (step, exit code, failed checks), no new run of the backfill starts
    /// and the backfill is escalated to an operator, instead of spending every partition's
    /// retries on the same broken upstream. 0 turns it off.
    #[serde(default = "default_same_failure_halts")]
    pub escalate_after_same_halts: u32,
    /// The steps, in order.
    pub steps: Vec<StepConfig>,
    /// The supervisor agent: which one, and how an LLM is called and bounded. Optional; the
    /// `warpline run` flags and `WARPLINE_LLM_*` variables override it.
    #[serde(default)]
    pub agent: AgentConfig,
    /// Failure classification rules for every step (a step's own `failures` come first), then
    /// the built-in table; see `docs/FAILURES.md`.
    #[serde(default)]
    pub failures: FailuresConfig,
}

/// Which supervisor agent decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AgentKindConfig {
    /// The cautious operator's rules (no model, no network).
    #[default]
    Rules,
    /// Always proposes proceed; the guard still applies (a test decider).
    AlwaysProceed,
    /// Google Gemini over its REST API (`generateContent`).
    Gemini,
    /// Any OpenAI-compatible chat completions endpoint.
    Openai,
}

/// When an LLM agent is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CallOn {
    /// After every attempt.
    Always,
    /// Only when `proceed` is illegal; a clean pass is proceeded without a call (`fast_path`).
    #[default]
    Unclean,
}

/// In shadow mode, whose decision is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ShadowApply {
    /// The rules decide; the LLM is only asked and audited.
    #[default]
    Rules,
    /// The LLM decides (rules when it fails); the rules are audited beside it.
    Llm,
}

/// The `agent` section of a pipeline config. Every field has a default, so `{}` (or no section
/// at all) means the rules agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent: `rules` (default), `always-proceed`, `gemini` or `openai`.
    #[serde(default)]
    pub kind: AgentKindConfig,
    /// The model (default: the provider's current small model).
    #[serde(default)]
    pub model: Option<String>,
    /// The API's base URL, without the path (default: the provider's public endpoint).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Seconds one HTTP request may take before it counts as failed.
    #[serde(default = "default_agent_timeout")]
    pub timeout_s: u64,
    /// Most model calls in flight at once.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// Most model requests started per second (retries included).
    #[serde(default = "default_rate_per_s")]
    pub rate_per_s: f64,
    /// Retries of one call after a timeout, a transport error, HTTP 429 or 5xx.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First backoff between retries in milliseconds (doubled each time, with jitter);
    /// an HTTP `Retry-After` wins when longer.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// `unclean` (default): ask only when `proceed` is illegal; `always`: after every attempt.
    #[serde(default)]
    pub call_on: CallOn,
    /// Most model calls per backfill; afterwards the rules decide ("budget exhausted").
    #[serde(default)]
    pub budget: Option<u32>,
    /// Ask the LLM beside the rules and audit both, applying only one (`apply`).
    #[serde(default)]
    pub shadow: bool,
    /// In shadow mode, whose decision is applied (default `rules`).
    #[serde(default)]
    pub apply: ShadowApply,
    /// Sampling temperature sent to the model (default 0); `null` omits it, for models that
    /// accept only their own default.
    #[serde(default = "default_temperature")]
    pub temperature: Option<f64>,
}

fn default_agent_timeout() -> u64 {
    30
}
fn default_max_concurrent() -> u32 {
    4
}
fn default_rate_per_s() -> f64 {
    5.0
}
fn default_max_retries() -> u32 {
    2
}
fn default_backoff_ms() -> u64 {
    500
}
fn default_temperature() -> Option<f64> {
    Some(0.0)
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            kind: AgentKindConfig::default(),
            model: None,
            base_url: None,
            timeout_s: default_agent_timeout(),
            max_concurrent: default_max_concurrent(),
            rate_per_s: default_rate_per_s(),
            max_retries: default_max_retries(),
            backoff_ms: default_backoff_ms(),
            call_on: CallOn::default(),
            budget: None,
            shadow: false,
            apply: ShadowApply::default(),
            temperature: default_temperature(),
        }
    }
}

impl AgentConfig {
    /// Semantic checks; the error is (JSON path below `agent`, message).
    pub fn check(&self) -> Result<(), (String, String)> {
        let err = |p: &str, m: &str| Err((p.to_string(), m.to_string()));
        if self.timeout_s == 0 {
            return err("timeout_s", "expected a timeout of at least 1 second");
        }
        if self.max_concurrent == 0 {
            return err("max_concurrent", "expected at least 1 call in flight");
        }
        if !(self.rate_per_s.is_finite() && self.rate_per_s > 0.0) {
            return err("rate_per_s", "expected a number of requests per second > 0");
        }
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return err(
                "temperature",
                "expected a temperature between 0 and 2, or null",
            );
        }
        if let Some(m) = &self.model
            && m.trim().is_empty()
        {
            return err("model", "expected a model name");
        }
        if let Some(u) = &self.base_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return err(
                "base_url",
                "expected an http:// or https:// URL such as `https://api.openai.com`",
            );
        }
        Ok(())
    }
}

fn default_workdir() -> String {
    ".".into()
}
fn default_run_dir() -> String {
    "runs/{partition}".into()
}
fn default_lost_grace() -> u64 {
    30
}
fn default_same_failure_halts() -> u32 {
    3
}
fn default_timeout() -> u64 {
    600
}
fn default_max_attempts() -> u32 {
    3
}

/// Exponential backoff between attempts: `initial_ms × multiplier^(attempt−1)`, capped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Wait before the second attempt.
    #[serde(default = "default_initial_ms")]
    pub initial_ms: u64,
    /// Growth per further attempt.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Longest wait.
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
}

fn default_initial_ms() -> u64 {
    2_000
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_max_ms() -> u64 {
    60_000
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_ms: default_initial_ms(),
            multiplier: default_multiplier(),
            max_ms: default_max_ms(),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `next_attempt` (2 for the first retry).
    pub fn backoff(&self, next_attempt: u32) -> std::time::Duration {
        let exp = next_attempt.saturating_sub(2).min(63) as i32;
        let ms = (self.initial_ms as f64) * self.multiplier.powi(exp);
        std::time::Duration::from_millis(ms.min(self.max_ms as f64).max(0.0) as u64)
    }
}

/// One step as written.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// The step's id; it is also the run's state while the step is in progress.
    pub id: String,
    /// What the step does.
    #[serde(default)]
    pub description: String,
    /// The program: a bare name looked up on the worker (its `--tools-dir`, then `PATH`), or a
    /// path (a relative one is taken from the config's directory). May use placeholders, e.g.
    /// `{python}` for a virtualenv's interpreter.
    pub command: String,
    /// argv after the program; each element may use placeholders.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the run's directory).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Wall-clock limit of one attempt.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Attempts allowed, the first included.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Named outputs; later steps may use `{artefacts.NAME}`. Each is a path template, or
    /// `{"glob": "..."}` (found after the step ran; must match exactly one file) or
    /// `{"reported": true}` (read from the JSON file the tool writes at
    /// `$WARPLINE_ARTEFACTS_FILE`).
    #[serde(default)]
    pub artefacts: BTreeMap<String, ArtefactConfig>,
    /// Checks on the outcome.
    #[serde(default)]
    pub validations: Vec<ValidationConfig>,
    /// Worker pool (queue) to route to.
    #[serde(default = "crate::contracts::default_pool")]
    pub pool: String,
    /// Fleet-wide cap on concurrent attempts of this step.
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// This step's failure classification rules, tried before the pipeline's.
    #[serde(default)]
    pub failures: Option<FailuresConfig>,
    /// `partition` (the default): the step runs once per partition. `backfill`: once per
    /// backfill (or per dataset, see `per`), before or after the partitions (`when`); see
    /// [`crate::stage`].
    #[serde(default, skip_serializing_if = "is_partition_scope")]
    pub scope: StepScope,
    /// A backfill-level step's `before` (before the first partition starts) or `after` (once
    /// the partitions ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<StepWhen>,
    /// An after-step's `backfill` (the default: once, after every partition) or `dataset`
    /// (once per dataset, after that dataset's partitions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<StepPer>,
    /// An after-step runs even when some partitions in its scope did not complete (they are
    /// listed with their state in `{partitions_file}`). Without it, the backfill is escalated
    /// instead and the after-steps wait for an operator. The after-steps of one scope run as
    /// one sequence, so they must agree.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_partial: bool,
}

fn is_partition_scope(s: &StepScope) -> bool {
    *s == StepScope::Partition
}

/// One artefact as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ArtefactConfig {
    /// A path template, relative to the run's directory.
    Path(String),
    /// A path the step decides.
    Dynamic(DynamicArtefactConfig),
}

/// An artefact whose path is known only once its step ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DynamicArtefactConfig {
    /// A glob template (relative to the run's directory) that must match exactly one file.
    #[serde(default)]
    pub glob: Option<String>,
    /// The tool reports the path in the JSON file named by `$WARPLINE_ARTEFACTS_FILE`
    /// (`{"NAME": "path"}`; relative paths are taken from the run's directory).
    #[serde(default)]
    pub reported: bool,
}

/// The file in which the worker tells a tool where to report its artefacts.
pub const ARTEFACTS_FILE_ENV: &str = "WARPLINE_ARTEFACTS_FILE";

/// One check as written: a target by artefact name or by path template.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ValidationConfig {
    /// A name for reports.
    #[serde(default)]
    pub name: Option<String>,
    /// `error` (default) blocks proceeding; `warn` informs.
    #[serde(default)]
    pub severity: Severity,
    /// The check.
    #[serde(flatten)]
    pub check: CheckConfig,
}

impl ValidationConfig {
    /// The check's name in reports: its `name`, or one made from its kind and target.
    pub fn report_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| default_check_name(&self.check))
    }
}

/// The check kinds as written.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CheckConfig {
    /// The target exists.
    FileExists {
        /// An artefact of this step or an earlier one.
        #[serde(default)]
        artefact: Option<String>,
        /// Or a path template.
        #[serde(default)]
        path: Option<String>,
    },
    /// The target holds at least `min_bytes` bytes.
    #[serde(alias = "min_size")]
    FileSizeMin {
        /// An artefact of this step or an earlier one.
        #[serde(default)]
        artefact: Option<String>,
        /// Or a path template.
        #[serde(default)]
        path: Option<String>,
        /// Smallest acceptable size.
        min_bytes: u64,
    },
    /// Files matching a glob template, within bounds.
    FileCount {
        /// Glob template.
        glob: String,
        /// Fewest.
        #[serde(default)]
        min: Option<u64>,
        /// Most.
        #[serde(default)]
        max: Option<u64>,
    },
    /// No log line matches.
    LogRegexAbsent {
        /// Regex.
        pattern: String,
        /// Which log.
        #[serde(default)]
        stream: LogStream,
    },
    /// Some log line matches.
    LogRegexPresent {
        /// Regex.
        pattern: String,
        /// Which log.
        #[serde(default)]
        stream: LogStream,
    },
    /// A scalar SQL query (placeholders allowed) against a database whose URL is in the
    /// environment; its result must satisfy `min` / `max` / `equals`.
    #[serde(alias = "row_count")]
    Sql {
        /// The query; its first column of its first row is the value.
        query: String,
        /// The environment variable holding the database URL.
        database_url_env: String,
        /// The URL when the variable is unset; it may not hold a password.
        #[serde(default)]
        database_url_default: Option<String>,
        /// An environment variable naming the schema to search first.
        #[serde(default)]
        search_path_env: Option<String>,
        /// The schema when that variable is unset.
        #[serde(default)]
        search_path_default: Option<String>,
        /// Lower bound.
        #[serde(default)]
        min: Option<f64>,
        /// Upper bound.
        #[serde(default)]
        max: Option<f64>,
        /// Exact value.
        #[serde(default)]
        equals: Option<serde_json::Value>,
        /// Seconds the connection and query may take (30).
        #[serde(default)]
        timeout_s: Option<u64>,
    },
    /// A field of a JSON artefact.
    JsonPath {
        /// An artefact of this step or an earlier one.
        #[serde(default)]
        artefact: Option<String>,
        /// Or a path template.
        #[serde(default)]
        path: Option<String>,
        /// `$.a.b[0]`, `a.b` or `/a/b/0`.
        field: String,
        /// Lower bound (a number, or an array's, object's or string's length).
        #[serde(default)]
        min: Option<f64>,
        /// Upper bound.
        #[serde(default)]
        max: Option<f64>,
        /// Exact value.
        #[serde(default)]
        equals: Option<serde_json::Value>,
    },
    /// A field of a YAML artefact.
    YamlPath {
        /// An artefact of this step or an earlier one.
        #[serde(default)]
        artefact: Option<String>,
        /// Or a path template.
        #[serde(default)]
        path: Option<String>,
        /// `$.a.b[0]`, `a.b` or `/a/b/0`.
        field: String,
        /// Lower bound.
        #[serde(default)]
        min: Option<f64>,
        /// Upper bound.
        #[serde(default)]
        max: Option<f64>,
        /// Exact value.
        #[serde(default)]
        equals: Option<serde_json::Value>,
    },
    /// A Parquet artefact's row count (from its footer).
    ParquetRows {
        /// An artefact of this step or an earlier one.
        #[serde(default)]
        artefact: Option<String>,
        /// Or a path template.
        #[serde(default)]
        path: Option<String>,
        /// Fewest rows.
        #[serde(default)]
        min: Option<u64>,
        /// Most rows.
        #[serde(default)]
        max: Option<u64>,
    },
    /// The value another check of this step measured, compared with the median of the same
    /// value over the backfill's sibling partitions that already passed this step. Evaluated
    /// by the coordinator, which holds the backfill's history.
    SiblingDeviation {
        /// The name of an earlier check of this step whose measured value is compared.
        of: String,
        /// Largest accepted deviation from the siblings' median, in percent.
        max_deviation_pct: f64,
        /// Fewest passed siblings before the check applies (5); until then it passes.
        #[serde(default = "default_min_siblings")]
        min_siblings: u32,
        /// Compare only with partitions of the same dataset (default true).
        #[serde(default = "default_true")]
        same_dataset: bool,
    },
}

fn default_min_siblings() -> u32 {
    5
}
fn default_true() -> bool {
    true
}

/// Whether a variable name is a plausible environment variable.
fn valid_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.as_bytes()[0].is_ascii_digit()
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// A database URL written into a config may not carry a password: that belongs in the
/// environment, out of the config and the audit log.
fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
        || url.contains("password=")
}

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read pipeline config `{file}`: {source}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid pipeline.
    #[error("invalid pipeline config `{file}` at `{path}`: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// JSON path of the offending value.
        path: String,
        /// What was wrong and what was expected.
        message: String,
    },
}

/// A step could not be rendered for a partition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A placeholder problem.
    #[error("step `{step}`: {source}")]
    Template {
        /// The step.
        step: String,
        /// The template error.
        #[source]
        source: TemplateError,
    },
    /// A rendered path leaves the workdir.
    #[error(
        "step `{step}`: path `{path}` is outside the pipeline's workdir `{workdir}` and its config directory"
    )]
    Escape {
        /// The step.
        step: String,
        /// The path.
        path: String,
        /// The workdir.
        workdir: String,
    },
    /// The rendered command cannot name a program.
    #[error(
        "step `{step}`: command `{command}` (rendered from `{template}`) is not a program name or path"
    )]
    Command {
        /// The step.
        step: String,
        /// The command as written.
        template: String,
        /// As rendered.
        command: String,
    },
    /// A value substituted into a `sql` check's query holds a quote, backslash or semicolon.
    #[error(
        "step `{step}`: the value of `{{{placeholder}}}` in a sql check's query holds a quote, backslash or semicolon; such values cannot be placed in a query safely"
    )]
    UnsafeQueryValue {
        /// The step.
        step: String,
        /// The placeholder.
        placeholder: String,
    },
    /// A per-dataset after-step in a backfill whose partitions have no dataset.
    #[error(
        "step `{step}` runs per dataset (`\"per\": \"dataset\"`) but the partitions have no dataset: give --datasets"
    )]
    NoDatasets {
        /// The step.
        step: String,
    },
    /// The step needs a partition dimension the backfill lacks.
    #[error(
        "step `{step}` uses `{{{placeholder}}}` but the partitions have no {}: give --{}s",
        dimension(placeholder),
        dimension(placeholder)
    )]
    MissingDimension {
        /// The step.
        step: String,
        /// `month` or `dataset`.
        placeholder: String,
    },
}

/// The partition dimension a placeholder needs (`first_month` needs months).
fn dimension(placeholder: &str) -> &str {
    match placeholder {
        "first_month" | "last_month" => "month",
        "datasets" => "dataset",
        p => p,
    }
}

/// A loaded, checked pipeline with its directories resolved.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The config as written.
    pub config: PipelineConfig,
    /// The file it came from.
    pub file: PathBuf,
    /// Absolute directory of the file.
    pub config_dir: PathBuf,
    /// Absolute, normalised workdir.
    pub workdir: PathBuf,
    /// Per-partition variables the backfill's partitions define (a partitions file's extra
    /// columns), usable as placeholders.
    pub partition_vars: BTreeSet<String>,
    /// The runs this value renders for: a partition's (as loaded), or a group of
    /// backfill-level steps ([`Pipeline::view`]).
    scope: RunScope,
    /// The steps of `scope`, in config order.
    steps: Vec<StepConfig>,
}

/// Where a template appears, which decides what it may refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// A path the coordinator confines (artefacts, `cwd`, check targets, `run_dir`) or the
    /// command: everything must be known before the step is sent.
    Static,
    /// An argument or an environment value: may also hold `{env:…}`, `{secret:…}` and dynamic
    /// artefacts, resolved by the worker.
    Deferrable,
}

pub use crate::paths::normalize;

/// True when `path` lies under `root` ([`crate::paths::confined`]).
pub fn is_under(path: &Path, root: &Path) -> bool {
    crate::paths::confined(Path::new("/"), path, &[root])
}

impl Pipeline {
    /// Reads, parses and checks a pipeline file.
    pub fn load(file: impl AsRef<Path>) -> Result<Pipeline, ConfigError> {
        let file = file.as_ref();
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.display().to_string(),
            source,
        })?;
        Pipeline::from_json(file, &text)
    }

    /// [`Pipeline::load`] for partitions that define their own variables (a partitions file's
    /// extra columns), which templates may then use.
    pub fn load_with_partition_vars(
        file: impl AsRef<Path>,
        partition_vars: BTreeSet<String>,
    ) -> Result<Pipeline, ConfigError> {
        let file = file.as_ref();
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.display().to_string(),
            source,
        })?;
        Pipeline::from_json_with_partition_vars(file, &text, partition_vars)
    }

    /// Parses and checks pipeline JSON as if read from `file`.
    pub fn from_json(file: &Path, text: &str) -> Result<Pipeline, ConfigError> {
        Pipeline::from_json_with_partition_vars(file, text, BTreeSet::new())
    }

    /// [`Pipeline::from_json`] with per-partition variables.
    pub fn from_json_with_partition_vars(
        file: &Path,
        text: &str,
        partition_vars: BTreeSet<String>,
    ) -> Result<Pipeline, ConfigError> {
        let invalid = |path: String, message: String| ConfigError::Invalid {
            file: file.display().to_string(),
            path,
            message,
        };
        let de = &mut serde_json::Deserializer::from_str(text);
        let config: PipelineConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            invalid(
                if path == "." || path == "?" {
                    "$".into()
                } else {
                    path
                },
                e.into_inner().to_string(),
            )
        })?;
        let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        let config_dir = normalize(abs.parent().unwrap_or(Path::new("/")));
        let workdir = normalize(&config_dir.join(&config.workdir));
        let mut pipeline = Pipeline {
            config,
            file: file.to_path_buf(),
            config_dir,
            workdir,
            partition_vars: BTreeSet::new(),
            scope: RunScope::Partition,
            steps: Vec::new(),
        };
        pipeline.set_scope(RunScope::Partition);
        pipeline.check_partition_var_names(&partition_vars)?;
        let pipeline = Pipeline {
            partition_vars,
            ..pipeline
        };
        pipeline
            .check()
            .map_err(|(path, message)| invalid(path, message))?;
        Ok(pipeline)
    }

    /// Replaces operator variables (`--var name=value`). A name the pipeline's `vars` do not
    /// define is refused (with the closest defined name), so a typo is never silently ignored.
    pub fn set_vars(&mut self, vars: &[(String, String)]) -> Result<(), ConfigError> {
        for (k, v) in vars {
            if !self.config.vars.contains_key(k) {
                let known: Vec<&String> = self.config.vars.keys().collect();
                let hint = known
                    .iter()
                    .map(|n| (strsim::jaro_winkler(n, k), n))
                    .filter(|(score, _)| *score >= 0.8)
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, n)| format!(" did you mean `{n}`?"))
                    .unwrap_or_default();
                let defined = if known.is_empty() {
                    "the pipeline defines no variables".to_string()
                } else {
                    format!(
                        "defined: {}",
                        known
                            .iter()
                            .map(|n| format!("`{n}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                return Err(ConfigError::Invalid {
                    file: self.file.display().to_string(),
                    path: format!("vars.{k}"),
                    message: format!(
                        "unknown variable `{k}` in --var:{hint} ({defined}; declare it in `vars` to set it)"
                    ),
                });
            }
            self.config.vars.insert(k.clone(), v.clone());
        }
        self.recheck()
    }

    fn check_partition_var_names(&self, names: &BTreeSet<String>) -> Result<(), ConfigError> {
        for n in names {
            if BUILTIN_PLACEHOLDERS.contains(&n.as_str())
                || BACKFILL_PLACEHOLDERS.contains(&n.as_str())
                || !valid_ident(n)
            {
                return Err(ConfigError::Invalid {
                    file: self.file.display().to_string(),
                    path: format!("partitions.{n}"),
                    message: format!(
                        "`{n}` cannot be a per-partition variable: expected a name of letters, digits and `_` that is not a built-in placeholder"
                    ),
                });
            }
        }
        Ok(())
    }

    fn recheck(&self) -> Result<(), ConfigError> {
        self.check()
            .map_err(|(path, message)| ConfigError::Invalid {
                file: self.file.display().to_string(),
                path,
                message,
            })
    }

    /// The steps this pipeline's runs run: a partition's steps, or (in a [`Pipeline::view`])
    /// one group of backfill-level steps. [`Pipeline::all_steps`] has every step.
    pub fn steps(&self) -> &[StepConfig] {
        &self.steps
    }

    /// Which runs this value renders for.
    pub fn scope(&self) -> RunScope {
        self.scope
    }

    pub(crate) fn set_scope(&mut self, scope: RunScope) {
        self.scope = scope;
        self.steps = self
            .config
            .steps
            .iter()
            .filter(|s| s.run_scope() == scope)
            .cloned()
            .collect();
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Index of the step with this id.
    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }

    /// Step `index`'s command for a partition: rendered, and a relative path (one with a `/`)
    /// taken from the config's directory. A bare name stays a name, looked up by the worker.
    pub fn render_command(
        &self,
        index: usize,
        partition: &Partition,
    ) -> Result<String, RenderError> {
        let step = &self.steps[index];
        let run_dir = self.run_dir(partition)?;
        let rendered = template::render(&step.command, |n| {
            self.lookup(n, partition, 0, &run_dir, &BTreeMap::new())
        })
        .map_err(|source| RenderError::Template {
            step: step.id.clone(),
            source,
        })?;
        let bad = rendered.trim().is_empty() || rendered.starts_with('-');
        if bad {
            return Err(RenderError::Command {
                step: step.id.clone(),
                template: step.command.clone(),
                command: rendered,
            });
        }
        Ok(
            if rendered.contains('/') && !Path::new(&rendered).is_absolute() {
                normalize(&self.config_dir.join(&rendered))
                    .display()
                    .to_string()
            } else {
                rendered
            },
        )
    }

    /// Semantic checks; the error is (JSON path, message).
    fn check(&self) -> Result<(), (String, String)> {
        let c = &self.config;
        let err = |p: &str, m: String| Err((p.to_string(), m));
        if c.name.trim().is_empty() {
            return err("name", "expected a non-empty pipeline name".into());
        }
        if !c.steps.iter().any(|s| s.run_scope() == RunScope::Partition) {
            return err(
                "steps",
                "expected at least one step that runs per partition (without `\"scope\": \"backfill\"`)"
                    .into(),
            );
        }
        if c.retry.multiplier < 1.0 || !c.retry.multiplier.is_finite() {
            return err("retry.multiplier", "expected a number ≥ 1".into());
        }
        c.agent
            .check()
            .map_err(|(path, message)| (format!("agent.{path}"), message))?;
        c.failures
            .check()
            .map_err(|(path, message)| (format!("failures.{path}"), message))?;
        for name in c.vars.keys() {
            if BUILTIN_PLACEHOLDERS.contains(&name.as_str())
                || BACKFILL_PLACEHOLDERS.contains(&name.as_str())
                || name.starts_with("artefacts.")
            {
                return err(
                    &format!("vars.{name}"),
                    format!("`{name}` is a built-in placeholder and cannot be redefined"),
                );
            }
            if !valid_ident(name) {
                return err(
                    &format!("vars.{name}"),
                    "expected a variable name of letters, digits and `_`".into(),
                );
            }
        }
        for (name, value) in &c.vars {
            for p in template::placeholders(value)
                .map_err(|e| (format!("vars.{name}"), e.to_string()))?
            {
                if p != "workdir" && p != "config_dir" {
                    return err(
                        &format!("vars.{name}"),
                        format!(
                            "a variable may only use `{{workdir}}` and `{{config_dir}}`, not `{{{p}}}`"
                        ),
                    );
                }
            }
        }
        let scopes: BTreeSet<RunScope> = c.steps.iter().map(StepConfig::run_scope).collect();
        for &scope in &scopes {
            self.check_template(
                "run_dir",
                &c.run_dir,
                &BTreeSet::new(),
                Field::Static,
                scope,
            )?;
        }
        if !template::placeholders(&c.run_dir)
            .unwrap_or_default()
            .contains(&"partition")
        {
            return err(
                "run_dir",
                "expected a template using `{partition}`, so runs never share a directory".into(),
            );
        }
        for (k, v) in &c.env {
            for &scope in &scopes {
                self.check_template(
                    &format!("env.{k}"),
                    v,
                    &BTreeSet::new(),
                    Field::Deferrable,
                    scope,
                )?;
            }
        }
        let mut seen_ids = BTreeSet::new();
        // Per group of runs: every artefact so far, and those whose paths are known before
        // their step runs (a step sees only its own group's earlier artefacts).
        let mut groups: BTreeMap<RunScope, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
        let mut dynamic: BTreeSet<String> = BTreeSet::new();
        // The first step of each after-group, whose `allow_partial` the others must share.
        let mut partial_of: BTreeMap<RunScope, (usize, bool)> = BTreeMap::new();
        for (i, s) in c.steps.iter().enumerate() {
            let at = |f: &str| format!("steps[{i}].{f}");
            let scope = s.run_scope();
            self.check_step_scope(i, s, &mut partial_of)?;
            let (mut artefacts, mut static_artefacts) = groups.remove(&scope).unwrap_or_default();
            if !valid_step_id(&s.id) {
                return err(
                    &at("id"),
                    format!(
                        "expected a step id of letters, digits, `_` and `-`, got `{}`",
                        s.id
                    ),
                );
            }
            if RESERVED_STATES.contains(&s.id.as_str()) {
                return err(&at("id"), format!("`{}` is a reserved state name", s.id));
            }
            if !seen_ids.insert(s.id.clone()) {
                return err(&at("id"), format!("step id `{}` is used twice", s.id));
            }
            if s.command.trim().is_empty() || s.command.starts_with('-') {
                return err(&at("command"), "expected a program name or path".into());
            }
            self.check_template(&at("command"), &s.command, &artefacts, Field::Static, scope)?;
            if s.timeout_s == 0 {
                return err(
                    &at("timeout_s"),
                    "expected a timeout of at least 1 second".into(),
                );
            }
            if s.max_attempts == 0 {
                return err(&at("max_attempts"), "expected at least 1 attempt".into());
            }
            if let Some(f) = &s.failures {
                f.check()
                    .map_err(|(path, message)| (at(&format!("failures.{path}")), message))?;
            }
            if s.concurrency == Some(0) {
                return err(
                    &at("concurrency"),
                    "expected a cap of at least 1 (or no cap)".into(),
                );
            }
            if !valid_step_id(&s.pool) {
                return err(
                    &at("pool"),
                    format!(
                        "expected a pool name of letters, digits, `_` and `-`, got `{}`",
                        s.pool
                    ),
                );
            }
            for (name, artefact) in &s.artefacts {
                let aat = at(&format!("artefacts.{name}"));
                if !valid_ident(name) {
                    return err(
                        &aat,
                        "expected an artefact name of letters, digits and `_`".into(),
                    );
                }
                match artefact {
                    ArtefactConfig::Path(path) => {
                        self.check_template(&aat, path, &static_artefacts, Field::Static, scope)?
                    }
                    ArtefactConfig::Dynamic(DynamicArtefactConfig { glob, reported }) => {
                        match (glob, reported) {
                            (Some(g), false) => self.check_template(
                                &format!("{aat}.glob"),
                                g,
                                &static_artefacts,
                                Field::Static,
                                scope,
                            )?,
                            (None, true) => {}
                            _ => {
                                return err(
                                    &aat,
                                    "expected a path, `{\"glob\": \"...\"}` or `{\"reported\": true}`"
                                        .into(),
                                );
                            }
                        }
                        dynamic.insert(name.clone());
                    }
                }
            }
            artefacts.extend(s.artefacts.keys().cloned());
            static_artefacts.extend(
                s.artefacts
                    .iter()
                    .filter(|(_, a)| matches!(a, ArtefactConfig::Path(_)))
                    .map(|(n, _)| n.clone()),
            );
            for (j, a) in s.args.iter().enumerate() {
                self.check_template(
                    &at(&format!("args[{j}]")),
                    a,
                    &artefacts,
                    Field::Deferrable,
                    scope,
                )?;
            }
            for (k, v) in &s.env {
                self.check_template(
                    &at(&format!("env.{k}")),
                    v,
                    &artefacts,
                    Field::Deferrable,
                    scope,
                )?;
            }
            if let Some(cwd) = &s.cwd {
                self.check_template(&at("cwd"), cwd, &static_artefacts, Field::Static, scope)?;
            }
            for (j, v) in s.validations.iter().enumerate() {
                let vat = |f: &str| at(&format!("validations[{j}].{f}"));
                match &v.check {
                    CheckConfig::FileExists { artefact, path }
                    | CheckConfig::FileSizeMin { artefact, path, .. } => match (artefact, path) {
                        (Some(a), None) => {
                            if !artefacts.contains(a) {
                                return err(
                                    &vat("artefact"),
                                    format!(
                                        "unknown artefact `{a}`: expected one declared by this step or an earlier one"
                                    ),
                                );
                            }
                        }
                        (None, Some(p)) => self.check_template(
                            &vat("path"),
                            p,
                            &static_artefacts,
                            Field::Static,
                            scope,
                        )?,
                        _ => {
                            return err(
                                &at(&format!("validations[{j}]")),
                                "expected exactly one of `artefact` or `path`".into(),
                            );
                        }
                    },
                    CheckConfig::FileCount { glob, min, max } => {
                        self.check_template(
                            &vat("glob"),
                            glob,
                            &static_artefacts,
                            Field::Static,
                            scope,
                        )?;
                        if let (Some(lo), Some(hi)) = (min, max)
                            && lo > hi
                        {
                            return err(
                                &vat("min"),
                                format!("expected min ≤ max, got {lo} > {hi}"),
                            );
                        }
                    }
                    CheckConfig::LogRegexAbsent { pattern, .. }
                    | CheckConfig::LogRegexPresent { pattern, .. } => {
                        if let Err(e) = regex::Regex::new(pattern) {
                            return err(&vat("pattern"), format!("invalid regex: {e}"));
                        }
                    }
                    CheckConfig::Sql {
                        query,
                        database_url_env,
                        database_url_default,
                        search_path_env,
                        search_path_default: _,
                        min,
                        max,
                        equals,
                        timeout_s,
                    } => {
                        if query.trim().is_empty() {
                            return err(&vat("query"), "expected a SQL query".into());
                        }
                        self.check_template(
                            &vat("query"),
                            query,
                            &static_artefacts,
                            Field::Static,
                            scope,
                        )?;
                        if !valid_env_name(database_url_env) {
                            return err(
                                &vat("database_url_env"),
                                "expected the name of an environment variable such as `DATABASE_URL` (the URL itself stays out of the config)".into(),
                            );
                        }
                        if let Some(s) = search_path_env
                            && !valid_env_name(s)
                        {
                            return err(
                                &vat("search_path_env"),
                                "expected the name of an environment variable".into(),
                            );
                        }
                        if let Some(u) = database_url_default {
                            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                                return err(
                                    &vat("database_url_default"),
                                    "expected a `postgres://` URL".into(),
                                );
                            }
                            if url_has_password(u) {
                                return err(
                                    &vat("database_url_default"),
                                    format!(
                                        "a URL written in the config may not hold a password: put it in `{database_url_env}`"
                                    ),
                                );
                            }
                        }
                        if *timeout_s == Some(0) {
                            return err(
                                &vat("timeout_s"),
                                "expected a timeout of at least 1 second".into(),
                            );
                        }
                        check_bounds(&vat, *min, *max, equals.as_ref())?;
                    }
                    CheckConfig::JsonPath {
                        artefact,
                        path,
                        field,
                        min,
                        max,
                        equals,
                    }
                    | CheckConfig::YamlPath {
                        artefact,
                        path,
                        field,
                        min,
                        max,
                        equals,
                    } => {
                        self.check_target(
                            &at(&format!("validations[{j}]")),
                            &vat,
                            artefact,
                            path,
                            &artefacts,
                            scope,
                        )?;
                        if let Err(e) = crate::validate::FieldPath::parse(field) {
                            return err(&vat("field"), e);
                        }
                        check_bounds(&vat, *min, *max, equals.as_ref())?;
                    }
                    CheckConfig::SiblingDeviation {
                        of,
                        max_deviation_pct,
                        min_siblings,
                        ..
                    } => {
                        if !scope.is_partition() {
                            return err(
                                &vat("kind"),
                                "a backfill-level step has no siblings: `sibling_deviation` compares partitions' runs of a step"
                                    .into(),
                            );
                        }
                        let measured = s.validations[..j].iter().find(|o| check_name(o) == *of);
                        match measured {
                            None => {
                                return err(
                                    &vat("of"),
                                    format!(
                                        "unknown check `{of}`: expected the name of an earlier check of this step"
                                    ),
                                );
                            }
                            Some(o) if !measures_a_value(&o.check) => {
                                return err(
                                    &vat("of"),
                                    format!(
                                        "check `{of}` measures no number: expected a size, count, row count, query or field check"
                                    ),
                                );
                            }
                            Some(_) => {}
                        }
                        if !(max_deviation_pct.is_finite() && *max_deviation_pct > 0.0) {
                            return err(
                                &vat("max_deviation_pct"),
                                "expected a percentage > 0".into(),
                            );
                        }
                        if *min_siblings == 0 {
                            return err(&vat("min_siblings"), "expected at least 1 sibling".into());
                        }
                    }
                    CheckConfig::ParquetRows {
                        artefact,
                        path,
                        min,
                        max,
                    } => {
                        self.check_target(
                            &at(&format!("validations[{j}]")),
                            &vat,
                            artefact,
                            path,
                            &artefacts,
                            scope,
                        )?;
                        if let (Some(lo), Some(hi)) = (min, max)
                            && lo > hi
                        {
                            return err(
                                &vat("min"),
                                format!("expected min ≤ max, got {lo} > {hi}"),
                            );
                        }
                    }
                }
            }
            groups.insert(scope, (artefacts, static_artefacts));
        }
        Ok(())
    }

    /// A step's `scope`, `when`, `per` and `allow_partial` fit together, and the after-steps
    /// of one group agree on `allow_partial`.
    fn check_step_scope(
        &self,
        i: usize,
        s: &StepConfig,
        partial_of: &mut BTreeMap<RunScope, (usize, bool)>,
    ) -> Result<(), (String, String)> {
        let at = |f: &str| format!("steps[{i}].{f}");
        match s.scope {
            StepScope::Partition => {
                let stray = [
                    ("when", s.when.is_some()),
                    ("per", s.per.is_some()),
                    ("allow_partial", s.allow_partial),
                ];
                if let Some((f, _)) = stray.iter().find(|(_, set)| *set) {
                    return Err((
                        at(f),
                        format!(
                            "`{f}` applies only to a backfill-level step: add `\"scope\": \"backfill\"` or remove it"
                        ),
                    ));
                }
            }
            StepScope::Backfill => match s.when {
                None => {
                    return Err((
                        at("when"),
                        "a backfill-level step needs `\"when\": \"before\"` (before the first partition starts) or `\"after\"` (once the partitions ended)".into(),
                    ));
                }
                Some(StepWhen::Before) => {
                    if s.per == Some(StepPer::Dataset) {
                        return Err((
                            at("per"),
                            "`\"per\": \"dataset\"` applies only to an after-step: a before-step runs once, before any partition".into(),
                        ));
                    }
                    if s.allow_partial {
                        return Err((
                            at("allow_partial"),
                            "`allow_partial` applies only to an after-step".into(),
                        ));
                    }
                }
                Some(StepWhen::After) => {
                    let scope = s.run_scope();
                    let (first, partial) = *partial_of.entry(scope).or_insert((i, s.allow_partial));
                    if partial != s.allow_partial {
                        return Err((
                            at("allow_partial"),
                            format!(
                                "the after-steps of one scope run as one sequence, so they must agree: steps[{first}] has `allow_partial` {partial}"
                            ),
                        ));
                    }
                }
            },
        }
        Ok(())
    }

    fn check_target(
        &self,
        at: &str,
        vat: &dyn Fn(&str) -> String,
        artefact: &Option<String>,
        path: &Option<String>,
        artefacts: &BTreeSet<String>,
        scope: RunScope,
    ) -> Result<(), (String, String)> {
        match (artefact, path) {
            (Some(a), None) if artefacts.contains(a) => Ok(()),
            (Some(a), None) => Err((
                vat("artefact"),
                format!(
                    "unknown artefact `{a}`: expected one declared by this step or an earlier one"
                ),
            )),
            (None, Some(p)) => {
                self.check_template(&vat("path"), p, artefacts, Field::Static, scope)
            }
            _ => Err((
                at.to_string(),
                "expected exactly one of `artefact` or `path`".into(),
            )),
        }
    }

    fn check_template(
        &self,
        path: &str,
        text: &str,
        artefacts: &BTreeSet<String>,
        field: Field,
        scope: RunScope,
    ) -> Result<(), (String, String)> {
        let parsed =
            template::parse_placeholders(text).map_err(|e| (path.to_string(), e.to_string()))?;
        for p in parsed {
            let n = p.name;
            if p.deferred().is_some() {
                if field == Field::Static {
                    return Err((
                        path.to_string(),
                        format!(
                            "`{{{n}}}` is resolved by the worker, so it may appear only in a step's `args` and `env` (and the pipeline's `env`), not in a command or a path"
                        ),
                    ));
                }
                continue;
            }
            let builtin = match scope {
                RunScope::Partition => BUILTIN_PLACEHOLDERS.contains(&n),
                stage => {
                    (BUILTIN_PLACEHOLDERS.contains(&n)
                        && n != "month"
                        && (n != "dataset" || stage == RunScope::AfterDataset))
                        || BACKFILL_PLACEHOLDERS.contains(&n)
                }
            };
            let known = builtin
                || self.config.vars.contains_key(n)
                || (scope.is_partition() && self.partition_vars.contains(n))
                || n.strip_prefix("artefacts.")
                    .is_some_and(|a| artefacts.contains(a));
            if !known && !scope.is_partition() {
                let why = match n {
                    "month" => Some(
                        "a backfill-level step runs once for all months: use `{first_month}` or `{last_month}`",
                    ),
                    "dataset" => Some(
                        "only a per-dataset after-step (`\"per\": \"dataset\"`) has a `{dataset}`; use `{datasets}`",
                    ),
                    _ if self.partition_vars.contains(n) => {
                        Some("a per-partition variable has no value in a backfill-level step")
                    }
                    _ => None,
                };
                if let Some(why) = why {
                    return Err((path.to_string(), format!("`{{{n}}}`: {why}")));
                }
            }
            if !known && scope.is_partition() && BACKFILL_PLACEHOLDERS.contains(&n) {
                return Err((
                    path.to_string(),
                    format!(
                        "`{{{n}}}` is only defined for backfill-level steps (`\"scope\": \"backfill\"`)"
                    ),
                ));
            }
            if !known {
                let dynamic_here = field == Field::Static
                    && n.strip_prefix("artefacts.").is_some_and(|a| {
                        self.config
                            .steps
                            .iter()
                            .any(|s| matches!(s.artefacts.get(a), Some(ArtefactConfig::Dynamic(_))))
                    });
                if dynamic_here {
                    return Err((
                        path.to_string(),
                        format!(
                            "`{{{n}}}` is a dynamic artefact (known only once its step ran): use it in `args`, `env` or a check's `artefact`, not in a command or a path"
                        ),
                    ));
                }
                let mut all: Vec<String> = BUILTIN_PLACEHOLDERS
                    .iter()
                    .filter(|b| scope.is_partition() || **b != "month")
                    .map(|s| s.to_string())
                    .collect();
                if !scope.is_partition() {
                    all.extend(BACKFILL_PLACEHOLDERS.iter().map(|s| s.to_string()));
                }
                all.extend(self.config.vars.keys().cloned());
                if scope.is_partition() {
                    all.extend(self.partition_vars.iter().cloned());
                }
                all.extend(artefacts.iter().map(|a| format!("artefacts.{a}")));
                return Err((
                    path.to_string(),
                    format!(
                        "unknown placeholder `{{{n}}}`: expected one of {}",
                        all.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Fails when a step needs a partition dimension (`{month}`, `{dataset}`) the backfill lacks.
    pub fn check_partitions(&self, partitions: &[Partition]) -> Result<(), RenderError> {
        let Some(p) = partitions.first() else {
            return Ok(());
        };
        for s in &self.config.steps {
            let scope = s.run_scope();
            if scope == RunScope::AfterDataset && p.dataset.is_none() {
                return Err(RenderError::NoDatasets { step: s.id.clone() });
            }
            let mut texts: Vec<&String> = s.args.iter().collect();
            texts.push(&s.command);
            texts.extend(s.artefacts.values().filter_map(|a| match a {
                ArtefactConfig::Path(p) => Some(p),
                ArtefactConfig::Dynamic(d) => d.glob.as_ref(),
            }));
            texts.extend(s.env.values());
            texts.extend(s.cwd.iter());
            for t in texts {
                for n in template::placeholders(t).unwrap_or_default() {
                    let missing = (scope.is_partition()
                        && ((n == "month" && p.month.is_none())
                            || (n == "dataset" && p.dataset.is_none())))
                        || (matches!(n, "first_month" | "last_month") && p.month.is_none())
                        || (n == "datasets" && p.dataset.is_none());
                    if missing {
                        return Err(RenderError::MissingDimension {
                            step: s.id.clone(),
                            placeholder: n.to_string(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The run directory of a partition.
    pub fn run_dir(&self, partition: &Partition) -> Result<PathBuf, RenderError> {
        let rel = template::render(&self.config.run_dir, |n| {
            self.base_lookup(n, partition, 0, None)
        })
        .map_err(|source| RenderError::Template {
            step: "run_dir".into(),
            source,
        })?;
        let dir = normalize(&self.workdir.join(rel));
        self.confine("run_dir", dir)
    }

    fn base_lookup(
        &self,
        name: &str,
        partition: &Partition,
        attempt: u32,
        run_dir: Option<&Path>,
    ) -> Option<String> {
        match name {
            "month" => partition.month.clone(),
            "dataset" => partition.dataset.clone(),
            "partition" => Some(self.scope.key(partition)),
            "attempt" => Some(attempt.to_string()),
            "workdir" => Some(self.workdir.display().to_string()),
            "config_dir" => Some(self.config_dir.display().to_string()),
            "run_dir" => run_dir.map(|d| d.display().to_string()),
            var if partition.vars.contains_key(var) => partition.vars.get(var).cloned(),
            var => self.config.vars.get(var).map(|v| {
                template::render(v, |n| match n {
                    "workdir" => Some(self.workdir.display().to_string()),
                    "config_dir" => Some(self.config_dir.display().to_string()),
                    _ => None,
                })
                .unwrap_or_else(|_| v.clone())
            }),
        }
    }

    /// Points the pipeline at another workdir (`warpline run --workdir`), relative to the
    /// current directory.
    pub fn set_workdir(&mut self, dir: &Path) {
        let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        self.workdir = normalize(&abs);
    }

    /// Paths must lie under the workdir (outputs) or the config's directory (operator inputs
    /// such as reference files); nothing a partition value produces can leave both.
    fn confine(&self, step: &str, path: PathBuf) -> Result<PathBuf, RenderError> {
        if crate::paths::confined(Path::new("/"), &path, &[&self.workdir, &self.config_dir]) {
            Ok(path)
        } else {
            Err(RenderError::Escape {
                step: step.to_string(),
                path: path.display().to_string(),
                workdir: self.workdir.display().to_string(),
            })
        }
    }

    /// The record in which a step's worker writes the dynamic artefacts it resolved.
    pub fn artefact_record(run_dir: &Path, step_id: &str) -> PathBuf {
        run_dir
            .join(".warpline")
            .join(format!("{step_id}.artefacts.json"))
    }

    /// Renders attempt `attempt` of step `index` for a run into a [`StepSpec`].
    ///
    /// References only the worker can resolve (`{env:…}`, `{secret:…}`, dynamic artefacts)
    /// stay in the fields named by [`StepSpec::deferred`].
    pub fn render_step(
        &self,
        index: usize,
        partition: &Partition,
        run_id: Uuid,
        attempt: u32,
        attempt_id: Uuid,
    ) -> Result<StepSpec, RenderError> {
        let step = &self.steps[index];
        let run_dir = self.run_dir(partition)?;
        let log_dir = run_dir
            .join("logs")
            .join(run_id.to_string())
            .join(format!("{}-{attempt}", step.id));
        let mut artefacts: BTreeMap<String, String> = BTreeMap::new();
        let mut dynamic_artefacts: BTreeMap<String, DynamicArtefact> = BTreeMap::new();
        // Artefacts of earlier steps are visible to later ones as `{artefacts.NAME}`.
        let mut known: BTreeMap<String, String> = BTreeMap::new();
        let terr = |source| RenderError::Template {
            step: step.id.clone(),
            source,
        };
        for (i, s) in self.steps[..=index].iter().enumerate() {
            for (name, a) in &s.artefacts {
                let render_path = |t: &str| -> Result<String, RenderError> {
                    let rendered = template::render(t, |n| {
                        self.lookup(n, partition, attempt, &run_dir, &known)
                    })
                    .map_err(terr)?;
                    let path = self.confine(&s.id, normalize(&run_dir.join(rendered)))?;
                    Ok(path.display().to_string())
                };
                match a {
                    ArtefactConfig::Path(t) => {
                        let path = render_path(t)?;
                        if i == index {
                            artefacts.insert(name.clone(), path.clone());
                        }
                        known.insert(name.clone(), path);
                    }
                    ArtefactConfig::Dynamic(d) => {
                        let glob = d.glob.as_deref().map(render_path).transpose()?;
                        // The tool's report is per attempt; only this step's attempt reads it.
                        let file = d
                            .reported
                            .then(|| log_dir.join("artefacts.json").display().to_string());
                        dynamic_artefacts.insert(
                            name.clone(),
                            DynamicArtefact {
                                step_id: s.id.clone(),
                                glob,
                                file,
                                record: Self::artefact_record(&run_dir, &s.id)
                                    .display()
                                    .to_string(),
                            },
                        );
                    }
                }
            }
        }
        let is_dynamic = |n: &str| {
            n.strip_prefix("artefacts.")
                .is_some_and(|a| dynamic_artefacts.contains_key(a))
        };
        let render = |t: &str| {
            template::render(t, |n| self.lookup(n, partition, attempt, &run_dir, &known))
                .map_err(terr)
        };
        let mut deferred = Vec::new();
        let mut render_deferred = |field: String, t: &str| -> Result<String, RenderError> {
            let r = template::render_deferred(
                t,
                |n| self.lookup(n, partition, attempt, &run_dir, &known),
                is_dynamic,
            )
            .map_err(terr)?;
            Ok(match r {
                Rendered::Text(s) => s,
                Rendered::Deferred(s) => {
                    deferred.push(field);
                    s
                }
            })
        };
        let path_of = |t: &str| -> Result<String, RenderError> {
            let p = normalize(&run_dir.join(render(t)?));
            Ok(self.confine(&step.id, p)?.display().to_string())
        };
        let command = self.render_command(index, partition)?;
        let mut args = Vec::with_capacity(step.args.len());
        for (i, a) in step.args.iter().enumerate() {
            args.push(render_deferred(format!("args[{i}]"), a)?);
        }
        let mut env = BTreeMap::new();
        for (k, v) in self.config.env.iter().chain(&step.env) {
            env.insert(k.clone(), v.clone());
        }
        for (k, v) in env.iter_mut() {
            *v = render_deferred(format!("env.{k}"), v)?;
        }
        let cwd = match &step.cwd {
            Some(c) => path_of(c)?,
            None => run_dir.display().to_string(),
        };
        let mut validations = Vec::with_capacity(step.validations.len());
        for (j, v) in step.validations.iter().enumerate() {
            let mut target =
                |artefact: &Option<String>, path: &Option<String>| -> Result<String, RenderError> {
                    match (artefact, path) {
                        (Some(a), _) if dynamic_artefacts.contains_key(a) => {
                            deferred.push(format!("validations[{j}].path"));
                            Ok(format!("{{artefacts.{a}}}"))
                        }
                        (Some(a), _) => Ok(known.get(a).cloned().unwrap_or_default()),
                        (None, Some(p)) => path_of(p),
                        (None, None) => Ok(String::new()),
                    }
                };
            let check = match &v.check {
                CheckConfig::FileExists { artefact, path } => CheckSpec::FileExists {
                    path: target(artefact, path)?,
                },
                CheckConfig::FileSizeMin {
                    artefact,
                    path,
                    min_bytes,
                } => CheckSpec::FileSizeMin {
                    path: target(artefact, path)?,
                    min_bytes: *min_bytes,
                },
                CheckConfig::FileCount { glob, min, max } => CheckSpec::FileCount {
                    glob: path_of(glob)?,
                    min: *min,
                    max: *max,
                },
                CheckConfig::LogRegexAbsent { pattern, stream } => CheckSpec::LogRegexAbsent {
                    pattern: pattern.clone(),
                    stream: *stream,
                },
                CheckConfig::LogRegexPresent { pattern, stream } => CheckSpec::LogRegexPresent {
                    pattern: pattern.clone(),
                    stream: *stream,
                },
                CheckConfig::Sql {
                    query,
                    database_url_env,
                    database_url_default,
                    search_path_env,
                    search_path_default,
                    min,
                    max,
                    equals,
                    timeout_s,
                } => CheckSpec::Sql {
                    query: self.render_query(step, query, partition, attempt, &run_dir, &known)?,
                    database_url_env: database_url_env.clone(),
                    database_url_default: database_url_default.clone(),
                    search_path_env: search_path_env.clone(),
                    search_path_default: search_path_default.clone(),
                    min: *min,
                    max: *max,
                    equals: equals.clone(),
                    timeout_s: timeout_s.unwrap_or(30),
                },
                CheckConfig::JsonPath {
                    artefact,
                    path,
                    field,
                    min,
                    max,
                    equals,
                } => CheckSpec::JsonPath {
                    path: target(artefact, path)?,
                    field: field.clone(),
                    min: *min,
                    max: *max,
                    equals: equals.clone(),
                },
                CheckConfig::YamlPath {
                    artefact,
                    path,
                    field,
                    min,
                    max,
                    equals,
                } => CheckSpec::YamlPath {
                    path: target(artefact, path)?,
                    field: field.clone(),
                    min: *min,
                    max: *max,
                    equals: equals.clone(),
                },
                CheckConfig::ParquetRows {
                    artefact,
                    path,
                    min,
                    max,
                } => CheckSpec::ParquetRows {
                    path: target(artefact, path)?,
                    min: *min,
                    max: *max,
                },
                // Needs the backfill's history: the coordinator evaluates it (its `gates`).
                CheckConfig::SiblingDeviation { .. } => continue,
            };
            let name = v.report_name();
            validations.push(Validation {
                name,
                severity: v.severity,
                check,
            });
        }
        Ok(StepSpec {
            schema_version: SCHEMA_VERSION,
            run_id,
            step_id: step.id.clone(),
            attempt,
            attempt_id,
            command,
            args,
            env,
            cwd,
            timeout_s: step.timeout_s,
            artefacts,
            validations,
            log_dir: log_dir.display().to_string(),
            workdir: self.workdir.display().to_string(),
            input_roots: vec![self.config_dir.display().to_string()],
            pool: step.pool.clone(),
            trace: BTreeMap::new(),
            deferred,
            dynamic_artefacts,
            files: BTreeMap::new(),
            failures: FailuresConfig::layered(step.failures.as_ref(), &self.config.failures),
        })
    }

    /// Renders a `sql` check's query. Placeholders are substituted as written (quote them in
    /// the query: `'{month}'`); a value that could break out of a literal or an identifier
    /// (a quote, a backslash, a semicolon) is refused. Partition values cannot hold one.
    fn render_query(
        &self,
        step: &StepConfig,
        query: &str,
        partition: &Partition,
        attempt: u32,
        run_dir: &Path,
        known: &BTreeMap<String, String>,
    ) -> Result<String, RenderError> {
        let unsafe_value = std::cell::RefCell::new(None);
        let rendered = template::render(query, |n| {
            let v = self.lookup(n, partition, attempt, run_dir, known)?;
            if v.contains(['\'', '"', '\\', ';', '\0']) {
                unsafe_value.borrow_mut().get_or_insert(n.to_string());
            }
            Some(v)
        })
        .map_err(|source| RenderError::Template {
            step: step.id.clone(),
            source,
        })?;
        match unsafe_value.into_inner() {
            Some(name) => Err(RenderError::UnsafeQueryValue {
                step: step.id.clone(),
                placeholder: name,
            }),
            None => Ok(rendered),
        }
    }

    /// A placeholder's value where no attempt and no artefact is known (artefact paths).
    pub(crate) fn lookup_static(
        &self,
        name: &str,
        partition: &Partition,
        run_dir: &Path,
    ) -> Option<String> {
        self.base_lookup(name, partition, 0, Some(run_dir))
    }

    fn lookup(
        &self,
        name: &str,
        partition: &Partition,
        attempt: u32,
        run_dir: &Path,
        artefacts: &BTreeMap<String, String>,
    ) -> Option<String> {
        match name.strip_prefix("artefacts.") {
            Some(a) => artefacts.get(a).cloned(),
            None => self.base_lookup(name, partition, attempt, Some(run_dir)),
        }
    }
}

fn default_check_name(c: &CheckConfig) -> String {
    match c {
        CheckConfig::FileExists { artefact, path } => {
            format!(
                "file_exists({})",
                artefact.as_deref().or(path.as_deref()).unwrap_or("")
            )
        }
        CheckConfig::FileSizeMin {
            artefact,
            path,
            min_bytes,
        } => format!(
            "file_size_min({}, {min_bytes})",
            artefact.as_deref().or(path.as_deref()).unwrap_or("")
        ),
        CheckConfig::FileCount { glob, .. } => format!("file_count({glob})"),
        CheckConfig::LogRegexAbsent { pattern, .. } => format!("log_regex_absent({pattern})"),
        CheckConfig::LogRegexPresent { pattern, .. } => format!("log_regex_present({pattern})"),
        CheckConfig::Sql { query, .. } => {
            let q: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
            let short: String = q.chars().take(60).collect();
            format!("sql({short})")
        }
        CheckConfig::JsonPath {
            artefact,
            path,
            field,
            ..
        } => format!(
            "json_path({}, {field})",
            artefact.as_deref().or(path.as_deref()).unwrap_or("")
        ),
        CheckConfig::YamlPath {
            artefact,
            path,
            field,
            ..
        } => format!(
            "yaml_path({}, {field})",
            artefact.as_deref().or(path.as_deref()).unwrap_or("")
        ),
        CheckConfig::ParquetRows { artefact, path, .. } => format!(
            "parquet_rows({})",
            artefact.as_deref().or(path.as_deref()).unwrap_or("")
        ),
        CheckConfig::SiblingDeviation { of, .. } => format!("sibling_deviation({of})"),
    }
}

/// The name a check reports under (its `name`, or one derived from its kind and target).
pub fn check_name(v: &ValidationConfig) -> String {
    v.name
        .clone()
        .unwrap_or_else(|| default_check_name(&v.check))
}

/// Whether a check kind measures a number (`Check::value`) that `sibling_deviation` can use.
fn measures_a_value(c: &CheckConfig) -> bool {
    !matches!(
        c,
        CheckConfig::LogRegexAbsent { .. }
            | CheckConfig::LogRegexPresent { .. }
            | CheckConfig::SiblingDeviation { .. }
    )
}

/// Semantic checks of `min` / `max` / `equals`; the error is (JSON path, message).
fn check_bounds(
    vat: &dyn Fn(&str) -> String,
    min: Option<f64>,
    max: Option<f64>,
    equals: Option<&serde_json::Value>,
) -> Result<(), (String, String)> {
    for (name, b) in [("min", min), ("max", max)] {
        if b.is_some_and(|b| !b.is_finite()) {
            return Err((vat(name), "expected a finite number".into()));
        }
    }
    if let (Some(lo), Some(hi)) = (min, max)
        && lo > hi
    {
        return Err((vat("min"), format!("expected min ≤ max, got {lo} > {hi}")));
    }
    if equals.is_some() && (min.is_some() || max.is_some()) {
        return Err((
            vat("equals"),
            "expected either `equals` or `min`/`max`, not both".into(),
        ));
    }
    Ok(())
}

fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.as_bytes()[0].is_ascii_alphabetic()
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn valid_step_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
      "name": "demo",
      "workdir": "work",
      "vars": {"source": "file://{config_dir}/data"},
      "retry": {"initial_ms": 10},
      "steps": [
        {"id": "EXTRACT", "command": "fetch",
         "args": ["--url", "{source}/{dataset}/{month}.csv", "--out", "{artefacts.raw}"],
         "artefacts": {"raw": "raw.csv"},
         "validations": [
           {"kind": "file_exists", "artefact": "raw"},
           {"kind": "min_size", "artefact": "raw", "min_bytes": 1024, "severity": "warn"}
         ]},
        {"id": "LOAD", "command": "load", "args": ["{artefacts.raw}", "{attempt}"], "max_attempts": 2,
         "validations": [{"kind": "log_regex_absent", "pattern": "CRITICAL|ConnectionError"}]}
      ]
    }"#;

    fn load(text: &str) -> Result<Pipeline, ConfigError> {
        Pipeline::from_json(Path::new("/tmp/cfg/pipeline.json"), text)
    }

    fn invalid_at(text: &str) -> (String, String) {
        match load(text).unwrap_err() {
            ConfigError::Invalid {
                path,
                message,
                file,
            } => {
                assert_eq!(file, "/tmp/cfg/pipeline.json");
                (path, message)
            }
            other => panic!("unexpected {other}"),
        }
    }

    fn part() -> Partition {
        Partition {
            month: Some("2024-03".into()),
            dataset: Some("sales".into()),
            ..Partition::default()
        }
    }

    #[test]
    fn renders_a_step_spec() {
        let p = load(GOOD).unwrap();
        assert_eq!(p.workdir, Path::new("/tmp/cfg/work"));
        let run = Uuid::now_v7();
        let spec = p.render_step(1, &part(), run, 2, Uuid::now_v7()).unwrap();
        assert_eq!(spec.args, ["/tmp/cfg/work/runs/sales_2024-03/raw.csv", "2"]);
        assert_eq!(spec.cwd, "/tmp/cfg/work/runs/sales_2024-03");
        // Attempt logs are per run, so a later backfill never overwrites an earlier one's.
        assert_eq!(
            spec.log_dir,
            format!("/tmp/cfg/work/runs/sales_2024-03/logs/{run}/LOAD-2")
        );
        let first = p.render_step(0, &part(), run, 1, Uuid::now_v7()).unwrap();
        assert_eq!(first.args[1], "file:///tmp/cfg/data/sales/2024-03.csv");
        assert_eq!(
            first.validations[0].check,
            CheckSpec::FileExists {
                path: "/tmp/cfg/work/runs/sales_2024-03/raw.csv".into()
            }
        );
        assert_eq!(first.validations[1].severity, Severity::Warn);
        assert_eq!(first.validations[1].check.kind(), "file_size_min");
        assert_eq!(p.config.retry.initial_ms, 10);
        assert_eq!(p.config.retry.max_ms, 60_000);
    }

    #[test]
    fn type_errors_name_the_json_path() {
        let (path, msg) =
            invalid_at(&GOOD.replace(r#""max_attempts": 2"#, r#""max_attempts": "two""#));
        assert_eq!(path, "steps[1].max_attempts");
        assert!(msg.contains("expected u32"), "{msg}");
        let (path, msg) = invalid_at(&GOOD.replace(r#""max_attempts": 2"#, r#""max_attempt": 2"#));
        assert_eq!(path, "steps[1].max_attempt");
        assert!(msg.contains("unknown field `max_attempt`"), "{msg}");
    }

    #[test]
    fn unknown_placeholder_is_a_config_error() {
        let (path, msg) = invalid_at(&GOOD.replace("{attempt}", "{atempt}"));
        assert_eq!(path, "steps[1].args[1]");
        assert!(msg.contains("unknown placeholder `{atempt}`"), "{msg}");
        // An artefact of a later step is not visible to an earlier one.
        let (path, _) = invalid_at(&GOOD.replace(
            r#""--out", "{artefacts.raw}""#,
            r#""--out", "{artefacts.nope}""#,
        ));
        assert_eq!(path, "steps[0].args[3]");
    }

    #[test]
    fn invalid_regex_is_a_config_error() {
        let (path, msg) = invalid_at(&GOOD.replace("CRITICAL|ConnectionError", "CRITICAL("));
        assert_eq!(path, "steps[1].validations[0].pattern");
        assert!(msg.contains("invalid regex"), "{msg}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let (path, _) = invalid_at(&GOOD.replace(r#""id": "LOAD""#, r#""id": "EXTRACT""#));
        assert_eq!(path, "steps[1].id");
        let (path, _) = invalid_at(&GOOD.replace(r#""id": "LOAD""#, r#""id": "COMPLETE""#));
        assert_eq!(path, "steps[1].id");
        let (path, _) =
            invalid_at(&GOOD.replace(r#""artefact": "raw"}"#, r#""artefact": "nope"}"#));
        assert_eq!(path, "steps[0].validations[0].artefact");
        let (path, _) = invalid_at(r#"{"name": "x", "steps": []}"#);
        assert_eq!(path, "steps");
        let (path, msg) = invalid_at("{");
        assert_eq!(path, "$");
        assert!(msg.contains("EOF"), "{msg}");
    }

    #[test]
    fn paths_cannot_escape_the_workdir() {
        let text = GOOD.replace(r#""raw": "raw.csv""#, r#""raw": "../../../../etc/passwd""#);
        let p = load(&text).unwrap();
        let err = p
            .render_step(0, &part(), Uuid::now_v7(), 1, Uuid::now_v7())
            .unwrap_err();
        assert!(matches!(err, RenderError::Escape { .. }), "{err}");
    }

    #[test]
    fn missing_partition_dimension_is_reported() {
        let p = load(GOOD).unwrap();
        let months_only = [Partition {
            month: Some("2024-01".into()),
            ..Partition::default()
        }];
        let err = p.check_partitions(&months_only).unwrap_err();
        assert!(err.to_string().contains("--datasets"), "{err}");
        assert!(p.check_partitions(&[part()]).is_ok());
    }

    #[test]
    fn agent_section_defaults_and_errors_name_the_path() {
        let p = load(GOOD).unwrap();
        assert_eq!(p.config.agent, AgentConfig::default());
        assert_eq!(p.config.agent.kind, AgentKindConfig::Rules);
        assert_eq!(p.config.agent.call_on, CallOn::Unclean);
        let with = |agent: &str| {
            GOOD.replacen(
                r#""workdir": "work","#,
                &format!(r#""workdir": "work", "agent": {agent},"#),
                1,
            )
        };
        let p = load(&with(
            r#"{"kind": "gemini", "model": "m", "call_on": "always", "budget": 3, "shadow": true, "apply": "llm", "temperature": null}"#,
        ))
        .unwrap();
        let a = &p.config.agent;
        assert_eq!(a.kind, AgentKindConfig::Gemini);
        assert_eq!(
            (a.call_on, a.budget, a.shadow, a.apply),
            (CallOn::Always, Some(3), true, ShadowApply::Llm)
        );
        assert_eq!(a.temperature, None);
        let (path, msg) = invalid_at(&with(r#"{"kind": "claude"}"#));
        assert_eq!(path, "agent.kind");
        assert!(msg.contains("unknown variant `claude`"), "{msg}");
        let (path, _) = invalid_at(&with(r#"{"timeout": 3}"#));
        assert_eq!(path, "agent.timeout");
        let (path, msg) = invalid_at(&with(r#"{"rate_per_s": 0}"#));
        assert_eq!(path, "agent.rate_per_s");
        assert!(msg.contains("> 0"), "{msg}");
        let (path, _) = invalid_at(&with(r#"{"base_url": "localhost:8080"}"#));
        assert_eq!(path, "agent.base_url");
        let (path, _) = invalid_at(&with(r#"{"call_on": "sometimes"}"#));
        assert_eq!(path, "agent.call_on");
    }

    #[test]
    fn backoff_grows_and_caps() {
        let r = RetryPolicy {
            initial_ms: 100,
            multiplier: 2.0,
            max_ms: 300,
        };
        assert_eq!(r.backoff(2).as_millis(), 100);
        assert_eq!(r.backoff(3).as_millis(), 200);
        assert_eq!(r.backoff(4).as_millis(), 300);
        assert_eq!(r.backoff(40).as_millis(), 300);
    }

    const TOOLCHAIN: &str = r#"{
      "name": "toolchain",
      "workdir": "work",
      "vars": {"python": "{config_dir}/venv/bin/python", "source_base": "http://x"},
      "env": {"PGPASSWORD": "{secret:pg_password}"},
      "steps": [
        {"id": "EXTRACT", "command": "{python}",
         "args": ["scripts/get.py", "{url}", "{month:%B-%Y|lower}", "--token={env:API_TOKEN}"],
         "artefacts": {"raw": {"glob": "out/*.csv"}, "meta": {"reported": true}, "log": "get.log"},
         "validations": [{"kind": "file_size_min", "artefact": "raw", "min_bytes": 10}]},
        {"id": "LOAD", "command": "bin/load",
         "args": ["{artefacts.raw}", "{artefacts.log}", "{{literal}}"],
         "env": {"META": "{artefacts.meta}"}}
      ]
    }"#;

    #[test]
    fn commands_are_templated_and_secrets_and_dynamic_artefacts_are_deferred() {
        // Without its partitions file, the pipeline's `{url}` is unknown.
        let err = load(TOOLCHAIN).unwrap_err().to_string();
        assert!(err.contains("unknown placeholder `{url}`"), "{err}");
        let file = Path::new("/tmp/cfg/pipeline.json");
        let urls = BTreeSet::from(["url".to_string()]);
        let p = Pipeline::from_json_with_partition_vars(file, TOOLCHAIN, urls).unwrap();
        let bad = BTreeSet::from(["month".to_string()]);
        assert!(Pipeline::from_json_with_partition_vars(file, TOOLCHAIN, bad).is_err());
        let part = Partition {
            month: Some("2024-01".into()),
            vars: BTreeMap::from([("url".to_string(), "http://x/january.csv".to_string())]),
            ..Partition::default()
        };
        p.check_partitions(std::slice::from_ref(&part)).unwrap();
        let run = Uuid::now_v7();
        let s = p.render_step(0, &part, run, 1, Uuid::now_v7()).unwrap();
        assert_eq!(s.command, "/tmp/cfg/venv/bin/python");
        assert_eq!(
            s.args,
            [
                "scripts/get.py",
                "http://x/january.csv",
                "january-2024",
                "--token={env:API_TOKEN}"
            ]
        );
        assert_eq!(s.env["PGPASSWORD"], "{secret:pg_password}");
        assert_eq!(
            s.deferred,
            ["args[3]", "env.PGPASSWORD", "validations[0].path"]
        );
        assert_eq!(
            s.validations[0].check,
            CheckSpec::FileSizeMin {
                path: "{artefacts.raw}".into(),
                min_bytes: 10
            }
        );
        let raw = &s.dynamic_artefacts["raw"];
        assert_eq!(
            raw.glob.as_deref(),
            Some("/tmp/cfg/work/runs/2024-01/out/*.csv")
        );
        assert_eq!(
            raw.record,
            "/tmp/cfg/work/runs/2024-01/.warpline/EXTRACT.artefacts.json"
        );
        assert!(
            s.dynamic_artefacts["meta"]
                .file
                .as_deref()
                .unwrap()
                .ends_with("EXTRACT-1/artefacts.json")
        );
        assert_eq!(s.artefacts.keys().collect::<Vec<_>>(), ["log"]);
        let l = p.render_step(1, &part, run, 1, Uuid::now_v7()).unwrap();
        // A relative command path is the config directory's.
        assert_eq!(l.command, "/tmp/cfg/bin/load");
        assert_eq!(
            l.args,
            [
                "{artefacts.raw}",
                "/tmp/cfg/work/runs/2024-01/get.log",
                "{literal}"
            ]
        );
        assert_eq!(l.deferred, ["args[0]", "env.META", "env.PGPASSWORD"]);
        assert!(l.artefacts.is_empty());
        // Another partition's value.
        let other = Partition {
            month: Some("2024-02".into()),
            vars: BTreeMap::from([("url".to_string(), "http://x/feb.csv".to_string())]),
            ..Partition::default()
        };
        let s = p.render_step(0, &other, run, 1, Uuid::now_v7()).unwrap();
        assert_eq!(s.args[1..3], ["http://x/feb.csv", "february-2024"]);
    }

    #[test]
    fn secrets_and_dynamic_artefacts_stay_out_of_commands_and_paths() {
        let (path, msg) =
            invalid_at(&GOOD.replace(r#""command": "fetch""#, r#""command": "{env:X}""#));
        assert_eq!(path, "steps[0].command");
        assert!(msg.contains("resolved by the worker"), "{msg}");
        let (path, _) =
            invalid_at(&GOOD.replace(r#""raw": "raw.csv""#, r#""raw": "{secret:x}.csv""#));
        assert_eq!(path, "steps[0].artefacts.raw");
        let dynamic = GOOD.replace(r#""raw": "raw.csv""#, r#""raw": {"glob": "*.csv"}"#);
        let p = load(&dynamic).unwrap();
        assert!(
            p.render_step(1, &part(), Uuid::now_v7(), 1, Uuid::now_v7())
                .is_ok()
        );
        let (path, msg) = invalid_at(&dynamic.replace(
            r#""max_attempts": 2"#,
            r#""max_attempts": 2, "cwd": "{artefacts.raw}""#,
        ));
        assert_eq!(path, "steps[1].cwd");
        assert!(msg.contains("dynamic artefact"), "{msg}");
        let (path, _) = invalid_at(&GOOD.replace(
            r#""raw": "raw.csv""#,
            r#""raw": {"glob": "a", "reported": true}"#,
        ));
        assert_eq!(path, "steps[0].artefacts.raw");
        let (path, msg) = invalid_at(&GOOD.replace("{month}.csv", "{month:%Q}.csv"));
        assert_eq!(path, "steps[0].args[1]");
        assert!(msg.contains("strftime"), "{msg}");
    }

    #[test]
    fn unknown_vars_are_refused_with_a_suggestion() {
        let mut p = load(GOOD).unwrap();
        p.set_vars(&[("source".into(), "file:///x".into())])
            .unwrap();
        let err = p
            .set_vars(&[("sorce".into(), "file:///x".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variable `sorce`"), "{err}");
        assert!(err.contains("did you mean `source`?"), "{err}");
        let err = p
            .set_vars(&[("zzz".into(), "1".into())])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("did you mean"), "{err}");
        assert!(err.contains("defined: `source`"), "{err}");
    }

    fn one_step(validations: &str) -> String {
        format!(
            r#"{{"name": "g", "steps": [{{"id": "S", "command": "tool",
                "artefacts": {{"m": "m.json"}}, "validations": {validations}}}]}}"#
        )
    }

    #[test]
    fn data_gates_are_checked_and_rendered() {
        let ok = one_step(
            r#"[{"name": "rows", "kind": "row_count", "query": "SELECT count(*) FROM t WHERE m = '{month}'",
                 "database_url_env": "DB_URL", "min": 1},
                {"kind": "json_path", "artefact": "m", "field": "$.row_count", "min": 100},
                {"kind": "parquet_rows", "path": "out.parquet", "max": 10},
                {"kind": "sibling_deviation", "of": "rows", "max_deviation_pct": 50}]"#,
        );
        let p = load(&ok).unwrap();
        let spec = p
            .render_step(0, &part(), Uuid::nil(), 1, Uuid::nil())
            .unwrap();
        assert_eq!(spec.validations.len(), 3);
        match &spec.validations[0].check {
            CheckSpec::Sql { query, .. } => {
                assert_eq!(query, "SELECT count(*) FROM t WHERE m = '2024-03'")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(spec.validations[1].name, "json_path(m, $.row_count)");
        for (bad, at, says) in [
            (
                r#"[{"kind": "sql", "query": "select 1", "database_url_env": "postgres://x"}]"#,
                "steps[0].validations[0].database_url_env",
                "name of an environment variable",
            ),
            (
                r#"[{"kind": "sql", "query": "select 1", "database_url_env": "DB", "database_url_default": "postgres://u:secret@h/db"}]"#,
                "steps[0].validations[0].database_url_default",
                "may not hold a password",
            ),
            (
                r#"[{"kind": "json_path", "artefact": "m", "field": "$.a[", "min": 1}]"#,
                "steps[0].validations[0].field",
                "unclosed",
            ),
            (
                r#"[{"kind": "json_path", "artefact": "m", "field": "a", "min": 5, "max": 1}]"#,
                "steps[0].validations[0].min",
                "min ≤ max",
            ),
            (
                r#"[{"kind": "sibling_deviation", "of": "nope", "max_deviation_pct": 50}]"#,
                "steps[0].validations[0].of",
                "unknown check `nope`",
            ),
            (
                r#"[{"name": "l", "kind": "log_regex_absent", "pattern": "x"},
                    {"kind": "sibling_deviation", "of": "l", "max_deviation_pct": 50}]"#,
                "steps[0].validations[1].of",
                "measures no number",
            ),
        ] {
            let (path, msg) = invalid_at(&one_step(bad));
            assert_eq!(path, at, "{msg}");
            assert!(msg.contains(says), "{msg}");
        }
    }

    #[test]
    fn a_query_value_that_could_break_out_is_refused() {
        let text = one_step(
            r#"[{"kind": "sql", "query": "SELECT count(*) FROM t WHERE d = '{who}'", "database_url_env": "DB"}]"#,
        )
        .replace(r#""name": "g","#, r#""name": "g", "vars": {"who": "x' OR '1'='1"},"#);
        let p = load(&text).unwrap();
        let err = p
            .render_step(0, &part(), Uuid::nil(), 1, Uuid::nil())
            .unwrap_err();
        assert!(matches!(err, RenderError::UnsafeQueryValue { .. }), "{err}");
    }

    #[test]
    fn failures_sections_are_checked_and_layered() {
        let text = r#"{"name": "f", "failures": {"rules": [{"pattern": "p", "class": "permanent"}]},
            "steps": [{"id": "S", "command": "t",
                       "failures": {"rules": [{"exit_codes": [3], "class": "transient"}], "builtin": false}}]}"#;
        let p = load(text).unwrap();
        let spec = p
            .render_step(0, &part(), Uuid::nil(), 1, Uuid::nil())
            .unwrap();
        assert_eq!(spec.failures.rules.len(), 2);
        assert_eq!(spec.failures.rules[0].exit_codes, vec![3]);
        assert_eq!(spec.failures.builtin, Some(false));
        let (path, msg) = invalid_at(&text.replace(r#""exit_codes": [3], "#, ""));
        assert_eq!(path, "steps[0].failures.rules[0]", "{msg}");
    }
}
