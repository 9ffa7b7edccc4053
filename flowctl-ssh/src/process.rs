//! A remote process, the same for every backend: stdin as a [`Sink`],
//! stdout and stderr as [`Source`]s, and its exit status.
//!
//! # The backend interface
//!
//! A backend does not implement a trait for the user-facing types: it
//! feeds them. [`plumbing`] builds a [`RemoteProcess`] together with its
//! task side, [`Plumbing`]: the sending ends of the stdout and stderr pipes,
//! the receiving end of the stdin pipe, the exit-status and done channels,
//! the loss flags and the cancel signal (which fires once every user-facing
//! part is dropped). The backend then spawns its own tasks on that side:
//!
//! - a reader that moves the channel's output into `out` / `err` with
//!   [`room`] (wait until a pipe is at or below its low watermark, *before*
//!   taking more from the connection: that wait is the backpressure) and
//!   [`deliver`], and ends with an [`Outcome`];
//! - the stdin task, [`write_stdin`], shared by both backends, which drives
//!   a [`StdinWriter`] (the one trait of this interface: a russh channel's
//!   write half, or the stdin pipe of the OpenSSH mux client).
//!
//! We chose this over a trait with one method per channel operation
//! because the two backends' read loops have nothing in common beyond the
//! pipes (one russh message queue for both streams against two OS pipes
//! read separately and a child to wait for), so only the pipes, the bounds
//! and the stdin writer are shared. This module names no backend: it never
//! imports `session`, `backend` or russh; the backends import it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::stage::{Stage, StageCounter, Writability};
use flowctl_core::{FlowError, FlowStats, PipeBuilder, PipeSink, PipeSource, SendError};
use futures::task::AtomicWaker;
use tokio::sync::watch;

use crate::config::{ExecOptions, SshConfig};
use crate::error::SshError;

/// How a remote process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitStatus {
    /// It exited with this code. A shell reports a command that does not
    /// exist as code 127 (and one that is not executable as 126): SSH has no
    /// separate "not found" answer.
    Code(u32),
    /// It was killed by a signal.
    Signal {
        /// The signal's name without `SIG` (`KILL`, `TERM`, ...).
        name: String,
        /// Whether it dumped core.
        core_dumped: bool,
        /// The server's message, often empty.
        message: String,
    },
}

impl ExitStatus {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Code(0))
    }

    /// The exit code, if it exited normally.
    pub fn code(&self) -> Option<u32> {
        match self {
            ExitStatus::Code(c) => Some(*c),
            ExitStatus::Signal { .. } => None,
        }
    }

    /// The signal's name, if it was killed by one.
    pub fn signal(&self) -> Option<&str> {
        match self {
            ExitStatus::Signal { name, .. } => Some(name),
            ExitStatus::Code(_) => None,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal { name, .. } => write!(f, "killed by signal {name}"),
        }
    }
}

/// The end of a channel as seen by the reader task.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Exited(ExitStatus),
    /// The channel closed without exit-status/exit-signal. Only the russh
    /// backend sees the channel itself; the openssh backend's mux client
    /// always exits with a code.
    #[cfg_attr(not(feature = "russh"), allow(dead_code))]
    NoStatus {
        stdout: u64,
    },
    /// The connection went away before the channel closed.
    Lost,
}

/// Set once every user-facing part is gone: the tasks end, the channel closes.
///
/// `_session` keeps the connection (of either backend) up while any part lives.
struct Guard {
    _cancel: watch::Sender<()>,
    _session: Arc<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guard")
    }
}

/// How an output stream ended early, set by the reader task before it ends
/// the stream's pipe (so the [`Output`] that sees the end sees the flag).
#[derive(Debug, Default)]
pub(crate) struct StreamFlags {
    /// The connection ended before the stream did.
    pub(crate) lost: AtomicBool,
    /// Under [`Overflow::Fail`](flowctl_core::Overflow::Fail): the refused
    /// chunk's `(buffered, charge, high)`.
    overflowed: OnceLock<(usize, usize, usize)>,
}

#[derive(Debug, Default)]
pub(crate) struct Flags {
    pub(crate) stdout: StreamFlags,
    pub(crate) stderr: StreamFlags,
}

impl Flags {
    /// Marks both streams lost (the connection ended first).
    pub(crate) fn lost(&self) {
        self.stdout.lost.store(true, Ordering::Release);
        self.stderr.lost.store(true, Ordering::Release);
    }
}

/// The metrics of one process that are not a buffer's: channel opens and
/// how processes ended, labelled with the base stage name. The handles are
/// registered when the process starts (with the recorder installed then),
/// every outcome at zero.
#[derive(Debug, Clone)]
pub(crate) struct ProcMetrics {
    #[cfg(feature = "metrics")]
    exits: [metrics::Counter; OUTCOMES.len()],
}

/// The `outcome` label values of `flowctl_ssh_exits_total`.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
const OUTCOMES: [&str; 6] = [
    "success",
    "failure",
    "signal",
    "no_status",
    "lost",
    "abandoned",
];

impl ProcMetrics {
    fn new(base: &str) -> Self {
        #[cfg(feature = "metrics")]
        {
            metrics::counter!("flowctl_ssh_channels_opened_total", "stage" => base.to_owned())
                .increment(1);
            ProcMetrics {
                exits: OUTCOMES.map(|outcome| {
                    metrics::counter!(
                        "flowctl_ssh_exits_total",
                        "stage" => base.to_owned(),
                        "outcome" => outcome
                    )
                }),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = base;
            ProcMetrics {}
        }
    }

    /// Counts one end of the process (index into [`OUTCOMES`]).
    fn ended(&self, outcome: usize) {
        #[cfg(feature = "metrics")]
        self.exits[outcome].increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = outcome;
    }
}

/// The sending end of the exit status: also counts how the process ended.
#[derive(Debug)]
pub(crate) struct ExitTx {
    tx: watch::Sender<Option<Outcome>>,
    metrics: ProcMetrics,
}

impl ExitTx {
    /// Publishes how the process ended.
    pub(crate) fn send(&self, outcome: Outcome) {
        let index = match &outcome {
            Outcome::Exited(ExitStatus::Code(0)) => 0,
            Outcome::Exited(ExitStatus::Code(_)) => 1,
            Outcome::Exited(ExitStatus::Signal { .. }) => 2,
            Outcome::NoStatus { .. } => 3,
            Outcome::Lost => 4,
        };
        self.metrics.ended(index);
        let _ = self.tx.send(Some(outcome));
    }

    /// Counts a process given up because every user-facing part was dropped
    /// (nobody waits for its status).
    pub(crate) fn abandoned(&self) {
        self.metrics.ended(5);
    }
}

/// The task side of a [`RemoteProcess`]: what a backend's tasks feed.
pub(crate) struct Plumbing {
    /// The base of the stage names (`ssh.<host>.<channel>` or the option's).
    pub(crate) name: String,
    pub(crate) out: PipeSink<Bytes>,
    pub(crate) err: PipeSink<Bytes>,
    pub(crate) stdin: PipeSource<Bytes>,
    pub(crate) flags: Arc<Flags>,
    pub(crate) exit: ExitTx,
    pub(crate) done: watch::Sender<bool>,
    pub(crate) done_rx: watch::Receiver<bool>,
    pub(crate) progress: ProgressTx,
    /// Changes (with an error) once every user-facing part is dropped.
    pub(crate) cancel: watch::Receiver<()>,
}

/// Builds the user-facing parts and the task side, for any backend:
/// stages `<base>.stdout`, `<base>.stderr` (under `options.overflow`) and
/// `<base>.stdin` (always blocking), where `base` is
/// [`ExecOptions::name`] or `ssh.<host>.<channel>`.
pub(crate) fn plumbing(
    config: &SshConfig,
    options: &ExecOptions,
    channel: impl std::fmt::Display,
    session: Arc<dyn std::any::Any + Send + Sync>,
) -> (Plumbing, RemoteProcess) {
    let wm = config.watermarks;
    let base = options.base_name(config, channel);
    let out_stage = Stage::new(format!("{base}.stdout"));
    let err_stage = Stage::new(format!("{base}.stderr"));
    let in_stage = Stage::new(format!("{base}.stdin"));
    let (out_tx, out_rx) = PipeBuilder::new(wm)
        .stage(out_stage.clone())
        .overflow(options.overflow)
        .build::<Bytes>();
    let (err_tx, err_rx) = PipeBuilder::new(wm)
        .stage(err_stage.clone())
        .overflow(options.overflow)
        .build::<Bytes>();
    let (in_tx, in_rx) = PipeBuilder::new(wm)
        .stage(in_stage.clone())
        .build::<Bytes>();
    let metrics = ProcMetrics::new(&base);
    let (cancel_tx, cancel_rx) = watch::channel(());
    let (exit_tx, exit_rx) = watch::channel(None);
    let (done_tx, done_rx) = watch::channel(false);
    let progress = Arc::new(StdinProgress::new(
        in_stage.counter("flowctl_ssh_window_waits_total"),
    ));
    let flags = Arc::new(Flags::default());
    let guard = Arc::new(Guard {
        _cancel: cancel_tx,
        _session: session,
    });
    let proc = RemoteProcess {
        stdin: Stdin {
            tx: in_tx,
            stage: in_stage,
            progress: progress.clone(),
            _guard: guard.clone(),
        },
        stdout: Output {
            rx: out_rx,
            stage: out_stage,
            stream: "stdout",
            flags: flags.clone(),
            delivered: 0,
            _guard: guard.clone(),
        },
        stderr: Output {
            rx: err_rx,
            stage: err_stage,
            stream: "stderr",
            flags: flags.clone(),
            delivered: 0,
            _guard: guard.clone(),
        },
        exit: Exit {
            rx: exit_rx,
            _guard: guard,
        },
    };
    let plumbing = Plumbing {
        name: base,
        out: out_tx,
        err: err_tx,
        stdin: in_rx,
        flags,
        exit: ExitTx {
            tx: exit_tx,
            metrics,
        },
        done: done_tx,
        done_rx,
        progress: ProgressTx(progress),
        cancel: cancel_rx,
    };
    (plumbing, proc)
}

/// A process started by [`Session::exec`](crate::Session::exec).
///
/// Use the fields directly or move them out (they are independent): feed
/// [`stdin`](RemoteProcess::stdin), drain [`stdout`](RemoteProcess::stdout)
/// and [`stderr`](RemoteProcess::stderr), then [`wait`](RemoteProcess::wait).
///
/// # Backpressure
/// With [`Backend::OpenSsh`](crate::Backend::OpenSsh), stdout and stderr
/// are paused separately and only this channel's window stops (see the crate
/// docs). With russh:
/// stdout and stderr each buffer at most their high watermark plus one SSH
/// packet; while either is above its high watermark, nothing more is taken
/// from russh's channel queue, the queue fills (a few packets), and russh's
/// session loop stops reading the socket, so TCP carries the pause to the
/// server. A consumer must therefore drain both streams, or drop the one it
/// does not want (a dropped stream is discarded, never buffered). All of
/// this is under the default [`Overflow::Block`](flowctl_core::Overflow::Block);
/// with another policy ([`ExecOptions::overflow`]) stdout and stderr never
/// stop the channel (see [`Output`], "Overflow").
///
/// # Drop
/// Dropping every part (stdin, stdout, stderr, exit) ends this process's
/// tasks and gives the channel up: with russh, a `signal KILL` request
/// (OpenSSH's sshd signals the command's process group; it refuses for
/// root sessions), EOF, and CHANNEL_CLOSE; with the openssh backend, the
/// local mux client is killed and the master closes the channel. The remote command gets EOF on stdin when
/// `stdin` is closed or dropped.
#[derive(Debug)]
pub struct RemoteProcess {
    /// The remote process's stdin. Close it (or drop it) to send EOF.
    pub stdin: Stdin,
    /// The remote process's stdout.
    pub stdout: Output,
    /// The remote process's stderr.
    pub stderr: Output,
    /// The exit status, once the process has ended.
    pub exit: Exit,
}

impl RemoteProcess {
    /// Waits for the process to end. Drain or drop stdout and stderr first
    /// (or concurrently): a full output buffer stops the channel.
    ///
    /// # Errors
    /// Those of [`Exit::wait`].
    pub async fn wait(&mut self) -> Result<ExitStatus, FlowError> {
        self.exit.wait().await
    }

    /// The parts, to move into different tasks.
    pub fn split(self) -> (Stdin, Output, Output, Exit) {
        (self.stdin, self.stdout, self.stderr, self.exit)
    }
}

/// The span of a remote process's tasks. The command line may carry
/// secrets: only its length is recorded unless
/// [`SshConfig::log_commands`] is set.
pub(crate) fn exec_span(
    command: &str,
    config: &SshConfig,
    backend: &'static str,
    stage: &str,
) -> tracing::Span {
    if config.log_commands {
        tracing::debug_span!("flowctl.ssh.exec", backend, stage, command_len = command.len(), command = %command)
    } else {
        tracing::debug_span!(
            "flowctl.ssh.exec",
            backend,
            stage,
            command_len = command.len()
        )
    }
}

/// Waits until `pipe` has room; a pipe whose source was dropped is marked
/// closed and its data is discarded from then on. Under an overflow policy
/// other than `Block` this never waits: the reader keeps reading and
/// [`deliver`] applies the policy.
pub(crate) async fn room(pipe: &mut PipeSink<Bytes>, open: &mut bool) {
    if *open && pipe.ready().await.is_err() {
        *open = false;
    }
}

/// Hands `data` to the stream's pipe, which applies its overflow policy
/// (`DropNewest`/`DropOldest` drop and count). A chunk refused under
/// `Overflow::Fail` ends the stream: the refusal is recorded in `flags`,
/// then the pipe is closed, so the consumer gets what was accepted and then
/// [`SshError::OutputOverflow`]. From then on, as after the consumer dropped
/// the stream, its data is read and discarded.
pub(crate) fn deliver(
    pipe: &mut PipeSink<Bytes>,
    open: &mut bool,
    data: Bytes,
    flags: &StreamFlags,
) {
    if !*open {
        return;
    }
    if let Err(e) = pipe.start_send(data) {
        *open = false;
        if let FlowError::Overflow {
            buffered,
            charge,
            high,
        } = *e.error()
        {
            let _ = flags.overflowed.set((buffered, charge, high));
            // Not a warn: the consumer gets it as SshError::OutputOverflow.
            tracing::debug!(
                buffered,
                charge,
                high,
                "output overflowed under Overflow::Fail: the stream ends, the rest is discarded"
            );
            pipe.close_now();
        }
    }
}

/// What the stdin task has done, read by [`Stdin::poll_flush`] and
/// [`Stdin::poll_close`] without a future: atomics and the waker of the one
/// [`Stdin`] (it is not `Clone`, so one waker suffices).
#[derive(Debug)]
pub(crate) struct StdinProgress {
    /// Bytes handed to the connection (russh, or the ssh client's pipe).
    written: AtomicU64,
    /// The writer has stopped: EOF sent, or the channel is gone.
    finished: AtomicBool,
    /// EOF was sent (set before `finished`).
    eof: AtomicBool,
    /// Chunks that could not be handed over at once (see [`Stdin::window_waits`]).
    window_waits: AtomicU64,
    window_waits_metric: StageCounter,
    waker: AtomicWaker,
}

impl StdinProgress {
    fn new(window_waits_metric: StageCounter) -> Self {
        StdinProgress {
            written: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            eof: AtomicBool::new(false),
            window_waits: AtomicU64::new(0),
            window_waits_metric,
            waker: AtomicWaker::new(),
        }
    }
}

/// The stdin task's side of [`StdinProgress`]. Dropping it (the task ended,
/// or was dropped before it ran) marks the writer finished, so a waiting
/// `flush`/`close` never hangs.
#[derive(Debug)]
pub(crate) struct ProgressTx(Arc<StdinProgress>);

impl ProgressTx {
    fn written(&self, len: u64) {
        self.0.written.fetch_add(len, Ordering::Release);
        self.0.waker.wake();
    }

    fn window_wait(&self) {
        self.0.window_waits.fetch_add(1, Ordering::Relaxed);
        self.0.window_waits_metric.increment(1);
    }

    fn eof(&self, eof: bool) {
        self.0.eof.store(eof, Ordering::Release);
        self.0.waker.wake();
    }
}

impl Drop for ProgressTx {
    fn drop(&mut self) {
        self.0.finished.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

/// Where a backend's stdin task writes: a russh channel, or the pipe into
/// the `ssh` client of the OpenSSH backend.
pub(crate) trait StdinWriter: Send {
    /// Hands one chunk over, waiting for room (the peer's window or the pipe).
    /// A write that is not ready at its first poll is counted as a window
    /// wait.
    fn write(&mut self, chunk: Bytes) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Sends EOF; `true` if it went out.
    fn eof(self) -> impl Future<Output = bool> + Send;
}

/// The stdin writer of both backends: hands each chunk to `writer`, which
/// waits for room, so at most high watermark + one chunk is held here. Ends
/// (sending EOF) when the pipe is closed, and stops without EOF when the
/// process is done or the session is cancelled.
pub(crate) async fn write_stdin<W: StdinWriter>(
    writer: Option<W>,
    mut rx: PipeSource<Bytes>,
    progress: ProgressTx,
    mut done: watch::Receiver<bool>,
    mut cancel: watch::Receiver<()>,
) {
    if let Some(mut w) = writer {
        loop {
            let item = tokio::select! {
                _ = cancel.changed() => break,
                _ = done.wait_for(|d| *d) => break,
                item = rx.recv() => item,
            };
            match item {
                Ok(Some(chunk)) => {
                    let len = chunk.len() as u64;
                    let sent = tokio::select! {
                        _ = cancel.changed() => break,
                        _ = done.wait_for(|d| *d) => break,
                        r = counting_waits(w.write(chunk), &progress) => r,
                    };
                    if let Err(e) = sent {
                        tracing::debug!(error = %e, "stdin write failed");
                        break;
                    }
                    progress.written(len);
                }
                Ok(None) | Err(_) => {
                    let eof = w.eof().await;
                    progress.eof(eof);
                    break;
                }
            }
        }
    }
    drop(progress);
}

/// Polls `write`; counts one window wait if it is not ready at once.
///
/// The write runs outside tokio's coop budget, so that `Pending` means it
/// waits for the connection (the window, or the pipe of the `ssh` client),
/// not that the task's budget ran out; the loop around it still yields, as
/// the pipe it reads consumes the budget.
async fn counting_waits<F: Future>(write: F, progress: &ProgressTx) -> F::Output {
    let mut write = std::pin::pin!(tokio::task::coop::unconstrained(write));
    let mut first = true;
    std::future::poll_fn(|cx| {
        let poll = write.as_mut().poll(cx);
        if first && poll.is_pending() {
            progress.window_wait();
        }
        first = false;
        poll
    })
    .await
}

/// The remote process's stdin: a bounded [`Sink`] of `Bytes`.
///
/// Chunks wait in a pipe bounded by the session's watermarks and are written
/// by a task as fast as the server's SSH window allows; `poll_ready` is
/// pending while more than `high` bytes wait. `poll_flush` is ready once
/// every accepted byte has been handed to the connection; `poll_close`
/// flushes and sends EOF. Dropping stdin also sends EOF.
///
/// Its stage is `ssh.<host>.<channel>.stdin` (or `<name>.stdin`, see
/// [`ExecOptions`]); [`writability`](Sink::writability) is always `Some`
/// and reports the pipe's pause and resume edges, so an application can
/// shed load before a send would wait; [`window_waits`](Stdin::window_waits)
/// counts the chunks that waited for the remote's window.
///
/// # Overflow
/// stdin always blocks ([`Overflow::Block`](flowctl_core::Overflow::Block)):
/// it carries one byte stream into a command, where a dropped chunk would
/// silently corrupt the input (a `tar x`, a `psql` script) and a failed one
/// would leave it cut at an arbitrary byte. Its producer is local and can
/// wait; an application that prefers to drop decides what is safe to drop
/// itself, watching [`writability`](Sink::writability).
///
/// # Errors
/// `start_send` gives the chunk back ([`SendError`]) after `poll_close`, or
/// once the stdin task has stopped taking chunks (the channel is gone).
/// `poll_flush` fails with [`FlowError::Closed`] if the writer stopped before
/// it wrote everything accepted (the process ended or the connection was
/// lost); `poll_close` fails with [`FlowError::Closed`] if EOF could not be
/// sent. After an error every later call fails too; after a successful
/// `poll_close`, `poll_close` and `poll_flush` return `Ready(Ok(()))`.
#[derive(Debug)]
pub struct Stdin {
    tx: PipeSink<Bytes>,
    stage: Stage,
    progress: Arc<StdinProgress>,
    _guard: Arc<Guard>,
}

impl Stdin {
    /// The stage name of this stdin: `ssh.<host>.<channel>.stdin`, or
    /// `<name>.stdin` with [`ExecOptions::name`].
    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// How many chunks the writer could not hand to the connection at once
    /// and waited for: the remote's SSH window was used up (with the
    /// openssh backend: the `ssh` client's stdin pipe was full, which the
    /// master empties only as the window allows). Also the metric
    /// `flowctl_ssh_window_waits_total`.
    pub fn window_waits(&self) -> u64 {
        self.progress.window_waits.load(Ordering::Relaxed)
    }

    /// `Ready(true)` once `done(progress)` holds, `Ready(false)` once the
    /// writer has finished without it. Registers the waker before the check,
    /// so no update between the two is missed.
    fn poll_progress(
        &self,
        cx: &mut Context<'_>,
        done: impl Fn(&StdinProgress) -> bool,
    ) -> Poll<bool> {
        let p = &*self.progress;
        if done(p) {
            return Poll::Ready(true);
        }
        p.waker.register(cx.waker());
        // `finished` is loaded before the condition is re-checked: the writer
        // updates the condition before it finishes.
        let finished = p.finished.load(Ordering::Acquire);
        if done(p) {
            Poll::Ready(true)
        } else if finished {
            Poll::Ready(false)
        } else {
            Poll::Pending
        }
    }
}

impl Sink for Stdin {
    type Item = Bytes;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        self.tx.poll_ready(cx)
    }

    fn start_send(&mut self, item: Bytes) -> Result<(), SendError<Bytes>> {
        self.tx.start_send(item)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let accepted = self.tx.stats().bytes;
        let written_all = |p: &StdinProgress| p.written.load(Ordering::Acquire) >= accepted;
        let written = std::task::ready!(self.poll_progress(cx, written_all));
        Poll::Ready(if written {
            Ok(())
        } else {
            Err(FlowError::Closed)
        })
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if self.progress.eof.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        if !self.tx.is_closed() {
            std::task::ready!(self.poll_flush(cx))?;
            // The writer sees the end of the pipe, sends EOF and finishes.
            self.tx.close_now();
        }
        let finished =
            std::task::ready!(self.poll_progress(cx, |p| p.finished.load(Ordering::Acquire)));
        debug_assert!(
            finished,
            "poll_progress on `finished` is ready only once it is set"
        );
        Poll::Ready(if self.progress.eof.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(FlowError::Closed)
        })
    }

    fn stats(&self) -> FlowStats {
        self.tx.stats()
    }

    /// Always `Some`: the paused/resumed edges of the stdin buffer.
    fn writability(&self) -> Option<Writability> {
        self.tx.writability()
    }
}

/// The remote process's stdout or stderr: a fair, bounded [`Source`] of
/// `Bytes` (one SSH packet per item, at most
/// [`SshConfig::max_packet`](crate::SshConfig::max_packet) bytes).
///
/// Its stage is `ssh.<host>.<channel>.stdout` (or `.stderr`; `<name>.stdout`
/// with [`ExecOptions::name`]).
///
/// # Overflow
/// [`ExecOptions::overflow`] chooses what a chunk that finds the buffer
/// full does (both streams of a process get the same policy):
///
/// - [`Overflow::Block`](flowctl_core::Overflow::Block) (default): nothing
///   is lost; the reader stops taking output, which stops the remote
///   command (see [`RemoteProcess`], "Backpressure").
///   `stats().max_buffered` is at most the high watermark plus one packet.
/// - [`Overflow::DropOldest`](flowctl_core::Overflow::DropOldest) /
///   [`Overflow::DropNewest`](flowctl_core::Overflow::DropNewest): the
///   reader never waits for the consumer, so the remote command is never
///   stalled by it (the window keeps being returned: russh returns it on
///   receipt, and the openssh master as we read its pipe); the oldest
///   buffered chunks, or the new chunk, are dropped and counted in
///   `stats().dropped` and `flowctl_dropped_total`. What is delivered are
///   whole chunks in their order; under `DropOldest` the newest run of
///   chunks, ending with the end of the stream. The buffer holds at most
///   `max(high, one packet)`. Under `DropOldest` every chunk read enters the
///   buffer: `stats().bytes` is every byte of the stream, and chunks
///   delivered + `stats().dropped` = `stats().items`.
/// - [`Overflow::Fail`](flowctl_core::Overflow::Fail): the first chunk that
///   does not fit ends the stream. The consumer gets every chunk accepted
///   before it (a prefix of the stream), then [`SshError::OutputOverflow`];
///   the rest of the stream is read and discarded, so the command runs to
///   its end and its exit status arrives. It is not counted as dropped.
///
/// # Errors
/// [`SshError::ConnectionLost`] (inside [`FlowError::Transport`]) if the
/// connection ended before the stream did; it says how many bytes of the
/// stream were delivered. [`SshError::OutputOverflow`] under
/// `Overflow::Fail`, as above.
#[derive(Debug)]
pub struct Output {
    rx: PipeSource<Bytes>,
    stage: Stage,
    stream: &'static str,
    flags: Arc<Flags>,
    delivered: u64,
    _guard: Arc<Guard>,
}

impl Output {
    /// Bytes of this stream handed to the consumer so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The stage name of this stream: `ssh.<host>.<channel>.stdout` (or
    /// `.stderr`), or `<name>.stdout` with [`ExecOptions::name`].
    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    fn flags(&self) -> &StreamFlags {
        if self.stream == "stdout" {
            &self.flags.stdout
        } else {
            &self.flags.stderr
        }
    }

    /// Reads the whole stream into memory (for small outputs only: this is
    /// unbounded by design).
    pub async fn read_to_end(&mut self) -> Result<Vec<u8>, FlowError> {
        let mut all = Vec::new();
        while let Some(chunk) = self.recv().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }

    /// The end of the stream: an error if it overflowed under
    /// `Overflow::Fail` or the connection ended first.
    fn end(&self) -> Result<(), FlowError> {
        let flags = self.flags();
        if let Some(&(buffered, charge, high)) = flags.overflowed.get() {
            return Err(SshError::OutputOverflow {
                stage: self.stage.name().to_owned(),
                buffered,
                charge,
                high,
                delivered: self.delivered,
            }
            .into());
        }
        if flags.lost.load(Ordering::Acquire) {
            Err(SshError::ConnectionLost {
                stream: self.stream,
                delivered: self.delivered,
            }
            .into())
        } else {
            Ok(())
        }
    }
}

/// Fair and cancel-safe as the pipe it reads (`poll_recv_many` takes a batch
/// under one lock). After the end of the stream, every call returns the end
/// again: `Ok(None)`, or the same [`SshError::ConnectionLost`].
impl Source for Output {
    type Item = Bytes;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, FlowError>> {
        match std::task::ready!(self.rx.poll_recv(cx))? {
            Some(chunk) => {
                self.delivered += chunk.len() as u64;
                Poll::Ready(Ok(Some(chunk)))
            }
            None => Poll::Ready(self.end().map(|()| None)),
        }
    }

    fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<Bytes>,
        max: usize,
    ) -> Poll<Result<usize, FlowError>> {
        if max == 0 {
            return Poll::Ready(Ok(0));
        }
        let start = buf.len();
        let res = std::task::ready!(self.rx.poll_recv_many(cx, buf, max));
        self.delivered += buf[start..].iter().map(|c| c.len() as u64).sum::<u64>();
        match res? {
            0 => Poll::Ready(self.end().map(|()| 0)),
            n => Poll::Ready(Ok(n)),
        }
    }

    fn stats(&self) -> FlowStats {
        self.rx.stats()
    }
}

/// Waits for the exit status of a [`RemoteProcess`].
#[derive(Debug)]
pub struct Exit {
    rx: watch::Receiver<Option<Outcome>>,
    _guard: Arc<Guard>,
}

impl Exit {
    /// Waits until the channel has closed and returns how the process ended.
    ///
    /// # Errors
    /// A [`FlowError::Transport`] holding an [`SshError`] (read it with
    /// `err.transport_error::<SshError>()`): [`SshError::ConnectionLost`] if
    /// the connection ended first; [`SshError::NoExitStatus`] if the server
    /// closed the channel without reporting a status.
    pub async fn wait(&mut self) -> Result<ExitStatus, FlowError> {
        Ok(self.wait_typed().await?)
    }

    /// [`wait`](Exit::wait) with the typed error.
    async fn wait_typed(&mut self) -> Result<ExitStatus, SshError> {
        let outcome = self
            .rx
            .wait_for(Option::is_some)
            .await
            .map(|o| o.clone())
            .map_err(|_| SshError::ConnectionLost {
                stream: "exit status",
                delivered: 0,
            })?;
        match outcome {
            Some(Outcome::Exited(s)) => Ok(s),
            Some(Outcome::NoStatus { stdout }) => Err(SshError::NoExitStatus { stdout }),
            Some(Outcome::Lost) | None => Err(SshError::ConnectionLost {
                stream: "exit status",
                delivered: 0,
            }),
        }
    }
}
