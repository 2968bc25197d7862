//! `warpline audit verify` and `warpline audit show`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use uuid::Uuid;
use warpline_shared::audit;

use crate::progress::describe;

pub(crate) fn audit_verify(file: &PathBuf, expect_head: Option<&str>) -> anyhow::Result<ExitCode> {
    let f = std::fs::File::open(file)
        .with_context(|| format!("cannot open the audit log `{}`", file.display()))?;
    match audit::verify(BufReader::new(f)) {
        Ok(v) => match expect_head.map(str::trim) {
            Some(want) if !want.eq_ignore_ascii_case(&v.head) => {
                eprintln!(
                    "FAILED: `{}`: {} lines verify but the head is {}, not the expected {want}: lines are missing at the end (or it is another log)",
                    file.display(),
                    v.lines,
                    v.head
                );
                Ok(ExitCode::FAILURE)
            }
            _ => {
                println!("ok: {} lines, chain intact, head {}", v.lines, v.head);
                Ok(ExitCode::SUCCESS)
            }
        },
        Err(e) if e.torn.is_some() => {
            eprintln!("TORN: `{}`: {e}", file.display());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("FAILED: `{}`: {e}", file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

pub(crate) fn audit_show(run: &str, file: &PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let read = || -> anyhow::Result<Vec<audit::AuditRecord>> {
        let f = std::fs::File::open(file)
            .with_context(|| format!("cannot open the audit log `{}`", file.display()))?;
        let mut out = Vec::new();
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line?;
            let (rec, _) =
                audit::parse_line(&line).map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
            out.push(rec);
        }
        Ok(out)
    };
    let records = read()?;
    // Resolve the run: an id, a unique id prefix, or a partition key.
    let mut matches: Vec<(Uuid, String)> = records
        .iter()
        .filter_map(|r| match (&r.event, r.run_id) {
            (audit::AuditEvent::RunCreated { partition }, Some(id)) => Some((id, partition.key())),
            _ => None,
        })
        .filter(|(id, key)| id.to_string().starts_with(run) || key == run)
        .collect();
    matches.dedup();
    let (id, key) = match matches.as_slice() {
        [one] => one.clone(),
        [] => bail!(
            "no run matching `{run}` in `{}`: give a run id, an id prefix or a partition key",
            file.display()
        ),
        many => {
            let list: Vec<String> = many
                .iter()
                .map(|(id, key)| format!("{id} ({key})"))
                .collect();
            bail!(
                "`{run}` matches {} runs: {}; give a longer id",
                many.len(),
                list.join(", ")
            )
        }
    };
    println!("run {id} ({key})");
    for r in records.iter().filter(|r| r.run_id == Some(id)) {
        if json {
            println!("{}", serde_json::to_string(r)?);
        } else if let Some(line) = describe(&key, r).or_else(|| transition_line(r)) {
            println!("{:>5} {line}", r.seq);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn transition_line(r: &audit::AuditRecord) -> Option<String> {
    match &r.event {
        audit::AuditEvent::Transition { from, to, action } => Some(format!(
            "{} state {from} → {to}{}",
            r.ts.format("%H:%M:%S%.3f"),
            action.map(|a| format!(" ({a})")).unwrap_or_default()
        )),
        audit::AuditEvent::RunCreated { partition } => Some(format!(
            "{} created for {partition}",
            r.ts.format("%H:%M:%S%.3f")
        )),
        _ => None,
    }
}
