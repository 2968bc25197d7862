//! `export_to_parquet`: the PUBLISH step. Writes one month of a loaded dataset as Parquet plus a
//! metadata JSON. See `warpline_datawarp::export`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use warpline_datawarp::db::DbConfig;
use warpline_datawarp::error::finish;
use warpline_datawarp::export::{self, ExportArgs};

/// Export one month of `<schema>.<dataset>` to a Parquet file and a metadata JSON.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Environment: DATAWARP_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/datawarp), \
                  DATAWARP_SCHEMA (default staging).\n\
                  Exit codes: 0 ok, 75 transient (ConnectionError), 1 permanent (CRITICAL), 2 usage."
)]
struct Args {
    /// The manifest naming the dataset and month.
    #[arg(long)]
    manifest: PathBuf,
    /// Where to write the Parquet file.
    #[arg(long)]
    out: PathBuf,
    /// Where to write the metadata JSON.
    #[arg(long)]
    metadata_out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let args = ExportArgs {
        manifest: args.manifest,
        out: args.out,
        metadata_out: args.metadata_out,
    };
    finish(export::run(&args, &DbConfig::from_env()).map(|summary| println!("{summary}")))
}
