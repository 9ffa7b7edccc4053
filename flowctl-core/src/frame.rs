//! Frames out of a byte stream, without re-copying the buffer per frame.
//!
//! The mistake this avoids: an asyncio `Protocol` that keeps its unparsed
//! bytes in a `bytearray` and calls `bytes(self.extra)` on every packet copies
//! the whole backlog each time, O(n²) in the size of a large frame. Here input
//! chunks are appended once to one `BytesMut` (or adopted without any copy when
//! the buffer is empty and the chunk is not shared), and each frame is split off
//! its front in O(1).

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

use crate::fair::Budget;
use crate::{BoxError, Fairness, FlowError, FlowStats, Source, Watermarks, Weighted};

/// The default [`Framed::max_buffer`]: 8 MiB.
pub const DEFAULT_MAX_BUFFER: usize = 8 * 1024 * 1024;

/// Runs a `tokio_util::codec::Decoder` over a [`Source`] of `Bytes`.
///
/// # Errors
/// - More than `max_buffer` bytes accumulated without a complete frame:
///   [`FlowError::FrameTooLarge`] naming both figures.
/// - The decoder's error: [`FlowError::Decode`] (or [`FlowError::Io`] for an
///   I/O error the decoder passed on).
/// - The stream ended inside a frame: [`FlowError::Truncated`].
///
/// Every frame decoded before the error has been delivered; after an error the
/// stream is over (further calls return the end of the stream).
///
/// ```
/// use bytes::Bytes;
/// use flowctl_core::{compat::StreamSource, frame::Framed, Source};
/// use tokio_util::codec::LinesCodec;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flowctl_core::FlowError> {
/// let chunks = futures::stream::iter(vec![Bytes::from("he"), Bytes::from("llo\nwor"), Bytes::from("ld\n")]);
/// let mut lines = Framed::new(StreamSource::new(chunks), LinesCodec::new());
/// assert_eq!(lines.recv().await?.as_deref(), Some("hello"));
/// assert_eq!(lines.recv().await?.as_deref(), Some("world"));
/// assert_eq!(lines.recv().await?, None);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Framed<S, D> {
    src: S,
    decoder: D,
    buf: BytesMut,
    max_buffer: usize,
    budget: Budget,
    stats: FlowStats,
    done: bool,
}

impl<S, D> Framed<S, D>
where
    S: Source<Item = Bytes>,
    D: Decoder + Send,
    D::Item: Weighted + Send + 'static,
    D::Error: Into<BoxError>,
{
    /// Decodes `src` with `decoder`, at most [`DEFAULT_MAX_BUFFER`] bytes per frame.
    pub fn new(src: S, decoder: D) -> Self {
        Framed {
            src,
            decoder,
            buf: BytesMut::new(),
            max_buffer: DEFAULT_MAX_BUFFER,
            budget: Budget::new(Fairness::default()),
            stats: FlowStats::empty(Watermarks::new(0, DEFAULT_MAX_BUFFER).unwrap_or_default()),
            done: false,
        }
    }

    /// Fails with [`FlowError::FrameTooLarge`] once `limit` bytes are buffered
    /// without a complete frame.
    pub fn max_buffer(mut self, limit: usize) -> Self {
        self.max_buffer = limit.max(1);
        self.stats.watermarks = Watermarks::new(0, self.max_buffer).unwrap_or_default();
        self
    }

    /// Uses `fairness` instead of the default.
    pub fn fairness(mut self, fairness: Fairness) -> Self {
        self.budget = Budget::new(fairness);
        self
    }

    /// The decoder.
    pub fn decoder(&self) -> &D {
        &self.decoder
    }

    /// Bytes received and not yet part of a delivered frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn decode_error(&mut self, e: D::Error) -> FlowError {
        self.done = true;
        let e: BoxError = e.into();
        match e.downcast::<std::io::Error>() {
            Ok(io) => FlowError::Io(*io),
            Err(e) => FlowError::Decode(e),
        }
    }

    fn append(&mut self, chunk: Bytes) {
        if self.buf.is_empty() {
            // Adopt the chunk's allocation when we are its only owner.
            match chunk.try_into_mut() {
                Ok(owned) => self.buf = owned,
                Err(shared) => self.buf.extend_from_slice(&shared),
            }
        } else {
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// The next frame; see the type's docs for the errors. An inherent
    /// method, so a call on a `Framed` itself costs no boxed future of its own.
    pub async fn recv(&mut self) -> Result<Option<D::Item>, FlowError> {
        loop {
            if self.done {
                return Ok(None);
            }
            // Decoding from a large buffer is a ready path too: spend the budget
            // before taking a frame, so the frame is never lost to a cancel.
            std::future::poll_fn(|cx| self.budget.poll_proceed(cx)).await;
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => return Ok(self.deliver(frame)),
                Ok(None) => {}
                Err(e) => return Err(self.decode_error(e)),
            }
            if self.buf.len() > self.max_buffer {
                self.done = true;
                return Err(FlowError::FrameTooLarge {
                    size: self.buf.len(),
                    limit: self.max_buffer,
                });
            }
            let mut waited = false;
            let received = {
                let mut next = std::pin::pin!(self.src.recv());
                std::future::poll_fn(|cx| {
                    let poll = next.as_mut().poll(cx);
                    waited |= poll.is_pending();
                    poll
                })
                .await
            };
            if waited {
                self.budget.reset();
            }
            match received {
                Ok(Some(chunk)) => {
                    self.append(chunk);
                    self.stats.buffered = self.buf.len();
                    self.stats.max_buffered = self.stats.max_buffered.max(self.buf.len());
                }
                Ok(None) => {
                    self.done = true;
                    return match self.decoder.decode_eof(&mut self.buf) {
                        Ok(Some(frame)) => {
                            // More frames may follow in the buffer.
                            self.done = self.buf.is_empty();
                            Ok(self.deliver(frame))
                        }
                        Ok(None) if self.buf.is_empty() => Ok(None),
                        Ok(None) => Err(FlowError::Truncated {
                            remaining: self.buf.len(),
                        }),
                        Err(e) => {
                            let remaining = self.buf.len();
                            let err = self.decode_error(e);
                            // tokio-util reports leftovers as an io error "bytes remaining on stream".
                            if remaining > 0 && matches!(err, FlowError::Io(_)) {
                                Err(FlowError::Truncated { remaining })
                            } else {
                                Err(err)
                            }
                        }
                    };
                }
                Err(e) => {
                    self.done = true;
                    return Err(e);
                }
            }
        }
    }

    fn deliver(&mut self, frame: D::Item) -> Option<D::Item> {
        let w = frame.weight();
        self.budget.charge(w);
        self.stats.items += 1;
        self.stats.bytes += w as u64;
        self.stats.buffered = self.buf.len();
        Some(frame)
    }
}

#[async_trait]
impl<S, D> Source for Framed<S, D>
where
    S: Source<Item = Bytes>,
    D: Decoder + Send,
    D::Item: Weighted + Send + 'static,
    D::Error: Into<BoxError>,
{
    type Item = D::Item;

    async fn recv(&mut self) -> Result<Option<D::Item>, FlowError> {
        Framed::recv(self).await
    }

    fn stats(&self) -> FlowStats {
        self.stats
    }
}
