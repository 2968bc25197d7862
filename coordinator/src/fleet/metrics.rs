//! The coordinator's metrics: [`Metrics`], served in the Prometheus text format at
//! `GET /metrics` ([`prometheus_router`]), and [`StepLatency`], the overhead per step also served
//! as JSON percentiles at `GET /v1/metrics`. Every metric is listed in `docs/OBSERVABILITY.md`.
//!
//! Counters and histograms of what happened come from the committed audit records
//! ([`MetricsObserver`] wraps the engine's observer), so they match the audit log exactly: a
//! step result counted here is one the coordinator made durable. Gauges of the fleet's state
//! (runs by state, outbox backlog, queue depths, workers) are read when Prometheus scrapes, from
//! PostgreSQL, RabbitMQ and the event loop, so a coordinator that just took over reports the
//! truth at once.
//!
//! ## Overhead per step
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use hdrhistogram::Histogram;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_shared::fleet::Topology;

use crate::api::EngineHandle;
use crate::engine::{Observer, OperatorCommand};

/// Buckets of the coordinator's overhead per step (seconds): 1 ms to 10 s.
const OVERHEAD_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of step durations and schedule-to-start delays (seconds): 10 ms to 1 h.
const STEP_BUCKETS: [f64; 16] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
];

/// A result whose run has no StepSpec confirmed this long after it is forgotten (its run
/// finished, or waits for an operator).
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// How many results are noted between two sweeps of forgotten entries.
const SWEEP_EVERY: u64 = 4096;

/// Result-to-next-StepSpec latencies, shared by the results consumer, the transport and the
/// publisher. Each call holds the lock for a map operation and a histogram increment.
pub struct StepLatency {
    inner: Mutex<Inner>,
    /// The same samples in Prometheus histograms (seconds).
    prom_dispatch: Histogram_,
    prom_confirm: Histogram_,
}

type Histogram_ = prometheus::Histogram;

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
        let prom = |name: &str, help: &str| {
            prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(name, help).buckets(OVERHEAD_BUCKETS.to_vec()),
            )
            .expect("valid histogram")
        };
        StepLatency {
            inner: Mutex::new(Inner {
                received: HashMap::new(),
                noted: 0,
                to_dispatch: hist(),
                to_confirm: hist(),
            }),
            prom_dispatch: prom(
                "warpline_result_to_dispatch_seconds",
                "Result taken off the results queue to the run's next StepSpec handed to the publisher.",
            ),
            prom_confirm: prom(
                "warpline_result_to_confirm_seconds",
                "Result taken off the results queue to the run's next StepSpec confirmed by the broker.",
            ),
        }
    }

    /// Registers the Prometheus histograms in `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.prom_dispatch.clone()))?;
        registry.register(Box::new(self.prom_confirm.clone()))
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
            let d = at.elapsed();
            inner.to_dispatch.saturating_record(micros(d));
            self.prom_dispatch.observe(d.as_secs_f64());
        }
    }

    /// The broker confirmed `run_id`'s StepSpec.
    pub fn confirmed(&self, run_id: Uuid) {
        let mut inner = self.lock();
        if let Some(at) = inner.received.remove(&run_id) {
            let d = at.elapsed();
            inner.to_confirm.saturating_record(micros(d));
            self.prom_confirm.observe(d.as_secs_f64());
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

/// The outcome label of a step result (shared with the worker's metrics).
pub use warpline_telemetry::outcome_label;

/// The coordinator's Prometheus metrics.
pub struct Metrics {
    registry: Registry,
    steps: IntCounterVec,
    decisions: IntCounterVec,
    overrides: IntCounterVec,
    llm_requests: IntCounterVec,
    llm_failures: IntCounterVec,
    llm_tokens: IntCounterVec,
    stale: IntCounterVec,
    escalations: IntCounterVec,
    runs_finished: IntCounterVec,
    step_duration: HistogramVec,
    schedule_to_start: HistogramVec,
    runs: IntGaugeVec,
    outbox: IntGauge,
    queue: IntGaugeVec,
    dead: IntGauge,
    workers: IntGaugeVec,
    slots: IntGaugeVec,
    busy: IntGaugeVec,
    leader: IntGauge,
    scrape_errors: IntCounterVec,
    /// What the observer remembers between records.
    seen: Mutex<Seen>,
    /// Pools whose queue depth is reported.
    pools: Mutex<BTreeSet<String>>,
}

#[derive(Default)]
struct Seen {
    /// Pipeline name by backfill (from `backfill_created`, or given at recovery).
    pipelines: HashMap<Uuid, String>,
    /// Dispatch time by attempt, until its result.
    dispatched: HashMap<Uuid, DateTime<Utc>>,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid gauge");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(STEP_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid histogram");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

impl Metrics {
    /// Every metric registered, at zero; `latency`'s histograms included.
    pub fn new(latency: &StepLatency) -> Metrics {
        let r = Registry::new();
        latency.register(&r).expect("unique metric");
        Metrics {
            steps: counter(
                &r,
                "warpline_steps_finished_total",
                "Step attempts whose result (or loss) the coordinator recorded, by pipeline, step and outcome.",
                &["pipeline", "step", "outcome"],
            ),
            decisions: counter(
                &r,
                "warpline_decisions_total",
                "Supervisor decisions recorded, by proposed action and deciding agent.",
                &["action", "agent"],
            ),
            overrides: counter(
                &r,
                "warpline_guard_overrides_total",
                "Decisions the guard replaced, by proposed and applied action.",
                &["proposed", "applied"],
            ),
            llm_requests: counter(
                &r,
                "warpline_llm_requests_total",
                "HTTP requests made to a model (retries included), by model.",
                &["model"],
            ),
            llm_failures: counter(
                &r,
                "warpline_llm_failures_total",
                "Decisions a model failed to make (another agent stood in), by model.",
                &["model"],
            ),
            llm_tokens: counter(
                &r,
                "warpline_llm_tokens_total",
                "Model tokens used, by model and kind (`input`, `output`).",
                &["model", "kind"],
            ),
            stale: counter(
                &r,
                "warpline_stale_results_total",
                "Results that answered no outstanding attempt (duplicates, late results), by step.",
                &["step"],
            ),
            escalations: counter(
                &r,
                "warpline_escalations_total",
                "Runs parked for an operator, by step.",
                &["step"],
            ),
            runs_finished: counter(
                &r,
                "warpline_runs_finished_total",
                "Runs that reached a final state, by pipeline and state.",
                &["pipeline", "state"],
            ),
            step_duration: histogram(
                &r,
                "warpline_step_duration_seconds",
                "Wall time of a step attempt's tool on the worker, by pipeline and step.",
                &["pipeline", "step"],
            ),
            schedule_to_start: histogram(
                &r,
                "warpline_step_schedule_to_start_seconds",
                "From the coordinator recording a dispatch to the worker starting the tool (two clocks), by pipeline and step.",
                &["pipeline", "step"],
            ),
            runs: gauge_vec(
                &r,
                "warpline_runs",
                "Runs in the database by state (read at scrape time).",
                &["state"],
            ),
            outbox: gauge(
                &r,
                "warpline_outbox_backlog",
                "StepSpecs committed to the outbox and not yet confirmed by the broker.",
            ),
            queue: gauge_vec(
                &r,
                "warpline_queue_messages",
                "Messages ready in a queue (steps queue per pool, and the results queue).",
                &["queue", "pool"],
            ),
            dead: gauge(
                &r,
                "warpline_dead_letters",
                "Messages in the dead-letter queue.",
            ),
            workers: gauge_vec(
                &r,
                "warpline_workers_alive",
                "Workers heard from recently, by pool.",
                &["pool"],
            ),
            slots: gauge_vec(
                &r,
                "warpline_worker_slots",
                "Step slots of the workers heard from recently, by pool.",
                &["pool"],
            ),
            busy: gauge_vec(
                &r,
                "warpline_worker_slots_busy",
                "Slots running a step, by pool (from heartbeats).",
                &["pool"],
            ),
            leader: gauge(
                &r,
                "warpline_leader",
                "1 when this coordinator holds the leader lock and leads, 0 on a standby.",
            ),
            scrape_errors: counter(
                &r,
                "warpline_metrics_scrape_errors_total",
                "Gauges that could not be read at a scrape, by source.",
                &["source"],
            ),
            registry: r,
            seen: Mutex::new(Seen::default()),
            pools: Mutex::new(BTreeSet::new()),
        }
    }

    /// The registry, for encoding.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Names the pipeline of backfills the observer did not see created (recovered ones).
    pub fn know_pipelines(&self, backfills: impl IntoIterator<Item = (Uuid, String)>) {
        self.lock().pipelines.extend(backfills);
    }

    /// Forgets a backfill the engine pruned (retention).
    pub fn forget_backfill(&self, backfill_id: Uuid) {
        self.lock().pipelines.remove(&backfill_id);
    }

    /// Pools whose queue depth is reported.
    pub fn watch_pools(&self, pools: impl IntoIterator<Item = String>) {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(pools);
    }

    /// Whether this coordinator leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one committed record.
    pub fn on_record(&self, r: &AuditRecord) {
        let mut seen = self.lock();
        let pipeline = |seen: &Seen| {
            r.backfill_id
                .and_then(|b| seen.pipelines.get(&b).cloned())
                .unwrap_or_default()
        };
        match &r.event {
            AuditEvent::BackfillCreated { pipeline, .. } => {
                if let Some(b) = r.backfill_id {
                    seen.pipelines.insert(b, pipeline.clone());
                }
            }
            AuditEvent::StepDispatched { attempt_id, .. } => {
                seen.dispatched.insert(*attempt_id, r.ts);
            }
            AuditEvent::StepResult { outcome } => {
                let p = pipeline(&seen);
                let step = outcome.result.step_id.as_str();
                self.steps
                    .with_label_values(&[p.as_str(), step, outcome_label(outcome)])
                    .inc();
                if outcome.result.started_at.is_some() {
                    self.step_duration
                        .with_label_values(&[p.as_str(), step])
                        .observe(outcome.result.duration_ms as f64 / 1000.0);
                }
                let at = outcome
                    .result
                    .attempt_id
                    .and_then(|a| seen.dispatched.remove(&a));
                if let (Some(at), Some(started)) = (at, outcome.result.started_at) {
                    let d = (started - at).num_milliseconds().max(0) as f64 / 1000.0;
                    self.schedule_to_start
                        .with_label_values(&[p.as_str(), step])
                        .observe(d);
                }
            }
            AuditEvent::AttemptLost {
                step_id,
                attempt_id,
                ..
            } => {
                seen.dispatched.remove(attempt_id);
                let p = pipeline(&seen);
                self.steps
                    .with_label_values(&[p.as_str(), step_id, "lost"])
                    .inc();
            }
            AuditEvent::StepHandedBack {
                step_id,
                attempt_id,
                ..
            } => {
                seen.dispatched.remove(attempt_id);
                let p = pipeline(&seen);
                self.steps
                    .with_label_values(&[p.as_str(), step_id, "handed_back"])
                    .inc();
            }
            AuditEvent::StaleResult { step_id, .. } => {
                self.stale.with_label_values(&[step_id]).inc();
            }
            AuditEvent::Decision {
                agent,
                model,
                decision,
                tokens,
                fallback,
                requests,
                ..
            } => {
                self.decisions
                    .with_label_values(&[decision.action.as_str(), agent])
                    .inc();
                if let Some(model) = model {
                    if let Some(n) = requests {
                        self.llm_requests
                            .with_label_values(&[model])
                            .inc_by(u64::from(*n));
                    }
                    if let Some(t) = tokens {
                        self.llm_tokens
                            .with_label_values(&[model, "input"])
                            .inc_by(t.input);
                        self.llm_tokens
                            .with_label_values(&[model, "output"])
                            .inc_by(t.output);
                    }
                    if fallback.is_some() {
                        self.llm_failures.with_label_values(&[model]).inc();
                    }
                }
            }
            AuditEvent::GuardOverride {
                proposed, applied, ..
            } => {
                self.overrides
                    .with_label_values(&[proposed.as_str(), applied.as_str()])
                    .inc();
            }
            AuditEvent::Escalated { step_id, .. } => {
                self.escalations.with_label_values(&[step_id]).inc();
            }
            AuditEvent::RunFinished { state, .. } => {
                let p = pipeline(&seen);
                self.runs_finished
                    .with_label_values(&[p.as_str(), state.as_str()])
                    .inc();
            }
            _ => {}
        }
        // Attempts whose result never comes (the coordinator restarted in between) are
        // forgotten after a bound.
        if seen.dispatched.len() > 100_000 {
            let cutoff = Utc::now() - chrono::Duration::hours(24);
            seen.dispatched.retain(|_, at| *at > cutoff);
        }
    }

    /// Reads the gauges of the fleet's state; a source that does not answer leaves its gauges
    /// as they were and counts a scrape error.
    pub async fn refresh(&self, sources: &Sources) {
        let timeout = Duration::from_secs(3);
        match tokio::time::timeout(timeout, db_gauges(&sources.db)).await {
            Ok(Ok((runs, outbox))) => {
                self.runs.reset();
                for (state, n) in runs {
                    self.runs.with_label_values(&[state.as_str()]).set(n);
                }
                self.outbox.set(outbox);
            }
            _ => self.scrape_errors.with_label_values(&["postgres"]).inc(),
        }
        if self.leader.get() == 0 {
            // A standby runs no event loop and hears no heartbeats.
            self.workers.reset();
            self.slots.reset();
            self.busy.reset();
        } else {
            match tokio::time::timeout(timeout, sources.engine.command(OperatorCommand::Workers))
                .await
            {
                Ok(Ok(serde_json::Value::Array(list))) => {
                    self.workers.reset();
                    self.slots.reset();
                    self.busy.reset();
                    for w in list {
                        let pool = w["pool"].as_str().unwrap_or_default();
                        self.workers.with_label_values(&[pool]).inc();
                        self.slots
                            .with_label_values(&[pool])
                            .add(w["slots"].as_i64().unwrap_or(0));
                        self.busy
                            .with_label_values(&[pool])
                            .add(w["running"].as_i64().unwrap_or(0));
                    }
                }
                _ => self.scrape_errors.with_label_values(&["engine"]).inc(),
            }
        }
        let pools: Vec<String> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        match tokio::time::timeout(timeout, sources.broker.depths(&pools)).await {
            Ok(Ok(depths)) => {
                self.queue.reset();
                for (queue, pool, n) in depths.queues {
                    self.queue
                        .with_label_values(&[queue.as_str(), pool.as_str()])
                        .set(n);
                }
                self.dead.set(depths.dead);
            }
            _ => self.scrape_errors.with_label_values(&["rabbitmq"]).inc(),
        }
    }
}

async fn db_gauges(db: &Pool) -> anyhow::Result<(Vec<(String, i64)>, i64)> {
    let client = db.get().await?;
    let rows = client
        .query("SELECT state, count(*) FROM runs GROUP BY state", &[])
        .await?;
    let runs = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let outbox: i64 = client
        .query_one("SELECT count(*) FROM outbox WHERE sent_at IS NULL", &[])
        .await?
        .get(0);
    Ok((runs, outbox))
}

/// Wraps the engine's observer: counts every committed record, then shows it.
pub struct MetricsObserver {
    metrics: Arc<Metrics>,
    inner: Box<dyn Observer>,
}

impl MetricsObserver {
    /// Counts into `metrics`, then passes each record to `inner`.
    pub fn new(metrics: Arc<Metrics>, inner: Box<dyn Observer>) -> MetricsObserver {
        MetricsObserver { metrics, inner }
    }
}

impl Observer for MetricsObserver {
    fn on_record(&mut self, record: &AuditRecord) {
        self.metrics.on_record(record);
        self.inner.on_record(record);
    }

    fn finish(&mut self) {
        self.inner.finish();
    }

    fn forget(&mut self, backfill_id: Uuid, runs: &[Uuid]) {
        self.metrics.forget_backfill(backfill_id);
        self.inner.forget(backfill_id, runs);
    }
}

/// Queue depths read from the broker with passive declares, on a connection of the metrics'
/// own (opened at the first scrape, opened again after it drops).
pub struct Broker {
    url: String,
    topology: Topology,
    channel: tokio::sync::Mutex<Option<(lapin::Connection, lapin::Channel)>>,
}

impl std::fmt::Debug for Broker {
    // Not the URL: it holds the broker's password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("prefix", &self.topology.prefix)
            .finish_non_exhaustive()
    }
}

/// What one scrape read from the broker.
pub struct Depths {
    /// (queue, pool, ready messages); the results queue has an empty pool.
    pub queues: Vec<(String, String, i64)>,
    /// Messages in the dead-letter queue.
    pub dead: i64,
}

impl Broker {
    /// Reads `url`'s queues named by `topology`.
    pub fn new(url: String, topology: Topology) -> Broker {
        Broker {
            url,
            topology,
            channel: tokio::sync::Mutex::new(None),
        }
    }

    /// Ready messages in each pool's steps queue (the fleet view of the API and the
    /// dashboard), or `None` when the broker does not answer within 3 s or a queue is not
    /// declared yet.
    pub async fn queued(&self, pools: &[String]) -> Option<BTreeMap<String, u64>> {
        let depths = tokio::time::timeout(Duration::from_secs(3), self.depths(pools))
            .await
            .ok()?
            .ok()?;
        Some(
            depths
                .queues
                .into_iter()
                .filter(|(_, pool, _)| !pool.is_empty())
                .map(|(_, pool, n)| (pool, u64::try_from(n).unwrap_or(0)))
                .collect(),
        )
    }

    async fn depths(&self, pools: &[String]) -> anyhow::Result<Depths> {
        let mut guard = self.channel.lock().await;
        let alive = guard
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
        if !alive {
            let backoff = warpline_amqp::Backoff {
                max_attempts: Some(1),
                ..Default::default()
            };
            let conn = warpline_amqp::connect(&self.url, "warpline-metrics", &backoff).await?;
            let ch = conn.create_channel().await?;
            *guard = Some((conn, ch));
        }
        let (_, ch) = guard.as_ref().expect("connected above");
        let count = async |name: &str| -> anyhow::Result<i64> {
            let q = ch
                .queue_declare(
                    name.into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await?;
            Ok(i64::from(q.message_count()))
        };
        let mut queues = Vec::new();
        for pool in pools {
            let name = self.topology.steps_queue(pool);
            // A queue not declared yet (no worker, no StepSpec) holds nothing; a failed
            // passive declare closes the channel, so it is opened again at the next scrape.
            match count(&name).await {
                Ok(n) => queues.push((name, pool.clone(), n)),
                Err(e) => {
                    *guard = None;
                    return Err(e);
                }
            }
        }
        let results = self.topology.results_queue();
        let n = count(&results).await;
        let dead = count(&self.topology.dead_queue()).await;
        match (n, dead) {
            (Ok(n), Ok(dead)) => {
                queues.push((results, String::new(), n));
                Ok(Depths { queues, dead })
            }
            (Err(e), _) | (_, Err(e)) => {
                *guard = None;
                Err(e)
            }
        }
    }
}

/// Where the scrape-time gauges come from.
pub struct Sources {
    /// PostgreSQL (runs, outbox).
    pub db: Pool,
    /// The event loop (workers).
    pub engine: EngineHandle,
    /// RabbitMQ (queue depths).
    pub broker: Broker,
}

/// `GET /metrics`: every metric in the Prometheus text format.
pub fn prometheus_router(metrics: Arc<Metrics>, sources: Arc<Sources>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state((metrics, sources))
}

async fn scrape(State((metrics, sources)): State<(Arc<Metrics>, Arc<Sources>)>) -> Response {
    metrics.refresh(&sources).await;
    warpline_telemetry::prom::response(warpline_telemetry::prom::encode(metrics.registry()))
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
