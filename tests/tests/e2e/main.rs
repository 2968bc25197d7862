//! End-to-end suites: real `warpline` processes, real tools, real PostgreSQL and RabbitMQ.
//!
//! Build the binaries first: `cargo build --workspace --bins && cargo test --workspace`.

mod agent;
mod auth;
mod backfill_steps;
mod dashboard;
mod deploy;
mod distribution;
mod failures;
mod faults;
mod fleet;
mod gates;
mod handback;
mod local;
mod observability;
mod resume;
mod toolchain;
mod traces;
