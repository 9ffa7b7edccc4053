//! Redirections between remote and local processes, bounded end to end.
//!
//! Each helper is a [`pump`] between a flow-controlled source and a bounded
//! sink: it takes the next chunk only when the sink is ready, so the chain
//! remote process → SSH window → russh queue → our pipe → pump →
//! [`WriterSink`] → local pipe never holds more than the watermarks plus a
//! packet at each stage.
//!
//! An [`Output`] is also a `tokio::io::AsyncBufRead`, through
//! [`SourceExt::into_async_read`](flowctl_core::SourceExt::into_async_read)
//! (it lends each SSH packet, no copy), for `tokio::io::copy_buf`, a
//! decoder or a `FramedRead`: the output stays within the same bound, since
//! nothing is taken from it faster than the writer takes it.

use flowctl_core::io::{ReaderSource, WriterSink};
use flowctl_core::{FlowError, PumpStats, Watermarks, pump};
use tokio::io::AsyncRead;
use tokio::process::ChildStdin;

use crate::process::{Output, Stdin};

/// Copies a remote stream (stdout or stderr) into a local child's stdin,
/// then closes it (EOF). Memory: the output's buffer plus the
/// [`WriterSink`]'s, each at most `high` + one chunk.
pub async fn output_to_child(
    output: &mut Output,
    child_stdin: ChildStdin,
    watermarks: Watermarks,
) -> Result<PumpStats, FlowError> {
    let mut sink = WriterSink::new(child_stdin, watermarks);
    pump(output, &mut sink).await
}

/// Copies a local reader (a file, a child's stdout) into a remote process's
/// stdin, then closes it (EOF). Reads only as fast as the server's window lets
/// the stdin pipe drain.
pub async fn reader_to_stdin<R>(reader: R, stdin: &mut Stdin) -> Result<PumpStats, FlowError>
where
    R: AsyncRead + Unpin + Send,
{
    let mut src = ReaderSource::with_chunk_size(reader, 32 * 1024);
    pump(&mut src, stdin).await
}
