//! The PostgreSQL store against the real server: a turn commits to the database and the audit
//! file, recovery returns runs and unsent StepSpecs, and a file behind the database catches up.

use std::sync::Arc;

use tokio::sync::mpsc;
use uuid::Uuid;
use warpline_coordinator::engine::{
    BackfillRequest, Engine, EngineConfig, Event, Observer, Staged, Store, SubmitKey, Transport,
};
use warpline_coordinator::fleet::pg::{self, Fenced, LeaderLock, PgStore};
use warpline_coordinator::progress::Quiet;
use warpline_coordinator::supervisor::RulesAgent;
use warpline_shared::audit::AuditEvent;
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::StepSpec;
use warpline_shared::partition;

const URL: &str = "postgres://postgres@127.0.0.1:5432/warpline_test";

/// Collects what the engine dispatches.
struct Capture(mpsc::UnboundedSender<StepSpec>);

impl Transport for Capture {
    fn dispatch(&mut self, spec: StepSpec) -> anyhow::Result<()> {
        self.0.send(spec)?;
        Ok(())
    }
}

async fn pool(schema: &str) -> deadpool_postgres::Pool {
    let pool = pg::connect(URL, schema, 4).await.unwrap_or_else(|e| {
        panic!("{e:#}\n(start PostgreSQL with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`)")
    });
    pg::migrate(&pool, schema).await.unwrap();
    pool
}

async fn drop_schema(pool: &deadpool_postgres::Pool, schema: &str) {
    let c = pool.get().await.unwrap();
    c.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

#[tokio::test]
async fn turns_commit_and_recover() {
    let schema = format!("pgstore_{}", std::process::id());
    let pool = pool(&schema).await;
    // Migrating twice is a no-op.
    pg::migrate(&pool, &schema).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let cfg = dir.path().join("p.json");
    std::fs::write(
        &cfg,
        r#"{"name": "t", "steps": [{"id": "A", "command": "true"}, {"id": "B", "command": "true"}]}"#,
    )
    .unwrap();
    let pipeline = Arc::new(Pipeline::load(&cfg).unwrap());
    let store = PgStore::open(pool.clone(), &audit).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel();
    let observer: Box<dyn Observer> = Box::new(Quiet);
    let mut engine = Engine::new(
        EngineConfig {
            exit_when_idle: false,
            retention: None,
        },
        Arc::new(RulesAgent),
        Box::new(store),
        Box::new(Capture(sent_tx)),
        observer,
        tx.clone(),
    );
    let bid = Uuid::now_v7();
    engine.submit(BackfillRequest {
        id: bid,
        pipeline,
        partitions: partition::expand(Some("2024-01..2024-03"), None).unwrap(),
        max_parallel: 2,
        priority: 5,
        request: Some(SubmitKey {
            id: "job-7".into(),
            digest: "d".into(),
        }),
        reprocess: Default::default(),
    });
    let loop_ = tokio::spawn(async move { engine.run(&mut rx).await.map(|_| ()) });
    // Two runs start (max_parallel 2); their StepSpecs are dispatched after the commit.
    let a = sent_rx.recv().await.unwrap();
    let b = sent_rx.recv().await.unwrap();
    assert_eq!((a.step_id.as_str(), b.step_id.as_str()), ("A", "A"));
    tx.send(Event::Shutdown {
        reason: "test".into(),
    })
    .unwrap();
    loop_.await.unwrap().unwrap();

    let c = pool.get().await.unwrap();
    let runs: i64 = c
        .query_one("SELECT count(*) FROM runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 3);
    let outbox: i64 = c
        .query_one("SELECT count(*) FROM outbox WHERE sent_at IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outbox, 2);
    let attempts: i64 = c
        .query_one("SELECT count(*) FROM attempts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 2);
    let events: i64 = c
        .query_one("SELECT count(*) FROM audit_events", &[])
        .await
        .unwrap()
        .get(0);
    let file_lines = std::fs::read_to_string(&audit).unwrap().lines().count() as i64;
    assert_eq!(events, file_lines);

    // The shutdown cancelled the runs, so nothing is outstanding and nothing unsent is returned.
    let store = PgStore::open(pool.clone(), &audit).await.unwrap();
    let rec = store.recover().await.unwrap();
    assert_eq!(rec.backfills.len(), 1);
    assert_eq!(rec.backfills[0].0.priority, 5);
    let key = rec.backfills[0]
        .0
        .request
        .as_ref()
        .expect("the request id is stored");
    assert_eq!((key.id.as_str(), key.digest.as_str()), ("job-7", "d"));
    assert_eq!(rec.runs.len(), 3);
    assert!(rec.unsent.is_empty());
    pg::mark_sent(&pool, &[a.attempt_id]).await.unwrap();
    let unsent: i64 = c
        .query_one("SELECT count(*) FROM outbox WHERE sent_at IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(unsent, 1);

    // A file that lost its tail (crash between the two writes) catches up from the database.
    let text = std::fs::read_to_string(&audit).unwrap();
    let kept: Vec<&str> = text.lines().take(3).collect();
    std::fs::write(&audit, kept.join("\n") + "\n").unwrap();
    drop(store);
    let store = PgStore::open(pool.clone(), &audit).await.unwrap();
    assert_eq!(std::fs::read_to_string(&audit).unwrap(), text);
    assert_eq!(store.audit_location().1.len(), 64);
    drop_schema(&pool, &schema).await;
}

/// An engine over a fresh store in `schema` that has accepted a backfill of `months` (one step)
/// starting `max_parallel` runs, not yet committed; with the channel its loop reads and the
/// StepSpecs it dispatches.
async fn large_submit(
    pool: &deadpool_postgres::Pool,
    dir: &std::path::Path,
    months: &str,
    max_parallel: usize,
) -> (
    Engine,
    mpsc::UnboundedSender<Event>,
    mpsc::UnboundedReceiver<Event>,
    mpsc::UnboundedReceiver<StepSpec>,
) {
    let cfg = dir.join("p.json");
    std::fs::write(
        &cfg,
        r#"{"name": "t", "steps": [{"id": "A", "command": "true"}]}"#,
    )
    .unwrap();
    let store = PgStore::open(pool.clone(), &dir.join("audit.jsonl"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (sent_tx, sent_rx) = mpsc::unbounded_channel();
    let mut engine = Engine::new(
        EngineConfig {
            exit_when_idle: false,
            retention: None,
        },
        Arc::new(RulesAgent),
        Box::new(store),
        Box::new(Capture(sent_tx)),
        Box::new(Quiet),
        tx.clone(),
    );
    engine.submit(BackfillRequest {
        id: Uuid::now_v7(),
        pipeline: Arc::new(Pipeline::load(&cfg).unwrap()),
        partitions: partition::expand(Some(months), None).unwrap(),
        max_parallel,
        priority: 0,
        request: None,
        reprocess: Default::default(),
    });
    (engine, tx, rx, sent_rx)
}

async fn count(c: &deadpool_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// A turn with more rows than one statement takes (a large submit: 4,500 runs, their audit
/// lines and 2,100 StepSpecs, several statements per table) commits all of them, and a
/// restarted store recovers the whole backfill from them.
#[tokio::test]
async fn a_turn_of_many_statements_commits_and_recovers_whole() {
    let schema = format!("pgmany_{}", std::process::id());
    let pool = pool(&schema).await;
    let dir = tempfile::tempdir().unwrap();
    let (engine, tx, mut rx, mut sent) =
        large_submit(&pool, dir.path(), "2000-01..2374-12", 2100).await;
    let loop_ = tokio::spawn(async move { engine.run(&mut rx).await.map(|_| ()) });
    // Dispatched only after the submit's turn committed.
    sent.recv().await.unwrap();
    tx.send(Event::Stop).unwrap();
    loop_.await.unwrap().unwrap();

    let c = pool.get().await.unwrap();
    assert_eq!(count(&c, "SELECT count(*) FROM runs").await, 4500);
    assert_eq!(
        count(&c, "SELECT count(*) FROM runs WHERE state <> 'INIT'").await,
        2100
    );
    assert_eq!(count(&c, "SELECT count(*) FROM outbox").await, 2100);
    assert_eq!(count(&c, "SELECT count(*) FROM attempts").await, 2100);
    // 1 backfill_created, 4,500 run_created, 2,100 transitions and as many dispatches.
    let events = count(&c, "SELECT count(*) FROM audit_events").await;
    assert_eq!(events, 1 + 4500 + 2 * 2100);
    let audit = dir.path().join("audit.jsonl");
    let verified = warpline_shared::audit::verify(std::io::BufReader::new(
        std::fs::File::open(&audit).unwrap(),
    ))
    .expect("the audit file verifies");
    assert_eq!(verified.lines as i64, events);
    let db_head: String = c
        .query_one(
            "SELECT line FROM audit_events ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (_, db_hash) = warpline_shared::audit::parse_line(&db_head).unwrap();
    assert_eq!(
        db_hash, verified.head,
        "the file and the database end on the same line"
    );

    let store = PgStore::open(pool.clone(), &audit).await.unwrap();
    let rec = store.recover().await.unwrap();
    assert_eq!(rec.backfills.len(), 1);
    assert_eq!(rec.runs.len(), 4500);
    assert_eq!(rec.unsent.len(), 2100, "nothing was marked sent");
    drop(store);
    drop_schema(&pool, &schema).await;
}

/// A large turn is one transaction: when a statement after the first ones fails (here its
/// audit lines collide with a row already there), nothing of the turn is left, neither the
/// runs and audit lines of the statements that had succeeded nor the backfill, and the audit
/// file gets none of its lines.
#[tokio::test]
async fn a_large_turn_that_fails_leaves_nothing() {
    let schema = format!("pgfail_{}", std::process::id());
    let pool = pool(&schema).await;
    let dir = tempfile::tempdir().unwrap();
    let (engine, _tx, mut rx, _sent) =
        large_submit(&pool, dir.path(), "2000-01..2374-12", 10).await;
    let c = pool.get().await.unwrap();
    // Line 4,400 falls in the turn's third statement of audit lines.
    c.execute(
        "INSERT INTO audit_events (seq, ts, event, line) VALUES (4400, now(), 'x', 'x')",
        &[],
    )
    .await
    .unwrap();
    let err = engine.run(&mut rx).await.err().expect("the turn fails");
    assert!(format!("{err:#}").contains("audit events"), "{err:#}");
    assert_eq!(count(&c, "SELECT count(*) FROM audit_events").await, 1);
    assert_eq!(count(&c, "SELECT count(*) FROM backfills").await, 0);
    assert_eq!(count(&c, "SELECT count(*) FROM runs").await, 0);
    assert_eq!(count(&c, "SELECT count(*) FROM outbox").await, 0);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap(),
        "",
        "the audit file holds no line of a turn that did not commit"
    );
    drop_schema(&pool, &schema).await;
}

/// Fencing: once another coordinator took the lead, a deposed leader's next turn is refused by
/// PostgreSQL (its epoch is stale) and leaves nothing behind; the new leader commits on.
#[tokio::test]
async fn a_deposed_leader_cannot_commit_a_turn() {
    let schema = format!("pgfence_{}", std::process::id());
    let pool = pool(&schema).await;
    let dir = tempfile::tempdir().unwrap();
    let poll = std::time::Duration::from_millis(50);
    let a_lock = LeaderLock::acquire(URL, &schema, poll).await.unwrap();
    let mut a = PgStore::open(pool.clone(), &dir.path().join("a.jsonl"))
        .await
        .unwrap()
        .fenced(a_lock.epoch);
    let note = |why: &str| AuditEvent::BackfillResolution {
        operator: "test".into(),
        action: "continue".into(),
        reason: why.into(),
    };
    a.record(None, None, note("while leading"));
    a.commit(Staged::default()).await.unwrap();

    // A is deposed as after a pause past its lock: its lock's backend goes away.
    let c = pool.get().await.unwrap();
    c.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%leader SET epoch%'",
        &[&format!("\"{schema}\"")],
    )
    .await
    .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), a_lock.lost.cancelled())
        .await
        .expect("the deposed lock notices its connection is gone");
    let b_lock = LeaderLock::acquire(URL, &schema, poll).await.unwrap();
    assert!(
        b_lock.epoch > a_lock.epoch,
        "{} > {}",
        b_lock.epoch,
        a_lock.epoch
    );

    a.record(None, None, note("after being deposed"));
    let err = a.commit(Staged::default()).await.unwrap_err();
    assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");
    let events: i64 = c
        .query_one("SELECT count(*) FROM audit_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 1, "the deposed leader's turn left a row");

    let mut b = PgStore::open(pool.clone(), &dir.path().join("b.jsonl"))
        .await
        .unwrap()
        .fenced(b_lock.epoch);
    b.record(None, None, note("the new leader"));
    b.commit(Staged::default()).await.unwrap();
    drop((a, b, b_lock));
    drop_schema(&pool, &schema).await;
}

/// A leader paused in the middle of a turn holds the epoch row `FOR SHARE` (its turn checks the
/// epoch there); once it is deposed, the next leader's epoch bump would wait on that row lock
/// for as long as the pause lasts. The new leader terminates the backend that blocks it and
/// takes the epoch within seconds, whatever the pause.
#[tokio::test]
async fn a_new_leader_is_not_blocked_by_a_deposed_leaders_open_turn() {
    let schema = format!("pgstuck_{}", std::process::id());
    let pool = pool(&schema).await;
    let poll = std::time::Duration::from_millis(50);
    let a_lock = LeaderLock::acquire(URL, &schema, poll).await.unwrap();

    // A's turn, paused between its epoch check and its commit.
    let (stuck, conn) = tokio_postgres::connect(URL, tokio_postgres::NoTls)
        .await
        .unwrap();
    let stuck_conn = tokio::spawn(conn);
    stuck
        .batch_execute(&format!(
            "BEGIN; SELECT epoch FROM \"{schema}\".leader WHERE id = 1 FOR SHARE"
        ))
        .await
        .unwrap();

    // A is deposed: its lock's backend goes away, the turn's connection stays open.
    let c = pool.get().await.unwrap();
    c.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%leader SET epoch%'",
        &[&format!("\"{schema}\"")],
    )
    .await
    .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), a_lock.lost.cancelled())
        .await
        .expect("the deposed lock notices its connection is gone");

    let b_lock = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        LeaderLock::acquire(URL, &schema, poll),
    )
    .await
    .expect("the new leader took the epoch although the old turn held its row")
    .unwrap();
    assert_eq!(b_lock.epoch, a_lock.epoch + 1);
    assert!(
        stuck.batch_execute("COMMIT").await.is_err(),
        "the deposed turn's backend was not terminated"
    );
    let _ = stuck_conn.await;
    drop(b_lock);
    drop_schema(&pool, &schema).await;
}

/// A leader paused between its turn's two writes (the database committed, the audit file not
/// yet written) is deposed; its successor catches the shared file up from the database and
/// appends its own turn; then the old leader resumes and writes the file half of its turn. The
/// file must still hold every line once, in order: the resumed write lands where the
/// successor already wrote the same bytes. Before, it was appended again, so the file held a
/// result twice (read as an attempt "applied twice") and no longer verified.
#[tokio::test]
async fn a_deposed_leaders_late_file_write_leaves_the_shared_audit_file_intact() {
    let schema = format!("pglate_{}", std::process::id());
    let pool = pool(&schema).await;
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let poll = std::time::Duration::from_millis(50);
    let note = |why: &str| AuditEvent::BackfillResolution {
        operator: "test".into(),
        action: "continue".into(),
        reason: why.into(),
    };
    let a_lock = LeaderLock::acquire(URL, &schema, poll).await.unwrap();
    let mut a = PgStore::open(pool.clone(), &audit_path)
        .await
        .unwrap()
        .fenced(a_lock.epoch);
    a.record(None, None, note("a, mirrored"));
    a.commit(Staged::default()).await.unwrap();
    // A's next turn reaches the database; A is stopped before it writes the file.
    a.record(None, None, note("a, committed, then paused"));
    a.commit_database(&Staged::default()).await.unwrap();

    let c = pool.get().await.unwrap();
    c.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%leader SET epoch%'",
        &[&format!("\"{schema}\"")],
    )
    .await
    .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), a_lock.lost.cancelled())
        .await
        .expect("the deposed lock notices its connection is gone");
    let b_lock = LeaderLock::acquire(URL, &schema, poll).await.unwrap();
    let mut b = PgStore::open(pool.clone(), &audit_path)
        .await
        .unwrap()
        .fenced(b_lock.epoch);
    b.record(None, None, note("b, the new leader"));
    b.commit(Staged::default()).await.unwrap();
    let before = std::fs::read_to_string(&audit_path).unwrap();
    assert_eq!(before.lines().count(), 3, "{before}");

    // A resumes: the file half of its committed turn, then its next turn, which is fenced.
    a.commit_mirror().unwrap();
    assert_eq!(
        std::fs::read_to_string(&audit_path).unwrap(),
        before,
        "the deposed leader's late write changed the file"
    );
    a.record(None, None, note("a, deposed"));
    let err = a.commit(Staged::default()).await.unwrap_err();
    assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");

    b.record(None, None, note("b, again"));
    b.commit(Staged::default()).await.unwrap();
    let text = std::fs::read_to_string(&audit_path).unwrap();
    let v =
        warpline_shared::audit::verify(text.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let rows: Vec<String> = c
        .query("SELECT line FROM audit_events ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(v.lines, 4);
    assert_eq!(
        text,
        rows.join("\n") + "\n",
        "the file mirrors the database"
    );
    drop((a, b, b_lock));
    drop_schema(&pool, &schema).await;
}

/// A worker's answer to `spec`: the step ran with `exit_code`; `error`: the tool could not
/// run (the rules halt), else a failure is unclassified (the rules escalate).
fn outcome(spec: &StepSpec, exit_code: i32, error: Option<&str>) -> Event {
    use warpline_shared::contracts::{
        ReportStatus, SCHEMA_VERSION, StepOutcome, StepResult, ValidationReport,
    };
    let result = StepResult {
        run_id: Some(spec.run_id),
        attempt_id: Some(spec.attempt_id),
        attempt: spec.attempt,
        error: error.map(str::to_string),
        ..StepResult::new(&spec.step_id, exit_code)
    };
    let status = if exit_code == 0 {
        ReportStatus::Pass
    } else {
        ReportStatus::Fail
    };
    Event::Outcome(
        Box::new(StepOutcome {
            schema_version: SCHEMA_VERSION,
            result,
            report: ValidationReport {
                schema_version: SCHEMA_VERSION,
                status,
                checks: vec![],
            },
        }),
        None,
    )
}

/// Rows per table that belong to one backfill (by its runs' ids, kept from before pruning).
async fn rows_of(c: &deadpool_postgres::Client, backfill: Uuid, runs: &[Uuid]) -> Vec<i64> {
    let mut counts = Vec::new();
    for (sql, by_runs) in [
        ("SELECT count(*) FROM backfills WHERE id = $1", false),
        ("SELECT count(*) FROM runs WHERE backfill_id = $1", false),
        (
            "SELECT count(*) FROM audit_events WHERE backfill_id = $1",
            false,
        ),
        ("SELECT count(*) FROM attempts WHERE run_id = ANY($1)", true),
        (
            "SELECT count(*) FROM decisions WHERE run_id = ANY($1)",
            true,
        ),
        (
            "SELECT count(*) FROM escalations WHERE run_id = ANY($1)",
            true,
        ),
        ("SELECT count(*) FROM outbox WHERE run_id = ANY($1)", true),
    ] {
        let row = if by_runs {
            c.query_one(sql, &[&runs]).await
        } else {
            c.query_one(sql, &[&backfill]).await
        };
        counts.push(row.unwrap().get(0));
    }
    counts
}

/// Retention: of four backfills, only the finished one whose last run ended long ago is
/// pruned — from every table and from the engine; a finished recent one, an old one still
/// running and an old one waiting for an operator keep every row. The audit file keeps every line and still verifies, a restart on it
/// opens over the gaps, a fresh file is refused (it could not hold the pruned lines), and a
/// `missing` reprocess runs the pruned backfill's partitions again.
#[tokio::test]
async fn retention_prunes_only_old_finished_backfills() {
    let schema = format!("pgretain_{}", std::process::id());
    let pool = pool(&schema).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let cfg = dir.path().join("p.json");
    std::fs::write(
        &cfg,
        r#"{"name": "t", "steps": [{"id": "A", "command": "true", "max_attempts": 1}]}"#,
    )
    .unwrap();
    let pipeline = Arc::new(Pipeline::load(&cfg).unwrap());
    let lock = LeaderLock::acquire(URL, &schema, std::time::Duration::from_millis(50))
        .await
        .unwrap();
    let request = |months: &str, max_parallel: usize| BackfillRequest {
        id: Uuid::now_v7(),
        pipeline: pipeline.clone(),
        partitions: partition::expand(Some(months), None).unwrap(),
        max_parallel,
        priority: 0,
        request: None,
        reprocess: Default::default(),
    };
    let engine_on = |store: PgStore, tx: &mpsc::UnboundedSender<Event>, sent| {
        Engine::new(
            EngineConfig {
                exit_when_idle: false,
                retention: Some(std::time::Duration::from_secs(30 * 24 * 3600)),
            },
            Arc::new(RulesAgent),
            Box::new(store),
            Box::new(Capture(sent)),
            Box::new(Quiet),
            tx.clone(),
        )
    };

    // One session: `old` ends (one run complete, one halted), `recent` completes, `running`
    // has a step out and a partition not started, `stuck`'s run is escalated.
    let store = PgStore::open(pool.clone(), &audit)
        .await
        .unwrap()
        .fenced(lock.epoch);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel();
    let mut engine = engine_on(store, &tx, sent_tx);
    let (old, recent, running, stuck) = (
        request("2024-01..2024-02", 2),
        request("2023-06", 1),
        request("2025-01..2025-02", 1),
        request("2022-01", 1),
    );
    let (old_id, recent_id, running_id, stuck_id) = (old.id, recent.id, running.id, stuck.id);
    for r in [old, recent, running, stuck] {
        engine.submit(r);
    }
    let loop_ = tokio::spawn(async move { engine.run(&mut rx).await.map(|_| ()) });
    let mut specs = Vec::new();
    for _ in 0..5 {
        specs.push(sent_rx.recv().await.unwrap());
    }
    let c = pool.get().await.unwrap();
    let mut old_specs = Vec::new();
    for s in &specs {
        let b: Uuid = c
            .query_one("SELECT backfill_id FROM runs WHERE id = $1", &[&s.run_id])
            .await
            .unwrap()
            .get(0);
        if b == recent_id {
            // First, so that the chain's last line is one of `old`'s (pruned below).
            tx.send(outcome(s, 0, None)).unwrap();
        } else if b == stuck_id {
            tx.send(outcome(s, 1, None)).unwrap();
        } else if b == old_id {
            old_specs.push(s.clone());
        }
    }
    assert_eq!(old_specs.len(), 2);
    tx.send(outcome(&old_specs[0], 0, None)).unwrap();
    tx.send(outcome(&old_specs[1], 1, Some("no such file")))
        .unwrap();
    tx.send(Event::Stop).unwrap();
    loop_.await.unwrap().unwrap();

    // `old`, `running` and `stuck` were created, and `old` ended, two months before now.
    let c = pool.get().await.unwrap();
    let long_ago = (chrono::Utc::now() - chrono::Duration::days(60)).to_rfc3339();
    let aged = [old_id, running_id, stuck_id];
    c.execute(
        "UPDATE backfills SET record = jsonb_set(record, '{created_at}', to_jsonb($2::text)) WHERE id = ANY($1)",
        &[&aged.as_slice(), &long_ago],
    )
    .await
    .unwrap();
    let n = c
        .execute(
            "UPDATE runs SET record = jsonb_set(record, '{finished_at}', to_jsonb($2::text))
             WHERE backfill_id = ANY($1) AND record->>'finished_at' IS NOT NULL",
            &[&aged.as_slice(), &long_ago],
        )
        .await
        .unwrap();
    assert_eq!(n, 2, "old's two runs ended, none of the others'");
    let mut runs_of = std::collections::HashMap::<Uuid, Vec<Uuid>>::new();
    for row in c
        .query("SELECT id, backfill_id FROM runs", &[])
        .await
        .unwrap()
    {
        runs_of.entry(row.get(1)).or_default().push(row.get(0));
    }
    let before_old = rows_of(&c, old_id, &runs_of[&old_id]).await;
    let before_recent = rows_of(&c, recent_id, &runs_of[&recent_id]).await;
    let before_running = rows_of(&c, running_id, &runs_of[&running_id]).await;
    let before_stuck = rows_of(&c, stuck_id, &runs_of[&stuck_id]).await;
    // backfills, runs, audit events, attempts, decisions, escalations, outbox.
    assert_eq!(before_old, [1, 2, before_old[2], 2, 2, 0, 2]);
    assert!(before_old[2] >= 10, "{before_old:?}");
    assert_eq!(before_running[..2], [1, 2]);
    assert_eq!(before_stuck[5], 1, "stuck's escalation is open");
    let file_before = std::fs::read_to_string(&audit).unwrap();
    let db_lines: i64 = c
        .query_one("SELECT count(*) FROM audit_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(file_before.lines().count() as i64, db_lines);

    // The next session, with 30 days' retention: its first tick forgets `old`, and the store
    // deletes its rows.
    let store = PgStore::open(pool.clone(), &audit)
        .await
        .unwrap()
        .fenced(lock.epoch);
    let recovered = store.recover().await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (sent_tx, _sent_rx) = mpsc::unbounded_channel();
    let mut engine = engine_on(store, &tx, sent_tx);
    engine.restore(recovered.backfills, recovered.runs);
    assert!(engine.holds(old_id) && engine.run_count() == 6);
    assert_eq!(engine.expired(chrono::Utc::now()), [old_id]);
    let loop_ = tokio::spawn(async move { engine.run(&mut rx).await });
    tx.send(Event::Tick).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rows_of(&c, old_id, &runs_of[&old_id]).await[0] > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the old backfill was not pruned"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Every row of old's is gone but the record of its pruning.
    assert_eq!(
        rows_of(&c, old_id, &runs_of[&old_id]).await,
        [0, 0, 1, 0, 0, 0, 0]
    );
    let pruned: String = c
        .query_one(
            "SELECT event FROM audit_events WHERE backfill_id = $1",
            &[&old_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pruned, "backfill_pruned");
    assert_eq!(
        rows_of(&c, recent_id, &runs_of[&recent_id]).await,
        before_recent
    );
    assert_eq!(
        rows_of(&c, running_id, &runs_of[&running_id]).await,
        before_running
    );
    assert_eq!(
        rows_of(&c, stuck_id, &runs_of[&stuck_id]).await,
        before_stuck
    );
    let left: i64 = c
        .query_one("SELECT count(*) FROM audit_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        left,
        db_lines - before_old[2] + 1,
        "only old's lines went, and its pruning was recorded"
    );
    // The file's last line before the pruning was one of old's, which the database no longer
    // has: the file still opens against it.
    let last = file_before.lines().last().unwrap();
    assert!(last.contains(&old_id.to_string()), "{last}");
    PgStore::open(pool.clone(), &audit).await.unwrap();

    // Its partitions count as never run: a `missing` reprocess over them and `recent`'s runs
    // both of old's, and skips the completed one.
    let (reply, answer) = tokio::sync::oneshot::channel();
    let mut again = request("2023-06..2024-02", 4);
    again.reprocess = warpline_coordinator::reprocess::Reprocess::Missing;
    again
        .partitions
        .retain(|p| ["2023-06", "2024-01", "2024-02"].contains(&p.key().as_str()));
    tx.send(Event::Submit(Box::new(again), Some(reply)))
        .unwrap();
    let submitted = answer.await.unwrap().unwrap();
    assert_eq!(submitted.runs, 2);
    assert_eq!(submitted.skipped.complete, 1);
    tx.send(Event::Stop).unwrap();
    let engine = loop_.await.unwrap().unwrap();
    assert!(!engine.holds(old_id));
    assert!(engine.holds(recent_id) && engine.holds(running_id) && engine.holds(stuck_id));
    assert_eq!(
        engine.run_count(),
        1 + 2 + 1 + 2,
        "recent's, running's, stuck's and the new one's"
    );
    drop(engine);

    // The file lost nothing and still verifies; it opens again over the database's gaps (its
    // last line, one of old's, is no longer in the database); a fresh file cannot.
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(text.starts_with(&file_before), "the file was rewritten");
    let v = warpline_shared::audit::verify(text.as_bytes()).unwrap();
    assert!(v.lines as i64 > db_lines);
    assert!(
        text.lines()
            .filter(|l| l.contains(&old_id.to_string()))
            .count() as i64
            >= before_old[2]
    );
    PgStore::open(pool.clone(), &audit).await.unwrap();
    // A copy from before the pruning ends in a line the database no longer has: it is checked
    // against the last line both hold, then caught up from the pruning record on.
    let behind = dir.path().join("behind.jsonl");
    std::fs::write(&behind, &file_before).unwrap();
    PgStore::open(pool.clone(), &behind).await.unwrap();
    assert_eq!(std::fs::read_to_string(&behind).unwrap(), text);
    let err = PgStore::open(pool.clone(), &dir.path().join("fresh.jsonl"))
        .await
        .err()
        .expect("a fresh file cannot be caught up over pruned lines");
    assert!(format!("{err:#}").contains("--retention-days"), "{err:#}");

    // The deletion itself, in batches of one run: each its own transaction, fenced.
    let err = pg::prune_backfill(&pool, Some(lock.epoch - 1), running_id, 1)
        .await
        .unwrap_err();
    assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");
    let n = pg::prune_backfill(&pool, Some(lock.epoch), running_id, 1)
        .await
        .unwrap();
    assert_eq!((n.runs, n.backfills, n.attempts), (2, 1, 1));
    assert_eq!(
        n.transactions, 3,
        "two batches of one run, then the backfill"
    );
    assert_eq!(rows_of(&c, running_id, &runs_of[&running_id]).await, [0; 7]);
    drop(lock);
    drop_schema(&pool, &schema).await;
}
