use std::time::{Duration, Instant};

use bytes::Bytes;
use flowctl_cluster::{Cluster, ClusterError};
use flowctl_core::Fairness;
use flowctl_core::lifecycle::Ledger;
use flowctl_core::prelude::*;

use crate::connect::config;
use flowctl_cluster::testing::NatsCluster;

/// async-nats drops silently when a subscription's channel is full; the core
/// source reports every drop it learns of as an error, and what it kept is intact.
#[tokio::test]
async fn core_slow_consumer_is_reported_with_the_drop_count() {
    const CAP: usize = 64;
    const N: u64 = 2000;
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let mut cfg = config(vec![nats.url(0)], &ledger);
    cfg.subscription_capacity = CAP;
    let cluster = Cluster::connect(cfg).await.unwrap();
    let mut src = cluster
        .subscribe("core.x", Fairness::default())
        .await
        .unwrap();
    cluster.client().flush().await.unwrap(); // SUB reached the server
    let producer = Cluster::connect(config(vec![nats.url(0)], &ledger))
        .await
        .unwrap();
    for i in 0..N {
        producer
            .client()
            .publish("core.x", Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    producer.client().flush().await.unwrap();
    // The consumer has not read anything: wait until the client got them all
    // and the drops were reported.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stats = cluster.client().statistics();
    while stats.in_messages.load(std::sync::atomic::Ordering::Relaxed) < N || src.dropped() == 0 {
        assert!(
            Instant::now() < deadline,
            "client did not receive the burst"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = src.recv().await.unwrap_err();
    let dropped = match err.transport_error::<ClusterError>() {
        Some(ClusterError::SlowConsumer {
            dropped,
            capacity,
            subject,
        }) => {
            assert_eq!((*capacity, subject.as_str()), (CAP, "core.x"));
            *dropped
        }
        other => panic!("expected SlowConsumer, got {other:?}"),
    };
    assert!(
        dropped > 0 && dropped <= N - CAP as u64,
        "dropped {dropped}"
    );
    // What was kept comes next, in publish order, and no more than the channel held.
    let mut kept = Vec::new();
    while let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_millis(500), src.recv()).await {
        kept.push(u64::from_be_bytes(m.payload[..8].try_into().unwrap()));
    }
    assert!(
        !kept.is_empty() && kept.len() <= CAP + 1,
        "kept {}",
        kept.len()
    );
    assert!(kept.windows(2).all(|w| w[0] < w[1]), "order kept");
    assert!(kept.len() as u64 + dropped <= N);
    drop(src);
    drop(cluster);
    drop(producer);
    assert_eq!(ledger.total(), 0, "{ledger:?}");
}
