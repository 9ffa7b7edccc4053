//! The scenarios. Each runs real flowctl stages until `deadline`, injects its
//! faults on the seeded schedule, checks every message end to end and returns
//! an [`Outcome`]; the runner adds the process-wide checks (RSS, timer
//! lateness, leaks) around it.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::time::Instant;

use crate::check::Tally;
use crate::monitor::{Monitor, Progress};
use crate::opts::Inject;

pub(crate) mod cluster;
pub(crate) mod pipe;
pub(crate) mod pipeline;
pub(crate) mod ssh;
pub(crate) mod telemetry;
pub(crate) mod zmq;

/// What a scenario gets from the runner.
pub(crate) struct Ctx<'a> {
    pub(crate) seed: u64,
    pub(crate) start: Instant,
    pub(crate) deadline: Instant,
    pub(crate) inject: Option<Inject>,
    pub(crate) monitor: &'a Monitor,
    pub(crate) progress: Arc<Progress>,
    /// `--nats`: the external cluster of the `cluster` scenario, if any.
    pub(crate) nats: Option<&'a crate::opts::Nats>,
}

impl Ctx<'_> {
    /// Microseconds since the scenario started: the clock messages carry.
    pub(crate) fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
}

/// Faults injected, by kind.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub(crate) stalls: AtomicU64,
    pub(crate) cancels: AtomicU64,
    /// Connections cut under a live stream (the peer's side killed).
    pub(crate) drops: AtomicU64,
    /// Peers closed mid-run (lingering, so nothing is lost) and replaced.
    pub(crate) restarts: AtomicU64,
}

impl Faults {
    pub(crate) fn total(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.stalls.load(Relaxed)
            + self.cancels.load(Relaxed)
            + self.drops.load(Relaxed)
            + self.restarts.load(Relaxed)
    }
}

/// What a scenario measured.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) tally: Tally,
    pub(crate) bytes: u64,
    /// The largest `max_buffered` of any stage, and the bound it must respect.
    pub(crate) max_buffered: usize,
    pub(crate) bound: usize,
    pub(crate) faults: u64,
    pub(crate) latencies_us: Vec<u64>,
    /// Violations only the scenario can see (e.g. a stage that errored).
    pub(crate) violations: Vec<String>,
}

/// Runs the scenario called `name`.
pub(crate) async fn run(name: &str, ctx: &Ctx<'_>) -> Outcome {
    match name {
        "pipe" => pipe::run(ctx).await,
        "telemetry" => telemetry::run(ctx).await,
        "ssh" => ssh::run(ctx, false).await,
        "ssh-sshd" => ssh::run(ctx, true).await,
        "zmq" => zmq::run(ctx).await,
        "cluster" => cluster::run(ctx).await,
        "pipeline" => pipeline::run(ctx).await,
        other => unreachable!("scenario {other} was validated by the option parser"),
    }
}
