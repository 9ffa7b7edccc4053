#[allow(unused_imports)]
use flowctl_core::prelude::*;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use flowctl_core::io::WriterSink;
use flowctl_core::{FlowError, Sink, Source, Watermarks, pipe, pump};
use tokio::io::AsyncReadExt;

use crate::{payload, seq_of};

#[tokio::test]
async fn pump_moves_everything_and_closes_the_sink() {
    let wm = Watermarks::new(1024, 4096).unwrap();
    let (mut tx, mut src) = pipe::<Bytes>(wm);
    let (mut sink, mut out) = pipe::<Bytes>(wm);
    let producer = tokio::spawn(async move {
        for i in 0..1000 {
            tx.send(payload(i, 100)).await.unwrap();
        }
    });
    let consumer = tokio::spawn(async move {
        let mut i = 0;
        while let Some(b) = out.recv().await.unwrap() {
            assert_eq!(seq_of(&b), i);
            i += 1;
        }
        (i, out.stats())
    });
    let moved = pump(&mut src, &mut sink).await.unwrap();
    producer.await.unwrap();
    let (received, out_stats) = consumer.await.unwrap();
    assert_eq!((moved.items, moved.bytes), (1000, 100_000));
    assert_eq!(
        received, 1000,
        "the pump closed the sink: the consumer saw the end"
    );
    assert!(out_stats.max_buffered <= 4096 + 100);
}

#[tokio::test]
async fn pump_into_a_writer_keeps_the_bound_and_the_bytes() {
    let wm = Watermarks::new(0, 8192).unwrap();
    let (mut tx, mut src) = pipe::<Bytes>(wm);
    let (writer, mut reader) = tokio::io::duplex(1024);
    let mut sink = WriterSink::new(writer, wm);
    let producer = tokio::spawn(async move {
        for i in 0..2000 {
            tx.send(payload(i, 500)).await.unwrap();
        }
    });
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        reader.read_to_end(&mut all).await.unwrap();
        all
    });
    let moved = pump(&mut src, &mut sink).await.unwrap();
    producer.await.unwrap();
    let all = reader.await.unwrap();
    assert_eq!(moved.bytes, 1_000_000);
    assert_eq!(all.len(), 1_000_000);
    for (i, chunk) in all.chunks(500).enumerate() {
        assert_eq!(seq_of(chunk), i as u32);
    }
    assert!(sink.stats().max_buffered <= 8192 + 500);
}

#[tokio::test]
async fn pump_takes_nothing_when_the_sink_is_already_gone() {
    let (mut tx, mut src) = pipe::<Bytes>(Watermarks::default());
    let (mut sink, out) = pipe::<Bytes>(Watermarks::default());
    for i in 0..10 {
        tx.send(payload(i, 10)).await.unwrap();
    }
    drop(tx);
    drop(out);
    let err = pump(&mut src, &mut sink).await.unwrap_err();
    assert!(
        matches!(err, FlowError::Pump { items: 0, bytes: 0, ref source } if matches!(**source, FlowError::Closed)),
        "{err}"
    );
    // The pump waits for the sink before it takes an item: all ten are still in the source.
    let mut left = 0;
    while src.recv().await.unwrap().is_some() {
        left += 1;
    }
    assert_eq!(left, 10);
}

/// A sink that accepts `capacity` items, then refuses.
struct Refusing {
    accepted: Vec<Bytes>,
    capacity: usize,
    stats: flowctl_core::FlowStats,
}

impl Sink for Refusing {
    type Item = Bytes;
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), FlowError>> {
        Poll::Ready(Ok(()))
    }
    fn start_send(&mut self, item: Bytes) -> Result<(), SendError<Bytes>> {
        if self.accepted.len() == self.capacity {
            return Err(SendError::new(item, FlowError::transport("disk full")));
        }
        self.stats.items += 1;
        self.stats.bytes += item.len() as u64;
        self.accepted.push(item);
        Ok(())
    }
    fn poll_flush(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), FlowError>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), FlowError>> {
        Poll::Ready(Ok(()))
    }
    fn stats(&self) -> flowctl_core::FlowStats {
        self.stats
    }
}

#[tokio::test]
async fn pump_reports_what_the_sink_accepted_before_it_failed() {
    let (mut tx, mut src) = pipe::<Bytes>(Watermarks::default());
    for i in 0..10 {
        tx.send(payload(i, 10)).await.unwrap();
    }
    drop(tx);
    let mut sink = Refusing {
        accepted: Vec::new(),
        capacity: 3,
        stats: flowctl_core::FlowStats::empty(Watermarks::default()),
    };
    let err = pump(&mut src, &mut sink).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "pump stopped after delivering 3 items (30 bytes): transport error: disk full"
    );
    let seqs: Vec<u32> = sink.accepted.iter().map(|b| seq_of(b)).collect();
    assert_eq!(seqs, vec![0, 1, 2]);
    // Item 3 was in the pump's hand and is dropped with the error; 4..10 stay in the source.
    let mut rest = Vec::new();
    while let Some(b) = src.recv().await.unwrap() {
        rest.push(seq_of(&b));
    }
    assert_eq!(rest, (4..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn pump_counts_partial_delivery_before_a_source_error() {
    use flowctl_core::compat::StreamSource;
    // A foreign source that fails after 5 items.
    let items: Vec<Result<Bytes, std::io::Error>> = (0..5)
        .map(|i| Ok(payload(i, 8)))
        .chain(std::iter::once(Err(std::io::Error::other("peer vanished"))))
        .collect();
    struct Failing<S>(S);
    impl<S: Source<Item = Result<Bytes, std::io::Error>>> Source for Failing<S> {
        type Item = Bytes;
        fn poll_recv(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<Result<Option<Bytes>, FlowError>> {
            self.0.poll_recv(cx).map(|r| match r? {
                Some(Ok(b)) => Ok(Some(b)),
                Some(Err(e)) => Err(FlowError::Io(e)),
                None => Ok(None),
            })
        }
        fn stats(&self) -> flowctl_core::FlowStats {
            self.0.stats()
        }
    }
    let mut src = Failing(StreamSource::new(futures::stream::iter(items)));
    let (mut sink, mut out) = pipe::<Bytes>(Watermarks::default());
    let err = pump(&mut src, &mut sink).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "pump stopped after delivering 5 items (40 bytes): i/o error: peer vanished"
    );
    // All five delivered items are in the sink, and the sink was left open.
    for i in 0..5 {
        assert_eq!(seq_of(&out.recv().await.unwrap().unwrap()), i);
    }
    assert!(!sink.is_closed());
}

/// Issue 15, item 6: the pump never flushed while it waited on its source, so
/// an item written into a buffered writer stayed in the buffer until the next
/// item or the end of the stream (a log tail stalled behind a `BufWriter`).
/// The source is a pipe this test feeds by hand: the second item is sent only
/// after the first has reached the reader. The clock is paused and advances
/// only when every task is idle, so the timeout fires exactly when the pump is
/// stuck waiting (a deadlock detector, not a timing threshold).
#[tokio::test(start_paused = true)]
async fn pump_flushes_the_sink_while_the_source_waits() {
    let wm = Watermarks::new(0, 1 << 16).unwrap();
    let (mut tx, mut src) = pipe::<Bytes>(wm);
    let (writer, mut reader) = tokio::io::duplex(1 << 16);
    let mut sink = WriterSink::new(tokio::io::BufWriter::new(writer), wm);
    let pumping = tokio::spawn(async move { pump(&mut src, &mut sink).await });

    let mut buf = vec![0u8; 64];
    for line in [&b"first line\n"[..], b"second line\n"] {
        tx.send(Bytes::from_static(line)).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(3600), reader.read(&mut buf))
            .await
            .expect("the item stayed in the sink's buffer while the source waited")
            .unwrap();
        assert_eq!(&buf[..n], line);
    }
    tx.close().await.unwrap();
    let moved = pumping.await.unwrap().unwrap();
    assert_eq!(moved.items, 2);
    assert_eq!(reader.read(&mut buf).await.unwrap(), 0, "closed at the end");
}

/// Dropping the pump while it flushes and waits on the source loses nothing:
/// the next pump delivers the item that arrives afterwards.
#[tokio::test(start_paused = true)]
async fn a_pump_dropped_while_flushing_and_waiting_loses_nothing() {
    let wm = Watermarks::new(0, 1 << 16).unwrap();
    let (mut tx, mut src) = pipe::<Bytes>(wm);
    let (writer, mut reader) = tokio::io::duplex(1 << 16);
    let mut sink = WriterSink::new(tokio::io::BufWriter::new(writer), wm);
    tx.send(Bytes::from_static(b"one\n")).await.unwrap();
    {
        let pumping = pump(&mut src, &mut sink);
        // Runs until the pump waits on the source (the clock then jumps).
        let res = tokio::time::timeout(Duration::from_secs(3600), pumping).await;
        assert!(res.is_err(), "the pump waits for the source");
    }
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3600), reader.read(&mut buf))
        .await
        .expect("the item stayed in the sink's buffer while the source waited")
        .unwrap();
    assert_eq!(&buf[..n], b"one\n", "flushed before the pump waited");
    tx.send(Bytes::from_static(b"two\n")).await.unwrap();
    tx.close().await.unwrap();
    let moved = pump(&mut src, &mut sink).await.unwrap();
    assert_eq!(moved.items, 1, "the item after the drop was not lost");
    let n = reader.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"two\n");
}
