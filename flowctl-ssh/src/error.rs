//! The errors of flowctl-ssh.

use std::time::Duration;

use flowctl_core::{BoxError, FlowError};

/// Everything that can go wrong in an SSH session or a remote process.
///
/// Every public fallible function of flowctl-ssh returns
/// `Result<_, FlowError>`; the `SshError` is inside [`FlowError::Transport`]
/// (every variant, [`SshError::ConnectTimeout`] included) and
/// [`FlowError::transport_error::<SshError>()`](FlowError::transport_error)
/// gets it back, also from inside a [`FlowError::Pump`] or
/// [`FlowError::RetriesExhausted`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The TCP connection could not be made (refused, unreachable, ...).
    #[error("cannot connect to ssh server {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting and authenticating took longer than the configured timeout.
    #[error("connecting to ssh server {addr} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The address dialled.
        addr: String,
        /// The configured connect timeout.
        timeout: Duration,
    },
    /// The server's host key is not in the known_hosts file.
    #[error(
        "host key of {host} is unknown: {algorithm} key with fingerprint {fingerprint} is not in {known_hosts}"
    )]
    UnknownHostKey {
        /// `host` or `[host]:port` as written in known_hosts.
        host: String,
        /// The key's algorithm (`ssh-ed25519`, ...).
        algorithm: String,
        /// The key's SHA-256 fingerprint (`SHA256:...`).
        fingerprint: String,
        /// The known_hosts file consulted.
        known_hosts: String,
    },
    /// The server's host key differs from the one recorded for this host.
    #[error(
        "host key of {host} has changed: the server offered {algorithm} key {fingerprint}, which differs from line {line} of {known_hosts} (possible man-in-the-middle attack)"
    )]
    HostKeyMismatch {
        /// `host` or `[host]:port` as written in known_hosts.
        host: String,
        /// The offered key's algorithm.
        algorithm: String,
        /// The offered key's SHA-256 fingerprint.
        fingerprint: String,
        /// The known_hosts line that records a different key.
        line: usize,
        /// The known_hosts file consulted.
        known_hosts: String,
    },
    /// The server's host key is marked `@revoked` in a known_hosts file.
    #[error(
        "host key of {host} is revoked: the server offered {algorithm} key {fingerprint}, marked @revoked at line {line} of {known_hosts}"
    )]
    HostKeyRevoked {
        /// `host` or `[host]:port` as written in known_hosts.
        host: String,
        /// The offered key's algorithm.
        algorithm: String,
        /// The offered key's SHA-256 fingerprint.
        fingerprint: String,
        /// The `@revoked` line.
        line: usize,
        /// The file holding it.
        known_hosts: String,
    },
    /// Every configured authentication method was rejected.
    #[error("authentication of user {user} rejected by the server after trying {tried}")]
    AuthRejected {
        /// The user name.
        user: String,
        /// The methods tried, in order (`publickey /path/key, agent, password`).
        tried: String,
    },
    /// A private key file could not be read or decrypted.
    #[error("cannot load private key {path}: {source}")]
    Key {
        /// The key file.
        path: String,
        /// Why it failed.
        #[source]
        source: BoxError,
    },
    /// The ssh-agent could not be reached or used.
    #[error("ssh-agent unavailable: {0}")]
    Agent(#[source] BoxError),
    /// The server refused to run the command (the exec request failed).
    #[error("server refused to execute {command:?}")]
    ExecRefused {
        /// The command.
        command: String,
    },
    /// The connection ended in the middle of a remote process's output.
    #[error(
        "ssh connection lost before the end of {stream}: {delivered} bytes of it were delivered"
    )]
    ConnectionLost {
        /// `stdout`, `stderr` or `exit status`.
        stream: &'static str,
        /// Bytes of that stream handed to the consumer before the loss.
        delivered: u64,
    },
    /// Under [`Overflow::Fail`](flowctl_core::Overflow::Fail), a chunk of
    /// stdout or stderr found the stream's buffer full: the stream ended
    /// there. What was accepted before it was delivered; the rest of the
    /// stream was read and discarded (the remote command was not stalled).
    #[error(
        "{stage} overflowed: a chunk of {charge} bytes did not fit under the {high} byte high watermark ({buffered} bytes buffered); the stream ended after {delivered} bytes, the rest was discarded (Overflow::Fail)"
    )]
    OutputOverflow {
        /// The stream's stage name (`ssh.<host>.<channel>.stdout`, ...).
        stage: String,
        /// Bytes buffered when the chunk was refused.
        buffered: usize,
        /// The refused chunk's charge.
        charge: usize,
        /// The high watermark.
        high: usize,
        /// Bytes of the stream handed to the consumer.
        delivered: u64,
    },
    /// The channel closed without an exit status or signal.
    #[error(
        "remote process ended without an exit status (channel closed after {stdout} stdout bytes)"
    )]
    NoExitStatus {
        /// Bytes of stdout received.
        stdout: u64,
    },
    /// An error from russh.
    #[error("ssh protocol error: {0}")]
    Russh(#[source] BoxError),
    /// The system `ssh` client (openssh backend) failed in a way not covered
    /// by another variant; the message is what ssh printed.
    #[error("openssh client error: {0}")]
    OpenSsh(#[source] BoxError),
    /// A configuration value that cannot be used.
    #[error("invalid ssh configuration: {0}")]
    Config(String),
}

impl From<SshError> for FlowError {
    /// [`FlowError::Transport`] for every variant: a connect timeout too, so
    /// that `transport_error::<SshError>()` finds it with its address (it
    /// counts as transient either way).
    fn from(e: SshError) -> Self {
        FlowError::transport(e)
    }
}

#[cfg(feature = "russh")]
impl From<russh::Error> for SshError {
    fn from(e: russh::Error) -> Self {
        SshError::Russh(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_is_read_back_from_the_flow_error() {
        let err = FlowError::from(SshError::ConnectTimeout {
            addr: "127.0.0.1:22".into(),
            timeout: Duration::from_millis(300),
        });
        assert!(err.is_transient());
        assert!(
            matches!(
                err.transport_error::<SshError>(),
                Some(SshError::ConnectTimeout { addr, timeout })
                    if addr == "127.0.0.1:22" && *timeout == Duration::from_millis(300)
            ),
            "{err:?}"
        );
        let err = FlowError::from(SshError::Config("x".into()));
        assert!(matches!(
            err.transport_error::<SshError>(),
            Some(SshError::Config(m)) if m == "x"
        ));
    }
}
