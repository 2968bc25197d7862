//! Fleet mode: the coordinator's PostgreSQL store ([`pg`]) and its RabbitMQ transport
//! ([`amqp`]).

pub mod amqp;
pub mod pg;
