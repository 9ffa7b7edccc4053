//! Recipe: a child process's stdout into a slow writer (another child's stdin), with bounded memory.
//!
//! `head -c 4194304 /dev/zero` writes 4 MiB as fast as it can; `sh -c 'sleep 0.2; wc -c'`
//! reads nothing for 200 ms, then counts what it gets. The `WriterSink` in between holds at
//! most its high watermark plus one chunk, and the pump stops reading `head` while it waits.

use std::process::Stdio;

use flowctl_core::io::{DEFAULT_CHUNK, ReaderSource, WriterSink};
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, Sink, Watermarks, pump};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const TOTAL: usize = 4 * 1024 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), FlowError> {
    // ANCHOR: spawn
    let mut producer = Command::new("head")
        .args(["-c", &TOTAL.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut consumer = Command::new("sh")
        .args(["-c", "sleep 0.2; wc -c"]) // slow to start reading
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let (Some(stdout), Some(stdin)) = (producer.stdout.take(), consumer.stdin.take()) else {
        return Err(FlowError::Config("child stdio was not piped".into()));
    };
    // ANCHOR_END: spawn

    // ANCHOR: pump
    let wm = Watermarks::new(64 * 1024, 256 * 1024)?;
    let mut src = ReaderSource::new(stdout); // chunks of up to 64 KiB
    let mut sink = WriterSink::new(stdin, wm);
    let moved = pump(&mut src, &mut sink).await?; // closes the sink: `wc` sees EOF
    let stats = sink.stats();
    assert!(stats.max_buffered <= wm.high() + DEFAULT_CHUNK);
    // ANCHOR_END: pump

    let mut counted = String::new();
    if let Some(mut out) = consumer.stdout.take() {
        out.read_to_string(&mut counted).await?;
    }
    producer.wait().await?;
    consumer.wait().await?;
    println!(
        "moved {} bytes in {} chunks; wc counted {}; at most {} bytes buffered, {} pauses",
        moved.bytes,
        moved.items,
        counted.trim(),
        stats.max_buffered,
        stats.pauses
    );
    assert_eq!(moved.bytes, TOTAL as u64);
    assert_eq!(counted.trim(), TOTAL.to_string());
    Ok(())
}
