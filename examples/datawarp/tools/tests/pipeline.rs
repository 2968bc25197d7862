//! End-to-end tests of the DataWarp tools: the built binaries run as the pipeline runs them, on
//! the committed sample data over `file://`, against the real PostgreSQL at 127.0.0.1:5432.
//!
//! Every test that touches the database works in its own schema (`dw_test_<pid>_<n>`), dropped
//! when the test ends, so parallel tests and parallel `cargo test` runs never collide. When
//! PostgreSQL is unreachable the tests fail with the command that starts it; they never skip.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use parquet::basic::{LogicalType, Repetition, Type as PhysicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use regex::Regex;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/datawarp";

/// The database the tools under test use (the same variable and default as the tools).
fn database_url() -> String {
    std::env::var("DATAWARP_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_string())
}

/// A schema of its own for one test, dropped (with its tables) when the test ends.
struct TestSchema {
    name: String,
}

impl TestSchema {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        require_postgres();
        let name = format!(
            "dw_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        Self { name }
    }

    /// Connects to the tools' database (which load-batch creates if needed).
    fn client(&self) -> postgres::Client {
        postgres::Client::connect(&database_url(), postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to `{}`: {e}", database_url()))
    }

    fn count(&self, table: &str, month: &str) -> i64 {
        self.client()
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{}\".\"{table}\" WHERE period_month = $1",
                    self.name
                ),
                &[&month],
            )
            .expect("count rows")
            .get(0)
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // The database may not exist if the test failed before load-batch created it.
        if let Ok(mut client) = postgres::Client::connect(&database_url(), postgres::NoTls) {
            let _ =
                client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name));
        }
    }
}

/// Fails the test, saying how to start PostgreSQL, when the server does not answer.
fn require_postgres() {
    let mut config: postgres::Config = database_url()
        .parse()
        .expect("DATAWARP_DATABASE_URL parses");
    config
        .dbname("postgres")
        .connect_timeout(std::time::Duration::from_secs(5));
    if let Err(error) = config.connect(postgres::NoTls) {
        panic!(
            "PostgreSQL at `{}` is unreachable ({error}). These tests need it: start it with\n    \
             pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
             or point DATAWARP_DATABASE_URL at a server with trust auth for user postgres.",
            database_url()
        );
    }
}

fn sample(dataset: &str, month: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../data/{dataset}/{month}.csv"))
}

fn reference(dataset: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../reference/{dataset}.yaml"))
}

fn file_url(path: &Path) -> String {
    format!(
        "file://{}",
        path.canonicalize()
            .expect("sample data exists; run datawarp-gen")
            .display()
    )
}

/// Runs one tool with the test's schema and returns its output.
fn run(binary: &str, args: &[&str], schema: Option<&TestSchema>) -> Output {
    let mut command = Command::new(binary);
    command
        .args(args)
        .env("DATAWARP_DATABASE_URL", database_url());
    if let Some(schema) = schema {
        command.env("DATAWARP_SCHEMA", &schema.name);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot start `{binary}`: {e}"))
}

/// Asserts the exit code, printing the command's output when it differs.
fn expect_exit(output: &Output, code: i32, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: unexpected exit status\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Complete data rows of a sample CSV, counted independently of the tools.
fn csv_rows(path: &Path) -> u64 {
    csv::Reader::from_path(path)
        .expect("open sample")
        .records()
        .count() as u64
}

/// Paths of one month's artefacts in a run directory.
struct Artefacts {
    raw: PathBuf,
    draft: PathBuf,
    enriched: PathBuf,
    parquet: PathBuf,
    metadata: PathBuf,
}

impl Artefacts {
    fn new(dir: &Path, dataset: &str, month: &str) -> Self {
        let base = dir.join(dataset).join(month);
        Self {
            raw: base.join("raw/source.csv"),
            draft: base.join("draft.yaml"),
            enriched: base.join("enriched.yaml"),
            parquet: base.join("out/data.parquet"),
            metadata: base.join("out/metadata.json"),
        }
    }
}

/// Runs EXTRACT and ENRICH for one month of the sample data.
fn extract_and_enrich(dataset: &str, month: &str, files: &Artefacts) {
    let url = file_url(&sample(dataset, month));
    let output = run(
        env!("CARGO_BIN_EXE_url_to_manifest"),
        &[
            "--url",
            &url,
            "--dataset",
            dataset,
            "--month",
            month,
            "--raw-out",
            files.raw.to_str().unwrap(),
            "--out",
            files.draft.to_str().unwrap(),
        ],
        None,
    );
    expect_exit(&output, 0, "url_to_manifest");
    assert!(
        stdout(&output).contains(&format!("from {url}")),
        "{}",
        stdout(&output)
    );
    let output = run(
        env!("CARGO_BIN_EXE_enrich_manifest"),
        &[
            "--draft",
            files.draft.to_str().unwrap(),
            "--reference",
            reference(dataset).to_str().unwrap(),
            "--out",
            files.enriched.to_str().unwrap(),
        ],
        None,
    );
    expect_exit(&output, 0, "enrich_manifest");
    assert!(
        !stderr(&output).contains("WARNING"),
        "reference misses a column: {}",
        stderr(&output)
    );
}

fn load(files: &Artefacts, schema: &TestSchema) -> Output {
    run(
        env!("CARGO_BIN_EXE_load-batch"),
        &[
            "--manifest",
            files.enriched.to_str().unwrap(),
            "--data",
            files.raw.to_str().unwrap(),
        ],
        Some(schema),
    )
}

fn loaded_rows(output: &Output) -> u64 {
    let pattern = Regex::new(r"Loaded (\d+) rows into (\S+) for (\d{4}-\d{2})").unwrap();
    let text = stdout(output);
    let captures = pattern
        .captures(&text)
        .unwrap_or_else(|| panic!("no `Loaded N rows` line in:\n{text}"));
    captures[1].parse().unwrap()
}

#[test]
fn one_month_goes_through_all_four_tools() {
    let schema = TestSchema::new();
    let dir = tempfile::tempdir().unwrap();
    let (dataset, month) = ("ae_attendances", "2024-01");
    let files = Artefacts::new(dir.path(), dataset, month);
    let expected = csv_rows(&sample(dataset, month));

    extract_and_enrich(dataset, month, &files);
    let draft_size = std::fs::metadata(&files.draft).unwrap().len();
    assert!(
        draft_size > 1024,
        "draft manifest is only {draft_size} bytes"
    );
    assert_eq!(
        std::fs::read(&files.raw).unwrap(),
        std::fs::read(sample(dataset, month)).unwrap()
    );
    let enriched = std::fs::read_to_string(&files.enriched).unwrap();
    assert!(
        enriched.contains("role: identifier") && enriched.contains("enriched_at:"),
        "{enriched}"
    );

    let first = load(&files, &schema);
    expect_exit(&first, 0, "load-batch");
    assert!(
        stdout(&first).contains("MIGRATION SUCCESS"),
        "{}",
        stdout(&first)
    );
    assert_eq!(loaded_rows(&first), expected);
    let again = load(&files, &schema);
    expect_exit(&again, 0, "load-batch (re-run)");
    assert_eq!(loaded_rows(&again), expected);
    assert_eq!(
        schema.count(dataset, month) as u64,
        expected,
        "a re-run must replace the month, not add to it"
    );

    let output = run(
        env!("CARGO_BIN_EXE_export_to_parquet"),
        &[
            "--manifest",
            files.enriched.to_str().unwrap(),
            "--out",
            files.parquet.to_str().unwrap(),
            "--metadata-out",
            files.metadata.to_str().unwrap(),
        ],
        Some(&schema),
    );
    expect_exit(&output, 0, "export_to_parquet");
    assert!(
        stdout(&output).contains(&format!("Exported {expected} rows to")),
        "{}",
        stdout(&output)
    );

    let reader =
        SerializedFileReader::try_from(files.parquet.as_path()).expect("parquet file opens");
    assert_eq!(
        reader.metadata().file_metadata().num_rows() as u64,
        expected
    );
    let schema_descr = reader.metadata().file_metadata().schema_descr_ptr();
    let columns: Vec<_> = schema_descr
        .columns()
        .iter()
        .map(|c| {
            (
                c.name().to_string(),
                c.physical_type(),
                c.logical_type_ref().cloned(),
                c.self_type().get_basic_info().repetition(),
            )
        })
        .collect();
    let expect = |name: &str, physical: PhysicalType, logical: Option<LogicalType>| {
        let column = columns
            .iter()
            .find(|c| c.0 == name)
            .unwrap_or_else(|| panic!("no column `{name}`: {columns:?}"));
        assert_eq!(
            (column.1, column.2.clone()),
            (physical, logical),
            "column `{name}`"
        );
        column.3
    };
    expect(
        "org_code",
        PhysicalType::BYTE_ARRAY,
        Some(LogicalType::String),
    );
    expect("attendances", PhysicalType::INT64, None);
    expect("pct_within_4h", PhysicalType::DOUBLE, None);
    expect("period", PhysicalType::INT32, Some(LogicalType::Date));
    // 2024-01 of the sample has empty emergency_admissions cells; attendances has none.
    assert_eq!(
        expect("emergency_admissions", PhysicalType::INT64, None),
        Repetition::OPTIONAL
    );
    assert_eq!(
        expect("attendances", PhysicalType::INT64, None),
        Repetition::REQUIRED
    );
    assert!(
        columns.iter().all(|c| c.0 != "period_month"),
        "the load bookkeeping column is not published"
    );

    let period = columns.iter().position(|c| c.0 == "period").unwrap();
    let mut rows = 0;
    for row in reader.get_row_iter(None).unwrap() {
        let row = row.unwrap();
        // 2024-01-01 is 19723 days after the Unix epoch.
        let (_, value) = row.get_column_iter().nth(period).unwrap();
        assert_eq!(value, &Field::Date(19723));
        rows += 1;
    }
    assert_eq!(rows, expected);

    let metadata: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.metadata).unwrap()).unwrap();
    assert_eq!(metadata["row_count"], expected);
    assert_eq!(metadata["dataset"], dataset);
    assert_eq!(
        metadata["parquet"]["bytes"],
        std::fs::metadata(&files.parquet).unwrap().len()
    );

    // A month that was never loaded has nothing to export: a permanent failure.
    let other = dir.path().join("other.yaml");
    std::fs::write(&other, enriched.replace("month: 2024-01", "month: 2024-02")).unwrap();
    let output = run(
        env!("CARGO_BIN_EXE_export_to_parquet"),
        &[
            "--manifest",
            other.to_str().unwrap(),
            "--out",
            dir.path().join("x.parquet").to_str().unwrap(),
            "--metadata-out",
            dir.path().join("x.json").to_str().unwrap(),
        ],
        Some(&schema),
    );
    expect_exit(&output, 1, "export_to_parquet of an empty month");
    assert!(
        stderr(&output).starts_with("CRITICAL: no rows for 2024-02"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn concurrent_loads_of_different_months_share_one_table() {
    let schema = TestSchema::new();
    let dir = tempfile::tempdir().unwrap();
    let dataset = "gp_appointments";
    let months = ["2023-03", "2023-04", "2023-05", "2023-06"];
    let files: Vec<Artefacts> = months
        .iter()
        .map(|m| Artefacts::new(dir.path(), dataset, m))
        .collect();
    for (month, files) in months.iter().zip(&files) {
        extract_and_enrich(dataset, month, files);
    }
    let children: Vec<_> = files
        .iter()
        .map(|f| {
            Command::new(env!("CARGO_BIN_EXE_load-batch"))
                .args([
                    "--manifest",
                    f.enriched.to_str().unwrap(),
                    "--data",
                    f.raw.to_str().unwrap(),
                ])
                .env("DATAWARP_DATABASE_URL", database_url())
                .env("DATAWARP_SCHEMA", &schema.name)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start load-batch")
        })
        .collect();
    for ((child, month), _) in children.into_iter().zip(months).zip(&files) {
        let output = child.wait_with_output().unwrap();
        expect_exit(&output, 0, &format!("concurrent load-batch of {month}"));
        let expected = csv_rows(&sample(dataset, month));
        assert_eq!(loaded_rows(&output), expected);
        assert_eq!(schema.count(dataset, month) as u64, expected);
    }
}

/// Serves `response` (a full HTTP response) to every connection until the test ends.
fn serve(response: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buffer = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buffer[..n]),
                }
            }
            let _ = stream.write_all(response.as_bytes());
        }
    });
    format!("http://{address}/ae_attendances/2024-01.csv")
}

fn extract(url: &str, dir: &Path) -> Output {
    run(
        env!("CARGO_BIN_EXE_url_to_manifest"),
        &[
            "--url",
            url,
            "--dataset",
            "ae_attendances",
            "--month",
            "2024-01",
            "--raw-out",
            dir.join("raw.csv").to_str().unwrap(),
            "--out",
            dir.join("draft.yaml").to_str().unwrap(),
        ],
        None,
    )
}

#[test]
fn url_to_manifest_classifies_fetch_failures() {
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/x.csv", listener.local_addr().unwrap())
    };
    let cases = [
        (closed, 75, "ConnectionError: "),
        (
            serve(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            ),
            75,
            "ConnectionError: ",
        ),
        (
            serve("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
            1,
            "CRITICAL: ",
        ),
        ("ftp://example.invalid/x.csv".to_string(), 1, "CRITICAL: "),
        ("file:///nonexistent/x.csv".to_string(), 1, "CRITICAL: "),
    ];
    for (url, code, prefix) in cases {
        let output = extract(&url, dir.path());
        expect_exit(&output, code, &url);
        assert!(
            stderr(&output).starts_with(prefix),
            "{url}: {}",
            stderr(&output)
        );
    }
    let ok = serve(
        "HTTP/1.1 200 OK\r\ncontent-length: 25\r\nconnection: close\r\n\r\norg_code,attendances\nRXX,5\n",
    );
    let output = extract(&ok, dir.path());
    expect_exit(&output, 0, "http 200");
    assert!(
        stdout(&output).starts_with("Extracted 1 rows x 2 columns from http://"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn truncated_sources_warn_and_still_write_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read_to_string(sample("ae_attendances", "2024-01")).unwrap();
    let header_only = dir.path().join("header.csv");
    std::fs::write(&header_only, &full[..=full.find('\n').unwrap()]).unwrap();
    let output = extract(&file_url(&header_only), dir.path());
    expect_exit(&output, 0, "header-only source");
    assert!(
        stderr(&output).contains("WARNING: source has a header but no complete data rows"),
        "{}",
        stderr(&output)
    );
    let size = std::fs::metadata(dir.path().join("draft.yaml"))
        .unwrap()
        .len();
    assert!(
        size < 1024,
        "a manifest without rows must stay under 1 KiB for file_size_min; got {size}"
    );

    let cut = dir.path().join("cut.csv");
    std::fs::write(&cut, &full[..full.len() - 30]).unwrap();
    let output = extract(&file_url(&cut), dir.path());
    expect_exit(&output, 0, "cut source");
    let lines = full.lines().count();
    assert!(
        stderr(&output).contains(&format!("WARNING: line {lines} has ")),
        "expected a warning about line {lines}: {}",
        stderr(&output)
    );
    let expected = csv_rows(&sample("ae_attendances", "2024-01")) - 1;
    assert!(
        stdout(&output).starts_with(&format!("Extracted {expected} rows")),
        "{}",
        stdout(&output)
    );

    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    let output = extract(&file_url(&empty), dir.path());
    expect_exit(&output, 0, "empty source");
    assert!(
        stderr(&output).contains("WARNING: source is empty"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn permanent_and_transient_failures_of_the_later_steps() {
    // Nothing here should reach the schema; it exists so that a regression cannot touch `staging`.
    let schema = TestSchema::new();
    let dir = tempfile::tempdir().unwrap();
    let files = Artefacts::new(dir.path(), "rtt_waiting_times", "2023-07");
    extract_and_enrich("rtt_waiting_times", "2023-07", &files);

    let output = run(
        env!("CARGO_BIN_EXE_enrich_manifest"),
        &[
            "--draft",
            files.draft.to_str().unwrap(),
            "--reference",
            "/nonexistent/ref.yaml",
            "--out",
            "/tmp/never.yaml",
        ],
        None,
    );
    expect_exit(&output, 1, "enrich with a missing reference");
    assert!(
        stderr(&output).starts_with("CRITICAL: cannot read reference"),
        "{}",
        stderr(&output)
    );
    let output = run(
        env!("CARGO_BIN_EXE_enrich_manifest"),
        &[
            "--draft",
            files.draft.to_str().unwrap(),
            "--reference",
            reference("ae_attendances").to_str().unwrap(),
            "--out",
            dir.path().join("x.yaml").to_str().unwrap(),
        ],
        None,
    );
    expect_exit(&output, 1, "enrich with another dataset's reference");

    let header_only = dir.path().join("header.csv");
    let raw = std::fs::read_to_string(&files.raw).unwrap();
    std::fs::write(&header_only, &raw[..=raw.find('\n').unwrap()]).unwrap();
    let output = run(
        env!("CARGO_BIN_EXE_load-batch"),
        &[
            "--manifest",
            files.enriched.to_str().unwrap(),
            "--data",
            header_only.to_str().unwrap(),
        ],
        Some(&schema),
    );
    expect_exit(&output, 1, "load-batch of a file without rows");
    assert!(
        stderr(&output).contains("CRITICAL: data file"),
        "{}",
        stderr(&output)
    );

    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let output = Command::new(env!("CARGO_BIN_EXE_load-batch"))
        .args([
            "--manifest",
            files.enriched.to_str().unwrap(),
            "--data",
            files.raw.to_str().unwrap(),
        ])
        .env(
            "DATAWARP_DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{closed}/datawarp"),
        )
        .output()
        .unwrap();
    expect_exit(&output, 75, "load-batch with the database down");
    assert!(
        stderr(&output).starts_with("ConnectionError: "),
        "{}",
        stderr(&output)
    );
}
