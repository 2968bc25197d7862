//! The committed state that the cheapest reads are answered from without waiting for the
//! loop: each backfill's counts-only summary (`GET /v1/backfills/{id}?runs=none`) and the
//! workers heard from. A read sent to the loop waits for the turn in progress (its events and
//! its commit); on a busy coordinator of a 100,000-partition backfill that was most of a
//! counts-only status's 116 ms p99.
//!
//! The engine publishes it after each commit and before that turn's answers go out, so a
//! client that was answered (a submit, a cancel) reads what it did, and nothing uncommitted is
//! ever shown: only the backfills whose records or runs the turn changed are summarised again
//! (O(1) each: their tallies), and the workers only when a heartbeat or the tick changed them.
//! Times (a summary's wall time, rate and ETA, a worker's silence) are taken at the read.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use chrono::Utc;
use uuid::Uuid;
use warpline_shared::fleet::Heartbeat;

use super::{Summary, WorkerInfo};

/// The published state, shared by the loop (the one writer) and the HTTP handlers.
#[derive(Debug, Clone, Default)]
pub struct Snapshots(Arc<RwLock<Snapshot>>);

#[derive(Debug, Default)]
struct Snapshot {
    /// A loop publishes here now: set by its first publish, cleared when its session ends
    /// (a standby, or a coordinator between sessions, answers from its loop, as before).
    live: bool,
    /// Each backfill's counts-only summary as of its last change.
    summaries: HashMap<Uuid, Summary>,
    /// The audit log and its head as of the last commit (every turn moves the head).
    audit: (String, String),
    /// The workers, with when each was last heard from.
    workers: Vec<(Heartbeat, Instant)>,
}

impl Snapshots {
    /// Backfill `id`'s counts-only summary as of the last commit, paced now (`Some(None)`
    /// for a backfill the coordinator does not have); `None` while no loop publishes.
    pub fn summary(&self, id: Uuid) -> Option<Option<Summary>> {
        let snap = self.0.read().expect("snapshot lock poisoned");
        if !snap.live {
            return None;
        }
        let Some(mut s) = snap.summaries.get(&id).cloned() else {
            return Some(None);
        };
        (s.audit, s.audit_head) = snap.audit.clone();
        drop(snap);
        s.pace(Utc::now());
        Some(Some(s))
    }

    /// The workers as the loop's `Workers` read lists them; `None` while no loop publishes.
    pub fn workers(&self) -> Option<Vec<WorkerInfo>> {
        let snap = self.0.read().expect("snapshot lock poisoned");
        snap.live
            .then(|| worker_infos(snap.workers.iter().map(|(hb, at)| (hb, at))))
    }

    /// Forgets everything: the session that published ended.
    pub fn close(&self) {
        *self.0.write().expect("snapshot lock poisoned") = Snapshot::default();
    }

    /// Publishes what a commit changed: backfills summarised again (`None`: forgotten), the
    /// audit head, and the workers when they changed.
    pub(super) fn publish(
        &self,
        summaries: Vec<(Uuid, Option<Summary>)>,
        audit: (String, String),
        workers: Option<Vec<(Heartbeat, Instant)>>,
    ) {
        let mut snap = self.0.write().expect("snapshot lock poisoned");
        snap.live = true;
        for (id, s) in summaries {
            match s {
                Some(s) => snap.summaries.insert(id, s),
                None => snap.summaries.remove(&id),
            };
        }
        snap.audit = audit;
        if let Some(w) = workers {
            snap.workers = w;
        }
    }
}

/// The workers as reads list them, sorted by id.
pub(super) fn worker_infos<'a>(
    workers: impl Iterator<Item = (&'a Heartbeat, &'a Instant)>,
) -> Vec<WorkerInfo> {
    let mut list: Vec<WorkerInfo> = workers
        .map(|(hb, at)| WorkerInfo {
            worker_id: hb.worker_id.clone(),
            pool: hb.pool.clone(),
            slots: hb.slots,
            running: hb.running.len(),
            last_seen_ms: at.elapsed().as_millis() as u64,
            allow: hb.allow.clone(),
        })
        .collect();
    list.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
    list
}

#[cfg(test)]
mod tests {
    use warpline_shared::machine::RunStatus;

    use super::super::tests::{Harness, outcome};
    use super::super::{Event, RunsShown};
    use super::*;

    /// What a commit publishes is the loop's own counts-only summary as of that commit: a
    /// submit's backfill once its turn committed, each result's change after its turn, an
    /// unknown backfill as unknown; after a restart every backfill again; nothing once closed.
    #[tokio::test(start_paused = true)]
    async fn each_commit_publishes_the_counts_of_the_backfills_it_changed() {
        let mut h = Harness::new();
        let snaps = Snapshots::default();
        assert!(
            snaps.summary(Uuid::nil()).is_none(),
            "nothing published yet"
        );
        h.engine.publish_to(snaps.clone());
        let steps = serde_json::json!([{"id": "A", "command": "true", "max_attempts": 1}]);
        let req = h.backfill(steps, &["a", "b", "c"]);
        let id = req.id;
        let t = h.turn([Event::Submit(Box::new(req), None)]).await;
        let published = |snaps: &Snapshots| snaps.summary(id).flatten().expect("published");
        let loop_view = |h: &mut Harness| h.engine.summary_where(id, RunsShown::None);
        let first = published(&snaps);
        assert_eq!(first.counts, loop_view(&mut h).counts);
        assert_eq!(first.counts.get(&RunStatus::Running), Some(&3));
        assert!(first.runs.is_empty());
        assert!(
            matches!(snaps.summary(Uuid::nil()), Some(None)),
            "an unknown backfill"
        );
        // Two results in one turn: both counted after its commit, with that commit's head.
        let results: Vec<Event> = (t.dispatched.iter().take(2))
            .enumerate()
            .map(|(i, s)| outcome(s, if i == 0 { 0 } else { 2 }))
            .collect();
        h.turn(results).await;
        let now = published(&snaps);
        let there = loop_view(&mut h);
        assert_eq!(now.counts, there.counts);
        assert_eq!(
            (
                now.counts.get(&RunStatus::Complete),
                now.counts.get(&RunStatus::Halted)
            ),
            (Some(&1), Some(&1))
        );
        assert_eq!(
            (&now.audit, &now.audit_head),
            (&there.audit, &there.audit_head)
        );
        assert_eq!((now.steps_executed, now.finished), (2, false));
        // A restarted engine publishes every backfill at its first commit.
        snaps.close();
        assert!(snaps.summary(id).is_none(), "closed: ask the loop");
        h.restart().await;
        assert!(
            snaps.summary(id).is_none(),
            "the new engine publishes nowhere yet"
        );
        h.engine.publish_to(snaps.clone());
        h.commit().await;
        assert_eq!(published(&snaps).counts, there.counts);
    }
}
