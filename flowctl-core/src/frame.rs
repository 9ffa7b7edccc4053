//! Frames out of a byte stream ([`FramedRead`], a `tokio_util` `Decoder`
//! over a [`Source`] of `Bytes`, without re-copying the buffer per frame),
//! and into one ([`FramedWrite`], an `Encoder` in front of a [`Sink`] of
//! `Bytes`).
//!
//! The mistake this avoids: an asyncio `Protocol` that keeps its unparsed
//! bytes in a `bytearray` and calls `bytes(self.extra)` on every packet copies
//! the whole backlog each time, O(n²) in the size of a large frame. Here input
//! chunks are appended once to one `BytesMut` (or adopted without any copy when
//! the buffer is empty and the chunk is not shared), and each frame is split off
//! its front in O(1).

use std::any::Any;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{
    AnyDelimiterCodec, AnyDelimiterCodecError, Decoder, Encoder, LengthDelimitedCodec,
    LengthDelimitedCodecError, LinesCodec, LinesCodecError,
};

use crate::fair::Budget;
use crate::traits::SendError;
use crate::{BoxError, Fairness, FlowError, FlowStats, Sink, Source, Watermarks, Weighted};

/// The default [`FramedRead::max_buffer`]: 8 MiB.
pub const DEFAULT_MAX_BUFFER: usize = 8 * 1024 * 1024;

/// The name this stage had before [`FramedWrite`] existed; the same type.
pub type Framed<S, D> = FramedRead<S, D>;

/// Runs a `tokio_util::codec::Decoder` over a [`Source`] of `Bytes`.
///
/// # Memory
/// One limit, [`max_buffer`](FramedRead::max_buffer), bounds what a peer can make
/// this stage hold or allocate: the receive buffer never grows beyond the
/// limit plus the chunk being appended. For tokio-util's length-prefixed
/// [`LengthDelimitedCodec`] the limit is also the largest frame: the codec's
/// `max_frame_length` is lowered to it, and a header declaring more is
/// rejected before anything is reserved for it (the codec alone would reserve
/// the declared length first). A custom decoder that reserves space itself is
/// bounded only by what it reserves.
///
/// # Errors
/// - A frame larger than allowed: [`FlowError::FrameTooLarge`] naming both
///   figures. For a [`LengthDelimitedCodec`], `size` is the length its header
///   declares (as soon as the header is in, not after `size` bytes have
///   arrived) and `limit` is the smaller of `max_buffer` and the codec's own
///   `max_frame_length`. For a [`LinesCodec`] or [`AnyDelimiterCodec`] built
///   with a maximum length, a longer line is `FrameTooLarge` with that maximum
///   as `limit` and the bytes buffered without a delimiter as `size`. For
///   other decoders, more than `max_buffer` bytes buffered without a complete
///   frame; `size` is the bytes buffered.
/// - The decoder's error: [`FlowError::Decode`] (or [`FlowError::Io`] for an
///   I/O error the decoder passed on, which is never
///   [transient](FlowError::is_transient) when its kind is `InvalidData`).
/// - The stream ended inside a frame: [`FlowError::Truncated`].
///
/// Every frame decoded before the error has been delivered; after an error the
/// stream is over (further calls return the end of the stream).
///
/// ```
/// use bytes::Bytes;
/// use flowctl_core::{compat::StreamSource, frame::Framed, Source};
/// use flowctl_core::prelude::*;
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
pub struct FramedRead<S, D> {
    src: S,
    decoder: D,
    buf: BytesMut,
    max_buffer: usize,
    /// The header layout when `decoder` is a [`LengthDelimitedCodec`].
    header: Option<LengthHeader>,
    /// The codec's own `max_frame_length`, before `max_buffer` lowered it.
    codec_max: usize,
    /// True while the decoder has not consumed the next frame's header yet.
    at_header: bool,
    budget: Budget,
    stats: FlowStats,
    done: bool,
}

/// Where a [`LengthDelimitedCodec`] reads its length field. tokio-util
/// exposes no accessor for it, so [`LengthHeader::probe`] learns it from the
/// codec's own answers to a few header-sized inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LengthHeader {
    /// Bytes the codec needs before it reads the length.
    head: usize,
    offset: usize,
    len: usize,
    big_endian: bool,
}

/// The longest header a [`LengthDelimitedCodec`] can have that the probe
/// looks for (an offset and a skip of up to 56 bytes, an 8-byte field).
const MAX_PROBED_HEAD: usize = 64;

fn is_too_big(res: &std::io::Result<Option<BytesMut>>) -> bool {
    matches!(res, Err(e) if e.get_ref().is_some_and(|inner| inner.is::<LengthDelimitedCodecError>()))
}

impl LengthHeader {
    /// Learns the layout from clones of `codec` with a frame limit of 0 or 1:
    /// the codec then rejects any header whose length field is non-zero (or
    /// above 1) before it reserves anything, and returns `Ok(None)` while it
    /// has fewer bytes than its header.
    fn probe(codec: &LengthDelimitedCodec) -> Option<Self> {
        let decode = |limit: usize, buf: &[u8]| {
            let mut c = codec.clone();
            c.set_max_frame_length(limit);
            c.decode(&mut BytesMut::from(buf))
        };
        let head = (1..=MAX_PROBED_HEAD).find(|&k| is_too_big(&decode(0, &vec![0xff; k])))?;
        let in_field: Vec<usize> = (0..head)
            .filter(|&i| {
                let mut buf = vec![0u8; head];
                buf[i] = 0xff;
                is_too_big(&decode(0, &buf))
            })
            .collect();
        let (&offset, len) = (in_field.first()?, in_field.len());
        if len > 8 || in_field.last() != Some(&(offset + len - 1)) {
            return None;
        }
        let mut buf = vec![0u8; head];
        buf[offset] = 1;
        let big_endian = len > 1 && is_too_big(&decode(1, &buf));
        Some(LengthHeader {
            head,
            offset,
            len,
            big_endian,
        })
    }

    /// The length field of the header at the front of `buf` (which holds at
    /// least `head` bytes).
    fn declared(&self, buf: &[u8]) -> u64 {
        let field = &buf[self.offset..self.offset + self.len];
        let fold = |acc: u64, b: &u8| (acc << 8) | u64::from(*b);
        // The codec's default field (4 bytes) in one load: this runs once
        // per frame.
        match <[u8; 4]>::try_from(field) {
            Ok(b) if self.big_endian => u64::from(u32::from_be_bytes(b)),
            Ok(b) => u64::from(u32::from_le_bytes(b)),
            Err(_) if self.big_endian => field.iter().fold(0, fold),
            Err(_) => field.iter().rev().fold(0, fold),
        }
    }
}

impl<S, D> FramedRead<S, D>
where
    S: Source<Item = Bytes>,
    D: Decoder + Send + 'static,
    D::Item: Weighted + Send + 'static,
    D::Error: Into<BoxError>,
{
    /// Decodes `src` with `decoder`, at most [`DEFAULT_MAX_BUFFER`] bytes per frame.
    pub fn new(src: S, mut decoder: D) -> Self {
        let codec = (&mut decoder as &mut dyn Any).downcast_mut::<LengthDelimitedCodec>();
        let (header, codec_max) = match codec {
            Some(c) => (LengthHeader::probe(c), c.max_frame_length()),
            None => (None, usize::MAX),
        };
        FramedRead {
            src,
            decoder,
            buf: BytesMut::new(),
            max_buffer: DEFAULT_MAX_BUFFER,
            header,
            codec_max,
            at_header: true,
            budget: Budget::new(Fairness::default()),
            stats: FlowStats::empty(Watermarks::new(0, DEFAULT_MAX_BUFFER).unwrap_or_default()),
            done: false,
        }
        .max_buffer(DEFAULT_MAX_BUFFER)
    }

    /// The limit on what a peer can make this stage hold: fails with
    /// [`FlowError::FrameTooLarge`] once a frame is known to be larger (see
    /// the type's docs), and the receive buffer never grows beyond `limit`
    /// plus one chunk.
    pub fn max_buffer(mut self, limit: usize) -> Self {
        self.max_buffer = limit.max(1);
        self.stats.watermarks = Watermarks::new(0, self.max_buffer).unwrap_or_default();
        let limit = self.frame_limit();
        if let Some(c) = (&mut self.decoder as &mut dyn Any).downcast_mut::<LengthDelimitedCodec>()
        {
            // The codec's own check is the backstop of ours (a header it
            // rejects is never reserved for).
            c.set_max_frame_length(limit);
        }
        self
    }

    /// The largest frame allowed: `max_buffer`, or a length-delimited
    /// codec's own `max_frame_length` if that is smaller.
    fn frame_limit(&self) -> usize {
        self.max_buffer.min(self.codec_max)
    }

    /// The receive buffer's capacity: the bytes this stage has allocated for
    /// input not yet delivered as frames. At most `max_buffer` plus one chunk
    /// (plus a length header).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
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
        let e = match e.downcast::<std::io::Error>() {
            Ok(io) => {
                let too_big = io
                    .get_ref()
                    .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>());
                return match self.header {
                    // The codec rejected the header at the front of the buffer.
                    Some(h) if too_big && self.buf.len() >= h.head => FlowError::FrameTooLarge {
                        size: usize::try_from(h.declared(&self.buf)).unwrap_or(usize::MAX),
                        limit: self.frame_limit(),
                    },
                    _ => FlowError::Io(*io),
                };
            }
            Err(e) => e,
        };
        let decoder = &self.decoder as &dyn Any;
        let size = self.buf.len();
        if let Some(LinesCodecError::MaxLineLengthExceeded) = e.downcast_ref::<LinesCodecError>()
            && let Some(c) = decoder.downcast_ref::<LinesCodec>()
        {
            return FlowError::FrameTooLarge {
                size,
                limit: c.max_length(),
            };
        }
        if let Some(AnyDelimiterCodecError::MaxChunkLengthExceeded) =
            e.downcast_ref::<AnyDelimiterCodecError>()
            && let Some(c) = decoder.downcast_ref::<AnyDelimiterCodec>()
        {
            return FlowError::FrameTooLarge {
                size,
                limit: c.max_length(),
            };
        }
        FlowError::Decode(e)
    }

    /// Checks the length header at the front of the buffer before the codec
    /// sees it: a declared length above the limit is an error, and the space
    /// for an allowed frame is reserved exactly (so the codec's own
    /// reservation, which may double the buffer, finds it already there).
    fn check_header(&mut self) -> Result<(), FlowError> {
        let Some(h) = self.header else {
            return Ok(());
        };
        if !self.at_header || self.buf.len() < h.head {
            return Ok(());
        }
        let declared = h.declared(&self.buf);
        let limit = self.frame_limit();
        if declared > limit as u64 {
            self.done = true;
            return Err(FlowError::FrameTooLarge {
                size: usize::try_from(declared).unwrap_or(usize::MAX),
                limit,
            });
        }
        // declared <= limit, so this fits in usize.
        self.grow_to(h.head + declared as usize);
        Ok(())
    }

    /// Makes room for `total` bytes: in the buffer's own allocation when the
    /// frames split off its front have been dropped (`try_reclaim` moves the
    /// bytes held back to its start and never allocates), otherwise in a new
    /// one of exactly `total` bytes (never the doubling of
    /// `BytesMut::reserve`, which could reach twice the limit).
    fn grow_to(&mut self, total: usize) {
        if self.buf.capacity() >= total {
            return;
        }
        if self.buf.try_reclaim(total - self.buf.len()) {
            return;
        }
        let mut grown = BytesMut::with_capacity(total);
        grown.extend_from_slice(&self.buf);
        self.buf = grown;
    }

    fn append(&mut self, chunk: Bytes) {
        if self.buf.is_empty() {
            // Adopt the chunk's allocation when we are its only owner.
            match chunk.try_into_mut() {
                Ok(owned) => self.buf = owned,
                Err(shared) => {
                    self.grow_to(shared.len());
                    self.buf.extend_from_slice(&shared);
                }
            }
            return;
        }
        let needed = self.buf.len() + chunk.len();
        if self.buf.capacity() < needed {
            // Amortised growth (twice what is held), capped at the limit so
            // that the buffer never exceeds the limit plus this chunk.
            let doubled = (2 * self.buf.len()).min(self.max_buffer);
            self.grow_to(needed.max(doubled));
        }
        self.buf.extend_from_slice(&chunk);
    }

    /// The next frame; see the type's docs for the errors.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<D::Item>, FlowError>> {
        Poll::Ready(loop {
            if self.done {
                break Ok(None);
            }
            // Decoding from a large buffer is a ready path too: spend the budget
            // before taking a frame, so the frame is never lost to a cancel.
            std::task::ready!(self.budget.poll_proceed(cx));
            if let Err(e) = self.check_header() {
                break Err(e);
            }
            let header_in = self
                .header
                .is_some_and(|h| self.at_header && self.buf.len() >= h.head);
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => break Ok(self.deliver(frame)),
                // A length-delimited codec given its whole header has consumed it.
                Ok(None) if header_in => self.at_header = false,
                Ok(None) => {}
                Err(e) => break Err(self.decode_error(e)),
            }
            // A length header is not part of the frame it declares.
            let allowed = self.max_buffer + self.header.map_or(0, |h| h.head);
            if self.buf.len() > allowed {
                self.done = true;
                break Err(FlowError::FrameTooLarge {
                    size: self.buf.len(),
                    limit: self.max_buffer,
                });
            }
            let received = match self.src.poll_recv(cx) {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    // A natural yield: the slice starts again.
                    self.budget.reset();
                    return Poll::Pending;
                }
            };
            match received {
                Ok(Some(chunk)) => {
                    self.append(chunk);
                    self.stats.buffered = self.buf.len();
                    self.stats.max_buffered = self.stats.max_buffered.max(self.buf.len());
                }
                Ok(None) => {
                    self.done = true;
                    break match self.decoder.decode_eof(&mut self.buf) {
                        Ok(Some(frame)) => {
                            // More frames may follow in the buffer.
                            self.done = self.buf.is_empty();
                            Ok(self.deliver(frame))
                        }
                        // A length-delimited codec that consumed a header
                        // and got none of its bytes still lost a frame.
                        Ok(None) if self.buf.is_empty() && self.at_header => Ok(None),
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
                    break Err(e);
                }
            }
        })
    }

    fn deliver(&mut self, frame: D::Item) -> Option<D::Item> {
        self.at_header = true;
        let w = frame.weight();
        self.budget.charge(w);
        self.stats.items += 1;
        self.stats.bytes += w as u64;
        self.stats.buffered = self.buf.len();
        Some(frame)
    }
}

impl<S, D> Source for FramedRead<S, D>
where
    S: Source<Item = Bytes>,
    D: Decoder + Send + 'static,
    D::Item: Weighted + Send + 'static,
    D::Error: Into<BoxError>,
{
    type Item = D::Item;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<D::Item>, FlowError>> {
        self.poll_frame(cx)
    }

    fn stats(&self) -> FlowStats {
        self.stats
    }
}

/// Runs a `tokio_util::codec::Encoder` in front of a [`Sink`] of `Bytes`:
/// a [`Sink`] of the encoder's items.
///
/// Each accepted item is encoded into one frame, split off a reused
/// `BytesMut` without a copy, and handed to the inner sink at once; so
/// backpressure, flushing and closing are the inner sink's, and
/// [`stats`](Sink::stats) are the inner sink's too (its `items` are frames,
/// its `bytes` encoded bytes). `poll_ready` is the inner sink's.
///
/// # Errors
/// An `Encoder` consumes the item it fails on, so an encoding error (or the
/// inner sink refusing the frame, which cannot happen after its
/// `poll_ready` unless it failed meanwhile) cannot give the item back: it is
/// returned by the next `poll_ready`, `poll_flush` or `poll_close`, and the
/// stage is closed from then on. `start_send` after `poll_close` or after a
/// failure gives the item back ([`SendError`]). An encoder's `io::Error`
/// becomes [`FlowError::Io`], any other error [`FlowError::Transport`].
///
/// ```
/// use bytes::Bytes;
/// use tokio_util::codec::LinesCodec;
/// use flowctl_core::{frame::{FramedRead, FramedWrite}, prelude::*};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), FlowError> {
/// let (tx, rx) = pipe::<Bytes>(Watermarks::default());
/// let mut lines = FramedWrite::new(tx, LinesCodec::new());
/// lines.send("hello".to_owned()).await?;
/// lines.send("world".to_owned()).await?;
/// lines.close().await?;
/// let mut back = FramedRead::new(rx, LinesCodec::new());
/// assert_eq!(back.recv().await?.as_deref(), Some("hello"));
/// assert_eq!(back.recv().await?.as_deref(), Some("world"));
/// assert_eq!(back.recv().await?, None);
/// # Ok(()) }
/// ```
///
/// `I` is the item type the encoder takes (tokio-util's encoders take
/// several; the first `send` fixes it).
#[derive(Debug)]
pub struct FramedWrite<K, E, I> {
    sink: K,
    encoder: E,
    buf: BytesMut,
    failed: Option<FlowError>,
    closed: bool,
    _item: std::marker::PhantomData<fn(I)>,
}

impl<K, E, I> FramedWrite<K, E, I> {
    /// Encodes with `encoder` into `sink`.
    pub fn new(sink: K, encoder: E) -> Self {
        FramedWrite {
            sink,
            encoder,
            buf: BytesMut::new(),
            failed: None,
            closed: false,
            _item: std::marker::PhantomData,
        }
    }

    /// The encoder.
    pub fn encoder(&self) -> &E {
        &self.encoder
    }

    /// The inner sink.
    pub fn get_ref(&self) -> &K {
        &self.sink
    }

    /// The inner sink and the encoder.
    pub fn into_parts(self) -> (K, E) {
        (self.sink, self.encoder)
    }

    /// The deferred error, which closes the stage.
    fn take_failure(&mut self) -> Option<FlowError> {
        let e = self.failed.take()?;
        self.closed = true;
        Some(e)
    }
}

fn encode_error<E: Into<BoxError>>(e: E) -> FlowError {
    let e: BoxError = e.into();
    match e.downcast::<std::io::Error>() {
        Ok(io) => FlowError::Io(*io),
        Err(e) => FlowError::Transport(e),
    }
}

impl<K, E, I> Sink for FramedWrite<K, E, I>
where
    K: Sink<Item = Bytes>,
    E: Encoder<I> + Send,
    E::Error: Into<BoxError>,
    I: Send + 'static,
{
    type Item = I;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if let Some(e) = self.take_failure() {
            return Poll::Ready(Err(e));
        }
        if self.closed {
            return Poll::Ready(Err(FlowError::Closed));
        }
        self.sink.poll_ready(cx)
    }

    fn start_send(&mut self, item: I) -> Result<(), SendError<I>> {
        if self.closed || self.failed.is_some() {
            return Err(SendError::closed(item));
        }
        if let Err(e) = self.encoder.encode(item, &mut self.buf) {
            self.buf.clear();
            self.failed = Some(encode_error(e));
            return Ok(());
        }
        let frame = self.buf.split().freeze();
        if let Err(e) = self.sink.start_send(frame) {
            self.failed = Some(e.into_error());
        }
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if let Some(e) = self.take_failure() {
            return Poll::Ready(Err(e));
        }
        self.sink.poll_flush(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if let Some(e) = self.take_failure() {
            return Poll::Ready(Err(e));
        }
        self.closed = true;
        self.sink.poll_close(cx)
    }

    fn stats(&self) -> FlowStats {
        self.sink.stats()
    }

    fn writability(&self) -> Option<crate::Writability> {
        self.sink.writability()
    }
}
