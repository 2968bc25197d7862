//! Before a local backfill runs anything: every step of every partition renders, its command
//! resolves and is allowed, and its secrets resolve ([`preflight`]); and `--dry-run`'s account
//! of what would run ([`dry_run`]).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use warpline_executor::ExecConfig;
use warpline_executor::check_allowed;
use warpline_executor::deferred::check_secrets;
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::{CheckSpec, StepSpec};
use warpline_shared::partition::Partition;

/// Partitions shown in full by `--dry-run`.
pub const DRY_RUN_PARTITIONS: usize = 2;

/// Renders every step for every partition and checks what a worker would check before
/// starting it. Returns every distinct problem found (empty when the backfill may start) and,
/// per step, the program its command resolved to for the first partition.
pub fn preflight(
    pipeline: &Pipeline,
    partitions: &[Partition],
    exec: &ExecConfig,
) -> (Vec<String>, Vec<Option<PathBuf>>) {
    let mut problems: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut programs = vec![None; pipeline.steps().len()];
    let mut note = |p: String| {
        if seen.insert(p.clone()) {
            problems.push(p);
        }
    };
    let entries = exec.allow_entries();
    for (pi, partition) in partitions.iter().enumerate() {
        for (index, slot) in programs.iter_mut().enumerate() {
            let spec = match pipeline.render_step(index, partition, Uuid::nil(), 1, Uuid::nil()) {
                Ok(s) => s,
                Err(e) => {
                    note(format!("partition `{}`: {e}", partition.key()));
                    continue;
                }
            };
            match check_allowed(&spec, exec, &entries) {
                Ok(Ok(program)) => {
                    if pi == 0 {
                        *slot = Some(program);
                    }
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

/// What `--dry-run` prints: each step's rendered spec for the first partitions, and how many
/// more there are.
pub fn dry_run(
    pipeline: &Pipeline,
    partitions: &[Partition],
    programs: &[Option<PathBuf>],
) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "dry run of `{}`: {} partitions × {} steps; nothing is executed",
        pipeline.name(),
        partitions.len(),
        pipeline.steps().len()
    )?;
    for partition in partitions.iter().take(DRY_RUN_PARTITIONS) {
        writeln!(out, "\npartition {}", partition.key())?;
        for (index, program) in programs.iter().enumerate() {
            let spec = pipeline.render_step(index, partition, Uuid::nil(), 1, Uuid::nil())?;
            describe(&mut out, &spec, program.as_deref())?;
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
