//! Recipe: several ZeroMQ senders into one receiver on a single tokio thread,
//! with a 1 ms timer that keeps ticking while the receiver always has a
//! message ready (the PyZMQ #1928 starvation, avoided), and byte watermarks
//! turned into libzmq high-water marks so a stalled receiver pushes back on
//! every sender.
//!
//! ```text
//! cargo run -p flowctl-zmq --example zmq_fan_in
//! ```
//!
//! Everything runs in this process over tcp on 127.0.0.1: three PUSH sockets
//! connect to one PULL. No outside peer is needed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, FlowStats, Sink, Watermarks};
use flowctl_zmq::{SocketType, ZmqSocket};
use tokio::time::MissedTickBehavior;

const SENDERS: usize = 3;
const PER_SENDER: u64 = 20_000;
const SIZE: usize = 100;

/// Message `seq` of sender `id`: the id in byte 0, the sequence in bytes 1..9.
fn message(id: usize, seq: u64) -> Vec<Bytes> {
    let mut frame = vec![0u8; SIZE];
    frame[0] = id as u8;
    frame[1..9].copy_from_slice(&seq.to_be_bytes());
    vec![Bytes::from(frame)]
}

/// The sender id and sequence number of a message made by [`message`].
fn parse(msg: &[Bytes]) -> Option<(usize, u64)> {
    let frame = msg.first()?;
    let seq = u64::from_be_bytes(frame.get(1..9)?.try_into().ok()?);
    Some((usize::from(frame[0]), seq))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A 1 ms timer on this thread: counts its ticks and the longest gap between
/// two, and says for how long it ran.
fn spawn_timer(stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, Duration, Duration)> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut every_ms = tokio::time::interval(Duration::from_millis(1));
        every_ms.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (mut ticks, mut max_gap) = (0u64, Duration::ZERO);
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            every_ms.tick().await;
            max_gap = max_gap.max(last.elapsed());
            last = Instant::now();
            ticks += 1;
        }
        (ticks, max_gap, started.elapsed())
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    // ANCHOR: sockets
    // 64 KiB of 100-byte messages: libzmq's RCVHWM and SNDHWM become
    // ceil(65536 / 100) = 656 messages; the senders' own queues are charged
    // in bytes against the same watermarks.
    let watermarks = Watermarks::new(16 * 1024, 64 * 1024)?;
    let mut rx = ZmqSocket::builder(SocketType::Pull)
        .bind("tcp://127.0.0.1:*")
        .watermarks(watermarks)
        .expected_message_size(SIZE)
        .build()?
        .into_source();
    let endpoint = rx.endpoints()[0].clone();

    let mut senders = Vec::new();
    for id in 0..SENDERS {
        let mut tx = ZmqSocket::builder(SocketType::Push)
            .connect(endpoint.clone())
            .watermarks(watermarks)
            .expected_message_size(SIZE)
            .build()?
            .into_sink();
        senders.push(tokio::spawn(async move {
            for seq in 0..PER_SENDER {
                tx.send(message(id, seq).into()).await?; // waits while libzmq is at its HWM
            }
            tx.close().await?; // returns once libzmq has sent everything
            Ok::<FlowStats, FlowError>(tx.stats())
        }));
    }
    // ANCHOR_END: sockets

    let stop = Arc::new(AtomicBool::new(false));
    let timer = spawn_timer(stop.clone());

    // ANCHOR: receive
    // Stall first: the HWMs fill and every sender waits in `send`.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let mut next = [0u64; SENDERS]; // per-sender order is kept by PUSH/PULL
    let mut first_window = [0u64; SENDERS];
    let total = SENDERS as u64 * PER_SENDER;
    for n in 0..total {
        // From here on a message is (almost) always ready: `recv` still
        // yields after each fairness slice, so the timer and the senders run.
        let msg = rx.recv().await?.ok_or(FlowError::Closed)?;
        let (id, seq) = parse(&msg).ok_or("a message not made by `message`")?;
        assert_eq!(seq, next[id], "sender {id}: lost or reordered");
        next[id] += 1;
        if n < 3000 {
            first_window[id] += 1; // libzmq's PULL fair-queues between peers
        }
    }
    let drained_in = started.elapsed();
    // ANCHOR_END: receive

    stop.store(true, Ordering::Relaxed);
    let (ticks, max_gap, ran) = timer.await?;

    // ANCHOR: evidence
    for (id, sender) in senders.into_iter().enumerate() {
        let stats = sender.await??;
        println!(
            "sender {id}: {} messages, queue peaked at {} bytes (high {}), {} pauses",
            stats.items,
            stats.max_buffered,
            watermarks.high(),
            stats.pauses
        );
        assert!(stats.max_buffered <= watermarks.high() + SIZE);
    }
    println!(
        "received {total} messages in {drained_in:?}, in order per sender; \
         first 3000 came {first_window:?} from senders 0..{SENDERS}"
    );
    println!(
        "1 ms timer on the same thread: {ticks} ticks in {ran:?}, longest gap {max_gap:?}; \
         receiver yielded {} times for fairness",
        rx.zmq_stats().recv_yields
    );
    assert_eq!(next, [PER_SENDER; SENDERS]);
    // ANCHOR_END: evidence
    Ok(())
}
