//! Warpline's coordinator: it holds every run's state machine, asks a supervisor agent after
//! every step, writes the audit log, and drives workers through a transport.
//!
//! - [`engine`]: the event loop over a closed [`engine::Event`] enum, and the small
//!   [`engine::Transport`], [`engine::Store`] and [`engine::Observer`] traits that let local
//!   mode and fleet mode share it.
//! - [`supervisor`]: the agents (`rules`, `always-proceed`, LLMs over HTTP) and the policy
//!   layer around them (fast path, budget, fallback, shadow).
//! - [`audit_log`]: the append-only, hash-chained JSONL writer.
//! - [`local`]: in-process workers over channels (`warpline run`).
//! - [`resume`]: a local backfill rebuilt from its audit log (`run --resume`), and what earlier
//!   backfills did to each partition (`--reprocess`).
//! - [`reprocess`]: reprocess modes (`missing`, `failed`, `all`): which partitions a new
//!   backfill runs, given earlier ones.
//! - [`progress`]: progress bars and line logs, fed by committed audit records.
//! - [`spans`]: the coordinator's OpenTelemetry spans of a run's trace (publish, results,
//!   decisions, the run's root).
//! - [`api`]: the HTTP API over the event loop (fleet mode), used by the operator commands.
//! - [`auth`]: bearer tokens and roles (viewer, operator) for the API and the dashboard.
//! - [`ui`]: the web dashboard (server-rendered pages over the same event loop).
//! - [`fleet`]: fleet mode's PostgreSQL store, RabbitMQ transport and per-step latency metrics.
//! - [`cli`]: the `warpline` command line.

pub mod api;
pub mod audit_log;
pub mod auth;
pub mod cli;
pub mod engine;
pub mod fleet;
pub mod gates;
pub mod local;
pub mod progress;
pub mod reprocess;
pub mod resume;
pub mod spans;
pub mod supervisor;
pub mod ui;
