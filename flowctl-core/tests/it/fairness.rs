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

/// Takes `n` items from `src` the way a caller that drops `Pending` does:
/// everything `now_or_never` gives, then one `recv().await`, again and again.
/// Returns how many turns another task on the same thread got meanwhile.
///
/// A forced yield must stick: after the dropped `Pending`, the `recv().await`
/// has to find the task's coop budget spent and return to the scheduler. If
/// it does not, the task takes items until tokio's own budget runs out.
async fn turns_while_a_caller_drops_pending<S: Source>(src: &mut S, n: usize) -> u32 {
    use futures::FutureExt;
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
    // First a forced yield at the very start of a task poll, with tokio's
    // whole budget (128 units) left: spending exactly all of it must not be
    // taken for an unbounded budget.
    src.recv().await.unwrap().expect("an endless source");
    tokio::task::yield_now().await;
    src.recv().await.unwrap().expect("an endless source");
    let mut taken = 2;
    while taken < n {
        while let Some(item) = src.recv().now_or_never() {
            item.unwrap().expect("an endless source");
            taken += 1;
        }
        src.recv().await.unwrap().expect("an endless source");
        taken += 1;
    }
    let turns_during = turns.load(Ordering::SeqCst) - before;
    done.store(true, Ordering::SeqCst);
    other.await.unwrap();
    turns_during
}

#[tokio::test(flavor = "current_thread")]
async fn a_forced_yield_survives_a_caller_that_drops_pending() {
    // The byte limit (one 64 KiB item per slice here) must make the task
    // yield for every item, not only every 128 (tokio's coop budget), even
    // when the caller drops the forced Pending and polls again at once.
    let big = Bytes::from(vec![0u8; 64 * 1024]);
    let mut src = AlwaysReady(big).fair(Fairness::new(1_000_000, 64 * 1024).unwrap());
    let turns = turns_while_a_caller_drops_pending(&mut src, 512).await;
    // Sticking yields give the other task a turn per item (511-512 here);
    // yields that never stick give it ~4, and taking the prelude's exact
    // spending of 128 units for an unbounded budget gave it 498.
    assert!(
        turns >= 504,
        "the other task ran {turns} times while 512 items of 64 KiB were taken"
    );
}

/// A foreign source of `n` numbered items (each 8 bytes, big-endian), ready
/// at once, never yielding.
struct Numbered {
    next: u64,
    n: u64,
}

impl Source for Numbered {
    type Item = Bytes;
    fn poll_recv(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Bytes>, FlowError>> {
        if self.next == self.n {
            return std::task::Poll::Ready(Ok(None));
        }
        self.next += 1;
        std::task::Poll::Ready(Ok(Some(Bytes::copy_from_slice(
            &(self.next - 1).to_be_bytes(),
        ))))
    }
    fn stats(&self) -> FlowStats {
        FlowStats::empty(Watermarks::default())
    }
}

/// Drains `src`, checking that the items come 0, 1, 2, ... with none missing.
async fn drain_in_order<S: Source<Item = Bytes>>(src: &mut S) -> u64 {
    let mut expected = 0u64;
    while let Some(b) = src.recv().await.unwrap() {
        let got = u64::from_be_bytes(b[..].try_into().unwrap());
        assert_eq!(got, expected, "item out of order or lost");
        expected += 1;
    }
    expected
}

#[test]
fn without_a_coop_budget_a_fair_source_still_yields_every_slice_and_loses_nothing() {
    // Outside a tokio runtime (another executor) and inside
    // `tokio::task::unconstrained` tokio's coop budget never runs out, so the
    // slice's own limit is the only yield. 1,000 items at 128 per slice: a
    // forced yield after items 128, 256, ... 896, so 7.
    let mut src = Numbered { next: 0, n: 1000 }.fair(Fairness::default());
    assert_eq!(futures::executor::block_on(drain_in_order(&mut src)), 1000);
    assert_eq!(src.yields(), 7);

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut src = Numbered { next: 0, n: 1000 }.fair(Fairness::default());
    let taken = rt.block_on(async {
        tokio::spawn(async move {
            let n = tokio::task::unconstrained(drain_in_order(&mut src)).await;
            (n, src.yields())
        })
        .await
        .unwrap()
    });
    assert_eq!(taken, (1000, 7));
}

#[tokio::test(flavor = "current_thread")]
async fn a_source_that_leaves_unconstrained_makes_its_yields_stick_again() {
    // Inside `unconstrained` the forced yields stop spending the (endless)
    // coop budget. Back in a budgeted task they must stick again, at the
    // latest once tokio's budget has run out on the ready path.
    let big = Bytes::from(vec![0u8; 64 * 1024]);
    let mut src = AlwaysReady(big).fair(Fairness::new(1_000_000, 64 * 1024).unwrap());
    tokio::task::unconstrained(async {
        for _ in 0..300 {
            src.recv().await.unwrap();
        }
    })
    .await;
    // One item per slice: a forced yield before each item after the first.
    assert_eq!(src.yields(), 299);
    let turns = turns_while_a_caller_drops_pending(&mut src, 512).await;
    // As above: a turn per item when the yields stick, ~10 when they never
    // do again.
    assert!(
        turns >= 504,
        "the other task ran {turns} times while 512 items of 64 KiB were taken"
    );
}
