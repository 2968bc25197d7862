//! Partitions: the months and datasets a backfill covers, parsed from the CLI and validated so
//! that a partition value can never become an option (`-x`) or a path (`../x`).

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
                month: None,
                dataset: Some(d),
            })
            .collect(),
        (None, Some(ms)) => ms
            .into_iter()
            .map(|m| Partition {
                month: Some(m),
                dataset: None,
            })
            .collect(),
        (Some(ds), Some(ms)) => ds
            .iter()
            .flat_map(|d| {
                ms.iter().map(move |m| Partition {
                    month: Some(m.clone()),
                    dataset: Some(d.clone()),
                })
            })
            .collect(),
    };
    if parts.is_empty() {
        return Err(PartitionError::Empty);
    }
    Ok(parts)
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
}
