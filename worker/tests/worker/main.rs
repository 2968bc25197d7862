//! End-to-end tests of the worker: the executor against real processes (`sh`, `head`, `sleep`),
//! the `warpline-worker` binary, and fleet mode against a real RabbitMQ. One test binary, one module per area.

mod amqp;
mod cli;
mod deferred;
mod executor;
mod support;
