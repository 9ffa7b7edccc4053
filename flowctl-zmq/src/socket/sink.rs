//! [`ZmqSink`], the sending half: libzmq first, a byte-charged queue of its
//! own when libzmq is at its SNDHWM.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use flowctl_core::fair::Budget;
use flowctl_core::gate::GateState;
use flowctl_core::stage::{DropReason, Stage, StageCounter, Writability};
use flowctl_core::weighted::charge_of;
use flowctl_core::{
    Fairness, FlowError, FlowStats, Overflow, SendError, Sink, Watermarks, Weighted,
};
use tokio::task::JoinHandle;
use tokio::time::Sleep;

use super::ZmqStats;
use super::core::{Core, Counters, Dir, finish};
use crate::backend::{Sent, SocketType};
use crate::error::ZmqError;
use crate::multipart::Multipart;

/// After libzmq refused a message, the sink retries only every this many
/// `ready` calls (or after waiting for room).
const RETRY_EVERY: u32 = 32;

/// The sending half of a [`ZmqSocket`](super::ZmqSocket). Items are [`Multipart`] messages.
///
/// # Backpressure
/// `start_send` hands the message to libzmq at once when libzmq takes it
/// (below SNDHWM); otherwise it is queued here, charged in bytes: its
/// [`weight`](Weighted::weight), and at least
/// [`MIN_CHARGE`](flowctl_core::weighted::MIN_CHARGE) (64 bytes), so a queue
/// of empty frames pauses too (at most `high / 64` + 1 of them). `ready`
/// pushes the queue into libzmq (after a refusal, on every 32nd call, so a
/// sender at the HWM does not pay a refused send per message; the queue goes
/// into libzmq under one lock of the socket) and waits, while
/// the queue is above the high watermark, until libzmq has room again and the
/// queue is at the low watermark. So memory is bounded by SNDHWM messages in
/// libzmq plus `high` plus one message here.
///
/// # Errors
/// A message libzmq rejects for good (a ROUTER message to a routing id with no
/// peer: [`ZmqError::Unroutable`]) is dropped and the error returned, by
/// `start_send` or, if it was queued, by the next `ready`/`flush`. A
/// multipart message whose send fails after its first frame breaks the
/// socket's sending side ([`ZmqError::BrokenSend`]): libzmq cannot abort the
/// started message, so every later send fails with that error instead of
/// being glued to it; messages still queued are counted by `close`.
///
/// # Flushing
/// As with `futures::Sink`, a message accepted while libzmq is at its HWM
/// moves on only when the sink is used again: call
/// [`flush`](flowctl_core::SinkExt::flush) (or `close`) before waiting for something else,
/// e.g. before awaiting the reply to a request sent on a DEALER.
///
/// # Overflow
/// Under [`Overflow::Block`] (the default, see
/// [`SocketBuilder::overflow`](super::SocketBuilder::overflow)) a sender
/// waits as described above. Under the other policies `ready` never waits:
/// it pushes the queue into libzmq (on every call, not every 32nd) and
/// returns, and `start_send` applies the policy to a message libzmq refuses,
/// against the queue's watermarks, as flowctl-core's pipe does. The message
/// is queued if it fits (`buffered + charge <= high`, or the queue is
/// empty); if not, [`Overflow::DropNewest`] drops it (the send succeeds),
/// [`Overflow::DropOldest`] drops the oldest queued messages until it fits,
/// and [`Overflow::Fail`] gives it back with [`FlowError::Overflow`]. Drops
/// are counted in `stats().dropped` and `flowctl_dropped_total{reason}`. So
/// the queue never holds more than `max(high, one message)`, and libzmq
/// holds its SNDHWM messages besides. `flush` and `close` still wait for
/// libzmq's room: they are asked to deliver.
///
/// # PUB sockets
/// libzmq's PUB drops a message for a subscriber at its HWM without a trace.
/// flowctl sets `ZMQ_XPUB_NODROP` so libzmq reports it (`EAGAIN`), and counts
/// the message as dropped (in [`ZmqStats::dropped`], `stats().dropped` and
/// `flowctl_dropped_total{reason="hwm"}`) instead of waiting (a PUB has no
/// writability signal per subscriber to wait on). With NODROP libzmq refuses
/// the message for every matching subscriber when one of them is full: a
/// counted message reached no subscriber, and a message not counted reached
/// every subscriber that matched (as far as libzmq's queues; the network is
/// beyond any count). The send still succeeds and the message counts in
/// `stats().items`, so `items = sent + dropped`. A PUB never queues, so the
/// overflow policy does not apply to it.
///
/// # Fairness
/// `ready` consumes tokio's coop budget and the [`Fairness`] budget when it
/// returns without waiting, so a sender that libzmq always accepts still yields.
#[derive(Debug)]
pub struct ZmqSink {
    core: Option<Arc<Core>>,
    /// 0 while libzmq takes messages; after a refusal, `ready` calls since.
    refused: u32,
    counters: Arc<Counters>,
    items: u64,
    bytes: u64,
    queue: VecDeque<Multipart>,
    /// `queue`'s bytes against the watermarks: each message's
    /// [`charge_of`] is charged when it is queued and credited when it
    /// leaves. Only this half touches it, so it needs no lock, and nobody
    /// waits on it (its resume edge wakes no one): `ready` waits for
    /// libzmq's room and re-checks `is_paused` after every wait.
    gate: GateState,
    budget: Budget,
    closed: bool,
    /// `poll_ready` returned `Pending` waiting for libzmq's room (not a
    /// forced yield): the next poll resumes the wait without spending
    /// another coop unit, and ends the slice when it is ready.
    waited: bool,
    /// This half's waiting flag is up (see `Core::poll_wait`).
    raised: bool,
    /// A wait yielded (writable at once, yet libzmq refused): the next poll
    /// of it is done.
    yielded: bool,
    /// `poll_close` has started and not finished.
    closing: Option<CloseJob>,
    /// Queued messages libzmq rejected for good (dropped by `drain`), and
    /// their payload bytes: what `close` counts as dropped besides the queue.
    rejected: (u64, u64),
    /// A wait for libzmq's room went to sleep in this operation (counted once).
    parked: bool,
    /// The transport's own metrics (`None` for a type that cannot send).
    metrics: Option<SinkMetrics>,
}

/// The sink's transport metrics, and the items and bytes that go straight
/// into libzmq (those queued are counted by the gate), so that
/// `flowctl_items_total` counts every message accepted, as `stats().items`.
#[derive(Debug)]
struct SinkMetrics {
    eagain: StageCounter,
    waits: StageCounter,
    items: StageCounter,
    bytes: StageCounter,
}

impl SinkMetrics {
    fn new(stage: &Stage) -> Self {
        SinkMetrics {
            eagain: stage.counter("flowctl_zmq_eagain_total"),
            waits: stage.counter("flowctl_zmq_send_waits_total"),
            items: stage.counter("flowctl_items_total"),
            bytes: stage.counter("flowctl_bytes_total"),
        }
    }
}

/// What a run of send attempts met, settled once after it (see `ZmqSink::settle`).
#[derive(Debug, Default)]
struct Tally {
    /// Sends refused with `EAGAIN`.
    eagain: u64,
    /// Of those, PUB messages dropped (a PUB does not wait).
    hwm_drops: u64,
    /// Messages libzmq took straight from the caller (not from the queue),
    /// and their bytes.
    direct: (u64, u64),
}

impl ZmqSink {
    /// A sink on `core`, its queue charged against `wm` (pause/resume events
    /// inside `span`).
    pub(super) fn new(
        core: Arc<Core>,
        counters: Arc<Counters>,
        wm: Watermarks,
        fairness: Fairness,
        span: tracing::Span,
        stage: Option<Stage>,
        overflow: Overflow,
    ) -> Self {
        let metrics = stage.as_ref().map(SinkMetrics::new);
        let mut gate = GateState::new(wm, span);
        if let Some(stage) = stage {
            gate.set_stage(stage);
        }
        gate.set_overflow(overflow);
        ZmqSink {
            core: Some(core),
            refused: 0,
            counters,
            items: 0,
            bytes: 0,
            queue: VecDeque::new(),
            gate,
            budget: Budget::new(fairness),
            closed: false,
            waited: false,
            raised: false,
            yielded: false,
            closing: None,
            rejected: (0, 0),
            parked: false,
            metrics,
        }
    }

    /// The stage name (see [`SocketBuilder`](super::SocketBuilder#names)).
    pub fn name(&self) -> Option<&str> {
        self.gate.stage().map(Stage::name)
    }

    /// The overflow policy (see [`SocketBuilder::overflow`](super::SocketBuilder::overflow)).
    pub fn overflow(&self) -> Overflow {
        self.gate.overflow()
    }

    pub(super) fn core(&self) -> Result<&Arc<Core>, FlowError> {
        match &self.core {
            Some(c) if !self.closed => Ok(c),
            _ => Err(FlowError::Closed),
        }
    }

    /// The core for a new message: none once `poll_close` has started.
    fn open_core(&self) -> Result<&Arc<Core>, FlowError> {
        if self.closing.is_some() {
            return Err(FlowError::Closed);
        }
        self.core()
    }

    /// Handles the outcome of a send attempt; true if the message left our
    /// hands (the caller counts it as sent if `sent` is [`Sent::Taken`]).
    /// What it met goes into `tally`, for [`settle`](Self::settle).
    #[inline]
    fn account(kind: SocketType, sent: Sent, tally: &mut Tally) -> bool {
        match sent {
            Sent::Taken => true,
            Sent::WouldBlock => {
                tally.eagain += 1;
                if kind == SocketType::Pub {
                    tally.hwm_drops += 1;
                    tracing::trace!("pub: subscriber at its HWM, message dropped");
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Counts what a run of send attempts met, once per run: PUB drops in
    /// the stats and `flowctl_dropped_total{reason="hwm"}`, refusals and
    /// direct sends in the transport metrics.
    fn settle(&mut self, tally: &Tally) {
        if tally.hwm_drops > 0 {
            self.counters
                .dropped
                .fetch_add(tally.hwm_drops, Ordering::Relaxed);
            self.gate.record_drop(DropReason::Hwm, tally.hwm_drops);
        }
        if let Some(m) = &self.metrics {
            if tally.eagain > 0 {
                m.eagain.increment(tally.eagain);
            }
            if tally.direct.0 > 0 {
                m.items.increment(tally.direct.0);
                m.bytes.increment(tally.direct.1);
            }
        }
    }

    /// Pushes queued messages into libzmq, under one lock of the socket,
    /// until it refuses one; returns how many left the queue. The messages
    /// are dropped after the lock is released (a frame's owner may be
    /// application code).
    fn drain(&mut self) -> Result<usize, FlowError> {
        if self.queue.is_empty() {
            return Ok(0);
        }
        let core = self.core()?.clone();
        let mut moved = 0;
        let mut sent = 0u64;
        let mut credit = 0;
        let mut failed = None;
        let mut tally = Tally::default();
        {
            let mut guard = core.lock()?;
            let sock = guard.as_mut().ok_or(FlowError::Closed)?;
            for msg in &self.queue {
                if let Some(e) = sock.send_broken() {
                    // Broken by an earlier message: this one was never
                    // tried, it stays queued (`close` counts it).
                    failed = Some(FlowError::from(e));
                    break;
                }
                match sock.try_send(msg) {
                    Ok(outcome) => {
                        if !Self::account(core.kind, outcome, &mut tally) {
                            self.refused = 1;
                            break;
                        }
                        if outcome == Sent::Taken {
                            sent += 1;
                        }
                    }
                    Err(e) => {
                        // libzmq rejected this message for good (e.g. an
                        // unknown routing id): drop it and report, or every
                        // later call would fail on it again.
                        failed = Some(FlowError::from(e));
                        self.rejected.0 += 1;
                        self.rejected.1 += msg.weight() as u64;
                    }
                }
                credit += charge_of(msg);
                moved += 1;
                if failed.is_some() {
                    break;
                }
            }
        }
        self.queue.drain(..moved);
        if sent > 0 {
            core.counters.sent.fetch_add(sent, Ordering::Relaxed);
        }
        self.settle(&tally);
        if self.queue.is_empty() {
            self.refused = 0;
        }
        if credit > 0 {
            self.gate.credit(credit);
        }
        // The sends processed libzmq's commands: re-check for the receiver
        // (also when a later message failed: the earlier ones were sent).
        core.after_op(Dir::Out);
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(moved)
    }

    /// `flush` for `close`: a queued message libzmq rejects for good
    /// (dropped by `drain`, counted in `rejected`) does not stop it, the
    /// messages behind it still go. It is ready when the queue is empty or
    /// at an error that made no progress; the first error is left in `first`.
    fn poll_flush_for_close(
        &mut self,
        cx: &mut Context<'_>,
        first: &mut Option<FlowError>,
    ) -> Poll<()> {
        loop {
            let before = self.queue.len();
            let step = match self.drain() {
                Ok(_) if self.queue.is_empty() => return Poll::Ready(()),
                Ok(_) => ready!(self.poll_wait_writable(cx)),
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                first.get_or_insert(e);
                if self.queue.len() >= before {
                    return Poll::Ready(());
                }
            }
        }
    }

    /// Drops every queued message (`close` gave up on them) and credits
    /// their charge, so `buffered` returns to 0. Returns how many, and their
    /// payload bytes.
    fn discard_queue(&mut self) -> (u64, u64) {
        let messages = self.queue.len() as u64;
        let (mut charge, mut bytes) = (0, 0u64);
        for msg in self.queue.drain(..) {
            charge += charge_of(&msg);
            bytes += msg.weight() as u64;
        }
        if charge > 0 {
            self.gate.credit(charge);
        }
        self.refused = 0;
        (messages, bytes)
    }

    /// Polls until libzmq may have room. `ZMQ_EVENTS` may say "writable"
    /// while a send is still refused (a ROUTER whose addressed peer is full,
    /// with `ZMQ_ROUTER_MANDATORY`): then this yields (one `Pending`, the
    /// waker woken) instead of spinning. The caller ends the wait with
    /// [`end_wait`](Self::end_wait) when its operation is done.
    fn poll_wait_writable(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if std::mem::take(&mut self.yielded) {
            return Poll::Ready(Ok(()));
        }
        self.raised = true;
        let polled = self.core()?.poll_wait(Dir::Out, true, cx);
        if polled.is_pending()
            && !std::mem::replace(&mut self.parked, true)
            && let Some(m) = &self.metrics
        {
            m.waits.increment(1);
        }
        let at_once = ready!(polled)?;
        if at_once && self.drain()? == 0 {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    /// An operation is done: lowers this half's waiting flag, if it is up,
    /// and forgets any wait in progress.
    fn end_wait(&mut self) {
        if std::mem::take(&mut self.raised)
            && let Some(core) = &self.core
        {
            core.lower(Dir::Out);
        }
        self.waited = false;
        self.yielded = false;
        self.parked = false;
    }

    /// `budget.poll_proceed`, recording a forced yield in the stage.
    fn poll_proceed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let before = self.budget.yields();
        let polled = self.budget.poll_proceed(cx);
        if self.budget.yields() > before {
            self.gate.record_forced_yield();
        }
        polled
    }

    /// Counters beyond [`FlowStats`]: PUB drops, forced yields.
    pub fn zmq_stats(&self) -> ZmqStats {
        let mut s = self.counters.snapshot();
        s.send_yields = self.budget.yields();
        s
    }

    /// Messages queued here (not yet taken by libzmq).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

impl ZmqSink {
    /// Sends every message of `batch`, in order, taking them out of it: the
    /// batch counterpart of [`SinkExt::send`](flowctl_core::SinkExt::send), as
    /// [`SourceExt::recv_many`](flowctl_core::SourceExt::recv_many) is of `recv`.
    ///
    /// Each round passes [`poll_ready`](Sink::poll_ready) (one unit of tokio's coop
    /// budget; a forced yield when the [`Fairness`] slice is spent), then
    /// hands messages straight to libzmq under one lock of the socket until
    /// libzmq refuses one (its SNDHWM) or the slice is spent. After a
    /// refusal it waits for room, as a blocking `zmq_send` would: the
    /// caller's `batch` is the queue, and the sink keeps nothing of its own
    /// (`stats().buffered` stays 0). Only if the sink's queue already holds
    /// messages from `send` do the batch's go in behind them, within the
    /// bound of `send`: SNDHWM messages in libzmq plus `high` plus one
    /// message. Every message is charged to the fairness budget.
    ///
    /// Returns how many messages were accepted (all of them, on `Ok`). A
    /// `VecDeque`, because every round takes its messages off the front
    /// (`VecDeque::from(vec)` reuses a `Vec`'s buffer). Accepted is not yet
    /// sent: as after `send`, [`flush`](flowctl_core::SinkExt::flush) or `close` pushes what
    /// the sink still queues into libzmq.
    ///
    /// # Cancel safety
    /// Cancel-safe: if the future is dropped, the messages not yet accepted
    /// are still in `batch`, in order, and nothing else was taken.
    ///
    /// # Errors
    /// As `send`. A message that fails on its own (an empty
    /// one, an unroutable ROUTER message) is taken out of `batch` and
    /// dropped, as `start_send` would; the messages before it were accepted
    /// and the ones after it stay in `batch`. On a socket whose sending side
    /// broke off mid-message ([`ZmqError::BrokenSend`]) the message that
    /// broke it is dropped and the ones never tried stay in `batch`. On a closed sink or a socket
    /// type that cannot send, `batch` is left as it was.
    pub async fn send_many(&mut self, batch: &mut VecDeque<Multipart>) -> Result<usize, FlowError> {
        let mut accepted = 0;
        while !batch.is_empty() {
            poll_fn(|cx| Sink::poll_ready(self, cx)).await?;
            if !self.gate.overflow().blocks() && !self.queue.is_empty() {
                // Under a dropping policy messages wait in the queue, one
                // `start_send` each (it applies the policy); never here.
                accepted += self.send_one_of(batch)?;
                continue;
            }
            let (taken, refused) = self.accept_many(batch)?;
            accepted += taken;
            if refused && !self.gate.overflow().blocks() {
                // libzmq refused the front message: it goes to the queue
                // (or is dropped, or given back) under the policy.
                accepted += self.send_one_of(batch)?;
            } else if refused {
                // libzmq is at its SNDHWM: wait for room, as a blocking
                // `zmq_send` would, instead of moving the rest of `batch`
                // into the sink's own queue.
                let waited = poll_fn(|cx| self.poll_wait_writable(cx)).await;
                self.end_wait();
                waited?;
            }
        }
        Ok(accepted)
    }

    /// `start_send` of `batch`'s front message under a dropping policy:
    /// 1 if it was accepted (sent, queued or dropped by the policy). A
    /// message refused with [`FlowError::Overflow`] goes back to the front
    /// of `batch`; one that failed otherwise is dropped, as `start_send`'s
    /// caller would.
    fn send_one_of(&mut self, batch: &mut VecDeque<Multipart>) -> Result<usize, FlowError> {
        let Some(item) = batch.pop_front() else {
            return Ok(0);
        };
        match Sink::start_send(self, item) {
            Ok(()) => Ok(1),
            Err(e) => {
                let (item, err) = e.into_parts();
                if matches!(err, FlowError::Overflow { .. } | FlowError::Closed)
                    || matches!(
                        err.transport_error::<ZmqError>(),
                        Some(ZmqError::Unsupported { .. })
                    )
                {
                    batch.push_front(item);
                }
                Err(err)
            }
        }
    }

    /// One round of [`send_many`](Self::send_many): accepts messages from
    /// the front of `batch` until libzmq refuses one, the queue is paused or
    /// the fairness slice is spent, and removes them from `batch`. Returns
    /// how many, and whether libzmq refused one (that one stays in `batch`).
    fn accept_many(&mut self, batch: &mut VecDeque<Multipart>) -> Result<(usize, bool), FlowError> {
        let core = self.open_core()?.clone();
        if !core.kind.can_send() {
            return Err(ZmqError::Unsupported {
                op: "send",
                socket: core.kind.name(),
            }
            .into());
        }
        // Whatever is queued goes first (once per round, not per message).
        self.drain()?;
        // Messages still queued (from `send`) keep the rest behind them, in
        // the queue; otherwise every message goes straight into libzmq.
        let queueing = !self.queue.is_empty();
        let mut taken = 0;
        let mut direct = 0u64;
        let mut tally = Tally::default();
        let mut failed = None;
        // The failed message was never tried (the socket was broken before
        // it): it stays in `batch`.
        let mut untried = false;
        let mut refused = false;
        {
            let mut guard = if queueing { None } else { Some(core.lock()?) };
            // `lock` fails on a closed socket, so `sock` is `None` exactly
            // when queueing.
            let mut sock = guard.as_mut().and_then(|g| g.as_mut());
            for item in batch.iter() {
                if taken > 0 && (self.gate.is_paused() || self.budget.spent()) {
                    break;
                }
                if item.is_empty() {
                    failed = Some(ZmqError::EmptyMessage.into());
                    break;
                }
                let weight = item.weight();
                let charge = charge_of(item);
                if let Some(sock) = sock.as_deref_mut() {
                    if let Some(e) = sock.send_broken() {
                        failed = Some(FlowError::from(e));
                        untried = true;
                        break;
                    }
                    match sock.try_send(item) {
                        Ok(outcome) if Self::account(core.kind, outcome, &mut tally) => {
                            if outcome == Sent::Taken {
                                direct += 1;
                            }
                            tally.direct.0 += 1;
                            tally.direct.1 += weight as u64;
                        }
                        Ok(_) => {
                            // Refused at the HWM: the round ends, and this
                            // one stays in `batch` for the next.
                            refused = true;
                            break;
                        }
                        Err(e) => {
                            failed = Some(FlowError::from(e));
                            break;
                        }
                    }
                } else {
                    self.gate.charge_item(item);
                }
                self.items += 1;
                self.bytes += weight as u64;
                self.budget.charge(charge);
                taken += 1;
            }
        }
        // The failed message leaves `batch` too, and is dropped.
        let removed = taken + usize::from(failed.is_some() && !untried);
        if queueing {
            self.queue.extend(batch.drain(..taken));
            batch.drain(..removed - taken);
        } else {
            batch.drain(..removed);
        }
        if direct > 0 {
            core.counters.sent.fetch_add(direct, Ordering::Relaxed);
        }
        self.settle(&tally);
        // The sends processed libzmq's commands: re-check for the receiver.
        core.after_op(Dir::Out);
        if let Some(e) = failed {
            return Err(e);
        }
        Ok((taken, refused))
    }

    /// `poll_ready` until it is done; see [`Sink::poll_ready`].
    fn poll_ready_steps(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        self.open_core()?;
        if !self.waited {
            ready!(self.poll_proceed(cx));
            if self.queue.is_empty() {
                // Nothing to push into libzmq, and an empty queue is never paused.
                return Poll::Ready(Ok(()));
            }
            if !self.gate.overflow().blocks() {
                // Never waits: libzmq takes what it can now, `start_send`
                // applies the policy to the rest. Every call, so that no
                // message is dropped while libzmq has room.
                self.drain()?;
                return Poll::Ready(Ok(()));
            }
            // After a refusal, retry only every RETRY_EVERY calls until the
            // queue reaches the high watermark: a sender at the HWM then pays
            // one refused send per RETRY_EVERY messages, not one per message.
            if self.refused == 0 || self.refused >= RETRY_EVERY {
                self.drain()?;
            } else {
                self.refused += 1;
            }
            // An empty queue is never paused (0 <= low).
            if self.queue.is_empty() || !self.gate.is_paused() {
                return Poll::Ready(Ok(()));
            }
            self.waited = true;
        }
        loop {
            ready!(self.poll_wait_writable(cx))?;
            self.refused = 0;
            self.drain()?;
            if self.queue.is_empty() || !self.gate.is_paused() {
                // It waited: a natural end of the fairness slice.
                self.budget.reset();
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// `poll_flush` until it is done.
    fn poll_flush_steps(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        loop {
            self.drain()?;
            if self.queue.is_empty() {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_wait_writable(cx))?;
        }
    }

    /// `poll_close`'s work, once `job` is set up.
    fn poll_close_job(
        &mut self,
        cx: &mut Context<'_>,
        job: &mut CloseJob,
    ) -> Poll<Result<(), FlowError>> {
        if job.unsent.is_none() {
            if self.poll_flush_for_close(cx, &mut job.first).is_pending() {
                let expired = job
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                match job.linger {
                    Some(linger) if expired => {
                        job.first.get_or_insert(FlowError::Timeout(linger));
                    }
                    _ => return Poll::Pending,
                }
            }
            self.end_wait();
            self.closed = true;
            let (mut messages, mut bytes) = self.discard_queue();
            messages += self.rejected.0 - job.rejected_before.0;
            bytes += self.rejected.1 - job.rejected_before.1;
            job.unsent = Some((messages, bytes));
            if let Some(core) = self.core.take()
                && let Ok(mut core) = Arc::try_unwrap(core)
            {
                let (sock, ctx) = core.take_parts();
                job.task = Some(tokio::task::spawn_blocking(move || finish(sock, ctx)));
            }
        }
        if let Some(task) = &mut job.task {
            match ready!(Pin::new(task).poll(cx)) {
                Ok(()) => tracing::info!("zmq socket closed"),
                Err(e) => {
                    job.first
                        .get_or_insert(FlowError::transport(format!("linger task failed: {e}")));
                }
            }
            job.task = None;
        }
        let (messages, bytes) = job.unsent.unwrap_or_default();
        Poll::Ready(match job.first.take() {
            None if messages == 0 => Ok(()),
            None => Err(ZmqError::Unsent {
                messages,
                bytes,
                source: FlowError::Closed,
            }
            .into()),
            Some(e) if messages == 0 => Err(e),
            Some(e) => Err(ZmqError::Unsent {
                messages,
                bytes,
                source: e,
            }
            .into()),
        })
    }
}

/// A `close` in progress: it survives a `Pending`, so a caller that stops
/// polling and comes back resumes it (with the same linger deadline).
#[derive(Debug)]
struct CloseJob {
    linger: Option<Duration>,
    /// Boxed once per close (a `Sleep` is not `Unpin`).
    deadline: Option<Pin<Box<Sleep>>>,
    rejected_before: (u64, u64),
    first: Option<FlowError>,
    /// Set when the flush is over: the messages and bytes dropped.
    unsent: Option<(u64, u64)>,
    /// The blocking task that closes the socket (for the linger).
    task: Option<JoinHandle<()>>,
}

impl Sink for ZmqSink {
    type Item = Multipart;

    /// `Ready(Ok(()))` when the sink accepts another message: pushes the
    /// queue into libzmq and, while it is above the high watermark, waits
    /// for libzmq's room.
    ///
    /// # Errors
    /// [`FlowError::Closed`] after `close`; a queued message libzmq rejected
    /// for good ([`ZmqError::Unroutable`]).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let polled = self.poll_ready_steps(cx);
        if polled.is_ready() && (self.waited || self.raised) {
            self.end_wait();
        }
        polled
    }

    /// Hands the message to libzmq, or queues it (charged) if libzmq is at
    /// its HWM. Gives the message back on a closed sink, a socket type that
    /// cannot send, an empty message, or an error of libzmq's send (the
    /// socket's sending side broken mid-message, an unroutable ROUTER
    /// message): a message libzmq did not take is never half-sent.
    fn start_send(&mut self, item: Multipart) -> Result<(), SendError<Multipart>> {
        let core = match self.open_core() {
            Ok(c) => c,
            Err(e) => return Err(SendError::new(item, e)),
        };
        if !core.kind.can_send() {
            let e = ZmqError::Unsupported {
                op: "send",
                socket: core.kind.name(),
            };
            return Err(SendError::new(item, e.into()));
        }
        if item.is_empty() {
            return Err(SendError::new(item, ZmqError::EmptyMessage.into()));
        }
        let weight = item.weight();
        let charge = charge_of(&item);
        if self.queue.is_empty() {
            // Fast path: straight into libzmq, nothing buffered here.
            let sent = match core.try_send(&item) {
                Ok(sent) => sent,
                Err(e) => return Err(SendError::new(item, e)),
            };
            let mut tally = Tally::default();
            let left = Self::account(core.kind, sent, &mut tally);
            if left {
                if sent == Sent::Taken {
                    self.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                tally.direct = (1, weight as u64);
                self.items += 1;
                self.bytes += weight as u64;
                self.budget.charge(charge);
            }
            self.settle(&tally);
            if left {
                return Ok(());
            }
        }
        if !self.gate.overflow().blocks() && !self.gate.fits(charge) {
            match self.gate.overflow() {
                Overflow::DropNewest => {
                    // Accepted (the send succeeds) and dropped: counted in
                    // `items` as in `dropped`, so `items = sent + dropped`.
                    self.gate.record_drop(DropReason::DropNewest, 1);
                    self.items += 1;
                    self.bytes += weight as u64;
                    if let Some(m) = &self.metrics {
                        m.items.increment(1);
                        m.bytes.increment(weight as u64);
                    }
                    self.budget.charge(charge);
                    return Ok(());
                }
                Overflow::DropOldest => {
                    let mut evicted = 0;
                    while !self.gate.fits(charge) {
                        let Some(old) = self.queue.pop_front() else {
                            break;
                        };
                        // Credited one by one: `fits` reads what is buffered.
                        self.gate.credit(charge_of(&old));
                        evicted += 1;
                    }
                    self.gate.record_drop(DropReason::DropOldest, evicted);
                }
                _ => {
                    let err = FlowError::Overflow {
                        buffered: self.gate.buffered(),
                        charge,
                        high: self.gate.watermarks().high(),
                    };
                    return Err(SendError::new(item, err));
                }
            }
        }
        if self.queue.is_empty() {
            self.refused = 1;
        }
        self.gate.charge_item(&item);
        self.items += 1;
        self.bytes += weight as u64;
        self.budget.charge(charge);
        self.queue.push_back(item);
        Ok(())
    }

    /// Pushes the queue into libzmq, waiting for its room. A queued message
    /// libzmq rejected for good is dropped and its error returned.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let polled = self.poll_flush_steps(cx);
        if polled.is_ready() {
            self.end_wait();
        }
        polled
    }

    /// Flushes the queue into libzmq (waiting at most the linger), then closes
    /// the sending side. If the source half is gone too, the libzmq socket is
    /// closed; with a private context `close` then waits until libzmq has sent
    /// every message or the linger has expired. Abandoned at `Pending`, it
    /// resumes when polled again (the linger counts from the first poll);
    /// `poll_ready` and `start_send` refuse from the first poll on.
    ///
    /// A queued message libzmq rejects for good (an unroutable ROUTER
    /// message) is dropped and the flush goes on with the messages behind it.
    /// Every message accepted is then either handed to libzmq or counted in
    /// the error, and `stats().buffered` is 0 afterwards, even after an error.
    /// Once it has returned, later calls return `Ready(Ok(()))`.
    ///
    /// # Errors
    /// [`ZmqError::Unsent`] if messages the sink had accepted were dropped
    /// (how many, their bytes, and the first error as its source: the
    /// linger's [`FlowError::Timeout`], [`ZmqError::Unroutable`], ...);
    /// the first error itself if none were.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let mut job = match self.closing.take() {
            Some(job) => job,
            None => {
                let linger = match &self.core {
                    Some(core) if !self.closed => core.linger,
                    _ => {
                        self.closed = true;
                        return Poll::Ready(Ok(()));
                    }
                };
                CloseJob {
                    linger,
                    deadline: linger.map(|l| Box::pin(tokio::time::sleep(l))),
                    rejected_before: self.rejected,
                    first: None,
                    unsent: None,
                    task: None,
                }
            }
        };
        let polled = self.poll_close_job(cx, &mut job);
        if polled.is_pending() {
            self.closing = Some(job);
        }
        polled
    }

    /// `buffered`, `max_buffered`, `paused` and `pauses` are those of the
    /// sink's own queue (messages libzmq refused at its HWM); `items` and
    /// `bytes` count every message accepted.
    fn stats(&self) -> FlowStats {
        let mut s = self.gate.stats();
        s.items = self.items;
        s.bytes = self.bytes;
        s
    }

    /// The paused/resumed edges of the sink's own queue: paused while it is
    /// above the high watermark (a send would wait, under
    /// [`Overflow::Block`]), resumed at the low one.
    fn writability(&self) -> Option<Writability> {
        Some(self.gate.writability())
    }
}

impl Drop for ZmqSink {
    fn drop(&mut self) {
        // Abandoned mid-wait: the source half need not re-check for us.
        self.end_wait();
    }
}
