//! Received frames of every size class (shared 16 KiB slab up to 512 B, own
//! copy up to 4 KiB, libzmq's buffer above) arrive intact, and frames the
//! application keeps stay intact while later messages reuse the slab. Also
//! drives the halves as `Box<dyn Sink>`/`Box<dyn Source>` trait objects
//! (object safety, dynamic dispatch), which must move the same messages as
//! the concrete types.

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::{Sink, Source};
use flowctl_zmq::{Multipart, SocketType, ZmqSocket};

/// Frame `j` of message `i`: `len` bytes derived from (i, j), so any byte
/// from the wrong message or offset shows.
fn frame(i: usize, j: usize, len: usize) -> Bytes {
    (0..len)
        .map(|k| (i.wrapping_mul(31) ^ j.wrapping_mul(7) ^ k) as u8)
        .collect::<Vec<u8>>()
        .into()
}

const SIZES: [usize; 10] = [0, 1, 100, 511, 512, 513, 4096, 4097, 16 * 1024, 70_000];

fn msg(i: usize) -> Multipart {
    // Multipart messages mixing size classes, e.g. a small header + a body.
    let n = 1 + i % 3;
    (0..n)
        .map(|j| frame(i, j, SIZES[(i + j * 3) % SIZES.len()]))
        .collect()
}

#[tokio::test]
async fn every_frame_size_arrives_intact_and_kept_frames_stay_intact() {
    let n = 3_000;
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap()
        .into_source();
    let ep = rx.endpoints()[0].clone();
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .connect(ep)
        .build()
        .unwrap()
        .into_sink();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            tx.send(msg(i)).await.unwrap();
        }
        tx.close().await.unwrap();
        tx
    });
    // Every second message is kept until the end (its slab stays shared);
    // the others are dropped at once (their slab space can be reused).
    let mut kept = Vec::new();
    let mut got = 0;
    let mut buf = Vec::new();
    while got < n {
        buf.clear();
        rx.recv_many(&mut buf, 64).await.unwrap();
        for m in buf.drain(..) {
            assert_eq!(m, msg(got), "message {got} as received");
            if got % 2 == 0 {
                kept.push((got, m));
            }
            got += 1;
        }
    }
    for (i, m) in &kept {
        assert_eq!(*m, msg(*i), "kept message {i} after {n} later receives");
    }
    let tx = sender.await.unwrap();
    assert_eq!(tx.zmq_stats().sent, n as u64);
    assert_eq!(rx.zmq_stats().received, n as u64);
    assert_eq!(rx.stats().buffered, 0, "the source holds no message");
}

#[tokio::test]
async fn trait_objects_move_the_same_messages() {
    let n = 1_000;
    let rx = ZmqSocket::builder(SocketType::Pull)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap()
        .into_source();
    let ep = rx.endpoints()[0].clone();
    let tx = ZmqSocket::builder(SocketType::Push)
        .connect(ep)
        .build()
        .unwrap()
        .into_sink();
    let mut rx: Box<dyn Source<Item = Multipart>> = Box::new(rx);
    let mut tx: Box<dyn Sink<Item = Multipart>> = Box::new(tx);
    let sender = tokio::spawn(async move {
        for i in 0..n / 2 {
            tx.send(msg(i)).await.unwrap();
        }
        for i in n / 2..n {
            tx.ready().await.unwrap();
            tx.start_send(msg(i)).unwrap();
        }
        tx.close().await.unwrap();
        tx.stats().items
    });
    let mut got = 0;
    while got < n / 2 {
        assert_eq!(rx.recv().await.unwrap().unwrap(), msg(got));
        got += 1;
    }
    let mut buf = Vec::new();
    while got < n {
        buf.clear();
        rx.recv_many(&mut buf, 100).await.unwrap();
        for m in buf.drain(..) {
            assert_eq!(m, msg(got));
            got += 1;
        }
    }
    assert_eq!(rx.stats().items, n as u64);
    assert_eq!(sender.await.unwrap(), n as u64);
}
