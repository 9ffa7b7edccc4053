//! The JetStream pull Source: demand follows the watermarks.
//!
//! Layout: the public types, then [`Cluster::consume`] (subscription and
//! sender task inside one [`Attempt`]), then the poll-based shell of
//! [`PullSource`]: it turns what arrives on the inbox into events for the
//! I/O-free state machine in [`demand`] (which decides every pull, ack,
//! probe, hold-back and dedupe, and documents what each nats-server
//! release does with pull requests) and carries out its commands.

mod demand;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use flowctl_core::fair::Budget;
use flowctl_core::gate::Gate;
use flowctl_core::lifecycle::{Attempt, Lease};
use flowctl_core::stage::{Stage, StageCounter};
use flowctl_core::{Fairness, FlowError, FlowStats, Source, Watermarks, Weighted};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Sleep;

use demand::{Command, Delivery, Demand, DemandConfig, Failure, Fetched, Status};

use crate::ClusterError;
use crate::changed::Changed;
use crate::cluster::{Cluster, Shared};
use std::sync::Arc;

/// When a message is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AckMode {
    /// `+ACK` is sent when `recv` ([`Source::poll_recv`]) hands the message over: at most
    /// once for the application (a crash after `recv`, before processing,
    /// loses the message). A redelivery of a message already handed over is
    /// acked again and dropped.
    #[default]
    OnReceive,
    /// Each message carries an [`AckHandle`]; the application acks after
    /// processing: at least once. Whatever is not acked is redelivered after
    /// the consumer's `ack_wait`. While the application holds a message
    /// un-acked, this source drops its redeliveries **without** acking them
    /// (the application's ack settles it); a redelivery of a message this
    /// source never handed out (a previous instance's) is delivered.
    Manual,
}

/// How [`Cluster::consume`] pulls.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Bytes buffered in this source: a pull is issued only while buffered
    /// bytes are at or below `low`, and buffered bytes plus what the open
    /// requests may still deliver (as the server counts them: subject,
    /// reply, headers and payload) never exceed `high`.
    pub watermarks: Watermarks,
    /// Most messages per pull request.
    pub batch: usize,
    /// Lifetime of one pull request on the server. A request whose end the
    /// source did not see (a reconnect, missed heartbeats) keeps counting
    /// against `high` until this has passed (plus a second), since it may
    /// still deliver: keep it short, it bounds how long such a fault holds
    /// back new demand.
    pub expires: Duration,
    /// Idle heartbeat asked of the server; two missed heartbeats (or a
    /// reconnect) mean the open requests may end without a word: they are
    /// then counted until their `expires` has passed.
    pub heartbeat: Duration,
    /// Acknowledgement policy.
    pub ack: AckMode,
    /// After missed deliveries (a jump in the consumer's delivery sequence,
    /// as in a failover), how long later messages are held back waiting for
    /// the redelivery of the missed ones, to keep stream order. Set it above
    /// the consumer's `ack_wait`. Without missed deliveries nothing is held,
    /// whatever the stream sequences (filters, deleted messages).
    pub hold_timeout: Duration,
    /// After missed deliveries, read the missed messages from the stream
    /// (`$JS.API.STREAM.MSG.GET`, one at a time, within the watermarks)
    /// instead of waiting `ack_wait` for their redelivery: a failover costs
    /// round trips to the stream leader, not the consumer's `ack_wait`.
    /// Such a message is acked on the server when the consumer redelivers
    /// it (the source acks that redelivery and drops it), its
    /// [`JsMessage::delivered`] reads 1, and its [`AckHandle::nak`] cannot
    /// hurry its redelivery. Needs permission to publish to
    /// `$JS.API.STREAM.MSG.GET.<stream>`; without it (or while the stream
    /// has no leader) gaps are filled by redeliveries as with `false`, and
    /// so they are for a consumer with `DeliverPolicy::LastPerSubject` or
    /// `headers_only`, whose deliveries a read of the stream cannot stand for.
    pub fill_gaps_from_stream: bool,
    /// Fair-yield budget.
    pub fairness: Fairness,
    /// The stage's name in spans and metrics; `None`:
    /// `nats.<stream>.<consumer>.pull`.
    pub name: Option<String>,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions {
            watermarks: Watermarks::default(),
            batch: 256,
            expires: Duration::from_secs(5),
            heartbeat: Duration::from_millis(500),
            ack: AckMode::OnReceive,
            hold_timeout: Duration::from_secs(35),
            fill_gaps_from_stream: true,
            fairness: Fairness::default(),
            name: None,
        }
    }
}

/// Acknowledges one message (see [`AckMode::Manual`]).
///
/// While a handle (or a clone) lives and has not acked, the source drops
/// the server's redeliveries of its message without acking them. Dropping
/// every clone without an ack, or a [`nak`](AckHandle::nak), lets the next
/// redelivery through to the application again.
#[derive(Debug, Clone)]
pub struct AckHandle {
    inner: Arc<AckInner>,
}

#[derive(Debug)]
struct AckInner {
    client: async_nats::Client,
    /// `None` for a message read from the stream to fill a gap: its
    /// redelivery is acked when it arrives.
    reply: Option<Subject>,
    seq: u64,
    settle: mpsc::UnboundedSender<Settle>,
    done: AtomicBool,
}

/// What became of a message handed out in Manual mode.
#[derive(Debug, Clone, Copy)]
enum Settle {
    Acked(u64),
    Released(u64),
}

impl Drop for AckInner {
    fn drop(&mut self) {
        if !*self.done.get_mut() {
            let _ = self.settle.send(Settle::Released(self.seq));
        }
    }
}

impl AckHandle {
    /// Sends `+ACK` (fire and forget: a lost ack means a redelivery, which the
    /// source acks again and drops). A message read from the stream to fill
    /// a gap (see [`ConsumeOptions::fill_gaps_from_stream`]) is acked on the
    /// server when its redelivery reaches the source.
    pub async fn ack(&self) -> Result<(), FlowError> {
        let i = &self.inner;
        if let Some(reply) = &i.reply {
            i.client
                .publish(reply.clone(), Bytes::from_static(b"+ACK"))
                .await
                .map_err(|e| FlowError::from(ClusterError::nats("ack", e)))?;
        }
        if !i.done.swap(true, Ordering::AcqRel) {
            let _ = i.settle.send(Settle::Acked(i.seq));
        }
        Ok(())
    }

    /// Asks for an immediate redelivery (which this source delivers again);
    /// for a message read from the stream to fill a gap, the redelivery
    /// comes after the consumer's `ack_wait`.
    pub async fn nak(&self) -> Result<(), FlowError> {
        let i = &self.inner;
        if let Some(reply) = &i.reply {
            i.client
                .publish(reply.clone(), Bytes::from_static(b"-NAK"))
                .await
                .map_err(|e| FlowError::from(ClusterError::nats("nak", e)))?;
        }
        if !i.done.swap(true, Ordering::AcqRel) {
            let _ = i.settle.send(Settle::Released(i.seq));
        }
        Ok(())
    }
}

/// One message of a stream, handed out in stream order (see [`AckMode`]
/// for what is handed out again).
#[derive(Debug, Clone)]
pub struct JsMessage {
    /// The subject it was published to.
    pub subject: Subject,
    /// The payload.
    pub payload: Bytes,
    /// Headers, if any.
    pub headers: Option<HeaderMap>,
    /// Its sequence in the stream.
    pub stream_seq: u64,
    /// How many times the server has delivered it.
    pub delivered: u64,
    /// Present with [`AckMode::Manual`].
    pub ack: Option<AckHandle>,
}

impl Weighted for JsMessage {
    fn weight(&self) -> usize {
        self.payload.len()
    }
}

/// A delivery as it waits in the source, before it becomes a [`JsMessage`].
#[derive(Debug)]
struct Raw {
    subject: Subject,
    payload: Bytes,
    headers: Option<HeaderMap>,
    /// `None`: read from the stream to fill a gap.
    reply: Option<Subject>,
    delivered: u64,
}

/// Commands of the source's sender task: cancel-safe `recv` never awaits a publish.
#[derive(Debug)]
enum Cmd {
    /// A pull request and the reply subject it names (`<inbox>.<id>`).
    Pull(Subject, Bytes),
    Ack(Subject),
    /// Read a message from the stream: `(from, exact)` (see [`Command::Fetch`]).
    Fetch(u64, bool),
    /// Ask the consumer leader how many pull requests it holds, on behalf of
    /// the requests with an id below this one (all published before it).
    Probe(u64),
}

/// A probe's answer: the id it was sent with and the leader's `num_waiting`
/// (`None`: no answer, e.g. during a leader election).
type ProbeReply = (u64, Option<usize>);

/// How long one read of the stream may take before it counts as failed
/// (the source does not pull while it waits).
const FETCH_TIMEOUT: Duration = Duration::from_secs(1);

/// Counters of a [`PullSource`] beyond [`FlowStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullStats {
    /// Pull requests sent.
    pub pulls: u64,
    /// Redeliveries dropped: of messages still buffered here, held un-acked by
    /// the application, or already acked (those are acked again).
    pub duplicates: u64,
    /// Times the source lost sight of its open requests (reconnect, missed
    /// heartbeats); they keep counting as demand until they end or expire.
    pub resets: u64,
    /// Of `resets`, those for missed heartbeats (two heartbeats without a
    /// word from the server while requests were open); the others follow
    /// reconnects. Each one probes the consumer leader, and the pulls the
    /// watermarks allow are issued again.
    pub heartbeats_missed: u64,
    /// Deliveries the server sent that never arrived (gaps in the consumer sequence).
    pub missed: u64,
    /// Times held-back messages were released by `hold_timeout` with a gap left.
    pub hold_expired: u64,
    /// Held-back messages dropped unacked (the server redelivers them; with
    /// [`ConsumeOptions::fill_gaps_from_stream`] they are read again from the
    /// stream) to make room for what fills a gap within `high`.
    pub evicted: u64,
    /// Messages read from the stream to fill a gap (missed deliveries, or
    /// held messages dropped for room).
    pub filled: u64,
    /// Reads of the stream that failed or were refused (the gap then waits
    /// for redeliveries until a retry succeeds).
    pub fetch_failures: u64,
    /// Open requests found gone from the consumer leader by a probe after a
    /// reconnect or missed heartbeats (its consumer info showed fewer waiting
    /// requests), and so no longer counted as demand before their deadline.
    pub voided: u64,
}

/// The transport metrics of a pull source: [`PullStats`] as counters.
#[derive(Debug)]
struct PullMetrics {
    pulls: StageCounter,
    duplicates: StageCounter,
    resets: StageCounter,
    heartbeats_missed: StageCounter,
    missed: StageCounter,
    hold_expired: StageCounter,
    evicted: StageCounter,
    filled: StageCounter,
    fetch_failures: StageCounter,
    voided: StageCounter,
}

impl PullMetrics {
    fn new(stage: &Stage) -> Self {
        PullMetrics {
            pulls: stage.counter("flowctl_nats_pulls_total"),
            duplicates: stage.counter("flowctl_nats_redeliveries_dropped_total"),
            resets: stage.counter("flowctl_nats_demand_resets_total"),
            heartbeats_missed: stage.counter("flowctl_nats_heartbeats_missed_total"),
            missed: stage.counter("flowctl_nats_missed_deliveries_total"),
            hold_expired: stage.counter("flowctl_nats_hold_expired_total"),
            evicted: stage.counter("flowctl_nats_evicted_total"),
            filled: stage.counter("flowctl_nats_gap_fills_total"),
            fetch_failures: stage.counter("flowctl_nats_gap_fill_failures_total"),
            voided: stage.counter("flowctl_nats_requests_voided_total"),
        }
    }

    /// Adds what `now` counts beyond `before`.
    fn export(&self, before: &PullStats, now: &PullStats) {
        let pairs = [
            (&self.pulls, before.pulls, now.pulls),
            (&self.duplicates, before.duplicates, now.duplicates),
            (&self.resets, before.resets, now.resets),
            (
                &self.heartbeats_missed,
                before.heartbeats_missed,
                now.heartbeats_missed,
            ),
            (&self.missed, before.missed, now.missed),
            (&self.hold_expired, before.hold_expired, now.hold_expired),
            (&self.evicted, before.evicted, now.evicted),
            (&self.filled, before.filled, now.filled),
            (
                &self.fetch_failures,
                before.fetch_failures,
                now.fetch_failures,
            ),
            (&self.voided, before.voided, now.voided),
        ];
        for (counter, before, now) in pairs {
            if now > before {
                counter.increment(now - before);
            }
        }
    }
}

/// A JetStream pull consumer as a flowctl [`Source`]; see [`Cluster::consume`].
///
/// # Stage
/// Named `nats.<stream>.<consumer>.pull` by default
/// ([`ConsumeOptions::name`]). Besides the core metrics of its buffer, it
/// exports [`PullStats`] as counters (see [`PullSource::pull_stats`]) and
/// `flowctl_nats_ack_failures_total`. It never overflows: demand follows the
/// watermarks (it only asks the server for what fits under `high`), so
/// nothing is dropped for room and there is no [`Overflow`](flowctl_core::Overflow)
/// policy to set; what does not fit stays on the server.
#[derive(Debug)]
pub struct PullSource {
    shared: Arc<Shared>,
    sub: async_nats::Subscriber,
    inbox: String,
    stream: String,
    consumer: String,
    opts: ConsumeOptions,
    gate: Gate,
    /// Demand, order and dedupe: every decision, without I/O.
    demand: Demand<Raw>,
    /// Reconnects of the client (see [`Changed`] for why no wake-up is lost).
    generation: Changed<u64>,
    /// Until the state machine's next deadline; reset, never re-allocated.
    sleep: Pin<Box<Sleep>>,
    cmd: mpsc::UnboundedSender<Cmd>,
    probes: mpsc::UnboundedReceiver<ProbeReply>,
    fetched: mpsc::UnboundedReceiver<Fetched<Raw>>,
    /// Acks and releases of the handles given out in Manual mode.
    settle_tx: mpsc::UnboundedSender<Settle>,
    settle_rx: mpsc::UnboundedReceiver<Settle>,
    budget: Budget,
    stage: Stage,
    metrics: PullMetrics,
    /// The [`PullStats`] already added to `metrics`.
    exported: PullStats,
    _lease: Lease,
}

impl Cluster {
    /// Reads the durable pull consumer `consumer` of `stream`.
    ///
    /// The stream and the consumer must exist (create them with
    /// [`Cluster::jetstream`]). The source must be the only reader of the
    /// consumer for its order and dedupe guarantees.
    ///
    /// Subscription, info request and first pull run inside one
    /// [`Attempt`]: a cancel or a timeout of this future at any await releases
    /// the inbox subscription and the sender task, including a subscription
    /// whose request is still on its way to the server.
    ///
    /// # Errors
    /// [`ClusterError::StreamNotFound`], [`ClusterError::ConsumerNotFound`],
    /// [`ClusterError::PermissionDenied`], or a transport error.
    pub async fn consume(
        &self,
        stream: &str,
        consumer: &str,
        opts: ConsumeOptions,
    ) -> Result<PullSource, FlowError> {
        let attempt = Attempt::new(format!("consume {stream}/{consumer}"), &self.shared.ledger);
        let r = self.consume_in(&attempt, stream, consumer, opts).await;
        match r {
            Ok(src) => {
                attempt.commit();
                Ok(src)
            }
            Err(e) => {
                attempt.release().await;
                Err(e)
            }
        }
    }

    async fn consume_in(
        &self,
        attempt: &Attempt,
        stream: &str,
        consumer: &str,
        opts: ConsumeOptions,
    ) -> Result<PullSource, FlowError> {
        if opts.batch == 0 {
            return Err(FlowError::Config("pull batch must be at least 1".into()));
        }
        let shared = self.shared.clone();
        let js = &shared.js;
        // Info first: it tells "stream missing" from "consumer missing".
        let st = js.get_stream(stream).await.map_err(|e| {
            use async_nats::jetstream::context::GetStreamErrorKind as K;
            match e.kind() {
                K::JetStream(j) if j.code() == 404 => ClusterError::StreamNotFound {
                    stream: stream.to_owned(),
                },
                _ => ClusterError::nats("stream info", e),
            }
        })?;
        let info = st
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(consumer)
            .await
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("not found") || text.contains("10014") {
                    ClusterError::ConsumerNotFound {
                        stream: stream.to_owned(),
                        consumer: consumer.to_owned(),
                    }
                } else {
                    ClusterError::nats("consumer info", e)
                }
            })?;
        // Deliveries lost before this source's first one show as a jump
        // from here.
        let ci = info.cached_info();
        let last_delivered = (ci.delivered.consumer_sequence, ci.delivered.stream_sequence);
        let ack_wait = (!ci.config.ack_wait.is_zero()).then_some(ci.config.ack_wait);
        drop(info);
        // What a read of the stream must match to stand for a delivery
        // (`filter_subjects` is not in async-nats's typed config).
        let filters = if opts.fill_gaps_from_stream {
            filters_of(js, stream, consumer).await
        } else {
            None
        };
        let fill = filters.is_some();
        let filters = filters.unwrap_or_default();
        let st = Arc::new(st);
        let client = shared.client.clone();
        let inbox = client.new_inbox();
        // The attempt owns the subscription from before SUB leaves: a slot that
        // the release empties. `subscribe` has no await after it queues SUB, so
        // the subscriber lands in the slot in the same poll; a cancel anywhere
        // later unsubscribes it (UNSUB is queued behind SUB, in order).
        let slot: Arc<std::sync::Mutex<Option<async_nats::Subscriber>>> = Arc::default();
        let release_slot = slot.clone();
        let claim_sub = attempt.own("nats.subscription", move || async move {
            let sub = release_slot.lock().ok().and_then(|mut s| s.take());
            if let Some(mut sub) = sub {
                let _ = sub.unsubscribe().await;
            }
        })?;
        let sub = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| ClusterError::nats("subscribe", e))?;
        if let Ok(mut s) = slot.lock() {
            *s = Some(sub);
        }
        // The sender task, counted in the ledger, ends when the source drops.
        let stage = Stage::new(
            opts.name
                .clone()
                .unwrap_or_else(|| format!("nats.{stream}.{consumer}.pull")),
        );
        let ack_failures = stage.counter("flowctl_nats_ack_failures_total");
        let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Cmd>();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel::<ProbeReply>();
        let (fetch_tx, fetch_rx) = mpsc::unbounded_channel::<Fetched<Raw>>();
        let next = format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}");
        let info = format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}");
        let task_client = client.clone();
        let handle = shared.ledger.spawn("nats.pull_task", async move {
            // Probes wait for an answer (up to the client's request timeout,
            // longer than a hung connection takes to be noticed): beside the
            // commands, so pulls and acks never queue behind one.
            let mut probes = futures::stream::FuturesUnordered::new();
            let mut fetches = futures::stream::FuturesUnordered::new();
            loop {
                let cmd = tokio::select! {
                    cmd = cmd_rx.recv() => match cmd {
                        Some(cmd) => cmd,
                        None => break,
                    },
                    Some(reply) = probes.next(), if !probes.is_empty() => {
                        let _ = probe_tx.send(reply);
                        continue;
                    }
                    Some(f) = fetches.next(), if !fetches.is_empty() => {
                        let _ = fetch_tx.send(f);
                        continue;
                    }
                };
                let is_ack = matches!(cmd, Cmd::Ack(_));
                let r = match cmd {
                    Cmd::Pull(reply, body) => {
                        task_client
                            .publish_with_reply(next.clone(), reply, body)
                            .await
                    }
                    Cmd::Ack(reply) => task_client.publish(reply, Bytes::from_static(b"+ACK")).await,
                    Cmd::Fetch(from, exact) => {
                        fetches.push(fetch(st.clone(), filters.clone(), from, exact));
                        Ok(())
                    }
                    Cmd::Probe(id) => {
                        // Queued on the connection after every pull sent
                        // before it: the leader has them when it answers.
                        let client = task_client.clone();
                        let info = info.clone();
                        probes.push(async move {
                            let waiting = client
                                .request(info, Bytes::new())
                                .await
                                .ok()
                                .and_then(|m| num_waiting(&m.payload));
                            (id, waiting)
                        });
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    if is_ack {
                        // The server redelivers the message; the source acks
                        // that redelivery and drops it.
                        ack_failures.increment(1);
                    }
                    tracing::debug!(error = %e, "pull source: publish failed (the connection is gone)");
                }
            }
        });
        let abort = handle.abort_handle();
        let claim_task = attempt.own("nats.pull_task_owner", move || async move {
            abort.abort();
        })?;
        let Some(sub) = slot.lock().ok().and_then(|mut s| s.take()) else {
            return Err(FlowError::Closed);
        };
        // Counted by the source before the attempt lets go of it, so the
        // ledger never reads zero while the subscription lives.
        let lease = shared.ledger.acquire("nats.subscription");
        attempt.disown(claim_sub);
        attempt.disown(claim_task);
        let generation = Changed::new(shared.generation.clone());
        let demand = Demand::new(
            DemandConfig {
                low: opts.watermarks.low(),
                high: opts.watermarks.high(),
                batch: opts.batch,
                expires: opts.expires,
                heartbeat: opts.heartbeat,
                hold_timeout: opts.hold_timeout,
                ack: opts.ack,
                fill,
                redelivery: ack_wait,
            },
            std::time::Instant::now(),
        );
        let mut demand = demand;
        demand.set_last_delivered(last_delivered.0, last_delivered.1);
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let gate = Gate::new(
            opts.watermarks,
            tracing::debug_span!("pull", stream, consumer),
        );
        gate.set_stage(stage.clone());
        let mut src = PullSource {
            gate,
            metrics: PullMetrics::new(&stage),
            stage,
            exported: PullStats::default(),
            budget: Budget::new(opts.fairness),
            shared: shared.clone(),
            sub,
            inbox,
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            opts,
            demand,
            generation,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            cmd: cmd_tx,
            probes: probe_rx,
            fetched: fetch_rx,
            settle_tx,
            settle_rx,
            _lease: lease,
        };
        src.demand.on_start(std::time::Instant::now());
        src.run_commands();
        Ok(src)
    }
}

/// Reads one message of the stream: the one with sequence `from` (`exact`),
/// or the first at or after `from` that one of `filters` matches.
async fn fetch(
    st: Arc<async_nats::jetstream::stream::Stream>,
    filters: Vec<String>,
    from: u64,
    exact: bool,
) -> Fetched<Raw> {
    use async_nats::jetstream::stream::RawMessageErrorKind as K;
    let one = |filter: Option<String>| {
        let st = st.clone();
        async move {
            let mut b = st.raw_message_builder().sequence(from);
            if let Some(f) = filter {
                b = b.next_by_subject(f);
            }
            match tokio::time::timeout(FETCH_TIMEOUT, b.send()).await {
                Ok(Ok(m)) => Ok(Some(m)),
                Ok(Err(e)) if e.kind() == K::NoMessageFound => Ok(None),
                Ok(Err(e)) => {
                    let refused = matches!(e.kind(), K::JetStream(j) if j.code() == 403);
                    tracing::debug!(error = %e, from, "pull source: reading the stream failed");
                    Err(refused)
                }
                Err(_) => Err(false),
            }
        }
    };
    let answers = if exact {
        vec![one(None).await]
    } else {
        futures::future::join_all(filters.into_iter().map(|f| one(Some(f)))).await
    };
    let mut first: Option<async_nats::jetstream::message::StreamMessage> = None;
    for a in answers {
        match a {
            Ok(Some(m)) => {
                if first.as_ref().is_none_or(|f| m.sequence < f.sequence) {
                    first = Some(m);
                }
            }
            Ok(None) => {}
            Err(true) => return Fetched::Refused,
            Err(false) => return Fetched::Failed,
        }
    }
    let Some(m) = first else {
        return Fetched::NotFound;
    };
    // As the server would charge it against `max_bytes` (with an ack
    // reply subject of about 64 bytes).
    let headers: usize = m
        .headers
        .iter()
        .map(|(k, vs)| {
            let k: &str = k.as_ref();
            vs.iter()
                .map(|v| k.len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    let size = m.subject.len() + m.payload.len() + headers + 12 + 64;
    let weight = m.payload.len();
    Fetched::Found {
        seq: m.sequence,
        size,
        weight,
        item: Raw {
            subject: m.subject,
            payload: m.payload,
            headers: (!m.headers.is_empty()).then_some(m.headers),
            reply: None,
            delivered: 1,
        },
    }
}

/// The consumer's filter subjects (`>` for none); `None` when its info
/// cannot be read, or for a consumer whose deliveries a read of the stream
/// cannot stand for (last per subject, headers only): gaps then wait for
/// redeliveries.
async fn filters_of(
    js: &async_nats::jetstream::Context,
    stream: &str,
    consumer: &str,
) -> Option<Vec<String>> {
    let v: serde_json::Value = js
        .request(
            format!("CONSUMER.INFO.{stream}.{consumer}"),
            &serde_json::json!({}),
        )
        .await
        .ok()?;
    fill_filters(v.get("config")?)
}

/// [`filters_of`] for a consumer's `config` object.
fn fill_filters(config: &serde_json::Value) -> Option<Vec<String>> {
    // A read of the stream would not stand for a delivery of these: a
    // last-per-subject consumer skips older messages of each subject while
    // it starts, a headers-only one delivers no payload.
    if config.get("deliver_policy").and_then(|p| p.as_str()) == Some("last_per_subject")
        || config.get("headers_only").and_then(|h| h.as_bool()) == Some(true)
    {
        return None;
    }
    let mut filters: Vec<String> = config
        .get("filter_subjects")
        .and_then(|f| f.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if let Some(f) = config.get("filter_subject").and_then(|f| f.as_str())
        && !f.is_empty()
    {
        filters.push(f.to_owned());
    }
    if filters.is_empty() {
        filters.push(">".to_owned());
    }
    Some(filters)
}

/// `num_waiting` of a consumer info response; `None` for an error response.
fn num_waiting(payload: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if v.get("error").is_some() {
        return None;
    }
    v.get("num_waiting")?.as_u64().map(|n| n as usize)
}

/// The request a status ends: its subject is the reply subject
/// `<inbox>.<id>` the request was sent with.
fn request_id(inbox: &str, subject: &str) -> Option<u64> {
    demand::parse_count(subject.strip_prefix(inbox)?.strip_prefix('.')?)
}

/// `Nats-Pending-Messages` and `Nats-Pending-Bytes` of a status, when both parse.
fn pending_counts(headers: Option<&HeaderMap>) -> Option<(u64, u64)> {
    let h = headers?;
    let msgs = demand::parse_count(h.get("Nats-Pending-Messages")?.as_str())?;
    let bytes = demand::parse_count(h.get("Nats-Pending-Bytes")?.as_str())?;
    Some((msgs, bytes))
}

impl PullSource {
    /// The stage: its name and its metrics.
    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// Counters beyond [`FlowStats`].
    pub fn pull_stats(&self) -> PullStats {
        self.demand.stats()
    }

    /// The inbox this source's deliveries arrive on.
    pub fn inbox(&self) -> &str {
        &self.inbox
    }

    /// Bytes the open pull requests may still deliver, as the server counts
    /// them (subject, reply, headers and payload): an upper bound.
    pub fn outstanding_bytes(&self) -> usize {
        self.demand.outstanding()
    }

    /// Makes the gate's count follow the state machine's.
    fn sync_gate(&self) {
        let want = self.demand.weight_buffered();
        let have = self.gate.buffered();
        if want > have {
            self.gate.charge(want - have);
        } else if have > want {
            self.gate.credit(have - want);
        }
    }

    /// Carries out the state machine's commands (queued to the sender task:
    /// `recv` never awaits a publish), then updates the gate.
    fn run_commands(&mut self) {
        while let Some(c) = self.demand.poll_command() {
            let cmd = match c {
                Command::Pull {
                    id,
                    batch,
                    max_bytes,
                    expires,
                    heartbeat,
                } => {
                    let mut body = serde_json::json!({
                        "batch": batch,
                        "expires": expires.as_nanos() as u64,
                        "idle_heartbeat": heartbeat.as_nanos() as u64,
                    });
                    if max_bytes > 0 {
                        body["max_bytes"] = max_bytes.into();
                    }
                    let Ok(bytes) = serde_json::to_vec(&body) else {
                        continue;
                    };
                    tracing::trace!(id, batch, max_bytes, "pull");
                    Cmd::Pull(format!("{}.{id}", self.inbox).into(), bytes.into())
                }
                Command::Ack(raw) => match raw.reply {
                    Some(reply) => Cmd::Ack(reply),
                    None => continue,
                },
                Command::Probe { upto } => Cmd::Probe(upto),
                Command::Fetch { from, exact } => Cmd::Fetch(from, exact),
            };
            // A send error means the task is gone with the client: recv sees
            // the subscription end.
            let _ = self.cmd.send(cmd);
        }
        self.sync_gate();
        self.export_stats();
    }

    /// Adds the new counts of [`PullStats`] to the stage's counters: called
    /// at each step of the state machine, so stats and metrics agree.
    fn export_stats(&mut self) {
        let now = self.demand.stats();
        if now != self.exported {
            self.metrics.export(&self.exported, &now);
            self.exported = now;
        }
    }

    fn on_message(&mut self, m: async_nats::Message) {
        let now = std::time::Instant::now();
        if let Some(status) = m.status {
            let s = Status {
                code: status.as_u16(),
                description: m.description.clone().unwrap_or_default(),
                pending: pending_counts(m.headers.as_ref()),
                request: request_id(&self.inbox, &m.subject),
            };
            self.demand.on_status(&s, now);
            return;
        }
        let Some(reply) = m.reply.clone() else {
            tracing::debug!(subject = %m.subject, "pull source: message without a reply subject");
            return;
        };
        let Some((delivered, sseq, cseq)) = demand::parse_ack(&reply) else {
            tracing::debug!(subject = %m.subject, "pull source: message without a JetStream ack subject");
            return;
        };
        let size = m.length;
        let weight = m.payload.len();
        self.demand.on_message(
            Delivery {
                item: Raw {
                    subject: m.subject,
                    payload: m.payload,
                    headers: m.headers,
                    reply: Some(reply),
                    delivered,
                },
                stream_seq: sseq,
                consumer_seq: cseq,
                delivered,
                size,
                weight,
            },
            now,
        );
    }

    /// Takes in everything the subscription already holds, without waiting.
    fn drain(&mut self) {
        while let Some(Some(m)) = self.sub.next().now_or_never() {
            self.on_message(m);
        }
    }

    fn apply_settles(&mut self) {
        while let Ok(s) = self.settle_rx.try_recv() {
            self.on_settle(s);
        }
    }

    fn take_ready(&mut self) -> Option<JsMessage> {
        let (raw, seq, ack_now) = self.demand.take(std::time::Instant::now())?;
        let ack = match self.opts.ack {
            AckMode::Manual => Some(AckHandle {
                inner: Arc::new(AckInner {
                    client: self.shared.client.clone(),
                    reply: raw.reply.clone(),
                    seq,
                    settle: self.settle_tx.clone(),
                    done: AtomicBool::new(false),
                }),
            }),
            AckMode::OnReceive => None,
        };
        if ack_now && let Some(reply) = raw.reply {
            let _ = self.cmd.send(Cmd::Ack(reply));
        }
        self.run_commands();
        Some(JsMessage {
            subject: raw.subject,
            payload: raw.payload,
            headers: raw.headers,
            stream_seq: seq,
            delivered: raw.delivered,
            ack,
        })
    }

    /// Polls every event the source waits on once and hands what arrived
    /// to the state machine: `Ok(true)` if anything did, `Ok(false)` with
    /// the waker registered everywhere. A closed channel of the sender task
    /// (probes, fetches) brings nothing, as a disabled `select!` branch; the
    /// end of the subscription is [`FlowError::Closed`].
    fn poll_events(&mut self, cx: &mut Context<'_>) -> Result<bool, FlowError> {
        let mut any = false;
        match self.sub.poll_next_unpin(cx) {
            Poll::Ready(Some(m)) => {
                self.on_message(m);
                any = true;
            }
            Poll::Ready(None) => return Err(FlowError::Closed),
            Poll::Pending => {}
        }
        if let Poll::Ready(Some((upto, waiting))) = self.probes.poll_recv(cx) {
            // What already arrived for the requests counts before the
            // leader's answer can void them.
            self.drain();
            self.demand
                .on_probe(upto, waiting, std::time::Instant::now());
            any = true;
        }
        if let Poll::Ready(Some(f)) = self.fetched.poll_recv(cx) {
            self.demand.on_fetched(f, std::time::Instant::now());
            any = true;
        }
        if let Poll::Ready(Some(s)) = self.settle_rx.poll_recv(cx) {
            self.on_settle(s);
            any = true;
        }
        if self.generation.poll_changed(cx) == Poll::Ready(true) {
            self.demand.on_reconnected(std::time::Instant::now());
            any = true;
        }
        let wake =
            tokio::time::Instant::from_std(self.demand.next_timeout(std::time::Instant::now()));
        // Re-registered only when the deadline comes earlier (or has
        // passed): a later one is served by waking early, and `on_timer` at
        // any time is harmless.
        if wake < self.sleep.deadline() || self.sleep.is_elapsed() {
            self.sleep.as_mut().reset(wake);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.demand.on_timer(std::time::Instant::now());
            any = true;
        }
        Ok(any)
    }

    fn on_settle(&mut self, s: Settle) {
        match s {
            Settle::Acked(seq) => self.demand.on_acked(seq),
            Settle::Released(seq) => self.demand.on_released(seq),
        }
    }

    fn failure(&self, f: Failure) -> ClusterError {
        match f {
            Failure::ConsumerDeleted => ClusterError::ConsumerNotFound {
                stream: self.stream.clone(),
                consumer: self.consumer.clone(),
            },
        }
    }
}

impl Source for PullSource {
    type Item = JsMessage;

    /// One turn of the loop takes a ready message (within the fairness
    /// budget), or lets the state machine act on the clock and a reconnect,
    /// then polls everything that can bring an event: the inbox, probe and
    /// fetch answers, the handles' settles, the reconnect generation and the
    /// state machine's next deadline. Whatever a poll takes is handed to the
    /// state machine at once, so a `Pending` (or a drop of the caller's
    /// future) loses nothing; `Pending` is returned only when none of them
    /// had anything, with every one holding the waker.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<JsMessage>, FlowError>> {
        loop {
            self.apply_settles();
            if self.demand.has_ready() {
                if self.budget.poll_proceed(cx).is_pending() {
                    self.gate.record_forced_yield();
                    return Poll::Pending;
                }
                if let Some(msg) = self.take_ready() {
                    self.budget.charge(msg.weight());
                    return Poll::Ready(Ok(Some(msg)));
                }
            }
            if let Some(f) = self.demand.take_failure() {
                return Poll::Ready(Err(self.failure(f).into()));
            }
            if self.generation.poll_changed(cx) == Poll::Ready(true) {
                self.demand.on_reconnected(std::time::Instant::now());
            }
            self.demand.on_timer(std::time::Instant::now());
            self.run_commands();
            if self.demand.has_ready() {
                continue;
            }
            if self.poll_events(cx)? {
                self.drain();
                self.run_commands();
                continue;
            }
            // A natural `Pending`: the next slice starts afresh.
            self.budget.reset();
            return Poll::Pending;
        }
    }

    fn stats(&self) -> FlowStats {
        self.gate.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_num_waiting() {
        assert_eq!(
            num_waiting(
                br#"{"type":"io.nats.jetstream.api.v1.consumer_info_response","num_waiting":2}"#
            ),
            Some(2)
        );
        assert_eq!(num_waiting(br#"{"error":{"code":503,"description":"JetStream system temporarily unavailable"}}"#), None);
        assert_eq!(num_waiting(b"garbage"), None);
    }

    #[test]
    fn stream_reads_stand_for_deliveries_only_where_they_can() {
        let f = |v: serde_json::Value| fill_filters(&v);
        assert_eq!(f(serde_json::json!({})), Some(vec![">".to_owned()]));
        assert_eq!(
            f(serde_json::json!({"filter_subject": "a.b"})),
            Some(vec!["a.b".to_owned()])
        );
        assert_eq!(
            f(serde_json::json!({"filter_subjects": ["a.*", "c"]})),
            Some(vec!["a.*".to_owned(), "c".to_owned()])
        );
        assert_eq!(
            f(serde_json::json!({"deliver_policy": "last_per_subject"})),
            None
        );
        assert_eq!(f(serde_json::json!({"headers_only": true})), None);
        assert_eq!(
            f(serde_json::json!({"deliver_policy": "all", "headers_only": false})),
            Some(vec![">".to_owned()])
        );
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<AckHandle>();
        assert_send_sync::<JsMessage>();
        assert_send_sync::<PullStats>();
        assert_send_sync::<PullSource>();
        assert_send_sync::<crate::CoreSource>();
        assert_send_sync::<crate::Publisher>();
    }
}
