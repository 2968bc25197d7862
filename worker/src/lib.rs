//! Warpline's stateless worker: it runs one step's tool, checks the outcome and reports it.
//!
//! [`executor`] is the Pipeline Step Executor, shared by local mode (in-process workers) and
//! fleet mode; [`allow`] decides what it may run and how a command is found, and [`deferred`]
//! resolves what only a worker can (secrets, dynamic artefacts). [`consumer`] is fleet mode: a RabbitMQ consumer that runs StepSpecs from its
//! pool's queue and publishes their outcomes, and [`amqp`] the broker plumbing it stands on
//! (connect with backoff, declare the topology, publish with confirms), which the coordinator
//! reuses. [`cli`] is the `warpline-worker` command line, and [`shutdown`] turns SIGINT and
//! SIGTERM into the cancellation every long-running part obeys. The worker keeps no durable
//! state: everything it knows arrives in a `StepSpec` and leaves in a `StepOutcome`.

pub mod allow;
pub mod amqp;
pub mod cli;
pub mod consumer;
pub mod deferred;
pub mod executor;
pub mod shutdown;

pub use executor::{ExecConfig, run_step};
