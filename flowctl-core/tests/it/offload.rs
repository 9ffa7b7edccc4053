use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use flowctl_core::offload::{Offload, ordered};
use flowctl_core::{FlowError, Source, Watermarks, pipe};

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
    // The stage took at most 5 emitted + `concurrency` in flight from the source.
    assert!(calls.load(Ordering::SeqCst) <= 7);
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
    #[async_trait::async_trait]
    impl<S: Source<Item = u32>> Source for ThenFail<S> {
        type Item = u32;
        async fn recv(&mut self) -> Result<Option<u32>, FlowError> {
            match self.0.recv().await? {
                Some(x) => Ok(Some(x)),
                None => Err(FlowError::transport("connection reset")),
            }
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
