#[allow(unused_imports)]
use flowctl_core::prelude::*;
use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use flowctl_core::{Watermarks, pipe};
use futures::FutureExt;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn pause_and_resume_are_debug_events_inside_the_pipe_span() {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let (mut tx, mut rx) = pipe::<Bytes>(Watermarks::new(0, 4).unwrap());
        tx.send(Bytes::from(vec![7u8; 100]))
            .now_or_never()
            .unwrap()
            .unwrap();
        rx.recv().now_or_never().unwrap().unwrap().unwrap();
    });
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let paused = lines
        .iter()
        .find(|l| l.contains("paused"))
        .expect("a pause event");
    let resumed = lines
        .iter()
        .find(|l| l.contains("resumed"))
        .expect("a resume event");
    for line in [paused, resumed] {
        assert!(line.contains("DEBUG"), "{line}");
        assert!(
            line.contains("flowctl.pipe"),
            "event inside the pipe's span: {line}"
        );
    }
    assert!(
        paused.contains("buffered=100") && paused.contains("high=4"),
        "{paused}"
    );
    assert!(resumed.contains("buffered=0"), "{resumed}");
}

#[test]
fn drops_are_warned_at_most_once_per_second_per_stage_with_the_stage_s_name() {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let started = std::time::Instant::now();
    let stats = tracing::subscriber::with_default(subscriber, || {
        let (mut tx, rx) = flowctl_core::PipeBuilder::new(Watermarks::new(0, 1000).unwrap())
            .name("telemetry.test")
            .overflow(flowctl_core::Overflow::DropNewest)
            .build::<Bytes>();
        for _ in 0..100_000 {
            tx.try_send(Bytes::from_static(&[1; 100])).unwrap();
        }
        rx.stats()
    });
    let elapsed = started.elapsed();
    assert_eq!(stats.dropped, 100_000 - 10);
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let warns: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    // One warn for the first drop, then at most one per full second since.
    assert!(!warns.is_empty());
    assert!(
        warns.len() as u64 <= 1 + elapsed.as_secs(),
        "{} warns in {elapsed:?}",
        warns.len()
    );
    assert!(
        warns[0].contains("telemetry.test") && warns[0].contains("drop_newest"),
        "{}",
        warns[0]
    );
}
