//! The Pipeline Step Executor: runs one attempt of one step and reports what happened.
//!
//! [`run_step`] refuses a spec before spawning anything when its command is not on the worker's
//! allowlist or when one of its paths leaves `workdir`. Otherwise it runs the tool's argv
//! without a shell, in a process group of its own, streams standard output and standard error to
//! `<log_dir>/stdout.log` and `<log_dir>/stderr.log` while keeping only a bounded tail in
//! memory, and enforces `timeout_s` and cancellation by signalling the whole group (`SIGTERM`,
//! then `SIGKILL` after a grace period). When the tool exits but something it started in its
//! group still holds the log pipes, that remainder is killed after a short drain, so an attempt
//! never hangs on a stray grandchild. Finally it runs the deterministic validators on the
//! outcome and returns a [`StepOutcome`].
//!
//! Before anything else it resolves what only a worker can ([`deferred`]: secrets from
//! its environment or secrets directory, earlier steps' dynamic artefacts), then checks the
//! command against the allowlist ([`allow`]: an entry may pin an interpreter's script)
//! after resolving it (an explicit path, or a name in the tools directories then `PATH`). The
//! resolved program and its sha256 go into the [`StepResult`]; secret values are redacted from
//! everything it reports.
//!
//! Every way an attempt can end becomes a [`StepOutcome`]: the executor itself never fails. What
//! went wrong before the tool could run is in `StepResult.error`, with `exit_code` `-1` (refused
//! or not started), `127` (command not found) or `126` (not executable), and a failing report.

pub mod allow;
pub mod deferred;
pub mod reaper;
pub mod settings;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use chrono::Utc;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warpline_shared::classify::{self, AttemptLog};
use warpline_shared::config::ARTEFACTS_FILE_ENV;
use warpline_shared::contracts::{
    Check, CheckSpec, ReportStatus, SCHEMA_VERSION, Severity, StepOutcome, StepResult, StepSpec,
    ValidationReport,
};
use warpline_shared::paths::confined;
use warpline_shared::validate::{self, DB_UNREACHABLE, Logs};

use crate::allow::{AllowEntry, ResolveError, lexical_absolute, resolve_command};
use crate::deferred::{Prepared, redact};
use crate::reaper::Reaper;

/// The default bound on [`StepResult::log_tail`]: 64 KiB.
pub const DEFAULT_TAIL_BYTES: usize = 64 * 1024;

/// The default time between `SIGTERM` and `SIGKILL`: 5 s.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

/// The `kind` of the synthetic check that fails a report when the tool never ran.
pub const EXECUTOR_CHECK_KIND: &str = "executor";

/// The `error` of an attempt stopped because the worker is shutting down.
pub const CANCELLED_ERROR: &str = "cancelled: worker shutting down";

/// How a worker runs steps.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// Names this worker in every [`StepResult`].
    pub worker_id: String,
    /// What this worker may run: allowlist entries ([`AllowEntry`]), each a program
    /// optionally followed by the argument prefix it is pinned to. Relative paths in an entry
    /// are taken from `/`: command-line entries are made absolute by [`allow::parse_allowlist`].
    pub allowlist: BTreeSet<String>,
    /// Directories the operator configured (`--tools-dir`), searched for a bare command name
    /// before `$PATH`. Empty by default: nothing is looked for beside the running binary.
    pub tools_dirs: Vec<PathBuf>,
    /// Where `{secret:NAME}` references are read from (`--secrets-dir`): the file `NAME`.
    pub secrets_dir: Option<PathBuf>,
    /// Bytes of stdout+stderr kept in StepResult.log_tail (default 64 KiB).
    pub tail_bytes: usize,
    /// Between SIGTERM and SIGKILL on timeout/cancel (default 5 s).
    pub kill_grace: Duration,
    /// Whether literal paths in a step's arguments must stay under its workdir, its input
    /// roots, the tools dirs or [`ExecConfig::path_roots`] ([`check_args`]). On for fleet
    /// workers (a pipeline arrives over the network); off for `warpline run`, whose pipeline is
    /// the operator's own file, unless asked for.
    pub confine_args: bool,
    /// More directories argument paths may name (`--path-root`), e.g. a shared data mount.
    pub path_roots: Vec<PathBuf>,
    /// The process that kills this worker's tools if it dies ([`reaper`]): each tool's group
    /// is registered with it, and tools are spawned with `posix_spawn`. Without one (local
    /// mode), each tool gets `PR_SET_PDEATHSIG` from a `pre_exec` hook instead, which makes
    /// std `fork` this process for every tool.
    pub reaper: Option<Arc<Reaper>>,
}

impl ExecConfig {
    /// The allowlist's entries, parsed: once per step, for both [`check_allowed`] and
    /// [`check_args`] (and once for a whole preflight). Entries that do not parse allow nothing.
    pub fn allow_entries(&self) -> Vec<AllowEntry> {
        self.allowlist
            .iter()
            .filter_map(|e| AllowEntry::parse(e, Path::new("/")).ok())
            .collect()
    }

    /// A config with the default tail size and kill grace, and no extra search directories.
    pub fn new(worker_id: impl Into<String>, allowlist: impl IntoIterator<Item = String>) -> Self {
        ExecConfig {
            worker_id: worker_id.into(),
            allowlist: allowlist.into_iter().collect(),
            tools_dirs: Vec::new(),
            secrets_dir: None,
            tail_bytes: DEFAULT_TAIL_BYTES,
            kill_grace: DEFAULT_KILL_GRACE,
            confine_args: true,
            path_roots: Vec::new(),
            reaper: None,
        }
    }
}

/// Why a spec was refused before anything ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecRefusal {
    /// The command is not on the allowlist.
    #[error("command `{command}` is not on this worker's allowlist (allowed: {allowed}){hint}")]
    NotAllowed {
        /// The refused command (with its first arguments when an entry pins the program).
        command: String,
        /// The allowlist, comma-separated (or `nothing`).
        allowed: String,
        /// Why a pinned entry for the same program did not match, or nothing.
        hint: String,
    },
    /// A reference only the worker resolves could not be (an unset variable, a missing secret
    /// file, an earlier step's missing record).
    #[error("cannot resolve {0}")]
    Unresolved(String),
    /// A path of the spec lies outside its `workdir`.
    #[error(
        "{field} `{path}` is not under workdir `{workdir}`; every path of a step must stay inside it"
    )]
    PathEscapes {
        /// Which field of the spec (`cwd`, `log_dir`, `artefacts.draft`, `validations[2].path`).
        field: String,
        /// The offending path as given.
        path: String,
        /// The spec's workdir as given.
        workdir: String,
    },
    /// A literal path in the arguments lies outside every directory the step may name.
    #[error(
        "args[{index}] `{arg}` names `{path}`, which is not under the step's workdir `{workdir}`, its input roots, the tools dirs or a --path-root ({roots}); arguments of a step may not point its tool elsewhere (start the worker with `--path-root DIR` to allow a directory, or `--unconfined-args` to allow any path)"
    )]
    ArgEscapes {
        /// The argument's position.
        index: usize,
        /// The argument as given.
        arg: String,
        /// The path it names (after `--flag=`, `file://` and `%` decoding).
        path: String,
        /// The spec's workdir as given.
        workdir: String,
        /// Every other root it could have been under, comma-separated.
        roots: String,
    },
    /// The glob's `..` follows a wildcard, so where it leads cannot be decided without the filesystem.
    #[error("{field} `{path}` has `..` after a wildcard; write the glob without it")]
    AmbiguousGlob {
        /// Which field of the spec.
        field: String,
        /// The glob as given.
        path: String,
    },
    /// The workdir is empty.
    #[error("workdir is empty; a step needs a root directory to confine its paths")]
    EmptyWorkdir,
}

/// Why the tool could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// No executable by that name was found.
    #[error("command `{command}` not found (looked in {looked_in})")]
    NotFound {
        /// The command as given.
        command: String,
        /// Where it was looked for.
        looked_in: String,
    },
    /// The file exists but may not be executed.
    #[error("command `{command}` (`{}`) cannot be executed: {source}", path.display())]
    PermissionDenied {
        /// The command as given.
        command: String,
        /// The file it resolved to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Preparing the attempt's directories or log files failed.
    #[error("cannot prepare {what} `{}`: {source}", path.display())]
    Prepare {
        /// What was being prepared (`cwd`, `log_dir`, `stdout log`).
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The tool started but its process group could not be registered with the worker's
    /// reaper, so it was killed: it would not have died with the worker.
    #[error(
        "killed `{command}` at once: cannot register its process group with this worker's reaper ({source}); the worker is stopping, restart it"
    )]
    Unprotected {
        /// The command as given.
        command: String,
        /// Why the registration failed.
        #[source]
        source: io::Error,
    },
    /// Any other failure to spawn.
    #[error("cannot start `{command}`: {source}")]
    Other {
        /// The command as given.
        command: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl SpawnError {
    /// The exit code reported for this failure, as a shell would: 127 not found, 126 not
    /// executable, -1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::NotFound { .. } => 127,
            SpawnError::PermissionDenied { .. } => 126,
            SpawnError::Prepare { .. }
            | SpawnError::Unprotected { .. }
            | SpawnError::Other { .. } => -1,
        }
    }
}

/// Runs one attempt of one step and checks its outcome. Never fails: every failure is reported
/// in the returned [`StepOutcome`].
#[tracing::instrument(skip_all, fields(run_id = %spec.run_id, step = %spec.step_id, attempt = spec.attempt))]
pub async fn run_step(
    spec: &StepSpec,
    cfg: &ExecConfig,
    cancel: &CancellationToken,
) -> StepOutcome {
    let mut result = base_result(spec, cfg);
    let prepared = match deferred::prepare(spec, cfg.secrets_dir.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            let refusal = SpecRefusal::Unresolved(e);
            tracing::warn!(error = %refusal, "refused step");
            return not_run(result, refusal.to_string(), "step refused");
        }
    };
    let outcome = run_prepared(&prepared, cfg, cancel, &mut result).await;
    redacted(outcome, &prepared.secrets)
}

/// Redacts the secret values of an attempt from what it reports.
fn redacted(mut outcome: StepOutcome, secrets: &[String]) -> StepOutcome {
    if secrets.is_empty() {
        return outcome;
    }
    outcome.result.log_tail = redact(&outcome.result.log_tail, secrets);
    outcome.result.error = outcome.result.error.map(|e| redact(&e, secrets));
    for c in &mut outcome.report.checks {
        c.detail = redact(&c.detail, secrets);
    }
    if let Some(line) = outcome
        .result
        .failure
        .as_mut()
        .and_then(|f| f.line.as_mut())
    {
        line.text = redact(&line.text, secrets);
    }
    outcome
}

async fn run_prepared(
    prepared: &Prepared,
    cfg: &ExecConfig,
    cancel: &CancellationToken,
    result: &mut StepResult,
) -> StepOutcome {
    let spec = &prepared.spec;
    let entries = cfg.allow_entries();
    let program = match check_allowed(spec, cfg, &entries)
        .and_then(|p| check_paths(spec).map(|()| p))
        .and_then(|p| check_args(spec, cfg, &entries).map(|()| p))
    {
        Ok(p) => p,
        Err(refusal) => {
            tracing::warn!(error = %refusal, "refused step");
            return not_run(result.clone(), refusal.to_string(), "step refused");
        }
    };
    let program = match program {
        Ok(p) => p,
        Err(e) => {
            let e = SpawnError::from(e);
            tracing::warn!(error = %e, "could not start tool");
            result.exit_code = e.exit_code();
            return not_run(result.clone(), e.to_string(), "step did not start");
        }
    };
    result.program = Some(program.display().to_string());
    // Hashed beside the tool's run, off the runtime's threads, the first time: a large binary
    // takes a while. Then it is known (one `stat` here, as resolving the program made).
    let cached = cached_sha256(&program);
    let hashing = cached.is_none().then(|| {
        let program = program.clone();
        tokio::task::spawn_blocking(move || program_sha256(&program))
    });

    if cancel.is_cancelled() {
        return not_run(
            result.clone(),
            CANCELLED_ERROR.to_string(),
            "step did not start",
        );
    }

    let log_dir = PathBuf::from(&spec.log_dir);
    let stdout_path = log_dir.join("stdout.log");
    let stderr_path = log_dir.join("stderr.log");
    result.stdout_path = Some(stdout_path.display().to_string());
    result.stderr_path = Some(stderr_path.display().to_string());

    let started = Instant::now();
    result.started_at = Some(Utc::now());
    let ran = run_tool(spec, &program, cfg, cancel, &stdout_path, &stderr_path).await;
    result.program_sha256 = match hashing {
        Some(hashing) => hashing.await.ok().flatten(),
        None => cached,
    };
    result.finished_at = Some(Utc::now());
    result.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);

    let ran = match ran {
        Ok(ran) => ran,
        Err(e) => {
            tracing::warn!(error = %e, "could not start tool");
            result.exit_code = e.exit_code();
            return not_run(result.clone(), e.to_string(), "step did not start");
        }
    };

    let (exit_code, signal) = exit_code_of(ran.status);
    result.exit_code = exit_code;
    result.signal = signal;
    result.timed_out = ran.ending == Ending::TimedOut;
    if ran.ending == Ending::Cancelled {
        result.error = Some(CANCELLED_ERROR.to_string());
    } else if let Some(e) = ran.log_error {
        result.error = Some(e);
    }
    result.log_tail = render_tail(&ran.stdout, &ran.stderr, cfg.tail_bytes);
    tracing::info!(
        exit_code,
        signal,
        timed_out = result.timed_out,
        cancelled = ran.ending == Ending::Cancelled,
        stdout_bytes = ran.stdout.total,
        stderr_bytes = ran.stderr.total,
        "tool finished"
    );

    let measured = measure_queries(spec).await;
    let spec = spec.clone();
    let earlier = prepared.earlier.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let finished = deferred::finish(
            &spec,
            &Prepared {
                spec: spec.clone(),
                secrets: Vec::new(),
                earlier,
            },
        );
        let logs = Logs {
            stdout: &stdout_path,
            stderr: &stderr_path,
        };
        // Keep each kept check's measured value beside it.
        let mut measured = measured;
        let measured: Vec<_> = finished
            .kept
            .iter()
            .map(|&i| measured.get_mut(i).and_then(Option::take))
            .collect();
        let report = validate::run_checks_measured(&finished.validations, &logs, &measured);
        let mut checks = finished.failed;
        checks.extend(report.checks);
        (finished.artefacts, ValidationReport::from_checks(checks))
    })
    .await;
    let report = match checked {
        Ok((artefacts, report)) => {
            result.artefacts.extend(artefacts);
            report
        }
        Err(e) => ValidationReport::from_checks(vec![executor_check(
            "validators",
            format!("the validators panicked: {e}"),
        )]),
    };
    if !result.succeeded() || report.status == ReportStatus::Fail {
        let (stdout, stdout_first_line) = ran.stdout.text_from_line();
        let (stderr, stderr_first_line) = ran.stderr.text_from_line();
        let fact = classify::classify(
            &prepared.spec.failures,
            &AttemptLog {
                exit_code: result.exit_code,
                signal: result.signal,
                timed_out: result.timed_out,
                stdout: &stdout,
                stdout_first_line,
                stderr: &stderr,
                stderr_first_line,
            },
        );
        tracing::info!(class = %fact.class, rule = %fact.rule, "failure classified");
        result.failure = Some(fact);
    }
    StepOutcome {
        schema_version: SCHEMA_VERSION,
        result: result.clone(),
        report,
    }
}

/// The sha256 of the program file, cached by path, size and modification time (hashing a
/// large interpreter on every attempt would cost more than running a short step).
fn program_sha256(program: &Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    let key = sha256_key(program)?;
    if let Some(h) = sha256_cache().lock().ok()?.get(&key) {
        return Some(h.clone());
    }
    let mut file = std::fs::File::open(program).ok()?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).ok()?;
    let hex = hex::encode(hasher.finalize());
    sha256_cache().lock().ok()?.insert(key, hex.clone());
    Some(hex)
}

/// What [`program_sha256`] caches a hash by: the path, the size and the modification time.
type Sha256Key = (PathBuf, u64, Option<SystemTime>);

fn sha256_cache() -> &'static Mutex<HashMap<Sha256Key, String>> {
    static CACHE: OnceLock<Mutex<HashMap<Sha256Key, String>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn sha256_key(program: &Path) -> Option<Sha256Key> {
    let meta = std::fs::metadata(program).ok()?;
    Some((program.to_path_buf(), meta.len(), meta.modified().ok()))
}

/// The program's hash when [`program_sha256`] already made it for the file as it is now.
fn cached_sha256(program: &Path) -> Option<String> {
    let key = sha256_key(program)?;
    sha256_cache().lock().ok()?.get(&key).cloned()
}

/// Runs the query of every `sql` check (one connection each, bounded by the check's
/// `timeout_s`); other checks get `None`. The database URL comes from the environment the tool
/// saw (the spec's `env` over the worker's own) and is never reported.
async fn measure_queries(spec: &StepSpec) -> Vec<Option<validate::Measured>> {
    let mut out = Vec::with_capacity(spec.validations.len());
    for v in &spec.validations {
        let CheckSpec::Sql {
            query,
            database_url_env,
            database_url_default,
            search_path_env,
            search_path_default,
            timeout_s,
            ..
        } = &v.check
        else {
            out.push(None);
            continue;
        };
        let env = |name: &str| {
            spec.env
                .get(name)
                .cloned()
                .or_else(|| std::env::var(name).ok())
                .filter(|v| !v.is_empty())
        };
        let Some(url) = env(database_url_env).or_else(|| database_url_default.clone()) else {
            out.push(Some(Err(format!(
                "environment variable `{database_url_env}` is not set: set it to the database URL"
            ))));
            continue;
        };
        let search_path = search_path_env
            .as_deref()
            .and_then(env)
            .or_else(|| search_path_default.clone());
        let limit = Duration::from_secs((*timeout_s).max(1));
        let measured =
            match tokio::time::timeout(limit, scalar_query(&url, search_path.as_deref(), query))
                .await
            {
                Ok(m) => m,
                Err(_) => Err(format!("{DB_UNREACHABLE}: no answer within {timeout_s} s")),
            };
        tracing::info!(check = %v.name, ok = measured.is_ok(), "sql check measured");
        out.push(Some(measured));
    }
    out
}

/// Connects, optionally sets the `search_path`, and returns the first column of the first row
/// as text. Errors name what failed, never the URL.
async fn scalar_query(
    url: &str,
    search_path: Option<&str>,
    query: &str,
) -> Result<Option<String>, String> {
    // Connection-class errors (08…), the server shutting down or out of resources (57P…,
    // 53…) and a closed connection mean the data was never looked at.
    let describe = |e: tokio_postgres::Error| {
        let unreachable = e.is_closed()
            || e.code().is_some_and(|c| {
                let c = c.code();
                c.starts_with("08") || c.starts_with("57P") || c.starts_with("53")
            });
        let text = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => e.to_string(),
        };
        if unreachable {
            format!("{DB_UNREACHABLE}: {text}")
        } else {
            text
        }
    };
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|_| "the database URL is not a valid PostgreSQL URL".to_string())?;
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
        let text = describe(e);
        let text = text
            .strip_prefix(DB_UNREACHABLE)
            .and_then(|t| t.strip_prefix(": "))
            .unwrap_or(&text);
        format!("{DB_UNREACHABLE} (cannot connect): {text}")
    })?;
    let conn = tokio::spawn(connection);
    let result = async {
        if let Some(schema) = search_path {
            let ident = schema.replace('"', "\"\"");
            client
                .batch_execute(&format!("SET search_path TO \"{ident}\""))
                .await
                .map_err(describe)?;
        }
        let messages = client.simple_query(query).await.map_err(describe)?;
        for m in messages {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                return match row.try_get(0) {
                    Ok(v) => Ok(v.map(str::to_string)),
                    Err(e) => Err(describe(e)),
                };
            }
        }
        Err("the query returned no rows".to_string())
    }
    .await;
    drop(client);
    conn.abort();
    result
}

/// How long to wait for the tool's pipes to close once the tool has exited, before killing what
/// is left of its process group (a background grandchild holding them open).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long to wait for the pipe readers once nothing is left that could write to them. Bounds
/// the drain when a process escaped the group (`setsid`) while holding a pipe.
const DRAIN_HARD_LIMIT: Duration = Duration::from_secs(2);

/// How often the group is polled while waiting for it to exit after `SIGTERM`.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// The size of one read from a tool's pipe.
const CHUNK_BYTES: usize = 64 * 1024;

/// How the tool's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exited,
    TimedOut,
    Cancelled,
}

/// What running the tool produced.
struct Ran {
    status: ExitStatus,
    ending: Ending,
    stdout: StreamTail,
    stderr: StreamTail,
    /// A failure to write a log file, or a reader that had to be abandoned.
    log_error: Option<String>,
}

/// The result fields every outcome shares.
fn base_result(spec: &StepSpec, cfg: &ExecConfig) -> StepResult {
    StepResult {
        artefacts: spec.artefacts.clone(),
        run_id: Some(spec.run_id),
        attempt_id: Some(spec.attempt_id),
        attempt: spec.attempt,
        worker_id: cfg.worker_id.clone(),
        ..StepResult::new(&spec.step_id, -1)
    }
}

/// An outcome for a tool that never ran: the error, and a report that fails because of it.
fn not_run(mut result: StepResult, error: String, check_name: &str) -> StepOutcome {
    let report = ValidationReport::from_checks(vec![executor_check(check_name, error.clone())]);
    result.error = Some(error);
    StepOutcome {
        schema_version: SCHEMA_VERSION,
        result,
        report,
    }
}

fn executor_check(name: &str, detail: String) -> Check {
    Check {
        name: name.to_string(),
        kind: EXECUTOR_CHECK_KIND.to_string(),
        severity: Severity::Error,
        passed: false,
        detail,
        value: None,
    }
}

/// Why this worker may not run `spec` at all, so that it should hand the step back for another
/// worker rather than fail it: its command is not on the allowlist, or is allowed but does not
/// resolve here. `None` for anything else, including problems every worker would have (an
/// unresolved secret, a path outside the workdir): [`run_step`] reports those as failures.
/// Secret values resolved for the check are redacted from the reason. A worker whose reaper
/// exited may run nothing: its tools would not die with it.
pub fn unrunnable(spec: &StepSpec, cfg: &ExecConfig) -> Option<String> {
    if cfg.reaper.as_ref().is_some_and(|r| !r.alive()) {
        return Some(format!(
            "worker `{}` lost its reaper: its tools would not die with it, so it runs nothing until restarted",
            cfg.worker_id
        ));
    }
    let prepared = deferred::prepare(spec, cfg.secrets_dir.as_deref()).ok()?;
    let reason = match check_allowed(&prepared.spec, cfg, &cfg.allow_entries()) {
        Err(refusal @ SpecRefusal::NotAllowed { .. }) => refusal.to_string(),
        Ok(Err(missing @ ResolveError::NotFound { .. })) => missing.to_string(),
        Err(_) | Ok(Ok(_)) | Ok(Err(ResolveError::Io { .. })) => return None,
    };
    Some(redact(&reason, &prepared.secrets))
}

/// The outcome a worker publishes for a step it hands back without running it (see
/// [`unrunnable`]): `refused`, the reason in `error`, and a failing report.
pub fn handed_back(spec: &StepSpec, cfg: &ExecConfig, reason: String) -> StepOutcome {
    let mut outcome = not_run(base_result(spec, cfg), reason, "step refused");
    outcome.result.refused = true;
    outcome
}

/// Checks the spec's command and arguments against the allowlist, `cfg`'s entries as
/// [`ExecConfig::allow_entries`] parsed them. `Ok` holds the command's resolution: the program
/// to run, or why it cannot be found (reported as exit 127 by the caller, since the command is
/// allowed).
pub fn check_allowed(
    spec: &StepSpec,
    cfg: &ExecConfig,
    entries: &[AllowEntry],
) -> Result<Result<PathBuf, ResolveError>, SpecRefusal> {
    let resolved = resolve_command(&spec.command, &cfg.tools_dirs);
    let program = resolved.as_ref().ok().map(PathBuf::as_path);
    let cwd = lexical_absolute(
        &std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        Path::new(&spec.cwd),
    );
    if entries
        .iter()
        .any(|e| e.allows(&spec.command, program, &spec.args, &cwd, &cfg.tools_dirs))
    {
        return Ok(resolved);
    }
    let allowed = if entries.is_empty() {
        "nothing".to_string()
    } else {
        entries
            .iter()
            .map(|e| format!("`{}`", e.text))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Entries for this program whose pinned arguments did not match.
    let pinned: Vec<&AllowEntry> = entries
        .iter()
        .filter(|e| {
            !e.prefix.is_empty()
                && e.allows(&spec.command, program, &e.prefix, &cwd, &cfg.tools_dirs)
        })
        .collect();
    let mut command = spec.command.clone();
    let mut hint = String::new();
    if !pinned.is_empty() {
        let shown: Vec<&str> = spec.args.iter().take(2).map(String::as_str).collect();
        command = format!("{command} {}", shown.join(" "));
        hint = format!(
            "; `{}` is allowed only with the arguments its entry pins ({}), not `{}`",
            spec.command,
            pinned
                .iter()
                .map(|e| format!("`{}`", e.prefix.join(" ")))
                .collect::<Vec<_>>()
                .join(" or "),
            shown.join(" ")
        );
        if matches!(shown.first(), Some(&("-c" | "-e" | "-m" | "--eval" | "-"))) {
            hint.push_str(": inline code is never allowed through a pinned interpreter");
        }
    }
    Err(SpecRefusal::NotAllowed {
        command,
        allowed,
        hint,
    })
}

/// Devices a tool may always be pointed at (`--out /dev/stdout`).
const DEVICE_PATHS: [&str; 4] = ["/dev/null", "/dev/stdin", "/dev/stdout", "/dev/stderr"];

/// The path an argument names, if it names one: an absolute path, a relative one that climbs
/// with `..`, or a `file://` URL (percent-decoded), alone or as an option's value: `--flag=VALUE`,
/// a short option glued to it (`-oVALUE`, `-o/abs`), or a `name=VALUE` operand (`if=/p`).
/// Anything else (`2024-01`, `https://…`, `out/x.csv`, `-n2`) is not a path that could leave
/// the run.
fn arg_path(arg: &str) -> Option<String> {
    if let Some(long) = arg.strip_prefix("--") {
        return path_value(long.split_once('=')?.1);
    }
    if let Some(short) = arg.strip_prefix('-') {
        // `-o=/p`, `-o/p`: what follows the option letter (or its `=`).
        let value = match short.split_once('=') {
            Some((_, v)) => v,
            None => short.get(short.chars().next()?.len_utf8()..)?,
        };
        return path_value(value);
    }
    path_value(arg).or_else(|| {
        let (name, value) = arg.split_once('=')?;
        let plain = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if plain { path_value(value) } else { None }
    })
}

/// [`arg_path`]'s test of one value.
fn path_value(value: &str) -> Option<String> {
    if let Some(rest) = value.strip_prefix("file:") {
        // file:///p, file://localhost/p and file:/p; another host is not a local path and is
        // kept as written, so it fails the check below.
        let rest = rest
            .strip_prefix("//localhost")
            .or_else(|| rest.strip_prefix("//").filter(|r| r.starts_with('/')))
            .unwrap_or(rest);
        let rest = rest.split(['?', '#']).next().unwrap_or(rest);
        return Some(percent_decode(rest));
    }
    let climbs = Path::new(value)
        .components()
        .any(|c| c == std::path::Component::ParentDir);
    (value.starts_with('/') || climbs).then(|| value.to_string())
}

/// `%2e` → `.`: a `file://` URL is checked as the path it opens, not as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// With [`ExecConfig::confine_args`], checks that every literal path among the arguments
/// ([`arg_path`]) stays under the step's workdir, its input roots, the tools dirs or a
/// `--path-root`, so a submitted pipeline (or a submitted `--var`) cannot point an allowed tool
/// at `/etc` or another run. A relative path is taken from the step's `cwd`, where the tool
/// starts; an argument an allowlist entry pins (an interpreter's script) is the operator's own
/// and always passes; arguments the worker resolves itself (secrets) are not paths it checks.
/// `entries` are `cfg`'s, parsed ([`ExecConfig::allow_entries`]).
///
/// A refusal fails the step (the run halts), it is not handed back to another worker: which
/// paths a step names is the pipeline's doing, and every worker of a pool is expected to
/// share its `--path-root`s (as they share the data mount those name), so another worker would
/// refuse it alike; the coordinator does not know workers' path roots to route by them.
pub fn check_args(
    spec: &StepSpec,
    cfg: &ExecConfig,
    entries: &[AllowEntry],
) -> Result<(), SpecRefusal> {
    if !cfg.confine_args {
        return Ok(());
    }
    let here = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let cwd = lexical_absolute(&here, Path::new(&spec.cwd));
    let mut roots: Vec<PathBuf> = std::iter::once(&spec.workdir)
        .chain(spec.input_roots.iter())
        .filter(|r| !r.is_empty())
        .map(|r| lexical_absolute(&here, Path::new(r)))
        .collect();
    roots.extend(cfg.tools_dirs.iter().chain(&cfg.path_roots).cloned());
    let pinned: BTreeSet<&str> = entries
        .iter()
        .flat_map(|e| e.prefix.iter().map(String::as_str))
        .collect();
    for (index, arg) in spec.args.iter().enumerate() {
        if spec.deferred.contains(&format!("args[{index}]")) {
            continue;
        }
        let Some(path) = arg_path(arg) else { continue };
        let abs = lexical_absolute(&cwd, Path::new(&path));
        if DEVICE_PATHS.iter().any(|d| abs == Path::new(d))
            || pinned.contains(abs.display().to_string().as_str())
            || confined(&cwd, &abs, &roots)
        {
            continue;
        }
        return Err(SpecRefusal::ArgEscapes {
            index,
            arg: arg.clone(),
            path: abs.display().to_string(),
            workdir: spec.workdir.clone(),
            roots: roots
                .iter()
                .skip(1)
                .map(|r| format!("`{}`", r.display()))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(())
}

/// Checks that every path of the spec lies lexically under its workdir (or, for inputs, an input
/// root), with the one confinement check of [`warpline_shared::paths`].
///
/// Relative paths are taken from the worker's current directory, as the operating system takes
/// them when the tool is started, the logs are written and the checks read. Symbolic links are
/// not followed: the check is lexical, by design, so it needs no filesystem access.
fn check_paths(spec: &StepSpec) -> Result<(), SpecRefusal> {
    if spec.workdir.is_empty() {
        return Err(SpecRefusal::EmptyWorkdir);
    }
    let here = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let root = [Path::new(&spec.workdir)];
    let roots: Vec<&Path> = std::iter::once(Path::new(&spec.workdir))
        .chain(
            spec.input_roots
                .iter()
                .filter(|r| !r.is_empty())
                .map(Path::new),
        )
        .collect();
    let under_root = |field: String, path: &str| -> Result<(), SpecRefusal> {
        if confined(&here, Path::new(path), &root) {
            Ok(())
        } else {
            Err(SpecRefusal::PathEscapes {
                field,
                path: path.to_string(),
                workdir: spec.workdir.clone(),
            })
        }
    };
    // Artefacts and checked paths may also be operator inputs under an input root.
    let confined = |field: String, path: &str| -> Result<(), SpecRefusal> {
        if confined(&here, Path::new(path), &roots) {
            Ok(())
        } else {
            Err(SpecRefusal::PathEscapes {
                field,
                path: path.to_string(),
                workdir: spec.workdir.clone(),
            })
        }
    };
    under_root("cwd".into(), &spec.cwd)?;
    under_root("log_dir".into(), &spec.log_dir)?;
    // Files the worker writes for the tool (a backfill-level step's partitions file): only
    // absolute paths under the workdir.
    for path in spec.files.keys() {
        if !Path::new(path).is_absolute() {
            return Err(SpecRefusal::PathEscapes {
                field: "files".into(),
                path: path.clone(),
                workdir: spec.workdir.clone(),
            });
        }
        under_root("files".into(), path)?;
    }
    for (name, path) in &spec.artefacts {
        confined(format!("artefacts.{name}"), path)?;
    }
    for (name, d) in &spec.dynamic_artefacts {
        under_root(format!("dynamic_artefacts.{name}.record"), &d.record)?;
        if let Some(g) = &d.glob {
            let field = format!("dynamic_artefacts.{name}.glob");
            if dotdot_after_wildcard(Path::new(g)) {
                return Err(SpecRefusal::AmbiguousGlob {
                    field,
                    path: g.clone(),
                });
            }
            under_root(field, g)?;
        }
        if let Some(f) = &d.file {
            under_root(format!("dynamic_artefacts.{name}.file"), f)?;
        }
    }
    for (i, v) in spec.validations.iter().enumerate() {
        // A path that targets a dynamic artefact is checked once it is resolved.
        if spec.deferred.contains(&format!("validations[{i}].path")) {
            continue;
        }
        match &v.check {
            CheckSpec::FileExists { path }
            | CheckSpec::FileSizeMin { path, .. }
            | CheckSpec::JsonPath { path, .. }
            | CheckSpec::YamlPath { path, .. }
            | CheckSpec::ParquetRows { path, .. } => {
                confined(format!("validations[{i}].path"), path)?;
            }
            CheckSpec::FileCount { glob, .. } => {
                let field = format!("validations[{i}].glob");
                if dotdot_after_wildcard(Path::new(glob)) {
                    return Err(SpecRefusal::AmbiguousGlob {
                        field,
                        path: glob.clone(),
                    });
                }
                confined(field, glob)?;
            }
            CheckSpec::LogRegexAbsent { .. }
            | CheckSpec::LogRegexPresent { .. }
            | CheckSpec::Sql { .. } => {}
        }
    }
    Ok(())
}

/// True when a glob has a `..` component after one holding a wildcard: `a/**/..` may be `a/..`.
fn dotdot_after_wildcard(glob: &Path) -> bool {
    let mut seen_wildcard = false;
    for component in glob.components() {
        match component {
            Component::ParentDir if seen_wildcard => return true,
            Component::Normal(name) => {
                let name = name.to_string_lossy();
                if name.contains(['*', '?', '[']) {
                    seen_wildcard = true;
                }
            }
            _ => {}
        }
    }
    false
}

impl From<ResolveError> for SpawnError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::NotFound { command, looked_in } => {
                SpawnError::NotFound { command, looked_in }
            }
            ResolveError::Io { command, source } => SpawnError::Other { command, source },
        }
    }
}

/// Sends `SIGKILL` to the tool's process group if the attempt is dropped before it ends (the
/// worker's task was aborted), so no part of the tool outlives its attempt; and, however the
/// attempt ends, takes the group off the reaper's list.
struct GroupGuard<'a> {
    pgid: Option<Pid>,
    /// The reaper the group is registered with.
    registered: Option<(&'a Reaper, Pid)>,
}

impl GroupGuard<'_> {
    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        if let Some((reaper, pgid)) = self.registered {
            // A reaper that is gone has nothing to forget.
            let _ = reaper.unregister(pgid);
        }
    }
}

/// What the tool needs on disk before it starts, made in one trip to the blocking pool (not
/// one per directory and file: each trip is two thread wake-ups, on every step): its working
/// directory, its log directory and two empty log files (returned, for the pipes' copies), the
/// spec's files, and no stale report of its dynamic artefacts.
async fn make_files(
    spec: &StepSpec,
    stdout_path: &Path,
    stderr_path: &Path,
) -> Result<(tokio::fs::File, tokio::fs::File), SpawnError> {
    let cwd = PathBuf::from(&spec.cwd);
    let log_dir = PathBuf::from(&spec.log_dir);
    let (stdout_path, stderr_path) = (stdout_path.to_path_buf(), stderr_path.to_path_buf());
    let files: Vec<(PathBuf, String)> = (spec.files.iter())
        .map(|(path, content)| (PathBuf::from(path), content.clone()))
        .collect();
    let artefacts_file = (spec.dynamic_artefacts.values())
        .filter(|d| d.step_id == spec.step_id)
        .find_map(|d| d.file.as_ref())
        .map(PathBuf::from);
    let made = tokio::task::spawn_blocking(move || {
        let prepare = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| SpawnError::Prepare { what, path, source }
        };
        std::fs::create_dir_all(&cwd).map_err(prepare("cwd", &cwd))?;
        std::fs::create_dir_all(&log_dir).map_err(prepare("log_dir", &log_dir))?;
        let stdout =
            std::fs::File::create(&stdout_path).map_err(prepare("stdout log", &stdout_path))?;
        let stderr =
            std::fs::File::create(&stderr_path).map_err(prepare("stderr log", &stderr_path))?;
        for (path, content) in &files {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(prepare("a file for the tool", dir))?;
            }
            std::fs::write(path, content).map_err(prepare("a file for the tool", path))?;
        }
        if let Some(file) = artefacts_file {
            let _ = std::fs::remove_file(file);
        }
        Ok((stdout, stderr))
    })
    .await;
    match made {
        Ok(Ok((stdout, stderr))) => Ok((
            tokio::fs::File::from_std(stdout),
            tokio::fs::File::from_std(stderr),
        )),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(SpawnError::Prepare {
            what: "the tool's directories and files",
            path: PathBuf::from(&spec.cwd),
            source: io::Error::other(e),
        }),
    }
}

async fn run_tool(
    spec: &StepSpec,
    program: &Path,
    cfg: &ExecConfig,
    cancel: &CancellationToken,
    stdout_path: &Path,
    stderr_path: &Path,
) -> Result<Ran, SpawnError> {
    let program = program.to_path_buf();
    let cwd = Path::new(&spec.cwd);
    let (stdout_file, stderr_file) = make_files(spec, stdout_path, stderr_path).await?;
    let mut command = tokio::process::Command::new(&program);
    command.args(&spec.args).current_dir(cwd).envs(&spec.env);
    // A tool that decides its artefacts' names reports them here.
    if let Some(file) = spec
        .dynamic_artefacts
        .values()
        .filter(|d| d.step_id == spec.step_id)
        .find_map(|d| d.file.as_ref())
    {
        command.env(ARTEFACTS_FILE_ENV, file);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // If this worker dies (SIGKILL, the OOM killer), its tool dies with it: the broker hands
    // the step to another worker, and two copies must never write the same artefacts at once.
    // With a reaper, the group is registered with it right after the spawn (see below), and
    // std spawns with `posix_spawn`. Without one, the tool gets a parent-death signal, which
    // follows the spawning thread (a runtime worker thread that lives as long as the worker);
    // the hook makes std fork this whole process.
    if cfg.reaper.is_none() {
        // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
        // async-signal-safe and touches no memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGKILL))
                    .map_err(io::Error::from)
            });
        }
    }
    let mut child = command.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => SpawnError::NotFound {
            command: spec.command.clone(),
            looked_in: format!("`{}`, or its interpreter is missing", program.display()),
        },
        io::ErrorKind::PermissionDenied => SpawnError::PermissionDenied {
            command: spec.command.clone(),
            path: program.clone(),
            source,
        },
        _ => SpawnError::Other {
            command: spec.command.clone(),
            source,
        },
    })?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    // Declared after `child`, so it is dropped first, while the leader is not yet reaped and the
    // group id still names this tool's group.
    let mut guard = GroupGuard {
        pgid,
        registered: None,
    };
    if let (Some(reaper), Some(pgid)) = (cfg.reaper.as_deref(), pgid) {
        // Nothing between the spawn and this write may await: until it is done, a worker
        // killed now would leave the tool running.
        match reaper.register(pgid) {
            Ok(()) => guard.registered = Some((reaper, pgid)),
            // The guard kills the group: unprotected, it must not run.
            Err(source) => {
                return Err(SpawnError::Unprotected {
                    command: spec.command.clone(),
                    source,
                });
            }
        }
    }
    tracing::debug!(program = %program.display(), pid = ?pgid, "tool started");

    let stdout_reader = tokio::spawn(copy_stream(
        child.stdout.take().expect("stdout is piped"),
        stdout_file,
        cfg.tail_bytes,
    ));
    let stderr_reader = tokio::spawn(copy_stream(
        child.stderr.take().expect("stderr is piped"),
        stderr_file,
        cfg.tail_bytes,
    ));

    let timeout = tokio::time::sleep(Duration::from_secs(spec.timeout_s));
    let (ending, waited) = tokio::select! {
        status = child.wait() => (Ending::Exited, status),
        () = timeout => {
            tracing::warn!(timeout_s = spec.timeout_s, "timed out; terminating the tool's process group");
            (Ending::TimedOut, terminate(&mut child, pgid, cfg.kill_grace).await)
        }
        () = cancel.cancelled() => {
            tracing::warn!("cancelled; terminating the tool's process group");
            (Ending::Cancelled, terminate(&mut child, pgid, cfg.kill_grace).await)
        }
    };
    let status = match waited {
        Ok(status) => status,
        Err(source) => {
            // Waiting on our own child cannot fail in practice; kill what is left and report it.
            let _ = child.start_kill();
            return Err(SpawnError::Other {
                command: spec.command.clone(),
                source,
            });
        }
    };

    let mut log_error = None;
    let mut readers = (stdout_reader, stderr_reader);
    if !drain(&mut readers, DRAIN_GRACE).await {
        // The tool exited but something it started still holds the pipes: kill the rest of
        // its group so the attempt leaves nothing behind.
        if let Some(pgid) = pgid {
            tracing::warn!("tool exited but its process group holds the logs open; killing it");
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        if !drain(&mut readers, DRAIN_HARD_LIMIT).await {
            readers.0.abort();
            readers.1.abort();
            log_error = Some(
                "a process outside the tool's group kept its output open; the logs may be incomplete"
                    .to_string(),
            );
        }
    }
    guard.disarm();
    let stdout = finish_reader(readers.0, "stdout", &mut log_error).await;
    let stderr = finish_reader(readers.1, "stderr", &mut log_error).await;
    Ok(Ran {
        status,
        ending,
        stdout,
        stderr,
        log_error,
    })
}

/// Sends `SIGTERM` to the group, waits up to `grace` for the leader to exit and the group to
/// empty, then sends `SIGKILL` to whatever is left and reaps the leader.
async fn terminate(
    child: &mut tokio::process::Child,
    pgid: Option<Pid>,
    grace: Duration,
) -> io::Result<ExitStatus> {
    let Some(pgid) = pgid else {
        // The child was already reaped: nothing to signal.
        return child.wait().await;
    };
    let _ = killpg(pgid, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    let mut status = None;
    loop {
        if status.is_none() {
            status = child.try_wait()?;
        }
        // Signal `None` only asks whether any member of the group is left.
        let group_alive = killpg(pgid, None).is_ok();
        if status.is_some() && !group_alive {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "still alive after SIGTERM; sending SIGKILL"
            );
            let _ = killpg(pgid, Signal::SIGKILL);
            break;
        }
        tokio::time::sleep(GROUP_POLL).await;
    }
    match status {
        Some(status) => Ok(status),
        None => child.wait().await,
    }
}

/// Waits up to `limit` for both readers to finish; true when they did.
async fn drain(
    readers: &mut (JoinHandle<CopyOutcome>, JoinHandle<CopyOutcome>),
    limit: Duration,
) -> bool {
    let both = async {
        while !(readers.0.is_finished() && readers.1.is_finished()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(limit, both).await.is_ok()
}

async fn finish_reader(
    reader: JoinHandle<CopyOutcome>,
    stream: &str,
    log_error: &mut Option<String>,
) -> StreamTail {
    match reader.await {
        Ok(outcome) => {
            if let Some(e) = outcome.error {
                log_error.get_or_insert(format!("cannot write the {stream} log: {e}"));
            }
            outcome.tail
        }
        // An aborted reader: its tail is lost, the error was already recorded.
        Err(_) => StreamTail::default(),
    }
}

/// What copying one stream produced.
struct CopyOutcome {
    tail: StreamTail,
    error: Option<io::Error>,
}

/// The last bytes of one stream, and how many it had in all.
#[derive(Debug, Default)]
struct StreamTail {
    /// Up to `cap` most recent bytes.
    bytes: VecDeque<u8>,
    /// Every byte the stream carried.
    total: u64,
    /// Every `\n` the stream carried, so a line of the tail can be named by its number in the
    /// log file.
    newlines: u64,
}

impl StreamTail {
    /// The tail as text, and the log file's line number of its first line.
    fn text_from_line(&self) -> (String, u64) {
        let (front, back) = self.bytes.as_slices();
        let raw: Vec<u8> = front.iter().chain(back).copied().collect();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let shown = text.lines().count() as u64;
        let ends_open = self.bytes.back().is_some_and(|&b| b != b'\n');
        let last = self.newlines + u64::from(ends_open);
        (text, (last + 1).saturating_sub(shown).max(1))
    }

    fn push(&mut self, chunk: &[u8], cap: usize) {
        self.total += chunk.len() as u64;
        self.newlines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        if chunk.len() >= cap {
            self.bytes.clear();
            self.bytes.extend(&chunk[chunk.len() - cap..]);
            return;
        }
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(cap);
        self.bytes.drain(..overflow);
        self.bytes.extend(chunk);
    }
}

/// Copies a pipe to its log file in chunks, keeping only a tail of at most `cap` bytes. After a
/// write error it keeps reading (so the tool is not blocked on a full pipe) but stops writing.
async fn copy_stream<R>(mut pipe: R, file: tokio::fs::File, cap: usize) -> CopyOutcome
where
    R: AsyncRead + Unpin,
{
    let mut file = tokio::io::BufWriter::with_capacity(CHUNK_BYTES, file);
    let mut tail = StreamTail::default();
    let mut error = None;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error.get_or_insert(e);
                break;
            }
        };
        let chunk = &buf[..n];
        tail.push(chunk, cap);
        if error.is_none()
            && let Err(e) = file.write_all(chunk).await
        {
            error = Some(e);
        }
    }
    if error.is_none()
        && let Err(e) = file.flush().await
    {
        error = Some(e);
    }
    CopyOutcome { tail, error }
}

/// Maps an exit status to the reported exit code and signal: `128 + signal` when a signal ended
/// the tool.
fn exit_code_of(status: ExitStatus) -> (i32, Option<i32>) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(signal)) => (128 + signal, Some(signal)),
        (None, None) => (-1, None),
    }
}

/// Renders the log tail: the last bytes of stdout, then of stderr, at most `budget` bytes of
/// text in all (plus short markers), lossy UTF-8.
///
/// Each stream is promised half the budget; what one stream does not use goes to the other.
/// A stream that was cut starts with `[... N bytes of stdout omitted ...]`.
fn render_tail(stdout: &StreamTail, stderr: &StreamTail, budget: usize) -> String {
    let (out_len, err_len) = (stdout.bytes.len(), stderr.bytes.len());
    let half = budget / 2;
    let (out_budget, err_budget) = if out_len + err_len <= budget {
        (out_len, err_len)
    } else if out_len <= half {
        (out_len, budget - out_len)
    } else if err_len <= budget - half {
        (budget - err_len, err_len)
    } else {
        (half, budget - half)
    };
    let mut tail = String::new();
    render_stream(&mut tail, "stdout", stdout, out_budget);
    if stderr.total > 0 {
        if !tail.is_empty() {
            if !tail.ends_with('\n') {
                tail.push('\n');
            }
            tail.push_str("[--- stderr ---]\n");
        }
        render_stream(&mut tail, "stderr", stderr, err_budget);
    }
    tail
}

fn render_stream(out: &mut String, name: &str, stream: &StreamTail, budget: usize) {
    let (front, back) = stream.bytes.as_slices();
    let mut raw = Vec::with_capacity(budget.min(stream.bytes.len()));
    let skip = stream.bytes.len().saturating_sub(budget);
    raw.extend(front.iter().chain(back).skip(skip));
    let mut dropped = stream.total - raw.len() as u64;
    // A cut may fall inside a character: drop its continuation bytes rather than show U+FFFD.
    let mut start = 0;
    if dropped > 0 {
        while start < 3 && raw.get(start).is_some_and(|b| b & 0xC0 == 0x80) {
            start += 1;
        }
    }
    let (text, lost) = lossy_within(&raw[start..], budget);
    dropped += (start + lost) as u64;
    if dropped > 0 {
        out.push_str(&format!("[... {dropped} bytes of {name} omitted ...]\n"));
    }
    out.push_str(&text);
}

/// Converts `raw` to text with U+FFFD for invalid bytes, dropping bytes from the front so the
/// text is at most `budget` bytes long. Returns the text and how many raw bytes were dropped.
fn lossy_within(raw: &[u8], budget: usize) -> (String, usize) {
    const REPLACEMENT_LEN: usize = '\u{FFFD}'.len_utf8();
    let text_len: usize = raw
        .utf8_chunks()
        .map(|c| {
            c.valid().len()
                + if c.invalid().is_empty() {
                    0
                } else {
                    REPLACEMENT_LEN
                }
        })
        .sum();
    let mut excess = text_len.saturating_sub(budget);
    let mut dropped = 0;
    let mut text = String::with_capacity(text_len.min(budget));
    for chunk in raw.utf8_chunks() {
        let valid = chunk.valid();
        if excess == 0 {
            text.push_str(valid);
        } else if excess >= valid.len() {
            excess -= valid.len();
            dropped += valid.len();
        } else {
            let mut cut = excess;
            while !valid.is_char_boundary(cut) {
                cut += 1;
            }
            dropped += cut;
            excess = 0;
            text.push_str(&valid[cut..]);
        }
        if !chunk.invalid().is_empty() {
            if excess == 0 {
                text.push('\u{FFFD}');
            } else {
                excess = excess.saturating_sub(REPLACEMENT_LEN);
                dropped += chunk.invalid().len();
            }
        }
    }
    (text, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_argument_names_a_path_alone_or_as_any_options_value() {
        for (arg, path) in [
            ("/etc/passwd", "/etc/passwd"),
            ("../x", "../x"),
            ("file:///etc/passwd", "/etc/passwd"),
            ("--out=/abs", "/abs"),
            ("-o/abs", "/abs"),
            ("-o=/abs", "/abs"),
            ("-o../up", "../up"),
            ("-ofile:///etc/p%61sswd", "/etc/passwd"),
            ("if=/dev/sda", "/dev/sda"),
        ] {
            assert_eq!(arg_path(arg).as_deref(), Some(path), "{arg}");
        }
        for arg in [
            "2024-01",
            "-n2",
            "-xvf",
            "--flag",
            "-",
            "--",
            "out/x.csv",
            "https://h/p",
            "k=v",
            "--out",
            "x=y/z",
            "a b=/x",
        ] {
            assert_eq!(arg_path(arg), None, "{arg}");
        }
    }

    fn tail_of(bytes: &[u8], cap: usize) -> StreamTail {
        let mut t = StreamTail::default();
        for chunk in bytes.chunks(7) {
            t.push(chunk, cap);
        }
        t
    }

    #[test]
    fn stream_tail_keeps_last_bytes() {
        let t = tail_of(b"0123456789abcdefghij", 5);
        assert_eq!(t.total, 20);
        assert_eq!(t.bytes.iter().copied().collect::<Vec<_>>(), b"fghij");
        let mut big = StreamTail::default();
        big.push(b"0123456789", 4);
        assert_eq!(big.bytes.iter().copied().collect::<Vec<_>>(), b"6789");
    }

    #[test]
    fn tail_is_whole_when_it_fits() {
        let out = tail_of(b"hello\n", 100);
        let err = tail_of(b"oops\n", 100);
        assert_eq!(
            render_tail(&out, &err, 100),
            "hello\n[--- stderr ---]\noops\n"
        );
        let none = StreamTail::default();
        assert_eq!(render_tail(&out, &none, 100), "hello\n");
        assert_eq!(render_tail(&none, &err, 100), "oops\n");
    }

    #[test]
    fn tail_shares_the_budget() {
        let out = tail_of(&[b'o'; 1000], 100);
        let err = tail_of(b"short error\n", 100);
        let tail = render_tail(&out, &err, 100);
        assert!(
            tail.starts_with("[... 912 bytes of stdout omitted ...]\n"),
            "{tail}"
        );
        assert!(tail.ends_with("[--- stderr ---]\nshort error\n"), "{tail}");
        let both = render_tail(&out, &tail_of(&[b'e'; 1000], 100), 100);
        assert!(
            both.contains("[... 950 bytes of stdout omitted ...]"),
            "{both}"
        );
        assert!(
            both.contains("[... 950 bytes of stderr omitted ...]"),
            "{both}"
        );
        assert_eq!(
            both,
            format!(
                "[... 950 bytes of stdout omitted ...]\n{}\n[--- stderr ---]\n[... 950 bytes of stderr omitted ...]\n{}",
                "o".repeat(50),
                "e".repeat(50)
            )
        );
    }

    #[test]
    fn tail_stays_within_budget_for_binary_output() {
        let junk: Vec<u8> = (0..10_000u32).map(|i| (i % 256) as u8).collect();
        let out = tail_of(&junk, 1000);
        let tail = render_tail(&out, &StreamTail::default(), 1000);
        let body = tail.split_once("...]\n").unwrap().1;
        assert!(body.len() <= 1000, "{}", body.len());
        assert!(tail.starts_with("[... "), "{tail}");
    }

    #[test]
    fn tail_does_not_split_characters() {
        let text = "é".repeat(100);
        let out = tail_of(text.as_bytes(), 11);
        let tail = render_tail(&out, &StreamTail::default(), 11);
        assert_eq!(
            tail,
            format!("[... 190 bytes of stdout omitted ...]\n{}", "é".repeat(5))
        );
    }

    fn spec(command: &str, args: &[&str]) -> StepSpec {
        StepSpec {
            schema_version: SCHEMA_VERSION,
            run_id: Default::default(),
            step_id: "EXTRACT".into(),
            attempt: 1,
            attempt_id: Default::default(),
            command: command.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: Default::default(),
            cwd: "/w/runs/2024-01".into(),
            timeout_s: 5,
            artefacts: Default::default(),
            validations: Vec::new(),
            log_dir: "/w/logs".into(),
            workdir: "/w".into(),
            input_roots: Vec::new(),
            pool: "default".into(),
            trace: Default::default(),
            deferred: Vec::new(),
            dynamic_artefacts: Default::default(),
            files: Default::default(),
            failures: Default::default(),
        }
    }

    #[test]
    fn a_worker_hands_back_only_what_it_may_not_run() {
        let cfg = ExecConfig::new("w1", ["sh -c true".to_string(), "no-such-tool-xyz".into()]);
        // Allowed and resolvable: run it (even if it then fails for another reason).
        assert_eq!(unrunnable(&spec("sh", &["-c", "true"]), &cfg), None);
        // Not on the allowlist: hand it back.
        let not_allowed = unrunnable(&spec("load-batch", &[]), &cfg).unwrap();
        assert!(
            not_allowed.contains("`load-batch` is not on this worker's allowlist"),
            "{not_allowed}"
        );
        // A pinned entry's arguments do not match: hand it back.
        assert!(unrunnable(&spec("sh", &["-c", "rm -rf /"]), &cfg).is_some());
        // Allowed, but the command does not resolve on this worker: hand it back.
        let missing = unrunnable(&spec("no-such-tool-xyz", &[]), &cfg).unwrap();
        assert!(missing.contains("not found"), "{missing}");
        // A path outside the workdir is every worker's problem: not handed back.
        let mut escapes = spec("sh", &["-c", "true"]);
        escapes.cwd = "/elsewhere".into();
        assert_eq!(unrunnable(&escapes, &cfg), None);
        let out = handed_back(&spec("load-batch", &[]), &cfg, not_allowed.clone());
        assert!(out.result.refused);
        assert_eq!(out.result.error.as_deref(), Some(not_allowed.as_str()));
        assert_eq!(out.report.status, ReportStatus::Fail);
    }

    #[test]
    fn files_for_the_tool_must_lie_under_the_workdir() {
        let mut s = spec("true", &[]);
        s.files
            .insert("/w/runs/_after/partitions.json".into(), "{}".into());
        assert!(check_paths(&s).is_ok());
        for bad in ["/w/../etc/cron.d/x", "/etc/passwd", "relative.json"] {
            let mut s = spec("true", &[]);
            s.files.insert(bad.into(), "{}".into());
            let err = check_paths(&s).unwrap_err().to_string();
            assert!(err.contains("files"), "{bad}: {err}");
        }
    }

    #[test]
    fn dotdot_after_a_wildcard_is_ambiguous() {
        assert!(dotdot_after_wildcard(Path::new("/w/**/../x")));
        assert!(!dotdot_after_wildcard(Path::new("/w/../w/*.csv")));
    }

    #[test]
    fn exit_codes_and_signals() {
        assert_eq!(exit_code_of(ExitStatus::from_raw(0)), (0, None));
        assert_eq!(exit_code_of(ExitStatus::from_raw(3 << 8)), (3, None));
        assert_eq!(exit_code_of(ExitStatus::from_raw(9)), (137, Some(9)));
        assert_eq!(exit_code_of(ExitStatus::from_raw(15)), (143, Some(15)));
    }
}
