//! Overflow policies of the pipe, checked against a model: for any sequence of
//! sends and receives the bound holds, the counts are exact and what is kept
//! comes out in order.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::weighted::charge_of;
use futures::task::noop_waker_ref;
use proptest::prelude::*;

use crate::{payload, seq_of};

#[derive(Debug, Clone)]
enum Op {
    Send(usize),
    Recv,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..300).prop_map(Op::Send),
        2 => Just(Op::Recv),
    ]
}

fn policy() -> impl Strategy<Value = Overflow> {
    prop_oneof![
        Just(Overflow::Block),
        Just(Overflow::DropNewest),
        Just(Overflow::DropOldest),
        Just(Overflow::Fail),
    ]
}

/// The model: the queue (sequence numbers and charges) and its counts.
#[derive(Default)]
struct Model {
    queue: VecDeque<(u32, usize)>,
    buffered: usize,
    paused: bool,
    dropped: u64,
    refused: u64,
}

impl Model {
    fn fits(&self, charge: usize, high: usize) -> bool {
        self.buffered == 0 || self.buffered + charge <= high
    }

    fn push(&mut self, seq: u32, charge: usize, high: usize) {
        self.queue.push_back((seq, charge));
        self.buffered += charge;
        if self.buffered > high {
            self.paused = true;
        }
    }

    fn pop(&mut self, low: usize) -> Option<u32> {
        let (seq, charge) = self.queue.pop_front()?;
        self.buffered -= charge;
        if self.buffered <= low {
            self.paused = false;
        }
        Some(seq)
    }

    /// What the pipe must do with a send, by policy.
    fn send(&mut self, policy: Overflow, seq: u32, charge: usize, low: usize, high: usize) -> bool {
        match policy {
            Overflow::Block if self.paused => {
                self.refused += 1;
                return false;
            }
            Overflow::Block => {}
            _ if self.fits(charge, high) => {}
            Overflow::DropNewest => {
                self.dropped += 1;
                return true;
            }
            Overflow::DropOldest => {
                while !self.fits(charge, high) {
                    self.pop(low);
                    self.dropped += 1;
                }
            }
            _ => {
                self.refused += 1;
                return false;
            }
        }
        self.push(seq, charge, high);
        true
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn every_policy_keeps_the_bound_counts_exactly_and_keeps_order(
        policy in policy(),
        low in 0usize..400,
        extra in 1usize..600,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let high = low + extra;
        let wm = Watermarks::new(low, high).unwrap();
        let (mut tx, mut rx) = PipeBuilder::new(wm).overflow(policy).build::<Bytes>();
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut model = Model::default();
        let (mut sent, mut received, mut largest) = (0u64, 0u64, 0usize);
        for (seq, op) in (0u32..).zip(ops) {
            match op {
                Op::Send(len) => {
                    let item = payload(seq, len);
                    let charge = charge_of(&item);
                    largest = largest.max(charge);
                    sent += 1;
                    let accepted = model.send(policy, seq, charge, low, high);
                    match tx.try_send(item) {
                        Ok(()) => prop_assert!(accepted, "accepted, the model refused: seq {seq}"),
                        Err(e) => {
                            prop_assert!(!accepted, "refused, the model accepted: seq {seq}");
                            let back = e.into_inner();
                            prop_assert_eq!(seq_of(&back), seq, "the refused item comes back");
                        }
                    }
                }
                Op::Recv => {
                    let want = model.pop(low);
                    // The fairness budget may ask for a yield: poll again, as a task would.
                    let got = loop {
                        match rx.poll_recv(&mut cx) {
                            Poll::Ready(r) => break r.unwrap(),
                            Poll::Pending if want.is_some() => continue,
                            Poll::Pending => break None,
                        }
                    };
                    prop_assert_eq!(got.as_deref().map(seq_of), want, "order of what is kept");
                    received += u64::from(got.is_some());
                }
            }
            let stats = rx.stats();
            prop_assert_eq!(stats.buffered, model.buffered);
            prop_assert_eq!(stats.dropped, model.dropped);
            let bound = match policy {
                // One producer: high plus the one item sent while open.
                Overflow::Block => high + largest,
                // Never more than high, or one item alone.
                _ => high.max(largest),
            };
            prop_assert!(stats.max_buffered <= bound, "{} > {bound}", stats.max_buffered);
        }
        let remaining = model.queue.len() as u64;
        prop_assert_eq!(sent, received + model.dropped + model.refused + remaining);
        if policy != Overflow::DropNewest && policy != Overflow::DropOldest {
            prop_assert_eq!(rx.stats().dropped, 0);
        }
    }
}

#[tokio::test]
async fn fail_gives_the_item_back_with_a_clear_error_and_the_sink_stays_usable() {
    let (mut tx, mut rx) = PipeBuilder::new(Watermarks::new(0, 1000).unwrap())
        .overflow(Overflow::Fail)
        .build::<Bytes>();
    tx.send(payload(0, 900)).await.unwrap();
    tx.ready().await.unwrap(); // never waits under Fail
    let err = tx.start_send(payload(1, 200)).unwrap_err();
    assert_eq!(
        err.error().to_string(),
        "stage full: 900 bytes buffered, and an item of 200 bytes would exceed the 1000 byte high watermark"
    );
    assert!(err.error().is_transient());
    assert_eq!(seq_of(&err.into_inner()), 1);
    assert_eq!(seq_of(&rx.recv().await.unwrap().unwrap()), 0);
    tx.send(payload(2, 200)).await.unwrap();
    assert_eq!(seq_of(&rx.recv().await.unwrap().unwrap()), 2);
}

#[tokio::test]
async fn a_dropping_pipe_never_waits_for_a_stalled_consumer() {
    // The consumer never reads: a Block pipe would wait at the first pause.
    for policy in [Overflow::DropNewest, Overflow::DropOldest] {
        let (mut tx, rx) = PipeBuilder::new(Watermarks::new(0, 4096).unwrap())
            .overflow(policy)
            .build::<Bytes>();
        for seq in 0..10_000 {
            tx.send(payload(seq, 100)).await.unwrap();
        }
        let s = rx.stats();
        assert!(s.max_buffered <= 4096, "{policy:?}: {}", s.max_buffered);
        assert_eq!(
            s.dropped + s.buffered as u64 / 100,
            10_000,
            "{policy:?}: {s:?}"
        );
        assert_eq!(s.pauses, 0, "{policy:?}");
    }
}

#[tokio::test]
async fn writability_reports_each_edge_and_closes_with_the_pipe() {
    let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::new(100, 300).unwrap());
    let mut w = tx.writability().unwrap();
    let watcher = tokio::spawn(async move {
        let mut edges = Vec::new();
        while let Ok(paused) = w.changed().await {
            edges.push(paused);
        }
        (edges, w.pauses())
    });
    for round in 0..3u32 {
        // Above high: paused. Then drained to low: resumed. The producer and the
        // consumer wait on the pipe itself, never on time.
        tx.send(payload(round, 400)).await.unwrap();
        assert!(tx.writability().unwrap().is_paused());
        rx.recv().await.unwrap().unwrap();
        assert!(!tx.writability().unwrap().is_paused());
        // Wait until the watcher has seen both edges of this round (it runs on
        // the same thread: yield to it).
        while tx.stats().pauses != u64::from(round) + 1 {
            tokio::task::yield_now().await;
        }
    }
    drop(tx);
    drop(rx);
    let (edges, pauses) = watcher.await.unwrap();
    assert_eq!(pauses, 3);
    // Edges may coalesce when both happen before the watcher runs, but the
    // last state read is the resumed one, and it never reads paused twice in a row.
    assert!(!edges.is_empty() && !edges.last().unwrap(), "{edges:?}");
    assert!(edges.windows(2).all(|w| w[0] != w[1] || !w[0]), "{edges:?}");
}
