//! The end-to-end harness: finds the built `warpline` binaries, checks the services, runs real
//! processes with their output captured, and serves scripted HTTP faults on 127.0.0.1.
//!
//! Every test gets its own workdir (a temporary directory) and its own PostgreSQL schema, so
//! tests run in parallel without seeing each other's files or rows. When a service is down the
//! test fails and says how to start it; nothing is skipped silently.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use warpline_shared::audit::{AuditRecord, parse_line};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
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
