//! [`ZmqSource`], the receiving half: nothing buffered here, batches taken
//! under one lock of the socket, fair by budget.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use flowctl_core::fair::Budget;
use flowctl_core::gate::GateState;
use flowctl_core::stage::{Stage, StageCounter};
use flowctl_core::weighted::{MIN_CHARGE, charge_of};
use flowctl_core::{Fairness, FlowError, FlowStats, Source, Watermarks, Weighted};

use super::ZmqStats;
use super::core::{Core, Counters, Dir, finish};
use crate::backend::SocketType;
use crate::error::ZmqError;
use crate::multipart::Multipart;

/// The receiving half of a [`ZmqSocket`](super::ZmqSocket). Items are [`Multipart`] messages;
/// on a ROUTER, frame 0 is the sender's routing id.
///
/// # Backpressure
/// Nothing is buffered here: a message leaves libzmq's queue only when
/// `recv` returns it, so RCVHWM (and then the sender's SNDHWM) carries the
/// pause to the peer. [`stats`](Source::stats) therefore reports `buffered`
/// (and `max_buffered`) 0: the messages waiting in libzmq's receive queue (up
/// to RCVHWM) and in the kernel's socket buffer are not ours to count.
///
/// # Overflow
/// Having no queue of its own, the source has no overflow policy: libzmq's
/// receive queue is its buffer, and what happens when it is full is the
/// sender's socket type's rule (PUSH, DEALER... wait; PUB drops, and only a
/// flowctl PUB counts those drops). A policy here would have to take
/// messages out of libzmq only to drop them, turning the peer's
/// backpressure into loss behind the application's back. Put a
/// [`PipeBuilder`](flowctl_core::PipeBuilder) with an overflow policy after
/// the source to shed load on purpose.
///
/// # Stage
/// The source is a named stage (see
/// [`SocketBuilder`](super::SocketBuilder#names)): it counts its forced
/// yields (`stats().forced_yields`, `flowctl_forced_yields_total`) and the
/// messages and bytes it returned (`flowctl_items_total`,
/// `flowctl_bytes_total`); its buffered bytes read 0.
///
/// # Memory
/// Frames of up to 512 bytes are copied into a shared 16 KiB receive buffer
/// (one reference count per frame instead of one allocation): a received
/// small frame that the application keeps alive keeps its 16 KiB buffer
/// alive with it. Larger frames up to 4 KiB get an allocation of their own;
/// above that, a frame keeps libzmq's own buffer (no copy).
///
/// # Closing
/// [`close`](ZmqSource::close) ends this half: later `recv` calls return
/// [`FlowError::Closed`]. Dropping the source does the same without waiting.
///
/// # Fairness
/// Every `recv` and every `recv_many` call consumes one unit of tokio's coop
/// budget (a `recv_many` batch one unit in all, as tokio's own mpsc
/// `recv_many` does), and every message is charged to the [`Fairness`]
/// budget of items and bytes; a batch ends when that slice is spent, and
/// when either budget is spent the next call yields once, even if libzmq has
/// more messages (the PyZMQ asyncio starvation cannot happen).
///
/// # End of stream
/// A ZeroMQ socket has no end: `recv` never returns `Ok(None)`.
#[derive(Debug)]
pub struct ZmqSource {
    /// `None` once closed.
    core: Option<Arc<Core>>,
    pub(super) kind: SocketType,
    pub(super) endpoints: Vec<String>,
    counters: Arc<Counters>,
    budget: Budget,
    frames: Option<usize>,
    wm: Watermarks,
    items: u64,
    bytes: u64,
    /// The stage: its name, forced yields and metrics (nothing is charged).
    gate: GateState,
    /// `flowctl_items_total` and `flowctl_bytes_total` of the stage (the
    /// gate counts only what is charged to it, and nothing is).
    counted: Option<(StageCounter, StageCounter)>,
    /// The last poll returned `Pending` waiting for libzmq (not a forced
    /// yield): the next poll resumes the wait without spending another
    /// coop unit, and the slice ends at the first message (a natural yield).
    /// While it is set, this half's waiting flag is up.
    waiting: bool,
    /// The last wait found `ZMQ_EVENTS` readable at once: if nothing comes,
    /// yield instead of spinning.
    at_once: bool,
    /// Built by `into_source`: no sink half ever existed, so no other
    /// operation can consume this half's wake-up edge. (A source from
    /// `split` never is, even once the sink is gone: the sink's last
    /// operation may have consumed the edge before this half raised its
    /// waiting flag, and only the `ZMQ_EVENTS` check would see it.)
    pub(super) alone: bool,
}

impl ZmqSource {
    /// A source on `core`; `frames`: the frame count every message must have;
    /// `gate`: its watermarks and stage (nothing is ever charged to it).
    pub(super) fn new(
        core: Arc<Core>,
        kind: SocketType,
        endpoints: Vec<String>,
        counters: Arc<Counters>,
        fairness: Fairness,
        frames: Option<usize>,
        gate: GateState,
    ) -> Self {
        let counted = gate.stage().map(|s| {
            (
                s.counter("flowctl_items_total"),
                s.counter("flowctl_bytes_total"),
            )
        });
        let wm = gate.watermarks();
        ZmqSource {
            core: Some(core),
            kind,
            endpoints,
            counters,
            budget: Budget::new(fairness),
            frames,
            wm,
            items: 0,
            bytes: 0,
            gate,
            counted,
            waiting: false,
            at_once: false,
            alone: false,
        }
    }

    /// Adds a SUB subscription (topic prefix).
    pub fn subscribe(&self, topic: &[u8]) -> Result<(), FlowError> {
        self.sub_op(topic, true)
    }

    /// Removes a SUB subscription.
    pub fn unsubscribe(&self, topic: &[u8]) -> Result<(), FlowError> {
        self.sub_op(topic, false)
    }

    fn sub_op(&self, topic: &[u8], add: bool) -> Result<(), FlowError> {
        if self.kind != SocketType::Sub {
            return Err(ZmqError::Unsupported {
                op: if add { "subscribe" } else { "unsubscribe" },
                socket: self.kind.name(),
            }
            .into());
        }
        let core = self.core()?;
        core.with_sock(|s| {
            if add {
                s.subscribe(topic)
            } else {
                s.unsubscribe(topic)
            }
        })?;
        // Subscribing processed commands: a waiting direction may need a look.
        core.events(None)?;
        Ok(())
    }

    /// Counters beyond [`FlowStats`].
    pub fn zmq_stats(&self) -> ZmqStats {
        let mut s = self.counters.snapshot();
        s.recv_yields = self.budget.yields();
        s
    }

    /// The stage name (see [`SocketBuilder`](super::SocketBuilder#names)).
    pub fn name(&self) -> Option<&str> {
        self.gate.stage().map(Stage::name)
    }

    /// The socket's endpoints (see [`ZmqSocket::endpoints`](super::ZmqSocket::endpoints)).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// True once [`close`](Self::close) has run.
    pub fn is_closed(&self) -> bool {
        self.core.is_none()
    }

    /// Closes the receiving half and releases its share of the socket.
    /// Idempotent; later `recv` calls return [`FlowError::Closed`].
    ///
    /// If the sink half is gone (dropped or closed) too, the libzmq socket is
    /// closed here: messages still in libzmq's receive queue (never returned
    /// by `recv`, so never accepted) are discarded with it, and with a
    /// private context this waits (off the async threads) until libzmq has
    /// terminated, which for a socket with nothing left to send is at once.
    /// If the sink half is still open, the socket stays open for it: incoming
    /// messages then wait in libzmq's receive queue, bounded by RCVHWM (a
    /// full queue pauses the peer, or drops for PUB/SUB), and are discarded
    /// when the sink closes the socket. Every message `recv` returned before
    /// `close` is the caller's and is unaffected.
    ///
    /// # Errors
    /// [`FlowError::Transport`] if the task that closes the socket panicked.
    pub async fn close(&mut self) -> Result<(), FlowError> {
        self.end_wait();
        let Some(core) = self.core.take() else {
            return Ok(());
        };
        if let Ok(mut core) = Arc::try_unwrap(core) {
            let (sock, ctx) = core.take_parts();
            tokio::task::spawn_blocking(move || finish(sock, ctx))
                .await
                .map_err(|e| FlowError::transport(format!("linger task failed: {e}")))?;
            tracing::info!(socket = self.kind.name(), "zmq socket closed");
        }
        Ok(())
    }
}

impl ZmqSource {
    pub(super) fn core(&self) -> Result<&Arc<Core>, FlowError> {
        self.core.as_ref().ok_or(FlowError::Closed)
    }

    fn unsupported(&self) -> Result<(), FlowError> {
        if self.kind.can_recv() {
            return Ok(());
        }
        Err(ZmqError::Unsupported {
            op: "recv",
            socket: self.kind.name(),
        }
        .into())
    }

    /// Checks and charges a message libzmq handed over (the caller counts
    /// it in [`ZmqStats::received`]).
    #[inline]
    fn accept(&mut self, msg: &Multipart) -> Result<(), FlowError> {
        let weight = msg.weight();
        self.budget.charge(charge_of(msg));
        if let Some(expected) = self.frames
            && msg.len() != expected
        {
            return Err(self.frame_error(expected, msg.len()));
        }
        self.items += 1;
        self.bytes += weight as u64;
        Ok(())
    }

    #[cold]
    fn frame_error(&self, expected: usize, actual: usize) -> FlowError {
        self.counters.frame_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(expected, actual, "zmq recv: wrong frame count");
        ZmqError::FrameCount { expected, actual }.into()
    }

    /// Polls until libzmq has a message, then takes up to `max` (>= 1)
    /// under one lock of the socket. Spends one unit of tokio's coop budget
    /// per call (a poll that resumes a wait spends none); every message is
    /// charged to the [`Fairness`] budget, and the batch ends early when
    /// that slice is spent (the next call then yields before it takes
    /// anything). Nothing is taken at a `Pending`.
    fn poll_batch(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut impl Batch,
        max: usize,
    ) -> Poll<Result<usize, FlowError>> {
        let polled = self.poll_batch_steps(cx, buf, max);
        if polled.is_ready() {
            self.end_wait();
        }
        polled
    }

    fn poll_batch_steps(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut impl Batch,
        max: usize,
    ) -> Poll<Result<usize, FlowError>> {
        self.unsupported()?;
        if !self.waiting {
            // One coop unit for the whole batch (as tokio's own mpsc
            // `recv_many` does), and a forced yield here if the previous
            // batch spent the slice.
            let before = self.budget.yields();
            let proceed = self.budget.poll_proceed(cx);
            if self.budget.yields() > before {
                self.gate.record_forced_yield();
            }
            ready!(proceed);
        }
        loop {
            let n = self.take_ready(buf, max, self.waiting)?;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            self.waiting = true;
            if std::mem::take(&mut self.at_once) {
                // ZMQ_EVENTS said readable, yet nothing came: yield, do not spin.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            // `take_ready` just got EAGAIN; a source alone on its socket
            // (no sink half ever) skips the check that would repeat it.
            let check = !self.alone;
            self.at_once = ready!(self.core()?.poll_wait(Dir::In, check, cx))?;
        }
    }

    /// The operation is done: lowers the waiting flag, if it is up.
    fn end_wait(&mut self) {
        if std::mem::take(&mut self.waiting)
            && let Some(core) = &self.core
        {
            core.lower(Dir::In);
        }
        self.at_once = false;
    }

    /// Takes up to `max` messages that libzmq has ready, under one lock of
    /// the socket, while the fairness slice lasts (the first message is
    /// always taken: the caller's `poll_proceed` found the slice open).
    /// `waited`: the caller slept for the first message, which ended the
    /// previous slice (a natural yield).
    fn take_ready(
        &mut self,
        buf: &mut impl Batch,
        max: usize,
        waited: bool,
    ) -> Result<usize, FlowError> {
        let core = self.core()?.clone();
        let (items_before, bytes_before) = (self.items, self.bytes);
        let mut n = 0;
        let mut received = 0u64;
        let taken = {
            let mut guard = core.lock()?;
            let sock = guard.as_mut().ok_or(FlowError::Closed)?;
            loop {
                if n == max || (n > 0 && self.budget.spent()) {
                    break Ok(());
                }
                match sock.try_recv(self.frames) {
                    Ok(Some(msg)) => {
                        received += 1;
                        if received == 1 && waited {
                            self.budget.reset();
                        }
                        if let Err(e) = self.accept(&msg) {
                            break Err(e);
                        }
                        buf.put(msg);
                        n += 1;
                    }
                    Ok(None) => break Ok(()),
                    Err(ZmqError::FrameCount { expected, actual }) => {
                        // Too many frames: libzmq handed the message over,
                        // and it was released frame by frame, not kept.
                        received += 1;
                        if received == 1 && waited {
                            self.budget.reset();
                        }
                        self.budget.charge(MIN_CHARGE);
                        break Err(self.frame_error(expected, actual));
                    }
                    Err(e) => break Err(FlowError::from(e)),
                }
            }
        };
        if received > 0 {
            self.counters
                .received
                .fetch_add(received, Ordering::Relaxed);
        }
        if let Some((items, bytes)) = &self.counted
            && self.items > items_before
        {
            items.increment(self.items - items_before);
            bytes.increment(self.bytes - bytes_before);
        }
        // The receives processed libzmq's commands: re-check for the sender.
        core.after_op(Dir::In);
        taken.map(|()| n)
    }
}

/// Where a receive puts its messages: a caller's `Vec` (`recv_many`) or a
/// single slot (`recv`, which so needs no allocation of its own).
trait Batch: Send {
    fn put(&mut self, msg: Multipart);
}

impl Batch for Vec<Multipart> {
    fn put(&mut self, msg: Multipart) {
        self.push(msg);
    }
}

impl Batch for Option<Multipart> {
    fn put(&mut self, msg: Multipart) {
        *self = Some(msg);
    }
}

impl Source for ZmqSource {
    type Item = Multipart;

    /// The next message. Never `Ok(None)`: a ZeroMQ socket has no end.
    ///
    /// # Errors
    /// [`ZmqError::FrameCount`] for a message of the wrong frame count (it is
    /// consumed, the next call returns the next message),
    /// [`ZmqError::Unsupported`] on a socket type that cannot receive,
    /// [`FlowError::Closed`] after [`close`](ZmqSource::close).
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Multipart>, FlowError>> {
        let mut one = None;
        ready!(self.poll_batch(cx, &mut one, 1))?;
        Poll::Ready(Ok(one))
    }

    /// Polls for one message, then takes up to `max` in all that libzmq has
    /// ready, under one lock of the socket. The batch spends one unit of
    /// tokio's coop budget; each message is charged to the fairness budget,
    /// and the batch stops early, without waiting, when that slice is spent
    /// (the next call then yields first), so a batch never holds more than
    /// `Fairness::max_items` messages or more than `max_bytes` plus one
    /// message. The fast path for small messages: one lock and one coop
    /// unit per batch instead of per message.
    ///
    /// # Errors
    /// As `poll_recv`; messages appended before the error stay in `buf`.
    fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<Multipart>,
        max: usize,
    ) -> Poll<Result<usize, FlowError>> {
        if max == 0 {
            return Poll::Ready(Ok(0));
        }
        self.poll_batch(cx, buf, max)
    }

    fn stats(&self) -> FlowStats {
        let mut s = FlowStats::empty(self.wm);
        s.items = self.items;
        s.bytes = self.bytes;
        s.forced_yields = self.gate.stats().forced_yields;
        s
    }
}

impl Drop for ZmqSource {
    fn drop(&mut self) {
        // Abandoned mid-wait: the sink half need not re-check for us.
        self.end_wait();
    }
}
