//! End-to-end suites: real `warpline` processes, real tools, real PostgreSQL.
//!
//! Build the binaries first: `cargo build --workspace --bins && cargo test --workspace`.

mod agent;
mod local;
