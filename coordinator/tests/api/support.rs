//! The harness: the real engine (rules agent, audit log in a temporary directory, local
//! workers that may run `sh`) behind the real router, served on a free port; helpers to write
//! shell pipelines and to poll a backfill until it finishes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warpline_coordinator::api::{ApiPolicy, EngineHandle, ReadyFlag, router_with};
use warpline_coordinator::audit_log::AuditLog;
use warpline_coordinator::engine::{Engine, EngineConfig, Event};
use warpline_coordinator::local::{LocalFleet, LocalStopper};
use warpline_coordinator::progress::Quiet;
use warpline_coordinator::supervisor::RulesAgent;
use warpline_executor::ExecConfig;

/// Local workers the engine drives in every test.
const WORKERS: usize = 4;
/// Room in the local work queue: more than all the tests' `max_parallel` together.
const QUEUE: usize = 256;

/// A coordinator serving the API on 127.0.0.1 with a port of its own.
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The flag `/readyz` reports and `/v1/*` is gated on; the harness sets it (a leader).
    pub ready: ReadyFlag,
    /// Pipelines, workdirs and the audit log live here.
    pub dir: tempfile::TempDir,
    http: reqwest::Client,
    events: mpsc::UnboundedSender<Event>,
    stop_http: CancellationToken,
    http_task: JoinHandle<()>,
    engine_task: JoinHandle<anyhow::Result<Engine>>,
    stopper: LocalStopper,
    /// Releases an engine started by [`Server::start_paused`].
    release: Option<tokio::sync::oneshot::Sender<()>>,
}

/// How a test's server is set up.
pub struct Setup {
    /// The API's limits and pipeline restrictions.
    pub policy: ApiPolicy,
    /// How long a handler waits for the loop.
    pub timeout: Duration,
    /// Whether the loop waits for [`Server::release`] before it takes any event.
    pub paused: bool,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            policy: ApiPolicy::default(),
            timeout: warpline_coordinator::api::DEFAULT_ENGINE_TIMEOUT,
            paused: false,
        }
    }
}

impl Server {
    /// Starts the engine, the workers and the HTTP server.
    pub async fn start() -> Server {
        Server::start_with(Setup::default()).await
    }

    /// Starts the server as `setup` says.
    pub async fn start_with(setup: Setup) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditLog::open(dir.path().join("audit.jsonl")).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let exec = ExecConfig::new("test", ["sh".to_string()]);
        let fleet = LocalFleet::start(WORKERS, QUEUE, exec, tx.clone());
        let stopper = fleet.stopper();
        let engine = Engine::new(
            EngineConfig {
                exit_when_idle: false,
                retention: None,
            },
            Arc::new(RulesAgent),
            Box::new(store),
            Box::new(fleet),
            Box::new(Quiet),
            tx.clone(),
        );
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let paused = setup.paused;
        let engine_task = tokio::spawn(async move {
            if paused {
                let _ = released.await;
            }
            let mut rx = rx;
            engine.run(&mut rx).await
        });
        let ready = ReadyFlag::new();
        ready.set(true);
        let handle = EngineHandle::new(tx.clone()).with_timeout(setup.timeout);
        let app = router_with(handle, ready.clone(), setup.policy);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop_http = CancellationToken::new();
        let http_task = tokio::spawn({
            let stop = stop_http.clone().cancelled_owned();
            async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
                    .unwrap();
            }
        });
        Server {
            url,
            ready,
            dir,
            http: reqwest::Client::new(),
            events: tx,
            stop_http,
            http_task,
            engine_task,
            stopper,
            release: paused.then_some(release),
        }
    }

    /// Lets a paused engine's loop start taking events.
    pub fn release(&mut self) {
        if let Some(r) = self.release.take() {
            let _ = r.send(());
        }
    }

    /// Stops the HTTP server, the loop (cancelling unfinished runs) and the workers.
    pub async fn stop(mut self) {
        self.release();
        self.stop_http.cancel();
        self.http_task.await.unwrap();
        let _ = self.events.send(Event::Shutdown {
            reason: "test over".into(),
        });
        self.engine_task.await.unwrap().unwrap();
        assert!(self.stopper.stop(Duration::from_secs(10)).await);
    }

    /// `GET path` → (status, JSON body).
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self.http.get(format!("{}{path}", self.url)).send().await;
        read(resp.unwrap()).await
    }

    /// `POST path` with raw bytes as a JSON body → (status, JSON body).
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        read(resp.unwrap()).await
    }

    /// The submit body for a pipeline file, with extra request fields.
    pub fn submit_body(file: &str, extra: Value) -> Value {
        let mut body = json!({
            "pipeline_file": file,
            "pipeline": serde_json::from_str::<Value>(&std::fs::read_to_string(file).unwrap()).unwrap(),
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    }

    /// `POST path` with a JSON body → (status, JSON body).
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await;
        read(resp.unwrap()).await
    }

    /// Writes a pipeline of shell steps to `<dir>/<name>/pipeline.json` (workdir `work`
    /// beside it, 10 ms backoff) and returns its absolute path.
    pub fn pipeline(&self, name: &str, steps: Value) -> String {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pipeline.json");
        std::fs::write(&path, pipeline_json(name, steps).to_string()).unwrap();
        path.display().to_string()
    }

    /// Submits a pipeline file with extra request fields; returns the backfill id.
    pub async fn submit(&self, file: &str, extra: Value) -> String {
        let body = Server::submit_body(file, extra);
        let (status, resp) = self.post("/v1/backfills", body).await;
        assert_eq!(status, StatusCode::CREATED, "{resp}");
        resp["backfill_id"].as_str().unwrap().to_string()
    }

    /// Polls a backfill's summary until `done` holds (or panics after `limit`).
    pub async fn wait_for(
        &self,
        id: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let (status, summary) = self.get(&format!("/v1/backfills/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{summary}");
            if done(&summary) {
                return summary;
            }
            assert!(
                started.elapsed() < limit,
                "backfill {id} not done after {limit:?}: {summary:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until the backfill is finished.
    pub async fn wait_finished(&self, id: &str) -> Value {
        self.wait_for(id, Duration::from_secs(60), |s| s["finished"] == true)
            .await
    }
}

/// A shell pipeline's config.
pub fn pipeline_json(name: &str, steps: Value) -> Value {
    json!({
        "name": name,
        "workdir": "work",
        "retry": {"initial_ms": 10},
        "lost_grace_s": 5,
        "steps": steps,
    })
}

async fn read(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {text}"));
    (status, body)
}

/// The run of a summary with this partition key.
pub fn run_of<'a>(summary: &'a Value, partition: &str) -> &'a Value {
    summary["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["partition"] == partition)
        .unwrap_or_else(|| panic!("no run {partition} in {summary:#}"))
}

/// Sum of attempts over every run and step of a summary.
pub fn total_attempts(summary: &Value) -> u64 {
    summary["runs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["attempts"].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum()
}
