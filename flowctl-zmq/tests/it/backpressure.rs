//! Bounded memory: a fast flowctl PUSH into a slow pyzmq PULL stays within its
//! watermark; a PUB at its HWM counts what it drops instead of hiding it;
//! empty messages (weight 0) are charged too, so they pause the sink; the
//! sink queue's stats read exactly as charges and credits say.

use std::time::{Duration, Instant};

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::weighted::MIN_CHARGE;
use flowctl_core::{Sink, Watermarks};
use flowctl_zmq::{Context, Multipart, SocketType, ZmqSocket};

use crate::peer::{DEADLINE, Peer, message};

const SIZE: usize = 64 * 1024;

#[tokio::test]
async fn fast_push_into_slow_pyzmq_pull_stays_within_watermark() {
    // 500 x 64 KiB = 32 MiB: far more than libzmq's queues (16 + 4 messages)
    // and the socket buffers (our send buffer, at most wmem_max = 4 MiB on
    // Linux; the peer's receive buffer fixed at 128 KiB, since autotuning may
    // grow it to tcp_rmem's max, 32 MiB here) can hold: the sink must pause.
    let n = 500;
    let peer = Peer::slow_pull(n, SIZE);
    let wm = Watermarks::new(256 * 1024, 1024 * 1024).unwrap();
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .watermarks(wm)
        .expected_message_size(SIZE) // SNDHWM = 1 MiB / 64 KiB = 16 messages
        .connect(&peer.endpoint)
        .build()
        .unwrap()
        .into_sink();
    // Built up front so that the sender is limited by the socket only.
    let msgs: Vec<_> = (0..n).map(|i| message(i, SIZE)).collect();
    let mut max_queued = 0;
    for msg in msgs {
        tx.send(msg.into()).await.unwrap();
        max_queued = max_queued.max(tx.queued());
    }
    tx.close().await.unwrap();
    let stats = tx.stats();
    let one = message(0, SIZE).iter().map(|b| b.len()).sum::<usize>();
    assert!(
        stats.max_buffered <= wm.high() + one,
        "sink held {} bytes, bound is high {} + one message {}",
        stats.max_buffered,
        wm.high(),
        one
    );
    assert!(stats.pauses > 0, "the slow receiver never pushed back");
    assert!(max_queued <= wm.high() / SIZE + 1);
    assert_eq!(stats.buffered, 0, "everything handed to libzmq at close");
    assert_eq!(stats.items, n as u64);
    peer.expect_ok(n);
}

#[tokio::test]
async fn pub_counts_what_it_drops_at_hwm() {
    let ctx = Context::new();
    let mut tx = ZmqSocket::builder(SocketType::Pub)
        .context(&ctx)
        .send_hwm(10)
        .bind("inproc://pub-drops")
        .build()
        .unwrap()
        .into_sink();
    let mut rx = ZmqSocket::builder(SocketType::Sub)
        .context(&ctx)
        .recv_hwm(10)
        .subscribe(Bytes::new())
        .connect("inproc://pub-drops")
        .build()
        .unwrap()
        .into_source();
    // Wait until the subscription has reached the PUB (a probe gets through).
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < DEADLINE, "subscription never arrived");
        tx.send(vec![Bytes::from_static(b"probe")].into())
            .await
            .unwrap();
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(5), rx.recv()).await {
            assert_eq!(r.unwrap().unwrap()[0], Bytes::from_static(b"probe"));
            break;
        }
    }
    let before = tx.zmq_stats();
    let total = 1000u64;
    for i in 0..total as usize {
        tx.send(message(i, 16).into()).await.unwrap();
    }
    tx.flush().await.unwrap();
    let after = tx.zmq_stats();
    let sent = after.sent - before.sent;
    let dropped = after.dropped - before.dropped;
    assert_eq!(
        sent + dropped,
        total,
        "every message is either sent or counted as dropped"
    );
    assert!(
        dropped > 0,
        "a subscriber that does not read must cause drops"
    );
    // The subscriber gets exactly the messages counted as sent, in order.
    let mut got = 0u64;
    let mut last: Option<usize> = None;
    while got < sent {
        let m = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if m[0] == Bytes::from_static(b"probe") {
            continue;
        }
        let i: usize = std::str::from_utf8(&m[0]).unwrap().parse().unwrap();
        assert!(last.is_none_or(|l| i > l), "order kept");
        assert_eq!(m, message(i, 16));
        last = Some(i);
        got += 1;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(50), rx.recv())
            .await
            .is_err(),
        "no more messages than counted as sent"
    );
}

/// Issue 15 item 4: an empty frame weighs 0, and a sink that charged weights
/// only queued 999,998 of 1,000,000 empty messages behind a PULL that never
/// reads, without a pause. Each message is charged at least `MIN_CHARGE`.
#[tokio::test]
async fn zero_weight_messages_pause_the_sink_at_the_high_watermark() {
    let ctx = Context::new();
    let wm = Watermarks::new(1024, 4096).unwrap();
    // Never read: libzmq's queues fill (HWM 1 on both ends), then the sink's.
    let _rx = ZmqSocket::builder(SocketType::Pull)
        .context(&ctx)
        .recv_hwm(1)
        .bind("inproc://zero-weight")
        .build()
        .unwrap()
        .into_source();
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .context(&ctx)
        .send_hwm(1)
        .watermarks(wm)
        .linger(Some(Duration::ZERO))
        .connect("inproc://zero-weight")
        .build()
        .unwrap()
        .into_sink();
    let limit = 1_000_000;
    let mut accepted = 0;
    // `send` waits only while the sink is paused, which it checks after
    // every message: the loop ends at the first pause, or after `limit`.
    while accepted < limit && !tx.stats().paused {
        tx.send(Multipart::from(Bytes::new())).await.unwrap();
        accepted += 1;
    }
    let stats = tx.stats();
    assert!(
        stats.paused,
        "accepted {accepted} empty messages ({} queued in the sink) without a pause",
        tx.queued()
    );
    assert_eq!(stats.pauses, 1);
    assert!(
        stats.max_buffered <= wm.high() + MIN_CHARGE,
        "sink held {} bytes, bound is high {} + one message's charge {MIN_CHARGE}",
        stats.max_buffered,
        wm.high()
    );
    assert_eq!(
        stats.buffered,
        tx.queued() * MIN_CHARGE,
        "every queued empty message is charged MIN_CHARGE"
    );
    assert!(tx.queued() <= wm.high() / MIN_CHARGE + 1);
}

/// The sink's own queue reads like any flowctl buffer: messages libzmq
/// refuses (a PUSH with no peer yet) are charged, each at least `MIN_CHARGE`;
/// the sink pauses only above `high`; a flush that empties the queue resumes
/// it and keeps the peak and the pause count. `items`/`bytes` count payload.
#[tokio::test]
async fn queued_messages_are_charged_and_the_queue_pauses_above_high() {
    let ctx = Context::new();
    let wm = Watermarks::new(100, 300).unwrap();
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .context(&ctx)
        .watermarks(wm)
        .send_hwm(16)
        .linger(Some(Duration::ZERO))
        .bind("inproc://queue-stats")
        .build()
        .unwrap()
        .into_sink();
    let hundred = |i: u8| Multipart::from(Bytes::from(vec![i; 100]));
    for i in 0..3 {
        Sink::start_send(&mut tx, hundred(i)).unwrap();
    }
    let s = tx.stats();
    assert_eq!(tx.queued(), 3, "no peer: libzmq refused every message");
    assert_eq!((s.buffered, s.paused, s.pauses), (300, false, 0), "{s:?}");
    // An empty frame weighs 0 and is charged MIN_CHARGE: above high now.
    Sink::start_send(&mut tx, Multipart::from(Bytes::new())).unwrap();
    let s = tx.stats();
    let peak = 300 + MIN_CHARGE;
    assert_eq!(
        (s.buffered, s.max_buffered, s.paused, s.pauses),
        (peak, peak, true, 1),
        "{s:?}"
    );
    assert_eq!((s.items, s.bytes, s.violations), (4, 300, 0), "{s:?}");
    assert_eq!(s.watermarks, wm);

    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .context(&ctx)
        .recv_hwm(16)
        .connect("inproc://queue-stats")
        .build()
        .unwrap()
        .into_source();
    tx.flush().await.unwrap();
    let s = tx.stats();
    assert_eq!(tx.queued(), 0);
    assert_eq!(
        (s.buffered, s.max_buffered, s.paused, s.pauses),
        (0, peak, false, 1),
        "{s:?}"
    );
    assert_eq!((s.items, s.bytes, s.violations), (4, 300, 0), "{s:?}");
    for i in 0..3 {
        assert_eq!(rx.recv().await.unwrap(), Some(hundred(i)));
    }
    assert_eq!(
        rx.recv().await.unwrap(),
        Some(Multipart::from(Bytes::new()))
    );
    tx.close().await.unwrap();
}
