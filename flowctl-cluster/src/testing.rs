//! A real 3-node `nats-server` cluster with JetStream on 127.0.0.1, for the
//! tests, the examples and the soak (feature `testing`).
//!
//! Each [`NatsCluster`] writes its configs, logs and JetStream stores to a
//! fresh directory `<tmp>/flowctl-nats-<pid>-<random>` and runs its nodes on
//! 127.0.0.1 ports that were free a moment before. The nodes are plain child
//! processes, stopped by pid: [`NatsCluster::kill`] (SIGKILL, reaped without
//! blocking the runtime), [`NatsCluster::stop`], and `Drop` as the safety net
//! (kills and reaps whatever still runs, so an error or a panic cannot leave a
//! server behind; the directory is kept, and named, during a panic).
//!
//! Everything the servers are asked (health, meta leader, subscriptions,
//! connections) goes through their HTTP monitoring port with a tiny async
//! HTTP/1.0 client ([`json`], [`subscriptions`], [`connections`]; also usable
//! on the monitoring address of an external cluster). Nothing here blocks a
//! tokio worker except, for sync callers, [`NatsCluster::kill_blocking`] and
//! [`NatsCluster::freeze`] (which runs `kill -STOP`).
//!
//! The `nats-server` binary is `FLOWCTL_NATS_SERVER`, else
//! `/usr/sbin/nats-server` (Debian's package), else `nats-server` on `PATH`;
//! missing is an error naming the package, never a skip.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

pub use crate::error::FixtureError;

/// Nodes of the cluster (`n0`..`n2`).
pub const NODES: usize = 3;

/// Cluster starts tried before giving up when a node exits during start-up.
const START_ATTEMPTS: usize = 3;

/// How long [`NatsCluster::start`] waits for a healthy cluster.
pub const READY_LIMIT: Duration = Duration::from_secs(60);

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

/// The `nats-server` binary: `FLOWCTL_NATS_SERVER`, then
/// `/usr/sbin/nats-server` (Debian's package), then `nats-server` on `PATH`.
///
/// # Errors
/// [`FixtureError::ServerNotFound`] naming what was tried and the package.
pub fn server_bin() -> Result<PathBuf, FixtureError> {
    if let Some(p) = std::env::var_os("FLOWCTL_NATS_SERVER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(FixtureError::ServerNotFound {
                tried: format!("FLOWCTL_NATS_SERVER={} is not a file", p.display()),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/sbin"))
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| FixtureError::ServerNotFound {
            tried: "FLOWCTL_NATS_SERVER unset, not in /usr/sbin nor on PATH".into(),
        })
}

/// One node: its ports, files and process.
#[derive(Debug)]
struct Node {
    client: u16,
    route: u16,
    http: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running local cluster; see the module docs.
#[derive(Debug)]
pub struct NatsCluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    /// Removed by `stop`/`Drop`; `None` once removed or kept.
    dir: Option<PathBuf>,
}

impl NatsCluster {
    /// Three JetStream nodes, waited on (up to [`READY_LIMIT`]) until every
    /// node is healthy and sees a meta leader.
    ///
    /// # Errors
    /// See [`NatsCluster::start_with`].
    pub async fn start() -> Result<NatsCluster, FixtureError> {
        Self::start_with("", READY_LIMIT).await
    }

    /// Three nodes with `extra` configuration lines in every node's file
    /// (auth blocks, `max_payload`, ...), waited on up to `limit`.
    ///
    /// The ports were free a moment before the servers bind them; if another
    /// process takes one in between, that node exits at once. Then the other
    /// nodes are killed and the whole cluster starts again on new ports (a new
    /// directory), up to 3 times.
    ///
    /// # Errors
    /// [`FixtureError::ServerNotFound`]; [`FixtureError::Start`] when a node
    /// exited in all 3 attempts or the cluster was not ready within `limit`
    /// (with the tail of the node's log or where the logs are).
    pub async fn start_with(extra: &str, limit: Duration) -> Result<NatsCluster, FixtureError> {
        let bin = server_bin()?;
        let mut attempt = 1;
        loop {
            let mut cluster = Self::launch(bin.clone(), extra)?;
            match cluster.wait_until_ready(limit).await {
                Ok(()) => return Ok(cluster),
                Err(NotReady::Exited(why)) if attempt < START_ATTEMPTS => {
                    tracing::warn!(
                        "nats start attempt {attempt}/{START_ATTEMPTS} failed, \
                         starting again on new ports: {why}"
                    );
                    // Kills and reaps the other nodes by pid.
                    cluster.stop(false).await?;
                    attempt += 1;
                }
                Err(NotReady::Exited(why)) => {
                    return Err(FixtureError::Start(format!(
                        "nats cluster did not start in {START_ATTEMPTS} attempts: {why}"
                    )));
                }
                Err(NotReady::Timeout(why)) => return Err(FixtureError::Start(why)),
            }
        }
    }

    /// Writes the configs of three nodes on fresh ports and spawns them.
    fn launch(bin: PathBuf, extra: &str) -> Result<NatsCluster, FixtureError> {
        let dir = std::env::temp_dir().join(format!(
            "flowctl-nats-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&dir).map_err(|e| FixtureError::io("create", &dir, e))?;
        // From here on, Drop removes the directory if a step fails.
        let mut cluster = NatsCluster {
            bin,
            nodes: Vec::new(),
            dir: Some(dir.clone()),
        };
        // Bind all nine ports at once, then release them, so they are distinct.
        let mut held = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..NODES * 3 {
            let free = TcpListener::bind("127.0.0.1:0").and_then(|l| {
                let port = l.local_addr()?.port();
                Ok((l, port))
            });
            let (l, port) = free.map_err(|e| {
                FixtureError::Start(format!("cannot bind a free port on 127.0.0.1: {e}"))
            })?;
            held.push(l);
            ports.push(port);
        }
        drop(held);
        for i in 0..NODES {
            let (client, route, http) = (ports[i * 3], ports[i * 3 + 1], ports[i * 3 + 2]);
            let routes: Vec<String> = (0..NODES)
                .filter(|j| *j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", ports[j * 3 + 1]))
                .collect();
            let store = dir.join(format!("store-n{i}"));
            let config = dir.join(format!("n{i}.conf"));
            let text = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{http}\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: flowctl, listen: 127.0.0.1:{route}, routes: [{}] }}\n{extra}\n",
                store.display(),
                routes.join(", "),
            );
            fs::write(&config, text).map_err(|e| FixtureError::io("write", &config, e))?;
            cluster.nodes.push(Node {
                client,
                route,
                http,
                log: dir.join(format!("n{i}.log")),
                config,
                child: None,
            });
        }
        for i in 0..NODES {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<(), FixtureError> {
        let node = &mut self.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| FixtureError::io("open", &node.log, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| FixtureError::io("open", &node.log, e))?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| FixtureError::Start(format!(
                "cannot start {}: {e}; run `cargo xtask setup` (it installs the nats-server package)",
                self.bin.display()
            )))?;
        node.child = Some(child);
        Ok(())
    }

    /// The `nats-server` binary in use.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Client URLs of every node (`nats://127.0.0.1:port`), as seeds.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// Client URL of node `i`.
    ///
    /// # Panics
    /// If `i` is not below [`NODES`].
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client)
    }

    /// Route (cluster) port of node `i`.
    ///
    /// # Panics
    /// If `i` is not below [`NODES`].
    pub fn route_port(&self, i: usize) -> u16 {
        self.nodes[i].route
    }

    /// Monitoring addresses (`127.0.0.1:port`) of every node.
    pub fn monitors(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.monitor(i)).collect()
    }

    /// Monitoring address (`127.0.0.1:port`) of node `i`.
    ///
    /// # Panics
    /// If `i` is not below [`NODES`].
    pub fn monitor(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].http)
    }

    /// Where the configs and logs are (`None` once the cluster is stopped).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The pid of node `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// True if node `i` runs.
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// SIGKILLs node `i` by pid and reaps it without blocking the runtime
    /// (polls `try_wait` every 2 ms, up to 10 s). A node that is down is left
    /// alone.
    ///
    /// # Errors
    /// [`FixtureError::Node`] if it could not be killed or did not die.
    pub async fn kill(&mut self, i: usize) -> Result<(), FixtureError> {
        let Some(mut child) = self.nodes[i].child.take() else {
            return Ok(());
        };
        let pid = child.id();
        let killed = child.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => {
                    return killed
                        .map_err(|e| FixtureError::Node(format!("kill -9 {pid} (n{i}): {e}")));
                }
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(None) => {
                    // Give it back to Drop, which waits for it.
                    self.nodes[i].child = Some(child);
                    return Err(FixtureError::Node(format!(
                        "n{i} (pid {pid}) did not die within 10 s of SIGKILL"
                    )));
                }
                Err(e) => {
                    return Err(FixtureError::Node(format!(
                        "waiting for n{i} (pid {pid}): {e}"
                    )));
                }
            }
        }
    }

    /// SIGKILLs node `i` and reaps it with a blocking wait, for sync code
    /// (a killed process is reaped in microseconds). A node that is down is
    /// left alone.
    ///
    /// # Errors
    /// [`FixtureError::Node`] if it could not be killed or reaped.
    pub fn kill_blocking(&mut self, i: usize) -> Result<(), FixtureError> {
        let Some(mut child) = self.nodes[i].child.take() else {
            return Ok(());
        };
        let pid = child.id();
        child
            .kill()
            .and_then(|()| child.wait().map(drop))
            .map_err(|e| FixtureError::Node(format!("kill -9 {pid} (n{i}): {e}")))
    }

    /// Freezes node `i` with SIGSTOP: its sockets stay open but it answers
    /// nothing (a hung node). Kill or drop still ends it.
    ///
    /// # Errors
    /// [`FixtureError::Node`] if it is down or `kill -STOP` failed.
    pub fn freeze(&mut self, i: usize) -> Result<(), FixtureError> {
        let pid = self
            .pid(i)
            .ok_or_else(|| FixtureError::Node(format!("n{i} is not running")))?;
        let status = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .map_err(|e| {
                FixtureError::Node(format!(
                    "cannot run `kill -STOP {pid}`: {e}; run `cargo xtask setup` (installs procps)"
                ))
            })?;
        if status.success() {
            Ok(())
        } else {
            Err(FixtureError::Node(format!(
                "kill -STOP {pid} failed: {status}"
            )))
        }
    }

    /// Starts node `i` again on the same ports and store (it must be down).
    /// Its ports cannot change (the other nodes' routes name them): if one was
    /// taken meanwhile the node exits at once, and the next
    /// [`NatsCluster::wait_ready`] fails fast with the tail of its log.
    ///
    /// # Errors
    /// [`FixtureError::Node`] if it still runs, [`FixtureError::Start`] if it
    /// cannot be spawned.
    pub fn restart(&mut self, i: usize) -> Result<(), FixtureError> {
        if self.nodes[i].child.is_some() {
            return Err(FixtureError::Node(format!("n{i} is still running")));
        }
        self.spawn(i)
    }

    /// Waits until every running node answers `/healthz` with 200 (that
    /// includes "JetStream is current": the meta group and every stream and
    /// consumer replica it holds have caught up) and names a meta leader.
    ///
    /// # Errors
    /// [`FixtureError::Start`] at once, with the tail of its log, if a running
    /// node exits (e.g. a node restarted on its old ports after another
    /// process took one); or after `limit`, naming the node that is not ready.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<(), FixtureError> {
        self.wait_until_ready(limit).await.map_err(|e| match e {
            NotReady::Exited(why) | NotReady::Timeout(why) => FixtureError::Start(why),
        })
    }

    async fn wait_until_ready(&mut self, limit: Duration) -> Result<(), NotReady> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(why) = self.exited_node() {
                return Err(NotReady::Exited(why));
            }
            let mut why = None;
            for (i, node) in self.nodes.iter().enumerate() {
                if node.child.is_none() {
                    continue;
                }
                if let Err(e) = healthy(&format!("127.0.0.1:{}", node.http)).await {
                    why = Some(format!("n{i}: {e}"));
                    break;
                }
            }
            let Some(why) = why else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(NotReady::Timeout(format!(
                    "nats cluster not ready within {limit:?} ({why}); logs in {}",
                    self.dir().map_or("?".into(), |d| d.display().to_string())
                )));
            }
            // A polling interval: the servers have no "ready" notification.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first node that should run but has exited (reaped with
    /// `try_wait`, never blocking, and marked down), described with its exit
    /// status and the tail of its log.
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

    /// Kills and reaps every node, then removes the directory (kept, and
    /// named on stderr, when `keep_logs`).
    ///
    /// # Errors
    /// Every node that could not be killed and a directory that could not be
    /// removed, in one [`FixtureError::Node`].
    pub async fn stop(mut self, keep_logs: bool) -> Result<(), FixtureError> {
        let mut problems = Vec::new();
        for i in 0..self.nodes.len() {
            if let Err(e) = self.kill(i).await {
                problems.push(e.to_string());
            }
        }
        if let Some(dir) = self.dir.take() {
            if keep_logs {
                eprintln!("nats-server logs kept in {}", dir.display());
            } else if let Err(e) = fs::remove_dir_all(&dir) {
                problems.push(format!("cannot remove {}: {e}", dir.display()));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(FixtureError::Node(problems.join("; ")))
        }
    }

    /// A monitoring endpoint of node `i`, parsed.
    ///
    /// # Errors
    /// See [`json`].
    pub async fn json(&self, i: usize, path: &str) -> Result<Value, FixtureError> {
        json(&self.monitor(i), path).await
    }

    /// Subjects of every subscription node `i` knows, local and routed.
    ///
    /// # Errors
    /// See [`json`].
    pub async fn subscriptions(&self, i: usize) -> Result<Vec<String>, FixtureError> {
        subscriptions(&self.monitor(i)).await
    }

    /// The client connections open on node `i`.
    ///
    /// # Errors
    /// See [`json`].
    pub async fn connections(&self, i: usize) -> Result<Vec<Connection>, FixtureError> {
        connections(&self.monitor(i)).await
    }

    /// Polls `check` until it holds or `limit` passes (every 100 ms);
    /// returns the last failure on timeout.
    ///
    /// # Errors
    /// The last error of `check`.
    pub async fn eventually<F>(&self, limit: Duration, mut check: F) -> Result<(), String>
    where
        F: AsyncFnMut(&NatsCluster) -> Result<(), String>,
    {
        let deadline = Instant::now() + limit;
        loop {
            match check(self).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                // A polling interval: the servers have no change notification.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for NatsCluster {
    /// The safety net behind [`NatsCluster::stop`]: kill and reap by pid;
    /// the directory is removed, or kept and named during a panic.
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(dir) = self.dir.take() {
            if std::thread::panicking() {
                eprintln!("nats-server logs kept in {}", dir.display());
            } else {
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }
}

/// One client connection of a node (`/connz?subs=1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// Its name (`ClusterConfig::name`), empty if none.
    pub name: String,
    /// Subjects it subscribes to.
    pub subscriptions: Vec<String>,
}

/// `/healthz` is 200 and `/jsz` names a meta leader, on the node whose
/// monitoring address is `addr` (`host:port`).
///
/// # Errors
/// [`FixtureError::Monitor`] saying which of the two is not there yet.
pub async fn healthy(addr: &str) -> Result<(), FixtureError> {
    let (status, body) = http_get(addr, "/healthz").await?;
    if status != 200 {
        return Err(FixtureError::Monitor(format!(
            "/healthz {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    let jsz = json(addr, "/jsz").await?;
    match jsz["meta_cluster"]["leader"].as_str() {
        Some(l) if !l.is_empty() => Ok(()),
        _ => Err(FixtureError::Monitor("no meta leader yet".into())),
    }
}

/// Subjects of every subscription the node at `addr` knows (`/subsz?subs=1`).
///
/// # Errors
/// See [`json`].
pub async fn subscriptions(addr: &str) -> Result<Vec<String>, FixtureError> {
    let v = json(addr, "/subsz?subs=1&limit=1000000").await?;
    Ok(v["subscriptions_list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["subject"].as_str().map(str::to_owned))
        .collect())
}

/// The client connections open on the node at `addr` (`/connz?subs=1`).
///
/// # Errors
/// See [`json`].
pub async fn connections(addr: &str) -> Result<Vec<Connection>, FixtureError> {
    let v = json(addr, "/connz?subs=1&limit=100000").await?;
    Ok(v["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| Connection {
            name: c["name"].as_str().unwrap_or_default().to_owned(),
            subscriptions: c["subscriptions_list"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect(),
        })
        .collect())
}

/// A monitoring endpoint of the node at `addr` (`host:port`), parsed.
///
/// # Errors
/// [`FixtureError::Monitor`]: no answer within 5 s, a status other than
/// 200, or a body that is not JSON.
pub async fn json(addr: &str, path: &str) -> Result<Value, FixtureError> {
    let (status, body) = http_get(addr, path).await?;
    if status != 200 {
        return Err(FixtureError::Monitor(format!(
            "GET http://{addr}{path}: status {status}"
        )));
    }
    serde_json::from_slice(&body)
        .map_err(|e| FixtureError::Monitor(format!("GET http://{addr}{path}: {e}")))
}

/// A tiny async HTTP/1.0 GET: `(status, body)`, bounded by 5 s.
async fn http_get(addr: &str, path: &str) -> Result<(u16, Vec<u8>), FixtureError> {
    let fail = |why: String| FixtureError::Monitor(format!("GET http://{addr}{path}: {why}"));
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .map_err(|_| fail("no answer within 5 s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| fail("no end of the HTTP header".into()))?;
    let status = String::from_utf8_lossy(&buf[..end])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| fail("no HTTP status".into()))?;
    Ok((status, buf[end + 4..].to_vec()))
}

/// `host:port` of a monitoring URL given as `http://host:port[/]` or `host:port`.
pub fn monitor_addr(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_urls() {
        assert_eq!(monitor_addr("http://10.0.0.1:8222/"), "10.0.0.1:8222");
        assert_eq!(monitor_addr("127.0.0.1:8222"), "127.0.0.1:8222");
    }

    #[test]
    fn a_missing_server_names_the_package_and_the_override() {
        let e = FixtureError::ServerNotFound {
            tried: "FLOWCTL_NATS_SERVER unset, not in /usr/sbin nor on PATH".into(),
        };
        let text = e.to_string();
        assert!(text.contains("nats-server package"), "{text}");
        assert!(text.contains("FLOWCTL_NATS_SERVER"), "{text}");
    }
}
