//! The PostgreSQL store against the real server: a turn commits to the database and the audit
//! file, recovery returns runs and unsent StepSpecs, and a file behind the database catches up.

use std::sync::Arc;

use tokio::sync::mpsc;
use uuid::Uuid;
use warpline_coordinator::engine::{
    BackfillRequest, Engine, EngineConfig, Event, Observer, Store, SubmitKey, Transport,
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
    a.commit().await.unwrap();

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
    let err = a.commit().await.unwrap_err();
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
    b.commit().await.unwrap();
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
    a.commit().await.unwrap();
    // A's next turn reaches the database; A is stopped before it writes the file.
    a.record(None, None, note("a, committed, then paused"));
    a.commit_database().await.unwrap();

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
    b.commit().await.unwrap();
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
    let err = a.commit().await.unwrap_err();
    assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");

    b.record(None, None, note("b, again"));
    b.commit().await.unwrap();
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
