//! `ssh`: messages make a round trip through remote commands on the embedded
//! SSH server (flowctl-ssh's in-process russh server on 127.0.0.1, with a
//! throwaway host key and client key; no OpenSSH needed), then through the
//! framing, the ordered offload and the checker into a local child process:
//!
//! ```text
//! producer task: check::encode -> length-delimited frames -> Stdin of remote `cat > FIFO`
//!   -> FIFO -> remote `cat FIFO` (the generator) -> stdout Output
//!   -> frame::Framed(LengthDelimitedCodec) -> offload::ordered(checksum + hashing, blocking pool)
//!   -> checker (stalls) -> pump -> io::WriterSink -> local `cat > /dev/null` (SIGSTOPped now and then)
//! ```
//!
//! The two remote commands run on two connections: a single `cat` through
//! one channel deadlocks on the embedded server (see [`Remote`]). stdin is
//! fed and stdout drained from different tasks, as flowctl-ssh asks.
//!
//! # Faults (seeded)
//!
//! - **Consumer stalls**: the verifying consumer stops reading for 20-300 ms
//!   (and has slow phases), so the offload, the framing, the stdout buffer,
//!   russh's window and finally the producer must pause, not buffer.
//! - **Child stalls**: the local child is stopped (`kill -STOP`) for
//!   20-300 ms, so its pipe fills and the [`WriterSink`] must pause.
//! - **Connection drops**: [`EmbeddedServer::drop_connections`] cuts the
//!   server side of the live connection mid-stream (at least once per run,
//!   about every 5 s). The scenario then reconnects and continues with a NEW
//!   producer id, whose sequence starts again at 0.
//!
//! # Accounting of a dropped connection
//!
//! SSH gives no redelivery: what was in flight when a connection is cut (in
//! the stdin pipe, russh, the sockets, the remote commands and their FIFO,
//! the stdout buffer, a partial frame, the offload) is gone. For a cut session the producer
//! reports how many messages its `Stdin` accepted; [`Checker::cut`] counts
//! as sent only those up to the last one received in order, and reports the
//! tail in `in_flight_lost` (JSON field, and a note in the table), which is
//! not a violation. A gap *before* that point is still `lost`: a cut ordered
//! stream loses a tail, never a message in the middle. A session that ends
//! with a lost connection when no drop was injected is a violation.
//!
//! # Invariants of its own
//!
//! Every stage is checked against its own bound (the runner checks only the
//! largest ratio, reported as `max_buffered`/`bound`): the stdin pipe
//! `high + one chunk`, the stdout buffer `high + 2 * max_packet` (as
//! flowctl-ssh documents), the framing buffer `one partial frame + one
//! packet`, the offload `max_inflight_bytes + one frame`, the child's
//! [`WriterSink`] `high + one message`. Every session is dropped and the
//! ledger's `ssh.*` kinds are awaited back to zero before the scenario
//! returns.

use std::collections::HashMap;
use std::hash::Hasher;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use flowctl_core::frame::Framed;
use flowctl_core::io::WriterSink;
use flowctl_core::lifecycle::Ledger;
use flowctl_core::offload::{Offload, ordered};
use flowctl_core::prelude::*;
use flowctl_ssh::server::{EmbeddedServer, LEDGER_SERVER_TASK, ServerConfig, generate_key};
use flowctl_ssh::testing::Sshd;
use flowctl_ssh::{
    Auth, ExitStatus, LEDGER_SESSION, LEDGER_TASK, RemoteProcess, Session, SshConfig, SshError,
    Stdin,
};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::codec::{Encoder, LengthDelimitedCodec};

use super::{Ctx, Faults, Outcome};
use crate::check::{Checker, Decoded, MIN_MESSAGE, decode, encode};
use crate::monitor::Progress;
use crate::opts::Inject;
use crate::watch::{Live, Recorded, Samplers, Watched};

/// Messages are MIN_MESSAGE..=MAX_MESSAGE bytes.
const MAX_MESSAGE: usize = 8192;
/// The length prefix of a frame.
pub(crate) const PREFIX: usize = 4;
/// The producer batches frames into stdin chunks of about this size.
pub(crate) const CHUNK: usize = 32 * 1024;
/// The largest chunk the producer hands to stdin.
const MAX_CHUNK: usize = max_chunk(MAX_MESSAGE);

/// The largest chunk [`produce`] hands to stdin with messages of at most
/// `max_message` bytes: it stops adding frames once it has [`CHUNK`] bytes.
pub(crate) const fn max_chunk(max_message: usize) -> usize {
    CHUNK - 1 + PREFIX + max_message
}
/// SSH packet size (client and server default).
pub(crate) const MAX_PACKET: usize = 32 * 1024;
/// Extra hashing rounds per frame in the offload, on top of the checksum.
const HASH_ROUNDS: u64 = 4;
/// The pipeline must drain this soon after the deadline.
const DRAIN_GRACE: Duration = Duration::from_secs(30);
/// Connections, tasks and ledger entries must be gone this soon after the end.
const RELEASE_GRACE: Duration = Duration::from_secs(15);
/// One connection drop per this much run time (at least one).
const DROP_EVERY: Duration = Duration::from_secs(5);

/// Every stage of the pipeline; one set for the whole run, since each
/// session rebuilds the stages but the bounds are the same.
#[derive(Debug)]
struct Stages {
    stdin: Arc<Watched>,
    stdout: Arc<Watched>,
    frame: Arc<Watched>,
    offload: Arc<Watched>,
    child: Arc<Watched>,
}

impl Stages {
    fn all(&self) -> [&Arc<Watched>; 5] {
        [
            &self.stdin,
            &self.stdout,
            &self.frame,
            &self.offload,
            &self.child,
        ]
    }
}

/// A frame after the offload: the message, what it says about itself if its
/// checksum holds, and the extra hashing's digest.
pub(crate) struct Verified {
    pub(crate) msg: Bytes,
    pub(crate) decoded: Option<Decoded>,
    pub(crate) digest: u64,
}

/// The CPU-heavy per-frame work, on the blocking pool: the checksum and
/// [`HASH_ROUNDS`] rounds of SipHash over the whole frame.
pub(crate) fn verify(frame: BytesMut) -> Verified {
    let msg = frame.freeze();
    let decoded = decode(&msg);
    let mut digest = 0u64;
    for round in 0..HASH_ROUNDS {
        let mut h = std::hash::DefaultHasher::new();
        h.write_u64(digest ^ round);
        h.write(&msg);
        digest = h.finish();
    }
    Verified {
        msg,
        decoded,
        digest,
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// As fast as messages come.
    Fast,
    /// Pausing 1 ms every 16 messages.
    Slow,
    /// Not reading at all (a fault).
    Stalled,
}

/// The verifying consumer's state, kept across sessions.
#[derive(Debug)]
struct Consumer {
    checker: Checker,
    rng: fastrand::Rng,
    phase: Phase,
    phase_end: Instant,
    start: Instant,
    inject: Option<Inject>,
    progress: Arc<Progress>,
    faults: Arc<Faults>,
    received: u64,
    bytes: u64,
    /// The pause in progress (armed when `pausing`), reused for every pause.
    pause: Pin<Box<tokio::time::Sleep>>,
    pausing: bool,
}

impl Consumer {
    /// Slows down or stalls, on the seeded schedule: `Ready` when the next
    /// message may be taken. Decides once per message (a pause in progress
    /// is resumed, not decided again).
    fn poll_pace(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.pausing {
            let mut until = None;
            if Instant::now() >= self.phase_end {
                self.phase = match self.rng.u32(..10) {
                    0..=4 => Phase::Fast,
                    5..=7 => Phase::Slow,
                    _ => Phase::Stalled,
                };
                let len = match self.phase {
                    Phase::Stalled => self.rng.u64(20..300),
                    _ => self.rng.u64(50..500),
                };
                self.phase_end = Instant::now() + Duration::from_millis(len);
                if let Phase::Stalled = self.phase {
                    self.faults.stalls.fetch_add(1, Relaxed);
                    until = Some(self.phase_end);
                }
            }
            if until.is_none() && matches!(self.phase, Phase::Slow) && self.received % 16 == 15 {
                until = Some(Instant::now() + Duration::from_millis(1));
            }
            let Some(until) = until else {
                return Poll::Ready(());
            };
            self.pause.as_mut().reset(until);
            self.pausing = true;
        }
        std::task::ready!(self.pause.as_mut().poll(cx));
        self.pausing = false;
        Poll::Ready(())
    }
}

/// The checker as a source of the messages it passed, for [`pump`] into the
/// local child.
struct Verifier<'a, S> {
    src: S,
    state: &'a mut Consumer,
    /// The pace of the next message has been kept.
    paced: bool,
}

impl<S: Source<Item = Verified>> Source for Verifier<'_, S> {
    type Item = Bytes;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, FlowError>> {
        if !self.paced {
            std::task::ready!(self.state.poll_pace(cx));
            self.paced = true;
        }
        Poll::Ready(loop {
            let v = match std::task::ready!(self.src.poll_recv(cx)) {
                Ok(Some(v)) => v,
                Ok(None) => break Ok(None),
                Err(e) => break Err(e),
            };
            let st = &mut *self.state;
            st.received += 1;
            st.bytes += v.msg.len() as u64;
            std::hint::black_box(v.digest);
            st.progress.messages.store(st.received, Relaxed);
            st.progress.bytes.store(st.bytes, Relaxed);
            if st.inject == Some(Inject::DropOne) && st.received == 1000 {
                continue; // the deliberate bug: message 1000 vanishes
            }
            let now_us = st.start.elapsed().as_micros() as u64;
            st.checker.observe_decoded(v.decoded.as_ref(), now_us);
            self.paced = false;
            break Ok(Some(v.msg));
        })
    }

    fn stats(&self) -> FlowStats {
        self.src.stats()
    }
}

/// Feeds remote stdin with frames until the deadline, then closes it (EOF).
/// Returns how many messages stdin accepted, and how it ended.
/// Messages are `MIN_MESSAGE..=max_message` bytes; a chunk is at most
/// [`max_chunk`]`(max_message)` bytes.
pub(crate) async fn produce(
    mut stdin: Recorded<Stdin>,
    producer: u32,
    mut rng: fastrand::Rng,
    (start, deadline): (Instant, Instant),
    max_message: usize,
) -> (u64, Result<(), FlowError>) {
    let mut codec = LengthDelimitedCodec::new();
    let mut seq = 0u64;
    while Instant::now() < deadline {
        if let Err(e) = stdin.ready().await {
            return (seq, Err(e));
        }
        // Stamped after `ready`, so latency is the pipeline's, not our wait.
        let mut chunk = BytesMut::with_capacity(max_chunk(max_message));
        let mut n = 0;
        while chunk.len() < CHUNK {
            let len = rng.usize(MIN_MESSAGE..=max_message);
            let msg = encode(producer, seq + n, start.elapsed().as_micros() as u64, len);
            if let Err(e) = codec.encode(msg, &mut chunk) {
                return (seq, Err(FlowError::Io(e)));
            }
            n += 1;
        }
        if let Err(e) = stdin.start_send(chunk.freeze()) {
            return (seq, Err(e.into_error()));
        }
        seq += n;
    }
    (seq, stdin.close().await)
}

/// How a session ended.
enum End {
    /// The producer reached the deadline and everything it sent came back.
    Clean,
    /// The connection was cut (by an injected drop).
    Cut,
    /// Something failed that no fault explains.
    Failed(String),
}

/// The remote end of one session. One `cat` through a single channel would
/// be the obvious round trip, but it deadlocks on the embedded server once
/// 2 MiB (the client's window) are in flight: russh's server loop waits to
/// queue our stdin data while `cat` waits to write its stdout, which waits
/// for a WINDOW_ADJUST that the waiting loop never reads. A FIFO between two
/// commands on two connections ([`Session::exec_isolated`]) keeps the round
/// trip and gives each direction a session loop of its own.
pub(crate) struct Remote {
    pub(crate) session: Session,
    /// `cat FIFO`: the generator whose stdout we verify.
    pub(crate) reader: RemoteProcess,
    /// `cat > FIFO`: fed by our stdin, on a connection of its own.
    pub(crate) writer: RemoteProcess,
}

impl Remote {
    pub(crate) async fn open(config: &SshConfig, fifo: &std::path::Path) -> Result<Remote, String> {
        let fifo = fifo.display();
        let session = Session::connect(config.clone())
            .await
            .map_err(|e| e.to_string())?;
        let mut mkfifo = session
            .exec(&format!("mkfifo '{fifo}'"))
            .await
            .map_err(|e| e.to_string())?;
        match mkfifo.wait().await {
            Ok(status) if status.success() => {}
            Ok(status) => return Err(format!("mkfifo {fifo}: {status}")),
            Err(e) => return Err(format!("mkfifo {fifo}: {e}")),
        }
        drop(mkfifo);
        let reader = session
            .exec(&format!("exec cat '{fifo}'"))
            .await
            .map_err(|e| e.to_string())?;
        let writer = session
            .exec_isolated(&format!("exec cat > '{fifo}'"))
            .await
            .map_err(|e| e.to_string())?;
        Ok(Remote {
            session,
            reader,
            writer,
        })
    }
}

/// Why a remote command's end is a problem, if it is.
pub(crate) fn exit_problem(
    exit: Result<ExitStatus, FlowError>,
    cut_injected: bool,
) -> Option<String> {
    match exit {
        Ok(status) if status.success() => None,
        Ok(status) => Some(status.to_string()),
        // A drop after the stream's end can still take the exit status.
        Err(e) if cut_injected && is_connection_lost(&e) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// The pipeline's error when the connection under it was cut.
fn is_connection_lost(e: &FlowError) -> bool {
    matches!(
        e.transport_error::<SshError>(),
        Some(SshError::ConnectionLost { .. })
    )
}

/// The producer's error when the connection under its stdin was cut: the
/// stdin pipe closes once flowctl-ssh's writer task sees the channel gone.
fn is_stdin_cut(e: &FlowError) -> bool {
    matches!(e, FlowError::Closed) || is_connection_lost(e)
}

struct Run<'c, 'm> {
    ctx: &'c Ctx<'m>,
    config: SshConfig,
    /// Where the FIFOs are made (the embedded server shares our filesystem).
    dir: std::path::PathBuf,
    stages: Stages,
    samplers: Samplers,
    faults: Arc<Faults>,
    /// True while a session's stream runs: drops wait for it.
    streaming: watch::Sender<bool>,
    consumer: Consumer,
    /// The local child's stdin, shared by every session.
    sink: Recorded<WriterSink<tokio::process::ChildStdin>>,
    /// Messages each producer counts as sent (after [`Checker::cut`]).
    sent: HashMap<u32, u64>,
    violations: Vec<String>,
}

impl Run<'_, '_> {
    /// Connects and starts the remote end: a fresh FIFO, `cat FIFO` (the
    /// generator) on one connection and `cat > FIFO` (fed by our stdin) on
    /// another; retries when an injected drop cut the attempt.
    async fn open(&mut self, producer: u32) -> Result<Remote, String> {
        let mut tries = 0u32;
        loop {
            let drops = self.faults.drops.load(Relaxed);
            let fifo = self.dir.join(format!("fifo-{producer}-{tries}"));
            match Remote::open(&self.config, &fifo).await {
                Ok(remote) => return Ok(remote),
                // The drop hit the handshake: try again.
                Err(_) if self.faults.drops.load(Relaxed) > drops && tries < 5 => tries += 1,
                Err(e) => return Err(format!("ssh: cannot open session {producer}: {e}")),
            }
        }
    }

    /// One session: a new producer id, its messages through the whole
    /// pipeline, until the deadline or a cut.
    async fn session(&mut self, producer: u32) -> End {
        let drops_before = self.faults.drops.load(Relaxed);
        let remote = match self.open(producer).await {
            Ok(remote) => remote,
            Err(e) => return End::Failed(e),
        };
        // Dropped streams are discarded, never buffered: `cat` writes no
        // stderr, the writer no stdout, and the reader reads no stdin.
        let (stdin, writer_out, writer_err, mut writer_exit) = remote.writer.split();
        let (reader_in, stdout, reader_err, mut reader_exit) = remote.reader.split();
        drop((writer_out, writer_err, reader_in, reader_err));
        let ctx = self.ctx;
        let mut producing = tokio::spawn(produce(
            Recorded::new(stdin, &self.stages.stdin),
            producer,
            fastrand::Rng::with_seed(ctx.seed ^ (u64::from(producer) << 32) ^ 0x5353_4800),
            (ctx.start, ctx.deadline),
            MAX_MESSAGE,
        ));
        let decoder = LengthDelimitedCodec::builder()
            .max_frame_length(MAX_MESSAGE)
            .new_codec();
        let framed = Recorded::new(
            Framed::new(
                Live::new(stdout, &self.stages.stdout, &self.samplers),
                decoder,
            ),
            &self.stages.frame,
        );
        let verified = Recorded::new(
            ordered(framed, offload_limits(), verify),
            &self.stages.offload,
        );
        let mut verifier = Verifier {
            src: verified,
            state: &mut self.consumer,
            paced: false,
        };
        self.streaming.send_replace(true);
        let pumped = tokio::time::timeout_at(
            ctx.deadline + DRAIN_GRACE,
            pump(&mut verifier, &mut self.sink),
        )
        .await;
        self.streaming.send_replace(false);
        drop(verifier);
        if pumped.is_err() {
            producing.abort();
        }
        let produced = tokio::time::timeout(RELEASE_GRACE, &mut producing).await;
        if produced.is_err() {
            producing.abort();
            let _ = producing.await;
        }
        let cut_injected = self.faults.drops.load(Relaxed) > drops_before;
        let (sent, end) = match (pumped, produced) {
            (Err(_), _) => (
                0,
                End::Failed(format!(
                    "ssh: session {producer} did not drain within {DRAIN_GRACE:?} of the deadline"
                )),
            ),
            (_, Err(_)) => (
                0,
                End::Failed(format!(
                    "ssh: producer {producer} did not stop within {RELEASE_GRACE:?} of its stream's end"
                )),
            ),
            (_, Ok(Err(e))) => (
                0,
                End::Failed(format!("ssh: producer {producer} panicked: {e}")),
            ),
            (Ok(Ok(_)), Ok(Ok((sent, Ok(()))))) => {
                // Whatever the drop schedule did, the stream ended cleanly.
                let exits = tokio::time::timeout(RELEASE_GRACE, async {
                    (writer_exit.wait().await, reader_exit.wait().await)
                })
                .await;
                match exits {
                    Ok((w, r)) => match exit_problem(w, cut_injected)
                        .or_else(|| exit_problem(r, cut_injected))
                    {
                        None => (sent, End::Clean),
                        Some(why) => (
                            sent,
                            End::Failed(format!("ssh: remote cat of session {producer}: {why}")),
                        ),
                    },
                    Err(_) => (
                        sent,
                        End::Failed(format!("ssh: no exit status for session {producer}")),
                    ),
                }
            }
            (pumped, Ok(Ok((sent, produced)))) => {
                let pump_err = pumped.ok().and_then(Result::err);
                let lost = pump_err.as_ref().is_none_or(is_connection_lost)
                    && produced.as_ref().err().is_none_or(is_stdin_cut);
                if cut_injected && lost {
                    (sent, End::Cut)
                } else {
                    let unexplained = if cut_injected {
                        ""
                    } else {
                        " with no fault injected"
                    };
                    let why = pump_err
                        .map(|e| format!("pipeline: {e}"))
                        .into_iter()
                        .chain(produced.err().map(|e| format!("producer: {e}")))
                        .collect::<Vec<_>>()
                        .join("; ");
                    (
                        sent,
                        End::Failed(format!(
                            "ssh: session {producer} failed{unexplained}: {why}"
                        )),
                    )
                }
            }
        };
        let counted = match end {
            End::Cut => self.consumer.checker.cut(producer, sent),
            _ => sent,
        };
        self.sent.insert(producer, counted);
        drop((writer_exit, reader_exit, remote.session));
        end
    }
}

pub(crate) fn offload_limits() -> Offload {
    Offload {
        concurrency: 4,
        max_inflight_bytes: 512 * 1024,
    }
}

/// The seeded fault schedule of the connection and the local child.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Drop,
    ChildStall(Duration),
}

fn schedule(ctx: &Ctx<'_>) -> Vec<(Instant, Fault)> {
    let mut rng = fastrand::Rng::with_seed(ctx.seed ^ 0x4452_4f50);
    let total = ctx.deadline - ctx.start;
    let mut plan = Vec::new();
    let drops = (total.as_secs_f64() / DROP_EVERY.as_secs_f64())
        .floor()
        .max(1.0) as u32;
    let slot = total / drops;
    for i in 0..drops {
        // Somewhere in the middle of each slot: never in the first moments of
        // the run (the first session is up) nor at its very end.
        let at = slot * i + slot.mul_f64(0.25 + 0.5 * rng.f64());
        plan.push((ctx.start + at, Fault::Drop));
    }
    let mut t = Duration::from_millis(rng.u64(200..1000));
    while t < total {
        plan.push((
            ctx.start + t,
            Fault::ChildStall(Duration::from_millis(rng.u64(20..300))),
        ));
        t += Duration::from_millis(rng.u64(500..2000));
    }
    plan.sort_by_key(|(at, _)| *at);
    plan
}

/// Runs the fault schedule until it is over or `stop` fires; a stopped child
/// is always continued before this returns.
async fn inject(
    plan: Vec<(Instant, Fault)>,
    server: Arc<Server>,
    child: Option<u32>,
    faults: Arc<Faults>,
    mut streaming: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (at, fault) in plan {
        tokio::select! {
            () = tokio::time::sleep_until(at) => {}
            _ = stop.changed() => break,
        }
        match fault {
            Fault::Drop => {
                // Only under a live stream: a drop during a handshake would
                // test the retry, not the accounting of a cut stream.
                let live = tokio::select! {
                    r = streaming.wait_for(|s| *s) => r.is_ok(),
                    _ = stop.changed() => false,
                };
                if !live {
                    break;
                }
                faults.drops.fetch_add(1, Relaxed);
                server.drop_connections();
            }
            Fault::ChildStall(len) => {
                let Some(pid) = child else { continue };
                if let Err(e) = signal(pid, "-STOP").await {
                    problems.push(e);
                    continue;
                }
                faults.stalls.fetch_add(1, Relaxed);
                tokio::select! {
                    () = tokio::time::sleep(len) => {}
                    _ = stop.changed() => {}
                }
                if let Err(e) = signal(pid, "-CONT").await {
                    problems.push(e);
                    break;
                }
            }
        }
    }
    problems
}

async fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let status = tokio::process::Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("ssh: cannot run kill {sig} {pid}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("ssh: kill {sig} {pid} failed: {status}"))
    }
}

/// The SSH server a run talks to.
pub(crate) enum Server {
    /// flowctl-ssh's in-process russh server (the default).
    Embedded(EmbeddedServer),
    /// OpenSSH's sshd on a free loopback port (`--sshd`).
    Sshd(Sshd),
}

impl Server {
    /// Cuts every live connection from the server side.
    fn drop_connections(&self) {
        match self {
            Server::Embedded(s) => s.drop_connections(),
            Server::Sshd(s) => {
                s.drop_connections();
            }
        }
    }
}

/// Starts OpenSSH's sshd with a throwaway host key, and a client
/// configuration (as the current user) with a throwaway key that trusts
/// exactly that server.
fn sshd(dir: &std::path::Path, watermarks: Watermarks) -> Result<(Sshd, SshConfig), String> {
    let key_path = dir.join("id_ed25519");
    flowctl_ssh::testing::ssh_keygen(&key_path).map_err(|e| format!("ssh: {e}"))?;
    let server = Sshd::start(dir, &key_path, "").map_err(|e| format!("ssh: {e}"))?;
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("{}\n", server.known_hosts_line()))
        .map_err(|e| format!("ssh: cannot write {}: {e}", known_hosts.display()))?;
    let user = flowctl_ssh::testing::current_user().map_err(|e| format!("ssh: {e}"))?;
    let config = client_config(
        SshConfig::new(user, server.addr()),
        &key_path,
        &known_hosts,
        watermarks,
    );
    Ok((server, config))
}

/// The client knobs both servers get.
fn client_config(
    config: SshConfig,
    key: &std::path::Path,
    known_hosts: &std::path::Path,
    watermarks: Watermarks,
) -> SshConfig {
    config
        .auth(Auth::key_file(key))
        .known_hosts(known_hosts)
        .watermarks(watermarks)
        .channel_buffer(2)
        .connect_timeout(Duration::from_secs(10))
}

/// Starts the embedded server with a throwaway host key, and a client
/// configuration with a throwaway key that trusts exactly that server.
pub(crate) async fn embedded(
    dir: &std::path::Path,
    watermarks: Watermarks,
) -> Result<(EmbeddedServer, SshConfig), String> {
    let key = generate_key().map_err(|e| format!("ssh: {e}"))?;
    let key_path = dir.join("id_ed25519");
    let text = key
        .to_openssh(flowctl_ssh::russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| format!("ssh: cannot encode the client key: {e}"))?;
    std::fs::write(&key_path, text.as_bytes())
        .map_err(|e| format!("ssh: cannot write {}: {e}", key_path.display()))?;
    let server_config =
        ServerConfig::new(vec![key.public_key().clone()]).map_err(|e| format!("ssh: {e}"))?;
    let server = EmbeddedServer::start(server_config)
        .await
        .map_err(|e| format!("ssh: cannot start the embedded server: {e}"))?;
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("{}\n", server.known_hosts_line()))
        .map_err(|e| format!("ssh: cannot write {}: {e}", known_hosts.display()))?;
    let config = client_config(
        SshConfig::new("flowctl", server.addr().to_string()),
        &key_path,
        &known_hosts,
        watermarks,
    );
    Ok((server, config))
}

fn failed(violation: String) -> Outcome {
    Outcome {
        tally: Default::default(),
        bytes: 0,
        max_buffered: 0,
        bound: 0,
        faults: 0,
        latencies_us: Vec::new(),
        violations: vec![violation],
    }
}

/// The scenario on the embedded server (`ssh`) or on OpenSSH's sshd
/// (`ssh-sshd`, added by `--sshd`).
pub(crate) async fn run(ctx: &Ctx<'_>, openssh: bool) -> Outcome {
    let ssh_wm = Watermarks::new(64 * 1024, 256 * 1024).expect("valid watermarks");
    let child_wm = Watermarks::new(64 * 1024, 256 * 1024).expect("valid watermarks");
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => return failed(format!("ssh: cannot make a temporary directory: {e}")),
    };
    let started = if openssh {
        sshd(dir.path(), ssh_wm).map(|(s, c)| (Server::Sshd(s), c))
    } else {
        embedded(dir.path(), ssh_wm)
            .await
            .map(|(s, c)| (Server::Embedded(s), c))
    };
    let (server, config) = match started {
        Ok(pair) => pair,
        Err(e) => return failed(e),
    };
    let server = Arc::new(server);
    let mut child = match tokio::process::Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return failed(format!("ssh: cannot start the local child `cat`: {e}")),
    };
    let Some(child_stdin) = child.stdin.take() else {
        return failed("ssh: the local child has no stdin".into());
    };

    let stages = Stages {
        stdin: Watched::new("ssh stdin", ssh_wm.high() + MAX_CHUNK, "high + one chunk"),
        stdout: Watched::new(
            "ssh stdout",
            ssh_wm.high() + 2 * MAX_PACKET,
            "high + 2 * max_packet",
        ),
        frame: Watched::new(
            "frame",
            PREFIX + MAX_MESSAGE + MAX_PACKET,
            "one partial frame + one packet",
        ),
        offload: Watched::new(
            "offload",
            offload_limits().max_inflight_bytes + MAX_MESSAGE,
            "max_inflight_bytes + one frame",
        ),
        child: Watched::new(
            "child stdin",
            child_wm.high() + MAX_MESSAGE,
            "high + one message",
        ),
    };
    for stage in stages.all() {
        stage.probe(ctx.monitor);
    }
    let samplers: Samplers = Arc::default();
    let sampler = tokio::spawn(crate::watch::sample(samplers.clone()));

    let faults = Arc::new(Faults::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (streaming, streaming_rx) = watch::channel(false);
    let injector = tokio::spawn(inject(
        schedule(ctx),
        server.clone(),
        child.id(),
        faults.clone(),
        streaming_rx,
        stop_rx,
    ));

    let mut run = Run {
        ctx,
        config,
        dir: dir.path().to_path_buf(),
        samplers: samplers.clone(),
        faults: faults.clone(),
        streaming,
        consumer: Consumer {
            checker: Checker::default(),
            rng: fastrand::Rng::with_seed(ctx.seed),
            phase: Phase::Fast,
            phase_end: Instant::now(),
            start: ctx.start,
            inject: ctx.inject,
            progress: ctx.progress.clone(),
            faults: faults.clone(),
            received: 0,
            bytes: 0,
            pause: Box::pin(tokio::time::sleep(Duration::ZERO)),
            pausing: false,
        },
        sink: Recorded::new(WriterSink::new(child_stdin, child_wm), &stages.child),
        stages,
        sent: HashMap::new(),
        violations: Vec::new(),
    };
    let mut cuts = 0u64;
    let mut producer = 0u32;
    while Instant::now() < ctx.deadline {
        match run.session(producer).await {
            End::Clean => {}
            End::Cut => cuts += 1,
            End::Failed(why) => {
                run.violations.push(why);
                break;
            }
        }
        producer += 1;
    }

    // The end: the faults stop (the child is continued), the child gets EOF
    // and must exit cleanly, the server goes, and every ledger entry of
    // flowctl-ssh must return to zero.
    let _ = stop_tx.send(true);
    match injector.await {
        Ok(problems) => run.violations.extend(problems),
        Err(e) => run
            .violations
            .push(format!("ssh: fault injector panicked: {e}")),
    }
    if let Err(e) = run.sink.close().await {
        run.violations
            .push(format!("ssh: closing the local child's stdin failed: {e}"));
    }
    match tokio::time::timeout(RELEASE_GRACE, child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => run
            .violations
            .push(format!("ssh: the local child ended with {status}")),
        Ok(Err(e)) => run
            .violations
            .push(format!("ssh: waiting for the local child failed: {e}")),
        Err(_) => run.violations.push(format!(
            "ssh: the local child did not exit within {RELEASE_GRACE:?} of EOF"
        )),
    }
    if faults.drops.load(Relaxed) == 0 || cuts == 0 {
        run.violations.push(format!(
            "ssh: no connection was cut under a live stream ({} drops injected, {cuts} sessions cut): the fault schedule did not run",
            faults.drops.load(Relaxed)
        ));
    }
    drop(server);
    let ledger = Ledger::global();
    let released = tokio::time::timeout(RELEASE_GRACE, async {
        for kind in [LEDGER_SESSION, LEDGER_TASK, LEDGER_SERVER_TASK] {
            ledger.until_zero(Some(kind)).await;
        }
    })
    .await;
    if released.is_err() {
        run.violations.push(format!(
            "ssh: ledger not back to zero {RELEASE_GRACE:?} after the end: {:?}",
            ledger.snapshot()
        ));
    }
    sampler.abort();
    let _ = sampler.await;
    crate::watch::clear(&samplers);

    let mut violations = run.violations;
    let (max_buffered, bound) =
        crate::watch::judge("ssh", run.stages.all().map(|s| &**s), &mut violations);
    let checker = &run.consumer.checker;
    Outcome {
        tally: checker.finish(&run.sent),
        bytes: run.consumer.bytes,
        max_buffered,
        bound,
        faults: faults.total(),
        latencies_us: checker.latencies_us().to_vec(),
        violations,
    }
}
