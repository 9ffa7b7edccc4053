//! The `metrics` feature: default stage names and the NATS metrics, read back
//! through a real Prometheus exposition (metrics-exporter-prometheus's
//! recorder, rendered as a scrape would see it). The helpers serve the other
//! modules' metric checks too.

use bytes::Bytes;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// The value of `metric` with exactly these labels in an exposition.
pub(crate) fn value(text: &str, metric: &str, labels: &str) -> Option<f64> {
    let key = format!("{metric}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map(|v| v.trim().parse().expect("a number"))
}

pub(crate) fn recorder() -> (PrometheusRecorder, PrometheusHandle) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    (recorder, handle)
}

pub(crate) fn payload(i: u64, size: usize) -> Bytes {
    let mut p = vec![0u8; size];
    p[..8].copy_from_slice(&i.to_be_bytes());
    Bytes::from(p)
}

#[cfg(feature = "metrics")]
mod stages {
    use std::time::{Duration, Instant};

    use flowctl_cluster::testing::NatsCluster;
    use flowctl_cluster::{Cluster, ConsumeOptions, PublishOptions};
    use flowctl_core::lifecycle::Ledger;
    use flowctl_core::prelude::*;
    use flowctl_core::{Sink, Watermarks};

    use super::{payload, recorder, value};
    use crate::connect::{config, released};
    use crate::pull::stream_and_consumer;

    /// Polls `check` (every 10 ms, up to 30 s) until it holds.
    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(Instant::now() < deadline, "{what}: not within 30 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every stage is named by default, and its metrics say what its stats say.
    #[tokio::test]
    async fn default_stage_names_export_what_the_stats_say() {
        let (recorder, handle) = recorder();
        // The test's runtime has one thread: every stage below is created on it,
        // with this recorder.
        let _guard = metrics::set_default_local_recorder(&recorder);
        let mut nats = NatsCluster::start().await.expect("nats cluster");
        let ledger = Ledger::new();
        // One seed: the node to kill for a reconnect.
        let mut cfg = config(vec![nats.url(0)], &ledger);
        cfg.name = Some("mtest".into());
        cfg.subscription_capacity = 512;
        let cluster = Cluster::connect(cfg).await.unwrap();
        stream_and_consumer(&cluster, "MET", "met.>", "c", Duration::from_secs(30)).await;
        const N: u64 = 200;
        const SIZE: usize = 100;
        let pub_wm = Watermarks::new(2_000, 8_000).unwrap();
        let mut sink = cluster
            .publisher(
                "met.x",
                PublishOptions {
                    watermarks: pub_wm,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(sink.stage().name(), "nats.MET.met.x.publish");
        for i in 0..N {
            sink.send(payload(i, SIZE)).await.unwrap();
        }
        sink.flush().await.unwrap();
        let pull_wm = Watermarks::new(1_000, 4_000).unwrap();
        let mut src = cluster
            .consume(
                "MET",
                "c",
                ConsumeOptions {
                    watermarks: pull_wm,
                    batch: 16,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(src.stage().name(), "nats.MET.c.pull");
        for i in 0..N {
            let m = src.recv().await.unwrap().unwrap();
            assert_eq!(m.payload, payload(i, SIZE));
        }
        let core = cluster
            .subscribe("core.m", Fairness::default())
            .await
            .unwrap();
        assert_eq!(core.stage().name(), "nats.core.m.sub");

        let text = handle.render();
        let publish = r#"stage="nats.MET.met.x.publish""#;
        let s = sink.stats();
        assert_eq!(s.items, N);
        assert_eq!(
            value(&text, "flowctl_items_total", publish),
            Some(N as f64),
            "{text}"
        );
        assert_eq!(
            value(&text, "flowctl_bytes_total", publish),
            Some((N as usize * SIZE) as f64)
        );
        assert_eq!(value(&text, "flowctl_buffered_bytes", publish), Some(0.0));
        assert_eq!(
            value(&text, "flowctl_high_watermark_bytes", publish),
            Some(pub_wm.high() as f64)
        );
        assert_eq!(
            value(&text, "flowctl_max_buffered_bytes", publish),
            Some(s.max_buffered as f64)
        );
        let pull = r#"stage="nats.MET.c.pull""#;
        let ps = src.pull_stats();
        assert!(ps.pulls > 0, "{ps:?}");
        assert_eq!(
            value(&text, "flowctl_nats_pulls_total", pull),
            Some(ps.pulls as f64),
            "{text}"
        );
        for (metric, n) in [
            ("flowctl_nats_redeliveries_dropped_total", ps.duplicates),
            ("flowctl_nats_demand_resets_total", ps.resets),
            ("flowctl_nats_heartbeats_missed_total", ps.heartbeats_missed),
            ("flowctl_nats_missed_deliveries_total", ps.missed),
            ("flowctl_nats_gap_fills_total", ps.filled),
            ("flowctl_nats_gap_fill_failures_total", ps.fetch_failures),
        ] {
            assert_eq!(value(&text, metric, pull), Some(n as f64), "{metric}");
        }
        assert_eq!(
            value(&text, "flowctl_high_watermark_bytes", pull),
            Some(pull_wm.high() as f64)
        );
        assert_eq!(
            value(&text, "flowctl_max_buffered_bytes", pull),
            Some(src.stats().max_buffered as f64)
        );
        assert_eq!(
            value(
                &text,
                "flowctl_high_watermark_bytes",
                r#"stage="nats.core.m.sub""#
            ),
            Some(512.0)
        );

        // A reconnect: the seed node dies, the client moves to another node.
        let connection = r#"stage="nats.mtest.connection""#;
        assert_eq!(cluster.reconnects(), 0);
        nats.kill(0).await.unwrap();
        until("reconnect", || cluster.reconnects() >= 1).await;
        let text = handle.render();
        assert_eq!(
            value(&text, "flowctl_nats_reconnects_total", connection),
            Some(cluster.reconnects() as f64),
            "{text}"
        );
        drop((sink, src, core, cluster));
        released(&ledger, Duration::from_secs(10)).await;
    }

    /// Every value the process-wide ledger reports for one kind, in order:
    /// a recorder whose `flowctl_live_resources{kind}` gauge keeps its
    /// history (every other metric is dropped).
    #[derive(Clone, Default)]
    struct LiveHistory {
        kind: &'static str,
        sets: std::sync::Arc<std::sync::Mutex<Vec<f64>>>,
    }

    impl metrics::GaugeFn for LiveHistory {
        fn increment(&self, _: f64) {
            unreachable!("the ledger sets its gauge")
        }
        fn decrement(&self, _: f64) {
            unreachable!("the ledger sets its gauge")
        }
        fn set(&self, value: f64) {
            self.sets.lock().unwrap().push(value);
        }
    }

    impl metrics::Recorder for LiveHistory {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            metrics::Counter::noop()
        }
        fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            let ours = key.name() == "flowctl_live_resources"
                && key
                    .labels()
                    .any(|l| l.key() == "kind" && l.value() == self.kind);
            if ours {
                metrics::Gauge::from_arc(std::sync::Arc::new(self.clone()))
            } else {
                metrics::Gauge::noop()
            }
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    /// The ledger never reads zero while a pull source's subscription lives:
    /// `consume` has the source count it before the connect attempt lets go
    /// of its own count. The other order reported 1, 0, 1 (no await between
    /// the two, so only a recorder of every change sees the dip).
    #[tokio::test]
    async fn a_pull_subscription_is_counted_without_a_gap_from_subscribe_to_drop() {
        let nats = NatsCluster::start().await.expect("nats cluster");
        // The process-wide ledger is the one that reports (a test process
        // runs one test under nextest).
        let ledger = Ledger::global().clone();
        let cluster = Cluster::connect(config(nats.urls(), &ledger))
            .await
            .unwrap();
        stream_and_consumer(&cluster, "GAP", "gap.>", "c", Duration::from_secs(30)).await;
        let history = LiveHistory {
            kind: "nats.subscription",
            ..Default::default()
        };
        {
            // The runtime has one thread: the ledger changes on it.
            let _guard = metrics::set_default_local_recorder(&history);
            let src = cluster
                .consume("GAP", "c", ConsumeOptions::default())
                .await
                .unwrap();
            let sets = history.sets.lock().unwrap().clone();
            assert!(!sets.is_empty(), "the subscription was never counted");
            assert!(
                sets.iter().all(|&n| n >= 1.0),
                "the ledger read zero while the subscription lived: {sets:?}"
            );
            drop(src);
        }
        drop(cluster);
        released(&ledger, Duration::from_secs(10)).await;
    }
}
