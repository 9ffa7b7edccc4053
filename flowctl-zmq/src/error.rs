//! The errors of flowctl-zmq.

use bytes::Bytes;
use flowctl_core::FlowError;

/// What can go wrong with a ZeroMQ socket. Converts into
/// [`FlowError::Transport`]; [`FlowError::transport_error`] gets it back to
/// match on it (`err.transport_error::<ZmqError>()`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZmqError {
    /// The endpoint could not be bound (address in use, bad address, ...).
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        /// The endpoint as given.
        endpoint: String,
        /// libzmq's errno.
        #[source]
        source: std::io::Error,
    },
    /// The endpoint could not be connected (malformed, unknown transport, ...).
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint as given.
        endpoint: String,
        /// libzmq's errno.
        #[source]
        source: std::io::Error,
    },
    /// A socket option with a value out of range or unknown.
    #[error("invalid value {value:?} for socket option {option}: {reason}")]
    InvalidOption {
        /// The option's name.
        option: String,
        /// The value given.
        value: String,
        /// What is accepted.
        reason: String,
    },
    /// A message with a different frame count than the socket expects. The
    /// message was consumed; the next `recv` returns the next message.
    #[error("message of {actual} frames where exactly {expected} were expected (message dropped)")]
    FrameCount {
        /// The configured count.
        expected: usize,
        /// The count received.
        actual: usize,
    },
    /// An empty multipart message (no frames) cannot be sent.
    #[error("cannot send a message of 0 frames: a message needs at least one frame")]
    EmptyMessage,
    /// A ROUTER was asked to send to a routing id it has no peer for.
    #[error("no peer with routing id {routing_id:?} is connected to this ROUTER")]
    Unroutable {
        /// Frame 0 of the message.
        routing_id: Bytes,
    },
    /// `close` gave up on messages the sink had accepted: they were dropped
    /// without reaching libzmq (still queued when the flush failed or timed
    /// out, or rejected by libzmq for good, e.g. unroutable). The messages
    /// handed to libzmq before are not counted here.
    #[error(
        "close dropped {messages} accepted messages ({bytes} bytes) that never reached libzmq: {source}"
    )]
    Unsent {
        /// How many messages were dropped.
        messages: u64,
        /// Their payload, in bytes (the sum of their frames' lengths).
        bytes: u64,
        /// Why the flush stopped: the first error it met (a
        /// [`FlowError::Timeout`] of the linger, a [`ZmqError::Unroutable`], ...).
        #[source]
        source: FlowError,
    },
    /// A multipart send failed at frame `frame` (0-based) of `frames`, after
    /// the frames before it were handed to libzmq. libzmq cannot abort a
    /// started message, and the next message sent would be glued to this
    /// one, so the socket refuses every later send with this error (the
    /// unfinished message never reaches a peer). Build a new socket.
    #[error(
        "frame {frame} of a {frames}-frame message failed after the frames before it were sent: libzmq cannot abort a started message, so this socket sends no more ({source})"
    )]
    BrokenSend {
        /// The frame that failed (at least 1).
        frame: usize,
        /// The message's frame count.
        frames: usize,
        /// libzmq's errno.
        #[source]
        source: std::io::Error,
    },
    /// The operation does not exist for this socket type.
    #[error("{op} is not supported by a {socket} socket")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The socket type.
        socket: &'static str,
    },
    /// A libzmq call failed.
    #[error("zmq {op} failed: {source}")]
    Socket {
        /// The libzmq operation.
        op: &'static str,
        /// libzmq's errno.
        #[source]
        source: std::io::Error,
    },
}

impl From<ZmqError> for FlowError {
    fn from(e: ZmqError) -> Self {
        FlowError::transport(e)
    }
}
