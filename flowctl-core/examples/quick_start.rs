//! Quick start: a fast producer, a slow consumer, and a pipe that keeps memory at its watermark.

// ANCHOR: all
use bytes::Bytes;
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, Watermarks, pipe};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), FlowError> {
    // Pause producers above 64 KiB, resume them at 16 KiB or below.
    let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::new(16 * 1024, 64 * 1024)?);

    let producer = tokio::spawn(async move {
        for _ in 0..1000 {
            // Waits while the pipe holds more than 64 KiB.
            tx.send(Bytes::from(vec![0u8; 4096])).await?;
        }
        tx.close().await // the consumer sees the end of the stream
    });

    let mut received = 0;
    while let Some(chunk) = rx.recv().await? {
        received += chunk.len();
        tokio::task::yield_now().await; // a slow consumer
    }
    producer
        .await
        .map_err(|e| FlowError::Panicked(e.to_string()))??;

    let stats = rx.stats();
    println!(
        "received {received} bytes; at most {} buffered (high {} + one 4096-byte item); paused {} times",
        stats.max_buffered,
        stats.watermarks.high(),
        stats.pauses
    );
    assert_eq!(received, 1000 * 4096);
    assert!(stats.max_buffered <= 64 * 1024 + 4096);
    Ok(())
}
// ANCHOR_END: all
