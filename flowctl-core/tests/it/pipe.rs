#[allow(unused_imports)]
use flowctl_core::prelude::*;
use std::task::Poll;

use bytes::Bytes;
use flowctl_core::weighted::MIN_CHARGE;
use flowctl_core::{Fairness, FlowError, Sink, Source, Watermarks, pipe, pipe_with};
use futures::FutureExt;

use crate::{payload, seq_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_producers_slow_consumer_bounded_ordered_nothing_lost() {
    const PRODUCERS: u32 = 4;
    const PER: u32 = 2_000;
    const ITEM: usize = 1000;
    let wm = Watermarks::new(8 * 1024, 32 * 1024).unwrap();
    let (tx, mut rx) = pipe::<Bytes>(wm);
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let mut tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER {
                tx.send(payload(p * PER + i, ITEM)).await?;
            }
            tx.close().await
        }));
    }
    drop(tx);
    let mut next = vec![0u32; PRODUCERS as usize];
    let mut n = 0;
    while let Some(item) = rx.recv().await.unwrap() {
        let seq = seq_of(&item);
        let p = (seq / PER) as usize;
        assert_eq!(seq % PER, next[p], "producer {p} out of order");
        next[p] += 1;
        n += 1;
        if n % 7 == 0 {
            tokio::task::yield_now().await; // a consumer slower than the producers
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(n, PRODUCERS * PER);
    let s = rx.stats();
    // Each producer handle may overshoot high by the one item it sent after ready.
    assert!(
        s.max_buffered <= wm.high() + PRODUCERS as usize * ITEM,
        "{s:?}"
    );
    assert!(
        s.pauses > 0,
        "the consumer was slow enough to pause producers: {s:?}"
    );
    assert_eq!(
        (s.buffered, s.items, s.bytes),
        (0, n as u64, n as u64 * ITEM as u64)
    );
}

#[tokio::test]
async fn single_producer_never_exceeds_high_plus_one_item() {
    let wm = Watermarks::new(0, 10_000).unwrap();
    let (mut tx, mut rx) = pipe::<Bytes>(wm);
    let producer = tokio::spawn(async move {
        for i in 0..500u32 {
            tx.send(payload(i, 1 + (i as usize * 37) % 3000))
                .await
                .unwrap();
        }
    });
    let mut max_item = 0;
    let mut i = 0;
    while let Some(item) = rx.recv().await.unwrap() {
        assert_eq!(seq_of(&item), i);
        i += 1;
        max_item = max_item.max(item.len());
    }
    producer.await.unwrap();
    assert!(rx.stats().max_buffered <= wm.high() + max_item);
}

#[tokio::test]
async fn item_larger_than_high_does_not_deadlock() {
    let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::new(0, 10).unwrap());
    tx.send(Bytes::from(vec![1; 1000])).await.unwrap();
    // Now paused: the next send waits until the big item is taken.
    let mut second = Box::pin(tx.send(Bytes::from_static(b"x")));
    assert!(futures::poll!(second.as_mut()).is_pending());
    assert_eq!(rx.recv().await.unwrap().unwrap().len(), 1000);
    second.await.unwrap();
    assert_eq!(rx.recv().await.unwrap().unwrap(), "x");
}

#[tokio::test]
async fn hysteresis_resumes_only_at_low() {
    // Each one-byte item is charged MIN_CHARGE: low is two items, high four.
    let wm = Watermarks::new(2 * MIN_CHARGE, 4 * MIN_CHARGE).unwrap();
    let (mut tx, mut rx) = pipe::<Bytes>(wm);
    for _ in 0..5 {
        tx.send(Bytes::from_static(b"a")).await.unwrap();
    }
    assert!(tx.stats().paused);
    let mut waiting = Box::pin(tx.ready());
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    rx.recv().await.unwrap(); // 4 left: above low
    rx.recv().await.unwrap(); // 3 left
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    rx.recv().await.unwrap(); // 2 == low: resume
    assert!(matches!(
        futures::poll!(waiting.as_mut()),
        Poll::Ready(Ok(()))
    ));
}

#[tokio::test]
async fn end_of_stream_after_every_sink_ends_and_queue_drains() {
    let (mut a, mut rx) = pipe::<Bytes>(Watermarks::default());
    let mut b = a.clone();
    a.send(Bytes::from_static(b"1")).await.unwrap();
    a.close().await.unwrap();
    a.close().await.unwrap(); // idempotent
    assert!(matches!(
        a.send(Bytes::from_static(b"no")).await,
        Err(FlowError::Closed)
    ));
    b.send(Bytes::from_static(b"2")).await.unwrap();
    drop(b);
    assert_eq!(rx.recv().await.unwrap().unwrap(), "1");
    assert_eq!(rx.recv().await.unwrap().unwrap(), "2");
    assert_eq!(rx.recv().await.unwrap(), None);
    assert_eq!(rx.recv().await.unwrap(), None, "end of stream is sticky");
}

#[tokio::test]
async fn dropping_the_source_fails_senders_and_releases_queued_items() {
    let (mut tx, rx) = pipe::<Bytes>(Watermarks::new(0, 4).unwrap());
    tx.send(Bytes::from_static(b"12345")).await.unwrap();
    let mut waiting = Box::pin(tx.send(Bytes::from_static(b"lost")));
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    drop(rx);
    // The waiting send fails: its item was never accepted.
    assert!(matches!(waiting.await, Err(FlowError::Closed)));
    assert!(tx.is_closed());
    let s = Sink::stats(&tx);
    // The queued item was released with the source: nothing is held any more.
    assert_eq!((s.buffered, s.items), (0, 1));
}

#[tokio::test]
async fn cancelled_recv_loses_nothing() {
    let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::default());
    // A recv polled while empty, then dropped.
    assert!(rx.recv().now_or_never().is_none());
    tx.send(Bytes::from_static(b"kept")).await.unwrap();
    // Through the trait object too.
    let src: &mut dyn Source<Item = Bytes> = &mut rx;
    assert_eq!(src.recv().await.unwrap().unwrap(), "kept");
}

#[tokio::test]
async fn cancelled_send_while_paused_accepts_nothing() {
    let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::new(0, 1).unwrap());
    tx.send(Bytes::from_static(b"ab")).await.unwrap();
    assert!(
        tx.send(Bytes::from_static(b"cancelled"))
            .now_or_never()
            .is_none()
    );
    let s = tx.stats();
    assert_eq!((s.items, s.buffered), (1, MIN_CHARGE));
    drop(tx);
    assert_eq!(rx.recv().await.unwrap().unwrap(), "ab");
    assert_eq!(rx.recv().await.unwrap(), None);
}

#[tokio::test]
async fn recv_many_takes_a_batch_and_credits_it() {
    let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::new(0, 1000).unwrap());
    for i in 0..10 {
        tx.send(payload(i, 100)).await.unwrap();
    }
    let mut buf = Vec::new();
    assert_eq!(rx.recv_many(&mut buf, 4).await.unwrap(), 4);
    assert_eq!(rx.stats().buffered, 600);
    assert_eq!(rx.recv_many(&mut buf, 100).await.unwrap(), 6);
    let seqs: Vec<u32> = buf.iter().map(|b| seq_of(b)).collect();
    assert_eq!(seqs, (0..10).collect::<Vec<_>>());
    drop(tx);
    assert_eq!(rx.recv_many(&mut buf, 100).await.unwrap(), 0);
}

#[tokio::test]
async fn default_recv_many_of_a_foreign_source_batches_what_is_ready() {
    let src = futures::stream::iter((0..10u32).collect::<Vec<_>>());
    let mut src = flowctl_core::compat::StreamSource::with_fairness(
        src,
        Fairness::new(1000, 1 << 20).unwrap(),
    );
    let mut buf = Vec::new();
    assert_eq!(src.recv_many(&mut buf, 3).await.unwrap(), 3);
    assert_eq!(src.recv_many(&mut buf, 100).await.unwrap(), 7);
    assert_eq!(buf, (0..10).collect::<Vec<_>>());
    assert_eq!(src.recv_many(&mut buf, 100).await.unwrap(), 0);
}

#[tokio::test]
async fn a_one_item_fairness_slice_still_delivers_everything_in_order() {
    let (mut tx, mut rx) = pipe_with::<Bytes>(
        Watermarks::new(0, 1 << 20).unwrap(),
        Fairness::new(1, 1).unwrap(),
    );
    for i in 0..100 {
        tx.send(payload(i, 8)).await.unwrap();
    }
    drop(tx);
    let mut n = 0;
    while let Some(b) = rx.recv().await.unwrap() {
        assert_eq!(seq_of(&b), n);
        n += 1;
    }
    assert_eq!(n, 100);
}

#[tokio::test]
async fn flush_waits_until_the_source_has_taken_everything() {
    let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::default());
    tx.send(Bytes::from_static(b"a")).await.unwrap();
    tx.send(Bytes::from_static(b"b")).await.unwrap();
    let mut flushing = Box::pin(SinkExt::flush(&mut tx));
    assert!(futures::poll!(flushing.as_mut()).is_pending());
    rx.recv().await.unwrap();
    assert!(
        futures::poll!(flushing.as_mut()).is_pending(),
        "one item is still queued"
    );
    rx.recv().await.unwrap();
    assert!(matches!(
        futures::poll!(flushing.as_mut()),
        Poll::Ready(Ok(()))
    ));
    drop(flushing);
    // With the source gone, a flush with items outstanding fails: they were released.
    tx.send(Bytes::from_static(b"c")).await.unwrap();
    let mut flushing = Box::pin(tx.flush());
    assert!(futures::poll!(flushing.as_mut()).is_pending());
    drop(rx);
    assert!(matches!(flushing.await, Err(FlowError::Closed)));
}

/// Issue 15, item 4: an item of weight 0 used to be charged 0 bytes, so a pipe
/// of `()` or of empty `Bytes` accepted a million items without a pause. Every
/// item is now charged at least `MIN_CHARGE`. A plain test (no runtime), so
/// tokio's coop budget does not end the loop: only the gate can.
#[test]
fn zero_weight_items_are_charged_and_pause_the_pipe() {
    fn fill<T: flowctl_core::Weighted + Send + 'static>(item: fn() -> T) {
        let wm = Watermarks::new(1024, 4096).unwrap();
        let (mut tx, mut rx) = pipe::<T>(wm);
        let mut accepted = 0u64;
        for _ in 0..1_000_000 {
            match tx.send(item()).now_or_never() {
                Some(Ok(())) => accepted += 1,
                Some(Err(e)) => panic!("send failed: {e}"),
                None => break, // paused
            }
        }
        let s = rx.stats();
        assert_eq!(s.pauses, 1, "the pipe paused: {s:?}");
        assert!(s.paused, "{s:?}");
        assert!(s.buffered <= wm.high() + MIN_CHARGE, "{s:?}");
        assert_eq!(accepted, (wm.high() / MIN_CHARGE + 1) as u64);
        assert_eq!((s.items, s.bytes), (accepted, 0), "bytes count payload");
        // Credits match charges: draining returns the count to zero and resumes.
        for _ in 0..accepted {
            assert!(matches!(rx.recv().now_or_never(), Some(Ok(Some(_)))));
        }
        let s = rx.stats();
        assert_eq!((s.buffered, s.paused, s.violations), (0, false, 0), "{s:?}");
        assert!(matches!(tx.send(item()).now_or_never(), Some(Ok(()))));
    }
    fill(|| ());
    fill(Bytes::new);
}

/// Small items are charged `MIN_CHARGE` each, also when taken in a batch.
#[test]
fn small_items_are_charged_min_charge_and_credited_in_batches() {
    let wm = Watermarks::new(0, 1 << 20).unwrap();
    let (mut tx, mut rx) = pipe::<Bytes>(wm);
    for _ in 0..10 {
        tx.start_send(Bytes::from_static(b"abc")).unwrap();
    }
    tx.start_send(Bytes::from(vec![0u8; 1000])).unwrap();
    let s = rx.stats();
    assert_eq!((s.buffered, s.bytes), (10 * MIN_CHARGE + 1000, 30 + 1000));
    let mut buf = Vec::new();
    assert_eq!(
        rx.recv_many(&mut buf, 4).now_or_never().unwrap().unwrap(),
        4
    );
    assert_eq!(rx.stats().buffered, 6 * MIN_CHARGE + 1000);
    assert_eq!(
        rx.recv_many(&mut buf, 100).now_or_never().unwrap().unwrap(),
        7
    );
    assert_eq!(rx.stats().buffered, 0);
}

/// Issue 15, "also fix": cloning a `PipeSink` that was closed counted a new
/// sender, so a source that had already returned `None` was revived and
/// waited forever for an item nobody would send.
#[test]
fn a_clone_of_a_closed_sink_is_closed_and_does_not_revive_the_stream() {
    let wm = Watermarks::new(0, 1024).unwrap();
    let (mut tx, mut rx) = pipe::<Bytes>(wm);
    tx.start_send(Bytes::from_static(b"last")).unwrap();
    tx.close_now();
    assert_eq!(
        rx.recv().now_or_never().unwrap().unwrap(),
        Some(Bytes::from_static(b"last"))
    );
    assert!(matches!(rx.recv().now_or_never(), Some(Ok(None))));
    let mut clone = tx.clone();
    assert!(clone.is_closed());
    assert!(matches!(
        clone.send(Bytes::from_static(b"x")).now_or_never(),
        Some(Err(FlowError::Closed))
    ));
    assert!(
        matches!(rx.recv().now_or_never(), Some(Ok(None))),
        "the stream stays ended"
    );
    drop(clone);
    assert!(matches!(rx.recv().now_or_never(), Some(Ok(None))));
}
