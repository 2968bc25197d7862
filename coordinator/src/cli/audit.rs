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
    // Resolve the run: an id or a unique id prefix selects exactly; a partition key several
    // backfills ran means the latest backfill's run (the others are listed).
    let mut created: Vec<(Uuid, String, Option<Uuid>)> = records
        .iter()
        .filter_map(|r| match (&r.event, r.run_id) {
            (audit::AuditEvent::RunCreated { partition, scope }, Some(id)) => {
                Some((id, scope.key(partition), r.backfill_id))
            }
            _ => None,
        })
        .collect();
    created.dedup_by_key(|c| c.0);
    let by_id: Vec<&(Uuid, String, Option<Uuid>)> = created
        .iter()
        .filter(|(id, _, _)| id.to_string().starts_with(run))
        .collect();
    let by_key: Vec<&(Uuid, String, Option<Uuid>)> =
        created.iter().filter(|(_, key, _)| key == run).collect();
    let (id, key) = match (by_id.as_slice(), by_key.as_slice()) {
        ([one], _) => (one.0, one.1.clone()),
        (many, _) if many.len() > 1 => {
            let list: Vec<String> = many
                .iter()
                .map(|(id, key, _)| format!("{id} ({key})"))
                .collect();
            bail!(
                "`{run}` matches {} runs: {}; give a longer id",
                many.len(),
                list.join(", ")
            )
        }
        (_, []) => bail!(
            "no run matching `{run}` in `{}`: give a run id, an id prefix or a partition key",
            file.display()
        ),
        (_, [.., latest]) => {
            // Records are in order, so the last run created is the latest backfill's.
            if by_key.len() > 1 {
                let others: Vec<String> = by_key[..by_key.len() - 1]
                    .iter()
                    .rev()
                    .map(|(id, _, b)| {
                        format!(
                            "{id} (backfill {})",
                            b.map(|b| b.to_string()).unwrap_or_else(|| "?".into())
                        )
                    })
                    .collect();
                eprintln!(
                    "warpline: `{run}` was run by {} backfills; showing the latest's run {}; earlier: {} (give an id prefix to show one)",
                    by_key.len(),
                    latest.0,
                    others.join(", ")
                );
            }
            (latest.0, latest.1.clone())
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
        audit::AuditEvent::RunCreated { partition, scope } => Some(format!(
            "{} created for {}",
            r.ts.format("%H:%M:%S%.3f"),
            scope.label(partition)
        )),
        _ => None,
    }
}
