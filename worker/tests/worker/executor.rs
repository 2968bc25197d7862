//! The executor against real processes: timeouts and cancellation kill the whole process group,
//! output of any size is streamed to disk with a bounded tail, refusals spawn nothing, and the
//! validators see what the tool did.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use warpline_executor::reaper::Reaper;
use warpline_executor::{CANCELLED_ERROR, EXECUTOR_CHECK_KIND, run_step, unrunnable};
use warpline_shared::contracts::{
    CheckSpec, LogStream, ReportStatus, Severity, StepSpec, Validation,
};
use warpline_shared::validate;

use crate::support::{Workdir, config, pid_gone, read_pid, wait_gone};

#[tokio::test]
async fn success_reports_everything() {
    let w = Workdir::new();
    let mut spec = w.sh(
        r#"echo "greeting=$GREETING"; pwd; echo "to stderr" >&2; printf draft > draft.yaml"#,
        30,
    );
    spec.env = BTreeMap::from([("GREETING".to_string(), "hello".to_string())]);
    let outcome = run_step(&spec, &config(), &CancellationToken::new()).await;
    let r = &outcome.result;

    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(r.signal, None);
    assert!(!r.timed_out);
    assert_eq!(r.error, None);
    assert_eq!(r.step_id, "EXTRACT");
    assert_eq!(r.run_id, Some(spec.run_id));
    assert_eq!(r.attempt_id, Some(spec.attempt_id));
    assert_eq!(r.attempt, 1);
    assert_eq!(r.worker_id, "test-worker");
    assert_eq!(r.artefacts, spec.artefacts);
    let (started, finished) = (r.started_at.unwrap(), r.finished_at.unwrap());
    assert!(started <= finished);
    assert_eq!(
        r.stdout_path.as_deref(),
        Some(w.at("logs/1/stdout.log").as_str())
    );
    assert_eq!(
        r.stderr_path.as_deref(),
        Some(w.at("logs/1/stderr.log").as_str())
    );

    // The tool ran in its (created) cwd, with the spec's env over the worker's.
    let stdout = w.read("logs/1/stdout.log");
    assert_eq!(stdout, format!("greeting=hello\n{}\n", w.at("run")));
    assert_eq!(w.read("logs/1/stderr.log"), "to stderr\n");
    assert_eq!(w.read("run/draft.yaml"), "draft");
    assert_eq!(r.log_tail, format!("{stdout}[--- stderr ---]\nto stderr\n"));
    assert_eq!(outcome.report.status, ReportStatus::Pass);
    assert!(outcome.report.checks.is_empty());
}

#[tokio::test]
async fn exit_codes_and_signals_are_mapped() {
    let w = Workdir::new();
    let cfg = config();
    let cancel = CancellationToken::new();

    let r = run_step(&w.sh("exit 3", 30), &cfg, &cancel).await.result;
    assert_eq!((r.exit_code, r.signal), (3, None));
    assert!(!r.succeeded());
    assert_eq!(r.error, None);

    let r = run_step(&w.sh("kill -KILL $$", 30), &cfg, &cancel)
        .await
        .result;
    assert_eq!((r.exit_code, r.signal), (137, Some(9)));
    assert!(!r.timed_out);

    let r = run_step(&w.sh("kill -TERM $$", 30), &cfg, &cancel)
        .await
        .result;
    assert_eq!((r.exit_code, r.signal), (143, Some(15)));
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let w = Workdir::new();
    let cfg = config();
    // The grandchild does not hold the log pipes and the shell execs the tool, so only a signal
    // to the whole group can reach the grandchild.
    let spec = w.sh(
        "sleep 300 >/dev/null 2>&1 & echo $! > grandchild.pid; echo $$ > tool.pid; exec sleep 300",
        1,
    );
    let start = Instant::now();
    let outcome = run_step(&spec, &cfg, &CancellationToken::new()).await;
    let elapsed = start.elapsed();
    let r = &outcome.result;

    assert!(r.timed_out, "{r:?}");
    assert_eq!((r.exit_code, r.signal), (143, Some(15)), "{r:?}");
    assert_eq!(r.error, None);
    assert!(!r.succeeded());
    assert!(
        elapsed < Duration::from_secs(1) + cfg.kill_grace + Duration::from_secs(3),
        "took {elapsed:?}"
    );
    assert!(elapsed >= Duration::from_secs(1), "took {elapsed:?}");
    assert!(r.duration_ms >= 1000, "{}", r.duration_ms);
    let grandchild = read_pid(&w.root().join("run/grandchild.pid"), Duration::ZERO);
    let tool = read_pid(&w.root().join("run/tool.pid"), Duration::ZERO);
    assert!(
        wait_gone(tool, Duration::from_secs(1)),
        "tool {tool} survived"
    );
    assert!(
        wait_gone(grandchild, Duration::from_secs(1)),
        "grandchild {grandchild} survived the timeout"
    );
}

#[tokio::test]
async fn a_group_that_ignores_sigterm_is_killed_after_the_grace() {
    let w = Workdir::new();
    let cfg = config();
    // An ignored signal stays ignored across exec, so the `sleep` ignores SIGTERM too.
    let spec = w.sh(
        "trap '' TERM; sleep 300 >/dev/null 2>&1 & echo $! > grandchild.pid; exec sleep 300",
        1,
    );
    let start = Instant::now();
    let r = run_step(&spec, &cfg, &CancellationToken::new())
        .await
        .result;
    let elapsed = start.elapsed();

    assert!(r.timed_out);
    assert_eq!((r.exit_code, r.signal), (137, Some(9)), "{r:?}");
    assert!(
        elapsed >= Duration::from_secs(1) + cfg.kill_grace,
        "SIGKILL came before the grace: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(1) + cfg.kill_grace + Duration::from_secs(3),
        "took {elapsed:?}"
    );
    let grandchild = read_pid(&w.root().join("run/grandchild.pid"), Duration::ZERO);
    assert!(wait_gone(grandchild, Duration::from_secs(1)));
}

#[tokio::test]
async fn cancel_kills_the_tool() {
    let w = Workdir::new();
    let cfg = config();
    let cancel = CancellationToken::new();
    let spec = w.sh("echo $$ > tool.pid; echo started; sleep 300", 60);
    let canceller = {
        let cancel = cancel.clone();
        let pid_file = w.root().join("run/tool.pid");
        tokio::spawn(async move {
            tokio::task::spawn_blocking(move || read_pid(&pid_file, Duration::from_secs(10)))
                .await
                .unwrap();
            cancel.cancel();
        })
    };
    let start = Instant::now();
    let outcome = run_step(&spec, &cfg, &cancel).await;
    let elapsed = start.elapsed();
    canceller.await.unwrap();
    let r = &outcome.result;

    assert_eq!(r.error.as_deref(), Some(CANCELLED_ERROR));
    assert_eq!(r.error.as_deref(), Some("cancelled: worker shutting down"));
    assert!(!r.timed_out);
    assert_eq!((r.exit_code, r.signal), (143, Some(15)), "{r:?}");
    assert!(!r.succeeded());
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert_eq!(r.log_tail, "started\n");
    let tool = read_pid(&w.root().join("run/tool.pid"), Duration::ZERO);
    assert!(
        wait_gone(tool, Duration::from_secs(1)),
        "tool {tool} survived"
    );
}

#[tokio::test]
async fn an_attempt_cancelled_before_it_starts_spawns_nothing() {
    let w = Workdir::new();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let outcome = run_step(&w.sh("touch ran", 30), &config(), &cancel).await;
    assert_eq!(outcome.result.error.as_deref(), Some(CANCELLED_ERROR));
    assert_eq!(outcome.result.exit_code, -1);
    assert_eq!(outcome.report.status, ReportStatus::Fail);
    assert!(!w.root().join("run").exists());
}

#[tokio::test]
async fn a_background_child_holding_the_pipes_does_not_hang_the_attempt() {
    let w = Workdir::new();
    let spec = w.sh("sleep 300 & echo $! > bg.pid; echo done", 60);
    let start = Instant::now();
    let r = run_step(&spec, &config(), &CancellationToken::new())
        .await
        .result;
    let elapsed = start.elapsed();

    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
    assert_eq!(w.read("logs/1/stdout.log"), "done\n");
    let bg = read_pid(&w.root().join("run/bg.pid"), Duration::ZERO);
    assert!(
        wait_gone(bg, Duration::from_secs(1)),
        "background child {bg} survived"
    );
}

/// Peak resident memory of this test process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test]
async fn huge_output_streams_to_disk_with_a_bounded_tail() {
    const BYTES: u64 = 300_000_000;
    let w = Workdir::new();
    let mut cfg = config();
    cfg.tail_bytes = 10_000;
    let spec = w.sh(
        &format!("head -c {BYTES} /dev/zero | tr '\\0' 'x'; echo; echo tail-of-stderr >&2"),
        120,
    );
    let outcome = run_step(&spec, &cfg, &CancellationToken::new()).await;
    let r = &outcome.result;

    assert_eq!(r.exit_code, 0, "{r:?}");
    let size = std::fs::metadata(w.root().join("logs/1/stdout.log"))
        .unwrap()
        .len();
    assert_eq!(size, BYTES + 1);
    assert!(
        r.log_tail.len() <= cfg.tail_bytes + 100,
        "log tail holds {} bytes",
        r.log_tail.len()
    );
    assert!(
        r.log_tail.starts_with(&format!(
            "[... {} bytes of stdout omitted ...]\nxxx",
            BYTES + 1 - (cfg.tail_bytes - "tail-of-stderr\n".len()) as u64
        )),
        "{}",
        &r.log_tail[..100]
    );
    assert!(
        r.log_tail
            .ends_with("x\n[--- stderr ---]\ntail-of-stderr\n")
    );
    // The output never sat in memory: far less than 300 MB was ever resident.
    let peak = peak_rss();
    assert!(peak < 150_000_000, "peak RSS {peak} bytes");
}

#[tokio::test]
async fn a_command_off_the_allowlist_is_refused_without_spawning() {
    let w = Workdir::new();
    let spec = w.spec("touch", &["marker"], 30);
    let outcome = run_step(&spec, &config(), &CancellationToken::new()).await;
    let r = &outcome.result;

    assert_eq!(r.exit_code, -1);
    assert_eq!(
        r.error.as_deref(),
        Some("command `touch` is not on this worker's allowlist (allowed: `echo`, `head`, `sh`)")
    );
    assert!(!r.succeeded());
    assert_eq!(r.started_at, None);
    assert_eq!(r.stdout_path, None);
    assert_eq!(r.run_id, Some(spec.run_id));
    assert!(!w.root().join("run").exists(), "cwd was created");
    assert!(!w.root().join("logs").exists(), "log dir was created");
    assert_eq!(outcome.report.status, ReportStatus::Fail);
    assert_eq!(outcome.report.checks.len(), 1);
    assert_eq!(outcome.report.checks[0].kind, EXECUTOR_CHECK_KIND);
    assert!(!outcome.report.checks[0].passed);
}

/// One way to break a spec.
type Edit = Box<dyn Fn(&mut StepSpec)>;

#[tokio::test]
async fn paths_outside_the_workdir_are_refused() {
    let w = Workdir::new();
    let marker = "touch escaped";
    let cases: Vec<(&str, Edit)> = vec![
        (
            "cwd",
            Box::new(|s| s.cwd = format!("{}/../elsewhere", s.workdir)),
        ),
        (
            "log_dir",
            Box::new(|s| s.log_dir = "/tmp/warpline-logs".into()),
        ),
        (
            "artefacts.draft",
            Box::new(|s| {
                s.artefacts
                    .insert("draft".into(), format!("{}/run/../../x", s.workdir));
            }),
        ),
        (
            "validations[0].path",
            Box::new(|s| {
                s.validations.push(Validation {
                    name: "passwd".into(),
                    severity: Severity::Error,
                    check: CheckSpec::FileExists {
                        path: "/etc/passwd".into(),
                    },
                });
            }),
        ),
        (
            "validations[0].glob",
            Box::new(|s| {
                s.validations.push(Validation {
                    name: "up".into(),
                    severity: Severity::Warn,
                    check: CheckSpec::FileCount {
                        glob: format!("{}/**/../*", s.workdir),
                        min: None,
                        max: None,
                    },
                });
            }),
        ),
        (
            "validations[0].glob",
            Box::new(|s| {
                s.validations.push(Validation {
                    name: "sibling".into(),
                    severity: Severity::Warn,
                    check: CheckSpec::FileCount {
                        glob: format!("{}-other/*", s.workdir),
                        min: None,
                        max: None,
                    },
                });
            }),
        ),
    ];
    for (field, edit) in cases {
        let mut spec = w.sh(marker, 30);
        edit(&mut spec);
        let outcome = run_step(&spec, &config(), &CancellationToken::new()).await;
        let r = &outcome.result;
        let error = r.error.as_deref().unwrap_or_default();
        assert_eq!(r.exit_code, -1, "{field}: {r:?}");
        assert!(error.starts_with(&format!("{field} `")), "{field}: {error}");
        assert!(
            error.contains("is not under workdir") || error.contains("after a wildcard"),
            "{error}"
        );
        assert_eq!(outcome.report.status, ReportStatus::Fail);
        assert!(
            !w.root().join("run/escaped").exists(),
            "{field}: the tool ran"
        );
    }

    // `..` that stays inside the workdir is fine.
    let mut spec = w.sh("true", 30);
    spec.cwd = format!("{}/a/../run", spec.workdir);
    let r = run_step(&spec, &config(), &CancellationToken::new())
        .await
        .result;
    assert_eq!(r.exit_code, 0, "{r:?}");

    // An input root admits artefacts and checked paths under it, never the cwd or logs.
    let inputs = tempfile::tempdir().unwrap();
    let reference = inputs.path().join("reference.yaml");
    std::fs::write(&reference, "x").unwrap();
    let mut spec = w.sh("true", 30);
    spec.input_roots = vec![inputs.path().display().to_string()];
    spec.artefacts
        .insert("reference".into(), reference.display().to_string());
    spec.validations.push(Validation {
        name: "reference".into(),
        severity: Severity::Error,
        check: CheckSpec::FileExists {
            path: reference.display().to_string(),
        },
    });
    let out = run_step(&spec, &config(), &CancellationToken::new()).await;
    assert_eq!(out.result.exit_code, 0, "{:?}", out.result);
    assert!(out.report.checks[0].passed, "{:?}", out.report);
    spec.cwd = inputs.path().display().to_string();
    let r = run_step(&spec, &config(), &CancellationToken::new())
        .await
        .result;
    assert!(
        r.error.as_deref().unwrap_or("").contains("cwd"),
        "cwd under an input root must be refused: {r:?}"
    );
}

/// A submitted pipeline (or a submitted `--var`) cannot point an allowed tool at a file outside
/// the run: `head` reading a secret beside the workdir is refused before anything spawns, in
/// every spelling of the path, and the worker's `--path-root` or `--unconfined-args` lets it.
#[tokio::test]
async fn argument_paths_outside_the_run_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "s3cr3t").unwrap();
    let w = Workdir::new();
    std::fs::create_dir_all(w.root().join("run")).unwrap();
    let secret_s = secret.display().to_string();
    // From the run's cwd (`<workdir>/run`), climb out of the workdir to the secret.
    let climbs = format!(
        "{}{}",
        "../".repeat(w.root().components().count()),
        secret_s.trim_start_matches('/')
    );
    // Written under the workdir, decoded outside it: `%2e%2e` is `..` once the URL is opened.
    let dotted = format!("file://{}/run/%2e%2e/%2E%2E{secret_s}", w.root().display());
    let flag = format!("--file={secret_s}");
    let url = format!("file://{secret_s}");
    // A short option glued to its value, and a `name=value` operand (as `dd if=`).
    let glued = format!("-o{secret_s}");
    let glued_url = format!("-ofile://{secret_s}");
    let operand = format!("if={secret_s}");
    let cases = [
        (vec!["-c", "10", glued.as_str()], 2, secret_s.clone()),
        (vec!["-c", "10", glued_url.as_str()], 2, secret_s.clone()),
        (vec!["-c", "10", operand.as_str()], 2, secret_s.clone()),
        (vec!["-c", "10", secret_s.as_str()], 2, secret_s.clone()),
        (vec!["-c", "10", climbs.as_str()], 2, secret_s.clone()),
        (vec!["-c", "10", flag.as_str()], 2, secret_s.clone()),
        (vec!["-c", "10", url.as_str()], 2, secret_s.clone()),
        (vec!["-c", "10", dotted.as_str()], 2, String::new()),
    ];
    for (args, index, path) in &cases {
        let spec = w.spec("head", args, 30);
        let r = run_step(&spec, &config(), &CancellationToken::new())
            .await
            .result;
        let err = r.error.clone().unwrap_or_default();
        assert_eq!(r.exit_code, -1, "{args:?} must be refused: {r:?}");
        assert!(r.started_at.is_none(), "{args:?} spawned: {r:?}");
        assert!(
            err.starts_with(&format!("args[{index}]")) && err.contains("--path-root"),
            "{args:?}: {err}"
        );
        if !path.is_empty() {
            assert!(err.contains(&format!("names `{path}`")), "{args:?}: {err}");
        }
    }

    // Paths inside the run, devices, and words that are not paths all run.
    std::fs::write(w.root().join("run/in.txt"), "inside").unwrap();
    let inside = w.root().join("run/in.txt").display().to_string();
    for args in [
        vec!["-c", "3", inside.as_str()],
        vec!["-c", "3", "in.txt"],
        vec!["-c", "0", "/dev/null"],
        vec!["-c", "3", "../run/in.txt"],
        vec!["-c3", "in.txt"],
    ] {
        let r = run_step(
            &w.spec("head", &args, 30),
            &config(),
            &CancellationToken::new(),
        )
        .await
        .result;
        assert_eq!(r.exit_code, 0, "{args:?} must run: {r:?}");
    }

    // The operator widens or lifts the confinement.
    let mut cfg = config();
    cfg.path_roots = vec![outside.path().to_path_buf()];
    let spec = w.spec("head", &["-c", "6", &secret_s], 30);
    let out = run_step(&spec, &cfg, &CancellationToken::new()).await;
    assert_eq!(out.result.exit_code, 0, "{:?}", out.result);
    let mut cfg = config();
    cfg.confine_args = false;
    let out = run_step(&spec, &cfg, &CancellationToken::new()).await;
    assert_eq!(out.result.exit_code, 0, "{:?}", out.result);

    // The script an allowlist entry pins is the operator's own, wherever it lives.
    let script = outside.path().join("tool.sh");
    std::fs::write(&script, "echo pinned\n").unwrap();
    let mut cfg = config();
    cfg.allowlist = [format!("sh {}", script.display())].into();
    let out = run_step(
        &w.spec("sh", &[&script.display().to_string()], 30),
        &cfg,
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(out.result.exit_code, 0, "{:?}", out.result);
}

#[tokio::test]
async fn spawn_failures_are_reported_like_a_shell() {
    let w = Workdir::new();
    let mut cfg = config();
    cfg.allowlist.insert("warpline-no-such-tool".into());
    cfg.allowlist.insert("not-executable".into());
    let tools = w.root().join("bin");
    std::fs::create_dir(&tools).unwrap();
    std::fs::write(tools.join("not-executable"), "#!/bin/sh\necho hi\n").unwrap();
    cfg.tools_dirs = vec![tools.clone()];

    let outcome = run_step(
        &w.spec("warpline-no-such-tool", &[], 30),
        &cfg,
        &CancellationToken::new(),
    )
    .await;
    let r = &outcome.result;
    assert_eq!(r.exit_code, 127);
    let error = r.error.as_deref().unwrap();
    assert!(
        error.starts_with("command `warpline-no-such-tool` not found (looked in "),
        "{error}"
    );
    assert!(error.contains(&tools.display().to_string()), "{error}");
    assert_eq!(outcome.report.status, ReportStatus::Fail);

    let r = run_step(
        &w.spec("not-executable", &[], 30),
        &cfg,
        &CancellationToken::new(),
    )
    .await
    .result;
    assert_eq!(r.exit_code, 126, "{r:?}");
    assert!(
        r.error.as_deref().unwrap().contains("cannot be executed"),
        "{r:?}"
    );
}

#[tokio::test]
async fn validators_run_on_the_outcome() {
    let w = Workdir::new();
    let check = |name: &str, severity, check| Validation {
        name: name.into(),
        severity,
        check,
    };
    let mut spec = w.sh(
        "echo 'loaded 42 rows'; echo 'WARNING: slow mirror' >&2; printf 'a,b\\n' > out.csv",
        30,
    );
    spec.validations = vec![
        check(
            "rows loaded",
            Severity::Error,
            CheckSpec::LogRegexPresent {
                pattern: r"loaded \d+ rows".into(),
                stream: LogStream::Stdout,
            },
        ),
        check(
            "csv written",
            Severity::Error,
            CheckSpec::FileSizeMin {
                path: w.at("run/out.csv"),
                min_bytes: 4,
            },
        ),
        check(
            "no warnings",
            Severity::Warn,
            CheckSpec::LogRegexAbsent {
                pattern: "WARNING".into(),
                stream: LogStream::Both,
            },
        ),
    ];
    let outcome = run_step(&spec, &config(), &CancellationToken::new()).await;
    let checks = &outcome.report.checks;
    assert_eq!(outcome.report.status, ReportStatus::Pass, "{checks:?}");
    assert!(checks[0].passed);
    assert_eq!(
        checks[0].detail,
        "line 1 of stdout matches `loaded \\d+ rows`: loaded 42 rows"
    );
    assert!(checks[1].passed);
    assert!(checks[1].detail.contains("4 bytes"), "{}", checks[1].detail);
    assert!(!checks[2].passed);
    assert_eq!(
        checks[2].detail,
        "line 1 of stderr matches `WARNING`: WARNING: slow mirror"
    );

    // The same checks fail when the tool does not produce what they expect.
    spec.args = vec!["-c".into(), "echo nothing".into()];
    spec.log_dir = w.at("logs/2");
    std::fs::remove_file(Path::new(&w.at("run/out.csv"))).unwrap();
    let outcome = run_step(&spec, &config(), &CancellationToken::new()).await;
    assert_eq!(outcome.report.status, ReportStatus::Fail);
    assert_eq!(
        outcome.report.checks[0].detail,
        "no line of stdout (1 line) matches `loaded \\d+ rows`"
    );
    assert!(
        outcome.report.checks[1]
            .detail
            .ends_with("does not exist (minimum 4 bytes)"),
        "{}",
        outcome.report.checks[1].detail
    );
    assert!(outcome.report.checks[2].passed);
}

#[test]
fn zombie_probe_sees_live_processes() {
    // The probe used above must be able to say "alive", or the kill tests prove nothing.
    assert!(!pid_gone(std::process::id() as i32));
}

#[tokio::test]
async fn a_failure_is_classified_with_its_line_number_in_the_log_file() {
    let w = Workdir::new();
    // 5000 lines of progress, far more than the 4 KiB tail keeps, then the cause and noise.
    let spec = w.sh(
        r#"i=0; while [ $i -lt 5000 ]; do echo "row $i ok" >&2; i=$((i+1)); done
           echo "requests.exceptions.HTTPError: 503 Server Error: Service Unavailable for url: http://x/" >&2
           echo "Error: 1" >&2; exit 1"#,
        30,
    );
    let mut cfg = config();
    cfg.tail_bytes = 4096;
    let outcome = run_step(&spec, &cfg, &CancellationToken::new()).await;
    let f = outcome
        .result
        .failure
        .expect("a failed attempt is classified");
    assert_eq!(f.class, warpline_shared::contracts::FailureClass::Transient);
    let line = f.line.unwrap();
    assert_eq!(line.stream, LogStream::Stderr);
    assert_eq!(line.line, 5001, "{line:?}");
    assert!(line.text.contains("503 Server Error"), "{line:?}");
    let log = w.read("logs/1/stderr.log");
    assert_eq!(
        log.lines().nth(5000).unwrap(),
        "requests.exceptions.HTTPError: 503 Server Error: Service Unavailable for url: http://x/"
    );

    // A clean attempt carries no classification.
    let ok = run_step(&w.sh("echo fine", 30), &cfg, &CancellationToken::new()).await;
    assert!(ok.result.failure.is_none());
}

#[tokio::test]
async fn sql_checks_run_their_query_and_never_report_the_url() {
    let w = Workdir::new();
    let url = "postgres://postgres@127.0.0.1:5432/postgres";
    let sql = |name: &str, query: &str, env: &str, min: Option<f64>| Validation {
        name: name.into(),
        severity: Severity::Error,
        check: CheckSpec::Sql {
            query: query.into(),
            database_url_env: env.into(),
            database_url_default: None,
            search_path_env: Some("WARPLINE_TEST_SCHEMA".into()),
            search_path_default: None,
            min,
            max: None,
            equals: None,
            timeout_s: 10,
        },
    };
    let mut spec = w.sh("true", 30);
    spec.env = BTreeMap::from([
        ("WARPLINE_TEST_DB".to_string(), url.to_string()),
        (
            "WARPLINE_TEST_DOWN_DB".to_string(),
            "postgres://postgres@127.0.0.1:1/postgres".to_string(),
        ),
        (
            "WARPLINE_TEST_SCHEMA".to_string(),
            "gate_schema".to_string(),
        ),
    ]);
    spec.validations = vec![
        sql(
            "few",
            "SELECT count(*) FROM generate_series(1, 42)",
            "WARPLINE_TEST_DB",
            Some(100.0),
        ),
        sql(
            "enough",
            "SELECT count(*) FROM generate_series(1, 420)",
            "WARPLINE_TEST_DB",
            Some(100.0),
        ),
        sql(
            "path",
            "SELECT current_setting('search_path')",
            "WARPLINE_TEST_DB",
            None,
        ),
        sql("unset", "SELECT 1", "WARPLINE_TEST_NO_SUCH_VAR", None),
        sql(
            "broken",
            "SELECT count(*) FROM no_such_table",
            "WARPLINE_TEST_DB",
            Some(1.0),
        ),
        sql("down", "SELECT 1", "WARPLINE_TEST_DOWN_DB", Some(1.0)),
    ];
    let outcome = run_step(&spec, &config(), &CancellationToken::new()).await;
    let c = &outcome.report.checks;
    assert!(!c[0].passed);
    assert_eq!(c[0].detail, "the query returned 42 (minimum 100)");
    assert_eq!(c[0].value, Some(42.0));
    assert!(c[1].passed, "{}", c[1].detail);
    assert_eq!(c[2].detail, "the query returned `gate_schema`");
    assert!(!c[3].passed);
    assert!(
        c[3].detail
            .contains("`WARPLINE_TEST_NO_SUCH_VAR` is not set"),
        "{}",
        c[3].detail
    );
    assert!(!c[4].passed);
    assert!(
        c[4].detail
            .contains("relation \"no_such_table\" does not exist"),
        "{}",
        c[4].detail
    );
    // A query that reached the database and failed is a verdict; one that never reached it
    // measured nothing (the supervisor retries it rather than halting on bad data).
    assert!(!validate::measured_nothing(&c[4].kind, &c[4].detail));
    assert!(!c[5].passed);
    assert!(
        validate::measured_nothing(&c[5].kind, &c[5].detail)
            && c[5].detail.contains("(cannot connect)"),
        "{}",
        c[5].detail
    );
    assert_eq!(outcome.report.status, ReportStatus::Fail);
    let json = serde_json::to_string(&outcome).unwrap();
    assert!(!json.contains("127.0.0.1:5432"), "the URL leaked: {json}");
}

#[tokio::test]
async fn without_its_reaper_a_worker_runs_nothing() {
    // `true` as the reaper: it exits at once, as a reaper the OOM killer took would.
    let reaper = Arc::new(Reaper::start(Path::new("true"), &[]).unwrap());
    reaper.exited().cancelled().await;
    assert!(!reaper.alive());
    let w = Workdir::new();
    let mut cfg = config();
    cfg.reaper = Some(reaper);
    let spec = w.sh("echo $$ > tool.pid; exec sleep 300", 30);

    // A worker hands the step back...
    let reason = unrunnable(&spec, &cfg).expect("handed back");
    assert!(reason.contains("lost its reaper"), "{reason}");
    // ...and a step run anyway fails without leaving its tool running.
    let outcome = run_step(&spec, &cfg, &CancellationToken::new()).await;
    let error = outcome.result.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("cannot register its process group with this worker's reaper"),
        "{error}"
    );
    assert_eq!(outcome.result.exit_code, -1);
    assert_eq!(outcome.report.status, ReportStatus::Fail);
}
