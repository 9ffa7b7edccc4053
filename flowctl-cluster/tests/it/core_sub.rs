use std::time::{Duration, Instant};

use bytes::Bytes;
use flowctl_cluster::{Cluster, ClusterError};
use flowctl_core::Fairness;
use flowctl_core::lifecycle::Ledger;
use flowctl_core::prelude::*;

use crate::connect::config;
use crate::metrics::{recorder, value};
use flowctl_cluster::testing::NatsCluster;

/// async-nats drops silently when a subscription's channel is full; the core
/// source reports every drop it learns of as an error, counts it in its stats
/// and its `flowctl_dropped_total{reason="slow_consumer"}` while the consumer
/// is not reading, and what it kept is intact.
#[tokio::test]
async fn core_slow_consumer_is_reported_with_the_drop_count() {
    const CAP: usize = 64;
    const N: u64 = 2000;
    let (recorder, handle) = recorder();
    // One thread: the source's stage is registered with this recorder.
    let _guard = metrics::set_default_local_recorder(&recorder);
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
    // Counted before the consumer reads anything: on the stage, as reported.
    let counted = src.stats().dropped;
    assert!(counted > 0 && counted == src.dropped());
    let label = r#"stage="nats.core.x.sub",reason="slow_consumer""#;
    if cfg!(feature = "metrics") {
        let exposed = value(&handle.render(), "flowctl_dropped_total", label);
        assert!(exposed.is_some_and(|v| v > 0.0), "{}", handle.render());
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
    // The drops are the stage's too: FlowStats::dropped (reason slow_consumer).
    assert!(src.stats().dropped >= dropped, "stats: {:?}", src.stats());
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
    // The exact figure: the client received N (its only subscription), the
    // consumer got `kept`, the rest was dropped. The count is a lower bound
    // (async-nats reports each drop as an event on a channel of 128 that
    // drops events when full), never more than that.
    let counted = src.stats().dropped;
    assert!(
        counted >= dropped && counted <= N - kept.len() as u64,
        "counted {counted}, dropped in fact {}",
        N - kept.len() as u64
    );
    if cfg!(feature = "metrics") {
        let exposed = value(&handle.render(), "flowctl_dropped_total", label);
        assert_eq!(exposed, Some(counted as f64), "metric and stats agree");
    }
    drop(src);
    drop(cluster);
    drop(producer);
    assert_eq!(ledger.total(), 0, "{ledger:?}");
}

/// A core subscription with messages waiting ends its slice every
/// `max_items` messages: each forced yield is counted on its stage.
#[tokio::test]
async fn core_forced_yields_are_counted() {
    const N: u64 = 20;
    let (recorder, handle) = recorder();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(vec![nats.url(0)], &ledger))
        .await
        .unwrap();
    let mut src = cluster
        .subscribe("core.fair", Fairness::new(4, usize::MAX).unwrap())
        .await
        .unwrap();
    cluster.client().flush().await.unwrap(); // SUB reached the server
    let producer = Cluster::connect(config(vec![nats.url(0)], &ledger))
        .await
        .unwrap();
    for i in 0..N {
        producer
            .client()
            .publish("core.fair", Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    producer.client().flush().await.unwrap();
    // Every message waits in the subscription before the first recv.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stats = cluster.client().statistics();
    while stats.in_messages.load(std::sync::atomic::Ordering::Relaxed) < N {
        assert!(Instant::now() < deadline, "client did not receive them");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..N {
        let m = src.recv().await.unwrap().unwrap();
        assert_eq!(m.payload[..], i.to_be_bytes());
    }
    // Slices of 4: a forced yield before the 5th, 9th, 13th and 17th.
    assert_eq!(src.stats().forced_yields, 4, "{:?}", src.stats());
    if cfg!(feature = "metrics") {
        assert_eq!(
            value(
                &handle.render(),
                "flowctl_forced_yields_total",
                r#"stage="nats.core.fair.sub""#
            ),
            Some(4.0)
        );
    }
    drop((src, cluster, producer));
    assert_eq!(ledger.total(), 0, "{ledger:?}");
}
