//! `load-batch`: the INGEST step. Loads one month's complete rows into PostgreSQL, replacing any
//! earlier load of that month. See `warpline_datawarp::load`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use warpline_datawarp::db::DbConfig;
use warpline_datawarp::error::finish;
use warpline_datawarp::load::{self, LoadArgs};

/// Load one month of a dataset into `<schema>.<dataset>` (idempotent per month).
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Environment: DATAWARP_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/datawarp), \
                  DATAWARP_SCHEMA (default staging).\n\
                  Exit codes: 0 ok, 75 transient (ConnectionError), 1 permanent (CRITICAL), 2 usage."
)]
struct Args {
    /// The (draft or enriched) manifest of the month.
    #[arg(long)]
    manifest: PathBuf,
    /// The raw CSV the manifest describes.
    #[arg(long)]
    data: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let args = LoadArgs {
        manifest: args.manifest,
        data: args.data,
    };
    finish(load::run(&args, &DbConfig::from_env()).map(|summary| println!("{summary}")))
}
