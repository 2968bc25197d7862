//! Worker liveness (fleet mode): heartbeats say which attempts are running where; a tick
//! declares lost the attempts whose worker fell silent.

use std::time::{Duration, Instant};

use super::Engine;
use warpline_shared::fleet::Heartbeat;

impl Engine {
    pub(super) fn on_heartbeat(&mut self, hb: Heartbeat) {
        let now = Instant::now();
        let silence = Duration::from_secs(hb.interval_s.max(1) * 3);
        for a in &hb.running {
            self.seen
                .insert(a.attempt_id, (hb.worker_id.clone(), now, silence));
        }
        if hb.stopping {
            self.workers.remove(&hb.worker_id);
        } else {
            self.workers.insert(hb.worker_id.clone(), (hb, now));
        }
    }

    /// Declares lost the outstanding attempts whose worker stopped heartbeating and that no
    /// other worker has picked up since (a broker redelivers a dead worker's steps at once).
    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        self.workers.retain(|_, (hb, at)| {
            now.duration_since(*at) < Duration::from_secs(hb.interval_s.max(1) * 3)
        });
        let mut lost = Vec::new();
        for r in self.runs.values() {
            if let Some(a) = r.machine.outstanding()
                && let Some((worker, at, silence)) = self.seen.get(&a.attempt_id)
                && now.duration_since(*at) > *silence
            {
                lost.push((r.id, a.attempt_id, worker.clone(), now.duration_since(*at)));
            }
        }
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
