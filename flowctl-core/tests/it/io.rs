//! The AsyncSSH failure in miniature: a fast producer writing into a slow child
//! process's stdin. With `WriterSink` at most `high + one chunk` is ever held,
//! and every byte arrives in order.

#[allow(unused_imports)]
use flowctl_core::prelude::*;
use std::process::Stdio;

use bytes::Bytes;
use flowctl_core::io::{ReaderSource, WriterSink};
use flowctl_core::{Sink, Source, Watermarks, pipe, pump};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::{payload, seq_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_sink_into_a_slow_child_keeps_high_plus_one_chunk() {
    const CHUNK: usize = 16 * 1024;
    const CHUNKS: u32 = 512; // 8 MiB
    let wm = Watermarks::new(64 * 1024, 256 * 1024).unwrap();
    let mut child = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("`cat` is part of coreutils");
    let stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // The slow consumer: reads the child's output in small bites, yielding between them.
    let reader = tokio::spawn(async move {
        let mut out = Vec::with_capacity(CHUNK * CHUNKS as usize);
        let mut bite = [0u8; 4096];
        loop {
            let n = stdout.read(&mut bite).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&bite[..n]);
            tokio::task::yield_now().await;
        }
        out
    });
    let (mut tx, mut src) = pipe::<Bytes>(wm);
    let producer = tokio::spawn(async move {
        for i in 0..CHUNKS {
            tx.send(payload(i, CHUNK)).await.unwrap();
        }
    });
    let mut sink = WriterSink::new(stdin, wm);
    let moved = pump(&mut src, &mut sink).await.unwrap();
    producer.await.unwrap();
    let out = reader.await.unwrap();
    assert!(child.wait().await.unwrap().success());
    assert_eq!(moved.bytes, (CHUNK * CHUNKS as usize) as u64);
    assert_eq!(out.len(), CHUNK * CHUNKS as usize);
    for (i, c) in out.chunks(CHUNK).enumerate() {
        assert_eq!(seq_of(c), i as u32, "chunk {i} out of order");
    }
    let s = sink.stats();
    assert!(s.max_buffered <= wm.high() + CHUNK, "{s:?}");
    assert!(
        s.pauses > 0,
        "the child was slow enough to pause the writer: {s:?}"
    );
    assert_eq!(s.buffered, 0);
}

#[tokio::test]
async fn reader_source_reads_a_child_to_eof_in_bounded_chunks() {
    let mut child = Command::new("head")
        .args(["-c", "1000000", "/dev/zero"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("`head` is part of coreutils");
    let mut src = ReaderSource::with_chunk_size(child.stdout.take().unwrap(), 8192);
    let mut total = 0;
    while let Some(chunk) = src.recv().await.unwrap() {
        assert!(!chunk.is_empty() && chunk.len() <= 8192);
        assert!(chunk.iter().all(|b| *b == 0));
        total += chunk.len();
    }
    assert_eq!(total, 1_000_000);
    assert_eq!(src.stats().bytes, 1_000_000);
    assert_eq!(src.recv().await.unwrap(), None, "end of stream is sticky");
    assert!(child.wait().await.unwrap().success());
}

#[tokio::test]
async fn writer_sink_reports_a_vanished_reader() {
    let (writer, reader) = tokio::io::duplex(64);
    let mut sink = WriterSink::new(writer, Watermarks::new(0, 128).unwrap());
    sink.send(Bytes::from_static(&[7; 100])).await.unwrap();
    drop(reader);
    // The next write hits the broken pipe; the error says so and the sink is closed.
    let err = loop {
        match sink.send(Bytes::from_static(&[7; 100])).await {
            Ok(()) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, flowctl_core::FlowError::Io(_)), "{err}");
    assert_eq!(
        sink.stats().buffered,
        0,
        "queued bytes were released with the error"
    );
    assert!(matches!(
        sink.send(Bytes::from_static(b"x")).await,
        Err(flowctl_core::FlowError::Closed)
    ));
}

/// Issue 15, item 4, in a `WriterSink`: small chunks are charged at least
/// `MIN_CHARGE` each (before, 10-byte chunks were charged 10 and 26 of them
/// fitted under a 256-byte high watermark), and the partial writes plus the
/// overhead credited with a chunk's last byte sum to exactly its charge.
/// A plain test (no runtime): only the gate and the writer can make a call wait.
#[test]
fn writer_sink_charges_small_chunks_min_charge_and_partial_writes_credit_it_exactly() {
    use flowctl_core::weighted::MIN_CHARGE;
    use futures::FutureExt;
    use tokio::io::AsyncReadExt;

    // The duplex takes 3 bytes at a time: every chunk is written in parts.
    let (writer, mut reader) = tokio::io::duplex(3);
    let wm = Watermarks::new(0, 4 * MIN_CHARGE).unwrap();
    let mut sink = WriterSink::new(writer, wm);
    let mut sent = 0u8;
    loop {
        match sink.send(Bytes::from(vec![sent; 10])).now_or_never() {
            Some(Ok(())) => sent += 1,
            Some(Err(e)) => panic!("send failed: {e}"),
            None => break, // paused with a full writer
        }
    }
    let s = sink.stats();
    assert_eq!(
        sent, 5,
        "four chunks fit under high, the fifth crosses it: {s:?}"
    );
    assert!(
        s.paused && s.max_buffered <= wm.high() + MIN_CHARGE,
        "{s:?}"
    );
    assert_eq!(s.buffered, 5 * MIN_CHARGE - 3, "3 bytes written: {s:?}");
    // Drain the reader until the sink has flushed everything.
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        if let Some(res) = sink.flush().now_or_never() {
            res.unwrap();
            break;
        }
        let n = reader.read(&mut buf).now_or_never().unwrap().unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    let s = sink.stats();
    assert_eq!((s.buffered, s.paused, s.violations), (0, false, 0), "{s:?}");
    assert_eq!((s.items, s.bytes, sink.written()), (5, 50, 50));
    while let Some(Ok(n)) = reader.read(&mut buf).now_or_never() {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let want: Vec<u8> = (0..5u8).flat_map(|i| [i; 10]).collect();
    assert_eq!(got, want, "every byte in order");
}
