//! Local mode's memory: a backfill rebuilt from its audit log (`warpline run --resume`), and
//! what earlier backfills did to each partition (`--reprocess`).
//!
//! Local mode keeps run state in memory only; its audit log is the whole story of every run.
//! [`replay`] rebuilds a backfill's runs by applying each record's move to a fresh
//! [`Machine`] through the machine's own checked methods (start, begin an attempt, receive,
//! decide, resolve, halt, resume): a log the machine cannot follow is refused, naming the line,
//! rather than guessed at. [`check_unchanged`] renders every attempt already dispatched again
//! with the pipeline and variables given now, so a resume never continues a backfill whose
//! steps would now run something else.
//!
//! Runs cancelled by a signal (Ctrl-C or SIGTERM, not an operator's cancel) are not taken as
//! final: the replay leaves them where the signal found them, and the resume goes on from
//! there, as for a run that was in flight when the process was killed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use uuid::Uuid;
use warpline_shared::audit::{self, AuditEvent, AuditRecord};
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::{Severity, StepOutcome};
use warpline_shared::machine::{AttemptFacts, Receipt, RunState, RunStatus};
use warpline_shared::stage::RunScope;

use crate::engine::{BackfillRecord, PipelineSource, RunRecord};

/// Warnings kept per run, as the engine keeps them.
const MAX_WARNINGS_KEPT: usize = 50;

/// Reads a whole audit log, verifying its chain first.
pub fn read_log(path: &Path) -> anyhow::Result<Vec<AuditRecord>> {
    let open = || {
        std::fs::File::open(path)
            .with_context(|| format!("cannot open the audit log `{}`", path.display()))
    };
    audit::verify(BufReader::new(open()?)).map_err(|e| {
        anyhow::anyhow!(
            "the audit log `{}` does not verify ({e}): it cannot be resumed or compared with",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(open()?).lines().enumerate() {
        let line = line?;
        let (rec, _) = audit::parse_line(&line)
            .map_err(|e| anyhow::anyhow!("`{}` line {}: {e}", path.display(), i + 1))?;
        out.push(rec);
    }
    Ok(out)
}

/// The audit logs a local backfill of this workdir may have written: every `*.jsonl` in
/// `<workdir>/audit/`, and `--audit FILE` when given.
pub fn audit_files(workdir: &Path, explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(workdir.join("audit"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    if let Some(f) = explicit
        && f.exists()
        && !files.iter().any(|g| g == f)
    {
        files.push(f.to_path_buf());
    }
    files.sort();
    files
}

/// An earlier backfill found in an audit log.
#[derive(Debug, Clone)]
pub struct Found {
    /// The log holding it.
    pub file: PathBuf,
    /// The backfill.
    pub backfill_id: Uuid,
    /// When it was created.
    pub created: DateTime<Utc>,
}

/// The latest backfill of `pipeline` in `files` (or the one whose id starts with `prefix`).
pub fn find_backfill(
    files: &[PathBuf],
    pipeline: &str,
    prefix: Option<&str>,
) -> anyhow::Result<Found> {
    let mut found: Vec<Found> = Vec::new();
    for file in files {
        for r in read_log(file)? {
            if let (AuditEvent::BackfillCreated { pipeline: p, .. }, Some(id)) =
                (&r.event, r.backfill_id)
                && (p == pipeline || prefix.is_some())
                && prefix.is_none_or(|pre| id.to_string().starts_with(pre))
            {
                found.push(Found {
                    file: file.clone(),
                    backfill_id: id,
                    created: r.ts,
                });
            }
        }
    }
    found.sort_by_key(|f| f.created);
    match (prefix, found.len()) {
        (_, 0) => bail!(
            "no earlier backfill {} in {}: nothing to resume (run without --resume to start one)",
            match prefix {
                Some(p) => format!("with an id starting `{p}`"),
                None => format!("of pipeline `{pipeline}`"),
            },
            if files.is_empty() {
                "the workdir's `audit/` directory (it has no audit log)".to_string()
            } else {
                files
                    .iter()
                    .map(|f| format!("`{}`", f.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
        (Some(p), n) if n > 1 => bail!(
            "--resume={p} matches {n} backfills ({}): give a longer id",
            found
                .iter()
                .map(|f| f.backfill_id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => Ok(found.pop().expect("one at least")),
    }
}

/// A backfill rebuilt from its log.
#[derive(Debug)]
pub struct Replayed {
    /// The backfill, as the engine would hold it.
    pub backfill: BackfillRecord,
    /// Its runs.
    pub runs: Vec<RunRecord>,
    /// Runs a signal cancelled (not an operator): the resume takes them up where they were.
    pub interrupted: Vec<Uuid>,
    /// The backfill's earlier dispatches: (run, step index, attempt, attempt id, command, args).
    pub dispatched: Vec<Dispatched>,
}

/// One attempt the log says was dispatched.
#[derive(Debug, Clone)]
pub struct Dispatched {
    /// The record's line.
    pub seq: u64,
    /// The run.
    pub run_id: Uuid,
    /// The step's index.
    pub step: usize,
    /// The machine's attempt number.
    pub attempt: u32,
    /// The attempt id.
    pub attempt_id: Uuid,
    /// The rendered command.
    pub command: String,
    /// The rendered argv.
    pub args: Vec<String>,
}

/// Rebuilds backfill `backfill_id` from `records` for `pipeline` (its steps must be the ones
/// the log names, in order).
pub fn replay(
    records: &[AuditRecord],
    backfill_id: Uuid,
    pipeline: &Pipeline,
) -> anyhow::Result<Replayed> {
    let mut backfill: Option<BackfillRecord> = None;
    let mut runs: Vec<RunRecord> = Vec::new();
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    let mut interrupted: Vec<Uuid> = Vec::new();
    let mut dispatched = Vec::new();
    for r in records
        .iter()
        .filter(|r| r.backfill_id == Some(backfill_id))
    {
        let bad = |why: String| anyhow::anyhow!("audit line {}: {why}", r.seq);
        if let AuditEvent::BackfillCreated { pipeline: name, .. } = &r.event {
            if name != pipeline.name() {
                bail!(
                    "backfill {backfill_id} ran pipeline `{name}`, not `{}`: resume it with its own pipeline file",
                    pipeline.name()
                );
            }
            backfill = Some(BackfillRecord {
                id: backfill_id,
                pipeline: name.clone(),
                runs: Vec::new(),
                pending: VecDeque::new(),
                max_parallel: 1,
                priority: 0,
                cancelling: false,
                created_at: r.ts,
                source: PipelineSource::of(pipeline),
                escalated: None,
                halt_signatures: BTreeMap::new(),
                siblings: Default::default(),
                request: None,
                llm: Default::default(),
                after_blocked: false,
                partial_after: false,
            });
            continue;
        }
        let Some(b) = backfill.as_mut() else {
            bail!(
                "audit line {}: backfill {backfill_id} has a record before its `backfill_created`",
                r.seq
            );
        };
        let Some(run_id) = r.run_id else {
            match &r.event {
                AuditEvent::BackfillEscalated {
                    reason,
                    signature,
                    after_blocked,
                    ..
                } => {
                    b.escalated = Some(reason.clone());
                    // After-steps waiting for partitions that did not complete: said by the
                    // record, or (a log written before it said so) by the engine's signature.
                    b.after_blocked =
                        *after_blocked || signature.ends_with(": partitions did not complete");
                }
                AuditEvent::BackfillResolution { action, .. } => match action.as_str() {
                    "continue" => {
                        b.escalated = None;
                        if std::mem::take(&mut b.after_blocked) {
                            b.partial_after = true;
                        }
                    }
                    "retry-failed" => {
                        b.escalated = None;
                        b.after_blocked = false;
                    }
                    "cancel" => {
                        b.escalated = None;
                        b.after_blocked = false;
                        b.cancelling = true;
                    }
                    _ => {}
                },
                _ => {}
            }
            continue;
        };
        if let AuditEvent::RunCreated { partition, scope } = &r.event {
            index.insert(run_id, runs.len());
            b.runs.push(run_id);
            // Its machine runs its scope's steps, as the engine built it at submit.
            let view = (!scope.is_partition()).then(|| pipeline.view(*scope));
            let steps = view.as_ref().unwrap_or(pipeline);
            runs.push(RunRecord::new(
                run_id,
                backfill_id,
                partition.clone(),
                *scope,
                steps,
            ));
            continue;
        }
        let Some(&i) = index.get(&run_id) else {
            // A stale result naming a run this backfill never created changes nothing.
            continue;
        };
        let run = &mut runs[i];
        let limits: Vec<String> = run.machine.steps().iter().map(|s| s.id.clone()).collect();
        let m = &mut run.machine;
        let step_of = |id: &str| {
            limits.iter().position(|s| s == id).ok_or_else(|| {
                bad(format!(
                    "step `{id}` is not in the pipeline `{}` now: a resume needs the steps it ran",
                    pipeline.name()
                ))
            })
        };
        match &r.event {
            AuditEvent::Transition { from, to, .. } => {
                let now = m.state_name();
                if to == "CANCELLED" {
                    if b.cancelling {
                        m.cancel().map_err(|e| bad(e.to_string()))?;
                    } else if !interrupted.contains(&run_id) {
                        // A signal, not an operator: taken up again where it stopped.
                        interrupted.push(run_id);
                    }
                } else if *to == now && from != "CANCELLED" {
                    // The move was the decision's or the resolution's, replayed above.
                } else if from == "INIT" && now == "INIT" {
                    m.start().map_err(|e| bad(e.to_string()))?;
                } else if to == "HALTED" {
                    m.halt().map_err(|e| bad(e.to_string()))?;
                } else if from == "HALTED" {
                    m.resume().map_err(|e| bad(e.to_string()))?;
                    run.reason = None;
                    run.finished_at = None;
                } else if from == "CANCELLED" {
                    // A resume reopening an interrupted run (it was never cancelled here).
                    interrupted.retain(|id| *id != run_id);
                }
                let now = m.state_name();
                if to != "CANCELLED" && *to != now {
                    bail!(bad(format!(
                        "the run's transition {from} → {to} does not follow from its records (replayed: {now})"
                    )));
                }
            }
            AuditEvent::StepDispatched {
                step_id,
                attempt,
                attempt_id,
                command,
                args,
                ..
            } => {
                let step = step_of(step_id)?;
                let a = m
                    .begin_attempt(*attempt_id)
                    .map_err(|e| bad(e.to_string()))?;
                if a.step != step || a.attempt != *attempt {
                    bail!(bad(format!(
                        "dispatch of {step_id}#{attempt} does not follow from its records (replayed: {}#{})",
                        limits[a.step], a.attempt
                    )));
                }
                run.attempts_total[step] += 1;
                run.dispatched_at = Some(r.ts);
                dispatched.push(Dispatched {
                    seq: r.seq,
                    run_id,
                    step,
                    attempt: *attempt,
                    attempt_id: *attempt_id,
                    command: command.clone(),
                    args: args.clone(),
                });
            }
            AuditEvent::StepResult { outcome } => {
                let Some(attempt_id) = outcome.result.attempt_id else {
                    continue;
                };
                let facts = AttemptFacts::from_outcome(&outcome.result, &outcome.report);
                let Receipt::Accepted(a) = m.receive(attempt_id, facts) else {
                    bail!(bad(format!(
                        "a result for attempt {attempt_id}, which the replayed run does not await"
                    )));
                };
                for c in outcome.report.failed(Severity::Warn) {
                    if run.warnings.len() < MAX_WARNINGS_KEPT {
                        run.warnings.push(format!(
                            "{}: {} ({})",
                            outcome.result.step_id, c.name, c.detail
                        ));
                    }
                }
                let mut last: StepOutcome = outcome.clone();
                last.result.attempt = a.attempt;
                run.last = Some(Box::new(last));
                run.dispatched_at = None;
                run.hand_backs.clear();
            }
            AuditEvent::StepHandedBack {
                attempt_id, next, ..
            } if next == "redispatch" => {
                let a = m.abandon(*attempt_id).map_err(|e| bad(e.to_string()))?;
                run.attempts_total[a.step] = run.attempts_total[a.step].saturating_sub(1);
                run.dispatched_at = None;
            }
            AuditEvent::Decision {
                decision,
                model,
                requests,
                tokens,
                ..
            } => {
                let Some((a, facts)) = m.deciding().cloned() else {
                    bail!(bad("a decision for a run awaiting none".into()));
                };
                let applied = m.decide(decision.action).map_err(|e| bad(e.to_string()))?;
                run.close_attempt(
                    limits[a.step].clone(),
                    a.attempt,
                    &facts,
                    applied.applied,
                    decision.reason.clone(),
                );
                if model.is_some() || requests.is_some() {
                    let u = &mut b.llm;
                    u.decisions += 1;
                    u.requests += u64::from(requests.unwrap_or(1));
                    if let Some(t) = tokens {
                        u.input_tokens += t.input;
                        u.output_tokens += t.output;
                    }
                }
                if matches!(applied.to, RunState::Escalated(_)) {
                    run.reason = Some(decision.reason.clone());
                }
            }
            AuditEvent::Escalated { reason, .. } => run.reason = Some(reason.clone()),
            AuditEvent::OperatorResolution { action, .. } => {
                m.resolve(*action).map_err(|e| bad(e.to_string()))?;
                run.reason = None;
            }
            AuditEvent::RunFinished { state, reason, .. }
                if !interrupted.contains(&run_id) || *state != RunStatus::Cancelled =>
            {
                run.finished_at = Some(r.ts);
                run.reason = (*state != RunStatus::Complete).then(|| reason.clone());
            }
            _ => {}
        }
    }
    let Some(mut backfill) = backfill else {
        bail!("backfill {backfill_id} is not in this audit log");
    };
    for run in &mut runs {
        // Backfill-level runs are started by the engine's stages, never from `pending`.
        if run.scope.is_partition() && run.machine.state() == RunState::Init {
            backfill.pending.push_back(run.id);
        }
    }
    Ok(Replayed {
        backfill,
        runs,
        interrupted,
        dispatched,
    })
}

/// Refuses a resume whose pipeline or variables would render any attempt already dispatched
/// differently (another command, other arguments): the runs would continue with steps that are
/// not the ones their earlier steps ran with. Changes to what no attempt has reached yet, and
/// to limits (`max_attempts`, `timeout_s`, checks), are allowed.
pub fn check_unchanged(replayed: &Replayed, pipeline: &Pipeline) -> anyhow::Result<()> {
    let runs: HashMap<Uuid, (&warpline_shared::partition::Partition, RunScope)> = replayed
        .runs
        .iter()
        .map(|r| (r.id, (&r.partition, r.scope)))
        .collect();
    let mut views: HashMap<RunScope, Pipeline> = HashMap::new();
    let mut changed = Vec::new();
    for d in &replayed.dispatched {
        let (partition, scope) = runs[&d.run_id];
        let view = if scope.is_partition() {
            pipeline
        } else {
            views.entry(scope).or_insert_with(|| pipeline.view(scope))
        };
        let Some(step) = view.steps().get(d.step) else {
            changed.push(format!(
                "{} step {} (audit line {}) is no longer in the pipeline",
                scope.key(partition),
                d.step + 1,
                d.seq
            ));
            continue;
        };
        let step_id = &step.id;
        match view.render_step(d.step, partition, d.run_id, d.attempt, d.attempt_id) {
            Ok(spec) if spec.command == d.command && spec.args == d.args => {}
            Ok(spec) => changed.push(format!(
                "{} {step_id}#{} (audit line {}) ran `{} {}`, now `{} {}`",
                scope.key(partition),
                d.attempt,
                d.seq,
                d.command,
                d.args.join(" "),
                spec.command,
                spec.args.join(" ")
            )),
            Err(e) => changed.push(format!(
                "{} {step_id}#{} (audit line {}) no longer renders: {e}",
                scope.key(partition),
                d.attempt,
                d.seq
            )),
        }
        if changed.len() >= 5 {
            break;
        }
    }
    if changed.is_empty() {
        return Ok(());
    }
    bail!(
        "cannot resume backfill {}: the pipeline or its --var values changed what its steps run:\n  - {}\n\
         resume with the pipeline file, --var and --workdir it ran with, or start a new backfill \
         (without --resume; `--reprocess failed` skips the partitions that completed)",
        replayed.backfill.id,
        changed.join("\n  - ")
    )
}

/// The state of each run of `pipeline` in `records`, by the last transition it recorded:
/// partition key → (state, backfill).
pub fn run_states(records: &[AuditRecord], pipeline: &str) -> Vec<(String, RunStatus, Uuid)> {
    let mut ours: HashMap<Uuid, bool> = HashMap::new();
    let mut runs: BTreeMap<Uuid, (String, RunStatus, Uuid)> = BTreeMap::new();
    for r in records {
        let Some(bid) = r.backfill_id else { continue };
        match (&r.event, r.run_id) {
            (AuditEvent::BackfillCreated { pipeline: p, .. }, _) => {
                ours.insert(bid, p == pipeline);
            }
            (AuditEvent::RunCreated { partition, scope }, Some(id))
                if ours.get(&bid) == Some(&true) =>
            {
                runs.insert(id, (scope.key(partition), RunStatus::Init, bid));
            }
            (AuditEvent::Transition { to, .. }, Some(id)) => {
                if let Some(run) = runs.get_mut(&id) {
                    run.1 = to.parse().unwrap_or(RunStatus::Running);
                }
            }
            _ => {}
        }
    }
    runs.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_states_follow_the_last_transition() {
        let p = warpline_shared::partition::Partition {
            month: Some("2024-01".into()),
            dataset: None,
            vars: Default::default(),
        };
        let (b, r) = (Uuid::now_v7(), Uuid::now_v7());
        let rec = |seq, run_id, event| AuditRecord {
            seq,
            ts: Utc::now(),
            prev_hash: String::new(),
            backfill_id: Some(b),
            run_id,
            event,
        };
        let t = |from: &str, to: &str| AuditEvent::Transition {
            from: from.into(),
            to: to.into(),
            action: None,
        };
        let records = vec![
            rec(
                1,
                None,
                AuditEvent::BackfillCreated {
                    pipeline: "p".into(),
                    config: "p.json".into(),
                    partitions: 1,
                    agent: "rules".into(),
                },
            ),
            rec(
                2,
                Some(r),
                AuditEvent::RunCreated {
                    partition: p,
                    scope: RunScope::Partition,
                },
            ),
            rec(3, Some(r), t("INIT", "A")),
            rec(4, Some(r), t("A", "HALTED")),
        ];
        assert_eq!(
            run_states(&records, "p"),
            vec![("2024-01".to_string(), RunStatus::Halted, b)]
        );
        assert!(run_states(&records, "other").is_empty());
        let mut more = records.clone();
        more.push(rec(5, Some(r), t("HALTED", "A")));
        assert_eq!(run_states(&more, "p")[0].1, RunStatus::Running);
    }
}
