//! Recipe: consume a JetStream stream from a 3-node NATS cluster while the
//! node the consumer is connected to is SIGKILLed; every message reaches the
//! application once and in order, and nothing is left behind afterwards.
//!
//! ```text
//! cargo run -p flowctl-cluster --example nats_failover
//! ```
//!
//! It starts its own throwaway cluster on 127.0.0.1 with the tests' fixture,
//! `flowctl_cluster::testing` (cargo feature `testing`, on for the examples;
//! `nats-server` must be installed: `cargo xtask setup` does it, and
//! `FLOWCTL_NATS_SERVER` names another binary), so it needs no outside server.

use std::time::{Duration, Instant};

use async_nats::jetstream::{consumer, stream};
use bytes::Bytes;
use flowctl_cluster::{Cluster, ClusterConfig, ConsumeOptions, PublishOptions};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, Source, Watermarks};

use flowctl_cluster::testing::NatsCluster;

/// Messages in all; the consumer's node is killed after `KILL_AT` of them.
const N: u64 = 2000;
const KILL_AT: u64 = 500;
/// Payload size: the sequence number, padded.
const SIZE: usize = 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The node index of a server name (`n0`..`n2` in the fixture).
fn node_index(server_name: &str) -> Result<usize, BoxError> {
    Ok(server_name.trim_start_matches('n').parse()?)
}

fn config(seeds: Vec<String>, ledger: &Ledger) -> ClusterConfig {
    let mut config = ClusterConfig::new(seeds);
    config.name = Some("nats-failover-recipe".into());
    config.ledger = ledger.clone();
    config
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut nats = NatsCluster::start().await?;
    let ledger = Ledger::new();

    // ANCHOR: setup
    // A stream replicated on all three nodes and a durable pull consumer.
    let admin = Cluster::connect(config(nats.urls(), &ledger)).await?;
    let js = admin.jetstream();
    js.create_stream(stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await?;
    js.create_consumer_on_stream(
        consumer::pull::Config {
            durable_name: Some("billing".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(2),
            max_ack_pending: 1000,
            ..Default::default()
        },
        "ORDERS",
    )
    .await?;
    drop(admin);
    // ANCHOR_END: setup

    // ANCHOR: consume
    let cluster = Cluster::connect(config(nats.urls(), &ledger)).await?;
    let victim = node_index(&cluster.client().server_info().server_name)?;
    let mut orders = cluster
        .consume(
            "ORDERS",
            "billing",
            ConsumeOptions {
                // Demand follows these: at most 64 KiB (plus one oversized
                // message) is ever buffered here; the rest waits on the server.
                watermarks: Watermarks::new(16 * 1024, 64 * 1024)?,
                batch: 64,
                expires: Duration::from_secs(2),
                // Above the consumer's ack_wait (2 s): messages after a gap
                // wait this long for the redelivery of the missing ones.
                hold_timeout: Duration::from_secs(6),
                ..ConsumeOptions::default()
            },
        )
        .await?;
    // ANCHOR_END: consume

    // ANCHOR: publish
    // The producer goes through the surviving nodes; its second half is
    // published after the kill, through whatever election follows.
    let survivors: Vec<String> = (0..3)
        .filter(|i| *i != victim)
        .map(|i| nats.url(i))
        .collect();
    let producer = Cluster::connect(config(survivors, &ledger)).await?;
    let mut sink = producer
        .publisher("orders.new", PublishOptions::default())
        .await?;
    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let producing = tokio::spawn(async move {
        let mut killed_rx = Some(killed_rx);
        for i in 0..N {
            if i == N / 2
                && let Some(killed) = killed_rx.take()
            {
                let _ = killed.await;
            }
            let mut payload = vec![0u8; SIZE];
            payload[..8].copy_from_slice(&i.to_be_bytes());
            sink.send(Bytes::from(payload)).await?;
        }
        sink.close().await?; // waits for every ack
        Ok::<u64, FlowError>(sink.acked())
    });
    // ANCHOR_END: publish

    // ANCHOR: failover
    let mut killed_tx = Some(killed_tx);
    let (mut expect, mut killed_at, mut resumed_after) = (0u64, None, None);
    while expect < N {
        let msg = orders.recv().await?.ok_or("the stream ended")?;
        let got = u64::from_be_bytes(msg.payload.get(..8).ok_or("short payload")?.try_into()?);
        assert_eq!(got, expect, "lost, duplicated or reordered");
        expect += 1;
        if expect == KILL_AT {
            nats.kill(victim).await?; // SIGKILL the node this consumer is connected to
            killed_at = Some(Instant::now());
            if let Some(tx) = killed_tx.take() {
                let _ = tx.send(());
            }
        }
        if got == N / 2 {
            // The first message published after the kill.
            resumed_after = killed_at.map(|k| k.elapsed());
        }
    }
    // ANCHOR_END: failover
    let acked = producing.await??;
    let resumed = resumed_after.map_or_else(|| "n/a".to_owned(), |d| format!("{d:?}"));

    // ANCHOR: evidence
    println!(
        "received {N} messages once and in order; killed n{victim} after {KILL_AT}; \
         first message published after the kill arrived {resumed} later; \
         {} reconnect(s); {:?}; at most {} bytes buffered (high {})",
        cluster.reconnects(),
        orders.pull_stats(),
        orders.stats().max_buffered,
        orders.stats().watermarks.high(),
    );
    assert_eq!(acked, N);
    // The watermark rule held through the failover: at most `high` plus one message.
    assert!(orders.stats().max_buffered <= orders.stats().watermarks.high() + SIZE);
    drop(orders);
    drop(cluster);
    drop(producer);
    // Every connection, subscription and task this program made is gone.
    tokio::time::timeout(Duration::from_secs(20), ledger.until_zero(None))
        .await
        .map_err(|_| format!("ledger not back to zero: {ledger:?}"))?;
    // ANCHOR_END: evidence
    Ok(())
}
