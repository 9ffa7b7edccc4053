//! Socket options that reach the kernel: `send_buffer`/`recv_buffer` are read
//! back from libzmq (`ZMQ_SNDBUF`/`ZMQ_RCVBUF`) and from the TCP connection
//! libzmq accepted (`SO_SNDBUF`/`SO_RCVBUF` with `getsockopt`).

use std::mem::MaybeUninit;
use std::os::fd::RawFd;

use flowctl_core::prelude::*;
use flowctl_zmq::{SocketType, ZmqSocket};

use crate::peer::{Peer, message};

/// The fd of this process's connected TCP socket whose local port is `port`
/// (the listener has the same local port but no peer).
fn accepted_fd(port: u16) -> Option<RawFd> {
    let dir = std::fs::read_dir("/proc/self/fd").expect("read /proc/self/fd");
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        let mut local = MaybeUninit::<libc::sockaddr_in>::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `local` is a writable sockaddr_in of `len` bytes; getsockname
        // writes at most `len` bytes and fails harmlessly on a non-socket fd.
        let rc = unsafe { libc::getsockname(fd, local.as_mut_ptr().cast(), &mut len) };
        if rc != 0 {
            continue;
        }
        // SAFETY: getsockname succeeded and initialised the address (zeroed first).
        let local = unsafe { local.assume_init() };
        if i32::from(local.sin_family) != libc::AF_INET || u16::from_be(local.sin_port) != port {
            continue;
        }
        let mut peer = MaybeUninit::<libc::sockaddr_in>::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: as for getsockname above.
        if unsafe { libc::getpeername(fd, peer.as_mut_ptr().cast(), &mut len) } == 0 {
            return Some(fd);
        }
    }
    None
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> libc::c_int {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` is a writable c_int and `len` its size, as SOL_SOCKET
    // options SO_SNDBUF/SO_RCVBUF require; `fd` is an open socket of ours.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "getsockopt({fd}, {opt}): {}",
        std::io::Error::last_os_error()
    );
    v
}

fn sysctl(path: &str) -> i64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("parse {path}: {e}"))
}

#[tokio::test]
async fn kernel_buffers_are_read_back_from_libzmq() {
    let sock = ZmqSocket::builder(SocketType::Push).build().unwrap();
    assert_eq!(sock.send_buffer().unwrap(), None, "default: the OS default");
    assert_eq!(sock.recv_buffer().unwrap(), None, "default: the OS default");
    let sock = ZmqSocket::builder(SocketType::Push)
        .send_buffer(65_536)
        .recv_buffer(32_768)
        .build()
        .unwrap();
    assert_eq!(sock.send_buffer().unwrap(), Some(65_536));
    assert_eq!(sock.recv_buffer().unwrap(), Some(32_768));
    let sock = ZmqSocket::builder(SocketType::Pull)
        .option("send_buffer", "4096")
        .unwrap()
        .option("recv_buffer", "8192")
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(sock.send_buffer().unwrap(), Some(4096));
    assert_eq!(sock.recv_buffer().unwrap(), Some(8192));
}

#[tokio::test]
async fn kernel_buffers_reach_the_tcp_connection() {
    let (sndbuf, rcvbuf) = (48 * 1024, 24 * 1024);
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .send_buffer(sndbuf)
        .recv_buffer(rcvbuf)
        .recv_hwm(1)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap()
        .into_source();
    let ep = rx.endpoints()[0].clone();
    let port: u16 = ep.rsplit(':').next().unwrap().parse().unwrap();
    // 20 MB offered, far more than the HWMs and kernel buffers on the way can
    // hold: the peer cannot finish (and close the connection) while we look.
    let peer = Peer::start(&[
        "push",
        "--connect",
        &ep,
        "--count",
        "20000",
        "--size",
        "1000",
    ]);
    // A received message means libzmq has accepted the TCP connection.
    assert_eq!(rx.recv().await.unwrap().unwrap(), message(0, 1000));
    let fd = accepted_fd(port).expect("the accepted TCP connection of the PULL");
    // Linux stores twice the value asked for (its bookkeeping), capped at the
    // *mem_max sysctl, and never less than its minimum.
    let expect = |v: usize, max: &str| (v as i64).min(sysctl(max)) * 2;
    assert_eq!(
        i64::from(sockopt(fd, libc::SO_SNDBUF)),
        expect(sndbuf, "/proc/sys/net/core/wmem_max")
    );
    assert_eq!(
        i64::from(sockopt(fd, libc::SO_RCVBUF)),
        expect(rcvbuf, "/proc/sys/net/core/rmem_max")
    );
    // Of the 20000 messages, the one received is accepted and checked; the
    // rest are never accepted and go down with the peer, killed by pid.
    drop(peer);
}
