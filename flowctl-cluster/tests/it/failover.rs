use std::time::{Duration, Instant};

use bytes::Bytes;
use flowctl_cluster::{Cluster, ConsumeOptions, PublishOptions};
use flowctl_core::lifecycle::Ledger;
use flowctl_core::prelude::*;
use flowctl_core::{Source, Watermarks};

use crate::connect::{config, released};
use crate::pull::stream_and_consumer;
use flowctl_cluster::testing::NatsCluster;

#[derive(Debug, Clone, Copy)]
enum Victim {
    /// The node the consumer is connected to.
    ConsumerNode,
    /// The node leading the stream's raft group.
    StreamLeader,
    /// The consumer's node, frozen with SIGSTOP instead of killed: only the
    /// client's pings can tell.
    HungConsumerNode,
}

fn node_index(name: &str) -> usize {
    name.trim_start_matches('n')
        .parse()
        .expect("node names are n0..n2")
}

async fn failover(victim: Victim) {
    const N: u64 = 3000;
    // The fault comes when the consumer has taken everything published so
    // far: its buffer is empty and its pull requests wait on the server with
    // the whole `high` as demand. Those requests outlive a reconnect (they
    // live until their `expires` on the consumer leader): if the source
    // forgot them and asked again, both would deliver (`max_buffered` up to
    // twice `high`).
    const KILL_AT: u64 = N / 2;
    // Large enough that `max_bytes`, not `batch`, limits each pull.
    const SIZE: usize = 1024;
    const HIGH: usize = 32 * 1024;
    let mut nats = NatsCluster::start().await.expect("nats cluster");
    let ledger = Ledger::new();
    let admin = Cluster::connect(config(nats.urls(), &ledger))
        .await
        .unwrap();
    stream_and_consumer(&admin, "FO", "fo.>", "c", Duration::from_secs(2)).await;
    let mut st = admin.jetstream().get_stream("FO").await.unwrap();
    // The stream's and the consumer's raft groups elect their leaders
    // after the create returns (seen on 2.10.26): wait for both.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (stream_leader, consumer_leader) = loop {
        let s = st
            .info()
            .await
            .unwrap()
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone());
        let c = st
            .consumer_info("c")
            .await
            .unwrap()
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone());
        if let (Some(s), Some(c)) = (s, c) {
            break (node_index(&s), node_index(&c));
        }
        assert!(Instant::now() < deadline, "no stream or consumer leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(st);
    drop(admin);
    // ConsumerNode: the consumer sits on a node that leads nothing, so only
    // the client fails over. StreamLeader: the consumer sits elsewhere.
    let (consumer_node, victim_node) = match victim {
        Victim::ConsumerNode | Victim::HungConsumerNode => {
            let n = (0..3)
                .find(|i| *i != stream_leader && *i != consumer_leader)
                .unwrap_or((stream_leader + 1) % 3);
            (n, n)
        }
        Victim::StreamLeader => ((stream_leader + 1) % 3, stream_leader),
    };
    let mut seeds = vec![nats.url(consumer_node)];
    seeds.extend((0..3).filter(|i| *i != consumer_node).map(|i| nats.url(i)));
    let mut cfg = config(seeds, &ledger);
    cfg.retry.max_attempts = 1;
    let consumer = Cluster::connect(cfg).await.unwrap();
    assert_eq!(
        node_index(&consumer.client().server_info().server_name),
        consumer_node
    );
    // The producer goes through a node that survives.
    let producer_seeds: Vec<String> = (0..3)
        .filter(|i| *i != victim_node)
        .map(|i| nats.url(i))
        .collect();
    let producer = Cluster::connect(config(producer_seeds, &ledger))
        .await
        .unwrap();
    let mut sink = producer
        .publisher(
            "fo.x",
            PublishOptions {
                watermarks: Watermarks::new(16 * 1024, 64 * 1024).unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // The second half is published only after the kill, through the election.
    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let producing = tokio::spawn(async move {
        let mut killed_rx = Some(killed_rx);
        for i in 0..N {
            if i == N / 2
                && let Some(rx) = killed_rx.take()
            {
                let _ = rx.await;
            }
            let mut payload = vec![0u8; SIZE];
            payload[..8].copy_from_slice(&i.to_be_bytes());
            sink.send(Bytes::from(payload)).await?;
        }
        sink.close().await?;
        Ok::<_, flowctl_core::FlowError>(sink.acked())
    });
    let mut src = consumer
        .consume(
            "FO",
            "c",
            ConsumeOptions {
                watermarks: Watermarks::new(8 * 1024, HIGH).unwrap(),
                batch: 64,
                heartbeat: Duration::from_millis(500),
                // Well beyond the hung node's detection (~3 s of pings) and
                // the stall below, so the requests sent before the fault are
                // still open when the second half is published.
                expires: Duration::from_secs(8),
                hold_timeout: Duration::from_secs(6),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut expect = 0u64;
    let mut killed_at = None;
    let mut killed_tx = Some(killed_tx);
    let mut first_new = u64::MAX;
    let mut resume = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    while expect < N {
        let m = tokio::time::timeout_at(deadline.into(), src.recv())
            .await
            .unwrap_or_else(|_| panic!("stalled at {expect} of {N}: {:?}", src.pull_stats()))
            .unwrap()
            .expect("stream ended");
        let got = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
        assert_eq!(
            got, expect,
            "lost, duplicated or reordered (stream seq {})",
            m.stream_seq
        );
        expect += 1;
        if let (Some(k), None) = (killed_at, resume)
            && got >= first_new
        {
            resume = Some(Instant::now().duration_since(k));
        }
        if expect == KILL_AT {
            let reconnects = consumer.reconnects();
            match victim {
                Victim::HungConsumerNode => nats.freeze(victim_node).expect("SIGSTOP"),
                _ => nats.kill(victim_node).await.expect("SIGKILL"),
            }
            killed_at = Some(Instant::now());
            if !matches!(victim, Victim::StreamLeader) {
                // The client has left the node and subscribed again elsewhere.
                let t = Instant::now();
                while consumer.reconnects() == reconnects {
                    assert!(t.elapsed() < Duration::from_secs(30), "no reconnect");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // The source sees the reconnect (or missed heartbeats) and
            // re-issues its demand while nothing new is in the stream.
            let idle = tokio::time::timeout(Duration::from_millis(1200), src.recv()).await;
            assert!(idle.is_err(), "a message before the second half: {idle:?}");
            // The first message published after the kill measures the resume.
            first_new = N / 2;
            if let Some(tx) = killed_tx.take() {
                let _ = tx.send(());
            }
            // A stalled consumer: every open request (old and new) fills up.
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    }
    let stats = src.stats();
    assert!(
        stats.max_buffered <= HIGH + SIZE,
        "buffered {} bytes against high {HIGH} (+ one {SIZE}-byte message): {:?}",
        stats.max_buffered,
        src.pull_stats()
    );
    let acked = producing.await.unwrap().unwrap();
    assert_eq!(acked, N);
    let info = consumer
        .jetstream()
        .get_stream("FO")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.state.messages, N, "the stream holds each message once");
    eprintln!(
        "failover ({victim:?}: fault on n{victim_node}; consumer on n{consumer_node}, stream leader n{stream_leader}, consumer leader n{consumer_leader}): first message published after the fault received {:?} after it; max buffered {} (high {HIGH}); {:?}; reconnects {}",
        resume,
        stats.max_buffered,
        src.pull_stats(),
        consumer.reconnects()
    );
    drop(src);
    drop(consumer);
    drop(producer);
    released(&ledger, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_node_sigkill_resumes_exactly_once_in_order() {
    failover(Victim::ConsumerNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_sigkill_resumes_exactly_once_in_order() {
    failover(Victim::StreamLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_consumer_node_is_detected_by_pings_and_left() {
    failover(Victim::HungConsumerNode).await;
}
