//! The soak's verdicts: a table for people, JSON for tools.

use serde_json::{Value, json};

/// Everything measured for one scenario, and what it violated.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScenarioReport {
    pub(crate) name: String,
    pub(crate) seconds: f64,
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) reordered: u64,
    pub(crate) corrupted: u64,
    /// At-most-once loss: messages in flight on a connection the soak cut,
    /// reported and not counted as lost.
    pub(crate) in_flight_lost: u64,
    /// At-most-once loss by design: messages a ZeroMQ PUB dropped at its HWM
    /// and counted, reported and not counted as lost.
    pub(crate) dropped_at_most_once: u64,
    pub(crate) latency_p50_us: u64,
    pub(crate) latency_p99_us: u64,
    pub(crate) max_buffered: usize,
    pub(crate) bound: usize,
    pub(crate) rss_peak: u64,
    pub(crate) rss_bound: u64,
    /// p99 lateness of the 1 ms timer that the runtime is to blame for
    /// (wall lateness minus the OS's run-queue delay of the thread): judged.
    pub(crate) timer_p99_us: u64,
    /// p99 lateness on the wall clock: reported, not judged.
    pub(crate) timer_wall_p99_us: u64,
    pub(crate) timer_max_us: u64,
    pub(crate) timer_bound_us: u64,
    pub(crate) faults: u64,
    pub(crate) leaks: u64,
    pub(crate) violations: Vec<String>,
}

impl ScenarioReport {
    pub(crate) fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// Checks every invariant and records each violation in words.
    pub(crate) fn judge(&mut self) {
        let n = &self.name;
        let mut v = Vec::new();
        if self.messages == 0 {
            v.push(format!("{n}: no message was delivered"));
        }
        for (what, count) in [
            ("lost", self.lost),
            ("duplicated", self.duplicated),
            ("reordered", self.reordered),
            ("corrupted", self.corrupted),
        ] {
            if count > 0 {
                v.push(format!("{n}: {count} messages {what}"));
            }
        }
        if self.max_buffered > self.bound {
            v.push(format!(
                "{n}: a stage buffered {} bytes, above its bound of {} (high + one item per producer)",
                self.max_buffered, self.bound
            ));
        }
        if self.rss_peak > self.rss_bound {
            v.push(format!(
                "{n}: RSS peaked at {} bytes, above the {} byte bound",
                self.rss_peak, self.rss_bound
            ));
        }
        if self.timer_p99_us > self.timer_bound_us {
            v.push(format!(
                "{n}: 1 ms timer p99 lateness {} µs (not counting time the OS kept the thread off the CPU), above the {} µs bound: something starved the runtime",
                self.timer_p99_us, self.timer_bound_us
            ));
        }
        if self.leaks > 0 {
            v.push(format!(
                "{n}: {} resources leaked (tasks, file descriptors, ledger entries or processes)",
                self.leaks
            ));
        }
        // Violations the scenario found itself come first: they explain the rest.
        v.splice(0..0, self.violations.drain(..));
        self.violations = v;
    }

    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "passed": self.passed(),
            "seconds": self.seconds,
            "messages": self.messages,
            "bytes": self.bytes,
            "throughput_msgs": self.messages as f64 / self.seconds.max(1e-9),
            "throughput_mb": self.bytes as f64 / 1e6 / self.seconds.max(1e-9),
            "lost": self.lost,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "corrupted": self.corrupted,
            "in_flight_lost": self.in_flight_lost,
            "dropped_at_most_once": self.dropped_at_most_once,
            "latency_p50_us": self.latency_p50_us,
            "latency_p99_us": self.latency_p99_us,
            "max_buffered": self.max_buffered,
            "bound": self.bound,
            "rss_peak": self.rss_peak,
            "rss_bound": self.rss_bound,
            "timer_p99_us": self.timer_p99_us,
            "timer_wall_p99_us": self.timer_wall_p99_us,
            "timer_max_us": self.timer_max_us,
            "timer_bound_us": self.timer_bound_us,
            "faults": self.faults,
            "leaks": self.leaks,
            "violations": self.violations,
        })
    }
}

/// The whole run.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) seed: u64,
    pub(crate) scenarios: Vec<ScenarioReport>,
}

impl Report {
    pub(crate) fn passed(&self) -> bool {
        self.scenarios.iter().all(ScenarioReport::passed)
    }

    pub(crate) fn first_violation(&self) -> Option<&str> {
        self.scenarios
            .iter()
            .flat_map(|s| s.violations.first())
            .next()
            .map(String::as_str)
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "seed": self.seed,
            "passed": self.passed(),
            "scenarios": self.scenarios.iter().map(ScenarioReport::json).collect::<Vec<_>>(),
        })
    }

    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{:<9} {:>10} {:>9} {:>8} {:>9} {:>9} {:>21} {:>17} {:>15} {:>6} {:>5} {:>7}\n",
            "scenario",
            "messages",
            "msg/s",
            "MB/s",
            "p50 µs",
            "p99 µs",
            "max buffered/bound",
            "RSS peak/bound",
            "timer p99 µs",
            "faults",
            "leaks",
            "verdict"
        ));
        for s in &self.scenarios {
            let secs = s.seconds.max(1e-9);
            out.push_str(&format!(
                "{:<9} {:>10} {:>9.0} {:>8.1} {:>9} {:>9} {:>21} {:>17} {:>15} {:>6} {:>5} {:>7}\n",
                s.name,
                s.messages,
                s.messages as f64 / secs,
                s.bytes as f64 / 1e6 / secs,
                s.latency_p50_us,
                s.latency_p99_us,
                format!("{}/{}", kib(s.max_buffered as u64), kib(s.bound as u64)),
                format!("{}/{}", mib(s.rss_peak), mib(s.rss_bound)),
                format!("{}/{}", s.timer_p99_us, s.timer_bound_us),
                s.faults,
                s.leaks,
                if s.passed() { "PASS" } else { "FAIL" },
            ));
            out.push_str(&format!(
                "{:<9} lost {} duplicated {} reordered {} corrupted {}",
                "", s.lost, s.duplicated, s.reordered, s.corrupted
            ));
            if s.in_flight_lost > 0 {
                out.push_str(&format!(
                    " (in flight on cut connections, at-most-once: {})",
                    s.in_flight_lost
                ));
            }
            if s.dropped_at_most_once > 0 {
                out.push_str(&format!(
                    " (dropped by PUB at HWM or DropOldest and counted, at-most-once: {})",
                    s.dropped_at_most_once
                ));
            }
            out.push('\n');
        }
        out
    }
}

fn kib(b: u64) -> String {
    format!("{}K", b / 1024)
}

fn mib(b: u64) -> String {
    format!("{:.0}M", b as f64 / 1048576.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_names_every_broken_invariant() {
        let mut s = ScenarioReport {
            name: "pipe".into(),
            messages: 10,
            lost: 1,
            max_buffered: 11,
            bound: 10,
            rss_bound: u64::MAX,
            timer_bound_us: u64::MAX,
            ..ScenarioReport::default()
        };
        s.judge();
        assert_eq!(s.violations.len(), 2);
        assert_eq!(s.violations[0], "pipe: 1 messages lost");
        assert!(s.violations[1].contains("above its bound"));
        let r = Report {
            seed: 7,
            scenarios: vec![s],
        };
        assert!(!r.passed());
        assert_eq!(r.json()["scenarios"][0]["lost"], 1);
        assert_eq!(r.json()["passed"], false);
    }
}
