//! Recipe: frames out of a child's stdout, CPU work on other threads, results in input order.
//!
//! `seq 1 20000` prints one number per line; `Framed` splits the lines without re-copying
//! its buffer, and `offload::ordered` hashes each line on tokio's blocking pool while the
//! reactor thread stays free. The results arrive in input order.

use std::process::Stdio;

use flowctl_core::frame::Framed;
use flowctl_core::io::ReaderSource;
use flowctl_core::offload::{Offload, ordered};
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, Source};
use tokio::process::Command;
use tokio_util::codec::LinesCodec;

const LINES: u64 = 20_000;

/// Stands in for real per-frame CPU work (a checksum, a decompression).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[tokio::main]
async fn main() -> Result<(), FlowError> {
    let mut child = Command::new("seq")
        .args(["1", &LINES.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let Some(stdout) = child.stdout.take() else {
        return Err(FlowError::Config("child stdout was not piped".into()));
    };

    // ANCHOR: stages
    // Bytes -> lines (max 1 KiB per line) -> (line, hash) computed off the reactor.
    let lines = Framed::new(
        ReaderSource::new(stdout),
        LinesCodec::new_with_max_length(1024),
    );
    let limits = Offload {
        concurrency: 4,
        max_inflight_bytes: 256 * 1024,
    };
    let mut hashed = ordered(lines, limits, |line: String| {
        let hash = fnv1a(line.as_bytes());
        (line, hash)
    });
    // ANCHOR_END: stages

    // ANCHOR: consume
    let mut expected = 1u64;
    while let Some((line, hash)) = hashed.recv().await? {
        // Input order is kept, whatever order the jobs finished in.
        assert_eq!(line, expected.to_string());
        assert_eq!(hash, fnv1a(line.as_bytes()));
        expected += 1;
    }
    // ANCHOR_END: consume
    child.wait().await?;
    println!(
        "{} lines hashed in order; at most {} input bytes were in flight",
        expected - 1,
        hashed.stats().max_buffered
    );
    assert_eq!(expected - 1, LINES);
    Ok(())
}
