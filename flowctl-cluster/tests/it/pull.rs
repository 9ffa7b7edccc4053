use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use bytes::Bytes;
use flowctl_cluster::{Cluster, ConsumeOptions, PullStats};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::prelude::*;
use flowctl_core::{Source, Watermarks};
use futures::FutureExt;

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
    create_stream(cluster, name, &[subject]).await;
    create_durable(cluster, name, durable, ack_wait, None).await;
}

/// Creates an R3 stream. The fixture is ready only once JetStream can place
/// an R3 stream on every release, so a refusal here (10005, `no suitable
/// peers for placement`) is a fixture bug and fails the test.
pub(crate) async fn create_stream(cluster: &Cluster, name: &str, subjects: &[&str]) {
    create_stream_with(
        cluster,
        stream::Config {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            num_replicas: 3,
            ..Default::default()
        },
    )
    .await;
}

/// [`create_stream`] with a whole config.
pub(crate) async fn create_stream_with(cluster: &Cluster, config: stream::Config) {
    let name = config.name.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    create_stream_placed(cluster, config.clone(), deadline).await;
    // The create answer can come before the stream's own raft group has a
    // leader: a publish then finds no responder (async-nats says
    // `StreamNotFound`; seen once on 2.12.8). A leader is not enough either:
    // a publish through a node whose replica was not created yet found none
    // (seen once on 2.15.1, right after the leader was known). Wait for the
    // leader and every other replica current.
    let replicas = config.num_replicas.max(1);
    let mut st = cluster.jetstream().get_stream(&name).await.unwrap();
    loop {
        let info = st.info().await.unwrap();
        if info.cluster.as_ref().is_some_and(|c| {
            c.leader.is_some()
                && c.replicas.len() + 1 == replicas
                && c.replicas.iter().all(|r| r.current && !r.offline)
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stream {name} has no leader and {replicas} current replicas after 30 s: {:?}",
            info.cluster
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling the server
    }
    // Only the stream leader subscribes to the stream's subjects; the other
    // nodes learn of that interest over their routes, later. A publish
    // through a node that has not yet heard of it finds no responder
    // (`StreamNotFound`; seen in CI on 2.15.1 with leader and replicas all
    // current). Probe every subject through this cluster's own connection
    // with a header the leader refuses before it proposes anything
    // (`Nats-Expected-Stream` naming another stream, 10060, checked before
    // the proposal on every release we test): nothing is stored, and the
    // answer proves the route carries the interest.
    probe_stream_subjects(cluster, &config, deadline).await;
}

/// Creates the stream, retrying what a busy or just-started cluster answers
/// until `deadline`, without waiting for it to take writes (see
/// [`create_stream_with`] for that).
///
/// A JetStream API request times out after 5 s (async-nats's default). With
/// several 3-node clusters starting at once on 2 cores, the meta leader has
/// been seen not to answer a create within that (stop 21, CI profile).
/// Creating the same config again is idempotent, so a timeout is retried,
/// and so is 10005 "no suitable peers": the meta leader places a replica
/// only on a peer whose JetStream statistics reached it, a moment after it
/// joined (the fixture probes placement, except on clusters that ask for TLS
/// or credentials). Any other error fails at once.
pub(crate) async fn create_stream_placed(
    cluster: &Cluster,
    config: stream::Config,
    deadline: std::time::Instant,
) {
    use async_nats::jetstream::context::CreateStreamErrorKind as K;
    let retried = |kind: &K| match kind {
        K::TimedOut => true,
        K::JetStream(e) => e.error_code() == async_nats::jetstream::ErrorCode::CLUSTER_NO_PEERS,
        _ => false,
    };
    loop {
        match cluster.jetstream().create_stream(config.clone()).await {
            Ok(_) => return,
            Err(e) if retried(&e.kind()) && std::time::Instant::now() < deadline => {
                // Polling the meta leader: it has no placement notification.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("create stream {}: {e}", config.name),
        }
    }
}

/// Publishes to each of the stream's subjects (wildcard tokens filled in)
/// with a `Nats-Expected-Stream` it does not match, until the answer is the
/// stream's refusal rather than "no responders".
async fn probe_stream_subjects(
    cluster: &Cluster,
    config: &stream::Config,
    deadline: std::time::Instant,
) {
    use async_nats::jetstream::context::PublishErrorKind;
    let subjects = if config.subjects.is_empty() {
        vec![config.name.clone()]
    } else {
        config.subjects.clone()
    };
    let other = format!("{}-flowctl-probe", config.name);
    for subject in subjects {
        let concrete = subject
            .split('.')
            .map(|t| if t == "*" || t == ">" { "probe" } else { t })
            .collect::<Vec<_>>()
            .join(".");
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Expected-Stream", other.as_str());
            let answer = match cluster
                .jetstream()
                .publish_with_headers(concrete.clone(), headers, Bytes::new())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match answer {
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {}
                Err(e)
                    if std::error::Error::source(&e)
                        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                        .is_some_and(|j| {
                            j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_MATCH
                        }) =>
                {
                    break;
                }
                other => panic!(
                    "probe of {concrete} on stream {}: expected 10060 (expected stream \
                     does not match), got {other:?}",
                    config.name
                ),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "stream {}: a publish on {concrete} found no responder for 30 s",
                config.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await; // polling the routes
        }
    }
}

/// Polls the consumer's info until `done` holds: the server's own
/// accounting (redeliveries, acks, waiting requests), which has no event to
/// wait on. Fails after 30 s naming `what` and the last info.
pub(crate) async fn until_consumer(
    st: &stream::Stream,
    name: &str,
    what: &str,
    mut done: impl FnMut(&consumer::Info) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = st.consumer_info(name).await.unwrap();
        if done(&info) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited 30 s for {what}: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling the server
    }
}

/// Creates a durable pull consumer with explicit acks.
pub(crate) async fn create_durable(
    cluster: &Cluster,
    stream_name: &str,
    durable: &str,
    ack_wait: Duration,
    filter: Option<&str>,
) {
    cluster
        .jetstream()
        .create_consumer_on_stream(
            consumer::pull::Config {
                durable_name: Some(durable.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_ack_pending: 1000,
                filter_subject: filter.unwrap_or_default().into(),
                ..Default::default()
            },
            stream_name,
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
/// the redeliveries of what the application holds WITHOUT acking them, so
/// the application sees each once and the server still counts all 20 as
/// pending until the application's own acks.
#[tokio::test]
async fn manual_held_handles_stay_pending_on_the_server() {
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
    // Wait (on the server's state) until every unacked message was redelivered.
    let st = js.get_stream("MAN").await.unwrap();
    until_consumer(&st, "c", "every unacked message redelivered", |i| {
        i.num_redelivered >= 20
    })
    .await;
    // Delivered after the redeliveries: when it is handed out, the source
    // has seen them all.
    js.publish("man.x", Bytes::from(20u64.to_be_bytes().to_vec()))
        .await
        .unwrap()
        .await
        .unwrap();
    let m = src.recv().await.unwrap().unwrap();
    assert_eq!(m.stream_seq, 21, "redeliveries were not handed out again");
    assert!(src.pull_stats().duplicates >= 20);
    let info = st.consumer_info("c").await.unwrap();
    assert_eq!(
        info.num_ack_pending,
        21,
        "20 held handles + 1: the source must not ack for the application ({:?})",
        src.pull_stats()
    );
    for h in handles {
        h.ack().await.unwrap();
    }
    m.ack.unwrap().ack().await.unwrap();
    cluster.client().flush().await.unwrap();
    until_consumer(&st, "c", "the acks counted", |i| i.num_ack_pending == 0).await;
    drop(src);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}

/// At-least-once across a restart: a source on a durable consumer takes
/// 1..3 in Manual mode and goes away without acking; a new source on the
/// same durable gets 4..10 first and then 1..3 (redelivered after
/// `ack_wait`): it never handed them out, so it delivers them.
#[tokio::test]
async fn durable_restart_in_manual_mode_redelivers_what_was_never_acked() {
    use flowctl_cluster::AckMode;
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream_and_consumer(&cluster, "RST", "rst.>", "c", Duration::from_secs(2)).await;
    let js = cluster.jetstream();
    let publish = |i: u64| {
        let js = js.clone();
        async move {
            js.publish("rst.x", Bytes::from(i.to_be_bytes().to_vec()))
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    for i in 1..=3 {
        publish(i).await;
    }
    let opts = ConsumeOptions {
        ack: AckMode::Manual,
        ..Default::default()
    };
    let mut first = cluster.consume("RST", "c", opts.clone()).await.unwrap();
    for i in 1..=3u64 {
        let m = first.recv().await.unwrap().unwrap();
        assert_eq!(m.stream_seq, i);
        // The application crashes before processing: no ack.
    }
    drop(first);
    for i in 4..=10 {
        publish(i).await;
    }
    let mut second = cluster.consume("RST", "c", opts).await.unwrap();
    let mut got = std::collections::BTreeMap::new();
    let mut order = Vec::new();
    while got.len() < 10 {
        let m = tokio::time::timeout(Duration::from_secs(30), second.recv())
            .await
            .unwrap_or_else(|_| panic!("lost: got only {order:?} ({:?})", second.pull_stats()))
            .unwrap()
            .unwrap();
        order.push(m.stream_seq);
        assert!(
            got.insert(m.stream_seq, m.ack.expect("manual")).is_none(),
            "{} handed out twice: {order:?}",
            m.stream_seq
        );
    }
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    for h in got.values() {
        h.ack().await.unwrap();
    }
    cluster.client().flush().await.unwrap();
    let st = js.get_stream("RST").await.unwrap();
    until_consumer(&st, "c", "everything acked", |i| {
        i.num_ack_pending == 0 && i.num_pending == 0
    })
    .await;
    drop(second);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}

/// Order after lost deliveries follows the consumer, not contiguous stream
/// sequences: a filtered consumer on a multi-subject stream with deleted
/// messages, one delivery taken away (by a reader that never acks it, as a
/// failover loses one), keeps flowing in stream order once the server
/// redelivers it, although `hold_timeout` is 10 minutes.
///
/// `ack_wait` is 5 s: the messages in the source's buffer are unacked too,
/// and one redelivered before the other reader's fetch would be taken
/// instead of a new one (a slow machine takes over a second for the three
/// API calls in between).
#[tokio::test]
async fn filtered_consumer_with_deletions_keeps_flowing_after_a_lost_delivery() {
    let s = lost_delivery_on_a_filtered_consumer(false, Duration::from_secs(5)).await;
    assert_eq!(s.filled, 0, "{s:?}");
}

/// The same, reading the lost message from the stream: the consumer's
/// `ack_wait` is 10 minutes, so nothing is redelivered within the test's
/// limit; the message read from the stream stays pending on the server
/// (acked when its redelivery comes).
#[tokio::test]
async fn a_lost_delivery_is_read_from_the_stream_without_waiting_for_ack_wait() {
    let s = lost_delivery_on_a_filtered_consumer(true, Duration::from_secs(600)).await;
    assert_eq!((s.filled, s.fetch_failures), (1, 0), "{s:?}");
}

async fn lost_delivery_on_a_filtered_consumer(fill: bool, ack_wait: Duration) -> PullStats {
    use async_nats::jetstream::consumer::PullConsumer;
    use futures::StreamExt;
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    create_stream(&cluster, "ORD", &["ord.a", "ord.b"]).await;
    create_durable(&cluster, "ORD", "c", ack_wait, Some("ord.a")).await;
    let js = cluster.jetstream();
    const SIZE: usize = 512;
    let mut expect = Vec::new();
    for i in 0..300u64 {
        let subject = if i % 3 == 0 { "ord.b" } else { "ord.a" };
        let mut p = vec![0u8; SIZE];
        p[..8].copy_from_slice(&i.to_be_bytes());
        let ack = js
            .publish(subject, Bytes::from(p))
            .await
            .unwrap()
            .await
            .unwrap();
        if subject == "ord.a" {
            expect.push((ack.sequence, i));
        }
    }
    // Delete every fifth of the filtered messages.
    let st = js.get_stream("ORD").await.unwrap();
    let mut kept = Vec::new();
    for (k, (seq, i)) in expect.into_iter().enumerate() {
        if k % 5 == 4 {
            assert!(st.delete_message(seq).await.unwrap());
        } else {
            kept.push((seq, i));
        }
    }
    let (low, high) = (0, 8 * SIZE);
    let mut src = cluster
        .consume(
            "ORD",
            "c",
            ConsumeOptions {
                watermarks: Watermarks::new(low, high).unwrap(),
                batch: 16,
                hold_timeout: Duration::from_secs(600),
                fill_gaps_from_stream: fill,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    let first = src.recv().await.unwrap().unwrap();
    got.push(first.stream_seq);
    // The source's buffer is full and its requests are over: wait for the
    // server to hold none, then another reader takes the next delivery and
    // never acks it.
    until_consumer(&st, "c", "no open pull request", |i| i.num_waiting == 0).await;
    let other: PullConsumer = st.get_consumer("c").await.unwrap();
    let mut batch = other
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let taken = batch.next().await.expect("a message").unwrap();
    let taken_seq = taken.info().unwrap().stream_sequence;
    assert_eq!(
        taken.info().unwrap().delivered,
        1,
        "the other reader must take a first delivery, not a redelivery of the source's"
    );
    drop(taken);
    drop(batch);
    let hang = std::time::Instant::now() + Duration::from_secs(60);
    while got.len() < kept.len() {
        let m = tokio::time::timeout_at(hang.into(), src.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "stalled after {} of {} (taken away: {taken_seq}): {:?}",
                    got.len(),
                    kept.len(),
                    src.pull_stats()
                )
            })
            .unwrap()
            .unwrap();
        // What was read from the stream has the payload the stream holds.
        let i = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
        assert_eq!(kept.get(got.len()), Some(&(m.stream_seq, i)));
        got.push(m.stream_seq);
    }
    let want: Vec<u64> = kept.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        got,
        want,
        "lost, duplicated or out of order: {:?}",
        src.pull_stats()
    );
    let s = src.pull_stats();
    assert_eq!((s.missed, s.hold_expired), (1, 0), "{s:?}");
    if fill {
        // Everything else was acked; the one read from the stream waits for
        // its redelivery.
        until_consumer(&st, "c", "one message pending", |i| {
            i.num_ack_pending == 1 && i.ack_floor.stream_sequence < taken_seq
        })
        .await;
    }
    drop(src);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
    s
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

#[tokio::test]
async fn recv_dropped_at_every_wait_loses_nothing() {
    // Every `recv` that would wait is polled once and dropped (a `select!`
    // whose other branch won, a timeout): whatever it took off the
    // subscription on the way stays in the source, so every message is
    // handed out once, in order, and acked (nothing left pending).
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream_and_consumer(&cluster, "DROP", "drop.>", "c", Duration::from_secs(30)).await;
    const N: u64 = 1000;
    for i in 0..N {
        cluster
            .jetstream()
            .publish("drop.x", Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut src = cluster
        .consume(
            "DROP",
            "c",
            ConsumeOptions {
                watermarks: Watermarks::new(1024, 4096).unwrap(),
                batch: 16,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (mut expect, mut dropped) = (0u64, 0u64);
    let hang = std::time::Instant::now() + Duration::from_secs(60);
    while expect < N {
        assert!(
            std::time::Instant::now() < hang,
            "stalled at message {expect} after {dropped} dropped recvs: {:?}",
            src.pull_stats()
        );
        match src.recv().now_or_never() {
            Some(r) => {
                let m = r.unwrap().expect("stream ended early");
                let got = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
                assert_eq!(got, expect, "lost or out of order");
                expect += 1;
            }
            None => {
                dropped += 1;
                tokio::task::yield_now().await;
            }
        }
    }
    assert!(dropped > 0, "no recv was ever dropped mid-wait");
    assert_eq!(src.pull_stats().duplicates, 0);
    let st = cluster.jetstream().get_stream("DROP").await.unwrap();
    until_consumer(&st, "c", "every message acked", |i| {
        i.num_ack_pending == 0 && i.num_pending == 0
    })
    .await;
    drop(src);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}

/// A pull source with messages ready ends its slice every `max_items`
/// messages: its forced yields are counted on its stage. How many depends
/// on how the deliveries arrive (a natural `Pending` starts a new slice), so
/// only "some" is asserted: 200 messages in batches of 100 with slices of 4.
#[tokio::test]
async fn pull_forced_yields_are_counted() {
    let nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let cluster = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream_and_consumer(&cluster, "FAIR", "fair.>", "c", Duration::from_secs(30)).await;
    const N: u64 = 200;
    for i in 0..N {
        cluster
            .jetstream()
            .publish("fair.x", Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut src = cluster
        .consume(
            "FAIR",
            "c",
            ConsumeOptions {
                batch: 100,
                fairness: Fairness::new(4, usize::MAX).unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for i in 0..N {
        let m = src.recv().await.unwrap().unwrap();
        assert_eq!(m.payload[..], i.to_be_bytes());
    }
    assert!(src.stats().forced_yields > 0, "{:?}", src.stats());
    drop(src);
    drop(cluster);
    released(&ledger, Duration::from_secs(10)).await;
}
