//! The DataWarp reference tools: the four command-line programs of Warpline's reference pipeline
//! (EXTRACT → ENRICH → INGEST → PUBLISH) and the generator of their sample data.
//!
//! Each binary under `src/bin/` is a thin `main`: it parses flags with clap, calls the `run`
//! function of one module here, and turns the outcome into the exit-code convention the
//! supervisor relies on (see [`error`]): 0 success, 75 transient (`ConnectionError: ` on stderr),
//! 1 permanent (`CRITICAL: ` on stderr). Warnings go to stderr as lines starting `WARNING: `.

pub mod atomic;
pub mod csvscan;
pub mod db;
pub mod enrich;
pub mod error;
pub mod export;
pub mod extract;
pub mod generate;
pub mod load;
pub mod manifest;
pub mod profile;
