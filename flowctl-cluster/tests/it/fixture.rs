//! A real 3-node `nats-server` cluster with JetStream on 127.0.0.1, started per
//! test, stopped by pid, and read through its monitoring endpoints.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `nats-server` binary: `FLOWCTL_NATS_SERVER`, then `nats-server` on PATH,
/// then `/usr/sbin/nats-server`. Missing is a failure, never a skip.
pub(crate) fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOWCTL_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin")]) {
        let candidate = dir.join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("nats-server not found: run `cargo xtask setup` (installs nats-server)");
}

/// Cluster starts tried before giving up when a node exits during start-up.
const START_ATTEMPTS: usize = 3;

/// Why a wait for readiness failed.
#[derive(Debug)]
enum NotReady {
    /// A node that should run exited (reaped; its log tail included).
    Exited(String),
    /// The deadline passed with every node still running.
    Timeout(String),
}

/// The last `lines` lines of a log file (or why it could not be read).
fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn free_port() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let port = l.local_addr().expect("local addr").port();
    (l, port)
}

/// One node's ports and process.
#[derive(Debug)]
pub(crate) struct Node {
    /// Client port.
    pub(crate) client: u16,
    /// Cluster (route) port.
    pub(crate) route: u16,
    /// Monitoring (http) port.
    pub(crate) http: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running cluster; every node is killed (SIGKILL) on drop, also on panic.
#[derive(Debug)]
pub(crate) struct NatsCluster {
    /// The nodes, n0..n2.
    pub(crate) nodes: Vec<Node>,
    dir: PathBuf,
}

/// Extra configuration for every node (auth blocks, `max_payload`, ...).
#[derive(Debug, Default, Clone)]
pub(crate) struct Extra(pub(crate) String);

impl NatsCluster {
    /// Three nodes with JetStream, waited on until every node sees a meta leader.
    pub(crate) fn start() -> NatsCluster {
        Self::start_with(Extra::default())
    }

    /// Three nodes with extra config lines in every node's file.
    ///
    /// The ports were free a moment before the servers bind them; if another
    /// process takes one in between, that node exits at once. Then the other
    /// nodes are killed and the whole cluster starts again on new ports, up
    /// to [`START_ATTEMPTS`] times.
    pub(crate) fn start_with(extra: Extra) -> NatsCluster {
        let bin = nats_server_bin();
        let mut attempt = 1;
        loop {
            let mut cluster = Self::launch(&bin, &extra);
            match cluster.wait_until_ready(Duration::from_secs(60)) {
                Ok(()) => return cluster,
                Err(NotReady::Exited(why)) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "nats cluster start attempt {attempt}/{START_ATTEMPTS} failed, \
                         starting again on new ports: {why}"
                    );
                    drop(cluster); // kills and reaps the other nodes by pid
                    attempt += 1;
                }
                Err(NotReady::Exited(why)) => {
                    panic!("nats cluster did not start in {START_ATTEMPTS} attempts: {why}")
                }
                Err(NotReady::Timeout(why)) => panic!("{why}"),
            }
        }
    }

    /// Writes the configs of three nodes on fresh ports and spawns them.
    fn launch(bin: &Path, extra: &Extra) -> NatsCluster {
        let dir = std::env::temp_dir().join(format!(
            "flowctl-nats-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&dir).expect("temp dir");
        // Bind all ports at once, then release them, so the nine are distinct.
        let mut held = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..9 {
            let (l, p) = free_port();
            held.push(l);
            ports.push(p);
        }
        drop(held);
        let mut nodes = Vec::new();
        for i in 0..3 {
            let (client, route, http) = (ports[i * 3], ports[i * 3 + 1], ports[i * 3 + 2]);
            let routes: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", ports[j * 3 + 1]))
                .collect();
            let store = dir.join(format!("store-n{i}"));
            let config = dir.join(format!("n{i}.conf"));
            let text = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{http}\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: flowctl, listen: 127.0.0.1:{route}, routes: [{}] }}\n{}\n",
                store.display(),
                routes.join(", "),
                extra.0
            );
            fs::write(&config, text).expect("write config");
            nodes.push(Node {
                client,
                route,
                http,
                log: dir.join(format!("n{i}.log")),
                config,
                child: None,
            });
        }
        let mut cluster = NatsCluster { nodes, dir };
        for i in 0..3 {
            cluster.spawn(bin, i);
        }
        cluster
    }

    fn spawn(&mut self, bin: &Path, i: usize) {
        let node = &mut self.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("log file");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&node.config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "could not start {}: {e}; run `cargo xtask setup` (installs nats-server)",
                    bin.display()
                )
            });
        node.child = Some(child);
    }

    /// Client URLs of every node, as seeds.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client))
            .collect()
    }

    /// Client URL of node `i`.
    pub(crate) fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client)
    }

    /// SIGKILLs node `i` and reaps it.
    pub(crate) fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes node `i` with SIGSTOP: its sockets stay open but it answers
    /// nothing (a hung node). Drop still kills it.
    pub(crate) fn freeze(&mut self, i: usize) {
        let pid = self.nodes[i].child.as_ref().expect("node is running").id();
        let status = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .expect("`kill` not found: run `cargo xtask setup` (installs procps)");
        assert!(status.success(), "kill -STOP {pid} failed");
    }

    /// Starts node `i` again (same ports and store) and waits until the whole
    /// cluster sees a meta leader again. Its ports cannot change (the other
    /// nodes' routes name them): if one was taken meanwhile, the node exits and
    /// this panics at once with the tail of its log.
    pub(crate) fn restart(&mut self, i: usize) {
        self.kill(i);
        let bin = nats_server_bin();
        self.spawn(&bin, i);
        self.wait_ready(Duration::from_secs(60));
    }

    /// True if node `i` is running.
    pub(crate) fn is_up(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Waits until every running node is healthy and reports a meta leader;
    /// panics at once (with the tail of its log) if a running node exits, e.g.
    /// a restarted node whose old port was taken meanwhile.
    pub(crate) fn wait_ready(&mut self, limit: Duration) {
        match self.wait_until_ready(limit) {
            Ok(()) => {}
            Err(NotReady::Exited(why) | NotReady::Timeout(why)) => panic!("{why}"),
        }
    }

    fn wait_until_ready(&mut self, limit: Duration) -> Result<(), NotReady> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(why) = self.exited_node() {
                return Err(NotReady::Exited(why));
            }
            let ready = (0..3).filter(|i| self.is_up(*i)).all(|i| {
                let healthy = matches!(
                    http_get(self.nodes[i].http, "/healthz?js-enabled-only=true"),
                    Ok((200, _))
                );
                healthy
                    && self
                        .json(i, "/jsz")
                        .ok()
                        .and_then(|v| v["meta_cluster"]["leader"].as_str().map(|s| !s.is_empty()))
                        .unwrap_or(false)
            });
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(NotReady::Timeout(format!(
                    "nats cluster not ready within {limit:?}; logs in {}",
                    self.dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50)); // polling interval, not synchronisation
        }
    }

    /// The first node that should run but has exited (it is reaped and marked
    /// down), described with its exit status and the tail of its log.
    fn exited_node(&mut self) -> Option<String> {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let Some(child) = node.child.as_mut() else {
                continue;
            };
            let status = match child.try_wait() {
                Ok(None) => continue,
                Ok(Some(status)) => status.to_string(),
                Err(e) => format!("unknown status ({e})"),
            };
            let pid = child.id();
            node.child = None;
            return Some(format!(
                "n{i} (pid {pid}, ports client {} route {} http {}) exited: {status}; \
                 last lines of {}:\n{}",
                node.client,
                node.route,
                node.http,
                node.log.display(),
                log_tail(&node.log, 20)
            ));
        }
        None
    }

    /// A monitoring endpoint of node `i`, parsed.
    pub(crate) fn json(&self, i: usize, path: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.nodes[i].http, path).map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("GET {path}: status {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }

    /// Subjects of every subscription node `i` knows (`/subsz?subs=1`), local and routed.
    pub(crate) fn subscriptions(&self, i: usize) -> Vec<String> {
        let v = self
            .json(i, "/subsz?subs=1&limit=100000")
            .unwrap_or(Value::Null);
        v["subscriptions_list"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["subject"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `(name, subscriptions)` of every client connection on node `i` (`/connz?subs=1`).
    pub(crate) fn connections(&self, i: usize) -> Vec<(String, Vec<String>)> {
        let v = self
            .json(i, "/connz?subs=1&limit=100000")
            .unwrap_or(Value::Null);
        v["connections"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        let name = c["name"].as_str().unwrap_or_default().to_owned();
                        let subs = c["subscriptions_list"]
                            .as_array()
                            .map(|s| {
                                s.iter()
                                    .filter_map(|x| x.as_str().map(str::to_owned))
                                    .collect()
                            })
                            .unwrap_or_default();
                        (name, subs)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `(name, num_waiting)` of every consumer node `i` reports (`/jsz?consumers=true`).
    pub(crate) fn consumers(&self, i: usize) -> Vec<(String, u64)> {
        let v = self.json(i, "/jsz?consumers=true").unwrap_or(Value::Null);
        let mut out = Vec::new();
        for acc in v["account_details"].as_array().into_iter().flatten() {
            for st in acc["stream_detail"].as_array().into_iter().flatten() {
                for c in st["consumer_detail"].as_array().into_iter().flatten() {
                    if let Some(n) = c["name"].as_str() {
                        out.push((n.to_owned(), c["num_waiting"].as_u64().unwrap_or(0)));
                    }
                }
            }
        }
        out
    }

    /// Polls `check` against the running nodes until it holds or `limit` passes;
    /// returns the last failure description on timeout.
    pub(crate) async fn eventually<F>(&self, limit: Duration, mut check: F) -> Result<(), String>
    where
        F: FnMut(&NatsCluster) -> Result<(), String>,
    {
        let deadline = Instant::now() + limit;
        loop {
            let r = check(self);
            match r {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("nats logs kept in {}", self.dir.display());
        }
    }
}

/// A tiny HTTP/1.0 GET on 127.0.0.1:port: `(status, body)`.
pub(crate) fn http_get(port: u16, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no http header end"))?;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no http status"))?;
    Ok((status, buf[head_end + 4..].to_vec()))
}
