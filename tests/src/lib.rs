//! The end-to-end harness: finds the built `warpline` binaries, checks the services, runs real
//! processes with their output captured, serves scripted HTTP faults on 127.0.0.1, and plays a
//! scripted LLM provider ([`ModelServer`]) speaking the Gemini and OpenAI wire formats. Fleet
//! mode's coordinators and workers are started by [`fleet::Fleet`].
//!
//! Every test gets its own workdir (a temporary directory) and its own PostgreSQL schema, so
//! tests run in parallel without seeing each other's files or rows. When a service is down the
//! test fails and says how to start it; nothing is skipped silently.

pub mod browser;
pub mod faults;
pub mod fleet;
pub mod otlp;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use warpline_shared::audit::{AuditRecord, parse_line};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The directory holding the workspace's binaries (and the DataWarp tools): what a test
/// passes as `--tools-dir` / `WARPLINE_TOOLS_DIR` when its steps run those tools by name.
pub fn bin_dir() -> PathBuf {
    bin("warpline")
        .parent()
        .expect("a binary has a directory")
        .to_path_buf()
}

/// A binary built by the workspace (`cargo build --workspace --bins`), beside this test's
/// own target directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "`{}` is not built: run `cargo build --workspace --bins` before the tests (the README's test command does)",
        path.display()
    );
    path
}

/// The PostgreSQL URL the tests and the DataWarp tools use.
pub fn database_url() -> String {
    std::env::var("DATAWARP_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/datawarp".into())
}

/// Connects to the server's `postgres` database, failing with how to start the service.
pub fn postgres_admin() -> postgres::Client {
    let url = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5";
    postgres::Client::connect(url, postgres::NoTls).unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at 127.0.0.1:5432 ({e}). Start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` and run the tests again"
        )
    })
}

/// A unique name for this test process and call: `prefix_<pid>_<n>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A finished `warpline` process.
pub struct Finished {
    /// The command line, for failure messages.
    pub command: String,
    /// What it returned.
    pub output: Output,
}

impl Finished {
    /// Exit code (-1 when killed by a signal).
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }

    /// Standard output.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    /// Standard error.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// Everything, for assertion messages.
    pub fn context(&self) -> String {
        format!(
            "command: {}\nexit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.output.status,
            self.stdout(),
            self.stderr()
        )
    }

    /// The `--json` summary on standard output.
    pub fn summary(&self) -> Value {
        serde_json::from_str(&self.stdout())
            .unwrap_or_else(|e| panic!("stdout is not a JSON summary ({e})\n{}", self.context()))
    }

    /// Asserts the exit code, printing everything when it differs.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            code,
            "unexpected exit code\n{}",
            self.context()
        );
        self
    }
}

/// Runs `warpline` with arguments and extra environment, and waits for it.
pub fn warpline(args: &[&str], env: &[(&str, &str)]) -> Finished {
    let exe = bin("warpline");
    let mut cmd = Command::new(&exe);
    cmd.args(args).current_dir(repo_root());
    for k in fleet::TOKEN_VARS {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let command = format!("{} {}", exe.display(), args.join(" "));
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    Finished { command, output }
}

/// Reads every record of an audit log.
pub fn audit_records(path: &Path) -> Vec<AuditRecord> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read `{}`: {e}", path.display()));
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            parse_line(l)
                .unwrap_or_else(|e| panic!("audit line {}: {e}", i + 1))
                .0
        })
        .collect()
}

/// The run summary for a partition key in a `--json` summary.
pub fn run_of<'a>(summary: &'a Value, partition: &str) -> &'a Value {
    summary["runs"]
        .as_array()
        .expect("runs array")
        .iter()
        .find(|r| r["partition"] == partition)
        .unwrap_or_else(|| panic!("no run for `{partition}` in {summary:#}"))
}

/// What the fault server does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Serve the file.
    Serve,
    /// Answer with this status and a short body.
    Status(u16),
    /// Serve only the first N bytes of the file (a cut-short download).
    Truncate(usize),
}

/// A small HTTP/1.1 server on 127.0.0.1 serving files from a directory, with scripted faults
/// per path: the n-th request for a path gets the n-th fault of its script (the last repeats),
/// and paths with no script are served.
pub struct FaultServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl FaultServer {
    /// Starts serving `root` with the given scripts (path → faults).
    pub fn start(root: PathBuf, scripts: HashMap<String, Vec<Fault>>) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let base = format!("http://{}", listener.local_addr().expect("local addr"));
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let scripts = Arc::new(scripts);
        let counter = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (root, scripts, counter) = (root.clone(), scripts.clone(), counter.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &root, &scripts, &counter);
                });
            }
        });
        FaultServer { base, hits }
    }

    /// How many requests a path has had.
    pub fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("hits lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

fn serve(
    mut stream: TcpStream,
    root: &Path,
    scripts: &HashMap<String, Vec<Fault>>,
    hits: &Mutex<HashMap<String, usize>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
    let n = {
        let mut h = hits.lock().expect("hits lock");
        let n = h.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let fault = scripts
        .get(&path)
        .and_then(|s| s.get(n - 1).or(s.last()))
        .cloned()
        .unwrap_or(Fault::Serve);
    let file = root.join(path.trim_start_matches('/'));
    let body = match std::fs::File::open(&file) {
        Ok(mut f) => {
            let mut b = Vec::new();
            f.read_to_end(&mut b)?;
            b
        }
        Err(_) => return respond(&mut stream, 404, b"not found"),
    };
    match fault {
        Fault::Serve => respond(&mut stream, 200, &body),
        Fault::Status(code) => respond(&mut stream, code, b"injected failure"),
        Fault::Truncate(n) => respond(&mut stream, 200, &body[..n.min(body.len())]),
    }
}

fn respond(stream: &mut TcpStream, code: u16, body: &[u8]) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nContent-Type: text/csv\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    stream.flush()
}

/// Drops a PostgreSQL schema when the test ends, whatever its outcome.
pub struct SchemaGuard(pub String);

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let url = database_url();
        if let Ok(mut c) = postgres::Client::connect(&url, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0));
        }
    }
}

/// Waits until `path` exists and is not empty, and returns what it holds; fails after `limit`.
pub fn wait_file(path: &Path, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if !text.trim().is_empty() {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "`{}` was not written within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True while a process with this pid exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// One scripted reply of a [`ModelServer`].
#[derive(Debug, Clone)]
pub struct ModelReply {
    /// HTTP status.
    pub status: u16,
    /// Extra headers (e.g. `Retry-After`).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
    /// How long to wait before answering.
    pub delay: Duration,
}

impl ModelReply {
    /// A 200 with this JSON body.
    pub fn ok(body: impl Into<String>) -> ModelReply {
        ModelReply::status(200, body)
    }

    /// Any status with this body.
    pub fn status(status: u16, body: impl Into<String>) -> ModelReply {
        ModelReply {
            status,
            headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> ModelReply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Answers only after `delay`.
    pub fn after(mut self, delay: Duration) -> ModelReply {
        self.delay = delay;
        self
    }
}

/// A request a [`ModelServer`] received.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    /// The request path (`/v1beta/models/m:generateContent`).
    pub path: String,
    /// Headers, names lowercased.
    pub headers: HashMap<String, String>,
    /// The raw body, exactly as received.
    pub body: String,
}

impl ModelRequest {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The user message text, in either wire format.
    pub fn user_text(&self) -> String {
        let v = self.json();
        v["contents"][0]["parts"][0]["text"]
            .as_str()
            .or_else(|| v["messages"][1]["content"].as_str())
            .unwrap_or_default()
            .to_string()
    }
}

type Responder = dyn Fn(&ModelRequest, usize) -> ModelReply + Send + Sync;

/// A fake LLM provider on 127.0.0.1: every request is recorded and answered by a responder
/// given the request and its 1-based number. It tracks how many requests were in flight at
/// once, so tests can check concurrency bounds.
pub struct ModelServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    requests: Arc<Mutex<Vec<ModelRequest>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl ModelServer {
    /// Starts a server answering with `respond`.
    pub fn start(
        respond: impl Fn(&ModelRequest, usize) -> ModelReply + Send + Sync + 'static,
    ) -> ModelServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let base = format!("http://{}", listener.local_addr().expect("local addr"));
        let requests: Arc<Mutex<Vec<ModelRequest>>> = Arc::default();
        let in_flight: Arc<AtomicUsize> = Arc::default();
        let max_in_flight: Arc<AtomicUsize> = Arc::default();
        let respond: Arc<Responder> = Arc::new(respond);
        let (reqs, flying, peak) = (requests.clone(), in_flight.clone(), max_in_flight.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (reqs, flying, peak, respond) =
                    (reqs.clone(), flying.clone(), peak.clone(), respond.clone());
                std::thread::spawn(move || {
                    let now = flying.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let _ = answer_model(stream, &reqs, &*respond);
                    flying.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        ModelServer {
            base,
            requests,
            in_flight,
            max_in_flight,
        }
    }

    /// Starts a server whose n-th request gets the n-th reply (the last one repeats).
    pub fn script(replies: Vec<ModelReply>) -> ModelServer {
        assert!(!replies.is_empty(), "a script needs at least one reply");
        ModelServer::start(move |_, n| replies[(n - 1).min(replies.len() - 1)].clone())
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<ModelRequest> {
        self.requests.lock().expect("requests lock").clone()
    }

    /// The most requests that were being answered at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

fn answer_model(
    mut stream: TcpStream,
    requests: &Mutex<Vec<ModelRequest>>,
    respond: &Responder,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let request = ModelRequest {
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let n = {
        let mut all = requests.lock().expect("requests lock");
        all.push(request.clone());
        all.len()
    };
    let reply = respond(&request, n);
    std::thread::sleep(reply.delay);
    let mut head = format!(
        "HTTP/1.1 {} Status\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(reply.body.as_bytes())?;
    stream.flush()
}

/// A Gemini `generateContent` reply whose single candidate says `text`.
pub fn gemini_text(text: &str) -> String {
    serde_json::json!({
        "candidates": [{
            "content": {"parts": [{"text": text}], "role": "model"},
            "finishReason": "STOP",
            "index": 0
        }],
        "usageMetadata": {"promptTokenCount": 812, "candidatesTokenCount": 24, "totalTokenCount": 836},
        "modelVersion": "scripted"
    })
    .to_string()
}

/// A Gemini reply stopped by its safety filter.
pub fn gemini_safety_stop() -> String {
    serde_json::json!({
        "candidates": [{"finishReason": "SAFETY", "index": 0}],
        "usageMetadata": {"promptTokenCount": 812, "totalTokenCount": 812}
    })
    .to_string()
}

/// A Gemini reply refusing the prompt itself.
pub fn gemini_prompt_blocked() -> String {
    serde_json::json!({
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 812, "totalTokenCount": 812}
    })
    .to_string()
}

/// An OpenAI chat completion whose single choice says `text`.
pub fn openai_text(text: &str) -> String {
    serde_json::json!({
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "model": "scripted",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 790, "completion_tokens": 21, "total_tokens": 811}
    })
    .to_string()
}

/// An OpenAI chat completion where the model refused.
pub fn openai_refusal() -> String {
    serde_json::json!({
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": null, "refusal": "I can't help with that."},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 790, "completion_tokens": 8, "total_tokens": 798}
    })
    .to_string()
}

/// A decision as a model would write it.
pub fn decision_json(action: &str, reason: &str) -> String {
    serde_json::json!({"action": action, "reason": reason}).to_string()
}
