//! The web dashboard, served by `warpline serve` at `/` (beside the JSON API under `/v1`) and
//! by local mode with `warpline run --ui ADDR`, from this one router.
//!
//! Server-rendered HTML ([`pages`]) over the same engine answers as the API: every page is one
//! or two [`OperatorCommand`]s (`Status`, `Escalations`, `Workers`) plus, for a run, its
//! committed audit records ([`records`]). A small embedded script (`assets/app.js`, no
//! dependencies, no CDN) re-fetches the page's `<main>` every 3 s (`X-Warpline-Partial: 1`)
//! for live updates. Actions are plain HTML forms posted to `/ui/...`, each carrying the
//! session's CSRF token ([`Auth::csrf`]) and answered with a redirect back (post/redirect/get);
//! they become the same engine commands as the API's, under the authenticated identity.
//!
//! | route | shows |
//! | --- | --- |
//! | `GET /` | every backfill: progress, counts by state, rate, ETA, actions |
//! | `GET /backfills/{id}?state=&dataset=&q=&page=` | summary, escalations, the grid (100 rows a page) |
//! | `GET /backfills/{id}/runs/{run}` | the run's attempts (command, worker, exit, checks, decisions, log tail) and story |
//! | `GET /backfills/{id}/runs/{run}/log?attempt=&stream=` | a full log the coordinator can read (text) |
//! | `GET /backfills/{id}/audit` | whether the audit log's chain verifies |
//! | `GET /escalations`, `GET /fleet` | what waits for an operator; workers and pools |
//! | `GET/POST /login`, `POST /logout` | the token cookie |
//! | `POST /ui/backfills/{id}/{cancel,retry-failed,reprocess,resolve}`, `POST /ui/runs/{id}/resolve` | actions |

pub mod grid;
pub mod html;
pub mod pages;
pub mod records;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use uuid::Uuid;
use warpline_shared::audit::AuditEvent;
use warpline_shared::contracts::Action;

use crate::api::{ApiError, EngineHandle};
use crate::auth::{Auth, COOKIE, Credential, Identity};
use crate::engine::{
    BackfillAction, Escalation, OperatorAnswer, OperatorCommand, RunsShown, Summary,
};
use grid::{Filter, GridPage};
use pages::Ctx;
pub use records::Records;

/// The dashboard's stylesheet and script, embedded in the binary.
const CSS: &str = include_str!("assets/app.css");
const JS: &str = include_str!("assets/app.js");

/// The largest part of a log file served (its end).
const LOG_LIMIT: u64 = 1 << 20;

#[derive(Clone)]
struct UiState {
    engine: EngineHandle,
    records: Records,
    auth: Arc<Auth>,
    /// Where the fleet page reads queue depths (fleet mode), and the pools always shown.
    queues: Option<Queues>,
}

/// A broker to read queue depths from, and the pools (`serve --pool`) always shown.
pub type Queues = (Arc<crate::fleet::metrics::Broker>, Vec<String>);

/// The dashboard's routes. Put it behind [`crate::api::protect`] with the same `auth`.
pub fn router(engine: EngineHandle, records: Records, auth: Arc<Auth>) -> Router {
    router_with(engine, records, auth, None)
}

/// [`router`] whose fleet page shows each pool's queue depth, read from `queues`.
pub fn router_with(
    engine: EngineHandle,
    records: Records,
    auth: Arc<Auth>,
    queues: Option<Queues>,
) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/backfills/{id}", get(backfill))
        .route("/backfills/{id}/runs/{run}", get(run))
        .route("/backfills/{id}/runs/{run}/log", get(log))
        .route("/backfills/{id}/audit", get(audit))
        .route("/escalations", get(escalations))
        .route("/fleet", get(fleet))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/ui/backfills/{id}/cancel", post(cancel))
        .route("/ui/backfills/{id}/retry-failed", post(retry_failed))
        .route("/ui/backfills/{id}/reprocess", post(reprocess))
        .route("/ui/backfills/{id}/resolve", post(resolve_backfill))
        .route("/ui/runs/{id}/resolve", post(resolve_run))
        .route("/assets/app.css", get(css))
        .route("/assets/app.js", get(js))
        .with_state(UiState {
            engine,
            records,
            auth,
            queues,
        })
}

/// The request as a page sees it: who, the CSRF token, the flash message, partial or not.
struct Req {
    ctx: Ctx,
    partial: bool,
    query: HashMap<String, String>,
}

impl FromRequestParts<UiState> for Req {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &UiState) -> Result<Req, Response> {
        let who =
            parts.extensions.get::<Identity>().cloned().ok_or_else(|| {
                (StatusCode::UNAUTHORIZED, "authentication required").into_response()
            })?;
        let cred = parts
            .extensions
            .get::<Credential>()
            .cloned()
            .unwrap_or(Credential::None);
        let query: HashMap<String, String> = Query::try_from_uri(&parts.uri)
            .map(|Query(q)| q)
            .unwrap_or_default();
        let partial = parts
            .headers
            .get("x-warpline-partial")
            .is_some_and(|v| v == "1");
        Ok(Req {
            ctx: Ctx {
                who,
                csrf: st.auth.csrf(session(&st.auth, &cred)),
                flash: query.get("msg").cloned(),
                tokens: !st.auth.is_open(),
                back: parts.uri.path().to_string(),
                ended: st.engine.has_ended(),
            },
            partial,
            query,
        })
    }
}

/// The session a CSRF token is bound to: the presented token, or none for an open API.
fn session<'a>(auth: &Auth, cred: &'a Credential) -> Option<&'a str> {
    if auth.is_open() { None } else { cred.token() }
}

fn secure(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn page(title: &str, req: &Req, body: &str, live: bool) -> Response {
    let html = pages::layout(title, &req.ctx, body, req.partial, live);
    let mut resp = axum::response::Html(html).into_response();
    if req.partial {
        resp.headers_mut()
            .insert("x-warpline-partial", HeaderValue::from_static("1"));
    }
    secure(resp)
}

fn fail(req: &Req, e: ApiError) -> Response {
    let status = e.status();
    let mut resp = page("Error", req, &pages::error(&e.to_string()), false);
    *resp.status_mut() = status;
    resp
}

fn parse_uuid(what: &str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::BadRequest(format!("invalid {what} id `{raw}`: expected a UUID")))
}

/// Every backfill's summary, without their runs.
async fn summaries(st: &UiState) -> Result<Vec<Summary>, ApiError> {
    let cmd = OperatorCommand::Status {
        backfill_id: None,
        runs: RunsShown::None,
    };
    match st.engine.ask(cmd).await? {
        OperatorAnswer::Summaries(all) => Ok(all),
        other => Err(crate::api::unexpected_answer(&other)),
    }
}

/// One page of a backfill's grid (with `filter.run`, its summary with that run alone).
async fn grid_page(st: &UiState, id: Uuid, filter: Filter) -> Result<GridPage, ApiError> {
    let cmd = OperatorCommand::Grid {
        backfill_id: id,
        filter,
    };
    match st.engine.ask(cmd).await? {
        OperatorAnswer::Grid(g) => Ok(*g),
        other => Err(crate::api::unexpected_answer(&other)),
    }
}

async fn escalation_list(st: &UiState) -> Result<Vec<Escalation>, ApiError> {
    let v = st.engine.command(OperatorCommand::Escalations).await?;
    serde_json::from_value(v).map_err(|e| ApiError::Unavailable(format!("bad escalations: {e}")))
}

async fn index(State(st): State<UiState>, req: Req) -> Response {
    let (all, esc) = match (summaries(&st).await, escalation_list(&st).await) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(e), _) | (_, Err(e)) => return fail(&req, e),
    };
    page(
        "Backfills",
        &req,
        &pages::backfills(&req.ctx, &all, esc.len()),
        true,
    )
}

fn filter(q: &HashMap<String, String>) -> Filter {
    let nonempty = |k: &str| {
        q.get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    Filter {
        state: nonempty("state").and_then(|s| grid::Cell::parse(&s)),
        dataset: nonempty("dataset"),
        search: nonempty("q"),
        page: q.get("page").and_then(|p| p.parse().ok()).unwrap_or(0),
        run: None,
    }
}

async fn backfill(State(st): State<UiState>, Path(id): Path<String>, req: Req) -> Response {
    let result = async {
        let id = parse_uuid("backfill", &id)?;
        let f = filter(&req.query);
        let g = grid_page(&st, id, f.clone()).await?;
        Ok::<_, ApiError>((g, f, escalation_list(&st).await?))
    }
    .await;
    match result {
        Ok((g, f, esc)) => {
            let body = pages::backfill(&req.ctx, &g, &f, &esc);
            page(
                &format!("Backfill {}", g.summary.pipeline),
                &req,
                &body,
                true,
            )
        }
        Err(e) => fail(&req, e),
    }
}

async fn run(
    State(st): State<UiState>,
    Path((id, run)): Path<(String, String)>,
    req: Req,
) -> Response {
    let result = async {
        let bid = parse_uuid("backfill", &id)?;
        let rid = parse_uuid("run", &run)?;
        let only = Filter {
            run: Some(rid),
            ..Filter::default()
        };
        let s = grid_page(&st, bid, only).await?.summary;
        if !s.runs.iter().any(|r| r.run_id == rid) {
            return Err(ApiError::NotFound(format!(
                "no run `{rid}` in backfill `{bid}`"
            )));
        }
        let esc = escalation_list(&st).await?;
        let records = st
            .records
            .run(rid)
            .await
            .map_err(|e| ApiError::Unavailable(format!("{e:#}")))?;
        Ok((s, rid, esc, records))
    }
    .await;
    match result {
        Ok((s, rid, esc, records)) => {
            let r = s.runs.iter().find(|r| r.run_id == rid).expect("checked");
            let e = esc.iter().find(|e| e.run_id == rid);
            let body = pages::run(&req.ctx, &s, r, e, &records);
            page(&format!("Run {}", r.partition), &req, &body, true)
        }
        Err(e) => fail(&req, e),
    }
}

async fn log(
    State(st): State<UiState>,
    Path((_id, run)): Path<(String, String)>,
    req: Req,
) -> Response {
    let result = async {
        let rid = parse_uuid("run", &run)?;
        let aid = parse_uuid(
            "attempt",
            req.query.get("attempt").map(String::as_str).unwrap_or(""),
        )?;
        let stream = req.query.get("stream").map(String::as_str).unwrap_or("");
        let records = st
            .records
            .run(rid)
            .await
            .map_err(|e| ApiError::Unavailable(format!("{e:#}")))?;
        // Only a path a worker reported for this very attempt is ever opened.
        let path = records
            .iter()
            .find_map(|r| match &r.event {
                AuditEvent::StepResult { outcome } if outcome.result.attempt_id == Some(aid) => {
                    match stream {
                        "stdout" => outcome.result.stdout_path.clone(),
                        "stderr" => outcome.result.stderr_path.clone(),
                        _ => None,
                    }
                }
                _ => None,
            })
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no {stream:?} log recorded for attempt `{aid}` of run `{rid}`"
                ))
            })?;
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
            let mut f = std::fs::File::open(&path)?;
            let len = f.metadata()?.len();
            let from = len.saturating_sub(LOG_LIMIT);
            f.seek(SeekFrom::Start(from))?;
            let mut buf = Vec::new();
            f.take(LOG_LIMIT).read_to_end(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf).into_owned(), from))
        })
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .map_err(|e| ApiError::NotFound(format!("the coordinator cannot read that log: {e}")))?;
        Ok(read)
    }
    .await;
    match result {
        Ok((text, skipped)) => {
            let body = if skipped > 0 {
                format!("[… the first {skipped} bytes are not shown]\n{text}")
            } else {
                text
            };
            let mut resp = body.into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            secure(resp)
        }
        Err(e) => fail(&req, e),
    }
}

async fn audit(State(st): State<UiState>, Path(id): Path<String>, req: Req) -> Response {
    let result = async {
        let bid = parse_uuid("backfill", &id)?;
        summaries(&st)
            .await?
            .into_iter()
            .find(|s| s.backfill_id == bid)
            .ok_or_else(|| ApiError::NotFound(format!("no backfill `{bid}`")))
    }
    .await;
    match result {
        Ok(s) => {
            let check = records::verify_file(s.audit.clone()).await;
            page("Audit", &req, &pages::audit(&s, &check), false)
        }
        Err(e) => fail(&req, e),
    }
}

async fn escalations(State(st): State<UiState>, req: Req) -> Response {
    match (escalation_list(&st).await, summaries(&st).await) {
        (Ok(list), Ok(all)) => page(
            "Escalations",
            &req,
            &pages::escalations(&req.ctx, &list, &all),
            true,
        ),
        (Err(e), _) | (_, Err(e)) => fail(&req, e),
    }
}

async fn fleet(State(st): State<UiState>, req: Req) -> Response {
    match st.engine.workers().await {
        Ok(workers) => {
            let view = crate::api::build_fleet_view(workers, st.queues.as_ref()).await;
            page("Fleet", &req, &pages::fleet(&view), true)
        }
        Err(e) => fail(&req, e),
    }
}

async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// Only a local path may be a redirect target (no `//host` or `scheme:`).
fn local_path(p: &str) -> &str {
    if p.starts_with('/') && !p.starts_with("//") && !p.contains('\\') {
        p
    } else {
        "/"
    }
}

async fn login_form(
    State(st): State<UiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let next = local_path(q.get("next").map(String::as_str).unwrap_or("/")).to_string();
    if st.auth.is_open() {
        return Redirect::to(&next).into_response();
    }
    secure(axum::response::Html(pages::login(&next, None)).into_response())
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

async fn login(State(st): State<UiState>, Form(f): Form<LoginForm>) -> Response {
    let next = local_path(&f.next).to_string();
    let token = f.token.trim();
    if st.auth.is_open() {
        return Redirect::to(&next).into_response();
    }
    if st.auth.check(token).is_none() || token.contains(';') {
        let mut resp = axum::response::Html(pages::login(
            &next,
            Some("That token is not valid for this coordinator."),
        ))
        .into_response();
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        return secure(resp);
    }
    let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
    let mut resp = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
struct ActionForm {
    csrf: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    back: String,
}

/// Why a form was refused.
type Refusal = (StatusCode, &'static str);

/// Who acts, once the form's CSRF token matches the session (the middleware already refused
/// viewers and cross-site requests).
fn authorise(st: &UiState, parts: &Parts, f: &ActionForm) -> Result<Identity, Refusal> {
    let cred = parts
        .extensions
        .get::<Credential>()
        .cloned()
        .unwrap_or(Credential::None);
    let who = parts
        .extensions
        .get::<Identity>()
        .cloned()
        .ok_or((StatusCode::UNAUTHORIZED, "authentication required"))?;
    if !st.auth.csrf_ok(session(&st.auth, &cred), &f.csrf) {
        return Err((
            StatusCode::FORBIDDEN,
            "the form's CSRF token does not match this session: reload the page and try again",
        ));
    }
    if !who.can_act() {
        return Err((StatusCode::FORBIDDEN, "a viewer cannot act"));
    }
    Ok(who)
}

/// Back to `back` (or `fallback`) with a message.
fn done(back: &str, fallback: &str, msg: &str) -> Response {
    let to = if back.is_empty() {
        fallback
    } else {
        local_path(back)
    };
    let sep = if to.contains('?') { '&' } else { '?' };
    let to = format!("{to}{sep}msg={}", html::url_encode(msg));
    Redirect::to(&to).into_response()
}

/// The parts of a request and its form, for the action handlers.
struct RawParts {
    parts: Parts,
}

impl<S: Send + Sync> FromRequestParts<S> for RawParts {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<RawParts, Self::Rejection> {
        Ok(RawParts {
            parts: parts.clone(),
        })
    }
}

async fn logout(State(st): State<UiState>, a: RawParts, Form(f): Form<ActionForm>) -> Response {
    if let Err(r) = authorise_any(&st, &a.parts, &f) {
        return r.into_response();
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("warpline_token=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    resp
}

/// Like [`authorise`], for actions a viewer may take too (logging out).
fn authorise_any(st: &UiState, parts: &Parts, f: &ActionForm) -> Result<(), Refusal> {
    let cred = parts
        .extensions
        .get::<Credential>()
        .cloned()
        .unwrap_or(Credential::None);
    if st.auth.csrf_ok(session(&st.auth, &cred), &f.csrf) {
        Ok(())
    } else {
        Err((
            StatusCode::FORBIDDEN,
            "the form's CSRF token does not match",
        ))
    }
}

/// Where an action's answer sends the browser, with what happened.
enum Told {
    /// Back where its form came from.
    Back(String),
    /// To a page the action made (a reprocess's new backfill).
    To(String, String),
}

/// Every action form's course: authorised (its CSRF token, a role that may act), `act` run
/// with who acts, and its answer, or why it was refused, shown after a redirect back to the
/// form's page (or `fallback`).
async fn act<Fut>(
    st: &UiState,
    a: &RawParts,
    f: &ActionForm,
    fallback: &str,
    act: impl FnOnce(Identity) -> Fut,
) -> Response
where
    Fut: std::future::Future<Output = Result<Told, ApiError>>,
{
    let who = match authorise(st, &a.parts, f) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    match act(who).await {
        Ok(Told::Back(msg)) => done(&f.back, fallback, &msg),
        Ok(Told::To(to, msg)) => done("", &to, &msg),
        Err(e) => done(&f.back, fallback, &format!("error: {e}")),
    }
}

/// A form's reason, required: it goes into the audit log.
fn reason_of(f: &ActionForm) -> Result<String, ApiError> {
    match f.reason.trim() {
        "" => Err(ApiError::BadRequest(
            "give a reason: it goes into the audit log".into(),
        )),
        r => Ok(r.to_string()),
    }
}

async fn cancel(
    State(st): State<UiState>,
    Path(id): Path<String>,
    a: RawParts,
    Form(f): Form<ActionForm>,
) -> Response {
    let (s, id) = (&st, &id);
    act(s, &a, &f, &format!("/backfills/{id}"), |who| async move {
        let backfill_id = parse_uuid("backfill", id)?;
        (s.engine)
            .command(OperatorCommand::Cancel {
                backfill_id,
                operator: who.operator(None),
            })
            .await?;
        tracing::info!(operator = %who.name, %backfill_id, "cancelled from the dashboard");
        Ok(Told::Back(format!(
            "backfill cancelled by {}: nothing new starts; running steps finish",
            who.name
        )))
    })
    .await
}

async fn retry_failed(
    State(st): State<UiState>,
    Path(id): Path<String>,
    a: RawParts,
    Form(f): Form<ActionForm>,
) -> Response {
    let (s, id) = (&st, &id);
    act(s, &a, &f, &format!("/backfills/{id}"), |who| async move {
        let backfill_id = parse_uuid("backfill", id)?;
        let v = (s.engine)
            .command(OperatorCommand::RetryFailed {
                backfill_id,
                operator: who.operator(None),
            })
            .await?;
        Ok(Told::Back(format!(
            "{} halted run(s) resumed by {}",
            v["resumed"], who.name
        )))
    })
    .await
}

async fn reprocess(
    State(st): State<UiState>,
    Path(id): Path<String>,
    a: RawParts,
    Form(f): Form<ActionForm>,
) -> Response {
    let (s, id, form) = (&st, &id, &f);
    act(s, &a, &f, &format!("/backfills/{id}"), |who| async move {
        let backfill_id = parse_uuid("backfill", id)?;
        let mode = <crate::reprocess::Reprocess as clap::ValueEnum>::from_str(&form.action, false)
            .map_err(|_| {
                ApiError::BadRequest(format!(
                    "`{}` is not a reprocess mode: failed, missing or all",
                    form.action
                ))
            })?;
        let v = (s.engine)
            .command(OperatorCommand::Reprocess {
                backfill_id,
                mode,
                operator: who.operator(None),
            })
            .await?;
        let r: crate::api::ReprocessResponse = serde_json::from_value(v)
            .map_err(|e| ApiError::Unavailable(format!("unexpected reprocess answer: {e}")))?;
        tracing::info!(operator = %who.name, %backfill_id, new = %r.backfill_id, "reprocessed from the dashboard");
        // The answer is the new backfill's page.
        Ok(Told::To(
            format!("/backfills/{}", r.backfill_id),
            format!(
                "reprocess `{}` by {}: this backfill runs {} partition(s) of {} again{}",
                mode.as_str(),
                who.name,
                r.runs,
                r.reprocess_of,
                if r.skipped.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.skipped.describe(mode))
                }
            ),
        ))
    })
    .await
}

async fn resolve_backfill(
    State(st): State<UiState>,
    Path(id): Path<String>,
    a: RawParts,
    Form(f): Form<ActionForm>,
) -> Response {
    let (s, id, form) = (&st, &id, &f);
    act(s, &a, &f, &format!("/backfills/{id}"), |who| async move {
        let backfill_id = parse_uuid("backfill", id)?;
        let action = match form.action.as_str() {
            "continue" => BackfillAction::Continue,
            "cancel" => BackfillAction::Cancel,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown action `{other}`: continue or cancel"
                )));
            }
        };
        (s.engine)
            .command(OperatorCommand::ResolveBackfill {
                backfill_id,
                action,
                reason: reason_of(form)?,
                operator: who.operator(None),
            })
            .await?;
        Ok(Told::Back(format!(
            "backfill escalation answered by {}: {}",
            who.name, form.action
        )))
    })
    .await
}

async fn resolve_run(
    State(st): State<UiState>,
    Path(id): Path<String>,
    a: RawParts,
    Form(f): Form<ActionForm>,
) -> Response {
    let (s, id, form) = (&st, &id, &f);
    act(s, &a, &f, "/escalations", |who| async move {
        let run_id = parse_uuid("run", id)?;
        let action = match form.action.as_str() {
            "proceed" => Action::Proceed,
            "retry" => Action::Retry,
            "halt" => Action::Halt,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown action `{other}`: proceed, retry or halt"
                )));
            }
        };
        let v = (s.engine)
            .command(OperatorCommand::Resolve {
                run_id,
                action,
                reason: reason_of(form)?,
                operator: who.operator(None),
            })
            .await?;
        Ok(Told::Back(format!(
            "resolved by {}: {action}; the run is now {}",
            who.name,
            v["state"].as_str().unwrap_or("?")
        )))
    })
    .await
}
