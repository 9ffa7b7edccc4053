//! Named stages, overflow policies on the sink's queue, writability edges,
//! and the drops a PUB makes at its HWM counted in the stats.

use std::collections::VecDeque;
use std::future::Future;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::{Fairness, FlowError, Overflow, Sink, Watermarks};
use flowctl_zmq::{Context, Multipart, SocketType, ZmqSink, ZmqSocket, ZmqSource};

use crate::peer::{DEADLINE, Peer, message};

/// A fairness budget that never forces a yield, so that a test can tell a
/// wait from a forced yield.
fn unbounded() -> Fairness {
    Fairness::new(usize::MAX, usize::MAX).unwrap()
}

/// One `poll_ready` with a no-op waker, outside tokio's coop budget: true if
/// the sink was ready at once (did not wait).
async fn ready_at_once(tx: &mut ZmqSink) -> bool {
    tokio::task::unconstrained(async {
        let mut cx = TaskContext::from_waker(Waker::noop());
        match Sink::poll_ready(tx, &mut cx) {
            Poll::Ready(r) => {
                r.unwrap();
                true
            }
            Poll::Pending => false,
        }
    })
    .await
}

/// A PUSH into an inproc PULL that does not read yet: libzmq holds one
/// message on each side, the rest goes to the sink's queue.
fn stalled_push(name: &str, wm: Watermarks, overflow: Overflow) -> (ZmqSink, ZmqSource) {
    let ctx = Context::new();
    let ep = format!("inproc://{name}");
    let rx = ZmqSocket::builder(SocketType::Pull)
        .context(&ctx)
        .recv_hwm(1)
        .bind(ep.clone())
        .build()
        .unwrap()
        .into_source();
    let tx = ZmqSocket::builder(SocketType::Push)
        .context(&ctx)
        .send_hwm(1)
        .watermarks(wm)
        .overflow(overflow)
        .fairness(unbounded())
        .connect(ep)
        .build()
        .unwrap()
        .into_sink();
    (tx, rx)
}

fn hundred(i: usize) -> Multipart {
    let mut v = vec![0u8; 100];
    v[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Multipart::from(Bytes::from(v))
}

fn index(m: &Multipart) -> usize {
    u64::from_be_bytes(m[0][..8].try_into().unwrap()) as usize
}

#[tokio::test]
async fn stages_are_named_after_the_first_endpoint_and_the_type() {
    let rx = ZmqSocket::builder(SocketType::Pull)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap();
    let ep = rx.endpoints()[0].clone();
    assert!(!ep.ends_with(":*"), "the resolved endpoint: {ep}");
    assert_eq!(rx.sink_name(), None, "a PULL has no sending stage");
    assert_eq!(rx.source_name(), Some(format!("zmq.{ep}.pull").as_str()));
    let tx = ZmqSocket::builder(SocketType::Push)
        .connect(ep.clone())
        .build()
        .unwrap();
    assert_eq!(tx.sink_name(), Some(format!("zmq.{ep}.push").as_str()));
    assert_eq!(tx.source_name(), None);
    let tx = tx.into_sink();
    assert_eq!(tx.name(), Some(format!("zmq.{ep}.push").as_str()));
    // Both halves of a two-way socket are stages: `.send` and `.recv`.
    let dealer = ZmqSocket::builder(SocketType::Dealer)
        .connect(ep.clone())
        .build()
        .unwrap();
    assert_eq!(
        dealer.sink_name(),
        Some(format!("zmq.{ep}.dealer.send").as_str())
    );
    assert_eq!(
        dealer.source_name(),
        Some(format!("zmq.{ep}.dealer.recv").as_str())
    );
    // Named by the user, also through the configuration option.
    let named = ZmqSocket::builder(SocketType::Pub)
        .option("name", "ticks")
        .unwrap()
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap();
    assert_eq!(named.sink_name(), Some("ticks"));
    let (sink, source) = ZmqSocket::builder(SocketType::Pair)
        .name("link")
        .connect(ep)
        .build()
        .unwrap()
        .split();
    assert_eq!(
        (sink.name(), source.name()),
        (Some("link.send"), Some("link.recv"))
    );
}

#[tokio::test]
async fn the_overflow_option_parses_every_policy_and_refuses_others() {
    for (value, want) in [
        ("block", Overflow::Block),
        ("drop_newest", Overflow::DropNewest),
        ("drop_oldest", Overflow::DropOldest),
        ("fail", Overflow::Fail),
    ] {
        let tx = ZmqSocket::builder(SocketType::Push)
            .option("overflow", value)
            .unwrap()
            .build()
            .unwrap()
            .into_sink();
        assert_eq!(tx.overflow(), want);
    }
    let err = ZmqSocket::builder(SocketType::Push)
        .option("overflow", "drop_head")
        .unwrap_err();
    assert!(err.to_string().contains("drop_oldest"), "{err}");
}

/// DropOldest on a PUSH whose pyzmq PULL does not read: no send waits, the
/// sink's queue stays within `high`, and once the peer reads, what it got
/// plus what was counted as dropped is what was sent, in order, the newest
/// kept.
#[tokio::test]
async fn drop_oldest_push_into_a_stalled_pyzmq_pull_never_waits_and_counts_every_drop() {
    const SIZE: usize = 64 * 1024;
    let mut peer = Peer::start(&[
        "pull-gated",
        "--bind",
        "tcp://127.0.0.1:*",
        "--size",
        &SIZE.to_string(),
        "--hwm",
        "4",
        "--rcvbuf",
        "131072",
    ]);
    let wm = Watermarks::new(0, 4 * SIZE).unwrap();
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .watermarks(wm)
        .expected_message_size(SIZE) // SNDHWM 4
        .send_buffer(SIZE)
        .overflow(Overflow::DropOldest)
        .fairness(unbounded())
        .connect(&peer.endpoint)
        .build()
        .unwrap()
        .into_sink();
    // 300 x 64 KiB = 19 MiB: far more than libzmq's queues (4 + 4 messages)
    // and the two fixed kernel buffers can hold while the peer reads nothing.
    let n = 300;
    let msgs: Vec<_> = (0..n).map(|i| message(i, SIZE)).collect();
    for (i, msg) in msgs.into_iter().enumerate() {
        assert!(ready_at_once(&mut tx).await, "message {i}: the sink waited");
        Sink::start_send(&mut tx, msg.into()).unwrap();
        let s = tx.stats();
        assert!(
            s.buffered <= wm.high(),
            "message {i}: {} bytes queued, above high {}",
            s.buffered,
            wm.high()
        );
    }
    let s = tx.stats();
    assert!(s.dropped > 0, "a peer that reads nothing must cause drops");
    assert!(s.max_buffered <= wm.high(), "{s:?}");
    assert!(
        !s.paused && s.pauses == 0,
        "a dropping sink never pauses: {s:?}"
    );
    // The end marker goes in behind the kept messages (never dropped: it is
    // the newest), then the peer reads everything.
    Sink::start_send(&mut tx, Multipart::from(Bytes::from_static(b"END"))).unwrap();
    peer.tell("GO");
    tx.close().await.unwrap();
    let s = tx.stats();
    let count = peer.wait_line("COUNT");
    let mut words = count.split_whitespace().skip(1);
    let received: u64 = words.next().unwrap().parse().unwrap();
    let last: usize = words.nth(1).unwrap().parse().unwrap();
    assert_eq!(s.items, n as u64 + 1, "every send was accepted");
    assert_eq!(
        received + s.dropped,
        n as u64,
        "sent = received + dropped (received {received}, dropped {})",
        s.dropped
    );
    assert_eq!(last, n - 1, "DropOldest keeps the newest message");
    assert_eq!(tx.zmq_stats().dropped, 0, "not a PUB's drop");
    assert_eq!(s.buffered, 0);
    peer.expect_ok(received as usize);
}

/// DropNewest keeps what is queued and drops what does not fit; `send`
/// succeeds for both and `sent = received + dropped`.
#[tokio::test]
async fn drop_newest_keeps_the_queue_and_counts_what_it_refuses() {
    let wm = Watermarks::new(0, 1000).unwrap();
    let (mut tx, mut rx) = stalled_push("drop-newest", wm, Overflow::DropNewest);
    let n = 100;
    for i in 0..n {
        assert!(ready_at_once(&mut tx).await, "message {i}: the sink waited");
        Sink::start_send(&mut tx, hundred(i)).unwrap();
        assert!(tx.stats().buffered <= wm.high());
    }
    let s = tx.stats();
    assert!(
        s.dropped > 0,
        "a receiver that reads nothing must cause drops"
    );
    assert_eq!(s.items, n as u64);
    // The receiver reads what was not dropped while the flush pushes the
    // queue into libzmq.
    let expected = n as u64 - s.dropped;
    let read = async {
        let mut last = None;
        for _ in 0..expected {
            let m = rx.recv().await.unwrap().unwrap();
            let i = index(&m);
            assert!(last.is_none_or(|l| i > l), "order kept");
            assert_eq!(m, hundred(i));
            last = Some(i);
        }
        last
    };
    let (flushed, last) = tokio::join!(tx.flush(), read);
    flushed.unwrap();
    assert_eq!(
        tx.zmq_stats().sent + s.dropped,
        n as u64,
        "sent = received + dropped"
    );
    assert_eq!(last, Some(expected as usize - 1), "the oldest were kept");
    tx.close().await.unwrap();
}

/// Fail gives the message back with `FlowError::Overflow`, keeps the queue
/// as it was, drops nothing, and the sink stays usable.
#[tokio::test]
async fn fail_gives_the_message_back_and_the_sink_stays_usable() {
    let wm = Watermarks::new(0, 1000).unwrap();
    let (mut tx, mut rx) = stalled_push("fail", wm, Overflow::Fail);
    let mut i = 0;
    let refused = loop {
        assert!(ready_at_once(&mut tx).await, "message {i}: the sink waited");
        match Sink::start_send(&mut tx, hundred(i)) {
            Ok(()) => i += 1,
            Err(e) => break e,
        }
        assert!(i < 100, "the queue never filled");
    };
    let queued = tx.queued();
    let (item, err) = refused.into_parts();
    assert_eq!(item, hundred(i), "the refused message comes back intact");
    assert!(
        matches!(
            err,
            FlowError::Overflow {
                buffered: 1000,
                charge: 100,
                high: 1000
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    let s = tx.stats();
    assert_eq!((s.dropped, s.items, tx.queued()), (0, i as u64, queued));
    // Through `send_many`: the message stays at the front of the batch.
    let mut batch = VecDeque::from(vec![item, hundred(i + 1)]);
    let err = tx.send_many(&mut batch).await.unwrap_err();
    assert!(matches!(err, FlowError::Overflow { .. }), "{err:?}");
    assert_eq!(batch, VecDeque::from(vec![hundred(i), hundred(i + 1)]));
    // The receiver catches up: everything arrives once, in order.
    let reader = tokio::spawn(async move {
        for j in 0..i + 2 {
            assert_eq!(rx.recv().await.unwrap().unwrap(), hundred(j));
        }
        rx
    });
    tx.flush().await.unwrap();
    tx.send_many(&mut batch).await.unwrap();
    tx.close().await.unwrap();
    tokio::time::timeout(DEADLINE, reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tx.stats().dropped, 0);
}

/// The sink's writability handle sees the pause edge when its queue goes
/// above `high`, and the resume edge once a flush empties it.
#[tokio::test]
async fn writability_reports_the_queue_s_pause_and_resume_edges() {
    let wm = Watermarks::new(100, 1000).unwrap();
    let (mut tx, mut rx) = stalled_push("writability", wm, Overflow::Block);
    let mut writable = tx.writability().expect("the sink has a queue");
    assert!(!writable.is_paused());
    let mut sent = 0;
    while !writable.is_paused() {
        tx.send(hundred(sent)).await.unwrap();
        sent += 1;
        assert!(sent <= 20, "the queue never paused");
    }
    assert!(writable.changed().await.unwrap(), "the pause edge");
    assert!(tx.stats().buffered > wm.high());
    let reader = tokio::spawn(async move {
        for j in 0..sent {
            assert_eq!(rx.recv().await.unwrap().unwrap(), hundred(j));
        }
    });
    tx.flush().await.unwrap();
    assert!(!writable.changed().await.unwrap(), "the resume edge");
    assert_eq!(writable.pauses(), 1);
    tokio::time::timeout(DEADLINE, reader)
        .await
        .unwrap()
        .unwrap();
    tx.close().await.unwrap();
}

/// A PUB into a SUB that reads nothing: libzmq refuses a message for every
/// subscriber once one is at its HWM (flowctl sets `ZMQ_XPUB_NODROP`), and
/// the sink counts it as dropped in its stats too (`FlowStats::dropped`,
/// not only `ZmqStats::dropped`): accepted = sent + dropped, and the
/// subscriber gets exactly what was counted as sent.
#[tokio::test]
async fn pub_drops_at_hwm_are_in_the_sink_stats() {
    let ctx = Context::new();
    let mut tx = ZmqSocket::builder(SocketType::Pub)
        .context(&ctx)
        .send_hwm(10)
        .bind("inproc://pub-stats")
        .build()
        .unwrap()
        .into_sink();
    let mut rx = ZmqSocket::builder(SocketType::Sub)
        .context(&ctx)
        .recv_hwm(10)
        .subscribe(Bytes::new())
        .connect("inproc://pub-stats")
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
    let (s0, z0) = (tx.stats(), tx.zmq_stats());
    let total = 1000u64;
    for i in 0..total as usize {
        tx.send(message(i, 16).into()).await.unwrap();
    }
    let s = tx.stats();
    let z = tx.zmq_stats();
    let dropped = s.dropped - s0.dropped;
    let sent = z.sent - z0.sent;
    assert!(
        dropped > 0,
        "a subscriber that does not read must cause drops"
    );
    assert_eq!(s.dropped, z.dropped, "the stats count the PUB's drops");
    assert_eq!(s.items - s0.items, total);
    assert_eq!(sent + dropped, total, "accepted = sent + dropped");
    assert_eq!(s.max_buffered, 0, "a PUB never queues");
    // The subscriber gets exactly what was counted as sent (probes aside).
    let mut got = 0;
    while got < sent {
        let m = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if m[0] != Bytes::from_static(b"probe") {
            got += 1;
        }
    }
}

/// The same against pyzmq over tcp: a SUB that reads nothing (after its
/// subscription is in place) while 5,000 messages are published, then
/// everything. The PUB never waits; every message is either counted as
/// sent (libzmq took it for the subscriber) or as dropped, and the
/// subscriber receives exactly the messages counted as sent, in order.
#[tokio::test]
async fn pub_into_a_stalled_pyzmq_sub_counts_exactly_what_it_dropped() {
    const SIZE: usize = 1024;
    let socket = ZmqSocket::builder(SocketType::Pub)
        .send_hwm(8)
        .send_buffer(64 * 1024)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap();
    let ep = socket.endpoints()[0].clone();
    let mut tx = socket.into_sink();
    let mut peer = Peer::start(&[
        "sub-gated",
        "--connect",
        &ep,
        "--size",
        &SIZE.to_string(),
        "--hwm",
        "8",
        "--rcvbuf",
        "131072",
    ]);
    // Probes until the subscriber has one: its subscription is in place.
    let start = Instant::now();
    while !peer.saw_line("PROBED") {
        assert!(start.elapsed() < DEADLINE, "subscription never arrived");
        tx.send(Multipart::from(Bytes::from_static(b"probe")))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await; // paces the probes
    }
    let (s0, z0) = (tx.stats(), tx.zmq_stats());
    // 5,000 x 1 KiB = 5 MiB: far more than the HWMs (8 + 8 messages) and the
    // two fixed kernel buffers hold while the subscriber reads nothing.
    let n = 5000u64;
    for i in 0..n as usize {
        tx.send(message(i, SIZE).into()).await.unwrap();
    }
    let (s, z) = (tx.stats(), tx.zmq_stats());
    let sent = z.sent - z0.sent;
    let dropped = s.dropped - s0.dropped;
    assert!(
        dropped > 0,
        "a subscriber that reads nothing must cause drops"
    );
    assert_eq!(dropped, z.dropped - z0.dropped);
    assert_eq!(
        sent + dropped,
        n,
        "every message sent or counted as dropped"
    );
    assert_eq!(s.items - s0.items, n);
    peer.tell("GO");
    // The end marker: a PUB drops rather than waits, so it is sent again
    // until libzmq takes it (the subscriber reads now).
    loop {
        assert!(
            start.elapsed() < 2 * DEADLINE,
            "the end marker never got through"
        );
        let before = tx.zmq_stats().sent;
        tx.send(Multipart::from(Bytes::from_static(b"END")))
            .await
            .unwrap();
        if tx.zmq_stats().sent > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await; // paces the retries
    }
    let count = peer.wait_line("COUNT");
    let received: u64 = count.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(
        received, sent,
        "the subscriber got exactly what was counted as sent ({sent}; dropped {dropped})"
    );
    // The peer exits first: a SUB whose PUB is gone lingers in `ctx.term`.
    peer.expect_ok(received as usize);
    tx.close().await.unwrap();
}

/// `send_many` under DropOldest into a PULL that reads nothing: the batch
/// is accepted in one poll (no wait), the queue stays within `high`; then
/// `accepted = received + dropped`, newest kept, in order.
#[tokio::test]
async fn send_many_under_drop_oldest_never_waits() {
    let wm = Watermarks::new(0, 1000).unwrap();
    let (mut tx, mut rx) = stalled_push("send-many-drop-oldest", wm, Overflow::DropOldest);
    let mut batch: VecDeque<_> = (0..100).map(hundred).collect();
    let polled = tokio::task::unconstrained(async {
        let mut cx = TaskContext::from_waker(Waker::noop());
        let fut = std::pin::pin!(tx.send_many(&mut batch));
        fut.poll(&mut cx)
    })
    .await;
    assert!(
        matches!(polled, Poll::Ready(Ok(100))),
        "send_many waited or failed: {polled:?}"
    );
    assert!(batch.is_empty());
    let s = tx.stats();
    assert!(s.dropped > 0, "{s:?}");
    assert!(s.max_buffered <= wm.high(), "{s:?}");
    assert_eq!(s.items, 100);
    let expected = 100 - s.dropped;
    let read = async {
        let mut got = Vec::new();
        for _ in 0..expected {
            let m = rx.recv().await.unwrap().unwrap();
            assert_eq!(m, hundred(index(&m)));
            got.push(index(&m));
        }
        got
    };
    let (flushed, got) = tokio::join!(tx.flush(), read);
    flushed.unwrap();
    assert!(got.windows(2).all(|w| w[0] < w[1]), "order kept: {got:?}");
    assert_eq!(got.last(), Some(&99), "the newest kept");
    assert_eq!(tx.zmq_stats().sent + s.dropped, 100);
    tx.close().await.unwrap();
}

/// The sink's forced yields (its send path's fairness slice spent) are
/// the stage's too: `stats().forced_yields` matches `ZmqStats::send_yields`,
/// and so does the source's against `recv_yields`.
#[tokio::test]
async fn forced_yields_of_both_halves_are_in_their_stage_stats() {
    let ctx = Context::new();
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .context(&ctx)
        .recv_hwm(1000)
        .fairness(Fairness::new(3, 1 << 20).unwrap())
        .bind("inproc://forced-yields")
        .build()
        .unwrap()
        .into_source();
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .context(&ctx)
        .send_hwm(1000)
        .fairness(Fairness::new(3, 1 << 20).unwrap())
        .connect("inproc://forced-yields")
        .build()
        .unwrap()
        .into_sink();
    for i in 0..20 {
        tx.send(hundred(i)).await.unwrap();
    }
    for i in 0..20 {
        assert_eq!(rx.recv().await.unwrap().unwrap(), hundred(i));
    }
    let (sent, got) = (tx.stats(), rx.stats());
    assert!(tx.zmq_stats().send_yields > 0, "a slice of 3 over 20 sends");
    assert_eq!(sent.forced_yields, tx.zmq_stats().send_yields);
    assert!(
        rx.zmq_stats().recv_yields > 0,
        "a slice of 3 over 20 messages"
    );
    assert_eq!(got.forced_yields, rx.zmq_stats().recv_yields);
    assert_eq!((got.items, got.bytes, got.buffered), (20, 2000, 0));
    tx.close().await.unwrap();
}

/// The overflow policies against a model: any message sizes, any high
/// watermark, a PULL that reads nothing until the end. libzmq takes the
/// first `sent` messages (its pipe then stays full), and every later one
/// meets the policy on the sink's queue, which the model replays: admitted
/// if it fits (`buffered + charge <= high`, or the queue is empty), else
/// dropped (DropNewest), admitted after dropping the oldest (DropOldest) or
/// given back (Fail). Checked: no send waits, the queue never holds more
/// than `max(high, one message)`, the receiver then gets exactly the model's
/// messages in order, `accepted = received + dropped`, and a refused message
/// comes back intact.
mod policy_model {
    use super::*;

    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use flowctl_core::weighted::MIN_CHARGE;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    /// Cases run.
    const CASES: u32 = 256;

    fn sized(i: usize, len: usize) -> Multipart {
        let mut v = vec![(i % 251) as u8; len];
        v[..8].copy_from_slice(&(i as u64).to_be_bytes());
        Multipart::from(Bytes::from(v))
    }

    async fn run(policy: Overflow, high: usize, sizes: &[usize]) -> Result<(), TestCaseError> {
        static CASE: AtomicUsize = AtomicUsize::new(0);
        let name = format!("policy-model-{}", CASE.fetch_add(1, Ordering::Relaxed));
        let wm = Watermarks::new(0, high).unwrap();
        let (mut tx, mut rx) = stalled_push(&name, wm, policy);
        let mut accepted = 0u64;
        let mut refused = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            prop_assert!(ready_at_once(&mut tx).await, "message {i}: the sink waited");
            match Sink::start_send(&mut tx, sized(i, len)) {
                Ok(()) => accepted += 1,
                Err(e) => {
                    let (item, err) = e.into_parts();
                    prop_assert!(matches!(err, FlowError::Overflow { .. }), "{err:?}");
                    prop_assert_eq!(item, sized(i, len), "given back intact");
                    refused.push(i);
                }
            }
            let s = tx.stats();
            prop_assert!(
                s.buffered <= high || tx.queued() == 1,
                "message {i}: {} bytes in {} queued messages, high {high}",
                s.buffered,
                tx.queued()
            );
        }
        // libzmq took the first `sent`, the model replays the rest.
        let direct = tx.zmq_stats().sent as usize;
        let mut queue: VecDeque<(usize, usize)> = VecDeque::new();
        let mut buffered = 0;
        let (mut dropped, mut failed) = (0u64, Vec::new());
        for (i, &len) in sizes.iter().enumerate().skip(direct) {
            let charge = len.max(MIN_CHARGE);
            let fits = |b: usize| b == 0 || b + charge <= high;
            if !fits(buffered) {
                match policy {
                    Overflow::DropNewest => {
                        dropped += 1;
                        continue;
                    }
                    Overflow::DropOldest => {
                        while !fits(buffered) {
                            let (_, c) = queue.pop_front().unwrap();
                            buffered -= c;
                            dropped += 1;
                        }
                    }
                    _ => {
                        failed.push(i);
                        continue;
                    }
                }
            }
            queue.push_back((i, charge));
            buffered += charge;
        }
        let s = tx.stats();
        prop_assert_eq!(s.dropped, dropped);
        prop_assert_eq!(&refused, &failed);
        prop_assert_eq!(s.items, accepted);
        prop_assert_eq!(s.buffered, buffered);
        let want: Vec<usize> = (0..direct).chain(queue.iter().map(|&(i, _)| i)).collect();
        prop_assert_eq!(accepted, want.len() as u64 + dropped);
        // The receiver reads while the flush pushes the queue into libzmq.
        let read = async {
            let mut got = Vec::new();
            for _ in 0..want.len() {
                let m = rx.recv().await.unwrap().unwrap();
                let i = u64::from_be_bytes(m[0][..8].try_into().unwrap()) as usize;
                assert_eq!(m, sized(i, sizes[i]), "content of message {i}");
                got.push(i);
            }
            got
        };
        let (flushed, got) = tokio::join!(tx.flush(), read);
        flushed.unwrap();
        prop_assert_eq!(got, want);
        prop_assert_eq!(tx.zmq_stats().sent + dropped, accepted);
        Ok(())
    }

    #[test]
    fn any_sizes_under_each_policy_match_the_model() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let strategy = (
            prop::sample::select(vec![
                Overflow::DropNewest,
                Overflow::DropOldest,
                Overflow::Fail,
            ]),
            64..2000usize,
            prop::collection::vec(8..400usize, 1..60),
        );
        let mut runner = TestRunner::new(Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&strategy, |(policy, high, sizes)| {
                rt.block_on(async {
                    tokio::time::timeout(DEADLINE, run(policy, high, &sizes)).await
                })
                .map_err(|_| TestCaseError::fail("the case hung"))?
            })
            .unwrap();
    }
}
