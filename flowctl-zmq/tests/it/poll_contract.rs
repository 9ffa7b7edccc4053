//! The poll-based contract on the concrete halves: a refused `start_send`
//! gives the message back, a `Pending` may be abandoned without loss, and a
//! `poll_close` abandoned at `Pending` resumes and refuses new messages.

use std::future::poll_fn;
use std::task::{Context as TaskContext, Poll, Waker};

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, SendError, Watermarks};
use flowctl_zmq::{Context, Multipart, SocketType, ZmqError, ZmqSocket};

use crate::peer::DEADLINE;

fn numbered(i: u64) -> Multipart {
    Multipart::from(Bytes::copy_from_slice(&i.to_le_bytes()))
}

fn noop() -> TaskContext<'static> {
    TaskContext::from_waker(Waker::noop())
}

/// The refusal's message and its `ZmqError`.
fn refused(e: SendError<Multipart>) -> (Multipart, FlowError) {
    e.into_parts()
}

#[tokio::test]
async fn a_refused_start_send_gives_the_message_back() {
    // A socket type that cannot send.
    let mut pull = ZmqSocket::builder(SocketType::Pull)
        .build()
        .unwrap()
        .into_sink();
    let (back, err) = refused(pull.start_send(numbered(1)).unwrap_err());
    assert_eq!(back, numbered(1));
    assert!(
        matches!(
            err.transport_error::<ZmqError>(),
            Some(ZmqError::Unsupported { .. })
        ),
        "{err:?}"
    );

    // An empty message.
    let mut push = ZmqSocket::builder(SocketType::Push)
        .bind("inproc://refused-push")
        .build()
        .unwrap()
        .into_sink();
    let (back, err) = refused(push.start_send(Multipart::new()).unwrap_err());
    assert!(back.is_empty());
    assert!(
        matches!(
            err.transport_error::<ZmqError>(),
            Some(ZmqError::EmptyMessage)
        ),
        "{err:?}"
    );

    // An unroutable ROUTER message: libzmq did not take it.
    let mut router = ZmqSocket::builder(SocketType::Router)
        .bind("tcp://127.0.0.1:*")
        .build()
        .unwrap()
        .into_sink();
    let ghost = Multipart::from(vec![
        Bytes::from_static(b"ghost"),
        Bytes::from_static(b"hi"),
    ]);
    router.ready().await.unwrap();
    let (back, err) = refused(router.start_send(ghost.clone()).unwrap_err());
    assert_eq!(back, ghost);
    assert!(
        matches!(
            err.transport_error::<ZmqError>(),
            Some(ZmqError::Unroutable { .. })
        ),
        "{err:?}"
    );
    assert_eq!(router.stats().items, 0, "a refused message is not counted");

    // A closed sink.
    push.close().await.unwrap();
    let (back, err) = refused(push.start_send(numbered(2)).unwrap_err());
    assert_eq!(back, numbered(2));
    assert!(matches!(err, FlowError::Closed), "{err:?}");
    match push.try_send(numbered(3)) {
        Err(TrySendError::Failed(e)) => assert_eq!(e.into_inner(), numbered(3)),
        other => panic!("a closed sink took a message: {other:?}"),
    }
}

/// `poll_recv` abandoned at `Pending` (several times, from a throwaway
/// waker) takes nothing: every message arrives later, in order.
#[tokio::test]
async fn recv_abandoned_at_pending_loses_nothing() {
    let ctx = Context::new();
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .context(&ctx)
        .bind("inproc://abandoned-recv")
        .build()
        .unwrap()
        .into_source();
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .context(&ctx)
        .connect("inproc://abandoned-recv")
        .build()
        .unwrap()
        .into_sink();
    for _ in 0..3 {
        assert!(
            rx.poll_recv(&mut noop()).is_pending(),
            "nothing was sent yet"
        );
    }
    let n = 100;
    for i in 0..n {
        tx.send(numbered(i)).await.unwrap();
        // Abandon a poll between the sends too: a message taken here would be lost.
        if i % 10 == 0 {
            let mut buf = Vec::new();
            if let Poll::Ready(r) = rx.poll_recv_many(&mut noop(), &mut buf, 0) {
                assert_eq!(r.unwrap(), 0, "max 0 takes nothing");
            }
        }
    }
    tx.flush().await.unwrap();
    for i in 0..n {
        let got = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("a message was lost")
            .unwrap();
        assert_eq!(got, Some(numbered(i)), "order kept");
    }
    assert_eq!(rx.stats().items, n);
}

/// A `poll_ready` abandoned at `Pending` (the sink's queue above high,
/// libzmq at its HWM) takes nothing and resumes: every message accepted
/// arrives, in order, once the peer reads.
#[tokio::test]
async fn ready_abandoned_at_pending_loses_nothing() {
    let ctx = Context::new();
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .context(&ctx)
        .send_hwm(1)
        .watermarks(Watermarks::new(64, 128).unwrap())
        .connect("inproc://abandoned-ready")
        .build()
        .unwrap()
        .into_sink();
    // No peer yet: libzmq takes up to its HWM, then the sink queues.
    let mut accepted = 0u64;
    while tx.poll_ready(&mut noop()).is_ready() {
        tx.start_send(numbered(accepted)).unwrap();
        accepted += 1;
        assert!(accepted < 10_000, "the sink never paused");
    }
    assert!(tx.queued() > 0, "the sink queues above libzmq's HWM");
    for _ in 0..3 {
        assert!(tx.poll_ready(&mut noop()).is_pending(), "still paused");
    }
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .context(&ctx)
        .bind("inproc://abandoned-ready")
        .build()
        .unwrap()
        .into_source();
    let drain = async {
        for i in 0..accepted {
            assert_eq!(rx.recv().await.unwrap(), Some(numbered(i)), "order kept");
        }
    };
    let flush = async {
        tx.ready().await.unwrap();
        tx.flush().await.unwrap();
    };
    tokio::time::timeout(DEADLINE, futures::future::join(drain, flush))
        .await
        .expect("a wait was never woken");
    assert_eq!(tx.stats().buffered, 0);
    assert_eq!(tx.stats().items, accepted);
}

/// `poll_close` abandoned at `Pending` (no peer to take the queue) keeps its
/// place: new messages are refused and given back, and polling it again
/// once the peer is there delivers everything accepted before it.
#[tokio::test]
async fn close_abandoned_at_pending_resumes_and_refuses_new_messages() {
    let ctx = Context::new();
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .context(&ctx)
        .send_hwm(1)
        .connect("inproc://abandoned-close")
        .build()
        .unwrap()
        .into_sink();
    let n = 20;
    for i in 0..n {
        tx.start_send(numbered(i)).unwrap();
    }
    assert!(tx.queued() > 0, "the sink queues above libzmq's HWM");
    assert!(
        tx.poll_close(&mut noop()).is_pending(),
        "no peer takes the queue"
    );
    let (back, err) = tx.start_send(numbered(n)).unwrap_err().into_parts();
    assert_eq!(back, numbered(n));
    assert!(matches!(err, FlowError::Closed), "{err:?}");
    assert!(matches!(
        tx.poll_ready(&mut noop()),
        Poll::Ready(Err(FlowError::Closed))
    ));
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .context(&ctx)
        .bind("inproc://abandoned-close")
        .build()
        .unwrap()
        .into_source();
    let drain = async {
        for i in 0..n {
            assert_eq!(rx.recv().await.unwrap(), Some(numbered(i)), "order kept");
        }
    };
    let close = poll_fn(|cx| tx.poll_close(cx));
    let (_, closed) = tokio::time::timeout(DEADLINE, futures::future::join(drain, close))
        .await
        .expect("close never finished");
    closed.unwrap();
    assert_eq!(tx.stats().buffered, 0);
    assert_eq!(tx.stats().items, n);
    // Idempotent.
    assert!(matches!(tx.poll_close(&mut noop()), Poll::Ready(Ok(()))));
}

/// The per-message send path (`SinkExt::send` = `poll_ready` + `start_send`
/// on the concrete sink, libzmq below its HWM) allocates nothing: no boxed
/// future, no waker registration. (libzmq's own copy of the frame is C
/// `malloc`, not counted.)
#[tokio::test]
async fn send_on_the_ready_path_allocates_nothing() {
    let ctx = Context::new();
    let _rx = ZmqSocket::builder(SocketType::Pull)
        .context(&ctx)
        .recv_hwm(10_000)
        .bind("inproc://alloc-free-send")
        .build()
        .unwrap()
        .into_source();
    let mut tx = ZmqSocket::builder(SocketType::Push)
        .context(&ctx)
        .send_hwm(10_000)
        .connect("inproc://alloc-free-send")
        .build()
        .unwrap()
        .into_sink();
    let frame = Bytes::from_static(b"0123456789");
    // Warm up: the runtime's own lists (deferred wakers of forced yields)
    // grow once.
    for _ in 0..1000 {
        tx.send(frame.clone().into()).await.unwrap();
    }
    let before = crate::alloc::allocated_here();
    for _ in 0..1000 {
        tx.send(frame.clone().into()).await.unwrap();
    }
    let allocated = crate::alloc::allocated_here() - before;
    assert_eq!(tx.queued(), 0, "libzmq took every message");
    assert_eq!(allocated, 0, "1000 sends allocated {allocated} bytes");
}
