//! The deterministic validators: factual checks on a step's files and logs.
//!
//! Each [`Validation`] becomes one [`Check`] whose `detail` states what was seen (a path and its
//! size, how many files a glob matched and which, the first log line that matched and where), so
//! that the supervisor reasons from facts rather than from a bare pass/fail. The validators never
//! write, never follow anything but the paths they are given, and never load a whole log: logs
//! are read line by line, because a tool may print gigabytes.
//!
//! A missing log file counts as an empty log (a tool that printed nothing may leave none). An
//! unreadable path, an invalid glob or an invalid regular expression makes the check fail with a
//! detail saying why; it never panics and never passes by default.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::path::Path;

use regex::Regex;

use crate::contracts::{Check, CheckSpec, LogStream, Validation, ValidationReport};

/// Where an attempt's logs are.
#[derive(Debug, Clone, Copy)]
pub struct Logs<'a> {
    /// The attempt's standard output log.
    pub stdout: &'a Path,
    /// The attempt's standard error log.
    pub stderr: &'a Path,
}

/// Runs every check in order; the status is derived with [`ValidationReport::from_checks`].
/// A `sql` check fails here ("not measured"): use [`run_checks_measured`] with the values the
/// worker's queries returned.
pub fn run_checks(validations: &[Validation], logs: &Logs<'_>) -> ValidationReport {
    run_checks_measured(validations, logs, &[])
}

/// What a `sql` check's query returned, measured outside this pure module: the scalar as
/// text (`None` for SQL NULL), or why it could not be measured.
pub type Measured = Result<Option<String>, String>;

/// How a measurement error starts when the query never reached a working database (no
/// connection, no answer in time, the server shutting down): the check then says
/// [`NOT_MEASURED`], since nothing was learnt about the data.
pub const DB_UNREACHABLE: &str = "the database could not be reached";

/// How the detail of a check starts when it could not measure anything (its database was
/// unreachable, or the worker does not run such checks): a verdict on the attempt, not on the
/// data, so a retry may well pass ([`measured_nothing`]).
pub const NOT_MEASURED: &str = "the query was not run";

/// True when a failed check measured nothing ([`NOT_MEASURED`]): the supervisor must not read
/// it as bad data.
pub fn measured_nothing(kind: &str, detail: &str) -> bool {
    kind == "sql" && detail.starts_with(NOT_MEASURED)
}

/// Runs every check in order; `measured[i]` is the result of validation `i`'s query (for `sql`
/// checks; other entries are ignored).
pub fn run_checks_measured(
    validations: &[Validation],
    logs: &Logs<'_>,
    measured: &[Option<Measured>],
) -> ValidationReport {
    ValidationReport::from_checks(
        validations
            .iter()
            .enumerate()
            .map(|(i, v)| run_check_measured(v, logs, measured.get(i).and_then(|m| m.as_ref())))
            .collect(),
    )
}

/// Runs one check.
pub fn run_check(v: &Validation, logs: &Logs<'_>) -> Check {
    run_check_measured(v, logs, None)
}

fn run_check_measured(v: &Validation, logs: &Logs<'_>, measured: Option<&Measured>) -> Check {
    let mut value = None;
    let (passed, detail) = match &v.check {
        CheckSpec::FileExists { path } => file_exists(Path::new(path), &mut value),
        CheckSpec::FileSizeMin { path, min_bytes } => {
            file_size_min(Path::new(path), *min_bytes, &mut value)
        }
        CheckSpec::FileCount { glob, min, max } => file_count(glob, *min, *max, &mut value),
        CheckSpec::LogRegexAbsent { pattern, stream } => {
            log_regex(pattern, *stream, logs, Expect::Absent)
        }
        CheckSpec::LogRegexPresent { pattern, stream } => {
            log_regex(pattern, *stream, logs, Expect::Present)
        }
        CheckSpec::Sql {
            min, max, equals, ..
        } => sql_result(measured, *min, *max, equals.as_ref(), &mut value),
        CheckSpec::JsonPath {
            path,
            field,
            min,
            max,
            equals,
        } => document_field(
            Format::Json,
            Path::new(path),
            field,
            Bounds {
                min: *min,
                max: *max,
                equals: equals.as_ref(),
            },
            &mut value,
        ),
        CheckSpec::YamlPath {
            path,
            field,
            min,
            max,
            equals,
        } => document_field(
            Format::Yaml,
            Path::new(path),
            field,
            Bounds {
                min: *min,
                max: *max,
                equals: equals.as_ref(),
            },
            &mut value,
        ),
        CheckSpec::ParquetRows { path, min, max } => {
            parquet_rows(Path::new(path), *min, *max, &mut value)
        }
    };
    Check {
        name: v.name.clone(),
        kind: v.check.kind().to_string(),
        severity: v.severity,
        passed,
        detail,
        value,
    }
}

/// How many matching paths a `file_count` detail lists before summarising the rest.
const LISTED_MATCHES: usize = 5;

/// How many characters of a matching log line a detail quotes.
const QUOTED_LINE_CHARS: usize = 200;

/// The longest piece of one log line matched at once. A longer line is matched piece by piece
/// (all pieces keep the line's number), so one enormous line cannot exhaust memory; a match that
/// straddles two pieces of such a line is not seen.
const MAX_LINE_BYTES: usize = 1 << 20;

/// What a log check expects of its pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Absent,
    Present,
}

/// What a path turned out to be.
enum PathFact {
    File { bytes: u64 },
    Directory,
    Other,
    Missing,
    Unreadable(io::Error),
}

fn inspect(path: &Path) -> PathFact {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => PathFact::File { bytes: m.len() },
        Ok(m) if m.is_dir() => PathFact::Directory,
        Ok(_) => PathFact::Other,
        Err(e) if e.kind() == io::ErrorKind::NotFound => PathFact::Missing,
        Err(e) => PathFact::Unreadable(e),
    }
}

/// Describes a path that is not a regular file.
fn not_a_file(path: &Path, fact: &PathFact) -> String {
    let path = path.display();
    match fact {
        PathFact::File { bytes } => format!("`{path}` is a file of {bytes} bytes"),
        PathFact::Directory => format!("`{path}` is a directory"),
        PathFact::Other => format!("`{path}` is not a regular file"),
        PathFact::Missing => format!("`{path}` does not exist"),
        PathFact::Unreadable(e) => format!("cannot read `{path}`: {e}"),
    }
}

fn file_exists(path: &Path, value: &mut Option<f64>) -> (bool, String) {
    match inspect(path) {
        PathFact::File { bytes } => {
            *value = Some(bytes as f64);
            (
                true,
                format!("`{}` is a file of {bytes} bytes", path.display()),
            )
        }
        other => (false, not_a_file(path, &other)),
    }
}

fn file_size_min(path: &Path, min_bytes: u64, value: &mut Option<f64>) -> (bool, String) {
    match inspect(path) {
        PathFact::File { bytes } => (
            {
                *value = Some(bytes as f64);
                bytes >= min_bytes
            },
            format!(
                "`{}` is a file of {bytes} bytes (minimum {min_bytes})",
                path.display()
            ),
        ),
        other => (
            false,
            format!("{} (minimum {min_bytes} bytes)", not_a_file(path, &other)),
        ),
    }
}

fn file_count(
    pattern: &str,
    min: Option<u64>,
    max: Option<u64>,
    value: &mut Option<f64>,
) -> (bool, String) {
    let entries = match glob::glob(pattern) {
        Ok(entries) => entries,
        Err(e) => return (false, format!("invalid glob `{pattern}`: {e}")),
    };
    let mut count: u64 = 0;
    let mut listed = Vec::new();
    let mut unreadable: u64 = 0;
    for entry in entries {
        match entry {
            Ok(path) => {
                if path.is_file() {
                    count += 1;
                    if listed.len() < LISTED_MATCHES {
                        listed.push(format!("`{}`", path.display()));
                    }
                }
            }
            Err(_) => unreadable += 1,
        }
    }
    *value = Some(count as f64);
    let passed = min.is_none_or(|m| count >= m) && max.is_none_or(|m| count <= m);
    let bounds = match (min, max) {
        (Some(lo), Some(hi)) => format!("expected {lo} to {hi}"),
        (Some(lo), None) => format!("expected at least {lo}"),
        (None, Some(hi)) => format!("expected at most {hi}"),
        (None, None) => "no bounds".to_string(),
    };
    let noun = if count == 1 {
        "file matches"
    } else {
        "files match"
    };
    let mut detail = format!("{count} {noun} `{pattern}` ({bounds})");
    if !listed.is_empty() {
        detail.push_str(": ");
        detail.push_str(&listed.join(", "));
        let rest = count - listed.len() as u64;
        if rest > 0 {
            detail.push_str(&format!(" and {rest} more"));
        }
    }
    if unreadable > 0 {
        detail.push_str(&format!("; {unreadable} paths could not be read"));
    }
    (passed, detail)
}

/// Bounds on a measured value.
#[derive(Debug, Clone, Copy)]
struct Bounds<'a> {
    min: Option<f64>,
    max: Option<f64>,
    equals: Option<&'a serde_json::Value>,
}

/// Formats a number without a spurious `.0`.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl Bounds<'_> {
    /// Whether `v` lies within the numeric bounds, and the bounds as words.
    fn numeric(&self, v: f64) -> (bool, String) {
        let passed = self.min.is_none_or(|m| v >= m) && self.max.is_none_or(|m| v <= m);
        let words = match (self.min, self.max) {
            (Some(lo), Some(hi)) => format!("expected {} to {}", num(lo), num(hi)),
            (Some(lo), None) => format!("minimum {}", num(lo)),
            (None, Some(hi)) => format!("maximum {}", num(hi)),
            (None, None) => "no bounds".into(),
        };
        (passed, words)
    }
}

/// Compares a `sql` check's scalar with its bounds.
fn sql_result(
    measured: Option<&Measured>,
    min: Option<f64>,
    max: Option<f64>,
    equals: Option<&serde_json::Value>,
    value: &mut Option<f64>,
) -> (bool, String) {
    let bounds = Bounds { min, max, equals };
    let text = match measured {
        None => {
            return (
                false,
                format!("{NOT_MEASURED}: this worker does not run sql checks"),
            );
        }
        Some(Err(e)) if e.starts_with(DB_UNREACHABLE) => {
            return (false, format!("{NOT_MEASURED}: {e}"));
        }
        Some(Err(e)) => return (false, format!("the query failed: {e}")),
        Some(Ok(None)) => return (false, "the query returned NULL".into()),
        Some(Ok(Some(t))) => t.trim(),
    };
    let number = text.parse::<f64>().ok().filter(|v| v.is_finite());
    *value = number;
    if let Some(want) = equals {
        let (passed, shown) = equals_value(want, number, text);
        return (
            passed,
            format!(
                "the query returned {} (expected {shown})",
                quote_value(text)
            ),
        );
    }
    match number {
        Some(v) => {
            let (passed, words) = bounds.numeric(v);
            (passed, format!("the query returned {} ({words})", num(v)))
        }
        None if min.is_none() && max.is_none() => {
            (true, format!("the query returned {}", quote_value(text)))
        }
        None => (
            false,
            format!(
                "the query returned {}, not a number ({})",
                quote_value(text),
                bounds.numeric(0.0).1
            ),
        ),
    }
}

fn quote_value(text: &str) -> String {
    let shown: String = text.chars().take(QUOTED_LINE_CHARS).collect();
    format!("`{shown}`")
}

/// Whether a scalar equals the expected JSON value (numbers numerically, the rest as text).
fn equals_value(want: &serde_json::Value, number: Option<f64>, text: &str) -> (bool, String) {
    match want {
        serde_json::Value::Number(n) => {
            let w = n.as_f64().unwrap_or(f64::NAN);
            (number == Some(w), num(w))
        }
        serde_json::Value::String(s) => (text == s, format!("`{s}`")),
        other => {
            let want = other.to_string();
            (text == want, format!("`{want}`"))
        }
    }
}

/// A path to a field of a JSON or YAML document: `$.a.b[0].c`, `a.b`, or a JSON pointer
/// `/a/b/0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl FieldPath {
    /// Parses a field path; the error says what was expected.
    pub fn parse(s: &str) -> Result<FieldPath, String> {
        let bad = |why: &str| {
            Err(format!(
                "invalid field `{s}`: {why}; expected `$.a.b[0]`, `a.b` or a JSON pointer `/a/b/0`"
            ))
        };
        if let Some(pointer) = s.strip_prefix('/') {
            let segs = pointer
                .split('/')
                .map(|p| {
                    let p = p.replace("~1", "/").replace("~0", "~");
                    match p.parse::<usize>() {
                        Ok(i) if !p.starts_with('+') => Segment::Index(i),
                        _ => Segment::Key(p),
                    }
                })
                .collect();
            return Ok(FieldPath(segs));
        }
        let rest = s.strip_prefix('$').unwrap_or(s);
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        let mut segs = Vec::new();
        let mut chars = rest.chars().peekable();
        let mut key = String::new();
        while let Some(c) = chars.next() {
            match c {
                '.' => {
                    if key.is_empty() && !matches!(segs.last(), Some(Segment::Index(_))) {
                        return bad("an empty key");
                    }
                    if !key.is_empty() {
                        segs.push(Segment::Key(std::mem::take(&mut key)));
                    }
                }
                '[' => {
                    if !key.is_empty() {
                        segs.push(Segment::Key(std::mem::take(&mut key)));
                    }
                    let mut inner = String::new();
                    loop {
                        match chars.next() {
                            Some(']') => break,
                            Some(c) => inner.push(c),
                            None => return bad("an unclosed `[`"),
                        }
                    }
                    let inner = inner.trim();
                    if let Some(q) = inner
                        .strip_prefix('\'')
                        .and_then(|i| i.strip_suffix('\''))
                        .or_else(|| inner.strip_prefix('"').and_then(|i| i.strip_suffix('"')))
                    {
                        segs.push(Segment::Key(q.to_string()));
                    } else {
                        match inner.parse::<usize>() {
                            Ok(i) => segs.push(Segment::Index(i)),
                            Err(_) => return bad("an index that is not a number"),
                        }
                    }
                }
                c => key.push(c),
            }
        }
        if !key.is_empty() {
            segs.push(Segment::Key(key));
        }
        if segs.is_empty() && !(s == "$" || s.is_empty()) {
            return bad("no field");
        }
        Ok(FieldPath(segs))
    }

    fn get<'v>(&self, mut v: &'v serde_json::Value) -> Option<&'v serde_json::Value> {
        for seg in &self.0 {
            v = match seg {
                Segment::Key(k) => v.as_object()?.get(k)?,
                Segment::Index(i) => v.as_array()?.get(*i)?,
            };
        }
        Some(v)
    }
}

/// Which parser reads a document.
#[derive(Debug, Clone, Copy)]
enum Format {
    Json,
    Yaml,
}

/// The largest document a `json_path` / `yaml_path` check parses.
const MAX_DOCUMENT_BYTES: u64 = 64 << 20;

fn document_field(
    format: Format,
    path: &Path,
    field: &str,
    bounds: Bounds<'_>,
    value: &mut Option<f64>,
) -> (bool, String) {
    let shown = path.display();
    let fp = match FieldPath::parse(field) {
        Ok(fp) => fp,
        Err(e) => return (false, e),
    };
    match inspect(path) {
        PathFact::File { bytes } if bytes > MAX_DOCUMENT_BYTES => {
            return (
                false,
                format!(
                    "`{shown}` is {bytes} bytes, more than a field check reads ({MAX_DOCUMENT_BYTES})"
                ),
            );
        }
        PathFact::File { .. } => {}
        other => return (false, not_a_file(path, &other)),
    }
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return (false, format!("cannot read `{shown}`: {e}")),
    };
    let doc: Result<serde_json::Value, String> = match format {
        Format::Json => serde_json::from_str(&text).map_err(|e| e.to_string()),
        Format::Yaml => serde_norway::from_str(&text).map_err(|e| e.to_string()),
    };
    let doc = match doc {
        Ok(d) => d,
        Err(e) => {
            let what = match format {
                Format::Json => "JSON",
                Format::Yaml => "YAML",
            };
            return (false, format!("`{shown}` is not valid {what}: {e}"));
        }
    };
    let Some(v) = fp.get(&doc) else {
        return (false, format!("`{field}` is missing from `{shown}`"));
    };
    let (measure, what) = match v {
        serde_json::Value::Number(n) => (n.as_f64(), format!("is {n}")),
        serde_json::Value::Array(a) => (Some(a.len() as f64), format!("has {} elements", a.len())),
        serde_json::Value::Object(o) => (Some(o.len() as f64), format!("has {} keys", o.len())),
        serde_json::Value::String(s) => (
            Some(s.chars().count() as f64),
            format!("is {}", quote_value(s)),
        ),
        other => (None, format!("is {other}")),
    };
    *value = measure;
    if let Some(want) = bounds.equals {
        let passed =
            v == want || matches!((v.as_f64(), want.as_f64()), (Some(a), Some(b)) if a == b);
        return (
            passed,
            format!("`{field}` in `{shown}` {what} (expected {want})"),
        );
    }
    if bounds.min.is_none() && bounds.max.is_none() {
        return (true, format!("`{field}` in `{shown}` {what}"));
    }
    match measure {
        Some(m) => {
            let (passed, words) = bounds.numeric(m);
            (passed, format!("`{field}` in `{shown}` {what} ({words})"))
        }
        None => (
            false,
            format!(
                "`{field}` in `{shown}` {what}: not a number or a collection ({})",
                bounds.numeric(0.0).1
            ),
        ),
    }
}

/// Reads a Parquet file's row count from its footer (no column data is read).
fn parquet_rows(
    path: &Path,
    min: Option<u64>,
    max: Option<u64>,
    value: &mut Option<f64>,
) -> (bool, String) {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let shown = path.display();
    match inspect(path) {
        PathFact::File { .. } => {}
        other => return (false, not_a_file(path, &other)),
    }
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return (false, format!("cannot read `{shown}`: {e}")),
    };
    let reader = match SerializedFileReader::new(file) {
        Ok(r) => r,
        Err(e) => {
            return (
                false,
                format!("`{shown}` is not a readable Parquet file: {e}"),
            );
        }
    };
    let rows = reader.metadata().file_metadata().num_rows();
    let groups = reader.metadata().num_row_groups();
    let rows = u64::try_from(rows).unwrap_or(0);
    *value = Some(rows as f64);
    let passed = min.is_none_or(|m| rows >= m) && max.is_none_or(|m| rows <= m);
    let bounds = match (min, max) {
        (Some(lo), Some(hi)) => format!("expected {lo} to {hi}"),
        (Some(lo), None) => format!("minimum {lo}"),
        (None, Some(hi)) => format!("maximum {hi}"),
        (None, None) => "no bounds".to_string(),
    };
    (
        passed,
        format!("`{shown}` has {rows} rows in {groups} row groups ({bounds})"),
    )
}

/// The first line that matched, and where.
struct LineMatch {
    stream: &'static str,
    line_no: u64,
    text: String,
}

/// What scanning one log found.
enum Scan {
    Found(LineMatch),
    NotFound { lines: u64 },
}

fn log_regex(pattern: &str, stream: LogStream, logs: &Logs<'_>, expect: Expect) -> (bool, String) {
    let re = match Regex::new(pattern) {
        Ok(re) => re,
        Err(e) => return (false, format!("invalid regex `{pattern}`: {e}")),
    };
    let sources: &[(&'static str, &Path)] = match stream {
        LogStream::Both => &[("stdout", logs.stdout), ("stderr", logs.stderr)],
        LogStream::Stdout => &[("stdout", logs.stdout)],
        LogStream::Stderr => &[("stderr", logs.stderr)],
    };
    let mut total_lines: u64 = 0;
    for &(name, path) in sources {
        match scan_log(name, path, &re) {
            Ok(Scan::Found(m)) => {
                let detail = format!(
                    "line {} of {} matches `{pattern}`: {}",
                    m.line_no, m.stream, m.text
                );
                return (expect == Expect::Present, detail);
            }
            Ok(Scan::NotFound { lines }) => total_lines += lines,
            Err(e) => {
                return (
                    false,
                    format!("cannot read {name} log `{}`: {e}", path.display()),
                );
            }
        }
    }
    let which = match stream {
        LogStream::Both => "stdout+stderr",
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
    };
    let noun = if total_lines == 1 { "line" } else { "lines" };
    (
        expect == Expect::Absent,
        format!("no line of {which} ({total_lines} {noun}) matches `{pattern}`"),
    )
}

/// Scans one log for the first line matching `re`. A missing log is an empty one.
fn scan_log(stream: &'static str, path: &Path, re: &Regex) -> io::Result<Scan> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Scan::NotFound { lines: 0 }),
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut buf = Vec::new();
    let mut complete_lines: u64 = 0;
    let mut mid_line = false;
    while let Some(ends_line) = read_piece(&mut reader, &mut buf, MAX_LINE_BYTES)? {
        let mut piece = buf.as_slice();
        if ends_line && piece.last() == Some(&b'\r') {
            piece = &piece[..piece.len() - 1];
        }
        let text = String::from_utf8_lossy(piece);
        if re.is_match(&text) {
            return Ok(Scan::Found(LineMatch {
                stream,
                line_no: complete_lines + 1,
                text: quote(&text),
            }));
        }
        if ends_line {
            complete_lines += 1;
            mid_line = false;
        } else {
            mid_line = true;
        }
    }
    Ok(Scan::NotFound {
        lines: complete_lines + u64::from(mid_line),
    })
}

/// Reads the next piece of a line (without its `\n`) into `buf`, at most `cap` bytes.
///
/// Returns `None` at the end of the input, `Some(true)` when the piece ends its line (at a
/// newline or at the end of the input) and `Some(false)` when the line goes on past `cap`.
fn read_piece<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<Option<bool>> {
    buf.clear();
    loop {
        let available = match reader.fill_buf() {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if buf.is_empty() { None } else { Some(true) });
        }
        let window = &available[..available.len().min(cap - buf.len())];
        if let Some(i) = window.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&window[..i]);
            reader.consume(i + 1);
            return Ok(Some(true));
        }
        let taken = window.len();
        buf.extend_from_slice(window);
        reader.consume(taken);
        if buf.len() >= cap {
            return Ok(Some(false));
        }
    }
}

/// Quotes a log line for a detail, truncated to [`QUOTED_LINE_CHARS`] characters.
fn quote(line: &str) -> String {
    match line.char_indices().nth(QUOTED_LINE_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::PathBuf;

    use super::*;
    use crate::contracts::{ReportStatus, Severity};

    /// A temporary attempt directory with its two logs.
    struct Fixture {
        dir: tempfile::TempDir,
        stdout: PathBuf,
        stderr: PathBuf,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let stdout = dir.path().join("stdout.log");
            let stderr = dir.path().join("stderr.log");
            Fixture {
                dir,
                stdout,
                stderr,
            }
        }

        fn logs(&self) -> Logs<'_> {
            Logs {
                stdout: &self.stdout,
                stderr: &self.stderr,
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let p = self.path(name);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).unwrap();
            }
            fs::write(&p, bytes).unwrap();
            p
        }

        fn check(&self, check: CheckSpec) -> Check {
            run_check(
                &Validation {
                    name: "c".into(),
                    severity: Severity::Error,
                    check,
                },
                &self.logs(),
            )
        }
    }

    fn s(p: &Path) -> String {
        p.to_str().unwrap().to_string()
    }

    fn present(pattern: &str, stream: LogStream) -> CheckSpec {
        CheckSpec::LogRegexPresent {
            pattern: pattern.into(),
            stream,
        }
    }

    fn absent(pattern: &str, stream: LogStream) -> CheckSpec {
        CheckSpec::LogRegexAbsent {
            pattern: pattern.into(),
            stream,
        }
    }

    #[test]
    fn file_exists_reports_size() {
        let f = Fixture::new();
        let p = f.write("out/a.csv", b"12345");
        let c = f.check(CheckSpec::FileExists { path: s(&p) });
        assert!(c.passed, "{}", c.detail);
        assert_eq!(c.kind, "file_exists");
        assert_eq!(c.name, "c");
        assert!(c.detail.contains(&s(&p)), "{}", c.detail);
        assert!(c.detail.contains("5 bytes"), "{}", c.detail);
    }

    #[test]
    fn file_exists_fails_on_missing_and_directory() {
        let f = Fixture::new();
        let missing = f.check(CheckSpec::FileExists {
            path: s(&f.path("nope")),
        });
        assert!(!missing.passed);
        assert!(
            missing.detail.contains("does not exist"),
            "{}",
            missing.detail
        );

        fs::create_dir(f.path("d")).unwrap();
        let dir = f.check(CheckSpec::FileExists {
            path: s(&f.path("d")),
        });
        assert!(!dir.passed);
        assert!(dir.detail.contains("is a directory"), "{}", dir.detail);
    }

    #[test]
    fn file_size_min_compares_bytes() {
        let f = Fixture::new();
        let p = f.write("a", &[0u8; 100]);
        let exact = f.check(CheckSpec::FileSizeMin {
            path: s(&p),
            min_bytes: 100,
        });
        assert!(exact.passed, "{}", exact.detail);
        assert!(exact.detail.contains("100 bytes"), "{}", exact.detail);

        let small = f.check(CheckSpec::FileSizeMin {
            path: s(&p),
            min_bytes: 101,
        });
        assert!(!small.passed);
        assert!(
            small.detail.contains("100 bytes (minimum 101)"),
            "{}",
            small.detail
        );

        let missing = f.check(CheckSpec::FileSizeMin {
            path: s(&f.path("b")),
            min_bytes: 0,
        });
        assert!(!missing.passed);
        assert!(
            missing.detail.contains("does not exist"),
            "{}",
            missing.detail
        );

        fs::create_dir(f.path("d")).unwrap();
        let dir = f.check(CheckSpec::FileSizeMin {
            path: s(&f.path("d")),
            min_bytes: 0,
        });
        assert!(!dir.passed);
        assert!(dir.detail.contains("is a directory"), "{}", dir.detail);
    }

    #[test]
    fn file_count_counts_regular_files_within_bounds() {
        let f = Fixture::new();
        for i in 0..7 {
            f.write(&format!("out/part-{i}.parquet"), b"x");
        }
        // A directory matching the glob is not counted.
        fs::create_dir(f.path("out/part-dir.parquet")).unwrap();
        f.write("out/other.txt", b"x");
        let glob = format!("{}/out/*.parquet", f.dir.path().display());

        let c = f.check(CheckSpec::FileCount {
            glob: glob.clone(),
            min: Some(1),
            max: Some(7),
        });
        assert!(c.passed, "{}", c.detail);
        assert!(c.detail.starts_with("7 files match"), "{}", c.detail);
        assert!(c.detail.contains("expected 1 to 7"), "{}", c.detail);
        assert!(c.detail.contains("part-0.parquet"), "{}", c.detail);
        assert!(c.detail.contains("and 2 more"), "{}", c.detail);
        assert!(!c.detail.contains("part-dir"), "{}", c.detail);

        let too_many = f.check(CheckSpec::FileCount {
            glob: glob.clone(),
            min: None,
            max: Some(6),
        });
        assert!(!too_many.passed, "{}", too_many.detail);
        assert!(
            too_many.detail.contains("expected at most 6"),
            "{}",
            too_many.detail
        );

        let too_few = f.check(CheckSpec::FileCount {
            glob,
            min: Some(8),
            max: None,
        });
        assert!(!too_few.passed);

        let none = f.check(CheckSpec::FileCount {
            glob: format!("{}/missing/*.csv", f.dir.path().display()),
            min: Some(1),
            max: None,
        });
        assert!(!none.passed);
        assert!(none.detail.starts_with("0 files match"), "{}", none.detail);

        let unbounded_zero = f.check(CheckSpec::FileCount {
            glob: format!("{}/missing/*.csv", f.dir.path().display()),
            min: None,
            max: None,
        });
        assert!(unbounded_zero.passed, "{}", unbounded_zero.detail);
    }

    #[test]
    fn file_count_refuses_invalid_glob() {
        let f = Fixture::new();
        let c = f.check(CheckSpec::FileCount {
            glob: "a/***/b".into(),
            min: None,
            max: None,
        });
        assert!(!c.passed);
        assert!(c.detail.starts_with("invalid glob"), "{}", c.detail);
    }

    #[test]
    fn log_regex_present_names_stream_and_line() {
        let f = Fixture::new();
        f.write("stdout.log", b"starting\nloaded 12 rows\ndone\n");
        f.write("stderr.log", b"warning: slow\nERROR: disk full\n");

        let out = f.check(present(r"loaded \d+ rows", LogStream::Both));
        assert!(out.passed, "{}", out.detail);
        assert_eq!(out.kind, "log_regex_present");
        assert!(
            out.detail.starts_with("line 2 of stdout matches"),
            "{}",
            out.detail
        );
        assert!(out.detail.ends_with("loaded 12 rows"), "{}", out.detail);

        let err = f.check(present("ERROR", LogStream::Both));
        assert!(err.passed);
        assert!(err.detail.starts_with("line 2 of stderr"), "{}", err.detail);

        let only_stdout = f.check(present("ERROR", LogStream::Stdout));
        assert!(!only_stdout.passed);
        assert_eq!(
            only_stdout.detail,
            "no line of stdout (3 lines) matches `ERROR`"
        );

        let only_stderr = f.check(present("done", LogStream::Stderr));
        assert!(!only_stderr.passed);
        assert_eq!(
            only_stderr.detail,
            "no line of stderr (2 lines) matches `done`"
        );
    }

    #[test]
    fn log_regex_absent_fails_on_first_match() {
        let f = Fixture::new();
        f.write("stdout.log", b"ok\nCRITICAL one\nCRITICAL two\n");
        let c = f.check(absent("CRITICAL", LogStream::Both));
        assert!(!c.passed);
        assert_eq!(c.kind, "log_regex_absent");
        assert_eq!(
            c.detail,
            "line 2 of stdout matches `CRITICAL`: CRITICAL one"
        );

        let clean = f.check(absent("Traceback", LogStream::Both));
        assert!(clean.passed);
        // stderr.log does not exist: it counts as empty.
        assert_eq!(
            clean.detail,
            "no line of stdout+stderr (3 lines) matches `Traceback`"
        );
    }

    #[test]
    fn missing_logs_are_empty() {
        let f = Fixture::new();
        let c = f.check(absent("x", LogStream::Both));
        assert!(c.passed);
        assert_eq!(c.detail, "no line of stdout+stderr (0 lines) matches `x`");
        let p = f.check(present("x", LogStream::Stderr));
        assert!(!p.passed);
    }

    #[test]
    fn invalid_regex_fails_the_check() {
        let f = Fixture::new();
        f.write("stdout.log", b"anything\n");
        for spec in [
            absent("(unclosed", LogStream::Both),
            present("[z-a]", LogStream::Stdout),
        ] {
            let c = f.check(spec);
            assert!(!c.passed);
            assert!(c.detail.starts_with("invalid regex `"), "{}", c.detail);
        }
    }

    #[test]
    fn non_utf8_and_crlf_lines_are_tolerated() {
        let f = Fixture::new();
        f.write(
            "stdout.log",
            b"\xff\xfe binary junk\r\nrows=\xc3\x28 ok\r\nlast line without newline",
        );
        let c = f.check(present(r"^rows=.* ok$", LogStream::Stdout));
        assert!(c.passed, "{}", c.detail);
        assert!(c.detail.starts_with("line 2 of stdout"), "{}", c.detail);
        assert!(c.detail.contains('\u{FFFD}'), "{}", c.detail);

        let last = f.check(present("without newline$", LogStream::Stdout));
        assert!(last.passed);
        assert!(
            last.detail.starts_with("line 3 of stdout"),
            "{}",
            last.detail
        );

        let none = f.check(present("nothing", LogStream::Stdout));
        assert_eq!(none.detail, "no line of stdout (3 lines) matches `nothing`");
    }

    #[test]
    fn quoted_lines_are_truncated() {
        let f = Fixture::new();
        let long = format!("ERROR {}", "é".repeat(1000));
        f.write("stderr.log", long.as_bytes());
        let c = f.check(absent("ERROR", LogStream::Stderr));
        assert!(!c.passed);
        let quoted = c.detail.split_once(": ").unwrap().1;
        assert_eq!(quoted.chars().count(), QUOTED_LINE_CHARS + 1);
        assert!(quoted.ends_with('…'));
    }

    #[test]
    fn over_long_lines_are_matched_in_pieces() {
        let f = Fixture::new();
        let mut file = File::create(&f.stdout).unwrap();
        file.write_all(b"first\n").unwrap();
        // One line of 3 MiB with the needle near its end, then a short line.
        let filler = vec![b'a'; 3 * MAX_LINE_BYTES - 100];
        file.write_all(&filler).unwrap();
        file.write_all(b"NEEDLE\nafter\n").unwrap();
        drop(file);

        let c = f.check(present("NEEDLE", LogStream::Stdout));
        assert!(c.passed, "{}", c.detail);
        assert!(c.detail.starts_with("line 2 of stdout"), "{}", c.detail);
        let after = f.check(present("^after$", LogStream::Stdout));
        assert!(
            after.detail.starts_with("line 3 of stdout"),
            "{}",
            after.detail
        );
        let none = f.check(present("nothing", LogStream::Stdout));
        assert_eq!(none.detail, "no line of stdout (3 lines) matches `nothing`");
    }

    #[test]
    fn unreadable_log_fails_the_check() {
        let f = Fixture::new();
        // A directory where the log should be cannot be read as a log.
        fs::create_dir(&f.stdout).unwrap();
        let c = f.check(absent("x", LogStream::Stdout));
        assert!(!c.passed);
        assert!(
            c.detail.starts_with("cannot read stdout log"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn run_checks_keeps_order_and_derives_status() {
        let f = Fixture::new();
        f.write("stdout.log", b"done\n");
        let a = f.write("a", b"x");
        let validations = vec![
            Validation {
                name: "a exists".into(),
                severity: Severity::Error,
                check: CheckSpec::FileExists { path: s(&a) },
            },
            Validation {
                name: "no warnings".into(),
                severity: Severity::Warn,
                check: absent("done", LogStream::Both),
            },
        ];
        let report = run_checks(&validations, &f.logs());
        assert_eq!(report.status, ReportStatus::Pass);
        assert_eq!(report.checks.len(), 2);
        assert_eq!(report.checks[0].name, "a exists");
        assert!(report.checks[0].passed);
        assert_eq!(report.checks[1].name, "no warnings");
        assert_eq!(report.checks[1].severity, Severity::Warn);
        assert!(!report.checks[1].passed);

        let mut failing = validations;
        failing.push(Validation {
            name: "b exists".into(),
            severity: Severity::Error,
            check: CheckSpec::FileExists {
                path: s(&f.path("b")),
            },
        });
        let report = run_checks(&failing, &f.logs());
        assert_eq!(report.status, ReportStatus::Fail);

        assert_eq!(run_checks(&[], &f.logs()).status, ReportStatus::Pass);
    }

    #[test]
    fn json_and_yaml_fields_report_the_value_and_the_bound() {
        let f = Fixture::new();
        let json = f.write(
            "m.json",
            br#"{"row_count": 1750, "sources": ["a", "b"], "status": "ok", "meta": {"cols": [{"name": "x"}]}}"#,
        );
        let yaml = f.write(
            "m.yaml",
            b"dataset: ae\nrow_count: 1\ncolumns:\n  - name: a\n",
        );
        let jp =
            |field: &str, min: Option<f64>, max: Option<f64>, equals: Option<serde_json::Value>| {
                CheckSpec::JsonPath {
                    path: s(&json),
                    field: field.into(),
                    min,
                    max,
                    equals,
                }
            };
        let c = f.check(jp("$.row_count", Some(100.0), None, None));
        assert!(c.passed, "{}", c.detail);
        assert_eq!(c.value, Some(1750.0));
        assert!(c.detail.ends_with("is 1750 (minimum 100)"), "{}", c.detail);
        let c = f.check(jp("row_count", None, Some(1000.0), None));
        assert!(!c.passed);
        assert!(c.detail.contains("is 1750 (maximum 1000)"), "{}", c.detail);
        let c = f.check(jp("$.sources", Some(1.0), None, None));
        assert!(c.passed, "{}", c.detail);
        assert!(
            c.detail.contains("has 2 elements (minimum 1)"),
            "{}",
            c.detail
        );
        let c = f.check(jp("$.status", None, None, Some(serde_json::json!("ok"))));
        assert!(c.passed, "{}", c.detail);
        let c = f.check(jp(
            "/meta/cols/0/name",
            None,
            None,
            Some(serde_json::json!("y")),
        ));
        assert!(!c.passed);
        assert!(c.detail.contains("(expected \"y\")"), "{}", c.detail);
        let c = f.check(jp("$.meta.cols[0].name", None, None, None));
        assert!(c.passed, "{}", c.detail);
        let c = f.check(jp("$.missing", None, None, None));
        assert!(!c.passed);
        assert!(
            c.detail.starts_with("`$.missing` is missing from"),
            "{}",
            c.detail
        );

        let c = f.check(CheckSpec::YamlPath {
            path: s(&yaml),
            field: "$.row_count".into(),
            min: Some(100.0),
            max: None,
            equals: None,
        });
        assert!(!c.passed);
        assert_eq!(c.value, Some(1.0));
        assert!(c.detail.ends_with("is 1 (minimum 100)"), "{}", c.detail);
        let bad = f.write("bad.json", b"{not json");
        let c = f.check(CheckSpec::JsonPath {
            path: s(&bad),
            field: "$.a".into(),
            min: None,
            max: None,
            equals: None,
        });
        assert!(!c.passed);
        assert!(c.detail.contains("is not valid JSON"), "{}", c.detail);
    }

    #[test]
    fn field_paths_parse() {
        assert!(FieldPath::parse("$.a.b[0]['c d']").is_ok());
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse("$.a[x]").is_err());
        assert!(FieldPath::parse("$.a[0").is_err());
    }

    #[test]
    fn sql_results_are_compared_purely() {
        let f = Fixture::new();
        let sql = |min: Option<f64>, equals: Option<serde_json::Value>| Validation {
            name: "rows".into(),
            severity: Severity::Error,
            check: CheckSpec::Sql {
                query: "select 1".into(),
                database_url_env: "DB".into(),
                database_url_default: None,
                search_path_env: None,
                search_path_default: None,
                min,
                max: None,
                equals,
                timeout_s: 30,
            },
        };
        let one = |v: &Validation, m: Measured| {
            run_checks_measured(std::slice::from_ref(v), &f.logs(), &[Some(m)]).checks[0].clone()
        };
        let c = one(&sql(Some(100.0), None), Ok(Some("1".into())));
        assert!(!c.passed);
        assert_eq!(c.detail, "the query returned 1 (minimum 100)");
        assert_eq!(c.value, Some(1.0));
        let c = one(&sql(Some(100.0), None), Ok(Some("1750".into())));
        assert!(c.passed, "{}", c.detail);
        let c = one(&sql(None, Some(serde_json::json!(3))), Ok(Some("3".into())));
        assert!(c.passed, "{}", c.detail);
        let c = one(&sql(Some(1.0), None), Ok(None));
        assert!(!c.passed);
        assert_eq!(c.detail, "the query returned NULL");
        let c = one(
            &sql(Some(1.0), None),
            Err("relation \"x\" does not exist".into()),
        );
        assert!(
            c.detail.starts_with("the query failed: relation"),
            "{}",
            c.detail
        );
        // Not measured at all (a worker that cannot run queries): it fails, never passes.
        let c = run_checks(&[sql(Some(1.0), None)], &f.logs()).checks[0].clone();
        assert!(!c.passed);
        assert!(c.detail.contains("not run"), "{}", c.detail);
    }

    #[test]
    fn parquet_rows_come_from_the_footer() {
        use std::sync::Arc;

        use parquet::data_type::Int64Type;
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;

        let f = Fixture::new();
        let path = f.path("rows.parquet");
        let schema = Arc::new(parse_message_type("message m { REQUIRED INT64 n; }").unwrap());
        let file = File::create(&path).unwrap();
        let mut w =
            SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build()))
                .unwrap();
        for chunk in [vec![1i64, 2, 3], vec![4, 5]] {
            let mut rg = w.next_row_group().unwrap();
            let mut col = rg.next_column().unwrap().unwrap();
            col.typed::<Int64Type>()
                .write_batch(&chunk, None, None)
                .unwrap();
            col.close().unwrap();
            rg.close().unwrap();
        }
        w.close().unwrap();
        let c = f.check(CheckSpec::ParquetRows {
            path: s(&path),
            min: Some(10),
            max: None,
        });
        assert!(!c.passed);
        assert_eq!(c.value, Some(5.0));
        assert!(
            c.detail
                .ends_with("has 5 rows in 2 row groups (minimum 10)"),
            "{}",
            c.detail
        );
        let ok = f.check(CheckSpec::ParquetRows {
            path: s(&path),
            min: Some(1),
            max: Some(5),
        });
        assert!(ok.passed, "{}", ok.detail);
        let junk = f.write("junk.parquet", b"not parquet at all");
        let c = f.check(CheckSpec::ParquetRows {
            path: s(&junk),
            min: None,
            max: None,
        });
        assert!(!c.passed);
        assert!(
            c.detail.contains("is not a readable Parquet file"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn read_piece_splits_lines() {
        let mut r = BufReader::with_capacity(4, &b"abcdefgh\n\nxy"[..]);
        let mut buf = Vec::new();
        assert_eq!(read_piece(&mut r, &mut buf, 5).unwrap(), Some(false));
        assert_eq!(buf, b"abcde");
        assert_eq!(read_piece(&mut r, &mut buf, 5).unwrap(), Some(true));
        assert_eq!(buf, b"fgh");
        assert_eq!(read_piece(&mut r, &mut buf, 5).unwrap(), Some(true));
        assert_eq!(buf, b"");
        assert_eq!(read_piece(&mut r, &mut buf, 5).unwrap(), Some(true));
        assert_eq!(buf, b"xy");
        assert_eq!(read_piece(&mut r, &mut buf, 5).unwrap(), None);
    }
}
