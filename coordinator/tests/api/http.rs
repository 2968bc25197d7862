//! The routes: submit and follow, escalation and resolve, cancel, retry-failed, refused input,
//! unknown ids, readiness (a standby answers `/v1/*` 503 at once), body and partition limits,
//! idempotent submits, and the pipelines `serve` may restrict submits to.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_backfill_runs_to_completion_newest_month_first() {
    let srv = Server::start().await;
    let file = srv.pipeline(
        "two_steps",
        json!([
            {"id": "MAKE", "command": "sh", "args": ["-c", "echo {month} > out.txt"]},
            {"id": "CHECK", "command": "sh", "args": ["-c", "grep -q {month} out.txt"]},
        ]),
    );
    let body = json!({
        "pipeline_file": file,
        "pipeline": serde_json::from_str::<Value>(&std::fs::read_to_string(&file).unwrap()).unwrap(),
        "months": "2024-01..2024-03",
        "order": "desc",
        "max_parallel": 2,
        "priority": 5,
    });
    let (status, resp) = srv.post("/v1/backfills", body).await;
    assert_eq!(status, StatusCode::CREATED, "{resp}");
    assert_eq!(resp["runs"], 3);
    let id = resp["backfill_id"].as_str().unwrap().to_string();

    let summary = srv.wait_finished(&id).await;
    assert_eq!(summary["counts"], json!({"COMPLETE": 3}), "{summary:#}");
    assert_eq!(summary["steps"], json!(["MAKE", "CHECK"]));
    assert_eq!(summary["steps_executed"], 6);
    let order: Vec<&str> = summary["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["partition"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["2024-03", "2024-02", "2024-01"]);
    for r in summary["runs"].as_array().unwrap() {
        assert_eq!(r["attempts"], json!({"MAKE": 1, "CHECK": 1}), "{r}");
    }
    let out = srv.dir.path().join("two_steps/work/runs/2024-02/out.txt");
    assert_eq!(std::fs::read_to_string(out).unwrap().trim(), "2024-02");

    let (status, all) = srv.get("/v1/backfills").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["backfill_id"], id.as_str());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalation_resolved_with_retry_completes() {
    let srv = Server::start().await;
    // Attempt 1 exits 3, which the rules agent cannot classify; attempt 2 succeeds.
    let file = srv.pipeline(
        "escalate",
        json!([{
            "id": "ODD", "command": "sh",
            "args": ["-c", "if [ {attempt} -ge 2 ]; then exit 0; fi; echo something odd; exit 3"],
        }]),
    );
    let id = srv.submit(&file, json!({"months": "2024-05"})).await;
    let summary = srv.wait_finished(&id).await;
    assert_eq!(summary["counts"], json!({"ESCALATED": 1}), "{summary:#}");

    let (status, esc) = srv.get("/v1/escalations").await;
    assert_eq!(status, StatusCode::OK);
    let esc = esc.as_array().unwrap();
    assert_eq!(esc.len(), 1, "{esc:?}");
    assert_eq!(esc[0]["backfill_id"], id.as_str());
    assert_eq!(esc[0]["partition"], "2024-05");
    assert_eq!(esc[0]["step"], "ODD");
    assert_eq!(esc[0]["attempts"], 1);
    assert!(
        esc[0]["reason"].as_str().unwrap().contains("exit code 3"),
        "{esc:?}"
    );
    let run = esc[0]["run_id"].as_str().unwrap().to_string();
    let resolve = format!("/v1/runs/{run}/resolve");

    // Refused before the engine sees them.
    let (status, err) = srv
        .post(
            &resolve,
            json!({"action": "retry", "reason": "  ", "operator": "ana"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err["error"].as_str().unwrap().contains("reason"), "{err}");
    let (status, err) = srv
        .post(
            &resolve,
            json!({"action": "escalate", "reason": "r", "operator": "ana"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let (status, err) = srv
        .post(
            &resolve,
            json!({"action": "rerun", "reason": "r", "operator": "ana"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err["error"].as_str().unwrap().contains("action"), "{err}");
    let (status, err) = srv
        .post(
            &format!("/v1/runs/{}/resolve", Uuid::now_v7()),
            json!({"action": "retry", "reason": "r", "operator": "ana"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(err["error"].as_str().unwrap().contains("no run"), "{err}");

    let (status, ok) = srv
        .post(
            &resolve,
            json!({"action": "retry", "reason": "the source was republished", "operator": "ana"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    assert_eq!(ok["action"], "retry");
    let summary = srv
        .wait_for(&id, Duration::from_secs(30), |s| {
            s["counts"] == json!({"COMPLETE": 1})
        })
        .await;
    assert_eq!(run_of(&summary, "2024-05")["attempts"]["ODD"], 2);
    let (_, esc) = srv.get("/v1/escalations").await;
    assert_eq!(esc, json!([]));

    // The run is no longer escalated: the engine refuses a second answer.
    let (status, err) = srv
        .post(
            &resolve,
            json!({"action": "halt", "reason": "late", "operator": "ana"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_lets_running_steps_finish_and_starts_nothing_new() {
    let srv = Server::start().await;
    let file = srv.pipeline(
        "slow",
        json!([
            {"id": "SLOW", "command": "sh", "args": ["-c", "sleep 1"]},
            {"id": "NEXT", "command": "sh", "args": ["-c", "true"]},
        ]),
    );
    let id = srv
        .submit(
            &file,
            json!({"months": "2024-01..2024-06", "max_parallel": 2}),
        )
        .await;
    srv.wait_for(&id, Duration::from_secs(10), |s| {
        s["in_step"]["SLOW"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let (status, at_cancel) = srv
        .post(&format!("/v1/backfills/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{at_cancel}");
    assert_eq!(at_cancel["cancelling"], true);
    assert_eq!(at_cancel["runs"], json!([]), "the answer is counts only");
    // Nothing starts once cancelling: the attempts now are those in flight at the cancel.
    let (_, after) = srv.get(&format!("/v1/backfills/{id}")).await;
    let dispatched = total_attempts(&after);
    assert!(dispatched >= 1, "{after:#}");

    let summary = srv
        .wait_for(&id, Duration::from_secs(30), |s| {
            s["runs"].as_array().unwrap().iter().all(|r| {
                matches!(
                    r["state"].as_str(),
                    Some("CANCELLED" | "COMPLETE" | "HALTED")
                )
            })
        })
        .await;
    assert_eq!(summary["finished"], true);
    // Nothing was dispatched after the cancel: the attempts are those in flight then.
    assert_eq!(total_attempts(&summary), dispatched, "{summary:#}");
    assert!(
        summary["counts"]["CANCELLED"].as_u64().unwrap() >= 4,
        "{summary:#}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_failed_resumes_halted_runs_at_the_failed_step() {
    let srv = Server::start().await;
    let marker = srv.dir.path().join("fixed");
    // FIRST always passes; SECOND fails permanently (exit 2) until the marker exists.
    let file = srv.pipeline(
        "fixable",
        json!([
            {"id": "FIRST", "command": "sh", "args": ["-c", "echo ran >> first.log"]},
            {"id": "SECOND", "command": "sh",
             "args": ["-c", format!("test -f {} || (echo missing input; exit 2)", marker.display())]},
        ]),
    );
    let id = srv
        .submit(&file, json!({"months": "2024-01..2024-02"}))
        .await;
    let halted = srv.wait_finished(&id).await;
    assert_eq!(halted["counts"], json!({"HALTED": 2}), "{halted:#}");
    for r in halted["runs"].as_array().unwrap() {
        assert_eq!(r["step"], "SECOND", "{r}");
        assert!(r["reason"].as_str().unwrap().contains("exit code 2"), "{r}");
    }

    std::fs::write(&marker, "").unwrap();
    let (status, resp) = srv
        .post(&format!("/v1/backfills/{id}/retry-failed"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["resumed"], 2);
    let done = srv
        .wait_for(&id, Duration::from_secs(30), |s| {
            s["counts"] == json!({"COMPLETE": 2})
        })
        .await;
    for r in done["runs"].as_array().unwrap() {
        // FIRST is not run again; SECOND has its failed attempt and the resumed one.
        assert_eq!(r["attempts"], json!({"FIRST": 1, "SECOND": 2}), "{r}");
        let log = srv.dir.path().join(format!(
            "fixable/work/runs/{}/first.log",
            r["partition"].as_str().unwrap()
        ));
        assert_eq!(std::fs::read_to_string(log).unwrap(), "ran\n");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submits_are_refused_with_what_was_wrong() {
    let srv = Server::start().await;
    let file = srv.pipeline(
        "ok",
        json!([{"id": "A", "command": "sh", "args": ["-c", "true"]}]),
    );
    let good: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let cases = [
        (
            json!({"pipeline_file": file, "pipeline": pipeline_json("bad", json!([{"id": "A", "command": "sh", "timeout_s": "soon"}])), "months": "2024-01"}),
            "steps[0].timeout_s",
        ),
        (
            json!({"pipeline_file": "relative.json", "pipeline": good, "months": "2024-01"}),
            "absolute",
        ),
        (
            json!({"pipeline_file": file, "pipeline": good, "months": "2024-13"}),
            "invalid month `2024-13`",
        ),
        (
            json!({"pipeline_file": file, "pipeline": good}),
            "no partitions",
        ),
        (
            json!({"pipeline_file": file, "pipeline": pipeline_json("ds", json!([{"id": "A", "command": "sh", "args": ["{dataset}"]}])), "months": "2024-01"}),
            "--datasets",
        ),
        (
            json!({"pipeline_file": file, "pipeline": good, "months": "2024-01", "max_parallel": 0}),
            "max_parallel",
        ),
        (
            json!({"pipeline_file": file, "pipeline": good, "months": "2024-01", "order": "random"}),
            "order",
        ),
        (
            json!({"pipeline_file": file, "pipeline": good, "months": "2024-01", "workdir": "rel"}),
            "workdir",
        ),
        // A step that cannot be rendered is refused at the submit, not halted at in every run.
        (
            json!({"pipeline_file": file, "pipeline": pipeline_json("escape", json!([
                {"id": "A", "command": "sh", "args": ["-c", "true"]},
                {"id": "B", "command": "sh", "args": ["-c", "cat {artefacts.ref}"],
                 "artefacts": {"ref": "/etc/hostname"}}
            ])), "months": "2024-01..2024-02"}),
            "cannot be rendered for its partitions (nothing was submitted): partition `2024-01`: step `B`: path `/etc/hostname` is outside the pipeline's workdir",
        ),
    ];
    for (body, expected) in cases {
        let (status, err) = srv.post("/v1/backfills", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {err}");
        let msg = err["error"].as_str().unwrap();
        assert!(msg.contains(expected), "{expected:?} not in {msg:?}");
    }
    // A body that is not JSON at all is a JSON error too.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/backfills", srv.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let err: Value = resp.json().await.unwrap();
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid request body"),
        "{err}"
    );
    // Nothing was submitted.
    assert_eq!(srv.get("/v1/backfills").await.1, json!([]));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprocess_runs_what_did_not_complete_in_a_new_backfill() {
    let srv = Server::start().await;
    let marker = srv.dir.path().join("fixed");
    // 2024-02 fails permanently until the marker exists; the other months pass.
    let file = srv.pipeline(
        "monthly",
        json!([{"id": "LOAD", "command": "sh", "args": ["-c", format!(
            "echo {{month}} >> ran.log; test {{month}} != 2024-02 || test -f {} || (echo missing input; exit 2)",
            marker.display()
        )]}]),
    );
    let id = srv
        .submit(&file, json!({"months": "2024-01..2024-03"}))
        .await;
    let first = srv.wait_finished(&id).await;
    assert_eq!(
        first["counts"],
        json!({"COMPLETE": 2, "HALTED": 1}),
        "{first:#}"
    );
    // `?runs=` chooses which runs a summary lists; its counts are over all of them.
    let (_, none) = srv.get(&format!("/v1/backfills/{id}?runs=none")).await;
    assert_eq!(none["runs"], json!([]), "{none}");
    assert_eq!(none["counts"], first["counts"]);
    let (_, failed) = srv.get(&format!("/v1/backfills/{id}?runs=failed")).await;
    let listed: Vec<&str> = failed["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["partition"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["2024-02"]);
    let (_, all) = srv.get("/v1/backfills?runs=none").await;
    assert_eq!(all[0]["runs"], json!([]), "{all}");
    let (status, err) = srv.get(&format!("/v1/backfills/{id}?runs=some")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("all, failed or none"),
        "{err}"
    );

    std::fs::write(&marker, "").unwrap();
    let (status, resp) = srv
        .post(&format!("/v1/backfills/{id}/reprocess"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{resp}");
    assert_eq!(resp["reprocess_of"], id.as_str());
    assert_eq!(resp["runs"], 1, "the default mode is `failed`: {resp}");
    assert_eq!(
        resp["skipped"],
        json!({"complete": 2, "failed": 0, "in_progress": 0})
    );
    let new = resp["backfill_id"].as_str().unwrap().to_string();
    assert_ne!(new, id);
    let done = srv.wait_finished(&new).await;
    assert_eq!(done["counts"], json!({"COMPLETE": 1}), "{done:#}");
    assert_eq!(done["runs"][0]["partition"], "2024-02");
    assert_eq!(done["pipeline"], first["pipeline"]);

    // Everything completed now: `failed` has nothing left, `all` runs every month again.
    let (status, err) = srv
        .post(
            &format!("/v1/backfills/{id}/reprocess"),
            json!({"mode": "failed"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("nothing to run"),
        "{err}"
    );
    let (status, err) = srv
        .post(
            &format!("/v1/backfills/{id}/reprocess"),
            json!({"mode": "some"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let (status, resp) = srv
        .post(
            &format!("/v1/backfills/{id}/reprocess"),
            json!({"mode": "all"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{resp}");
    assert_eq!(resp["runs"], 3, "{resp}");
    srv.wait_finished(resp["backfill_id"].as_str().unwrap())
        .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_are_404_and_malformed_ids_400() {
    let srv = Server::start().await;
    let id = Uuid::now_v7();
    for (path, post) in [
        (format!("/v1/backfills/{id}"), false),
        (format!("/v1/backfills/{id}/cancel"), true),
        (format!("/v1/backfills/{id}/retry-failed"), true),
        (format!("/v1/backfills/{id}/reprocess"), true),
    ] {
        let (status, err) = if post {
            srv.post(&path, json!({})).await
        } else {
            srv.get(&path).await
        };
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {err}");
        assert_eq!(err["error"], format!("no backfill `{id}`"));
    }
    let (status, err) = srv.get("/v1/backfills/not-an-id").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        err["error"].as_str().unwrap().contains("`not-an-id`"),
        "{err}"
    );
    // No worker heartbeats in-process: the list is empty, not an error.
    let (status, workers) = srv.get("/v1/workers").await;
    assert_eq!(status, StatusCode::OK, "{workers}");
    assert_eq!(workers, serde_json::json!([]));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_the_flag_is_set() {
    let srv = Server::start().await;
    srv.ready.set(false);
    assert_eq!(srv.get("/healthz").await.0, StatusCode::OK);
    let (status, err) = srv.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        err["error"].as_str().unwrap().starts_with("not ready"),
        "{err}"
    );
    srv.ready.set(true);
    assert_eq!(
        srv.get("/readyz").await,
        (StatusCode::OK, json!({"ready": true}))
    );
    srv.ready.set(false);
    assert_eq!(srv.get("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_whose_runs_halt_the_same_way_is_escalated_then_continued() {
    let srv = Server::start().await;
    // Every run fails the same permanent way until the upstream is "fixed" (a marker file).
    let mut config = pipeline_json(
        "same-failure",
        json!([{
            "id": "FETCH", "command": "sh",
            "args": ["-c", "test -e {config_dir}/fixed || {{ echo 'CRITICAL: upstream answers 410'; exit 1; }}"],
        }]),
    );
    config["escalate_after_same_halts"] = json!(2);
    let dir = srv.pipeline("same-failure", json!([]));
    std::fs::write(&dir, config.to_string()).unwrap();
    let marker = std::path::Path::new(&dir).parent().unwrap().join("fixed");
    let id = srv
        .submit(
            &dir,
            json!({"months": "2024-01..2024-05", "max_parallel": 1}),
        )
        .await;
    let summary = srv
        .wait_for(&id, Duration::from_secs(30), |s| {
            s["escalated"].is_string() && s["counts"]["RUNNING"].is_null()
        })
        .await;
    // Two runs halted; the other three never started.
    assert_eq!(
        summary["counts"],
        json!({"HALTED": 2, "INIT": 3}),
        "{summary:#}"
    );
    let why = summary["escalated"].as_str().unwrap();
    assert!(why.contains("FETCH: exit 1"), "{why}");
    // Nothing starts while it waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, again) = srv.get(&format!("/v1/backfills/{id}")).await;
    assert_eq!(
        again["counts"],
        json!({"HALTED": 2, "INIT": 3}),
        "{again:#}"
    );

    // Answering a backfill that is not escalated, or with an empty reason, is refused.
    let resolve = format!("/v1/backfills/{id}/resolve");
    let (status, _) = srv
        .post(
            &resolve,
            json!({"action": "continue", "reason": "", "operator": "ana"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    std::fs::write(&marker, "").unwrap();
    let (status, body) = srv
        .post(
            &resolve,
            json!({"action": "continue", "reason": "upstream fixed", "operator": "ana"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = srv
        .post(
            &resolve,
            json!({"action": "continue", "reason": "again", "operator": "ana"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let done = srv.wait_finished(&id).await;
    assert_eq!(
        done["counts"],
        json!({"HALTED": 2, "COMPLETE": 3}),
        "{done:#}"
    );
    assert!(done["escalated"].is_null(), "{done:#}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_is_not_ready_answers_every_v1_route_503_at_once() {
    // A loop that never answers: before, a standby's handlers waited out the 10 s timeout.
    let mut srv = Server::start_with(Setup {
        paused: true,
        ..Setup::default()
    })
    .await;
    srv.ready.set(false);
    let file = srv.pipeline(
        "standby",
        json!([{"id": "A", "command": "sh", "args": ["-c", "true"]}]),
    );
    let started = Instant::now();
    for (status, body) in [
        srv.get("/v1/backfills").await,
        srv.get("/v1/escalations").await,
        srv.post(
            "/v1/backfills",
            Server::submit_body(&file, json!({"datasets": "a"})),
        )
        .await,
    ] {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("does not lead"),
            "{body}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a standby took {:?} to refuse",
        started.elapsed()
    );
    assert_eq!(srv.get("/healthz").await.0, StatusCode::OK);
    // Nothing it refused happens once it leads.
    srv.ready.set(true);
    srv.release();
    let (status, list) = srv.get("/v1/backfills").await;
    assert_eq!((status, list), (StatusCode::OK, json!([])));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_413_and_a_backfill_over_the_cap_is_refused_whole() {
    let policy = warpline_coordinator::api::ApiPolicy {
        max_body_bytes: 64 * 1024,
        max_partitions: 10,
        ..Default::default()
    };
    let srv = Server::start_with(Setup {
        policy,
        ..Setup::default()
    })
    .await;
    let file = srv.pipeline(
        "limits",
        json!([{"id": "A", "command": "sh", "args": ["-c", "true"]}]),
    );
    let mut body = Server::submit_body(&file, json!({"datasets": "a"}));
    body["vars"] = json!({"padding": "x".repeat(100 * 1024)});
    let (status, err) = srv
        .post_bytes("/v1/backfills", serde_json::to_vec(&body).unwrap())
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("--max-body-bytes"),
        "{err}"
    );

    // 12 months × 2 datasets: over the cap of 10, counted before anything is built.
    let (status, err) = srv
        .post(
            "/v1/backfills",
            Server::submit_body(
                &file,
                json!({"months": "2024-01..2024-12", "datasets": "a,b"}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    let msg = err["error"].as_str().unwrap();
    assert!(
        msg.contains("24 partitions") && msg.contains("at most 10"),
        "{err}"
    );
    // A range of 120,000 months is refused as quickly, without expanding it.
    let started = Instant::now();
    let (status, _) = srv
        .post(
            "/v1/backfills",
            Server::submit_body(
                &file,
                json!({"months": "0001-01..9999-12", "datasets": "a,b,c"}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        srv.get("/v1/backfills").await.1,
        json!([]),
        "nothing was created"
    );
    // At the cap is fine.
    srv.submit(
        &file,
        json!({"months": "2024-01..2024-05", "datasets": "a,b"}),
    )
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_sent_again_with_its_request_id_creates_one_backfill() {
    // The loop does not answer within the handlers' 300 ms: every first answer is a 503.
    let mut srv = Server::start_with(Setup {
        paused: true,
        timeout: Duration::from_millis(300),
        ..Setup::default()
    })
    .await;
    let file = srv.pipeline(
        "idem",
        json!([{"id": "A", "command": "sh", "args": ["-c", "true"]}]),
    );
    let with_id = Server::submit_body(&file, json!({"datasets": "a,b", "request_id": "job-42"}));
    let without_id = Server::submit_body(&file, json!({"datasets": "c"}));

    let (status, err) = srv.post("/v1/backfills", with_id.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("same request_id"),
        "{err}"
    );
    // The client retries, still before the loop answers: the same pending submit.
    let (status, _) = srv.post("/v1/backfills", with_id.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // A submit without an id that times out is dropped, never applied later.
    let (status, _) = srv.post("/v1/backfills", without_id).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // The same id for another submit is a mistake, not a replay.
    let other = Server::submit_body(&file, json!({"datasets": "z", "request_id": "job-42"}));
    let (status, err) = srv.post("/v1/backfills", other).await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");

    srv.release();
    let (status, first) = srv.post("/v1/backfills", with_id.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["runs"], 2);
    let (status, again) = srv.post("/v1/backfills", with_id).await;
    assert_eq!((status, &again), (StatusCode::CREATED, &first));
    let (_, list) = srv.get("/v1/backfills").await;
    let ids: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["backfill_id"])
        .collect();
    assert_eq!(
        ids,
        [&first["backfill_id"]],
        "one backfill, the first submit's"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_can_restrict_submits_to_pipelines_under_a_directory_or_pinned() {
    let scratch = tempfile::tempdir().unwrap();
    let allowed = scratch.path().join("allowed");
    let elsewhere = scratch.path().join("elsewhere");
    for d in [&allowed, &elsewhere] {
        std::fs::create_dir_all(d).unwrap();
    }
    let steps = json!([{"id": "A", "command": "sh", "args": ["-c", "true"]}]);
    let write = |dir: &std::path::Path, name: &str| {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, pipeline_json(name, steps.clone()).to_string()).unwrap();
        path.display().to_string()
    };
    let ok = write(&allowed, "ok");
    let stray = write(&elsewhere, "stray");
    let pinned = write(&elsewhere, "pinned");
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&pinned).unwrap()))
    };
    let policy = warpline_coordinator::api::ApiPolicy {
        pipeline_dirs: vec![allowed.clone()],
        pipeline_sha256: vec![digest],
        ..Default::default()
    };
    let srv = Server::start_with(Setup {
        policy,
        ..Setup::default()
    })
    .await;

    srv.submit(&ok, json!({"datasets": "a"})).await;
    srv.submit(&pinned, json!({"datasets": "a"})).await;
    let refused = |body: Value| {
        let srv = &srv;
        async move {
            let (status, err) = srv.post("/v1/backfills", body).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
            err["error"].as_str().unwrap().to_string()
        }
    };
    let msg = refused(Server::submit_body(&stray, json!({"datasets": "a"}))).await;
    assert!(msg.contains("is not allowed here"), "{msg}");
    // An allowed file's name with other JSON: the steps come from the file, not the client.
    let mut forged = Server::submit_body(&ok, json!({"datasets": "a"}));
    forged["pipeline"]["steps"][0]["args"] = json!(["-c", "cat /etc/shadow"]);
    let msg = refused(forged).await;
    assert!(msg.contains("differs from the file"), "{msg}");
    // A path that climbs out of the allowed directory.
    let climbing = format!("{}/../elsewhere/stray.json", allowed.display());
    let mut body = Server::submit_body(&stray, json!({"datasets": "a"}));
    body["pipeline_file"] = json!(climbing);
    refused(body).await;
    // The workdir cannot be moved outside the allowed directories either.
    let msg = refused(Server::submit_body(
        &ok,
        json!({"datasets": "a", "workdir": elsewhere.display().to_string()}),
    ))
    .await;
    assert!(msg.contains("`workdir`"), "{msg}");
    srv.submit(
        &ok,
        json!({"datasets": "b", "workdir": allowed.join("work2").display().to_string()}),
    )
    .await;
    let (_, list) = srv.get("/v1/backfills").await;
    assert_eq!(
        list.as_array().unwrap().len(),
        3,
        "only the allowed submits exist"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_failed_on_a_cancelled_backfill_is_refused_and_it_stays_cancelled() {
    let srv = Server::start().await;
    // `a` halts at once (exit 2); `b` is still in FIRST when the backfill is cancelled, so it
    // ends CANCELLED before LAST; `c` never starts.
    let file = srv.pipeline(
        "cancelled",
        json!([
            {"id": "ONLY", "command": "sh",
             "args": ["-c", "case $(basename $PWD) in a) exit 2;; *) sleep 1;; esac"]},
            {"id": "LAST", "command": "sh", "args": ["-c", "true"]},
        ]),
    );
    let id = srv
        .submit(&file, json!({"datasets": "a,b,c", "max_parallel": 1}))
        .await;
    srv.wait_for(&id, Duration::from_secs(30), |s| {
        s["counts"]["HALTED"] == 1 && run_of(s, "b")["attempts"]["ONLY"] == 1
    })
    .await;
    let (status, resp) = srv
        .post(&format!("/v1/backfills/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let cancelled = srv.wait_finished(&id).await;
    assert_eq!(cancelled["cancelling"], true, "{cancelled:#}");
    assert_eq!(cancelled["counts"], json!({"HALTED": 1, "CANCELLED": 2}));

    let (status, err) = srv
        .post(&format!("/v1/backfills/{id}/retry-failed"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("cancelled"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, after) = srv.get(&format!("/v1/backfills/{id}")).await;
    assert_eq!(after["cancelling"], true, "still cancelled: {after:#}");
    assert_eq!(after["counts"], cancelled["counts"], "nothing resumed");
    assert_eq!(run_of(&after, "a")["attempts"], json!({"ONLY": 1}));
    srv.stop().await;
}
