//! Loom models of the gate's and the pipe's wake-up logic.
//!
//! Run with `cargo xtask loom` (builds with `--cfg flowctl_loom`, which swaps the
//! gate's and pipe's mutex and `Arc` for loom's). Loom explores every
//! interleaving of the threads below; a lost wake-up shows up as a deadlock of
//! `block_on`, which loom reports as a failure.
#![cfg(flowctl_loom)]

use bytes::Bytes;
use flowctl_core::gate::Gate;
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::{Fairness, FlowError, Watermarks, pipe_with};
use loom::future::block_on;
use loom::thread;

fn unlimited() -> Fairness {
    Fairness::new(usize::MAX, usize::MAX).unwrap()
}

/// A paused producer is woken by a credit that races with its registration.
#[test]
fn credit_racing_ready_wakes_the_producer() {
    loom::model(|| {
        let gate = Gate::new(Watermarks::new(0, 1).unwrap(), tracing::Span::none());
        gate.charge(2);
        let mut producer = gate.handle();
        let consumer = gate.clone();
        let t = thread::spawn(move || consumer.credit(2));
        block_on(producer.ready()).unwrap();
        t.join().unwrap();
        assert_eq!(gate.buffered(), 0);
    });
}

/// Two paused producers are both woken by one resume edge.
#[test]
fn resume_edge_wakes_two_producers() {
    loom::model(|| {
        let gate = Gate::new(Watermarks::new(0, 1).unwrap(), tracing::Span::none());
        gate.charge(2);
        let mut a = gate.handle();
        let mut b = gate.handle();
        let tb = thread::spawn(move || block_on(b.ready()));
        let consumer = gate.clone();
        let tc = thread::spawn(move || consumer.credit(2));
        block_on(a.ready()).unwrap();
        tb.join().unwrap().unwrap();
        tc.join().unwrap();
    });
}

/// Closing wakes a paused producer with `Closed`.
#[test]
fn close_racing_ready_fails_the_producer() {
    loom::model(|| {
        let gate = Gate::new(Watermarks::new(0, 1).unwrap(), tracing::Span::none());
        gate.charge(2);
        let mut producer = gate.handle();
        let closer = gate.clone();
        let t = thread::spawn(move || closer.close());
        assert!(matches!(block_on(producer.ready()), Err(FlowError::Closed)));
        t.join().unwrap();
    });
}

/// A producer fills a tiny pipe while the consumer drains it: every item
/// arrives once, in order, and the stream ends when the producer drops.
#[test]
fn pipe_producer_consumer_no_lost_wakeups() {
    loom::model(|| {
        let (mut tx, mut rx) = pipe_with::<Bytes>(Watermarks::new(0, 1).unwrap(), unlimited());
        let t = thread::spawn(move || {
            for i in 0..3u8 {
                block_on(tx.send(Bytes::from(vec![i; 2]))).unwrap();
            }
        });
        for i in 0..3u8 {
            let item = block_on(rx.recv()).unwrap().unwrap();
            assert_eq!(item[0], i);
        }
        assert_eq!(block_on(rx.recv()).unwrap(), None);
        t.join().unwrap();
    });
}

/// Dropping the source wakes a producer paused on a full pipe with `Closed`.
#[test]
fn pipe_source_drop_wakes_paused_producer() {
    loom::model(|| {
        let (mut tx, rx) = pipe_with::<Bytes>(Watermarks::new(0, 1).unwrap(), unlimited());
        block_on(tx.send(Bytes::from_static(b"xx"))).unwrap();
        let t = thread::spawn(move || drop(rx));
        // Either the drop came first (Closed at once) or the producer parks and is woken.
        assert!(matches!(
            block_on(tx.send(Bytes::from_static(b"y"))),
            Err(FlowError::Closed)
        ));
        t.join().unwrap();
    });
}
