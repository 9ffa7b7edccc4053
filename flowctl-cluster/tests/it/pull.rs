use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use bytes::Bytes;
use flowctl_cluster::{Cluster, ConsumeOptions};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::{Source, Watermarks};

use crate::connect::{config, released};
use flowctl_cluster::testing::NatsCluster;

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
    let nats = NatsCluster::start().await.expect("nats cluster");
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
    released(&ledger, Duration::from_secs(10)).await;
}

/// Manual acks: unacked messages come back after `ack_wait`; the source drops
/// the redeliveries (by stream sequence) so the application sees each once.
#[tokio::test]
async fn manual_ack_redeliveries_are_deduplicated() {
    use flowctl_cluster::AckMode;
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream_and_consumer(&cluster, "MAN", "man.>", "c", Duration::from_secs(1)).await;
    let js = cluster.jetstream();
    for i in 0..20u64 {
        js.publish("man.x", Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut src = cluster
        .consume(
            "MAN",
            "c",
            ConsumeOptions {
                ack: AckMode::Manual,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..20u64 {
        let m = src.recv().await.unwrap().unwrap();
        assert_eq!(m.stream_seq, i + 1);
        handles.push(m.ack.expect("manual mode carries an ack handle"));
    }
    // Wait (on the server's state) until the unacked messages were redelivered.
    let st = js.get_stream("MAN").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while st.consumer_info("c").await.unwrap().num_redelivered == 0 {
        assert!(std::time::Instant::now() < deadline, "no redelivery seen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    js.publish("man.x", Bytes::from(20u64.to_be_bytes().to_vec()))
        .await
        .unwrap()
        .await
        .unwrap();
    let m = src.recv().await.unwrap().unwrap();
    assert_eq!(m.stream_seq, 21, "redeliveries were not handed out again");
    assert!(src.pull_stats().duplicates > 0);
    for h in handles {
        h.ack().await.unwrap();
    }
    m.ack.unwrap().ack().await.unwrap();
    cluster.client().flush().await.unwrap();
    drop(src);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}

/// A message larger than `high` is admitted alone (the one-item overshoot),
/// never deadlocked.
#[tokio::test]
async fn message_larger_than_high_is_admitted_alone() {
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream_and_consumer(&cluster, "BIG", "big.>", "c", Duration::from_secs(30)).await;
    const BIG: usize = 8192;
    for i in 0..5u8 {
        cluster
            .jetstream()
            .publish("big.x", Bytes::from(vec![i; BIG]))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let high = 1024;
    let mut src = cluster
        .consume(
            "BIG",
            "c",
            ConsumeOptions {
                watermarks: Watermarks::new(0, high).unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for i in 0..5u8 {
        let m = tokio::time::timeout(Duration::from_secs(20), src.recv())
            .await
            .expect("an oversized message must not deadlock")
            .unwrap()
            .unwrap();
        assert_eq!((m.payload.len(), m.payload[0]), (BIG, i));
    }
    assert!(src.stats().max_buffered <= high + BIG);
}
