//! Byte streams: any `AsyncWrite` as a [`Sink`], any `AsyncRead` as a [`Source`].

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::fair::Budget;
use crate::gate::{GateInner, Wakeups};
use crate::traits::SendError;
use crate::{Fairness, FlowError, FlowStats, Sink, Source, Watermarks};

/// An `AsyncWrite` (a child's stdin, a file, a socket) as a bounded [`Sink`] of
/// `Bytes`.
///
/// Accepted chunks are queued and charged ([`charge_of`](crate::weighted::charge_of): their length, and at
/// least [`MIN_CHARGE`](crate::weighted::MIN_CHARGE) bytes each); they are
/// credited as the writer takes them, the part of the charge beyond the
/// length when the chunk's last byte is written. Empty chunks are not queued. `ready` writes what the writer accepts without waiting and, if
/// more than `high` bytes are still queued, keeps writing until the queue is at
/// or below `low`. So however slow the writer, at most `high` plus one chunk is
/// held here. This is the fix for AsyncSSH's redirect into a slow process, which
/// queued without waiting for drain.
///
/// `close` flushes, shuts the writer down and drops it, so a child process
/// reading its stdin sees the end of file.
///
/// Data moves only while the sink is driven (`ready`, `send`, `flush`,
/// `close`), as with `futures::Sink`; [`pump`](crate::pump()) drives it.
///
/// # Errors
/// A write error is returned once, from the call that hit it; the chunks still
/// queued then are dropped, and [`written`](WriterSink::written) tells how
/// many bytes the writer took.
#[derive(Debug)]
pub struct WriterSink<W> {
    /// `None` once closed: dropping the writer is what gives pipes (a child's
    /// stdin) their end of file, since their `poll_shutdown` does nothing.
    writer: Option<W>,
    queue: VecDeque<Queued>,
    gate: GateInner,
    written: u64,
    slot: usize,
    closed: bool,
}

/// A chunk in a [`WriterSink`]'s queue: the bytes not yet written, and the
/// part of its charge beyond its length, credited with its last byte.
#[derive(Debug)]
struct Queued {
    rest: Bytes,
    overhead: usize,
}

impl<W: AsyncWrite + Unpin + Send> WriterSink<W> {
    /// Wraps `writer` with these watermarks.
    pub fn new(writer: W, watermarks: Watermarks) -> Self {
        let span = tracing::debug_span!("flowctl.writer", high = watermarks.high());
        let mut gate = GateInner::new(watermarks, span);
        let slot = gate.register();
        WriterSink {
            writer: Some(writer),
            queue: VecDeque::new(),
            gate,
            written: 0,
            slot,
            closed: false,
        }
    }

    /// Bytes the writer has taken so far (after an error too: the chunks
    /// dropped on an error are not counted).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The writer (`None` once closed), with whatever is still queued dropped.
    pub fn into_inner(self) -> Option<W> {
        self.writer
    }

    /// Writes queued chunks until the writer would block or the queue is empty.
    fn poll_write_queue(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        let Some(writer) = self.writer.as_mut() else {
            return Poll::Ready(if self.queue.is_empty() {
                Ok(())
            } else {
                Err(FlowError::Closed)
            });
        };
        while let Some(front) = self.queue.front_mut() {
            let n = match Pin::new(&mut *writer).poll_write(cx, &front.rest) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(FlowError::Io(std::io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(FlowError::Io(e))),
                Poll::Pending => return Poll::Pending,
            };
            // A writer claiming more than it was given is not trusted with the count.
            let n = n.min(front.rest.len());
            front.rest.advance(n);
            self.written += n as u64;
            let mut credit = n;
            if front.rest.is_empty() {
                credit += front.overhead;
                self.queue.pop_front();
            }
            let wakeups: Wakeups = self.gate.credit(credit);
            // A single-owner sink: nobody else waits on this gate.
            drop(wakeups);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_ready_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if self.closed {
            return Poll::Ready(Err(FlowError::Closed));
        }
        loop {
            let wrote_all = match self.poll_write_queue(cx) {
                Poll::Ready(Ok(())) => true,
                Poll::Ready(Err(e)) => {
                    self.fail();
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => false,
            };
            match self.gate.poll_ready(self.slot, cx) {
                Poll::Ready(r) => return Poll::Ready(r),
                // Paused but the writer took everything: impossible (credit
                // resumes at low), but do not spin if it ever happens.
                Poll::Pending if wrote_all => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_flush_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        std::task::ready!(self.poll_write_queue(cx))?;
        match self.writer.as_mut() {
            Some(w) => Pin::new(w).poll_flush(cx).map_err(FlowError::Io),
            None => Poll::Ready(Ok(())),
        }
    }

    fn fail(&mut self) {
        let queued: usize = self
            .queue
            .drain(..)
            .map(|q| q.rest.len() + q.overhead)
            .sum();
        drop(self.gate.credit(queued));
        self.closed = true;
        self.writer = None;
    }
}

impl<W: AsyncWrite + Unpin + Send> Sink for WriterSink<W> {
    type Item = Bytes;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        self.poll_ready_inner(cx)
    }

    fn start_send(&mut self, item: Bytes) -> Result<(), SendError<Bytes>> {
        if self.closed {
            return Err(SendError::closed(item));
        }
        if item.is_empty() {
            return Ok(());
        }
        let charge = self.gate.charge_item(item.len());
        self.queue.push_back(Queued {
            overhead: charge - item.len(),
            rest: item,
        });
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if self.closed {
            return Poll::Ready(if self.queue.is_empty() {
                Ok(())
            } else {
                Err(FlowError::Closed)
            });
        }
        let res = std::task::ready!(self.poll_flush_inner(cx));
        if res.is_err() {
            self.fail();
        }
        Poll::Ready(res)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        if let Err(e) = std::task::ready!(self.poll_flush_inner(cx)) {
            self.fail();
            return Poll::Ready(Err(e));
        }
        let res = match self.writer.as_mut() {
            Some(w) => std::task::ready!(Pin::new(w).poll_shutdown(cx)),
            None => Ok(()),
        };
        self.closed = true;
        self.writer = None;
        Poll::Ready(res.map_err(FlowError::Io))
    }

    fn stats(&self) -> FlowStats {
        self.gate.stats()
    }

    fn writability(&self) -> Option<crate::Writability> {
        Some(self.gate.state().writability())
    }
}

/// An `AsyncRead` (a child's stdout, a file, a socket) as a fair [`Source`] of
/// `Bytes` chunks of at most `chunk_size` bytes.
///
/// Reads go straight into a `BytesMut` that each chunk is split off, without a
/// copy. Nothing is buffered beyond the chunk being read: backpressure is simply
/// not reading.
#[derive(Debug)]
pub struct ReaderSource<R> {
    reader: R,
    buf: BytesMut,
    chunk_size: usize,
    budget: Budget,
    stats: FlowStats,
    eof: bool,
}

/// The default read size of [`ReaderSource`]: 64 KiB.
pub const DEFAULT_CHUNK: usize = 64 * 1024;

impl<R: AsyncRead + Unpin + Send> ReaderSource<R> {
    /// Reads chunks of up to [`DEFAULT_CHUNK`] bytes with the default [`Fairness`].
    pub fn new(reader: R) -> Self {
        Self::with_chunk_size(reader, DEFAULT_CHUNK)
    }

    /// Reads chunks of up to `chunk_size` bytes (at least 1).
    pub fn with_chunk_size(reader: R, chunk_size: usize) -> Self {
        let chunk_size = chunk_size.max(1);
        ReaderSource {
            reader,
            buf: BytesMut::new(),
            chunk_size,
            budget: Budget::new(Fairness::default()),
            stats: FlowStats::empty(Watermarks::new(0, chunk_size).unwrap_or_default()),
            eof: false,
        }
    }

    /// Uses `fairness` instead of the default.
    pub fn fairness(mut self, fairness: Fairness) -> Self {
        self.budget = Budget::new(fairness);
        self
    }

    /// The reader.
    pub fn into_inner(self) -> R {
        self.reader
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, FlowError>> {
        if self.eof {
            return Poll::Ready(Ok(None));
        }
        std::task::ready!(self.budget.poll_proceed(cx));
        if self.buf.capacity() < self.chunk_size {
            self.buf.reserve(self.chunk_size);
        }
        let mut limited = (&mut self.buf).limit(self.chunk_size);
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.reader), cx, &mut limited) {
            Poll::Pending => {
                self.budget.reset();
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(FlowError::Io(e))),
            Poll::Ready(Ok(0)) => {
                self.eof = true;
                Poll::Ready(Ok(None))
            }
            Poll::Ready(Ok(n)) => {
                let chunk = self.buf.split_to(n).freeze();
                self.budget.charge(n);
                self.stats.items += 1;
                self.stats.bytes += n as u64;
                Poll::Ready(Ok(Some(chunk)))
            }
        }
    }
}

impl<R: AsyncRead + Unpin + Send> Source for ReaderSource<R> {
    type Item = Bytes;

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, FlowError>> {
        self.poll_chunk(cx)
    }

    fn stats(&self) -> FlowStats {
        self.stats
    }
}
