//! Fleet mode: the worker as a RabbitMQ consumer. It takes StepSpecs from its pool's queue, runs
//! each with the same executor as local mode, publishes the StepOutcome to the results queue and
//! only then acks the spec.
//!
//! Backpressure lives in one place: a [`Semaphore`] with one permit per slot. The consume loop
//! takes a permit before it takes a delivery, and the permit moves into the task running the
//! step until its tool ended, so at most `slots` tools run at once, across reconnects too. The
//! broker's prefetch is the same number by default, so it never hands this worker more than it
//! can start; `--prefetch` above the slots lets a freed slot start a spec already here while
//! the last outcome's publish is still being confirmed (its spec stays unacked until then).
//!
//! A connection is a *session*. When it drops (broker restart, network, a forced close), the
//! steps it delivered are cancelled — their acks can no longer be sent and the broker has already
//! requeued them, so letting them run on would only race their redelivery — and the worker
//! reconnects with capped, jittered exponential backoff. Stale duplicate outcomes are harmless:
//! the coordinator ignores a result whose `attempt_id` is not outstanding.
//!
//! A StepSpec this worker may not run (its command is not on the allowlist, or does not
//! resolve here) is not failed: the worker publishes a `refused` outcome, a hand-back the
//! coordinator answers by dispatching the step again for another worker of the pool, and acks
//! the spec only after that publish was confirmed, as for any outcome. Heartbeats advertise the
//! allowlist as resolved here, so the coordinator and `submit` know who can run what.
//!
//! On shutdown the worker cancels its consumer, requeues what was prefetched but not started,
//! lets running steps finish for up to `drain` and publishes their outcomes, then cancels the
//! rest (the executor kills their process groups) and requeues them, sends a last heartbeat with
//! `stopping: true` and closes its channels and connection.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use chrono::Utc;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use warpline_shared::contracts::StepSpec;
use warpline_shared::fleet::{
    DEAD_REASON_HEADER, Heartbeat, RunningAttempt, SIGNATURE_HEADER, Topology, verify_signature,
};

use warpline_amqp::{self as amqp, Backoff};
use warpline_executor::allow::advertise;
use warpline_executor::{CANCELLED_ERROR, ExecConfig, handed_back, run_step, unrunnable};
use warpline_telemetry::trace;

/// How a fleet worker runs: loaded once from the command line and passed to [`run`].
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The broker (`amqp://user:pass@host:5672/%2f`), with the AMQP heartbeat to ask for
    /// ([`warpline_amqp::FleetArgs::connection_url`]).
    pub amqp_url: String,
    /// The fleet's exchange and queue names.
    pub topology: Topology,
    /// The pool whose queue this worker consumes.
    pub pool: String,
    /// Steps run at once.
    pub slots: u16,
    /// StepSpecs the broker may hand this worker unacknowledged (at least `slots`).
    pub prefetch: u16,
    /// Seconds between heartbeats.
    pub heartbeat: Duration,
    /// How long running steps may go on after a shutdown signal before they are cancelled.
    pub drain: Duration,
    /// HMAC key: when set, unsigned or forged StepSpecs are dead-lettered and outcomes are
    /// signed.
    pub signing_key: Option<Vec<u8>>,
    /// How the executor runs steps (worker id, allowlist, tool search path, kill grace).
    pub exec: ExecConfig,
    /// Delays between connection attempts.
    pub backoff: Backoff,
}

impl WorkerConfig {
    /// The worker's id (as in its heartbeats and results).
    pub fn worker_id(&self) -> &str {
        &self.exec.worker_id
    }
}

/// Why a delivery was refused without running; such a message is dead-lettered, never retried.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A signing key is set and the message has no signature.
    #[error(
        "the message has no `{SIGNATURE_HEADER}` header, and this worker accepts only signed StepSpecs"
    )]
    Unsigned,
    /// The signature does not match the body.
    #[error(
        "the message's `{SIGNATURE_HEADER}` does not match its body (forged, or signed with another WARPLINE_SIGNING_KEY)"
    )]
    BadSignature,
    /// The body is not a StepSpec.
    #[error("the message is not a valid StepSpec ({0}); see shared/schema for its shape")]
    Malformed(#[source] serde_json::Error),
}

impl Refusal {
    /// The `reason` label of `warpline_worker_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature => "bad_signature",
            Refusal::Malformed(_) => "malformed",
        }
    }
}

/// Checks a delivery's signature (when `key` is set) and parses its StepSpec. The signature is
/// checked first, so an unsigned body is never parsed.
pub fn accept(
    body: &[u8],
    properties: &BasicProperties,
    key: Option<&[u8]>,
) -> Result<StepSpec, Refusal> {
    if let Some(key) = key {
        let signature = amqp::header_str(properties, SIGNATURE_HEADER).ok_or(Refusal::Unsigned)?;
        if !verify_signature(key, body, &signature) {
            return Err(Refusal::BadSignature);
        }
    }
    serde_json::from_slice(body).map_err(Refusal::Malformed)
}

/// Runs the worker until `shutdown` is cancelled: connects (and reconnects), consumes, runs
/// steps, heartbeats, and drains on the way out. Returns once the connection is closed.
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let worker = Arc::new(Worker {
        slots: Arc::new(Semaphore::new(usize::from(cfg.slots))),
        running: Mutex::new(BTreeMap::new()),
        cfg,
    });
    crate::metrics::get().slots.set(i64::from(worker.cfg.slots));
    tracing::info!(
        worker_id = worker.cfg.worker_id(),
        pool = %worker.cfg.pool,
        slots = worker.cfg.slots,
        queue = %worker.cfg.topology.steps_queue(&worker.cfg.pool),
        allow = ?worker.cfg.exec.allowlist,
        signed = worker.cfg.signing_key.is_some(),
        "starting fleet worker"
    );
    // Between sessions that fail quickly (say, a declare the broker keeps refusing) the worker
    // waits longer each time; a session that lasted resets the wait.
    let mut delays = worker.cfg.backoff.delays();
    let mut session: u64 = 0;
    loop {
        let name = format!("warpline-worker {}", worker.cfg.worker_id());
        let conn = tokio::select! {
            conn = amqp::connect(&worker.cfg.amqp_url, &name, &worker.cfg.backoff) => conn?,
            () = shutdown.cancelled() => {
                tracing::info!("shutdown requested while not connected; exiting");
                return Ok(());
            }
        };
        session += 1;
        let started = Instant::now();
        let connected = &crate::metrics::get().connected;
        connected.set(1);
        let ended = worker.session(conn, session, &shutdown).await;
        connected.set(0);
        match ended {
            Ok(()) => return Ok(()),
            Err(e)
                if e.downcast_ref::<amqp::AmqpError>()
                    .is_some_and(|e| !e.is_retryable()) =>
            {
                return Err(e)
                    .context("the broker refused this worker's setup; reconnecting will not help");
            }
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    delays = worker.cfg.backoff.delays();
                }
                let delay = delays.next().unwrap_or(worker.cfg.backoff.max);
                tracing::warn!(
                    session,
                    error = format!("{e:#}"),
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "lost the RabbitMQ session; reconnecting"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// What every session of one worker shares.
struct Worker {
    cfg: WorkerConfig,
    /// One permit per slot. The consume loop takes a permit before taking a delivery and moves
    /// it into the step's task: this is the worker's only concurrency limit.
    slots: Arc<Semaphore>,
    /// The attempts running now, for heartbeats. Held only for an insert, a remove or a copy.
    running: Mutex<BTreeMap<Uuid, RunningAttempt>>,
}

/// What one session's step tasks share.
#[derive(Clone)]
struct SessionCtx {
    worker: Arc<Worker>,
    /// The confirm-mode channel outcomes, dead letters and heartbeats are published on.
    publish: Channel,
    /// Cancelled when the running steps must stop: the drain time is up, or the connection that
    /// delivered them is gone.
    steps_cancel: CancellationToken,
}

impl Worker {
    /// One connection's life. `Ok` after a clean shutdown; `Err` when the connection was lost
    /// (or could not be set up) and the caller should reconnect.
    async fn session(
        self: &Arc<Self>,
        conn: Connection,
        session: u64,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let publish = amqp::confirm_channel(&conn).await?;
        amqp::declare_topology(&publish, &cfg.topology, &[cfg.pool.as_str()]).await?;
        let consume = conn
            .create_channel()
            .await
            .context("cannot open the consume channel")?;
        consume
            .basic_qos(cfg.prefetch, BasicQosOptions::default())
            .await
            .context("cannot set the prefetch (basic.qos)")?;
        let queue = cfg.topology.steps_queue(&cfg.pool);
        let tag = format!("{}#{session}", cfg.worker_id());
        let mut consumer = consume
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot consume from `{queue}`"))?;
        tracing::info!(session, %queue, consumer_tag = %tag, "consuming");

        let ctx = SessionCtx {
            worker: Arc::clone(self),
            publish: publish.clone(),
            steps_cancel: CancellationToken::new(),
        };
        let tasks = TaskTracker::new();
        let heartbeats = CancellationToken::new();
        let heartbeat_task = tokio::spawn(heartbeat_loop(
            Arc::clone(self),
            publish.clone(),
            heartbeats.clone(),
        ));

        let ended = self
            .consume_loop(&consume, &mut consumer, &ctx, &tasks, shutdown)
            .await;

        match ended {
            LoopEnd::Shutdown => {
                // Heartbeats go on while draining: the coordinator must not declare the steps
                // still finishing lost.
                self.drain(&consume, &tag, &mut consumer, &ctx, &tasks)
                    .await;
                heartbeats.cancel();
                let _ = heartbeat_task.await;
                self.send_heartbeat(&publish, true).await;
                let _ = publish.close(200, "worker stopping".into()).await;
                let _ = consume.close(200, "worker stopping".into()).await;
                let _ = conn.close(200, "worker stopping".into()).await;
                tracing::info!("worker stopped");
                Ok(())
            }
            LoopEnd::Lost(reason) => {
                heartbeats.cancel();
                let _ = heartbeat_task.await;
                // The broker requeues whatever this connection had unacked; the steps still
                // running for it cannot ack, so stop them rather than race their redelivery.
                let in_flight = tasks.len();
                ctx.steps_cancel.cancel();
                tasks.close();
                let limit = cfg.exec.kill_grace + Duration::from_secs(10);
                if tokio::time::timeout(limit, tasks.wait()).await.is_err() {
                    tracing::error!(?limit, "steps of the lost session did not stop in time");
                }
                let _ = conn.close(200, "reconnecting".into()).await;
                Err(anyhow::anyhow!(reason)).with_context(|| {
                    format!("session {session} ended with {in_flight} step(s) in flight")
                })
            }
        }
    }

    /// Takes a slot, then a delivery, and spawns its step; until shutdown or a lost connection.
    async fn consume_loop(
        &self,
        consume: &Channel,
        consumer: &mut Consumer,
        ctx: &SessionCtx,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> LoopEnd {
        // While every slot is busy the consumer is not polled, so a dropped connection would go
        // unnoticed until a step ends; this tick looks at the channel meanwhile.
        let mut watch = tokio::time::interval(Duration::from_secs(1));
        loop {
            let permit = loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return LoopEnd::Shutdown,
                    permit = Arc::clone(&self.slots).acquire_owned() => {
                        break permit.expect("the slots semaphore is never closed");
                    }
                    _ = watch.tick() => {
                        if !consume.status().connected() {
                            return LoopEnd::Lost(
                                "the channel closed while every slot was busy".to_string(),
                            );
                        }
                    }
                }
            };
            let delivery = tokio::select! {
                biased;
                () = shutdown.cancelled() => return LoopEnd::Shutdown,
                next = consumer.next() => next,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    tasks.spawn(handle_delivery(delivery, ctx.clone(), permit));
                }
                Some(Err(e)) => return LoopEnd::Lost(format!("the consumer failed: {e}")),
                None => return LoopEnd::Lost("the broker cancelled the consumer".to_string()),
            }
        }
    }

    /// Stops consuming, requeues prefetched deliveries, and gives running steps `drain` to finish
    /// before cancelling (and requeueing) the rest.
    async fn drain(
        &self,
        consume: &Channel,
        tag: &str,
        consumer: &mut Consumer,
        ctx: &SessionCtx,
        tasks: &TaskTracker,
    ) {
        let drain = self.cfg.drain;
        tracing::info!(
            running = tasks.len(),
            drain_s = drain.as_secs_f64(),
            "stopping: no new steps; waiting for running ones"
        );
        if let Err(e) = consume
            .basic_cancel(tag.into(), BasicCancelOptions::default())
            .await
        {
            tracing::warn!(error = %e, "cannot cancel the consumer");
        }
        // Deliveries prefetched but never started go back to the queue for another worker.
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
        {
            tracing::info!(
                delivery_tag = delivery.delivery_tag,
                "requeueing a step not started"
            );
            let _ = delivery.nack(requeue()).await;
        }
        tasks.close();
        if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
            tracing::warn!(
                running = tasks.len(),
                "drain time is up: cancelling the remaining steps and requeueing them"
            );
            ctx.steps_cancel.cancel();
            let limit = self.cfg.exec.kill_grace + Duration::from_secs(10);
            if tokio::time::timeout(limit, tasks.wait()).await.is_err() {
                tracing::error!(?limit, "cancelled steps did not stop in time");
            }
        }
    }

    async fn send_heartbeat(&self, channel: &Channel, stopping: bool) {
        let cfg = &self.cfg;
        let running: Vec<RunningAttempt> = self
            .running
            .lock()
            .expect("running map poisoned")
            .values()
            .cloned()
            .collect();
        let mut beat = Heartbeat::new(
            cfg.worker_id().to_string(),
            cfg.pool.clone(),
            u32::from(cfg.slots),
            running,
            cfg.heartbeat.as_secs(),
        );
        beat.stopping = stopping;
        beat.allow = Some(advertise(&cfg.exec.allowlist, &cfg.exec.tools_dirs));
        let body = serde_json::to_vec(&beat).expect("a heartbeat serialises");
        let props = amqp::json_properties(
            &Uuid::now_v7().to_string(),
            amqp::signature_headers(cfg.signing_key.as_deref(), &body),
        );
        let exchange = cfg.topology.heartbeats_exchange();
        match amqp::publish_confirmed_unrouted_ok(channel, &exchange, "", &body, props).await {
            Ok(()) => tracing::debug!(stopping, "heartbeat sent"),
            Err(e) => tracing::warn!(error = %e, stopping, "cannot send heartbeat"),
        }
    }
}

/// Why a consume loop ended.
enum LoopEnd {
    /// The shutdown token was cancelled.
    Shutdown,
    /// The consumer stream failed or ended: the connection (or channel) is gone.
    Lost(String),
}

/// Publishes a heartbeat every interval (the first at once) until `stop` is cancelled.
async fn heartbeat_loop(worker: Arc<Worker>, channel: Channel, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(worker.cfg.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => worker.send_heartbeat(&channel, false).await,
        }
    }
}

/// Handles one delivery: refuse and dead-letter it, or run its step, publish the outcome with a
/// confirm and only then ack. `_permit` is this step's slot, released when the task ends.
#[tracing::instrument(
    name = "step_delivery",
    skip_all,
    fields(
        delivery_tag = delivery.delivery_tag,
        redelivered = delivery.redelivered,
        run_id = tracing::field::Empty,
        step = tracing::field::Empty,
        attempt = tracing::field::Empty,
        attempt_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    )
)]
async fn handle_delivery(delivery: Delivery, ctx: SessionCtx, permit: OwnedSemaphorePermit) {
    let worker = &ctx.worker;
    let cfg = &worker.cfg;
    let spec = match accept(
        &delivery.data,
        &delivery.properties,
        cfg.signing_key.as_deref(),
    ) {
        Ok(spec) => spec,
        Err(refusal) => {
            tracing::error!(reason = %refusal, "refusing the message: dead-lettering it");
            crate::metrics::get()
                .refused
                .with_label_values(&[refusal.label()])
                .inc();
            dead_letter(&ctx, &delivery, &refusal.to_string()).await;
            return;
        }
    };
    let span = tracing::Span::current();
    span.record("run_id", tracing::field::display(spec.run_id));
    span.record("step", spec.step_id.as_str());
    span.record("attempt", spec.attempt);
    span.record("attempt_id", tracing::field::display(spec.attempt_id));
    let process = process_span(&delivery, &spec, cfg);
    if let Some(id) = process.as_ref().and_then(trace::trace_id_of) {
        span.record("trace_id", id);
    }
    let metrics = crate::metrics::get();
    // A step this worker may not run (not allowed here, or its command does not resolve here)
    // is handed back through the results queue, like any outcome, so the coordinator can give
    // it to another worker; it is never failed here, and never requeued to the broker, where
    // it would count against the queue's delivery limit and end dead-lettered.
    let outcome = if let Some(reason) = unrunnable(&spec, &cfg.exec) {
        tracing::warn!(command = %spec.command, %reason, "this worker may not run the step: handing it back");
        metrics.requeued.with_label_values(&["not_runnable"]).inc();
        handed_back(&spec, &cfg.exec, reason)
    } else {
        tracing::info!(command = %spec.command, "running step");
        worker.running.lock().expect("running map poisoned").insert(
            spec.attempt_id,
            RunningAttempt {
                run_id: spec.run_id,
                attempt_id: spec.attempt_id,
                step_id: spec.step_id.clone(),
                started_at: Utc::now(),
            },
        );
        metrics.busy.inc();
        let outcome = run_step(&spec, &cfg.exec, &ctx.steps_cancel).await;
        metrics.busy.dec();
        worker
            .running
            .lock()
            .expect("running map poisoned")
            .remove(&spec.attempt_id);
        outcome
    };
    // The tool ended: its slot may start the next step (already here when the prefetch is
    // larger than the slots) while this outcome is published and confirmed.
    drop(permit);

    if let Some(p) = &process {
        trace::step_children(p, &outcome, SystemTime::now());
    }

    if ctx.steps_cancel.is_cancelled() && outcome.result.error.as_deref() == Some(CANCELLED_ERROR) {
        tracing::info!("step cancelled; requeueing its spec");
        if let Some(p) = &process {
            trace::end(
                p,
                trace::Status::error("cancelled; the spec was requeued"),
                Vec::new(),
            );
        }
        metrics.requeued.with_label_values(&["cancelled"]).inc();
        if let Err(e) = delivery.nack(requeue()).await {
            tracing::warn!(error = %e, "cannot requeue; the broker redelivers it when the channel closes");
        }
        return;
    }

    let body = serde_json::to_vec(&outcome).expect("a StepOutcome serialises");
    let results = cfg.topology.results_queue();
    let mut headers = amqp::signature_headers(cfg.signing_key.as_deref(), &body);
    let publish_span = process
        .as_ref()
        .and_then(|p| trace::publish_result(p, &outcome, "rabbitmq", &results, body.len()));
    if let Some(cx) = &publish_span {
        amqp::add_trace_headers(&mut headers, &trace::inject(cx));
    }
    let props = amqp::json_properties(&spec.attempt_id.to_string(), headers);
    let published = amqp::publish_confirmed(&ctx.publish, "", &results, &body, props).await;
    if let Some(cx) = &publish_span {
        let status = match &published {
            Ok(()) => trace::Status::Ok,
            Err(e) => trace::Status::error(e.to_string()),
        };
        trace::end(cx, status, Vec::new());
    }
    if let Some(p) = &process {
        trace::end_process(p, &outcome);
    }
    if published.is_ok() && !outcome.result.refused {
        metrics.finished(&outcome);
    }
    match published {
        Ok(()) => match delivery.ack(BasicAckOptions::default()).await {
            Ok(_) => tracing::info!(
                exit_code = outcome.result.exit_code,
                report = ?outcome.report.status,
                "outcome published; spec acked"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "outcome published but the ack failed; the spec will be redelivered and the duplicate ignored"
            ),
        },
        Err(e) => {
            tracing::error!(error = %e, "cannot publish the outcome; requeueing the spec instead of acking it");
            metrics
                .requeued
                .with_label_values(&["publish_failed"])
                .inc();
            let _ = delivery.nack(requeue()).await;
        }
    }
}

/// The `process steps` span of a delivery, continuing the coordinator's `publish steps` from
/// the message's headers (or, for a spec published by other means, from `StepSpec.trace`).
fn process_span(
    delivery: &Delivery,
    spec: &StepSpec,
    cfg: &WorkerConfig,
) -> Option<trace::Context> {
    if !trace::enabled() {
        return None;
    }
    let mut carrier = amqp::trace_headers(&delivery.properties, &trace::PROPAGATION_HEADERS);
    if carrier.is_empty() {
        carrier = spec.trace.clone();
    }
    let queue = cfg.topology.steps_queue(&cfg.pool);
    let from = trace::Delivery {
        system: "rabbitmq",
        exchange: delivery.exchange.as_str(),
        routing_key: delivery.routing_key.as_str(),
        queue: &queue,
        delivery_tag: Some(delivery.delivery_tag),
        body_size: delivery.data.len(),
        worker_id: cfg.worker_id(),
    };
    trace::process_step(&trace::extract(&carrier), spec, &from)
}

/// Sends a refused message to the dead-letter exchange with the reason in
/// [`DEAD_REASON_HEADER`], then acks it. Should that publish fail, the message is rejected
/// without requeue, so the queue's own dead-lettering still takes it there (without the reason).
async fn dead_letter(ctx: &SessionCtx, delivery: &Delivery, reason: &str) {
    let cfg = &ctx.worker.cfg;
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(DEAD_REASON_HEADER.into(), amqp::long_string(reason));
    headers.insert(
        "x-warpline-dead-worker".into(),
        amqp::long_string(cfg.worker_id()),
    );
    let mut props = delivery.properties.clone().with_headers(headers);
    if props.delivery_mode().is_none() {
        props = props.with_delivery_mode(amqp::PERSISTENT);
    }
    let queue = cfg.topology.steps_queue(&cfg.pool);
    let dead = cfg.topology.dead_exchange();
    let published =
        amqp::publish_confirmed(&ctx.publish, &dead, &queue, &delivery.data, props).await;
    let settled = match published {
        Ok(()) => delivery.ack(BasicAckOptions::default()).await,
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish the dead letter; rejecting it instead");
            delivery.reject(BasicRejectOptions { requeue: false }).await
        }
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "cannot settle the refused message; it will be redelivered");
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        multiple: false,
        requeue: true,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use warpline_shared::fleet::sign;

    use super::*;

    fn spec_json() -> Vec<u8> {
        let spec = StepSpec {
            schema_version: 1,
            run_id: Uuid::now_v7(),
            step_id: "EXTRACT".into(),
            attempt: 1,
            attempt_id: Uuid::now_v7(),
            command: "sh".into(),
            args: vec!["-c".into(), "true".into()],
            env: BTreeMap::new(),
            cwd: "/w/run".into(),
            timeout_s: 5,
            artefacts: BTreeMap::new(),
            validations: Vec::new(),
            log_dir: "/w/logs".into(),
            workdir: "/w".into(),
            input_roots: Vec::new(),
            pool: "default".into(),
            trace: BTreeMap::new(),
            deferred: Vec::new(),
            dynamic_artefacts: BTreeMap::new(),
            files: BTreeMap::new(),
            failures: Default::default(),
        };
        serde_json::to_vec(&spec).unwrap()
    }

    fn signed(sig: &str) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(SIGNATURE_HEADER.into(), amqp::long_string(sig));
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn without_a_key_any_valid_spec_is_accepted() {
        let body = spec_json();
        assert!(accept(&body, &BasicProperties::default(), None).is_ok());
        assert!(matches!(
            accept(b"{", &BasicProperties::default(), None),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn with_a_key_only_correctly_signed_specs_are_accepted() {
        let body = spec_json();
        let key = b"k".as_slice();
        assert!(matches!(
            accept(&body, &BasicProperties::default(), Some(key)),
            Err(Refusal::Unsigned)
        ));
        assert!(matches!(
            accept(&body, &signed(&sign(b"other", &body)), Some(key)),
            Err(Refusal::BadSignature)
        ));
        assert!(accept(&body, &signed(&sign(key, &body)), Some(key)).is_ok());
        // The signature is checked before the body is parsed.
        assert!(matches!(
            accept(b"{", &BasicProperties::default(), Some(key)),
            Err(Refusal::Unsigned)
        ));
    }
}
