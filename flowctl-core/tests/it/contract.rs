//! The 0.2 contract's promises that are not about one stage: items given
//! back, `try_send`, object safety, and interop both ways with `futures`
//! and `tokio::io`.

use std::task::Poll;

use bytes::Bytes;
use flowctl_core::compat::{SinkWriter, TryStreamSource};
use flowctl_core::frame::{FramedRead, FramedWrite};
use flowctl_core::prelude::*;
use futures::{FutureExt, StreamExt as _};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio_util::codec::{LengthDelimitedCodec, LinesCodec};

#[tokio::test]
async fn a_refused_item_comes_back_with_the_reason() {
    let (mut tx, rx) = pipe::<Bytes>(Watermarks::default());
    drop(rx);
    let item = Bytes::from_static(b"precious");
    let err = tx.start_send(item.clone()).unwrap_err();
    assert!(matches!(err.error(), FlowError::Closed));
    assert_eq!(err.into_inner(), item);
    // try_send on a broken sink: failed, item back.
    match tx.try_send(item.clone()) {
        Err(TrySendError::Failed(e)) => assert_eq!(e.into_inner(), item),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(tx.stats().items, 0, "refused items are not counted");
}

#[tokio::test]
async fn try_send_never_waits_and_returns_the_item_while_paused() {
    let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::new(0, 100).unwrap());
    let mut accepted = 0;
    let back = loop {
        match tx.try_send(Bytes::from(vec![7u8; 60])) {
            Ok(()) => accepted += 1,
            Err(TrySendError::Paused(item)) => break item,
            Err(TrySendError::Failed(e)) => panic!("{e}"),
        }
    };
    assert_eq!(back.len(), 60, "the paused item came back whole");
    // Paused after crossing high: 2 items (120 bytes), at most high + one item.
    assert_eq!(accepted, 2);
    assert!(tx.stats().max_buffered <= 100 + 60);
    // Drain to low (0): accepted again.
    while tx.stats().buffered > 0 {
        rx.recv().await.unwrap();
    }
    assert!(tx.try_send(back).is_ok());
}

#[tokio::test]
async fn boxed_trait_objects_are_sources_and_sinks() {
    let (tx, rx) = pipe::<Bytes>(Watermarks::default());
    let mut sink: Box<dyn Sink<Item = Bytes> + Send> = Box::new(tx);
    let mut src: Box<dyn Source<Item = Bytes> + Send> = Box::new(rx);
    sink.send(Bytes::from_static(b"x")).await.unwrap();
    sink.close().await.unwrap();
    let moved = tokio::spawn(async move {
        let mut got = Vec::new();
        src.recv_many(&mut got, 10).await.unwrap();
        (got, src.recv().await.unwrap())
    })
    .await
    .unwrap();
    assert_eq!(moved, (vec![Bytes::from_static(b"x")], None));
}

#[tokio::test]
async fn a_source_of_bytes_is_async_buf_read_without_a_copy() {
    let (mut tx, rx) = pipe::<Bytes>(Watermarks::default());
    let first = Bytes::from_static(b"one\ntw");
    tx.send(first.clone()).await.unwrap();
    tx.send(Bytes::new()).await.unwrap(); // skipped
    tx.send(Bytes::from_static(b"o\nthree")).await.unwrap();
    tx.close().await.unwrap();
    let mut reader = rx.into_async_read();
    let lent = reader.fill_buf().await.unwrap();
    assert_eq!(
        lent.as_ptr(),
        first.as_ptr(),
        "fill_buf lends the chunk itself"
    );
    let mut lines = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line).await.unwrap() > 0 {
        lines.push(std::mem::take(&mut line));
    }
    assert_eq!(lines, ["one\n", "two\n", "three"]);
}

#[tokio::test]
async fn tokio_io_copy_runs_from_a_source_into_a_sink_within_the_watermarks() {
    let (mut tx, rx) = pipe::<Bytes>(Watermarks::new(1024, 4096).unwrap());
    let (out_tx, mut out) = pipe::<Bytes>(Watermarks::new(1024, 8192).unwrap());
    let producer = tokio::spawn(async move {
        for i in 0..200u8 {
            tx.send(Bytes::from(vec![i; 1000])).await?;
        }
        tx.close().await
    });
    let copier = tokio::spawn(async move {
        let mut w = SinkWriter::new(out_tx);
        tokio::io::copy(&mut rx.into_async_read(), &mut w).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut w).await?;
        Ok::<_, std::io::Error>(w.into_inner().stats())
    });
    let mut got = Vec::new();
    while let Some(chunk) = out.recv().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    producer.await.unwrap().unwrap();
    let stats = copier.await.unwrap().unwrap();
    let want: Vec<u8> = (0..200u8).flat_map(|i| vec![i; 1000]).collect();
    assert_eq!(got, want, "nothing lost, reordered or duplicated");
    // tokio::io::copy writes at most its 8 KiB buffer at a time.
    assert!(stats.max_buffered <= 8192 + 8192, "{stats:?}");
}

#[tokio::test]
async fn a_stream_forwards_into_a_flowctl_sink_with_backpressure() {
    let (tx, mut rx) = pipe::<Bytes>(Watermarks::new(0, 1000).unwrap());
    let items = futures::stream::iter((0..100u8).map(|i| Ok(Bytes::from(vec![i; 100]))));
    let forward = tokio::spawn(items.forward(tx.into_futures_sink()));
    let mut n = 0u8;
    while let Some(b) = rx.recv().await.unwrap() {
        assert_eq!(b[0], n);
        assert!(rx.stats().max_buffered <= 1000 + 100);
        n += 1;
    }
    assert_eq!(n, 100);
    forward.await.unwrap().unwrap();
}

#[tokio::test]
async fn try_stream_errors_stay_errors_and_later_items_follow() {
    let items = vec![
        Ok(Bytes::from_static(b"a")),
        Err(std::io::Error::other("peer hiccup")),
        Ok(Bytes::from_static(b"b")),
    ];
    let src = TryStreamSource::new(futures::stream::iter(items));
    let got: Vec<Result<Bytes, FlowError>> = src.into_stream().collect().await;
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].as_ref().unwrap(), "a");
    assert!(matches!(&got[1], Err(FlowError::Io(e)) if e.to_string() == "peer hiccup"));
    assert_eq!(got[2].as_ref().unwrap(), "b");
}

#[tokio::test]
async fn a_borrowed_source_streams_and_stays_usable() {
    let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::default());
    for b in [&b"1"[..], b"2", b"3"] {
        tx.send(Bytes::copy_from_slice(b)).await.unwrap();
    }
    let two: Vec<_> = (&mut rx).into_stream().take(2).collect().await;
    assert_eq!(two.len(), 2);
    assert_eq!(rx.recv().await.unwrap().as_deref(), Some(&b"3"[..]));
}

#[tokio::test]
async fn framed_write_and_read_round_trip_and_an_encoding_error_is_deferred() {
    let (tx, rx) = pipe::<Bytes>(Watermarks::default());
    let mut codec = LengthDelimitedCodec::new();
    codec.set_max_frame_length(8);
    let mut w = FramedWrite::new(tx, codec);
    w.send(Bytes::from_static(b"short")).await.unwrap();
    // Too long for the encoder: consumed by it, reported by the next poll.
    w.start_send(Bytes::from_static(b"much too long")).unwrap();
    let err = w.flush().await.unwrap_err();
    assert!(matches!(err, FlowError::Io(_)), "{err}");
    // The stage is closed now: a later item comes back.
    let back = w.start_send(Bytes::from_static(b"late")).unwrap_err();
    assert_eq!(back.into_inner(), "late");
    drop(w);
    let mut r = FramedRead::new(rx, LengthDelimitedCodec::new());
    assert_eq!(r.recv().await.unwrap().as_deref(), Some(&b"short"[..]));
    assert_eq!(r.recv().await.unwrap(), None);

    // Lines both ways, through tokio-util's codecs.
    let (tx, rx) = pipe::<Bytes>(Watermarks::default());
    let mut w = FramedWrite::new(tx, LinesCodec::new());
    for l in ["a", "b"] {
        w.send(l.to_owned()).await.unwrap();
    }
    w.close().await.unwrap();
    let mut text = String::new();
    rx.into_async_read()
        .read_to_string(&mut text)
        .await
        .unwrap();
    assert_eq!(text, "a\nb\n");
}

#[test]
fn the_named_futures_are_plain_poll_calls() {
    // No runtime, no boxing: the futures poll the trait directly.
    let (mut tx, mut rx) = pipe::<u32>(Watermarks::default());
    assert!(matches!(tx.send(7).now_or_never(), Some(Ok(()))));
    let mut buf = Vec::new();
    assert!(matches!(
        rx.recv_many(&mut buf, 4).now_or_never(),
        Some(Ok(1))
    ));
    assert_eq!(buf, [7]);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(matches!(rx.poll_recv(&mut cx), Poll::Pending));
    assert!(std::mem::size_of_val(&rx.recv()) <= 2 * std::mem::size_of::<usize>());
}
