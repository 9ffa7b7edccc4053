//! Close without loss: a PUSH that closes right after its last send delivers
//! everything to a pyzmq PULL; a closed source refuses `recv` and releases
//! the socket (its port can be bound again).

use flowctl_core::{FlowError, Sink, Source};
use flowctl_zmq::{SocketType, ZmqSocket};

use crate::peer::{Peer, message};

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
        tx.send(message(i, 20)).await.unwrap();
    }
    tx.close().await.unwrap();
    tx.close().await.unwrap(); // idempotent
    assert_eq!(tx.zmq_stats().sent, n as u64);
    assert!(
        tx.send(message(0, 1)).await.is_err(),
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
        tx.send(message(i, 20)).await.unwrap();
    }
    tx.flush().await.unwrap();
    drop(tx); // lingers in a background thread, does not block the runtime
    peer.expect_ok(n);
}

#[tokio::test]
async fn close_without_peer_reports_the_linger_timeout() {
    let linger = std::time::Duration::from_millis(200);
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .linger(Some(linger))
        .build()
        .unwrap()
        .into_sink();
    // No peer: a PUSH has nowhere to put the message, so it stays queued here.
    tx.send(message(0, 10)).await.unwrap();
    assert_eq!(tx.queued(), 1);
    let err = tx.close().await.unwrap_err();
    assert!(
        matches!(err, flowctl_core::FlowError::Timeout(d) if d == linger),
        "{err}"
    );
    tx.close().await.unwrap(); // idempotent after a failed close too
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
        tx.send(message(i, 20)).await.unwrap();
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
