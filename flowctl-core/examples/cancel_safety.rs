//! Concept: `recv` is cancel-safe, so it can race a timer in `tokio::select!` without losing items.

use std::time::Duration;

#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, Watermarks, pipe};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), FlowError> {
    let (mut tx, mut rx) = pipe::<Vec<u8>>(Watermarks::new(0, 1024)?);
    let producer = tokio::spawn(async move {
        for i in 0..100u8 {
            tx.send(vec![i; 16]).await?;
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        tx.close().await
    });

    // ANCHOR: select
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let (mut items, mut ticks) = (0u8, 0u32);
    loop {
        tokio::select! {
            // If the tick wins, the pending `recv` is dropped: it had taken
            // nothing, so the next `recv` returns the same item.
            item = rx.recv() => match item? {
                Some(v) => {
                    assert_eq!(v, vec![items; 16]); // nothing lost, nothing skipped
                    items += 1;
                }
                None => break,
            },
            _ = tick.tick() => ticks += 1,
        }
    }
    // ANCHOR_END: select
    producer
        .await
        .map_err(|e| FlowError::Panicked(e.to_string()))??;
    println!("received all {items} items in order; {ticks} ticks interleaved");
    assert_eq!(items, 100);
    Ok(())
}
