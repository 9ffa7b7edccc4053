//! What the soak watches while a scenario runs: process RSS and open file
//! descriptors (sampled on a thread of their own, so a starved runtime cannot
//! hide them), each stage's buffered bytes, the lateness of a 1 ms timer on
//! the scenario's runtime, and live throughput for the progress bar.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flowctl_core::FlowStats;
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Reads a `/proc/self/status` field in kB, as bytes.
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// Resident set size of this process now.
pub(crate) fn rss() -> u64 {
    status_kb("VmRSS:")
}

/// Open file descriptors of this process now, without the `--metrics`
/// exporter's listener and the scrapes it is serving (a scrape may be in
/// progress when a scenario's baseline or end is taken).
///
/// A scrape's socket is known by its inode in `/proc/net/tcp`, read before
/// and after the descriptors: one that opens and closes while they are read
/// is in neither, so the count is the least of three readings (a scrape takes
/// milliseconds and comes once a second; a leaked descriptor is in all three).
pub(crate) fn open_fds() -> usize {
    (0..3).map(|_| open_fds_once()).min().unwrap_or(0)
}

fn open_fds_once() -> usize {
    let port = crate::exporter::serves();
    let mut exporter = port.map_or_else(Default::default, tcp_inodes);
    let fds: Vec<_> = std::fs::read_dir("/proc/self/fd").map_or_else(
        |_| Vec::new(),
        |d| {
            d.flatten()
                .map(|fd| std::fs::read_link(fd.path()).ok())
                .collect()
        },
    );
    exporter.extend(port.map_or_else(Default::default, tcp_inodes));
    fds.into_iter()
        .filter(|target| {
            let Some(target) = target else {
                return true;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            !inode.is_some_and(|i| exporter.contains(&i))
        })
        .count()
}

/// The socket inodes of this network namespace's TCP sockets whose local
/// port is `port` (`/proc/net/tcp` and `tcp6`: hex `addr:port` in the second
/// column, the inode in the tenth).
fn tcp_inodes(port: u16) -> std::collections::HashSet<u64> {
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port)
                && let Some(inode) = cols.get(9).and_then(|i| i.parse::<u64>().ok())
            {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// Live processes descended from this one (children, their children, ...;
/// zombies not counted), as `pid (command)`, read from `/proc`. A process
/// orphaned by a dead parent is re-parented away from us and not seen: each
/// peer the soak starts (nats-server, sshd) is a direct child it owns.
pub(crate) fn descendants() -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) S ppid ...": comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().unwrap_or("?");
        let Some(ppid) = rest.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        procs.push((pid, ppid, state != "Z", comm));
    }
    let parent: std::collections::HashMap<u32, u32> = procs
        .iter()
        .map(|(pid, ppid, _, _)| (*pid, *ppid))
        .collect();
    let descends = |mut pid: u32| {
        // Bounded walk: a parent chain is never longer than the table.
        for _ in 0..parent.len() {
            match parent.get(&pid) {
                Some(&p) if p == me => return true,
                Some(&p) if p > 1 => pid = p,
                _ => return false,
            }
        }
        false
    };
    procs
        .into_iter()
        .filter(|(pid, _, live, _)| *live && *pid != me && descends(*pid))
        .map(|(pid, _, _, comm)| (pid, comm))
        .collect()
}

/// A stage whose buffered bytes are sampled: a name and a way to read its stats.
pub(crate) type Probe = (String, Box<dyn Fn() -> FlowStats + Send + Sync>);

/// One sample of everything watched.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) rss: u64,
    pub(crate) buffered: Vec<(String, usize)>,
}

/// Counters a scenario bumps as it moves messages, read by the progress line.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) messages: AtomicU64,
    pub(crate) bytes: AtomicU64,
}

/// The sampling thread and what it has recorded.
pub(crate) struct Monitor {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    probes: Arc<Mutex<Vec<Probe>>>,
    thread: Option<JoinHandle<()>>,
}

const EVERY: Duration = Duration::from_millis(50);

impl Monitor {
    /// Starts sampling; `label` and `total` drive the progress bar.
    pub(crate) fn start(label: &str, total: Duration, progress: Arc<Progress>) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let probes: Arc<Mutex<Vec<Probe>>> = Arc::new(Mutex::new(Vec::new()));
        let (s, sm, pr) = (stop.clone(), samples.clone(), probes.clone());
        let label = label.to_string();
        let thread = std::thread::Builder::new()
            .name("soak-monitor".into())
            .spawn(move || sample_loop(&label, total, &s, &sm, &pr, &progress))
            .ok();
        Monitor {
            stop,
            samples,
            probes,
            thread,
        }
    }

    /// Adds a stage to sample.
    pub(crate) fn probe(
        &self,
        name: impl Into<String>,
        f: impl Fn() -> FlowStats + Send + Sync + 'static,
    ) {
        lock(&self.probes).push((name.into(), Box::new(f)));
    }

    /// Stops sampling and returns the samples.
    pub(crate) fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        lock(&self.probes).clear();
        std::mem::take(&mut *lock(&self.samples))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sample_loop(
    label: &str,
    total: Duration,
    stop: &AtomicBool,
    samples: &Mutex<Vec<Sample>>,
    probes: &Mutex<Vec<Probe>>,
    progress: &Progress,
) {
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let bar = ProgressBar::with_draw_target(
            Some(total.as_millis() as u64),
            ProgressDrawTarget::stderr(),
        );
        if let Ok(style) =
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {elapsed:>4}/{duration:4} {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(label.to_string());
        Some(bar)
    } else {
        None
    };
    let (mut last_msgs, mut last_t, mut last_print) = (0u64, start, start);
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(EVERY);
        let now = Instant::now();
        let buffered = lock(probes)
            .iter()
            .map(|(n, f)| (n.clone(), f().buffered))
            .collect();
        let rss = rss();
        lock(samples).push(Sample {
            t: now.duration_since(start).as_secs_f64(),
            rss,
            buffered,
        });
        let msgs = progress.messages.load(Ordering::Relaxed);
        let rate = (msgs - last_msgs) as f64 / now.duration_since(last_t).as_secs_f64().max(1e-3);
        (last_msgs, last_t) = (msgs, now);
        let line = format!(
            "{msgs} msgs, {:.0} msg/s, RSS {:.1} MiB",
            rate,
            rss as f64 / 1048576.0
        );
        match &bar {
            Some(bar) => {
                bar.set_position(now.duration_since(start).as_millis() as u64);
                bar.set_message(line);
            }
            None if now.duration_since(last_print) >= Duration::from_secs(5) => {
                last_print = now;
                eprintln!(
                    "  {label}: {:>5.1}s {line}",
                    now.duration_since(start).as_secs_f64()
                );
            }
            None => {}
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// Nanoseconds this thread has spent waiting on a run queue (ready to run,
/// but the OS gave the CPU to someone else): the second field of
/// `/proc/thread-self/schedstat`. 0 where the kernel does not report it.
fn run_queue_delay_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The lateness of every tick of the 1 ms timer, in µs.
#[derive(Debug, Default)]
pub(crate) struct Lateness {
    /// As measured on the wall clock.
    pub(crate) wall: Vec<u64>,
    /// Minus the time the OS kept the runtime's thread waiting for a CPU since
    /// the previous tick: what the runtime itself (an unfair task) is to blame
    /// for. This is what the soak judges: on a loaded 2-core machine (CI, three
    /// nats-servers, sshd) the wall figure says more about the machine.
    pub(crate) runtime: Vec<u64>,
}

/// Measures how late a 1 ms interval fires on the current runtime (a
/// current_thread one: the timer shares the scenario's thread) until `stop`
/// is set.
pub(crate) async fn timer_lateness(stop: Arc<AtomicBool>) -> Lateness {
    let mut iv = tokio::time::interval(Duration::from_millis(1));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lateness = Lateness::default();
    let mut delay_before = run_queue_delay_ns();
    while !stop.load(Ordering::SeqCst) {
        let due = iv.tick().await;
        let late = tokio::time::Instant::now()
            .saturating_duration_since(due)
            .as_micros() as u64;
        let delay_now = run_queue_delay_ns();
        let os_us = delay_now.saturating_sub(delay_before) / 1000;
        delay_before = delay_now;
        lateness.wall.push(late);
        lateness.runtime.push(late.saturating_sub(os_us));
    }
    lateness
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_child_is_a_descendant_until_it_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        assert!(
            descendants().contains(&(pid, "sleep".to_owned())),
            "{:?}",
            descendants()
        );
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(!descendants().iter().any(|(p, _)| *p == pid));
    }
}
