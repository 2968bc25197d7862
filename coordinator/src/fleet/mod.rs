//! Fleet mode: the coordinator's PostgreSQL store ([`pg`]), its RabbitMQ transport
//! ([`amqp`]) and the overhead per step it measures ([`metrics`]).

pub mod amqp;
pub mod metrics;
pub mod pg;
