//! Data gates end to end: the DataWarp example's `pipeline.json` checks content (the manifest's
//! row count, a SQL count of the rows loaded, the Parquet footer's row count, the metadata JSON)
//! so that a month whose source was truncated to one row does not complete, while every one of
//! the 72 sample months (3 datasets × 24 months) passes.

use std::path::Path;

use serde_json::Value;
use warpline_shared::audit::AuditEvent;
use warpline_shared::contracts::Action;
use warpline_tests::*;

const PIPELINE: &str = "examples/datawarp/pipeline.json";
const DATASETS: &str = "ae_attendances,rtt_waiting_times,gp_appointments";

fn datawarp(work: &Path, schema: &str, extra: &[&str]) -> (Finished, Value) {
    let audit = work.join("audit.jsonl");
    // The tools are found only where the operator says: here, the workspace's build.
    let tools = bin_dir();
    let mut args = vec![
        "run",
        PIPELINE,
        "--tools-dir",
        tools.to_str().unwrap(),
        "--workers",
        "4",
        "--json",
        "--progress",
        "none",
        "--workdir",
        work.to_str().unwrap(),
        "--audit",
        audit.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = warpline(&args, &[("DATAWARP_SCHEMA", schema)]);
    let summary = run.summary();
    (run, summary)
}

/// Every check result recorded for one run, as (check name, passed, detail).
fn checks(work: &Path, run_id: &str) -> Vec<(String, bool, String)> {
    audit_records(&work.join("audit.jsonl"))
        .into_iter()
        .filter(|r| r.run_id.map(|id| id.to_string()).as_deref() == Some(run_id))
        .filter_map(|r| match r.event {
            AuditEvent::StepResult { outcome } => Some(outcome.report.checks),
            _ => None,
        })
        .flatten()
        .map(|c| (c.name, c.passed, c.detail))
        .collect()
}

#[test]
fn every_sample_month_passes_the_data_gates() {
    let _pg = postgres_admin();
    let work = tempfile::tempdir().unwrap();
    let schema = unique("e2e_gates_all");
    let _guard = SchemaGuard(schema.clone());
    let (run, summary) = datawarp(
        work.path(),
        &schema,
        &["--months", "2023-01..2024-12", "--datasets", DATASETS],
    );
    run.expect_code(0);
    assert_eq!(summary["counts"]["COMPLETE"], 72, "{}", run.context());
    // The gates really ran and measured each month (not passed by default).
    let any = summary["runs"][0]["run_id"].as_str().unwrap();
    let seen = checks(work.path(), any);
    for (gate, fact) in [
        ("source rows", "is 1750 (minimum 100)"),
        ("rows loaded", "the query returned 1750 (minimum 100)"),
        ("rows published", "has 1750 rows"),
        ("rows in metadata", "is 1750 (minimum 100)"),
    ] {
        let (_, passed, detail) = seen
            .iter()
            .find(|(n, ..)| n == gate)
            .unwrap_or_else(|| panic!("no `{gate}` check in {seen:?}"));
        assert!(passed, "{gate}: {detail}");
        assert!(detail.contains(fact), "{gate}: {detail}");
    }
}

#[test]
fn a_month_truncated_to_one_row_halts_at_its_gate() {
    let _pg = postgres_admin();
    // A copy of the sample data where one month's source kept its header and a single row.
    let data = tempfile::tempdir().unwrap();
    let src = repo_root().join("examples/datawarp/data/ae_attendances");
    let dst = data.path().join("ae_attendances");
    std::fs::create_dir_all(&dst).unwrap();
    for month in ["2024-05", "2024-06"] {
        let text = std::fs::read_to_string(src.join(format!("{month}.csv"))).unwrap();
        let kept: Vec<&str> = if month == "2024-06" {
            text.lines().take(2).collect()
        } else {
            text.lines().collect()
        };
        std::fs::write(dst.join(format!("{month}.csv")), kept.join("\n") + "\n").unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let schema = unique("e2e_gates_trunc");
    let _guard = SchemaGuard(schema.clone());
    let var = format!("source_base=file://{}", data.path().display());
    let (run, summary) = datawarp(
        work.path(),
        &schema,
        &[
            "--months",
            "2024-05..2024-06",
            "--datasets",
            "ae_attendances",
            "--var",
            &var,
        ],
    );
    run.expect_code(1);
    assert_eq!(
        run_of(&summary, "ae_attendances_2024-05")["state"],
        "COMPLETE",
        "{}",
        run.context()
    );
    let bad = run_of(&summary, "ae_attendances_2024-06");
    assert_eq!(bad["state"], "HALTED", "{}", run.context());
    assert_eq!(bad["step"], "EXTRACT");
    // A data gate halts at once: the same source yields the same one row.
    assert_eq!(bad["attempts"]["EXTRACT"], 1, "{bad}");
    let reason = bad["reason"].as_str().unwrap();
    assert!(reason.contains("source rows"), "{reason}");
    assert!(reason.contains("is 1 (minimum 100)"), "{reason}");
    // Before the gates, only a warning noticed and the month completed: the size check passes.
    let seen = checks(work.path(), bad["run_id"].as_str().unwrap());
    assert!(
        seen.iter()
            .any(|(n, passed, _)| n == "file_size_min(draft, 1024)" && *passed),
        "{seen:?}"
    );
    let decisions: Vec<Action> = audit_records(&work.path().join("audit.jsonl"))
        .into_iter()
        .filter(|r| r.run_id.map(|id| id.to_string()) == bad["run_id"].as_str().map(String::from))
        .filter_map(|r| match r.event {
            AuditEvent::Decision { decision, .. } => Some(decision.action),
            _ => None,
        })
        .collect();
    assert_eq!(decisions, [Action::Halt]);
}

#[test]
fn a_month_far_from_its_siblings_halts_at_sibling_deviation() {
    let _pg = postgres_admin();
    // 600 rows passes the `source rows ≥ 100` gate, but is far below the other months' 1750.
    let data = tempfile::tempdir().unwrap();
    let src = repo_root().join("examples/datawarp/data/ae_attendances");
    let dst = data.path().join("ae_attendances");
    std::fs::create_dir_all(&dst).unwrap();
    for m in 1..=5 {
        let month = format!("2024-0{m}");
        let text = std::fs::read_to_string(src.join(format!("{month}.csv"))).unwrap();
        let kept: Vec<&str> = if m == 5 {
            text.lines().take(601).collect()
        } else {
            text.lines().collect()
        };
        std::fs::write(dst.join(format!("{month}.csv")), kept.join("\n") + "\n").unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let schema = unique("e2e_gates_sib");
    let _guard = SchemaGuard(schema.clone());
    let var = format!("source_base=file://{}", data.path().display());
    // One run at a time, in month order, so four months have passed before the fifth.
    let (run, summary) = datawarp(
        work.path(),
        &schema,
        &[
            "--months",
            "2024-01..2024-05",
            "--datasets",
            "ae_attendances",
            "--var",
            &var,
            "--max-parallel",
            "1",
        ],
    );
    run.expect_code(1);
    assert_eq!(summary["counts"]["COMPLETE"], 4, "{}", run.context());
    let bad = run_of(&summary, "ae_attendances_2024-05");
    assert_eq!(bad["state"], "HALTED", "{}", run.context());
    assert_eq!(bad["step"], "EXTRACT");
    assert_eq!(bad["attempts"]["EXTRACT"], 1, "{bad}");
    let reason = bad["reason"].as_str().unwrap();
    assert!(reason.contains("rows like the other months"), "{reason}");
    assert!(
        reason.contains(
            "`source rows` is 600 against a median of 1750 over 4 passed siblings of dataset `ae_attendances`: 65.7% below (maximum 50%)"
        ),
        "{reason}"
    );
    // The first months had too few siblings to compare and said so.
    let first = checks(
        work.path(),
        run_of(&summary, "ae_attendances_2024-01")["run_id"]
            .as_str()
            .unwrap(),
    );
    assert!(
        first
            .iter()
            .any(|(n, passed, d)| n == "rows like the other months"
                && *passed
                && d.contains("fewer than the 3 needed")),
        "{first:?}"
    );
}
