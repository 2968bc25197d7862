//! Partitions: the months and datasets a backfill covers, parsed from the CLI (or a partitions
//! file) and validated so that a partition value can never become an option (`-x`) or a path
//! (`../x`).
//!
//! A partitions file ([`parse_partitions_file`]) is CSV with a header row or a JSON array of
//! objects: one partition per row, `month` and/or `dataset` naming it, every other column a
//! per-partition variable (`{url}`) that overrides the pipeline's `vars` of the same name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One unit of a backfill: a month, a dataset, or both.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub struct Partition {
    /// `YYYY-MM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<String>,
    /// A dataset name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Per-partition variables from a partitions file (name → value); they override the
    /// pipeline's `vars` of the same name. Not part of the key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
}

/// A refused partition value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartitionError {
    /// Not `YYYY-MM` with a month from 01 to 12.
    #[error("invalid month `{0}`: expected YYYY-MM, e.g. 2024-01")]
    Month(String),
    /// Not `FROM..TO`.
    #[error("invalid month range `{0}`: expected FROM..TO, e.g. 2024-01..2024-12")]
    Range(String),
    /// FROM after TO.
    #[error("invalid month range `{0}`: FROM is after TO")]
    Reversed(String),
    /// A dataset name that could be read as an option or a path.
    #[error(
        "invalid dataset `{0}`: use letters, digits, `_`, `-` and `.`, starting with a letter or digit, at most 64 characters, no `..`"
    )]
    Dataset(String),
    /// Nothing to run.
    #[error("no partitions: give --months FROM..TO and/or --datasets a,b,c")]
    Empty,
    /// The same value twice.
    #[error("dataset `{0}` is listed twice")]
    Duplicate(String),
    /// A partitions file that cannot be used.
    #[error("partitions file `{file}`{}: {message}", match .row { Some(r) => format!(", row {r}"), None => String::new() })]
    File {
        /// The file.
        file: String,
        /// 1-based data row (after the CSV header), when one is at fault.
        row: Option<usize>,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl Partition {
    /// A stable, path-safe key: `2024-01`, `sales`, or `sales_2024-01`.
    pub fn key(&self) -> String {
        match (&self.dataset, &self.month) {
            (Some(d), Some(m)) => format!("{d}_{m}"),
            (Some(d), None) => d.clone(),
            (None, Some(m)) => m.clone(),
            (None, None) => "all".to_string(),
        }
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.dataset, &self.month) {
            (Some(d), Some(m)) => write!(f, "{d} {m}"),
            _ => f.write_str(&self.key()),
        }
    }
}

/// Checks one `YYYY-MM` value and returns (year, month).
pub fn parse_month(s: &str) -> Result<(i32, u32), PartitionError> {
    let bad = || PartitionError::Month(s.to_string());
    let b = s.as_bytes();
    if b.len() != 7
        || b[4] != b'-'
        || !b
            .iter()
            .enumerate()
            .all(|(i, c)| i == 4 || c.is_ascii_digit())
    {
        return Err(bad());
    }
    let year: i32 = s[..4].parse().map_err(|_| bad())?;
    let month: u32 = s[5..].parse().map_err(|_| bad())?;
    if !(1..=12).contains(&month) || year < 1 {
        return Err(bad());
    }
    Ok((year, month))
}

/// Expands `FROM..TO` (inclusive) into every month between, in order. A single `YYYY-MM` is a
/// range of one month.
pub fn parse_months(spec: &str) -> Result<Vec<String>, PartitionError> {
    let (from, to) = match spec.split_once("..") {
        Some((a, b)) => (a.trim(), b.trim()),
        None if !spec.contains('.') => (spec.trim(), spec.trim()),
        None => return Err(PartitionError::Range(spec.to_string())),
    };
    if from.is_empty() || to.is_empty() {
        return Err(PartitionError::Range(spec.to_string()));
    }
    let (fy, fm) = parse_month(from)?;
    let (ty, tm) = parse_month(to)?;
    if (fy, fm) > (ty, tm) {
        return Err(PartitionError::Reversed(spec.to_string()));
    }
    let mut out = Vec::new();
    let (mut y, mut m) = (fy, fm);
    while (y, m) <= (ty, tm) {
        out.push(format!("{y:04}-{m:02}"));
        m += 1;
        if m == 13 {
            m = 1;
            y += 1;
        }
    }
    Ok(out)
}

/// Checks a dataset name: it can be neither an option nor a path.
pub fn check_dataset(name: &str) -> Result<(), PartitionError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(PartitionError::Dataset(name.to_string()))
    }
}

/// Parses `a,b,c` into checked, distinct dataset names.
pub fn parse_datasets(spec: &str) -> Result<Vec<String>, PartitionError> {
    let mut out: Vec<String> = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        check_dataset(name)?;
        if out.iter().any(|d| d == name) {
            return Err(PartitionError::Duplicate(name.to_string()));
        }
        out.push(name.to_string());
    }
    Ok(out)
}

/// The cartesian product of datasets and months (dataset-major), from the CLI's two options.
pub fn expand(
    months: Option<&str>,
    datasets: Option<&str>,
) -> Result<Vec<Partition>, PartitionError> {
    let months = months.map(parse_months).transpose()?;
    let datasets = datasets.map(parse_datasets).transpose()?;
    let parts: Vec<Partition> = match (datasets, months) {
        (None, None) => Vec::new(),
        (Some(ds), None) => ds
            .into_iter()
            .map(|d| Partition {
                dataset: Some(d),
                ..Partition::default()
            })
            .collect(),
        (None, Some(ms)) => ms
            .into_iter()
            .map(|m| Partition {
                month: Some(m),
                ..Partition::default()
            })
            .collect(),
        (Some(ds), Some(ms)) => ds
            .iter()
            .flat_map(|d| {
                ms.iter().map(move |m| Partition {
                    month: Some(m.clone()),
                    dataset: Some(d.clone()),
                    vars: BTreeMap::new(),
                })
            })
            .collect(),
    };
    if parts.is_empty() {
        return Err(PartitionError::Empty);
    }
    Ok(parts)
}

/// The format of a partitions file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionsFormat {
    /// CSV with a header row.
    Csv,
    /// A JSON array of objects with string values.
    Json,
}

impl PartitionsFormat {
    /// The format a file name implies: `.json` is JSON, anything else CSV.
    pub fn of(file: &str) -> PartitionsFormat {
        if file.to_ascii_lowercase().ends_with(".json") {
            PartitionsFormat::Json
        } else {
            PartitionsFormat::Csv
        }
    }
}

/// Parses a partitions file's text (`file` names it in errors): every row becomes a partition
/// keyed by its `month` and/or `dataset` (checked like `--months` and `--datasets`), the other
/// columns its variables. Every row has the same columns; no key appears twice.
pub fn parse_partitions_file(
    file: &str,
    text: &str,
    format: PartitionsFormat,
) -> Result<Vec<Partition>, PartitionError> {
    let err = |row: Option<usize>, message: String| PartitionError::File {
        file: file.to_string(),
        row,
        message,
    };
    let rows: Vec<BTreeMap<String, String>> = match format {
        PartitionsFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .trim(csv::Trim::All)
                .from_reader(text.as_bytes());
            let header: Vec<String> = reader
                .headers()
                .map_err(|e| err(None, format!("cannot read the header row: {e}")))?
                .iter()
                .map(str::to_string)
                .collect();
            let mut rows = Vec::new();
            for (i, record) in reader.records().enumerate() {
                let record = record.map_err(|e| err(Some(i + 1), e.to_string()))?;
                rows.push(
                    header
                        .iter()
                        .cloned()
                        .zip(record.iter().map(str::to_string))
                        .collect(),
                );
            }
            rows
        }
        PartitionsFormat::Json => {
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| err(None, format!("not JSON: {e}")))?;
            let array = value.as_array().ok_or_else(|| {
                err(
                    None,
                    "expected a JSON array of objects, e.g. [{\"month\": \"2024-01\", \"url\": \"...\"}]"
                        .into(),
                )
            })?;
            let mut rows = Vec::new();
            for (i, row) in array.iter().enumerate() {
                let object = row
                    .as_object()
                    .ok_or_else(|| err(Some(i + 1), "expected an object".into()))?;
                let mut out = BTreeMap::new();
                for (k, v) in object {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Number(n) => n.to_string(),
                        serde_json::Value::Bool(b) => b.to_string(),
                        _ => {
                            return Err(err(
                                Some(i + 1),
                                format!("`{k}`: expected a string, number or boolean"),
                            ));
                        }
                    };
                    out.insert(k.clone(), v);
                }
                rows.push(out);
            }
            rows
        }
    };
    let Some(first) = rows.first() else {
        return Err(err(None, "no rows: expected one row per partition".into()));
    };
    let columns: BTreeSet<&String> = first.keys().collect();
    if !columns.iter().any(|c| *c == "month" || *c == "dataset") {
        return Err(err(
            None,
            "expected a `month` and/or a `dataset` column naming each partition".into(),
        ));
    }
    for c in &columns {
        let ok = !c.is_empty()
            && c.as_bytes()[0].is_ascii_alphabetic()
            && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(err(
                None,
                format!("column `{c}`: expected a name of letters, digits and `_`"),
            ));
        }
    }
    let mut out = Vec::with_capacity(rows.len());
    let mut seen = BTreeSet::new();
    for (i, mut row) in rows.clone().into_iter().enumerate() {
        let at = Some(i + 1);
        let these: BTreeSet<&String> = rows[i].keys().collect();
        if these != columns {
            return Err(err(
                at,
                format!(
                    "expected the columns {}, as in the first row",
                    columns
                        .iter()
                        .map(|c| format!("`{c}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let month = row.remove("month");
        let dataset = row.remove("dataset");
        if let Some(m) = &month {
            parse_month(m).map_err(|e| err(at, e.to_string()))?;
        }
        if let Some(d) = &dataset {
            check_dataset(d).map_err(|e| err(at, e.to_string()))?;
        }
        let p = Partition {
            month,
            dataset,
            vars: row,
        };
        if !seen.insert(p.key()) {
            return Err(err(at, format!("partition `{}` is listed twice", p.key())));
        }
        out.push(p);
    }
    Ok(out)
}

/// The per-partition variable names of a set of partitions.
pub fn var_names(partitions: &[Partition]) -> BTreeSet<String> {
    partitions
        .iter()
        .flat_map(|p| p.vars.keys().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_range_is_inclusive_and_crosses_years() {
        let m = parse_months("2023-11..2024-02").unwrap();
        assert_eq!(m, ["2023-11", "2023-12", "2024-01", "2024-02"]);
        assert_eq!(parse_months("2024-05").unwrap(), ["2024-05"]);
    }

    #[test]
    fn bad_months_are_refused() {
        for bad in [
            "2024-13", "2024-00", "24-01", "2024-1", "2024/01", "-2024-01", "2024-01x",
        ] {
            assert!(parse_month(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_months("2024-05..2024-01"),
            Err(PartitionError::Reversed("2024-05..2024-01".into()))
        );
        assert!(matches!(
            parse_months("2024-01..").unwrap_err(),
            PartitionError::Range(_)
        ));
    }

    #[test]
    fn datasets_cannot_be_options_or_paths() {
        for bad in [
            "-rf", "--all", "../etc", "a/b", "a..b", "", ".hidden", "a b",
        ] {
            assert!(check_dataset(bad).is_err(), "{bad:?}");
        }
        assert!(check_dataset("ae_attendances-v2.1").is_ok());
        assert!(parse_datasets("a,a").is_err());
    }

    #[test]
    fn product_is_dataset_major() {
        let p = expand(Some("2024-01..2024-02"), Some("x,y")).unwrap();
        let keys: Vec<_> = p.iter().map(Partition::key).collect();
        assert_eq!(keys, ["x_2024-01", "x_2024-02", "y_2024-01", "y_2024-02"]);
        assert_eq!(expand(None, None), Err(PartitionError::Empty));
    }

    #[test]
    fn partitions_file_csv_and_json() {
        let csv = "month,url\n2024-01, https://x/january-2024.csv\n2024-02,\"https://x/a,b.csv\"\n";
        let p = parse_partitions_file("p.csv", csv, PartitionsFormat::Csv).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].key(), "2024-01");
        assert_eq!(p[0].vars["url"], "https://x/january-2024.csv");
        assert_eq!(p[1].vars["url"], "https://x/a,b.csv");
        let json = r#"[{"dataset": "ae", "month": "2024-01", "rows": 3}]"#;
        let p = parse_partitions_file("p.json", json, PartitionsFormat::of("p.json")).unwrap();
        assert_eq!(p[0].key(), "ae_2024-01");
        assert_eq!(p[0].vars["rows"], "3");
        assert_eq!(var_names(&p), BTreeSet::from(["rows".to_string()]));
    }

    #[test]
    fn bad_partitions_files_name_the_row() {
        let e = |text: &str| {
            parse_partitions_file("p.csv", text, PartitionsFormat::Csv)
                .unwrap_err()
                .to_string()
        };
        assert!(e("month\n2024-13\n").contains("row 1: invalid month `2024-13`"));
        assert!(
            e("month\n2024-01\n2024-01\n").contains("row 2: partition `2024-01` is listed twice")
        );
        assert!(e("url\nx\n").contains("`month` and/or a `dataset`"));
        assert!(e("dataset,my-col\na,b\n").contains("column `my-col`"));
        assert!(e("dataset\n../etc\n").contains("invalid dataset"));
        assert!(e("month\n").contains("no rows"));
        let json = r#"[{"month": "2024-01", "url": "a"}, {"month": "2024-02"}]"#;
        let msg = parse_partitions_file("p.json", json, PartitionsFormat::Json)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("row 2: expected the columns `month`, `url`"),
            "{msg}"
        );
    }
}
