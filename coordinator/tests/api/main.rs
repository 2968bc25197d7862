//! The coordinator's HTTP API and the operator commands, against the real engine running
//! in-process with local workers (no broker, no database). One test binary, one module per
//! area: [`http`] drives the routes with an HTTP client, [`cli`] runs the `warpline` binary.

mod cli;
mod http;
mod support;
