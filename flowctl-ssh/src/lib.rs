//! SSH exec channels for flowctl: a remote command's stdin as a [`Sink`](flowctl_core::Sink),
//! its stdout and stderr as [`Source`](flowctl_core::Source)s, and its exit status, on
//! [`russh`](https://docs.rs/russh), with memory bounded by watermarks
//! whatever the consumer's speed.
//!
//! The failure this crate exists to prevent: AsyncSSH before 2.15 redirected
//! a remote command's stdout into a slow local writer without waiting for it
//! to drain, and memory grew until the process was killed. Here every buffer
//! is charged against [`Watermarks`](flowctl_core::Watermarks), and the pause
//! reaches the server.
//!
//! # Example
//!
//! ```no_run
//! use flowctl_core::{Sink, Source};
//! use flowctl_ssh::{Auth, Session, SshConfig};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = SshConfig::new("deploy", "db1.example:22")
//!     .auth(Auth::key_file("/home/deploy/.ssh/id_ed25519"));
//! let session = Session::connect(config).await?; // checks ~/.ssh/known_hosts
//! let mut proc = session.exec("zcat /var/log/big.gz").await?;
//! proc.stdin.close().await?; // EOF
//! let mut total = 0u64;
//! while let Some(chunk) = proc.stdout.recv().await? {
//!     total += chunk.len() as u64; // as slow as you like: memory stays bounded
//! }
//! let status = proc.wait().await?;
//! println!("{total} bytes, {status}");
//! # Ok(()) }
//! ```
//!
//! # What russh does, and how flowctl-ssh bounds memory
//!
//! Read in russh 0.65.1's source (`client/encrypted.rs`, `session.rs`,
//! `channels/mod.rs`, `server/encrypted.rs`):
//!
//! - **The window is adjusted on receipt, not on consumption.** For every
//!   `CHANNEL_DATA`/`CHANNEL_EXTENDED_DATA`, `Encrypted::adjust_window_size`
//!   subtracts the bytes from the window and, as soon as it falls below half
//!   of `window_size`, queues a `WINDOW_ADJUST` back to the full size, *before*
//!   the data is handed to the application. The SSH window therefore never
//!   stops a sender; it only bounds bytes in flight on the wire.
//! - **The per-channel queue is a bounded mpsc of `channel_buffer_size`
//!   messages**, and the session loop hands each packet over with
//!   `chan.send(..).await`. When the queue is full, the whole session loop
//!   waits there: it stops reading the socket, so TCP flow control is what
//!   finally pauses the server. With `channel_buffer_size = 100000` and a
//!   stalled reader, 100000 packets of up to 32 KiB may pile up (we measured
//!   496 MB RSS).
//! - A dropped channel receiver does not block the loop (`send` fails and is
//!   ignored), and a dropped `Channel` does **not** close the channel: this
//!   crate sends `CHANNEL_CLOSE` itself when a process is dropped.
//! - Writing (`ChannelWriteHalf::data_bytes`) does wait for the peer's window,
//!   one packet at a time.
//!
//! So flowctl-ssh sets a small `channel_buffer_size` ([`SshConfig::channel_buffer`],
//! default 2) and runs one reader task per process that takes the next message
//! from russh's queue only when both the stdout and the stderr buffers are at
//! or below their low watermark (they are [`flowctl_core::pipe`]s). In-process
//! buffering per process is then at most `high` + one packet per stream, plus
//! `channel_buffer` packets in russh's queue and the packet russh's loop holds,
//! whatever the consumer's speed. The kernel's socket buffers hold what the
//! window lets the server send beyond that (at most `window` bytes).
//!
//! In the other direction, [`Stdin`] is a pipe bounded by the same
//! watermarks, drained by a task that hands one chunk at a time to
//! `data_bytes`, which waits for the server's window: at most `high` + one
//! chunk in the pipe, one chunk in the task, and russh's outgoing queue (10
//! messages) are held.
//!
//! Measured with `examples/remote_to_local.rs` (release, 1 GiB from
//! `head -c` into a child that stalls 5 s, then reads about 25 MB/s, the
//! embedded server in the same process): peak RSS 12.3 MB with the default
//! `channel_buffer` of 2, and 1065 MB with `--channel-buffer 100000`, while
//! our own stdout buffer peaked at 1 MiB + one packet in both runs: the whole
//! stream piled up inside russh's queue, out of reach of any watermark.
//!
//! # Limits you must know
//!
//! - **Head-of-line blocking.** All channels of one connection share russh's
//!   session loop: a process whose consumer stalls stalls every other channel
//!   of that connection, and its keepalives. stdout and stderr of one process
//!   share a queue too: drain both, or drop the one you do not want.
//!   [`Session::exec_isolated`] opens one connection per command for users
//!   who need channels not to block each other.
//! - **Full duplex needs concurrency.** A command that echoes its input
//!   (`cat`) stops reading stdin when its stdout is not read; feed stdin and
//!   drain stdout from different tasks, as with any pipe.
//! - **Keepalive during a stall.** While the loop waits, russh neither sends
//!   keepalives nor answers the server's (its keepalive timer lives in the
//!   same `select!` and is re-armed by the next packet received, so our side
//!   never times out because of a stall). A server with `ClientAliveInterval`
//!   x `ClientAliveCountMax` shorter than the stall drops the connection
//!   (OpenSSH's default interval is 0: off); the outputs then fail with
//!   [`SshError::ConnectionLost`], which says how many bytes were delivered.
//!   Checked with sshd `ClientAliveInterval 1`, `ClientAliveCountMax 2` and
//!   an 8 s stall in `remote_to_local`: sshd logged "Timeout, client not
//!   responding" and the example failed with `ConnectionLost` after 3506176
//!   bytes. There is no cure inside russh 0.65 short of an unbounded queue:
//!   raise the server's limits or keep stalls shorter.
//!   Keepalives ([`SshConfig::keepalive`]) are off by default.
//!
//! # Authentication and host keys
//!
//! [`Auth`] lists the methods tried in order: a private key file (with an
//! optional passphrase), the ssh-agent of `SSH_AUTH_SOCK` or of a given
//! socket, a password. Host keys are checked against `~/.ssh/known_hosts` (or
//! [`SshConfig::known_hosts`]) with russh's parser (`host` for port 22,
//! `[host]:port` otherwise; hashed entries are matched too); an unknown or a
//! changed key fails with [`SshError::UnknownHostKey`] /
//! [`SshError::HostKeyMismatch`], which carry the offered key's SHA-256
//! fingerprint. Only [`HostKeyPolicy::InsecureAcceptAny`] skips the check.
//!
//! # Crypto backend and build time
//!
//! russh needs `ring` or `aws-lc-rs`. We use `ring`
//! (`default-features = false, features = ["ring"]`): a cold build of russh
//! with `ring` takes about 3.8 min on 2 cores against about 5 min with
//! aws-lc-rs (which also needs cmake and a C toolchain run), and CI builds
//! from scratch. AES-GCM and ChaCha20-Poly1305 come from `ring` either way.
//! zlib compression (`flate2`) is off too. RSA keys need the `rsa` feature.
//!
//! # Feature flags
//!
//! - `russh` (default): the russh client backend. Without it the crate has
//!   only its configuration and error types.
//! - `server`: `server::EmbeddedServer`, an in-process SSH server that runs
//!   commands with `sh -c` and respects backpressure both ways (tests, soak).
//! - `rsa`: RSA user and host keys (russh's `rsa` feature; longer build).
#![forbid(unsafe_code)]

mod config;
mod error;

pub use config::{Auth, HostKeyPolicy, SshConfig};
pub use error::SshError;

#[cfg(feature = "russh")]
mod process;
#[cfg(feature = "russh")]
pub mod redirect;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "russh")]
mod session;

#[cfg(feature = "russh")]
pub use process::{Exit, ExitStatus, Output, RemoteProcess, Stdin};
#[cfg(feature = "russh")]
pub use session::{LEDGER_SESSION, LEDGER_TASK, Session};

/// The russh version this crate is built on, re-exported for key types
/// (`russh::keys::PrivateKey`, ...).
#[cfg(feature = "russh")]
pub use russh;
