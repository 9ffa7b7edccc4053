//! `cluster`: JetStream on a 3-node `nats-server` cluster, with a node
//! SIGKILLed and restarted under live traffic.
//!
//! One [`Publisher`] (flowctl-cluster's Sink) publishes [`encode`]d messages
//! to an R3 stream; one [`PullSource`] (its Source) reads them through a
//! durable pull consumer, and the [`Checker`] finds anything lost, duplicated
//! or reordered. The publisher and the consumer have connections of their
//! own, to different first seeds, so a kill can hit either, both or neither.
//!
//! Faults, on the seeded schedule:
//! - **Consumer stalls** of 20-300 ms (not reading at all): the source's
//!   buffered bytes must stay within `high + one message`, the rest waits on
//!   the server (the demand stops, not the buffering).
//! - **Node SIGKILL + restart** (local cluster only): a random node is killed
//!   by pid within the first third of the run, stays down 0.3-1.5 s, is
//!   restarted on the same ports and store, and the next kill waits until
//!   every node reports healthy (JetStream current) again. At least one kill
//!   per run is required. The publisher re-sends through elections (server
//!   dedupe keeps it once, the expected-last chain keeps it in order); the
//!   source drops redeliveries and holds back after lost deliveries.
//!
//! The bound of both stages is `high + one message`. For the source that is
//! also true while it holds messages back after a failover, because the
//! consumer's `max_ack_pending` times the largest message is at most that:
//! every message the source buffers is one it has not acknowledged yet.
//!
//! The end: the publisher is closed (every message acknowledged), the
//! consumer drains until it has everything, the stream is deleted, the
//! connections are dropped; then the global ledger and the runtime's task
//! count must come back to where they were, and every node's `/subsz` and
//! `/connz` must show nothing of ours (polled: servers update them
//! asynchronously). The local cluster is stopped by pid before returning.
//!
//! The scenario runs on the runner's current_thread runtime: flowctl-cluster
//! and async-nats need nothing more. The fixture's waits are async polls.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use flowctl_cluster::{
    Cluster, ClusterConfig, ConsumeOptions, PublishOptions, Publisher, PullSource,
};
use flowctl_core::lifecycle::Ledger;
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{FlowStats, Sink, Source, Watermarks};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Ctx, Faults, Outcome};
use crate::check::{Checker, MIN_MESSAGE, encode};
use crate::opts::Inject;
use crate::watch::Watched;
use flowctl_cluster::testing::{self as nats, FixtureError, NODES, NatsCluster};

/// Largest message published (the smallest is [`MIN_MESSAGE`]).
pub(crate) const MAX_MESSAGE: usize = 1024;
/// Watermarks of the publisher (un-acked bytes) and the pull source.
pub(crate) const LOW: usize = 32 * 1024;
pub(crate) const HIGH: usize = 128 * 1024;
/// The consumer's `max_ack_pending`: with it, even held-back messages stay
/// within `HIGH` bytes (see the module docs).
const MAX_ACK_PENDING: i64 = (HIGH / MAX_MESSAGE) as i64;
/// The consumer's `ack_wait`: how soon deliveries lost with a node come again.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// How far the publisher may run ahead of the consumer, in messages: a disk
/// bound for the stream (not a flow control under test), together with
/// [`STREAM_MAX_BYTES`], which it keeps well clear of.
const MAX_LEAD: u64 = 20_000;
const STREAM_MAX_BYTES: i64 = 512 * 1024 * 1024;
/// Cluster start, and readiness after a restart (stream catch-up included).
const READY_LIMIT: Duration = Duration::from_secs(60);
/// After the deadline: time for the last publish retries through an election
/// and for redeliveries after a late kill.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(90);
/// Time for the ledger, the tasks and the servers' accounting to settle.
const RELEASE_GRACE: Duration = Duration::from_secs(15);
/// In the drain: this long without a message while some are missing, the
/// stream's and the consumer's leaders are asked to step down. nats-server
/// (seen with 2.9.10) can leave, after SIGKILLs, the consumer leader on a
/// node whose stream replica stopped catching up, or a stale node as stream
/// leader: the pull requests wait there (`num_waiting` > 0, `num_pending`
/// 0) while the other replicas hold the rest. Not the source's doing.
const STALL_NUDGE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Batches of up to 64 as fast as they come.
    Fast,
    /// One at a time, pausing 1 ms every 16 messages.
    Slow,
    /// Not reading at all (a fault).
    Stalled,
}

/// Names that mark everything of this run on the servers.
#[derive(Debug)]
pub(crate) struct Names {
    stream: String,
    subject: String,
    /// Inbox prefix of both connections: every subscription of ours.
    inbox: String,
    /// Prefix of both connections' names.
    conn: String,
}

impl Names {
    fn new(seed: u64) -> Self {
        let tag = format!("{}_{seed:x}", std::process::id());
        Names {
            stream: format!("SOAK_{tag}"),
            subject: format!("soak.{tag}.data"),
            inbox: format!("_SOAK_{tag}"),
            conn: format!("flowctl-soak-{tag}"),
        }
    }
}

pub(crate) fn failed(violation: String) -> Outcome {
    Outcome {
        tally: Default::default(),
        bytes: 0,
        max_buffered: 0,
        bound: HIGH + MAX_MESSAGE,
        faults: 0,
        latencies_us: Vec::new(),
        violations: vec![violation],
    }
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// The NATS cluster a scenario runs against (the local one it starts, or
/// `--nats`), and the baseline everything must come back to at the end.
#[derive(Debug)]
pub(crate) struct Baseline {
    label: &'static str,
    tasks_before: usize,
    ledger_before: usize,
    monitors: Vec<String>,
}

impl Baseline {
    /// Takes the baseline, then starts the local cluster (unless `--nats`
    /// names one). Returns it, its client URLs and a note for the run's output.
    pub(crate) async fn start(
        ctx: &Ctx<'_>,
        label: &'static str,
    ) -> Result<(Baseline, Option<NatsCluster>, Vec<String>, Option<String>), String> {
        let tasks_before = alive_tasks();
        let ledger_before = Ledger::global().total();
        let t0 = Instant::now();
        let (local, seeds, monitors) = match ctx.nats {
            Some(n) => (
                None,
                n.urls.clone(),
                n.monitor.iter().map(|u| nats::monitor_addr(u)).collect(),
            ),
            None => {
                let c = NatsCluster::start_with("", READY_LIMIT)
                    .await
                    .map_err(|e| match e {
                        FixtureError::ServerNotFound { .. } => {
                            format!("{e}, or pass --nats URL,... to use a running cluster")
                        }
                        e => e.to_string(),
                    })?;
                let (urls, monitors) = (c.urls(), c.monitors());
                (Some(c), urls, monitors)
            }
        };
        let note = local.as_ref().map(|c| {
            format!(
                "local {NODES}-node cluster ({}) ready in {:.1}s",
                c.bin().display(),
                t0.elapsed().as_secs_f64()
            )
        });
        let base = Baseline {
            label,
            tasks_before,
            ledger_before,
            monitors,
        };
        Ok((base, local, seeds, note))
    }

    /// The end: waits until the ledger and the runtime's tasks are back to
    /// the baseline and no node shows anything of ours (violations
    /// otherwise), stops the local cluster and prints the notes.
    pub(crate) async fn finish(
        self,
        names: &Names,
        local: Option<NatsCluster>,
        outcome: &mut Outcome,
        notes: &mut Vec<String>,
    ) {
        let (label, tasks_before, ledger_before) =
            (self.label, self.tasks_before, self.ledger_before);
        // Everything of ours is gone from the process...
        let settled = tokio::time::timeout(RELEASE_GRACE, async {
            while Ledger::global().total() > ledger_before || alive_tasks() > tasks_before {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if settled.is_err() {
            outcome.violations.push(format!(
                "{label}: {RELEASE_GRACE:?} after the end, {} tasks alive (was {tasks_before}) and ledger {:?}",
                alive_tasks(),
                Ledger::global().snapshot()
            ));
        }
        // ...and from the servers.
        let up: Vec<String> = match &local {
            Some(c) => (0..NODES)
                .filter(|i| c.is_up(*i))
                .map(|i| self.monitors[i].clone())
                .collect(),
            None => self.monitors,
        };
        if up.is_empty() {
            notes.push("server-side leak check skipped: no --nats-monitor URLs".into());
        } else if let Err(e) = leftovers(&up, names, local.is_some()).await {
            outcome.violations.push(format!("{label}: {e}"));
        }
        if let Some(c) = local
            && let Err(e) = c.stop(!outcome.violations.is_empty()).await
        {
            outcome
                .violations
                .push(format!("{label}: stopping the local cluster: {e}"));
        }
        for note in notes.iter() {
            eprintln!("  {label}: {note}");
        }
    }
}

pub(crate) async fn run(ctx: &Ctx<'_>) -> Outcome {
    let (base, local, seeds, note) = match Baseline::start(ctx, "cluster").await {
        Ok(started) => started,
        Err(e) => return failed(format!("cluster: {e}")),
    };
    let mut soak = Soak::new(ctx, "cluster", seeds);
    soak.notes.extend(note);
    let (local, mut outcome) = soak.run(local).await;
    base.finish(&soak.names, local, &mut outcome, &mut soak.notes)
        .await;
    outcome
}

/// Polls every node until none shows a subscription under our prefixes or a
/// connection of ours (`strict`: any client connection at all, the local
/// cluster has no other clients), or [`RELEASE_GRACE`] passes.
async fn leftovers(monitors: &[String], names: &Names, strict: bool) -> Result<(), String> {
    let prefixes = [names.inbox.as_str(), names.subject.as_str()];
    let deadline = Instant::now() + RELEASE_GRACE;
    loop {
        let mut problems = Vec::new();
        for addr in monitors {
            match nats::subscriptions(addr).await {
                Ok(subs) => {
                    let ours: Vec<&String> = subs
                        .iter()
                        .filter(|s| prefixes.iter().any(|p| s.starts_with(p)))
                        .collect();
                    if !ours.is_empty() {
                        problems.push(format!(
                            "{} subscriptions of ours left on {addr} (/subsz), e.g. {:?}",
                            ours.len(),
                            &ours[..ours.len().min(3)]
                        ));
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
            match nats::connections(addr).await {
                Ok(conns) => {
                    let ours: Vec<&String> = conns
                        .iter()
                        .map(|c| &c.name)
                        .filter(|c| strict || c.starts_with(&names.conn))
                        .collect();
                    if !ours.is_empty() {
                        problems.push(format!(
                            "{} client connections left on {addr} (/connz): {ours:?}",
                            ours.len()
                        ));
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{}; {RELEASE_GRACE:?} after the end",
                problems.join("; ")
            ));
        }
        // A polling interval: the servers have no "settled" notification.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One scenario's JetStream traffic: its names on the servers, the seeds,
/// and what it found. The `pipeline` scenario drives its NATS hop with it.
pub(crate) struct Soak<'c, 'm> {
    pub(crate) ctx: &'c Ctx<'m>,
    /// The scenario's name, the prefix of its violations.
    pub(crate) label: &'static str,
    pub(crate) names: Names,
    seeds: Vec<String>,
    pub(crate) faults: Arc<Faults>,
    pub(crate) violations: Vec<String>,
    /// What a person reading the run wants to know beyond the table.
    pub(crate) notes: Vec<String>,
}

/// What the producer task did.
struct Produced {
    /// Messages that count as sent: all of them after a clean close,
    /// the acknowledged ones after a failure.
    sent: u64,
    stats: FlowStats,
    error: Option<String>,
    /// `Publisher::rechained`: stream leaders found behind the last ack.
    rechained: u64,
}

impl<'c, 'm> Soak<'c, 'm> {
    pub(crate) fn new(ctx: &'c Ctx<'m>, label: &'static str, seeds: Vec<String>) -> Self {
        Soak {
            ctx,
            label,
            names: Names::new(ctx.seed),
            seeds,
            faults: Arc::new(Faults::default()),
            violations: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn config(&self, first: usize, role: &str) -> ClusterConfig {
        let mut seeds = self.seeds.clone();
        let n = seeds.len().max(1);
        seeds.rotate_left(first % n);
        let mut c = ClusterConfig::new(seeds);
        c.name = Some(format!("{}-{role}", self.names.conn));
        c.inbox_prefix = Some(self.names.inbox.clone());
        c
    }

    /// Connects, creates the stream and its consumer, and runs the traffic
    /// and the faults until the deadline and the drain. Gives the local
    /// cluster back (all its nodes up unless a restart failed).
    async fn run(&mut self, local: Option<NatsCluster>) -> (Option<NatsCluster>, Outcome) {
        let ctx = self.ctx;
        let wm = Watermarks::new(LOW, HIGH).expect("valid watermarks");
        let bound = HIGH + MAX_MESSAGE;
        let mut rng = fastrand::Rng::with_seed(ctx.seed ^ 0x434c_5553);
        let first = rng.usize(..self.seeds.len().max(1));
        let second = first + 1 + rng.usize(..self.seeds.len().max(2) - 1);
        let publisher_cluster = match Cluster::connect(self.config(first, "publisher")).await {
            Ok(c) => c,
            Err(e) => return (local, failed(format!("cluster: publisher connect: {e}"))),
        };
        let consumer_cluster = match Cluster::connect(self.config(second, "consumer")).await {
            Ok(c) => c,
            Err(e) => return (local, failed(format!("cluster: consumer connect: {e}"))),
        };
        let (sink, src) = match self.setup(&publisher_cluster, &consumer_cluster, wm).await {
            Ok(pair) => pair,
            Err(e) => {
                self.delete_stream(&publisher_cluster).await;
                return (local, failed(format!("cluster: {e}")));
            }
        };
        self.notes.push(format!(
            "publisher on {}, consumer on {}",
            publisher_cluster.client().server_info().server_name,
            consumer_cluster.client().server_info().server_name
        ));

        let killer = Killer::start(local, ctx, self.faults.clone(), &mut self.notes);

        let pub_snap = Watched::new("cluster publisher", bound, "high + one message");
        let src_snap = Watched::new("cluster pull source", bound, "high + one message");
        pub_snap.probe(ctx.monitor);
        src_snap.probe(ctx.monitor);

        let consumed = Arc::new(AtomicU64::new(0));
        let (done_tx, done_rx) = watch::channel(None);
        let producer = tokio::spawn(produce(
            sink,
            ctx.seed,
            ctx.start,
            ctx.deadline,
            consumed.clone(),
            pub_snap.clone(),
            done_tx,
        ));
        let (checker, src, bytes) = self
            .consume(
                src,
                consumer_cluster.client(),
                &src_snap,
                &consumed,
                done_rx,
            )
            .await;
        let produced = match tokio::time::timeout(DRAIN_GRACE, producer).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                self.violations
                    .push(format!("cluster: the producer panicked: {e}"));
                Produced {
                    sent: 0,
                    stats: pub_snap.last(),
                    error: None,
                    rechained: 0,
                }
            }
            Err(_) => {
                self.violations.push(format!(
                    "cluster: the producer had not finished {DRAIN_GRACE:?} after the consumer"
                ));
                Produced {
                    sent: 0,
                    stats: pub_snap.last(),
                    error: None,
                    rechained: 0,
                }
            }
        };
        if let Some(e) = produced.error {
            self.violations.push(e);
        }

        let local = killer
            .finish(
                "cluster",
                &self.faults,
                &mut self.notes,
                &mut self.violations,
            )
            .await;

        let src_stats = src.stats();
        src_snap.record(src_stats);
        let ps = src.pull_stats();
        self.notes.push(format!(
            "pull source: {} pulls, {} redeliveries dropped, {} demand resets, {} deliveries missed ({} read from the stream), {} hold-backs expired; publisher: {} stream leaders behind its last ack; reconnects: publisher {}, consumer {}",
            ps.pulls,
            ps.duplicates,
            ps.resets,
            ps.missed,
            ps.filled,
            ps.hold_expired,
            produced.rechained,
            publisher_cluster.reconnects(),
            consumer_cluster.reconnects()
        ));
        drop(src);
        self.delete_stream(&publisher_cluster).await;
        drop(consumer_cluster);
        drop(publisher_cluster);

        let (max_buffered, _) =
            crate::watch::judge("cluster", [&*pub_snap, &*src_snap], &mut self.violations);
        self.notes.push(format!(
            "max buffered: publisher {} B, pull source {} B (bound {bound} B each)",
            produced.stats.max_buffered, src_stats.max_buffered
        ));
        let sent = HashMap::from([(0, produced.sent)]);
        let outcome = Outcome {
            tally: checker.finish(&sent),
            bytes,
            max_buffered,
            bound,
            faults: self.faults.total(),
            latencies_us: checker.latencies_us().to_vec(),
            violations: std::mem::take(&mut self.violations),
        };
        (local, outcome)
    }

    /// The R3 stream, its durable pull consumer, the publisher and the source.
    pub(crate) async fn setup(
        &self,
        publisher_cluster: &Cluster,
        consumer_cluster: &Cluster,
        wm: Watermarks,
    ) -> Result<(Publisher, PullSource), String> {
        let js = publisher_cluster.jetstream();
        // An R3 stream or consumer is a raft group: on a loaded machine its
        // creation can outlast the request timeout and still complete.
        // Creating again with the same config is idempotent, so retry.
        let stream_config = stream::Config {
            name: self.names.stream.clone(),
            subjects: vec![self.names.subject.clone()],
            num_replicas: NODES,
            max_bytes: STREAM_MAX_BYTES,
            ..Default::default()
        };
        retry_create(|| js.create_stream(stream_config.clone()))
            .await
            .map_err(|e| format!("cannot create the R3 stream {}: {e}", self.names.stream))?;
        let consumer_config = consumer::pull::Config {
            durable_name: Some("verify".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        };
        retry_create(|| js.create_consumer_on_stream(consumer_config.clone(), &self.names.stream))
            .await
            .map_err(|e| format!("cannot create the consumer: {e}"))?;
        let sink = publisher_cluster
            .publisher(
                &self.names.subject,
                PublishOptions {
                    watermarks: wm,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("cannot make the publisher: {e}"))?;
        // The consumer's info request meets the same raft group: on a loaded
        // machine it can time out while the group elects its leader (seen
        // once); `consume` releases everything it started when it fails.
        let src = retry_create(|| {
            consumer_cluster.consume(
                &self.names.stream,
                "verify",
                ConsumeOptions {
                    watermarks: wm,
                    batch: 64,
                    expires: Duration::from_secs(2),
                    heartbeat: Duration::from_millis(500),
                    hold_timeout: ACK_WAIT * 3,
                    ..Default::default()
                },
            )
        })
        .await
        .map_err(|e| format!("cannot start the pull source: {e}"))?;
        Ok((sink, src))
    }

    /// Deletes the stream (and with it the consumer): an external cluster
    /// must not keep it, and its subject must leave `/subsz`.
    pub(crate) async fn delete_stream(&mut self, cluster: &Cluster) {
        let label = self.label;
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            cluster.jetstream().delete_stream(&self.names.stream),
        )
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.to_string().contains("not found") => {}
            Ok(Err(e)) => self.violations.push(format!(
                "{label}: cannot delete the stream {}: {e}",
                self.names.stream
            )),
            Err(_) => self.violations.push(format!(
                "{label}: deleting the stream {} took more than 10 s",
                self.names.stream
            )),
        }
    }

    /// Asks the stream's and the consumer's leaders to step down (see
    /// [`STALL_NUDGE`]), and says so in the notes.
    async fn nudge(&mut self, client: &async_nats::Client, received: u64, total: Option<u64>) {
        let stream = &self.names.stream;
        let mut done = Vec::new();
        for subject in [
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
            format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.verify"),
        ] {
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                client.request(subject.clone(), Default::default()),
            )
            .await;
            let what = match r {
                Ok(Ok(m)) => String::from_utf8_lossy(&m.payload).into_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer in 5 s".into(),
            };
            done.push(format!("{subject}: {what}"));
        }
        self.notes.push(format!(
            "drain stalled {STALL_NUDGE:?} at {received} of {} messages (a server-side stall): leaders asked to step down: {}",
            total.map_or("?".into(), |t| t.to_string()),
            done.join("; ")
        ));
    }

    /// Reads and checks until everything the producer sent has come (or the
    /// drain grace passes), stalling now and then before the deadline.
    pub(crate) async fn consume(
        &mut self,
        mut src: PullSource,
        client: &async_nats::Client,
        snap: &Watched,
        consumed: &AtomicU64,
        mut done: watch::Receiver<Option<u64>>,
    ) -> (Checker, PullSource, u64) {
        let (ctx, label) = (self.ctx, self.label);
        let mut checker = Checker::default();
        let mut rng = fastrand::Rng::with_seed(ctx.seed);
        let mut phase = Phase::Fast;
        let mut phase_end = Instant::now();
        let drain_deadline = ctx.deadline + DRAIN_GRACE;
        let mut batch = Vec::with_capacity(64);
        let (mut received, mut bytes) = (0u64, 0u64);
        let mut last_progress = Instant::now();
        // Messages the `drop-one` injection made vanish here.
        let mut injected_drops = 0u64;
        loop {
            let total = *done.borrow();
            // Distinct messages: a duplicate must not end the wait for one
            // still to come (it would then read as lost).
            if total.is_some_and(|t| checker.distinct() + injected_drops >= t) {
                break;
            }
            let now = Instant::now();
            if now >= drain_deadline {
                self.violations.push(format!(
                    "{label}: {received} of {} messages received {DRAIN_GRACE:?} after the end",
                    total.map_or("?".into(), |t| t.to_string())
                ));
                break;
            }
            if now < ctx.deadline && now >= phase_end {
                phase = match rng.u32(..10) {
                    0..=4 => Phase::Fast,
                    5..=7 => Phase::Slow,
                    _ => Phase::Stalled,
                };
                let len = match phase {
                    Phase::Stalled => rng.u64(20..=300),
                    _ => rng.u64(50..500),
                };
                phase_end = now + Duration::from_millis(len);
                if let Phase::Stalled = phase {
                    self.faults.stalls.fetch_add(1, Relaxed);
                    tokio::time::sleep_until(phase_end).await;
                    continue;
                }
            }
            let slow = matches!(phase, Phase::Slow) && now < ctx.deadline;
            let nudge_at = last_progress.max(ctx.deadline) + STALL_NUDGE;
            if now >= nudge_at {
                self.nudge(client, received, total).await;
                last_progress = Instant::now();
                continue;
            }
            batch.clear();
            tokio::select! {
                r = src.recv_many(&mut batch, if slow { 1 } else { 64 }) => match r {
                    Ok(0) => {
                        self.violations.push(format!("{label}: the pull source ended"));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.violations.push(format!("{label}: the pull source failed: {e}"));
                        break;
                    }
                },
                r = done.changed(), if total.is_none() => {
                    if r.is_err() {
                        self.violations.push(format!("{label}: the producer vanished"));
                        break;
                    }
                    continue;
                }
                () = tokio::time::sleep_until(drain_deadline.min(nudge_at)) => continue,
            }
            last_progress = Instant::now();
            for msg in batch.drain(..) {
                received += 1;
                bytes += msg.payload.len() as u64;
                if ctx.inject == Some(Inject::DropOne) && received == 1000 {
                    injected_drops += 1;
                    continue; // the deliberate bug: message 1000 vanishes
                }
                checker.observe(&msg.payload, ctx.now_us());
            }
            consumed.store(received, Relaxed);
            snap.record(src.stats());
            ctx.progress.messages.store(received, Relaxed);
            ctx.progress.bytes.store(bytes, Relaxed);
            if slow && received % 16 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        (checker, src, bytes)
    }
}

/// Publishes until the deadline, then closes the sink (waiting for every
/// ack) and announces how many count as sent.
async fn produce(
    mut sink: Publisher,
    seed: u64,
    start: Instant,
    deadline: Instant,
    consumed: Arc<AtomicU64>,
    snap: Arc<Watched>,
    done: watch::Sender<Option<u64>>,
) -> Produced {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5055_4253);
    let mut seq = 0u64;
    let mut error = None;
    while Instant::now() < deadline {
        if seq.saturating_sub(consumed.load(Relaxed)) >= MAX_LEAD {
            // A polling interval: the lead is a disk bound, not under test.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let len = rng.usize(MIN_MESSAGE..=MAX_MESSAGE);
        let msg = encode(0, seq, start.elapsed().as_micros() as u64, len);
        if let Err(e) = sink.send(msg).await {
            error = Some(format!("cluster: publishing message {seq} failed: {e}"));
            break;
        }
        seq += 1;
        snap.record(sink.stats());
    }
    if error.is_none()
        && let Err(e) = sink.close().await
    {
        error = Some(format!("cluster: closing the publisher failed: {e}"));
    }
    let stats = sink.stats();
    snap.record(stats);
    let sent = if error.is_some() { sink.acked() } else { seq };
    let _ = done.send(Some(sent));
    Produced {
        sent,
        stats,
        error,
        rechained: sink.rechained(),
    }
}

/// Kills a node by pid within the first third of the run, restarts
/// it after 0.3-1.5 s, waits until the cluster is healthy again, and repeats
/// every 3-8 s while time remains. Always returns the cluster with every
/// node up (unless a restart failed, which is reported).
/// What the injector hands back: the cluster, its log and its problems.
type Injected = (NatsCluster, Vec<String>, Vec<String>);

/// The node-kill fault injector of a local cluster; with an external cluster
/// (`--nats`) there is none and no node is killed.
pub(crate) struct Killer {
    task: Option<tokio::task::JoinHandle<Injected>>,
    stop: watch::Sender<bool>,
}

impl Killer {
    /// Starts killing and restarting nodes of `local` on the seeded schedule.
    pub(crate) fn start(
        local: Option<NatsCluster>,
        ctx: &Ctx<'_>,
        faults: Arc<Faults>,
        notes: &mut Vec<String>,
    ) -> Killer {
        let (stop, stop_rx) = watch::channel(false);
        let task = local.map(|c| tokio::spawn(inject(c, ctx.deadline, ctx.seed, faults, stop_rx)));
        if task.is_none() {
            notes.push("external cluster: no node is killed".into());
        }
        Killer { task, stop }
    }

    /// Stops the faults (a node that is down comes back first) and returns
    /// the local cluster. A panicked injector, or one that never killed a
    /// node, is a violation of `scenario`.
    pub(crate) async fn finish(
        self,
        scenario: &str,
        faults: &Faults,
        notes: &mut Vec<String>,
        violations: &mut Vec<String>,
    ) -> Option<NatsCluster> {
        let _ = self.stop.send(true);
        match self.task?.await {
            Ok((c, log, problems)) => {
                notes.extend(log);
                violations.extend(problems);
                if faults.drops.load(Relaxed) == 0 {
                    violations.push(format!(
                        "{scenario}: no node was killed: the fault schedule did not run"
                    ));
                }
                Some(c)
            }
            Err(e) => {
                violations.push(format!("{scenario}: the fault injector panicked: {e}"));
                None
            }
        }
    }
}

async fn inject(
    mut nats: NatsCluster,
    deadline: Instant,
    seed: u64,
    faults: Arc<Faults>,
    mut stop: watch::Receiver<bool>,
) -> Injected {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x4b49_4c4c);
    let (mut log, mut problems) = (Vec::new(), Vec::new());
    let start = Instant::now();
    let span = deadline.saturating_duration_since(start);
    let mut next = start + span.mul_f64(0.1 + 0.25 * rng.f64());
    // Successive kills go round a seeded order of the nodes, so a long run
    // hits the publisher's, the consumer's and the leaders' nodes alike.
    let mut victims: Vec<usize> = (0..NODES).collect();
    rng.shuffle(&mut victims);
    for kill in 0.. {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => break,
        }
        let node = victims[kill % NODES];
        let down = Duration::from_millis(rng.u64(300..=1500));
        let pid = nats.pid(node).unwrap_or(0);
        let killed_at = Instant::now();
        if let Err(e) = nats.kill(node).await {
            problems.push(format!("cluster: {e}"));
            break;
        }
        faults.drops.fetch_add(1, Relaxed);
        // Not cut short by the end: the node must come back.
        tokio::time::sleep(down).await;
        if let Err(e) = nats.restart(node) {
            problems.push(format!("cluster: restarting n{node}: {e}"));
            break;
        }
        let restarted = Instant::now();
        let ready = nats.wait_ready(READY_LIMIT).await;
        log.push(format!(
            "n{node} (pid {pid}) SIGKILLed at {:.1}s, restarted after {down:?}, cluster healthy again {:.1}s later",
            killed_at.duration_since(start).as_secs_f64(),
            restarted.elapsed().as_secs_f64()
        ));
        for stuck in nats.take_recoveries() {
            log.push(format!(
                "a replica stopped applying its stream and its node was restarted to \
                 recover it (nats-server 2.14 and later; see the cluster reference): {stuck}"
            ));
        }
        if let Err(e) = ready {
            problems.push(format!("cluster: after restarting n{node}: {e}"));
            break;
        }
        next = Instant::now() + Duration::from_millis(rng.u64(3000..=8000));
        if next + Duration::from_secs(2) > deadline {
            break;
        }
    }
    (nats, log, problems)
}

/// Runs a JetStream create request up to three times while it times out.
async fn retry_create<T, E, F, Fut>(mut create: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut tries = 1;
    loop {
        match create().await {
            Err(e) if tries < 3 && e.to_string().to_lowercase().contains("timed out") => {
                tries += 1;
            }
            r => return r,
        }
    }
}
