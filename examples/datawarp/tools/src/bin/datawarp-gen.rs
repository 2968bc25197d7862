//! `datawarp-gen`: writes the deterministic sample data of the DataWarp pipeline.
//! See `warpline_datawarp::generate`.
//!
//! Run from the repository root: `cargo run -p warpline-datawarp --bin datawarp-gen`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use warpline_datawarp::error::finish;
use warpline_datawarp::generate::{self, DEFAULT_FROM, DEFAULT_ROWS, DEFAULT_TO, GenerateArgs};

/// Generate monthly NHS-England-style statistics as `<out-dir>/<dataset>/<YYYY-MM>.csv`.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Root directory of the generated files.
    #[arg(long, default_value = "examples/datawarp/data")]
    out_dir: PathBuf,
    /// Inclusive month range, FROM..TO.
    #[arg(long, default_value_t = format!("{DEFAULT_FROM}..{DEFAULT_TO}"))]
    months: String,
    /// Data rows per file.
    #[arg(long, default_value_t = DEFAULT_ROWS)]
    rows: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = generate::parse_months(&args.months).and_then(|months| {
        generate::run(&GenerateArgs {
            out_dir: args.out_dir,
            months,
            rows: args.rows,
        })
        .map(|summary| println!("{summary}"))
    });
    finish(result)
}
