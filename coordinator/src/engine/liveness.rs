//! Worker liveness (fleet mode): heartbeats say which attempts are running where; a tick
//! declares lost the attempts whose worker fell silent (and, with a retention, forgets the
//! backfills past it: [`super::retention`]).
//!
//! What heartbeats leave in memory is bounded whatever they claim: only attempts this
//! coordinator is awaiting are tracked (so at most one per run), a heartbeat's own list is kept
//! only for those, at most [`MAX_WORKERS`] workers are remembered, and an interval is clamped
//! to [`MAX_INTERVAL_S`] so an expiry is always finite and never overflows.

use std::time::{Duration, Instant};

use super::Engine;
use warpline_shared::fleet::Heartbeat;

/// Most workers remembered at once; heartbeats of further unknown workers are ignored until
/// some fall silent.
pub const MAX_WORKERS: usize = 4096;
/// The longest heartbeat interval taken at its word (an hour); longer ones count as this.
pub const MAX_INTERVAL_S: u64 = 3600;

/// How long a worker that heartbeats every `interval_s` may stay silent: three intervals.
pub(super) fn silence(interval_s: u64) -> Duration {
    Duration::from_secs(interval_s.clamp(1, MAX_INTERVAL_S).saturating_mul(3))
}

impl Engine {
    pub(super) fn on_heartbeat(&mut self, mut hb: Heartbeat) {
        let now = Instant::now();
        self.workers_changed = true;
        if hb.stopping {
            self.workers.remove(&hb.worker_id);
        } else if !self.workers.contains_key(&hb.worker_id) && self.workers.len() >= MAX_WORKERS {
            tracing::warn!(worker_id = %hb.worker_id, max = MAX_WORKERS, "ignoring a heartbeat: too many workers are known");
            return;
        }
        let silence = silence(hb.interval_s);
        // Only attempts this coordinator awaits, from the run that awaits them.
        hb.running.retain(|a| {
            self.runs
                .get(&a.run_id)
                .and_then(|r| r.machine.outstanding())
                .is_some_and(|o| o.attempt_id == a.attempt_id)
        });
        for a in &hb.running {
            self.seen
                .insert(a.attempt_id, (a.run_id, hb.worker_id.clone(), now, silence));
        }
        if !hb.stopping {
            self.workers.insert(hb.worker_id.clone(), (hb, now));
        }
    }

    /// Declares lost the outstanding attempts whose worker stopped heartbeating and that no
    /// other worker has picked up since (a broker redelivers a dead worker's steps at once).
    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        self.prune_when_due(now);
        let known = self.workers.len();
        self.workers
            .retain(|_, (hb, at)| now.duration_since(*at) < silence(hb.interval_s));
        self.workers_changed |= self.workers.len() != known;
        // Only the attempts heartbeats named are looked at (at most one per slot of the
        // fleet), not every run: an attempt that reported (or was cancelled) since is no
        // longer watched.
        let mut lost = Vec::new();
        self.seen
            .retain(|attempt_id, (run_id, worker, at, silence)| {
                let awaited = (self.runs.get(run_id))
                    .and_then(|r| r.machine.outstanding())
                    .is_some_and(|o| o.attempt_id == *attempt_id);
                if awaited && now.duration_since(*at) > *silence {
                    lost.push((
                        *run_id,
                        *attempt_id,
                        worker.clone(),
                        now.duration_since(*at),
                    ));
                }
                awaited
            });
        for (run_id, attempt_id, worker, quiet) in lost {
            self.seen.remove(&attempt_id);
            self.declare_lost(
                run_id,
                attempt_id,
                format!(
                    "worker `{worker}` stopped heartbeating ({} s without word) and no other worker took the step",
                    quiet.as_secs()
                ),
            );
        }
    }
}
