//! Servers a test may break: a private RabbitMQ node ([`Broker`]), a private PostgreSQL cluster
//! ([`Database`]) and a private network ([`Netns`]), each started for one test and removed by
//! its drop guard, also when the test panics.
//!
//! The shared RabbitMQ (127.0.0.1:5672) and PostgreSQL (127.0.0.1:5432) are never stopped: a
//! test that restarts a server restarts its own. Every name, port and directory is unique to
//! the test (its name and this process's id), so fault tests run in parallel with each other
//! and with the rest of the suite. The recipes are those of `../shared/FAULTS.md`; they need
//! root (RabbitMQ drops to the `rabbitmq` user, the clusters belong to `postgres`, namespaces
//! need `CAP_NET_ADMIN`), which the CI container has. A step that cannot run fails the test and
//! says what it ran and what it printed.

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The PostgreSQL major version whose `pg_createcluster` the machine has.
fn pg_version() -> String {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .max()
        })
        .map(|v| v.to_string())
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server under /usr/lib/postgresql: the fault tests start clusters of \
                 their own with `pg_createcluster` (install `postgresql`, as `.ci/run` does)"
            )
        })
}

/// A port nothing listens on now (the kernel's pick; it is not reused at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// Runs a command to completion, failing the test with its output when it fails.
fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{what}`: {e}"));
    assert!(
        out.status.success(),
        "`{what}` failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Polls `done` every 100 ms until it holds; fails after `limit` naming `what`.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A RabbitMQ node of one test's own: its node name, ports and directory.
pub struct Broker {
    /// `e2e_<name>_<pid>@localhost`.
    pub node: String,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    /// Its Erlang distribution port.
    dist: u16,
    /// The directory holding its configuration, database and logs.
    dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a node listening on 127.0.0.1 only.
    pub fn start(name: &str) -> Broker {
        Broker::start_listening(name, &[])
    }

    /// Starts a node listening on 127.0.0.1 and on each of `also` (addresses of interfaces the
    /// test made, e.g. the host end of a [`Netns`]); returns once it accepts connections.
    pub fn start_listening(name: &str, also: &[&str]) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix(&format!("e2e-rmq-{name}-"))
            .tempdir()
            .expect("a temporary directory");
        let node = format!("e2e_{name}_{}@localhost", std::process::id());
        let (port, dist) = (free_port(), free_port());
        let path = dir.path();
        std::fs::write(path.join("plugins"), "").unwrap();
        std::fs::write(
            path.join("env.conf"),
            format!(
                "NODENAME={node}\nERL_EPMD_ADDRESS=127.0.0.1\n\
                 export ERL_FLAGS=\"-kernel inet_dist_use_interface {{127,0,0,1}}\"\n"
            ),
        )
        .unwrap();
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{port}\n");
        for (i, addr) in also.iter().enumerate() {
            conf.push_str(&format!("listeners.tcp.extra{i} = {addr}:{port}\n"));
        }
        if !also.is_empty() {
            // `guest` may log in from the test's own private addresses too (RabbitMQ refuses it
            // off loopback by default); the node listens nowhere else.
            conf.push_str("loopback_users = none\n");
        }
        std::fs::write(path.join("rabbitmq.conf"), conf).unwrap();
        // `rabbitmq-server` drops to the `rabbitmq` user: the directory must be its own.
        run(Command::new("chmod").arg("755").arg(path));
        run(Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(path));
        let broker = Broker {
            node,
            port,
            dist,
            dir,
        };
        run(broker.command("rabbitmq-server").arg("-detached"));
        broker.await_startup();
        broker
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The same node reached at `addr` (an address it was started listening on).
    pub fn url_at(&self, addr: &str) -> String {
        format!("amqp://guest:guest@{addr}:{}/%2f", self.port)
    }

    /// A RabbitMQ command with this node's environment.
    fn command(&self, program: &str) -> Command {
        let p = self.dir.path();
        let mut cmd = Command::new(program);
        cmd.env("RABBITMQ_CONF_ENV_FILE", p.join("env.conf"))
            .env("RABBITMQ_CONFIG_FILE", p.join("rabbitmq.conf"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .env("RABBITMQ_PID_FILE", p.join("pid"))
            .env("RABBITMQ_MNESIA_BASE", p.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", p.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p.join("plugins"));
        cmd
    }

    /// `rabbitmqctl -n NODE ARGS`, failing the test when it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = run(self
            .command("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn await_startup(&self) {
        // `await_startup` fails at once while the node has not registered with epmd yet.
        wait_until(
            Duration::from_secs(60),
            "the private RabbitMQ node started",
            || {
                self.command("rabbitmqctl")
                    .args(["-n", &self.node, "await_startup", "--timeout", "30"])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            },
        );
    }

    /// Stops the broker application: every connection drops and nothing is accepted.
    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
    }

    /// Starts the broker application again and waits until it accepts connections.
    pub fn start_app(&self) {
        self.ctl(&["start_app"]);
        self.await_startup();
    }

    /// A broker restart: stopped for `down`, then started again.
    pub fn restart(&self, down: Duration) {
        self.stop_app();
        std::thread::sleep(down);
        self.start_app();
    }

    /// The client connections the node has (one line per connection: its name).
    pub fn connections(&self) -> Vec<String> {
        self.ctl(&[
            "list_connections",
            "client_properties",
            "--no-table-headers",
            "-q",
        ])
        .lines()
        .map(str::to_string)
        .collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let stopped = self
            .command("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !stopped {
            // A node that will not answer is killed by the pid it wrote.
            if let Some(pid) = std::fs::read_to_string(self.dir.path().join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A PostgreSQL cluster of one test's own (`pg_createcluster VERSION e2e_<name>_<pid>`), with
/// trust authentication on 127.0.0.1 and a `warpline` database.
pub struct Database {
    /// The cluster's name.
    pub cluster: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    version: String,
}

impl Database {
    /// Creates and starts the cluster; returns once it accepts connections.
    pub fn start(name: &str) -> Database {
        Database::start_listening(name, &[])
    }

    /// [`Database::start`] also listening on each of `also` (addresses of interfaces the test
    /// made), trusting connections from their /30.
    pub fn start_listening(name: &str, also: &[&str]) -> Database {
        let version = pg_version();
        let cluster = format!("e2e_{name}_{}", std::process::id());
        let port = free_port();
        // A cluster left by an earlier run of this test that was killed before cleaning up.
        let _ = Command::new("pg_dropcluster")
            .args([&version, &cluster, "--stop"])
            .output();
        let mut listen = vec!["127.0.0.1".to_string()];
        listen.extend(also.iter().map(|a| a.to_string()));
        run(Command::new("pg_createcluster").args([
            &version,
            &cluster,
            "-p",
            &port.to_string(),
            "--",
            "--auth=trust",
        ]));
        let db = Database {
            cluster,
            port,
            version,
        };
        // Only the addresses asked for, and no fsync: the cluster lives for one test.
        let conf = format!(
            "/etc/postgresql/{}/{}/postgresql.conf",
            db.version, db.cluster
        );
        let mut text = std::fs::read_to_string(&conf).expect("the cluster's postgresql.conf");
        text.push_str(&format!(
            "listen_addresses = '{}'\nfsync = off\n",
            listen.join(",")
        ));
        std::fs::write(&conf, text).expect("write postgresql.conf");
        if !also.is_empty() {
            let hba = format!("/etc/postgresql/{}/{}/pg_hba.conf", db.version, db.cluster);
            let mut text = std::fs::read_to_string(&hba).expect("the cluster's pg_hba.conf");
            for a in also {
                text.push_str(&format!("host all all {a}/30 trust\n"));
            }
            std::fs::write(&hba, text).expect("write pg_hba.conf");
        }
        db.ctl("start");
        db.wait_accepting();
        let mut admin = db.client("postgres");
        for name in ["warpline", "datawarp"] {
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .expect("create the private cluster's databases");
        }
        db
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A connection to database `db` (failing the test when the cluster is down).
    pub fn client(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.url(db), postgres::NoTls).unwrap_or_else(|e| {
            panic!(
                "cannot connect to the private cluster `{}`: {e}",
                self.cluster
            )
        })
    }

    fn ctl(&self, action: &str) {
        let mut cmd = Command::new("pg_ctlcluster");
        cmd.args([&self.version, &self.cluster, action]);
        if action != "start" {
            cmd.args(["-m", "fast"]);
        }
        run(&mut cmd);
    }

    fn wait_accepting(&self) {
        wait_until(
            Duration::from_secs(30),
            "the private PostgreSQL cluster accepted connections",
            || postgres::Client::connect(&self.url("postgres"), postgres::NoTls).is_ok(),
        );
    }

    /// Stops the cluster (fast: every session is terminated, as in a real restart).
    pub fn stop(&self) {
        self.ctl("stop");
    }

    /// Starts the cluster again and waits until it accepts connections.
    pub fn start_again(&self) {
        self.ctl("start");
        self.wait_accepting();
    }

    /// A database restart: stopped for `down`, then started again.
    pub fn restart(&self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.start_again();
    }

    /// Terminates the backends holding an advisory lock in the `warpline` database (the leader
    /// lock of the one fleet using this cluster); returns how many.
    pub fn terminate_lock_holders(&self) -> usize {
        self.client("postgres")
            .query(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
                 JOIN pg_database d ON d.oid = l.database \
                 WHERE l.locktype = 'advisory' AND l.granted AND d.datname = 'warpline'",
                &[],
            )
            .expect("pg_terminate_backend")
            .len()
    }

    /// Terminates the backends whose `application_name` is `app` (what an operator's
    /// `pg_terminate_backend` does to a paused leader's lock connection); returns how many.
    pub fn terminate(&self, app: &str) -> usize {
        self.client("postgres")
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .expect("pg_terminate_backend")
            .len()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = Command::new("pg_dropcluster")
            .args([&self.version, &self.cluster, "--stop"])
            .output();
    }
}

/// A network namespace of one test's own joined to the host by a veth pair on a private /30:
/// the host end is [`Netns::host`], the namespace end [`Netns::inside`]. Bringing the host end
/// down cuts everything in the namespace off, as a pulled cable would, without touching any
/// other interface.
pub struct Netns {
    /// The namespace's name.
    pub name: String,
    /// The host end's address.
    pub host: String,
    /// The namespace end's address.
    pub inside: String,
    veth: String,
}

impl Netns {
    /// Creates the namespace and its veth pair. `index` (0–63) picks the /30 in 10.231.0.0/24,
    /// so parallel tests use different ones.
    pub fn create(name: &str, index: u8) -> Netns {
        assert!(index < 64, "a /30 index is 0..64");
        let pid = std::process::id();
        let ns = format!("e2e-{name}-{pid}");
        // Interface names have at most 15 bytes.
        let veth = format!("wl{:x}h{index}", pid % 0xfffff);
        let peer = format!("wl{:x}n{index}", pid % 0xfffff);
        let base = u32::from(index) * 4;
        let (host, inside) = (
            format!("10.231.0.{}", base + 1),
            format!("10.231.0.{}", base + 2),
        );
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        run(Command::new("ip").args(["netns", "add", &ns]));
        let made = Netns {
            name: ns.clone(),
            host: host.clone(),
            inside: inside.clone(),
            veth: veth.clone(),
        };
        run(Command::new("ip").args(["link", "add", &veth, "type", "veth", "peer", "name", &peer]));
        run(Command::new("ip").args(["link", "set", &peer, "netns", &ns]));
        run(Command::new("ip").args(["addr", "add", &format!("{host}/30"), "dev", &veth]));
        run(Command::new("ip").args(["link", "set", &veth, "up"]));
        made.exec(&["ip", "addr", "add", &format!("{inside}/30"), "dev", &peer]);
        made.exec(&["ip", "link", "set", &peer, "up"]);
        made.exec(&["ip", "link", "set", "lo", "up"]);
        made
    }

    /// Runs a command inside the namespace to completion.
    pub fn exec(&self, args: &[&str]) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args));
    }

    /// The prefix that runs a command inside the namespace (`ip netns exec NAME`).
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Cuts the namespace off (the host end of the cable goes down).
    pub fn cut(&self) {
        run(Command::new("ip").args(["link", "set", &self.veth, "down"]));
    }

    /// Joins it again.
    pub fn mend(&self) {
        run(Command::new("ip").args(["link", "set", &self.veth, "up"]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
