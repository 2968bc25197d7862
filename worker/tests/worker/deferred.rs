//! What only a worker resolves, against real processes: pinned allowlist entries, secrets
//! (resolved from the environment or a secrets directory and redacted from every report), and
//! dynamic artefacts (a glob or the tool's own report, passed on to a later step by record).

use std::collections::BTreeMap;

use tokio_util::sync::CancellationToken;
use warpline_executor::run_step;
use warpline_shared::contracts::{DynamicArtefact, ReportStatus, StepSpec};

use crate::support::{Workdir, config};

fn script(w: &Workdir, name: &str, body: &str) -> String {
    let path = w.root().join("scripts").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn a_pinned_interpreter_runs_its_script_and_nothing_else() {
    let w = Workdir::new();
    let ok = script(&w, "ok.sh", "echo ran-the-script\n");
    let mut cfg = config();
    cfg.allowlist = [format!("sh {ok}")].into();

    let spec = w.spec("sh", &[&ok], 30);
    let outcome = run_step(&spec, &cfg, &CancellationToken::new()).await;
    assert_eq!(outcome.result.exit_code, 0, "{:?}", outcome.result.error);
    assert!(outcome.result.log_tail.contains("ran-the-script"));
    // What ran, and its hash, are reported.
    let program = outcome.result.program.as_deref().unwrap();
    assert!(
        program.starts_with('/') && program.ends_with("/sh"),
        "{program}"
    );
    assert_eq!(
        outcome.result.program_sha256.as_deref().map(str::len),
        Some(64)
    );

    let spec = w.spec("sh", &["-c", "touch pwned"], 30);
    let outcome = run_step(&spec, &cfg, &CancellationToken::new()).await;
    let err = outcome.result.error.as_deref().unwrap();
    assert_eq!(outcome.result.exit_code, -1);
    assert!(
        err.contains("command `sh -c touch pwned` is not on this worker's allowlist"),
        "{err}"
    );
    assert!(err.contains(&format!("pins (`{ok}`)")), "{err}");
    assert!(err.contains("inline code is never allowed"), "{err}");
    assert!(!w.root().join("run/pwned").exists());

    let other = script(&w, "other.sh", "echo other\n");
    let spec = w.spec("sh", &[&other], 30);
    let outcome = run_step(&spec, &cfg, &CancellationToken::new()).await;
    assert_eq!(outcome.result.exit_code, -1, "another script is refused");
}

#[tokio::test]
async fn secrets_resolve_on_the_worker_and_are_redacted_from_the_report() {
    let w = Workdir::new();
    let secrets = w.root().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("db_password"), "s3cr3t-pa55\n").unwrap();
    let mut cfg = config();
    cfg.secrets_dir = Some(secrets.clone());

    let mut spec = w.sh(
        r#"echo "password is $DB_PASSWORD and arg $0"; printf %s "$DB_PASSWORD" > seen; echo "path=$1" >&2"#,
        30,
    );
    spec.args.push("{secret:db_password}".into());
    spec.args.push("{env:PATH}".into());
    spec.env
        .insert("DB_PASSWORD".into(), "{secret:db_password}".into());
    spec.deferred = vec!["args[2]".into(), "args[3]".into(), "env.DB_PASSWORD".into()];
    let path = std::env::var("PATH").unwrap();
    let outcome = run_step(&spec, &cfg, &CancellationToken::new()).await;
    assert_eq!(outcome.result.exit_code, 0, "{:?}", outcome.result.error);
    // The tool saw the real value...
    assert_eq!(w.read("run/seen"), "s3cr3t-pa55");
    // ...and nothing the attempt reports holds it.
    let json = serde_json::to_string(&outcome).unwrap();
    assert!(!json.contains("s3cr3t-pa55"), "{json}");
    assert!(!json.contains(&path), "{json}");
    assert!(
        outcome
            .result
            .log_tail
            .contains("password is [redacted] and arg [redacted]"),
        "{}",
        outcome.result.log_tail
    );

    // A secret that cannot be resolved stops the step before anything runs.
    let mut spec = w.sh("touch ran", 30);
    spec.env
        .insert("TOKEN".into(), "{env:WARPLINE_TEST_SURELY_UNSET}".into());
    spec.deferred = vec!["env.TOKEN".into()];
    let outcome = run_step(&spec, &cfg, &CancellationToken::new()).await;
    let err = outcome.result.error.unwrap();
    assert!(
        err.contains("`{env:WARPLINE_TEST_SURELY_UNSET}` is not set: set `WARPLINE_TEST_SURELY_UNSET` in this worker's environment"),
        "{err}"
    );
    assert!(!w.root().join("run/ran").exists());
    let mut spec = w.sh("true", 30);
    spec.args.push("{secret:missing}".into());
    spec.deferred = vec!["args[2]".into()];
    let err = run_step(&spec, &config(), &CancellationToken::new())
        .await
        .result
        .error
        .unwrap();
    assert!(err.contains("needs a secrets directory"), "{err}");
}

fn dynamic(w: &Workdir, step: &str, glob: Option<&str>, file: Option<&str>) -> DynamicArtefact {
    DynamicArtefact {
        step_id: step.into(),
        glob: glob.map(|g| w.at(g)),
        file: file.map(|f| w.at(f)),
        record: w.at(&format!("run/.warpline/{step}.artefacts.json")),
    }
}

fn step(w: &Workdir, id: &str, script: &str) -> StepSpec {
    let mut spec = w.sh(script, 30);
    spec.step_id = id.into();
    spec.log_dir = w.at(&format!("logs/{id}"));
    spec.artefacts = BTreeMap::new();
    spec
}

#[tokio::test]
async fn dynamic_artefacts_are_found_checked_and_passed_on() {
    let w = Workdir::new();
    // EXTRACT decides its output's name; PROFILE reports its own in a JSON file.
    let mut extract = step(
        &w,
        "EXTRACT",
        r#"mkdir -p out && echo "a,b" > "out/report-$(date +%s).csv"; echo "{\"meta\": \"meta.json\"}" > "$WARPLINE_ARTEFACTS_FILE"; echo '{}' > meta.json"#,
    );
    extract.dynamic_artefacts = BTreeMap::from([
        (
            "report".into(),
            dynamic(&w, "EXTRACT", Some("run/out/report-*.csv"), None),
        ),
        (
            "meta".into(),
            dynamic(&w, "EXTRACT", None, Some("logs/EXTRACT/artefacts.json")),
        ),
    ]);
    extract.validations = vec![warpline_shared::contracts::Validation {
        name: "report is not empty".into(),
        severity: Default::default(),
        check: warpline_shared::contracts::CheckSpec::FileSizeMin {
            path: "{artefacts.report}".into(),
            min_bytes: 2,
        },
    }];
    extract.deferred = vec!["validations[0].path".into()];
    let outcome = run_step(&extract, &config(), &CancellationToken::new()).await;
    assert_eq!(
        outcome.report.status,
        ReportStatus::Pass,
        "{:#?}",
        outcome.report
    );
    let report = &outcome.result.artefacts["report"];
    assert!(report.starts_with(&w.at("run/out/report-")), "{report}");
    assert_eq!(outcome.result.artefacts["meta"], w.at("run/meta.json"));
    assert!(outcome.report.checks[0].detail.contains(report.as_str()));

    // A later step reads them from the record.
    let mut load = step(
        &w,
        "LOAD",
        r#"cat "$0" > copy.csv; echo "$META" > meta-path"#,
    );
    load.args.push("{artefacts.report}".into());
    load.env.insert("META".into(), "{artefacts.meta}".into());
    load.deferred = vec!["args[2]".into(), "env.META".into()];
    load.dynamic_artefacts = extract.dynamic_artefacts.clone();
    let outcome = run_step(&load, &config(), &CancellationToken::new()).await;
    assert_eq!(outcome.result.exit_code, 0, "{:?}", outcome.result.error);
    assert_eq!(w.read("run/copy.csv"), "a,b\n");
    assert_eq!(w.read("run/meta-path").trim(), w.at("run/meta.json"));

    // Two matches are ambiguous; none is missing output. Both fail the step's report. (The
    // step runs again without writing a report of its own: one named after a later second
    // would make three.)
    std::fs::write(w.root().join("run/out/report-2.csv"), "x").unwrap();
    let mut again = extract.clone();
    again.args[1] = r#"echo "{\"meta\": \"meta.json\"}" > "$WARPLINE_ARTEFACTS_FILE""#.into();
    let outcome = run_step(&again, &config(), &CancellationToken::new()).await;
    assert_eq!(outcome.report.status, ReportStatus::Fail);
    let c = &outcome.report.checks[0];
    assert_eq!(
        (c.name.as_str(), c.kind.as_str()),
        ("artefact(report)", "file_exists")
    );
    assert!(c.detail.contains("matched 2 files"), "{}", c.detail);
    let mut none = extract.clone();
    none.args[1] = "true".into();
    none.dynamic_artefacts.remove("meta");
    none.dynamic_artefacts.insert(
        "report".into(),
        dynamic(&w, "EXTRACT", Some("run/nothing-*.csv"), None),
    );
    let outcome = run_step(&none, &config(), &CancellationToken::new()).await;
    assert!(outcome.report.checks[0].detail.contains("matched no file"));
    assert_eq!(outcome.report.status, ReportStatus::Fail);
}
