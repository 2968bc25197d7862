//! The dashboard's pages, rendered on the server from the engine's own answers ([`Summary`],
//! [`Escalation`], workers) and committed audit records. Pure functions of their inputs, so
//! they are tested without a server. Every piece of data goes through [`esc`]: run reasons,
//! partition keys, commands and log tails are untrusted text.

use std::collections::BTreeMap;
use std::fmt::Write;

use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_shared::contracts::{Severity, StepOutcome};
use warpline_shared::machine::RunStatus;
use warpline_shared::stage::RunScope;

use super::grid::{Cell, Filter, GridPage, summary_cells};
use super::html::{esc, url_encode};
use super::records::ChainCheck;
use crate::auth::Identity;
use crate::engine::{BackfillStage, Escalation, RunSummary, Summary};

/// What every page needs to know about the request.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Who is looking.
    pub who: Identity,
    /// The CSRF token for this session's forms.
    pub csrf: String,
    /// A message from the last action (`?msg=`).
    pub flash: Option<String>,
    /// True when the API has tokens (the header offers a logout).
    pub tokens: bool,
    /// The page's path, where a form's answer redirects.
    pub back: String,
    /// The loop has ended (a local run kept up with `--ui-stay`): nothing can be changed.
    pub ended: bool,
}

impl Ctx {
    /// True when the page draws actions: an operator looks, and the loop still runs.
    pub fn can_act(&self) -> bool {
        self.who.can_act() && !self.ended
    }
}

/// A form's hidden fields: the CSRF token and where to come back.
fn hidden(ctx: &Ctx) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"back\" value=\"{}\">",
        esc(&ctx.csrf),
        esc(&ctx.back)
    )
}

/// A full page, or with `partial` only its `<main>` content (for live updates).
pub fn layout(title: &str, ctx: &Ctx, body: &str, partial: bool, live: bool) -> String {
    let mut inner = String::new();
    if let Some(msg) = &ctx.flash {
        let class = if msg.starts_with("error") {
            "flash error"
        } else {
            "flash"
        };
        let _ = write!(inner, "<div class=\"{class}\">{}</div>", esc(msg));
    }
    if ctx.ended {
        inner.push_str(
            "<div class=\"banner\" id=\"ended\">This run has ended: the page is read only. \
Continue it with <code>warpline run PIPELINE --resume</code> (answer escalations with \
<code>--resolve RUN=ACTION</code>).</div>",
        );
    }
    inner.push_str(body);
    if partial {
        return inner;
    }
    let logout = if ctx.tokens {
        format!(
            "<form method=\"post\" action=\"/logout\">{}<button class=\"btn\" type=\"submit\">Log out</button></form>",
            hidden(ctx)
        )
    } else {
        String::new()
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title} · Warpline</title><link rel=\"stylesheet\" href=\"/assets/app.css\">\
<script src=\"/assets/app.js\" defer></script></head><body>\
<header><a class=\"brand\" href=\"/\">Warpline</a><nav><a href=\"/\">Backfills</a>\
<a href=\"/escalations\">Escalations</a><a href=\"/fleet\">Fleet</a></nav>\
<span class=\"who\"><span class=\"live\" id=\"live\"></span><span id=\"identity\">{name} · {role}</span>{logout}</span></header>\
<main id=\"main\" data-live=\"{every}\">{inner}</main></body></html>",
        title = esc(title),
        name = esc(&ctx.who.name),
        role = ctx.who.role.as_str(),
        every = if live { 3000 } else { 0 },
    )
}

/// A POST button to `action` (with the session's CSRF token), shown only to operators.
fn button(ctx: &Ctx, action: &str, label: &str, class: &str, confirm: Option<&str>) -> String {
    if !ctx.can_act() {
        return String::new();
    }
    let confirm = confirm
        .map(|c| format!(" data-confirm=\"{}\"", esc(c)))
        .unwrap_or_default();
    format!(
        "<form class=\"inline\" method=\"post\" action=\"{}\"{confirm}>{}\
<button class=\"btn {class}\" type=\"submit\">{}</button></form>",
        esc(action),
        hidden(ctx),
        esc(label)
    )
}

/// Whole seconds as `42s`, `3m 05s` or `1h 02m`.
fn dur(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// A coordinator timestamp as `2026-12-02 16:40:05Z` (UTC, to the second).
fn stamp(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

fn short(id: &Uuid) -> String {
    id.to_string()[..8].to_string()
}

/// `running`, `finished`, `cancelled`, `waiting for an operator`, ...
pub fn state_word(s: &Summary) -> &'static str {
    let parked =
        s.counts.get(&RunStatus::Escalated).copied().unwrap_or(0) > 0 || s.escalated.is_some();
    match (s.finished, s.cancelling) {
        (true, _) if parked => "waiting for an operator",
        (true, true) => "cancelled",
        (true, false) => "finished",
        (false, true) => "cancelling",
        (false, false) if s.escalated.is_some() => "escalated",
        (false, false) => "running",
    }
}

const STATES: [RunStatus; 6] = [
    RunStatus::Complete,
    RunStatus::Running,
    RunStatus::Halted,
    RunStatus::Escalated,
    RunStatus::Cancelled,
    RunStatus::Init,
];

fn chips(counts: &BTreeMap<RunStatus, usize>) -> String {
    let mut out = String::new();
    for st in STATES {
        if let Some(n) = counts.get(&st).filter(|n| **n > 0) {
            let _ = write!(out, "<span class=\"chip s-{st}\">{n} {st}</span>");
        }
    }
    out
}

fn progress_bar(s: &Summary) -> String {
    let total = s.total_runs().max(1) as f64;
    let mut out = String::from("<div class=\"bar\">");
    for (st, class) in [
        (RunStatus::Complete, "complete"),
        (RunStatus::Halted, "halted"),
        (RunStatus::Escalated, "escalated"),
        (RunStatus::Cancelled, "cancelled"),
        (RunStatus::Running, "running"),
    ] {
        let n = s.counts.get(&st).copied().unwrap_or(0);
        if n > 0 {
            let _ = write!(
                out,
                "<span class=\"{class}\" style=\"width:{:.2}%\"></span>",
                n as f64 * 100.0 / total
            );
        }
    }
    out.push_str("</div>");
    out
}

fn finals(s: &Summary) -> usize {
    s.final_runs()
}

/// The backfill's action buttons.
fn actions(ctx: &Ctx, s: &Summary) -> String {
    let id = s.backfill_id;
    let mut out = String::new();
    if !s.finished && !s.cancelling {
        out.push_str(&button(
            ctx,
            &format!("/ui/backfills/{id}/cancel"),
            "Cancel",
            "danger",
            Some("Cancel this backfill? Nothing new starts; running steps finish."),
        ));
    }
    if s.counts.get(&RunStatus::Halted).copied().unwrap_or(0) > 0 || s.escalated.is_some() {
        out.push_str(&button(
            ctx,
            &format!("/ui/backfills/{id}/retry-failed"),
            "Retry failed",
            "",
            None,
        ));
    }
    if s.finished {
        out.push_str(&reprocess_form(ctx, s));
    }
    out
}

/// Run the backfill's partitions again in a new backfill: those that did not complete, by
/// default; none when every run completed, so `all` is chosen then.
fn reprocess_form(ctx: &Ctx, s: &Summary) -> String {
    if !ctx.can_act() {
        return String::new();
    }
    let all_complete = s.all_complete();
    let mut options = String::new();
    for (mode, label) in [
        ("failed", "what did not complete"),
        ("missing", "what never ran"),
        ("all", "every partition"),
    ] {
        let sel = if (mode == "all") == all_complete && mode != "missing" {
            " selected"
        } else {
            ""
        };
        let _ = write!(options, "<option value=\"{mode}\"{sel}>{label}</option>");
    }
    format!(
        "<form class=\"inline reprocess\" method=\"post\" action=\"/ui/backfills/{}/reprocess\" \
data-confirm=\"Start a new backfill of this pipeline over these partitions?\">{}\
<select name=\"action\" aria-label=\"which partitions\">{options}</select>\
<button class=\"btn\" type=\"submit\">Reprocess</button></form>",
        s.backfill_id,
        hidden(ctx)
    )
}

/// `/`: every backfill.
pub fn backfills(ctx: &Ctx, all: &[Summary], escalations: usize) -> String {
    let mut h = String::from("<h1>Backfills</h1>");
    if escalations > 0 {
        let _ = write!(
            h,
            "<div class=\"banner\"><a href=\"/escalations\">{escalations} run(s) waiting for an operator</a></div>"
        );
    }
    if all.is_empty() {
        h.push_str("<p class=\"muted\">No backfill yet: submit one with <code>warpline submit PIPELINE --months FROM..TO</code>.</p>");
        return h;
    }
    h.push_str(
        "<table id=\"backfills\"><thead><tr><th>Backfill</th><th>Pipeline</th><th>State</th><th>Progress</th>\
<th>Runs by state</th><th class=\"num\">Runs/min</th><th class=\"num\">ETA</th><th class=\"num\">Steps run</th>\
<th class=\"num\">Warnings</th><th class=\"num\">LLM calls</th><th class=\"num\">LLM tokens (in + out)</th>\
<th>Submitted</th><th>Finished</th><th class=\"num\">Elapsed</th><th>Actions</th></tr></thead><tbody>",
    );
    for s in all.iter().rev() {
        let id = s.backfill_id;
        let _ = write!(
            h,
            "<tr data-backfill=\"{id}\"><td><a class=\"mono\" href=\"/backfills/{id}\">{}</a></td><td>{}</td><td>{}</td>\
<td>{}<span class=\"muted\">{}/{} final</span></td><td>{}</td><td class=\"num\">{:.1}</td><td class=\"num\">{}</td>\
<td class=\"num\">{}</td><td class=\"num warnings\">{}</td><td class=\"num llm\">{}</td><td class=\"num\">{}</td>\
<td class=\"mono\">{}</td><td class=\"mono\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            short(&id),
            esc(&s.pipeline),
            state_word(s),
            progress_bar(s),
            finals(s),
            s.total_runs(),
            chips(&s.counts),
            s.runs_per_minute,
            s.eta_s.map(dur).unwrap_or_else(|| "–".into()),
            s.steps_executed,
            s.warnings,
            s.llm.requests,
            if s.llm.requests == 0 {
                "–".to_string()
            } else {
                format!("{} + {}", s.llm.input_tokens, s.llm.output_tokens)
            },
            stamp(&s.submitted_at),
            s.finished_at
                .as_ref()
                .map(stamp)
                .unwrap_or_else(|| "–".into()),
            dur(s.wall_ms / 1000),
            actions(ctx, s),
        );
    }
    h.push_str("</tbody></table>");
    h
}

fn resolve_backfill_form(ctx: &Ctx, s: &Summary) -> String {
    if !ctx.can_act() {
        return String::new();
    }
    format!(
        "<form class=\"resolve\" method=\"post\" action=\"/ui/backfills/{}/resolve\">\
{}<select name=\"action\"><option value=\"continue\">continue</option>\
<option value=\"cancel\">cancel</option></select><input type=\"text\" name=\"reason\" required placeholder=\"why (audited)\">\
<button class=\"btn primary\" type=\"submit\">Resolve backfill</button></form>",
        s.backfill_id,
        hidden(ctx)
    )
}

/// `/backfills/{id}`: the summary, the grid (one page of it), its escalations.
pub fn backfill(ctx: &Ctx, g: &GridPage, f: &Filter, escalations: &[Escalation]) -> String {
    let s = &g.summary;
    let id = s.backfill_id;
    let mut h = format!(
        "<h1>Backfill <span class=\"mono\">{}</span> of <code>{}</code>: <span id=\"state\">{}</span></h1>",
        id,
        esc(&s.pipeline),
        state_word(s)
    );
    let _ = write!(
        h,
        "<div class=\"card\"><div>{} {}</div><dl class=\"facts\"><dt>Runs</dt><dd>{} ({} final)</dd>\
<dt>Rate</dt><dd>{:.1} runs/min, ETA {}</dd><dt>Steps executed</dt><dd>{}</dd><dt>Elapsed</dt><dd>{}</dd>\
<dt>Audit log</dt><dd><code>{}</code> head <code>{}</code> · <a href=\"/backfills/{id}/audit\">verify the chain</a></dd></dl>\
<div>{}</div></div>",
        progress_bar(s),
        chips(&s.counts),
        s.total_runs(),
        finals(s),
        s.runs_per_minute,
        s.eta_s.map(dur).unwrap_or_else(|| "–".into()),
        s.steps_executed,
        dur(s.wall_ms / 1000),
        esc(&s.audit),
        esc(&s.audit_head[..s.audit_head.len().min(16)]),
        actions(ctx, s),
    );
    if let Some(why) = &s.escalated {
        let _ = write!(
            h,
            "<div class=\"banner\" id=\"backfill-escalation\"><b>Backfill escalated:</b> {}{}</div>",
            esc(why),
            resolve_backfill_form(ctx, s)
        );
    }
    h.push_str(&backfill_level(s));
    let mine: Vec<&Escalation> = escalations.iter().filter(|e| e.backfill_id == id).collect();
    if !mine.is_empty() {
        let _ = write!(h, "<h2>Waiting for an operator ({})</h2>", mine.len());
        h.push_str(&escalation_table(ctx, &mine));
    }

    // The grid: the engine cut the page (`g`); its rows are the summary's partition runs.
    h.push_str("<h2>Partitions × steps</h2>");
    let _ = write!(
        h,
        "<form class=\"filters\" method=\"get\" action=\"/backfills/{id}\"><label>State <select name=\"state\"><option value=\"\">any</option>"
    );
    for c in Cell::ALL {
        let sel = if f.state == Some(c) { " selected" } else { "" };
        let _ = write!(h, "<option value=\"{0}\"{sel}>{0}</option>", c.name());
    }
    h.push_str("</select></label>");
    if !g.datasets.is_empty() {
        h.push_str("<label>Dataset <select name=\"dataset\"><option value=\"\">any</option>");
        for d in &g.datasets {
            let sel = if f.dataset.as_deref() == Some(d.as_str()) {
                " selected"
            } else {
                ""
            };
            let _ = write!(h, "<option value=\"{0}\"{sel}>{0}</option>", esc(d));
        }
        h.push_str("</select></label>");
    }
    let _ = write!(
        h,
        "<label>Partition <input type=\"text\" name=\"q\" value=\"{}\" placeholder=\"contains\"></label>\
<button class=\"btn\" type=\"submit\">Filter</button></form>",
        esc(f.search.as_deref().unwrap_or(""))
    );
    h.push_str("<div class=\"legend\">");
    for (c, n) in &g.totals {
        let _ = write!(
            h,
            "<span><i class=\"{0}\"></i>{0} <span class=\"muted\">{n}</span></span>",
            c.name()
        );
    }
    h.push_str("</div>");
    let _ = write!(
        h,
        "<div class=\"muted\" id=\"grid-count\">{} of {} runs match; page {} of {}</div>",
        g.matched,
        s.total_runs(),
        f.page + 1,
        g.pages
    );
    h.push_str("<div class=\"grid-wrap\"><table class=\"grid\" id=\"grid\"><thead><tr><th>Partition</th><th>State</th>");
    for step in &s.steps {
        let _ = write!(h, "<th>{}</th>", esc(step));
    }
    h.push_str("</tr></thead><tbody>");
    for run in s.runs.iter().filter(|r| r.scope.is_partition()) {
        let cells = summary_cells(run, &s.steps);
        let rid = run.run_id;
        let _ = write!(
            h,
            "<tr data-partition=\"{0}\"><td class=\"part\"><a href=\"/backfills/{id}/runs/{rid}\">{0}</a></td><td><span class=\"chip s-{1}\">{1}</span></td>",
            esc(&run.partition),
            esc(run.state.as_str())
        );
        for (step, (cell, n)) in s.steps.iter().zip(&cells) {
            let title = format!("{}: {}, {n} attempt(s)", step, cell.name());
            let _ = write!(
                h,
                "<td class=\"c {0}\" data-step=\"{1}\" data-state=\"{0}\" title=\"{2}\"><a href=\"/backfills/{id}/runs/{rid}#step-{3}\">{4}</a></td>",
                cell.name(),
                esc(step),
                esc(&title),
                url_encode(step),
                if *n > 0 { n.to_string() } else { String::new() }
            );
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table></div>");
    if g.pages > 1 {
        let link = |p: usize| {
            let mut q = format!("/backfills/{id}?page={p}");
            if let Some(c) = f.state {
                let _ = write!(q, "&state={}", c.name());
            }
            if let Some(d) = &f.dataset {
                let _ = write!(q, "&dataset={}", url_encode(d));
            }
            if let Some(x) = &f.search {
                let _ = write!(q, "&q={}", url_encode(x));
            }
            q
        };
        h.push_str("<div class=\"pages\">");
        if f.page > 0 {
            let _ = write!(h, "<a href=\"{}\">← previous</a>", esc(&link(f.page - 1)));
        }
        let _ = write!(h, "<span>page {} of {}</span>", f.page + 1, g.pages);
        if f.page + 1 < g.pages {
            let _ = write!(h, "<a href=\"{}\">next →</a>", esc(&link(f.page + 1)));
        }
        h.push_str("</div>");
    }
    h
}

/// The backfill's stage and its backfill-level runs (before-steps, after-steps), each with a
/// cell per step of its own; empty for a pipeline without such steps.
fn backfill_level(s: &Summary) -> String {
    let runs: Vec<&RunSummary> = s.runs.iter().filter(|r| !r.scope.is_partition()).collect();
    if runs.is_empty() {
        return String::new();
    }
    let id = s.backfill_id;
    let stage = match s.stage {
        BackfillStage::Before => "before-steps: no partition starts until they complete",
        BackfillStage::Partitions => "partitions",
        BackfillStage::After => "after-steps: every partition ended",
        BackfillStage::Done => "done",
    };
    let mut h = format!(
        "<h2>Backfill-level steps</h2><p>Stage: <b id=\"stage\" data-stage=\"{}\">{}</b></p>\
<table class=\"grid\" id=\"backfill-steps\"><thead><tr><th>Run</th><th>When</th><th>State</th><th>Steps</th><th>Reason</th></tr></thead><tbody>",
        esc(&format!("{:?}", s.stage).to_lowercase()),
        esc(stage)
    );
    for run in runs {
        let rid = run.run_id;
        let when = match run.scope {
            RunScope::Before => "before the first partition".to_string(),
            RunScope::AfterDataset => format!(
                "after dataset {}'s partitions",
                run.dataset.as_deref().unwrap_or("")
            ),
            _ => "after every partition".to_string(),
        };
        let _ = write!(
            h,
            "<tr data-run=\"{0}\"><td class=\"part\"><a href=\"/backfills/{id}/runs/{rid}\">{0}</a></td><td>{1}</td><td><span class=\"chip s-{2}\">{2}</span></td><td>",
            esc(&run.partition),
            esc(&when),
            esc(run.state.as_str())
        );
        for (step, (cell, n)) in run.steps.iter().zip(summary_cells(run, &run.steps)) {
            let _ = write!(
                h,
                "<span class=\"c {0}\" data-step=\"{1}\" data-state=\"{0}\" title=\"{1}: {0}, {n} attempt(s)\"><a href=\"/backfills/{id}/runs/{rid}#step-{2}\">{1}</a></span> ",
                cell.name(),
                esc(step),
                url_encode(step),
            );
        }
        let _ = write!(
            h,
            "</td><td>{}</td></tr>",
            esc(run.reason.as_deref().unwrap_or(""))
        );
    }
    h.push_str("</tbody></table>");
    h
}

fn resolve_run_form(ctx: &Ctx, run_id: Uuid) -> String {
    if !ctx.can_act() {
        return String::new();
    }
    format!(
        "<form class=\"resolve\" method=\"post\" action=\"/ui/runs/{run_id}/resolve\">\
{}<select name=\"action\">\
<option value=\"retry\">retry the step</option><option value=\"proceed\">proceed (accept it)</option>\
<option value=\"halt\">halt the run</option></select>\
<input type=\"text\" name=\"reason\" required placeholder=\"why (audited)\">\
<button class=\"btn primary\" type=\"submit\">Resolve</button></form>",
        hidden(ctx)
    )
}

fn escalation_table(ctx: &Ctx, list: &[&Escalation]) -> String {
    let mut h = String::from(
        "<table class=\"escalations\"><thead><tr><th>Partition</th><th>Step</th><th class=\"num\">Attempts</th><th>Reason</th><th>Answer</th></tr></thead><tbody>",
    );
    for e in list {
        let _ = write!(
            h,
            "<tr data-run=\"{}\"><td><a href=\"/backfills/{}/runs/{}\">{}</a></td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            e.run_id,
            e.backfill_id,
            e.run_id,
            esc(&e.partition),
            esc(&e.step),
            e.attempts,
            esc(&e.reason),
            if ctx.can_act() {
                resolve_run_form(ctx, e.run_id)
            } else {
                "<span class=\"muted\">an operator answers</span>".into()
            }
        );
    }
    h.push_str("</tbody></table>");
    h
}

/// `/escalations`: every run and backfill waiting for an operator.
pub fn escalations(ctx: &Ctx, list: &[Escalation], all: &[Summary]) -> String {
    let mut h = String::from("<h1>Escalations</h1>");
    let backfills: Vec<&Summary> = all.iter().filter(|s| s.escalated.is_some()).collect();
    if list.is_empty() && backfills.is_empty() {
        h.push_str("<p class=\"muted\">Nothing is waiting for an operator.</p>");
        return h;
    }
    for s in backfills {
        let _ = write!(
            h,
            "<div class=\"banner\"><b>Backfill <a class=\"mono\" href=\"/backfills/{0}\">{1}</a> of <code>{2}</code> escalated:</b> {3}{4}</div>",
            s.backfill_id,
            short(&s.backfill_id),
            esc(&s.pipeline),
            esc(s.escalated.as_deref().unwrap_or("")),
            resolve_backfill_form(ctx, s)
        );
    }
    if !list.is_empty() {
        let refs: Vec<&Escalation> = list.iter().collect();
        let _ = write!(h, "<h2>Runs ({})</h2>", list.len());
        h.push_str(&escalation_table(ctx, &refs));
    }
    h
}

/// `/fleet`: per pool its workers, slots busy and free and queue depth; per worker its pool,
/// slots, last heartbeat and allowlist as resolved on it.
pub fn fleet(view: &crate::api::FleetView) -> String {
    let mut h = String::from("<h1>Fleet</h1>");
    if view.workers.is_empty() {
        h.push_str("<p class=\"muted\">No worker heard from in the last three heartbeat intervals (local mode's in-process workers send none).</p>");
    }
    if !view.pools.is_empty() {
        h.push_str("<h2>Pools</h2><table id=\"pools\"><thead><tr><th>Pool</th><th class=\"num\">Workers</th><th class=\"num\">Slots busy</th><th class=\"num\">Slots free</th><th class=\"num\">Queued</th></tr></thead><tbody>");
        for p in &view.pools {
            let queued = p
                .queued
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into());
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(&p.pool),
                p.workers,
                p.busy,
                p.slots.saturating_sub(p.busy),
                esc(&queued)
            );
        }
        h.push_str("</tbody></table>");
    }
    if view.workers.is_empty() {
        return h;
    }
    h.push_str("<h2>Workers</h2><table id=\"workers\"><thead><tr><th>Worker</th><th>Pool</th><th class=\"num\">Busy / slots</th><th class=\"num\">Last heartbeat</th><th>Allowed (as resolved on it)</th></tr></thead><tbody>");
    for w in &view.workers {
        let allow = match &w.allow {
            None => "<span class=\"muted\">not advertised</span>".to_string(),
            Some(entries) => entries
                .iter()
                .map(|e| match &e.resolved {
                    Some(path) => format!(
                        "<div class=\"mono\">{} <span class=\"muted\">→ {}</span></div>",
                        esc(&e.entry),
                        esc(path)
                    ),
                    None => format!(
                        "<div class=\"mono\">{} <span class=\"muted\">(not found on this worker)</span></div>",
                        esc(&e.entry)
                    ),
                })
                .collect(),
        };
        let _ = write!(
            h,
            "<tr><td class=\"mono\">{}</td><td>{}</td><td class=\"num\">{} / {}</td><td class=\"num\">{:.1} s ago</td><td>{allow}</td></tr>",
            esc(&w.worker_id),
            esc(&w.pool),
            w.running,
            w.slots,
            w.last_seen_ms as f64 / 1000.0
        );
    }
    h.push_str("</tbody></table>");
    h
}

/// One attempt, assembled from the run's records.
#[derive(Default)]
struct Attempt<'a> {
    step: String,
    attempt: u32,
    attempt_id: Option<Uuid>,
    dispatched: Option<&'a AuditRecord>,
    outcome: Option<(&'a AuditRecord, &'a StepOutcome)>,
    lost: Option<String>,
    /// Decisions, overrides, escalations and operator answers, in order.
    after: Vec<&'a AuditRecord>,
}

fn attempts(records: &[AuditRecord]) -> Vec<Attempt<'_>> {
    let mut out: Vec<Attempt> = Vec::new();
    for r in records {
        match &r.event {
            AuditEvent::StepDispatched {
                step_id,
                attempt,
                attempt_id,
                ..
            } => out.push(Attempt {
                step: step_id.clone(),
                attempt: *attempt,
                attempt_id: Some(*attempt_id),
                dispatched: Some(r),
                ..Attempt::default()
            }),
            AuditEvent::StepResult { outcome } => {
                let aid = outcome.result.attempt_id;
                let slot = out
                    .iter()
                    .rposition(|a| aid.is_some() && a.attempt_id == aid)
                    .or_else(|| out.iter().rposition(|a| a.step == outcome.result.step_id));
                match slot {
                    Some(i) => out[i].outcome = Some((r, outcome)),
                    None => out.push(Attempt {
                        step: outcome.result.step_id.clone(),
                        attempt: outcome.result.attempt,
                        attempt_id: aid,
                        outcome: Some((r, outcome)),
                        ..Attempt::default()
                    }),
                }
            }
            AuditEvent::AttemptLost {
                attempt_id, reason, ..
            } => {
                if let Some(a) = out
                    .iter_mut()
                    .rev()
                    .find(|a| a.attempt_id == Some(*attempt_id))
                {
                    a.lost = Some(reason.clone());
                }
            }
            AuditEvent::Decision {
                step_id, attempt, ..
            } => {
                if let Some(a) = out
                    .iter_mut()
                    .rev()
                    .find(|a| &a.step == step_id && a.attempt == *attempt)
                {
                    a.after.push(r);
                }
            }
            AuditEvent::GuardOverride { .. }
            | AuditEvent::Escalated { .. }
            | AuditEvent::OperatorResolution { .. } => {
                if let Some(a) = out.last_mut() {
                    a.after.push(r);
                }
            }
            _ => {}
        }
    }
    out
}

/// A command line for people: arguments with spaces or quotes are single-quoted.
fn command_line(command: &str, args: &[String]) -> String {
    let mut out = command.to_string();
    for a in args {
        out.push(' ');
        if a.is_empty()
            || a.chars()
                .any(|c| c.is_whitespace() || "'\"\\$`;&|<>*?()".contains(c))
        {
            out.push('\'');
            out.push_str(&a.replace('\'', "'\\''"));
            out.push('\'');
        } else {
            out.push_str(a);
        }
    }
    out
}

/// Whether the coordinator can read a log file a worker wrote.
pub fn readable(path: &str) -> bool {
    std::fs::File::open(path).is_ok()
}

fn attempt_section(h: &mut String, a: &Attempt, bid: Uuid, rid: Uuid) {
    let verdict = a
        .outcome
        .map(|(_, o)| {
            if o.report.failed(Severity::Error).next().is_some() || o.result.exit_code != 0 {
                "halted"
            } else {
                "passed"
            }
        })
        .unwrap_or("");
    let _ = write!(
        h,
        "<div class=\"card attempt {verdict}\" id=\"attempt-{}\" data-step=\"{}\"><h3 id=\"step-{}\">{} · attempt {}</h3><dl class=\"facts\">",
        a.attempt_id.map(|x| x.to_string()).unwrap_or_default(),
        esc(&a.step),
        url_encode(&a.step),
        esc(&a.step),
        a.attempt
    );
    if let Some(r) = a.dispatched
        && let AuditEvent::StepDispatched {
            command,
            args,
            delay_ms,
            attempt_id,
            ..
        } = &r.event
    {
        let _ = write!(
            h,
            "<dt>Command</dt><dd><code class=\"command\">{}</code></dd><dt>Dispatched</dt><dd>{} (after {delay_ms} ms backoff) · attempt <code>{}</code></dd>",
            esc(&command_line(command, args)),
            r.ts.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
            attempt_id
        );
    }
    if let Some(why) = &a.lost {
        let _ = write!(h, "<dt>Lost</dt><dd class=\"bad\">{}</dd>", esc(why));
    }
    let mut log = None;
    if let Some((_, o)) = a.outcome {
        let res = &o.result;
        let _ = write!(
            h,
            "<dt>Worker</dt><dd class=\"mono\">{}</dd><dt>Exit</dt><dd class=\"{}\">exit code {}{}{}{}</dd><dt>Duration</dt><dd>{:.3} s{}</dd>",
            esc(&res.worker_id),
            if res.exit_code == 0 { "ok" } else { "bad" },
            res.exit_code,
            res.signal
                .map(|s| format!(", signal {s}"))
                .unwrap_or_default(),
            if res.timed_out { ", timed out" } else { "" },
            if res.lost { ", lost" } else { "" },
            res.duration_ms as f64 / 1000.0,
            res.started_at
                .map(|t| format!(" from {}", t.format("%H:%M:%S%.3f")))
                .unwrap_or_default(),
        );
        if let Some(e) = &res.error {
            let _ = write!(h, "<dt>Error</dt><dd class=\"bad\">{}</dd>", esc(e));
        }
        if !res.artefacts.is_empty() {
            h.push_str("<dt>Artefacts</dt><dd>");
            for (k, v) in &res.artefacts {
                let _ = write!(
                    h,
                    "<div><code>{}</code> → <code>{}</code></div>",
                    esc(k),
                    esc(v)
                );
            }
            h.push_str("</dd>");
        }
        let mut links = Vec::new();
        for (stream, path) in [("stdout", &res.stdout_path), ("stderr", &res.stderr_path)] {
            if let (Some(p), Some(aid)) = (path, a.attempt_id) {
                if readable(p) {
                    links.push(format!(
                        "<a href=\"/backfills/{bid}/runs/{rid}/log?attempt={aid}&amp;stream={stream}\">{stream}</a> <span class=\"muted mono\">{}</span>",
                        esc(p)
                    ));
                } else {
                    links.push(format!(
                        "{stream}: <span class=\"muted mono\">{}</span> (not readable by the coordinator)",
                        esc(p)
                    ));
                }
            }
        }
        if !links.is_empty() {
            let _ = write!(h, "<dt>Full logs</dt><dd>{}</dd>", links.join(" · "));
        }
        log = Some(&res.log_tail);
    }
    h.push_str("</dl>");
    if let Some((_, o)) = a.outcome
        && !o.report.checks.is_empty()
    {
        h.push_str("<table class=\"checks\"><thead><tr><th>Check</th><th>Kind</th><th>Severity</th><th>Result</th><th>Detail</th></tr></thead><tbody>");
        for c in &o.report.checks {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
                esc(&c.name),
                esc(&c.kind),
                match c.severity {
                    Severity::Error => "error",
                    Severity::Warn => "warn",
                },
                if c.passed { "ok" } else { "bad" },
                if c.passed { "passed" } else { "FAILED" },
                esc(&c.detail)
            );
        }
        h.push_str("</tbody></table>");
    }
    for r in &a.after {
        match &r.event {
            AuditEvent::Decision {
                agent,
                model,
                decision,
                latency_ms,
                tokens,
                fallback,
                ..
            } => {
                let _ = write!(
                    h,
                    "<div class=\"decision\"><b>Decision</b>: <span class=\"chip\">{}</span> by <b>{}</b>{}{} in {latency_ms} ms{} — {}</div>",
                    decision.action,
                    esc(agent),
                    model
                        .as_ref()
                        .map(|m| format!(" ({})", esc(m)))
                        .unwrap_or_default(),
                    tokens
                        .as_ref()
                        .map(|t| format!(", {} + {} tokens", t.input, t.output))
                        .unwrap_or_default(),
                    fallback
                        .as_ref()
                        .map(|f| format!(" (fallback: {})", esc(f)))
                        .unwrap_or_default(),
                    esc(&decision.reason)
                );
            }
            AuditEvent::GuardOverride {
                proposed,
                applied,
                reason,
                ..
            } => {
                let _ = write!(
                    h,
                    "<div class=\"override\"><b>Guard override</b>: {proposed} → {applied} — {}</div>",
                    esc(reason)
                );
            }
            AuditEvent::Escalated { reason, .. } => {
                let _ = write!(
                    h,
                    "<div class=\"escalated\"><b>Escalated</b> — {}</div>",
                    esc(reason)
                );
            }
            AuditEvent::OperatorResolution {
                operator,
                action,
                reason,
            } => {
                let _ = write!(
                    h,
                    "<div class=\"operator\"><b>Operator {}</b>: {action} — {}</div>",
                    esc(operator),
                    esc(reason)
                );
            }
            _ => {}
        }
    }
    if let Some(tail) = log.filter(|t| !t.is_empty()) {
        let _ = write!(h, "<h3>Log tail</h3><pre class=\"log\">{}</pre>", esc(tail));
    }
    h.push_str("</div>");
}

fn story_line(r: &AuditRecord) -> String {
    let what = match &r.event {
        AuditEvent::RunCreated { partition, scope } => {
            format!("created for {}", scope.label(partition))
        }
        AuditEvent::Transition { from, to, action } => format!(
            "{from} → {to}{}",
            action.map(|a| format!(" ({a})")).unwrap_or_default()
        ),
        AuditEvent::StepDispatched {
            step_id, attempt, ..
        } => format!("{step_id} attempt {attempt} dispatched"),
        AuditEvent::StepResult { outcome } => format!(
            "{} attempt {} finished: exit {} on {}, checks {:?}",
            outcome.result.step_id,
            outcome.result.attempt,
            outcome.result.exit_code,
            outcome.result.worker_id,
            outcome.report.status
        ),
        AuditEvent::StaleResult {
            step_id, reason, ..
        } => format!("stale result for {step_id}: {reason}"),
        AuditEvent::AttemptLost {
            step_id, reason, ..
        } => format!("{step_id} lost: {reason}"),
        AuditEvent::StepHandedBack {
            step_id,
            worker_id,
            reason,
            next,
            ..
        } => format!("{step_id} handed back by {worker_id}: {reason}; {next}"),
        AuditEvent::Decision {
            step_id,
            agent,
            decision,
            ..
        } => format!(
            "{step_id}: {} by {agent}: {}",
            decision.action, decision.reason
        ),
        AuditEvent::GuardOverride {
            proposed,
            applied,
            reason,
            ..
        } => format!("guard: {proposed} → {applied}: {reason}"),
        AuditEvent::Escalated { step_id, reason } => format!("escalated at {step_id}: {reason}"),
        AuditEvent::OperatorResolution {
            operator,
            action,
            reason,
        } => format!("operator {operator}: {action}: {reason}"),
        other => serde_json::to_value(other)
            .ok()
            .and_then(|v| v["event"].as_str().map(str::to_string))
            .unwrap_or_default(),
    };
    format!(
        "<tr><td class=\"num\">{}</td><td class=\"mono\">{}</td><td>{}</td></tr>",
        r.seq,
        r.ts.format("%H:%M:%S%.3f"),
        esc(&what)
    )
}

/// `/backfills/{b}/runs/{r}`: the run, every attempt in detail, and its story.
pub fn run(
    ctx: &Ctx,
    s: &Summary,
    run: &RunSummary,
    escalation: Option<&Escalation>,
    records: &[AuditRecord],
) -> String {
    let bid = s.backfill_id;
    let mut h = format!(
        "<h1>Run <code>{}</code> <span class=\"chip s-{}\" id=\"run-state\">{}</span></h1>\
<p><a href=\"/backfills/{bid}\">← backfill {} of <code>{}</code></a> · run <span class=\"mono\">{}</span></p>",
        esc(&run.partition),
        esc(run.state.as_str()),
        esc(run.state.as_str()),
        short(&bid),
        esc(&s.pipeline),
        run.run_id
    );
    if let Some(why) = &run.reason {
        let _ = write!(h, "<div class=\"card\"><b>Reason:</b> {}</div>", esc(why));
    }
    if let Some(e) = escalation {
        let _ = write!(
            h,
            "<div class=\"banner\" id=\"escalation\"><b>Waiting for an operator at {}</b> (attempt {}): {}{}</div>",
            esc(&e.step),
            e.attempts,
            esc(&e.reason),
            resolve_run_form(ctx, run.run_id)
        );
    }
    let list = attempts(records);
    let _ = write!(h, "<h2>Attempts ({})</h2>", list.len());
    if list.is_empty() {
        h.push_str("<p class=\"muted\">No attempt yet.</p>");
    }
    for a in &list {
        attempt_section(&mut h, a, bid, run.run_id);
    }
    let _ = write!(
        h,
        "<h2>Story ({} audit records)</h2><table class=\"story\"><thead><tr><th class=\"num\">Seq</th><th>Time</th><th>What</th></tr></thead><tbody>",
        records.len()
    );
    for r in records {
        h.push_str(&story_line(r));
    }
    h.push_str("</tbody></table>");
    h
}

/// `/backfills/{id}/audit`: whether the audit log's chain verifies.
pub fn audit(s: &Summary, check: &ChainCheck) -> String {
    let mut h = format!(
        "<h1>Audit log of backfill <span class=\"mono\">{}</span></h1><p><a href=\"/backfills/{}\">← backfill</a></p><div class=\"card\" id=\"chain\">",
        short(&s.backfill_id),
        s.backfill_id
    );
    match &check.result {
        Ok((lines, head)) => {
            let _ = write!(
                h,
                "<p class=\"ok\">The chain verifies: {lines} lines intact.</p><dl class=\"facts\"><dt>File</dt><dd><code>{}</code></dd><dt>Head</dt><dd><code>{}</code></dd><dt>Coordinator's head</dt><dd><code>{}</code></dd></dl>",
                esc(&check.file),
                esc(head),
                esc(&s.audit_head)
            );
        }
        Err(e) => {
            let _ = write!(
                h,
                "<p class=\"bad\">The chain does NOT verify.</p><p><code>{}</code>: {}</p>",
                esc(&check.file),
                esc(e)
            );
        }
    }
    h.push_str("</div>");
    h
}

/// `/login`.
pub fn login(next: &str, error: Option<&str>) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>Log in · Warpline</title><link rel=\"stylesheet\" href=\"/assets/app.css\"></head><body>\
<header><span class=\"brand\">Warpline</span></header><main><div class=\"card login\"><h1>Log in</h1>{}\
<form method=\"post\" action=\"/login\"><input type=\"hidden\" name=\"next\" value=\"{}\">\
<label>API token<input type=\"password\" name=\"token\" autocomplete=\"current-password\" required autofocus></label>\
<button class=\"btn primary\" type=\"submit\">Log in</button></form>\
<p class=\"muted\">A viewer's token shows everything; an operator's may also act. The token is kept in an HttpOnly cookie for this site only.</p></div></main></body></html>",
        error
            .map(|e| format!("<div class=\"flash error\">{}</div>", esc(e)))
            .unwrap_or_default(),
        esc(next)
    )
}

/// An error page's content.
pub fn error(message: &str) -> String {
    format!(
        "<h1>That did not work</h1><div class=\"flash error\">{}</div><p><a href=\"/\">Back to the backfills</a></p>",
        esc(message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{FleetView, PoolView, WorkerInfo};
    use warpline_shared::fleet::AllowedCommand;

    #[test]
    fn the_backfill_page_shows_the_stage_and_the_backfill_level_runs_with_their_steps() {
        let run = |partition: &str, scope: Option<&str>, state: &str, step: Option<&str>| {
            let mut r = serde_json::json!({
                "run_id": Uuid::now_v7(), "partition": partition, "state": state,
                "attempts": {"LOAD": 1}, "step": step,
            });
            if let Some(scope) = scope {
                r["scope"] = scope.into();
                r["steps"] = serde_json::json!(["EXPORT", "PUBLISH"]);
                r["attempts"] = serde_json::json!({"EXPORT": 2});
            }
            r
        };
        let s: Summary = serde_json::from_value(serde_json::json!({
            "schema_version": 1, "backfill_id": Uuid::nil(), "pipeline": "p", "steps": ["LOAD"],
            "stage": "after", "counts": {}, "in_step": {}, "steps_executed": 3,
            "runs_per_minute": 0.0, "wall_ms": 0, "submitted_at": "2026-12-02T00:00:00Z", "finished": false, "cancelling": false,
            "audit": "a.jsonl", "audit_head": "00", "runs": [
                run("2024-01", None, "COMPLETE", None),
                run("_after", Some("after"), "RUNNING", Some("EXPORT")),
            ]
        }))
        .unwrap();
        let h = backfill_level(&s);
        assert!(h.contains("id=\"stage\" data-stage=\"after\""), "{h}");
        assert!(h.contains("<td>after every partition</td>"), "{h}");
        assert!(
            h.contains("data-step=\"EXPORT\" data-state=\"retrying\""),
            "{h}"
        );
        assert!(
            h.contains("data-step=\"PUBLISH\" data-state=\"pending\""),
            "{h}"
        );
        assert!(!h.contains("2024-01"), "partitions stay in the grid: {h}");
    }

    #[test]
    fn the_fleet_page_shows_pools_with_queue_depth_and_each_workers_resolved_allowlist() {
        let entry = |e: &str, resolved: Option<&str>| AllowedCommand {
            entry: e.into(),
            program: e.split(' ').next().unwrap().into(),
            pinned: Vec::new(),
            resolved: resolved.map(str::to_string),
        };
        let view = FleetView {
            workers: vec![WorkerInfo {
                worker_id: "w<1>".into(),
                pool: "etl".into(),
                slots: 4,
                running: 1,
                last_seen_ms: 1500,
                allow: Some(vec![
                    entry("load-batch", Some("/opt/bin/load-batch")),
                    entry("url_to_manifest", None),
                ]),
            }],
            pools: vec![
                PoolView {
                    pool: "etl".into(),
                    workers: 1,
                    slots: 4,
                    busy: 1,
                    queued: Some(7),
                },
                PoolView {
                    pool: "gpu".into(),
                    ..PoolView::default()
                },
            ],
        };
        let h = fleet(&view);
        assert!(h.contains("<td>etl</td><td class=\"num\">1</td><td class=\"num\">1</td><td class=\"num\">3</td><td class=\"num\">7</td>"), "{h}");
        // A watched pool with no worker, and a depth the broker did not give.
        assert!(h.contains("<td>gpu</td><td class=\"num\">0</td><td class=\"num\">0</td><td class=\"num\">0</td><td class=\"num\">?</td>"), "{h}");
        assert!(h.contains("w&lt;1&gt;"), "escaped: {h}");
        assert!(
            h.contains("load-batch <span class=\"muted\">→ /opt/bin/load-batch</span>"),
            "{h}"
        );
        assert!(
            h.contains("url_to_manifest <span class=\"muted\">(not found on this worker)</span>"),
            "{h}"
        );
        let empty = fleet(&FleetView {
            workers: Vec::new(),
            pools: Vec::new(),
        });
        assert!(empty.contains("No worker heard from"), "{empty}");
    }
}
