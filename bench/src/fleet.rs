//! One isolated fleet: a coordinator (`warpline serve`) and N workers (`warpline-worker`) as
//! real processes, with their own PostgreSQL schema, queue prefix, HTTP port and directory.
//!
//! [`Fleet::stop`] sends SIGTERM to each process it started (by PID), waits for them, drops the
//! schema, deletes the prefixed queues and exchanges and removes the directory. Should the
//! benchmark fail before that, dropping the [`Fleet`] kills the processes it started, so
//! nothing is left running; the schema and queues then stay behind, named `bench_<pid>_<n>`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use warpline_amqp as amqp;
use warpline_coordinator::fleet::metrics::LatencySnapshot;
use warpline_shared::fleet::Topology;

use crate::measure::ServicePorts;

/// Where the binaries are and which services to use.
#[derive(Debug, Clone)]
pub struct Services {
    /// The directory holding `warpline` and `warpline-worker`.
    pub bin_dir: PathBuf,
    /// RabbitMQ.
    pub amqp_url: String,
    /// PostgreSQL (the coordinator creates the database if it is missing).
    pub database_url: String,
    /// Leave the directory (logs, audit log) behind for inspection.
    pub keep: bool,
    /// Where each fleet's workdir (the steps' run directories and logs) is made.
    pub workdir_root: PathBuf,
    /// Specs each worker may hold beyond its slots (`--prefetch` slots + this).
    pub prefetch_extra: u16,
}

impl Services {
    /// The ports RabbitMQ and PostgreSQL listen on.
    pub fn ports(&self) -> ServicePorts {
        ServicePorts::of(&self.amqp_url, &self.database_url)
    }
}

/// The shape of a fleet.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Worker processes.
    pub workers: usize,
    /// Slots per worker (`--slots`; the prefetch is these and [`Services::prefetch_extra`]).
    pub slots: u16,
}

/// A running fleet.
pub struct Fleet {
    /// `bench_<pid>_<n>`: the schema, and (with a dot) the queue prefix.
    pub name: String,
    services: Services,
    dir: tempfile::TempDir,
    /// The pipeline's workdir (step logs), under [`Services::workdir_root`].
    work: tempfile::TempDir,
    /// The API's base URL.
    pub api: String,
    port: u16,
    /// What every process gets in its environment.
    env: Vec<(String, String)>,
    coordinator: Option<Child>,
    workers: Vec<Child>,
    http: reqwest::Client,
}

impl Fleet {
    /// Starts the coordinator, waits until it is ready, then starts the workers; `env` is set
    /// on every process (e.g. the `OTEL_*` variables of the tracing scenario).
    pub async fn start(
        services: &Services,
        shape: Shape,
        env: &[(String, String)],
    ) -> anyhow::Result<Fleet> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "bench_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("warpline-{name}-"))
            .tempdir()
            .context("cannot create the benchmark's directory")?;
        let work = tempfile::Builder::new()
            .prefix(&format!("warpline-{name}-work-"))
            .tempdir_in(&services.workdir_root)
            .with_context(|| {
                format!(
                    "cannot create a workdir under `{}`",
                    services.workdir_root.display()
                )
            })?;
        let port = free_port()?;
        let api = format!("http://127.0.0.1:{port}");
        let mut fleet = Fleet {
            name,
            services: services.clone(),
            dir,
            work,
            api,
            port,
            env: env.to_vec(),
            coordinator: None,
            workers: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        };
        let serve = fleet.spawn_coordinator(port)?;
        fleet.coordinator = Some(serve);
        fleet.wait_ready().await?;
        for i in 0..shape.workers {
            let worker = Command::new(services.bin_dir.join("warpline-worker"))
                .arg("--amqp-url")
                .arg(&services.amqp_url)
                .arg("--queue-prefix")
                .arg(fleet.prefix())
                .arg("--slots")
                .arg(shape.slots.to_string())
                // Only when asked: an older `--bin-dir` build has no such flag.
                .args(
                    (services.prefetch_extra > 0)
                        .then(|| {
                            let n = shape.slots.saturating_add(services.prefetch_extra);
                            ["--prefetch".to_string(), n.to_string()]
                        })
                        .into_iter()
                        .flatten(),
                )
                .args(["--allow", "true,sleep"])
                .arg("--worker-id")
                .arg(format!("{}-w{i}", fleet.name))
                .env_remove("RUST_LOG")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(&fleet.dir.path().join(format!("worker-{i}.log")))?)
                .spawn()
                .context("cannot start `warpline-worker`")?;
            fleet.workers.push(worker);
        }
        fleet.wait_workers(shape.workers).await?;
        Ok(fleet)
    }

    fn spawn_coordinator(&self, port: u16) -> anyhow::Result<Child> {
        Command::new(self.services.bin_dir.join("warpline"))
            // `warn`: the submit scenario runs without workers, and the others must not race
            // the workers' first heartbeats.
            .args(["serve", "--agent", "rules", "--fleet-check", "warn"])
            .arg("--amqp-url")
            .arg(&self.services.amqp_url)
            .arg("--database-url")
            .arg(&self.services.database_url)
            .arg("--database-schema")
            .arg(&self.name)
            .arg("--queue-prefix")
            .arg(self.prefix())
            .arg("--http")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--audit")
            .arg(self.audit_path())
            // The product's default log levels, whatever this shell sets, and tracing only
            // when the scenario asks for it.
            .env_remove("WARPLINE_LOG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(append_log(&self.dir.path().join("serve.log"))?)
            .spawn()
            .context("cannot start `warpline serve`")
    }

    /// Stops the coordinator (SIGTERM) and starts it again on the same schema, audit log and
    /// port; returns how long the new one took from its start to `/readyz` answering 200
    /// (recovering every backfill and run from PostgreSQL, catching up the audit mirror).
    pub async fn restart_coordinator(&mut self) -> anyhow::Result<Duration> {
        if let Some(mut c) = self.coordinator.take() {
            terminate(&mut c);
            if !exits_within(&mut c, STOP_GRACE).await {
                eprintln!("warning: the coordinator did not stop within 15 s and was killed");
            }
        }
        let started = Instant::now();
        self.coordinator = Some(self.spawn_coordinator(self.port)?);
        self.wait_ready().await?;
        Ok(started.elapsed())
    }

    /// Times one `GET` of `path` (the whole body read); fails on a non-2xx answer.
    pub async fn time_get(&self, path: &str) -> anyhow::Result<(Duration, usize)> {
        let started = Instant::now();
        let body = self
            .http
            .get(format!("{}{path}", self.api))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        Ok((started.elapsed(), body.len()))
    }

    /// Times one `POST` of `path` with an empty JSON body.
    pub async fn time_post(&self, path: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.http
            .post(format!("{}{path}", self.api))
            .json(&serde_json::json!({}))
            .send()
            .await?
            .error_for_status()?;
        Ok(started.elapsed())
    }

    /// Each table of the fleet's schema with its total size (heap, indexes, TOAST) in bytes
    /// and its row estimate, largest first.
    pub async fn table_sizes(&self) -> anyhow::Result<Vec<(String, i64, i64)>> {
        let (client, conn) =
            tokio_postgres::connect(&self.services.database_url, tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT c.relname::text, pg_total_relation_size(c.oid), c.reltuples::bigint
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relkind = 'r'
                 ORDER BY 2 DESC",
                &[&self.name],
            )
            .await?;
        drop(client);
        let _ = conn.await;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// The ports of the services it uses.
    pub fn ports(&self) -> ServicePorts {
        self.services.ports()
    }

    /// The queue prefix.
    pub fn prefix(&self) -> String {
        format!("{}.", self.name)
    }

    /// The fleet's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The coordinator's audit log.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// The coordinator's PID.
    pub fn coordinator_pid(&self) -> u32 {
        self.coordinator.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The workers' PIDs.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().map(Child::id).collect()
    }

    /// Writes a pipeline config into the fleet's directory.
    pub fn write_pipeline(&self, config: &serde_json::Value) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join("pipeline.json");
        std::fs::write(&path, serde_json::to_vec_pretty(config)?)?;
        Ok(path)
    }

    /// `warpline submit`: returns the backfill id and how long the command took, from start
    /// to exit (it exits once the coordinator has made the backfill durable and answered).
    pub fn submit(
        &self,
        pipeline: &Path,
        partitions: &[String],
        max_parallel: usize,
    ) -> anyhow::Result<(String, Duration)> {
        let mut cmd = Command::new(self.services.bin_dir.join("warpline"));
        cmd.arg("submit")
            .arg(pipeline)
            .args(partitions)
            .arg("--max-parallel")
            .arg(max_parallel.to_string())
            .arg("--workdir")
            .arg(self.work.path())
            .arg("--api")
            .arg(&self.api);
        let started = Instant::now();
        let out = cmd.output().context("cannot run `warpline submit`")?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "`warpline submit` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok((id, took))
    }

    /// `GET /v1/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<LatencySnapshot> {
        let url = format!("{}/v1/metrics", self.api);
        Ok(self
            .http
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("{}/readyz", self.api);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.coordinator.as_mut().and_then(|c| c.try_wait().ok()?) {
                bail!(
                    "`warpline serve` exited ({status}); see {}",
                    self.dir.path().join("serve.log").display()
                );
            }
            if let Ok(r) = self.http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("`warpline serve` was not ready within 60 s")
    }

    /// Waits until the broker counts every worker as a consumer of the steps queue, so that no
    /// worker starts late.
    async fn wait_workers(&mut self, n: usize) -> anyhow::Result<()> {
        let conn = amqp::connect(&self.services.amqp_url, "warpline-bench", &quick()).await?;
        let channel = conn.create_channel().await?;
        let queue = Topology::new(self.prefix()).steps_queue("default");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut consumers = 0;
        while Instant::now() < deadline {
            for w in &mut self.workers {
                if let Ok(Some(status)) = w.try_wait() {
                    bail!(
                        "a worker exited ({status}); see its log in {}",
                        self.dir.path().display()
                    );
                }
            }
            // A passive declare fails on a missing queue and closes the channel; the workers
            // declare it as they connect, so wait for that first.
            let opts = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let channel = if channel.status().connected() {
                channel.clone()
            } else {
                conn.create_channel().await?
            };
            if let Ok(q) = channel
                .queue_declare(queue.as_str().into(), opts, FieldTable::default())
                .await
            {
                consumers = q.consumer_count() as usize;
                if consumers >= n {
                    let _ = conn.close(200, "workers ready".into()).await;
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("only {consumers} of {n} workers were consuming `{queue}` after 60 s")
    }

    /// Stops the processes (SIGTERM, by PID), then drops the schema, the queues and the
    /// directory.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut stuck = Vec::new();
        for w in &mut self.workers {
            terminate(w);
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            if !exits_within(w, STOP_GRACE).await {
                stuck.push(format!("worker {i}"));
            }
        }
        self.workers.clear();
        if let Some(mut c) = self.coordinator.take() {
            terminate(&mut c);
            if !exits_within(&mut c, STOP_GRACE).await {
                stuck.push("the coordinator".to_string());
            }
        }
        if !stuck.is_empty() {
            // Reported, not fatal: the measurement was taken before the stop.
            eprintln!(
                "warning: {} did not exit within {} s of SIGTERM and was killed; see {}",
                stuck.join(", "),
                STOP_GRACE.as_secs(),
                self.dir.path().display()
            );
        }
        let (client, conn) =
            tokio_postgres::connect(&self.services.database_url, tokio_postgres::NoTls)
                .await
                .context("cannot connect to PostgreSQL to drop the benchmark's schema")?;
        let conn = tokio::spawn(conn);
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name))
            .await
            .context("cannot drop the benchmark's schema")?;
        drop(client);
        let _ = conn.await;
        let conn =
            amqp::connect(&self.services.amqp_url, "warpline-bench cleanup", &quick()).await?;
        let channel = conn.create_channel().await?;
        amqp::delete_topology(&channel, &Topology::new(self.prefix()), &["default"]).await?;
        let _ = conn.close(200, "benchmark done".into()).await;
        if self.services.keep || !stuck.is_empty() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir()?).keep();
            let work = std::mem::replace(&mut self.work, tempfile::tempdir()?).keep();
            eprintln!("kept {} and {}", kept.display(), work.display());
        }
        Ok(())
    }
}

impl Drop for Fleet {
    /// Kills whatever this fleet started and [`Fleet::stop`] did not stop (an error path).
    fn drop(&mut self) {
        for c in self.workers.iter_mut().chain(self.coordinator.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Waits up to `grace` for `child` to exit; kills it (SIGKILL, this PID only) if it does not.
async fn exits_within(child: &mut Child, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Three quick connection attempts: the benchmark needs the broker up, not a patient wait.
fn quick() -> amqp::Backoff {
    amqp::Backoff {
        max_attempts: Some(3),
        ..amqp::Backoff::default()
    }
}

fn terminate(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("cannot create `{}`", path.display()))
}

/// A log a restarted process continues.
fn append_log(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open `{}`", path.display()))
}
