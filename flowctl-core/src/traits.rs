//! The two traits every stage implements.

use async_trait::async_trait;
use futures::FutureExt;

use crate::fair::Fair;
use crate::{Fairness, FlowError, FlowStats, Weighted};

/// Where items go: a bounded, byte-counted entry into the next stage.
///
/// The protocol is the one of tower's `poll_ready`/`call` and of
/// `futures::Sink`: wait for [`ready`](Sink::ready), then hand over one item with
/// [`start_send`](Sink::start_send); [`send`](Sink::send) does both.
///
/// # Backpressure
/// Every item is charged by its [`Weighted::weight`] when it is accepted, and
/// credited only when the next stage has taken it (written to the socket, handed
/// to the consumer). `ready` is pending while the sink holds more than its high
/// watermark and resolves once it is back at or below the low watermark. An
/// item accepted after `ready` may overshoot `high` by its own size, so an item
/// larger than `high` never deadlocks.
///
/// # Cancel safety
/// `ready` reserves nothing: dropping it loses nothing. `send` is cancel-safe
/// up to the moment the item is accepted; if the future is dropped while waiting
/// in `ready`, the item is dropped with it and was never accepted. `flush` and
/// `close` can be called again after cancellation.
///
/// # Errors
/// [`FlowError::Closed`] once the receiving side is gone; otherwise the
/// transport's error. An item passed to a failing `start_send` is dropped and
/// not counted in [`stats`](Sink::stats).
#[async_trait]
pub trait Sink: Send {
    /// What this sink accepts.
    type Item: Send + 'static;

    /// Resolves when the sink accepts another item. Cancel-safe.
    async fn ready(&mut self) -> Result<(), FlowError>;

    /// Accepts one item without waiting. Call after [`ready`](Sink::ready)
    /// resolved; may overshoot the high watermark by this one item.
    fn start_send(&mut self, item: Self::Item) -> Result<(), FlowError>;

    /// `ready().await` then `start_send(item)`.
    async fn send(&mut self, item: Self::Item) -> Result<(), FlowError> {
        self.ready().await?;
        self.start_send(item)
    }

    /// Waits until every accepted item has been taken by the next stage.
    async fn flush(&mut self) -> Result<(), FlowError>;

    /// Flushes, then closes: the next stage sees the end of the stream.
    /// Idempotent: a second call returns `Ok(())`.
    ///
    /// A channel handle ([`PipeSink`](crate::PipeSink)) is the exception: its
    /// queue belongs to the receiver, so `close` ends the handle without
    /// waiting, and the queued items are still delivered.
    async fn close(&mut self) -> Result<(), FlowError>;

    /// A snapshot of what the sink holds and has accepted.
    fn stats(&self) -> FlowStats;
}

/// Where items come from.
///
/// # Backpressure
/// A source buffers at most its high watermark (plus the one item that crossed
/// it) and stops asking its peer for more until the consumer has taken enough
/// to bring it to the low watermark: the SSH window, the ZeroMQ HWM or the
/// JetStream pull demand carries the pause to the remote side.
///
/// # Fairness
/// Every item returned without waiting consumes tokio's coop budget and a
/// [`Fairness`] budget of items and bytes; when either is spent `recv` yields
/// once, so an always-ready source cannot starve timers or other tasks.
///
/// # Cancel safety
/// `recv` and `recv_many` are cancel-safe: if the future is dropped before it
/// completes, no item has been taken and the next call returns it.
///
/// # Errors
/// An `Err` reports a failure; items delivered before it were complete.
/// Whether the stream goes on after an error is the source's to document: a
/// broken connection or a malformed frame ends it ([`frame::Framed`](crate::frame::Framed)
/// returns `Ok(None)` afterwards), while a recoverable report (a panicked
/// offload job, a core subscription's slow-consumer drops) is returned in its
/// place and later items follow. `Ok(None)` is the end of the stream and is
/// returned again by every later call.
#[async_trait]
pub trait Source: Send {
    /// What this source yields.
    type Item: Send + 'static;

    /// The next item; `Ok(None)` at the end of the stream. Cancel-safe and fair.
    async fn recv(&mut self) -> Result<Option<Self::Item>, FlowError>;

    /// Waits for one item, then appends up to `max` items in all that are
    /// available without waiting. Returns how many were appended; 0 means the
    /// end of the stream (or `max == 0`).
    ///
    /// On error, the items already appended to `buf` stay there.
    async fn recv_many(
        &mut self,
        buf: &mut Vec<Self::Item>,
        max: usize,
    ) -> Result<usize, FlowError> {
        if max == 0 {
            return Ok(0);
        }
        match self.recv().await? {
            Some(item) => buf.push(item),
            None => return Ok(0),
        }
        let mut n = 1;
        while n < max {
            match self.recv().now_or_never() {
                Some(Ok(Some(item))) => {
                    buf.push(item);
                    n += 1;
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(None)) | None => break,
            }
        }
        Ok(n)
    }

    /// A snapshot of what the source holds and has delivered.
    fn stats(&self) -> FlowStats;
}

/// Combinators for every [`Source`].
pub trait SourceExt: Source + Sized {
    /// Makes a foreign source fair: yields after `fairness` worth of items or
    /// bytes, and consumes tokio's coop budget per item. Built-in sources are
    /// fair already.
    fn fair(self, fairness: Fairness) -> Fair<Self>
    where
        Self::Item: Weighted,
    {
        Fair::new(self, fairness)
    }

    /// A `futures::Stream` of `Result<Item, FlowError>`; it ends after `Ok(None)`
    /// or after the first error.
    fn into_stream(self) -> futures::stream::BoxStream<'static, Result<Self::Item, FlowError>>
    where
        Self: 'static,
    {
        Box::pin(futures::stream::unfold(Some(self), |state| async move {
            let mut src = state?;
            match src.recv().await {
                Ok(Some(item)) => Some((Ok(item), Some(src))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        }))
    }
}

impl<S: Source> SourceExt for S {}

#[async_trait]
impl<S: Source + ?Sized> Source for Box<S> {
    type Item = S::Item;

    async fn recv(&mut self) -> Result<Option<S::Item>, FlowError> {
        (**self).recv().await
    }

    async fn recv_many(&mut self, buf: &mut Vec<S::Item>, max: usize) -> Result<usize, FlowError> {
        (**self).recv_many(buf, max).await
    }

    fn stats(&self) -> FlowStats {
        (**self).stats()
    }
}

#[async_trait]
impl<K: Sink + ?Sized> Sink for Box<K> {
    type Item = K::Item;

    async fn ready(&mut self) -> Result<(), FlowError> {
        (**self).ready().await
    }

    fn start_send(&mut self, item: K::Item) -> Result<(), FlowError> {
        (**self).start_send(item)
    }

    async fn flush(&mut self) -> Result<(), FlowError> {
        (**self).flush().await
    }

    async fn close(&mut self) -> Result<(), FlowError> {
        (**self).close().await
    }

    fn stats(&self) -> FlowStats {
        (**self).stats()
    }
}
