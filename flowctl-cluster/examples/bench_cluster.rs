//! Side-by-side harness: JetStream pull-consumer throughput of flowctl's
//! `PullSource` against raw async-nats, and the time to resume after the
//! SIGKILL of the consumer's node. Starts its own 3-node cluster on 127.0.0.1.
//!
//! `cargo run --release -p flowctl-cluster --example bench_cluster [messages] [size]`

use std::time::{Duration, Instant};

use async_nats::jetstream::{consumer, stream};
use bytes::Bytes;
use flowctl_cluster::{Cluster, ClusterConfig, ConsumeOptions, PublishOptions};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::{FlowError, Sink, Source};
use futures::StreamExt;

#[path = "../tests/it/fixture.rs"]
#[allow(dead_code, unreachable_pub)]
mod fixture;

use fixture::NatsCluster;

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
            if freeze {
                nats.freeze(node);
            } else {
                nats.kill(node);
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
                break Ok(d);
            }
        }
    };
    if let Ok(Err(e)) = prod.await {
        eprintln!("  producer failed: {e}");
    }
    nats.restart(node);
    result
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(128);
    let mut nats = NatsCluster::start();
    let admin = connect(nats.urls()).await?;
    make_stream(&admin, "BENCH", "bench.x").await?;
    let t = Instant::now();
    publish(&admin, "bench.x", 0, n, size).await?;
    let p = t.elapsed();
    println!(
        "publish (flowctl Publisher, R3, {size} B): {n} msgs in {p:.2?} = {:.0} msg/s",
        n as f64 / p.as_secs_f64()
    );
    for round in 0..2 {
        for raw in [true, false] {
            let durable = format!("{}{round}", if raw { "raw" } else { "flow" });
            make_consumer(&admin, "BENCH", &durable, Duration::from_secs(30)).await?;
            let reader = connect(nats.urls()).await?;
            let d = if raw {
                raw_read(&reader, "BENCH", &durable, n).await?
            } else {
                flow_read(&reader, "BENCH", &durable, n).await?
            };
            println!(
                "pull R3 {size} B, round {round}, {:8}: {:>9.0} msg/s ({n} in {d:.2?})",
                if raw { "async-nats" } else { "flowctl" },
                n as f64 / d.as_secs_f64()
            );
        }
    }
    drop(admin);
    let mut i = 0;
    for freeze in [false, true] {
        for _ in 0..2 {
            for raw in [false, true] {
                i += 1;
                let d = resume(&mut nats, raw, freeze, &i.to_string()).await;
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
