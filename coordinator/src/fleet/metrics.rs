//! The coordinator's overhead per step in fleet mode, measured where it happens.
//!
//! For every result that arrives, the results consumer notes the instant it took the message
//! off the queue ([`StepLatency::result_received`]). When the event loop hands the run's next
//! StepSpec to the publisher ([`StepLatency::dispatched`]) and when the broker confirms that
//! StepSpec ([`StepLatency::confirmed`]), the time since the result is recorded in a histogram.
//! So `result_to_confirm` is the whole coordinator overhead of one step (the turn that applies
//! the result and its commit, the supervisor, the turn that dispatches and its commit, the
//! publish and its confirm), and `result_to_dispatch` is the part spent before the publisher.
//!
//! Only results followed by a dispatch are counted (the last step of a run has no next
//! StepSpec; a retry's backoff is counted with it, so a pure measure needs passing steps).
//! `GET /v1/metrics` serves a [`LatencySnapshot`]. The histograms are bounded (hdrhistogram,
//! 3 significant digits, 1 µs to 10 min); so is the map of results awaiting their next
//! StepSpec, which forgets entries older than [`FORGET_AFTER`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A result whose run has no StepSpec confirmed this long after it is forgotten (its run
/// finished, or waits for an operator).
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// How many results are noted between two sweeps of forgotten entries.
const SWEEP_EVERY: u64 = 4096;

/// Result-to-next-StepSpec latencies, shared by the results consumer, the transport and the
/// publisher. Each call holds the lock for a map operation and a histogram increment.
pub struct StepLatency {
    inner: Mutex<Inner>,
}

struct Inner {
    /// When each run's latest result was taken off the queue.
    received: HashMap<Uuid, Instant>,
    noted: u64,
    to_dispatch: Histogram<u64>,
    to_confirm: Histogram<u64>,
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

/// `GET /v1/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LatencySnapshot {
    /// Result taken off the queue → the run's next StepSpec handed to the publisher.
    pub result_to_dispatch: Percentiles,
    /// Result taken off the queue → the run's next StepSpec confirmed by the broker.
    pub result_to_confirm: Percentiles,
}

impl Default for StepLatency {
    fn default() -> Self {
        StepLatency::new()
    }
}

impl StepLatency {
    /// Empty histograms.
    pub fn new() -> StepLatency {
        let hist = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        StepLatency {
            inner: Mutex::new(Inner {
                received: HashMap::new(),
                noted: 0,
                to_dispatch: hist(),
                to_confirm: hist(),
            }),
        }
    }

    /// A result for `run_id` was taken off the results queue now.
    pub fn result_received(&self, run_id: Uuid) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.received.insert(run_id, now);
        inner.noted += 1;
        if inner.noted.is_multiple_of(SWEEP_EVERY) {
            inner
                .received
                .retain(|_, at| now.duration_since(*at) < FORGET_AFTER);
        }
    }

    /// The event loop handed `run_id`'s next StepSpec to the publisher.
    pub fn dispatched(&self, run_id: Uuid) {
        let mut inner = self.lock();
        if let Some(at) = inner.received.get(&run_id).copied() {
            let us = micros(at.elapsed());
            inner.to_dispatch.saturating_record(us);
        }
    }

    /// The broker confirmed `run_id`'s StepSpec.
    pub fn confirmed(&self, run_id: Uuid) {
        let mut inner = self.lock();
        if let Some(at) = inner.received.remove(&run_id) {
            let us = micros(at.elapsed());
            inner.to_confirm.saturating_record(us);
        }
    }

    /// The percentiles so far.
    pub fn snapshot(&self) -> LatencySnapshot {
        let inner = self.lock();
        LatencySnapshot {
            result_to_dispatch: percentiles(&inner.to_dispatch),
            result_to_confirm: percentiles(&inner.to_confirm),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only counters behind: keep counting.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    // Microseconds to milliseconds, three decimals.
    let ms = |us: f64| us.round() / 1000.0;
    Percentiles {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.5) as f64),
        p90_ms: ms(h.value_at_quantile(0.9) as f64),
        p99_ms: ms(h.value_at_quantile(0.99) as f64),
        max_ms: ms(h.max() as f64),
        mean_ms: ms(h.mean()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_results_followed_by_a_stepspec() {
        let m = StepLatency::new();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        m.result_received(a);
        m.result_received(b);
        m.dispatched(a);
        m.confirmed(a);
        // A StepSpec with no result before it (a run's first step) is not a sample.
        m.confirmed(Uuid::now_v7());
        let s = m.snapshot();
        assert_eq!(s.result_to_dispatch.count, 1);
        assert_eq!(s.result_to_confirm.count, 1);
        // Confirming again does not count the same result twice.
        m.confirmed(a);
        assert_eq!(m.snapshot().result_to_confirm.count, 1);
        assert!(s.result_to_confirm.p50_ms >= s.result_to_dispatch.p50_ms);
    }
}
