//! Adapters to and from the `futures` ecosystem.
//!
//! - Any [`Source`] is a `futures::Stream` through
//!   [`SourceExt::into_stream`](crate::SourceExt::into_stream).
//! - A `futures::Stream` becomes a fair [`Source`] with [`StreamSource`].
//! - A `futures::Sink` becomes a [`Sink`] with [`FuturesSink`].

use std::future::poll_fn;
use std::marker::PhantomData;
use std::pin::Pin;

use async_trait::async_trait;
use futures::{Stream, StreamExt};

use crate::fair::Budget;
use crate::{BoxError, Fairness, FlowError, FlowStats, Sink, Source, Watermarks, Weighted};

/// A `futures::Stream` as a fair [`Source`].
///
/// The stream's own buffering is not visible to flowctl: `stats().buffered` is
/// always 0, and `items`/`bytes` count what was delivered.
///
/// ```
/// use flowctl_core::{compat::StreamSource, Source};
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
}

#[async_trait]
impl<St> Source for StreamSource<St>
where
    St: Stream + Unpin + Send,
    St::Item: Weighted + Send + 'static,
{
    type Item = St::Item;

    async fn recv(&mut self) -> Result<Option<St::Item>, FlowError> {
        let item = poll_fn(|cx| {
            if self.budget.poll_proceed(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            let poll = self.stream.poll_next_unpin(cx);
            if poll.is_pending() {
                self.budget.reset();
            }
            poll
        })
        .await;
        if let Some(item) = &item {
            let w = item.weight();
            self.budget.charge(w);
            self.stats.items += 1;
            self.stats.bytes += w as u64;
        }
        Ok(item)
    }

    fn stats(&self) -> FlowStats {
        self.stats
    }
}

/// A `futures::Sink` as a [`Sink`]. Its errors become [`FlowError::Transport`].
///
/// The wrapped sink's buffering is its own: `stats().buffered` is always 0.
#[derive(Debug)]
pub struct FuturesSink<K, T> {
    sink: K,
    _item: PhantomData<fn(T)>,
    closed: bool,
    stats: FlowStats,
}

impl<K, T> FuturesSink<K, T> {
    /// Wraps `sink`.
    pub fn new(sink: K) -> Self {
        FuturesSink {
            sink,
            _item: PhantomData,
            closed: false,
            stats: FlowStats::empty(Watermarks::default()),
        }
    }

    /// The wrapped sink.
    pub fn into_inner(self) -> K {
        self.sink
    }
}

fn wrap<E: Into<BoxError>>(e: E) -> FlowError {
    FlowError::Transport(e.into())
}

#[async_trait]
impl<K, T> Sink for FuturesSink<K, T>
where
    K: futures::Sink<T> + Unpin + Send,
    K::Error: Into<BoxError>,
    T: Weighted + Send + 'static,
{
    type Item = T;

    async fn ready(&mut self) -> Result<(), FlowError> {
        if self.closed {
            return Err(FlowError::Closed);
        }
        poll_fn(|cx| Pin::new(&mut self.sink).poll_ready(cx))
            .await
            .map_err(wrap)
    }

    fn start_send(&mut self, item: T) -> Result<(), FlowError> {
        if self.closed {
            return Err(FlowError::Closed);
        }
        let w = item.weight();
        Pin::new(&mut self.sink).start_send(item).map_err(wrap)?;
        self.stats.items += 1;
        self.stats.bytes += w as u64;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), FlowError> {
        poll_fn(|cx| Pin::new(&mut self.sink).poll_flush(cx))
            .await
            .map_err(wrap)
    }

    async fn close(&mut self) -> Result<(), FlowError> {
        if self.closed {
            return Ok(());
        }
        poll_fn(|cx| Pin::new(&mut self.sink).poll_close(cx))
            .await
            .map_err(wrap)?;
        self.closed = true;
        Ok(())
    }

    fn stats(&self) -> FlowStats {
        self.stats
    }
}
