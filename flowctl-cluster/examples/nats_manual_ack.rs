//! Recipe: at-least-once with `AckMode::Manual`. A first consumer takes
//! three orders and crashes before processing them (it never acks); a
//! second one on the same durable consumer gets every order, those three
//! included (redelivered after the consumer's `ack_wait`), processes each
//! and only then acks it. The server's `num_ack_pending` ends at 0.
//!
//! ```text
//! cargo run -p flowctl-cluster --example nats_manual_ack
//! ```
//!
//! It starts its own throwaway cluster on 127.0.0.1 with the tests' fixture,
//! `flowctl_cluster::testing` (cargo feature `testing`, on for the examples;
//! `nats-server` must be installed: `cargo xtask setup` does it, and
//! `FLOWCTL_NATS_SERVER` names another binary), so it needs no outside server.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use bytes::Bytes;
use flowctl_cluster::{AckMode, Cluster, ClusterConfig, ConsumeOptions, JsMessage};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::prelude::*;

use flowctl_cluster::testing::NatsCluster;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const N: u64 = 10;

/// The application's work on one order (here: read its number).
fn process(m: &JsMessage) -> Result<u64, BoxError> {
    let n: [u8; 8] = m.payload[..].try_into()?;
    Ok(u64::from_be_bytes(n))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let nats = NatsCluster::start().await?;
    let ledger = Ledger::new();
    let mut config = ClusterConfig::new(nats.urls());
    config.ledger = ledger.clone();
    let cluster = Cluster::connect(config).await?;
    let js = cluster.jetstream();
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
            // Un-acked messages come back after this.
            ack_wait: Duration::from_secs(2),
            ..Default::default()
        },
        "ORDERS",
    )
    .await?;
    for i in 1..=N {
        js.publish("orders.new", Bytes::from(i.to_be_bytes().to_vec()))
            .await?
            .await?;
    }

    // The first consumer takes three orders and crashes before acking.
    let options = ConsumeOptions {
        ack: AckMode::Manual,
        ..ConsumeOptions::default()
    };
    let mut crashing = cluster.consume("ORDERS", "billing", options).await?;
    for _ in 0..3 {
        crashing.recv().await?.ok_or("stream ended")?;
    }
    drop(crashing);

    // ANCHOR: manual
    let mut orders = cluster
        .consume(
            "ORDERS",
            "billing",
            ConsumeOptions {
                // Each message carries an AckHandle; nothing is acked for us.
                ack: AckMode::Manual,
                ..ConsumeOptions::default()
            },
        )
        .await?;
    let mut done = BTreeSet::new();
    while done.len() < N as usize {
        let m = orders.recv().await?.ok_or("stream ended")?;
        let order = process(&m)?;
        // Ack only after the work is done: a crash before this line means
        // the server redelivers the message (after ack_wait) to whoever
        // consumes next. Dropping the handle without an ack (or `nak()`)
        // lets this source deliver the redelivery again.
        m.ack
            .ok_or("manual mode carries an ack handle")?
            .ack()
            .await?;
        done.insert(order);
    }
    // ANCHOR_END: manual

    cluster.client().flush().await?;
    let stream = js.get_stream("ORDERS").await?;
    let mut pending = stream.consumer_info("billing").await?.num_ack_pending;
    for _ in 0..100 {
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        pending = stream.consumer_info("billing").await?.num_ack_pending;
    }
    println!(
        "processed orders {done:?} once each (the first consumer's three were redelivered); {:?}; num_ack_pending {pending}",
        orders.pull_stats()
    );
    drop(orders);
    drop(cluster);
    Ok(())
}
