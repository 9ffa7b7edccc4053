//! Close without loss: a PUSH that closes right after its last send delivers
//! everything to a pyzmq PULL.

use flowctl_core::Sink;
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
