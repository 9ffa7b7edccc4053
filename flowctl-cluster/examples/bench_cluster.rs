//! Side-by-side harness: JetStream pull-consumer throughput of flowctl's
//! `PullSource` against raw async-nats, core subscription throughput of
//! flowctl's `CoreSource` against a raw `async_nats::Client::subscribe`, and
//! the time to resume after the SIGKILL or SIGSTOP of the consumer's node.
//! Starts its own 3-node cluster on 127.0.0.1.
//!
//! `cargo run --release -p flowctl-cluster --example bench_cluster [messages] [size] [--json] [--no-failover] [--resume-only] [--kill-only]`
//!
//! - Core subscriptions are at most once: a publisher faster than the
//!   subscriber overruns its channel and async-nats drops messages. Both sides
//!   therefore read from the same flow-controlled publisher (a raw client on
//!   another node, at most 2048 messages ahead of what the subscriber has
//!   received, flushed every 256), and a round counts only if every message
//!   arrived; lost messages are printed.
//! - `--json` or `FLOWCTL_BENCH_JSON=1`: also one `BENCH {json}` line per
//!   throughput round and side, for `cargo xtask bench`.
//! - `--no-failover` or `BENCH_NO_FAILOVER=1`: stop after the throughput
//!   rounds (the 8 failover rounds take minutes).
//! - `--resume-only`: only the failover rounds; `BENCH_RESUME_ROUNDS=K`
//!   (default 2) rounds per fault and side; `--kill-only`: no SIGSTOP rounds
//!   (async-nats's side waits 60 s in each).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{consumer, stream};
use bytes::Bytes;
use flowctl_cluster::{Cluster, ClusterConfig, ConsumeOptions, PublishOptions};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::prelude::*;
use flowctl_core::{Fairness, FlowError};
use futures::StreamExt;
use tokio::sync::{Notify, oneshot};

use flowctl_cluster::testing::{NatsCluster, READY_LIMIT};

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn connect(seeds: Vec<String>) -> Result<Cluster, FlowError> {
    let mut cfg = ClusterConfig::new(seeds);
    cfg.ledger = Ledger::new();
    Cluster::connect(cfg).await
}

async fn make_stream(c: &Cluster, name: &str, subject: &str) -> BoxResult<()> {
    c.jetstream()
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await?;
    Ok(())
}

async fn make_consumer(
    c: &Cluster,
    stream: &str,
    durable: &str,
    ack_wait: Duration,
) -> BoxResult<()> {
    c.jetstream()
        .create_consumer_on_stream(
            consumer::pull::Config {
                durable_name: Some(durable.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_ack_pending: 10_000,
                ..Default::default()
            },
            stream,
        )
        .await?;
    Ok(())
}

async fn publish(c: &Cluster, subject: &str, from: u64, to: u64, size: usize) -> BoxResult<()> {
    let mut sink = c.publisher(subject, PublishOptions::default()).await?;
    for i in from..to {
        let mut p = vec![0u8; size.max(8)];
        p[..8].copy_from_slice(&i.to_be_bytes());
        sink.send(Bytes::from(p)).await?;
    }
    sink.close().await?;
    Ok(())
}

async fn raw_read(c: &Cluster, stream: &str, durable: &str, n: u64) -> BoxResult<Duration> {
    let st = c.jetstream().get_stream(stream).await?;
    let cons: consumer::PullConsumer = st.get_consumer(durable).await?;
    let t = Instant::now();
    let mut msgs = cons.stream().max_messages_per_batch(256).messages().await?;
    let mut got = 0;
    while got < n {
        let m = msgs.next().await.ok_or("raw stream ended")??;
        m.ack().await?;
        got += 1;
    }
    Ok(t.elapsed())
}

async fn flow_read(c: &Cluster, stream: &str, durable: &str, n: u64) -> BoxResult<Duration> {
    let t = Instant::now();
    let mut src = c
        .consume(stream, durable, ConsumeOptions::default())
        .await?;
    let mut got = 0;
    let mut buf = Vec::with_capacity(256);
    while got < n {
        buf.clear();
        let k = src.recv_many(&mut buf, 256).await?;
        if k == 0 {
            return Err("flowctl source ended".into());
        }
        got += k as u64;
    }
    Ok(t.elapsed())
}

/// Messages per publisher batch (one flush each) in the core subscription runs.
const CORE_BATCH: u64 = 256;
/// `subscription_capacity` of both subscribers (flowctl's default).
const CORE_CAPACITY: usize = 4096;
/// Messages the core publisher may be ahead of the subscriber: half the
/// subscription channel, so a flow-controlled run drops nothing.
const CORE_WINDOW: u64 = 2048;
/// The publisher gives up waiting for the subscriber after this long without
/// progress (messages were lost: core NATS is at most once).
const CORE_STALL: Duration = Duration::from_secs(3);

/// What the subscriber tells the publisher.
#[derive(Debug, Default)]
struct Flow {
    /// Measured messages received so far.
    received: AtomicU64,
    /// A probe arrived: the subscription's interest reached the publisher's node.
    warm: AtomicBool,
    /// Woken on every received message.
    notify: Notify,
}

/// How one core subscription round ended.
#[derive(Debug)]
struct CoreRun {
    received: u64,
    /// From the first measured publish to the last message received.
    elapsed: Duration,
    /// Drops the client reported (a lower bound: async-nats's event channel
    /// drops reports too): flowctl's `CoreSource::dropped`, or the raw
    /// client's `Event::SlowConsumer` count.
    reported: u64,
}

/// The one publisher of both sides: a raw async-nats client on node 0 that
/// publishes empty probes until the subscriber (on node 1) sees one, then `n`
/// messages of `size` bytes in flushed batches of [`CORE_BATCH`], never more
/// than [`CORE_WINDOW`] ahead of what the subscriber received. Returns the
/// instant the measured publishing started; `give_up` fires if the subscriber stalls (lost messages).
async fn core_publish(
    client: async_nats::Client,
    subject: String,
    n: u64,
    size: usize,
    flow: Arc<Flow>,
    give_up: oneshot::Sender<()>,
) -> BoxResult<Instant> {
    let subject = async_nats::Subject::from(subject);
    let probe_until = Instant::now() + Duration::from_secs(30);
    while !flow.warm.load(Ordering::Acquire) {
        if Instant::now() > probe_until {
            return Err("the subscription's interest did not reach node 0 within 30 s".into());
        }
        client.publish(subject.clone(), Bytes::new()).await?;
        client.flush().await?;
        // Probe pace; the loop ends on the subscriber's signal, not on time.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let payload = Bytes::from(vec![0xa5u8; size]);
    let start = Instant::now();
    let mut flow_controlled = true;
    let mut sent = 0;
    while sent < n {
        let batch = CORE_BATCH.min(n - sent);
        while flow_controlled {
            let notified = flow.notify.notified();
            if sent + batch <= flow.received.load(Ordering::Acquire) + CORE_WINDOW {
                break;
            }
            if tokio::time::timeout(CORE_STALL, notified).await.is_err() {
                flow_controlled = false; // messages were lost; publish the rest
            }
        }
        for _ in 0..batch {
            client.publish(subject.clone(), payload.clone()).await?;
        }
        client.flush().await?;
        sent += batch;
    }
    // Wait for the last messages; give up after CORE_STALL without progress.
    loop {
        let notified = flow.notify.notified();
        let before = flow.received.load(Ordering::Acquire);
        if before >= n {
            break;
        }
        if tokio::time::timeout(CORE_STALL, notified).await.is_err()
            && flow.received.load(Ordering::Acquire) == before
        {
            let _ = give_up.send(());
            break;
        }
    }
    Ok(start)
}

/// Counts one received message of the subscriber; true when all `n` are in.
fn core_count(flow: &Flow, payload: &Bytes, got: &mut u64, n: u64) -> bool {
    if payload.is_empty() {
        flow.warm.store(true, Ordering::Release);
        return false;
    }
    *got += 1;
    flow.received.store(*got, Ordering::Release);
    flow.notify.notify_one();
    *got == n
}

/// One round of core subscription throughput: `raw` subscribes with
/// `async_nats::Client::subscribe` (same `subscription_capacity` as flowctl),
/// else with flowctl's `Cluster::subscribe` read by `recv_many(256)`.
async fn core_round(
    nats: &NatsCluster,
    raw: bool,
    tag: &str,
    n: u64,
    size: usize,
) -> BoxResult<CoreRun> {
    let subject = format!("core.{tag}");
    let flow = Arc::new(Flow::default());
    let (give_up_tx, mut give_up) = oneshot::channel::<()>();
    let publisher = async_nats::connect(nats.url(0)).await?;
    let mut got = 0u64;
    let reported;
    let mut end = None;
    // Subscribe first, then start the publisher: its probes wait for the
    // interest to cross the route from node 1 to node 0.
    let start_publisher = |flow: Arc<Flow>| {
        tokio::spawn(core_publish(
            publisher.clone(),
            subject.clone(),
            n,
            size,
            flow,
            give_up_tx,
        ))
    };
    let publishing = if raw {
        let slow = Arc::new(AtomicU64::new(0));
        let slow_cb = slow.clone();
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(CORE_CAPACITY)
            .event_callback(move |event| {
                if let async_nats::Event::SlowConsumer(_) = event {
                    slow_cb.fetch_add(1, Ordering::Relaxed);
                }
                async {}
            })
            .connect(nats.url(1))
            .await?;
        let mut sub = client.subscribe(subject.clone()).await?;
        client.flush().await?;
        let publishing = start_publisher(flow.clone());
        loop {
            tokio::select! {
                biased;
                m = sub.next() => {
                    let m = m.ok_or("raw subscription ended")?;
                    if core_count(&flow, &m.payload, &mut got, n) {
                        end = Some(Instant::now());
                        break;
                    }
                }
                _ = &mut give_up => break,
            }
        }
        reported = slow.load(Ordering::Relaxed);
        publishing
    } else {
        let mut cfg = ClusterConfig::new([nats.url(1)]);
        cfg.ledger = Ledger::new();
        cfg.subscription_capacity = CORE_CAPACITY;
        let cluster = Cluster::connect(cfg).await?;
        let mut src = cluster.subscribe(&subject, Fairness::default()).await?;
        cluster.client().flush().await?;
        let publishing = start_publisher(flow.clone());
        let mut buf = Vec::with_capacity(256);
        'outer: loop {
            buf.clear();
            tokio::select! {
                biased;
                r = src.recv_many(&mut buf, 256) => match r {
                    Ok(0) => return Err("flowctl subscription ended".into()),
                    Ok(_) => {
                        for m in &buf {
                            if core_count(&flow, &m.payload, &mut got, n) {
                                end = Some(Instant::now());
                                break 'outer;
                            }
                        }
                    }
                    Err(e) => {
                        // `recv_many` may have put messages in `buf` before the error.
                        for m in &buf {
                            if core_count(&flow, &m.payload, &mut got, n) {
                                end = Some(Instant::now());
                                break 'outer;
                            }
                        }
                        // SlowConsumer: not terminal, the next call goes on.
                        tracing::debug!("flowctl subscription error (continuing): {e}");
                    }
                },
                _ = &mut give_up => break,
            }
        }
        reported = src.dropped();
        publishing
    };
    let start = publishing.await??;
    let elapsed = end.unwrap_or_else(Instant::now) - start;
    Ok(CoreRun {
        received: got,
        elapsed,
        reported,
    })
}

/// Consumer on a node that leads nothing; SIGKILL it after `n/4` messages;
/// the time until the first message published after the kill arrives.
async fn resume(nats: &mut NatsCluster, raw: bool, freeze: bool, tag: &str) -> BoxResult<Duration> {
    let n: u64 = 20_000;
    let admin = connect(nats.urls()).await?;
    let name = format!("RES{tag}");
    let subject = format!("res{tag}.x");
    make_stream(&admin, &name, &subject).await?;
    make_consumer(&admin, &name, "c", Duration::from_secs(2)).await?;
    let mut st = admin.jetstream().get_stream(&name).await?;
    let sl = st
        .info()
        .await?
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .unwrap_or_default();
    let cl = st
        .consumer_info("c")
        .await?
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .unwrap_or_default();
    let node = (0..3)
        .find(|i| format!("n{i}") != sl && format!("n{i}") != cl)
        .unwrap_or(0);
    let mut seeds = vec![nats.url(node)];
    seeds.extend((0..3).filter(|i| *i != node).map(|i| nats.url(i)));
    let consumer = connect(seeds).await?;
    let producer = connect((0..3).filter(|i| *i != node).map(|i| nats.url(i)).collect()).await?;
    // One sink for both halves: creating one needs the meta leader, which
    // may be the node we kill.
    let mut sink = producer
        .publisher(&subject, PublishOptions::default())
        .await?;
    for i in 0..n / 2 {
        sink.send(Bytes::from(i.to_be_bytes().to_vec())).await?;
    }
    sink.flush().await?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let prod = tokio::spawn(async move {
        let _ = rx.await;
        for i in n / 2..n {
            sink.send(Bytes::from(i.to_be_bytes().to_vec())).await?;
        }
        sink.close().await?;
        drop(producer);
        Ok::<_, FlowError>(())
    });
    let mut killed_at = None;
    let mut tx = Some(tx);
    let mut seen = 0u64;
    let seen_now = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen_c = seen_now.clone();
    let mut on_msg = |idx: u64, nats: &mut NatsCluster| -> Option<Duration> {
        seen += 1;
        seen_c.store(seen, std::sync::atomic::Ordering::Relaxed);
        if seen == n / 4 {
            let faulted = if freeze {
                nats.freeze(node)
            } else {
                nats.kill_blocking(node)
            };
            if let Err(e) = faulted {
                eprintln!("  could not fault n{node}: {e}");
            }
            killed_at = Some(Instant::now());
            if let Some(tx) = tx.take() {
                let _ = tx.send(());
            }
        }
        match killed_at {
            Some(k) if idx >= n / 2 => Some(k.elapsed()),
            _ => None,
        }
    };
    let limit = Instant::now() + Duration::from_secs(60);
    let result = if raw {
        // async-nats with its defaults (60 s pings), as an application would.
        let client = async_nats::ConnectOptions::new()
            .retain_servers_order() // on the node we fault, like flowctl's consumer
            .connect(
                std::iter::once(node)
                    .chain((0..3).filter(|i| *i != node))
                    .map(|i| nats.url(i).parse::<async_nats::ServerAddr>())
                    .collect::<Result<Vec<_>, _>>()?,
            )
            .await?;
        let js = async_nats::jetstream::new(client);
        let st = js.get_stream(&name).await?;
        let cons: consumer::PullConsumer = st.get_consumer("c").await?;
        let mut msgs = cons.messages().await?;
        loop {
            let m = match tokio::time::timeout_at(limit.into(), msgs.next()).await {
                Err(_) => break Err("raw consumer did not resume within 60 s".into()),
                Ok(None) => break Err("raw stream ended".into()),
                Ok(Some(Err(e))) => {
                    eprintln!("  raw consumer error (continuing): {e}");
                    continue;
                }
                Ok(Some(Ok(m))) => m,
            };
            let _ = m.ack().await;
            let idx = u64::from_be_bytes(m.payload[..8].try_into()?);
            if let Some(d) = on_msg(idx, nats) {
                break Ok(d);
            }
        }
    } else {
        let mut src = consumer
            .consume(&name, "c", ConsumeOptions::default())
            .await?;
        loop {
            let m = match tokio::time::timeout_at(limit.into(), src.recv()).await {
                Err(_) => {
                    break Err(format!(
                        "flowctl consumer did not resume within 60 s: seen {}, {:?}, state {:?}, reconnects {}",
                        seen_now.load(std::sync::atomic::Ordering::Relaxed),
                        src.pull_stats(),
                        consumer.client().connection_state(),
                        consumer.reconnects()
                    )
                    .into());
                }
                Ok(r) => r?.ok_or("flowctl source ended")?,
            };
            let idx = u64::from_be_bytes(m.payload[..8].try_into()?);
            if let Some(d) = on_msg(idx, nats) {
                // What the resume waited for: lost deliveries (held back
                // until redelivered after the consumer's ack_wait), demand
                // resets, requests voided by a probe.
                eprintln!("  flowctl pull source: {:?}", src.pull_stats());
                break Ok(d);
            }
        }
    };
    if let Ok(Err(e)) = prod.await {
        eprintln!("  producer failed: {e}");
    }
    nats.kill(node).await?;
    nats.restart(node)?;
    nats.wait_ready(READY_LIMIT).await?;
    result
}

/// Throughput rounds per side: pull, core subscription.
const PULL_ROUNDS: usize = 2;
const CORE_ROUNDS: usize = 5;

/// `--json` or `FLOWCTL_BENCH_JSON=1`: print `BENCH` lines for `cargo xtask bench`.
fn json_lines() -> bool {
    std::env::args().any(|a| a == "--json") || std::env::var_os("FLOWCTL_BENCH_JSON").is_some()
}

/// `--no-failover` or `BENCH_NO_FAILOVER=1`: throughput rounds only.
fn no_failover() -> bool {
    std::env::args().any(|a| a == "--no-failover")
        || std::env::var_os("BENCH_NO_FAILOVER").is_some_and(|v| v != "0")
}

/// One machine-readable figure (see flowctl-bench's bench-report).
fn bench_line(name: &str, raw: bool, round: usize, value: f64) {
    if json_lines() {
        let side = if raw { "anchor" } else { "flowctl" };
        println!(
            "BENCH {{\"name\":\"{name}\",\"side\":\"{side}\",\"round\":{round},\"value\":{value:.1},\"unit\":\"msg/s\"}}"
        );
    }
}

fn side(raw: bool) -> &'static str {
    if raw { "async-nats" } else { "flowctl" }
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with("--"));
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(128);
    if size == 0 {
        return Err("size must be at least 1 byte (empty messages are the core probes)".into());
    }
    let mut nats = NatsCluster::start().await?;
    if std::env::args().any(|a| a == "--resume-only") {
        return resume_rounds(&mut nats).await;
    }
    let admin = connect(nats.urls()).await?;
    make_stream(&admin, "BENCH", "bench.x").await?;
    let t = Instant::now();
    publish(&admin, "bench.x", 0, n, size).await?;
    let p = t.elapsed();
    println!(
        "publish (flowctl Publisher, R3, {size} B): {n} msgs in {p:.2?} = {:.0} msg/s",
        n as f64 / p.as_secs_f64()
    );
    for round in 0..PULL_ROUNDS {
        for raw in [true, false] {
            let durable = format!("{}{round}", if raw { "raw" } else { "flow" });
            make_consumer(&admin, "BENCH", &durable, Duration::from_secs(30)).await?;
            let reader = connect(nats.urls()).await?;
            let d = if raw {
                raw_read(&reader, "BENCH", &durable, n).await?
            } else {
                flow_read(&reader, "BENCH", &durable, n).await?
            };
            let rate = n as f64 / d.as_secs_f64();
            println!(
                "pull R3 {size} B, round {round}, {:8}: {rate:>9.0} msg/s ({n} in {d:.2?})",
                side(raw)
            );
            bench_line(&format!("cluster.pull.r3_{size}b"), raw, round, rate);
        }
    }
    drop(admin);
    for round in 0..CORE_ROUNDS {
        for raw in [true, false] {
            let tag = format!("{}{round}", if raw { "raw" } else { "flow" });
            let run = core_round(&nats, raw, &tag, n, size).await?;
            let rate = n as f64 / run.elapsed.as_secs_f64();
            let lost = n - run.received;
            if lost == 0 {
                println!(
                    "core sub {size} B, round {round}, {:8}: {rate:>9.0} msg/s ({n} in {:.2?}, 0 lost)",
                    side(raw),
                    run.elapsed,
                );
                bench_line(&format!("cluster.core_sub.{size}b"), raw, round, rate);
            } else {
                println!(
                    "core sub {size} B, round {round}, {:8}: not counted: {lost} of {n} messages lost \
                     ({} drops reported by the client)",
                    side(raw),
                    run.reported
                );
            }
        }
    }
    if no_failover() {
        return Ok(());
    }
    resume_rounds(&mut nats).await
}

/// The failover rounds: SIGKILL, then SIGSTOP, of the consumer's node.
async fn resume_rounds(nats: &mut NatsCluster) -> BoxResult<()> {
    let rounds: usize = std::env::var("BENCH_RESUME_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut i = 0;
    let faults: &[bool] = if std::env::args().any(|a| a == "--kill-only") {
        &[false]
    } else {
        &[false, true]
    };
    for &freeze in faults {
        for _ in 0..rounds {
            for raw in [false, true] {
                i += 1;
                let d = resume(nats, raw, freeze, &i.to_string()).await;
                println!(
                    "resume after {} of the consumer's node ({}): {:?}",
                    if freeze { "SIGSTOP (hung)" } else { "SIGKILL" },
                    if raw {
                        "async-nats defaults, messages()"
                    } else {
                        "flowctl"
                    },
                    d.map_err(|e| e.to_string())
                );
            }
        }
    }
    Ok(())
}
