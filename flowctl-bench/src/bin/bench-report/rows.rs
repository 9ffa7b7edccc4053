//! The rows of the report: what each compares, its goal, and which harness
//! measures it; and how a row's samples become a figure and a verdict.

use std::collections::BTreeMap;

/// What a row must show to pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Goal {
    /// The median per-round ratio flowctl / anchor is at least this.
    RatioAtLeast(f64),
    /// The flowctl figure (in the row's unit) is at most this.
    AtMost(f64),
    /// No goal: shown for context, counted neither pass nor fail.
    Info,
}

impl Goal {
    /// The goal as the table and the JSON show it (`None` for [`Goal::Info`]).
    pub(crate) fn text(self, unit: &str) -> Option<String> {
        match self {
            Goal::RatioAtLeast(r) => Some(format!(">= {r}")),
            Goal::AtMost(v) => Some(format!("<= {v} {unit}")),
            Goal::Info => None,
        }
    }
}

/// The program that measures a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Harness {
    /// `cargo bench -p flowctl-bench --bench core` (criterion).
    Core,
    /// `flowctl-ssh/examples/bench_ssh.rs`.
    Ssh,
    /// `flowctl-ssh/examples/remote_to_local.rs --stall-ms`.
    SshMem,
    /// `flowctl-zmq/examples/bench_zmq.rs`.
    Zmq,
    /// `flowctl-zmq/examples/bench_zmq.rs` with `BENCH_MEM`.
    ZmqMem,
    /// `flowctl-cluster/examples/bench_cluster.rs`.
    Cluster,
}

/// One row of the report.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowSpec {
    /// Row name, prefixed by area: `core.`, `ssh.`, `zmq.`, `cluster.`, `fair.`, `mem.`.
    pub(crate) name: &'static str,
    /// Unit of the flowctl and anchor figures.
    pub(crate) unit: &'static str,
    pub(crate) goal: Goal,
    pub(crate) harness: Harness,
    /// For [`Harness::Core`]: the criterion ids (flowctl, anchor).
    pub(crate) criterion: Option<(&'static str, &'static str)>,
    /// What the flowctl figure is.
    pub(crate) flowctl: &'static str,
    /// What the anchor figure is.
    pub(crate) anchor: &'static str,
    /// Why the row may be missing from a harness that ran fine (a figure
    /// that harness does not measure yet); `None`: missing is a failure.
    pub(crate) may_be_missing: Option<&'static str>,
}

const fn core(
    name: &'static str,
    unit: &'static str,
    goal: Goal,
    ids: (&'static str, &'static str),
    flowctl: &'static str,
    anchor: &'static str,
) -> RowSpec {
    RowSpec {
        name,
        unit,
        goal,
        harness: Harness::Core,
        criterion: Some(ids),
        flowctl,
        anchor,
        may_be_missing: None,
    }
}

const fn harness(
    name: &'static str,
    unit: &'static str,
    goal: Goal,
    harness: Harness,
    flowctl: &'static str,
    anchor: &'static str,
) -> RowSpec {
    RowSpec {
        name,
        unit,
        goal,
        harness,
        criterion: None,
        flowctl,
        anchor,
        may_be_missing: None,
    }
}

/// Every row, in report order.
pub(crate) const ROWS: &[RowSpec] = &[
    core(
        "core.pipe_vs_mpsc.per_item",
        "items/s",
        Goal::RatioAtLeast(0.8),
        (
            "pipe_vs_mpsc/flowctl_per_item/mt2",
            "pipe_vs_mpsc/mpsc_per_item/mt2",
        ),
        "`pipe` send/recv of 64 B items, 2 workers",
        "`tokio::sync::mpsc` of the same memory bound",
    ),
    core(
        "core.metrics_overhead",
        "items/s",
        Goal::RatioAtLeast(0.9),
        ("metrics_overhead/named/mt2", "metrics_overhead/unnamed/mt2"),
        "`pipe` per item, named: every charge and credit reported to a Prometheus recorder",
        "the same pipe unnamed (reports nothing), same build",
    ),
    core(
        "core.metrics_overhead.vs_mpsc",
        "items/s",
        Goal::RatioAtLeast(0.8),
        (
            "metrics_overhead/named/mt2",
            "pipe_vs_mpsc/mpsc_per_item/mt2",
        ),
        "`pipe` per item, named, metrics recorded",
        "`tokio::sync::mpsc` of the same memory bound",
    ),
    core(
        "core.pipe_vs_mpsc.per_item.ct",
        "items/s",
        Goal::RatioAtLeast(0.8),
        (
            "pipe_vs_mpsc/flowctl_per_item/ct",
            "pipe_vs_mpsc/mpsc_per_item/ct",
        ),
        "the same on a current-thread runtime",
        "`mpsc`, current thread",
    ),
    core(
        "core.pipe_vs_mpsc.recv_many",
        "items/s",
        Goal::RatioAtLeast(1.0),
        (
            "pipe_vs_mpsc/flowctl_recv_many/mt2",
            "pipe_vs_mpsc/mpsc_recv_many/mt2",
        ),
        "`pipe` with `recv_many(64)`, 2 workers",
        "`mpsc` with `recv_many(64)`",
    ),
    core(
        "core.pipe_vs_mpsc.recv_many.ct",
        "items/s",
        Goal::RatioAtLeast(1.0),
        (
            "pipe_vs_mpsc/flowctl_recv_many/ct",
            "pipe_vs_mpsc/mpsc_recv_many/ct",
        ),
        "the same on a current-thread runtime",
        "`mpsc` with `recv_many(64)`, current thread",
    ),
    core(
        "core.pipe_vs_duplex.bytes",
        "MiB/s",
        Goal::RatioAtLeast(1.0),
        ("pipe_vs_duplex/flowctl", "pipe_vs_duplex/duplex"),
        "`pipe` of 64 KiB chunks, copied in and out (the copies `duplex` makes)",
        "`tokio::io::duplex(high)`",
    ),
    core(
        "core.pipe_vs_duplex.zero_copy",
        "MiB/s",
        Goal::Info,
        ("pipe_vs_duplex/flowctl_zero_copy", "pipe_vs_duplex/duplex"),
        "`pipe` moving refcounted `Bytes`",
        "`tokio::io::duplex(high)`",
    ),
    core(
        "core.fairness_overhead.pipe",
        "items/s",
        Goal::RatioAtLeast(0.95),
        (
            "fairness_overhead/pipe_default/mt2",
            "fairness_overhead/pipe_coop_only/mt2",
        ),
        "`pipe` with the default `Fairness`",
        "the same with tokio's coop budget only",
    ),
    core(
        "core.fairness_overhead.stream",
        "items/s",
        Goal::RatioAtLeast(0.95),
        (
            "fairness_overhead/stream_default/ct",
            "fairness_overhead/stream_coop_only/ct",
        ),
        "always-ready `StreamSource`, default `Fairness`",
        "the same with tokio's coop budget only",
    ),
    core(
        "core.fairness_overhead.foreign_fair",
        "items/s",
        Goal::RatioAtLeast(0.95),
        (
            "fairness_overhead/foreign_fair/ct",
            "fairness_overhead/foreign_unfair/ct",
        ),
        "an always-ready foreign `Source` wrapped in `.fair(..)`",
        "the same source bare",
    ),
    core(
        "core.fairness_overhead.unconstrained",
        "items/s",
        Goal::Info,
        (
            "fairness_overhead/foreign_fair_unconstrained/ct",
            "fairness_overhead/foreign_unfair/ct",
        ),
        "the same `.fair(..)` source inside `tokio::task::unconstrained` (no coop budget: the slice's own yields only)",
        "the same source bare",
    ),
    core(
        "core.offload.ordered",
        "MiB/s",
        Goal::RatioAtLeast(1.8),
        ("offload/ordered_c2", "offload/inline"),
        "`offload::ordered`, concurrency 2, FNV-1a per 64 KiB frame",
        "the same hash inline",
    ),
    core(
        "core.offload.threads_ideal",
        "MiB/s",
        Goal::Info,
        ("offload/threads_ideal", "offload/inline"),
        "two plain threads (the ceiling the machine offers right now)",
        "the same hash inline",
    ),
    core(
        "core.framed",
        "MiB/s",
        Goal::Info,
        ("framed/flowctl", "framed/framed_read"),
        "`frame::Framed` + `LengthDelimitedCodec`, 1 KiB frames in 4 KiB chunks",
        "`FramedRead` over a `StreamReader` of the same chunks",
    ),
    harness(
        "ssh.aes128-gcm",
        "MB/s",
        Goal::RatioAtLeast(1.0),
        Harness::Ssh,
        "flowctl-ssh exec of `head -c N /dev/zero` from sshd, aes128-gcm",
        "OpenSSH `ssh -c aes128-gcm@openssh.com` from the same sshd",
    ),
    harness(
        "ssh.chacha20-poly1305",
        "MB/s",
        Goal::RatioAtLeast(1.0),
        Harness::Ssh,
        "the same, chacha20-poly1305",
        "OpenSSH `ssh -c chacha20-poly1305@openssh.com`",
    ),
    harness(
        "zmq.push_pull.100b",
        "msg/s",
        Goal::RatioAtLeast(0.9),
        Harness::Zmq,
        "flowctl-zmq PUSH -> PULL over tcp loopback, 100 B, `send_many`/`recv_many` of 256",
        "raw blocking `zmq` PUSH -> PULL, same sizes",
    ),
    harness(
        "zmq.push_pull.100b.send",
        "msg/s",
        Goal::Info,
        Harness::Zmq,
        "the same with one `send` per message (receiver still `recv_many`)",
        "raw blocking `zmq`, 100 B",
    ),
    harness(
        "zmq.push_pull.64kib",
        "MB/s",
        Goal::RatioAtLeast(0.9),
        Harness::Zmq,
        "flowctl-zmq PUSH -> PULL, 64 KiB, `send_many`/`recv_many`",
        "raw blocking `zmq`, 64 KiB",
    ),
    harness(
        "cluster.pull.r3_128b",
        "msg/s",
        Goal::RatioAtLeast(0.9),
        Harness::Cluster,
        "flowctl-cluster JetStream pull `Source` (`recv_many(256)`), R3 stream, 128 B",
        "raw async-nats pull consumer `messages()`, batches of 256, explicit acks",
    ),
    harness(
        "cluster.core_sub.128b",
        "msg/s",
        Goal::RatioAtLeast(0.9),
        Harness::Cluster,
        "flowctl-cluster core subscription `Source` (`recv_many(256)`) on node 1, 128 B; rounds with a lost message are not counted",
        "raw async-nats `Client::subscribe` with the same channel capacity (4096); both read one raw publisher on node 0 kept at most 2048 messages ahead",
    ),
    harness(
        "fair.zmq.timer_stall",
        "ms",
        Goal::AtMost(5.0),
        Harness::Zmq,
        "worst gap of a 1 ms timer next to an always-ready flowctl-zmq PULL (inproc, 100 B)",
        "the same next to a raw `AsyncFd` + `recv(DONTWAIT)` loop",
    ),
    harness(
        "mem.ssh.stalled_consumer",
        "MiB",
        Goal::AtMost(32.0),
        Harness::SshMem,
        "peak RSS (VmHWM) of `remote_to_local`: remote `head -c N` into a child that stalls 2 s, then reads 64 KiB per ms; the in-process SSH server is counted too",
        "the data size N",
    ),
    harness(
        "mem.zmq.stalled_consumer",
        "MiB",
        Goal::AtMost(32.0),
        Harness::ZmqMem,
        "peak RSS of one process: flowctl-zmq PUSH -> PULL (both sides counted), 64 KiB messages, the consumer stalls 2 s, then reads one per ms",
        "the data size",
    ),
];

/// The rows whose name starts with `prefix` (all rows for `None`).
pub(crate) fn select(prefix: Option<&str>) -> Vec<RowSpec> {
    ROWS.iter()
        .filter(|r| prefix.is_none_or(|p| r.name.starts_with(p)))
        .copied()
        .collect()
}

/// One measurement: a row, a side (`flowctl`, `anchor`, or `baseline` for
/// context), a round and a value in the row's unit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) side: String,
    pub(crate) round: usize,
    pub(crate) value: f64,
    pub(crate) unit: String,
    /// Bytes the harness says it moved, where it says so.
    pub(crate) bytes: Option<u64>,
}

/// What became of a row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    Measured {
        /// Median of the flowctl figures.
        flowctl: f64,
        /// Median of the anchor figures.
        anchor: f64,
        /// Median of the per-round ratios flowctl / anchor.
        ratio: f64,
        /// Rounds with both sides.
        rounds: usize,
        /// `None` for [`Goal::Info`].
        pass: Option<bool>,
        /// Median of the `baseline` side, if the harness measured one.
        baseline: Option<f64>,
    },
    /// The harness is not available, or does not measure this row yet.
    NotRun(String),
    /// The harness failed, or printed nothing for a row it must measure.
    Failed(String),
}

/// The median (mean of the middle two for an even count); `None` if empty.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// Turns the samples of one row into its outcome.
pub(crate) fn evaluate(spec: &RowSpec, samples: &[Sample]) -> Outcome {
    let mut sides: BTreeMap<&str, BTreeMap<usize, f64>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == spec.name) {
        if s.unit != spec.unit {
            return Outcome::Failed(format!(
                "harness reported {} in {}, expected {}",
                s.name, s.unit, spec.unit
            ));
        }
        sides
            .entry(s.side.as_str())
            .or_default()
            .insert(s.round, s.value);
    }
    let (Some(ours), Some(theirs)) = (sides.get("flowctl"), sides.get("anchor")) else {
        return match spec.may_be_missing {
            Some(reason) => Outcome::NotRun(reason.to_owned()),
            None => Outcome::Failed("the harness printed no figure for both sides".to_owned()),
        };
    };
    let ratios: Vec<f64> = ours
        .iter()
        .filter_map(|(round, a)| theirs.get(round).map(|b| a / b))
        .collect();
    let all = |m: &BTreeMap<usize, f64>| m.values().copied().collect::<Vec<_>>();
    let (Some(flowctl), Some(anchor), Some(ratio)) =
        (median(&all(ours)), median(&all(theirs)), median(&ratios))
    else {
        return Outcome::Failed("no round measured both sides".to_owned());
    };
    let pass = match spec.goal {
        Goal::RatioAtLeast(min) => Some(ratio >= min),
        Goal::AtMost(max) => Some(flowctl <= max),
        Goal::Info => None,
    };
    Outcome::Measured {
        flowctl,
        anchor,
        ratio,
        rounds: ratios.len(),
        pass,
        baseline: sides.get("baseline").and_then(|m| median(&all(m))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, side: &str, round: usize, value: f64, unit: &str) -> Sample {
        Sample {
            name: name.into(),
            side: side.into(),
            round,
            value,
            unit: unit.into(),
            bytes: None,
        }
    }

    #[test]
    fn names_are_unique_and_prefixed_by_area() {
        let areas = ["core.", "ssh.", "zmq.", "cluster.", "fair.", "mem."];
        for (i, r) in ROWS.iter().enumerate() {
            assert!(areas.iter().any(|a| r.name.starts_with(a)), "{}", r.name);
            assert!(ROWS[..i].iter().all(|o| o.name != r.name), "{}", r.name);
            assert_eq!(
                r.criterion.is_some(),
                r.harness == Harness::Core,
                "{}",
                r.name
            );
        }
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn ratio_is_the_median_of_paired_rounds() {
        let spec = select(Some("zmq.push_pull.100b"))[0];
        let n = spec.name;
        let s = [
            sample(n, "flowctl", 0, 90.0, "msg/s"),
            sample(n, "anchor", 0, 100.0, "msg/s"),
            sample(n, "flowctl", 1, 50.0, "msg/s"),
            sample(n, "anchor", 1, 100.0, "msg/s"),
            sample(n, "flowctl", 2, 95.0, "msg/s"),
            sample(n, "anchor", 2, 100.0, "msg/s"),
        ];
        let Outcome::Measured {
            ratio,
            pass,
            rounds,
            ..
        } = evaluate(&spec, &s)
        else {
            panic!("not measured");
        };
        assert!((ratio - 0.9).abs() < 1e-9);
        assert_eq!((pass, rounds), (Some(true), 3));
    }

    #[test]
    fn absolute_goal_checks_the_flowctl_figure() {
        let spec = select(Some("fair.zmq.timer_stall"))[0];
        let n = spec.name;
        let s = [
            sample(n, "flowctl", 0, 7.0, "ms"),
            sample(n, "anchor", 0, 300.0, "ms"),
            sample(n, "baseline", 0, 2.0, "ms"),
        ];
        let out = evaluate(&spec, &s);
        assert!(
            matches!(out, Outcome::Measured { pass: Some(false), baseline: Some(b), .. } if b == 2.0),
            "{out:?}"
        );
    }

    #[test]
    fn missing_rows_fail_unless_allowed() {
        let pull = select(Some("cluster.pull"))[0];
        let allowed = RowSpec {
            may_be_missing: Some("not measured yet"),
            ..pull
        };
        assert!(matches!(evaluate(&allowed, &[]), Outcome::NotRun(_)));
        let core_sub = select(Some("cluster.core_sub"))[0];
        assert!(matches!(evaluate(&core_sub, &[]), Outcome::Failed(_)));
        assert!(matches!(evaluate(&pull, &[]), Outcome::Failed(_)));
        let wrong_unit = [sample(pull.name, "flowctl", 0, 1.0, "MB/s")];
        assert!(matches!(evaluate(&pull, &wrong_unit), Outcome::Failed(_)));
    }

    #[test]
    fn goal_text() {
        assert_eq!(Goal::RatioAtLeast(0.8).text("x").as_deref(), Some(">= 0.8"));
        assert_eq!(Goal::AtMost(5.0).text("ms").as_deref(), Some("<= 5 ms"));
        assert_eq!(Goal::Info.text("ms"), None);
    }
}
