//! The operator commands that talk to a running coordinator over its HTTP API (see
//! [`crate::api`]): `submit`, `status`, `escalations`, `resolve`, `cancel`, `retry-failed` and `reprocess`.
//! `submit --wait` hands the new backfill to [`super::watch`] (the command line wires the two).
//!
//! Output for people goes to standard error or is a table on standard output; `--json` prints
//! exactly what the coordinator answered. An unreachable coordinator is named with its URL.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, bail};
use uuid::Uuid;
use warpline_shared::contracts::Action;
use warpline_shared::machine::RunStatus;

use super::client::Client;
use super::report::{counts_line, duration, passed_per_step};
use super::run::{parse_vars, read_partitions};
use super::{
    BackfillArgs, EscalationsArgs, ReprocessArgs, Resolution, ResolveArgs, StatusArgs, SubmitArgs,
};
use crate::api::{ResolveBackfillRequest, ResolveRequest, SubmitRequest, SubmitResponse};
use crate::engine::{BackfillAction, BackfillStage, Escalation, RunSummary, Summary};
use crate::fleet::capability;
use warpline_shared::config::Pipeline;
use warpline_shared::fleet::Heartbeat;
use warpline_shared::partition::{self, Partition};

/// A backfill just submitted with `--wait`: the caller follows it.
pub struct Submitted {
    /// The client that submitted it.
    pub client: Client,
    /// The backfill's id.
    pub id: String,
}

/// `warpline submit`: prints the new backfill's id (or, with `--json`, the answer) and returns
/// it when `--wait` asks the caller to follow it.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<Option<Submitted>> {
    let client = Client::new(&args.api)?;
    let file = std::path::absolute(&args.pipeline)
        .with_context(|| format!("invalid pipeline path `{}`", args.pipeline.display()))?;
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read pipeline config `{}`", file.display()))?;
    let pipeline: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("invalid pipeline config `{}`", file.display()))?;
    let workdir = args
        .workdir
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("invalid --workdir")?;
    let partitions = args
        .partitions_file
        .as_deref()
        .map(read_partitions)
        .transpose()?;
    if args.dry_run {
        let text = dry_run(&args, &file, &text, partitions, workdir.as_deref(), &client).await?;
        print!("{text}");
        return Ok(None);
    }
    let req = SubmitRequest {
        pipeline_file: file.display().to_string(),
        pipeline,
        months: args.partitions.months,
        datasets: args.partitions.datasets,
        partitions,
        allow_unrunnable: args.allow_unrunnable,
        vars: parse_vars(&args.vars)?
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        workdir: workdir.map(|w| w.display().to_string()),
        max_parallel: args.max_parallel.map(|m| m as usize),
        priority: args.priority,
        order: args.order,
        reprocess: args.reprocess,
        request_id: Some(
            args.request_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        ),
    };
    let request_id = req.request_id.clone().unwrap_or_default();
    let answer: SubmitResponse = match client.post("/v1/backfills", &req).await {
        Ok(answer) => answer,
        Err(e) if e.is_transient() => {
            return Err(anyhow::Error::new(e).context(format!(
                "the submit got no answer; it may still be applied: submit again with `--request-id {request_id}` to get its backfill rather than a second one"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let id = answer.backfill_id.to_string();
    for w in &answer.warnings {
        eprintln!("warpline: warning: {w}");
    }
    if let Some(skipped) = &answer.skipped {
        eprintln!("warpline: {}", skipped.describe(args.reprocess));
    }
    eprintln!(
        "warpline: submitted backfill {id}: {} runs of `{}` to {}",
        answer.runs,
        file.display(),
        client.base
    );
    if !args.wait {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&answer)?);
        } else {
            println!("{id}");
        }
        return Ok(None);
    }
    if !args.json {
        println!("{id}");
    }
    Ok(Some(Submitted { client, id }))
}

/// `submit --dry-run`: what the coordinator would be sent, rendered here as it would render
/// it (each step's argv, environment with secret references as written, artefacts and checks
/// for the first partitions), and which live workers may run each step by what they
/// advertise (when the coordinator answers). Nothing is submitted.
async fn dry_run(
    args: &SubmitArgs,
    file: &std::path::Path,
    text: &str,
    partitions: Option<Vec<Partition>>,
    workdir: Option<&std::path::Path>,
    client: &Client,
) -> anyhow::Result<String> {
    let partitions = match partitions {
        Some(p) => p,
        None => partition::expand(
            args.partitions.months.as_deref(),
            args.partitions.datasets.as_deref(),
        )?,
    };
    let mut pipeline =
        Pipeline::from_json_with_partition_vars(file, text, partition::var_names(&partitions))?;
    pipeline.set_vars(&parse_vars(&args.vars)?)?;
    if let Some(dir) = workdir {
        pipeline.set_workdir(dir);
    }
    pipeline.check_partitions(&partitions)?;
    let programs = std::collections::BTreeMap::new();
    let mut out = super::preflight::dry_run(&pipeline, &partitions, &programs)?;
    out.push_str(
        "
workers (programs resolve on them, not here):
",
    );
    match client
        .get::<Vec<crate::api::WorkerInfo>>("/v1/workers")
        .await
    {
        Ok(workers) => {
            let live: Vec<Heartbeat> = workers
                .into_iter()
                .map(|w| {
                    let mut hb = Heartbeat::new(w.worker_id, w.pool, w.slots, Vec::new(), 0);
                    hb.allow = w.allow;
                    hb
                })
                .collect();
            // Each step as its first run renders it (a backfill-level step in its own run).
            let views = super::preflight::Views::of(&pipeline);
            let mut specs = Vec::new();
            for (scope, p) in pipeline.plan(&partitions) {
                let view = views.get(scope);
                for index in 0..view.steps().len() {
                    let id = &view.steps()[index].id;
                    if specs
                        .iter()
                        .any(|s: &warpline_shared::contracts::StepSpec| &s.step_id == id)
                    {
                        continue;
                    }
                    if let Ok(spec) = view.render_step(index, &p, Uuid::nil(), 1, Uuid::nil()) {
                        specs.push(spec);
                    }
                }
            }
            for spec in &specs {
                let may: Vec<&str> = live
                    .iter()
                    .filter(|hb| capability::may_run(hb, spec))
                    .map(|hb| hb.worker_id.as_str())
                    .collect();
                let line = if may.is_empty() {
                    format!(
                        "  {}: no live worker of pool `{}` may run `{}`: submit refuses it without --allow-unrunnable\n",
                        spec.step_id, spec.pool, spec.command
                    )
                } else {
                    format!(
                        "  {}: {} (pool `{}`)\n",
                        spec.step_id,
                        may.join(", "),
                        spec.pool
                    )
                };
                out.push_str(&line);
            }
        }
        Err(e) => out.push_str(&format!("  not checked: {e}\n")),
    }
    Ok(out)
}

/// `warpline status`.
pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.api)?;
    let path = match &args.backfill {
        Some(id) => format!("/v1/backfills/{id}"),
        None => "/v1/backfills".into(),
    };
    let value: serde_json::Value = client.get(&path).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    let escalations: Vec<Escalation> = client.get("/v1/escalations").await?;
    if args.backfill.is_some() {
        let summary: Summary =
            serde_json::from_value(value).context("unexpected summary from the coordinator")?;
        print!("{}", render_status(&summary, &escalations));
    } else {
        let all: Vec<Summary> =
            serde_json::from_value(value).context("unexpected summaries from the coordinator")?;
        print!("{}", render_list(&all, &escalations));
    }
    let workers: Vec<serde_json::Value> = client.get("/v1/workers").await?;
    print!("{}", render_workers(&workers));
    Ok(ExitCode::SUCCESS)
}

/// The live workers as a table (workers heard from in the last three heartbeat intervals).
fn render_workers(workers: &[serde_json::Value]) -> String {
    if workers.is_empty() {
        return "\nworkers: none heard from (in-process workers send no heartbeats)\n".into();
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w["worker_id"].as_str().unwrap_or("?").to_string(),
                w["pool"].as_str().unwrap_or("?").to_string(),
                format!("{}/{}", w["running"], w["slots"]),
                format!(
                    "{:.1} s ago",
                    w["last_seen_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
                ),
                allowed(&w["allow"]),
            ]
        })
        .collect();
    format!(
        "\nworkers: {} live\n{}",
        workers.len(),
        table(&["WORKER", "POOL", "BUSY", "LAST HEARD", "ALLOWED"], &rows)
    )
}

/// A worker's advertised allowlist on one line: each entry, marked `(missing)` when its
/// program does not resolve on that worker.
fn allowed(allow: &serde_json::Value) -> String {
    let Some(entries) = allow.as_array() else {
        return "(not advertised)".into();
    };
    entries
        .iter()
        .map(|e| {
            let text = e["entry"].as_str().unwrap_or("?");
            if e["resolved"].is_string() {
                text.to_string()
            } else {
                format!("{text} (missing)")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `warpline escalations`.
pub async fn escalations(args: EscalationsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.api)?;
    let list: Vec<Escalation> = client.get("/v1/escalations").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    // Backfill-level escalations: a backfill that starts no new run until an operator answers.
    let all: Vec<Summary> = client.get("/v1/backfills").await?;
    let held: Vec<&Summary> = all.iter().filter(|s| s.escalated.is_some()).collect();
    for s in &held {
        println!(
            "backfill {} (`{}`) ESCALATED: {}\n  answer with: warpline resolve {} --action continue|cancel --reason TEXT",
            s.backfill_id,
            s.pipeline,
            s.escalated.as_deref().unwrap_or(""),
            s.backfill_id
        );
    }
    if list.is_empty() {
        if held.is_empty() {
            eprintln!("warpline: no run or backfill is waiting for an operator");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !held.is_empty() {
        println!();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            vec![
                e.run_id.to_string(),
                e.backfill_id.to_string(),
                e.partition.clone(),
                e.step.clone(),
                e.attempts.to_string(),
                e.reason.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["RUN", "BACKFILL", "PARTITION", "STEP", "ATTEMPTS", "REASON"],
            &rows
        )
    );
    eprintln!("answer with: warpline resolve RUN --action proceed|retry|halt --reason TEXT");
    Ok(ExitCode::SUCCESS)
}

/// `warpline resolve`.
pub async fn resolve(args: ResolveArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.api)?;
    if args.reason.trim().is_empty() {
        bail!("--reason must not be empty: say why, it goes into the audit log");
    }
    // With a token the coordinator audits the token's identity; without one it audits this
    // name, or `local` when there is none.
    let operator = args
        .operator
        .or_else(|| std::env::var("USER").ok())
        .filter(|u| !u.trim().is_empty());
    let action = match args.action {
        Resolution::Proceed => Action::Proceed,
        Resolution::Retry => Action::Retry,
        Resolution::Halt => Action::Halt,
        Resolution::Continue | Resolution::Cancel => {
            // A backfill escalation: the id names a backfill.
            let action = if args.action == Resolution::Continue {
                BackfillAction::Continue
            } else {
                BackfillAction::Cancel
            };
            let req = ResolveBackfillRequest {
                action,
                reason: args.reason,
                operator,
            };
            let id = find_backfill(&client, &args.run, true).await?;
            let answer: serde_json::Value = client
                .post(&format!("/v1/backfills/{id}/resolve"), &req)
                .await?;
            let counts = answer["counts"].to_string();
            println!(
                "backfill {id}: {action:?} by {}; runs {counts}",
                answer["operator"].as_str().unwrap_or("?")
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    let req = ResolveRequest {
        action,
        reason: args.reason,
        operator,
    };
    let (id, partition) = find_run(&client, &args.run).await?;
    let answer: serde_json::Value = client.post(&format!("/v1/runs/{id}/resolve"), &req).await?;
    println!(
        "run {id} ({partition}): {action} by {}; now {}",
        answer["operator"].as_str().unwrap_or("?"),
        answer["state"].as_str().unwrap_or("?")
    );
    Ok(ExitCode::SUCCESS)
}

/// `warpline cancel`.
pub async fn cancel(args: BackfillArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.api)?;
    let id = find_backfill(&client, &args.backfill, false).await?;
    let value: serde_json::Value = client
        .post(&format!("/v1/backfills/{id}/cancel"), &())
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    let s: Summary = serde_json::from_value(value).context("unexpected summary")?;
    let running = s.counts.get(&RunStatus::Running).copied().unwrap_or(0);
    println!(
        "backfill {}: cancelling; nothing new starts. Runs: {}",
        s.backfill_id,
        counts_line(&s)
    );
    if running > 0 {
        println!("{running} runs end CANCELLED once their running step finishes");
    }
    Ok(ExitCode::SUCCESS)
}

/// `warpline retry-failed`.
pub async fn retry_failed(args: BackfillArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.api)?;
    let id = find_backfill(&client, &args.backfill, false).await?;
    let value: serde_json::Value = client
        .post(&format!("/v1/backfills/{id}/retry-failed"), &())
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "backfill {id}: resumed {} halted runs at the step that failed",
        value["resumed"]
    );
    Ok(ExitCode::SUCCESS)
}

/// `warpline reprocess`.
pub async fn reprocess(args: ReprocessArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.api)?;
    let id = find_backfill(&client, &args.backfill, false).await?;
    let value: serde_json::Value = client
        .post(
            &format!("/v1/backfills/{id}/reprocess"),
            &serde_json::json!({"mode": args.mode}),
        )
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    let answer: crate::api::ReprocessResponse =
        serde_json::from_value(value).context("unexpected reprocess answer")?;
    println!(
        "backfill {}: runs {} partition(s) of backfill {id} again (reprocess `{}`)",
        answer.backfill_id,
        answer.runs,
        args.mode.as_str()
    );
    if !answer.skipped.is_empty() {
        eprintln!("warpline: {}", answer.skipped.describe(args.mode));
    }
    eprintln!("follow it with `warpline watch {}`", answer.backfill_id);
    Ok(ExitCode::SUCCESS)
}

/// The run `reference` names, like `warpline audit show`: a run id, a unique id prefix or a
/// partition key. A partition key in several backfills means the escalated run when exactly one
/// of them is escalated.
pub(crate) async fn find_run(client: &Client, reference: &str) -> anyhow::Result<(Uuid, String)> {
    let all: Vec<Summary> = client.get("/v1/backfills").await?;
    let runs = all.iter().flat_map(|s| &s.runs);
    match_run(runs, reference)
}

/// [`find_run`] over given summaries.
pub(crate) fn match_run<'a>(
    runs: impl Iterator<Item = &'a RunSummary>,
    reference: &str,
) -> anyhow::Result<(Uuid, String)> {
    let r = reference.trim().to_ascii_lowercase();
    if r.is_empty() {
        bail!("no run given: give a run id, an id prefix or a partition key");
    }
    let mut found: Vec<&RunSummary> = runs
        .filter(|run| run.run_id.to_string().starts_with(&r) || run.partition == reference.trim())
        .collect();
    if found.len() > 1 {
        let escalated: Vec<&RunSummary> = found
            .iter()
            .copied()
            .filter(|run| run.state == RunStatus::Escalated)
            .collect();
        if escalated.len() == 1 {
            found = escalated;
        }
    }
    match found.as_slice() {
        [one] => Ok((one.run_id, one.partition.clone())),
        [] => bail!(
            "no run matching `{reference}`: give a run id, an id prefix or a partition key \
             (see `warpline status BACKFILL`)"
        ),
        many => {
            let list: Vec<String> = many
                .iter()
                .take(10)
                .map(|run| format!("{} ({}, {})", run.run_id, run.partition, run.state))
                .collect();
            bail!(
                "`{reference}` matches {} runs: {}; give a longer id",
                many.len(),
                list.join(", ")
            )
        }
    }
}

/// The backfill `reference` names: an id, a unique id prefix or (unless `only_backfills`) a
/// reference to one of its runs.
pub(crate) async fn find_backfill(
    client: &Client,
    reference: &str,
    only_backfills: bool,
) -> anyhow::Result<Uuid> {
    if let Ok(id) = Uuid::parse_str(reference.trim()) {
        return Ok(id);
    }
    let all: Vec<Summary> = client.get("/v1/backfills").await?;
    match_backfill(&all, reference, only_backfills)
}

/// [`find_backfill`] over given summaries.
pub(crate) fn match_backfill(
    all: &[Summary],
    reference: &str,
    only_backfills: bool,
) -> anyhow::Result<Uuid> {
    let r = reference.trim().to_ascii_lowercase();
    let ids: Vec<Uuid> = all
        .iter()
        .map(|s| s.backfill_id)
        .filter(|id| !r.is_empty() && id.to_string().starts_with(&r))
        .collect();
    match ids.as_slice() {
        [one] => return Ok(*one),
        [] => {}
        many => bail!(
            "`{reference}` matches {} backfills: {}; give a longer id",
            many.len(),
            many.iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    if only_backfills {
        bail!("no backfill matching `{reference}`: give a backfill id or a unique id prefix");
    }
    let (run, _) = match_run(all.iter().flat_map(|s| &s.runs), reference).map_err(|_| {
        anyhow::anyhow!(
            "no backfill matching `{reference}`: give a backfill id, an id prefix, or a run of it \
             (run id, prefix or partition key)"
        )
    })?;
    Ok(all
        .iter()
        .find(|s| s.runs.iter().any(|x| x.run_id == run))
        .map(|s| s.backfill_id)
        .expect("the run came from a summary"))
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Runs per step of a summary: (running at it, past it, halted at it, escalated at it,
/// attempts of it).
fn step_rows(s: &Summary) -> Vec<Vec<String>> {
    let past = passed_per_step(s);
    s.steps
        .iter()
        .zip(past)
        .map(|(id, past)| {
            let at = |state: RunStatus| {
                s.runs
                    .iter()
                    .filter(|r| r.state == state && r.step.as_deref() == Some(id))
                    .count()
            };
            let attempts: u32 = s.runs.iter().filter_map(|r| r.attempts.get(id)).sum();
            vec![
                id.clone(),
                s.in_step.get(id).copied().unwrap_or(0).to_string(),
                past.to_string(),
                at(RunStatus::Halted).to_string(),
                at(RunStatus::Escalated).to_string(),
                attempts.to_string(),
            ]
        })
        .collect()
}

fn state_word(s: &Summary) -> &'static str {
    let parked = s.counts.get(&RunStatus::Escalated).copied().unwrap_or(0) > 0;
    match (s.finished, s.cancelling) {
        (true, _) if parked => "waiting for an operator",
        (true, true) => "cancelled",
        (true, false) => "finished",
        (false, true) => "cancelling",
        (false, false) => "running",
    }
}

/// `warpline status BACKFILL` for people.
pub(crate) fn render_status(s: &Summary, escalations: &[Escalation]) -> String {
    let mut out = format!(
        "backfill {} of `{}`: {}\n",
        s.backfill_id,
        s.pipeline,
        state_word(s)
    );
    out.push_str(&format!("runs: {} — {}\n", s.runs.len(), counts_line(s)));
    let stage_runs: Vec<&RunSummary> = s.runs.iter().filter(|r| !r.scope.is_partition()).collect();
    if !stage_runs.is_empty() {
        let stage = match s.stage {
            BackfillStage::Before => "before-steps (no partition starts until they complete)",
            BackfillStage::Partitions => "partitions",
            BackfillStage::After => "after-steps (every partition ended)",
            BackfillStage::Done => "done",
        };
        out.push_str(&format!("stage: {stage}\n"));
    }
    if let Some(why) = &s.escalated {
        out.push_str(&format!("ESCALATED: {why}\n"));
    }
    if s.warnings > 0 {
        let warned = s.runs.iter().filter(|r| !r.warnings.is_empty()).count();
        out.push_str(&format!("warnings: {} in {warned} runs\n", s.warnings));
    }
    let finals = s.runs.iter().filter(|r| r.state.is_final()).count();
    let eta = s.eta_s.map(duration).unwrap_or_else(|| "-".into());
    out.push_str(&format!(
        "progress: {finals}/{} final, {:.1} runs/min, ETA {eta}, {} steps executed, {} elapsed\n",
        s.runs.len(),
        s.runs_per_minute,
        s.steps_executed,
        duration(s.wall_ms / 1000)
    ));
    out.push('\n');
    out.push_str(&table(
        &[
            "STEP",
            "RUNNING",
            "PASSED",
            "HALTED",
            "ESCALATED",
            "ATTEMPTS",
        ],
        &step_rows(s),
    ));
    if !stage_runs.is_empty() {
        let rows: Vec<Vec<String>> = stage_runs
            .iter()
            .map(|r| {
                let attempts: Vec<String> = r
                    .steps
                    .iter()
                    .map(|id| format!("{id} {}", r.attempts.get(id).copied().unwrap_or(0)))
                    .collect();
                vec![
                    r.partition.clone(),
                    r.state.as_str().to_string(),
                    r.step.clone().unwrap_or_else(|| "-".into()),
                    attempts.join(", "),
                    r.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str("\nbackfill-level runs:\n");
        out.push_str(&table(
            &["RUN", "STATE", "STEP", "ATTEMPTS", "REASON"],
            &rows,
        ));
    }
    let failures: Vec<Vec<String>> = s
        .runs
        .iter()
        .filter(|r| r.state == RunStatus::Halted)
        .map(|r| {
            vec![
                r.partition.clone(),
                r.step.clone().unwrap_or_else(|| "-".into()),
                r.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    if !failures.is_empty() {
        out.push_str(&format!(
            "\nfailures ({}; `warpline retry-failed {}` resumes them):\n",
            failures.len(),
            s.backfill_id
        ));
        out.push_str(&table(&["PARTITION", "HALTED AT", "REASON"], &failures));
    }
    let mine: Vec<Vec<String>> = escalations
        .iter()
        .filter(|e| e.backfill_id == s.backfill_id)
        .map(|e| {
            vec![
                e.partition.clone(),
                e.step.clone(),
                e.run_id.to_string(),
                e.reason.clone(),
            ]
        })
        .collect();
    if !mine.is_empty() {
        out.push_str(&format!(
            "\nescalations ({}; answer with `warpline resolve RUN --action proceed|retry|halt --reason TEXT`):\n",
            mine.len()
        ));
        out.push_str(&table(&["PARTITION", "STEP", "RUN", "REASON"], &mine));
    }
    out.push_str(&format!(
        "\naudit log: {} (head {})\n",
        s.audit, s.audit_head
    ));
    out
}

/// `warpline status` (every backfill) for people.
pub(crate) fn render_list(all: &[Summary], escalations: &[Escalation]) -> String {
    if all.is_empty() {
        return "no backfills\n".into();
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            let n = |state: RunStatus| s.counts.get(&state).copied().unwrap_or(0).to_string();
            vec![
                s.backfill_id.to_string(),
                s.pipeline.clone(),
                state_word(s).to_string(),
                s.runs.len().to_string(),
                n(RunStatus::Complete),
                n(RunStatus::Running),
                n(RunStatus::Halted),
                n(RunStatus::Escalated),
                n(RunStatus::Cancelled),
                format!("{:.1}", s.runs_per_minute),
                s.eta_s.map(duration).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "BACKFILL",
            "PIPELINE",
            "STATE",
            "RUNS",
            "COMPLETE",
            "RUNNING",
            "HALTED",
            "ESCALATED",
            "CANCELLED",
            "RUNS/MIN",
            "ETA",
        ],
        &rows,
    );
    if !escalations.is_empty() {
        out.push_str(&format!(
            "\nruns waiting for an operator: {} (`warpline escalations`)\n",
            escalations.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_leave_the_last_unpadded() {
        let t = table(
            &["A", "LONGER", "LAST"],
            &[vec!["xyz".into(), "1".into(), "free text".into()]],
        );
        assert_eq!(t, "A    LONGER  LAST\nxyz  1       free text\n");
    }
}
