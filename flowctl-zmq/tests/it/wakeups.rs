//! Lost wake-ups: a send can consume the ZMQ_FD edge the receiver waits for
//! (and vice versa). Two PAIR sockets with tiny HWMs exchange messages in both
//! directions at once, each half in its own task on a multi-thread runtime; a
//! lost wake-up hangs the exchange and fails the deadline.

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_zmq::{Context, SocketType, ZmqSocket};

use crate::peer::DEADLINE;

const N: u64 = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_at_once_with_tiny_hwm_never_hang() {
    let ctx = Context::new();
    let a = ZmqSocket::builder(SocketType::Pair)
        .context(&ctx)
        .send_hwm(4)
        .recv_hwm(4)
        .bind("inproc://wakeups")
        .build()
        .unwrap();
    let b = ZmqSocket::builder(SocketType::Pair)
        .context(&ctx)
        .send_hwm(4)
        .recv_hwm(4)
        .connect("inproc://wakeups")
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for (name, sock) in [("a", a), ("b", b)] {
        let (mut tx, mut rx) = sock.split();
        tasks.push(tokio::spawn(async move {
            for i in 0..N {
                tx.send(vec![Bytes::copy_from_slice(&i.to_le_bytes())].into())
                    .await
                    .unwrap();
            }
            tx.flush().await.unwrap();
            (name, tx)
        }));
        tasks.push(tokio::spawn(async move {
            for i in 0..N {
                let m = rx.recv().await.unwrap().unwrap();
                assert_eq!(m[0][..], i.to_le_bytes()[..], "{name}: order kept");
            }
            drop(rx);
            (
                name,
                ZmqSocket::builder(SocketType::Pair)
                    .build()
                    .unwrap()
                    .into_sink(),
            )
        }));
    }
    let all = futures::future::join_all(tasks);
    let done = tokio::time::timeout(DEADLINE, all)
        .await
        .expect("exchange hung: a wake-up was lost");
    for r in done {
        r.unwrap();
    }
}
