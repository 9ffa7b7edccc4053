//! A bounded, byte-counted, many-producer single-consumer channel.

use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};

use crate::fair::Budget;
use crate::gate::{GateInner, Wakeups, coop_proceed};
use crate::stage::{DropReason, Overflow, Stage, Writability};
use crate::sync::{Arc, Mutex, lock};
use crate::traits::SendError;
use crate::weighted::charge_of;
use crate::{Fairness, FlowError, FlowStats, Sink, Source, Watermarks, Weighted};

/// Creates a pipe bounded by `watermarks`: a cloneable [`PipeSink`] and a
/// [`PipeSource`].
///
/// Items are charged by [`charge_of`] (their [`Weighted::weight`], and at least
/// [`MIN_CHARGE`](crate::weighted::MIN_CHARGE) bytes, so that a stream of
/// empty items is bounded too) when sent and credited when the source hands
/// them to its caller. Senders wait while more than
/// `watermarks.high()` bytes are queued and resume when the queue is back at or
/// below `watermarks.low()`; each sender may overshoot by the one item it sends
/// after `ready`. The stream ends when every sink is closed or dropped and the
/// queue is empty.
///
/// ```
/// use bytes::Bytes;
/// use flowctl_core::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flowctl_core::FlowError> {
/// let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::new(1024, 4096)?);
/// tokio::spawn(async move {
///     for i in 0..10u8 {
///         tx.send(Bytes::from(vec![i; 1000])).await?;
///     }
///     tx.close().await
/// });
/// let mut total = 0;
/// while let Some(chunk) = rx.recv().await? {
///     total += chunk.len();
///     assert!(rx.stats().max_buffered <= 4096 + 1000);
/// }
/// assert_eq!(total, 10_000);
/// # Ok(()) }
/// ```
pub fn pipe<T: Weighted + Send + 'static>(watermarks: Watermarks) -> (PipeSink<T>, PipeSource<T>) {
    pipe_with(watermarks, Fairness::default())
}

/// [`pipe`] with an explicit [`Fairness`] budget for the source.
pub fn pipe_with<T: Weighted + Send + 'static>(
    watermarks: Watermarks,
    fairness: Fairness,
) -> (PipeSink<T>, PipeSource<T>) {
    PipeBuilder::new(watermarks).fairness(fairness).build()
}

/// Builds a [`pipe`] with a name, a [`Fairness`] budget and an [`Overflow`]
/// policy.
///
/// ```
/// use bytes::Bytes;
/// use flowctl_core::{Overflow, PipeBuilder};
/// use flowctl_core::prelude::*;
/// # fn main() -> Result<(), flowctl_core::FlowError> {
/// let (tx, rx) = PipeBuilder::new(Watermarks::new(16 * 1024, 64 * 1024)?)
///     .name("telemetry.in")          // tracing span and metrics label
///     .overflow(Overflow::DropOldest) // never block the producer
///     .build::<Bytes>();
/// assert_eq!(rx.stage().unwrap().name(), "telemetry.in");
/// # drop(tx); Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "call build() to get the pipe"]
pub struct PipeBuilder {
    watermarks: Watermarks,
    fairness: Fairness,
    overflow: Overflow,
    stage: Option<Stage>,
}

impl PipeBuilder {
    /// A pipe bounded by `watermarks`, unnamed, with the default
    /// [`Fairness`] and [`Overflow::Block`].
    pub fn new(watermarks: Watermarks) -> Self {
        PipeBuilder {
            watermarks,
            fairness: Fairness::default(),
            overflow: Overflow::Block,
            stage: None,
        }
    }

    /// The source's fairness budget.
    pub fn fairness(mut self, fairness: Fairness) -> Self {
        self.fairness = fairness;
        self
    }

    /// What a full pipe does with the next item (default [`Overflow::Block`]).
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// Names the pipe: its `tracing` span and, with the `metrics` feature,
    /// the `stage` label of its metrics. Unnamed pipes export no metrics.
    pub fn name(mut self, name: impl Into<std::sync::Arc<str>>) -> Self {
        self.stage = Some(Stage::new(name));
        self
    }

    /// Names the pipe with an existing [`Stage`].
    pub fn stage(mut self, stage: Stage) -> Self {
        self.stage = Some(stage);
        self
    }

    /// The pipe.
    pub fn build<T: Weighted + Send + 'static>(self) -> (PipeSink<T>, PipeSource<T>) {
        let watermarks = self.watermarks;
        let span = match &self.stage {
            Some(stage) => tracing::debug_span!(
                "flowctl.pipe",
                stage = stage.name(),
                high = watermarks.high(),
                low = watermarks.low()
            ),
            None => tracing::debug_span!(
                "flowctl.pipe",
                high = watermarks.high(),
                low = watermarks.low()
            ),
        };
        let mut gate = GateInner::new(watermarks, span);
        if let Some(stage) = self.stage {
            gate.state_mut().set_stage(stage);
        }
        gate.state_mut().set_overflow(self.overflow);
        let slot = gate.register();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                gate,
                senders: 1,
                rx_waker: None,
                rx_alive: true,
                flushers: Vec::new(),
            }),
        });
        (
            PipeSink {
                shared: shared.clone(),
                slot: Some(slot),
            },
            PipeSource {
                shared,
                budget: Budget::new(self.fairness),
            },
        )
    }
}

#[derive(Debug)]
struct Shared<T> {
    inner: Mutex<Inner<T>>,
}

#[derive(Debug)]
struct Inner<T> {
    queue: VecDeque<T>,
    gate: GateInner,
    senders: usize,
    rx_waker: Option<Waker>,
    rx_alive: bool,
    /// Handles waiting in `flush` for the queue to empty.
    flushers: Vec<Waker>,
}

impl<T> Inner<T> {
    /// Wakes flushers once the queue is empty (or the source is gone).
    fn drained(&mut self, wakeups: &mut Wakeups) {
        if self.queue.is_empty() || !self.rx_alive {
            for w in self.flushers.drain(..) {
                wakeups.push(w);
            }
        }
    }
}

/// The sending half of a [`pipe`]. Clone it for more producers (a clone of a
/// closed handle is closed).
///
/// See [`Sink`] for the contract. `flush` waits until the pipe is empty: every
/// item accepted so far, by any handle, has been taken by the source. `close`
/// ends this handle **without** waiting for the source: the queue belongs to
/// the receiving side, and whatever was accepted is still delivered after every
/// handle has closed (call `flush` first to wait for it). The stream ends when
/// every handle has ended and the queue is drained.
#[derive(Debug)]
pub struct PipeSink<T> {
    shared: Arc<Shared<T>>,
    /// `None` once closed.
    slot: Option<usize>,
}

/// A clone of an open handle is a new open handle. A clone of a closed handle
/// is closed: it must not revive a stream whose source may already have seen
/// its end.
impl<T> Clone for PipeSink<T> {
    fn clone(&self) -> Self {
        let slot = self.slot.map(|_| {
            let mut inner = lock(&self.shared.inner);
            inner.senders += 1;
            inner.gate.register()
        });
        PipeSink {
            shared: self.shared.clone(),
            slot,
        }
    }
}

impl<T> PipeSink<T> {
    /// The pipe's name, if it was given one.
    pub fn stage(&self) -> Option<Stage> {
        lock(&self.shared.inner).gate.state().stage().cloned()
    }

    /// True when the source has been dropped: sending would fail.
    pub fn is_closed(&self) -> bool {
        self.slot.is_none() || !lock(&self.shared.inner).rx_alive
    }

    /// Ends this handle (idempotent). The source sees the end of the stream
    /// once every handle has ended and the queue is drained.
    pub fn close_now(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let waker = {
            let mut inner = lock(&self.shared.inner);
            inner.gate.deregister(slot);
            inner.senders -= 1;
            if inner.senders == 0 {
                inner.rx_waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for PipeSink<T> {
    fn drop(&mut self) {
        self.close_now();
    }
}

/// `poll_flush` waits until the pipe is empty (or fails with
/// [`FlowError::Closed`] if the source was dropped: the items it had not taken
/// were released with it); `poll_close` ends this handle without waiting.
impl<T: Weighted + Send + 'static> Sink for PipeSink<T> {
    type Item = T;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let Some(slot) = self.slot else {
            return Poll::Ready(Err(FlowError::Closed));
        };
        let ready = std::task::ready!(lock(&self.shared.inner).gate.poll_ready(slot, cx));
        // A producer that is never paused must still yield now and then (tokio's
        // bounded mpsc does the same in `send`).
        std::task::ready!(coop_proceed(cx));
        Poll::Ready(ready)
    }

    fn start_send(&mut self, item: T) -> Result<(), SendError<T>> {
        if self.slot.is_none() {
            return Err(SendError::closed(item));
        }
        let weight = item.weight();
        let mut dropped = Vec::new();
        let mut wakeups = Wakeups::default();
        let waker = {
            let mut inner = lock(&self.shared.inner);
            if !inner.rx_alive {
                return Err(SendError::closed(item));
            }
            let charge = weight.max(crate::weighted::MIN_CHARGE);
            let state = inner.gate.state();
            if !state.overflow().blocks() && !state.fits(charge) {
                match state.overflow() {
                    Overflow::DropNewest => {
                        inner
                            .gate
                            .state_mut()
                            .record_drop(DropReason::DropNewest, 1);
                        drop(inner);
                        drop(item); // user code: outside the lock
                        return Ok(());
                    }
                    Overflow::DropOldest => {
                        while !inner.gate.state().fits(charge) {
                            let Some(old) = inner.queue.pop_front() else {
                                break;
                            };
                            wakeups.extend(inner.gate.credit(charge_of(&old)));
                            dropped.push(old);
                        }
                        let n = dropped.len() as u64;
                        inner
                            .gate
                            .state_mut()
                            .record_drop(DropReason::DropOldest, n);
                    }
                    _ => {
                        let state = inner.gate.state();
                        let err = FlowError::Overflow {
                            buffered: state.buffered(),
                            charge,
                            high: state.watermarks().high(),
                        };
                        return Err(SendError::new(item, err));
                    }
                }
            }
            let charge = inner.gate.charge_item(weight);
            tracing::trace!(weight, charge, "pipe: queued");
            inner.queue.push_back(item);
            inner.rx_waker.take()
        };
        drop(dropped); // user code: outside the lock
        wakeups.wake();
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let mut inner = lock(&self.shared.inner);
        if !inner.rx_alive {
            return Poll::Ready(Err(FlowError::Closed));
        }
        if inner.queue.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if !inner.flushers.iter().any(|w| w.will_wake(cx.waker())) {
            inner.flushers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    fn poll_close(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        self.close_now();
        Poll::Ready(Ok(()))
    }

    /// The pipe's counters (shared by every handle and the source).
    fn stats(&self) -> FlowStats {
        lock(&self.shared.inner).gate.stats()
    }

    /// Always `Some`: the pipe's edges, shared by every handle.
    fn writability(&self) -> Option<Writability> {
        Some(lock(&self.shared.inner).gate.state().writability())
    }
}

/// The receiving half of a [`pipe`].
///
/// See [`Source`] for the contract. Dropping it fails every pending and future
/// send with [`FlowError::Closed`] and releases the queued items.
#[derive(Debug)]
pub struct PipeSource<T> {
    shared: Arc<Shared<T>>,
    budget: Budget,
}

/// `poll_recv_many` takes a batch under one lock.
impl<T: Weighted + Send + 'static> Source for PipeSource<T> {
    type Item = T;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<T>, FlowError>> {
        let mut inner = lock(&self.shared.inner);
        if inner.queue.is_empty() {
            if inner.senders == 0 {
                return Poll::Ready(Ok(None));
            }
            self.budget.reset();
            match &mut inner.rx_waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        if self.budget.poll_proceed(cx).is_pending() {
            inner.gate.state_mut().record_forced_yield();
            return Poll::Pending;
        }
        let item = inner
            .queue
            .pop_front()
            .expect("queue checked non-empty under the lock");
        self.budget.charge(item.weight());
        let mut wakeups = inner.gate.credit(charge_of(&item));
        inner.drained(&mut wakeups);
        drop(inner);
        wakeups.wake();
        Poll::Ready(Ok(Some(item)))
    }

    fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<T>,
        max: usize,
    ) -> Poll<Result<usize, FlowError>> {
        if max == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut inner = lock(&self.shared.inner);
        if inner.queue.is_empty() {
            if inner.senders == 0 {
                return Poll::Ready(Ok(0));
            }
            self.budget.reset();
            match &mut inner.rx_waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        if self.budget.poll_proceed(cx).is_pending() {
            inner.gate.state_mut().record_forced_yield();
            return Poll::Pending;
        }
        let n = max.min(inner.queue.len());
        let (mut weight, mut charge) = (0, 0);
        buf.reserve(n);
        for item in inner.queue.drain(..n) {
            weight += item.weight();
            charge += charge_of(&item);
            buf.push(item);
        }
        // One batch is one slice entry for items, but its bytes count in full.
        self.budget.charge(weight);
        let mut wakeups = inner.gate.credit(charge);
        inner.drained(&mut wakeups);
        drop(inner);
        wakeups.wake();
        Poll::Ready(Ok(n))
    }

    fn stats(&self) -> FlowStats {
        lock(&self.shared.inner).gate.stats()
    }
}

impl<T> PipeSource<T> {
    /// The pipe's name, if it was given one.
    pub fn stage(&self) -> Option<Stage> {
        lock(&self.shared.inner).gate.state().stage().cloned()
    }
}

impl<T> Drop for PipeSource<T> {
    fn drop(&mut self) {
        let (queued, wakeups): (VecDeque<T>, Wakeups) = {
            let mut inner = lock(&self.shared.inner);
            inner.rx_alive = false;
            let queued = std::mem::take(&mut inner.queue);
            let buffered = inner.gate.buffered();
            let mut wakeups = inner.gate.credit(buffered);
            let closed = inner.gate.close();
            wakeups.extend(closed);
            inner.drained(&mut wakeups);
            (queued, wakeups)
        };
        // Items are dropped outside the lock: their destructors are user code.
        drop(queued);
        wakeups.wake();
    }
}
