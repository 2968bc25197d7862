//! End-to-end tests of the worker: the executor against real processes (`sh`, `head`, `sleep`)
//! and the `warpline-worker` binary. One test binary, one module per area.

mod cli;
mod executor;
mod support;
