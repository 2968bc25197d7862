//! Local mode's transport: N in-process workers fed over a channel.
//!
//! The workers are tokio tasks running the same executor and validators as a fleet worker.
//! StepSpecs go out over a bounded channel whose capacity covers every run's one outstanding
//! attempt, so [`LocalFleet::dispatch`](crate::engine::Transport::dispatch) never waits; outcomes
//! come back as [`Event::Outcome`] on the engine's own channel.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use warpline_executor::{ExecConfig, run_step};
use warpline_shared::contracts::StepSpec;

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
                        let outcome = run_step(&spec, &cfg, &cancel).await;
                        if events
                            .send(Event::Outcome(Box::new(outcome), None))
                            .is_err()
                        {
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
    fn dispatch(&mut self, spec: StepSpec) -> anyhow::Result<()> {
        self.tx
            .try_send(spec)
            .map_err(|e| anyhow!("local work queue refused a step ({e}): it is sized for every run's outstanding attempt, so this is a bug"))
    }
}
