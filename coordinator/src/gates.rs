//! Data gates that need the backfill's history: `sibling_deviation`.
//!
//! A `sibling_deviation` check compares a value this partition's attempt measured (the `value`
//! of another check of the same step: a file's size, a row count, a query's result) with the
//! median of the same value over the backfill's sibling partitions that already passed the
//! step, and fails (or warns) when it deviates by more than `max_deviation_pct` percent, once
//! at least `min_siblings` siblings exist. The worker cannot evaluate it (it knows one attempt,
//! never the backfill), so the engine calls [`apply`] on every accepted outcome before the
//! supervisor sees it, and [`apply`] appends the checks' results to the report. It is pure:
//! the history lives in the backfill's record ([`Siblings`]), which fleet mode persists with
//! the backfill, so a coordinator restart keeps it.

use std::collections::BTreeMap;

use warpline_shared::config::{CheckConfig, Pipeline, check_name};
use warpline_shared::contracts::{Check, ReportStatus, ValidationReport};
use warpline_shared::partition::Partition;

/// Values measured by the partitions that passed a step: `"STEP/CHECK/GROUP"` → partition key
/// → value. `GROUP` is the dataset when siblings must share it, else empty.
pub type Siblings = BTreeMap<String, BTreeMap<String, f64>>;

/// The check kind's wire name.
pub const KIND: &str = "sibling_deviation";

/// Evaluates step `step`'s `sibling_deviation` checks on an outcome's report, appends them
/// (the report's status is derived again), and, when the report then passes, records this
/// partition's values for later siblings. Returns whether the step has any such check.
pub fn apply(
    pipeline: &Pipeline,
    step: usize,
    partition: &Partition,
    report: &mut ValidationReport,
    siblings: &mut Siblings,
) -> bool {
    let Some(cfg) = pipeline.steps().get(step) else {
        return false;
    };
    let gates: Vec<_> = cfg
        .validations
        .iter()
        .filter_map(|v| match &v.check {
            CheckConfig::SiblingDeviation {
                of,
                max_deviation_pct,
                min_siblings,
                same_dataset,
            } => Some((v, of, *max_deviation_pct, *min_siblings, *same_dataset)),
            _ => None,
        })
        .collect();
    if gates.is_empty() {
        return false;
    }
    let me = partition.key();
    let mut record = Vec::new();
    let mut checks = report.checks.clone();
    for (v, of, max_pct, min_siblings, same_dataset) in gates {
        let group = if same_dataset {
            partition.dataset.clone().unwrap_or_default()
        } else {
            String::new()
        };
        let key = format!("{}/{of}/{group}", cfg.id);
        let measured = report
            .checks
            .iter()
            .find(|c| c.name == *of)
            .and_then(|c| c.value);
        let others: Vec<f64> = siblings
            .get(&key)
            .map(|m| {
                m.iter()
                    .filter(|(p, _)| **p != me)
                    .map(|(_, v)| *v)
                    .collect()
            })
            .unwrap_or_default();
        let scope = if same_dataset && !group.is_empty() {
            format!(" of dataset `{group}`")
        } else {
            String::new()
        };
        let (passed, detail) = match measured {
            None => (
                false,
                format!("`{of}` measured no value in this attempt, so it cannot be compared"),
            ),
            Some(value) => {
                record.push((key, value));
                judge(value, &others, of, max_pct, min_siblings, &scope)
            }
        };
        checks.push(Check {
            name: check_name(v),
            kind: KIND.to_string(),
            severity: v.severity,
            passed,
            detail,
            value: measured,
        });
    }
    *report = ValidationReport::from_checks(checks);
    if report.status == ReportStatus::Pass {
        for (key, value) in record {
            siblings.entry(key).or_default().insert(me.clone(), value);
        }
    }
    true
}

/// Compares one value with its siblings' median.
fn judge(
    value: f64,
    others: &[f64],
    of: &str,
    max_pct: f64,
    min_siblings: u32,
    scope: &str,
) -> (bool, String) {
    let n = others.len();
    let shown = num(value);
    if n < min_siblings as usize {
        return (
            true,
            format!(
                "`{of}` is {shown}; {n} passed siblings{scope} so far, fewer than the {min_siblings} needed to compare"
            ),
        );
    }
    let med = median(others);
    let deviation = if med == 0.0 {
        if value == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (value - med).abs() / med.abs() * 100.0
    };
    let direction = if value < med { "below" } else { "above" };
    let pct = if deviation.is_finite() {
        format!("{deviation:.1}%")
    } else {
        "infinitely".to_string()
    };
    (
        deviation <= max_pct,
        format!(
            "`{of}` is {shown} against a median of {} over {n} passed siblings{scope}: {pct} {direction} (maximum {}%)",
            num(med),
            num(max_pct)
        ),
    )
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use warpline_shared::contracts::Severity;

    use super::*;

    fn pipeline(severity: &str) -> Pipeline {
        let text = format!(
            r#"{{"name": "p", "steps": [{{"id": "LOAD", "command": "t", "validations": [
                {{"name": "rows", "kind": "file_count", "glob": "*.csv"}},
                {{"kind": "sibling_deviation", "of": "rows", "max_deviation_pct": 50,
                  "min_siblings": 3, "severity": "{severity}"}}]}}]}}"#
        );
        Pipeline::from_json(Path::new("/tmp/p/pipeline.json"), &text).unwrap()
    }

    fn part(dataset: &str, month: &str) -> Partition {
        Partition {
            month: Some(month.into()),
            dataset: Some(dataset.into()),
            vars: Default::default(),
        }
    }

    fn report(rows: f64) -> ValidationReport {
        ValidationReport::from_checks(vec![Check {
            name: "rows".into(),
            kind: "file_count".into(),
            severity: Severity::Error,
            passed: true,
            detail: String::new(),
            value: Some(rows),
        }])
    }

    #[test]
    fn a_deviating_partition_fails_once_enough_siblings_passed() {
        let p = pipeline("error");
        let mut s = Siblings::new();
        for (i, rows) in [1750.0, 1740.0, 1760.0].into_iter().enumerate() {
            let mut r = report(rows);
            apply(
                &p,
                0,
                &part("ae", &format!("2024-0{}", i + 1)),
                &mut r,
                &mut s,
            );
            assert_eq!(r.status, ReportStatus::Pass, "{:?}", r.checks);
            assert!(
                r.checks[1].detail.contains("fewer than the 3 needed"),
                "{}",
                r.checks[1].detail
            );
        }
        // Another dataset has no siblings yet.
        let mut other = report(10.0);
        apply(&p, 0, &part("gp", "2024-01"), &mut other, &mut s);
        assert_eq!(other.status, ReportStatus::Pass);

        let mut bad = report(1.0);
        apply(&p, 0, &part("ae", "2024-06"), &mut bad, &mut s);
        assert_eq!(bad.status, ReportStatus::Fail);
        let c = &bad.checks[1];
        assert_eq!(c.kind, "sibling_deviation");
        assert_eq!(c.name, "sibling_deviation(rows)");
        assert_eq!(
            c.detail,
            "`rows` is 1 against a median of 1750 over 3 passed siblings of dataset `ae`: 99.9% below (maximum 50%)"
        );
        // A failing partition is not recorded as a sibling.
        assert_eq!(s["LOAD/rows/ae"].len(), 3);

        let mut fine = report(1500.0);
        apply(&p, 0, &part("ae", "2024-07"), &mut fine, &mut s);
        assert_eq!(fine.status, ReportStatus::Pass, "{}", fine.checks[1].detail);
        assert_eq!(s["LOAD/rows/ae"].len(), 4);
        // A re-run of a recorded partition is not its own sibling.
        let mut again = report(1500.0);
        apply(&p, 0, &part("ae", "2024-07"), &mut again, &mut s);
        assert!(
            again.checks[1].detail.contains("over 3 passed siblings"),
            "{}",
            again.checks[1].detail
        );
    }

    #[test]
    fn a_warn_gate_informs_without_failing() {
        let p = pipeline("warn");
        let mut s = Siblings::new();
        for m in ["2024-01", "2024-02", "2024-03"] {
            apply(&p, 0, &part("ae", m), &mut report(100.0), &mut s);
        }
        let mut r = report(400.0);
        apply(&p, 0, &part("ae", "2024-04"), &mut r, &mut s);
        assert_eq!(r.status, ReportStatus::Pass);
        assert!(!r.checks[1].passed);
        assert!(
            r.checks[1].detail.contains("300.0% above"),
            "{}",
            r.checks[1].detail
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
