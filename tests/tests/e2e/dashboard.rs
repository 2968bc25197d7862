//! The dashboard in a real browser (headless Chromium over WebDriver) against a real
//! `warpline serve` with tokens and a real worker on RabbitMQ and PostgreSQL: the login
//! redirect, the grid's states for a backfill with a halted and an escalated partition, a
//! viewer who sees no buttons and whose API calls are refused, an escalation resolved through
//! the form that makes its run complete (audited under the operator's identity), a log tail with
//! `<script>` shown as text, and a cancel button that cancels. Screenshots are saved to
//! `target/browser-artefacts/` (see [`warpline_tests::browser`]).

use std::time::Duration;

use reqwest::blocking::Client;
use serde_json::{Value, json};
use warpline_shared::audit::AuditEvent;
use warpline_tests::browser::Browser;
use warpline_tests::fleet::Fleet;

const LIMIT: Duration = Duration::from_secs(60);
const ALICE: &str = "alice-operator-token-dashboard-01";
const BOB: &str = "bob-viewer-token-dashboard-0001";

fn sh(id: &str, script: &str) -> Value {
    json!({"id": id, "command": "sh", "args": ["-c", script], "timeout_s": 60})
}

fn log_in(b: &mut Browser, api: &str, token: &str) {
    b.clear_cookies();
    b.goto(&format!("{api}/"));
    b.wait(LIMIT, "the login form", |b| {
        b.count("input[name=token]") == 1
    });
    b.type_into("input[name=token]", token);
    b.click("form[action='/login'] button[type=submit]");
    b.wait(LIMIT, "the backfills page", |b| b.count("#identity") == 1);
}

/// The state of the cell of `step` in the row of `partition`.
fn cell(b: &mut Browser, partition: &str, step: &str) -> Option<String> {
    let v = b.js(
        "const r = document.querySelector(`tr[data-partition=\"${arguments[0]}\"]`);\
         if (!r) return null; const c = r.querySelector(`td.c[data-step=\"${arguments[1]}\"]`);\
         return c ? c.dataset.state : null;",
        json!([partition, step]),
    );
    v.as_str().map(str::to_string)
}

#[test]
fn the_dashboard_shows_the_grid_resolves_an_escalation_and_cancels() {
    let mut fleet = Fleet::new("dashboard");
    let tokens = fleet.dir().join("tokens");
    std::fs::write(
        &tokens,
        format!("operator alice {ALICE}\nviewer bob {BOB}\n"),
    )
    .unwrap();
    let c = fleet.serve_with(
        "coordinator",
        "127.0.0.1:0",
        &["--token-file", tokens.to_str().unwrap()],
        &[],
    );
    fleet.wait_ready(&c, LIMIT);
    let marker = fleet.dir().join("fixed");
    // `halt` exits 2 (the rules halt at once), `odd` fails in a way the rules cannot classify
    // (escalated) until the marker exists; every attempt first prints a line of markup.
    let fetch = format!(
        "echo '<script>window.__pwned=1</script><b>bold</b> {{dataset}}'; \
         case {{dataset}} in halt) exit 2;; odd) test -f '{}' || (echo 'the numbers look odd' >&2; exit 3);; esac",
        marker.display()
    );
    let pipeline = fleet.pipeline("dash", json!([sh("FETCH", &fetch), sh("LOAD", "true")]));
    fleet.worker("w1", 2, &["sh"]);
    let operator = [("WARPLINE_API_TOKEN", ALICE)];
    let submitted = fleet.cli_with(
        &c,
        &["submit", &pipeline, "--datasets", "ok_a,halt,odd,ok_b"],
        &operator,
    );
    submitted.expect_code(0);
    let id = submitted.stdout().trim().to_string();

    // No token: the API says 401 and a browser is sent to the login form.
    let http = Client::new();
    let no_token = http.get(format!("{}/v1/backfills", c.api)).send().unwrap();
    assert_eq!(no_token.status().as_u16(), 401);
    let mut b = Browser::start();
    b.goto(&format!("{}/backfills/{id}", c.api));
    b.wait(LIMIT, "the login redirect", |b| {
        b.url().contains("/login?next=")
    });
    b.screenshot("01-login");

    // The viewer: the grid fills in live with the right states, and no button to act.
    log_in(&mut b, &c.api, BOB);
    b.goto(&format!("{}/backfills/{id}", c.api));
    b.wait(LIMIT, "halted and escalated cells", |b| {
        cell(b, "halt", "FETCH").as_deref() == Some("halted")
            && cell(b, "odd", "FETCH").as_deref() == Some("escalated")
            && cell(b, "ok_a", "LOAD").as_deref() == Some("passed")
            && cell(b, "ok_b", "LOAD").as_deref() == Some("passed")
    });
    assert_eq!(cell(&mut b, "halt", "LOAD").as_deref(), Some("pending"));
    assert_eq!(cell(&mut b, "odd", "LOAD").as_deref(), Some("pending"));
    assert_eq!(
        b.count(
            "form[action$='/cancel'], form[action$='/retry-failed'], form.resolve, form.reprocess"
        ),
        0
    );
    assert!(b.text("#identity").unwrap().contains("bob · viewer"));
    b.screenshot("02-grid-viewer");
    let escalation: Value = http
        .get(format!("{}/v1/escalations", c.api))
        .bearer_auth(BOB)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let run = escalation[0]["run_id"]
        .as_str()
        .expect("an escalated run")
        .to_string();
    let refused = http
        .post(format!("{}/v1/runs/{run}/resolve", c.api))
        .bearer_auth(BOB)
        .json(&json!({"action": "retry", "reason": "viewer"}))
        .send()
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let refused = http
        .post(format!("{}/v1/backfills/{id}/reprocess", c.api))
        .bearer_auth(BOB)
        .json(&json!({"mode": "failed"}))
        .send()
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);

    // The operator opens the escalated cell: checks, decision, escaped log tail, the form.
    log_in(&mut b, &c.api, ALICE);
    b.goto(&format!("{}/backfills/{id}", c.api));
    b.wait(LIMIT, "the grid", |b| cell(b, "odd", "FETCH").is_some());
    b.click("tr[data-partition='odd'] td.c[data-step='FETCH'] a");
    b.wait(LIMIT, "the run page", |b| {
        b.count("#escalation form.resolve") == 1
    });
    let tail = b.text("pre.log").expect("a log tail");
    assert!(
        tail.contains("<script>window.__pwned=1</script><b>bold</b> odd"),
        "{tail}"
    );
    assert!(tail.contains("the numbers look odd"), "{tail}");
    assert_eq!(b.count("pre.log *"), 0, "log text became markup");
    assert_eq!(b.count("main script"), 0, "log text became a script");
    assert_eq!(b.js("return window.__pwned || 0;", json!([])), 0);
    let page = b.text("main").unwrap();
    assert!(
        page.contains("exit code 3") && page.contains("w1"),
        "{page}"
    );
    assert!(
        page.contains("Decision") && page.contains("escalate"),
        "{page}"
    );
    assert!(
        b.count("a[href*='/log?attempt=']") >= 1,
        "no link to the full logs"
    );
    b.js("window.scrollTo(0, 0); return 0;", json!([]));
    b.screenshot("03-run-escalated");
    b.js(
        "document.querySelector('pre.log').scrollIntoView(); return 0;",
        json!([]),
    );
    b.screenshot("03b-run-attempt");

    std::fs::write(&marker, "").unwrap();
    b.select("#escalation select[name=action]", "retry");
    b.type_into(
        "#escalation input[name=reason]",
        "the source was republished",
    );
    b.click("#escalation button[type=submit]");
    b.wait(LIMIT, "the run complete", |b| {
        b.text("#run-state").as_deref() == Some("COMPLETE")
    });
    assert!(
        b.text(".flash")
            .unwrap_or_default()
            .contains("resolved by alice")
    );
    b.screenshot("04-run-resolved");
    let operators: Vec<String> = fleet
        .audit_records()
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::OperatorResolution { operator, .. } => Some(operator),
            _ => None,
        })
        .collect();
    assert_eq!(operators, ["alice"]);
    b.goto(&format!("{}/backfills/{id}", c.api));
    b.wait(LIMIT, "the resolved grid", |b| {
        cell(b, "odd", "LOAD").as_deref() == Some("passed")
            && b.text("#state").as_deref() == Some("finished")
    });
    b.screenshot("05-grid-after");

    // Reprocess from the page: a new backfill of what did not complete (`halt` halts again).
    b.select("form.reprocess select", "failed");
    b.click("form.reprocess button");
    b.accept_dialog();
    b.wait(LIMIT, "the reprocessed backfill's page", |b| {
        let url = b.url();
        let path = url.split('?').next().unwrap_or_default().to_string();
        path.contains("/backfills/")
            && !path.contains(&id)
            && cell(b, "halt", "FETCH").as_deref() == Some("halted")
    });
    assert_eq!(b.count("#grid tbody tr"), 1, "only `halt` runs again");
    assert!(
        b.text(".flash")
            .is_some_and(|t| t.contains("reprocess `failed` by alice")),
        "{:?}",
        b.text(".flash")
    );
    b.screenshot("05b-reprocessed");
    let reprocessed_by: Vec<(String, String)> = fleet
        .audit_records()
        .into_iter()
        .filter(|r| r.backfill_id.map(|b| b.to_string()) == Some(id.clone()))
        .filter_map(|r| match r.event {
            AuditEvent::BackfillResolution {
                operator,
                action,
                reason,
            } if action == "reprocess" => Some((operator, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(reprocessed_by.len(), 1, "{reprocessed_by:?}");
    assert_eq!(reprocessed_by[0].0, "alice");
    assert!(
        reprocessed_by[0].1.contains("3 completed before"),
        "{reprocessed_by:?}"
    );

    // A form posted from another site, or without the session's CSRF token, is refused.
    let cookie = format!("warpline_token={ALICE}");
    let forged = http
        .post(format!("{}/ui/backfills/{id}/retry-failed", c.api))
        .header("Cookie", &cookie)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("csrf=guessed")
        .send()
        .unwrap();
    assert_eq!(forged.status().as_u16(), 403);
    let cross_site = http
        .post(format!("{}/ui/backfills/{id}/retry-failed", c.api))
        .header("Cookie", &cookie)
        .header("Origin", "https://evil.example")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("csrf=guessed")
        .send()
        .unwrap();
    assert_eq!(cross_site.status().as_u16(), 403);
    assert!(
        cross_site
            .text()
            .unwrap()
            .contains("cross-site request refused")
    );

    // A cancel button cancels: a slow backfill, one run at a time.
    let slow = fleet.pipeline("slow", json!([sh("WAIT", "sleep 2")]));
    let submitted = fleet.cli_with(
        &c,
        &[
            "submit",
            &slow,
            "--datasets",
            "s1,s2,s3,s4,s5",
            "--max-parallel",
            "1",
        ],
        &operator,
    );
    submitted.expect_code(0);
    let slow_id = submitted.stdout().trim().to_string();
    b.goto(&format!("{}/", c.api));
    let button = format!("tr[data-backfill='{slow_id}'] form[action$='/cancel'] button");
    b.wait(LIMIT, "the cancel button", |b| b.count(&button) == 1);
    b.screenshot("06-backfills");
    b.click(&button);
    b.accept_dialog();
    b.wait(LIMIT, "the cancelled backfill", |b| {
        b.text(&format!("tr[data-backfill='{slow_id}']"))
            .is_some_and(|t| {
                t.contains("CANCELLED") && (t.contains("cancelled") || t.contains("cancelling"))
            })
    });
    let summary: Value = http
        .get(format!("{}/v1/backfills/{slow_id}", c.api))
        .bearer_auth(BOB)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(summary["cancelling"], true, "{summary}");
    assert!(
        summary["counts"]["CANCELLED"].as_u64().unwrap() >= 3,
        "{summary}"
    );
    b.screenshot("07-cancelled");
    let cancelled_by: Vec<String> = fleet
        .audit_records()
        .into_iter()
        .filter(|r| r.backfill_id.map(|b| b.to_string()) == Some(slow_id.clone()))
        .filter_map(|r| match r.event {
            AuditEvent::BackfillResolution {
                operator, action, ..
            } if action == "cancel" => Some(operator),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled_by, ["alice"]);
}

/// The trial, as a new user would make it: `serve` with tokens and two workers, the
/// DataWarp backfill with one month made to fail (its source answers 404 once; the pipeline
/// sends a 404 to an operator, since a month may simply not be published yet). The grid fills
/// live, the failed month's cell opens to its checks, decision and log tail, its escalation is
/// resolved from the page, and the backfill completes.
#[test]
fn the_datawarp_backfill_is_followed_and_its_failed_month_resolved_in_the_browser() {
    let server = warpline_tests::FaultServer::start(
        warpline_tests::repo_root().join("examples/datawarp/data"),
        [(
            "/ae_attendances/2024-02.csv".to_string(),
            vec![
                warpline_tests::Fault::Status(404),
                warpline_tests::Fault::Serve,
            ],
        )]
        .into(),
    );
    let mut fleet = Fleet::new("dashboard_dw");
    let tokens = fleet.dir().join("tokens");
    std::fs::write(&tokens, format!("operator alice {ALICE}\n")).unwrap();
    let c = fleet.serve_with(
        "coordinator",
        "127.0.0.1:0",
        &["--token-file", tokens.to_str().unwrap()],
        &[],
    );
    fleet.wait_ready(&c, LIMIT);
    let schema = warpline_tests::unique("e2e_dash_dw");
    let _schema = warpline_tests::SchemaGuard(schema.clone());
    let tools = warpline_tests::bin_dir();
    for id in ["w1", "w2"] {
        fleet.worker_with_env(
            id,
            2,
            &[
                "url_to_manifest",
                "enrich_manifest",
                "load-batch",
                "export_to_parquet",
            ],
            &[
                ("DATAWARP_SCHEMA", &schema),
                ("WARPLINE_TOOLS_DIR", tools.to_str().unwrap()),
            ],
        );
    }
    // The example as shipped, reading its months from the local server, with one rule added:
    // a 404 goes to an operator.
    let example = warpline_tests::repo_root().join("examples/datawarp");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(example.join("pipeline.json")).unwrap())
            .unwrap();
    config["vars"]["source_base"] = server.base.clone().into();
    // Its reference files beside the copy (a step reads only under its config's directory or
    // its workdir).
    std::fs::create_dir_all(fleet.dir().join("reference")).unwrap();
    for f in std::fs::read_dir(example.join("reference")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(
            &f,
            fleet.dir().join("reference").join(f.file_name().unwrap()),
        )
        .unwrap();
    }
    config["failures"] = json!({"rules": [
        {"name": "not published yet", "pattern": "http 404", "class": "escalate"}
    ]});
    let pipeline = fleet.dir().join("datawarp.json");
    std::fs::write(&pipeline, config.to_string()).unwrap();
    let work = fleet.dir().join("work");
    let submitted = fleet.cli_with(
        &c,
        &[
            "submit",
            pipeline.to_str().unwrap(),
            "--months",
            "2024-01..2024-04",
            "--datasets",
            "ae_attendances",
            "--workdir",
            work.to_str().unwrap(),
        ],
        &[("WARPLINE_API_TOKEN", ALICE)],
    );
    submitted.expect_code(0);
    let id = submitted.stdout().trim().to_string();
    let http = Client::new();
    let refused = http
        .get(format!("{}/v1/backfills/{id}", c.api))
        .send()
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401, "a request without a token");

    let mut b = Browser::start();
    log_in(&mut b, &c.api, ALICE);
    b.goto(&format!("{}/backfills/{id}", c.api));
    let month = |m: &str| format!("ae_attendances_2024-{m}");
    b.wait(LIMIT, "three months published and one escalated", |b| {
        ["01", "03", "04"]
            .iter()
            .all(|m| cell(b, &month(m), "PUBLISH").as_deref() == Some("passed"))
            && cell(b, &month("02"), "EXTRACT").as_deref() == Some("escalated")
    });
    assert_eq!(
        cell(&mut b, &month("02"), "ENRICH").as_deref(),
        Some("pending")
    );
    b.screenshot("dw-01-grid-escalated");

    b.click(&format!(
        "tr[data-partition='{}'] td.c[data-step='EXTRACT'] a",
        month("02")
    ));
    b.wait(LIMIT, "the failed month's run page", |b| {
        b.count("#escalation form.resolve") == 1
    });
    let page = b.text("main").unwrap();
    for fact in [
        "url_to_manifest",
        "http 404",
        "not published yet",
        "file_exists",
        "escalate",
        "rules",
    ] {
        assert!(
            page.contains(fact),
            "`{fact}` is not on the run page:\n{page}"
        );
    }
    let tail = b.text("pre.log").expect("a log tail");
    assert!(tail.contains("CRITICAL: http 404"), "{tail}");
    b.js("window.scrollTo(0, 0); return 0;", json!([]));
    b.screenshot("dw-02-run-escalated");

    b.select("#escalation select[name=action]", "retry");
    b.type_into("#escalation input[name=reason]", "published now");
    b.click("#escalation button[type=submit]");
    b.wait(LIMIT, "the month complete", |b| {
        b.text("#run-state").as_deref() == Some("COMPLETE")
    });
    b.goto(&format!("{}/backfills/{id}", c.api));
    b.wait(LIMIT, "the backfill finished", |b| {
        b.text("#state").as_deref() == Some("finished")
    });
    b.screenshot("dw-03-grid-complete");
    let summary: Value = http
        .get(format!("{}/v1/backfills/{id}", c.api))
        .bearer_auth(ALICE)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(summary["counts"], json!({"COMPLETE": 4}), "{summary:#}");
    assert_eq!(server.hits("/ae_attendances/2024-02.csv"), 2);
    let parquet = work.join(format!("runs/{0}/{0}.parquet", month("02")));
    assert!(
        parquet.metadata().is_ok_and(|m| m.len() > 0),
        "{} missing",
        parquet.display()
    );
}
