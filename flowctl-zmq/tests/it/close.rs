//! Close without loss: a PUSH that closes right after its last send delivers
//! everything to a pyzmq PULL; a close that cannot deliver everything counts
//! what it dropped and leaves nothing charged; a closed source refuses
//! `recv` and releases the socket (its port can be bound again).

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, Sink, Source};
use flowctl_zmq::{Context, SocketType, ZmqError, ZmqSocket};

use crate::peer::{DEADLINE, Peer, message};

#[tokio::test]
async fn push_closing_right_after_last_send_loses_nothing() {
    let n = 100_000;
    let peer = Peer::start(&[
        "pull",
        "--bind",
        "tcp://127.0.0.1:*",
        "--count",
        &n.to_string(),
        "--size",
        "20",
    ]);
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .connect(&peer.endpoint)
        .build()
        .unwrap()
        .into_sink();
    for i in 0..n {
        tx.send(message(i, 20).into()).await.unwrap();
    }
    tx.close().await.unwrap();
    tx.close().await.unwrap(); // idempotent
    assert_eq!(tx.zmq_stats().sent, n as u64);
    assert!(
        tx.send(message(0, 1).into()).await.is_err(),
        "closed sink refuses items"
    );
    peer.expect_ok(n); // the peer checked every message's content and order
}

#[tokio::test]
async fn dropped_push_still_delivers_within_linger() {
    let n = 20_000;
    let peer = Peer::start(&[
        "pull",
        "--bind",
        "tcp://127.0.0.1:*",
        "--count",
        &n.to_string(),
        "--size",
        "20",
    ]);
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .connect(&peer.endpoint)
        .build()
        .unwrap()
        .into_sink();
    for i in 0..n {
        tx.send(message(i, 20).into()).await.unwrap();
    }
    tx.flush().await.unwrap();
    drop(tx); // lingers in a background thread, does not block the runtime
    peer.expect_ok(n);
}

/// The `(messages, bytes, source)` of a [`ZmqError::Unsent`], or a panic.
fn unsent(err: &FlowError) -> (u64, u64, &FlowError) {
    match err.transport_error::<ZmqError>() {
        Some(ZmqError::Unsent {
            messages,
            bytes,
            source,
        }) => (*messages, *bytes, source),
        _ => panic!("expected ZmqError::Unsent, got {err:?}"),
    }
}

#[tokio::test]
async fn close_without_peer_reports_the_linger_timeout_and_what_it_dropped() {
    let linger = std::time::Duration::from_millis(200);
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .linger(Some(linger))
        .build()
        .unwrap()
        .into_sink();
    // No peer: a PUSH has nowhere to put the message, so it stays queued here.
    tx.send(message(0, 10).into()).await.unwrap();
    assert_eq!(tx.queued(), 1);
    assert!(tx.stats().buffered > 0);
    let err = tx.close().await.unwrap_err();
    assert_eq!(tx.stats().buffered, 0, "nothing is held after close");
    assert_eq!(tx.queued(), 0);
    let (messages, bytes, source) = unsent(&err);
    assert_eq!((messages, bytes), (1, 11), "{err}"); // frames "0" and 10 bytes
    assert!(
        matches!(source, FlowError::Timeout(d) if *d == linger),
        "{err}"
    );
    tx.close().await.unwrap(); // idempotent after a failed close too
}

/// Issue 15 "also fix": `close` stopped at the first queued message libzmq
/// rejected (a ROUTER message to an unknown peer), dropped every message
/// queued behind it without counting them, and left `buffered` non-zero.
/// Now the rest is delivered, the rejected one is counted in the error, and
/// nothing stays charged.
#[tokio::test]
async fn close_after_an_unroutable_message_delivers_the_rest_and_counts_the_dropped() {
    let ctx = Context::new();
    let (mut tx, mut router_rx) = ZmqSocket::builder(SocketType::Router)
        .context(&ctx)
        .send_hwm(1)
        .bind("inproc://close-unroutable")
        .build()
        .unwrap()
        .split();
    let (mut dealer_tx, mut dealer_rx) = ZmqSocket::builder(SocketType::Dealer)
        .context(&ctx)
        .routing_id(Bytes::from_static(b"d1"))
        .recv_hwm(1)
        .connect("inproc://close-unroutable")
        .build()
        .unwrap()
        .split();
    // The ROUTER knows the dealer once its first message arrives.
    dealer_tx
        .send(Bytes::from_static(b"hello").into())
        .await
        .unwrap();
    let hello = router_rx.recv().await.unwrap().unwrap();
    assert_eq!(
        hello,
        vec![Bytes::from_static(b"d1"), Bytes::from_static(b"hello")]
    );

    let to_d1 = |i: usize| vec![Bytes::from_static(b"d1"), Bytes::from(i.to_string())];
    // The dealer does not read yet: libzmq is full after a message or two,
    // then the sink queues.
    let mut n = 0;
    while tx.queued() == 0 {
        tx.send(to_d1(n).into()).await.unwrap();
        n += 1;
    }
    // Behind it: one message to a peer that does not exist, then more.
    tx.send(vec![Bytes::from_static(b"ghost"), Bytes::from_static(b"lost")].into())
        .await
        .unwrap();
    for _ in 0..5 {
        tx.send(to_d1(n).into()).await.unwrap();
        n += 1;
    }
    let accepted = tx.stats().items;
    assert_eq!(accepted, n as u64 + 1);

    // Close while the dealer reads everything libzmq was handed (the sent
    // counter is shared by both halves of the ROUTER).
    let mut got = Vec::new();
    let closed = {
        let mut close = std::pin::pin!(tx.close());
        let mut closed = None;
        loop {
            if got.len() as u64 >= router_rx.zmq_stats().sent
                && let Some(r) = closed.take()
            {
                break r;
            }
            tokio::select! {
                r = &mut close, if closed.is_none() => closed = Some(r),
                m = tokio::time::timeout(DEADLINE, dealer_rx.recv()) => {
                    got.push(m.expect("a sent message within the deadline").unwrap().unwrap());
                }
            }
        }
    };
    let err = closed.unwrap_err();
    assert_eq!(tx.stats().buffered, 0, "nothing is held after close");
    let sent = tx.zmq_stats().sent;
    let (messages, bytes, source) = unsent(&err);
    assert_eq!(
        sent + messages,
        accepted,
        "every accepted message is sent or counted as dropped: {err}"
    );
    assert_eq!((messages, bytes), (1, 9), "the ghost message only: {err}");
    assert!(
        matches!(source.transport_error::<ZmqError>(), Some(ZmqError::Unroutable { routing_id }) if routing_id == "ghost"),
        "{err}"
    );
    let want: Vec<_> = (0..n).map(|i| Bytes::from(i.to_string())).collect();
    let got: Vec<_> = got.into_iter().map(|m| m[0].clone()).collect();
    assert_eq!(got, want, "every message to d1 arrived, in order");
}

/// Binding `endpoint` again succeeds only once the closed socket has really
/// released its listener (libzmq closes it before `zmq_ctx_term` returns).
fn endpoint_is_free(endpoint: &str) -> bool {
    let addr = endpoint.trim_start_matches("tcp://");
    std::net::TcpListener::bind(addr).is_ok()
}

#[tokio::test]
async fn closed_source_refuses_recv_and_releases_the_socket() {
    let n = 10;
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap()
        .into_source();
    let ep = rx.endpoints()[0].clone();
    let peer = Peer::start(&["push", "--connect", &ep, "--count", &n.to_string()]);
    // Four of the ten are accepted (returned by recv) and checked; the other
    // six are never accepted: they stay in pyzmq's or libzmq's queues and go
    // down with the sockets (nothing returned by recv is affected by close).
    for i in 0..4 {
        assert_eq!(rx.recv().await.unwrap().unwrap(), message(i, 16));
    }
    assert!(!rx.is_closed());
    assert!(!endpoint_is_free(&ep), "the PULL still holds its port");
    rx.close().await.unwrap();
    assert!(rx.is_closed());
    assert!(endpoint_is_free(&ep), "close released the socket's port");
    let err = rx.recv().await.unwrap_err();
    assert!(matches!(err, FlowError::Closed), "{err}");
    let mut buf = Vec::new();
    assert!(matches!(
        rx.recv_many(&mut buf, 8).await,
        Err(FlowError::Closed)
    ));
    assert!(buf.is_empty());
    rx.close().await.unwrap(); // idempotent
    assert_eq!(rx.zmq_stats().received, 4);
    assert_eq!(rx.stats().items, 4);
    drop(peer); // killed by pid: it may still hold the six unaccepted messages
}

#[tokio::test]
async fn closing_the_source_leaves_the_sink_working_until_it_closes() {
    let n = 2_000;
    let sock = ZmqSocket::builder(SocketType::Push)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap();
    let ep = sock.endpoints()[0].clone();
    let (mut tx, mut rx) = sock.split();
    // A PUSH's source never receives; closing it only gives up its share.
    rx.close().await.unwrap();
    assert!(!endpoint_is_free(&ep), "the sink still holds the socket");
    let peer = Peer::start(&[
        "pull",
        "--connect",
        &ep,
        "--count",
        &n.to_string(),
        "--size",
        "20",
    ]);
    for i in 0..n {
        tx.send(message(i, 20).into()).await.unwrap();
    }
    // The sink is the last holder: its close flushes, then closes the socket.
    tx.close().await.unwrap();
    assert_eq!(tx.zmq_stats().sent, n as u64);
    assert!(
        endpoint_is_free(&ep),
        "closing the last half closed the socket"
    );
    peer.expect_ok(n); // every message arrived, in order
}
