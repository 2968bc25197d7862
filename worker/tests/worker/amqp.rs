//! Fleet mode against a real RabbitMQ at 127.0.0.1:5672: the topology [`amqp::declare_topology`]
//! creates, and the `warpline-worker` binary consuming StepSpecs, dead-lettering what it
//! refuses, honouring its slots, draining on SIGTERM, stopping when its reaper dies and
//! reconnecting after its connection is closed under it.
//!
//! Every test declares its own topology under a unique prefix (`t.<pid>.<n>.`) and deletes it
//! when it ends, even when it fails. A broker that cannot be reached fails the test with how to
//! start it; nothing is skipped.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use warpline_amqp::{self as amqp, Backoff};
use warpline_shared::contracts::{StepOutcome, StepSpec};
use warpline_shared::fleet::{
    DEAD_REASON_HEADER, Heartbeat, SIGNATURE_HEADER, Topology, sign, verify_signature,
};

use crate::support::{Workdir, read_pid, reaper_of, wait_gone};

const BIN: &str = env!("CARGO_BIN_EXE_warpline-worker");
const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const POOL: &str = "default";

/// A test's own corner of the broker: a connection, a confirm channel and a prefixed
/// topology, deleted on drop.
struct Broker {
    topology: Topology,
    conn: Connection,
    channel: Channel,
    /// Queues a test declared beyond the topology, deleted with it.
    extra_queues: Vec<String>,
}

impl Broker {
    async fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "t.{}.{}.",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let backoff = Backoff {
            max_attempts: Some(3),
            ..Backoff::default()
        };
        let conn = amqp::connect(URL, "warpline worker tests", &backoff)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "RabbitMQ is not reachable at 127.0.0.1:5672 ({e}). Start it with \
                     `rabbitmq-server -detached` and run the tests again"
                )
            });
        let channel = amqp::confirm_channel(&conn).await.unwrap();
        let topology = Topology::new(prefix);
        amqp::declare_topology(&channel, &topology, &[POOL])
            .await
            .unwrap();
        Broker {
            topology,
            conn,
            channel,
            extra_queues: Vec::new(),
        }
    }

    fn prefix(&self) -> &str {
        &self.topology.prefix
    }

    /// Publishes a StepSpec to the steps exchange, signed with `key` if given.
    async fn publish_spec(&self, spec: &StepSpec, key: Option<&[u8]>) {
        let body = serde_json::to_vec(spec).unwrap();
        self.publish_raw(&body, amqp::signature_headers(key, &body))
            .await;
    }

    async fn publish_raw(&self, body: &[u8], headers: FieldTable) {
        amqp::publish_confirmed(
            &self.channel,
            &self.topology.steps_exchange(),
            POOL,
            body,
            amqp::json_properties("test", headers),
        )
        .await
        .unwrap();
    }

    /// Waits up to `limit` for a message on `queue`, acks it and returns its body and properties.
    async fn get(&self, queue: &str, limit: Duration) -> Option<(Vec<u8>, BasicProperties)> {
        let start = Instant::now();
        loop {
            let got = self
                .channel
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap();
            if let Some(msg) = got {
                msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
                return Some((msg.delivery.data.clone(), msg.delivery.properties.clone()));
            }
            if start.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The next StepOutcome on the results queue.
    async fn outcome(&self, worker: &Worker, limit: Duration) -> (StepOutcome, BasicProperties) {
        let Some((body, props)) = self.get(&self.topology.results_queue(), limit).await else {
            panic!("no outcome within {limit:?}\n{}", worker.logs());
        };
        (serde_json::from_slice(&body).unwrap(), props)
    }

    /// Ready messages in a queue.
    async fn ready(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = ch.close(200, "ok".into()).await;
        q.message_count()
    }

    /// A server-named exclusive queue bound to the heartbeats exchange.
    async fn heartbeat_queue(&self) -> String {
        let q = self
            .channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let name = q.name().as_str().to_string();
        self.channel
            .queue_bind(
                name.as_str().into(),
                self.topology.heartbeats_exchange().as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        name
    }

    /// Every heartbeat received so far (waiting up to `limit` for the first).
    async fn heartbeats(&self, queue: &str, limit: Duration) -> Vec<Heartbeat> {
        let mut beats = Vec::new();
        let mut wait = limit;
        while let Some((body, _)) = self.get(queue, wait).await {
            beats.push(serde_json::from_slice(&body).unwrap());
            wait = Duration::from_millis(200);
        }
        beats
    }
}

impl Drop for Broker {
    /// Deletes the test's queues and exchanges, on a thread of its own because drop cannot
    /// await (and may run while a failed test unwinds inside a runtime).
    fn drop(&mut self) {
        let topology = self.topology.clone();
        let extra_queues = std::mem::take(&mut self.extra_queues);
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let backoff = Backoff {
                    max_attempts: Some(3),
                    ..Backoff::default()
                };
                let conn = amqp::connect(URL, "warpline worker tests cleanup", &backoff).await?;
                let ch = conn.create_channel().await?;
                amqp::delete_topology(&ch, &topology, &[POOL]).await?;
                for q in extra_queues {
                    ch.queue_delete(q.as_str().into(), Default::default())
                        .await?;
                }
                let _ = conn.close(200, "cleaned up".into()).await;
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if let Ok(Err(e)) = done {
            eprintln!(
                "cannot delete the test topology `{}`: {e}",
                self.topology.prefix
            );
        }
    }
}

/// A `warpline-worker` process, its stderr captured to a file; killed on drop.
struct Worker {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Worker {
    fn start(broker: &Broker, args: &[&str], env: &[(&str, &str)]) -> Worker {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker.log");
        let mut cmd = Command::new(BIN);
        cmd.args(["--queue-prefix", broker.prefix(), "--amqp-url", URL]);
        if !args.contains(&"--pool") {
            cmd.args(["--pool", POOL]);
        }
        cmd.args(args)
            .env_remove("WARPLINE_SIGNING_KEY")
            .env_remove("WARPLINE_ALLOW")
            .env("RUST_LOG", "info,lapin=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("cannot start warpline-worker");
        Worker {
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            f.read_to_string(&mut s).unwrap();
        }
        format!("--- warpline-worker stderr ---\n{s}--- end ---")
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits up to `limit` for the process to exit and returns its exit code.
    async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > limit {
                panic!(
                    "warpline-worker did not exit within {limit:?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the worker's log contains `needle`.
    async fn wait_log(&self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while !self.logs().contains(needle) {
            assert!(
                start.elapsed() < limit,
                "`{needle}` not logged within {limit:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Worker {
    /// A worker still running (a failed test) gets SIGTERM first, so it cancels its tools'
    /// process groups instead of leaving them behind, and SIGKILL after a few seconds.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && child.try_wait().ok().flatten().is_none()
        {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn header(props: &BasicProperties, name: &str) -> Option<String> {
    amqp::header_str(props, name)
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn topology_is_declared_with_the_right_arguments() {
    let broker = Broker::new().await;
    let t = &broker.topology;
    // Declaring again with the same arguments is a no-op, and passive declares find it all.
    amqp::declare_topology(&broker.channel, t, &[POOL])
        .await
        .unwrap();
    let passive_q = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    for q in [t.steps_queue(POOL), t.results_queue(), t.dead_queue()] {
        broker
            .channel
            .queue_declare(q.as_str().into(), passive_q, FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("queue `{q}` missing: {e}"));
    }
    let passive_x = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    for (x, kind) in [
        (t.steps_exchange(), ExchangeKind::Direct),
        (t.heartbeats_exchange(), ExchangeKind::Fanout),
        (t.dead_exchange(), ExchangeKind::Fanout),
    ] {
        broker
            .channel
            .exchange_declare(x.as_str().into(), kind, passive_x, FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("exchange `{x}` missing: {e}"));
    }

    // The broker holds the arguments we meant: a declare with others is refused
    // (PRECONDITION_FAILED closes that channel, so each probe gets its own).
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let probe = |queue: String, args: FieldTable| {
        let conn = &broker.conn;
        async move {
            let ch = conn.create_channel().await.unwrap();
            ch.queue_declare(queue.as_str().into(), durable, args).await
        }
    };
    let mut classic = amqp::steps_queue_arguments(t);
    classic.insert("x-queue-type".into(), amqp::long_string("classic"));
    assert!(
        probe(t.steps_queue(POOL), classic).await.is_err(),
        "steps queue is not quorum"
    );
    let mut limit = amqp::steps_queue_arguments(t);
    limit.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(99));
    assert!(
        probe(t.steps_queue(POOL), limit).await.is_err(),
        "delivery limit not set"
    );
    let mut no_dlx = amqp::results_queue_arguments(t);
    no_dlx.insert(
        "x-dead-letter-exchange".into(),
        amqp::long_string("elsewhere"),
    );
    assert!(
        probe(t.results_queue(), no_dlx).await.is_err(),
        "results queue has no DLX"
    );
    // ...while the declared arguments are accepted again.
    probe(t.steps_queue(POOL), amqp::steps_queue_arguments(t))
        .await
        .unwrap();

    // Routing: the pool's key reaches the pool's queue; the dead exchange reaches the dead queue.
    broker.publish_raw(b"{}", FieldTable::default()).await;
    assert_eq!(broker.ready(&t.steps_queue(POOL)).await, 1);
    amqp::publish_confirmed(
        &broker.channel,
        &t.dead_exchange(),
        "anything",
        b"{}",
        amqp::json_properties("x", FieldTable::default()),
    )
    .await
    .unwrap();
    assert!(broker.get(&t.dead_queue(), LONG).await.is_some());
    // A key no pool is bound to is unroutable, and publish_confirmed says so.
    let err = amqp::publish_confirmed(
        &broker.channel,
        &t.steps_exchange(),
        "no-such-pool",
        b"{}",
        amqp::json_properties("x", FieldTable::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, amqp::AmqpError::Unroutable { .. }), "{err}");
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_stops_the_worker_with_why() {
    let mut broker = Broker::new().await;
    let queue = broker.topology.steps_queue("classic");
    broker.extra_queues.push(queue.clone());
    broker
        .channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut worker = Worker::start(&broker, &["--allow", "sh", "--pool", "classic"], &[]);
    assert_eq!(worker.wait_exit(LONG).await, Some(2), "{}", worker.logs());
    let logs = worker.logs();
    assert!(
        logs.contains(&format!("cannot declare queue `{queue}`")),
        "{logs}"
    );
    assert!(logs.contains("PRECONDITION_FAILED"), "{logs}");
    assert!(logs.contains("reconnecting will not help"), "{logs}");
}

#[tokio::test]
async fn worker_runs_a_spec_and_publishes_its_outcome_before_acking() {
    let broker = Broker::new().await;
    let beats = broker.heartbeat_queue().await;
    let w = Workdir::new();
    let spec = w.sh("echo hello; exit 3", 30);
    broker.publish_spec(&spec, None).await;
    let mut worker = Worker::start(
        &broker,
        &[
            "--allow",
            "sh",
            "--slots",
            "1",
            "--heartbeat-s",
            "0.5",
            "--worker-id",
            "w-runs",
        ],
        &[],
    );

    let (outcome, props) = broker.outcome(&worker, LONG).await;
    assert_eq!(outcome.result.attempt_id, Some(spec.attempt_id));
    assert_eq!(outcome.result.run_id, Some(spec.run_id));
    assert_eq!(outcome.result.exit_code, 3, "{}", worker.logs());
    assert_eq!(outcome.result.worker_id, "w-runs");
    assert_eq!(outcome.result.log_tail, "hello\n");
    assert_eq!(
        props.message_id().as_ref().map(|m| m.as_str().to_string()),
        Some(spec.attempt_id.to_string())
    );
    assert_eq!(
        props.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*props.delivery_mode(), Some(2));
    assert_eq!(header(&props, SIGNATURE_HEADER), None);

    worker.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(worker.wait_exit(LONG).await, Some(0), "{}", worker.logs());
    // Acked: closing the connection put nothing back.
    assert_eq!(broker.ready(&broker.topology.steps_queue(POOL)).await, 0);

    let beats = broker.heartbeats(&beats, LONG).await;
    assert!(beats.len() >= 2, "{beats:?}");
    assert!(
        beats
            .iter()
            .all(|b| b.worker_id == "w-runs" && b.pool == POOL && b.slots == 1)
    );
    assert!(beats.last().unwrap().stopping, "{beats:?}");
    assert!(beats[..beats.len() - 1].iter().all(|b| !b.stopping));
}

#[tokio::test]
async fn a_spec_whose_outcome_cannot_be_published_is_not_acked() {
    let broker = Broker::new().await;
    let worker = Worker::start(&broker, &["--allow", "sh"], &[]);
    worker.wait_log("consuming", LONG).await;
    // With the results queue gone, every outcome is unroutable: the worker must not ack, so the
    // spec comes back until the queue's delivery limit dead-letters it. Nothing is lost.
    broker
        .channel
        .queue_delete(
            broker.topology.results_queue().as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let w = Workdir::new();
    let spec = w.sh("echo ran >> runs", 30);
    broker.publish_spec(&spec, None).await;
    let Some((body, props)) = broker.get(&broker.topology.dead_queue(), LONG).await else {
        panic!("the spec vanished\n{}", worker.logs());
    };
    let back: StepSpec = serde_json::from_slice(&body).unwrap();
    assert_eq!(back.attempt_id, spec.attempt_id);
    // Dead-lettered by the broker (delivery limit), not refused by the worker.
    assert_eq!(header(&props, DEAD_REASON_HEADER), None);
    let runs = w.read("run/runs").lines().count();
    assert_eq!(runs as i64, amqp::DELIVERY_LIMIT + 1, "{}", worker.logs());
    assert!(
        worker.logs().contains("cannot publish the outcome"),
        "{}",
        worker.logs()
    );
}

#[tokio::test]
async fn malformed_messages_are_dead_lettered_with_the_reason() {
    let broker = Broker::new().await;
    let worker = Worker::start(&broker, &["--allow", "sh"], &[]);
    broker
        .publish_raw(b"this is not json", FieldTable::default())
        .await;
    broker
        .publish_raw(br#"{"step_id": "X"}"#, FieldTable::default())
        .await;

    // Two slots handle the two at once, so they may arrive in either order.
    let mut dead = Vec::new();
    for _ in 0..2 {
        let Some((body, props)) = broker.get(&broker.topology.dead_queue(), LONG).await else {
            panic!("nothing dead-lettered\n{}", worker.logs());
        };
        let reason = header(&props, DEAD_REASON_HEADER).unwrap();
        assert!(reason.contains("not a valid StepSpec"), "{reason}");
        dead.push(String::from_utf8(body).unwrap());
    }
    dead.sort();
    assert_eq!(dead, ["this is not json", r#"{"step_id": "X"}"#]);
    // The worker lives on and runs the next good spec.
    let w = Workdir::new();
    let spec = w.sh("true", 30);
    broker.publish_spec(&spec, None).await;
    let (outcome, _) = broker.outcome(&worker, LONG).await;
    assert_eq!(outcome.result.attempt_id, Some(spec.attempt_id));
    assert_eq!(broker.ready(&broker.topology.steps_queue(POOL)).await, 0);
    assert!(
        worker.logs().contains("refusing the message"),
        "{}",
        worker.logs()
    );
}

#[tokio::test]
async fn a_signing_worker_dead_letters_unsigned_and_forged_specs() {
    let broker = Broker::new().await;
    let key = b"s3cret".as_slice();
    let worker = Worker::start(
        &broker,
        &["--allow", "sh"],
        &[("WARPLINE_SIGNING_KEY", "s3cret")],
    );
    let w = Workdir::new();
    let unsigned = w.sh("echo unsigned > ran-unsigned", 30);
    let forged = w.sh("echo forged > ran-forged", 30);
    let signed = w.sh("echo signed", 30);
    broker.publish_spec(&unsigned, None).await;
    broker.publish_spec(&forged, Some(b"not the key")).await;
    broker.publish_spec(&signed, Some(key)).await;

    let (outcome, props) = broker.outcome(&worker, LONG).await;
    assert_eq!(outcome.result.attempt_id, Some(signed.attempt_id));
    assert_eq!(outcome.result.log_tail, "signed\n");
    // The outcome is signed with the same key.
    let body = serde_json::to_vec(&outcome).unwrap();
    let sig = header(&props, SIGNATURE_HEADER).expect("outcome not signed");
    assert!(verify_signature(key, &body, &sig));
    assert_ne!(sig, sign(b"not the key", &body));

    let mut reasons = BTreeMap::new();
    for _ in 0..2 {
        let Some((body, props)) = broker.get(&broker.topology.dead_queue(), LONG).await else {
            panic!("refused spec not dead-lettered\n{}", worker.logs());
        };
        let spec: StepSpec = serde_json::from_slice(&body).unwrap();
        reasons.insert(spec.attempt_id, header(&props, DEAD_REASON_HEADER).unwrap());
    }
    assert!(reasons[&unsigned.attempt_id].contains("no `x-warpline-signature` header"));
    assert!(reasons[&forged.attempt_id].contains("does not match its body"));
    assert!(!w.root().join("run/ran-unsigned").exists());
    assert!(!w.root().join("run/ran-forged").exists());
    assert!(
        broker
            .get(&broker.topology.results_queue(), Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn sigterm_lets_a_running_step_finish_and_publishes_it() {
    let broker = Broker::new().await;
    let w = Workdir::new();
    let spec = w.sh("echo started > started; sleep 2; echo done", 60);
    broker.publish_spec(&spec, None).await;
    let beats = broker.heartbeat_queue().await;
    let mut worker = Worker::start(
        &broker,
        &["--allow", "sh", "--drain-s", "20", "--heartbeat-s", "0.3"],
        &[],
    );
    wait_file(&w, "run/started", &worker).await;
    let start = Instant::now();
    worker.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(worker.wait_exit(LONG).await, Some(0), "{}", worker.logs());
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );

    let (outcome, _) = broker.outcome(&worker, Duration::from_secs(2)).await;
    assert_eq!(outcome.result.attempt_id, Some(spec.attempt_id));
    assert_eq!(outcome.result.exit_code, 0);
    assert_eq!(outcome.result.error, None);
    assert_eq!(outcome.result.log_tail, "done\n");
    assert_eq!(broker.ready(&broker.topology.steps_queue(POOL)).await, 0);

    // Heartbeats named the running attempt, went on while it drained, and the last says
    // stopping with nothing running.
    let beats = broker.heartbeats(&beats, LONG).await;
    let sigterm = chrono::Utc::now() - chrono::Duration::from_std(start.elapsed()).unwrap();
    assert!(
        beats.iter().any(|b| b.sent_at > sigterm
            && !b.stopping
            && b.running.iter().any(|r| r.attempt_id == spec.attempt_id)),
        "no heartbeat during the drain: {beats:?}"
    );
    let last = beats.last().unwrap();
    assert!(last.stopping && last.running.is_empty(), "{last:?}");
}

#[tokio::test]
async fn sigterm_past_the_drain_cancels_and_requeues_the_step() {
    let broker = Broker::new().await;
    let w = Workdir::new();
    let spec = w.sh("echo $$ > tool.pid; sleep 300", 600);
    broker.publish_spec(&spec, None).await;
    let mut worker = Worker::start(
        &broker,
        &["--allow", "sh", "--drain-s", "1", "--kill-grace-s", "1"],
        &[],
    );
    let tool = read_pid(
        &wait_file(&w, "run/tool.pid", &worker).await,
        Duration::from_secs(5),
    );
    worker.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(worker.wait_exit(LONG).await, Some(0), "{}", worker.logs());
    assert!(
        wait_gone(tool, Duration::from_secs(2)),
        "tool {tool} survived"
    );
    assert!(
        broker
            .get(&broker.topology.results_queue(), Duration::from_millis(300))
            .await
            .is_none(),
        "a cancelled step must not publish an outcome"
    );
    // Requeued, for another worker.
    let Some((body, _)) = broker.get(&broker.topology.steps_queue(POOL), LONG).await else {
        panic!("the spec was not requeued\n{}", worker.logs());
    };
    let back: StepSpec = serde_json::from_slice(&body).unwrap();
    assert_eq!(back.attempt_id, spec.attempt_id);
    assert!(worker.logs().contains("requeueing"), "{}", worker.logs());
}

#[tokio::test]
async fn a_worker_whose_reaper_dies_stops_requeues_and_exits_2() {
    let broker = Broker::new().await;
    let w = Workdir::new();
    let spec = w.sh("echo $$ > tool.pid; sleep 300", 600);
    broker.publish_spec(&spec, None).await;
    let mut worker = Worker::start(
        &broker,
        &["--allow", "sh", "--drain-s", "1", "--kill-grace-s", "1"],
        &[],
    );
    let tool = read_pid(
        &wait_file(&w, "run/tool.pid", &worker).await,
        Duration::from_secs(5),
    );
    let reaper = reaper_of(worker.pid() as u32).expect("the worker has a reaper");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(reaper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(worker.wait_exit(LONG).await, Some(2), "{}", worker.logs());
    assert!(
        worker.logs().contains("restart the worker"),
        "{}",
        worker.logs()
    );
    assert!(
        wait_gone(tool, Duration::from_secs(2)),
        "tool {tool} survived"
    );
    // Requeued, for a worker that can promise its tools die with it.
    let Some((body, _)) = broker.get(&broker.topology.steps_queue(POOL), LONG).await else {
        panic!("the spec was not requeued\n{}", worker.logs());
    };
    let back: StepSpec = serde_json::from_slice(&body).unwrap();
    assert_eq!(back.attempt_id, spec.attempt_id);
}

#[tokio::test]
async fn slots_bound_how_many_steps_run_at_once() {
    let broker = Broker::new().await;
    let w = Workdir::new();
    let specs: Vec<StepSpec> = (0..6)
        .map(|_| w.sh("date +%s%N; sleep 1; date +%s%N", 60))
        .collect();
    for spec in &specs {
        broker.publish_spec(spec, None).await;
    }
    let worker = Worker::start(&broker, &["--allow", "sh", "--slots", "2"], &[]);
    let mut spans = Vec::new();
    for _ in &specs {
        let (outcome, _) = broker.outcome(&worker, LONG).await;
        assert_eq!(outcome.result.exit_code, 0, "{}", outcome.result.log_tail);
        let stamps: Vec<u128> = outcome
            .result
            .log_tail
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        spans.push((stamps[0], stamps[1]));
    }
    // The most tools alive at one instant: at every start, count the spans covering it.
    let most = spans
        .iter()
        .map(|(s, _)| spans.iter().filter(|(a, b)| a <= s && s < b).count())
        .max()
        .unwrap();
    assert_eq!(most, 2, "slots=2 but {most} ran at once: {spans:?}");
}

#[tokio::test]
async fn the_worker_reconnects_and_reruns_what_its_lost_connection_held() {
    let broker = Broker::new().await;
    let id = format!("w-reconnect-{}", broker.prefix());
    let w = Workdir::new();
    // One slot, busy with a long step: the lost connection is noticed even though the consume
    // loop is waiting for a slot, the orphaned tool is stopped, and the broker redelivers the
    // spec to the new session.
    let long = w.sh("echo $$ >> pids; sleep 300", 600);
    broker.publish_spec(&long, None).await;
    let mut worker = Worker::start(
        &broker,
        &[
            "--allow",
            "sh",
            "--worker-id",
            &id,
            "--slots",
            "1",
            "--drain-s",
            "0",
            "--kill-grace-s",
            "1",
        ],
        &[],
    );
    let pids = wait_file(&w, "run/pids", &worker).await;
    let first: i32 = std::fs::read_to_string(&pids)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    close_connection(&format!("warpline-worker {id}"));
    worker.wait_log("reconnecting", LONG).await;
    assert!(
        wait_gone(first, Duration::from_secs(10)),
        "orphaned tool {first} survived"
    );
    worker.wait_log("session=2", LONG).await;
    let start = Instant::now();
    while std::fs::read_to_string(&pids).unwrap().lines().count() < 2 {
        assert!(start.elapsed() < LONG, "not redelivered\n{}", worker.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        broker
            .get(&broker.topology.results_queue(), Duration::from_millis(300))
            .await
            .is_none(),
        "a step cut off by a lost connection must not report"
    );

    worker.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(worker.wait_exit(LONG).await, Some(0), "{}", worker.logs());
    let Some((body, _)) = broker.get(&broker.topology.steps_queue(POOL), LONG).await else {
        panic!("the spec was not requeued\n{}", worker.logs());
    };
    let back: StepSpec = serde_json::from_slice(&body).unwrap();
    assert_eq!(back.attempt_id, long.attempt_id);
}

/// Closes the broker connection whose client-provided name is `name`, as an operator (or a
/// broker restart) would.
fn close_connection(name: &str) {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-s"])
        .output()
        .expect("cannot run rabbitmqctl (it comes with rabbitmq-server)");
    let listing = String::from_utf8_lossy(&out.stdout);
    let quoted = format!("\"{name}\"");
    let pid = listing
        .lines()
        .find(|l| l.contains(&quoted))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no connection named `{name}` in:\n{listing}"));
    let out = Command::new("rabbitmqctl")
        .args(["close_connection", pid, "closed by the reconnect test"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits for the tool to create `rel` under the workdir and returns its path.
async fn wait_file(w: &Workdir, rel: &str, worker: &Worker) -> PathBuf {
    let path = w.root().join(rel);
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < LONG,
            "`{rel}` never appeared\n{}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    path
}
