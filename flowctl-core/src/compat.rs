//! Adapters to and from the `futures` and `tokio::io` ecosystems, both ways.
//!
//! | from | to | adapter |
//! |---|---|---|
//! | any [`Source`] | `futures::Stream<Item = Result<T, FlowError>>` | [`SourceExt::into_stream`](crate::SourceExt::into_stream) → [`SourceStream`] |
//! | `futures::Stream` | fair [`Source`] | [`StreamSource`] |
//! | `futures::TryStream` (errors kept as errors) | fair [`Source`] | [`TryStreamSource`] |
//! | any [`Sink`] | `futures::Sink<T, Error = FlowError>` | [`SinkExt::into_futures_sink`](crate::SinkExt::into_futures_sink) → [`IntoFuturesSink`] |
//! | `futures::Sink` | [`Sink`] | [`FuturesSink`] |
//! | [`Source`]`<Item = Bytes>` | `AsyncRead` + `AsyncBufRead` | [`SourceExt::into_async_read`](crate::SourceExt::into_async_read) → [`SourceReader`] |
//! | [`Sink`]`<Item = Bytes>` | `AsyncWrite` | [`SinkWriter`] |
//! | `AsyncRead` / `AsyncWrite` | [`Source`] / [`Sink`] | [`io::ReaderSource`](crate::io::ReaderSource) / [`io::WriterSink`](crate::io::WriterSink) |
//!
//! None of them boxes or requires `'static`. Each adapter is `Unpin` when
//! what it wraps is.

use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Stream, TryStream};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

use crate::fair::Budget;
use crate::traits::SendError;
use crate::{BoxError, Fairness, FlowError, FlowStats, Sink, Source, Watermarks, Weighted};

/// A `futures::Stream` as a fair [`Source`].
///
/// The stream's own buffering is not visible to flowctl: `stats().buffered` is
/// always 0, and `items`/`bytes` count what was delivered.
///
/// ```
/// use flowctl_core::{compat::StreamSource, prelude::*};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flowctl_core::FlowError> {
/// let mut src = StreamSource::new(futures::stream::iter(vec![1u32, 2, 3]));
/// assert_eq!(src.recv().await?, Some(1));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct StreamSource<St> {
    stream: St,
    budget: Budget,
    stats: FlowStats,
}

impl<St> StreamSource<St> {
    /// Wraps `stream` with the default [`Fairness`].
    pub fn new(stream: St) -> Self {
        Self::with_fairness(stream, Fairness::default())
    }

    /// Wraps `stream` with an explicit [`Fairness`].
    pub fn with_fairness(stream: St, fairness: Fairness) -> Self {
        StreamSource {
            stream,
            budget: Budget::new(fairness),
            stats: FlowStats::empty(Watermarks::default()),
        }
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> St {
        self.stream
    }
}

/// Polls `stream` fairly: one budget unit per item, a natural yield resets it.
fn poll_fair<St: Stream + Unpin>(
    stream: &mut St,
    budget: &mut Budget,
    cx: &mut Context<'_>,
) -> Poll<Option<St::Item>> {
    std::task::ready!(budget.poll_proceed(cx));
    let poll = Pin::new(stream).poll_next(cx);
    if poll.is_pending() {
        budget.reset();
    }
    poll
}

impl<St> Source for StreamSource<St>
where
    St: Stream + Unpin + Send,
    St::Item: Weighted + Send + 'static,
{
    type Item = St::Item;

    #[inline]
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<St::Item>, FlowError>> {
        let item = std::task::ready!(poll_fair(&mut self.stream, &mut self.budget, cx));
        if let Some(item) = &item {
            let w = item.weight();
            self.budget.charge(w);
            self.stats.items += 1;
            self.stats.bytes += w as u64;
        }
        Poll::Ready(Ok(item))
    }

    fn stats(&self) -> FlowStats {
        self.stats
    }
}

/// A `futures::TryStream` as a fair [`Source`]: `Ok` items are delivered,
/// each `Err` becomes [`FlowError::Transport`] in its place (an
/// `std::io::Error` becomes [`FlowError::Io`]), and the items after it
/// follow as the stream yields them.
///
/// ```
/// use flowctl_core::{compat::TryStreamSource, prelude::*};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flowctl_core::FlowError> {
/// let items = vec![Ok(1u32), Err(std::io::Error::other("bad")), Ok(3)];
/// let mut src = TryStreamSource::new(futures::stream::iter(items));
/// assert_eq!(src.recv().await?, Some(1));
/// assert!(matches!(src.recv().await, Err(FlowError::Io(_))));
/// assert_eq!(src.recv().await?, Some(3));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TryStreamSource<St> {
    inner: StreamSource<futures::stream::IntoStream<St>>,
}

impl<St: TryStream> TryStreamSource<St> {
    /// Wraps `stream` with the default [`Fairness`].
    pub fn new(stream: St) -> Self {
        Self::with_fairness(stream, Fairness::default())
    }

    /// Wraps `stream` with an explicit [`Fairness`].
    pub fn with_fairness(stream: St, fairness: Fairness) -> Self {
        TryStreamSource {
            inner: StreamSource::with_fairness(
                futures::TryStreamExt::into_stream(stream),
                fairness,
            ),
        }
    }
}

impl<St> Source for TryStreamSource<St>
where
    St: TryStream + Unpin + Send,
    St::Ok: Weighted + Send + 'static,
    St::Error: Into<BoxError>,
{
    type Item = St::Ok;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<St::Ok>, FlowError>> {
        let s = &mut self.inner;
        match std::task::ready!(poll_fair(&mut s.stream, &mut s.budget, cx)) {
            None => Poll::Ready(Ok(None)),
            Some(Ok(item)) => {
                let w = item.weight();
                s.budget.charge(w);
                s.stats.items += 1;
                s.stats.bytes += w as u64;
                Poll::Ready(Ok(Some(item)))
            }
            Some(Err(e)) => {
                s.budget.charge(0);
                Poll::Ready(Err(wrap(e)))
            }
        }
    }

    fn stats(&self) -> FlowStats {
        self.inner.stats
    }
}

/// A [`Source`] as a `futures::Stream` of `Result<Item, FlowError>`; see
/// [`SourceExt::into_stream`](crate::SourceExt::into_stream).
///
/// ```
/// use futures::StreamExt;
/// use flowctl_core::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), FlowError> {
/// let (mut tx, mut rx) = pipe::<bytes::Bytes>(Watermarks::default());
/// tx.send(bytes::Bytes::from_static(b"a")).await?;
/// tx.close().await?;
/// // Borrowed: the source is still ours afterwards.
/// let got: Vec<_> = (&mut rx).into_stream().collect().await;
/// assert_eq!(got.len(), 1);
/// assert_eq!(rx.stats().items, 1);
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "streams do nothing unless polled"]
pub struct SourceStream<S> {
    src: S,
    done: bool,
}

impl<S> SourceStream<S> {
    pub(crate) fn new(src: S) -> Self {
        SourceStream { src, done: false }
    }

    /// The wrapped source.
    pub fn into_inner(self) -> S {
        self.src
    }
}

impl<S: Source + Unpin> Stream for SourceStream<S> {
    type Item = Result<S::Item, FlowError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match std::task::ready!(this.src.poll_recv(cx)) {
            Ok(Some(item)) => Poll::Ready(Some(Ok(item))),
            Ok(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

/// A `futures::Sink` as a [`Sink`]. Its errors become [`FlowError::Transport`].
///
/// The wrapped sink's buffering is its own: `stats().buffered` is always 0.
/// A `futures::Sink` consumes the item it refuses, so a failing
/// `start_send` cannot give it back: the error is returned by the next
/// `poll_ready` or `poll_flush` instead, and `start_send` refuses (and
/// returns) items only once the sink is closed or failed.
#[derive(Debug)]
pub struct FuturesSink<K, T> {
    sink: K,
    _item: PhantomData<fn(T)>,
    closed: bool,
    failed: Option<FlowError>,
    stats: FlowStats,
}

impl<K, T> FuturesSink<K, T> {
    /// Wraps `sink`.
    pub fn new(sink: K) -> Self {
        FuturesSink {
            sink,
            _item: PhantomData,
            closed: false,
            failed: None,
            stats: FlowStats::empty(Watermarks::default()),
        }
    }

    /// The wrapped sink.
    pub fn into_inner(self) -> K {
        self.sink
    }
}

fn wrap<E: Into<BoxError>>(e: E) -> FlowError {
    let e: BoxError = e.into();
    match e.downcast::<io::Error>() {
        Ok(io) => FlowError::Io(*io),
        Err(e) => FlowError::Transport(e),
    }
}

impl<K, T> Sink for FuturesSink<K, T>
where
    K: futures::Sink<T> + Unpin + Send,
    K::Error: Into<BoxError>,
    T: Weighted + Send + 'static,
{
    type Item = T;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if self.closed {
            return Poll::Ready(Err(FlowError::Closed));
        }
        if let Some(e) = self.failed.take() {
            self.closed = true;
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.sink).poll_ready(cx).map_err(wrap)
    }

    fn start_send(&mut self, item: T) -> Result<(), SendError<T>> {
        if self.closed {
            return Err(SendError::closed(item));
        }
        let w = item.weight();
        match Pin::new(&mut self.sink).start_send(item) {
            Ok(()) => {
                self.stats.items += 1;
                self.stats.bytes += w as u64;
            }
            Err(e) => self.failed = Some(wrap(e)),
        }
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if let Some(e) = self.failed.take() {
            self.closed = true;
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.sink).poll_flush(cx).map_err(wrap)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = self.failed.take() {
            self.closed = true;
            return Poll::Ready(Err(e));
        }
        std::task::ready!(Pin::new(&mut self.sink).poll_close(cx)).map_err(wrap)?;
        self.closed = true;
        Poll::Ready(Ok(()))
    }

    fn stats(&self) -> FlowStats {
        self.stats
    }
}

/// A [`Sink`] as a `futures::Sink<Item, Error = FlowError>`; see
/// [`SinkExt::into_futures_sink`](crate::SinkExt::into_futures_sink).
///
/// A refused item is lost here (`futures::Sink::start_send` cannot give it
/// back); call the flowctl [`Sink`] directly to keep it.
///
/// ```
/// use futures::{SinkExt as _, StreamExt};
/// use flowctl_core::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), FlowError> {
/// let (tx, mut rx) = pipe::<bytes::Bytes>(Watermarks::default());
/// let words = futures::stream::iter(["a", "b"].map(|w| Ok(bytes::Bytes::from(w))));
/// words.forward(tx.into_futures_sink()).await?; // closes the sink at the end
/// assert_eq!(rx.recv().await?, Some(bytes::Bytes::from("a")));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct IntoFuturesSink<K> {
    sink: K,
}

impl<K> IntoFuturesSink<K> {
    pub(crate) fn new(sink: K) -> Self {
        IntoFuturesSink { sink }
    }

    /// The wrapped sink.
    pub fn into_inner(self) -> K {
        self.sink
    }

    /// The wrapped sink, to read its stats.
    pub fn get_ref(&self) -> &K {
        &self.sink
    }
}

impl<K: Sink + Unpin> futures::Sink<K::Item> for IntoFuturesSink<K> {
    type Error = FlowError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        self.get_mut().sink.poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: K::Item) -> Result<(), FlowError> {
        self.get_mut()
            .sink
            .start_send(item)
            .map_err(SendError::into_error)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        self.get_mut().sink.poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        self.get_mut().sink.poll_close(cx)
    }
}

/// A [`Source`] of `Bytes` as a `tokio::io::AsyncRead` and `AsyncBufRead`;
/// see [`SourceExt::into_async_read`](crate::SourceExt::into_async_read).
///
/// `poll_fill_buf` lends the chunk the source returned (no copy);
/// `poll_read` copies into the caller's buffer, as it must. Empty chunks are
/// skipped; the end of the source is the end of file; a [`FlowError`]
/// becomes an `io::Error` (an [`FlowError::Io`] is passed through as it is,
/// anything else is `io::ErrorKind::Other` with the `FlowError` inside).
///
/// ```
/// use flowctl_core::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), FlowError> {
/// let (mut tx, rx) = pipe::<bytes::Bytes>(Watermarks::default());
/// tx.send(bytes::Bytes::from_static(b"hello ")).await?;
/// tx.send(bytes::Bytes::from_static(b"world")).await?;
/// tx.close().await?;
/// let mut out = Vec::new();
/// tokio::io::copy(&mut rx.into_async_read(), &mut out).await?;
/// assert_eq!(out, b"hello world");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SourceReader<S> {
    src: S,
    chunk: Bytes,
    eof: bool,
}

impl<S> SourceReader<S> {
    pub(crate) fn new(src: S) -> Self {
        SourceReader {
            src,
            chunk: Bytes::new(),
            eof: false,
        }
    }

    /// The source, and the part of a chunk already received and not read.
    pub fn into_parts(self) -> (S, Bytes) {
        (self.src, self.chunk)
    }

    /// The wrapped source, to read its stats.
    pub fn get_ref(&self) -> &S {
        &self.src
    }
}

fn to_io(e: FlowError) -> io::Error {
    match e {
        FlowError::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl<S: Source<Item = Bytes> + Unpin> SourceReader<S> {
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.chunk.is_empty() && !self.eof {
            match std::task::ready!(self.src.poll_recv(cx)) {
                Ok(Some(chunk)) => self.chunk = chunk,
                Ok(None) => self.eof = true,
                Err(e) => return Poll::Ready(Err(to_io(e))),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: Source<Item = Bytes> + Unpin> AsyncRead for SourceReader<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.fill(cx))?;
        let n = this.chunk.len().min(buf.remaining());
        buf.put_slice(&this.chunk[..n]);
        this.chunk.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: Source<Item = Bytes> + Unpin> AsyncBufRead for SourceReader<S> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        std::task::ready!(this.fill(cx))?;
        Poll::Ready(Ok(&this.chunk[..]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        let amt = amt.min(this.chunk.len());
        this.chunk.advance(amt);
    }
}

/// A [`Sink`] of `Bytes` as a `tokio::io::AsyncWrite`.
///
/// Each `poll_write` waits for the sink to be ready and hands it a copy of
/// the caller's bytes as one chunk (an `AsyncWrite` lends its buffer, so
/// the copy is unavoidable); `poll_flush` and `poll_shutdown` are the sink's
/// flush and close. Errors become `io::Error`s as in [`SourceReader`].
///
/// ```
/// use tokio::io::AsyncWriteExt;
/// use flowctl_core::{compat::SinkWriter, prelude::*};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), FlowError> {
/// let (tx, mut rx) = pipe::<bytes::Bytes>(Watermarks::default());
/// let mut w = SinkWriter::new(tx);
/// w.write_all(b"hello").await?;
/// w.shutdown().await?;
/// assert_eq!(rx.recv().await?, Some(bytes::Bytes::from_static(b"hello")));
/// assert_eq!(rx.recv().await?, None);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SinkWriter<K> {
    sink: K,
}

impl<K> SinkWriter<K> {
    /// Wraps `sink`.
    pub fn new(sink: K) -> Self {
        SinkWriter { sink }
    }

    /// The wrapped sink.
    pub fn into_inner(self) -> K {
        self.sink
    }

    /// The wrapped sink, to read its stats.
    pub fn get_ref(&self) -> &K {
        &self.sink
    }
}

impl<K: Sink<Item = Bytes> + Unpin> AsyncWrite for SinkWriter<K> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        std::task::ready!(this.sink.poll_ready(cx)).map_err(to_io)?;
        this.sink
            .start_send(Bytes::copy_from_slice(buf))
            .map_err(|e| to_io(e.into_error()))?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().sink.poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().sink.poll_close(cx).map_err(to_io)
    }
}
