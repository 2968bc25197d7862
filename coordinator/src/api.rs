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
//! | `GET /v1/escalations` | `Escalations` | 200 `[Escalation]` |
//! | `POST /v1/runs/{id}/resolve` ([`ResolveRequest`]) | `Resolve` | 200 `{run_id, action, state}` |
//! | `GET /v1/workers` | — | the workers heard from recently (heartbeats) |
//! | `GET /v1/metrics` ([`metrics_router`], fleet mode) | — | 200 [`LatencySnapshot`] |
//! | `GET /healthz` | — | 200 while the process lives |
//! | `GET /readyz` | — | 200 once [`ReadyFlag`] is set, else 503 |
//!
//! Every error is `{"error": "..."}` ([`ErrorBody`]): 400 for a bad request (the message names
//! the field, or the config file and JSON path), 404 for an unknown id, 409 when the engine
//! refuses the command, 503 when the loop does not answer. The request and response types are
//! public so the CLI in this crate uses the very types the server parses; client and server
//! ship in the same binary, so they change together.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::Action;
use warpline_shared::partition::{self, Partition};

use crate::auth::{self, Auth, Identity};
use crate::engine::{BackfillAction, BackfillRequest, Event, OperatorCommand, OperatorError};
use crate::fleet::metrics::{LatencySnapshot, StepLatency};

/// How long a handler waits for the event loop's answer by default.
pub const DEFAULT_ENGINE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs in progress at once when a submit does not say.
pub const DEFAULT_MAX_PARALLEL: usize = 8;

/// `POST /v1/backfills`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// Where the config lives, as an absolute path the coordinator and workers also see (inputs
    /// are resolved against its directory).
    pub pipeline_file: String,
    /// The config file's JSON.
    pub pipeline: serde_json::Value,
    /// Months: `FROM..TO` or one `YYYY-MM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub months: Option<String>,
    /// Datasets: `a,b,c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datasets: Option<String>,
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
}

/// The order in which a backfill's runs start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PartitionOrder {
    /// As given: each dataset's months, oldest first.
    #[default]
    Asc,
    /// Newest month first (every dataset of the newest month, then the month before).
    Desc,
}

/// The answer to a submit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitResponse {
    /// The new backfill.
    pub backfill_id: Uuid,
    /// How many runs it has (one per partition).
    pub runs: usize,
}

/// `POST /v1/runs/{id}/resolve`: an operator's answer to an escalation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// proceed, retry or halt.
    pub action: Action,
    /// Why (required, and audited).
    pub reason: String,
    /// Who, when the API has no tokens (with tokens the authenticated identity is audited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
}

/// Every error's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// Why a request failed; each variant is one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or names a bad config or partitions.
    #[error("{0}")]
    BadRequest(String),
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
        }
    }

    /// The same handle with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> EngineHandle {
        self.timeout = timeout;
        self
    }

    /// Hands a backfill to the loop; resolves once it is durable.
    pub async fn submit(&self, req: BackfillRequest) -> Result<Uuid, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Submit(Box::new(req), Some(tx)))?;
        self.wait(rx).await
    }

    /// Sends an operator command and waits for the loop's answer.
    pub async fn command(&self, cmd: OperatorCommand) -> Result<serde_json::Value, ApiError> {
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
        ApiError::BadRequest(format!("invalid request body: {}", e.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
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
}

type Answer = Result<Json<serde_json::Value>, ApiError>;

/// The API's routes over one engine. `ready` gates `/readyz` only: every other route answers as
/// soon as the loop does.
pub fn router(handle: EngineHandle, ready: ReadyFlag) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/backfills", post(submit).get(list))
        .route("/v1/backfills/{id}", get(status))
        .route("/v1/backfills/{id}/cancel", post(cancel))
        .route("/v1/backfills/{id}/retry-failed", post(retry_failed))
        .route("/v1/escalations", get(escalations))
        .route("/v1/runs/{id}/resolve", post(resolve))
        .route("/v1/backfills/{id}/resolve", post(resolve_backfill))
        .route("/v1/workers", get(workers))
        .with_state(AppState {
            engine: handle,
            ready,
        })
}

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

async fn metrics(State(latency): State<Arc<StepLatency>>) -> Json<LatencySnapshot> {
    Json(latency.snapshot())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(st): State<AppState>) -> Response {
    if st.ready.is_ready() {
        Json(serde_json::json!({"ready": true})).into_response()
    } else {
        ApiError::Unavailable(
            "not ready: the coordinator has not taken the leader lock and restored its state yet"
                .into(),
        )
        .into_response()
    }
}

/// Parses an id from the URL, naming what it should have been.
fn parse_id(what: &str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::BadRequest(format!("invalid {what} id `{raw}`: expected a UUID")))
}

/// Checks a submit and turns it into a backfill.
pub fn build_backfill(req: SubmitRequest) -> Result<BackfillRequest, ApiError> {
    let bad = ApiError::BadRequest;
    let file = Path::new(&req.pipeline_file);
    if !file.is_absolute() {
        return Err(bad(format!(
            "`pipeline_file` must be an absolute path, got `{}`",
            req.pipeline_file
        )));
    }
    let text = serde_json::to_string(&req.pipeline).expect("a JSON value serialises");
    let mut pipeline = Pipeline::from_json(file, &text).map_err(|e| bad(e.to_string()))?;
    let vars: Vec<(String, String)> = req.vars.into_iter().collect();
    pipeline.set_vars(&vars).map_err(|e| bad(e.to_string()))?;
    if let Some(dir) = &req.workdir {
        if !Path::new(dir).is_absolute() {
            return Err(bad(format!(
                "`workdir` must be an absolute path, got `{dir}`"
            )));
        }
        pipeline.set_workdir(Path::new(dir));
    }
    let mut partitions = partition::expand(req.months.as_deref(), req.datasets.as_deref())
        .map_err(|e| bad(e.to_string()))?;
    pipeline
        .check_partitions(&partitions)
        .map_err(|e| bad(format!("pipeline `{}`: {e}", req.pipeline_file)))?;
    order_partitions(&mut partitions, req.order);
    let max_parallel = req.max_parallel.unwrap_or(DEFAULT_MAX_PARALLEL);
    if max_parallel == 0 {
        return Err(bad("`max_parallel` must be at least 1".into()));
    }
    Ok(BackfillRequest {
        id: Uuid::now_v7(),
        pipeline: Arc::new(pipeline),
        partitions,
        max_parallel,
        priority: req.priority,
    })
}

/// Puts partitions in start order. `Desc` is a stable sort by month, newest first, so datasets
/// keep their given order within a month.
pub fn order_partitions(partitions: &mut [Partition], order: PartitionOrder) {
    if order == PartitionOrder::Desc {
        partitions.sort_by(|a, b| b.month.cmp(&a.month));
    }
}

async fn submit(
    State(st): State<AppState>,
    body: Result<Json<SubmitRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<SubmitResponse>), ApiError> {
    let Json(req) = body?;
    let backfill = build_backfill(req)?;
    let runs = backfill.partitions.len();
    let backfill_id = st.engine.submit(backfill).await?;
    Ok((
        StatusCode::CREATED,
        Json(SubmitResponse { backfill_id, runs }),
    ))
}

async fn list(State(st): State<AppState>) -> Answer {
    let cmd = OperatorCommand::Status { backfill_id: None };
    st.engine.command(cmd).await.map(Json)
}

async fn status(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> Answer {
    let backfill_id = Some(parse_id("backfill", &id)?);
    let cmd = OperatorCommand::Status { backfill_id };
    st.engine.command(cmd).await.map(Json)
}

async fn cancel(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> Answer {
    let backfill_id = parse_id("backfill", &id)?;
    let cmd = OperatorCommand::Cancel { backfill_id };
    st.engine.command(cmd).await.map(Json)
}

async fn retry_failed(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> Answer {
    let backfill_id = parse_id("backfill", &id)?;
    let cmd = OperatorCommand::RetryFailed { backfill_id };
    st.engine.command(cmd).await.map(Json)
}

async fn escalations(State(st): State<AppState>) -> Answer {
    st.engine
        .command(OperatorCommand::Escalations)
        .await
        .map(Json)
}

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
    with_operator(st.engine.command(cmd).await, operator)
}

/// `POST /v1/backfills/{id}/resolve` body: the answer to a backfill escalation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
async fn workers(State(st): State<AppState>) -> Answer {
    st.engine.command(OperatorCommand::Workers).await.map(Json)
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
        };
        let err = build_backfill(req).unwrap_err();
        assert!(
            matches!(&err, ApiError::BadRequest(m) if m.contains("absolute")),
            "{err}"
        );
    }
}
