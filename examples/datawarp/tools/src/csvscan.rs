//! Reading a source CSV defensively: which rows are complete, and what was wrong with the rest.
//!
//! Both `url_to_manifest` (to profile the rows) and `load-batch` (to copy them into PostgreSQL)
//! read the raw file through [`scan`], so they agree on exactly which rows count. A row is
//! complete when it has as many fields as the header and is valid UTF-8; anything else is
//! skipped with a warning naming its line. An empty body or a header without data rows is not an
//! error here: the scan reports it and the pipeline's validators judge the result.

use std::collections::HashSet;

use csv::{ByteRecord, ReaderBuilder, StringRecord};

/// At most this many warnings are kept verbatim; the rest are summarised in one more line.
pub const MAX_WARNINGS: usize = 10;

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    /// Column names after normalisation (trimmed, unique, none empty).
    pub header: Vec<String>,
    /// Complete data rows passed to the callback.
    pub rows: u64,
    /// Data rows skipped as incomplete or corrupt.
    pub skipped: u64,
    /// Problems found, in order, bounded by [`MAX_WARNINGS`] plus one summary line.
    pub warnings: Vec<String>,
}

impl Scan {
    fn warn(&mut self, message: String) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(message);
        } else if self.warnings.len() == MAX_WARNINGS {
            self.warnings.push(String::new());
        }
    }

    fn finish_warnings(&mut self, total: usize) {
        if total > MAX_WARNINGS {
            self.warnings[MAX_WARNINGS] =
                format!("{} more warnings not shown", total - MAX_WARNINGS);
        }
    }
}

/// Reads `bytes` as a CSV with a header and calls `on_row` with every complete data row.
pub fn scan(bytes: &[u8], mut on_row: impl FnMut(&StringRecord)) -> Scan {
    let mut scan = Scan::default();
    let mut total_warnings = 0usize;
    let mut warn = |scan: &mut Scan, message: String| {
        total_warnings += 1;
        scan.warn(message);
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        warn(
            &mut scan,
            format!(
                "source is empty ({} bytes); no header and no rows",
                bytes.len()
            ),
        );
        return scan;
    }
    let mut reader = ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes);
    let raw_header = match reader.byte_headers() {
        Ok(header) => header.clone(),
        Err(error) => {
            warn(&mut scan, format!("cannot read the header: {error}"));
            return scan;
        }
    };
    let (header, header_warnings) = normalise_header(&raw_header);
    for message in header_warnings {
        warn(&mut scan, message);
    }
    scan.header = header;
    let expected = scan.header.len();
    let mut record = ByteRecord::new();
    let mut last_line = 1;
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(error) => {
                warn(
                    &mut scan,
                    format!(
                        "cannot parse the csv after line {last_line}: {error}; rest of the source ignored"
                    ),
                );
                break;
            }
        }
        let line = record.position().map_or(last_line + 1, |p| p.line());
        last_line = line;
        if record.len() != expected {
            scan.skipped += 1;
            warn(
                &mut scan,
                format!(
                    "line {line} has {} fields, expected {expected} (truncated or corrupt row); row skipped",
                    record.len()
                ),
            );
            continue;
        }
        match StringRecord::from_byte_record(record.clone()) {
            Ok(row) => {
                scan.rows += 1;
                on_row(&row);
            }
            Err(_) => {
                scan.skipped += 1;
                warn(
                    &mut scan,
                    format!("line {line} is not valid utf-8; row skipped"),
                );
            }
        }
    }
    if scan.rows == 0 {
        warn(
            &mut scan,
            "source has a header but no complete data rows".to_string(),
        );
    }
    if scan.rows > 0 && !bytes.ends_with(b"\n") {
        warn(
            &mut scan,
            format!(
                "source does not end with a newline; its last row (line {last_line}) may be cut short"
            ),
        );
    }
    scan.finish_warnings(total_warnings);
    scan
}

/// Trims header names, names empty ones `column_N` and makes duplicates unique with a suffix.
fn normalise_header(raw: &ByteRecord) -> (Vec<String>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut seen = HashSet::new();
    let mut names = Vec::with_capacity(raw.len());
    for (index, field) in raw.iter().enumerate() {
        let mut name = String::from_utf8_lossy(field).trim().to_string();
        if name.is_empty() {
            name = format!("column_{}", index + 1);
            warnings.push(format!(
                "header field {} is empty; named it `{name}`",
                index + 1
            ));
        }
        if !seen.insert(name.clone()) {
            let mut suffix = 2;
            while seen.contains(&format!("{name}_{suffix}")) {
                suffix += 1;
            }
            let unique = format!("{name}_{suffix}");
            warnings.push(format!(
                "header name `{name}` repeats; renamed the copy `{unique}`"
            ));
            seen.insert(unique.clone());
            name = unique;
        }
        names.push(name);
    }
    (names, warnings)
}

/// Whether a cell counts as empty (null): nothing but whitespace.
pub fn is_null(cell: &str) -> bool {
    cell.trim().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_of(bytes: &[u8]) -> (Scan, Vec<Vec<String>>) {
        let mut rows = Vec::new();
        let scan = scan(bytes, |r| rows.push(r.iter().map(str::to_string).collect()));
        (scan, rows)
    }

    #[test]
    fn complete_rows_pass_and_short_rows_are_reported_by_line() {
        let (scan, rows) = rows_of(b"a,b,c\n1,2,3\n4,5\n6,7,8\n9,1");
        assert_eq!(scan.header, ["a", "b", "c"]);
        assert_eq!(rows, [["1", "2", "3"], ["6", "7", "8"]]);
        assert_eq!((scan.rows, scan.skipped), (2, 2));
        assert!(
            scan.warnings[0].contains("line 3 has 2 fields, expected 3"),
            "{:?}",
            scan.warnings
        );
        assert!(scan.warnings[1].contains("line 5"), "{:?}", scan.warnings);
        assert!(
            scan.warnings[2].contains("does not end with a newline"),
            "{:?}",
            scan.warnings
        );
    }

    #[test]
    fn empty_and_header_only_sources_are_reported_not_fatal() {
        let (scan, _) = rows_of(b"");
        assert!(scan.header.is_empty());
        assert!(scan.warnings[0].contains("source is empty"));
        let (scan, _) = rows_of(b"a,b\n");
        assert_eq!(scan.header, ["a", "b"]);
        assert_eq!(scan.rows, 0);
        assert!(scan.warnings[0].contains("no complete data rows"));
    }

    #[test]
    fn invalid_utf8_rows_are_skipped_and_headers_normalised() {
        let (scan, rows) = rows_of(b" a ,,a\n1,\xff,3\n4,5,6\n");
        assert_eq!(scan.header, ["a", "column_2", "a_2"]);
        assert_eq!(rows.len(), 1);
        assert_eq!(scan.skipped, 1);
        assert_eq!(scan.warnings.len(), 3, "{:?}", scan.warnings);
    }

    #[test]
    fn warnings_are_bounded() {
        let mut csv = String::from("a,b\n");
        for _ in 0..30 {
            csv.push_str("1\n");
        }
        let (scan, _) = rows_of(csv.as_bytes());
        assert_eq!(scan.skipped, 30);
        assert_eq!(scan.warnings.len(), MAX_WARNINGS + 1);
        assert_eq!(scan.warnings[MAX_WARNINGS], "21 more warnings not shown");
    }
}
