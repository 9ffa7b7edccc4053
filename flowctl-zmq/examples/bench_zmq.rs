//! Side-by-side figures: flowctl-zmq vs raw blocking `zmq` PUSH->PULL over tcp
//! loopback, and the worst timer stall next to an always-ready PULL (flowctl vs
//! a raw `AsyncFd` loop). flowctl sends with `send_many` and receives with
//! `recv_many` (batches of 256); for 100 B it also runs with one `send` per
//! message.
//!
//! `cargo run --release -p flowctl-zmq --example bench_zmq [-- <100B count> <64KiB count> [<stall count>]]`
//!
//! Knobs: `BENCH_ROUNDS` (best of N interleaved rounds, default 3),
//! `BENCH_MIXED=1` (also flowctl PUSH -> raw PULL and raw PUSH -> flowctl PULL),
//! `BENCH_ONLY=both|both1|raw|send|recv` (one 100 B run, for `perf`; `both1`
//! sends one message per `send`), `BENCH_HWM`
//! (both sides' HWM, default 1000), `BENCH_FAIR_ITEMS` (fairness items per
//! slice), `BENCH_SINK_HIGH` (the sink's own high watermark in bytes), `BENCH_TWO_CONTEXTS=1` (one libzmq context per side).
//!
//! For `cargo xtask bench`: `--json` or `FLOWCTL_BENCH_JSON=1` also prints one
//! `BENCH {json}` line per round and side (and repeats the timer-stall runs
//! `BENCH_ROUNDS` times); `BENCH_MEM=<bytes>` instead runs only the
//! stalled-consumer memory figure (64 KiB messages, peak RSS of this process).
//!
//! On a shared machine the 100 B figures swing widely between runs, raw ones
//! included: `perf stat -e syscalls:sys_enter_futex` shows runs with ~10^5
//! futex calls (glibc malloc arena lock contention between the application
//! threads and libzmq's I/O thread, which frees what the sender allocated and
//! allocates what the receiver frees) and runs with ~20. Compare best-of-N.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowctl_core::Sink;
use flowctl_core::prelude::*;
use flowctl_zmq::{Context, Multipart, SocketType, ZmqSocket};
use tokio::io::unix::AsyncFd;

/// Both sides' HWM in messages (`BENCH_HWM`, default 1000 = libzmq's default).
fn hwm() -> i32 {
    std::env::var("BENCH_HWM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

type SendStats = Option<(flowctl_core::FlowStats, flowctl_zmq::ZmqStats)>;
static SEND_STATS: std::sync::Mutex<SendStats> = std::sync::Mutex::new(None);

/// `BENCH_SINK_HIGH=<bytes>` sets the flowctl sink's watermarks to
/// (`high / 4`, `high`): how much the sink queues itself once libzmq is at
/// its SNDHWM (default [`Watermarks::default`](flowctl_core::Watermarks)).
fn sink_watermarks() -> flowctl_core::Watermarks {
    match std::env::var("BENCH_SINK_HIGH")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(high) => flowctl_core::Watermarks::new(high / 4, high).unwrap(),
        None => flowctl_core::Watermarks::default(),
    }
}

/// `BENCH_FAIR_ITEMS=<n>` overrides the fairness budget's item limit.
fn fairness() -> flowctl_core::Fairness {
    match std::env::var("BENCH_FAIR_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(items) => flowctl_core::Fairness::new(items, 1 << 30).unwrap(),
        None => flowctl_core::Fairness::default(),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Raw blocking libzmq: sender thread and receiver thread.
fn raw_push_pull(n: usize, size: usize) -> Duration {
    let ctx = zmq::Context::new();
    let pull = ctx.socket(zmq::PULL).unwrap();
    pull.set_rcvhwm(hwm()).unwrap();
    pull.bind("tcp://127.0.0.1:*").unwrap();
    let ep = pull.get_last_endpoint().unwrap().unwrap();
    let push = ctx.socket(zmq::PUSH).unwrap();
    push.set_sndhwm(hwm()).unwrap();
    push.connect(&ep).unwrap();
    let payload = vec![7u8; size];
    let start = Instant::now();
    let recv = std::thread::spawn(move || {
        let mut msg = zmq::Message::new();
        for _ in 0..n {
            pull.recv(&mut msg, 0).unwrap();
            assert_eq!(msg.len(), size);
        }
    });
    for _ in 0..n {
        push.send(&payload[..], 0).unwrap();
    }
    recv.join().unwrap();
    start.elapsed()
}

/// Messages per `send_many` / `recv_many` call.
const BATCH: usize = 256;

/// flowctl: a PUSH sink and a PULL source, each on its own current_thread
/// runtime, sharing one libzmq context (one I/O thread, as the raw run).
/// `batched`: the sender uses `send_many`, else `send` per message (the
/// receiver always uses `recv_many`).
fn flowctl_push_pull(n: usize, size: usize, batched: bool) -> Duration {
    let ctx = Context::new();
    // `BENCH_TWO_CONTEXTS=1`: one context (one I/O thread) per side.
    let ctx2 = if std::env::var_os("BENCH_TWO_CONTEXTS").is_some() {
        Context::new()
    } else {
        ctx.clone()
    };
    let (ep_tx, ep_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<Instant>();
    let recv = std::thread::spawn(move || {
        rt().block_on(async {
            let mut rx = ZmqSocket::builder(SocketType::Pull)
                .context(&ctx2)
                .fairness(fairness())
                .recv_hwm(hwm() as usize)
                .bind("tcp://127.0.0.1:*")
                .build()
                .unwrap()
                .into_source();
            ep_tx.send(rx.endpoints()[0].clone()).unwrap();
            let start = go_rx.recv().unwrap();
            let mut buf = Vec::with_capacity(BATCH);
            let mut got = 0;
            while got < n {
                buf.clear();
                got += rx.recv_many(&mut buf, BATCH).await.unwrap();
                assert_eq!(buf[0][0].len(), size);
            }
            start.elapsed()
        })
    });
    let ep = ep_rx.recv().unwrap();
    rt().block_on(async {
        let mut tx = ZmqSocket::builder(SocketType::Push)
            .context(&ctx)
            .fairness(fairness())
            .watermarks(sink_watermarks())
            .send_hwm(hwm() as usize)
            .connect(ep)
            .build()
            .unwrap()
            .into_sink();
        let payload = Bytes::from(vec![7u8; size]);
        go_tx.send(Instant::now()).unwrap();
        if batched {
            // The batch API of both sides: `send_many` here, `recv_many` there.
            let mut batch = std::collections::VecDeque::with_capacity(BATCH);
            let mut left = n;
            while left > 0 {
                let k = left.min(BATCH);
                batch.extend((0..k).map(|_| Multipart::from(payload.clone())));
                tx.send_many(&mut batch).await.unwrap();
                left -= k;
            }
        } else {
            for _ in 0..n {
                tx.send(payload.clone().into()).await.unwrap();
            }
        }
        tx.flush().await.unwrap();
        let elapsed = recv.join().unwrap();
        tx.close().await.unwrap();
        elapsed
    })
}

/// One side flowctl, the other raw blocking libzmq (which side costs what).
fn mixed(n: usize, size: usize, flowctl_sends: bool) -> Duration {
    let ctx = Context::new();
    let raw_ctx = zmq::Context::new();
    let payload = vec![7u8; size];
    if flowctl_sends {
        let pull = raw_ctx.socket(zmq::PULL).unwrap();
        pull.set_rcvhwm(hwm()).unwrap();
        pull.bind("tcp://127.0.0.1:*").unwrap();
        let ep = pull.get_last_endpoint().unwrap().unwrap();
        let start = Instant::now();
        let recv = std::thread::spawn(move || {
            let mut msg = zmq::Message::new();
            for _ in 0..n {
                pull.recv(&mut msg, 0).unwrap();
            }
        });
        rt().block_on(async {
            let mut tx = ZmqSocket::builder(SocketType::Push)
                .context(&ctx)
                .watermarks(sink_watermarks())
                .send_hwm(hwm() as usize)
                .connect(ep)
                .build()
                .unwrap()
                .into_sink();
            let payload = Bytes::from(payload);
            for _ in 0..n {
                tx.send(payload.clone().into()).await.unwrap();
            }
            tx.flush().await.unwrap();
            recv.join().unwrap();
            *SEND_STATS.lock().unwrap() = Some((tx.stats(), tx.zmq_stats()));
            start.elapsed()
        })
    } else {
        rt().block_on(async {
            let mut rx = ZmqSocket::builder(SocketType::Pull)
                .context(&ctx)
                .recv_hwm(hwm() as usize)
                .bind("tcp://127.0.0.1:*")
                .build()
                .unwrap()
                .into_source();
            let ep = rx.endpoints()[0].clone();
            let start = Instant::now();
            let send = std::thread::spawn(move || {
                let push = raw_ctx.socket(zmq::PUSH).unwrap();
                push.set_sndhwm(hwm()).unwrap();
                push.connect(&ep).unwrap();
                for _ in 0..n {
                    push.send(&payload[..], 0).unwrap();
                }
                push
            });
            let mut buf = Vec::with_capacity(256);
            let mut got = 0;
            while got < n {
                buf.clear();
                got += rx.recv_many(&mut buf, 256).await.unwrap();
            }
            let elapsed = start.elapsed();
            drop(send.join().unwrap());
            elapsed
        })
    }
}

/// `--json` or `FLOWCTL_BENCH_JSON=1`: print `BENCH` lines for `cargo xtask bench`.
fn json_mode() -> bool {
    std::env::args().any(|a| a == "--json") || std::env::var_os("FLOWCTL_BENCH_JSON").is_some()
}

/// One machine-readable measurement; `side` is `flowctl`, `anchor` or `baseline`.
fn bench_line(name: &str, side: &str, round: usize, value: f64, unit: &str) {
    println!(
        "BENCH {{\"name\":\"{name}\",\"side\":\"{side}\",\"round\":{round},\"value\":{value},\"unit\":\"{unit}\"}}"
    );
}

/// `VmRSS`/`VmHWM` of this process in MiB.
fn proc_status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(key))?;
            let kib: f64 = line[key.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kib / 1024.0)
        })
        .unwrap_or(f64::NAN)
}

/// A stalled consumer: flowctl PUSH -> flowctl PULL over tcp, both sockets
/// built for 64 KiB messages (`expected_message_size`, default watermarks).
/// The consumer reads nothing for 2 s, then one message per millisecond;
/// the sender offers `total` bytes of freshly allocated 64 KiB messages as
/// fast as it is let. Returns (peak RSS, RSS before, messages moved).
fn stalled_consumer(total: usize) -> (f64, f64, usize) {
    const SIZE: usize = 64 * 1024;
    let n = total.div_ceil(SIZE);
    let before = proc_status_mib("VmRSS:");
    let (ep_tx, ep_rx) = std::sync::mpsc::channel();
    let recv = std::thread::spawn(move || {
        rt().block_on(async {
            let mut rx = ZmqSocket::builder(SocketType::Pull)
                .expected_message_size(SIZE)
                .bind("tcp://127.0.0.1:*")
                .build()
                .unwrap()
                .into_source();
            ep_tx.send(rx.endpoints()[0].clone()).unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut got = 0;
            while got < n {
                let m = rx.recv().await.unwrap().unwrap();
                assert_eq!(m[0].len(), SIZE);
                got += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            got
        })
    });
    let ep = ep_rx.recv().unwrap();
    let got = rt().block_on(async {
        let mut tx = ZmqSocket::builder(SocketType::Push)
            .expected_message_size(SIZE)
            .connect(ep)
            .build()
            .unwrap()
            .into_sink();
        for i in 0..n {
            tx.send(Bytes::from(vec![i as u8; SIZE]).into())
                .await
                .unwrap();
        }
        tx.flush().await.unwrap();
        // Close only once everything arrived: the linger must not cut it short.
        let got = tokio::task::spawn_blocking(move || recv.join().unwrap())
            .await
            .unwrap();
        tx.close().await.unwrap();
        got
    });
    (proc_status_mib("VmHWM:"), before, got)
}

struct Fd(RawFd);
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Worst gap between ticks of a 1 ms interval while `drain` empties a
/// prefilled inproc queue on the same current_thread runtime.
async fn worst_stall<F: std::future::Future<Output = ()> + 'static>(
    drain: F,
) -> (Duration, u64, Duration) {
    let done = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(AtomicU64::new(0));
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = {
        let (done, worst, ticks) = (done.clone(), worst.clone(), ticks.clone());
        tokio::task::spawn_local(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(1));
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            iv.tick().await;
            let mut last = Instant::now();
            while !done.load(Ordering::SeqCst) {
                iv.tick().await;
                let now = Instant::now();
                worst.fetch_max(
                    now.duration_since(last).as_micros() as u64,
                    Ordering::Relaxed,
                );
                last = now;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    tokio::task::yield_now().await;
    let start = Instant::now();
    tokio::task::spawn_local(drain).await.unwrap();
    let elapsed = start.elapsed();
    done.store(true, Ordering::SeqCst);
    ticker.await.unwrap();
    (
        Duration::from_micros(worst.load(Ordering::Relaxed)),
        ticks.load(Ordering::Relaxed),
        elapsed,
    )
}

fn stall_flowctl(n: usize) -> (Duration, u64, Duration) {
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt(), async {
        let ctx = Context::new();
        let mut tx = ZmqSocket::builder(SocketType::Push)
            .context(&ctx)
            .send_hwm(0)
            .bind("inproc://stall")
            .build()
            .unwrap()
            .into_sink();
        let mut rx = ZmqSocket::builder(SocketType::Pull)
            .context(&ctx)
            .recv_hwm(0)
            .connect("inproc://stall")
            .build()
            .unwrap()
            .into_source();
        let m = Bytes::from_static(&[1u8; 100]);
        for _ in 0..n {
            tx.send(m.clone().into()).await.unwrap();
        }
        worst_stall(async move {
            for _ in 0..n {
                rx.recv().await.unwrap();
            }
        })
        .await
    })
}

/// Baseline: the same timer next to a task that only yields, for as long as
/// `dur`: the stall the machine and tokio's scheduler cause without any zmq.
fn stall_baseline(dur: Duration) -> (Duration, u64, Duration) {
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt(), async {
        worst_stall(async move {
            let start = Instant::now();
            while start.elapsed() < dur {
                tokio::task::yield_now().await;
            }
        })
        .await
    })
}

fn stall_raw(n: usize) -> (Duration, u64, Duration) {
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt(), async {
        let ctx = zmq::Context::new();
        let push = ctx.socket(zmq::PUSH).unwrap();
        push.set_sndhwm(0).unwrap();
        push.bind("inproc://stall-raw").unwrap();
        let pull = ctx.socket(zmq::PULL).unwrap();
        pull.set_rcvhwm(0).unwrap();
        pull.connect("inproc://stall-raw").unwrap();
        for _ in 0..n {
            push.send(&[1u8; 100][..], 0).unwrap();
        }
        worst_stall(async move {
            // SAFETY: the fd is `pull`'s ZMQ_FD, open while `pull` lives;
            // `afd` is dropped first, at the end of this block.
            let afd = unsafe { AsyncFd::register(Fd(pull.get_fd().unwrap())) }.unwrap();
            let mut got = 0;
            while got < n {
                match pull.recv_bytes(zmq::DONTWAIT) {
                    Ok(_) => got += 1,
                    Err(zmq::Error::EAGAIN) => afd.readable().await.unwrap().clear_ready(),
                    Err(e) => panic!("{e}"),
                }
            }
            drop(afd);
        })
        .await
    })
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let small = args.first().copied().unwrap_or(1_000_000);
    let big = args.get(1).copied().unwrap_or(20_000);
    println!("libzmq {:?}", flowctl_zmq::libzmq_version());
    let json = json_mode();
    if let Some(total) = std::env::var("BENCH_MEM").ok().and_then(|v| v.parse().ok()) {
        // Alone in its process, so that VmHWM is this measurement's own.
        let (peak, before, got) = stalled_consumer(total);
        println!(
            "stalled consumer, {got} x 64 KiB ({:.0} MiB) PUSH->PULL tcp: peak RSS {peak:.1} MiB (before {before:.1} MiB)",
            (got * 64 * 1024) as f64 / (1024.0 * 1024.0)
        );
        if json {
            let name = "mem.zmq.stalled_consumer";
            bench_line(name, "flowctl", 0, peak, "MiB");
            bench_line(
                name,
                "anchor",
                0,
                (got * 64 * 1024) as f64 / (1024.0 * 1024.0),
                "MiB",
            );
        }
        return;
    }
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        // Profiling aid: one side only, e.g. `BENCH_ONLY=send perf record ...`.
        let d = match only.as_str() {
            "both" => flowctl_push_pull(small, 100, true),
            "both1" => flowctl_push_pull(small, 100, false),
            "raw" => raw_push_pull(small, 100),
            other => mixed(small, 100, other == "send"),
        };
        if let Some(st) = SEND_STATS.lock().unwrap().take() {
            println!("sink: {st:?}");
        }
        println!("{only}: {:.0} msg/s", small as f64 / d.as_secs_f64());
        return;
    }
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    println!("best of {rounds} interleaved rounds (the machine is shared; best = least disturbed)");
    for (n, size) in [(small, 100), (big, 64 * 1024)] {
        let mut raw = Duration::MAX;
        let mut ours = Duration::MAX;
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        let mut one = Duration::MAX;
        for round in 0..rounds {
            let (r, o) = (raw_push_pull(n, size), flowctl_push_pull(n, size, true));
            if size == 100 {
                // One `send` per message: the per-call cost the batch saves.
                let o1 = flowctl_push_pull(n, size, false);
                one = one.min(o1);
                if json {
                    let name = "zmq.push_pull.100b.send";
                    bench_line(name, "flowctl", round, rate(o1), "msg/s");
                    bench_line(name, "anchor", round, rate(r), "msg/s");
                }
            }
            if json {
                let (name, unit, scale) = if size == 100 {
                    ("zmq.push_pull.100b", "msg/s", 1.0)
                } else {
                    ("zmq.push_pull.64kib", "MB/s", size as f64 / 1e6)
                };
                bench_line(name, "flowctl", round, rate(o) * scale, unit);
                bench_line(name, "anchor", round, rate(r) * scale, unit);
            }
            raw = raw.min(r);
            ours = ours.min(o);
        }
        println!(
            "PUSH->PULL tcp {n} x {size} B: raw blocking zmq {:.0} msg/s ({:.1} MB/s) | flowctl-zmq {:.0} msg/s ({:.1} MB/s) | ratio {:.2}",
            rate(raw),
            rate(raw) * size as f64 / 1e6,
            rate(ours),
            rate(ours) * size as f64 / 1e6,
            raw.as_secs_f64() / ours.as_secs_f64()
        );
        if size == 100 {
            println!(
                "  with one `send` per message instead of `send_many`: flowctl-zmq {:.0} msg/s | ratio {:.2}",
                rate(one),
                raw.as_secs_f64() / one.as_secs_f64()
            );
        }
    }
    if std::env::var_os("BENCH_MIXED").is_some() {
        let rate = |d: Duration| small as f64 / d.as_secs_f64();
        println!(
            "mixed {small} x 100 B: flowctl PUSH -> raw PULL {:.0} msg/s | raw PUSH -> flowctl PULL {:.0} msg/s",
            rate(mixed(small, 100, true)),
            rate(mixed(small, 100, false))
        );
    }
    let n = args.get(2).copied().unwrap_or(1_000_000);
    // A run in which the timer never ticked (the raw loop's drain never
    // yields) was one stall as long as the run: count it so.
    let ms = |w: Duration, ticks: u64, elapsed: Duration| {
        if ticks == 0 { elapsed } else { w }.as_secs_f64() * 1e3
    };
    for round in 0..if json { rounds } else { 1 } {
        let (w, t, e) = stall_flowctl(n);
        println!(
            "always-ready PULL ({n} x 100 B inproc), 1 ms timer: flowctl worst stall {w:?}, {t} ticks in {e:?}"
        );
        let flowctl = ms(w, t, e);
        let (w, t, e) = stall_baseline(e);
        println!(
            "baseline (a task that only yields, same time), 1 ms timer: worst stall {w:?}, {t} ticks in {e:?}"
        );
        let baseline = ms(w, t, e);
        let (w, t, e) = stall_raw(n);
        println!(
            "always-ready PULL ({n} x 100 B inproc), 1 ms timer: raw AsyncFd loop worst stall {w:?}, {t} ticks in {e:?}"
        );
        if json {
            bench_line("fair.zmq.timer_stall", "flowctl", round, flowctl, "ms");
            bench_line("fair.zmq.timer_stall", "baseline", round, baseline, "ms");
            bench_line("fair.zmq.timer_stall", "anchor", round, ms(w, t, e), "ms");
        }
    }
}
