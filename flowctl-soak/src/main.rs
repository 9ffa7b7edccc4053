//! `flowctl-soak`: runs real flowctl pipelines for a bounded time while
//! injecting faults on a seeded schedule, and checks the four promises with
//! numbers: nothing lost, duplicated or reordered; every stage within
//! `high + one item`; process RSS under a stated bound; a 1 ms timer on the
//! same runtime on time (p99 lateness bound); tasks, file descriptors and
//! ledger entries back to their baseline. Run it with `cargo xtask soak`.
//!
//! Each scenario runs on a fresh current_thread runtime, so an unfair stage
//! would starve the timer that shares its thread, and so its tasks can be
//! counted exactly at the end. Exit status 1 names the first violation.

mod check;
mod exporter;
mod monitor;
mod opts;
mod plot;
mod report;
mod scenarios;
mod watch;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flowctl_core::lifecycle::Ledger;
#[allow(unused_imports)]
use flowctl_core::prelude::*;

use crate::check::quantile;
use crate::monitor::{Monitor, Progress};
use crate::opts::Opts;
use crate::report::{Report, ScenarioReport};

/// RSS may grow by at most this much over the start of the soak. flowctl's
/// stages hold a few hundred KiB each; the margin is for the runtime, the
/// allocator and the samples the soak itself keeps.
const RSS_MARGIN: u64 = 128 * 1024 * 1024;

fn main() -> ExitCode {
    let opts = match Opts::parse(std::env::args().skip(1)) {
        Ok(opts) => opts,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    println!(
        "flowctl soak: seed {} (repeat with --seed {}), {:?} over scenarios {}",
        opts.seed,
        opts.seed,
        opts.duration,
        opts.scenarios.join(", ")
    );
    if let Some(addr) = opts.metrics {
        // Before any stage is built: stages bind their metrics when created.
        match exporter::start(addr) {
            Ok(bound) => println!("metrics served at http://{bound}/metrics"),
            Err(msg) => {
                eprintln!("{msg}");
                return ExitCode::from(2);
            }
        }
    }
    let report = match run(&opts) {
        Ok(report) => report,
        Err(msg) => {
            eprintln!("soak could not run: {msg}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&report.json()).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
        println!("report written to {}", path.display());
    }
    let status = if report.passed() {
        println!("soak PASSED (seed {})", report.seed);
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "soak FAILED (seed {}): {}",
            report.seed,
            report.first_violation().unwrap_or("unknown violation")
        );
        ExitCode::FAILURE
    };
    if opts.linger {
        println!("--linger: serving the metrics until stdin is closed");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    }
    status
}

fn run(opts: &Opts) -> Result<Report, String> {
    warm_up()?;
    let rss_bound = monitor::rss() + RSS_MARGIN;
    let per = opts.duration / opts.scenarios.len().max(1) as u32;
    let mut scenarios = Vec::new();
    for (i, name) in opts.scenarios.iter().enumerate() {
        let seed = opts.seed.wrapping_add(i as u64);
        let mut r = run_one(name, seed, per, opts)?;
        r.rss_bound = rss_bound;
        r.judge();
        scenarios.push(r);
    }
    Ok(Report {
        seed: opts.seed,
        scenarios,
    })
}

/// How long processes a scenario stopped get to exit before they count as
/// left behind (a SIGKILLed process is gone in microseconds; an sshd that
/// was asked to stop may take a moment).
const PROCESS_GRACE: Duration = Duration::from_secs(5);

/// The processes descended from the soak that were not there `before` and
/// still run after [`PROCESS_GRACE`]; each is SIGKILLed once counted, so one
/// scenario's leftovers do not count against the next (or outlive the soak).
fn processes_left(before: &[(u32, String)]) -> Vec<(u32, String)> {
    let deadline = std::time::Instant::now() + PROCESS_GRACE;
    loop {
        let left: Vec<(u32, String)> = monitor::descendants()
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        if left.is_empty() || std::time::Instant::now() >= deadline {
            for (pid, _) in &left {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
            return left;
        }
        // A polling interval: /proc has no exit notification for
        // processes that are not our own children.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// tokio creates some process-wide state once, on first use, and keeps it for
/// the life of the process (the signal driver's socket pair, for one). Create
/// it before any baseline is taken, so it is not mistaken for a leak.
fn warm_up() -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(tokio::task::yield_now());
    Ok(())
}

fn run_one(
    name: &str,
    seed: u64,
    duration: Duration,
    opts: &Opts,
) -> Result<ScenarioReport, String> {
    let fds_before = monitor::open_fds();
    let procs_before = monitor::descendants();
    let ledger_before = Ledger::global().total();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let progress = Arc::new(Progress::default());
    let monitor = Monitor::start(name, duration, progress.clone());
    let (outcome, lateness, tasks_left) = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let timer = tokio::spawn(monitor::timer_lateness(stop.clone()));
        let start = tokio::time::Instant::now();
        let ctx = scenarios::Ctx {
            seed,
            start,
            deadline: start + duration,
            inject: opts.inject,
            monitor: &monitor,
            progress,
            nats: opts.nats.as_ref(),
        };
        let outcome = scenarios::run(name, &ctx).await;
        stop.store(true, Ordering::SeqCst);
        let lateness = timer.await.unwrap_or_default();
        let tasks_left = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        (outcome, lateness, tasks_left)
    });
    let seconds = duration.as_secs_f64();
    let samples = monitor.finish();
    drop(rt);
    let fds_left = monitor::open_fds().saturating_sub(fds_before);
    let procs_left = processes_left(&procs_before);
    let ledger_left = Ledger::global().total().saturating_sub(ledger_before);
    if let Some(dir) = &opts.plot {
        let rss_bound = samples.first().map_or(0, |s| s.rss) + RSS_MARGIN;
        plot::write(dir, name, &samples, outcome.bound, rss_bound)?;
    }
    let t = outcome.tally;
    let mut violations = outcome.violations;
    for (what, left) in [
        ("tasks", tasks_left),
        ("file descriptors", fds_left),
        ("ledger entries", ledger_left),
    ] {
        if left > 0 {
            violations.push(format!("{name}: {left} {what} still open at the end"));
        }
    }
    if !procs_left.is_empty() {
        let list: Vec<String> = procs_left
            .iter()
            .map(|(pid, comm)| format!("{pid} ({comm})"))
            .collect();
        violations.push(format!(
            "{name}: {} processes still running at the end (killed now): {}",
            procs_left.len(),
            list.join(", ")
        ));
    }
    Ok(ScenarioReport {
        name: name.to_string(),
        seconds,
        messages: t.messages,
        bytes: outcome.bytes,
        lost: t.lost,
        duplicated: t.duplicated,
        reordered: t.reordered,
        corrupted: t.corrupted,
        in_flight_lost: t.in_flight_lost,
        dropped_at_most_once: t.dropped_at_most_once,
        latency_p50_us: quantile(&outcome.latencies_us, 0.5),
        latency_p99_us: quantile(&outcome.latencies_us, 0.99),
        max_buffered: outcome.max_buffered,
        bound: outcome.bound,
        rss_peak: samples
            .iter()
            .map(|s| s.rss)
            .max()
            .unwrap_or(0)
            .max(monitor::rss()),
        rss_bound: 0,
        timer_p99_us: quantile(&lateness.runtime, 0.99),
        timer_max_us: lateness.runtime.iter().copied().max().unwrap_or(0),
        timer_wall_p99_us: quantile(&lateness.wall, 0.99),
        timer_bound_us: opts.timer_bound_us,
        faults: outcome.faults,
        leaks: (tasks_left + fds_left + ledger_left + procs_left.len()) as u64,
        violations,
    })
}
