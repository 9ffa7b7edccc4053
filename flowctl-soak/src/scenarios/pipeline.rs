//! `pipeline`: every transport chained, the way the project is meant to be
//! used, with the end-to-end check at the very end:
//!
//! ```text
//! producer task: check::encode -> length-delimited frames -> Stdin of remote `cat > FIFO`
//!   (flowctl-ssh, in-process russh server) -> FIFO -> remote `cat FIFO` -> stdout Output
//!   -> frame::Framed(LengthDelimitedCodec) -> offload::ordered(checksum + hashing, blocking pool)
//!   -> zmq hop task: flowctl-zmq PUSH (restarted with linger) --tcp 127.0.0.1--> PULL
//!   -> nats hop task: flowctl-cluster Publisher -> R3 JetStream stream on the 3-node cluster
//!   -> PullSource -> verifying consumer (stalls) -> check::Checker
//! ```
//!
//! One producer id and one SSH session for the whole run: every hop
//! promises order and nothing is at-most-once, so the consumer must receive
//! every message the remote `cat` accepted on stdin, exactly once and in
//! order, with its checksum intact. A hop task holds one item at most (it
//! `recv`s one, then `send`s it), so backpressure crosses it unchanged.
//!
//! # Faults (seeded)
//!
//! - **Consumer stalls**: the final consumer stops reading for 20-300 ms
//!   and has slow phases ([`cluster::Soak::consume`]). JetStream stores what
//!   the consumer has not read, so the NATS hop publishes at most
//!   [`MAX_LEAD`] messages ahead of the consumer; beyond that it stops
//!   reading the PULL, and the stall travels back: PUSH at its HWM, the PUSH
//!   sink at its high watermark, the offload, the framing, the stdout
//!   buffer, russh's window, the remote `cat`s, and our stdin.
//! - **ZeroMQ peer restarts**: the PUSH socket is closed (lingering, so
//!   what it accepted still goes out) and replaced by a new one, the first
//!   at 20-50% of the run, then every 2-5 s. The new socket sends only
//!   once the PULL has received everything the old one sent: ZeroMQ keeps
//!   order per connection, not across two, and the message ids come from
//!   the SSH producer.
//! - **NATS node SIGKILL + restart** (local cluster only), as in the
//!   `cluster` scenario ([`cluster::Killer`]): at least one per run.
//!
//! The SSH connection is not cut here (that loses a tail by design: the
//! `ssh` scenario covers it), so any message missing at the end is `lost`.
//!
//! # Invariants of its own
//!
//! Every stage is checked against its own bound; the report's
//! `max_buffered`/`bound` is the stage closest to its bound. The PULL holds
//! nothing of its own (a message stays in libzmq until `recv` returns it),
//! so it has no stage. At the end the ledger and the runtime's tasks are
//! back to where they were, the nodes' `/subsz` and `/connz` show nothing of
//! ours, and every socket is closed (the runner counts fds).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use flowctl_cluster::Cluster;
use flowctl_core::frame::Framed;
use flowctl_core::offload::ordered;
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, Sink, Source, Watermarks};
use flowctl_zmq::{SocketType, ZmqSink, ZmqSocket, ZmqSource};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::LengthDelimitedCodec;

use super::cluster::{self, Baseline, Soak};
use super::ssh::{self, MAX_PACKET, PREFIX, Remote, Verified, max_chunk};
use super::{Ctx, Outcome};
use crate::watch::{self as watched, Live, Recorded, Samplers, Watched};
use flowctl_cluster::testing::NatsCluster;

/// Largest message: the `cluster` scenario's, which its consumer's
/// `max_ack_pending` is sized for.
const MAX_MESSAGE: usize = cluster::MAX_MESSAGE;
/// How many messages the NATS hop may publish ahead of the final consumer.
/// Small enough that a consumer stall is felt back to the SSH producer.
const MAX_LEAD: u64 = 4096;
/// What the NATS hop waits between looks at the consumer's count while it
/// is [`MAX_LEAD`] ahead (the consumer publishes a plain counter).
const LEAD_POLL: Duration = Duration::from_millis(2);
/// The producer id of every message (one SSH session for the whole run).
const PRODUCER: u32 = 0;
/// Time for the remote commands, the hop tasks and the injector to end once
/// the stream is over.
const RELEASE_GRACE: Duration = Duration::from_secs(15);

fn ssh_watermarks() -> Watermarks {
    Watermarks::new(64 * 1024, 256 * 1024).expect("valid watermarks")
}

fn zmq_watermarks() -> Watermarks {
    Watermarks::new(16 * 1024, 64 * 1024).expect("valid watermarks")
}

/// Every stage with a buffer, and its bound.
struct Stages {
    stdin: Arc<Watched>,
    stdout: Arc<Watched>,
    frame: Arc<Watched>,
    offload: Arc<Watched>,
    push: Arc<Watched>,
    publisher: Arc<Watched>,
    source: Arc<Watched>,
}

impl Stages {
    fn new() -> Stages {
        let (ssh, zmq, nats_high) = (
            ssh_watermarks().high(),
            zmq_watermarks().high(),
            cluster::HIGH,
        );
        Stages {
            stdin: Watched::new(
                "ssh stdin",
                ssh + max_chunk(MAX_MESSAGE),
                "high + one chunk",
            ),
            stdout: Watched::new("ssh stdout", ssh + 2 * MAX_PACKET, "high + 2 * max_packet"),
            frame: Watched::new(
                "frame",
                PREFIX + MAX_MESSAGE + MAX_PACKET,
                "one partial frame + one packet",
            ),
            offload: Watched::new(
                "offload",
                ssh::offload_limits().max_inflight_bytes + MAX_MESSAGE,
                "max_inflight_bytes + one frame",
            ),
            push: Watched::new("zmq push", zmq + MAX_MESSAGE, "high + one message"),
            publisher: Watched::new(
                "nats publisher",
                nats_high + MAX_MESSAGE,
                "high + one message",
            ),
            source: Watched::new(
                "nats pull source",
                nats_high + MAX_MESSAGE,
                "high + one message",
            ),
        }
    }

    fn all(&self) -> [&Arc<Watched>; 7] {
        [
            &self.stdin,
            &self.stdout,
            &self.frame,
            &self.offload,
            &self.push,
            &self.publisher,
            &self.source,
        ]
    }
}

pub(crate) async fn run(ctx: &Ctx<'_>) -> Outcome {
    let (base, local, seeds, note) = match Baseline::start(ctx, "pipeline").await {
        Ok(started) => started,
        Err(e) => return cluster::failed(format!("pipeline: {e}")),
    };
    let mut soak = Soak::new(ctx, "pipeline", seeds);
    soak.notes.extend(note);
    let (local, mut outcome) = chain(&mut soak, local).await;
    base.finish(&soak.names, local, &mut outcome, &mut soak.notes)
        .await;
    outcome
}

/// Times of the seeded PUSH restarts.
fn restart_schedule(seed: u64, from: Instant, deadline: Instant) -> Vec<Instant> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x7069_7065_7a6d);
    let total = deadline.saturating_duration_since(from);
    let mut t = total.mul_f64(0.2 + 0.3 * rng.f64());
    let mut plan = Vec::new();
    while from + t < deadline {
        plan.push(from + t);
        t += Duration::from_millis(rng.u64(2000..5000));
    }
    plan
}

fn push_socket(endpoint: &str) -> Result<ZmqSink, FlowError> {
    Ok(ZmqSocket::builder(SocketType::Push)
        .watermarks(zmq_watermarks())
        .expected_message_size(MAX_MESSAGE / 2)
        .connect(endpoint)
        .build()?
        .into_sink())
}

/// What the ZeroMQ hop did.
#[derive(Debug, Default)]
struct ZmqHop {
    /// Messages the PUSH sockets accepted.
    sent: u64,
    /// Frames whose checksum failed in the offload (forwarded anyway: the
    /// consumer counts them as corrupted too).
    corrupt: u64,
    restarts: u64,
    violations: Vec<String>,
}

/// The offload's output into PUSH sockets, replacing the socket at each
/// restart time; announces how many it sent in `done` at the end.
async fn zmq_hop<S: Source<Item = Verified>>(
    mut src: S,
    endpoint: String,
    restarts: Vec<Instant>,
    stage: Arc<Watched>,
    mut pulled: watch::Receiver<u64>,
    done: watch::Sender<Option<u64>>,
    drain_deadline: Instant,
) -> ZmqHop {
    let mut hop = ZmqHop::default();
    let mut restarts = restarts.into_iter().peekable();
    let mut sink = match push_socket(&endpoint) {
        Ok(sink) => Some(sink),
        Err(e) => {
            hop.violations
                .push(format!("pipeline: PUSH could not connect: {e}"));
            None
        }
    };
    while let Some(s) = sink.as_mut() {
        if restarts.next_if(|at| Instant::now() >= *at).is_some() {
            // Close with linger: what the sink accepted still goes out.
            let closed = s.close().await;
            stage.record(s.stats());
            if let Err(e) = closed {
                hop.violations
                    .push(format!("pipeline: PUSH did not close cleanly: {e}"));
                sink = None;
                break;
            }
            // ZeroMQ orders per connection only: the next socket sends once
            // the PULL has everything this one sent.
            let sent = hop.sent;
            let caught_up =
                tokio::time::timeout_at(drain_deadline, pulled.wait_for(|n| *n >= sent)).await;
            if !matches!(caught_up, Ok(Ok(_))) {
                hop.violations.push(format!(
                    "pipeline: the PULL did not receive the {sent} messages of the closed PUSH socket"
                ));
                sink = None;
                break;
            }
            hop.restarts += 1;
            sink = match push_socket(&endpoint) {
                Ok(s) => Some(s),
                Err(e) => {
                    hop.violations
                        .push(format!("pipeline: restarted PUSH could not connect: {e}"));
                    None
                }
            };
            continue;
        }
        let v = match src.recv().await {
            Ok(Some(v)) => v,
            Ok(None) => break,
            Err(e) => {
                hop.violations
                    .push(format!("pipeline: the ssh stages failed: {e}"));
                break;
            }
        };
        if v.decoded.is_none() {
            hop.corrupt += 1;
        }
        std::hint::black_box(v.digest);
        if let Err(e) = s.send(vec![v.msg].into()).await {
            hop.violations.push(format!(
                "pipeline: PUSH failed after {} messages: {e}",
                hop.sent
            ));
            break;
        }
        hop.sent += 1;
        if hop.sent.is_multiple_of(32) {
            stage.record(s.stats());
        }
    }
    if let Some(mut s) = sink {
        if let Err(e) = s.close().await {
            hop.violations
                .push(format!("pipeline: PUSH did not close cleanly: {e}"));
        }
        stage.record(s.stats());
    }
    drop(src);
    done.send_replace(Some(hop.sent));
    hop
}

/// What the NATS hop did.
#[derive(Debug, Default)]
struct NatsHop {
    /// Messages the PULL received.
    pulled: u64,
    /// Messages published (all acknowledged after a clean close).
    published: u64,
    violations: Vec<String>,
}

/// The PULL into the JetStream publisher, at most [`MAX_LEAD`] ahead of the
/// consumer; ends when it has received everything the ZeroMQ hop sent and
/// announces in `done` how many the consumer must receive.
#[allow(clippy::too_many_arguments)]
async fn nats_hop(
    mut pull: ZmqSource,
    mut sink: flowctl_cluster::Publisher,
    stage: Arc<Watched>,
    pulled: watch::Sender<u64>,
    mut zmq_done: watch::Receiver<Option<u64>>,
    consumed: Arc<AtomicU64>,
    done: watch::Sender<Option<u64>>,
    drain_deadline: Instant,
) -> NatsHop {
    let mut hop = NatsHop::default();
    loop {
        let total = *zmq_done.borrow_and_update();
        if total.is_some_and(|t| hop.pulled >= t) {
            break;
        }
        if Instant::now() >= drain_deadline {
            hop.violations.push(format!(
                "pipeline: the PULL received {} of {} messages by the end of the drain",
                hop.pulled,
                total.map_or("?".into(), |t| t.to_string())
            ));
            break;
        }
        if hop.published.saturating_sub(consumed.load(Relaxed)) >= MAX_LEAD {
            // The lead is the stream's (disk) bound; the consumer's count is
            // a plain counter.
            tokio::time::sleep(LEAD_POLL).await;
            continue;
        }
        let msg = tokio::select! {
            r = pull.recv() => match r {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    hop.violations.push("pipeline: the PULL ended".into());
                    break;
                }
                Err(e) => {
                    hop.violations.push(format!("pipeline: the PULL failed: {e}"));
                    break;
                }
            },
            r = zmq_done.changed(), if total.is_none() => {
                if r.is_err() {
                    hop.violations.push("pipeline: the zmq hop vanished".into());
                    break;
                }
                continue;
            }
            () = tokio::time::sleep_until(drain_deadline) => continue,
        };
        hop.pulled += 1;
        pulled.send_replace(hop.pulled);
        let frame = if let [frame] = &msg[..] {
            frame.clone()
        } else {
            // Not ours: counted corrupt at the consumer, and said here.
            hop.violations.push(format!(
                "pipeline: the PULL got a message of {} frames",
                msg.len()
            ));
            msg.concat().into()
        };
        if let Err(e) = sink.send(frame).await {
            hop.violations.push(format!(
                "pipeline: publishing message {} failed: {e}",
                hop.published
            ));
            break;
        }
        hop.published += 1;
        stage.record(sink.stats());
    }
    drop(pull);
    let clean = hop.violations.is_empty();
    if clean && let Err(e) = sink.close().await {
        hop.violations
            .push(format!("pipeline: closing the publisher failed: {e}"));
    }
    stage.record(sink.stats());
    if !(clean && hop.violations.is_empty()) {
        // Only the acknowledged ones are sure to be in the stream.
        hop.published = sink.acked();
    }
    done.send_replace(Some(hop.published));
    hop
}

/// Awaits a hop task, within `limit`; aborts it otherwise.
async fn join<T: Default>(
    what: &str,
    task: JoinHandle<T>,
    limit: Duration,
    violations: &mut Vec<String>,
) -> T {
    let abort = task.abort_handle();
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            violations.push(format!("pipeline: the {what} panicked: {e}"));
            T::default()
        }
        Err(_) => {
            abort.abort();
            violations.push(format!("pipeline: the {what} did not end within {limit:?}"));
            T::default()
        }
    }
}

/// Sets up every hop, runs the traffic and the faults, and takes it all
/// down again. Gives the local cluster back.
async fn chain(
    soak: &mut Soak<'_, '_>,
    local: Option<NatsCluster>,
) -> (Option<NatsCluster>, Outcome) {
    let ctx = soak.ctx;
    let failed = |e: String| cluster::failed(format!("pipeline: {e}"));

    // NATS: the stream, its consumer, the publisher and the pull source.
    let wm = Watermarks::new(cluster::LOW, cluster::HIGH).expect("valid watermarks");
    let mut rng = fastrand::Rng::with_seed(ctx.seed ^ 0x5049_5045);
    let first = rng.usize(..3);
    let publisher_cluster = match Cluster::connect(soak.config(first, "publisher")).await {
        Ok(c) => c,
        Err(e) => return (local, failed(format!("nats publisher connect: {e}"))),
    };
    let consumer_cluster = match Cluster::connect(soak.config(first + 1, "consumer")).await {
        Ok(c) => c,
        Err(e) => return (local, failed(format!("nats consumer connect: {e}"))),
    };
    let (publisher, src) = match soak.setup(&publisher_cluster, &consumer_cluster, wm).await {
        Ok(pair) => pair,
        Err(e) => {
            soak.delete_stream(&publisher_cluster).await;
            return (local, failed(e));
        }
    };

    // SSH: the embedded server and the remote `cat`s around a FIFO.
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            soak.delete_stream(&publisher_cluster).await;
            return (
                local,
                failed(format!("cannot make a temporary directory: {e}")),
            );
        }
    };
    let (server, config) = match ssh::embedded(dir.path(), ssh_watermarks()).await {
        Ok(pair) => pair,
        Err(e) => {
            soak.delete_stream(&publisher_cluster).await;
            return (local, failed(e));
        }
    };
    let remote = match Remote::open(&config, &dir.path().join("fifo")).await {
        Ok(remote) => remote,
        Err(e) => {
            soak.delete_stream(&publisher_cluster).await;
            return (local, failed(format!("cannot open the ssh session: {e}")));
        }
    };

    // ZeroMQ: the PULL (linger 0: it has nothing of ours to send).
    let pull = ZmqSocket::builder(SocketType::Pull)
        .linger(Some(Duration::ZERO))
        .watermarks(zmq_watermarks())
        .expected_message_size(MAX_MESSAGE / 2)
        .bind("tcp://127.0.0.1:*")
        .build();
    let (mut pull_closer, pull) = match pull {
        Ok(s) => s.split(),
        Err(e) => {
            soak.delete_stream(&publisher_cluster).await;
            return (local, failed(format!("PULL could not bind: {e}")));
        }
    };
    let endpoint = pull.endpoints().first().cloned().unwrap_or_default();
    soak.notes.push(format!(
        "ssh server {}, PULL {endpoint}, publisher on {}, consumer on {}",
        server.addr(),
        publisher_cluster.client().server_info().server_name,
        consumer_cluster.client().server_info().server_name
    ));

    let stages = Stages::new();
    for stage in stages.all() {
        stage.probe(ctx.monitor);
    }
    let samplers: Samplers = Arc::default();
    let sampler = tokio::spawn(watched::sample(samplers.clone()));

    let killer = cluster::Killer::start(local, ctx, soak.faults.clone(), &mut soak.notes);

    // The chain, from the producer to the consumer.
    let drain_deadline = ctx.deadline + cluster::DRAIN_GRACE;
    let (stdin, writer_out, writer_err, mut writer_exit) = remote.writer.split();
    let (reader_in, stdout, reader_err, mut reader_exit) = remote.reader.split();
    drop((writer_out, writer_err, reader_in, reader_err));
    let producing = tokio::spawn(ssh::produce(
        Recorded::new(stdin, &stages.stdin),
        PRODUCER,
        fastrand::Rng::with_seed(ctx.seed ^ 0x5049_5053),
        (ctx.start, ctx.deadline),
        MAX_MESSAGE,
    ));
    let decoder = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_MESSAGE)
        .new_codec();
    let framed = Recorded::new(
        Framed::new(Live::new(stdout, &stages.stdout, &samplers), decoder),
        &stages.frame,
    );
    let verified = Recorded::new(
        ordered(framed, ssh::offload_limits(), ssh::verify),
        &stages.offload,
    );
    let (pulled_tx, pulled_rx) = watch::channel(0u64);
    let (zmq_done_tx, zmq_done_rx) = watch::channel(None);
    let zmq_task = tokio::spawn(zmq_hop(
        verified,
        endpoint,
        restart_schedule(ctx.seed, Instant::now(), ctx.deadline),
        stages.push.clone(),
        pulled_rx,
        zmq_done_tx,
        drain_deadline,
    ));
    let consumed = Arc::new(AtomicU64::new(0));
    let (nats_done_tx, nats_done_rx) = watch::channel(None);
    let nats_task = tokio::spawn(nats_hop(
        pull,
        publisher,
        stages.publisher.clone(),
        pulled_tx,
        zmq_done_rx,
        consumed.clone(),
        nats_done_tx,
        drain_deadline,
    ));
    let (checker, src, bytes) = soak
        .consume(
            src,
            consumer_cluster.client(),
            &stages.source,
            &consumed,
            nats_done_rx,
        )
        .await;
    stages.source.record(src.stats());

    // The end: every hop reports, in order from the consumer back.
    let mut violations = std::mem::take(&mut soak.violations);
    let nats = join("nats hop", nats_task, RELEASE_GRACE, &mut violations).await;
    let zmq = join("zmq hop", zmq_task, RELEASE_GRACE, &mut violations).await;
    violations.extend(nats.violations);
    violations.extend(zmq.violations);
    let (sent, produced) = match tokio::time::timeout(RELEASE_GRACE, producing).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => (0, Err(FlowError::Transport(Box::new(e)))),
        Err(_) => (0, Err(FlowError::Timeout(RELEASE_GRACE))),
    };
    if let Err(e) = produced {
        violations.push(format!(
            "pipeline: the ssh producer failed after {sent} messages: {e}"
        ));
    }
    let exits = tokio::time::timeout(RELEASE_GRACE, async {
        (writer_exit.wait().await, reader_exit.wait().await)
    })
    .await;
    match exits {
        Ok((w, r)) => {
            for (what, exit) in [("cat > FIFO", w), ("cat FIFO", r)] {
                if let Some(why) = ssh::exit_problem(exit, false) {
                    violations.push(format!("pipeline: remote {what}: {why}"));
                }
            }
        }
        Err(_) => violations.push(format!(
            "pipeline: no exit status of the remote commands within {RELEASE_GRACE:?}"
        )),
    }
    if zmq.corrupt > 0 {
        violations.push(format!(
            "pipeline: {} frames failed their checksum after the ssh hop",
            zmq.corrupt
        ));
    }
    if nats.pulled != zmq.sent {
        violations.push(format!(
            "pipeline: the PUSH sockets sent {} messages, the PULL received {}",
            zmq.sent, nats.pulled
        ));
    }
    soak.faults.restarts.fetch_add(zmq.restarts, Relaxed);
    if zmq.restarts == 0 {
        violations
            .push("pipeline: no PUSH socket was restarted: the fault schedule did not run".into());
    }

    let local = killer
        .finish("pipeline", &soak.faults, &mut soak.notes, &mut violations)
        .await;

    let ps = src.pull_stats();
    soak.notes.push(format!(
        "ssh stdin accepted {sent}, zmq hop sent {} ({} PUSH restarts), PULL received {}, published {}; pull source: {} redeliveries dropped, {} deliveries missed; reconnects: publisher {}, consumer {}",
        zmq.sent,
        zmq.restarts,
        nats.pulled,
        nats.published,
        ps.duplicates,
        ps.missed,
        publisher_cluster.reconnects(),
        consumer_cluster.reconnects()
    ));
    drop(src);
    if let Err(e) = pull_closer.close().await {
        violations.push(format!("pipeline: PULL did not close cleanly: {e}"));
    }
    soak.violations = violations;
    soak.delete_stream(&publisher_cluster).await;
    let mut violations = std::mem::take(&mut soak.violations);
    drop(consumer_cluster);
    drop(publisher_cluster);
    drop((writer_exit, reader_exit, remote.session));
    drop(server);
    sampler.abort();
    let _ = sampler.await;
    watched::clear(&samplers);

    // Every stage against its own bound; the runner sees the worst ratio.
    let (max_buffered, bound) =
        watched::judge("pipeline", stages.all().map(|s| &**s), &mut violations);
    let maxima: Vec<String> = stages
        .all()
        .iter()
        .map(|stage| format!("{} {}/{}", stage.name, stage.max(), stage.bound))
        .collect();
    soak.notes
        .push(format!("max buffered/bound (bytes): {}", maxima.join(", ")));
    let outcome = Outcome {
        tally: checker.finish(&HashMap::from([(PRODUCER, sent)])),
        bytes,
        max_buffered,
        bound,
        faults: soak.faults.total(),
        latencies_us: checker.latencies_us().to_vec(),
        violations,
    };
    (local, outcome)
}
