//! What the fleet can run: the workers' advertised allowlists (from their heartbeats) read
//! against a step, the hand-back policy, and the check `submit` makes before it accepts a
//! backfill.
//!
//! A worker's heartbeat carries its pool and its allowlist as resolved on it
//! ([`warpline_shared::fleet::AllowedCommand`]). The coordinator cannot see a worker's
//! filesystem, so it reads that list with [`advertised_allows`]; the worker's own check stays
//! the authority, and a step it may not run is handed back to the coordinator (a `refused`
//! result) instead of failing. A worker that advertises nothing (it predates advertising) is
//! taken to be able to run anything its pool is sent.
//!
//! Hand-backs are bounded so that a step no live worker can run never loops: while some live
//! worker of the pool that has not refused the step advertises it, the step is dispatched
//! again (after a delay doubling from 1 s to 15 s) up to [`MAX_HAND_BACKS`] times, since that
//! worker may simply be busy; when none does, after [`MAX_HAND_BACKS_UNRUNNABLE`]. Then the run
//! escalates, naming the step, the command and the workers that refused.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warpline_executor::allow::advertised_allows;
use warpline_shared::contracts::StepSpec;
use warpline_shared::fleet::Heartbeat;

/// Most hand-backs of one step in one run while a live worker of its pool advertises it.
pub const MAX_HAND_BACKS: u32 = 20;
/// Most hand-backs of one step in one run once no live worker that has not refused it
/// advertises it (a few, so a worker whose heartbeat the coordinator has not heard yet, after
/// a restart or a scale-up, still gets a chance).
pub const MAX_HAND_BACKS_UNRUNNABLE: u32 = 4;
/// The delay before the first re-dispatch; it doubles with each hand-back.
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest delay between hand-backs.
const MAX_DELAY: Duration = Duration::from_secs(15);

/// One worker's refusal of a run's current step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandBack {
    /// The worker that refused.
    pub worker_id: String,
    /// Its reason.
    pub reason: String,
}

/// What follows a hand-back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterHandBack {
    /// Dispatch the step again after this delay.
    Redispatch(Duration),
    /// Stop handing it around: escalate the run with this reason.
    Escalate(String),
}

/// True when the worker that sent `hb` may run `spec`, by what it advertises.
pub fn may_run(hb: &Heartbeat, spec: &StepSpec) -> bool {
    hb.pool == spec.pool
        && hb.allow.as_deref().is_none_or(|entries| {
            advertised_allows(entries, &spec.command, &spec.args, Path::new(&spec.cwd))
        })
}

/// Decides what follows the `hand_backs.len()`-th hand-back of `spec` (its last element is the
/// one just received), given the live workers' last heartbeats.
pub fn after_hand_back<'a>(
    spec: &StepSpec,
    hand_backs: &[HandBack],
    live: impl IntoIterator<Item = &'a Heartbeat>,
) -> AfterHandBack {
    let refused: BTreeSet<&str> = hand_backs.iter().map(|h| h.worker_id.as_str()).collect();
    let capable: Vec<&str> = live
        .into_iter()
        .filter(|hb| !hb.stopping && !refused.contains(hb.worker_id.as_str()) && may_run(hb, spec))
        .map(|hb| hb.worker_id.as_str())
        .collect();
    let n = u32::try_from(hand_backs.len()).unwrap_or(u32::MAX);
    let limit = if capable.is_empty() {
        MAX_HAND_BACKS_UNRUNNABLE
    } else {
        MAX_HAND_BACKS
    };
    if n < limit {
        let delay = FIRST_DELAY
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(MAX_DELAY);
        return AfterHandBack::Redispatch(delay);
    }
    let workers = refused
        .iter()
        .map(|w| format!("`{w}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let last = hand_backs
        .last()
        .map(|h| h.reason.as_str())
        .unwrap_or_default();
    let why = if capable.is_empty() {
        format!(
            "no live worker of pool `{}` may run it: step `{}` (command `{}`) was handed back {n} times, by {workers} (last: {last}); \
             start a worker whose --allow names the command and whose --tools-dir or PATH has it, then resolve with retry",
            spec.pool, spec.step_id, spec.command
        )
    } else {
        format!(
            "step `{}` (command `{}`) was handed back {n} times, by {workers} (last: {last}), while {} of pool `{}` advertise it \
             but did not take it; give them more slots or move the refusing workers to another pool, then resolve with retry",
            spec.step_id,
            spec.command,
            capable
                .iter()
                .map(|w| format!("`{w}`"))
                .collect::<Vec<_>>()
                .join(", "),
            spec.pool
        )
    };
    AfterHandBack::Escalate(why)
}

/// A step of a submitted backfill that no live worker may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Unrunnable {
    /// The step.
    pub step_id: String,
    /// Its pool.
    pub pool: String,
    /// Its command as rendered.
    pub command: String,
    /// Live workers of the pool (none when the pool has no live worker).
    pub workers: Vec<String>,
}

impl std::fmt::Display for Unrunnable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.workers.is_empty() {
            write!(
                f,
                "step `{}`: pool `{}` has no live worker (command `{}`)",
                self.step_id, self.pool, self.command
            )
        } else {
            write!(
                f,
                "step `{}`: no live worker of pool `{}` may run `{}` (live: {})",
                self.step_id,
                self.pool,
                self.command,
                self.workers.join(", ")
            )
        }
    }
}

/// The steps of `specs` (one rendered StepSpec per step and partition looked at) that no live
/// worker may run, once per step.
pub fn unrunnable<'a>(
    specs: &[StepSpec],
    live: impl IntoIterator<Item = &'a Heartbeat> + Clone,
) -> Vec<Unrunnable> {
    let mut out: Vec<Unrunnable> = Vec::new();
    for spec in specs {
        if out.iter().any(|u| u.step_id == spec.step_id) {
            continue;
        }
        let pool: Vec<&Heartbeat> = live
            .clone()
            .into_iter()
            .filter(|hb| !hb.stopping && hb.pool == spec.pool)
            .collect();
        if !pool.iter().any(|hb| may_run(hb, spec)) {
            out.push(Unrunnable {
                step_id: spec.step_id.clone(),
                pool: spec.pool.clone(),
                command: spec.command.clone(),
                workers: pool.iter().map(|hb| hb.worker_id.clone()).collect(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use uuid::Uuid;
    use warpline_shared::fleet::AllowedCommand;

    use super::*;

    fn spec(command: &str) -> StepSpec {
        StepSpec {
            schema_version: 1,
            run_id: Uuid::nil(),
            step_id: "LOAD".into(),
            attempt: 1,
            attempt_id: Uuid::nil(),
            command: command.into(),
            args: vec!["--month".into(), "2024-01".into()],
            env: BTreeMap::new(),
            cwd: "/w/runs/2024-01".into(),
            timeout_s: 5,
            artefacts: BTreeMap::new(),
            validations: Vec::new(),
            log_dir: "/w/logs".into(),
            workdir: "/w".into(),
            input_roots: Vec::new(),
            pool: "etl".into(),
            trace: BTreeMap::new(),
            deferred: Vec::new(),
            dynamic_artefacts: BTreeMap::new(),
            files: BTreeMap::new(),
            failures: Default::default(),
        }
    }

    fn worker(id: &str, pool: &str, allow: Option<&[(&str, bool)]>) -> Heartbeat {
        let mut hb = Heartbeat::new(id.into(), pool.into(), 2, Vec::new(), 5);
        hb.allow = allow.map(|entries| {
            entries
                .iter()
                .map(|(program, resolves)| AllowedCommand {
                    entry: program.to_string(),
                    program: program.to_string(),
                    pinned: Vec::new(),
                    resolved: resolves.then(|| format!("/opt/bin/{program}")),
                })
                .collect()
        });
        hb
    }

    fn refusal(worker_id: &str) -> HandBack {
        HandBack {
            worker_id: worker_id.into(),
            reason: "command `load-batch` is not on this worker's allowlist".into(),
        }
    }

    #[test]
    fn a_worker_may_run_what_its_pool_and_resolved_allowlist_cover() {
        let s = spec("load-batch");
        assert!(may_run(
            &worker("a", "etl", Some(&[("load-batch", true)])),
            &s
        ));
        assert!(!may_run(
            &worker("a", "gpu", Some(&[("load-batch", true)])),
            &s
        ));
        assert!(!may_run(
            &worker("a", "etl", Some(&[("load-batch", false)])),
            &s
        ));
        assert!(!may_run(&worker("a", "etl", Some(&[("other", true)])), &s));
        // A worker that advertises nothing is given the benefit of the doubt.
        assert!(may_run(&worker("a", "etl", None), &s));
    }

    #[test]
    fn hand_backs_redispatch_while_someone_capable_lives_then_escalate() {
        let s = spec("load-batch");
        let refuser = worker("narrow", "etl", Some(&[("url_to_manifest", true)]));
        let capable = worker("wide", "etl", Some(&[("load-batch", true)]));
        let mut backs = vec![refusal("narrow")];
        assert_eq!(
            after_hand_back(&s, &backs, [&refuser, &capable]),
            AfterHandBack::Redispatch(Duration::from_secs(1))
        );
        backs.push(refusal("narrow"));
        assert_eq!(
            after_hand_back(&s, &backs, [&refuser, &capable]),
            AfterHandBack::Redispatch(Duration::from_secs(2))
        );
        while backs.len() < MAX_HAND_BACKS as usize - 1 {
            backs.push(refusal("narrow"));
        }
        assert_eq!(
            after_hand_back(&s, &backs, [&refuser, &capable]),
            AfterHandBack::Redispatch(MAX_DELAY)
        );
        backs.push(refusal("narrow"));
        let AfterHandBack::Escalate(why) = after_hand_back(&s, &backs, [&refuser, &capable]) else {
            panic!("the bound was reached");
        };
        assert!(why.contains("`wide`") && why.contains("`narrow`"), "{why}");
    }

    #[test]
    fn with_no_capable_worker_left_a_few_hand_backs_escalate_naming_step_command_and_refusers() {
        let s = spec("load-batch");
        let a = worker("a", "etl", Some(&[("url_to_manifest", true)]));
        let b = worker("b", "etl", Some(&[("load-batch", false)]));
        // A capable worker that refused anyway (its advertisement was wrong) no longer counts.
        let liar = worker("liar", "etl", Some(&[("load-batch", true)]));
        let mut backs = vec![refusal("a"), refusal("b"), refusal("liar")];
        assert!(matches!(
            after_hand_back(&s, &backs, [&a, &b, &liar]),
            AfterHandBack::Redispatch(_)
        ));
        backs.push(refusal("a"));
        let AfterHandBack::Escalate(why) = after_hand_back(&s, &backs, [&a, &b, &liar]) else {
            panic!("no capable worker is left");
        };
        for needle in [
            "no live worker of pool `etl` may run it",
            "step `LOAD`",
            "command `load-batch`",
            "`a`, `b`, `liar`",
            "handed back 4 times",
        ] {
            assert!(why.contains(needle), "{needle} missing from: {why}");
        }
        // No live worker at all counts as none capable.
        let none: [&Heartbeat; 0] = [];
        assert!(matches!(
            after_hand_back(&s, &backs, none),
            AfterHandBack::Escalate(_)
        ));
    }

    #[test]
    fn submit_names_each_step_no_live_worker_may_run_once() {
        let load = spec("load-batch");
        let mut extract = spec("url_to_manifest");
        extract.step_id = "EXTRACT".into();
        let mut gpu = spec("train");
        gpu.step_id = "TRAIN".into();
        gpu.pool = "gpu".into();
        let a = worker("a", "etl", Some(&[("url_to_manifest", true)]));
        let specs = [extract.clone(), load.clone(), load.clone(), gpu];
        let found = unrunnable(&specs, [&a]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].step_id, "LOAD");
        assert_eq!(found[0].workers, ["a"]);
        assert_eq!(
            found[0].to_string(),
            "step `LOAD`: no live worker of pool `etl` may run `load-batch` (live: a)"
        );
        assert_eq!(
            found[1].to_string(),
            "step `TRAIN`: pool `gpu` has no live worker (command `train`)"
        );
        let none: [&Heartbeat; 0] = [];
        assert_eq!(unrunnable(&specs, none).len(), 3);
        let b = worker("b", "etl", Some(&[("load-batch", true)]));
        assert_eq!(unrunnable(&[extract, load], [&a, &b]), Vec::new());
    }
}
