//! Loom models of the ordered offload's worker hand-off.
//!
//! Run with `cargo xtask loom` (builds with `--cfg flowctl_loom`, which swaps
//! the offload's mutex and `Arc` for loom's and runs its workers on loom
//! threads instead of tokio's blocking pool). Loom explores every interleaving
//! of the stage and its workers; a job left queued with no worker to run it
//! shows up as a deadlock of `block_on`, which loom reports as a failure.
#![cfg(flowctl_loom)]

use bytes::Bytes;
use flowctl_core::offload::{Offload, ordered};
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{Fairness, Source, Watermarks, pipe_with};
use loom::future::block_on;
use loom::sync::Mutex;

fn unlimited() -> Fairness {
    Fairness::new(usize::MAX, usize::MAX).unwrap()
}

/// A pipe that never pauses its producer.
fn roomy() -> Watermarks {
    Watermarks::new(0, 1 << 20).unwrap()
}

/// One allowed job, and the next item arrives only from inside the current
/// job: it is queued while the only worker may be deciding that the queue is
/// empty. Whichever way that race goes, a worker runs it.
#[test]
fn a_job_queued_as_the_last_worker_leaves_is_run() {
    loom::model(|| {
        let (mut tx, rx) = pipe_with::<Bytes>(roomy(), unlimited());
        block_on(tx.send(Bytes::from_static(&[0]))).unwrap();
        let tx = Mutex::new(Some(tx));
        let limits = Offload {
            concurrency: 1,
            max_inflight_bytes: 1 << 20,
        };
        let mut out = ordered(rx, limits, move |b: Bytes| {
            if b[0] == 0 {
                // Job 0 hands the stage item 1 and ends the stream.
                let mut tx = tx.lock().unwrap().take().unwrap();
                block_on(tx.send(Bytes::from_static(&[1]))).unwrap();
            }
            b[0]
        });
        assert_eq!(block_on(out.recv()).unwrap(), Some(0));
        assert_eq!(block_on(out.recv()).unwrap(), Some(1));
        assert_eq!(block_on(out.recv()).unwrap(), None);
    });
}

/// Two allowed jobs, two items ready: every result comes out once, in input
/// order, whichever worker runs which job and whenever the workers leave.
#[test]
fn two_workers_emit_in_input_order() {
    loom::model(|| {
        let (mut tx, rx) = pipe_with::<Bytes>(roomy(), unlimited());
        block_on(tx.send(Bytes::from_static(&[0]))).unwrap();
        block_on(tx.send(Bytes::from_static(&[1]))).unwrap();
        drop(tx);
        let limits = Offload {
            concurrency: 2,
            max_inflight_bytes: 1 << 20,
        };
        let mut out = ordered(rx, limits, |b: Bytes| b[0]);
        assert_eq!(block_on(out.recv()).unwrap(), Some(0));
        assert_eq!(block_on(out.recv()).unwrap(), Some(1));
        assert_eq!(block_on(out.recv()).unwrap(), None);
        assert_eq!(out.stats().buffered, 0);
    });
}

/// Dropping the stage while a worker holds a job: the worker drops its result
/// and leaves; nothing waits forever.
#[test]
fn dropping_the_stage_lets_its_worker_leave() {
    loom::model(|| {
        let (mut tx, rx) = pipe_with::<Bytes>(roomy(), unlimited());
        block_on(tx.send(Bytes::from_static(&[0]))).unwrap();
        block_on(tx.send(Bytes::from_static(&[1]))).unwrap();
        drop(tx);
        let limits = Offload {
            concurrency: 1,
            max_inflight_bytes: 1 << 20,
        };
        let mut out = ordered(rx, limits, |b: Bytes| b[0]);
        assert_eq!(block_on(out.recv()).unwrap(), Some(0));
        drop(out);
    });
}
