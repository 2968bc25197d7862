//! Before a local backfill runs anything: every step of every run (partitions' and
//! backfill-level) renders, its command
//! resolves and is allowed, and its secrets resolve ([`preflight`]); and `--dry-run`'s account
//! of what would run ([`dry_run`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use warpline_executor::ExecConfig;
use warpline_executor::check_allowed;
use warpline_executor::deferred::check_secrets;
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::{CheckSpec, StepSpec};
use warpline_shared::partition::Partition;
use warpline_shared::stage::RunScope;

/// Partitions shown in full by `--dry-run`.
pub const DRY_RUN_PARTITIONS: usize = 2;

/// Renders every step of every run (each partition's, and the backfill-level runs') and checks
/// what a worker would check before starting it. Returns every distinct problem found (empty
/// when the backfill may start) and, by step id, the program its command resolved to for the
/// first run that has the step.
pub fn preflight(
    pipeline: &Pipeline,
    partitions: &[Partition],
    exec: &ExecConfig,
) -> (Vec<String>, BTreeMap<String, PathBuf>) {
    let mut problems: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut programs = BTreeMap::new();
    let mut note = |p: String| {
        if seen.insert(p.clone()) {
            problems.push(p);
        }
    };
    let entries = exec.allow_entries();
    let views = Views::of(pipeline);
    for (scope, partition) in pipeline.plan(partitions) {
        let view = views.get(scope);
        for index in 0..view.steps().len() {
            let spec = match view.render_step(index, &partition, Uuid::nil(), 1, Uuid::nil()) {
                Ok(s) => s,
                Err(e) => {
                    note(format!("partition `{}`: {e}", scope.key(&partition)));
                    continue;
                }
            };
            match check_allowed(&spec, exec, &entries) {
                Ok(Ok(program)) => {
                    programs.entry(spec.step_id.clone()).or_insert(program);
                }
                Ok(Err(e)) => note(format!("step `{}`: {e}", spec.step_id)),
                Err(refusal) => note(format!("step `{}`: {refusal}", spec.step_id)),
            }
            if let Err(refusal) = warpline_executor::check_args(&spec, exec, &entries) {
                note(format!("step `{}`: {refusal}", spec.step_id));
            }
            if let Err(e) = check_secrets(&spec, exec.secrets_dir.as_deref()) {
                note(e);
            }
        }
    }
    (problems, programs)
}

/// The pipeline as each scope's runs see it, built once.
pub struct Views {
    views: BTreeMap<RunScope, Pipeline>,
}

impl Views {
    /// Every scope's view of `pipeline`.
    pub fn of(pipeline: &Pipeline) -> Views {
        let views = [
            RunScope::Partition,
            RunScope::Before,
            RunScope::AfterDataset,
            RunScope::After,
        ]
        .into_iter()
        .map(|s| (s, pipeline.view(s)))
        .collect();
        Views { views }
    }

    /// The view of `scope`.
    pub fn get(&self, scope: RunScope) -> &Pipeline {
        &self.views[&scope]
    }
}

/// What `--dry-run` prints: each step's rendered spec for the first partitions, how many
/// more there are, and the backfill-level runs' steps.
pub fn dry_run(
    pipeline: &Pipeline,
    partitions: &[Partition],
    programs: &BTreeMap<String, PathBuf>,
) -> anyhow::Result<String> {
    let mut out = String::new();
    let plan = pipeline.plan(partitions);
    writeln!(
        out,
        "dry run of `{}`: {} partitions × {} steps{}; nothing is executed",
        pipeline.name(),
        partitions.len(),
        pipeline.steps().len(),
        match plan.len() - partitions.len() {
            0 => String::new(),
            n => format!(", and {n} backfill-level runs"),
        }
    )?;
    let views = Views::of(pipeline);
    let mut shown = 0;
    for (scope, partition) in &plan {
        if scope.is_partition() {
            if shown == DRY_RUN_PARTITIONS {
                continue;
            }
            shown += 1;
            writeln!(out, "\npartition {}", partition.key())?;
        } else {
            writeln!(
                out,
                "\nbackfill-level run {} ({})",
                scope.key(partition),
                match scope {
                    RunScope::Before => "before the first partition starts",
                    RunScope::AfterDataset => "once the dataset's partitions ended",
                    _ => "once every partition ended",
                }
            )?;
        }
        let view = views.get(*scope);
        for index in 0..view.steps().len() {
            let spec = view.render_step(index, partition, Uuid::nil(), 1, Uuid::nil())?;
            let program = programs.get(&spec.step_id).map(PathBuf::as_path);
            describe(&mut out, &spec, program)?;
        }
    }
    let rest = partitions.len().saturating_sub(DRY_RUN_PARTITIONS);
    if rest > 0 {
        writeln!(out, "\n… and {rest} more partitions")?;
    }
    Ok(out)
}

fn describe(out: &mut String, spec: &StepSpec, program: Option<&Path>) -> std::fmt::Result {
    let resolved = program
        .map(|p| format!(" ({})", p.display()))
        .unwrap_or_default();
    writeln!(out, "  {}:", spec.step_id)?;
    writeln!(
        out,
        "    argv: {}{resolved}",
        shell_words(&spec.command, &spec.args)
    )?;
    writeln!(out, "    cwd: {}", spec.cwd)?;
    for (k, v) in &spec.env {
        // Secret references are never resolved here: they show as written.
        writeln!(out, "    env {k}={v}")?;
    }
    for (name, path) in &spec.artefacts {
        writeln!(out, "    artefact {name}: {path}")?;
    }
    for (name, d) in &spec.dynamic_artefacts {
        if d.step_id != spec.step_id {
            continue;
        }
        match (&d.glob, &d.file) {
            (Some(g), _) => writeln!(out, "    artefact {name}: the one file matching {g}")?,
            (None, Some(f)) => writeln!(out, "    artefact {name}: reported by the tool in {f}")?,
            _ => {}
        }
    }
    for v in &spec.validations {
        let target = match &v.check {
            CheckSpec::FileExists { path } | CheckSpec::FileSizeMin { path, .. } => path.clone(),
            CheckSpec::FileCount { glob, .. } => glob.clone(),
            CheckSpec::LogRegexAbsent { pattern, .. }
            | CheckSpec::LogRegexPresent { pattern, .. } => pattern.clone(),
            // Data gates and the rest: their kind and name say what they read.
            _ => String::new(),
        };
        writeln!(
            out,
            "    check {} ({:?}, {}): {target}",
            v.name,
            v.severity,
            v.check.kind()
        )?;
    }
    Ok(())
}

/// argv as a shell would need it typed, for reading (never executed).
fn shell_words(command: &str, args: &[String]) -> String {
    std::iter::once(command)
        .chain(args.iter().map(String::as_str))
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_./:=,@%+{}".contains(&c))
            {
                a.to_string()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
