//! Fleet mode's durable state in PostgreSQL: the [`PgStore`].
//!
//! Each event-loop turn becomes one transaction: the audit records (sealed lines, verbatim),
//! every changed run and backfill, the attempts, decisions and escalations they imply, and the
//! outbox rows of the StepSpecs the turn dispatches. Its statements (one per table, arrays
//! through `unnest`; a table with many rows in one turn gets one per [`ROWS_PER_STATEMENT`])
//! are prepared once per connection and pipelined, so a turn costs about one round trip and
//! its commit; JSON columns are serialised straight from the engine's records, which it
//! lends for the commit ([`Staged`]), without a copy or an intermediate `serde_json::Value`,
//! and the audit lines are the audit log's staged ones. Only after it commits does the JSONL audit
//! file get the same lines, and only then does the engine act (the transactional outbox). A
//! crash between the two writes is repaired at the next start, which appends the lines the file
//! lacks from the database; so the file never holds a line the database does not, and nothing
//! acted on is missing from either. Both writers put a line at its own offset: a deposed leader
//! paused between its commit and its file write, whose successor has since copied that turn
//! from the database, rewrites the same bytes in place when it wakes (its next turn is fenced).
//!
//! With a retention (`serve --retention-days`), the rows of a backfill the engine forgot are
//! deleted after the turn that forgot it, by a task of the store's ([`prune_backfill`], in
//! bounded batches). The file keeps those lines, so the database's chain has gaps from then
//! on: the file is lined up with it by line number, and a file that lacks pruned lines is
//! refused, since no catch-up could make it verify.
//!
//! All tables live in one schema (`--database-schema`, default `warpline`), so that tests and
//! separate fleets can share a server. Migrations are embedded and versioned.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio_postgres::NoTls;
use tokio_postgres::types::{Json, ToSql};
use uuid::Uuid;
use warpline_shared::audit::{self, AuditEvent, AuditRecord};
use warpline_shared::config::Pipeline;
use warpline_shared::contracts::{StepOutcome, StepSpec};

use crate::audit_log::AuditLog;
use crate::engine::{BackfillRecord, RunRecord, Staged, Store, StoreFuture};

/// The embedded migrations, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
    CREATE TABLE backfills (
        id uuid PRIMARY KEY,
        pipeline text NOT NULL,
        priority int NOT NULL,
        record jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE runs (
        id uuid PRIMARY KEY,
        backfill_id uuid NOT NULL REFERENCES backfills(id),
        partition_key text NOT NULL,
        state text NOT NULL,
        record jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX runs_backfill ON runs (backfill_id);
    CREATE TABLE attempts (
        attempt_id uuid PRIMARY KEY,
        run_id uuid NOT NULL,
        step_id text NOT NULL,
        attempt int NOT NULL,
        dispatched_at timestamptz NOT NULL,
        outcome jsonb,
        finished_at timestamptz
    );
    CREATE INDEX attempts_run ON attempts (run_id);
    CREATE TABLE decisions (
        seq bigint PRIMARY KEY,
        run_id uuid NOT NULL,
        step_id text NOT NULL,
        attempt int NOT NULL,
        agent text NOT NULL,
        action text NOT NULL,
        reason text NOT NULL,
        decided_at timestamptz NOT NULL
    );
    CREATE TABLE escalations (
        seq bigint PRIMARY KEY,
        run_id uuid NOT NULL,
        step_id text NOT NULL,
        reason text NOT NULL,
        opened_at timestamptz NOT NULL,
        resolved_at timestamptz,
        resolution jsonb
    );
    CREATE TABLE audit_events (
        seq bigint PRIMARY KEY,
        ts timestamptz NOT NULL,
        backfill_id uuid,
        run_id uuid,
        event text NOT NULL,
        line text NOT NULL
    );
    CREATE INDEX audit_events_run ON audit_events (run_id);
    CREATE TABLE outbox (
        attempt_id uuid PRIMARY KEY,
        run_id uuid NOT NULL,
        pool text NOT NULL,
        spec jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        sent_at timestamptz
    );
    CREATE INDEX outbox_unsent ON outbox (created_at) WHERE sent_at IS NULL;
    "#,
    ),
    (
        2,
        r#"
    -- The leader epoch: bumped by every coordinator that takes the lock; every turn checks it,
    -- so a deposed leader's turn is refused (fencing).
    CREATE TABLE leader (
        id int PRIMARY KEY CHECK (id = 1),
        epoch bigint NOT NULL,
        since timestamptz
    );
    INSERT INTO leader (id, epoch) VALUES (1, 0);
    "#,
    ),
    (
        3,
        r#"
    -- Retention (`serve --retention-days`) deletes a backfill's rows run by run: these let it
    -- find them without reading whole tables. The audit index holds only the backfill-level
    -- lines (those of no run), which are few.
    CREATE INDEX IF NOT EXISTS decisions_run ON decisions (run_id);
    CREATE INDEX IF NOT EXISTS escalations_run ON escalations (run_id);
    CREATE INDEX IF NOT EXISTS outbox_run ON outbox (run_id);
    CREATE INDEX IF NOT EXISTS audit_events_backfill ON audit_events (backfill_id) WHERE run_id IS NULL;
    "#,
    ),
    (
        4,
        r#"
    -- A turn's leader check, sent in the same round trip as the turn's statements: a stale
    -- epoch fails the transaction here (SQLSTATE WL001), so no statement behind it runs.
    CREATE OR REPLACE FUNCTION warpline_hold_epoch(ours bigint) RETURNS void
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
    BEGIN
        PERFORM 1 FROM leader WHERE id = 1 AND epoch = ours FOR SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'leader epoch % is stale', ours USING ERRCODE = 'WL001';
        END IF;
    END
    $fn$;
    "#,
    ),
];

/// The leader check of a fenced turn (migration 4), sent ahead of its statements.
const HOLD_EPOCH: &str = "SELECT warpline_hold_epoch($1)";
/// The SQLSTATE [`HOLD_EPOCH`] fails with when the epoch is stale.
const STALE_EPOCH: &str = "WL001";

/// Most runs whose rows one pruning transaction deletes: a 100,000-run backfill is deleted in
/// a hundred short transactions, none holding its locks or its WAL for long.
pub const PRUNE_BATCH: i64 = 1000;

/// Connects a pool whose connections use `schema`, creating the database if it is missing.
pub async fn connect(url: &str, schema: &str, size: usize) -> anyhow::Result<Pool> {
    check_ident(schema)?;
    let cfg: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("invalid database URL `{}`", redact(url)))?;
    ensure_database(&cfg).await?;
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(mgr)
        .max_size(size)
        .post_create(deadpool_postgres::Hook::async_fn({
            let schema = schema.to_string();
            move |client, _| {
                let sql = format!("SET search_path TO \"{schema}\"");
                Box::pin(async move {
                    client
                        .batch_execute(&sql)
                        .await
                        .map_err(deadpool_postgres::HookError::Backend)
                })
            }
        }))
        .build()
        .context("cannot build the PostgreSQL pool")?;
    let client = pool.get().await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL at `{}`: is it running? (locally: `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`)",
            redact(url)
        )
    })?;
    drop(client);
    Ok(pool)
}

/// Creates the URL's database when it does not exist (tolerating a concurrent creator).
async fn ensure_database(cfg: &tokio_postgres::Config) -> anyhow::Result<()> {
    let Some(db) = cfg.get_dbname().map(str::to_string) else {
        return Ok(());
    };
    let mut admin = cfg.clone();
    admin.dbname("postgres");
    let Ok((client, conn)) = admin.connect(NoTls).await else {
        // No maintenance database to talk to: the pool's own connect will say what is wrong.
        return Ok(());
    };
    tokio::spawn(conn);
    let exists = || async {
        client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
            .await
            .map(|row| row.is_some())
    };
    if !exists().await? {
        check_ident(&db)?;
        if let Err(e) = client
            .batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .await
        {
            // Two creators at once: the loser gets 42P04, or, when both passed the catalog
            // check, a unique violation on pg_database's name index. Either way the database
            // is there now, which is all this wants.
            if !exists().await.unwrap_or(false) {
                return Err(e).with_context(|| format!("cannot create database `{db}`"));
            }
        }
    }
    Ok(())
}

fn check_ident(s: &str) -> anyhow::Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && !s.as_bytes()[0].is_ascii_digit();
    if !ok {
        bail!("invalid name `{s}`: use letters, digits and `_`, not starting with a digit");
    }
    Ok(())
}

/// Hides a password in a URL for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Applies the embedded migrations not yet applied, under a lock so two coordinators starting
/// together do not race.
pub async fn migrate(pool: &Pool, schema: &str) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock(hashtext('warpline-migrate-{schema}'));
         CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         SET LOCAL search_path TO \"{schema}\";
         CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await
    .context("cannot prepare the migrations table")?;
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("migration {version} failed"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tracing::info!(version, schema, "applied migration");
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The leader lock: held on a dedicated connection for as long as this coordinator is active.
pub struct LeaderLock {
    client: tokio_postgres::Client,
    /// Cancelled when the lock's connection ends (then this coordinator must stop leading).
    pub lost: tokio_util::sync::CancellationToken,
    /// This leadership's epoch, one more than the last leader's: every turn of the store
    /// checks it ([`PgStore::fenced`]).
    pub epoch: i64,
}

/// A turn refused because another coordinator took the lead since this one did: its epoch is
/// no longer the database's. Nothing of the turn was committed, dispatched or acknowledged.
#[derive(Debug, thiserror::Error)]
#[error(
    "this coordinator was deposed: leader epoch {ours} is stale (another coordinator took the lead); its turn was not committed"
)]
pub struct Fenced {
    /// The epoch this coordinator led with.
    pub ours: i64,
}

/// Bumps the leader epoch once the advisory lock is ours. A deposed leader paused inside a
/// turn holds the epoch row `FOR SHARE` and would block the bump for as long as it stays
/// paused, so every second the bump waits, the backends blocking it are terminated: their turn
/// rolls back, and a resumed old leader finds its epoch stale (fencing).
async fn take_epoch(
    client: &tokio_postgres::Client,
    url: &str,
    schema: &str,
) -> anyhow::Result<tokio_postgres::Row> {
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let sql = format!(
        "UPDATE \"{schema}\".leader SET epoch = epoch + 1, since = now() WHERE id = 1 RETURNING epoch"
    );
    let bump = client.query_one(&sql, &[]);
    tokio::pin!(bump);
    let mut admin: Option<tokio_postgres::Client> = None;
    loop {
        tokio::select! {
            row = &mut bump => return row.context("cannot take the next leader epoch"),
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if admin.is_none()
                    && let Ok((c, conn)) = tokio_postgres::connect(url, NoTls).await
                {
                    tokio::spawn(conn);
                    admin = Some(c);
                }
                if let Some(c) = &admin {
                    match c
                        .query(
                            "SELECT pg_terminate_backend(b) FROM unnest(pg_blocking_pids($1)) AS b",
                            &[&pid],
                        )
                        .await
                    {
                        Ok(rows) if !rows.is_empty() => tracing::warn!(
                            terminated = rows.len(),
                            "the leader epoch was held by a deposed leader's turn: terminated it"
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot look for what blocks the leader epoch"),
                    }
                }
            }
        }
    }
}

impl LeaderLock {
    /// Waits until this process holds the lock, polling every `poll` (a standby waits here),
    /// then takes the next leader epoch. While PostgreSQL is unreachable (a restart, an
    /// outage) it keeps trying with a capped backoff; a refused login fails at once.
    pub async fn acquire(url: &str, schema: &str, poll: Duration) -> anyhow::Result<LeaderLock> {
        check_ident(schema)?;
        let mut backoff = Duration::from_millis(250);
        let mut said = false;
        loop {
            match Self::try_acquire(url, schema, poll).await {
                Ok(lock) => return Ok(lock),
                Err(e) if is_permanent(&e) => return Err(e),
                Err(e) => {
                    if !said {
                        eprintln!(
                            "warpline serve: {e:#}; retrying until PostgreSQL is back (every {} s at most)",
                            LOCK_BACKOFF_MAX.as_secs()
                        );
                        said = true;
                    }
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "cannot take the leader lock; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(LOCK_BACKOFF_MAX);
                }
            }
        }
    }

    async fn try_acquire(url: &str, schema: &str, poll: Duration) -> anyhow::Result<LeaderLock> {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await.with_context(|| {
            format!(
                "cannot connect to PostgreSQL at `{}` for the leader lock",
                redact(url)
            )
        })?;
        let lost = tokio_util::sync::CancellationToken::new();
        let on_loss = lost.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::error!(error = %e, "the leader lock's connection failed");
            }
            on_loss.cancel();
        });
        let key = format!("warpline-leader-{schema}");
        let mut announced = false;
        loop {
            let row = client
                .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
                .await?;
            if row.get::<_, bool>(0) {
                let row = take_epoch(&client, url, schema).await?;
                return Ok(LeaderLock {
                    client,
                    lost,
                    epoch: row.get(0),
                });
            }
            if !announced {
                tracing::warn!(
                    schema,
                    "another coordinator is active: waiting as a standby"
                );
                eprintln!(
                    "warpline serve: another coordinator holds the lock for schema `{schema}`; waiting as a standby"
                );
                announced = true;
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Checks that the lock's connection still answers.
    pub async fn alive(&self) -> bool {
        self.client.simple_query("SELECT 1").await.is_ok()
    }
}

/// The longest wait between attempts to reach PostgreSQL for the leader lock.
const LOCK_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// True for errors that retrying will not fix: a refused login or a missing role or database
/// permission (SQLSTATE class 28, and 42501).
fn is_permanent(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .filter_map(tokio_postgres::Error::code)
        .any(|code| code.code().starts_with("28") || code.code() == "42501")
}

/// What a restarted coordinator gets back.
pub struct Recovered {
    /// Backfills with their pipelines.
    pub backfills: Vec<(BackfillRecord, Arc<Pipeline>)>,
    /// Every run of them.
    pub runs: Vec<RunRecord>,
    /// StepSpecs stored but never confirmed sent, whose attempts are still outstanding.
    pub unsent: Vec<StepSpec>,
}

/// The PostgreSQL store, with the JSONL audit file as its mirror.
pub struct PgStore {
    pool: Pool,
    audit: AuditLog,
    /// This turn's audit records, as the `audit_events` rows they become.
    records: Vec<StagedLine>,
    /// This turn's audit records that imply rows in other tables ([`Derived`]), in order.
    derived: Vec<AuditRecord>,
    /// Backfills the engine forgot in this turn (retention), pruned once it commits.
    prune: Vec<Uuid>,
    /// Deletes pruned backfills' rows; started at the first.
    pruner: Option<Pruner>,
    /// The leader epoch every turn must still hold (none: not fenced, as in tests).
    epoch: Option<i64>,
}

/// Deletes the rows of the backfills the engine forgot, off the event loop: one backfill at a
/// time, [`PRUNE_BATCH`] runs per transaction, each transaction fenced like a turn. It is
/// aborted with its store (a session's end): a transaction cut short rolls back, and the next
/// session, which recovers what is left of the backfill, forgets and prunes it again.
struct Pruner {
    /// Unbounded, yet bounded in practice: at most one message per backfill ever submitted.
    tx: tokio::sync::mpsc::UnboundedSender<Uuid>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Pruner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pruner {
    fn start(pool: Pool, epoch: Option<i64>) -> Pruner {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Uuid>();
        let task = tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                loop {
                    match prune_backfill(&pool, epoch, id, PRUNE_BATCH).await {
                        Ok(n) => {
                            tracing::info!(
                                backfill_id = %id,
                                runs = n.runs,
                                attempts = n.attempts,
                                decisions = n.decisions,
                                escalations = n.escalations,
                                audit_events = n.audit_events,
                                outbox = n.outbox,
                                transactions = n.transactions,
                                "pruned a backfill's rows (its audit lines stay in the audit file)"
                            );
                            break;
                        }
                        Err(e) if e.downcast_ref::<Fenced>().is_some() => {
                            tracing::warn!(error = %e, "stopped pruning: this coordinator no longer leads");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(backfill_id = %id, error = %format!("{e:#}"), "cannot prune a backfill's rows; retrying in 10 s");
                            tokio::time::sleep(Duration::from_secs(10)).await;
                        }
                    }
                }
            }
        });
        Pruner { tx, task }
    }
}

/// What pruning one backfill deleted: rows per table, and the transactions it took.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// `runs` rows.
    pub runs: u64,
    /// `attempts` rows.
    pub attempts: u64,
    /// `decisions` rows.
    pub decisions: u64,
    /// `escalations` rows.
    pub escalations: u64,
    /// `audit_events` rows (the lines stay in the JSONL audit file).
    pub audit_events: u64,
    /// `outbox` rows.
    pub outbox: u64,
    /// `backfills` rows (1, or 0 when it was gone already).
    pub backfills: u64,
    /// Transactions committed.
    pub transactions: u64,
}

/// Deletes a backfill's rows from every table but its `backfill_pruned` audit lines, at most
/// `batch` runs' rows per transaction,
/// its `backfills` row last (so a pruning cut short leaves a backfill that the next session
/// recovers, with the runs not deleted yet, and prunes again). Each transaction is fenced by
/// `epoch` as a turn is. The caller has made sure the backfill is finished and forgotten: this
/// deletes whatever it finds.
pub async fn prune_backfill(
    pool: &Pool,
    epoch: Option<i64>,
    backfill_id: Uuid,
    batch: i64,
) -> anyhow::Result<Pruned> {
    let mut n = Pruned::default();
    let mut client = pool.get().await?;
    loop {
        let tx = client.transaction().await?;
        check_epoch(&tx, epoch).await?;
        let ids: Vec<Uuid> = tx
            .query(
                "SELECT id FROM runs WHERE backfill_id = $1 LIMIT $2",
                &[&backfill_id, &batch],
            )
            .await
            .context("cannot list a pruned backfill's runs")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if ids.is_empty() {
            n.audit_events += tx
                .execute(
                    "DELETE FROM audit_events WHERE backfill_id = $1 AND run_id IS NULL AND event <> 'backfill_pruned'",
                    &[&backfill_id],
                )
                .await
                .context("cannot delete a pruned backfill's audit events")?;
            n.backfills += tx
                .execute("DELETE FROM backfills WHERE id = $1", &[&backfill_id])
                .await
                .context("cannot delete a pruned backfill")?;
            tx.commit().await?;
            n.transactions += 1;
            return Ok(n);
        }
        for (sql, count) in [
            (
                "DELETE FROM attempts WHERE run_id = ANY($1)",
                &mut n.attempts,
            ),
            (
                "DELETE FROM decisions WHERE run_id = ANY($1)",
                &mut n.decisions,
            ),
            (
                "DELETE FROM escalations WHERE run_id = ANY($1)",
                &mut n.escalations,
            ),
            ("DELETE FROM outbox WHERE run_id = ANY($1)", &mut n.outbox),
            (
                "DELETE FROM audit_events WHERE run_id = ANY($1)",
                &mut n.audit_events,
            ),
            ("DELETE FROM runs WHERE id = ANY($1)", &mut n.runs),
        ] {
            *count += tx
                .execute(sql, &[&ids])
                .await
                .with_context(|| format!("cannot prune: `{sql}` failed"))?;
        }
        tx.commit().await?;
        n.transactions += 1;
    }
}

/// Fails with [`Fenced`] unless `epoch` (when fenced) is still the database's leader epoch.
/// `FOR SHARE` ([`HOLD_EPOCH`]): a successor's epoch bump waits for this transaction, or this
/// one sees it. A turn sends the same check ahead of its statements ([`Statements::run`]).
async fn check_epoch(
    tx: &deadpool_postgres::Transaction<'_>,
    epoch: Option<i64>,
) -> anyhow::Result<()> {
    if let Some(ours) = epoch {
        let st = tx
            .prepare_cached(HOLD_EPOCH)
            .await
            .context("cannot prepare the leader check")?;
        held(tx.execute(&st, &[&ours]).await, ours)?;
    }
    Ok(())
}

/// The answer of [`HOLD_EPOCH`] for epoch `ours`: [`Fenced`] when it is stale.
fn held<T>(answer: Result<T, tokio_postgres::Error>, ours: i64) -> anyhow::Result<()> {
    match answer {
        Ok(_) => Ok(()),
        Err(e) if e.code().map(|c| c.code()) == Some(STALE_EPOCH) => Err(Fenced { ours }.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot check the leader epoch")),
    }
}

/// The hash of line `seq` of the audit file at `path` (a file that verified).
fn hash_of_line(path: &Path, seq: u64) -> anyhow::Result<String> {
    use std::io::BufRead;
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot read the audit log `{}`", path.display()))?;
    let line = std::io::BufReader::new(f)
        .lines()
        .nth(seq as usize - 1)
        .with_context(|| format!("the audit log `{}` has no line {seq}", path.display()))??;
    let (_, hash) = audit::parse_line(&line)
        .map_err(|e| anyhow::anyhow!("`{}` line {seq} does not verify ({e})", path.display()))?;
    Ok(hash)
}

impl PgStore {
    /// Fences every turn with the leader epoch: a turn commits only while `epoch` is still the
    /// database's, so a coordinator that lost the lead (paused, partitioned) cannot commit, and
    /// therefore never publishes or acknowledges, after its successor took over.
    pub fn fenced(mut self, epoch: i64) -> PgStore {
        self.epoch = Some(epoch);
        self
    }

    /// Opens the store: brings the audit file up to the database's last line, then continues
    /// the chain.
    pub async fn open(pool: Pool, audit_path: &Path) -> anyhow::Result<PgStore> {
        // The file is verified whole once here (every line's hash, the chain, the numbers),
        // and the same verification opens it for appending.
        let verified = |path: &Path| {
            let f = std::fs::File::open(path)?;
            anyhow::Ok(audit::verify(std::io::BufReader::new(f)))
        };
        let file = if audit_path.exists() {
            match verified(audit_path)? {
                Ok(v) => v,
                // A write cut short (a crash, a full disk): the database holds every committed
                // line, so drop the torn bytes and let the catch-up below rewrite them.
                Err(e) if e.torn.is_some() => {
                    let keep = e.torn.unwrap_or_default();
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(audit_path)?
                        .set_len(keep)?;
                    tracing::warn!(
                        line = e.line,
                        keep,
                        "audit log had a torn last line; repairing it from the database"
                    );
                    eprintln!(
                        "warpline serve: the audit log `{}` had a torn last line (line {}); repairing it from the database",
                        audit_path.display(),
                        e.line
                    );
                    verified(audit_path)?.map_err(|e| {
                        anyhow::anyhow!(
                            "the audit log `{}` does not verify ({e})",
                            audit_path.display()
                        )
                    })?
                }
                Err(e) => bail!(
                    "the audit log `{}` does not verify ({e})",
                    audit_path.display()
                ),
            }
        } else {
            audit::Verified::empty()
        };
        let file_lines = file.lines;
        // Only the lines the check and the catch-up need are read from the database, not its
        // whole chain (half a gigabyte after a 100,000-partition backfill).
        let client = pool.get().await?;
        let db_last = client
            .query_one("SELECT coalesce(max(seq), 0) FROM audit_events", &[])
            .await?
            .get::<_, i64>(0) as u64;
        // Retention deletes a pruned backfill's lines from the database (never from the
        // file), so its sequence numbers may have gaps: lines are found by number, not place.
        // The file must be a prefix of the database's chain: the newest line both hold (the
        // file's last, or the last before it that the database kept) is the same line.
        if file_lines > 0
            && file_lines <= db_last
            && let Some(row) = client
                .query_opt(
                    "SELECT seq, line FROM audit_events WHERE seq <= $1 ORDER BY seq DESC LIMIT 1",
                    &[&(file_lines as i64)],
                )
                .await?
        {
            let seq = row.get::<_, i64>(0) as u64;
            let line: String = row.get(1);
            let (_, db_hash) = audit::parse_line(&line).map_err(|e| {
                anyhow::anyhow!("the database's audit line {seq} does not verify ({e})")
            })?;
            let file_hash = if seq == file_lines {
                file.head.clone()
            } else {
                hash_of_line(audit_path, seq)?
            };
            if db_hash != file_hash {
                bail!(
                    "the audit log `{}` does not match the database: its line {seq} has hash {file_hash}, the database's {db_hash}; it belongs to another fleet or was edited: give another --audit file",
                    audit_path.display()
                );
            }
        }
        if file_lines > db_last {
            bail!(
                "the audit log `{}` has {file_lines} lines but the database only {db_last}: it belongs to another fleet; give another --audit file",
                audit_path.display()
            );
        }
        let missing = client
            .query(
                "SELECT seq, line FROM audit_events WHERE seq > $1 ORDER BY seq",
                &[&(file_lines as i64)],
            )
            .await?;
        if let Some(next) = missing.first().map(|r| r.get::<_, i64>(0) as u64)
            && next != file_lines + 1
        {
            bail!(
                "the audit log `{}` ends at line {file_lines}, but the database's next line is {next}: lines {}..{} were pruned from the database (--retention-days) and only an audit file can hold them; give the --audit file that holds the whole chain (every coordinator of a schema must share one when retention is on)",
                audit_path.display(),
                file_lines + 1,
                next - 1
            );
        }
        drop(client);
        // Written where the lines belong, as every turn's are: a deposed leader that wakes
        // and writes its last committed turn meanwhile puts the same bytes in the same place.
        let mut audit = AuditLog::open_verified(audit_path, file)?;
        let added = audit.catch_up(missing.iter().map(|r| r.get(1)))?;
        if added > 0 {
            tracing::info!(added, "audit file caught up with the database");
        }
        Ok(PgStore {
            pool,
            audit,
            records: Vec::new(),
            derived: Vec::new(),
            prune: Vec::new(),
            pruner: None,
            epoch: None,
        })
    }

    /// Loads every backfill and run, and the unsent StepSpecs still awaited.
    pub async fn recover(&self) -> anyhow::Result<Recovered> {
        let client = self.pool.get().await?;
        let mut backfills = Vec::new();
        for row in client
            .query("SELECT record FROM backfills ORDER BY created_at", &[])
            .await?
        {
            // Decoded straight from the column's bytes (`Json`), not through a `Value` tree:
            // at 100,000 runs with their histories that tree was most of a restart.
            let Json(rec): Json<BackfillRecord> = row.try_get(0)?;
            let pipeline = rec
                .source
                .load()
                .with_context(|| format!("cannot rebuild the pipeline of backfill {}", rec.id))?;
            backfills.push((rec, Arc::new(pipeline)));
        }
        let mut runs = Vec::new();
        let rows = client.query("SELECT record FROM runs", &[]).await?;
        runs.reserve(rows.len());
        for row in rows {
            let Json(run): Json<RunRecord> = row.try_get(0)?;
            runs.push(run);
        }
        let outstanding: std::collections::HashSet<Uuid> = runs
            .iter()
            .filter_map(|r| r.machine.outstanding().map(|a| a.attempt_id))
            .collect();
        let mut unsent = Vec::new();
        for row in client
            .query(
                "SELECT spec FROM outbox WHERE sent_at IS NULL ORDER BY created_at",
                &[],
            )
            .await?
        {
            let Json(spec): Json<StepSpec> = row.try_get(0)?;
            if outstanding.contains(&spec.attempt_id) {
                unsent.push(spec);
            }
        }
        Ok(Recovered {
            backfills,
            runs,
            unsent,
        })
    }

    /// The first of a turn's two writes ([`Store::commit`] makes both): the transaction that
    /// holds the turn's audit records and `staged`, refused with [`Fenced`] once another
    /// coordinator leads. Separate so that a test can put a pause between the two, as a
    /// SIGSTOP may.
    pub async fn commit_database(&mut self, staged: &Staged<'_>) -> anyhow::Result<()> {
        self.write(staged).await?;
        // The turn that forgot these backfills is durable: nothing will stage their rows
        // again, so they can go.
        for id in std::mem::take(&mut self.prune) {
            let (pool, epoch) = (self.pool.clone(), self.epoch);
            let pruner = self
                .pruner
                .get_or_insert_with(|| Pruner::start(pool, epoch));
            // Fails only once the task ended (deposed): the next leader prunes it.
            let _ = pruner.tx.send(id);
        }
        Ok(())
    }

    /// The second of a turn's two writes: its committed lines into the JSONL file, at the
    /// offsets they occupy in the database's chain (see [`AuditLog::commit`]).
    pub fn commit_mirror(&mut self) -> anyhow::Result<()> {
        self.audit.commit()
    }

    /// A handle for marking outbox rows sent (used by the publisher).
    pub fn pool(&self) -> Pool {
        self.pool.clone()
    }

    async fn write(&mut self, staged: &Staged<'_>) -> anyhow::Result<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut turn = Statements::default();

        let n = self.records.len();
        let mut seqs = Vec::with_capacity(n);
        let mut tss: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut bids: Vec<Option<Uuid>> = Vec::with_capacity(n);
        let mut rids: Vec<Option<Uuid>> = Vec::with_capacity(n);
        let mut names: Vec<&str> = Vec::with_capacity(n);
        let mut lines: Vec<&str> = Vec::with_capacity(n);
        for rec in &self.records {
            seqs.push(rec.seq);
            tss.push(rec.ts);
            bids.push(rec.backfill_id);
            rids.push(rec.run_id);
            names.push(rec.event);
            lines.push(self.audit.staged_line(rec.line.clone()));
        }
        let (seqs, tss, bids) = (rows(&seqs), rows(&tss), rows(&bids));
        let (rids, names, lines) = (rows(&rids), rows(&names), rows(&lines));
        for i in 0..seqs.len() {
            turn.push(
                "audit events",
                "INSERT INTO audit_events (seq, ts, backfill_id, run_id, event, line)
                 SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::uuid[], $4::uuid[], $5::text[], $6::text[])",
                vec![&seqs[i], &tss[i], &bids[i], &rids[i], &names[i], &lines[i]],
            );
        }
        let derived = Derived::of(&self.derived)?;
        derived.push_to(&mut turn);

        // Backfills before runs: a run references its backfill.
        let backfills: Vec<(&BackfillRecord, Json<&BackfillRecord>)> =
            staged.backfills.iter().map(|b| (*b, Json(*b))).collect();
        for (b, json) in &backfills {
            turn.push(
                "a backfill",
                "INSERT INTO backfills (id, pipeline, priority, record, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record, priority = EXCLUDED.priority, updated_at = now()",
                vec![&b.id, &b.pipeline, &b.priority, json, &b.created_at],
            );
        }

        let mut run_ids = Vec::new();
        let mut run_bids = Vec::new();
        let mut keys = Vec::new();
        let mut states = Vec::new();
        let mut recs = Vec::new();
        for r in &staged.runs {
            run_ids.push(r.id);
            run_bids.push(r.backfill_id);
            keys.push(r.scope.key(&r.partition));
            states.push(r.machine.state_name());
            recs.push(Json(r));
        }
        let (run_ids, run_bids, keys) = (rows(&run_ids), rows(&run_bids), rows(&keys));
        let (states, recs) = (rows(&states), rows(&recs));
        for i in 0..run_ids.len() {
            turn.push(
                "runs",
                "INSERT INTO runs (id, backfill_id, partition_key, state, record)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::jsonb[])
                 ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, record = EXCLUDED.record, updated_at = now()",
                vec![&run_ids[i], &run_bids[i], &keys[i], &states[i], &recs[i]],
            );
        }

        let mut out_ids = Vec::new();
        let mut out_rids = Vec::new();
        let mut pools = Vec::new();
        let mut specs = Vec::new();
        for s in &staged.dispatched {
            out_ids.push(s.attempt_id);
            out_rids.push(s.run_id);
            pools.push(s.pool.as_str());
            specs.push(Json(s));
        }
        let (out_ids, out_rids) = (rows(&out_ids), rows(&out_rids));
        let (pools, specs) = (rows(&pools), rows(&specs));
        for i in 0..out_ids.len() {
            turn.push(
                "the outbox",
                "INSERT INTO outbox (attempt_id, run_id, pool, spec)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[])",
                vec![&out_ids[i], &out_rids[i], &pools[i], &specs[i]],
            );
        }

        turn.run(&tx, self.epoch).await?;
        tx.commit().await.context("cannot commit the turn")?;
        self.records.clear();
        self.derived.clear();
        // A large turn's staging (a 100,000-partition submit's) is not kept for the small
        // turns after it.
        if self.records.capacity() > 16_384 {
            self.records = Vec::new();
            self.derived = Vec::new();
        }
        Ok(())
    }
}

/// A staged audit record as its `audit_events` row: the line itself stays among the audit
/// log's staged lines (which the mirror writes after the commit), so it is not held twice.
struct StagedLine {
    seq: i64,
    ts: DateTime<Utc>,
    backfill_id: Option<Uuid>,
    run_id: Option<Uuid>,
    event: &'static str,
    line: std::ops::Range<usize>,
}

/// A statement's parameters.
type Params<'a> = Vec<&'a (dyn ToSql + Sync)>;

/// Most rows of a table one statement stores. A turn that stores more (a 100,000-partition
/// submit: its runs and their audit lines) takes several statements of this many rows, so
/// that the encoded statements in memory at once (see [`IN_FLIGHT`]) are a few MB, not the
/// whole turn's hundreds. They are all in the turn's one transaction.
const ROWS_PER_STATEMENT: usize = 2_000;

/// Statements of a turn sent before the first of them is answered: a usual turn's handful go
/// in one round trip; a large turn's are encoded a few at a time, as earlier ones finish.
const IN_FLIGHT: usize = 8;

/// A column cut into one slice per statement ([`ROWS_PER_STATEMENT`] rows each).
fn rows<T>(column: &[T]) -> Vec<&[T]> {
    column.chunks(ROWS_PER_STATEMENT).collect()
}

/// The statements of one turn, in the order they must run.
///
/// They are pipelined: tokio-postgres sends the request of a future when it is first polled,
/// and PostgreSQL runs a connection's requests one after another in the order received, so a
/// turn costs about one round trip (plus its commit) instead of one per statement. At most
/// [`IN_FLIGHT`] are outstanding at once, started in order. Each statement is prepared once
/// per connection (`prepare_cached`) rather than at every call.
#[derive(Default)]
struct Statements<'a> {
    list: Vec<(&'static str, &'static str, Params<'a>)>,
}

impl<'a> Statements<'a> {
    /// Adds `sql`; `what` names what it stores, for errors.
    fn push(&mut self, what: &'static str, sql: &'static str, params: Params<'a>) {
        self.list.push((what, sql, params));
    }

    /// Runs the statements, after the leader check when the turn is `epoch`'s: the check goes
    /// out first, with the statements behind it in the same round trip (not one round trip
    /// to check, then one to store); a stale epoch fails the transaction in PostgreSQL before
    /// any of them runs, and the turn is refused as [`Fenced`].
    async fn run(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        epoch: Option<i64>,
    ) -> anyhow::Result<()> {
        let hold = match epoch {
            Some(ours) => Some((
                ours,
                tx.prepare_cached(HOLD_EPOCH)
                    .await
                    .context("cannot prepare the leader check")?,
            )),
            None => None,
        };
        // Prepared first (from the cache after a connection's first turns), so that the
        // executes below are sent in order.
        let mut prepared = Vec::with_capacity(self.list.len());
        for (what, sql, _) in &self.list {
            let st = tx
                .prepare_cached(sql)
                .await
                .with_context(|| format!("cannot prepare the statement storing {what}"))?;
            prepared.push(st);
        }
        let executes: Vec<_> = self
            .list
            .iter()
            .zip(&prepared)
            .map(|((what, _, params), st)| async move {
                tx.execute(st, params)
                    .await
                    .with_context(|| format!("cannot store {what}"))
            })
            .collect();
        let held = async {
            match &hold {
                Some((ours, st)) => held(tx.execute(st, &[ours]).await, *ours),
                None => Ok(()),
            }
        };
        // `buffered` polls each future first in the order given, so the requests go out in
        // that order.
        let stored = async {
            let mut done = futures_util::stream::iter(executes).buffered(IN_FLIGHT);
            while let Some(stored) = done.next().await {
                stored?;
            }
            anyhow::Ok(())
        };
        // `join!` polls the check first: its request goes out ahead of the statements. A
        // refused check comes first, as the statements then failed only because of it.
        let (checked, stored) = futures_util::join!(held, stored);
        checked?;
        stored
    }
}

/// The attempts, decisions and escalations tables' rows from a turn's audit records. The
/// frequent ones (dispatches, results, decisions) take one statement each per turn, whatever
/// the number of records; escalations and resolutions, which are rare and may follow each
/// other within a turn, take one statement each, in order.
#[derive(Default)]
struct Derived<'a> {
    dispatched: Dispatched<'a>,
    results: Results<'a>,
    decisions: Decisions<'a>,
    escalations: Vec<Escalation<'a>>,
}

/// An escalation opened (seq, run, step, reason, when) or resolved (run, when, resolution).
enum Escalation<'a> {
    Opened(i64, Option<Uuid>, &'a str, &'a str, DateTime<Utc>),
    Resolved(Option<Uuid>, DateTime<Utc>, serde_json::Value),
}

impl<'a> Derived<'a> {
    /// True for the records [`Derived::of`] makes rows of.
    fn derives(event: &AuditEvent) -> bool {
        matches!(
            event,
            AuditEvent::StepDispatched { .. }
                | AuditEvent::StepResult { .. }
                | AuditEvent::Decision { .. }
                | AuditEvent::Escalated { .. }
                | AuditEvent::OperatorResolution { .. }
        )
    }

    fn of(records: &'a [AuditRecord]) -> anyhow::Result<Derived<'a>> {
        let mut d = Derived::default();
        for rec in records {
            match &rec.event {
                AuditEvent::StepDispatched {
                    step_id,
                    attempt,
                    attempt_id,
                    ..
                } => {
                    d.dispatched.attempt_ids.push(*attempt_id);
                    d.dispatched.run_ids.push(rec.run_id);
                    d.dispatched.step_ids.push(step_id);
                    d.dispatched.attempts.push(*attempt as i32);
                    d.dispatched.at.push(rec.ts);
                }
                AuditEvent::StepResult { outcome } => {
                    d.results.attempt_ids.push(outcome.result.attempt_id);
                    d.results.outcomes.push(Json(outcome));
                    d.results.at.push(rec.ts);
                }
                AuditEvent::Decision {
                    step_id,
                    attempt,
                    agent,
                    decision,
                    ..
                } => {
                    d.decisions.seqs.push(rec.seq as i64);
                    d.decisions.run_ids.push(rec.run_id);
                    d.decisions.step_ids.push(step_id);
                    d.decisions.attempts.push(*attempt as i32);
                    d.decisions.agents.push(agent);
                    d.decisions.actions.push(decision.action.as_str());
                    d.decisions.reasons.push(&decision.reason);
                    d.decisions.at.push(rec.ts);
                }
                AuditEvent::Escalated { step_id, reason } => {
                    d.escalations.push(Escalation::Opened(
                        rec.seq as i64,
                        rec.run_id,
                        step_id,
                        reason,
                        rec.ts,
                    ));
                }
                AuditEvent::OperatorResolution { .. } => {
                    d.escalations.push(Escalation::Resolved(
                        rec.run_id,
                        rec.ts,
                        serde_json::to_value(&rec.event)?,
                    ));
                }
                _ => {}
            }
        }
        Ok(d)
    }

    fn push_to<'s>(&'s self, turn: &mut Statements<'s>) {
        // Dispatches first: a result may name an attempt dispatched in the same turn.
        let d = &self.dispatched;
        if !d.attempt_ids.is_empty() {
            turn.push(
                "attempts",
                "INSERT INTO attempts (attempt_id, run_id, step_id, attempt, dispatched_at)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::timestamptz[])
                 ON CONFLICT (attempt_id) DO NOTHING",
                vec![&d.attempt_ids, &d.run_ids, &d.step_ids, &d.attempts, &d.at],
            );
        }
        let r = &self.results;
        if !r.attempt_ids.is_empty() {
            turn.push(
                "results",
                "UPDATE attempts SET outcome = u.outcome, finished_at = u.at
                 FROM unnest($1::uuid[], $2::jsonb[], $3::timestamptz[]) AS u(attempt_id, outcome, at)
                 WHERE attempts.attempt_id = u.attempt_id",
                vec![&r.attempt_ids, &r.outcomes, &r.at],
            );
        }
        let d = &self.decisions;
        if !d.seqs.is_empty() {
            turn.push(
                "decisions",
                "INSERT INTO decisions (seq, run_id, step_id, attempt, agent, action, reason, decided_at)
                 SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])",
                vec![
                    &d.seqs,
                    &d.run_ids,
                    &d.step_ids,
                    &d.attempts,
                    &d.agents,
                    &d.actions,
                    &d.reasons,
                    &d.at,
                ],
            );
        }
        for e in &self.escalations {
            match e {
                Escalation::Opened(seq, run_id, step_id, reason, at) => turn.push(
                    "an escalation",
                    "INSERT INTO escalations (seq, run_id, step_id, reason, opened_at) VALUES ($1, $2, $3, $4, $5)",
                    vec![seq, run_id, step_id, reason, at],
                ),
                Escalation::Resolved(run_id, at, resolution) => turn.push(
                    "a resolution",
                    "UPDATE escalations SET resolved_at = $2, resolution = $3 WHERE run_id = $1 AND resolved_at IS NULL",
                    vec![run_id, at, resolution],
                ),
            }
        }
    }
}

/// A turn's dispatches, column by column.
#[derive(Default)]
struct Dispatched<'a> {
    attempt_ids: Vec<Uuid>,
    run_ids: Vec<Option<Uuid>>,
    step_ids: Vec<&'a str>,
    attempts: Vec<i32>,
    at: Vec<DateTime<Utc>>,
}

/// A turn's results, column by column.
#[derive(Default)]
struct Results<'a> {
    attempt_ids: Vec<Option<Uuid>>,
    outcomes: Vec<Json<&'a StepOutcome>>,
    at: Vec<DateTime<Utc>>,
}

/// A turn's decisions, column by column.
#[derive(Default)]
struct Decisions<'a> {
    seqs: Vec<i64>,
    run_ids: Vec<Option<Uuid>>,
    step_ids: Vec<&'a str>,
    attempts: Vec<i32>,
    agents: Vec<&'a str>,
    actions: Vec<&'a str>,
    reasons: Vec<&'a str>,
    at: Vec<DateTime<Utc>>,
}

impl Store for PgStore {
    fn record(
        &mut self,
        backfill_id: Option<Uuid>,
        run_id: Option<Uuid>,
        event: AuditEvent,
    ) -> AuditRecord {
        let (rec, line) = self.audit.stage_line(backfill_id, run_id, event);
        self.records.push(StagedLine {
            seq: rec.seq as i64,
            ts: rec.ts,
            backfill_id,
            run_id,
            event: rec.event.name(),
            line,
        });
        if Derived::derives(&rec.event) {
            self.derived.push(rec.clone());
        }
        rec
    }

    fn stage_prune(&mut self, backfill_id: Uuid) {
        self.prune.push(backfill_id);
    }

    fn commit<'a>(&'a mut self, staged: Staged<'a>) -> StoreFuture<'a> {
        Box::pin(async move {
            self.commit_database(&staged).await?;
            // The engine's records are lent only until here; the mirror needs the lines alone.
            drop(staged);
            self.commit_mirror()
        })
    }

    fn audit_location(&self) -> (String, String) {
        (
            self.audit.path().display().to_string(),
            self.audit.head().to_string(),
        )
    }
}

/// Marks outbox rows sent once the broker confirmed them. The commit does not wait for its WAL
/// flush (`synchronous_commit` is off for this transaction only): a mark lost in a crash only
/// means those StepSpecs are published again at the next start, where their duplicates are
/// ignored as stale. The turns' own commits stay synchronous.
pub async fn mark_sent(pool: &Pool, ids: &[Uuid]) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit TO off")
        .await?;
    tx.execute(
        "UPDATE outbox SET sent_at = now() WHERE attempt_id = ANY($1) AND sent_at IS NULL",
        &[&ids],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(check_ident("warpline_t1").is_ok());
        for bad in ["", "1x", "a-b", "a\"b", "a;drop"] {
            assert!(check_ident(bad).is_err(), "{bad}");
        }
    }
}
