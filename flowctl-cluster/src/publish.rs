//! The JetStream publish Sink: bounded un-acked publishes, in order, deduped.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use flowctl_core::gate::{Gate, GateHandle};
use flowctl_core::stage::{DropReason, Stage, StageCounter};
use flowctl_core::weighted::charge_of;
use flowctl_core::{FlowError, FlowStats, Overflow, SendError, Sink, Watermarks, Writability};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::ClusterError;
use crate::changed::Changed;
use crate::cluster::{Cluster, Shared};

/// How [`Cluster::publisher`] publishes.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Bytes accepted and not yet acknowledged by the stream: `ready` waits
    /// above `high` until the acks bring it to `low`.
    pub watermarks: Watermarks,
    /// Most publishes awaiting their ack at once.
    pub max_inflight: usize,
    /// How long one message may keep failing (leader elections, a lost node)
    /// before the sink fails with [`ClusterError::PublishFailed`].
    pub retry_for: Duration,
    /// First pause after a failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest pause between retries.
    pub max_backoff: Duration,
    /// How long to wait for one publish's ack before re-sending (a lost stream
    /// leader otherwise holds every publish for the whole request timeout).
    /// Short is safe: re-sent copies are deduplicated by the server.
    pub ack_timeout: Duration,
    /// Chain `Nats-Expected-Last-Sequence` so a retry can never reorder (the
    /// sink must then be the stream's only writer). The first message goes
    /// alone, unchecked; its ack gives the stream sequence the next ones
    /// chain on. Without it, several
    /// writers may share the stream, and a failure with more than one publish
    /// in flight may store later messages before the retried one (still no
    /// duplicates: `Nats-Msg-Id` stays).
    pub strict_order: bool,
    /// What a send does while more than `high` bytes await their acks:
    /// [`Overflow::Block`] (the default) waits in `ready`;
    /// [`Overflow::DropNewest`] drops the message (the send succeeds; it is
    /// counted in [`FlowStats::dropped`] and never published, so it takes no
    /// `Nats-Msg-Id`); [`Overflow::Fail`] gives it back in a
    /// [`SendError`] with [`FlowError::Overflow`] (the sink stays usable).
    /// [`Overflow::DropOldest`] is refused by [`Cluster::publisher`]: the
    /// bytes held are messages already sent to the stream, which cannot be
    /// taken back. A message is admitted when it fits under `high`, or when
    /// nothing awaits an ack.
    pub overflow: Overflow,
    /// The stage's name in spans and metrics; `None`:
    /// `nats.<stream>.<subject>.publish` (the stream that captures `subject`).
    pub name: Option<String>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            watermarks: Watermarks::default(),
            max_inflight: 256,
            retry_for: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(1),
            strict_order: true,
            overflow: Overflow::Block,
            name: None,
        }
    }
}

/// What became of the messages a [`Publisher`] accepted; see
/// [`Publisher::outcome`]. `accepted = acked + pending + not_stored + unknown`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishOutcome {
    /// Messages accepted by `start_send`.
    pub accepted: u64,
    /// Acknowledged by the stream: stored, once.
    pub acked: u64,
    /// Accepted and not settled yet: the publisher is still working on them
    /// (0 once it has failed).
    pub pending: u64,
    /// After a fatal error: certainly not stored (refused by the stream,
    /// chained in strict order behind one the stream refused, or never sent).
    pub not_stored: u64,
    /// After a fatal error: sent, but neither acknowledged nor refused when
    /// the publisher stopped, so the stream may or may not hold them.
    pub unknown: u64,
}

/// A fatal error, kept for every later call, and what it left unsettled.
#[derive(Debug)]
struct Fatal {
    error: ClusterError,
    not_stored: u64,
    unknown: u64,
}

#[derive(Debug)]
struct State {
    error: Mutex<Option<String>>,
    /// Times a stream leader's last sequence was behind our last ack.
    rechained: std::sync::atomic::AtomicU64,
    /// Set once by the publishing task, never taken: the error is sticky.
    fatal: Mutex<Option<Fatal>>,
    /// `flowctl_nats_rechained_total`: counts with `rechained`.
    rechained_metric: StageCounter,
    /// `flowctl_nats_publish_retries_total`: window re-sent after a transient failure.
    retries_metric: StageCounter,
}

impl State {
    fn new(stage: &Stage) -> Self {
        State {
            error: Mutex::new(None),
            fatal: Mutex::new(None),
            rechained: Default::default(),
            rechained_metric: stage.counter("flowctl_nats_rechained_total"),
            retries_metric: stage.counter("flowctl_nats_publish_retries_total"),
        }
    }
}

/// Publishes every item to one subject of a stream; see [`Cluster::publisher`].
///
/// # Order and dedupe
/// Each message gets a `Nats-Msg-Id` (`<publisher id>-<n>`) and, in strict
/// order, a `Nats-Expected-Last-Sequence`: the stream sequence its
/// predecessor has (the last ack's sequence plus its place in the window).
/// Until the first ack that sequence is unknown, so the first message is
/// sent alone and unchecked. After a failure the publisher re-sends the
/// failed message and everything after it, in order: copies that were
/// stored already are answered as duplicates by the server's dedupe (within
/// the stream's `duplicate_window`, 2 minutes by default; checked before the
/// sequence), and a successor whose predecessor was not stored is refused
/// by the stream leader before it is replicated, so the stream never holds
/// them out of order.
///
/// `Nats-Expected-Last-Msg-Id` would name the predecessor without knowing
/// its sequence, but a replicated stream checks it only when each replica
/// applies the message, and from nats-server 2.14 on a failed check there
/// stops the replica for good: a successor of a message lost in an election
/// would stop the whole stream. The sink must be the
/// only writer of the stream (another writer is reported as
/// [`ClusterError::ConcurrentPublisher`]) unless
/// [`PublishOptions::strict_order`] is off.
///
/// # Stage
/// Named `nats.<stream>.<subject>.publish` by default
/// ([`PublishOptions::name`]); its buffer is the bytes sent and not yet
/// acknowledged, against [`PublishOptions::watermarks`], with the overflow
/// policy [`PublishOptions::overflow`]. [`Sink::writability`] observes its
/// paused/resumed edges. Besides the core metrics it exports
/// `flowctl_nats_publish_retries_total` and `flowctl_nats_rechained_total`.
///
/// # Errors
/// [`ClusterError::ConcurrentPublisher`], [`ClusterError::PermissionDenied`],
/// [`ClusterError::MessageTooLarge`] (from the server) and
/// [`ClusterError::PublishFailed`] are fatal: the publisher stops, and every
/// later `ready`, `start_send`, `send`, `flush` and `close` returns the same
/// error at once (none of them waits for acks that can no longer come).
/// [`Publisher::outcome`] then tells what became of the accepted messages:
/// `acked` ones are stored; `not_stored` ones are not (refused, chained in
/// strict order behind one the stream refused, or never sent); `unknown` ones were sent
/// and neither acknowledged nor refused (after `PublishFailed`, or in flight
/// behind a refused one without strict order), so the stream may hold them.
/// An oversized payload refused by `start_send` itself is not fatal.
///
/// # Cancel safety
/// `ready`, `flush` and `close` may be dropped while they wait: nothing
/// accepted is lost, and a later `close` still waits for every ack and for
/// the publishing task to end.
#[derive(Debug)]
pub struct Publisher {
    gate: Gate,
    handle: GateHandle,
    tx: Option<mpsc::UnboundedSender<(String, Bytes)>>,
    id: String,
    sent: u64,
    state: Arc<State>,
    acked: watch::Receiver<u64>,
    /// Wakes a flush on each ack and when the task ends.
    acked_changed: Changed<u64>,
    task: Option<JoinHandle<()>>,
    /// What a `close` whose flush failed returns, kept across its polls.
    close_error: Option<FlowError>,
    max_payload: usize,
    overflow: Overflow,
    stage: Stage,
}

impl Cluster {
    /// A [`Sink`] of payloads published to `subject`, which a stream must capture.
    ///
    /// # Errors
    /// [`ClusterError::NoStreamForSubject`] if no stream captures `subject`;
    /// `FlowError::Config` for `max_inflight` 0 or [`Overflow::DropOldest`].
    pub async fn publisher(
        &self,
        subject: &str,
        opts: PublishOptions,
    ) -> Result<Publisher, FlowError> {
        if opts.max_inflight == 0 {
            return Err(FlowError::Config("max_inflight must be at least 1".into()));
        }
        if opts.overflow == Overflow::DropOldest {
            return Err(FlowError::Config(
                "publisher overflow drop_oldest is not supported: the oldest buffered \
                 messages were already sent to the stream and cannot be taken back; \
                 use drop_newest or fail"
                    .into(),
            ));
        }
        let shared = self.shared.clone();
        let stream = shared.js.stream_by_subject(subject).await.map_err(|e| {
            if e.to_string().contains("not found") {
                ClusterError::NoStreamForSubject {
                    subject: subject.to_owned(),
                }
            } else {
                ClusterError::nats("stream lookup", e)
            }
        })?;
        let stage = Stage::new(
            opts.name
                .clone()
                .unwrap_or_else(|| format!("nats.{stream}.{subject}.publish")),
        );
        let gate = Gate::new(opts.watermarks, tracing::debug_span!("publisher", subject));
        gate.set_stage(stage.clone());
        gate.set_overflow(opts.overflow);
        let overflow = opts.overflow;
        // The sender lives in the task: when the task ends for any reason,
        // a waiting flush wakes up instead of waiting for acks forever.
        let (acked_tx, acked_rx) = watch::channel(0u64);
        let state = Arc::new(State::new(&stage));
        let (tx, rx) = mpsc::unbounded_channel();
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(opts.ack_timeout)
            .build(shared.client.clone());
        let task = shared.ledger.spawn(
            "nats.publisher",
            run(
                js,
                shared.clone(),
                subject.to_owned(),
                opts,
                rx,
                gate.clone(),
                state.clone(),
                acked_tx,
            ),
        );
        Ok(Publisher {
            handle: gate.handle(),
            gate,
            tx: Some(tx),
            id: format!("{:016x}", fastrand::u64(..)),
            sent: 0,
            state,
            acked_changed: Changed::new(acked_rx.clone()),
            acked: acked_rx,
            task: Some(task),
            close_error: None,
            max_payload: shared.client.server_info().max_payload,
            overflow,
            stage,
        })
    }
}

impl Publisher {
    /// The prefix of this publisher's `Nats-Msg-Id`s.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The stage: its name and its metrics.
    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// Messages acknowledged by the stream.
    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// Times a stream leader refused a message in strict order with a last
    /// sequence *behind* this publisher's last acknowledged one (a new leader
    /// that has not applied everything yet), and the window was re-sent
    /// after a pause instead of failing with
    /// [`ClusterError::ConcurrentPublisher`] (kept from the time this counted
    /// a stale last msg id answered the same way).
    pub fn rechained(&self) -> u64 {
        self.state
            .rechained
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The last transient failure, if the publisher is retrying now.
    pub fn last_error(&self) -> Option<String> {
        self.state.error.lock().ok().and_then(|e| e.clone())
    }

    /// What became of the accepted messages: all `pending` while the
    /// publisher works, split into `not_stored` and `unknown` by a fatal error.
    pub fn outcome(&self) -> PublishOutcome {
        let acked = self.acked();
        let (not_stored, unknown) = self
            .state
            .fatal
            .lock()
            .ok()
            .and_then(|f| f.as_ref().map(|f| (f.not_stored, f.unknown)))
            .unwrap_or((0, 0));
        PublishOutcome {
            accepted: self.sent,
            acked,
            pending: self.sent.saturating_sub(acked + not_stored + unknown),
            not_stored,
            unknown,
        }
    }

    /// A copy of the fatal error, if there was one; it stays for every call.
    fn fatal(&self) -> Option<FlowError> {
        let f = self.state.fatal.lock().ok()?;
        f.as_ref().map(|f| f.error.duplicate().into())
    }
}

impl Sink for Publisher {
    type Item = Bytes;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if let Some(e) = self.fatal() {
            return Poll::Ready(Err(e));
        }
        if self.tx.is_none() {
            return Poll::Ready(Err(FlowError::Closed));
        }
        match std::task::ready!(self.handle.poll_ready(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(self.fatal().unwrap_or(e))),
        }
    }

    /// Queues `item` for the publishing task, or gives it back: after a
    /// fatal error (that error), after `close` ([`FlowError::Closed`]), when
    /// it cannot fit the server's `max_payload` with its headers
    /// ([`ClusterError::MessageTooLarge`], not fatal), or under
    /// [`Overflow::Fail`] when it does not fit ([`FlowError::Overflow`], not
    /// fatal). Under [`Overflow::DropNewest`] an item that does not fit is
    /// dropped and counted, and the send succeeds.
    fn start_send(&mut self, item: Bytes) -> Result<(), SendError<Bytes>> {
        if let Some(e) = self.fatal() {
            return Err(SendError::new(item, e));
        }
        // Two headers of about 60 bytes ride along.
        let size = item.len() + 96;
        if self.max_payload > 0 && size > self.max_payload {
            let limit = self.max_payload;
            return Err(SendError::new(
                item,
                ClusterError::MessageTooLarge { size, limit }.into(),
            ));
        }
        let Some(tx) = self.tx.as_ref() else {
            return Err(SendError::closed(item));
        };
        let charge = charge_of(&item);
        if !self.overflow.blocks() {
            // Only this sink charges the gate (the task only credits), so
            // what fits now still fits when it is charged below.
            let buffered = self.gate.buffered();
            let high = self.gate.stats().watermarks.high();
            if buffered > 0 && buffered + charge > high {
                if self.overflow == Overflow::Fail {
                    return Err(SendError::new(
                        item,
                        FlowError::Overflow {
                            buffered,
                            charge,
                            high,
                        },
                    ));
                }
                // DropNewest (DropOldest is refused at construction).
                self.gate.record_drop(DropReason::DropNewest, 1);
                return Ok(());
            }
        }
        let id = format!("{}-{}", self.id, self.sent + 1);
        // Charged before it is queued, so the task never credits more than
        // was charged; taken back (with the item) if the task is gone.
        let len = self.gate.charge_item(&item);
        match tx.send((id, item)) {
            Ok(()) => {
                self.sent += 1;
                Ok(())
            }
            Err(mpsc::error::SendError((_, item))) => {
                self.gate.credit(len);
                Err(SendError::new(
                    item,
                    self.fatal().unwrap_or(FlowError::Closed),
                ))
            }
        }
    }

    /// Ready once the stream has acknowledged every accepted message, or at
    /// once with the fatal error (or [`FlowError::Closed`] if the task ended
    /// without one before the acks came).
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let target = self.sent;
        loop {
            if let Some(e) = self.fatal() {
                return Poll::Ready(Err(e));
            }
            if *self.acked.borrow() >= target {
                return Poll::Ready(Ok(()));
            }
            // Resolves when the task ends too (its sender drops), whatever
            // the reason.
            if !std::task::ready!(self.acked_changed.poll_changed(cx)) {
                if *self.acked.borrow() >= target {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(self.fatal().unwrap_or(FlowError::Closed)));
            }
        }
    }

    /// Flushes (unless the publisher failed or is closed already), ends the
    /// queue, then waits for the publishing task to end. Cancel-safe: a
    /// `Pending` keeps the task's handle until it has ended.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if self.tx.is_some() && self.fatal().is_none() {
            let flushed = std::task::ready!(self.poll_flush(cx));
            self.close_error = flushed.err();
        }
        self.tx = None;
        if let Some(t) = self.task.as_mut() {
            let _ = std::task::ready!(Pin::new(t).poll(cx));
            self.task = None;
        }
        match self.fatal() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(self.close_error.take().map_or(Ok(()), Err)),
        }
    }

    fn stats(&self) -> FlowStats {
        self.gate.stats()
    }

    fn writability(&self) -> Option<Writability> {
        Some(self.gate.writability())
    }
}

impl Drop for Publisher {
    /// Stops the publishing task; messages not yet acknowledged are abandoned
    /// (call [`SinkExt::close`](flowctl_core::SinkExt::close) to wait for them).
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

struct Entry {
    id: String,
    payload: Bytes,
    /// Left this client at least once (the stream may hold it).
    sent: bool,
    ack: Option<
        BoxFuture<
            'static,
            Result<
                async_nats::jetstream::publish::PublishAck,
                async_nats::jetstream::context::PublishError,
            >,
        >,
    >,
}

/// Sends `e`; in strict order with `expect_last`, as
/// `Nats-Expected-Last-Sequence`: the stream sequence its predecessor has.
///
/// Not `Nats-Expected-Last-Msg-Id`: a replicated stream checks that header
/// only when it applies the message, on every replica, and from
/// nats-server 2.14 on a failed check there stops the replica for good
/// (`/healthz`: `stream write error: last msgid mismatch`), so a message sent
/// ahead of a lost predecessor stops the whole stream. The stream leader
/// checks the expected last sequence before it proposes the message, and a
/// mismatch is only an error answer (10071), on every release.
async fn send(
    js: &async_nats::jetstream::Context,
    subject: &str,
    e: &mut Entry,
    expect_last: Option<u64>,
) -> Result<(), String> {
    let mut p = PublishMessage::build()
        .payload(e.payload.clone())
        .message_id(&e.id);
    if let Some(seq) = expect_last {
        p = p.expected_last_sequence(seq);
    }
    match js.send_publish(subject.to_owned(), p).await {
        Ok(f) => {
            let f: PublishAckFuture = f;
            e.ack = Some(f.into_future());
            e.sent = true;
            Ok(())
        }
        Err(err) => {
            e.ack = None;
            Err(err.to_string())
        }
    }
}

/// Where message `i` of the window stands in strict order: `None` if it
/// must wait (nothing acked yet and it is not the front), else what it
/// expects as the stream's last sequence (`None` inside: no expectation).
fn chain(strict: bool, base: Option<u64>, i: usize) -> Option<Option<u64>> {
    match (strict, base) {
        (false, _) => Some(None),
        (true, Some(b)) => Some(Some(b + i as u64)),
        // Before the first ack the stream's last sequence is unknown: the
        // front goes alone and unchecked, and its ack gives the base.
        (true, None) => (i == 0).then_some(None),
    }
}

/// Sends, in order, every message of the window from the front that is
/// allowed to go and has no ack pending; stops at the first send error
/// (the front's ack then fails and the window is re-sent).
async fn send_window(
    js: &async_nats::jetstream::Context,
    subject: &str,
    window: &mut VecDeque<Entry>,
    strict: bool,
    base: Option<u64>,
) {
    for (i, e) in window.iter_mut().enumerate() {
        let Some(expect) = chain(strict, base, i) else {
            break;
        };
        if e.ack.is_none() && send(js, subject, e, expect).await.is_err() {
            break;
        }
    }
}

/// The stream's last sequence named by a `wrong last sequence: N` answer.
fn named_last_sequence(reason: &str) -> Option<u64> {
    const SAID: &str = "wrong last sequence: ";
    if !reason.contains(SAID) {
        return None;
    }
    reason
        .rsplit(SAID)
        .next()?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Closes the gate when the publishing task ends, however it ends, so that
/// no `ready` waits for credits that will never come.
struct CloseOnExit(Gate);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Records a fatal error and settles every message the task still holds:
/// `window` (sent or about to be) and whatever is queued in `rx`.
fn fail(
    e: ClusterError,
    window: &VecDeque<Entry>,
    rx: &mut mpsc::UnboundedReceiver<(String, Bytes)>,
    strict_order: bool,
    gate: &Gate,
    state: &State,
) {
    // The front message was refused (not stored) for these; for
    // `PublishFailed` its last ack simply never came.
    let refused = matches!(
        e,
        ClusterError::ConcurrentPublisher { .. }
            | ClusterError::PermissionDenied(_)
            | ClusterError::MessageTooLarge { .. }
    );
    // In strict order each message expects the stream's last sequence to be
    // its predecessor's: nothing sent behind a refused front can be stored,
    // unless another writer moved the stream to exactly the sequence it
    // expects, which only a concurrent publisher can do.
    let chained_refused =
        refused && strict_order && !matches!(e, ClusterError::ConcurrentPublisher { .. });
    let (mut not_stored, mut unknown, mut bytes) = (0u64, 0u64, 0usize);
    for (i, entry) in window.iter().enumerate() {
        bytes += charge_of(&entry.payload);
        if !entry.sent || (refused && i == 0) || (chained_refused && i > 0) {
            not_stored += 1;
        } else {
            unknown += 1;
        }
    }
    // Accepted but never taken from the queue: never sent. Closing the
    // queue first makes a racing `start_send` fail (and take its charge back).
    rx.close();
    while let Ok((_, payload)) = rx.try_recv() {
        bytes += charge_of(&payload);
        not_stored += 1;
    }
    tracing::debug!(error = %e, not_stored, unknown, "publisher failed");
    if let Ok(mut f) = state.fatal.lock() {
        *f = Some(Fatal {
            error: e,
            not_stored,
            unknown,
        });
    }
    // Nothing is held any more.
    gate.credit(bytes);
    gate.close();
}

// One task's whole context, passed once at spawn; a struct would only rename it.
#[allow(clippy::too_many_arguments)]
async fn run(
    js: async_nats::jetstream::Context,
    shared: Arc<Shared>,
    subject: String,
    opts: PublishOptions,
    mut rx: mpsc::UnboundedReceiver<(String, Bytes)>,
    gate: Gate,
    state: Arc<State>,
    acked: watch::Sender<u64>,
) {
    let _close = CloseOnExit(gate.clone());
    let mut window: VecDeque<Entry> = VecDeque::new();
    let mut closed = false;
    let mut failing_since: Option<Instant> = None;
    let mut attempts = 0u32;
    let strict = opts.strict_order;
    // Strict order: the stream sequence of the last message acked; message
    // `i` of the window expects `base + i` as the stream's last sequence.
    let mut base: Option<u64> = None;
    // Returning drops `acked`, which wakes a waiting flush.
    macro_rules! fail {
        ($e:expr) => {{
            fail($e, &window, &mut rx, strict, &gate, &state);
            return;
        }};
    }
    loop {
        // Fill the window without waiting.
        while !closed && window.len() < opts.max_inflight {
            match rx.try_recv() {
                Ok((id, payload)) => {
                    let mut e = Entry {
                        id,
                        payload,
                        sent: false,
                        ack: None,
                    };
                    // Safe even while an earlier one is failing: the stream
                    // leader refuses it until its predecessor is in.
                    if let Some(expect) = chain(strict, base, window.len()) {
                        let _ = send(&js, &subject, &mut e, expect).await;
                    }
                    window.push_back(e);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
        let Some(front) = window.front_mut() else {
            if closed {
                return;
            }
            match rx.recv().await {
                Some((id, payload)) => {
                    let mut e = Entry {
                        id,
                        payload,
                        sent: false,
                        ack: None,
                    };
                    if let Some(expect) = chain(strict, base, 0) {
                        let _ = send(&js, &subject, &mut e, expect).await;
                    }
                    window.push_back(e);
                    continue;
                }
                None => return,
            }
        };
        let result = match front.ack.take() {
            Some(ack) => ack.await.map_err(|e| (e.kind(), e.to_string())),
            None => Err((PublishErrorKind::Other, "not sent".to_owned())),
        };
        let (kind, reason) = match result {
            Ok(ack) => {
                if let Some(e) = window.pop_front() {
                    gate.credit(charge_of(&e.payload));
                }
                failing_since = None;
                attempts = 0;
                if let Ok(mut err) = state.error.lock() {
                    *err = None;
                }
                acked.send_modify(|n| *n += 1);
                if strict {
                    let first = base.is_none();
                    base = Some(ack.sequence);
                    if first {
                        // The messages held back for the first ack go now.
                        send_window(&js, &subject, &mut window, strict, base).await;
                    }
                }
                continue;
            }
            Err(failure) => failure,
        };
        if kind == PublishErrorKind::MaxPayloadExceeded {
            let limit = shared.client.server_info().max_payload;
            fail!(ClusterError::MessageTooLarge {
                size: front.payload.len(),
                limit,
            });
        }
        let behind = kind == PublishErrorKind::WrongLastSequence
            && matches!((named_last_sequence(&reason), base), (Some(n), Some(b)) if n < b);
        if behind {
            // The stream leader's last sequence is behind our last ack: a
            // new leader not caught up yet, not another writer. Retried.
            tracing::warn!(msg_id = %front.id, %reason, acked_sequence = ?base,
                "stream leader is behind this publisher's last ack; re-sending");
            state
                .rechained
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            state.rechained_metric.increment(1);
        } else if matches!(
            kind,
            PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId
        ) && attempts == 0
        {
            // The first try of the front was refused: it is not stored, and
            // the stream moved past its predecessor without us.
            fail!(ClusterError::ConcurrentPublisher {
                msg_id: front.id.clone(),
                reason,
            });
        }
        if shared.events.denied("publish", &subject).is_some() {
            let text = shared
                .events
                .denied("publish", &subject)
                .unwrap_or_default();
            fail!(ClusterError::PermissionDenied(text));
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        attempts += 1;
        tracing::warn!(msg_id = %front.id, ?kind, %reason, attempts, "publish failed; re-sending in order");
        if let Ok(mut err) = state.error.lock() {
            *err = Some(reason.clone());
        }
        if since.elapsed() >= opts.retry_for {
            fail!(ClusterError::PublishFailed {
                msg_id: front.id.clone(),
                attempts,
                reason,
            });
        }
        let pause = opts
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempts.min(16) - 1))
            .min(opts.max_backoff);
        tokio::time::sleep(pause).await;
        state.retries_metric.increment(1);
        // Go back N: drop every pending ack, re-send from the front.
        for e in window.iter_mut() {
            e.ack = None;
        }
        send_window(&js, &subject, &mut window, strict, base).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_order_holds_back_all_but_the_front_until_the_first_ack() {
        assert_eq!(chain(true, None, 0), Some(None));
        assert_eq!(chain(true, None, 1), None);
        assert_eq!(chain(true, Some(41), 0), Some(Some(41)));
        assert_eq!(chain(true, Some(41), 3), Some(Some(44)));
        // Without strict order nothing waits and nothing is expected.
        assert_eq!(chain(false, None, 5), Some(None));
        assert_eq!(chain(false, Some(41), 5), Some(None));
    }

    #[test]
    fn the_stream_s_last_sequence_is_read_from_a_wrong_last_sequence_answer() {
        assert_eq!(
            named_last_sequence("wrong last sequence: wrong last sequence: 1234"),
            Some(1234)
        );
        assert_eq!(
            named_last_sequence("wrong last sequence: 7 (10071)"),
            Some(7)
        );
        assert_eq!(named_last_sequence("wrong last sequence: x"), None);
        assert_eq!(named_last_sequence("timed out"), None);
    }

    fn entry(n: u32, sent: bool) -> Entry {
        Entry {
            id: format!("p-{n}"),
            payload: Bytes::from(vec![0u8; 10]),
            sent,
            ack: None,
        }
    }

    /// Runs `fail` on a window of `sent` flags plus `queued` messages still in
    /// the channel; returns (not_stored, unknown, buffered after).
    fn settle(e: ClusterError, sent: &[bool], queued: u32, strict: bool) -> (u64, u64, usize) {
        let gate = Gate::new(Watermarks::default(), tracing::Span::none());
        let state = State::new(&Stage::new("test"));
        let window: VecDeque<Entry> = sent
            .iter()
            .enumerate()
            .map(|(i, s)| entry(i as u32, *s))
            .collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..queued {
            tx.send((format!("q-{i}"), Bytes::from(vec![0u8; 10])))
                .unwrap();
        }
        gate.charge(charge_of(&Bytes::from(vec![0u8; 10])) * (sent.len() + queued as usize));
        fail(e, &window, &mut rx, strict, &gate, &state);
        assert!(gate.is_closed());
        assert!(
            tx.send((String::new(), Bytes::new())).is_err(),
            "queue closed"
        );
        let f = state.fatal.lock().unwrap();
        let f = f.as_ref().unwrap();
        (f.not_stored, f.unknown, gate.buffered())
    }

    fn concurrent() -> ClusterError {
        ClusterError::ConcurrentPublisher {
            msg_id: "p-0".into(),
            reason: "wrong last msg id".into(),
        }
    }

    fn failed() -> ClusterError {
        ClusterError::PublishFailed {
            msg_id: "p-0".into(),
            attempts: 3,
            reason: "timed out".into(),
        }
    }

    #[test]
    fn strict_order_refusal_settles_everything_as_not_stored() {
        let denied = || ClusterError::PermissionDenied("publish".into());
        assert_eq!(settle(denied(), &[true, true, false], 2, true), (5, 0, 0));
    }

    #[test]
    fn behind_a_concurrent_writer_sent_followers_are_unknown() {
        // Another writer may have moved the stream to exactly the sequence a
        // sent follower expects.
        assert_eq!(
            settle(concurrent(), &[true, true, false], 2, true),
            (4, 1, 0)
        );
    }

    #[test]
    fn without_strict_order_sent_followers_are_unknown() {
        assert_eq!(
            settle(concurrent(), &[true, true, false], 2, false),
            (4, 1, 0)
        );
    }

    #[test]
    fn publish_failed_leaves_sent_messages_unknown() {
        for strict in [true, false] {
            assert_eq!(settle(failed(), &[true, true, false], 1, strict), (2, 2, 0));
        }
    }

    #[test]
    fn the_fatal_error_is_copied_not_taken() {
        let e = failed();
        let copy = e.duplicate();
        assert_eq!(e.to_string(), copy.to_string());
        assert!(matches!(
            copy,
            ClusterError::PublishFailed { attempts: 3, .. }
        ));
    }

    #[test]
    fn public_types_are_send_and_sync() {
        fn is<T: Send + Sync>() {}
        is::<Publisher>();
        is::<PublishOutcome>();
        is::<PublishOptions>();
    }
}
