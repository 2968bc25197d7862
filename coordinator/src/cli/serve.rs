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
use crate::engine::{Engine, EngineConfig, Event, Observer, Transport};
use crate::fleet::amqp::{self, LinkConfig};
use crate::fleet::metrics::{self, Metrics, MetricsObserver, StepLatency};
use crate::fleet::pg::{self, LeaderLock, PgStore};
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

/// Runs the coordinator until SIGINT/SIGTERM (exit 0) or a fatal error.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    // Before anything connects: a bad token setup or an exposed open API stops here.
    let auth = Arc::new(Auth::load(
        &|k| std::env::var(k).ok(),
        args.token_file.as_deref(),
    )?);
    check_exposure(&auth, args.http, args.allow_unauthenticated)?;
    let db = pg::connect(&args.database_url, &args.database_schema, 8).await?;
    pg::migrate(&db, &args.database_schema).await?;
    let signing_key = std::env::var("WARPLINE_SIGNING_KEY")
        .ok()
        .map(String::into_bytes);
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
    let sources = Arc::new(metrics::Sources {
        db: db.clone(),
        engine: EngineHandle::new(tx.clone()),
        broker: metrics::Broker::new(args.fleet.amqp_url.clone(), args.fleet.topology()),
    });
    // `/metrics` needs no token, like `/healthz`: scrapers rarely carry one, and it names
    // pipelines, steps and counts only (docs/OBSERVABILITY.md).
    let app = protect(
        router_with(
            EngineHandle::new(tx.clone()),
            ready.clone(),
            args.api.clone(),
        )
        .merge(metrics_router(latency.clone()))
        .merge(ui::router(
            EngineHandle::new(tx.clone()),
            ui::Records::Pg(db.clone()),
            auth.clone(),
        )),
        auth,
    )
    .merge(metrics::prometheus_router(prom.clone(), sources));
    let http_stop = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await
    });
    eprintln!("warpline serve: API on http://{addr}");
    eprintln!("warpline serve: dashboard on http://{addr}/");

    let lock = tokio::select! {
        lock = LeaderLock::acquire(&args.database_url, &args.database_schema, Duration::from_secs(1)) => lock?,
        () = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
    };
    eprintln!("warpline serve: leading schema `{}`", args.database_schema);

    let topology = args.fleet.topology();
    let mut backoff = Duration::from_millis(500);
    let code = loop {
        let store = PgStore::open(db.clone(), &args.audit).await?;
        let recovered = store.recover().await?;
        prom.know_pipelines(
            recovered
                .backfills
                .iter()
                .map(|(b, _)| (b.id, b.pipeline.clone())),
        );
        let mut pools = args.pools.clone();
        for (_, p) in &recovered.backfills {
            for s in p.steps() {
                if !pools.contains(&s.pool) {
                    pools.push(s.pool.clone());
                }
            }
        }
        prom.watch_pools(pools.iter().cloned());
        let link_cfg = LinkConfig {
            url: args.fleet.amqp_url.clone(),
            topology: topology.clone(),
            pools,
            signing_key: signing_key.clone(),
            latency: latency.clone(),
        };
        let (mut transport, link) = tokio::select! {
            r = amqp::connect(&link_cfg, db.clone(), tx.clone()) => r?,
            () = shutdown.cancelled() => break ExitCode::SUCCESS,
        };
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
        let observer = Box::new(MetricsObserver::new(prom.clone(), observer));
        let mut engine = Engine::new(
            EngineConfig {
                exit_when_idle: false,
            },
            Arc::new(agent.clone()),
            Box::new(store),
            Box::new(transport),
            observer,
            tx.clone(),
        );
        let runs = recovered.runs.len();
        engine.restore(recovered.backfills, recovered.runs);
        tracing::info!(runs, unsent, "session started");
        let ticker = amqp::ticker(tx.clone(), link.failed.clone());
        ready.set(true);
        prom.set_leader(true);

        // Whatever ends the session (a signal, the broker, the lock) becomes one Stop event.
        let watch = {
            let (tx, shutdown, failed, lost) = (
                tx.clone(),
                shutdown.clone(),
                link.failed.clone(),
                lock.lost.clone(),
            );
            tokio::spawn(async move {
                let why = tokio::select! {
                    () = shutdown.cancelled() => "shutdown",
                    () = failed.cancelled() => "broker",
                    () = lost.cancelled() => "lock",
                };
                let _ = tx.send(Event::Stop);
                why
            })
        };
        let ended = engine.run(&mut rx).await;
        watch.abort();
        let why = watch.await.unwrap_or("error");
        ended?;
        ready.set(false);
        prom.set_leader(false);
        ticker.abort();
        link.close().await;
        match why {
            "shutdown" => break ExitCode::SUCCESS,
            "lock" => anyhow::bail!(
                "lost the leader lock's database connection: stopping so that a standby can lead"
            ),
            _ => {
                eprintln!(
                    "warpline serve: lost RabbitMQ; recovering from the database in {} ms",
                    backoff.as_millis()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    shutdown.cancel();
    let _ = http.await;
    Ok(code)
}
