use std::time::Duration;

use bytes::Bytes;
use flowctl_cluster::{Cluster, ClusterError, ConsumeOptions, PublishOptions};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::{Sink, Source, Watermarks};

use crate::connect::{config, released};
use crate::pull::stream_and_consumer;
use flowctl_cluster::testing::NatsCluster;

#[tokio::test]
async fn publisher_bounds_unacked_bytes_keeps_order_and_rejects_oversize() {
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream_and_consumer(&cluster, "PUB", "pub.>", "c", Duration::from_secs(30)).await;
    const N: u64 = 3000;
    const SIZE: usize = 512;
    let (low, high) = (8 * SIZE, 32 * SIZE);
    let mut sink = cluster
        .publisher(
            "pub.x",
            PublishOptions {
                watermarks: Watermarks::new(low, high).unwrap(),
                max_inflight: 64,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for i in 0..N {
        let mut p = vec![0u8; SIZE];
        p[..8].copy_from_slice(&i.to_be_bytes());
        sink.send(Bytes::from(p)).await.unwrap();
    }
    sink.flush().await.unwrap();
    assert_eq!(sink.acked(), N);
    let s = sink.stats();
    assert!(
        s.max_buffered <= high + SIZE,
        "un-acked bytes {} > high {high} + one item",
        s.max_buffered
    );
    assert_eq!(s.buffered, 0);

    // Larger than the server's max_payload (1 MiB by default): refused, named.
    let max = cluster.client().server_info().max_payload;
    let err = sink
        .send(Bytes::from(vec![0u8; max + 1]))
        .await
        .unwrap_err();
    match ClusterError::from_flow(&err) {
        Some(ClusterError::MessageTooLarge { limit, .. }) => assert_eq!(*limit, max),
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    sink.close().await.unwrap();

    let mut src = cluster
        .consume("PUB", "c", ConsumeOptions::default())
        .await
        .unwrap();
    for i in 0..N {
        let m = src.recv().await.unwrap().unwrap();
        assert_eq!(m.stream_seq, i + 1);
        assert_eq!(u64::from_be_bytes(m.payload[..8].try_into().unwrap()), i);
    }
    let info = cluster
        .jetstream()
        .get_stream("PUB")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.state.messages, N, "no duplicates stored");
    drop(src);
    drop(sink);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn missing_stream_consumer_and_subject_are_named() {
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    let err = cluster
        .consume("NOPE", "c", ConsumeOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(ClusterError::from_flow(&err), Some(ClusterError::StreamNotFound { stream }) if stream == "NOPE"),
        "{err}"
    );
    stream_and_consumer(&cluster, "HAS", "has.>", "c", Duration::from_secs(30)).await;
    let err = cluster
        .consume("HAS", "nobody", ConsumeOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(ClusterError::from_flow(&err), Some(ClusterError::ConsumerNotFound { consumer, .. }) if consumer == "nobody"),
        "{err}"
    );
    let err = cluster
        .publisher("nostream.x", PublishOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            ClusterError::from_flow(&err),
            Some(ClusterError::NoStreamForSubject { .. })
        ),
        "{err}"
    );
    drop(cluster);
    assert_eq!(ledger.total(), 0, "{ledger:?}");
}
