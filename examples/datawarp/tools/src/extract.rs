//! EXTRACT: `url_to_manifest` fetches one month's source CSV, saves the raw bytes and drafts the
//! manifest from the rows it could read.
//!
//! `http://` and `https://` sources go through a blocking reqwest client with connect and total
//! timeouts; `file://` sources are read from the absolute path after the scheme. A truncated or
//! corrupt source is not a failure of this tool: it warns, profiles the complete rows and leaves
//! the verdict to the pipeline's validators (a source without data rows yields a manifest under
//! 1 KiB, which the `file_size_min` check rejects).

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::csvscan;
use crate::error::{Result, ResultExt, ToolError, warn};
use crate::manifest::{self, Manifest, Source};
use crate::profile::ColumnProfiler;

/// How long to wait for a TCP (and TLS) connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the whole request, body included, may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// What to extract and where to put it.
#[derive(Debug, Clone)]
pub struct ExtractArgs {
    /// Source URL (`http://`, `https://` or `file://`).
    pub url: String,
    /// Dataset name.
    pub dataset: String,
    /// Month, `YYYY-MM`.
    pub month: String,
    /// Where to save the raw bytes.
    pub raw_out: PathBuf,
    /// Where to write the draft manifest.
    pub out: PathBuf,
}

/// Runs the extraction and returns the summary line.
pub fn run(args: &ExtractArgs) -> Result<String> {
    manifest::validate_dataset(&args.dataset)?;
    manifest::validate_month(&args.month)?;
    let bytes = fetch(&args.url)?;
    crate::atomic::write(&args.raw_out, &bytes)?;
    let draft = draft_manifest(args, &bytes);
    for message in &draft.warnings {
        warn(message);
    }
    crate::atomic::write(&args.out, draft.to_yaml()?.as_bytes())?;
    Ok(format!(
        "Extracted {} rows x {} columns from {}",
        draft.row_count, draft.column_count, args.url
    ))
}

/// Builds the draft manifest of `bytes`, the raw source of `args`.
pub fn draft_manifest(args: &ExtractArgs, bytes: &[u8]) -> Manifest {
    let mut profilers: Vec<ColumnProfiler> = Vec::new();
    let scan = csvscan::scan(bytes, |row| {
        if profilers.is_empty() {
            // A complete row has one cell per header column; the profilers get their names from
            // the header once the scan returns it.
            profilers = (0..row.len())
                .map(|_| ColumnProfiler::new(String::new()))
                .collect();
        }
        for (profiler, cell) in profilers.iter_mut().zip(row.iter()) {
            profiler.observe(cell);
        }
    });
    if profilers.is_empty() {
        profilers = scan.header.iter().map(ColumnProfiler::new).collect();
    }
    let columns = profilers
        .into_iter()
        .zip(&scan.header)
        .map(|(profiler, name)| {
            let mut column = profiler.finish(scan.rows);
            column.name.clone_from(name);
            column
        })
        .collect::<Vec<_>>();
    Manifest {
        dataset: args.dataset.clone(),
        month: args.month.clone(),
        source: Source {
            url: args.url.clone(),
            raw_path: args.raw_out.display().to_string(),
            sha256: hex::encode(Sha256::digest(bytes)),
            bytes: bytes.len() as u64,
        },
        row_count: scan.rows,
        column_count: columns.len(),
        columns,
        warnings: scan.warnings,
        generated_at: manifest::now_rfc3339(),
        semantic: None,
        enriched_at: None,
    }
}

/// Fetches the body of `url`, classifying failures as transient or permanent.
pub fn fetch(url: &str) -> Result<Vec<u8>> {
    if let Some(path) = url.strip_prefix("file://") {
        return read_file_url(url, Path::new(path));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return fetch_http(url);
    }
    let scheme = url.split_once("://").map_or("none", |(scheme, _)| scheme);
    Err(ToolError::permanent(format!(
        "unsupported url scheme `{scheme}` in `{url}`; use http://, https:// or file:///absolute/path"
    )))
}

fn read_file_url(url: &str, path: &Path) -> Result<Vec<u8>> {
    if !path.is_absolute() {
        return Err(ToolError::permanent(format!(
            "file url `{url}` must name an absolute path, as in file:///data/x.csv"
        )));
    }
    std::fs::read(path).permanent(|| format!("cannot read source file `{}`", path.display()))
}

fn fetch_http(url: &str) -> Result<Vec<u8>> {
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("warpline-datawarp/", env!("CARGO_PKG_VERSION")))
        .build()
        .permanent(|| "cannot build the http client")?;
    let response = client.get(url).send().map_err(|e| classify_http(url, e))?;
    let status = response.status();
    if status.is_server_error() {
        return Err(ToolError::transient(format!(
            "http {status} from `{url}`; the server failed, try again later"
        )));
    }
    if !status.is_success() {
        return Err(ToolError::permanent(format!(
            "http {status} from `{url}`; check the url"
        )));
    }
    let body = response.bytes().map_err(|e| classify_http(url, e))?;
    Ok(body.to_vec())
}

fn classify_http(url: &str, error: reqwest::Error) -> ToolError {
    let error = anyhow::Error::new(error);
    let is_builder = error
        .downcast_ref::<reqwest::Error>()
        .is_some_and(reqwest::Error::is_builder);
    if is_builder {
        ToolError::Permanent(error.context(format!("invalid url `{url}`")))
    } else {
        // Connect failures, resets and timeouts: the network or the server may recover.
        ToolError::Transient(error.context(format!("cannot fetch `{url}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ExtractArgs {
        ExtractArgs {
            url: "file:///data/ae_attendances/2024-01.csv".into(),
            dataset: "ae_attendances".into(),
            month: "2024-01".into(),
            raw_out: "/data/runs/ae_attendances/2024-01/raw/ae_attendances-2024-01.csv".into(),
            out: "/data/runs/ae_attendances/2024-01/draft.yaml".into(),
        }
    }

    const HEADER: &str = "period,org_code,org_name,parent_org,department_type,attendances,within_4h,over_4h,emergency_admissions,pct_within_4h\n";

    #[test]
    fn a_header_only_source_gives_a_manifest_under_one_kib() {
        let manifest = draft_manifest(&args(), HEADER.as_bytes());
        let yaml = manifest.to_yaml().unwrap();
        assert_eq!(manifest.row_count, 0);
        assert_eq!(manifest.column_count, 10);
        assert!(yaml.len() < 1024, "{} bytes:\n{yaml}", yaml.len());
        assert!(
            manifest
                .warnings
                .iter()
                .any(|w| w.contains("no complete data rows"))
        );
    }

    #[test]
    fn an_empty_source_gives_a_tiny_manifest() {
        let manifest = draft_manifest(&args(), b"");
        assert_eq!((manifest.row_count, manifest.column_count), (0, 0));
        assert!(manifest.to_yaml().unwrap().len() < 1024);
    }

    #[test]
    fn a_truncated_last_row_is_dropped_with_a_warning() {
        let mut csv = HEADER.to_string();
        for n in 0..50 {
            csv.push_str(&format!(
                "2024-01-01,R{n:02},Trust {n} NHS Foundation Trust,North West,Type 1,{a},{b},{c},{d},{p:.2}\n",
                a = 1000 + n,
                b = 900 + n,
                c = 100,
                d = 250 + n,
                p = 90.0 + f64::from(n) / 10.0
            ));
        }
        csv.push_str("2024-01-01,R99,Trunc");
        let manifest = draft_manifest(&args(), csv.as_bytes());
        assert_eq!(manifest.row_count, 50);
        assert!(
            manifest
                .warnings
                .iter()
                .any(|w| w.contains("line 52 has 3 fields")),
            "{:?}",
            manifest.warnings
        );
        let kinds: Vec<String> = manifest
            .columns
            .iter()
            .map(|c| c.kind.to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "date", "string", "string", "string", "string", "integer", "integer", "integer",
                "integer", "float"
            ]
        );
        assert!(manifest.to_yaml().unwrap().len() > 1024);
    }

    #[test]
    fn other_schemes_and_relative_file_urls_are_permanent_errors() {
        for url in ["ftp://host/x.csv", "x.csv", "file://relative/x.csv"] {
            let error = fetch(url).unwrap_err();
            assert_eq!(error.exit_code(), 1, "{url}");
        }
    }
}
