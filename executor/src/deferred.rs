//! What only the worker can resolve: secret references and dynamic artefacts.
//!
//! The coordinator leaves `{env:NAME}`, `{secret:NAME}` and `{artefacts.NAME}` of a dynamic
//! artefact in the StepSpec fields listed in `deferred` ([`StepSpec::deferred`]). Before the
//! tool starts, [`prepare`] resolves them in `args` and `env`: `{env:NAME}` from this worker's
//! environment, `{secret:NAME}` from the file `NAME` in its secrets directory (one trailing
//! newline dropped), an earlier step's dynamic artefact from the record that step's worker
//! wrote. The values of secrets are kept only to [`redact`] them from everything the attempt
//! reports (log tail, errors, check details), so they never reach the audit log, an LLM or a
//! summary. After the tool exits, [`finish`] resolves this step's own dynamic artefacts (a glob
//! that must match exactly one file, or the JSON file the tool wrote), confines them to the
//! workdir, writes the record later steps read, and renders the checks that target them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use warpline_shared::contracts::{Check, CheckSpec, DynamicArtefact, StepSpec, Validation};
use warpline_shared::template;

use crate::allow::lexical_absolute;

/// What a secret is replaced with in everything an attempt reports.
pub const REDACTED: &str = "[redacted]";

/// A spec with its worker-side references resolved, and the secret values it now holds.
#[derive(Debug)]
pub struct Prepared {
    /// The spec to run: `args` and `env` resolved; check paths that target this step's own
    /// dynamic artefacts still deferred.
    pub spec: StepSpec,
    /// The secret values resolved into it (to redact).
    pub secrets: Vec<String>,
    /// Earlier steps' dynamic artefacts (name → path).
    pub earlier: BTreeMap<String, String>,
}

/// Resolves the references of `args` and `env`. The error says which reference failed and
/// what to set.
pub fn prepare(spec: &StepSpec, secrets_dir: Option<&Path>) -> Result<Prepared, String> {
    let mut out = spec.clone();
    let mut earlier = BTreeMap::new();
    let mut records: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
    for (name, d) in &spec.dynamic_artefacts {
        if d.step_id == spec.step_id {
            continue;
        }
        if !records.contains_key(d.record.as_str()) {
            records.insert(&d.record, read_record(d, name)?);
        }
        let path = records[d.record.as_str()].get(name).cloned().ok_or_else(|| {
            format!(
                "dynamic artefact `{name}` of step `{}` is not in its record `{}`; run `{}` again",
                d.step_id, d.record, d.step_id
            )
        })?;
        earlier.insert(name.clone(), path);
    }
    if spec.deferred.is_empty() {
        return Ok(Prepared {
            spec: out,
            secrets: Vec::new(),
            earlier,
        });
    }
    let mut secrets: Vec<String> = Vec::new();
    let mut failure: Option<String> = None;
    for field in &spec.deferred {
        let slot = if let Some(i) = field
            .strip_prefix("args[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|i| i.parse::<usize>().ok())
        {
            out.args.get_mut(i)
        } else if let Some(k) = field.strip_prefix("env.") {
            out.env.get_mut(k)
        } else {
            // Check paths are resolved after the tool ran.
            None
        };
        let Some(slot) = slot else { continue };
        match resolve_field(slot, spec, secrets_dir, &earlier, &mut secrets) {
            Ok(v) => *slot = v,
            Err(e) => {
                failure.get_or_insert(format!("`{field}`: {e}"));
            }
        }
    }
    if let Some(f) = failure {
        return Err(redact(&f, &secrets));
    }
    secrets.retain(|s| !s.is_empty());
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    Ok(Prepared {
        spec: out,
        secrets,
        earlier,
    })
}

/// Renders one deferred field, collecting the secret values it resolved.
fn resolve_field(
    text: &str,
    spec: &StepSpec,
    secrets_dir: Option<&Path>,
    earlier: &BTreeMap<String, String>,
    secrets: &mut Vec<String>,
) -> Result<String, String> {
    let names = template::placeholders(text).map_err(|e| e.to_string())?;
    let mut values = BTreeMap::new();
    for n in names {
        let v = match lookup(n, spec, secrets_dir, earlier)? {
            Lookup::Secret(v) => {
                secrets.push(v.clone());
                v
            }
            Lookup::Plain(v) => v,
        };
        values.insert(n.to_string(), v);
    }
    template::render(text, |n| values.get(n).cloned()).map_err(|e| e.to_string())
}

enum Lookup {
    Secret(String),
    Plain(String),
}

fn lookup(
    name: &str,
    spec: &StepSpec,
    secrets_dir: Option<&Path>,
    earlier: &BTreeMap<String, String>,
) -> Result<Lookup, String> {
    if let Some(var) = name.strip_prefix("env:") {
        return std::env::var(var).map(Lookup::Secret).map_err(|_| {
            format!("`{{env:{var}}}` is not set: set `{var}` in this worker's environment")
        });
    }
    if let Some(file) = name.strip_prefix("secret:") {
        let Some(dir) = secrets_dir else {
            return Err(format!(
                "`{{secret:{file}}}` needs a secrets directory: start the worker with --secrets-dir DIR (or WARPLINE_SECRETS_DIR) holding a file `{file}`"
            ));
        };
        let path = dir.join(file);
        let mut value = std::fs::read_to_string(&path)
            .map_err(|e| format!("`{{secret:{file}}}`: cannot read `{}`: {e}", path.display()))?;
        if value.ends_with('\n') {
            value.pop();
            if value.ends_with('\r') {
                value.pop();
            }
        }
        return Ok(Lookup::Secret(value));
    }
    if let Some(a) = name.strip_prefix("artefacts.") {
        if let Some(p) = earlier.get(a) {
            return Ok(Lookup::Plain(p.clone()));
        }
        if spec
            .dynamic_artefacts
            .get(a)
            .is_some_and(|d| d.step_id == spec.step_id)
        {
            return Err(format!(
                "`{{artefacts.{a}}}` is this step's own dynamic artefact, known only after it ran"
            ));
        }
    }
    Err(format!("`{{{name}}}` cannot be resolved by a worker"))
}

fn read_record(d: &DynamicArtefact, name: &str) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read_to_string(&d.record).map_err(|e| {
        format!(
            "dynamic artefact `{name}` of step `{}`: cannot read its record `{}` ({e}); did `{}` complete in this run's directory?",
            d.step_id, d.record, d.step_id
        )
    })?;
    serde_json::from_str(&text).map_err(|e| format!("record `{}` is not valid: {e}", d.record))
}

/// Checks that every secret reference of a spec's deferred fields resolves here, without
/// keeping a value (the preflight of `warpline run`). The error names the first that does not.
pub fn check_secrets(spec: &StepSpec, secrets_dir: Option<&Path>) -> Result<(), String> {
    for field in &spec.deferred {
        let text = if let Some(i) = field
            .strip_prefix("args[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|i| i.parse::<usize>().ok())
        {
            spec.args.get(i)
        } else if let Some(k) = field.strip_prefix("env.") {
            spec.env.get(k)
        } else {
            None
        };
        let Some(text) = text else { continue };
        for n in template::placeholders(text).map_err(|e| e.to_string())? {
            if n.starts_with("env:") || n.starts_with("secret:") {
                lookup(n, spec, secrets_dir, &BTreeMap::new())
                    .map_err(|e| format!("step `{}` `{field}`: {e}", spec.step_id))?;
            }
        }
    }
    Ok(())
}

/// Replaces every secret value in `text`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), REDACTED);
        }
    }
    out
}

/// This step's dynamic artefacts, resolved after the tool ran, and the checks to run.
#[derive(Debug)]
pub struct Finished {
    /// Resolved artefacts of this step (name → absolute path).
    pub artefacts: BTreeMap<String, String>,
    /// The spec's checks, their paths resolved (those that could not be are in `failed`).
    pub validations: Vec<Validation>,
    /// Failed checks for what could not be resolved, in the report's terms.
    pub failed: Vec<Check>,
    /// The index in the spec's checks of each of `validations`.
    pub kept: Vec<usize>,
}

/// Resolves this step's own dynamic artefacts and the check paths that use them, and writes
/// the record later steps read.
pub fn finish(spec: &StepSpec, prepared: &Prepared) -> Finished {
    let root = Path::new(&spec.workdir);
    let mut artefacts = BTreeMap::new();
    let mut failed = Vec::new();
    let mut record: Option<&str> = None;
    let fail = |name: &str, detail: String| Check {
        name: format!("artefact({name})"),
        kind: "file_exists".into(),
        severity: warpline_shared::contracts::Severity::Error,
        passed: false,
        detail,
        value: None,
    };
    let mut reported: Option<Result<BTreeMap<String, String>, String>> = None;
    for (name, d) in &spec.dynamic_artefacts {
        if d.step_id != spec.step_id {
            continue;
        }
        record = Some(&d.record);
        // The run's directory: the record lives in `<run_dir>/.warpline/`.
        let run_dir = Path::new(&d.record)
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&spec.cwd));
        let found: Result<String, String> = if let Some(g) = &d.glob {
            glob_one(g)
        } else if let Some(file) = &d.file {
            let map = reported.get_or_insert_with(|| {
                std::fs::read_to_string(file)
                    .map_err(|e| format!("the tool wrote no artefacts file `{file}` ({e})"))
                    .and_then(|t| {
                        serde_json::from_str::<BTreeMap<String, String>>(&t).map_err(|e| {
                            format!(
                                "artefacts file `{file}` is not a JSON object of names to paths: {e}"
                            )
                        })
                    })
            });
            match map {
                Ok(m) => m
                    .get(name)
                    .cloned()
                    .ok_or_else(|| format!("artefacts file `{file}` does not name `{name}`")),
                Err(e) => Err(e.clone()),
            }
        } else {
            Err("neither a glob nor a reported file".into())
        };
        match found {
            Ok(p) => {
                let abs = lexical_absolute(&run_dir, Path::new(&p));
                if warpline_shared::paths::confined(Path::new("/"), &abs, &[root]) {
                    artefacts.insert(name.clone(), abs.display().to_string());
                } else {
                    failed.push(fail(
                        name,
                        format!(
                            "`{}` is outside the workdir `{}`",
                            abs.display(),
                            spec.workdir
                        ),
                    ));
                }
            }
            Err(e) => failed.push(fail(name, e)),
        }
    }
    if let Some(record) = record
        && failed.is_empty()
        && let Err(e) = write_record(Path::new(record), &artefacts)
    {
        failed.push(Check {
            name: "artefact record".into(),
            kind: "executor".into(),
            severity: warpline_shared::contracts::Severity::Error,
            passed: false,
            detail: format!("cannot write `{record}`: {e}"),
            value: None,
        });
    }
    let mut all = prepared.earlier.clone();
    all.extend(artefacts.clone());
    let mut validations = Vec::with_capacity(spec.validations.len());
    let mut kept = Vec::with_capacity(spec.validations.len());
    for (i, v) in spec.validations.iter().enumerate() {
        let field = format!("validations[{i}].path");
        if !spec.deferred.contains(&field) {
            validations.push(v.clone());
            kept.push(i);
            continue;
        }
        let render = |p: &str| {
            template::render(p, |n| {
                n.strip_prefix("artefacts.")
                    .and_then(|a| all.get(a).cloned())
            })
        };
        let check = match &v.check {
            CheckSpec::FileExists { path } => {
                render(path).map(|path| CheckSpec::FileExists { path })
            }
            CheckSpec::FileSizeMin { path, min_bytes } => {
                render(path).map(|path| CheckSpec::FileSizeMin {
                    path,
                    min_bytes: *min_bytes,
                })
            }
            other => Ok(other.clone()),
        };
        match check {
            Ok(check) => validations.push(Validation { check, ..v.clone() }),
            Err(_) => failed.push(Check {
                name: v.name.clone(),
                kind: v.check.kind().to_string(),
                severity: v.severity,
                passed: false,
                detail: "its artefact was not found (see the artefact check)".into(),
                value: None,
            }),
        }
    }
    Finished {
        artefacts,
        validations,
        failed,
        kept,
    }
}

fn glob_one(pattern: &str) -> Result<String, String> {
    let paths = glob::glob(pattern).map_err(|e| format!("bad glob `{pattern}`: {e}"))?;
    let mut found: Vec<PathBuf> = paths
        .filter_map(Result::ok)
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found[0].display().to_string()),
        0 => Err(format!("glob `{pattern}` matched no file")),
        n => Err(format!(
            "glob `{pattern}` matched {n} files ({}); expected exactly one",
            found
                .iter()
                .take(5)
                .map(|p| format!("`{}`", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn write_record(path: &Path, artefacts: &BTreeMap<String, String>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(artefacts)?)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_occurrence_longest_first() {
        let secrets = vec!["hunter22".to_string(), "hunter2".to_string()];
        assert_eq!(
            redact("pw=hunter22 and hunter2", &secrets),
            "pw=[redacted] and [redacted]"
        );
        assert_eq!(redact("nothing", &[]), "nothing");
    }
}
