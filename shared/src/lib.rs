//! Warpline's shared core: the wire contracts, the pipeline config, partitions and templating,
//! the deterministic validators, the state machine with its guard, and the audit record format.
//!
//! This crate is pure. It reads files only to check a step's artefacts and logs; it opens no
//! socket and starts no runtime, so the coordinator, the worker and the tests all agree on one
//! definition of every fact and every legal move.
#![warn(missing_docs)]

pub mod audit;
pub mod classify;
pub mod config;
pub mod contracts;
pub mod fleet;
pub mod machine;
pub mod partition;
pub mod paths;
pub mod schema;
pub mod stage;
pub mod template;
pub mod validate;
