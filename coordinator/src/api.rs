//! The coordinator's HTTP API (fleet mode): JSON over HTTP/1, mounted by `warpline serve` and
//! used by the operator commands (`warpline submit`, `status`, `watch`, `escalations`,
//! `resolve`, `cancel`, `retry-failed`).
//!
//! Handlers own no state. Each turns a request into one [`Event`] for the engine's loop and
//! waits, bounded by [`EngineHandle`]'s timeout, for the loop's answer; the loop answers only
//! after the turn that applied the command is durable. A loop that does not answer in time (or
//! has stopped) is a 503, never a hung request.
//!
//! | route | engine | answer |
//! | --- | --- | --- |
//! | `POST /v1/backfills` ([`SubmitRequest`]) | `Event::Submit` | 201 [`SubmitResponse`] |
//! | `GET /v1/backfills` | `Status { None }` | 200 `[Summary]` |
//! | `GET /v1/backfills/{id}` | `Status { Some(id) }` | 200 `Summary` |
//! | `POST /v1/backfills/{id}/cancel` | `Cancel` | 200 `Summary` |
//! | `POST /v1/backfills/{id}/retry-failed` | `RetryFailed` | 200 `{backfill_id, resumed}` |
//! | `POST /v1/backfills/{id}/reprocess` ([`ReprocessRequest`]) | `Reprocess` | 201 [`ReprocessResponse`]: a new backfill |
//! | `GET /v1/escalations` | `Escalations` | 200 `[Escalation]` |
//! | `POST /v1/runs/{id}/resolve` ([`ResolveRequest`]) | `Resolve` | 200 [`ResolveResponse`] |
//! | `POST /v1/backfills/{id}/resolve` ([`ResolveBackfillRequest`]) | `ResolveBackfill` | 200 [`ResolveBackfillResponse`] |
//! | `GET /v1/workers` | — | the workers heard from recently (heartbeats) |
//! | `GET /v1/fleet` | `Workers` | 200 [`FleetView`]: workers and pools, with queue depths |
//! | `GET /v1/metrics` ([`metrics_router`], fleet mode) | — | 200 [`LatencySnapshot`] |
//! | `GET /v1/openapi.json` | — | 200 this API's OpenAPI 3 document ([`ApiDoc`]) |
//! | `GET /healthz` | — | 200 while the process lives |
//! | `GET /readyz` | — | 200 once [`ReadyFlag`] is set, else 503 |
//!
//! Every error is `{"error": "..."}` ([`ErrorBody`]): 400 for a bad request (the message names
//! the field, or the config file and JSON path), 403 for a pipeline `serve` does not allow
//! ([`ApiPolicy`]), 404 for an unknown id, 409 when the engine refuses the command, 413 for a
//! body over `--max-body-bytes` or a backfill over `--max-partitions`, 503 when the loop does
//! not answer — and at once, for every `/v1/*` route, while the coordinator is not ready (a
//! standby, or a leader still recovering).
//!
//! A submit may carry a `request_id`: the first submit with an id is applied once, and every
//! later submit with the same id and body gets that submit's answer instead of a second
//! backfill, also when the first answer was a 503 because the loop was slow. The engine keeps
//! the id and the body's digest in the backfill's stored record and answers a repeat with that
//! backfill (or a 409 for another body), across restarts and failovers; [`Submissions`] (in
//! memory, the last [`REMEMBERED_SUBMITS`]) joins a repeat to a submit still in flight. A submit without an id that
//! times out is dropped by the loop if it has not started it yet. The request and response types are
//! public so the CLI in this crate uses the very types the server parses; client and server
//! ship in the same binary, so they change together.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use uuid::Uuid;
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::Action;
use warpline_shared::partition::{self, Partition};
use warpline_shared::stage::RunScope;

use crate::auth::{self, Auth, Identity};
use crate::engine::{
    BackfillAction, BackfillRequest, Escalation, Event, OperatorAnswer, OperatorCommand,
    OperatorError, RunSummary, RunsShown, SubmitKey, Submitted, Summary,
};
use crate::fleet::metrics::Percentiles;
use crate::fleet::metrics::{LatencySnapshot, StepLatency};
use crate::reprocess::{Reprocess, Skipped};

/// How long a handler waits for the event loop's answer by default.
pub const DEFAULT_ENGINE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs in progress at once when a submit does not say.
pub const DEFAULT_MAX_PARALLEL: usize = 8;

/// The most partitions one backfill may have unless `serve --max-partitions` says otherwise.
pub const DEFAULT_MAX_PARTITIONS: usize = 10_000;

/// The largest request body unless `serve --max-body-bytes` says otherwise (a pipeline config
/// and its partitions fit in far less).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// How many submits' request ids the leader remembers.
pub const REMEMBERED_SUBMITS: usize = 10_000;

/// What `warpline serve` accepts over the API: limits, and which pipelines may be submitted.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiPolicy {
    /// The most partitions (runs) one backfill may have; a bigger submit is refused with 413.
    #[arg(long, env = "WARPLINE_MAX_PARTITIONS", default_value_t = DEFAULT_MAX_PARTITIONS)]
    pub max_partitions: usize,
    /// The largest request body accepted, in bytes; a bigger one is refused with 413.
    #[arg(long, env = "WARPLINE_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Accept only pipeline files under this directory (repeatable, or comma-separated in the
    /// environment). The coordinator reads the file itself, the submitted JSON must match it,
    /// and a `workdir` override must lie under one of these directories too.
    #[arg(
        long = "pipeline-dir",
        env = "WARPLINE_PIPELINE_DIRS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    pub pipeline_dirs: Vec<PathBuf>,
    /// Accept only pipeline files whose sha256 (of the file's bytes, as `sha256sum` prints it)
    /// is one of these (repeatable, or comma-separated in the environment).
    #[arg(
        long = "pipeline-sha256",
        env = "WARPLINE_PIPELINE_SHA256",
        value_delimiter = ',',
        value_name = "HEX"
    )]
    pub pipeline_sha256: Vec<String>,
    /// What to do with a submit some step of which no live worker may run, by the pools and
    /// allowlists the workers advertise: `refuse` it (409, unless the submit says
    /// `allow_unrunnable`), accept it with `warn`ings, or check nothing (`off`). `warn` suits a
    /// fleet that scales from zero workers. (Off without `serve`: in-process workers send no
    /// heartbeats.)
    #[arg(
        long,
        env = "WARPLINE_FLEET_CHECK",
        value_enum,
        default_value_t = FleetCheck::Refuse
    )]
    pub fleet_check: FleetCheck,
    /// Where the pools' queue depths are read (fleet mode; set by `serve`), and the pools
    /// always shown (`serve --pool`) besides the workers' own.
    #[arg(skip)]
    pub queues: Option<(Arc<crate::fleet::metrics::Broker>, Vec<String>)>,
}

/// `serve --fleet-check`: the submit check against the live workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FleetCheck {
    /// Refuse the submit unless it says `allow_unrunnable`.
    Refuse,
    /// Accept it; the problems are the answer's warnings.
    Warn,
    /// Check nothing.
    Off,
}

impl Default for ApiPolicy {
    fn default() -> ApiPolicy {
        ApiPolicy {
            max_partitions: DEFAULT_MAX_PARTITIONS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            pipeline_dirs: Vec::new(),
            pipeline_sha256: Vec::new(),
            fleet_check: FleetCheck::Off,
            queues: None,
        }
    }
}

impl ApiPolicy {
    /// Whether only some pipeline files may be submitted.
    pub fn restricts_pipelines(&self) -> bool {
        !self.pipeline_dirs.is_empty() || !self.pipeline_sha256.is_empty()
    }

    /// Whether `path` (canonical) lies under an allowed directory.
    fn under_allowed_dir(&self, path: &Path) -> bool {
        self.pipeline_dirs.iter().any(|d| {
            std::fs::canonicalize(d)
                .map(|d| path.starts_with(d))
                .unwrap_or(false)
        })
    }

    /// With pipelines restricted, reads `file` from disk and checks that it is allowed and that
    /// the submitted `pipeline` is its content.
    fn admit(&self, file: &Path, pipeline: &serde_json::Value) -> Result<(), ApiError> {
        if !self.restricts_pipelines() {
            return Ok(());
        }
        let forbidden = ApiError::Forbidden;
        let canonical = std::fs::canonicalize(file).map_err(|e| {
            forbidden(format!(
                "this coordinator only runs pipeline files it can read, and `{}` cannot be read: {e}",
                file.display()
            ))
        })?;
        let bytes = std::fs::read(&canonical).map_err(|e| {
            forbidden(format!(
                "cannot read pipeline file `{}`: {e}",
                file.display()
            ))
        })?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let pinned = self
            .pipeline_sha256
            .iter()
            .any(|h| h.trim().eq_ignore_ascii_case(&digest));
        if !pinned && !self.under_allowed_dir(&canonical) {
            return Err(forbidden(format!(
                "pipeline file `{}` (sha256 {digest}) is not allowed here: this coordinator runs only pipelines under {} or with a pinned sha256 ({} pinned); ask its operator to add it (`serve --pipeline-dir` / `--pipeline-sha256`)",
                canonical.display(),
                dirs_list(&self.pipeline_dirs),
                self.pipeline_sha256.len()
            )));
        }
        let on_disk: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::BadRequest(format!(
                "pipeline file `{}` is not valid JSON: {e}",
                file.display()
            ))
        })?;
        if &on_disk != pipeline {
            return Err(forbidden(format!(
                "the submitted pipeline differs from the file `{}` on the coordinator: only the file as it is on disk may be submitted",
                file.display()
            )));
        }
        Ok(())
    }

    /// With pipelines restricted, a workdir override must lie under an allowed directory.
    fn admit_workdir(&self, dir: &Path) -> Result<(), ApiError> {
        if !self.restricts_pipelines() {
            return Ok(());
        }
        // The directory may not exist yet: its nearest existing ancestor decides.
        let mut probe = dir.to_path_buf();
        let canonical = loop {
            if let Ok(c) = std::fs::canonicalize(&probe) {
                let rest = dir.strip_prefix(&probe).unwrap_or(Path::new(""));
                break c.join(rest);
            }
            if !probe.pop() {
                break dir.to_path_buf();
            }
        };
        let escapes = dir
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
        if escapes || !self.under_allowed_dir(&canonical) {
            return Err(ApiError::Forbidden(format!(
                "`workdir` `{}` is not allowed here: with pipelines restricted, a workdir must lie under {}",
                dir.display(),
                dirs_list(&self.pipeline_dirs)
            )));
        }
        Ok(())
    }
}

fn dirs_list(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "no directory (none is configured)".into();
    }
    dirs.iter()
        .map(|d| format!("`{}`", d.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `POST /v1/backfills`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// Where the config lives, as an absolute path the coordinator and workers also see (inputs
    /// are resolved against its directory).
    pub pipeline_file: String,
    /// The config file's JSON (schema: `shared/schema/pipeline_config.json`).
    #[schema(value_type = Object)]
    pub pipeline: serde_json::Value,
    /// Months: `FROM..TO` or one `YYYY-MM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub months: Option<String>,
    /// Datasets: `a,b,c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datasets: Option<String>,
    /// The partitions themselves instead of `months`/`datasets` (what `submit
    /// --partitions-file` sends): objects with a `month` and/or `dataset` and per-partition
    /// `vars`, checked like the flags; no key twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub partitions: Option<Vec<Partition>>,
    /// Pipeline variables (`--var NAME=VALUE`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
    /// An absolute workdir replacing the config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Most runs in progress at once (default [`DEFAULT_MAX_PARALLEL`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<usize>,
    /// Higher first when slots are scarce (default 0).
    #[serde(default)]
    pub priority: i32,
    /// Which partitions start first.
    #[serde(default)]
    pub order: PartitionOrder,
    /// The client's id for this submit (at most 200 characters): sending the same submit again
    /// with the same id returns the first one's answer instead of creating a second backfill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Accept the backfill even when no live worker may run some step (say, a fleet that
    /// scales from zero workers): the problems become `warnings` in the answer instead of a
    /// 409. Its steps wait in their pool's queue for a capable worker; a worker that may not
    /// run one hands it back, and after a few hand-backs the run escalates.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unrunnable: bool,
    /// Which of the partitions run, against earlier backfills of the same pipeline (by name)
    /// that this coordinator holds: `missing` (never run), `failed` (never run, or run without
    /// completing), `all` (default). A partition a live backfill is still running is never
    /// started a second time; with nothing left to run the submit is a 409.
    #[serde(default, skip_serializing_if = "is_all")]
    pub reprocess: Reprocess,
}

fn is_all(r: &Reprocess) -> bool {
    *r == Reprocess::All
}

/// The order in which a backfill's runs start.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PartitionOrder {
    /// As given: each dataset's months, oldest first.
    #[default]
    Asc,
    /// Newest month first (every dataset of the newest month, then the month before).
    Desc,
}

/// The answer to a submit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubmitResponse {
    /// The new backfill.
    pub backfill_id: Uuid,
    /// How many runs it has (one per partition).
    pub runs: usize,
    /// What the submit check found but `allow_unrunnable` let through (steps no live worker
    /// may run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Partitions the reprocess mode left out, by why (absent when none was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<Skipped>,
}

/// `POST /v1/runs/{id}/resolve`: an operator's answer to an escalation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// proceed, retry or halt.
    #[schema(value_type = String, example = "retry", pattern = "^(proceed|retry|halt)$")]
    pub action: Action,
    /// Why (required, and audited).
    pub reason: String,
    /// Who, when the API has no tokens (with tokens the authenticated identity is audited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
}

/// Every error's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong and, where it can, what to do.
    pub error: String,
}

/// Set once the coordinator may take commands (the serve side sets it when it holds the leader
/// lock and has restored its state; it may clear it again when it loses the lock).
#[derive(Debug, Clone, Default)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    /// A flag that is not set.
    pub fn new() -> ReadyFlag {
        ReadyFlag::default()
    }

    /// Sets or clears the flag.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// True once set.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A handle on the engine's event loop for request handlers.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    /// The loop's input. Unbounded like every sender into the loop; operator requests are few
    /// and each waits for its answer, so at most one event per open request is queued.
    events: mpsc::UnboundedSender<Event>,
    /// How long to wait for an answer.
    timeout: Duration,
    /// Set once the loop has ended and only reads are answered (a local run's dashboard kept
    /// up with `--ui-stay`): the dashboard then draws no action.
    ended: Arc<AtomicBool>,
    /// The committed state the loop publishes (`serve`): counts-only summaries and the workers
    /// are read from it without waiting for the loop ([`crate::engine::snapshot`]).
    snapshots: Option<crate::engine::snapshot::Snapshots>,
}

/// Why a request failed; each variant is one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or names a bad config or partitions.
    #[error("{0}")]
    BadRequest(String),
    /// 403: `serve` does not allow this pipeline file or workdir.
    #[error("{0}")]
    Forbidden(String),
    /// 413: the body, or the backfill it asks for, is bigger than `serve` accepts.
    #[error("{0}")]
    TooLarge(String),
    /// 404: no such backfill or run.
    #[error("{0}")]
    NotFound(String),
    /// 409: the engine refused the command in the run's current state.
    #[error("{0}")]
    Conflict(String),
    /// 503: the event loop did not answer (stopped, or too slow), or not ready.
    #[error("{0}")]
    Unavailable(String),
}

impl EngineHandle {
    /// A handle with the default timeout.
    pub fn new(events: mpsc::UnboundedSender<Event>) -> EngineHandle {
        EngineHandle {
            events,
            timeout: DEFAULT_ENGINE_TIMEOUT,
            ended: Default::default(),
            snapshots: None,
        }
    }

    /// The same handle reading counts-only summaries and the workers from `snapshots`, which
    /// the loop publishes to ([`crate::engine::Engine::publish_to`]).
    pub fn with_snapshots(mut self, snapshots: crate::engine::snapshot::Snapshots) -> EngineHandle {
        self.snapshots = Some(snapshots);
        self
    }

    /// Backfill `id`'s summary listing the runs `runs` chooses: counts only from the state
    /// the loop published at its last commit when there is one (without waiting for its turn
    /// in progress), else, and for any list of runs, from the loop.
    pub async fn status(&self, id: Uuid, runs: RunsShown) -> Result<Box<Summary>, ApiError> {
        if runs == RunsShown::None
            && let Some(published) = self.snapshots.as_ref().and_then(|s| s.summary(id))
        {
            return published
                .map(Box::new)
                .ok_or_else(|| OperatorError::UnknownBackfill(id).into());
        }
        let cmd = OperatorCommand::Status {
            backfill_id: Some(id),
            runs,
        };
        match self.ask(cmd).await? {
            OperatorAnswer::Summary(s) => Ok(s),
            other => Err(unexpected_answer(&other)),
        }
    }

    /// The workers, from the published state when there is one, else from the loop.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, ApiError> {
        if let Some(list) = self.snapshots.as_ref().and_then(|s| s.workers()) {
            return Ok(list);
        }
        match self.ask(OperatorCommand::Workers).await? {
            OperatorAnswer::Workers(list) => Ok(list),
            other => Err(unexpected_answer(&other)),
        }
    }

    /// Says that the loop has ended and answers only reads from now on.
    pub fn mark_ended(&self) {
        self.ended.store(true, Ordering::Relaxed);
    }

    /// True once [`EngineHandle::mark_ended`] was called on this handle or a clone.
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// The same handle with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> EngineHandle {
        self.timeout = timeout;
        self
    }

    /// Hands a backfill to the loop; resolves once it is durable.
    pub async fn submit(&self, req: BackfillRequest) -> Result<Submitted, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Submit(Box::new(req), Some(tx)))?;
        self.wait(rx)
            .await?
            .map_err(|c| ApiError::Conflict(c.to_string()))
    }

    /// Hands a backfill to the loop and waits for as long as it takes (the loop drops a submit
    /// whose answer nobody waits for, so this one must wait).
    async fn submit_to_the_end(&self, req: BackfillRequest) -> Result<Submitted, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Submit(Box::new(req), Some(tx)))?;
        rx.await
            .map_err(|_| stopped())?
            .map_err(|c| ApiError::Conflict(c.to_string()))
    }

    /// Sends an operator command and waits for the loop's answer.
    /// The engine answers with a typed [`OperatorAnswer`]; the API serves it as JSON.
    pub async fn command(&self, cmd: OperatorCommand) -> Result<serde_json::Value, ApiError> {
        let answer = self.ask(cmd).await?;
        Ok(serde_json::to_value(answer).expect("operator answers serialise"))
    }

    /// Sends an operator command and waits for the loop's typed answer (the dashboard reads
    /// it as is, without a trip through JSON).
    pub async fn ask(&self, cmd: OperatorCommand) -> Result<OperatorAnswer, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Operator(cmd, tx))?;
        self.wait(rx).await?.map_err(ApiError::from)
    }

    fn send(&self, event: Event) -> Result<(), ApiError> {
        self.events.send(event).map_err(|_| stopped())
    }

    async fn wait<T>(&self, rx: oneshot::Receiver<T>) -> Result<T, ApiError> {
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(ApiError::Unavailable(format!(
                "the coordinator's event loop did not answer within {} s; try again",
                self.timeout.as_secs_f64()
            ))),
        }
    }
}

fn stopped() -> ApiError {
    ApiError::Unavailable("the coordinator's event loop has stopped".into())
}

impl From<OperatorError> for ApiError {
    fn from(e: OperatorError) -> ApiError {
        match e {
            OperatorError::UnknownBackfill(_) | OperatorError::UnknownRun(_) => {
                ApiError::NotFound(e.to_string())
            }
            OperatorError::Refused(_) => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::TooLarge(format!(
                "the request body is too large: {} (`serve --max-body-bytes` sets the limit)",
                e.body_text()
            ));
        }
        ApiError::BadRequest(format!("invalid request body: {}", e.body_text()))
    }
}

impl ApiError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody {
            error: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

#[derive(Clone)]
struct AppState {
    engine: EngineHandle,
    ready: ReadyFlag,
    policy: Arc<ApiPolicy>,
    submits: Arc<Submissions>,
}

type Answer = Result<Json<serde_json::Value>, ApiError>;

/// What a submit with a request id got (or will get): `None` while the loop works on it.
type Pending = watch::Receiver<Option<Result<SubmitResponse, ApiError>>>;

/// The submits with a request id the leader has seen, the last [`REMEMBERED_SUBMITS`].
#[derive(Default)]
pub struct Submissions {
    inner: Mutex<SubmissionsInner>,
}

#[derive(Default)]
struct SubmissionsInner {
    /// Request id → (the body's digest, its answer).
    by_id: HashMap<String, (String, Pending)>,
    /// Request ids, oldest first, to forget the oldest.
    order: VecDeque<String>,
}

impl Submissions {
    fn seen(&self, id: &str) -> bool {
        self.inner
            .lock()
            .expect("submissions lock")
            .by_id
            .contains_key(id)
    }

    fn forget(&self, id: &str) {
        let mut inner = self.inner.lock().expect("submissions lock");
        inner.by_id.remove(id);
        inner.order.retain(|i| i != id);
    }
}

/// The API's routes over one engine, with the default [`ApiPolicy`].
pub fn router(handle: EngineHandle, ready: ReadyFlag) -> Router {
    router_with(handle, ready, ApiPolicy::default())
}

/// The API's routes over one engine. Until `ready` is set (a standby, or a leader recovering)
/// every `/v1/*` route answers 503 at once; `/healthz` and `/readyz` always answer.
pub fn router_with(handle: EngineHandle, ready: ReadyFlag, policy: ApiPolicy) -> Router {
    let limit = policy.max_body_bytes;
    let gate = ready.clone();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/backfills", post(submit).get(list))
        .route("/v1/backfills/{id}", get(status))
        .route("/v1/backfills/{id}/cancel", post(cancel))
        .route("/v1/backfills/{id}/retry-failed", post(retry_failed))
        .route("/v1/backfills/{id}/reprocess", post(reprocess))
        .route("/v1/escalations", get(escalations))
        .route("/v1/runs/{id}/resolve", post(resolve))
        .route("/v1/backfills/{id}/resolve", post(resolve_backfill))
        .route("/v1/workers", get(workers))
        .route("/v1/fleet", get(fleet))
        .route("/v1/openapi.json", get(openapi_json))
        .with_state(AppState {
            engine: handle,
            ready,
            policy: Arc::new(policy),
            submits: Arc::default(),
        })
        .layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let ready = gate.is_ready();
                async move {
                    if !ready && req.uri().path().starts_with("/v1/") {
                        return ApiError::Unavailable(NOT_READY.into()).into_response();
                    }
                    next.run(req).await
                }
            },
        ))
        .layer(DefaultBodyLimit::max(limit))
}

const NOT_READY: &str = "not ready: this coordinator does not lead (a standby) or is still restoring its state; send commands to the leader, or try again shortly";

/// Puts authentication in front of `routes` (see [`crate::auth`]): every handler then finds the
/// request's [`Identity`] in its extensions. Unknown routes answer a JSON 404 and a wrong
/// method a JSON 405, like every other error.
pub fn protect(routes: Router, auth: Arc<Auth>) -> Router {
    routes
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(auth, auth::require))
}

async fn unknown_route(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route `{}`: the API is under /v1 (see /v1/openapi.json), the dashboard at /",
        uri.path()
    ))
}

async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let body = ErrorBody {
        error: format!("`{method} {}` is not a route of this API", uri.path()),
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// `GET /v1/metrics`: the coordinator's overhead per step (fleet mode), read without the event
/// loop. Merged beside [`router`] by `warpline serve`.
pub fn metrics_router(latency: Arc<StepLatency>) -> Router {
    Router::new()
        .route("/v1/metrics", get(metrics))
        .with_state(latency)
}

#[utoipa::path(get, path = "/v1/metrics", tag = "fleet", responses((status = 200, body = LatencySnapshot), (status = 401, body = ErrorBody)))]
async fn metrics(State(latency): State<Arc<StepLatency>>) -> Json<LatencySnapshot> {
    Json(latency.snapshot())
}

#[utoipa::path(get, path = "/healthz", tag = "health", security(()), responses((status = 200, description = "the process lives", body = Object, example = json!({"status": "ok"}))))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "health", security(()), responses((status = 200, description = "leads and has restored its state", body = Object, example = json!({"ready": true})), (status = 503, description = "a standby, or still recovering", body = ErrorBody)))]
async fn readyz(State(st): State<AppState>) -> Response {
    if st.ready.is_ready() {
        Json(serde_json::json!({"ready": true})).into_response()
    } else {
        ApiError::Unavailable(NOT_READY.into()).into_response()
    }
}

/// Parses an id from the URL, naming what it should have been.
fn parse_id(what: &str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::BadRequest(format!("invalid {what} id `{raw}`: expected a UUID")))
}

/// Checks a submit against `policy` and turns it into a backfill.
pub fn build_backfill(req: SubmitRequest, policy: &ApiPolicy) -> Result<BackfillRequest, ApiError> {
    let bad = ApiError::BadRequest;
    let file = Path::new(&req.pipeline_file);
    if !file.is_absolute() {
        return Err(bad(format!(
            "`pipeline_file` must be an absolute path, got `{}`",
            req.pipeline_file
        )));
    }
    policy.admit(file, &req.pipeline)?;
    if req.partitions.is_some() && (req.months.is_some() || req.datasets.is_some()) {
        return Err(bad(
            "give either `partitions` or `months`/`datasets`, not both".into(),
        ));
    }
    // Counted before they are expanded, so a huge range costs nothing.
    let count = |months: Option<&str>, datasets: Option<&str>| match (months, datasets) {
        (None, None) => Ok(1),
        _ => partition::expand(months, datasets)
            .map(|p| p.len())
            .map_err(|e| bad(e.to_string())),
    };
    let wanted = match &req.partitions {
        Some(p) => p.len(),
        None => count(req.months.as_deref(), None)?
            .saturating_mul(count(None, req.datasets.as_deref())?),
    };
    if wanted > policy.max_partitions {
        return Err(ApiError::TooLarge(format!(
            "the backfill would have {wanted} partitions; this coordinator accepts at most {} per backfill (`serve --max-partitions`): split it into smaller submits",
            policy.max_partitions
        )));
    }
    let given = req.partitions.map(check_given_partitions).transpose()?;
    let partition_vars = given
        .as_deref()
        .map(partition::var_names)
        .unwrap_or_default();
    let text = serde_json::to_string(&req.pipeline).expect("a JSON value serialises");
    let mut pipeline = Pipeline::from_json_with_partition_vars(file, &text, partition_vars)
        .map_err(|e| bad(e.to_string()))?;
    let vars: Vec<(String, String)> = req.vars.into_iter().collect();
    pipeline.set_vars(&vars).map_err(|e| bad(e.to_string()))?;
    if let Some(dir) = &req.workdir {
        if !Path::new(dir).is_absolute() {
            return Err(bad(format!(
                "`workdir` must be an absolute path, got `{dir}`"
            )));
        }
        policy.admit_workdir(Path::new(dir))?;
        pipeline.set_workdir(Path::new(dir));
    }
    let mut partitions = match given {
        Some(p) => p,
        None => partition::expand(req.months.as_deref(), req.datasets.as_deref())
            .map_err(|e| bad(e.to_string()))?,
    };
    pipeline
        .check_partitions(&partitions)
        .map_err(|e| bad(format!("pipeline `{}`: {e}", req.pipeline_file)))?;
    order_partitions(&mut partitions, req.order);
    let max_parallel = req.max_parallel.unwrap_or(DEFAULT_MAX_PARALLEL);
    if max_parallel == 0 {
        return Err(bad("`max_parallel` must be at least 1".into()));
    }
    let backfill = BackfillRequest {
        id: Uuid::now_v7(),
        pipeline: Arc::new(pipeline),
        partitions,
        max_parallel,
        priority: req.priority,
        request: None,
        reprocess: req.reprocess,
    };
    sample_specs(&backfill).map_err(|problems| {
        let more = match problems.len() {
            n if n > 3 => format!("; and {} more", n - 3),
            _ => String::new(),
        };
        bad(format!(
            "pipeline `{}` cannot be rendered for its partitions (nothing was submitted): {}{more}",
            req.pipeline_file,
            problems[..problems.len().min(3)].join("; ")
        ))
    })?;
    Ok(backfill)
}

/// The steps of a backfill's first partitions' runs and of the first backfill-level runs of
/// each scope, rendered as a worker would be sent them (the commands rarely depend on the
/// partition, and when they do the first few show it). A step that cannot be rendered (a path
/// outside the workdir and the config's directory, say) is a problem of the submit, found here
/// instead of halting every run at that step; the problems are returned, each once.
fn sample_specs(
    backfill: &BackfillRequest,
) -> Result<Vec<warpline_shared::contracts::StepSpec>, Vec<String>> {
    let pipeline = &backfill.pipeline;
    let views = crate::cli::preflight::Views::of(pipeline);
    let mut taken: std::collections::BTreeMap<RunScope, usize> = Default::default();
    let mut specs = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let first = &backfill.partitions[..backfill.partitions.len().min(CHECKED_PARTITIONS)];
    for (scope, p) in pipeline.plan(first) {
        let n = taken.entry(scope).or_default();
        *n += 1;
        if *n > CHECKED_PARTITIONS {
            continue;
        }
        let view = views.get(scope);
        for i in 0..view.steps().len() {
            match view.render_step(i, &p, Uuid::nil(), 1, Uuid::nil()) {
                Ok(spec) => specs.push(spec),
                Err(e) => {
                    let problem = format!("partition `{}`: {e}", scope.key(&p));
                    if !problems.contains(&problem) {
                        problems.push(problem);
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(specs)
    } else {
        Err(problems)
    }
}

/// Checks partitions given as such (`submit --partitions-file`) as the file's parser checks
/// its rows: each has a month and/or a dataset, valid like `--months` and `--datasets`, with the
/// same keys as the others, and no key appears twice.
fn check_given_partitions(partitions: Vec<Partition>) -> Result<Vec<Partition>, ApiError> {
    let bad = |i: usize, m: String| ApiError::BadRequest(format!("`partitions[{i}]`: {m}"));
    if partitions.is_empty() {
        return Err(ApiError::BadRequest(
            "`partitions` is empty: give at least one".into(),
        ));
    }
    let shape = |p: &Partition| (p.month.is_some(), p.dataset.is_some());
    let first = shape(&partitions[0]);
    let mut keys = std::collections::HashSet::new();
    for (i, p) in partitions.iter().enumerate() {
        if p.month.is_none() && p.dataset.is_none() {
            return Err(bad(i, "needs a `month` and/or a `dataset`".into()));
        }
        if shape(p) != first {
            return Err(bad(
                i,
                "every partition must have the same keys (`month`, `dataset`) as the first".into(),
            ));
        }
        if let Some(m) = &p.month {
            partition::parse_month(m).map_err(|e| bad(i, e.to_string()))?;
        }
        if let Some(d) = &p.dataset {
            partition::check_dataset(d).map_err(|e| bad(i, e.to_string()))?;
        }
        if !keys.insert(p.key()) {
            return Err(bad(i, format!("partition `{}` is listed twice", p.key())));
        }
    }
    Ok(partitions)
}

/// Partitions whose steps the submit check renders: the commands rarely depend on the
/// partition, and when they do (a per-partition variable) the first few show it.
const CHECKED_PARTITIONS: usize = 8;

/// The submit check (fleet mode): the steps of `backfill` no live worker may run, by the
/// workers' advertised pools and allowlists, as messages. Empty when every step has a capable
/// live worker.
async fn unrunnable_steps(
    st: &AppState,
    backfill: &BackfillRequest,
) -> Result<Vec<String>, ApiError> {
    let workers = st.engine.workers().await?;
    let live: Vec<warpline_shared::fleet::Heartbeat> = workers
        .into_iter()
        .map(|w| {
            let mut hb =
                warpline_shared::fleet::Heartbeat::new(w.worker_id, w.pool, w.slots, Vec::new(), 0);
            hb.allow = w.allow;
            hb
        })
        .collect();
    // Rendered once already, when the submit was built: no problem is left.
    let specs = sample_specs(backfill).unwrap_or_default();
    let found = crate::fleet::capability::unrunnable(&specs, &live);
    let mut out: Vec<String> = Vec::new();
    if live.is_empty() && !found.is_empty() {
        out.push(
            "no live worker at all: none heartbeated in the last three heartbeat intervals (a coordinator that just started hears from its workers within one interval)"
                .into(),
        );
    }
    out.extend(found.iter().map(ToString::to_string));
    Ok(out)
}

/// Refuses (409) a backfill some step of which no live worker may run, unless
/// `allow_unrunnable` or `--fleet-check warn`, when the problems become the answer's warnings.
async fn fleet_check(
    st: &AppState,
    backfill: &BackfillRequest,
    allow_unrunnable: bool,
) -> Result<Vec<String>, ApiError> {
    if st.policy.fleet_check == FleetCheck::Off {
        return Ok(Vec::new());
    }
    let problems = unrunnable_steps(st, backfill).await?;
    if problems.is_empty() || allow_unrunnable || st.policy.fleet_check == FleetCheck::Warn {
        return Ok(problems);
    }
    Err(ApiError::Conflict(format!(
        "no live worker may run this backfill: {}; start workers whose pool and --allow cover these commands, or submit with `allow_unrunnable` (`warpline submit --allow-unrunnable`) to queue it anyway (a fleet that scales from zero workers): a worker that may not run a step hands it back, and the run escalates after a few hand-backs",
        problems.join("; ")
    )))
}

/// Puts partitions in start order. `Desc` is a stable sort by month, newest first, so datasets
/// keep their given order within a month.
pub fn order_partitions(partitions: &mut [Partition], order: PartitionOrder) {
    if order == PartitionOrder::Desc {
        partitions.sort_by(|a, b| b.month.cmp(&a.month));
    }
}

#[utoipa::path(post, path = "/v1/backfills", tag = "backfills", request_body = SubmitRequest, responses((status = 201, body = SubmitResponse), (status = 400, description = "a bad config or partitions: the message names the file and JSON path", body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, description = "a viewer's token, or a pipeline file or workdir `serve` does not allow", body = ErrorBody), (status = 409, description = "the same `request_id` with another body, (fleet mode) a step no live worker may run, unless `allow_unrunnable`, or a `reprocess` mode that left no partition to run", body = ErrorBody), (status = 413, description = "the body or the backfill is bigger than `serve` accepts", body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn submit(
    State(st): State<AppState>,
    body: Result<Json<SubmitRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<SubmitResponse>), ApiError> {
    let Json(mut req) = body?;
    let Some(request_id) = req.request_id.take() else {
        let allow_unrunnable = req.allow_unrunnable;
        let backfill = build_backfill(req, &st.policy)?;
        let warnings = fleet_check(&st, &backfill, allow_unrunnable).await?;
        let submitted = st.engine.submit(backfill).await?;
        return Ok((StatusCode::CREATED, Json(response(submitted, warnings))));
    };
    if request_id.trim().is_empty() || request_id.len() > 200 {
        return Err(ApiError::BadRequest(
            "`request_id` must be 1 to 200 characters".into(),
        ));
    }
    let digest = hex::encode(Sha256::digest(
        serde_json::to_vec(&req).expect("a request serialises"),
    ));
    // A submit seen before gets its answer whatever the fleet looks like now; a new one is
    // checked against the live workers first.
    let seen = st.submits.seen(&request_id);
    let checked = if seen {
        None
    } else {
        let allow_unrunnable = req.allow_unrunnable;
        let backfill = build_backfill(req.clone(), &st.policy)?;
        Some(fleet_check(&st, &backfill, allow_unrunnable).await?)
    };
    let mut pending = remembered_or_started(
        &st,
        request_id.clone(),
        digest,
        req,
        checked.unwrap_or_default(),
    )?;
    let answer = tokio::time::timeout(st.engine.timeout, pending.wait_for(Option::is_some)).await;
    match answer {
        Ok(Ok(answer)) => {
            let answer = answer.clone().expect("waited for an answer");
            answer.map(|a| (StatusCode::CREATED, Json(a)))
        }
        Ok(Err(_)) => Err(stopped()),
        Err(_) => Err(ApiError::Unavailable(format!(
            "the submit `{request_id}` is still being applied ({} s so far); send it again with the same request_id for its answer (it will not be applied twice)",
            st.engine.timeout.as_secs_f64()
        ))),
    }
}

/// The answer to a submit the loop applied.
fn response(submitted: Submitted, warnings: Vec<String>) -> SubmitResponse {
    SubmitResponse {
        backfill_id: submitted.id,
        runs: submitted.runs,
        warnings,
        skipped: (!submitted.skipped.is_empty()).then_some(submitted.skipped),
    }
}

/// The answer (or pending answer) of the submit with `request_id`: the one already seen, or a
/// new one handed to the loop by a task that waits for as long as the loop takes.
fn remembered_or_started(
    st: &AppState,
    request_id: String,
    digest: String,
    req: SubmitRequest,
    warnings: Vec<String>,
) -> Result<Pending, ApiError> {
    let mut inner = st.submits.inner.lock().expect("submissions lock");
    if let Some((seen, pending)) = inner.by_id.get(&request_id) {
        if *seen != digest {
            return Err(ApiError::Conflict(format!(
                "request_id `{request_id}` was already used for a different submit: use a new id for a new backfill"
            )));
        }
        return Ok(pending.clone());
    }
    let mut backfill = build_backfill(req, &st.policy)?;
    backfill.request = Some(SubmitKey {
        id: request_id.clone(),
        digest: digest.clone(),
    });
    let (tx, rx) = watch::channel(None);
    inner.by_id.insert(request_id.clone(), (digest, rx.clone()));
    inner.order.push_back(request_id.clone());
    while inner.order.len() > REMEMBERED_SUBMITS {
        if let Some(old) = inner.order.pop_front() {
            inner.by_id.remove(&old);
        }
    }
    drop(inner);
    let (engine, submits) = (st.engine.clone(), st.submits.clone());
    tokio::spawn(async move {
        let answer = engine
            .submit_to_the_end(backfill)
            .await
            .map(|submitted| response(submitted, warnings));
        if answer.is_err() {
            // Not applied: the same id may be tried again from scratch.
            submits.forget(&request_id);
        }
        let _ = tx.send(Some(answer));
    });
    Ok(rx)
}

/// `?runs=`: which runs a summary lists.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    #[serde(default)]
    runs: RunsShown,
}

fn runs_query(q: Result<Query<RunsQuery>, QueryRejection>) -> Result<RunsShown, ApiError> {
    q.map(|Query(q)| q.runs).map_err(|e| {
        ApiError::BadRequest(format!("{}: `runs` is all, failed or none", e.body_text()))
    })
}

#[utoipa::path(get, path = "/v1/backfills", tag = "backfills", params(("runs" = Option<RunsShown>, Query, description = "which runs each summary lists: `all` (the default), `failed` (halted, escalated, cancelled) or `none` (counts only)")), responses((status = 200, body = [Summary]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list(
    State(st): State<AppState>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Result<Json<Vec<Summary>>, ApiError> {
    let cmd = OperatorCommand::Status {
        backfill_id: None,
        runs: runs_query(q)?,
    };
    // Serialised straight from the engine's answer: a `serde_json::Value` of every run's
    // summary would be several times the size of its JSON.
    match st.engine.ask(cmd).await? {
        OperatorAnswer::Summaries(all) => Ok(Json(all)),
        other => Err(unexpected_answer(&other)),
    }
}

/// `GET /v1/backfills/{id}`'s answer: the summary and, in fleet mode, the fleet beside it.
#[derive(Serialize)]
struct StatusBody {
    #[serde(flatten)]
    summary: Box<Summary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet: Option<FleetView>,
}

/// The error for an engine answer of another kind than the command's (a bug, said as such).
pub(crate) fn unexpected_answer(answer: &OperatorAnswer) -> ApiError {
    ApiError::Unavailable(format!(
        "the engine's answer does not match the API: {answer:?}"
    ))
}

#[utoipa::path(get, path = "/v1/backfills/{id}", tag = "backfills", params(("id" = Uuid, Path, description = "the backfill"), ("runs" = Option<RunsShown>, Query, description = "which runs the summary lists: `all` (the default), `failed` (halted, escalated, cancelled) or `none` (counts only: the same size at any backfill size)")), responses((status = 200, body = Summary), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn status(
    State(st): State<AppState>,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Result<Json<StatusBody>, ApiError> {
    let backfill_id = parse_id("backfill", &id)?;
    let runs = runs_query(q)?;
    let summary = st.engine.status(backfill_id, runs);
    // Fleet mode: the pools' workers (with their allowlists) and queue depths beside it,
    // asked at the same time as the summary, not after it.
    let fleet = async {
        match st.policy.queues {
            Some(_) => fleet_view(&st).await.map(Some),
            None => Ok(None),
        }
    };
    let (summary, fleet) = tokio::join!(summary, fleet);
    let summary = summary?;
    Ok(Json(StatusBody {
        summary,
        fleet: fleet?,
    }))
}

#[utoipa::path(post, path = "/v1/backfills/{id}/cancel", tag = "backfills", params(("id" = Uuid, Path, description = "the backfill")), responses((status = 200, description = "cancelling: nothing new starts, running steps finish", body = Summary), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn cancel(
    State(st): State<AppState>,
    who: Option<Extension<Identity>>,
    UrlPath(id): UrlPath<String>,
) -> Answer {
    let backfill_id = parse_id("backfill", &id)?;
    let cmd = OperatorCommand::Cancel {
        backfill_id,
        operator: identity(who).operator(None),
    };
    st.engine.command(cmd).await.map(Json)
}

#[utoipa::path(post, path = "/v1/backfills/{id}/retry-failed", tag = "backfills", params(("id" = Uuid, Path, description = "the backfill")), responses((status = 200, body = RetryFailedResponse), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn retry_failed(
    State(st): State<AppState>,
    who: Option<Extension<Identity>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<RetryFailedResponse>, ApiError> {
    let backfill_id = parse_id("backfill", &id)?;
    let cmd = OperatorCommand::RetryFailed {
        backfill_id,
        operator: identity(who).operator(None),
    };
    typed(st.engine.command(cmd).await?)
}

#[utoipa::path(post, path = "/v1/backfills/{id}/reprocess", tag = "backfills", params(("id" = Uuid, Path, description = "the backfill to run again")), request_body = ReprocessRequest, responses((status = 201, description = "a new backfill of the same pipeline over the partitions the mode keeps", body = ReprocessResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "the mode left no partition to run", body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn reprocess(
    State(st): State<AppState>,
    who: Option<Extension<Identity>>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<ReprocessRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ReprocessResponse>), ApiError> {
    let backfill_id = parse_id("backfill", &id)?;
    let Json(req) = body?;
    let cmd = OperatorCommand::Reprocess {
        backfill_id,
        mode: req.mode,
        operator: identity(who).operator(None),
    };
    let Json(answer) = typed::<ReprocessResponse>(st.engine.command(cmd).await?)?;
    Ok((StatusCode::CREATED, Json(answer)))
}

#[utoipa::path(get, path = "/v1/escalations", tag = "escalations", responses((status = 200, body = [Escalation]), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn escalations(State(st): State<AppState>) -> Answer {
    st.engine
        .command(OperatorCommand::Escalations)
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/v1/runs/{id}/resolve", tag = "escalations", params(("id" = Uuid, Path, description = "the escalated run")), request_body = ResolveRequest, responses((status = 200, body = ResolveResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "the run is not escalated", body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn resolve(
    State(st): State<AppState>,
    who: Option<Extension<Identity>>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<ResolveRequest>, JsonRejection>,
) -> Answer {
    let run_id = parse_id("run", &id)?;
    let Json(req) = body?;
    if req.action == Action::Escalate {
        return Err(ApiError::BadRequest(
            "`action` must be proceed, retry or halt: an escalation cannot be answered with escalate"
                .into(),
        ));
    }
    if req.reason.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "`reason` must not be empty: say why, it goes into the audit log".into(),
        ));
    }
    let operator = identity(who).operator(req.operator.as_deref());
    let cmd = OperatorCommand::Resolve {
        run_id,
        action: req.action,
        reason: req.reason,
        operator: operator.clone(),
    };
    let v = with_operator(st.engine.command(cmd).await, operator)?;
    Ok(Json(
        serde_json::to_value(typed::<ResolveResponse>(v.0)?.0).expect("serialises"),
    ))
}

/// `POST /v1/backfills/{id}/resolve` body: the answer to a backfill escalation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBackfillRequest {
    /// continue or cancel.
    pub action: BackfillAction,
    /// Why (required, and audited).
    pub reason: String,
    /// Who, when the API has no tokens (with tokens the authenticated identity is audited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
}

#[utoipa::path(post, path = "/v1/backfills/{id}/resolve", tag = "escalations", params(("id" = Uuid, Path, description = "the escalated backfill")), request_body = ResolveBackfillRequest, responses((status = 200, description = "the backfill's summary and the audited operator", body = ResolveBackfillResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "the backfill is not escalated", body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn resolve_backfill(
    State(st): State<AppState>,
    who: Option<Extension<Identity>>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<ResolveBackfillRequest>, JsonRejection>,
) -> Answer {
    let backfill_id = parse_id("backfill", &id)?;
    let Json(req) = body?;
    if req.reason.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "`reason` must not be empty: say why, it goes into the audit log".into(),
        ));
    }
    let operator = identity(who).operator(req.operator.as_deref());
    let cmd = OperatorCommand::ResolveBackfill {
        backfill_id,
        action: req.action,
        reason: req.reason,
        operator: operator.clone(),
    };
    with_operator(st.engine.command(cmd).await, operator)
}

/// The request's identity; a router used without [`protect`] is open, as with no tokens.
fn identity(who: Option<Extension<Identity>>) -> Identity {
    who.map(|Extension(w)| w).unwrap_or_else(Identity::local)
}

/// Adds the audited operator to an answer, so the caller sees whose name the audit log holds.
fn with_operator(answer: Result<serde_json::Value, ApiError>, operator: String) -> Answer {
    let mut v = answer?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("operator".into(), serde_json::Value::String(operator));
    }
    Ok(Json(v))
}

/// The workers heard from in the last three heartbeat intervals (fleet mode; empty in-process).
#[utoipa::path(get, path = "/v1/workers", tag = "fleet", responses((status = 200, body = [WorkerInfo]), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn workers(State(st): State<AppState>) -> Result<Json<Vec<WorkerInfo>>, ApiError> {
    st.engine.workers().await.map(Json)
}

/// The workers heard from recently and, per pool, how many, their slots busy and free and the
/// StepSpecs waiting in its queue (fleet mode).
#[utoipa::path(get, path = "/v1/fleet", tag = "fleet", responses((status = 200, body = FleetView), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn fleet(State(st): State<AppState>) -> Result<Json<FleetView>, ApiError> {
    fleet_view(&st).await.map(Json)
}

/// Builds the [`FleetView`]: the loop's workers, and the queue depths read from the broker
/// (absent when it does not answer in time, or outside fleet mode).
async fn fleet_view(st: &AppState) -> Result<FleetView, ApiError> {
    // The watched pools' depths are asked of the broker while the loop lists the workers.
    let watched = async {
        match &st.policy.queues {
            Some((broker, pools)) => broker.queued(pools).await,
            None => None,
        }
    };
    let (workers, depths) = tokio::join!(st.engine.workers(), watched);
    let workers = workers?;
    Ok(fleet_view_of(workers, st.policy.queues.as_ref(), depths).await)
}

/// [`fleet_view`] from a list of workers.
pub async fn build_fleet_view(
    workers: Vec<WorkerInfo>,
    queues: Option<&(Arc<crate::fleet::metrics::Broker>, Vec<String>)>,
) -> FleetView {
    fleet_view_of(workers, queues, None).await
}

/// [`build_fleet_view`], given the depths of some pools already (`known`): the broker is asked
/// only for the others.
async fn fleet_view_of(
    workers: Vec<WorkerInfo>,
    queues: Option<&(Arc<crate::fleet::metrics::Broker>, Vec<String>)>,
    known: Option<BTreeMap<String, u64>>,
) -> FleetView {
    let mut pools: BTreeMap<String, PoolView> = BTreeMap::new();
    let watched = queues.map(|(_, p)| p.clone()).unwrap_or_default();
    for name in watched.iter().chain(workers.iter().map(|w| &w.pool)) {
        pools.entry(name.clone()).or_insert_with(|| PoolView {
            pool: name.clone(),
            ..PoolView::default()
        });
    }
    for w in &workers {
        let p = pools
            .get_mut(&w.pool)
            .expect("every worker's pool was added");
        p.workers += 1;
        p.slots += w.slots;
        p.busy += u32::try_from(w.running).unwrap_or(u32::MAX);
    }
    if let Some((broker, _)) = queues {
        let mut depths = known.unwrap_or_default();
        let rest: Vec<String> = (pools.keys())
            .filter(|p| !depths.contains_key(*p))
            .cloned()
            .collect();
        if !rest.is_empty()
            && let Some(more) = broker.queued(&rest).await
        {
            depths.extend(more);
        }
        for (pool, n) in depths {
            if let Some(p) = pools.get_mut(&pool) {
                p.queued = Some(n);
            }
        }
    }
    FleetView {
        workers,
        pools: pools.into_values().collect(),
    }
}

/// `GET /v1/fleet` (and `fleet` in a backfill's status in fleet mode).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetView {
    /// The workers heard from recently, with their allowlists.
    pub workers: Vec<WorkerInfo>,
    /// Per pool: the pools of the workers and those `serve --pool` names.
    pub pools: Vec<PoolView>,
}

/// One pool of a [`FleetView`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct PoolView {
    /// The pool.
    pub pool: String,
    /// Live workers consuming it.
    pub workers: u32,
    /// Their slots.
    pub slots: u32,
    /// Slots running a step.
    pub busy: u32,
    /// StepSpecs ready in its queue, not yet delivered (absent when the broker did not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<u64>,
}

/// The engine's answer read through its documented type, so `/v1/openapi.json` cannot drift
/// from what is served.
fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<Json<T>, ApiError> {
    serde_json::from_value(v).map(Json).map_err(|e| {
        ApiError::Unavailable(format!("the engine's answer does not match the API: {e}"))
    })
}

/// `POST /v1/backfills/{id}/retry-failed`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RetryFailedResponse {
    /// The backfill.
    pub backfill_id: Uuid,
    /// Halted runs resumed at the step that failed.
    pub resumed: usize,
}

/// `POST /v1/backfills/{id}/reprocess`: run a backfill's partitions again, in a new backfill.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReprocessRequest {
    /// Which partitions run, against every backfill of the pipeline the coordinator holds
    /// (this one included): `failed` (the default) those that did not complete, `missing`
    /// none it ran before, `all` every one. A partition still in progress never starts twice.
    #[serde(default = "failed")]
    pub mode: Reprocess,
}

fn failed() -> Reprocess {
    Reprocess::Failed
}

/// `POST /v1/backfills/{id}/reprocess`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReprocessResponse {
    /// The new backfill.
    pub backfill_id: Uuid,
    /// The backfill it runs again.
    pub reprocess_of: Uuid,
    /// Its runs.
    pub runs: usize,
    /// Partitions the mode left out, by why.
    pub skipped: Skipped,
}

/// `POST /v1/runs/{id}/resolve`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResolveResponse {
    /// The run.
    pub run_id: Uuid,
    /// What was applied: proceed, retry or halt.
    #[schema(value_type = String)]
    pub action: Action,
    /// The run's state now (a step id, or COMPLETE, HALTED, ...).
    pub state: String,
    /// Whom the audit log names.
    pub operator: String,
}

/// `POST /v1/backfills/{id}/resolve`'s answer: the summary and whom the audit log names.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResolveBackfillResponse {
    /// Whom the audit log names.
    pub operator: String,
    /// The backfill's summary.
    #[serde(flatten)]
    pub summary: Summary,
}

/// A worker heard from recently (`GET /v1/workers`): the engine's own.
pub use crate::engine::WorkerInfo;

/// Declares the bearer scheme every route but the health checks requires.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "a viewer's token reads; an operator's also submits, cancels, retries \
                         and resolves (`warpline serve --token-file`, WARPLINE_OPERATOR_TOKEN, \
                         WARPLINE_VIEWER_TOKEN)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI 3 document of this API, generated from the handlers and their types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Warpline coordinator API",
        description = "Submit and steer supervised backfills. Errors are `{\"error\": \"...\"}`; \
                       unknown routes answer 404 with the same body."
    ),
    paths(
        healthz, readyz, submit, list, status, cancel, retry_failed, reprocess, escalations,
        resolve, resolve_backfill, workers, fleet, metrics, openapi_json
    ),
    components(schemas(
        SubmitRequest, SubmitResponse, PartitionOrder, Reprocess, Skipped, RunsShown, ResolveRequest, ResolveResponse,
        ResolveBackfillRequest, ResolveBackfillResponse, RetryFailedResponse, ReprocessRequest,
        ReprocessResponse, ErrorBody,
        Summary, RunSummary, Escalation, BackfillAction, WorkerInfo, FleetView, PoolView,
        LatencySnapshot, Percentiles
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// The document as served (and committed at `docs/openapi.json`).
pub fn openapi_document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises")
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", responses((status = 200, description = "this document", body = Object)))]
async fn openapi_json() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_document(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(d: &str, m: &str) -> Partition {
        Partition {
            month: Some(m.into()),
            dataset: Some(d.into()),
            ..Partition::default()
        }
    }

    #[test]
    fn desc_order_starts_with_the_newest_month_and_keeps_dataset_order() {
        let mut ps = partition::expand(Some("2024-01..2024-03"), Some("b,a")).unwrap();
        order_partitions(&mut ps, PartitionOrder::Desc);
        assert_eq!(
            ps,
            [
                part("b", "2024-03"),
                part("a", "2024-03"),
                part("b", "2024-02"),
                part("a", "2024-02"),
                part("b", "2024-01"),
                part("a", "2024-01"),
            ]
        );
        let mut asc = partition::expand(Some("2024-01..2024-02"), None).unwrap();
        order_partitions(&mut asc, PartitionOrder::Asc);
        assert_eq!(asc[0].month.as_deref(), Some("2024-01"));
    }

    #[test]
    fn operator_errors_map_to_statuses() {
        let id = Uuid::nil();
        assert!(matches!(
            ApiError::from(OperatorError::UnknownRun(id)),
            ApiError::NotFound(m) if m.contains("no run")
        ));
        assert!(matches!(
            ApiError::from(OperatorError::Refused("illegal".into())),
            ApiError::Conflict(_)
        ));
    }

    #[test]
    fn submit_requests_accept_defaults_and_refuse_unknown_fields() {
        let req: SubmitRequest =
            serde_json::from_value(serde_json::json!({"pipeline_file": "/p.json", "pipeline": {}}))
                .unwrap();
        assert_eq!(req.order, PartitionOrder::Asc);
        assert_eq!(req.priority, 0);
        assert!(
            serde_json::from_value::<SubmitRequest>(
                serde_json::json!({"pipeline_file": "/p.json", "pipeline": {}, "prio": 1})
            )
            .is_err()
        );
    }

    #[tokio::test]
    async fn a_loop_that_does_not_answer_is_unavailable() {
        let (tx, rx) = mpsc::unbounded_channel();
        let h = EngineHandle::new(tx).with_timeout(Duration::from_millis(50));
        let err = h.command(OperatorCommand::Escalations).await.unwrap_err();
        assert!(
            matches!(&err, ApiError::Unavailable(m) if m.contains("did not answer")),
            "{err}"
        );
        drop(rx);
        let err = h.command(OperatorCommand::Escalations).await.unwrap_err();
        assert!(
            matches!(&err, ApiError::Unavailable(m) if m.contains("stopped")),
            "{err}"
        );
    }

    #[test]
    fn the_openapi_document_is_committed_and_names_every_route() {
        let doc = openapi_document();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        if std::env::var_os("WARPLINE_UPDATE_SCHEMAS").is_some() {
            std::fs::write(path, format!("{doc}\n")).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed.trim_end() == doc,
            "docs/openapi.json is out of date: run \
             `WARPLINE_UPDATE_SCHEMAS=1 cargo test -p warpline-coordinator openapi` and commit it"
        );
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert!(v["openapi"].as_str().unwrap().starts_with("3."));
        // Every route of the module table, with its method.
        let table = include_str!("api.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//! | `"))
            .filter_map(|l| l.split('`').next().map(str::to_string))
            .collect::<Vec<_>>();
        assert!(table.len() >= 12, "{table:?}");
        for route in table {
            let (method, path) = route.split_once(' ').unwrap();
            assert!(
                v["paths"][path][method.to_lowercase()].is_object(),
                "`{method} {path}` is not in the OpenAPI document"
            );
        }
        assert_eq!(
            v["components"]["securitySchemes"]["bearer"]["scheme"], "bearer",
            "{v:#}"
        );
    }

    #[test]
    fn partitions_given_as_such_are_checked_like_a_partitions_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.json");
        let row = |d: &str, url: &str| Partition {
            dataset: Some(d.into()),
            vars: BTreeMap::from([("url".to_string(), url.to_string())]),
            ..Partition::default()
        };
        let req = |partitions: Vec<Partition>, months: Option<&str>| SubmitRequest {
            pipeline_file: file.display().to_string(),
            pipeline: serde_json::json!({"name": "p", "steps": [
                {"id": "GET", "command": "curl", "args": ["{url}"]}
            ]}),
            months: months.map(str::to_string),
            datasets: None,
            partitions: Some(partitions),
            vars: BTreeMap::new(),
            workdir: None,
            max_parallel: None,
            priority: 0,
            order: PartitionOrder::Asc,
            request_id: None,
            allow_unrunnable: false,
            reprocess: Reprocess::All,
        };
        let policy = ApiPolicy::default();
        let ok = build_backfill(
            req(vec![row("a", "https://x/a"), row("b", "https://x/b")], None),
            &policy,
        )
        .unwrap();
        assert_eq!(ok.partitions.len(), 2);
        let spec = ok
            .pipeline
            .render_step(0, &ok.partitions[1], Uuid::nil(), 1, Uuid::nil())
            .unwrap();
        assert_eq!(spec.args, ["https://x/b"]);
        let refused = |r: SubmitRequest| match build_backfill(r, &policy) {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("not refused: {:?}", other.map(|b| b.partitions)),
        };
        let twice = refused(req(vec![row("a", "u"), row("a", "v")], None));
        assert!(
            twice.contains("`partitions[1]`") && twice.contains("twice"),
            "{twice}"
        );
        let both = refused(req(vec![row("a", "u")], Some("2024-01")));
        assert!(both.contains("not both"), "{both}");
        let bad = refused(req(vec![row("../etc", "u")], None));
        assert!(bad.contains("invalid dataset"), "{bad}");
        assert!(refused(req(Vec::new(), None)).contains("empty"));
    }

    #[test]
    fn a_relative_pipeline_file_is_refused() {
        let req = SubmitRequest {
            pipeline_file: "p.json".into(),
            pipeline: serde_json::json!({}),
            months: None,
            datasets: None,
            vars: BTreeMap::new(),
            workdir: None,
            max_parallel: None,
            priority: 0,
            order: PartitionOrder::Asc,
            request_id: None,
            partitions: None,
            allow_unrunnable: false,
            reprocess: Reprocess::All,
        };
        let err = build_backfill(req, &ApiPolicy::default()).unwrap_err();
        assert!(
            matches!(&err, ApiError::BadRequest(m) if m.contains("absolute")),
            "{err}"
        );
    }
}
