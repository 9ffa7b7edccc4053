//! [`ZmqSink`], the sending half: libzmq first, a byte-charged queue of its
//! own when libzmq is at its SNDHWM.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use flowctl_core::fair::Budget;
use flowctl_core::gate::GateState;
use flowctl_core::weighted::charge_of;
use flowctl_core::{Fairness, FlowError, FlowStats, Sink, Watermarks, Weighted};

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
/// [`flush`](Sink::flush) (or `close`) before waiting for something else,
/// e.g. before awaiting the reply to a request sent on a DEALER.
///
/// # PUB sockets
/// libzmq's PUB drops a message for a subscriber at its HWM without a trace.
/// flowctl sets `ZMQ_XPUB_NODROP` so libzmq reports it, and counts the message
/// in [`ZmqStats::dropped`] instead of waiting (a PUB has no writability signal
/// per subscriber to wait on). With NODROP libzmq refuses the message for every
/// matching subscriber when one of them is full.
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
    /// Queued messages libzmq rejected for good (dropped by `drain`), and
    /// their payload bytes: what `close` counts as dropped besides the queue.
    rejected: (u64, u64),
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
    ) -> Self {
        ZmqSink {
            core: Some(core),
            refused: 0,
            counters,
            items: 0,
            bytes: 0,
            queue: VecDeque::new(),
            gate: GateState::new(wm, span),
            budget: Budget::new(fairness),
            closed: false,
            rejected: (0, 0),
        }
    }

    pub(super) fn core(&self) -> Result<&Arc<Core>, FlowError> {
        match &self.core {
            Some(c) if !self.closed => Ok(c),
            _ => Err(FlowError::Closed),
        }
    }

    /// Handles the outcome of a send attempt; true if the message left our
    /// hands (the caller counts it as sent if `sent` is [`Sent::Taken`]).
    #[inline]
    fn account(core: &Core, sent: Sent) -> bool {
        match sent {
            Sent::Taken => true,
            Sent::WouldBlock if core.kind == SocketType::Pub => {
                core.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::trace!("pub: subscriber at its HWM, message dropped");
                true
            }
            Sent::WouldBlock => false,
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
                        if !Self::account(&core, outcome) {
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

    /// `flush` for `close`: a queued message libzmq rejects for good (dropped
    /// by `drain`, counted in `rejected`) does not stop it, the messages
    /// behind it still go. It stops when the queue is empty or at an error
    /// that made no progress; the first error is left in `first`.
    async fn flush_for_close(&mut self, first: &mut Option<FlowError>) {
        loop {
            let before = self.queue.len();
            let step = match self.drain() {
                Ok(_) if self.queue.is_empty() => return,
                Ok(_) => self.wait_writable().await,
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                first.get_or_insert(e);
                if self.queue.len() >= before {
                    return;
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

    /// Waits for libzmq to have room. `ZMQ_EVENTS` may say "writable" while a
    /// send is still refused (a ROUTER whose addressed peer is full, with
    /// `ZMQ_ROUTER_MANDATORY`): then this yields instead of spinning.
    async fn wait_writable(&mut self) -> Result<(), FlowError> {
        let core = self.core()?.clone();
        if core.wait(Dir::Out, true).await? && self.drain()? == 0 {
            tokio::task::yield_now().await;
        }
        Ok(())
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
    /// Resolves when the sink accepts another message; see [`Sink::ready`].
    /// An inherent method, so a call on a `ZmqSink` itself costs no boxed
    /// future; the [`Sink`] impl calls it.
    ///
    /// # Errors
    /// [`FlowError::Closed`] after `close`; a queued message libzmq rejected
    /// for good ([`ZmqError::Unroutable`]).
    pub async fn ready(&mut self) -> Result<(), FlowError> {
        self.ready_inner().await
    }

    /// [`ready`](Self::ready), then [`Sink::start_send`]; see [`Sink::send`].
    /// Inherent for the same reason as `ready`, and it takes anything that
    /// converts into a [`Multipart`]: a `Bytes` (one frame), a `Vec<Bytes>`
    /// or an array of them.
    ///
    /// # Errors
    /// As `ready` and `start_send`.
    pub fn send(
        &mut self,
        item: impl Into<Multipart>,
    ) -> impl Future<Output = Result<(), FlowError>> + Send + '_ {
        // Converted here, so that the future is one type for every `item`.
        self.send_inner(item.into())
    }

    async fn send_inner(&mut self, item: Multipart) -> Result<(), FlowError> {
        self.ready_inner().await?;
        Sink::start_send(self, item)
    }

    /// Sends every message of `batch`, in order, taking them out of it: the
    /// batch counterpart of [`send`](Self::send), as
    /// [`Source::recv_many`](flowctl_core::Source::recv_many) is of `recv`.
    ///
    /// Each round passes [`ready`](Self::ready) (one unit of tokio's coop
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
    /// sent: as after `send`, [`flush`](Sink::flush) or `close` pushes what
    /// the sink still queues into libzmq.
    ///
    /// # Cancel safety
    /// Cancel-safe: if the future is dropped, the messages not yet accepted
    /// are still in `batch`, in order, and nothing else was taken.
    ///
    /// # Errors
    /// As [`send`](Self::send). A message that fails on its own (an empty
    /// one, an unroutable ROUTER message) is taken out of `batch` and
    /// dropped, as `start_send` would; the messages before it were accepted
    /// and the ones after it stay in `batch`. On a socket whose sending side
    /// broke off mid-message ([`ZmqError::BrokenSend`]) the message that
    /// broke it is dropped and the ones never tried stay in `batch`. On a closed sink or a socket
    /// type that cannot send, `batch` is left as it was.
    pub async fn send_many(&mut self, batch: &mut VecDeque<Multipart>) -> Result<usize, FlowError> {
        let mut accepted = 0;
        while !batch.is_empty() {
            self.ready_inner().await?;
            let (taken, refused) = self.accept_many(batch)?;
            accepted += taken;
            if refused {
                // libzmq is at its SNDHWM: wait for room, as a blocking
                // `zmq_send` would, instead of moving the rest of `batch`
                // into the sink's own queue.
                Box::pin(self.wait_writable()).await?;
            }
        }
        Ok(accepted)
    }

    /// One round of [`send_many`](Self::send_many): accepts messages from
    /// the front of `batch` until libzmq refuses one, the queue is paused or
    /// the fairness slice is spent, and removes them from `batch`. Returns
    /// how many, and whether libzmq refused one (that one stays in `batch`).
    fn accept_many(&mut self, batch: &mut VecDeque<Multipart>) -> Result<(usize, bool), FlowError> {
        let core = self.core()?.clone();
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
                        Ok(outcome) if Self::account(&core, outcome) => {
                            if outcome == Sent::Taken {
                                direct += 1;
                            }
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
        // The sends processed libzmq's commands: re-check for the receiver.
        core.after_op(Dir::Out);
        if let Some(e) = failed {
            return Err(e);
        }
        Ok((taken, refused))
    }

    async fn ready_inner(&mut self) -> Result<(), FlowError> {
        self.core()?;
        poll_fn(|cx| self.budget.poll_proceed(cx)).await;
        if self.queue.is_empty() {
            // Nothing to push into libzmq, and an empty queue is never paused.
            return Ok(());
        }
        let mut waited = false;
        loop {
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
                if waited {
                    self.budget.reset();
                }
                return Ok(());
            }
            waited = true;
            // Boxed: the wait's futures (a `Notified`, the fd's readiness)
            // would otherwise make every `send` future, moved once per
            // message, several times larger. A wait is not per message.
            Box::pin(self.wait_writable()).await?;
            self.refused = 0;
        }
    }
}

#[async_trait]
impl Sink for ZmqSink {
    type Item = Multipart;

    async fn ready(&mut self) -> Result<(), FlowError> {
        ZmqSink::ready(self).await
    }

    async fn send(&mut self, item: Multipart) -> Result<(), FlowError> {
        self.send_inner(item).await
    }

    fn start_send(&mut self, item: Multipart) -> Result<(), FlowError> {
        let core = match &self.core {
            Some(c) if !self.closed => c,
            _ => return Err(FlowError::Closed),
        };
        if !core.kind.can_send() {
            return Err(ZmqError::Unsupported {
                op: "send",
                socket: core.kind.name(),
            }
            .into());
        }
        if item.is_empty() {
            return Err(ZmqError::EmptyMessage.into());
        }
        let weight = item.weight();
        let charge = charge_of(&item);
        if self.queue.is_empty() {
            // Fast path: straight into libzmq, nothing buffered here.
            let sent = core.try_send(&item)?;
            if Self::account(core, sent) {
                if sent == Sent::Taken {
                    core.counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                self.items += 1;
                self.bytes += weight as u64;
                self.budget.charge(charge);
                return Ok(());
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

    async fn flush(&mut self) -> Result<(), FlowError> {
        loop {
            self.drain()?;
            if self.queue.is_empty() {
                return Ok(());
            }
            self.wait_writable().await?;
        }
    }

    /// Flushes the queue into libzmq (waiting at most the linger), then closes
    /// the sending side. If the source half is gone too, the libzmq socket is
    /// closed; with a private context `close` then waits until libzmq has sent
    /// every message or the linger has expired.
    ///
    /// A queued message libzmq rejects for good (an unroutable ROUTER
    /// message) is dropped and the flush goes on with the messages behind it.
    /// Every message accepted is then either handed to libzmq or counted in
    /// the error, and `stats().buffered` is 0 afterwards, even after an error.
    ///
    /// # Errors
    /// [`ZmqError::Unsent`] if messages the sink had accepted were dropped
    /// (how many, their bytes, and the first error as its source: the
    /// linger's [`FlowError::Timeout`], [`ZmqError::Unroutable`], ...);
    /// the first error itself if none were.
    async fn close(&mut self) -> Result<(), FlowError> {
        if self.closed || self.core.is_none() {
            self.closed = true;
            return Ok(());
        }
        let linger = self.core()?.linger;
        let rejected_before = self.rejected;
        let mut first = None;
        let flushing = self.flush_for_close(&mut first);
        match linger {
            Some(l) => {
                if tokio::time::timeout(l, flushing).await.is_err() {
                    first.get_or_insert(FlowError::Timeout(l));
                }
            }
            None => flushing.await,
        }
        self.closed = true;
        let (mut messages, mut bytes) = self.discard_queue();
        messages += self.rejected.0 - rejected_before.0;
        bytes += self.rejected.1 - rejected_before.1;
        if let Some(core) = self.core.take()
            && let Ok(mut core) = Arc::try_unwrap(core)
        {
            let (sock, ctx) = core.take_parts();
            match tokio::task::spawn_blocking(move || finish(sock, ctx)).await {
                Ok(()) => tracing::info!("zmq socket closed"),
                Err(e) => {
                    first.get_or_insert(FlowError::transport(format!("linger task failed: {e}")));
                }
            }
        }
        match first {
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
        }
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
}
