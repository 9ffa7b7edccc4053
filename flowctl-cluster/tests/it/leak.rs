use std::time::{Duration, Instant};

use bytes::Bytes;
use flowctl_cluster::{Cluster, ConsumeOptions};
use flowctl_core::FlowError;
use flowctl_core::lifecycle::Ledger;
use flowctl_core::prelude::*;

use crate::connect::{config, released};
use crate::pull::stream_and_consumer;
use flowctl_cluster::testing::NatsCluster;

/// The Aeron scenario: connect + consume cancelled by timeouts at random
/// points, over and over; afterwards the servers' own accounting shows no
/// subscription and no connection of ours, and the ledger is at zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_connects_and_consumes_leave_nothing_behind() {
    const MAX_CYCLES: usize = 1000;
    const BUDGET: Duration = Duration::from_secs(35);
    let nats = NatsCluster::start().await.expect("nats cluster");
    let tag = format!("{:08x}", fastrand::u32(..));
    let prefix = format!("_LEAK_{tag}");
    let name = format!("leak-{tag}");

    let admin_ledger = Ledger::new();
    let admin = Cluster::connect(config(nats.urls(), &admin_ledger))
        .await
        .unwrap();
    stream_and_consumer(&admin, "LEAK", "leak.>", "c", Duration::from_secs(1)).await;
    for i in 0..(MAX_CYCLES as u64 + 500) {
        admin
            .client()
            .publish("leak.x", Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    admin.client().flush().await.unwrap();

    let ledger = Ledger::new();
    // Pull requests are requests in flight too: the server keeps one until it
    // expires, so keep them short; they are checked in /jsz below.
    let opts = ConsumeOptions {
        expires: Duration::from_secs(1),
        ..ConsumeOptions::default()
    };
    let mut cfg = config(nats.urls(), &ledger);
    cfg.inbox_prefix = Some(prefix.clone());
    cfg.name = Some(name.clone());
    // Calibrate: the random cancel points span 0..2x a full cycle, so every
    // await point (connect, stream info, consumer info, SUB, first pull,
    // first message) is hit and about half the cycles complete.
    let mut samples = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let cluster = Cluster::connect(cfg.clone()).await.unwrap();
        let mut src = cluster.consume("LEAK", "c", opts.clone()).await.unwrap();
        src.recv().await.unwrap().unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    let span = (samples[samples.len() / 2] * 2).as_micros() as u64;
    let started = Instant::now();
    let (mut completed, mut cancelled, mut cycles) = (0u32, 0u32, 0usize);
    while cycles < MAX_CYCLES && started.elapsed() < BUDGET {
        cycles += 1;
        let limit = Duration::from_micros(fastrand::u64(0..span.max(1)));
        let cfg = cfg.clone();
        let opts = opts.clone();
        let r = tokio::time::timeout(limit, async move {
            let cluster = Cluster::connect(cfg).await?;
            let mut src = cluster.consume("LEAK", "c", opts.clone()).await?;
            src.recv().await?;
            Ok::<_, FlowError>(())
        })
        .await;
        match r {
            Ok(Ok(())) => completed += 1,
            Ok(Err(e)) => panic!("cycle {cycles} failed: {e}"),
            Err(_) => cancelled += 1,
        }
    }
    eprintln!(
        "leak test: {cycles} cycles ({completed} completed, {cancelled} cancelled) in {:?}",
        started.elapsed()
    );

    released(&ledger, Duration::from_secs(20)).await;
    nats.eventually(Duration::from_secs(20), async |n| {
        for i in 0..3 {
            let subs: Vec<String> = n
                .subscriptions(i)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|s| s.starts_with(&prefix))
                .collect();
            if !subs.is_empty() {
                return Err(format!(
                    "node {i} still has {} subscriptions of ours, e.g. {:?}",
                    subs.len(),
                    &subs[..subs.len().min(3)]
                ));
            }
            let conns = n
                .connections(i)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|c| c.name == name)
                .count();
            if conns > 0 {
                return Err(format!(
                    "node {i} still has {conns} connections named {name}"
                ));
            }
        }
        Ok(())
    })
    .await
    .unwrap();
    // The check can fail: our admin connection is still visible on some node.
    let mut admin_seen = false;
    for i in 0..3 {
        admin_seen |= !nats.connections(i).await.expect("connz").is_empty();
    }
    assert!(admin_seen, "connz readers see live connections");
    drop(admin);
}
