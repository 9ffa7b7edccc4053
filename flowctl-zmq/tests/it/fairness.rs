//! Starvation (PyZMQ #1928): an always-ready PULL on a current_thread runtime
//! must not stop a 1 ms timer; the same flood drained by a raw `AsyncFd` loop
//! without our fairness does stop it, which proves the test can fail.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::{Fairness, Source};
use flowctl_zmq::{Context, SocketType, ZmqSink, ZmqSocket, ZmqSource};
use tokio::io::unix::AsyncFd;
use tokio::time::MissedTickBehavior;

/// Messages queued before the receiver starts: the receiver never sees EAGAIN.
const FLOOD: usize = 300_000;

struct Outcome {
    ticks: u64,
    expected: u64,
    max_gap: Duration,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A PUSH bound to `inproc://<name>` and a PULL connected to it, both with
/// unlimited HWMs (a flood never blocks), the PULL with `fairness`.
fn unlimited_pair(ctx: &Context, name: &str, fairness: Fairness) -> (ZmqSink, ZmqSource) {
    let endpoint = format!("inproc://{name}");
    let tx = ZmqSocket::builder(SocketType::Push)
        .context(ctx)
        .send_hwm(0)
        .bind(&endpoint)
        .build()
        .unwrap()
        .into_sink();
    let rx = ZmqSocket::builder(SocketType::Pull)
        .context(ctx)
        .recv_hwm(0)
        .fairness(fairness)
        .connect(&endpoint)
        .build()
        .unwrap()
        .into_source();
    (tx, rx)
}

/// Runs a 1 ms interval (burst catch-up) next to `drain`, counting the ticks
/// it observes while `drain` runs. With `Burst`, a ticker that gets the thread
/// at all catches up every missed tick; only a ticker that never runs during
/// the flood loses them.
async fn ticks_during<F>(drain: F) -> Outcome
where
    F: std::future::Future<Output = ()> + 'static,
{
    let done = Arc::new(AtomicBool::new(false));
    let ticks = Arc::new(AtomicU64::new(0));
    let max_gap_us = Arc::new(AtomicU64::new(0));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let ticker = {
        let (done, ticks, max_gap_us) = (done.clone(), ticks.clone(), max_gap_us.clone());
        tokio::task::spawn_local(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(1));
            iv.set_missed_tick_behavior(MissedTickBehavior::Burst);
            iv.tick().await; // the first tick is immediate
            let _ = started_tx.send(());
            let mut last = Instant::now();
            loop {
                iv.tick().await;
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let now = Instant::now();
                let gap = now.duration_since(last).as_micros() as u64;
                max_gap_us.fetch_max(gap, Ordering::Relaxed);
                last = now;
                ticks.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    started_rx.await.unwrap();
    let start = Instant::now();
    drain.await;
    let elapsed = start.elapsed();
    done.store(true, Ordering::SeqCst);
    ticker.await.unwrap();
    Outcome {
        ticks: ticks.load(Ordering::SeqCst),
        expected: elapsed.as_millis() as u64,
        max_gap: Duration::from_micros(max_gap_us.load(Ordering::Relaxed)),
    }
}

fn flowctl_flood(batched: bool) {
    let rt = runtime();
    let local = tokio::task::LocalSet::new();
    let outcome = local.block_on(&rt, async {
        let ctx = Context::new();
        let (mut tx, mut rx) = unlimited_pair(&ctx, "flood-fair", Fairness::default());
        for i in 0..FLOOD {
            tx.send(vec![Bytes::from((i as u64).to_le_bytes().to_vec())].into())
                .await
                .unwrap();
        }
        tx.flush().await.unwrap();
        assert_eq!(tx.queued(), 0, "all {FLOOD} messages are in libzmq's pipe");
        let drain = async move {
            // Our receiver in its own task, as an application would run it.
            let task = tokio::task::spawn_local(async move {
                let mut next = 0u64;
                let mut buf = Vec::new();
                while next < FLOOD as u64 {
                    buf.clear();
                    if batched {
                        rx.recv_many(&mut buf, 1024).await.unwrap();
                    } else {
                        buf.push(rx.recv().await.unwrap().unwrap());
                    }
                    for m in &buf {
                        assert_eq!(m[0][..], next.to_le_bytes()[..], "order kept");
                        next += 1;
                    }
                }
                rx
            });
            let rx = task.await.unwrap();
            assert!(rx.zmq_stats().recv_yields > 0, "the receiver yielded");
        };
        let outcome = ticks_during(drain).await;
        drop(tx);
        outcome
    });
    eprintln!(
        "flowctl ({}): {} ticks of {} expected, max gap {:?}",
        if batched { "recv_many" } else { "recv" },
        outcome.ticks,
        outcome.expected,
        outcome.max_gap
    );
    assert!(outcome.expected >= 10, "flood too short to measure");
    assert!(
        outcome.ticks * 2 >= outcome.expected,
        "timer starved next to a flowctl PULL: {} ticks of {} expected",
        outcome.ticks,
        outcome.expected
    );
}

#[test]
fn timer_keeps_ticking_next_to_flooded_pull() {
    flowctl_flood(false);
}

#[test]
fn timer_keeps_ticking_next_to_flooded_pull_recv_many() {
    flowctl_flood(true);
}

struct Fd(RawFd);
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

#[test]
fn raw_asyncfd_loop_starves_the_timer() {
    let rt = runtime();
    let local = tokio::task::LocalSet::new();
    let outcome = local.block_on(&rt, async {
        let ctx = zmq::Context::new();
        let push = ctx.socket(zmq::PUSH).unwrap();
        push.set_sndhwm(0).unwrap();
        push.bind("inproc://flood-raw").unwrap();
        let pull = ctx.socket(zmq::PULL).unwrap();
        pull.set_rcvhwm(0).unwrap();
        pull.connect("inproc://flood-raw").unwrap();
        for i in 0..FLOOD {
            push.send(&(i as u64).to_le_bytes()[..], 0).unwrap();
        }
        let drain = async move {
            let task = tokio::task::spawn_local(async move {
                // SAFETY: the fd is `pull`'s ZMQ_FD, which stays open while
                // `pull` lives; `afd` is dropped before `pull` at the end of
                // this block (declared after it).
                let afd = unsafe { AsyncFd::register(Fd(pull.get_fd().unwrap())) }.unwrap();
                // The textbook loop: recv with DONTWAIT, wait for the fd on EAGAIN.
                let mut got = 0;
                while got < FLOOD {
                    match pull.recv_bytes(zmq::DONTWAIT) {
                        Ok(_) => got += 1,
                        Err(zmq::Error::EAGAIN) => {
                            let mut g = afd.readable().await.unwrap();
                            g.clear_ready();
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                drop(afd);
                got
            });
            assert_eq!(task.await.unwrap(), FLOOD);
        };
        ticks_during(drain).await
    });
    eprintln!(
        "raw AsyncFd loop: {} ticks of {} expected, max gap {:?}",
        outcome.ticks, outcome.expected, outcome.max_gap
    );
    assert!(outcome.expected >= 10, "flood too short to measure");
    // Starved: the ticker ran for under a tenth of the ticks, or (when
    // libzmq returned EAGAIN once mid-flood, so the loop awaited and the
    // burst ticker caught up all it had missed) it was kept off the thread
    // for at least a quarter of the flood in one stretch. Both are relative
    // to the flood's own length, not to the machine's speed.
    assert!(
        outcome.ticks * 10 < outcome.expected
            || outcome.max_gap.as_millis() as u64 * 4 >= outcome.expected,
        "the raw loop was expected to starve the timer: {} ticks of {} expected, longest gap {:?}",
        outcome.ticks,
        outcome.expected,
        outcome.max_gap
    );
}

/// The send side too: a PUSH that libzmq always accepts (unlimited HWM,
/// inproc) must not stop the timer either, whether it sends one message per
/// call or whole batches (`send_many`).
fn always_writable_push(batched: bool) {
    let rt = runtime();
    let local = tokio::task::LocalSet::new();
    let outcome = local.block_on(&rt, async {
        let ctx = Context::new();
        let (mut tx, _rx) = unlimited_pair(&ctx, "flood-send", Fairness::default());
        let msg = |i: u64| Bytes::copy_from_slice(&i.to_le_bytes());
        // Built before the timer runs: building it does not yield either.
        let mut batch: std::collections::VecDeque<_> = if batched {
            (0..FLOOD as u64).map(|i| msg(i).into()).collect()
        } else {
            std::collections::VecDeque::new()
        };
        let drain = async move {
            let task = tokio::task::spawn_local(async move {
                if batched {
                    let sent = tx.send_many(&mut batch).await.unwrap();
                    assert_eq!(sent, FLOOD);
                } else {
                    for i in 0..FLOOD as u64 {
                        tx.send(msg(i).into()).await.unwrap();
                    }
                }
                tx
            });
            let tx = task.await.unwrap();
            assert_eq!(tx.queued(), 0, "libzmq took every message at once");
            assert!(tx.zmq_stats().send_yields > 0, "the sender yielded");
        };
        ticks_during(drain).await
    });
    eprintln!(
        "flowctl PUSH (batched: {batched}): {} ticks of {} expected, max gap {:?}",
        outcome.ticks, outcome.expected, outcome.max_gap
    );
    assert!(outcome.expected >= 10, "flood too short to measure");
    assert!(
        outcome.ticks * 2 >= outcome.expected,
        "timer starved next to a flowctl PUSH: {} ticks of {} expected",
        outcome.ticks,
        outcome.expected
    );
}

#[test]
fn timer_keeps_ticking_next_to_always_writable_push() {
    always_writable_push(false);
}

#[test]
fn timer_keeps_ticking_next_to_always_writable_push_send_many() {
    always_writable_push(true);
}

/// `recv_many` spends one coop unit per call but still charges every message
/// to the `Fairness` budget: no batch is larger than the slice allows (items,
/// or bytes with the crossing message last), the next call yields first, and
/// every message arrives once, in order.
#[tokio::test(flavor = "current_thread")]
async fn recv_many_batches_never_exceed_the_slice() {
    const N: usize = 1000;
    const SIZE: usize = 100;
    for (fairness, cap) in [
        // 10 items per slice.
        (Fairness::new(10, 1 << 20).unwrap(), 10),
        // 250 bytes per slice: 100 + 100 + 100 crosses it, so 3 messages.
        (Fairness::new(1000, 250).unwrap(), 3),
    ] {
        let ctx = Context::new();
        let (mut tx, mut rx) = unlimited_pair(&ctx, "batch-cap", fairness);
        for i in 0..N {
            let mut m = vec![0u8; SIZE];
            m[..8].copy_from_slice(&(i as u64).to_le_bytes());
            tx.send(vec![Bytes::from(m)].into()).await.unwrap();
        }
        tx.flush().await.unwrap();
        let mut next = 0u64;
        let mut largest = 0;
        let mut buf = Vec::new();
        while next < N as u64 {
            buf.clear();
            let n = rx.recv_many(&mut buf, 10 * N).await.unwrap();
            assert_eq!(n, buf.len());
            largest = largest.max(n);
            assert!(
                n <= cap,
                "a batch of {n} messages exceeds the slice of {cap}"
            );
            for m in &buf {
                assert_eq!(m.len(), 1);
                assert_eq!(m[0].len(), SIZE);
                assert_eq!(m[0][..8], next.to_le_bytes()[..], "order kept");
                next += 1;
            }
        }
        assert_eq!(largest, cap, "the flood filled whole slices");
        assert_eq!(rx.stats().items, N as u64, "every message counted once");
        assert_eq!(rx.zmq_stats().received, N as u64);
        // Each full slice ended in a forced yield (the last one may not have).
        assert!(
            rx.zmq_stats().recv_yields >= (N / cap - 1) as u64,
            "{} forced yields for {} slices",
            rx.zmq_stats().recv_yields,
            N / cap
        );
    }
}
