//! Real faults in fleet mode, injected mid-backfill: a RabbitMQ restart (also while runs wait
//! out a retry backoff), a PostgreSQL restart and a 20 s outage, SIGKILL and SIGSTOP/SIGCONT of
//! the coordinator and of workers, a worker cut off the broker by a network namespace, and two
//! coordinators whose leader is paused past its lock (and one whose leader stays stopped, so
//! the results its open connection holds must reach the successor within the AMQP heartbeat);
//! and a broker that refuses the login.
//!
//! Each test starts its own RabbitMQ node and PostgreSQL cluster ([`Broker`], [`Database`]; the
//! shared ones are never touched), runs the DataWarp pipeline over a few months (its tools load
//! the months into staging tables in the private cluster), and asserts the same four things:
//! every run completes, no attempt is applied twice, the staging tables hold each month's rows
//! exactly once, and the audit log verifies.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use uuid::Uuid;
use warpline_shared::audit::{AuditEvent, AuditRecord};
use warpline_tests::faults::{Broker, Database, Netns};
use warpline_tests::fleet::{Coordinator, Fleet};
use warpline_tests::*;

const DATAWARP_TOOLS: [&str; 5] = [
    "url_to_manifest",
    "enrich_manifest",
    "load-batch",
    "export_to_parquet",
    "sh",
];

/// Long enough for a small backfill through a fault on a busy two-core machine.
const LIMIT: Duration = Duration::from_secs(120);

/// One test's servers and fleet. Fields drop in order: the fleet's processes first, then the
/// servers they used.
struct Scene {
    fleet: Fleet,
    db: Database,
    broker: Broker,
    /// The DataWarp staging schema (in the private cluster's `datawarp` database).
    staging: String,
}

impl Scene {
    fn new(name: &str) -> Scene {
        Scene::with(name, Broker::start(name), Database::start(name))
    }

    fn with(name: &str, broker: Broker, db: Database) -> Scene {
        let fleet = Fleet::on(name, &broker.url(), &db.url("warpline"));
        Scene {
            fleet,
            db,
            broker,
            staging: format!("staging_{name}"),
        }
    }

    /// The environment of a worker and its tools: the staging schema in the private cluster, the
    /// workspace's binaries on `PATH` for the `sh` wrapper, and the example's data in the
    /// repository as a `--path-root` the steps may read (as an operator allows a shared mount).
    fn tool_env(&self, db_host: &str) -> Vec<(String, String)> {
        let bins = bin("warpline-worker")
            .parent()
            .unwrap()
            .display()
            .to_string();
        let path = format!("{bins}:{}", std::env::var("PATH").unwrap_or_default());
        vec![
            ("DATAWARP_SCHEMA".into(), self.staging.clone()),
            (
                "DATAWARP_DATABASE_URL".into(),
                format!("postgres://postgres@{db_host}:{}/datawarp", self.db.port),
            ),
            ("PATH".into(), path),
            (
                "WARPLINE_PATH_ROOTS".into(),
                repo_root()
                    .join("examples/datawarp/data")
                    .display()
                    .to_string(),
            ),
        ]
    }

    /// Starts a worker with `slots` slots allowed to run the DataWarp tools and `sh`.
    fn worker(&mut self, id: &str, slots: u16) -> i32 {
        let env = self.tool_env("127.0.0.1");
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.fleet.worker_with_env(id, slots, &DATAWARP_TOOLS, &env)
    }

    /// Writes the DataWarp pipeline for this fleet: the example's steps and checks, its data
    /// from the repository, its references copied beside it, a `backoff_ms` retry backoff and a 3 s lost grace.
    /// With `enrich_fails_once`, each run's first ENRICH exits 75 (a temporary failure), so
    /// every run waits out one backoff.
    fn pipeline(&self, backoff_ms: u64, enrich_fails_once: bool) -> String {
        let example = repo_root().join("examples/datawarp");
        let mut p: Value =
            serde_json::from_str(&std::fs::read_to_string(example.join("pipeline.json")).unwrap())
                .unwrap();
        p["vars"]["source_base"] = json!(format!("file://{}", example.join("data").display()));
        // References are paths, confined to the workdir and the config's directory: copied.
        let reference = self.fleet.dir().join("reference");
        std::fs::create_dir_all(&reference).unwrap();
        for f in std::fs::read_dir(example.join("reference"))
            .unwrap()
            .flatten()
        {
            std::fs::copy(f.path(), reference.join(f.file_name())).unwrap();
        }
        p["retry"] = json!({"initial_ms": backoff_ms, "multiplier": 1.0, "max_ms": backoff_ms});
        p["lost_grace_s"] = json!(3);
        if enrich_fails_once {
            let enrich = &mut p["steps"][1];
            assert_eq!(enrich["id"], "ENRICH");
            let mut args = vec![
                json!("-c"),
                json!(
                    "if [ ! -e enrich.failed ]; then : > enrich.failed; \
                     echo 'the reference service is busy: temporary failure' >&2; exit 75; fi; \
                     exec enrich_manifest \"$@\""
                ),
                json!("enrich"),
            ];
            args.extend(enrich["args"].as_array().unwrap().iter().cloned());
            enrich["command"] = json!("sh");
            enrich["args"] = json!(args);
        }
        let path = self.fleet.dir().join("datawarp.json");
        std::fs::write(&path, serde_json::to_string_pretty(&p).unwrap()).unwrap();
        path.display().to_string()
    }

    /// Submits `months` × `datasets` of `pipeline` and returns the backfill's id.
    fn submit(&self, c: &Coordinator, pipeline: &str, months: &str, datasets: &str) -> String {
        let work = self.fleet.dir().join("work");
        self.fleet.submit(
            c,
            pipeline,
            &[
                "--months",
                months,
                "--datasets",
                datasets,
                "--workdir",
                work.to_str().unwrap(),
                "--max-parallel",
                "8",
            ],
        )
    }

    /// Polls `status` (tolerating a coordinator that does not answer for a while, as during a
    /// fault) until the backfill is finished; returns the summary.
    fn wait_finished(&self, c: &Coordinator, id: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.fleet.cli(c, &["status", id, "--json"]);
            let last = if out.code() == 0 {
                let s = out.summary();
                if s["finished"] == true {
                    return s;
                }
                format!("{s:#}")
            } else {
                out.context()
            };
            assert!(
                Instant::now() < deadline,
                "backfill {id} not finished within {limit:?}; last answer:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The four assertions of every fault test, for a backfill of `months` × `datasets`.
    fn assert_intact(&self, summary: &Value, months: &[&str], datasets: &[&str]) -> Tally {
        let runs = summary["runs"].as_array().expect("runs");
        let n = months.len() * datasets.len();
        assert_eq!(runs.len(), n, "{summary:#}");
        let incomplete: Vec<&Value> = runs.iter().filter(|r| r["state"] != "COMPLETE").collect();
        assert!(
            incomplete.is_empty(),
            "{} of {n} runs did not complete: {incomplete:#?}",
            incomplete.len()
        );

        let records = self.fleet.audit_records();
        // A line written twice (a deposed leader's late write) would otherwise read as an
        // attempt applied twice: the file's own order is judged first.
        let misplaced: Vec<(usize, u64)> = records
            .iter()
            .enumerate()
            .filter(|(i, r)| r.seq != *i as u64 + 1)
            .map(|(i, r)| (i + 1, r.seq))
            .take(5)
            .collect();
        assert!(
            misplaced.is_empty(),
            "audit lines out of place (line, seq): {misplaced:?}"
        );
        let tally = tally(&records);
        assert!(
            tally.applied_twice.is_empty(),
            "attempts applied twice: {:?}",
            tally.applied_twice
        );
        assert_eq!(
            tally.decisions_per_run, tally.results_per_run,
            "one decision per applied result"
        );

        let mut staging = self.db.client("datawarp");
        for ds in datasets {
            for month in months {
                let csv = repo_root().join(format!("examples/datawarp/data/{ds}/{month}.csv"));
                let want = std::fs::read_to_string(&csv).unwrap().lines().count() as i64 - 1;
                let row = staging
                    .query_one(
                        &format!(
                            "SELECT count(*), count(DISTINCT t.*) FROM \"{}\".\"{ds}\" t \
                             WHERE period_month = $1",
                            self.staging
                        ),
                        &[month],
                    )
                    .unwrap_or_else(|e| panic!("cannot count {ds} {month}: {e}"));
                let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
                assert_eq!(
                    (rows, distinct),
                    (want, want),
                    "staging `{ds}` {month}: rows, distinct rows"
                );
            }
        }

        let verify =
            self.fleet
                .warpline(&["audit", "verify", self.fleet.audit().to_str().unwrap()]);
        verify.expect_code(0);
        assert!(
            verify.stdout().contains("chain intact"),
            "{}",
            verify.context()
        );
        eprintln!(
            "fault test: {n} runs complete, {} results applied once each, {} stale, {} lost, audit verifies",
            tally.results, tally.stale, tally.lost
        );
        tally
    }
}

/// What an audit log says about results.
struct Tally {
    results: usize,
    stale: usize,
    lost: usize,
    applied_twice: Vec<Uuid>,
    results_per_run: HashMap<Uuid, usize>,
    decisions_per_run: HashMap<Uuid, usize>,
}

fn tally(records: &[AuditRecord]) -> Tally {
    let mut per_attempt: HashMap<Uuid, usize> = HashMap::new();
    let mut t = Tally {
        results: 0,
        stale: 0,
        lost: 0,
        applied_twice: Vec::new(),
        results_per_run: HashMap::new(),
        decisions_per_run: HashMap::new(),
    };
    for r in records {
        match &r.event {
            AuditEvent::StepResult { outcome } => {
                t.results += 1;
                let attempt = outcome.result.attempt_id.expect("an attempt id");
                *per_attempt.entry(attempt).or_default() += 1;
                *t.results_per_run
                    .entry(r.run_id.expect("a result names its run"))
                    .or_default() += 1;
            }
            AuditEvent::Decision { .. } => {
                *t.decisions_per_run
                    .entry(r.run_id.expect("a decision names its run"))
                    .or_default() += 1;
            }
            AuditEvent::StaleResult { .. } => t.stale += 1,
            AuditEvent::AttemptLost { .. } => t.lost += 1,
            _ => {}
        }
    }
    t.applied_twice = per_attempt
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(a, _)| a)
        .collect();
    t
}

/// How many complete lines of the audit log (which a coordinator may be appending to) contain
/// every one of `needles`.
fn count_lines(audit: &Path, needles: &[&str]) -> usize {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && needles.iter().all(|n| l.contains(n)))
        .count()
}

/// The step results recorded so far.
fn results_so_far(fleet: &Fleet) -> usize {
    count_lines(&fleet.audit(), &["\"event\":\"step_result\""])
}

/// Waits until the audit log holds `n` step results; fails at once, with its status, when the
/// coordinator `coordinator` exits meanwhile.
fn wait_results(fleet: &mut Fleet, coordinator: &str, n: usize) {
    let deadline = Instant::now() + LIMIT;
    while results_so_far(fleet) < n {
        if let Some(status) = fleet.exited(coordinator) {
            panic!("the coordinator `{coordinator}` exited ({status}) before {n} step results");
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {LIMIT:?} waiting for {n} step results"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `done` every 50 ms until it holds; fails after `limit` naming `what`.
fn wait_for(limit: Duration, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The months of a fault test's backfill: 2024-01..2024-02 (6 runs), or the range in
/// `WARPLINE_FAULT_MONTHS` (e.g. `2024-01..2024-12`: the 36-run DataWarp backfill) for a longer
/// trial by hand with the same faults and assertions.
fn months() -> Vec<&'static str> {
    let range =
        std::env::var("WARPLINE_FAULT_MONTHS").unwrap_or_else(|_| "2024-01..2024-02".into());
    warpline_shared::partition::expand(Some(&range), None)
        .expect("WARPLINE_FAULT_MONTHS is a month range like 2024-01..2024-12")
        .into_iter()
        .map(|p| &*Box::leak(p.month.expect("a month").into_boxed_str()))
        .collect()
}
const DATASETS: [&str; 3] = ["ae_attendances", "rtt_waiting_times", "gp_appointments"];

/// Milliseconds since midnight UTC, as event lines stamp them.
fn ms_of_day_now() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970");
    (now.as_millis() % 86_400_000) as u64
}

/// The time of an event line (`HH:MM:SS.mmm …`), in milliseconds since midnight.
fn event_ms_of_day(line: &str) -> Option<u64> {
    let stamp = line.get(..12)?;
    let b = stamp.as_bytes();
    if b[2] != b':' || b[5] != b':' || b[8] != b'.' || line.len() <= 13 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| stamp.get(r)?.parse::<u64>().ok();
    Some(((n(0..2)? * 60 + n(3..5)?) * 60 + n(6..8)?) * 1000 + n(9..12)?)
}

/// Whether `t` is after `since` within a test's span (a few minutes, maybe across midnight).
fn later_in_the_day(t: u64, since: u64) -> bool {
    (t + 86_400_000 - since) % 86_400_000 < 43_200_000 && t != since
}

fn months_arg() -> String {
    let m = months();
    format!("{}..{}", m[0], m[m.len() - 1])
}

fn datasets_arg() -> String {
    DATASETS.join(",")
}

#[test]
fn a_broker_restart_mid_backfill_loses_no_run() {
    let mut s = Scene::new("broker_restart");
    let c = s.fleet.serve("coordinator");
    s.fleet.wait_ready(&c, LIMIT);
    s.worker("w1", 3);
    s.worker("w2", 3);
    let pipeline = s.pipeline(200, false);
    let id = s.submit(&c, &pipeline, &months_arg(), &datasets_arg());
    wait_results(&mut s.fleet, "coordinator", 4);
    s.fleet.note("broker stop_app; 2 s; start_app");
    s.broker.restart(Duration::from_secs(2));
    let summary = s.wait_finished(&c, &id, LIMIT);
    assert!(
        s.fleet.exited("coordinator").is_none(),
        "the coordinator exited"
    );
    s.assert_intact(&summary, &months(), &DATASETS);
}

#[test]
fn killed_and_paused_coordinators_and_workers_lose_no_run() {
    let mut s = Scene::new("kill_pause");
    let c = s.fleet.serve("first");
    s.fleet.wait_ready(&c, LIMIT);
    s.worker("w1", 2);
    s.worker("w2", 2);
    s.worker("w3", 2);
    let pipeline = s.pipeline(200, false);
    let months = ["2024-01", "2024-02", "2024-03"];
    let id = s.submit(&c, &pipeline, "2024-01..2024-03", &datasets_arg());
    wait_results(&mut s.fleet, "first", 3);
    s.fleet.note("SIGKILL worker w1");
    s.fleet.kill("w1");
    wait_results(&mut s.fleet, "first", 6);
    // Paused past three heartbeats: its attempts are declared lost and run elsewhere; the
    // results it sends once resumed are stale.
    s.fleet.note("SIGSTOP worker w2; 5 s; SIGCONT");
    s.fleet.signal("w2", Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(5));
    s.fleet.signal("w2", Signal::SIGCONT);
    wait_results(&mut s.fleet, "first", 10);
    s.fleet.note("SIGSTOP coordinator; 3 s; SIGCONT");
    s.fleet.signal("first", Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    s.fleet.signal("first", Signal::SIGCONT);
    wait_results(&mut s.fleet, "first", 14);
    s.fleet
        .note("SIGKILL coordinator; a new one on its address");
    s.fleet.kill("first");
    let second = s.fleet.serve_on("second", c.addr());
    s.fleet.wait_ready(&second, LIMIT);
    s.worker("w4", 2);
    let summary = s.wait_finished(&second, &id, LIMIT);
    s.assert_intact(&summary, &months, &DATASETS);
}

#[test]
fn a_worker_cut_off_the_broker_loses_no_run() {
    let name = "netcut";
    let ns = Netns::create(name, (std::process::id() % 64) as u8);
    let broker = Broker::start_listening(name, &[&ns.host]);
    let db = Database::start_listening(name, &[&ns.host]);
    let mut s = Scene::with(name, broker, db);
    let c = s.fleet.serve("coordinator");
    s.fleet.wait_ready(&c, LIMIT);
    // The cut-off worker reaches the broker and the database through the namespace's cable.
    let env = s.tool_env(&ns.host);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let url = s.broker.url_at(&ns.host);
    s.fleet
        .worker_via("isolated", 3, &DATAWARP_TOOLS, &env, &url, &ns.wrapper());
    s.worker("w2", 2);
    let pipeline = s.pipeline(200, false);
    let id = s.submit(&c, &pipeline, &months_arg(), &datasets_arg());
    let isolated = s.fleet.dir().join("isolated.log");
    wait_for(LIMIT, "the isolated worker running steps", || {
        std::fs::read_to_string(&isolated)
            .unwrap_or_default()
            .contains("running step")
    });
    // Longer than three heartbeats plus the lost grace: its attempts are declared lost and
    // retried on `w2`; whatever it reports once the cable is back is stale.
    s.fleet.note("cable of `isolated` down; 8 s; up");
    ns.cut();
    std::thread::sleep(Duration::from_secs(8));
    ns.mend();
    let summary = s.wait_finished(&c, &id, LIMIT);
    s.assert_intact(&summary, &months(), &DATASETS);
    drop(s);
    drop(ns);
}

#[test]
fn a_wrong_broker_password_or_vhost_fails_fast_with_exit_2_and_says_why() {
    // The shared broker is only asked, never stopped: a refused login changes nothing on it.
    let mut fleet = Fleet::new("refused");
    let bad = [
        (
            "password",
            "amqp://guest:not-the-password@127.0.0.1:5672/%2f",
            "ACCESS_REFUSED",
        ),
        (
            "vhost",
            "amqp://guest:guest@127.0.0.1:5672/no-such-vhost",
            "NOT_ALLOWED",
        ),
    ];
    for (what, url, word) in bad {
        let id = format!("w_{what}");
        let mut cmd = std::process::Command::new(bin("warpline-worker"));
        cmd.args(["--amqp-url", url, "--allow", "sh", "--worker-id", &id])
            .env("RUST_LOG", "warn");
        let started = Instant::now();
        let out = cmd.output().expect("run the worker");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "worker with a wrong {what}:\n{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the worker took {:?} to give up on a wrong {what}",
            started.elapsed()
        );
        assert!(
            err.contains("refused the connection") && err.contains(word),
            "worker with a wrong {what}:\n{err}"
        );
        assert!(
            !err.contains("not-the-password"),
            "the password was printed:\n{err}"
        );
        assert!(!err.contains("retrying"), "a refusal was retried:\n{err}");

        let name = format!("serve_{what}");
        fleet.amqp_url = url.to_string();
        let c = fleet.serve(&name);
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = fleet.exited(&c.name) {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "serve with a wrong {what} did not exit within 15 s:\n{}",
                fleet.log(&c.name)
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let log = fleet.log(&c.name);
        assert_eq!(status.code(), Some(2), "serve with a wrong {what}:\n{log}");
        assert!(
            log.contains("refused the connection") && log.contains(word),
            "serve with a wrong {what}:\n{log}"
        );
    }
    fleet.amqp_url = warpline_tests::fleet::AMQP_URL.to_string();
}

#[test]
fn a_broker_restart_while_runs_wait_out_a_backoff_loses_no_run() {
    let mut s = Scene::new("broker_backoff");
    let c = s.fleet.serve("coordinator");
    s.fleet.wait_ready(&c, LIMIT);
    s.worker("w1", 3);
    s.worker("w2", 3);
    // Each run waits 3 s after its first ENRICH: the restart below ends inside that wait, so
    // the old session's timers fire after the new session has restored the runs.
    let pipeline = s.pipeline(3000, true);
    let id = s.submit(&c, &pipeline, &months_arg(), &datasets_arg());
    let audit = s.fleet.audit();
    wait_for(LIMIT, "3 retries decided before the restart", || {
        count_lines(&audit, &["\"event\":\"decision\"", "\"action\":\"retry\""]) >= 3
    });
    s.fleet
        .note("broker stop_app (runs waiting out their backoff); start_app");
    s.broker.restart(Duration::ZERO);
    let summary = s.wait_finished(&c, &id, LIMIT);
    assert!(
        s.fleet.exited("coordinator").is_none(),
        "the coordinator exited"
    );
    let tally = s.assert_intact(&summary, &months(), &DATASETS);
    for r in summary["runs"].as_array().unwrap() {
        assert_eq!(
            r["attempts"]["ENRICH"], 2,
            "ENRICH failed once, then passed: {r}"
        );
    }
    assert!(tally.results >= 30, "5 results per run");
}

#[test]
fn a_database_restart_and_a_20_s_outage_mid_backfill_lose_no_run() {
    let mut s = Scene::new("db_restart");
    let c = s.fleet.serve("coordinator");
    s.fleet.wait_ready(&c, LIMIT);
    s.worker("w1", 3);
    s.worker("w2", 3);
    let pipeline = s.pipeline(500, false);
    let id = s.submit(&c, &pipeline, &months_arg(), &datasets_arg());
    wait_results(&mut s.fleet, "coordinator", 3);
    s.fleet.note("pg_ctlcluster restart (fast)");
    s.db.restart(Duration::ZERO);
    wait_results(&mut s.fleet, "coordinator", 10);
    assert!(
        s.fleet.exited("coordinator").is_none(),
        "the coordinator exited on a database restart"
    );
    s.fleet.note("pg_ctlcluster stop; 20 s; start");
    s.db.restart(Duration::from_secs(20));
    let summary = s.wait_finished(&c, &id, LIMIT);
    assert!(
        s.fleet.exited("coordinator").is_none(),
        "the coordinator exited on a database outage"
    );
    s.assert_intact(&summary, &months(), &DATASETS);
}

#[test]
fn a_leader_paused_past_its_lock_commits_nothing_and_the_standby_finishes() {
    let mut s = Scene::new("paused_leader");
    let a = s.fleet.serve("a");
    s.fleet.wait_ready(&a, LIMIT);
    let b = s.fleet.serve("b");
    s.fleet.wait_log("b", "waiting as a standby");
    s.worker("w1", 3);
    s.worker("w2", 3);
    let pipeline = s.pipeline(200, false);
    let id = s.submit(&a, &pipeline, &months_arg(), &datasets_arg());
    wait_results(&mut s.fleet, "a", 4);
    s.fleet
        .note("SIGSTOP a; terminate a's lock backend; b takes over; SIGCONT a");
    s.fleet.signal("a", Signal::SIGSTOP);
    let killed = s.db.terminate_lock_holders();
    assert!(killed >= 1, "a's lock connection was found");
    // A is deposed from here on. Event lines carry the time A decided them; a turn A committed
    // just before the stop may be printed only after it wakes, so they are told apart by that
    // time, not by their position in the log.
    let deposed_at = ms_of_day_now();
    s.fleet.wait_ready(&b, LIMIT);
    // B leads while A's results and heartbeats queue up for it; then A wakes.
    wait_for(LIMIT, "2 results under b", || {
        s.fleet.log("b").matches(" COMPLETE").count() >= 1 || results_so_far(&s.fleet) >= 8
    });
    let audit_before = std::fs::read_to_string(s.fleet.audit()).unwrap_or_default();
    s.fleet.signal("a", Signal::SIGCONT);
    let summary = s.wait_finished(&b, &id, LIMIT);
    assert!(
        s.fleet.exited("b").is_none(),
        "the successor died:\n{}",
        s.fleet.log("b")
    );
    // Whatever A did once resumed, it decided nothing: not one event line (`HH:MM:SS.mmm run
    // ...`, from `--log-events`) stamped after it was deposed.
    let a_after: Vec<String> = s
        .fleet
        .log("a")
        .lines()
        .filter(|l| event_ms_of_day(l).is_some_and(|t| later_in_the_day(t, deposed_at)))
        .map(str::to_string)
        .collect();
    assert!(a_after.is_empty(), "the deposed leader acted: {a_after:#?}");
    let audit_after = std::fs::read_to_string(s.fleet.audit()).unwrap();
    assert!(
        audit_after.starts_with(&audit_before),
        "the audit log was rewritten"
    );
    s.assert_intact(&summary, &months(), &DATASETS);
}

/// The longest any accepted result waited between its tool's end and the coordinator's record
/// of it, over the results finished after `since`.
fn longest_result_wait(records: &[AuditRecord], since: chrono::DateTime<chrono::Utc>) -> Duration {
    records
        .iter()
        .filter_map(|r| match &r.event {
            AuditEvent::StepResult { outcome } => outcome
                .result
                .finished_at
                .filter(|f| *f >= since)
                .map(|f| (r.ts - f).to_std().unwrap_or_default()),
            _ => None,
        })
        .max()
        .unwrap_or_default()
}

#[test]
fn a_leader_stopped_for_good_hands_its_unacked_results_to_the_successor_within_seconds() {
    let mut s = Scene::new("stopped_leader");
    let a = s.fleet.serve("a");
    s.fleet.wait_ready(&a, LIMIT);
    let b = s.fleet.serve("b");
    s.fleet.wait_log("b", "waiting as a standby");
    s.worker("w1", 3);
    s.worker("w2", 3);
    let pipeline = s.pipeline(200, false);
    let id = s.submit(&a, &pipeline, &months_arg(), &datasets_arg());
    wait_results(&mut s.fleet, "a", 4);
    // A stays stopped: its AMQP connection stays open, and the results the broker delivered
    // to it (up to its prefetch) stay unacked on it until the broker gives up on the
    // connection: after the AMQP heartbeat timeout (`--amqp-heartbeat-s`), not RabbitMQ's
    // 60 s default.
    s.fleet
        .note("SIGSTOP a (for good); terminate a's lock backend; b takes over");
    s.fleet.signal("a", Signal::SIGSTOP);
    let stopped = chrono::Utc::now();
    let started = Instant::now();
    assert!(
        s.db.terminate_lock_holders() >= 1,
        "a's lock connection was found"
    );
    s.fleet.wait_ready(&b, LIMIT);
    let took_over = started.elapsed();
    let summary = s.wait_finished(&b, &id, LIMIT);
    let finished = started.elapsed();
    s.assert_intact(&summary, &months(), &DATASETS);
    let wait = longest_result_wait(&s.fleet.audit_records(), stopped);
    eprintln!(
        "stopped leader: b ready {took_over:?} after the stop, backfill finished {finished:?} after it; \
         the longest a result waited for a coordinator: {wait:?}"
    );
    assert!(
        wait < Duration::from_secs(45),
        "a result waited {wait:?} for the successor (the stopped leader held it)"
    );
}
