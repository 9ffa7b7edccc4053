//! The async socket: a shared core (libzmq socket behind a mutex, its
//! notification fd in tokio's reactor, one waker slot per direction) and the
//! two halves, [`ZmqSink`] and [`ZmqSource`].

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use flowctl_core::fair::Budget;
use flowctl_core::gate::Gate;
use flowctl_core::weighted::{MIN_CHARGE, charge_of};
use flowctl_core::{Fairness, FlowError, FlowStats, Sink, Source, Watermarks, Weighted};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::backend::{Events, NotifyFd, RawContext, RawSocket, Sent, SocketType};
use crate::error::ZmqError;
use crate::multipart::Multipart;

/// The default expected message size used to turn watermarks into HWMs: 1 KiB.
pub const DEFAULT_EXPECTED_MESSAGE_SIZE: usize = 1024;

/// After libzmq refused a message, the sink retries only every this many
/// `ready` calls (or after waiting for room).
const RETRY_EVERY: u32 = 32;

/// The least default [`max_message_size`](SocketBuilder::max_message_size):
/// 1 MiB. Unless set, the limit is the largest of the high watermark, the
/// expected message size and this.
pub const MIN_DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// The default linger of [`Sink::close`] and of a dropped socket: 30 s.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(30);

/// A libzmq context: its I/O thread and its `inproc://` namespace.
///
/// Sockets built without one get a private context each, which lets
/// [`Sink::close`] wait until libzmq has really handed every message to the
/// network (`zmq_ctx_term`). Share a context between sockets that talk over
/// `inproc://`; then `close` cannot wait for libzmq's own queue (the context
/// stays alive for the other sockets) and only guarantees that every message
/// was handed to libzmq, which keeps sending it for up to the linger.
#[derive(Debug, Clone)]
pub struct Context {
    raw: RawContext,
}

impl Context {
    /// A new context with one I/O thread.
    pub fn new() -> Self {
        Context {
            raw: RawContext::new(),
        }
    }
}

impl Default for Context {
    fn default() -> Self {
        Context::new()
    }
}

/// Counters flowctl-core's [`FlowStats`] has no field for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ZmqStats {
    /// Messages a PUB socket dropped because a subscriber was at its SNDHWM.
    pub dropped: u64,
    /// Messages handed to libzmq.
    pub sent: u64,
    /// Messages received from libzmq (including those rejected for their frame count).
    pub received: u64,
    /// Messages rejected because of their frame count.
    pub frame_errors: u64,
    /// Forced yields of the receive path (fairness budget spent).
    pub recv_yields: u64,
    /// Forced yields of the send path (fairness budget spent).
    pub send_yields: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    In,
    Out,
}

#[derive(Debug, Default)]
struct Counters {
    dropped: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    frame_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ZmqStats {
        ZmqStats {
            dropped: self.dropped.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            frame_errors: self.frame_errors.load(Ordering::Relaxed),
            recv_yields: 0,
            send_yields: 0,
        }
    }
}

/// What both halves share. Field order matters: the fd is deregistered from
/// tokio before the socket that owns it is closed.
#[derive(Debug)]
struct Core {
    afd: Option<AsyncFd<NotifyFd>>,
    sock: Mutex<Option<RawSocket>>,
    ctx: Option<RawContext>,
    kind: SocketType,
    linger: Option<Duration>,
    waiting_in: AtomicBool,
    waiting_out: AtomicBool,
    notify_in: Notify,
    notify_out: Notify,
    counters: Arc<Counters>,
}

impl Core {
    fn lock(&self) -> Result<MutexGuard<'_, Option<RawSocket>>, FlowError> {
        // A poisoned lock only means another thread panicked while holding it;
        // the libzmq socket itself is still consistent.
        let guard = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(FlowError::Closed);
        }
        Ok(guard)
    }

    fn with_sock<T>(
        &self,
        f: impl FnOnce(&mut RawSocket) -> Result<T, ZmqError>,
    ) -> Result<T, FlowError> {
        let mut guard = self.lock()?;
        match guard.as_mut() {
            Some(s) => f(s).map_err(FlowError::from),
            None => Err(FlowError::Closed),
        }
    }

    fn afd(&self) -> Result<&AsyncFd<NotifyFd>, FlowError> {
        self.afd.as_ref().ok_or(FlowError::Closed)
    }

    /// Reads `ZMQ_EVENTS` and wakes whichever direction (other than `me`) is
    /// waiting and now ready: reading the events may have consumed the fd edge
    /// that direction was waiting for.
    fn events(&self, me: Option<Dir>) -> Result<Events, FlowError> {
        let ev = self.with_sock(|s| s.events())?;
        self.cross_wake(ev, me);
        Ok(ev)
    }

    fn cross_wake(&self, ev: Events, me: Option<Dir>) {
        if me != Some(Dir::In) && ev.readable && self.waiting_in.load(Ordering::SeqCst) {
            self.notify_in.notify_one();
        }
        if me != Some(Dir::Out) && ev.writable && self.waiting_out.load(Ordering::SeqCst) {
            self.notify_out.notify_one();
        }
    }

    /// After a send or recv by `me`: if the other direction waits, re-check
    /// the events for it (the operation processed libzmq's commands and may
    /// have consumed its edge).
    ///
    /// Never fails: the operation before it has already moved messages, and
    /// an error here must not make the caller drop them or report them as
    /// not sent. If the events cannot be read, the waiting direction is woken
    /// anyway; its own next operation meets the error and returns it.
    fn after_op(&self, me: Dir) {
        let other_waits = match me {
            Dir::In => self.waiting_out.load(Ordering::SeqCst),
            Dir::Out => self.waiting_in.load(Ordering::SeqCst),
        };
        if other_waits && self.events(Some(me)).is_err() {
            match me {
                Dir::In => self.notify_out.notify_one(),
                Dir::Out => self.notify_in.notify_one(),
            }
        }
    }

    fn try_send(&self, msg: &[Bytes]) -> Result<Sent, FlowError> {
        let sent = self.with_sock(|s| s.try_send(msg))?;
        self.after_op(Dir::Out);
        Ok(sent)
    }

    /// Waits until `dir` may be ready. Never sleeps without a registered
    /// waker: the notification is armed and the flag raised before the final
    /// `ZMQ_EVENTS` check, and the fd's readiness is cleared only after a
    /// wake-up, before the caller re-checks.
    ///
    /// Returns `Ok(true)` if `ZMQ_EVENTS` said ready at once (no sleep): a
    /// caller whose next attempt still fails must yield rather than spin.
    ///
    /// `check: false` skips that `ZMQ_EVENTS` read (a getsockopt that costs
    /// libzmq a `poll` syscall). Only for a caller whose last operation in
    /// this direction just failed with `EAGAIN` (which processed libzmq's
    /// commands, as the read would) and whose socket never had another half
    /// in use, which could have consumed the edge before the flag above was
    /// raised: the read is what makes that cross-wake safe.
    async fn wait(&self, dir: Dir, check: bool) -> Result<bool, FlowError> {
        let (flag, notify) = match dir {
            Dir::In => (&self.waiting_in, &self.notify_in),
            Dir::Out => (&self.waiting_out, &self.notify_out),
        };
        let mut notified = pin!(notify.notified());
        notified.as_mut().enable();
        flag.store(true, Ordering::SeqCst);
        let _lower = LowerOnDrop(flag);
        if check {
            let ev = self.events(Some(dir))?;
            let ready = match dir {
                Dir::In => ev.readable,
                Dir::Out => ev.writable,
            };
            if ready {
                return Ok(true);
            }
        }
        let afd = self.afd()?;
        tokio::select! {
            guard = afd.readable() => {
                let mut guard = guard?;
                guard.clear_ready();
            }
            () = &mut notified => {}
        }
        Ok(false)
    }

    /// Takes everything out for closing. The fd leaves the reactor first.
    fn take_parts(&mut self) -> (Option<RawSocket>, Option<RawContext>) {
        drop(self.afd.take());
        let sock = self
            .sock
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // The context goes too, even a shared one: dropping its last clone
        // terminates it, which blocks, so that must happen off the async threads.
        (sock, self.ctx.take())
    }
}

/// Closes the socket, then drops our clone of the context. For a private
/// context that is the last clone, so this waits in `zmq_ctx_term` until libzmq
/// has sent everything or the linger has expired; a shared context lives on
/// (and keeps sending) while other clones exist.
fn finish(sock: Option<RawSocket>, ctx: Option<RawContext>) {
    drop(sock);
    drop(ctx);
}

impl Drop for Core {
    fn drop(&mut self) {
        let (sock, ctx) = self.take_parts();
        if sock.is_none() && ctx.is_none() {
            return;
        }

        // zmq_ctx_term blocks for up to the linger: never on an async thread.
        let parts = (sock, ctx);
        match std::thread::Builder::new()
            .name("flowctl-zmq-linger".into())
            .spawn(move || finish(parts.0, parts.1))
        {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot spawn the linger thread; the socket's unsent messages are dropped");
            }
        }
    }
}

struct LowerOnDrop<'a>(&'a AtomicBool);

impl Drop for LowerOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Builds a socket: type, endpoints, watermarks and options.
///
/// # Backpressure
/// libzmq bounds its queues in messages (`ZMQ_SNDHWM`/`ZMQ_RCVHWM`), flowctl
/// in bytes. Unless set with [`send_hwm`](Self::send_hwm)/[`recv_hwm`](Self::recv_hwm),
/// both HWMs are `ceil(high / expected_message_size)` (at least 1), with the
/// [`watermarks`](Self::watermarks) (default [`Watermarks::default`]) and the
/// [`expected_message_size`](Self::expected_message_size) (default
/// [`DEFAULT_EXPECTED_MESSAGE_SIZE`]). So libzmq's queue on each side holds
/// about `high` bytes of messages of the expected size; larger messages make
/// it hold proportionally more. The sink's own queue is charged in bytes to a
/// [`Gate`] with the same watermarks, each message at least
/// [`MIN_CHARGE`](flowctl_core::weighted::MIN_CHARGE) bytes.
#[derive(Debug, Clone)]
pub struct SocketBuilder {
    kind: SocketType,
    ctx: Option<Context>,
    wm: Watermarks,
    expected_size: usize,
    sndhwm: Option<usize>,
    rcvhwm: Option<usize>,
    /// `None`: derived; `Some(None)`: no limit.
    max_message_size: Option<Option<usize>>,
    linger: Option<Duration>,
    sndbuf: Option<usize>,
    rcvbuf: Option<usize>,
    fairness: Fairness,
    frames: Option<usize>,
    routing_id: Option<Bytes>,
    subscribe: Vec<Bytes>,
    binds: Vec<String>,
    connects: Vec<String>,
}

impl SocketBuilder {
    /// A socket of this type, with the defaults described on [`SocketBuilder`].
    pub fn new(kind: SocketType) -> Self {
        SocketBuilder {
            kind,
            ctx: None,
            wm: Watermarks::default(),
            expected_size: DEFAULT_EXPECTED_MESSAGE_SIZE,
            sndhwm: None,
            rcvhwm: None,
            max_message_size: None,
            linger: Some(DEFAULT_LINGER),
            sndbuf: None,
            rcvbuf: None,
            fairness: Fairness::default(),
            frames: None,
            routing_id: None,
            subscribe: Vec::new(),
            binds: Vec::new(),
            connects: Vec::new(),
        }
    }

    /// Uses a shared context (needed for `inproc://` between sockets).
    pub fn context(mut self, ctx: &Context) -> Self {
        self.ctx = Some(ctx.clone());
        self
    }

    /// Byte watermarks of the sink's queue, and the base of the derived HWMs.
    pub fn watermarks(mut self, wm: Watermarks) -> Self {
        self.wm = wm;
        self
    }

    /// The message size used to derive the HWMs from the watermarks (bytes, >= 1).
    pub fn expected_message_size(mut self, bytes: usize) -> Self {
        self.expected_size = bytes.max(1);
        self
    }

    /// Sets `ZMQ_SNDHWM` in messages (0 = unlimited, as in libzmq).
    pub fn send_hwm(mut self, msgs: usize) -> Self {
        self.sndhwm = Some(msgs);
        self
    }

    /// Sets `ZMQ_RCVHWM` in messages (0 = unlimited, as in libzmq).
    pub fn recv_hwm(mut self, msgs: usize) -> Self {
        self.rcvhwm = Some(msgs);
        self
    }

    /// The largest frame a peer may send to this socket (`ZMQ_MAXMSGSIZE`),
    /// in bytes; `None` for no limit (libzmq's own default, not flowctl's).
    ///
    /// libzmq allocates a received frame at the size its header announces,
    /// before the bytes arrive, and RCVHWM counts messages, not bytes: without
    /// a limit a peer that announces a 16 GiB frame makes this process
    /// allocate (and, as the bytes come, fill) 16 GiB. With a limit, libzmq
    /// checks the announced size first and drops the connection of a peer
    /// that exceeds it (silently: no error reaches `recv`; the messages that
    /// peer sent before are delivered, and a connecting socket reconnects).
    /// The limit is per frame; it does not apply to what this socket sends.
    ///
    /// Unset, it is the largest of the high [`watermark`](Self::watermarks),
    /// the [`expected_message_size`](Self::expected_message_size) and
    /// [`MIN_DEFAULT_MAX_MESSAGE_SIZE`] (1 MiB): 1 MiB with the defaults.
    /// Raise it when peers legitimately send larger frames.
    ///
    /// # Errors
    /// [`build`](Self::build) fails with [`ZmqError::InvalidOption`] for a
    /// value above `i64::MAX`.
    pub fn max_message_size(mut self, bytes: Option<usize>) -> Self {
        self.max_message_size = Some(bytes);
        self
    }

    /// How long `close` (and a dropped socket) keeps sending unsent messages;
    /// `None` waits forever. Default [`DEFAULT_LINGER`].
    pub fn linger(mut self, linger: Option<Duration>) -> Self {
        self.linger = linger;
        self
    }

    /// Sets the kernel send buffer (`SO_SNDBUF`, through libzmq's
    /// `ZMQ_SNDBUF`) of this socket's TCP/IPC connections, in bytes. Unset
    /// (the default), the operating system's default applies (Linux:
    /// `net.ipv4.tcp_wmem`, autotuned).
    ///
    /// The kernel buffers sit outside every HWM and watermark: bytes in them
    /// are neither in libzmq's queues nor in ours, and with small messages
    /// they can hold far more than the HWM (Linux autotunes TCP buffers up to
    /// megabytes). That makes them the largest part of the latency of a
    /// loaded zmq link; a smaller buffer bounds it, at some cost in
    /// throughput. Linux doubles the value for its bookkeeping and caps it
    /// at `net.core.wmem_max`; [`ZmqSocket::send_buffer`] reads back what
    /// libzmq holds.
    ///
    /// # Errors
    /// [`build`](Self::build) fails with [`ZmqError::InvalidOption`] for 0
    /// (leave it unset for the default) or a value above `i32::MAX`.
    pub fn send_buffer(mut self, bytes: usize) -> Self {
        self.sndbuf = Some(bytes);
        self
    }

    /// Sets the kernel receive buffer (`SO_RCVBUF`, through libzmq's
    /// `ZMQ_RCVBUF`) of this socket's connections, in bytes; see
    /// [`send_buffer`](Self::send_buffer). Unset, the operating system's
    /// default applies (Linux: `net.ipv4.tcp_rmem`, autotuned).
    ///
    /// # Errors
    /// As `send_buffer`.
    pub fn recv_buffer(mut self, bytes: usize) -> Self {
        self.rcvbuf = Some(bytes);
        self
    }

    /// The fairness budget of the receive and send paths.
    pub fn fairness(mut self, fairness: Fairness) -> Self {
        self.fairness = fairness;
        self
    }

    /// Every received message must have exactly `n` frames (including the
    /// routing id frame on a ROUTER); others are consumed and reported as
    /// [`ZmqError::FrameCount`], and the stream goes on.
    ///
    /// It also bounds what a peer's frame count costs here: the frames of a
    /// message past the `n`th are received and released one at a time,
    /// never collected (libzmq itself still queues every frame of a message
    /// until its last one arrives).
    pub fn expect_frames(mut self, n: usize) -> Self {
        self.frames = Some(n);
        self
    }

    /// This socket's routing id (`ZMQ_ROUTING_ID`), as seen by a ROUTER peer.
    pub fn routing_id(mut self, id: impl Into<Bytes>) -> Self {
        self.routing_id = Some(id.into());
        self
    }

    /// Subscribes a SUB socket to a topic prefix (empty = everything).
    pub fn subscribe(mut self, topic: impl Into<Bytes>) -> Self {
        self.subscribe.push(topic.into());
        self
    }

    /// Binds to an endpoint (`tcp://127.0.0.1:*` picks a free port; see
    /// [`ZmqSocket::endpoints`]).
    pub fn bind(mut self, endpoint: impl Into<String>) -> Self {
        self.binds.push(endpoint.into());
        self
    }

    /// Connects to an endpoint.
    pub fn connect(mut self, endpoint: impl Into<String>) -> Self {
        self.connects.push(endpoint.into());
        self
    }

    /// Sets an option by name, for configuration files: `send_hwm`,
    /// `recv_hwm`, `expected_message_size`, `max_message_size` (bytes, `-1`
    /// = no limit), `linger_ms` (`-1` = forever),
    /// `send_buffer`, `recv_buffer` (bytes), `expect_frames`, `routing_id`,
    /// `subscribe`, `bind`, `connect`.
    ///
    /// # Errors
    /// [`ZmqError::InvalidOption`] for an unknown name or a value that does not parse.
    pub fn option(self, name: &str, value: &str) -> Result<Self, ZmqError> {
        let bad = |reason: &str| ZmqError::InvalidOption {
            option: name.into(),
            value: value.into(),
            reason: reason.into(),
        };
        let num = || {
            value
                .parse::<usize>()
                .map_err(|_| bad("expected a non-negative integer"))
        };
        Ok(match name {
            "send_hwm" => self.send_hwm(num()?),
            "recv_hwm" => self.recv_hwm(num()?),
            "expected_message_size" => self.expected_message_size(num()?),
            "send_buffer" => self.send_buffer(num()?),
            "recv_buffer" => self.recv_buffer(num()?),
            "expect_frames" => self.expect_frames(num()?),
            "max_message_size" => {
                if value == "-1" {
                    self.max_message_size(None)
                } else {
                    let bytes = value
                        .parse::<usize>()
                        .map_err(|_| bad("expected bytes (>= 0) or -1 for no limit"))?;
                    self.max_message_size(Some(bytes))
                }
            }
            "linger_ms" => {
                if value == "-1" {
                    self.linger(None)
                } else {
                    let ms = value
                        .parse::<u64>()
                        .map_err(|_| bad("expected milliseconds (>= 0) or -1 for forever"))?;
                    self.linger(Some(Duration::from_millis(ms)))
                }
            }
            "routing_id" => self.routing_id(Bytes::copy_from_slice(value.as_bytes())),
            "subscribe" => self.subscribe(Bytes::copy_from_slice(value.as_bytes())),
            "bind" => self.bind(value),
            "connect" => self.connect(value),
            _ => {
                return Err(bad(
                    "unknown option (known: send_hwm, recv_hwm, expected_message_size, max_message_size, linger_ms, send_buffer, recv_buffer, expect_frames, routing_id, subscribe, bind, connect)",
                ));
            }
        })
    }

    fn derived_hwm(&self) -> usize {
        self.wm.high().div_ceil(self.expected_size).max(1)
    }

    /// The `ZMQ_MAXMSGSIZE` this builder sets (see [`max_message_size`](Self::max_message_size)).
    fn effective_max_message_size(&self) -> Option<usize> {
        self.max_message_size.unwrap_or_else(|| {
            Some(
                self.wm
                    .high()
                    .max(self.expected_size)
                    .max(MIN_DEFAULT_MAX_MESSAGE_SIZE),
            )
        })
    }

    /// Creates the socket, applies the options, binds and connects.
    ///
    /// Must be called inside a tokio runtime with I/O enabled.
    ///
    /// # Errors
    /// [`ZmqError::Bind`]/[`ZmqError::Connect`] naming the endpoint,
    /// [`ZmqError::InvalidOption`] for a value libzmq cannot take, and
    /// [`ZmqError::Unsupported`] for subscriptions on a non-SUB socket.
    pub fn build(self) -> Result<ZmqSocket, FlowError> {
        let ctx = match &self.ctx {
            Some(c) => c.raw.clone(),
            None => RawContext::new(),
        };
        let mut sock = RawSocket::new(&ctx, self.kind)?;
        let hwm = self.derived_hwm();
        sock.set_sndhwm(self.sndhwm.unwrap_or(hwm))?;
        sock.set_rcvhwm(self.rcvhwm.unwrap_or(hwm))?;
        let max_message_size = self.effective_max_message_size();
        sock.set_maxmsgsize(max_message_size)?;
        sock.set_linger(self.linger)?;
        if let Some(bytes) = self.sndbuf {
            sock.set_sndbuf(bytes)?;
        }
        if let Some(bytes) = self.rcvbuf {
            sock.set_rcvbuf(bytes)?;
        }
        if let Some(id) = &self.routing_id {
            sock.set_routing_id(id)?;
        }
        match self.kind {
            SocketType::Router => sock.set_router_mandatory()?,
            SocketType::Pub => sock.set_xpub_nodrop()?,
            _ => {}
        }
        if !self.subscribe.is_empty() && self.kind != SocketType::Sub {
            return Err(ZmqError::Unsupported {
                op: "subscribe",
                socket: self.kind.name(),
            }
            .into());
        }
        for topic in &self.subscribe {
            sock.subscribe(topic)?;
        }
        let mut endpoints = Vec::new();
        for ep in &self.binds {
            endpoints.push(sock.bind(ep)?);
        }
        for ep in &self.connects {
            sock.connect(ep)?;
            endpoints.push(ep.clone());
        }
        let fd = sock.notify_fd()?;
        // SAFETY: `fd` is libzmq's ZMQ_FD of `sock`, open for as long as `sock`
        // is. `Core` keeps both and always drops the `AsyncFd` before the socket
        // (`Core::take_parts`, called by `Drop for Core` and by `close`), and
        // `NotifyFd::as_raw_fd` always returns the same descriptor.
        #[allow(unsafe_code)]
        let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        tracing::info!(
            socket = self.kind.name(),
            ?endpoints,
            hwm,
            ?max_message_size,
            "zmq socket ready"
        );
        let counters = Arc::new(Counters::default());
        let source_counters = counters.clone();
        let core = Arc::new(Core {
            afd: Some(afd),
            sock: Mutex::new(Some(sock)),
            ctx: Some(ctx),
            kind: self.kind,
            linger: self.linger,
            waiting_in: AtomicBool::new(false),
            waiting_out: AtomicBool::new(false),
            notify_in: Notify::new(),
            notify_out: Notify::new(),
            counters: counters.clone(),
        });
        let span = tracing::debug_span!("zmq", socket = self.kind.name());
        Ok(ZmqSocket {
            sink: ZmqSink {
                core: Some(core.clone()),
                refused: 0,
                counters,
                items: 0,
                bytes: 0,
                queue: VecDeque::new(),
                gate: Gate::new(self.wm, span),
                wm: self.wm,
                queued_bytes: 0,
                paused: false,
                uncharged: 0,
                budget: Budget::new(self.fairness),
                closed: false,
                rejected: (0, 0),
            },
            source: ZmqSource {
                core: Some(core),
                kind: self.kind,
                endpoints,
                counters: source_counters,
                budget: Budget::new(self.fairness),
                frames: self.frames,
                wm: self.wm,
                items: 0,
                bytes: 0,
                alone: false,
            },
        })
    }
}

/// A ZeroMQ socket; [`split`](ZmqSocket::split) it into a [`Sink`] and a
/// [`Source`] that may live in different tasks.
#[derive(Debug)]
pub struct ZmqSocket {
    sink: ZmqSink,
    source: ZmqSource,
}

impl ZmqSocket {
    /// Starts a [`SocketBuilder`].
    pub fn builder(kind: SocketType) -> SocketBuilder {
        SocketBuilder::new(kind)
    }

    /// The sending and the receiving half. The socket closes when both are
    /// dropped, or when the sink is closed after the source was dropped.
    pub fn split(self) -> (ZmqSink, ZmqSource) {
        (self.sink, self.source)
    }

    /// Only the sending half (for PUSH, PUB ...).
    pub fn into_sink(self) -> ZmqSink {
        self.sink
    }

    /// Only the receiving half (for PULL, SUB ...).
    pub fn into_source(self) -> ZmqSource {
        let mut source = self.source;
        // The sink half is dropped unused: nothing else will ever operate
        // on the socket (see `ZmqSource::alone`).
        source.alone = true;
        source
    }

    /// Bound endpoints as resolved by libzmq (with the port chosen for `:*`),
    /// then connected endpoints as given.
    pub fn endpoints(&self) -> &[String] {
        &self.source.endpoints
    }

    /// The socket type.
    pub fn kind(&self) -> SocketType {
        self.source.kind
    }

    /// The kernel send buffer size libzmq applies to this socket's
    /// connections (`ZMQ_SNDBUF`, read back with `getsockopt`); `None` = the
    /// operating system's default. See [`SocketBuilder::send_buffer`].
    ///
    /// # Errors
    /// A failed `getsockopt` ([`ZmqError::Socket`]).
    pub fn send_buffer(&self) -> Result<Option<usize>, FlowError> {
        self.sink.core()?.with_sock(|s| s.sndbuf())
    }

    /// The largest frame a peer may send (`ZMQ_MAXMSGSIZE`, read back with
    /// `getsockopt`); `None` = no limit. See [`SocketBuilder::max_message_size`].
    ///
    /// # Errors
    /// A failed `getsockopt` ([`ZmqError::Socket`]).
    pub fn max_message_size(&self) -> Result<Option<usize>, FlowError> {
        self.sink.core()?.with_sock(|s| s.maxmsgsize())
    }

    /// The kernel receive buffer size (`ZMQ_RCVBUF`); `None` = the operating
    /// system's default. See [`SocketBuilder::recv_buffer`].
    ///
    /// # Errors
    /// A failed `getsockopt` ([`ZmqError::Socket`]).
    pub fn recv_buffer(&self) -> Result<Option<usize>, FlowError> {
        self.sink.core()?.with_sock(|s| s.rcvbuf())
    }
}

/// The sending half of a [`ZmqSocket`]. Items are [`Multipart`] messages.
///
/// # Backpressure
/// `start_send` hands the message to libzmq at once when libzmq takes it
/// (below SNDHWM); otherwise it is queued here, charged in bytes: its
/// [`weight`](Weighted::weight), and at least
/// [`MIN_CHARGE`](flowctl_core::weighted::MIN_CHARGE) (64 bytes), so a queue
/// of empty frames pauses too (at most `high / 64` + 1 of them). `ready`
/// pushes the queue into libzmq (after a refusal, on every 32nd call, so a
/// sender at the HWM does not pay a refused send per message; the queue goes
/// into libzmq under one lock of the socket) and waits, while
/// the queue is above the high watermark, until libzmq has room again and the
/// queue is at the low watermark. So memory is bounded by SNDHWM messages in
/// libzmq plus `high` plus one message here.
///
/// # Errors
/// A message libzmq rejects for good (a ROUTER message to a routing id with no
/// peer: [`ZmqError::Unroutable`]) is dropped and the error returned, by
/// `start_send` or, if it was queued, by the next `ready`/`flush`. A
/// multipart message whose send fails after its first frame breaks the
/// socket's sending side ([`ZmqError::BrokenSend`]): libzmq cannot abort the
/// started message, so every later send fails with that error instead of
/// being glued to it; messages still queued are counted by `close`.
///
/// # Flushing
/// As with `futures::Sink`, a message accepted while libzmq is at its HWM
/// moves on only when the sink is used again: call
/// [`flush`](Sink::flush) (or `close`) before waiting for something else,
/// e.g. before awaiting the reply to a request sent on a DEALER.
///
/// # PUB sockets
/// libzmq's PUB drops a message for a subscriber at its HWM without a trace.
/// flowctl sets `ZMQ_XPUB_NODROP` so libzmq reports it, and counts the message
/// in [`ZmqStats::dropped`] instead of waiting (a PUB has no writability signal
/// per subscriber to wait on). With NODROP libzmq refuses the message for every
/// matching subscriber when one of them is full.
///
/// # Fairness
/// `ready` consumes tokio's coop budget and the [`Fairness`] budget when it
/// returns without waiting, so a sender that libzmq always accepts still yields.
#[derive(Debug)]
pub struct ZmqSink {
    core: Option<Arc<Core>>,
    /// 0 while libzmq takes messages; after a refusal, `ready` calls since.
    refused: u32,
    counters: Arc<Counters>,
    items: u64,
    bytes: u64,
    queue: VecDeque<Multipart>,
    gate: Gate,
    /// The queue's watermarks (also the gate's).
    wm: Watermarks,
    /// Bytes in `queue`: the gate's `buffered` plus `uncharged`.
    queued_bytes: usize,
    /// The gate's pause state, kept here so `ready` needs no lock of the
    /// gate: set when `queued_bytes` goes above high, cleared at or below low.
    paused: bool,
    /// Bytes queued but not yet charged to the gate. The gate gets them in
    /// one charge before any credit and when the queue goes above high, so
    /// its `pauses`, `max_buffered` and debug events are what per-message
    /// charges would give; `stats` adds them to `buffered`.
    uncharged: usize,
    budget: Budget,
    closed: bool,
    /// Queued messages libzmq rejected for good (dropped by `drain`), and
    /// their payload bytes: what `close` counts as dropped besides the queue.
    rejected: (u64, u64),
}

impl ZmqSink {
    fn core(&self) -> Result<&Arc<Core>, FlowError> {
        match &self.core {
            Some(c) if !self.closed => Ok(c),
            _ => Err(FlowError::Closed),
        }
    }

    /// Handles the outcome of a send attempt; true if the message left our
    /// hands (the caller counts it as sent if `sent` is [`Sent::Taken`]).
    #[inline]
    fn account(core: &Core, sent: Sent) -> bool {
        match sent {
            Sent::Taken => true,
            Sent::WouldBlock if core.kind == SocketType::Pub => {
                core.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::trace!("pub: subscriber at its HWM, message dropped");
                true
            }
            Sent::WouldBlock => false,
        }
    }

    /// Charges a message put in the queue: `charge` is its
    /// [`charge_of`], at least `MIN_CHARGE` bytes even for empty frames, so
    /// that the watermarks bound the number of queued messages too (see
    /// `uncharged`).
    fn charge_queued(&mut self, charge: usize) {
        self.queued_bytes += charge;
        self.uncharged += charge;
        if !self.paused && self.queued_bytes > self.wm.high() {
            self.paused = true;
            self.gate.charge(std::mem::take(&mut self.uncharged));
            debug_assert!(self.gate.is_paused());
        }
    }

    /// Credits `charge` bytes (the sum of [`charge_of`] of the messages)
    /// that left the queue.
    fn credit_queued(&mut self, charge: usize) {
        if self.uncharged > 0 {
            self.gate.charge(std::mem::take(&mut self.uncharged));
        }
        self.queued_bytes -= charge;
        self.gate.credit(charge);
        if self.paused && self.queued_bytes <= self.wm.low() {
            self.paused = false;
        }
        debug_assert_eq!(self.paused, self.gate.is_paused());
        debug_assert_eq!(self.queued_bytes, self.gate.buffered());
    }

    /// Pushes queued messages into libzmq, under one lock of the socket,
    /// until it refuses one; returns how many left the queue. The messages
    /// are dropped after the lock is released (a frame's owner may be
    /// application code).
    fn drain(&mut self) -> Result<usize, FlowError> {
        if self.queue.is_empty() {
            return Ok(0);
        }
        let core = self.core()?.clone();
        let mut moved = 0;
        let mut sent = 0u64;
        let mut credit = 0;
        let mut failed = None;
        {
            let mut guard = core.lock()?;
            let sock = guard.as_mut().ok_or(FlowError::Closed)?;
            for msg in &self.queue {
                if let Some(e) = sock.send_broken() {
                    // Broken by an earlier message: this one was never
                    // tried, it stays queued (`close` counts it).
                    failed = Some(FlowError::from(e));
                    break;
                }
                match sock.try_send(msg) {
                    Ok(outcome) => {
                        if !Self::account(&core, outcome) {
                            self.refused = 1;
                            break;
                        }
                        if outcome == Sent::Taken {
                            sent += 1;
                        }
                    }
                    Err(e) => {
                        // libzmq rejected this message for good (e.g. an
                        // unknown routing id): drop it and report, or every
                        // later call would fail on it again.
                        failed = Some(FlowError::from(e));
                        self.rejected.0 += 1;
                        self.rejected.1 += msg.weight() as u64;
                    }
                }
                credit += charge_of(msg);
                moved += 1;
                if failed.is_some() {
                    break;
                }
            }
        }
        self.queue.drain(..moved);
        if sent > 0 {
            core.counters.sent.fetch_add(sent, Ordering::Relaxed);
        }
        if self.queue.is_empty() {
            self.refused = 0;
        }
        if credit > 0 {
            self.credit_queued(credit);
        }
        // The sends processed libzmq's commands: re-check for the receiver
        // (also when a later message failed: the earlier ones were sent).
        core.after_op(Dir::Out);
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(moved)
    }

    /// `flush` for `close`: a queued message libzmq rejects for good (dropped
    /// by `drain`, counted in `rejected`) does not stop it, the messages
    /// behind it still go. It stops when the queue is empty or at an error
    /// that made no progress; the first error is left in `first`.
    async fn flush_for_close(&mut self, first: &mut Option<FlowError>) {
        loop {
            let before = self.queue.len();
            let step = match self.drain() {
                Ok(_) if self.queue.is_empty() => return,
                Ok(_) => self.wait_writable().await,
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                first.get_or_insert(e);
                if self.queue.len() >= before {
                    return;
                }
            }
        }
    }

    /// Drops every queued message (`close` gave up on them) and credits
    /// their charge, so `buffered` returns to 0. Returns how many, and their
    /// payload bytes.
    fn discard_queue(&mut self) -> (u64, u64) {
        let messages = self.queue.len() as u64;
        let (mut charge, mut bytes) = (0, 0u64);
        for msg in self.queue.drain(..) {
            charge += charge_of(&msg);
            bytes += msg.weight() as u64;
        }
        if charge > 0 {
            self.credit_queued(charge);
        }
        self.refused = 0;
        (messages, bytes)
    }

    /// Waits for libzmq to have room. `ZMQ_EVENTS` may say "writable" while a
    /// send is still refused (a ROUTER whose addressed peer is full, with
    /// `ZMQ_ROUTER_MANDATORY`): then this yields instead of spinning.
    async fn wait_writable(&mut self) -> Result<(), FlowError> {
        let core = self.core()?.clone();
        if core.wait(Dir::Out, true).await? && self.drain()? == 0 {
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// Counters beyond [`FlowStats`]: PUB drops, forced yields.
    pub fn zmq_stats(&self) -> ZmqStats {
        let mut s = self.counters.snapshot();
        s.send_yields = self.budget.yields();
        s
    }

    /// Messages queued here (not yet taken by libzmq).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

impl ZmqSink {
    /// Resolves when the sink accepts another message; see [`Sink::ready`].
    /// An inherent method, so a call on a `ZmqSink` itself costs no boxed
    /// future; the [`Sink`] impl calls it.
    ///
    /// # Errors
    /// [`FlowError::Closed`] after `close`; a queued message libzmq rejected
    /// for good ([`ZmqError::Unroutable`]).
    pub async fn ready(&mut self) -> Result<(), FlowError> {
        self.ready_inner().await
    }

    /// [`ready`](Self::ready), then [`Sink::start_send`]; see [`Sink::send`].
    /// Inherent for the same reason as `ready`, and it takes anything that
    /// converts into a [`Multipart`]: a `Bytes` (one frame), a `Vec<Bytes>`
    /// or an array of them.
    ///
    /// # Errors
    /// As `ready` and `start_send`.
    pub fn send(
        &mut self,
        item: impl Into<Multipart>,
    ) -> impl Future<Output = Result<(), FlowError>> + Send + '_ {
        // Converted here, so that the future is one type for every `item`.
        self.send_inner(item.into())
    }

    async fn send_inner(&mut self, item: Multipart) -> Result<(), FlowError> {
        self.ready_inner().await?;
        Sink::start_send(self, item)
    }

    /// Sends every message of `batch`, in order, taking them out of it: the
    /// batch counterpart of [`send`](Self::send), as
    /// [`Source::recv_many`](flowctl_core::Source::recv_many) is of `recv`.
    ///
    /// Each round passes [`ready`](Self::ready) (one unit of tokio's coop
    /// budget; a forced yield when the [`Fairness`] slice is spent), then
    /// hands messages straight to libzmq under one lock of the socket until
    /// libzmq refuses one (its SNDHWM) or the slice is spent. After a
    /// refusal it waits for room, as a blocking `zmq_send` would: the
    /// caller's `batch` is the queue, and the sink keeps nothing of its own
    /// (`stats().buffered` stays 0). Only if the sink's queue already holds
    /// messages from `send` do the batch's go in behind them, within the
    /// bound of `send`: SNDHWM messages in libzmq plus `high` plus one
    /// message. Every message is charged to the fairness budget.
    ///
    /// Returns how many messages were accepted (all of them, on `Ok`). A
    /// `VecDeque`, because every round takes its messages off the front
    /// (`VecDeque::from(vec)` reuses a `Vec`'s buffer). Accepted is not yet
    /// sent: as after `send`, [`flush`](Sink::flush) or `close` pushes what
    /// the sink still queues into libzmq.
    ///
    /// # Cancel safety
    /// Cancel-safe: if the future is dropped, the messages not yet accepted
    /// are still in `batch`, in order, and nothing else was taken.
    ///
    /// # Errors
    /// As [`send`](Self::send). A message that fails on its own (an empty
    /// one, an unroutable ROUTER message) is taken out of `batch` and
    /// dropped, as `start_send` would; the messages before it were accepted
    /// and the ones after it stay in `batch`. On a socket whose sending side
    /// broke off mid-message ([`ZmqError::BrokenSend`]) the message that
    /// broke it is dropped and the ones never tried stay in `batch`. On a closed sink or a socket
    /// type that cannot send, `batch` is left as it was.
    pub async fn send_many(&mut self, batch: &mut VecDeque<Multipart>) -> Result<usize, FlowError> {
        let mut accepted = 0;
        while !batch.is_empty() {
            self.ready_inner().await?;
            let (taken, refused) = self.accept_many(batch)?;
            accepted += taken;
            if refused {
                // libzmq is at its SNDHWM: wait for room, as a blocking
                // `zmq_send` would, instead of moving the rest of `batch`
                // into the sink's own queue.
                Box::pin(self.wait_writable()).await?;
            }
        }
        Ok(accepted)
    }

    /// One round of [`send_many`](Self::send_many): accepts messages from
    /// the front of `batch` until libzmq refuses one, the queue is paused or
    /// the fairness slice is spent, and removes them from `batch`. Returns
    /// how many, and whether libzmq refused one (that one stays in `batch`).
    fn accept_many(&mut self, batch: &mut VecDeque<Multipart>) -> Result<(usize, bool), FlowError> {
        let core = self.core()?.clone();
        if !core.kind.can_send() {
            return Err(ZmqError::Unsupported {
                op: "send",
                socket: core.kind.name(),
            }
            .into());
        }
        // Whatever is queued goes first (once per round, not per message).
        self.drain()?;
        // Messages still queued (from `send`) keep the rest behind them, in
        // the queue; otherwise every message goes straight into libzmq.
        let queueing = !self.queue.is_empty();
        let mut taken = 0;
        let mut direct = 0u64;
        let mut failed = None;
        // The failed message was never tried (the socket was broken before
        // it): it stays in `batch`.
        let mut untried = false;
        let mut refused = false;
        {
            let mut guard = if queueing { None } else { Some(core.lock()?) };
            // `lock` fails on a closed socket, so `sock` is `None` exactly
            // when queueing.
            let mut sock = guard.as_mut().and_then(|g| g.as_mut());
            for item in batch.iter() {
                if taken > 0 && (self.paused || self.budget.spent()) {
                    break;
                }
                if item.is_empty() {
                    failed = Some(ZmqError::EmptyMessage.into());
                    break;
                }
                let weight = item.weight();
                let charge = charge_of(item);
                if let Some(sock) = sock.as_deref_mut() {
                    if let Some(e) = sock.send_broken() {
                        failed = Some(FlowError::from(e));
                        untried = true;
                        break;
                    }
                    match sock.try_send(item) {
                        Ok(outcome) if Self::account(&core, outcome) => {
                            if outcome == Sent::Taken {
                                direct += 1;
                            }
                        }
                        Ok(_) => {
                            // Refused at the HWM: the round ends, and this
                            // one stays in `batch` for the next.
                            refused = true;
                            break;
                        }
                        Err(e) => {
                            failed = Some(FlowError::from(e));
                            break;
                        }
                    }
                } else {
                    self.charge_queued(charge);
                }
                self.items += 1;
                self.bytes += weight as u64;
                self.budget.charge(charge);
                taken += 1;
            }
        }
        // The failed message leaves `batch` too, and is dropped.
        let removed = taken + usize::from(failed.is_some() && !untried);
        if queueing {
            self.queue.extend(batch.drain(..taken));
            batch.drain(..removed - taken);
        } else {
            batch.drain(..removed);
        }
        if direct > 0 {
            core.counters.sent.fetch_add(direct, Ordering::Relaxed);
        }
        // The sends processed libzmq's commands: re-check for the receiver.
        core.after_op(Dir::Out);
        if let Some(e) = failed {
            return Err(e);
        }
        Ok((taken, refused))
    }

    async fn ready_inner(&mut self) -> Result<(), FlowError> {
        self.core()?;
        poll_fn(|cx| self.budget.poll_proceed(cx)).await;
        if self.queue.is_empty() {
            // Nothing to push into libzmq, and an empty queue is never paused.
            return Ok(());
        }
        let mut waited = false;
        loop {
            // After a refusal, retry only every RETRY_EVERY calls until the
            // queue reaches the high watermark: a sender at the HWM then pays
            // one refused send per RETRY_EVERY messages, not one per message.
            if self.refused == 0 || self.refused >= RETRY_EVERY {
                self.drain()?;
            } else {
                self.refused += 1;
            }
            // An empty queue is never paused (0 <= low); skip the gate's lock.
            if self.queue.is_empty() || !self.paused {
                if waited {
                    self.budget.reset();
                }
                return Ok(());
            }
            waited = true;
            // Boxed: the wait's futures (a `Notified`, the fd's readiness)
            // would otherwise make every `send` future, moved once per
            // message, several times larger. A wait is not per message.
            Box::pin(self.wait_writable()).await?;
            self.refused = 0;
        }
    }
}

#[async_trait]
impl Sink for ZmqSink {
    type Item = Multipart;

    async fn ready(&mut self) -> Result<(), FlowError> {
        ZmqSink::ready(self).await
    }

    async fn send(&mut self, item: Multipart) -> Result<(), FlowError> {
        self.send_inner(item).await
    }

    fn start_send(&mut self, item: Multipart) -> Result<(), FlowError> {
        let core = match &self.core {
            Some(c) if !self.closed => c,
            _ => return Err(FlowError::Closed),
        };
        if !core.kind.can_send() {
            return Err(ZmqError::Unsupported {
                op: "send",
                socket: core.kind.name(),
            }
            .into());
        }
        if item.is_empty() {
            return Err(ZmqError::EmptyMessage.into());
        }
        let weight = item.weight();
        let charge = charge_of(&item);
        if self.queue.is_empty() {
            // Fast path: straight into libzmq, nothing buffered here.
            let sent = core.try_send(&item)?;
            if Self::account(core, sent) {
                if sent == Sent::Taken {
                    core.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                self.items += 1;
                self.bytes += weight as u64;
                self.budget.charge(charge);
                return Ok(());
            }
        }
        if self.queue.is_empty() {
            self.refused = 1;
        }
        self.charge_queued(charge);
        self.items += 1;
        self.bytes += weight as u64;
        self.budget.charge(charge);
        self.queue.push_back(item);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), FlowError> {
        loop {
            self.drain()?;
            if self.queue.is_empty() {
                return Ok(());
            }
            self.wait_writable().await?;
        }
    }

    /// Flushes the queue into libzmq (waiting at most the linger), then closes
    /// the sending side. If the source half is gone too, the libzmq socket is
    /// closed; with a private context `close` then waits until libzmq has sent
    /// every message or the linger has expired.
    ///
    /// A queued message libzmq rejects for good (an unroutable ROUTER
    /// message) is dropped and the flush goes on with the messages behind it.
    /// Every message accepted is then either handed to libzmq or counted in
    /// the error, and `stats().buffered` is 0 afterwards, even after an error.
    ///
    /// # Errors
    /// [`ZmqError::Unsent`] if messages the sink had accepted were dropped
    /// (how many, their bytes, and the first error as its source: the
    /// linger's [`FlowError::Timeout`], [`ZmqError::Unroutable`], ...);
    /// the first error itself if none were.
    async fn close(&mut self) -> Result<(), FlowError> {
        if self.closed || self.core.is_none() {
            self.closed = true;
            return Ok(());
        }
        let linger = self.core()?.linger;
        let rejected_before = self.rejected;
        let mut first = None;
        let flushing = self.flush_for_close(&mut first);
        match linger {
            Some(l) => {
                if tokio::time::timeout(l, flushing).await.is_err() {
                    first.get_or_insert(FlowError::Timeout(l));
                }
            }
            None => flushing.await,
        }
        self.closed = true;
        let (mut messages, mut bytes) = self.discard_queue();
        messages += self.rejected.0 - rejected_before.0;
        bytes += self.rejected.1 - rejected_before.1;
        self.gate.close();
        if let Some(core) = self.core.take()
            && let Ok(mut core) = Arc::try_unwrap(core)
        {
            let (sock, ctx) = core.take_parts();
            match tokio::task::spawn_blocking(move || finish(sock, ctx)).await {
                Ok(()) => tracing::info!("zmq socket closed"),
                Err(e) => {
                    first.get_or_insert(FlowError::transport(format!("linger task failed: {e}")));
                }
            }
        }
        match first {
            None if messages == 0 => Ok(()),
            None => Err(ZmqError::Unsent {
                messages,
                bytes,
                source: FlowError::Closed,
            }
            .into()),
            Some(e) if messages == 0 => Err(e),
            Some(e) => Err(ZmqError::Unsent {
                messages,
                bytes,
                source: e,
            }
            .into()),
        }
    }

    /// `buffered`, `max_buffered`, `paused` and `pauses` are those of the
    /// sink's own queue (messages libzmq refused at its HWM); `items` and
    /// `bytes` count every message accepted.
    fn stats(&self) -> FlowStats {
        let mut s = self.gate.stats();
        s.buffered += self.uncharged;
        s.max_buffered = s.max_buffered.max(s.buffered);
        s.items = self.items;
        s.bytes = self.bytes;
        s
    }
}

/// The receiving half of a [`ZmqSocket`]. Items are [`Multipart`] messages;
/// on a ROUTER, frame 0 is the sender's routing id.
///
/// # Backpressure
/// Nothing is buffered here: a message leaves libzmq's queue only when
/// `recv` returns it, so RCVHWM (and then the sender's SNDHWM) carries the
/// pause to the peer. [`stats`](Source::stats) therefore reports `buffered`
/// (and `max_buffered`) 0: the messages waiting in libzmq's receive queue (up
/// to RCVHWM) and in the kernel's socket buffer are not ours to count.
///
/// # Memory
/// Frames of up to 512 bytes are copied into a shared 16 KiB receive buffer
/// (one reference count per frame instead of one allocation): a received
/// small frame that the application keeps alive keeps its 16 KiB buffer
/// alive with it. Larger frames up to 4 KiB get an allocation of their own;
/// above that, a frame keeps libzmq's own buffer (no copy).
///
/// # Closing
/// [`close`](ZmqSource::close) ends this half: later `recv` calls return
/// [`FlowError::Closed`]. Dropping the source does the same without waiting.
///
/// # Fairness
/// Every `recv` and every `recv_many` call consumes one unit of tokio's coop
/// budget (a `recv_many` batch one unit in all, as tokio's own mpsc
/// `recv_many` does), and every message is charged to the [`Fairness`]
/// budget of items and bytes; a batch ends when that slice is spent, and
/// when either budget is spent the next call yields once, even if libzmq has
/// more messages (the PyZMQ asyncio starvation cannot happen).
///
/// # End of stream
/// A ZeroMQ socket has no end: `recv` never returns `Ok(None)`.
#[derive(Debug)]
pub struct ZmqSource {
    /// `None` once closed.
    core: Option<Arc<Core>>,
    kind: SocketType,
    endpoints: Vec<String>,
    counters: Arc<Counters>,
    budget: Budget,
    frames: Option<usize>,
    wm: Watermarks,
    items: u64,
    bytes: u64,
    /// Built by `into_source`: no sink half ever existed, so no other
    /// operation can consume this half's wake-up edge. (A source from
    /// `split` never is, even once the sink is gone: the sink's last
    /// operation may have consumed the edge before this half raised its
    /// waiting flag, and only the `ZMQ_EVENTS` check would see it.)
    alone: bool,
}

impl ZmqSource {
    /// Adds a SUB subscription (topic prefix).
    pub fn subscribe(&self, topic: &[u8]) -> Result<(), FlowError> {
        self.sub_op(topic, true)
    }

    /// Removes a SUB subscription.
    pub fn unsubscribe(&self, topic: &[u8]) -> Result<(), FlowError> {
        self.sub_op(topic, false)
    }

    fn sub_op(&self, topic: &[u8], add: bool) -> Result<(), FlowError> {
        if self.kind != SocketType::Sub {
            return Err(ZmqError::Unsupported {
                op: if add { "subscribe" } else { "unsubscribe" },
                socket: self.kind.name(),
            }
            .into());
        }
        let core = self.core()?;
        core.with_sock(|s| {
            if add {
                s.subscribe(topic)
            } else {
                s.unsubscribe(topic)
            }
        })?;
        // Subscribing processed commands: a waiting direction may need a look.
        core.events(None)?;
        Ok(())
    }

    /// Counters beyond [`FlowStats`].
    pub fn zmq_stats(&self) -> ZmqStats {
        let mut s = self.counters.snapshot();
        s.recv_yields = self.budget.yields();
        s
    }

    /// The socket's endpoints (see [`ZmqSocket::endpoints`]).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// True once [`close`](Self::close) has run.
    pub fn is_closed(&self) -> bool {
        self.core.is_none()
    }

    /// Closes the receiving half and releases its share of the socket.
    /// Idempotent; later `recv` calls return [`FlowError::Closed`].
    ///
    /// If the sink half is gone (dropped or closed) too, the libzmq socket is
    /// closed here: messages still in libzmq's receive queue (never returned
    /// by `recv`, so never accepted) are discarded with it, and with a
    /// private context this waits (off the async threads) until libzmq has
    /// terminated, which for a socket with nothing left to send is at once.
    /// If the sink half is still open, the socket stays open for it: incoming
    /// messages then wait in libzmq's receive queue, bounded by RCVHWM (a
    /// full queue pauses the peer, or drops for PUB/SUB), and are discarded
    /// when the sink closes the socket. Every message `recv` returned before
    /// `close` is the caller's and is unaffected.
    ///
    /// # Errors
    /// [`FlowError::Transport`] if the task that closes the socket panicked.
    pub async fn close(&mut self) -> Result<(), FlowError> {
        let Some(core) = self.core.take() else {
            return Ok(());
        };
        if let Ok(mut core) = Arc::try_unwrap(core) {
            let (sock, ctx) = core.take_parts();
            tokio::task::spawn_blocking(move || finish(sock, ctx))
                .await
                .map_err(|e| FlowError::transport(format!("linger task failed: {e}")))?;
            tracing::info!(socket = self.kind.name(), "zmq socket closed");
        }
        Ok(())
    }
}

impl ZmqSource {
    fn core(&self) -> Result<&Arc<Core>, FlowError> {
        self.core.as_ref().ok_or(FlowError::Closed)
    }

    fn unsupported(&self) -> Result<(), FlowError> {
        if self.kind.can_recv() {
            return Ok(());
        }
        Err(ZmqError::Unsupported {
            op: "recv",
            socket: self.kind.name(),
        }
        .into())
    }

    /// Checks and charges a message libzmq handed over (the caller counts
    /// it in [`ZmqStats::received`]).
    #[inline]
    fn accept(&mut self, msg: &Multipart) -> Result<(), FlowError> {
        let weight = msg.weight();
        self.budget.charge(charge_of(msg));
        if let Some(expected) = self.frames
            && msg.len() != expected
        {
            return Err(self.frame_error(expected, msg.len()));
        }
        self.items += 1;
        self.bytes += weight as u64;
        Ok(())
    }

    #[cold]
    fn frame_error(&self, expected: usize, actual: usize) -> FlowError {
        self.counters.frame_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(expected, actual, "zmq recv: wrong frame count");
        ZmqError::FrameCount { expected, actual }.into()
    }

    /// Waits until libzmq has a message, then takes up to `max` (>= 1) under
    /// one lock of the socket. Spends one unit of tokio's coop budget per
    /// call; every message is charged to the [`Fairness`] budget, and the
    /// batch ends early when that slice is spent (the next call then yields
    /// before it takes anything).
    async fn recv_batch(&mut self, buf: &mut impl Batch, max: usize) -> Result<usize, FlowError> {
        self.unsupported()?;
        // One coop unit for the whole batch (as tokio's own mpsc `recv_many`
        // does), and a forced yield here if the previous batch spent the slice.
        poll_fn(|cx| self.budget.poll_proceed(cx)).await;
        let mut waited = false;
        let mut waited_at_once = false;
        loop {
            let n = self.take_ready(buf, max, waited)?;
            if n > 0 {
                return Ok(n);
            }
            if waited_at_once {
                // ZMQ_EVENTS said readable, yet nothing came: yield, do not spin.
                tokio::task::yield_now().await;
            }
            waited = true;
            // `take_ready` just got EAGAIN; a source alone on its socket
            // (no sink half ever) skips the check that would repeat it.
            waited_at_once = self.core()?.wait(Dir::In, !self.alone).await?;
        }
    }

    /// Takes up to `max` messages that libzmq has ready, under one lock of
    /// the socket, while the fairness slice lasts (the first message is
    /// always taken: the caller's `poll_proceed` found the slice open).
    /// `waited`: the caller slept for the first message, which ended the
    /// previous slice (a natural yield).
    fn take_ready(
        &mut self,
        buf: &mut impl Batch,
        max: usize,
        waited: bool,
    ) -> Result<usize, FlowError> {
        let core = self.core()?.clone();
        let mut n = 0;
        let mut received = 0u64;
        let taken = {
            let mut guard = core.lock()?;
            let sock = guard.as_mut().ok_or(FlowError::Closed)?;
            loop {
                if n == max || (n > 0 && self.budget.spent()) {
                    break Ok(());
                }
                match sock.try_recv(self.frames) {
                    Ok(Some(msg)) => {
                        received += 1;
                        if received == 1 && waited {
                            self.budget.reset();
                        }
                        if let Err(e) = self.accept(&msg) {
                            break Err(e);
                        }
                        buf.put(msg);
                        n += 1;
                    }
                    Ok(None) => break Ok(()),
                    Err(ZmqError::FrameCount { expected, actual }) => {
                        // Too many frames: libzmq handed the message over,
                        // and it was released frame by frame, not kept.
                        received += 1;
                        if received == 1 && waited {
                            self.budget.reset();
                        }
                        self.budget.charge(MIN_CHARGE);
                        break Err(self.frame_error(expected, actual));
                    }
                    Err(e) => break Err(FlowError::from(e)),
                }
            }
        };
        if received > 0 {
            self.counters
                .received
                .fetch_add(received, Ordering::Relaxed);
        }
        // The receives processed libzmq's commands: re-check for the sender.
        core.after_op(Dir::In);
        taken.map(|()| n)
    }
}

/// Where a receive puts its messages: a caller's `Vec` (`recv_many`) or a
/// single slot (`recv`, which so needs no allocation of its own).
trait Batch: Send {
    fn put(&mut self, msg: Multipart);
}

impl Batch for Vec<Multipart> {
    fn put(&mut self, msg: Multipart) {
        self.push(msg);
    }
}

impl Batch for Option<Multipart> {
    fn put(&mut self, msg: Multipart) {
        *self = Some(msg);
    }
}

#[async_trait]
impl Source for ZmqSource {
    type Item = Multipart;

    /// The next message. Never `Ok(None)`: a ZeroMQ socket has no end.
    ///
    /// # Errors
    /// [`ZmqError::FrameCount`] for a message of the wrong frame count (it is
    /// consumed, the next call returns the next message),
    /// [`ZmqError::Unsupported`] on a socket type that cannot receive,
    /// [`FlowError::Closed`] after [`close`](ZmqSource::close).
    async fn recv(&mut self) -> Result<Option<Multipart>, FlowError> {
        let mut one = None;
        self.recv_batch(&mut one, 1).await?;
        Ok(one)
    }

    /// Waits for one message, then takes up to `max` in all that libzmq has
    /// ready, under one lock of the socket. The batch spends one unit of
    /// tokio's coop budget; each message is charged to the fairness budget,
    /// and the batch stops early, without waiting, when that slice is spent
    /// (the next call then yields first), so a batch never holds more than
    /// `Fairness::max_items` messages or more than `max_bytes` plus one
    /// message. The fast path for small messages: one boxed future, one
    /// lock and one coop unit per batch instead of per message.
    ///
    /// # Errors
    /// As `recv`; messages appended before the error stay in `buf`.
    async fn recv_many(
        &mut self,
        buf: &mut Vec<Multipart>,
        max: usize,
    ) -> Result<usize, FlowError> {
        if max == 0 {
            return Ok(0);
        }
        self.recv_batch(buf, max).await
    }

    fn stats(&self) -> FlowStats {
        let mut s = FlowStats::empty(self.wm);
        s.items = self.items;
        s.bytes = self.bytes;
        s
    }
}

/// The pyzmq peer fixture of the integration tests, for the unit tests
/// that inject a fault into a conversation with pyzmq.
#[cfg(test)]
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/it/peer.rs"]
mod test_peer;

#[cfg(test)]
mod tests {
    use super::test_peer as peer;
    use super::*;

    #[test]
    fn hwm_is_high_watermark_over_expected_size_rounded_up() {
        let wm = Watermarks::new(0, 1000).unwrap();
        let b = SocketBuilder::new(SocketType::Push).watermarks(wm);
        assert_eq!(b.clone().expected_message_size(100).derived_hwm(), 10);
        assert_eq!(b.clone().expected_message_size(300).derived_hwm(), 4);
        assert_eq!(b.clone().expected_message_size(5000).derived_hwm(), 1);
        assert_eq!(b.expected_message_size(0).derived_hwm(), 1000);
        // Defaults: 512 KiB / 1 KiB.
        assert_eq!(SocketBuilder::new(SocketType::Pull).derived_hwm(), 512);
    }

    #[test]
    fn max_message_size_defaults_to_high_or_expected_size_with_a_floor() {
        let b = SocketBuilder::new(SocketType::Pull);
        assert_eq!(
            b.effective_max_message_size(),
            Some(MIN_DEFAULT_MAX_MESSAGE_SIZE)
        );
        let wm = Watermarks::new(0, 8 << 20).unwrap();
        let b = b.watermarks(wm);
        assert_eq!(b.effective_max_message_size(), Some(8 << 20));
        let b = b.expected_message_size(16 << 20);
        assert_eq!(b.effective_max_message_size(), Some(16 << 20));
        assert_eq!(
            b.clone()
                .max_message_size(Some(100))
                .effective_max_message_size(),
            Some(100)
        );
        assert_eq!(b.max_message_size(None).effective_max_message_size(), None);
    }

    /// A PAIR pair over inproc: (`a`'s halves, `b`'s halves).
    fn pair(ctx: &Context, name: &str) -> ((ZmqSink, ZmqSource), (ZmqSink, ZmqSource)) {
        let ep = format!("inproc://{name}");
        let a = SocketBuilder::new(SocketType::Pair)
            .context(ctx)
            .bind(ep.clone())
            .build()
            .unwrap()
            .split();
        let b = SocketBuilder::new(SocketType::Pair)
            .context(ctx)
            .connect(ep)
            .build()
            .unwrap()
            .split();
        (a, b)
    }

    /// Waits until libzmq has a message for `rx`.
    async fn until_readable(rx: &ZmqSource) {
        let core = rx.core().unwrap();
        while !core.events(None).unwrap().readable {
            core.wait(Dir::In, true).await.unwrap();
        }
    }

    fn fail_events(core: &Core, fail: bool) {
        core.with_sock(|s| {
            s.fail_events = fail;
            Ok(())
        })
        .unwrap();
    }

    fn one(s: &'static str) -> Multipart {
        Multipart::from(Bytes::from_static(s.as_bytes()))
    }

    /// Issue 15 "also fix": `take_ready` took a message, then failed on the
    /// `ZMQ_EVENTS` read done for a waiting sink half, and returned that
    /// error: the message was lost.
    #[tokio::test]
    async fn recv_keeps_a_taken_message_when_the_events_check_fails() {
        let ctx = Context::new();
        let ((_a_tx, mut a_rx), (mut b_tx, _b_rx)) = pair(&ctx, "events-fail-recv");
        b_tx.send(one("m0")).await.unwrap();
        b_tx.send(one("m1")).await.unwrap();
        until_readable(&a_rx).await;
        let core = a_rx.core().unwrap().clone();
        // The sink half waits for room: every receive re-checks the events for it.
        core.waiting_out.store(true, Ordering::SeqCst);
        fail_events(&core, true);
        let got = a_rx.recv().await;
        assert!(
            matches!(&got, Ok(Some(m)) if *m == one("m0")),
            "the taken message must be returned, got {got:?}"
        );
        assert_eq!(a_rx.stats().items, 1);
        // The waiting half is woken, to meet the error in its own operation.
        assert!(
            futures::FutureExt::now_or_never(core.notify_out.notified()).is_some(),
            "the waiting sink half was not woken"
        );
        fail_events(&core, false);
        core.waiting_out.store(false, Ordering::SeqCst);
        assert_eq!(a_rx.recv().await.unwrap(), Some(one("m1")), "nothing lost");
    }

    /// The send side of the same: a message libzmq took was reported as an
    /// error (and not counted) when the events check after it failed, so a
    /// caller that retried sent it twice.
    #[tokio::test]
    async fn start_send_counts_a_sent_message_when_the_events_check_fails() {
        let ctx = Context::new();
        let ((mut a_tx, a_rx), (_b_tx, mut b_rx)) = pair(&ctx, "events-fail-send");
        let core = a_rx.core().unwrap().clone();
        // The source half waits for a message: every send re-checks for it.
        core.waiting_in.store(true, Ordering::SeqCst);
        fail_events(&core, true);
        a_tx.ready().await.unwrap();
        let sent = Sink::start_send(&mut a_tx, one("m0"));
        assert!(sent.is_ok(), "libzmq took the message, yet: {sent:?}");
        assert_eq!(a_tx.stats().items, 1);
        assert_eq!(a_tx.zmq_stats().sent, 1);
        assert!(
            futures::FutureExt::now_or_never(core.notify_in.notified()).is_some(),
            "the waiting source half was not woken"
        );
        fail_events(&core, false);
        core.waiting_in.store(false, Ordering::SeqCst);
        assert_eq!(b_rx.recv().await.unwrap(), Some(one("m0")));
    }

    /// Issue 15 "also fix": a multipart send that failed after its first
    /// frame left libzmq mid-message, and the next message sent on the
    /// socket was glued to the broken one (the peer got one message with the
    /// frames of both). libzmq cannot abort a started message, so the
    /// socket now refuses every later send with the error that broke it.
    #[tokio::test]
    async fn multipart_send_failing_mid_message_refuses_the_next_send_instead_of_gluing() {
        let mut peer = peer::Peer::start(&[
            "pull",
            "--bind",
            "tcp://127.0.0.1:*",
            "--count",
            "2",
            "--progress",
        ]);
        let mut tx = SocketBuilder::new(SocketType::Push)
            .connect(peer.endpoint.clone())
            .build()
            .unwrap()
            .into_sink();
        tx.send(peer::message(0, 16)).await.unwrap();
        // Message 1 fails at its frame 1: frame 0 is in libzmq already.
        tx.core()
            .unwrap()
            .with_sock(|s| {
                s.fail_send_at = Some(1);
                Ok(())
            })
            .unwrap();
        let err = tx.send(peer::message(1, 16)).await.unwrap_err();
        assert!(
            matches!(
                err.transport_error::<ZmqError>(),
                Some(ZmqError::BrokenSend {
                    frame: 1,
                    frames: 2,
                    ..
                })
            ),
            "{err:?}"
        );
        // Sent on this socket, it would reach the peer glued to frame 0 of
        // the broken message.
        let again = tx.send(peer::message(1, 16)).await;
        assert!(
            matches!(&again, Err(e) if matches!(e.transport_error::<ZmqError>(), Some(ZmqError::BrokenSend { .. }))),
            "the socket took a message behind a broken one: {again:?}"
        );
        assert_eq!(tx.stats().items, 1, "only message 0 was accepted");
        // Closing drops the unfinished message (libzmq rolls it back).
        tx.close().await.unwrap();
        // The new socket's message must not overtake message 0.
        peer.wait_line("GOT 0");
        // A new socket goes on where the broken one stopped.
        let mut tx = SocketBuilder::new(SocketType::Push)
            .connect(peer.endpoint.clone())
            .build()
            .unwrap()
            .into_sink();
        tx.send(peer::message(1, 16)).await.unwrap();
        tx.close().await.unwrap();
        peer.expect_ok(2); // it checked both messages, in order
    }

    /// The receive side: an error on frame i > 0 returned at once, and the
    /// next `recv` returned the broken message's remaining frames as a
    /// message of their own. They are skipped before the error is returned.
    #[tokio::test]
    async fn multipart_recv_failing_mid_message_skips_its_remaining_frames() {
        let mut rx = SocketBuilder::new(SocketType::Pull)
            .bind("tcp://127.0.0.1:*")
            .build()
            .unwrap()
            .into_source();
        let ep = rx.endpoints()[0].clone();
        let peer = peer::Peer::start(&["push", "--connect", &ep, "--count", "3"]);
        until_readable(&rx).await;
        rx.core()
            .unwrap()
            .with_sock(|s| {
                s.fail_recv_at = Some(1);
                Ok(())
            })
            .unwrap();
        let err = rx.recv().await.unwrap_err();
        assert!(err.to_string().contains("recv (next frame)"), "{err}");
        let next = rx.recv().await.unwrap().unwrap();
        assert_eq!(
            next,
            peer::message(1, 16),
            "the rest of the broken message 0 came back as a message"
        );
        let mut buf = Vec::new();
        rx.recv_many(&mut buf, 8).await.unwrap();
        assert_eq!(buf, vec![Multipart::from(peer::message(2, 16))]);
        peer.expect_ok(3);
    }
}
