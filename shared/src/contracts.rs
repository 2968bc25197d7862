//! The JSON contracts that cross a process boundary: what to run ([`StepSpec`]), what happened
//! ([`StepResult`], [`ValidationReport`]), what the supervisor sees ([`PipelineState`]) and what it
//! answers ([`SupervisorDecision`]).
//!
//! Compatibility policy: every message carries `schema_version` (currently
//! [`SCHEMA_VERSION`]). Fields are only ever added, never renamed or removed, and every added
//! field has a default, so the seed's minimum shapes (`{"step_id", "exit_code", "artefacts"}`,
//! `{"status", "checks"}`, `{"action", "reason"}`) always parse. Enumerations are closed: an
//! unknown `action`, `status` or `severity` is refused, never guessed. The JSON Schemas in
//! `shared/schema/` are generated from these types (see [`crate::schema`]) and a test fails when
//! they drift.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::classify::FailuresConfig;
use crate::partition::Partition;

/// The version of every contract in this module.
pub const SCHEMA_VERSION: u32 = 1;

fn schema_version() -> u32 {
    SCHEMA_VERSION
}

/// The serde default of `schema_version` fields (for contracts defined in other modules).
pub fn schema_version_default() -> u32 {
    SCHEMA_VERSION
}

/// What a worker must run: one attempt of one step of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepSpec {
    /// Contract version.
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    /// The run this attempt belongs to.
    pub run_id: Uuid,
    /// The step's id in the pipeline (`EXTRACT`, ...).
    pub step_id: String,
    /// 1-based attempt number of this step in this run.
    pub attempt: u32,
    /// UUIDv7 naming this attempt: the idempotency key of the result.
    pub attempt_id: Uuid,
    /// The program to run; must be on the worker's allowlist.
    pub command: String,
    /// argv after the program, passed without a shell.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment for the tool, layered over the worker's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the tool.
    pub cwd: String,
    /// Wall-clock limit; the tool's process group is killed when it passes.
    pub timeout_s: u64,
    /// Named output paths the step promises.
    #[serde(default)]
    pub artefacts: BTreeMap<String, String>,
    /// Checks to run on the outcome, with paths already resolved.
    #[serde(default)]
    pub validations: Vec<Validation>,
    /// Directory for this attempt's `stdout.log` and `stderr.log`.
    pub log_dir: String,
    /// Root under which every path of this spec must lie.
    pub workdir: String,
    /// Read-only roots that artefact and check paths may also lie under (the pipeline's config
    /// directory, holding operator inputs such as reference files). `cwd` and `log_dir` must be
    /// under `workdir`.
    #[serde(default)]
    pub input_roots: Vec<String>,
    /// Worker pool (queue) this step is routed to.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// W3C trace context (`traceparent`, `tracestate`) of the coordinator's span.
    #[serde(default)]
    pub trace: BTreeMap<String, String>,
    /// The step's failure classification rules (its own, then the pipeline's) and whether the
    /// built-in table follows them. The worker classifies a failed attempt with them.
    #[serde(default)]
    pub failures: FailuresConfig,
    /// Fields that still hold references only the worker resolves (`args[2]`, `env.DB_URL`,
    /// `validations[0].path`): `{env:NAME}`, `{secret:NAME}` and `{artefacts.NAME}` of a dynamic
    /// artefact. Each such field is a template (other braces escaped as `{{` and `}}`); every
    /// other field is plain text. Secrets are never resolved by the coordinator, so they never
    /// travel in a StepSpec or land in the audit log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deferred: Vec<String>,
    /// Artefacts whose paths are known only once a step ran (by glob, or from a JSON file the
    /// tool writes), of this step (resolved after the tool exits) and of earlier steps (read
    /// from the record their worker left).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dynamic_artefacts: BTreeMap<String, DynamicArtefact>,
    /// Files the worker writes before it runs the tool: absolute path (under `workdir`) →
    /// content. A backfill-level step's `{partitions_file}` travels this way, so the worker
    /// needs no access to the coordinator's state.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
}

/// An artefact whose path the step decides: found by glob, or reported by the tool in a JSON
/// file (`{"NAME": "path", ...}`). The worker that ran the step writes what it resolved to
/// `record`, from which later steps' workers read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DynamicArtefact {
    /// The step that produces it.
    pub step_id: String,
    /// An absolute glob that must match exactly one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glob: Option<String>,
    /// The absolute path of the JSON file in which the tool reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The absolute path of the producing step's resolution record (JSON name → path).
    pub record: String,
}

/// The default worker pool name.
pub fn default_pool() -> String {
    "default".to_string()
}

/// How serious a failed check is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// A failure blocks `proceed`.
    #[default]
    Error,
    /// A failure is reported but does not block.
    Warn,
}

/// Which log a log check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output and standard error, in that order.
    #[default]
    Both,
    /// Standard output only.
    Stdout,
    /// Standard error only.
    Stderr,
}

/// One deterministic check with its paths resolved, as carried by a [`StepSpec`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Validation {
    /// A short name for reports; defaults to the kind and its target.
    pub name: String,
    /// `error` blocks proceeding, `warn` only informs.
    #[serde(default)]
    pub severity: Severity,
    /// What to check.
    #[serde(flatten)]
    pub check: CheckSpec,
}

/// The kinds of check, each with its resolved target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CheckSpec {
    /// The path exists and is a file.
    FileExists {
        /// Resolved path.
        path: String,
    },
    /// The file exists and holds at least `min_bytes` bytes.
    #[serde(alias = "min_size")]
    FileSizeMin {
        /// Resolved path.
        path: String,
        /// Smallest acceptable size in bytes.
        min_bytes: u64,
    },
    /// The number of files matching a glob lies within `[min, max]`.
    FileCount {
        /// Resolved glob pattern.
        glob: String,
        /// Fewest matches accepted.
        #[serde(default)]
        min: Option<u64>,
        /// Most matches accepted.
        #[serde(default)]
        max: Option<u64>,
    },
    /// No line of the log matches the regex.
    LogRegexAbsent {
        /// Regular expression (Rust `regex` syntax).
        pattern: String,
        /// Which log to read.
        #[serde(default)]
        stream: LogStream,
    },
    /// At least one line of the log matches the regex.
    LogRegexPresent {
        /// Regular expression (Rust `regex` syntax).
        pattern: String,
        /// Which log to read.
        #[serde(default)]
        stream: LogStream,
    },
    /// A scalar SQL query's result lies within bounds. The worker runs the query (the
    /// validators do no network I/O) and the comparison is pure.
    #[serde(alias = "row_count")]
    Sql {
        /// The query, placeholders rendered; its first column of its first row is the value.
        query: String,
        /// The environment variable holding the database URL (never written into a spec).
        database_url_env: String,
        /// The URL used when that variable is unset (refused if it holds a password).
        #[serde(default)]
        database_url_default: Option<String>,
        /// An environment variable naming the schema to put on the `search_path` first.
        #[serde(default)]
        search_path_env: Option<String>,
        /// The schema when that variable is unset.
        #[serde(default)]
        search_path_default: Option<String>,
        /// Bounds on the value.
        #[serde(default)]
        min: Option<f64>,
        /// Upper bound.
        #[serde(default)]
        max: Option<f64>,
        /// The exact value expected (a number, or a string compared as text).
        #[serde(default)]
        equals: Option<serde_json::Value>,
        /// Seconds the connection and query may take.
        #[serde(default = "default_query_timeout")]
        timeout_s: u64,
    },
    /// A field of a JSON artefact exists and, when bounds are given, satisfies them.
    JsonPath {
        /// Resolved path of the file.
        path: String,
        /// The field: `$.a.b[0].c`, `a.b`, or a JSON pointer `/a/b/0`.
        field: String,
        /// Lower bound on a number, or on the length of an array, object or string.
        #[serde(default)]
        min: Option<f64>,
        /// Upper bound, likewise.
        #[serde(default)]
        max: Option<f64>,
        /// The exact value expected.
        #[serde(default)]
        equals: Option<serde_json::Value>,
    },
    /// A field of a YAML artefact, as [`CheckSpec::JsonPath`].
    YamlPath {
        /// Resolved path of the file.
        path: String,
        /// The field.
        field: String,
        /// Lower bound.
        #[serde(default)]
        min: Option<f64>,
        /// Upper bound.
        #[serde(default)]
        max: Option<f64>,
        /// The exact value expected.
        #[serde(default)]
        equals: Option<serde_json::Value>,
    },
    /// A Parquet file's row count, read from its footer, lies within bounds.
    ParquetRows {
        /// Resolved path of the file.
        path: String,
        /// Fewest rows accepted.
        #[serde(default)]
        min: Option<u64>,
        /// Most rows accepted.
        #[serde(default)]
        max: Option<u64>,
    },
}

fn default_query_timeout() -> u64 {
    30
}

impl CheckSpec {
    /// The kind's wire name (`file_exists`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            CheckSpec::FileExists { .. } => "file_exists",
            CheckSpec::FileSizeMin { .. } => "file_size_min",
            CheckSpec::FileCount { .. } => "file_count",
            CheckSpec::LogRegexAbsent { .. } => "log_regex_absent",
            CheckSpec::LogRegexPresent { .. } => "log_regex_present",
            CheckSpec::Sql { .. } => "sql",
            CheckSpec::JsonPath { .. } => "json_path",
            CheckSpec::YamlPath { .. } => "yaml_path",
            CheckSpec::ParquetRows { .. } => "parquet_rows",
        }
    }
}

/// What one attempt did. The seed's minimum is `{"step_id", "exit_code", "artefacts"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepResult {
    /// Contract version.
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    /// The step's id.
    pub step_id: String,
    /// The tool's exit code; `128 + signal` when a signal ended it, `-1` when it never ran or
    /// was lost.
    pub exit_code: i32,
    /// Named output paths (as promised by the spec).
    pub artefacts: BTreeMap<String, String>,
    /// The run.
    #[serde(default)]
    pub run_id: Option<Uuid>,
    /// The attempt this result answers (the idempotency key).
    #[serde(default)]
    pub attempt_id: Option<Uuid>,
    /// The attempt number.
    #[serde(default)]
    pub attempt: u32,
    /// Which worker ran it.
    #[serde(default)]
    pub worker_id: String,
    /// When the tool started.
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    /// When the tool ended.
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Wall time of the tool.
    #[serde(default)]
    pub duration_ms: u64,
    /// The tool passed its `timeout_s` and was killed.
    #[serde(default)]
    pub timed_out: bool,
    /// The signal that ended the tool, if any.
    #[serde(default)]
    pub signal: Option<i32>,
    /// No result arrived in time: the coordinator declared the attempt lost.
    #[serde(default)]
    pub lost: bool,
    /// Why the tool could not run at all (refused by the allowlist, not found, ...).
    #[serde(default)]
    pub error: Option<String>,
    /// Full standard output, on storage the coordinator can read.
    #[serde(default)]
    pub stdout_path: Option<String>,
    /// Full standard error.
    #[serde(default)]
    pub stderr_path: Option<String>,
    /// The last bytes of standard output and standard error (bounded by the worker; secret
    /// values the worker resolved are redacted).
    #[serde(default)]
    pub log_tail: String,
    /// The absolute path the command resolved to (what was executed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// The sha256 of the executed program file, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_sha256: Option<String>,
    /// How the failure classification rules read a failed attempt (see
    /// [`crate::classify`]): its class, the rule that decided, and the line that explains it.
    /// Absent when the attempt succeeded, or from a worker that predates classification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureFact>,
    /// The worker did not run the step because it may not: the command is not on its
    /// allowlist, or does not resolve on it (`error` says which). It hands the step back for
    /// another worker of the pool; the coordinator re-dispatches it and does not count it as
    /// an attempt. Absent (false) for every attempt that was run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
}

/// What kind of failure an attempt had, by the failure classification rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailureClass {
    /// A retry may fix it (a 503, a refused connection, `EX_TEMPFAIL`).
    Transient,
    /// A retry will not fix it (a `KeyError`, a 404, a usage error).
    Permanent,
    /// A rule says an operator should decide.
    Escalate,
    /// No rule matched.
    Unclassified,
}

impl FailureClass {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Transient => "transient",
            FailureClass::Permanent => "permanent",
            FailureClass::Escalate => "escalate",
            FailureClass::Unclassified => "unclassified",
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The log line that explains a failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CausalLine {
    /// `stdout` or `stderr`.
    pub stream: LogStream,
    /// 1-based line number in that stream's log file (in the captured tail when the log's
    /// start was not seen).
    pub line: u64,
    /// The line without colour codes (a message wrapped over several lines is joined).
    pub text: String,
}

impl fmt::Display for CausalLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stream = match self.stream {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Both => "log",
        };
        write!(f, "{stream} line {}: `{}`", self.line, self.text)
    }
}

/// A failed attempt as the classification rules read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FailureFact {
    /// What kind of failure it is.
    pub class: FailureClass,
    /// The rule that decided (its name, or `no rule matched`).
    pub rule: String,
    /// The line that explains the failure, when the log has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<CausalLine>,
}

impl StepResult {
    /// A result with only the step and exit code set; every other field at its default (the
    /// seed's minimum shape). Callers fill in what they know with struct-update syntax.
    pub fn new(step_id: impl Into<String>, exit_code: i32) -> Self {
        StepResult {
            schema_version: SCHEMA_VERSION,
            step_id: step_id.into(),
            exit_code,
            artefacts: BTreeMap::new(),
            run_id: None,
            attempt_id: None,
            attempt: 0,
            worker_id: String::new(),
            started_at: None,
            finished_at: None,
            duration_ms: 0,
            timed_out: false,
            signal: None,
            lost: false,
            error: None,
            stdout_path: None,
            stderr_path: None,
            log_tail: String::new(),
            program: None,
            program_sha256: None,
            failure: None,
            refused: false,
        }
    }

    /// True when the tool itself succeeded: exit 0, not timed out, not lost, no executor error.
    pub fn succeeded(&self) -> bool {
        self.exit_code == 0 && !self.timed_out && !self.lost && self.error.is_none()
    }
}

/// Overall outcome of a [`ValidationReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReportStatus {
    /// No `error`-severity check failed.
    Pass,
    /// At least one `error`-severity check failed.
    Fail,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Check {
    /// The check's name.
    pub name: String,
    /// The check's kind (`file_exists`, ...).
    pub kind: String,
    /// Its severity.
    #[serde(default)]
    pub severity: Severity,
    /// Whether it held.
    pub passed: bool,
    /// The fact it saw (a path and its size, the first matching line and its number, the
    /// measured value and its bound).
    #[serde(default)]
    pub detail: String,
    /// The number it measured, when it measures one (bytes, files, rows, a query's result, a
    /// field's value or length): what `sibling_deviation` compares across partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
}

/// What the validators found. The seed's minimum is `{"status", "checks"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ValidationReport {
    /// Contract version.
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    /// `fail` when an `error`-severity check failed.
    pub status: ReportStatus,
    /// Every check, in the order configured.
    pub checks: Vec<Check>,
}

impl ValidationReport {
    /// Builds a report, deriving `status` from the checks.
    pub fn from_checks(checks: Vec<Check>) -> Self {
        let failed = checks
            .iter()
            .any(|c| !c.passed && c.severity == Severity::Error);
        ValidationReport {
            schema_version: SCHEMA_VERSION,
            status: if failed {
                ReportStatus::Fail
            } else {
                ReportStatus::Pass
            },
            checks,
        }
    }

    /// The failed checks of the given severity.
    pub fn failed(&self, severity: Severity) -> impl Iterator<Item = &Check> {
        self.checks
            .iter()
            .filter(move |c| !c.passed && c.severity == severity)
    }
}

/// A worker's answer to one [`StepSpec`]: the message on the results queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepOutcome {
    /// Contract version.
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    /// What the tool did.
    pub result: StepResult,
    /// What the checks found.
    pub report: ValidationReport,
}

/// The supervisor's four moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Go to the next step (or COMPLETE after the last).
    Proceed,
    /// Run the same step again after a backoff.
    Retry,
    /// Stop the run; it keeps the failed step and can be resumed.
    Halt,
    /// Park the run until an operator decides.
    Escalate,
}

impl Action {
    /// All actions, in a stable order.
    pub const ALL: [Action; 4] = [
        Action::Proceed,
        Action::Retry,
        Action::Halt,
        Action::Escalate,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Proceed => "proceed",
            Action::Retry => "retry",
            Action::Halt => "halt",
            Action::Escalate => "escalate",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                format!("unknown action `{s}`: expected proceed, retry, halt or escalate")
            })
    }
}

/// The supervisor's answer. The seed's shape is exactly `{"action", "reason"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SupervisorDecision {
    /// Contract version.
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    /// The move.
    pub action: Action,
    /// Why, citing the facts used.
    pub reason: String,
}

impl SupervisorDecision {
    /// A decision with the current schema version.
    pub fn new(action: Action, reason: impl Into<String>) -> Self {
        SupervisorDecision {
            schema_version: SCHEMA_VERSION,
            action,
            reason: reason.into(),
        }
    }
}

/// Attempts used and allowed for one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepAttempts {
    /// The step.
    pub step_id: String,
    /// Attempts started so far.
    pub used: u32,
    /// The step's `max_attempts`.
    pub allowed: u32,
}

/// A summary of an earlier attempt in this run, for the supervisor's context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AttemptSummary {
    /// The step.
    pub step_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Exit code.
    pub exit_code: i32,
    /// Whether it timed out.
    pub timed_out: bool,
    /// Whether it was declared lost.
    #[serde(default)]
    pub lost: bool,
    /// The report's status.
    pub status: ReportStatus,
    /// Names of the failed `error` checks.
    #[serde(default)]
    pub failed_checks: Vec<String>,
    /// The action applied after it.
    pub action: Action,
    /// The applied decision's reason.
    pub reason: String,
}

/// The run as the supervisor sees it when deciding after an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PipelineState {
    /// Contract version.
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    /// The pipeline's name.
    pub pipeline: String,
    /// The run.
    pub run_id: Uuid,
    /// The partition the run covers.
    pub partition: Partition,
    /// The run's current state (the step's id while a step is in progress).
    pub state: String,
    /// The step just attempted.
    pub step_id: String,
    /// The attempt just made.
    pub attempt: u32,
    /// The step's `max_attempts`.
    pub max_attempts: u32,
    /// Attempts used and allowed for every step.
    pub attempts: Vec<StepAttempts>,
    /// Earlier attempts in this run, oldest first.
    pub history: Vec<AttemptSummary>,
    /// The actions the state machine's guard allows now.
    pub legal_actions: Vec<Action>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_step_result_parses() {
        let r: StepResult = serde_json::from_str(
            r#"{"step_id": "EXTRACT", "exit_code": 0, "artefacts": {"draft": "out/draft.yaml"}}"#,
        )
        .unwrap();
        assert_eq!(r.step_id, "EXTRACT");
        assert_eq!(r.exit_code, 0);
        assert_eq!(r.artefacts["draft"], "out/draft.yaml");
        assert_eq!(r.schema_version, SCHEMA_VERSION);
        assert!(r.succeeded());
        // The seed's shape is exactly `new` plus the artefacts.
        let mut expected = StepResult::new("EXTRACT", 0);
        expected
            .artefacts
            .insert("draft".into(), "out/draft.yaml".into());
        assert_eq!(r, expected);
    }

    #[test]
    fn seed_validation_report_parses() {
        let r: ValidationReport = serde_json::from_str(
            r#"{"status": "fail", "checks": [{"name": "draft exists", "kind": "file_exists", "passed": false}]}"#,
        )
        .unwrap();
        assert_eq!(r.status, ReportStatus::Fail);
        assert_eq!(r.checks.len(), 1);
        assert_eq!(r.checks[0].severity, Severity::Error);
        let empty: ValidationReport =
            serde_json::from_str(r#"{"status": "pass", "checks": []}"#).unwrap();
        assert_eq!(empty.status, ReportStatus::Pass);
    }

    #[test]
    fn seed_decisions_parse() {
        for action in ["proceed", "retry", "halt", "escalate"] {
            let d: SupervisorDecision =
                serde_json::from_str(&format!(r#"{{"action": "{action}", "reason": "because"}}"#))
                    .unwrap();
            assert_eq!(d.action.as_str(), action);
            assert_eq!(d.reason, "because");
        }
    }

    #[test]
    fn unknown_action_is_refused_clearly() {
        let err = serde_json::from_str::<SupervisorDecision>(
            r#"{"action": "skip", "reason": "why not"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown variant `skip`"), "{err}");
        assert!(err.contains("proceed"), "{err}");
        let missing = serde_json::from_str::<SupervisorDecision>(r#"{"action": "halt"}"#)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("missing field `reason`"), "{missing}");
    }

    #[test]
    fn unknown_status_is_refused_clearly() {
        let err = serde_json::from_str::<ValidationReport>(r#"{"status": "ok", "checks": []}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `ok`"), "{err}");
        assert!(err.contains("pass"), "{err}");
    }

    #[test]
    fn report_status_follows_error_checks_only() {
        let check = |severity, passed| Check {
            name: "c".into(),
            kind: "file_exists".into(),
            severity,
            passed,
            detail: String::new(),
            value: None,
        };
        let warn_only = ValidationReport::from_checks(vec![check(Severity::Warn, false)]);
        assert_eq!(warn_only.status, ReportStatus::Pass);
        let err = ValidationReport::from_checks(vec![
            check(Severity::Warn, true),
            check(Severity::Error, false),
        ]);
        assert_eq!(err.status, ReportStatus::Fail);
        assert_eq!(err.failed(Severity::Error).count(), 1);
    }

    #[test]
    fn min_size_alias_parses() {
        let v: Validation = serde_json::from_str(
            r#"{"name": "big", "kind": "min_size", "path": "a", "min_bytes": 10}"#,
        )
        .unwrap();
        assert_eq!(v.check.kind(), "file_size_min");
    }
}
