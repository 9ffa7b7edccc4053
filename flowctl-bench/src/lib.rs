//! Shared helpers of the flowctl benchmarks: runtime builders, payload makers
//! and a dependency-free CPU workload.
//!
//! The criterion benches live in `benches/`; `benches/core.rs` measures the
//! primitives of `flowctl-core` side by side with their tokio / tokio-util
//! anchors (`tokio::sync::mpsc`, `tokio::io::duplex`, `FramedRead`). Every
//! figure worth quoting is a ratio of two benchmarks of one run, because the
//! machines this runs on are shared and absolute numbers drift.
//!
//! Run them with `cargo xtask bench` (or `cargo bench -p flowctl-bench`).
//! `cargo xtask bench` also runs the transport harnesses through the
//! `bench-report` binary and writes the table to `docs/src/benchmarks.md`.
//!
//! ```
//! use flowctl_bench::{current_thread, fnv1a_rounds, payload};
//! use flowctl_core::{Sink, Watermarks, pipe};
//! use flowctl_core::prelude::*;
//!
//! let rt = current_thread();
//! let moved = rt.block_on(async {
//!     let (mut tx, mut rx) = pipe(Watermarks::default());
//!     let producer = tokio::spawn(async move {
//!         for _ in 0..8 {
//!             tx.send(payload(64 * 1024)).await.unwrap();
//!         }
//!     });
//!     let mut bytes = 0;
//!     while let Some(chunk) = rx.recv().await.unwrap() {
//!         fnv1a_rounds(&chunk, 1); // the CPU workload the offload bench uses
//!         bytes += chunk.len();
//!     }
//!     producer.await.unwrap();
//!     bytes
//! });
//! assert_eq!(moved, 8 * 64 * 1024);
//! ```
//!
//! # Feature flags
//!
//! None: the crate is not published, and what it measures is chosen with
//! `cargo xtask bench --only PREFIX`.
#![forbid(unsafe_code)]

use bytes::{BufMut, Bytes, BytesMut};
use tokio::runtime::{Builder, Runtime};

/// A multi-thread tokio runtime with `workers` worker threads (at least one),
/// timers and I/O disabled: the benches only need the scheduler.
///
/// # Panics
/// If the runtime cannot be built (the OS refused to spawn threads).
pub fn multi_thread(workers: usize) -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .build()
        .expect("build a multi-thread tokio runtime")
}

/// A current-thread tokio runtime: producer and consumer share one thread.
///
/// # Panics
/// If the runtime cannot be built.
pub fn current_thread() -> Runtime {
    Builder::new_current_thread()
        .build()
        .expect("build a current-thread tokio runtime")
}

/// `len` pseudo-random bytes from a fixed seed, so every run hashes and frames
/// the same data (xorshift64; no `rand` dependency).
pub fn payload(len: usize) -> Bytes {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = BytesMut::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let word = state.to_le_bytes();
        let take = word.len().min(len - out.len());
        out.put_slice(&word[..take]);
    }
    out.freeze()
}

/// `frames` frames of `frame_len` payload bytes, each behind the 4-byte
/// big-endian length header of `tokio_util::codec::LengthDelimitedCodec`'s
/// defaults, concatenated and cut into chunks of `chunk_len` bytes (the last
/// one may be shorter). Chunks do not line up with frames.
pub fn length_delimited_chunks(frames: usize, frame_len: usize, chunk_len: usize) -> Vec<Bytes> {
    let body = payload(frame_len);
    let header = u32::try_from(frame_len).expect("frame length fits the 4-byte header");
    let mut stream = BytesMut::with_capacity(frames * (frame_len + 4));
    for _ in 0..frames {
        stream.put_u32(header);
        stream.put_slice(&body);
    }
    let mut stream = stream.freeze();
    let mut chunks = Vec::with_capacity(stream.len().div_ceil(chunk_len.max(1)));
    while !stream.is_empty() {
        let n = chunk_len.max(1).min(stream.len());
        chunks.push(stream.split_to(n));
    }
    chunks
}

/// FNV-1a (64-bit) over `data`, repeated `rounds` times with the previous
/// digest as the seed: a serial, dependency-free CPU workload that the compiler
/// cannot vectorise away. One round costs about 4 cycles per byte (one
/// multiply and one xor on the critical path), so one round over 64 KiB is
/// roughly 100 µs on a 2.5-3 GHz core.
pub fn fnv1a_rounds(data: &[u8], rounds: usize) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for _ in 0..rounds.max(1) {
        for &b in data {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_deterministic_and_sized() {
        assert_eq!(payload(13).len(), 13);
        assert_eq!(payload(1000), payload(1000));
    }

    #[test]
    fn chunks_reassemble_to_framed_stream() {
        let chunks = length_delimited_chunks(3, 10, 4);
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(all.len(), 3 * 14);
        assert_eq!(&all[..4], &[0, 0, 0, 10]);
        assert!(chunks.iter().all(|c| c.len() <= 4));
    }

    #[test]
    fn fnv_matches_reference_vector() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(fnv1a_rounds(b"a", 1), 0xaf63_dc4c_8601_ec8c);
    }
}
