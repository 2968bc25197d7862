//! `enrich_manifest`: the ENRICH step. Adds a dataset's reference metadata to a draft manifest.
//! See `warpline_datawarp::enrich`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use warpline_datawarp::enrich::{self, EnrichArgs};
use warpline_datawarp::error::finish;

/// Add semantic metadata from a per-dataset reference file to a draft manifest.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Exit codes: 0 ok, 1 permanent (CRITICAL), 2 usage."
)]
struct Args {
    /// The draft manifest written by url_to_manifest.
    #[arg(long)]
    draft: PathBuf,
    /// The dataset's reference YAML.
    #[arg(long)]
    reference: PathBuf,
    /// Where to write the enriched manifest (YAML).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let args = EnrichArgs {
        draft: args.draft,
        reference: args.reference,
        out: args.out,
    };
    finish(enrich::run(&args).map(|summary| println!("{summary}")))
}
