//! Named stages, overflow policies, writability events and metrics.
//!
//! - A [`Stage`] is a name (`"ssh.db1.0.stdout"`, `"zmq.tcp://127.0.0.1:5555.push"`)
//!   that a buffer carries into its `tracing` span and, with the `metrics`
//!   feature, into the `stage` label of every metric it exports. Pipes are
//!   named with [`PipeBuilder::name`](crate::PipeBuilder::name); the
//!   transports name theirs by default. Unnamed stages export no metrics.
//! - An [`Overflow`] policy says what a full buffer does with the next item:
//!   wait ([`Overflow::Block`], the default), drop, or fail.
//! - A [`Writability`] handle observes the paused/resumed edge of a sink, so
//!   an application can shed load upstream before it would block.
//!
//! # Metrics
//!
//! With the `metrics` feature, every named stage reports through the
//! [`metrics`](https://docs.rs/metrics) facade (no exporter: install one, such
//! as `metrics-exporter-prometheus`, in the application). Without the feature
//! the calls compile to nothing. The metrics, all labelled `stage`:
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `flowctl_buffered_bytes` | gauge | bytes held now (charges: at least 64 per item) |
//! | `flowctl_max_buffered_bytes` | gauge | the most ever held; at most `high` + one item per producer |
//! | `flowctl_high_watermark_bytes` | gauge | the pause threshold |
//! | `flowctl_low_watermark_bytes` | gauge | the resume threshold |
//! | `flowctl_paused` | gauge | 1 while producers are paused, else 0 |
//! | `flowctl_pauses_total` | counter | pause edges |
//! | `flowctl_paused_seconds_total` | counter | whole seconds spent paused, added on each resume |
//! | `flowctl_items_total` | counter | items that entered the buffer |
//! | `flowctl_bytes_total` | counter | their bytes (weights) |
//! | `flowctl_dropped_total{reason}` | counter | items dropped: `drop_newest`, `drop_oldest` (an [`Overflow`] policy) or a transport's own (`hwm`, `slow_consumer`) |
//! | `flowctl_forced_yields_total` | counter | slices a source ended to let its task yield |
//! | `flowctl_live_resources{kind}` | gauge | live resources of [`Ledger::global`](crate::lifecycle::Ledger::global) by kind (no `stage` label) |
//!
//! Counts and gauges are written in batches (every 32 charges and credits,
//! at every pause and resume edge, when the stage drains to empty and when
//! it is dropped), so a scrape of a busy stage lags it by fewer than 32
//! operations; drops and forced yields are written as they happen;
//! `stats()` is always exact, and calling it writes what is pending, so a
//! scrape right after it agrees with it.
//!
//! [`describe_metrics`] registers their help texts and units with the
//! installed recorder. `docs/src/reference/metrics.md` lists the transports'
//! metrics too.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::FlowError;

/// What a full buffer does with the next item.
///
/// "Full" is measured in bytes against the same [`Watermarks`](crate::Watermarks):
/// under [`Block`](Overflow::Block), a producer waits while more than `high`
/// is buffered (and may overshoot `high` by the one item it sends after
/// `ready`); under the other policies a producer never waits, and an item is
/// admitted when it fits (`buffered + charge <= high`) or the buffer is empty,
/// so the buffer never holds more than `max(high, one item)`.
///
/// Every drop is counted in [`FlowStats::dropped`](crate::FlowStats::dropped)
/// and in the `flowctl_dropped_total` metric, and reported by a `tracing` warn
/// at most once per second per stage (never one line per item).
///
/// ```
/// use bytes::Bytes;
/// use flowctl_core::{Overflow, PipeBuilder};
/// use flowctl_core::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flowctl_core::FlowError> {
/// let (mut tx, mut rx) = PipeBuilder::new(Watermarks::new(0, 200)?)
///     .overflow(Overflow::DropOldest)
///     .build::<Bytes>();
/// for i in 0..10u8 {
///     tx.send(Bytes::from(vec![i; 100])).await?; // never waits
/// }
/// assert_eq!(rx.stats().dropped, 8); // room for two: the oldest eight went
/// assert_eq!(rx.recv().await?.unwrap()[0], 8);
/// assert_eq!(rx.recv().await?.unwrap()[0], 9);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Overflow {
    /// Producers wait while the buffer is above `high` (backpressure).
    #[default]
    Block,
    /// The item that does not fit is dropped; what is buffered is kept.
    /// The send succeeds (the item is counted as dropped).
    DropNewest,
    /// The oldest buffered items are dropped until the new one fits.
    DropOldest,
    /// The send fails with [`FlowError::Overflow`] and gives the item back
    /// (inside the [`SendError`](crate::SendError)); the sink stays usable.
    Fail,
}

impl Overflow {
    /// True for [`Overflow::Block`]: producers wait.
    pub fn blocks(self) -> bool {
        self == Overflow::Block
    }
}

/// Why items were dropped: the `reason` label of `flowctl_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// [`Overflow::DropNewest`] dropped an item that did not fit.
    DropNewest,
    /// [`Overflow::DropOldest`] dropped buffered items to make room.
    DropOldest,
    /// A transport dropped at its own high-water mark (ZeroMQ PUB).
    Hwm,
    /// A server dropped messages for a slow consumer (NATS core subscriptions).
    SlowConsumer,
}

impl DropReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::DropNewest => "drop_newest",
            DropReason::DropOldest => "drop_oldest",
            DropReason::Hwm => "hwm",
            DropReason::SlowConsumer => "slow_consumer",
        }
    }

    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    const ALL: [DropReason; 4] = [
        DropReason::DropNewest,
        DropReason::DropOldest,
        DropReason::Hwm,
        DropReason::SlowConsumer,
    ];

    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stage's name, and (with the `metrics` feature) its metric handles.
///
/// Cheap to clone. Two stages with the same name share their metrics (the
/// gauges then read whichever stage wrote last): give each live stage its own
/// name.
///
/// ```
/// use flowctl_core::stage::Stage;
/// let stage = Stage::new("ssh.db1.0.stdout");
/// assert_eq!(stage.name(), "ssh.db1.0.stdout");
/// // A transport's own counter, labelled stage="ssh.db1.0.stdout"
/// // (a no-op without the `metrics` feature).
/// stage.counter("flowctl_ssh_window_waits_total").increment(1);
/// ```
#[derive(Clone)]
pub struct Stage {
    inner: Arc<StageInner>,
}

struct StageInner {
    name: Arc<str>,
    #[cfg(feature = "metrics")]
    handles: Handles,
}

impl fmt::Debug for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Stage").field(&self.name()).finish()
    }
}

impl Stage {
    /// A stage called `name`; with the `metrics` feature, registers its
    /// metrics with the recorder installed now (install the recorder first).
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        let name: Arc<str> = name.into();
        Stage {
            inner: Arc::new(StageInner {
                #[cfg(feature = "metrics")]
                handles: Handles::new(&name),
                name,
            }),
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A `tracing` debug span named `flowctl.stage` with a `stage` field.
    pub fn span(&self) -> tracing::Span {
        tracing::debug_span!("flowctl.stage", stage = %self.inner.name)
    }

    /// A counter of this stage, labelled `stage = name` (for a transport's
    /// own metrics). A no-op without the `metrics` feature.
    pub fn counter(&self, metric: &'static str) -> StageCounter {
        #[cfg(feature = "metrics")]
        {
            StageCounter(metrics::counter!(metric, "stage" => self.name().to_owned()))
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = metric;
            StageCounter(())
        }
    }

    /// A gauge of this stage, labelled `stage = name`. A no-op without the
    /// `metrics` feature.
    pub fn gauge(&self, metric: &'static str) -> StageGauge {
        #[cfg(feature = "metrics")]
        {
            StageGauge(metrics::gauge!(metric, "stage" => self.name().to_owned()))
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = metric;
            StageGauge(())
        }
    }

    #[cfg(feature = "metrics")]
    fn handles(&self) -> &Handles {
        &self.inner.handles
    }
}

/// A counter of one stage; see [`Stage::counter`].
#[derive(Clone)]
pub struct StageCounter(
    #[cfg(feature = "metrics")] metrics::Counter,
    #[cfg(not(feature = "metrics"))] (),
);

impl fmt::Debug for StageCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StageCounter")
    }
}

impl StageCounter {
    /// Adds `n`.
    #[inline]
    pub fn increment(&self, n: u64) {
        #[cfg(feature = "metrics")]
        self.0.increment(n);
        #[cfg(not(feature = "metrics"))]
        let _ = n;
    }

    /// Sets the counter to `total` if that is higher (for a count kept elsewhere).
    #[inline]
    pub fn absolute(&self, total: u64) {
        #[cfg(feature = "metrics")]
        self.0.absolute(total);
        #[cfg(not(feature = "metrics"))]
        let _ = total;
    }
}

/// A gauge of one stage; see [`Stage::gauge`].
#[derive(Clone)]
pub struct StageGauge(
    #[cfg(feature = "metrics")] metrics::Gauge,
    #[cfg(not(feature = "metrics"))] (),
);

impl fmt::Debug for StageGauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StageGauge")
    }
}

impl StageGauge {
    /// Sets the value.
    #[inline]
    pub fn set(&self, value: f64) {
        #[cfg(feature = "metrics")]
        self.0.set(value);
        #[cfg(not(feature = "metrics"))]
        let _ = value;
    }
}

/// The core metrics of one stage, registered once.
#[cfg(feature = "metrics")]
struct Handles {
    buffered: metrics::Gauge,
    max_buffered: metrics::Gauge,
    high: metrics::Gauge,
    low: metrics::Gauge,
    paused: metrics::Gauge,
    pauses: metrics::Counter,
    paused_seconds: metrics::Counter,
    items: metrics::Counter,
    bytes: metrics::Counter,
    dropped: [metrics::Counter; DropReason::ALL.len()],
    forced_yields: metrics::Counter,
}

#[cfg(feature = "metrics")]
impl Handles {
    fn new(name: &str) -> Self {
        let stage = || ("stage", name.to_owned());
        macro_rules! labelled {
            ($kind:ident, $metric:literal) => {{
                let (k, v) = stage();
                metrics::$kind!($metric, k => v)
            }};
        }
        Handles {
            buffered: labelled!(gauge, "flowctl_buffered_bytes"),
            max_buffered: labelled!(gauge, "flowctl_max_buffered_bytes"),
            high: labelled!(gauge, "flowctl_high_watermark_bytes"),
            low: labelled!(gauge, "flowctl_low_watermark_bytes"),
            paused: labelled!(gauge, "flowctl_paused"),
            pauses: labelled!(counter, "flowctl_pauses_total"),
            paused_seconds: labelled!(counter, "flowctl_paused_seconds_total"),
            items: labelled!(counter, "flowctl_items_total"),
            bytes: labelled!(counter, "flowctl_bytes_total"),
            dropped: DropReason::ALL.map(|reason| {
                metrics::counter!(
                    "flowctl_dropped_total",
                    "stage" => name.to_owned(),
                    "reason" => reason.as_str()
                )
            }),
            forced_yields: labelled!(counter, "flowctl_forced_yields_total"),
        }
    }
}

/// Registers `help` as the help text of the counter `metric` with the
/// installed recorder; for a transport's own metrics (each transport crate's
/// `describe_metrics` calls it). A no-op without the `metrics` feature.
pub fn describe_counter(metric: &'static str, help: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::describe_counter!(metric, help);
    #[cfg(not(feature = "metrics"))]
    let _ = (metric, help);
}

/// [`describe_counter`] for a gauge.
pub fn describe_gauge(metric: &'static str, help: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::describe_gauge!(metric, help);
    #[cfg(not(feature = "metrics"))]
    let _ = (metric, help);
}

/// Registers the help text and unit of every core metric with the installed
/// recorder (an exporter prints them as `# HELP` lines). Call once, after
/// installing the recorder. A no-op without the `metrics` feature.
pub fn describe_metrics() {
    #[cfg(feature = "metrics")]
    {
        use metrics::{Unit, describe_counter, describe_gauge};
        describe_gauge!(
            "flowctl_buffered_bytes",
            Unit::Bytes,
            "Bytes held by the stage now, as charged against its watermarks."
        );
        describe_gauge!(
            "flowctl_max_buffered_bytes",
            Unit::Bytes,
            "The most bytes the stage has held; bounded by high + one item per producer."
        );
        describe_gauge!(
            "flowctl_high_watermark_bytes",
            Unit::Bytes,
            "The stage's pause threshold."
        );
        describe_gauge!(
            "flowctl_low_watermark_bytes",
            Unit::Bytes,
            "The stage's resume threshold."
        );
        describe_gauge!(
            "flowctl_paused",
            "1 while the stage's producers are paused (above high, not yet back at low)."
        );
        describe_counter!(
            "flowctl_pauses_total",
            "Times the stage went above its high watermark."
        );
        describe_counter!(
            "flowctl_paused_seconds_total",
            Unit::Seconds,
            "Whole seconds the stage spent paused, added when it resumes."
        );
        describe_counter!(
            "flowctl_items_total",
            "Items that entered the stage's buffer."
        );
        describe_counter!(
            "flowctl_bytes_total",
            Unit::Bytes,
            "Bytes (by weight) that entered the stage's buffer."
        );
        describe_counter!(
            "flowctl_dropped_total",
            "Items the stage dropped, by reason (drop_newest, drop_oldest, hwm, slow_consumer)."
        );
        describe_counter!(
            "flowctl_forced_yields_total",
            "Slices the stage's source ended to let its task yield to the scheduler."
        );
        describe_gauge!(
            "flowctl_live_resources",
            "Live resources (sessions, subscriptions, tasks) of flowctl's global ledger, by kind."
        );
    }
}

/// A stage's paused/resumed edges, observed from anywhere: Netty's
/// `channelWritabilityChanged`, as a `watch`-style handle.
///
/// Get one from any sink with watermarks of its own, with
/// [`Sink::writability`](crate::Sink::writability) (a pipe, a transport's
/// sink), or from [`Gate::writability`](crate::gate::Gate::writability). [`changed`](Writability::changed) waits for the next edge; edges
/// that happen while nobody waits are coalesced (the handle reads the latest
/// state, and [`pauses`](Writability::pauses) says how many pauses there were).
///
/// ```
/// use bytes::Bytes;
/// use flowctl_core::prelude::*;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), flowctl_core::FlowError> {
/// let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::new(0, 100)?);
/// let mut writable = tx.writability().unwrap();
/// assert!(!writable.is_paused());
/// tx.send(Bytes::from(vec![0; 101])).await?; // above high: paused
/// assert!(writable.changed().await?);     // the pause edge
/// rx.recv().await?;                         // drained: resumed
/// assert!(!writable.changed().await?);
/// assert_eq!(writable.pauses(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Writability {
    rx: watch::Receiver<Edge>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Edge {
    paused: bool,
    pauses: u64,
}

impl Writability {
    /// True while the stage is paused (a send would wait, or drop under an
    /// [`Overflow`] policy).
    pub fn is_paused(&self) -> bool {
        self.rx.borrow().paused
    }

    /// Pause edges so far.
    pub fn pauses(&self) -> u64 {
        self.rx.borrow().pauses
    }

    /// Waits for the next edge, and returns whether the stage is paused after
    /// it. Fails with [`FlowError::Closed`] once the stage is gone.
    ///
    /// # Cancel safety
    /// Cancel-safe: an edge that happens while no `changed` future is polled
    /// is seen by the next call.
    pub async fn changed(&mut self) -> Result<bool, FlowError> {
        self.rx.changed().await.map_err(|_| FlowError::Closed)?;
        Ok(self.rx.borrow_and_update().paused)
    }
}

/// What a [`GateState`](crate::gate::GateState) keeps about its stage beyond
/// the counts: name, metrics, timers, the writability channel, drop reports.
pub(crate) struct StageState {
    stage: Option<Stage>,
    pub(crate) overflow: Overflow,
    paused_since: Option<Instant>,
    paused_time: Duration,
    edges: watch::Sender<Edge>,
    last_drop_warn: Option<Instant>,
    unreported_drops: u64,
    #[cfg(feature = "metrics")]
    pending: Pending,
}

/// Metric updates not yet written: a charge and a credit cost two local
/// additions, and the handles (atomics that the producer's and the
/// consumer's threads would otherwise both write for every item) are
/// written every [`FLUSH_EVERY`] operations, on every pause and resume edge,
/// when the stage drains to empty, and when it is dropped. So a scrape of a
/// busy stage lags it by at most `FLUSH_EVERY - 1` operations, and a stage
/// that is paused, or empty, or gone reads exactly.
///
/// Atomics, so that `stats(&self)` can write them too; every other access
/// holds `&mut`, so it uses plain loads and stores (no read-modify-write on
/// the hot path), and only the flush from `&self` swaps.
#[cfg(feature = "metrics")]
#[derive(Debug, Default)]
struct Pending {
    items: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    ops: u32,
}

/// Operations (charges and credits) between two writes of a stage's metrics.
#[cfg(feature = "metrics")]
const FLUSH_EVERY: u32 = 32;

impl fmt::Debug for StageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StageState")
            .field("stage", &self.stage)
            .field("overflow", &self.overflow)
            .field("paused_time", &self.paused_time)
            .finish_non_exhaustive()
    }
}

impl StageState {
    pub(crate) fn new() -> Self {
        StageState {
            stage: None,
            overflow: Overflow::Block,
            paused_since: None,
            paused_time: Duration::ZERO,
            edges: watch::Sender::new(Edge::default()),
            last_drop_warn: None,
            unreported_drops: 0,
            #[cfg(feature = "metrics")]
            pending: Pending::default(),
        }
    }

    pub(crate) fn set_stage(&mut self, stage: Stage, wm: crate::Watermarks) {
        #[cfg(feature = "metrics")]
        {
            let h = stage.handles();
            h.high.set(wm.high() as f64);
            h.low.set(wm.low() as f64);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = wm;
        self.stage = Some(stage);
    }

    pub(crate) fn stage(&self) -> Option<&Stage> {
        self.stage.as_ref()
    }

    pub(crate) fn writability(&self) -> Writability {
        Writability {
            rx: self.edges.subscribe(),
        }
    }

    /// Total time paused, including the pause in progress.
    pub(crate) fn paused_time(&self) -> Duration {
        self.paused_time + self.paused_since.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// An item of `weight` bytes was charged: `buffered` now, `max` the
    /// largest so far. The metrics are brought up to date every
    /// [`FLUSH_EVERY`] operations and on every edge (see [`Pending`]).
    #[inline]
    pub(crate) fn on_charge(&mut self, buffered: usize, max: usize, weight: usize) {
        #[cfg(feature = "metrics")]
        if self.stage.is_some() {
            let p = &mut self.pending;
            *p.items.get_mut() += 1;
            *p.bytes.get_mut() += weight as u64;
            p.ops += 1;
            if p.ops >= FLUSH_EVERY {
                self.flush(buffered, max);
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (buffered, max, weight);
    }

    /// Bytes were credited: `buffered` now. A stage that drains to empty
    /// is brought up to date at once (an idle stage must read 0).
    #[inline]
    pub(crate) fn on_credit(&mut self, buffered: usize, max: usize) {
        #[cfg(feature = "metrics")]
        if self.stage.is_some() {
            self.pending.ops += 1;
            if buffered == 0 || self.pending.ops >= FLUSH_EVERY {
                self.flush(buffered, max);
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (buffered, max);
    }

    #[cfg(feature = "metrics")]
    #[cold]
    fn flush(&mut self, buffered: usize, max: usize) {
        self.pending.ops = 0;
        self.write(buffered, max);
    }

    /// Writes what is pending to the metrics (the counters' increments and
    /// the gauges' current values); callable from `stats(&self)`.
    #[cfg(feature = "metrics")]
    fn write(&self, buffered: usize, max: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(stage) = &self.stage {
            let h = stage.handles();
            let items = self.pending.items.swap(0, Relaxed);
            let bytes = self.pending.bytes.swap(0, Relaxed);
            if items > 0 {
                h.items.increment(items);
                h.bytes.increment(bytes);
            }
            h.buffered.set(buffered as f64);
            h.max_buffered.set(max as f64);
        }
    }

    /// Writes the pending metrics from a shared reference (`stats()`): a
    /// scrape right after `stats()` reads what it returned.
    pub(crate) fn sync_shared(&self, buffered: usize, max: usize) {
        #[cfg(feature = "metrics")]
        self.write(buffered, max);
        #[cfg(not(feature = "metrics"))]
        let _ = (buffered, max);
    }

    /// Brings the metrics up to date (at the pause and resume edges, and
    /// when the stage is dropped).
    pub(crate) fn sync(&mut self, buffered: usize, max: usize) {
        #[cfg(feature = "metrics")]
        if self.stage.is_some() {
            self.flush(buffered, max);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (buffered, max);
    }

    pub(crate) fn on_pause(&mut self, pauses: u64) {
        self.paused_since = Some(Instant::now());
        self.edges.send_replace(Edge {
            paused: true,
            pauses,
        });
        #[cfg(feature = "metrics")]
        if let Some(stage) = &self.stage {
            let h = stage.handles();
            h.paused.set(1.0);
            h.pauses.increment(1);
        }
    }

    pub(crate) fn on_resume(&mut self, pauses: u64) {
        if let Some(since) = self.paused_since.take() {
            self.paused_time += since.elapsed();
        }
        self.edges.send_replace(Edge {
            paused: false,
            pauses,
        });
        #[cfg(feature = "metrics")]
        if let Some(stage) = &self.stage {
            let h = stage.handles();
            h.paused.set(0.0);
            h.paused_seconds.absolute(self.paused_time.as_secs());
        }
    }

    pub(crate) fn on_forced_yield(&self) {
        #[cfg(feature = "metrics")]
        if let Some(stage) = &self.stage {
            stage.handles().forced_yields.increment(1);
        }
    }

    /// Counts `items` dropped for `reason` in the metrics and warns at most
    /// once per second.
    pub(crate) fn on_drop(&mut self, reason: DropReason, items: u64, total: u64) {
        #[cfg(feature = "metrics")]
        if let Some(stage) = &self.stage {
            stage.handles().dropped[reason.index()].increment(items);
        }
        self.unreported_drops += items;
        let now = Instant::now();
        if self
            .last_drop_warn
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            let stage = self.stage.as_ref().map_or("", |s| s.name());
            tracing::warn!(
                stage,
                %reason,
                dropped = self.unreported_drops,
                total,
                "stage dropped items (reported at most once per second)"
            );
            self.last_drop_warn = Some(now);
            self.unreported_drops = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_index_their_own_counter() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        assert_eq!(DropReason::Hwm.to_string(), "hwm");
    }
}
