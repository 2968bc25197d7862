//! Local mode's transport: N in-process workers fed over a channel.
//!
//! The workers are tokio tasks running the same executor and validators as a fleet worker.
//! StepSpecs go out over a bounded channel whose capacity covers every run's one outstanding
//! attempt, so [`LocalFleet::dispatch`](crate::engine::Transport::dispatch) never waits; outcomes
//! come back as [`Event::Outcome`] on the engine's own channel. When tracing is on, the same
//! spans as fleet mode's are emitted (`publish steps` with its context in `StepSpec.trace`,
//! `process steps` and its children, `publish results`, `process results`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use warpline_executor::{ExecConfig, run_step};
use warpline_shared::contracts::{StepOutcome, StepSpec};
use warpline_telemetry::trace;

use crate::engine::{Event, Transport};

/// In-process workers.
pub struct LocalFleet {
    tx: mpsc::Sender<StepSpec>,
    /// Cancels every running tool (their process groups are killed).
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl LocalFleet {
    /// Starts `workers` workers. `capacity` must be at least the number of attempts that can be
    /// outstanding at once (the engine's `max_parallel`).
    pub fn start(
        workers: usize,
        capacity: usize,
        exec: ExecConfig,
        events: mpsc::UnboundedSender<Event>,
    ) -> LocalFleet {
        let (tx, rx) = mpsc::channel::<StepSpec>(capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        for n in 0..workers.max(1) {
            let mut cfg = exec.clone();
            cfg.worker_id = format!("{}-{n}", exec.worker_id);
            let (rx, events, cancel) = (rx.clone(), events.clone(), cancel.clone());
            let span = tracing::info_span!("local_worker", worker = %cfg.worker_id);
            tracker.spawn(
                async move {
                    loop {
                        let spec = tokio::select! {
                            _ = cancel.cancelled() => break,
                            spec = async { rx.lock().await.recv().await } => spec,
                        };
                        let Some(spec) = spec else { break };
                        let process = trace_process(&spec, &cfg.worker_id);
                        let outcome = run_step(&spec, &cfg, &cancel).await;
                        let ack = trace_result(process, &outcome);
                        if events.send(Event::Outcome(Box::new(outcome), ack)).is_err() {
                            break;
                        }
                    }
                }
                .instrument(span),
            );
        }
        tracker.close();
        LocalFleet {
            tx,
            cancel,
            tracker,
        }
    }

    /// A handle that stops the workers.
    pub fn stopper(&self) -> LocalStopper {
        LocalStopper {
            cancel: self.cancel.clone(),
            tracker: self.tracker.clone(),
        }
    }
}

/// Stops a [`LocalFleet`]'s workers after the engine has given it up.
pub struct LocalStopper {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl LocalStopper {
    /// Kills running tools and waits (bounded) for the workers to exit.
    pub async fn stop(self, wait: Duration) -> bool {
        self.cancel.cancel();
        tokio::time::timeout(wait, self.tracker.wait())
            .await
            .is_ok()
    }
}

impl Transport for LocalFleet {
    fn dispatch(&mut self, mut spec: StepSpec) -> anyhow::Result<()> {
        // The same `publish steps` span as fleet mode's, its context in `StepSpec.trace`.
        let span = crate::spans::publish(&spec, LOCAL, LOCAL_QUEUE, &spec.pool, 0);
        if let Some(cx) = &span {
            spec.trace = trace::inject(cx);
        }
        let sent = self.tx.try_send(spec);
        if let Some(cx) = &span {
            trace::end(cx, trace::Status::Ok, Vec::new());
        }
        sent.map_err(|e| anyhow!("local work queue refused a step ({e}): it is sized for every run's outstanding attempt, so this is a bug"))
    }
}

/// `messaging.system` of local mode's spans: the channel between the loop and its workers.
const LOCAL: &str = "warpline.local";
/// The channel's name in those spans.
const LOCAL_QUEUE: &str = "local";

/// The local worker's `process steps` span, continuing `StepSpec.trace`.
fn trace_process(spec: &StepSpec, worker_id: &str) -> Option<trace::Context> {
    if !trace::enabled() {
        return None;
    }
    let parent = trace::extract(&spec.trace);
    let from = trace::Delivery {
        system: LOCAL,
        exchange: LOCAL_QUEUE,
        routing_key: &spec.pool,
        queue: LOCAL_QUEUE,
        delivery_tag: None,
        body_size: 0,
        worker_id,
    };
    trace::process_step(&parent, spec, &from)
}

/// After the step: its `run` and `validate` children, `publish results`, and the loop's
/// `process results`, which ends (as fleet mode's does) when the turn that applied the result
/// has committed.
fn trace_result(
    process: Option<trace::Context>,
    outcome: &StepOutcome,
) -> Option<crate::engine::Ack> {
    let process = process?;
    trace::step_children(&process, outcome, std::time::SystemTime::now());
    let publish = trace::publish_result(&process, outcome, LOCAL, LOCAL_QUEUE, 0);
    let span = publish.as_ref().and_then(|p| {
        crate::spans::process_result(&trace::inject(p), outcome, LOCAL, LOCAL_QUEUE, 0)
    });
    if let Some(p) = &publish {
        trace::end(p, trace::Status::Ok, Vec::new());
    }
    trace::end_process(&process, outcome);
    Some(crate::spans::ending_on_ack(span, Box::new(|| {})))
}
