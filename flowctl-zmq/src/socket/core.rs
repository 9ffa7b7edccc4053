//! The socket's shared core: the libzmq socket behind a mutex, its
//! notification fd in tokio's reactor, one waker slot per direction, and the
//! counters both halves update.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use flowctl_core::FlowError;
use tokio::io::unix::AsyncFd;

use super::ZmqStats;
use crate::backend::{Events, NotifyFd, RawContext, RawSocket, Sent, SocketType};
use crate::error::ZmqError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    In,
    Out,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) dropped: AtomicU64,
    pub(super) sent: AtomicU64,
    pub(super) received: AtomicU64,
    pub(super) frame_errors: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> ZmqStats {
        ZmqStats {
            dropped: self.dropped.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            frame_errors: self.frame_errors.load(Ordering::Relaxed),
            recv_yields: 0,
            send_yields: 0,
        }
    }
}

/// What both halves share. Field order matters: the fd is deregistered from
/// tokio before the socket that owns it is closed.
#[derive(Debug)]
pub(super) struct Core {
    pub(super) afd: Option<AsyncFd<NotifyFd>>,
    pub(super) sock: Mutex<Option<RawSocket>>,
    pub(super) ctx: Option<RawContext>,
    pub(super) kind: SocketType,
    pub(super) linger: Option<Duration>,
    pub(super) waiting_in: AtomicBool,
    pub(super) waiting_out: AtomicBool,
    pub(super) slots: Arc<Slots>,
    /// Wakes both slots: the one waker the fd's readiness is polled with.
    /// `AsyncFd::poll_read_ready` keeps only the waker of its latest call,
    /// and both halves wait on the fd's *read* readiness (libzmq signals
    /// both directions through it), so each half parks its own waker in its
    /// slot and polls the fd with this one, which every call replaces with
    /// itself.
    pub(super) fd_waker: Waker,
    pub(super) counters: Arc<Counters>,
}

/// One waker slot per direction, and a wake-up that arrived while its
/// direction was not parked (a permit, as `tokio::sync::Notify` keeps one).
#[derive(Debug, Default)]
pub(super) struct Slots {
    in_: Slot,
    out: Slot,
}

#[derive(Debug, Default)]
struct Slot {
    waker: Mutex<Option<Waker>>,
    permit: AtomicBool,
}

impl Slots {
    fn slot(&self, dir: Dir) -> &Slot {
        match dir {
            Dir::In => &self.in_,
            Dir::Out => &self.out,
        }
    }

    /// Wakes `dir` and leaves it a permit: a half that has not parked its
    /// waker yet sees the permit before it sleeps.
    pub(super) fn notify(&self, dir: Dir) {
        let slot = self.slot(dir);
        slot.permit.store(true, Ordering::SeqCst);
        slot.wake();
    }

    /// Takes `dir`'s permit (true if it had one).
    pub(super) fn take_permit(&self, dir: Dir) -> bool {
        self.slot(dir).permit.swap(false, Ordering::SeqCst)
    }
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Option<Waker>> {
        // A panic while holding it cannot leave a waker half-written.
        self.waker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn park(&self, waker: &Waker) {
        let mut w = self.lock();
        match &*w {
            Some(old) if old.will_wake(waker) => {}
            _ => *w = Some(waker.clone()),
        }
    }

    fn wake(&self) {
        let waker = self.lock().take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Wake for Slots {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    /// The fd became readable: both directions re-check (each reads
    /// `ZMQ_EVENTS` before it sleeps again), no permits.
    fn wake_by_ref(self: &Arc<Self>) {
        self.in_.wake();
        self.out.wake();
    }
}

impl Core {
    pub(super) fn lock(&self) -> Result<MutexGuard<'_, Option<RawSocket>>, FlowError> {
        // A poisoned lock only means another thread panicked while holding it;
        // the libzmq socket itself is still consistent.
        let guard = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(FlowError::Closed);
        }
        Ok(guard)
    }

    pub(super) fn with_sock<T>(
        &self,
        f: impl FnOnce(&mut RawSocket) -> Result<T, ZmqError>,
    ) -> Result<T, FlowError> {
        let mut guard = self.lock()?;
        match guard.as_mut() {
            Some(s) => f(s).map_err(FlowError::from),
            None => Err(FlowError::Closed),
        }
    }

    pub(super) fn afd(&self) -> Result<&AsyncFd<NotifyFd>, FlowError> {
        self.afd.as_ref().ok_or(FlowError::Closed)
    }

    /// Reads `ZMQ_EVENTS` and wakes whichever direction (other than `me`) is
    /// waiting and now ready: reading the events may have consumed the fd edge
    /// that direction was waiting for.
    pub(super) fn events(&self, me: Option<Dir>) -> Result<Events, FlowError> {
        let ev = self.with_sock(|s| s.events())?;
        self.cross_wake(ev, me);
        Ok(ev)
    }

    pub(super) fn cross_wake(&self, ev: Events, me: Option<Dir>) {
        if me != Some(Dir::In) && ev.readable && self.waiting_in.load(Ordering::SeqCst) {
            self.slots.notify(Dir::In);
        }
        if me != Some(Dir::Out) && ev.writable && self.waiting_out.load(Ordering::SeqCst) {
            self.slots.notify(Dir::Out);
        }
    }

    /// After a send or recv by `me`: if the other direction waits, re-check
    /// the events for it (the operation processed libzmq's commands and may
    /// have consumed its edge).
    ///
    /// Never fails: the operation before it has already moved messages, and
    /// an error here must not make the caller drop them or report them as
    /// not sent. If the events cannot be read, the waiting direction is woken
    /// anyway; its own next operation meets the error and returns it.
    pub(super) fn after_op(&self, me: Dir) {
        let other_waits = match me {
            Dir::In => self.waiting_out.load(Ordering::SeqCst),
            Dir::Out => self.waiting_in.load(Ordering::SeqCst),
        };
        if other_waits && self.events(Some(me)).is_err() {
            match me {
                Dir::In => self.slots.notify(Dir::Out),
                Dir::Out => self.slots.notify(Dir::In),
            }
        }
    }

    pub(super) fn try_send(&self, msg: &[Bytes]) -> Result<Sent, FlowError> {
        let sent = self.with_sock(|s| s.try_send(msg))?;
        self.after_op(Dir::Out);
        Ok(sent)
    }

    /// Polls until `dir` may be ready. Never sleeps without a registered
    /// waker: the waker is parked in `dir`'s slot and the waiting flag
    /// raised before the final `ZMQ_EVENTS` check, and the fd's readiness
    /// is cleared only after a wake-up, before the caller re-checks.
    ///
    /// The flag stays raised (also at `Pending`) until the caller lowers it
    /// with [`lower`](Self::lower) once its operation is done: while it is
    /// up, the other half's operations re-check the events for this one.
    /// A caller abandoned at `Pending` costs the other half those checks,
    /// and one spurious wake-up, until it is polled again or dropped.
    ///
    /// Returns `Ready(Ok(true))` if `ZMQ_EVENTS` said ready at once (no
    /// sleep): a caller whose next attempt still fails must yield rather
    /// than spin.
    ///
    /// `check: false` skips that `ZMQ_EVENTS` read (a getsockopt that costs
    /// libzmq a `poll` syscall). Only for a caller whose last operation in
    /// this direction just failed with `EAGAIN` (which processed libzmq's
    /// commands, as the read would) and whose socket never had another half
    /// in use, which could have consumed the edge before the flag above was
    /// raised: the read is what makes that cross-wake safe.
    pub(super) fn poll_wait(
        &self,
        dir: Dir,
        check: bool,
        cx: &mut Context<'_>,
    ) -> Poll<Result<bool, FlowError>> {
        let flag = match dir {
            Dir::In => &self.waiting_in,
            Dir::Out => &self.waiting_out,
        };
        self.slots.slot(dir).park(cx.waker());
        flag.store(true, Ordering::SeqCst);
        if check {
            let ev = match self.events(Some(dir)) {
                Ok(ev) => ev,
                Err(e) => return Poll::Ready(Err(e)),
            };
            let ready = match dir {
                Dir::In => ev.readable,
                Dir::Out => ev.writable,
            };
            if ready {
                return Poll::Ready(Ok(true));
            }
        }
        if self.slots.take_permit(dir) {
            return Poll::Ready(Ok(false));
        }
        let afd = match self.afd() {
            Ok(afd) => afd,
            Err(e) => return Poll::Ready(Err(e)),
        };
        match afd.poll_read_ready(&mut Context::from_waker(&self.fd_waker)) {
            Poll::Ready(Ok(mut guard)) => {
                guard.clear_ready();
                Poll::Ready(Ok(false))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
            // The fd waker wakes `dir`'s slot (parked above) on readiness.
            Poll::Pending => Poll::Pending,
        }
    }

    /// Lowers `dir`'s waiting flag: its operation is done.
    pub(super) fn lower(&self, dir: Dir) {
        match dir {
            Dir::In => self.waiting_in.store(false, Ordering::SeqCst),
            Dir::Out => self.waiting_out.store(false, Ordering::SeqCst),
        }
    }

    /// Takes everything out for closing. The fd leaves the reactor first.
    pub(super) fn take_parts(&mut self) -> (Option<RawSocket>, Option<RawContext>) {
        drop(self.afd.take());
        let sock = self
            .sock
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // The context goes too, even a shared one: dropping its last clone
        // terminates it, which blocks, so that must happen off the async threads.
        (sock, self.ctx.take())
    }
}

/// Closes the socket, then drops our clone of the context. For a private
/// context that is the last clone, so this waits in `zmq_ctx_term` until libzmq
/// has sent everything or the linger has expired; a shared context lives on
/// (and keeps sending) while other clones exist.
pub(super) fn finish(sock: Option<RawSocket>, ctx: Option<RawContext>) {
    drop(sock);
    drop(ctx);
}

impl Drop for Core {
    fn drop(&mut self) {
        let (sock, ctx) = self.take_parts();
        if sock.is_none() && ctx.is_none() {
            return;
        }

        // zmq_ctx_term blocks for up to the linger: never on an async thread.
        let parts = (sock, ctx);
        match std::thread::Builder::new()
            .name("flowctl-zmq-linger".into())
            .spawn(move || finish(parts.0, parts.1))
        {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot spawn the linger thread; the socket's unsent messages are dropped");
            }
        }
    }
}
