//! On a current_thread runtime an always-ready source and a 1 ms interval timer
//! share one thread. With flowctl's fairness the timer keeps ticking; with a
//! source that never yields (the PyZMQ asyncio failure) it does not tick at all
//! while the source is drained. The bound asserted (at least a quarter of the
//! expected ticks) holds on a slow or loaded machine, because missed ticks are
//! counted in a burst at the timer's next turn; the real lateness percentiles
//! are measured by the bench, not here.

#[allow(unused_imports)]
use flowctl_core::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowctl_core::{Fairness, FlowError, FlowStats, Source, SourceExt, Watermarks, pipe};

/// A foreign source that always has an item and never yields.
struct AlwaysReady(Bytes);

impl Source for AlwaysReady {
    type Item = Bytes;
    fn poll_recv(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Bytes>, FlowError>> {
        std::task::Poll::Ready(Ok(Some(self.0.clone())))
    }
    fn stats(&self) -> FlowStats {
        FlowStats::empty(Watermarks::default())
    }
}

const WINDOW: Duration = Duration::from_millis(300);

/// Drains `src` for `WINDOW` while a 1 ms interval ticks on the same thread;
/// returns the ticks that happened inside the window.
async fn ticks_while_draining<S: Source>(mut src: S) -> u32 {
    let ticks = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let timer = {
        let (ticks, done) = (ticks.clone(), done.clone());
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(1));
            // Burst: ticks missed while the OS had the whole process off the
            // CPU fire as soon as the runtime gives the timer a turn, so the
            // count measures the runtime's fairness, not the machine's load.
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            loop {
                iv.tick().await;
                if done.load(Ordering::SeqCst) {
                    break;
                }
                ticks.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // Let the timer task start before the flood.
    tokio::task::yield_now().await;
    let before = ticks.load(Ordering::SeqCst);
    let deadline = Instant::now() + WINDOW;
    let mut items = 0u64;
    while Instant::now() < deadline {
        src.recv().await.unwrap().unwrap();
        items += 1;
    }
    let inside = ticks.load(Ordering::SeqCst) - before;
    done.store(true, Ordering::SeqCst);
    timer.await.unwrap();
    assert!(items > 0);
    inside
}

#[tokio::test(flavor = "current_thread")]
async fn fair_source_keeps_a_timer_ticking_and_an_unfair_one_starves_it() {
    let expected = WINDOW.as_millis() as u32;
    let fair =
        ticks_while_draining(AlwaysReady(Bytes::from_static(&[0; 64])).fair(Fairness::default()))
            .await;
    assert!(
        fair >= expected / 4,
        "fair source: only {fair} of ~{expected} ticks"
    );
    let unfair = ticks_while_draining(AlwaysReady(Bytes::from_static(&[0; 64]))).await;
    assert_eq!(
        unfair, 0,
        "an always-ready source that never yields starves the timer"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_pipe_is_fair_on_its_own() {
    // A producer task that keeps the pipe full; the consumer is always ready.
    let (mut tx, rx) = pipe::<Bytes>(Watermarks::new(1 << 20, 4 << 20).unwrap());
    let producer =
        tokio::spawn(async move { while tx.send(Bytes::from_static(&[1; 256])).await.is_ok() {} });
    let expected = WINDOW.as_millis() as u32;
    let ticks = ticks_while_draining(rx).await;
    producer.abort();
    assert!(
        ticks >= expected / 4,
        "pipe: only {ticks} of ~{expected} ticks"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_byte_budget_yields_before_the_item_budget() {
    // 1 MiB items: the byte budget (256 KiB) ends a slice after one item.
    let big = Bytes::from(vec![0u8; 1 << 20]);
    let mut src = AlwaysReady(big).fair(Fairness::default());
    for _ in 0..10 {
        src.recv().await.unwrap();
    }
    assert!(
        src.yields() >= 4,
        "yielded {} times in 10 items of 1 MiB",
        src.yields()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_forced_yield_survives_a_caller_that_drops_pending() {
    // The provided recv_many polls extra items with now_or_never, which drops a
    // Pending. The byte limit (one 64 KiB item per slice here) must still make
    // the task yield for every item, not only every 128 (tokio's coop budget).
    let big = Bytes::from(vec![0u8; 64 * 1024]);
    let mut src = AlwaysReady(big).fair(Fairness::new(1_000_000, 64 * 1024).unwrap());
    let turns = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let other = {
        let (turns, done) = (turns.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                turns.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        })
    };
    tokio::task::yield_now().await;
    let before = turns.load(Ordering::SeqCst);
    let mut taken = 0;
    let mut buf = Vec::new();
    while taken < 256 {
        buf.clear();
        taken += src.recv_many(&mut buf, 1000).await.unwrap();
    }
    let turns_during = turns.load(Ordering::SeqCst) - before;
    done.store(true, Ordering::SeqCst);
    other.await.unwrap();
    // One yield per item would give the other task ~256 turns; without the fix it got ~2.
    assert!(
        turns_during >= 64,
        "the other task ran {turns_during} times while 256 items of 64 KiB were taken"
    );
}
