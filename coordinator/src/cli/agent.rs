//! `warpline agent replay`: asks an agent again at every decision point of an audit log and
//! shows how often it agrees with what was recorded.
//!
//! A decision point is rebuilt exactly from the log: the `decision` record carries the
//! `PipelineState` the agent was shown, and the run's `step_result` record for the same step
//! and attempt carries the StepResult and ValidationReport (with the log tail as audited,
//! bounded). The agent is asked at every point (no fast path, no budget, no shadow), and the
//! table compares the recorded proposal with the replayed one, action by action. Replay never
//! touches a run: it only reads the log and asks the agent.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;
use tokio::task::JoinSet;
use uuid::Uuid;
use warpline_shared::audit::{self, AuditEvent};
use warpline_shared::config::{AgentConfig, CallOn, Pipeline};
use warpline_shared::contracts::{Action, StepOutcome};

use super::ReplayArgs;
use crate::supervisor::settings::{AgentOverrides, build_agent};
use crate::supervisor::{Agent, DecisionInput};

/// The column for replays where the agent gave no decision of its own.
const FAILED: &str = "failed";

/// One rebuilt decision point.
struct Point {
    recorded: Action,
    input: Arc<DecisionInput>,
}

/// What a replay found.
#[derive(Debug, Serialize)]
struct Replay {
    audit: String,
    agent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    /// Decision points replayed.
    points: usize,
    /// Decision records that could not be replayed (no state or no result recorded).
    skipped: usize,
    /// Replayed proposals equal to the recorded ones.
    agreed: usize,
    /// `agreed / points` in percent.
    agreement_pct: f64,
    /// recorded action → replayed action (or `failed`) → count.
    table: BTreeMap<String, BTreeMap<String, usize>>,
}

fn read_points(path: &Path) -> anyhow::Result<(Vec<Point>, usize)> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot open the audit log `{}`", path.display()))?;
    let mut outcomes: HashMap<(Uuid, String, u32), StepOutcome> = HashMap::new();
    let mut points = Vec::new();
    let mut skipped = 0;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        let (rec, _) = audit::parse_line(&line)
            .map_err(|e| anyhow::anyhow!("`{}` line {}: {e}", path.display(), i + 1))?;
        let Some(run) = rec.run_id else { continue };
        match rec.event {
            AuditEvent::StepResult { outcome } => {
                let key = (run, outcome.result.step_id.clone(), outcome.result.attempt);
                outcomes.insert(key, outcome);
            }
            AuditEvent::Decision {
                step_id,
                attempt,
                decision,
                state,
                ..
            } => {
                let outcome = outcomes
                    .get(&(run, step_id.clone(), attempt))
                    .or_else(|| outcomes.get(&(run, step_id, 0)));
                match (state, outcome) {
                    (Some(state), Some(o)) => {
                        let mut result = o.result.clone();
                        result.attempt = attempt;
                        points.push(Point {
                            recorded: decision.action,
                            input: Arc::new(DecisionInput {
                                state: *state,
                                result,
                                report: o.report.clone(),
                            }),
                        });
                    }
                    _ => skipped += 1,
                }
            }
            _ => {}
        }
    }
    Ok((points, skipped))
}

/// `warpline agent replay`.
pub(crate) async fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = match &args.pipeline {
        Some(p) => Pipeline::load(p)?.config.agent,
        None => AgentConfig::default(),
    };
    // Ask at every point: a replay measures the agent, not the cost policy.
    cfg.call_on = CallOn::Always;
    cfg.budget = None;
    cfg.shadow = false;
    let overrides = AgentOverrides {
        kind: Some(args.agent.into()),
        model: args.llm.llm_model.clone(),
        base_url: args.llm.llm_base_url.clone(),
        shadow: false,
    };
    let agent = build_agent(&cfg, &overrides, &|k| std::env::var(k).ok())?;
    let model = agent.llm_agent().map(|l| l.settings().model.clone());
    let (points, skipped) = read_points(&args.audit)?;

    let mut tasks = JoinSet::new();
    for (i, p) in points.iter().enumerate() {
        let fut = agent.decide(p.input.clone());
        tasks.spawn(async move { (i, fut.await) });
    }
    let mut replayed: Vec<Option<String>> = vec![None; points.len()];
    while let Some(done) = tasks.join_next().await {
        let (i, reply) = done.context("a replay task panicked")?;
        // A fallback means the model gave no decision of its own.
        replayed[i] = Some(if reply.fallback.is_some() {
            FAILED.to_string()
        } else {
            reply.decision.action.to_string()
        });
    }
    let mut table: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut agreed = 0;
    for (p, r) in points.iter().zip(&replayed) {
        let r = r.clone().unwrap_or_else(|| FAILED.to_string());
        if r == p.recorded.as_str() {
            agreed += 1;
        }
        *table
            .entry(p.recorded.to_string())
            .or_default()
            .entry(r)
            .or_default() += 1;
    }
    let report = Replay {
        audit: args.audit.display().to_string(),
        agent: agent.name().to_string(),
        model,
        points: points.len(),
        skipped,
        agreed,
        agreement_pct: if points.is_empty() {
            0.0
        } else {
            (agreed as f64 * 1000.0 / points.len() as f64).round() / 10.0
        },
        table,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &Replay) {
    println!(
        "replayed {} decision points of `{}` with {}{} ({} skipped: no state or result recorded)",
        r.points,
        r.audit,
        r.agent,
        r.model
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default(),
        r.skipped
    );
    let cols: Vec<&str> = Action::ALL
        .iter()
        .map(|a| a.as_str())
        .chain([FAILED])
        .collect();
    print!("{:<20}", "recorded \\ replayed");
    for c in &cols {
        print!("{c:>10}");
    }
    println!("{:>10}", "agree");
    for a in Action::ALL {
        let Some(row) = r.table.get(a.as_str()) else {
            continue;
        };
        print!("{:<20}", a.as_str());
        for c in &cols {
            print!("{:>10}", row.get(*c).copied().unwrap_or(0));
        }
        let total: usize = row.values().sum();
        let same = row.get(a.as_str()).copied().unwrap_or(0);
        println!("{:>9.1}%", same as f64 * 100.0 / total.max(1) as f64);
    }
    println!(
        "agreement: {}/{} ({:.1}%)",
        r.agreed, r.points, r.agreement_pct
    );
}
