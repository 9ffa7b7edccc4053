//! Every socket pattern against a real pyzmq peer, in both directions,
//! checking each message's content and order.

use std::time::Duration;

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::{Sink, Source};
use flowctl_zmq::{SocketType, ZmqSocket};

use crate::peer::{Peer, message, payload};

const N: usize = 5_000;

#[tokio::test]
async fn push_to_pyzmq_pull() {
    let peer = Peer::start(&[
        "pull",
        "--bind",
        "tcp://127.0.0.1:*",
        "--count",
        &N.to_string(),
        "--size",
        "100",
    ]);
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .connect(&peer.endpoint)
        .build()
        .unwrap()
        .into_sink();
    for i in 0..N {
        tx.send(message(i, 100).into()).await.unwrap();
    }
    tx.close().await.unwrap();
    assert_eq!(tx.zmq_stats().sent, N as u64);
    assert_eq!(tx.stats().buffered, 0);
    peer.expect_ok(N);
}

#[tokio::test]
async fn pyzmq_push_to_pull() {
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap()
        .into_source();
    let ep = rx.endpoints()[0].clone();
    let peer = Peer::start(&[
        "push",
        "--connect",
        &ep,
        "--count",
        &N.to_string(),
        "--size",
        "100",
    ]);
    for i in 0..N {
        let msg = rx.recv().await.unwrap().unwrap();
        assert_eq!(msg, message(i, 100), "message {i}");
    }
    assert_eq!(rx.stats().items, N as u64);
    peer.expect_ok(N);
}

#[tokio::test]
async fn pyzmq_pub_to_sub_with_topic_filter() {
    let peer = Peer::start(&[
        "xpub",
        "--bind",
        "tcp://127.0.0.1:*",
        "--count",
        &N.to_string(),
        "--size",
        "50",
    ]);
    let mut rx = ZmqSocket::builder(SocketType::Sub)
        .subscribe(Bytes::from_static(b"A"))
        .recv_hwm(0)
        .connect(&peer.endpoint)
        .build()
        .unwrap()
        .into_source();
    for i in 0..N {
        let msg = rx.recv().await.unwrap().unwrap();
        let mut want = vec![Bytes::from_static(b"A")];
        want.extend(message(i, 50));
        assert_eq!(msg, want, "message {i}: topic B must be filtered out");
    }
    peer.expect_ok(N);
}

#[tokio::test]
async fn pub_to_pyzmq_sub_with_topic_filter() {
    let sock = ZmqSocket::builder(SocketType::Pub)
        .bind("tcp://127.0.0.1:*")
        .send_hwm(0)
        .build()
        .unwrap();
    let ep = sock.endpoints()[0].clone();
    let mut peer = Peer::start(&[
        "sub",
        "--connect",
        &ep,
        "--count",
        &N.to_string(),
        "--size",
        "50",
    ]);
    let mut tx = sock.into_sink();
    // Slow joiner: publish probes until the subscriber has seen one (polling
    // with a deadline on the peer's own report).
    let start = std::time::Instant::now();
    while !peer.saw_line("PROBED") {
        assert!(
            start.elapsed() < crate::peer::DEADLINE,
            "subscriber never saw a probe"
        );
        tx.send(vec![Bytes::from_static(b"probe")].into())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for i in 0..N {
        let mut a = vec![Bytes::from_static(b"A")];
        a.extend(message(i, 50));
        tx.send(a.into()).await.unwrap();
        let mut b = vec![Bytes::from_static(b"B")];
        b.extend(message(i, 50));
        tx.send(b.into()).await.unwrap();
    }
    tx.flush().await.unwrap();
    assert_eq!(tx.zmq_stats().dropped, 0);
    peer.expect_ok(N);
    tx.close().await.unwrap();
}

// Two worker threads: the halves really run concurrently on different threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dealer_round_trips_with_pyzmq_router() {
    let peer = Peer::start(&[
        "router-echo",
        "--bind",
        "tcp://127.0.0.1:*",
        "--count",
        &N.to_string(),
        "--size",
        "64",
    ]);
    let (mut tx, mut rx) = ZmqSocket::builder(SocketType::Dealer)
        .connect(&peer.endpoint)
        .build()
        .unwrap()
        .split();
    // The halves run in different tasks: the sink's and the source's wake-ups
    // must not steal each other's edges.
    let sender = tokio::spawn(async move {
        for i in 0..N {
            tx.send(message(i, 64).into()).await.unwrap();
        }
        tx.flush().await.unwrap();
        tx
    });
    for i in 0..N {
        let msg = rx.recv().await.unwrap().unwrap();
        assert_eq!(msg, message(i, 64), "echo {i}");
    }
    let _tx = sender.await.unwrap();
    peer.expect_ok(N);
}

#[tokio::test]
async fn router_exposes_routing_id_of_pyzmq_dealer() {
    let sock = ZmqSocket::builder(SocketType::Router)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap();
    let ep = sock.endpoints()[0].clone();
    let (mut tx, mut rx) = sock.split();
    let n = 1000;
    let peer = Peer::start(&[
        "dealer",
        "--connect",
        &ep,
        "--count",
        &n.to_string(),
        "--size",
        "32",
    ]);
    for i in 0..n {
        let mut msg = rx.recv().await.unwrap().unwrap();
        assert_eq!(msg.len(), 3, "routing id + 2 frames");
        assert_eq!(msg[0], Bytes::from_static(b"py-dealer"), "routing id");
        assert_eq!(msg[1..], message(i, 32)[..], "request {i}");
        msg.push(Bytes::from_static(b"reply"));
        tx.send(msg).await.unwrap();
    }
    tx.flush().await.unwrap();
    peer.expect_ok(n);
}

#[tokio::test]
async fn pair_round_trips_with_pyzmq() {
    let peer = Peer::start(&[
        "pair-echo",
        "--bind",
        "tcp://127.0.0.1:*",
        "--count",
        &N.to_string(),
        "--size",
        "128",
    ]);
    let (mut tx, mut rx) = ZmqSocket::builder(SocketType::Pair)
        .connect(&peer.endpoint)
        .build()
        .unwrap()
        .split();
    // Interleaved in one task: windows of 100 in flight.
    let mut next_rx = 0;
    for i in 0..N {
        tx.send(message(i, 128).into()).await.unwrap();
        if i >= 100 {
            assert_eq!(rx.recv().await.unwrap().unwrap(), message(next_rx, 128));
            next_rx += 1;
        }
    }
    while next_rx < N {
        assert_eq!(rx.recv().await.unwrap().unwrap(), message(next_rx, 128));
        next_rx += 1;
    }
    assert_eq!(payload(3, 4), Bytes::from_static(b"0000"));
    peer.expect_ok(N);
}

#[tokio::test]
async fn req_round_trips_with_pyzmq_rep() {
    let n = 500;
    let peer = Peer::start(&[
        "rep-echo",
        "--bind",
        "tcp://127.0.0.1:*",
        "--count",
        &n.to_string(),
        "--size",
        "40",
    ]);
    let (mut tx, mut rx) = ZmqSocket::builder(SocketType::Req)
        .connect(&peer.endpoint)
        .build()
        .unwrap()
        .split();
    for i in 0..n {
        tx.send(message(i, 40).into()).await.unwrap();
        assert_eq!(
            rx.recv().await.unwrap().unwrap(),
            message(i, 40),
            "reply {i}"
        );
    }
    peer.expect_ok(n);
}

#[tokio::test]
async fn rep_answers_pyzmq_req() {
    let sock = ZmqSocket::builder(SocketType::Rep)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap();
    let ep = sock.endpoints()[0].clone();
    let (mut tx, mut rx) = sock.split();
    let n = 500;
    let peer = Peer::start(&[
        "req",
        "--connect",
        &ep,
        "--count",
        &n.to_string(),
        "--size",
        "40",
    ]);
    for i in 0..n {
        let mut msg = rx.recv().await.unwrap().unwrap();
        assert_eq!(msg, message(i, 40), "request {i}");
        msg.push(Bytes::from_static(b"reply"));
        tx.send(msg).await.unwrap();
    }
    tx.flush().await.unwrap();
    peer.expect_ok(n);
}

#[tokio::test]
async fn ipc_and_inproc_endpoints() {
    let path = std::env::temp_dir().join(format!("flowctl-zmq-{}.sock", std::process::id()));
    let ipc = format!("ipc://{}", path.display());
    let ctx = flowctl_zmq::Context::new();
    for ep in [ipc.as_str(), "inproc://endpoints-test"] {
        let mut rx = ZmqSocket::builder(SocketType::Pull)
            .context(&ctx)
            .bind(ep)
            .build()
            .unwrap()
            .into_source();
        let mut tx = ZmqSocket::builder(SocketType::Push)
            .context(&ctx)
            .connect(ep)
            .build()
            .unwrap()
            .into_sink();
        for i in 0..100 {
            tx.send(message(i, 10).into()).await.unwrap();
        }
        for i in 0..100 {
            assert_eq!(rx.recv().await.unwrap().unwrap(), message(i, 10), "{ep}");
        }
    }
    let _ = std::fs::remove_file(path);
}
