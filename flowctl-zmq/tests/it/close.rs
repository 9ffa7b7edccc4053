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
