//! API authentication against a real `warpline serve`: no token → 401, a viewer reads but
//! cannot act (403), an operator acts and the audit log names the token's identity whatever
//! the request claims; the CLI's `--token` / `WARPLINE_API_TOKEN`; run and backfill references
//! (partition key, id prefix) for `resolve` and `retry-failed`; a JSON 404 for unknown routes;
//! and an open API refused on a public address.

use std::time::Duration;

use reqwest::blocking::Client;
use serde_json::{Value, json};
use warpline_shared::audit::AuditEvent;
use warpline_tests::fleet::Fleet;
use warpline_tests::*;

const LIMIT: Duration = Duration::from_secs(60);
const ALICE: &str = "alice-operator-token-0123456789";
const BOB: &str = "bob-viewer-token-0123456789abcd";

fn sh(id: &str, script: &str) -> Value {
    json!({"id": id, "command": "sh", "args": ["-c", script], "timeout_s": 60})
}

fn http() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// (status, JSON body) of a request.
fn call(req: reqwest::blocking::RequestBuilder) -> (u16, Value) {
    let resp = req.send().expect("the coordinator answers");
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("a JSON body, got HTTP {status}: {text:?}"));
    (status, body)
}

#[test]
fn tokens_gate_the_api_and_the_audit_names_the_token_identity() {
    let mut fleet = Fleet::new("auth");
    let tokens = fleet.dir().join("tokens");
    std::fs::write(
        &tokens,
        format!("# who may use the API\noperator alice {ALICE}\nviewer bob {BOB}\n"),
    )
    .unwrap();
    let c = fleet.serve_with(
        "coordinator",
        "127.0.0.1:0",
        &["--token-file", tokens.to_str().unwrap()],
        &[],
    );
    fleet.wait_ready(&c, LIMIT);
    let log = fleet.log("coordinator");
    assert!(log.contains("authentication on (2 tokens)"), "{log}");
    let h = http();
    let url = |p: &str| format!("{}{p}", c.api);

    // No token, a wrong token, a viewer acting: refused with a JSON error.
    let (status, body) = call(h.get(url("/v1/backfills")));
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("authentication required")
    );
    let (status, _) = call(h.get(url("/v1/backfills")).bearer_auth("x".repeat(30)));
    assert_eq!(status, 401);
    let (status, body) = call(h.get(url("/v1/backfills")).bearer_auth(BOB));
    assert_eq!((status, body), (200, json!([])));
    let nil = uuid::Uuid::nil();
    let (status, body) = call(
        h.post(url(&format!("/v1/backfills/{nil}/cancel")))
            .bearer_auth(BOB),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("viewer"), "{body}");
    // Liveness stays open; unknown routes are JSON 404s.
    assert_eq!(
        h.get(url("/healthz")).send().unwrap().status().as_u16(),
        200
    );
    let (status, body) = call(h.get(url("/v1/nope")).bearer_auth(BOB));
    assert_eq!(status, 404);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no route `/v1/nope`"),
        "{body}"
    );

    // The CLI: no token is refused, a token from the environment or --token works.
    let denied = fleet.cli(&c, &["status"]);
    denied.expect_code(2);
    assert!(denied.stderr().contains("401"), "{}", denied.context());

    let marker = fleet.dir().join("fixed");
    let script = format!(
        "test -f '{}' || (echo 'the numbers look odd' >&2; exit 3)",
        marker.display()
    );
    let pipeline = fleet.pipeline("escalate", json!([sh("ODD", &script), sh("NEXT", "true")]));
    fleet.worker("w1", 1, &["sh"]);
    let viewer_submit = fleet.cli_with(
        &c,
        &["submit", &pipeline, "--datasets", "auth_a"],
        &[("WARPLINE_API_TOKEN", BOB)],
    );
    viewer_submit.expect_code(2);
    assert!(
        viewer_submit.stderr().contains("403"),
        "{}",
        viewer_submit.context()
    );
    let submitted = fleet.cli_with(
        &c,
        &["submit", &pipeline, "--datasets", "auth_a"],
        &[("WARPLINE_API_TOKEN", ALICE)],
    );
    submitted.expect_code(0);
    let id = submitted.stdout().trim().to_string();
    let status = |fleet: &Fleet| {
        let out = fleet.cli(&c, &["status", &id, "--json", "--token", BOB]);
        out.expect_code(0);
        out.summary()
    };
    let deadline = std::time::Instant::now() + LIMIT;
    while status(&fleet)["counts"]["ESCALATED"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "not escalated: {:#}",
            status(&fleet)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Resolve by partition key; the audit log names alice, not the claimed operator, and no
    // $USER is needed.
    std::fs::write(&marker, "").unwrap();
    let ok = warpline(
        &[
            "resolve",
            "auth_a",
            "--action",
            "retry",
            "--reason",
            "republished",
            "--operator",
            "mallory",
            "--api",
            &c.api,
            "--token",
            ALICE,
        ],
        &[("USER", "")],
    );
    ok.expect_code(0);
    assert!(
        ok.stdout().contains("(auth_a): retry by alice"),
        "{}",
        ok.context()
    );
    let deadline = std::time::Instant::now() + LIMIT;
    while status(&fleet)["finished"] != true {
        assert!(
            std::time::Instant::now() < deadline,
            "not finished: {:#}",
            status(&fleet)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status(&fleet)["counts"], json!({"COMPLETE": 1}));
    let operators: Vec<String> = fleet
        .audit_records()
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::OperatorResolution { operator, .. } => Some(operator),
            _ => None,
        })
        .collect();
    assert_eq!(operators, ["alice"]);

    // A backfill by id prefix.
    let retried = fleet.cli(&c, &["retry-failed", &id[..8], "--token", ALICE]);
    retried.expect_code(0);
    assert!(
        retried
            .stdout()
            .contains(&format!("backfill {id}: resumed 0")),
        "{}",
        retried.context()
    );
    let unknown = fleet.cli(&c, &["retry-failed", "ffffffff", "--token", ALICE]);
    unknown.expect_code(2);
    assert!(
        unknown.stderr().contains("no backfill matching `ffffffff`"),
        "{}",
        unknown.context()
    );

    // No token ever reaches the coordinator's log.
    let log = fleet.log("coordinator");
    assert!(
        !log.contains(ALICE) && !log.contains(BOB),
        "a token was logged:\n{log}"
    );
}

#[test]
fn an_open_api_is_refused_on_a_public_address() {
    let out = warpline(
        &[
            "serve",
            "--http",
            "0.0.0.0:0",
            "--database-url",
            "postgres://nobody@127.0.0.1:1/x",
        ],
        &[],
    );
    out.expect_code(2);
    let err = out.stderr();
    assert!(
        err.contains("refusing to serve the API on `0.0.0.0:0` with no token")
            && err.contains("--allow-unauthenticated"),
        "{}",
        out.context()
    );
    let weak = warpline(
        &["serve", "--http", "127.0.0.1:0"],
        &[("WARPLINE_OPERATOR_TOKEN", "short")],
    );
    weak.expect_code(2);
    assert!(
        weak.stderr().contains("shorter than 16"),
        "{}",
        weak.context()
    );
}

#[test]
fn docker_compose_publishes_the_api_only_with_a_token() {
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    let c: Value = serde_norway::from_str(&text).unwrap();
    let env = &c["services"]["coordinator"]["environment"];
    for var in ["WARPLINE_OPERATOR_TOKEN", "WARPLINE_API_TOKEN"] {
        let v = env[var]
            .as_str()
            .unwrap_or_else(|| panic!("compose sets no {var}: {env}"));
        // Required, with no default: compose refuses to start without it.
        assert!(v.starts_with("${WARPLINE_OPERATOR_TOKEN:?"), "{var}: {v}");
    }
}
