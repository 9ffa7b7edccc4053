//! Core NATS subscriptions (at most once) with slow consumers reported.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use flowctl_core::fair::Budget;
use flowctl_core::gate::Gate;
use flowctl_core::lifecycle::Lease;
use flowctl_core::stage::{DropReason, Stage};
use flowctl_core::{Fairness, FlowError, FlowStats, Source, Watermarks, Weighted};
use std::task::{Context, Poll};

use futures::StreamExt;

use crate::ClusterError;
use crate::changed::Changed;
use crate::cluster::{Cluster, Events};

/// One core NATS message.
#[derive(Debug, Clone)]
pub struct CoreMessage {
    /// Its subject.
    pub subject: Subject,
    /// Reply subject, if any.
    pub reply: Option<Subject>,
    /// Payload.
    pub payload: Bytes,
    /// Headers, if any.
    pub headers: Option<HeaderMap>,
}

impl Weighted for CoreMessage {
    fn weight(&self) -> usize {
        self.payload.len()
    }
}

/// A core subscription as a [`Source`]: at most once, bounded by
/// [`ClusterConfig::subscription_capacity`](crate::ClusterConfig) messages
/// inside async-nats. Core NATS has no backpressure: when that channel is full
/// async-nats drops messages and only emits `Event::SlowConsumer`; this source
/// turns those drops into an error, and counts them in
/// [`FlowStats::dropped`] and `flowctl_dropped_total{reason="slow_consumer"}`
/// as they are reported (while the consumer is not reading, too).
///
/// # Stage
/// Named `nats.<subject>.sub` by default ([`CoreSource::set_name`] renames
/// it). Its buffer is async-nats's channel: `high` is
/// `subscription_capacity` (messages, not bytes), and its overflow policy is
/// fixed by async-nats: what does not fit is dropped on arrival, as
/// [`Overflow::DropNewest`](flowctl_core::Overflow::DropNewest) would, and
/// counted with the reason `slow_consumer`. The source holds no buffer of
/// its own beyond the one message a forced yield keeps.
///
/// The count is a lower bound: async-nats reports each drop as one event on
/// a channel of 128 that itself drops events when the client falls behind
/// (the connection's `statistics().in_messages` minus what the consumer
/// received is the exact figure when it is the connection's only
/// subscription). Drops made by the server (it disconnects a client whose
/// pending bytes exceed its `max_pending`) are not reported to the client
/// at all: they show as a reconnect.
///
/// # Errors
/// [`ClusterError::SlowConsumer`] (inside [`FlowError::Transport`]) from the
/// next `recv` after new drops were reported, with the total dropped so far;
/// the error is not terminal: the following `recv` goes on with the messages
/// that were kept. [`FlowError::Closed`] when the connection is gone for good.
#[derive(Debug)]
pub struct CoreSource {
    sub: async_nats::Subscriber,
    sid: Option<u64>,
    subject: String,
    events: Arc<Events>,
    capacity: usize,
    reported: u64,
    peeked: Option<async_nats::Message>,
    /// Permission violations of the connection (checked against this
    /// subject when one is reported).
    violations: Changed<u64>,
    budget: Budget,
    gate: Gate,
    stage: Stage,
    _lease: Lease,
}

/// The subscription id, which async-nats keeps private but prints in `Debug`.
fn sid_of(sub: &async_nats::Subscriber) -> Option<u64> {
    let text = format!("{sub:?}");
    let rest = &text[text.find("sid: ")? + 5..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl Cluster {
    /// Subscribes to `subject` (core NATS, at most once).
    pub async fn subscribe(
        &self,
        subject: &str,
        fairness: Fairness,
    ) -> Result<CoreSource, FlowError> {
        let sub = self
            .shared
            .client
            .subscribe(subject.to_owned())
            .await
            .map_err(|e| ClusterError::nats("subscribe", e))?;
        let sid = sid_of(&sub);
        if sid.is_none() {
            tracing::warn!(
                subject,
                "could not read the subscription id; slow consumer drops of the whole connection are reported"
            );
        }
        let stage = Stage::new(format!("nats.{subject}.sub"));
        let gate = Gate::new(
            Watermarks::new(0, self.shared.subscription_capacity.max(1))
                .map_err(|_| FlowError::Closed)?,
            tracing::debug_span!("core", subject),
        );
        gate.set_stage(stage.clone());
        if let Some(sid) = sid
            && let Ok(mut g) = self.shared.events.gates.lock()
        {
            g.insert(sid, gate.clone());
        }
        Ok(CoreSource {
            sub,
            sid,
            subject: subject.to_owned(),
            events: self.shared.events.clone(),
            capacity: self.shared.subscription_capacity,
            reported: 0,
            peeked: None,
            violations: Changed::new(self.shared.events.violation_gen.subscribe()),
            budget: Budget::new(fairness),
            gate,
            stage,
            _lease: self.shared.ledger.acquire("nats.subscription"),
        })
    }
}

impl CoreSource {
    /// Peeks a message, then spends the budget: a forced yield keeps the
    /// message here for the next call (cancel-safe).
    fn poll_peek(&mut self, cx: &mut Context<'_>) -> Poll<Option<async_nats::Message>> {
        if self.peeked.is_none() {
            match self.sub.poll_next_unpin(cx) {
                Poll::Ready(Some(m)) => self.peeked = Some(m),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    self.budget.reset();
                    return Poll::Pending;
                }
            }
        }
        match self.budget.poll_proceed(cx) {
            Poll::Ready(()) => Poll::Ready(self.peeked.take()),
            Poll::Pending => {
                self.gate.record_forced_yield();
                Poll::Pending
            }
        }
    }

    /// Messages async-nats dropped for this subscription so far (a lower
    /// bound: its event channel may drop reports too); the same figure as
    /// [`FlowStats::dropped`]. Without a subscription id (see
    /// [`Cluster::subscribe`]), the drops of the whole connection.
    pub fn dropped(&self) -> u64 {
        match self.sid {
            Some(_) => self.gate.stats().dropped,
            None => self.events.slow_total.load(Ordering::Relaxed),
        }
    }

    /// Renames the stage (default `nats.<subject>.sub`): its metrics are
    /// registered again under the new name, with the recorder installed now.
    pub fn set_name(&mut self, name: impl Into<Arc<str>>) {
        self.stage = Stage::new(name);
        self.gate.set_stage(self.stage.clone());
    }

    /// The stage: its name and its metrics.
    pub fn stage(&self) -> &Stage {
        &self.stage
    }
}

impl Source for CoreSource {
    type Item = CoreMessage;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<CoreMessage>, FlowError>> {
        if let Some(text) = self.events.denied("subscription", &self.subject) {
            return Poll::Ready(Err(ClusterError::PermissionDenied(text).into()));
        }
        let dropped = self.dropped();
        if dropped > self.reported {
            if self.sid.is_none() {
                // Not counted by the event callback: counted here, as reported.
                self.gate
                    .record_drop(DropReason::SlowConsumer, dropped - self.reported);
            }
            self.reported = dropped;
            return Poll::Ready(Err(ClusterError::SlowConsumer {
                subject: self.subject.clone(),
                dropped,
                capacity: self.capacity,
            }
            .into()));
        }
        // A violation reported while we wait ends the wait; one reported
        // before this poll was seen by `denied` above (and the watch then
        // resolves at once, harmlessly). Polled first so that the waker is
        // registered with it whatever the subscription does.
        while self.violations.poll_changed(cx) == Poll::Ready(true) {
            if let Some(text) = self.events.denied("subscription", &self.subject) {
                return Poll::Ready(Err(ClusterError::PermissionDenied(text).into()));
            }
        }
        // Peek first, then spend the budget: a forced yield keeps the message
        // here for the next call (cancel-safe).
        match std::task::ready!(self.poll_peek(cx)) {
            Some(m) => {
                let msg = CoreMessage {
                    subject: m.subject,
                    reply: m.reply,
                    payload: m.payload,
                    headers: m.headers,
                };
                self.budget.charge(msg.weight());
                self.gate.charge(msg.weight());
                self.gate.credit(msg.weight());
                Poll::Ready(Ok(Some(msg)))
            }
            None => Poll::Ready(Ok(None)),
        }
    }

    fn stats(&self) -> FlowStats {
        self.gate.stats()
    }
}

impl Drop for CoreSource {
    fn drop(&mut self) {
        if let Some(sid) = self.sid
            && let Ok(mut g) = self.events.gates.lock()
        {
            g.remove(&sid);
        }
    }
}
