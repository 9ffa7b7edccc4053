//! An in-process SSH server that runs commands as local processes
//! (`sh -c COMMAND`), for tests and as the soak's embedded peer.
//!
//! It honours backpressure both ways: it reads a child's stdout and stderr
//! one packet at a time and hands each to russh's `ChannelWriteHalf::data_bytes`,
//! which waits for the client's window, so a slow client stops the child (its
//! pipe fills). Data from the client is written to the child's stdin before
//! the next message is taken; while the child does not read, russh's queue
//! (`channel_buffer_size` messages) fills and the server's session loop stops
//! reading the socket.
//!
//! Public-key authentication against a list of keys, and optionally one
//! user/password pair.
//!
//! Each command runs in a process group of its own (with a parent-death
//! signal on Linux); the whole group is SIGKILLed when the command's task
//! ends: the command finished, the client closed the channel, or the
//! connection or the server went away. `sh` and everything it started
//! (pipelines, background jobs) go, not `sh` alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use flowctl_core::lifecycle::Ledger;
use russh::keys::{Algorithm, PrivateKey, PublicKey};
use russh::server::{Auth, Msg, Session};
use russh::{ChannelId, ChannelMsg, MethodKind, MethodSet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::Secret;

/// Ledger kind of the embedded server's tasks.
pub const LEDGER_SERVER_TASK: &str = "ssh.server.task";

/// Configuration of an [`EmbeddedServer`].
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The host key the server presents.
    pub host_key: PrivateKey,
    /// Public keys allowed to log in (as any user).
    pub authorized_keys: Vec<PublicKey>,
    /// A `(user, password)` pair accepted by password authentication
    /// (`None`: public keys only). Never printed.
    pub password: Option<(String, Secret)>,
    /// Messages russh queues per channel before the session loop waits.
    pub channel_buffer: usize,
    /// The largest packet the server accepts (bytes).
    pub max_packet: u32,
    /// The window the server advertises (bytes).
    pub window: u32,
    /// Ledger for the server's tasks ([`LEDGER_SERVER_TASK`]).
    pub ledger: Ledger,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the host's private key nor the password.
        f.debug_struct("ServerConfig")
            .field(
                "host_key",
                &self.host_key.public_key().fingerprint(Default::default()),
            )
            .field("authorized_keys", &self.authorized_keys.len())
            .field("password", &self.password.as_ref().map(|(u, p)| (u, p)))
            .field("channel_buffer", &self.channel_buffer)
            .field("max_packet", &self.max_packet)
            .field("window", &self.window)
            .field("ledger", &self.ledger)
            .finish()
    }
}

impl ServerConfig {
    /// A server with a fresh random Ed25519 host key that admits `authorized_keys`.
    ///
    /// # Errors
    /// A [`FlowError::Transport`](flowctl_core::FlowError::Transport) holding
    /// [`SshError::Config`](crate::SshError::Config) if no key can be generated.
    pub fn new(authorized_keys: Vec<PublicKey>) -> Result<Self, flowctl_core::FlowError> {
        let host_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
            .map_err(|e| crate::SshError::Config(format!("cannot generate a host key: {e}")))?;
        Ok(ServerConfig {
            host_key,
            authorized_keys,
            password: None,
            channel_buffer: 2,
            max_packet: 32768,
            window: 2 * 1024 * 1024,
            ledger: Ledger::global().clone(),
        })
    }
}

/// A fresh random Ed25519 private key (for clients of an embedded server).
///
/// # Errors
/// A [`FlowError::Transport`](flowctl_core::FlowError::Transport) holding
/// [`SshError::Config`](crate::SshError::Config) if no key can be generated.
pub fn generate_key() -> Result<PrivateKey, flowctl_core::FlowError> {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| crate::SshError::Config(format!("cannot generate a key: {e}")).into())
}

/// A running in-process SSH server on 127.0.0.1. Dropping it stops accepting
/// and aborts every connection.
#[derive(Debug)]
pub struct EmbeddedServer {
    addr: SocketAddr,
    host_key: PublicKey,
    accept: JoinHandle<()>,
    connections: Arc<std::sync::Mutex<Vec<Connection>>>,
    live: Arc<AtomicUsize>,
    channels: Arc<AtomicUsize>,
}

impl EmbeddedServer {
    /// Binds 127.0.0.1 on a free port and starts accepting.
    pub async fn start(config: ServerConfig) -> std::io::Result<EmbeddedServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let host_key = config.host_key.public_key().clone();
        let mut methods = MethodSet::empty();
        methods.push(MethodKind::PublicKey);
        if config.password.is_some() {
            methods.push(MethodKind::Password);
        }
        let russh_config = Arc::new(russh::server::Config {
            keys: vec![config.host_key.clone()],
            methods,
            auth_rejection_time: Duration::from_millis(10),
            auth_rejection_time_initial: Some(Duration::ZERO),
            window_size: config.window,
            maximum_packet_size: config.max_packet,
            channel_buffer_size: config.channel_buffer.max(1),
            inactivity_timeout: None,
            nodelay: true,
            ..Default::default()
        });
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let live = Arc::new(AtomicUsize::new(0));
        let channels = Arc::new(AtomicUsize::new(0));
        let authorized = Arc::new(Authorized {
            keys: config.authorized_keys.clone(),
            password: config.password.clone(),
        });
        let ledger = config.ledger.clone();
        let accept = ledger.spawn(
            LEDGER_SERVER_TASK,
            accept_loop(
                listener,
                russh_config,
                authorized,
                ledger.clone(),
                connections.clone(),
                live.clone(),
                channels.clone(),
            ),
        );
        Ok(EmbeddedServer {
            addr,
            host_key,
            accept,
            connections,
            live,
            channels,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's public host key.
    pub fn host_key(&self) -> &PublicKey {
        &self.host_key
    }

    /// A known_hosts line for this server (`[127.0.0.1]:PORT ssh-ed25519 AAAA...`).
    pub fn known_hosts_line(&self) -> String {
        let key = self.host_key.to_openssh().unwrap_or_default();
        format!("[{}]:{} {}", self.addr.ip(), self.addr.port(), key)
    }

    /// Connections being served now.
    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Channels open now: opened by a client and not yet closed, whether
    /// or not a command runs in them.
    pub fn live_channels(&self) -> usize {
        self.channels.load(Ordering::Acquire)
    }

    /// Cuts every connection at once (their sockets close without a
    /// disconnect message), as a crashed server would.
    pub fn drop_connections(&self) {
        for c in self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            // russh runs the session in a task of its own: shutting the
            // socket down is what ends it.
            let _ = c.socket.shutdown(std::net::Shutdown::Both);
            c.task.abort();
        }
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_connections();
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: Arc<russh::server::Config>,
    authorized: Arc<Authorized>,
    ledger: Ledger,
    connections: Arc<std::sync::Mutex<Vec<Connection>>>,
    live: Arc<AtomicUsize>,
    channels: Arc<AtomicUsize>,
) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "embedded ssh server: accept failed");
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        // Keep a duplicate of the socket to cut the connection on demand.
        let (socket, killer) = match socket
            .into_std()
            .and_then(|s| s.try_clone().map(|k| (s, k)))
            .and_then(|(s, k)| tokio::net::TcpStream::from_std(s).map(|s| (s, k)))
        {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "embedded ssh server: cannot set up connection");
                continue;
            }
        };
        let handler = ServerHandler {
            authorized: authorized.clone(),
            channels: HashMap::new(),
            open: channels.clone(),
            ledger: ledger.clone(),
            commands: Vec::new(),
        };
        let config = config.clone();
        let live = live.clone();
        let task = ledger.spawn(LEDGER_SERVER_TASK, async move {
            let _count = LiveCount::new(&live);
            tracing::debug!(%peer, "embedded ssh server: connection");
            match russh::server::run_stream(config, socket, handler).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        tracing::debug!(error = ?e, "embedded ssh server: session ended with an error");
                    }
                }
                Err(e) => tracing::debug!(error = ?e, "embedded ssh server: handshake failed"),
            }
        });
        let mut conns = connections.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.task.is_finished());
        conns.push(Connection {
            task,
            socket: killer,
        });
    }
}

/// Who may log in. `Debug` shows the password as `<redacted>` ([`Secret`]).
#[derive(Debug)]
struct Authorized {
    keys: Vec<PublicKey>,
    password: Option<(String, Secret)>,
}

#[derive(Debug)]
struct Connection {
    task: JoinHandle<()>,
    socket: std::net::TcpStream,
}

struct LiveCount(Arc<AtomicUsize>);

impl LiveCount {
    /// Counts one more in `count` until dropped.
    fn new(count: &Arc<AtomicUsize>) -> LiveCount {
        count.fetch_add(1, Ordering::AcqRel);
        LiveCount(count.clone())
    }
}

impl Drop for LiveCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct ServerHandler {
    authorized: Arc<Authorized>,
    /// Channels opened and not yet exec'd, each counted in `open` while it lives.
    channels: HashMap<ChannelId, (russh::Channel<Msg>, LiveCount)>,
    open: Arc<AtomicUsize>,
    ledger: Ledger,
    /// Command tasks of this connection: aborted (children killed) when the
    /// connection ends.
    commands: Vec<JoinHandle<()>>,
}

impl Drop for ServerHandler {
    fn drop(&mut self) {
        for c in &self.commands {
            c.abort();
        }
    }
}

impl ServerHandler {
    /// Accepts a key listed in the server's authorized keys, whether it is only
    /// offered or already verified by a signature.
    fn verdict(&self, key: &PublicKey) -> Auth {
        if self
            .authorized
            .keys
            .iter()
            .any(|k| k.key_data() == key.key_data())
        {
            Auth::Accept
        } else {
            Auth::reject()
        }
    }
}

impl russh::server::Handler for ServerHandler {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        Ok(match &self.authorized.password {
            Some((u, p)) if u == user && p.expose() == password => Auth::Accept,
            _ => Auth::reject(),
        })
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.verdict(offer.public_key))
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.verdict(key.public_key))
    }

    async fn channel_open_session(
        &mut self,
        channel: russh::Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let count = LiveCount::new(&self.open);
        self.channels.insert(channel.id(), (channel, count));
        reply.accept().await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // A channel closed before any command ran in it (an exec's channel
        // with a command is closed by its `run_command`).
        self.channels.remove(&channel);
        Ok(())
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some((channel, count)) = self.channels.remove(&id) else {
            session.channel_failure(id)?;
            return Ok(());
        };
        let command = String::from_utf8_lossy(data).into_owned();
        session.channel_success(id)?;
        let handle = session.handle();
        self.commands.retain(|c| !c.is_finished());
        self.commands.push(self.ledger.spawn(
            LEDGER_SERVER_TASK,
            run_command(channel, command, handle, count),
        ));
        Ok(())
    }
}

fn signal_name(sig: i32) -> russh::Sig {
    match sig {
        1 => russh::Sig::HUP,
        2 => russh::Sig::INT,
        3 => russh::Sig::QUIT,
        4 => russh::Sig::ILL,
        6 => russh::Sig::ABRT,
        8 => russh::Sig::FPE,
        9 => russh::Sig::KILL,
        10 => russh::Sig::USR1,
        11 => russh::Sig::SEGV,
        13 => russh::Sig::PIPE,
        14 => russh::Sig::ALRM,
        15 => russh::Sig::TERM,
        n => russh::Sig::Custom(format!("SIG{n}")),
    }
}

/// Copies a child's output to the channel one packet at a time; each
/// `data_bytes` waits for the client's window.
async fn copy_out<R: tokio::io::AsyncRead + Unpin>(
    mut from: R,
    to: &russh::ChannelWriteHalf<Msg>,
    ext: Option<u32>,
    packet: usize,
) {
    let mut buf = BytesMut::with_capacity(packet);
    loop {
        buf.reserve(packet);
        match (&mut from).take(packet as u64).read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let chunk = buf.split().freeze();
                let sent = match ext {
                    None => to.data_bytes(chunk).await,
                    Some(ext) => to.extended_data_bytes(ext, chunk).await,
                };
                if sent.is_err() {
                    return;
                }
            }
        }
    }
}

/// Kills a command's whole process group when the command's task ends
/// (finished, the client closed the channel, the connection or the server
/// dropped).
struct GroupKill(u32);

impl Drop for GroupKill {
    fn drop(&mut self) {
        crate::sys::kill_group(self.0);
    }
}

async fn run_command(
    channel: russh::Channel<Msg>,
    command: String,
    handle: russh::server::Handle,
    _count: LiveCount,
) {
    let id = channel.id();
    let (mut read, write) = channel.split();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // A group of its own, killed as a whole below: `sh` and everything it
    // starts (a pipeline, a background job), not `sh` alone.
    crate::sys::isolate_tokio(&mut cmd);
    let child = cmd.spawn();
    let _group = child.as_ref().ok().and_then(|c| c.id()).map(GroupKill);
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = write
                .extended_data_bytes(1, format!("cannot start sh: {e}\n"))
                .await;
            let _ = write.exit_status(127).await;
            let _ = write.eof().await;
            let _ = write.close().await;
            return;
        }
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return;
    };
    let mut stdin = child.stdin.take();
    let packet = 32 * 1024;
    // Client -> child stdin. Returns when the client closes the channel (or
    // the connection ends); EOF only closes the child's stdin.
    let from_client = async {
        loop {
            match read.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    if let Some(s) = stdin.as_mut()
                        && s.write_all(&data).await.is_err()
                    {
                        stdin = None; // the child closed its stdin: discard
                    }
                }
                Some(ChannelMsg::Eof) => {
                    if let Some(mut s) = stdin.take() {
                        let _ = s.shutdown().await;
                    }
                }
                Some(ChannelMsg::Close) | None => return,
                Some(_) => {}
            }
        }
    };
    let to_client = async {
        tokio::join!(
            copy_out(stdout, &write, None, packet),
            copy_out(stderr, &write, Some(1), packet)
        );
        child.wait().await
    };
    let status = tokio::select! {
        status = to_client => status,
        () = from_client => {
            // Not the command line: it may carry secrets.
            tracing::debug!(
                command_len = command.len(),
                "client closed the channel: killing the command"
            );
            return; // dropping the child kills it
        }
    };
    match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            if let Some(code) = status.code() {
                let _ = write.exit_status(code as u32).await;
            } else if let Some(sig) = status.signal() {
                let _ = handle
                    .exit_signal_request(
                        id,
                        signal_name(sig),
                        status.core_dumped(),
                        String::new(),
                        "en".into(),
                    )
                    .await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "embedded ssh server: wait for child failed"),
    }
    let _ = write.eof().await;
    let _ = write.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_password_or_the_host_key() {
        let mut cfg = ServerConfig::new(Vec::new()).expect("config");
        cfg.password = Some(("deploy".into(), "pw-TOPSECRET-42".into()));
        let secret_key = cfg
            .host_key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .expect("openssh encoding");
        let printed = format!("{cfg:?}");
        assert!(!printed.contains("TOPSECRET"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
        assert!(
            !printed.contains(secret_key.lines().nth(1).unwrap_or("-")),
            "{printed}"
        );
        let authorized = Authorized {
            keys: Vec::new(),
            password: cfg.password.clone(),
        };
        let printed = format!("{authorized:?}");
        assert!(!printed.contains("TOPSECRET"), "{printed}");
    }
}
