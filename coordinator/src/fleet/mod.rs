//! Fleet mode: the coordinator's PostgreSQL store ([`pg`]), its RabbitMQ transport
//! ([`amqp`]), the overhead per step it measures ([`metrics`]) and what its workers can run
//! ([`capability`]: advertised allowlists, hand-backs, the submit check).

pub mod amqp;
pub mod capability;
pub mod metrics;
pub mod pg;
