//! `Stdin` and `Output` through flowctl-core's poll-based contract: refused
//! chunks come back, an abandoned `poll_flush` loses nothing, batches count
//! their bytes, and stdout reads as a `tokio::io::AsyncBufRead`.

use std::process::Stdio;
use std::task::Poll;

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, TrySendError, Watermarks};
use flowctl_ssh::Session;
use tokio::io::AsyncReadExt;

use crate::fixture::{Fixture, Kind, both_servers};

both_servers! {
    recv_many_counts_delivered_and_repeats_the_end => recv_many_counts_delivered_and_repeats_the_end;
    stdin_after_close_gives_the_chunk_back => stdin_after_close_gives_the_chunk_back;
    abandoned_stdin_flush_loses_nothing => abandoned_stdin_flush_loses_nothing;
}

/// `Output::poll_recv_many` (the pipe's batch path) counts every byte in
/// `delivered` and returns the end (0) again after it.
async fn recv_many_counts_delivered_and_repeats_the_end(fx: Fixture) {
    const N: u64 = 4 * 1024 * 1024;
    let session = Session::connect(fx.config()).await.unwrap();
    let mut p = session
        .exec(&format!("head -c {N} /dev/zero"))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (mut bytes, mut batches) = (0u64, 0u64);
    loop {
        buf.clear();
        let n = p.stdout.recv_many(&mut buf, 8).await.unwrap();
        if n == 0 {
            break;
        }
        assert!((1..=8).contains(&n), "batch of {n} items, max 8");
        assert_eq!(buf.len(), n);
        bytes += buf.iter().map(|c| c.len() as u64).sum::<u64>();
        batches += 1;
        assert_eq!(p.stdout.delivered(), bytes, "after batch {batches}");
    }
    assert_eq!(bytes, N);
    assert_eq!(p.stdout.stats().bytes, N);
    assert_eq!(
        p.stdout.recv_many(&mut buf, 8).await.unwrap(),
        0,
        "end repeats"
    );
    assert_eq!(p.stdout.recv().await.unwrap(), None, "end repeats");
    assert_eq!(p.stdout.delivered(), N);
    assert!(p.wait().await.unwrap().success());
}

/// After `close`, every refusal gives the chunk back, and `close` is
/// idempotent.
async fn stdin_after_close_gives_the_chunk_back(fx: Fixture) {
    let session = Session::connect(fx.config()).await.unwrap();
    let mut p = session.exec("wc -c").await.unwrap();
    p.stdin.send(Bytes::from_static(b"12345")).await.unwrap();
    p.stdin.close().await.unwrap();
    p.stdin.close().await.unwrap();
    p.stdin.flush().await.unwrap();
    let chunk = Bytes::from_static(b"refused");
    let err = p.stdin.start_send(chunk.clone()).unwrap_err();
    assert!(matches!(err.error(), FlowError::Closed), "{err}");
    assert_eq!(err.into_inner(), chunk);
    match p.stdin.try_send(chunk.clone()) {
        Err(TrySendError::Failed(e)) => {
            assert!(matches!(e.error(), FlowError::Closed), "{e}");
            assert_eq!(e.into_inner(), chunk);
        }
        other => panic!("expected a closed refusal, got {other:?}"),
    }
    assert!(matches!(p.stdin.ready().await, Err(FlowError::Closed)));
    assert_eq!(p.stdin.stats().bytes, 5, "refused chunks are not counted");
    let out = p.stdout.read_to_end().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out).trim(), "5");
    assert!(p.wait().await.unwrap().success());
}

/// A `poll_flush` that is pending (the remote command does not read yet)
/// and abandoned loses nothing: once the command reads, `flush` completes
/// and every accepted byte arrives. `try_send` on the paused stdin gives the
/// chunk back.
async fn abandoned_stdin_flush_loses_nothing(fx: Fixture) {
    const CHUNK: usize = 32 * 1024;
    let session = Session::connect(fx.config()).await.unwrap();
    let go = fx.path("go");
    let mut p = session
        .exec(&format!(
            "while [ ! -e {go} ]; do sleep 0.01; done; wc -c",
            go = go.display()
        ))
        .await
        .unwrap();
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let mut accepted = 0u64;
    let mut paused = 0u64;
    // Fill stdin until a flush is pending: the pipe is full and the writer
    // cannot hand the rest to the connection (the SSH window and the
    // remote's buffers are full). Finite: the command reads nothing yet.
    loop {
        match p.stdin.try_send(chunk.clone()) {
            Ok(()) => {
                accepted += CHUNK as u64;
                continue;
            }
            Err(TrySendError::Paused(back)) => {
                assert_eq!(back, chunk, "a paused try_send gives the chunk back");
                paused += 1;
            }
            Err(TrySendError::Failed(e)) => panic!("stdin failed: {e}"),
        }
        let flush = std::future::poll_fn(|cx| Poll::Ready(p.stdin.poll_flush(cx))).await;
        match flush {
            // Abandoned here: the waker registered by this poll is dropped.
            Poll::Pending => break,
            Poll::Ready(r) => r.unwrap(),
        }
        // Let the writer task and this task's coop budget move on.
        tokio::task::yield_now().await;
    }
    assert!(paused >= 1);
    assert_eq!(p.stdin.stats().bytes, accepted);
    std::fs::write(&go, b"").unwrap();
    p.stdin.flush().await.unwrap();
    p.stdin.close().await.unwrap();
    let out = p.stdout.read_to_end().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out).trim(), accepted.to_string());
    assert!(p.wait().await.unwrap().success());
}

/// `tokio::io::copy_buf` from an SSH `Output` (as an `AsyncBufRead`, no
/// copy into a buffer of ours) into a local child's stdin: every byte
/// arrives, and stdout buffers no more than with
/// `redirect::output_to_child` (high + 2 packets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_as_async_read_into_a_child_is_bounded() {
    const N: u64 = 8 * 1024 * 1024;
    let fx = Fixture::start(Kind::Embedded).await;
    let config = fx
        .config()
        .watermarks(Watermarks::new(16 * 1024, 64 * 1024).unwrap());
    let (high, max_packet) = (config.watermarks.high(), config.max_packet as usize);
    let s = Session::connect(config).await.unwrap();
    let mut remote = s.exec(&format!("head -c {N} /dev/zero")).await.unwrap();
    let mut local = tokio::process::Command::new("wc")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child_stdin = local.stdin.take().unwrap();
    let mut reader = (&mut remote.stdout).into_async_read();
    let copied = tokio::io::copy_buf(&mut reader, &mut child_stdin)
        .await
        .unwrap();
    drop(child_stdin); // EOF for wc
    assert_eq!(copied, N);
    let mut out = String::new();
    local
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert_eq!(out.trim(), N.to_string());
    assert!(local.wait().await.unwrap().success());
    assert!(remote.wait().await.unwrap().success());
    assert_eq!(remote.stdout.delivered(), N);
    let stats = remote.stdout.stats();
    assert!(
        stats.max_buffered <= high + 2 * max_packet,
        "stdout max_buffered {} above high {high} + 2 packets of {max_packet}",
        stats.max_buffered
    );
}
