#[allow(unused_imports)]
use flowctl_core::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use flowctl_core::offload::{Offload, ordered};
use flowctl_core::weighted::{MIN_CHARGE, charge_of};
use flowctl_core::{FlowError, Source, Watermarks, Weighted, pipe};
use tokio::sync::{Notify, mpsc};

use crate::{payload, seq_of};

/// CPU work whose cost varies with the item, so jobs finish out of order.
fn spin_hash(b: &[u8], rounds: u32) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for _ in 0..rounds {
        for x in b {
            h = (h ^ u64::from(*x)).wrapping_mul(0x100000001b3);
        }
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_come_out_in_input_order_within_the_limits() {
    const ITEM: usize = 4096;
    let limits = Offload {
        concurrency: 3,
        max_inflight_bytes: 3 * ITEM,
    };
    let (mut tx, src) = pipe::<Bytes>(Watermarks::default());
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let mut out = ordered(src, limits, move |b: Bytes| {
        let now = r.fetch_add(1, Ordering::SeqCst) + 1;
        p.fetch_max(now, Ordering::SeqCst);
        // Every third item is ten times as expensive: later items overtake it.
        let rounds = if seq_of(&b).is_multiple_of(3) { 20 } else { 2 };
        let h = spin_hash(&b, rounds);
        r.fetch_sub(1, Ordering::SeqCst);
        (seq_of(&b), h)
    });
    let producer = tokio::spawn(async move {
        for i in 0..300 {
            tx.send(payload(i, ITEM)).await.unwrap();
        }
    });
    for i in 0..300u32 {
        let (seq, h) = out.recv().await.unwrap().unwrap();
        assert_eq!(seq, i);
        let rounds = if i % 3 == 0 { 20 } else { 2 };
        assert_eq!(h, spin_hash(&payload(i, ITEM), rounds));
    }
    assert_eq!(out.recv().await.unwrap(), None);
    producer.await.unwrap();
    assert!(
        peak.load(Ordering::SeqCst) <= 3,
        "at most `concurrency` jobs ran at once"
    );
    let s = out.stats();
    assert!(
        s.max_buffered <= 3 * ITEM + ITEM,
        "in-flight bytes bounded: {s:?}"
    );
    assert_eq!(s.buffered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_job_is_an_error_in_its_place_and_later_items_follow() {
    let (mut tx, src) = pipe::<Bytes>(Watermarks::default());
    for i in 0..5 {
        tx.send(payload(i, 8)).await.unwrap();
    }
    drop(tx);
    let mut out = ordered(src, Offload::default(), |b: Bytes| {
        let seq = seq_of(&b);
        assert!(seq != 2, "job {seq} exploded");
        seq
    });
    assert_eq!(out.recv().await.unwrap(), Some(0));
    assert_eq!(out.recv().await.unwrap(), Some(1));
    let err = out.recv().await.unwrap_err();
    assert!(
        matches!(&err, FlowError::Panicked(m) if m.contains("job 2 exploded")),
        "{err}"
    );
    assert_eq!(out.recv().await.unwrap(), Some(3));
    assert_eq!(out.recv().await.unwrap(), Some(4));
    assert_eq!(out.recv().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stage_stops_feeding_work() {
    let (mut tx, src) = pipe::<Bytes>(Watermarks::new(0, 1 << 20).unwrap());
    for i in 0..100 {
        tx.send(payload(i, 8)).await.unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let limits = Offload {
        concurrency: 2,
        max_inflight_bytes: 1 << 20,
    };
    let mut out = ordered(src, limits, move |b: Bytes| {
        c.fetch_add(1, Ordering::SeqCst);
        seq_of(&b)
    });
    for i in 0..5 {
        assert_eq!(out.recv().await.unwrap(), Some(i));
    }
    drop(out);
    // The stage took at most 5 emitted + `32 * concurrency` held from the source.
    assert!(calls.load(Ordering::SeqCst) <= 5 + 32 * 2);
    // Its source went with it: the producer learns at once.
    assert!(matches!(
        tx.send(payload(100, 8)).await,
        Err(FlowError::Closed)
    ));
    let s = tx.stats();
    assert!(s.items - s.buffered as u64 / 8 <= 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_error_comes_after_every_result_before_it() {
    use flowctl_core::compat::StreamSource;
    struct ThenFail<S>(S);
    impl<S: Source<Item = u32>> Source for ThenFail<S> {
        type Item = u32;
        fn poll_recv(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<Option<u32>, FlowError>> {
            self.0.poll_recv(cx).map(|r| match r? {
                Some(x) => Ok(Some(x)),
                None => Err(FlowError::transport("connection reset")),
            })
        }
        fn stats(&self) -> flowctl_core::FlowStats {
            self.0.stats()
        }
    }
    let src = ThenFail(StreamSource::new(futures::stream::iter(vec![1u32, 2, 3])));
    let mut out = ordered(src, Offload::default(), |x: u32| x * 10);
    assert_eq!(out.recv().await.unwrap(), Some(10));
    assert_eq!(out.recv().await.unwrap(), Some(20));
    assert_eq!(out.recv().await.unwrap(), Some(30));
    assert!(matches!(out.recv().await, Err(FlowError::Transport(_))));
    assert_eq!(out.recv().await.unwrap(), None);
}

/// The pipe's items, counted in `taken`, opening `latch` once the item with
/// sequence number `open_at` has been taken.
struct OpenAt {
    inner: flowctl_core::PipeSource<Bytes>,
    open_at: u32,
    latch: Arc<Latch>,
    taken: Arc<AtomicUsize>,
}

impl Source for OpenAt {
    type Item = Bytes;
    fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Bytes>, FlowError>> {
        let item = std::task::ready!(self.inner.poll_recv(cx))?;
        if item.is_some() {
            self.taken.fetch_add(1, Ordering::SeqCst);
        }
        if item.as_ref().is_some_and(|b| seq_of(b) == self.open_at) {
            self.latch.open();
        }
        std::task::Poll::Ready(Ok(item))
    }
    fn stats(&self) -> flowctl_core::FlowStats {
        self.inner.stats()
    }
}

/// Runs the stage until its first result, then stops polling it and waits for
/// jobs 1..=`open_at` to finish: they can only have run while the consumer was
/// away. Job 0 waits until item `open_at` has been taken, so the stage has
/// taken items 0..=`open_at` before its first `recv` returns. Returns the
/// stage, the count of items it took and the peak of jobs running at once.
async fn run_ahead(
    limits: Offload,
    item: usize,
    open_at: u32,
) -> (impl Source<Item = u32>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (mut tx, inner) = pipe::<Bytes>(Watermarks::new(0, 1 << 20).unwrap());
    for i in 0..100 {
        tx.send(payload(i, item)).await.unwrap();
    }
    drop(tx);
    let latch = Arc::new(Latch::default());
    let taken = Arc::new(AtomicUsize::new(0));
    let src = OpenAt {
        inner,
        open_at,
        latch: latch.clone(),
        taken: taken.clone(),
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let mut out = ordered(src, limits, move |b: Bytes| {
        let seq = seq_of(&b);
        if seq == 0 {
            latch.wait();
        }
        let now = r.fetch_add(1, Ordering::SeqCst) + 1;
        p.fetch_max(now, Ordering::SeqCst);
        std::hint::black_box(spin_hash(&b, 2));
        r.fetch_sub(1, Ordering::SeqCst);
        // The receiver is gone once `run_ahead` returns; later jobs need not report.
        let _ = done_tx.send(seq);
        seq
    });
    assert_eq!(out.recv().await.unwrap(), Some(0));
    // `out` is not polled from here on.
    let mut finished = std::collections::BTreeSet::new();
    while !(0..=open_at).all(|i| finished.contains(&i)) {
        finished.insert(done_rx.recv().await.unwrap());
    }
    (out, taken, peak)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_keep_running_while_the_consumer_is_away_up_to_32_per_allowed_job() {
    let limits = Offload {
        concurrency: 2,
        max_inflight_bytes: 1 << 20,
    };
    // Items 0..=63 were taken (32 * concurrency held), item 0 was emitted, and
    // jobs 1..=63 ran while nobody polled the stage.
    let (mut out, taken, peak) = run_ahead(limits, 8, 63).await;
    // Before `recv` returned, the stage may have taken item 64 into the freed
    // place, and no more: it holds at most 64.
    let taken = taken.load(Ordering::SeqCst);
    assert!((64..=65).contains(&taken), "{taken} items taken");
    assert!(
        peak.load(Ordering::SeqCst) <= 2,
        "at most `concurrency` ran at once"
    );
    let s = out.stats();
    // Each 8-byte item is charged `MIN_CHARGE` (64 bytes), its charge floor.
    assert_eq!(
        s.buffered,
        (taken - 1) * charge_of(&payload(0, 8)),
        "the results held are charged"
    );
    assert_eq!(charge_of(&payload(0, 8)), MIN_CHARGE);
    // Every item comes out once, in order, and the charge goes back to zero.
    for i in 1..100 {
        assert_eq!(out.recv().await.unwrap(), Some(i));
    }
    assert_eq!(out.recv().await.unwrap(), None);
    assert_eq!(out.stats().buffered, 0);
    assert!(peak.load(Ordering::SeqCst) <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_running_ahead_stop_at_max_inflight_bytes_plus_one_item() {
    const ITEM: usize = 4096;
    let limits = Offload {
        concurrency: 2,
        max_inflight_bytes: 3 * ITEM,
    };
    // Items 0..=3 were taken: the fourth crossed the 3-item limit, so the stage
    // took no fifth before item 0 was emitted; jobs 1..=3 ran while nobody
    // polled the stage.
    let (mut out, taken, peak) = run_ahead(limits, ITEM, 3).await;
    // Emitting item 0 freed one item's bytes: item 4 may have been taken too.
    let taken = taken.load(Ordering::SeqCst);
    assert!((4..=5).contains(&taken), "{taken} items taken");
    assert!(peak.load(Ordering::SeqCst) <= 2);
    let s = out.stats();
    assert_eq!(s.buffered, (taken - 1) * ITEM);
    assert!(s.max_buffered <= 3 * ITEM + ITEM, "{s:?}");
    for i in 1..100 {
        assert_eq!(out.recv().await.unwrap(), Some(i));
    }
    assert_eq!(out.recv().await.unwrap(), None);
    let s = out.stats();
    assert_eq!(s.buffered, 0);
    assert!(s.max_buffered <= 3 * ITEM + ITEM, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_charges_light_items_at_least_min_charge() {
    // 8-byte items against a limit of three minimum charges: charged by weight
    // the stage would take 25 of them before stopping; charged `MIN_CHARGE`
    // each it stops after the fourth, as it does for heavy items.
    let limits = Offload {
        concurrency: 2,
        max_inflight_bytes: 3 * MIN_CHARGE,
    };
    let (mut out, taken, _peak) = run_ahead(limits, 8, 3).await;
    let taken = taken.load(Ordering::SeqCst);
    assert!((4..=5).contains(&taken), "{taken} items taken");
    let s = out.stats();
    assert_eq!(s.buffered, (taken - 1) * MIN_CHARGE);
    assert!(s.max_buffered <= 3 * MIN_CHARGE + MIN_CHARGE, "{s:?}");
    for i in 1..100 {
        assert_eq!(out.recv().await.unwrap(), Some(i));
    }
    assert_eq!(out.recv().await.unwrap(), None);
    // Every charge was credited back.
    assert_eq!(out.stats().buffered, 0);
}

/// An item or result that counts itself while alive.
struct Tracked {
    seq: u32,
    live: Arc<AtomicUsize>,
    dropped: Arc<Notify>,
}

impl Tracked {
    fn new(seq: u32, live: &Arc<AtomicUsize>, dropped: &Arc<Notify>) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Tracked {
            seq,
            live: live.clone(),
            dropped: dropped.clone(),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        self.dropped.notify_one();
    }
}

impl Weighted for Tracked {
    fn weight(&self) -> usize {
        8
    }
}

/// Jobs wait here until the test opens it.
#[derive(Default)]
struct Latch {
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Latch {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stage_mid_flight_drops_every_item_and_result() {
    let live = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(Notify::new());
    let latch = Arc::new(Latch::default());
    let (entered_tx, mut entered_rx) = mpsc::unbounded_channel();
    let (mut tx, src) = pipe::<Tracked>(Watermarks::new(0, 1 << 20).unwrap());
    for i in 0..100 {
        tx.send(Tracked::new(i, &live, &dropped)).await.unwrap();
    }
    let limits = Offload {
        concurrency: 2,
        max_inflight_bytes: 1 << 20,
    };
    let (l, lv, d) = (latch.clone(), live.clone(), dropped.clone());
    let mut out = ordered(src, limits, move |t: Tracked| {
        if t.seq > 0 {
            entered_tx.send(t.seq).unwrap();
            l.wait();
        }
        Tracked::new(t.seq + 1000, &lv, &d)
    });
    let first = out.recv().await.unwrap().unwrap();
    assert_eq!(first.seq, 1000);
    drop(first);
    // Both workers are inside jobs 1 and 2; items 3..=99 are queued in the stage
    // or still in the pipe.
    let mut entered = [
        entered_rx.recv().await.unwrap(),
        entered_rx.recv().await.unwrap(),
    ];
    entered.sort_unstable();
    assert_eq!(entered, [1, 2]);
    assert_eq!(live.load(Ordering::SeqCst), 99);
    drop(out);
    drop(tx);
    // The queued items and the pipe's went at once; only the two inputs inside
    // the blocked jobs are left.
    assert_eq!(live.load(Ordering::SeqCst), 2);
    latch.open();
    // The two running jobs finish; their workers drop the results.
    loop {
        let notified = dropped.notified();
        if live.load(Ordering::SeqCst) == 0 {
            break;
        }
        notified.await;
    }
    // No queued job started after the drop: nothing else entered `f`.
    assert!(
        entered_rx.recv().await.is_none(),
        "a worker started a job after the drop"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn works_on_a_current_thread_runtime() {
    let (mut tx, src) = pipe::<Bytes>(Watermarks::default());
    let producer = tokio::spawn(async move {
        for i in 0..200 {
            tx.send(payload(i, 64)).await.unwrap();
        }
    });
    let mut out = ordered(src, Offload::default(), |b: Bytes| seq_of(&b));
    for i in 0..200 {
        assert_eq!(out.recv().await.unwrap(), Some(i));
    }
    assert_eq!(out.recv().await.unwrap(), None);
    producer.await.unwrap();
    assert_eq!(out.stats().buffered, 0);
}

#[test]
fn a_job_no_worker_will_run_is_an_error_in_its_place() {
    use flowctl_core::compat::StreamSource;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    // The blocking pool drops whatever is spawned on it from here on.
    rt.shutdown_background();
    let src = StreamSource::new(futures::stream::iter(vec![1u32, 2, 3]));
    let mut out = ordered(src, Offload::default(), |x: u32| x * 10);
    let driver = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    driver.block_on(async {
        // The stage spawns its workers on the runtime that was shut down.
        let _ctx = handle.enter();
        for _ in 0..3 {
            let err = out.recv().await.unwrap_err();
            assert!(
                matches!(&err, FlowError::Panicked(m) if m.contains("cancelled")),
                "{err}"
            );
        }
        assert_eq!(out.recv().await.unwrap(), None);
        assert_eq!(out.stats().buffered, 0);
    });
}

/// Items 0..`n` of which the next one becomes available only once the job of
/// the previous one has finished: each job releases one permit on its way out.
struct Trickle {
    next: u32,
    n: u32,
    permits: tokio_util::sync::PollSemaphore,
}

impl Source for Trickle {
    type Item = Bytes;
    fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Bytes>, FlowError>> {
        if self.next == self.n {
            return std::task::Poll::Ready(Ok(None));
        }
        let Some(permit) = std::task::ready!(self.permits.poll_acquire(cx)) else {
            return std::task::Poll::Ready(Err(FlowError::Closed));
        };
        permit.forget();
        self.next += 1;
        std::task::Poll::Ready(Ok(Some(payload(self.next - 1, 8))))
    }
    fn stats(&self) -> flowctl_core::FlowStats {
        flowctl_core::FlowStats::empty(Watermarks::default())
    }
}

/// One stage of one allowed job over a [`Trickle`] of `n` items: every
/// result arrives, in order. Panics naming the stranded item if the stage
/// stalls.
async fn trickle_through_one_worker(n: u32) {
    let permits = Arc::new(tokio::sync::Semaphore::new(1));
    let started = Arc::new(AtomicUsize::new(0));
    let src = Trickle {
        next: 0,
        n,
        permits: tokio_util::sync::PollSemaphore::new(permits.clone()),
    };
    let limits = Offload {
        concurrency: 1,
        max_inflight_bytes: 1 << 20,
    };
    let s = started.clone();
    let mut out = ordered(src, limits, move |b: Bytes| {
        s.fetch_add(1, Ordering::SeqCst);
        permits.add_permits(1);
        seq_of(&b)
    });
    for k in 0..n {
        // A hang detector only: a correct stage returns each result as soon as
        // its job has run, and no job waits for anything but the previous one.
        match tokio::time::timeout(std::time::Duration::from_secs(10), out.recv()).await {
            Ok(got) => assert_eq!(got.unwrap(), Some(k)),
            Err(_) => {
                let ran = started.load(Ordering::SeqCst);
                if ran == k as usize {
                    panic!(
                        "stalled: {k} of {n} results after 10s: item {k} was queued but no worker ran it"
                    );
                }
                panic!("stalled: {k} of {n} results after 10s ({ran} jobs started)");
            }
        }
    }
    assert_eq!(out.recv().await.unwrap(), None);
    assert_eq!(out.stats().buffered, 0);
}

/// Issue 15 item 1: a worker that found the queue empty must not be counted as
/// running once it has decided to return, or a job queued in between is
/// stranded with no worker. With one allowed job and a source that yields the
/// next item only when the previous job is done, every job is queued while
/// the last worker may be on its way out; several stages at once on two
/// runtime threads make the workers lose their CPU at any point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_never_strands_a_queued_job_without_a_worker() {
    const STAGES: usize = 8;
    const N: u32 = 10_000;
    let stages: Vec<_> = (0..STAGES)
        .map(|_| tokio::spawn(trickle_through_one_worker(N)))
        .collect();
    for stage in stages {
        if let Err(e) = stage.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// An item of the property test: its position, its weight and how much work
/// its job does.
#[derive(Debug, Clone, Copy)]
struct Sized {
    seq: u32,
    size: usize,
    rounds: u32,
}

impl Weighted for Sized {
    fn weight(&self) -> usize {
        self.size
    }
}

/// One runtime for every case: a fresh runtime per case would start new
/// blocking-pool threads each time.
fn prop_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap()
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10_000))]

    /// For any job costs, item sizes (empty ones included), limits and
    /// consumer pace: every result comes out once, in input order, and the
    /// bytes charged never exceed `max_inflight_bytes` plus one item's charge.
    #[test]
    fn offload_keeps_input_order_and_the_inflight_bound(
        concurrency in 1..=4usize,
        max_inflight in 1..2_000usize,
        items in proptest::collection::vec((0..600usize, 0..40u32, proptest::bool::ANY), 0..40),
    ) {
        let jobs: Vec<Sized> = items
            .iter()
            .enumerate()
            .map(|(i, &(size, rounds, _))| Sized { seq: u32::try_from(i).unwrap(), size, rounds })
            .collect();
        let largest = jobs.iter().map(charge_of).max().unwrap_or(0);
        let pauses: Vec<bool> = items.iter().map(|&(_, _, pause)| pause).collect();
        let limits = Offload { concurrency, max_inflight_bytes: max_inflight };
        let (got, stats) = prop_runtime().block_on(async move {
            let src = flowctl_core::compat::StreamSource::new(futures::stream::iter(jobs));
            let mut out = ordered(src, limits, |j: Sized| {
                std::hint::black_box(spin_hash(&j.seq.to_be_bytes(), j.rounds));
                j.seq
            });
            let mut got = Vec::new();
            for pause in pauses {
                got.push(out.recv().await.unwrap());
                if pause {
                    // The consumer goes away for a moment; jobs run ahead.
                    tokio::task::yield_now().await;
                }
            }
            assert_eq!(out.recv().await.unwrap(), None);
            (got, out.stats())
        });
        let want: Vec<Option<u32>> = (0..u32::try_from(items.len()).unwrap()).map(Some).collect();
        proptest::prop_assert_eq!(got, want);
        proptest::prop_assert_eq!(stats.buffered, 0);
        proptest::prop_assert!(
            stats.max_buffered <= max_inflight + largest,
            "{} charged at most, limit {} + one item {}",
            stats.max_buffered,
            max_inflight,
            largest
        );
    }
}
