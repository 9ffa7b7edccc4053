//! Criterion benches of `flowctl-core`, each measured side by side with its
//! anchor in the same run: the groups become the `core.*` rows of
//! `cargo xtask bench`. See the crate README for what each group answers.
#![allow(missing_docs)] // criterion_main! generates an undocumented `main`.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use flowctl_bench::{current_thread, fnv1a_rounds, length_delimited_chunks, multi_thread, payload};
use flowctl_core::compat::StreamSource;
use flowctl_core::frame::Framed;
use flowctl_core::offload::{Offload, ordered};
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{
    Fairness, FlowError, FlowStats, Source, SourceExt, Watermarks, Weighted, pipe_with,
};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

/// Items per iteration of the per-item groups.
const ITEMS: usize = 100_000;
/// Size of a small item.
const SMALL: usize = 64;
/// Size of a large chunk.
const CHUNK: usize = 64 * 1024;
/// Bytes per iteration of the bulk groups.
const BULK: usize = 64 * 1024 * 1024;
/// Batch size of the `recv_many` variants.
const BATCH: usize = 64;

/// Shared settings: iterations take milliseconds, so few flat samples suffice.
fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g
}

/// Times `iters` runs of `make()` on `rt`, each run spawned as a task so that
/// tokio's coop budget applies as it does in an application.
fn run<F, Fut>(rt: &Runtime, iters: u64, mut make: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let fut = make();
        let start = Instant::now();
        rt.block_on(async { tokio::spawn(fut).await.expect("bench task panicked") });
        total += start.elapsed();
    }
    total
}

// ---------------------------------------------------------------- pipe_vs_mpsc

/// `name`: a named pipe reports every charge and credit to the installed
/// metrics recorder (`metrics_overhead`); an unnamed one reports nothing.
async fn flowctl_items(wm: Watermarks, batch: usize, name: Option<&'static str>) {
    let builder = flowctl_core::PipeBuilder::new(wm);
    let builder = match name {
        Some(name) => builder.name(name),
        None => builder,
    };
    let (mut tx, mut rx) = builder.build::<Bytes>();
    let item = payload(SMALL);
    let producer = tokio::spawn(async move {
        for _ in 0..ITEMS {
            tx.send(item.clone()).await.expect("pipe send");
        }
    });
    let mut n = 0;
    if batch == 1 {
        while let Some(b) = rx.recv().await.expect("pipe recv") {
            n += b.len();
        }
    } else {
        let mut buf = Vec::with_capacity(batch);
        while rx.recv_many(&mut buf, batch).await.expect("pipe recv_many") > 0 {
            n += buf.drain(..).map(|b| b.len()).sum::<usize>();
        }
    }
    producer.await.expect("producer");
    assert_eq!(n, ITEMS * SMALL);
}

async fn mpsc_items(capacity: usize, batch: usize) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(capacity);
    let item = payload(SMALL);
    let producer = tokio::spawn(async move {
        for _ in 0..ITEMS {
            tx.send(item.clone()).await.expect("mpsc send");
        }
    });
    let mut n = 0;
    if batch == 1 {
        while let Some(b) = rx.recv().await {
            n += b.len();
        }
    } else {
        let mut buf = Vec::with_capacity(batch);
        while rx.recv_many(&mut buf, batch).await > 0 {
            n += buf.drain(..).map(|b| b.len()).sum::<usize>();
        }
    }
    producer.await.expect("producer");
    assert_eq!(n, ITEMS * SMALL);
}

fn pipe_vs_mpsc(c: &mut Criterion) {
    let wm = Watermarks::default();
    // Same memory bound: the pipe holds `high` bytes of 64-byte items.
    let capacity = wm.high() / SMALL;
    let mut g = configure(c, "pipe_vs_mpsc");
    g.throughput(Throughput::Elements(ITEMS as u64));
    for (flavor, rt) in [("mt2", multi_thread(2)), ("ct", current_thread())] {
        for (name, batch) in [("per_item", 1), ("recv_many", BATCH)] {
            g.bench_function(format!("flowctl_{name}/{flavor}"), |b| {
                b.iter_custom(|iters| run(&rt, iters, || flowctl_items(wm, batch, None)));
            });
            g.bench_function(format!("mpsc_{name}/{flavor}"), |b| {
                b.iter_custom(|iters| run(&rt, iters, || mpsc_items(capacity, batch)));
            });
        }
    }
    g.finish();
}

// -------------------------------------------------------------- pipe_vs_duplex

/// The producer copies each chunk out of `data` (as a socket read would), the
/// consumer copies it into its own buffer (as a socket write would): the same
/// two copies `duplex` makes. `zero_copy` sends refcounted clones instead and
/// only touches the length.
async fn flowctl_bulk(wm: Watermarks, zero_copy: bool) -> usize {
    let (mut tx, mut rx) = pipe_with::<Bytes>(wm, Fairness::default());
    let data = payload(CHUNK);
    let producer = tokio::spawn(async move {
        for _ in 0..BULK / CHUNK {
            let chunk = if zero_copy {
                data.clone()
            } else {
                Bytes::copy_from_slice(&data)
            };
            tx.send(chunk).await.expect("pipe send");
        }
    });
    let mut out = vec![0u8; CHUNK];
    let mut n = 0;
    while let Some(chunk) = rx.recv().await.expect("pipe recv") {
        if !zero_copy {
            out[..chunk.len()].copy_from_slice(&chunk);
        }
        n += chunk.len();
    }
    producer.await.expect("producer");
    assert_eq!(n, BULK);
    std::hint::black_box(out[0]);
    n
}

async fn duplex_bulk(max_buf: usize) {
    let (mut w, mut r) = tokio::io::duplex(max_buf);
    let data = payload(CHUNK);
    let producer = tokio::spawn(async move {
        for _ in 0..BULK / CHUNK {
            w.write_all(&data).await.expect("duplex write");
        }
        w.shutdown().await.expect("duplex shutdown");
    });
    let mut out = vec![0u8; CHUNK];
    let mut n = 0;
    loop {
        let k = r.read(&mut out).await.expect("duplex read");
        if k == 0 {
            break;
        }
        n += k;
    }
    producer.await.expect("producer");
    assert_eq!(n, BULK);
}

fn pipe_vs_duplex(c: &mut Criterion) {
    let wm = Watermarks::default();
    let rt = multi_thread(2);
    let mut g = configure(c, "pipe_vs_duplex");
    g.throughput(Throughput::Bytes(BULK as u64));
    g.bench_function("flowctl", |b| {
        b.iter_custom(|iters| {
            run(&rt, iters, || async move {
                flowctl_bulk(wm, false).await;
            })
        });
    });
    g.bench_function("flowctl_zero_copy", |b| {
        b.iter_custom(|iters| {
            run(&rt, iters, || async move {
                flowctl_bulk(wm, true).await;
            })
        });
    });
    g.bench_function("duplex", |b| {
        b.iter_custom(|iters| run(&rt, iters, || duplex_bulk(wm.high())));
    });
    g.finish();
}

// ----------------------------------------------------------- fairness_overhead

/// A foreign source that is always ready and never yields: the PyZMQ failure.
struct Unfair {
    item: Bytes,
    left: usize,
}

impl Source for Unfair {
    type Item = Bytes;

    fn poll_recv(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Bytes>, FlowError>> {
        if self.left == 0 {
            return std::task::Poll::Ready(Ok(None));
        }
        self.left -= 1;
        std::task::Poll::Ready(Ok(Some(self.item.clone())))
    }

    fn stats(&self) -> FlowStats {
        FlowStats::empty(Watermarks::default())
    }
}

async fn drain<S: Source<Item = Bytes>>(mut src: S) {
    let mut n = 0;
    while let Some(b) = src.recv().await.expect("recv") {
        n += b.weight();
    }
    assert_eq!(n, ITEMS * SMALL);
}

async fn pipe_fair(fairness: Fairness) {
    let (mut tx, mut rx) = pipe_with::<Bytes>(Watermarks::default(), fairness);
    let item = payload(SMALL);
    let producer = tokio::spawn(async move {
        for _ in 0..ITEMS {
            tx.send(item.clone()).await.expect("pipe send");
        }
    });
    let mut n = 0;
    while let Some(b) = rx.recv().await.expect("pipe recv") {
        n += b.len();
    }
    producer.await.expect("producer");
    assert_eq!(n, ITEMS * SMALL);
}

fn always_ready() -> impl futures::Stream<Item = Bytes> + Unpin + Send + 'static {
    futures::stream::repeat(payload(SMALL)).take(ITEMS)
}

fn fairness_overhead(c: &mut Criterion) {
    let coop_only = Fairness::new(usize::MAX, usize::MAX).expect("valid fairness");
    let mt = multi_thread(2);
    let ct = current_thread();
    let mut g = configure(c, "fairness_overhead");
    g.throughput(Throughput::Elements(ITEMS as u64));
    g.bench_function("pipe_default/mt2", |b| {
        b.iter_custom(|iters| run(&mt, iters, || pipe_fair(Fairness::default())));
    });
    g.bench_function("pipe_coop_only/mt2", |b| {
        b.iter_custom(|iters| run(&mt, iters, || pipe_fair(coop_only)));
    });
    g.bench_function("stream_default/ct", |b| {
        b.iter_custom(|iters| run(&ct, iters, || drain(StreamSource::new(always_ready()))));
    });
    g.bench_function("stream_coop_only/ct", |b| {
        b.iter_custom(|iters| {
            run(&ct, iters, || {
                drain(StreamSource::with_fairness(always_ready(), coop_only))
            })
        });
    });
    // The default item limit is tokio's own coop budget (128 operations);
    // half of it, the default until 2026-11-22, shows what yielding twice as
    // often costs.
    let items_64 = Fairness::new(64, Fairness::default().max_bytes()).expect("valid fairness");
    g.bench_function("stream_items64/ct", |b| {
        b.iter_custom(|iters| {
            run(&ct, iters, || {
                drain(StreamSource::with_fairness(always_ready(), items_64))
            })
        });
    });
    let unfair = || Unfair {
        item: payload(SMALL),
        left: ITEMS,
    };
    g.bench_function("foreign_unfair/ct", |b| {
        b.iter_custom(|iters| run(&ct, iters, || drain(unfair())));
    });
    // The wrapper with a slice that never runs out (tokio's coop budget still
    // applies, so it yields every 128 items all the same): the cost of the
    // wrapper's per-item accounting without its own forced yields.
    g.bench_function("foreign_fair_unlimited/ct", |b| {
        b.iter_custom(|iters| run(&ct, iters, || drain(unfair().fair(coop_only))));
    });
    g.bench_function("foreign_fair/ct", |b| {
        b.iter_custom(|iters| run(&ct, iters, || drain(unfair().fair(Fairness::default()))));
    });
    // No coop budget at all (as outside a tokio runtime): the forced yields
    // must not spend their time looking for the end of an endless budget.
    g.bench_function("foreign_fair_unconstrained/ct", |b| {
        b.iter_custom(|iters| {
            run(&ct, iters, || {
                tokio::task::unconstrained(drain(unfair().fair(Fairness::default())))
            })
        });
    });
    g.finish();
}

// --------------------------------------------------------------------- offload

/// Frames per iteration of the offload group.
const OFFLOAD_FRAMES: usize = 64;
/// FNV rounds per 64 KiB frame: about 100 µs of CPU on one core.
const HASH_ROUNDS: usize = 1;

fn frames() -> impl futures::Stream<Item = Bytes> + Unpin + Send + 'static {
    futures::stream::repeat(payload(CHUNK)).take(OFFLOAD_FRAMES)
}

fn hash(frame: Bytes) -> u64 {
    fnv1a_rounds(&frame, HASH_ROUNDS)
}

fn offload(c: &mut Criterion) {
    let rt = multi_thread(2);
    let mut g = configure(c, "offload");
    g.throughput(Throughput::Bytes((OFFLOAD_FRAMES * CHUNK) as u64));
    g.bench_function("inline", |b| {
        b.iter_custom(|iters| {
            run(&rt, iters, || async {
                let mut src = StreamSource::new(frames());
                let mut acc = 0u64;
                while let Some(f) = src.recv().await.expect("recv") {
                    acc ^= hash(f);
                }
                std::hint::black_box(acc);
            })
        });
    });
    // The ceiling on this machine right now: two plain threads, no runtime.
    g.bench_function("threads_ideal", |b| {
        let frame = payload(CHUNK);
        b.iter(|| {
            std::thread::scope(|s| {
                let halves = [0, 1].map(|_| {
                    s.spawn(|| {
                        (0..OFFLOAD_FRAMES / 2).fold(0u64, |acc, _| acc ^ hash(frame.clone()))
                    })
                });
                halves.map(|h| h.join().expect("hash thread"))
            })
        });
    });
    g.bench_function("ordered_c2", |b| {
        b.iter_custom(|iters| {
            run(&rt, iters, || async {
                let limits = Offload {
                    concurrency: 2,
                    max_inflight_bytes: 4 * 1024 * 1024,
                };
                let mut src = ordered(StreamSource::new(frames()), limits, hash);
                let mut acc = 0u64;
                while let Some(h) = src.recv().await.expect("recv") {
                    acc ^= h;
                }
                std::hint::black_box(acc);
            })
        });
    });
    g.finish();
}

// ---------------------------------------------------------------------- framed

/// Frames per iteration of the framed group (4 MiB of payload).
const FRAMES: usize = 4096;
const FRAME: usize = 1024;
const FRAME_CHUNK: usize = 4096;

fn framed(c: &mut Criterion) {
    let rt = current_thread();
    let chunks = length_delimited_chunks(FRAMES, FRAME, FRAME_CHUNK);
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut g = configure(c, "framed");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("flowctl", |b| {
        b.iter_custom(|iters| {
            run(&rt, iters, || {
                let src = StreamSource::new(futures::stream::iter(chunks.clone()));
                async move {
                    let mut framed = Framed::new(src, LengthDelimitedCodec::new());
                    let mut n = 0;
                    while let Some(f) = framed.recv().await.expect("decode") {
                        n += f.len();
                    }
                    assert_eq!(n, FRAMES * FRAME);
                }
            })
        });
    });
    g.bench_function("framed_read", |b| {
        b.iter_custom(|iters| {
            run(&rt, iters, || {
                let reader = tokio_util::io::StreamReader::new(futures::stream::iter(
                    chunks.clone().into_iter().map(Ok::<_, std::io::Error>),
                ));
                async move {
                    let mut framed = FramedRead::new(reader, LengthDelimitedCodec::new());
                    let mut n = 0;
                    while let Some(f) = framed.next().await {
                        n += f.expect("decode").len();
                    }
                    assert_eq!(n, FRAMES * FRAME);
                }
            })
        });
    });
    g.finish();
}

// ------------------------------------------------------------------ watermarks

/// The sweep behind `Watermarks::default()`. On two workers the producer and
/// the consumer run in parallel and the watermarks set how often they hand the
/// CPU caches back and forth; on one thread (`ct`) they set how many items each
/// task switch is amortised over.
fn watermarks(c: &mut Criterion) {
    let mut g = configure(c, "watermarks");
    g.throughput(Throughput::Bytes(BULK as u64));
    for (flavor, rt) in [("mt2", multi_thread(2)), ("ct", current_thread())] {
        for high_kib in [64usize, 256, 512, 1024, 4096] {
            let high = high_kib * 1024;
            let wm = Watermarks::new(high / 4, high).expect("valid watermarks");
            let id = BenchmarkId::new(format!("{flavor}/high_kib"), high_kib);
            g.bench_with_input(id, &wm, |b, &wm| {
                b.iter_custom(|iters| {
                    run(&rt, iters, || async move {
                        flowctl_bulk(wm, false).await;
                    })
                });
            });
        }
    }
    g.finish();
}

// ------------------------------------------------------------ metrics_overhead

/// flowctl-core's `metrics` feature on (this crate enables it) and a real
/// recorder installed (metrics-exporter-prometheus, as an application would):
/// a named pipe reports every charge and credit, an unnamed one reports nothing.
fn metrics_overhead(c: &mut Criterion) {
    static RECORDER: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    let handle = RECORDER.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("install the Prometheus recorder")
    });
    let wm = Watermarks::default();
    let mut g = configure(c, "metrics_overhead");
    g.throughput(Throughput::Elements(ITEMS as u64));
    let rt = multi_thread(2);
    let mut named_ran = false;
    g.bench_function("named/mt2", |b| {
        named_ran = true;
        b.iter_custom(|iters| run(&rt, iters, || flowctl_items(wm, 1, Some("bench.pipe"))));
    });
    g.bench_function("unnamed/mt2", |b| {
        b.iter_custom(|iters| run(&rt, iters, || flowctl_items(wm, 1, None)));
    });
    g.finish();
    // The named pipe did report: its items are in the exposition (unless a
    // filter such as `--only core.fairness` left it out).
    assert!(
        !named_ran
            || handle
                .render()
                .contains(r#"flowctl_items_total{stage="bench.pipe"}"#),
        "the named pipe reported nothing"
    );
}

criterion_group!(
    benches,
    pipe_vs_mpsc,
    metrics_overhead,
    pipe_vs_duplex,
    fairness_overhead,
    offload,
    framed,
    watermarks
);
criterion_main!(benches);
