//! NATS cluster transport for flowctl: a JetStream pull [`Source`](flowctl_core::Source)
//! whose demand is the backpressure, and connects that leave nothing behind.
//!
//! # Example
//!
//! ```no_run
//! use flowctl_cluster::{Cluster, ClusterConfig, ConsumeOptions};
//! use flowctl_core::Watermarks;
//! use flowctl_core::prelude::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), flowctl_core::FlowError> {
//! let cluster = Cluster::connect(ClusterConfig::new([
//!     "nats://127.0.0.1:4222",
//!     "nats://127.0.0.1:4223",
//! ]))
//! .await?;
//! let mut orders = cluster
//!     .consume("ORDERS", "billing", ConsumeOptions {
//!         watermarks: Watermarks::new(256 * 1024, 1024 * 1024)?,
//!         ..ConsumeOptions::default()
//!     })
//!     .await?;
//! while let Some(msg) = orders.recv().await? {
//!     println!("#{}: {} bytes", msg.stream_seq, msg.payload.len());
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # The pieces
//!
//! - [`Cluster::connect`]: several seeds, each try bounded by
//!   [`ClusterConfig::connect_timeout`], whole rounds retried by
//!   [`flowctl_core::lifecycle::retry`]; 1 s pings. Errors:
//!   [`ClusterError::NoSeedReachable`] (every seed with its reason),
//!   [`ClusterError::AuthRejected`] (never retried). A password or token is
//!   only sent over TLS unless
//!   [`ClusterConfig::allow_plaintext_credentials`] says otherwise.
//! - [`Cluster::consume`] → [`PullSource`]: a durable JetStream pull consumer.
//!   **Demand follows the watermarks**: a pull goes out only while buffered
//!   bytes are at or below `low`, and only if buffered bytes plus what the
//!   open requests may still deliver (counted as the server counts them)
//!   stay within `high`; each asks for `batch` messages and at most half the
//!   `high - low` band in `max_bytes` (so two can be in flight). The source
//!   thus holds at most `high` bytes plus one oversized message, on every
//!   nats-server release from 2.9 to 2.15; the rest stays on the server.
//!   The decisions are made by a state machine without I/O, documented with
//!   what each server release does with pull requests in the module source
//!   (`src/pull/demand.rs`). Acks: [`AckMode::OnReceive`] (at most once
//!   across an application crash after `recv`) or [`AckMode::Manual`]
//!   ([`AckHandle`], at least once).
//! - [`Cluster::publisher`] → [`Publisher`]: un-acked bytes bounded by the
//!   sink's watermarks and `max_inflight`; `Nats-Msg-Id` for server dedupe and
//!   `Nats-Expected-Last-Sequence` chaining so retries through elections
//!   neither duplicate nor reorder (not `Nats-Expected-Last-Msg-Id`: from
//!   nats-server 2.14 on, one failed check of that header stops every replica
//!   of the stream). Its fatal errors are sticky: every later call,
//!   `flush` and `close` included, returns them at once, and
//!   [`Publisher::outcome`] counts what was stored, not stored, or unknown.
//! - [`Cluster::subscribe`] → [`CoreSource`]: core NATS, at most once;
//!   drops are reported as [`ClusterError::SlowConsumer`] and counted in
//!   [`FlowStats::dropped`](flowctl_core::FlowStats::dropped), permission
//!   violations as [`ClusterError::PermissionDenied`].
//!
//! # Stages and metrics
//!
//! Every source and sink is a named [`Stage`](flowctl_core::Stage) by
//! default, used in its `tracing` span and, with the `metrics` feature, as
//! the `stage` label of its metrics (create it after installing the
//! recorder):
//!
//! | stage | default name | renamed by |
//! |---|---|---|
//! | [`PullSource`] | `nats.<stream>.<consumer>.pull` | [`ConsumeOptions::name`] |
//! | [`Publisher`] | `nats.<stream>.<subject>.publish` | [`PublishOptions::name`] |
//! | [`CoreSource`] | `nats.<subject>.sub` | [`CoreSource::set_name`] |
//! | the connection | `nats.<name or first seed>.connection` | [`ClusterConfig::name`] |
//!
//! Each exports flowctl-core's metrics of its buffer; the pull source adds
//! its [`PullStats`] as counters (`flowctl_nats_pulls_total`,
//! `flowctl_nats_redeliveries_dropped_total`,
//! `flowctl_nats_demand_resets_total`, `flowctl_nats_gap_fills_total`, ...)
//! and `flowctl_nats_ack_failures_total`, the publisher
//! `flowctl_nats_publish_retries_total` and `flowctl_nats_rechained_total`,
//! the connection `flowctl_nats_reconnects_total`; a core subscription's
//! drops are `flowctl_dropped_total{reason="slow_consumer"}`. The full list
//! is in `docs/src/reference/metrics.md`.
//!
//! Overflow: the pull source never overflows (it asks only for what fits);
//! the publisher takes [`PublishOptions::overflow`] (`Block`, `DropNewest`,
//! `Fail`; `DropOldest` is refused, since what it holds was already sent);
//! a core subscription drops what async-nats cannot queue, as `DropNewest`
//! would, with the reason `slow_consumer`. The publisher's
//! [`Sink::writability`](flowctl_core::Sink::writability) observes its
//! paused/resumed edges.
//!
//! # Errors
//!
//! Every public fallible function of this crate, the constructors
//! ([`Cluster::connect`], [`Cluster::publisher`], [`Cluster::consume`],
//! [`Cluster::subscribe`]) as well as the stage methods, returns
//! `Result<_, FlowError>`; the typed [`ClusterError`] is inside
//! [`FlowError::Transport`](flowctl_core::FlowError::Transport) and is read
//! with `err.transport_error::<ClusterError>()`.
//!
//! # Failover: in order, deduplicated
//!
//! A [`PullSource`] must be the only reader of its durable consumer. It
//! deduplicates only what it handed out itself (`PullStats::duplicates`):
//! a redelivery of a message the application holds un-acked
//! ([`AckMode::Manual`]) is dropped without an ack, one of a message already
//! acked is acked again and dropped, and anything this source never handed
//! out (a previous instance's un-acked messages) is delivered. It also
//! tracks the consumer's delivery sequence: a jump means deliveries were
//! lost in transit (they went to a node that died or hung). Later messages
//! are held back so that the application still sees stream order, and the
//! missed messages are read from the stream itself
//! (`$JS.API.STREAM.MSG.GET`, one at a time, from just after the last
//! message handed out up to the first delivery after the gap, with the
//! consumer's filter subjects; `PullStats::filled`): a failover costs round
//! trips to the stream leader, not the consumer's `ack_wait`. Such a message
//! is acked on the server when the consumer redelivers it (the source acks
//! that redelivery and drops it). Without permission to read the stream
//! ([`ConsumeOptions::fill_gaps_from_stream`] off, or refused), the server
//! redelivers the lost ones after `ack_wait` and held messages wait until as
//! many redeliveries have arrived. Stream sequences need not be contiguous
//! (filters, deleted messages); held messages are released after
//! `hold_timeout` if the lost ones never come. Filling needs room even when
//! the buffer is full: within `high`, the newest held messages are dropped
//! unacked (`PullStats::evicted`) and read again in their turn.
//!
//! A reconnect does not end the pull requests already sent: they live on the
//! consumer leader until their `expires` and deliver to the same inbox once
//! the subscription is back. So the source keeps counting them as demand
//! until it knows they are over (every message they may send arrived, or
//! their end status, which names the request by its reply subject
//! `<inbox>.<id>`, counts what they will never send) or their `expires`
//! (restarted at the reconnect, plus 1 s) has passed, or until the leader
//! says they are gone: after a reconnect or two missed heartbeats the source
//! asks the consumer leader how many pull requests it holds (consumer info,
//! `num_waiting`, sent on the connection after every pull it answers for)
//! and stops counting the ones that are no longer there
//! (`PullStats::voided`): the leader drops requests whose inbox lost
//! interest, and a new leader never had them. The bound holds through
//! failovers, and demand is re-issued as soon as the leader answers instead
//! of after `expires` + 1 s. The assumptions: the leader has registered
//! the pulls that reached it before the info request behind them (nats-server
//! handles pulls in the route's read loop and API requests in a queue after
//! it), and what a request delivers arrives within its `expires` plus 1 s.
//!
//! Measured (`examples/bench_cluster.rs --resume-only`, release, 2 shared
//! cores, consumer `ack_wait` 2 s, nats-server 2.15.1): the consumer's node
//! SIGKILLed while it leads nothing: first new message after 0.09-1.6 s
//! with 256 to 966 deliveries lost in transit and read from the stream
//! (before the source read them, it waited for their redelivery: up to
//! 5.1 s, twice `ack_wait` when held messages had to be dropped for room);
//! frozen (SIGSTOP): 3.0 s (three 1 s
//! pings to notice), where async-nats with its defaults (60 s pings) had not
//! resumed after 60 s. Before the probe the same runs took 2.0-6.1 s and
//! 7-9 s. When the killed node leads the stream or the consumer, the resume
//! waits for nats-server 2.9's raft election (4-9 s election timeout): the
//! tests and `examples/nats_failover.rs` show 5-9 s there.
//!
//! # Leak-free lifecycle
//!
//! [`Cluster::consume`] runs in a [`flowctl_core::lifecycle::Attempt`]: the
//! inbox subscription is owned before SUB leaves and the pull task before it
//! is spawned; a cancel or timeout at any await releases them. Pull requests
//! already sent cannot be withdrawn in NATS: they die with their `expires`
//! or with the inbox's interest, and the server drops deliveries to an inbox
//! without interest. Live resources are counted in [`ClusterConfig::ledger`] as
//! `nats.connection`, `nats.subscription`, `nats.pull_task`,
//! `nats.publisher`; dropping the [`Cluster`] and what was made from it
//! brings them to zero (tests check this and the servers' `/subsz`, `/connz`
//! and `/jsz`).
//!
//! # What we learned from async-nats 0.51 (read in its source)
//!
//! - **Connect.** `ConnectOptions::connect` tries the server list once
//!   (`Connector::try_connect`), each server bounded by `connection_timeout`,
//!   and returns only the *last* error. It spawns its two tasks (event
//!   callback, connection handler) only after a successful handshake, so a
//!   connect future dropped mid-way leaves no task and closes its socket. To
//!   report every seed's reason we run one connect per seed, steering the
//!   first pick with `reconnect_to_server_callback` (later reconnects use
//!   async-nats's own selection over seeds and discovered servers).
//! - **`retry_on_initial_connect`** moves the dial into the spawned connection
//!   task, which keeps dialing after the `Client` is gone: never used here; our
//!   retry loop is [`flowctl_core::lifecycle::retry`] around bounded rounds.
//! - **Pings.** The handler sends a PING every `ping_interval` and drops the
//!   connection when more than 2 are unanswered (`MAX_PENDING_PINGS`), so a hung
//!   node is detected after about 3 periods (default here: 1 s, not 60 s).
//! - **Slow consumers.** A core subscription is an mpsc of
//!   `subscription_capacity` messages; when it is full the handler drops the
//!   message and sends `Event::SlowConsumer(sid)` with `try_send` on a
//!   128-slot event channel (so even the report can be lost). Nothing tells the
//!   subscriber. Hence JetStream pull for flow control: at most one batch is
//!   ever in that channel.
//! - **Subscriptions.** `Client::subscribe` has no await after it queues SUB, so
//!   a cancelled subscribe either sent nothing or returned the `Subscriber`;
//!   dropping a `Subscriber` queues UNSUB behind it. The connection ends when
//!   every `Client` clone (subscribers hold one) is dropped.
//! - **Publish acks.** `jetstream::Context::send_publish` checks `max_payload`
//!   client-side (`MaxPayloadExceeded`) and maps a 503 (no responders) to
//!   `StreamNotFound`, which during a leader election is transient.
//!
//! - **Subscription ids** are private; [`CoreSource`] reads its sid from the
//!   `Subscriber`'s `Debug` output to attribute `SlowConsumer(sid)` events
//!   (falls back to the connection's total).
//! - **Permission violations** arrive as an asynchronous `-ERR` →
//!   `Event::ServerError(Other(text))`; we match the subject in that text.
//!
//! # Feature flags
//!
//! - `nkeys` (off): NATS credentials files and nkey seeds
//!   (`Credentials::CredentialsFile`), via `async-nats/nkeys`.
//! - `metrics` (off): every stage's metrics through the `metrics` facade
//!   (flowctl-core's `metrics` feature); see [Stages and metrics](#stages-and-metrics).
//! - `testing` (off): the `testing` module, a real 3-node `nats-server`
//!   cluster with JetStream on 127.0.0.1 (`testing::NatsCluster`: free ports,
//!   stopped by pid, monitoring reads). Used by this crate's tests and
//!   examples and by flowctl-soak; needs the `nats-server` binary at run time.
//!
//! async-nats is used with `default-features = false` and only `jetstream` +
//! `ring`: its defaults add websockets, kv/object-store, the service API and
//! nkeys (ed25519 crates). rustls is always compiled by async-nats; of its two
//! crypto backends `ring` builds in well under half the time of `aws-lc-rs`
//! (which needs cmake and a C build: about 1.2 min more, measured for russh on 2 cores).
// The transport has no unsafe code. Only the `testing` fixture has two
// blocks (process groups and the parent-death signal of its nodes), each
// allowed where it is and explained by its `SAFETY` comment.
#![cfg_attr(not(feature = "testing"), forbid(unsafe_code))]
#![cfg_attr(feature = "testing", deny(unsafe_code))]

mod changed;
mod cluster;
mod core_sub;
mod error;
mod publish;
mod pull;
#[cfg(feature = "testing")]
pub mod testing;

pub use cluster::{Cluster, ClusterConfig, Credentials, Tls};
pub use core_sub::{CoreMessage, CoreSource};
pub use error::ClusterError;
pub use publish::{PublishOptions, PublishOutcome, Publisher};

/// Registers the help texts of flowctl-cluster's own metrics (and of the core
/// metrics every stage exports: it calls
/// [`flowctl_core::stage::describe_metrics`]) with the installed recorder.
/// Call once, after installing it. A no-op without the `metrics` feature.
pub fn describe_metrics() {
    use flowctl_core::stage::describe_counter;
    flowctl_core::stage::describe_metrics();
    for (metric, help) in [
        ("flowctl_nats_pulls_total", "Pull requests sent."),
        (
            "flowctl_nats_redeliveries_dropped_total",
            "Redeliveries dropped by the pull source's dedupe.",
        ),
        (
            "flowctl_nats_demand_resets_total",
            "Times the pull source lost sight of its open pull requests (a reconnect or missed heartbeats).",
        ),
        (
            "flowctl_nats_heartbeats_missed_total",
            "Demand resets caused by two missed idle heartbeats.",
        ),
        (
            "flowctl_nats_missed_deliveries_total",
            "Deliveries that never arrived (gaps in the consumer's delivery sequence).",
        ),
        (
            "flowctl_nats_hold_expired_total",
            "Times messages held back for a gap were released by hold_timeout with the gap still open.",
        ),
        (
            "flowctl_nats_evicted_total",
            "Held-back messages dropped un-acked to make room for what fills a gap (the server redelivers them).",
        ),
        (
            "flowctl_nats_gap_fills_total",
            "Messages read from the stream to fill a gap.",
        ),
        (
            "flowctl_nats_gap_fill_failures_total",
            "Reads of the stream that failed or were refused.",
        ),
        (
            "flowctl_nats_requests_voided_total",
            "Open pull requests a probe found gone from the consumer leader.",
        ),
        (
            "flowctl_nats_ack_failures_total",
            "Acks the client could not send (the connection was gone).",
        ),
        (
            "flowctl_nats_publish_retries_total",
            "Times the publisher re-sent its window after a transient failure.",
        ),
        (
            "flowctl_nats_rechained_total",
            "Messages re-sent because a stream leader's last sequence was behind the publisher's last ack.",
        ),
        (
            "flowctl_nats_reconnects_total",
            "Times async-nats re-established the connection.",
        ),
    ] {
        describe_counter(metric, help);
    }
}
pub use pull::{AckHandle, AckMode, ConsumeOptions, JsMessage, PullSource, PullStats};
