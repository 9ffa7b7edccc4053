//! Moving a whole stream from a source into a sink.

use std::future::poll_fn;
use std::task::Poll;

use crate::{FlowError, PumpStats, Sink, SinkExt, Source};

/// Moves every item from `src` into `sink` until the end of the stream, then
/// closes the sink (flushing it) and returns what was moved.
///
/// The pump holds at most one item of its own: for each item it waits for
/// `sink.ready()`, then takes the next item from `src`, then hands it over. So a
/// slow sink stops the pump, the pump stops taking from the source, and the
/// source's watermarks carry the pause back to its peer: backpressure crosses
/// the pump without a buffer in between.
///
/// Whenever the source has no item ready, the pump flushes the sink while it
/// waits for one, so an item never sits in a buffered sink (a `BufWriter`, a
/// transport's batch) just because the next one is slow to come.
///
/// Bytes are the sink's [`FlowStats::bytes`](crate::FlowStats::bytes) count of
/// what it accepted during the pump.
///
/// # Errors
/// The first error of the source, the sink or the final close, wrapped in
/// [`FlowError::Pump`] with the items and bytes the sink had accepted before it.
/// If the sink fails to accept an item, that one item (taken from the source
/// and not accepted) is dropped; everything counted in the error was accepted.
///
/// # Cancel safety
/// Dropping the future loses nothing: an item is taken from the source
/// only after the sink is ready, and handed over in the same poll. The sink is left open. A flush cut short by the drop loses
/// nothing either: the sink keeps what it has not written yet.
///
/// ```
/// use bytes::Bytes;
/// use flowctl_core::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flowctl_core::FlowError> {
/// let wm = Watermarks::new(0, 1 << 16)?;
/// let (mut tx, mut a) = pipe::<Bytes>(wm);
/// let (mut b_tx, mut b) = pipe::<Bytes>(wm);
/// tokio::spawn(async move {
///     tx.send(Bytes::from_static(b"hello")).await?;
///     tx.close().await
/// });
/// let moved = pump(&mut a, &mut b_tx).await?;
/// assert_eq!((moved.items, moved.bytes), (1, 5));
/// assert_eq!(b.recv().await?, Some(Bytes::from_static(b"hello")));
/// assert_eq!(b.recv().await?, None); // the pump closed b_tx
/// # Ok(()) }
/// ```
pub async fn pump<S, K>(src: &mut S, sink: &mut K) -> Result<PumpStats, FlowError>
where
    S: Source + ?Sized,
    K: Sink<Item = S::Item> + ?Sized,
{
    // Bytes are the sink's own count of what it accepted, so the pump needs no
    // bound on the item type.
    let bytes_before = sink.stats().bytes;
    let mut items = 0u64;
    // The sink was flushed during the current wait for the source.
    let mut flushed = false;
    let moved = poll_fn(|cx| {
        loop {
            if let Err(e) = std::task::ready!(sink.poll_ready(cx)) {
                return Poll::Ready(Err(e));
            }
            match src.poll_recv(cx) {
                Poll::Ready(Ok(Some(item))) => {
                    flushed = false;
                    if let Err(e) = sink.start_send(item) {
                        return Poll::Ready(Err(e.into_error()));
                    }
                    items += 1;
                }
                Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // The source is about to wait: push out what the sink
                    // holds (as futures' `Forward` does), so that a trickle
                    // does not stall behind a buffer. An item that arrives
                    // first cuts the flush short (the sink keeps its
                    // progress, and the next wait flushes again).
                    if !flushed {
                        match sink.poll_flush(cx) {
                            Poll::Ready(Ok(())) => flushed = true,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    })
    .await;
    let fail = |items: u64, sink: &K, e: FlowError| FlowError::Pump {
        items,
        bytes: sink.stats().bytes.saturating_sub(bytes_before),
        source: Box::new(e),
    };
    if let Err(e) = moved {
        return Err(fail(items, sink, e));
    }
    if let Err(e) = sink.close().await {
        return Err(fail(items, sink, e));
    }
    Ok(PumpStats {
        items,
        bytes: sink.stats().bytes.saturating_sub(bytes_before),
    })
}
