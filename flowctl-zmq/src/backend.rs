//! The only module that calls `zmq::` (libzmq through the `zmq` crate).
//!
//! Everything above this module sees plain Rust types: [`RawSocket`] with
//! non-blocking `try_send`/`try_recv`, [`Events`], the socket's notification
//! file descriptor, and [`ZmqError`] values. Swapping the backend (a newer
//! `zmq` crate, raw `zmq-sys`, another binding) means rewriting this file only.
//!
//! What we rely on in libzmq 4.3 (read from the `zmq` 0.10 / `zmq-sys` 0.12
//! sources and libzmq's `socket_base.cpp`, `xpub.cpp`, `pipe.cpp`):
//! - `ZMQ_FD` is an edge-triggered notification descriptor (an eventfd of the
//!   socket's command mailbox), not a data descriptor: it signals "something
//!   changed", and reading `ZMQ_EVENTS` or calling send/recv processes the
//!   pending commands and drains it. So the state must be re-checked with
//!   `ZMQ_EVENTS` after every wake-up and after every operation.
//! - Multipart messages are atomic: if the first frame is accepted with
//!   `ZMQ_DONTWAIT`, the others are too (the HWM counts whole messages), and a
//!   receiver that got the first frame has the others queued. The exceptions
//!   (a later frame failing) are handled in `break_send` and
//!   `abandon_message`.
//! - A PUB socket drops at SNDHWM silently. With `ZMQ_XPUB_NODROP` (which PUB
//!   honours, `pub_t` derives from `xpub_t`) the send fails with `EAGAIN`
//!   instead, which is how we count drops. The `zmq` crate has no setter for
//!   it, so it is set through `zmq_sys::zmq_setsockopt`.
//! - `zmq::Socket::bind`/`connect` panic on an endpoint containing a NUL byte
//!   (`CString::new(..).unwrap()`): endpoints are checked before the call.
//! - `zmq::Context` terminates (`zmq_ctx_term`) when its last clone is dropped,
//!   and that blocks until every socket's linger has expired: dropping a
//!   socket and its context is done off the async threads.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::error::ZmqError;
use crate::multipart::Multipart;

/// A libzmq context (its I/O thread and its inproc namespace).
#[derive(Clone)]
pub(crate) struct RawContext(zmq::Context);

impl std::fmt::Debug for RawContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawContext")
    }
}

impl RawContext {
    pub(crate) fn new() -> Self {
        RawContext(zmq::Context::new())
    }
}

/// The libzmq version this binary is linked to, as (major, minor, patch).
pub(crate) fn version() -> (i32, i32, i32) {
    zmq::version()
}

/// The socket patterns flowctl supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SocketType {
    /// Sends to connected PULL peers, round robin; blocks at SNDHWM.
    Push,
    /// Receives from PUSH peers, fair-queued.
    Pull,
    /// Publishes to SUB peers; drops at SNDHWM (counted in [`ZmqStats::dropped`](crate::ZmqStats::dropped)).
    Pub,
    /// Receives what matches its subscriptions.
    Sub,
    /// Asynchronous request side: round robin out, fair-queued in.
    Dealer,
    /// Asynchronous reply side: frame 0 of every message is the peer's routing id.
    Router,
    /// Exclusive one-to-one pair.
    Pair,
    /// Strict request/reply client (send, recv, send, recv ...).
    Req,
    /// Strict request/reply server (recv, send, recv, send ...).
    Rep,
}

impl SocketType {
    fn raw(self) -> zmq::SocketType {
        match self {
            SocketType::Push => zmq::PUSH,
            SocketType::Pull => zmq::PULL,
            SocketType::Pub => zmq::PUB,
            SocketType::Sub => zmq::SUB,
            SocketType::Dealer => zmq::DEALER,
            SocketType::Router => zmq::ROUTER,
            SocketType::Pair => zmq::PAIR,
            SocketType::Req => zmq::REQ,
            SocketType::Rep => zmq::REP,
        }
    }

    /// The ZeroMQ name of the pattern ("PUSH", "ROUTER", ...).
    pub fn name(self) -> &'static str {
        match self {
            SocketType::Push => "PUSH",
            SocketType::Pull => "PULL",
            SocketType::Pub => "PUB",
            SocketType::Sub => "SUB",
            SocketType::Dealer => "DEALER",
            SocketType::Router => "ROUTER",
            SocketType::Pair => "PAIR",
            SocketType::Req => "REQ",
            SocketType::Rep => "REP",
        }
    }

    /// True for the types that can send.
    pub fn can_send(self) -> bool {
        !matches!(self, SocketType::Pull | SocketType::Sub)
    }

    /// True for the types that can receive.
    pub fn can_recv(self) -> bool {
        !matches!(self, SocketType::Push | SocketType::Pub)
    }
}

impl std::fmt::Display for SocketType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SocketType {
    type Err = ZmqError;

    fn from_str(s: &str) -> Result<Self, ZmqError> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "PUSH" => SocketType::Push,
            "PULL" => SocketType::Pull,
            "PUB" => SocketType::Pub,
            "SUB" => SocketType::Sub,
            "DEALER" => SocketType::Dealer,
            "ROUTER" => SocketType::Router,
            "PAIR" => SocketType::Pair,
            "REQ" => SocketType::Req,
            "REP" => SocketType::Rep,
            _ => {
                return Err(ZmqError::InvalidOption {
                    option: "socket type".into(),
                    value: s.into(),
                    reason: "expected one of PUSH, PULL, PUB, SUB, DEALER, ROUTER, PAIR, REQ, REP"
                        .into(),
                });
            }
        })
    }
}

/// What `ZMQ_EVENTS` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Events {
    pub(crate) readable: bool,
    pub(crate) writable: bool,
}

/// The outcome of a non-blocking send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// libzmq took the whole message.
    Taken,
    /// libzmq would block (the HWM is reached); nothing was sent.
    WouldBlock,
}

/// The socket's notification descriptor, registered with tokio.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NotifyFd(RawFd);

impl AsRawFd for NotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// libzmq's errno as an `io::Error`: an OS errno as the OS error it is;
/// one of libzmq's own (from `ZMQ_HAUSNUMERO` on: `ETERM`, `EFSM`, ...),
/// which the OS cannot name, with libzmq's `zmq_strerror` text.
fn io_error(e: zmq::Error) -> std::io::Error {
    /// The first errno libzmq defines for itself (`zmq.h`).
    const ZMQ_HAUSNUMERO: i32 = 156_384_712;
    if e.to_raw() >= ZMQ_HAUSNUMERO {
        std::io::Error::other(e.message())
    } else {
        std::io::Error::from_raw_os_error(e.to_raw())
    }
}

fn op_err(op: &'static str) -> impl Fn(zmq::Error) -> ZmqError {
    move |e| ZmqError::Socket {
        op,
        source: io_error(e),
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), ZmqError> {
    if endpoint.contains('\0') {
        return Err(ZmqError::InvalidOption {
            option: "endpoint".into(),
            value: endpoint.escape_debug().to_string(),
            reason: "an endpoint must not contain a NUL byte".into(),
        });
    }
    Ok(())
}

fn to_i32(option: &str, value: usize) -> Result<i32, ZmqError> {
    i32::try_from(value).map_err(|_| ZmqError::InvalidOption {
        option: option.into(),
        value: value.to_string(),
        reason: format!("must be at most {}", i32::MAX),
    })
}

/// A kernel buffer size: 1 to `i32::MAX` bytes (libzmq reads 0 and -1 as
/// "the OS default", which is what leaving the option unset means).
fn kernel_buffer(option: &str, bytes: usize) -> Result<i32, ZmqError> {
    if bytes == 0 {
        return Err(ZmqError::InvalidOption {
            option: option.into(),
            value: "0".into(),
            reason: "a kernel buffer must be at least 1 byte (leave it unset for the OS default)"
                .into(),
        });
    }
    to_i32(option, bytes)
}

/// Frames up to this size are copied; larger ones keep libzmq's buffer
/// (`Bytes::from_owner`), which saves a copy of e.g. 64 KiB for one allocation.
const COPY_LIMIT: usize = 4096;

/// Frames up to this size are copied into a shared receive buffer (a slab of
/// [`SLAB_SIZE`] bytes) instead of an allocation of their own: a 100-byte
/// frame then costs a copy and a reference count, not a `malloc` and a `free`.
pub(crate) const SLAB_FRAME_LIMIT: usize = 512;

/// The size of a shared receive buffer. A frame kept by the application keeps
/// its whole slab alive (at most this many bytes per kept frame, as libzmq's
/// own zero-copy decoder does with its 8 KiB batches); once every frame of a
/// slab has been dropped, the slab is reused in place.
pub(crate) const SLAB_SIZE: usize = 16 * 1024;

/// A libzmq message (`zmq_msg_t`), used directly rather than through
/// `zmq::Message` so that a receive costs no more FFI calls than it needs:
/// `zmq_msg_recv` returns the size, so only `zmq_msg_data` and
/// `zmq_msg_more` follow it.
struct RawMsg(zmq_sys::zmq_msg_t);

impl RawMsg {
    #[allow(unsafe_code)]
    fn new() -> Self {
        let mut msg = zmq_sys::zmq_msg_t::default();
        // SAFETY: zmq_msg_init(3) initialises the message it is given (ours,
        // on the stack) and cannot fail. A `zmq_msg_t` is plain data that
        // libzmq addresses only through the pointer of each call, so moving
        // it afterwards is fine (the `zmq` crate's `Message` does the same).
        unsafe { zmq_sys::zmq_msg_init(&mut msg) };
        RawMsg(msg)
    }

    /// The content; `len` is its size as `zmq_msg_recv` returned it.
    #[allow(unsafe_code)]
    fn data(&self, len: usize) -> &[u8] {
        // SAFETY: the message is initialised (`new`) and holds a frame of
        // `len` bytes at zmq_msg_data (libzmq's own buffer, or inline for a
        // short frame), valid until the message is closed or reused, which
        // needs `&mut self`. zmq_msg_data only reads the message despite its
        // `*mut` parameter (the `zmq` crate casts the same way).
        unsafe {
            let ptr = zmq_sys::zmq_msg_data(std::ptr::from_ref(&self.0).cast_mut());
            std::slice::from_raw_parts(ptr.cast::<u8>(), len)
        }
    }

    /// The size of the content.
    #[allow(unsafe_code)]
    fn size(&self) -> usize {
        // SAFETY: the message is initialised; zmq_msg_size only reads it.
        unsafe { zmq_sys::zmq_msg_size(&self.0) }
    }
}

impl Drop for RawMsg {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the message was initialised by `new` (or filled by
        // zmq_msg_recv) and is closed exactly once, here; zmq_msg_close(3)
        // only fails for an invalid message.
        unsafe { zmq_sys::zmq_msg_close(&mut self.0) };
    }
}

/// A large received frame, kept in libzmq's buffer and released when its
/// last `Bytes` drops.
struct MsgOwner(RawMsg);

impl AsRef<[u8]> for MsgOwner {
    fn as_ref(&self) -> &[u8] {
        self.0.data(self.0.size())
    }
}

/// Takes the frame of `len` bytes out of the reusable `scratch` message.
fn take_bytes(scratch: &mut RawMsg, len: usize, slab: &mut BytesMut) -> Bytes {
    if len <= SLAB_FRAME_LIMIT {
        let data = scratch.data(len);
        if slab.capacity() - slab.len() < len {
            // Reuses the slab in place when no frame of it is alive any more,
            // else allocates a fresh one (the old one lives on in its frames).
            slab.clear();
            slab.reserve(SLAB_SIZE);
        }
        slab.extend_from_slice(data);
        slab.split().freeze()
    } else if len <= COPY_LIMIT {
        Bytes::copy_from_slice(scratch.data(len))
    } else {
        // A `zmq_msg_t` is plain data (64 bytes) and Send; a large frame's
        // payload lives on libzmq's heap and is released when the last
        // `Bytes` clone drops the owner.
        Bytes::from_owner(MsgOwner(std::mem::replace(scratch, RawMsg::new())))
    }
}

/// What a failed `zmq_send` of frame `i` of `frames` means: `WouldBlock`
/// for a refused first frame (nothing was sent), else an error.
#[allow(unsafe_code)]
#[cold]
fn send_error(frames: &[Bytes], i: usize) -> Result<Sent, ZmqError> {
    let errno = zmq::Error::from_raw(
        // SAFETY: zmq_errno(3) only reads the calling thread's errno.
        unsafe { zmq_sys::zmq_errno() },
    );
    send_error_errno(frames, i, errno)
}

#[cold]
fn send_error_errno(frames: &[Bytes], i: usize, errno: zmq::Error) -> Result<Sent, ZmqError> {
    match errno {
        zmq::Error::EAGAIN if i == 0 => Ok(Sent::WouldBlock),
        zmq::Error::EHOSTUNREACH => Err(ZmqError::Unroutable {
            routing_id: frames.first().cloned().unwrap_or_default(),
        }),
        e => Err(op_err("send")(e)),
    }
}

/// A libzmq socket (and the context it keeps alive). Send, not Sync: callers
/// keep it behind a mutex.
pub(crate) struct RawSocket {
    sock: zmq::Socket,
    kind: SocketType,
    /// Reused by every receive (zmq_msg_recv releases the previous content).
    scratch: RawMsg,
    /// The shared receive buffer of small frames (see [`SLAB_FRAME_LIMIT`]).
    slab: BytesMut,
    /// Set when a multipart send failed after its first frame: (the frame,
    /// the frame count, libzmq's errno). libzmq cannot abort a started
    /// message, so every later send fails with [`ZmqError::BrokenSend`].
    broken: Option<(usize, usize, zmq::Error)>,
    /// Fault injection for unit tests: `events` fails with `ETERM`, as
    /// libzmq's `ZMQ_EVENTS` does once the context is shutting down (a state
    /// the `zmq` crate gives tests no handle to reach safely).
    #[cfg(test)]
    pub(crate) fail_events: bool,
    /// Fault injection for unit tests: the next multipart send fails at
    /// this frame with `ENOMEM` (`zmq_send` is not called for it), as a
    /// later frame can in libzmq (`ETERM` from a context shutting down,
    /// `ENOMEM`, `EAGAIN` from a peer pipe that died mid-message).
    #[cfg(test)]
    pub(crate) fail_send_at: Option<usize>,
    /// Fault injection for unit tests: the next multipart receive fails at
    /// this frame with `ETERM` (`zmq_msg_recv` is not called for it).
    #[cfg(test)]
    pub(crate) fail_recv_at: Option<usize>,
}

impl std::fmt::Debug for RawSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawSocket")
            .field("kind", &self.kind)
            .finish()
    }
}

impl RawSocket {
    pub(crate) fn new(ctx: &RawContext, kind: SocketType) -> Result<Self, ZmqError> {
        let sock = ctx.0.socket(kind.raw()).map_err(op_err("create socket"))?;
        Ok(RawSocket {
            sock,
            kind,
            scratch: RawMsg::new(),
            slab: BytesMut::new(),
            broken: None,
            #[cfg(test)]
            fail_events: false,
            #[cfg(test)]
            fail_send_at: None,
            #[cfg(test)]
            fail_recv_at: None,
        })
    }

    pub(crate) fn set_sndhwm(&self, msgs: usize) -> Result<(), ZmqError> {
        self.sock
            .set_sndhwm(to_i32("send_hwm", msgs)?)
            .map_err(op_err("set ZMQ_SNDHWM"))
    }

    pub(crate) fn set_rcvhwm(&self, msgs: usize) -> Result<(), ZmqError> {
        self.sock
            .set_rcvhwm(to_i32("recv_hwm", msgs)?)
            .map_err(op_err("set ZMQ_RCVHWM"))
    }

    pub(crate) fn set_sndbuf(&self, bytes: usize) -> Result<(), ZmqError> {
        self.sock
            .set_sndbuf(kernel_buffer("send_buffer", bytes)?)
            .map_err(op_err("set ZMQ_SNDBUF"))
    }

    pub(crate) fn set_rcvbuf(&self, bytes: usize) -> Result<(), ZmqError> {
        self.sock
            .set_rcvbuf(kernel_buffer("recv_buffer", bytes)?)
            .map_err(op_err("set ZMQ_RCVBUF"))
    }

    /// `ZMQ_SNDBUF`; `None` for the OS default (libzmq's -1, or 0 before 4.2).
    pub(crate) fn sndbuf(&self) -> Result<Option<usize>, ZmqError> {
        let v = self.sock.get_sndbuf().map_err(op_err("get ZMQ_SNDBUF"))?;
        Ok(usize::try_from(v).ok().filter(|&b| b > 0))
    }

    /// `ZMQ_RCVBUF`; `None` for the OS default.
    pub(crate) fn rcvbuf(&self) -> Result<Option<usize>, ZmqError> {
        let v = self.sock.get_rcvbuf().map_err(op_err("get ZMQ_RCVBUF"))?;
        Ok(usize::try_from(v).ok().filter(|&b| b > 0))
    }

    /// `ZMQ_MAXMSGSIZE`: the largest frame a peer may send, in bytes;
    /// `None` = no limit (libzmq's -1). libzmq checks a frame's announced
    /// size before it allocates the frame and drops the connection of a
    /// peer that announces more.
    pub(crate) fn set_maxmsgsize(&self, bytes: Option<usize>) -> Result<(), ZmqError> {
        let v = match bytes {
            None => -1,
            Some(b) => i64::try_from(b).map_err(|_| ZmqError::InvalidOption {
                option: "max_message_size".into(),
                value: b.to_string(),
                reason: format!("must be at most {}", i64::MAX),
            })?,
        };
        self.sock
            .set_maxmsgsize(v)
            .map_err(op_err("set ZMQ_MAXMSGSIZE"))
    }

    /// `ZMQ_MAXMSGSIZE`; `None` for no limit.
    pub(crate) fn maxmsgsize(&self) -> Result<Option<usize>, ZmqError> {
        let v = self
            .sock
            .get_maxmsgsize()
            .map_err(op_err("get ZMQ_MAXMSGSIZE"))?;
        Ok(usize::try_from(v).ok())
    }

    /// `None` = wait forever (libzmq's -1).
    pub(crate) fn set_linger(&self, linger: Option<Duration>) -> Result<(), ZmqError> {
        let ms = match linger {
            None => -1,
            Some(d) => to_i32(
                "linger (ms)",
                usize::try_from(d.as_millis()).unwrap_or(usize::MAX),
            )?,
        };
        self.sock.set_linger(ms).map_err(op_err("set ZMQ_LINGER"))
    }

    pub(crate) fn set_routing_id(&self, id: &[u8]) -> Result<(), ZmqError> {
        if id.is_empty() || id.len() > 255 || id[0] == 0 {
            return Err(ZmqError::InvalidOption {
                option: "routing_id".into(),
                value: format!("{} bytes", id.len()),
                reason: "a routing id must be 1 to 255 bytes and must not start with a zero byte"
                    .into(),
            });
        }
        self.sock
            .set_identity(id)
            .map_err(op_err("set ZMQ_ROUTING_ID"))
    }

    pub(crate) fn set_router_mandatory(&self) -> Result<(), ZmqError> {
        self.sock
            .set_router_mandatory(true)
            .map_err(op_err("set ZMQ_ROUTER_MANDATORY"))
    }

    /// Makes a PUB socket report a full subscriber with `EAGAIN` instead of
    /// dropping silently.
    #[allow(unsafe_code)]
    pub(crate) fn set_xpub_nodrop(&mut self) -> Result<(), ZmqError> {
        let one: libc::c_int = 1;
        // SAFETY: `as_mut_ptr` is the live socket owned by `self.sock` (it is
        // closed only when `self.sock` drops, after this call). The option value
        // points to a c_int on our stack for the duration of the call, and its
        // size is passed alongside, as zmq_setsockopt(3) requires for
        // ZMQ_XPUB_NODROP (an int).
        let rc = unsafe {
            zmq_sys::zmq_setsockopt(
                self.sock.as_mut_ptr(),
                zmq_sys::ZMQ_XPUB_NODROP as libc::c_int,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>(),
            )
        };
        if rc == -1 {
            return Err(ZmqError::Socket {
                op: "set ZMQ_XPUB_NODROP",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub(crate) fn subscribe(&self, topic: &[u8]) -> Result<(), ZmqError> {
        self.sock
            .set_subscribe(topic)
            .map_err(op_err("set ZMQ_SUBSCRIBE"))
    }

    pub(crate) fn unsubscribe(&self, topic: &[u8]) -> Result<(), ZmqError> {
        self.sock
            .set_unsubscribe(topic)
            .map_err(op_err("set ZMQ_UNSUBSCRIBE"))
    }

    /// Binds; returns the resolved endpoint (`tcp://127.0.0.1:*` gets its port).
    pub(crate) fn bind(&self, endpoint: &str) -> Result<String, ZmqError> {
        check_endpoint(endpoint)?;
        self.sock.bind(endpoint).map_err(|e| ZmqError::Bind {
            endpoint: endpoint.into(),
            source: io_error(e),
        })?;
        match self.sock.get_last_endpoint() {
            Ok(Ok(resolved)) => Ok(resolved),
            _ => Ok(endpoint.into()),
        }
    }

    pub(crate) fn connect(&self, endpoint: &str) -> Result<(), ZmqError> {
        check_endpoint(endpoint)?;
        self.sock.connect(endpoint).map_err(|e| ZmqError::Connect {
            endpoint: endpoint.into(),
            source: io_error(e),
        })
    }

    pub(crate) fn notify_fd(&self) -> Result<NotifyFd, ZmqError> {
        self.sock
            .get_fd()
            .map(NotifyFd)
            .map_err(op_err("get ZMQ_FD"))
    }

    /// Reads `ZMQ_EVENTS` (this processes pending commands and may consume the
    /// edge on the notification descriptor).
    pub(crate) fn events(&self) -> Result<Events, ZmqError> {
        #[cfg(test)]
        if self.fail_events {
            return Err(op_err("get ZMQ_EVENTS")(zmq::Error::ETERM));
        }
        let ev = self.sock.get_events().map_err(op_err("get ZMQ_EVENTS"))?;
        Ok(Events {
            readable: ev.contains(zmq::POLLIN),
            writable: ev.contains(zmq::POLLOUT),
        })
    }

    /// The error every send returns once a multipart send broke off
    /// mid-message (see [`ZmqError::BrokenSend`]); `None` while it can send.
    pub(crate) fn send_broken(&self) -> Option<ZmqError> {
        self.broken.map(|(frame, frames, e)| ZmqError::BrokenSend {
            frame,
            frames,
            source: io_error(e),
        })
    }

    /// Frame `i` (> 0) of a `frames`-frame message failed with `errno`
    /// after the frames before it were handed to libzmq.
    ///
    /// With `ZMQ_DONTWAIT`, once libzmq took frame 0 a later frame fails
    /// only when the context is shutting down (`ETERM`: the socket is
    /// unusable anyway), on `ENOMEM`, or with `EAGAIN` when the pipe of
    /// the peer the message goes to died between two frames (libzmq's
    /// `lb.cpp`; it then drops the frames that follow up to the end of the
    /// message, whichever message they belong to). libzmq has no call to
    /// abort a started message, and sending the remaining frames would
    /// deliver a message without the failed one, or glue the next message
    /// to this one: the socket's sending side is marked broken instead, and
    /// the unfinished message never reaches a peer (libzmq makes a message
    /// visible to the peer only at its last frame).
    #[cold]
    fn break_send(&mut self, i: usize, frames: usize, errno: zmq::Error) -> ZmqError {
        self.broken = Some((i, frames, errno));
        ZmqError::BrokenSend {
            frame: i,
            frames,
            source: io_error(errno),
        }
    }

    /// Sends every frame with `ZMQ_DONTWAIT`; `WouldBlock` if the first frame
    /// was refused (then nothing was sent).
    ///
    /// Each frame goes through one `zmq_send` call, which copies it into a
    /// libzmq message (the `zmq` crate's `send` takes five FFI calls for
    /// the same: init, data, size, send, close).
    ///
    /// # Errors
    /// [`ZmqError::BrokenSend`] if a frame after the first failed (see
    /// `break_send`), and for every send after that.
    #[allow(unsafe_code)]
    pub(crate) fn try_send(&mut self, frames: &[Bytes]) -> Result<Sent, ZmqError> {
        if let Some(e) = self.send_broken() {
            return Err(e);
        }
        let sock = self.sock.as_mut_ptr();
        if let [frame] = frames {
            // The common case, without the loop's bookkeeping.
            // SAFETY: as in the loop below.
            let rc = unsafe {
                zmq_sys::zmq_send(
                    sock,
                    frame.as_ptr().cast(),
                    frame.len(),
                    zmq_sys::ZMQ_DONTWAIT as libc::c_int,
                )
            };
            if rc >= 0 {
                return Ok(Sent::Taken);
            }
            return send_error(frames, 0);
        }
        let last = frames.len().saturating_sub(1);
        for (i, frame) in frames.iter().enumerate() {
            let flags = if i < last {
                zmq_sys::ZMQ_DONTWAIT | zmq_sys::ZMQ_SNDMORE
            } else {
                zmq_sys::ZMQ_DONTWAIT
            };
            #[cfg(test)]
            if self.fail_send_at == Some(i) {
                self.fail_send_at = None;
                if i == 0 {
                    return send_error_errno(frames, i, zmq::Error::ENOMEM);
                }
                return Err(self.break_send(i, frames.len(), zmq::Error::ENOMEM));
            }
            // SAFETY: `sock` is the live socket owned by `self.sock` (closed
            // only when `self.sock` drops, after this call; `&mut self` makes
            // this the only user). The buffer is `frame`'s, valid for reads of
            // `frame.len()` bytes for the duration of the call; libzmq copies
            // it before returning and keeps no pointer to it (zmq_send(3)).
            let rc = unsafe {
                zmq_sys::zmq_send(
                    sock,
                    frame.as_ptr().cast(),
                    frame.len(),
                    flags as libc::c_int,
                )
            };
            if rc < 0 {
                if i == 0 {
                    return send_error(frames, 0);
                }
                // SAFETY: zmq_errno(3) only reads the calling thread's errno.
                let errno = zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() });
                return Err(self.break_send(i, frames.len(), errno));
            }
        }
        Ok(Sent::Taken)
    }

    /// Receives one frame into `scratch` with `ZMQ_DONTWAIT`: its size and
    /// whether more frames follow; `None` on EAGAIN.
    #[allow(unsafe_code)]
    fn recv_frame(&mut self) -> Result<Option<(usize, bool)>, zmq::Error> {
        // SAFETY: `scratch` is an initialised message owned by `self` and the
        // socket is the live one owned by `self.sock` (`&mut self` makes this
        // the only user of both); zmq_msg_recv(3) releases the message's
        // previous content and fills it.
        let rc = unsafe {
            zmq_sys::zmq_msg_recv(
                &mut self.scratch.0,
                self.sock.as_mut_ptr(),
                zmq_sys::ZMQ_DONTWAIT as libc::c_int,
            )
        };
        if rc < 0 {
            // SAFETY: zmq_errno(3) only reads the calling thread's errno.
            return match zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }) {
                zmq::Error::EAGAIN => Ok(None),
                e => Err(e),
            };
        }
        // zmq_msg_recv returns the size, capped at INT_MAX.
        let len = if rc == libc::c_int::MAX {
            self.scratch.size()
        } else {
            rc as usize
        };
        // SAFETY: as above; zmq_msg_more only reads the message.
        let more = unsafe { zmq_sys::zmq_msg_more(&self.scratch.0) } != 0;
        Ok(Some((len, more)))
    }

    /// Receives one whole multipart message with `ZMQ_DONTWAIT`; `None` on EAGAIN.
    ///
    /// With `max_frames`, a message of more frames is not kept: its frames
    /// past the limit are received and released one by one (the peer
    /// chooses the count, and libzmq holds every frame of a message whatever
    /// their number), and it is reported as [`ZmqError::FrameCount`] with
    /// the whole count. A message of fewer frames is returned (the caller
    /// checks an exact count).
    pub(crate) fn try_recv(
        &mut self,
        max_frames: Option<usize>,
    ) -> Result<Option<Multipart>, ZmqError> {
        let Some((len, mut more)) = self.recv_frame().map_err(op_err("recv"))? else {
            return Ok(None);
        };
        let first = take_bytes(&mut self.scratch, len, &mut self.slab);
        if !more {
            // The common case: a single frame, held inline (no allocation).
            return Ok(Some(Multipart::from(first)));
        }
        let mut frames = Vec::with_capacity(4);
        frames.push(first);
        while more {
            if let Some(max) = max_frames
                && frames.len() >= max
            {
                // At least one frame more than `max` follows.
                let actual = frames.len() + self.skip_rest();
                return Err(ZmqError::FrameCount {
                    expected: max,
                    actual,
                });
            }
            #[cfg(test)]
            let injected = self
                .fail_recv_at
                .take_if(|at| *at == frames.len())
                .is_some();
            #[cfg(not(test))]
            let injected = false;
            let frame = if injected {
                Err(zmq::Error::ETERM)
            } else {
                self.recv_frame()
            };
            // Atomic delivery: the remaining frames are queued already, so
            // DONTWAIT never fails with EAGAIN here; if it did, it is an error.
            match frame {
                Ok(Some((len, next))) => {
                    more = next;
                    frames.push(take_bytes(&mut self.scratch, len, &mut self.slab));
                }
                Ok(None) => return Err(self.abandon_message(zmq::Error::EAGAIN)),
                Err(e) => return Err(self.abandon_message(e)),
            }
        }
        Ok(Some(Multipart::from(frames)))
    }

    /// A frame after the first of a message could not be received: skips
    /// what is left of the message (while `ZMQ_RCVMORE` says more follows),
    /// so that the next receive starts at a message boundary instead of
    /// returning the rest of this one as a message of its own. Returns the
    /// error to report.
    #[cold]
    fn abandon_message(&mut self, e: zmq::Error) -> ZmqError {
        self.skip_rest();
        op_err("recv (next frame)")(e)
    }

    /// Receives and releases the remaining frames of the current message
    /// (while `ZMQ_RCVMORE` says more follows); returns how many. Each frame
    /// goes into `scratch` and is released by the next receive: nothing is
    /// kept. It stops at the last frame, or at the first failure (a socket
    /// whose context is shutting down fails every receive; there is no
    /// boundary left to reach).
    #[cold]
    fn skip_rest(&mut self) -> usize {
        let mut skipped = 0;
        while self.sock.get_rcvmore().unwrap_or(false) {
            match self.recv_frame() {
                Ok(Some(_)) => skipped += 1,
                Ok(None) | Err(_) => break,
            }
        }
        skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libzmq_errnos_read_as_libzmq_words_them() {
        // libzmq's own errnos (ETERM, EFSM, ...) are not the OS's: as raw OS
        // errors they read "Unknown error 156384765".
        let e = op_err("recv (next frame)")(zmq::Error::ETERM);
        assert_eq!(
            e.to_string(),
            "zmq recv (next frame) failed: Context was terminated"
        );
        let e = op_err("send")(zmq::Error::EFSM);
        assert!(!e.to_string().contains("Unknown error"), "{e}");
        // The OS's errnos stay OS errors.
        let ZmqError::Socket { source, .. } = op_err("send")(zmq::Error::ENOMEM) else {
            panic!("op_err makes Socket errors");
        };
        assert_eq!(source.raw_os_error(), Some(libc::ENOMEM));
    }
}
