//! Fleet mode under test: real `warpline serve` coordinators and `warpline-worker` processes
//! against the local RabbitMQ and PostgreSQL, isolated per test.
//!
//! A [`Fleet`] owns everything one test starts. Its coordinators keep their tables in a schema of
//! their own (`e2e_<name>_<pid>` in the `warpline` database) and every exchange and queue name
//! carries its prefix (`e2e.<name>.<pid>.`), so tests run in parallel with each other and with
//! the local suite without seeing each other's rows or messages. Each process writes its
//! standard error to a log file in the fleet's temporary directory.
//!
//! On drop the fleet SIGKILLs every process it started (the tools its workers run first, by
//! process group, since they outlive a killed worker), waits for them, drops the schema and
//! deletes the prefixed topology. When the test is failing it first prints every command it ran
//! and every process's log, so a red test says what it saw.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::FieldTable;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use warpline_amqp::{self as amqp, Backoff};
use warpline_shared::audit::AuditRecord;
use warpline_shared::fleet::{DEAD_REASON_HEADER, Topology};

use crate::{Finished, audit_records, bin, postgres_admin, repo_root};

/// The broker every fleet test uses.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The coordinators' database (each fleet has its own schema in it).
pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/warpline";
/// The pool every worker consumes and every test pipeline uses.
pub const POOL: &str = "default";

/// The variables that configure API tokens (removed from every process a test starts unless
/// the test sets them).
pub const TOKEN_VARS: [&str; 4] = [
    "WARPLINE_API_TOKEN",
    "WARPLINE_TOKEN_FILE",
    "WARPLINE_OPERATOR_TOKEN",
    "WARPLINE_VIEWER_TOKEN",
];

/// How long a process may take to say it is up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A coordinator started by [`Fleet::serve`].
#[derive(Debug, Clone)]
pub struct Coordinator {
    /// Its name in the fleet (and its log file's stem).
    pub name: String,
    /// Its API, `http://127.0.0.1:PORT`.
    pub api: String,
    /// Its process id.
    pub pid: i32,
}

impl Coordinator {
    /// The API's `host:port`, to start a successor on the same address.
    pub fn addr(&self) -> &str {
        self.api.trim_start_matches("http://")
    }
}

/// One process the fleet started.
struct Proc {
    name: String,
    command: String,
    log: PathBuf,
    child: Child,
    /// Whether it runs tools (whose process groups must be killed too).
    worker: bool,
    /// Set once it has been waited for.
    status: Option<ExitStatus>,
}

/// One test's fleet: its schema, its queue prefix, its directory and its processes.
pub struct Fleet {
    /// The PostgreSQL schema of its coordinators.
    pub schema: String,
    /// The broker its coordinators and workers use.
    pub amqp_url: String,
    /// The coordinators' database.
    pub database_url: String,
    /// The queue prefix of its coordinators and workers.
    pub prefix: String,
    /// Extra environment for every process started after it is set (`OTEL_*`,
    /// `WARPLINE_METRICS`, `WARPLINE_LOG_FORMAT`, ...).
    pub env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
    /// Every command run, in order, for the failure report.
    commands: Mutex<Vec<String>>,
}

impl Fleet {
    /// A fleet named `name` (unique within the test binary: letters, digits and `_`) on the
    /// shared RabbitMQ and PostgreSQL. Fails, saying how to start it, when either is down.
    pub fn new(name: &str) -> Fleet {
        drop(postgres_admin());
        check_rabbitmq();
        Fleet::on(name, AMQP_URL, DATABASE_URL)
    }

    /// A fleet named `name` on the broker at `amqp_url` and the database at `database_url`
    /// (e.g. the private servers of [`crate::faults`], which a test may restart).
    pub fn on(name: &str, amqp_url: &str, database_url: &str) -> Fleet {
        static NAMES: Mutex<Option<HashSet<String>>> = Mutex::new(None);
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "fleet names use a-z, 0-9 and `_`: `{name}`"
        );
        assert!(
            NAMES
                .lock()
                .unwrap()
                .get_or_insert_with(HashSet::new)
                .insert(name.to_string()),
            "two fleets are named `{name}`: each test needs its own name"
        );
        let pid = std::process::id();
        let fleet = Fleet {
            schema: format!("e2e_{name}_{pid}"),
            amqp_url: amqp_url.to_string(),
            database_url: database_url.to_string(),
            prefix: format!("e2e.{name}.{pid}."),
            env: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix(&format!("e2e-{name}-"))
                .tempdir()
                .expect("a temporary directory"),
            procs: Vec::new(),
            commands: Mutex::new(Vec::new()),
        };
        // Leftovers of an earlier run that was killed before it could clean up.
        fleet.cleanup();
        fleet
    }

    /// The fleet's temporary directory (pipelines, workdirs, logs, the audit log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The coordinators' JSONL audit log.
    pub fn audit(&self) -> PathBuf {
        self.dir().join("audit.jsonl")
    }

    /// Every record of the audit log.
    pub fn audit_records(&self) -> Vec<AuditRecord> {
        audit_records(&self.audit())
    }

    /// The queue names of this fleet.
    pub fn topology(&self) -> Topology {
        Topology::new(self.prefix.clone())
    }

    /// Starts a coordinator on a free port and returns once its API listens (it may still be a
    /// standby: see [`Fleet::wait_ready`]).
    pub fn serve(&mut self, name: &str) -> Coordinator {
        self.serve_on(name, "127.0.0.1:0")
    }

    /// Starts a coordinator whose API listens on `http` (a restart on a predecessor's address).
    pub fn serve_on(&mut self, name: &str, http: &str) -> Coordinator {
        self.serve_with(name, http, &[], &[])
    }

    /// [`Fleet::serve_on`] with extra arguments and environment (API tokens, `--token-file`).
    pub fn serve_with(
        &mut self,
        name: &str,
        http: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Coordinator {
        let audit = self.audit();
        let (amqp_url, database_url) = (self.amqp_url.clone(), self.database_url.clone());
        let args = [
            "serve",
            "--amqp-url",
            &amqp_url,
            "--database-url",
            &database_url,
            "--database-schema",
            &self.schema,
            "--queue-prefix",
            &self.prefix,
            "--http",
            http,
            "--audit",
            audit.to_str().expect("a UTF-8 path"),
            "--log-events",
        ];
        let mut cmd = Command::new(bin("warpline"));
        cmd.args(args)
            // Most tests start workers as they need them, some after the submit, and a submit
            // right after a worker started may beat its first heartbeat: they get warnings.
            // The check's own tests (`e2e/handback.rs`) ask for `refuse`, the default.
            .args(if extra.contains(&"--fleet-check") {
                &[][..]
            } else {
                &["--fleet-check", "warn"][..]
            })
            .args(extra)
            .current_dir(repo_root())
            .env("WARPLINE_LOG", "info,lapin=warn");
        // Only the tokens a test gives: none of the developer's.
        for k in TOKEN_VARS {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let pid = self.spawn(name, cmd, false, false);
        let line = self.wait_log(name, "warpline serve: API on http://");
        let api = line
            .split_once("API on ")
            .map(|(_, url)| url.trim().to_string())
            .expect("the API line names a URL");
        Coordinator {
            name: name.to_string(),
            api,
            pid,
        }
    }

    /// Starts a worker consuming the fleet's pool with `slots` slots, allowed to run `allow`,
    /// heartbeating every second; returns once it consumes.
    pub fn worker(&mut self, id: &str, slots: u16, allow: &[&str]) -> i32 {
        self.worker_with_env(id, slots, allow, &[])
    }

    /// [`Fleet::worker`] with extra environment for the tools it runs.
    pub fn worker_with_env(
        &mut self,
        id: &str,
        slots: u16,
        allow: &[&str],
        env: &[(&str, &str)],
    ) -> i32 {
        let url = self.amqp_url.clone();
        self.worker_via(id, slots, allow, env, &url, &[])
    }

    /// [`Fleet::worker_with_env`] reaching the broker at `amqp_url`, its command line run
    /// behind `wrapper` (e.g. `ip netns exec NS`, which execs it: the pid stays the worker's).
    pub fn worker_via(
        &mut self,
        id: &str,
        slots: u16,
        allow: &[&str],
        env: &[(&str, &str)],
        amqp_url: &str,
        wrapper: &[&str],
    ) -> i32 {
        let slots = slots.to_string();
        let allow = allow.join(",");
        let worker = bin("warpline-worker");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(&worker);
                cmd
            }
            None => Command::new(&worker),
        };
        cmd.args([
            "--amqp-url",
            amqp_url,
            "--queue-prefix",
            &self.prefix,
            "--pool",
            POOL,
            "--allow",
            &allow,
            "--slots",
            &slots,
            "--worker-id",
            id,
            "--heartbeat-s",
            "1",
            "--drain-s",
            "1",
            "--kill-grace-s",
            "1",
        ])
        .current_dir(repo_root())
        .env("RUST_LOG", "info,lapin=warn")
        .envs(env.iter().copied());
        let pid = self.spawn(id, cmd, true, false);
        self.wait_log(id, "consuming");
        pid
    }

    /// Starts `cmd` as process `name`, its stderr into `<dir>/<name>.log` and its stdout there
    /// too, or into `<dir>/<name>.out` when `own_stdout`.
    fn spawn(&mut self, name: &str, mut cmd: Command, worker: bool, own_stdout: bool) -> i32 {
        assert!(
            self.procs.iter().all(|p| p.name != name),
            "a process named `{name}` was already started in this fleet"
        );
        let log = self.dir().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("a log file");
        let stdout = if own_stdout {
            std::fs::File::create(self.dir().join(format!("{name}.out"))).expect("an output file")
        } else {
            file.try_clone().expect("a log file handle")
        };
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .env_remove("WARPLINE_SIGNING_KEY")
            .env_remove("WARPLINE_API_URL")
            .env_remove("WARPLINE_ALLOW")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let command = describe(&cmd);
        self.commands
            .lock()
            .unwrap()
            .push(format!("[{name}] {command}"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
        let pid = child.id() as i32;
        self.procs.push(Proc {
            name: name.to_string(),
            command,
            log,
            child,
            worker,
            status: None,
        });
        pid
    }

    fn proc_mut(&mut self, name: &str) -> &mut Proc {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process named `{name}` in this fleet"))
    }

    /// A process's log so far.
    pub fn log(&self, name: &str) -> String {
        let p = self
            .procs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process named `{name}` in this fleet"));
        std::fs::read_to_string(&p.log).unwrap_or_default()
    }

    /// Waits until process `name`'s log has a line containing `needle` and returns that line;
    /// fails when the process exits first or after [`START_TIMEOUT`].
    pub fn wait_log(&mut self, name: &str, needle: &str) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(line) = self.log(name).lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            let p = self.proc_mut(name);
            if let Ok(Some(status)) = p.child.try_wait() {
                p.status = Some(status);
                panic!("`{name}` exited ({status}) before logging `{needle}`");
            }
            assert!(
                Instant::now() < deadline,
                "`{name}` did not log `{needle}` within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs process `name` and waits for it. A worker's tools live on in their own process
    /// groups, as they would after a real crash.
    pub fn kill(&mut self, name: &str) {
        let p = self.proc_mut(name);
        let _ = p.child.kill();
        p.status = Some(p.child.wait().expect("wait for a killed process"));
    }

    /// Sends `signal` to process `name` (SIGSTOP and SIGCONT pause and resume it).
    pub fn signal(&self, name: &str, signal: Signal) {
        let p = self
            .procs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process named `{name}` in this fleet"));
        kill(Pid::from_raw(p.child.id() as i32), signal)
            .unwrap_or_else(|e| panic!("cannot send {signal} to `{name}`: {e}"));
        self.commands
            .lock()
            .unwrap()
            .push(format!("kill -{} {name}", signal.as_str()));
    }

    /// Whether process `name` has exited (and then its status).
    pub fn exited(&mut self, name: &str) -> Option<ExitStatus> {
        let p = self.proc_mut(name);
        if p.status.is_none() {
            p.status = p.child.try_wait().expect("try_wait");
        }
        p.status
    }

    /// Records a step of the test (a fault injected) in the failure report.
    pub fn note(&self, what: &str) {
        self.commands.lock().unwrap().push(format!("# {what}"));
    }

    /// Runs `warpline ARGS --api API` against a coordinator and waits for it.
    pub fn cli(&self, c: &Coordinator, args: &[&str]) -> Finished {
        let mut all = args.to_vec();
        all.extend(["--api", c.api.as_str()]);
        self.warpline(&all)
    }

    /// [`Fleet::cli`] with extra environment (e.g. `WARPLINE_API_TOKEN`).
    pub fn cli_with(&self, c: &Coordinator, args: &[&str], env: &[(&str, &str)]) -> Finished {
        let mut all = args.to_vec();
        all.extend(["--api", c.api.as_str()]);
        let finished = crate::warpline(&all, env);
        self.commands.lock().unwrap().push(format!(
            "{} -> {:?}",
            finished.command, finished.output.status
        ));
        finished
    }

    /// Runs `warpline ARGS` (no API) and waits for it, recording the command.
    pub fn warpline(&self, args: &[&str]) -> Finished {
        let finished = crate::warpline(args, &[]);
        self.commands.lock().unwrap().push(format!(
            "{} -> {:?}",
            finished.command, finished.output.status
        ));
        finished
    }

    /// Starts `warpline ARGS --api API` in the background as process `name` (e.g. a
    /// `submit --wait` that must outlive a coordinator); see [`Fleet::wait_exit`].
    pub fn spawn_cli(&mut self, name: &str, c: &Coordinator, args: &[&str]) -> i32 {
        let mut cmd = Command::new(bin("warpline"));
        cmd.args(args)
            .args(["--api", c.api.as_str()])
            .current_dir(repo_root());
        self.spawn(name, cmd, false, true)
    }

    /// Waits up to `limit` for a [`Fleet::spawn_cli`] process to exit; returns its status and
    /// its standard output.
    pub fn wait_exit(&mut self, name: &str, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        let out = self.dir().join(format!("{name}.out"));
        loop {
            let p = self.proc_mut(name);
            if let Some(status) = p.child.try_wait().expect("try_wait") {
                p.status = Some(status);
                return (status, std::fs::read_to_string(&out).unwrap_or_default());
            }
            assert!(
                Instant::now() < deadline,
                "`{name}` did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Writes a pipeline of shell steps (workdir `work` beside it, 10 ms retry backoff, 5 s
    /// lost grace) as `<dir>/<name>.json` and returns its path.
    pub fn pipeline(&self, name: &str, steps: Value) -> String {
        let config = serde_json::json!({
            "name": name,
            "workdir": "work",
            "retry": {"initial_ms": 10, "max_ms": 100},
            "lost_grace_s": 5,
            "steps": steps,
        });
        let path = self.dir().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        path.display().to_string()
    }

    /// Submits a backfill and returns its id.
    pub fn submit(&self, c: &Coordinator, pipeline: &str, extra: &[&str]) -> String {
        let mut args = vec!["submit", pipeline];
        args.extend_from_slice(extra);
        let out = self.cli(c, &args);
        out.expect_code(0);
        let id = out.stdout().trim().to_string();
        assert!(!id.is_empty(), "submit printed no id\n{}", out.context());
        id
    }

    /// `warpline status ID --json`.
    pub fn status(&self, c: &Coordinator, id: &str) -> Value {
        let out = self.cli(c, &["status", id, "--json"]);
        out.expect_code(0);
        out.summary()
    }

    /// Polls `status` until the backfill is finished (every run final or parked) and returns
    /// the summary; fails after `limit`.
    pub fn wait_finished(&self, c: &Coordinator, id: &str, limit: Duration) -> Value {
        self.wait_status(c, id, limit, "finished", |s| s["finished"] == true)
    }

    /// Polls `status` until `until` holds and returns that summary; fails after `limit`,
    /// naming `what` and showing the last summary.
    pub fn wait_status(
        &self,
        c: &Coordinator,
        id: &str,
        limit: Duration,
        what: &str,
        until: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status(c, id);
            if until(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "backfill {id} not {what} within {limit:?}: {s:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `path` exists and is not empty; fails after `limit` ([`crate::wait_file`]).
    pub fn wait_file(&self, path: &Path, limit: Duration) -> String {
        crate::wait_file(path, limit)
    }

    /// Waits until the coordinator's `/readyz` answers 200 (it leads and has restored its
    /// state); fails after `limit`.
    pub fn wait_ready(&self, c: &Coordinator, limit: Duration) {
        let deadline = Instant::now() + limit;
        while readyz(c) != 200 {
            assert!(
                Instant::now() < deadline,
                "coordinator `{}` not ready within {limit:?}",
                c.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Publishes `body` to the default exchange with `routing_key` (a queue name) and waits
    /// for the broker's confirm.
    pub fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        block_on(async {
            let conn = amqp::connect(&self.amqp_url, "warpline e2e publisher", &quick()).await?;
            let ch = amqp::confirm_channel(&conn).await?;
            amqp::publish_confirmed(
                &ch,
                "",
                routing_key,
                body,
                amqp::json_properties("e2e-garbage", FieldTable::default()),
            )
            .await?;
            let _ = conn.close(200, "published".into()).await;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("cannot publish to `{routing_key}`: {e}"));
    }

    /// Takes (and acks) every message in the fleet's dead queue, waiting up to `limit` for
    /// `want` of them: each message's body and its `x-warpline-dead-reason` header.
    pub fn dead_letters(&self, want: usize, limit: Duration) -> Vec<(Vec<u8>, Option<String>)> {
        let queue = self.topology().dead_queue();
        block_on(async {
            let conn = amqp::connect(&self.amqp_url, "warpline e2e dead letters", &quick()).await?;
            let ch = conn.create_channel().await?;
            let deadline = Instant::now() + limit;
            let mut got = Vec::new();
            while got.len() < want && Instant::now() < deadline {
                match ch
                    .basic_get(queue.as_str().into(), BasicGetOptions::default())
                    .await?
                {
                    Some(m) => {
                        let reason = amqp::header_str(&m.delivery.properties, DEAD_REASON_HEADER);
                        m.delivery.ack(BasicAckOptions::default()).await?;
                        got.push((m.delivery.data.clone(), reason));
                    }
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            let _ = conn.close(200, "read dead letters".into()).await;
            Ok(got)
        })
        .unwrap_or_else(|e| panic!("cannot read the dead queue `{queue}`: {e}"))
    }

    /// Drops the schema and deletes the prefixed topology; errors are reported, not fatal.
    fn cleanup(&self) {
        if let Ok(mut db) = postgres::Client::connect(&self.database_url, postgres::NoTls)
            && let Err(e) = db.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ))
        {
            eprintln!("cannot drop schema `{}`: {e}", self.schema);
        }
        let topology = self.topology();
        let deleted = block_on(async {
            let conn = amqp::connect(&self.amqp_url, "warpline e2e cleanup", &quick()).await?;
            let ch = conn.create_channel().await?;
            amqp::delete_topology(&ch, &topology, &[POOL]).await?;
            let _ = conn.close(200, "cleaned up".into()).await;
            Ok(())
        });
        if let Err(e) = deleted {
            eprintln!("cannot delete the topology `{}*`: {e}", self.prefix);
        }
    }

    /// Everything a failing test should show: the commands, then every process's log.
    fn report(&self) -> String {
        let mut out = String::from("==== fleet commands ====\n");
        for c in self.commands.lock().unwrap().iter() {
            out.push_str(c);
            out.push('\n');
        }
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let skip = lines.len().saturating_sub(400);
            out.push_str(&format!(
                "==== {} ({}; {}) ====\n",
                p.name,
                p.command,
                p.status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "running".into())
            ));
            if skip > 0 {
                out.push_str(&format!("[{skip} earlier lines in {}]\n", p.log.display()));
            }
            for l in &lines[skip..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Tools first: they are in process groups of their own and would outlive a worker.
        for p in self.procs.iter().filter(|p| p.worker) {
            for child in children(p.child.id() as i32) {
                let _ = killpg(Pid::from_raw(child), Signal::SIGKILL);
            }
        }
        for p in &mut self.procs {
            if p.status.is_none() {
                let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGKILL);
                p.status = p.child.wait().ok();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
        self.cleanup();
    }
}

/// `/readyz`'s status code (0 when nothing answers).
pub fn readyz(c: &Coordinator) -> u16 {
    http_get_status(c.addr(), "/readyz")
}

/// A minimal HTTP/1.1 GET: (status code, body); `(0, "")` on a connection failure.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return (0, String::new());
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A minimal HTTP/1.1 GET returning the status code, 0 on a connection failure.
fn http_get_status(addr: &str, path: &str) -> u16 {
    use std::io::Write;
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return 0;
    }
    let mut head = String::new();
    let _ = s.read_to_string(&mut head);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Fails, saying how to start it, when RabbitMQ does not accept connections.
fn check_rabbitmq() {
    let addr = "127.0.0.1:5672".parse().expect("an address");
    if let Err(e) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        panic!(
            "RabbitMQ is not reachable at 127.0.0.1:5672 ({e}). Start it with \
             `rabbitmq-server -detached` and run the tests again"
        );
    }
}

/// The direct children of `pid` (from /proc).
fn children(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// A command line as it would be typed.
fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// A few quick connection attempts: the broker is local, so a failure is real.
fn quick() -> Backoff {
    Backoff {
        min: Duration::from_millis(100),
        max: Duration::from_millis(500),
        max_attempts: Some(3),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs AMQP work on a runtime of its own (the tests themselves are synchronous).
fn block_on<T>(f: impl Future<Output = Result<T, BoxError>>) -> Result<T, BoxError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}
