//! Fleet mode's transport: StepSpecs out to RabbitMQ, results and heartbeats in.
//!
//! - The [`AmqpTransport`] hands each StepSpec to a publisher task, which publishes batches
//!   with publisher confirms and then marks their outbox rows sent (in the background, without
//!   waiting for the WAL flush). The engine has already committed them to the outbox, so a
//!   crash before the confirm or the mark only means they are published again at the next
//!   start (a duplicate attempt is ignored as stale).
//! - The results consumer turns each message into [`Event::Outcome`] with an acknowledgement
//!   that the engine runs only after the turn that applied the result is durable. A malformed
//!   or wrongly signed message is copied to the dead-letter exchange with the reason and acked:
//!   it never stops the coordinator.
//! - The heartbeat consumer feeds [`Event::Heartbeat`] from an exclusive queue on the fanout.
//! - When tracing is on, each StepSpec's `publish steps` span (ended at its confirm) puts its
//!   W3C context in the message headers, and each result opens a `process results` span from
//!   the worker's context in its headers, ended by its ack ([`crate::spans`]).
//! - All three note what [`StepLatency`] measures: a result taken off the queue, its run's next
//!   StepSpec handed to the publisher, and that StepSpec confirmed.
//!
//! Every task ends when the connection fails; the caller sees it on [`FleetLink::failed`] and
//! starts a new session (state is in PostgreSQL).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warpline_amqp as amqp;
use warpline_shared::contracts::{StepOutcome, StepSpec};
use warpline_shared::fleet::{
    DEAD_REASON_HEADER, Heartbeat, SIGNATURE_HEADER, Topology, verify_signature,
};
use warpline_telemetry::trace;

use crate::engine::{Event, Transport};
use crate::fleet::metrics::StepLatency;
use crate::fleet::pg;

/// Most StepSpecs published before awaiting their confirms together.
pub const PUBLISH_BATCH: usize = 256;
/// Results prefetched by the coordinator.
pub const RESULTS_PREFETCH: u16 = 512;

/// Hands StepSpecs to the publisher task. Unbounded, yet bounded in practice: each run has at
/// most one attempt outstanding, so the queue never holds more specs than runs in progress.
pub struct AmqpTransport {
    tx: mpsc::UnboundedSender<StepSpec>,
    latency: Arc<StepLatency>,
}

impl Transport for AmqpTransport {
    fn dispatch(&mut self, spec: StepSpec) -> anyhow::Result<()> {
        self.latency.dispatched(spec.run_id);
        self.tx
            .send(spec)
            .map_err(|_| anyhow::anyhow!("the RabbitMQ publisher has stopped"))
    }
}

/// The tasks of one connection.
pub struct FleetLink {
    /// Cancelled when any task fails (the connection is gone) or on [`FleetLink::close`].
    pub failed: CancellationToken,
    conn: Connection,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FleetLink {
    /// Stops the tasks and closes the connection.
    pub async fn close(self) {
        self.failed.cancel();
        for t in self.tasks {
            t.abort();
        }
        // A connection the broker already dropped may never answer the close: bound it.
        let close = self.conn.close(200, "coordinator stopping".into());
        if tokio::time::timeout(Duration::from_secs(5), close)
            .await
            .is_err()
        {
            tracing::warn!("the broker did not answer the connection close within 5 s");
        }
    }
}

/// What the link needs.
pub struct LinkConfig {
    /// The broker.
    pub url: String,
    /// Queue names.
    pub topology: Topology,
    /// Pools whose queues to declare.
    pub pools: Vec<String>,
    /// HMAC key for StepSpecs out and results in.
    pub signing_key: Option<Vec<u8>>,
    /// Where the overhead per step is recorded (it outlives the connection).
    pub latency: Arc<StepLatency>,
}

/// Connects, declares the topology and starts the publisher and both consumers.
pub async fn connect(
    cfg: &LinkConfig,
    db: Pool,
    events: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<(AmqpTransport, FleetLink)> {
    let conn = amqp::connect(&cfg.url, "warpline-coordinator", &amqp::Backoff::default()).await?;
    let publish = amqp::confirm_channel(&conn).await?;
    let pools: Vec<&str> = cfg.pools.iter().map(String::as_str).collect();
    amqp::declare_topology(&publish, &cfg.topology, &pools).await?;
    let failed = CancellationToken::new();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(guard(
        failed.clone(),
        "publisher",
        publisher(
            publish,
            cfg.topology.clone(),
            cfg.signing_key.clone(),
            db,
            rx,
            cfg.latency.clone(),
        ),
    )));
    let results = conn
        .create_channel()
        .await
        .context("cannot open the results channel")?;
    let dead = amqp::confirm_channel(&conn).await?;
    tasks.push(tokio::spawn(guard(
        failed.clone(),
        "results consumer",
        results_consumer(
            results,
            dead,
            cfg.topology.clone(),
            cfg.signing_key.clone(),
            events.clone(),
            cfg.latency.clone(),
        ),
    )));
    let beats = conn
        .create_channel()
        .await
        .context("cannot open the heartbeat channel")?;
    tasks.push(tokio::spawn(guard(
        failed.clone(),
        "heartbeat consumer",
        heartbeat_consumer(beats, cfg.topology.clone(), cfg.signing_key.clone(), events),
    )));
    Ok((
        AmqpTransport {
            tx,
            latency: cfg.latency.clone(),
        },
        FleetLink {
            failed,
            conn,
            tasks,
        },
    ))
}

/// Runs a task; its end, whatever the cause, fails the link.
async fn guard(
    failed: CancellationToken,
    name: &'static str,
    task: impl Future<Output = anyhow::Result<()>>,
) {
    tokio::select! {
        () = failed.cancelled() => {}
        r = task => {
            match r {
                Ok(()) => tracing::warn!(task = name, "AMQP task ended"),
                Err(e) => tracing::error!(task = name, error = %format!("{e:#}"), "AMQP task failed"),
            }
            failed.cancel();
        }
    }
}

async fn publisher(
    channel: Channel,
    topology: Topology,
    key: Option<Vec<u8>>,
    db: Pool,
    mut rx: mpsc::UnboundedReceiver<StepSpec>,
    latency: Arc<StepLatency>,
) -> anyhow::Result<()> {
    let exchange = topology.steps_exchange();
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    let mut declared: std::collections::HashSet<String> = std::collections::HashSet::new();
    while rx.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let mut confirms = Vec::with_capacity(batch.len());
        for spec in &batch {
            if !declared.contains(&spec.pool) {
                // A pool seen for the first time gets its queue before its first spec.
                amqp::declare_topology(&channel, &topology, &[spec.pool.as_str()]).await?;
                declared.insert(spec.pool.clone());
            }
            let body = serde_json::to_vec(spec).expect("StepSpecs serialise");
            let mut headers = amqp::signature_headers(key.as_deref(), &body);
            let span = crate::spans::publish(spec, "rabbitmq", &exchange, &spec.pool, body.len());
            if let Some(cx) = &span {
                amqp::add_trace_headers(&mut headers, &trace::inject(cx));
            }
            let props = amqp::json_properties(&spec.attempt_id.to_string(), headers);
            let confirm = channel
                .basic_publish(
                    exchange.as_str().into(),
                    spec.pool.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    props,
                )
                .await
                .with_context(|| format!("cannot publish a StepSpec to `{exchange}`"))?;
            confirms.push((
                spec.run_id,
                spec.attempt_id,
                spec.pool.clone(),
                confirm,
                span,
            ));
        }
        let mut sent: Vec<Uuid> = Vec::with_capacity(confirms.len());
        for (run_id, attempt_id, pool, confirm, span) in confirms {
            let confirmation = confirm.await.context("lost a publisher confirm")?;
            if let Some(cx) = &span {
                let status = match &confirmation {
                    Confirmation::Ack(None) => trace::Status::Ok,
                    Confirmation::Ack(Some(_)) => trace::Status::error("unroutable"),
                    _ => trace::Status::error("refused by the broker"),
                };
                trace::end(cx, status, Vec::new());
            }
            match confirmation {
                Confirmation::Ack(None) => {
                    latency.confirmed(run_id);
                    sent.push(attempt_id);
                }
                Confirmation::Ack(Some(_)) => {
                    // No queue for the pool: the spec stays unsent and the deadline will
                    // declare the attempt lost, so the run is not stuck silently.
                    tracing::error!(%attempt_id, pool, "no queue is bound for this pool; start a worker with `--pool {pool}`");
                }
                Confirmation::Nack(_) => anyhow::bail!("the broker refused a StepSpec (nack)"),
                Confirmation::NotRequested => {
                    anyhow::bail!("the publish channel is not in confirm mode")
                }
            }
        }
        // Marked beside the next batch rather than before it: the mark is bookkeeping for a
        // restart (an unmarked row is published again and its duplicate ignored as stale), so
        // the next StepSpecs need not wait for it.
        let db = db.clone();
        tokio::spawn(async move {
            if let Err(e) = pg::mark_sent(&db, &sent).await {
                tracing::warn!(error = %format!("{e:#}"), rows = sent.len(), "cannot mark outbox rows sent; they will be published again at the next start");
            }
        });
        batch.clear();
    }
    Ok(())
}

/// Why a result message cannot be used.
fn check_result(
    data: &[u8],
    signature: Option<String>,
    key: Option<&[u8]>,
) -> Result<StepOutcome, String> {
    if let Some(key) = key {
        match signature {
            None => {
                return Err(format!(
                    "unsigned result (a `{SIGNATURE_HEADER}` header is required)"
                ));
            }
            Some(sig) if !verify_signature(key, data, &sig) => {
                return Err("forged result: the signature does not match".into());
            }
            Some(_) => {}
        }
    }
    let outcome: StepOutcome =
        serde_json::from_slice(data).map_err(|e| format!("malformed result: {e}"))?;
    if outcome.result.run_id.is_none() || outcome.result.attempt_id.is_none() {
        return Err("malformed result: it names no run_id or attempt_id".into());
    }
    Ok(outcome)
}

async fn results_consumer(
    channel: Channel,
    dead: Channel,
    topology: Topology,
    key: Option<Vec<u8>>,
    events: mpsc::UnboundedSender<Event>,
    latency: Arc<StepLatency>,
) -> anyhow::Result<()> {
    channel
        .basic_qos(RESULTS_PREFETCH, BasicQosOptions::default())
        .await
        .context("cannot set the results prefetch")?;
    let queue = topology.results_queue();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "warpline-coordinator".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot consume `{queue}`"))?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.context("the results consumer failed")?;
        let signature = amqp::header_str(&delivery.properties, SIGNATURE_HEADER);
        match check_result(&delivery.data, signature, key.as_deref()) {
            Ok(outcome) => {
                if let Some(run_id) = outcome.result.run_id {
                    latency.result_received(run_id);
                }
                let span = if trace::enabled() {
                    let carrier =
                        amqp::trace_headers(&delivery.properties, &trace::PROPAGATION_HEADERS);
                    crate::spans::process_result(
                        &carrier,
                        &outcome,
                        "rabbitmq",
                        &queue,
                        delivery.data.len(),
                    )
                } else {
                    None
                };
                let acker = delivery.acker.clone();
                let ack: crate::engine::Ack = Box::new(move || {
                    tokio::spawn(async move {
                        if let Err(e) = acker.ack(BasicAckOptions::default()).await {
                            tracing::warn!(error = %e, "cannot ack a result; it will be redelivered and ignored as stale");
                        }
                    });
                });
                let ack = crate::spans::ending_on_ack(span, ack);
                if events
                    .send(Event::Outcome(Box::new(outcome), Some(ack)))
                    .is_err()
                {
                    return Ok(());
                }
            }
            Err(reason) => {
                tracing::warn!(%reason, "dead-lettering a result");
                let mut headers = delivery.properties.headers().clone().unwrap_or_default();
                headers.insert(DEAD_REASON_HEADER.into(), amqp::long_string(&reason));
                let props = delivery.properties.clone().with_headers(headers);
                amqp::publish_confirmed(
                    &dead,
                    &topology.dead_exchange(),
                    "",
                    &delivery.data,
                    props,
                )
                .await
                .context("cannot dead-letter a result")?;
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .context("cannot ack a dead-lettered result")?;
            }
        }
    }
    anyhow::bail!("the broker cancelled the results consumer")
}

/// Why a heartbeat is ignored: its worker (when it says) and the reason.
fn check_heartbeat(
    data: &[u8],
    signature: Option<String>,
    key: Option<&[u8]>,
) -> Result<Heartbeat, (Option<String>, String)> {
    let parsed = serde_json::from_slice::<Heartbeat>(data);
    let worker = parsed.as_ref().ok().map(|h| h.worker_id.clone());
    if let Some(key) = key {
        match signature {
            None => {
                return Err((
                    worker,
                    format!(
                        "unsigned heartbeat while this coordinator requires signatures (a `{SIGNATURE_HEADER}` header); give the worker the same WARPLINE_SIGNING_KEY"
                    ),
                ));
            }
            Some(sig) if !verify_signature(key, data, &sig) => {
                return Err((
                    worker,
                    "forged heartbeat: the signature does not match".into(),
                ));
            }
            Some(_) => {}
        }
    }
    parsed.map_err(|e| (None, format!("malformed heartbeat: {e}")))
}

/// Heartbeats of distinct workers refused and said so; later ones of the same worker are
/// ignored quietly (at debug level). Bounded so that made-up worker ids cannot grow it.
const MAX_TOLD: usize = 1024;

async fn heartbeat_consumer(
    channel: Channel,
    topology: Topology,
    key: Option<Vec<u8>>,
    events: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let mut told = std::collections::HashSet::new();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("cannot declare the heartbeat queue")?;
    let name = queue.name().as_str().to_string();
    channel
        .queue_bind(
            name.as_str().into(),
            topology.heartbeats_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("cannot bind the heartbeat queue")?;
    let mut consumer = channel
        .basic_consume(
            name.as_str().into(),
            "warpline-coordinator-heartbeats".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("cannot consume heartbeats")?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.context("the heartbeat consumer failed")?;
        let signature = amqp::header_str(&delivery.properties, SIGNATURE_HEADER);
        match check_heartbeat(&delivery.data, signature, key.as_deref()) {
            Ok(hb) => {
                if events.send(Event::Heartbeat(Box::new(hb))).is_err() {
                    return Ok(());
                }
            }
            Err((worker, reason)) => {
                let who = worker.unwrap_or_else(|| "?".into());
                if told.len() < MAX_TOLD && told.insert(who.clone()) {
                    // First sight of this worker: say it where an operator looks.
                    tracing::warn!(worker_id = %who, %reason, "ignoring heartbeats");
                    eprintln!("warpline serve: ignoring heartbeats of worker `{who}`: {reason}");
                } else {
                    tracing::debug!(worker_id = %who, %reason, "ignoring a heartbeat");
                }
            }
        }
    }
    anyhow::bail!("the broker cancelled the heartbeat consumer")
}

/// Sends [`Event::Tick`] every second until `stop`.
pub fn ticker(
    events: mpsc::UnboundedSender<Event>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {
                    if events.send(Event::Tick).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_checked_before_use() {
        assert!(
            check_result(b"not json", None, None)
                .unwrap_err()
                .starts_with("malformed")
        );
        let seed = br#"{"result": {"step_id": "A", "exit_code": 0, "artefacts": {}}, "report": {"status": "pass", "checks": []}}"#;
        assert!(
            check_result(seed, None, None)
                .unwrap_err()
                .contains("names no run_id")
        );
        let body = format!(
            r#"{{"result": {{"step_id": "A", "exit_code": 0, "artefacts": {{}}, "run_id": "{}", "attempt_id": "{}"}}, "report": {{"status": "pass", "checks": []}}}}"#,
            Uuid::now_v7(),
            Uuid::now_v7()
        );
        assert!(check_result(body.as_bytes(), None, None).is_ok());
        let key = b"k";
        assert!(
            check_result(body.as_bytes(), None, Some(key))
                .unwrap_err()
                .starts_with("unsigned")
        );
        let bad = warpline_shared::fleet::sign(b"other", body.as_bytes());
        assert!(
            check_result(body.as_bytes(), Some(bad), Some(key))
                .unwrap_err()
                .starts_with("forged")
        );
        let good = warpline_shared::fleet::sign(key, body.as_bytes());
        assert!(check_result(body.as_bytes(), Some(good), Some(key)).is_ok());
    }

    #[test]
    fn heartbeats_are_verified_when_signing_is_on() {
        let hb = Heartbeat::new("w1".into(), "default".into(), 2, vec![], 5);
        let body = serde_json::to_vec(&hb).unwrap();
        assert!(check_heartbeat(&body, None, None).is_ok());
        let key = b"k";
        let (who, why) = check_heartbeat(&body, None, Some(key)).unwrap_err();
        assert_eq!(who.as_deref(), Some("w1"));
        assert!(why.starts_with("unsigned heartbeat"), "{why}");
        let bad = warpline_shared::fleet::sign(b"other", &body);
        let (_, why) = check_heartbeat(&body, Some(bad), Some(key)).unwrap_err();
        assert!(why.starts_with("forged"), "{why}");
        let good = warpline_shared::fleet::sign(key, &body);
        assert_eq!(check_heartbeat(&body, Some(good), Some(key)).unwrap(), hb);
        assert!(
            check_heartbeat(b"{}", None, None)
                .unwrap_err()
                .1
                .starts_with("malformed")
        );
    }
}
