//! `url_to_manifest`: the EXTRACT step. Fetches one month's source CSV, saves it, and drafts its
//! manifest. See `warpline_datawarp::extract`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use warpline_datawarp::error::finish;
use warpline_datawarp::extract::{self, ExtractArgs};

/// Fetch one month's source CSV and draft its YAML manifest.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Exit codes: 0 ok, 75 transient (ConnectionError), 1 permanent (CRITICAL), 2 usage."
)]
struct Args {
    /// Source URL: http://, https:// or file:///absolute/path.
    #[arg(long)]
    url: String,
    /// Dataset name (lowercase letters, digits, `_`).
    #[arg(long)]
    dataset: String,
    /// Month of the source, YYYY-MM.
    #[arg(long)]
    month: String,
    /// Where to save the raw bytes.
    #[arg(long)]
    raw_out: PathBuf,
    /// Where to write the draft manifest (YAML).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let args = ExtractArgs {
        url: args.url,
        dataset: args.dataset,
        month: args.month,
        raw_out: args.raw_out,
        out: args.out,
    };
    finish(extract::run(&args).map(|summary| println!("{summary}")))
}
