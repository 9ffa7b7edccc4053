//! Named stages, overflow policies on stdout/stderr, stdin writability and
//! window waits, and (feature `metrics`) what a real Prometheus recorder
//! exports, against both servers and both backends.

use std::time::Duration;

use bytes::Bytes;
use flowctl_core::prelude::*;
use flowctl_core::{FlowError, Overflow};
use flowctl_ssh::{ExecOptions, Output, Session, SshError};

use crate::fixture::{Fixture, both_servers};

both_servers! {
    default_stage_names_and_the_name_option => default_stage_names_and_the_name_option;
    drop_oldest_flood_finishes_unread_and_keeps_the_tail => drop_oldest_flood_finishes_unread_and_keeps_the_tail;
    drop_newest_flood_finishes_unread_and_keeps_whole_chunks_in_order => drop_newest_flood_finishes_unread_and_keeps_whole_chunks_in_order;
    fail_ends_the_stream_with_overflow_after_what_was_accepted => fail_ends_the_stream_with_overflow_after_what_was_accepted;
    stdin_writability_edges_and_window_waits_against_a_stalled_remote => stdin_writability_edges_and_window_waits_against_a_stalled_remote;
}

/// Lines of `seq 1 LINES`: about 24 MB, far more than the server, the
/// connection and our buffers hold for a consumer that reads nothing (a
/// blocking stdout would stall the command before it exits).
const LINES: u64 = 3_000_000;

fn seq_output() -> Vec<u8> {
    let mut all = Vec::with_capacity(24 * 1024 * 1024);
    for i in 1..=LINES {
        all.extend_from_slice(format!("{i}\n").as_bytes());
    }
    all
}

/// The base stage name of a process, checked against the default pattern
/// `ssh.<host>.<channel id>`.
fn default_base(out: &Output) -> String {
    let name = out.stage().name();
    let base = name
        .strip_suffix(".stdout")
        .unwrap_or_else(|| panic!("{name} does not end in .stdout"));
    let id = base
        .strip_prefix("ssh.127.0.0.1.")
        .unwrap_or_else(|| panic!("{name} is not ssh.127.0.0.1.<channel>.stdout"));
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "channel id {id:?} of {name}"
    );
    base.to_owned()
}

async fn default_stage_names_and_the_name_option(fx: Fixture) {
    let session = Session::connect(fx.config()).await.unwrap();
    let mut a = session.exec("echo a").await.unwrap();
    let mut b = session.exec("echo b").await.unwrap();
    let base_a = default_base(&a.stdout);
    let base_b = default_base(&b.stdout);
    assert_ne!(base_a, base_b, "two channels of one session share a name");
    assert_eq!(a.stderr.stage().name(), format!("{base_a}.stderr"));
    assert_eq!(a.stdin.stage().name(), format!("{base_a}.stdin"));
    assert_eq!(a.stdout.read_to_end().await.unwrap(), b"a\n");
    assert_eq!(b.stdout.read_to_end().await.unwrap(), b"b\n");
    assert!(a.wait().await.unwrap().success());
    assert!(b.wait().await.unwrap().success());

    let opts = ExecOptions::new().name("db1.dump");
    let mut c = session.exec_with("echo c", &opts).await.unwrap();
    assert_eq!(c.stdout.stage().name(), "db1.dump.stdout");
    assert_eq!(c.stderr.stage().name(), "db1.dump.stderr");
    assert_eq!(c.stdin.stage().name(), "db1.dump.stdin");
    assert_eq!(c.stdout.read_to_end().await.unwrap(), b"c\n");
    assert!(c.wait().await.unwrap().success());
}

/// Runs `seq` under `overflow` and reads nothing until the command has
/// exited: the exit must arrive although nobody reads (the reader keeps
/// taking the output and drops per policy). Returns the process's stdout,
/// the chunks then drained, and the bound `max(high, one chunk)`; under
/// `Overflow::Fail`, checks that the stream ended with `OutputOverflow`.
async fn flood_unread(fx: &Fixture, overflow: Overflow) -> (Output, Vec<Bytes>, usize) {
    let config = fx.config();
    let bound = config.watermarks.high().max(config.max_packet as usize);
    let session = Session::connect(config).await.unwrap();
    let opts = ExecOptions::new().overflow(overflow);
    let mut p = session
        .exec_with(&format!("seq 1 {LINES}"), &opts)
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(120), p.exit.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "seq did not exit while stdout was not read (stdout stats {:?})",
                p.stdout.stats()
            )
        })
        .unwrap();
    assert!(status.success(), "{status}");
    let stats = p.stdout.stats();
    assert!(
        stats.max_buffered <= bound,
        "stdout held {} bytes, above max(high, one chunk) = {bound}",
        stats.max_buffered
    );
    let mut chunks = Vec::new();
    let mut overflowed = false;
    loop {
        match p.stdout.recv().await {
            Ok(Some(c)) => chunks.push(c),
            Ok(None) => break,
            Err(e) => {
                assert_eq!(overflow, Overflow::Fail, "unexpected end: {e}");
                // The same end again, then stop.
                let again = p.stdout.recv().await.unwrap_err();
                assert_eq!(again.to_string(), e.to_string());
                let err = e.transport_error::<SshError>().expect("an SshError");
                match err {
                    SshError::OutputOverflow {
                        stage,
                        delivered,
                        high,
                        buffered,
                        charge,
                    } => {
                        assert_eq!(stage, p.stdout.stage().name());
                        assert_eq!(*delivered, p.stdout.delivered());
                        assert_eq!(*high, fx.config().watermarks.high());
                        assert!(buffered + charge > *high, "{err}");
                    }
                    other => panic!("expected OutputOverflow, got {other}"),
                }
                overflowed = true;
                break;
            }
        }
    }
    assert_eq!(
        overflowed,
        overflow == Overflow::Fail,
        "the stream must end with OutputOverflow exactly under Overflow::Fail"
    );
    (p.stdout, chunks, bound)
}

async fn drop_oldest_flood_finishes_unread_and_keeps_the_tail(fx: Fixture) {
    let (stdout, chunks, bound) = flood_unread(&fx, Overflow::DropOldest).await;
    let all = seq_output();
    let got: Vec<u8> = chunks.concat();
    let stats = stdout.stats();
    // Every byte read from the channel entered the buffer; what was evicted
    // plus what was delivered is every chunk that entered.
    assert_eq!(stats.bytes, all.len() as u64);
    assert_eq!(chunks.len() as u64 + stats.dropped, stats.items);
    assert!(stats.dropped > 0, "nothing dropped: {stats:?}");
    assert!(!got.is_empty() && got.len() <= bound, "{} bytes", got.len());
    // What is kept is the newest run of chunks: a suffix of the output.
    assert!(
        all.ends_with(&got),
        "the {} bytes delivered are not the end of the output",
        got.len()
    );
    assert_eq!(stdout.delivered(), got.len() as u64);
}

async fn drop_newest_flood_finishes_unread_and_keeps_whole_chunks_in_order(fx: Fixture) {
    let (stdout, chunks, bound) = flood_unread(&fx, Overflow::DropNewest).await;
    let all = seq_output();
    let got: Vec<u8> = chunks.concat();
    let stats = stdout.stats();
    // What entered is exactly what was delivered; the rest was refused.
    assert_eq!(stats.items, chunks.len() as u64);
    assert_eq!(stats.bytes, got.len() as u64);
    assert!(stats.dropped > 0, "nothing dropped: {stats:?}");
    assert!(!got.is_empty() && got.len() <= bound, "{} bytes", got.len());
    // The first chunk found the buffer empty; later ones were kept when they
    // fitted (a small chunk may fit after a large one was refused): what is
    // kept are whole chunks of the output, in order.
    assert!(all.starts_with(&chunks[0]));
    assert_in_order(&all, &chunks);
}

/// Checks that `chunks` are pieces of `all` (the output of `seq`), in order
/// and not overlapping. A chunk is placed by its first whole line (the line
/// numbers of `seq` give their offsets), or searched for if it has none.
fn assert_in_order(all: &[u8], chunks: &[Bytes]) {
    let mut line_start = vec![0usize];
    for (i, &b) in all.iter().enumerate() {
        if b == b'\n' {
            line_start.push(i + 1);
        }
    }
    let mut end = 0usize;
    for (n, chunk) in chunks.iter().enumerate() {
        let whole_line = chunk.iter().position(|&b| b == b'\n').and_then(|k| {
            let rest = &chunk[k + 1..];
            let len = rest.iter().position(|&b| b == b'\n')?;
            let line: usize = std::str::from_utf8(&rest[..len]).ok()?.parse().ok()?;
            line_start[line - 1].checked_sub(k + 1)
        });
        let at = match whole_line {
            Some(at) => at,
            None if n == 0 => 0,
            None => {
                end + all[end..]
                    .windows(chunk.len())
                    .position(|w| w == &chunk[..])
                    .unwrap_or_else(|| panic!("chunk {n} is not in the output after byte {end}"))
            }
        };
        assert!(
            at >= end,
            "chunk {n} at byte {at} overlaps or precedes byte {end}"
        );
        assert_eq!(
            &all[at..at + chunk.len()],
            &chunk[..],
            "chunk {n} is not the output at byte {at}"
        );
        end = at + chunk.len();
    }
}

async fn fail_ends_the_stream_with_overflow_after_what_was_accepted(fx: Fixture) {
    let (stdout, chunks, bound) = flood_unread(&fx, Overflow::Fail).await;
    let all = seq_output();
    let got: Vec<u8> = chunks.concat();
    let stats = stdout.stats();
    assert_eq!(stats.items, chunks.len() as u64);
    assert_eq!(stats.bytes, got.len() as u64);
    assert_eq!(stats.dropped, 0, "Fail drops nothing silently");
    assert!(!got.is_empty() && got.len() <= bound, "{} bytes", got.len());
    assert!(all.starts_with(&got));
}

/// Remote stdin that is not read until the test creates `go`: the stdin
/// sink pauses (edge seen through its writability handle), the writer
/// waits for the window, and once the remote reads, the sink resumes and
/// every byte arrives.
async fn stdin_writability_edges_and_window_waits_against_a_stalled_remote(fx: Fixture) {
    #[cfg(feature = "metrics")]
    let (recorder, handle) = metrics_support::recorder();
    let session = Session::connect(fx.config()).await.unwrap();
    let go = fx.path("go");
    let cmd = format!(
        "while [ ! -e {go} ]; do sleep 0.01; done; wc -c",
        go = go.display()
    );
    #[cfg(feature = "metrics")]
    let p = metrics_support::recorded(&recorder, session.exec(&cmd)).await;
    #[cfg(not(feature = "metrics"))]
    let p = session.exec(&cmd).await;
    let p = p.unwrap();
    let (mut stdin, mut stdout, _stderr, mut exit) = p.split();
    let mut writable = stdin.writability().expect("stdin reports writability");
    assert!(!writable.is_paused());
    assert_eq!(writable.pauses(), 0);

    const CHUNK: usize = 32 * 1024;
    const TOTAL: usize = 32 * 1024 * 1024;
    let producer = tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; CHUNK]);
        for _ in 0..TOTAL / CHUNK {
            stdin.send(chunk.clone()).await.unwrap();
        }
        stdin.close().await.unwrap();
        stdin
    });
    // The pause edge: far more is sent than the remote takes unread.
    while !writable.changed().await.unwrap() {}
    assert!(writable.is_paused());
    #[cfg(feature = "metrics")]
    let stdin_stage = format!(r#"stage="{}""#, stdin_name(&stdout));
    #[cfg(feature = "metrics")]
    let window_waits = || {
        metrics_support::value(
            &handle.render(),
            "flowctl_ssh_window_waits_total",
            &stdin_stage,
        )
        .unwrap_or(0.0) as u64
    };
    // The writer ends up waiting for a window the stalled remote does not
    // return (observable while the producer owns stdin only through the
    // exported counter).
    #[cfg(feature = "metrics")]
    crate::fixture::until(Duration::from_secs(60), "a stdin window wait", || {
        window_waits() >= 1
    })
    .await;
    std::fs::write(&go, b"").unwrap();
    let stdin = producer.await.unwrap();
    // Everything was written: the resume edge is the next one seen.
    assert!(!writable.changed().await.unwrap());
    assert!(!writable.is_paused());
    assert!(writable.pauses() >= 1);
    #[cfg(feature = "metrics")]
    {
        assert!(stdin.window_waits() >= 1);
        assert_eq!(window_waits(), stdin.window_waits());
    }
    let counted = String::from_utf8(stdout.read_to_end().await.unwrap()).unwrap();
    assert_eq!(counted.trim(), TOTAL.to_string());
    assert!(exit.wait().await.unwrap().success());
    let stats = stdin.stats();
    assert_eq!(stats.bytes, TOTAL as u64);
    assert!(stats.pauses >= 1);
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
fn stdin_name(stdout: &Output) -> String {
    let name = stdout.stage().name();
    format!("{}.stdin", name.strip_suffix(".stdout").unwrap())
}

/// A real Prometheus recorder, used as the thread's recorder while a process
/// is started (core's metrics tests do the same with a closure).
#[cfg(feature = "metrics")]
mod metrics_support {
    use std::future::Future;
    use std::pin::pin;

    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

    pub(crate) fn recorder() -> (PrometheusRecorder, PrometheusHandle) {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        (recorder, handle)
    }

    /// Polls `fut` with `recorder` as the thread's recorder: the stages a
    /// process registers while `exec` runs bind to it.
    pub(crate) async fn recorded<F: Future>(recorder: &PrometheusRecorder, fut: F) -> F::Output {
        let mut fut = pin!(fut);
        std::future::poll_fn(|cx| metrics::with_local_recorder(recorder, || fut.as_mut().poll(cx)))
            .await
    }

    /// The value of `metric` with exactly these labels in an exposition.
    pub(crate) fn value(text: &str, metric: &str, labels: &str) -> Option<f64> {
        let key = format!("{metric}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .map(|v| v.trim().parse().expect("a number"))
    }
}

/// What a process exports: its default stage names on the core metrics,
/// the channel open and the exit by outcome.
#[cfg(feature = "metrics")]
mod exported {
    use super::metrics_support::{recorded, recorder, value};
    use super::*;

    both_servers! {
        default_names_in_a_prometheus_exposition => default_names_in_a_prometheus_exposition;
        a_dropped_process_is_counted_abandoned => a_dropped_process_is_counted_abandoned;
    }

    async fn a_dropped_process_is_counted_abandoned(fx: Fixture) {
        let (recorder, handle) = recorder();
        let session = Session::connect(fx.config()).await.unwrap();
        let opts = ExecOptions::new().name("test.sleeper");
        let p = recorded(&recorder, session.exec_with("sleep 600", &opts))
            .await
            .unwrap();
        drop(p);
        // The process's tasks end once they have given the channel up.
        tokio::time::timeout(
            Duration::from_secs(60),
            fx.ledger.until_zero(Some(flowctl_ssh::LEDGER_TASK)),
        )
        .await
        .expect("the process's tasks to end");
        let text = handle.render();
        let l = r#"stage="test.sleeper""#;
        assert_eq!(
            value(&text, "flowctl_ssh_channels_opened_total", l),
            Some(1.0)
        );
        for (outcome, n) in [("abandoned", 1.0), ("success", 0.0), ("lost", 0.0)] {
            assert_eq!(
                value(
                    &text,
                    "flowctl_ssh_exits_total",
                    &format!(r#"stage="test.sleeper",outcome="{outcome}""#)
                ),
                Some(n),
                "{outcome}: {text}"
            );
        }
    }

    async fn default_names_in_a_prometheus_exposition(fx: Fixture) {
        let (recorder, handle) = recorder();
        let session = Session::connect(fx.config()).await.unwrap();
        let mut p = recorded(
            &recorder,
            session.exec("head -c 100000 /dev/zero; echo oops >&2; exit 3"),
        )
        .await
        .unwrap();
        let base = default_base(&p.stdout);
        let out = p.stdout.read_to_end().await.unwrap();
        assert_eq!(out.len(), 100_000);
        // The login shell of sshd may print its own warnings first.
        let err = p.stderr.read_to_end().await.unwrap();
        assert!(
            err.ends_with(b"oops\n"),
            "{}",
            String::from_utf8_lossy(&err)
        );
        assert_eq!(p.wait().await.unwrap().code(), Some(3));
        let text = handle.render();
        let stage = |s: &str| format!(r#"stage="{base}.{s}""#);
        assert_eq!(
            value(&text, "flowctl_bytes_total", &stage("stdout")),
            Some(100_000.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "flowctl_bytes_total", &stage("stderr")),
            Some(err.len() as f64)
        );
        assert_eq!(
            value(&text, "flowctl_items_total", &stage("stdout")),
            Some(p.stdout.stats().items as f64)
        );
        assert_eq!(
            value(&text, "flowctl_high_watermark_bytes", &stage("stdin")),
            Some(fx.config().watermarks.high() as f64)
        );
        let proc_label = format!(r#"stage="{base}""#);
        assert_eq!(
            value(&text, "flowctl_ssh_channels_opened_total", &proc_label),
            Some(1.0),
            "{text}"
        );
        for (outcome, n) in [("success", 0.0), ("failure", 1.0), ("lost", 0.0)] {
            assert_eq!(
                value(
                    &text,
                    "flowctl_ssh_exits_total",
                    &format!(r#"stage="{base}",outcome="{outcome}""#)
                ),
                Some(n),
                "{outcome}: {text}"
            );
        }
    }
}

/// The overflow error reads well.
#[test]
fn output_overflow_message_names_the_stage_and_the_limit() {
    let e: FlowError = SshError::OutputOverflow {
        stage: "db1.dump.stdout".into(),
        buffered: 65000,
        charge: 32768,
        high: 65536,
        delivered: 1234,
    }
    .into();
    let text = e.to_string();
    for part in [
        "db1.dump.stdout",
        "32768",
        "65536",
        "1234",
        "Overflow::Fail",
    ] {
        assert!(text.contains(part), "{text}");
    }
}
