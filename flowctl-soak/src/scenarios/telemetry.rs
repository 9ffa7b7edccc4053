//! `telemetry`: a stream where fresh data matters more than all of it. A
//! producer sends at full speed into a pipe under [`Overflow::DropOldest`]
//! (`soak.telemetry.drop_oldest`) whose consumer stalls for seconds on a
//! seeded schedule, then drains. Beside it, the same load into a blocking
//! pipe (`soak.telemetry.block`, [`Overflow::Block`]) with its own stalls:
//! the stalled stage whose bound the Prometheus test checks from outside.
//!
//! Checks, besides the runner's:
//! - every message of the dropping stage is accounted for, exactly:
//!   sent == received + dropped + left buffered at the end;
//! - what it delivers keeps its order (sequence numbers only increase) and
//!   its bytes (checksums);
//! - its `max_buffered` <= max(high, largest item), and its producer never
//!   waited (no pause, no paused time: every item is smaller than high);
//! - it dropped something (its consumer did fall behind);
//! - the blocking stage loses, duplicates and reorders nothing and stays
//!   within high + one item (one producer).
//!
//! What the dropping stage dropped is reported as `dropped_at_most_once`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::weighted::charge_of;
use flowctl_core::{FlowError, FlowStats, Overflow, PipeBuilder, PipeSink, PipeSource, Watermarks};
use tokio::time::Instant;

use super::{Ctx, Faults, Outcome};
use crate::check::{Checker, MIN_MESSAGE, decode, encode};
use crate::opts::Inject;
use crate::watch::{Watched, judge};

/// The stage under [`Overflow::DropOldest`].
pub(crate) const DROP_STAGE: &str = "soak.telemetry.drop_oldest";
/// The stage under [`Overflow::Block`] that stalls.
pub(crate) const BLOCK_STAGE: &str = "soak.telemetry.block";

const LOW: usize = 16 * 1024;
const HIGH: usize = 64 * 1024;
/// Every item is smaller than `HIGH`: a DropOldest stage never pauses then.
const MAX_MESSAGE: usize = 2048;
/// Producer ids in the messages.
const DROP_PRODUCER: u32 = 0;
const BLOCK_PRODUCER: u32 = 1;
/// Latencies kept per stage (the first ones; enough for a p99).
const LATENCY_SAMPLE: usize = 65_536;

/// A consumer's seeded schedule: stalls of 1-3 s, then drains of 0.3-1.5 s,
/// starting with a stall (so even a short run falls behind).
struct Schedule {
    rng: fastrand::Rng,
    stalled: bool,
}

impl Schedule {
    fn new(seed: u64) -> Self {
        Schedule {
            rng: fastrand::Rng::with_seed(seed),
            stalled: false,
        }
    }

    /// The next phase: whether it stalls, and how long it lasts.
    fn next(&mut self) -> (bool, Duration) {
        self.stalled = !self.stalled;
        let ms = if self.stalled {
            self.rng.u64(1000..3000)
        } else {
            self.rng.u64(300..1500)
        };
        (self.stalled, Duration::from_millis(ms))
    }
}

/// Sends sequence-numbered messages of seeded sizes until `deadline`;
/// returns how many were accepted.
async fn produce(
    mut tx: PipeSink<Bytes>,
    producer: u32,
    seed: u64,
    start: Instant,
    deadline: Instant,
) -> Result<u64, FlowError> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut seq = 0u64;
    while Instant::now() < deadline {
        let len = rng.usize(MIN_MESSAGE..=MAX_MESSAGE);
        let msg = encode(producer, seq, start.elapsed().as_micros() as u64, len);
        tx.send(msg).await?;
        seq += 1;
    }
    Ok(seq)
}

/// What a consumer saw.
#[derive(Default)]
struct Seen {
    received: u64,
    bytes: u64,
    /// Received after the deadline, once the producer had stopped: what was
    /// left buffered at the end (the dropping stage only).
    left: u64,
    latencies_us: Vec<u64>,
    stalls: u64,
    failure: Option<String>,
}

/// The dropping stage's order check: sequence numbers only increase.
#[derive(Default)]
struct Order {
    last: Option<u64>,
    reordered: u64,
    corrupted: u64,
}

impl Order {
    fn observe(&mut self, msg: &[u8], now_us: u64, seen: &mut Seen) {
        let Some(d) = decode(msg) else {
            self.corrupted += 1;
            return;
        };
        if self.last.is_some_and(|last| d.seq <= last) || d.producer != DROP_PRODUCER {
            self.reordered += 1;
        }
        self.last = Some(d.seq);
        if seen.latencies_us.len() < LATENCY_SAMPLE {
            seen.latencies_us.push(now_us.saturating_sub(d.sent_us));
        }
    }
}

/// Receives on `schedule` until `deadline`, calling `each` per message.
async fn consume_until(
    rx: &mut PipeSource<Bytes>,
    schedule: &mut Schedule,
    deadline: Instant,
    seen: &mut Seen,
    mut each: impl FnMut(&Bytes, &mut Seen),
) {
    let mut batch = Vec::with_capacity(64);
    while Instant::now() < deadline {
        let (stalled, len) = schedule.next();
        let phase_end = (Instant::now() + len).min(deadline);
        if stalled {
            seen.stalls += 1;
            tokio::time::sleep_until(phase_end).await;
            continue;
        }
        while Instant::now() < phase_end {
            batch.clear();
            // A timeout drops the pending receive: the pipe hands out nothing
            // until `poll_recv_many` returns Ready, so nothing is lost there.
            match tokio::time::timeout_at(phase_end, rx.recv_many(&mut batch, 64)).await {
                Err(_) => break,
                Ok(Ok(0)) => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    seen.failure = Some(format!("receive failed: {e}"));
                    return;
                }
            }
            for msg in &batch {
                seen.received += 1;
                seen.bytes += msg.len() as u64;
                each(msg, seen);
            }
        }
    }
}

/// Receives everything left until the pipe ends (its producer is gone).
async fn drain(
    rx: &mut PipeSource<Bytes>,
    seen: &mut Seen,
    mut each: impl FnMut(&Bytes, &mut Seen),
) {
    loop {
        match rx.recv().await {
            Ok(Some(msg)) => each(&msg, seen),
            Ok(None) => return,
            Err(e) => {
                seen.failure = Some(format!("receive failed: {e}"));
                return;
            }
        }
    }
}

/// A closed handle of `tx` for the monitor: it still reads the shared stats.
fn probe(ctx: &Ctx<'_>, name: &'static str, tx: &PipeSink<Bytes>) {
    let mut probe = tx.clone();
    probe.close_now();
    ctx.monitor.probe(name, move || probe.stats());
}

pub(crate) async fn run(ctx: &Ctx<'_>) -> Outcome {
    let wm = Watermarks::new(LOW, HIGH).expect("valid watermarks");
    let (dtx, mut drx) = PipeBuilder::new(wm)
        .name(DROP_STAGE)
        .overflow(Overflow::DropOldest)
        .build::<Bytes>();
    let (btx, mut brx) = PipeBuilder::new(wm).name(BLOCK_STAGE).build::<Bytes>();
    probe(ctx, DROP_STAGE, &dtx);
    probe(ctx, BLOCK_STAGE, &btx);
    let (start, deadline) = (ctx.start, ctx.deadline);
    let dprod = tokio::spawn(produce(dtx, DROP_PRODUCER, ctx.seed, start, deadline));
    let bprod = tokio::spawn(produce(
        btx,
        BLOCK_PRODUCER,
        ctx.seed ^ 0xb10c,
        start,
        deadline,
    ));

    let faults = Faults::default();
    let mut violations = Vec::new();
    let inject = ctx.inject;

    // Both consumers on this task, one after the other per phase would couple
    // their schedules: run them concurrently.
    let drop_side = async {
        let mut seen = Seen::default();
        let mut order = Order::default();
        let mut schedule = Schedule::new(ctx.seed);
        let (mut n, mut vanished) = (0u64, 0u64);
        let mut each = |msg: &Bytes, seen: &mut Seen| {
            n += 1;
            if inject == Some(Inject::DropOne) && n == 1000 {
                vanished += 1; // the deliberate bug: message 1000 vanishes
                return;
            }
            order.observe(msg, ctx.now_us(), seen);
            ctx.progress.messages.fetch_add(1, Relaxed);
        };
        consume_until(&mut drx, &mut schedule, deadline, &mut seen, &mut each).await;
        let mut left = Seen::default();
        drain(&mut drx, &mut left, |msg, s| {
            s.left += 1;
            each(msg, s);
        })
        .await;
        seen.left = left.left;
        seen.latencies_us.extend(left.latencies_us);
        seen.failure = seen.failure.or(left.failure);
        (seen, order, vanished)
    };
    let block_side = async {
        let mut seen = Seen::default();
        let mut checker = Checker::default();
        let mut schedule = Schedule::new(ctx.seed ^ 0x57a11);
        let mut each = |msg: &Bytes, _: &mut Seen| {
            checker.observe(msg, ctx.now_us());
            ctx.progress.messages.fetch_add(1, Relaxed);
        };
        consume_until(&mut brx, &mut schedule, deadline, &mut seen, &mut each).await;
        // The producer may wait on this pipe past the deadline: let it finish.
        drain(&mut brx, &mut seen, |msg, s| {
            s.received += 1;
            s.bytes += msg.len() as u64;
            each(msg, s);
        })
        .await;
        (seen, checker)
    };
    let ((dseen, order, vanished), (bseen, checker)) = tokio::join!(drop_side, block_side);
    faults.stalls.store(dseen.stalls + bseen.stalls, Relaxed);

    let mut sent = [0u64; 2];
    for (i, (what, p)) in [("dropping", dprod), ("blocking", bprod)]
        .into_iter()
        .enumerate()
    {
        match p.await {
            Ok(Ok(n)) => sent[i] = n,
            Ok(Err(e)) => violations.push(format!("telemetry: {what} producer failed: {e}")),
            Err(e) => violations.push(format!("telemetry: {what} producer panicked: {e}")),
        }
    }
    for (what, seen) in [("dropping", &dseen), ("blocking", &bseen)] {
        if let Some(f) = &seen.failure {
            violations.push(format!("telemetry: {what} consumer: {f}"));
        }
    }
    let dstats = drx.stats();
    let bstats = brx.stats();
    let mut tally = checker.finish(&[(BLOCK_PRODUCER, sent[1])].into_iter().collect());
    let (dsent, dgot) = (sent[0], dseen.received + dseen.left - vanished);
    let accounted = dgot + dstats.dropped;
    eprintln!(
        "  telemetry: {DROP_STAGE}: sent {dsent}, received {}, dropped {}, left buffered at the end {}; \
         {BLOCK_STAGE}: sent {}, received {}",
        dseen.received, dstats.dropped, dseen.left, sent[1], bseen.received
    );
    tally.lost += dsent.saturating_sub(accounted);
    tally.duplicated += accounted.saturating_sub(dsent);
    tally.messages += dgot;
    tally.reordered += order.reordered;
    tally.corrupted += order.corrupted;
    tally.dropped_at_most_once = dstats.dropped;
    violations.extend(judge_dropping(&dstats));

    let dropping = Watched::new(DROP_STAGE, HIGH.max(charge_of_max()), "max(high, one item)");
    let blocking = Watched::new(BLOCK_STAGE, HIGH + charge_of_max(), "high + one item");
    dropping.record(dstats);
    blocking.record(bstats);
    let (max_buffered, bound) = judge("telemetry", [&*dropping, &*blocking], &mut violations);
    let mut latencies_us = dseen.latencies_us;
    latencies_us.extend_from_slice(checker.latencies_us());
    Outcome {
        tally,
        bytes: dseen.bytes + bseen.bytes,
        max_buffered,
        bound,
        faults: faults.total(),
        latencies_us,
        violations,
    }
}

/// The charge of the largest message.
fn charge_of_max() -> usize {
    charge_of(&Bytes::from(vec![0u8; MAX_MESSAGE]))
}

/// What the dropping stage's own stats must show.
fn judge_dropping(stats: &FlowStats) -> Vec<String> {
    let mut v = Vec::new();
    if stats.dropped == 0 {
        v.push(format!(
            "telemetry: {DROP_STAGE} dropped nothing: its consumer never fell behind, nothing was tested"
        ));
    }
    if stats.pauses > 0 || !stats.paused_time.is_zero() {
        v.push(format!(
            "telemetry: {DROP_STAGE} paused its producer {} times ({:?}): DropOldest must never wait for items smaller than high",
            stats.pauses, stats.paused_time
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_starts_with_a_stall_and_alternates() {
        let mut s = Schedule::new(7);
        let phases: Vec<(bool, Duration)> = (0..4).map(|_| s.next()).collect();
        assert_eq!(
            phases.iter().map(|p| p.0).collect::<Vec<_>>(),
            [true, false, true, false]
        );
        assert!(phases[0].1 >= Duration::from_secs(1));
    }

    #[test]
    fn a_dropping_stage_that_paused_or_never_dropped_is_a_violation() {
        let wm = Watermarks::new(LOW, HIGH).unwrap();
        let mut stats = FlowStats::empty(wm);
        assert_eq!(judge_dropping(&stats).len(), 1);
        stats.dropped = 3;
        assert!(judge_dropping(&stats).is_empty());
        stats.pauses = 1;
        assert!(judge_dropping(&stats)[0].contains("paused its producer 1 times"));
    }
}
