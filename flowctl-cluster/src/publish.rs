//! The JetStream publish Sink: bounded un-acked publishes, in order, deduped.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_trait::async_trait;
use bytes::Bytes;
use flowctl_core::gate::{Gate, GateHandle};
use flowctl_core::{FlowError, FlowStats, Sink, Watermarks};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::ClusterError;
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
    /// Chain `Nats-Expected-Last-Msg-Id` so a retry can never reorder (the
    /// sink must then be the stream's only writer). Without it, several
    /// writers may share the stream, and a failure with more than one publish
    /// in flight may store later messages before the retried one (still no
    /// duplicates: `Nats-Msg-Id` stays).
    pub strict_order: bool,
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
        }
    }
}

#[derive(Debug)]
struct State {
    acked: watch::Sender<u64>,
    error: Mutex<Option<String>>,
    fatal: Mutex<Option<ClusterError>>,
}

/// Publishes every item to one subject of a stream; see [`Cluster::publisher`].
///
/// # Order and dedupe
/// Each message gets a `Nats-Msg-Id` (`<publisher id>-<n>`) and a
/// `Nats-Expected-Last-Msg-Id` naming its predecessor. After a failure the
/// publisher re-sends the failed message and everything after it, in order:
/// copies that were stored already are dropped by the server's dedupe
/// (within the stream's `duplicate_window`, 2 minutes by default), and a
/// successor whose predecessor was not stored is rejected by the expected-last
/// check, so the stream never holds them out of order. The sink must be the
/// only writer of the stream (another writer is reported as
/// [`ClusterError::ConcurrentPublisher`]) unless
/// [`PublishOptions::strict_order`] is off.
#[derive(Debug)]
pub struct Publisher {
    gate: Gate,
    handle: GateHandle,
    tx: Option<mpsc::UnboundedSender<(String, Bytes)>>,
    id: String,
    sent: u64,
    state: Arc<State>,
    acked: watch::Receiver<u64>,
    task: Option<JoinHandle<()>>,
    max_payload: usize,
}

impl Cluster {
    /// A [`Sink`] of payloads published to `subject`, which a stream must capture.
    ///
    /// # Errors
    /// [`ClusterError::NoStreamForSubject`] if no stream captures `subject`.
    pub async fn publisher(
        &self,
        subject: &str,
        opts: PublishOptions,
    ) -> Result<Publisher, FlowError> {
        if opts.max_inflight == 0 {
            return Err(FlowError::Config("max_inflight must be at least 1".into()));
        }
        let shared = self.shared.clone();
        shared.js.stream_by_subject(subject).await.map_err(|e| {
            if e.to_string().contains("not found") {
                ClusterError::NoStreamForSubject {
                    subject: subject.to_owned(),
                }
            } else {
                ClusterError::nats("stream lookup", e)
            }
        })?;
        let gate = Gate::new(opts.watermarks, tracing::debug_span!("publisher", subject));
        let (acked_tx, acked_rx) = watch::channel(0u64);
        let state = Arc::new(State {
            acked: acked_tx,
            error: Mutex::new(None),
            fatal: Mutex::new(None),
        });
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
            ),
        );
        Ok(Publisher {
            handle: gate.handle(),
            gate,
            tx: Some(tx),
            id: format!("{:016x}", fastrand::u64(..)),
            sent: 0,
            state,
            acked: acked_rx,
            task: Some(task),
            max_payload: shared.client.server_info().max_payload,
        })
    }
}

impl Publisher {
    /// The prefix of this publisher's `Nats-Msg-Id`s.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Messages acknowledged by the stream.
    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// The last transient failure, if the publisher is retrying now.
    pub fn last_error(&self) -> Option<String> {
        self.state.error.lock().ok().and_then(|e| e.clone())
    }

    fn fatal(&self) -> Option<FlowError> {
        let mut f = self.state.fatal.lock().ok()?;
        f.take().map(Into::into)
    }
}

#[async_trait]
impl Sink for Publisher {
    type Item = Bytes;

    async fn ready(&mut self) -> Result<(), FlowError> {
        if let Some(e) = self.fatal() {
            return Err(e);
        }
        match self.handle.ready().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fatal().unwrap_or(e)),
        }
    }

    fn start_send(&mut self, item: Bytes) -> Result<(), FlowError> {
        if let Some(e) = self.fatal() {
            return Err(e);
        }
        // Two headers of about 60 bytes ride along.
        let size = item.len() + 96;
        if self.max_payload > 0 && size > self.max_payload {
            return Err(ClusterError::MessageTooLarge {
                size,
                limit: self.max_payload,
            }
            .into());
        }
        let tx = self.tx.as_ref().ok_or(FlowError::Closed)?;
        self.sent += 1;
        let id = format!("{}-{}", self.id, self.sent);
        self.gate.charge(item.len());
        tx.send((id, item)).map_err(|_| FlowError::Closed)
    }

    async fn flush(&mut self) -> Result<(), FlowError> {
        let target = self.sent;
        loop {
            if let Some(e) = self.fatal() {
                return Err(e);
            }
            if *self.acked.borrow_and_update() >= target {
                return Ok(());
            }
            if self.acked.changed().await.is_err() {
                return Err(self.fatal().unwrap_or(FlowError::Closed));
            }
        }
    }

    async fn close(&mut self) -> Result<(), FlowError> {
        if self.tx.is_none() {
            return Ok(());
        }
        let r = self.flush().await;
        self.tx = None;
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        r
    }

    fn stats(&self) -> FlowStats {
        self.gate.stats()
    }
}

impl Drop for Publisher {
    /// Stops the publishing task; messages not yet acknowledged are abandoned
    /// (call [`Sink::close`] to wait for them).
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

struct Entry {
    id: String,
    prev: Option<String>,
    payload: Bytes,
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

async fn send(
    js: &async_nats::jetstream::Context,
    subject: &str,
    e: &mut Entry,
) -> Result<(), String> {
    let mut p = PublishMessage::build()
        .payload(e.payload.clone())
        .message_id(&e.id);
    if let Some(prev) = &e.prev {
        p = p.expected_last_message_id(prev);
    }
    match js.send_publish(subject.to_owned(), p).await {
        Ok(f) => {
            let f: PublishAckFuture = f;
            e.ack = Some(f.into_future());
            Ok(())
        }
        Err(err) => {
            e.ack = None;
            Err(err.to_string())
        }
    }
}

async fn run(
    js: async_nats::jetstream::Context,
    shared: Arc<Shared>,
    subject: String,
    opts: PublishOptions,
    mut rx: mpsc::UnboundedReceiver<(String, Bytes)>,
    gate: Gate,
    state: Arc<State>,
) {
    let mut window: VecDeque<Entry> = VecDeque::new();
    let mut prev: Option<String> = None;
    let mut closed = false;
    let mut failing_since: Option<Instant> = None;
    let mut attempts = 0u32;
    let fail = |e: ClusterError| {
        if let Ok(mut f) = state.fatal.lock() {
            *f = Some(e);
        }
        gate.close();
        // Wake a waiting flush so that it sees the error.
        state.acked.send_modify(|_| {});
    };
    loop {
        // Fill the window without waiting.
        while !closed && window.len() < opts.max_inflight {
            match rx.try_recv() {
                Ok((id, payload)) => {
                    let mut e = Entry {
                        prev: prev.replace(id.clone()).filter(|_| opts.strict_order),
                        id,
                        payload,
                        ack: None,
                    };
                    // Safe even while an earlier one is failing: the
                    // expected-last check rejects it until its predecessor is in.
                    let _ = send(&js, &subject, &mut e).await;
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
                        prev: prev.replace(id.clone()).filter(|_| opts.strict_order),
                        id,
                        payload,
                        ack: None,
                    };
                    let _ = send(&js, &subject, &mut e).await;
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
        match result {
            Ok(_) => {
                if let Some(e) = window.pop_front() {
                    gate.credit(e.payload.len());
                }
                failing_since = None;
                attempts = 0;
                if let Ok(mut err) = state.error.lock() {
                    *err = None;
                }
                state.acked.send_modify(|n| *n += 1);
            }
            Err((PublishErrorKind::MaxPayloadExceeded, _)) => {
                let limit = shared.client.server_info().max_payload;
                fail(ClusterError::MessageTooLarge {
                    size: front.payload.len(),
                    limit,
                });
                return;
            }
            Err((PublishErrorKind::WrongLastMessageId, reason)) if attempts == 0 => {
                fail(ClusterError::ConcurrentPublisher {
                    msg_id: front.id.clone(),
                    reason,
                });
                return;
            }
            Err((_, _)) if shared.events.denied("publish", &subject).is_some() => {
                let text = shared
                    .events
                    .denied("publish", &subject)
                    .unwrap_or_default();
                fail(ClusterError::PermissionDenied(text));
                return;
            }
            Err((kind, reason)) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                attempts += 1;
                tracing::warn!(msg_id = %front.id, ?kind, %reason, attempts, "publish failed; re-sending in order");
                if let Ok(mut err) = state.error.lock() {
                    *err = Some(reason.clone());
                }
                if since.elapsed() >= opts.retry_for {
                    fail(ClusterError::PublishFailed {
                        msg_id: front.id.clone(),
                        attempts,
                        reason,
                    });
                    return;
                }
                let pause = opts
                    .initial_backoff
                    .saturating_mul(2u32.saturating_pow(attempts.min(16) - 1))
                    .min(opts.max_backoff);
                tokio::time::sleep(pause).await;
                // Go back N: drop every pending ack, re-send from the front.
                for e in window.iter_mut() {
                    e.ack = None;
                }
                for e in window.iter_mut() {
                    if send(&js, &subject, e).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}
