use std::time::Duration;

use bytes::Bytes;
use flowctl_cluster::{Cluster, ClusterError, ConsumeOptions, PublishOptions};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::prelude::*;
use flowctl_core::weighted::MIN_CHARGE;
use flowctl_core::{FlowError, Overflow};
use flowctl_core::{Sink, Watermarks};
use futures::FutureExt;

use crate::connect::{config, released};
use crate::metrics::{payload, recorder, value};
use crate::pull::{create_stream, stream_and_consumer};
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
    assert!(
        sink.writability().is_some(),
        "the publisher has a buffer: its edges are observable"
    );
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
    match err.transport_error::<ClusterError>() {
        Some(ClusterError::MessageTooLarge { limit, .. }) => assert_eq!(*limit, max),
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    // `start_send` gives it back, not counted.
    let before = sink.stats().items;
    let (item, err) = sink
        .start_send(Bytes::from(vec![7u8; max + 1]))
        .unwrap_err()
        .into_parts();
    assert_eq!(item.len(), max + 1);
    assert!(
        matches!(
            err.transport_error::<ClusterError>(),
            Some(ClusterError::MessageTooLarge { .. })
        ),
        "{err}"
    );
    assert_eq!(sink.stats().items, before);
    sink.close().await.unwrap();
    // Closed: refused with the item back; close again is a no-op.
    let (item, err) = sink
        .start_send(Bytes::from_static(b"late"))
        .unwrap_err()
        .into_parts();
    assert_eq!(&item[..], b"late");
    assert!(matches!(err, flowctl_core::FlowError::Closed), "{err}");
    assert!(matches!(
        sink.ready().await,
        Err(flowctl_core::FlowError::Closed)
    ));
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
        matches!(err.transport_error::<ClusterError>(), Some(ClusterError::StreamNotFound { stream }) if stream == "NOPE"),
        "{err}"
    );
    stream_and_consumer(&cluster, "HAS", "has.>", "c", Duration::from_secs(30)).await;
    let err = cluster
        .consume("HAS", "nobody", ConsumeOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err.transport_error::<ClusterError>(), Some(ClusterError::ConsumerNotFound { consumer, .. }) if consumer == "nobody"),
        "{err}"
    );
    let err = cluster
        .publisher("nostream.x", PublishOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.transport_error::<ClusterError>(),
            Some(ClusterError::NoStreamForSubject { .. })
        ),
        "{err}"
    );
    drop(cluster);
    assert_eq!(ledger.total(), 0, "{ledger:?}");
}

/// An R3 stream capturing `subject` (no consumer: these tests only publish),
/// writable through this cluster's connection when this returns.
async fn stream(cluster: &Cluster, name: &str, subject: &str) {
    crate::pull::create_stream(cluster, name, &[subject]).await;
}

/// Only a hang detector: a regression fails here instead of hanging the suite.
const HANG: Duration = Duration::from_secs(60);

/// A second writer breaks the strict-order chain: the publisher's fatal
/// `ConcurrentPublisher` comes back from every later call, and `flush` and
/// `close` return it instead of waiting for acks that can never come.
#[tokio::test]
async fn a_fatal_error_is_sticky_and_close_returns_it() {
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream(&cluster, "STICKY", "sticky.>").await;
    // Only the first try of a message is refused as a concurrent write (a
    // refused re-send is retried for `retry_for`): an ack timeout longer
    // than the default keeps a slow refusal from counting as a lost ack.
    let mut sink = cluster
        .publisher(
            "sticky.x",
            PublishOptions {
                ack_timeout: Duration::from_secs(10),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    sink.send(Bytes::from_static(b"first")).await.unwrap();
    sink.flush().await.unwrap();
    // Another writer appends: our next message's expected last id is stale.
    cluster
        .jetstream()
        .publish("sticky.x", Bytes::from_static(b"intruder"))
        .await
        .unwrap()
        .await
        .unwrap();
    sink.send(Bytes::from_static(b"second")).await.unwrap();
    let is_concurrent = |e: &flowctl_core::FlowError| {
        matches!(
            e.transport_error::<ClusterError>(),
            Some(ClusterError::ConcurrentPublisher { .. })
        )
    };
    let err = tokio::time::timeout(HANG, sink.flush())
        .await
        .expect("flush hung after the fatal error")
        .unwrap_err();
    assert!(is_concurrent(&err), "{err}");
    let err = tokio::time::timeout(HANG, sink.flush())
        .await
        .expect("a second flush hung after the fatal error")
        .unwrap_err();
    assert!(is_concurrent(&err), "second flush: {err}");
    let err = tokio::time::timeout(HANG, sink.ready())
        .await
        .expect("ready hung after the fatal error")
        .unwrap_err();
    assert!(is_concurrent(&err), "ready: {err}");
    let (item, err) = sink
        .start_send(Bytes::from_static(b"third"))
        .unwrap_err()
        .into_parts();
    assert_eq!(
        &item[..],
        b"third",
        "start_send gives the refused item back"
    );
    assert!(is_concurrent(&err), "start_send: {err}");
    let err = tokio::time::timeout(HANG, sink.close())
        .await
        .expect("close hung after the fatal error")
        .unwrap_err();
    assert!(is_concurrent(&err), "close: {err}");
    let err = tokio::time::timeout(HANG, sink.close())
        .await
        .expect("a second close hung")
        .unwrap_err();
    assert!(is_concurrent(&err), "second close: {err}");
    assert_eq!(sink.acked(), 1);
    // `second` was refused: known not stored; nothing is held any more.
    let o = sink.outcome();
    assert_eq!(
        (o.accepted, o.acked, o.pending, o.not_stored, o.unknown),
        (2, 1, 0, 1, 0),
        "{o:?}"
    );
    assert_eq!(sink.stats().buffered, 0);
    let info = cluster
        .jetstream()
        .get_stream("STICKY")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.state.messages, 2, "first + intruder, not second");
    drop(sink);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}

/// Every node SIGKILLed while messages wait for their acks: after
/// `retry_for` the publisher fails with `PublishFailed`, and every later
/// `flush` and `close` returns that error at once.
#[tokio::test]
async fn a_dead_cluster_fails_flush_and_close_instead_of_hanging() {
    let mut nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream(&cluster, "DEAD", "dead.>").await;
    let mut sink = cluster
        .publisher(
            "dead.x",
            PublishOptions {
                retry_for: Duration::from_secs(2),
                ack_timeout: Duration::from_millis(500),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    sink.send(Bytes::from_static(b"stored")).await.unwrap();
    sink.flush().await.unwrap();
    for i in 0..3 {
        nats.kill(i).await.unwrap();
    }
    for i in 0..10u64 {
        sink.send(Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    let is_failed = |e: &flowctl_core::FlowError| {
        matches!(
            e.transport_error::<ClusterError>(),
            Some(ClusterError::PublishFailed { .. })
        )
    };
    let err = tokio::time::timeout(HANG, sink.flush())
        .await
        .expect("flush hung with every node dead")
        .unwrap_err();
    assert!(is_failed(&err), "{err}");
    let err = tokio::time::timeout(HANG, sink.close())
        .await
        .expect("close hung after PublishFailed")
        .unwrap_err();
    assert!(is_failed(&err), "close: {err}");
    assert_eq!(sink.acked(), 1);
    // Every later message is settled as unknown or not stored, none pending.
    let o = sink.outcome();
    assert_eq!(o.accepted, 11, "{o:?}");
    assert_eq!(o.pending, 0, "{o:?}");
    assert_eq!(o.acked + o.not_stored + o.unknown, 11, "{o:?}");
    assert!(o.unknown >= 1, "the failed message was sent: {o:?}");
    assert_eq!(sink.stats().buffered, 0);
    drop(sink);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}

/// `ready`, `flush` and `close` dropped while they wait for acks lose
/// nothing: a later `close` waits for every ack, the stream holds every
/// message once, and the publishing task ends.
#[tokio::test]
async fn ready_dropped_mid_wait_then_close_stores_everything() {
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream(&cluster, "DROPRDY", "droprdy.>").await;
    const SIZE: usize = 256;
    let mut sink = cluster
        .publisher(
            "droprdy.x",
            PublishOptions {
                watermarks: Watermarks::new(SIZE, 4 * SIZE).unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut sent = 0u64;
    for round in 0..20 {
        // Fill past `high` without waiting (start_send may overshoot).
        while sink.stats().buffered <= 4 * SIZE {
            sink.start_send(Bytes::from(vec![round as u8; SIZE]))
                .unwrap();
            sent += 1;
        }
        // One poll of ready with this task's waker: pending (above high);
        // then the future is dropped mid-wait.
        let mut ready = sink.ready();
        let polled = futures::poll!(&mut ready);
        drop(ready);
        assert!(
            polled.is_pending(),
            "round {round}: ready was not pending above high: {polled:?}, {:?}",
            sink.stats()
        );
        // Let the publishing task take acks before the next round.
        tokio::task::yield_now().await;
    }
    // flush and close dropped mid-wait too (one poll each, acks pending).
    sink.start_send(Bytes::from(vec![0xff; SIZE])).unwrap();
    sent += 1;
    let mut flush = sink.flush();
    assert!(
        futures::poll!(&mut flush).is_pending(),
        "flush waits for acks"
    );
    drop(flush);
    let mut close = sink.close();
    assert!(
        futures::poll!(&mut close).is_pending(),
        "close waits for acks"
    );
    drop(close);
    tokio::time::timeout(HANG, sink.close())
        .await
        .expect("close hung after dropped ready, flush and close")
        .unwrap();
    assert_eq!(sink.acked(), sent);
    assert_eq!(sink.stats().buffered, 0);
    let info = cluster
        .jetstream()
        .get_stream("DROPRDY")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.state.messages, sent, "every message stored once");
    drop(sink);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn empty_messages_are_charged_and_pause_the_publisher() {
    // An empty payload weighs 0 bytes; charged as such, un-acked empty
    // messages would never pause the publisher. With every node frozen no ack
    // comes back, so everything accepted stays charged.
    let mut nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream_and_consumer(&cluster, "EMPTY", "empty.>", "c", Duration::from_secs(30)).await;
    let high = 1024;
    let mut sink = cluster
        .publisher(
            "empty.x",
            PublishOptions {
                watermarks: Watermarks::new(256, high).unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for i in 0..3 {
        nats.freeze(i).unwrap();
    }
    let mut accepted = 0usize;
    while accepted < 100_000 {
        match sink.ready().now_or_never() {
            Some(r) => r.unwrap(),
            // Paused: the bound under test. Otherwise a fair yield.
            None if sink.stats().paused => break,
            None => {
                tokio::task::yield_now().await;
                continue;
            }
        }
        sink.start_send(Bytes::new()).unwrap();
        accepted += 1;
    }
    let s = sink.stats();
    assert!(
        accepted <= high / MIN_CHARGE + 1,
        "accepted {accepted} empty messages without a pause ({s:?})"
    );
    assert!(s.paused, "{s:?}");
    assert!(s.buffered <= high + MIN_CHARGE, "{s:?}");
}

/// Sends `n` payloads through `ready` + `start_send`; returns the refused ones.
async fn offer(
    sink: &mut flowctl_cluster::Publisher,
    n: u64,
    size: usize,
) -> Vec<(Bytes, FlowError)> {
    let mut refused = Vec::new();
    for i in 0..n {
        // Under a non-blocking policy `ready` never waits: the guard only
        // turns a hang into a failure.
        tokio::time::timeout(Duration::from_secs(10), sink.ready())
            .await
            .expect("ready waited under a non-blocking overflow policy")
            .unwrap();
        if let Err(e) = sink.start_send(payload(i, size)) {
            refused.push(e.into_parts());
        }
    }
    refused
}

/// Continues a node stopped by `NatsCluster::freeze` (SIGCONT by pid).
fn thaw(nats: &NatsCluster, i: usize) {
    let pid = nats.pid(i).expect("node runs");
    let status = std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .expect("run `kill -CONT` (procps; `cargo xtask setup` installs it)");
    assert!(status.success(), "kill -CONT {pid}: {status}");
}

/// With every node frozen no ack comes back, so the publisher's buffer fills
/// exactly: `Fail` gives back what does not fit, `DropNewest` drops and counts
/// it, and both stay usable once the stream answers again.
#[tokio::test]
async fn publisher_overflow_fail_and_drop_newest_with_a_stalled_stream() {
    let (recorder, handle) = recorder();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let mut nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    create_stream(&cluster, "OVF1", &["ovf1.>"]).await;
    create_stream(&cluster, "OVF2", &["ovf2.>"]).await;
    create_stream(&cluster, "OVF3", &["ovf3.>"]).await;
    const SIZE: usize = 1000;
    const FIT: u64 = 10;
    const N: u64 = 30;
    let wm = Watermarks::new(0, FIT as usize * SIZE).unwrap();
    let opts = |overflow| PublishOptions {
        watermarks: wm,
        overflow,
        ..Default::default()
    };
    // DropOldest cannot take back what was sent: refused, named.
    let err = cluster
        .publisher("ovf1.x", opts(Overflow::DropOldest))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FlowError::Config(m) if m.contains("drop_oldest")),
        "{err:?}"
    );
    let mut fail = cluster
        .publisher("ovf1.x", opts(Overflow::Fail))
        .await
        .unwrap();
    let mut drop_newest = cluster
        .publisher("ovf2.x", opts(Overflow::DropNewest))
        .await
        .unwrap();
    let mut block = cluster
        .publisher("ovf3.x", opts(Overflow::Block))
        .await
        .unwrap();
    let writable = block.writability().expect("the publisher has a buffer");
    assert!(!writable.is_paused());
    for i in 0..3 {
        nats.freeze(i).unwrap();
    }

    let refused = offer(&mut fail, N, SIZE).await;
    assert_eq!(
        refused.len() as u64,
        N - FIT,
        "exactly {FIT} fit under high"
    );
    for (k, (item, e)) in refused.iter().enumerate() {
        assert_eq!(item, &payload(FIT + k as u64, SIZE), "the item comes back");
        match e {
            FlowError::Overflow {
                buffered,
                charge,
                high,
            } => assert_eq!(
                (*buffered, *charge, *high),
                (FIT as usize * SIZE, SIZE, wm.high())
            ),
            other => panic!("expected Overflow, got {other:?}"),
        }
    }
    let s = fail.stats();
    assert_eq!(
        (s.dropped, s.buffered, s.items),
        (0, FIT as usize * SIZE, FIT)
    );
    assert_eq!(fail.outcome().accepted, FIT);

    assert!(
        offer(&mut drop_newest, N, SIZE).await.is_empty(),
        "drop_newest never refuses"
    );
    let s = drop_newest.stats();
    assert_eq!(
        (s.dropped, s.buffered, s.items),
        (N - FIT, FIT as usize * SIZE, FIT)
    );
    assert_eq!(drop_newest.outcome().accepted, FIT);

    // Block: the send past `high` pauses the publisher, and the edge is seen.
    let mut blocked = 0u64;
    while !block.stats().paused {
        assert!(blocked <= FIT, "{:?}", block.stats());
        block.start_send(payload(blocked, SIZE)).unwrap();
        blocked += 1;
    }
    assert_eq!(blocked, FIT + 1, "one item over high pauses");
    assert!(writable.is_paused());
    assert_eq!(writable.pauses(), 1);
    if cfg!(feature = "metrics") {
        let text = handle.render();
        let stage = r#"stage="nats.OVF2.ovf2.x.publish""#;
        assert_eq!(
            value(
                &text,
                "flowctl_dropped_total",
                r#"stage="nats.OVF2.ovf2.x.publish",reason="drop_newest""#
            ),
            Some((N - FIT) as f64),
            "{text}"
        );
        assert_eq!(
            value(&text, "flowctl_buffered_bytes", stage),
            Some((FIT as usize * SIZE) as f64)
        );
        assert_eq!(
            value(
                &text,
                "flowctl_dropped_total",
                r#"stage="nats.OVF1.ovf1.x.publish",reason="drop_newest""#
            ),
            Some(0.0)
        );
    }

    // The stream answers again: what was admitted is stored, once, in order,
    // and the refused items can be offered again.
    for i in 0..3 {
        thaw(&nats, i);
    }
    let flushed = tokio::time::timeout(Duration::from_secs(90), async {
        fail.flush().await.unwrap();
        drop_newest.flush().await.unwrap();
        block.flush().await.unwrap();
    });
    flushed.await.expect("flush after the nodes continued");
    // Offered again: each one that does not fit waits for the acks (flush)
    // and goes in then.
    for (mut item, _) in refused {
        loop {
            fail.ready().await.unwrap();
            match fail.start_send(item) {
                Ok(()) => break,
                Err(e) => {
                    let (back, e) = e.into_parts();
                    assert!(matches!(e, FlowError::Overflow { .. }), "{e:?}");
                    item = back;
                    fail.flush().await.unwrap();
                }
            }
        }
    }
    fail.flush().await.unwrap();
    assert_eq!(fail.acked(), N);
    assert_eq!(drop_newest.acked(), FIT);
    assert!(!writable.is_paused(), "acked: resumed");
    for (stream, n) in [("OVF1", N), ("OVF2", FIT), ("OVF3", FIT + 1)] {
        let st = cluster.jetstream().get_stream(stream).await.unwrap();
        assert_eq!(st.cached_info().state.messages, n, "{stream}");
        for seq in 1..=n {
            let m = st.get_raw_message(seq).await.unwrap();
            assert_eq!(
                m.payload,
                payload(seq - 1, SIZE),
                "{stream} #{seq} in order"
            );
        }
    }
    drop((fail, drop_newest, block, cluster));
    released(&ledger, Duration::from_secs(10)).await;
}

/// A message the stream refuses (larger than its `max_msg_size`) in the
/// middle of a strict-order window: the messages sent behind it must be
/// refused without harm, and the stream must stay writable on every node.
///
/// The messages behind it were once chained with `Nats-Expected-Last-Msg-Id`,
/// which a replicated stream checks only when it applies a message. From
/// nats-server 2.14 on, that failed check stopped every replica for good
/// (`/healthz` 503, `stream write error: last msgid mismatch`), and every later
/// publish timed out. The chain is now `Nats-Expected-Last-Sequence`, which the
/// stream leader checks before it proposes a message.
#[tokio::test]
async fn a_refused_message_in_a_strict_order_window_leaves_every_replica_healthy() {
    use async_nats::jetstream::stream;
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    crate::pull::create_stream_with(
        &cluster,
        stream::Config {
            name: "REFUSE".into(),
            subjects: vec!["refuse.>".into()],
            num_replicas: 3,
            max_message_size: 1024,
            ..Default::default()
        },
    )
    .await;
    let mut sink = cluster
        .publisher(
            "refuse.x",
            PublishOptions {
                retry_for: Duration::from_secs(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // The first ack sets the chain's base; the rest are then sent as a window.
    sink.send(Bytes::from_static(b"m0")).await.unwrap();
    sink.flush().await.unwrap();
    for i in 1..5u8 {
        sink.send(Bytes::from(vec![i; 100])).await.unwrap();
    }
    // Refused by the stream, not by the client (under the server's max_payload).
    sink.send(Bytes::from(vec![0xEE; 4096])).await.unwrap();
    for i in 6..11u8 {
        sink.send(Bytes::from(vec![i; 100])).await.unwrap();
    }
    let err = tokio::time::timeout(HANG, sink.flush())
        .await
        .expect("flush hung")
        .unwrap_err();
    assert!(
        matches!(
            err.transport_error::<ClusterError>(),
            Some(ClusterError::PublishFailed { .. })
        ),
        "{err}"
    );
    let o = sink.outcome();
    assert_eq!((o.accepted, o.acked, o.pending), (11, 5, 0), "{o:?}");
    assert_eq!(o.not_stored + o.unknown, 6, "{o:?}");
    drop(sink);

    // Every replica applies on: no write error anywhere. A follower may be
    // briefly "not current" while it applies the last messages (seen on
    // 2.9.10 under load), so this waits; the stop on 2.14+ is permanent.
    nats.eventually(Duration::from_secs(20), async |nats: &NatsCluster| {
        for i in 0..3 {
            flowctl_cluster::testing::healthy(&nats.monitor(i))
                .await
                .map_err(|e| format!("n{i} after the refused message: {e}"))?;
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // The stream holds exactly the five before it, and takes new writes.
    let js = cluster.jetstream();
    let mut st = js.get_stream("REFUSE").await.unwrap();
    let state = st.info().await.unwrap().state.clone();
    assert_eq!((state.messages, state.last_sequence), (5, 5), "{state:?}");
    let ack = tokio::time::timeout(HANG, async {
        js.publish("refuse.x", Bytes::from_static(b"after"))
            .await
            .unwrap()
            .await
    })
    .await
    .expect("a publish after the refused message hung")
    .expect("the stream takes writes after the refused message");
    assert_eq!(ack.sequence, 6);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}
