//! Moving a whole stream from a source into a sink.

use std::future::poll_fn;
use std::task::Poll;

use crate::{FlowError, PumpStats, Sink, Source};

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
/// Dropping the future loses at most the one item in hand (taken from the
/// source, not yet accepted by the sink); it happens only while `start_send`
/// runs, which does not wait, so in practice a cancelled pump loses nothing:
/// cancellation can only strike while waiting in `ready` or `recv`, both
/// cancel-safe. The sink is left open. A flush cut short by the drop loses
/// nothing either: the sink keeps what it has not written yet.
///
/// ```
/// use bytes::Bytes;
/// use flowctl_core::{pipe, pump, Sink, Watermarks};
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
    S: Source,
    K: Sink<Item = S::Item>,
{
    // Bytes are the sink's own count of what it accepted, so the pump needs no
    // bound on the item type.
    let bytes_before = sink.stats().bytes;
    let mut items = 0u64;
    let fail = |items: u64, sink: &K, e: FlowError| FlowError::Pump {
        items,
        bytes: sink.stats().bytes.saturating_sub(bytes_before),
        source: Box::new(e),
    };
    loop {
        if let Err(e) = sink.ready().await {
            return Err(fail(items, sink, e));
        }
        let received = {
            let mut recv = src.recv();
            match poll_fn(|cx| Poll::Ready(recv.as_mut().poll(cx))).await {
                Poll::Ready(received) => Ok(received),
                // The source is about to wait: push out what the sink holds
                // (as futures' `Forward` does), so that a trickle does not
                // stall behind a buffer. Keep polling the source meanwhile; an
                // item that arrives first cuts the flush short (the sink keeps
                // its progress, and the next wait flushes again).
                Poll::Pending => {
                    let mut flush = Some(sink.flush());
                    poll_fn(|cx| {
                        if let Some(f) = flush.as_mut()
                            && let Poll::Ready(res) = f.as_mut().poll(cx)
                        {
                            flush = None;
                            if let Err(e) = res {
                                return Poll::Ready(Err(e));
                            }
                        }
                        recv.as_mut().poll(cx).map(Ok)
                    })
                    .await
                }
            }
        };
        let item = match received {
            Ok(Ok(Some(item))) => item,
            Ok(Ok(None)) => break,
            Ok(Err(e)) | Err(e) => return Err(fail(items, sink, e)),
        };
        if let Err(e) = sink.start_send(item) {
            return Err(fail(items, sink, e));
        }
        items += 1;
    }
    if let Err(e) = sink.close().await {
        return Err(fail(items, sink, e));
    }
    Ok(PumpStats {
        items,
        bytes: sink.stats().bytes.saturating_sub(bytes_before),
    })
}
