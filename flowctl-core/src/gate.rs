//! The watermark gate: byte-counted hysteresis with wake-ups on the resume edge.
//!
//! Every buffer in flowctl is charged through a gate. The rules:
//!
//! - [`charge_item`](Gate::charge_item) adds an item's charge,
//!   [`charge_of`] (its weight, at least [`MIN_CHARGE`](crate::weighted::MIN_CHARGE)
//!   bytes); [`charge`](Gate::charge) adds a raw byte count. When the total
//!   goes above `high`, the gate pauses (one `tracing` debug event,
//!   `pauses += 1`).
//! - [`credit`](Gate::credit) removes bytes once the next stage has taken
//!   them; the credits for one item sum to exactly what it was charged. When
//!   a paused gate falls to `low` or below, it resumes and wakes every waiting
//!   producer exactly once (one debug event). Crediting more than is buffered
//!   is a bug in the stage: it is counted in
//!   [`FlowStats::violations`] (and panics in debug builds).
//! - A producer waits in [`GateHandle::ready`] only while the gate is paused, so
//!   an item larger than `high` is admitted whenever the gate is open and nothing
//!   deadlocks. Each handle overshoots `high` by at most the one item it sends
//!   after `ready`.
//! - [`close`](Gate::close) wakes every waiter with [`FlowError::Closed`].
//!
//! Check and waker registration happen under the same short lock as every
//! state change, so a wake-up cannot be lost (see the loom model in
//! `tests/loom_gate.rs`). Wakers are kept one slot per handle, so a producer
//! polled many times while paused holds one waker, not one per poll, and only
//! the resume edge wakes anyone (no herd on every credit).

use std::task::{Context, Poll, Waker};

use tracing::Span;

use crate::sync::{Arc, Mutex, lock};
use crate::weighted::charge_of;
use crate::{FlowError, FlowStats, Watermarks, Weighted};

/// The unsynchronised gate state; embedded by stages that already hold a lock
/// (the pipe keeps its queue and its gate under one mutex).
#[derive(Debug)]
pub(crate) struct GateState {
    wm: Watermarks,
    buffered: usize,
    paused: bool,
    closed: bool,
    max_buffered: usize,
    pauses: u64,
    items: u64,
    bytes: u64,
    violations: u64,
    waiters: Vec<Option<Waker>>,
    free: Vec<usize>,
    span: Span,
}

/// Wakers collected under the lock, to be woken after it is released.
#[must_use = "wake the collected wakers after releasing the lock"]
#[derive(Debug, Default)]
pub(crate) struct Wakeups(Vec<Waker>);

impl Wakeups {
    pub(crate) fn push(&mut self, waker: Waker) {
        self.0.push(waker);
    }

    pub(crate) fn extend(&mut self, other: Wakeups) {
        self.0.extend(other.0);
    }

    pub(crate) fn wake(self) {
        for w in self.0 {
            w.wake();
        }
    }
}

impl GateState {
    pub(crate) fn new(wm: Watermarks, span: Span) -> Self {
        GateState {
            wm,
            buffered: 0,
            paused: false,
            closed: false,
            max_buffered: 0,
            pauses: 0,
            items: 0,
            bytes: 0,
            violations: 0,
            waiters: Vec::new(),
            free: Vec::new(),
            span,
        }
    }

    pub(crate) fn register(&mut self) -> usize {
        match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.waiters.push(None);
                self.waiters.len() - 1
            }
        }
    }

    pub(crate) fn deregister(&mut self, slot: usize) {
        self.waiters[slot] = None;
        self.free.push(slot);
    }

    pub(crate) fn buffered(&self) -> usize {
        self.buffered
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Charges one item of `weight` payload bytes: [`charge_of`] it is
    /// buffered, its `weight` is counted in `bytes`. Returns the charge, which
    /// the credits for this item must sum to.
    pub(crate) fn charge_item(&mut self, weight: usize) -> usize {
        let charge = weight.max(crate::weighted::MIN_CHARGE);
        self.add(charge, weight);
        charge
    }

    /// Charges `bytes` raw bytes as one item (no per-item floor).
    pub(crate) fn charge(&mut self, bytes: usize) {
        self.add(bytes, bytes);
    }

    fn add(&mut self, charge: usize, weight: usize) {
        self.buffered += charge;
        self.items += 1;
        self.bytes += weight as u64;
        self.max_buffered = self.max_buffered.max(self.buffered);
        if !self.paused && self.buffered > self.wm.high() {
            self.paused = true;
            self.pauses += 1;
            tracing::debug!(parent: &self.span, buffered = self.buffered, high = self.wm.high(), "paused: above high watermark");
        }
    }

    pub(crate) fn credit(&mut self, weight: usize) -> Wakeups {
        let violated = weight > self.buffered;
        if violated {
            // A double credit, or credits that do not sum to the charge: a bug
            // in the stage. Clamp (a wrapped count would be worse), count it so
            // that it shows in the stats and the soak, and panic in debug builds
            // once the state is consistent again.
            self.violations += 1;
            tracing::warn!(parent: &self.span, credit = weight, buffered = self.buffered, "invariant violated: credit exceeds buffered bytes");
        }
        let buffered_before = self.buffered;
        self.buffered = self.buffered.saturating_sub(weight);
        let mut wakeups = Wakeups::default();
        if self.paused && self.buffered <= self.wm.low() {
            self.paused = false;
            tracing::debug!(parent: &self.span, buffered = self.buffered, low = self.wm.low(), "resumed: at or below low watermark");
            wakeups = self.take_waiters();
        }
        if violated && cfg!(debug_assertions) {
            // Wake before panicking so that no producer is left parked.
            wakeups.wake();
            panic!("invariant violated: credit of {weight} with {buffered_before} buffered");
        }
        wakeups
    }

    pub(crate) fn close(&mut self) -> Wakeups {
        self.closed = true;
        self.take_waiters()
    }

    fn take_waiters(&mut self) -> Wakeups {
        Wakeups(self.waiters.iter_mut().filter_map(Option::take).collect())
    }

    pub(crate) fn poll_ready(
        &mut self,
        slot: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), FlowError>> {
        if self.closed {
            return Poll::Ready(Err(FlowError::Closed));
        }
        if !self.paused {
            return Poll::Ready(Ok(()));
        }
        match &mut self.waiters[slot] {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    pub(crate) fn stats(&self) -> FlowStats {
        FlowStats {
            buffered: self.buffered,
            max_buffered: self.max_buffered,
            watermarks: self.wm,
            paused: self.paused,
            pauses: self.pauses,
            items: self.items,
            bytes: self.bytes,
            violations: self.violations,
        }
    }
}

/// Spends one unit of tokio's coop budget (pending, with a wake-up scheduled,
/// when the task's budget is exhausted). Outside a tokio runtime it always proceeds.
pub(crate) fn coop_proceed(cx: &mut Context<'_>) -> Poll<()> {
    tokio::task::coop::poll_proceed(cx).map(|restore| restore.made_progress())
}

/// A shareable watermark gate, for stages that keep their own buffer: a
/// transport's reader charges what it takes off the wire and the consumer
/// credits what it hands on.
///
/// ```
/// use flowctl_core::{gate::Gate, Watermarks};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flowctl_core::FlowError> {
/// let gate = Gate::new(Watermarks::new(0, 10)?, tracing::Span::none());
/// let mut producer = gate.handle();
/// producer.ready().await?;      // open: returns at once
/// gate.charge(16);              // one item may overshoot high
/// assert!(gate.stats().paused);
/// gate.credit(16);              // back to low: resumes and wakes producers
/// producer.ready().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Gate {
    state: Arc<Mutex<GateState>>,
}

impl Gate {
    /// A gate with these watermarks; pause/resume events are emitted inside `span`.
    pub fn new(watermarks: Watermarks, span: Span) -> Self {
        Gate {
            state: Arc::new(Mutex::new(GateState::new(watermarks, span))),
        }
    }

    /// A producer's handle: it waits in [`GateHandle::ready`] while the gate is paused.
    pub fn handle(&self) -> GateHandle {
        let slot = lock(&self.state).register();
        GateHandle {
            gate: self.clone(),
            slot,
        }
    }

    /// Charges `weight` raw bytes as one item: they are now buffered.
    ///
    /// Use [`charge_item`](Gate::charge_item) for an item: a raw charge has no
    /// per-item floor, so items of weight 0 would pass the watermarks.
    pub fn charge(&self, weight: usize) {
        lock(&self.state).charge(weight);
    }

    /// Charges one item: [`charge_of`]`(item)` bytes (its weight, and at least
    /// [`MIN_CHARGE`](crate::weighted::MIN_CHARGE)) are buffered, and its
    /// weight is counted in [`FlowStats::bytes`]. Returns the charge: credit
    /// exactly that much for this item, at once or in parts.
    pub fn charge_item<T: Weighted + ?Sized>(&self, item: &T) -> usize {
        let charge = charge_of(item);
        let mut state = lock(&self.state);
        state.add(charge, item.weight());
        charge
    }

    /// Credits `weight` bytes: the next stage has taken them. Wakes the
    /// producers if this crosses the low watermark of a paused gate.
    ///
    /// # Panics
    /// In debug builds, if `weight` is more than is buffered (a double credit
    /// or a credit that does not match its charge). Release builds clamp to
    /// zero and count the violation in [`FlowStats::violations`].
    pub fn credit(&self, weight: usize) {
        let wakeups = lock(&self.state).credit(weight);
        wakeups.wake();
    }

    /// Closes the gate: every waiting and future `ready` fails with [`FlowError::Closed`].
    pub fn close(&self) {
        let wakeups = lock(&self.state).close();
        wakeups.wake();
    }

    /// True while producers are paused (above high, not yet back at low).
    pub fn is_paused(&self) -> bool {
        lock(&self.state).paused
    }

    /// True once [`close`](Gate::close) has been called.
    pub fn is_closed(&self) -> bool {
        lock(&self.state).is_closed()
    }

    /// Bytes charged and not yet credited.
    pub fn buffered(&self) -> usize {
        lock(&self.state).buffered()
    }

    /// A snapshot of the gate's counters.
    pub fn stats(&self) -> FlowStats {
        lock(&self.state).stats()
    }
}

/// A producer's place in a [`Gate`]'s wait list. Dropping it frees the place.
#[derive(Debug)]
pub struct GateHandle {
    gate: Gate,
    slot: usize,
}

impl GateHandle {
    /// `Ready(Ok)` while the gate is open; `Pending` while it is paused (this
    /// task is woken on the resume edge); `Ready(Err(Closed))` once closed.
    ///
    /// The ready path spends one unit of tokio's coop budget, so a producer
    /// that is never paused still yields to the scheduler regularly.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let ready = std::task::ready!(lock(&self.gate.state).poll_ready(self.slot, cx));
        std::task::ready!(coop_proceed(cx));
        Poll::Ready(ready)
    }

    /// Waits until the gate is open.
    ///
    /// # Cancel safety
    /// Cancel-safe: nothing is reserved, so dropping the future loses nothing.
    pub async fn ready(&mut self) -> Result<(), FlowError> {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// The gate this handle waits on.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }
}

impl Drop for GateHandle {
    fn drop(&mut self) {
        lock(&self.gate.state).deregister(self.slot);
    }
}

#[cfg(all(test, not(flowctl_loom)))]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    fn gate(low: usize, high: usize) -> Gate {
        Gate::new(Watermarks::new(low, high).unwrap(), Span::none())
    }

    #[test]
    fn hysteresis_pauses_above_high_and_resumes_at_low() {
        let g = gate(4, 10);
        let mut h = g.handle();
        let mut cx = Context::from_waker(noop_waker_ref());
        g.charge(10);
        assert!(!g.stats().paused, "exactly high is not above high");
        g.charge(1);
        assert!(g.stats().paused);
        assert!(h.poll_ready(&mut cx).is_pending());
        g.credit(6); // 5 left: still above low
        assert!(h.poll_ready(&mut cx).is_pending());
        g.credit(1); // 4 == low: resume
        assert!(matches!(h.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let s = g.stats();
        assert_eq!((s.pauses, s.max_buffered, s.items, s.bytes), (1, 11, 2, 11));
    }

    #[test]
    fn low_zero_resumes_only_when_drained() {
        let g = gate(0, 3);
        g.charge(5);
        g.credit(4);
        assert!(g.stats().paused);
        g.credit(1);
        assert!(!g.stats().paused);
    }

    #[test]
    fn item_larger_than_high_is_admitted_when_open() {
        let g = gate(0, 3);
        let mut h = g.handle();
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(matches!(h.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        g.charge(1000);
        assert_eq!(g.stats().max_buffered, 1000);
    }

    #[test]
    fn close_fails_waiters() {
        let g = gate(0, 1);
        let mut h = g.handle();
        let mut cx = Context::from_waker(noop_waker_ref());
        g.charge(2);
        assert!(h.poll_ready(&mut cx).is_pending());
        g.close();
        assert!(matches!(
            h.poll_ready(&mut cx),
            Poll::Ready(Err(FlowError::Closed))
        ));
    }

    #[test]
    fn slots_are_reused() {
        let g = gate(0, 1);
        for _ in 0..100 {
            let _h = g.handle();
        }
        assert_eq!(lock(&g.state).waiters.len(), 1);
    }

    #[tokio::test]
    async fn resume_edge_wakes_every_waiter_once() {
        let g = gate(0, 1);
        g.charge(2);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let mut h = g.handle();
            tasks.push(tokio::spawn(async move { h.ready().await }));
        }
        // Every task is parked on the gate before we credit: wait until all four
        // wakers are registered (the gate is the only thing they wait on).
        while lock(&g.state)
            .waiters
            .iter()
            .filter(|w| w.is_some())
            .count()
            < 4
        {
            tokio::task::yield_now().await;
        }
        g.credit(2);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }
}
