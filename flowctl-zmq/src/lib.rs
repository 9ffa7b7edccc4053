//! ZeroMQ sockets as fair, HWM-bounded flowctl [`Sink`](flowctl_core::Sink)s
//! and [`Source`](flowctl_core::Source)s on tokio, interoperating with any
//! libzmq peer (pyzmq, czmq, ...).
//!
//! ```
//! use bytes::Bytes;
//! use flowctl_core::prelude::*;
//! use flowctl_zmq::{SocketType, ZmqSocket};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), flowctl_core::FlowError> {
//! let mut rx = ZmqSocket::builder(SocketType::Pull)
//!     .bind("tcp://127.0.0.1:*")
//!     .build()?
//!     .into_source();
//! let endpoint = rx.endpoints()[0].clone();
//! let mut tx = ZmqSocket::builder(SocketType::Push)
//!     .connect(endpoint)
//!     .build()?
//!     .into_sink();
//! tx.send(vec![Bytes::from_static(b"hello"), Bytes::from_static(b"world")].into()).await?;
//! tx.close().await?; // waits until libzmq has sent it (bounded by the linger)
//! let msg = rx.recv().await?.expect("a zmq socket never ends");
//! assert_eq!(msg, vec![Bytes::from_static(b"hello"), Bytes::from_static(b"world")]);
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! libzmq sockets are not file descriptors; each has a *notification*
//! descriptor (`ZMQ_FD`) that is **edge-triggered** and signals only that the
//! socket's state may have changed. Every operation here is non-blocking
//! (`ZMQ_DONTWAIT`); on `EAGAIN` the half waits on the descriptor through
//! [`tokio::io::unix::AsyncFd`], clears the readiness after the wake-up and
//! re-reads `ZMQ_EVENTS` before it sleeps again, so an edge is never lost.
//! A socket's [`ZmqSink`] and [`ZmqSource`] may live in different tasks: a
//! send can consume the edge the receiver waits for (and vice versa), so after
//! every send, receive or events read the other direction, if it waits, is
//! re-checked and woken through its own waker slot (which keeps a permit if
//! the half has not parked yet). Both halves wait on the descriptor's *read*
//! readiness, and `AsyncFd::poll_read_ready` keeps only the waker of its
//! latest caller, so the descriptor is polled with one waker of the socket's
//! that wakes both slots. The libzmq socket (`Send`, not `Sync`) sits behind
//! a mutex shared by the halves.
//!
//! Both halves implement flowctl-core's poll-based traits directly
//! ([`Sink::poll_ready`](flowctl_core::Sink::poll_ready),
//! [`Source::poll_recv`](flowctl_core::Source::poll_recv)): the state of a
//! wait lives in the half, so no future is held or boxed per message, and a
//! half abandoned at `Pending` loses nothing (its waiting flag stays up, which
//! costs the other half an events check per operation, until it is polled
//! again or dropped).
//!
//! # Fairness
//!
//! The PyZMQ asyncio failure (a socket that always has a message never
//! yields, timers starve) cannot happen: every `poll_recv` (and every
//! `poll_ready` of the sink) that does not resume a wait spends one unit of tokio's coop budget and is charged to a
//! [`flowctl_core::Fairness`] budget of items and bytes; when either is spent
//! the call yields once. `recv_many` stops at the end of a slice and the next
//! call yields first, so batching does not skip the yield. `tests/it/fairness.rs`
//! proves it against a raw `AsyncFd` loop: on a current_thread runtime a 1 ms
//! timer next to a flooded PULL keeps (almost) all its ticks with flowctl and
//! gets none while the raw loop drains the same flood.
//!
//! Measured with `cargo run --release -p flowctl-zmq --example bench_zmq`
//! (1,000,000 x 100 B always-ready inproc PULL, 1 ms timer, shared 2-core
//! machine): worst timer stall 1.5 ms with flowctl, against 1.8 ms for a task
//! that only yields (the scheduler's own floor), and no tick at all during
//! the raw loop's drain.
//!
//! # Throughput: batches on both sides, no allocation per message
//!
//! The fast path is a batch call on each side:
//! [`ZmqSink::send_many`] and
//! [`Source::poll_recv_many`](flowctl_core::Source::poll_recv_many) (through
//! [`SourceExt::recv_many`](flowctl_core::SourceExt::recv_many)). Each takes the
//! socket's lock and spends one unit of tokio's coop budget once per round,
//! and still charges every message to the fairness budget (a round ends when
//! the slice is spent). `send_many` hands messages straight to libzmq and,
//! when libzmq refuses one at its SNDHWM, waits for room as a blocking
//! `zmq_send` would: the caller's batch is the queue. A send per message
//! goes through [`SinkExt::send`](flowctl_core::SinkExt::send) (a named
//! future over `poll_ready` and `start_send`, nothing boxed).
//!
//! A [`Multipart`] holds a single frame inline, so neither side allocates per
//! message. A send is one `zmq_send` call per frame, a receive one
//! `zmq_msg_recv` plus `zmq_msg_data` and `zmq_msg_more`. Received frames of
//! up to 512 bytes are copied into a shared 16 KiB buffer (one reference
//! count per frame instead of an allocation; a frame kept alive keeps its
//! 16 KiB buffer alive), frames up to 4 KiB get an allocation of their own
//! and larger frames keep libzmq's buffer.
//!
//! With `examples/bench_zmq.rs` (PUSH -> PULL over tcp loopback, 100-byte
//! messages, `send_many`/`recv_many`) callgrind counts 2953 instructions per
//! message over all threads, against 2571 for raw blocking `zmq` (3746 at the
//! start of 2026-11-22, with `Vec<Bytes>` items and `send`), and
//! `cargo xtask bench --only zmq.push_pull` measured 0.89x to 1.00x of raw
//! blocking libzmq's throughput (0.83x to 0.93x with one `send` per
//! message); 64 KiB messages 0.92x to 0.93x. The crate's reference page
//! (`docs/src/reference/zmq.md`) has the tables and what the rest is.
//!
//! # Backpressure and memory
//!
//! libzmq counts its queues in messages; flowctl in bytes.
//! [`SocketBuilder`] derives `ZMQ_SNDHWM` and `ZMQ_RCVHWM` from the high
//! watermark and an expected message size (`ceil(high / size)`), or takes them
//! explicitly. The sink's own queue (messages libzmq refused at its HWM) is
//! charged in bytes to a [`flowctl_core::gate::GateState`], so a sender holds at
//! most SNDHWM messages in libzmq plus `high` plus one message. A PUB socket
//! cannot wait for a slow subscriber; it drops, and flowctl counts the drops
//! in [`ZmqStats::dropped`], `stats().dropped` and
//! `flowctl_dropped_total{reason="hwm"}` (libzmq's `ZMQ_XPUB_NODROP` turns
//! the silent drop into `EAGAIN`; a counted message reached no subscriber).
//! A source holds no message, so its `stats().buffered` is 0: libzmq's
//! receive queue (up to RCVHWM messages) is not ours to count.
//!
//! # Names, overflow, writability
//!
//! Each half is a named stage, by default `zmq.<endpoint>.<type>` (the first
//! endpoint bound, as resolved, or else connected; e.g.
//! `zmq.tcp://127.0.0.1:5555.push`; the halves of a two-way socket end in
//! `.send`/`.recv`), set with [`SocketBuilder::name`]. The name labels the
//! stage's `tracing` events and metrics.
//!
//! [`SocketBuilder::overflow`] gives the sink an
//! [`Overflow`](flowctl_core::Overflow) policy for its own queue (default
//! `Block`: wait for libzmq's room). Under `DropNewest`, `DropOldest` or
//! `Fail` a send never waits: a message libzmq refuses is queued if it fits
//! under `high`, else dropped (counted in `stats().dropped`) or given back
//! with [`FlowError::Overflow`](flowctl_core::FlowError::Overflow); see
//! [`ZmqSink`](ZmqSink#overflow). The source has no policy: libzmq's receive
//! queue is its buffer, and dropping from it would turn the peer's
//! backpressure into loss. [`Sink::writability`](flowctl_core::Sink::writability)
//! of the sink reports its queue's pause and resume edges.
//!
//! RCVHWM counts messages, not bytes, and libzmq allocates a received frame
//! at the size its header announces: without a limit, one peer announcing a
//! 16 GiB frame makes the process allocate it. [`SocketBuilder`] therefore
//! always sets `ZMQ_MAXMSGSIZE` ([`SocketBuilder::max_message_size`]; by
//! default the largest of `high`, the expected message size and
//! [`MIN_DEFAULT_MAX_MESSAGE_SIZE`], 1 MiB): libzmq drops the connection of
//! a peer that announces a larger frame before allocating anything.
//!
//! The kernel's socket buffers sit outside all of these bounds, and with
//! small messages they hold far more than the HWMs (Linux autotunes TCP
//! buffers up to megabytes), which makes them most of a loaded link's
//! latency. [`SocketBuilder::send_buffer`] and [`SocketBuilder::recv_buffer`]
//! set them (`ZMQ_SNDBUF`/`ZMQ_RCVBUF`); [`ZmqSocket::send_buffer`] and
//! [`ZmqSocket::recv_buffer`] read back what libzmq holds.
//!
//! # Closing without loss
//!
//! [`SinkExt::close`](flowctl_core::SinkExt::close) pushes the sink's queue into
//! libzmq, closes the socket and, when the socket has its own context (the
//! default), waits in `zmq_ctx_term` until libzmq has sent everything or the
//! [linger](SocketBuilder::linger) has expired. Dropping a socket lingers in a
//! background thread instead of blocking the runtime. A queued message
//! libzmq rejects for good (unroutable) does not stop the flush; whatever
//! `close` could not hand to libzmq (the linger expired, a message was
//! rejected) is counted in [`ZmqError::Unsent`], and the sink's
//! `stats().buffered` is 0 afterwards.
//!
//! [`ZmqSource::close`] closes the receiving half: later `recv` calls return
//! [`FlowError::Closed`](flowctl_core::FlowError::Closed), and when the sink
//! half is gone too the socket is closed at once (messages never returned by
//! `recv` are discarded with libzmq's queue; those returned are the
//! caller's). While the sink half is open the socket stays open for it.
//!
//! # Flushing
//!
//! As with `futures::Sink`, a message accepted while libzmq is at its HWM
//! waits in the sink's queue until the sink is used again. Call
//! [`SinkExt::flush`](flowctl_core::SinkExt::flush) before waiting for something
//! else (the reply to a request sent on a DEALER, for instance).
//!
//! # What libzmq does, and what this crate relies on
//!
//! Read from the sources of `zmq` 0.10, `zmq-sys` 0.12 and libzmq 4.3
//! (`socket_base.cpp`, `mailbox.cpp`, `xpub.cpp`, `router.cpp`):
//! - `ZMQ_FD` is the eventfd of the socket's command mailbox. It is signalled
//!   only when a command arrives at a mailbox whose reader went to sleep, so
//!   after `send`/`recv`/`ZMQ_EVENTS` have consumed commands no new edge comes
//!   for state that is already there: always re-check `ZMQ_EVENTS` after
//!   clearing the readiness, never before.
//! - Reading `ZMQ_EVENTS` processes pending commands (and costs a `poll(0)`
//!   syscall when the mailbox is idle); a failed `send` with `ZMQ_DONTWAIT`
//!   processes them only every millisecond or so. Retrying a refused send is
//!   therefore cheaper than asking `ZMQ_EVENTS`, and the sink retries only
//!   every 32nd call until it must wait.
//! - Multipart messages are atomic: once libzmq takes the first frame the
//!   others go in too (the HWM counts whole messages), and a receiver that got
//!   the first frame has the others queued. A later frame can still fail (a
//!   context shutting down, `ENOMEM`, a peer's pipe dying between two
//!   frames), and libzmq cannot abort a started message: the socket then
//!   refuses every later send ([`ZmqError::BrokenSend`]) rather than glue the
//!   next message to the broken one, and a receive that fails after frame 0
//!   skips the rest of its message before returning the error.
//! - PUB drops at SNDHWM without a trace; `ZMQ_XPUB_NODROP` (honoured by PUB,
//!   which derives from XPUB) turns that into `EAGAIN`. The `zmq` crate has no
//!   setter, so it is set through `zmq_sys::zmq_setsockopt`. With NODROP,
//!   libzmq refuses the message for every matching subscriber when one is full.
//! - A ROUTER drops messages to unknown or full peers silently unless
//!   `ZMQ_ROUTER_MANDATORY` is set; flowctl sets it, so an unknown routing id
//!   is [`ZmqError::Unroutable`] and a full peer is backpressure.
//! - `zmq::Socket::bind`/`connect` panic on an endpoint with a NUL byte
//!   (`CString::new(..).unwrap()`); endpoints are checked first.
//! - Dropping the last clone of a `zmq::Context` runs `zmq_ctx_term`, which
//!   blocks until every socket's linger has expired; flowctl drops sockets and
//!   contexts on a separate thread (or in `spawn_blocking` for `close`).
//! - `zmq::Socket` is `Send`, not `Sync`; the halves share it behind a mutex.
//!
//! # Errors and bad input
//!
//! Every public fallible function of this crate, the stage methods and the
//! constructors ([`SocketBuilder::build`], [`SocketBuilder::option`]) alike,
//! returns `Result<_, FlowError>`; the typed [`ZmqError`] is inside
//! [`flowctl_core::FlowError::Transport`] and is read with
//! `err.transport_error::<ZmqError>()`. A bind that fails names the endpoint
//! ([`ZmqError::Bind`]); an unknown option or value is
//! [`ZmqError::InvalidOption`]; with [`SocketBuilder::expect_frames`] a
//! message of another frame count is consumed and reported as
//! [`ZmqError::FrameCount`] (expected and actual), and the next `recv`
//! returns the next message (the stream continues).
//!
//! # Building: system libzmq or bundled
//!
//! `zmq` 0.10 depends on `zmq-sys` 0.12, whose build script *always* compiles
//! the bundled libzmq 4.3.4 through `zeromq-src` (about 4.7 min cold on 2
//! cores); it reads no environment variable and has no feature to link the
//! system library. What it does have is `links = "zmq"`, so Cargo can replace
//! its build script with a link override. The workspace's
//! `.cargo/config.toml` does that for Linux x86_64:
//!
//! ```toml
//! [target.x86_64-unknown-linux-gnu.zmq]
//! rustc-link-lib = ["zmq"]
//! ```
//!
//! which links Debian's `libzmq.so` (package `libzmq3-dev`, installed by
//! `cargo xtask setup`) and skips compiling `zeromq-src` and `cc` altogether
//! (about 1 min cold). To build the bundled libzmq instead (a machine without
//! `libzmq3-dev`), delete that table; any other target triple builds the
//! bundled library anyway. The override cannot be expressed as a cargo
//! feature of this crate (features cannot disable a dependency's build script,
//! and zmq-sys 0.12 has no `vendored` feature to forward to), nor as an
//! environment variable (Cargo reads `target.<triple>.<links>` only from
//! config files and `--config`), which is why it lives in `.cargo/config.toml`.
//! A one-off build can also pass it on the command line:
//! `cargo --config 'target.x86_64-unknown-linux-gnu.zmq.rustc-link-lib=["zmq"]' build`.
//!
//! # Feature flags
//!
//! - `metrics` (off by default): enables flowctl-core's `metrics` feature,
//!   so every named stage reports through the `metrics` facade (install a
//!   recorder before building the sockets). Besides the core metrics, the
//!   sink exports `flowctl_zmq_eagain_total` (sends libzmq refused with
//!   `EAGAIN`) and `flowctl_zmq_send_waits_total` (waits for libzmq's
//!   room). libzmq's socket monitor is not used, so there are no
//!   connect/disconnect counts. The crate's reference pages list them.
//!
//! The libzmq choice is a link override in `.cargo/config.toml`, see above.

// `deny`, not `forbid`: the libzmq option call without a safe wrapper and the
// AsyncFd registration allow it locally, with a `// SAFETY:` comment each.
#![deny(unsafe_code)]

mod backend;
mod error;
pub mod multipart;
mod socket;

pub use backend::SocketType;
pub use error::ZmqError;
pub use multipart::Multipart;

/// Registers the help texts of flowctl-zmq's own metrics (and of the core
/// metrics every stage exports: it calls
/// [`flowctl_core::stage::describe_metrics`]) with the installed recorder.
/// Call once, after installing it. A no-op without the `metrics` feature.
pub fn describe_metrics() {
    use flowctl_core::stage::describe_counter;
    flowctl_core::stage::describe_metrics();
    describe_counter(
        "flowctl_zmq_eagain_total",
        "Sends libzmq refused with EAGAIN (its SNDHWM was reached, or no peer); for a PUB each is also a drop.",
    );
    describe_counter(
        "flowctl_zmq_send_waits_total",
        "Times the sink went to sleep waiting for libzmq's room.",
    );
}
pub use socket::{
    Context, DEFAULT_EXPECTED_MESSAGE_SIZE, DEFAULT_LINGER, MIN_DEFAULT_MAX_MESSAGE_SIZE,
    SocketBuilder, ZmqSink, ZmqSocket, ZmqSource, ZmqStats,
};

/// The libzmq version this binary is linked to, as (major, minor, patch).
pub fn libzmq_version() -> (i32, i32, i32) {
    backend::version()
}
