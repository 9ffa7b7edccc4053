//! The JetStream pull Source: demand follows the watermarks.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use async_nats::{HeaderMap, StatusCode, Subject};
use async_trait::async_trait;
use bytes::Bytes;
use flowctl_core::fair::Budget;
use flowctl_core::gate::Gate;
use flowctl_core::lifecycle::{Attempt, Lease};
use flowctl_core::{Fairness, FlowError, FlowStats, Source, Watermarks, Weighted};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::ClusterError;
use crate::cluster::{Cluster, Shared};
use std::sync::Arc;

/// When a message is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AckMode {
    /// `+ACK` is sent when [`Source::recv`] hands the message over.
    #[default]
    OnReceive,
    /// Each message carries an [`AckHandle`]; the application acks after
    /// processing. Unacked messages are redelivered after the consumer's
    /// `ack_wait` (and deduplicated by this source).
    Manual,
}

/// How [`Cluster::consume`] pulls.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Bytes buffered in this source: a pull is issued only while buffered
    /// bytes are at or below `low`, and buffered plus requested bytes never
    /// exceed `high`.
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
    /// After missed deliveries (a failover), how long messages that come after
    /// a gap in stream sequences are held back waiting for the redelivery of
    /// the missing ones. Set it above the consumer's `ack_wait`.
    pub hold_timeout: Duration,
    /// Fair-yield budget.
    pub fairness: Fairness,
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
            fairness: Fairness::default(),
        }
    }
}

/// Acknowledges one message (see [`AckMode::Manual`]).
#[derive(Debug, Clone)]
pub struct AckHandle {
    client: async_nats::Client,
    reply: Subject,
}

impl AckHandle {
    /// Sends `+ACK` (fire and forget: a lost ack means a redelivery, which the
    /// source deduplicates).
    pub async fn ack(&self) -> Result<(), FlowError> {
        self.client
            .publish(self.reply.clone(), Bytes::from_static(b"+ACK"))
            .await
            .map_err(|e| ClusterError::nats("ack", e).into())
    }

    /// Asks for an immediate redelivery.
    pub async fn nak(&self) -> Result<(), FlowError> {
        self.client
            .publish(self.reply.clone(), Bytes::from_static(b"-NAK"))
            .await
            .map_err(|e| ClusterError::nats("nak", e).into())
    }
}

/// One message of a stream, delivered once and in stream order.
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

/// One pull request that may still be open on the server.
#[derive(Debug, Clone, Copy)]
struct Req {
    /// Issue order: a probe answers for the requests sent before it.
    id: u64,
    msgs: usize,
    bytes: usize,
    delivered: usize,
    /// After this the server can no longer deliver for it: its `expires`
    /// has passed there, plus [`STRAGGLER_MARGIN`].
    deadline: Instant,
}

/// Time for a delivery the server made just before a request expired to
/// reach the subscription.
const STRAGGLER_MARGIN: Duration = Duration::from_secs(1);

/// Commands of the source's sender task: cancel-safe `recv` never awaits a publish.
#[derive(Debug)]
enum Cmd {
    Pull(Bytes),
    Ack(Subject),
    /// Ask the consumer leader how many pull requests it holds, on behalf of
    /// the requests with an id below this one (all published before it).
    Probe(u64),
}

/// A probe's answer: the id it was sent with and the leader's `num_waiting`
/// (`None`: no answer, e.g. during a leader election).
type ProbeReply = (u64, Option<usize>);

/// Counters of a [`PullSource`] beyond [`FlowStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullStats {
    /// Pull requests sent.
    pub pulls: u64,
    /// Redeliveries of messages already handed over, dropped.
    pub duplicates: u64,
    /// Times the source lost sight of its open requests (reconnect, missed
    /// heartbeats); they keep counting as demand until they end or expire.
    pub resets: u64,
    /// Deliveries the server sent that never arrived (gaps in the consumer sequence).
    pub missed: u64,
    /// Times held-back messages were released by `hold_timeout` with a gap left.
    pub hold_expired: u64,
    /// Held-back messages dropped unacked (the server redelivers them) to
    /// make room for the redeliveries that fill a gap within `high`.
    pub evicted: u64,
    /// Open requests found gone from the consumer leader by a probe after a
    /// reconnect or missed heartbeats (its consumer info showed fewer waiting
    /// requests), and so no longer counted as demand before their deadline.
    pub voided: u64,
}

/// A JetStream pull consumer as a flowctl [`Source`]; see [`Cluster::consume`].
#[derive(Debug)]
pub struct PullSource {
    shared: Arc<Shared>,
    sub: async_nats::Subscriber,
    inbox: String,
    stream: String,
    consumer: String,
    opts: ConsumeOptions,
    gate: Gate,
    queue: VecDeque<JsMessage>,
    held: BTreeMap<u64, JsMessage>,
    held_since: Option<Instant>,
    gap: bool,
    /// Pull requests that may still deliver, oldest first (the server serves
    /// waiting requests in order): messages and bytes each may still deliver.
    /// A request leaves only when it is known to be over: its last message or
    /// end status arrived, or its deadline passed. A reconnect does not end
    /// a request: it lives on the consumer leader and keeps delivering to the
    /// same inbox once the subscription is back.
    reqs: VecDeque<Req>,
    oversize: bool,
    last_seq: u64,
    last_cseq: u64,
    last_activity: Instant,
    generation: tokio::sync::watch::Receiver<u64>,
    cmd: mpsc::UnboundedSender<Cmd>,
    probes: mpsc::UnboundedReceiver<ProbeReply>,
    /// Probes awaiting an answer: one at a time, plus one per reconnect
    /// (the one before may hang on the dead connection).
    probing: usize,
    next_req: u64,
    budget: Budget,
    stats: PullStats,
    failed: Option<ClusterError>,
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
        st.get_consumer::<async_nats::jetstream::consumer::pull::Config>(consumer)
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
            .subscribe(inbox.clone())
            .await
            .map_err(|e| ClusterError::nats("subscribe", e))?;
        if let Ok(mut s) = slot.lock() {
            *s = Some(sub);
        }
        // The sender task, counted in the ledger, ends when the source drops.
        let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Cmd>();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel::<ProbeReply>();
        let next = format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}");
        let info = format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}");
        let task_client = client.clone();
        let task_inbox: Subject = inbox.clone().into();
        let handle = shared.ledger.spawn("nats.pull_task", async move {
            // Probes wait for an answer (up to the client's request timeout,
            // longer than a hung connection takes to be noticed): beside the
            // commands, so pulls and acks never queue behind one.
            let mut probes = futures::stream::FuturesUnordered::new();
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
                };
                let r = match cmd {
                    Cmd::Pull(body) => {
                        task_client
                            .publish_with_reply(next.clone(), task_inbox.clone(), body)
                            .await
                    }
                    Cmd::Ack(reply) => task_client.publish(reply, Bytes::from_static(b"+ACK")).await,
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
        attempt.disown(claim_sub);
        attempt.disown(claim_task);
        let generation = shared.generation.clone();
        let lease = shared.ledger.acquire("nats.subscription");
        let mut src = PullSource {
            gate: Gate::new(
                opts.watermarks,
                tracing::debug_span!("pull", stream, consumer),
            ),
            budget: Budget::new(opts.fairness),
            shared: shared.clone(),
            sub,
            inbox,
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            opts,
            queue: VecDeque::new(),
            held: BTreeMap::new(),
            held_since: None,
            gap: false,
            reqs: VecDeque::new(),
            oversize: false,
            last_seq: 0,
            last_cseq: 0,
            last_activity: Instant::now(),
            generation,
            cmd: cmd_tx,
            probes: probe_rx,
            probing: 0,
            next_req: 0,
            stats: PullStats::default(),
            failed: None,
            _lease: lease,
        };
        src.generation.borrow_and_update();
        src.maybe_pull();
        Ok(src)
    }
}

/// Parsed `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`
/// (9 tokens, server 2.9) or the 11/12-token form with domain and account hash.
fn parse_ack(reply: &str) -> Option<(u64, u64, u64)> {
    let t: Vec<&str> = reply.split('.').collect();
    if t.len() < 9 || t[0] != "$JS" || t[1] != "ACK" {
        return None;
    }
    let base = if t.len() == 9 { 4 } else { 6 };
    let delivered = t.get(base)?.parse().ok()?;
    let sseq = t.get(base + 1)?.parse().ok()?;
    let cseq = t.get(base + 2)?.parse().ok()?;
    Some((delivered, sseq, cseq))
}

/// Forgets requests sent before a probe (`id < upto`) beyond the `waiting`
/// ones the leader still holds, keeping those with the most bytes left.
/// Returns how many were forgotten.
fn void_gone(reqs: &mut VecDeque<Req>, upto: u64, waiting: usize) -> u64 {
    let mut old: Vec<(usize, u64)> = reqs
        .iter()
        .filter(|r| r.id < upto)
        .map(|r| (r.bytes, r.id))
        .collect();
    if old.len() <= waiting {
        return 0;
    }
    old.sort_unstable();
    let gone: Vec<u64> = old[..old.len() - waiting]
        .iter()
        .map(|&(_, id)| id)
        .collect();
    let before = reqs.len();
    reqs.retain(|r| !gone.contains(&r.id));
    (before - reqs.len()) as u64
}

/// `num_waiting` of a consumer info response; `None` for an error response.
fn num_waiting(payload: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if v.get("error").is_some() {
        return None;
    }
    v.get("num_waiting")?.as_u64().map(|n| n as usize)
}

fn header_num(m: &async_nats::Message, name: &str) -> usize {
    m.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0)
}

impl PullSource {
    /// Counters beyond [`FlowStats`].
    pub fn pull_stats(&self) -> PullStats {
        self.stats
    }

    /// The inbox this source's deliveries arrive on.
    pub fn inbox(&self) -> &str {
        &self.inbox
    }

    /// Bytes requested from the server and not yet delivered (an upper bound).
    pub fn outstanding_bytes(&self) -> usize {
        self.reqs.iter().map(|r| r.bytes).sum()
    }

    fn buffered(&self) -> usize {
        self.gate.buffered()
    }

    /// The `max_bytes` of one pull: half the band between the watermarks
    /// (at least a quarter of `high`), so two requests can be in flight.
    fn chunk(&self) -> usize {
        let wm = self.opts.watermarks;
        ((wm.high() - wm.low()) / 2).max(wm.high() / 4).max(1)
    }

    /// Issues pulls while buffered bytes are at or below `low` and the budget
    /// `high - buffered - outstanding` has room for another chunk; at most two
    /// requests are open. Buffered plus requested bytes never exceed `high`
    /// (the server enforces each request's `max_bytes`, counting more than
    /// the payload we charge), also across reconnects: requests that may
    /// still be open stay in `outstanding` until they are known to be over.
    fn maybe_pull(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let wm = self.opts.watermarks;
        if self.reqs.is_empty() && self.oversize && self.buffered() == 0 {
            // A single message larger than a chunk: admit exactly one.
            self.send_pull(1, 0);
            return;
        }
        if self.reqs.is_empty() && self.queue.is_empty() && !self.held.is_empty() {
            // Held-back messages wait for redeliveries, which need a request
            // even with a full buffer. Make room within `high` by dropping the
            // newest held messages unacked: the server redelivers them later.
            let chunk = self.chunk().min(wm.high());
            while self.buffered() + chunk > wm.high() {
                let Some((_, msg)) = self.held.pop_last() else {
                    break;
                };
                self.gate.credit(msg.weight());
                self.stats.evicted += 1;
            }
            if self.held.is_empty() {
                self.held_since = None;
            }
            self.send_pull(self.opts.batch, chunk);
            return;
        }
        let chunk = self.chunk();
        while self.reqs.len() < 2 && self.buffered() <= wm.low() {
            let free = wm
                .high()
                .saturating_sub(self.buffered() + self.outstanding_bytes());
            if free < chunk.min(wm.high()) {
                break;
            }
            if !self.send_pull(self.opts.batch, chunk.min(free)) {
                break;
            }
        }
    }

    fn send_pull(&mut self, batch: usize, max_bytes: usize) -> bool {
        let mut body = serde_json::json!({
            "batch": batch,
            "expires": self.opts.expires.as_nanos() as u64,
            "idle_heartbeat": self.opts.heartbeat.as_nanos() as u64,
        });
        if max_bytes > 0 {
            body["max_bytes"] = max_bytes.into();
        }
        let Ok(bytes) = serde_json::to_vec(&body) else {
            return false;
        };
        if self.cmd.send(Cmd::Pull(bytes.into())).is_err() {
            return false;
        }
        self.reqs.push_back(Req {
            id: self.next_req,
            msgs: batch,
            bytes: max_bytes,
            delivered: 0,
            deadline: Instant::now() + self.opts.expires + STRAGGLER_MARGIN,
        });
        self.next_req += 1;
        self.oversize = false;
        self.stats.pulls += 1;
        self.last_activity = Instant::now();
        tracing::trace!(batch, max_bytes, "pull");
        true
    }

    /// The open requests may end without a word (their end status lost with
    /// a connection, or the consumer leader moved). They are NOT forgotten:
    /// a request lives on the consumer leader until its `expires` and keeps
    /// delivering to this inbox, so its demand counts until it is seen to end
    /// or its deadline passes. After a reconnect, a pull the client still had
    /// queued may have reached the server only now: deadlines restart.
    fn reset_demand(&mut self, why: &'static str, reconnected: bool) {
        tracing::debug!(
            stream = %self.stream,
            consumer = %self.consumer,
            why,
            open = self.reqs.len(),
            outstanding = self.outstanding_bytes(),
            "pull requests may end silently; counting them until they expire"
        );
        self.stats.resets += 1;
        self.last_activity = Instant::now();
        if reconnected {
            let deadline = Instant::now() + self.opts.expires + STRAGGLER_MARGIN;
            for r in &mut self.reqs {
                r.deadline = r.deadline.max(deadline);
            }
        }
        self.expire_requests();
        if !self.reqs.is_empty()
            && (self.probing == 0 || reconnected)
            && self.cmd.send(Cmd::Probe(self.next_req)).is_ok()
        {
            self.probing += 1;
        }
        self.maybe_pull();
    }

    /// A probe's answer: the leader holds `waiting` pull requests. Requests
    /// this source sent before the probe that the leader no longer holds
    /// cannot deliver any more (the leader dropped them when their inbox lost
    /// interest, or a new leader never had them): stop counting them. When
    /// fewer are gone than were sent, the ones with the most bytes left are
    /// kept (the estimate errs towards counting too much).
    fn on_probe(&mut self, (upto, waiting): ProbeReply) {
        self.probing = self.probing.saturating_sub(1);
        let Some(waiting) = waiting else {
            tracing::debug!(stream = %self.stream, consumer = %self.consumer, "probe unanswered; open requests count until their deadline");
            return;
        };
        if self.reqs.iter().filter(|r| r.id < upto).count() <= waiting {
            return;
        }
        // Take in what already arrived for them before forgetting them.
        while let Some(Some(m)) = self.sub.next().now_or_never() {
            self.on_message(m);
        }
        let voided = void_gone(&mut self.reqs, upto, waiting);
        self.stats.voided += voided;
        tracing::debug!(stream = %self.stream, consumer = %self.consumer, voided, waiting, "open requests gone from the consumer leader");
        self.maybe_pull();
    }

    /// Drops requests whose deadline has passed, after taking in what the
    /// subscription already holds (deliveries for them may be waiting there).
    fn expire_requests(&mut self) {
        let now = Instant::now();
        if self.reqs.front().is_none_or(|r| r.deadline > now) {
            return;
        }
        while let Some(Some(m)) = self.sub.next().now_or_never() {
            self.on_message(m);
        }
        while self.reqs.front().is_some_and(|r| r.deadline <= now) {
            self.reqs.pop_front();
        }
    }

    /// The oldest open request ended (expired, no messages, max bytes, ...).
    fn end_request(&mut self) -> Option<Req> {
        self.reqs.pop_front()
    }

    fn on_message(&mut self, m: async_nats::Message) {
        self.last_activity = Instant::now();
        if let Some(status) = m.status {
            let desc = m.description.clone().unwrap_or_default().to_lowercase();
            match status {
                StatusCode::IDLE_HEARTBEAT => {}
                StatusCode::NOT_FOUND | StatusCode::TIMEOUT => {
                    // No messages / request expired: this request is over.
                    let _ = (
                        header_num(&m, "Nats-Pending-Messages"),
                        header_num(&m, "Nats-Pending-Bytes"),
                    );
                    self.end_request();
                }
                StatusCode::NO_RESPONDERS => {
                    // The consumer has no leader right now (an election).
                    self.end_request();
                }
                s if s.as_u16() == 409 => {
                    if desc.contains("consumer deleted") {
                        self.failed = Some(ClusterError::ConsumerNotFound {
                            stream: self.stream.clone(),
                            consumer: self.consumer.clone(),
                        });
                    } else if desc.contains("maxbytes") || desc.contains("max bytes") {
                        // Nothing fit: the next message is larger than a chunk.
                        if let Some(r) = self.end_request()
                            && r.delivered == 0
                        {
                            self.oversize = true;
                        }
                        return;
                    }
                    self.end_request();
                }
                _ => {
                    tracing::debug!(?status, desc, "pull source: unexpected status");
                    self.end_request();
                }
            }
            return;
        }
        let Some((delivered, sseq, cseq)) = m.reply.as_deref().and_then(parse_ack) else {
            tracing::debug!(subject = %m.subject, "pull source: message without a JetStream ack subject");
            return;
        };
        if let Some(r) = self.reqs.front_mut() {
            r.msgs = r.msgs.saturating_sub(1);
            // The payload is less than what the server counts: a
            // conservative (never too small) estimate of what is left.
            r.bytes = r.bytes.saturating_sub(m.payload.len());
            r.delivered += 1;
            if r.msgs == 0 {
                self.reqs.pop_front();
            }
        }
        if self.last_cseq != 0 && cseq > self.last_cseq + 1 {
            let missed = cseq - self.last_cseq - 1;
            self.stats.missed += missed;
            self.gap = true;
            tracing::debug!(
                missed,
                "pull source: deliveries lost in transit; holding back until redelivered"
            );
        }
        self.last_cseq = self.last_cseq.max(cseq);
        let reply = m.reply.clone();
        if sseq <= self.last_seq || self.held.contains_key(&sseq) {
            self.stats.duplicates += 1;
            if let Some(r) = reply {
                let _ = self.cmd.send(Cmd::Ack(r));
            }
            return;
        }
        let msg = JsMessage {
            subject: m.subject,
            payload: m.payload,
            headers: m.headers,
            stream_seq: sseq,
            delivered,
            ack: match (self.opts.ack, reply.clone()) {
                (AckMode::Manual, Some(r)) => Some(AckHandle {
                    client: self.shared.client.clone(),
                    reply: r,
                }),
                _ => None,
            },
        };
        // The reply subject for AckMode::OnReceive travels with the message.
        let msg = (msg, reply);
        self.gate.charge(msg.0.weight());
        if self.gap || !self.held.is_empty() {
            if sseq == self.last_seq + 1 {
                self.push_ready(msg);
                self.release_held(false);
            } else {
                if self.held.is_empty() {
                    self.held_since = Some(Instant::now());
                }
                self.hold(msg);
            }
        } else {
            self.push_ready(msg);
        }
    }

    fn hold(&mut self, (msg, reply): (JsMessage, Option<Subject>)) {
        let seq = msg.stream_seq;
        let mut msg = msg;
        if msg.ack.is_none() {
            msg.ack = reply.map(|r| AckHandle {
                client: self.shared.client.clone(),
                reply: r,
            });
        }
        self.held.insert(seq, msg);
    }

    fn push_ready(&mut self, (msg, reply): (JsMessage, Option<Subject>)) {
        self.last_seq = msg.stream_seq;
        let mut msg = msg;
        if self.opts.ack == AckMode::OnReceive && msg.ack.is_none() {
            // Keep the reply until hand-over; strip before delivering.
            msg.ack = reply.map(|r| AckHandle {
                client: self.shared.client.clone(),
                reply: r,
            });
        }
        self.queue.push_back(msg);
    }

    /// Moves held messages that are next in sequence (all of them if `force`).
    fn release_held(&mut self, force: bool) {
        while let Some(entry) = self.held.first_entry() {
            if !force && *entry.key() != self.last_seq + 1 {
                break;
            }
            let msg = entry.remove();
            self.last_seq = msg.stream_seq;
            self.queue.push_back(msg);
        }
        if self.held.is_empty() {
            self.gap = false;
            self.held_since = None;
        }
    }

    fn take_ready(&mut self) -> Option<JsMessage> {
        let mut msg = self.queue.pop_front()?;
        self.gate.credit(msg.weight());
        if self.opts.ack == AckMode::OnReceive
            && let Some(h) = msg.ack.take()
        {
            let _ = self.cmd.send(Cmd::Ack(h.reply));
        }
        self.maybe_pull();
        Some(msg)
    }

    fn check_timers(&mut self) {
        if let Some(since) = self.held_since
            && since.elapsed() >= self.opts.hold_timeout
        {
            {
                tracing::warn!(stream = %self.stream, consumer = %self.consumer, last = self.last_seq, "hold-back expired with a gap in stream sequences; releasing in order");
                self.stats.hold_expired += 1;
                self.release_held(true);
            }
        }
        if !self.reqs.is_empty()
            && self.last_activity.elapsed() >= self.opts.heartbeat * 2 + Duration::from_millis(100)
        {
            self.reset_demand("missed heartbeats", false);
        } else {
            self.expire_requests();
            self.maybe_pull();
        }
    }
}

#[async_trait]
impl Source for PullSource {
    type Item = JsMessage;

    async fn recv(&mut self) -> Result<Option<JsMessage>, FlowError> {
        loop {
            if !self.queue.is_empty() {
                std::future::poll_fn(|cx| self.budget.poll_proceed(cx)).await;
                if let Some(msg) = self.take_ready() {
                    self.budget.charge(msg.weight());
                    return Ok(Some(msg));
                }
            }
            if let Some(e) = self.failed.take() {
                return Err(e.into());
            }
            self.budget.reset();
            if self.generation.has_changed().unwrap_or(false) {
                self.generation.borrow_and_update();
                self.reset_demand("reconnected", true);
            }
            self.expire_requests();
            if !self.queue.is_empty() {
                continue;
            }
            self.maybe_pull();
            let mut tick = self.opts.heartbeat;
            if let Some(since) = self.held_since {
                tick = tick.min(self.opts.hold_timeout.saturating_sub(since.elapsed()));
            }
            if let Some(r) = self.reqs.front() {
                tick = tick.min(r.deadline.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                m = self.sub.next() => match m {
                    Some(m) => self.on_message(m),
                    None => return Err(FlowError::Closed),
                },
                Some(p) = self.probes.recv() => self.on_probe(p),
                r = self.generation.changed() => {
                    if r.is_ok() {
                        self.generation.borrow_and_update();
                        self.reset_demand("reconnected", true);
                    }
                }
                () = tokio::time::sleep(tick) => self.check_timers(),
            }
            // Drain what is already there without waiting.
            while let Some(Some(m)) = self.sub.next().now_or_never() {
                self.on_message(m);
            }
        }
    }

    fn stats(&self) -> FlowStats {
        self.gate.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: u64, bytes: usize) -> Req {
        Req {
            id,
            msgs: 16,
            bytes,
            delivered: 0,
            deadline: Instant::now(),
        }
    }

    fn ids(reqs: &VecDeque<Req>) -> Vec<u64> {
        reqs.iter().map(|r| r.id).collect()
    }

    #[test]
    fn a_probe_voids_only_requests_sent_before_it_and_gone() {
        // None left on the leader: every request older than the probe goes;
        // one sent after it stays whatever the answer.
        let mut reqs: VecDeque<Req> = [req(3, 100), req(4, 100), req(5, 100)].into();
        assert_eq!(void_gone(&mut reqs, 5, 0), 2);
        assert_eq!(ids(&reqs), [5]);
        // One of two still waiting: the one with more bytes left is kept.
        let mut reqs: VecDeque<Req> = [req(3, 10), req(4, 900)].into();
        assert_eq!(void_gone(&mut reqs, 5, 1), 1);
        assert_eq!(ids(&reqs), [4]);
        // As many waiting as were sent: nothing is forgotten.
        let mut reqs: VecDeque<Req> = [req(3, 10), req(4, 900)].into();
        assert_eq!(void_gone(&mut reqs, 5, 2), 0);
        assert_eq!(void_gone(&mut reqs, 5, 7), 0);
        assert_eq!(ids(&reqs), [3, 4]);
    }

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
    fn parses_ack_subjects() {
        assert_eq!(
            parse_ack("$JS.ACK.S.C.1.42.7.1700000000.3"),
            Some((1, 42, 7))
        );
        assert_eq!(
            parse_ack("$JS.ACK.dom.acc.S.C.2.43.8.1700000000.3.tok"),
            Some((2, 43, 8))
        );
        assert_eq!(parse_ack("_INBOX.x"), None);
    }
}
