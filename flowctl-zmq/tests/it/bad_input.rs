//! Bad input: wrong frame counts from a real peer, an endpoint in use, unknown
//! options and values. Each is a clear error naming what was wrong.

use std::str::FromStr;

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, Sink};
use flowctl_zmq::{SocketType, ZmqError, ZmqSocket};

use crate::peer::{Peer, message};

fn zmq_err(e: &FlowError) -> &ZmqError {
    e.transport_error::<ZmqError>()
        .unwrap_or_else(|| panic!("not a ZmqError: {e}"))
}

#[tokio::test]
async fn wrong_frame_count_from_pyzmq_is_reported_and_stream_continues() {
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .expect_frames(2)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap()
        .into_source();
    let ep = rx.endpoints()[0].clone();
    let peer = Peer::start(&["frames", "--connect", &ep, "--size", "10"]);
    let err = rx.recv().await.unwrap_err();
    assert!(
        matches!(
            zmq_err(&err),
            ZmqError::FrameCount {
                expected: 2,
                actual: 3
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("3 frames where exactly 2"),
        "{err}"
    );
    // The bad message was consumed; the good one follows.
    assert_eq!(rx.recv().await.unwrap().unwrap(), message(0, 10));
    assert_eq!(rx.zmq_stats().frame_errors, 1);
    peer.expect_ok(2);
}

/// The frame count is the peer's to choose, and libzmq holds a message's
/// frames whatever their number; a socket that expects 2 must not allocate
/// for 100,000 of them: it keeps at most the expected count, skips the
/// rest, and reports the whole count.
#[tokio::test]
async fn a_message_of_100000_frames_is_refused_without_allocating_for_them() {
    let n = 100_000;
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .expect_frames(2)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap()
        .into_source();
    let ep = rx.endpoints()[0].clone();
    let peer = Peer::start(&[
        "wide",
        "--connect",
        &ep,
        "--count",
        &n.to_string(),
        "--size",
        "10",
    ]);
    // Counted from here: the receive waits for the message (libzmq delivers
    // it once its last frame arrived), then refuses it.
    let before = crate::alloc::allocated_here();
    let err = rx
        .recv()
        .await
        .map(|m| m.map_or(0, |m| m.len()))
        .expect_err("a message of 100,000 frames is refused");
    let allocated = crate::alloc::allocated_here() - before;
    assert!(
        matches!(zmq_err(&err), ZmqError::FrameCount { expected: 2, actual } if *actual == n),
        "{err}"
    );
    // 100,000 frames as `Bytes` in a `Vec` alone would be 3.2 MB.
    assert!(
        allocated < 64 * 1024,
        "receiving and refusing the message allocated {allocated} bytes"
    );
    assert_eq!(rx.recv().await.unwrap().unwrap(), message(0, 10));
    assert_eq!(rx.zmq_stats().frame_errors, 1);
    assert_eq!(rx.zmq_stats().received, 2);
    peer.expect_ok(2);
}

#[tokio::test]
async fn bind_to_endpoint_in_use_names_the_endpoint() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = format!("tcp://127.0.0.1:{}", taken.local_addr().unwrap().port());
    let err = ZmqSocket::builder(SocketType::Push)
        .bind(&ep)
        .build()
        .unwrap_err();
    assert!(
        matches!(zmq_err(&err), ZmqError::Bind { endpoint, .. } if *endpoint == ep),
        "{err}"
    );
    assert!(err.to_string().contains(&ep), "{err}");
    assert!(err.to_string().to_lowercase().contains("in use"), "{err}");
}

#[tokio::test]
async fn malformed_endpoint_is_a_clear_error() {
    let err = ZmqSocket::builder(SocketType::Pull)
        .connect("nosuch://x")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("nosuch://x"), "{err}");
    let err = ZmqSocket::builder(SocketType::Pull)
        .bind("tcp://127.0.0.1:1\0")
        .build()
        .unwrap_err();
    assert!(
        matches!(zmq_err(&err), ZmqError::InvalidOption { .. }),
        "{err}"
    );
}

#[test]
fn unknown_option_or_value_is_a_clear_error() {
    let b = ZmqSocket::builder(SocketType::Push);
    // `option` returns a FlowError; the typed error is inside it.
    let err = b.clone().option("send_hwm", "lots").unwrap_err();
    let zerr = zmq_err(&err);
    assert!(
        matches!(zerr, ZmqError::InvalidOption { option, value, .. } if option == "send_hwm" && value == "lots"),
        "{err}"
    );
    assert_eq!(
        zerr.to_string(),
        "invalid value \"lots\" for socket option send_hwm: expected a non-negative integer"
    );
    assert!(err.to_string().contains(&zerr.to_string()), "{err}");
    let err = b.clone().option("sndhwmm", "10").unwrap_err();
    assert!(
        matches!(zmq_err(&err), ZmqError::InvalidOption { option, .. } if option == "sndhwmm"),
        "{err}"
    );
    assert!(
        err.to_string().contains("sndhwmm") && err.to_string().contains("unknown option"),
        "{err}"
    );
    let err = b.clone().option("linger_ms", "-5").unwrap_err();
    assert!(
        matches!(zmq_err(&err), ZmqError::InvalidOption { option, .. } if option == "linger_ms"),
        "{err}"
    );
    assert!(b.option("send_hwm", "100").is_ok());
    let err = SocketType::from_str("PUSHH").unwrap_err();
    assert!(
        err.to_string().contains("PUSHH") && err.to_string().contains("socket type"),
        "{err}"
    );
    assert_eq!(SocketType::from_str("router").unwrap(), SocketType::Router);
}

#[tokio::test]
async fn values_libzmq_refuses_are_clear_errors() {
    let err = ZmqSocket::builder(SocketType::Dealer)
        .routing_id(Bytes::from(vec![b'x'; 300]))
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("routing_id") && err.to_string().contains("255"),
        "{err}"
    );
    let err = ZmqSocket::builder(SocketType::Push)
        .send_hwm(usize::MAX)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("send_hwm"), "{err}");
    let err = ZmqSocket::builder(SocketType::Push)
        .subscribe(Bytes::from_static(b"A"))
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "transport error: subscribe is not supported by a PUSH socket"
    );
    let rx = ZmqSocket::builder(SocketType::Pull)
        .build()
        .unwrap()
        .into_source();
    let mut tx = ZmqSocket::builder(SocketType::Pull)
        .build()
        .unwrap()
        .into_sink();
    assert!(
        tx.send(vec![Bytes::new()].into())
            .await
            .unwrap_err()
            .to_string()
            .contains("send is not supported by a PULL")
    );
    assert!(rx.unsubscribe(b"A").is_err());
    let mut push = ZmqSocket::builder(SocketType::Push)
        .build()
        .unwrap()
        .into_sink();
    let err = push.send(vec![].into()).await.unwrap_err();
    assert!(err.to_string().contains("0 frames"), "{err}");
}

#[tokio::test]
async fn router_send_to_unknown_routing_id_is_a_clear_error() {
    let mut tx = ZmqSocket::builder(SocketType::Router)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap()
        .into_sink();
    let err = tx
        .send(vec![Bytes::from_static(b"nobody"), Bytes::from_static(b"hi")].into())
        .await
        .unwrap_err();
    assert!(
        matches!(zmq_err(&err), ZmqError::Unroutable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("nobody"), "{err}");
    // The sink is still usable and holds nothing.
    assert_eq!(tx.stats().buffered, 0);
    tx.flush().await.unwrap();
}

#[tokio::test]
async fn invalid_kernel_buffer_sizes_are_clear_errors() {
    let err = ZmqSocket::builder(SocketType::Push)
        .send_buffer(0)
        .build()
        .unwrap_err();
    assert!(
        matches!(zmq_err(&err), ZmqError::InvalidOption { option, .. } if option == "send_buffer"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "transport error: invalid value \"0\" for socket option send_buffer: a kernel buffer must be at least 1 byte (leave it unset for the OS default)"
    );
    let err = ZmqSocket::builder(SocketType::Pull)
        .recv_buffer(usize::MAX)
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("recv_buffer") && err.to_string().contains(&i32::MAX.to_string()),
        "{err}"
    );
    let err = ZmqSocket::builder(SocketType::Pull)
        .option("recv_buffer", "-1")
        .unwrap_err();
    assert!(
        matches!(zmq_err(&err), ZmqError::InvalidOption { option, .. } if option == "recv_buffer"),
        "{err}"
    );
    assert!(
        err.to_string().contains("recv_buffer") && err.to_string().contains("non-negative integer"),
        "{err}"
    );
}
