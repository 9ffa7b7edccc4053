//! The contract every stage implements: poll-based [`Sink`] and [`Source`],
//! and their async conveniences in [`SinkExt`] and [`SourceExt`].
//!
//! The normative text of the contract is on the traits below; the book's
//! `reference/contract.md` explains the choices.
//!
//! # Why `&mut self` and a `Context`, not `Pin<&mut Self>`
//!
//! tower's `Service::poll_ready` and tokio's `mpsc::Receiver::poll_recv` take
//! `&mut self`; `futures::Sink` and `Stream` take `Pin<&mut Self>`. Every
//! flowctl stage is `Unpin` (its state is a queue, a gate, a socket handle),
//! so pinning would buy nothing and cost every caller a `Pin::new` or a
//! `pin!`. A stage that must hold a future keeps it boxed once, or as a
//! `tokio_util::sync::ReusableBoxFuture`. The adapters to `futures::Sink` and
//! `futures::Stream` ([`SinkExt::into_futures_sink`],
//! [`SourceExt::into_stream`]) are `Unpin` themselves.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::fair::Fair;
use crate::{Fairness, FlowError, FlowStats, Weighted, Writability};

/// Where items go: a bounded, byte-counted entry into the next stage.
///
/// The protocol is the one of tower's `poll_ready`/`call` and of
/// `futures::Sink`: [`poll_ready`](Sink::poll_ready) until it is ready, then
/// hand over one item with [`start_send`](Sink::start_send);
/// [`SinkExt::send`] does both.
///
/// # Outcomes
/// - `poll_ready` → `Pending`: the sink holds more than its high watermark
///   (or its transport has no room); the waker is woken once it is back at
///   or below the low watermark. Nothing is reserved: dropping the waiter
///   loses nothing.
/// - `poll_ready` → `Ready(Ok(()))`: the next `start_send` is accepted. It
///   may overshoot `high` by this one item, so an item larger than `high`
///   never deadlocks. Calling `start_send` without it is allowed: the item is
///   accepted or refused, never lost.
/// - `poll_ready`, `poll_flush` → `Ready(Err(e))`: the sink is broken. Every
///   later call fails too (with the same error or [`FlowError::Closed`]);
///   what it accepted and had not handed on is lost with it, and its stats
///   say how much. A sink never recovers from an error on its own: build a
///   new one (for example with [`lifecycle::retry`](crate::lifecycle::retry)).
/// - `start_send` → `Err(SendError)`: the item was **not** accepted and comes
///   back inside the [`SendError`] ([`SendError::into_inner`]), with the
///   reason: [`FlowError::Closed`] after `poll_close`, or the sink's error.
///   It is not counted in [`stats`](Sink::stats).
/// - `poll_flush` → `Ready(Ok(()))`: everything accepted so far has been
///   taken by the next stage (written to the socket, handed to the consumer).
/// - `poll_close` → `Ready(Ok(()))`: flushed, and the next stage has seen
///   the end of the stream. Idempotent: later calls return `Ready(Ok(()))`,
///   and `poll_ready`/`start_send` fail with [`FlowError::Closed`].
///   A channel handle ([`PipeSink`](crate::PipeSink)) is the exception: its
///   queue belongs to the receiver, so closing ends the handle without
///   waiting, and the queued items are still delivered.
///
/// # Backpressure
/// Every item is charged by its [`Weighted::weight`] (at least
/// [`MIN_CHARGE`](crate::weighted::MIN_CHARGE)) when it is accepted, and
/// credited only when the next stage has taken it.
///
/// # Cancel safety
/// Every `poll_*` method may be abandoned at any `Pending`: no item is lost,
/// and polling again (from any task) resumes. [`SinkExt::send`]'s future owns
/// its item until `start_send` runs: dropping it earlier drops the item,
/// which was never accepted; use `ready` + `start_send`, or
/// [`SinkExt::try_send`], to keep it.
pub trait Sink: Send {
    /// What this sink accepts.
    type Item: Send + 'static;

    /// `Ready(Ok(()))` when the sink accepts another item; see the outcomes above.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>>;

    /// Accepts one item without waiting, or gives it back.
    fn start_send(&mut self, item: Self::Item) -> Result<(), SendError<Self::Item>>;

    /// `Ready(Ok(()))` once every accepted item has been taken by the next stage.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>>;

    /// Flushes, then ends the stream for the next stage. Idempotent.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>>;

    /// A snapshot of what the sink holds and has accepted.
    fn stats(&self) -> FlowStats;

    /// A handle on this sink's paused/resumed edges (Netty's
    /// `channelWritabilityChanged`), to shed load upstream before a send
    /// would wait. `None` for a sink without watermarks of its own (the
    /// default). Every flowctl sink with a buffer returns one.
    fn writability(&self) -> Option<Writability> {
        None
    }
}

/// Where items come from.
///
/// # Outcomes
/// - `poll_recv` → `Pending`: nothing is ready; the waker is woken when an
///   item, the end or an error is. Also returned once per fairness slice on
///   the ready path (see below), after waking the waker.
/// - `Ready(Ok(Some(item)))`: the next item, in order, handed over: it is
///   credited to the source's watermarks now.
/// - `Ready(Ok(None))`: the end of the stream, returned again by every later
///   call.
/// - `Ready(Err(e))`: a failure; items delivered before it were complete.
///   Whether items follow is the source's to document, in one of two kinds:
///   a broken connection or a malformed frame ends it (later calls return
///   `Ok(None)` or the error again, never more items), while a recoverable
///   report (a panicked offload job, a core subscription's slow-consumer
///   drops) is returned in its place and later items follow.
///
/// # Backpressure
/// A source buffers at most its high watermark (plus the one item that
/// crossed it) and stops asking its peer for more until the consumer has
/// taken enough to bring it to the low watermark: the SSH window, the ZeroMQ
/// HWM or the JetStream pull demand carries the pause to the remote side.
///
/// # Fairness
/// Every item returned without waiting consumes tokio's coop budget and a
/// [`Fairness`] budget of items and bytes; when either is spent the source
/// returns `Pending` once (having woken the waker), so an always-ready source
/// cannot starve timers or other tasks.
///
/// # Cancel safety
/// `poll_recv` and `poll_recv_many` may be abandoned at any `Pending`: no
/// item is taken until it is returned.
pub trait Source: Send {
    /// What this source yields.
    type Item: Send + 'static;

    /// The next item; see the outcomes above.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Self::Item>, FlowError>>;

    /// Appends at least one and at most `max` items that are ready, to `buf`:
    /// `Ready(Ok(n))` with `n >= 1`, or `Ready(Ok(0))` at the end of the
    /// stream (or for `max == 0`). On an error the items already appended
    /// stay in `buf`. The provided method calls `poll_recv` until it is
    /// pending; a source with a batch path overrides it.
    fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<Self::Item>,
        max: usize,
    ) -> Poll<Result<usize, FlowError>> {
        if max == 0 {
            return Poll::Ready(Ok(0));
        }
        match std::task::ready!(self.poll_recv(cx)) {
            Ok(Some(item)) => buf.push(item),
            Ok(None) => return Poll::Ready(Ok(0)),
            Err(e) => return Poll::Ready(Err(e)),
        }
        let mut n = 1;
        while n < max {
            // A `Pending` here leaves this task's waker with the source: at
            // worst a spurious wake-up later.
            match self.poll_recv(cx) {
                Poll::Ready(Ok(Some(item))) => {
                    buf.push(item);
                    n += 1;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(None)) | Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(n))
    }

    /// A snapshot of what the source holds and has delivered.
    fn stats(&self) -> FlowStats;
}

/// An item a [`Sink`] did not accept, with the reason.
///
/// As tokio-util's `PollSendError`: the caller gets the item back to retry,
/// count or log it.
pub struct SendError<T> {
    item: T,
    error: FlowError,
}

impl<T> SendError<T> {
    /// `item` was refused because of `error`.
    pub fn new(item: T, error: FlowError) -> Self {
        SendError { item, error }
    }

    /// `item` was refused because the sink is closed.
    pub fn closed(item: T) -> Self {
        SendError::new(item, FlowError::Closed)
    }

    /// Why it was refused.
    pub fn error(&self) -> &FlowError {
        &self.error
    }

    /// The item that was not accepted.
    pub fn into_inner(self) -> T {
        self.item
    }

    /// The item and the reason.
    pub fn into_parts(self) -> (T, FlowError) {
        (self.item, self.error)
    }

    /// The reason, dropping the item.
    pub fn into_error(self) -> FlowError {
        self.error
    }
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "item not accepted: {}", self.error)
    }
}

impl<T> std::error::Error for SendError<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<T> From<SendError<T>> for FlowError {
    fn from(e: SendError<T>) -> Self {
        e.error
    }
}

/// Why [`SinkExt::try_send`] did not accept an item; either way the item
/// comes back.
#[derive(Debug)]
pub enum TrySendError<T> {
    /// The sink is paused (above its high watermark, or its transport has no
    /// room) or this task's coop budget is spent: try again after
    /// [`SinkExt::ready`]. Aeron's `offer` returns `BACK_PRESSURED` here.
    Paused(T),
    /// The sink failed or is closed.
    Failed(SendError<T>),
}

impl<T> TrySendError<T> {
    /// The item that was not accepted.
    pub fn into_inner(self) -> T {
        match self {
            TrySendError::Paused(item) => item,
            TrySendError::Failed(e) => e.into_inner(),
        }
    }

    /// True for [`TrySendError::Paused`].
    pub fn is_paused(&self) -> bool {
        matches!(self, TrySendError::Paused(_))
    }
}

impl<T> fmt::Display for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Paused(_) => f.write_str("sink paused: above its high watermark"),
            TrySendError::Failed(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl<T: fmt::Debug> std::error::Error for TrySendError<T> {}

/// Async conveniences for every [`Sink`]; the futures are named types, no
/// boxing.
pub trait SinkExt: Sink {
    /// Resolves when the sink accepts another item
    /// ([`poll_ready`](Sink::poll_ready)). Cancel-safe.
    fn ready(&mut self) -> ReadyFuture<'_, Self> {
        ReadyFuture { sink: self }
    }

    /// `ready`, then `start_send(item)`. On failure the item is dropped
    /// (the error says why); use `ready` + `start_send` or `try_send` to get
    /// it back. Dropping the future before it resolves drops the item, which
    /// was never accepted.
    fn send(&mut self, item: Self::Item) -> SendFuture<'_, Self> {
        SendFuture {
            sink: self,
            item: Some(item),
        }
    }

    /// Accepts `item` if the sink is ready now, without waiting; otherwise
    /// gives it back.
    fn try_send(&mut self, item: Self::Item) -> Result<(), TrySendError<Self::Item>> {
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll_ready(&mut cx) {
            Poll::Pending => Err(TrySendError::Paused(item)),
            Poll::Ready(Err(e)) => Err(TrySendError::Failed(SendError::new(item, e))),
            Poll::Ready(Ok(())) => self.start_send(item).map_err(TrySendError::Failed),
        }
    }

    /// Resolves once every accepted item has been taken
    /// ([`poll_flush`](Sink::poll_flush)). Cancel-safe.
    fn flush(&mut self) -> FlushFuture<'_, Self> {
        FlushFuture { sink: self }
    }

    /// Flushes, then closes ([`poll_close`](Sink::poll_close)). Idempotent and
    /// cancel-safe.
    fn close(&mut self) -> CloseFuture<'_, Self> {
        CloseFuture { sink: self }
    }

    /// This sink as a `futures::Sink<Self::Item, Error = FlowError>`, for
    /// `StreamExt::forward` and the rest of the futures ecosystem.
    fn into_futures_sink(self) -> crate::compat::IntoFuturesSink<Self>
    where
        Self: Sized,
    {
        crate::compat::IntoFuturesSink::new(self)
    }
}

impl<K: Sink + ?Sized> SinkExt for K {}

/// Async conveniences and combinators for every [`Source`]; the futures are
/// named types, no boxing.
pub trait SourceExt: Source {
    /// The next item; `Ok(None)` at the end of the stream
    /// ([`poll_recv`](Source::poll_recv)). Cancel-safe and fair.
    fn recv(&mut self) -> RecvFuture<'_, Self> {
        RecvFuture { src: self }
    }

    /// Waits for one item, then appends up to `max` in all that are ready
    /// ([`poll_recv_many`](Source::poll_recv_many)). Returns how many were
    /// appended; 0 means the end of the stream (or `max == 0`). Cancel-safe.
    fn recv_many<'a>(
        &'a mut self,
        buf: &'a mut Vec<Self::Item>,
        max: usize,
    ) -> RecvManyFuture<'a, Self> {
        RecvManyFuture {
            src: self,
            buf,
            max,
        }
    }

    /// Makes a foreign source fair: yields after `fairness` worth of items or
    /// bytes, and consumes tokio's coop budget per item. Built-in sources are
    /// fair already.
    fn fair(self, fairness: Fairness) -> Fair<Self>
    where
        Self: Sized,
        Self::Item: Weighted,
    {
        Fair::new(self, fairness)
    }

    /// This source as a `futures::Stream` of `Result<Item, FlowError>`,
    /// without boxing: it ends after `Ok(None)`; an error is yielded as an
    /// item and the stream goes on as the source does (see
    /// [`Source`]'s outcomes). Works on `&mut S` too.
    fn into_stream(self) -> crate::compat::SourceStream<Self>
    where
        Self: Sized,
    {
        crate::compat::SourceStream::new(self)
    }

    /// A source of `Bytes` as a `tokio::io::AsyncRead` and `AsyncBufRead`
    /// (`poll_fill_buf` lends the received chunk itself: no copy), for
    /// `tokio::io::copy`, decoders and `FramedRead`.
    fn into_async_read(self) -> crate::compat::SourceReader<Self>
    where
        Self: Sized + Source<Item = bytes::Bytes>,
    {
        crate::compat::SourceReader::new(self)
    }
}

impl<S: Source + ?Sized> SourceExt for S {}

/// The future of [`SinkExt::ready`].
#[must_use = "futures do nothing unless polled"]
#[derive(Debug)]
pub struct ReadyFuture<'a, K: ?Sized> {
    sink: &'a mut K,
}

impl<K: Sink + ?Sized> Future for ReadyFuture<'_, K> {
    type Output = Result<(), FlowError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().sink.poll_ready(cx)
    }
}

/// The future of [`SinkExt::send`].
#[must_use = "futures do nothing unless polled"]
pub struct SendFuture<'a, K: Sink + ?Sized> {
    sink: &'a mut K,
    item: Option<K::Item>,
}

// The item is moved out, never pinned.
impl<K: Sink + ?Sized> Unpin for SendFuture<'_, K> {}

impl<K: Sink + ?Sized> fmt::Debug for SendFuture<'_, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendFuture")
            .field("sent", &self.item.is_none())
            .finish_non_exhaustive()
    }
}

impl<K: Sink + ?Sized> Future for SendFuture<'_, K> {
    type Output = Result<(), FlowError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.item.is_none() {
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(this.sink.poll_ready(cx))?;
        let Some(item) = this.item.take() else {
            return Poll::Ready(Ok(()));
        };
        Poll::Ready(this.sink.start_send(item).map_err(SendError::into_error))
    }
}

/// The future of [`SinkExt::flush`].
#[must_use = "futures do nothing unless polled"]
#[derive(Debug)]
pub struct FlushFuture<'a, K: ?Sized> {
    sink: &'a mut K,
}

impl<K: Sink + ?Sized> Future for FlushFuture<'_, K> {
    type Output = Result<(), FlowError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().sink.poll_flush(cx)
    }
}

/// The future of [`SinkExt::close`].
#[must_use = "futures do nothing unless polled"]
#[derive(Debug)]
pub struct CloseFuture<'a, K: ?Sized> {
    sink: &'a mut K,
}

impl<K: Sink + ?Sized> Future for CloseFuture<'_, K> {
    type Output = Result<(), FlowError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().sink.poll_close(cx)
    }
}

/// The future of [`SourceExt::recv`].
#[must_use = "futures do nothing unless polled"]
#[derive(Debug)]
pub struct RecvFuture<'a, S: ?Sized> {
    src: &'a mut S,
}

impl<S: Source + ?Sized> Future for RecvFuture<'_, S> {
    type Output = Result<Option<S::Item>, FlowError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().src.poll_recv(cx)
    }
}

/// The future of [`SourceExt::recv_many`].
#[must_use = "futures do nothing unless polled"]
pub struct RecvManyFuture<'a, S: Source + ?Sized> {
    src: &'a mut S,
    buf: &'a mut Vec<S::Item>,
    max: usize,
}

impl<S: Source + ?Sized> fmt::Debug for RecvManyFuture<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvManyFuture")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl<S: Source + ?Sized> Future for RecvManyFuture<'_, S> {
    type Output = Result<usize, FlowError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.src.poll_recv_many(cx, this.buf, this.max)
    }
}

impl<S: Source + ?Sized> Source for Box<S> {
    type Item = S::Item;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<S::Item>, FlowError>> {
        (**self).poll_recv(cx)
    }

    fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<S::Item>,
        max: usize,
    ) -> Poll<Result<usize, FlowError>> {
        (**self).poll_recv_many(cx, buf, max)
    }

    fn stats(&self) -> FlowStats {
        (**self).stats()
    }
}

impl<S: Source + ?Sized> Source for &mut S {
    type Item = S::Item;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<S::Item>, FlowError>> {
        (**self).poll_recv(cx)
    }

    fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<S::Item>,
        max: usize,
    ) -> Poll<Result<usize, FlowError>> {
        (**self).poll_recv_many(cx, buf, max)
    }

    fn stats(&self) -> FlowStats {
        (**self).stats()
    }
}

impl<K: Sink + ?Sized> Sink for Box<K> {
    type Item = K::Item;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        (**self).poll_ready(cx)
    }

    fn start_send(&mut self, item: K::Item) -> Result<(), SendError<K::Item>> {
        (**self).start_send(item)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        (**self).poll_flush(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        (**self).poll_close(cx)
    }

    fn stats(&self) -> FlowStats {
        (**self).stats()
    }

    fn writability(&self) -> Option<Writability> {
        (**self).writability()
    }
}

impl<K: Sink + ?Sized> Sink for &mut K {
    type Item = K::Item;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        (**self).poll_ready(cx)
    }

    fn start_send(&mut self, item: K::Item) -> Result<(), SendError<K::Item>> {
        (**self).start_send(item)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        (**self).poll_flush(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        (**self).poll_close(cx)
    }

    fn stats(&self) -> FlowStats {
        (**self).stats()
    }

    fn writability(&self) -> Option<Writability> {
        (**self).writability()
    }
}
