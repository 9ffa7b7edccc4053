//! Concept: an always-ready source made fair, so a timer on the same thread keeps ticking.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use flowctl_core::compat::StreamSource;
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{Fairness, FlowError, SourceExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), FlowError> {
    // ANCHOR: fair
    // A source that always has an item ready: it never returns Pending by itself.
    let flood = futures::stream::iter(std::iter::repeat_n(vec![0u8; 64], 20_000));
    // StreamSource is fair already; `.fair(..)` is how a foreign Source is wrapped.
    let mut src = StreamSource::new(flood).fair(Fairness::new(64, 256 * 1024)?);

    // A 1 ms timer on the same thread.
    let ticks = Arc::new(AtomicU32::new(0));
    let counter = ticks.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        loop {
            tick.tick().await;
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut items = 0u64;
    while src.recv().await?.is_some() {
        items += 1;
    }
    // ANCHOR_END: fair
    ticker.abort();
    println!(
        "{items} items drained with {} forced yields; the 1 ms timer ticked {} times meanwhile",
        src.yields(),
        ticks.load(Ordering::Relaxed)
    );
    assert!(src.yields() > 0);
    Ok(())
}
