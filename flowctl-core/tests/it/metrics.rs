//! The `metrics` feature: a named pipe's counters, read back through a real
//! Prometheus exposition (metrics-exporter-prometheus's recorder, rendered to
//! text as a scrape would see it).

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::stage::{Stage, describe_metrics};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::payload;

/// The value of `metric` with exactly these labels in an exposition.
fn value(text: &str, metric: &str, labels: &str) -> Option<f64> {
    let key = format!("{metric}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map(|v| v.trim().parse().expect("a number"))
}

fn recorder() -> (
    metrics_exporter_prometheus::PrometheusRecorder,
    PrometheusHandle,
) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    (recorder, handle)
}

#[tokio::test]
async fn a_named_pipe_exports_what_its_stats_say() {
    let (recorder, handle) = recorder();
    // The stage registers its handles with the recorder in force when it is named.
    let (mut tx, mut rx) = metrics::with_local_recorder(&recorder, || {
        describe_metrics();
        PipeBuilder::new(Watermarks::new(1000, 4000).unwrap())
            .name("test.stalled")
            .build::<Bytes>()
    });
    // Fill it above high: the producer would now wait.
    let mut sent = 0;
    while !tx.writability().unwrap().is_paused() {
        tx.send(payload(sent, 500)).await.unwrap();
        sent += 1;
    }
    let text = handle.render();
    let s = rx.stats();
    let l = r#"stage="test.stalled""#;
    assert_eq!(
        value(&text, "flowctl_buffered_bytes", l),
        Some(s.buffered as f64),
        "{text}"
    );
    assert_eq!(
        value(&text, "flowctl_max_buffered_bytes", l),
        Some(s.max_buffered as f64)
    );
    assert_eq!(
        value(&text, "flowctl_high_watermark_bytes", l),
        Some(4000.0)
    );
    assert_eq!(value(&text, "flowctl_low_watermark_bytes", l), Some(1000.0));
    assert_eq!(value(&text, "flowctl_paused", l), Some(1.0));
    assert_eq!(value(&text, "flowctl_pauses_total", l), Some(1.0));
    assert_eq!(
        value(&text, "flowctl_items_total", l),
        Some(f64::from(sent))
    );
    assert_eq!(
        value(&text, "flowctl_bytes_total", l),
        Some(f64::from(sent) * 500.0)
    );
    assert!(text.contains("# HELP flowctl_buffered_bytes "), "{text}");
    assert!(s.max_buffered <= 4000 + 500);

    // Drain it: resumed, nothing buffered.
    for _ in 0..sent {
        rx.recv().await.unwrap().unwrap();
    }
    let text = handle.render();
    assert_eq!(value(&text, "flowctl_buffered_bytes", l), Some(0.0));
    assert_eq!(value(&text, "flowctl_paused", l), Some(0.0));
}

#[tokio::test]
async fn drops_and_forced_yields_are_counted_by_reason() {
    let (recorder, handle) = recorder();
    let (mut tx, mut rx) = metrics::with_local_recorder(&recorder, || {
        PipeBuilder::new(Watermarks::new(0, 1000).unwrap())
            .name("test.telemetry")
            .overflow(Overflow::DropOldest)
            .build::<Bytes>()
    });
    for seq in 0..100 {
        tx.send(payload(seq, 100)).await.unwrap();
    }
    let s = rx.stats();
    assert_eq!(s.dropped, 90);
    let text = handle.render();
    assert_eq!(
        value(
            &text,
            "flowctl_dropped_total",
            r#"stage="test.telemetry",reason="drop_oldest""#
        ),
        Some(90.0),
        "{text}"
    );
    // Ten items queued, a fairness slice of 3: the source yields to its task.
    drop(tx);
    let (tx2, mut rx2) = metrics::with_local_recorder(&recorder, || {
        PipeBuilder::new(Watermarks::default())
            .name("test.fair")
            .fairness(Fairness::new(3, 1 << 20).unwrap())
            .build::<Bytes>()
    });
    let mut tx2 = tx2;
    for seq in 0..10 {
        tx2.send(payload(seq, 10)).await.unwrap();
    }
    drop(tx2);
    while rx2.recv().await.unwrap().is_some() {}
    let yields = rx2.stats().forced_yields;
    assert!(yields >= 3, "{yields}");
    let text = handle.render();
    assert_eq!(
        value(&text, "flowctl_forced_yields_total", r#"stage="test.fair""#),
        Some(yields as f64)
    );
    while rx.recv().await.unwrap().is_some() {}
}

#[test]
fn a_stage_s_own_counters_carry_its_label() {
    let (recorder, handle) = recorder();
    let stage = metrics::with_local_recorder(&recorder, || Stage::new("ssh.h.0.stdout"));
    let c = metrics::with_local_recorder(&recorder, || {
        stage.counter("flowctl_ssh_window_waits_total")
    });
    c.increment(2);
    let text = handle.render();
    assert_eq!(
        value(
            &text,
            "flowctl_ssh_window_waits_total",
            r#"stage="ssh.h.0.stdout""#
        ),
        Some(2.0),
        "{text}"
    );
}

#[test]
fn the_global_ledger_reports_live_resources_by_kind() {
    use flowctl_core::lifecycle::Ledger;
    let (recorder, handle) = recorder();
    let kind = "test.metrics.ledger";
    let (a, b) = metrics::with_local_recorder(&recorder, || {
        (
            Ledger::global().acquire(kind),
            Ledger::global().acquire(kind),
        )
    });
    let l = format!(r#"kind="{kind}""#);
    assert_eq!(
        value(&handle.render(), "flowctl_live_resources", &l),
        Some(2.0)
    );
    metrics::with_local_recorder(&recorder, || {
        drop(a);
        drop(b);
    });
    assert_eq!(
        value(&handle.render(), "flowctl_live_resources", &l),
        Some(0.0)
    );
    // A ledger of one's own does not export.
    metrics::with_local_recorder(&recorder, || {
        drop(Ledger::new().acquire("test.metrics.own"))
    });
    assert!(!handle.render().contains("test.metrics.own"));
}

#[tokio::test]
async fn a_busy_stage_s_metrics_lag_by_less_than_32_operations_and_a_drained_one_reads_exactly() {
    let (recorder, handle) = recorder();
    let (mut tx, mut rx) = metrics::with_local_recorder(&recorder, || {
        PipeBuilder::new(Watermarks::new(0, 1 << 20).unwrap())
            .name("test.lag")
            .build::<Bytes>()
    });
    let l = r#"stage="test.lag""#;
    // 100 charges, no edge (far below high), nothing received.
    for seq in 0..100 {
        tx.send(payload(seq, 100)).await.unwrap();
    }
    let items = value(&handle.render(), "flowctl_items_total", l).unwrap_or(0.0);
    assert!((100.0 - 31.0..=100.0).contains(&items), "{items}");
    let buffered = value(&handle.render(), "flowctl_buffered_bytes", l).unwrap_or(0.0);
    assert!((69.0 * 100.0..=10_000.0).contains(&buffered), "{buffered}");
    // Drained to empty: exact.
    for _ in 0..100 {
        rx.recv().await.unwrap().unwrap();
    }
    let text = handle.render();
    assert_eq!(value(&text, "flowctl_items_total", l), Some(100.0));
    assert_eq!(value(&text, "flowctl_bytes_total", l), Some(10_000.0));
    assert_eq!(value(&text, "flowctl_buffered_bytes", l), Some(0.0));
    assert_eq!(
        value(&text, "flowctl_max_buffered_bytes", l),
        Some(rx.stats().max_buffered as f64)
    );
}
