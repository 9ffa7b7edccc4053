//! CPU-heavy work off the reactor, in input order, with bounded bytes in flight.
//!
//! Verifying a hash or decompressing on the task that reads the socket stalls
//! every other task on that worker thread. [`ordered`] runs the work on tokio's
//! blocking pool instead, keeps at most `concurrency` jobs and
//! `max_inflight_bytes` of input in flight, and emits results in input order.
//!
//! Why the blocking pool and not rayon: the `core.offload` bench measured
//! `spawn_blocking` within noise of a rayon pool for per-frame hashing of 16 KiB
//! frames, and it needs no second thread pool or dependency.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::task::JoinHandle;

use crate::gate::GateState;
use crate::{FlowError, FlowStats, Source, Watermarks, Weighted};

/// Limits of an [`ordered`] stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offload {
    /// Jobs running or finished but not yet emitted, at most (at least 1).
    pub concurrency: usize,
    /// Input bytes in flight, at most (one item may overshoot it).
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
/// An item's input weight is charged when its job starts and credited when its
/// result is emitted; no new job starts while `concurrency` jobs or more than
/// `max_inflight_bytes` are in flight, so a slow consumer stops the stage from
/// taking more input.
///
/// # Errors
/// A panic in `f` becomes [`FlowError::Panicked`] in that item's position;
/// later items follow. An error of `src` is returned after every result before
/// it has been emitted.
///
/// # Cancel safety
/// `recv` is cancel-safe. Dropping the stage stops feeding work; jobs already
/// running finish on the blocking pool and their results are dropped.
///
/// ```
/// use flowctl_core::{compat::StreamSource, offload::{ordered, Offload}, Source};
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
        f: Arc::new(f),
        concurrency: limits.concurrency.max(1),
        jobs: VecDeque::new(),
        gate: GateState::new(Watermarks::new(max, max).unwrap_or_default(), span),
        src_done: false,
        src_error: None,
    }
}

/// The [`Source`] returned by [`ordered`].
#[derive(Debug)]
pub struct Ordered<S, F, Out> {
    src: S,
    f: Arc<F>,
    concurrency: usize,
    jobs: VecDeque<(JoinHandle<Out>, usize)>,
    gate: GateState,
    src_done: bool,
    src_error: Option<FlowError>,
}

fn panic_message(err: tokio::task::JoinError) -> FlowError {
    if err.is_panic() {
        let payload = err.into_panic();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        FlowError::Panicked(msg)
    } else {
        FlowError::Panicked("job was cancelled".to_owned())
    }
}

impl<S, F, Out> Ordered<S, F, Out>
where
    S: Source,
    S::Item: Weighted,
    F: Fn(S::Item) -> Out + Send + Sync + 'static,
    Out: Send + 'static,
{
    fn can_start(&self) -> bool {
        !self.src_done
            && self.src_error.is_none()
            && self.jobs.len() < self.concurrency
            && (self.jobs.is_empty() || self.gate.buffered() <= self.gate.stats().watermarks.high())
    }

    fn start(&mut self, item: S::Item) {
        let weight = item.weight();
        self.gate.charge(weight);
        let f = self.f.clone();
        let job = tokio::task::spawn_blocking(move || f(item));
        self.jobs.push_back((job, weight));
    }

    fn finish(
        &mut self,
        joined: Result<Out, tokio::task::JoinError>,
    ) -> Result<Option<Out>, FlowError> {
        let (_, weight) = self
            .jobs
            .pop_front()
            .expect("finish is only called with a head job");
        drop(self.gate.credit(weight));
        joined.map(Some).map_err(panic_message)
    }
}

#[async_trait]
impl<S, F, Out> Source for Ordered<S, F, Out>
where
    S: Source,
    S::Item: Weighted,
    F: Fn(S::Item) -> Out + Send + Sync + 'static,
    Out: Send + 'static,
{
    type Item = Out;

    async fn recv(&mut self) -> Result<Option<Out>, FlowError> {
        loop {
            if self.can_start() {
                let Some((head, _)) = self.jobs.front_mut() else {
                    match self.src.recv().await {
                        Ok(Some(item)) => self.start(item),
                        Ok(None) => self.src_done = true,
                        Err(e) => self.src_error = Some(e),
                    }
                    continue;
                };
                // Both branches are cancel-safe: a JoinHandle polled by reference
                // and a cancel-safe recv.
                tokio::select! {
                    biased;
                    joined = head => return self.finish(joined),
                    received = self.src.recv() => match received {
                        Ok(Some(item)) => self.start(item),
                        Ok(None) => self.src_done = true,
                        Err(e) => self.src_error = Some(e),
                    },
                }
            } else if let Some((head, _)) = self.jobs.front_mut() {
                let joined = head.await;
                return self.finish(joined);
            } else if let Some(e) = self.src_error.take() {
                self.src_done = true;
                return Err(e);
            } else {
                return Ok(None);
            }
        }
    }

    fn stats(&self) -> FlowStats {
        self.gate.stats()
    }
}
