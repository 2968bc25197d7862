//! Reprocess modes, like Airflow 3's backfill `reprocess_behavior`: which of a new backfill's
//! partitions run, given what earlier backfills of the same pipeline (by name) did to them.
//! Local mode learns the earlier runs from the workdir's audit logs, fleet mode from the
//! coordinator's own state (PostgreSQL); both choose with [`select`].
//!
//! A partition that a live backfill is still working on is never started a second time, in
//! any mode: two runs of one partition would share its run directory.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use warpline_shared::machine::RunStatus;
use warpline_shared::partition::Partition;

/// Which partitions a backfill runs.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    clap::ValueEnum,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Reprocess {
    /// Only partitions no earlier backfill has run (Airflow's `none`).
    Missing,
    /// Those, and partitions whose earlier runs all ended without completing (halted,
    /// cancelled, escalated, or left unfinished by a process that stopped).
    Failed,
    /// Every partition given, completed ones included (the default: a backfill does what it
    /// names).
    #[default]
    All,
}

impl Reprocess {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reprocess::Missing => "missing",
            Reprocess::Failed => "failed",
            Reprocess::All => "all",
        }
    }
}

/// What earlier backfills did to one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Earlier {
    /// A run of it completed.
    Complete,
    /// It was run, and no run of it completed.
    Failed,
    /// A live backfill is working on it (fleet mode).
    Active,
}

/// Partitions a backfill left out, by why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Skipped {
    /// Completed in an earlier backfill.
    pub complete: usize,
    /// Run before without completing (skipped by `missing`).
    pub failed: usize,
    /// Still in progress in a live backfill.
    pub in_progress: usize,
}

impl Skipped {
    /// Partitions skipped in all.
    pub fn total(&self) -> usize {
        self.complete + self.failed + self.in_progress
    }

    /// True when nothing was skipped.
    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    /// One line: `skipped 3 partitions (reprocess `missing`): 2 complete, 1 failed before`.
    pub fn describe(&self, mode: Reprocess) -> String {
        let mut parts = Vec::new();
        if self.complete > 0 {
            parts.push(format!("{} completed before", self.complete));
        }
        if self.failed > 0 {
            parts.push(format!("{} run before without completing", self.failed));
        }
        if self.in_progress > 0 {
            parts.push(format!(
                "{} in progress in a live backfill",
                self.in_progress
            ));
        }
        format!(
            "skipped {} partitions (reprocess `{}`): {}",
            self.total(),
            mode.as_str(),
            parts.join(", ")
        )
    }
}

/// Folds earlier runs — (partition key, state, whether its coordinator still drives it) —
/// into one [`Earlier`] per partition: completed wins, then in progress, else failed.
pub fn earlier<I>(runs: I) -> HashMap<String, Earlier>
where
    I: IntoIterator<Item = (String, RunStatus, bool)>,
{
    let mut out: HashMap<String, Earlier> = HashMap::new();
    for (key, state, live) in runs {
        let this = match state {
            RunStatus::Complete => Earlier::Complete,
            s if live && !s.is_final() => Earlier::Active,
            _ => Earlier::Failed,
        };
        let slot = out.entry(key).or_insert(this);
        *slot = match (*slot, this) {
            (Earlier::Complete, _) | (_, Earlier::Complete) => Earlier::Complete,
            (Earlier::Active, _) | (_, Earlier::Active) => Earlier::Active,
            _ => Earlier::Failed,
        };
    }
    out
}

/// The partitions `mode` runs, in their order, and what it skipped.
pub fn select(
    partitions: Vec<Partition>,
    earlier: &HashMap<String, Earlier>,
    mode: Reprocess,
) -> (Vec<Partition>, Skipped) {
    let mut skipped = Skipped::default();
    let kept = partitions
        .into_iter()
        .filter(|p| match (earlier.get(&p.key()), mode) {
            (None, _) => true,
            (Some(Earlier::Active), _) => {
                skipped.in_progress += 1;
                false
            }
            (Some(Earlier::Complete), Reprocess::All) => true,
            (Some(Earlier::Complete), _) => {
                skipped.complete += 1;
                false
            }
            (Some(Earlier::Failed), Reprocess::Missing) => {
                skipped.failed += 1;
                false
            }
            (Some(Earlier::Failed), _) => true,
        })
        .collect();
    (kept, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn month(m: &str) -> Partition {
        Partition {
            month: Some(m.into()),
            dataset: None,
            vars: Default::default(),
        }
    }

    #[test]
    fn each_mode_keeps_what_it_names() {
        let all: Vec<Partition> = ["2024-01", "2024-02", "2024-03", "2024-04", "2024-05"]
            .into_iter()
            .map(month)
            .collect();
        let earlier = earlier([
            // Failed once, then completed: complete.
            ("2024-01".to_string(), RunStatus::Halted, false),
            ("2024-01".to_string(), RunStatus::Complete, false),
            ("2024-02".to_string(), RunStatus::Halted, false),
            // Left unfinished by a process that is gone: failed, not in progress.
            ("2024-03".to_string(), RunStatus::Running, false),
            ("2024-04".to_string(), RunStatus::Escalated, true),
        ]);
        let keys = |mode| {
            let (kept, skipped) = select(all.clone(), &earlier, mode);
            (kept.iter().map(Partition::key).collect::<Vec<_>>(), skipped)
        };
        let (missing, s) = keys(Reprocess::Missing);
        assert_eq!(missing, ["2024-05"]);
        assert_eq!(
            s,
            Skipped {
                complete: 1,
                failed: 2,
                in_progress: 1
            }
        );
        assert_eq!(keys(Reprocess::Failed).0, ["2024-02", "2024-03", "2024-05"]);
        let (every, s) = keys(Reprocess::All);
        assert_eq!(every, ["2024-01", "2024-02", "2024-03", "2024-05"]);
        assert_eq!(s.in_progress, 1);
        assert!(s.describe(Reprocess::All).contains("1 in progress"));
    }
}
