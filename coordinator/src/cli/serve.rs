//! `warpline serve`: the fleet coordinator.
//!
//! It serves the HTTP API at once (`/healthz` answers, `/readyz` says 503), then waits for the
//! leader lock: a second coordinator on the same database schema waits here as a standby and
//! takes over when the first dies. Once it leads, it runs *sessions*: recover every backfill and
//! run from PostgreSQL, connect to RabbitMQ, publish again what was stored but never confirmed,
//! and run the event loop. When the broker connection drops, the session ends and a new one
//! recovers from the database; state is never held only in memory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warpline_amqp::FleetArgs;

use crate::api::{ApiPolicy, EngineHandle, ReadyFlag, metrics_router, protect, router_with};
use crate::auth::Auth;
use crate::engine::snapshot::Snapshots;
use crate::engine::{Engine, EngineConfig, Event, Observer, Transport};
use crate::fleet::amqp::{self, LinkConfig};
use crate::fleet::metrics::{self, Metrics, MetricsObserver, StepLatency};
use crate::fleet::pg::{self, Fenced, LeaderLock, PgStore};
use crate::progress::{Lines, Quiet};
use crate::supervisor::AgentKind;
use crate::supervisor::settings::{AgentOverrides, build_agent};
use crate::ui;
use std::sync::Arc;
use warpline_shared::config::AgentConfig;

/// `warpline serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The broker and the fleet's names on it (shared with `warpline-worker`).
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// PostgreSQL (the database is created if missing).
    #[arg(
        long,
        env = "WARPLINE_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/warpline",
        hide_env_values = true
    )]
    pub database_url: String,
    /// The schema holding Warpline's tables (one per fleet).
    #[arg(long, env = "WARPLINE_DATABASE_SCHEMA", default_value = "warpline")]
    pub database_schema: String,
    /// Where the HTTP API listens.
    #[arg(long, env = "WARPLINE_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// The JSONL audit log (mirrors the database's audit table).
    #[arg(long, env = "WARPLINE_AUDIT", default_value = "warpline-audit.jsonl")]
    pub audit: PathBuf,
    /// The supervisor agent.
    #[arg(long, value_enum, default_value_t = AgentKind::Rules)]
    pub agent: AgentKind,
    /// The model for `--agent gemini|openai` (default: the provider's current Flash/mini model).
    #[arg(long, env = "WARPLINE_LLM_MODEL")]
    pub llm_model: Option<String>,
    /// The model endpoint (default: the provider's public API).
    #[arg(long, env = "WARPLINE_LLM_BASE_URL")]
    pub llm_base_url: Option<String>,
    /// Ask the model beside the rules and audit both (the rules' decision is applied).
    #[arg(long)]
    pub shadow: bool,
    /// Worker pools whose queues to declare at start (more are declared as pipelines use them).
    #[arg(long = "pool", default_value = "default")]
    pub pools: Vec<String>,
    /// Print one line per event on standard error.
    #[arg(long)]
    pub log_events: bool,
    /// What the API accepts.
    #[command(flatten)]
    pub api: ApiPolicy,
    /// API tokens, one `ROLE NAME TOKEN` per line (ROLE: viewer or operator); with
    /// `WARPLINE_OPERATOR_TOKEN` / `WARPLINE_VIEWER_TOKEN`.
    #[arg(long, env = "WARPLINE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve a non-loopback address with no token configured (anyone who reaches it may act).
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// Prune a finished backfill (every run final, nothing waiting for an operator) this many
    /// days after its last run ended: its rows leave PostgreSQL and it leaves the API and the
    /// dashboard; its lines stay in the --audit file, which must then be the one file every
    /// coordinator of the schema uses. Unset: keep everything.
    #[arg(long, env = "WARPLINE_RETENTION_DAYS", value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..))]
    pub retention_days: Option<u32>,
}

impl ServeArgs {
    /// `--retention-days` as a duration.
    pub fn retention(&self) -> Option<Duration> {
        self.retention_days
            .map(|d| Duration::from_secs(u64::from(d) * 24 * 60 * 60))
    }
}

/// Refuses to serve a non-loopback address with no token (unless overridden) and says who may
/// use the API.
pub(crate) fn check_exposure(auth: &Auth, http: SocketAddr, allow: bool) -> anyhow::Result<()> {
    if !auth.is_open() {
        eprintln!(
            "warpline serve: API authentication on ({} tokens)",
            auth.len()
        );
        return Ok(());
    }
    if http.ip().is_loopback() {
        eprintln!(
            "warpline serve: no API token configured: listening on loopback only, where anyone \
             on this machine may act; set WARPLINE_OPERATOR_TOKEN or --token-file to serve others"
        );
        return Ok(());
    }
    if !allow {
        anyhow::bail!(
            "refusing to serve the API on `{http}` with no token: anyone who reaches it could \
             submit, cancel and resolve. Set WARPLINE_OPERATOR_TOKEN (and WARPLINE_VIEWER_TOKEN) \
             or --token-file, listen on 127.0.0.1, or pass --allow-unauthenticated on a trusted \
             network"
        );
    }
    eprintln!(
        "warpline serve: WARNING: no API token configured and listening on `{http}` \
         (--allow-unauthenticated): anyone who reaches it may act"
    );
    Ok(())
}

/// The first wait before a new session after one failed; it doubles up to
/// [`SESSION_BACKOFF_MAX`] while sessions keep failing.
const SESSION_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// The longest wait between sessions (a database or broker outage is retried this often).
const SESSION_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A session that ran this long was healthy: the next failure starts the backoff over.
const SESSION_HEALTHY: Duration = Duration::from_secs(30);

/// Why a session ended without an error.
enum Ended {
    /// SIGINT or SIGTERM.
    Shutdown,
    /// The broker connection failed.
    Broker,
    /// The leader lock's database connection ended.
    Lock,
}

/// What every session of one `serve` shares.
struct Session<'a> {
    args: &'a ServeArgs,
    db: &'a deadpool_postgres::Pool,
    tx: &'a mpsc::UnboundedSender<Event>,
    ready: &'a ReadyFlag,
    latency: &'a Arc<StepLatency>,
    prom: &'a Arc<Metrics>,
    agent: &'a crate::supervisor::policy::PolicyAgent,
    signing_key: &'a Option<Vec<u8>>,
    topology: &'a warpline_shared::fleet::Topology,
    shutdown: &'a CancellationToken,
    /// What the leading session's loop publishes for the API's counts-only reads.
    snapshots: &'a Snapshots,
}

impl Session<'_> {
    /// One session: recover from PostgreSQL, connect to RabbitMQ, publish what was stored but
    /// not sent, and run the loop until something ends it. Every turn is fenced by `lock`'s
    /// epoch, so a deposed leader's turn is refused by PostgreSQL ([`Fenced`]).
    async fn run(
        &self,
        lock: &LeaderLock,
        rx: &mut mpsc::UnboundedReceiver<Event>,
    ) -> anyhow::Result<Ended> {
        let args = self.args;
        let store = PgStore::open(self.db.clone(), &args.audit)
            .await?
            .fenced(lock.epoch);
        let recovered = store.recover().await?;
        self.prom.know_pipelines(
            recovered
                .backfills
                .iter()
                .map(|(b, _)| (b.id, b.pipeline.clone())),
        );
        let mut pools = args.pools.clone();
        for (_, p) in &recovered.backfills {
            for s in p.all_steps() {
                if !pools.contains(&s.pool) {
                    pools.push(s.pool.clone());
                }
            }
        }
        self.prom.watch_pools(pools.iter().cloned());
        let link_cfg = LinkConfig {
            url: args.fleet.connection_url(),
            topology: self.topology.clone(),
            pools,
            signing_key: self.signing_key.clone(),
            latency: self.latency.clone(),
        };
        let (mut transport, link) = tokio::select! {
            r = amqp::connect(&link_cfg, self.db.clone(), self.tx.clone()) => r?,
            () = self.shutdown.cancelled() => return Ok(Ended::Shutdown),
            () = lock.lost.cancelled() => return Ok(Ended::Lock),
        };
        // From here the link is open: every way out closes it.
        let ticker = amqp::ticker(self.tx.clone(), link.failed.clone());
        let ended = async {
            let unsent = recovered.unsent.len();
            for spec in recovered.unsent {
                transport.dispatch(spec)?;
            }
            let observer: Box<dyn Observer> = if args.log_events {
                Box::new(Lines::stderr_knowing(
                    recovered.runs.iter().map(|r| (r.id, r.partition.key())),
                ))
            } else {
                Box::new(Quiet)
            };
            let observer = crate::spans::TraceObserver::wrap(Box::new(MetricsObserver::new(
                self.prom.clone(),
                observer,
            )));
            let mut engine = Engine::new(
                EngineConfig {
                    exit_when_idle: false,
                    retention: args.retention(),
                },
                Arc::new(self.agent.clone()),
                Box::new(store),
                Box::new(transport),
                observer,
                self.tx.clone(),
            );
            engine.publish_to(self.snapshots.clone());
            let runs = recovered.runs.len();
            engine.restore(recovered.backfills, recovered.runs);
            tracing::info!(runs, unsent, epoch = lock.epoch, "session started");
            self.ready.set(true);
            self.prom.set_leader(true);
            // Whatever ends the session (a signal, the broker, the lock) stops the loop after
            // its turn; the runs stay as they are for the next session.
            let stop = CancellationToken::new();
            let watch = {
                let (stop, shutdown, failed, lost) = (
                    stop.clone(),
                    self.shutdown.clone(),
                    link.failed.clone(),
                    lock.lost.clone(),
                );
                tokio::spawn(async move {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = failed.cancelled() => {}
                        () = lost.cancelled() => {}
                    }
                    stop.cancel();
                })
            };
            let ran = engine.run_until(rx, stop).await;
            watch.abort();
            ran.map(|_| ())
        }
        .await;
        self.ready.set(false);
        // Reads go to the loop again (a standby's answer until it leads).
        self.snapshots.close();
        self.prom.set_leader(false);
        ticker.abort();
        link.close().await;
        ended?;
        Ok(if self.shutdown.is_cancelled() {
            Ended::Shutdown
        } else if lock.lost.is_cancelled() {
            Ended::Lock
        } else {
            Ended::Broker
        })
    }
}

/// Runs the coordinator until SIGINT/SIGTERM (exit 0) or a fatal error.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    // Before anything connects: a bad token setup or an exposed open API stops here.
    let auth = Arc::new(Auth::load(
        &|k| std::env::var(k).ok(),
        args.token_file.as_deref(),
    )?);
    check_exposure(&auth, args.http, args.allow_unauthenticated)?;
    match args.retention_days {
        Some(days) => eprintln!(
            "warpline serve: retention {days} days: finished backfills are pruned from PostgreSQL {days} days after their last run ended; their audit lines stay in `{}`",
            args.audit.display()
        ),
        None => tracing::debug!("no retention: every backfill is kept"),
    }
    let db = pg::connect(&args.database_url, &args.database_schema, 8).await?;
    pg::migrate(&db, &args.database_schema).await?;
    // Empty means unset, as for every binary of the fleet (`warpline_amqp::signing_key`).
    let signing_key = warpline_amqp::signing_key();
    if signing_key.is_some() {
        eprintln!(
            "warpline serve: signatures required (WARPLINE_SIGNING_KEY): unsigned or forged results are dead-lettered and such heartbeats ignored"
        );
    }
    // The agent is set up before anything runs, so a missing API key stops here.
    let overrides = AgentOverrides {
        kind: Some(args.agent.into()),
        model: args.llm_model.clone(),
        base_url: args.llm_base_url.clone(),
        shadow: args.shadow,
    };
    let agent = build_agent(&AgentConfig::default(), &overrides, &|k| {
        std::env::var(k).ok()
    })?;

    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let ready = ReadyFlag::new();
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("cannot listen on `{}` for the HTTP API", args.http))?;
    let addr = listener.local_addr()?;
    let latency = Arc::new(StepLatency::new());
    let prom = Arc::new(Metrics::new(&latency));
    prom.watch_pools(args.pools.iter().cloned());
    let queues = Arc::new(metrics::Broker::new(
        args.fleet.connection_url(),
        args.fleet.topology(),
    ));
    let sources = Arc::new(metrics::Sources {
        db: db.clone(),
        engine: EngineHandle::new(tx.clone()),
        broker: metrics::Broker::new(args.fleet.connection_url(), args.fleet.topology()),
    });
    // `/metrics` needs no token, like `/healthz`: scrapers rarely carry one, and it names
    // pipelines, steps and counts only (docs/OBSERVABILITY.md).
    let snapshots = Snapshots::default();
    let app = protect(
        router_with(
            EngineHandle::new(tx.clone()).with_snapshots(snapshots.clone()),
            ready.clone(),
            ApiPolicy {
                queues: Some((queues.clone(), args.pools.clone())),
                ..args.api.clone()
            },
        )
        .merge(metrics_router(latency.clone()))
        .merge(ui::router_with(
            EngineHandle::new(tx.clone()),
            ui::Records::Pg(db.clone()),
            auth.clone(),
            Some((queues.clone(), args.pools.clone())),
        )),
        auth,
    )
    .merge(metrics::prometheus_router(prom.clone(), sources));
    let http_stop = shutdown.clone();
    let http = watch_http(
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
        }),
        shutdown.clone(),
    );
    eprintln!("warpline serve: API on http://{addr}");
    eprintln!("warpline serve: dashboard on http://{addr}/");

    let topology = args.fleet.topology();
    let ctx = Session {
        args: &args,
        db: &db,
        tx: &tx,
        ready: &ready,
        latency: &latency,
        prom: &prom,
        agent: &agent,
        signing_key: &signing_key,
        topology: &topology,
        shutdown: &shutdown,
        snapshots: &snapshots,
    };
    // Leadership: wait for the lock (a standby waits here, and so does a leader that lost it),
    // then run sessions until the lock is lost or this coordinator is deposed.
    let code = 'lead: loop {
        let lock = tokio::select! {
            lock = LeaderLock::acquire(&args.database_url, &args.database_schema, Duration::from_secs(1)) => lock?,
            () = shutdown.cancelled() => break ExitCode::SUCCESS,
        };
        eprintln!(
            "warpline serve: leading schema `{}` (leader epoch {})",
            args.database_schema, lock.epoch
        );
        // A session ends when the broker, the database or the lock fails; the next one
        // recovers everything from PostgreSQL. Only a signal, or losing the lead, leaves here.
        let mut backoff = SESSION_BACKOFF_MIN;
        loop {
            let started = std::time::Instant::now();
            let ended = ctx.run(&lock, &mut rx).await;
            if started.elapsed() > SESSION_HEALTHY {
                backoff = SESSION_BACKOFF_MIN;
            }
            match ended {
                Ok(Ended::Shutdown) => break 'lead ExitCode::SUCCESS,
                Ok(Ended::Lock) => {
                    eprintln!(
                        "warpline serve: lost the leader lock's database connection; waiting to lead again"
                    );
                    continue 'lead;
                }
                Ok(Ended::Broker) => eprintln!(
                    "warpline serve: lost RabbitMQ; recovering from the database in {} ms",
                    backoff.as_millis()
                ),
                Err(e) if e.downcast_ref::<Fenced>().is_some() => {
                    eprintln!("warpline serve: {e:#}; standing down to wait as a standby");
                    continue 'lead;
                }
                // A refusal (wrong password or vhost, a bad URL) will not change by waiting.
                Err(e)
                    if e.chain()
                        .filter_map(|c| c.downcast_ref::<warpline_amqp::AmqpError>())
                        .any(|a| !a.is_retryable()) =>
                {
                    return Err(e);
                }
                Err(e) => eprintln!(
                    "warpline serve: the session failed: {e:#}; recovering from the database in {} ms",
                    backoff.as_millis()
                ),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => break 'lead ExitCode::SUCCESS,
            }
            backoff = (backoff * 2).min(SESSION_BACKOFF_MAX);
            if lock.lost.is_cancelled() || !lock.alive().await {
                eprintln!(
                    "warpline serve: the leader lock's database connection is gone; waiting to lead again"
                );
                continue 'lead;
            }
        }
    };
    shutdown.cancel();
    match http.await {
        Ok(Some(why)) => Err(anyhow::anyhow!(
            "the HTTP server stopped: {why}; the coordinator stopped with it (a leader without its API cannot be steered or probed)"
        )),
        Ok(None) => Ok(code),
        Err(e) => Err(anyhow::anyhow!("the HTTP server's watcher failed: {e}")),
    }
}

/// Watches the HTTP server's task: if it ends before `shutdown` (an error, a panic, or an
/// unexpected return), says so and cancels `shutdown`, so `serve` stops with an error instead
/// of leading on without its API, readiness probe or dashboard; a process supervisor then
/// restarts it. Resolves to why it stopped early, or `None` after a normal shutdown.
fn watch_http<E: std::fmt::Display + Send + 'static>(
    http: tokio::task::JoinHandle<Result<(), E>>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Option<String>> {
    tokio::spawn(async move {
        let ended = http.await;
        if shutdown.is_cancelled() {
            return None;
        }
        let why = match ended {
            Ok(Ok(())) => "it returned although no shutdown was asked for".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("its task failed: {e}"),
        };
        eprintln!("warpline serve: the HTTP server stopped: {why}; stopping");
        shutdown.cancel();
        Some(why)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_http_server_that_stops_early_stops_serve() {
        let shutdown = CancellationToken::new();
        let failed = watch_http(
            tokio::spawn(async { Err::<(), _>(std::io::Error::other("accept: EMFILE")) }),
            shutdown.clone(),
        );
        assert_eq!(failed.await.unwrap().as_deref(), Some("accept: EMFILE"));
        assert!(shutdown.is_cancelled(), "serve was not told to stop");

        let shutdown = CancellationToken::new();
        let panicked = watch_http(
            tokio::spawn(async { panic!("handler bug") as Result<(), std::io::Error> }),
            shutdown.clone(),
        );
        assert!(panicked.await.unwrap().unwrap().contains("panicked"));
        assert!(shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn a_server_stopped_by_shutdown_is_not_an_error() {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let watched = watch_http(
            tokio::spawn(async move {
                stop.cancelled().await;
                Ok::<(), std::io::Error>(())
            }),
            shutdown.clone(),
        );
        shutdown.cancel();
        assert_eq!(watched.await.unwrap(), None);
    }
}
