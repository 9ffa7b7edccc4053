//! SSH exec channels for flowctl: a remote command's stdin as a [`Sink`](flowctl_core::Sink),
//! its stdout and stderr as [`Source`](flowctl_core::Source)s, and its exit status, on
//! [`russh`](https://docs.rs/russh) or (feature `openssh`) on the system
//! OpenSSH client, with memory bounded by watermarks whatever the consumer's
//! speed.
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
//! use flowctl_core::prelude::*; // Sink, Source and their async conveniences
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
//! # Errors
//!
//! Every public fallible function of this crate, the constructors
//! ([`Session::connect`], [`Session::exec`], [`Session::exec_with`],
//! [`Session::exec_isolated`], [`Session::exec_isolated_with`])
//! as well as the stage methods and [`RemoteProcess::wait`], returns
//! `Result<_, FlowError>`; the typed [`SshError`] is inside
//! [`FlowError::Transport`](flowctl_core::FlowError::Transport) and is read
//! with `err.transport_error::<SshError>()`.
//!
//! # Stage names, overflow, writability and metrics
//!
//! [`Session::exec_with`] takes [`ExecOptions`]. Each process's buffers are
//! named stages (in their `tracing` spans and, with the `metrics` feature,
//! the `stage` label of their metrics): `ssh.<host>.<channel>.stdout`,
//! `.stderr` and `.stdin`, with the host of [`SshConfig::addr`] as given
//! (without the port) and russh's channel number, or a per-session counter
//! with [`Backend::OpenSsh`]; [`ExecOptions::name`] replaces the
//! `ssh.<host>.<channel>` part ([`Output::stage`], [`Stdin::stage`]).
//!
//! [`ExecOptions::overflow`] chooses what stdout and stderr do when their
//! consumer falls behind: wait (`Block`, the default, the backpressure
//! described below), drop (`DropOldest`, `DropNewest`: the remote command
//! is then never stalled by the consumer), or end the stream with
//! [`SshError::OutputOverflow`] (`Fail`); see [`Output`] ("Overflow").
//! stdin always blocks (see [`Stdin`], "Overflow"); its
//! [`writability`](flowctl_core::Sink::writability) reports the pause and
//! resume edges, and [`Stdin::window_waits`] counts the chunks that waited
//! for the remote's window.
//!
//! With the `metrics` feature, besides the core metrics of every stage:
//! `flowctl_ssh_window_waits_total{stage="<base>.stdin"}`,
//! `flowctl_ssh_channels_opened_total{stage="<base>"}` and
//! `flowctl_ssh_exits_total{stage="<base>", outcome}` (`success`,
//! `failure`, `signal`, `no_status`, `lost`, `abandoned`). A stage binds
//! its metrics to the recorder installed when the process is started:
//! install the recorder first.
//!
//! # Choosing a backend
//!
//! [`SshConfig::backend`] picks one; the API, the types, the bounds, the
//! errors and the leak-freedom are the same.
//!
//! - [`Backend::Russh`] (default): pure Rust, in this process, no `ssh`
//!   binary needed, password auth, exit signals, an in-process server for
//!   tests (feature `server`). But russh returns SSH window on *receipt*:
//!   a consumer that stalls stalls its **whole connection** (every other
//!   channel, keepalives, rekeying), and an sshd with `ClientAliveInterval`
//!   drops it when the stall outlasts `ClientAliveInterval x
//!   ClientAliveCountMax` (see "Limits you must know").
//! - [`Backend::OpenSsh`] (feature `openssh`): the system `ssh` as a
//!   ControlMaster. OpenSSH returns window as each channel's output is
//!   *consumed*, so a stalled consumer holds about one window (2 MiB, in
//!   the `ssh` process) and **nothing else stalls**: other commands on the
//!   session run, keepalives are answered. It also honours the user's
//!   `~/.ssh/config`, agent, `ProxyJump` and certificates. Choose it for
//!   long-lived sessions with slow or bursty consumers, or several commands
//!   per connection. It needs an `ssh` binary on `PATH`, costs one local
//!   `ssh` process per command, supports no password auth and cannot report
//!   exit signals (below).
//!
//! # The openssh backend
//!
//! Read in openssh 0.11.6's source (`builder.rs`, `process_impl/*.rs`):
//! `SessionBuilder::connect` runs `ssh -M -f -N -o ControlPersist=<N>s
//! -o BatchMode=yes -E <log> -S <dir>/master ...` and waits for it to fork
//! into the background (after authentication); on failure, the text of the
//! `-E` log is the error. It waits with a `Command::status` that does not
//! kill ssh when dropped, and removes `<dir>` on drop, so a cancelled
//! connect left ssh or its master behind: flowctl-ssh runs the same command
//! itself, in a task that kills ssh (and closes a master already forked)
//! when the caller is gone, and hands `<dir>` to
//! `openssh::Session::new_process_mux`. Each command is a *process-mux* client
//! `ssh -S <dir>/master -T -p 9 none -- <command>` (port 9 so that it can
//! never open a new connection if the master is gone). The mux client hands
//! its stdin/stdout/stderr pipes to the master (`SCM_RIGHTS`), which reads
//! and writes them directly.
//!
//! We chose **process-mux** over native-mux: native-mux speaks the mux
//! protocol in Rust (`openssh-mux-client`, with its serde-based codec and
//! `sendfd`), saving one short-lived `ssh` process per command but adding
//! crates to every cold build; process-mux adds only `libc`, `once_cell`,
//! `shell-escape` and `tempfile`, and the flow control is the same (in both,
//! the master writes into our pipe).
//!
//! **Backpressure.** One task per process reads stdout and stderr (each
//! separately: unlike russh, a stalled stdout does not stall stderr) only
//! while its buffer is at or below the low watermark, in chunks of at most
//! [`SshConfig::max_packet`] bytes. When we stop reading, the pipe fills
//! (64 KiB), the master's channel buffer fills, and the master stops
//! sending `WINDOW_ADJUST` for that channel alone. Our process holds at most
//! `high` + one chunk per stream, as with russh. stdin: chunks are written
//! into the mux client's stdin pipe, which the master reads only as the
//! server's window allows; closing the pipe is EOF.
//!
//! Measured with `examples/bench_ssh.rs` (release, 1 GiB of `head -c` from
//! sshd, aes128-gcm, into a local `sh -c 'sleep 5; exec cat >/dev/null'`,
//! two runs on a loaded 2-core machine): russh 528 / 217 MB/s after the
//! stall, peak RSS 8.4 / 9.4 MB; openssh 363 / 172 MB/s, peak RSS 6.5 /
//! 6.8 MB in our process plus 11.4 / 11.8 MB in the `ssh` master. With a 5 s
//! stall and no keepalive on the server both backends finish; the
//! difference is what else the connection can do during the stall.
//!
//! **Options.** [`Auth::KeyFile`] -> `-i <file> -o IdentitiesOnly=yes`
//! (one key file, without passphrase: `BatchMode=yes` cannot ask);
//! [`Auth::AgentSocket`] -> `SSH_AUTH_SOCK`; [`Auth::Agent`] -> ssh's
//! defaults; [`Auth::Password`] -> [`SshError::Config`] ("password
//! authentication is not supported by the openssh backend ...").
//! [`HostKeyPolicy::KnownHosts`] -> `StrictHostKeyChecking=yes` and
//! `UserKnownHostsFile=<file>`; [`HostKeyPolicy::InsecureAcceptAny`] ->
//! `StrictHostKeyChecking=no`, `UserKnownHostsFile=/dev/null`.
//! `connect_timeout` -> `ConnectTimeout` (whole seconds, rounded up; it
//! bounds TCP connect and the banner exchange, not authentication);
//! `keepalive` -> `ServerAliveInterval`; `ciphers` -> a temporary
//! `-F` file with `Ciphers ...` that then `Include`s `~/.ssh/config` and
//! `/etc/ssh/ssh_config` (quoted: a `HOME` with spaces works).
//! `channel_buffer` and `window` do not apply.
//!
//! **Every value that reaches ssh's command line or a config file is
//! checked** and refused with [`SshError::Config`] before anything runs: a
//! cipher name is letters, digits and `@._+-` (a newline would add a
//! directive such as `ProxyCommand`, which runs a local command); the host
//! and the user must not start with `-` (ssh would read an option) nor hold
//! whitespace, quotes or control characters; paths must be UTF-8 without
//! control characters, and those that ssh reads as a config line (`-o
//! UserKnownHostsFile=`, `Include`) are double-quoted, so a path holding `"`
//! or `\` is refused.
//!
//! **What is parsed from ssh's log** (OpenSSH 9.2 wording):
//! "REMOTE HOST IDENTIFICATION HAS CHANGED" -> [`SshError::HostKeyMismatch`]
//! (fingerprint from the line after "The fingerprint for the ALG key sent
//! by the remote host is", file and line from "Offending ALG key in
//! FILE:LINE"); "No ALG host key is known for HOST and you have requested
//! strict checking" -> [`SshError::UnknownHostKey`] (ssh does not print the
//! key there: a second handshake at `LogLevel=DEBUG1` reads "Server host
//! key: ALG SHA256:..." and stops at the same check, before
//! authentication); "Permission denied (" -> [`SshError::AuthRejected`];
//! "Connection refused" -> [`SshError::Connect`]; "timed out" ->
//! [`SshError::ConnectTimeout`]; anything else -> [`SshError::OpenSsh`]
//! with ssh's text.
//!
//! **Exit status.** The mux client exits with the remote exit code. The mux
//! protocol carries no exit *signal*: a process killed by a signal, like
//! one that exits 255, is reported as [`ExitStatus::Code`]`(255)`. A 255
//! whose master no longer answers `ssh -O check` is a lost connection:
//! outputs then fail with [`SshError::ConnectionLost`], like russh's.
//! Exec refusal is not reported as [`SshError::ExecRefused`] (the mux client
//! exits 255).
//!
//! **Lifecycle.** Dropping every part of a process kills its mux client
//! (the master closes the channel). Dropping the session and its last
//! process runs `ssh -O exit` **synchronously** (a few ms; openssh's `Drop`):
//! the master was started with `-f`, outlives our process, and a close
//! deferred to a task that never runs (runtime shutting down) left masters
//! and their sshd sessions running in our first test run.
//! [`Session::close`] closes without blocking. The sshd-side proof is in
//! `tests/it/lifecycle.rs` (every "Accepted publickey" is followed by a
//! "Disconnected from user"). A master whose owner crashed (no drop at
//! all) exits by itself once no command has run for
//! [`SshConfig::control_persist`] (default 300 s; `ControlPersist=<N>s`
//! instead of openssh's default `yes`, which kept it forever); the same
//! bound closes a session left idle that long.
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
//!   crate closes it itself when a process is dropped (`signal KILL`, EOF,
//!   `CHANNEL_CLOSE`). A channel open is confirmed by the server into the
//!   opener's queue (`CHANNEL_OPEN_CONFIRMATION` -> `ChannelMsg::Open`); an
//!   opener dropped before that leaves the channel open on both sides. So
//!   [`Session::exec`] opens the channel and runs the command in a task of
//!   its own (ledger kind [`LEDGER_OPEN`]) that closes both when the caller
//!   is gone, whenever the confirmation and the exec reply arrive.
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
//!   who need channels not to block each other; [`Backend::OpenSsh`] does
//!   not have this limit at all, and neither does a process whose outputs
//!   drop instead of blocking ([`ExecOptions::overflow`]).
//! - **Full duplex needs concurrency.** A command that echoes its input
//!   (`cat`) stops reading stdin when its stdout is not read; feed stdin and
//!   drain stdout from different tasks, as with any pipe.
//! - **Full duplex through the embedded server stops at one window.** Even
//!   with both directions driven, a remote `cat` on the in-process server
//!   deadlocks once about one window (2 MiB) is in flight: russh 0.65's
//!   server loop waits in `chan.send(Data).await` when a channel's inbound
//!   queue is full and, while it waits, reads no WINDOW_ADJUST from the
//!   client, so `cat`'s output cannot leave, `cat` stops reading its input,
//!   and the queue never drains (seen by the soak's `ssh` scenario; a larger
//!   window made it worse). The same shape can bite the russh client when a
//!   stdout consumer waits on stdin progress. Split such a round trip into
//!   two commands (`cat > fifo` and `cat fifo`, which is what the soak does),
//!   or use sshd with [`Backend::OpenSsh`].
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
//!   raise the server's limits, keep stalls shorter, or use
//!   [`Backend::OpenSsh`]. Both outcomes are tests against sshd with
//!   `ClientAliveInterval 1`, `ClientAliveCountMax 2` and a 5 s stall:
//!   `stall::russh_stalled_reader_is_dropped_by_client_alive` and
//!   `stall::openssh_stalled_reader_outlasts_client_alive_and_blocks_nothing`.
//!   Keepalives ([`SshConfig::keepalive`]) are off by default.
//!
//! # Authentication and host keys
//!
//! [`Auth`] lists the methods tried in order: a private key file (with an
//! optional passphrase), the ssh-agent of `SSH_AUTH_SOCK` or of a given
//! socket, a password. Host keys are checked against `~/.ssh/known_hosts` (or
//! [`SshConfig::known_hosts`]) and then the system-wide
//! [`SshConfig::global_known_hosts`] (`/etc/ssh/ssh_known_hosts`) by
//! OpenSSH's rules (sshd(8), "SSH_KNOWN_HOSTS FILE FORMAT"): `host` for port
//! 22, `[host]:port` otherwise; fields separated by any blanks; host
//! patterns with `*`, `?` and `!` negation, case-insensitive; hashed entries
//! (`|1|salt|hash`); `@revoked` keys are refused even when another line
//! lists them; `@cert-authority` keys never vouch for a plain host key
//! (host certificates are not supported); any of several keys recorded for
//! a host is accepted; malformed lines are skipped. An unknown, a changed or
//! a revoked key fails with [`SshError::UnknownHostKey`] /
//! [`SshError::HostKeyMismatch`] / [`SshError::HostKeyRevoked`], which carry
//! the offered key's SHA-256 fingerprint. Only
//! [`HostKeyPolicy::InsecureAcceptAny`] skips the check. The openssh
//! backend leaves the check to `ssh` itself.
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
//! - `russh` (default): the russh client backend ([`Backend::Russh`]).
//!   With neither `russh` nor `openssh` the crate has only its
//!   configuration and error types.
//! - `server`: `server::EmbeddedServer`, an in-process SSH server that runs
//!   commands with `sh -c` and respects backpressure both ways (tests, soak).
//! - `testing`: [`testing::Sshd`], a real OpenSSH `sshd` on a free loopback
//!   port, stopped by pid (this crate's tests, the soak's `--sshd`).
//! - `rsa`: RSA user and host keys (russh's `rsa` feature; longer build).
//! - `metrics`: every process's stages and this crate's counters through
//!   the [`metrics`](https://docs.rs/metrics) facade (`flowctl-core/metrics`
//!   and the `metrics` crate); no exporter is installed.
//! - `openssh`: [`Backend::OpenSsh`], the system `ssh` as a ControlMaster
//!   through the `openssh` crate (process-mux). It does not need `russh`:
//!   `default-features = false, features = ["openssh"]` builds the crate
//!   without russh and its crypto (then [`Session::connect`] with
//!   [`Backend::Russh`], the default, fails with [`SshError::Config`]; set
//!   [`SshConfig::backend`]). The known_hosts reader, the
//!   `From<russh::Error>` conversion and the `russh` re-export exist only
//!   with `russh` (the openssh backend leaves host keys to `ssh`). Next to
//!   `russh` the extra cold build is small (`openssh`, `shell-escape`,
//!   `once_cell`; `tempfile`, `libc` are already built).
// Only `sys` (process groups, the parent-death signal) may use `unsafe`.
#![deny(unsafe_code)]

#[cfg(any(feature = "russh", feature = "openssh"))]
mod backend;
mod config;
mod error;
#[cfg(any(feature = "russh", feature = "openssh"))]
mod ledger;

pub use config::{Auth, Backend, ExecOptions, HostKeyPolicy, Secret, SshConfig};
pub use error::SshError;

#[cfg(feature = "russh")]
mod known_hosts;
#[cfg(any(feature = "russh", feature = "openssh"))]
mod process;
#[cfg(any(feature = "russh", feature = "openssh"))]
pub mod redirect;
#[cfg(feature = "server")]
pub mod server;
#[cfg(any(feature = "russh", feature = "openssh"))]
mod session;
#[cfg(any(feature = "server", feature = "testing"))]
mod sys;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(any(feature = "russh", feature = "openssh"))]
pub use ledger::{LEDGER_OPEN, LEDGER_SESSION, LEDGER_TASK};
#[cfg(any(feature = "russh", feature = "openssh"))]
pub use process::{Exit, ExitStatus, Output, RemoteProcess, Stdin};
#[cfg(any(feature = "russh", feature = "openssh"))]
pub use session::Session;

/// Registers the help texts of flowctl-ssh's own metrics (and of the core
/// metrics every stage exports: it calls
/// [`flowctl_core::stage::describe_metrics`]) with the installed recorder.
/// Call once, after installing it. A no-op without the `metrics` feature.
pub fn describe_metrics() {
    use flowctl_core::stage::describe_counter;
    flowctl_core::stage::describe_metrics();
    describe_counter(
        "flowctl_ssh_window_waits_total",
        "Stdin chunks the writer could not hand to the connection at once (the remote's SSH window was used up).",
    );
    describe_counter(
        "flowctl_ssh_channels_opened_total",
        "Remote processes started (exec accepted, buffers built).",
    );
    describe_counter(
        "flowctl_ssh_exits_total",
        "Remote processes ended, by outcome (success, failure, signal, no_status, lost, abandoned).",
    );
}

/// The russh version this crate is built on, re-exported for key types
/// (`russh::keys::PrivateKey`, ...).
#[cfg(feature = "russh")]
pub use russh;
