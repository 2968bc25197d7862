//! The manifest: the YAML document that describes one month of one dataset.
//!
//! `url_to_manifest` writes the draft (source, row count, inferred columns); `enrich_manifest`
//! adds the `semantic` block and per-column descriptions; `load-batch` and `export_to_parquet`
//! read either form. Optional fields are omitted when empty, which keeps the manifest of a source
//! without data rows small enough for the pipeline's `file_size_min` check to catch it.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, ResultExt, ToolError};

/// One month of one dataset, as drafted and then enriched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Dataset name; also the database table name.
    pub dataset: String,
    /// The month, `YYYY-MM`.
    pub month: String,
    /// Where the raw file came from and what it contained.
    pub source: Source,
    /// Complete data rows in the source (incomplete ones are dropped with a warning).
    pub row_count: u64,
    /// Number of columns in the header.
    pub column_count: usize,
    /// Columns in source order.
    pub columns: Vec<Column>,
    /// What was wrong with the source, if anything (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// When the draft was written (RFC 3339, UTC).
    pub generated_at: String,
    /// Dataset-level metadata added by `enrich_manifest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic: Option<Semantic>,
    /// When the manifest was enriched (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enriched_at: Option<String>,
}

/// The raw source file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// The URL it was fetched from.
    pub url: String,
    /// Where the raw bytes were saved.
    pub raw_path: String,
    /// SHA-256 of the raw bytes, lowercase hex.
    pub sha256: String,
    /// Size of the raw bytes.
    pub bytes: u64,
}

/// One column: its inferred type and profile, then its enrichment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    /// Header name.
    pub name: String,
    /// Inferred type.
    #[serde(rename = "type")]
    pub kind: ColumnType,
    /// Empty cells; absent when the source had no rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub null_count: Option<u64>,
    /// Smallest value (numeric and date columns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Scalar>,
    /// Largest value (numeric and date columns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Scalar>,
    /// Distinct non-empty values, counted up to a cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distinct_count: Option<u64>,
    /// True when `distinct_count` hit the cap and the real count is larger.
    #[serde(default, skip_serializing_if = "is_false")]
    pub distinct_capped: bool,
    /// A few example values (string columns).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<String>,
    /// What the column means (from the reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Unit of measure (from the reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Semantic role (from the reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

/// The value types the tools infer, store and export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// 64-bit signed integer.
    Integer,
    /// 64-bit float.
    Float,
    /// Calendar date, `YYYY-MM-DD`.
    Date,
    /// `true` / `false`.
    Boolean,
    /// Anything else.
    String,
}

/// A minimum or maximum value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// An integer.
    Integer(i64),
    /// A float.
    Float(f64),
    /// A date or other text.
    Text(String),
}

/// The semantic role of a column in the published table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Identifies the subject of a row (an organisation code).
    Identifier,
    /// A category to group by.
    Dimension,
    /// A quantity to aggregate.
    Measure,
    /// The period or another date.
    Date,
    /// Not described by the reference.
    Unknown,
}

/// Dataset-level metadata from the reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Semantic {
    /// Human title of the publication.
    pub title: String,
    /// Who publishes it.
    pub publisher: String,
    /// What it contains.
    pub description: String,
    /// Its licence.
    pub licence: String,
    /// The reference file the metadata came from.
    pub reference: String,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl ColumnType {
    /// The PostgreSQL type a column of this type is stored as.
    pub fn pg_type(self) -> &'static str {
        match self {
            Self::Integer => "bigint",
            Self::Float => "double precision",
            Self::Date => "date",
            Self::Boolean => "boolean",
            Self::String => "text",
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Integer => "integer",
            Self::Float => "float",
            Self::Date => "date",
            Self::Boolean => "boolean",
            Self::String => "string",
        };
        f.write_str(name)
    }
}

impl Column {
    /// A column known only by name and type (no profile, no enrichment).
    pub fn bare(name: impl Into<String>, kind: ColumnType) -> Self {
        Self {
            name: name.into(),
            kind,
            null_count: None,
            min: None,
            max: None,
            distinct_count: None,
            distinct_capped: false,
            samples: Vec::new(),
            description: None,
            unit: None,
            role: None,
        }
    }

    /// Whether the draft saw at least one non-empty value, so that its type is evidence rather
    /// than the fallback for an empty column.
    pub fn has_values(&self, row_count: u64) -> bool {
        match self.null_count {
            Some(nulls) => nulls < row_count,
            None => false,
        }
    }
}

impl Manifest {
    /// Serialises the manifest as YAML.
    pub fn to_yaml(&self) -> Result<String> {
        serde_norway::to_string(self).permanent(|| "cannot serialise the manifest as yaml")
    }

    /// Parses a manifest from YAML text.
    pub fn from_yaml(text: &str) -> std::result::Result<Self, serde_norway::Error> {
        serde_norway::from_str(text)
    }

    /// Reads and parses the manifest at `path`; any failure is permanent.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .permanent(|| format!("cannot read manifest `{}`", path.display()))?;
        Self::from_yaml(&text)
            .permanent(|| format!("manifest `{}` is not a valid manifest", path.display()))
    }
}

/// Checks that `name` is usable as a dataset (and so a table and a directory) name.
pub fn validate_dataset(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = name.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(ToolError::permanent(format!(
            "dataset `{name}` is not a valid name; use lowercase letters, digits and `_`, starting with a letter, at most 63 characters"
        )))
    }
}

/// Checks that `month` is a real `YYYY-MM` month.
pub fn validate_month(month: &str) -> Result<()> {
    let valid = month.len() == 7
        && chrono::NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d").is_ok();
    if valid {
        Ok(())
    } else {
        Err(ToolError::permanent(format!(
            "month `{month}` is not a valid month; expected YYYY-MM"
        )))
    }
}

/// The current time as RFC 3339 in UTC, to the second.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut id = Column::bare("org_code", ColumnType::String);
        id.null_count = Some(0);
        id.distinct_count = Some(2);
        id.samples = vec!["R0A".into(), "RXX".into()];
        id.role = Some(Role::Identifier);
        let mut count = Column::bare("attendances", ColumnType::Integer);
        count.null_count = Some(1);
        count.min = Some(Scalar::Integer(-3));
        count.max = Some(Scalar::Integer(12_000));
        let mut pct = Column::bare("pct", ColumnType::Float);
        pct.min = Some(Scalar::Float(12.0));
        pct.max = Some(Scalar::Float(99.5));
        let mut day = Column::bare("period", ColumnType::Date);
        day.min = Some(Scalar::Text("2024-01-01".into()));
        day.max = Some(Scalar::Text("2024-01-31".into()));
        Manifest {
            dataset: "ae_attendances".into(),
            month: "2024-01".into(),
            source: Source {
                url: "file:///tmp/x.csv".into(),
                raw_path: "/tmp/raw.csv".into(),
                sha256: "ab".repeat(32),
                bytes: 42,
            },
            row_count: 2,
            column_count: 4,
            columns: vec![id, count, pct, day],
            warnings: vec!["line 4 has 2 fields, expected 4; row skipped".into()],
            generated_at: "2024-02-01T00:00:00Z".into(),
            semantic: Some(Semantic {
                title: "A&E".into(),
                publisher: "NHS England".into(),
                description: "Attendances: counts, 4-hour target; yes".into(),
                licence: "OGL v3.0".into(),
                reference: "ref.yaml".into(),
            }),
            enriched_at: None,
        }
    }

    #[test]
    fn yaml_round_trip_preserves_every_field() {
        let manifest = sample();
        let yaml = manifest.to_yaml().unwrap();
        assert_eq!(Manifest::from_yaml(&yaml).unwrap(), manifest);
        // Ambiguous-looking strings survive: the month, dates and numbers-as-text stay strings.
        assert!(
            yaml.contains("month: 2024-01") || yaml.contains("month: '2024-01'"),
            "{yaml}"
        );
    }

    #[test]
    fn empty_optional_fields_are_omitted() {
        let column = Column::bare("x", ColumnType::String);
        let yaml = serde_norway::to_string(&column).unwrap();
        assert_eq!(yaml, "name: x\ntype: string\n");
        assert!(!column.has_values(0));
    }

    #[test]
    fn names_and_months_are_validated() {
        assert!(validate_dataset("ae_attendances").is_ok());
        for bad in ["", "Ae", "1ae", "ae-x", "ae;drop", &"a".repeat(64)] {
            assert!(validate_dataset(bad).is_err(), "{bad}");
        }
        assert!(validate_month("2024-02").is_ok());
        for bad in ["2024-13", "2024-1", "24-01", "2024-01-01", "x"] {
            assert!(validate_month(bad).is_err(), "{bad}");
        }
    }
}
