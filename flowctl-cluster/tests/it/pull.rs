use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use bytes::Bytes;
use flowctl_cluster::{Cluster, ConsumeOptions};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::{Source, Watermarks};

use crate::connect::config;
use crate::fixture::NatsCluster;

/// Creates an R3 stream `name` on `subject` and a durable pull consumer `durable`.
pub(crate) async fn stream_and_consumer(
    cluster: &Cluster,
    name: &str,
    subject: &str,
    durable: &str,
    ack_wait: Duration,
) {
    let js = cluster.jetstream();
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    js.create_consumer_on_stream(
        consumer::pull::Config {
            durable_name: Some(durable.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_ack_pending: 1000,
            ..Default::default()
        },
        name,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn stalled_consumer_stays_within_watermarks_and_loses_nothing() {
    let nats = NatsCluster::start();
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream_and_consumer(&cluster, "SLOW", "slow.>", "c", Duration::from_secs(30)).await;
    const N: u64 = 2000;
    const SIZE: usize = 1024;
    for i in 0..N {
        let mut p = vec![0u8; SIZE];
        p[..8].copy_from_slice(&i.to_be_bytes());
        cluster
            .jetstream()
            .publish("slow.x", Bytes::from(p))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let (low, high) = (4 * SIZE, 16 * SIZE);
    let mut src = cluster
        .consume(
            "SLOW",
            "c",
            ConsumeOptions {
                watermarks: Watermarks::new(low, high).unwrap(),
                batch: 64,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut expect = 0u64;
    while expect < N {
        let m = src.recv().await.unwrap().expect("stream ended early");
        let got = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
        assert_eq!(got, expect, "out of order or lost");
        assert_eq!(m.stream_seq, expect + 1);
        expect += 1;
        if expect.is_multiple_of(500) {
            // The consumer stalls: the server keeps the rest, we keep at most `high`.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let s = src.stats();
            assert!(
                s.buffered <= high + SIZE,
                "buffered {} > high {high} + one item",
                s.buffered
            );
            assert!(s.buffered + src.outstanding_bytes() <= high + SIZE);
        }
    }
    let s = src.stats();
    assert!(
        s.max_buffered <= high + SIZE,
        "max_buffered {} > high {high} + one item",
        s.max_buffered
    );
    assert!(
        s.pauses > 0 || src.pull_stats().pulls > N / 64,
        "demand followed the consumer"
    );
    assert_eq!(src.pull_stats().duplicates, 0);
    drop(src);
    drop(cluster);
    tokio::time::timeout(Duration::from_secs(10), ledger.until_zero(None))
        .await
        .unwrap_or_else(|_| panic!("ledger not back to zero: {ledger:?}"));
}
