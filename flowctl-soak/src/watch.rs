//! How the soak watches a stage: one mechanism for every scenario, the
//! monitor and the report, built on core's `stats()`.
//!
//! A [`Watched`] is one stage as the soak knows it: a name, the bound its
//! `max_buffered` must respect (and why), and what was seen of it: the last
//! [`FlowStats`], the largest `max_buffered` of every instance (a stage may
//! be rebuilt: an SSH session, a replaced ZeroMQ socket) and the pauses of the
//! instances already gone. Its stats reach it in one of three ways, by
//! where the stage lives:
//! - the task that owns the stage calls [`Watched::record`] (or
//!   [`Watched::retire`] for an instance it is done with);
//! - [`Recorded`] wraps a source or sink and records after every call;
//! - [`Live`] also lets a sampler task read a source that fills in the
//!   background while nobody polls it (an SSH `Output`).
//!
//! [`Watched::probe`] registers the stage with the [`Monitor`] by name (its
//! samples, the plots), and [`judge`] checks every stage of a scenario
//! against its bound and gives the runner the one closest to it.

use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use flowctl_core::prelude::*;
use flowctl_core::{FlowError, FlowStats, SendError, Watermarks};

use crate::monitor::Monitor;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One watched stage: its bound and what was seen of it.
#[derive(Debug)]
pub(crate) struct Watched {
    pub(crate) name: String,
    pub(crate) bound: usize,
    pub(crate) why: &'static str,
    seen: Mutex<Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    last: FlowStats,
    max: usize,
    /// Pauses of the instances already retired.
    retired_pauses: u64,
}

impl Watched {
    /// A stage whose `max_buffered` must stay within `bound` (`why` says
    /// where the bound comes from, for the violation).
    pub(crate) fn new(name: impl Into<String>, bound: usize, why: &'static str) -> Arc<Watched> {
        Arc::new(Watched {
            name: name.into(),
            bound,
            why,
            seen: Mutex::new(Seen {
                last: FlowStats::empty(Watermarks::default()),
                max: 0,
                retired_pauses: 0,
            }),
        })
    }

    /// Samples this stage's last stats in the monitor, under its name.
    pub(crate) fn probe(self: &Arc<Self>, monitor: &Monitor) {
        let watched = self.clone();
        monitor.probe(self.name.clone(), move || watched.last());
    }

    /// The stats of an instance of the stage now.
    pub(crate) fn record(&self, stats: FlowStats) {
        let mut seen = lock(&self.seen);
        seen.last = stats;
        seen.max = seen.max.max(stats.max_buffered);
    }

    /// The final stats of an instance that is gone (a replaced socket): its
    /// pauses are kept in [`Watched::retired_pauses`].
    pub(crate) fn retire(&self, stats: FlowStats) {
        let mut seen = lock(&self.seen);
        seen.last = stats;
        seen.max = seen.max.max(stats.max_buffered);
        seen.retired_pauses += stats.pauses;
    }

    /// The last stats recorded.
    pub(crate) fn last(&self) -> FlowStats {
        lock(&self.seen).last
    }

    /// The largest `max_buffered` of every instance.
    pub(crate) fn max(&self) -> usize {
        lock(&self.seen).max
    }

    /// The pauses of every retired instance.
    pub(crate) fn retired_pauses(&self) -> u64 {
        lock(&self.seen).retired_pauses
    }
}

/// Checks every stage of `scenario` against its bound (a violation for
/// each above it) and returns the `(max_buffered, bound)` of the stage
/// closest to its bound: what the runner reports.
pub(crate) fn judge<'a>(
    scenario: &str,
    stages: impl IntoIterator<Item = &'a Watched>,
    violations: &mut Vec<String>,
) -> (usize, usize) {
    let (mut max_buffered, mut bound, mut ratio) = (0, 1, -1.0f64);
    for stage in stages {
        let max = stage.max();
        if max > stage.bound {
            violations.push(format!(
                "{scenario}: stage {} buffered {max} bytes, above its bound of {} ({})",
                stage.name, stage.bound, stage.why
            ));
        }
        let r = max as f64 / stage.bound as f64;
        if r > ratio {
            (max_buffered, bound, ratio) = (max, stage.bound, r);
        }
    }
    (max_buffered, bound)
}

/// A source or sink that records its stats after every call (enough for a
/// stage whose buffer only changes when it is driven).
#[derive(Debug)]
pub(crate) struct Recorded<T> {
    inner: T,
    stage: Arc<Watched>,
}

impl<T> Recorded<T> {
    pub(crate) fn new(inner: T, stage: &Arc<Watched>) -> Self {
        Recorded {
            inner,
            stage: stage.clone(),
        }
    }
}

impl<S: Source> Source for Recorded<S> {
    type Item = S::Item;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<S::Item>, FlowError>> {
        let r = std::task::ready!(self.inner.poll_recv(cx));
        self.stage.record(self.inner.stats());
        Poll::Ready(r)
    }

    fn stats(&self) -> FlowStats {
        self.inner.stats()
    }
}

impl<K: Sink> Sink for Recorded<K> {
    type Item = K::Item;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let r = self.inner.poll_ready(cx);
        self.stage.record(self.inner.stats());
        r
    }

    fn start_send(&mut self, item: K::Item) -> Result<(), SendError<K::Item>> {
        let r = self.inner.start_send(item);
        self.stage.record(self.inner.stats());
        r
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let r = self.inner.poll_flush(cx);
        self.stage.record(self.inner.stats());
        r
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let r = self.inner.poll_close(cx);
        self.stage.record(self.inner.stats());
        r
    }

    fn stats(&self) -> FlowStats {
        self.inner.stats()
    }
}

/// Samplers of [`Live`] stages, run by [`sample`] on the scenario's runtime;
/// each returns false once its stage is gone.
pub(crate) type Samplers = Arc<Mutex<Vec<Box<dyn Fn() -> bool + Send>>>>;

/// A source whose buffer fills in the background (the stdout [`Output`] is
/// fed by flowctl-ssh's reader task), sampled while nobody reads it, so a
/// stall shows in the plots. The sampler runs on the runtime's thread and
/// holds only a weak reference: the stage is always dropped there.
///
/// [`Output`]: flowctl_ssh::Output
pub(crate) struct Live<S: Source + 'static> {
    /// Locked by a poll (which never waits) or by the sampler's `try_lock`.
    inner: Arc<Mutex<S>>,
    stage: Arc<Watched>,
}

impl<S: Source + 'static> Live<S> {
    pub(crate) fn new(inner: S, stage: &Arc<Watched>, samplers: &Samplers) -> Self {
        let inner = Arc::new(Mutex::new(inner));
        let weak: Weak<Mutex<S>> = Arc::downgrade(&inner);
        let sampled = stage.clone();
        lock(samplers).push(Box::new(move || match weak.upgrade() {
            Some(stage) => {
                // Locked only while a poll runs: then it is being drained
                // and the last recorded figure is current enough.
                if let Ok(s) = stage.try_lock() {
                    sampled.record(s.stats());
                }
                true
            }
            None => false,
        }));
        Live {
            inner,
            stage: stage.clone(),
        }
    }
}

impl<S: Source + 'static> std::fmt::Debug for Live<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("stage", &self.stage.name)
            .finish()
    }
}

impl<S: Source + 'static> Drop for Live<S> {
    fn drop(&mut self) {
        if let Ok(s) = self.inner.try_lock() {
            self.stage.record(s.stats());
        }
    }
}

impl<S: Source + 'static> Source for Live<S> {
    type Item = S::Item;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<S::Item>, FlowError>> {
        let mut s = lock(&self.inner);
        let r = std::task::ready!(s.poll_recv(cx));
        self.stage.record(s.stats());
        Poll::Ready(r)
    }

    fn stats(&self) -> FlowStats {
        self.inner
            .try_lock()
            .map(|s| s.stats())
            .unwrap_or_else(|_| self.stage.last())
    }
}

/// Runs every sampler of `samplers` every 20 ms, until aborted.
pub(crate) async fn sample(samplers: Samplers) {
    let mut every = tokio::time::interval(Duration::from_millis(20));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        lock(&samplers).retain(|sample| sample());
    }
}

/// Drops every sampler (their stages are gone or about to be).
pub(crate) fn clear(samplers: &Samplers) {
    lock(samplers).clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(max_buffered: usize, pauses: u64) -> FlowStats {
        FlowStats {
            max_buffered,
            pauses,
            ..FlowStats::empty(Watermarks::default())
        }
    }

    #[test]
    fn a_watched_stage_keeps_the_largest_max_of_every_instance() {
        let w = Watched::new("s", 100, "high");
        w.record(stats(80, 1));
        w.retire(stats(90, 2)); // an instance that is gone
        w.record(stats(10, 0)); // its replacement
        assert_eq!((w.max(), w.last().max_buffered), (90, 10));
        assert_eq!(w.retired_pauses(), 2);
    }

    #[test]
    fn judge_names_each_stage_above_its_bound_and_reports_the_closest() {
        let a = Watched::new("a", 100, "high + one item");
        let b = Watched::new("b", 10, "high");
        a.record(stats(90, 0));
        b.record(stats(11, 0));
        let mut v = Vec::new();
        assert_eq!(judge("x", [&*a, &*b], &mut v), (11, 10));
        assert_eq!(
            v,
            ["x: stage b buffered 11 bytes, above its bound of 10 (high)"]
        );
    }
}
