//! `ZmqSink::send_many`: the same bound as `send` against a slow pyzmq
//! receiver, every message once and in order, cancel-safe at any point, and
//! a bad message in the middle of a batch reported without losing the rest.

use std::collections::VecDeque;

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::weighted::MIN_CHARGE;
use flowctl_core::{Sink, Watermarks};
use flowctl_zmq::{Context, Multipart, SocketType, ZmqError, ZmqSink, ZmqSocket, ZmqSource};

use crate::peer::{Peer, message};

const SIZE: usize = 64 * 1024;

fn wm() -> Watermarks {
    Watermarks::new(256 * 1024, 1024 * 1024).unwrap()
}

/// 500 x 64 KiB into a slow pyzmq PULL: far more than libzmq's queues and the
/// socket buffers hold (as in backpressure.rs), sent in batches of 64. With
/// `send_first`, single `send`s run first until the sink queues one itself,
/// so that the batches go in behind the queued messages: the peer reads
/// nothing until then, or a sender no faster than the reader (a loaded
/// machine) would never queue.
async fn slow_pyzmq_pull(send_first: bool) -> flowctl_core::FlowStats {
    let n = 500;
    let mut peer = if send_first {
        Peer::slow_pull_gated(n, SIZE)
    } else {
        Peer::slow_pull(n, SIZE)
    };
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .watermarks(wm())
        .expected_message_size(SIZE)
        .connect(&peer.endpoint)
        .build()
        .unwrap()
        .into_sink();
    let mut next = 0;
    while send_first && tx.queued() == 0 {
        assert!(next < n / 2, "the sink queued nothing in {next} messages");
        tx.send(message(next, SIZE).into()).await.unwrap();
        next += 1;
    }
    if send_first {
        peer.tell("GO");
    }
    let mut batch = VecDeque::new();
    while next < n {
        let end = n.min(next + 64);
        batch.extend((next..end).map(|i| Multipart::from(message(i, SIZE))));
        let k = batch.len();
        assert_eq!(tx.send_many(&mut batch).await.unwrap(), k);
        assert!(batch.is_empty(), "an Ok send_many takes every message");
        next = end;
    }
    tx.close().await.unwrap();
    let stats = tx.stats();
    assert_eq!(stats.buffered, 0, "everything handed to libzmq at close");
    assert_eq!(stats.items, n as u64);
    // The peer checks every message's content and order.
    peer.expect_ok(n);
    stats
}

#[tokio::test]
async fn send_many_into_slow_pyzmq_pull_waits_and_holds_nothing() {
    let stats = slow_pyzmq_pull(false).await;
    // The batch is the queue: at libzmq's HWM the call waits for room.
    assert_eq!(
        stats.max_buffered, 0,
        "send_many queued {} bytes",
        stats.max_buffered
    );
}

#[tokio::test]
async fn send_many_behind_queued_messages_stays_within_watermark() {
    let stats = slow_pyzmq_pull(true).await;
    let one = message(0, SIZE).iter().map(Bytes::len).sum::<usize>();
    assert!(stats.max_buffered > 0, "the sink never queued");
    assert!(
        stats.max_buffered <= wm().high() + one,
        "sink held {} bytes, bound is high {} + one message {}",
        stats.max_buffered,
        wm().high(),
        one
    );
}

/// A PUSH and a PULL over inproc that hold at most 8 + 8 messages in libzmq.
fn small_pair(ctx: &Context, name: &str, wm: Watermarks) -> (ZmqSink, ZmqSource) {
    let endpoint = format!("inproc://{name}");
    let tx = ZmqSocket::builder(SocketType::Push)
        .context(ctx)
        .watermarks(wm)
        .send_hwm(8)
        .bind(&endpoint)
        .build()
        .unwrap()
        .into_sink();
    let rx = ZmqSocket::builder(SocketType::Pull)
        .context(ctx)
        .recv_hwm(8)
        .connect(&endpoint)
        .build()
        .unwrap()
        .into_source();
    (tx, rx)
}

fn numbered(i: u64) -> Multipart {
    Multipart::from(Bytes::copy_from_slice(&i.to_le_bytes()))
}

/// Receives `count` messages and checks they are numbered from `next` on.
async fn expect_in_order(rx: &mut ZmqSource, next: &mut u64, count: u64) {
    let end = *next + count;
    let mut buf = Vec::new();
    while *next < end {
        buf.clear();
        rx.recv_many(&mut buf, (end - *next) as usize)
            .await
            .unwrap();
        for m in &buf {
            assert_eq!(m, &[Bytes::copy_from_slice(&next.to_le_bytes())]);
            *next += 1;
        }
    }
}

/// Cancels `send_many` at every point it gives way (a fairness yield, the
/// wait for room) until it makes no more progress because nobody receives,
/// checking after each cancel that exactly the accepted messages left the
/// batch; then receives them and sends the rest. With `send_first`, single
/// `send`s fill the sink's own queue first, so the batch goes in behind it.
async fn cancelled_midway(name: &str, send_first: bool) -> flowctl_core::FlowStats {
    const N: u64 = 1000;
    // A message of 8 bytes is charged MIN_CHARGE (64) bytes.
    const ONE: usize = MIN_CHARGE;
    // At most 16 messages fit in libzmq and high / 64 B = 32 in the queue,
    // so the batch cannot all go while nobody receives.
    let wm = Watermarks::new(8 * ONE, 32 * ONE).unwrap();
    let ctx = Context::new();
    let (mut tx, mut rx) = small_pair(&ctx, name, wm);
    let mut first = 0;
    while send_first && tx.queued() == 0 {
        tx.send(numbered(first)).await.unwrap();
        first += 1;
    }
    let mut batch: VecDeque<Multipart> = (first..N).map(numbered).collect();
    let mut cancels = 0;
    let mut before = tx.stats().items;
    loop {
        tokio::select! {
            biased;
            r = tx.send_many(&mut batch) => panic!("send_many finished while nobody receives: {r:?}"),
            () = tokio::task::yield_now() => cancels += 1,
        }
        // What was accepted left the batch, in order; the rest is untouched.
        let accepted = tx.stats().items;
        assert_eq!(accepted + batch.len() as u64, N);
        assert_eq!(batch[0], numbered(accepted));
        if accepted == before {
            break; // waiting for room, and cancelled there
        }
        before = accepted;
    }
    let accepted = tx.stats().items;
    assert!(accepted < N, "nothing held the batch back");
    assert!(
        tx.stats().max_buffered <= wm.high() + ONE,
        "sink held {} bytes, bound is high {} + one message",
        tx.stats().max_buffered,
        wm.high()
    );
    // Exactly the accepted messages arrive, in order, nothing twice (those
    // still queued in the sink move into libzmq as `flush` drives it).
    let mut next = 0;
    let (flushed, ()) = tokio::join!(tx.flush(), expect_in_order(&mut rx, &mut next, accepted));
    flushed.unwrap();
    assert_eq!(tx.stats().items, accepted, "flush accepted nothing new");
    // The rest goes with a second call (and a flush: accepted messages may
    // wait in the sink's queue) while the receiver drains.
    let rest = batch.len() as u64;
    let (sent, ()) = tokio::join!(
        async {
            let sent = tx.send_many(&mut batch).await?;
            tx.flush().await.map(|()| sent)
        },
        expect_in_order(&mut rx, &mut next, rest)
    );
    assert_eq!(sent.unwrap() as u64, rest);
    assert!(batch.is_empty());
    assert_eq!(next, N);
    assert_eq!(tx.stats().items, N);
    assert!(cancels >= 2, "cancelled only {cancels} times");
    let stats = tx.stats();
    assert!(stats.max_buffered <= wm.high() + ONE);
    stats
}

#[tokio::test(flavor = "current_thread")]
async fn send_many_cancelled_midway_keeps_the_rest_in_order() {
    let stats = cancelled_midway("batch-cancel", false).await;
    assert_eq!(stats.max_buffered, 0, "send_many alone queues nothing");
}

#[tokio::test(flavor = "current_thread")]
async fn send_many_behind_queued_messages_cancelled_midway_keeps_the_rest_in_order() {
    let stats = cancelled_midway("batch-cancel-queued", true).await;
    assert!(stats.max_buffered > 0, "the sink never queued");
}

#[tokio::test(flavor = "current_thread")]
async fn an_empty_message_in_a_batch_is_reported_and_the_rest_kept() {
    let ctx = Context::new();
    let (mut tx, mut rx) = small_pair(&ctx, "batch-empty", Watermarks::default());
    let mut batch = VecDeque::from([numbered(0), numbered(1), Multipart::new(), numbered(2)]);
    let err = tx.send_many(&mut batch).await.unwrap_err();
    assert!(
        matches!(
            err.transport_error::<ZmqError>(),
            Some(ZmqError::EmptyMessage)
        ),
        "unexpected error: {err:?}"
    );
    // The two before it were accepted, the empty one is gone, the last stays.
    assert_eq!(tx.stats().items, 2);
    assert_eq!(batch, vec![numbered(2)]);
    let mut next = 0;
    expect_in_order(&mut rx, &mut next, 2).await;
    assert_eq!(tx.send_many(&mut batch).await.unwrap(), 1);
    expect_in_order(&mut rx, &mut next, 1).await;
    assert_eq!(next, 3);
}
