//! Column profiling: type inference and summary statistics for the draft manifest.
//!
//! Each column is observed cell by cell. Empty cells are nulls. A column is `integer` when every
//! non-empty cell parses as an `i64` without a leading zero (codes such as `00L` or `01234` stay
//! strings), `float` when every cell is numeric, `date` when every cell is `YYYY-MM-DD`,
//! `boolean` when every cell is `true` or `false`, and `string` otherwise, including when it has
//! no values at all.

use std::collections::HashSet;

use chrono::NaiveDate;

use crate::csvscan::is_null;
use crate::manifest::{Column, ColumnType, Scalar};

/// Distinct values are counted up to this many per column.
pub const DISTINCT_CAP: usize = 1000;
/// String columns keep this many example values.
pub const SAMPLES: usize = 3;
/// Example values longer than this many characters are cut.
const SAMPLE_CHARS: usize = 60;

/// Accumulates what one column's cells say about it.
#[derive(Debug, Clone)]
pub struct ColumnProfiler {
    name: String,
    nulls: u64,
    values: u64,
    all_integer: bool,
    all_float: bool,
    all_date: bool,
    all_boolean: bool,
    integer_range: Option<(i64, i64)>,
    float_range: Option<(f64, f64)>,
    date_range: Option<(NaiveDate, NaiveDate)>,
    distinct: HashSet<String>,
    distinct_capped: bool,
    samples: Vec<String>,
}

impl ColumnProfiler {
    /// A profiler for the column called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            nulls: 0,
            values: 0,
            all_integer: true,
            all_float: true,
            all_date: true,
            all_boolean: true,
            integer_range: None,
            float_range: None,
            date_range: None,
            distinct: HashSet::new(),
            distinct_capped: false,
            samples: Vec::new(),
        }
    }

    /// Takes one cell into account.
    pub fn observe(&mut self, cell: &str) {
        if is_null(cell) {
            self.nulls += 1;
            return;
        }
        self.values += 1;
        let value = cell.trim();
        if self.all_integer {
            match parse_integer(value) {
                Some(n) => self.integer_range = Some(widen(self.integer_range, n)),
                None => self.all_integer = false,
            }
        }
        if self.all_float {
            match parse_float(value) {
                Some(x) => self.float_range = Some(widen_f64(self.float_range, x)),
                None => self.all_float = false,
            }
        }
        if self.all_date {
            match parse_date(value) {
                Some(d) => self.date_range = Some(widen(self.date_range, d)),
                None => self.all_date = false,
            }
        }
        if self.all_boolean
            && !(value.eq_ignore_ascii_case("true") || value.eq_ignore_ascii_case("false"))
        {
            self.all_boolean = false;
        }
        if !self.distinct.contains(value) {
            if self.distinct.len() < DISTINCT_CAP {
                self.distinct.insert(value.to_string());
                if self.samples.len() < SAMPLES {
                    self.samples
                        .push(value.chars().take(SAMPLE_CHARS).collect());
                }
            } else {
                self.distinct_capped = true;
            }
        }
    }

    /// The inferred type given what was observed so far.
    pub fn kind(&self) -> ColumnType {
        if self.values == 0 {
            ColumnType::String
        } else if self.all_integer {
            ColumnType::Integer
        } else if self.all_float {
            ColumnType::Float
        } else if self.all_date {
            ColumnType::Date
        } else if self.all_boolean {
            ColumnType::Boolean
        } else {
            ColumnType::String
        }
    }

    /// The manifest column. With `rows == 0` only the name and type are kept, so that the
    /// manifest of a source without data stays small.
    pub fn finish(self, rows: u64) -> Column {
        let kind = self.kind();
        let mut column = Column::bare(self.name, kind);
        if rows == 0 {
            return column;
        }
        column.null_count = Some(self.nulls);
        column.distinct_count = Some(self.distinct.len() as u64);
        column.distinct_capped = self.distinct_capped;
        let range = match kind {
            ColumnType::Integer => self
                .integer_range
                .map(|(a, b)| (Scalar::Integer(a), Scalar::Integer(b))),
            ColumnType::Float => self
                .float_range
                .map(|(a, b)| (Scalar::Float(a), Scalar::Float(b))),
            ColumnType::Date => self
                .date_range
                .map(|(a, b)| (Scalar::Text(a.to_string()), Scalar::Text(b.to_string()))),
            ColumnType::Boolean | ColumnType::String => None,
        };
        if let Some((min, max)) = range {
            column.min = Some(min);
            column.max = Some(max);
        }
        if kind == ColumnType::String {
            column.samples = self.samples;
        }
        column
    }
}

fn widen<T: PartialOrd + Copy>(range: Option<(T, T)>, value: T) -> (T, T) {
    match range {
        None => (value, value),
        Some((lo, hi)) => (
            if value < lo { value } else { lo },
            if value > hi { value } else { hi },
        ),
    }
}

fn widen_f64(range: Option<(f64, f64)>, value: f64) -> (f64, f64) {
    match range {
        None => (value, value),
        Some((lo, hi)) => (lo.min(value), hi.max(value)),
    }
}

/// Whether the digits of a number start with a superfluous zero (`007`, `-01`), which marks a
/// code rather than a quantity.
fn has_leading_zero(value: &str) -> bool {
    let digits = value.trim_start_matches(['-', '+']);
    let integer_part = digits.split(['.', 'e', 'E']).next().unwrap_or("");
    integer_part.len() > 1 && integer_part.starts_with('0')
}

/// Parses an integer cell (already trimmed).
pub fn parse_integer(value: &str) -> Option<i64> {
    if has_leading_zero(value) {
        return None;
    }
    value.parse().ok()
}

/// Parses a float cell (already trimmed); rejects `inf`, `NaN` and other words `f64` accepts.
pub fn parse_float(value: &str) -> Option<f64> {
    let numeric = value
        .bytes()
        .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
        && value.bytes().any(|b| b.is_ascii_digit());
    if !numeric || has_leading_zero(value) {
        return None;
    }
    value.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// Parses a `YYYY-MM-DD` date cell (already trimmed).
pub fn parse_date(value: &str) -> Option<NaiveDate> {
    if value.len() != 10 {
        return None;
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(cells: &[&str]) -> Column {
        let mut profiler = ColumnProfiler::new("c");
        for cell in cells {
            profiler.observe(cell);
        }
        profiler.finish(cells.len() as u64)
    }

    #[test]
    fn infers_each_type() {
        assert_eq!(profile(&["1", "-20", " 3 "]).kind, ColumnType::Integer);
        assert_eq!(profile(&["1", "2.5", "1e3"]).kind, ColumnType::Float);
        assert_eq!(
            profile(&["2024-01-01", "2023-12-31"]).kind,
            ColumnType::Date
        );
        assert_eq!(profile(&["true", "FALSE"]).kind, ColumnType::Boolean);
        assert_eq!(profile(&["RXX", "1"]).kind, ColumnType::String);
        assert_eq!(profile(&["2024-01-01", "x"]).kind, ColumnType::String);
        assert_eq!(profile(&["", " "]).kind, ColumnType::String);
    }

    #[test]
    fn codes_with_leading_zeros_and_special_floats_stay_strings() {
        assert_eq!(profile(&["00L", "01234"]).kind, ColumnType::String);
        assert_eq!(profile(&["01234", "5"]).kind, ColumnType::String);
        assert_eq!(profile(&["0", "0.5", "10"]).kind, ColumnType::Float);
        assert_eq!(profile(&["inf", "1"]).kind, ColumnType::String);
        assert_eq!(profile(&["NaN"]).kind, ColumnType::String);
        assert_eq!(profile(&["1", "-"]).kind, ColumnType::String);
    }

    #[test]
    fn nulls_ranges_distincts_and_samples_are_profiled() {
        let column = profile(&["5", "", "-2", "5", "40"]);
        assert_eq!(column.null_count, Some(1));
        assert_eq!(column.min, Some(Scalar::Integer(-2)));
        assert_eq!(column.max, Some(Scalar::Integer(40)));
        assert_eq!(column.distinct_count, Some(3));
        assert!(column.samples.is_empty());

        let column = profile(&["2024-03-01", "2024-01-15"]);
        assert_eq!(column.min, Some(Scalar::Text("2024-01-15".into())));
        assert_eq!(column.max, Some(Scalar::Text("2024-03-01".into())));

        let column = profile(&["b", "a", "b", "c", "d"]);
        assert_eq!(column.samples, ["b", "a", "c"]);
        assert_eq!(column.distinct_count, Some(4));
    }

    #[test]
    fn distinct_counting_is_capped() {
        let mut profiler = ColumnProfiler::new("c");
        for n in 0..(DISTINCT_CAP + 10) {
            profiler.observe(&format!("v{n}"));
        }
        let column = profiler.finish((DISTINCT_CAP + 10) as u64);
        assert_eq!(column.distinct_count, Some(DISTINCT_CAP as u64));
        assert!(column.distinct_capped);
    }

    #[test]
    fn a_source_without_rows_keeps_only_names_and_types() {
        let column = ColumnProfiler::new("c").finish(0);
        assert_eq!(column, Column::bare("c", ColumnType::String));
    }
}
