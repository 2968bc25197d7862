//! Fleet mode: the coordinator's PostgreSQL store ([`pg`]).

pub mod pg;
