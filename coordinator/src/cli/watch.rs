//! Following a backfill on a coordinator (`warpline watch`, `warpline submit --wait`): polls its
//! summary every [`POLL`] and shows it as live bars on a terminal (one per step: runs past that
//! step; one overall: final runs), or as one line per change otherwise. Runs that halt or
//! escalate are named as they do. Ends when the backfill finishes; Ctrl-C stops watching only,
//! the backfill goes on (the bars are cleared and one line says where it stands, so nothing is
//! drawn twice).
//!
//! Rate and ETA are the coordinator's ([`Summary::runs_per_minute`], [`Summary::eta_s`], from
//! its own clock since the backfill started), not the bars' own since this process attached:
//! `watch` and the dashboard show the same numbers. The runs bar counts final runs and names
//! complete, halted, escalated and cancelled apart.

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warpline_shared::machine::RunStatus;

use super::WatchArgs;
use super::client::Client;
use super::report::duration;
use super::report::{exit_for, passed_per_step, print_end};
use crate::engine::Summary;
use crate::progress::prefix_width;

/// How often the summary is fetched.
pub const POLL: Duration = Duration::from_millis(500);
/// How long the coordinator may stay unreachable (a restart, a failover) before giving up.
pub const GIVE_UP: Duration = Duration::from_secs(60);

/// `warpline watch`.
pub async fn watch(args: WatchArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.api)?;
    follow_to_end(&client, &args.backfill, false, shutdown).await
}

/// Follows a backfill until it finishes, then prints its summary (as JSON with `json`, else
/// the last words) and exits 0 when every run completed, 1 otherwise, 130 when interrupted.
pub async fn follow_to_end(
    client: &Client,
    id: &str,
    json: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let Some(summary) = follow(client, id, shutdown).await? else {
        return Ok(ExitCode::from(130));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_end(&summary);
    }
    Ok(exit_for(&summary))
}

/// Shows a backfill until it finishes and returns its last summary, or `None` when interrupted.
pub(crate) async fn follow(
    client: &Client,
    id: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<Summary>> {
    // While it runs only the runs worth naming (halted, escalated, cancelled) come with the
    // counts, so a poll stays small at any backfill size; the last answer is the whole summary.
    let path = format!("/v1/backfills/{id}?runs=failed");
    let bars = std::io::stderr().is_terminal();
    let mut view: Option<View> = None;
    let mut failing_since: Option<Instant> = None;
    let mut last: Option<Summary> = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let got = tokio::select! {
            _ = shutdown.cancelled() => {
                if let Some(v) = &view {
                    v.clear();
                }
                if let Some(s) = &last {
                    eprintln!("{}", progress_line(s));
                }
                eprintln!("warpline: stopped watching; backfill {id} goes on (`warpline status {id}`)");
                return Ok(None);
            }
            got = async {
                tick.tick().await;
                client.get::<Summary>(&path).await
            } => got,
        };
        let summary = match got {
            Ok(s) => {
                failing_since = None;
                s
            }
            Err(e) if e.is_transient() => {
                let since = *failing_since.get_or_insert_with(|| {
                    eprintln!(
                        "warpline: {e}; trying again for up to {} s",
                        GIVE_UP.as_secs()
                    );
                    Instant::now()
                });
                if since.elapsed() > GIVE_UP {
                    return Err(e.into());
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let v = view.get_or_insert_with(|| View::new(bars, &summary));
        v.update(&summary);
        if summary.finished {
            v.abandon();
            let whole = client
                .get::<Summary>(&format!("/v1/backfills/{id}"))
                .await
                .unwrap_or(summary);
            return Ok(Some(whole));
        }
        last = Some(summary);
    }
}

fn finals(s: &Summary) -> u64 {
    s.final_runs() as u64
}

/// Attempts beyond the first of each step (retries, resumes and operator retries): the
/// coordinator's count, or what the listed runs show when it gives none.
fn retries(s: &Summary) -> u64 {
    let listed: u64 = s
        .runs
        .iter()
        .flat_map(|r| r.attempts.values())
        .map(|n| u64::from(n.saturating_sub(1)))
        .sum();
    s.retries.max(listed)
}

/// The coordinator's rate and ETA: `12.0 runs/min, ETA 3m 05s`.
fn rate(s: &Summary) -> String {
    format!(
        "{:.1} runs/min, ETA {}",
        s.runs_per_minute,
        s.eta_s.map(duration).unwrap_or_else(|| "-".into())
    )
}

/// The runs bar's message: the coordinator's rate, then each final (or parked) state apart.
fn message(s: &Summary) -> String {
    let n = |state: RunStatus| s.counts.get(&state).copied().unwrap_or(0);
    let mut m = format!(
        "{} · {} complete, {} halted, {} escalated, {} cancelled; {} retries",
        rate(s),
        n(RunStatus::Complete),
        n(RunStatus::Halted),
        n(RunStatus::Escalated),
        n(RunStatus::Cancelled),
        retries(s),
    );
    if s.cancelling {
        m.push_str("; cancelling");
    }
    m
}

/// The watch bars' look: prefix, bar, count and a message. No rate or ETA of the bar's own: it
/// would count only what happened since this process attached.
fn watch_style(width: usize, color: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{prefix:>{width}}} [{{bar:40.{color}/blue}}] {{pos:>5}}/{{len:5}} {{msg}}"
    ))
    .expect("valid template")
    .progress_chars("=> ")
}

/// Bars or lines.
enum View {
    Bars {
        multi: MultiProgress,
        steps: Vec<ProgressBar>,
        overall: ProgressBar,
        told: HashSet<(Uuid, String)>,
    },
    Lines {
        last: Option<(BTreeMap<RunStatus, usize>, BTreeMap<String, usize>)>,
        told: HashSet<(Uuid, String)>,
    },
}

impl View {
    fn new(bars: bool, s: &Summary) -> View {
        if !bars {
            return View::Lines {
                last: None,
                told: HashSet::new(),
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
        let width = prefix_width(&s.steps);
        let runs = s.total_runs() as u64;
        let steps = s
            .steps
            .iter()
            .zip(passed_per_step(s))
            .map(|(id, n)| {
                multi.add(
                    ProgressBar::new(runs)
                        .with_style(watch_style(width, "cyan"))
                        .with_prefix(id.clone())
                        .with_position(n),
                )
            })
            .collect();
        let overall = multi.add(
            ProgressBar::new(runs)
                .with_style(watch_style(width, "green"))
                .with_prefix("runs")
                .with_position(finals(s)),
        );
        overall.enable_steady_tick(Duration::from_millis(250));
        View::Bars {
            multi,
            steps,
            overall,
            told: HashSet::new(),
        }
    }

    fn update(&mut self, s: &Summary) {
        match self {
            View::Bars {
                multi,
                steps,
                overall,
                told,
            } => {
                for (bar, n) in steps.iter().zip(passed_per_step(s)) {
                    bar.set_position(n);
                }
                overall.set_position(finals(s));
                overall.set_message(message(s));
                for line in news(s, told) {
                    let _ = multi.println(line);
                }
            }
            View::Lines { last, told } => {
                let now = (s.counts.clone(), s.in_step.clone());
                if last.as_ref() != Some(&now) {
                    eprintln!("{}", progress_line(s));
                    *last = Some(now);
                }
                for line in news(s, told) {
                    eprintln!("{line}");
                }
            }
        }
    }

    fn abandon(&self) {
        if let View::Bars { steps, overall, .. } = self {
            overall.disable_steady_tick();
            for bar in steps {
                bar.abandon();
            }
            overall.abandon();
        }
    }

    /// Erases the bars (after Ctrl-C: the caller prints one line instead, so no bar is left
    /// half-drawn or drawn twice around the terminal's `^C`).
    fn clear(&self) {
        if let View::Bars { multi, overall, .. } = self {
            overall.disable_steady_tick();
            let _ = multi.clear();
        }
    }
}

/// `12:00:01 backfill 0190…: 3/10 final: 2 COMPLETE, 1 HALTED, 7 RUNNING (EXTRACT 4, ENRICH 3)`.
fn progress_line(s: &Summary) -> String {
    let counts: Vec<String> = s.counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let at: Vec<String> = s
        .steps
        .iter()
        .filter_map(|id| s.in_step.get(id).map(|n| format!("{id} {n}")))
        .collect();
    let at = if at.is_empty() {
        String::new()
    } else {
        format!(" ({})", at.join(", "))
    };
    format!(
        "{} backfill {}: {}/{} final: {}{at}; {}",
        chrono::Local::now().format("%H:%M:%S"),
        s.backfill_id,
        finals(s),
        s.total_runs(),
        counts.join(", "),
        message(s)
    )
}

/// Runs that halted or escalated since the last look, one line each.
fn news(s: &Summary, told: &mut HashSet<(Uuid, String)>) -> Vec<String> {
    s.runs
        .iter()
        .filter(|r| matches!(r.state, RunStatus::Halted | RunStatus::Escalated))
        .filter(|r| told.insert((r.run_id, format!("{}:{:?}", r.state, r.attempts))))
        .map(|r| {
            format!(
                "  {} {} at {}: {}",
                r.partition,
                r.state,
                r.step.as_deref().unwrap_or("-"),
                r.reason
                    .as_deref()
                    .unwrap_or("waiting for an operator (`warpline escalations`)")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::RunSummary;

    fn run(state: RunStatus, step: Option<&str>, attempts: &[(&str, u32)]) -> RunSummary {
        RunSummary {
            run_id: Uuid::now_v7(),
            partition: "p".into(),
            month: None,
            dataset: None,
            state,
            step: step.map(String::from),
            attempts: attempts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            reason: None,
            warnings: Vec::new(),
            scope: Default::default(),
            steps: Vec::new(),
        }
    }

    fn summary(runs: Vec<RunSummary>) -> Summary {
        let mut counts = BTreeMap::new();
        for r in &runs {
            *counts.entry(r.state).or_insert(0) += 1;
        }
        Summary {
            schema_version: 1,
            backfill_id: Uuid::nil(),
            pipeline: "p".into(),
            steps: vec!["A".into(), "B".into(), "C".into()],
            stage: crate::engine::BackfillStage::Partitions,
            counts,
            in_step: BTreeMap::new(),
            steps_executed: 0,
            runs_per_minute: 0.0,
            eta_s: None,
            wall_ms: 0,
            submitted_at: chrono::Utc::now(),
            finished_at: None,
            finished: false,
            cancelling: false,
            escalated: None,
            audit: String::new(),
            audit_head: String::new(),
            warnings: 0,
            llm: Default::default(),
            passed: Vec::new(),
            retries: 0,
            runs,
        }
    }

    #[test]
    fn runs_pass_the_steps_before_the_one_they_are_at() {
        let s = summary(vec![
            run(RunStatus::Complete, None, &[("A", 1), ("B", 1), ("C", 1)]),
            run(RunStatus::Running, Some("B"), &[("A", 1), ("B", 1)]),
            run(
                RunStatus::Halted,
                Some("C"),
                &[("A", 1), ("B", 1), ("C", 3)],
            ),
            run(RunStatus::Escalated, Some("A"), &[("A", 1)]),
            run(RunStatus::Cancelled, None, &[("A", 1), ("B", 1)]),
            run(RunStatus::Init, None, &[]),
        ]);
        assert_eq!(passed_per_step(&s), [4, 2, 1]);
        assert_eq!(finals(&s), 3);
        assert_eq!(retries(&s), 2);
    }

    #[test]
    fn the_runs_bar_names_each_state_and_the_coordinators_rate() {
        let mut s = summary(vec![]);
        s.counts = [
            (RunStatus::Complete, 5),
            (RunStatus::Halted, 2),
            (RunStatus::Escalated, 1),
            (RunStatus::Cancelled, 3),
        ]
        .into_iter()
        .collect();
        s.runs_per_minute = 12.5;
        s.eta_s = Some(185);
        assert_eq!(
            message(&s),
            "12.5 runs/min, ETA 3m 05s · 5 complete, 2 halted, 1 escalated, 3 cancelled; 0 retries"
        );
        s.cancelling = true;
        s.eta_s = None;
        assert!(
            message(&s).starts_with("12.5 runs/min, ETA - ·"),
            "{}",
            message(&s)
        );
        assert!(message(&s).ends_with("; cancelling"));
    }
}
