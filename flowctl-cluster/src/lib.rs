//! NATS cluster transport for flowctl: a JetStream pull [`Source`](flowctl_core::Source)
//! whose demand is the backpressure, and connects that leave nothing behind.
//!
//! # Example
//!
//! ```no_run
//! use flowctl_cluster::{Cluster, ClusterConfig, ConsumeOptions};
//! use flowctl_core::{Source, Watermarks};
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
//! # Feature flags
//!
//! - `nkeys` (off): NATS credentials files and nkey seeds
//!   ([`Credentials::CredentialsFile`]), via `async-nats/nkeys`.
//!
//! async-nats is used with `default-features = false` and only `jetstream` +
//! `ring`: its defaults add websockets, kv/object-store, the service API and
//! nkeys (ed25519 crates). rustls is always compiled by async-nats; of its two
//! crypto backends `ring` builds in well under half the time of `aws-lc-rs`
//! (which needs cmake and a C build: DESIGN.md measured ~1.2 min more for russh).
#![forbid(unsafe_code)]

mod cluster;
mod core_sub;
mod error;
mod publish;
mod pull;

pub use cluster::{Cluster, ClusterConfig, Credentials, Tls};
pub use core_sub::{CoreMessage, CoreSource};
pub use error::ClusterError;
pub use publish::{PublishOptions, Publisher};
pub use pull::{AckHandle, AckMode, ConsumeOptions, JsMessage, PullSource, PullStats};
