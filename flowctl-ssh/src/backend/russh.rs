//! The russh backend ([`Backend::Russh`](crate::Backend::Russh)): the
//! client connection (connect, check the host key, authenticate), the task
//! that opens exec channels, and the tasks that move a channel's data
//! between russh and a [`RemoteProcess`]'s pipes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use flowctl_core::PipeSink;
use flowctl_core::lifecycle::Lease;
use russh::client::{self, AuthResult, Msg};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::watch;

use crate::config::{Auth, ExecOptions, HostKeyPolicy, Secret, SshConfig, split_host_port};
use crate::error::SshError;
use crate::ledger::{LEDGER_OPEN, LEDGER_SESSION, LEDGER_TASK};
use crate::process::{
    ExitStatus, ExitTx, Flags, Outcome, RemoteProcess, StdinWriter, deliver, exec_span, plumbing,
    room, write_stdin,
};

/// What the host-key check found, kept to build a precise error.
#[derive(Debug)]
enum HostKeyVerdict {
    Unknown(PublicKey),
    Changed(PublicKey, crate::known_hosts::Place),
    Revoked(PublicKey, crate::known_hosts::Place),
    Failed(String),
}

#[derive(Debug)]
pub(crate) struct ClientHandler {
    policy: HostKeyPolicy,
    host: String,
    port: u16,
    global_known_hosts: Option<PathBuf>,
    verdict: Arc<Mutex<Option<HostKeyVerdict>>>,
}

fn known_hosts_file(policy: &HostKeyPolicy) -> Option<PathBuf> {
    match policy {
        HostKeyPolicy::KnownHosts(Some(p)) => Some(p.clone()),
        HostKeyPolicy::KnownHosts(None) | HostKeyPolicy::Default => {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ssh").join("known_hosts"))
        }
        HostKeyPolicy::InsecureAcceptAny => None,
    }
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if matches!(self.policy, HostKeyPolicy::InsecureAcceptAny) {
            tracing::warn!(host = %self.host, "accepting any host key (HostKeyPolicy::InsecureAcceptAny)");
            return Ok(true);
        }
        let key = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(cert) => {
                *self.verdict.lock().unwrap_or_else(|e| e.into_inner()) = Some(
                    HostKeyVerdict::Failed("host certificates are not supported".into()),
                );
                let _ = cert;
                return Ok(false);
            }
        };
        use crate::known_hosts::{Verdict, check, files, host_entry};
        let user = known_hosts_file(&self.policy);
        let files = files(user.as_deref(), self.global_known_hosts.as_deref());
        let verdict = match check(&host_entry(&self.host, self.port), &key, &files) {
            Ok(Verdict::Known) => return Ok(true),
            Ok(Verdict::Unknown) => HostKeyVerdict::Unknown(key),
            Ok(Verdict::Changed(place)) => HostKeyVerdict::Changed(key, place),
            Ok(Verdict::Revoked(place)) => HostKeyVerdict::Revoked(key, place),
            Err(e) => HostKeyVerdict::Failed(e.to_string()),
        };
        *self.verdict.lock().unwrap_or_else(|e| e.into_inner()) = Some(verdict);
        Ok(false)
    }
}

/// The connection, shared by the session and its processes. Dropping the
/// last reference disconnects and waits for russh's session task to end, in a
/// task counted by the ledger: a return to zero proves nothing is left.
pub(crate) struct SessionInner {
    handle: Option<client::Handle<ClientHandler>>,
    ledger: flowctl_core::lifecycle::Ledger,
    _lease: Lease,
}

impl SessionInner {
    fn handle(&self) -> Result<&client::Handle<ClientHandler>, SshError> {
        self.handle
            .as_ref()
            .ok_or_else(|| SshError::Config("session already closed".into()))
    }
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            // No runtime: russh's task dies with its runtime anyway.
            return;
        }
        self.ledger.spawn(LEDGER_TASK, shut_down(handle));
    }
}

/// A step of [`open_exec`], reported to a test's [`Probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExecStep {
    /// About to send the channel open request.
    Opening,
    /// The server confirmed the channel; the exec request is next.
    Opened,
    /// The exec request is sent; its reply is next.
    ExecSent,
    /// The server accepted the command; the channel is handed over next.
    Accepted,
    /// The channel was put in the caller's reply (reported, not waited on:
    /// a test drops the caller here, before it takes the channel).
    HandedOver,
}

/// Called by [`open_exec`] before each step; the step waits for it.
pub(crate) type Probe =
    Arc<dyn Fn(ExecStep) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The channel halves of an exec whose command the server accepted, on
/// their way to the caller through a oneshot. If the caller is dropped after
/// the send and before it takes them, the oneshot drops them unseen, and
/// dropping russh's halves does not close the channel: the command would run
/// on, and its session would count against the server's `MaxSessions`.
/// Dropped untaken, this abandons the channel (as a dropped process does)
/// on the runtime of the task that opened it. It is counted as
/// `LEDGER_OPEN` until the caller has taken it, or until the abandon has
/// finished, so the ledger never reads zero while the command runs unowned.
struct Opened {
    halves: Option<(russh::ChannelReadHalf, russh::ChannelWriteHalf<client::Msg>)>,
    lease: Option<Lease>,
    runtime: tokio::runtime::Handle,
}

impl Opened {
    /// The halves and the lease that counts them until the caller's tasks
    /// (which count themselves) are started.
    fn take(
        mut self,
    ) -> (
        russh::ChannelReadHalf,
        russh::ChannelWriteHalf<client::Msg>,
        Option<Lease>,
    ) {
        // Only `take` and `drop` empty it, and `take` consumes `self`.
        let (read, write) = self.halves.take().expect("an Opened is taken once");
        (read, write, self.lease.take())
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        let Some((read, write)) = self.halves.take() else {
            return;
        };
        tracing::debug!("exec abandoned after its channel was handed over: closing it");
        let lease = self.lease.take();
        // A handle of the runtime that runs russh's session: this works from
        // any thread while that runtime lives (if it is shutting down, the
        // session ends with it anyway).
        self.runtime.spawn(async move {
            abandon(&write).await;
            drop(read);
            drop(lease);
        });
    }
}

/// Opens a channel and runs `command` in it, then hands the channel to
/// `reply`. Runs as a task of its own so that every step in flight (the
/// channel open, the exec request) is finished and undone even when the
/// caller of [`Session::exec`](crate::Session::exec) is gone: russh delivers the server's
/// CHANNEL_OPEN_CONFIRMATION into the opener's queue and, if that queue's
/// receiver was dropped, silently keeps the channel open on both sides.
async fn open_exec(
    inner: Arc<SessionInner>,
    command: String,
    reply: tokio::sync::oneshot::Sender<Result<Opened, SshError>>,
    probe: Option<Probe>,
) {
    let step = |s: ExecStep| {
        let probe = probe.clone();
        async move {
            if let Some(p) = probe {
                p(s).await;
            }
        }
    };
    let handle = match inner.handle() {
        Ok(h) => h,
        Err(e) => {
            let _ = reply.send(Err(e));
            return;
        }
    };
    step(ExecStep::Opening).await;
    let channel = match handle.channel_open_session().await {
        Ok(c) => c,
        Err(e) => {
            // Refused or disconnected: nothing is open.
            let _ = reply.send(Err(e.into()));
            return;
        }
    };
    let (mut read, write) = channel.split();
    step(ExecStep::Opened).await;
    let outcome = if reply.is_closed() {
        Err(None)
    } else if let Err(e) = write.exec(true, command.as_bytes()).await {
        Err(Some(SshError::from(e)))
    } else {
        step(ExecStep::ExecSent).await;
        // The reply to the exec request comes first.
        loop {
            match read.wait().await {
                Some(russh::ChannelMsg::Success) => break Ok(()),
                Some(russh::ChannelMsg::Failure) => {
                    break Err(Some(SshError::ExecRefused {
                        command: command.clone(),
                    }));
                }
                Some(_) => continue,
                None => {
                    break Err(Some(SshError::ConnectionLost {
                        stream: "exec reply",
                        delivered: 0,
                    }));
                }
            }
        }
    };
    match outcome {
        Ok(()) => {
            step(ExecStep::Accepted).await;
            let opened = Opened {
                halves: Some((read, write)),
                lease: Some(inner.ledger.acquire(LEDGER_OPEN)),
                runtime: tokio::runtime::Handle::current(),
            };
            match reply.send(Ok(opened)) {
                Err(Ok(opened)) => {
                    // The caller is gone: stop the command it would have owned.
                    tracing::debug!(
                        "exec abandoned after the command started: closing its channel"
                    );
                    let (_read, write, _lease) = opened.take();
                    abandon(&write).await;
                }
                // In the caller's reply: if the caller is dropped before it
                // takes it, `Opened`'s drop closes the channel.
                _ => step(ExecStep::HandedOver).await,
            }
        }
        Err(e) => {
            // No command runs: the caller left before the exec request, or
            // the server refused it, or the connection failed.
            if let Some(e) = e {
                let _ = reply.send(Err(e));
            }
            tracing::debug!(
                "exec abandoned or failed before a command started: closing its channel"
            );
            let _ = write.close().await;
        }
    }
}

/// Disconnects and waits (bounded) for russh's session task to end.
async fn shut_down(handle: client::Handle<ClientHandler>) {
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "bye", "en")
        .await;
    match tokio::time::timeout(std::time::Duration::from_secs(10), handle).await {
        Ok(Ok(())) => tracing::info!("ssh session closed"),
        Ok(Err(e)) => tracing::debug!(error = %e, "ssh session ended with an error"),
        Err(_) => tracing::warn!("ssh session task did not end within 10 s of disconnect"),
    }
}

/// The connection's socket as russh's session task owns it. russh spawns
/// that task in the middle of `connect_stream` (before the key exchange),
/// so a connect dropped after that point (by `connect_timeout`, say) left
/// the task and its socket waiting on the server, uncounted, for as long as
/// the server let it (sshd's `LoginGraceTime`; forever for a server that
/// never answers). While connecting, the socket holds the session's ledger
/// lease, and [`Connecting`]'s drop shuts it: every read and write fails,
/// russh's task ends and drops it, and the lease goes with it.
struct Counted<S> {
    io: S,
    shared: Arc<Shutter>,
}

/// What [`Counted`] and [`Connecting`] share.
struct Shutter {
    /// [`CONNECTING`], [`HANDED_OVER`] or [`SHUT`].
    state: std::sync::atomic::AtomicU8,
    read: futures::task::AtomicWaker,
    write: futures::task::AtomicWaker,
    /// The session's lease until [`Connecting::hand_over`], or until the
    /// socket is dropped.
    lease: Mutex<Option<Lease>>,
}

const CONNECTING: u8 = 0;
const HANDED_OVER: u8 = 1;
const SHUT: u8 = 2;

/// The connect's end of a [`Counted`] socket: dropped before
/// [`hand_over`](Connecting::hand_over), it shuts the socket.
struct Connecting(Arc<Shutter>);

impl<S> Counted<S> {
    fn new(io: S, lease: Lease) -> (Counted<S>, Connecting) {
        let shared = Arc::new(Shutter {
            state: std::sync::atomic::AtomicU8::new(CONNECTING),
            read: futures::task::AtomicWaker::new(),
            write: futures::task::AtomicWaker::new(),
            lease: Mutex::new(Some(lease)),
        });
        (
            Counted {
                io,
                shared: shared.clone(),
            },
            Connecting(shared),
        )
    }

    /// `Err` once shut; while connecting, registers `waker` in `slot` so that
    /// a shut wakes the task. Costs one atomic load once handed over.
    fn check(
        &self,
        slot: &futures::task::AtomicWaker,
        waker: &std::task::Waker,
    ) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::Acquire;
        match self.shared.state.load(Acquire) {
            HANDED_OVER => return Ok(()),
            CONNECTING => slot.register(waker),
            _ => {}
        }
        if self.shared.state.load(Acquire) == SHUT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the ssh connect was cancelled",
            ));
        }
        Ok(())
    }
}

impl Connecting {
    /// The session is the caller's: the socket stays open, and its lease
    /// (unless russh has dropped the socket already) is returned.
    fn hand_over(self) -> Option<Lease> {
        self.0
            .state
            .store(HANDED_OVER, std::sync::atomic::Ordering::Release);
        self.0
            .lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::AcqRel;
        if self
            .0
            .state
            .compare_exchange(
                CONNECTING,
                SHUT,
                AcqRel,
                std::sync::atomic::Ordering::Acquire,
            )
            .is_ok()
        {
            self.0.read.wake();
            self.0.write.wake();
        }
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        drop(
            self.shared
                .lease
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(&this.shared.read, cx.waker())?;
        std::pin::Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check(&this.shared.write, cx.waker())?;
        std::pin::Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(&this.shared.write, cx.waker())?;
        std::pin::Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::pin::Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Connects, checks the host key and authenticates (the caller bounds it
/// with [`SshConfig::connect_timeout`]).
pub(crate) async fn connect(config: &SshConfig) -> Result<Arc<SessionInner>, SshError> {
    if config.channel_buffer == 0 {
        return Err(SshError::Config(
            "channel_buffer must be at least 1 message".into(),
        ));
    }
    let (host, port) = split_host_port(&config.addr);
    let mut preferred = russh::Preferred::default();
    if !config.ciphers.is_empty() {
        let names = config
            .ciphers
            .iter()
            .map(|c| {
                russh::cipher::Name::try_from(c.as_str())
                    .map_err(|_| SshError::Config(format!("unknown cipher {c:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        preferred.cipher = names.into();
    }
    let russh_config = client::Config {
        preferred,
        window_size: config.window,
        maximum_packet_size: config.max_packet,
        channel_buffer_size: config.channel_buffer,
        keepalive_interval: config.keepalive_interval,
        keepalive_max: config.keepalive_max,
        nodelay: true,
        ..Default::default()
    };
    let verdict = Arc::new(Mutex::new(None));
    let handler = ClientHandler {
        policy: config.host_key.clone(),
        host: host.clone(),
        port,
        global_known_hosts: config.global_known_hosts.clone(),
        verdict: verdict.clone(),
    };
    let socket = tokio::net::TcpStream::connect(&config.addr)
        .await
        .map_err(|source| SshError::Connect {
            addr: config.addr.clone(),
            source,
        })?;
    let _ = socket.set_nodelay(true);
    // From here russh's session task owns the socket: counted from now on,
    // and shut if this future is dropped before the session is ours.
    let (socket, connecting) = Counted::new(socket, config.ledger.acquire(LEDGER_SESSION));
    let mut handle = match client::connect_stream(Arc::new(russh_config), socket, handler).await {
        Ok(h) => h,
        Err(e) => {
            let found = verdict.lock().unwrap_or_else(|e| e.into_inner()).take();
            return Err(
                host_key_error(found, &host, port, &config.host_key).unwrap_or_else(|| e.into())
            );
        }
    };
    authenticate(&mut handle, config).await?;
    // The session's count moves from the socket to the session; a socket
    // that russh already dropped (the server closed) took it with it.
    let lease = connecting
        .hand_over()
        .unwrap_or_else(|| config.ledger.acquire(LEDGER_SESSION));
    tracing::info!(user = %config.user, addr = %config.addr, "ssh session established");
    Ok(Arc::new(SessionInner {
        handle: Some(handle),
        ledger: config.ledger.clone(),
        _lease: lease,
    }))
}

/// Runs `command` in a new channel of `inner` (see [`Session::exec`]).
///
/// [`Session::exec`]: crate::Session::exec
pub(crate) async fn exec(
    inner: &Arc<SessionInner>,
    command: &str,
    config: &SshConfig,
    options: &ExecOptions,
    probe: Option<Probe>,
) -> Result<RemoteProcess, SshError> {
    inner.handle()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = open_exec(inner.clone(), command.to_owned(), tx, probe);
    config.ledger.spawn(LEDGER_OPEN, task);
    // The only await point of the caller: dropping it here
    // leaves the task to close whatever it opens.
    let (read, write, lease) = rx
        .await
        .map_err(|_| SshError::ConnectionLost {
            stream: "exec reply",
            delivered: 0,
        })??
        .take();
    let process = start(read, write, command, config, options, inner.clone());
    // The process's own tasks count it from here.
    drop(lease);
    Ok(process)
}

/// Disconnects now and waits for russh's session task to end, if nothing
/// else (a process) holds the connection; otherwise the last holder's drop
/// closes it.
pub(crate) async fn close(inner: Arc<SessionInner>) {
    if let Ok(mut inner) = Arc::try_unwrap(inner)
        && let Some(handle) = inner.handle.take()
    {
        shut_down(handle).await;
    }
}

fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

impl std::fmt::Debug for SessionInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionInner")
    }
}

fn host_key_error(
    verdict: Option<HostKeyVerdict>,
    host: &str,
    port: u16,
    policy: &HostKeyPolicy,
) -> Option<SshError> {
    let host = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    let known_hosts = known_hosts_file(policy)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "no known_hosts file ($HOME is not set)".to_owned());
    Some(match verdict? {
        HostKeyVerdict::Unknown(key) => SshError::UnknownHostKey {
            host,
            algorithm: key.algorithm().to_string(),
            fingerprint: fingerprint(&key),
            known_hosts,
        },
        HostKeyVerdict::Changed(key, place) => SshError::HostKeyMismatch {
            host,
            algorithm: key.algorithm().to_string(),
            fingerprint: fingerprint(&key),
            line: place.line,
            known_hosts: place.file.display().to_string(),
        },
        HostKeyVerdict::Revoked(key, place) => SshError::HostKeyRevoked {
            host,
            algorithm: key.algorithm().to_string(),
            fingerprint: fingerprint(&key),
            line: place.line,
            known_hosts: place.file.display().to_string(),
        },
        HostKeyVerdict::Failed(why) => SshError::Config(format!(
            "cannot check the host key of {host} against {known_hosts}: {why}"
        )),
    })
}

async fn authenticate(
    handle: &mut client::Handle<ClientHandler>,
    config: &SshConfig,
) -> Result<(), SshError> {
    let user = config.user.as_str();
    let mut tried = Vec::new();
    for auth in &config.auth {
        tried.push(auth.describe());
        let ok = match auth {
            Auth::KeyFile { path, passphrase } => {
                let key =
                    russh::keys::load_secret_key(path, passphrase.as_ref().map(Secret::expose))
                        .map_err(|e| SshError::Key {
                            path: path.display().to_string(),
                            source: Box::new(e),
                        })?;
                let hash = handle.best_supported_rsa_hash().await?.flatten();
                let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
                matches!(
                    handle.authenticate_publickey(user, key).await?,
                    AuthResult::Success
                )
            }
            Auth::Password(password) => matches!(
                handle
                    .authenticate_password(user, password.expose())
                    .await?,
                AuthResult::Success
            ),
            Auth::Agent | Auth::AgentSocket(_) => {
                use russh::keys::agent::client::AgentClient;
                let agent = match auth {
                    Auth::AgentSocket(path) => AgentClient::connect_uds(path).await,
                    _ => AgentClient::connect_env().await,
                };
                let mut agent = agent.map_err(|e| SshError::Agent(Box::new(e)))?;
                let ids = agent
                    .request_identities()
                    .await
                    .map_err(|e| SshError::Agent(Box::new(e)))?;
                let hash = handle.best_supported_rsa_hash().await?.flatten();
                let mut ok = false;
                for id in ids {
                    let russh::keys::agent::AgentIdentity::PublicKey { key, .. } = id else {
                        continue;
                    };
                    let res = handle
                        .authenticate_publickey_with(user, key, hash, &mut agent)
                        .await
                        .map_err(|e| SshError::Agent(Box::new(e)))?;
                    if matches!(res, AuthResult::Success) {
                        ok = true;
                        break;
                    }
                }
                ok
            }
        };
        if ok {
            return Ok(());
        }
    }
    Err(SshError::AuthRejected {
        user: user.to_owned(),
        tried: if tried.is_empty() {
            "no method (SshConfig::auth is empty)".to_owned()
        } else {
            tried.join(", ")
        },
    })
}

/// Starts the tasks of a process whose exec request the server accepted.
pub(crate) fn start(
    read: ChannelReadHalf,
    write: ChannelWriteHalf<Msg>,
    command: &str,
    config: &SshConfig,
    options: &ExecOptions,
    session: Arc<SessionInner>,
) -> RemoteProcess {
    let session: Arc<dyn std::any::Any + Send + Sync> = session;
    let channel = write.id();
    let write = Arc::new(write);
    let (p, proc) = plumbing(config, options, channel, session);
    let span = exec_span(command, config, "russh", &p.name);
    config.ledger.spawn(
        LEDGER_TASK,
        tracing::Instrument::instrument(
            read_channel(ReadTask {
                read,
                write: write.clone(),
                out: p.out,
                err: p.err,
                flags: p.flags,
                exit: p.exit,
                done: p.done,
                cancel: p.cancel.clone(),
            }),
            span.clone(),
        ),
    );
    config.ledger.spawn(
        LEDGER_TASK,
        tracing::Instrument::instrument(
            write_stdin(Some(write), p.stdin, p.progress, p.done_rx, p.cancel),
            span,
        ),
    );
    proc
}

struct ReadTask {
    read: ChannelReadHalf,
    write: Arc<ChannelWriteHalf<Msg>>,
    out: PipeSink<Bytes>,
    err: PipeSink<Bytes>,
    flags: Arc<Flags>,
    exit: ExitTx,
    done: watch::Sender<bool>,
    cancel: watch::Receiver<()>,
}

/// Gives up a channel whose command may run: asks the server to kill the
/// command (OpenSSH's sshd sends the signal to the command's process
/// group), sends EOF, then closes the channel.
///
/// A CHANNEL_CLOSE alone is not enough: sshd keeps a session whose command
/// still runs, and keeps the command's stdin open until the command exits,
/// so a `cat` would never end and its session would count against
/// `MaxSessions` for ever. The signal and the EOF are best effort (a
/// server may refuse signals); the close always goes out.
pub(crate) async fn abandon(write: &ChannelWriteHalf<Msg>) {
    let _ = write.signal(russh::Sig::KILL).await;
    let _ = write.eof().await;
    let _ = write.close().await;
}

/// The channel reader: takes the next message from russh's channel queue
/// only when both output pipes are at or below their watermarks.
async fn read_channel(mut t: ReadTask) {
    let (mut out_open, mut err_open) = (true, true);
    let mut status: Option<ExitStatus> = None;
    let mut eof = false;
    let mut stdout_bytes = 0u64;
    let closed_cleanly;
    loop {
        // Backpressure: wait for room in both pipes BEFORE taking a message,
        // since we do not know yet which stream it belongs to.
        tokio::select! {
            _ = t.cancel.changed() => {
                tracing::debug!("every part of the process dropped: closing the channel");
                t.exit.abandoned();
                abandon(&t.write).await;
                return;
            }
            () = async {
                room(&mut t.out, &mut out_open).await;
                room(&mut t.err, &mut err_open).await;
            } => {}
        }
        let msg = tokio::select! {
            _ = t.cancel.changed() => {
                tracing::debug!("every part of the process dropped: closing the channel");
                t.exit.abandoned();
                abandon(&t.write).await;
                return;
            }
            msg = t.read.wait() => msg,
        };
        match msg {
            Some(ChannelMsg::Data { data }) => {
                tracing::trace!(len = data.len(), "stdout data");
                stdout_bytes += data.len() as u64;
                deliver(&mut t.out, &mut out_open, data, &t.flags.stdout);
            }
            Some(ChannelMsg::ExtendedData { data, ext }) => {
                tracing::trace!(len = data.len(), ext, "extended data");
                if ext == 1 {
                    deliver(&mut t.err, &mut err_open, data, &t.flags.stderr);
                }
            }
            Some(ChannelMsg::Eof) => {
                eof = true;
                t.out.close_now();
                t.err.close_now();
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                status = Some(ExitStatus::Code(exit_status));
            }
            Some(ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                ..
            }) => {
                let name = match signal_name {
                    russh::Sig::Custom(s) => s,
                    other => format!("{other:?}"),
                };
                status = Some(ExitStatus::Signal {
                    name,
                    core_dumped,
                    message: error_message,
                });
            }
            Some(ChannelMsg::Close) => {
                closed_cleanly = true;
                break;
            }
            Some(_) => {}
            None => {
                closed_cleanly = false;
                break;
            }
        }
    }
    if !closed_cleanly && !eof {
        tracing::debug!(stdout_bytes, "connection lost before the end of the output");
        t.flags.lost();
    }
    let outcome = match (status, closed_cleanly) {
        (Some(s), _) => Outcome::Exited(s),
        (None, true) => Outcome::NoStatus {
            stdout: stdout_bytes,
        },
        (None, false) => Outcome::Lost,
    };
    // Flags first, then the end of the pipes: a source that sees its end
    // also sees whether it was a loss.
    t.out.close_now();
    t.err.close_now();
    t.exit.send(outcome);
    let _ = t.done.send(true);
}

impl StdinWriter for Arc<ChannelWriteHalf<Msg>> {
    async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.data_bytes(chunk).await.map_err(std::io::Error::other)
    }

    async fn eof(self) -> bool {
        ChannelWriteHalf::eof(&self).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    /// Issue 15 item 3, step by step: the caller of `exec` is dropped while
    /// the open task waits at each step (before the channel open is sent,
    /// so that its confirmation arrives after the drop; after the open;
    /// after the exec request; after the accepted reply). Each time the
    /// server lets go of the channel and its command; with sshd's
    /// `MaxSessions 2`, a leaked one would make the last exec fail.
    #[cfg(all(feature = "server", feature = "testing"))]
    mod cancel_at_each_step {
        use std::sync::Arc;
        use std::time::{Duration, Instant};

        use super::super::{ExecStep, LEDGER_OPEN, Probe};
        use crate::Session;
        use crate::{Auth, SshConfig};
        use flowctl_core::lifecycle::Ledger;

        const STEPS: [ExecStep; 5] = [
            ExecStep::Opening,
            ExecStep::Opened,
            ExecStep::ExecSent,
            ExecStep::Accepted,
            ExecStep::HandedOver,
        ];

        /// Drops the caller of an exec of `cat` while the task waits at `at`,
        /// then lets the task go on. At `HandedOver` (which the task does not
        /// wait at) the task is held at `Accepted` instead, the caller is no
        /// longer polled, the task puts the channel in its reply, and then the
        /// caller is dropped: the channel never reaches it (a race that CI
        /// load hit, leaving `cat` running under sshd).
        async fn cancel_at(s: &Session, ledger: &Ledger, at: ExecStep) {
            let hold = if at == ExecStep::HandedOver {
                ExecStep::Accepted
            } else {
                at
            };
            let (reached_tx, mut reached) = tokio::sync::mpsc::unbounded_channel();
            let go = Arc::new(tokio::sync::Semaphore::new(0));
            let go2 = go.clone();
            let probe: Probe = Arc::new(move |step| {
                let reached_tx = reached_tx.clone();
                let go = go2.clone();
                Box::pin(async move {
                    if step == hold {
                        let _ = reached_tx.send(step);
                        if let Ok(p) = go.acquire().await {
                            p.forget();
                        }
                    } else if step == at {
                        let _ = reached_tx.send(step);
                    }
                })
            });
            let mut fut = Box::pin(s.exec_probed("cat", probe));
            tokio::select! {
                biased;
                _ = reached.recv() => {}
                r = &mut fut => panic!("exec finished while its task waited at {hold:?}: {r:?}"),
            }
            if at == ExecStep::HandedOver {
                go.add_permits(1);
                assert_eq!(reached.recv().await, Some(ExecStep::HandedOver));
                // The open task ends now, but the channel waiting in the
                // caller's reply (`cat` runs, unowned) is still counted: the
                // count must not reach zero. (Not a timing assertion: with
                // the count held it never returns; without, it returns as
                // soon as the task has ended.)
                assert!(
                    tokio::time::timeout(
                        Duration::from_millis(300),
                        ledger.until_zero(Some(LEDGER_OPEN))
                    )
                    .await
                    .is_err(),
                    "the ledger read zero with a handed-over channel nobody took"
                );
                assert_eq!(ledger.live(LEDGER_OPEN), 1);
                drop(fut);
            } else {
                drop(fut);
                go.add_permits(1);
            }
        }

        async fn until(what: &str, mut cond: impl FnMut() -> bool) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !cond() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(2)).await; // polling the server
            }
        }

        fn client(dir: &std::path::Path, addr: &str, known_hosts_line: &str) -> SshConfig {
            let kh = dir.join("known_hosts");
            std::fs::write(&kh, format!("{known_hosts_line}\n")).expect("known_hosts");
            let user = crate::testing::current_user().expect("user");
            SshConfig::new(user, addr)
                .auth(Auth::key_file(dir.join("id")))
                .known_hosts(kh)
                .ledger(flowctl_core::lifecycle::Ledger::new())
        }

        async fn exec_echo(s: &Session) {
            let mut p = s
                .exec("echo ok")
                .await
                .expect("exec after the cancelled ones");
            assert_eq!(p.stdout.read_to_end().await.expect("stdout"), b"ok\n");
            assert!(p.wait().await.expect("status").success());
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn sshd_with_max_sessions_2() {
            let dir = tempfile::tempdir().expect("tempdir");
            crate::testing::ssh_keygen(&dir.path().join("id")).expect("ssh-keygen");
            let sshd =
                crate::testing::Sshd::start(dir.path(), &dir.path().join("id"), "MaxSessions 2\n")
                    .expect("sshd");
            let cfg = client(dir.path(), &sshd.addr(), sshd.known_hosts_line());
            let ledger = cfg.ledger.clone();
            let s = Session::connect(cfg).await.expect("connect");
            for at in STEPS {
                cancel_at(&s, &ledger, at).await;
                tokio::time::timeout(
                    Duration::from_secs(30),
                    ledger.until_zero(Some(LEDGER_OPEN)),
                )
                .await
                .unwrap_or_else(|_| panic!("exec task alive after a cancel at {at:?}"));
                until(
                    &format!("sshd to run no command after a cancel at {at:?}"),
                    || sshd.commands().is_empty(),
                )
                .await;
            }
            exec_echo(&s).await;
            exec_echo(&s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn embedded_server_channel_count() {
            let dir = tempfile::tempdir().expect("tempdir");
            crate::testing::ssh_keygen(&dir.path().join("id")).expect("ssh-keygen");
            let public = russh::keys::load_public_key(dir.path().join("id.pub")).expect("key");
            let server = crate::server::EmbeddedServer::start(
                crate::server::ServerConfig::new(vec![public]).expect("server config"),
            )
            .await
            .expect("server");
            let cfg = client(
                dir.path(),
                &server.addr().to_string(),
                &server.known_hosts_line(),
            );
            let ledger = cfg.ledger.clone();
            let s = Session::connect(cfg).await.expect("connect");
            for at in STEPS {
                cancel_at(&s, &ledger, at).await;
                tokio::time::timeout(
                    Duration::from_secs(30),
                    ledger.until_zero(Some(LEDGER_OPEN)),
                )
                .await
                .unwrap_or_else(|_| panic!("exec task alive after a cancel at {at:?}"));
                until(
                    &format!("the server channels to return to 0 after {at:?}"),
                    || server.live_channels() == 0,
                )
                .await;
            }
            exec_echo(&s).await;
            until("the last channel to close", || server.live_channels() == 0).await;
        }
    }
}
