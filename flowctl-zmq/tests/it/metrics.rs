//! The `metrics` feature: a socket's stages, read back through a real
//! Prometheus exposition (metrics-exporter-prometheus's recorder, rendered to
//! text as a scrape would see it).

use std::time::{Duration, Instant};

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::{Fairness, Overflow, Watermarks};
use flowctl_zmq::{Context, Multipart, SocketType, ZmqSocket};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::peer::{DEADLINE, message};

/// The value of `metric` with exactly these labels in an exposition.
fn value(text: &str, metric: &str, labels: &str) -> Option<f64> {
    let key = format!("{metric}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map(|v| v.trim().parse().expect("a number"))
}

fn recorder() -> (PrometheusRecorder, PrometheusHandle) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    (recorder, handle)
}

fn hundred(i: u8) -> Multipart {
    Multipart::from(Bytes::from(vec![i; 100]))
}

/// A PUSH under DropOldest into a PULL that reads nothing: the drops, the
/// items accepted (straight into libzmq or queued), the refusals and the
/// queue's gauges, under the default stage name.
#[tokio::test]
async fn a_dropping_push_exports_its_drops_items_and_refusals() {
    let (recorder, handle) = recorder();
    let ctx = Context::new();
    let _rx = ZmqSocket::builder(SocketType::Pull)
        .context(&ctx)
        .recv_hwm(1)
        .bind("inproc://metrics-push")
        .build()
        .unwrap()
        .into_source();
    let wm = Watermarks::new(0, 1000).unwrap();
    let mut tx = metrics::with_local_recorder(&recorder, || {
        ZmqSocket::builder(SocketType::Push)
            .context(&ctx)
            .send_hwm(1)
            .watermarks(wm)
            .overflow(Overflow::DropOldest)
            .linger(Some(Duration::ZERO))
            .connect("inproc://metrics-push")
            .build()
            .unwrap()
            .into_sink()
    });
    for i in 0..50 {
        tx.send(hundred(i)).await.unwrap();
    }
    let s = tx.stats();
    assert!(s.dropped > 0, "{s:?}");
    let text = handle.render();
    let l = r#"stage="zmq.inproc://metrics-push.push""#;
    assert_eq!(
        value(
            &text,
            "flowctl_dropped_total",
            &format!(r#"{l},reason="drop_oldest""#)
        ),
        Some(s.dropped as f64),
        "{text}"
    );
    assert_eq!(value(&text, "flowctl_items_total", l), Some(50.0), "{text}");
    assert_eq!(value(&text, "flowctl_bytes_total", l), Some(5000.0));
    assert_eq!(
        value(&text, "flowctl_buffered_bytes", l),
        Some(s.buffered as f64)
    );
    assert_eq!(
        value(&text, "flowctl_high_watermark_bytes", l),
        Some(1000.0)
    );
    // Every message libzmq did not take at once was refused with EAGAIN at
    // least once (the queue is pushed into libzmq on every `ready`).
    let eagain = value(&text, "flowctl_zmq_eagain_total", l).expect("eagain counted");
    assert!(eagain >= s.dropped as f64, "{eagain} < {}", s.dropped);
    // A dropping sink never waits.
    assert_eq!(value(&text, "flowctl_zmq_send_waits_total", l), Some(0.0));
}

/// A PUB's drops at its HWM are `flowctl_dropped_total{reason="hwm"}`.
#[tokio::test]
async fn pub_drops_at_hwm_are_exported_with_reason_hwm() {
    let (recorder, handle) = recorder();
    let ctx = Context::new();
    let mut tx = metrics::with_local_recorder(&recorder, || {
        ZmqSocket::builder(SocketType::Pub)
            .context(&ctx)
            .send_hwm(10)
            .name("ticks")
            .bind("inproc://metrics-pub")
            .build()
            .unwrap()
            .into_sink()
    });
    let mut rx = ZmqSocket::builder(SocketType::Sub)
        .context(&ctx)
        .recv_hwm(10)
        .subscribe(Bytes::new())
        .connect("inproc://metrics-pub")
        .build()
        .unwrap()
        .into_source();
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < DEADLINE, "subscription never arrived");
        tx.send(vec![Bytes::from_static(b"probe")].into())
            .await
            .unwrap();
        if tokio::time::timeout(Duration::from_millis(5), rx.recv())
            .await
            .is_ok()
        {
            break;
        }
    }
    for i in 0..1000 {
        tx.send(message(i, 16).into()).await.unwrap();
    }
    let dropped = tx.stats().dropped;
    assert!(dropped > 0);
    let text = handle.render();
    assert_eq!(
        value(
            &text,
            "flowctl_dropped_total",
            r#"stage="ticks",reason="hwm""#
        ),
        Some(dropped as f64),
        "{text}"
    );
    assert_eq!(
        value(&text, "flowctl_items_total", r#"stage="ticks""#),
        Some(tx.stats().items as f64)
    );
}

/// A source's forced yields (fairness slice spent) and the messages it
/// returned are exported under its stage name; a blocking sink's waits for
/// libzmq's room are counted.
#[tokio::test]
async fn a_source_exports_its_forced_yields_and_a_sink_its_waits() {
    let (recorder, handle) = recorder();
    let ctx = Context::new();
    let (mut rx, mut tx) = metrics::with_local_recorder(&recorder, || {
        let rx = ZmqSocket::builder(SocketType::Pull)
            .context(&ctx)
            .recv_hwm(4)
            .fairness(Fairness::new(3, 1 << 20).unwrap())
            .bind("inproc://metrics-pull")
            .build()
            .unwrap()
            .into_source();
        let tx = ZmqSocket::builder(SocketType::Push)
            .context(&ctx)
            .send_hwm(4)
            .watermarks(Watermarks::new(0, 100).unwrap())
            .connect("inproc://metrics-pull")
            .build()
            .unwrap()
            .into_sink();
        (rx, tx)
    });
    let n = 200u8;
    let writer = tokio::spawn(async move {
        for i in 0..n {
            tx.send(hundred(i)).await.unwrap();
        }
        tx.flush().await.unwrap();
        tx
    });
    for i in 0..n {
        assert_eq!(rx.recv().await.unwrap().unwrap(), hundred(i));
    }
    let tx = tokio::time::timeout(DEADLINE, writer)
        .await
        .unwrap()
        .unwrap();
    let yields = rx.stats().forced_yields;
    assert!(yields > 0, "a slice of 3 over 200 messages must yield");
    assert_eq!(yields, rx.zmq_stats().recv_yields);
    let text = handle.render();
    let pull = r#"stage="zmq.inproc://metrics-pull.pull""#;
    assert_eq!(
        value(&text, "flowctl_forced_yields_total", pull),
        Some(yields as f64),
        "{text}"
    );
    assert_eq!(value(&text, "flowctl_items_total", pull), Some(n as f64));
    assert_eq!(
        value(&text, "flowctl_bytes_total", pull),
        Some(100.0 * n as f64)
    );
    let push = r#"stage="zmq.inproc://metrics-pull.push""#;
    assert_eq!(value(&text, "flowctl_items_total", push), Some(n as f64));
    let waits = value(&text, "flowctl_zmq_send_waits_total", push).expect("waits counted");
    assert!(
        waits > 0.0,
        "a sender 200 messages ahead of a HWM of 4 + 4 and a 100-byte queue must wait"
    );
    assert_eq!(
        value(&text, "flowctl_pauses_total", push),
        Some(tx.stats().pauses as f64)
    );
}
