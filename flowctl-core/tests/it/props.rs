//! For any sequence of sends, receives, batch receives, cancellations and
//! closes on a pipe with any watermarks: buffered bytes match a model, the gate
//! pauses and resumes exactly as the hysteresis rule says, buffered never
//! exceeds `high + largest item`, and every accepted item is received once, in
//! order.

#[allow(unused_imports)]
use flowctl_core::prelude::*;
use std::collections::VecDeque;

use bytes::Bytes;
use flowctl_core::weighted::MIN_CHARGE;
use flowctl_core::{Fairness, FlowError, PipeSink, Watermarks, pipe_with};
use futures::FutureExt;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Send on handle h an item of weight w; if the pipe is paused the send is
    /// polled once and dropped (a cancellation).
    Send(usize, usize),
    Recv,
    RecvMany(usize),
    Close(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 1..60usize).prop_map(|(h, w)| Op::Send(h, w)),
        3 => Just(Op::Recv),
        1 => (1..6usize).prop_map(Op::RecvMany),
        1 => (0..3usize).prop_map(Op::Close),
    ]
}

fn item(id: u32, weight: usize) -> Bytes {
    let mut v = vec![0u8; weight.max(4)];
    v[..4].copy_from_slice(&id.to_be_bytes());
    v.truncate(weight.max(4));
    Bytes::from(v)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn pipe_matches_the_watermark_model(high in 1..200usize, low_frac in 0.0..=1.0f64, ops in proptest::collection::vec(op(), 1..200)) {
        let low = (high as f64 * low_frac) as usize;
        let wm = Watermarks::new(low, high).unwrap();
        let unlimited = Fairness::new(usize::MAX, usize::MAX).unwrap();
        let (tx, mut rx) = pipe_with::<Bytes>(wm, unlimited);
        let mut handles: Vec<Option<PipeSink<Bytes>>> = vec![Some(tx.clone()), Some(tx.clone()), Some(tx)];
        let mut model: VecDeque<(u32, usize)> = VecDeque::new();
        let (mut buffered, mut paused, mut next_id, mut max_weight) = (0usize, false, 0u32, 0usize);

        for op in ops {
            match op {
                Op::Send(h, w) => {
                    let w = w.max(4);
                    let Some(tx) = handles[h].as_mut() else { continue };
                    let res = tx.send(item(next_id, w)).now_or_never();
                    if paused {
                        prop_assert!(res.is_none(), "send must wait while paused");
                    } else {
                        prop_assert!(matches!(res, Some(Ok(()))), "send must be accepted while open: {res:?}");
                        // Every item is charged at least MIN_CHARGE.
                        let charge = w.max(MIN_CHARGE);
                        model.push_back((next_id, charge));
                        buffered += charge;
                        max_weight = max_weight.max(charge);
                        if buffered > high { paused = true; }
                        next_id += 1;
                    }
                }
                Op::Recv => {
                    let res = rx.recv().now_or_never();
                    match model.pop_front() {
                        Some((id, w)) => {
                            let got = res.expect("an item is queued").unwrap().expect("not the end");
                            prop_assert_eq!(u32::from_be_bytes([got[0], got[1], got[2], got[3]]), id);
                            buffered -= w;
                            if paused && buffered <= low { paused = false; }
                        }
                        None if handles.iter().all(Option::is_none) => prop_assert!(matches!(res, Some(Ok(None)))),
                        None => prop_assert!(res.is_none()),
                    }
                }
                Op::RecvMany(max) => {
                    let mut buf = Vec::new();
                    let res = rx.recv_many(&mut buf, max).now_or_never();
                    if model.is_empty() {
                        if handles.iter().all(Option::is_none) {
                            prop_assert!(matches!(res, Some(Ok(0))));
                        } else {
                            prop_assert!(res.is_none());
                        }
                    } else {
                        let n = res.expect("items are queued").unwrap();
                        prop_assert_eq!(n, max.min(model.len()));
                        for got in buf {
                            let (id, w) = model.pop_front().unwrap();
                            prop_assert_eq!(u32::from_be_bytes([got[0], got[1], got[2], got[3]]), id);
                            buffered -= w;
                        }
                        if paused && buffered <= low { paused = false; }
                    }
                }
                Op::Close(h) => {
                    if let Some(mut tx) = handles[h].take() {
                        prop_assert!(matches!(flowctl_core::SinkExt::close(&mut tx).now_or_never(), Some(Ok(()))));
                        prop_assert!(matches!(tx.send(item(0, 4)).now_or_never(), Some(Err(FlowError::Closed))));
                    }
                }
            }
            let s = rx.stats();
            prop_assert_eq!(s.buffered, buffered);
            prop_assert_eq!(s.paused, paused);
            prop_assert!(s.max_buffered <= high + max_weight, "max_buffered {} > high {} + {}", s.max_buffered, high, max_weight);
        }
        // Drain: everything accepted is still there, in order.
        for h in handles.iter_mut() { h.take(); }
        while let Some((id, _)) = model.pop_front() {
            let got = rx.recv().now_or_never().unwrap().unwrap().unwrap();
            prop_assert_eq!(u32::from_be_bytes([got[0], got[1], got[2], got[3]]), id);
        }
        prop_assert!(matches!(rx.recv().now_or_never(), Some(Ok(None))));
    }
}
