//! Integration tests of flowctl-core: one binary, one module per capability.

// Watermark hysteresis through the pipe: bounds, order, end of stream, cancellation.
mod pipe;
// gate::Gate: per-item charge floor, double credit counted as a violation.
mod gate;
// Property tests: any sequence of sends, receives and cancellations keeps the bounds.
mod props;
// pump: end to end, closing the sink, error counts.
mod pump;
// Fair yielding: an always-ready source does not starve a timer; an unfair one does.
mod fairness;
// io adapters against a real child process (the AsyncSSH slow-stdin case).
mod io;
// frame::Framed: frames across chunk boundaries, errors, zero-copy adoption.
mod frame;
// Property tests of Framed fed arbitrary bytes in arbitrary chunks (10,000 cases each).
mod frame_props;
// offload::ordered: order, limits, panics, dropping the stage.
mod offload;
// lifecycle: Attempt release on drop/cancel/timeout, in-flight requests, retry, Ledger.
mod lifecycle;
// tracing: pause/resume events inside the stream's span.
mod tracing_events;
// Adapters to and from the futures ecosystem.
mod compat;
// The 0.2 contract: items given back, try_send, trait objects, interop with futures and tokio::io.
mod contract;
// Send/Sync of the public types.
mod send_sync;
// Overflow policies against a model (10,000 cases), Fail, writability edges.
mod overflow;
// The `metrics` feature: a named stage's counters through a real Prometheus exposition.
#[cfg(feature = "metrics")]
mod metrics;

/// Payload of `len` bytes whose content encodes `seq`, so reordering or loss shows.
pub(crate) fn payload(seq: u32, len: usize) -> bytes::Bytes {
    let mut v = vec![0u8; len.max(4)];
    v[..4].copy_from_slice(&seq.to_be_bytes());
    bytes::Bytes::from(v)
}

/// The sequence number written by [`payload`].
pub(crate) fn seq_of(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
