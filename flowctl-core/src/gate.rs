//! The watermark gate: byte-counted hysteresis with wake-ups on the resume edge.
//!
//! Every buffer in flowctl is charged through a gate. The rules:
//!
//! - [`charge_item`](Gate::charge_item) adds an item's charge,
//!   [`charge_of`](crate::weighted::charge_of) (its weight, at least [`MIN_CHARGE`](crate::weighted::MIN_CHARGE)
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
//! The hysteresis itself is [`GateState`]: public, without a lock or
//! wake-ups, for a stage that owns its buffer and waits in a way of its own
//! (flowctl-zmq's sink waits for libzmq's room). [`Gate`] is that state plus a
//! wait list behind a mutex; both read the same [`FlowStats`].
//!
//! Check and waker registration happen under the same short lock as every
//! state change, so a wake-up cannot be lost (see the loom model in
//! `tests/loom_gate.rs`). Wakers are kept one slot per handle, so a producer
//! polled many times while paused holds one waker, not one per poll, and only
//! the resume edge wakes anyone (no herd on every credit).

use std::task::{Context, Poll, Waker};

use tracing::Span;

use crate::stage::{DropReason, Overflow, Stage, StageState, Writability};
use crate::sync::{Arc, Mutex, lock};
use crate::{FlowError, FlowStats, Watermarks, Weighted};

/// Byte-counted hysteresis without a lock or wake-ups: the state machine
/// every flowctl buffer is charged through, for a stage that owns its buffer
/// and waits in a way of its own (or already holds a lock around it).
///
/// [`Gate`] wraps it, with a wait list of producers, in an `Arc<Mutex>`; a
/// stage that owns its queue (flowctl-zmq's sink) embeds it directly, so that
/// asking whether it is paused costs no lock.
///
/// - [`charge_item`](Self::charge_item) adds an item's [`charge_of`](crate::weighted::charge_of) (its
///   weight, at least [`MIN_CHARGE`](crate::weighted::MIN_CHARGE) bytes);
///   [`charge`](Self::charge) adds raw bytes. Going above `high` pauses
///   (`pauses += 1`, one `tracing` debug event inside the span).
/// - [`credit`](Self::credit) removes bytes; a paused state that falls to
///   `low` or below resumes (one debug event), and `credit` returns `true`
///   on exactly that edge, so the caller knows when to wake its producers.
/// - [`stats`](Self::stats) reads `buffered`, `max_buffered`, `paused`,
///   `pauses`, `items` and `bytes` (weights, not charges) and `violations`.
///
/// ```
/// use flowctl_core::{gate::GateState, Watermarks};
/// use flowctl_core::prelude::*;
/// # fn main() -> Result<(), flowctl_core::FlowError> {
/// let mut state = GateState::new(Watermarks::new(4, 10)?, tracing::Span::none());
/// state.charge(10);
/// assert!(!state.is_paused());     // exactly high is not above it
/// state.charge(1);
/// assert!(state.is_paused());      // 11 > high: paused
/// assert!(!state.credit(6));       // 5 > low: still paused
/// assert!(state.credit(1));        // 4 <= low: the resume edge
/// assert_eq!(state.stats().pauses, 1);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct GateState {
    wm: Watermarks,
    buffered: usize,
    paused: bool,
    max_buffered: usize,
    pauses: u64,
    items: u64,
    bytes: u64,
    violations: u64,
    dropped: u64,
    forced_yields: u64,
    span: Span,
    stage: StageState,
}

impl Drop for GateState {
    /// Brings the stage's metrics up to date: a stage that is gone reads
    /// what it last held.
    fn drop(&mut self) {
        self.stage.sync(self.buffered, self.max_buffered);
    }
}

/// What a credit did to a [`GateState`]; a violation is reported by its
/// caller (after waking any producers, so that none is left parked).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Credited {
    /// The resume edge: paused before, at or below low now.
    pub(crate) resumed: bool,
    /// The bytes buffered before a credit that exceeded them.
    violated: Option<usize>,
    bytes: usize,
}

impl Credited {
    /// Panics in debug builds if the credit exceeded what was buffered.
    pub(crate) fn check(self) {
        if let Some(before) = self.violated
            && cfg!(debug_assertions)
        {
            panic!(
                "invariant violated: credit of {} with {before} buffered",
                self.bytes
            );
        }
    }

    pub(crate) fn violated(self) -> bool {
        self.violated.is_some()
    }
}

impl GateState {
    /// Nothing buffered, not paused; pause/resume events are emitted inside `span`.
    pub fn new(watermarks: Watermarks, span: Span) -> Self {
        GateState {
            wm: watermarks,
            buffered: 0,
            paused: false,
            max_buffered: 0,
            pauses: 0,
            items: 0,
            bytes: 0,
            violations: 0,
            dropped: 0,
            forced_yields: 0,
            span,
            stage: StageState::new(),
        }
    }

    /// Names this state's stage: its pause/resume events carry the name, and
    /// with the `metrics` feature it exports the stage's metrics (see
    /// [`stage`](crate::stage)).
    pub fn with_stage(mut self, stage: Stage) -> Self {
        self.set_stage(stage);
        self
    }

    /// See [`with_stage`](Self::with_stage).
    pub fn set_stage(&mut self, stage: Stage) {
        // What the old name has pending is written under it; the new name
        // starts from the current values.
        self.stage.sync(self.buffered, self.max_buffered);
        self.stage.set_stage(stage, self.wm);
        self.stage.sync(self.buffered, self.max_buffered);
    }

    /// The stage's name, if it has one.
    pub fn stage(&self) -> Option<&Stage> {
        self.stage.stage()
    }

    /// Sets what the stage does when full (see [`Overflow`]). The state only
    /// records it; the stage that owns the buffer applies it, with
    /// [`fits`](Self::fits) and [`record_drop`](Self::record_drop).
    pub fn set_overflow(&mut self, overflow: Overflow) {
        self.stage.overflow = overflow;
    }

    /// The overflow policy (default [`Overflow::Block`]).
    pub fn overflow(&self) -> Overflow {
        self.stage.overflow
    }

    /// True when an item charged `charge` bytes may be admitted under a
    /// dropping [`Overflow`] policy: it fits under `high`, or nothing is
    /// buffered (so an item larger than `high` is never refused for ever).
    pub fn fits(&self, charge: usize) -> bool {
        self.buffered == 0 || self.buffered + charge <= self.wm.high()
    }

    /// Counts `items` dropped for `reason`: in [`FlowStats::dropped`], the
    /// `flowctl_dropped_total` metric and a `tracing` warn at most once per
    /// second. For items a stage drops (its [`Overflow`] policy, or a
    /// transport's own drops, such as ZeroMQ PUB at its high-water mark).
    pub fn record_drop(&mut self, reason: DropReason, items: u64) {
        self.dropped += items;
        self.stage.on_drop(reason, items, self.dropped);
    }

    /// Counts one forced yield of the stage's source (its fairness slice was
    /// spent): [`FlowStats::forced_yields`] and `flowctl_forced_yields_total`.
    pub fn record_forced_yield(&mut self) {
        self.forced_yields += 1;
        self.stage.on_forced_yield();
    }

    /// A handle that observes this state's paused/resumed edges.
    pub fn writability(&self) -> Writability {
        self.stage.writability()
    }

    /// The watermarks.
    pub fn watermarks(&self) -> Watermarks {
        self.wm
    }

    /// Bytes charged and not yet credited.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// True while paused: since going above high, until back at or below low.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Charges one item: [`charge_of`](crate::weighted::charge_of)`(item)` bytes are buffered and its
    /// weight is counted in [`FlowStats::bytes`]. Returns the charge: credit
    /// exactly that much for this item, at once or in parts.
    pub fn charge_item<T: Weighted + ?Sized>(&mut self, item: &T) -> usize {
        self.charge_weight(item.weight())
    }

    /// [`charge_item`](Self::charge_item) of an item of `weight` bytes.
    pub(crate) fn charge_weight(&mut self, weight: usize) -> usize {
        let charge = weight.max(crate::weighted::MIN_CHARGE);
        self.add(charge, weight);
        charge
    }

    /// Charges `bytes` raw bytes as one item (no per-item floor: use
    /// [`charge_item`](Self::charge_item) for items, or items of weight 0
    /// would pass the watermarks).
    pub fn charge(&mut self, bytes: usize) {
        self.add(bytes, bytes);
    }

    fn add(&mut self, charge: usize, weight: usize) {
        self.buffered += charge;
        self.items += 1;
        self.bytes += weight as u64;
        self.max_buffered = self.max_buffered.max(self.buffered);
        self.stage
            .on_charge(self.buffered, self.max_buffered, weight);
        if !self.paused && self.buffered > self.wm.high() {
            self.paused = true;
            self.pauses += 1;
            self.stage.sync(self.buffered, self.max_buffered);
            self.stage.on_pause(self.pauses);
            tracing::debug!(parent: &self.span, stage = self.stage_name(), buffered = self.buffered, high = self.wm.high(), "paused: above high watermark");
        }
    }

    /// Credits `bytes`: the next stage has taken them. Returns `true` on the
    /// resume edge (this credit brought a paused state to low or below).
    ///
    /// # Panics
    /// In debug builds, if `bytes` is more than is buffered (a double credit
    /// or a credit that does not match its charge). Release builds clamp to
    /// zero and count the violation in [`FlowStats::violations`].
    pub fn credit(&mut self, bytes: usize) -> bool {
        let credited = self.apply_credit(bytes);
        credited.check();
        credited.resumed
    }

    /// [`credit`](Self::credit) without the panic: the caller calls
    /// [`Credited::check`] once it has woken whoever waits.
    pub(crate) fn apply_credit(&mut self, bytes: usize) -> Credited {
        let violated = (bytes > self.buffered).then_some(self.buffered);
        if violated.is_some() {
            // A double credit, or credits that do not sum to the charge: a bug
            // in the stage. Clamp (a wrapped count would be worse), count it so
            // that it shows in the stats and the soak, and panic in debug builds
            // once the state is consistent again.
            self.violations += 1;
            tracing::warn!(parent: &self.span, credit = bytes, buffered = self.buffered, "invariant violated: credit exceeds buffered bytes");
        }
        self.buffered = self.buffered.saturating_sub(bytes);
        self.stage.on_credit(self.buffered, self.max_buffered);
        let resumed = self.paused && self.buffered <= self.wm.low();
        if resumed {
            self.paused = false;
            self.stage.sync(self.buffered, self.max_buffered);
            self.stage.on_resume(self.pauses);
            tracing::debug!(parent: &self.span, stage = self.stage_name(), buffered = self.buffered, low = self.wm.low(), "resumed: at or below low watermark");
        }
        Credited {
            resumed,
            violated,
            bytes,
        }
    }

    /// A snapshot of the counters. With the `metrics` feature it also
    /// writes the stage's pending metrics, so a scrape right after it agrees.
    pub fn stats(&self) -> FlowStats {
        self.stage.sync_shared(self.buffered, self.max_buffered);
        FlowStats {
            buffered: self.buffered,
            max_buffered: self.max_buffered,
            watermarks: self.wm,
            paused: self.paused,
            pauses: self.pauses,
            items: self.items,
            bytes: self.bytes,
            violations: self.violations,
            dropped: self.dropped,
            forced_yields: self.forced_yields,
            paused_time: self.stage.paused_time(),
        }
    }

    fn stage_name(&self) -> &str {
        self.stage.stage().map_or("", |s| s.name())
    }
}

/// A [`GateState`] with a wait list: one waker slot per producer handle, and
/// the closed flag. Embedded by stages that already hold a lock (the pipe
/// keeps its queue and its gate under one mutex) and by [`Gate`].
#[derive(Debug)]
pub(crate) struct GateInner {
    state: GateState,
    closed: bool,
    waiters: Vec<Option<Waker>>,
    free: Vec<usize>,
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

impl GateInner {
    pub(crate) fn new(wm: Watermarks, span: Span) -> Self {
        GateInner {
            state: GateState::new(wm, span),
            closed: false,
            waiters: Vec::new(),
            free: Vec::new(),
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
        self.state.buffered()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// See [`GateState::charge_item`]; takes the item's weight.
    pub(crate) fn charge_item(&mut self, weight: usize) -> usize {
        self.state.charge_weight(weight)
    }

    /// Credits `weight` bytes; on the resume edge, returns every waiting
    /// producer's waker. Panics in debug builds on a violation, after waking
    /// the waiters (so that no producer is left parked).
    pub(crate) fn credit(&mut self, weight: usize) -> Wakeups {
        let credited = self.state.apply_credit(weight);
        let wakeups = if credited.resumed {
            self.take_waiters()
        } else {
            Wakeups::default()
        };
        if credited.violated() && cfg!(debug_assertions) {
            wakeups.wake();
            credited.check();
            return Wakeups::default();
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
        if !self.state.is_paused() || !self.state.overflow().blocks() {
            return Poll::Ready(Ok(()));
        }
        match &mut self.waiters[slot] {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    pub(crate) fn stats(&self) -> FlowStats {
        self.state.stats()
    }

    pub(crate) fn state(&self) -> &GateState {
        &self.state
    }

    pub(crate) fn state_mut(&mut self) -> &mut GateState {
        &mut self.state
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
/// use flowctl_core::prelude::*;
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
    state: Arc<Mutex<GateInner>>,
}

impl Gate {
    /// A gate with these watermarks; pause/resume events are emitted inside `span`.
    pub fn new(watermarks: Watermarks, span: Span) -> Self {
        Gate {
            state: Arc::new(Mutex::new(GateInner::new(watermarks, span))),
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
        lock(&self.state).state.charge(weight);
    }

    /// Charges one item: [`charge_of`](crate::weighted::charge_of)`(item)` bytes (its weight, and at least
    /// [`MIN_CHARGE`](crate::weighted::MIN_CHARGE)) are buffered, and its
    /// weight is counted in [`FlowStats::bytes`]. Returns the charge: credit
    /// exactly that much for this item, at once or in parts.
    pub fn charge_item<T: Weighted + ?Sized>(&self, item: &T) -> usize {
        lock(&self.state).state.charge_item(item)
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
        lock(&self.state).state.is_paused()
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

    /// Names the gate's stage; see [`GateState::with_stage`].
    pub fn set_stage(&self, stage: Stage) {
        lock(&self.state).state.set_stage(stage);
    }

    /// Sets the overflow policy; see [`GateState::set_overflow`]. Under a
    /// policy other than [`Overflow::Block`], [`GateHandle::ready`] never waits.
    pub fn set_overflow(&self, overflow: Overflow) {
        lock(&self.state).state.set_overflow(overflow);
    }

    /// See [`GateState::record_drop`].
    pub fn record_drop(&self, reason: DropReason, items: u64) {
        lock(&self.state).state.record_drop(reason, items);
    }

    /// See [`GateState::record_forced_yield`].
    pub fn record_forced_yield(&self) {
        lock(&self.state).state.record_forced_yield();
    }

    /// A handle that observes the gate's paused/resumed edges.
    pub fn writability(&self) -> Writability {
        lock(&self.state).state.writability()
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

    fn state(low: usize, high: usize) -> GateState {
        GateState::new(Watermarks::new(low, high).unwrap(), Span::none())
    }

    #[test]
    fn state_pauses_above_high_and_reports_the_resume_edge_once() {
        let mut st = state(4, 10);
        st.charge(10);
        assert!(!st.is_paused(), "exactly high is not above high");
        st.charge(1);
        assert!(st.is_paused());
        st.charge(5); // already paused: no second pause
        assert_eq!(st.stats().pauses, 1);
        assert!(!st.credit(11), "5 left: still above low");
        assert!(st.is_paused());
        assert!(st.credit(1), "4 == low: the resume edge");
        assert!(!st.is_paused());
        assert!(!st.credit(4), "an open state has no resume edge");
        let s = st.stats();
        assert_eq!(
            (s.buffered, s.max_buffered, s.pauses, s.items, s.bytes),
            (0, 16, 1, 3, 16)
        );
        assert_eq!(s.watermarks, st.watermarks());
    }

    #[test]
    fn state_counts_every_pause_and_low_zero_resumes_only_when_empty() {
        let mut st = state(0, 3);
        for round in 1..=3u64 {
            st.charge(4);
            assert!(st.is_paused());
            assert!(!st.credit(3));
            assert!(st.credit(1));
            assert_eq!(st.stats().pauses, round);
        }
        assert_eq!(st.stats().max_buffered, 4);
    }

    #[test]
    fn state_charge_item_floors_the_charge_and_counts_the_weight() {
        let mut st = state(0, 1000);
        let min = crate::weighted::MIN_CHARGE;
        assert_eq!(st.charge_item(&bytes::Bytes::new()), min);
        assert_eq!(st.charge_item(&vec![0u8; 500]), 500);
        let s = st.stats();
        assert_eq!((s.buffered, s.items, s.bytes), (min + 500, 2, 500));
        st.charge_item(&vec![0u8; 1000 - min - 500]);
        assert!(!st.is_paused(), "exactly high");
        st.charge_item(&());
        assert!(st.is_paused(), "an empty item still pauses: it is charged");
    }

    #[test]
    fn state_over_credit_is_counted_and_clamped_and_panics_in_debug() {
        let mut st = state(0, 10);
        st.charge(12);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| st.credit(13)));
        assert_eq!(r.is_err(), cfg!(debug_assertions));
        let s = st.stats();
        assert_eq!((s.violations, s.buffered, s.paused), (1, 0, false), "{s:?}");
    }

    #[test]
    fn gate_and_state_read_the_same() {
        let g = gate(2, 5);
        let mut st = state(2, 5);
        for (charge, credit) in [(3, 0), (4, 1), (0, 4), (9, 0), (0, 11)] {
            g.charge(charge);
            st.charge(charge);
            g.credit(credit);
            st.credit(credit);
            // Everything but the time paused, which each clock reads for itself.
            let counts = |s: FlowStats| FlowStats {
                paused_time: std::time::Duration::ZERO,
                ..s
            };
            assert_eq!(counts(g.stats()), counts(st.stats()));
        }
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
