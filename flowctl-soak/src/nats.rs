//! The `cluster` scenario's NATS: a local 3-node `nats-server` cluster with
//! JetStream (the default), or an external one named by `--nats`.
//!
//! The local cluster runs on 127.0.0.1 ports that were free a moment before,
//! with its configs, logs and JetStream stores in a temporary directory. Its
//! nodes are plain child processes: killed with SIGKILL and reaped by pid,
//! never waited on with a blocking call on the scenario's runtime (that
//! thread also runs the timer whose lateness the soak judges). Dropping a
//! [`LocalCluster`] kills and reaps whatever still runs, so an error or a
//! panic in the scenario cannot leave a server behind.
//!
//! Everything the servers are asked (health, meta leader, subscriptions,
//! connections) goes through their HTTP monitoring port with a tiny async
//! HTTP/1.0 client: no extra dependency, no blocking read.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Nodes of the local cluster.
pub(crate) const NODES: usize = 3;

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

/// The `nats-server` binary: `FLOWCTL_NATS_SERVER`, then
/// `/usr/sbin/nats-server` (Debian's package), then `nats-server` on `PATH`.
pub(crate) fn server_bin() -> Result<PathBuf, String> {
    const SETUP: &str = "run `cargo xtask setup` (it installs nats-server), \
                         or pass --nats URL,... to use a running cluster";
    if let Some(p) = std::env::var_os("FLOWCTL_NATS_SERVER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "FLOWCTL_NATS_SERVER={} is not a file: {SETUP}",
                p.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/sbin"))
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!("nats-server not found (FLOWCTL_NATS_SERVER, /usr/sbin, PATH): {SETUP}")
        })
}

/// One node: its ports, files and process.
#[derive(Debug)]
struct Node {
    client: u16,
    http: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running local cluster; see the module docs.
#[derive(Debug)]
pub(crate) struct LocalCluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    dir: Option<tempfile::TempDir>,
}

impl LocalCluster {
    /// Starts three JetStream nodes and waits (up to `limit`) until every
    /// node is healthy and sees a meta leader.
    ///
    /// The ports were free a moment before the servers bind them; if another
    /// process takes one in between, that node exits at once. Then the other
    /// nodes are killed and the whole cluster starts again on new ports (a new
    /// directory), up to [`START_ATTEMPTS`] times.
    pub(crate) async fn start(limit: Duration) -> Result<LocalCluster, String> {
        let bin = server_bin()?;
        let mut attempt = 1;
        loop {
            let mut cluster = Self::launch(bin.clone())?;
            match cluster.wait_until_ready(limit).await {
                Ok(()) => return Ok(cluster),
                Err(NotReady::Exited(why)) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "  cluster: nats start attempt {attempt}/{START_ATTEMPTS} failed, \
                         starting again on new ports: {why}"
                    );
                    // Kills and reaps the other nodes by pid.
                    cluster.stop(false).await?;
                    attempt += 1;
                }
                Err(NotReady::Exited(why)) => {
                    return Err(format!(
                        "nats cluster did not start in {START_ATTEMPTS} attempts: {why}"
                    ));
                }
                Err(NotReady::Timeout(why)) => return Err(why),
            }
        }
    }

    /// Writes the configs of three nodes on fresh ports and spawns them.
    fn launch(bin: PathBuf) -> Result<LocalCluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("flowctl-soak-nats-")
            .tempdir()
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        // Bind all nine ports at once, then release them, so they are distinct.
        let mut held = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..NODES * 3 {
            let l = TcpListener::bind("127.0.0.1:0")
                .map_err(|e| format!("cannot find a free port: {e}"))?;
            ports.push(
                l.local_addr()
                    .map_err(|e| format!("cannot find a free port: {e}"))?
                    .port(),
            );
            held.push(l);
        }
        drop(held);
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let (client, route, http) = (ports[i * 3], ports[i * 3 + 1], ports[i * 3 + 2]);
            let routes: Vec<String> = (0..NODES)
                .filter(|j| *j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", ports[j * 3 + 1]))
                .collect();
            let store = dir.path().join(format!("store-n{i}"));
            let config = dir.path().join(format!("n{i}.conf"));
            let text = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{http}\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: flowctl-soak, listen: 127.0.0.1:{route}, routes: [{}] }}\n",
                store.display(),
                routes.join(", "),
            );
            fs::write(&config, text)
                .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            nodes.push(Node {
                client,
                http,
                log: dir.path().join(format!("n{i}.log")),
                config,
                child: None,
            });
        }
        let mut cluster = LocalCluster {
            bin,
            nodes,
            dir: Some(dir),
        };
        for i in 0..NODES {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| format!("cannot open {}: {e}", node.log.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", node.log.display()))?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {}: {e}; run `cargo xtask setup` (it installs nats-server)",
                    self.bin.display()
                )
            })?;
        node.child = Some(child);
        Ok(())
    }

    /// The `nats-server` binary in use.
    pub(crate) fn bin(&self) -> &Path {
        &self.bin
    }

    /// Client URLs of every node (`nats://127.0.0.1:port`).
    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client))
            .collect()
    }

    /// Monitoring addresses (`127.0.0.1:port`) of every node.
    pub(crate) fn monitors(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.http))
            .collect()
    }

    /// Where the configs and logs are (gone once the cluster is stopped).
    pub(crate) fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(tempfile::TempDir::path)
    }

    /// The pid of node `i`, if it runs.
    pub(crate) fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// SIGKILLs node `i` by pid and reaps it without blocking the runtime.
    pub(crate) async fn kill(&mut self, i: usize) -> Result<(), String> {
        let Some(mut child) = self.nodes[i].child.take() else {
            return Ok(());
        };
        let pid = child.id();
        let killed = child.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return killed.map_err(|e| format!("kill -9 {pid} (n{i}): {e}")),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(None) => {
                    // Give it back to Drop, which waits for it.
                    self.nodes[i].child = Some(child);
                    return Err(format!(
                        "n{i} (pid {pid}) did not die within 10 s of SIGKILL"
                    ));
                }
                Err(e) => return Err(format!("waiting for n{i} (pid {pid}): {e}")),
            }
        }
    }

    /// Starts node `i` again on the same ports and store (it must be down).
    /// If one of its ports was taken meanwhile the node exits at once, and the
    /// next [`LocalCluster::wait_ready`] fails fast with the tail of its log.
    pub(crate) fn restart(&mut self, i: usize) -> Result<(), String> {
        if self.nodes[i].child.is_some() {
            return Err(format!("n{i} is still running"));
        }
        self.spawn(i)
    }

    /// True if node `i` runs.
    pub(crate) fn is_up(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Waits until every running node answers `/healthz` with 200 (in 2.9 that
    /// includes "JetStream is current": the meta group and every stream and
    /// consumer replica it holds have caught up) and names a meta leader.
    ///
    /// Fails at once, with the tail of its log, if a running node exits: e.g.
    /// a node restarted on its old ports (the other nodes' routes name them)
    /// after another process took one of them.
    pub(crate) async fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        self.wait_until_ready(limit).await.map_err(|e| match e {
            NotReady::Exited(why) | NotReady::Timeout(why) => why,
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
                let addr = format!("127.0.0.1:{}", node.http);
                if let Err(e) = healthy(&addr).await {
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
                "n{i} (pid {pid}, client port {}, http port {}) exited: {status}; \
                 last lines of {}:\n{}",
                node.client,
                node.http,
                node.log.display(),
                log_tail(&node.log, 20)
            ));
        }
        None
    }

    /// Kills and reaps every node, then removes the temporary directory
    /// (kept, and named, when `keep_logs`).
    pub(crate) async fn stop(mut self, keep_logs: bool) -> Result<(), String> {
        let mut problems = Vec::new();
        for i in 0..self.nodes.len() {
            if let Err(e) = self.kill(i).await {
                problems.push(e);
            }
        }
        if let Some(dir) = self.dir.take() {
            if keep_logs {
                let path = dir.keep();
                eprintln!("  cluster: nats-server logs kept in {}", path.display());
            } else if let Err(e) = dir.close() {
                problems.push(format!("cannot remove the nats temporary directory: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

impl Drop for LocalCluster {
    /// The safety net behind [`LocalCluster::stop`]: kill and reap by pid.
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `/healthz` is 200 and `/jsz` names a meta leader.
pub(crate) async fn healthy(addr: &str) -> Result<(), String> {
    let (status, body) = http_get(addr, "/healthz").await?;
    if status != 200 {
        return Err(format!(
            "/healthz {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    let jsz = json(addr, "/jsz").await?;
    match jsz["meta_cluster"]["leader"].as_str() {
        Some(l) if !l.is_empty() => Ok(()),
        _ => Err("no meta leader yet".into()),
    }
}

/// Subjects of every subscription the node at `addr` knows (`/subsz?subs=1`).
pub(crate) async fn subscriptions(addr: &str) -> Result<Vec<String>, String> {
    let v = json(addr, "/subsz?subs=1&limit=1000000").await?;
    Ok(v["subscriptions_list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["subject"].as_str().map(str::to_owned))
        .collect())
}

/// Names of the client connections open on the node at `addr` (`/connz`).
pub(crate) async fn connections(addr: &str) -> Result<Vec<String>, String> {
    let v = json(addr, "/connz?limit=100000").await?;
    Ok(v["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
        .collect())
}

/// A monitoring endpoint, parsed.
pub(crate) async fn json(addr: &str, path: &str) -> Result<Value, String> {
    let (status, body) = http_get(addr, path).await?;
    if status != 200 {
        return Err(format!("GET http://{addr}{path}: status {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET http://{addr}{path}: {e}"))
}

/// A tiny async HTTP/1.0 GET: `(status, body)`, bounded by 5 s.
async fn http_get(addr: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
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
        .map_err(|_| format!("GET http://{addr}{path}: no answer within 5 s"))?
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("GET http://{addr}{path}: no end of the HTTP header"))?;
    let status = String::from_utf8_lossy(&buf[..end])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET http://{addr}{path}: no HTTP status"))?;
    Ok((status, buf[end + 4..].to_vec()))
}

/// `host:port` of a monitoring URL given as `http://host:port[/]` or `host:port`.
pub(crate) fn monitor_addr(url: &str) -> String {
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
}
