//! The `warpline` operator commands (the real binary) against the in-process coordinator:
//! submit --wait, status, escalations, resolve, watch, retry-failed, reprocess, cancel, and the errors an
//! operator sees.

use std::process::Output;

use serde_json::{Value, json};

use crate::support::*;

/// Runs `warpline ARGS` with `WARPLINE_API_URL` pointing at `api`.
async fn warpline(api: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_warpline"));
    cmd.args(args)
        .env("WARPLINE_API_URL", api)
        .env_remove("USER");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.unwrap()
}

fn context(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_follows_to_the_end_and_status_shows_it() {
    let srv = Server::start().await;
    let file = srv.pipeline(
        "cli_ok",
        json!([
            {"id": "FIRST", "command": "sh", "args": ["-c", "sleep 0.2"]},
            {"id": "SECOND", "command": "sh", "args": ["-c", "true"]},
        ]),
    );
    let out = warpline(
        &srv.url,
        &[
            "submit",
            &file,
            "--months",
            "2024-01..2024-03",
            "--order",
            "desc",
            "--max-parallel",
            "2",
            "--wait",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    let id = stdout(&out).trim().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{}", context(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("submitted backfill {id}: 3 runs")),
        "{err}"
    );
    assert!(err.contains("3/3 final: 3 COMPLETE"), "{err}");
    assert!(err.contains("finished: 3 runs: 3 COMPLETE"), "{err}");

    let out = warpline(&srv.url, &["status", &id], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    let text = stdout(&out);
    assert!(text.contains("of `cli_ok`: finished"), "{text}");
    assert!(text.contains("runs: 3 — 3 COMPLETE"), "{text}");
    let first = text.lines().find(|l| l.starts_with("FIRST")).unwrap();
    // STEP RUNNING PASSED HALTED ESCALATED ATTEMPTS
    assert_eq!(
        first.split_whitespace().collect::<Vec<_>>(),
        ["FIRST", "0", "3", "0", "0", "3"],
        "{text}"
    );

    let out = warpline(&srv.url, &["status", &id, "--json"], &[]).await;
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["counts"], json!({"COMPLETE": 3}));
    assert_eq!(summary["runs"][0]["partition"], "2024-03");

    let out = warpline(&srv.url, &["status"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    let row = stdout(&out)
        .lines()
        .find(|l| l.starts_with(&id))
        .map(String::from);
    let row = row.unwrap_or_else(|| panic!("{}", context(&out)));
    assert!(row.contains("cli_ok") && row.contains("finished"), "{row}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_resolves_an_escalation_from_the_command_line() {
    let srv = Server::start().await;
    let file = srv.pipeline(
        "cli_escalate",
        json!([{
            "id": "ODD", "command": "sh",
            "args": ["-c", "if [ {attempt} -ge 2 ]; then exit 0; fi; echo something odd; exit 3"],
        }]),
    );
    let out = warpline(&srv.url, &["submit", &file, "--months", "2024-07"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    let id = stdout(&out).trim().to_string();
    srv.wait_finished(&id).await;

    let out = warpline(&srv.url, &["escalations"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    let row = stdout(&out).lines().nth(1).unwrap_or_default().to_string();
    assert!(
        row.contains(&id) && row.contains("2024-07") && row.contains("ODD"),
        "{}",
        context(&out)
    );
    let run = row.split_whitespace().next().unwrap().to_string();

    let out = warpline(&srv.url, &["status", &id], &[]).await;
    assert!(
        stdout(&out).contains("escalations (1;"),
        "{}",
        context(&out)
    );

    // No reason, or no operator: refused before anything is sent.
    let out = warpline(
        &srv.url,
        &[
            "resolve",
            &run,
            "--action",
            "retry",
            "--reason",
            " ",
            "--operator",
            "ana",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", context(&out));
    assert!(
        stderr(&out).contains("--reason must not be empty"),
        "{}",
        context(&out)
    );
    // No $USER is no longer an error: with no token the coordinator audits `local` (see the
    // auth e2e tests); here $USER names the operator.
    // The operator defaults to $USER.
    let out = warpline(
        &srv.url,
        &[
            "resolve",
            &run,
            "--action",
            "retry",
            "--reason",
            "the source was republished",
        ],
        &[("USER", "bob")],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    assert!(
        stdout(&out).contains("retry by bob; now ODD"),
        "{}",
        context(&out)
    );

    let out = warpline(&srv.url, &["watch", &id], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    assert!(stderr(&out).contains("1 COMPLETE"), "{}", context(&out));
    let audit = std::fs::read_to_string(srv.dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains(r#""operator":"bob""#), "{audit}");

    // Answering again is refused by the engine, and the message says why.
    let out = warpline(
        &srv.url,
        &[
            "resolve",
            &run,
            "--action",
            "halt",
            "--reason",
            "late",
            "--operator",
            "ana",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", context(&out));
    assert!(stderr(&out).contains("HTTP 409"), "{}", context(&out));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_failed_and_cancel_from_the_command_line() {
    let srv = Server::start().await;
    let marker = srv.dir.path().join("fixed");
    let file = srv.pipeline(
        "cli_fixable",
        json!([{"id": "ONLY", "command": "sh",
                "args": ["-c", format!("test -f {} || (echo missing input; exit 2)", marker.display())]}]),
    );
    // --wait exits 1 when runs halt, and names them.
    let out = warpline(
        &srv.url,
        &[
            "submit",
            &file,
            "--months",
            "2024-01..2024-02",
            "--wait",
            "--json",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", context(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["counts"], json!({"HALTED": 2}));
    let id = summary["backfill_id"].as_str().unwrap().to_string();
    assert!(stderr(&out).contains("HALTED at ONLY"), "{}", context(&out));

    let out = warpline(&srv.url, &["status", &id], &[]).await;
    assert!(stdout(&out).contains("failures (2;"), "{}", context(&out));

    std::fs::write(&marker, "").unwrap();
    let out = warpline(&srv.url, &["retry-failed", &id], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    assert!(
        stdout(&out).contains("resumed 2 halted runs"),
        "{}",
        context(&out)
    );
    let out = warpline(&srv.url, &["watch", &id], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));

    // Both months completed: reprocess (`failed` by default) has nothing left; `all` runs both.
    let out = warpline(&srv.url, &["reprocess", &id], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", context(&out));
    assert!(
        stderr(&out).contains("nothing to run") && stderr(&out).contains("HTTP 409"),
        "{}",
        context(&out)
    );
    let prefix = &id[..13];
    let out = warpline(&srv.url, &["reprocess", prefix, "--mode", "all"], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    assert!(
        stdout(&out).contains(&format!("runs 2 partition(s) of backfill {id} again")),
        "{}",
        context(&out)
    );
    assert!(
        stderr(&out).contains("warpline watch "),
        "{}",
        context(&out)
    );

    let out = warpline(&srv.url, &["cancel", &id], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    assert!(stdout(&out).contains("cancelling"), "{}", context(&out));

    let unknown = uuid::Uuid::now_v7().to_string();
    let out = warpline(&srv.url, &["cancel", &unknown], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", context(&out));
    assert!(
        stderr(&out).contains(&format!("no backfill `{unknown}` (HTTP 404")),
        "{}",
        context(&out)
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_coordinator_is_named() {
    // A port nobody listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = warpline("http://unused.invalid", &["status", "--api", &url], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", context(&out));
    assert!(
        stderr(&out).contains(&format!(
            "cannot reach the coordinator at {url}: is `warpline serve` running?"
        )),
        "{}",
        context(&out)
    );
}

/// Runs `warpline ARGS` with its standard output a pipe whose reading end is closed before it
/// prints (as `| head` does once it has read enough).
async fn warpline_into_a_closed_pipe(args: &[&str]) -> Output {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warpline"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_audit_show_end_quietly_on_a_closed_pipe() {
    use std::os::unix::process::ExitStatusExt;
    let srv = Server::start().await;
    let file = srv.pipeline(
        "piped",
        json!([{"id": "A", "command": "sh", "args": ["-c", "true"]}]),
    );
    let id = srv.submit(&file, json!({"datasets": "a,b"})).await;
    let summary = srv.wait_finished(&id).await;
    let run = summary["runs"][0]["run_id"].as_str().unwrap().to_string();
    let audit = srv.dir.path().join("audit.jsonl");
    for args in [
        vec!["status", "--api", srv.url.as_str()],
        vec!["status", &id, "--api", srv.url.as_str()],
        vec!["audit", "show", &run, "--file", audit.to_str().unwrap()],
    ] {
        let out = warpline_into_a_closed_pipe(&args).await;
        let err = stderr(&out);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "`warpline {}` on a closed pipe:\n{}",
            args.join(" "),
            context(&out)
        );
        // Ended by SIGPIPE, as `cat` would be, or done before it noticed.
        assert!(
            out.status.signal() == Some(13) || out.status.code() == Some(0),
            "`warpline {}`: {:?}",
            args.join(" "),
            out.status
        );
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_help_does_not_print_the_passwords_in_its_environment() {
    let env = [
        (
            "WARPLINE_AMQP_URL",
            "amqp://fleet:amqp-s3cret@broker:5672/%2f",
        ),
        (
            "WARPLINE_DATABASE_URL",
            "postgres://fleet:pg-s3cret@db:5432/warpline",
        ),
    ];
    let out = warpline("http://unused.invalid", &["serve", "--help"], &env).await;
    assert_eq!(out.status.code(), Some(0), "{}", context(&out));
    let help = stdout(&out);
    assert!(help.contains("WARPLINE_DATABASE_URL"), "{help}");
    assert!(
        !help.contains("s3cret"),
        "`serve --help` printed a password from the environment:\n{help}"
    );
}
