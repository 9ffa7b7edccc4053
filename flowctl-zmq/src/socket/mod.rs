//! The async socket, in four parts:
//!
//! - `builder.rs`: [`SocketBuilder`] (type, endpoints, watermarks, options,
//!   the HWMs derived from them) and the [`ZmqSocket`] it builds, which
//!   splits into the two halves;
//! - `core.rs`: what both halves share: the libzmq socket behind a mutex,
//!   its notification fd in tokio's reactor, one waker slot per direction,
//!   and closing (off the async threads, for the linger);
//! - `sink.rs`: [`ZmqSink`], libzmq first, then a queue of its own charged
//!   to the watermarks;
//! - `source.rs`: [`ZmqSource`], batches under one lock, fair by budget.
//!
//! This file holds what the parts share: the defaults, [`Context`] and
//! [`ZmqStats`].

use std::time::Duration;

use crate::backend::RawContext;

mod builder;
mod core;
mod sink;
mod source;

pub use builder::{SocketBuilder, ZmqSocket};
pub use sink::ZmqSink;
pub use source::ZmqSource;

/// The default expected message size used to turn watermarks into HWMs: 1 KiB.
pub const DEFAULT_EXPECTED_MESSAGE_SIZE: usize = 1024;

/// The least default [`max_message_size`](SocketBuilder::max_message_size):
/// 1 MiB. Unless set, the limit is the largest of the high watermark, the
/// expected message size and this.
pub const MIN_DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// The default linger of [`SinkExt::close`](flowctl_core::SinkExt::close) and of a dropped socket: 30 s.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(30);

/// A libzmq context: its I/O thread and its `inproc://` namespace.
///
/// Sockets built without one get a private context each, which lets
/// [`SinkExt::close`](flowctl_core::SinkExt::close) wait until libzmq has really handed every message to the
/// network (`zmq_ctx_term`). Share a context between sockets that talk over
/// `inproc://`; then `close` cannot wait for libzmq's own queue (the context
/// stays alive for the other sockets) and only guarantees that every message
/// was handed to libzmq, which keeps sending it for up to the linger.
#[derive(Debug, Clone)]
pub struct Context {
    raw: RawContext,
}

impl Context {
    /// A new context with one I/O thread.
    pub fn new() -> Self {
        Context {
            raw: RawContext::new(),
        }
    }
}

impl Default for Context {
    fn default() -> Self {
        Context::new()
    }
}

/// Counters flowctl-core's [`FlowStats`](flowctl_core::FlowStats) has no field for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ZmqStats {
    /// Messages a PUB socket dropped because a subscriber was at its SNDHWM
    /// (also in the sink's `stats().dropped`, which adds the messages its
    /// [overflow policy](SocketBuilder::overflow) dropped).
    pub dropped: u64,
    /// Messages handed to libzmq.
    pub sent: u64,
    /// Messages received from libzmq (including those rejected for their frame count).
    pub received: u64,
    /// Messages rejected because of their frame count.
    pub frame_errors: u64,
    /// Forced yields of the receive path (fairness budget spent).
    pub recv_yields: u64,
    /// Forced yields of the send path (fairness budget spent).
    pub send_yields: u64,
}

/// The pyzmq peer fixture of the integration tests, for the unit tests
/// that inject a fault into a conversation with pyzmq.
#[cfg(test)]
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/it/peer.rs"]
mod test_peer;

#[cfg(test)]
mod tests {
    use super::test_peer as peer;
    use super::*;

    use std::sync::atomic::Ordering;

    use bytes::Bytes;
    use flowctl_core::prelude::*;

    use super::core::{Core, Dir};
    use crate::backend::SocketType;
    use crate::error::ZmqError;
    use crate::multipart::Multipart;

    /// A PAIR pair over inproc: (`a`'s halves, `b`'s halves).
    fn pair(ctx: &Context, name: &str) -> ((ZmqSink, ZmqSource), (ZmqSink, ZmqSource)) {
        let ep = format!("inproc://{name}");
        let a = SocketBuilder::new(SocketType::Pair)
            .context(ctx)
            .bind(ep.clone())
            .build()
            .unwrap()
            .split();
        let b = SocketBuilder::new(SocketType::Pair)
            .context(ctx)
            .connect(ep)
            .build()
            .unwrap()
            .split();
        (a, b)
    }

    /// Waits until libzmq has a message for `rx`.
    async fn until_readable(rx: &ZmqSource) {
        let core = rx.core().unwrap();
        while !core.events(None).unwrap().readable {
            std::future::poll_fn(|cx| core.poll_wait(Dir::In, true, cx))
                .await
                .unwrap();
            core.lower(Dir::In);
        }
    }

    fn fail_events(core: &Core, fail: bool) {
        core.with_sock(|s| {
            s.fail_events = fail;
            Ok(())
        })
        .unwrap();
    }

    fn one(s: &'static str) -> Multipart {
        Multipart::from(Bytes::from_static(s.as_bytes()))
    }

    /// Issue 15 "also fix": `take_ready` took a message, then failed on the
    /// `ZMQ_EVENTS` read done for a waiting sink half, and returned that
    /// error: the message was lost.
    #[tokio::test]
    async fn recv_keeps_a_taken_message_when_the_events_check_fails() {
        let ctx = Context::new();
        let ((_a_tx, mut a_rx), (mut b_tx, _b_rx)) = pair(&ctx, "events-fail-recv");
        b_tx.send(one("m0")).await.unwrap();
        b_tx.send(one("m1")).await.unwrap();
        until_readable(&a_rx).await;
        let core = a_rx.core().unwrap().clone();
        // The sink half waits for room: every receive re-checks the events for it.
        core.waiting_out.store(true, Ordering::SeqCst);
        fail_events(&core, true);
        let got = a_rx.recv().await;
        assert!(
            matches!(&got, Ok(Some(m)) if *m == one("m0")),
            "the taken message must be returned, got {got:?}"
        );
        assert_eq!(a_rx.stats().items, 1);
        // The waiting half is woken, to meet the error in its own operation.
        assert!(
            core.slots.take_permit(Dir::Out),
            "the waiting sink half was not woken"
        );
        fail_events(&core, false);
        core.waiting_out.store(false, Ordering::SeqCst);
        assert_eq!(a_rx.recv().await.unwrap(), Some(one("m1")), "nothing lost");
    }

    /// The send side of the same: a message libzmq took was reported as an
    /// error (and not counted) when the events check after it failed, so a
    /// caller that retried sent it twice.
    #[tokio::test]
    async fn start_send_counts_a_sent_message_when_the_events_check_fails() {
        let ctx = Context::new();
        let ((mut a_tx, a_rx), (_b_tx, mut b_rx)) = pair(&ctx, "events-fail-send");
        let core = a_rx.core().unwrap().clone();
        // The source half waits for a message: every send re-checks for it.
        core.waiting_in.store(true, Ordering::SeqCst);
        fail_events(&core, true);
        a_tx.ready().await.unwrap();
        let sent = Sink::start_send(&mut a_tx, one("m0"));
        assert!(sent.is_ok(), "libzmq took the message, yet: {sent:?}");
        assert_eq!(a_tx.stats().items, 1);
        assert_eq!(a_tx.zmq_stats().sent, 1);
        assert!(
            core.slots.take_permit(Dir::In),
            "the waiting source half was not woken"
        );
        fail_events(&core, false);
        core.waiting_in.store(false, Ordering::SeqCst);
        assert_eq!(b_rx.recv().await.unwrap(), Some(one("m0")));
    }

    /// Issue 15 "also fix": a multipart send that failed after its first
    /// frame left libzmq mid-message, and the next message sent on the
    /// socket was glued to the broken one (the peer got one message with the
    /// frames of both). libzmq cannot abort a started message, so the
    /// socket now refuses every later send with the error that broke it.
    #[tokio::test]
    async fn multipart_send_failing_mid_message_refuses_the_next_send_instead_of_gluing() {
        let mut peer = peer::Peer::start(&[
            "pull",
            "--bind",
            "tcp://127.0.0.1:*",
            "--count",
            "2",
            "--progress",
        ]);
        let mut tx = SocketBuilder::new(SocketType::Push)
            .connect(peer.endpoint.clone())
            .build()
            .unwrap()
            .into_sink();
        tx.send(peer::message(0, 16).into()).await.unwrap();
        // Message 1 fails at its frame 1: frame 0 is in libzmq already.
        tx.core()
            .unwrap()
            .with_sock(|s| {
                s.fail_send_at = Some(1);
                Ok(())
            })
            .unwrap();
        let err = tx.send(peer::message(1, 16).into()).await.unwrap_err();
        assert!(
            matches!(
                err.transport_error::<ZmqError>(),
                Some(ZmqError::BrokenSend {
                    frame: 1,
                    frames: 2,
                    ..
                })
            ),
            "{err:?}"
        );
        // Sent on this socket, it would reach the peer glued to frame 0 of
        // the broken message.
        let again = tx.send(peer::message(1, 16).into()).await;
        assert!(
            matches!(&again, Err(e) if matches!(e.transport_error::<ZmqError>(), Some(ZmqError::BrokenSend { .. }))),
            "the socket took a message behind a broken one: {again:?}"
        );
        assert_eq!(tx.stats().items, 1, "only message 0 was accepted");
        // Closing drops the unfinished message (libzmq rolls it back).
        tx.close().await.unwrap();
        // The new socket's message must not overtake message 0.
        peer.wait_line("GOT 0");
        // A new socket goes on where the broken one stopped.
        let mut tx = SocketBuilder::new(SocketType::Push)
            .connect(peer.endpoint.clone())
            .build()
            .unwrap()
            .into_sink();
        tx.send(peer::message(1, 16).into()).await.unwrap();
        tx.close().await.unwrap();
        peer.expect_ok(2); // it checked both messages, in order
    }

    /// The receive side: an error on frame i > 0 returned at once, and the
    /// next `recv` returned the broken message's remaining frames as a
    /// message of their own. They are skipped before the error is returned.
    #[tokio::test]
    async fn multipart_recv_failing_mid_message_skips_its_remaining_frames() {
        let mut rx = SocketBuilder::new(SocketType::Pull)
            .bind("tcp://127.0.0.1:*")
            .build()
            .unwrap()
            .into_source();
        let ep = rx.endpoints()[0].clone();
        let peer = peer::Peer::start(&["push", "--connect", &ep, "--count", "3"]);
        until_readable(&rx).await;
        rx.core()
            .unwrap()
            .with_sock(|s| {
                s.fail_recv_at = Some(1);
                Ok(())
            })
            .unwrap();
        let err = rx.recv().await.unwrap_err();
        assert!(err.to_string().contains("recv (next frame)"), "{err}");
        let next = rx.recv().await.unwrap().unwrap();
        assert_eq!(
            next,
            peer::message(1, 16),
            "the rest of the broken message 0 came back as a message"
        );
        let mut buf = Vec::new();
        rx.recv_many(&mut buf, 8).await.unwrap();
        assert_eq!(buf, vec![Multipart::from(peer::message(2, 16))]);
        peer.expect_ok(3);
    }

    /// A `poll_recv` abandoned at `Pending` leaves its waiting flag up (the
    /// sink half then re-checks for it); the flag goes down when the source
    /// is polled to completion, and when it is dropped mid-wait: a flag left
    /// up would cost the sink half an events read per send for ever.
    #[tokio::test]
    async fn an_abandoned_wait_lowers_its_flag_on_completion_and_on_drop() {
        let ctx = Context::new();
        let ((a_tx, mut a_rx), (mut b_tx, _b_rx)) = pair(&ctx, "abandoned-flag");
        let core = a_tx.core().unwrap().clone();
        let mut noop = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(a_rx.poll_recv(&mut noop).is_pending());
        assert!(
            core.waiting_in.load(Ordering::SeqCst),
            "waiting for a message"
        );
        b_tx.send(one("m0")).await.unwrap();
        assert_eq!(a_rx.recv().await.unwrap(), Some(one("m0")));
        assert!(
            !core.waiting_in.load(Ordering::SeqCst),
            "the flag stayed up after the message came"
        );
        assert!(a_rx.poll_recv(&mut noop).is_pending());
        assert!(core.waiting_in.load(Ordering::SeqCst));
        drop(a_rx);
        assert!(
            !core.waiting_in.load(Ordering::SeqCst),
            "the flag stayed up after the source was dropped"
        );
    }
}
