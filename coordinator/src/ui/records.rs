//! Where the dashboard reads committed audit records: a run's story and its attempts' details
//! (commands, results, checks, decisions, log tails). Read-only, and only records that are
//! already durable: in fleet mode PostgreSQL's `audit_events` (indexed by run), in local mode
//! the JSONL audit log. Run *state* always comes from the event loop, never from here.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use anyhow::Context;
use deadpool_postgres::Pool;
use uuid::Uuid;
use warpline_shared::audit::{self, AuditRecord};

/// A source of committed audit records.
#[derive(Clone)]
pub enum Records {
    /// Fleet mode: the coordinator's database (its pool's connections use the schema).
    Pg(Pool),
    /// Local mode: the JSONL audit log.
    File(PathBuf),
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Records::Pg(_) => f.write_str("Records::Pg"),
            Records::File(p) => write!(f, "Records::File({})", p.display()),
        }
    }
}

/// What [`verify_file`] found.
#[derive(Debug, Clone)]
pub struct ChainCheck {
    /// The file checked.
    pub file: String,
    /// `Ok((lines, head))` when intact, else the first bad line.
    pub result: Result<(u64, String), String>,
}

impl Records {
    /// Every record of one run, in order.
    pub async fn run(&self, run_id: Uuid) -> anyhow::Result<Vec<AuditRecord>> {
        match self {
            Records::Pg(pool) => {
                let client = pool
                    .get()
                    .await
                    .context("cannot reach the coordinator's database")?;
                let rows = client
                    .query(
                        "SELECT line FROM audit_events WHERE run_id = $1 ORDER BY seq",
                        &[&run_id],
                    )
                    .await
                    .context("cannot read the run's audit records")?;
                rows.iter()
                    .map(|row| {
                        let line: String = row.get(0);
                        audit::parse_line(&line)
                            .map(|(r, _)| r)
                            .map_err(|e| anyhow::anyhow!("a stored audit record is damaged: {e}"))
                    })
                    .collect()
            }
            Records::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || scan(&path, Some(run_id)))
                    .await
                    .context("the audit reader panicked")?
            }
        }
    }
}

/// The records of `run` (or all) in a JSONL audit log.
fn scan(path: &PathBuf, run: Option<Uuid>) -> anyhow::Result<Vec<AuditRecord>> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot open the audit log `{}`", path.display()))?;
    let needle = run.map(|r| r.to_string());
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        // Cheap prefilter: a run's records name its id.
        if let Some(n) = &needle
            && !line.contains(n.as_str())
        {
            continue;
        }
        let (rec, _) = audit::parse_line(&line)
            .map_err(|e| anyhow::anyhow!("`{}` line {}: {e}", path.display(), i + 1))?;
        if run.is_none() || rec.run_id == run {
            out.push(rec);
        }
    }
    Ok(out)
}

/// Checks the hash chain of the JSONL audit log at `file`.
pub async fn verify_file(file: String) -> ChainCheck {
    let path = PathBuf::from(&file);
    let result = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&path)
            .map_err(|e| format!("cannot open `{}`: {e}", path.display()))?;
        audit::verify(BufReader::new(f))
            .map(|v| (v.lines, v.head))
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("the verifier panicked: {e}")));
    ChainCheck { file, result }
}
