//! Plain-data statistics of a stream.

use std::time::Duration;

use crate::Watermarks;

/// What a [`Sink`](crate::Sink) or [`Source`](crate::Source) holds and has moved.
///
/// Plain data (`Copy`): take a snapshot with `stats()` whenever you like; it
/// never blocks the stream for long (one short lock at most).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowStats {
    /// Bytes held in this stage's buffer right now, as charged against the
    /// watermarks: each item counts its [`charge_of`](crate::weighted::charge_of)
    /// (its weight, and at least [`MIN_CHARGE`](crate::weighted::MIN_CHARGE)).
    pub buffered: usize,
    /// The largest value `buffered` has reached. Bounded by `high + one item`
    /// (its charge) per producing handle.
    pub max_buffered: usize,
    /// The watermarks in force.
    pub watermarks: Watermarks,
    /// True while producers are paused (buffered went above `high` and has not
    /// yet fallen to `low`).
    pub paused: bool,
    /// How many times the high watermark was crossed.
    pub pauses: u64,
    /// Items accepted by this stage so far.
    pub items: u64,
    /// Bytes (by [`Weighted`](crate::Weighted)) accepted by this stage so far:
    /// payload bytes, without the per-item floor of `buffered`.
    pub bytes: u64,
    /// Invariant violations detected by this stage's accounting (a credit of
    /// more bytes than were buffered: a double credit). Always 0 unless the
    /// stage has a bug; debug builds panic instead of counting.
    pub violations: u64,
    /// Items this stage dropped: by its [`Overflow`](crate::Overflow) policy,
    /// or by its transport (ZeroMQ PUB at its high-water mark, a NATS server's
    /// slow-consumer drops). Always 0 under [`Overflow::Block`](crate::Overflow::Block)
    /// for a stage that does not drop by itself.
    pub dropped: u64,
    /// Slices this stage's source ended to let its task yield (its
    /// [`Fairness`](crate::Fairness) budget or tokio's coop budget was spent).
    pub forced_yields: u64,
    /// Time spent paused so far, including a pause in progress.
    pub paused_time: Duration,
}

impl FlowStats {
    /// Stats of a stage that buffers nothing and has moved nothing yet.
    pub fn empty(watermarks: Watermarks) -> Self {
        FlowStats {
            buffered: 0,
            max_buffered: 0,
            watermarks,
            paused: false,
            pauses: 0,
            items: 0,
            bytes: 0,
            violations: 0,
            dropped: 0,
            forced_yields: 0,
            paused_time: Duration::ZERO,
        }
    }
}

/// What [`pump`](crate::pump()) moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PumpStats {
    /// Items the sink accepted.
    pub items: u64,
    /// Bytes (by [`Weighted`](crate::Weighted)) the sink accepted.
    pub bytes: u64,
}
