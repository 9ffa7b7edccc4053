//! A peer does not decide how much we allocate (issue 15 item 7): a raw TCP
//! client speaking ZMTP 3.0 announces a 2^34-byte frame to a PULL built
//! with the default `max_message_size`; libzmq drops the connection at the
//! header, the process does not grow, and the socket keeps serving a pyzmq
//! peer. The same raw client sending a small frame is received, which shows
//! that its handshake is one libzmq accepts.

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_zmq::{SocketType, ZmqSocket, ZmqSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::peer::{DEADLINE, Peer, message};

/// The frame size the hostile peer announces: 16 GiB.
const ANNOUNCED: u64 = 1 << 34;
/// How much of that frame's body the peer tries to send: far more than the
/// kernel's socket buffers hold (at most tens of MiB on loopback), so all of
/// it goes through only if libzmq keeps reading it into the frame.
const BODY: usize = 256 << 20;
/// The most the process may grow meanwhile.
const GROWTH_BOUND: usize = 32 << 20;

/// Resident set size of this process, in bytes (`/proc/self/statm`).
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("resident pages in /proc/self/statm");
    #[allow(unsafe_code)]
    // SAFETY: sysconf(3) only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * usize::try_from(page).expect("page size")
}

/// The ZMTP 3.0 greeting and handshake of a PUSH peer with the NULL
/// mechanism (rfc.zeromq.org/spec/23): signature, version 3.0, mechanism,
/// as-server 0, filler; then a READY command with its Socket-Type.
fn push_handshake() -> Vec<u8> {
    let mut out = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0];
    let mut mechanism = [0u8; 20];
    mechanism[..4].copy_from_slice(b"NULL");
    out.extend_from_slice(&mechanism);
    out.push(0);
    out.extend_from_slice(&[0u8; 31]);
    assert_eq!(out.len(), 64);
    let mut ready = vec![5];
    ready.extend_from_slice(b"READY");
    ready.push(11);
    ready.extend_from_slice(b"Socket-Type");
    ready.extend_from_slice(&4u32.to_be_bytes());
    ready.extend_from_slice(b"PUSH");
    out.push(0x04); // a short command
    out.push(u8::try_from(ready.len()).expect("short command"));
    out.extend_from_slice(&ready);
    out
}

/// The header of a last frame (no MORE flag) of `size` bytes, in the long form.
fn long_frame_header(size: u64) -> Vec<u8> {
    let mut out = vec![0x02];
    out.extend_from_slice(&size.to_be_bytes());
    out
}

/// Connects to `endpoint` (`tcp://127.0.0.1:port`), sends the handshake and
/// reads libzmq's, up to its READY command: only then does libzmq take
/// message frames (one sent earlier fails the handshake as an unexpected
/// command).
async fn raw_push(endpoint: &str) -> TcpStream {
    let addr = endpoint.trim_start_matches("tcp://");
    let mut s = TcpStream::connect(addr).await.expect("connect to the PULL");
    s.write_all(&push_handshake())
        .await
        .expect("send the handshake");
    let mut greeting = [0u8; 64];
    s.read_exact(&mut greeting)
        .await
        .expect("libzmq's greeting");
    assert_eq!((greeting[0], greeting[9], greeting[10]), (0xFF, 0x7F, 3));
    let flags = s.read_u8().await.expect("libzmq's READY");
    assert_eq!(flags & 0x04, 0x04, "a command frame");
    let size = if flags & 0x02 != 0 {
        s.read_u64().await.expect("READY size")
    } else {
        u64::from(s.read_u8().await.expect("READY size"))
    };
    let mut ready = vec![0u8; usize::try_from(size).expect("READY size")];
    s.read_exact(&mut ready).await.expect("READY body");
    assert!(ready.starts_with(b"\x05READY"), "{ready:?}");
    s
}

/// Sends the header of a frame of `announced` bytes, then up to `body`
/// (less than `announced`) bytes of it until the connection is gone (libzmq
/// dropped it). Returns whether it was dropped, and how many body bytes
/// went out before.
async fn announce_and_send(s: &mut TcpStream, announced: u64, body: usize) -> (bool, usize) {
    assert!((body as u64) < announced);
    s.write_all(&long_frame_header(announced)).await.unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0;
    tokio::time::timeout(DEADLINE, async {
        while written < body {
            match s.write(&chunk[..chunk.len().min(body - written)]).await {
                Ok(0) | Err(_) => return (true, written),
                Ok(n) => written += n,
            }
        }
        // libzmq kept reading a frame it has not got in full.
        (false, written)
    })
    .await
    .expect("the body is either taken or refused within the deadline")
}

async fn recv_one(rx: &mut ZmqSource) -> Vec<Bytes> {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("a message within the deadline")
        .expect("recv")
        .expect("a zmq socket has no end")
        .into_vec()
}

#[tokio::test]
async fn announced_huge_frame_drops_the_peer_without_allocating() {
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap()
        .into_source();
    let ep = rx.endpoints()[0].clone();

    // The raw client's handshake is one libzmq accepts: a small frame arrives.
    let mut good = raw_push(&ep).await;
    let mut frame = vec![0x00, 5];
    frame.extend_from_slice(b"hello");
    good.write_all(&frame).await.unwrap();
    assert_eq!(recv_one(&mut rx).await, vec![Bytes::from_static(b"hello")]);
    drop(good);

    let before = rss();
    let mut bad = raw_push(&ep).await;
    let (dropped, written) = announce_and_send(&mut bad, ANNOUNCED, BODY).await;
    let grown = rss().saturating_sub(before);
    assert!(
        dropped,
        "libzmq took {} MiB of an announced {} GiB frame without dropping the peer (the process grew by {} MiB)",
        written >> 20,
        ANNOUNCED >> 30,
        grown >> 20
    );
    assert!(
        grown <= GROWTH_BOUND,
        "the process grew by {} MiB for a frame it refused (bound {} MiB)",
        grown >> 20,
        GROWTH_BOUND >> 20
    );
    drop(bad);

    // The socket keeps serving other peers.
    let n = 100;
    let peer = Peer::start(&["push", "--connect", &ep, "--count", &n.to_string()]);
    for i in 0..n {
        assert_eq!(recv_one(&mut rx).await, message(i, 16));
    }
    peer.expect_ok(n);
}

#[tokio::test]
async fn explicit_limit_admits_a_frame_at_it_and_drops_a_peer_above_it() {
    let limit = 1000;
    let sock = ZmqSocket::builder(SocketType::Pull)
        .max_message_size(Some(limit))
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap();
    assert_eq!(
        sock.max_message_size().unwrap(),
        Some(limit),
        "read back from libzmq"
    );
    let mut rx = sock.into_source();
    let ep = rx.endpoints()[0].clone();

    let mut at_limit = raw_push(&ep).await;
    at_limit
        .write_all(&long_frame_header(limit as u64))
        .await
        .unwrap();
    at_limit.write_all(&vec![7u8; limit]).await.unwrap();
    assert_eq!(
        recv_one(&mut rx).await,
        vec![Bytes::from(vec![7u8; limit])],
        "a frame of exactly the limit is accepted"
    );

    let mut above = raw_push(&ep).await;
    above
        .write_all(&long_frame_header(limit as u64 + 1))
        .await
        .unwrap();
    // Whichever comes first: the connection ends (dropped at the header),
    // or the frame is delivered (not dropped). The body may go out before
    // libzmq's reset arrives, or fail because of it.
    let _ = above.write_all(&vec![7u8; limit + 1]).await;
    let mut byte = [0u8; 1];
    tokio::select! {
        r = above.read(&mut byte) => assert!(
            matches!(r, Ok(0) | Err(_)),
            "libzmq sent data instead of dropping the peer: {r:?}"
        ),
        m = recv_one(&mut rx) => panic!(
            "a frame of {} bytes, above the limit of {limit}, was delivered",
            m.iter().map(Bytes::len).sum::<usize>()
        ),
    }

    // The connection that respected the limit still delivers.
    at_limit.write_all(&[0x00, 2, b'o', b'k']).await.unwrap();
    assert_eq!(recv_one(&mut rx).await, vec![Bytes::from_static(b"ok")]);
}

#[tokio::test]
async fn max_message_size_default_none_and_by_name_read_back_from_libzmq() {
    let read = |b: flowctl_zmq::SocketBuilder| b.build().unwrap().max_message_size().unwrap();
    let pull = || ZmqSocket::builder(SocketType::Pull);
    assert_eq!(
        read(pull()),
        Some(flowctl_zmq::MIN_DEFAULT_MAX_MESSAGE_SIZE)
    );
    assert_eq!(read(pull().max_message_size(None)), None);
    assert_eq!(read(pull().option("max_message_size", "-1").unwrap()), None);
    assert_eq!(
        read(pull().option("max_message_size", "4096").unwrap()),
        Some(4096)
    );
    let err = pull().option("max_message_size", "big").unwrap_err();
    assert!(
        matches!(err.transport_error::<flowctl_zmq::ZmqError>(), Some(flowctl_zmq::ZmqError::InvalidOption { option, .. }) if option == "max_message_size"),
        "{err}"
    );
    let err = pull()
        .max_message_size(Some(usize::MAX))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("max_message_size"), "{err}");
}
