//! Warpline's stateless worker: it runs one step's tool, checks the outcome and reports it.
//!
//! [`consumer`] is fleet mode: a RabbitMQ consumer that runs StepSpecs from its pool's queue
//! through the step executor (crate `warpline-executor`, which local mode uses too) and
//! publishes their outcomes, standing on the fleet plumbing of crate `warpline-amqp` (connect
//! with backoff, declare the topology, publish with confirms, the shutdown tree) that the
//! coordinator uses as well. [`cli`] is the `warpline-worker` command line. The worker keeps no
//! durable state: everything it knows arrives in a `StepSpec` and leaves in a `StepOutcome`.

pub mod cli;
pub mod consumer;
pub mod metrics;
