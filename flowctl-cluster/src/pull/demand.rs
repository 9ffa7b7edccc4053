//! The pull source's protocol logic without I/O: demand, dedupe, order.
//!
//! [`Demand`] takes events (a delivery, a status, a timer tick, a reconnect,
//! a probe's answer, a hand-over, an application's ack) with the time they
//! happened, and queues commands (a pull request, an ack, a probe). It never
//! touches the network or the clock: the async shell in `pull/mod.rs` moves
//! bytes, and the unit and property tests at the end of this file drive it
//! with a model server.
//!
//! # What the server does (nats-server 2.9 to 2.15)
//!
//! Read from `server/consumer.go` (`processNextMsgRequest`, `nextWaiting`,
//! `getNextMsg`/`loopAndGatherMsgs`, `processWaiting`, `waitQueue`) and
//! measured against 2.9.10, 2.10.26, 2.12.8 and 2.15.1:
//!
//! - A pull request `{batch, max_bytes, expires, idle_heartbeat}` waits in
//!   the consumer leader's wait queue. Each delivery is charged
//!   `len(subject) + len(ack reply) + len(headers) + len(payload)` against
//!   its `max_bytes` (more than the payload). A message that no longer fits
//!   ends the request with `409 Message Size Exceeds MaxBytes`.
//! - The queue is served **round robin**: a request with more to take goes
//!   to the back after each delivery, so two open requests interleave their
//!   deliveries on the wire (every version). "The oldest request" does not
//!   own the next message.
//! - Every end status of a request carries `Nats-Pending-Messages` and
//!   `Nats-Pending-Bytes`: what that request will never deliver (`408
//!   Request Timeout`, `408 Interest Expired`, `409 Message Size Exceeds
//!   MaxBytes`; from 2.10 also `409 Batch Completed` when the batch is full
//!   with bytes left, which 2.9 ends silently). `409 Leadership Change`,
//!   `409 Consumer Deleted` and the rejections (`409 Exceeded MaxWaiting`,
//!   ...) carry none. `100 Idle Heartbeat` carries the last sequences.
//! - From 2.12 a clustered consumer with acks replicates each delivery
//!   through its raft group before sending it, while statuses go out at
//!   once: the end status of a request can arrive **before** the request's
//!   last deliveries (a `408` waits for them, the `409`s do not).
//! - Statuses are sent to the request's reply subject, messages to it too
//!   but with the message's own subject on the wire: with one inbox for all
//!   requests, neither can be told apart by request.
//!
//! So a source that gives each status to its oldest open request, or
//! subtracts a payload from the oldest request's estimate, ends requests
//! that still deliver and then asks again: on 2.12 and 2.15 it held 2.5x to
//! 5.5x its `high` with no fault at all.
//!
//! # The bound, by construction
//!
//! No status or message has to be attributed to a request. The source
//! keeps two sums over every request it sent: messages and bytes (as the
//! server counts them) requested, minus what arrived, minus what end
//! statuses declared will never come. Each request contributes
//! `delivered_by_it_so_far_or_ever - arrived_for_it >= 0`, so the sums are
//! upper bounds of what may still arrive, whichever request a message or a
//! status belongs to and in whatever order they come. The message sum at 0
//! means every request is over. A request also ends for certain at its
//! deadline (`expires` on the server plus a margin, restarted by a
//! reconnect) or when a probe finds it gone; the bytes still expected are
//! then at most the `max_bytes` of the requests left. A pull is sent only
//! when `buffered + outstanding + max_bytes <= high`, so
//! `buffered + outstanding <= high` at all times, and a message larger than
//! a request's `max_bytes` is admitted alone by a request of one message
//! when nothing else is buffered or outstanding: `high + one message`.
//!
//! # Order and dedupe
//!
//! Deliveries come in consumer-sequence order; a jump in the consumer
//! sequence means deliveries lost in transit (a failover), which the server
//! redelivers after `ack_wait`. Messages after such a gap are held back.
//! With `fill`, the missed ones are read from the stream ([`Command::Fetch`],
//! one at a time, within the bound): a scan from just after the highest
//! sequence released in order (`floor`) up to the first new delivery after
//! the gap (every lost delivery precedes it in stream order), skipping what
//! is held, handed out or settled; below the scan's cursor held messages are
//! released at once. Without `fill` (or while reading fails), held messages
//! wait until as many redeliveries as deliveries were missed have arrived
//! (or `hold_timeout`), then go out in stream order. Stream sequences need
//! not be contiguous (filters, several subjects, deleted messages).
//!
//! Only what this source handed out is deduplicated: a redelivery of a
//! message the application holds un-acked (Manual) is dropped without an
//! ack; one of a message already settled (acked by the application, or
//! handed out in OnReceive mode) is acked and dropped; anything else (for
//! example a previous instance's un-acked messages) is delivered. Memory:
//! the un-acked set is what the application holds (at most the consumer's
//! `max_ack_pending`), the settled set at most [`SETTLED_RANGES`] ranges of
//! consecutive sequences.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::{AckMode, PullStats};

/// Settled (acked) stream sequences are remembered as ranges of consecutive
/// sequences, to recognise a redelivery whose ack was lost (a consumer leader
/// that failed over can redeliver from an ack floor far behind). At most this
/// many ranges, the lowest forgotten first: one range for a stream read in
/// order, however long; about 400 KiB at most for a filtered consumer whose
/// sequences have gaps everywhere.
pub(crate) const SETTLED_RANGES: usize = 8192;

/// Time for a delivery the server made just before a request expired to
/// reach the subscription.
pub(crate) const STRAGGLER_MARGIN: Duration = Duration::from_secs(1);

/// Most requests counted at once (whatever their bytes).
const MAX_LIVE: usize = 8;

/// The knobs of [`Demand`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct DemandConfig {
    pub(crate) low: usize,
    pub(crate) high: usize,
    pub(crate) batch: usize,
    pub(crate) expires: Duration,
    pub(crate) heartbeat: Duration,
    pub(crate) hold_timeout: Duration,
    pub(crate) ack: AckMode,
    /// Fill gaps by reading the missed messages from the stream
    /// ([`Command::Fetch`]) instead of waiting for their redelivery.
    pub(crate) fill: bool,
    /// The consumer's `ack_wait`: when waiting for redeliveries, the pull
    /// that makes room for them goes out once they are due (a pull before
    /// then only brings new messages to hold and drop again).
    pub(crate) redelivery: Option<Duration>,
}

/// One delivery from the server.
#[derive(Debug)]
pub(crate) struct Delivery<T> {
    pub(crate) item: T,
    pub(crate) stream_seq: u64,
    pub(crate) consumer_seq: u64,
    /// How many times the server has delivered it (1: first time).
    pub(crate) delivered: u64,
    /// What the server charged it against `max_bytes`: subject, reply,
    /// headers and payload.
    pub(crate) size: usize,
    /// What the source charges against its watermarks (the payload).
    pub(crate) weight: usize,
}

/// A status message on the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Status {
    pub(crate) code: u16,
    pub(crate) description: String,
    /// `Nats-Pending-Messages` and `Nats-Pending-Bytes`, when both parse.
    pub(crate) pending: Option<(u64, u64)>,
    /// The request it ends, named by the reply subject the request gave
    /// (`None`: not one of ours).
    pub(crate) request: Option<u64>,
}

/// What the shell must do.
#[derive(Debug)]
pub(crate) enum Command<T> {
    /// Send a pull request.
    Pull {
        /// Sent with the reply subject `<inbox>.<id>`: statuses name it.
        id: u64,
        batch: usize,
        /// 0: no byte limit (a request of one message larger than a chunk).
        max_bytes: usize,
        expires: Duration,
        heartbeat: Duration,
    },
    /// Ack this delivery (a redelivery of a settled message) and drop it.
    Ack(T),
    /// Ask the consumer leader how many requests it holds, for those sent
    /// before request id `upto`.
    Probe { upto: u64 },
    /// Read one message from the stream (not through the consumer) and
    /// answer with [`Demand::on_fetched`]: the message with sequence `from`
    /// (`exact`), or the first one at or after `from` that the consumer's
    /// filter matches. At most one is in flight.
    Fetch { from: u64, exact: bool },
}

/// The answer to a [`Command::Fetch`].
#[derive(Debug)]
pub(crate) enum Fetched<T> {
    /// The message: its stream sequence, what the server would charge it
    /// against `max_bytes` and its watermark weight.
    Found {
        item: T,
        seq: u64,
        size: usize,
        weight: usize,
    },
    /// No such message (deleted, or none matches at or after `from`).
    NotFound,
    /// No answer (the stream leader is being elected, a timeout): retried
    /// after a heartbeat.
    Failed,
    /// The stream cannot be read this way (permissions): gaps wait for
    /// redeliveries from now on.
    Refused,
}

/// Filling a gap from the stream: every message of the consumer's filter
/// below `cursor` is accounted for (handed out, held or settled).
#[derive(Debug, Clone, Copy)]
struct Scan {
    cursor: u64,
    /// The scan is complete below this: the stream sequence of the first
    /// new delivery after the (last) gap; lost deliveries all come before
    /// it in stream order. `None` until such a delivery arrives.
    to: Option<u64>,
    /// A gap was seen after `to` was set: the next new delivery raises it.
    raise: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchState {
    Idle,
    InFlight {
        from: u64,
    },
    /// The last fetch failed: retry at this time; meanwhile gaps are also
    /// filled by redeliveries.
    Backoff(Instant),
}

/// Why the source cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    ConsumerDeleted,
}

#[derive(Debug, Clone, Copy)]
struct Req {
    id: u64,
    /// `max_bytes`; `None` for the single unbounded message.
    cap: Option<usize>,
    deadline: Instant,
    /// Its end status arrived; deliveries may still follow (2.12+).
    ended: bool,
}

#[derive(Debug)]
struct Entry<T> {
    item: T,
    seq: u64,
    size: usize,
    weight: usize,
}

/// The demand, order and dedupe state of one pull source.
#[derive(Debug)]
pub(crate) struct Demand<T> {
    cfg: DemandConfig,
    reqs: VecDeque<Req>,
    /// Messages requested minus arrived minus declared never to come.
    agg_msgs: u64,
    /// The same in server-counted bytes.
    agg_bytes: u64,
    next_req: u64,
    /// The next message does not fit a chunk: ask for it alone.
    oversize: bool,
    queue: VecDeque<Entry<T>>,
    held: BTreeMap<u64, Entry<T>>,
    /// Deliveries missed (consumer-sequence gaps) not yet made up by redeliveries.
    missing: u64,
    /// Stream sequence of the first message held back after a gap.
    barrier: Option<u64>,
    held_since: Option<Instant>,
    /// Held messages dropped unacked to make room while holding back; the
    /// server redelivers them. Held messages after the smallest of them wait
    /// for it. Cleared when the hold-back ends.
    evicted: BTreeSet<u64>,
    /// The last time held messages were dropped: at most once a heartbeat
    /// (once an `ack_wait` when it is known), so that waiting for a
    /// redelivery does not walk the stream.
    last_eviction: Option<Instant>,
    /// When the last gap was seen: its redeliveries are due `ack_wait` later.
    gap_at: Option<Instant>,
    /// Highest stream sequence released in order: every message of the
    /// consumer's filter up to it was handed out or is ready.
    floor: u64,
    scan: Option<Scan>,
    fetch: FetchState,
    /// Filling from the stream is allowed (not refused).
    fill: bool,
    in_buffer: HashSet<u64>,
    /// Handed out in Manual mode, not acked yet.
    unacked: HashSet<u64>,
    /// Settled sequences as ranges: start -> end, both inclusive, disjoint
    /// and not adjacent.
    settled: BTreeMap<u64, u64>,
    last_cseq: u64,
    size_buffered: usize,
    weight_buffered: usize,
    last_activity: Instant,
    probing: usize,
    failed: Option<Failure>,
    stats: PullStats,
    cmds: VecDeque<Command<T>>,
}

impl<T> Demand<T> {
    pub(crate) fn new(cfg: DemandConfig, now: Instant) -> Self {
        Demand {
            cfg,
            reqs: VecDeque::new(),
            agg_msgs: 0,
            agg_bytes: 0,
            next_req: 0,
            oversize: false,
            queue: VecDeque::new(),
            held: BTreeMap::new(),
            missing: 0,
            barrier: None,
            held_since: None,
            evicted: BTreeSet::new(),
            last_eviction: None,
            gap_at: None,
            floor: 0,
            scan: None,
            fetch: FetchState::Idle,
            fill: cfg.fill,
            in_buffer: HashSet::new(),
            unacked: HashSet::new(),
            settled: BTreeMap::new(),
            last_cseq: 0,
            size_buffered: 0,
            weight_buffered: 0,
            last_activity: now,
            probing: 0,
            failed: None,
            stats: PullStats::default(),
            cmds: VecDeque::new(),
        }
    }

    /// The consumer's last delivery when the source starts (from its
    /// consumer info): a first delivery after a jump from `consumer_seq` was
    /// preceded by lost ones, and every message up to `stream_seq` was
    /// delivered before (to a previous reader: its un-acked ones come as
    /// redeliveries).
    pub(crate) fn set_last_delivered(&mut self, consumer_seq: u64, stream_seq: u64) {
        self.last_cseq = consumer_seq;
        self.floor = stream_seq;
    }

    // ---- getters ----

    /// Server-counted bytes buffered (held back or ready).
    #[cfg(test)]
    pub(crate) fn size_buffered(&self) -> usize {
        self.size_buffered
    }

    /// Watermark weight buffered.
    pub(crate) fn weight_buffered(&self) -> usize {
        self.weight_buffered
    }

    /// Bytes the open requests may still deliver (an upper bound); a
    /// request of one unbounded message counts 0 here.
    pub(crate) fn outstanding(&self) -> usize {
        if self.reqs.is_empty() {
            return 0;
        }
        let caps: usize = self.reqs.iter().filter_map(|r| r.cap).sum();
        caps.min(usize::try_from(self.agg_bytes).unwrap_or(usize::MAX))
    }

    /// An unbounded single-message request is open.
    pub(crate) fn unbounded_open(&self) -> bool {
        self.reqs.iter().any(|r| r.cap.is_none())
    }

    #[cfg(test)]
    pub(crate) fn open_requests(&self) -> usize {
        self.reqs.len()
    }

    pub(crate) fn stats(&self) -> PullStats {
        self.stats
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.queue.is_empty()
    }

    pub(crate) fn take_failure(&mut self) -> Option<Failure> {
        self.failed.take()
    }

    pub(crate) fn poll_command(&mut self) -> Option<Command<T>> {
        self.cmds.pop_front()
    }

    /// When [`Demand::on_timer`] has something to do (at most a heartbeat away).
    pub(crate) fn next_timeout(&self, now: Instant) -> Instant {
        let mut t = now + self.cfg.heartbeat;
        if !self.reqs.is_empty() {
            t = t.min(self.last_activity + self.silence());
        }
        if let Some(since) = self.held_since {
            t = t.min(since + self.cfg.hold_timeout);
        }
        if let Some(d) = self.reqs.iter().map(|r| r.deadline).min() {
            t = t.min(d);
        }
        if let FetchState::Backoff(at) = self.fetch {
            t = t.min(at);
        }
        if self.barrier.is_some()
            && let Some(due) = self.redeliveries_due()
            && due > now
        {
            t = t.min(due);
        }
        t
    }

    /// When the redeliveries a hold-back waits for are due: an `ack_wait`
    /// after the last gap or the last drop of held messages.
    fn redeliveries_due(&self) -> Option<Instant> {
        let wait = self.cfg.redelivery?;
        let since = match (self.gap_at, self.last_eviction) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b)?,
        };
        Some(since + wait)
    }

    fn silence(&self) -> Duration {
        self.cfg.heartbeat * 2 + Duration::from_millis(100)
    }

    fn chunk(&self) -> usize {
        let (low, high) = (self.cfg.low, self.cfg.high);
        ((high - low) / 2).max(high / 4).clamp(1, high.max(1))
    }

    // ---- event handlers ----

    /// The source starts (or the application waits): pull if there is room.
    pub(crate) fn on_start(&mut self, now: Instant) {
        self.maybe_pull(now);
    }

    /// A delivery arrived.
    pub(crate) fn on_message(&mut self, d: Delivery<T>, now: Instant) {
        self.last_activity = now;
        self.agg_msgs = self.agg_msgs.saturating_sub(1);
        self.agg_bytes = self.agg_bytes.saturating_sub(d.size as u64);
        self.settle_requests();
        if d.consumer_seq > self.last_cseq + 1 {
            let missed = d.consumer_seq - self.last_cseq - 1;
            self.stats.missed += missed;
            self.missing += missed;
            self.gap_at = Some(now);
            if self.barrier.is_none() {
                self.barrier = Some(d.stream_seq);
            }
            if self.fill {
                match &mut self.scan {
                    None => {
                        self.scan = Some(Scan {
                            cursor: self.floor + 1,
                            to: None,
                            raise: false,
                        });
                    }
                    Some(sc) => sc.raise = sc.to.is_some(),
                }
            }
            tracing::debug!(
                missed,
                "pull source: deliveries lost in transit; holding back until redelivered"
            );
        }
        self.last_cseq = self.last_cseq.max(d.consumer_seq);
        let seq = d.stream_seq;
        if self.in_buffer.contains(&seq) || self.unacked.contains(&seq) {
            // Held here or by the application: its own hand-over or ack settles it.
            self.stats.duplicates += 1;
            self.maybe_pull(now);
            return;
        }
        if self.is_settled(seq) {
            // Acked before; that ack was lost or late.
            self.stats.duplicates += 1;
            self.cmds.push_back(Command::Ack(d.item));
            self.maybe_pull(now);
            return;
        }
        let e = Entry {
            item: d.item,
            seq,
            size: d.size,
            weight: d.weight,
        };
        self.size_buffered += e.size;
        self.weight_buffered += e.weight;
        self.in_buffer.insert(seq);
        if let Some(barrier) = self.barrier {
            let evicted = self.evicted.remove(&seq);
            if self.missing > 0 && !evicted && (seq < barrier || d.delivered > 1) {
                self.missing -= 1;
            }
            if d.delivered == 1
                && let Some(sc) = &mut self.scan
                && (sc.to.is_none() || sc.raise)
            {
                // Every delivery lost before this new one has a lower
                // stream sequence.
                sc.to = Some(sc.to.map_or(seq, |to| to.max(seq)));
                sc.raise = false;
            }
            self.hold(e, now);
            self.advance_scan();
            self.release_in_order();
        } else {
            self.ready(e);
        }
        self.maybe_pull(now);
    }

    /// The answer to the [`Command::Fetch`] in flight.
    pub(crate) fn on_fetched(&mut self, f: Fetched<T>, now: Instant) {
        let FetchState::InFlight { from } = self.fetch else {
            return;
        };
        self.fetch = FetchState::Idle;
        match f {
            Fetched::Found {
                item,
                seq,
                size,
                weight,
            } => {
                if let Some(sc) = &mut self.scan
                    && sc.cursor == from
                    && !sc.raise
                    && let Some(to) = sc.to
                {
                    // Nothing the filter matches in [cursor, seq).
                    sc.cursor = seq.min(to).max(sc.cursor);
                }
                let wanted = self.scan.is_some_and(|sc| seq < sc.to.unwrap_or(0))
                    || self.evicted.contains(&seq);
                if wanted && !self.known(seq) {
                    self.evicted.remove(&seq);
                    self.stats.filled += 1;
                    let e = Entry {
                        item,
                        seq,
                        size,
                        weight,
                    };
                    self.size_buffered += e.size;
                    self.weight_buffered += e.weight;
                    self.in_buffer.insert(seq);
                    if self.barrier.is_some() {
                        self.hold(e, now);
                    } else {
                        self.ready(e);
                    }
                }
            }
            Fetched::NotFound => {
                if !self.evicted.remove(&from)
                    && let Some(sc) = &mut self.scan
                    && sc.cursor == from
                    && !sc.raise
                    && let Some(to) = sc.to
                {
                    sc.cursor = sc.cursor.max(to);
                }
            }
            Fetched::Failed => {
                self.stats.fetch_failures += 1;
                self.fetch = FetchState::Backoff(now + self.cfg.heartbeat);
            }
            Fetched::Refused => {
                tracing::warn!(
                    "pull source: reading the stream to fill a gap was refused; gaps wait for redeliveries"
                );
                self.stats.fetch_failures += 1;
                self.fill = false;
                self.scan = None;
            }
        }
        self.advance_scan();
        self.release_in_order();
        self.maybe_pull(now);
    }

    /// A status arrived on the inbox.
    pub(crate) fn on_status(&mut self, s: &Status, now: Instant) {
        self.last_activity = now;
        let desc = s.description.to_ascii_lowercase();
        if s.code == 100 {
            self.maybe_pull(now);
            return;
        }
        if s.code == 409 && desc.contains("consumer deleted") {
            self.failed = Some(Failure::ConsumerDeleted);
            return;
        }
        // Only the first end status of a request still counted says
        // anything: one for a request already forgotten (its deadline
        // passed, a probe found it gone) or ended must not release the
        // demand of others.
        let Some(r) = s
            .request
            .and_then(|id| self.reqs.iter_mut().find(|r| r.id == id && !r.ended))
        else {
            tracing::debug!(
                code = s.code,
                desc,
                "pull source: status for no open request"
            );
            self.maybe_pull(now);
            return;
        };
        match s.pending {
            Some((msgs, bytes)) => {
                r.ended = true;
                let cap = r.cap;
                self.agg_msgs = self.agg_msgs.saturating_sub(msgs);
                self.agg_bytes = self.agg_bytes.saturating_sub(bytes);
                if s.code == 409
                    && (desc.contains("maxbytes") || desc.contains("max bytes"))
                    && cap.is_some()
                    && msgs >= self.cfg.batch as u64
                {
                    // Nothing fit: the next message is larger than a chunk.
                    self.oversize = true;
                }
                self.settle_requests();
            }
            None => {
                // Ended without saying what it delivered (leadership
                // change, a rejection): it counts until its deadline or a
                // probe finds it gone.
                r.ended = true;
                tracing::debug!(
                    code = s.code,
                    desc,
                    "pull source: status without pending counts"
                );
                self.probe(false);
            }
        }
        self.maybe_pull(now);
    }

    /// Time passed: deadlines, hold-back, missed heartbeats.
    pub(crate) fn on_timer(&mut self, now: Instant) {
        if let Some(since) = self.held_since
            && now.saturating_duration_since(since) >= self.cfg.hold_timeout
        {
            tracing::warn!(
                missing = self.missing,
                "hold-back expired with deliveries missing; releasing in stream order"
            );
            self.stats.hold_expired += 1;
            self.missing = 0;
            self.release_held();
        }
        if !self.reqs.is_empty()
            && now.saturating_duration_since(self.last_activity) >= self.silence()
        {
            self.reset(false, now);
        }
        self.maybe_pull(now);
    }

    /// The connection was re-established: open requests live on, and a
    /// pull still queued in the client may have reached the server only now.
    pub(crate) fn on_reconnected(&mut self, now: Instant) {
        self.reset(true, now);
        self.maybe_pull(now);
    }

    /// A probe's answer: the leader holds `waiting` requests (`None`: no answer).
    /// The shell first feeds every delivery that already arrived.
    pub(crate) fn on_probe(&mut self, upto: u64, waiting: Option<usize>, now: Instant) {
        self.probing = self.probing.saturating_sub(1);
        let Some(waiting) = waiting else {
            return;
        };
        let mut old: Vec<(usize, u64)> = self
            .reqs
            .iter()
            .filter(|r| r.id < upto)
            .map(|r| (r.cap.unwrap_or(usize::MAX), r.id))
            .collect();
        if old.len() > waiting {
            old.sort_unstable();
            let gone: Vec<u64> = old[..old.len() - waiting]
                .iter()
                .map(|&(_, id)| id)
                .collect();
            let before = self.reqs.len();
            self.reqs.retain(|r| !gone.contains(&r.id));
            self.stats.voided += (before - self.reqs.len()) as u64;
            self.settle_requests();
        }
        self.maybe_pull(now);
    }

    /// Takes the next message for the application. `true`: ack it now (OnReceive).
    pub(crate) fn take(&mut self, now: Instant) -> Option<(T, u64, bool)> {
        let e = self.queue.pop_front()?;
        self.size_buffered -= e.size;
        self.weight_buffered -= e.weight;
        self.in_buffer.remove(&e.seq);
        let ack = match self.cfg.ack {
            AckMode::Manual => {
                self.unacked.insert(e.seq);
                false
            }
            AckMode::OnReceive => {
                self.settle(e.seq);
                true
            }
        };
        self.maybe_pull(now);
        Some((e.item, e.seq, ack))
    }

    /// The application acked a message it was handed (Manual).
    pub(crate) fn on_acked(&mut self, seq: u64) {
        if self.unacked.remove(&seq) {
            self.settle(seq);
        }
    }

    /// The application let go of a message without acking it (nak, or the
    /// handle dropped): its redelivery is delivered again.
    pub(crate) fn on_released(&mut self, seq: u64) {
        self.unacked.remove(&seq);
    }

    // ---- internals ----

    fn settle(&mut self, seq: u64) {
        if self.is_settled(seq) {
            return;
        }
        // Joins the range ending right below and the one starting right above.
        let below = self
            .settled
            .range(..seq)
            .next_back()
            .filter(|&(_, &end)| end + 1 == seq)
            .map(|(&start, _)| start);
        let above = seq
            .checked_add(1)
            .and_then(|next| self.settled.remove(&next));
        let start = below.unwrap_or(seq);
        self.settled.insert(start, above.unwrap_or(seq));
        if self.settled.len() > SETTLED_RANGES {
            self.settled.pop_first();
        }
    }

    fn is_settled(&self, seq: u64) -> bool {
        self.settled
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &end)| seq <= end)
    }

    /// Releases everything held (the hold-back timed out).
    fn release_held(&mut self) {
        self.missing = 0;
        self.evicted.clear();
        self.scan = None;
        self.release_in_order();
    }

    /// A message ready for the application, in order.
    fn ready(&mut self, e: Entry<T>) {
        self.floor = self.floor.max(e.seq);
        self.queue.push_back(e);
    }

    /// Holds a message back (after a gap).
    fn hold(&mut self, e: Entry<T>, now: Instant) {
        if self.held.is_empty() {
            self.held_since = Some(now);
        }
        self.held.insert(e.seq, e);
    }

    /// Handed out, buffered here, held by the application or settled.
    fn known(&self, seq: u64) -> bool {
        self.in_buffer.contains(&seq) || self.unacked.contains(&seq) || self.is_settled(seq)
    }

    /// Moves the scan's cursor over what is known without asking the
    /// stream; a scan that reached its end fills the gap.
    fn advance_scan(&mut self) {
        let Some(mut sc) = self.scan else {
            return;
        };
        loop {
            if let Some(to) = sc.to
                && !sc.raise
                && sc.cursor >= to
            {
                // Every message before the first new delivery after the
                // gap is accounted for: the missed ones are here or settled.
                self.scan = None;
                self.missing = 0;
                return;
            }
            let c = sc.cursor;
            if let Some((_, &end)) = self.settled.range(..=c).next_back()
                && c <= end
            {
                sc.cursor = end + 1;
            } else if self.in_buffer.contains(&c)
                || self.unacked.contains(&c)
                || self.evicted.contains(&c)
            {
                sc.cursor = c + 1;
            } else {
                break;
            }
        }
        self.scan = Some(sc);
    }

    /// Once the missed deliveries are made up (or, while a scan fills them
    /// from the stream, below its cursor), releases held messages in stream
    /// order up to the first one dropped to make room (it comes back).
    fn release_in_order(&mut self) {
        let mut until = self.evicted.first().copied().unwrap_or(u64::MAX);
        if self.missing > 0 {
            match self.scan {
                Some(sc) => until = until.min(sc.cursor),
                None => return,
            }
        }
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() >= until {
                break;
            }
            let e = entry.remove();
            self.ready(e);
        }
        if self.held.is_empty() {
            self.held_since = None;
        }
        if self.missing == 0 && self.evicted.is_empty() {
            // (held is empty here: everything was released)
            self.barrier = None;
            self.held_since = None;
            self.scan = None;
        }
    }

    /// What to read from the stream next: the scan's cursor once its end is
    /// known, then the held messages dropped for room, lowest first.
    fn next_fetch(&self) -> Option<(u64, bool)> {
        match self.scan {
            Some(sc) if sc.to.is_some() && !sc.raise => Some((sc.cursor, false)),
            Some(_) => None,
            None => self.evicted.first().map(|&seq| (seq, true)),
        }
    }

    /// Fills a gap from the stream: returns false when the source should
    /// pull instead (nothing to read yet, or reading failed a moment ago).
    fn fill_from_stream(&mut self, now: Instant) -> bool {
        if !self.fill || self.barrier.is_none() {
            return false;
        }
        match self.fetch {
            FetchState::InFlight { .. } => return true,
            FetchState::Backoff(at) if at > now => return false,
            _ => self.fetch = FetchState::Idle,
        }
        let Some((from, exact)) = self.next_fetch() else {
            return false;
        };
        let high = self.cfg.high;
        let room = |d: &Self| !d.unbounded_open() && d.size_buffered + d.outstanding() < high;
        if !room(self) && self.queue.is_empty() && self.reqs.iter().all(|r| r.ended) {
            // Nothing to hand out and no request delivering: the held
            // messages above the one needed make room; they come back by
            // the same way.
            while !room(self)
                && let Some(entry) = self.held.last_entry()
                && *entry.key() > from
            {
                let e = entry.remove();
                self.size_buffered -= e.size;
                self.weight_buffered -= e.weight;
                self.in_buffer.remove(&e.seq);
                self.evicted.insert(e.seq);
                self.stats.evicted += 1;
            }
            if self.held.is_empty() {
                self.held_since = None;
            }
        }
        if room(self) {
            self.fetch = FetchState::InFlight { from };
            self.cmds.push_back(Command::Fetch { from, exact });
        }
        true
    }

    /// Forgets requests known to be over: every one, when no message is
    /// still expected.
    fn settle_requests(&mut self) {
        if self.agg_msgs == 0 || self.reqs.is_empty() {
            self.reqs.clear();
            self.agg_msgs = 0;
            self.agg_bytes = 0;
        }
    }

    fn expire(&mut self, now: Instant) {
        let before = self.reqs.len();
        self.reqs.retain(|r| r.deadline > now);
        if self.reqs.len() != before {
            self.settle_requests();
        }
    }

    fn reset(&mut self, reconnected: bool, now: Instant) {
        self.stats.resets += 1;
        if !reconnected {
            self.stats.heartbeats_missed += 1;
        }
        self.last_activity = now;
        if reconnected {
            let deadline = now + self.cfg.expires + STRAGGLER_MARGIN;
            for r in &mut self.reqs {
                r.deadline = r.deadline.max(deadline);
            }
        }
        self.probe(reconnected);
    }

    fn probe(&mut self, force: bool) {
        if !self.reqs.is_empty() && (self.probing == 0 || force) {
            self.probing += 1;
            self.cmds.push_back(Command::Probe {
                upto: self.next_req,
            });
        }
    }

    fn send_pull(&mut self, batch: usize, cap: Option<usize>, now: Instant) {
        self.cmds.push_back(Command::Pull {
            id: self.next_req,
            batch,
            max_bytes: cap.unwrap_or(0),
            expires: self.cfg.expires,
            heartbeat: self.cfg.heartbeat,
        });
        self.reqs.push_back(Req {
            id: self.next_req,
            cap,
            deadline: now + self.cfg.expires + STRAGGLER_MARGIN,
            ended: false,
        });
        self.agg_msgs += batch as u64;
        self.agg_bytes += cap.unwrap_or(0) as u64;
        self.next_req += 1;
        self.stats.pulls += 1;
        if self.reqs.len() == 1 {
            self.last_activity = now;
        }
    }

    fn maybe_pull(&mut self, now: Instant) {
        self.expire(now);
        if self.failed.is_some() {
            return;
        }
        let high = self.cfg.high;
        let chunk = self.chunk();
        if self.oversize && self.reqs.is_empty() && self.size_buffered == 0 {
            // A single message larger than a chunk: admit exactly one.
            self.oversize = false;
            self.send_pull(1, None, now);
            return;
        }
        if self.fill_from_stream(now) {
            // No new pulls while a gap is filled from the stream.
            return;
        }
        if self.barrier.is_some() && self.queue.is_empty() && self.reqs.iter().all(|r| r.ended) {
            // Held-back messages wait for redeliveries, which need a request
            // even with a full buffer: drop the newest held ones unacked (the
            // server redelivers them) to make room, at most once a heartbeat.
            // With the consumer's `ack_wait` known, the request waits until
            // the redeliveries are due: the server sends them first then,
            // while a request before then brings only new messages to hold.
            if self.redeliveries_due().is_some_and(|due| now < due) {
                return;
            }
            let needed = |d: &Self| d.size_buffered + d.outstanding() + chunk;
            if needed(self) > high {
                if self
                    .last_eviction
                    .is_some_and(|t| now.saturating_duration_since(t) < self.cfg.heartbeat)
                {
                    return;
                }
                self.last_eviction = Some(now);
            }
            while needed(self) > high {
                let Some((_, e)) = self.held.pop_last() else {
                    break;
                };
                self.size_buffered -= e.size;
                self.weight_buffered -= e.weight;
                self.in_buffer.remove(&e.seq);
                self.evicted.insert(e.seq);
                self.stats.evicted += 1;
            }
            if self.held.is_empty() {
                self.held_since = None;
            }
            if needed(self) <= high {
                self.send_pull(self.cfg.batch, Some(chunk), now);
            }
            return;
        }
        while self.reqs.iter().filter(|r| !r.ended).count() < 2
            && self.reqs.len() < MAX_LIVE
            && self.size_buffered <= self.cfg.low
            && !self.oversize
            && !self.unbounded_open()
        {
            let free = high.saturating_sub(self.size_buffered + self.outstanding());
            if free < chunk {
                break;
            }
            self.send_pull(self.cfg.batch, Some(chunk), now);
        }
    }
}

/// `Nats-Pending-Messages`/`Nats-Pending-Bytes` value: a decimal count.
pub(crate) fn parse_count(v: &str) -> Option<u64> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Parsed `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`
/// (9 tokens) or `$JS.ACK.<domain>.<account hash>.<stream>.<consumer>.
/// <delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]` (11 or 12 tokens):
/// `(delivered, stream seq, consumer seq)`.
pub(crate) fn parse_ack(reply: &str) -> Option<(u64, u64, u64)> {
    let t: Vec<&str> = reply.split('.').collect();
    if t.len() < 2 || t[0] != "$JS" || t[1] != "ACK" {
        return None;
    }
    let base = match t.len() {
        9 => 4,
        11 | 12 => 6,
        _ => return None,
    };
    if t[..base + 5].iter().any(|s| s.is_empty()) {
        return None;
    }
    let delivered = parse_count(t[base])?;
    let sseq = parse_count(t[base + 1])?;
    let cseq = parse_count(t[base + 2])?;
    parse_count(t[base + 3])?;
    parse_count(t[base + 4])?;
    Some((delivered, sseq, cseq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn cfg(low: usize, high: usize, batch: usize, ack: AckMode) -> DemandConfig {
        DemandConfig {
            low,
            high,
            batch,
            expires: Duration::from_secs(5),
            heartbeat: Duration::from_millis(500),
            hold_timeout: Duration::from_secs(600),
            ack,
            fill: false,
            redelivery: None,
        }
    }

    fn msg(seq: u64, cseq: u64, delivered: u64, size: usize) -> Delivery<u64> {
        Delivery {
            item: seq,
            stream_seq: seq,
            consumer_seq: cseq,
            delivered,
            size,
            weight: size / 2,
        }
    }

    fn pulls(d: &mut Demand<u64>) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        while let Some(c) = d.poll_command() {
            if let Command::Pull {
                batch, max_bytes, ..
            } = c
            {
                v.push((batch, max_bytes));
            }
        }
        v
    }

    fn end(req: u64, code: u16, desc: &str, msgs: u64, bytes: u64) -> Status {
        Status {
            code,
            description: desc.into(),
            pending: Some((msgs, bytes)),
            request: Some(req),
        }
    }

    #[test]
    fn an_end_status_before_its_last_deliveries_does_not_open_new_demand() {
        // nats-server 2.12+: `409 Message Size Exceeds MaxBytes` overtakes
        // the request's replicated deliveries.
        let t = Instant::now();
        let mut d = Demand::new(cfg(0, 4000, 64, AckMode::OnReceive), t);
        d.on_start(t);
        assert_eq!(pulls(&mut d), [(64, 2000), (64, 2000)]);
        // Request 1 delivered 3 x 600 and ended (200 bytes left); nothing arrived yet.
        d.on_status(&end(0, 409, "Message Size Exceeds MaxBytes", 61, 200), t);
        assert_eq!(d.outstanding(), 3800);
        assert!(pulls(&mut d).is_empty(), "3 x 600 bytes may still come");
        for i in 1..=3 {
            d.on_message(msg(i, i, 1, 600), t);
        }
        assert_eq!(d.size_buffered() + d.outstanding(), 3800);
        // The same status again, or one for a request never sent, says nothing.
        d.on_status(&end(0, 408, "Request Timeout", 61, 200), t);
        d.on_status(&end(9, 408, "Request Timeout", 64, 2000), t);
        assert_eq!(d.outstanding(), 2000);
    }

    #[test]
    fn round_robin_deliveries_and_statuses_in_any_order_keep_the_bound() {
        let t = Instant::now();
        let mut d = Demand::new(cfg(0, 4000, 4, AckMode::OnReceive), t);
        d.on_start(t);
        assert_eq!(pulls(&mut d).len(), 2);
        // Both requests filled their batch of 4 x 500 (interleaved), and the
        // first end status arrives before any message.
        d.on_status(&end(1, 409, "Batch Completed", 0, 0), t);
        for i in 1..=8 {
            d.on_message(msg(i, i, 1, 500), t);
            assert!(d.size_buffered() + d.outstanding() <= 4000);
        }
        // Every requested message arrived: both requests are over.
        assert_eq!((d.open_requests(), d.outstanding()), (0, 0));
        while d.take(t).is_some() {}
        assert_eq!(pulls(&mut d).len(), 2);
    }

    #[test]
    fn a_request_counts_until_its_deadline_when_its_end_is_lost() {
        let t = Instant::now();
        let mut d = Demand::new(cfg(0, 4000, 4, AckMode::OnReceive), t);
        d.on_start(t);
        assert_eq!(pulls(&mut d).len(), 2);
        d.on_status(
            &Status {
                code: 409,
                description: "Leadership Change".into(),
                pending: None,
                request: Some(0),
            },
            t,
        );
        d.on_timer(t + Duration::from_secs(5));
        assert!(pulls(&mut d).is_empty());
        assert_eq!(d.outstanding(), 4000);
        d.on_timer(t + Duration::from_secs(6));
        assert_eq!(
            pulls(&mut d).len(),
            2,
            "both requests are over at their deadline"
        );
    }

    #[test]
    fn resets_tell_missed_heartbeats_from_reconnects() {
        let t = Instant::now();
        let mut d = Demand::new(cfg(0, 4000, 4, AckMode::OnReceive), t);
        d.on_start(t);
        assert_eq!(pulls(&mut d).len(), 2);
        d.on_reconnected(t);
        assert_eq!((d.stats().resets, d.stats().heartbeats_missed), (1, 0));
        // Two heartbeats (and a margin) without a word while requests are open.
        d.on_timer(t + Duration::from_millis(1200));
        assert_eq!((d.stats().resets, d.stats().heartbeats_missed), (2, 1));
    }

    #[test]
    fn a_probe_voids_only_requests_sent_before_it_and_gone() {
        let t = Instant::now();
        let mut d = Demand::new(cfg(0, 4000, 4, AckMode::OnReceive), t);
        d.on_start(t);
        assert_eq!(pulls(&mut d).len(), 2);
        d.on_reconnected(t);
        let upto = match d.poll_command() {
            Some(Command::Probe { upto }) => upto,
            c => panic!("expected a probe, got {c:?}"),
        };
        d.on_probe(upto, Some(1), t);
        assert_eq!(d.stats().voided, 1);
        // One request's bytes are free again: one more pull, sent after the probe.
        assert_eq!(pulls(&mut d).len(), 1);
        assert_eq!(d.open_requests(), 2);
        d.on_probe(upto, Some(0), t);
        assert_eq!(d.stats().voided, 2, "the one sent after the probe stays");
        assert_eq!(d.open_requests(), 2);
    }

    #[test]
    fn manual_mode_dedupes_only_what_this_source_handed_out() {
        let t = Instant::now();
        let mut d = Demand::new(cfg(0, 100_000, 64, AckMode::Manual), t);
        d.on_start(t);
        pulls(&mut d);
        d.on_message(msg(1, 1, 1, 100), t);
        d.on_message(msg(2, 2, 1, 100), t);
        assert_eq!(d.take(t).map(|x| x.0), Some(1));
        assert_eq!(d.take(t).map(|x| x.0), Some(2));
        d.on_acked(2);
        // 1 is held un-acked by the application: dropped WITHOUT an ack.
        d.on_message(msg(1, 3, 2, 100), t);
        assert!(!d.has_ready());
        assert!(!std::iter::from_fn(|| d.poll_command()).any(|c| matches!(c, Command::Ack(_))));
        // 2 was acked: its ack was lost, ack it again and drop it.
        d.on_message(msg(2, 4, 2, 100), t);
        assert!(std::iter::from_fn(|| d.poll_command()).any(|c| matches!(c, Command::Ack(2))));
        // 0 was never handed out here (a previous instance's): delivered.
        d.on_message(msg(7, 5, 3, 100), t);
        assert_eq!(d.take(t).map(|x| x.0), Some(7));
        // The application let go of 1 without acking: the next one is delivered.
        d.on_released(1);
        d.on_message(msg(1, 6, 3, 100), t);
        assert_eq!(d.take(t).map(|x| (x.0, x.2)), Some((1, false)));
        assert_eq!(d.stats().duplicates, 2);
    }

    #[test]
    fn a_redelivery_from_far_behind_is_still_recognised_as_settled() {
        // A consumer leader that failed over can redeliver from an ack floor
        // far behind what this source has delivered and acked: a window of
        // the last few thousand sequences would deliver those again.
        let t = Instant::now();
        let mut d = Demand::new(cfg(0, 100_000, 64, AckMode::OnReceive), t);
        d.on_start(t);
        let n = 3 * SETTLED_RANGES as u64;
        for seq in 1..=n {
            d.on_message(msg(seq, seq, 1, 100), t);
            assert_eq!(d.take(t).map(|x| x.0), Some(seq));
        }
        assert_eq!(d.settled.len(), 1, "one range for a stream read in order");
        d.on_message(msg(3, n + 1, 2, 100), t);
        assert!(!d.has_ready(), "seq 3 was delivered and acked here");
        assert!(std::iter::from_fn(|| d.poll_command()).any(|c| matches!(c, Command::Ack(3))));
        assert_eq!(d.stats().duplicates, 1);
    }

    #[test]
    fn settled_ranges_merge_and_the_lowest_are_forgotten_first() {
        let t = Instant::now();
        let mut d: Demand<u64> = Demand::new(cfg(0, 100_000, 64, AckMode::OnReceive), t);
        // Every other sequence: no two adjacent, one range each.
        let last = 2 * (SETTLED_RANGES as u64 + 10) - 1;
        for seq in (1..=last).step_by(2) {
            d.settle(seq);
        }
        assert_eq!(d.settled.len(), SETTLED_RANGES);
        assert!(!d.is_settled(1), "the lowest ranges go first");
        assert!(d.is_settled(last) && !d.is_settled(last - 1));
        // Filling a hole joins the ranges on both sides.
        d.settle(last - 1);
        assert_eq!(d.settled.len(), SETTLED_RANGES - 1);
        assert!(d.is_settled(last - 2) && d.is_settled(last - 1) && d.is_settled(last));
        assert_eq!(
            d.settled.range(..=last).next_back(),
            Some((&(last - 2), &last))
        );
    }

    #[test]
    fn on_receive_acks_and_drops_a_redelivery_of_what_it_delivered() {
        let t = Instant::now();
        let mut d = Demand::new(cfg(0, 100_000, 64, AckMode::OnReceive), t);
        d.on_start(t);
        pulls(&mut d);
        d.on_message(msg(5, 1, 1, 100), t);
        assert_eq!(d.take(t), Some((5, 5, true)));
        d.on_message(msg(5, 2, 2, 100), t);
        assert!(!d.has_ready());
        assert!(std::iter::from_fn(|| d.poll_command()).any(|c| matches!(c, Command::Ack(5))));
        // A redelivery of something never handed out here is delivered.
        d.on_message(msg(3, 3, 2, 100), t);
        assert_eq!(d.take(t), Some((3, 3, true)));
    }

    #[test]
    fn after_a_gap_order_waits_for_redeliveries_not_for_contiguous_stream_sequences() {
        let t = Instant::now();
        let mut d = Demand::new(cfg(0, 100_000, 64, AckMode::OnReceive), t);
        d.on_start(t);
        pulls(&mut d);
        // Stream sequences 10, 20, 30, ... (a filtered consumer); deliveries
        // 2 and 3 (stream 20 and 30) are lost.
        d.on_message(msg(10, 1, 1, 100), t);
        d.on_message(msg(40, 4, 1, 100), t);
        d.on_message(msg(50, 5, 1, 100), t);
        assert_eq!(d.take(t).map(|x| x.0), Some(10));
        assert!(
            !d.has_ready(),
            "40 and 50 wait for the two missed deliveries"
        );
        d.on_message(msg(30, 6, 2, 100), t);
        assert!(!d.has_ready());
        d.on_message(msg(20, 7, 2, 100), t);
        let order: Vec<u64> = std::iter::from_fn(|| d.take(t).map(|x| x.0)).collect();
        assert_eq!(order, [20, 30, 40, 50]);
        // No gap: nothing is held, whatever the stream sequences.
        d.on_message(msg(90, 8, 1, 100), t);
        assert_eq!(d.take(t).map(|x| x.0), Some(90));
        assert_eq!(d.stats().hold_expired, 0);
    }

    #[test]
    fn held_messages_dropped_for_room_come_back_in_order() {
        // high 1000, chunk 500: a lost delivery, then the buffer fills with
        // held messages; the newest are dropped (at most once a heartbeat)
        // to let a pull through, and everything is released in stream order.
        let t = Instant::now();
        let mut d = Demand::new(cfg(0, 1000, 8, AckMode::OnReceive), t);
        d.on_start(t);
        assert_eq!(pulls(&mut d), [(8, 500), (8, 500)]);
        d.on_message(msg(1, 1, 1, 150), t);
        assert_eq!(d.take(t).map(|x| x.0), Some(1));
        // Delivery 2 (stream 2) is lost; 3..=6 arrive and are held.
        for seq in 3..=6 {
            d.on_message(msg(seq, seq, 1, 150), t);
        }
        // Round robin: request 0 sent 1, 3, 5 and request 1 sent 2, 4, 6.
        d.on_status(&end(0, 409, "Message Size Exceeds MaxBytes", 5, 50), t);
        d.on_status(&end(1, 409, "Message Size Exceeds MaxBytes", 5, 50), t);
        assert!(!d.has_ready());
        // The lost delivery still counts (150) until its request's deadline:
        // 600 held + 150 + a 500 chunk > 1000, so 6 and 5 are dropped.
        assert_eq!(pulls(&mut d), [(8, 500)]);
        assert_eq!(d.stats().evicted, 2);
        assert!(d.size_buffered() + d.outstanding() <= 1000);
        // Not again within a heartbeat.
        d.on_timer(t + Duration::from_millis(100));
        assert!(pulls(&mut d).is_empty());
        // The lost one and the dropped ones come back, in any order.
        d.on_message(msg(6, 7, 2, 150), t);
        d.on_message(msg(2, 8, 2, 150), t);
        let order: Vec<u64> = std::iter::from_fn(|| d.take(t).map(|x| x.0)).collect();
        assert_eq!(order, [2, 3, 4], "5 was dropped for room: 6 waits for it");
        d.on_message(msg(5, 9, 2, 150), t);
        let order: Vec<u64> = std::iter::from_fn(|| d.take(t).map(|x| x.0)).collect();
        assert_eq!(order, [5, 6]);
        // The hold-back is over: a new delivery goes straight through.
        d.on_message(msg(7, 10, 1, 50), t);
        assert_eq!(d.take(t).map(|x| x.0), Some(7));
    }

    fn fetches(d: &mut Demand<u64>) -> Vec<(u64, bool)> {
        std::iter::from_fn(|| d.poll_command())
            .filter_map(|c| match c {
                Command::Fetch { from, exact } => Some((from, exact)),
                _ => None,
            })
            .collect()
    }

    fn found(seq: u64, size: usize) -> Fetched<u64> {
        Fetched::Found {
            item: seq,
            seq,
            size,
            weight: size / 2,
        }
    }

    #[test]
    fn a_gap_is_filled_from_the_stream_without_waiting_for_redeliveries() {
        let t = Instant::now();
        let mut c = cfg(0, 100_000, 64, AckMode::OnReceive);
        c.fill = true;
        let mut d = Demand::new(c, t);
        d.on_start(t);
        pulls(&mut d);
        // Stream 10, 20, 30, 40, 50 (a filtered consumer); deliveries 2 and
        // 3 (stream 20 and 30) are lost.
        d.on_message(msg(10, 1, 1, 100), t);
        assert_eq!(d.take(t).map(|x| x.0), Some(10));
        d.on_message(msg(40, 4, 1, 100), t);
        d.on_message(msg(50, 5, 1, 100), t);
        assert!(!d.has_ready());
        d.on_status(&end(0, 408, "Request Timeout", 61, 49_700), t);
        d.on_status(&end(1, 408, "Request Timeout", 64, 50_000), t);
        // One read at a time, from just after what was handed out.
        assert_eq!(fetches(&mut d), [(11, false)]);
        d.on_fetched(found(20, 100), t);
        assert_eq!(fetches(&mut d), [(21, false)]);
        d.on_fetched(found(30, 100), t);
        assert_eq!(fetches(&mut d), [(31, false)]);
        // The next one is the first delivery after the gap: the gap is filled.
        d.on_fetched(found(40, 100), t);
        assert!(fetches(&mut d).is_empty());
        let order: Vec<u64> = std::iter::from_fn(|| d.take(t).map(|x| x.0)).collect();
        assert_eq!(order, [20, 30, 40, 50]);
        assert_eq!((d.stats().filled, d.stats().hold_expired), (2, 0));
        // The redeliveries come after ack_wait: acked (they settle the two
        // read from the stream) and dropped.
        d.on_message(msg(20, 6, 2, 100), t);
        d.on_message(msg(30, 7, 2, 100), t);
        assert!(!d.has_ready());
        let acks: Vec<u64> = std::iter::from_fn(|| d.poll_command())
            .filter_map(|c| match c {
                Command::Ack(seq) => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(acks, [20, 30]);
        // Back to normal: no hold-back, no reads.
        d.on_message(msg(60, 8, 1, 100), t);
        assert_eq!(d.take(t).map(|x| x.0), Some(60));
        assert!(fetches(&mut d).is_empty());
    }

    #[test]
    fn filling_a_gap_makes_room_by_dropping_the_newest_held_and_reads_them_again() {
        // high 1000: 1 handed out, 2 lost, 3..=7 held (5 x 190 = 950).
        let t = Instant::now();
        let mut c = cfg(0, 1000, 8, AckMode::Manual);
        c.fill = true;
        let mut d = Demand::new(c, t);
        d.on_start(t);
        pulls(&mut d);
        d.on_message(msg(1, 1, 1, 190), t);
        assert_eq!(d.take(t).map(|x| x.0), Some(1));
        for seq in 3..=7 {
            d.on_message(msg(seq, seq, 1, 190), t);
        }
        d.on_status(&end(0, 409, "Message Size Exceeds MaxBytes", 4, 50), t);
        d.on_status(&end(1, 409, "Message Size Exceeds MaxBytes", 5, 240), t);
        assert_eq!(d.outstanding(), 0);
        // 950 held < 1000: room for one read.
        assert_eq!(fetches(&mut d), [(2, false)]);
        d.on_fetched(found(2, 190), t);
        assert!(d.size_buffered() <= 1000 + 190);
        // 2 and 3 are ready; the rest wait for the scan to end at 3.
        let got: Vec<u64> = std::iter::from_fn(|| d.take(t).map(|x| x.0)).collect();
        assert_eq!(got, [2, 3, 4, 5, 6, 7]);
        assert_eq!(d.stats().evicted, 0);

        // Again, with no room: a new source on a consumer that delivered up
        // to 8 (stream 8); 9 lost, 10..=13 held (1000 = high).
        let mut c = cfg(0, 1000, 8, AckMode::Manual);
        c.fill = true;
        let mut d = Demand::new(c, t);
        d.set_last_delivered(8, 8);
        d.on_start(t);
        assert_eq!(pulls(&mut d), [(8, 500), (8, 500)]);
        for seq in 10..=13 {
            d.on_message(msg(seq, seq, 1, 250), t);
        }
        assert!(fetches(&mut d).is_empty(), "no room");
        d.on_status(&end(0, 409, "Message Size Exceeds MaxBytes", 6, 0), t);
        d.on_status(&end(1, 409, "Message Size Exceeds MaxBytes", 6, 0), t);
        // No request delivers any more: 13 is dropped to make room for the
        // read of 9.
        assert_eq!(fetches(&mut d), [(9, false)]);
        assert_eq!(d.stats().evicted, 1);
        assert!(d.size_buffered() + d.outstanding() < 1000);
        d.on_fetched(found(9, 250), t);
        assert!(d.size_buffered() <= 1000 + 250);
        let got: Vec<u64> = std::iter::from_fn(|| d.take(t).map(|x| x.0)).collect();
        assert_eq!(got, [9, 10, 11, 12], "13 was dropped: it is read again");
        assert_eq!(fetches(&mut d), [(13, true)]);
        assert!(pulls(&mut d).is_empty(), "no pull before 13 is back");
        d.on_fetched(found(13, 250), t);
        let got: Vec<u64> = std::iter::from_fn(|| d.take(t).map(|x| x.0)).collect();
        assert_eq!(got, [13]);
        assert_eq!(d.stats().filled, 2);
        // Pulling again; the server's redelivery of 13 is dropped without an
        // ack while the application holds it (Manual), acked once it acked.
        assert!(!pulls(&mut d).is_empty());
        d.on_message(msg(13, 20, 2, 250), t);
        assert!(!d.has_ready());
        assert!(!std::iter::from_fn(|| d.poll_command()).any(|c| matches!(c, Command::Ack(_))));
        d.on_acked(13);
        d.on_message(msg(13, 21, 3, 250), t);
        assert!(std::iter::from_fn(|| d.poll_command()).any(|c| matches!(c, Command::Ack(13))));
    }

    #[test]
    fn a_refused_or_failed_read_falls_back_to_redeliveries() {
        let t = Instant::now();
        let mut c = cfg(0, 100_000, 64, AckMode::OnReceive);
        c.fill = true;
        let mut d = Demand::new(c, t);
        d.on_start(t);
        pulls(&mut d);
        d.on_message(msg(1, 1, 1, 100), t);
        d.on_message(msg(3, 3, 1, 100), t);
        d.on_status(&end(0, 408, "Request Timeout", 62, 49_800), t);
        d.on_status(&end(1, 408, "Request Timeout", 64, 50_000), t);
        assert_eq!(fetches(&mut d), [(2, false)]);
        // A failed read is retried a heartbeat later.
        d.on_fetched(Fetched::Failed, t);
        assert!(fetches(&mut d).is_empty());
        d.on_timer(t + Duration::from_millis(500));
        assert_eq!(fetches(&mut d), [(2, false)]);
        // Refused: no more reads; the redelivery fills the gap.
        d.on_fetched(Fetched::Refused, t);
        d.on_message(msg(4, 4, 1, 100), t);
        assert!(fetches(&mut d).is_empty());
        assert_eq!(d.take(t).map(|x| x.0), Some(1));
        assert!(!d.has_ready());
        d.on_message(msg(2, 5, 2, 100), t);
        let order: Vec<u64> = std::iter::from_fn(|| d.take(t).map(|x| x.0)).collect();
        assert_eq!(order, [2, 3, 4]);
        assert_eq!(d.stats().fetch_failures, 2);
        // A new gap waits for its redelivery too.
        d.on_message(msg(9, 7, 1, 100), t);
        assert!(fetches(&mut d).is_empty());
        assert!(!d.has_ready());
    }

    #[test]
    fn waiting_for_redeliveries_pulls_once_they_are_due() {
        // Without reading the stream: 1 handed out, 2 lost, 3..=6 held and
        // every request over. With ack_wait 2 s the pull that makes room for
        // the redelivery waits until it is due; without, it goes at once.
        for (ack_wait, first_pull_at) in [(Some(2000), 2000), (None, 0)] {
            let t = Instant::now();
            let mut c = cfg(0, 1000, 8, AckMode::OnReceive);
            c.redelivery = ack_wait.map(Duration::from_millis);
            let mut d = Demand::new(c, t);
            d.on_start(t);
            assert_eq!(pulls(&mut d).len(), 2);
            d.on_message(msg(1, 1, 1, 150), t);
            assert_eq!(d.take(t).map(|x| x.0), Some(1));
            for seq in 3..=6 {
                d.on_message(msg(seq, seq, 1, 150), t);
            }
            d.on_status(&end(0, 409, "Message Size Exceeds MaxBytes", 5, 50), t);
            d.on_status(&end(1, 409, "Message Size Exceeds MaxBytes", 5, 50), t);
            let mut at = 0;
            while pulls(&mut d).is_empty() {
                at += 100;
                assert!(at <= 5000, "no pull within 5 s");
                d.on_timer(t + Duration::from_millis(at));
            }
            assert!(
                at >= first_pull_at && at <= first_pull_at + 100,
                "first pull at {at} ms, due at {first_pull_at} ms"
            );
            // The redelivery fills the gap.
            d.on_message(msg(2, 7, 2, 150), t + Duration::from_millis(at));
            let got: Vec<u64> = std::iter::from_fn(|| d.take(t).map(|x| x.0)).collect();
            assert_eq!(got.first(), Some(&2));
        }
    }

    #[test]
    fn an_oversized_message_is_asked_for_alone() {
        let t = Instant::now();
        let mut d = Demand::new(cfg(0, 1000, 8, AckMode::OnReceive), t);
        d.on_start(t);
        assert_eq!(pulls(&mut d), [(8, 500), (8, 500)]);
        d.on_status(&end(0, 409, "Message Size Exceeds MaxBytes", 8, 500), t);
        assert!(pulls(&mut d).is_empty());
        d.on_status(&end(1, 408, "Request Timeout", 8, 500), t);
        assert_eq!(pulls(&mut d), [(1, 0)]);
        d.on_message(msg(1, 1, 1, 5000), t);
        assert!(d.take(t).is_some());
        assert_eq!(pulls(&mut d), [(8, 500), (8, 500)]);
    }

    #[test]
    fn parses_ack_subjects() {
        assert_eq!(
            parse_ack("$JS.ACK.S.C.1.42.7.1700000000.3"),
            Some((1, 42, 7))
        );
        assert_eq!(
            parse_ack("$JS.ACK.dom.acc.S.C.2.43.8.1700000000.3"),
            Some((2, 43, 8))
        );
        assert_eq!(
            parse_ack("$JS.ACK.dom.acc.S.C.2.43.8.1700000000.3.tok"),
            Some((2, 43, 8))
        );
        for bad in [
            "_INBOX.x",
            "$JS.ACK",
            "$JS.ACK.S.C.1.42.7.1700000000",
            "$JS.ACK.S.C.1.-42.7.1700000000.3",
            "$JS.ACK.S.C.1.+42.7.1700000000.3",
            "$JS.ACK.S.C.1.42.7.1700000000.3.x.y.z.w",
            "$JS.ACK.S.C.1.99999999999999999999.7.1.3",
            "$JS.ACK.S..1.42.7.1700000000.3",
        ] {
            assert_eq!(parse_ack(bad), None, "{bad}");
        }
        assert_eq!(parse_count(" 12 "), Some(12));
        assert_eq!(parse_count(""), None);
        assert_eq!(parse_count("1e3"), None);
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9_-]{1,12}",
            any::<u64>().prop_map(|n| n.to_string()),
            ".*",
            Just(String::new()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

        /// Whatever a peer puts in a reply subject: no panic, `None` unless
        /// it is an ack subject.
        #[test]
        fn parse_ack_never_panics(s in ".*", toks in proptest::collection::vec(token(), 0..14)) {
            let joined = toks.join(".");
            for subject in [s.clone(), format!("$JS.ACK.{s}"), format!("$JS.ACK.{joined}"), joined] {
                if let Some((d, sseq, cseq)) = parse_ack(&subject) {
                    prop_assert!(subject.starts_with("$JS.ACK."));
                    let t: Vec<&str> = subject.split('.').collect();
                    prop_assert!(matches!(t.len(), 9 | 11 | 12));
                    let base = if t.len() == 9 { 4 } else { 6 };
                    prop_assert_eq!(t[base].trim().parse::<u64>().ok(), Some(d));
                    prop_assert_eq!(t[base + 1].trim().parse::<u64>().ok(), Some(sseq));
                    prop_assert_eq!(t[base + 2].trim().parse::<u64>().ok(), Some(cseq));
                }
            }
        }

        /// Valid ack subjects of every form give exactly their numbers.
        #[test]
        fn parse_ack_reads_valid_subjects(
            stream in "[A-Za-z0-9_-]{1,16}", consumer in "[A-Za-z0-9_-]{1,16}",
            domain in "[A-Za-z0-9_]{1,8}", acc in "[A-Z0-9]{1,12}",
            d in any::<u64>(), sseq in any::<u64>(), cseq in any::<u64>(),
            ts in any::<u64>(), pending in any::<u64>(), form in 0..3u8,
        ) {
            let subject = match form {
                0 => format!("$JS.ACK.{stream}.{consumer}.{d}.{sseq}.{cseq}.{ts}.{pending}"),
                1 => format!("$JS.ACK.{domain}.{acc}.{stream}.{consumer}.{d}.{sseq}.{cseq}.{ts}.{pending}"),
                _ => format!("$JS.ACK.{domain}.{acc}.{stream}.{consumer}.{d}.{sseq}.{cseq}.{ts}.{pending}.{acc}"),
            };
            prop_assert_eq!(parse_ack(&subject), Some((d, sseq, cseq)));
        }

        /// `Nats-Pending-*` values and status descriptions from a peer: no
        /// panic, exact for decimal counts, `None` for anything else.
        #[test]
        fn pending_counts_parse_exactly_or_not_at_all(v in ".*", n in any::<u64>(), desc in ".*", code in any::<u16>()) {
            let parsed = parse_count(&v);
            let t = v.trim();
            if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                prop_assert_eq!(parsed, t.parse::<u64>().ok());
            } else {
                prop_assert_eq!(parsed, None);
            }
            prop_assert_eq!(parse_count(&n.to_string()), Some(n));
            // Any status with any description and counts: handled, no panic.
            let now = Instant::now();
            let mut d = Demand::<u64>::new(cfg(0, 1000, 4, AckMode::OnReceive), now);
            d.on_start(now);
            d.on_status(&Status { code, description: desc, pending: parsed.map(|p| (p, n)), request: Some(n % 3) }, now);
            prop_assert!(d.size_buffered() + d.outstanding() <= 1000);
        }
    }

    // ---- a model server that obeys or bends the rules ----

    #[derive(Debug, Clone)]
    enum Op {
        /// The consumer leader serves the `n`-th live request.
        Serve(usize),
        /// A request ends on the server (expired, interest gone).
        Expire(usize),
        /// A request ends with a status that says nothing (leadership change).
        Vanish(usize),
        /// The next thing on the wire arrives.
        Arrive,
        /// Any in-flight thing arrives first (statuses overtake deliveries).
        ArriveAny(usize),
        /// A delivery or status is lost in transit.
        Lose(usize),
        /// The server redelivers a delivered message (ack_wait, lost ack).
        Redeliver(usize),
        /// The application takes a message.
        Take,
        /// The application acks (Manual) or releases one it holds.
        Settle(usize, bool),
        /// Time passes.
        Tick(u64),
        Reconnect,
        /// The leader answers a pending probe.
        Answer,
        /// The stream leader answers the read in flight (`true`: it fails).
        Fetch(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<usize>().prop_map(Op::Serve),
            1 => any::<usize>().prop_map(Op::Expire),
            1 => any::<usize>().prop_map(Op::Vanish),
            6 => Just(Op::Arrive),
            2 => any::<usize>().prop_map(Op::ArriveAny),
            1 => any::<usize>().prop_map(Op::Lose),
            1 => any::<usize>().prop_map(Op::Redeliver),
            5 => Just(Op::Take),
            2 => (any::<usize>(), any::<bool>()).prop_map(|(i, a)| Op::Settle(i, a)),
            2 => (0..3000u64).prop_map(Op::Tick),
            1 => Just(Op::Reconnect),
            1 => Just(Op::Answer),
            3 => prop::bool::weighted(0.1).prop_map(Op::Fetch),
        ]
    }

    #[derive(Debug)]
    enum Wire {
        Msg {
            req: usize,
            seq: u64,
            size: usize,
            cseq: u64,
            dc: u64,
        },
        Status {
            status: Status,
        },
    }

    #[derive(Debug)]
    struct MReq {
        batch: usize,
        /// `None`: no byte limit.
        bytes: Option<usize>,
        live: bool,
        /// The server ends it by then (its `expires`).
        expires: Instant,
    }

    struct Model {
        now: Instant,
        sizes: Vec<usize>,
        next_first: usize,
        redeliver: VecDeque<u64>,
        reqs: Vec<MReq>,
        wire: VecDeque<Wire>,
        cseq: u64,
        dc: HashMap<u64, u64>,
        probes: VecDeque<u64>,
        max_size: usize,
        /// Seqs the application holds (Manual) / has.
        app_holds: Vec<u64>,
        app_got: HashMap<u64, u32>,
        app_acked: HashSet<u64>,
        batch_completed_status: bool,
        expires: Duration,
        /// The read of the stream in flight: `(from, exact)`.
        fetch: Option<(u64, bool)>,
    }

    fn seq_of(i: usize) -> u64 {
        // Non-contiguous stream sequences: a filtered consumer with deletions.
        1 + 3 * i as u64
    }

    impl Model {
        fn size_of(&self, seq: u64) -> usize {
            self.sizes[((seq - 1) / 3) as usize]
        }

        /// What the stream answers to a read (every message is in it
        /// from the start).
        fn read(&self, from: u64, exact: bool) -> Option<u64> {
            let last = seq_of(self.sizes.len() - 1);
            let seq = if exact {
                (from % 3 == 1).then_some(from)?
            } else {
                (from.max(1)..).find(|s| s % 3 == 1)?
            };
            (seq <= last).then_some(seq)
        }

        /// Bytes the source may still receive, as the server counts them.
        fn future(&self) -> usize {
            let wire: usize = self
                .wire
                .iter()
                .map(|w| match w {
                    Wire::Msg { size, .. } => *size,
                    Wire::Status { .. } => 0,
                })
                .sum();
            let live: usize = self
                .reqs
                .iter()
                .filter(|r| r.live)
                .map(|r| r.bytes.unwrap_or(self.max_size))
                .sum();
            let read = self
                .fetch
                .and_then(|(from, exact)| self.read(from, exact))
                .map_or(0, |seq| self.size_of(seq));
            wire + live + read
        }

        fn end(&mut self, i: usize, status: Option<(u16, &str)>) {
            let r = &mut self.reqs[i];
            if !r.live {
                return;
            }
            r.live = false;
            if let Some((code, desc)) = status {
                let pending = (r.batch as u64, r.bytes.unwrap_or(0) as u64);
                self.wire.push_back(Wire::Status {
                    status: Status {
                        code,
                        description: desc.into(),
                        pending: Some(pending),
                        request: Some(i as u64),
                    },
                });
            }
        }

        fn serve(&mut self, n: usize) {
            let live: Vec<usize> = (0..self.reqs.len())
                .filter(|&i| self.reqs[i].live)
                .collect();
            if live.is_empty() {
                return;
            }
            let i = live[n % live.len()];
            let seq = if let Some(s) = self.redeliver.pop_front() {
                s
            } else if self.next_first < self.sizes.len() {
                self.next_first += 1;
                seq_of(self.next_first - 1)
            } else {
                return;
            };
            let size = self.size_of(seq);
            let r = &mut self.reqs[i];
            if let Some(b) = r.bytes
                && size > b
            {
                self.redeliver.push_front(seq);
                self.end(i, Some((409, "Message Size Exceeds MaxBytes")));
                return;
            }
            r.batch -= 1;
            if let Some(b) = &mut r.bytes {
                *b -= size;
            }
            self.cseq += 1;
            let dc = self.dc.entry(seq).or_insert(0);
            *dc += 1;
            self.wire.push_back(Wire::Msg {
                req: i,
                seq,
                size,
                cseq: self.cseq,
                dc: *dc,
            });
            let r = &mut self.reqs[i];
            if r.batch == 0 {
                r.live = false;
                if self.batch_completed_status && r.bytes.is_some_and(|b| b > 0) {
                    let pending = (0, r.bytes.unwrap_or(0) as u64);
                    self.wire.push_back(Wire::Status {
                        status: Status {
                            code: 409,
                            description: "Batch Completed".into(),
                            pending: Some(pending),
                            request: Some(i as u64),
                        },
                    });
                }
            } else if r.bytes == Some(0) {
                // The server sets batch to 1 at zero bytes: it is over.
                r.live = false;
            }
        }
    }

    fn check(d: &Demand<u64>, m: &Model, high: usize) -> Result<(), TestCaseError> {
        let bound = high + m.max_size;
        prop_assert!(
            d.size_buffered() + m.future() <= bound,
            "buffered {} + may still arrive {} > high {} + one message {}",
            d.size_buffered(),
            m.future(),
            high,
            m.max_size
        );
        let bounded_future: usize = m
            .wire
            .iter()
            .map(|w| match w {
                Wire::Msg { size, .. } => *size,
                _ => 0,
            })
            .sum::<usize>()
            + m.reqs
                .iter()
                .filter(|r| r.live)
                .filter_map(|r| r.bytes)
                .sum::<usize>();
        if !d.unbounded_open() && !m.reqs.iter().any(|r| r.bytes.is_none() && r.live) {
            prop_assert!(
                d.outstanding() + m.max_size >= bounded_future,
                "outstanding {} under what may arrive {}",
                d.outstanding(),
                bounded_future
            );
        }
        Ok(())
    }

    fn run(d: &mut Demand<u64>, m: &mut Model, manual: bool) -> Result<(), TestCaseError> {
        while let Some(c) = d.poll_command() {
            match c {
                Command::Pull {
                    id,
                    batch,
                    max_bytes,
                    ..
                } => {
                    prop_assert_eq!(id as usize, m.reqs.len());
                    m.reqs.push(MReq {
                        batch,
                        bytes: (max_bytes > 0).then_some(max_bytes),
                        live: true,
                        expires: m.now + m.expires,
                    })
                }
                Command::Ack(seq) => {
                    prop_assert!(
                        m.app_got.contains_key(&seq),
                        "acked {seq}, never handed out"
                    );
                    prop_assert!(
                        !manual || m.app_acked.contains(&seq),
                        "acked {seq} for the application"
                    );
                }
                Command::Probe { upto } => m.probes.push_back(upto),
                Command::Fetch { from, exact } => {
                    prop_assert!(m.fetch.is_none(), "two reads of the stream at once");
                    m.fetch = Some((from, exact));
                }
            }
        }
        Ok(())
    }

    /// Applies `op` if it is the server's or the network's doing (the same
    /// in every property below); false for the application's own ops.
    fn server_op(
        d: &mut Demand<u64>,
        m: &mut Model,
        op: &Op,
        manual: bool,
        high: usize,
    ) -> Result<bool, TestCaseError> {
        match *op {
            Op::Serve(n) => m.serve(n),
            Op::Expire(n) => {
                if !m.reqs.is_empty() {
                    let i = n % m.reqs.len();
                    m.end(i, Some((408, "Request Timeout")));
                }
            }
            Op::Arrive => {
                if let Some(w) = m.wire.pop_front() {
                    arrive(d, m, w);
                }
            }
            Op::Lose(j) => {
                if !m.wire.is_empty() {
                    let j = j % m.wire.len();
                    if let Some(Wire::Msg { seq, .. }) = m.wire.remove(j) {
                        m.redeliver.push_back(seq);
                    }
                }
            }
            Op::Tick(ms) => {
                let to = m.now + Duration::from_millis(ms);
                // The server ends what expires before then, and what
                // it sent arrives before the deadline (plus margin).
                for i in 0..m.reqs.len() {
                    if m.reqs[i].expires <= to {
                        m.end(i, Some((408, "Request Timeout")));
                    }
                }
                if m.reqs.iter().any(|r| r.expires + STRAGGLER_MARGIN <= to) {
                    while let Some(w) = m.wire.pop_front() {
                        arrive(d, m, w);
                        run(d, m, manual)?;
                        check(d, m, high)?;
                    }
                }
                m.now = to;
                d.on_timer(m.now);
            }
            Op::Reconnect => {
                for r in &mut m.reqs {
                    if r.live {
                        r.expires = r.expires.max(m.now + m.expires);
                    }
                }
                d.on_reconnected(m.now);
            }
            Op::Fetch(fail) => {
                if let Some((from, exact)) = m.fetch.take() {
                    let f = if fail {
                        Fetched::Failed
                    } else {
                        match m.read(from, exact) {
                            Some(seq) => Fetched::Found {
                                item: seq,
                                seq,
                                size: m.size_of(seq),
                                weight: m.size_of(seq),
                            },
                            None => Fetched::NotFound,
                        }
                    };
                    d.on_fetched(f, m.now);
                }
            }
            Op::Answer => {
                if let Some(upto) = m.probes.pop_front() {
                    // Truthful: requests before the probe that may still deliver.
                    let waiting = (0..m.reqs.len().min(upto as usize))
                        .filter(|&i| {
                            m.reqs[i].live
                                || m.wire
                                    .iter()
                                    .any(|w| matches!(w, Wire::Msg { req, .. } if *req == i))
                        })
                        .count();
                    d.on_probe(upto, Some(waiting), m.now);
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn arrive(d: &mut Demand<u64>, m: &mut Model, w: Wire) {
        match w {
            Wire::Msg {
                seq,
                size,
                cseq,
                dc,
                ..
            } => d.on_message(
                Delivery {
                    item: seq,
                    stream_seq: seq,
                    consumer_seq: cseq,
                    delivered: dc,
                    size,
                    weight: size,
                },
                m.now,
            ),
            Wire::Status { status, .. } => d.on_status(&status, m.now),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

        /// Arbitrary event orders from a server that obeys each request's
        /// `batch`, `max_bytes` and `expires` but reorders, loses, ends
        /// requests silently, redelivers: the bytes buffered plus those that
        /// may still arrive stay within `high + one message`; nothing is
        /// acked the application did not receive (or, in Manual mode, did
        /// not ack); no message is handed out twice while held.
        #[test]
        fn demand_keeps_its_bound_whatever_the_server_does(
            high in 500..20_000usize,
            low_frac in 0.0..=1.0f64,
            batch in 1..16usize,
            sizes in proptest::collection::vec(1..3000usize, 1..80),
            manual in any::<bool>(),
            batch_completed_status in any::<bool>(),
            fill in any::<bool>(),
            ack_wait in proptest::option::of(100..2000u64),
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let t0 = Instant::now();
            let low = (high as f64 * low_frac) as usize;
            let mode = if manual { AckMode::Manual } else { AckMode::OnReceive };
            let mut c = cfg(low, high, batch, mode);
            c.hold_timeout = Duration::from_secs(2);
            c.fill = fill;
            c.redelivery = ack_wait.map(Duration::from_millis);
            let mut d = Demand::new(c, t0);
            let max_size = sizes.iter().copied().max().unwrap_or(0);
            let mut m = Model {
                now: t0, sizes, next_first: 0, redeliver: VecDeque::new(), reqs: Vec::new(),
                wire: VecDeque::new(), cseq: 0, dc: HashMap::new(), probes: VecDeque::new(), max_size,
                app_holds: Vec::new(), app_got: HashMap::new(), app_acked: HashSet::new(),
                batch_completed_status, expires: c.expires, fetch: None,
            };
            d.on_start(t0);
            run(&mut d, &mut m, manual)?;
            for op in ops {
                if !server_op(&mut d, &mut m, &op, manual, high)? {
                    match op {
                        Op::Vanish(n) if !m.reqs.is_empty() => {
                            let i = n % m.reqs.len();
                            if m.reqs[i].live {
                                m.reqs[i].live = false;
                                m.wire.push_back(Wire::Status { status: Status { code: 409, description: "Leadership Change".into(), pending: None, request: Some(i as u64) } });
                            }
                        }
                        Op::ArriveAny(j) if !m.wire.is_empty() => {
                            let j = j % m.wire.len();
                            if let Some(w) = m.wire.remove(j) {
                                arrive(&mut d, &mut m, w);
                            }
                        }
                        Op::Redeliver(j) if !m.dc.is_empty() => {
                            let mut seqs: Vec<u64> = m.dc.keys().copied().collect();
                            seqs.sort_unstable();
                            m.redeliver.push_back(seqs[j % seqs.len()]);
                        }
                        Op::Take => {
                            if let Some((seq, s, ack)) = d.take(m.now) {
                                prop_assert_eq!(seq, s);
                                prop_assert_eq!(ack, !manual);
                                prop_assert!(!m.app_holds.contains(&seq), "{} handed out twice while held", seq);
                                let n = m.app_got.entry(seq).or_insert(0);
                                *n += 1;
                                prop_assert!(*n == 1 || manual, "{} handed out twice", seq);
                                if manual {
                                    m.app_holds.push(seq);
                                } else {
                                    m.app_acked.insert(seq);
                                }
                            }
                        }
                        Op::Settle(i, ack) if !m.app_holds.is_empty() => {
                            let seq = m.app_holds.swap_remove(i % m.app_holds.len());
                            if ack {
                                m.app_acked.insert(seq);
                                d.on_acked(seq);
                            } else {
                                d.on_released(seq);
                            }
                        }
                        _ => {}
                    }
                }
                // Pulls only add to what may arrive: checking after them
                // covers the state before them too.
                run(&mut d, &mut m, manual)?;
                check(&d, &m, high)?;
            }
        }
    }

    fn ordered_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<usize>().prop_map(Op::Serve),
            1 => any::<usize>().prop_map(Op::Expire),
            8 => Just(Op::Arrive),
            1 => any::<usize>().prop_map(Op::Lose),
            5 => Just(Op::Take),
            2 => (0..3000u64).prop_map(Op::Tick),
            1 => Just(Op::Reconnect),
            1 => Just(Op::Answer),
            3 => prop::bool::weighted(0.1).prop_map(Op::Fetch),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

        /// A server that delivers in order but loses deliveries in transit
        /// (and redelivers them later, first): the application sees stream
        /// order, each message once, over non-contiguous stream sequences.
        #[test]
        fn lost_deliveries_never_reorder_what_is_handed_out(
            high in 500..20_000usize,
            low_frac in 0.0..=1.0f64,
            batch in 1..16usize,
            sizes in proptest::collection::vec(1..3000usize, 1..60),
            fill in any::<bool>(),
            ack_wait in proptest::option::of(100..2000u64),
            ops in proptest::collection::vec(ordered_op(), 1..120),
        ) {
            let t0 = Instant::now();
            let low = (high as f64 * low_frac) as usize;
            let mut c = cfg(low, high, batch, AckMode::OnReceive);
            c.fill = fill;
            c.redelivery = ack_wait.map(Duration::from_millis);
            let mut d = Demand::new(c, t0);
            let max_size = sizes.iter().copied().max().unwrap_or(0);
            let mut m = Model {
                now: t0, sizes, next_first: 0, redeliver: VecDeque::new(), reqs: Vec::new(),
                wire: VecDeque::new(), cseq: 0, dc: HashMap::new(), probes: VecDeque::new(), max_size,
                app_holds: Vec::new(), app_got: HashMap::new(), app_acked: HashSet::new(),
                batch_completed_status: true, expires: c.expires, fetch: None,
            };
            d.on_start(t0);
            run(&mut d, &mut m, false)?;
            let mut last = 0u64;
            for op in ops {
                if !server_op(&mut d, &mut m, &op, false, high)?
                    && matches!(op, Op::Take)
                    && let Some((seq, _, _)) = d.take(m.now)
                {
                    prop_assert!(seq > last, "{} handed out after {}", seq, last);
                    last = seq;
                    m.app_got.insert(seq, 1);
                    m.app_acked.insert(seq);
                }
                run(&mut d, &mut m, false)?;
                check(&d, &m, high)?;
            }
        }
    }
}
