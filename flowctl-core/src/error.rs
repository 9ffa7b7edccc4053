//! The one error type of flowctl.

use std::error::Error as StdError;
use std::time::Duration;

/// A boxed error from a transport library (russh, libzmq, async-nats, ...).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Everything that can go wrong while moving items through flowctl.
///
/// Transports wrap their library's errors in [`FlowError::Transport`]; the
/// other variants are produced by flowctl itself and name the thing and the
/// limit involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// The other end of the stream is gone (receiver dropped, sink closed).
    #[error("stream closed: the other end is gone")]
    Closed,
    /// Watermarks that violate `low <= high && high > 0`.
    #[error(
        "invalid watermarks: low {low} must not exceed high {high}, and high must be greater than 0"
    )]
    InvalidWatermarks {
        /// The low watermark given.
        low: usize,
        /// The high watermark given.
        high: usize,
    },
    /// A frame (or the bytes accumulated while waiting for one) is larger than
    /// allowed. Never [transient](FlowError::is_transient).
    #[error("frame of {size} bytes exceeds the {limit} byte limit")]
    FrameTooLarge {
        /// Bytes of the offending frame: the length its header declares for a
        /// length-prefixed codec, else the bytes accumulated without a frame.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A decoder rejected the bytes it was given.
    #[error("malformed frame: {0}")]
    Decode(#[source] BoxError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame: {remaining} bytes of an incomplete frame were left")]
    Truncated {
        /// Bytes left over that did not form a frame.
        remaining: usize,
    },
    /// An operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// An I/O error from a reader, writer or socket.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// An error from a transport library.
    #[error("transport error: {0}")]
    Transport(#[source] BoxError),
    /// A job run by [`offload::ordered`](crate::offload::ordered) panicked.
    #[error("offloaded job panicked: {0}")]
    Panicked(String),
    /// [`pump`](crate::pump()) stopped on an error after delivering part of the stream.
    #[error("pump stopped after delivering {items} items ({bytes} bytes): {source}")]
    Pump {
        /// Items the sink accepted before the error.
        items: u64,
        /// Bytes (by [`Weighted`](crate::Weighted)) the sink accepted before the error.
        bytes: u64,
        /// The first error, from the source or the sink.
        #[source]
        source: Box<FlowError>,
    },
    /// [`lifecycle::retry`](crate::lifecycle::retry) ran out of attempts.
    #[error("gave up after {attempts} attempts: {last}")]
    RetriesExhausted {
        /// How many attempts were made.
        attempts: u32,
        /// The error of the last attempt.
        #[source]
        last: Box<FlowError>,
    },
    /// A send found the stage full under [`Overflow::Fail`](crate::Overflow::Fail);
    /// the item comes back in the [`SendError`](crate::SendError). Transient:
    /// the same send may succeed once the consumer has caught up.
    #[error(
        "stage full: {buffered} bytes buffered, and an item of {charge} bytes would exceed the {high} byte high watermark"
    )]
    Overflow {
        /// Bytes buffered when the item was refused.
        buffered: usize,
        /// The refused item's charge.
        charge: usize,
        /// The high watermark.
        high: usize,
    },
    /// A configuration value out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl FlowError {
    /// Wraps any library error as [`FlowError::Transport`].
    pub fn transport<E>(err: E) -> Self
    where
        E: Into<BoxError>,
    {
        FlowError::Transport(err.into())
    }

    /// The library error of type `E` behind this error, if there is one:
    /// looks inside [`FlowError::Transport`], and through [`FlowError::Pump`]
    /// and [`FlowError::RetriesExhausted`] to the error that caused them.
    ///
    /// ```
    /// use flowctl_core::FlowError;
    /// use flowctl_core::prelude::*;
    /// let err = FlowError::transport(std::fmt::Error);
    /// assert!(err.transport_error::<std::fmt::Error>().is_some());
    /// assert!(FlowError::Closed.transport_error::<std::fmt::Error>().is_none());
    /// ```
    pub fn transport_error<E: StdError + 'static>(&self) -> Option<&E> {
        match self {
            FlowError::Transport(e) => e.downcast_ref::<E>(),
            FlowError::Pump { source, .. } => source.transport_error(),
            FlowError::RetriesExhausted { last, .. } => last.transport_error(),
            _ => None,
        }
    }

    /// True for errors that a retry may cure: timeouts, I/O errors, transport
    /// errors and a full stage under [`Overflow::Fail`](crate::Overflow::Fail). Never for a protocol violation: a frame too large, a
    /// malformed frame, or an I/O error of kind `InvalidData` (what
    /// tokio-util's decoders return for bytes they reject): the same bytes
    /// would be rejected again.
    ///
    /// flowctl cannot tell a transport's permanent errors (auth rejected,
    /// permission denied) from its passing ones, so every
    /// [`FlowError::Transport`] counts as transient here. Transports that know
    /// better set [`RetryPolicy::retry_if`](crate::lifecycle::RetryPolicy::retry_if)
    /// (flowctl-cluster never retries an auth rejection).
    pub fn is_transient(&self) -> bool {
        match self {
            FlowError::Io(e) => e.kind() != std::io::ErrorKind::InvalidData,
            FlowError::Timeout(_) | FlowError::Transport(_) | FlowError::Overflow { .. } => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_violations_are_not_transient() {
        let invalid = std::io::Error::new(std::io::ErrorKind::InvalidData, "frame size too big");
        assert!(!FlowError::Io(invalid).is_transient());
        let size = FlowError::FrameTooLarge {
            size: 9_000_000,
            limit: 8_388_608,
        };
        assert!(!size.is_transient());
        assert_eq!(
            size.to_string(),
            "frame of 9000000 bytes exceeds the 8388608 byte limit"
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(FlowError::Io(reset).is_transient());
        assert!(FlowError::Timeout(Duration::from_secs(1)).is_transient());
    }
}
