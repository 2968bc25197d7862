//! The worker's Prometheus metrics, served at `GET /metrics` when `--metrics ADDR` is given
//! (`warpline_telemetry::prom::serve`). One set per process; every metric is listed in
//! `docs/OBSERVABILITY.md`.

use std::sync::LazyLock;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use warpline_shared::contracts::StepOutcome;

/// Buckets of step durations (seconds): 10 ms to 1 h.
const STEP_BUCKETS: [f64; 16] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
];

/// The worker's metrics.
pub struct WorkerMetrics {
    /// Everything below, for encoding.
    pub registry: Registry,
    /// `warpline_worker_steps_total{step, outcome}`.
    pub steps: IntCounterVec,
    /// `warpline_worker_step_duration_seconds{step}`.
    pub duration: HistogramVec,
    /// `warpline_worker_refused_total{reason}`.
    pub refused: IntCounterVec,
    /// `warpline_worker_requeued_total{reason}`.
    pub requeued: IntCounterVec,
    /// `warpline_worker_slots`.
    pub slots: IntGauge,
    /// `warpline_worker_slots_busy`.
    pub busy: IntGauge,
    /// `warpline_worker_connected`: 1 while a broker session is up.
    pub connected: IntGauge,
}

/// The process's metrics.
pub fn get() -> &'static WorkerMetrics {
    static METRICS: LazyLock<WorkerMetrics> = LazyLock::new(WorkerMetrics::new);
    &METRICS
}

impl WorkerMetrics {
    fn new() -> WorkerMetrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let steps = counter(
            "warpline_worker_steps_total",
            "Steps this worker ran and reported, by step and outcome.",
            &["step", "outcome"],
        );
        let refused = counter(
            "warpline_worker_refused_total",
            "StepSpecs refused and dead-lettered without running, by reason.",
            &["reason"],
        );
        let requeued = counter(
            "warpline_worker_requeued_total",
            "StepSpecs handed back, by reason: to the broker (`cancelled`, `publish_failed`), or to the coordinator as a refused outcome this worker may not run (`not_runnable`).",
            &["reason"],
        );
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "warpline_worker_step_duration_seconds",
                "Wall time of a step's tool on this worker, by step.",
            )
            .buckets(STEP_BUCKETS.to_vec()),
            &["step"],
        )
        .expect("valid histogram");
        registry
            .register(Box::new(duration.clone()))
            .expect("unique metric");
        let slots = gauge(
            "warpline_worker_slots",
            "Steps this worker runs at once (`--slots`).",
        );
        let busy = gauge("warpline_worker_slots_busy", "Slots running a step now.");
        let connected = gauge(
            "warpline_worker_connected",
            "1 while this worker has a broker session.",
        );
        WorkerMetrics {
            registry,
            steps,
            duration,
            refused,
            requeued,
            slots,
            busy,
            connected,
        }
    }

    /// Counts one reported outcome.
    pub fn finished(&self, outcome: &StepOutcome) {
        let step = outcome.result.step_id.as_str();
        self.steps
            .with_label_values(&[step, outcome_label(outcome)])
            .inc();
        if outcome.result.started_at.is_some() {
            self.duration
                .with_label_values(&[step])
                .observe(outcome.result.duration_ms as f64 / 1000.0);
        }
    }
}

pub use warpline_telemetry::outcome_label;
