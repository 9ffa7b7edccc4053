//! CPU-heavy work off the reactor, in input order, with bounded bytes in flight.
//!
//! Verifying a hash or decompressing on the task that reads the socket stalls
//! every other task on that worker thread. [`ordered`] runs the work on tokio's
//! blocking pool instead, keeps at most `concurrency` jobs running and
//! `max_inflight_bytes` of input in flight, and emits results in input order.
//!
//! # How it runs
//! The stage reads items from its source when `recv` is polled and queues them
//! as jobs, holding up to `32 * concurrency` items (running, queued, or finished
//! and not yet emitted) within `max_inflight_bytes`, so that a worker that
//! finishes a job takes the next one at once instead of waiting for the
//! consumer to come back. Before `recv` returns a result it takes what the
//! source has ready into the freed places, so jobs keep running while the
//! consumer is away. The workers are at most `concurrency` long-lived
//! tasks on tokio's blocking pool: each takes jobs from the queue until it is
//! empty, then returns its thread to the pool. A worker finds the queue empty
//! and counts itself out in one critical section, so a job queued at that
//! moment either is taken by it or finds one worker fewer and spawns another
//! (`tests/loom_offload.rs` models this hand-off). A finished job wakes the
//! consumer only when its result is the next one to emit.
//!
//! The `core.offload` bench measured the former design (one `spawn_blocking`
//! per item, started only when the consumer polled) at 1.17x inline hashing
//! on two cores: every job waited for two cross-thread wake-ups (worker to
//! consumer, consumer to a pool thread) before it could start. Why the
//! blocking pool and not rayon: it needs no second thread pool or dependency,
//! works on both runtime flavours, and `f` runs inside the runtime's context.

use std::collections::VecDeque;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::task::{Context, Poll, Waker};

use crate::gate::GateState;
use crate::sync::{self, Mutex, MutexGuard};
use crate::weighted::charge_of;
use crate::{FlowError, FlowStats, Source, Watermarks, Weighted};

/// Limits of an [`ordered`] stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offload {
    /// Jobs running at once, at most (at least 1). The stage holds at most 32
    /// times as many items: running, queued for a worker, or finished and not
    /// yet emitted.
    pub concurrency: usize,
    /// Input bytes in flight, at most (one item may overshoot it). Each item
    /// is charged [`charge_of`] it: its weight, and at least
    /// [`MIN_CHARGE`](crate::weighted::MIN_CHARGE).
    pub max_inflight_bytes: usize,
}

impl Default for Offload {
    /// As many jobs as the machine has cores (at least 2), 4 MiB in flight.
    fn default() -> Self {
        Offload {
            concurrency: std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            max_inflight_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Runs `f` on every item of `src` on the blocking pool, emitting results in
/// input order.
///
/// # Backpressure
/// An item's charge (its input weight, and at least
/// [`MIN_CHARGE`](crate::weighted::MIN_CHARGE), see [`charge_of`]) is charged
/// when the stage takes it from `src` and credited when its result is
/// emitted. The stage takes no new item while it holds `32 * concurrency`
/// items (running, queued for a worker, or finished and not yet emitted) or
/// more than `max_inflight_bytes`, so a slow consumer stops the stage from
/// taking more input; at most `concurrency` jobs run at once.
/// Queued jobs keep running while the consumer is away: a worker that finishes
/// one takes the next without waiting for `recv`.
///
/// # Fairness
/// A result returned without waiting consumes one unit of tokio's coop budget,
/// as awaiting a `JoinHandle` does. `src` keeps its own fairness: the items the
/// stage takes from it without waiting, before returning a result, spend the
/// same task's budget, so a slice spent there makes the next `recv` yield.
///
/// # Errors
/// A panic in `f` becomes [`FlowError::Panicked`] in that item's position;
/// later items follow. An error of `src` is returned after every result before
/// it has been emitted.
///
/// # Cancel safety
/// `recv` is cancel-safe. Dropping the stage drops `src`, the queued items and
/// the results not yet emitted at once; jobs already running finish on the
/// blocking pool and their results are dropped there.
///
/// # Panics
/// `recv` spawns the workers with `tokio::task::spawn_blocking`, so it panics
/// outside a tokio runtime.
///
/// ```
/// use flowctl_core::{compat::StreamSource, offload::{ordered, Offload}, Source};
/// use flowctl_core::prelude::*;
/// # #[tokio::main] async fn main() -> Result<(), flowctl_core::FlowError> {
/// let src = StreamSource::new(futures::stream::iter((0u64..100).collect::<Vec<_>>()));
/// let mut squares = ordered(src, Offload::default(), |x: u64| x * x);
/// for i in 0u64..100 {
///     assert_eq!(squares.recv().await?, Some(i * i));
/// }
/// assert_eq!(squares.recv().await?, None);
/// # Ok(()) }
/// ```
pub fn ordered<S, F, Out>(src: S, limits: Offload, f: F) -> Ordered<S, F, Out>
where
    S: Source,
    S::Item: Weighted,
    F: Fn(S::Item) -> Out + Send + Sync + 'static,
    Out: Send + 'static,
{
    let max = limits.max_inflight_bytes.max(1);
    let span = tracing::debug_span!(
        "flowctl.offload",
        concurrency = limits.concurrency,
        max_inflight_bytes = max
    );
    Ordered {
        src,
        f: std::sync::Arc::new(f),
        concurrency: limits.concurrency.max(1),
        shared: sync::Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                results: VecDeque::new(),
                head: 0,
                workers: 0,
                waker: None,
                closed: false,
                cancelled: false,
            }),
        }),
        weights: VecDeque::new(),
        next_seq: 0,
        gate: GateState::new(Watermarks::new(max, max).unwrap_or_default(), span),
        src_done: false,
        src_error: None,
    }
}

/// Items the stage holds per allowed job: `concurrency` run while the others
/// wait, queued or finished. A worker idles only once the queue is empty, so the
/// queue must outlast the consumer's wait for a CPU: while the workers keep
/// every core busy, the woken consumer may wait for a scheduler time slice
/// (milliseconds), i.e. for tens of 100 µs jobs. Per iteration of 64 frames of
/// the `core.offload` bench on 2 cores, workers ran dry and went back to the
/// pool about 5.5 times with 4 items per job held, 3.5 with 8, 1.5 with 16
/// and 0.1 with 32, where the bench's 4 MiB byte limit binds as well.
/// `max_inflight_bytes` bounds their bytes; this bounds the count of light
/// items.
const HELD_PER_JOB: usize = 32;

/// A job: `f` applied to one item, boxed so the shared state does not name the
/// source's item type.
type Job<Out> = Box<dyn FnOnce() -> Out + Send>;

/// A finished job: its result or its panic message.
type Done<Out> = Result<Out, String>;

/// What the stage and its workers share.
struct Shared<Out> {
    state: Mutex<State<Out>>,
}

struct State<Out> {
    /// Jobs waiting for a worker, with their sequence numbers, in input order.
    queue: VecDeque<(u64, Job<Out>)>,
    /// One slot per item held, from sequence number `head` on: `None` while
    /// queued or running.
    results: VecDeque<Option<Done<Out>>>,
    /// Sequence number of `results[0]`, the next result to emit.
    head: u64,
    /// Workers spawned and not yet returned.
    workers: usize,
    /// The consumer, waiting for the head result.
    waker: Option<Waker>,
    /// The stage was dropped: workers drop what they finish and return.
    closed: bool,
    /// A worker was dropped before it ran (the runtime is shutting down).
    cancelled: bool,
}

impl<Out> Shared<Out> {
    /// The state; a panic while it was locked left it consistent (no user code
    /// runs under the lock), so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, State<Out>> {
        sync::lock(&self.state)
    }
}

impl<Out> fmt::Debug for Shared<Out> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("Shared")
            .field("queued", &st.queue.len())
            .field("held", &st.results.len())
            .field("head", &st.head)
            .field("workers", &st.workers)
            .field("closed", &st.closed)
            .finish()
    }
}

/// The [`Source`] returned by [`ordered`].
#[derive(Debug)]
pub struct Ordered<S, F, Out> {
    src: S,
    f: std::sync::Arc<F>,
    concurrency: usize,
    shared: sync::Arc<Shared<Out>>,
    /// The charge of every item held, from the head on.
    weights: VecDeque<usize>,
    /// Sequence number of the next item taken from `src`.
    next_seq: u64,
    gate: GateState,
    src_done: bool,
    src_error: Option<FlowError>,
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Counts a worker out if it is dropped unrun (the pool is shutting down).
///
/// A worker that ran counts itself out in [`work`], in the same critical
/// section in which it finds no job left: were it counted out later, under a
/// second lock, a job queued in between would find `concurrency` workers
/// counted, spawn none, and wait forever for a worker that is gone.
struct WorkerGuard<Out> {
    shared: sync::Arc<Shared<Out>>,
    /// Still counted in `workers`.
    counted: bool,
}

impl<Out> Drop for WorkerGuard<Out> {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let waker = {
            let mut st = self.shared.lock();
            st.workers -= 1;
            // The pool dropped this worker unrun: tell the consumer, who
            // would otherwise wait for queued jobs no worker will take.
            st.cancelled = true;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A worker: runs queued jobs until the queue is empty or the stage is gone.
///
/// It decides to return and counts itself out of `workers` under one lock, so
/// [`Ordered::start`] either sees it counted and its job is taken by it, or
/// sees it gone and spawns another worker.
fn work<Out>(mut guard: WorkerGuard<Out>) {
    // Every way out counts the worker out under the lock in which it decided
    // to leave; `f` runs outside the lock, inside `catch_unwind`.
    let mut st = guard.shared.lock();
    loop {
        let next = if st.closed {
            None
        } else {
            st.queue.pop_front()
        };
        let Some((seq, job)) = next else {
            st.workers -= 1;
            guard.counted = false;
            return;
        };
        drop(st);
        let done = catch_unwind(AssertUnwindSafe(job)).map_err(|p| panic_message(&*p));
        st = guard.shared.lock();
        if st.closed {
            st.workers -= 1;
            guard.counted = false;
            drop(st);
            // Dropped outside the lock: a result's drop may be slow.
            drop(done);
            return;
        }
        // The slot exists: the stage pops a slot only once it is filled.
        let at = usize::try_from(seq - st.head).unwrap_or(usize::MAX);
        if let Some(slot) = st.results.get_mut(at) {
            *slot = Some(done);
        }
        if at == 0
            && let Some(w) = st.waker.take()
        {
            // Woken outside the lock, which is taken again for the next job.
            drop(st);
            w.wake();
            st = guard.shared.lock();
        }
    }
}

impl<S, F, Out> Ordered<S, F, Out>
where
    S: Source,
    S::Item: Weighted,
    F: Fn(S::Item) -> Out + Send + Sync + 'static,
    Out: Send + 'static,
{
    /// Items held: queued, running, or finished and not yet emitted.
    fn held(&self) -> usize {
        self.weights.len()
    }

    fn can_take(&self) -> bool {
        !self.src_done
            && self.src_error.is_none()
            && self.held() < HELD_PER_JOB.saturating_mul(self.concurrency)
            && (self.held() == 0 || self.gate.buffered() <= self.gate.stats().watermarks.high())
    }

    /// Queues `item`'s job and spawns a worker if fewer than `concurrency` run.
    fn start(&mut self, item: S::Item) {
        let charge = charge_of(&item);
        self.gate.charge(charge);
        self.weights.push_back(charge);
        let seq = self.next_seq;
        self.next_seq += 1;
        let f = self.f.clone();
        let job: Job<Out> = Box::new(move || f(item));
        let spawn = {
            let mut st = self.shared.lock();
            st.queue.push_back((seq, job));
            st.results.push_back(None);
            if st.workers < self.concurrency {
                st.workers += 1;
                true
            } else {
                false
            }
        };
        if spawn {
            let guard = WorkerGuard {
                shared: self.shared.clone(),
                counted: true,
            };
            spawn_worker(move || work(guard));
        }
    }

    fn took(&mut self, received: Result<Option<S::Item>, FlowError>) {
        match received {
            Ok(Some(item)) => self.start(item),
            Ok(None) => self.src_done = true,
            Err(e) => self.src_error = Some(e),
        }
    }

    /// Takes what `src` has ready without waiting, within the limits, so the
    /// workers have jobs queued while the consumer is away. A pending poll
    /// takes nothing and leaves the consumer's waker with `src` (at worst a
    /// spurious wake-up).
    fn refill(&mut self, cx: &mut Context<'_>) {
        while self.can_take() {
            match self.src.poll_recv(cx) {
                Poll::Ready(received) => self.took(received),
                Poll::Pending => break,
            }
        }
    }

    /// Credits the head's charge once its result is emitted.
    fn emitted(&mut self, done: Done<Out>) -> Result<Option<Out>, FlowError> {
        if let Some(charge) = self.weights.pop_front() {
            self.gate.credit(charge);
        }
        done.map(Some).map_err(FlowError::Panicked)
    }
}

/// Runs a worker on tokio's blocking pool. The handle is not needed: the
/// worker reports through the shared state.
#[cfg(not(flowctl_loom))]
fn spawn_worker(worker: impl FnOnce() + Send + 'static) {
    drop(tokio::task::spawn_blocking(worker));
}

/// Runs a worker on a loom thread, so the loom models explore every
/// interleaving of the workers and the stage.
#[cfg(flowctl_loom)]
fn spawn_worker(worker: impl FnOnce() + Send + 'static) {
    drop(loom::thread::spawn(worker));
}

/// The head result if it is there; otherwise registers `cx` for it.
fn poll_head<Out>(shared: &Shared<Out>, cx: &mut Context<'_>) -> Poll<Done<Out>> {
    let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
    let mut st = shared.lock();
    if let Some(done) = st.results.front_mut().and_then(Option::take) {
        st.results.pop_front();
        st.head += 1;
        drop(st);
        coop.made_progress();
        return Poll::Ready(done);
    }
    if st.cancelled && st.workers == 0 && st.queue.front().is_some_and(|(seq, _)| *seq == st.head) {
        // No worker will run the head job: the runtime is shutting down.
        let job = st.queue.pop_front();
        st.results.pop_front();
        st.head += 1;
        drop(st);
        drop(job);
        coop.made_progress();
        return Poll::Ready(Err("job was cancelled".to_owned()));
    }
    match &st.waker {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => st.waker = Some(cx.waker().clone()),
    }
    Poll::Pending
}

impl<S, F, Out> Drop for Ordered<S, F, Out> {
    fn drop(&mut self) {
        let (queue, results) = {
            let mut st = self.shared.lock();
            st.closed = true;
            st.waker = None;
            (
                std::mem::take(&mut st.queue),
                std::mem::take(&mut st.results),
            )
        };
        // Dropped outside the lock: an item's or a result's drop may be slow.
        drop(queue);
        drop(results);
    }
}

impl<S, F, Out> Source for Ordered<S, F, Out>
where
    S: Source,
    S::Item: Weighted,
    F: Fn(S::Item) -> Out + Send + Sync + 'static,
    Out: Send + 'static,
{
    type Item = Out;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Out>, FlowError>> {
        loop {
            if self.held() == 0 {
                if self.can_take() {
                    let received = std::task::ready!(self.src.poll_recv(cx));
                    self.took(received);
                    continue;
                }
                if let Some(e) = self.src_error.take() {
                    self.src_done = true;
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(None));
            }
            // The head first; both are cancel-safe: the head is taken only
            // in the poll that returns it, and `src` gives an item only when
            // it returns it.
            if let Poll::Ready(done) = poll_head(&self.shared, cx) {
                let out = self.emitted(done);
                self.refill(cx);
                return Poll::Ready(out);
            }
            if self.can_take()
                && let Poll::Ready(received) = self.src.poll_recv(cx)
            {
                self.took(received);
                continue;
            }
            return Poll::Pending;
        }
    }

    fn stats(&self) -> FlowStats {
        self.gate.stats()
    }
}
