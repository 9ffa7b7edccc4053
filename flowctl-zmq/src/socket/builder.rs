//! [`SocketBuilder`] and the [`ZmqSocket`] it builds, which splits into the
//! two halves.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use bytes::Bytes;
use flowctl_core::gate::GateState;
use flowctl_core::stage::Stage;
use flowctl_core::{Fairness, FlowError, Overflow, Watermarks};
use tokio::io::unix::AsyncFd;

use super::core::{Core, Counters, Slots};
use super::sink::ZmqSink;
use super::source::ZmqSource;
use super::{Context, DEFAULT_EXPECTED_MESSAGE_SIZE, DEFAULT_LINGER, MIN_DEFAULT_MAX_MESSAGE_SIZE};
use crate::backend::{RawContext, RawSocket, SocketType};
use crate::error::ZmqError;

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
/// [`GateState`](flowctl_core::gate::GateState) with the same watermarks, each message at least
/// [`MIN_CHARGE`](flowctl_core::weighted::MIN_CHARGE) bytes.
///
/// # Names
/// Each half is a named [`Stage`] (its `tracing` events and, with the
/// `metrics` feature, the `stage` label of its metrics). The default name is
/// `zmq.<endpoint>.<type>`, with the first endpoint bound (as libzmq resolved
/// it, with the port chosen for `:*`) or else the first connected, and the
/// socket type in lower case: `zmq.tcp://127.0.0.1:5555.push`
/// (`zmq.<type>` for a socket with no endpoint). [`name`](Self::name) sets
/// it. A type that both sends and receives (PAIR, DEALER, ROUTER, REQ, REP)
/// has two halves with a stage each, so their names end in `.send` (the
/// sink) and `.recv` (the source): `zmq.tcp://127.0.0.1:5555.dealer.send`.
/// A one-way type has only the half it uses named.
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
    name: Option<String>,
    overflow: Overflow,
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
            name: None,
            overflow: Overflow::Block,
        }
    }

    /// Names the socket's stages (default `zmq.<endpoint>.<type>`; see
    /// [Names](SocketBuilder#names)).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// What the sink does with a message when libzmq is at its SNDHWM and
    /// the sink's own queue is at its high watermark (default
    /// [`Overflow::Block`]: wait). See [`ZmqSink`](super::ZmqSink#overflow).
    /// The source has no queue of its own (libzmq's receive queue is its
    /// buffer), so the policy does not apply to it.
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
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
    /// `subscribe`, `bind`, `connect`, `name`, `overflow` (`block`,
    /// `drop_newest`, `drop_oldest`, `fail`).
    ///
    /// # Errors
    /// [`FlowError::Transport`] holding [`ZmqError::InvalidOption`] (read it
    /// with `err.transport_error::<ZmqError>()`) for an unknown name or a
    /// value that does not parse.
    pub fn option(self, name: &str, value: &str) -> Result<Self, FlowError> {
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
            "name" => self.name(value),
            "overflow" => self.overflow(match value {
                "block" => Overflow::Block,
                "drop_newest" => Overflow::DropNewest,
                "drop_oldest" => Overflow::DropOldest,
                "fail" => Overflow::Fail,
                _ => return Err(bad("expected block, drop_newest, drop_oldest or fail").into()),
            }),
            _ => {
                return Err(bad(
                    "unknown option (known: send_hwm, recv_hwm, expected_message_size, max_message_size, linger_ms, send_buffer, recv_buffer, expect_frames, routing_id, subscribe, bind, connect, name, overflow)",
                )
                .into());
            }
        })
    }

    /// The stage names of the sink and the source half, from the
    /// endpoints libzmq resolved: (sink, source), `None` for a half the
    /// socket type cannot use.
    fn stage_names(&self, endpoints: &[String]) -> (Option<String>, Option<String>) {
        let base = self.name.clone().unwrap_or_else(|| {
            let kind = self.kind.name().to_ascii_lowercase();
            match endpoints.first() {
                Some(ep) => format!("zmq.{ep}.{kind}"),
                None => format!("zmq.{kind}"),
            }
        });
        match (self.kind.can_send(), self.kind.can_recv()) {
            (true, true) => (Some(format!("{base}.send")), Some(format!("{base}.recv"))),
            (true, false) => (Some(base), None),
            (false, _) => (None, Some(base)),
        }
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
        let slots = Arc::new(Slots::default());
        let core = Arc::new(Core {
            afd: Some(afd),
            sock: Mutex::new(Some(sock)),
            ctx: Some(ctx),
            kind: self.kind,
            linger: self.linger,
            waiting_in: AtomicBool::new(false),
            waiting_out: AtomicBool::new(false),
            fd_waker: Waker::from(slots.clone()),
            slots,
            counters: counters.clone(),
        });
        let (sink_name, source_name) = self.stage_names(&endpoints);
        // The stages register their metrics with the recorder installed now.
        let sink_stage = sink_name.map(Stage::new);
        let mut source_gate = GateState::new(self.wm, tracing::Span::none());
        if let Some(name) = source_name {
            source_gate.set_stage(Stage::new(name));
        }
        let span = tracing::debug_span!("zmq", socket = self.kind.name());
        Ok(ZmqSocket {
            sink: ZmqSink::new(
                core.clone(),
                counters,
                self.wm,
                self.fairness,
                span,
                sink_stage,
                self.overflow,
            ),
            source: ZmqSource::new(
                core,
                self.kind,
                endpoints,
                source_counters,
                self.fairness,
                self.frames,
                source_gate,
            ),
        })
    }
}

/// A ZeroMQ socket; [`split`](ZmqSocket::split) it into a [`Sink`](flowctl_core::Sink) and a
/// [`Source`](flowctl_core::Source) that may live in different tasks.
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

    /// The stage name of the sink half (`None` for a type that cannot
    /// send); see [Names](SocketBuilder#names).
    pub fn sink_name(&self) -> Option<&str> {
        self.sink.name()
    }

    /// The stage name of the source half (`None` for a type that cannot
    /// receive); see [Names](SocketBuilder#names).
    pub fn source_name(&self) -> Option<&str> {
        self.source.name()
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

#[cfg(test)]
mod tests {
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

    #[test]
    fn stage_names_follow_the_first_endpoint_and_the_type() {
        let eps = ["tcp://127.0.0.1:5555".to_string(), "ipc://x".to_string()];
        let names = |b: SocketBuilder, eps: &[String]| b.stage_names(eps);
        let push = SocketBuilder::new(SocketType::Push);
        assert_eq!(
            names(push.clone(), &eps),
            (Some("zmq.tcp://127.0.0.1:5555.push".into()), None)
        );
        assert_eq!(names(push, &[]), (Some("zmq.push".into()), None));
        assert_eq!(
            names(SocketBuilder::new(SocketType::Sub), &eps),
            (None, Some("zmq.tcp://127.0.0.1:5555.sub".into()))
        );
        assert_eq!(
            names(SocketBuilder::new(SocketType::Dealer), &eps),
            (
                Some("zmq.tcp://127.0.0.1:5555.dealer.send".into()),
                Some("zmq.tcp://127.0.0.1:5555.dealer.recv".into())
            )
        );
        let named = SocketBuilder::new(SocketType::Pair).name("telemetry");
        assert_eq!(
            names(named, &eps),
            (Some("telemetry.send".into()), Some("telemetry.recv".into()))
        );
        let named = SocketBuilder::new(SocketType::Pub).name("ticks");
        assert_eq!(names(named, &eps), (Some("ticks".into()), None));
    }
}
