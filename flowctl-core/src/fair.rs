//! Fair yielding: no source may monopolise its task.
//!
//! A source that always has an item ready (a flooded socket, a full pipe, a
//! decoder sitting on a large buffer) never returns `Pending` by itself, so the
//! task that drains it never gives the scheduler a chance to run timers and other
//! tasks on the same thread. That is how PyZMQ's asyncio integration starved its
//! event loop; tokio's answer is the per-task coop budget (see
//! [`tokio::task::coop`]). flowctl applies two budgets on every ready path:
//!
//! 1. tokio's coop budget: each item taken consumes one unit
//!    ([`tokio::task::coop::poll_proceed`] followed by `made_progress`); when the
//!    task's budget is spent, the source returns `Pending` and tokio reschedules it.
//! 2. a flowctl [`Fairness`] budget of items **and bytes** per slice, because a
//!    coop unit is one operation whatever its size: 128 items of 64 KiB are 8 MiB
//!    of copying before a timer gets a look in. When either limit is reached the
//!    source wakes itself and returns `Pending` once.
//!
//! A slice ends at such a forced yield or whenever the source returns `Pending`
//! naturally. Every built-in source is fair already; wrap a foreign one with
//! [`SourceExt::fair`](crate::SourceExt::fair).

use std::task::{Context, Poll};

use crate::{FlowError, FlowStats, Source, Weighted};

/// How much work a source may do per slice before it yields.
///
/// ```
/// use flowctl_core::Fairness;
/// use flowctl_core::prelude::*;
/// let f = Fairness::new(32, 64 * 1024)?;
/// assert_eq!((f.max_items(), f.max_bytes()), (32, 65536));
/// # Ok::<(), flowctl_core::FlowError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fairness {
    /// Items per slice. A value of 0 is treated as 1.
    pub max_items: usize,
    /// Bytes per slice (the item that crosses it is the last of the slice). A
    /// value of 0 is treated as 1.
    pub max_bytes: usize,
}

impl Fairness {
    /// At most `max_items` items and about `max_bytes` bytes (the item that
    /// crosses the limit is the last of the slice) between yields. Both must be
    /// greater than zero.
    pub fn new(max_items: usize, max_bytes: usize) -> Result<Self, FlowError> {
        if max_items == 0 || max_bytes == 0 {
            return Err(FlowError::Config(format!(
                "fairness limits must be greater than zero (max_items {max_items}, max_bytes {max_bytes})"
            )));
        }
        Ok(Fairness {
            max_items,
            max_bytes,
        })
    }

    /// Items per slice.
    pub fn max_items(&self) -> usize {
        self.max_items
    }

    /// Bytes per slice.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }
}

impl Default for Fairness {
    /// 128 items or 256 KiB per slice.
    ///
    /// 128 items is tokio's own coop budget per task poll, so the item limit
    /// does not end a slice before tokio would: a shorter slice only adds
    /// forced yields (each a reschedule, and spending what is left of the
    /// coop budget: up to 127 more `poll_proceed` calls). The byte limit is
    /// what tokio does not have. With 64 items per slice (the default until
    /// 2026-11-22) callgrind counted about 40 more instructions per message
    /// on each side of `flowctl-zmq`'s 100-byte PUSH -> PULL bench; in wall
    /// time the `fairness_overhead` bench group cannot tell them apart on a
    /// shared machine. A 1 ms timer on the same thread waits at most one
    /// slice.
    fn default() -> Self {
        Fairness {
            max_items: 128,
            max_bytes: 256 * 1024,
        }
    }
}

/// The running count of one slice, kept by each fair source.
#[derive(Debug, Clone)]
pub struct Budget {
    fairness: Fairness,
    items: usize,
    bytes: usize,
    yields: u64,
    /// The last full check at a forced yield found tokio's coop budget
    /// unbounded (inside `tokio::task::unconstrained`, or outside a tokio
    /// runtime): see [`Budget::yield_spent_slice`].
    coop_unbounded: bool,
}

impl Budget {
    /// A fresh slice.
    pub fn new(fairness: Fairness) -> Self {
        Budget {
            // Zero limits would yield forever without taking an item.
            fairness: Fairness {
                max_items: fairness.max_items.max(1),
                max_bytes: fairness.max_bytes.max(1),
            },
            items: 0,
            bytes: 0,
            yields: 0,
            coop_unbounded: false,
        }
    }

    /// Call on the ready path, before taking an item that is known to be there.
    ///
    /// `Ready(())` means: take it now (one unit of tokio's coop budget has been
    /// consumed), then call [`charge`](Budget::charge). `Pending` means the slice
    /// is spent: the task has been scheduled to run again; return `Pending`.
    #[inline]
    pub fn poll_proceed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.spent() {
            return self.yield_spent_slice(cx);
        }
        match tokio::task::coop::poll_proceed(cx) {
            Poll::Ready(restore) => {
                restore.made_progress();
                // After `made_progress` the guard's drop restores nothing;
                // forgetting it saves that (out-of-line) call on every item.
                std::mem::forget(restore);
                Poll::Ready(())
            }
            Poll::Pending => self.yield_coop_spent(),
        }
    }

    /// The forced yield of [`poll_proceed`](Budget::poll_proceed): once per
    /// slice, kept out of the per-item path.
    #[cold]
    #[inline(never)]
    fn yield_spent_slice(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        tracing::debug!(
            items = self.items,
            bytes = self.bytes,
            "fair yield: slice spent"
        );
        self.end_slice();
        // Spending the rest of an unbounded budget would never end: the full
        // check stops one unit past tokio's per-poll budget (128 units, so a
        // 129th is there only when the budget is unbounded) and says so.
        // Once it has, the yields after it take one unit, with a full check
        // again every `COOP_RECHECK` yields and as soon as tokio's budget runs
        // out on the ready path (the source has moved into a budgeted task).
        // The bench row `core.fairness_overhead.unconstrained` measures it.
        if self.coop_unbounded && !self.yields.is_multiple_of(COOP_RECHECK) {
            if spend_coop_unit(cx).is_pending() {
                self.coop_unbounded = false;
            }
        } else {
            self.coop_unbounded = exhaust_coop(cx);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// tokio's coop budget ran out first (tokio has arranged the wake-up).
    #[cold]
    #[inline(never)]
    fn yield_coop_spent(&mut self) -> Poll<()> {
        tracing::debug!("fair yield: tokio coop budget spent");
        self.coop_unbounded = false;
        self.end_slice();
        Poll::Pending
    }

    /// Records an item of `bytes` bytes taken in this slice.
    #[inline]
    pub fn charge(&mut self, bytes: usize) {
        self.items += 1;
        self.bytes += bytes;
    }

    /// Ends the slice because the source had nothing ready (a natural yield).
    #[inline]
    pub fn reset(&mut self) {
        self.items = 0;
        self.bytes = 0;
    }

    /// Forced yields so far.
    pub fn yields(&self) -> u64 {
        self.yields
    }

    /// True when the slice is spent: the next [`poll_proceed`](Budget::poll_proceed) will yield.
    #[inline]
    pub fn spent(&self) -> bool {
        self.items >= self.fairness.max_items || self.bytes >= self.fairness.max_bytes
    }

    fn end_slice(&mut self) {
        self.reset();
        self.yields += 1;
    }
}

/// Forced yields between two full checks of an unbounded coop budget.
const COOP_RECHECK: u64 = 16;

/// tokio's coop budget per task poll (`Budget::initial()` in tokio, not
/// configurable): more units than this are never left to spend.
const TOKIO_COOP_BUDGET: usize = 128;

/// Spends the rest of the task's tokio coop budget, so the yield we are about
/// to ask for sticks: a caller that drops our `Pending` (a `now_or_never`, a
/// `select!` with a ready branch) and polls again finds every coop-aware
/// operation pending until the task has really been back to the scheduler,
/// which is when tokio refills the budget. Returns true when the budget did
/// not run out: outside a runtime (or inside `unconstrained`) it never does.
/// A whole budget is 128 units, so the 129th unit tells the two apart.
fn exhaust_coop(cx: &mut Context<'_>) -> bool {
    for _ in 0..=TOKIO_COOP_BUDGET {
        if spend_coop_unit(cx).is_pending() {
            return false;
        }
    }
    true
}

/// One unit of tokio's coop budget; `Pending` when it is spent (tokio has
/// then arranged the task's wake-up).
#[inline]
fn spend_coop_unit(cx: &mut Context<'_>) -> Poll<()> {
    match tokio::task::coop::poll_proceed(cx) {
        Poll::Ready(restore) => {
            restore.made_progress();
            Poll::Ready(())
        }
        Poll::Pending => Poll::Pending,
    }
}

/// A [`Source`] made fair: see [`SourceExt::fair`](crate::SourceExt::fair).
#[derive(Debug)]
pub struct Fair<S> {
    inner: S,
    budget: Budget,
}

impl<S> Fair<S> {
    pub(crate) fn new(inner: S, fairness: Fairness) -> Self {
        Fair {
            inner,
            budget: Budget::new(fairness),
        }
    }

    /// The wrapped source.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Forced yields so far.
    pub fn yields(&self) -> u64 {
        self.budget.yields()
    }
}

/// Takes up to `max` in all while the slice lasts and the inner source has
/// them ready.
impl<S> Source for Fair<S>
where
    S: Source,
    S::Item: Weighted,
{
    type Item = S::Item;

    #[inline]
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<S::Item>, FlowError>> {
        std::task::ready!(self.budget.poll_proceed(cx));
        match self.inner.poll_recv(cx) {
            Poll::Pending => {
                // A natural yield: the slice starts again.
                self.budget.reset();
                Poll::Pending
            }
            Poll::Ready(Ok(Some(item))) => {
                self.budget.charge(item.weight());
                Poll::Ready(Ok(Some(item)))
            }
            other => other,
        }
    }

    fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<S::Item>,
        max: usize,
    ) -> Poll<Result<usize, FlowError>> {
        if max == 0 {
            return Poll::Ready(Ok(0));
        }
        match std::task::ready!(self.poll_recv(cx)) {
            Ok(Some(item)) => buf.push(item),
            Ok(None) => return Poll::Ready(Ok(0)),
            Err(e) => return Poll::Ready(Err(e)),
        }
        let mut n = 1;
        while n < max && !self.budget.spent() {
            // The inner source is foreign: its Pending is a natural one, and
            // abandoning it loses nothing.
            match self.inner.poll_recv(cx) {
                Poll::Ready(Ok(Some(item))) => {
                    self.budget.charge(item.weight());
                    buf.push(item);
                    n += 1;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(None)) | Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(n))
    }

    /// The inner source's stats, with this wrapper's forced yields added.
    fn stats(&self) -> FlowStats {
        let mut stats = self.inner.stats();
        stats.forced_yields += self.budget.yields();
        stats
    }
}
