//! `pipe`: producers and consumers over `flowctl_core::pipe`, with a consumer
//! that alternates fast, slow and stalled phases, and producers whose sends are
//! sometimes cancelled while they wait (a cancelled send must accept nothing,
//! so the retry neither loses nor duplicates).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, PipeBuilder, Watermarks};
use futures::FutureExt;
use tokio::time::Instant;

use super::{Ctx, Faults, Outcome};
use crate::check::{Checker, MIN_MESSAGE, encode};
use crate::opts::Inject;

const PRODUCERS: u32 = 4;
const MAX_MESSAGE: usize = 4096;

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Batches of up to 64 as fast as they come.
    Fast,
    /// One at a time, pausing 1 ms every 16 messages.
    Slow,
    /// Not reading at all (a fault: the producers must pause, not buffer).
    Stalled,
}

pub(crate) async fn run(ctx: &Ctx<'_>) -> Outcome {
    let wm = Watermarks::new(64 * 1024, 256 * 1024).expect("valid watermarks");
    let (tx, mut rx) = PipeBuilder::new(wm).name("soak.pipe.main").build::<Bytes>();
    let mut probe = tx.clone();
    probe.close_now(); // a closed handle still reads the shared stats
    ctx.monitor.probe("pipe", move || probe.stats());

    if ctx.inject == Some(Inject::LeakProcess) {
        // A deliberate leak: a child started and forgotten (never waited on).
        let leaked = std::process::Command::new("sleep").arg("600").spawn();
        std::mem::forget(leaked);
    }

    let faults = Arc::new(Faults::default());
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let mut tx = tx.clone();
        let mut rng = fastrand::Rng::with_seed(ctx.seed ^ (u64::from(p) << 32));
        let (deadline, start, faults) = (ctx.deadline, ctx.start, faults.clone());
        producers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let len = rng.usize(MIN_MESSAGE..=MAX_MESSAGE);
                let msg = encode(p, seq, start.elapsed().as_micros() as u64, len);
                if rng.u32(..50) == 0 {
                    match tx.send(msg.clone()).now_or_never() {
                        Some(result) => {
                            result?;
                            seq += 1;
                            continue;
                        }
                        // It was waiting (the pipe is paused) and got cancelled.
                        None => {
                            faults.cancels.fetch_add(1, Relaxed);
                        }
                    }
                }
                tx.send(msg).await?;
                seq += 1;
            }
            Ok::<_, FlowError>((p, seq))
        }));
    }
    drop(tx);

    let mut checker = Checker::default();
    let mut rng = fastrand::Rng::with_seed(ctx.seed);
    let mut phase = Phase::Fast;
    let mut phase_end = Instant::now();
    let mut batch = Vec::with_capacity(64);
    let (mut received, mut bytes) = (0u64, 0u64);
    let mut violations = Vec::new();
    'consume: loop {
        if Instant::now() >= phase_end {
            phase = match rng.u32(..10) {
                0..=4 => Phase::Fast,
                5..=7 => Phase::Slow,
                _ => Phase::Stalled,
            };
            let len = match phase {
                Phase::Stalled => rng.u64(20..300),
                _ => rng.u64(50..500),
            };
            phase_end = Instant::now() + Duration::from_millis(len);
            if let Phase::Stalled = phase {
                faults.stalls.fetch_add(1, Relaxed);
                tokio::time::sleep_until(phase_end).await;
                continue;
            }
        }
        batch.clear();
        let max = if matches!(phase, Phase::Fast) { 64 } else { 1 };
        match rx.recv_many(&mut batch, max).await {
            Ok(0) => break 'consume,
            Ok(_) => {}
            Err(e) => {
                violations.push(format!("pipe consumer failed: {e}"));
                break 'consume;
            }
        }
        for msg in batch.drain(..) {
            received += 1;
            bytes += msg.len() as u64;
            if ctx.inject == Some(Inject::DropOne) && received == 1000 {
                continue; // the deliberate bug: message 1000 vanishes
            }
            checker.observe(&msg, ctx.now_us());
        }
        ctx.progress.messages.store(received, Relaxed);
        ctx.progress.bytes.store(bytes, Relaxed);
        if matches!(phase, Phase::Slow) && received % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    let mut sent = HashMap::new();
    for p in producers {
        match p.await {
            Ok(Ok((producer, n))) => {
                sent.insert(producer, n);
            }
            Ok(Err(e)) => violations.push(format!("pipe producer failed: {e}")),
            Err(e) => violations.push(format!("pipe producer panicked: {e}")),
        }
    }
    let stats = rx.stats();
    Outcome {
        tally: checker.finish(&sent),
        bytes,
        max_buffered: stats.max_buffered,
        // Each producer handle may overshoot high by the one message it sends after `ready`.
        bound: wm.high() + PRODUCERS as usize * MAX_MESSAGE,
        faults: faults.total(),
        latencies_us: checker.latencies_us().to_vec(),
        violations,
    }
}
